//! Who the workload runs as: the identity checks and the session variables.
//!
//! Account files come from the sandbox root, read without following symlinks out of it
//! and parsed by kiln-identity; NSS is never used.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use kiln_identity::{
    lookup_uid, lookup_user, supplementary_gids, IdBounds, PasswdEntry, MAX_ACCOUNT_FILE_SIZE,
    SANDBOX_HOME, SANDBOX_USER,
};
use kiln_protocol::{Identity, RunAs};
use nix::errno::Errno;
use nix::fcntl::{open, openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;

use crate::{Privileges, SupervisorError};

/// Shell of a numeric identity that has no passwd entry.
pub const DEFAULT_SHELL: &str = "/bin/sh";

/// The account files of a sandbox root (empty when a file is absent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RootAccounts {
    pub passwd: Vec<u8>,
    pub group: Vec<u8>,
}

impl RootAccounts {
    /// Reads `etc/passwd` and `etc/group` of `root`, resolving every path inside the root
    /// (symlinks cannot lead out of it) and reading at most 1 MiB + 1 byte of each, so an
    /// oversized file reaches kiln-identity's size check instead of memory.
    pub fn read(root: &Path) -> Result<Self, SupervisorError> {
        let read_err = |path: PathBuf| {
            move |errno: Errno| SupervisorError::Read {
                path,
                source: errno.into(),
            }
        };
        let root_fd = open(
            root,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(read_err(root.to_owned()))?;
        let read_file = |name: &str| -> Result<Vec<u8>, SupervisorError> {
            let path = root.join(name);
            // O_NONBLOCK: a FIFO planted at this path must not hang the boot.
            let how = OpenHow::new()
                .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK | OFlag::O_NOCTTY)
                .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
            let fd = match openat2(root_fd.as_fd(), name, how) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => return Ok(Vec::new()),
                Err(errno) => return Err(read_err(path)(errno)),
            };
            let file = File::from(fd);
            let meta = file.metadata().map_err(|source| SupervisorError::Read {
                path: path.clone(),
                source,
            })?;
            if !meta.is_file() {
                return Err(SupervisorError::Read {
                    path,
                    source: std::io::Error::other("it is not a regular file"),
                });
            }
            let mut bytes = Vec::new();
            file.take(MAX_ACCOUNT_FILE_SIZE as u64 + 1)
                .read_to_end(&mut bytes)
                .map_err(|source| SupervisorError::Read { path, source })?;
            Ok(bytes)
        };
        Ok(Self {
            passwd: read_file("etc/passwd")?,
            group: read_file("etc/group")?,
        })
    }
}

/// A checked identity: the ids to drop to and the passwd entry, if the root has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxUser {
    pub privileges: Privileges,
    pub entry: Option<PasswdEntry>,
}

/// Checks the identity a workload asks for.
///
/// uid and gid must lie in `bounds` (the rules of whoever chose them: kiln's own, or
/// OpenShell's for ids an OpenShell gateway configures).
///
/// - `run_as: uid`: no
///   passwd entry is needed, and the process gets no supplementary groups (an entry with
///   that uid, if any, only names the session).
/// - `run_as: sandbox`: the root's /etc/passwd must have a `sandbox` entry whose uid and
///   gid are the identity's; its supplementary groups are the /etc/group entries listing
///   `sandbox` as a member, and group 0 among them is refused.
pub fn validate_sandbox_user(
    identity: &Identity,
    accounts: &RootAccounts,
    bounds: IdBounds,
) -> Result<SandboxUser, SupervisorError> {
    check_bounds("uid", identity.uid, bounds)?;
    check_bounds("gid", identity.gid, bounds)?;
    let privileges = |groups| Privileges {
        uid: identity.uid,
        gid: identity.gid,
        groups,
    };
    match identity.run_as {
        RunAs::Uid => Ok(SandboxUser {
            privileges: privileges(Vec::new()),
            // Only for naming the session: an unreadable passwd does not matter here.
            entry: lookup_uid(&accounts.passwd, identity.uid).ok().flatten(),
        }),
        RunAs::Sandbox => {
            let entry = lookup_user(&accounts.passwd, SANDBOX_USER)?
                .ok_or(SupervisorError::NoSandboxUser)?;
            if (entry.uid, entry.gid) != (identity.uid, identity.gid) {
                return Err(SupervisorError::SandboxIdsMismatch {
                    passwd: (entry.uid, entry.gid),
                    asked: (identity.uid, identity.gid),
                });
            }
            let groups = supplementary_gids(&accounts.group, SANDBOX_USER)?;
            if groups.contains(&0) {
                return Err(SupervisorError::RootGroupMember);
            }
            Ok(SandboxUser {
                privileges: privileges(groups),
                entry: Some(entry),
            })
        }
    }
}

