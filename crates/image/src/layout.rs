//! Writing images: an [`OciImage`] is a manifest and the blobs it names (built from a
//! config and layers, or taken from the store), which [`write_oci_layout`] writes as an OCI
//! image layout and [`crate::push`] uploads to a registry.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use oci_spec::image::{
    Descriptor, DescriptorBuilder, ImageConfiguration, ImageIndexBuilder, ImageManifestBuilder,
    MediaType, OciLayoutBuilder,
};

use crate::digest::Digest;
use crate::media;
use crate::pull::PulledImage;
use crate::store::Store;
use crate::{Error, MAX_METADATA_SIZE};

const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// A manifest and its blobs (config first, then layers), ready to write or push.
#[derive(Debug, Clone)]
pub struct OciImage {
    manifest: Vec<u8>,
    manifest_digest: Digest,
    media_type: String,
    blobs: Vec<Blob>,
}

/// One blob of an [`OciImage`].
#[derive(Debug, Clone)]
pub(crate) struct Blob {
    pub digest: Digest,
    pub size: u64,
    pub data: BlobData,
}

#[derive(Debug, Clone)]
pub(crate) enum BlobData {
    Bytes(Vec<u8>),
    /// A verified blob in the store.
    File(PathBuf),
}

/// A layer for [`OciImage::build`]: its bytes as they go into the image and their media
/// type (e.g. `application/vnd.oci.image.layer.v1.tar+gzip`).
#[derive(Debug, Clone)]
pub struct NewLayer {
    pub media_type: String,
    pub bytes: Vec<u8>,
}

impl OciImage {
    /// An OCI image of `config` and `layers` (bottom first). The same inputs always give
    /// the same manifest digest.
    pub fn build(config: &ImageConfiguration, layers: Vec<NewLayer>) -> Result<OciImage, Error> {
        let spec = |e: oci_spec::OciSpecError| Error::invalid("building the image", e.to_string());
        let config = config.to_string().map_err(spec)?.into_bytes();
        let mut descriptors = Vec::new();
        let mut blobs = vec![blob(config.clone())];
        for layer in layers {
            media::layer_compression("new layer", &layer.media_type)?;
            descriptors.push(descriptor(
                MediaType::from(layer.media_type.as_str()),
                &layer.bytes,
            )?);
            blobs.push(blob(layer.bytes));
        }
        let manifest = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(descriptor(MediaType::ImageConfig, &config)?)
            .layers(descriptors)
            .build()
            .map_err(spec)?
            .to_string()
            .map_err(spec)?
            .into_bytes();
        Ok(OciImage {
            manifest_digest: Digest::sha256_of(&manifest),
            manifest,
            media_type: media::OCI_MANIFEST.to_owned(),
            blobs,
        })
    }

    /// A pulled image as the store has it: its manifest bytes unchanged (so its digest
    /// stays), blobs read from the store when written or pushed.
    pub fn from_store(store: &Store, image: &PulledImage) -> Result<OciImage, Error> {
        let manifest = store.read_blob(&image.record.manifest_digest, MAX_METADATA_SIZE)?;
        let media_type = media_type_of(&manifest).unwrap_or_else(|| {
            image
                .manifest
                .media_type()
                .as_ref()
                .map_or(media::OCI_MANIFEST.to_owned(), |m| m.to_string())
        });
        let config = image.manifest.config();
        let mut blobs = vec![Blob {
            digest: image.record.config_digest.clone(),
            size: config.size(),
            data: BlobData::File(store.blob_path(&image.record.config_digest)),
        }];
        for layer in &image.layers {
            if blobs.iter().any(|b| b.digest == layer.digest) {
                continue;
            }
            blobs.push(Blob {
                digest: layer.digest.clone(),
                size: layer.size,
                data: BlobData::File(layer.path.clone()),
            });
        }
        Ok(OciImage {
            manifest_digest: image.record.manifest_digest.clone(),
            manifest,
            media_type,
            blobs,
        })
    }

    pub fn manifest_digest(&self) -> &Digest {
        &self.manifest_digest
    }

    /// The manifest's bytes, exactly as written and pushed.
    pub fn manifest(&self) -> &[u8] {
        &self.manifest
    }

    /// The manifest's media type (OCI or Docker schema 2).
    pub fn media_type(&self) -> &str {
        &self.media_type
    }

    pub(crate) fn blobs(&self) -> &[Blob] {
        &self.blobs
    }
}

