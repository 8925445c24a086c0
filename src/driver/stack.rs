//! Runs the stack machine: feeds it events, persists every step to the
//! journal, and only then runs the commands the step queued.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use crate::coordinator::{Process, Turn};
use crate::driver::apply_gate::{ApplyGate, LockSources};
use crate::driver::compose::Compose;
use crate::driver::docker::{Engine, EngineError};
use crate::driver::git::GitMirror;
use crate::driver::health::{self, GateSettings};
use crate::driver::signing::SignaturePolicy;
use crate::driver::space::{self, preflight::PullCheck};
use crate::failpoint::{self, Point};
use crate::journal::record::{MachineErrorRecord, StackMemoryRecord, TransitionRecord};
use crate::journal::{JournalError, Record};
use crate::machine::MachineKind;
use crate::machine::factory::{FactoryOutcome, FactoryResetState};
use crate::machine::stack::{
    ApplyPurpose, Outcome, StackCommand, StackEvent, StackEvents, StackFacts, StackMachine, StackMemory, StackPlan, StackSettings, StackState, Step,
};
use crate::model::{CommitId, Failure, FailureKind, Release, ServiceImage};
use crate::notify::{Notice, Severity};
use crate::panel::{Condition, Source};
use crate::policy::ApplyPolicy;
use crate::runtime::{Progress, Runtime};

pub use crate::runtime::SharedJournal;

/// Time between two checks of the apply policy while a pulled commit waits.
/// The checks read the clock, lock files and, with a lock label, the list of
/// running containers.
const POLICY_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Name of the override file, inside the state directory.
const OVERRIDE_FILE: &str = "pinned.override.json";

/// Stack driver settings, read from the configuration.
#[derive(Debug, Clone)]
pub struct DriverSettings {
    pub poll_interval: Duration,
    pub poll_jitter_percent: u8,
    pub retry_backoff_min: Duration,
    pub retry_backoff_max: Duration,
    pub pull_timeout: Duration,
    pub probation: Duration,
    pub health_grace: Duration,
    pub apply_policy: ApplyPolicy,
    pub update_locks: LockSources,
    pub state_directory: PathBuf,
    pub machine: StackSettings,
    /// Set when only signed commits may be applied.
    pub signatures: Option<SignaturePolicy>,
    /// The space check before every pull, from the space guard's settings.
    pub pull_check: Option<PullCheck>,
}

/// Errors that stop the stack driver.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The journal cannot record a step, so the driver must not act on it.
    #[error("cannot record a stack transition: {0}")]
    Journal(#[from] JournalError),
}

/// The stack machine with everything it needs to act.
pub struct StackDriver {
    machine: StackMachine,
    queue: VecDeque<StackCommand>,
    /// A poll's first step, held back until the poll turns out to find
    /// something new, so that quiet polls do not wear the journal.
    deferred: Option<Step>,
    backoff: Option<Duration>,
    runtime: Arc<Runtime>,
    engine: Engine,
    git: GitMirror,
    compose: Compose,
    settings: DriverSettings,
    /// The turn to change the device, held from the apply until the machine
    /// is back in `Idle`.
    turn: Option<Turn>,
    /// When the current attempt left `Idle`, for the duration metric.
    attempt_started: Option<Instant>,
    gate: ApplyGate,
    /// Whether a clock problem was notified since the last successful pull,
    /// so that retries while the clock stays wrong notify only once.
    clock_problem_notified: bool,
}

impl StackDriver {
    /// Builds the driver with the machine in the state the journal records.
    pub fn new(runtime: Arc<Runtime>, engine: Engine, git: GitMirror, compose: Compose, settings: DriverSettings) -> StackDriver {
        let (state, memory) = {
            let journal = runtime.lock_journal();
            let view = journal.state().machine(MachineKind::Stack.code());
            let code = view.and_then(|view| view.state);
            let state = code.and_then(StackState::from_code).unwrap_or_else(|| {
                if let Some(code) = code {
                    tracing::warn!(machine = "stack", code, "the journal contains a state this version does not know; starting from Idle");
                }
                StackState::Idle
            });
            (state, journal.state().stack_memory.clone().unwrap_or_default())
        };
        let machine = StackMachine::restore(state, memory, settings.machine);
        let gate = ApplyGate::new(
            MachineKind::Stack,
            settings.apply_policy.clone(),
            settings.update_locks.clone(),
            runtime.journal.clone(),
            runtime.seams.clone(),
            engine.clone(),
        );
        StackDriver {
            machine,
            queue: VecDeque::new(),
            deferred: None,
            backoff: None,
            runtime,
            engine,
            git,
            compose,
            settings,
            turn: None,
            attempt_started: None,
            gate,
            clock_problem_notified: false,
        }
    }

