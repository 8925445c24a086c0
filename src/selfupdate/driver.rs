//! Runs the self-update machine: feeds it events, persists every step to the
//! journal, and only then runs the commands the step queued.
//!
//! The old agent runs it from `Idle` to `HandingOver`. When the candidate
//! took the lease, [`SelfUpdateDriver::run`] returns
//! [`DriverExit::HandedOver`] and the agent watches the handover without
//! acting (see [`crate::selfupdate::lease`]). The new agent runs it from
//! `Probation` on, after the handover API returned.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rand::Rng;
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::config::SelfUpdateConfig;
use crate::coordinator::{Process, Turn};
use crate::driver::docker::{Engine, EngineError};
use crate::driver::space::preflight::PullCheck;
use crate::driver::stack::jittered;
use crate::failpoint::{self, Point};
use crate::journal::record::{LeaseAbortRecord, LeaseConfirmedRecord, MachineErrorRecord, SelfUpdateMemoryRecord, TransitionRecord};
use crate::journal::{JournalError, Record, RecordMeta};
use crate::machine::MachineKind;
use crate::machine::selfupdate::{
    BootTime, ContainerRef, RetireReport, SelfUpdateCommand, SelfUpdateEvent, SelfUpdateEvents, SelfUpdateFacts, SelfUpdateMachine, SelfUpdateMemory,
    SelfUpdateOutcome, SelfUpdateSettings, SelfUpdateState, Step, Target,
};
use crate::model::{Digest, Failure};
use crate::notify::{Notice, Severity};
use crate::panel::{Condition, Source};
use crate::runtime::{Progress, Runtime};
use crate::selfupdate::docker::{self, ContainerError, OwnContainer};
use crate::selfupdate::handover::{self, HandoverRequest};
use crate::selfupdate::spec::CandidateRequest;
use crate::selfupdate::{AGENT_LABEL, CANDIDATE_LABEL};

/// Time between two looks at a starting candidate.
const START_POLL: Duration = Duration::from_millis(50);

/// Time one readiness request may take.
const READY_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Time between two retries of a failed container removal.
const REMOVE_RETRY: Duration = Duration::from_secs(5);

/// Removals of the old agent tried before the handover ends with a problem.
const RETIRE_ATTEMPTS: u32 = 5;

/// Errors that stop the self-update driver.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The journal cannot record a step, so the driver must not act on it.
    /// A [`JournalError::Fenced`] means another agent holds the lease.
    #[error("cannot record a self-update step: {0}")]
    Journal(#[from] JournalError),
}

/// Reason the driver returned without an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverExit {
    /// The candidate holds the lease; this agent must stop acting.
    HandedOver { candidate: ContainerRef, epoch: u64 },
}

/// Result of running one command.
enum Done {
    Event(SelfUpdateEvents),
    /// An event whose step is appended together with these records.
    EventWith(SelfUpdateEvents, Vec<Record>),
    HandedOver(ContainerRef, u64),
}

/// Returns the facts for a step written now.
pub fn facts_now(meta: &RecordMeta, forced: bool) -> SelfUpdateFacts {
    SelfUpdateFacts { now: BootTime { boot_id: meta.boot_id, ms: meta.monotonic_ms }, jitter_permille: rand::rng().random_range(0..=200), forced }
}

/// Returns the records of one step: the transition, the memory with the
/// writer's lease epoch, and the failure as the machine's last error.
pub fn step_records(meta: RecordMeta, epoch: u64, step: &Step, memory: &SelfUpdateMemory) -> Vec<Record> {
    let machine = MachineKind::SelfUpdate.code();
    let mut records = vec![
        Record::Transition(TransitionRecord { meta, machine, from: step.from.code(), event: step.event.code(), to: step.to.code(), attempt: step.attempt }),
        Record::SelfUpdateMemory(SelfUpdateMemoryRecord { meta, epoch, memory: memory.clone() }),
    ];
    if let Some(failure) = &step.failure {
        records.push(Record::MachineError(MachineErrorRecord { meta, machine, message: failure.message.clone() }));
    }
    records
}

/// Returns the machine's state and memory as the journal records them.
pub fn journal_machine(state: &crate::journal::JournalState) -> (SelfUpdateState, SelfUpdateMemory) {
    let code = state.machine(MachineKind::SelfUpdate.code()).and_then(|view| view.state);
    let machine_state = code.and_then(SelfUpdateState::from_code).unwrap_or_else(|| {
        if let Some(code) = code {
            tracing::warn!(machine = "self-update", code, "the journal contains a state this version does not know; starting from Idle");
        }
        SelfUpdateState::Idle
    });
    (machine_state, state.self_update.clone().map(|(_, memory)| memory).unwrap_or_default())
}

