//! kiln-podnet: network enforcement inside a Kubernetes sandbox pod.
//!
//! A pod has no host-side endpoint like the VM path's: the workload's packets leave the
//! pod's own network namespace. So the enforcement moves into the pod, in two parts:
//!
//! - [`RuleSet`]: nftables rules in the pod's network namespace, installed once by a
//!   process holding CAP_NET_ADMIN (the `network-init` init container, or the combined
//!   topology's supervisor before it drops privileges). Every TCP connection and every
//!   UDP DNS query of any uid but the proxy uid is redirected to the enforcer; every
//!   other packet those uids send is dropped; the proxy uid's own traffic passes.
//! - [`Enforcer`]: the transparent TCP proxy (original destination from the socket) and
//!   the DNS resolver (answers from the pod's /etc/hosts and resolv.conf, every answer
//!   pinned), running as the proxy uid with no capabilities. Every decision is
//!   kiln-policy's, on the same inputs as the VM path, logged as the same JSON line on
//!   standard output; the policy file is reloaded when it changes (a ConfigMap's
//!   atomic symlink swap), and an update that does not validate is refused.
//!
//! docs/kubernetes.md ("Network policy") describes the flow and the rules.

mod dns;
mod enforcer;
mod error;
mod http;
mod limits;
mod proxy;
mod rules;

pub use enforcer::{Enforcer, EnforcerConfig};
pub use error::PodnetError;
pub use limits::{DEFAULT_DNS_PORT, DEFAULT_PROXY_PORT};
pub use rules::{RuleSet, TABLE};

/// Checks a proxy uid against the sandbox uid: equal uids would let the workload's
/// traffic pass the rules as the proxy's, and let it signal or trace the enforcer.
pub fn check_proxy_uid(proxy_uid: u32, sandbox_uid: u32) -> Result<(), PodnetError> {
    if proxy_uid == 0 {
        return Err(PodnetError::ProxyUid {
            uid: 0,
            reason: "root cannot be the proxy uid: root's own traffic would pass the rules; accepted: a non-zero uid other than the sandbox uid".into(),
        });
    }
    if proxy_uid == sandbox_uid {
        return Err(PodnetError::ProxyUid {
            uid: proxy_uid,
            reason: format!(
                "equals the sandbox uid {sandbox_uid}: the workload's traffic would pass the rules as the proxy's; accepted: a non-zero uid other than the sandbox uid"
            ),
        });
    }
    Ok(())
}

/// Whether a TCP socket of this network namespace listens on `port` (from
/// /proc/net/tcp and tcp6), so a starter can wait for the enforcer without connecting
/// to it (a connection would itself be redirected and decided).
pub fn listening(port: u16) -> Result<bool, PodnetError> {
    let wanted = format!(":{port:04X}");
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = match std::fs::read_to_string(table) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(PodnetError::Read {
                    path: table.into(),
                    source,
                })
            }
        };
        // Columns: sl local_address rem_address st ...; st 0A is LISTEN.
        let listens = text.lines().skip(1).any(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            cols.len() > 3 && cols[1].ends_with(&wanted) && cols[3] == "0A"
        });
        if listens {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxy_uid_is_never_the_sandbox_uid_or_root() {
        check_proxy_uid(10000, 10001).unwrap();
        let err = check_proxy_uid(10001, 10001).unwrap_err().to_string();
        assert!(err.contains("equals the sandbox uid 10001"), "{err}");
        let err = check_proxy_uid(0, 10001).unwrap_err().to_string();
        assert!(err.contains("root"), "{err}");
    }

    #[test]
    fn a_listening_socket_is_seen() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(listening(port).unwrap());
        drop(listener);
        assert!(!listening(port).unwrap());
    }
}
