//! The boot configuration: what the host tells the guest's init on the kernel command
//! line, as `kiln.*` arguments, before the channel exists (where the disks and the
//! channel are, the hostname, the network, /etc/hosts entries and DNS servers, the 9p
//! volumes and tmpfs mounts, whether the root is read-only and whether the workload may
//! create user namespaces). The workload itself comes later as a run spec over the channel.
//!
//! The host builds a [`BootConfig`] and writes it with [`BootConfig::kernel_args`]; the
//! guest reads it back with [`BootConfig::parse`]. Both check the same grammar
//! (docs/protocol.md, "Boot configuration"), so whatever the encoder accepts parses back
//! to the same configuration, and free-form text (paths) is %-escaped so that no value
//! can split an argument, open a kernel quote or add a list item.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

/// Virtio-serial port name of the host-guest channel, and the guest's default.
pub const CHANNEL_PORT: &str = "kiln.0";

/// Disk id (the virtio-blk serial) of the EROFS root image.
pub const ROOT_DISK_ID: &str = "root";

/// Disk id (the virtio-blk serial) of the EROFS identity layer.
pub const IDENTITY_DISK_ID: &str = "ident";

/// Disk id (the virtio-blk serial) of the EROFS layer holding OpenShell's supervisor.
pub const OPENSHELL_DISK_ID: &str = "openshell";

/// Disk id (the virtio-blk serial) of a persistent sandbox's ext4 upper.
pub const UPPER_DISK_ID: &str = "upper";

/// The guest's hostname when the command line names none.
pub const DEFAULT_HOSTNAME: &str = "kiln";

/// What `kiln.upper=` says for an upper in guest memory.
const TMPFS_UPPER: &str = "tmpfs";

/// The values of `kiln.userns=`.
const USERNS_ON: &str = "on";
const USERNS_OFF: &str = "off";

/// The values of `kiln.ro=`.
const READ_ONLY_ON: &str = "on";
const READ_ONLY_OFF: &str = "off";

/// At most this many `kiln.host=` entries: the whole command line must fit the kernel's
/// 2048 bytes.
pub const MAX_EXTRA_HOSTS: usize = 32;

/// At most this many `kiln.dns=` servers: the C library reads no more than three
/// nameservers from resolv.conf (`MAXNS`).
pub const MAX_DNS_SERVERS: usize = 3;

/// At most this many `kiln.tmpfs=` mounts (the command line's size, again).
pub const MAX_TMPFS_MOUNTS: usize = 16;

/// A virtio-blk serial holds at most 20 bytes; a longer one could never match.
const MAX_SERIAL_LEN: usize = 20;

/// The kernel's limit on a hostname (`__NEW_UTS_LEN`).
const MAX_HOSTNAME_LEN: usize = 64;

/// Where a block device comes from: a virtio-blk serial (found through
/// `/sys/block/vd*/serial`, robust to probe order) or an explicit `/dev/...` path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskRef {
    Serial(String),
    Path(String),
}

impl fmt::Display for DiskRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
    /// In 1..=32.
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Option<Ipv4Addr>,
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

/// A line `/etc/hosts` gets: `address name` (docker's `--add-host name:ip`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostEntry {
    /// A hostname of [A-Za-z0-9._-], at most 64 bytes.
    pub name: String,
    pub address: IpAddr,
}

/// A tmpfs the guest mounts in the sandbox root (docker's `--tmpfs`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TmpfsMount {
    /// Absolute, normalised path in the sandbox root.
    pub path: String,
    /// Permission bits of its root directory (at most 0o7777).
    pub mode: u32,
    /// Its size limit in bytes; `None` leaves the kernel's default (half the guest's memory).
    pub size_bytes: Option<u64>,
}

