//! Values shared by the machines, the journal and the drivers: commit ids,
//! image digests, releases and failures.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A git commit id (SHA-1), stored as its 20 raw bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CommitId(pub [u8; 20]);

impl CommitId {
    /// Returns the first 12 hex digits, the form used in logs.
    pub fn short(&self) -> String {
        self.to_string()[..12].to_string()
    }
}

impl fmt::Display for CommitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for CommitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CommitId({self})")
    }
}

impl FromStr for CommitId {
    type Err = ParseIdError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        parse_hex::<20>(text.trim()).map(CommitId).ok_or_else(|| ParseIdError { value: text.to_string(), expected: "a 40-digit hex SHA-1 commit id" })
    }
}

/// A sha256 content digest of an image manifest, stored as its 32 raw bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Digest(pub [u8; 32]);

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl FromStr for Digest {
    type Err = ParseIdError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        text.trim()
            .strip_prefix("sha256:")
            .and_then(parse_hex::<32>)
            .map(Digest)
            .ok_or_else(|| ParseIdError { value: text.to_string(), expected: "sha256: followed by 64 hex digits" })
    }
}

/// Error for a commit id or digest that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid id {value:?}: expected {expected}")]
pub struct ParseIdError {
    pub value: String,
    pub expected: &'static str,
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for byte in bytes {
        write!(f, "{byte:02x}")?;
    }
    Ok(())
}

fn parse_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != N * 2 || !text.is_ascii() {
        return None;
    }
    let mut bytes = [0u8; N];
    for (index, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[index * 2..index * 2 + 2], 16).ok()?;
    }
    Some(bytes)
}

/// An image reference split into repository, tag and digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageReference {
    /// Registry host and path, for example `127.0.0.1:5000/stack/app`.
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl ImageReference {
    /// Parses `repository[:tag][@sha256:digest]`. A colon before the last
    /// slash belongs to the registry host's port, not to the tag.
    pub fn parse(reference: &str) -> Result<Self, ParseIdError> {
        let invalid = || ParseIdError { value: reference.to_string(), expected: "an image reference such as host:port/name:tag" };
        let (name, digest) = match reference.split_once('@') {
            Some((name, digest)) => (name, Some(digest.parse::<Digest>().map_err(|_| invalid())?)),
            None => (reference, None),
        };

        let last_slash = name.rfind('/').map_or(0, |index| index + 1);
        let (repository, tag) = match name[last_slash..].rfind(':') {
            Some(colon) => (&name[..last_slash + colon], Some(name[last_slash + colon + 1..].to_string())),
            None => (name, None),
        };
        if repository.is_empty() || repository.contains(char::is_whitespace) || tag.as_deref() == Some("") {
            return Err(invalid());
        }
        Ok(ImageReference { repository: repository.to_string(), tag, digest })
    }

    /// Returns `repository@digest`, the reference that pins one manifest.
    pub fn pinned(&self, digest: &Digest) -> String {
        format!("{}@{}", self.repository, digest)
    }

    /// Returns the repository as the Docker daemon lists it in `RepoDigests`:
    /// an image without a registry host lives on Docker Hub.
    pub fn canonical_repository(&self) -> String {
        canonical_repository(&self.repository)
    }
}

/// Normalizes a repository name the way the Docker daemon does, so that
/// `busybox`, `library/busybox` and `docker.io/library/busybox` compare equal.
pub fn canonical_repository(repository: &str) -> String {
    let first = repository.split('/').next().unwrap_or_default();
    let has_registry = repository.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    if has_registry {
        return repository.to_string();
    }
    if repository.contains('/') { format!("docker.io/{repository}") } else { format!("docker.io/library/{repository}") }
}

/// One Compose service and the image it runs, pinned to a manifest digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceImage {
    pub service: String,
    /// The image reference as the compose file writes it.
    pub image: String,
    pub digest: Digest,
}

impl ServiceImage {
    /// Returns the digest-pinned reference that the override file uses.
    pub fn pinned_reference(&self) -> String {
        match ImageReference::parse(&self.image) {
            Ok(reference) => reference.pinned(&self.digest),
            Err(_) => format!("{}@{}", self.image, self.digest),
        }
    }
}

/// A commit of the device branch together with the exact images it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub commit: CommitId,
    pub services: Vec<ServiceImage>,
}

/// Kind of a failed step, which decides how it is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureKind {
    /// The commit itself is at fault (invalid file, missing image, wrong
    /// platform): reject it until the branch moves.
    Rejected,
    /// A server or the network failed: retry later with backoff.
    Transient,
    /// The device itself is short of something (disk space, a tool): retry
    /// later and tell the operator.
    Local,
    /// Retrying cannot succeed until a person acts, for example on a changed
    /// server host key: retry later and show that the device needs attention.
    Attention,
    /// A TLS certificate check failed while the wall clock is not
    /// synchronised, so the clock may be at fault: keep the update and retry,
    /// without counting a failure.
    Clock,
}

/// A failed step, in words an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

impl Failure {
    pub fn rejected(message: impl Into<String>) -> Self {
        Failure { kind: FailureKind::Rejected, message: message.into() }
    }

    pub fn transient(message: impl Into<String>) -> Self {
        Failure { kind: FailureKind::Transient, message: message.into() }
    }

    pub fn local(message: impl Into<String>) -> Self {
        Failure { kind: FailureKind::Local, message: message.into() }
    }

    pub fn attention(message: impl Into<String>) -> Self {
        Failure { kind: FailureKind::Attention, message: message.into() }
    }

    pub fn clock(message: impl Into<String>) -> Self {
        Failure { kind: FailureKind::Clock, message: message.into() }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_id_round_trips_through_hex() {
        let text = "0123456789abcdef0123456789abcdef01234567";
        let commit: CommitId = text.parse().unwrap();
        assert_eq!(commit.to_string(), text);
        assert_eq!(commit.short(), "0123456789ab");
    }

    #[test]
    fn commit_id_rejects_short_text() {
        let error = "abc".parse::<CommitId>().unwrap_err();
        assert!(error.to_string().contains("\"abc\""));
    }

    #[test]
    fn image_reference_with_port_and_tag() {
        let reference = ImageReference::parse("127.0.0.1:5000/stack/app:v2").unwrap();
        assert_eq!(reference.repository, "127.0.0.1:5000/stack/app");
        assert_eq!(reference.tag.as_deref(), Some("v2"));
        assert_eq!(reference.digest, None);
    }

    #[test]
    fn image_reference_with_port_no_tag() {
        let reference = ImageReference::parse("localhost:5000/app").unwrap();
        assert_eq!(reference.repository, "localhost:5000/app");
        assert_eq!(reference.tag, None);
    }

    #[test]
    fn image_reference_with_digest() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        let reference = ImageReference::parse(&format!("registry.example/app:1@{digest}")).unwrap();
        assert_eq!(reference.tag.as_deref(), Some("1"));
        assert_eq!(reference.digest.unwrap().to_string(), digest);
        assert_eq!(reference.pinned(&reference.digest.unwrap()), format!("registry.example/app@{digest}"));
    }

    #[test]
    fn canonical_repository_adds_docker_hub() {
        assert_eq!(canonical_repository("busybox"), "docker.io/library/busybox");
        assert_eq!(canonical_repository("me/app"), "docker.io/me/app");
        assert_eq!(canonical_repository("127.0.0.1:5000/app"), "127.0.0.1:5000/app");
        assert_eq!(canonical_repository("localhost/app"), "localhost/app");
    }
}
