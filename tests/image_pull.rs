//! `kiln pull`, `images`, `inspect`, `rmi`, `prune` against the fixture images: a real
//! `docker-registry` (anonymous and htpasswd), OCI layouts and both archive formats.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine;
use kiln_e2e::{fixtures, require_root, run_with_timeout, KilnRoot, Registry, KILN_TIMEOUT};
use serde_json::Value;

/// `kiln --json inspect REFERENCE`.
fn inspect(root: &KilnRoot, reference: &str) -> Value {
    serde_json::from_str(&root.ok(&["--json", "inspect", reference])).unwrap()
}

/// Where the store keeps the blob `digest`.
fn blob_path(root: &KilnRoot, digest: &str) -> PathBuf {
    let (alg, hex) = digest.split_once(':').unwrap();
    root.path().join("store/blobs").join(alg).join(hex)
}

/// Names in the blob directory other than lock files (temp files, blobs).
fn blob_dir_names(root: &KilnRoot) -> Vec<String> {
    std::fs::read_dir(root.path().join("store/blobs/sha256"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .filter(|n| !n.ends_with(".lock"))
        .collect()
}

fn layer_digests(inspected: &Value) -> Vec<String> {
    inspected["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_owned())
        .collect()
}

fn diff_ids(inspected: &Value) -> Vec<String> {
    inspected["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["diff_id"].as_str().unwrap().to_owned())
        .collect()
}

fn registry_ref(addr: &str, repo_tag: &str) -> String {
    format!("docker://{addr}/{repo_tag}")
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn four_transports_yield_the_same_image() {
    require_root();
    let demo = fixtures().demo();
    let registry = Registry::start(None);
    registry.push(demo, "kiln/demo:latest");
    let env = KilnRoot::without_guest();
    let refs = [
        registry_ref(&registry.addr(), "kiln/demo:latest"),
        format!("oci:{}:{}", demo.oci_gzip.path.display(), demo.oci_gzip.tag),
        format!(
            "oci-archive:{}:{}",
            demo.oci_archive.path.display(),
            demo.oci_archive.tag
        ),
        format!(
            "docker-archive:{}:{}",
            demo.docker_archive.path.display(),
            demo.docker_archive.reference
        ),
    ];
    let inspected: Vec<Value> = refs
        .iter()
        .map(|r| {
            env.ok(&["pull", r]);
            inspect(&env, r)
        })
        .collect();
    for (r, i) in refs.iter().zip(&inspected) {
        assert_eq!(
            i["config_digest"],
            demo.oci_gzip.config_digest.as_str(),
            "{r}"
        );
        assert_eq!(i["platform"], "linux/amd64", "{r}");
        assert_eq!(diff_ids(i), diff_ids(&inspected[0]), "{r}");
        assert_eq!(i["config"]["cmd"][0], "/bin/sh", "{r}");
    }
    // docker-archive has no manifest of its own (one is made from uncompressed layers), so
    // only the first three share manifest and layer blobs.
    for (r, i) in refs.iter().zip(&inspected).take(3) {
        assert_eq!(
            i["manifest_digest"],
            demo.oci_gzip.manifest_digest.as_str(),
            "{r}"
        );
        assert_eq!(layer_digests(i), demo.oci_gzip.layers, "{r}");
    }
    assert_eq!(
        demo.docker_archive.config_digest,
        demo.oci_gzip.config_digest
    );

    let images: Value = serde_json::from_str(&env.ok(&["--json", "images"])).unwrap();
    assert_eq!(images.as_array().unwrap().len(), 4);
    // Removing three images frees nothing shared with the fourth.
    for r in &refs[1..] {
        env.ok(&["rmi", r]);
    }
    let pruned: Value = serde_json::from_str(&env.ok(&["--json", "prune"])).unwrap();
    assert!(pruned["bytes_freed"].as_u64().unwrap() > 0, "{pruned}");
    for layer in &demo.oci_gzip.layers {
        assert!(
            blob_path(&env, layer).is_file(),
            "the registry image still needs {layer}"
        );
    }
    env.fails(&["rmi", &refs[1]], 1);
    env.ok(&["rmi", &refs[0]]);
    env.ok(&["prune"]);
    assert!(
        blob_dir_names(&env).is_empty(),
        "{:?}",
        blob_dir_names(&env)
    );
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn gzip_and_zstd_layers() {
    require_root();
    let layers = fixtures().layers();
    let registry = Registry::start(None);
    registry.push(&layers.oci_gzip, "kiln/layers:gzip");
    registry.push(&layers.oci_zstd, "kiln/layers:zstd");
    let env = KilnRoot::without_guest();
    let mut seen = Vec::new();
    for (tag, fixture, suffix) in [
        ("gzip", &layers.oci_gzip, "tar+gzip"),
        ("zstd", &layers.oci_zstd, "tar+zstd"),
    ] {
        let r = registry_ref(&registry.addr(), &format!("kiln/layers:{tag}"));
        env.ok(&["pull", &r]);
        let i = inspect(&env, &r);
        assert_eq!(layer_digests(&i), fixture.layers);
        for layer in i["layers"].as_array().unwrap() {
            assert!(
                layer["media_type"].as_str().unwrap().ends_with(suffix),
                "{layer}"
            );
        }
        seen.push(diff_ids(&i));
    }
    assert_eq!(seen[0], seen[1], "both compressions carry the same tars");
    assert_eq!(seen[0].len(), layers.layer_count);
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn multi_platform_index() {
    require_root();
    let multiarch = fixtures().multiarch();
    let registry = Registry::start(None);
    registry.push(multiarch, "kiln/multi:latest");
    let env = KilnRoot::without_guest();
    let r = registry_ref(&registry.addr(), "kiln/multi:latest");

    env.ok(&["pull", &r]);
    let host = inspect(&env, &r);
    assert_eq!(
        host["manifest_digest"],
        multiarch.manifest_for("amd64").manifest_digest.as_str()
    );
    assert_eq!(host["index_digest"], multiarch.index_digest.as_str());
    assert_eq!(host["platform"], "linux/amd64");

    env.ok(&["pull", "--platform", "linux/arm64/v8", &r]);
    let arm = serde_json::from_str::<Value>(&env.ok(&[
        "--json",
        "inspect",
        "--platform",
        "linux/arm64",
        &r,
    ]))
    .unwrap();
    assert_eq!(
        arm["manifest_digest"],
        multiarch.manifest_for("arm64").manifest_digest.as_str()
    );
    assert_eq!(arm["platform"], "linux/arm64/v8");

    let err = env.fails(&["pull", "--platform", "linux/s390x", &r], 1);
    assert!(
        err.contains("linux/s390x")
            && err.contains("linux/amd64")
            && err.contains("linux/arm64/v8"),
        "{err}"
    );
    let err = env.fails(&["pull", "--platform", "linux", &r], 2);
    assert!(err.contains("OS/ARCH"), "{err}");
}

/// Writes `config` as `~/.docker/config.json` of `env`'s HOME.
fn write_docker_config(env: &KilnRoot, config: &Value) {
    let docker_dir = env.home().join(".docker");
    std::fs::create_dir_all(&docker_dir).unwrap();
    std::fs::write(docker_dir.join("config.json"), config.to_string()).unwrap();
}

/// Docker's config.json `auths` with `user:password` for registry `addr`.
fn docker_auths(addr: &str, user: &str, password: &str) -> Value {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    serde_json::json!({"auths": {addr: {"auth": auth}}})
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn htpasswd_registry_with_docker_config_credentials() {
    require_root();
    let demo = fixtures().demo();
    let registry = Registry::start(Some(("kiln", "s3cret")));
    registry.push(demo, "kiln/private:latest");
    let r = registry_ref(&registry.addr(), "kiln/private:latest");

    let env = KilnRoot::without_guest();
    let err = env.fails(&["pull", &r], 1);
    assert!(err.contains(&registry.addr()), "{err}");
    assert!(!blob_path(&env, &demo.oci_gzip.layers[0]).exists());
    env.fails(&["pull", "--creds", "kiln:wrong", &r], 1);

    write_docker_config(&env, &docker_auths(&registry.addr(), "kiln", "s3cret"));
    env.ok(&["pull", &r]);
    assert_eq!(
        inspect(&env, &r)["manifest_digest"],
        demo.oci_gzip.manifest_digest.as_str()
    );

    // --creds works without any file.
    let env2 = KilnRoot::without_guest();
    env2.ok(&["pull", "--creds", "kiln:s3cret", &r]);
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn bearer_token_registry_with_docker_config_credentials() {
    require_root();
    let demo = fixtures().demo();
    let registry = Registry::start_token_auth("kiln", "t0ken");
    registry.push(demo, "kiln/token:latest");
    let r = registry_ref(&registry.addr(), "kiln/token:latest");

    // The token server gives anonymous clients a token that grants nothing.
    let anonymous = KilnRoot::without_guest();
    let err = anonymous.fails(&["pull", &r], 1);
    assert!(
        err.contains(&registry.addr()) && err.contains("no credentials were found"),
        "{err}"
    );

    let wrong = KilnRoot::without_guest();
    write_docker_config(&wrong, &docker_auths(&registry.addr(), "kiln", "wrong"));
    let err = wrong.fails(&["pull", &r], 1);
    assert!(
        err.contains(&registry.addr())
            && err.contains("refused the credentials from")
            && err.contains(".docker/config.json"),
        "{err}"
    );
    assert!(!blob_path(&wrong, &demo.oci_gzip.layers[0]).exists());

    let env = KilnRoot::without_guest();
    write_docker_config(&env, &docker_auths(&registry.addr(), "kiln", "t0ken"));
    env.ok(&["pull", &r]);
    assert_eq!(
        inspect(&env, &r)["manifest_digest"],
        demo.oci_gzip.manifest_digest.as_str()
    );
    let issued = registry.token_server().unwrap().issued();
    assert!(
        issued
            .iter()
            .any(|t| t == "kiln repository:kiln/token:pull"),
        "kiln got no pull token for its user: {issued:?}"
    );
}

/// Writes `docker-credential-NAME` into `bin`, a helper speaking the
/// docker-credential-helpers protocol: `get` reads a server URL on stdin and prints
/// `{ServerURL, Username, Secret}`. It knows only `server` (with `user`/`secret`) and logs
/// every call to `bin/calls`; `secret = None` makes it fail as a locked keychain.
fn credential_helper(bin: &Path, name: &str, server: &str, user: &str, secret: Option<&str>) {
    let answer = match secret {
        Some(secret) => format!(
            "if [ \"$1\" = get ] && [ \"$url\" = '{server}' ]; then\n\
             \x20   printf '{{\"ServerURL\":\"%s\",\"Username\":\"{user}\",\"Secret\":\"{secret}\"}}\\n' \"$url\"\n\
             \x20   exit 0\n\
             fi\n\
             echo 'credentials not found in native keychain'\n"
        ),
        None => "echo 'the keychain is locked' >&2\n".to_owned(),
    };
    let script = format!(
        "#!/bin/sh\nread -r url\necho \"{name} $1 $url\" >>'{}'\n{answer}exit 1\n",
        bin.join("calls").display()
    );
    let path = bin.join(format!("docker-credential-{name}"));
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn docker_credential_helpers_and_store() {
    require_root();
    let demo = fixtures().demo();
    let registry = Registry::start(Some(("kiln", "h3lper")));
    registry.push(demo, "kiln/helped:latest");
    let r = registry_ref(&registry.addr(), "kiln/helped:latest");
    let addr = registry.addr();
    let bin = tempfile::tempdir().unwrap();
    credential_helper(bin.path(), "kiln-good", &addr, "kiln", Some("h3lper"));
    credential_helper(bin.path(), "kiln-wrong", &addr, "kiln", Some("nope"));
    credential_helper(
        bin.path(),
        "kiln-elsewhere",
        "other.example:5000",
        "kiln",
        Some("h3lper"),
    );
    credential_helper(bin.path(), "kiln-locked", &addr, "kiln", None);
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // A fresh store and HOME per config, so every pull asks the registry.
    let pull = |config: Value| -> (Option<i32>, String) {
        let env = KilnRoot::without_guest();
        write_docker_config(&env, &config);
        let out = run_with_timeout(
            env.kiln().args(["pull", &r]).env("PATH", &path),
            KILN_TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let calls = || std::fs::read_to_string(bin.path().join("calls")).unwrap_or_default();

    let (code, err) = pull(serde_json::json!({"credsStore": "kiln-good"}));
    assert_eq!(code, Some(0), "credsStore alone: {err}");
    assert!(
        calls().contains(&format!("kiln-good get {addr}")),
        "{}",
        calls()
    );

    let (code, err) = pull(serde_json::json!({
        "credsStore": "kiln-wrong",
        "credHelpers": {addr.as_str(): "kiln-good"},
    }));
    assert_eq!(code, Some(0), "credHelpers over credsStore: {err}");
    assert!(!calls().contains("kiln-wrong"), "{}", calls());

    // credHelpers for another registry leave this one to credsStore.
    let (code, err) = pull(serde_json::json!({
        "credsStore": "kiln-wrong",
        "credHelpers": {"other.example:5000": "kiln-good"},
    }));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("refused the credentials from docker-credential-kiln-wrong"),
        "{err}"
    );

    // A store with nothing for this registry means anonymous access, which it refuses.
    let (code, err) = pull(serde_json::json!({"credsStore": "kiln-elsewhere"}));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no credentials were found"), "{err}");

    let (code, err) = pull(serde_json::json!({"credHelpers": {addr.as_str(): "kiln-locked"}}));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("docker-credential-kiln-locked") && err.contains("the keychain is locked"),
        "{err}"
    );

    let (code, err) = pull(serde_json::json!({"credsStore": "kiln-missing"}));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("docker-credential-kiln-missing") && err.contains("PATH"),
        "{err}"
    );
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn corrupt_layer_in_registry_is_rejected_and_not_stored() {
    require_root();
    let demo = fixtures().demo();
    let registry = Registry::start(None);
    registry.push(demo, "kiln/corrupt:latest");
    let layer = &demo.oci_gzip.layers[0];
    let data = registry.blob_data_path(layer);
    let mut bytes = std::fs::read(&data).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&data, bytes).unwrap();

    let env = KilnRoot::without_guest();
    let err = env.fails(
        &[
            "pull",
            &registry_ref(&registry.addr(), "kiln/corrupt:latest"),
        ],
        1,
    );
    assert!(err.contains(layer.as_str()), "{err}");
    assert!(!blob_path(&env, layer).exists());
    let images: Value = serde_json::from_str(&env.ok(&["--json", "images"])).unwrap();
    assert_eq!(images, serde_json::json!([]));
    assert!(
        blob_dir_names(&env).iter().all(|n| !n.ends_with(".tmp")),
        "{:?}",
        blob_dir_names(&env)
    );
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn concurrent_pulls_download_each_blob_once() {
    require_root();
    let layers = fixtures().layers();
    let registry = Registry::start(None);
    registry.push(layers, "kiln/shared:latest");
    let env = KilnRoot::without_guest();
    let r = registry_ref(&registry.addr(), "kiln/shared:latest");
    let children: Vec<_> = (0..4)
        .map(|_| {
            env.kiln()
                .args(["-q", "pull", &r])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let log = registry.log();
    for layer in &layers.oci_gzip.layers {
        let uri = format!("/v2/kiln/shared/blobs/{layer}");
        let gets = log
            .lines()
            .filter(|l| {
                l.contains("response completed") && l.contains("method=GET") && l.contains(&uri)
            })
            .count();
        assert_eq!(
            gets, 1,
            "blob {layer} fetched {gets} times; registry log:\n{log}"
        );
        assert!(blob_path(&env, layer).is_file());
    }
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn pulled_image_works_with_the_registry_stopped() {
    require_root();
    let demo = fixtures().demo();
    let mut registry = Registry::start(None);
    registry.push(demo, "kiln/offline:latest");
    let r = registry_ref(&registry.addr(), "kiln/offline:latest");
    let env = KilnRoot::without_guest();
    env.ok(&["pull", &r]);
    registry.stop();

    let i = inspect(&env, &r);
    assert_eq!(i["manifest_digest"], demo.oci_gzip.manifest_digest.as_str());
    // The default policy (missing) and never both use the store; always needs the registry.
    let out: Vec<Value> = env
        .ok(&["--json", "pull", &r])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(out.last().unwrap()["event"], "in_store");
    env.ok(&["pull", "--pull", "never", &r]);
    env.fails(&["pull", "--pull", "always", &r], 1);
    // The layer blob is there and is what the manifest names.
    let layer = &demo.oci_gzip.layers[0];
    let bytes = std::fs::read(blob_path(&env, layer)).unwrap();
    assert_eq!(&kiln_e2e::sha256_digest(&bytes), layer);
    let err = env.fails(
        &["pull", "--pull", "never", "docker://127.0.0.1:1/not/pulled"],
        1,
    );
    assert!(err.contains("not in the store"), "{err}");
}

/// A TCP proxy in front of the registry that forwards responses slowly and can cut every
/// connection at once, so a test can stop the registry in the middle of a blob.
struct SlowProxy {
    port: u16,
    connections: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl SlowProxy {
    fn start(upstream: String) -> SlowProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (conns, stopped) = (connections.clone(), stop.clone());
        thread::spawn(move || {
            for client in listener.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                {
                    let mut c = conns.lock().unwrap();
                    c.push(client.try_clone().unwrap());
                    c.push(server.try_clone().unwrap());
                }
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                thread::spawn(move || pipe(c2, s2, None));
                thread::spawn(move || pipe(server, client, Some(Duration::from_millis(10))));
            }
        });
        SlowProxy {
            port,
            connections,
            stop,
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Drops every open connection, as a dying server does.
    fn cut(&self) {
        for stream in self.connections.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.cut();
        // Wakes the accept loop so it sees `stop`.
        let _ = TcpStream::connect(self.addr());
    }
}

/// Copies `from` to `to` in 8 KiB steps, sleeping `delay` after each.
fn pipe(mut from: TcpStream, mut to: TcpStream, delay: Option<Duration>) {
    let mut buf = [0u8; 8192];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        if let Some(delay) = delay {
            thread::sleep(delay);
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

fn temp_size(dir: &Path, hex: &str) -> Option<u64> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .find(|e| {
            // kiln-hostfs's temp files: `.<blob hex>.<pid>.<n>.tmp`.
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(&format!(".{hex}.")) && name.ends_with(".tmp")
        })
        .and_then(|e| e.metadata().ok())
        .map(|m| m.len())
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn registry_killed_mid_blob_then_restarted() {
    require_root();
    let demo = fixtures().demo();
    let mut registry = Registry::start(None);
    registry.push(demo, "kiln/flaky:latest");
    let proxy = SlowProxy::start(registry.addr());
    let r = registry_ref(&proxy.addr(), "kiln/flaky:latest");
    let env = KilnRoot::without_guest();
    let layer = &demo.oci_gzip.layers[0];
    let hex = layer.split_once(':').unwrap().1.to_owned();
    let blob_dir = env.path().join("store/blobs/sha256");

    let child = env
        .kiln()
        .args(["pull", &r])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Kill once part of the layer (at least 64 KiB, far from its ~1 MiB) is on disk.
    wait_for(
        "the layer download to start",
        Duration::from_secs(120),
        || temp_size(&blob_dir, &hex).is_some_and(|n| n >= 64 << 10),
    );
    registry.stop();
    proxy.cut();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the pull survived the registry's death: {stderr}"
    );
    assert!(!blob_path(&env, layer).exists());
    assert!(
        temp_size(&blob_dir, &hex).is_none(),
        "a partial blob was left behind"
    );

    registry.restart();
    env.ok(&["pull", &r]);
    let bytes = std::fs::read(blob_path(&env, layer)).unwrap();
    assert_eq!(&kiln_e2e::sha256_digest(&bytes), layer);
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn image_pulled_by_tag_is_found_by_digest_offline() {
    require_root();
    let demo = fixtures().demo();
    let multiarch = fixtures().multiarch();
    let mut registry = Registry::start(None);
    registry.push(demo, "kiln/bydigest:latest");
    registry.push(multiarch, "kiln/bydigest-multi:latest");
    let env = KilnRoot::without_guest();
    env.ok(&[
        "pull",
        &registry_ref(&registry.addr(), "kiln/bydigest:latest"),
    ]);
    env.ok(&[
        "pull",
        &registry_ref(&registry.addr(), "kiln/bydigest-multi:latest"),
    ]);
    registry.stop();

    let manifest = demo.oci_gzip.manifest_digest.as_str();
    let by_digest = registry_ref(&registry.addr(), &format!("kiln/bydigest@{manifest}"));
    // The default policy (missing) finds it in the store: the registry is gone.
    let printed = env.ok(&["pull", &by_digest]);
    assert!(printed.contains(manifest), "{printed}");
    env.ok(&["pull", "--pull", "never", &by_digest]);
    let inspected = inspect(&env, &by_digest);
    assert_eq!(inspected["manifest_digest"], manifest);
    assert_eq!(
        inspected["config_digest"],
        demo.oci_gzip.config_digest.as_str()
    );

    // An index digest picks the host's platform from what was pulled.
    let index = registry_ref(
        &registry.addr(),
        &format!("kiln/bydigest-multi@{}", multiarch.index_digest),
    );
    assert_eq!(
        inspect(&env, &index)["manifest_digest"],
        multiarch.manifest_for("amd64").manifest_digest.as_str()
    );

    // The digest of another repository, or one never pulled, is not in the store.
    let elsewhere = registry_ref(&registry.addr(), &format!("kiln/other@{manifest}"));
    let unknown = format!("sha256:{}", "0".repeat(64));
    let never_pulled = registry_ref(&registry.addr(), &format!("kiln/bydigest@{unknown}"));
    for r in [&elsewhere, &never_pulled] {
        let err = env.fails(&["pull", "--pull", "never", r], 1);
        assert!(
            err.contains("not in the store") && err.contains(r.trim_start_matches("docker://")),
            "{err}"
        );
    }
}

/// A hostile registry on loopback: `/v2/` answers 200; a manifest GET for tag `sized`
/// gets a 5 MiB document with its Content-Length, for any other tag an endless one
/// without a length. docker-registry cannot play this part: distribution 2.8 refuses to
/// store or serve a manifest over 4 MiB. Returns the address and a counter of the
/// manifest bytes written before the client hung up.
fn oversize_manifest_server() -> (String, Arc<Mutex<u64>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let written: Arc<Mutex<u64>> = Arc::default();
    let counter = written.clone();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let counter = counter.clone();
            thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let path = head
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or_default()
                    .to_owned();
                let json = "Content-Type: application/vnd.oci.image.manifest.v1+json\r\nConnection: close\r\n";
                if !path.contains("/manifests/") {
                    let _ = stream.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
                    );
                    return;
                }
                let chunk = [b' '; 64 << 10];
                let (header, limit) = if path.ends_with("/sized") {
                    (
                        format!(
                            "HTTP/1.1 200 OK\r\n{json}Content-Length: {}\r\n\r\n",
                            5u64 << 20
                        ),
                        Some(5u64 << 20),
                    )
                } else {
                    (format!("HTTP/1.1 200 OK\r\n{json}\r\n"), None)
                };
                if stream.write_all(header.as_bytes()).is_err() || stream.write_all(b"{").is_err() {
                    return;
                }
                let mut sent = 1u64;
                while limit.is_none_or(|l| sent < l) {
                    if stream.write_all(&chunk).is_err() {
                        break;
                    }
                    sent += chunk.len() as u64;
                    *counter.lock().unwrap() += chunk.len() as u64;
                }
            });
        }
    });
    (addr, written)
}

#[test]
fn oversize_manifest_is_refused_at_the_cap() {
    let (addr, written) = oversize_manifest_server();
    let env = KilnRoot::without_guest();
    let cap = (4u64 << 20).to_string();
    // With a Content-Length over the cap, kiln refuses before reading the body.
    let err = env.fails(&["pull", &format!("docker://{addr}/kiln/huge:sized")], 1);
    assert!(
        err.contains("manifest cap")
            && err.contains(&cap)
            && err.contains(&(5u64 << 20).to_string()),
        "{err}"
    );
    // Without one, kiln stops reading past the cap: an endless manifest ends in an error.
    let endless = format!("docker://{addr}/kiln/huge@sha256:{}", "a".repeat(64));
    for r in [format!("docker://{addr}/kiln/huge:endless"), endless] {
        let err = env.fails(&["pull", &r], 1);
        assert!(
            err.contains("manifest cap") && err.contains(&cap),
            "{r}: {err}"
        );
    }
    assert!(
        *written.lock().unwrap() > 4 << 20,
        "the server did send more than the cap"
    );
    assert!(
        blob_dir_names(&env).is_empty(),
        "{:?}",
        blob_dir_names(&env)
    );
}
