//! Registry credentials: `--creds USER:PASS`, then the containers auth file
//! (`$REGISTRY_AUTH_FILE`, else `$XDG_RUNTIME_DIR/containers/auth.json`), then Docker's
//! `config.json` (`$DOCKER_CONFIG`, else `~/.docker`) with its `auths`, `credHelpers` and
//! `credsStore` (docker_credential runs the helpers). Nothing found means anonymous access.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use docker_credential::{CredentialRetrievalError, DockerCredential};
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

use crate::reference::{DockerRef, DOCKER_HUB};
use crate::Error;

/// The key Docker uses for Docker Hub in config.json.
const DOCKER_HUB_CONFIG_KEY: &str = "https://index.docker.io/v1/";

/// What a credential helper prints (on stdout, exit status 1) when it has nothing for a
/// server; docker-credential-helpers' `ErrCredentialsNotFound`.
const HELPER_NOT_FOUND: &str = "credentials not found";

/// Credentials for one registry and where they came from, for error messages.
#[derive(Debug)]
pub(crate) struct Credentials {
    pub auth: RegistryAuth,
    /// e.g. `--creds`, `/root/.docker/config.json`, `docker-credential-pass`; None when
    /// access is anonymous.
    pub origin: Option<String>,
}

impl Credentials {
    fn from(auth: RegistryAuth, origin: impl Into<String>) -> Credentials {
        Credentials {
            auth,
            origin: Some(origin.into()),
        }
    }

    fn anonymous() -> Credentials {
        Credentials {
            auth: RegistryAuth::Anonymous,
            origin: None,
        }
    }

    /// Why a registry that refused access did so, as far as kiln can tell.
    pub(crate) fn refusal_hint(&self) -> String {
        match &self.origin {
            Some(origin) => format!("the registry refused the credentials from {origin}"),
            None => "no credentials were found for it; give --creds USER:PASSWORD, or log \
                     in with `docker login` or `podman login`"
                .to_owned(),
        }
    }
}

/// Credentials for the registry of `reference`.
pub(crate) fn credentials(
    reference: &DockerRef,
    creds: Option<&str>,
) -> Result<Credentials, Error> {
    let registry = reference.registry.as_str();
    if let Some(creds) = creds {
        let (user, password) = creds.split_once(':').ok_or_else(|| Error::Credentials {
            registry: registry.to_owned(),
            reason: "--creds must be USER:PASSWORD".into(),
        })?;
        return Ok(Credentials::from(
            RegistryAuth::Basic(user.to_owned(), password.to_owned()),
            "--creds",
        ));
    }
    if let Some(path) = containers_auth_file() {
        if let Some(auth) = from_auth_file(&path, registry)? {
            return Ok(Credentials::from(auth, path.display().to_string()));
        }
    }
    match docker_config_path() {
        Some(path) => from_docker_config(&path, registry),
        None => Ok(Credentials::anonymous()),
    }
}

fn docker_config_path() -> Option<PathBuf> {
    let dir = std::env::var_os("DOCKER_CONFIG")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".docker")))?;
    Some(dir.join("config.json"))
}

/// The parts of Docker's config.json that say which helper serves a registry; the lookup
/// itself is docker_credential's, this only lets errors name the helper.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct DockerHelpers {
    creds_store: Option<String>,
    #[serde(default)]
    cred_helpers: HashMap<String, String>,
    #[serde(default)]
    auths: HashMap<String, DockerAuthEntry>,
}

/// An `auths` entry; Docker leaves an empty one for registries its credsStore serves.
#[derive(Deserialize)]
struct DockerAuthEntry {
    auth: Option<String>,
    identitytoken: Option<String>,
    username: Option<String>,
}

