//! Authentication of git commands to the server of the device branch, with
//! no prompt and no secret on any command line.
//!
//! - ssh: `GIT_SSH_COMMAND` runs OpenSSH with the deploy key only
//!   (`IdentitiesOnly`, no agent), `BatchMode`, and `StrictHostKeyChecking=yes`
//!   against a `known_hosts` file of its own, written from the pinned keys in
//!   the configuration. Neither `~/.ssh/config` nor the system's known hosts
//!   are read.
//! - https: the token goes into an `Authorization` header through git's
//!   environment configuration (`GIT_CONFIG_COUNT`), scoped to the
//!   repository's scheme, host and port, so git sends it nowhere else.

use std::path::{Path, PathBuf};

use base64::Engine as _;

use crate::credentials::GitCredentials;
use crate::driver::process::CommandSpec;
use crate::secret::Secret;

/// Name of the `known_hosts` file inside its directory.
const KNOWN_HOSTS_FILE: &str = "known_hosts";

/// Seconds ssh waits for the TCP connection before it gives up.
const SSH_CONNECT_TIMEOUT_SECONDS: u32 = 30;

/// The environment that lets git reach the server, and the values that must
/// print as `***`.
#[derive(Debug, Clone, Default)]
pub struct GitAccess {
    environment: Vec<(String, String)>,
    secrets: Vec<Secret>,
    /// `known_hosts` file that ssh checks the server against, if ssh is used.
    pub known_hosts: Option<PathBuf>,
}

/// Errors of preparing git's access to the server.
#[derive(Debug, thiserror::Error)]
pub enum GitAccessError {
    /// The `known_hosts` file could not be written.
    #[error("cannot write the ssh known_hosts file {}: {source}", path.display())]
    KnownHosts { path: PathBuf, source: std::io::Error },
}

impl GitAccess {
    /// Prepares access for `repository` with `credentials`. For ssh, writes
    /// the pinned host keys to `<directory>/known_hosts`, replacing the file.
    pub fn prepare(credentials: &GitCredentials, repository: &str, directory: &Path) -> Result<GitAccess, GitAccessError> {
        match credentials {
            GitCredentials::None => {
                Ok(GitAccess { environment: vec![("GIT_SSH_COMMAND".into(), "ssh -F /dev/null -o BatchMode=yes".into())], ..GitAccess::default() })
            }
            GitCredentials::Ssh { key_file, host_pattern, host_keys } => {
                let known_hosts = directory.join(KNOWN_HOSTS_FILE);
                write_known_hosts(&known_hosts, host_pattern, host_keys).map_err(|source| GitAccessError::KnownHosts { path: known_hosts.clone(), source })?;
                let command = ssh_command(key_file, &known_hosts);
                Ok(GitAccess { environment: vec![("GIT_SSH_COMMAND".into(), command)], secrets: Vec::new(), known_hosts: Some(known_hosts) })
            }
            GitCredentials::Https { token, username } => Ok(https_access(repository, token, username.as_deref())),
        }
    }

    /// Adds the environment and the secrets to a git command.
    pub fn apply(&self, mut spec: CommandSpec) -> CommandSpec {
        for (key, value) in &self.environment {
            spec = spec.env(key.clone(), value.clone());
        }
        for secret in &self.secrets {
            spec = spec.secret(secret.clone());
        }
        spec
    }
}

/// Returns the `GIT_SSH_COMMAND` for a deploy key and a pinned host key file.
/// Git runs it through the shell, so the paths are quoted.
fn ssh_command(key_file: &Path, known_hosts: &Path) -> String {
    [
        "ssh".to_string(),
        "-F /dev/null".to_string(),
        "-o BatchMode=yes".to_string(),
        "-o StrictHostKeyChecking=yes".to_string(),
        format!("-o UserKnownHostsFile={}", shell_quote(&known_hosts.to_string_lossy())),
        "-o GlobalKnownHostsFile=/dev/null".to_string(),
        "-o UpdateHostKeys=no".to_string(),
        "-o IdentitiesOnly=yes".to_string(),
        "-o IdentityAgent=none".to_string(),
        format!("-o IdentityFile={}", shell_quote(&key_file.to_string_lossy())),
        "-o PasswordAuthentication=no".to_string(),
        "-o KbdInteractiveAuthentication=no".to_string(),
        format!("-o ConnectTimeout={SSH_CONNECT_TIMEOUT_SECONDS}"),
    ]
    .join(" ")
}

/// Writes one `pattern key` line per pinned key, through a temporary file
/// and a rename, so ssh never reads a half-written file.
fn write_known_hosts(path: &Path, pattern: &str, keys: &[String]) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut text = String::new();
    for key in keys {
        let mut parts = key.split_whitespace();
        if let (Some(key_type), Some(data)) = (parts.next(), parts.next()) {
            text.push_str(&format!("{pattern} {key_type} {data}\n"));
        }
    }
    let temporary = path.with_extension("new");
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, path)
}

