//! Docker's flags for the guest's names and mounts: `--hostname`, `--add-host`, `--dns`,
//! `--tmpfs` and `--mount`. What they parse into travels to the guest in the boot
//! configuration (kiln-protocol), so the bounds here are the guest's own.

use std::net::IpAddr;

use kiln_protocol::{HostEntry, TmpfsMount, MAX_DNS_SERVERS, MAX_EXTRA_HOSTS, MAX_TMPFS_MOUNTS};

use super::{normalise_guest_path, parse_volume, OptionError, Volume};
use crate::request::parse_size;

/// A hostname: what the kernel and the boot configuration take.
const HOSTNAME_ACCEPTED: &str = "1-64 characters of A-Z a-z 0-9 . _ -";

/// The mode of a tmpfs when none is given (docker's: everyone may write, sticky).
const DEFAULT_TMPFS_MODE: u32 = 0o1777;

/// Checks a `--hostname` (or an `--add-host` name).
pub fn parse_hostname(text: &str) -> Result<String, OptionError> {
    let valid = (1..=64).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !valid {
        return Err(OptionError::Value {
            what: "hostname",
            value: text.to_owned(),
            accepted: HOSTNAME_ACCEPTED,
        });
    }
    Ok(text.to_owned())
}

/// Parses every `--add-host NAME:IP` (IPv4 or IPv6; the first `:` separates them).
pub fn parse_add_hosts(texts: &[String]) -> Result<Vec<HostEntry>, OptionError> {
    let bad = |text: &str| {
        OptionError::Value {
        what: "extra host",
        value: text.to_owned(),
        accepted: "NAME:IP with NAME 1-64 characters of A-Z a-z 0-9 . _ - and IP an IPv4 or IPv6 address, at most 32 of them",
    }
    };
    if texts.len() > MAX_EXTRA_HOSTS {
        return Err(bad(&texts[MAX_EXTRA_HOSTS]));
    }
    texts
        .iter()
        .map(|text| {
            let (name, address) = text.split_once(':').ok_or_else(|| bad(text))?;
            let name = parse_hostname(name).map_err(|_| bad(text))?;
            let address = address.parse().map_err(|_| bad(text))?;
            Ok(HostEntry { name, address })
        })
        .collect()
}

/// Parses every `--dns IP`: at most three, as resolv.conf reads.
pub fn parse_dns(texts: &[String]) -> Result<Vec<IpAddr>, OptionError> {
    let bad = |text: &str| OptionError::Value {
        what: "DNS server",
        value: text.to_owned(),
        accepted: "an IPv4 or IPv6 address, at most 3 of them",
    };
    if texts.len() > MAX_DNS_SERVERS {
        return Err(bad(&texts[MAX_DNS_SERVERS]));
    }
    texts
        .iter()
        .map(|text| text.parse().map_err(|_| bad(text)))
        .collect()
}

fn tmpfs_error(value: &str, reason: impl Into<String>) -> OptionError {
    OptionError::Tmpfs {
        value: value.to_owned(),
        reason: reason.into(),
    }
}

/// A tmpfs at `path` with docker's `size=`/`mode=` options (also spelt `tmpfs-size=` and
/// `tmpfs-mode=` in `--mount`).
fn tmpfs(value: &str, path: &str, options: &[(&str, &str)]) -> Result<TmpfsMount, OptionError> {
    let mut mount = TmpfsMount {
        path: normalise_guest_path(path).map_err(|e| tmpfs_error(value, e))?,
        mode: DEFAULT_TMPFS_MODE,
        size_bytes: None,
    };
    for (key, option) in options {
        match *key {
            "size" | "tmpfs-size" => {
                let size = parse_size(option).map_err(|e| tmpfs_error(value, e.to_string()))?;
                mount.size_bytes = Some(size);
            }
            "mode" | "tmpfs-mode" => {
                mount.mode = u32::from_str_radix(option, 8)
                    .ok()
                    .filter(|m| *m <= 0o7777)
                    .ok_or_else(|| {
                        tmpfs_error(value, format!("mode {option:?} is not octal up to 7777"))
                    })?;
            }
            _ => return Err(tmpfs_error(value, format!("unknown option {key:?}"))),
        }
    }
    Ok(mount)
}

/// `key=value` pairs of a comma list; a bare word is a key with an empty value.
fn options(list: &str) -> Vec<(&str, &str)> {
    list.split(',')
        .filter(|o| !o.is_empty())
        .map(|o| o.split_once('=').unwrap_or((o, "")))
        .collect()
}

/// Parses `--tmpfs PATH[:size=SIZE,mode=OCTAL]`.
pub fn parse_tmpfs(text: &str) -> Result<TmpfsMount, OptionError> {
    let (path, list) = text.split_once(':').unwrap_or((text, ""));
    tmpfs(text, path, &options(list))
}

/// What one `--mount` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mount {
    /// `type=bind`: a host directory, as `-v` shares it.
    Bind(Volume),
    Tmpfs(TmpfsMount),
}

