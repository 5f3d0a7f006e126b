//! The first-byte parsers on arbitrary bytes: never panic, never claim more bytes than
//! they were given, and a parsed request head parses the same from its own bytes.
#![no_main]

use kiln_policy::peek::{http_request_head, peek, tls_client_hello, HttpPeek, TlsPeek};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let _ = peek(bytes).first_bytes();
    if let TlsPeek::ClientHello { sni: Some(name) } = tls_client_hello(bytes) {
        assert!(!name.is_empty() && name.len() <= 253, "{name:?}");
        assert_eq!(name, name.to_ascii_lowercase());
    }
    if let HttpPeek::Request(head) = http_request_head(bytes) {
        assert!(head.head_len <= bytes.len());
        assert_eq!(http_request_head(&bytes[..head.head_len]), HttpPeek::Request(head));
    }
});
