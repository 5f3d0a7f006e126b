//! Properties of the account-file edit over generated files: comments, blank lines, NIS
//! lines, CRLF endings, stale and duplicate sandbox entries, binary junk, missing final
//! newlines and absent files.

use kiln_identity::{write_sandbox_accounts, AccountFiles, EditedAccounts};
use proptest::prelude::*;

fn line_content() -> impl Strategy<Value = Vec<u8>> {
    let text = |re: &'static str| re.prop_map(String::into_bytes);
    prop_oneof![
        text("#[ -~]{0,20}"),
        Just(Vec::new()),
        text("[+-][a-z@]{0,6}(:[a-z0-9]{0,3}){0,6}"),
        text("[a-z_][a-z0-9_-]{0,8}:x:[0-9]{1,6}:[0-9]{1,6}:[a-zA-Z ,]{0,8}:/[a-z/]{0,10}:/bin/[a-z]{1,5}"),
        text("[a-z]{1,8}:[x*!]?:[0-9]{1,6}:[a-z,]{0,12}"),
        text("sandbox(:[x!*$a-z0-9]{0,6}){0,8}"),
        text("sandbox:x:1[0-9]{4}:[a-z,]{0,12}"),
        text("sandbox:x:1[0-9]{3}:[a-z\r,]{0,8}\r?"),
        text(" ?sandbox[0-9a-z]?:x:1:1::/:/bin/sh"),
        proptest::collection::vec(any::<u8>().prop_filter("no NUL or newline", |b| *b != 0 && *b != b'\n'), 0..24),
    ]
}

/// A file as lines with `\n` or `\r\n` endings, the last one possibly unterminated
/// (or ending in a lone `\r`).
fn account_file() -> impl Strategy<Value = Option<Vec<u8>>> {
    let line = (
        line_content(),
        prop_oneof![Just(&b"\n"[..]), Just(&b"\r\n"[..])],
    );
    let file = (proptest::collection::vec(line, 0..12), any::<bool>()).prop_map(
        |(lines, terminate_last)| {
            let mut bytes = Vec::new();
            let count = lines.len();
            for (index, (content, ending)) in lines.into_iter().enumerate() {
                bytes.extend_from_slice(&content);
                if index + 1 < count || terminate_last {
                    bytes.extend_from_slice(ending);
                }
            }
            bytes
        },
    );
    proptest::option::weighted(0.9, file)
}

fn account_files() -> impl Strategy<Value = AccountFiles> {
    (
        account_file(),
        account_file(),
        account_file(),
        account_file(),
    )
        .prop_map(|(passwd, group, gshadow, shadow)| AccountFiles {
            passwd,
            group,
            gshadow,
            shadow,
        })
}

fn ids() -> impl Strategy<Value = (u32, u32)> {
    (1000u32..=2_000_000_000, 1000u32..=2_000_000_000)
}

/// Lines split on `\n`; a `\r` before the `\n` (or the end of the file) is not content.
fn is_sandbox_line(raw: &[u8]) -> bool {
    let content = raw.strip_suffix(b"\n").unwrap_or(raw);
    let content = content.strip_suffix(b"\r").unwrap_or(content);
    content.split(|&b| b == b':').next() == Some(b"sandbox")
}

fn raw_lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    bytes.split_inclusive(|&b| b == b'\n')
}

fn sandbox_lines(bytes: &[u8]) -> Vec<&[u8]> {
    raw_lines(bytes).filter(|l| is_sandbox_line(l)).collect()
}

fn other_lines(bytes: &[u8]) -> Vec<u8> {
    raw_lines(bytes)
        .filter(|l| !is_sandbox_line(l))
        .flatten()
        .copied()
        .collect()
}

fn outputs(e: &EditedAccounts) -> [&Vec<u8>; 4] {
    [&e.passwd, &e.group, &e.gshadow, &e.shadow]
}

