//! Credentials for the registries and the git server, read once when the
//! agent starts.
//!
//! Every credentials file must be readable by its owner only, with no group
//! or other permission bits. For any other file the agent does not start, and
//! the error gives the file, its mode and the mode it needs. Loading reports
//! every bad file at once. Passwords and tokens are kept as [`Secret`]s.

use std::collections::BTreeMap;
use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use bollard::auth::DockerCredentials;

use crate::config::{Config, GitConfig, RegistryConfig, Transport};
use crate::model::ImageReference;
use crate::secret::{self, Secret, SecretFileError};

/// Registry host under which Docker Hub images are looked up.
pub const DOCKER_HUB: &str = "docker.io";

/// Names Docker uses for Docker Hub, in `config.json` keys and image names.
const DOCKER_HUB_ALIASES: &[&str] = &["docker.io", "index.docker.io", "registry-1.docker.io", "index.docker.io/v1"];

/// Every credential the agent uses.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    pub registries: RegistryCredentials,
    pub git: GitCredentials,
}

/// One problem with a credentials file.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsProblem {
    /// The file is missing, unreadable, empty or open to group or others.
    #[error("{key}: {source}")]
    File { key: String, source: SecretFileError },

    /// A Docker `config.json` does not have what the entry needs.
    #[error("{key}: {message}")]
    DockerConfig { key: String, message: String },

    /// The allowed signers list is missing or can be changed by others.
    #[error("{key}: {message}")]
    AllowedSigners { key: String, message: String },
}

/// Error for credentials the agent cannot use, listing every problem.
#[derive(Debug, thiserror::Error)]
pub struct CredentialsError {
    pub problems: Vec<CredentialsProblem>,
}

impl fmt::Display for CredentialsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot start: {} problem", self.problems.len())?;
        if self.problems.len() != 1 {
            f.write_str("s")?;
        }
        f.write_str(" with credentials files:")?;
        for problem in &self.problems {
            write!(f, "\n  {problem}")?;
        }
        Ok(())
    }
}

impl Credentials {
    /// Reads every credentials file the configuration names and checks the
    /// allowed signers list.
    pub fn load(config: &Config) -> Result<Credentials, CredentialsError> {
        let mut problems = Vec::new();
        let registries = RegistryCredentials::load(&config.registries, &mut problems);
        let git = match &config.stack {
            Some(stack) => GitCredentials::load(&config.git, &stack.repository, &mut problems),
            None => GitCredentials::None,
        };
        check_allowed_signers(&config.git, &mut problems);
        if problems.is_empty() { Ok(Credentials { registries, git }) } else { Err(CredentialsError { problems }) }
    }

    /// Returns every secret, for redaction.
    pub fn secrets(&self) -> Vec<Secret> {
        let mut secrets = self.registries.secrets();
        if let GitCredentials::Https { token, .. } = &self.git {
            secrets.push(token.clone());
        }
        secrets
    }
}

/// A user name and password (or access token) for one registry.
#[derive(Clone, PartialEq, Eq)]
struct RegistryLogin {
    username: String,
    password: Secret,
}

/// Registry credentials by host; `Debug` prints the hosts only.
#[derive(Clone, Default)]
pub struct RegistryCredentials {
    logins: BTreeMap<String, RegistryLogin>,
}

impl fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryCredentials").field("hosts", &self.logins.keys().collect::<Vec<_>>()).finish()
    }
}

impl RegistryCredentials {
    fn load(entries: &[RegistryConfig], problems: &mut Vec<CredentialsProblem>) -> RegistryCredentials {
        let mut logins = BTreeMap::new();
        for (index, entry) in entries.iter().enumerate() {
            let host = normalize_host(&entry.host);
            let login = match (&entry.username, &entry.password_file, &entry.docker_config) {
                (Some(username), Some(password_file), _) => match secret::read_secret_file(password_file) {
                    Ok(password) => Some(RegistryLogin { username: username.clone(), password }),
                    Err(source) => {
                        problems.push(CredentialsProblem::File { key: format!("registry[{index}].password_file"), source });
                        None
                    }
                },
                (_, _, Some(docker_config)) => match login_from_docker_config(docker_config, &host) {
                    Ok(login) => Some(login),
                    Err(problem) => {
                        problems.push(problem.with_key(format!("registry[{index}].docker_config")));
                        None
                    }
                },
                // Configuration validation rejects an entry without credentials.
                _ => None,
            };
            if let Some(login) = login {
                logins.insert(host, login);
            }
        }
        RegistryCredentials { logins }
    }

