//! Run-as and numeric id parsing: never panics, and whatever is accepted is the one
//! canonical spelling of its value.
#![no_main]

use kiln_identity::{parse_sandbox_id, IdBounds, RunAs, MAX_SANDBOX_UID, MIN_SANDBOX_UID};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let run_as = RunAs::parse(data, IdBounds::KILN);
    if let Ok(value) = run_as {
        assert_eq!(
            value.to_string().as_bytes(),
            data,
            "accepted a non-canonical spelling"
        );
    }
    if let Ok(text) = std::str::from_utf8(data) {
        match parse_sandbox_id(text, IdBounds::KILN) {
            Ok(id) => {
                assert!((MIN_SANDBOX_UID..=MAX_SANDBOX_UID).contains(&id));
                assert_eq!(run_as, Ok(RunAs::Id(id)));
            }
            Err(err) => assert!(err.to_string().contains("accepted:")),
        }
    }
});