/// Returns the machine settings of a `[self_update]` section.
pub fn machine_settings(config: &SelfUpdateConfig) -> SelfUpdateSettings {
    SelfUpdateSettings {
        max_resumes: config.max_resumes,
        retry_backoff_min_ms: config.retry_backoff_min.as_millis() as u64,
        retry_backoff_max_ms: config.retry_backoff_max.as_millis() as u64,
    }
}

/// The self-update machine with everything it needs to act.
pub struct SelfUpdateDriver {
    machine: SelfUpdateMachine,
    queue: VecDeque<SelfUpdateCommand>,
    /// A check's first step, held back until the check finds something.
    deferred: Option<Step>,
    runtime: Arc<Runtime>,
    engine: Engine,
    config: SelfUpdateConfig,
    own: OwnContainer,
    /// The current candidate's token. It is never persisted: after a restart
    /// the attempt is aborted instead.
    token: Option<String>,
    /// The turn to change the device, held from the candidate's creation
    /// until the machine is back in `Idle`.
    turn: Option<Turn>,
    /// Set by an operator's request until the check it started ends.
    forced: bool,
    /// Whether a stack machine runs beside this one; the new agent's
    /// probation then waits for one of its check cycles.
    stack_configured: bool,
    /// Checks that the new image fits before it is pulled.
    pull_check: Option<PullCheck>,
    progress: broadcast::Receiver<Progress>,
}

impl SelfUpdateDriver {
    /// Builds the driver with the machine in the state the journal records.
    pub fn new(runtime: Arc<Runtime>, engine: Engine, config: SelfUpdateConfig, own: OwnContainer, stack_configured: bool) -> SelfUpdateDriver {
        let (state, memory) = journal_machine(runtime.lock_journal().state());
        let machine = SelfUpdateMachine::restore(state, memory, machine_settings(&config));
        let progress = runtime.progress.subscribe();
        SelfUpdateDriver {
            machine,
            queue: VecDeque::new(),
            deferred: None,
            runtime,
            engine,
            config,
            own,
            token: None,
            turn: None,
            forced: false,
            stack_configured,
            pull_check: None,
            progress,
        }
    }

    /// Runs `check` before every pull, so an image that does not fit is
    /// refused before any layer is downloaded.
    pub fn with_pull_check(mut self, check: PullCheck) -> SelfUpdateDriver {
        self.pull_check = Some(check);
        self
    }

    pub fn state(&self) -> SelfUpdateState {
        self.machine.state()
    }

    /// Runs the machine until the journal fails or a handover succeeds. The
    /// caller stops it by dropping the future; the step in progress is
    /// persisted, so it is resumed after the restart.
    pub async fn run(mut self) -> Result<DriverExit, DriverError> {
        self.runtime.self_update.enabled.store(true, Ordering::SeqCst);
        self.publish();
        self.remove_orphans().await;
        if self.machine.state() != SelfUpdateState::Idle {
            tracing::info!(machine = "self-update", state = self.machine.state().name(), "resuming after a restart or a handover");
            self.take_turn(format!("resume {}", self.machine.state().name())).await;
        }
        let accepted = self.runtime.self_update.accepted.swap(false, Ordering::SeqCst);
        if accepted && self.machine.state() == SelfUpdateState::Probation {
            // The step into `Probation` was persisted with the lease; its
            // command is the probation.
            self.queue.push_back(SelfUpdateCommand::Probation);
        } else {
            self.feed(SelfUpdateEvents::Resumed, Vec::new())?;
        }

        // A starting agent checks at once instead of waiting a whole interval.
        let mut first_check = true;
        loop {
            if let Some(command) = self.queue.pop_front() {
                failpoint::hit("self-update", self.machine.state().name(), Point::BeforeCommand);
                match self.execute(command).await? {
                    Done::Event(event) => self.feed(event, Vec::new())?,
                    Done::EventWith(event, records) => self.feed(event, records)?,
                    Done::HandedOver(candidate, epoch) => {
                        let outcome = format!("handed over to container {} (lease epoch {epoch}); it confirms after its probation", candidate.name);
                        self.runtime.report(Progress::Finished { machine: "self-update".into(), outcome, ok: true });
                        return Ok(DriverExit::HandedOver { candidate, epoch });
                    }
                }
                continue;
            }

            if self.machine.state() != SelfUpdateState::Idle {
                tracing::error!(machine = "self-update", state = self.machine.state().name(), "no command queued in a busy state; resuming it");
                tokio::time::sleep(Duration::from_secs(5)).await;
                self.feed(SelfUpdateEvents::Resumed, Vec::new())?;
                continue;
            }
            self.turn = None;
            if !std::mem::take(&mut first_check) {
                self.wait_for_check().await;
            }
            self.feed(SelfUpdateEvents::Check, Vec::new())?;
        }
    }