fn inputs(f: &AccountFiles) -> [&[u8]; 4] {
    [&f.passwd, &f.group, &f.gshadow, &f.shadow].map(|file| file.as_deref().unwrap_or_default())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn applying_twice_equals_applying_once(files in account_files(), (uid, gid) in ids()) {
        let once = write_sandbox_accounts(&files, uid, gid, "/bin/sh", kiln_identity::IdBounds::KILN).unwrap();
        let again = AccountFiles {
            passwd: Some(once.passwd.clone()),
            group: Some(once.group.clone()),
            gshadow: Some(once.gshadow.clone()),
            shadow: Some(once.shadow.clone()),
        };
        let twice = write_sandbox_accounts(&again, uid, gid, "/bin/sh", kiln_identity::IdBounds::KILN).unwrap();
        prop_assert_eq!(outputs(&twice), outputs(&once));
    }

    #[test]
    fn exactly_one_sandbox_entry_per_file(files in account_files(), (uid, gid) in ids()) {
        let e = write_sandbox_accounts(&files, uid, gid, "/bin/bash", kiln_identity::IdBounds::KILN).unwrap();
        let expected = format!("sandbox:x:{uid}:{gid}:sandbox:/sandbox:/bin/bash\n");
        prop_assert_eq!(sandbox_lines(&e.passwd), vec![expected.as_bytes()]);
        for out in outputs(&e) {
            let found = sandbox_lines(out);
            prop_assert_eq!(found.len(), 1, "{}", out.escape_ascii());
            prop_assert!(found[0].ends_with(b"\n") && !found[0].ends_with(b"\r\n"));
        }
        let group_entry = sandbox_lines(&e.group)[0];
        let group_prefix = format!("sandbox:x:{gid}:");
        prop_assert!(group_entry.starts_with(group_prefix.as_bytes()));
        prop_assert!(sandbox_lines(&e.shadow)[0].starts_with(b"sandbox:!:"));
        prop_assert!(sandbox_lines(&e.gshadow)[0].starts_with(b"sandbox:!:"));
        // group and gshadow list the same members.
        let members = |line: &[u8]| line.split(|&b| b == b':').nth(3).map(<[u8]>::to_vec);
        prop_assert_eq!(members(group_entry), members(sandbox_lines(&e.gshadow)[0]));
    }

    #[test]
    fn unrelated_lines_are_preserved(files in account_files(), (uid, gid) in ids()) {
        let e = write_sandbox_accounts(&files, uid, gid, "/bin/sh", kiln_identity::IdBounds::KILN).unwrap();
        for (input, output) in inputs(&files).into_iter().zip(outputs(&e)) {
            let (kept_in, kept_out) = (other_lines(input), other_lines(output));
            let appended = sandbox_lines(input).is_empty();
            if appended && !kept_in.is_empty() && !kept_in.ends_with(b"\n") {
                // Only the newline that keeps the appended entry off the last line.
                prop_assert_eq!(kept_out, [&kept_in[..], b"\n"].concat());
            } else {
                prop_assert_eq!(kept_out, kept_in);
            }
            if appended {
                prop_assert!(output.starts_with(input));
            }
        }
    }
}

proptest! {
    #[test]
    fn decimal_ids_parse_exactly_within_bounds(id in any::<u32>()) {
        let text = id.to_string();
        let in_bounds = (1000..=2_000_000_000).contains(&id);
        prop_assert_eq!(kiln_identity::parse_sandbox_id(&text, kiln_identity::IdBounds::KILN).is_ok(), in_bounds);
        prop_assert_eq!(kiln_identity::RunAs::parse(text.as_bytes(), kiln_identity::IdBounds::KILN).ok(), in_bounds.then_some(kiln_identity::RunAs::Id(id)));
        // No other spelling of the same number is accepted.
        for other in [format!("0{text}"), format!("+{text}"), format!(" {text}"), format!("{text} "), format!("{id:#x}")] {
            prop_assert!(kiln_identity::RunAs::parse(other.as_bytes(), kiln_identity::IdBounds::KILN).is_err(), "{other}");
        }
    }

    #[test]
    fn both_block_forms_agree(start in any::<u32>(), size in 1u32..=u32::MAX, pad in "[ \t]{0,2}") {
        prop_assume!(start.checked_add(size - 1).is_some());
        let end = start + (size - 1);
        let slash = kiln_identity::parse_uid_range(&format!("{pad}{start}/{size}{pad}")).unwrap();
        let dash = kiln_identity::parse_uid_range(&format!("{start}-{end}")).unwrap();
        prop_assert_eq!(slash, dash);
        prop_assert_eq!((slash.start(), slash.size(), slash.end()), (start, size, end));
        let groups = kiln_identity::parse_supplemental_groups(&format!("{start}-{end},{pad}{slash}")).unwrap();
        prop_assert_eq!(groups, vec![slash, slash]);
    }
}
