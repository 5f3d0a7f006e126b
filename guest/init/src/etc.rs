//! The sandbox's name files, written at boot from the boot configuration: `/etc/hostname`,
//! `/etc/hosts` (localhost, the sandbox's own hostname and the `kiln.host=` entries) and
//! `/etc/resolv.conf` (the `kiln.dns=` servers, else the network's). They go into the
//! overlay root, so they land in this sandbox's upper and never in the shared image.
//!
//! Each file is written to a temporary name in /etc and renamed over the old one, so an
//! image's symlink there (to a systemd-resolved stub, say) is replaced, not followed.
//!
//! A fresh tmpfs upper gets them before the overlay is mounted ([`write_into_fresh_upper`]):
//! written through the overlay, /etc is copied up first, and under TCG that copy-up and
//! the overlay's paths cost about 10 ms of every boot; written into the upper directory
//! they are plain tmpfs files, and the overlay shows them over the image's in the same way.

use std::io;
use std::net::IpAddr;
use std::path::Path;

use kiln_protocol::BootConfig;

/// The address `/etc/hosts` gives the sandbox's own hostname without a network, as
/// Debian does for a host without a fixed address.
const OWN_ADDRESS_WITHOUT_NETWORK: &str = "127.0.1.1";

/// Writes the three files under `root`'s etc directory, creating it when missing.
/// resolv.conf is written only when there is a nameserver to name.
pub fn write_name_files(root: &Path, config: &BootConfig) -> io::Result<()> {
    let etc = root.join("etc");
    std::fs::create_dir_all(&etc)?;
    replace(&etc, "hostname", &format!("{}\n", config.hostname))?;
    replace(&etc, "hosts", &hosts(config))?;
    let servers: Vec<IpAddr> = if config.dns.is_empty() {
        config
            .net
            .iter()
            .filter_map(|n| n.dns)
            .map(IpAddr::from)
            .collect()
    } else {
        config.dns.clone()
    };
    if !servers.is_empty() {
        let text: String = servers
            .iter()
            .map(|s| format!("nameserver {s}\n"))
            .collect();
        replace(&etc, "resolv.conf", &text)?;
    }
    Ok(())
}

/// Writes the name files into `upper`, the empty upper directory of an overlay not yet
/// mounted over `lowers` (topmost first), as `upper/etc/...`; the new `etc` takes the
/// owner and mode of the topmost lower's, as the overlay's copy-up would. Writes nothing
/// and returns `false` where the result could differ from writing through the overlay:
/// when a volume or tmpfs mount lies on or under /etc, or when the topmost lower's /etc
/// is not a directory.
pub fn write_into_fresh_upper(
    upper: &Path,
    lowers: &[&Path],
    config: &BootConfig,
) -> io::Result<bool> {
    let mounted_paths = config.volumes.iter().map(|v| &v.path);
    let mounted_paths = mounted_paths.chain(config.tmpfs.iter().map(|t| &t.path));
    if mounted_paths
        .map(Path::new)
        .any(|path| path.starts_with("/etc"))
    {
        return Ok(false);
    }
    let mut etc_of_lower = None;
    for lower in lowers {
        match std::fs::symlink_metadata(lower.join("etc")) {
            Ok(meta) if meta.is_dir() => {
                etc_of_lower = Some(meta);
                break;
            }
            Ok(_) => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        }
    }
    let etc = upper.join("etc");
    std::fs::create_dir(&etc)?;
    if let Some(meta) = etc_of_lower {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        std::os::unix::fs::chown(&etc, Some(meta.uid()), Some(meta.gid()))?;
        std::fs::set_permissions(&etc, std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    }
    write_name_files(upper, config)?;
    Ok(true)
}

/// `/etc/hosts` as docker writes it: loopback names, the sandbox's own address and
/// hostname, then the extra entries in order.
fn hosts(config: &BootConfig) -> String {
    let own = config
        .net
        .as_ref()
        .map_or(OWN_ADDRESS_WITHOUT_NETWORK.to_owned(), |n| {
            n.address.to_string()
        });
    let mut text = format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{own}\t{}\n",
        config.hostname
    );
    for entry in &config.hosts {
        text.push_str(&format!("{}\t{}\n", entry.address, entry.name));
    }
    text
}