impl DockerHelpers {
    /// The helper docker_credential runs for `server`: its credHelpers entry, else
    /// credsStore unless `auths` has credentials of its own for `registry`.
    fn helper_for(&self, server: &str, registry: &str) -> Option<String> {
        if let Some(name) = self.cred_helpers.get(server).filter(|h| !h.is_empty()) {
            return Some(format!("docker-credential-{name}"));
        }
        let in_auths = self.auths.iter().any(|(key, entry)| {
            key_matches(key, registry)
                && (entry.auth.is_some()
                    || entry.identitytoken.is_some()
                    || entry.username.is_some())
        });
        match &self.creds_store {
            Some(name) if !in_auths => Some(format!("docker-credential-{name}")),
            _ => None,
        }
    }
}

/// Looks `registry` up in Docker's config.json at `path` (a missing file is anonymous
/// access). A helper that has no entry for the registry means anonymous access too; a
/// helper that cannot be run or fails otherwise is an error naming it.
fn from_docker_config(path: &Path, registry: &str) -> Result<Credentials, Error> {
    let bad = |reason: String| Error::Credentials {
        registry: registry.to_owned(),
        reason: format!("{}: {reason}", path.display()),
    };
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Credentials::anonymous()),
        Err(e) => return Err(bad(e.to_string())),
    };
    let helpers: DockerHelpers = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    let server = if registry == DOCKER_HUB {
        DOCKER_HUB_CONFIG_KEY
    } else {
        registry
    };
    let helper = helpers.helper_for(server, registry);
    let helper_name = || helper.clone().unwrap_or_default();
    let origin = match &helper {
        Some(helper) => format!("{helper} (named in {})", path.display()),
        None => path.display().to_string(),
    };
    match docker_credential::get_credential_from_reader(bytes.as_slice(), server) {
        Ok(DockerCredential::UsernamePassword(user, password)) => Ok(Credentials::from(
            RegistryAuth::Basic(user, password),
            origin,
        )),
        Ok(DockerCredential::IdentityToken(token)) => {
            Ok(Credentials::from(RegistryAuth::Bearer(token), origin))
        }
        Err(CredentialRetrievalError::NoCredentialConfigured) => Ok(Credentials::anonymous()),
        Err(CredentialRetrievalError::HelperFailure {
            helper,
            stdout,
            stderr,
        }) => {
            if stdout.contains(HELPER_NOT_FOUND) {
                tracing::debug!("{helper} has no credentials for {server}");
                return Ok(Credentials::anonymous());
            }
            let said = [stderr.trim(), stdout.trim()]
                .into_iter()
                .find(|s| !s.is_empty())
                .unwrap_or("nothing");
            Err(bad(format!(
                "credential helper {helper} failed for {server}: {said}"
            )))
        }
        Err(CredentialRetrievalError::HelperCommunicationError) => Err(bad(format!(
            "could not run credential helper {} (is it on PATH?)",
            helper_name()
        ))),
        Err(CredentialRetrievalError::MalformedHelperResponse) => Err(bad(format!(
            "credential helper {} did not print {{\"Username\": ..., \"Secret\": ...}} JSON",
            helper_name()
        ))),
        Err(e) => Err(bad(e.to_string())),
    }
}

fn containers_auth_file() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("REGISTRY_AUTH_FILE").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let runtime = std::env::var_os("XDG_RUNTIME_DIR").filter(|p| !p.is_empty())?;
    Some(PathBuf::from(runtime).join("containers/auth.json"))
}

#[derive(Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: std::collections::HashMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    auth: Option<String>,
}

