//! The media types kiln accepts: Docker schema 2 and OCI manifests and indexes, their
//! configs, and tar layers uncompressed, gzip- or zstd-compressed.

use serde::{Deserialize, Serialize};

use crate::Error;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// What a registry is asked for, in order of preference.
pub const ACCEPTED_MANIFESTS: &[&str] = &[
    OCI_INDEX,
    DOCKER_MANIFEST_LIST,
    OCI_MANIFEST,
    DOCKER_MANIFEST,
];

const ACCEPTED_MANIFEST_TEXT: &str = "OCI or Docker schema 2 image manifests and indexes";
const ACCEPTED_CONFIG_TEXT: &str = "application/vnd.oci.image.config.v1+json, \
    application/vnd.docker.container.image.v1+json";
const ACCEPTED_LAYER_TEXT: &str = "OCI or Docker tar layers, uncompressed, +gzip or +zstd";

/// A top-level JSON document from a registry, layout or archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestKind {
    Manifest,
    Index,
}

/// Classifies manifest bytes by their `mediaType` (or, when it is absent as the OCI spec
/// allows, by their shape). Schema 1 and anything else is refused.
pub fn manifest_kind(what: &str, bytes: &[u8]) -> Result<ManifestKind, Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        schema_version: Option<u32>,
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
        layers: Option<serde_json::Value>,
    }
    let probe: Probe = serde_json::from_slice(bytes)
        .map_err(|e| Error::invalid(what, format!("not a JSON manifest or index: {e}")))?;
    if probe.schema_version != Some(2) {
        return Err(Error::invalid(
            what,
            format!(
                "schemaVersion {:?} is not supported; accepted: {ACCEPTED_MANIFEST_TEXT}",
                probe.schema_version
            ),
        ));
    }
    match probe.media_type.as_deref() {
        Some(OCI_MANIFEST | DOCKER_MANIFEST) => Ok(ManifestKind::Manifest),
        Some(OCI_INDEX | DOCKER_MANIFEST_LIST) => Ok(ManifestKind::Index),
        None if probe.manifests.is_some() => Ok(ManifestKind::Index),
        None if probe.layers.is_some() => Ok(ManifestKind::Manifest),
        other => Err(Error::UnsupportedMediaType {
            what: what.to_owned(),
            media_type: other.unwrap_or("(none)").to_owned(),
            accepted: ACCEPTED_MANIFEST_TEXT,
        }),
    }
}

/// Whether a descriptor inside an index points at a manifest kiln reads.
pub fn check_manifest_descriptor(what: &str, media_type: &str) -> Result<(), Error> {
    match media_type {
        OCI_MANIFEST | DOCKER_MANIFEST => Ok(()),
        other => Err(Error::UnsupportedMediaType {
            what: what.to_owned(),
            media_type: other.to_owned(),
            accepted: "OCI or Docker schema 2 image manifests (no nested indexes)",
        }),
    }
}

pub fn check_config(what: &str, media_type: &str) -> Result<(), Error> {
    match media_type {
        OCI_CONFIG | DOCKER_CONFIG => Ok(()),
        other => Err(Error::UnsupportedMediaType {
            what: what.to_owned(),
            media_type: other.to_owned(),
            accepted: ACCEPTED_CONFIG_TEXT,
        }),
    }
}

/// How a layer blob is compressed (kiln-rootfs decodes each layer by it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// A layer media type: its compression and whether it is "non-distributable" (foreign).
pub fn layer_compression(what: &str, media_type: &str) -> Result<(Compression, bool), Error> {
    let unsupported = || Error::UnsupportedMediaType {
        what: what.to_owned(),
        media_type: media_type.to_owned(),
        accepted: ACCEPTED_LAYER_TEXT,
    };
    if let Some(rest) = media_type.strip_prefix("application/vnd.oci.image.layer.") {
        let (foreign, kind) = match rest.strip_prefix("nondistributable.") {
            Some(kind) => (true, kind),
            None => (false, rest),
        };
        let compression = match kind {
            "v1.tar" => Compression::None,
            "v1.tar+gzip" => Compression::Gzip,
            "v1.tar+zstd" => Compression::Zstd,
            _ => return Err(unsupported()),
        };
        return Ok((compression, foreign));
    }
    match media_type {
        DOCKER_LAYER_TAR => Ok((Compression::None, false)),
        DOCKER_LAYER_GZIP => Ok((Compression::Gzip, false)),
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
            Ok((Compression::Gzip, true))
        }
        _ => Err(unsupported()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_types() {
        let c = |m| layer_compression("l", m).unwrap();
        assert_eq!(
            c("application/vnd.oci.image.layer.v1.tar"),
            (Compression::None, false)
        );
        assert_eq!(
            c("application/vnd.oci.image.layer.v1.tar+zstd"),
            (Compression::Zstd, false)
        );
        assert_eq!(
            c("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"),
            (Compression::Gzip, true)
        );
        assert_eq!(c(DOCKER_LAYER_GZIP), (Compression::Gzip, false));
        let err = layer_compression("layer x", "application/vnd.oci.image.layer.v1.tar+bzip2")
            .unwrap_err()
            .to_string();
        assert!(err.contains("layer x") && err.contains("bzip2"), "{err}");
    }

    #[test]
    fn kinds() {
        let k = |s: &str| manifest_kind("m", s.as_bytes());
        assert_eq!(
            k(r#"{"schemaVersion":2,"manifests":[]}"#).unwrap(),
            ManifestKind::Index
        );
        assert_eq!(
            k(r#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}"#)
                .unwrap(),
            ManifestKind::Manifest
        );
        assert!(k(r#"{"schemaVersion":1,"fsLayers":[]}"#)
            .unwrap_err()
            .to_string()
            .contains("schemaVersion"));
        assert!(k(r#"{"schemaVersion":2,"mediaType":"text/plain"}"#).is_err());
        assert!(k("[").is_err());
    }
}
