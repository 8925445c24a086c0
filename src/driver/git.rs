//! The device's clone of its branch, driven through the `git` command.
//!
//! The clone is a mirror: `fetch` with a forced refspec, then check out the
//! remote tip on the local branch with a hard reset. Nothing is ever merged,
//! so a force-pushed branch is followed, not stuck. The working tree changes
//! only when a release is applied. A new commit is validated in a separate
//! staging directory, so the running stack's files stay as they are.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::driver::git_auth::GitAccess;
use crate::driver::process::{self, CommandSpec, ProcessError};
use crate::model::CommitId;
use crate::secret::redact_urls;

/// Ref that keeps the last known-good commit reachable in the clone, so
/// neither a force-push nor `git gc` can take it away.
pub const KNOWN_GOOD_REF: &str = "refs/autoupdate/known-good";

/// Free bytes below which a filesystem counts as full for cloning again.
const MIN_FREE_TO_CLONE: u64 = 1024 * 1024;

/// Errors of git operations.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// The git server could not be reached or stopped responding.
    #[error("git server {url} is unreachable: {detail}")]
    Unreachable { url: String, detail: String },

    /// The ssh server presented a host key other than the pinned ones. This
    /// is not retried away: a person must check the server and, if its key
    /// changed on purpose, pin the new one.
    #[error(
        "git server {server} presented host key {fingerprint}, which does not match git.ssh_host_keys; updates stop until the server's key is checked and, if it changed on purpose, pinned in git.ssh_host_keys"
    )]
    HostKeyChanged { server: String, fingerprint: String },

    /// The server refused the deploy key or the token.
    #[error("git server {url} refused the credentials: {detail}; check git.ssh_key_file or git.https_token_file and the server's access rules")]
    AccessDenied { url: String, detail: String },

    /// The repository has no branch with this name.
    #[error("branch {branch:?} does not exist in {url}; push it or fix stack.branch")]
    BranchMissing { url: String, branch: String },

    /// The filesystem of the clone is full. Cloning again cannot help, and
    /// the fetch works again once there is space.
    #[error("no space left on the filesystem of the clone {checkout}: {detail}; free space there")]
    NoSpace { checkout: PathBuf, detail: String },

    /// The clone is damaged and could not be repaired by cloning again.
    #[error("clone {checkout} is damaged: {detail}")]
    Damaged { checkout: PathBuf, detail: String },

    /// The commit is not in the clone.
    #[error("commit {commit} is not in the clone {checkout}")]
    MissingCommit { commit: CommitId, checkout: PathBuf },

    /// A file operation around the clone failed.
    #[error("{action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },

    /// A git command failed in a way none of the above explains.
    #[error(transparent)]
    Command(#[from] ProcessError),
}

impl GitError {
    /// Tells whether trying again later may succeed without anyone acting.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            GitError::Unreachable { .. } | GitError::BranchMissing { .. } | GitError::NoSpace { .. } | GitError::Command(ProcessError::TimedOut { .. })
        )
    }

    /// Tells whether a person must act before git can reach the server again.
    pub fn needs_attention(&self) -> bool {
        matches!(self, GitError::HostKeyChanged { .. } | GitError::AccessDenied { .. })
    }

    /// Tells whether the clone may be at fault, so cloning again may help.
    fn blames_clone(&self) -> bool {
        !self.is_transient() && !self.needs_attention()
    }
}

/// The device's clone of one branch.
#[derive(Debug, Clone)]
pub struct GitMirror {
    pub url: String,
    pub branch: String,
    pub checkout: PathBuf,
    pub timeout: Duration,
    /// Bundle holding the known-good commit outside the clone, so that a
    /// clone made again after damage still has it, even when a force-push
    /// removed it from the server.
    pub known_good_bundle: PathBuf,
    /// Credentials and host key checking for the server.
    pub access: GitAccess,
    /// What the last fetches established, so that a poll that finds nothing
    /// new costs one `git ls-remote` and nothing else.
    pub memo: std::sync::Arc<std::sync::Mutex<FetchMemo>>,
}

