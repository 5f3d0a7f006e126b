//! kiln's network endpoint with real parts: kiln runs inside a network namespace that
//! plays the host, joined by a veth pair to one that plays the internet on 198.18.0.0/15
//! (the benchmarking range), where real HTTP servers answer, including at a private and a
//! metadata-style address. Names come from the hosts file `ip netns exec` mounts for the
//! host namespace. No traffic leaves the namespaces the test makes.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use kiln_e2e::{demo_image, describe, qemu_left_after, require_root, text, KilnRoot, KilnServer};

/// The host namespace's address on the veth pair, and the internet's.
const HOST_ADDR: &str = "198.18.0.1";
const INTERNET_ADDR: &str = "198.18.0.2";
/// The internet's web server, by name in the hosts file.
const WEB_ADDR: &str = "198.18.5.5";
/// Simulated inside the internet namespace: a private and a metadata-style address.
const PRIVATE_ADDR: &str = "10.9.0.5";
const METADATA_ADDR: &str = "169.254.169.254";
/// The host's own service, on every address of the host namespace (loopback included).
const HOST_PORT: u16 = 8080;
/// The internet's HTTP/1.1 (keep-alive) server.
const KEEP_ALIVE_PORT: u16 = 8081;
/// The internet's TLS server.
const TLS_PORT: u16 = 8443;

/// The two namespaces and their servers; deleting the namespaces on drop, even when the
/// test failed, ends everything in them.
struct Network {
    host: String,
    internet: String,
    servers: Vec<Child>,
    dir: tempfile::TempDir,
}

fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        output.status.success(),
        "ip {args:?}: {}",
        describe(&output)
    );
}

impl Network {
    fn new() -> Network {
        // Unique per test, as tests of one binary run at once.
        static NETWORKS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let count = NETWORKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!("{}x{count}", std::process::id());
        let mut network = Network {
            host: format!("kiln-host-{tag}"),
            internet: format!("kiln-net-{tag}"),
            servers: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
        };
        // The hosts file and resolver configuration `ip netns exec` mounts over /etc for
        // the host namespace; the resolver is loopback, where nothing answers, so a name
        // not in the hosts file fails at once.
        let etc = network.etc();
        fs::create_dir_all(&etc).unwrap();
        fs::write(
            etc.join("hosts"),
            format!(
                "127.0.0.1 localhost\n{WEB_ADDR} web.test\n{PRIVATE_ADDR} private.test\n\
                 {WEB_ADDR} other.test\n{WEB_ADDR} a.wild.test\n{WEB_ADDR} deny.test\n\
                 {WEB_ADDR} audit.test\n"
            ),
        )
        .unwrap();
        fs::write(etc.join("resolv.conf"), "nameserver 127.0.0.1\n").unwrap();

        let (host, internet) = (network.host.clone(), network.internet.clone());
        ip(&["netns", "add", &host]);
        ip(&["netns", "add", &internet]);
        let (veth_host, veth_net) = (format!("kh{tag}"), format!("kn{tag}"));
        ip(&[
            "link", "add", &veth_host, "netns", &host, "type", "veth", "peer", "name", &veth_net,
            "netns", &internet,
        ]);
        let in_ns = |ns: &str, args: &[&str]| {
            let mut all = vec!["-n", ns];
            all.extend_from_slice(args);
            ip(&all);
        };
        in_ns(&host, &["link", "set", "lo", "up"]);
        in_ns(&host, &["link", "set", &veth_host, "up"]);
        in_ns(
            &host,
            &["addr", "add", &format!("{HOST_ADDR}/24"), "dev", &veth_host],
        );
        in_ns(&host, &["route", "add", "default", "via", INTERNET_ADDR]);
        in_ns(&internet, &["link", "set", "lo", "up"]);
        in_ns(&internet, &["link", "set", &veth_net, "up"]);
        in_ns(
            &internet,
            &[
                "addr",
                "add",
                &format!("{INTERNET_ADDR}/24"),
                "dev",
                &veth_net,
            ],
        );
        for extra in [WEB_ADDR, PRIVATE_ADDR, METADATA_ADDR] {
            in_ns(
                &internet,
                &["addr", "add", &format!("{extra}/32"), "dev", "lo"],
            );
        }
        in_ns(&internet, &["route", "add", "default", "via", HOST_ADDR]);

        network.serve(&internet, "internet", 80);
        network.serve(&internet, "internet", KEEP_ALIVE_PORT);
        network.serve(&host, "host", HOST_PORT);
        network
    }

