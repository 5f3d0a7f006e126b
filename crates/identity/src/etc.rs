//! Reading /etc/passwd and /etc/group bytes without NSS, tolerant of what images hold.
//!
//! Only well-formed local entries are returned: comments, blank lines, NIS `+`/`-` lines
//! and malformed or non-UTF-8 lines are skipped (glibc skips them too). The first entry
//! with a name wins, as with glibc's files backend.

use crate::{IdentityError, MAX_ACCOUNT_FILE_SIZE};

/// One /etc/passwd entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub gecos: String,
    pub home: String,
    pub shell: String,
}

/// One /etc/group entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

/// Parses /etc/passwd contents. Errors only for input over 1 MiB or with NUL bytes.
pub fn parse_passwd(bytes: &[u8]) -> Result<Vec<PasswdEntry>, IdentityError> {
    check_file("/etc/passwd", bytes)?;
    Ok(lines(bytes)
        .filter_map(|line| passwd_entry(line.content))
        .collect())
}

/// Parses /etc/group contents. Errors only for input over 1 MiB or with NUL bytes.
pub fn parse_group(bytes: &[u8]) -> Result<Vec<GroupEntry>, IdentityError> {
    check_file("/etc/group", bytes)?;
    Ok(lines(bytes)
        .filter_map(|line| group_entry(line.content))
        .collect())
}

/// The first passwd entry named `name`.
pub fn lookup_user(passwd: &[u8], name: &str) -> Result<Option<PasswdEntry>, IdentityError> {
    Ok(parse_passwd(passwd)?.into_iter().find(|e| e.name == name))
}

/// The first passwd entry with `uid`.
pub fn lookup_uid(passwd: &[u8], uid: u32) -> Result<Option<PasswdEntry>, IdentityError> {
    Ok(parse_passwd(passwd)?.into_iter().find(|e| e.uid == uid))
}

/// The gids of every group listing `user` as a member, in file order without duplicates
/// (what `initgroups` adds to the primary gid).
pub fn supplementary_gids(group: &[u8], user: &str) -> Result<Vec<u32>, IdentityError> {
    let mut gids = Vec::new();
    for entry in parse_group(group)? {
        if entry.members.iter().any(|m| m == user) && !gids.contains(&entry.gid) {
            gids.push(entry.gid);
        }
    }
    Ok(gids)
}

fn passwd_entry(content: &[u8]) -> Option<PasswdEntry> {
    let fields = utf8_fields(content)?;
    let [name, _password, uid, gid, gecos, home, shell] = fields.as_slice() else {
        return None;
    };
    Some(PasswdEntry {
        name: name.to_string(),
        uid: parse_id(uid)?,
        gid: parse_id(gid)?,
        gecos: gecos.to_string(),
        home: home.to_string(),
        shell: shell.to_string(),
    })
}