/// Facts about the clone that hold until a git command fails.
#[derive(Debug, Default)]
pub struct FetchMemo {
    /// The clone passed the usability check since the last failure.
    verified: bool,
    /// The URL last written into the clone's `origin` remote.
    origin_url: Option<String>,
    /// The branch tip the last fetch brought into the clone.
    fetched_tip: Option<CommitId>,
}

impl GitMirror {
    /// Builds the mirror of the device branch that `stack` names, with the
    /// known-good bundle in the agent's state directory.
    pub fn for_stack(config: &crate::config::Config, stack: &crate::config::StackConfig, access: GitAccess) -> GitMirror {
        GitMirror {
            url: stack.repository.clone(),
            branch: stack.branch.clone(),
            checkout: stack.checkout.clone(),
            timeout: stack.git_timeout,
            known_good_bundle: config.state_directory().join("known-good.bundle"),
            access,
            memo: Default::default(),
        }
    }

    /// Builds a git command with no prompts, no user or system configuration
    /// and messages in English, so that errors can be classified.
    fn git(&self, directory: &Path) -> CommandSpec {
        let spec = CommandSpec::new("git", self.timeout)
            .current_dir(directory)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("LC_ALL", "C")
            .args(["-c", "gc.autoDetach=false", "-c", "maintenance.auto=false", "-c", "credential.helper="]);
        self.access.apply(spec)
    }

    /// Returns a git command that runs in the clone, with the same
    /// environment as the mirror's own commands.
    pub fn command(&self) -> CommandSpec {
        self.git(&self.checkout)
    }

    /// Returns the repository URL with any credentials replaced by `***`.
    fn shown_url(&self) -> String {
        redact_urls(&self.url)
    }

    /// Returns the ssh server as `known_hosts` names it, such as
    /// `[127.0.0.1]:2222`, or the URL for other transports.
    fn server_name(&self) -> String {
        crate::config::Transport::of(&self.url).known_hosts_pattern().unwrap_or_else(|| self.shown_url())
    }

    fn remote_ref(&self) -> String {
        format!("refs/remotes/origin/{}", self.branch)
    }

    /// Fetches the branch and returns its tip. Clones first on an empty
    /// device, and clones again beside a clone that git cannot use.
    pub async fn fetch(&self) -> Result<CommitId, GitError> {
        let result = self.fetch_checked().await;
        if result.is_err() {
            *self.memo() = FetchMemo::default();
        }
        result
    }

    async fn fetch_checked(&self) -> Result<CommitId, GitError> {
        let verified = self.memo().verified;
        if !verified && !self.is_usable().await {
            self.clone_fresh().await?;
        }
        self.memo().verified = true;
        remove_stale_locks(&self.checkout.join(".git"));

        // A tip that the last fetch already brought needs no fetch: one ref
        // advertisement from the server is the whole poll.
        let fetched = self.memo().fetched_tip;
        if let Some(fetched) = fetched
            && self.remote_tip().await? == fetched
        {
            return Ok(fetched);
        }

        let tip = match self.fetch_once().await {
            Ok(tip) => tip,
            Err(error) if !error.blames_clone() => return Err(error),
            Err(error) => {
                self.repair(&error).await?;
                self.fetch_once().await?
            }
        };
        self.memo().fetched_tip = Some(tip);
        Ok(tip)
    }

    fn memo(&self) -> std::sync::MutexGuard<'_, FetchMemo> {
        // The memo is a cache: a panic while it is held leaves nothing to
        // repair, and clearing it only costs a full check at the next fetch.
        self.memo.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Asks the server for the branch tip without fetching anything.
    async fn remote_tip(&self) -> Result<CommitId, GitError> {
        let reference = format!("refs/heads/{}", self.branch);
        let spec = self.git(&self.checkout).args(["ls-remote", "--refs", &self.url, &reference]);
        let output = process::run(&spec).await.map_err(|error| self.classify(error))?;
        let line = output.stdout.lines().find(|line| line.ends_with(&format!("\t{reference}")));
        let Some(line) = line else {
            return Err(GitError::BranchMissing { url: self.url.clone(), branch: self.branch.clone() });
        };
        line.split('\t').next().unwrap_or_default().parse().map_err(|_| GitError::Unreachable {
            url: self.url.clone(),
            detail: format!("the server advertised {line:?} for {reference}, which is not a commit id"),
        })
    }