    /// Tells whether `state` changes the device, so the machine must hold
    /// the turn while in it.
    fn changes_device(state: StackState) -> bool {
        matches!(state, StackState::Applying | StackState::Probation | StackState::Reverting | StackState::RevertProbation | StackState::FactoryReset)
    }

    async fn take_turn(&mut self, purpose: String) {
        if self.turn.is_none() {
            self.turn = Some(self.runtime.coordinator.acquire(Process::Stack, &purpose).await);
        }
    }

    pub fn state(&self) -> StackState {
        self.machine.state()
    }

    /// Runs the machine until the journal fails. The caller stops it by
    /// dropping the future. A command in progress is then cancelled, and it
    /// runs again after the restart because its step is already persisted.
    pub async fn run(mut self) -> Result<(), DriverError> {
        self.publish();
        if self.machine.state() != StackState::Idle {
            tracing::info!(machine = "stack", state = self.machine.state().name(), "resuming after a restart");
        }
        if Self::changes_device(self.machine.state()) {
            self.take_turn(format!("resume {}", self.machine.state().name())).await;
        }
        // In Idle too: the commands of the last persisted step may not have
        // run before the agent stopped, and Idle repeats the keep-tags.
        self.feed(StackEvents::Resumed)?;
        // A starting agent checks the branch at once instead of waiting a
        // whole poll interval.
        self.backoff.get_or_insert(Duration::ZERO);

        loop {
            if let Some(command) = self.queue.pop_front() {
                failpoint::hit("stack", self.machine.state().name(), Point::BeforeCommand);
                if let Some(event) = self.execute(command).await? {
                    self.feed(event)?;
                }
                continue;
            }

            if self.machine.state() != StackState::Idle {
                // A busy state with no command: its action could not queue one
                // because the memory lacks what it needs. Resuming takes the
                // state's own recovery path.
                tracing::error!(machine = "stack", state = self.machine.state().name(), "no command queued in a busy state; resuming it");
                tokio::time::sleep(jittered(self.settings.retry_backoff_min, self.settings.poll_jitter_percent)).await;
                self.feed(StackEvents::Resumed)?;
                continue;
            }
            self.wait_for_poll().await;
            self.feed(StackEvents::Poll)?;
        }
    }

    /// Feeds one event and persists the step before queuing its commands.
    fn feed(&mut self, event: StackEvents) -> Result<(), DriverError> {
        let facts = StackFacts { boot_id: self.runtime.seams.boot_id.boot_id() };
        let step = match self.machine.handle(event, facts) {
            Ok(step) => step,
            Err(unexpected) => {
                tracing::warn!(machine = "stack", error = %unexpected, "event ignored");
                return Ok(());
            }
        };

        self.persist(&step)?;
        self.log_step(&step);
        self.after_step(&step);
        self.queue.extend(step.commands.iter().cloned());
        self.publish();
        Ok(())
    }

    /// Reports progress, counts ended attempts and releases the turn.
    fn after_step(&mut self, step: &Step) {
        self.runtime.report(Progress::Step {
            machine: "stack".into(),
            from: step.from.name().into(),
            event: step.event.name().into(),
            to: step.to.name().into(),
            commit: step.target.map(|commit| commit.short()),
        });
        if step.from == StackState::Fetching && step.to == StackState::Validating {
            self.attempt_started = Some(Instant::now());
        }

        let settled = step.to == StackState::Idle && step.from != step.to;
        if !settled {
            return;
        }
        let (outcome, ok) = finished_outcome(step, self.machine.memory());
        self.runtime.report(Progress::Finished { machine: "stack".into(), outcome: outcome.clone(), ok });
        if step.to == StackState::Idle {
            self.turn = None;
            if let Some(label) = metric_outcome(step, self.machine.memory()) {
                let duration = self.attempt_started.take().map(|started| started.elapsed());
                self.runtime.metrics.record_update("stack", label, duration);
            }
        }
    }

    /// Appends the step to the journal and syncs it. A poll's first step
    /// (`Idle` or `Ready` to `Fetching`) is held back: fetching changes
    /// nothing on the device, and when the poll ends where it began with the
    /// memory unchanged, neither step is written. A resume in `Idle` that
    /// changes nothing is not written either.
    fn persist(&mut self, step: &Step) -> Result<(), DriverError> {
        let quiet_resume = step.event == StackEvent::Resumed && step.from == StackState::Idle && step.to == StackState::Idle;
        if quiet_resume && !step.memory_changed {
            return Ok(());
        }
        let quiet_start = step.event == StackEvent::Poll && matches!(step.from, StackState::Idle | StackState::Ready);
        if quiet_start && !step.memory_changed {
            self.deferred = Some(step.clone());
            return Ok(());
        }

        if let Some(deferred) = self.deferred.take() {
            let unchanged = step.to == deferred.from && !step.memory_changed && step.failure.is_none();
            if unchanged {
                tracing::debug!(machine = "stack", "poll found nothing new");
                return Ok(());
            }
            self.append_step(&deferred)?;
        }
        self.append_step(step)
    }

