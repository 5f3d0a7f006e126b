//! Pulling: reference to verified blobs in the store and an image record, with parallel
//! layer downloads and progress events; and loading a pulled image back from the store.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::{StreamExt, TryStreamExt};
use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use serde::Serialize;

use crate::digest::Digest;
use crate::ingest::{ingest, Expected, Outcome};
use crate::media::{self, Compression, ManifestKind};
use crate::platform::{self, Platform};
use crate::reference::ImageRef;
use crate::source::Source;
use crate::store::{now, ImageRecord, Store};
use crate::{Error, DEFAULT_MAX_CONCURRENT_DOWNLOADS, DEFAULT_MAX_LAYER_SIZE, MAX_METADATA_SIZE};

/// Progress events go to this callback (from the pulling thread).
pub type ProgressFn = Arc<dyn Fn(&PullEvent) + Send + Sync>;

/// Emit a progress event at most once per this many bytes of a layer.
const PROGRESS_STEP: u64 = 1 << 20;

/// When to contact the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullPolicy {
    /// Only when the store has no image for the reference (and platform).
    #[default]
    Missing,
    /// Always resolve the reference again (blobs already stored are not fetched again).
    Always,
    /// Never: use the store or fail.
    Never,
}

impl PullPolicy {
    pub fn parse(text: &str) -> Result<PullPolicy, Error> {
        match text {
            "missing" => Ok(PullPolicy::Missing),
            "always" => Ok(PullPolicy::Always),
            "never" => Ok(PullPolicy::Never),
            other => Err(Error::invalid(
                format!("pull policy {other:?}"),
                "accepted: always, missing, never",
            )),
        }
    }
}

/// How to pull.
#[derive(Clone)]
pub struct PullOptions {
    /// The platform to pick from an index (default: the host's).
    pub platform: Option<Platform>,
    /// `USER:PASSWORD` for the registry, overriding credential files.
    pub creds: Option<String>,
    /// Registries (host or host:port) reached over plain HTTP or unverified TLS.
    pub insecure_registries: Vec<String>,
    /// Accept layers that name external `urls` (fetched from the registry itself).
    pub allow_foreign_layers: bool,
    pub max_concurrent_downloads: usize,
    /// Cap on one compressed layer blob.
    pub max_layer_size: u64,
    pub policy: PullPolicy,
    pub progress: Option<ProgressFn>,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            platform: None,
            creds: None,
            insecure_registries: Vec::new(),
            allow_foreign_layers: false,
            max_concurrent_downloads: DEFAULT_MAX_CONCURRENT_DOWNLOADS,
            max_layer_size: DEFAULT_MAX_LAYER_SIZE,
            policy: PullPolicy::Missing,
            progress: None,
        }
    }
}

/// What a pull reports as it goes.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum PullEvent {
    /// The image was found in the store; nothing was fetched.
    InStore {
        reference: String,
        manifest_digest: Digest,
    },
    /// The reference resolved to a manifest.
    Resolved {
        reference: String,
        manifest_digest: Digest,
        platform: String,
        layers: usize,
    },
    LayerCached {
        digest: Digest,
        size: u64,
    },
    LayerStarted {
        digest: Digest,
        size: u64,
    },
    LayerProgress {
        digest: Digest,
        downloaded: u64,
        size: u64,
    },
    LayerDone {
        digest: Digest,
        size: u64,
    },
    Done {
        reference: String,
        manifest_digest: Digest,
        downloaded_bytes: u64,
    },
}

/// A pulled image, everything verified and in the store.
#[derive(Debug, Clone)]
pub struct PulledImage {
    /// Reference, digests, platform, size, times.
    pub record: ImageRecord,
    pub manifest: ImageManifest,
    pub config: ImageConfiguration,
    /// Bottom layer first.
    pub layers: Vec<LayerInfo>,
}

/// One layer of a pulled image.
#[derive(Debug, Clone, Serialize)]
pub struct LayerInfo {
    pub digest: Digest,
    /// The digest of the uncompressed tar (config rootfs.diff_ids).
    pub diff_id: Digest,
    pub media_type: String,
    pub compression: Compression,
    /// Size of the blob as stored.
    pub size: u64,
    /// The blob in the store.
    pub path: PathBuf,
}

