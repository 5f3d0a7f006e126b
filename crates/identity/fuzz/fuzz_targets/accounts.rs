//! The account-file edit on arbitrary files: never panics; the result holds exactly one
//! sandbox entry per file and a second application changes nothing.
#![no_main]

use kiln_identity::{write_sandbox_accounts, AccountFiles};
use libfuzzer_sys::fuzz_target;

type Input = (
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    u32,
    u32,
);

fn sandbox_lines(bytes: &[u8]) -> usize {
    bytes
        .split_inclusive(|&b| b == b'\n')
        .filter(|raw| {
            let content = raw.strip_suffix(b"\n").unwrap_or(raw);
            let content = content.strip_suffix(b"\r").unwrap_or(content);
            content.split(|&b| b == b':').next() == Some(b"sandbox")
        })
        .count()
}

fuzz_target!(|input: Input| {
    let (passwd, group, gshadow, shadow, uid, gid) = input;
    // Mostly in-bounds ids, so the edit itself gets exercised.
    let (uid, gid) = (1000 + uid % 3000, 1000 + gid % 3000);
    let files = AccountFiles {
        passwd,
        group,
        gshadow,
        shadow,
    };
    let Ok(once) = write_sandbox_accounts(&files, uid, gid, "/bin/sh", kiln_identity::IdBounds::KILN) else {
        return;
    };
    for out in [&once.passwd, &once.group, &once.gshadow, &once.shadow] {
        assert_eq!(sandbox_lines(out), 1, "{}", out.escape_ascii());
    }
    let again = AccountFiles {
        passwd: Some(once.passwd.clone()),
        group: Some(once.group.clone()),
        gshadow: Some(once.gshadow.clone()),
        shadow: Some(once.shadow.clone()),
    };
    // Outputs of inputs near the 1 MiB limit may pass it; that is the only allowed error.
    if let Ok(twice) = write_sandbox_accounts(&again, uid, gid, "/bin/sh", kiln_identity::IdBounds::KILN) {
        assert_eq!(
            (&twice.passwd, &twice.group, &twice.gshadow, &twice.shadow),
            (&once.passwd, &once.group, &once.gshadow, &once.shadow)
        );
    }
});
