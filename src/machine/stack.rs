//! The stack-update machine: follow the device branch, apply a new commit with
//! pinned images, watch its health, and go back to the last known-good commit
//! or the factory reset when it fails.
//!
//! The machine is pure. Its memory ([`StackMemory`]) is persisted in the
//! journal together with every transition, and the commands it queues
//! ([`StackCommand`]) are run by the driver only after that record is synced.

use serde::{Deserialize, Serialize};

use crate::machine::MachineKind;
use crate::model::{CommitId, Failure, FailureKind, Release};

crate::define_machine! {
    machine: MachineKind::Stack,
    smlang: Stack, StackStates, StackEvents,
    states: StackState {
        Idle = 1,
        Fetching = 2,
        Validating = 3,
        Pulling = 4,
        Ready = 5,
        Applying = 6,
        Probation = 7,
        Reverting = 8,
        RevertProbation = 9,
        FactoryReset = 10,
    },
    events: StackEvent {
        Poll = 1,
        Resumed = 2,
        TipFetched = 3,
        FetchFailed = 4,
        Valid = 5,
        Invalid = 6,
        Pulled = 7,
        PullFailed = 8,
        PolicyAllows = 9,
        Applied = 10,
        ApplyFailed = 11,
        GatePassed = 12,
        GateFailed = 13,
        ResetDone = 14,
        ResetFailed = 15,
    },
    table: STACK_TABLE,
    transitions: {
        Idle + Poll / start_fetch = Fetching,
        Idle + Resumed / keep_known_good = Idle,

        Fetching + TipFetched(CommitId) [is_running_tip] / settle_running = Idle,
        Fetching + TipFetched(CommitId) [is_rejected_tip] / skip_rejected = Idle,
        Fetching + TipFetched(CommitId) [is_pending_tip] / return_to_ready = Ready,
        Fetching + TipFetched(CommitId) / start_attempt = Validating,
        Fetching + FetchFailed(Failure) [needs_person] / retry_needing_attention = Idle,
        Fetching + FetchFailed(Failure) / retry_later = Idle,
        Fetching + Resumed [can_resume] / refetch = Fetching,
        Fetching + Resumed [!can_resume] / abandon_after_crashes = Idle,

        Validating + Valid(StackPlan) / start_pull = Pulling,
        Validating + Invalid(Failure) [is_rejection] / reject_target = Idle,
        Validating + Invalid(Failure) / retry_later = Idle,
        Validating + Resumed [can_resume] / revalidate = Validating,
        Validating + Resumed [!can_resume] / abandon_after_crashes = Idle,

        Pulling + Pulled(Release) / hold_for_policy = Ready,
        Pulling + PullFailed(Failure) [is_clock_problem] / wait_for_clock = Idle,
        Pulling + PullFailed(Failure) [is_rejection] / reject_target = Idle,
        Pulling + PullFailed(Failure) / retry_later = Idle,
        Pulling + Resumed [can_resume] / repull = Pulling,
        Pulling + Resumed [!can_resume] / abandon_after_crashes = Idle,

        Ready + PolicyAllows / start_apply = Applying,
        Ready + Poll / start_fetch = Fetching,
        Ready + Resumed / await_policy = Ready,

        Applying + Applied / start_probation = Probation,
        Applying + ApplyFailed(Failure) [has_known_good] / revert_after_failure = Reverting,
        Applying + ApplyFailed(Failure) / reset_after_failure = FactoryReset,
        Applying + Resumed [can_resume] / reapply = Applying,
        Applying + Resumed [can_revert] / revert_after_crashes = Reverting,
        Applying + Resumed / reset_after_crashes = FactoryReset,

        Probation + GatePassed / accept_target = Idle,
        Probation + GateFailed(Failure) [has_known_good] / revert_after_failure = Reverting,
        Probation + GateFailed(Failure) / reset_after_failure = FactoryReset,
        Probation + Resumed [can_resume] / rewatch = Probation,
        Probation + Resumed [can_revert] / revert_after_crashes = Reverting,
        Probation + Resumed / reset_after_crashes = FactoryReset,

        Reverting + Applied / start_revert_probation = RevertProbation,
        Reverting + ApplyFailed(Failure) / reset_after_failure = FactoryReset,
        Reverting + Resumed [can_resume] / repeat_revert = Reverting,
        Reverting + Resumed / reset_after_crashes = FactoryReset,

        RevertProbation + GatePassed / finish_rollback = Idle,
        RevertProbation + GateFailed(Failure) / reset_after_failure = FactoryReset,
        RevertProbation + Resumed [can_resume] / rewatch_revert = RevertProbation,
        RevertProbation + Resumed / reset_after_crashes = FactoryReset,

        FactoryReset + ResetDone / finish_factory_reset = Idle,
        FactoryReset + ResetFailed(Failure) / give_up = Idle,
        FactoryReset + Resumed [can_resume] / repeat_factory_reset = FactoryReset,
        FactoryReset + Resumed / give_up_after_crashes = Idle,
    }
}

