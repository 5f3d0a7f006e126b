//! The fixture images: runs `scripts/make-fixtures` (cached on disk, so cheap after the first
//! build) once per test process and reads the `manifest.json` it writes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde::Deserialize;

/// Something `skopeo copy` can read: a transport reference such as `oci:DIR:TAG`.
pub trait SkopeoSource {
    /// The skopeo transport reference.
    fn transport_ref(&self) -> String;
    /// Whether it is an image index, to be copied with `--all`.
    fn is_index(&self) -> bool {
        false
    }
}

/// Every fixture of one `scripts/make-fixtures` run.
#[derive(Debug)]
pub struct Fixtures {
    dir: PathBuf,
    images: BTreeMap<String, ImageFixture>,
    multiarch: IndexFixture,
}

/// One single-platform image in all its exported forms.
#[derive(Debug, Deserialize)]
pub struct ImageFixture {
    #[serde(skip)]
    pub name: String,
    pub layer_count: usize,
    /// OCI layout with gzip layers (as umoci wrote them).
    pub oci_gzip: OciImage,
    /// The same image with zstd layers; same config (so same diff_ids) as `oci_gzip`.
    pub oci_zstd: OciImage,
    pub oci_archive: OciArchive,
    pub docker_archive: DockerArchive,
}

/// An image in an OCI layout directory, under a tag.
#[derive(Debug, Deserialize)]
pub struct OciImage {
    pub path: PathBuf,
    pub tag: String,
    pub manifest_digest: String,
    pub config_digest: String,
    /// Layer digests, bottom layer first.
    pub layers: Vec<String>,
}

/// An `oci-archive` tarball.
#[derive(Debug, Deserialize)]
pub struct OciArchive {
    pub path: PathBuf,
    pub tag: String,
    pub manifest_digest: String,
}

/// A `docker-archive` tarball (`docker save` format). Its manifest is generated on read, so
/// only the config digest identifies it.
#[derive(Debug, Deserialize)]
pub struct DockerArchive {
    pub path: PathBuf,
    pub reference: String,
    pub config_digest: String,
}

/// The multi-platform image index in an OCI layout.
#[derive(Debug, Deserialize)]
pub struct IndexFixture {
    pub path: PathBuf,
    pub tag: String,
    pub index_digest: String,
    pub manifests: Vec<PlatformManifest>,
}

/// One entry of the index.
#[derive(Debug, Deserialize)]
pub struct PlatformManifest {
    pub platform: Platform,
    pub manifest_digest: String,
}

/// An index entry's platform, as in the OCI image index.
#[derive(Debug, Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

#[derive(Deserialize)]
struct ManifestFile {
    version: u32,
    fixtures: BTreeMap<String, serde_json::Value>,
}

#[derive(Deserialize)]
struct IndexEntry {
    oci: IndexFixture,
}

/// The fixtures, built (or found in the cache) by `scripts/make-fixtures` on first use in
/// this process. Panics when the script fails; its log goes to stderr. It needs root, so
/// only tests marked as needing root use it (see the crate docs).
pub fn fixtures() -> &'static Fixtures {
    static FIXTURES: OnceLock<Fixtures> = OnceLock::new();
    FIXTURES.get_or_init(build)
}

fn build() -> Fixtures {
    crate::require_root();
    let script = crate::workspace_root().join("scripts/make-fixtures");
    let output = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        output.status.success(),
        "{} failed ({}); its log is above",
        script.display(),
        output.status
    );
    let stdout = String::from_utf8(output.stdout).expect("make-fixtures prints a UTF-8 path");
    let dir = PathBuf::from(stdout.trim_end().lines().last().unwrap_or_default());
    Fixtures::load(&dir)
}