    fn append_step(&mut self, step: &Step) -> Result<(), DriverError> {
        let meta = self.runtime.seams.meta();
        let memory = self.machine.memory();
        let attempt = step.attempt;
        let mut records = vec![Record::Transition(TransitionRecord {
            meta,
            machine: MachineKind::Stack.code(),
            from: step.from.code(),
            event: step.event.code(),
            to: step.to.code(),
            attempt,
        })];
        if step.memory_changed {
            records.push(Record::StackMemory(StackMemoryRecord { meta, memory: memory.clone() }));
        }
        if let Some(failure) = &step.failure {
            records.push(Record::MachineError(MachineErrorRecord { meta, machine: MachineKind::Stack.code(), message: failure.message.clone() }));
        }

        let mut notices = notices_for(step, memory);
        if step.event == StackEvent::Pulled {
            self.clock_problem_notified = false;
        }
        if notices.iter().any(|notice| notice.kind == "clock-problem") {
            if self.clock_problem_notified {
                notices.retain(|notice| notice.kind != "clock-problem");
            }
            self.clock_problem_notified = true;
        }
        self.runtime.append_with_notices(records, &notices)?;
        failpoint::hit("stack", step.to.name(), Point::AfterPersist);
        Ok(())
    }

    fn log_step(&self, step: &Step) {
        let memory = self.machine.memory();
        let commit = step.target.map(|target| target.short()).unwrap_or_default();
        let routine = step.event == StackEvent::Poll || (step.from == StackState::Fetching && step.to == StackState::Idle && step.failure.is_none());
        if (step.from == step.to || routine) && step.failure.is_none() {
            tracing::debug!(machine = "stack", from = step.from.name(), event = step.event.name(), to = step.to.name(), "transition");
            return;
        }
        tracing::info!(machine = "stack", from = step.from.name(), event = step.event.name(), to = step.to.name(), commit, "transition");
        if let Some(failure) = &step.failure {
            tracing::warn!(machine = "stack", state = step.from.name(), commit, error = %failure.message, "step failed");
        }
        match (&memory.last_outcome, step.to) {
            (Some(Outcome::Applied { commit }), StackState::Idle) if step.from == StackState::Probation => {
                tracing::info!(machine = "stack", commit = %commit.short(), "update applied and healthy; it is the new known-good commit");
            }
            (Some(Outcome::RolledBack { failed, restored }), StackState::Idle) if step.from == StackState::RevertProbation => {
                tracing::warn!(machine = "stack", failed = %failed.short(), restored = %restored.short(), "rolled back to the known-good commit");
            }
            _ => {}
        }
    }

    fn publish(&self) {
        let memory = self.machine.memory();
        let condition = match self.machine.state() {
            StackState::Idle | StackState::Ready => {
                if memory.needs_attention.is_some() {
                    Condition::NeedsAttention
                } else if matches!(memory.last_outcome, Some(Outcome::RolledBack { .. })) {
                    Condition::RolledBack
                } else {
                    Condition::Healthy
                }
            }
            StackState::Fetching | StackState::Validating => Condition::Checking,
            StackState::Pulling => Condition::Downloading,
            StackState::Applying | StackState::Probation | StackState::Reverting | StackState::RevertProbation => Condition::Applying,
            StackState::FactoryReset => Condition::ResetRunning,
        };
        self.runtime.board.set(Source::Stack, Some(condition));
    }