/// The services of a validated commit and the image each one names.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StackPlan {
    pub services: Vec<PlannedService>,
}

/// One service of a validated commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedService {
    pub service: String,
    /// The image reference as the compose file writes it.
    pub image: String,
}

/// One try to move the device to a new commit of its branch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// Counts attempts over the life of the device, starting at 1.
    pub number: u32,
    pub target: CommitId,
    /// Services and images, once the compose files validated.
    pub plan: Option<StackPlan>,
    /// The target with the digest of every image, once all were pulled.
    pub pulled: Option<Release>,
    /// Boot id of the device when the images were pulled; the `on-boot`
    /// policy applies only after it changes.
    pub pulled_on_boot: Option<[u8; 16]>,
}

/// A commit that must not be tried again until the branch moves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub commit: CommitId,
    pub reason: String,
}

/// Result of the last attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Applied { commit: CommitId },
    Rejected { commit: CommitId },
    RolledBack { failed: CommitId, restored: CommitId },
    FactoryReset { reason: String },
    GaveUp { reason: String },
}

/// Stack machine memory kept between transitions and persisted in the journal.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StackMemory {
    /// The release that Compose last brought up, possibly still on probation.
    pub running: Option<Release>,
    /// The last release that passed its health gate. Its images carry
    /// keep-tags, so a revert works with the registry offline.
    pub known_good: Option<Release>,
    pub attempt: Option<Attempt>,
    pub rejected: Option<Rejection>,
    /// Restarts of the agent since the machine last left `Idle`, or since it
    /// entered a revert or a factory reset.
    pub resumes: u32,
    /// Transient failures in a row; the driver backs off on them.
    pub transient_failures: u32,
    pub attempts_started: u32,
    /// Set when the machine stopped trying and a person has to look.
    pub needs_attention: Option<String>,
    pub last_outcome: Option<Outcome>,
    pub factory_resets: u32,
    /// Reason for the factory reset in progress.
    pub factory_reset_reason: Option<String>,
}

/// Reason the driver brings a release up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApplyPurpose {
    Update,
    Revert,
}

/// Work for the driver, queued by the machine's actions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StackCommand {
    /// Fetch the device branch and report its tip.
    Fetch,
    /// Check out `commit` for validation and run `docker compose config`.
    Validate { commit: CommitId },
    /// Pull every image of the plan and report the digests.
    Pull { commit: CommitId, plan: StackPlan },
    /// Report `PolicyAllows` once the apply policy lets `commit` go in.
    AwaitPolicy { commit: CommitId, pulled_on_boot: Option<[u8; 16]> },
    /// Check out the release's commit and bring it up with pinned digests.
    Apply { release: Release, purpose: ApplyPurpose },
    /// Watch the release's services for the probation window.
    WatchHealth { release: Release, purpose: ApplyPurpose },
    /// Put keep-tags on `keep` and remove them from `release`.
    KeepImages { keep: Release, release: Option<Release> },
    /// Run the configured factory reset.
    FactoryReset { reason: String },
    /// Back off before the next poll after a transient failure.
    BackOff { failures: u32 },
}

/// Limits the machine reads from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StackSettings {
    /// Agent restarts allowed in one attempt before it takes the failure path.
    pub max_resumes: u32,
}

impl Default for StackSettings {
    fn default() -> Self {
        StackSettings { max_resumes: 5 }
    }
}

/// Facts the driver sets before each event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StackFacts {
    pub boot_id: [u8; 16],
}

/// Memory, facts and queued commands of a running stack machine.
#[derive(Debug, Default)]
pub struct StackContext {
    pub memory: StackMemory,
    pub facts: StackFacts,
    pub settings: StackSettings,
    pub commands: Vec<StackCommand>,
}

