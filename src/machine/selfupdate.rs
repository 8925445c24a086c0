//! The self-update machine. It checks the registry for a new image of the
//! agent, pulls it, starts it beside the running agent as a candidate and
//! hands the lease over. Then the new agent confirms, or the old agent takes
//! the lease back and removes it.
//!
//! One machine spans two agents. Its state and memory live in the journal,
//! and the agent with the newest lease drives it. The old agent drives it up
//! to `HandingOver` and the candidate from `Probation` on, because it writes
//! the `Accepted` transition together with its lease. The old agent drives it
//! again when it takes the lease back (`TakenBack`, written together with
//! the higher lease).
//!
//! The machine is pure. Time comes in through [`SelfUpdateFacts`], and the
//! commands it queues ([`SelfUpdateCommand`]) are run by the driver only
//! after the step is synced to the journal.

use serde::{Deserialize, Serialize};

use crate::machine::MachineKind;
use crate::model::{Digest, Failure};

crate::define_machine! {
    machine: MachineKind::SelfUpdate,
    smlang: SelfUpdate, SelfUpdateStates, SelfUpdateEvents,
    states: SelfUpdateState {
        Idle = 1,
        Checking = 2,
        Pulling = 3,
        Creating = 4,
        Starting = 5,
        HandingOver = 6,
        Probation = 7,
        Retiring = 8,
        Aborting = 9,
    },
    events: SelfUpdateEvent {
        Check = 1,
        Resumed = 2,
        UpToDate = 3,
        NewDigest = 4,
        CheckFailed = 5,
        Pulled = 6,
        PullFailed = 7,
        Created = 8,
        CreateFailed = 9,
        Ready = 10,
        StartFailed = 11,
        Accepted = 12,
        HandoverFailed = 13,
        Confirmed = 14,
        TakenBack = 15,
        Retired = 16,
        Removed = 17,
        AlreadyRunning = 18,
    },
    table: SELF_UPDATE_TABLE,
    transitions: {
        Idle + Check / start_check = Checking,
        Idle + Resumed = Idle,

        Checking + UpToDate(Digest) / settle_up_to_date = Idle,
        Checking + NewDigest(Target) [is_waiting_to_retry] / skip_until_retry = Idle,
        Checking + NewDigest(Target) / start_attempt = Pulling,
        Checking + CheckFailed(Failure) / note_check_failure = Idle,
        Checking + Resumed [can_resume] / recheck = Checking,
        Checking + Resumed / stop_checking_after_restarts = Idle,

        Pulling + Pulled / create_candidate = Creating,
        Pulling + AlreadyRunning / settle_already_running = Idle,
        Pulling + PullFailed(Failure) / fail_before_candidate = Idle,
        Pulling + Resumed [can_resume] / repull = Pulling,
        Pulling + Resumed / abandon_after_restarts = Idle,

        Creating + Created(ContainerRef) / start_candidate = Starting,
        Creating + CreateFailed(Failure) / abort_attempt = Aborting,
        Creating + Resumed / abort_after_restart = Aborting,

        Starting + Ready(u64) / offer_lease = HandingOver,
        Starting + StartFailed(Failure) / abort_attempt = Aborting,
        Starting + Resumed / abort_after_restart = Aborting,

        HandingOver + Accepted(Acceptance) / start_probation = Probation,
        HandingOver + HandoverFailed(Failure) / abort_attempt = Aborting,
        HandingOver + Resumed / abort_after_restart = Aborting,

        Probation + Confirmed / retire_old_agent = Retiring,
        Probation + TakenBack(Failure) / take_back = Aborting,
        Probation + Resumed / resume_probation = Probation,

        Retiring + Retired(RetireReport) / finish_update = Idle,
        Retiring + Resumed / retire_again = Retiring,

        Aborting + Removed / finish_abort = Idle,
        Aborting + Resumed / remove_again = Aborting,
    }
}

/// Failed digests remembered; the oldest is forgotten first.
pub const REMEMBERED_FAILURES: usize = 8;

/// A point on the kernel's monotonic clock (`CLOCK_BOOTTIME`), which every
/// container on the device shares. It means nothing on another boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BootTime {
    pub boot_id: [u8; 16],
    pub ms: u64,
}

