//! Where image bytes come from: a registry (oci-client) or local files (an OCI layout
//! directory, an `oci-archive`, a `docker-archive`). Every source hands out the root
//! manifest or index, manifests by digest, and blob streams; the caller verifies blobs as
//! they stream, manifests are verified here.

use std::collections::HashMap;
use std::io::Read;

use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, RegistryOperation};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::io::StreamReader;

use crate::archive::Files;
use crate::auth::Credentials;
use crate::digest::{verify_bytes, Digest};
use crate::media;
use crate::reference::{DockerRef, ImageRef};
use crate::{Error, PullOptions, MAX_METADATA_SIZE};

pub(crate) type BlobReader = Box<dyn AsyncRead + Unpin + Send>;

/// How much of a registry's error document goes into an error message.
const ERROR_BODY_SHOWN: usize = 1024;

/// The document a reference points at, verified.
pub(crate) struct Root {
    pub bytes: Vec<u8>,
    pub digest: Digest,
}

pub(crate) enum Source {
    Registry(RegistrySource),
    Local(LocalSource),
}

pub(crate) struct RegistrySource {
    client: Client,
    /// Manifests are fetched with this rather than oci-client, which reads a whole
    /// response before kiln could apply its cap; kiln stops reading past the cap.
    http: reqwest::Client,
    /// `http://` or `https://`, as oci-client speaks to the registry.
    scheme: &'static str,
    /// The bearer token oci-client got for pulling (None: basic or no auth), asked once.
    token: tokio::sync::OnceCell<Option<String>>,
    reference: DockerRef,
    credentials: Credentials,
}

pub(crate) struct LocalSource {
    files: Files,
    root: Root,
    /// docker-archive: where each blob is in the tarball (an OCI layout uses blobs/ALG/HEX).
    names: HashMap<Digest, String>,
}

impl Source {
    pub(crate) fn open(reference: &ImageRef, options: &PullOptions) -> Result<Source, Error> {
        Ok(match reference {
            ImageRef::Docker(r) => Source::Registry(RegistrySource::new(r, options)?),
            ImageRef::OciLayout { path, tag } => {
                Source::Local(LocalSource::oci(Files::Dir(path.clone()), tag.as_deref())?)
            }
            ImageRef::OciArchive { path, tag } => {
                Source::Local(LocalSource::oci(Files::tar(path)?, tag.as_deref())?)
            }
            ImageRef::DockerArchive { path, name } => Source::Local(LocalSource::docker_archive(
                Files::tar(path)?,
                name.as_ref(),
            )?),
        })
    }

    pub(crate) async fn root(&self) -> Result<Root, Error> {
        match self {
            Source::Registry(r) => r.root().await,
            Source::Local(l) => Ok(Root {
                bytes: l.root.bytes.clone(),
                digest: l.root.digest.clone(),
            }),
        }
    }

    /// Manifest `digest` (of `size` bytes), verified.
    pub(crate) async fn manifest(&self, digest: &Digest, size: u64) -> Result<Vec<u8>, Error> {
        let what = format!("manifest {digest}");
        if size > MAX_METADATA_SIZE {
            return Err(Error::TooLarge {
                what,
                limit: MAX_METADATA_SIZE,
                actual: size,
                why: "manifest cap",
            });
        }
        let bytes = match self {
            Source::Registry(r) => r.manifest(digest).await?,
            Source::Local(l) => l.files.read(&l.name(digest), MAX_METADATA_SIZE)?,
        };
        if bytes.len() as u64 != size {
            return Err(Error::SizeMismatch {
                what,
                expected: size,
                actual: bytes.len() as u64,
            });
        }
        verify_bytes(&what, &bytes, digest)?;
        Ok(bytes)
    }

    /// A stream of blob `digest`'s bytes, unverified.
    pub(crate) async fn blob(&self, digest: &Digest) -> Result<BlobReader, Error> {
        match self {
            Source::Registry(r) => {
                // The caller hashes every blob (ingest.rs); oci-client would hash a full
                // (200) response a second time, so ask for the whole blob as a range,
                // whose (206) stream it hands over as is.
                let response = r
                    .client
                    .pull_blob_stream_partial(
                        &r.oci_reference(None),
                        digest.to_string().as_str(),
                        0,
                        None,
                    )
                    .await
                    .map_err(|e| r.error(format!("fetching blob {digest}: {}", with_causes(&e))))?;
                let stream = match response {
                    BlobResponse::Full(stream) | BlobResponse::Partial(stream) => stream,
                };
                Ok(Box::new(StreamReader::new(stream.stream)))
            }
            Source::Local(l) => {
                let (file, size) = l.files.open(&l.name(digest))?;
                Ok(Box::new(tokio::fs::File::from_std(file).take(size)))
            }
        }
    }
}