/// Result type smlang expects from an action; `Err` leaves the state as it was.
type ActionResult = Result<(), ()>;

impl StackContext {
    fn target(&self) -> Option<CommitId> {
        self.memory.attempt.as_ref().map(|attempt| attempt.target)
    }

    fn pulled_release(&self) -> Option<Release> {
        self.memory.attempt.as_ref().and_then(|attempt| attempt.pulled.clone())
    }

    fn reject_current_target(&mut self, reason: &str) {
        if let Some(commit) = self.target() {
            self.memory.rejected = Some(Rejection { commit, reason: reason.to_string() });
            self.memory.last_outcome = Some(Outcome::Rejected { commit });
        }
    }

    /// Clears a needs-attention reason that a failed fetch set, once a fetch
    /// succeeds. A reason from a failed factory reset stays: it is the one
    /// [`Outcome::GaveUp`] carries.
    fn clear_fetch_attention(&mut self) {
        let gave_up = matches!(&self.memory.last_outcome, Some(Outcome::GaveUp { reason }) if self.memory.needs_attention.as_ref() == Some(reason));
        if !gave_up {
            self.memory.needs_attention = None;
        }
    }

    fn end_attempt(&mut self) {
        self.memory.attempt = None;
        self.memory.resumes = 0;
    }

    fn queue_apply(&mut self) -> ActionResult {
        let release = self.pulled_release().ok_or(())?;
        self.commands.push(StackCommand::Apply { release, purpose: ApplyPurpose::Update });
        Ok(())
    }

    fn queue_revert(&mut self) -> ActionResult {
        let release = self.memory.known_good.clone().ok_or(())?;
        self.memory.resumes = 0;
        self.commands.push(StackCommand::Apply { release, purpose: ApplyPurpose::Revert });
        Ok(())
    }

    fn queue_factory_reset(&mut self, reason: String) {
        self.memory.resumes = 0;
        self.memory.factory_reset_reason = Some(reason.clone());
        self.commands.push(StackCommand::FactoryReset { reason });
    }

    fn factory_reset_reason(&self, failure: &str) -> String {
        match (&self.memory.known_good, self.target()) {
            (Some(known_good), _) => format!("known-good commit {} failed too: {failure}", known_good.commit.short()),
            (None, Some(target)) => format!("commit {} failed and there is no known-good commit: {failure}", target.short()),
            (None, None) => format!("no known-good commit to go back to: {failure}"),
        }
    }
}

impl StackStateMachineContext for StackContext {
    fn is_running_tip(&self, tip: &CommitId) -> Result<bool, ()> {
        Ok(self.memory.running.as_ref().is_some_and(|running| running.commit == *tip))
    }

    fn is_rejected_tip(&self, tip: &CommitId) -> Result<bool, ()> {
        Ok(self.memory.rejected.as_ref().is_some_and(|rejection| rejection.commit == *tip))
    }

    fn is_pending_tip(&self, tip: &CommitId) -> Result<bool, ()> {
        Ok(self.memory.attempt.as_ref().is_some_and(|attempt| attempt.target == *tip && attempt.pulled.is_some()))
    }

    fn is_rejection(&self, failure: &Failure) -> Result<bool, ()> {
        Ok(failure.kind == FailureKind::Rejected)
    }

    fn needs_person(&self, failure: &Failure) -> Result<bool, ()> {
        Ok(failure.kind == FailureKind::Attention)
    }

    fn is_clock_problem(&self, failure: &Failure) -> Result<bool, ()> {
        Ok(failure.kind == FailureKind::Clock)
    }

    fn has_known_good(&self, _failure: &Failure) -> Result<bool, ()> {
        Ok(self.memory.known_good.is_some())
    }

    fn can_resume(&self) -> Result<bool, ()> {
        Ok(self.memory.resumes < self.settings.max_resumes)
    }

    fn can_revert(&self) -> Result<bool, ()> {
        Ok(self.memory.known_good.is_some())
    }

    fn keep_known_good(&mut self) -> ActionResult {
        if let Some(keep) = self.memory.known_good.clone() {
            self.commands.push(StackCommand::KeepImages { keep, release: None });
        }
        Ok(())
    }

    fn start_fetch(&mut self) -> ActionResult {
        self.commands.push(StackCommand::Fetch);
        Ok(())
    }