/// The `mediaType` a manifest states about itself.
fn media_type_of(manifest: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Head {
        media_type: Option<String>,
    }
    serde_json::from_slice::<Head>(manifest).ok()?.media_type
}

fn blob(bytes: Vec<u8>) -> Blob {
    Blob {
        digest: Digest::sha256_of(&bytes),
        size: bytes.len() as u64,
        data: BlobData::Bytes(bytes),
    }
}

fn descriptor(media_type: MediaType, bytes: &[u8]) -> Result<Descriptor, Error> {
    digest_descriptor(media_type, &Digest::sha256_of(bytes), bytes.len() as u64)
}

fn digest_descriptor(
    media_type: MediaType,
    digest: &Digest,
    size: u64,
) -> Result<Descriptor, Error> {
    let spec_digest: oci_spec::image::Digest =
        digest
            .to_string()
            .parse()
            .map_err(|e: oci_spec::OciSpecError| {
                Error::invalid(format!("digest {digest}"), e.to_string())
            })?;
    DescriptorBuilder::default()
        .media_type(media_type)
        .size(size)
        .digest(spec_digest)
        .build()
        .map_err(|e| Error::invalid("building a descriptor", e.to_string()))
}

/// Whether `tag` is an OCI tag: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
pub fn is_tag(tag: &str) -> bool {
    let bytes = tag.as_bytes();
    (1..=128).contains(&bytes.len())
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Writes `image` as an OCI image layout at `dir`, which must not exist yet, its index
/// naming the manifest `tag`. The layout is built in a temporary directory beside `dir`
/// and renamed into place, so a failure never leaves a half-written layout.
pub fn write_oci_layout(image: &OciImage, dir: &Path, tag: &str) -> Result<(), Error> {
    let what = format!("OCI image layout {}", dir.display());
    if !is_tag(tag) {
        return Err(Error::invalid(
            &what,
            format!("tag {tag:?} is not a tag: accepted [A-Za-z0-9_][A-Za-z0-9._-]{{0,127}}"),
        ));
    }
    if fs::symlink_metadata(dir).is_ok() {
        return Err(Error::invalid(
            &what,
            "already exists; give a new directory",
        ));
    }
    let name = dir
        .file_name()
        .ok_or_else(|| Error::invalid(&what, "has no final component"))?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let temp = parent.join(format!(
        ".{}.kiln-tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = write_layout_files(image, tag, &temp)
        .and_then(|()| fs::rename(&temp, dir).map_err(Error::io(format!("renaming into {what}"))))
        .and_then(|()| {
            fs::File::open(&parent)
                .and_then(|d| d.sync_all())
                .map_err(Error::io(format!("syncing {}", parent.display())))
        });
    if result.is_err() {
        let _ = fs::remove_dir_all(&temp);
    }
    result
}

fn write_layout_files(image: &OciImage, tag: &str, dir: &Path) -> Result<(), Error> {
    let write = |path: &Path, bytes: &[u8]| -> Result<(), Error> {
        let mut file =
            fs::File::create(path).map_err(Error::io(format!("creating {}", path.display())))?;
        file.write_all(bytes)
            .and_then(|()| file.sync_all())
            .map_err(Error::io(format!("writing {}", path.display())))
    };
    let blob_path = |digest: &Digest| -> Result<PathBuf, Error> {
        let alg_dir = dir.join("blobs").join(digest.algorithm().name());
        fs::create_dir_all(&alg_dir)
            .map_err(Error::io(format!("creating {}", alg_dir.display())))?;
        Ok(alg_dir.join(digest.hex()))
    };
    for blob in image.blobs() {
        let path = blob_path(&blob.digest)?;
        match &blob.data {
            BlobData::Bytes(bytes) => write(&path, bytes)?,
            BlobData::File(source) => {
                fs::copy(source, &path)
                    .and_then(|_| fs::File::open(&path)?.sync_all())
                    .map_err(Error::io(format!(
                        "copying blob {} into the layout",
                        blob.digest
                    )))?;
            }
        }
    }
    write(&blob_path(&image.manifest_digest)?, &image.manifest)?;
    let spec =
        |e: oci_spec::OciSpecError| Error::invalid("writing the layout index", e.to_string());
    let mut manifest = digest_descriptor(
        MediaType::from(image.media_type.as_str()),
        &image.manifest_digest,
        image.manifest.len() as u64,
    )?;
    manifest.set_annotations(Some(HashMap::from([(REF_NAME.to_owned(), tag.to_owned())])));
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![manifest])
        .build()
        .map_err(spec)?;
    write(
        &dir.join("index.json"),
        index.to_string().map_err(spec)?.as_bytes(),
    )?;
    let layout = OciLayoutBuilder::default()
        .image_layout_version("1.0.0")
        .build()
        .map_err(spec)?;
    write(
        &dir.join("oci-layout"),
        layout.to_string().map_err(spec)?.as_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pull::{pull, PullOptions};
    use crate::reference::ImageRef;
    use oci_spec::image::{Arch, ConfigBuilder, ImageConfigurationBuilder, Os, RootFsBuilder};
    use std::process::Command;

    /// A one-layer image holding `/hello` (uncompressed tar, so its diff_id is its digest).
    fn hello_image() -> OciImage {
        let mut tar = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_ustar();
        header.set_size(6);
        header.set_mode(0o644);
        header.set_mtime(0);
        tar.append_data(&mut header, "hello", &b"hello\n"[..])
            .unwrap();
        let layer = tar.into_inner().unwrap();
        let config = ImageConfigurationBuilder::default()
            .architecture(Arch::Amd64)
            .os(Os::Linux)
            .config(
                ConfigBuilder::default()
                    .cmd(vec!["/hello".to_owned()])
                    .build()
                    .unwrap(),
            )
            .rootfs(
                RootFsBuilder::default()
                    .typ("layers")
                    .diff_ids(vec![Digest::sha256_of(&layer).to_string()])
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap();
        OciImage::build(
            &config,
            vec![NewLayer {
                media_type: "application/vnd.oci.image.layer.v1.tar".to_owned(),
                bytes: layer,
            }],
        )
        .unwrap()
    }

    #[test]
    fn written_layout_reads_back_with_kiln_and_skopeo() {
        let work = tempfile::tempdir().unwrap();
        let image = hello_image();
        assert_eq!(
            hello_image().manifest_digest(),
            image.manifest_digest(),
            "reproducible"
        );
        let dir = work.path().join("layout");
        write_oci_layout(&image, &dir, "v1").unwrap();

        // kiln's own oci: transport verifies every blob on the way into a store.
        let store = Store::open(&work.path().join("root")).unwrap();
        let reference = ImageRef::parse(&format!("oci:{}:v1", dir.display())).unwrap();
        let pulled = pull(&store, &reference, &PullOptions::default()).unwrap();
        assert_eq!(&pulled.record.manifest_digest, image.manifest_digest());
        assert_eq!(
            pulled
                .config
                .config()
                .as_ref()
                .unwrap()
                .cmd()
                .as_ref()
                .unwrap()[0],
            "/hello"
        );

        // The image taken back out of the store writes the same layout.
        let again = work.path().join("again");
        write_oci_layout(
            &OciImage::from_store(&store, &pulled).unwrap(),
            &again,
            "v1",
        )
        .unwrap();
        for name in ["index.json", "oci-layout"] {
            assert_eq!(
                fs::read(dir.join(name)).unwrap(),
                fs::read(again.join(name)).unwrap(),
                "{name}"
            );
        }

        // skopeo as the oracle (scripts/install-deps installs it).
        match Command::new("skopeo")
            .args(["inspect", "--raw"])
            .arg(format!("oci:{}:v1", dir.display()))
            .output()
        {
            Ok(out) => {
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                assert_eq!(out.stdout, image.manifest());
            }
            Err(e) => panic!("running skopeo: {e}"),
        }
    }

    #[test]
    fn existing_directories_and_bad_tags_are_refused_and_nothing_is_left() {
        let work = tempfile::tempdir().unwrap();
        let image = hello_image();
        let dir = work.path().join("layout");
        let err = write_oci_layout(&image, &dir, "-bad")
            .unwrap_err()
            .to_string();
        assert!(err.contains("-bad"), "{err}");
        fs::create_dir(&dir).unwrap();
        let err = write_oci_layout(&image, &dir, "v1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("already exists"), "{err}");
        let names: Vec<_> = fs::read_dir(work.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, ["layout"], "no temp directory left");
        assert!(is_tag("v1.2_x-y") && !is_tag("") && !is_tag(".x") && !is_tag(&"a".repeat(129)));
    }
}
