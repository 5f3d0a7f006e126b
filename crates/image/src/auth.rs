//! Registry credentials: `--creds USER:PASS`, then the containers auth file
//! (`$REGISTRY_AUTH_FILE`, else `$XDG_RUNTIME_DIR/containers/auth.json`), then Docker's
//! `~/.docker/config.json` with its credential stores and helpers (docker_credential).
//! Nothing found means anonymous access.

use std::path::PathBuf;

use base64::Engine;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

use crate::reference::{DockerRef, DOCKER_HUB};
use crate::Error;

/// The key Docker uses for Docker Hub in config.json.
const DOCKER_HUB_CONFIG_KEY: &str = "https://index.docker.io/v1/";

/// Credentials for the registry of `reference`.
pub(crate) fn credentials(
    reference: &DockerRef,
    creds: Option<&str>,
) -> Result<RegistryAuth, Error> {
    let registry = reference.registry.as_str();
    if let Some(creds) = creds {
        let (user, password) = creds.split_once(':').ok_or_else(|| Error::Credentials {
            registry: registry.to_owned(),
            reason: "--creds must be USER:PASSWORD".into(),
        })?;
        return Ok(RegistryAuth::Basic(user.to_owned(), password.to_owned()));
    }
    if let Some(path) = containers_auth_file() {
        if let Some(auth) = from_auth_file(&path, registry)? {
            return Ok(auth);
        }
    }
    let server = if registry == DOCKER_HUB {
        DOCKER_HUB_CONFIG_KEY
    } else {
        registry
    };
    match docker_credential::get_credential(server) {
        Ok(docker_credential::DockerCredential::UsernamePassword(user, password)) => {
            Ok(RegistryAuth::Basic(user, password))
        }
        Ok(docker_credential::DockerCredential::IdentityToken(token)) => {
            Ok(RegistryAuth::Bearer(token))
        }
        Err(e) => {
            tracing::debug!("no Docker credentials for {registry}: {e}");
            Ok(RegistryAuth::Anonymous)
        }
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
    fn creds_flag_needs_a_colon() {
        let r = DockerRef::parse("127.0.0.1:5000/x").unwrap();
        assert!(credentials(&r, Some("nocolon")).is_err());
        assert!(matches!(
            credentials(&r, Some("u:p")).unwrap(),
            RegistryAuth::Basic(..)
        ));
    }
}