    fn refetch(&mut self) -> ActionResult {
        self.memory.resumes += 1;
        self.commands.push(StackCommand::Fetch);
        Ok(())
    }

    fn settle_running(&mut self, _tip: CommitId) -> ActionResult {
        self.memory.transient_failures = 0;
        self.clear_fetch_attention();
        self.end_attempt();
        Ok(())
    }

    fn skip_rejected(&mut self, _tip: CommitId) -> ActionResult {
        self.memory.transient_failures = 0;
        self.clear_fetch_attention();
        self.end_attempt();
        Ok(())
    }

    fn return_to_ready(&mut self, tip: CommitId) -> ActionResult {
        self.memory.transient_failures = 0;
        self.clear_fetch_attention();
        let pulled_on_boot = self.memory.attempt.as_ref().and_then(|attempt| attempt.pulled_on_boot);
        self.commands.push(StackCommand::AwaitPolicy { commit: tip, pulled_on_boot });
        Ok(())
    }

    fn start_attempt(&mut self, tip: CommitId) -> ActionResult {
        self.memory.transient_failures = 0;
        self.clear_fetch_attention();
        self.memory.attempts_started += 1;
        self.memory.resumes = 0;
        self.memory.attempt = Some(Attempt { number: self.memory.attempts_started, target: tip, plan: None, pulled: None, pulled_on_boot: None });
        self.commands.push(StackCommand::Validate { commit: tip });
        Ok(())
    }

    fn retry_later(&mut self, _failure: Failure) -> ActionResult {
        self.memory.transient_failures = self.memory.transient_failures.saturating_add(1);
        self.memory.resumes = 0;
        self.commands.push(StackCommand::BackOff { failures: self.memory.transient_failures });
        Ok(())
    }

    /// Backs off like [`Self::retry_later`] and marks the device as needing
    /// attention, unless a failed factory reset already did.
    fn retry_needing_attention(&mut self, failure: Failure) -> ActionResult {
        if self.memory.needs_attention.is_none() {
            self.memory.needs_attention = Some(failure.message.clone());
        }
        self.retry_later(failure)
    }

    /// Leaves the attempt and the failure counters unchanged, because a
    /// certificate that fails only because the clock is wrong is no fault of
    /// the commit or the registry. The next poll tries the commit again.
    fn wait_for_clock(&mut self, _failure: Failure) -> ActionResult {
        self.memory.resumes = 0;
        Ok(())
    }

    fn abandon_after_crashes(&mut self) -> ActionResult {
        self.reject_current_target("the agent restarted too often during this step");
        self.end_attempt();
        Ok(())
    }

    fn start_pull(&mut self, plan: StackPlan) -> ActionResult {
        let attempt = self.memory.attempt.as_mut().ok_or(())?;
        attempt.plan = Some(plan.clone());
        let commit = attempt.target;
        self.commands.push(StackCommand::Pull { commit, plan });
        Ok(())
    }

    fn reject_target(&mut self, failure: Failure) -> ActionResult {
        self.reject_current_target(&failure.message);
        self.memory.transient_failures = 0;
        self.end_attempt();
        Ok(())
    }

    fn revalidate(&mut self) -> ActionResult {
        self.memory.resumes += 1;
        let commit = self.target().ok_or(())?;
        self.commands.push(StackCommand::Validate { commit });
        Ok(())
    }

    fn hold_for_policy(&mut self, pulled: Release) -> ActionResult {
        let boot_id = self.facts.boot_id;
        let attempt = self.memory.attempt.as_mut().ok_or(())?;
        let commit = attempt.target;
        attempt.pulled = Some(pulled);
        attempt.pulled_on_boot = Some(boot_id);
        self.memory.transient_failures = 0;
        self.commands.push(StackCommand::AwaitPolicy { commit, pulled_on_boot: Some(boot_id) });
        Ok(())
    }

    fn repull(&mut self) -> ActionResult {
        self.memory.resumes += 1;
        let attempt = self.memory.attempt.as_ref().ok_or(())?;
        let command = StackCommand::Pull { commit: attempt.target, plan: attempt.plan.clone().ok_or(())? };
        self.commands.push(command);
        Ok(())
    }