/// Whether the registry of `reference` is spoken to over plain HTTP, and whether its TLS
/// certificate goes unverified (named by `--insecure-registry`). Also installs the TLS
/// crypto provider, which reqwest is built without; ring is the one kiln ships.
fn transport(reference: &DockerRef, insecure_registries: &[String]) -> (bool, bool) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let insecure = insecure_registries
        .iter()
        .any(|h| h == &reference.registry || h == reference.host());
    (insecure || reference.is_loopback(), insecure)
}

/// An oci-client for the registry of `reference` and the credentials for it, by the same
/// rules for pull and push: loopback registries and `insecure_registries` (HOST or
/// HOST:PORT) over plain HTTP, the latter also with unverified TLS; every other over HTTPS.
pub(crate) fn registry_client(
    reference: &DockerRef,
    creds: Option<&str>,
    insecure_registries: &[String],
    max_concurrent: usize,
) -> Result<(Client, Credentials), Error> {
    let (plain_http, insecure) = transport(reference, insecure_registries);
    let config = ClientConfig {
        protocol: if plain_http {
            ClientProtocol::HttpsExcept(vec![reference.registry.clone()])
        } else {
            ClientProtocol::Https
        },
        accept_invalid_certificates: insecure,
        platform_resolver: None,
        max_concurrent_download: max_concurrent.max(1),
        max_concurrent_upload: max_concurrent.max(1),
        ..ClientConfig::default()
    };
    let credentials = crate::auth::credentials(reference, creds)?;
    Ok((Client::new(config), credentials))
}

/// `err` and every error under it, as `a: b: c`: an HTTP client's own message ("error
/// sending request") hides the cause a user can act on (a failed DNS lookup, a refused
/// connection, a bad certificate).
fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Some errors repeat their source's message in their own.
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

impl RegistrySource {
    fn new(reference: &DockerRef, options: &PullOptions) -> Result<RegistrySource, Error> {
        let (client, credentials) = registry_client(
            reference,
            options.creds.as_deref(),
            &options.insecure_registries,
            options.max_concurrent_downloads,
        )?;
        let (plain_http, insecure) = transport(reference, &options.insecure_registries);
        let http = reqwest::Client::builder()
            .danger_accept_invalid_certs(insecure)
            .build()
            .map_err(|e| Error::Registry {
                registry: reference.registry.clone(),
                reason: format!("setting up the HTTP client: {e}"),
            })?;
        Ok(RegistrySource {
            client,
            http,
            scheme: if plain_http { "http" } else { "https" },
            token: tokio::sync::OnceCell::new(),
            reference: reference.clone(),
            credentials,
        })
    }

    fn oci_reference(&self, digest: Option<&Digest>) -> oci_client::Reference {
        let r = &self.reference;
        match (digest.or(r.digest.as_ref()), &r.tag) {
            (Some(d), _) => oci_client::Reference::with_digest(
                r.registry.clone(),
                r.repository.clone(),
                d.to_string(),
            ),
            (None, Some(tag)) => oci_client::Reference::with_tag(
                r.registry.clone(),
                r.repository.clone(),
                tag.clone(),
            ),
            (None, None) => unreachable!("a parsed reference has a tag or a digest"),
        }
    }

    fn error(&self, reason: String) -> Error {
        Error::Registry {
            registry: self.reference.registry.clone(),
            reason,
        }
    }

