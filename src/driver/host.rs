//! Runs the host-patch machine: feeds it events, persists every step to the
//! journal, and only then runs the commands the step queued, over SSH.
//!
//! Scripts that only read, and the idempotent job start, are repeated after a
//! dropped connection until a deadline. The reboot command is sent once.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::HostConfig;
use crate::driver::host_script::{self, JobState, PreflightReport};
use crate::driver::ssh::{PinnedHostKey, RemoteOutput, SshClient, SshError, SshSession, SshSettings};
use crate::driver::stack::SharedJournal;
use crate::failpoint::{self, Point};
use crate::journal::record::{HostMemoryRecord, MachineErrorRecord, TransitionRecord};
use crate::journal::{JournalError, Record};
use crate::machine::MachineKind;
use crate::machine::host::{
    BootReport, HostCommand, HostEvents, HostFacts, HostJob, HostMachine, HostMemory, HostOutcome, HostSettings, HostState, Interruption, JobKind, JobReport,
    JobStatus, RebootCheck, Step,
};
use crate::model::Failure;
use crate::notify::{Notice, Severity};
use crate::runtime::{Progress, Runtime};
use crate::seams::Seams;

/// Name of the machine in logs and failpoints.
const MACHINE: &str = "host-patch";

/// Time after which a job that no runner claimed is launched again. The
/// runner's `mkdir` claim keeps a second launch from running it twice.
const RELAUNCH_AFTER: Duration = Duration::from_secs(10);

/// Errors that stop the host-patch driver.
#[derive(Debug, thiserror::Error)]
pub enum HostDriverError {
    /// The journal cannot record a step, so the driver must not act on it.
    #[error("cannot record a host-patch transition: {0}")]
    Journal(#[from] JournalError),
}

/// The host-patch machine with everything it needs to act.
pub struct HostDriver {
    machine: HostMachine,
    queue: VecDeque<HostCommand>,
    journal: SharedJournal,
    seams: Seams,
    config: HostConfig,
    session: Option<SshSession>,
    /// The running agent, when the driver runs inside it: steps are then
    /// reported as progress and final steps queue notifications.
    runtime: Option<Arc<Runtime>>,
}

impl HostDriver {
    /// Builds the driver with the machine in the state the journal records.
    pub fn new(journal: SharedJournal, seams: Seams, config: HostConfig) -> HostDriver {
        let (state, memory) = {
            let journal = journal.lock().expect("no code panics while holding the journal lock");
            let code = journal.state().machine(MachineKind::HostPatch.code()).and_then(|view| view.state);
            let state = code.and_then(HostState::from_code).unwrap_or_else(|| {
                if let Some(code) = code {
                    tracing::warn!(machine = MACHINE, code, "the journal contains an unknown state from a newer version, starting from Idle");
                }
                HostState::Idle
            });
            (state, journal.state().host_memory.clone().unwrap_or_default())
        };
        let settings = HostSettings { max_resumes: config.max_resumes, max_reboots: config.max_reboots };
        HostDriver { machine: HostMachine::restore(state, memory, settings), queue: VecDeque::new(), journal, seams, config, session: None, runtime: None }
    }

    /// Runs inside the agent: reports progress and queues notifications.
    pub fn with_runtime(mut self, runtime: Arc<Runtime>) -> HostDriver {
        self.runtime = Some(runtime);
        self
    }

    /// Tells whether no attempt is in progress.
    pub fn is_resting(&self) -> bool {
        self.machine.is_resting()
    }

    pub fn state(&self) -> HostState {
        self.machine.state()
    }

    pub fn memory(&self) -> &HostMemory {
        self.machine.memory()
    }

