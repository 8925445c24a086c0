//! SSH client for patching the Docker host: key authentication, a pinned host
//! key, and commands with a timeout whose output is kept to its tail.
//!
//! There is never a prompt. The host key is compared with the pinned one in
//! `check_server_key`, before authentication, so a host with another key gets
//! neither the client's signature nor a command. Keys and secrets are never
//! logged; a host key appears in messages only as its SHA256 fingerprint.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::{self, AuthResult, Handle};
use russh::keys::ssh_key::public::KeyData;
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{ChannelMsg, Disconnect};

/// Output kept from each stream of a command. The end of it explains a failure.
const KEPT_OUTPUT_BYTES: usize = 64 * 1024;

/// Time between keepalive requests. russh closes the connection after three
/// unanswered ones, so a host that vanished mid-command is noticed after
/// roughly 45 to 60 s (estimated from these settings, not measured).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);

/// The host key the configuration pins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinnedHostKey {
    /// A `SHA256:` fingerprint, as `ssh-keygen -lf` prints it.
    Fingerprint(String),
    /// A whole public key, from a public key line or a `known_hosts` line.
    Key(KeyData),
}

impl PinnedHostKey {
    /// Parses a `SHA256:` fingerprint, a public key line (`ssh-ed25519 AAAA...
    /// comment`) or a `known_hosts` line (`host ssh-ed25519 AAAA...`). The host
    /// names of a `known_hosts` line are not checked: the pin belongs to the
    /// configured address.
    pub fn parse(text: &str) -> Result<PinnedHostKey, String> {
        let text = text.trim();
        if let Some(encoded) = text.strip_prefix("SHA256:") {
            let valid = encoded.len() == 43 && encoded.chars().all(|character| character.is_ascii_alphanumeric() || character == '+' || character == '/');
            if !valid {
                return Err(format!("{text:?} is not a SHA256 fingerprint: expected SHA256: followed by 43 base64 characters, as ssh-keygen -lf prints it"));
            }
            return Ok(PinnedHostKey::Fingerprint(text.to_string()));
        }

        let fields: Vec<&str> = text.split_whitespace().collect();
        if fields.first().is_some_and(|field| field.starts_with('@')) {
            return Err(format!("{} lines are not supported: pin the host's own key", fields[0]));
        }
        let Some(position) = fields.iter().position(|field| is_key_type(field)) else {
            return Err("expected a SHA256: fingerprint, a public key line such as \"ssh-ed25519 AAAA...\", or a known_hosts line".to_string());
        };
        let Some(encoded) = fields.get(position + 1) else {
            return Err(format!("the {} key has no base64 key data after its type", fields[position]));
        };
        let key = PublicKey::from_openssh(&format!("{} {encoded}", fields[position]))
            .map_err(|error| format!("the {} key does not decode: {error}", fields[position]))?;
        Ok(PinnedHostKey::Key(key.key_data().clone()))
    }

    /// Tells whether `offered` is the pinned key.
    pub fn matches(&self, offered: &KeyData) -> bool {
        match self {
            PinnedHostKey::Fingerprint(fingerprint) => offered.fingerprint(HashAlg::Sha256).to_string() == *fingerprint,
            PinnedHostKey::Key(key) => key == offered,
        }
    }

    /// Returns the pinned key's SHA256 fingerprint.
    pub fn fingerprint(&self) -> String {
        match self {
            PinnedHostKey::Fingerprint(fingerprint) => fingerprint.clone(),
            PinnedHostKey::Key(key) => key.fingerprint(HashAlg::Sha256).to_string(),
        }
    }
}

fn is_key_type(field: &str) -> bool {
    field.starts_with("ssh-") || field.starts_with("ecdsa-sha2-") || field.starts_with("sk-")
}

/// Address, user, key and pinned host key of one SSH server.
#[derive(Debug, Clone)]
pub struct SshSettings {
    pub address: String,
    pub port: u16,
    pub user: String,
    pub key_file: PathBuf,
    pub host_key: PinnedHostKey,
    /// Limit for the TCP connection, the handshake and the authentication.
    pub connect_timeout: Duration,
}

impl SshSettings {
    /// Returns `address:port`, bracketing an IPv6 address.
    pub fn endpoint(&self) -> String {
        if self.address.contains(':') { format!("[{}]:{}", self.address, self.port) } else { format!("{}:{}", self.address, self.port) }
    }
}

