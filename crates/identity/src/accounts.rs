//! Writing the sandbox user into /etc/passwd, /etc/group, /etc/gshadow and /etc/shadow.

use std::fmt;

use crate::etc::{check_file, entry_id, entry_name, lines};
use crate::{quote, IdBounds, IdentityError, SANDBOX_HOME, SANDBOX_USER};

const SHELLS: [&str; 2] = ["/bin/bash", "/bin/sh"];
const NO_LOGIN: &str = "/sbin/nologin";
const MAX_SHELL_LEN: usize = 4096;

/// Current contents of the image's account files; `None` for a file the image lacks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountFiles {
    pub passwd: Option<Vec<u8>>,
    pub group: Option<Vec<u8>>,
    pub gshadow: Option<Vec<u8>>,
    pub shadow: Option<Vec<u8>>,
}

/// New contents of all four files (each always written) and what looked wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EditedAccounts {
    pub passwd: Vec<u8>,
    pub group: Vec<u8>,
    pub gshadow: Vec<u8>,
    pub shadow: Vec<u8>,
    pub warnings: Vec<AccountWarning>,
}

/// Something in the image's account files that the edit tolerated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountWarning {
    /// Another user already has the sandbox uid; both now map to it.
    UidTaken { user: String, uid: u32 },
    /// Another group already has the sandbox gid.
    GidTaken { group: String, gid: u32 },
    /// A member (or gshadow administrator) of the sandbox group whose name holds
    /// whitespace or control bytes was left out; `member` is quoted and escaped.
    MemberDropped { member: String },
    /// The file held more than one `sandbox` entry; all but the first were removed.
    DuplicateSandboxEntries { file: &'static str, removed: usize },
}

impl fmt::Display for AccountWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UidTaken { user, uid } => {
                write!(f, "user {user} in /etc/passwd already has uid {uid}, the sandbox uid; it now shares it")
            }
            Self::GidTaken { group, gid } => {
                write!(f, "group {group} in /etc/group already has gid {gid}, the sandbox gid; it now shares it")
            }
            Self::MemberDropped { member } => write!(
                f,
                "dropped member {member} of the sandbox group: a user name holds no whitespace or control bytes"
            ),
            Self::DuplicateSandboxEntries { file, removed } => {
                write!(
                    f,
                    "{file} held {} sandbox entries; removed {removed} duplicate(s)",
                    removed + 1
                )
            }
        }
    }
}

/// The login shell for the sandbox user: the first of /bin/bash and /bin/sh that
/// `exists` in the image, else /sbin/nologin. `exists` must look inside the image.
pub fn choose_shell(exists: impl Fn(&str) -> bool) -> &'static str {
    SHELLS
        .into_iter()
        .find(|shell| exists(shell))
        .unwrap_or(NO_LOGIN)
}

/// Writes exactly one `sandbox` entry with `uid`/`gid`/`shell` into each account file.
///
/// An existing `sandbox` entry is rewritten in place (later duplicates removed), the
/// group keeps its members, gshadow and shadow entries are locked (`!`), absent files are
/// created, and every other line is kept byte for byte. Applying it to its own output
/// gives the same bytes. `uid` and `gid` must lie within `bounds`.
pub fn write_sandbox_accounts(
    files: &AccountFiles,
    uid: u32,
    gid: u32,
    shell: &str,
    bounds: IdBounds,
) -> Result<EditedAccounts, IdentityError> {
    check_id("uid", uid, bounds)?;
    check_id("gid", gid, bounds)?;
    check_shell(shell)?;
    let passwd = files.passwd.as_deref().unwrap_or_default();
    let group = files.group.as_deref().unwrap_or_default();
    let gshadow = files.gshadow.as_deref().unwrap_or_default();
    let shadow = files.shadow.as_deref().unwrap_or_default();
    check_file("/etc/passwd", passwd)?;
    check_file("/etc/group", group)?;
    check_file("/etc/gshadow", gshadow)?;
    check_file("/etc/shadow", shadow)?;

    let mut warnings = Vec::new();
    for (name, _) in other_entries_with_id(passwd, uid) {
        warnings.push(AccountWarning::UidTaken {
            user: display_name(name),
            uid,
        });
    }
    for (name, _) in other_entries_with_id(group, gid) {
        warnings.push(AccountWarning::GidTaken {
            group: display_name(name),
            gid,
        });
    }

    // Members from every existing sandbox group line, of group and gshadow alike, so the
    // two files agree and no membership is lost.
    let mut members: Vec<&[u8]> = Vec::new();
    for (bytes, index) in [(group, 3), (gshadow, 3)] {
        for fields in sandbox_entries(bytes) {
            let field = fields.get(index).copied().unwrap_or_default();
            for member in user_names(field, &mut warnings) {
                if !members.contains(&member) {
                    members.push(member);
                }
            }
        }
    }
    let members = members.join(&b","[..]);
    let gshadow_admins = match sandbox_entries(gshadow)
        .next()
        .and_then(|f| f.get(2).copied())
    {
        Some(field) => user_names(field, &mut warnings).join(&b","[..]),
        None => Vec::new(),
    };

    let passwd_entry =
        format!("{SANDBOX_USER}:x:{uid}:{gid}:{SANDBOX_USER}:{SANDBOX_HOME}:{shell}").into_bytes();
    let group_entry = [format!("{SANDBOX_USER}:x:{gid}:").as_bytes(), &members].concat();
    let gshadow_entry = [
        format!("{SANDBOX_USER}:!:").as_bytes(),
        &gshadow_admins,
        b":",
        &members,
    ]
    .concat();
    let shadow_entry = format!("{SANDBOX_USER}:!:::::::").into_bytes();

    Ok(EditedAccounts {
        passwd: replace_entry("/etc/passwd", passwd, &passwd_entry, &mut warnings),
        group: replace_entry("/etc/group", group, &group_entry, &mut warnings),
        gshadow: replace_entry("/etc/gshadow", gshadow, &gshadow_entry, &mut warnings),
        shadow: replace_entry("/etc/shadow", shadow, &shadow_entry, &mut warnings),
        warnings,
    })
}

