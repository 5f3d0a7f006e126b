//! Pushing the supervisor image to a registry over the OCI distribution API: blobs by
//! monolithic upload (skipped when the registry has them), then the manifest by tag.
//! Anonymous, Basic and Bearer-token (`WWW-Authenticate: Bearer realm=...`) auth.
//! Loopback registries (localhost, 127.0.0.0/8, [::1]) are spoken to over plain HTTP, as
//! Docker does by default; every other registry over HTTPS.

use std::io::Read;

use crate::image::{is_tag, SupervisorImage};
use crate::KubeError;

/// Largest response body read (tokens, error documents).
const MAX_RESPONSE: u64 = 1 << 20;
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// A push destination `HOST[:PORT]/REPOSITORY[:TAG]` (tag `latest` when absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushTarget {
    pub registry: String,
    pub repository: String,
    pub tag: String,
}

impl PushTarget {
    /// Parses a reference that names its registry (a first component with a `.` or `:`,
    /// or `localhost`): a push never guesses a default registry.
    pub fn parse(text: &str) -> Result<Self, KubeError> {
        let invalid = |why: &str| KubeError::InvalidSetting {
            key: "--push".to_owned(),
            value: text.to_owned(),
            accepted: format!("HOST[:PORT]/REPOSITORY[:TAG] with an explicit registry host ({why})"),
        };
        let text = text.strip_prefix("docker://").unwrap_or(text);
        let (registry, rest) = text.split_once('/').ok_or_else(|| invalid("no repository"))?;
        if !(registry.contains('.') || registry.contains(':') || registry == "localhost") {
            return Err(invalid("the first component is not a host"));
        }
        if rest.contains('@') {
            return Err(invalid("a digest cannot be pushed to; give a tag"));
        }
        let (repository, tag) = match rest.rsplit_once(':') {
            Some((repository, tag)) if !tag.contains('/') => (repository, tag),
            _ => (rest, "latest"),
        };
        let component_ok = |c: &str| {
            !c.is_empty()
                && c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
                && c.as_bytes()[0].is_ascii_alphanumeric()
        };
        if !repository.split('/').all(component_ok) {
            return Err(invalid("repository components are lowercase letters, digits, '.', '_' and '-'"));
        }
        if !is_tag(tag) {
            return Err(invalid("bad tag"));
        }
        Ok(Self { registry: registry.to_owned(), repository: repository.to_owned(), tag: tag.to_owned() })
    }

    fn base_url(&self) -> String {
        let host = self.registry.rsplit_once(':').map_or(self.registry.as_str(), |(h, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                &self.registry
            }
        });
        let loopback = host == "localhost" || host == "[::1]" || host.starts_with("127.");
        format!("{}://{}", if loopback { "http" } else { "https" }, self.registry)
    }
}

impl std::fmt::Display for PushTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}:{}", self.registry, self.repository, self.tag)
    }
}

/// Username and password for the registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <password>)", self.username)
    }
}

/// Pushes `image` to `target`; returns the manifest digest the registry stored.
pub fn push_image(
    image: &SupervisorImage,
    target: &PushTarget,
    credentials: Option<&Credentials>,
) -> Result<String, KubeError> {
    let mut session = Session {
        agent: ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(std::time::Duration::from_secs(300)))
                .build(),
        ),
        base: target.base_url(),
        target,
        credentials,
        authorization: None,
    };
    for (digest, bytes) in &image.blobs {
        session.push_blob(digest, bytes)?;
    }
    let url = format!("{}/v2/{}/manifests/{}", session.base, target.repository, target.tag);
    let response = session.send("PUT", &url, Some((MANIFEST_MEDIA_TYPE, &image.manifest)))?;
    session.expect(response, &[201], "uploading the manifest")?;
    Ok(image.manifest_digest.clone())
}

struct Session<'a> {
    agent: ureq::Agent,
    base: String,
    target: &'a PushTarget,
    credentials: Option<&'a Credentials>,
    /// The `Authorization` header value once a challenge was answered.
    authorization: Option<String>,
}

type Response = ureq::http::Response<ureq::Body>;