    async fn wait_for_poll(&mut self) {
        let delay = match self.backoff.take() {
            Some(delay) => delay,
            None => jittered(self.settings.poll_interval, self.settings.poll_jitter_percent),
        };
        tracing::debug!(machine = "stack", delay = %humantime::format_duration(delay), "next poll");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = self.runtime.stack_wake.notified() => tracing::info!(machine = "stack", "check requested"),
        }
    }

    async fn execute(&mut self, command: StackCommand) -> Result<Option<StackEvents>, DriverError> {
        let event = match command {
            StackCommand::Fetch => Some(self.fetch().await),
            StackCommand::Validate { commit } => Some(self.validate(commit).await),
            StackCommand::Pull { commit, plan } => Some(self.pull(commit, &plan).await),
            StackCommand::AwaitPolicy { pulled_on_boot, .. } => Some(self.await_policy(pulled_on_boot).await?),
            StackCommand::Apply { release, purpose } => Some(self.apply(&release, purpose).await),
            StackCommand::WatchHealth { release, .. } => Some(self.watch_health(&release).await),
            StackCommand::KeepImages { keep, .. } => {
                self.keep_images(&keep).await;
                None
            }
            StackCommand::FactoryReset { reason } => Some(self.factory_reset(&reason).await),
            StackCommand::BackOff { failures } => {
                let delay = backoff_delay(failures, self.settings.retry_backoff_min, self.settings.retry_backoff_max);
                tracing::info!(machine = "stack", failures, retry_in = %humantime::format_duration(delay), "backing off");
                self.backoff = Some(delay);
                None
            }
        };
        Ok(event)
    }

    async fn fetch(&mut self) -> StackEvents {
        // TODO: a fetch over HTTPS that fails on an expired or not yet valid
        // certificate while the clock is unsynchronised is still a transient
        // failure with backoff; sort it as a clock problem, as `pull_failure`
        // does for registries.
        match self.git.fetch().await {
            Ok(tip) => {
                tracing::debug!(machine = "stack", tip = %tip.short(), "fetched the device branch");
                StackEvents::TipFetched(tip)
            }
            Err(error) if error.needs_attention() => StackEvents::FetchFailed(Failure::attention(error.to_string())),
            Err(error) => StackEvents::FetchFailed(Failure::transient(error.to_string())),
        }
    }

    async fn validate(&mut self, commit: CommitId) -> StackEvents {
        if let Some(policy) = &self.settings.signatures {
            match policy.check(&self.git, commit).await {
                Ok(signer) => {
                    tracing::info!(machine = "stack", commit = %commit.short(), signer = signer.principal, key = signer.fingerprint, "commit signature verified");
                }
                Err(error) if error.is_rejection() => return StackEvents::Invalid(Failure::rejected(format!("commit {}: {error}", commit.short()))),
                Err(error) => return StackEvents::Invalid(Failure::local(format!("commit {}: {error}", commit.short()))),
            }
        }

        let staging_root = self.settings.state_directory.join("staging");
        let staging = staging_root.join(commit.to_string());
        let _ = std::fs::remove_dir_all(&staging_root);

        if let Err(error) = self.git.stage(commit, &staging).await {
            return StackEvents::Invalid(Failure::transient(format!("cannot check out commit {} for validation: {error}", commit.short())));
        }
        let result = self.compose.plan(&staging).await;
        let _ = std::fs::remove_dir_all(&staging_root);
        match result {
            Ok(plan) => {
                let services: Vec<&str> = plan.services.iter().map(|service| service.service.as_str()).collect();
                tracing::info!(machine = "stack", commit = %commit.short(), services = ?services, "compose files are valid");
                StackEvents::Valid(plan)
            }
            Err(error) if error.is_rejection() => StackEvents::Invalid(Failure::rejected(format!("commit {}: {error}", commit.short()))),
            Err(error) => StackEvents::Invalid(Failure::transient(format!("cannot validate commit {}: {error}", commit.short()))),
        }
    }

    async fn pull(&mut self, commit: CommitId, plan: &StackPlan) -> StackEvents {
        if let Some(check) = &self.settings.pull_check {
            let images: Vec<String> = plan.services.iter().map(|service| service.image.clone()).collect();
            if let Err(no_room) = check.check(&images).await {
                return StackEvents::PullFailed(Failure::local(format!("commit {}: {no_room}", commit.short())));
            }
        }

        let mut digests = BTreeMap::new();
        for service in &plan.services {
            if digests.contains_key(&service.image) {
                continue;
            }
            tracing::info!(machine = "stack", commit = %commit.short(), image = %service.image, "pulling");
            let runtime = self.runtime.clone();
            let image = service.image.clone();
            let report = move |current: u64, total: u64| runtime.report(Progress::Pull { image: image.clone(), current, total });
            match self.engine.pull_with_progress(&service.image, self.settings.pull_timeout, &report).await {
                Ok(digest) => {
                    tracing::info!(machine = "stack", image = %service.image, %digest, "pulled");
                    digests.insert(service.image.clone(), digest);
                }
                Err(error) => return StackEvents::PullFailed(self.pull_failure(commit, error)),
            }
        }

        let services = plan
            .services
            .iter()
            .map(|service| ServiceImage { service: service.service.clone(), image: service.image.clone(), digest: digests[&service.image] })
            .collect();
        StackEvents::Pulled(Release { commit, services })
    }

    /// Sorts a pull error into how the machine handles it. A certificate
    /// rejected as expired or not yet valid while the kernel reports the
    /// clock unsynchronised is a clock problem, not a fault of the commit or
    /// the registry.
    fn pull_failure(&self, commit: CommitId, error: EngineError) -> Failure {
        if error.is_certificate_validity() && !self.runtime.seams.clock.clock_synced() {
            return Failure::clock(format!(
                "clock problem: commit {}: {error}; the clock is not synchronised, so the certificate may only look invalid. The update stays pending and is retried; check the device's NTP access",
                commit.short()
            ));
        }
        let message = format!("commit {}: {error}", commit.short());
        match error {
            EngineError::ImageNotFound { .. } | EngineError::WrongPlatform { .. } | EngineError::BadReference { .. } | EngineError::NoDigest { .. } => {
                Failure::rejected(message)
            }
            EngineError::AccessDenied { .. } => Failure::local(message),
            _ => Failure::transient(message),
        }
    }

    /// Waits until the apply policy lets the pulled commit in, or until the
    /// next poll is due, whichever comes first. The gate persists why the
    /// commit waits before this returns, and clears it before `PolicyAllows`.
    /// Once the policy allows it, the machine waits for its turn to change
    /// the device.
    async fn await_policy(&mut self, pulled_on_boot: Option<[u8; 16]>) -> Result<StackEvents, DriverError> {
        let poll_at = Instant::now() + jittered(self.settings.poll_interval, self.settings.poll_jitter_percent);
        let missing_images = self.pull_missing_images().await;
        let mut reported = false;
        loop {
            let booted_since_pull = pulled_on_boot.is_some_and(|pulled| pulled != self.runtime.seams.boot_id.boot_id());
            if self.gate.check(booted_since_pull, missing_images.clone()).await? {
                self.gate.finish()?;
                let commit = self.machine.memory().attempt.as_ref().map(|attempt| attempt.target.short()).unwrap_or_default();
                self.take_turn(format!("apply commit {commit}")).await;
                return Ok(StackEvents::PolicyAllows);
            }
            if !reported {
                let outcome = "images pulled; waiting for the apply policy".to_string();
                self.runtime.report(Progress::Finished { machine: "stack".into(), outcome, ok: true });
                reported = true;
            }

            let now = Instant::now();
            if now >= poll_at {
                self.gate.pause()?;
                return Ok(StackEvents::Poll);
            }
            tokio::select! {
                _ = tokio::time::sleep((poll_at - now).min(POLICY_CHECK_INTERVAL)) => {}
                _ = self.runtime.stack_wake.notified() => {
                    self.gate.pause()?;
                    return Ok(StackEvents::Poll);
                }
            }
        }
    }

    /// Pulls, by digest, every image of the pending release that is missing
    /// locally, so that nothing is missing once the policy allows the update,
    /// and returns why the update must wait when a pull fails. A pull is a
    /// download only, so it may run outside a maintenance window.
    async fn pull_missing_images(&mut self) -> Option<String> {
        let release = self.machine.memory().attempt.as_ref().and_then(|attempt| attempt.pulled.clone())?;
        for service in &release.services {
            let pinned = service.pinned_reference();
            if self.engine.has_image(&pinned).await {
                continue;
            }
            tracing::info!(machine = "stack", image = %pinned, "pulled image is missing locally, pulling it again by digest");
            if let Err(error) = self.engine.pull(&pinned, self.settings.pull_timeout).await {
                let failure = self.pull_failure(release.commit, error);
                tracing::warn!(machine = "stack", image = %pinned, error = %failure.message, "cannot pull a missing image; the update waits");
                return Some(format!("image {pinned} is missing and cannot be pulled: {}", failure.message));
            }
        }
        None
    }

    async fn apply(&mut self, release: &Release, purpose: ApplyPurpose) -> StackEvents {
        let short = release.commit.short();
        tracing::info!(machine = "stack", commit = %short, ?purpose, "applying");

        if let Err(error) = self.git.check_out(release.commit).await {
            return StackEvents::ApplyFailed(Failure::local(format!("cannot check out commit {short}: {error}")));
        }
        for service in &release.services {
            let pinned = service.pinned_reference();
            if self.engine.has_image(&pinned).await {
                continue;
            }
            tracing::warn!(machine = "stack", image = %pinned, "pinned image is missing locally, pulling it by digest");
            if let Err(error) = self.engine.pull(&pinned, self.settings.pull_timeout).await {
                return StackEvents::ApplyFailed(Failure::transient(format!("image {pinned} is missing and could not be pulled: {error}")));
            }
        }

        let override_file = self.settings.state_directory.join(OVERRIDE_FILE);
        if let Err(error) = Compose::write_override(&override_file, release) {
            return StackEvents::ApplyFailed(Failure::local(error.to_string()));
        }
        // A service the space guard holds stopped stays stopped.
        let held = space::held_services(&self.runtime.journal);
        let services: Vec<String> = release.services.iter().map(|service| service.service.clone()).filter(|service| !held.contains(service)).collect();
        if !held.is_empty() && services.is_empty() {
            tracing::warn!(machine = "stack", held = ?held, "every service is held stopped by the space guard; nothing to bring up");
            return StackEvents::Applied;
        }
        let services = if held.is_empty() { Vec::new() } else { services };
        if !held.is_empty() {
            tracing::info!(machine = "stack", held = ?held, "leaving out services the space guard holds stopped");
        }
        match self.engine.repair_interrupted_recreate(&self.compose.project).await {
            Ok(repairs) => {
                for repair in repairs {
                    tracing::warn!(machine = "stack", project = %self.compose.project, "{repair}");
                }
            }
            Err(error) => {
                tracing::warn!(machine = "stack", project = %self.compose.project, %error, "cannot check for containers an interrupted compose up left; compose up may fail on a name conflict")
            }
        }
        match self.compose.up(&self.git.checkout, &override_file, &services).await {
            Ok(()) => StackEvents::Applied,
            Err(error) => StackEvents::ApplyFailed(Failure::local(format!("docker compose up of commit {short} failed: {error}"))),
        }
    }

    /// Watches the release for its probation window, leaving out services
    /// the space guard holds stopped. When the guard stops or starts one
    /// during the window, the window starts again with the new set.
    async fn watch_health(&mut self, release: &Release) -> StackEvents {
        loop {
            let held = space::held_services(&self.runtime.journal);
            let settings = GateSettings {
                project: self.compose.project.clone(),
                probation: self.settings.probation,
                health_grace: self.settings.health_grace,
                excluded: held.clone(),
            };
            tracing::info!(machine = "stack", commit = %release.commit.short(), probation = %humantime::format_duration(settings.probation), excluded = ?held, "watching health");
            let result = health::watch(&self.engine, release, &settings).await;
            if result.is_err() && space::held_services(&self.runtime.journal) != held {
                tracing::info!(machine = "stack", commit = %release.commit.short(), "the space guard changed its hold during probation; watching again");
                continue;
            }
            return match result {
                Ok(()) => StackEvents::GatePassed,
                Err(failure) => StackEvents::GateFailed(Failure::rejected(format!("commit {}: {failure}", release.commit.short()))),
            };
        }
    }

    /// Tags the known-good release's images and removes the keep-tags of any
    /// other release. Failures are logged: the release stays known-good, and
    /// the next acceptance repeats the work.
    async fn keep_images(&mut self, keep: &Release) {
        if let Err(error) = self.git.mark_known_good(keep.commit).await {
            tracing::warn!(machine = "stack", commit = %keep.commit.short(), %error, "cannot pin the known-good commit in the clone");
        }

        let project = self.compose.project.clone();
        let mut wanted = BTreeSet::new();
        for service in &keep.services {
            let tag = keep_tag_name(&keep.commit, &service.service);
            wanted.insert(format!("{}/{project}:{tag}", crate::driver::docker::KEEP_REPOSITORY));
            if let Err(error) = self.engine.keep_tag(&service.pinned_reference(), &project, &tag).await {
                tracing::warn!(machine = "stack", service = %service.service, %error, "cannot put a keep-tag on the image");
            }
        }

        match self.engine.keep_tags(&project).await {
            Ok(existing) => {
                for tag in existing.into_iter().filter(|tag| !wanted.contains(tag)) {
                    if let Err(error) = self.engine.remove_tag(&tag).await {
                        tracing::warn!(machine = "stack", %tag, %error, "cannot remove an old keep-tag");
                    }
                }
            }
            Err(error) => tracing::warn!(machine = "stack", %error, "cannot list keep-tags"),
        }
    }

    /// Hands the reset to the factory-reset machine and waits for its
    /// outcome. The stack gives up its turn first, because the reset takes
    /// the turn itself.
    async fn factory_reset(&mut self, reason: &str) -> StackEvents {
        tracing::error!(machine = "stack", reason, "starting the factory reset");
        self.turn = None;
        let mut finished = self.runtime.factory_reset.subscribe();
        let seen = finished.borrow_and_update().count;
        match self.earlier_reset(reason) {
            EarlierReset::Finished(event) => {
                tracing::info!(machine = "stack", "the factory reset for this request finished before the agent restarted");
                return event;
            }
            EarlierReset::Running => tracing::info!(machine = "stack", "the factory reset for this request resumed on its own; waiting for it"),
            EarlierReset::None => self.runtime.factory_reset.request(reason),
        }

        loop {
            if finished.changed().await.is_err() {
                return StackEvents::ResetFailed(Failure::local("the factory-reset machine stopped before the reset finished"));
            }
            let outcome = finished.borrow_and_update().clone();
            if outcome.count == seen {
                continue;
            }
            return match outcome.error {
                None => StackEvents::ResetDone,
                Some(error) => StackEvents::ResetFailed(Failure::local(format!("factory reset failed: {error}"))),
            };
        }
    }
}