fn group_entry(content: &[u8]) -> Option<GroupEntry> {
    let fields = utf8_fields(content)?;
    let [name, _password, gid, members] = fields.as_slice() else {
        return None;
    };
    Some(GroupEntry {
        name: name.to_string(),
        gid: parse_id(gid)?,
        members: members
            .split(',')
            .filter(|m| !m.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

/// The `:`-separated fields of a local entry line; `None` for comments, blank lines,
/// NIS lines and non-UTF-8 lines.
fn utf8_fields(content: &[u8]) -> Option<Vec<&str>> {
    entry_name(content)?;
    let text = std::str::from_utf8(content).ok()?;
    Some(text.split(':').collect())
}

fn parse_id(field: &str) -> Option<u32> {
    if field.is_empty() || !field.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    field.parse().ok()
}

/// One line of an account file.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Line<'a> {
    /// The line without its `\n`, `\r\n` or (at the end of the file) `\r` terminator.
    pub content: &'a [u8],
    /// The line exactly as in the file, terminator included.
    pub raw: &'a [u8],
}

pub(crate) fn lines(bytes: &[u8]) -> impl Iterator<Item = Line<'_>> {
    // A `\r` before the end of the file ends the line like `\r\n` does, so an edited
    // file reads back the same whether or not its last line was terminated.
    bytes.split_inclusive(|&b| b == b'\n').map(|raw| {
        let content = raw.strip_suffix(b"\n").unwrap_or(raw);
        Line {
            content: content.strip_suffix(b"\r").unwrap_or(content),
            raw,
        }
    })
}

/// The name field of a local entry line; `None` for blank lines, comments and NIS
/// `+`/`-` lines, which are not entries of their own.
pub(crate) fn entry_name(content: &[u8]) -> Option<&[u8]> {
    let name = content.split(|&b| b == b':').next()?;
    match name.first() {
        None | Some(b'#' | b'+' | b'-') => None,
        Some(_) => Some(name),
    }
}

/// The numeric field `index` of a local entry line, with the entry's name.
pub(crate) fn entry_id(content: &[u8], index: usize) -> Option<(&[u8], u32)> {
    let name = entry_name(content)?;
    let field = content.split(|&b| b == b':').nth(index)?;
    Some((name, parse_id(std::str::from_utf8(field).ok()?)?))
}

pub(crate) fn check_file(file: &'static str, bytes: &[u8]) -> Result<(), IdentityError> {
    if bytes.len() > MAX_ACCOUNT_FILE_SIZE {
        return Err(IdentityError::AccountFile {
            file,
            reason: format!(
                "it is {} bytes; accepted: at most 1 MiB ({MAX_ACCOUNT_FILE_SIZE} bytes)",
                bytes.len()
            ),
        });
    }
    if let Some(offset) = bytes.iter().position(|&b| b == 0) {
        return Err(IdentityError::AccountFile {
            file,
            reason: format!(
                "it holds a NUL byte at offset {offset}; accepted: text without NUL bytes"
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &[u8] = b"# comment\n\
        root:x:0:0:root:/root:/bin/bash\r\n\
        \n\
        +nisuser::::::\n\
        -baduser\n\
        broken:x:12\n\
        neg:x:-1:0::/:/bin/sh\n\
        app:x:10001:10001:App,,,:/home/app:/bin/sh\n\
        latin:x:2000:2000:\xe9:/:/bin/sh\n\
        root:x:5:5:second root:/:/bin/sh\n\
        last:x:3000:3000::/last:/sbin/nologin";

    #[test]
    fn passwd_keeps_well_formed_entries_only() {
        let entries = parse_passwd(PASSWD).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["root", "app", "root", "last"]);
        assert_eq!(
            entries[1],
            PasswdEntry {
                name: "app".into(),
                uid: 10001,
                gid: 10001,
                gecos: "App,,,".into(),
                home: "/home/app".into(),
                shell: "/bin/sh".into()
            }
        );
        assert_eq!(
            entries[0].shell, "/bin/bash",
            "CRLF is not part of the shell"
        );
        assert_eq!(entries[3].shell, "/sbin/nologin");
    }

    #[test]
    fn lookups_return_first_match() {
        assert_eq!(lookup_user(PASSWD, "root").unwrap().unwrap().uid, 0);
        assert_eq!(lookup_user(PASSWD, "nisuser").unwrap(), None);
        assert_eq!(lookup_user(PASSWD, "+nisuser").unwrap(), None);
        assert_eq!(lookup_user(b"", "root").unwrap(), None);
        assert_eq!(lookup_uid(PASSWD, 10001).unwrap().unwrap().name, "app");
        assert_eq!(lookup_uid(PASSWD, 4).unwrap(), None);
    }

    #[test]
    fn group_members_and_supplementary_gids() {
        let group = b"root:x:0:\n#wheel:x:10:app\nwheel:x:10:app,bob\r\n+:::\nusers:x:100:bob,,app\nagain:x:10:app\nodd:x:x:app\n";
        let groups = parse_group(group).unwrap();
        assert_eq!(groups.len(), 4);
        assert_eq!(
            groups[0],
            GroupEntry {
                name: "root".into(),
                gid: 0,
                members: vec![]
            }
        );
        assert_eq!(groups[1].members, ["app", "bob"]);
        assert_eq!(groups[2].members, ["bob", "app"]);
        assert_eq!(supplementary_gids(group, "app").unwrap(), [10, 100]);
        assert_eq!(
            supplementary_gids(group, "nobody").unwrap(),
            Vec::<u32>::new()
        );
    }

    #[test]
    fn oversized_or_nul_input_is_an_error() {
        let err = parse_passwd(b"root:x:0:0::/:/bin/sh\0\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "/etc/passwd: it holds a NUL byte at offset 21; accepted: text without NUL bytes"
        );
        let big = vec![b'#'; MAX_ACCOUNT_FILE_SIZE + 1];
        let err = parse_group(&big).unwrap_err().to_string();
        assert!(
            err.starts_with("/etc/group: it is 1048577 bytes; accepted: at most 1 MiB"),
            "{err}"
        );
        assert!(parse_group(&big[1..]).is_ok());
    }
}