    fn await_policy(&mut self) -> ActionResult {
        let attempt = self.memory.attempt.as_ref().ok_or(())?;
        let command = StackCommand::AwaitPolicy { commit: attempt.target, pulled_on_boot: attempt.pulled_on_boot };
        self.commands.push(command);
        Ok(())
    }

    fn start_apply(&mut self) -> ActionResult {
        self.memory.resumes = 0;
        self.queue_apply()
    }

    fn reapply(&mut self) -> ActionResult {
        self.memory.resumes += 1;
        self.queue_apply()
    }

    fn start_probation(&mut self) -> ActionResult {
        let release = self.pulled_release().ok_or(())?;
        self.memory.running = Some(release.clone());
        self.commands.push(StackCommand::WatchHealth { release, purpose: ApplyPurpose::Update });
        Ok(())
    }

    fn rewatch(&mut self) -> ActionResult {
        self.memory.resumes += 1;
        let release = self.pulled_release().ok_or(())?;
        self.commands.push(StackCommand::WatchHealth { release, purpose: ApplyPurpose::Update });
        Ok(())
    }

    fn revert_after_failure(&mut self, failure: Failure) -> ActionResult {
        self.reject_current_target(&failure.message);
        self.queue_revert()
    }

    fn revert_after_crashes(&mut self) -> ActionResult {
        self.reject_current_target("the agent restarted too often while applying this commit");
        self.queue_revert()
    }

    fn reset_after_failure(&mut self, failure: Failure) -> ActionResult {
        self.reject_current_target(&failure.message);
        let reason = self.factory_reset_reason(&failure.message);
        self.queue_factory_reset(reason);
        Ok(())
    }

    fn reset_after_crashes(&mut self) -> ActionResult {
        self.reject_current_target("the agent restarted too often while applying this commit");
        let reason = self.factory_reset_reason("the agent restarted too often");
        self.queue_factory_reset(reason);
        Ok(())
    }

    fn accept_target(&mut self) -> ActionResult {
        let release = self.pulled_release().ok_or(())?;
        let previous = self.memory.known_good.replace(release.clone());
        self.memory.running = Some(release.clone());
        self.memory.rejected = None;
        self.memory.needs_attention = None;
        self.memory.last_outcome = Some(Outcome::Applied { commit: release.commit });
        self.end_attempt();
        let release_previous = previous.filter(|previous| previous != &release);
        self.commands.push(StackCommand::KeepImages { keep: release, release: release_previous });
        Ok(())
    }

    fn repeat_revert(&mut self) -> ActionResult {
        self.memory.resumes += 1;
        let release = self.memory.known_good.clone().ok_or(())?;
        self.commands.push(StackCommand::Apply { release, purpose: ApplyPurpose::Revert });
        Ok(())
    }

    fn start_revert_probation(&mut self) -> ActionResult {
        let release = self.memory.known_good.clone().ok_or(())?;
        self.memory.running = Some(release.clone());
        self.commands.push(StackCommand::WatchHealth { release, purpose: ApplyPurpose::Revert });
        Ok(())
    }

    fn finish_rollback(&mut self) -> ActionResult {
        let restored = self.memory.known_good.as_ref().ok_or(())?.commit;
        let failed = self.target().unwrap_or(restored);
        self.memory.last_outcome = Some(Outcome::RolledBack { failed, restored });
        self.end_attempt();
        Ok(())
    }

    fn rewatch_revert(&mut self) -> ActionResult {
        self.memory.resumes += 1;
        let release = self.memory.known_good.clone().ok_or(())?;
        self.commands.push(StackCommand::WatchHealth { release, purpose: ApplyPurpose::Revert });
        Ok(())
    }

    fn finish_factory_reset(&mut self) -> ActionResult {
        let reason = self.memory.factory_reset_reason.take().unwrap_or_default();
        self.memory.factory_resets += 1;
        self.memory.running = None;
        self.memory.known_good = None;
        self.memory.last_outcome = Some(Outcome::FactoryReset { reason });
        self.end_attempt();
        Ok(())
    }

    fn repeat_factory_reset(&mut self) -> ActionResult {
        self.memory.resumes += 1;
        let reason = self.memory.factory_reset_reason.clone().unwrap_or_default();
        self.commands.push(StackCommand::FactoryReset { reason });
        Ok(())
    }

