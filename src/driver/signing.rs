//! Signed desired state: a commit of the device branch is applied only when
//! it carries an SSH signature by a key in the allowed signers list.
//!
//! The list is a file in the format of `ssh-keygen -Y verify` (one
//! `principal [options] key-type base64` line per key) on the reserved
//! partition, and `git verify-commit` with `gpg.format=ssh` checks each
//! commit against it.
//!
//! The list rotates through the repository. A commit that changes
//! [`REPOSITORY_SIGNERS_PATH`] replaces the device's list with that file when
//! the commit is signed by a key in the list in effect before it. It must
//! also be committed later than the commit the current list came from. The
//! commits of the branch that change the file are taken oldest first, so a
//! device that skipped a rotation commit still follows the chain. The
//! committer time is part of the signed commit, so an older signed commit
//! pushed again cannot bring back an earlier list. A commit that is not
//! trusted never changes the list, and deleting the file from the repository
//! leaves the device's list as it is.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::driver::git::GitMirror;
use crate::driver::process::{self, ProcessError};
use crate::model::CommitId;

/// Path, inside the repository, of the allowed signers list that signed
/// commits may rotate to.
pub const REPOSITORY_SIGNERS_PATH: &str = ".autoupdate/allowed_signers";

/// First words of the comment line the agent writes at the top of a list it
/// took from the repository.
const ADOPTED_MARKER: &str = "# eventpi-autoupdate adopted this list from commit ";

/// Key types `ssh-keygen -Y verify` accepts in an allowed signers line.
const SIGNER_KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// Errors of checking a commit's signature. The messages leave the commit
/// out, because callers put its id in front.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    /// The commit has no signature.
    #[error("the commit is not signed; git.require_signed_commits accepts only commits signed with an SSH key in the allowed signers list {}", list.display())]
    Unsigned { commit: CommitId, list: PathBuf },

    /// The commit is signed with OpenPGP or X.509, not with an SSH key.
    #[error("the commit has an OpenPGP or X.509 signature; only SSH signatures by a key in {} are accepted", list.display())]
    OtherFormat { commit: CommitId, list: PathBuf },

    /// The signature verifies, but its key is not in the list.
    #[error("the commit is signed by key {fingerprint}, which is not in the allowed signers list {}", list.display())]
    UnknownKey { commit: CommitId, fingerprint: String, list: PathBuf },

    /// The signature does not match the commit, or its key expired or was revoked.
    #[error("the commit's signature does not verify: {reason}")]
    BadSignature { commit: CommitId, reason: String },

    /// Git could not check the signature at all, for example because
    /// `ssh-keygen` is missing.
    #[error("cannot check the commit's signature: {detail}")]
    Unverifiable { commit: CommitId, detail: String },

    /// A git command failed.
    #[error("cannot check the commit's signature: {0}")]
    Git(#[from] ProcessError),

    /// The allowed signers list could not be read or replaced.
    #[error("{action} the allowed signers list {}: {source}", path.display())]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
}

impl SignatureError {
    /// Tells whether the commit itself is at fault, so it must be rejected.
    pub fn is_rejection(&self) -> bool {
        matches!(
            self,
            SignatureError::Unsigned { .. } | SignatureError::OtherFormat { .. } | SignatureError::UnknownKey { .. } | SignatureError::BadSignature { .. }
        )
    }
}

/// Signer of a commit that passed the check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signer {
    /// The principal of the matching line of the allowed signers list.
    pub principal: String,
    /// SHA256 fingerprint of the signing key.
    pub fingerprint: String,
}

/// The allowed signers list on the reserved partition.
#[derive(Debug, Clone)]
pub struct SignaturePolicy {
    pub allowed_signers: PathBuf,
}

impl SignaturePolicy {
    /// Brings the allowed signers list up to date from the history of
    /// `commit`, then checks that `commit` is signed by a key in it. When
    /// `commit` itself changes the list, its change is taken after the check.
    pub async fn check(&self, git: &GitMirror, commit: CommitId) -> Result<Signer, SignatureError> {
        let changes = self.list_changes(git, commit).await?;
        for (candidate, time) in changes.iter().filter(|(candidate, _)| *candidate != commit) {
            self.consider_rotation(git, *candidate, *time).await?;
        }

        let signer = self.verify(git, commit).await?;

        if let Some((_, time)) = changes.iter().find(|(candidate, _)| *candidate == commit)
            && *time > self.adopted_time()?
        {
            self.adopt(git, commit, *time, &signer).await?;
        }
        Ok(signer)
    }