/// Errors of SSH operations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SshError {
    /// The private key file cannot be read, or it is not an OpenSSH private
    /// key without a passphrase.
    #[error("cannot load the SSH key {path} (host.key_file): {reason}; use an OpenSSH private key without a passphrase")]
    KeyFile { path: PathBuf, reason: String },

    /// The TCP connection or the SSH handshake failed.
    #[error("cannot connect to {endpoint} over SSH: {reason}")]
    Connect { endpoint: String, reason: String },

    /// The connection, the handshake or the authentication took too long.
    #[error("connecting to {endpoint} over SSH timed out after {}", humantime::format_duration(*timeout))]
    ConnectTimedOut { endpoint: String, timeout: Duration },

    /// The host offered a key other than the pinned one. Nothing was sent to it.
    #[error(
        "host {endpoint} offered host key {offered}, which is not the pinned key {pinned} (host.host_key); \
         nothing was run. If the host was reinstalled, read its new key on the host's console \
         (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub) and pin that"
    )]
    HostKeyMismatch { endpoint: String, offered: String, pinned: String },

    /// The host did not accept the key for the user.
    #[error("{endpoint} rejected the SSH key {key_file} for user {user:?}; add its public key to that user's authorized_keys on the host")]
    AuthenticationRejected { endpoint: String, user: String, key_file: PathBuf },

    /// The connection dropped before the command finished.
    #[error("the SSH connection to {endpoint} dropped: {reason}")]
    Disconnected { endpoint: String, reason: String },

    /// The command ran longer than its timeout, so its channel was closed.
    #[error("command `{label}` on {endpoint} timed out after {}", humantime::format_duration(*timeout))]
    CommandTimedOut { endpoint: String, label: String, timeout: Duration },
}

impl SshError {
    /// Tells whether trying again later can help: the network or the host was
    /// down, as opposed to a wrong key or configuration.
    pub fn is_transient(&self) -> bool {
        matches!(self, SshError::Connect { .. } | SshError::ConnectTimedOut { .. } | SshError::Disconnected { .. } | SshError::CommandTimedOut { .. })
    }
}

/// Output and exit status of a finished command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteOutput {
    /// The exit status, or `None` when the command was killed by a signal.
    pub exit_status: Option<u32>,
    pub stdout: String,
    pub stderr: String,
}

impl RemoteOutput {
    pub fn success(&self) -> bool {
        self.exit_status == Some(0)
    }
}

/// Checks the offered host key against the pin and keeps the fingerprint of
/// a rejected one for the error message.
struct PinCheck {
    pinned: PinnedHostKey,
    rejected: Arc<Mutex<Option<String>>>,
}

impl client::Handler for PinCheck {
    type Error = russh::Error;

    async fn check_server_key(&mut self, offered: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let key = match offered {
            PublicKeyOrCertificate::PublicKey { key, .. } => key.key_data(),
            PublicKeyOrCertificate::Certificate(certificate) => certificate.public_key(),
        };
        if self.pinned.matches(key) {
            return Ok(true);
        }
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        *self.rejected.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(fingerprint);
        Ok(false)
    }
}

/// A client with its key loaded, ready to open sessions.
pub struct SshClient {
    settings: SshSettings,
    key: Arc<PrivateKey>,
}

impl SshClient {
    /// Loads the private key. The key stays in memory and is never logged.
    pub fn new(settings: SshSettings) -> Result<SshClient, SshError> {
        let key = load_key(&settings.key_file)?;
        Ok(SshClient { settings, key: Arc::new(key) })
    }

    pub fn settings(&self) -> &SshSettings {
        &self.settings
    }

    /// Opens a session: TCP connection, handshake with the host key check,
    /// then key authentication, all within the connect timeout.
    pub async fn connect(&self) -> Result<SshSession, SshError> {
        let endpoint = self.settings.endpoint();
        let timeout = self.settings.connect_timeout;
        match tokio::time::timeout(timeout, self.open()).await {
            Ok(result) => result,
            Err(_) => Err(SshError::ConnectTimedOut { endpoint, timeout }),
        }
    }

    async fn open(&self) -> Result<SshSession, SshError> {
        let endpoint = self.settings.endpoint();
        let config = client::Config { keepalive_interval: Some(KEEPALIVE_INTERVAL), keepalive_max: 3, nodelay: true, ..client::Config::default() };
        let rejected = Arc::new(Mutex::new(None));
        let handler = PinCheck { pinned: self.settings.host_key.clone(), rejected: rejected.clone() };

        let connected = client::connect(Arc::new(config), (self.settings.address.as_str(), self.settings.port), handler).await;
        let mut handle = match connected {
            Ok(handle) => handle,
            Err(error) => {
                let offered = rejected.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
                return Err(match offered {
                    Some(offered) => SshError::HostKeyMismatch { endpoint, offered, pinned: self.settings.host_key.fingerprint() },
                    None => SshError::Connect { endpoint, reason: describe_russh_error(&error) },
                });
            }
        };

        let hash = handle.best_supported_rsa_hash().await.ok().flatten().flatten();
        let key = PrivateKeyWithHashAlg::new(self.key.clone(), hash);
        let result = handle
            .authenticate_publickey(self.settings.user.clone(), key)
            .await
            .map_err(|error| SshError::Connect { endpoint: endpoint.clone(), reason: describe_russh_error(&error) })?;
        match result {
            AuthResult::Success => Ok(SshSession { handle, endpoint }),
            AuthResult::Failure { .. } => {
                Err(SshError::AuthenticationRejected { endpoint, user: self.settings.user.clone(), key_file: self.settings.key_file.clone() })
            }
        }
    }
}

