//! Pushing an [`OciImage`] to a registry with oci-client: each blob the registry lacks,
//! then the manifest under the target's tag. Credentials and plain-HTTP rules are those of
//! a pull (`--creds`, auth files, Docker's config.json; loopback or `--insecure-registry`).

use futures_util::TryStreamExt;
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::RegistryOperation;
use tokio_util::io::ReaderStream;

use crate::auth::Credentials;
use crate::digest::Digest;
use crate::layout::{BlobData, OciImage};
use crate::reference::DockerRef;
use crate::source::registry_client;
use crate::{Error, DEFAULT_MAX_CONCURRENT_DOWNLOADS};

/// How to reach the registry.
#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    /// `USER:PASSWORD`, overriding credential files.
    pub creds: Option<String>,
    /// Registries (host or host:port) reached over plain HTTP or unverified TLS.
    pub insecure_registries: Vec<String>,
}

/// Pushes `image` to `target` (which names a tag, not a digest); returns the manifest
/// digest. Runs its own tokio runtime; do not call it from inside one.
pub fn push(image: &OciImage, target: &DockerRef, options: &PushOptions) -> Result<Digest, Error> {
    let tag = match (&target.tag, &target.digest) {
        (Some(tag), None) => tag.clone(),
        _ => {
            return Err(Error::InvalidReference {
                input: target.to_string(),
                part: "digest".into(),
                reason: "cannot be pushed to; give a tag".into(),
            })
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(Error::io("starting the async runtime"))?;
    runtime.block_on(push_async(image, target, tag, options))
}

async fn push_async(
    image: &OciImage,
    target: &DockerRef,
    tag: String,
    options: &PushOptions,
) -> Result<Digest, Error> {
    let (client, credentials) = registry_client(
        target,
        options.creds.as_deref(),
        &options.insecure_registries,
        DEFAULT_MAX_CONCURRENT_DOWNLOADS,
    )?;
    let reference =
        oci_client::Reference::with_tag(target.registry.clone(), target.repository.clone(), tag);
    let fail = |what: String| {
        let credentials: &Credentials = &credentials;
        move |e: OciDistributionError| {
            let hint = if is_refusal(&e) {
                format!("; {}", credentials.refusal_hint())
            } else {
                String::new()
            };
            Error::Registry {
                registry: target.registry.clone(),
                reason: format!("pushing {target}: {what}: {e}{hint}"),
            }
        }
    };
    client
        .auth(&reference, &credentials.auth, RegistryOperation::Push)
        .await
        .map_err(fail("authenticating".into()))?;
    for blob in image.blobs() {
        let digest = blob.digest.to_string();
        let what = || format!("blob {digest}");
        if client
            .blob_exists(&reference, &digest)
            .await
            .map_err(fail(what()))?
        {
            continue;
        }
        match &blob.data {
            BlobData::Bytes(bytes) => client
                .push_blob(&reference, bytes.clone(), &digest)
                .await
                .map_err(fail(what()))?,
            BlobData::File(path) => {
                let file = tokio::fs::File::open(path)
                    .await
                    .map_err(Error::io(format!("opening blob {digest}")))?;
                let stream = ReaderStream::new(file).map_err(OciDistributionError::IoError);
                client
                    .push_blob_stream(&reference, stream, &digest, Some(blob.size))
                    .await
                    .map_err(fail(what()))?
            }
        };
    }
    let content_type = image.media_type().parse().map_err(|_| {
        Error::invalid(
            format!("manifest {}", image.manifest_digest()),
            format!("media type {:?} is not a header value", image.media_type()),
        )
    })?;
    client
        .push_manifest_raw(&reference, image.manifest().to_vec(), content_type)
        .await
        .map_err(fail(format!("manifest {}", image.manifest_digest())))?;
    Ok(image.manifest_digest().clone())
}

/// Whether the registry refused access (rather than failing otherwise).
fn is_refusal(error: &OciDistributionError) -> bool {
    match error {
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => true,
        OciDistributionError::RequestError(e) => e
            .status()
            .is_some_and(|s| s.as_u16() == 401 || s.as_u16() == 403),
        OciDistributionError::ServerError { code, .. } => *code == 401 || *code == 403,
        OciDistributionError::RegistryError { envelope, .. } => envelope
            .errors
            .iter()
            .any(|e| matches!(e.code, OciErrorCode::Unauthorized | OciErrorCode::Denied)),
        _ => false,
    }
}