    /// Clones the branch again beside a clone that failed with `error`, and
    /// brings the known-good commit back from its bundle. The old clone stays
    /// in place until the new one is complete.
    async fn repair(&self, error: &GitError) -> Result<(), GitError> {
        // On a full filesystem git fails with many messages; cloning again
        // cannot succeed there and would only add a second clone.
        let parent = self.checkout.parent().unwrap_or(Path::new("/"));
        if let Ok(stats) = crate::driver::space::read_filesystem(parent)
            && (stats.free_bytes < MIN_FREE_TO_CLONE || (stats.total_inodes > 0 && stats.free_inodes == 0))
        {
            return Err(GitError::NoSpace { checkout: self.checkout.clone(), detail: error.to_string() });
        }
        tracing::warn!(checkout = %self.checkout.display(), %error, "git failed in the clone; cloning it again");
        self.clone_fresh().await?;
        self.restore_known_good().await;
        Ok(())
    }

    /// Runs a local operation on the clone; when it fails for a reason other
    /// than the server, repairs the clone and runs it once more.
    async fn with_repair<T, F, Fut>(&self, operation: F) -> Result<T, GitError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, GitError>>,
    {
        if !self.is_usable().await {
            let damaged = GitError::Damaged { checkout: self.checkout.clone(), detail: "git cannot read HEAD or the index".into() };
            self.repair(&damaged).await?;
        }
        match operation().await {
            Ok(value) => Ok(value),
            Err(error) if !error.blames_clone() => Err(error),
            Err(error) => {
                self.repair(&error).await?;
                if let Err(fetch_error) = self.fetch_once().await {
                    tracing::warn!(%fetch_error, "fetch after the repair failed; the known-good bundle may still have the commit");
                }
                operation().await
            }
        }
    }

    /// Fetches the known-good commit from its bundle into the clone, when the
    /// bundle exists. Failures are logged: the bundle is a second line of
    /// defence after the server.
    async fn restore_known_good(&self) {
        if !self.known_good_bundle.is_file() {
            return;
        }
        let bundle = self.known_good_bundle.to_string_lossy().into_owned();
        let refspec = format!("{KNOWN_GOOD_REF}:{KNOWN_GOOD_REF}");
        let spec = self.git(&self.checkout).args(["fetch", "--quiet", "--no-tags", &bundle, &refspec]);
        match process::run(&spec).await {
            Ok(_) => tracing::info!(bundle, "restored the known-good commit from its bundle"),
            Err(error) => tracing::warn!(bundle, %error, "cannot restore the known-good commit from its bundle"),
        }
    }

    async fn fetch_once(&self) -> Result<CommitId, GitError> {
        let url_set = self.memo().origin_url.as_deref() == Some(self.url.as_str());
        if !url_set {
            let set_url = self.git(&self.checkout).args(["remote", "set-url", "origin", &self.url]);
            process::run(&set_url).await?;
            self.memo().origin_url = Some(self.url.clone());
        }

        let refspec = format!("+refs/heads/{}:{}", self.branch, self.remote_ref());
        let fetch = self.git(&self.checkout).args(["fetch", "--no-tags", "--prune", "--quiet", "origin", &refspec]);
        process::run(&fetch).await.map_err(|error| self.classify(error))?;
        self.resolve(&self.remote_ref()).await
    }

    async fn resolve(&self, reference: &str) -> Result<CommitId, GitError> {
        let spec = self.git(&self.checkout).args(["rev-parse", "--verify", "--quiet", &format!("{reference}^{{commit}}")]);
        let output = process::run(&spec).await?;
        output.stdout.trim().parse().map_err(|_| GitError::Damaged {
            checkout: self.checkout.clone(),
            detail: format!("{reference} resolves to {:?}, not a commit id", output.stdout.trim()),
        })
    }

