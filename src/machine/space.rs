//! The space-guard machine. It watches free bytes and inodes of the
//! configured filesystems and stops the recorder when the recordings
//! filesystem runs low. It reclaims what Docker can safely give back, and
//! starts the recorder again once the recordings have room above a higher mark.
//!
//! The machine is pure. The driver samples the filesystems and feeds each
//! sample as an event; the machine decides with hysteresis which filesystems
//! are low. Its memory ([`SpaceMemory`]) is persisted in the journal with every
//! transition that changes it, and the commands it queues ([`SpaceCommand`])
//! run only after that record is synced. The hold on the recorder is recorded
//! before the stop command runs, so a stack update that starts meanwhile
//! already leaves the recorder out.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::machine::MachineKind;
use crate::model::Failure;

crate::define_machine! {
    machine: MachineKind::SpaceGuard,
    smlang: Space, SpaceStates, SpaceEvents,
    states: SpaceState {
        Watching = 1,
        StoppingRecorder = 2,
        Reclaiming = 3,
        Holding = 4,
        StartingRecorder = 5,
    },
    events: SpaceEvent {
        Sampled = 1,
        Resumed = 2,
        RecorderStopped = 3,
        RecorderStopFailed = 4,
        Reclaimed = 5,
        ReclaimFailed = 6,
        RecorderStarted = 7,
        RecorderStartFailed = 8,
    },
    table: SPACE_TABLE,
    transitions: {
        Watching + Sampled(Sample) [must_stop_recorder] / stop_recorder = StoppingRecorder,
        Watching + Sampled(Sample) [must_reclaim] / start_reclaim = Reclaiming,
        Watching + Sampled(Sample) / note_sample = Watching,
        Watching + Resumed / settle = Watching,

        StoppingRecorder + RecorderStopped [may_reclaim] / reclaim_after_stop = Reclaiming,
        StoppingRecorder + RecorderStopped / hold_recorder = Holding,
        StoppingRecorder + RecorderStopFailed(Failure) [may_reclaim_after_failure] / reclaim_after_failed_stop = Reclaiming,
        StoppingRecorder + RecorderStopFailed(Failure) / retry_stop_later = Watching,
        StoppingRecorder + Resumed [can_resume] / repeat_stop = StoppingRecorder,
        StoppingRecorder + Resumed / hold_after_restarts = Holding,

        Reclaiming + Reclaimed(ReclaimReport) [must_stop_after_reclaim] / stop_after_reclaim = StoppingRecorder,
        Reclaiming + Reclaimed(ReclaimReport) [holds_after_reclaim] / finish_reclaim = Holding,
        Reclaiming + Reclaimed(ReclaimReport) / finish_reclaim = Watching,
        Reclaiming + ReclaimFailed(Failure) [holds_after_failure] / note_reclaim_failure = Holding,
        Reclaiming + ReclaimFailed(Failure) / note_reclaim_failure = Watching,
        Reclaiming + Resumed [can_resume] / repeat_reclaim = Reclaiming,
        Reclaiming + Resumed [holds_recorder] / skip_reclaim = Holding,
        Reclaiming + Resumed / skip_reclaim = Watching,

        Holding + Sampled(Sample) [recordings_recovered] / start_recorder = StartingRecorder,
        Holding + Sampled(Sample) [must_reclaim] / start_reclaim = Reclaiming,
        Holding + Sampled(Sample) / note_sample = Holding,
        Holding + Resumed [can_resume] / stop_again = StoppingRecorder,
        Holding + Resumed / keep_holding = Holding,

        StartingRecorder + RecorderStarted / release_recorder = Watching,
        StartingRecorder + RecorderStartFailed(Failure) / retry_start_later = Holding,
        StartingRecorder + Resumed [can_resume] / repeat_start = StartingRecorder,
        StartingRecorder + Resumed / abandon_start = Watching,
    }
}

/// The part a watched filesystem plays on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Role {
    /// The filesystem the recorder writes to. Below its mark the recorder stops.
    Recordings,
    /// The Docker engine's data root, which reclaiming frees.
    Docker,
    /// The root filesystem of the host.
    Root,
    /// The reserved partition with the journal.
    Reserved,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Recordings, Role::Docker, Role::Root, Role::Reserved];

    /// Returns the name used in the configuration, the status and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Role::Recordings => "recordings",
            Role::Docker => "docker",
            Role::Root => "root",
            Role::Reserved => "reserved",
        }
    }

    pub fn from_name(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.name() == name)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Free-space marks of one filesystem, in percent of its size. A filesystem