    /// Builds credentials from a user name and password, for tests and tools.
    pub fn with_login(mut self, host: &str, username: &str, password: Secret) -> RegistryCredentials {
        self.logins.insert(normalize_host(host), RegistryLogin { username: username.to_string(), password });
        self
    }

    /// Returns the credentials for the registry that serves `image`, in the
    /// form the Docker API takes for pulls and manifest reads.
    pub fn for_image(&self, image: &str) -> Option<DockerCredentials> {
        let reference = ImageReference::parse(image).ok()?;
        self.for_host(&registry_host(&reference.repository))
    }

    /// Returns the credentials for one registry host.
    pub fn for_host(&self, host: &str) -> Option<DockerCredentials> {
        let host = normalize_host(host);
        let login = self.logins.get(&host)?;
        Some(DockerCredentials {
            username: Some(login.username.clone()),
            password: Some(login.password.expose().to_string()),
            serveraddress: Some(host),
            ..DockerCredentials::default()
        })
    }

    /// Tells whether any registry has credentials.
    pub fn is_empty(&self) -> bool {
        self.logins.is_empty()
    }

    fn secrets(&self) -> Vec<Secret> {
        self.logins.values().map(|login| login.password.clone()).collect()
    }
}

/// Returns the registry host of a repository such as `127.0.0.1:5000/web`;
/// a repository without one lives on Docker Hub.
pub fn registry_host(repository: &str) -> String {
    let first = repository.split('/').next().unwrap_or_default();
    let has_registry = repository.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    if has_registry { normalize_host(first) } else { DOCKER_HUB.to_string() }
}

/// Reduces a registry name or `config.json` key (`https://host/v1/`) to the
/// host and port, with every Docker Hub alias as `docker.io`.
fn normalize_host(name: &str) -> String {
    let name = name.trim();
    let without_scheme = name.split_once("://").map_or(name, |(_, rest)| rest);
    let trimmed = without_scheme.trim_end_matches('/').to_ascii_lowercase();
    if DOCKER_HUB_ALIASES.contains(&trimmed.as_str()) {
        return DOCKER_HUB.to_string();
    }
    trimmed.split('/').next().unwrap_or_default().to_string()
}

/// Problem found in a Docker `config.json`, before the entry key is known.
struct DockerConfigProblem {
    file: Option<SecretFileError>,
    message: String,
}

impl DockerConfigProblem {
    fn message(message: impl Into<String>) -> DockerConfigProblem {
        DockerConfigProblem { file: None, message: message.into() }
    }

    fn with_key(self, key: String) -> CredentialsProblem {
        match self.file {
            Some(source) => CredentialsProblem::File { key, source },
            None => CredentialsProblem::DockerConfig { key, message: self.message },
        }
    }
}