/// Parses `--mount type=bind,source=DIR,target=PATH[,readonly]` or
/// `--mount type=tmpfs,target=PATH[,tmpfs-size=SIZE][,tmpfs-mode=OCTAL]` (docker's
/// spellings `src`, `dst`, `destination`, `ro` and `readonly=true|false` too). Named
/// volumes (`type=volume`) do not exist in kiln.
pub fn parse_mount(text: &str) -> Result<Mount, OptionError> {
    let bad = |reason: String| OptionError::Mount {
        value: text.to_owned(),
        reason,
    };
    let mut kind = None;
    let mut source = None;
    let mut target = None;
    let mut read_only = false;
    let mut rest = Vec::new();
    for (key, value) in options(text) {
        match key {
            "type" => kind = Some(value),
            "source" | "src" => source = Some(value),
            "target" | "dst" | "destination" => target = Some(value),
            "readonly" | "ro" => {
                read_only = match value {
                    "" | "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err(bad(format!("{key}={value:?} is not true or false"))),
                }
            }
            _ => rest.push((key, value)),
        }
    }
    let target = target.ok_or_else(|| bad("no target=".into()))?;
    match kind {
        Some("bind") => {
            if let Some((key, _)) = rest.first() {
                return Err(bad(format!("unknown option {key:?} for type=bind")));
            }
            let source = source.ok_or_else(|| bad("no source= for type=bind".into()))?;
            if source.contains(':') || target.contains(':') {
                return Err(bad("kiln's paths may not hold ':'".into()));
            }
            let mode = if read_only { ":ro" } else { "" };
            parse_volume(&format!("{source}:{target}{mode}"))
                .map(Mount::Bind)
                .map_err(|e| bad(e.to_string()))
        }
        Some("tmpfs") => {
            if source.is_some() || read_only {
                return Err(bad("type=tmpfs takes no source= or readonly".into()));
            }
            tmpfs(text, target, &rest)
                .map(Mount::Tmpfs)
                .map_err(|e| bad(e.to_string()))
        }
        Some("volume") => Err(bad(
            "kiln has no named volumes; share a host directory with type=bind".into(),
        )),
        Some(other) => Err(bad(format!("unknown type {other:?}"))),
        None => Err(bad("no type=".into())),
    }
}

/// The tmpfs mounts of `--tmpfs` and `--mount type=tmpfs`: at most 16, none at the path of
/// another or of a volume.
pub fn check_tmpfs_mounts(tmpfs: &[TmpfsMount], volumes: &[Volume]) -> Result<(), OptionError> {
    if tmpfs.len() > MAX_TMPFS_MOUNTS {
        return Err(tmpfs_error(
            &tmpfs[MAX_TMPFS_MOUNTS].path,
            format!("more than {MAX_TMPFS_MOUNTS} tmpfs mounts"),
        ));
    }
    for (index, mount) in tmpfs.iter().enumerate() {
        if volumes.iter().any(|v| v.guest == mount.path)
            || tmpfs[..index].iter().any(|t| t.path == mount.path)
        {
            return Err(tmpfs_error(
                &mount.path,
                format!(
                    "another volume or tmpfs is already mounted at {}",
                    mount.path
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tmpfs_takes_dockers_options() {
        let mount = parse_tmpfs("/scratch:size=1m,mode=700").unwrap();
        assert_eq!(
            mount,
            TmpfsMount {
                path: "/scratch".into(),
                mode: 0o700,
                size_bytes: Some(1 << 20)
            }
        );
        assert_eq!(parse_tmpfs("/run/x/").unwrap().mode, 0o1777);
        for (text, says) in [
            ("scratch", "not absolute"),
            ("/proc/x", "under /proc"),
            ("/t:mode=9", "not octal"),
            ("/t:size=lots", "invalid size"),
            ("/t:exec", "unknown option \"exec\""),
        ] {
            let message = parse_tmpfs(text).unwrap_err().to_string();
            assert!(message.contains(says), "{text}: {message}");
            assert!(message.contains(text), "{text}: {message}");
        }
    }

    #[test]
    fn mount_maps_bind_and_tmpfs_and_refuses_volumes() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "type=bind,source={},target=/data,readonly",
            dir.path().display()
        );
        let Mount::Bind(volume) = parse_mount(&text).unwrap() else {
            panic!("not a bind mount");
        };
        assert_eq!((volume.guest.as_str(), volume.read_only), ("/data", true));
        assert_eq!(
            parse_mount("type=tmpfs,dst=/t,tmpfs-size=64k").unwrap(),
            Mount::Tmpfs(TmpfsMount {
                path: "/t".into(),
                mode: 0o1777,
                size_bytes: Some(64 << 10)
            })
        );
        for (text, says) in [
            ("type=volume,source=v,target=/v", "no named volumes"),
            ("type=bind,target=/v", "no source="),
            ("type=tmpfs", "no target="),
            ("type=npipe,target=/x", "unknown type"),
            ("target=/x", "no type="),
        ] {
            let message = parse_mount(text).unwrap_err().to_string();
            assert!(message.contains(says), "{text}: {message}");
        }
    }

    #[test]
    fn hosts_and_dns_are_checked_and_bounded() {
        let hosts = parse_add_hosts(&["db:10.0.0.5".into(), "v6:2001:db8::1".into()]).unwrap();
        assert_eq!(hosts[1].address, "2001:db8::1".parse::<IpAddr>().unwrap());
        assert!(parse_add_hosts(&["db".into()]).is_err());
        assert!(parse_add_hosts(&["a b:10.0.0.1".into()]).is_err());
        assert!(parse_dns(&["1.1.1.1".into(), "x".into()])
            .unwrap_err()
            .to_string()
            .contains("\"x\""));
        assert!(parse_dns(&vec!["1.1.1.1".to_string(); 4]).is_err());
        assert!(parse_hostname(&"h".repeat(65)).is_err());
        assert_eq!(parse_hostname("web-1").unwrap(), "web-1");
    }

    #[test]
    fn tmpfs_may_not_share_a_path() {
        let one = parse_tmpfs("/t").unwrap();
        let error = check_tmpfs_mounts(&[one.clone(), one], &[]).unwrap_err();
        assert!(error.to_string().contains("already mounted at /t"));
    }
}