/// The fields (terminator stripped) of every `sandbox` entry line in a file.
fn sandbox_entries(bytes: &[u8]) -> impl Iterator<Item = Vec<&[u8]>> {
    lines(bytes)
        .filter(|line| is_sandbox_line(line.content))
        .map(|line| line.content.split(|&b| b == b':').collect())
}

/// Entries other than `sandbox` whose third field (uid in passwd, gid in group) is `id`.
fn other_entries_with_id(bytes: &[u8], id: u32) -> impl Iterator<Item = (&[u8], u32)> {
    lines(bytes)
        .filter_map(|line| entry_id(line.content, 2))
        .filter(move |&(name, found)| found == id && name != SANDBOX_USER.as_bytes())
}

/// The names in a comma-separated member list. Names with whitespace or control bytes
/// are dropped with a warning: no tool creates them, and a trailing `\r` would not
/// survive a second edit.
fn user_names<'a>(field: &'a [u8], warnings: &mut Vec<AccountWarning>) -> Vec<&'a [u8]> {
    field
        .split(|&b| b == b',')
        .filter(|name| !name.is_empty())
        .filter(|name| {
            let plausible = name.iter().all(|&b| b > b' ' && b != 0x7f);
            if !plausible {
                warnings.push(AccountWarning::MemberDropped {
                    member: quote(name),
                });
            }
            plausible
        })
        .collect()
}

fn is_sandbox_line(content: &[u8]) -> bool {
    entry_name(content) == Some(SANDBOX_USER.as_bytes())
}

/// Puts `entry` where the first sandbox line was (or appends it), drops later sandbox
/// lines and copies every other line unchanged. Our entry always ends in `\n`.
fn replace_entry(
    file: &'static str,
    bytes: &[u8],
    entry: &[u8],
    warnings: &mut Vec<AccountWarning>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + entry.len() + 2);
    let mut written = false;
    let mut removed = 0;
    for line in lines(bytes) {
        if !is_sandbox_line(line.content) {
            out.extend_from_slice(line.raw);
        } else if written {
            removed += 1;
        } else {
            out.extend_from_slice(entry);
            out.push(b'\n');
            written = true;
        }
    }
    if !written {
        if !out.is_empty() && !out.ends_with(b"\n") {
            out.push(b'\n');
        }
        out.extend_from_slice(entry);
        out.push(b'\n');
    }
    if removed > 0 {
        warnings.push(AccountWarning::DuplicateSandboxEntries { file, removed });
    }
    out
}

fn check_id(what: &'static str, id: u32, bounds: IdBounds) -> Result<(), IdentityError> {
    if bounds.contains(id) {
        Ok(())
    } else {
        Err(IdentityError::OutOfRange {
            what,
            value: id,
            origin: "the account-file edit".to_owned(),
            bounds,
        })
    }
}

fn check_shell(shell: &str) -> Result<(), IdentityError> {
    let reason = if !shell.starts_with('/') {
        "it is not an absolute path"
    } else if shell.len() > MAX_SHELL_LEN {
        "it is too long"
    } else if shell.bytes().any(|b| matches!(b, b':' | b'\n' | b'\r' | 0)) {
        "it holds ':', a line break or NUL"
    } else {
        return Ok(());
    };
    Err(IdentityError::InvalidShell {
        shell: quote(shell.as_bytes()),
        reason: reason.to_owned(),
    })
}

fn display_name(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

#[cfg(test)]
mod tests;