impl BootTime {
    /// Tells whether `now` is at or after this time. A time from another boot
    /// has passed: the reboot ended whatever waited for it.
    pub fn has_passed(&self, now: BootTime) -> bool {
        self.boot_id != now.boot_id || now.ms >= self.ms
    }
}

/// A container by id and name.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ContainerRef {
    pub id: String,
    pub name: String,
}

impl ContainerRef {
    /// Returns the first 12 hex digits of the id, as `docker ps` shows it.
    pub fn short_id(&self) -> &str {
        &self.id[..self.id.len().min(12)]
    }
}

/// A newer image of the agent found in the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// The reference the agent follows, such as `registry:5000/eventpi/autoupdate:stable`.
    pub image: String,
    /// The manifest digest the registry serves for it.
    pub digest: Digest,
    /// Digest of the image the running agent was started from, if known.
    pub running: Option<Digest>,
    /// The running agent's container, which the new one replaces.
    pub old: ContainerRef,
}

/// Lease taken by the candidate, as its step records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acceptance {
    pub epoch: u64,
    /// The holder name in the lease record.
    pub holder: String,
}

/// Result of removing the old agent after a confirmed handover.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RetireReport {
    /// Set when the old container could not be removed or its name not taken.
    pub problem: Option<String>,
}

/// One try to move the agent to a new image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// Counts attempts over the life of the device, starting at 1.
    pub number: u32,
    pub target: Target,
    /// The new container, once created.
    pub candidate: Option<ContainerRef>,
    /// The lease epoch offered to the candidate, once it responded.
    pub offered_epoch: Option<u64>,
    /// When the candidate took the lease; its confirmation is due a
    /// configured time later.
    pub accepted_at: Option<BootTime>,
}

/// A digest whose handover failed, and when it may be tried again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedDigest {
    pub digest: Digest,
    /// Failed attempts with this digest in a row.
    pub failures: u32,
    pub reason: String,
    pub retry_at: BootTime,
}

/// Result of the last attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SelfUpdateOutcome {
    Updated { from: Option<Digest>, to: Digest },
    Failed { digest: Digest, reason: String },
}

/// Self-update machine memory, persisted in the journal with every step.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SelfUpdateMemory {
    pub attempts_started: u32,
    pub attempt: Option<Attempt>,
    /// Most recent last, at most [`REMEMBERED_FAILURES`].
    pub failed: Vec<FailedDigest>,
    /// Restarts of an agent since the machine last left `Idle`.
    pub resumes: u32,
    pub last_outcome: Option<SelfUpdateOutcome>,
    /// The last error of a registry check, cleared by the next good check.
    pub check_error: Option<String>,
}

impl SelfUpdateMemory {
    /// Returns the failure record of `digest`, if it failed before.
    pub fn failure_of(&self, digest: &Digest) -> Option<&FailedDigest> {
        self.failed.iter().find(|failed| failed.digest == *digest)
    }

    /// Returns the earliest retry time of a remembered failure on this boot.
    pub fn next_retry(&self, now: BootTime) -> Option<BootTime> {
        self.failed.iter().map(|failed| failed.retry_at).filter(|at| !at.has_passed(now)).min_by_key(|at| at.ms)
    }
}

/// Work for the driver, queued by the machine's actions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SelfUpdateCommand {
    /// Read the registry digest of the followed image and compare it with the
    /// running one.
    Check,
    /// Pull the image and check its platform and digest.
    Pull { image: String, digest: Digest },
    /// Create the candidate container for this attempt, replacing a
    /// leftover of the same attempt.
    CreateCandidate { attempt: u32, target: Target },
    /// Start the candidate and wait until it responds on the handover API.
    StartCandidate { candidate: ContainerRef },
    /// Send `POST /handover` with the offered epoch.
    HandOver { candidate: ContainerRef, offered_epoch: u64 },
    /// Run the new agent's probation, then confirm. Only the candidate runs it.
    Probation,
    /// Stop and remove the old agent and take its name.
    RetireOldAgent { old: ContainerRef },
    /// Remove the candidate of the failed attempt, if it exists.
    RemoveCandidate { attempt: u32, candidate: Option<ContainerRef> },
}

/// Limits the machine reads from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SelfUpdateSettings {
    /// Agent restarts allowed in `Checking` or `Pulling` before giving up.
    pub max_resumes: u32,
    /// Wait before retrying a digest after its first failure, in ms.
    pub retry_backoff_min_ms: u64,
    /// Maximum wait before retrying a failed digest, in ms.
    pub retry_backoff_max_ms: u64,
}