    /// Tells whether the clone exists and git can read its HEAD commit.
    pub async fn is_usable(&self) -> bool {
        if !self.checkout.join(".git").is_dir() {
            return false;
        }
        remove_stale_locks(&self.checkout.join(".git"));
        let head = self.git(&self.checkout).args(["rev-parse", "--verify", "--quiet", "HEAD^{commit}"]);
        let status = self.git(&self.checkout).args(["status", "--porcelain", "--untracked-files=no"]);
        process::run(&head).await.is_ok() && process::run(&status).await.is_ok()
    }

    fn classify(&self, error: ProcessError) -> GitError {
        let stderr = error.stderr().to_string();
        let network = [
            "Could not resolve host",
            "Connection refused",
            "Connection timed out",
            "Connection reset",
            "unable to connect",
            "Network is unreachable",
            "remote end hung up",
            "early EOF",
            "unable to access",
            "Could not read from remote repository",
            "read error",
            "No route to host",
            "Operation timed out",
        ];
        let denied = ["Permission denied (publickey", "Authentication failed", "returned error: 401", "returned error: 403", "could not read Username"];
        if stderr.contains("Host key verification failed") {
            return GitError::HostKeyChanged { server: self.server_name(), fingerprint: offered_fingerprint(&stderr) };
        }
        if stderr.contains("No space left on device") {
            return GitError::NoSpace { checkout: self.checkout.clone(), detail: process::last_lines(&stderr, 2) };
        }
        if stderr.contains("couldn't find remote ref") {
            return GitError::BranchMissing { url: self.shown_url(), branch: self.branch.clone() };
        }
        if let ProcessError::TimedOut { .. } = error {
            return GitError::Unreachable { url: self.shown_url(), detail: error.to_string() };
        }
        if denied.iter().any(|pattern| stderr.contains(pattern)) {
            return GitError::AccessDenied { url: self.shown_url(), detail: process::last_lines(&stderr, 2) };
        }
        if network.iter().any(|pattern| stderr.contains(pattern)) {
            return GitError::Unreachable { url: self.shown_url(), detail: process::last_lines(&stderr, 2) };
        }
        GitError::Command(error)
    }

    /// Clones the branch beside the checkout and swaps it in. A damaged clone
    /// is moved aside to `<checkout>.damaged` rather than deleted, because
    /// untracked files in it may be data a service wrote.
    async fn clone_fresh(&self) -> Result<(), GitError> {
        let parent = self.checkout.parent().unwrap_or(Path::new("/"));
        let name = self.checkout.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
        std::fs::create_dir_all(parent).map_err(|source| GitError::Io { action: "create", path: parent.to_path_buf(), source })?;

        let fresh = parent.join(format!(".{name}.clone"));
        remove_path(&fresh)?;
        let clone = self.git(parent).args(["clone", "--quiet", "--no-tags", "--single-branch", "--branch", &self.branch, &self.url]).arg(fresh.as_os_str());
        if let Err(error) = process::run(&clone).await {
            remove_path(&fresh)?;
            return Err(match self.classify(error) {
                GitError::Command(error) if error.stderr().contains("not found in upstream") => {
                    GitError::BranchMissing { url: self.shown_url(), branch: self.branch.clone() }
                }
                other => other,
            });
        }

        if self.checkout.exists() && !is_empty_directory(&self.checkout) {
            let aside = parent.join(format!("{name}.damaged"));
            remove_path(&aside)?;
            std::fs::rename(&self.checkout, &aside).map_err(|source| GitError::Io { action: "move aside", path: self.checkout.clone(), source })?;
            tracing::warn!(checkout = %self.checkout.display(), moved_to = %aside.display(), "moved the damaged clone aside");
        } else {
            remove_path(&self.checkout)?;
        }
        std::fs::rename(&fresh, &self.checkout).map_err(|source| GitError::Io { action: "rename", path: fresh.clone(), source })?;
        tracing::info!(checkout = %self.checkout.display(), url = %self.shown_url(), branch = %self.branch, "cloned the device branch");
        Ok(())
    }