    fn etc(&self) -> PathBuf {
        Path::new("/etc/netns").join(&self.host)
    }

    /// A python3 HTTP server in `ns` on every address's `port`, whose index says `body`
    /// (HTTP/1.1 with keep-alive on [`KEEP_ALIVE_PORT`], HTTP/1.0 elsewhere).
    fn serve(&mut self, ns: &str, body: &str, port: u16) {
        let root = self.dir.path().join(body);
        fs::create_dir_all(&root).unwrap();
        fs::write(root.join("index.html"), format!("served-by-{body}\n")).unwrap();
        let server = "import http.server as h, sys\n\
            class Handler(h.SimpleHTTPRequestHandler):\n    \
                protocol_version = sys.argv[3]\n    \
                def __init__(self, *a, **k): super().__init__(*a, directory=sys.argv[1], **k)\n\
            h.ThreadingHTTPServer(('0.0.0.0', int(sys.argv[2])), Handler).serve_forever()";
        let protocol = if port == KEEP_ALIVE_PORT {
            "HTTP/1.1"
        } else {
            "HTTP/1.0"
        };
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-c", server])
            .arg(&root)
            .arg(port.to_string())
            .arg(protocol)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting python3 -m http.server");
        self.servers.push(child);
        self.wait_listening(ns, port, body);
    }

    /// A real TLS server (`openssl s_server -WWW`, a self-signed certificate for
    /// web.test) on every address of the internet's [`TLS_PORT`], serving `/index.html`
    /// that says `served-by-tls`.
    fn serve_tls(&mut self) {
        let root = self.dir.path().join("tls");
        fs::create_dir_all(&root).unwrap();
        fs::write(root.join("index.html"), "served-by-tls\n").unwrap();
        let made = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args([
                "-subj",
                "/CN=web.test",
                "-keyout",
                "key.pem",
                "-out",
                "cert.pem",
            ])
            .current_dir(&root)
            .output()
            .expect("running openssl req");
        assert!(made.status.success(), "{}", describe(&made));
        let port = TLS_PORT.to_string();
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.internet,
                "openssl",
                "s_server",
                // The guest's client, busybox 1.35's wget, sends no signature_algorithms:
                // TLS 1.2 then means SHA-1 signatures, which OpenSSL refuses above level 0.
                "-cipher",
                "DEFAULT:@SECLEVEL=0",
            ])
            .args([
                "-accept", &port, "-cert", "cert.pem", "-key", "key.pem", "-WWW",
            ])
            .current_dir(&root)
            .stdin(Stdio::null())
            .stdout(fs::File::create(root.join("server.log")).unwrap())
            .stderr(fs::File::create(root.join("server.err")).unwrap())
            .spawn()
            .expect("starting openssl s_server");
        self.servers.push(child);
        self.wait_listening(&self.internet.clone(), TLS_PORT, "tls");
    }

    /// Returns once a connection to `port` from inside `ns` succeeds.
    fn wait_listening(&self, ns: &str, port: u16, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let probe =
            format!("import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)");
        while !self.exec(ns, &["python3", "-c", &probe]).status.success() {
            assert!(Instant::now() < deadline, "the {what} server did not start");
            thread::sleep(Duration::from_millis(200));
        }
    }

    fn exec(&self, ns: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .output()
            .expect("running ip netns exec")
    }

    /// `kiln ARGS` of `root`, run inside the host namespace with `stdin` (a file) or none.
    fn kiln(&self, root: &KilnRoot, args: &[&str], stdin: Option<&Path>) -> Output {
        let mut command = self.kiln_command(root, args, stdin);
        kiln_e2e::run_with_timeout(&mut command, kiln_e2e::KILN_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The command `kiln ARGS` of `root` inside the host namespace (`ip netns exec` execs
    /// kiln itself, so the child is kiln).
    fn kiln_command(&self, root: &KilnRoot, args: &[&str], stdin: Option<&Path>) -> Command {
        let inner = root.kiln();
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.host]);
        if let Some(stdin) = stdin {
            // The harness gives commands /dev/null; the shell puts the file in its place.
            command
                .args(["sh", "-c", "exec \"$@\" < \"$KILN_TEST_STDIN\"", "sh"])
                .env("KILN_TEST_STDIN", stdin);
        }
        command
            .arg(inner.get_program())
            .args(inner.get_args())
            .args(args);
        for (key, value) in inner.get_envs() {
            match value {
                Some(value) => command.env(key, value),
                None => command.env_remove(key),
            };
        }
        command
    }

    /// `kiln ARGS` in the host namespace, which must succeed; its stdout.
    fn kiln_ok(&self, root: &KilnRoot, args: &[&str], stdin: Option<&str>) -> String {
        let file = stdin.map(|contents| {
            let file = root.temp_dir().join("stdin");
            fs::write(&file, contents).unwrap();
            file
        });
        let output = self.kiln(root, args, file.as_deref());
        assert!(
            output.status.success(),
            "kiln {args:?}: {}",
            describe(&output)
        );
        text(&output.stdout)
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for server in &mut self.servers {
            let _ = server.kill();
            let _ = server.wait();
        }
        for ns in [&self.host, &self.internet] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = fs::remove_dir_all(self.etc());
    }
}