impl Default for SelfUpdateSettings {
    fn default() -> Self {
        SelfUpdateSettings { max_resumes: 5, retry_backoff_min_ms: 10 * 60_000, retry_backoff_max_ms: 24 * 3_600_000 }
    }
}

/// Facts the driver sets before each event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SelfUpdateFacts {
    pub now: BootTime,
    /// Share taken off a retry delay at random, in permille (0 to 200), so
    /// that a fleet does not retry in step.
    pub jitter_permille: u16,
    /// Set for a check an operator requested: a failed digest is tried again
    /// without waiting for its retry time.
    pub forced: bool,
}

/// Memory, facts and queued commands of a running self-update machine.
#[derive(Debug, Default)]
pub struct SelfUpdateContext {
    pub memory: SelfUpdateMemory,
    pub facts: SelfUpdateFacts,
    pub settings: SelfUpdateSettings,
    pub commands: Vec<SelfUpdateCommand>,
}

/// Result type smlang expects from an action; `Err` leaves the state as it was.
type ActionResult = Result<(), ()>;

impl SelfUpdateContext {
    fn attempt(&self) -> Result<&Attempt, ()> {
        self.memory.attempt.as_ref().ok_or(())
    }

    fn attempt_mut(&mut self) -> Result<&mut Attempt, ()> {
        self.memory.attempt.as_mut().ok_or(())
    }

    /// Returns the delay before retrying a digest after `failures` failures:
    /// doubling from the minimum, capped at the maximum, with the jitter
    /// taken off.
    fn retry_delay_ms(&self, failures: u32) -> u64 {
        let exponent = failures.saturating_sub(1).min(30);
        let base = self.settings.retry_backoff_min_ms.saturating_mul(1u64 << exponent).min(self.settings.retry_backoff_max_ms);
        let jitter = u64::from(self.facts.jitter_permille.min(200));
        base - base * jitter / 1000
    }

    /// Marks the attempt's digest as failed with `reason`, schedules its
    /// retry and records the outcome. The attempt stays, so that `Aborting`
    /// can remove its candidate.
    fn record_failure(&mut self, reason: &str) -> ActionResult {
        let digest = self.attempt()?.target.digest;
        let failures = self.memory.failure_of(&digest).map_or(0, |failed| failed.failures) + 1;
        let delay = self.retry_delay_ms(failures);
        let retry_at = BootTime { boot_id: self.facts.now.boot_id, ms: self.facts.now.ms.saturating_add(delay) };
        self.memory.failed.retain(|failed| failed.digest != digest);
        self.memory.failed.push(FailedDigest { digest, failures, reason: reason.to_string(), retry_at });
        if self.memory.failed.len() > REMEMBERED_FAILURES {
            self.memory.failed.remove(0);
        }
        self.memory.last_outcome = Some(SelfUpdateOutcome::Failed { digest, reason: reason.to_string() });
        Ok(())
    }

    fn queue_removal(&mut self) -> ActionResult {
        let attempt = self.attempt()?;
        let command = SelfUpdateCommand::RemoveCandidate { attempt: attempt.number, candidate: attempt.candidate.clone() };
        self.commands.push(command);
        Ok(())
    }

    fn end_attempt(&mut self) {
        self.memory.attempt = None;
        self.memory.resumes = 0;
    }
}

impl SelfUpdateStateMachineContext for SelfUpdateContext {
    fn is_waiting_to_retry(&self, target: &Target) -> Result<bool, ()> {
        let waiting = self.memory.failure_of(&target.digest).is_some_and(|failed| !failed.retry_at.has_passed(self.facts.now));
        Ok(waiting && !self.facts.forced)
    }

    fn can_resume(&self) -> Result<bool, ()> {
        Ok(self.memory.resumes < self.settings.max_resumes)
    }

    fn start_check(&mut self) -> ActionResult {
        self.commands.push(SelfUpdateCommand::Check);
        Ok(())
    }

    fn settle_up_to_date(&mut self, _running: Digest) -> ActionResult {
        self.memory.check_error = None;
        self.memory.resumes = 0;
        Ok(())
    }

    fn skip_until_retry(&mut self, _target: Target) -> ActionResult {
        self.memory.check_error = None;
        self.memory.resumes = 0;
        Ok(())
    }

