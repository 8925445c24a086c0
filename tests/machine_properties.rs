//! Property tests on the pure state machines: random event sequences, each
//! step checked against the machine's constant transition table, restarts at
//! every reached state, and failure paths driven to quiescence.
//!
//! Every event is drawn from a small pool of payloads per machine, so the
//! sequences hit guards on both sides (running tip, rejected tip, failed job,
//! unchanged boot id, low and healthy samples) without random strings.

use eventpi_autoupdate::machine::MachineTable;
use eventpi_autoupdate::machine::host::{
    BootReport, HOST_TABLE, HostEvent, HostEvents, HostFacts, HostJob, HostMachine, HostMemory, HostSettings, HostState, Interruption, JobKind, JobReport,
    JobStatus, KernelReport, RebootCheck,
};
use eventpi_autoupdate::machine::selfupdate::{
    Acceptance, BootTime, ContainerRef, RetireReport, SELF_UPDATE_TABLE, SelfUpdateEvent, SelfUpdateEvents, SelfUpdateFacts, SelfUpdateMachine,
    SelfUpdateMemory, SelfUpdateSettings, SelfUpdateState, Target,
};
use eventpi_autoupdate::machine::space::{
    Marks, Moment, Reading, ReclaimReport, Role, SPACE_TABLE, Sample, SpaceEvent, SpaceEvents, SpaceMachine, SpaceMemory, SpaceSettings, SpaceState,
};
use eventpi_autoupdate::machine::stack::{
    PlannedService, STACK_TABLE, StackEvent, StackEvents, StackFacts, StackMachine, StackMemory, StackPlan, StackSettings, StackState,
};
use eventpi_autoupdate::model::{CommitId, Digest, Failure, Release, ServiceImage};
use proptest::prelude::*;

/// Steps allowed to reach a resting state with success events only.
const QUIESCENCE_STEPS: usize = 60;

/// Maximum length of a random event sequence.
const MAX_EVENTS: usize = 48;

/// The codes of one step: from state, event and to state.
type StepCodes = (u8, u8, u8);

/// Feeds one pool event to a machine.
type Feed<S> = Box<dyn FnOnce(&mut S) -> Result<StepCodes, String>>;

/// What the properties need from one machine.
trait Subject: Sized {
    const TABLE: &'static MachineTable;

    fn fresh() -> Self;

    /// Rebuilds the machine from its persisted state and memory, as the agent
    /// does after a restart.
    fn restarted(&self) -> Self;

    fn state_code(&self) -> u8;

    /// Number of event payloads in the pool.
    fn pool_size() -> usize;

    /// Builds event `index` of the pool, with its persisted event code.
    fn event(index: usize) -> (u8, Feed<Self>);

    /// Tells whether pool event `index` carries a payload that the machine
    /// rejects on purpose, even in a state whose table row takes the event.
    fn may_be_rejected(_index: usize) -> bool {
        false
    }

    /// Event code of `Resumed`.
    fn resumed_code() -> u8;

    /// Feeds `Resumed`, returning (from, event, to) or the error.
    fn resume(&mut self) -> Result<StepCodes, String>;

    /// Pool indices of the events that report a failure.
    fn failure_events() -> Vec<usize>;

    /// Pool indices of the events that start an attempt.
    fn trigger_events() -> Vec<usize>;

    /// Pool indices of the events that report success, in the order the
    /// quiescence driver tries them.
    fn success_events() -> Vec<usize>;

    /// States between attempts, where the machine waits for its next trigger.
    fn is_resting(&self) -> bool;

    /// Names of the resting states.
    fn resting_states() -> &'static [&'static str];

    /// Names of the states whose command cannot report a failure.
    fn without_failure_event() -> &'static [&'static str];

    /// Tells whether a resting machine is in a known-good or reset condition,
    /// or returns why not.
    fn check_settled(&self) -> Result<(), String>;
}

fn commit(byte: u8) -> CommitId {
    CommitId([byte; 20])
}

fn release(byte: u8) -> Release {
    Release {
        commit: commit(byte),
        services: vec![ServiceImage { service: "web".into(), image: format!("registry.test/web:{byte}"), digest: Digest([byte; 32]) }],
    }
}

fn plan() -> StackPlan {
    StackPlan { services: vec![PlannedService { service: "web".into(), image: "registry.test/web:1".into() }] }
}

struct Stack(StackMachine);

