//! Runs external commands (`git`, `docker compose`, reset scripts) with closed
//! standard input, no terminal, a timeout and bounded output.
//!
//! Each command runs in a process group of its own. On timeout, or when the
//! future is dropped because the agent stops, the whole group gets SIGTERM and,
//! two seconds later, SIGKILL, so no child outlives the agent.
//!
//! Command lines and captured output are redacted before they reach an error
//! or a log: credentials in URLs, and every secret registered with
//! [`CommandSpec::secret`], print as `***`. The environment is never printed.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;

use crate::secret::{self, Secret};

/// Output kept from each stream; the end of a long output is what explains a
/// failure, so the tail is kept.
const KEPT_OUTPUT_BYTES: usize = 64 * 1024;

/// Time between SIGTERM and SIGKILL for a command that must stop.
const KILL_GRACE: Duration = Duration::from_secs(2);

/// Process groups of commands that are running or being stopped.
static LIVE_GROUPS: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

fn live_groups() -> std::sync::MutexGuard<'static, BTreeSet<u32>> {
    // A panic while holding this lock leaves the set itself intact.
    LIVE_GROUPS.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Waits up to `grace` for the commands stopped by a cancelled future to
/// exit, then kills what is left. The agent calls this before it exits.
pub async fn stop_children(grace: Duration) {
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        live_groups().retain(|&pid| group_exists(pid));
        if live_groups().is_empty() || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for pid in std::mem::take(&mut *live_groups()) {
        signal_group(pid, libc::SIGKILL);
    }
}

fn group_exists(pid: u32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks that the group exists.
    unsafe { libc::kill(-(pid as libc::pid_t), 0) == 0 }
}

/// A command line with its environment and working directory.
#[derive(Clone)]
pub struct CommandSpec {
    pub program: String,
    pub arguments: Vec<OsString>,
    pub directory: Option<PathBuf>,
    pub environment: Vec<(String, String)>,
    pub timeout: Duration,
    /// Values that must not appear in the command line or output as printed.
    pub secrets: Vec<Secret>,
}

impl CommandSpec {
    pub fn new(program: impl Into<String>, timeout: Duration) -> Self {
        CommandSpec { program: program.into(), arguments: Vec::new(), directory: None, environment: Vec::new(), timeout, secrets: Vec::new() }
    }

    pub fn arg(mut self, argument: impl Into<OsString>) -> Self {
        self.arguments.push(argument.into());
        self
    }

    pub fn args<I, S>(mut self, arguments: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.arguments.extend(arguments.into_iter().map(Into::into));
        self
    }

    pub fn current_dir(mut self, directory: impl Into<PathBuf>) -> Self {
        self.directory = Some(directory.into());
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.environment.push((key.into(), value.into()));
        self
    }

    /// Registers a value that the command may receive (in its environment)
    /// and that must print as `***` in its command line and output.
    pub fn secret(mut self, secret: Secret) -> Self {
        self.secrets.push(secret);
        self
    }

    /// Returns the command line as text for logs and errors, with URL
    /// credentials and registered secrets replaced by `***`.
    pub fn display(&self) -> String {
        let mut line = self.program.clone();
        for argument in &self.arguments {
            line.push(' ');
            line.push_str(&argument.to_string_lossy());
        }
        self.redact(&line)
    }

    /// Returns `text` with URL credentials and registered secrets replaced.
    pub fn redact(&self, text: &str) -> String {
        secret::redact(text, &self.secrets)
    }
}

impl fmt::Debug for CommandSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display())
    }
}

/// Output of a finished command. Standard error is redacted; standard
/// output is data for the caller and stays as the command wrote it.
#[derive(Debug, Clone)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
}

/// Errors of running an external command.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The program could not be started, for example because it is missing.
    #[error("could not start `{command}`: {source}")]
    Spawn { command: String, source: std::io::Error },

    /// The command ran longer than its timeout and was killed.
    #[error("`{command}` timed out after {}", humantime::format_duration(*timeout))]
    TimedOut { command: String, timeout: Duration, stderr: String },

    /// The command exited with a failure status.
    #[error("`{command}` failed ({status}): {}", last_lines(stderr, 6))]
    Failed { command: String, status: ExitStatus, stdout: String, stderr: String },
}

impl ProcessError {
    /// Returns what the command wrote to standard error, if it ran.
    pub fn stderr(&self) -> &str {
        match self {
            ProcessError::Spawn { .. } => "",
            ProcessError::TimedOut { stderr, .. } | ProcessError::Failed { stderr, .. } => stderr,
        }
    }
}

/// Returns the last `count` non-empty lines of `text`, joined by "; ".
pub fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|line| !line.is_empty()).collect();
    let start = lines.len().saturating_sub(count);
    lines[start..].join("; ")
}

/// Runs a command to completion and returns its output, or an error when it
/// cannot start, times out or exits with a failure status.
pub async fn run(spec: &CommandSpec) -> Result<Output, ProcessError> {
    let mut command = Command::new(&spec.program);
    command.args(&spec.arguments).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0).kill_on_drop(true);
    if let Some(directory) = &spec.directory {
        command.current_dir(directory);
    }
    for (key, value) in &spec.environment {
        command.env(key, value);
    }

    let mut child = command.spawn().map_err(|source| ProcessError::Spawn { command: spec.display(), source })?;
    let group = GroupGuard::new(child.id());
    let stdout = child.stdout.take().expect("stdout is piped above");
    let stderr = child.stderr.take().expect("stderr is piped above");

    let finished = async {
        let (status, stdout, stderr) = tokio::join!(child.wait(), read_tail(stdout), read_tail(stderr));
        (status, stdout, stderr)
    };
    let (status, stdout, stderr) = match tokio::time::timeout(spec.timeout, finished).await {
        Ok(result) => result,
        Err(_) => {
            group.terminate().await;
            return Err(ProcessError::TimedOut { command: spec.display(), timeout: spec.timeout, stderr: String::new() });
        }
    };
    group.disarm();

    let status = status.map_err(|source| ProcessError::Spawn { command: spec.display(), source })?;
    let stderr = spec.redact(&stderr);
    if !status.success() {
        let stdout = spec.redact(&stdout);
        return Err(ProcessError::Failed { command: spec.display(), status, stdout, stderr });
    }
    Ok(Output { stdout, stderr })
}

