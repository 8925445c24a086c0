//! The agent process: opens the journal, takes the lease or waits until it
//! may, waits for the Docker engine, and runs the machines until a stop
//! signal arrives, another agent fences it out, or it hands over.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::{Config, JournalConfig, SelfUpdateConfig, StackConfig};
use crate::control;
use crate::credentials::{Credentials, CredentialsError};
use crate::driver::apply_gate::LockSources;
use crate::driver::compose::Compose;
use crate::driver::docker::Engine;
use crate::driver::git::GitMirror;
use crate::driver::git_auth::{GitAccess, GitAccessError};
use crate::driver::process::{self, CommandSpec};
use crate::driver::signing::SignaturePolicy;
use crate::driver::space::preflight::PullCheck;
use crate::driver::stack::{DriverError, DriverSettings, StackDriver, jittered};
use crate::journal::{History, Journal, JournalError, JournalOptions};
use crate::machine::stack::StackSettings;
use crate::notify::SenderSettings;
use crate::panel::{self, Board, Condition, Source};
use crate::platform::Platform;
use crate::runtime::{Runtime, SharedJournal};
use crate::seams::Seams;
use crate::selfupdate::driver::{DriverError as SelfUpdateError, DriverExit, SelfUpdateDriver};
use crate::selfupdate::lease::Claim;

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
    Credentials(#[from] CredentialsError),

    #[error(transparent)]
    GitAccess(#[from] GitAccessError),

    #[error(transparent)]
    Journal(#[from] JournalError),

    #[error(transparent)]
    Driver(#[from] DriverError),

    #[error(transparent)]
    HostDriver(#[from] crate::driver::host::HostDriverError),

    #[error(transparent)]
    Space(#[from] crate::driver::space::SpaceDriverError),

    #[error(transparent)]
    SelfUpdate(#[from] SelfUpdateError),

    /// A part of the agent could not start, such as the control socket.
    #[error("{0}")]
    Setup(String),
}

impl AgentError {
    /// Tells whether another agent took a newer lease, so this one must stop
    /// acting but not exit.
    pub fn is_fenced(&self) -> bool {
        let journal = match self {
            AgentError::Journal(error) | AgentError::Driver(DriverError::Journal(error)) | AgentError::SelfUpdate(SelfUpdateError::Journal(error)) => error,
            _ => return false,
        };
        matches!(journal, JournalError::Fenced { .. } | JournalError::StaleLease { .. })
    }
}

/// Runs the agent until `shutdown` completes or the journal fails.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    // Credentials come first: an agent that would refuse them must not take
    // the lease from one that works.
    let credentials = Credentials::load(&config)?;
    let access = match &config.stack {
        Some(stack) => GitAccess::prepare(&credentials.git, &stack.repository, &config.state_directory().join("ssh"))?,
        None => GitAccess::default(),
    };

    let seams = Seams::from_config(&config.seams);
    for warning in &config.warnings {
        tracing::warn!(key = %warning.key, "configuration: {warning}");
    }
    if let Some(clock_file) = &config.seams.clock_file {
        tracing::warn!(clock_file = %clock_file.display(), "the wall clock and its synchronised flag are read from a file (seams.clock_file); use this for tests only");
    }
    let journal = open_journal(&config.journal)?;
    tracing::info!(journal = %config.journal.directory.display(), "agent started");

    let secret = match (&config.notifications.webhook_url, &config.notifications.secret_file) {
        (Some(_), Some(path)) => Some(crate::notify::read_secret(path).map_err(AgentError::Setup)?),
        _ => None,
    };
    let disks = crate::driver::space::setup::watched_disks(&config);
    let mut runtime = Runtime::new(device_name(&config), journal, seams, config.notifications.max_pending, disks);
    let (button, edges) = panel::ButtonHandle::new(config.panel.button_settings());
    runtime.button = button;
    let runtime = Arc::new(runtime);
    runtime.board.set(Source::Agent, Some(Condition::Starting));
    let panel_task = panel::spawn(&config.panel, runtime.clone(), edges);

    tokio::pin!(shutdown);
    let result = tokio::select! {
        result = act_under_lease(&config, credentials, access, runtime.clone(), secret) => result,
        () = serve_control(&config, runtime.clone()) => Ok(()),
        () = &mut shutdown => {
            tracing::info!("stop requested");
            Ok(())
        }
    };

    process::stop_children(CHILD_GRACE).await;
    panel_task.abort();
    let _ = std::fs::remove_file(&config.control.socket);
    match &result {
        Ok(()) => tracing::info!("agent stopped"),
        Err(error) => tracing::error!(%error, "agent stopped on an error"),
    }
    result
}

/// Acts while this agent holds the newest lease: runs the machines and the
/// notification sender. When another agent fences it out, or it hands over
/// to a new container, it stops them and waits until it may act again.
async fn act_under_lease(
    config: &Config,
    credentials: Credentials,
    access: GitAccess,
    runtime: Arc<Runtime>,
    secret: Option<Vec<u8>>,
) -> Result<(), AgentError> {
    let mut claim = Claim::new(runtime.clone(), config.docker.host.clone(), config.self_update.clone());
    let mut first_start = true;
    loop {
        let epoch = claim.acquire(first_start).await?;
        first_start = false;
        tracing::info!(holder = claim.holder(), epoch, "acting under the lease");

        let result = tokio::select! {
            result = run_machines(config, credentials.clone(), access.clone(), runtime.clone()) => result,
            result = run_sender(config, runtime.clone(), secret.clone()) => result,
        };
        process::stop_children(CHILD_GRACE).await;
        match result {
            Ok(()) => tracing::info!("handed over; this agent stops acting"),
            Err(error) if error.is_fenced() => tracing::warn!(%error, "another agent holds a newer lease; this agent stops acting"),
            Err(error) => return Err(error),
        }
    }
}

/// Time between two tries to start the control API.
const CONTROL_RETRY: Duration = Duration::from_secs(10);

/// Serves the control API. When it cannot start, for example while the old
/// agent of a handover still listens on a shared socket, the agent runs
/// without it (acting or passive) and tries again. This future never completes.
async fn serve_control(config: &Config, runtime: Arc<Runtime>) {
    let mut failures = 0u32;
    loop {
        if let Err(error) = control::server::serve(runtime.clone(), &config.control.socket, config.control.tcp_port).await {
            failures += 1;
            if failures == 1 || failures.is_multiple_of(30) {
                tracing::error!(%error, failures, retry_in = %humantime::format_duration(CONTROL_RETRY), socket = %config.control.socket.display(), "control API not available; the agent runs without it and tries again");
            }
        }
        tokio::time::sleep(CONTROL_RETRY).await;
    }
}

fn device_name(config: &Config) -> String {
    config.agent.name.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        host.trim().to_string()
    })
}

/// Delivers notifications while a webhook is configured; otherwise waits
/// forever, and notifications stay in the outbox.
async fn run_sender(config: &Config, runtime: Arc<Runtime>, secret: Option<Vec<u8>>) -> Result<(), AgentError> {
    let (Some(url), Some(secret)) = (&config.notifications.webhook_url, secret) else {
        return std::future::pending().await;
    };
    let settings = SenderSettings {
        url: url.parse().map_err(|error| AgentError::Setup(format!("notifications.webhook_url {url:?}: {error}")))?,
        secret,
        device: runtime.device.clone(),
        timeout: config.notifications.timeout,
        retry_min: config.notifications.retry_backoff_min,
        retry_max: config.notifications.retry_backoff_max,
    };
    crate::notify::run_sender(runtime.journal.clone(), runtime.seams.clone(), settings, runtime.outbox_wake.clone()).await?;
    Ok(())
}

/// Runs the configured machines. Returns `Ok` when the self-update machine
/// handed over, and an error when the journal fails or fences this agent out.
async fn run_machines(config: &Config, credentials: Credentials, access: GitAccess, runtime: Arc<Runtime>) -> Result<(), AgentError> {
    let platform = config.docker.platform.as_deref().and_then(Platform::parse);
    let engine = wait_for_engine(config.docker.host.as_deref(), platform, &runtime.board).await.with_credentials(credentials.registries);
    runtime.board.set(Source::Agent, None);

    // The space guard runs beside the other machines and never takes a turn.
    // NOTE: it starts once the Docker engine responds, because stopping the
    // recorder and reclaiming need the engine; until then nothing samples
    // the filesystems.
    let (space_guard, pull_check) = crate::driver::space::setup::build(config, &engine, runtime.clone()).await;

    let stack = async {
        match &config.stack {
            Some(stack) => run_stack(config, stack, engine.clone(), access, runtime.clone(), pull_check.clone()).await,
            None => std::future::pending().await,
        }
    };
    let self_update = async {
        match &config.self_update {
            Some(section) => run_self_update(section, engine.clone(), runtime.clone(), config.stack.is_some(), pull_check.clone()).await,
            None => std::future::pending().await,
        }
    };
    let host_patches = async {
        match config.host.clone() {
            Some(host) => crate::driver::host_schedule::run(runtime.clone(), engine.clone(), host).await,
            None => std::future::pending().await,
        }
    };
    let factory_reset = run_factory_reset(config, engine.clone(), runtime.clone());
    tokio::select! {
        result = stack => result,
        result = self_update => result,
        result = factory_reset => result,
        result = space_guard.run() => Ok(result?),
        result = host_patches => Ok(result?),
    }
}

/// Runs the self-update machine until it hands over. An agent that cannot
/// update itself, for example one outside a container, logs why and goes on
/// with its other machines.
async fn run_self_update(
    section: &SelfUpdateConfig,
    engine: Engine,
    runtime: Arc<Runtime>,
    stack_configured: bool,
    pull_check: PullCheck,
) -> Result<(), AgentError> {
    let own = match crate::selfupdate::docker::own_container(&engine, section.image.as_deref()).await {
        Ok(own) => own,
        Err(error) => {
            tracing::error!(machine = "self-update", %error, "self-update is not available");
            return std::future::pending().await;
        }
    };
    tracing::info!(machine = "self-update", container = %own.container.short_id(), name = %own.container.name, image = %own.followed, "found this agent's own container");
    let driver = SelfUpdateDriver::new(runtime, engine, section.clone(), own, stack_configured).with_pull_check(pull_check.for_machine("self-update"));
    match driver.run().await? {
        DriverExit::HandedOver { .. } => Ok(()),
    }
}

async fn run_stack(
    config: &Config,
    stack: &StackConfig,
    engine: Engine,
    access: GitAccess,
    runtime: Arc<Runtime>,
    pull_check: PullCheck,
) -> Result<(), AgentError> {
    let compose_command = find_compose(config).await;

    let git = GitMirror::for_stack(config, stack, access);
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
        machine: StackSettings { max_resumes: stack.max_resumes },
        signatures: signature_policy(config),
        pull_check: Some(pull_check),
    };
    let driver = StackDriver::new(runtime, engine, git, compose, settings);
    driver.run().await?;
    Ok(())
}

/// Runs the factory-reset machine, which the panel button and the stack
/// update's last fallback start.
async fn run_factory_reset(config: &Config, engine: Engine, runtime: Arc<Runtime>) -> Result<(), AgentError> {
    let defaults = crate::machine::factory::FactoryResetSettings::default();
    let settings = crate::driver::factory::driver::FactorySettings {
        directory: config.factory_directory(),
        project: config.stack.as_ref().map(|stack| stack.project.clone()),
        compose_command: find_compose(config).await,
        compose_timeout: config.stack.as_ref().map_or(Duration::from_secs(600), |stack| stack.compose_timeout),
        docker_host: config.docker.host.clone(),
        script: config.stack.as_ref().map(|stack| stack.factory_reset_command.clone()).unwrap_or_default(),
        script_timeout: config.stack.as_ref().map_or(Duration::from_secs(1800), |stack| stack.factory_reset_timeout),
        machine: crate::machine::factory::FactoryResetSettings { max_resumes: config.stack.as_ref().map_or(defaults.max_resumes, |stack| stack.max_resumes) },
    };
    let driver = crate::driver::factory::driver::FactoryResetDriver::new(runtime, engine, settings);
    driver.run().await.map_err(|crate::driver::factory::driver::FactoryDriverError::Journal(error)| AgentError::Journal(error))
}

/// Returns the signature policy when `git.require_signed_commits` is on.
fn signature_policy(config: &Config) -> Option<SignaturePolicy> {
    if !config.git.require_signed_commits {
        return None;
    }
    let allowed_signers = config.git.allowed_signers_file.clone()?;
    tracing::info!(list = %allowed_signers.display(), "only commits signed by a key in the allowed signers list are applied");
    Some(SignaturePolicy { allowed_signers })
}

/// Opens the journal. A file without a valid header is moved aside, never
/// deleted, and a new journal is started, so a damaged file cannot keep the
/// device from updating.
pub fn open_journal(config: &JournalConfig) -> Result<SharedJournal, JournalError> {
    let options = JournalOptions { file_bytes: config.size_kib * 1024, sync: true, history: History::Recent };
    let directory = &config.directory;
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
                if failures == 1 || failures.is_multiple_of(12) {
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