/// Everything the guest's init reads from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    /// `kiln.root=`: the EROFS root image (required to boot a workload).
    pub root: Option<DiskRef>,
    /// `kiln.ident=`: the EROFS identity layer stacked above the root (optional).
    pub ident: Option<DiskRef>,
    /// `kiln.openshell=`: the EROFS layer holding OpenShell's supervisor, stacked above
    /// the identity layer (optional).
    pub openshell: Option<DiskRef>,
    /// `kiln.upper=` (default tmpfs).
    pub upper: Upper,
    /// `kiln.port=`: virtio-serial port name of the channel (default [`CHANNEL_PORT`]).
    pub port: String,
    /// `kiln.hostname=` (default [`DEFAULT_HOSTNAME`]).
    pub hostname: String,
    /// `kiln.net=`: bring eth0 up; absent means no network.
    pub net: Option<NetConfig>,
    /// `kiln.vol=`, repeatable: 9p shares to mount, in order.
    pub volumes: Vec<VolumeMount>,
    /// `kiln.tmpfs=`, repeatable: tmpfs mounts, after the volumes; no two volumes or
    /// tmpfs mounts share a path.
    pub tmpfs: Vec<TmpfsMount>,
    /// `kiln.host=`, repeatable: extra `/etc/hosts` lines, in order.
    pub hosts: Vec<HostEntry>,
    /// `kiln.dns=`, repeatable: the nameservers of `/etc/resolv.conf`, in order; when
    /// empty, the network's own DNS server (if any) is the one.
    pub dns: Vec<IpAddr>,
    /// `kiln.ro=on`: the overlay root is made read-only before the workload starts
    /// (volumes, tmpfs mounts, /tmp, /run and /dev/shm stay writable).
    pub read_only: bool,
    /// `kiln.userns=on`: the workload may create user namespaces. Off by default: init
    /// then sets `user.max_user_namespaces` to 0 before the workload starts, so `unshare -r`
    /// cannot hand it a namespace where it holds every capability.
    pub user_namespaces: bool,
}

impl Default for BootConfig {
    /// What a command line without `kiln.*` arguments means.
    fn default() -> Self {
        BootConfig {
            root: None,
            ident: None,
            openshell: None,
            upper: Upper::Tmpfs,
            port: CHANNEL_PORT.to_owned(),
            hostname: DEFAULT_HOSTNAME.to_owned(),
            net: None,
            volumes: Vec::new(),
            tmpfs: Vec::new(),
            hosts: Vec::new(),
            dns: Vec::new(),
            read_only: false,
            user_namespaces: false,
        }
    }
}

/// What is wrong with a `kiln.*` argument or with the value it would carry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CmdlineFault {
    #[error("expected kiln.KEY=VALUE")]
    NotKeyValue,
    #[error("the value is empty")]
    EmptyValue,
    #[error("unknown key; accepted: root, ident, openshell, upper, port, hostname, net, vol, tmpfs, host, dns, ro, userns")]
    UnknownKey,
    #[error(
        "{0:?} is neither a /dev/ path nor a disk serial of 1-20 characters of [A-Za-z0-9._-]"
    )]
    Disk(String),
    #[error("\"tmpfs\" means an upper in memory, so it cannot be the serial of an upper disk")]
    TmpfsSerial,
    #[error("a port name is made of [A-Za-z0-9._-]")]
    Port,
    #[error("a hostname is at most 64 characters of [A-Za-z0-9._-]")]
    Hostname,
    #[error("expected ADDR/PREFIX[,GATEWAY[,DNS]]")]
    NetSyntax,
    #[error("expected at most ADDR/PREFIX,GATEWAY,DNS")]
    NetTooLong,
    #[error("{what} {text:?} is not an IPv4 address")]
    Address { what: &'static str, text: String },
    #[error("prefix length {0:?} is not in 1..=32")]
    PrefixLength(String),
    #[error("expected TAG,GUESTPATH[,ro]")]
    VolumeSyntax,
    #[error("tag {0:?} is not made of [A-Za-z0-9._-]")]
    Tag(String),
    #[error("guest path {0:?} is not an absolute, normalised path below /")]
    GuestPath(String),
    #[error("another kiln.vol or kiln.tmpfs has the same tag or path")]
    DuplicateVolume,
    #[error("expected PATH,MODE[,SIZE] with MODE octal up to 7777 and SIZE a number of bytes")]
    TmpfsSyntax,
    #[error(
        "expected NAME,ADDRESS with NAME a hostname of at most 64 characters of [A-Za-z0-9._-]"
    )]
    HostSyntax,
    #[error("{0:?} is not an IPv4 or IPv6 address")]
    IpAddress(String),
    #[error("more than {max} kiln.{key} arguments")]
    TooMany { key: &'static str, max: usize },
    #[error("expected on or off")]
    UserNamespaces,
    #[error("expected on or off")]
    ReadOnly,
    #[error("{0:?} is not a %-escape (% and two uppercase hex digits of a byte that needs one)")]
    Escape(String),
    #[error("byte 0x{0:02x} must be written as a %-escape")]
    Unescaped(u8),
    #[error("the unescaped value is not UTF-8")]
    NotUtf8,
}