/// Writes `etc/name` by a temporary file and a rename (mode 0644).
fn replace(etc: &Path, name: &str, text: &str) -> io::Result<()> {
    let tmp = etc.join(format!(".{name}.kiln"));
    std::fs::write(&tmp, text)?;
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    std::fs::rename(&tmp, etc.join(name))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use kiln_protocol::{HostEntry, NetConfig};

    use super::*;

    fn read(root: &Path, name: &str) -> String {
        std::fs::read_to_string(root.join("etc").join(name)).unwrap()
    }

    #[test]
    fn hosts_name_the_sandbox_and_the_extra_entries() {
        let dir = tempfile::tempdir().unwrap();
        let config = BootConfig {
            hostname: "web1".into(),
            net: Some(NetConfig {
                address: Ipv4Addr::new(10, 0, 2, 15),
                prefix_len: 24,
                gateway: None,
                dns: Some(Ipv4Addr::new(10, 0, 2, 3)),
            }),
            hosts: vec![HostEntry {
                name: "db".into(),
                address: "10.9.8.7".parse().unwrap(),
            }],
            ..BootConfig::default()
        };
        write_name_files(dir.path(), &config).unwrap();
        assert_eq!(read(dir.path(), "hostname"), "web1\n");
        assert_eq!(
            read(dir.path(), "hosts"),
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
             10.0.2.15\tweb1\n10.9.8.7\tdb\n"
        );
        assert_eq!(read(dir.path(), "resolv.conf"), "nameserver 10.0.2.3\n");
    }

    #[test]
    fn dns_servers_replace_the_networks_and_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::os::unix::fs::symlink("/run/elsewhere", dir.path().join("etc/resolv.conf")).unwrap();
        let config = BootConfig {
            dns: vec!["1.1.1.1".parse().unwrap(), "9.9.9.9".parse().unwrap()],
            ..BootConfig::default()
        };
        write_name_files(dir.path(), &config).unwrap();
        let path = dir.path().join("etc/resolv.conf");
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
        assert_eq!(
            read(dir.path(), "resolv.conf"),
            "nameserver 1.1.1.1\nnameserver 9.9.9.9\n"
        );
        assert!(read(dir.path(), "hosts").contains("127.0.1.1\tkiln\n"));
    }

    #[test]
    fn a_fresh_upper_gets_etc_with_the_lowers_owner_and_mode() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let (upper, ident, root) = (
            dir.path().join("upper"),
            dir.path().join("ident"),
            dir.path().join("root"),
        );
        for d in [&upper, &ident, &root] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::create_dir(ident.join("etc")).unwrap();
        std::fs::set_permissions(ident.join("etc"), std::fs::Permissions::from_mode(0o750))
            .unwrap();
        std::fs::create_dir(root.join("etc")).unwrap();
        let config = BootConfig {
            hostname: "web1".into(),
            ..BootConfig::default()
        };
        assert!(write_into_fresh_upper(&upper, &[&ident, &root], &config).unwrap());
        let meta = std::fs::metadata(upper.join("etc")).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o750);
        let owner = std::fs::metadata(&ident).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (owner.uid(), owner.gid()));
        assert_eq!(read(&upper, "hostname"), "web1\n");
    }

    #[test]
    fn a_fresh_upper_is_left_alone_when_etc_is_not_a_plain_directory_of_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let (upper, root) = (dir.path().join("upper"), dir.path().join("root"));
        std::fs::create_dir(&upper).unwrap();
        std::fs::create_dir(&root).unwrap();
        std::os::unix::fs::symlink("usr/etc", root.join("etc")).unwrap();
        let config = BootConfig::default();
        assert!(!write_into_fresh_upper(&upper, &[&root], &config).unwrap());

        std::fs::remove_file(root.join("etc")).unwrap();
        std::fs::create_dir(root.join("etc")).unwrap();
        let config = BootConfig {
            tmpfs: vec![kiln_protocol::TmpfsMount {
                path: "/etc/app".into(),
                mode: 0o755,
                size_bytes: None,
            }],
            ..BootConfig::default()
        };
        assert!(!write_into_fresh_upper(&upper, &[&root], &config).unwrap());
        assert!(!upper.join("etc").exists());
    }

    #[test]
    fn no_nameserver_no_resolv_conf() {
        let dir = tempfile::tempdir().unwrap();
        write_name_files(dir.path(), &BootConfig::default()).unwrap();
        assert!(!dir.path().join("etc/resolv.conf").exists());
    }
}
