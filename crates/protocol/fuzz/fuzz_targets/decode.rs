//! Feeds arbitrary bytes to both decoders: they must return frames or typed errors,
//! never panic, and whatever decodes must encode and decode again to the same frame.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((frame, used))) = kiln_protocol::decode_frame(rest) {
        let encoded = kiln_protocol::encode_frame(&frame).expect("a decoded frame encodes");
        let again = kiln_protocol::decode_frame(&encoded)
            .expect("re-decodes")
            .expect("whole");
        assert_eq!(again.0, frame);
        rest = &rest[used..];
    }
    let mut reader = Cursor::new(data);
    while let Ok(Some(_)) = kiln_protocol::read_frame(&mut reader) {}
});