    async fn take_turn(&mut self, purpose: String) {
        if self.turn.is_none() {
            self.turn = Some(self.runtime.coordinator.acquire(Process::SelfUpdate, &purpose).await);
        }
    }

    fn facts(&self) -> SelfUpdateFacts {
        facts_now(&self.runtime.seams.meta(), self.forced)
    }

    /// Feeds one event and persists the step, with `extra` records in the
    /// same append, before queuing its commands.
    fn feed(&mut self, event: SelfUpdateEvents, extra: Vec<Record>) -> Result<(), DriverError> {
        let step = match self.machine.handle(event, self.facts()) {
            Ok(step) => step,
            Err(unexpected) => {
                tracing::warn!(machine = "self-update", error = %unexpected, "event ignored");
                return Ok(());
            }
        };

        self.persist(&step, extra)?;
        self.log_step(&step);
        self.after_step(&step);
        self.queue.extend(step.commands.iter().cloned());
        self.publish();
        Ok(())
    }

    /// Appends the step. A check's first step is held back, and a check that
    /// finds the agent up to date writes nothing, so that hourly checks do
    /// not wear the journal.
    fn persist(&mut self, step: &Step, extra: Vec<Record>) -> Result<(), DriverError> {
        let quiet_resume = step.event == SelfUpdateEvent::Resumed && step.from == SelfUpdateState::Idle && step.to == SelfUpdateState::Idle;
        if quiet_resume && !step.memory_changed {
            return Ok(());
        }
        if step.event == SelfUpdateEvent::Check && !step.memory_changed {
            self.deferred = Some(step.clone());
            return Ok(());
        }
        let mut steps = Vec::new();
        if let Some(deferred) = self.deferred.take() {
            let unchanged = step.to == deferred.from && !step.memory_changed && step.failure.is_none();
            if unchanged && extra.is_empty() {
                return Ok(());
            }
            steps.push(deferred);
        }
        steps.push(step.clone());

        let meta = self.runtime.seams.meta();
        let epoch = self.runtime.lock_journal().epoch();
        let mut records = extra;
        // Leaving `HandingOver` withdraws the offered epoch in the same
        // append, which fences the candidate out, or fails because the
        // candidate took the lease first.
        let offered = self.machine.memory().attempt.as_ref().and_then(|attempt| attempt.offered_epoch);
        if let (SelfUpdateState::HandingOver, SelfUpdateState::Aborting, Some(offered)) = (step.from, step.to, offered) {
            records.push(Record::LeaseAbort(LeaseAbortRecord { meta, epoch: offered }));
        }
        for step in &steps {
            records.extend(step_records(meta, epoch, step, self.machine.memory()));
        }
        let notices = notices_for(step, self.machine.memory());
        self.runtime.append_with_notices(records, &notices)?;
        failpoint::hit("self-update", step.to.name(), Point::AfterPersist);
        Ok(())
    }

    fn log_step(&self, step: &Step) {
        let quiet = matches!(step.event, SelfUpdateEvent::Check | SelfUpdateEvent::UpToDate) || step.from == step.to;
        if quiet && step.failure.is_none() {
            tracing::debug!(machine = "self-update", from = step.from.name(), event = step.event.name(), to = step.to.name(), "transition");
            return;
        }
        tracing::info!(machine = "self-update", from = step.from.name(), event = step.event.name(), to = step.to.name(), attempt = step.attempt, "transition");
        if let Some(failure) = &step.failure {
            tracing::warn!(machine = "self-update", state = step.from.name(), error = %failure.message, "self-update step failed");
        }
    }

    fn after_step(&mut self, step: &Step) {
        self.runtime.report(Progress::Step {
            machine: "self-update".into(),
            from: step.from.name().into(),
            event: step.event.name().into(),
            to: step.to.name().into(),
            commit: None,
        });
        if step.to != SelfUpdateState::Idle || step.from == SelfUpdateState::Idle {
            return;
        }
        self.forced = false;
        self.turn = None;
        let (outcome, ok) = finished_outcome(step, self.machine.memory());
        self.runtime.report(Progress::Finished { machine: "self-update".into(), outcome, ok });
    }

