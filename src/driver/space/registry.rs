//! Reads an image's layer sizes from its registry's manifest over HTTP(S),
//! with the credentials the daemon gets for pulls.
//!
//! It follows the registry API (the OCI distribution specification) the way
//! the Docker daemon uses it. A manifest request accepts the image and index
//! media types, and a 401 gets one retry with basic authentication or a
//! bearer token. For an index it reads the manifest of the device's platform. Registries that the daemon treats as
//! insecure are tried over HTTPS first and then over plain HTTP.

use std::net::IpAddr;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::credentials::{RegistryCredentials, registry_host};
use crate::model::ImageReference;
use crate::platform::Platform;

/// Time one registry request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest manifest or token response read, in bytes.
const MAX_RESPONSE: usize = 4 * 1024 * 1024;

/// Media types a manifest request accepts: image manifests and indexes.
const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// Errors of a manifest read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The registry could not be reached.
    #[error("cannot reach the registry of {image}: {detail}")]
    Unreachable { image: String, detail: String },

    /// The registry returned an error status.
    #[error("registry returned {status} for the manifest of {image}")]
    Status { image: String, status: StatusCode },

    /// The manifest is not JSON of a known kind, or has no entry for the platform.
    #[error("manifest of {image} is not usable: {detail}")]
    Invalid { image: String, detail: String },
}

/// Size of an image as its manifest gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestSize {
    /// `sha256:...` of the manifest, from the `Docker-Content-Digest` header.
    pub digest: Option<String>,
    /// Sum of the compressed layers and the config blob, in bytes.
    pub compressed_bytes: u64,
    pub layers: usize,
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// Reads manifests with the registry credentials of the agent.
#[derive(Clone)]
pub struct ManifestReader {
    client: HttpsClient,
    credentials: RegistryCredentials,
    /// Hosts, and networks as CIDR text, that the daemon reaches over plain HTTP.
    insecure: Vec<String>,
}

impl ManifestReader {
    pub fn new(credentials: RegistryCredentials, insecure: Vec<String>) -> ManifestReader {
        let https = hyper_rustls::HttpsConnectorBuilder::new().with_webpki_roots().https_or_http().enable_http1().build();
        let client = Client::builder(TokioExecutor::new()).build(https);
        ManifestReader { client, credentials, insecure }
    }

    /// Returns the compressed size of `image` for `platform`.
    pub async fn size(&self, image: &str, platform: &Platform) -> Result<ManifestSize, ManifestError> {
        let reference = ImageReference::parse(image).map_err(|error| ManifestError::Invalid { image: image.to_string(), detail: error.to_string() })?;
        let host = registry_host(&reference.repository);
        let (endpoint, name) = endpoint_and_name(&host, &reference.repository);
        let tag = match (&reference.digest, &reference.tag) {
            (Some(digest), _) => digest.to_string(),
            (None, Some(tag)) => tag.clone(),
            (None, None) => "latest".to_string(),
        };

        let session = Session { reader: self, image, endpoint: &endpoint, host: &host, name: &name };
        let (digest, document) = session.manifest(&tag).await?;
        if document.get("manifests").is_some() {
            let chosen = choose_platform(&document, platform)
                .ok_or_else(|| ManifestError::Invalid { image: image.to_string(), detail: format!("no manifest for platform {platform}") })?;
            let (_, manifest) = session.manifest(&chosen).await?;
            return sum_layers(image, &manifest, digest);
        }
        sum_layers(image, &document, digest)
    }

    fn insecure(&self, host: &str) -> bool {
        let bare = host.rsplit_once(':').filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit())).map_or(host, |(bare, _)| bare);
        let bare = bare.trim_start_matches('[').trim_end_matches(']');
        if bare == "localhost" {
            return true;
        }
        let address = bare.parse::<IpAddr>().ok();
        self.insecure.iter().any(|entry| entry == host || entry == bare || address.is_some_and(|address| in_network(address, entry)))
    }
}

/// One image's requests: the scheme that works and the token that a bearer
/// challenge gave.
struct Session<'a> {
    reader: &'a ManifestReader,
    image: &'a str,
    endpoint: &'a str,
    host: &'a str,
    name: &'a str,
}