    /// Runs one patch attempt to its end: the attempt in progress after a
    /// restart, or a new one. Returns the state the machine rests in
    /// (`Done` or `Failed`). Dropping the future stops the attempt. The step
    /// in progress is already persisted and is repeated by the next call.
    pub async fn run_cycle(&mut self) -> Result<HostState, HostDriverError> {
        if self.machine.is_resting() {
            self.feed(HostEvents::Start)?;
        } else {
            tracing::info!(machine = MACHINE, state = self.machine.state().name(), "resuming the attempt after a restart");
            self.feed(HostEvents::Resumed)?;
        }

        loop {
            if let Some(command) = self.queue.pop_front() {
                failpoint::hit(MACHINE, self.machine.state().name(), Point::BeforeCommand);
                let event = self.execute(command).await;
                self.feed(event)?;
                continue;
            }
            if self.machine.is_resting() {
                break;
            }
            // A busy state with no command: its action could not queue one
            // because the memory lacks what it needs. Resuming takes the
            // state's own recovery path, which ends in Failed at the limit.
            tracing::error!(machine = MACHINE, state = self.machine.state().name(), "no command queued in a busy state, resuming it");
            self.feed(HostEvents::Resumed)?;
        }

        if let Some(session) = self.session.take() {
            session.close().await;
        }
        Ok(self.machine.state())
    }

    /// Feeds one event and persists the step before queuing its commands.
    fn feed(&mut self, event: HostEvents) -> Result<(), HostDriverError> {
        let facts = HostFacts { nonce: rand::random() };
        let step = match self.machine.handle(event, facts) {
            Ok(step) => step,
            Err(unexpected) => {
                tracing::warn!(machine = MACHINE, error = %unexpected, "event ignored");
                return Ok(());
            }
        };

        self.persist(&step)?;
        self.log_step(&step);
        self.queue.extend(step.commands.iter().cloned());
        Ok(())
    }

    /// Appends the step and the memory it changed to the journal, synced.
    fn persist(&mut self, step: &Step) -> Result<(), HostDriverError> {
        let meta = self.seams.meta();
        let mut records = vec![Record::Transition(TransitionRecord {
            meta,
            machine: MachineKind::HostPatch.code(),
            from: step.from.code(),
            event: step.event.code(),
            to: step.to.code(),
            attempt: step.attempt,
        })];
        if step.memory_changed {
            records.push(Record::HostMemory(HostMemoryRecord { meta, memory: self.machine.memory().clone() }));
        }
        if let Some(message) = &step.failure {
            records.push(Record::MachineError(MachineErrorRecord { meta, machine: MachineKind::HostPatch.code(), message: message.clone() }));
        }

        match &self.runtime {
            Some(runtime) => {
                let notices = notices_for(step, self.machine.memory());
                runtime.append_with_notices(records, &notices)?;
                runtime.report(Progress::Step {
                    machine: MACHINE.into(),
                    from: step.from.name().into(),
                    event: step.event.name().into(),
                    to: step.to.name().into(),
                    commit: None,
                });
            }
            None => self.journal.lock().expect("no code panics while holding the journal lock").append(records)?,
        }
        failpoint::hit(MACHINE, step.to.name(), Point::AfterPersist);
        Ok(())
    }

    fn log_step(&self, step: &Step) {
        tracing::info!(machine = MACHINE, from = step.from.name(), event = step.event.name(), to = step.to.name(), attempt = step.attempt, "transition");
        if let Some(message) = &step.failure {
            tracing::error!(machine = MACHINE, state = step.from.name(), attempt = step.attempt, error = %message, "host patch failed");
        }
        if let (HostState::Done, Some(outcome)) = (step.to, &self.machine.memory().last_outcome) {
            tracing::info!(machine = MACHINE, attempt = step.attempt, outcome = %outcome.describe(), "host patch finished");
        }
    }

    async fn execute(&mut self, command: HostCommand) -> HostEvents {
        match command {
            HostCommand::Connect => self.connect_checked().await,
            HostCommand::Preflight => self.preflight().await,
            HostCommand::RunJob { job } => self.run_job(&job).await,
            HostCommand::CheckReboot => self.check_reboot().await,
            HostCommand::Reboot { boot_before } => self.reboot(&boot_before).await,
            HostCommand::AwaitBoot { boot_before } => self.await_boot(&boot_before).await,
        }
    }

