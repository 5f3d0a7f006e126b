//! The pod's network enforcement with the real kernel pieces, no cluster: the pod's
//! network namespace (`ip netns`) joined by a veth pair to a second namespace playing the
//! internet on 198.18.0.0/15 (a real HTTP server on 198.18.0.5). The init container's and
//! the sidecar's exact commands come from `kiln kube render --json`; they run as root with
//! only NET_ADMIN in the pod namespace and as the proxy uid with no capabilities; the
//! agent runs as the sandbox uid. Names come from the enforcer's hosts file
//! (/etc/netns/POD/hosts, which `ip netns exec` mounts over /etc/hosts), not the agent's,
//! so the agent resolves them through the enforcer. Only one path differs from the pod:
//! the policy's mount point, replaced by the test's ConfigMap-style directory.
//!
//! Traffic goes only to loopback and the namespaces made here, which are removed even
//! when a test fails. Root only; needs ip, nsenter, setpriv, nft, curl and
//! /usr/bin/python3. The supervisor is the `kiln-supervisor` beside `kiln`.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use kiln_e2e::{kiln_bin, require_root, workspace_root};
use serde_json::Value;

const SANDBOX_UID: &str = "10001";
const PROXY_UID: &str = "10000";
const READ_ONLY: &str = "version: 1\nnetwork_policies:\n  good:\n    endpoints:\n      - host: good.test\n        port: 80\n        protocol: rest\n        access: read-only\n      - host: good.test\n        port: 443\n";
const READ_WRITE: &str = "version: 1\nnetwork_policies:\n  good:\n    endpoints:\n      - host: good.test\n        port: 80\n        protocol: rest\n        access: read-write\n";
/// A TLS server on 198.18.0.5:443 with a self-signed certificate made in `dir`.
const TLS_SERVER: &str = "import http.server, ssl\n\
s = http.server.HTTPServer(('198.18.0.5', 443), http.server.SimpleHTTPRequestHandler)\n\
c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n\
c.load_cert_chain('cert.pem', 'key.pem')\n\
s.socket = c.wrap_socket(s.socket, server_side=True)\n\
s.serve_forever()\n";
const POLICY_MOUNT: &str = "/etc/kiln/network-policy/policy.yaml";

fn supervisor_bin() -> PathBuf {
    std::env::var_os("KILN_SUPERVISOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| kiln_bin().with_file_name("kiln-supervisor"))
}

fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"))
}

fn sh(args: &[&str]) -> Output {
    run(Command::new(args[0]).args(&args[1..]))
}