impl Subject for Stack {
    const TABLE: &'static MachineTable = &STACK_TABLE;

    fn fresh() -> Self {
        Stack(StackMachine::restore(StackState::Idle, StackMemory::default(), StackSettings::default()))
    }

    fn restarted(&self) -> Self {
        Stack(StackMachine::restore(self.0.state(), self.0.memory().clone(), StackSettings::default()))
    }

    fn state_code(&self) -> u8 {
        self.0.state().code()
    }

    fn pool_size() -> usize {
        22
    }

    fn event(index: usize) -> (u8, Feed<Self>) {
        let event = match index {
            0 => StackEvents::Poll,
            1 => StackEvents::Resumed,
            2 => StackEvents::TipFetched(commit(1)),
            3 => StackEvents::TipFetched(commit(2)),
            4 => StackEvents::TipFetched(commit(3)),
            5 => StackEvents::FetchFailed(Failure::transient("git server unreachable")),
            6 => StackEvents::FetchFailed(Failure::attention("host key changed")),
            7 => StackEvents::Valid(plan()),
            8 => StackEvents::Invalid(Failure::rejected("compose file invalid")),
            9 => StackEvents::Invalid(Failure::transient("docker compose timed out")),
            10 => StackEvents::Pulled(release(1)),
            11 => StackEvents::Pulled(release(2)),
            12 => StackEvents::PullFailed(Failure::rejected("image not found")),
            13 => StackEvents::PullFailed(Failure::transient("registry unreachable")),
            14 => StackEvents::PullFailed(Failure::clock("certificate is not yet valid")),
            15 => StackEvents::PolicyAllows,
            16 => StackEvents::Applied,
            17 => StackEvents::ApplyFailed(Failure::rejected("compose up failed")),
            18 => StackEvents::GatePassed,
            19 => StackEvents::GateFailed(Failure::rejected("web exited")),
            20 => StackEvents::ResetDone,
            21 => StackEvents::ResetFailed(Failure::rejected("reset script failed")),
            _ => unreachable!("pool has {} events", Self::pool_size()),
        };
        let code = StackEvent::from(&event).code();
        (code, Box::new(move |machine: &mut Self| feed_stack(machine, event)))
    }

    fn resumed_code() -> u8 {
        StackEvent::Resumed.code()
    }

    fn resume(&mut self) -> Result<StepCodes, String> {
        feed_stack(self, StackEvents::Resumed)
    }

    fn failure_events() -> Vec<usize> {
        vec![5, 6, 8, 9, 12, 13, 14, 17, 19, 21]
    }

    fn trigger_events() -> Vec<usize> {
        vec![0]
    }

    fn success_events() -> Vec<usize> {
        // The tip fetched is the pulled release's commit, so an attempt in
        // progress goes on instead of starting over.
        vec![2, 7, 10, 15, 16, 18, 20]
    }

    fn is_resting(&self) -> bool {
        self.0.state() == StackState::Idle
    }

    fn resting_states() -> &'static [&'static str] {
        &["Idle"]
    }

    /// `Ready` waits for the apply policy, which has no failure: a new poll
    /// or a restart leaves it.
    fn without_failure_event() -> &'static [&'static str] {
        &["Ready"]
    }

    fn check_settled(&self) -> Result<(), String> {
        let memory = self.0.memory();
        let gave_up = matches!(memory.last_outcome, Some(eventpi_autoupdate::machine::stack::Outcome::GaveUp { .. }));
        if memory.running != memory.known_good && !gave_up {
            return Err(format!("idle with running {:?} but known-good {:?}", memory.running, memory.known_good));
        }
        if memory.factory_reset_reason.is_some() {
            return Err("idle with a factory reset still in progress".into());
        }
        Ok(())
    }
}

fn feed_stack(machine: &mut Stack, event: StackEvents) -> Result<StepCodes, String> {
    let step = machine.0.handle(event, StackFacts { boot_id: [3; 16] }).map_err(|error| error.to_string())?;
    Ok((step.from.code(), step.event.code(), step.to.code()))
}

const BOOT_A: &str = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
const BOOT_B: &str = "7c9e6679-7425-40de-944b-e07fc1f90ae7";

fn kernels(running: &str) -> KernelReport {
    KernelReport { running: running.into(), installed: vec!["6.6.51+rpt-rpi-v8".into(), "6.6.62+rpt-rpi-v8".into()] }
}