    fn ssh_settings(&self) -> Result<SshSettings, SshError> {
        let host_key = PinnedHostKey::parse(&self.config.host_key).map_err(|reason| SshError::Connect {
            endpoint: format!("{}:{}", self.config.address, self.config.port),
            reason: format!("host.host_key is invalid: {reason}"),
        })?;
        Ok(SshSettings {
            address: self.config.address.clone(),
            port: self.config.port,
            user: self.config.user.clone(),
            key_file: self.config.key_file.clone(),
            host_key,
            connect_timeout: self.config.connect_timeout,
        })
    }

    /// Opens a new session, replacing any old one. The key file is read on
    /// every connection, so a fixed key works without a restart.
    async fn connect(&mut self) -> Result<(), SshError> {
        self.session = None;
        let client = SshClient::new(self.ssh_settings()?)?;
        let session = client.connect().await?;
        tracing::debug!(machine = MACHINE, endpoint = %client.settings().endpoint(), "connected over SSH");
        self.session = Some(session);
        Ok(())
    }

    async fn connect_checked(&mut self) -> HostEvents {
        match self.connect().await {
            Ok(()) => {
                tracing::info!(machine = MACHINE, address = %self.config.address, port = self.config.port, "connected to the host, whose key matches the pinned one");
                HostEvents::Connected
            }
            Err(error) => event_for(error),
        }
    }

    /// Runs a script once on the current session, connecting first if needed.
    async fn run_once(&mut self, label: &str, script: &str, timeout: Duration) -> Result<RemoteOutput, SshError> {
        if self.session.as_ref().is_some_and(SshSession::is_closed) {
            tracing::warn!(machine = MACHINE, command = label, "the SSH connection dropped, reconnecting");
        }
        if self.session.as_ref().is_none_or(SshSession::is_closed) {
            self.connect().await?;
        }
        let session = self.session.as_ref().expect("connect() stored a session or returned an error");
        let result = session.run(label, &host_script::wrap(script, self.config.use_sudo), timeout).await;
        if matches!(result, Err(SshError::Disconnected { .. } | SshError::CommandTimedOut { .. })) {
            self.session = None;
        }
        result
    }

    /// Runs a script that is safe to repeat, reconnecting after a dropped
    /// connection until `deadline`. A rejected host key, a rejected login
    /// and a command timeout end the retries at once.
    async fn run_retrying(&mut self, label: &str, script: &str, deadline: Instant) -> Result<RemoteOutput, SshError> {
        let mut failures = 0u32;
        loop {
            let error = match self.run_once(label, script, self.config.command_timeout).await {
                Ok(output) => return Ok(output),
                Err(error) => error,
            };
            let retry = matches!(error, SshError::Connect { .. } | SshError::ConnectTimedOut { .. } | SshError::Disconnected { .. });
            if !retry || Instant::now() + self.config.job_poll_interval >= deadline {
                return Err(error);
            }

            failures += 1;
            if failures == 1 || failures.is_multiple_of(12) {
                tracing::warn!(machine = MACHINE, command = label, failures, %error, "host unreachable, reconnecting");
            }
            tokio::time::sleep(self.config.job_poll_interval).await;
        }
    }

    fn reconnect_deadline(&self) -> Instant {
        Instant::now() + self.config.reconnect_window
    }