/// becomes low below a stop mark and stays low until both resources are back
/// above their resume marks.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Marks {
    pub stop_below_percent: f64,
    pub resume_above_percent: f64,
    pub stop_below_inodes_percent: f64,
    pub resume_above_inodes_percent: f64,
}

/// The short resource of a low filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Shortage {
    Bytes,
    Inodes,
    BytesAndInodes,
}

impl Shortage {
    fn of(bytes: bool, inodes: bool) -> Option<Shortage> {
        match (bytes, inodes) {
            (true, true) => Some(Shortage::BytesAndInodes),
            (true, false) => Some(Shortage::Bytes),
            (false, true) => Some(Shortage::Inodes),
            (false, false) => None,
        }
    }

    /// Returns the words for the status and notifications.
    pub fn describe(self) -> &'static str {
        match self {
            Shortage::Bytes => "free space",
            Shortage::Inodes => "free inodes",
            Shortage::BytesAndInodes => "free space and free inodes",
        }
    }
}

/// One filesystem in one sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    pub role: Role,
    pub path: String,
    pub total_bytes: u64,
    /// Bytes available to unprivileged users (`f_bavail`).
    pub free_bytes: u64,
    /// 0 on a filesystem without an inode limit, such as btrfs.
    pub total_inodes: u64,
    pub free_inodes: u64,
    pub marks: Marks,
    /// Whether reclaiming Docker space frees this filesystem: it is the
    /// Docker data root or shares its device.
    pub reclaim_helps: bool,
}

impl Reading {
    pub fn free_percent(&self) -> f64 {
        percent(self.free_bytes, self.total_bytes)
    }

    pub fn free_inodes_percent(&self) -> f64 {
        percent(self.free_inodes, self.total_inodes)
    }

    /// Returns what is short, with the stop marks for a filesystem that was
    /// not low and the resume marks for one that was.
    pub fn shortage(&self, was_low: bool) -> Option<Shortage> {
        let (bytes_mark, inodes_mark) = if was_low {
            (self.marks.resume_above_percent, self.marks.resume_above_inodes_percent)
        } else {
            (self.marks.stop_below_percent, self.marks.stop_below_inodes_percent)
        };
        Shortage::of(self.free_percent() < bytes_mark, self.free_inodes_percent() < inodes_mark)
    }
}

/// Returns `part` as a percentage of `whole`, or 100 for an empty whole, so
/// a filesystem without an inode limit never runs short of inodes.
fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 { 100.0 } else { part as f64 * 100.0 / whole as f64 }
}

/// A point in time on one boot: the monotonic clock restarts at each boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Moment {
    pub boot_id: [u8; 16],
    pub monotonic_ms: u64,
}

/// When the recordings filesystem is expected to reach its stop mark.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FillForecast {
    pub seconds_to_mark: u64,
    pub fill_bytes_per_hour: u64,
}

/// Every watched filesystem at one moment, with the recordings forecast.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Sample {
    pub readings: Vec<Reading>,
    pub forecast: Option<FillForecast>,
    pub now: Moment,
}

/// The bytes one reclaim run freed, and the filesystems right after it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ReclaimReport {
    /// Bytes Docker reported as freed, summed over every step.
    pub freed_bytes: u64,
    pub sample: Sample,
}

/// A filesystem below its mark.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LowFilesystem {
    pub role: Role,
    pub path: String,
    pub shortage: Shortage,
}

/// The recorder the guard holds stopped.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Hold {
    /// The Compose service of the managed project that the recorder is, if
    /// any; stack updates leave it out of `compose up` and the health gate.
    pub service: Option<String>,
}

/// Space-guard memory kept between transitions and persisted in the journal.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SpaceMemory {
    /// Filesystems below their marks, in the order of the sample.
    pub low: Vec<LowFilesystem>,
    /// Set from the moment the machine decides to stop the recorder until it
    /// runs again.
    pub hold: Option<Hold>,
    /// When the last reclaim started.
    pub last_reclaim: Option<Moment>,
    /// Bytes freed by every reclaim over the life of the device.
    pub reclaimed_bytes: u64,
    /// Set while the recordings are forecast to reach their stop mark within
    /// the horizon; a warning goes out when it is set.
    pub forecast_warned: bool,
    /// Failed stops or starts of the recorder in a row.
    pub recorder_failures: u32,
    /// Restarts of the agent in a busy state since the last finished command.
    pub resumes: u32,
    pub recorder_stops: u32,
    pub recorder_starts: u32,
    /// Set when the guard cannot act on the recorder and a person has to look.
    pub needs_attention: Option<String>,
}