fn job_report(kind: JobKind, status: JobStatus) -> JobReport {
    JobReport { job: HostJob { id: "job-1".into(), kind }, status, output_tail: String::new() }
}

struct Host(HostMachine);

impl Subject for Host {
    const TABLE: &'static MachineTable = &HOST_TABLE;

    fn fresh() -> Self {
        Host(HostMachine::restore(HostState::Idle, HostMemory::default(), HostSettings::default()))
    }

    fn restarted(&self) -> Self {
        Host(HostMachine::restore(self.0.state(), self.0.memory().clone(), HostSettings::default()))
    }

    fn state_code(&self) -> u8 {
        self.0.state().code()
    }

    fn pool_size() -> usize {
        17
    }

    fn event(index: usize) -> (u8, Feed<Self>) {
        let event = match index {
            0 => HostEvents::Start,
            1 => HostEvents::Resumed,
            2 => HostEvents::Connected,
            3 => HostEvents::Unreachable(Failure::transient("connection refused")),
            4 => HostEvents::HostKeyRejected(Failure::attention("host key mismatch")),
            5 => HostEvents::CommandFailed(Failure::transient("command failed")),
            6 => HostEvents::PreflightPassed,
            7 => HostEvents::RepairNeeded(Interruption { description: "dpkg was interrupted".into() }),
            8 => HostEvents::DpkgBusy(Failure::transient("dpkg lock held")),
            9 => HostEvents::JobFinished(job_report(JobKind::Upgrade, JobStatus::Succeeded)),
            10 => HostEvents::JobFinished(job_report(JobKind::Upgrade, JobStatus::Failed { exit_code: 100 })),
            11 => HostEvents::JobFinished(job_report(JobKind::Upgrade, JobStatus::Lost)),
            12 => {
                HostEvents::RebootRequired(RebootCheck { boot_id: BOOT_A.into(), kernels: kernels("6.6.51+rpt-rpi-v8"), reasons: vec!["linux-image".into()] })
            }
            13 => HostEvents::RebootNotRequired,
            14 => HostEvents::RebootIssued,
            15 => HostEvents::BootVerified(BootReport { boot_id: BOOT_B.into(), kernels: kernels("6.6.62+rpt-rpi-v8") }),
            16 => HostEvents::BootVerified(BootReport { boot_id: BOOT_A.into(), kernels: kernels("6.6.51+rpt-rpi-v8") }),
            _ => unreachable!("pool has {} events", Self::pool_size()),
        };
        let code = HostEvent::from(&event).code();
        (code, Box::new(move |machine: &mut Self| feed_host(machine, event)))
    }

    fn resumed_code() -> u8 {
        HostEvent::Resumed.code()
    }

    fn resume(&mut self) -> Result<StepCodes, String> {
        feed_host(self, HostEvents::Resumed)
    }

    fn failure_events() -> Vec<usize> {
        vec![3, 4, 5, 8, 10, 11, 16]
    }

    fn trigger_events() -> Vec<usize> {
        vec![0]
    }

    fn success_events() -> Vec<usize> {
        vec![2, 6, 9, 13, 14, 15]
    }

    fn is_resting(&self) -> bool {
        self.0.is_resting()
    }

    fn resting_states() -> &'static [&'static str] {
        &["Idle", "Done", "Failed"]
    }

    fn without_failure_event() -> &'static [&'static str] {
        &[]
    }

    fn check_settled(&self) -> Result<(), String> {
        let memory = self.0.memory();
        if let Some(attempt) = &memory.attempt
            && attempt.reboots > HostSettings::default().max_reboots
        {
            return Err(format!("attempt {} rebooted {} times", attempt.number, attempt.reboots));
        }
        if memory.last_outcome.is_none() && self.0.state() != HostState::Idle {
            return Err(format!("resting in {:?} without an outcome", self.0.state()));
        }
        Ok(())
    }
}

fn feed_host(machine: &mut Host, event: HostEvents) -> Result<StepCodes, String> {
    let step = machine.0.handle(event, HostFacts { nonce: 7 }).map_err(|error| error.to_string())?;
    Ok((step.from.code(), step.event.code(), step.to.code()))
}

const GIB: u64 = 1 << 30;

