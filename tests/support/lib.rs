//! Support shared by kiln's end-to-end tests (the `kiln-e2e` package): the fixture images
//! that `scripts/make-fixtures` builds with real tools, a real `docker-registry` on a free
//! loopback port, the `kiln` binary against a test's own root ([`KilnRoot`]), and running
//! commands under a timeout.
//!
//! Every test file under `tests/` is a `[[test]]` entry in `tests/Cargo.toml` and uses this
//! library as `kiln_e2e`.
//!
//! A test that needs root (the fixtures, mounts, chown, other uids) is marked
//! `#[ignore = "needs root (scripts/test runs it as root)"]`, so a plain `cargo test` reports
//! it as ignored, and starts with [`require_root`], so that running it without root through
//! `--include-ignored` fails instead of passing. scripts/test runs them as root.

mod fixtures;
mod guest;
mod kiln_root;
mod layer;
mod peer_probe;
mod process;
mod registry;
mod server;
mod standin;
mod token_auth;

use std::path::{Path, PathBuf};

pub use fixtures::{
    fixtures, DockerArchive, Fixtures, ImageFixture, IndexFixture, OciArchive, OciImage, Platform,
    PlatformManifest, SkopeoSource,
};
pub use guest::{guest_files, kernel_with_fragment, GuestFiles};
pub use kiln_root::{KilnRoot, KILN_TIMEOUT};
pub use layer::{read_layer, EntryKind, LayerEntry};
pub use peer_probe::{probe, Probe, OTHER_UID};
pub use process::{
    kill_process_group, qemu_left_after, qemu_pids_mentioning, run_ok, run_with_timeout, TimedOut,
};
pub use registry::Registry;
pub use server::KilnServer;
pub use standin::{openshell_standin, ReportServer};
pub use token_auth::TokenServer;

/// The workspace's top directory (the parent of `tests/`).
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent directory")
}

/// The `kiln` binary of the cargo target dir this test was built in
/// (`<target>/<profile>/kiln`). Panics, saying how to build it, when it is missing.
pub fn kiln_bin() -> PathBuf {
    let test_exe = std::env::current_exe().expect("the test executable's path");
    // Test executables live in <target>/<profile>/deps/.
    let profile_dir = test_exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable under <target>/<profile>/deps");
    let kiln = profile_dir.join("kiln");
    assert!(
        kiln.is_file(),
        "kiln binary not found at {}: run `cargo build --workspace --bins` (same profile and \
         CARGO_TARGET_DIR as the tests) before the end-to-end tests",
        kiln.display()
    );
    kiln
}

/// The OCI digest (`sha256:<hex>`) of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let hash = Sha256::digest(bytes);
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Whether this process runs as root (effective uid 0).
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The first statement of every test that needs root: panics, naming what is missing,
/// when this process is not root. Such a test is also `#[ignore]`d (see the crate docs), so
/// only an explicit `--include-ignored` without root gets here, and it must fail rather
/// than pass without having run.
#[track_caller]
pub fn require_root() {
    assert!(
        is_root(),
        "this test needs root (fixture images, mounts, chown, other uids): run it as root, \
         as scripts/test does with `cargo test -- --include-ignored`"
    );
}

/// The demo fixture image (gzip OCI layout) as a kiln image reference.
pub fn demo_image() -> String {
    let image = &fixtures().demo().oci_gzip;
    format!("oci:{}:{}", image.path.display(), image.tag)
}

/// A two-thread tokio runtime for a test that drives a gRPC client.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Bytes a command printed, as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The `key=value` lines a workload's script printed, by key (a later line wins).
pub fn facts(stdout: &[u8]) -> std::collections::BTreeMap<String, String> {
    text(stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A command's status and output, for assertion messages.
pub fn describe(output: &std::process::Output) -> String {
    format!(
        "{}; stdout: {}; stderr: {}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    )
}