impl SpaceMemory {
    /// Tells whether the filesystem with `role` is low.
    pub fn is_low(&self, role: Role) -> bool {
        self.low.iter().any(|low| low.role == role)
    }
}

/// Work for the driver, queued by the machine's actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpaceCommand {
    /// Stop the recorder with the configured action.
    StopRecorder,
    /// Start the recorder again.
    StartRecorder,
    /// Remove what Docker can safely give back and sample again.
    Reclaim,
}

/// Limits the machine reads from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpaceSettings {
    /// Agent restarts allowed in one busy state before it takes the failure path.
    pub max_resumes: u32,
    /// Whether a recorder action is configured.
    pub has_recorder: bool,
    /// The Compose service of the managed project that the recorder is, if any.
    pub recorder_service: Option<String>,
    /// Shortest time between two reclaims while a filesystem stays low.
    pub reclaim_interval_ms: u64,
    /// Forecasts within this many seconds warn.
    pub forecast_horizon_s: u64,
}

impl Default for SpaceSettings {
    fn default() -> Self {
        SpaceSettings { max_resumes: 5, has_recorder: false, recorder_service: None, reclaim_interval_ms: 15 * 60 * 1000, forecast_horizon_s: 24 * 3600 }
    }
}

/// Memory, settings and queued commands of a running space-guard machine.
#[derive(Debug, Default)]
pub struct SpaceContext {
    pub memory: SpaceMemory,
    pub settings: SpaceSettings,
    pub commands: Vec<SpaceCommand>,
    /// The last sample this machine recorded; empty after a restart.
    pub last_sample: Sample,
}

/// Result type smlang expects from an action; `Err` leaves the state as it was.
type ActionResult = Result<(), ()>;

impl SpaceContext {
    /// Returns the low filesystems of `sample`, with hysteresis against the
    /// current memory.
    fn assess(&self, sample: &Sample) -> Vec<LowFilesystem> {
        sample
            .readings
            .iter()
            .filter_map(|reading| {
                let shortage = reading.shortage(self.memory.is_low(reading.role))?;
                Some(LowFilesystem { role: reading.role, path: reading.path.clone(), shortage })
            })
            .collect()
    }

    fn recordings_low(&self, sample: &Sample) -> bool {
        self.assess(sample).iter().any(|low| low.role == Role::Recordings)
    }

    fn reclaim_allowed(&self, now: Moment) -> bool {
        match self.memory.last_reclaim {
            Some(last) if last.boot_id == now.boot_id => now.monotonic_ms.saturating_sub(last.monotonic_ms) >= self.settings.reclaim_interval_ms,
            _ => true,
        }
    }

    /// Tells whether a low filesystem of `sample` is one that reclaiming
    /// frees, and the reclaim interval allows a run.
    fn reclaim_wanted(&self, sample: &Sample) -> bool {
        let low = self.assess(sample);
        let helps = sample.readings.iter().any(|reading| reading.reclaim_helps && low.iter().any(|low| low.role == reading.role));
        helps && self.reclaim_allowed(sample.now)
    }

    /// Records the sample: the low filesystems and the forecast warning.
    fn record(&mut self, sample: &Sample) {
        self.memory.low = self.assess(sample);
        self.last_sample = sample.clone();
        let horizon = self.settings.forecast_horizon_s;
        let warned = self.memory.forecast_warned;
        self.memory.forecast_warned = match sample.forecast {
            Some(forecast) if forecast.seconds_to_mark <= horizon => true,
            // Twice the horizon clears the warning, so a forecast near the
            // horizon does not warn again at every sample.
            Some(forecast) if warned && forecast.seconds_to_mark <= horizon.saturating_mul(2) => true,
            _ => false,
        };
    }

    fn queue_reclaim(&mut self, now: Moment) {
        self.memory.last_reclaim = Some(now);
        self.commands.push(SpaceCommand::Reclaim);
    }

    fn queue_stop(&mut self) {
        let service = self.settings.recorder_service.clone();
        self.memory.hold.get_or_insert(Hold { service });
        self.commands.push(SpaceCommand::StopRecorder);
    }

    fn note_recorder_failure(&mut self, failure: &Failure) {
        self.memory.recorder_failures = self.memory.recorder_failures.saturating_add(1);
        self.memory.needs_attention = Some(failure.message.clone());
        self.memory.resumes = 0;
    }

