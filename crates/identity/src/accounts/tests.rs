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
    write_sandbox_accounts(f, 10001, 10001, "/bin/sh", crate::IdBounds::KILN).unwrap()
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

#[test]
fn existing_sandbox_entries_are_rewritten_in_place() {
    let passwd = b"root:x:0:0:root:/root:/bin/bash\nsandbox:x:1500:1500:old:/home/sandbox:/bin/false\nbin:x:1:1::/bin:/usr/sbin/nologin\n";
    let group = b"root:x:0:\nsandbox:x:1500:alice,bob\nusers:x:100:\n";
    let gshadow = b"root:*::\nsandbox::admin:carol\nusers:*::\n";
    let shadow = b"root:*:19000:0:99999:7:::\nsandbox:$6$salt$hash:19000:0:99999:7:::\n";
    let e = edit(&files(
        Some(passwd),
        Some(group),
        Some(gshadow),
        Some(shadow),
    ));
    assert_eq!(
        e.passwd,
        b"root:x:0:0:root:/root:/bin/bash\nsandbox:x:10001:10001:sandbox:/sandbox:/bin/sh\nbin:x:1:1::/bin:/usr/sbin/nologin\n"
    );
    assert_eq!(
        e.group,
        b"root:x:0:\nsandbox:x:10001:alice,bob,carol\nusers:x:100:\n"
    );
    assert_eq!(
        e.gshadow,
        b"root:*::\nsandbox:!:admin:alice,bob,carol\nusers:*::\n"
    );
    assert_eq!(e.shadow, b"root:*:19000:0:99999:7:::\nsandbox:!:::::::\n");
    assert!(e.warnings.is_empty(), "{:?}", e.warnings);
}

#[test]
fn duplicate_sandbox_entries_collapse_into_the_first() {
    let passwd =
        b"sandbox:x:1:1::/:/bin/sh\nroot:x:0:0::/root:/bin/sh\nsandbox:x:2:2::/:/bin/sh\nsandbox\n";
    let group = b"sandbox:x:1:a\nsandbox:x:2:b,a\n";
    let e = edit(&files(Some(passwd), Some(group), None, None));
    assert_eq!(
        e.passwd,
        b"sandbox:x:10001:10001:sandbox:/sandbox:/bin/sh\nroot:x:0:0::/root:/bin/sh\n"
    );
    assert_eq!(e.group, b"sandbox:x:10001:a,b\n");
    assert_eq!(e.gshadow, b"sandbox:!::a,b\n");
    assert_eq!(
        e.warnings,
        [
            AccountWarning::DuplicateSandboxEntries {
                file: "/etc/passwd",
                removed: 2
            },
            AccountWarning::DuplicateSandboxEntries {
                file: "/etc/group",
                removed: 1
            },
        ]
    );
    assert_eq!(
        e.warnings[0].to_string(),
        "/etc/passwd held 3 sandbox entries; removed 2 duplicate(s)"
    );
}

#[test]
fn other_lines_are_kept_byte_for_byte() {
    let passwd: &[u8] = b"# managed by hand\r\n\nroot:x:0:0:root:/root:/bin/bash\r\n+sandbox::::::\n-sandbox\n+@netgroup\n+\n  sandbox:x:1:1::/:/bin/sh\n#sandbox:x:1:1::/:/bin/sh\nsandbox2:x:1:1::/:/bin/sh\n\xff\xfe:x:7:7::/:/bin/sh\n";
    let e = edit(&files(
        Some(passwd),
        Some(passwd),
        Some(passwd),
        Some(passwd),
    ));
    for out in [&e.passwd, &e.group, &e.gshadow, &e.shadow] {
        assert!(out.starts_with(passwd), "{}", out.escape_ascii());
        assert_eq!(lines(&out[passwd.len()..]).count(), 1);
    }
    // Same in the middle: the lines before and after an in-place entry are untouched.
    let with_entry = [passwd, b"sandbox:x:1:1::/:/bin/sh\r\n", passwd].concat();
    let e = edit(&files(Some(&with_entry), None, None, None));
    let entry: &[u8] = b"sandbox:x:10001:10001:sandbox:/sandbox:/bin/sh\n";
    assert_eq!(e.passwd, [passwd, entry, passwd].concat());
}

