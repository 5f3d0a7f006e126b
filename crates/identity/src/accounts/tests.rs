use super::*;

fn files(
    passwd: Option<&[u8]>,
    group: Option<&[u8]>,
    gshadow: Option<&[u8]>,
    shadow: Option<&[u8]>,
) -> AccountFiles {
    AccountFiles {
        passwd: passwd.map(<[u8]>::to_vec),
        group: group.map(<[u8]>::to_vec),
        gshadow: gshadow.map(<[u8]>::to_vec),
        shadow: shadow.map(<[u8]>::to_vec),
    }
}

fn edit(f: &AccountFiles) -> EditedAccounts {
    write_sandbox_accounts(f, 10001, 10001, "/bin/sh").unwrap()
}

fn again(e: &EditedAccounts) -> AccountFiles {
    files(
        Some(&e.passwd),
        Some(&e.group),
        Some(&e.gshadow),
        Some(&e.shadow),
    )
}

#[test]
fn absent_files_are_created() {
    let e = edit(&AccountFiles::default());
    assert_eq!(
        e.passwd,
        b"sandbox:x:10001:10001:sandbox:/sandbox:/bin/sh\n"
    );
    assert_eq!(e.group, b"sandbox:x:10001:\n");
    assert_eq!(e.gshadow, b"sandbox:!::\n");
    assert_eq!(e.shadow, b"sandbox:!:::::::\n");
    assert!(e.warnings.is_empty());
}

#[test]
fn second_application_changes_nothing() {
    let f = files(
        Some(b"root:x:0:0::/root:/bin/sh"),
        Some(b"sandbox:x:5:a,b\r\n"),
        None,
        Some(b""),
    );
    let once = edit(&f);
    assert_eq!(edit(&again(&once)), once);
}
