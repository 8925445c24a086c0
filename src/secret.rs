//! Secrets read from credential files, and the redaction that keeps them out
//! of logs, the journal, the status and error messages.
//!
//! A secret only ever leaves a [`Secret`] through [`Secret::expose`], at the
//! spot that hands it to a server (an HTTP header, git's environment).
//! Command lines and URLs are redacted where they are formatted, so an error
//! that quotes a failing command cannot carry a password.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Text that replaces a secret wherever one would be printed.
pub const REDACTED: &str = "***";

/// Permission bits of group and others; a credentials file must have none.
const GROUP_OTHER_BITS: u32 = 0o077;

/// A password or token. `Debug` and `Display` print `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// Returns the value itself, for the one call that sends it to a server.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// Errors of reading a credentials file.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// Group or others have some access to the file.
    #[error("credentials file {} has mode {mode:04o}, which gives group or others access; it needs mode 0600: run chmod 0600 {}", path.display(), path.display())]
    TooOpen { path: PathBuf, mode: u32 },

    /// The file is missing or cannot be read.
    #[error("cannot read credentials file {}: {source}", path.display())]
    Unreadable { path: PathBuf, source: std::io::Error },

    /// The path names a directory or a device.
    #[error("credentials file {} is not a regular file", path.display())]
    NotAFile { path: PathBuf },

    /// The file contains only white space.
    #[error("credentials file {} is empty", path.display())]
    Empty { path: PathBuf },
}

/// Checks that `path` is a regular file that only its owner can access. A
/// symbolic link is followed: the mode of its target counts.
pub fn check_private_file(path: &Path) -> Result<(), SecretFileError> {
    let metadata = std::fs::metadata(path).map_err(|source| SecretFileError::Unreadable { path: path.to_path_buf(), source })?;
    if !metadata.is_file() {
        return Err(SecretFileError::NotAFile { path: path.to_path_buf() });
    }
    let mode = metadata.permissions().mode() & 0o7777;
    if mode & GROUP_OTHER_BITS != 0 {
        return Err(SecretFileError::TooOpen { path: path.to_path_buf(), mode });
    }
    Ok(())
}

/// Reads a secret from a file that only its owner can access. Leading and
/// trailing white space, such as the newline an editor adds, is dropped.
pub fn read_secret_file(path: &Path) -> Result<Secret, SecretFileError> {
    let text = read_private_file(path)?;
    let value = text.trim();
    if value.is_empty() {
        return Err(SecretFileError::Empty { path: path.to_path_buf() });
    }
    Ok(Secret::new(value))
}

/// Reads a whole file that only its owner can access, such as a Docker
/// `config.json`.
pub fn read_private_file(path: &Path) -> Result<String, SecretFileError> {
    check_private_file(path)?;
    std::fs::read_to_string(path).map_err(|source| SecretFileError::Unreadable { path: path.to_path_buf(), source })
}

/// Replaces every non-empty secret of `secrets` in `text` with `***`, and the
/// credentials of every URL in it (see [`redact_urls`]).
pub fn redact(text: &str, secrets: &[Secret]) -> String {
    let mut redacted = redact_urls(text);
    for secret in secrets {
        if !secret.0.is_empty() {
            redacted = redacted.replace(&secret.0, REDACTED);
        }
    }
    redacted
}