    fn give_up(&mut self, failure: Failure) -> ActionResult {
        self.memory.factory_reset_reason = None;
        let reason = format!("factory reset failed: {}", failure.message);
        self.memory.needs_attention = Some(reason.clone());
        self.memory.last_outcome = Some(Outcome::GaveUp { reason });
        self.end_attempt();
        Ok(())
    }

    fn give_up_after_crashes(&mut self) -> ActionResult {
        self.memory.factory_reset_reason = None;
        let reason = "the agent restarted too often during the factory reset".to_string();
        self.memory.needs_attention = Some(reason.clone());
        self.memory.last_outcome = Some(Outcome::GaveUp { reason });
        self.end_attempt();
        Ok(())
    }
}

/// Result of feeding one event to the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub from: StackState,
    pub event: StackEvent,
    pub to: StackState,
    /// Commands to run once the transition is persisted.
    pub commands: Vec<StackCommand>,
    /// The failure the event reported, if any; the driver records it as the
    /// machine's last error.
    pub failure: Option<Failure>,
    /// Whether the machine's memory changed and must be persisted.
    pub memory_changed: bool,
    /// Number of the attempt the step belongs to, 0 outside any attempt.
    pub attempt: u32,
    /// The commit that attempt moves to.
    pub target: Option<CommitId>,
}

/// Error for an event the current state does not take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the stack machine in state {state:?} does not take event {event:?}")]
pub struct UnexpectedEvent {
    pub state: StackState,
    pub event: StackEvent,
}

/// The stack machine with its context: the only way the driver changes it.
pub struct StackMachine {
    inner: StackStateMachine<StackContext>,
}

impl StackMachine {
    /// Builds a machine in `state` with persisted `memory`, as after a restart.
    pub fn restore(state: StackState, memory: StackMemory, settings: StackSettings) -> Self {
        let context = StackContext { memory, facts: StackFacts::default(), settings, commands: Vec::new() };
        StackMachine { inner: StackStateMachine::new_with_state(context, state.into()) }
    }

    pub fn state(&self) -> StackState {
        self.inner.state().into()
    }

    pub fn memory(&self) -> &StackMemory {
        &self.inner.context().memory
    }

    /// Feeds one event. On success the machine has moved and the returned
    /// step lists the commands to run after persisting it. On error the
    /// machine, its memory and its queue are unchanged.
    pub fn handle(&mut self, event: StackEvents, facts: StackFacts) -> Result<Step, UnexpectedEvent> {
        let from = self.state();
        let event_code = StackEvent::from(&event);
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
        let target = current.map(|attempt| attempt.target);
        Ok(Step { from, event: event_code, to: self.state(), commands, failure, memory_changed, attempt, target })
    }
}

