//! The agent process: opens the journal, takes the lease, waits for the
//! Docker engine, and runs the machines until a stop signal arrives.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::config::Config;
use crate::driver::apply_gate::LockSources;
use crate::driver::compose::Compose;
use crate::driver::docker::Engine;
use crate::driver::git::GitMirror;
use crate::driver::process::{self, CommandSpec};
use crate::driver::stack::{DriverError, DriverSettings, SharedJournal, StackDriver, jittered};
use crate::journal::{History, Journal, JournalError, JournalOptions};
use crate::machine::stack::StackSettings;
use crate::panel::{self, Board, Condition, Source};
use crate::platform::Platform;
use crate::seams::Seams;

/// Time between two attempts to reach the Docker engine at start.
const ENGINE_RETRY: Duration = Duration::from_secs(5);

/// Share of `ENGINE_RETRY` added or removed at random, in percent.
const ENGINE_RETRY_JITTER_PERCENT: u8 = 20;

/// Time the commands of a stopping agent get to exit before SIGKILL.
const CHILD_GRACE: Duration = Duration::from_secs(3);

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Journal(#[from] JournalError),

    #[error(transparent)]
    Driver(#[from] DriverError),
}

/// Runs the agent until `shutdown` completes or the journal fails.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let seams = Seams::from_config(&config.seams);
    for warning in &config.warnings {
        tracing::warn!(key = %warning.key, "configuration: {warning}");
    }
    if let Some(clock_file) = &config.seams.clock_file {
        tracing::warn!(clock_file = %clock_file.display(), "the wall clock and its synchronised flag are read from a file (seams.clock_file); use this for tests only");
    }
    let holder = crate::identity::holder_name();
    let journal = open_journal(&config)?;
    let epoch = journal.lock().expect("the journal lock is not shared yet").take_lease(&holder, seams.meta())?;
    tracing::info!(holder, epoch, journal = %config.journal.directory.display(), "agent started and took the lease");

    let board = Board::new();
    board.set(Source::Agent, Some(Condition::Starting));
    let panel_task = tokio::spawn(panel::run_simulated(board.subscribe()));

    tokio::pin!(shutdown);
    let result = tokio::select! {
        result = run_machines(&config, journal, seams, board.clone()) => result,
        () = &mut shutdown => {
            tracing::info!("stop requested");
            Ok(())
        }
    };

    process::stop_children(CHILD_GRACE).await;
    panel_task.abort();
    match &result {
        Ok(()) => tracing::info!("agent stopped"),
        Err(error) => tracing::error!(%error, "agent stopped on an error"),
    }
    result
}

async fn run_machines(config: &Config, journal: SharedJournal, seams: Seams, board: Board) -> Result<(), AgentError> {
    let platform = config.docker.platform.as_deref().and_then(Platform::parse);
    let engine = wait_for_engine(config.docker.host.as_deref(), platform, &board).await;
    let compose_command = find_compose(config).await;
    board.set(Source::Agent, None);

    let stack = &config.stack;
    let git = GitMirror {
        url: stack.repository.clone(),
        branch: stack.branch.clone(),
        checkout: stack.checkout.clone(),
        timeout: stack.git_timeout,
        known_good_bundle: config.state_directory().join("known-good.bundle"),
    };
    let compose = Compose {
        command: compose_command,
        project: stack.project.clone(),
        files: stack.compose_files.clone(),
        timeout: stack.compose_timeout,
        docker_host: config.docker.host.clone(),
    };
    let settings = DriverSettings {
        poll_interval: stack.poll_interval,
        poll_jitter_percent: stack.poll_jitter_percent,
        retry_backoff_min: stack.retry_backoff_min,
        retry_backoff_max: stack.retry_backoff_max,
        pull_timeout: stack.pull_timeout,
        probation: stack.probation,
        health_grace: stack.health_grace,
        apply_policy: stack.apply.policy().expect("Config::parse validated stack.apply"),
        update_locks: LockSources { files: stack.apply.lock_files.clone(), label: stack.apply.lock_label.clone() },
        state_directory: config.state_directory(),
        factory_reset_command: stack.factory_reset_command.clone(),
        factory_reset_timeout: stack.factory_reset_timeout,
        machine: StackSettings { max_resumes: stack.max_resumes },
    };
    let driver = StackDriver::new(journal, seams, engine, git, compose, settings, board, Arc::new(Notify::new()));
    driver.run().await?;
    Ok(())
}