    /// GETs a manifest or index, reading at most [`MAX_METADATA_SIZE`] bytes of it:
    /// oci-client authenticates (and caches the token for the blob fetches), kiln reads.
    async fn fetch_manifest(&self, reference: &oci_client::Reference) -> Result<Vec<u8>, Error> {
        let what = format!("manifest of {}", self.reference);
        let fail = |reason: String| self.error(format!("fetching {what}: {reason}"));
        let token = self
            .token
            .get_or_try_init(|| {
                self.client
                    .auth(reference, &self.credentials.auth, RegistryOperation::Pull)
            })
            .await
            .map_err(|e| {
                let hint = match e {
                    OciDistributionError::UnauthorizedError { .. }
                    | OciDistributionError::AuthenticationFailure(_) => {
                        format!("; {}", self.credentials.refusal_hint())
                    }
                    _ => String::new(),
                };
                fail(format!("{}{hint}", with_causes(&e)))
            })?;
        let url = format!(
            "{}://{}/v2/{}/manifests/{}",
            self.scheme,
            reference.resolve_registry(),
            reference.repository(),
            reference
                .digest()
                .or(reference.tag())
                .expect("kiln's references have a tag or a digest")
        );
        let mut request = self.http.get(&url).header(
            reqwest::header::ACCEPT,
            media::ACCEPTED_MANIFESTS.join(", "),
        );
        request = match (token.clone(), &self.credentials.auth) {
            (Some(token), _) => request.bearer_auth(token),
            (None, RegistryAuth::Bearer(token)) => request.bearer_auth(token),
            (None, RegistryAuth::Basic(user, password)) => request.basic_auth(user, Some(password)),
            (None, RegistryAuth::Anonymous) => request,
        };
        let mut response = request.send().await.map_err(|e| fail(with_causes(&e)))?;
        let status = response.status();
        if !status.is_success() {
            let hint = if matches!(status.as_u16(), 401 | 403) {
                format!("; {}", self.credentials.refusal_hint())
            } else {
                String::new()
            };
            let mut said = Vec::new();
            while let Ok(Some(chunk)) = response.chunk().await {
                said.extend_from_slice(&chunk);
                if said.len() >= ERROR_BODY_SHOWN {
                    break;
                }
            }
            said.truncate(ERROR_BODY_SHOWN);
            return Err(fail(format!(
                "HTTP {status} from {url}: {}{hint}",
                String::from_utf8_lossy(&said).trim()
            )));
        }
        let too_large = |actual: u64| Error::TooLarge {
            what: what.clone(),
            limit: MAX_METADATA_SIZE,
            actual,
            why: "manifest cap; reading stopped there",
        };
        if let Some(length) = response.content_length().filter(|&n| n > MAX_METADATA_SIZE) {
            return Err(too_large(length));
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| fail(with_causes(&e)))? {
            let total = (bytes.len() + chunk.len()) as u64;
            if total > MAX_METADATA_SIZE {
                return Err(too_large(total));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    }

    async fn root(&self) -> Result<Root, Error> {
        let bytes = self.fetch_manifest(&self.oci_reference(None)).await?;
        let digest = match &self.reference.digest {
            Some(d) => {
                verify_bytes(&format!("manifest of {}", self.reference), &bytes, d)?;
                d.clone()
            }
            None => Digest::sha256_of(&bytes),
        };
        Ok(Root { bytes, digest })
    }

    async fn manifest(&self, digest: &Digest) -> Result<Vec<u8>, Error> {
        self.fetch_manifest(&self.oci_reference(Some(digest))).await
    }
}

/// index.json of an OCI layout, as much as kiln reads of it.
#[derive(Deserialize)]
struct LayoutIndex {
    #[serde(default)]
    manifests: Vec<LayoutEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LayoutEntry {
    digest: Digest,
    size: u64,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// manifest.json of a docker-archive.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ArchiveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

impl LocalSource {
    fn name(&self, digest: &Digest) -> String {
        self.names
            .get(digest)
            .cloned()
            .unwrap_or_else(|| format!("blobs/{}/{}", digest.algorithm().name(), digest.hex()))
    }

    /// An OCI layout (directory or tarball): the index.json entry tagged `tag`, or the
    /// only entry when no tag is given.
    fn oci(files: Files, tag: Option<&str>) -> Result<LocalSource, Error> {
        let origin = files.origin().display().to_string();
        let index_bytes = files.read("index.json", MAX_METADATA_SIZE)?;
        let index: LayoutIndex = serde_json::from_slice(&index_bytes)
            .map_err(|e| Error::invalid(format!("index.json of {origin}"), e.to_string()))?;
        let tags = || -> String {
            let tags: Vec<&str> = index
                .manifests
                .iter()
                .filter_map(|m| m.annotations.get(REF_NAME).map(String::as_str))
                .collect();
            if tags.is_empty() {
                "none".into()
            } else {
                tags.join(", ")
            }
        };
        let entry = match tag {
            Some(tag) => index
                .manifests
                .iter()
                .find(|m| m.annotations.get(REF_NAME).map(String::as_str) == Some(tag))
                .ok_or_else(|| {
                    Error::invalid(&origin, format!("has no tag {tag:?}; its tags: {}", tags()))
                })?,
            None => match index.manifests.as_slice() {
                [only] => only,
                _ => {
                    return Err(Error::invalid(
                        &origin,
                        format!(
                            "holds {} images; name one as PATH:TAG (tags: {})",
                            index.manifests.len(),
                            tags()
                        ),
                    ))
                }
            },
        };
        let what = format!("manifest {} of {origin}", entry.digest);
        if entry.size > MAX_METADATA_SIZE {
            return Err(Error::TooLarge {
                what,
                limit: MAX_METADATA_SIZE,
                actual: entry.size,
                why: "manifest cap",
            });
        }
        let name = format!(
            "blobs/{}/{}",
            entry.digest.algorithm().name(),
            entry.digest.hex()
        );
        let bytes = files.read(&name, MAX_METADATA_SIZE)?;
        if bytes.len() as u64 != entry.size {
            return Err(Error::SizeMismatch {
                what,
                expected: entry.size,
                actual: bytes.len() as u64,
            });
        }
        verify_bytes(&what, &bytes, &entry.digest)?;
        let root = Root {
            bytes,
            digest: entry.digest.clone(),
        };
        Ok(LocalSource {
            files,
            root,
            names: HashMap::new(),
        })
    }

    /// A `docker save` tarball. It has no manifest, so one is made (Docker schema 2) from
    /// its config and layers; uncompressed layers are identified by their diff_ids, which
    /// the layer digest check then verifies.
    fn docker_archive(files: Files, name: Option<&DockerRef>) -> Result<LocalSource, Error> {
        let origin = files.origin().display().to_string();
        let bad = |reason: String| Error::invalid(&origin, reason);
        let entries: Vec<ArchiveEntry> =
            serde_json::from_slice(&files.read("manifest.json", MAX_METADATA_SIZE)?)
                .map_err(|e| bad(format!("manifest.json: {e}")))?;
        let all_tags = || {
            entries
                .iter()
                .flat_map(|e| e.repo_tags.iter().flatten().cloned())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let entry = match name {
            Some(wanted) => entries
                .iter()
                .find(|e| {
                    e.repo_tags.iter().flatten().any(|t| {
                        DockerRef::parse(t).is_ok_and(|t| {
                            t.registry == wanted.registry
                                && t.repository == wanted.repository
                                && t.tag == wanted.tag
                        })
                    })
                })
                .ok_or_else(|| {
                    bad(format!(
                        "has no image {}; its images: {}",
                        wanted.familiar(),
                        all_tags()
                    ))
                })?,
            None => match entries.as_slice() {
                [only] => only,
                _ => {
                    return Err(bad(format!(
                        "holds {} images; name one as PATH:NAME:TAG ({})",
                        entries.len(),
                        all_tags()
                    )))
                }
            },
        };
        let config_bytes = files.read(&entry.config, MAX_METADATA_SIZE)?;
        let config_digest = Digest::sha256_of(&config_bytes);
        #[derive(Deserialize)]
        struct RootFs {
            diff_ids: Vec<Digest>,
        }
        #[derive(Deserialize)]
        struct ConfigRootFs {
            rootfs: RootFs,
        }
        let diff_ids = serde_json::from_slice::<ConfigRootFs>(&config_bytes)
            .map_err(|e| bad(format!("config {}: {e}", entry.config)))?
            .rootfs
            .diff_ids;
        if diff_ids.len() != entry.layers.len() {
            return Err(bad(format!(
                "config has {} diff_ids but manifest.json lists {} layers",
                diff_ids.len(),
                entry.layers.len()
            )));
        }
        let mut names = HashMap::from([(config_digest.clone(), entry.config.clone())]);
        let mut layers = Vec::new();
        for (layer_name, diff_id) in entry.layers.iter().zip(diff_ids) {
            let (file, size) = files.open(layer_name)?;
            let mut reader = file.take(size);
            let mut magic = [0u8; 4];
            let got = reader
                .read(&mut magic)
                .map_err(Error::io(format!("reading {layer_name} in {origin}")))?;
            let (media_type, digest) = match &magic[..got] {
                [0x1f, 0x8b, ..] | [0x28, 0xb5, 0x2f, 0xfd] => {
                    // Compressed: the blob digest is not in the archive, so compute it.
                    let (file, _) = files.open(layer_name)?;
                    let mut hasher = crate::digest::Hasher::new(crate::Algorithm::Sha256);
                    std::io::copy(&mut file.take(size), &mut hasher)
                        .map_err(Error::io(format!("reading {layer_name} in {origin}")))?;
                    let media_type = if magic[0] == 0x1f {
                        media::DOCKER_LAYER_GZIP
                    } else {
                        "application/vnd.oci.image.layer.v1.tar+zstd"
                    };
                    (media_type, hasher.finish())
                }
                _ => (media::DOCKER_LAYER_TAR, diff_id),
            };
            names.insert(digest.clone(), layer_name.clone());
            layers
                .push(serde_json::json!({"mediaType": media_type, "size": size, "digest": digest}));
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media::DOCKER_MANIFEST,
            "config": {"mediaType": media::DOCKER_CONFIG, "size": config_bytes.len(), "digest": config_digest},
            "layers": layers,
        });
        let bytes = serde_json::to_vec(&manifest).expect("a manifest serializes");
        let root = Root {
            digest: Digest::sha256_of(&bytes),
            bytes,
        };
        Ok(LocalSource { files, root, names })
    }
}

#[cfg(test)]
mod tests {
    use super::with_causes;

    #[test]
    fn an_error_shows_its_causes() {
        let inner = std::io::Error::other("Temporary failure in name resolution");
        let outer = std::io::Error::other(Wrapped(inner));
        assert_eq!(
            with_causes(&outer),
            "connecting: Temporary failure in name resolution"
        );
    }

    #[derive(Debug)]
    struct Wrapped(std::io::Error);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("connecting")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
}