fn failure_of(event: &StackEvents) -> Option<Failure> {
    match event {
        StackEvents::FetchFailed(failure)
        | StackEvents::Invalid(failure)
        | StackEvents::PullFailed(failure)
        | StackEvents::ApplyFailed(failure)
        | StackEvents::GateFailed(failure)
        | StackEvents::ResetFailed(failure) => Some(failure.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Digest, ServiceImage};

    fn commit(byte: u8) -> CommitId {
        CommitId([byte; 20])
    }

    fn plan() -> StackPlan {
        StackPlan { services: vec![PlannedService { service: "web".into(), image: "r:5000/web:1".into() }] }
    }

    fn release(byte: u8) -> Release {
        Release { commit: commit(byte), services: vec![ServiceImage { service: "web".into(), image: "r:5000/web:1".into(), digest: Digest([byte; 32]) }] }
    }

    fn facts() -> StackFacts {
        StackFacts { boot_id: [9; 16] }
    }

    fn run(machine: &mut StackMachine, events: Vec<StackEvents>) -> Vec<(StackState, StackEvent, StackState)> {
        events
            .into_iter()
            .map(|event| {
                let step = machine.handle(event, facts()).expect("every event in these scenarios is expected");
                (step.from, step.event, step.to)
            })
            .collect()
    }

    fn fresh() -> StackMachine {
        StackMachine::restore(StackState::Idle, StackMemory::default(), StackSettings::default())
    }

    fn update_events(byte: u8) -> Vec<StackEvents> {
        vec![
            StackEvents::Poll,
            StackEvents::TipFetched(commit(byte)),
            StackEvents::Valid(plan()),
            StackEvents::Pulled(release(byte)),
            StackEvents::PolicyAllows,
            StackEvents::Applied,
            StackEvents::GatePassed,
        ]
    }

    #[test]
    fn first_commit_is_applied_and_kept() {
        use StackState::*;
        let mut machine = fresh();

        let visited = run(&mut machine, update_events(1));

        let states: Vec<StackState> = visited.iter().map(|step| step.2).collect();
        assert_eq!(states, vec![Fetching, Validating, Pulling, Ready, Applying, Probation, Idle]);
        assert_eq!(machine.memory().known_good, Some(release(1)));
        assert_eq!(machine.memory().running, Some(release(1)));
        assert_eq!(machine.memory().attempt, None);
    }

    #[test]
    fn same_tip_returns_to_idle() {
        let mut machine = fresh();
        run(&mut machine, update_events(1));

        let visited = run(&mut machine, vec![StackEvents::Poll, StackEvents::TipFetched(commit(1))]);

        assert_eq!(visited[1].2, StackState::Idle);
    }

    #[test]
    fn missing_image_rejects_until_branch_moves() {
        let mut machine = fresh();
        run(&mut machine, update_events(1));

        run(&mut machine, vec![StackEvents::Poll, StackEvents::TipFetched(commit(2)), StackEvents::Valid(plan())]);
        let step = machine.handle(StackEvents::PullFailed(Failure::rejected("image missing")), facts()).unwrap();
        let again = run(&mut machine, vec![StackEvents::Poll, StackEvents::TipFetched(commit(2))]);
        let moved = run(&mut machine, vec![StackEvents::Poll, StackEvents::TipFetched(commit(3))]);

        assert_eq!(step.to, StackState::Idle);
        assert_eq!(machine.memory().known_good, Some(release(1)));
        assert_eq!(again[1].2, StackState::Idle);
        assert_eq!(moved[1].2, StackState::Validating);
    }

    #[test]
    fn transient_pull_failure_backs_off_without_rejecting() {
        let mut machine = fresh();
        run(&mut machine, vec![StackEvents::Poll, StackEvents::TipFetched(commit(1)), StackEvents::Valid(plan())]);

        let step = machine.handle(StackEvents::PullFailed(Failure::transient("registry down")), facts()).unwrap();
        let retried = run(&mut machine, vec![StackEvents::Poll, StackEvents::TipFetched(commit(1))]);

        assert_eq!(step.commands, vec![StackCommand::BackOff { failures: 1 }]);
        assert_eq!(machine.memory().rejected, None);
        assert_eq!(retried[1].2, StackState::Validating);
    }

    #[test]
    fn clock_problem_keeps_commit_without_failure() {
        let mut machine = fresh();
        run(&mut machine, update_events(1));
        run(&mut machine, vec![StackEvents::Poll, StackEvents::TipFetched(commit(2)), StackEvents::Valid(plan())]);
        let before = machine.memory().clone();

        let step = machine.handle(StackEvents::PullFailed(Failure::clock("certificate is not yet valid")), facts()).unwrap();

        assert_eq!(step.to, StackState::Idle);
        assert_eq!(step.commands, vec![]);
        assert_eq!(machine.memory().rejected, None);
        assert_eq!(machine.memory().transient_failures, before.transient_failures);
        assert_eq!(machine.memory().attempt, before.attempt, "the commit stays the target");
        assert_eq!(machine.memory().known_good, Some(release(1)));
        assert_eq!(machine.memory().last_outcome, before.last_outcome);
    }

    #[test]
    fn failed_gate_reverts_to_known_good() {
        let mut machine = fresh();
        run(&mut machine, update_events(1));
        let mut events = update_events(2);
        events.pop();
        run(&mut machine, events);

        let step = machine.handle(StackEvents::GateFailed(Failure::rejected("web exited")), facts()).unwrap();
        let applied = machine.handle(StackEvents::Applied, facts()).unwrap();
        let done = machine.handle(StackEvents::GatePassed, facts()).unwrap();

        assert_eq!(step.to, StackState::Reverting);
        assert_eq!(step.commands, vec![StackCommand::Apply { release: release(1), purpose: ApplyPurpose::Revert }]);
        assert_eq!(applied.to, StackState::RevertProbation);
        assert_eq!(done.to, StackState::Idle);
        assert_eq!(machine.memory().rejected.as_ref().map(|rejection| rejection.commit), Some(commit(2)));
        assert_eq!(machine.memory().last_outcome, Some(Outcome::RolledBack { failed: commit(2), restored: commit(1) }));
    }

    #[test]
    fn failed_revert_starts_factory_reset() {
        let mut machine = fresh();
        run(&mut machine, update_events(1));
        let mut events = update_events(2);
        events.pop();
        run(&mut machine, events);
        machine.handle(StackEvents::GateFailed(Failure::rejected("web exited")), facts()).unwrap();
        machine.handle(StackEvents::Applied, facts()).unwrap();

        let step = machine.handle(StackEvents::GateFailed(Failure::rejected("web exited again")), facts()).unwrap();
        let done = machine.handle(StackEvents::ResetDone, facts()).unwrap();

        assert_eq!(step.to, StackState::FactoryReset);
        assert!(matches!(&step.commands[0], StackCommand::FactoryReset { reason } if reason.contains("known-good commit")));
        assert_eq!(done.to, StackState::Idle);
        assert_eq!(machine.memory().known_good, None);
        assert_eq!(machine.memory().factory_resets, 1);
    }

    #[test]
    fn crash_loop_ends_in_failure_path() {
        let mut machine = fresh();
        run(&mut machine, update_events(1));
        let mut events = update_events(2);
        events.truncate(5);
        run(&mut machine, events);
        assert_eq!(machine.state(), StackState::Applying);

        let mut states = Vec::new();
        for _ in 0..10 {
            states.push(machine.handle(StackEvents::Resumed, facts()).unwrap().to);
        }

        assert_eq!(&states[..5], &[StackState::Applying; 5]);
        assert_eq!(states[5], StackState::Reverting);
        assert!(!states[6..].contains(&StackState::Applying));
    }

    #[test]
    fn changed_host_key_needs_attention_until_fetch_works() {
        let mut machine = fresh();
        run(&mut machine, update_events(1));
        run(&mut machine, vec![StackEvents::Poll]);

        let failed = machine.handle(StackEvents::FetchFailed(Failure::attention("host key changed")), facts()).unwrap();
        let attention = machine.memory().needs_attention.clone();
        let again = run(&mut machine, vec![StackEvents::Poll, StackEvents::FetchFailed(Failure::attention("host key changed"))]);
        let fixed = run(&mut machine, vec![StackEvents::Poll, StackEvents::TipFetched(commit(1))]);

        assert_eq!(failed.to, StackState::Idle);
        assert_eq!(failed.commands, vec![StackCommand::BackOff { failures: 1 }]);
        assert_eq!(attention.as_deref(), Some("host key changed"));
        assert_eq!(again[1].2, StackState::Idle);
        assert_eq!(fixed[1].2, StackState::Idle);
        assert_eq!(machine.memory().needs_attention, None);
        assert_eq!(machine.memory().running, Some(release(1)), "the running release is untouched");
    }

    #[test]
    fn fetch_success_keeps_factory_reset_attention() {
        let memory = StackMemory {
            needs_attention: Some("factory reset failed: x".into()),
            last_outcome: Some(Outcome::GaveUp { reason: "factory reset failed: x".into() }),
            ..StackMemory::default()
        };
        let mut machine = StackMachine::restore(StackState::Idle, memory, StackSettings::default());

        run(&mut machine, vec![StackEvents::Poll, StackEvents::FetchFailed(Failure::attention("host key changed"))]);
        run(&mut machine, vec![StackEvents::Poll, StackEvents::TipFetched(commit(1))]);

        assert_eq!(machine.memory().needs_attention.as_deref(), Some("factory reset failed: x"));
    }

    #[test]
    fn unexpected_event_changes_nothing() {
        let mut machine = fresh();
        let before = machine.memory().clone();

        let error = machine.handle(StackEvents::GatePassed, facts()).unwrap_err();

        assert_eq!(error.state, StackState::Idle);
        assert_eq!(machine.state(), StackState::Idle);
        assert_eq!(machine.memory(), &before);
    }

    #[test]
    fn table_lists_every_state() {
        let codes: Vec<u8> = STACK_TABLE.states.iter().map(|state| state.code).collect();
        let expected: Vec<u8> = StackState::ALL.iter().map(|state| state.code()).collect();
        assert_eq!(codes, expected);
        assert_eq!(STACK_TABLE.start, StackState::Idle.code());
    }
}