/// A `kiln.*` argument the guest cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("kernel command line argument {arg:?}: {fault}")]
pub struct CmdlineError {
    /// The whole argument, as found on the command line.
    pub arg: String,
    pub fault: CmdlineFault,
}

/// A boot configuration the encoder refuses because the guest would not read it back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("boot configuration kiln.{key}: {fault}")]
pub struct BootConfigError {
    /// The argument's key (`hostname`, `vol`, ...).
    pub key: &'static str,
    pub fault: CmdlineFault,
}

impl BootConfig {
    /// Parses a kernel command line. Arguments not starting with `kiln.` belong to the
    /// kernel and are ignored; an unknown or malformed `kiln.` argument is an error, so a
    /// typo on the host side cannot silently boot a differently configured guest. A key
    /// given twice takes its last value, except `vol`, `tmpfs`, `host` and `dns`, which add
    /// an item each time.
    pub fn parse(cmdline: &str) -> Result<BootConfig, CmdlineError> {
        let mut config = BootConfig::default();
        for arg in cmdline.split_ascii_whitespace() {
            let Some(rest) = arg.strip_prefix("kiln.") else {
                continue;
            };
            let error = |fault| CmdlineError {
                arg: arg.to_owned(),
                fault,
            };
            let (key, value) = rest
                .split_once('=')
                .ok_or_else(|| error(CmdlineFault::NotKeyValue))?;
            if value.is_empty() {
                return Err(error(CmdlineFault::EmptyValue));
            }
            config.apply(key, value).map_err(error)?;
        }
        Ok(config)
    }

    /// Sets what `kiln.KEY=VALUE` says.
    fn apply(&mut self, key: &str, value: &str) -> Result<(), CmdlineFault> {
        match key {
            "root" => self.root = Some(decode_disk(value)?),
            "ident" => self.ident = Some(decode_disk(value)?),
            "openshell" => self.openshell = Some(decode_disk(value)?),
            "upper" => {
                self.upper = if value == TMPFS_UPPER {
                    Upper::Tmpfs
                } else {
                    Upper::Disk(decode_disk(value)?)
                }
            }
            "port" => {
                check_port(value)?;
                self.port = value.to_owned();
            }
            "hostname" => {
                check_hostname(value)?;
                self.hostname = value.to_owned();
            }
            "net" => self.net = Some(decode_net(value)?),
            "userns" => {
                self.user_namespaces = match value {
                    USERNS_ON => true,
                    USERNS_OFF => false,
                    _ => return Err(CmdlineFault::UserNamespaces),
                }
            }
            "ro" => {
                self.read_only = match value {
                    READ_ONLY_ON => true,
                    READ_ONLY_OFF => false,
                    _ => return Err(CmdlineFault::ReadOnly),
                }
            }
            "vol" => {
                let volume = decode_volume(value)?;
                if self.volumes.iter().any(|v| volumes_clash(v, &volume))
                    || self.tmpfs.iter().any(|t| t.path == volume.path)
                {
                    return Err(CmdlineFault::DuplicateVolume);
                }
                self.volumes.push(volume);
            }
            "tmpfs" => {
                let tmpfs = decode_tmpfs(value)?;
                if self.tmpfs.len() == MAX_TMPFS_MOUNTS {
                    return Err(too_many("tmpfs", MAX_TMPFS_MOUNTS));
                }
                if self.volumes.iter().any(|v| v.path == tmpfs.path)
                    || self.tmpfs.iter().any(|t| t.path == tmpfs.path)
                {
                    return Err(CmdlineFault::DuplicateVolume);
                }
                self.tmpfs.push(tmpfs);
            }
            "host" => {
                if self.hosts.len() == MAX_EXTRA_HOSTS {
                    return Err(too_many("host", MAX_EXTRA_HOSTS));
                }
                self.hosts.push(decode_host(value)?);
            }
            "dns" => {
                if self.dns.len() == MAX_DNS_SERVERS {
                    return Err(too_many("dns", MAX_DNS_SERVERS));
                }
                self.dns.push(decode_ip(value)?);
            }
            _ => return Err(CmdlineFault::UnknownKey),
        }
        Ok(())
    }