/// Gets `reference` into `store` following `options.policy`. Runs its own tokio runtime;
/// do not call it from inside one.
pub fn pull(
    store: &Store,
    reference: &ImageRef,
    options: &PullOptions,
) -> Result<PulledImage, Error> {
    let emit = |event: PullEvent| {
        if let Some(progress) = &options.progress {
            progress(&event);
        }
    };
    match options.policy {
        PullPolicy::Never => return store.resolve(reference, options.platform.as_ref()),
        PullPolicy::Missing => {
            if let Ok(image) = store.resolve(reference, options.platform.as_ref()) {
                emit(PullEvent::InStore {
                    reference: image.record.reference.clone(),
                    manifest_digest: image.record.manifest_digest.clone(),
                });
                return Ok(image);
            }
        }
        PullPolicy::Always => {}
    }
    let _gc = store.lock_gc(false)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(Error::io("starting the async runtime"))?;
    runtime.block_on(pull_async(store, reference, options, &emit))
}

async fn pull_async(
    store: &Store,
    reference: &ImageRef,
    options: &PullOptions,
    emit: &(dyn Fn(PullEvent) + Sync),
) -> Result<PulledImage, Error> {
    let canonical = reference.canonical();
    let source = Source::open(reference, options)?;
    let root = source.root().await?;
    let wanted = options.platform.clone().unwrap_or_else(Platform::host);

    let (manifest_bytes, manifest_digest, index_digest, index_platform) =
        match media::manifest_kind(&format!("manifest of {canonical}"), &root.bytes)? {
            ManifestKind::Manifest => (root.bytes, root.digest, None, None),
            ManifestKind::Index => {
                let what = format!("index {} of {canonical}", root.digest);
                let index: ImageIndex = serde_json::from_slice(&root.bytes)
                    .map_err(|e| Error::invalid(&what, e.to_string()))?;
                // Entries without a platform (attestations, say) are not images to run.
                let entries: Vec<_> = index
                    .manifests()
                    .iter()
                    .filter_map(|d| {
                        let p = d.platform().as_ref()?;
                        let platform = Platform {
                            os: p.os().to_string(),
                            architecture: p.architecture().to_string(),
                            variant: p.variant().clone(),
                        };
                        Some((d, platform))
                    })
                    .collect();
                let offered: Vec<Platform> = entries.iter().map(|(_, p)| p.clone()).collect();
                let (descriptor, platform) = &entries[platform::select(&wanted, &offered)?];
                let digest = Digest::parse(descriptor.digest().as_ref())?;
                media::check_manifest_descriptor(
                    &format!("manifest {digest} in {what}"),
                    descriptor.media_type().as_ref(),
                )?;
                let bytes = source.manifest(&digest, descriptor.size()).await?;
                store.put_verified(&root.digest, &root.bytes)?;
                (bytes, digest, Some(root.digest), Some(platform.clone()))
            }
        };
    let what = format!("manifest {manifest_digest} of {canonical}");
    if media::manifest_kind(&what, &manifest_bytes)? != ManifestKind::Manifest {
        return Err(Error::invalid(
            what,
            "is an index inside an index; kiln reads one level",
        ));
    }
    let manifest: ImageManifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| Error::invalid(&what, e.to_string()))?;

    // The config.
    let config_descriptor = manifest.config();
    let config_digest = Digest::parse(config_descriptor.digest().as_ref())?;
    let config_what = format!("config {config_digest} of {canonical}");
    media::check_config(&config_what, config_descriptor.media_type().as_ref())?;
    if config_descriptor.size() > MAX_METADATA_SIZE {
        return Err(Error::TooLarge {
            what: config_what,
            limit: MAX_METADATA_SIZE,
            actual: config_descriptor.size(),
            why: "config cap",
        });
    }
    let config_expected = Expected {
        what: config_what.clone(),
        digest: config_digest.clone(),
        size: config_descriptor.size(),
        layer: None,
    };
    ingest(
        store,
        &config_expected,
        || source.blob(&config_digest),
        &|_| {},
    )
    .await?;
    let config_bytes = store.read_blob(&config_digest, MAX_METADATA_SIZE)?;
    let config: ImageConfiguration = serde_json::from_slice(&config_bytes)
        .map_err(|e| Error::invalid(&config_what, e.to_string()))?;
    let config_platform = Platform {
        os: config.os().to_string(),
        architecture: config.architecture().to_string(),
        variant: config.variant().clone(),
    };
    if index_platform.is_none() && options.platform.is_some() && !wanted.accepts(&config_platform) {
        return Err(Error::NoMatchingPlatform {
            wanted: wanted.to_string(),
            offered: vec![config_platform.to_string()],
        });
    }
    let platform = index_platform.unwrap_or(config_platform);

    // The layers.
    let layers = layer_infos(store, &manifest, &config, &canonical)?;
    let mut expected: Vec<Expected> = Vec::new();
    for (layer, descriptor) in layers.iter().zip(manifest.layers()) {
        let what = format!("layer {} of {canonical}", layer.digest);
        let (_, foreign) = media::layer_compression(&what, &layer.media_type)?;
        let urls = descriptor.urls().clone().unwrap_or_default();
        if (foreign || !urls.is_empty()) && !options.allow_foreign_layers {
            return Err(Error::ForeignLayer {
                digest: layer.digest.clone(),
                urls,
            });
        }
        if layer.size > options.max_layer_size {
            return Err(Error::TooLarge {
                what,
                limit: options.max_layer_size,
                actual: layer.size,
                why: "the layer size cap (--max-layer-size)",
            });
        }
        if expected.iter().any(|e| e.digest == layer.digest) {
            continue;
        }
        expected.push(Expected {
            what,
            digest: layer.digest.clone(),
            size: layer.size,
            layer: Some((layer.diff_id.clone(), layer.compression)),
        });
    }
    emit(PullEvent::Resolved {
        reference: canonical.clone(),
        manifest_digest: manifest_digest.clone(),
        platform: platform.to_string(),
        layers: layers.len(),
    });

    let downloaded: Vec<u64> = futures_util::stream::iter(expected.iter())
        .map(|exp| async {
            let last = AtomicU64::new(0);
            let progress = |bytes: u64| {
                if bytes - last.load(Ordering::Relaxed) >= PROGRESS_STEP {
                    last.store(bytes, Ordering::Relaxed);
                    emit(PullEvent::LayerProgress {
                        digest: exp.digest.clone(),
                        downloaded: bytes,
                        size: exp.size,
                    });
                }
            };
            let open = || {
                emit(PullEvent::LayerStarted {
                    digest: exp.digest.clone(),
                    size: exp.size,
                });
                source.blob(&exp.digest)
            };
            let outcome = ingest(store, exp, open, &progress).await?;
            let (digest, size) = (exp.digest.clone(), exp.size);
            Ok::<u64, Error>(match outcome {
                Outcome::Cached => {
                    emit(PullEvent::LayerCached { digest, size });
                    0
                }
                Outcome::Downloaded => {
                    emit(PullEvent::LayerDone { digest, size });
                    size
                }
            })
        })
        .buffer_unordered(options.max_concurrent_downloads.max(1))
        .try_collect()
        .await?;

    store.put_verified(&manifest_digest, &manifest_bytes)?;
    let record = ImageRecord {
        reference: canonical.clone(),
        manifest_digest: manifest_digest.clone(),
        index_digest,
        config_digest,
        platform,
        size: manifest_bytes.len() as u64
            + config_bytes.len() as u64
            + layers.iter().map(|l| l.size).sum::<u64>(),
        created: config.created().clone(),
        pulled_at: now(),
    };
    store.put_record(&record)?;
    emit(PullEvent::Done {
        reference: canonical,
        manifest_digest,
        downloaded_bytes: downloaded.iter().sum(),
    });
    Ok(PulledImage {
        record,
        manifest,
        config,
        layers,
    })
}