/// The two namespaces, the servers and the enforcer; removed on drop.
struct Lab {
    pod: String,
    internet: String,
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Lab {
    fn new(tag: &str) -> Lab {
        let id = std::process::id();
        let pod = format!("kpod-{tag}-{id}");
        let internet = format!("knet-{tag}-{id}");
        let lab = Lab {
            pod: pod.clone(),
            internet: internet.clone(),
            children: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
        };
        let (veth_pod, veth_net) = (
            format!("vp{id}{}", &tag[..1]),
            format!("vn{id}{}", &tag[..1]),
        );
        for args in [
            vec!["ip", "netns", "add", &pod],
            vec!["ip", "netns", "add", &internet],
            vec![
                "ip", "link", "add", &veth_pod, "type", "veth", "peer", "name", &veth_net,
            ],
            vec!["ip", "link", "set", &veth_pod, "netns", &pod],
            vec!["ip", "link", "set", &veth_net, "netns", &internet],
            vec![
                "ip",
                "-n",
                &pod,
                "addr",
                "add",
                "198.18.0.2/15",
                "dev",
                &veth_pod,
            ],
            vec!["ip", "-n", &pod, "link", "set", &veth_pod, "up"],
            vec!["ip", "-n", &pod, "link", "set", "lo", "up"],
            vec![
                "ip",
                "-n",
                &pod,
                "route",
                "add",
                "default",
                "via",
                "198.18.0.1",
            ],
            vec![
                "ip",
                "-n",
                &internet,
                "addr",
                "add",
                "198.18.0.1/15",
                "dev",
                &veth_net,
            ],
            vec![
                "ip",
                "-n",
                &internet,
                "addr",
                "add",
                "198.18.0.5/15",
                "dev",
                &veth_net,
            ],
            vec!["ip", "-n", &internet, "link", "set", &veth_net, "up"],
            vec!["ip", "-n", &internet, "link", "set", "lo", "up"],
            // Let every gid open ICMP datagram sockets, so a drop is the rules' doing.
            vec![
                "ip",
                "netns",
                "exec",
                &pod,
                "sysctl",
                "-qw",
                "net.ipv4.ping_group_range=0 2147483647",
            ],
        ] {
            let output = sh(&args);
            assert!(
                output.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let etc = Path::new("/etc/netns").join(&pod);
        fs::create_dir_all(&etc).unwrap();
        fs::write(
            etc.join("hosts"),
            "127.0.0.1 localhost\n198.18.0.5 good.test bad.test\n",
        )
        .unwrap();
        // Nothing serves DNS there: names outside the hosts file fail, inside our namespaces.
        fs::write(etc.join("resolv.conf"), "nameserver 198.18.0.53\n").unwrap();
        lab
    }

    /// HTTP on 198.18.0.5:80 and HTTPS on 198.18.0.5:443 (python's http.server, which
    /// answers POST with 501: what matters is that the request reached it).
    fn start_servers(&mut self) {
        let dir = self.dir.path();
        let out = run(Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=good.test",
            ])
            .args(["-keyout", "key.pem", "-out", "cert.pem"])
            .current_dir(dir));
        assert!(
            out.status.success(),
            "openssl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let python = |args: &[&str]| {
            Command::new("ip")
                .args(["netns", "exec", &self.internet, "/usr/bin/python3"])
                .args(args)
                .current_dir(dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        };
        let http = python(&["-m", "http.server", "--bind", "198.18.0.5", "80"]);
        let https = python(&["-c", TLS_SERVER]);
        self.children.extend([http, https]);
        for url in ["http://198.18.0.5/", "https://198.18.0.5/"] {
            let ready = (0..100).any(|_| {
                let out = sh(&[
                    "ip",
                    "netns",
                    "exec",
                    &self.internet,
                    "curl",
                    "-sk",
                    "-o",
                    "/dev/null",
                    url,
                ]);
                out.status.success() || {
                    std::thread::sleep(Duration::from_millis(100));
                    false
                }
            });
            assert!(ready, "{url} did not start");
        }
    }

    /// A kubelet-style ConfigMap volume: `policy.yaml -> ..data/policy.yaml`, `..data`
    /// a symlink to a version directory, swapped by rename.
    fn policy_dir(&self) -> PathBuf {
        self.dir.path().join("configmap")
    }

    fn publish_policy(&self, version: u32, text: &str) {
        let dir = self.policy_dir();
        fs::create_dir_all(&dir).unwrap();
        let data = format!("..v{version}");
        fs::create_dir(dir.join(&data)).unwrap();
        fs::write(dir.join(&data).join("policy.yaml"), text).unwrap();
        let tmp = dir.join("..data_tmp");
        symlink(&data, &tmp).unwrap();
        fs::rename(&tmp, dir.join("..data")).unwrap();
        if !dir.join("policy.yaml").exists() {
            symlink("..data/policy.yaml", dir.join("policy.yaml")).unwrap();
        }
    }

    /// An agent command in the pod namespace as the sandbox uid, with the host's
    /// /etc/hosts (which lacks the test names) and no capabilities.
    fn agent(&self, args: &[&str]) -> Output {
        run(Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.pod))
            .args([
                "setpriv",
                "--reuid",
                SANDBOX_UID,
                "--regid",
                SANDBOX_UID,
                "--clear-groups",
                "--bounding-set",
                "-all",
                "--no-new-privs",
            ])
            .args(args))
    }