    /// The `kiln.*` kernel arguments that [`BootConfig::parse`] reads back as this
    /// configuration: root, ident, openshell, upper, port, hostname, net, userns and ro (only when
    /// on: off is the guest's default), then one per volume, tmpfs mount, host entry and
    /// DNS server; no
    /// argument holds whitespace, a quote or a byte outside printable ASCII. A value the
    /// guest would refuse (a hostname over 64 characters, two volumes at one path, ...)
    /// is an error naming its key.
    pub fn kernel_args(&self) -> Result<Vec<String>, BootConfigError> {
        let arg = |key: &'static str, value: Result<String, CmdlineFault>| {
            value
                .map(|value| format!("kiln.{key}={value}"))
                .map_err(|fault| BootConfigError { key, fault })
        };
        let mut args = Vec::new();
        if let Some(root) = &self.root {
            args.push(arg("root", encode_disk(root))?);
        }
        if let Some(ident) = &self.ident {
            args.push(arg("ident", encode_disk(ident))?);
        }
        if let Some(openshell) = &self.openshell {
            args.push(arg("openshell", encode_disk(openshell))?);
        }
        let upper = match &self.upper {
            Upper::Tmpfs => Ok(TMPFS_UPPER.to_owned()),
            Upper::Disk(DiskRef::Serial(serial)) if serial == TMPFS_UPPER => {
                Err(CmdlineFault::TmpfsSerial)
            }
            Upper::Disk(disk) => encode_disk(disk),
        };
        args.push(arg("upper", upper)?);
        let port = check_port(&self.port).map(|()| self.port.clone());
        args.push(arg("port", port)?);
        let hostname = check_hostname(&self.hostname).map(|()| self.hostname.clone());
        args.push(arg("hostname", hostname)?);
        if let Some(net) = &self.net {
            args.push(arg("net", encode_net(net))?);
        }
        if self.user_namespaces {
            args.push(arg("userns", Ok(USERNS_ON.to_owned()))?);
        }
        if self.read_only {
            args.push(arg("ro", Ok(READ_ONLY_ON.to_owned()))?);
        }
        for (index, volume) in self.volumes.iter().enumerate() {
            let value = if self.volumes[..index]
                .iter()
                .any(|v| volumes_clash(v, volume))
            {
                Err(CmdlineFault::DuplicateVolume)
            } else {
                encode_volume(volume)
            };
            args.push(arg("vol", value)?);
        }
        if self.tmpfs.len() > MAX_TMPFS_MOUNTS {
            return Err(BootConfigError {
                key: "tmpfs",
                fault: too_many("tmpfs", MAX_TMPFS_MOUNTS),
            });
        }
        for (index, tmpfs) in self.tmpfs.iter().enumerate() {
            let clash = self.volumes.iter().any(|v| v.path == tmpfs.path)
                || self.tmpfs[..index].iter().any(|t| t.path == tmpfs.path);
            let value = if clash {
                Err(CmdlineFault::DuplicateVolume)
            } else {
                encode_tmpfs(tmpfs)
            };
            args.push(arg("tmpfs", value)?);
        }
        if self.hosts.len() > MAX_EXTRA_HOSTS {
            return Err(BootConfigError {
                key: "host",
                fault: too_many("host", MAX_EXTRA_HOSTS),
            });
        }
        for host in &self.hosts {
            let value = check_hostname(&host.name)
                .map_err(|_| CmdlineFault::HostSyntax)
                .map(|()| format!("{},{}", host.name, host.address));
            args.push(arg("host", value)?);
        }
        if self.dns.len() > MAX_DNS_SERVERS {
            return Err(BootConfigError {
                key: "dns",
                fault: too_many("dns", MAX_DNS_SERVERS),
            });
        }
        for dns in &self.dns {
            args.push(arg("dns", Ok(dns.to_string()))?);
        }
        Ok(args)
    }
}

fn too_many(key: &'static str, max: usize) -> CmdlineFault {
    CmdlineFault::TooMany { key, max }
}

fn decode_ip(value: &str) -> Result<IpAddr, CmdlineFault> {
    value
        .parse()
        .map_err(|_| CmdlineFault::IpAddress(value.to_owned()))
}

/// `NAME,ADDRESS`.
fn decode_host(value: &str) -> Result<HostEntry, CmdlineFault> {
    let (name, address) = value.split_once(',').ok_or(CmdlineFault::HostSyntax)?;
    check_hostname(name).map_err(|_| CmdlineFault::HostSyntax)?;
    Ok(HostEntry {
        name: name.to_owned(),
        address: decode_ip(address)?,
    })
}

/// The most permission bits a mode holds (set-id, sticky and rwx for all).
const MAX_MODE: u32 = 0o7777;