    /// Writes the files of `commit` into `directory`, emptied first, without
    /// touching the checkout's working tree or index.
    pub async fn stage(&self, commit: CommitId, directory: &Path) -> Result<(), GitError> {
        self.with_repair(|| self.stage_once(commit, directory)).await
    }

    async fn stage_once(&self, commit: CommitId, directory: &Path) -> Result<(), GitError> {
        self.ensure_commit(commit).await?;
        remove_path(directory)?;
        std::fs::create_dir_all(directory).map_err(|source| GitError::Io { action: "create", path: directory.to_path_buf(), source })?;

        let index = directory.with_extension("index");
        remove_path(&index)?;
        let index_text = index.to_string_lossy().into_owned();
        let read_tree = self.git(&self.checkout).env("GIT_INDEX_FILE", &index_text).args(["read-tree", &commit.to_string()]);
        process::run(&read_tree).await?;

        let prefix = format!("{}/", directory.display());
        let checkout_index =
            self.git(&self.checkout).env("GIT_INDEX_FILE", &index_text).args(["checkout-index", "--all", "--force", &format!("--prefix={prefix}")]);
        let result = process::run(&checkout_index).await;
        remove_path(&index)?;
        result?;
        Ok(())
    }

    /// Puts the working tree and the local branch at `commit`, discarding any
    /// local change and any merge or rebase in progress.
    pub async fn check_out(&self, commit: CommitId) -> Result<(), GitError> {
        self.with_repair(|| self.check_out_once(commit)).await
    }

    async fn check_out_once(&self, commit: CommitId) -> Result<(), GitError> {
        self.ensure_commit(commit).await?;
        remove_stale_locks(&self.checkout.join(".git"));
        let commit_text = commit.to_string();
        for operation in ["rebase-merge", "rebase-apply"] {
            remove_path(&self.checkout.join(".git").join(operation))?;
        }
        let switch = self.git(&self.checkout).args(["checkout", "--quiet", "--force", "-B", &self.branch, &commit_text]);
        process::run(&switch).await?;
        let reset = self.git(&self.checkout).args(["reset", "--quiet", "--hard", &commit_text]);
        process::run(&reset).await?;
        Ok(())
    }

    /// Points [`KNOWN_GOOD_REF`] at `commit` and writes it into the
    /// known-good bundle, replacing the old bundle only once the new one is
    /// complete.
    pub async fn mark_known_good(&self, commit: CommitId) -> Result<(), GitError> {
        let spec = self.git(&self.checkout).args(["update-ref", KNOWN_GOOD_REF, &commit.to_string()]);
        process::run(&spec).await?;

        if let Some(parent) = self.known_good_bundle.parent() {
            std::fs::create_dir_all(parent).map_err(|source| GitError::Io { action: "create", path: parent.to_path_buf(), source })?;
        }
        let temporary = self.known_good_bundle.with_extension("bundle.new");
        let create = self.git(&self.checkout).arg("bundle").arg("create").arg("--quiet").arg(temporary.as_os_str()).arg(KNOWN_GOOD_REF);
        process::run(&create).await?;
        std::fs::rename(&temporary, &self.known_good_bundle).map_err(|source| GitError::Io { action: "rename", path: temporary.clone(), source })?;
        Ok(())
    }

    /// Checks that `commit` is in the clone, fetching it from the known-good
    /// bundle when it is not.
    async fn ensure_commit(&self, commit: CommitId) -> Result<(), GitError> {
        let spec = self.git(&self.checkout).args(["cat-file", "-e", &format!("{commit}^{{commit}}")]);
        if process::run(&spec).await.is_ok() {
            return Ok(());
        }
        self.restore_known_good().await;
        process::run(&spec).await.map_err(|_| GitError::MissingCommit { commit, checkout: self.checkout.clone() })?;
        Ok(())
    }
}

/// Returns the SHA256 fingerprint of the host key that ssh reports the
/// server sent, or a note that ssh did not print one (a key of a type with
/// no pinned key).
fn offered_fingerprint(stderr: &str) -> String {
    stderr
        .split_whitespace()
        .map(|word| word.trim_end_matches('.'))
        .find(|word| word.starts_with("SHA256:"))
        .map_or_else(|| "of a type with no pinned key".to_string(), str::to_string)
}