    /// Checks space, locks and interrupted dpkg runs. While another process
    /// holds a dpkg or apt lock it checks again every `job_poll_interval`,
    /// up to `dpkg_lock_wait`, and never touches the holder.
    async fn preflight(&mut self) -> HostEvents {
        let lock_deadline = Instant::now() + self.config.dpkg_lock_wait;
        let mut reported_holder = false;
        loop {
            let deadline = self.reconnect_deadline();
            let output = match self.run_retrying("preflight", &host_script::preflight(), deadline).await {
                Ok(output) => output,
                Err(error) => return event_for(error),
            };
            let report = host_script::parse_preflight(&output.stdout);

            if let Some(failure) = self.space_problem(&report) {
                return HostEvents::CommandFailed(failure);
            }
            if report.lock_probe_missing && !reported_holder {
                tracing::warn!(machine = MACHINE, "lslocks is missing on the host, so apt waits for a held dpkg lock itself (host.dpkg_lock_wait)");
                reported_holder = true;
            }
            if let Some(holder) = report.lock_holders.first() {
                let holder_text = format!("{} is held by pid {} ({})", holder.path, holder.pid, holder.command);
                if Instant::now() >= lock_deadline {
                    let wait = humantime::format_duration(self.config.dpkg_lock_wait);
                    return HostEvents::DpkgBusy(Failure::transient(format!(
                        "{holder_text} for longer than host.dpkg_lock_wait ({wait}); the holder was left running"
                    )));
                }
                if !reported_holder {
                    tracing::info!(machine = MACHINE, pid = holder.pid, command = %holder.command, path = %holder.path, wait = %humantime::format_duration(self.config.dpkg_lock_wait), "dpkg lock held by another process; waiting");
                    reported_holder = true;
                }
                tokio::time::sleep(self.config.job_poll_interval).await;
                continue;
            }
            if report.interrupted() {
                let interruption = report.interruption();
                tracing::warn!(machine = MACHINE, problem = %interruption, "dpkg needs a repair before the upgrade");
                return HostEvents::RepairNeeded(Interruption { description: interruption });
            }
            return HostEvents::PreflightPassed;
        }
    }

    fn space_problem(&self, report: &PreflightReport) -> Option<Failure> {
        let too_little = |free_kib: u64, minimum_mib: u64| free_kib / 1024 < minimum_mib;
        if let Some(space) = report.free.iter().find(|space| too_little(space.free_kib, self.config.min_free_mib)) {
            return Some(Failure::local(format!(
                "only {} MiB free on {} of the host, but host.min_free_mib requires {} MiB. Free space there (apt-get clean, old logs) and run again",
                space.free_kib / 1024,
                space.path,
                self.config.min_free_mib
            )));
        }
        if report.free.is_empty() {
            return Some(Failure::local("the preflight check could not read the host's free space (df printed nothing)"));
        }
        let boot = report.boot_free.as_ref().filter(|space| too_little(space.free_kib, self.config.min_free_boot_mib))?;
        Some(Failure::local(format!(
            "only {} MiB free on {} of the host, but host.min_free_boot_mib requires {} MiB. Remove old kernels there and run again",
            boot.free_kib / 1024,
            boot.path,
            self.config.min_free_boot_mib
        )))
    }

    fn job_timeout(&self, kind: JobKind) -> Duration {
        match kind {
            JobKind::Repair => self.config.repair_timeout,
            JobKind::UpdateLists => self.config.update_lists_timeout,
            JobKind::Upgrade => self.config.upgrade_timeout,
        }
    }