    fn holds(&self) -> bool {
        self.memory.hold.is_some()
    }
}

impl SpaceStateMachineContext for SpaceContext {
    fn must_stop_recorder(&self, sample: &Sample) -> Result<bool, ()> {
        Ok(self.settings.has_recorder && !self.holds() && self.recordings_low(sample))
    }

    fn must_reclaim(&self, sample: &Sample) -> Result<bool, ()> {
        Ok(self.reclaim_wanted(sample))
    }

    fn recordings_recovered(&self, sample: &Sample) -> Result<bool, ()> {
        let measured = sample.readings.iter().any(|reading| reading.role == Role::Recordings);
        Ok(measured && !self.recordings_low(sample))
    }

    fn may_reclaim(&self) -> Result<bool, ()> {
        Ok(self.reclaim_wanted(&self.last_sample))
    }

    fn may_reclaim_after_failure(&self, _failure: &Failure) -> Result<bool, ()> {
        self.may_reclaim()
    }

    fn must_stop_after_reclaim(&self, report: &ReclaimReport) -> Result<bool, ()> {
        self.must_stop_recorder(&report.sample)
    }

    fn holds_after_reclaim(&self, _report: &ReclaimReport) -> Result<bool, ()> {
        Ok(self.holds())
    }

    fn holds_after_failure(&self, _failure: &Failure) -> Result<bool, ()> {
        Ok(self.holds())
    }

    fn holds_recorder(&self) -> Result<bool, ()> {
        Ok(self.holds())
    }

    fn can_resume(&self) -> Result<bool, ()> {
        Ok(self.memory.resumes < self.settings.max_resumes)
    }

    fn stop_recorder(&mut self, sample: Sample) -> ActionResult {
        self.record(&sample);
        self.memory.resumes = 0;
        self.queue_stop();
        Ok(())
    }

    fn start_reclaim(&mut self, sample: Sample) -> ActionResult {
        self.record(&sample);
        self.memory.resumes = 0;
        self.queue_reclaim(sample.now);
        Ok(())
    }

    fn note_sample(&mut self, sample: Sample) -> ActionResult {
        self.record(&sample);
        Ok(())
    }

    fn settle(&mut self) -> ActionResult {
        self.memory.resumes = 0;
        Ok(())
    }

    fn reclaim_after_stop(&mut self) -> ActionResult {
        self.hold_recorder()?;
        self.queue_reclaim(self.last_sample.now);
        Ok(())
    }

    fn hold_recorder(&mut self) -> ActionResult {
        let service = self.settings.recorder_service.clone();
        self.memory.hold.get_or_insert(Hold { service });
        self.memory.recorder_stops += 1;
        self.memory.recorder_failures = 0;
        self.memory.needs_attention = None;
        self.memory.resumes = 0;
        Ok(())
    }

    fn reclaim_after_failed_stop(&mut self, failure: Failure) -> ActionResult {
        self.memory.hold = None;
        self.note_recorder_failure(&failure);
        self.queue_reclaim(self.last_sample.now);
        Ok(())
    }

    fn retry_stop_later(&mut self, failure: Failure) -> ActionResult {
        self.memory.hold = None;
        self.note_recorder_failure(&failure);
        Ok(())
    }

    fn repeat_stop(&mut self) -> ActionResult {
        self.memory.resumes += 1;
        self.queue_stop();
        Ok(())
    }

    /// Keeps the hold after the agent restarted too often while stopping the
    /// recorder: the recorder may be stopped, and the hold makes sure it is
    /// started once the recordings have room.
    fn hold_after_restarts(&mut self) -> ActionResult {
        let service = self.settings.recorder_service.clone();
        self.memory.hold.get_or_insert(Hold { service });
        self.memory.needs_attention = Some("the agent restarted too often while stopping the recorder; check that it is stopped".into());
        Ok(())
    }

    fn stop_after_reclaim(&mut self, report: ReclaimReport) -> ActionResult {
        self.finish_report(&report);
        self.queue_stop();
        Ok(())
    }

    fn finish_reclaim(&mut self, report: ReclaimReport) -> ActionResult {
        self.finish_report(&report);
        Ok(())
    }

    fn note_reclaim_failure(&mut self, _failure: Failure) -> ActionResult {
        self.memory.resumes = 0;
        Ok(())
    }

    fn repeat_reclaim(&mut self) -> ActionResult {
        self.memory.resumes += 1;
        self.commands.push(SpaceCommand::Reclaim);
        Ok(())
    }