/// A guest shell function: `fetch HOST PORT` prints the body's last line, or nc's error
/// and how many seconds the attempt took.
const FETCH: &str = r#"fetch() {
  start=$(date +%s)
  out=$(printf 'GET / HTTP/1.0\r\n\r\n' | nc "$1" "$2" 2>&1 | tail -n 1)
  echo "$1:$2 $out ($(( $(date +%s) - start ))s)"
}
"#;

/// The line of `out` about `target`.
fn line<'a>(out: &'a str, target: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(&format!("{target} ")))
        .unwrap_or_else(|| panic!("no line for {target} in:\n{out}"))
}

fn assert_served(out: &str, target: &str, by: &str) {
    let line = line(out, target);
    assert!(line.contains(&format!("served-by-{by}")), "{line}");
}

/// Refused at once: ECONNREFUSED within a second or two, never a hang.
fn assert_refused(out: &str, target: &str) {
    let line = line(out, target);
    assert!(line.contains("Connection refused"), "{line}");
    let seconds: u64 = line
        .rsplit_once('(')
        .and_then(|(_, s)| s.strip_suffix("s)"))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no time in {line}"));
    assert!(seconds <= 2, "refused only after {seconds}s: {line}");
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn the_internet_is_open_and_the_host_and_private_networks_are_not_until_allowed() {
    require_root();
    let network = Network::new();
    let root = KilnRoot::with_guest().quiet();
    let image = demo_image();
    let targets = [
        ("web.test:80", "internet"),
        (&format!("{WEB_ADDR}:80") as &str, "internet"),
        (&format!("host.kiln.internal:{HOST_PORT}"), "host"),
        (&format!("{HOST_ADDR}:{HOST_PORT}"), "host"),
        (&format!("{METADATA_ADDR}:80"), "internet"),
        (&format!("{PRIVATE_ADDR}:80"), "internet"),
        ("private.test:80", "internet"),
    ];
    let script = format!(
        "{FETCH}read line; echo \"stdin: $line\"\n\
         nslookup web.test | grep -q {WEB_ADDR} && echo 'dns: web.test'\n\
         nslookup host.kiln.internal | grep -q 10.0.2.2 && echo 'dns: host'\n\
         {}",
        targets
            .iter()
            .map(|(t, _)| format!("fetch {}\n", t.replace(':', " ")))
            .collect::<String>()
    );

    // The default: the internet by name and address; the host (its loopback and its own
    // address), metadata and private addresses refused at once.
    let out = network.kiln_ok(
        &root,
        &["run", "--rm", "-i", &image, "sh", "-c", &script],
        Some("from-host\n"),
    );
    assert!(out.contains("stdin: from-host\n"), "{out}");
    assert!(
        out.contains("dns: web.test\n") && out.contains("dns: host\n"),
        "{out}"
    );
    let fetched = |out: &str| {
        for (target, by) in &targets[..2] {
            assert_served(out, target, by);
        }
    };
    fetched(&out);
    for (target, _) in &targets[2..] {
        assert_refused(&out, target);
    }

    // Each opened explicitly: the host's loopback by its name, the others by address.
    let allow_loopback = format!("host.kiln.internal:{HOST_PORT}");
    let allow_metadata = format!("{METADATA_ADDR}:80");
    let allow_private = format!("{PRIVATE_ADDR}:80");
    let out = network.kiln_ok(
        &root,
        &[
            "run",
            "--rm",
            "-i",
            "--network-allow-host",
            &allow_loopback,
            "--network-allow-host",
            &allow_metadata,
            "--network-allow-host",
            &allow_private,
            &image,
            "sh",
            "-c",
            &script,
        ],
        Some("again\n"),
    );
    fetched(&out);
    assert_served(&out, &allow_loopback, "host");
    assert_served(&out, &allow_metadata, "internet");
    assert_served(&out, &allow_private, "internet");
    assert_served(&out, "private.test:80", "internet");
    // Opening the host's loopback does not open its other addresses.
    assert_refused(&out, &format!("{HOST_ADDR}:{HOST_PORT}"));

    // A bad value is refused before anything boots, naming the flag and what it takes.
    let args = [
        "run",
        "--rm",
        "--network-allow-host",
        "db.test:5432",
        &image,
    ];
    let output = network.kiln(&root, &args, None);
    assert_eq!(output.status.code(), Some(125), "{}", describe(&output));
    let err = text(&output.stderr);
    assert!(
        err.contains("--network-allow-host") && err.contains("host.kiln.internal:PORT"),
        "{err}"
    );
    drop(network);
    root.assert_nothing_left();
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn forwards_exec_and_volumes_work_and_a_killed_monitor_leaves_nothing() {
    require_root();
    let network = Network::new();
    let root = KilnRoot::with_guest().quiet();
    let volume = root.temp_dir().join("volume");
    fs::create_dir(&volume).unwrap();
    let share = format!("{}:/data", volume.display());
    let forward = "18091:8000";
    let id = network
        .kiln_ok(
            &root,
            &[
                "run",
                "-d",
                "-p",
                forward,
                "-v",
                &share,
                &demo_image(),
                "sh",
                "-c",
                "while true; do echo forwarded | nc -l -p 8000; done",
            ],
            None,
        )
        .trim()
        .to_owned();

    // Exec and the volume: the guest writes, the host reads.
    let write = "echo kept > /data/note; cat /data/note";
    let out = network.kiln_ok(&root, &["exec", &id, "sh", "-c", write], None);
    assert_eq!(out, "kept\n");
    assert_eq!(fs::read_to_string(volume.join("note")).unwrap(), "kept\n");

    // The port forward, from the host namespace's loopback into the guest.
    let client = "import socket,sys\n\
        s = socket.create_connection(('127.0.0.1', 18091), timeout=30)\n\
        s.sendall(b'hello\\n')\n\
        sys.stdout.write(s.recv(100).decode())";
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let output = network.exec(&network.host, &["python3", "-c", client]);
        if text(&output.stdout) == "forwarded\n" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no answer through -p: {}",
            describe(&output)
        );
        thread::sleep(Duration::from_millis(500));
    }

    // The endpoint lives in the monitor: killing it with -9 leaves no QEMU, no process
    // and no socket behind.
    let monitor = root.monitor_pid(&id);
    // SAFETY: kill has no memory-safety preconditions; the pid was just listed.
    unsafe { libc::kill(monitor as libc::pid_t, libc::SIGKILL) };
    assert_eq!(
        qemu_left_after(&root.path(), Duration::from_secs(10)),
        Vec::<u32>::new()
    );
    assert!(root.leftovers_after(Duration::from_secs(10)).is_empty());
    for dir in root.sandbox_dirs() {
        assert!(
            !dir.join("net.sock").exists(),
            "{} kept its socket",
            dir.display()
        );
    }
    let refused = network.exec(
        &network.host,
        &[
            "python3",
            "-c",
            "import socket; socket.create_connection(('127.0.0.1', 18091), timeout=5)",
        ],
    );
    assert!(
        !refused.status.success(),
        "the forward outlived its sandbox"
    );
    network.kiln_ok(&root, &["rm", "-f", &id], None);
    drop(network);
    root.assert_nothing_left();
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn a_foreground_run_killed_with_sigkill_leaves_nothing() {
    require_root();
    let network = Network::new();
    let root = KilnRoot::with_guest().quiet();
    let image = demo_image();
    let args = ["run", "--rm", &image, "sh", "-c", "echo up; sleep 600"];
    let mut kiln = network
        .kiln_command(&root, &args, None)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting kiln");
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(kiln.stdout.take().unwrap()),
        &mut first,
    )
    .unwrap();
    assert_eq!(first, "up\n");
    kiln.kill().unwrap();
    kiln.wait().unwrap();
    assert_eq!(
        qemu_left_after(&root.path(), Duration::from_secs(10)),
        Vec::<u32>::new()
    );
    for dir in root.sandbox_dirs() {
        assert!(
            !dir.join("net.sock").exists(),
            "{} kept its socket",
            dir.display()
        );
    }
    drop(network);
    root.assert_nothing_left();
}