    fn curl(&self, extra: &[&str]) -> (i32, String) {
        let mut args = vec!["curl", "-sS", "-m", "10", "-w", "\n%{http_code}"];
        args.extend(extra);
        let out = self.agent(&args);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// The enforcer's messages and decisions so far, for failure messages.
    fn logs(&self) -> String {
        let mut text = String::new();
        for name in ["network.out", "network.err", "agent.out", "agent.err"] {
            if let Ok(t) = fs::read_to_string(self.dir.path().join(name)) {
                text.push_str(&format!("--- {name}\n{t}"));
            }
        }
        text
    }

    fn python(&self, code: &str) -> String {
        let out = self.agent(&["/usr/bin/python3", "-c", code]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in [&self.pod, &self.internet] {
            let pids = sh(&["ip", "netns", "pids", ns]);
            for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                let _ = sh(&["kill", "-9", pid]);
            }
            let _ = sh(&["ip", "netns", "del", ns]);
        }
        let _ = fs::remove_dir_all(Path::new("/etc/netns").join(&self.pod));
    }
}

/// The rendered objects for `topology`, with the policy from a ConfigMap.
fn rendered(topology: &str) -> Vec<Value> {
    let out = run(Command::new(kiln_bin()).args([
        "--json",
        "kube",
        "render",
        "--image",
        "agent:1",
        "--name",
        "demo",
        "--namespace",
        "team-a",
        "--supervisor-image",
        "sup:1",
        "--topology",
        topology,
        "--policy-configmap",
        "team-policy",
        "--uid",
        SANDBOX_UID,
        "--",
        "sh",
    ]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pod: Value = serde_json::from_slice(&out.stdout).unwrap();
    let spec = &pod["spec"];
    let mut containers: Vec<Value> = spec["initContainers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    containers.extend(spec["containers"].as_array().cloned().unwrap_or_default());
    containers
}

/// A container's command, the image's supervisor replaced by the built one and the
/// policy's mount point by the lab's directory.
fn command_of(containers: &[Value], name: &str, lab: &Lab) -> Vec<String> {
    let container = containers
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"));
    container["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .map(|arg| match arg {
            "/kiln-supervisor" | "/kiln/bin/kiln-supervisor" => {
                supervisor_bin().display().to_string()
            }
            POLICY_MOUNT => lab.policy_dir().join("policy.yaml").display().to_string(),
            other => other.to_owned(),
        })
        .collect()
}

fn wait_listening(lab: &Lab) {
    for _ in 0..100 {
        let out = sh(&[
            "ip",
            "netns",
            "exec",
            &lab.pod,
            "sh",
            "-c",
            "grep -q ':3A99 00000000:0000 0A' /proc/net/tcp",
        ]);
        if out.status.success() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the enforcer does not listen");
}

/// The flows every topology must get the same answer for.
fn check_flows(lab: &Lab) {
    let (code, out) = lab.curl(&["http://good.test/"]);
    assert!(
        code == 0 && out.ends_with("\n200"),
        "GET good.test: {code} {out}"
    );
    let (code, out) = lab.curl(&["-X", "POST", "http://good.test/"]);
    assert!(
        out.ends_with("\n403") && out.contains("kiln: POST / denied by the sandbox network policy"),
        "POST: {code} {out}\n{}",
        lab.logs()
    );
    // A denied name: NXDOMAIN, not a timeout.
    let out = lab.python("import socket\ntry:\n socket.getaddrinfo('bad.test', 80); print('resolved')\nexcept socket.gaierror as e: print('gaierror', e.errno)");
    assert!(out.contains("gaierror"), "bad.test: {out}");
    // The allowed name's address carrying the denied name's Host: reset.
    let (code, _) = lab.curl(&["-H", "Host: bad.test", "http://good.test/"]);
    assert_eq!(code, 56, "Host: bad.test");
    // TLS: the allowed name's SNI passes; the denied name's SNI to the same address is
    // reset, though its address is the allowed name's.
    let (code, out) = lab.curl(&["-k", "https://good.test/"]);
    assert!(
        code == 0 && out.ends_with("\n200"),
        "TLS good.test: {code} {out}"
    );
    let (code, _) = lab.curl(&[
        "-k",
        "--resolve",
        "bad.test:443:198.18.0.5",
        "https://bad.test/",
    ]);
    assert!(code == 35 || code == 56, "TLS with SNI bad.test: {code}");
    // A port no entry lists: reset at once.
    let (code, _) = lab.curl(&["http://good.test:8080/"]);
    assert!(code == 7 || code == 56, "port 8080: {code}");
    // UDP other than DNS, and ICMP, are dropped for the agent.
    let out = lab.python("import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ntry:\n s.sendto(b'x',('198.18.0.5',9999)); print('sent')\nexcept OSError as e: print('refused', e.errno)");
    assert!(out.contains("refused 1"), "UDP: {out}");
    let out = lab.python("import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM,socket.IPPROTO_ICMP)\ntry:\n s.sendto(b'\\x08\\0\\0\\0\\0\\0\\0\\0',('198.18.0.5',0)); print('sent')\nexcept OSError as e: print('refused', e.errno)");
    assert!(out.contains("refused 1"), "ICMP: {out}");
    // The agent cannot remove the rules.
    let out = lab.agent(&["nft", "delete", "table", "inet", "kiln"]);
    assert!(!out.status.success());
    // The kernel holds exactly the rules docs/kubernetes.md shows.
    let rules = sh(&["ip", "netns", "exec", &lab.pod, "nft", "list", "ruleset"]);
    let docs = fs::read_to_string(workspace_root().join("docs/kubernetes.md")).unwrap();
    let shown = docs
        .split("<!-- kiln:rules -->\n```\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the rules in docs/kubernetes.md");
    assert_eq!(String::from_utf8_lossy(&rules.stdout), shown);
}

fn check_hot_reload(lab: &Lab, log: &Path) {
    lab.publish_policy(2, READ_WRITE);
    std::thread::sleep(Duration::from_secs(2));
    let (_, out) = lab.curl(&["-X", "POST", "http://good.test/"]);
    assert!(
        out.ends_with("\n501"),
        "POST after the read-write update reaches the server: {out}"
    );
    lab.publish_policy(
        3,
        "version: 1\nnetwork_policies:\n  good:\n    endpoints:\n      - { hots: good.test }\n",
    );
    std::thread::sleep(Duration::from_secs(2));
    let (_, out) = lab.curl(&["-X", "POST", "http://good.test/"]);
    assert!(
        out.ends_with("\n501"),
        "the old policy stays after an invalid update: {out}"
    );
    let text = fs::read_to_string(log).unwrap();
    assert!(
        text.contains("policy update refused") && text.contains("unknown field `hots`"),
        "{text}"
    );
}

fn decision_lines(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
#[ignore = "needs root: network namespaces and nftables"]
fn sidecar_topology_enforces_the_policy() {
    require_root();
    let mut lab = Lab::new("s");
    lab.start_servers();
    lab.publish_policy(1, READ_ONLY);
    let containers = rendered("sidecar");

    // network-init: root with NET_ADMIN only, once.
    let init = command_of(&containers, "network-init", &lab);
    let out = run(Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.pod,
            "setpriv",
            "--bounding-set",
            "-all,+net_admin",
            "--inh-caps",
            "-all",
        ])
        .args(&init)
        .env("SANDBOX_UID", SANDBOX_UID)
        .env("SANDBOX_GID", SANDBOX_UID));
    assert!(
        out.status.success(),
        "{init:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // network: the proxy uid, no capabilities.
    let sidecar = command_of(&containers, "network", &lab);
    let stdout = lab.dir.path().join("network.out");
    let stderr = lab.dir.path().join("network.err");
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.pod,
            "setpriv",
            "--reuid",
            PROXY_UID,
            "--regid",
            PROXY_UID,
            "--clear-groups",
            "--bounding-set",
            "-all",
        ])
        .args(&sidecar)
        .stdout(fs::File::create(&stdout).unwrap())
        .stderr(fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    lab.children.push(child);
    wait_listening(&lab);

    check_flows(&lab);
    let records = decision_lines(&stdout);
    assert!(
        records.iter().any(|r| r["protocol"] == "http"
            && r["method"] == "POST"
            && r["decision"] == "deny"
            && r["sandbox"] == "demo"),
        "{records:?}"
    );
    assert!(
        records.iter().any(|r| r["protocol"] == "dns"
            && r["names"][0] == "bad.test"
            && r["decision"] == "deny"),
        "{records:?}"
    );
    check_hot_reload(&lab, &stderr);
}

#[test]
#[ignore = "needs root: network namespaces and nftables"]
fn combined_topology_enforces_the_same_policy() {
    require_root();
    let mut lab = Lab::new("c");
    lab.start_servers();
    lab.publish_policy(1, READ_ONLY);
    let containers = rendered("combined");
    let agent = command_of(&containers, "agent", &lab);
    assert!(agent.contains(&"--proxy-uid".to_owned()), "{agent:?}");
    // The full-mode supervisor as the container's root with the rendered capabilities;
    // it installs the rules, starts the enforcer as the proxy uid and runs a workload
    // that stays until the test is done.
    let stdout = lab.dir.path().join("agent.out");
    let stderr = lab.dir.path().join("agent.err");
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.pod,
            "setpriv",
            "--bounding-set",
            "-all,+chown,+dac_override,+net_admin,+setgid,+setpcap,+setuid",
            "--inh-caps",
            "-all",
        ])
        .args(&agent)
        .args(["sleep", "120"])
        .env("SANDBOX_UID", SANDBOX_UID)
        .env("SANDBOX_GID", SANDBOX_UID)
        .current_dir("/")
        .stdout(fs::File::create(&stdout).unwrap())
        .stderr(fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    lab.children.push(child);
    wait_listening(&lab);
    // The enforcer runs as the proxy uid, not as root.
    let ps = sh(&["ps", "-eo", "uid=,args="]);
    let ps = String::from_utf8_lossy(&ps.stdout);
    assert!(
        ps.lines()
            .any(|l| l.trim_start().starts_with(PROXY_UID) && l.contains("--mode network ")),
        "{ps}"
    );

    check_flows(&lab);
    let records = decision_lines(&stdout);
    assert!(
        records
            .iter()
            .any(|r| r["protocol"] == "http" && r["method"] == "POST" && r["decision"] == "deny"),
        "{records:?}"
    );
    check_hot_reload(&lab, &stderr);
}