    fn skip_reclaim(&mut self) -> ActionResult {
        self.memory.resumes = 0;
        Ok(())
    }

    fn start_recorder(&mut self, sample: Sample) -> ActionResult {
        self.record(&sample);
        self.memory.resumes = 0;
        self.commands.push(SpaceCommand::StartRecorder);
        Ok(())
    }

    /// Leaves the restart counter as it is, so restarts in `Holding` after
    /// the limit do not start another round of stop attempts.
    fn keep_holding(&mut self) -> ActionResult {
        Ok(())
    }

    fn stop_again(&mut self) -> ActionResult {
        self.memory.resumes += 1;
        self.commands.push(SpaceCommand::StopRecorder);
        Ok(())
    }

    fn release_recorder(&mut self) -> ActionResult {
        self.memory.hold = None;
        self.memory.recorder_starts += 1;
        self.memory.recorder_failures = 0;
        self.memory.needs_attention = None;
        self.memory.resumes = 0;
        Ok(())
    }

    fn retry_start_later(&mut self, failure: Failure) -> ActionResult {
        self.note_recorder_failure(&failure);
        Ok(())
    }

    fn repeat_start(&mut self) -> ActionResult {
        self.memory.resumes += 1;
        self.commands.push(SpaceCommand::StartRecorder);
        Ok(())
    }

    /// Gives up starting the recorder after the agent restarted too often
    /// while doing it. The hold ends, so the next stack update starts a
    /// recorder that is a Compose service.
    fn abandon_start(&mut self) -> ActionResult {
        self.memory.hold = None;
        self.memory.resumes = 0;
        self.memory.needs_attention = Some("the agent restarted too often while starting the recorder; start it by hand".into());
        Ok(())
    }
}

impl SpaceContext {
    fn finish_report(&mut self, report: &ReclaimReport) {
        self.record(&report.sample);
        self.memory.reclaimed_bytes = self.memory.reclaimed_bytes.saturating_add(report.freed_bytes);
        self.memory.resumes = 0;
    }
}

/// Result of feeding one event to the machine.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub from: SpaceState,
    pub event: SpaceEvent,
    pub to: SpaceState,
    /// Commands to run once the transition is persisted.
    pub commands: Vec<SpaceCommand>,
    /// The failure the event reported, if any.
    pub failure: Option<Failure>,
    /// The memory before the event, for the notifications of a change.
    pub before: SpaceMemory,
    /// Whether the machine's memory changed and must be persisted.
    pub memory_changed: bool,
}

/// Error for an event the current state does not take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the space-guard machine in state {state:?} does not take event {event:?}")]
pub struct UnexpectedEvent {
    pub state: SpaceState,
    pub event: SpaceEvent,
}

/// The space-guard machine with its context: the only way the driver changes it.
pub struct SpaceMachine {
    inner: SpaceStateMachine<SpaceContext>,
}

impl SpaceMachine {
    /// Builds a machine in `state` with persisted `memory`, as after a restart.
    pub fn restore(state: SpaceState, memory: SpaceMemory, settings: SpaceSettings) -> Self {
        let context = SpaceContext { memory, settings, commands: Vec::new(), last_sample: Sample::default() };
        SpaceMachine { inner: SpaceStateMachine::new_with_state(context, state.into()) }
    }

    pub fn state(&self) -> SpaceState {
        self.inner.state().into()
    }

    pub fn memory(&self) -> &SpaceMemory {
        &self.inner.context().memory
    }