/// The allow-list the policy tests start from.
const POLICY: &str = r#"version: 1
network_policies:
  web:
    endpoints:
      - { host: web.test, port: 80, protocol: rest, access: read-only }
      - { host: web.test, port: 8081, protocol: rest, access: read-only }
      - { host: "*.wild.test", port: 80 }
  guarded:
    endpoints:
      - host: deny.test
        port: 80
        protocol: rest
        access: full
        deny_rules:
          - { method: GET, path: /index.html }
  audited:
    endpoints:
      - { host: audit.test, port: 80, protocol: rest, access: read-only, enforcement: audit }
  tools:
    endpoints:
      - { host: tools.test, port: 443 }
    binaries:
      - { path: /usr/bin/curl }
"#;

/// What replaces it on the running sandbox: other.test in, web.test out.
const RELOADED: &str = r#"version: 1
network_policies:
  other:
    endpoints:
      - { host: other.test, port: 80 }
"#;

/// Guest shell functions: `req NAME PORT METHOD PATH [ADDRESS]` sends one HTTP/1.0
/// request with Host NAME (to ADDRESS if given) and prints the reply's last line, or
/// nc's error; `fetch` as above.
const REQ: &str = r#"req() {
  out=$(printf '%s %s HTTP/1.0\r\nHost: %s\r\nContent-Length: 0\r\n\r\n' "$3" "$4" "$1" | nc "${5:-$1}" "$2" 2>&1 | tail -n 1)
  echo "$3 $1:$2$4 $out"
}
"#;