    fn start_attempt(&mut self, target: Target) -> ActionResult {
        self.memory.check_error = None;
        self.memory.attempts_started += 1;
        self.memory.resumes = 0;
        let command = SelfUpdateCommand::Pull { image: target.image.clone(), digest: target.digest };
        self.memory.attempt = Some(Attempt { number: self.memory.attempts_started, target, candidate: None, offered_epoch: None, accepted_at: None });
        self.commands.push(command);
        Ok(())
    }

    fn note_check_failure(&mut self, failure: Failure) -> ActionResult {
        self.memory.check_error = Some(failure.message);
        self.memory.resumes = 0;
        Ok(())
    }

    fn recheck(&mut self) -> ActionResult {
        self.memory.resumes += 1;
        self.commands.push(SelfUpdateCommand::Check);
        Ok(())
    }

    fn stop_checking_after_restarts(&mut self) -> ActionResult {
        self.memory.check_error = Some("the agent restarted too often while checking the registry".into());
        self.memory.resumes = 0;
        Ok(())
    }

    /// Ends an attempt whose pulled image turned out to be the one the agent
    /// runs: the engine had not recorded the registry digest of the running
    /// image before the pull.
    fn settle_already_running(&mut self) -> ActionResult {
        self.end_attempt();
        Ok(())
    }

    fn create_candidate(&mut self) -> ActionResult {
        let attempt = self.attempt()?;
        let command = SelfUpdateCommand::CreateCandidate { attempt: attempt.number, target: attempt.target.clone() };
        self.commands.push(command);
        Ok(())
    }

    /// Ends an attempt that failed before any container was created. Only a
    /// rejected image (wrong platform, missing) marks the digest as failed;
    /// a registry that cannot be reached is tried again at the next check.
    fn fail_before_candidate(&mut self, failure: Failure) -> ActionResult {
        if failure.kind == crate::model::FailureKind::Transient {
            let digest = self.attempt()?.target.digest;
            self.memory.last_outcome = Some(SelfUpdateOutcome::Failed { digest, reason: failure.message });
        } else {
            self.record_failure(&failure.message)?;
        }
        self.end_attempt();
        Ok(())
    }

    fn repull(&mut self) -> ActionResult {
        self.memory.resumes += 1;
        let target = &self.attempt()?.target;
        let command = SelfUpdateCommand::Pull { image: target.image.clone(), digest: target.digest };
        self.commands.push(command);
        Ok(())
    }

    fn abandon_after_restarts(&mut self) -> ActionResult {
        self.record_failure("the agent restarted too often while pulling the new image")?;
        self.end_attempt();
        Ok(())
    }

    fn start_candidate(&mut self, candidate: ContainerRef) -> ActionResult {
        self.attempt_mut()?.candidate = Some(candidate.clone());
        self.commands.push(SelfUpdateCommand::StartCandidate { candidate });
        Ok(())
    }

    fn abort_attempt(&mut self, failure: Failure) -> ActionResult {
        self.record_failure(&failure.message)?;
        self.queue_removal()
    }

    fn abort_after_restart(&mut self) -> ActionResult {
        self.record_failure("the old agent restarted during the handover")?;
        self.queue_removal()
    }

    fn offer_lease(&mut self, offered_epoch: u64) -> ActionResult {
        let attempt = self.attempt_mut()?;
        attempt.offered_epoch = Some(offered_epoch);
        let candidate = attempt.candidate.clone().ok_or(())?;
        self.commands.push(SelfUpdateCommand::HandOver { candidate, offered_epoch });
        Ok(())
    }

    fn start_probation(&mut self, acceptance: Acceptance) -> ActionResult {
        let now = self.facts.now;
        let attempt = self.attempt_mut()?;
        if attempt.offered_epoch != Some(acceptance.epoch) {
            return Err(());
        }
        attempt.accepted_at = Some(now);
        self.memory.resumes = 0;
        self.commands.push(SelfUpdateCommand::Probation);
        Ok(())
    }

    fn retire_old_agent(&mut self) -> ActionResult {
        let attempt = self.attempt()?;
        let old = attempt.target.old.clone();
        let (from, to) = (attempt.target.running, attempt.target.digest);
        self.memory.failed.retain(|failed| failed.digest != to);
        self.memory.last_outcome = Some(SelfUpdateOutcome::Updated { from, to });
        self.commands.push(SelfUpdateCommand::RetireOldAgent { old });
        Ok(())
    }

