//! SCC annotation parsing and identity resolution: never panics; accepted blocks are
//! well-formed and print back to a value that parses to the same blocks.
#![no_main]

use std::collections::BTreeMap;

use kiln_identity::{
    parse_supplemental_groups, parse_uid_range, resolve_identity, SUPPLEMENTAL_GROUPS_ANNOTATION,
    UID_RANGE_ANNOTATION,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = std::str::from_utf8(data) else {
        return;
    };
    let groups = parse_supplemental_groups(value);
    let range = parse_uid_range(value);
    match (&groups, &range) {
        (Ok(blocks), Ok(first)) => {
            assert_eq!(blocks.first(), Some(first));
            for block in blocks {
                assert!(block.size() >= 1 && block.end() >= block.start());
                assert_eq!(
                    u64::from(block.end()) - u64::from(block.start()) + 1,
                    u64::from(block.size())
                );
            }
            let printed: Vec<String> = blocks.iter().map(ToString::to_string).collect();
            assert_eq!(
                parse_supplemental_groups(&printed.join(",")).as_ref(),
                Ok(blocks)
            );
        }
        (Err(_), Err(_)) => {}
        _ => panic!("the two annotations disagree about {value:?}"),
    }
    let annotations = BTreeMap::from([
        (UID_RANGE_ANNOTATION.to_owned(), value.to_owned()),
        (SUPPLEMENTAL_GROUPS_ANNOTATION.to_owned(), value.to_owned()),
    ]);
    if let Ok(resolved) = resolve_identity(None, None, &annotations) {
        let first = range.expect("resolution accepted a malformed annotation");
        assert_eq!(
            (resolved.uid.value, resolved.gid.value),
            (first.start(), first.start())
        );
    }
});