/// State of a factory reset with the same reason in the journal, as the
/// stack finds it after a restart of the agent.
enum EarlierReset {
    None,
    Running,
    Finished(StackEvents),
}

impl StackDriver {
    /// Looks in the journal for the factory reset that this stack state
    /// requested before a restart. The factory-reset machine resumes on its
    /// own, so requesting again would reset the device twice.
    ///
    /// NOTE: the match is by reason, which names the failed commits. A later
    /// reset for the very same commits and failure, right after an earlier
    /// one, would be taken as already done.
    fn earlier_reset(&self, reason: &str) -> EarlierReset {
        let journal = self.runtime.lock_journal();
        let state = journal.state();
        let machine_state = state.machine(MachineKind::FactoryReset.code()).and_then(|view| view.state);
        let Some(memory) = &state.factory_reset_memory else { return EarlierReset::None };
        let idle = machine_state.is_none_or(|code| code == FactoryResetState::Idle.code());

        if !idle {
            return if memory.reason.as_deref() == Some(reason) { EarlierReset::Running } else { EarlierReset::None };
        }
        match &memory.last_outcome {
            Some(FactoryOutcome::Done { reason: done }) if done == reason => EarlierReset::Finished(StackEvents::ResetDone),
            Some(FactoryOutcome::Failed { reason: failed, error }) if failed == reason => {
                EarlierReset::Finished(StackEvents::ResetFailed(Failure::local(format!("factory reset failed: {error}"))))
            }
            _ => EarlierReset::None,
        }
    }
}