/// Reads the `auths` entry for `host` from a Docker `config.json`. Credential
/// helpers (`credsStore`, `credHelpers`) are not run: the agent reads only
/// what the file holds.
fn login_from_docker_config(path: &Path, host: &str) -> Result<RegistryLogin, DockerConfigProblem> {
    let text = secret::read_private_file(path).map_err(|source| DockerConfigProblem { file: Some(source), message: String::new() })?;
    let path_text = path.display();
    let document: serde_json::Value = serde_json::from_str(&text)
        .map_err(|error| DockerConfigProblem::message(format!("{path_text} is not valid JSON: line {} column {}", error.line(), error.column())))?;
    let auths = document.get("auths").and_then(serde_json::Value::as_object);
    let entry = auths.and_then(|auths| auths.iter().find(|(key, _)| normalize_host(key) == host).map(|(_, entry)| entry));
    let Some(entry) = entry else {
        let helper = document.get("credHelpers").and_then(|helpers| helpers.get(host)).is_some() || document.get("credsStore").is_some();
        let hint = if helper { "; credential helpers are not supported, run `docker login` with a config.json that stores the credentials" } else { "" };
        return Err(DockerConfigProblem::message(format!("{path_text} has no auths entry for {host}{hint}")));
    };

    let field = |name: &str| entry.get(name).and_then(serde_json::Value::as_str).filter(|value| !value.is_empty());
    if let (Some(username), Some(password)) = (field("username"), field("password")) {
        return Ok(RegistryLogin { username: username.to_string(), password: Secret::new(password) });
    }
    let Some(encoded) = field("auth") else {
        return Err(DockerConfigProblem::message(format!("{path_text}: the auths entry for {host} has neither auth nor username and password")));
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(|| DockerConfigProblem::message(format!("{path_text}: the auth value for {host} is not base64 of user:password")))?;
    let Some((username, password)) = decoded.split_once(':') else {
        return Err(DockerConfigProblem::message(format!("{path_text}: the auth value for {host} is not base64 of user:password")));
    };
    Ok(RegistryLogin { username: username.to_string(), password: Secret::new(password) })
}

/// Credentials for the git server of `stack.repository`.
#[derive(Debug, Clone, Default)]
pub enum GitCredentials {
    /// No credentials: `git://`, a local path, or a server open to all.
    #[default]
    None,
    /// A deploy key and the pinned host keys of an ssh server.
    Ssh {
        key_file: PathBuf,
        /// `known_hosts` pattern of the server, such as `[127.0.0.1]:2222`.
        host_pattern: String,
        host_keys: Vec<String>,
    },
    /// A token sent in an `Authorization` header over HTTPS.
    Https { token: Secret, username: Option<String> },
}

impl GitCredentials {
    fn load(git: &GitConfig, repository: &str, problems: &mut Vec<CredentialsProblem>) -> GitCredentials {
        let transport = Transport::of(repository);
        if let (Some(key_file), Some(host_pattern)) = (&git.ssh_key_file, transport.known_hosts_pattern()) {
            if let Err(source) = secret::check_private_file(key_file) {
                problems.push(CredentialsProblem::File { key: "git.ssh_key_file".into(), source });
            }
            return GitCredentials::Ssh { key_file: key_file.clone(), host_pattern, host_keys: git.ssh_host_keys.clone() };
        }
        if let Some(token_file) = &git.https_token_file {
            return match secret::read_secret_file(token_file) {
                Ok(token) => GitCredentials::Https { token, username: git.https_username.clone() },
                Err(source) => {
                    problems.push(CredentialsProblem::File { key: "git.https_token_file".into(), source });
                    GitCredentials::None
                }
            };
        }
        GitCredentials::None
    }
}

/// Checks that the allowed signers list exists and that only its owner can
/// change it, because a user who can write it decides which commits the
/// device runs.
fn check_allowed_signers(git: &GitConfig, problems: &mut Vec<CredentialsProblem>) {
    let Some(path) = &git.allowed_signers_file else { return };
    if !git.require_signed_commits {
        return;
    }
    let key = "git.allowed_signers_file".to_string();
    let path_text = path.display();
    match std::fs::metadata(path) {
        Err(error) => problems.push(CredentialsProblem::AllowedSigners {
            key,
            message: format!("cannot read {path_text}: {error}; provision the allowed signers list on the reserved partition"),
        }),
        Ok(metadata) if !metadata.is_file() => problems.push(CredentialsProblem::AllowedSigners { key, message: format!("{path_text} is not a regular file") }),
        Ok(metadata) if metadata.permissions().mode() & 0o022 != 0 => {
            let mode = metadata.permissions().mode() & 0o7777;
            problems.push(CredentialsProblem::AllowedSigners {
                key,
                message: format!(
                    "{path_text} has mode {mode:04o}, which lets group or others change it; it needs mode 0644 or stricter: run chmod 0644 {path_text}"
                ),
            });
        }
        Ok(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn private_file(directory: &Path, name: &str, content: &str, mode: u32) -> PathBuf {
        let path = directory.join(name);
        std::fs::write(&path, content).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn image_host_is_found() {
        assert_eq!(registry_host("127.0.0.1:5000/web"), "127.0.0.1:5000");
        assert_eq!(registry_host("registry.example.net/team/web"), "registry.example.net");
        assert_eq!(registry_host("busybox"), "docker.io");
        assert_eq!(registry_host("library/busybox"), "docker.io");
        assert_eq!(registry_host("docker.io/library/busybox"), "docker.io");
    }

    #[test]
    fn login_matches_image_host() {
        let credentials = RegistryCredentials::default().with_login("127.0.0.1:5000", "device", Secret::new("pw"));

        let found = credentials.for_image("127.0.0.1:5000/web:v1").unwrap();

        assert_eq!(found.username.as_deref(), Some("device"));
        assert_eq!(found.password.as_deref(), Some("pw"));
        assert!(credentials.for_image("127.0.0.1:5001/web:v1").is_none());
        assert!(credentials.for_image("busybox:1").is_none());
    }

    #[test]
    fn debug_shows_hosts_only() {
        let credentials = RegistryCredentials::default().with_login("r.example", "device", Secret::new("pw-visible?"));

        let text = format!("{credentials:?}");

        assert!(text.contains("r.example"), "{text}");
        assert!(!text.contains("pw-visible?"), "{text}");
    }

    #[test]
    fn docker_config_auth_is_decoded() {
        let directory = tempfile::tempdir().unwrap();
        let auth = base64::engine::general_purpose::STANDARD.encode("device:s3cr3t");
        let text = format!(
            r#"{{"auths": {{"https://127.0.0.1:5000/v1/": {{"auth": "{auth}"}}, "https://index.docker.io/v1/": {{"username": "hub", "password": "hubpw"}}}}}}"#
        );
        let path = private_file(directory.path(), "config.json", &text, 0o600);

        let local = login_from_docker_config(&path, "127.0.0.1:5000").ok().unwrap();
        let hub = login_from_docker_config(&path, "docker.io").ok().unwrap();

        assert_eq!(local.username, "device");
        assert_eq!(local.password.expose(), "s3cr3t");
        assert_eq!(hub.username, "hub");
    }

    #[test]
    fn docker_config_without_entry_names_host() {
        let directory = tempfile::tempdir().unwrap();
        let path = private_file(directory.path(), "config.json", r#"{"auths": {}, "credsStore": "pass"}"#, 0o600);

        let problem = login_from_docker_config(&path, "r.example").err().unwrap().with_key("registry[0].docker_config".into());

        let message = problem.to_string();
        assert!(message.contains("no auths entry for r.example"), "{message}");
        assert!(message.contains("credential helpers are not supported"), "{message}");
    }

    #[test]
    fn open_password_file_is_rejected() {
        let directory = tempfile::tempdir().unwrap();
        let path = private_file(directory.path(), "password", "s3cr3t\n", 0o644);
        let entry = RegistryConfig { host: "r.example".into(), username: Some("device".into()), password_file: Some(path.clone()), docker_config: None };
        let mut problems = Vec::new();

        let credentials = RegistryCredentials::load(&[entry], &mut problems);

        assert!(credentials.is_empty());
        assert_eq!(problems.len(), 1);
        let message = CredentialsError { problems }.to_string();
        assert!(message.contains("registry[0].password_file"), "{message}");
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("mode 0644"), "{message}");
        assert!(message.contains("0600"), "{message}");
    }

    #[test]
    fn writable_allowed_signers_list_is_rejected() {
        let directory = tempfile::tempdir().unwrap();
        let path = private_file(directory.path(), "allowed_signers", "a@example ssh-ed25519 AAAA\n", 0o666);
        let git = GitConfig { require_signed_commits: true, allowed_signers_file: Some(path), ..GitConfig::default() };
        let mut problems = Vec::new();

        check_allowed_signers(&git, &mut problems);

        assert_eq!(problems.len(), 1);
        assert!(problems[0].to_string().contains("mode 0666"), "{}", problems[0]);
    }
}