    fn publish(&self) {
        let condition = match self.machine.state() {
            SelfUpdateState::Idle => None,
            SelfUpdateState::Checking => Some(Condition::Checking),
            SelfUpdateState::Pulling => Some(Condition::Downloading),
            _ => Some(Condition::Applying),
        };
        self.runtime.board.set(Source::SelfUpdate, condition);
    }

    /// Waits for the next check: the check interval with jitter, cut short
    /// by the retry time of a failed image or by an operator's request.
    async fn wait_for_check(&mut self) {
        let meta = self.runtime.seams.meta();
        let now = BootTime { boot_id: meta.boot_id, ms: meta.monotonic_ms };
        let mut delay = jittered(self.config.check_interval, self.config.check_jitter_percent);
        if let Some(retry) = self.machine.memory().next_retry(now) {
            delay = delay.min(Duration::from_millis(retry.ms.saturating_sub(now.ms)));
        }
        tracing::debug!(machine = "self-update", delay = %humantime::format_duration(delay), "next check");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = self.runtime.self_update.wake.notified() => {
                self.forced = self.runtime.self_update.forced.swap(false, Ordering::SeqCst);
                tracing::info!(machine = "self-update", "check requested");
            }
        }
    }

    async fn execute(&mut self, command: SelfUpdateCommand) -> Result<Done, DriverError> {
        let done = match command {
            SelfUpdateCommand::Check => Done::Event(self.check().await),
            SelfUpdateCommand::Pull { image, digest } => Done::Event(self.pull(&image, digest).await),
            SelfUpdateCommand::CreateCandidate { attempt, target } => Done::Event(self.create(attempt, &target).await),
            SelfUpdateCommand::StartCandidate { candidate } => Done::Event(self.start(&candidate).await),
            SelfUpdateCommand::HandOver { candidate, offered_epoch } => self.hand_over(candidate, offered_epoch).await,
            SelfUpdateCommand::Probation => self.probation().await,
            SelfUpdateCommand::RetireOldAgent { old } => Done::Event(self.retire(&old).await),
            SelfUpdateCommand::RemoveCandidate { attempt, candidate } => {
                self.remove_candidate(attempt, candidate.as_ref()).await;
                Done::Event(SelfUpdateEvents::Removed)
            }
        };
        Ok(done)
    }

    async fn check(&mut self) -> SelfUpdateEvents {
        let followed = self.own.followed.clone();
        if let Err(error) = docker::check_followed(&followed) {
            return SelfUpdateEvents::CheckFailed(Failure::local(error.to_string()));
        }
        let digest = match docker::registry_digest(&self.engine, &followed).await {
            Ok(digest) => digest,
            Err(error) => return SelfUpdateEvents::CheckFailed(Failure::transient(format!("cannot read the registry digest of {followed}: {error}"))),
        };
        self.own.running_digest = docker::repository_digest(&self.engine, &self.own.image_id, &followed).await;
        if self.own.running_digest == Some(digest) {
            tracing::debug!(machine = "self-update", image = %followed, %digest, "the agent runs the newest image");
            return SelfUpdateEvents::UpToDate(digest);
        }
        tracing::info!(machine = "self-update", image = %followed, %digest, running = ?self.own.running_digest.map(|digest| digest.to_string()), "the registry has another image of the agent");
        SelfUpdateEvents::NewDigest(Target { image: followed, digest, running: self.own.running_digest, old: self.own.container.clone() })
    }

    async fn pull(&mut self, image: &str, digest: Digest) -> SelfUpdateEvents {
        if let Some(check) = &self.pull_check
            && let Err(no_room) = check.check(&[image.to_string()]).await
        {
            return SelfUpdateEvents::PullFailed(Failure::local(format!("cannot pull the new agent image {image}: {no_room}")));
        }
        tracing::info!(machine = "self-update", image, %digest, "pulling the new image of the agent");
        let pulled = match self.engine.pull(image, self.config.pull_timeout).await {
            Ok(pulled) => pulled,
            Err(error) => return SelfUpdateEvents::PullFailed(pull_failure(error)),
        };
        if pulled != digest {
            return SelfUpdateEvents::PullFailed(Failure::transient(format!(
                "the tag {image} moved from {digest} to {pulled} during the pull; the next check follows it"
            )));
        }
        match docker::repository_digest(&self.engine, image, &self.own.followed).await {
            Some(local) if local == digest => {}
            other => {
                let found = other.map_or_else(|| "no digest".to_string(), |local| local.to_string());
                return SelfUpdateEvents::PullFailed(Failure::transient(format!("after the pull, the local tag {image} points to {found}, not {digest}")));
            }
        }
        let local_id = self.engine.api().inspect_image(image).await.ok().and_then(|inspect| inspect.id);
        if local_id.as_deref() == Some(self.own.image_id.as_str()) {
            tracing::info!(machine = "self-update", image, %digest, "the pulled image is the one this agent runs");
            return SelfUpdateEvents::AlreadyRunning;
        }
        SelfUpdateEvents::Pulled
    }

    async fn create(&mut self, attempt: u32, target: &Target) -> SelfUpdateEvents {
        self.take_turn(format!("hand over to image {}", short_digest(&target.digest))).await;
        match self.create_candidate(attempt, target).await {
            Ok(candidate) => {
                tracing::info!(machine = "self-update", container = %candidate.short_id(), name = %candidate.name, "created the new agent's container");
                SelfUpdateEvents::Created(candidate)
            }
            Err(error) => SelfUpdateEvents::CreateFailed(Failure::rejected(format!("cannot create the new agent's container: {error}"))),
        }
    }

    async fn create_candidate(&mut self, attempt: u32, target: &Target) -> Result<ContainerRef, ContainerError> {
        let network = self.config.network.clone();
        docker::ensure_network(&self.engine, &network).await?;
        docker::connect(&self.engine, &network, &self.own.container.id, Default::default()).await?;
        let old =
            docker::inspect(&self.engine, &self.own.container.id).await?.ok_or_else(|| ContainerError::Missing { container: self.own.container.id.clone() })?;
        let old_image = docker::image_config(&self.engine, &self.own.image_id).await?;

        let token = random_token();
        let request = CandidateRequest {
            name: format!("{}-update-{attempt}", self.own.agent_name),
            image: target.image.clone(),
            followed: self.own.followed.clone(),
            agent_name: self.own.agent_name.clone(),
            attempt,
            token: token.clone(),
            network,
        };
        let candidate = docker::create_candidate(&self.engine, &old, &old_image, &request).await?;
        self.token = Some(token);
        Ok(candidate)
    }

    /// Starts the candidate and waits until it responds on the handover API.
    /// It fails when the candidate stops or restarts, or does not respond in
    /// time, because a timeout never counts as success.
    async fn start(&mut self, candidate: &ContainerRef) -> SelfUpdateEvents {
        let fail = |message: String| SelfUpdateEvents::StartFailed(Failure::rejected(message));
        let Some(token) = self.token.clone() else {
            return fail("the handover token of this candidate was lost".into());
        };
        if let Err(error) = docker::start(&self.engine, &candidate.id).await {
            return fail(format!("cannot start the new agent's container: {error}"));
        }

        let deadline = Instant::now() + self.config.start_timeout;
        let stalled = failpoint::armed("self-update", "Starting", Point::Stall);
        let mut last_error = String::from("no address on the handover network yet");
        loop {
            match self.candidate_address(candidate).await {
                Err(problem) => return fail(problem),
                Ok(Some(_)) if stalled => last_error = "a failpoint kept this agent from asking".into(),
                Ok(Some(address)) => match handover::ready(address, &token, READY_REQUEST_TIMEOUT).await {
                    Ok(ready) => {
                        tracing::info!(machine = "self-update", container = %candidate.short_id(), version = ready.version, "the new agent responds on the handover API");
                        let offered = self.runtime.lock_journal().state().next_epoch();
                        return SelfUpdateEvents::Ready(offered);
                    }
                    Err(error) => last_error = error.to_string(),
                },
                Ok(None) => {}
            }
            if Instant::now() >= deadline {
                return fail(format!(
                    "the new agent did not respond on the handover API within {}: {last_error}",
                    humantime::format_duration(self.config.start_timeout)
                ));
            }
            tokio::time::sleep(START_POLL).await;
        }
    }

    /// Returns the candidate's address on the handover network, `None` while
    /// it has none, or why the candidate failed: removed, stopped or
    /// restarted.
    async fn candidate_address(&self, candidate: &ContainerRef) -> Result<Option<SocketAddr>, String> {
        let status = match docker::status(&self.engine, &candidate.id).await {
            Ok(Some(status)) => status,
            Ok(None) => return Err(format!("the new agent's container {} was removed", candidate.name)),
            Err(error) => {
                tracing::warn!(machine = "self-update", %error, "cannot inspect the new agent's container");
                return Ok(None);
            }
        };
        if status.restart_count > 0 {
            return Err(format!("the new agent's container restarted {} time(s); its last exit code was {}", status.restart_count, status.exit_code));
        }
        if status.state != bollard::models::ContainerStateStatusEnum::RUNNING {
            return Err(format!("the new agent's container is {} with exit code {}", status.state, status.exit_code));
        }
        Ok(status.addresses.get(&self.config.network).map(|address| SocketAddr::new(*address, self.config.handover_port)))
    }

    /// Sends the handover request. When the response is lost or late, the
    /// journal decides. A lease of the offered epoch means the handover
    /// happened. Otherwise the abort is appended, which fences the candidate
    /// out, and an abort that is itself fenced means the candidate won.
    async fn hand_over(&mut self, candidate: ContainerRef, offered: u64) -> Done {
        let token = self.token.clone().unwrap_or_default();
        let address = self.candidate_address(&candidate).await;
        let response = match address {
            Ok(Some(address)) => {
                let request = HandoverRequest {
                    epoch: self.runtime.lock_journal().epoch(),
                    offered_epoch: offered,
                    old_container: self.own.container.id.clone(),
                    digest: self.machine.memory().attempt.as_ref().map(|attempt| attempt.target.digest.to_string()).unwrap_or_default(),
                };
                handover::hand_over(address, &token, &request, self.config.handover_timeout).await.map_err(|error| error.to_string())
            }
            Ok(None) => Err("the new agent has no address on the handover network".to_string()),
            Err(problem) => Err(problem),
        };

        match &response {
            Ok(response) if response.epoch == offered => {
                tracing::info!(machine = "self-update", container = %candidate.short_id(), epoch = offered, "the new agent took the lease");
                return Done::HandedOver(candidate, offered);
            }
            Ok(response) => tracing::warn!(machine = "self-update", epoch = response.epoch, offered, "the new agent responded with another epoch"),
            Err(error) => tracing::warn!(machine = "self-update", %error, "no response to the handover request; reading the journal"),
        }
        if self.lease_taken(offered) {
            tracing::info!(
                machine = "self-update",
                epoch = offered,
                "the response was lost, but the journal shows the new agent's lease: the handover happened"
            );
            return Done::HandedOver(candidate, offered);
        }
        let failure = Failure::rejected(format!(
            "the new agent did not take the lease: {}",
            match &response {
                Ok(response) => format!("it responded with epoch {}", response.epoch),
                Err(error) => error.clone(),
            }
        ));
        Done::Event(SelfUpdateEvents::HandoverFailed(failure))
    }

    fn lease_taken(&self, offered: u64) -> bool {
        let mut journal = self.runtime.lock_journal();
        if let Err(error) = journal.refresh() {
            tracing::warn!(machine = "self-update", %error, "cannot re-read the journal");
        }
        journal.state().lease_epoch() == offered
    }

    /// Runs the new agent's probation: the configured time, one registry
    /// check, one check cycle of the stack machine when there is one, and a
    /// healthy engine and own container. Then it confirms in the same append
    /// as the step. Until then it keeps trying, and the old agent takes the
    /// lease back at its deadline.
    async fn probation(&mut self) -> Done {
        self.take_turn("probation of the new agent".into()).await;
        tracing::info!(machine = "self-update", probation = %humantime::format_duration(self.config.probation), "probation of the new agent started");
        let started = Instant::now();
        let mut registry_checked = false;
        let mut stack_checked = !self.stack_configured;
        loop {
            while let Ok(event) = self.progress.try_recv() {
                let stack_cycle = match &event {
                    Progress::Step { machine, from, .. } => machine == "stack" && from == "Fetching",
                    Progress::Finished { machine, .. } => machine == "stack",
                    _ => false,
                };
                stack_checked |= stack_cycle;
            }
            if !registry_checked {
                match docker::registry_digest(&self.engine, &self.own.followed).await {
                    Ok(_) => registry_checked = true,
                    Err(error) => tracing::warn!(machine = "self-update", %error, "probation: the registry check failed"),
                }
            }
            let healthy = self.own_health().await;
            if started.elapsed() >= self.config.probation && registry_checked && stack_checked && healthy.is_ok() {
                break;
            }
            if let Err(problem) = healthy {
                tracing::warn!(machine = "self-update", problem, "probation: not healthy");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }

        let epoch = self.runtime.lock_journal().epoch();
        tracing::info!(machine = "self-update", epoch, "probation passed; confirming the handover");
        let confirmed = Record::LeaseConfirmed(LeaseConfirmedRecord { meta: self.runtime.seams.meta(), epoch });
        Done::EventWith(SelfUpdateEvents::Confirmed, vec![confirmed])
    }

    async fn own_health(&self) -> Result<(), String> {
        self.engine.api().ping().await.map_err(|error| format!("the Docker engine does not respond: {error}"))?;
        match docker::status(&self.engine, &self.own.container.id).await {
            Ok(Some(status)) if status.restart_count == 0 => Ok(()),
            Ok(Some(status)) => Err(format!("this container restarted {} time(s)", status.restart_count)),
            Ok(None) => Err("this container is not known to the engine".into()),
            Err(error) => Err(error.to_string()),
        }
    }

    /// Stops and removes the old agent and takes its name.
    async fn retire(&mut self, old: &ContainerRef) -> SelfUpdateEvents {
        let mut problem = None;
        for attempt in 1..=RETIRE_ATTEMPTS {
            match docker::remove(&self.engine, &old.id, self.config.stop_timeout).await {
                Ok(()) => {
                    problem = None;
                    break;
                }
                Err(error) => {
                    tracing::warn!(machine = "self-update", container = %old.short_id(), attempt, %error, "cannot remove the old agent");
                    problem = Some(format!("the old agent's container {} could not be removed: {error}; remove it with docker rm -f", old.name));
                    tokio::time::sleep(REMOVE_RETRY).await;
                }
            }
        }
        if problem.is_none() && self.own.container.name != old.name {
            match docker::rename(&self.engine, &self.own.container.id, &old.name).await {
                Ok(()) => self.own.container.name = old.name.clone(),
                Err(error) => problem = Some(format!("cannot take the name {}: {error}", old.name)),
            }
        }
        match &problem {
            None => tracing::info!(machine = "self-update", old = %old.short_id(), name = %old.name, "removed the old agent and took its name"),
            Some(problem) => tracing::error!(machine = "self-update", problem, "the handover finished with a problem"),
        }
        SelfUpdateEvents::Retired(RetireReport { problem })
    }

    /// Removes the failed attempt's candidate, and any container labelled as
    /// that attempt's candidate, retrying until the engine removes them.
    async fn remove_candidate(&mut self, attempt: u32, candidate: Option<&ContainerRef>) {
        self.take_turn("remove a failed candidate".into()).await;
        self.token = None;
        loop {
            match self.remove_attempt_containers(attempt, candidate).await {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(machine = "self-update", %error, retry_in = %humantime::format_duration(REMOVE_RETRY), "cannot remove the failed candidate");
                    tokio::time::sleep(REMOVE_RETRY).await;
                }
            }
        }
    }

    async fn remove_attempt_containers(&self, attempt: u32, candidate: Option<&ContainerRef>) -> Result<(), ContainerError> {
        let mut doomed: Vec<ContainerRef> = candidate.into_iter().cloned().collect();
        for (container, labels) in docker::candidates(&self.engine, &self.own.agent_name).await? {
            let same_attempt = labels.get(CANDIDATE_LABEL) == Some(&attempt.to_string());
            if same_attempt && container.id != self.own.container.id && !doomed.iter().any(|known| known.id == container.id) {
                doomed.push(container);
            }
        }
        for container in doomed {
            docker::remove(&self.engine, &container.id, self.config.stop_timeout).await?;
            tracing::info!(machine = "self-update", container = %container.short_id(), name = %container.name, "removed the failed candidate");
        }
        Ok(())
    }

    /// Removes labelled candidates of this agent that hold no lease and that
    /// no handover in progress accounts for: leftovers of an agent that
    /// stopped between creating a container and recording it.
    async fn remove_orphans(&self) {
        let found = match docker::candidates(&self.engine, &self.own.agent_name).await {
            Ok(found) => found,
            Err(error) => {
                tracing::warn!(machine = "self-update", %error, "cannot list candidate containers");
                return;
            }
        };
        let (holder, attempt) = {
            let journal = self.runtime.lock_journal();
            let state = journal.state();
            let holder = state.lease.as_ref().map(|lease| lease.holder.clone()).unwrap_or_default();
            let busy = journal_machine(state).0 != SelfUpdateState::Idle;
            (holder, if busy { state.self_update.clone().and_then(|(_, memory)| memory.attempt) } else { None })
        };
        for (container, labels) in found {
            let holds_lease = holder == format!("container:{}", container.short_id());
            let in_attempt = attempt.as_ref().is_some_and(|attempt| {
                attempt.target.old.id == container.id || attempt.candidate.as_ref().is_some_and(|candidate| candidate.id == container.id)
            });
            if container.id == self.own.container.id || holds_lease || in_attempt || labels.get(AGENT_LABEL) != Some(&self.own.agent_name) {
                continue;
            }
            match docker::remove(&self.engine, &container.id, self.config.stop_timeout).await {
                Ok(()) => {
                    tracing::info!(machine = "self-update", container = %container.short_id(), name = %container.name, "removed a candidate container that holds no lease")
                }
                Err(error) => {
                    tracing::warn!(machine = "self-update", container = %container.short_id(), %error, "cannot remove a candidate container that holds no lease")
                }
            }
        }
    }
}