fn https_access(repository: &str, token: &Secret, username: Option<&str>) -> GitAccess {
    let header_value = match username {
        Some(username) => {
            let pair = format!("{username}:{}", token.expose());
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair))
        }
        None => format!("Bearer {}", token.expose()),
    };
    let header = format!("Authorization: {header_value}");
    let key = format!("http.{}.extraHeader", url_scope(repository));
    let environment =
        vec![("GIT_CONFIG_COUNT".to_string(), "1".to_string()), ("GIT_CONFIG_KEY_0".to_string(), key), ("GIT_CONFIG_VALUE_0".to_string(), header)];
    let secrets = vec![token.clone(), Secret::new(header_value)];
    GitAccess { environment, secrets, known_hosts: None }
}

/// Returns `scheme://host[:port]/` of a URL: the part of git's `http.<url>.*`
/// matching that limits a setting to one server.
fn url_scope(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("https", url));
    let authority = rest.split('/').next().unwrap_or_default();
    let host = authority.rsplit('@').next().unwrap_or_default();
    format!("{scheme}://{host}/")
}

/// Quotes `text` for a POSIX shell.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::time::Duration;

    use super::*;
    use crate::driver::process;

    fn environment_of(access: &GitAccess, key: &str) -> Option<String> {
        access.environment.iter().find(|(name, _)| name == key).map(|(_, value)| value.clone())
    }

    #[test]
    fn ssh_command_pins_the_host_key() {
        let directory = tempfile::tempdir().unwrap();
        let credentials = GitCredentials::Ssh {
            key_file: PathBuf::from("/etc/eventpi/deploy key"),
            host_pattern: "[127.0.0.1]:2222".into(),
            host_keys: vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBx7 root@server".into()],
        };

        let access = GitAccess::prepare(&credentials, "ssh://git@127.0.0.1:2222/stack.git", directory.path()).unwrap();

        let command = environment_of(&access, "GIT_SSH_COMMAND").unwrap();
        for option in ["StrictHostKeyChecking=yes", "IdentitiesOnly=yes", "BatchMode=yes", "GlobalKnownHostsFile=/dev/null", "-F /dev/null"] {
            assert!(command.contains(option), "{option} missing from {command}");
        }
        assert!(command.contains("IdentityFile='/etc/eventpi/deploy key'"), "{command}");
        let known_hosts = std::fs::read_to_string(directory.path().join("known_hosts")).unwrap();
        assert_eq!(known_hosts, "[127.0.0.1]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBx7\n");
    }

    #[test]
    fn header_is_scoped_to_the_server() {
        let token = Secret::new("glpat-123");

        let bearer = https_access("https://git.example.net:8443/fleet/stack.git", &token, None);
        let basic = https_access("https://git.example.net/fleet/stack.git", &token, Some("oauth2"));

        assert_eq!(environment_of(&bearer, "GIT_CONFIG_KEY_0").unwrap(), "http.https://git.example.net:8443/.extraHeader");
        assert_eq!(environment_of(&bearer, "GIT_CONFIG_VALUE_0").unwrap(), "Authorization: Bearer glpat-123");
        let expected = base64::engine::general_purpose::STANDARD.encode("oauth2:glpat-123");
        assert_eq!(environment_of(&basic, "GIT_CONFIG_VALUE_0").unwrap(), format!("Authorization: Basic {expected}"));
    }

    /// Runs `git ls-remote` against a one-shot HTTP server on a loopback port
    /// and returns the request head it received.
    #[tokio::test]
    async fn token_travels_in_header_not_command_line() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut request = Vec::new();
            let mut buffer = [0u8; 4096];
            while !request.windows(4).any(|window| window == b"\r\n\r\n") {
                let count = stream.read(&mut buffer).unwrap();
                if count == 0 {
                    break;
                }
                request.extend_from_slice(&buffer[..count]);
            }
            let _ = stream.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            String::from_utf8_lossy(&request).into_owned()
        });
        let url = format!("http://127.0.0.1:{port}/stack.git");
        let access = https_access(&url, &Secret::new("tok-789"), None);
        let spec = access.apply(
            CommandSpec::new("git", Duration::from_secs(20))
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .env("GIT_CONFIG_GLOBAL", "/dev/null")
                .env("GIT_TERMINAL_PROMPT", "0")
                .args(["ls-remote", &url]),
        );

        let error = process::run(&spec).await.unwrap_err();
        let request = server.join().unwrap();

        assert!(request.contains("Authorization: Bearer tok-789"), "{request}");
        assert!(!spec.display().contains("tok-789"), "{}", spec.display());
        assert!(!error.to_string().contains("tok-789"), "{error}");
    }
}