    /// Starts the job unless the host has it already, then reads its status
    /// every `job_poll_interval` until it ends. A dropped connection does not
    /// stop the job, and the driver reconnects until the job's timeout.
    async fn run_job(&mut self, job: &HostJob) -> HostEvents {
        let timeout = self.job_timeout(job.kind);
        let local_deadline = Instant::now() + timeout;
        let root = self.config.job_directory.clone();
        let status_script = host_script::job_status(&root, job);
        let mut last_line = String::new();
        let mut started_at = None;
        tracing::info!(machine = MACHINE, job = %job.id, kind = job.kind.name(), timeout = %humantime::format_duration(timeout), "running job on the host");

        loop {
            let output = match self.run_retrying("job status", &status_script, local_deadline).await {
                Ok(output) => output,
                Err(error) => return event_for(error),
            };
            let report = match host_script::parse_job_status(&output.stdout) {
                Ok(report) => report,
                Err(reason) => return HostEvents::CommandFailed(Failure::local(format!("cannot read the status of job {}: {reason}", job.id))),
            };

            let status = match report.state {
                JobState::Absent | JobState::Unclaimed => {
                    // A runner needs a moment to claim its job. A job left
                    // unclaimed longer was never launched, for example because
                    // the agent stopped between writing and launching it.
                    let launch = started_at.is_none_or(|at: Instant| at.elapsed() >= RELAUNCH_AFTER);
                    if launch {
                        if let Err(event) = self.start_job(job, local_deadline).await {
                            return event;
                        }
                        started_at = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                JobState::Finished { exit_code: 0 } => JobStatus::Succeeded,
                JobState::Finished { exit_code } => JobStatus::Failed { exit_code },
                JobState::Lost => JobStatus::Lost,
                JobState::Running => {
                    let running_for = report.running_for().unwrap_or_default();
                    if running_for >= timeout || Instant::now() >= local_deadline {
                        JobStatus::TimedOut { seconds: running_for.as_secs() }
                    } else {
                        log_progress(job, &report.output_tail, &mut last_line);
                        tokio::time::sleep(self.config.job_poll_interval).await;
                        continue;
                    }
                }
            };

            tracing::info!(machine = MACHINE, job = %job.id, status = ?status, "job ended");
            return HostEvents::JobFinished(JobReport { job: job.clone(), status, output_tail: report.output_tail });
        }
    }

    async fn start_job(&mut self, job: &HostJob, deadline: Instant) -> Result<(), HostEvents> {
        let command = host_script::job_command(job.kind, self.config.dpkg_lock_wait);
        let script = host_script::start_job(&self.config.job_directory, job, &command);
        let output = self.run_retrying("start job", &script, deadline).await.map_err(event_for)?;
        if !output.success() {
            let reason = crate::driver::process::last_lines(&output.stderr, 4);
            return Err(HostEvents::CommandFailed(Failure::local(format!("cannot start job {} on the host: {reason}", job.id))));
        }
        let launcher = output.stdout.lines().find_map(|line| line.strip_prefix("launcher=")).unwrap_or("unknown").to_string();
        tracing::info!(machine = MACHINE, job = %job.id, launcher = %launcher, "job started on the host");
        Ok(())
    }

    async fn read_host_facts(&mut self, deadline: Instant) -> Result<host_script::HostFactsReport, HostEvents> {
        let script = host_script::host_facts(&self.config.boot_id_command, &self.config.kernel_release_command, &self.config.installed_kernels_command);
        let output = self.run_retrying("read boot id and kernels", &script, deadline).await.map_err(event_for)?;
        host_script::parse_host_facts(&output.stdout).map_err(|reason| HostEvents::CommandFailed(Failure::local(reason)))
    }

    async fn check_reboot(&mut self) -> HostEvents {
        let facts = match self.read_host_facts(self.reconnect_deadline()).await {
            Ok(facts) => facts,
            Err(event) => return event,
        };
        if facts.reboot_reasons.is_empty() {
            tracing::info!(machine = MACHINE, kernel = %facts.kernels.running, "no reboot needed");
            return HostEvents::RebootNotRequired;
        }
        tracing::info!(machine = MACHINE, reasons = ?facts.reboot_reasons, "the host needs a reboot");
        HostEvents::RebootRequired(RebootCheck { boot_id: facts.boot_id, kernels: facts.kernels, reasons: facts.reboot_reasons })
    }

    /// Reboots the host unless it already runs a new boot: after a restart
    /// of the agent, the reboot may have happened.
    async fn reboot(&mut self, boot_before: &str) -> HostEvents {
        let facts = match self.read_host_facts(self.reconnect_deadline()).await {
            Ok(facts) => facts,
            Err(event) => return event,
        };
        if facts.boot_id != boot_before {
            tracing::info!(machine = MACHINE, boot_id = %facts.boot_id, "the host already runs a new boot, so it is not rebooted again");
            return HostEvents::RebootIssued;
        }

        tracing::warn!(machine = MACHINE, command = %self.config.reboot_command, "rebooting the host");
        let command = self.config.reboot_command.clone();
        let result = self.run_once("reboot", &command, self.config.command_timeout).await;
        self.session = None;
        match result {
            Ok(output) if output.success() => HostEvents::RebootIssued,
            Ok(output) => HostEvents::CommandFailed(Failure::local(format!(
                "host.reboot_command `{command}` failed with exit status {:?}: {}",
                output.exit_status,
                crate::driver::process::last_lines(&output.stderr, 4)
            ))),
            // The host going down may cut the connection before the command
            // reports. The boot id check that follows shows what happened.
            Err(SshError::Disconnected { .. } | SshError::CommandTimedOut { .. }) => HostEvents::RebootIssued,
            Err(error) => event_for(error),
        }
    }

    /// Waits until the host reports a boot id other than `boot_before`,
    /// up to `boot_timeout`, and reads its kernels.
    async fn await_boot(&mut self, boot_before: &str) -> HostEvents {
        let deadline = Instant::now() + self.config.boot_timeout;
        let timeout_text = humantime::format_duration(self.config.boot_timeout).to_string();
        let mut last_error = None;
        loop {
            if Instant::now() >= deadline {
                return match last_error {
                    Some(error) => {
                        HostEvents::Unreachable(Failure::local(format!("the host did not come back within host.boot_timeout ({timeout_text}): {error}")))
                    }
                    None => HostEvents::CommandFailed(Failure::local(format!(
                        "the host still runs boot {boot_before} after host.boot_timeout ({timeout_text}); it did not reboot"
                    ))),
                };
            }
            tokio::time::sleep(self.config.job_poll_interval).await;

            match self.read_host_facts(Instant::now()).await {
                Ok(facts) if facts.boot_id != boot_before => {
                    tracing::info!(machine = MACHINE, boot_id = %facts.boot_id, kernel = %facts.kernels.running, "the host is back on a new boot");
                    return HostEvents::BootVerified(BootReport { boot_id: facts.boot_id, kernels: facts.kernels });
                }
                Ok(_) => {
                    last_error = None;
                    tracing::debug!(machine = MACHINE, "the host still runs the old boot");
                }
                Err(HostEvents::HostKeyRejected(failure)) => return HostEvents::HostKeyRejected(failure),
                Err(HostEvents::Unreachable(failure) | HostEvents::CommandFailed(failure)) => {
                    tracing::debug!(machine = MACHINE, error = %failure.message, "waiting for the host to come back");
                    last_error = Some(failure.message);
                    self.session = None;
                }
                Err(other) => return other,
            }
        }
    }
}

/// Logs the last line of a running job's output when it changed.
fn log_progress(job: &HostJob, output_tail: &str, last_line: &mut String) {
    let Some(line) = output_tail.lines().rev().map(str::trim).find(|line| !line.is_empty()) else { return };
    if line != last_line {
        tracing::debug!(machine = MACHINE, job = %job.id, output = line, "job running");
        *last_line = line.to_string();
    }
}

/// Turns an SSH error into the machine's event for it.
fn event_for(error: SshError) -> HostEvents {
    let message = error.to_string();
    match error {
        SshError::HostKeyMismatch { .. } => HostEvents::HostKeyRejected(Failure::local(message)),
        SshError::KeyFile { .. } | SshError::AuthenticationRejected { .. } => HostEvents::CommandFailed(Failure::local(message)),
        SshError::CommandTimedOut { .. } => HostEvents::CommandFailed(Failure::transient(message)),
        SshError::Connect { .. } | SshError::ConnectTimedOut { .. } | SshError::Disconnected { .. } => HostEvents::Unreachable(Failure::transient(message)),
    }
}

/// Returns the notifications of a step that ends an attempt: the outcome, at
/// a severity that matches it.
fn notices_for(step: &Step, memory: &HostMemory) -> Vec<Notice> {
    let resting = matches!(step.to, HostState::Done | HostState::Failed);
    let (Some(outcome), true) = (&memory.last_outcome, resting && step.from != step.to) else {
        return Vec::new();
    };
    let (severity, kind) = match outcome {
        HostOutcome::Patched { .. } => (Severity::Info, "host-patched"),
        HostOutcome::Busy { .. } => (Severity::Warning, "host-busy"),
        HostOutcome::HostKeyRejected { .. } => (Severity::Error, "host-key-rejected"),
        HostOutcome::KernelNotActivated { .. } => (Severity::Error, "kernel-not-activated"),
        HostOutcome::Failed { .. } => (Severity::Error, "host-patch-failed"),
    };
    vec![Notice { severity, kind, machine: MachineKind::HostPatch.code(), message: outcome.describe() }]
}