fn write_policy(root: &KilnRoot, name: &str, text: &str) -> String {
    let path = root.temp_dir().join(name);
    fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// The decision records `kiln logs --network --json ID` prints.
fn decisions(network: &Network, root: &KilnRoot, id: &str) -> Vec<serde_json::Value> {
    network
        .kiln_ok(root, &["logs", "--network", "--json", id], None)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}")))
        .collect()
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn a_policy_decides_each_connection_request_and_name_and_is_replaced_while_running() {
    require_root();
    let network = Network::new();
    // Not quiet: the not-enforced report and the denial lines are what -q silences.
    let root = KilnRoot::with_guest();
    let image = demo_image();
    let policy = write_policy(&root, "policy.yaml", POLICY);
    let allow_host = format!("host.kiln.internal:{HOST_PORT}");
    let output = network.kiln(
        &root,
        &[
            "run",
            "-d",
            "--network-policy",
            &policy,
            "--network-allow-host",
            &allow_host,
            &image,
            "sleep",
            "600",
        ],
        None,
    );
    assert!(output.status.success(), "{}", describe(&output));
    let id = text(&output.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_owned();
    // What kiln parses but cannot enforce is said once, never dropped silently.
    let err = text(&output.stderr);
    assert!(
        err.contains("not enforced by kiln: network_policies.tools.binaries"),
        "{err}"
    );

    let script = format!(
        "{FETCH}{REQ}\
         nslookup web.test >/dev/null 2>&1 && echo 'dns web.test: ok'\n\
         nslookup other.test >/dev/null 2>&1 || echo 'dns other.test: refused'\n\
         nslookup -type=TXT exfil.test 2>&1 | grep -q REFUSED && echo 'dns txt: refused'\n\
         nslookup a.wild.test >/dev/null 2>&1 && nslookup deny.test >/dev/null 2>&1 && nslookup audit.test >/dev/null 2>&1 && echo 'dns rest: ok'\n\
         req web.test 80 GET /\n\
         req web.test 80 POST /\n\
         fetch web.test 9999\n\
         req a.wild.test 80 GET /\n\
         req deny.test 80 GET /index.html\n\
         req deny.test 80 GET /\n\
         req audit.test 80 POST /\n\
         req other.test 80 GET / {WEB_ADDR}\n\
         req web.test 80 GET / {WEB_ADDR}\n\
         fetch host.kiln.internal {HOST_PORT}\n\
         fetch {METADATA_ADDR} 80\n\
         fetch {PRIVATE_ADDR} 80\n\
         printf 'GET /index.html HTTP/1.1\\r\\nHost: web.test\\r\\n\\r\\nPOST / HTTP/1.1\\r\\nHost: web.test\\r\\nContent-Length: 0\\r\\n\\r\\n' | nc web.test {KEEP_ALIVE_PORT} | grep -E 'served-by|kiln:' | sed 's/^/keep-alive: /'\n"
    );
    let out = network.kiln_ok(&root, &["exec", &id, "sh", "-c", &script], None);
    let has = |needle: &str| assert!(out.contains(needle), "no {needle:?} in:\n{out}");
    has("dns web.test: ok\n");
    has("dns other.test: refused\n");
    has("dns txt: refused\n");
    has("dns rest: ok\n");
    has("GET web.test:80/ served-by-internet\n");
    // Read-only REST: the POST gets kiln's 403, naming kiln, the rule set and the reason.
    let post = line(&out, "POST web.test:80/");
    assert!(
        post.contains("kiln: request denied by network policy sha256:")
            && post.contains("POST / is not permitted by network_policies.web.endpoints[0]"),
        "{post}"
    );
    assert_refused(&out, "web.test:9999");
    // A Host-less request names nothing: only address-matched endpoints could take it.
    assert!(line(&out, "GET a.wild.test:80/").contains("served-by-internet"));
    let denied = line(&out, "GET deny.test:80/index.html");
    assert!(denied.contains("deny_rules[0]"), "{denied}");
    assert!(line(&out, "GET deny.test:80/").contains("served-by-internet"));
    // Audit: the POST reaches the server (which does not implement it).
    let audited = line(&out, "POST audit.test:80/");
    assert!(!audited.contains("kiln:"), "{audited}");
    // Straight to the address: the Host decides, web.test was pinned there, other.test not.
    let other = line(&out, "GET other.test:80/");
    assert!(other.contains("kiln: request denied"), "{other}");
    for by_name_and_address in out.lines().filter(|l| l.starts_with("GET web.test:80/ ")) {
        assert!(by_name_and_address.contains("served-by-internet"), "{out}");
    }
    assert_served(&out, &format!("host.kiln.internal:{HOST_PORT}"), "host");
    assert_refused(&out, &format!("{METADATA_ADDR}:80"));
    assert_refused(&out, &format!("{PRIVATE_ADDR}:80"));
    // Keep-alive: the first request is served, the second on the same connection denied.
    has("keep-alive: served-by-internet");
    has("keep-alive: kiln: request denied");

    // Every decision is logged: the 403s, the DNS refusals, the audit, ended flows' bytes.
    let records = decisions(&network, &root, &id);
    let any = |what: &str, test: &dyn Fn(&serde_json::Value) -> bool| {
        assert!(
            records.iter().any(test),
            "no {what} in {}",
            serde_json::to_string_pretty(&records).unwrap()
        )
    };
    any("POST denial", &|r| {
        r["decision"] == "deny" && r["method"] == "POST" && r["host"] == "web.test"
    });
    any("NXDOMAIN for other.test", &|r| {
        r["protocol"] == "dns" && r["names"][0] == "other.test" && r["decision"] == "deny"
    });
    any("TXT refusal", &|r| {
        r["query_type"] == "TXT" && r["decision"] == "deny"
    });
    any("audit", &|r| {
        r["decision"] == "audit" && r["host"] == "audit.test"
    });
    any("ended flow", &|r| {
        r["decision"] == "allow" && r["bytes_down"].as_u64().is_some_and(|n| n > 0)
    });
    let text_log = network.kiln_ok(&root, &["logs", "--network", &id], None);
    assert!(
        text_log.contains(" deny http ") && text_log.contains("POST /"),
        "{text_log}"
    );

    // A policy that does not validate is refused, naming the file; the old one stays.
    let bad = write_policy(&root, "bad.yaml", "version: 1\nnetwork_policies:\n  x:\n    endpoints:\n      - { host: a.test, port: 80, access: read-only, rules: [] }\n");
    let output = network.kiln(&root, &["policy", "set", &id, &bad], None);
    assert!(!output.status.success(), "{}", describe(&output));
    assert!(
        text(&output.stderr).contains("bad.yaml"),
        "{}",
        describe(&output)
    );
    let shown = network.kiln_ok(&root, &["policy", "show", &id], None);
    assert!(shown.contains("*.wild.test"), "{shown}");

    // Replaced on the running sandbox: new connections decide by the new policy.
    let reloaded = write_policy(&root, "reloaded.yaml", RELOADED);
    let digest = network.kiln_ok(&root, &["policy", "set", &id, &reloaded], None);
    assert!(digest.starts_with("sha256:"), "{digest}");
    thread::sleep(Duration::from_secs(1));
    let script = format!(
        "{REQ}nslookup web.test >/dev/null 2>&1 || echo 'dns web.test: refused'\n\
         req other.test 80 GET /\n"
    );
    let out = network.kiln_ok(&root, &["exec", &id, "sh", "-c", &script], None);
    assert!(out.contains("dns web.test: refused\n"), "{out}");
    assert!(line(&out, "GET other.test:80/").contains("served-by-internet"));
    let shown = network.kiln_ok(&root, &["policy", "show", &id], None);
    assert!(
        shown.contains(digest.trim()) && shown.contains("other.test"),
        "{shown}"
    );

    network.kiln_ok(&root, &["rm", "-f", &id], None);
    assert_eq!(
        qemu_left_after(&root.path(), Duration::from_secs(10)),
        Vec::<u32>::new()
    );

    // A foreground run prints one line per denial on stderr.
    let output = network.kiln(
        &root,
        &[
            "run",
            "--rm",
            "--network-policy",
            &policy,
            &image,
            "sh",
            "-c",
            "nc web.test 9999 </dev/null; true",
        ],
        None,
    );
    assert!(output.status.success(), "{}", describe(&output));
    let err = text(&output.stderr);
    assert!(
        err.lines()
            .filter(|l| l.starts_with("kiln: network: ") && l.contains(" deny tcp "))
            .count()
            == 1,
        "{err}"
    );
    drop(network);
    root.assert_nothing_left();
}

/// Allows web.test by name on the TLS port (decided by the ClientHello's SNI) and on
/// port 80 (plain TCP, by the Host or the pinned name).
const TLS_POLICY: &str = r#"version: 1
network_policies:
  web:
    endpoints:
      - { host: web.test, port: 8443 }
      - { host: web.test, port: 80 }
"#;

/// The first line `reader` gives within `limit` (a thread reads it: pipes block).
fn line_within(reader: impl std::io::Read + Send + 'static, limit: Duration) -> Option<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(reader), &mut line);
        let _ = tx.send(line);
    });
    rx.recv_timeout(limit).ok()
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn tls_is_decided_by_its_sni_decisions_are_followed_and_q_silences_denials() {
    require_root();
    let mut network = Network::new();
    network.serve_tls();
    let root = KilnRoot::with_guest();
    let image = demo_image();
    let policy = write_policy(&root, "tls.yaml", TLS_POLICY);
    // other.test is the web server's address in the guest's hosts file only: kiln's
    // resolver never answers it, so nothing but the SNI names the connection.
    let add_host = format!("other.test:{WEB_ADDR}");
    let id = network
        .kiln_ok(
            &root,
            &[
                "-q",
                "run",
                "-d",
                "--network-policy",
                &policy,
                "--add-host",
                &add_host,
                &image,
                "sleep",
                "600",
            ],
            None,
        )
        .trim()
        .to_owned();

    // Following the decisions from now on: each new one arrives while the sandbox runs.
    let mut follow = network
        .kiln_command(&root, &["logs", "--network", "-f", &id], None)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting kiln logs --network -f");
    let followed = follow.stdout.take().unwrap();

    let script = format!(
        "wget --no-check-certificate -qO- https://web.test:{TLS_PORT}/index.html 2>&1 | sed 's/^/sni web.test: /'\n\
         wget --no-check-certificate -qO- https://other.test:{TLS_PORT}/index.html 2>&1 | sed 's/^/sni other.test: /'\n"
    );
    let out = network.kiln_ok(&root, &["exec", &id, "sh", "-c", &script], None);
    let server_log = fs::read_to_string(network.dir.path().join("tls/server.log"))
        .unwrap_or_default()
        + &fs::read_to_string(network.dir.path().join("tls/server.err")).unwrap_or_default();
    assert!(
        out.contains("sni web.test: served-by-tls\n"),
        "{out}\nserver: {server_log}"
    );
    let other: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("sni other.test: "))
        .collect();
    assert!(
        !other.is_empty() && other.iter().all(|l| !l.contains("served-by")),
        "{out}"
    );
    let records = decisions(&network, &root, &id);
    let found = |sni: &str, verdict: &str| {
        records
            .iter()
            .any(|r| r["protocol"] == "tls" && r["sni"] == sni && r["decision"] == verdict)
    };
    let all = serde_json::to_string_pretty(&records).unwrap();
    assert!(found("web.test", "allow"), "{all}");
    // Denied by its SNI although the address was learnt from the allowed name.
    assert!(found("other.test", "deny"), "{all}");

    // The follower printed the first decision of the exec (web.test's DNS query) and
    // ends once the sandbox stops.
    let first = line_within(followed, Duration::from_secs(10)).unwrap_or_default();
    assert!(first.contains("web.test"), "followed: {first:?}");
    network.kiln_ok(&root, &["rm", "-f", &id], None);
    let deadline = Instant::now() + Duration::from_secs(10);
    while follow.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "kiln logs -f outlived its sandbox"
        );
        thread::sleep(Duration::from_millis(100));
    }

    // -q: a foreground run's denials are in its log, not on its stderr.
    let output = network.kiln(
        &root,
        &[
            "-q",
            "run",
            "--rm",
            "--network-policy",
            &policy,
            &image,
            "sh",
            "-c",
            "nc web.test 9999 </dev/null; true",
        ],
        None,
    );
    assert!(output.status.success(), "{}", describe(&output));
    let err = text(&output.stderr);
    assert!(!err.contains("kiln: network:"), "{err}");
    drop(network);
    root.assert_nothing_left();
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn the_driver_api_takes_a_policy_and_watches_its_decisions() {
    use kiln_server::proto::{event::Kind, CreateRequest, StartRequest, WatchRequest};
    require_root();
    let network = Network::new();
    let root = KilnRoot::with_guest();
    // The server runs in the host namespace, so its sandboxes' traffic stays in ours.
    let mut server = KilnServer::start_with(&root, network.kiln_command(&root, &[], None), &[]);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut client = server.client().await;
        let request = |policy: &str| CreateRequest {
            image: demo_image(),
            name: "policed".into(),
            command: vec!["sleep".into(), "600".into()],
            network_policy: policy.to_owned(),
            ..CreateRequest::default()
        };
        // A policy that does not validate is refused, naming the field and the problem.
        let refused = client
            .create(request("version: 1\nnetwork_policies:\n  x:\n    endpoints:\n      - { host: a.test, port: 80, access: read-only, rules: [] }\n"))
            .await
            .expect_err("an invalid policy is refused");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains("network_policy"), "{refused:?}");

        let created = client.create(request(POLICY)).await.unwrap().into_inner();
        let mut events = client
            .watch(WatchRequest {
                sandbox: created.id.clone(),
                initial_state: false,
            })
            .await
            .unwrap()
            .into_inner();
        client
            .start(StartRequest {
                sandbox: created.id.clone(),
            })
            .await
            .unwrap();
        let script = format!("{REQ}req web.test 80 GET /\nreq web.test 80 POST /\n");
        let out = network.kiln_ok(&root, &["exec", &created.id, "sh", "-c", &script], None);
        assert!(
            line(&out, "GET web.test:80/").contains("served-by-internet"),
            "{out}"
        );
        assert!(line(&out, "POST web.test:80/").contains("kiln: request denied"), "{out}");

        // The POST's denial arrives as a Watch event carrying its decision record.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let event = tokio::time::timeout_at(deadline, events.message())
                .await
                .expect("the POST's denial as a Watch event in time")
                .expect("the watch stream")
                .expect("the watch stream ended");
            let Some(Kind::NetworkDecision(decision)) = event.kind else {
                continue;
            };
            let record: serde_json::Value = serde_json::from_str(&decision.record).unwrap();
            assert_eq!(record["decision"], decision.decision.as_str(), "{record}");
            if decision.decision == "deny" && record["method"] == "POST" {
                assert_eq!(record["host"], "web.test", "{record}");
                assert_eq!(record["sandbox"], created.id.as_str(), "{record}");
                break;
            }
        }
    });
    server.terminate();
    network.kiln_ok(&root, &["rm", "-f", "policed"], None);
    drop(network);
    root.assert_nothing_left();
}