fn check_bounds(what: &'static str, value: u32, bounds: IdBounds) -> Result<(), SupervisorError> {
    if bounds.contains(value) {
        Ok(())
    } else {
        Err(SupervisorError::IdOutOfRange {
            what,
            value,
            bounds,
        })
    }
}

/// The login variables of a workload session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// USER and LOGNAME.
    pub user: String,
    pub home: String,
    pub shell: String,
}

impl Session {
    /// `USER`, `LOGNAME`, `HOME` and `SHELL` as `KEY=VALUE` entries.
    pub fn env(&self) -> [String; 4] {
        [
            format!("USER={}", self.user),
            format!("LOGNAME={}", self.user),
            format!("HOME={}", self.home),
            format!("SHELL={}", self.shell),
        ]
    }
}

/// USER, LOGNAME, HOME and SHELL for `user`: from its passwd entry, or for a numeric uid
/// without one `USER=<uid>`, `HOME=/sandbox`, `SHELL=/bin/sh`. An empty home or shell field
/// falls back the same way (as login does for an empty shell).
pub fn session_user_and_home(user: &SandboxUser) -> Session {
    let fallback = |value: &str, default: &str| {
        if value.is_empty() {
            default.to_owned()
        } else {
            value.to_owned()
        }
    };
    match &user.entry {
        Some(entry) => Session {
            user: entry.name.clone(),
            home: fallback(&entry.home, SANDBOX_HOME),
            shell: fallback(&entry.shell, DEFAULT_SHELL),
        },
        None => Session {
            user: user.privileges.uid.to_string(),
            home: SANDBOX_HOME.to_owned(),
            shell: DEFAULT_SHELL.to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &[u8] = b"root:x:0:0:root:/root:/bin/bash\n\
        app:x:20000:20000:App:/home/app:/bin/zsh\n\
        sandbox:x:10001:10001:sandbox:/sandbox:/bin/bash\n";
    const GROUP: &[u8] =
        b"root:x:0:\nsandbox:x:10001:\nusers:x:100:bob,sandbox\ndev:x:3000:sandbox\n";

    fn accounts(passwd: &[u8], group: &[u8]) -> RootAccounts {
        RootAccounts {
            passwd: passwd.to_vec(),
            group: group.to_vec(),
        }
    }

    fn identity(run_as: RunAs, uid: u32, gid: u32) -> Identity {
        Identity { run_as, uid, gid }
    }

    #[test]
    fn numeric_ids_need_no_passwd_entry_and_get_no_groups() {
        let user = validate_sandbox_user(
            &identity(RunAs::Uid, 4242, 4343),
            &RootAccounts::default(),
            IdBounds::KILN,
        )
        .unwrap();
        assert_eq!(
            user.privileges,
            Privileges {
                uid: 4242,
                gid: 4343,
                groups: vec![]
            }
        );
        assert_eq!(
            session_user_and_home(&user),
            Session {
                user: "4242".into(),
                home: "/sandbox".into(),
                shell: "/bin/sh".into()
            }
        );
        let env = session_user_and_home(&user).env();
        assert_eq!(
            env,
            [
                "USER=4242",
                "LOGNAME=4242",
                "HOME=/sandbox",
                "SHELL=/bin/sh"
            ]
        );
        // Hostile passwd bytes do not stop a numeric identity.
        let bad = accounts(b"x\0", b"\0");
        assert!(
            validate_sandbox_user(&identity(RunAs::Uid, 4242, 4242), &bad, IdBounds::KILN).is_ok()
        );
    }

    #[test]
    fn numeric_id_with_an_entry_uses_its_name_home_and_shell() {
        let user = validate_sandbox_user(
            &identity(RunAs::Uid, 20000, 20000),
            &accounts(PASSWD, GROUP),
            IdBounds::KILN,
        )
        .unwrap();
        assert!(
            user.privileges.groups.is_empty(),
            "numeric identities never get groups"
        );
        assert_eq!(
            session_user_and_home(&user),
            Session {
                user: "app".into(),
                home: "/home/app".into(),
                shell: "/bin/zsh".into()
            }
        );
    }

    #[test]
    fn sandbox_needs_its_entry_with_the_same_ids() {
        let user = validate_sandbox_user(
            &identity(RunAs::Sandbox, 10001, 10001),
            &accounts(PASSWD, GROUP),
            IdBounds::KILN,
        )
        .unwrap();
        assert_eq!(user.privileges.groups, [100, 3000]);
        let session = session_user_and_home(&user);
        assert_eq!(
            (
                session.user.as_str(),
                session.home.as_str(),
                session.shell.as_str()
            ),
            ("sandbox", "/sandbox", "/bin/bash")
        );

        let missing = validate_sandbox_user(
            &identity(RunAs::Sandbox, 10001, 10001),
            &accounts(b"root:x:0:0::/:/bin/sh\n", b""),
            IdBounds::KILN,
        );
        assert!(
            matches!(missing, Err(SupervisorError::NoSandboxUser)),
            "{missing:?}"
        );
        let other_ids = validate_sandbox_user(
            &identity(RunAs::Sandbox, 10002, 10001),
            &accounts(PASSWD, GROUP),
            IdBounds::KILN,
        );
        assert!(
            matches!(other_ids, Err(SupervisorError::SandboxIdsMismatch { .. })),
            "{other_ids:?}"
        );
        let root_group = validate_sandbox_user(
            &identity(RunAs::Sandbox, 10001, 10001),
            &accounts(PASSWD, b"root:x:0:sandbox\n"),
            IdBounds::KILN,
        );
        assert!(
            matches!(root_group, Err(SupervisorError::RootGroupMember)),
            "{root_group:?}"
        );
        let nul = validate_sandbox_user(
            &identity(RunAs::Sandbox, 10001, 10001),
            &accounts(b"sandbox\0", b""),
            IdBounds::KILN,
        );
        assert!(matches!(nul, Err(SupervisorError::Accounts(_))), "{nul:?}");
    }

    #[test]
    fn ids_outside_the_sandbox_bounds_are_refused() {
        for (uid, gid) in [
            (0, 10001),
            (10001, 0),
            (999, 1000),
            (1000, 2_000_000_001),
            (u32::MAX, 1000),
        ] {
            for run_as in [RunAs::Uid, RunAs::Sandbox] {
                let err = validate_sandbox_user(
                    &identity(run_as, uid, gid),
                    &accounts(PASSWD, GROUP),
                    IdBounds::KILN,
                )
                .unwrap_err();
                assert!(
                    matches!(err, SupervisorError::IdOutOfRange { .. }),
                    "{uid}:{gid} {err}"
                );
                assert!(err.to_string().contains("1000..=2000000000"), "{err}");
            }
        }
        // OpenShell's bounds take low and high ids but still refuse root and u32::MAX.
        let low = identity(RunAs::Uid, 500, 500);
        assert!(validate_sandbox_user(&low, &accounts(PASSWD, GROUP), IdBounds::OPENSHELL).is_ok());
        for (uid, gid) in [(0, 500), (500, u32::MAX)] {
            let err = validate_sandbox_user(
                &identity(RunAs::Uid, uid, gid),
                &accounts(PASSWD, GROUP),
                IdBounds::OPENSHELL,
            )
            .unwrap_err();
            assert!(err.to_string().contains("1..=4294967294"), "{err}");
        }
    }

    #[test]
    fn empty_home_and_shell_fall_back() {
        let user = validate_sandbox_user(
            &identity(RunAs::Uid, 5000, 5000),
            &accounts(b"five:x:5000:5000:::\n", b""),
            IdBounds::KILN,
        )
        .unwrap();
        assert_eq!(
            session_user_and_home(&user),
            Session {
                user: "five".into(),
                home: "/sandbox".into(),
                shell: "/bin/sh".into()
            }
        );
    }

    #[test]
    fn account_files_are_read_inside_the_root() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("passwd"), "evil:x:0:0::/:/bin/sh\n").unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        // An absolute symlink resolves against the sandbox root, not the host's /.
        std::os::unix::fs::symlink(
            outside.path().join("passwd"),
            root.path().join("etc/passwd"),
        )
        .unwrap();
        std::fs::write(root.path().join("etc/group"), GROUP).unwrap();
        let read = RootAccounts::read(root.path()).unwrap();
        assert_eq!(
            read.passwd, b"",
            "the link's target does not exist inside the root"
        );
        assert_eq!(read.group, GROUP);

        std::fs::remove_file(root.path().join("etc/passwd")).unwrap();
        std::fs::write(
            root.path().join("etc/passwd"),
            vec![b'#'; MAX_ACCOUNT_FILE_SIZE * 2],
        )
        .unwrap();
        let read = RootAccounts::read(root.path()).unwrap();
        assert_eq!(
            read.passwd.len(),
            MAX_ACCOUNT_FILE_SIZE + 1,
            "reads are bounded"
        );
        let err = validate_sandbox_user(
            &identity(RunAs::Sandbox, 10001, 10001),
            &read,
            IdBounds::KILN,
        )
        .unwrap_err();
        assert!(err.to_string().contains("at most 1 MiB"), "{err}");

        std::fs::remove_file(root.path().join("etc/passwd")).unwrap();
        nix::unistd::mkfifo(&root.path().join("etc/passwd"), Mode::S_IRWXU).unwrap();
        let err = RootAccounts::read(root.path()).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }
}