/// Sorts a pull error. An image that does not exist or is built for another
/// platform is rejected, and rejected credentials are the device's problem.
/// Any other error may pass on a retry.
fn pull_failure(error: EngineError) -> Failure {
    let message = format!("cannot pull the new agent image: {error}");
    match error {
        EngineError::ImageNotFound { .. } | EngineError::WrongPlatform { .. } | EngineError::BadReference { .. } | EngineError::NoDigest { .. } => {
            Failure::rejected(message)
        }
        EngineError::AccessDenied { .. } => Failure::local(message),
        _ => Failure::transient(message),
    }
}

fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn short_digest(digest: &Digest) -> String {
    digest.to_string().chars().take(19).collect()
}

/// Returns the text and success flag that `update-now --self` shows when the
/// machine settles in `Idle`.
fn finished_outcome(step: &Step, memory: &SelfUpdateMemory) -> (String, bool) {
    if let Some(failure) = &step.failure
        && step.from == SelfUpdateState::Checking
    {
        return (failure.message.clone(), false);
    }
    match (step.from, &memory.last_outcome) {
        (SelfUpdateState::Checking, _) if step.event == SelfUpdateEvent::UpToDate => ("the agent runs the newest image".into(), true),
        (SelfUpdateState::Checking, _) => ("the new image failed before; it is tried again at its retry time".into(), true),
        (SelfUpdateState::Pulling, _) if step.event == SelfUpdateEvent::AlreadyRunning => ("the agent runs the newest image".into(), true),
        (SelfUpdateState::Retiring, Some(SelfUpdateOutcome::Updated { to, .. })) => (format!("the agent runs image {to}"), true),
        (_, Some(SelfUpdateOutcome::Failed { digest, reason })) => (format!("image {digest} failed: {reason}"), false),
        _ => (format!("{} after {}", step.to.name(), step.event.name()), true),
    }
}