async fn read_tail(mut stream: impl tokio::io::AsyncRead + Unpin) -> String {
    let mut kept: Vec<u8> = Vec::new();
    let mut buffer = [0u8; 8192];
    loop {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(count) => {
                kept.extend_from_slice(&buffer[..count]);
                if kept.len() > 2 * KEPT_OUTPUT_BYTES {
                    kept.drain(..kept.len() - KEPT_OUTPUT_BYTES);
                }
            }
        }
    }
    if kept.len() > KEPT_OUTPUT_BYTES {
        kept.drain(..kept.len() - KEPT_OUTPUT_BYTES);
    }
    String::from_utf8_lossy(&kept).into_owned()
}

/// Kills the command's process group when dropped while armed: the command
/// timed out, or the agent dropped the future because it is stopping.
struct GroupGuard {
    pid: Option<u32>,
}

impl GroupGuard {
    fn new(pid: Option<u32>) -> GroupGuard {
        if let Some(pid) = pid {
            live_groups().insert(pid);
        }
        GroupGuard { pid }
    }

    fn disarm(mut self) {
        if let Some(pid) = self.pid.take() {
            live_groups().remove(&pid);
        }
    }

    async fn terminate(mut self) {
        if let Some(pid) = self.pid.take() {
            signal_group(pid, libc::SIGTERM);
            tokio::time::sleep(KILL_GRACE).await;
            signal_group(pid, libc::SIGKILL);
            live_groups().remove(&pid);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.take() {
            signal_group(pid, libc::SIGTERM);
            // The drop cannot wait; a short-lived thread sends the SIGKILL.
            std::thread::spawn(move || {
                std::thread::sleep(KILL_GRACE);
                signal_group(pid, libc::SIGKILL);
                live_groups().remove(&pid);
            });
        }
    }
}

fn signal_group(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) on a negative pid signals the process group, nothing else.
    unsafe {
        libc::kill(-(pid as libc::pid_t), signal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn success_returns_output() {
        let spec = CommandSpec::new("sh", Duration::from_secs(5)).args(["-c", "echo out; echo err >&2"]);

        let output = run(&spec).await.unwrap();

        assert_eq!(output.stdout, "out\n");
        assert_eq!(output.stderr, "err\n");
    }

    #[tokio::test]
    async fn failure_carries_stderr() {
        let spec = CommandSpec::new("sh", Duration::from_secs(5)).args(["-c", "echo broken >&2; exit 3"]);

        let error = run(&spec).await.unwrap_err();

        assert!(matches!(error, ProcessError::Failed { .. }));
        assert!(error.to_string().contains("broken"), "{error}");
    }

    #[tokio::test]
    async fn timeout_kills_the_group() {
        let marker = tempfile::NamedTempFile::new().unwrap();
        let script = format!("(sleep 30; echo late > {}) & sleep 30", marker.path().display());
        let spec = CommandSpec::new("sh", Duration::from_millis(200)).args(["-c", &script]);

        let error = run(&spec).await.unwrap_err();
        tokio::time::sleep(Duration::from_millis(300)).await;

        assert!(matches!(error, ProcessError::TimedOut { .. }));
        let survivors = std::process::Command::new("pgrep").args(["-f", &script]).output().unwrap();
        assert!(survivors.stdout.is_empty(), "processes left: {}", String::from_utf8_lossy(&survivors.stdout));
    }

    #[tokio::test]
    async fn stdin_is_closed() {
        let spec = CommandSpec::new("sh", Duration::from_secs(5)).args(["-c", "cat; echo done"]);

        let output = run(&spec).await.unwrap();

        assert_eq!(output.stdout, "done\n");
    }

    #[tokio::test]
    async fn failure_message_hides_secrets() {
        let spec = CommandSpec::new("sh", Duration::from_secs(5))
            .args(["-c", "echo \"fatal: https://device:$TOKEN@git.example.invalid/r.git and $TOKEN\" >&2; exit 1"])
            .arg("https://device:tok-123@git.example.invalid/r.git")
            .env("TOKEN", "tok-123")
            .secret(Secret::new("tok-123"));

        let error = run(&spec).await.unwrap_err();

        let message = error.to_string();
        assert!(!message.contains("tok-123"), "{message}");
        assert!(!error.stderr().contains("tok-123"), "{}", error.stderr());
        assert!(message.contains("https://***@git.example.invalid/r.git"), "{message}");
    }

    #[test]
    fn display_hides_url_credentials() {
        let spec = CommandSpec::new("git", Duration::from_secs(5)).args(["clone", "https://oauth2:tok-456@git.example.invalid/r.git"]);

        assert_eq!(spec.display(), "git clone https://***@git.example.invalid/r.git");
        assert_eq!(format!("{spec:?}"), "git clone https://***@git.example.invalid/r.git");
    }

    #[tokio::test]
    async fn missing_program_is_spawn_error() {
        let spec = CommandSpec::new("/nonexistent/tool", Duration::from_secs(5));

        let error = run(&spec).await.unwrap_err();

        assert!(matches!(error, ProcessError::Spawn { .. }));
    }
}