/// Returns the text and success flag that `update-now` shows when the machine
/// settles in `Idle`.
fn finished_outcome(step: &Step, memory: &StackMemory) -> (String, bool) {
    if let Some(failure) = &step.failure {
        return (failure.message.clone(), false);
    }
    match (step.from, &memory.last_outcome) {
        (StackState::Fetching, _) => ("no new commit".into(), true),
        (StackState::Probation, Some(Outcome::Applied { commit })) => (format!("applied commit {}", commit.short()), true),
        (StackState::RevertProbation, Some(Outcome::RolledBack { failed, restored })) => {
            (format!("commit {} failed; rolled back to {}", failed.short(), restored.short()), false)
        }
        (StackState::FactoryReset, Some(Outcome::FactoryReset { reason })) => (format!("factory reset done: {reason}"), false),
        (_, Some(Outcome::GaveUp { reason })) => (format!("gave up: {reason}"), false),
        _ => (format!("{} after {}", step.to.name(), step.event.name()), true),
    }
}

/// Returns the metric label of an attempt that ended with `step`, if it did.
fn metric_outcome(step: &Step, memory: &StackMemory) -> Option<&'static str> {
    if step.attempt == 0 || step.from == StackState::Idle {
        return None;
    }
    if step.failure.as_ref().is_some_and(|failure| failure.kind != FailureKind::Rejected)
        && matches!(step.from, StackState::Fetching | StackState::Validating | StackState::Pulling)
    {
        return Some("retry");
    }
    match (step.from, &memory.last_outcome) {
        (StackState::Fetching, _) => None,
        (StackState::Probation, Some(Outcome::Applied { .. })) => Some("applied"),
        (StackState::RevertProbation, Some(Outcome::RolledBack { .. })) => Some("rolled_back"),
        (StackState::FactoryReset, Some(Outcome::FactoryReset { .. })) => Some("factory_reset"),
        (_, Some(Outcome::GaveUp { .. })) => Some("gave_up"),
        (_, Some(Outcome::Rejected { .. })) => Some("rejected"),
        _ => None,
    }
}