/// Returns the notifications a step causes: a failed attempt, and a
/// finished update.
pub(crate) fn notices_for(step: &Step, memory: &SelfUpdateMemory) -> Vec<Notice> {
    let machine = MachineKind::SelfUpdate.code();
    let notice = |severity, kind, message: String| Notice { severity, kind, machine, message };
    let failed = step.to == SelfUpdateState::Aborting && step.from != SelfUpdateState::Aborting;
    let rejected = step.from == SelfUpdateState::Pulling && step.to == SelfUpdateState::Idle;
    match (&memory.last_outcome, failed, rejected) {
        (Some(SelfUpdateOutcome::Failed { digest, reason }), true, _) => {
            let retry = memory.failure_of(digest).map(|failed| failed.failures).unwrap_or(1);
            vec![notice(
                Severity::Error,
                "self-update-failed",
                format!("new agent image {digest} failed ({retry} time(s) in a row): {reason}; the old agent keeps control and retries later"),
            )]
        }
        (Some(SelfUpdateOutcome::Failed { digest, reason }), _, true) if memory.failure_of(digest).is_some() => {
            // A pull that the device itself prevents, such as a full disk,
            // is not a fault of the image.
            let local = step.failure.as_ref().is_some_and(|failure| failure.kind == crate::model::FailureKind::Local);
            if local {
                vec![notice(Severity::Error, "device-problem", format!("new agent image {digest} cannot be pulled on this device: {reason}"))]
            } else {
                vec![notice(Severity::Warning, "self-update-rejected", format!("new agent image {digest} was rejected: {reason}"))]
            }
        }
        (Some(SelfUpdateOutcome::Updated { to, .. }), _, _) if step.from == SelfUpdateState::Retiring && step.to == SelfUpdateState::Idle => {
            vec![notice(Severity::Info, "self-update-applied", format!("the agent runs image {to}"))]
        }
        _ => Vec::new(),
    }
}