/// Removes lock files that a process killed in the middle of a git command
/// leaves behind. Only the agent runs git in this clone, and it runs one
/// command at a time, so a lock found before a command starts is stale.
fn remove_stale_locks(git_directory: &Path) {
    let candidates = ["index.lock", "HEAD.lock", "config.lock", "shallow.lock", "packed-refs.lock", "ORIG_HEAD.lock", "FETCH_HEAD.lock"];
    for name in candidates {
        let path = git_directory.join(name);
        if path.exists() && std::fs::remove_file(&path).is_ok() {
            tracing::warn!(lock = %path.display(), "removed a stale git lock file");
        }
    }
    remove_ref_locks(&git_directory.join("refs"));
}

fn remove_ref_locks(directory: &Path) {
    let Ok(entries) = std::fs::read_dir(directory) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            remove_ref_locks(&path);
        } else if path.extension().is_some_and(|extension| extension == "lock") && std::fs::remove_file(&path).is_ok() {
            tracing::warn!(lock = %path.display(), "removed a stale git ref lock file");
        }
    }
}

fn is_empty_directory(path: &Path) -> bool {
    std::fs::read_dir(path).map(|mut entries| entries.next().is_none()).unwrap_or(false)
}

fn remove_path(path: &Path) -> Result<(), GitError> {
    let result = match std::fs::symlink_metadata(path) {
        Err(_) => return Ok(()),
        Ok(metadata) if metadata.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
    };
    result.map_err(|source| GitError::Io { action: "remove", path: path.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    fn mirror(url: &str) -> GitMirror {
        GitMirror {
            url: url.to_string(),
            branch: "device-0001".into(),
            checkout: PathBuf::from("/srv/eventpi/stack"),
            timeout: Duration::from_secs(5),
            known_good_bundle: PathBuf::from("/srv/eventpi/known-good.bundle"),
            access: GitAccess::default(),
            memo: Default::default(),
        }
    }

    fn failed(stderr: &str) -> ProcessError {
        ProcessError::Failed { command: "git fetch".into(), status: std::process::ExitStatus::from_raw(128 << 8), stdout: String::new(), stderr: stderr.into() }
    }

    #[test]
    fn changed_host_key_is_its_own_error() {
        let stderr = "The fingerprint for the ED25519 key sent by the remote host is\nSHA256:Fw6AEoPhmep4u7IrvAzF1ZN4Fju615ywmJ7UHyr3Krs.\nHost key verification failed.\nfatal: Could not read from remote repository.\n";

        let error = mirror("ssh://git@127.0.0.1:2222/stack.git").classify(failed(stderr));

        let GitError::HostKeyChanged { server, fingerprint } = &error else { panic!("not a host key error: {error}") };
        assert_eq!(server, "[127.0.0.1]:2222");
        assert_eq!(fingerprint, "SHA256:Fw6AEoPhmep4u7IrvAzF1ZN4Fju615ywmJ7UHyr3Krs");
        assert!(error.needs_attention());
        assert!(!error.is_transient());
    }

    #[test]
    fn refused_deploy_key_is_access_denied() {
        let stderr = "git@127.0.0.1: Permission denied (publickey).\nfatal: Could not read from remote repository.\n";

        let error = mirror("ssh://git@127.0.0.1:2222/stack.git").classify(failed(stderr));

        assert!(matches!(error, GitError::AccessDenied { .. }), "{error}");
        assert!(error.needs_attention());
    }

    #[test]
    fn refused_connection_is_unreachable() {
        let stderr = "ssh: connect to host 127.0.0.1 port 2222: Connection refused\nfatal: Could not read from remote repository.\n";

        let error = mirror("ssh://git@127.0.0.1:2222/stack.git").classify(failed(stderr));

        assert!(matches!(error, GitError::Unreachable { .. }), "{error}");
        assert!(!error.needs_attention());
    }
}