    /// Feeds one event. On success the machine has moved and the returned
    /// step lists the commands to run after persisting it. On error the
    /// machine, its memory and its queue are unchanged.
    pub fn handle(&mut self, event: SpaceEvents) -> Result<Step, UnexpectedEvent> {
        let from = self.state();
        let event_code = SpaceEvent::from(&event);
        let failure = match &event {
            SpaceEvents::RecorderStopFailed(failure) | SpaceEvents::ReclaimFailed(failure) | SpaceEvents::RecorderStartFailed(failure) => Some(failure.clone()),
            _ => None,
        };
        let before = self.inner.context().memory.clone();
        let last_sample = self.inner.context().last_sample.clone();

        if self.inner.process_event(event).is_err() {
            let context = self.inner.context_mut();
            context.memory = before;
            context.last_sample = last_sample;
            context.commands.clear();
            return Err(UnexpectedEvent { state: from, event: event_code });
        }

        let context = self.inner.context_mut();
        let commands = std::mem::take(&mut context.commands);
        let memory_changed = context.memory != before;
        Ok(Step { from, event: event_code, to: self.state(), commands, failure, before, memory_changed })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOT: [u8; 16] = [7; 16];
    const GIB: u64 = 1024 * 1024 * 1024;

    fn marks() -> Marks {
        Marks { stop_below_percent: 15.0, resume_above_percent: 20.0, stop_below_inodes_percent: 5.0, resume_above_inodes_percent: 10.0 }
    }

    fn reading(role: Role, free_percent: f64, free_inodes_percent: f64) -> Reading {
        Reading {
            role,
            path: format!("/srv/{role}"),
            total_bytes: 100 * GIB,
            free_bytes: (free_percent * GIB as f64) as u64,
            total_inodes: 1000,
            free_inodes: (free_inodes_percent * 10.0) as u64,
            marks: marks(),
            reclaim_helps: role == Role::Docker,
        }
    }

    fn sample(readings: Vec<Reading>, minute: u64) -> Sample {
        Sample { readings, forecast: None, now: Moment { boot_id: BOOT, monotonic_ms: minute * 60_000 } }
    }

    fn recordings(free_percent: f64, minute: u64) -> SpaceEvents {
        SpaceEvents::Sampled(sample(vec![reading(Role::Recordings, free_percent, 50.0), reading(Role::Docker, 50.0, 50.0)], minute))
    }

    fn settings() -> SpaceSettings {
        SpaceSettings { has_recorder: true, ..SpaceSettings::default() }
    }

    fn fresh() -> SpaceMachine {
        SpaceMachine::restore(SpaceState::Watching, SpaceMemory::default(), settings())
    }

    fn feed(machine: &mut SpaceMachine, event: SpaceEvents) -> Step {
        machine.handle(event).expect("every event in these scenarios is expected")
    }

    fn report(free_percent: f64, minute: u64) -> SpaceEvents {
        let SpaceEvents::Sampled(sample) = recordings(free_percent, minute) else { unreachable!("recordings builds a sample") };
        SpaceEvents::Reclaimed(ReclaimReport { freed_bytes: 100, sample })
    }

    /// Drives a fresh machine until it keeps the recorder stopped.
    fn holding() -> SpaceMachine {
        let mut machine = fresh();
        feed(&mut machine, recordings(14.0, 0));
        feed(&mut machine, SpaceEvents::RecorderStopped);
        machine
    }

    #[test]
    fn low_recordings_stop_then_resume() {
        let mut machine = fresh();

        let stop = feed(&mut machine, recordings(14.0, 0));
        let stopped = feed(&mut machine, SpaceEvents::RecorderStopped);
        let still_low = feed(&mut machine, recordings(18.0, 1));
        let start = feed(&mut machine, recordings(21.0, 2));
        let started = feed(&mut machine, SpaceEvents::RecorderStarted);

        assert_eq!(stop.to, SpaceState::StoppingRecorder);
        assert_eq!(stop.commands, vec![SpaceCommand::StopRecorder]);
        assert!(stop.memory_changed, "the hold is persisted before the stop runs");
        assert_eq!(stopped.to, SpaceState::Holding);
        assert_eq!(still_low.to, SpaceState::Holding);
        assert_eq!(start.to, SpaceState::StartingRecorder);
        assert_eq!(start.commands, vec![SpaceCommand::StartRecorder]);
        assert_eq!(started.to, SpaceState::Watching);
        assert_eq!(machine.memory().hold, None);
        assert_eq!((machine.memory().recorder_stops, machine.memory().recorder_starts), (1, 1));
        assert!(machine.memory().low.is_empty());
    }

    #[test]
    fn oscillation_around_mark_stops_once() {
        let mut machine = fresh();
        let mut commands = Vec::new();

        for minute in 0..40 {
            let free = if minute % 2 == 0 { 14.5 } else { 15.5 };
            let step = feed(&mut machine, recordings(free, minute));
            commands.extend(step.commands.iter().copied());
            if step.to == SpaceState::StoppingRecorder {
                commands.extend(feed(&mut machine, SpaceEvents::RecorderStopped).commands);
            }
        }

        let stops = commands.iter().filter(|command| **command == SpaceCommand::StopRecorder).count();
        let starts = commands.iter().filter(|command| **command == SpaceCommand::StartRecorder).count();
        assert_eq!(stops, 1);
        assert_eq!(starts, 0);
        assert_eq!(machine.state(), SpaceState::Holding);
    }

    #[test]
    fn quiet_samples_change_nothing() {
        let mut machine = fresh();

        let step = feed(&mut machine, recordings(60.0, 0));

        assert_eq!(step.to, SpaceState::Watching);
        assert!(!step.memory_changed);
        assert!(step.commands.is_empty());
    }

    #[test]
    fn inode_shortage_is_reported_as_inodes() {
        let mut machine = fresh();
        let event = SpaceEvents::Sampled(sample(vec![reading(Role::Recordings, 80.0, 1.0)], 0));

        let step = feed(&mut machine, event);

        assert_eq!(step.to, SpaceState::StoppingRecorder);
        assert_eq!(machine.memory().low[0].shortage, Shortage::Inodes);
    }

    #[test]
    fn low_docker_root_reclaims_once_per_interval() {
        let mut machine = fresh();
        let docker_low = |minute| SpaceEvents::Sampled(sample(vec![reading(Role::Recordings, 60.0, 50.0), reading(Role::Docker, 5.0, 50.0)], minute));

        let first = feed(&mut machine, docker_low(0));
        let SpaceEvents::Sampled(after) = docker_low(0) else { unreachable!("docker_low builds a sample") };
        let finished = feed(&mut machine, SpaceEvents::Reclaimed(ReclaimReport { freed_bytes: 5 * GIB, sample: after }));
        let soon = feed(&mut machine, docker_low(5));
        let later = feed(&mut machine, docker_low(16));

        assert_eq!(first.commands, vec![SpaceCommand::Reclaim]);
        assert_eq!(finished.to, SpaceState::Watching);
        assert_eq!(machine.memory().reclaimed_bytes, 5 * GIB);
        assert!(soon.commands.is_empty(), "within the reclaim interval");
        assert_eq!(later.commands, vec![SpaceCommand::Reclaim]);
    }

    #[test]
    fn recordings_on_docker_root_reclaim_after_stop() {
        let mut machine = fresh();
        let mut low = reading(Role::Recordings, 10.0, 50.0);
        low.reclaim_helps = true;

        feed(&mut machine, SpaceEvents::Sampled(sample(vec![low], 0)));
        let stopped = feed(&mut machine, SpaceEvents::RecorderStopped);
        let reclaimed = feed(&mut machine, report(12.0, 1));

        assert_eq!(stopped.to, SpaceState::Reclaiming);
        assert_eq!(stopped.commands, vec![SpaceCommand::Reclaim]);
        assert_eq!(reclaimed.to, SpaceState::Holding);
    }

    #[test]
    fn failed_stop_retries_at_next_sample() {
        let mut machine = fresh();
        feed(&mut machine, recordings(14.0, 0));

        let failed = feed(&mut machine, SpaceEvents::RecorderStopFailed(Failure::local("no such container: recorder")));
        let retried = feed(&mut machine, recordings(14.0, 1));

        assert_eq!(failed.to, SpaceState::Watching);
        assert_eq!(machine.memory().recorder_failures, 1);
        assert_eq!(machine.memory().needs_attention.as_deref(), Some("no such container: recorder"));
        assert_eq!(retried.to, SpaceState::StoppingRecorder);
    }

    #[test]
    fn failed_start_keeps_hold_and_retries() {
        let mut machine = holding();
        feed(&mut machine, recordings(30.0, 1));

        let failed = feed(&mut machine, SpaceEvents::RecorderStartFailed(Failure::local("start failed")));
        let retried = feed(&mut machine, recordings(30.0, 2));

        assert_eq!(failed.to, SpaceState::Holding);
        assert!(machine.memory().hold.is_some());
        assert_eq!(retried.to, SpaceState::StartingRecorder);
    }

    #[test]
    fn no_recorder_only_records_low() {
        let settings = SpaceSettings { has_recorder: false, ..SpaceSettings::default() };
        let mut machine = SpaceMachine::restore(SpaceState::Watching, SpaceMemory::default(), settings);

        let step = feed(&mut machine, recordings(10.0, 0));

        assert_eq!(step.to, SpaceState::Watching);
        assert!(machine.memory().is_low(Role::Recordings));
    }

    #[test]
    fn forecast_warns_once_within_horizon() {
        let mut machine = fresh();
        let with_forecast = |seconds: u64, minute| {
            let SpaceEvents::Sampled(mut sample) = recordings(60.0, minute) else { unreachable!("recordings builds a sample") };
            sample.forecast = Some(FillForecast { seconds_to_mark: seconds, fill_bytes_per_hour: GIB });
            SpaceEvents::Sampled(sample)
        };

        let far = feed(&mut machine, with_forecast(30 * 3600, 0));
        let near = feed(&mut machine, with_forecast(10 * 3600, 1));
        let warned = machine.memory().forecast_warned;
        let again = feed(&mut machine, with_forecast(9 * 3600, 2));
        let cleared = feed(&mut machine, recordings(60.0, 3));

        assert!(!far.memory_changed);
        assert!(near.memory_changed);
        assert!(warned);
        assert!(!again.memory_changed, "the warning stays set without a second change");
        assert!(cleared.memory_changed);
        assert!(!machine.memory().forecast_warned);
    }

    /// Checks the command a restart repeats in each state. There is one case
    /// per state, so a state added without a case fails here.
    #[test]
    fn restart_in_each_state_repeats_its_command() {
        for state in SpaceState::ALL.iter().copied() {
            let (memory, expected) = match state {
                SpaceState::Watching => (SpaceMemory::default(), vec![]),
                SpaceState::StoppingRecorder => (SpaceMemory { hold: Some(Hold::default()), ..SpaceMemory::default() }, vec![SpaceCommand::StopRecorder]),
                SpaceState::Reclaiming => (SpaceMemory::default(), vec![SpaceCommand::Reclaim]),
                SpaceState::Holding => (SpaceMemory { hold: Some(Hold::default()), ..SpaceMemory::default() }, vec![SpaceCommand::StopRecorder]),
                SpaceState::StartingRecorder => (SpaceMemory { hold: Some(Hold::default()), ..SpaceMemory::default() }, vec![SpaceCommand::StartRecorder]),
            };
            let mut machine = SpaceMachine::restore(state, memory, settings());

            let step = feed(&mut machine, SpaceEvents::Resumed);

            assert_eq!(step.commands, expected, "{state:?}");
        }
    }

    /// Checks where the machine ends when the agent keeps dying in each state.
    #[test]
    fn restart_loop_in_each_state_ends() {
        for state in SpaceState::ALL.iter().copied() {
            let memory = SpaceMemory { hold: Some(Hold::default()), ..SpaceMemory::default() };
            let mut machine = SpaceMachine::restore(state, memory, settings());

            let mut last = None;
            for _ in 0..20 {
                let step = feed(&mut machine, SpaceEvents::Resumed);
                if step.commands.is_empty() {
                    last = Some(step.to);
                    break;
                }
            }

            let expected = match state {
                SpaceState::Watching => SpaceState::Watching,
                SpaceState::StoppingRecorder | SpaceState::Reclaiming | SpaceState::Holding => SpaceState::Holding,
                SpaceState::StartingRecorder => SpaceState::Watching,
            };
            assert_eq!(last, Some(expected), "{state:?}");
        }
    }

    #[test]
    fn busy_states_handle_resume_and_failures() {
        let failures = [
            (SpaceState::StoppingRecorder, SpaceEvent::RecorderStopFailed),
            (SpaceState::Reclaiming, SpaceEvent::ReclaimFailed),
            (SpaceState::StartingRecorder, SpaceEvent::RecorderStartFailed),
        ];
        for state in SpaceState::ALL {
            assert!(SPACE_TABLE.handles(state.code(), SpaceEvent::Resumed.code()), "{state:?} does not handle Resumed");
        }
        for (state, event) in failures {
            assert!(SPACE_TABLE.handles(state.code(), event.code()), "{state:?} does not handle {event:?}");
        }
        for state in [SpaceState::Watching, SpaceState::Holding] {
            assert!(SPACE_TABLE.handles(state.code(), SpaceEvent::Sampled.code()), "{state:?} does not take samples");
        }
    }

    #[test]
    fn unexpected_event_changes_nothing() {
        let mut machine = fresh();
        let before = machine.memory().clone();

        let error = machine.handle(SpaceEvents::RecorderStarted).unwrap_err();

        assert_eq!(error.state, SpaceState::Watching);
        assert_eq!(machine.memory(), &before);
    }

    #[test]
    fn table_lists_every_state() {
        let codes: Vec<u8> = SPACE_TABLE.states.iter().map(|state| state.code).collect();
        let expected: Vec<u8> = SpaceState::ALL.iter().map(|state| state.code()).collect();
        assert_eq!(codes, expected);
        assert_eq!(SPACE_TABLE.start, SpaceState::Watching.code());
        assert_eq!(SPACE_TABLE.machine, MachineKind::SpaceGuard);
    }
}