#[test]
fn newline_is_inserted_before_an_appended_entry() {
    let e = edit(&files(
        Some(b"root:x:0:0::/root:/bin/sh"),
        Some(b"root:x:0:"),
        Some(b"root:*::\r"),
        Some(b"#"),
    ));
    assert_eq!(
        e.passwd,
        b"root:x:0:0::/root:/bin/sh\nsandbox:x:10001:10001:sandbox:/sandbox:/bin/sh\n"
    );
    assert_eq!(e.group, b"root:x:0:\nsandbox:x:10001:\n");
    assert_eq!(e.gshadow, b"root:*::\r\nsandbox:!::\n");
    assert_eq!(e.shadow, b"#\nsandbox:!:::::::\n");
    // A last line without newline that stays last keeps lacking it.
    let e = edit(&files(
        Some(b"sandbox:x:1:1::/:/bin/sh\nroot:x:0:0::/root:/bin/sh"),
        None,
        None,
        None,
    ));
    assert_eq!(
        e.passwd,
        b"sandbox:x:10001:10001:sandbox:/sandbox:/bin/sh\nroot:x:0:0::/root:/bin/sh"
    );
    // An entry on the unterminated last line gets a newline of its own.
    let e = edit(&files(
        Some(b"root:x:0:0::/root:/bin/sh\r\nsandbox:x:1:1::/:/bin/sh"),
        None,
        None,
        None,
    ));
    assert_eq!(
        e.passwd,
        b"root:x:0:0::/root:/bin/sh\r\nsandbox:x:10001:10001:sandbox:/sandbox:/bin/sh\n"
    );
}

#[test]
fn empty_files_get_just_the_entry() {
    let e = edit(&files(Some(b""), Some(b""), Some(b""), Some(b"")));
    assert_eq!(e, edit(&AccountFiles::default()));
}

#[test]
fn id_collisions_warn_naming_the_owner_and_still_write() {
    let passwd = b"app:x:10001:10001::/app:/bin/sh\nsandbox:x:10001:1::/:/bin/sh\n+nis:x:10001:1::/:/bin/sh\nother:x:10001:0::/:/bin/sh\n";
    let group = b"appgroup:x:10001:\n#c:x:10001:\n";
    let e = edit(&files(Some(passwd), Some(group), None, None));
    assert_eq!(
        e.warnings,
        [
            AccountWarning::UidTaken {
                user: "app".into(),
                uid: 10001
            },
            AccountWarning::UidTaken {
                user: "other".into(),
                uid: 10001
            },
            AccountWarning::GidTaken {
                group: "appgroup".into(),
                gid: 10001
            },
        ]
    );
    assert_eq!(
        e.warnings[0].to_string(),
        "user app in /etc/passwd already has uid 10001, the sandbox uid; it now shares it"
    );
    assert_eq!(
        e.warnings[2].to_string(),
        "group appgroup in /etc/group already has gid 10001, the sandbox gid; it now shares it"
    );
    assert!(e.passwd.windows(12).any(|w| w == b"sandbox:x:10"));
    assert!(e.group.ends_with(b"sandbox:x:10001:\n"));
}

#[test]
fn oversized_or_nul_files_are_errors_naming_the_file() {
    let big = vec![b'#'; crate::MAX_ACCOUNT_FILE_SIZE + 1];
    let names = ["/etc/passwd", "/etc/group", "/etc/gshadow", "/etc/shadow"];
    for (index, name) in names.into_iter().enumerate() {
        for (bad, reason) in [
            (&big[..], "bytes; accepted: at most 1 MiB"),
            (b"a\0b", "NUL byte at offset 1"),
        ] {
            let mut parts = [None; 4];
            parts[index] = Some(bad);
            let err = write_sandbox_accounts(
                &files(parts[0], parts[1], parts[2], parts[3]),
                10001,
                10001,
                "/bin/sh",
                crate::IdBounds::KILN,
            )
            .unwrap_err()
            .to_string();
            assert!(err.starts_with(&format!("{name}: ")), "{err}");
            assert!(err.contains(reason), "{err}");
        }
    }
    let exactly_limit = vec![b'#'; crate::MAX_ACCOUNT_FILE_SIZE];
    assert!(write_sandbox_accounts(
        &files(Some(&exactly_limit), None, None, None),
        10001,
        10001,
        "/bin/sh",
        crate::IdBounds::KILN
    )
    .is_ok());
}

#[test]
fn bad_ids_and_shells_are_errors() {
    let none = AccountFiles::default();
    let err = write_sandbox_accounts(&none, 0, 10001, "/bin/sh", crate::IdBounds::KILN)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("uid 0 from the account-file edit is outside the sandbox range"),
        "{err}"
    );
    let err = write_sandbox_accounts(
        &none,
        10001,
        2_000_000_001,
        "/bin/sh",
        crate::IdBounds::KILN,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("gid 2000000001 from the account-file edit"),
        "{err}"
    );
    for (shell, reason) in [
        ("", "it is not an absolute path"),
        ("bin/sh", "it is not an absolute path"),
        ("/bin/sh:x", "it holds ':', a line break or NUL"),
        (
            "/bin/sh\nroot::0:0::/:/bin/sh",
            "it holds ':', a line break or NUL",
        ),
        ("/bin/sh\r", "it holds ':', a line break or NUL"),
    ] {
        let err =
            write_sandbox_accounts(&none, 10001, 10001, shell, crate::IdBounds::KILN).unwrap_err();
        assert_eq!(
            err,
            IdentityError::InvalidShell {
                shell: quote(shell.as_bytes()),
                reason: reason.to_owned()
            }
        );
        assert!(
            err.to_string().contains("accepted: an absolute path"),
            "{err}"
        );
    }
    let long = format!("/{}", "a".repeat(MAX_SHELL_LEN));
    assert!(write_sandbox_accounts(&none, 10001, 10001, &long, crate::IdBounds::KILN).is_err());
}