/// `PATH,MODE[,SIZE]` with PATH %-escaped, MODE octal and SIZE decimal bytes.
fn decode_tmpfs(value: &str) -> Result<TmpfsMount, CmdlineFault> {
    let mut parts = value.split(',');
    let (Some(path), Some(mode)) = (parts.next(), parts.next()) else {
        return Err(CmdlineFault::TmpfsSyntax);
    };
    let mode = u32::from_str_radix(mode, 8)
        .ok()
        .filter(|m| *m <= MAX_MODE)
        .ok_or(CmdlineFault::TmpfsSyntax)?;
    let size_bytes = match parts.next() {
        None => None,
        Some(size) => Some(size.parse().map_err(|_| CmdlineFault::TmpfsSyntax)?),
    };
    if parts.next().is_some() {
        return Err(CmdlineFault::TmpfsSyntax);
    }
    let path = unescape(path)?;
    check_guest_path(&path)?;
    Ok(TmpfsMount {
        path,
        mode,
        size_bytes,
    })
}

fn encode_tmpfs(tmpfs: &TmpfsMount) -> Result<String, CmdlineFault> {
    check_guest_path(&tmpfs.path)?;
    if tmpfs.mode > MAX_MODE {
        return Err(CmdlineFault::TmpfsSyntax);
    }
    let mut value = format!("{},{:o}", escape(&tmpfs.path), tmpfs.mode);
    if let Some(size) = tmpfs.size_bytes {
        value.push_str(&format!(",{size}"));
    }
    Ok(value)
}

/// Two volumes that cannot both be mounted: the same share or the same place.
fn volumes_clash(a: &VolumeMount, b: &VolumeMount) -> bool {
    a.tag == b.tag || a.path == b.path
}