/// The layers of `manifest` with their diff_ids from `config`.
fn layer_infos(
    store: &Store,
    manifest: &ImageManifest,
    config: &ImageConfiguration,
    reference: &str,
) -> Result<Vec<LayerInfo>, Error> {
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != manifest.layers().len() {
        return Err(Error::invalid(
            format!("image {reference}"),
            format!(
                "manifest has {} layers but config rootfs.diff_ids has {}",
                manifest.layers().len(),
                diff_ids.len()
            ),
        ));
    }
    manifest
        .layers()
        .iter()
        .zip(diff_ids)
        .map(|(descriptor, diff_id)| {
            let digest = Digest::parse(descriptor.digest().as_ref())?;
            let media_type = descriptor.media_type().to_string();
            let (compression, _) =
                media::layer_compression(&format!("layer {digest} of {reference}"), &media_type)?;
            Ok(LayerInfo {
                path: store.blob_path(&digest),
                diff_id: Digest::parse(diff_id)?,
                digest,
                media_type,
                compression,
                size: descriptor.size(),
            })
        })
        .collect()
}

impl Store {
    /// The pulled image `reference` (for `platform`, default the host's), from the store
    /// alone: no network, no source files.
    pub fn resolve(
        &self,
        reference: &ImageRef,
        platform: Option<&Platform>,
    ) -> Result<PulledImage, Error> {
        let canonical = reference.canonical();
        let found = match self.find(&canonical, platform)? {
            Some(record) => Some(record),
            None => self.find_by_digest(reference, platform)?,
        };
        let record = found.ok_or_else(|| Error::NotInStore {
            reference: canonical.clone(),
            hint: match platform {
                Some(p) => format!(" for platform {p}; pull it first"),
                None => "; pull it first".into(),
            },
        })?;
        self.load(record)
    }