    /// Checks the signature of `commit` against the current list.
    pub async fn verify(&self, git: &GitMirror, commit: CommitId) -> Result<Signer, SignatureError> {
        let list = self.allowed_signers.clone();
        let commit_text = commit.to_string();

        let object = process::run(&git.command().args(["cat-file", "commit", &commit_text])).await?;
        let signature = signature_header(&object.stdout);
        match signature {
            None => return Err(SignatureError::Unsigned { commit, list }),
            Some(first_line) if !first_line.starts_with("-----BEGIN SSH SIGNATURE-----") => {
                return Err(SignatureError::OtherFormat { commit, list });
            }
            Some(_) => {}
        }

        let describe = self.git_with_list(git).args(["log", "-1", "--no-walk", "--format=%G?%x1f%GK%x1f%GS", &commit_text]);
        let description = process::run(&describe).await?;
        let mut fields = description.stdout.trim_end().split('\x1f');
        let status = fields.next().unwrap_or_default().to_string();
        let fingerprint = fields.next().unwrap_or_default().to_string();
        let principal = fields.next().unwrap_or_default().to_string();

        let verify = self.git_with_list(git).args(["verify-commit", &commit_text]);
        match process::run(&verify).await {
            Ok(_) => Ok(Signer { principal, fingerprint }),
            Err(ProcessError::Failed { stderr, .. }) => {
                let detail = process::last_lines(&stderr, 2);
                Err(match status.as_str() {
                    "N" => SignatureError::Unsigned { commit, list },
                    "U" if !fingerprint.is_empty() => SignatureError::UnknownKey { commit, fingerprint, list },
                    "B" => SignatureError::BadSignature { commit, reason: "bad signature".into() },
                    "X" => SignatureError::BadSignature { commit, reason: "the signature has expired".into() },
                    "Y" => SignatureError::BadSignature { commit, reason: "the signing key has expired".into() },
                    "R" => SignatureError::BadSignature { commit, reason: "the signing key was revoked".into() },
                    _ => SignatureError::Unverifiable {
                        commit,
                        detail: if detail.is_empty() { format!("git reports signature status {status:?}") } else { detail },
                    },
                })
            }
            Err(other) => Err(other.into()),
        }
    }

    fn git_with_list(&self, git: &GitMirror) -> crate::driver::process::CommandSpec {
        let list = format!("gpg.ssh.allowedSignersFile={}", self.allowed_signers.display());
        git.command().args(["-c", "gpg.format=ssh", "-c", &list])
    }

    /// Lists the commits reachable from `commit` that change
    /// [`REPOSITORY_SIGNERS_PATH`], oldest first, with their committer time.
    async fn list_changes(&self, git: &GitMirror, commit: CommitId) -> Result<Vec<(CommitId, i64)>, SignatureError> {
        let spec = git.command().args(["log", "--reverse", "--topo-order", "--format=%H %ct", &commit.to_string(), "--", REPOSITORY_SIGNERS_PATH]);
        let output = process::run(&spec).await?;
        let changes = output
            .stdout
            .lines()
            .filter_map(|line| {
                let (id, time) = line.split_once(' ')?;
                Some((id.parse().ok()?, time.trim().parse().ok()?))
            })
            .collect();
        Ok(changes)
    }

    /// Takes the list from `candidate` when the current list trusts its
    /// signature and it is newer than the list's source.
    async fn consider_rotation(&self, git: &GitMirror, candidate: CommitId, time: i64) -> Result<(), SignatureError> {
        // NOTE: committer times have one-second resolution, so of two
        // rotation commits made in the same second only the older is taken.
        if time <= self.adopted_time()? {
            return Ok(());
        }
        match self.verify(git, candidate).await {
            Ok(signer) => self.adopt(git, candidate, time, &signer).await,
            Err(error) if error.is_rejection() => {
                tracing::warn!(commit = %candidate.short(), %error, "a commit changes {REPOSITORY_SIGNERS_PATH} without a trusted signature; the allowed signers list stays as it is");
                Ok(())
            }
            Err(error) => Err(error),
        }
    }

    /// Replaces the list with the file in `commit`, which passed the check.
    async fn adopt(&self, git: &GitMirror, commit: CommitId, time: i64, signer: &Signer) -> Result<(), SignatureError> {
        let object = format!("{commit}:{REPOSITORY_SIGNERS_PATH}");
        let content = match process::run(&git.command().args(["show", &object])).await {
            Ok(output) => output.stdout,
            Err(ProcessError::Failed { .. }) => {
                tracing::warn!(commit = %commit.short(), "a signed commit removes {REPOSITORY_SIGNERS_PATH}; the allowed signers list stays as it is");
                return Ok(());
            }
            Err(other) => return Err(other.into()),
        };
        if let Err(reason) = check_signers_text(&content) {
            tracing::warn!(commit = %commit.short(), reason, "{REPOSITORY_SIGNERS_PATH} in a signed commit is not a usable allowed signers list; the list stays as it is");
            return Ok(());
        }

        let current = std::fs::read_to_string(&self.allowed_signers).map_err(|source| SignatureError::Io {
            action: "cannot read",
            path: self.allowed_signers.clone(),
            source,
        })?;
        let text = format!("{ADOPTED_MARKER}{commit} (committer time {time}); a signed change to {REPOSITORY_SIGNERS_PATH} replaces it.\n{content}");
        if strip_marker(&current) == content {
            return Ok(());
        }
        write_atomically(&self.allowed_signers, &text)?;
        tracing::info!(
            commit = %commit.short(),
            signer = signer.principal,
            key = signer.fingerprint,
            list = %self.allowed_signers.display(),
            keys = count_keys(&content),
            "replaced the allowed signers list from a signed commit"
        );
        Ok(())
    }