/// Looks `registry` up in a containers auth.json (a missing file is no credentials).
fn from_auth_file(path: &std::path::Path, registry: &str) -> Result<Option<RegistryAuth>, Error> {
    let bad = |reason: String| Error::Credentials {
        registry: registry.to_owned(),
        reason: format!("{}: {reason}", path.display()),
    };
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(bad(e.to_string())),
    };
    let file: AuthFile = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    let Some(entry) = file
        .auths
        .iter()
        .find(|(key, _)| key_matches(key, registry))
        .map(|(_, v)| v)
    else {
        return Ok(None);
    };
    let Some(encoded) = &entry.auth else {
        return Ok(None);
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|e| bad(format!("auth is not base64: {e}")))?;
    let text = String::from_utf8(decoded).map_err(|_| bad("auth is not UTF-8".into()))?;
    let (user, password) = text
        .split_once(':')
        .ok_or_else(|| bad("auth is not USER:PASSWORD".into()))?;
    Ok(Some(RegistryAuth::Basic(
        user.to_owned(),
        password.to_owned(),
    )))
}

/// Auth file keys may carry a scheme and a path (`https://index.docker.io/v1/`).
fn key_matches(key: &str, registry: &str) -> bool {
    let host = key.split_once("://").map_or(key, |(_, rest)| rest);
    let host = host.split('/').next().unwrap_or(host);
    host == registry || (registry == DOCKER_HUB && host == "index.docker.io")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_file_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth.json");
        // "user:pa:ss" in base64.
        std::fs::write(
            &path,
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dXNlcjpwYTpzcw=="},"127.0.0.1:5000":{"auth":"dXNlcjpwYTpzcw=="}}}"#,
        )
        .unwrap();
        for registry in ["docker.io", "127.0.0.1:5000"] {
            match from_auth_file(&path, registry).unwrap() {
                Some(RegistryAuth::Basic(u, p)) => {
                    assert_eq!((u.as_str(), p.as_str()), ("user", "pa:ss"))
                }
                other => panic!("{registry}: {other:?}"),
            }
        }
        assert!(from_auth_file(&path, "127.0.0.1:5001").unwrap().is_none());
        assert!(from_auth_file(&dir.path().join("none.json"), "x")
            .unwrap()
            .is_none());
        std::fs::write(&path, "{").unwrap();
        assert!(from_auth_file(&path, "x")
            .unwrap_err()
            .to_string()
            .contains("auth.json"));
    }

    #[test]
    fn docker_config_file_problems() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let none = from_docker_config(&path, "127.0.0.1:5000").unwrap();
        assert!(matches!(none.auth, RegistryAuth::Anonymous) && none.origin.is_none());
        std::fs::write(
            &path,
            r#"{"auths":{"127.0.0.1:5000":{"auth":"dXNlcjpwYTpzcw=="}}}"#,
        )
        .unwrap();
        let found = from_docker_config(&path, "127.0.0.1:5000").unwrap();
        assert!(matches!(found.auth, RegistryAuth::Basic(..)));
        assert!(found.refusal_hint().contains("config.json"));
        std::fs::write(&path, r#"{"credsStore": 7}"#).unwrap();
        let err = from_docker_config(&path, "127.0.0.1:5000").unwrap_err();
        assert!(err.to_string().contains("config.json"), "{err}");
    }

    #[test]
    fn which_helper_serves_a_registry() {
        let helpers: DockerHelpers = serde_json::from_str(
            r#"{"credsStore": "store", "credHelpers": {"a.example": "per-registry"},
                "auths": {"b.example": {"auth": "dXNlcjpwYTpzcw=="}, "c.example": {}}}"#,
        )
        .unwrap();
        let helper = |registry| helpers.helper_for(registry, registry);
        assert_eq!(
            helper("a.example").as_deref(),
            Some("docker-credential-per-registry")
        );
        assert_eq!(helper("b.example"), None);
        for registry in ["c.example", "d.example"] {
            assert_eq!(helper(registry).as_deref(), Some("docker-credential-store"));
        }
    }

    #[test]
    fn creds_flag_needs_a_colon() {
        let r = DockerRef::parse("127.0.0.1:5000/x").unwrap();
        assert!(credentials(&r, Some("nocolon")).is_err());
        assert!(matches!(
            credentials(&r, Some("u:p")).unwrap().auth,
            RegistryAuth::Basic(..)
        ));
    }
}