/// Opens the journal. A file without a valid header is moved aside, never
/// deleted, and a new journal is started, so a damaged file cannot keep the
/// device from updating.
fn open_journal(config: &Config) -> Result<SharedJournal, JournalError> {
    let options = JournalOptions { file_bytes: config.journal.size_kib * 1024, sync: true, history: History::Recent };
    let directory = &config.journal.directory;
    let journal = match Journal::open(directory, options) {
        Err(error @ (JournalError::NoValidHeader { .. } | JournalError::SizeMismatch { .. })) => {
            let path = directory.join(crate::journal::FILE_NAME);
            let aside = directory.join(format!("{}.unreadable", crate::journal::FILE_NAME));
            tracing::error!(%error, moved_to = %aside.display(), "journal unreadable; moving it aside and starting a new one");
            std::fs::rename(&path, &aside).map_err(|source| JournalError::Io { path: path.clone(), action: "move aside", source })?;
            Journal::open(directory, options)?
        }
        other => other?,
    };

    let stats = journal.stats();
    if stats.damaged_header_slots > 0 {
        tracing::warn!(slots = stats.damaged_header_slots, "journal header slot was damaged and has been rewritten");
    }
    if stats.ignored_bytes() > 0 {
        tracing::warn!(
            damaged_bytes = stats.damaged_bytes,
            damaged_spans = stats.damaged_spans,
            torn_bytes = stats.torn_bytes,
            "journal had damaged or torn records; they were skipped"
        );
    }
    let state = journal.state();
    if state.unknown_records > 0 {
        tracing::warn!(records = state.unknown_records, "journal contains records from a newer agent version; they were skipped");
    }
    Ok(Arc::new(Mutex::new(journal)))
}

async fn wait_for_engine(host: Option<&str>, platform: Option<Platform>, board: &Board) -> Engine {
    let mut failures = 0u32;
    loop {
        match Engine::connect(host, platform.clone()).await {
            Ok(engine) => {
                tracing::info!(host = engine.host(), platform = %engine.platform(), "connected to the Docker engine");
                return engine;
            }
            Err(error) => {
                failures += 1;
                board.set(Source::Agent, Some(Condition::WaitingForDocker));
                if failures == 1 || failures % 12 == 0 {
                    tracing::warn!(%error, failures, "waiting for the Docker engine");
                }
                tokio::time::sleep(jittered(ENGINE_RETRY, ENGINE_RETRY_JITTER_PERCENT)).await;
            }
        }
    }
}

/// Returns the command that runs Compose v2: the configured one, or the
/// first of `docker compose` and `docker-compose` that reports version 2.
async fn find_compose(config: &Config) -> Vec<String> {
    let candidates: Vec<Vec<String>> = match &config.docker.compose_command {
        Some(command) => vec![command.clone()],
        None => vec![vec!["docker".into(), "compose".into()], vec!["docker-compose".into()]],
    };
    for candidate in &candidates {
        let (program, leading) = candidate.split_first().expect("candidates and validated commands are never empty");
        let mut version = CommandSpec::new(program.clone(), Duration::from_secs(30)).args(leading.iter().map(String::as_str)).args(["version", "--short"]);
        if let Some(host) = &config.docker.host {
            version = version.env("DOCKER_HOST", host.clone());
        }
        match process::run(&version).await {
            Ok(output) if output.stdout.trim().trim_start_matches('v').starts_with('2') => {
                tracing::info!(command = ?candidate, version = output.stdout.trim(), "found Compose v2");
                return candidate.clone();
            }
            Ok(output) => tracing::warn!(command = ?candidate, version = output.stdout.trim(), "not Compose v2; skipped"),
            Err(error) => tracing::debug!(command = ?candidate, %error, "Compose command not usable"),
        }
    }
    tracing::error!(tried = ?candidates, "Compose v2 is not available; updates will fail until it is installed or docker.compose_command names it");
    candidates[0].clone()
}