fn reading(role: Role, free_percent: u64) -> Reading {
    Reading {
        role,
        path: format!("/srv/{}", role.name()),
        total_bytes: 100 * GIB,
        free_bytes: free_percent * GIB,
        total_inodes: 1000,
        free_inodes: 500,
        marks: Marks { stop_below_percent: 15.0, resume_above_percent: 20.0, stop_below_inodes_percent: 5.0, resume_above_inodes_percent: 10.0 },
        reclaim_helps: role == Role::Docker,
    }
}

fn space_sample(recordings: u64, docker: u64, minute: u64) -> Sample {
    Sample {
        readings: vec![reading(Role::Recordings, recordings), reading(Role::Docker, docker)],
        forecast: None,
        now: Moment { boot_id: [5; 16], monotonic_ms: minute * 60_000 },
    }
}

fn space_settings() -> SpaceSettings {
    SpaceSettings { has_recorder: true, recorder_service: Some("recorder".into()), ..SpaceSettings::default() }
}

struct Space(SpaceMachine);

impl Subject for Space {
    const TABLE: &'static MachineTable = &SPACE_TABLE;

    fn fresh() -> Self {
        Space(SpaceMachine::restore(SpaceState::Watching, SpaceMemory::default(), space_settings()))
    }

    fn restarted(&self) -> Self {
        Space(SpaceMachine::restore(self.0.state(), self.0.memory().clone(), space_settings()))
    }

    fn state_code(&self) -> u8 {
        self.0.state().code()
    }

    fn pool_size() -> usize {
        12
    }

    fn event(index: usize) -> (u8, Feed<Self>) {
        let event = match index {
            0 => SpaceEvents::Sampled(space_sample(50, 50, 1)),
            1 => SpaceEvents::Sampled(space_sample(5, 50, 2)),
            2 => SpaceEvents::Sampled(space_sample(50, 5, 40)),
            3 => SpaceEvents::Sampled(space_sample(17, 50, 80)),
            4 => SpaceEvents::Resumed,
            5 => SpaceEvents::RecorderStopped,
            6 => SpaceEvents::RecorderStopFailed(Failure::transient("docker stop timed out")),
            7 => SpaceEvents::Reclaimed(ReclaimReport { freed_bytes: 10 * GIB, sample: space_sample(50, 50, 100) }),
            8 => SpaceEvents::Reclaimed(ReclaimReport { freed_bytes: 0, sample: space_sample(5, 5, 120) }),
            9 => SpaceEvents::ReclaimFailed(Failure::transient("prune failed")),
            10 => SpaceEvents::RecorderStarted,
            11 => SpaceEvents::RecorderStartFailed(Failure::transient("docker start failed")),
            _ => unreachable!("pool has {} events", Self::pool_size()),
        };
        let code = SpaceEvent::from(&event).code();
        (code, Box::new(move |machine: &mut Self| feed_space(machine, event)))
    }

    fn resumed_code() -> u8 {
        SpaceEvent::Resumed.code()
    }

    fn resume(&mut self) -> Result<StepCodes, String> {
        feed_space(self, SpaceEvents::Resumed)
    }

    fn failure_events() -> Vec<usize> {
        vec![6, 9, 11]
    }

    fn trigger_events() -> Vec<usize> {
        vec![1, 2]
    }

    fn success_events() -> Vec<usize> {
        vec![5, 7, 10]
    }

    /// Watching and Holding wait for the next sample. Holding keeps the
    /// recorder stopped until space comes back.
    fn is_resting(&self) -> bool {
        matches!(self.0.state(), SpaceState::Watching | SpaceState::Holding)
    }

    fn resting_states() -> &'static [&'static str] {
        &["Watching", "Holding"]
    }

    fn without_failure_event() -> &'static [&'static str] {
        &[]
    }

    fn check_settled(&self) -> Result<(), String> {
        let memory = self.0.memory();
        if self.0.state() == SpaceState::Watching && memory.hold.is_some() {
            return Err(format!("watching while the recorder is held: {:?}", memory.hold));
        }
        Ok(())
    }
}

fn feed_space(machine: &mut Space, event: SpaceEvents) -> Result<StepCodes, String> {
    let step = machine.0.handle(event).map_err(|error| error.to_string())?;
    Ok((step.from.code(), step.event.code(), step.to.code()))
}

fn self_update_target(byte: u8) -> Target {
    Target {
        image: "registry.test/autoupdate:latest".into(),
        digest: Digest([byte; 32]),
        running: Some(Digest([1; 32])),
        old: ContainerRef { id: "a".repeat(64), name: "autoupdate".into() },
    }
}