/// `[A-Za-z0-9._-]+`: port names, volume tags, hostnames and serials.
fn is_name(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn check_port(port: &str) -> Result<(), CmdlineFault> {
    is_name(port).then_some(()).ok_or(CmdlineFault::Port)
}

fn check_hostname(hostname: &str) -> Result<(), CmdlineFault> {
    // `_` is not a DNS hostname character, but sandbox names (like container names) may
    // hold it and the kernel accepts it.
    (is_name(hostname) && hostname.len() <= MAX_HOSTNAME_LEN)
        .then_some(())
        .ok_or(CmdlineFault::Hostname)
}

/// A disk is `/dev/` and a %-escaped rest, or a serial.
fn decode_disk(value: &str) -> Result<DiskRef, CmdlineFault> {
    let disk = if value.starts_with("/dev/") {
        DiskRef::Path(unescape(value)?)
    } else {
        DiskRef::Serial(value.to_owned())
    };
    check_disk(&disk)?;
    Ok(disk)
}

fn encode_disk(disk: &DiskRef) -> Result<String, CmdlineFault> {
    check_disk(disk)?;
    Ok(match disk {
        DiskRef::Serial(serial) => serial.clone(),
        DiskRef::Path(path) => escape(path),
    })
}

fn check_disk(disk: &DiskRef) -> Result<(), CmdlineFault> {
    let (valid, text) = match disk {
        DiskRef::Serial(serial) => (is_name(serial) && serial.len() <= MAX_SERIAL_LEN, serial),
        DiskRef::Path(path) => (
            path.strip_prefix("/dev/")
                .is_some_and(|rest| !rest.is_empty())
                && !path.contains('\0'),
            path,
        ),
    };
    valid
        .then_some(())
        .ok_or_else(|| CmdlineFault::Disk(text.clone()))
}

/// `ADDR/PREFIX[,GATEWAY[,DNS]]`; an empty GATEWAY or DNS means none.
fn decode_net(value: &str) -> Result<NetConfig, CmdlineFault> {
    let mut parts = value.split(',');
    let cidr = parts.next().unwrap_or_default();
    let (address, prefix) = cidr.split_once('/').ok_or(CmdlineFault::NetSyntax)?;
    let address = address.parse().map_err(|_| CmdlineFault::Address {
        what: "address",
        text: address.to_owned(),
    })?;
    let prefix_len = prefix
        .parse::<u8>()
        .ok()
        .filter(|p| (1..=32).contains(p))
        .ok_or_else(|| CmdlineFault::PrefixLength(prefix.to_owned()))?;
    let mut next_address = |what| match parts.next() {
        None | Some("") => Ok(None),
        Some(text) => text.parse().map(Some).map_err(|_| CmdlineFault::Address {
            what,
            text: text.to_owned(),
        }),
    };
    let gateway = next_address("gateway")?;
    let dns = next_address("DNS server")?;
    if parts.next().is_some() {
        return Err(CmdlineFault::NetTooLong);
    }
    Ok(NetConfig {
        address,
        prefix_len,
        gateway,
        dns,
    })
}

fn encode_net(net: &NetConfig) -> Result<String, CmdlineFault> {
    if !(1..=32).contains(&net.prefix_len) {
        return Err(CmdlineFault::PrefixLength(net.prefix_len.to_string()));
    }
    let mut value = format!("{}/{}", net.address, net.prefix_len);
    match (net.gateway, net.dns) {
        (None, None) => {}
        (Some(gateway), None) => value.push_str(&format!(",{gateway}")),
        (gateway, Some(dns)) => {
            let gateway = gateway.map(|g| g.to_string()).unwrap_or_default();
            value.push_str(&format!(",{gateway},{dns}"));
        }
    }
    Ok(value)
}

/// `TAG,GUESTPATH[,ro]` with GUESTPATH %-escaped.
fn decode_volume(value: &str) -> Result<VolumeMount, CmdlineFault> {
    let mut parts = value.split(',');
    let (Some(tag), Some(path)) = (parts.next(), parts.next()) else {
        return Err(CmdlineFault::VolumeSyntax);
    };
    let read_only = match parts.next() {
        None => false,
        Some("ro") => true,
        Some(_) => return Err(CmdlineFault::VolumeSyntax),
    };
    if parts.next().is_some() {
        return Err(CmdlineFault::VolumeSyntax);
    }
    let volume = VolumeMount {
        tag: tag.to_owned(),
        path: unescape(path)?,
        read_only,
    };
    check_volume(&volume)?;
    Ok(volume)
}

fn encode_volume(volume: &VolumeMount) -> Result<String, CmdlineFault> {
    check_volume(volume)?;
    let mode = if volume.read_only { ",ro" } else { "" };
    Ok(format!("{},{}{mode}", volume.tag, escape(&volume.path)))
}

/// TAG of [A-Za-z0-9._-]; the path absolute and normalised: no empty, `.` or `..`
/// component, not `/` itself, no NUL.
fn check_volume(volume: &VolumeMount) -> Result<(), CmdlineFault> {
    if !is_name(&volume.tag) {
        return Err(CmdlineFault::Tag(volume.tag.clone()));
    }
    check_guest_path(&volume.path)
}

/// Absolute and normalised: no empty, `.` or `..` component, not `/` itself, no NUL.
fn check_guest_path(path: &str) -> Result<(), CmdlineFault> {
    let normalised = path.len() > 1
        && path.starts_with('/')
        && !path.contains('\0')
        && path[1..]
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..");
    if !normalised {
        return Err(CmdlineFault::GuestPath(path.to_owned()));
    }
    Ok(())
}

/// Bytes an escaped value carries as themselves: printable ASCII but for `"` (the
/// kernel's quote), `,` (the list separator) and `%` (the escape). Everything else, the
/// space, control bytes and every byte of a non-ASCII character, is `%XX`.
fn is_plain(byte: u8) -> bool {
    byte.is_ascii_graphic() && !matches!(byte, b'"' | b',' | b'%')
}

fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for byte in text.bytes() {
        if is_plain(byte) {
            escaped.push(char::from(byte));
        } else {
            escaped.push_str(&format!("%{byte:02X}"));
        }
    }
    escaped
}

/// The inverse of [`escape`], accepting only what it writes: so one text has one
/// encoding, and a command line that parses re-encodes to itself.
fn unescape(value: &str) -> Result<String, CmdlineFault> {
    fn hex_digit(digit: u8) -> Option<u8> {
        match digit {
            b'0'..=b'9' => Some(digit - b'0'),
            b'A'..=b'F' => Some(digit - b'A' + 10),
            _ => None,
        }
    }
    let bytes = value.as_bytes();
    let mut text = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let byte = bytes[at];
        if byte == b'%' {
            let decoded = bytes
                .get(at + 1..at + 3)
                .and_then(|pair| Some(hex_digit(pair[0])? << 4 | hex_digit(pair[1])?))
                .filter(|b| !is_plain(*b));
            let Some(decoded) = decoded else {
                let escape = value[at..].chars().take(3).collect();
                return Err(CmdlineFault::Escape(escape));
            };
            text.push(decoded);
            at += 3;
        } else if is_plain(byte) {
            text.push(byte);
            at += 1;
        } else {
            return Err(CmdlineFault::Unescaped(byte));
        }
    }
    String::from_utf8(text).map_err(|_| CmdlineFault::NotUtf8)
}

#[cfg(test)]
mod tests;