    /// For `REPOSITORY@DIGEST`: an image of the same registry and repository pulled under
    /// another reference (a tag) whose manifest, or index, is `DIGEST`. The store holds
    /// what a digest names, so no network is needed. The record comes back under the
    /// digest reference.
    fn find_by_digest(
        &self,
        reference: &ImageRef,
        platform: Option<&Platform>,
    ) -> Result<Option<ImageRecord>, Error> {
        let ImageRef::Docker(wanted) = reference else {
            return Ok(None);
        };
        let Some(digest) = &wanted.digest else {
            return Ok(None);
        };
        let same_repository = |record: &ImageRecord| {
            matches!(
                ImageRef::parse(&record.reference),
                Ok(ImageRef::Docker(r)) if r.registry == wanted.registry && r.repository == wanted.repository
            )
        };
        let host = Platform::host();
        let accepts = |record: &ImageRecord| platform.unwrap_or(&host).accepts(&record.platform);
        let candidates: Vec<ImageRecord> = self
            .images()?
            .into_iter()
            .filter(|r| same_repository(r))
            .collect();
        // A manifest digest names one platform's image; an index digest needs the pick.
        let found = candidates
            .iter()
            .find(|r| &r.manifest_digest == digest && (platform.is_none() || accepts(r)))
            .or_else(|| {
                candidates
                    .iter()
                    .find(|r| r.index_digest.as_ref() == Some(digest) && accepts(r))
            });
        Ok(found.map(|record| ImageRecord {
            reference: reference.canonical(),
            ..record.clone()
        }))
    }

    /// Reads a record's manifest and config and checks its layers are all present.
    pub fn load(&self, record: ImageRecord) -> Result<PulledImage, Error> {
        let reference = record.reference.clone();
        let manifest_bytes = self.read_blob(&record.manifest_digest, MAX_METADATA_SIZE)?;
        let manifest: ImageManifest = serde_json::from_slice(&manifest_bytes).map_err(|e| {
            Error::invalid(format!("stored manifest of {reference}"), e.to_string())
        })?;
        let config_bytes = self.read_blob(&record.config_digest, MAX_METADATA_SIZE)?;
        let config: ImageConfiguration = serde_json::from_slice(&config_bytes)
            .map_err(|e| Error::invalid(format!("stored config of {reference}"), e.to_string()))?;
        let layers = layer_infos(self, &manifest, &config, &reference)?;
        for layer in &layers {
            if !self.has_blob(&layer.digest)? {
                return Err(Error::NotInStore {
                    reference,
                    hint: format!(
                        " completely: layer {} is missing; pull it again",
                        layer.digest
                    ),
                });
            }
        }
        Ok(PulledImage {
            record,
            manifest,
            config,
            layers,
        })
    }
}