    fn take_back(&mut self, failure: Failure) -> ActionResult {
        self.record_failure(&failure.message)?;
        self.memory.resumes = 0;
        self.queue_removal()
    }

    fn resume_probation(&mut self) -> ActionResult {
        self.memory.resumes += 1;
        self.commands.push(SelfUpdateCommand::Probation);
        Ok(())
    }

    fn finish_update(&mut self, report: RetireReport) -> ActionResult {
        if let Some(problem) = report.problem {
            self.memory.check_error = Some(problem);
        }
        self.end_attempt();
        Ok(())
    }

    fn retire_again(&mut self) -> ActionResult {
        let old = self.attempt()?.target.old.clone();
        self.commands.push(SelfUpdateCommand::RetireOldAgent { old });
        Ok(())
    }

    fn finish_abort(&mut self) -> ActionResult {
        self.end_attempt();
        Ok(())
    }

    fn remove_again(&mut self) -> ActionResult {
        self.queue_removal()
    }
}

/// Result of feeding one event to the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub from: SelfUpdateState,
    pub event: SelfUpdateEvent,
    pub to: SelfUpdateState,
    /// Commands to run once the step is persisted.
    pub commands: Vec<SelfUpdateCommand>,
    /// The failure the event reported, if any.
    pub failure: Option<Failure>,
    pub memory_changed: bool,
    /// Number of the attempt the step belongs to, 0 outside any attempt.
    pub attempt: u32,
}

/// Error for an event the current state does not take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the self-update machine in state {state:?} does not take event {event:?}")]
pub struct UnexpectedEvent {
    pub state: SelfUpdateState,
    pub event: SelfUpdateEvent,
}

/// The self-update machine with its context.
pub struct SelfUpdateMachine {
    inner: SelfUpdateStateMachine<SelfUpdateContext>,
}

impl SelfUpdateMachine {
    /// Builds a machine in `state` with persisted `memory`, as after a restart
    /// or when another agent wrote the last step.
    pub fn restore(state: SelfUpdateState, memory: SelfUpdateMemory, settings: SelfUpdateSettings) -> Self {
        let context = SelfUpdateContext { memory, facts: SelfUpdateFacts::default(), settings, commands: Vec::new() };
        SelfUpdateMachine { inner: SelfUpdateStateMachine::new_with_state(context, state.into()) }
    }

    pub fn state(&self) -> SelfUpdateState {
        self.inner.state().into()
    }

    pub fn memory(&self) -> &SelfUpdateMemory {
        &self.inner.context().memory
    }

    /// Feeds one event. On error the machine, its memory and its queue are
    /// unchanged.
    pub fn handle(&mut self, event: SelfUpdateEvents, facts: SelfUpdateFacts) -> Result<Step, UnexpectedEvent> {
        let from = self.state();
        let event_code = SelfUpdateEvent::from(&event);
        let failure = failure_of(&event);
        let before = self.inner.context().memory.clone();
        self.inner.context_mut().facts = facts;

        if self.inner.process_event(event).is_err() {
            let context = self.inner.context_mut();
            context.memory = before;
            context.commands.clear();
            return Err(UnexpectedEvent { state: from, event: event_code });
        }

        let context = self.inner.context_mut();
        let commands = std::mem::take(&mut context.commands);
        let memory_changed = context.memory != before;
        let current = context.memory.attempt.as_ref().or(before.attempt.as_ref());
        let attempt = current.map_or(0, |attempt| attempt.number);
        Ok(Step { from, event: event_code, to: self.state(), commands, failure, memory_changed, attempt })
    }
}