fn load_key(path: &Path) -> Result<PrivateKey, SshError> {
    russh::keys::load_secret_key(path, None).map_err(|error| SshError::KeyFile { path: path.to_path_buf(), reason: error.to_string() })
}

fn describe_russh_error(error: &russh::Error) -> String {
    match error {
        russh::Error::IO(io) => io.to_string(),
        other => other.to_string(),
    }
}

/// An authenticated SSH connection.
pub struct SshSession {
    handle: Handle<PinCheck>,
    endpoint: String,
}

impl SshSession {
    /// Tells whether the connection is gone.
    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    /// Runs `command` through the login shell of the user with standard input
    /// closed and no terminal, and waits up to `timeout` for it. `label`
    /// names the command in errors and logs instead of its text.
    pub async fn run(&self, label: &str, command: &str, timeout: Duration) -> Result<RemoteOutput, SshError> {
        match tokio::time::timeout(timeout, self.run_to_end(command)).await {
            Ok(result) => result,
            Err(_) => Err(SshError::CommandTimedOut { endpoint: self.endpoint.clone(), label: label.to_string(), timeout }),
        }
    }

    async fn run_to_end(&self, command: &str) -> Result<RemoteOutput, SshError> {
        let dropped = |reason: String| SshError::Disconnected { endpoint: self.endpoint.clone(), reason };
        let mut channel = self.handle.channel_open_session().await.map_err(|error| dropped(describe_russh_error(&error)))?;
        channel.exec(true, command).await.map_err(|error| dropped(describe_russh_error(&error)))?;
        channel.eof().await.map_err(|error| dropped(describe_russh_error(&error)))?;

        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let mut exit_status = None;
        let mut ended_by_signal = false;
        while let Some(message) = channel.wait().await {
            match message {
                ChannelMsg::Data { data } => keep_tail(&mut stdout, &data),
                ChannelMsg::ExtendedData { data, ext: 1 } => keep_tail(&mut stderr, &data),
                ChannelMsg::ExitStatus { exit_status: status } => exit_status = Some(status),
                ChannelMsg::ExitSignal { .. } => ended_by_signal = true,
                _ => {}
            }
        }
        if exit_status.is_none() && !ended_by_signal {
            return Err(dropped("the channel closed before the command reported its exit status".to_string()));
        }
        Ok(RemoteOutput { exit_status, stdout: String::from_utf8_lossy(&stdout).into_owned(), stderr: String::from_utf8_lossy(&stderr).into_owned() })
    }

    /// Closes the connection. Errors are ignored because nothing follows.
    pub async fn close(self) {
        let _ = self.handle.disconnect(Disconnect::ByApplication, "", "en").await;
    }
}

fn keep_tail(kept: &mut Vec<u8>, data: &[u8]) {
    kept.extend_from_slice(data);
    if kept.len() > 2 * KEPT_OUTPUT_BYTES {
        kept.drain(..kept.len() - KEPT_OUTPUT_BYTES);
    }
}

/// Quotes `text` as one word for a POSIX shell.
pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED25519_LINE: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ host@example";

    fn key_data() -> KeyData {
        PublicKey::from_openssh(ED25519_LINE).unwrap().key_data().clone()
    }

    #[test]
    fn public_key_line_matches_its_key() {
        let pinned = PinnedHostKey::parse(ED25519_LINE).unwrap();

        assert!(pinned.matches(&key_data()));
    }

    #[test]
    fn known_hosts_line_matches_its_key() {
        let line = format!("[127.0.0.1]:2222,pi.local {}", ED25519_LINE.trim_end_matches(" host@example"));

        let pinned = PinnedHostKey::parse(&line).unwrap();

        assert!(pinned.matches(&key_data()));
    }

    #[test]
    fn fingerprint_matches_its_key() {
        let fingerprint = key_data().fingerprint(HashAlg::Sha256).to_string();

        let pinned = PinnedHostKey::parse(&fingerprint).unwrap();

        assert!(pinned.matches(&key_data()));
        assert_eq!(pinned.fingerprint(), fingerprint);
    }

    #[test]
    fn other_key_does_not_match() {
        let other = PinnedHostKey::parse("SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").unwrap();

        assert!(!other.matches(&key_data()));
    }

    #[test]
    fn bad_pins_are_rejected() {
        assert!(PinnedHostKey::parse("SHA256:short").is_err());
        assert!(PinnedHostKey::parse("pi.local").is_err());
        assert!(PinnedHostKey::parse("@cert-authority * ssh-ed25519 AAAA").is_err());
        assert!(PinnedHostKey::parse("ssh-ed25519").is_err());
        assert!(PinnedHostKey::parse("ssh-ed25519 bm90IGEga2V5").is_err());
    }

    #[test]
    fn shell_quote_survives_quotes() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