struct SelfUpdate(SelfUpdateMachine);

impl Subject for SelfUpdate {
    const TABLE: &'static MachineTable = &SELF_UPDATE_TABLE;

    fn fresh() -> Self {
        SelfUpdate(SelfUpdateMachine::restore(SelfUpdateState::Idle, SelfUpdateMemory::default(), SelfUpdateSettings::default()))
    }

    fn restarted(&self) -> Self {
        SelfUpdate(SelfUpdateMachine::restore(self.0.state(), self.0.memory().clone(), SelfUpdateSettings::default()))
    }

    fn state_code(&self) -> u8 {
        self.0.state().code()
    }

    fn pool_size() -> usize {
        20
    }

    /// Returns whether the event at `index` may be rejected: an acceptance
    /// for an epoch that was not offered is stale.
    fn may_be_rejected(index: usize) -> bool {
        index == 19
    }

    fn event(index: usize) -> (u8, Feed<Self>) {
        let event = match index {
            0 => SelfUpdateEvents::Check,
            1 => SelfUpdateEvents::Resumed,
            2 => SelfUpdateEvents::UpToDate(Digest([1; 32])),
            3 => SelfUpdateEvents::NewDigest(self_update_target(2)),
            4 => SelfUpdateEvents::CheckFailed(Failure::transient("registry unreachable")),
            5 => SelfUpdateEvents::Pulled,
            6 => SelfUpdateEvents::PullFailed(Failure::transient("pull failed")),
            7 => SelfUpdateEvents::Created(ContainerRef { id: "b".repeat(64), name: "autoupdate-candidate-1".into() }),
            8 => SelfUpdateEvents::CreateFailed(Failure::transient("create failed")),
            9 => SelfUpdateEvents::Ready(42),
            10 => SelfUpdateEvents::StartFailed(Failure::transient("candidate did not start")),
            11 => SelfUpdateEvents::Accepted(Acceptance { epoch: 42, holder: "b".repeat(12) }),
            12 => SelfUpdateEvents::HandoverFailed(Failure::transient("handover timed out")),
            13 => SelfUpdateEvents::Confirmed,
            14 => SelfUpdateEvents::TakenBack(Failure::transient("no confirmation in time")),
            15 => SelfUpdateEvents::Retired(RetireReport::default()),
            16 => SelfUpdateEvents::Removed,
            17 => SelfUpdateEvents::AlreadyRunning,
            18 => SelfUpdateEvents::NewDigest(self_update_target(3)),
            19 => SelfUpdateEvents::Accepted(Acceptance { epoch: 7, holder: "c".repeat(12) }),
            _ => unreachable!("pool has {} events", Self::pool_size()),
        };
        let code = SelfUpdateEvent::from(&event).code();
        (code, Box::new(move |machine: &mut Self| feed_self_update(machine, event)))
    }

    fn resumed_code() -> u8 {
        SelfUpdateEvent::Resumed.code()
    }

    fn resume(&mut self) -> Result<StepCodes, String> {
        feed_self_update(self, SelfUpdateEvents::Resumed)
    }

    fn failure_events() -> Vec<usize> {
        vec![4, 6, 8, 10, 12, 14]
    }

    fn trigger_events() -> Vec<usize> {
        vec![0, 3]
    }

    fn success_events() -> Vec<usize> {
        vec![2, 5, 7, 9, 11, 13, 15, 16]
    }

    fn is_resting(&self) -> bool {
        self.0.state() == SelfUpdateState::Idle
    }

    fn resting_states() -> &'static [&'static str] {
        &["Idle"]
    }

    /// Retiring reports a container it could not remove inside `Retired`,
    /// and Aborting retries the removal until the engine removes it.
    fn without_failure_event() -> &'static [&'static str] {
        &["Retiring", "Aborting"]
    }

    fn check_settled(&self) -> Result<(), String> {
        match &self.0.memory().attempt {
            Some(attempt) => Err(format!("idle with attempt {} still open (candidate {:?})", attempt.number, attempt.candidate)),
            None => Ok(()),
        }
    }
}

fn feed_self_update(machine: &mut SelfUpdate, event: SelfUpdateEvents) -> Result<StepCodes, String> {
    let facts = SelfUpdateFacts { now: BootTime { boot_id: [4; 16], ms: 1_000 }, jitter_permille: 100, forced: false };
    let step = machine.0.handle(event, facts).map_err(|error| error.to_string())?;
    Ok((step.from.code(), step.event.code(), step.to.code()))
}