fn failure_of(event: &SelfUpdateEvents) -> Option<Failure> {
    match event {
        SelfUpdateEvents::CheckFailed(failure)
        | SelfUpdateEvents::PullFailed(failure)
        | SelfUpdateEvents::CreateFailed(failure)
        | SelfUpdateEvents::StartFailed(failure)
        | SelfUpdateEvents::HandoverFailed(failure)
        | SelfUpdateEvents::TakenBack(failure) => Some(failure.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOT: [u8; 16] = [7; 16];

    fn digest(byte: u8) -> Digest {
        Digest([byte; 32])
    }

    fn old() -> ContainerRef {
        ContainerRef { id: "a".repeat(64), name: "agent".into() }
    }

    fn candidate() -> ContainerRef {
        ContainerRef { id: "b".repeat(64), name: "agent-update-1".into() }
    }

    fn target(byte: u8) -> Target {
        Target { image: "r:5000/agent:stable".into(), digest: digest(byte), running: Some(digest(1)), old: old() }
    }

    fn at(ms: u64) -> SelfUpdateFacts {
        SelfUpdateFacts { now: BootTime { boot_id: BOOT, ms }, jitter_permille: 0, forced: false }
    }

    fn settings() -> SelfUpdateSettings {
        SelfUpdateSettings { max_resumes: 2, retry_backoff_min_ms: 1000, retry_backoff_max_ms: 8000 }
    }

    fn fresh() -> SelfUpdateMachine {
        SelfUpdateMachine::restore(SelfUpdateState::Idle, SelfUpdateMemory::default(), settings())
    }

    fn feed(machine: &mut SelfUpdateMachine, events: Vec<SelfUpdateEvents>) -> Vec<SelfUpdateState> {
        events.into_iter().map(|event| machine.handle(event, at(0)).expect("every event in these scenarios is expected").to).collect()
    }

    /// Events that bring a fresh machine to `HandingOver` with epoch 5 offered.
    fn to_handover() -> Vec<SelfUpdateEvents> {
        vec![
            SelfUpdateEvents::Check,
            SelfUpdateEvents::NewDigest(target(2)),
            SelfUpdateEvents::Pulled,
            SelfUpdateEvents::Created(candidate()),
            SelfUpdateEvents::Ready(5),
        ]
    }

    #[test]
    fn handover_visits_every_step() {
        use SelfUpdateState::*;
        let mut machine = fresh();
        let mut events = to_handover();
        events.extend([
            SelfUpdateEvents::Accepted(Acceptance { epoch: 5, holder: "container:bbbbbbbbbbbb".into() }),
            SelfUpdateEvents::Confirmed,
            SelfUpdateEvents::Retired(RetireReport::default()),
        ]);

        let states = feed(&mut machine, events);

        assert_eq!(states, vec![Checking, Pulling, Creating, Starting, HandingOver, Probation, Retiring, Idle]);
        assert_eq!(machine.memory().last_outcome, Some(SelfUpdateOutcome::Updated { from: Some(digest(1)), to: digest(2) }));
        assert_eq!(machine.memory().attempt, None);
    }

    #[test]
    fn handover_queues_offered_epoch() {
        let mut machine = fresh();
        feed(&mut machine, to_handover()[..4].to_vec());

        let step = machine.handle(SelfUpdateEvents::Ready(5), at(0)).unwrap();

        assert_eq!(step.commands, vec![SelfUpdateCommand::HandOver { candidate: candidate(), offered_epoch: 5 }]);
        assert_eq!(machine.memory().attempt.as_ref().unwrap().offered_epoch, Some(5));
    }

    #[test]
    fn acceptance_of_other_epoch_is_refused() {
        let mut machine = fresh();
        feed(&mut machine, to_handover());

        let error = machine.handle(SelfUpdateEvents::Accepted(Acceptance { epoch: 6, holder: "x".into() }), at(0)).unwrap_err();

        assert_eq!(error.state, SelfUpdateState::HandingOver);
        assert_eq!(machine.memory().attempt.as_ref().unwrap().accepted_at, None);
    }

    #[test]
    fn up_to_date_check_returns_to_idle() {
        let mut machine = fresh();

        let states = feed(&mut machine, vec![SelfUpdateEvents::Check, SelfUpdateEvents::UpToDate(digest(1))]);

        assert_eq!(states, vec![SelfUpdateState::Checking, SelfUpdateState::Idle]);
        assert_eq!(machine.memory().attempts_started, 0);
    }

    #[test]
    fn failed_handover_marks_digest_and_removes_candidate() {
        let mut machine = fresh();
        feed(&mut machine, to_handover());

        let step = machine.handle(SelfUpdateEvents::HandoverFailed(Failure::rejected("timed out")), at(100)).unwrap();
        let done = machine.handle(SelfUpdateEvents::Removed, at(200)).unwrap();

        assert_eq!(step.to, SelfUpdateState::Aborting);
        assert_eq!(step.commands, vec![SelfUpdateCommand::RemoveCandidate { attempt: 1, candidate: Some(candidate()) }]);
        assert_eq!(done.to, SelfUpdateState::Idle);
        let failed = machine.memory().failure_of(&digest(2)).unwrap();
        assert_eq!(failed.failures, 1);
        assert_eq!(failed.retry_at, BootTime { boot_id: BOOT, ms: 1100 });
        assert_eq!(machine.memory().attempt, None);
    }

    #[test]
    fn failed_digest_waits_for_retry_time() {
        let mut machine = fresh();
        feed(&mut machine, to_handover());
        machine.handle(SelfUpdateEvents::HandoverFailed(Failure::rejected("timed out")), at(0)).unwrap();
        machine.handle(SelfUpdateEvents::Removed, at(0)).unwrap();

        machine.handle(SelfUpdateEvents::Check, at(500)).unwrap();
        let early = machine.handle(SelfUpdateEvents::NewDigest(target(2)), at(500)).unwrap();
        machine.handle(SelfUpdateEvents::Check, at(1000)).unwrap();
        let due = machine.handle(SelfUpdateEvents::NewDigest(target(2)), at(1000)).unwrap();

        assert_eq!(early.to, SelfUpdateState::Idle);
        assert_eq!(early.commands, vec![]);
        assert_eq!(due.to, SelfUpdateState::Pulling);
    }

    #[test]
    fn forced_check_skips_retry_time() {
        let mut machine = fresh();
        feed(&mut machine, to_handover());
        machine.handle(SelfUpdateEvents::HandoverFailed(Failure::rejected("timed out")), at(0)).unwrap();
        machine.handle(SelfUpdateEvents::Removed, at(0)).unwrap();
        let forced = SelfUpdateFacts { forced: true, ..at(10) };

        machine.handle(SelfUpdateEvents::Check, forced).unwrap();
        let step = machine.handle(SelfUpdateEvents::NewDigest(target(2)), forced).unwrap();

        assert_eq!(step.to, SelfUpdateState::Pulling);
    }

    #[test]
    fn newer_digest_is_tried_during_backoff() {
        let mut machine = fresh();
        feed(&mut machine, to_handover());
        machine.handle(SelfUpdateEvents::HandoverFailed(Failure::rejected("timed out")), at(0)).unwrap();
        machine.handle(SelfUpdateEvents::Removed, at(0)).unwrap();

        machine.handle(SelfUpdateEvents::Check, at(10)).unwrap();
        let step = machine.handle(SelfUpdateEvents::NewDigest(target(3)), at(10)).unwrap();

        assert_eq!(step.to, SelfUpdateState::Pulling);
    }

    #[test]
    fn retry_delay_doubles_to_maximum() {
        let mut machine = fresh();
        let mut delays = Vec::new();
        for round in 0..6u64 {
            let start = round * 100_000;
            let forced = SelfUpdateFacts { forced: true, ..at(start) };
            machine.handle(SelfUpdateEvents::Check, forced).unwrap();
            machine.handle(SelfUpdateEvents::NewDigest(target(2)), forced).unwrap();
            machine.handle(SelfUpdateEvents::PullFailed(Failure::rejected("wrong platform")), at(start)).unwrap();
            delays.push(machine.memory().failure_of(&digest(2)).unwrap().retry_at.ms - start);
        }

        assert_eq!(delays, vec![1000, 2000, 4000, 8000, 8000, 8000]);
    }

    #[test]
    fn jitter_shortens_retry_delay() {
        let mut machine = fresh();
        feed(&mut machine, to_handover()[..2].to_vec());
        let facts = SelfUpdateFacts { jitter_permille: 200, ..at(0) };

        machine.handle(SelfUpdateEvents::PullFailed(Failure::rejected("wrong platform")), facts).unwrap();

        assert_eq!(machine.memory().failure_of(&digest(2)).unwrap().retry_at.ms, 800);
    }

    #[test]
    fn transient_pull_failure_keeps_digest_unmarked() {
        let mut machine = fresh();
        feed(&mut machine, to_handover()[..2].to_vec());

        let step = machine.handle(SelfUpdateEvents::PullFailed(Failure::transient("registry down")), at(0)).unwrap();

        assert_eq!(step.to, SelfUpdateState::Idle);
        assert!(machine.memory().failed.is_empty());
        assert_eq!(machine.memory().attempt, None);
    }

    #[test]
    fn take_back_fails_attempt_and_removes_candidate() {
        let mut machine = fresh();
        let mut events = to_handover();
        events.push(SelfUpdateEvents::Accepted(Acceptance { epoch: 5, holder: "container:bbbbbbbbbbbb".into() }));
        feed(&mut machine, events);

        let step = machine.handle(SelfUpdateEvents::TakenBack(Failure::rejected("did not confirm")), at(0)).unwrap();

        assert_eq!(step.to, SelfUpdateState::Aborting);
        assert_eq!(step.commands, vec![SelfUpdateCommand::RemoveCandidate { attempt: 1, candidate: Some(candidate()) }]);
        assert!(matches!(&machine.memory().last_outcome, Some(SelfUpdateOutcome::Failed { reason, .. }) if reason == "did not confirm"));
    }

    #[test]
    fn restart_before_lease_aborts() {
        for (count, state) in [(3, SelfUpdateState::Creating), (4, SelfUpdateState::Starting), (5, SelfUpdateState::HandingOver)] {
            let mut machine = fresh();
            feed(&mut machine, to_handover()[..count].to_vec());
            assert_eq!(machine.state(), state);

            let step = machine.handle(SelfUpdateEvents::Resumed, at(0)).unwrap();

            assert_eq!(step.to, SelfUpdateState::Aborting, "{state:?}");
            assert!(matches!(step.commands[..], [SelfUpdateCommand::RemoveCandidate { .. }]), "{state:?}");
        }
    }

    #[test]
    fn pull_crash_loop_gives_up() {
        let mut machine = fresh();
        feed(&mut machine, to_handover()[..2].to_vec());

        let states: Vec<SelfUpdateState> = (0..3).map(|_| machine.handle(SelfUpdateEvents::Resumed, at(0)).unwrap().to).collect();

        assert_eq!(states, vec![SelfUpdateState::Pulling, SelfUpdateState::Pulling, SelfUpdateState::Idle]);
        assert!(machine.memory().failure_of(&digest(2)).is_some());
    }

    #[test]
    fn retry_time_of_other_boot_has_passed() {
        let time = BootTime { boot_id: [1; 16], ms: 10_000 };

        assert!(time.has_passed(BootTime { boot_id: [2; 16], ms: 5 }));
        assert!(!time.has_passed(BootTime { boot_id: [1; 16], ms: 5 }));
    }

    #[test]
    fn busy_states_handle_resume_and_failures() {
        use SelfUpdateEvent as E;
        use SelfUpdateState as S;
        let failures: &[(S, &[E])] = &[
            (S::Checking, &[E::CheckFailed]),
            (S::Pulling, &[E::PullFailed]),
            (S::Creating, &[E::CreateFailed]),
            (S::Starting, &[E::StartFailed]),
            (S::HandingOver, &[E::HandoverFailed]),
            (S::Probation, &[E::TakenBack]),
            (S::Retiring, &[]),
            (S::Aborting, &[]),
        ];
        for state in SelfUpdateState::ALL {
            assert!(SELF_UPDATE_TABLE.handles(state.code(), E::Resumed.code()), "{state:?} does not handle Resumed");
        }
        for state in SelfUpdateState::ALL.iter().filter(|state| **state != S::Idle) {
            let (_, events) = failures.iter().find(|(listed, _)| listed == state).unwrap_or_else(|| panic!("{state:?} has no failure list"));
            for event in events.iter() {
                assert!(SELF_UPDATE_TABLE.handles(state.code(), event.code()), "{state:?} does not handle {event:?}");
            }
        }
    }

    #[test]
    fn unexpected_event_changes_nothing() {
        let mut machine = fresh();
        let before = machine.memory().clone();

        let error = machine.handle(SelfUpdateEvents::Confirmed, at(0)).unwrap_err();

        assert_eq!(error.state, SelfUpdateState::Idle);
        assert_eq!(machine.memory(), &before);
    }

    #[test]
    fn table_lists_every_state() {
        let codes: Vec<u8> = SELF_UPDATE_TABLE.states.iter().map(|state| state.code).collect();
        let expected: Vec<u8> = SelfUpdateState::ALL.iter().map(|state| state.code()).collect();
        assert_eq!(codes, expected);
        assert_eq!(SELF_UPDATE_TABLE.start, SelfUpdateState::Idle.code());
        assert_eq!(SELF_UPDATE_TABLE.machine, MachineKind::SelfUpdate);
    }
}
