//! The sandbox's name files, written at boot from the boot configuration: `/etc/hostname`,
//! `/etc/hosts` (localhost, the sandbox's own hostname and the `kiln.host=` entries) and
//! `/etc/resolv.conf` (the `kiln.dns=` servers, else the network's). They go into the
//! overlay root, so they land in this sandbox's upper and never in the shared image.
//!
//! Each file is written to a temporary name in /etc and renamed over the old one, so an
//! image's symlink there (to a systemd-resolved stub, say) is replaced, not followed.

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
    fn no_nameserver_no_resolv_conf() {
        let dir = tempfile::tempdir().unwrap();
        write_name_files(dir.path(), &BootConfig::default()).unwrap();
        assert!(!dir.path().join("etc/resolv.conf").exists());
    }
}