/// Checks one outcome of feeding an event against the table. A taken event
/// must follow a listed row. An event the table lists for the state must be
/// taken, so no guard combination and no failing action leaves it unhandled.
fn check_step<S: Subject>(from: u8, event: u8, strict: bool, result: &Result<StepCodes, String>, machine: &S) -> Result<(), String> {
    let table = S::TABLE;
    let name = table.machine.name();
    let state = table.state_name(from).unwrap_or("?");
    let event_name = table.event_name(event).unwrap_or("?");
    if table.state_name(machine.state_code()).is_none() {
        return Err(format!("{name}: reached state code {} missing from the table", machine.state_code()));
    }
    match result {
        Ok((step_from, step_event, to)) => {
            if (*step_from, *step_event) != (from, event) {
                return Err(format!("{name}: step reports {step_from}/{step_event}, expected {from}/{event}"));
            }
            if !table.transitions_from(from).any(|row| row.event == event && row.to == *to) {
                let to_name = table.state_name(*to).unwrap_or("?");
                return Err(format!("{name}: {state} + {event_name} went to {to_name}, which no table row lists"));
            }
        }
        Err(error) => {
            if strict && table.handles(from, event) {
                return Err(format!("{name}: {state} lists {event_name} in the table but rejected it: {error}"));
            }
            if machine.state_code() != from {
                return Err(format!("{name}: a rejected {event_name} moved the machine out of {state}"));
            }
        }
    }
    Ok(())
}

/// Feeds success events until the machine rests, and returns the states
/// visited or why it did not settle.
fn drive_to_rest<S: Subject>(machine: &mut S) -> Result<Vec<&'static str>, String> {
    let table = S::TABLE;
    let mut visited = Vec::new();
    for _ in 0..QUIESCENCE_STEPS {
        if machine.is_resting() {
            machine.check_settled().map_err(|error| format!("{}: {error} after {visited:?}", table.machine.name()))?;
            return Ok(visited);
        }
        let from = machine.state_code();
        let next = S::success_events().into_iter().find(|&index| table.handles(from, S::event(index).0));
        let Some(index) = next else {
            let state = table.state_name(from).unwrap_or("?");
            return Err(format!("{}: state {state} takes no success event and does not rest", table.machine.name()));
        };
        let (code, feed) = S::event(index);
        let result = feed(machine);
        check_step(from, code, true, &result, machine)?;
        visited.push(table.state_name(machine.state_code()).unwrap_or("?"));
    }
    Err(format!("{}: no resting state after {QUIESCENCE_STEPS} success events: {visited:?}", table.machine.name()))
}

/// Returns the pool index of the first trigger or success event the current
/// state takes, which moves an attempt forward.
fn advancing_event<S: Subject>(machine: &S) -> Option<usize> {
    let from = machine.state_code();
    S::trigger_events().into_iter().chain(S::success_events()).find(|&index| S::TABLE.handles(from, S::event(index).0))
}

/// Runs the sequence `events` and checks every property after each step.
/// An entry past the pool stands for the event that moves the attempt
/// forward, so random sequences also reach the deep states.
fn check_sequence<S: Subject>(events: &[usize]) -> Result<(), String> {
    let table = S::TABLE;
    let mut machine = S::fresh();
    for &entry in events {
        let index = if entry < S::pool_size() { entry } else { advancing_event(&machine).unwrap_or(entry % S::pool_size()) };
        let from = machine.state_code();
        let (code, feed) = S::event(index);
        let result = feed(&mut machine);
        check_step(from, code, !S::may_be_rejected(index), &result, &machine)?;

        // A restart at this state must be taken, whatever the memory.
        let mut restarted = machine.restarted();
        let resting_before = restarted.state_code();
        let resumed = restarted.resume();
        check_step(resting_before, S::resumed_code(), true, &resumed, &restarted)?;
        if resumed.is_err() {
            let state = table.state_name(resting_before).unwrap_or("?");
            return Err(format!("{}: state {state} rejected Resumed", table.machine.name()));
        }

        // Every failure this state takes leads to a resting, settled state.
        for failure in S::failure_events() {
            let (failure_code, feed_failure) = S::event(failure);
            if !table.handles(machine.state_code(), failure_code) {
                continue;
            }
            let mut failed = machine.restarted();
            let failed_from = failed.state_code();
            let result = feed_failure(&mut failed);
            check_step(failed_from, failure_code, true, &result, &failed)?;
            drive_to_rest(&mut failed).map_err(|error| {
                let state = table.state_name(failed_from).unwrap_or("?");
                let event = table.event_name(failure_code).unwrap_or("?");
                format!("after {event} in {state}: {error}")
            })?;
        }
    }
    Ok(())
}

