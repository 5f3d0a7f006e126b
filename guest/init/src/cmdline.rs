//! The guest's configuration, read from the kernel command line (`kiln.*` arguments).
//!
//! The command line carries only what init needs before it can talk to the host: where
//! the disks and the channel are, and the network. The workload itself comes later as a
//! run spec over the channel.

use std::net::Ipv4Addr;

/// Default virtio-serial port name of the host-guest channel.
pub const DEFAULT_PORT: &str = "kiln.0";

/// Where a block device comes from: a virtio-blk serial (`root`, found through
/// `/sys/block/vd*/serial`, robust to probe order) or an explicit `/dev/...` path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskRef {
    Serial(String),
    Path(String),
}

impl DiskRef {
    fn parse(value: &str) -> DiskRef {
        if value.starts_with("/dev/") {
            DiskRef::Path(value.to_owned())
        } else {
            DiskRef::Serial(value.to_owned())
        }
    }
}

impl std::fmt::Display for DiskRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiskRef::Serial(serial) => write!(f, "disk with serial {serial:?}"),
            DiskRef::Path(path) => write!(f, "{path}"),
        }
    }
}

/// The writable layer above the read-only images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upper {
    /// A throw-away sandbox: the upper lives in guest memory.
    Tmpfs,
    /// A persistent sandbox: an ext4 disk holding `upper/` and `work/`.
    Disk(DiskRef),
}

/// Static IPv4 configuration of eth0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Option<Ipv4Addr>,
}

/// Everything init reads from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    /// `kiln.root=`: the EROFS root image (required to boot a workload).
    pub root: Option<DiskRef>,
    /// `kiln.ident=`: the EROFS identity layer stacked above the root (optional).
    pub ident: Option<DiskRef>,
    /// `kiln.upper=tmpfs|SERIAL|/dev/...` (default tmpfs).
    pub upper: Upper,
    /// `kiln.port=`: virtio-serial port name of the channel (default `kiln.0`).
    pub port: String,
    /// `kiln.hostname=` (default `kiln`).
    pub hostname: String,
    /// `kiln.net=ADDR/PREFIX[,GATEWAY[,DNS]]`: bring eth0 up; absent means no network.
    pub net: Option<NetConfig>,
    /// `kiln.vol=TAG,GUESTPATH[,ro]`, repeatable: 9p shares to mount, in order.
    pub volumes: Vec<VolumeMount>,
}

/// A host directory shared over virtio-9p and where it goes in the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMount {
    /// The share's mount tag (QEMU's `mount_tag`).
    pub tag: String,
    /// Absolute, normalised path in the sandbox root.
    pub path: String,
    pub read_only: bool,
}

/// A `kiln.*` argument init cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("kernel command line argument {arg:?}: {reason}")]
pub struct CmdlineError {
    pub arg: String,
    pub reason: String,
}

impl BootConfig {
    /// Parses a kernel command line. Arguments not starting with `kiln.` belong to the
    /// kernel and are ignored; an unknown or malformed `kiln.` argument is an error, so a
    /// typo on the host side cannot silently boot a differently configured guest.
    pub fn parse(cmdline: &str) -> Result<BootConfig, CmdlineError> {
        let mut config = BootConfig {
            root: None,
            ident: None,
            upper: Upper::Tmpfs,
            port: DEFAULT_PORT.to_owned(),
            hostname: "kiln".to_owned(),
            net: None,
            volumes: Vec::new(),
        };
        for arg in cmdline.split_ascii_whitespace() {
            let Some(rest) = arg.strip_prefix("kiln.") else {
                continue;
            };
            let error = |reason: &str| CmdlineError {
                arg: arg.to_owned(),
                reason: reason.to_owned(),
            };
            let (key, value) = rest
                .split_once('=')
                .ok_or_else(|| error("expected kiln.KEY=VALUE"))?;
            if value.is_empty() {
                return Err(error("the value is empty"));
            }
            match key {
                "root" => config.root = Some(DiskRef::parse(value)),
                "ident" => config.ident = Some(DiskRef::parse(value)),
                "upper" => {
                    config.upper = if value == "tmpfs" {
                        Upper::Tmpfs
                    } else {
                        Upper::Disk(DiskRef::parse(value))
                    }
                }
                "port" => {
                    if !value
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                    {
                        return Err(error("a port name is made of [A-Za-z0-9._-]"));
                    }
                    config.port = value.to_owned()
                }
                "hostname" => {
                    if value.len() > 64
                        || !value
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                    {
                        // `_` is not a DNS hostname character, but sandbox names (like
                        // container names) may hold it and the kernel accepts it.
                        return Err(error(
                            "a hostname is at most 64 characters of [A-Za-z0-9._-]",
                        ));
                    }
                    config.hostname = value.to_owned()
                }
                "net" => config.net = Some(parse_net(value).map_err(|reason| error(&reason))?),
                "vol" => {
                    let volume = parse_volume(value).map_err(|reason| error(&reason))?;
                    if config
                        .volumes
                        .iter()
                        .any(|v| v.tag == volume.tag || v.path == volume.path)
                    {
                        return Err(error("another kiln.vol has the same tag or path"));
                    }
                    config.volumes.push(volume)
                }
                _ => {
                    return Err(error(
                        "unknown key; accepted: root, ident, upper, port, hostname, net, vol",
                    ))
                }
            }
        }
        Ok(config)
    }
}