impl Session<'_> {
    fn fail(&self, message: String) -> KubeError {
        KubeError::Push { reference: self.target.to_string(), message }
    }

    fn push_blob(&mut self, digest: &str, bytes: &[u8]) -> Result<(), KubeError> {
        let repository = &self.target.repository;
        let url = format!("{}/v2/{repository}/blobs/{digest}", self.base);
        if self.send("HEAD", &url, None)?.status().as_u16() == 200 {
            return Ok(());
        }
        let url = format!("{}/v2/{repository}/blobs/uploads/", self.base);
        let response = self.send("POST", &url, Some(("application/octet-stream", &[])))?;
        let response = self.expect(response, &[202], "starting a blob upload")?;
        let location = response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| self.fail("the registry started an upload without a Location header".to_owned()))?;
        let mut url = if location.starts_with('/') { format!("{}{location}", self.base) } else { location.to_owned() };
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&format!("digest={digest}"));
        let response = self.send("PUT", &url, Some(("application/octet-stream", bytes)))?;
        self.expect(response, &[201], &format!("uploading blob {digest}"))?;
        Ok(())
    }

    /// Sends a request, answering one auth challenge if the registry makes one.
    fn send(&mut self, method: &str, url: &str, body: Option<(&str, &[u8])>) -> Result<Response, KubeError> {
        let response = self.send_once(method, url, body)?;
        if response.status().as_u16() != 401 || self.authorization.is_some() {
            return Ok(response);
        }
        let challenge = response.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).unwrap_or_default();
        self.authorization = Some(self.answer(challenge)?);
        self.send_once(method, url, body)
    }

    fn send_once(&self, method: &str, url: &str, body: Option<(&str, &[u8])>) -> Result<Response, KubeError> {
        let mut request = ureq::http::Request::builder().method(method).uri(url);
        if let Some(value) = &self.authorization {
            request = request.header("Authorization", value);
        }
        if let Some((content_type, _)) = body {
            request = request.header("Content-Type", content_type);
        }
        let request = request
            .body(body.map_or_else(Vec::new, |(_, bytes)| bytes.to_vec()))
            .map_err(|e| self.fail(format!("{method} {url}: {e}")))?;
        self.agent.run(request).map_err(|e| self.fail(format!("{method} {url}: {e}")))
    }

    /// The `Authorization` value answering a `WWW-Authenticate` challenge.
    fn answer(&self, challenge: &str) -> Result<String, KubeError> {
        let basic = || {
            self.credentials.map(|c| format!("Basic {}", base64(format!("{}:{}", c.username, c.password).as_bytes())))
        };
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => basic().ok_or_else(|| {
                self.fail(
                    "the registry wants a username and password (Basic auth); pass --creds USER:PASSWORD".to_owned(),
                )
            }),
            "bearer" => {
                let params = parse_challenge(params);
                let realm = params
                    .get("realm")
                    .ok_or_else(|| self.fail(format!("Bearer challenge without a realm: {challenge:?}")))?;
                let scope = format!("repository:{}:pull,push", self.target.repository);
                let mut url = format!("{realm}?scope={}", percent_encode(&scope));
                if let Some(service) = params.get("service") {
                    url.push_str(&format!("&service={}", percent_encode(service)));
                }
                let mut request = self.agent.get(&url);
                if let Some(value) = basic() {
                    request = request.header("Authorization", &value);
                }
                let response = request.call().map_err(|e| self.fail(format!("token request to {realm}: {e}")))?;
                let mut response = self.expect(response, &[200], "getting a registry token")?;
                let mut text = String::new();
                response
                    .body_mut()
                    .as_reader()
                    .take(MAX_RESPONSE)
                    .read_to_string(&mut text)
                    .map_err(|e| self.fail(format!("reading the token: {e}")))?;
                let json: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| self.fail(format!("token response is not JSON: {e}")))?;
                let token = json
                    .get("token")
                    .or_else(|| json.get("access_token"))
                    .and_then(|t| t.as_str())
                    .ok_or_else(|| self.fail("token response has no token".to_owned()))?;
                Ok(format!("Bearer {token}"))
            }
            _ => Err(self.fail(format!("unsupported auth challenge {challenge:?}"))),
        }
    }

    /// Passes a response with one of the `ok` statuses; anything else is an error that
    /// quotes the start of the registry's answer.
    fn expect(&self, mut response: Response, ok: &[u16], what: &str) -> Result<Response, KubeError> {
        let status = response.status().as_u16();
        if ok.contains(&status) {
            return Ok(response);
        }
        let mut text = String::new();
        let _ = response.body_mut().as_reader().take(4096).read_to_string(&mut text);
        Err(self.fail(format!("{what}: HTTP {status}: {}", text.trim())))
    }
}

/// `key="value"` pairs of a `WWW-Authenticate` challenge.
fn parse_challenge(params: &str) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    let mut rest = params.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let (value, remaining) = match after.strip_prefix('"') {
            Some(quoted) => quoted.split_once('"').unwrap_or((quoted, "")),
            None => after.split_once(',').unwrap_or((after, "")),
        };
        out.insert(key, value.to_owned());
        rest = remaining.trim_start_matches(',').trim();
    }
    out
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_targets() {
        let t = PushTarget::parse("127.0.0.1:5000/kiln/kiln-supervisor:0.1").unwrap();
        assert_eq!(
            (t.registry.as_str(), t.repository.as_str(), t.tag.as_str()),
            ("127.0.0.1:5000", "kiln/kiln-supervisor", "0.1")
        );
        assert_eq!(t.base_url(), "http://127.0.0.1:5000");
        let t = PushTarget::parse("docker://registry.example/sup").unwrap();
        assert_eq!((t.tag.as_str(), t.base_url().as_str()), ("latest", "https://registry.example"));
        assert_eq!(PushTarget::parse("localhost/x").unwrap().base_url(), "http://localhost");
        for bad in
            ["kiln-supervisor:1", "library/x", "r.example/X", "r.example/x@sha256:00", "r.example/", "r.example/x:"]
        {
            assert!(PushTarget::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn challenges_and_encodings() {
        let p = parse_challenge(r#"realm="https://auth.example/token",service="registry.example",scope="a,b""#);
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "registry.example");
        assert_eq!(p["scope"], "a,b");
        assert_eq!(base64(b"user:pass"), "dXNlcjpwYXNz");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"a"), "YQ==");
        assert_eq!(percent_encode("repository:a/b:pull,push"), "repository%3Aa%2Fb%3Apull%2Cpush");
    }
}