impl Session<'_> {
    /// Fetches one manifest and returns the digest header and the JSON.
    async fn manifest(&self, reference: &str) -> Result<(Option<String>, serde_json::Value), ManifestError> {
        let path = format!("/v2/{}/manifests/{reference}", self.name);
        let (status, headers, body) = self.get_with_auth(&path).await?;
        if !status.is_success() {
            return Err(ManifestError::Status { image: self.image.to_string(), status });
        }
        let digest = headers.get("docker-content-digest").and_then(|value| value.to_str().ok()).map(str::to_string);
        let document = serde_json::from_slice(&body).map_err(|error| ManifestError::Invalid { image: self.image.to_string(), detail: error.to_string() })?;
        Ok((digest, document))
    }

    async fn get_with_auth(&self, path: &str) -> Result<(StatusCode, hyper::HeaderMap, Bytes), ManifestError> {
        let (status, headers, body) = self.get(path, None).await?;
        if status != StatusCode::UNAUTHORIZED {
            return Ok((status, headers, body));
        }
        let challenge = headers.get(hyper::header::WWW_AUTHENTICATE).and_then(|value| value.to_str().ok()).unwrap_or_default().to_string();
        let authorization = self.authorization(&challenge).await?;
        self.get(path, authorization.as_deref()).await
    }

    /// Returns the `Authorization` header value for the `challenge` of a 401.
    async fn authorization(&self, challenge: &str) -> Result<Option<String>, ManifestError> {
        let basic = self.basic();
        if challenge.to_ascii_lowercase().starts_with("basic") {
            return Ok(basic);
        }
        let Some(parameters) = challenge.strip_prefix("Bearer ").or_else(|| challenge.strip_prefix("bearer ")) else { return Ok(basic) };
        let parameters = parse_challenge(parameters);
        let Some(realm) = parameters.iter().find(|(key, _)| key == "realm").map(|(_, value)| value.clone()) else { return Ok(basic) };
        let mut query = vec![format!("scope=repository:{}:pull", self.name)];
        if let Some(service) = parameters.iter().find(|(key, _)| key == "service").map(|(_, value)| value) {
            query.push(format!("service={service}"));
        }
        let url = format!("{realm}{}{}", if realm.contains('?') { "&" } else { "?" }, query.join("&"));

        let (status, _, body) = self.send(&url, basic.as_deref()).await?;
        if !status.is_success() {
            return Err(ManifestError::Status { image: self.image.to_string(), status });
        }
        let document: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|error| ManifestError::Invalid { image: self.image.to_string(), detail: format!("token response: {error}") })?;
        let token = document.get("token").or_else(|| document.get("access_token")).and_then(serde_json::Value::as_str);
        Ok(token.map(|token| format!("Bearer {token}")))
    }

    fn basic(&self) -> Option<String> {
        let credentials = self.reader.credentials.for_host(self.host)?;
        let pair = format!("{}:{}", credentials.username.unwrap_or_default(), credentials.password.unwrap_or_default());
        Some(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair)))
    }

    /// Sends a GET to the registry over HTTPS, and over HTTP when HTTPS
    /// cannot connect and the daemon treats the registry as insecure.
    async fn get(&self, path: &str, authorization: Option<&str>) -> Result<(StatusCode, hyper::HeaderMap, Bytes), ManifestError> {
        let secure = self.send(&format!("https://{}{path}", self.endpoint), authorization).await;
        match secure {
            Err(ManifestError::Unreachable { .. }) if self.reader.insecure(self.host) => {
                self.send(&format!("http://{}{path}", self.endpoint), authorization).await
            }
            other => other,
        }
    }

    async fn send(&self, url: &str, authorization: Option<&str>) -> Result<(StatusCode, hyper::HeaderMap, Bytes), ManifestError> {
        let unreachable = |detail: String| ManifestError::Unreachable { image: self.image.to_string(), detail };
        let mut request = Request::get(url)
            .header(hyper::header::ACCEPT, ACCEPT)
            .header(hyper::header::USER_AGENT, concat!("eventpi-autoupdate/", env!("CARGO_PKG_VERSION")));
        if let Some(authorization) = authorization {
            request = request.header(hyper::header::AUTHORIZATION, authorization);
        }
        let request = request.body(Empty::new()).map_err(|error| unreachable(error.to_string()))?;

        let exchange = async {
            let response = self.reader.client.request(request).await.map_err(|error| unreachable(format!("{url}: {error}")))?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_RESPONSE).collect().await.map_err(|error| unreachable(format!("{url}: {error}")))?.to_bytes();
            Ok((parts.status, parts.headers, body))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| unreachable(format!("{url} timed out after {}", humantime::format_duration(REQUEST_TIMEOUT))))?
    }
}

/// Returns the host to connect to and the repository name within it. Docker
/// Hub serves `registry-1.docker.io`, and its one-part names live under
/// `library/`.
fn endpoint_and_name(host: &str, repository: &str) -> (String, String) {
    let path = repository.strip_prefix(&format!("{host}/")).unwrap_or(repository);
    if host == crate::credentials::DOCKER_HUB {
        let path = path.strip_prefix("docker.io/").or_else(|| path.strip_prefix("index.docker.io/")).unwrap_or(path);
        let name = if path.contains('/') { path.to_string() } else { format!("library/{path}") };
        return ("registry-1.docker.io".to_string(), name);
    }
    (host.to_string(), path.to_string())
}