/// `TAG,GUESTPATH[,ro]`: TAG of [A-Za-z0-9._-], GUESTPATH absolute and normalised (no
/// empty, `.` or `..` component, not `/` itself).
fn parse_volume(value: &str) -> Result<VolumeMount, String> {
    const ACCEPTED: &str = "expected TAG,GUESTPATH[,ro]";
    let mut parts = value.split(',');
    let (tag, path) = match (parts.next(), parts.next()) {
        (Some(tag), Some(path)) => (tag, path),
        _ => return Err(ACCEPTED.into()),
    };
    let read_only = match parts.next() {
        None => false,
        Some("ro") => true,
        Some(_) => return Err(ACCEPTED.into()),
    };
    if parts.next().is_some() {
        return Err(ACCEPTED.into());
    }
    if tag.is_empty()
        || !tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(format!("tag {tag:?} is not made of [A-Za-z0-9._-]"));
    }
    let normalised = path.len() > 1
        && path.starts_with('/')
        && path[1..]
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..");
    if !normalised {
        return Err(format!(
            "guest path {path:?} is not an absolute, normalised path below /"
        ));
    }
    Ok(VolumeMount {
        tag: tag.to_owned(),
        path: path.to_owned(),
        read_only,
    })
}

fn parse_net(value: &str) -> Result<NetConfig, String> {
    let mut parts = value.split(',');
    let cidr = parts.next().unwrap_or_default();
    let (address, prefix) = cidr
        .split_once('/')
        .ok_or("expected ADDR/PREFIX[,GATEWAY[,DNS]]")?;
    let address = address
        .parse()
        .map_err(|_| format!("{address:?} is not an IPv4 address"))?;
    let prefix_len = prefix
        .parse::<u8>()
        .ok()
        .filter(|p| (1..=32).contains(p))
        .ok_or_else(|| format!("prefix length {prefix:?} is not in 1..=32"))?;
    let mut next_addr = |what: &str| -> Result<Option<Ipv4Addr>, String> {
        match parts.next() {
            None | Some("") => Ok(None),
            Some(text) => text
                .parse()
                .map(Some)
                .map_err(|_| format!("{what} {text:?} is not an IPv4 address")),
        }
    };
    let gateway = next_addr("gateway")?;
    let dns = next_addr("DNS server")?;
    if parts.next().is_some() {
        return Err("expected at most ADDR/PREFIX,GATEWAY,DNS".into());
    }
    Ok(NetConfig {
        address,
        prefix_len,
        gateway,
        dns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_when_only_kernel_arguments() {
        let config = BootConfig::parse("console=ttyS0 reboot=t panic=-1 quiet").unwrap();
        assert_eq!(config.root, None);
        assert_eq!(config.upper, Upper::Tmpfs);
        assert_eq!(config.port, "kiln.0");
        assert_eq!(config.net, None);
    }

    #[test]
    fn full_command_line() {
        let config = BootConfig::parse(
            "console=ttyS0 kiln.root=root kiln.ident=/dev/vdb kiln.upper=upper kiln.port=kiln.1 \
             kiln.hostname=box-1 kiln.net=10.0.2.15/24,10.0.2.2,10.0.2.3",
        )
        .unwrap();
        assert_eq!(config.root, Some(DiskRef::Serial("root".into())));
        assert_eq!(config.ident, Some(DiskRef::Path("/dev/vdb".into())));
        assert_eq!(config.upper, Upper::Disk(DiskRef::Serial("upper".into())));
        assert_eq!(config.port, "kiln.1");
        assert_eq!(config.hostname, "box-1");
        assert_eq!(
            config.net,
            Some(NetConfig {
                address: Ipv4Addr::new(10, 0, 2, 15),
                prefix_len: 24,
                gateway: Some(Ipv4Addr::new(10, 0, 2, 2)),
                dns: Some(Ipv4Addr::new(10, 0, 2, 3)),
            })
        );
    }

    #[test]
    fn volumes_repeat_in_order() {
        let config = BootConfig::parse("kiln.vol=vol0,/data kiln.vol=vol1,/srv/in,ro").unwrap();
        assert_eq!(
            config.volumes,
            [
                VolumeMount {
                    tag: "vol0".into(),
                    path: "/data".into(),
                    read_only: false
                },
                VolumeMount {
                    tag: "vol1".into(),
                    path: "/srv/in".into(),
                    read_only: true
                },
            ]
        );
        for twice in ["kiln.vol=a,/x kiln.vol=a,/y", "kiln.vol=a,/x kiln.vol=b,/x"] {
            let err = BootConfig::parse(twice).unwrap_err();
            assert!(err.reason.contains("same tag or path"), "{err}");
        }
    }

    #[test]
    fn network_without_gateway() {
        let config = BootConfig::parse("kiln.net=192.168.1.2/32").unwrap();
        assert_eq!(config.net.unwrap().gateway, None);
    }

    #[test]
    fn bad_arguments_name_the_argument() {
        for bad in [
            "kiln.rot=root",
            "kiln.root",
            "kiln.root=",
            "kiln.net=10.0.2.15",
            "kiln.net=10.0.2.15/33",
            "kiln.net=10.0.2.15/24,gateway",
            "kiln.net=10.0.2.15/24,1.1.1.1,2.2.2.2,3.3.3.3",
            "kiln.hostname=a/b",
            "kiln.port=a/b",
            "kiln.vol=vol0",
            "kiln.vol=vol0,data",
            "kiln.vol=vol0,/",
            "kiln.vol=vol0,/a/../b",
            "kiln.vol=vol0,/a/./b",
            "kiln.vol=vol0,/a//b",
            "kiln.vol=vol0,/a/",
            "kiln.vol=vol0,/a,rw",
            "kiln.vol=vol0,/a,ro,x",
            "kiln.vol=,/a",
            "kiln.vol=v/0,/a",
        ] {
            let err = BootConfig::parse(bad).unwrap_err();
            assert_eq!(err.arg, bad, "{err}");
        }
    }
}