impl Fixtures {
    /// Reads `DIR/manifest.json` as `scripts/make-fixtures` writes it.
    pub fn load(dir: &Path) -> Fixtures {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let file: ManifestFile = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()));
        assert_eq!(file.version, 1, "{}: unknown version", path.display());
        let mut images = BTreeMap::new();
        let mut multiarch = None;
        for (name, value) in file.fixtures {
            let parse_error =
                |e: serde_json::Error| -> ! { panic!("{}: fixture {name}: {e}", path.display()) };
            match value.get("kind").and_then(|k| k.as_str()) {
                Some("image") => {
                    let mut image: ImageFixture =
                        serde_json::from_value(value).unwrap_or_else(|e| parse_error(e));
                    image.name = name.clone();
                    image.oci_gzip.path = dir.join(&image.oci_gzip.path);
                    image.oci_zstd.path = dir.join(&image.oci_zstd.path);
                    image.oci_archive.path = dir.join(&image.oci_archive.path);
                    image.docker_archive.path = dir.join(&image.docker_archive.path);
                    images.insert(name, image);
                }
                Some("index") => {
                    let mut entry: IndexEntry =
                        serde_json::from_value(value).unwrap_or_else(|e| parse_error(e));
                    entry.oci.path = dir.join(&entry.oci.path);
                    multiarch = Some(entry.oci);
                }
                other => panic!("{}: fixture {name}: unknown kind {other:?}", path.display()),
            }
        }
        Fixtures {
            dir: dir.to_owned(),
            images,
            multiarch: multiarch.unwrap_or_else(|| panic!("{}: no index fixture", path.display())),
        }
    }

    /// The directory holding every fixture and `manifest.json`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The image fixture `name`; panics naming the ones that exist.
    pub fn image(&self, name: &str) -> &ImageFixture {
        self.images.get(name).unwrap_or_else(|| {
            panic!(
                "no image fixture {name:?}; there are {:?}",
                self.images.keys().collect::<Vec<_>>()
            )
        })
    }

    /// Every image fixture, by name.
    pub fn images(&self) -> impl Iterator<Item = &ImageFixture> {
        self.images.values()
    }

    /// One busybox layer, root-only passwd/group, Cmd printing the identity.
    pub fn demo(&self) -> &ImageFixture {
        self.image("demo")
    }

    /// Four layers of whiteouts, hardlinks, special files and modes; see the comment in
    /// `scripts/make-fixtures` for what each layer holds.
    pub fn layers(&self) -> &ImageFixture {
        self.image("layers")
    }

    /// debootstrap minbase bookworm plus a layer removing docs and caches; `None` when it was
    /// skipped with `KILN_FIXTURES_SKIP_DEBIAN=1`.
    pub fn debian(&self) -> Option<&ImageFixture> {
        self.images.get("debian")
    }

    /// The linux/amd64 + linux/arm64/v8 image index.
    pub fn multiarch(&self) -> &IndexFixture {
        &self.multiarch
    }
}

impl OciImage {
    /// Where blob `digest` (`sha256:...`) lives in the layout.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        blob_path(&self.path, digest)
    }

    /// Unpacks the image with `umoci unpack` (the reference for applying layers; needs
    /// root) into the bundle `dir/bundle` and returns its root filesystem `dir/bundle/rootfs`.
    pub fn unpack_with_umoci(&self, dir: &Path) -> PathBuf {
        let bundle = dir.join("bundle");
        crate::run_ok(
            Command::new("umoci")
                .arg("unpack")
                .arg("--image")
                .arg(format!("{}:{}", self.path.display(), self.tag))
                .arg(&bundle),
            Duration::from_secs(600),
        );
        bundle.join("rootfs")
    }
}

impl IndexFixture {
    /// Where blob `digest` (`sha256:...`) lives in the layout.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        blob_path(&self.path, digest)
    }

    /// The manifest for `architecture` (e.g. `arm64`).
    pub fn manifest_for(&self, architecture: &str) -> &PlatformManifest {
        self.manifests
            .iter()
            .find(|m| m.platform.architecture == architecture)
            .unwrap_or_else(|| panic!("multiarch index has no {architecture} manifest"))
    }
}

fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    let (algorithm, hex) = digest
        .split_once(':')
        .unwrap_or_else(|| panic!("digest {digest:?} has no algorithm prefix"));
    layout.join("blobs").join(algorithm).join(hex)
}

/// An image fixture pushes as its gzip OCI layout.
impl SkopeoSource for ImageFixture {
    fn transport_ref(&self) -> String {
        self.oci_gzip.transport_ref()
    }
}

impl SkopeoSource for OciImage {
    fn transport_ref(&self) -> String {
        format!("oci:{}:{}", self.path.display(), self.tag)
    }
}

impl SkopeoSource for OciArchive {
    fn transport_ref(&self) -> String {
        format!("oci-archive:{}:{}", self.path.display(), self.tag)
    }
}

impl SkopeoSource for DockerArchive {
    fn transport_ref(&self) -> String {
        format!("docker-archive:{}:{}", self.path.display(), self.reference)
    }
}

impl SkopeoSource for IndexFixture {
    fn transport_ref(&self) -> String {
        format!("oci:{}:{}", self.path.display(), self.tag)
    }

    fn is_index(&self) -> bool {
        true
    }
}