/// Checks the table: every state takes `Resumed` and has a way out, and
/// every state that runs a command takes a failure event, except the states
/// `S::without_failure_event` names.
fn check_table<S: Subject>() -> Result<(), String> {
    let table = S::TABLE;
    let name = table.machine.name();
    let failure_codes: Vec<u8> = S::failure_events().into_iter().map(|index| S::event(index).0).collect();
    for state in table.states {
        if !table.handles(state.code, S::resumed_code()) {
            return Err(format!("{name}: state {} does not take Resumed", state.name));
        }
        if !table.transitions_from(state.code).any(|row| row.to != state.code) {
            return Err(format!("{name}: state {} has no way out", state.name));
        }
        let takes_failure = table.transitions_from(state.code).any(|row| failure_codes.contains(&row.event));
        let exempt = S::without_failure_event().contains(&state.name);
        let resting = S::resting_states().contains(&state.name);
        if !resting && !takes_failure && !exempt {
            return Err(format!("{name}: state {} takes no failure event", state.name));
        }
        if exempt && takes_failure {
            return Err(format!("{name}: state {} takes a failure event but is listed without one", state.name));
        }
    }
    Ok(())
}

/// Checks that the pool's failure events are exactly the machine events
/// that can report a failure, and that every event has a pool entry.
fn check_failure_pool<S: Subject>(failure_event_names: &[&str]) -> Result<(), String> {
    let table = S::TABLE;
    let mut pooled: Vec<&str> = S::failure_events().into_iter().filter_map(|index| table.event_name(S::event(index).0)).collect();
    pooled.sort_unstable();
    pooled.dedup();
    let mut expected = failure_event_names.to_vec();
    expected.sort_unstable();
    if pooled != expected {
        return Err(format!("{}: failure events in the pool {pooled:?}, in the machine {expected:?}", table.machine.name()));
    }
    let mut all: Vec<u8> = (0..S::pool_size()).map(|index| S::event(index).0).collect();
    all.sort_unstable();
    all.dedup();
    let missing: Vec<&str> = table.events.iter().filter(|event| !all.contains(&event.code)).map(|event| event.name).collect();
    if !missing.is_empty() {
        return Err(format!("{}: events without a pool entry: {missing:?}", table.machine.name()));
    }
    Ok(())
}

fn sequence<S: Subject>() -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(0..S::pool_size() * 3, 0..MAX_EVENTS)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn stack_random_sequences(events in sequence::<Stack>()) {
        check_sequence::<Stack>(&events).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn host_random_sequences(events in sequence::<Host>()) {
        check_sequence::<Host>(&events).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn space_random_sequences(events in sequence::<Space>()) {
        check_sequence::<Space>(&events).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn self_update_random_sequences(events in sequence::<SelfUpdate>()) {
        check_sequence::<SelfUpdate>(&events).map_err(TestCaseError::fail)?;
    }
}

#[test]
fn tables_take_resumed_everywhere() {
    check_table::<Stack>().unwrap();
    check_table::<Host>().unwrap();
    check_table::<Space>().unwrap();
    check_table::<SelfUpdate>().unwrap();
}

#[test]
fn pools_cover_every_event() {
    check_failure_pool::<Stack>(&["FetchFailed", "Invalid", "PullFailed", "ApplyFailed", "GateFailed", "ResetFailed"]).unwrap();
    check_failure_pool::<Host>(&["Unreachable", "HostKeyRejected", "CommandFailed", "DpkgBusy", "JobFinished", "BootVerified"]).unwrap();
    check_failure_pool::<Space>(&["RecorderStopFailed", "ReclaimFailed", "RecorderStartFailed"]).unwrap();
    check_failure_pool::<SelfUpdate>(&["CheckFailed", "PullFailed", "CreateFailed", "StartFailed", "HandoverFailed", "TakenBack"]).unwrap();
}