    /// Returns the committer time of the commit the current list came from,
    /// or 0 for a list that was provisioned by hand.
    fn adopted_time(&self) -> Result<i64, SignatureError> {
        let text = std::fs::read_to_string(&self.allowed_signers).map_err(|source| SignatureError::Io {
            action: "cannot read",
            path: self.allowed_signers.clone(),
            source,
        })?;
        Ok(adopted_time_of(&text))
    }
}

/// Returns the first line of the commit's `gpgsig` header, if it has one.
fn signature_header(commit_object: &str) -> Option<&str> {
    commit_object.lines().take_while(|line| !line.is_empty()).find_map(|line| line.strip_prefix("gpgsig "))
}

fn adopted_time_of(list: &str) -> i64 {
    let Some(rest) = list.lines().next().and_then(|line| line.strip_prefix(ADOPTED_MARKER)) else { return 0 };
    rest.split("(committer time ").nth(1).and_then(|time| time.split(')').next()).and_then(|time| time.parse().ok()).unwrap_or(0)
}

fn strip_marker(list: &str) -> &str {
    if list.starts_with(ADOPTED_MARKER) { list.split_once('\n').map_or("", |(_, rest)| rest) } else { list }
}

/// Checks that `text` is an allowed signers list with at least one key, so a
/// rotation cannot lock the device out by mistake.
fn check_signers_text(text: &str) -> Result<(), String> {
    let mut keys = 0;
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if !has_key(line) {
            return Err(format!("line {} has no SSH public key (principal, options, key type, base64 key)", index + 1));
        }
        keys += 1;
    }
    if keys == 0 { Err("the file lists no key".into()) } else { Ok(()) }
}

fn has_key(line: &str) -> bool {
    let words: Vec<&str> = line.split_whitespace().collect();
    words.windows(2).skip(1).any(|pair| {
        SIGNER_KEY_TYPES.contains(&pair[0])
            && pair[1].len() >= 16
            && pair[1].chars().all(|character| character.is_ascii_alphanumeric() || "+/=".contains(character))
    })
}

fn count_keys(text: &str) -> usize {
    text.lines().map(str::trim).filter(|line| !line.is_empty() && !line.starts_with('#') && has_key(line)).count()
}

/// Writes `text` to `path` through a synced temporary file and a rename, so
/// a power cut leaves either the old list or the new one.
fn write_atomically(path: &Path, text: &str) -> Result<(), SignatureError> {
    let io = |action: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| SignatureError::Io { action, path, source }
    };
    let temporary = path.with_extension("new");
    {
        let mut file = std::fs::File::create(&temporary).map_err(io("cannot write", &temporary))?;
        // The agent does not start with a list that group or others can
        // write, so the mode does not follow the umask.
        file.set_permissions(std::fs::Permissions::from_mode(0o644)).map_err(io("cannot set the mode of", &temporary))?;
        file.write_all(text.as_bytes()).map_err(io("cannot write", &temporary))?;
        file.sync_all().map_err(io("cannot sync", &temporary))?;
    }
    std::fs::rename(&temporary, path).map_err(io("cannot replace", path))?;
    if let Some(parent) = path.parent()
        && let Ok(directory) = std::fs::File::open(parent)
    {
        let _ = directory.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_header_is_found() {
        let object = "tree 4b825dc6\nauthor A <a@b> 1 +0000\ncommitter A <a@b> 1 +0000\ngpgsig -----BEGIN SSH SIGNATURE-----\n U1NIU0lH\n -----END SSH SIGNATURE-----\n\nmessage gpgsig x\n";

        assert_eq!(signature_header(object), Some("-----BEGIN SSH SIGNATURE-----"));
        assert_eq!(signature_header("tree 4b\n\ngpgsig in the message\n"), None);
    }

    #[test]
    fn adopted_time_is_read_from_marker() {
        let list = format!("{ADOPTED_MARKER}{} (committer time 1796000000); a signed change replaces it.\nops ssh-ed25519 AAAA\n", "ab".repeat(20));

        assert_eq!(adopted_time_of(&list), 1_796_000_000);
        assert_eq!(adopted_time_of("ops ssh-ed25519 AAAA\n"), 0);
        assert_eq!(strip_marker(&list), "ops ssh-ed25519 AAAA\n");
    }

    #[test]
    fn signers_text_needs_a_key_on_every_line() {
        let key = "AAAAC3NzaC1lZDI1NTE5AAAAIBx7abcdefgh";

        assert!(check_signers_text(&format!("# fleet keys\nops@example namespaces=\"git\" ssh-ed25519 {key} laptop\n")).is_ok());
        assert!(check_signers_text("# nothing here\n\n").is_err());
        assert!(check_signers_text(&format!("ops@example ssh-ed25519 {key}\nbroken line\n")).unwrap_err().contains("line 2"));
        assert!(check_signers_text(&format!("ssh-ed25519 {key}\n")).is_err(), "a line needs a principal before the key");
    }
}