/// Returns the notifications a step causes: every failure, rollback, factory
/// reset and needs-attention condition, and each applied update. Transient
/// failures notify only at the first of a streak.
fn notices_for(step: &Step, memory: &StackMemory) -> Vec<Notice> {
    let machine = MachineKind::Stack.code();
    let notice = |severity, kind, message: String| Notice { severity, kind, machine, message };
    let mut notices = Vec::new();

    if let Some(failure) = &step.failure {
        let (severity, kind) = match (step.event, failure.kind) {
            (StackEvent::GateFailed, _) if step.from == StackState::RevertProbation => (Severity::Error, "rollback-failed"),
            (StackEvent::GateFailed, _) => (Severity::Error, "health-gate-failed"),
            (StackEvent::ApplyFailed, _) => (Severity::Error, "apply-failed"),
            (StackEvent::ResetFailed, _) => (Severity::Error, "factory-reset-failed"),
            (_, FailureKind::Rejected) => (Severity::Warning, "commit-rejected"),
            (_, FailureKind::Local) => (Severity::Error, "device-problem"),
            (_, FailureKind::Attention) => (Severity::Error, "needs-attention"),
            (_, FailureKind::Clock) => (Severity::Warning, "clock-problem"),
            (_, FailureKind::Transient) => (Severity::Warning, "server-unreachable"),
        };
        let first_of_streak = failure.kind != FailureKind::Transient || memory.transient_failures <= 1;
        if first_of_streak {
            notices.push(notice(severity, kind, failure.message.clone()));
        }
    }
    if step.event == StackEvent::Resumed && step.from != step.to && step.from != StackState::Idle {
        notices.push(notice(Severity::Error, "agent-crash-loop", format!("the agent restarted too often in {}; took the failure path", step.from.name())));
    }
    match (step.from, step.to, &memory.last_outcome) {
        (StackState::Probation, StackState::Idle, Some(Outcome::Applied { commit })) => {
            notices.push(notice(Severity::Info, "update-applied", format!("commit {} is applied and healthy", commit.short())));
        }
        (StackState::RevertProbation, StackState::Idle, Some(Outcome::RolledBack { failed, restored })) => {
            notices.push(notice(Severity::Error, "rollback", format!("commit {} failed; rolled back to {}", failed.short(), restored.short())));
        }
        (from, StackState::FactoryReset, _) if from != StackState::FactoryReset => {
            let reason = memory.factory_reset_reason.clone().unwrap_or_default();
            notices.push(notice(Severity::Error, "factory-reset-started", reason));
        }
        (StackState::FactoryReset, StackState::Idle, Some(Outcome::FactoryReset { reason })) => {
            notices.push(notice(Severity::Warning, "factory-reset-done", reason.clone()));
        }
        _ => {}
    }
    if step.from == StackState::FactoryReset
        && step.to == StackState::Idle
        && let Some(reason) = &memory.needs_attention
    {
        notices.push(notice(Severity::Error, "needs-attention", reason.clone()));
    }
    notices
}