#[test]
fn ids_and_shell_are_the_callers() {
    let e = write_sandbox_accounts(
        &AccountFiles::default(),
        1000,
        2_000_000_000,
        "/sbin/nologin",
        crate::IdBounds::KILN,
    )
    .unwrap();
    assert_eq!(
        e.passwd,
        b"sandbox:x:1000:2000000000:sandbox:/sandbox:/sbin/nologin\n"
    );
    assert_eq!(e.group, b"sandbox:x:2000000000:\n");
}

#[test]
fn shell_choice_prefers_bash_then_sh_then_nologin() {
    assert_eq!(choose_shell(|_| true), "/bin/bash");
    assert_eq!(choose_shell(|p| p == "/bin/sh"), "/bin/sh");
    assert_eq!(choose_shell(|p| p == "/bin/bash"), "/bin/bash");
    assert_eq!(choose_shell(|p| p == "/usr/bin/zsh"), "/sbin/nologin");
}

#[test]
fn result_parses_back_with_the_crate_parsers() {
    let e = edit(&files(
        Some(b"root:x:0:0::/root:/bin/sh\n"),
        Some(b"sandbox:x:1:alice\n"),
        None,
        None,
    ));
    let user = crate::lookup_user(&e.passwd, "sandbox").unwrap().unwrap();
    assert_eq!(
        (user.uid, user.gid, user.home.as_str(), user.shell.as_str()),
        (10001, 10001, "/sandbox", "/bin/sh")
    );
    assert_eq!(
        crate::supplementary_gids(&e.group, "alice").unwrap(),
        [10001]
    );
}

#[test]
fn carriage_return_at_end_of_file_ends_the_line() {
    let f = files(
        Some(b"sandbox:x:1:1::/:/bin/sh\r"),
        Some(b"root:x:0:\nsandbox:x:1:a\r"),
        None,
        Some(b"root:*::\r"),
    );
    let once = edit(&f);
    assert_eq!(
        once.passwd,
        b"sandbox:x:10001:10001:sandbox:/sandbox:/bin/sh\n"
    );
    assert_eq!(once.group, b"root:x:0:\nsandbox:x:10001:a\n");
    assert_eq!(once.shadow, b"root:*::\r\nsandbox:!:::::::\n");
    assert_eq!(edit(&again(&once)), once);
}

#[test]
fn members_with_whitespace_or_control_bytes_are_dropped_with_a_warning() {
    let group = b"sandbox:x:1:alice,b ob,carol\r\r\n";
    let gshadow = b"sandbox:!:adm\x1bin,root:dave,\xc3\xa9ve\n";
    let e = edit(&files(None, Some(group), Some(gshadow), None));
    assert_eq!(e.group, "sandbox:x:10001:alice,dave,\u{e9}ve\n".as_bytes());
    assert_eq!(e.gshadow, "sandbox:!:root:alice,dave,\u{e9}ve\n".as_bytes());
    let dropped: Vec<String> = e.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        dropped,
        [
            "dropped member \"b ob\" of the sandbox group: a user name holds no whitespace or control bytes",
            "dropped member \"carol\\r\" of the sandbox group: a user name holds no whitespace or control bytes",
            "dropped member \"adm\\x1bin\" of the sandbox group: a user name holds no whitespace or control bytes",
        ]
    );
    assert_eq!(edit(&again(&e)).group, e.group);
}

#[test]
fn ids_are_checked_against_the_bounds_given() {
    let none = AccountFiles::default();
    let e =
        write_sandbox_accounts(&none, 500, u32::MAX - 1, "/bin/sh", IdBounds::OPENSHELL).unwrap();
    assert_eq!(
        e.passwd,
        b"sandbox:x:500:4294967294:sandbox:/sandbox:/bin/sh\n"
    );
    let err = write_sandbox_accounts(&none, 500, 10001, "/bin/sh", IdBounds::KILN)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "uid 500 from the account-file edit is outside the sandbox range 1000..=2000000000"
    );
    for refused in [0, u32::MAX] {
        let err = write_sandbox_accounts(&none, 10001, refused, "/bin/sh", IdBounds::OPENSHELL)
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with("outside the sandbox range 1..=4294967294"),
            "{err}"
        );
    }
}