/// Replaces the credentials of every `scheme://user:password@host` URL in
/// `text` with `***`. For `http` and `https` the whole user part goes,
/// because a token is often written as the user name
/// (`https://TOKEN@host/...`); for other schemes, such as `ssh://git@host`,
/// the user name stays and only a password goes.
pub fn redact_urls(text: &str) -> String {
    let mut output = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(position) = rest.find("://") {
        let scheme_start =
            rest[..position].rfind(|character: char| !(character.is_ascii_alphanumeric() || "+-.".contains(character))).map_or(0, |index| index + 1);
        let scheme = rest[scheme_start..position].to_ascii_lowercase();
        let authority_start = position + 3;
        output.push_str(&rest[..authority_start]);
        rest = &rest[authority_start..];

        let authority_end = rest.find(|character: char| character == '/' || character.is_whitespace() || "'\"<>`".contains(character)).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        match authority.rfind('@') {
            Some(at) => {
                let user_info = &authority[..at];
                let hide_user = scheme == "http" || scheme == "https";
                match (hide_user, user_info.split_once(':')) {
                    (true, _) => output.push_str(REDACTED),
                    (false, Some((user, _))) => {
                        output.push_str(user);
                        output.push(':');
                        output.push_str(REDACTED);
                    }
                    (false, None) => output.push_str(user_info),
                }
                output.push_str(&authority[at..]);
            }
            None => output.push_str(authority),
        }
        rest = &rest[authority_end..];
    }
    output.push_str(rest);
    output
}

/// Tells whether `url` carries a password or token in its user part, which
/// [`redact_urls`] would hide.
pub fn url_has_credentials(url: &str) -> bool {
    redact_urls(url) != url
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_prints_redacted() {
        let secret = Secret::new("hunter2");

        assert_eq!(format!("{secret}"), "***");
        assert_eq!(format!("{secret:?}"), "***");
        assert_eq!(secret.expose(), "hunter2");
    }

    #[test]
    fn https_user_and_token_are_redacted() {
        let text = "fatal: unable to access 'https://oauth2:glpat-abc123@git.example.net/fleet.git/': 403";

        let redacted = redact_urls(text);

        assert_eq!(redacted, "fatal: unable to access 'https://***@git.example.net/fleet.git/': 403");
    }

    #[test]
    fn https_token_as_user_name_is_redacted() {
        assert_eq!(redact_urls("https://ghp_token@github.com/o/r.git"), "https://***@github.com/o/r.git");
    }

    #[test]
    fn ssh_user_name_stays() {
        assert_eq!(redact_urls("ssh://git@127.0.0.1:2222/srv/stack.git"), "ssh://git@127.0.0.1:2222/srv/stack.git");
        assert_eq!(redact_urls("ssh://git:pw@host/r.git"), "ssh://git:***@host/r.git");
    }

    #[test]
    fn url_without_credentials_is_unchanged() {
        let text = "git://127.0.0.1:9418/stack.git and http://127.0.0.1:5000/v2/ end";

        assert_eq!(redact_urls(text), text);
        assert!(!url_has_credentials("https://git.example.net/fleet.git"));
        assert!(url_has_credentials("https://user:pw@git.example.net/fleet.git"));
    }

    #[test]
    fn several_urls_in_one_text() {
        let text = "a https://u:p@one/x b HTTPS://t@two c";

        assert_eq!(redact_urls(text), "a https://***@one/x b HTTPS://***@two c");
    }

    #[test]
    fn listed_secrets_are_replaced() {
        let secrets = [Secret::new("s3cr3t"), Secret::new("")];

        let redacted = redact("password s3cr3t and again s3cr3t.", &secrets);

        assert_eq!(redacted, "password *** and again ***.");
    }

    #[test]
    fn open_file_is_rejected_with_mode() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("password");
        std::fs::write(&path, "s3cr3t\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();

        let error = read_secret_file(&path).unwrap_err();

        let message = error.to_string();
        assert!(matches!(error, SecretFileError::TooOpen { mode: 0o640, .. }), "{message}");
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("0640"), "{message}");
        assert!(message.contains("0600"), "{message}");
        assert!(!message.contains("s3cr3t"), "{message}");
    }

    #[test]
    fn private_file_is_read_and_trimmed() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("password");
        std::fs::write(&path, "s3cr3t\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();

        let secret = read_secret_file(&path).unwrap();

        assert_eq!(secret.expose(), "s3cr3t");
    }

    #[test]
    fn empty_file_is_rejected() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("password");
        std::fs::write(&path, "\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();

        let error = read_secret_file(&path).unwrap_err();

        assert!(matches!(error, SecretFileError::Empty { .. }), "{error}");
    }
}