/// Returns the keep-tag for one service of a commit. Docker tags allow
/// letters, digits, `_`, `.` and `-`, up to 128 characters.
pub fn keep_tag_name(commit: &CommitId, service: &str) -> String {
    let service: String =
        service.chars().map(|character| if character.is_ascii_alphanumeric() || "_.-".contains(character) { character } else { '_' }).take(100).collect();
    format!("{}-{service}", commit.short())
}

/// Returns `interval` moved at random by up to `percent` percent either way,
/// so a fleet of devices does not poll in step.
pub fn jittered(interval: Duration, percent: u8) -> Duration {
    if percent == 0 {
        return interval;
    }
    let spread = f64::from(percent) / 100.0;
    let factor = rand::rng().random_range(1.0 - spread..=1.0 + spread);
    whole_millis(interval.mul_f64(factor))
}

/// Returns the delay after `failures` transient failures in a row: doubling
/// from `minimum`, capped at `maximum`, with up to 20 % taken off at random.
pub fn backoff_delay(failures: u32, minimum: Duration, maximum: Duration) -> Duration {
    let exponent = failures.saturating_sub(1).min(20);
    let base = minimum.saturating_mul(1u32 << exponent).min(maximum);
    whole_millis(base.mul_f64(rand::rng().random_range(0.8..=1.0)))
}

/// Rounds a random delay down to whole milliseconds, so logs show `1m 2s
/// 345ms` rather than nanoseconds. Delays under a millisecond stay as given.
fn whole_millis(delay: Duration) -> Duration {
    if delay < Duration::from_millis(1) {
        return delay;
    }
    Duration::from_millis(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_delays_are_whole_millis() {
        for _ in 0..100 {
            assert_eq!(jittered(Duration::from_secs(60), 20).subsec_nanos() % 1_000_000, 0);
            assert_eq!(backoff_delay(3, Duration::from_secs(7), Duration::from_secs(600)).subsec_nanos() % 1_000_000, 0);
        }
    }

    #[test]
    fn backoff_doubles_up_to_maximum() {
        let minimum = Duration::from_secs(10);
        let maximum = Duration::from_secs(100);

        let first = backoff_delay(1, minimum, maximum);
        let third = backoff_delay(3, minimum, maximum);
        let tenth = backoff_delay(10, minimum, maximum);

        assert!(first >= Duration::from_secs(8), "{first:?}");
        assert!(first <= minimum, "{first:?}");
        assert!(third >= Duration::from_secs(32), "{third:?}");
        assert!(third <= Duration::from_secs(40), "{third:?}");
        assert!(tenth >= Duration::from_secs(80), "{tenth:?}");
        assert!(tenth <= maximum, "{tenth:?}");
    }

    #[test]
    fn jitter_stays_within_percent() {
        for _ in 0..100 {
            let delay = jittered(Duration::from_secs(100), 10);
            assert!(delay >= Duration::from_secs(90), "{delay:?}");
            assert!(delay <= Duration::from_secs(110), "{delay:?}");
        }
    }

    #[test]
    fn keep_tag_replaces_odd_characters() {
        let tag = keep_tag_name(&CommitId([0xab; 20]), "web/api:1");
        assert_eq!(tag, "abababababab-web_api_1");
    }
}
