//! `kiln check`'s findings on generated images.

mod support;

use kiln_rootfs::{check_image, CheckInput, Severity};
use support::{apply, LayerBuilder};

fn input(entrypoint: &[&str]) -> CheckInput {
    CheckInput {
        entrypoint: entrypoint.iter().map(|s| s.to_string()).collect(),
        env: vec!["PATH=/usr/local/bin:/bin".into()],
        uid: 10001,
        gid: 10001,
        ..CheckInput::default()
    }
}

fn image() -> kiln_rootfs::RootTree {
    let layer = LayerBuilder::new()
        .file_owned("opt/app/server", 0o755, 0, 0, b"\x7fELF")
        .file_owned("opt/app/data.txt", 0o644, 0, 0, b"data")
        .symlink("usr/local/bin/server", "/opt/app/server")
        .file_owned("bin/su", 0o4755, 0, 0, b"su")
        .file(
            "etc/passwd",
            b"root:x:0:0::/root:/bin/sh\nsandbox:x:2000:2000::/home/sandbox:/bin/sh\nother:x:10001:10001::/:/bin/sh\n",
        )
        .tar();
    apply(&[layer], &kiln_rootfs::Limits::default()).unwrap()
}

#[test]
fn command_found_through_path_and_symlinks() {
    let report = check_image(&image(), &input(&["server", "--port", "80"])).unwrap();
    assert!(report.can_run, "{:?}", report.findings);
    assert_eq!(report.command.as_deref(), Some("/usr/local/bin/server"));
    assert_eq!(report.shell, None);
    assert_eq!(report.setid_files, vec!["/bin/su".to_string()]);
    assert_eq!(report.files, 4);
    let messages: Vec<&str> = report.findings.iter().map(|f| f.message.as_str()).collect();
    assert!(
        messages
            .iter()
            .any(|m| m.contains("sandbox user (2000:2000)")),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("user other already has uid 10001")),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m.contains("/etc/group is missing")),
        "{messages:?}"
    );
}

#[test]
fn missing_or_non_executable_commands_block() {
    for (argv, wanted) in [
        (&[][..], "neither Entrypoint nor Cmd"),
        (&["nope"][..], "is not in the image"),
        (&["/opt/app/data.txt"][..], "has no execute bit"),
        (&["app/server"][..], "is not in the image"),
    ] {
        let report = check_image(&image(), &input(argv)).unwrap();
        assert!(!report.can_run, "{argv:?}");
        let blocker = report
            .findings
            .iter()
            .find(|f| f.severity == Severity::Blocker)
            .unwrap();
        assert!(
            blocker.message.contains(wanted),
            "{argv:?}: {}",
            blocker.message
        );
    }
    let mut relative = input(&["app/server"]);
    relative.working_dir = Some("/opt".into());
    assert!(check_image(&image(), &relative).unwrap().can_run);
}