/// Returns the digest of the index entry for `platform`.
fn choose_platform(index: &serde_json::Value, platform: &Platform) -> Option<String> {
    let manifests = index.get("manifests")?.as_array()?;
    manifests
        .iter()
        .find(|entry| {
            let Some(entry_platform) = entry.get("platform") else { return false };
            let text = |key: &str| entry_platform.get(key).and_then(serde_json::Value::as_str).unwrap_or_default().to_string();
            let candidate =
                Platform { os: text("os"), architecture: text("architecture"), variant: Some(text("variant")).filter(|variant| !variant.is_empty()) };
            platform.accepts(&candidate)
        })
        .and_then(|entry| entry.get("digest")?.as_str().map(str::to_string))
}

fn sum_layers(image: &str, manifest: &serde_json::Value, digest: Option<String>) -> Result<ManifestSize, ManifestError> {
    let layers = manifest
        .get("layers")
        .and_then(serde_json::Value::as_array)
        .ok_or_else(|| ManifestError::Invalid { image: image.to_string(), detail: "the manifest lists no layers".into() })?;
    let size = |entry: &serde_json::Value| entry.get("size").and_then(serde_json::Value::as_u64).unwrap_or(0);
    let config = manifest.get("config").map_or(0, size);
    let compressed_bytes = layers.iter().map(size).sum::<u64>() + config;
    Ok(ManifestSize { digest, compressed_bytes, layers: layers.len() })
}

/// Splits `key="value",key2="value2"` of a `WWW-Authenticate` header.
fn parse_challenge(text: &str) -> Vec<(String, String)> {
    let mut parameters = Vec::new();
    let mut rest = text.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, remaining) = match after.strip_prefix('"') {
            Some(quoted) => match quoted.split_once('"') {
                Some((value, remaining)) => (value.to_string(), remaining),
                None => (quoted.to_string(), ""),
            },
            None => match after.split_once(',') {
                Some((value, remaining)) => (value.trim().to_string(), remaining),
                None => (after.trim().to_string(), ""),
            },
        };
        parameters.push((key, value));
        rest = remaining.trim_start_matches(',').trim();
    }
    parameters
}

/// Tells whether `address` is in the network `cidr`, such as `127.0.0.0/8`.
fn in_network(address: IpAddr, cidr: &str) -> bool {
    let Some((network, length)) = cidr.split_once('/') else { return false };
    let (Ok(network), Ok(length)) = (network.parse::<IpAddr>(), length.parse::<u32>()) else { return false };
    match (address, network) {
        (IpAddr::V4(address), IpAddr::V4(network)) if length <= 32 => {
            let mask = if length == 0 { 0 } else { u32::MAX << (32 - length) };
            u32::from(address) & mask == u32::from(network) & mask
        }
        (IpAddr::V6(address), IpAddr::V6(network)) if length <= 128 => {
            let mask = if length == 0 { 0 } else { u128::MAX << (128 - length) };
            u128::from(address) & mask == u128::from(network) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_names_get_library() {
        assert_eq!(endpoint_and_name("docker.io", "busybox"), ("registry-1.docker.io".into(), "library/busybox".into()));
        assert_eq!(endpoint_and_name("127.0.0.1:5000", "127.0.0.1:5000/team/web"), ("127.0.0.1:5000".into(), "team/web".into()));
    }

    #[test]
    fn bearer_challenge_is_split() {
        let parameters = parse_challenge(r#"realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#);
        assert_eq!(parameters[0], ("realm".into(), "https://auth.example/token".into()));
        assert_eq!(parameters[1], ("service".into(), "registry.example".into()));
        assert_eq!(parameters[2], ("scope".into(), "repository:a/b:pull".into()));
    }

    #[test]
    fn loopback_is_in_default_insecure_network() {
        let reader = ManifestReader::new(RegistryCredentials::default(), vec!["127.0.0.0/8".into()]);
        assert!(reader.insecure("127.0.0.1:5000"));
        assert!(reader.insecure("localhost:5000"));
        assert!(!reader.insecure("registry.example:5000"));
    }

    #[test]
    fn layers_and_config_are_summed() {
        let manifest = serde_json::json!({"config": {"size": 100}, "layers": [{"size": 1000}, {"size": 24}]});
        let size = sum_layers("r/app:1", &manifest, None).unwrap();
        assert_eq!(size.compressed_bytes, 1124);
        assert_eq!(size.layers, 2);
    }

    #[test]
    fn index_entry_matches_platform() {
        let index = serde_json::json!({"manifests": [
            {"digest": "sha256:aa", "platform": {"os": "linux", "architecture": "amd64"}},
            {"digest": "sha256:bb", "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}}
        ]});
        let platform = Platform::parse("linux/arm64").unwrap();
        assert_eq!(choose_platform(&index, &platform).as_deref(), Some("sha256:bb"));
    }
}
