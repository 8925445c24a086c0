//! Runs the space-guard machine: samples every watched filesystem with
//! `statvfs` at a fixed interval, feeds the samples to the machine, persists
//! each step that changes something, and only then stops or starts the
//! recorder or reclaims Docker space.
//!
//! The guard never takes a coordinator turn: it always runs, also while
//! another process changes the device. Stack updates read its hold from the
//! journal ([`held_services`]) and leave a held recorder service out of
//! `compose up` and the health gate.

pub mod preflight;
pub mod reclaim;
pub mod recorder;
pub mod registry;
pub mod setup;

use std::collections::{BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::failpoint::{self, Point};
use crate::forecast::{self, FreeSample};
use crate::journal::record::{MachineErrorRecord, SpaceMemoryRecord, TransitionRecord};
use crate::journal::{JournalError, Record};
use crate::machine::MachineKind;
use crate::machine::space::{
    FillForecast, Marks, Moment, Reading, ReclaimReport, Role, Sample, SpaceCommand, SpaceEvent, SpaceEvents, SpaceMachine, SpaceMemory, SpaceSettings,
    SpaceState, Step,
};
use crate::model::Failure;
use crate::notify::{Notice, Severity};
use crate::panel::{Condition, Source};
use crate::runtime::{Runtime, SharedJournal};
use crate::status::AgentStatus;

use self::reclaim::{Reclaimer, format_bytes};
use self::recorder::Recorder;

/// Free bytes and inodes of one filesystem, as `statvfs` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilesystemStats {
    pub total_bytes: u64,
    /// Bytes available to unprivileged users (`f_bavail`).
    pub free_bytes: u64,
    pub total_inodes: u64,
    /// Inodes available to unprivileged users (`f_favail`).
    pub free_inodes: u64,
    /// The device id of the path (`st_dev`), which differs between filesystems.
    pub device: u64,
}

/// Reads the free space and inodes of the filesystem that contains `path`.
pub fn read_filesystem(path: &Path) -> std::io::Result<FilesystemStats> {
    use std::os::unix::fs::MetadataExt;

    let device = std::fs::metadata(path)?.dev();
    let text = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidInput, error))?;
    // SAFETY: statvfs reads the NUL-terminated path and writes only into
    // the zeroed struct passed to it.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(text.as_ptr(), &mut stats) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let block = stats.f_frsize as u64;
    Ok(FilesystemStats {
        total_bytes: stats.f_blocks as u64 * block,
        free_bytes: stats.f_bavail as u64 * block,
        total_inodes: stats.f_files as u64,
        free_inodes: stats.f_favail as u64,
        device,
    })
}

/// One filesystem the guard samples.
#[derive(Debug, Clone)]
pub struct WatchedFilesystem {
    pub role: Role,
    pub path: PathBuf,
    pub marks: Marks,
}

/// Space guard settings, read from the configuration.
#[derive(Debug, Clone)]
pub struct GuardSettings {
    pub filesystems: Vec<WatchedFilesystem>,
    pub interval: Duration,
    /// Age of the oldest sample the forecast fits.
    pub forecast_window: Duration,
    pub machine: SpaceSettings,
}

/// Errors that stop the space guard.
#[derive(Debug, thiserror::Error)]
pub enum SpaceDriverError {
    /// The journal cannot record a step, so the guard must not act on it.
    #[error("cannot record a space-guard transition: {0}")]
    Journal(#[from] JournalError),
}

/// Returns the Compose services that the space guard holds stopped, as the
/// journal records them. Stack updates leave them out of `compose up` and the
/// health gate.
pub fn held_services(journal: &SharedJournal) -> BTreeSet<String> {
    let journal = journal.lock().expect("no code panics while holding the journal lock");
    let hold = journal.state().space_memory.as_ref().and_then(|memory| memory.hold.clone());
    hold.and_then(|hold| hold.service).into_iter().collect()
}

/// Marks the disks of a live status that the guard counts as low.
pub fn annotate_status(status: &mut AgentStatus, journal: &SharedJournal) {
    let low = {
        let journal = journal.lock().expect("no code panics while holding the journal lock");
        journal.state().space_memory.as_ref().map(|memory| memory.low.clone()).unwrap_or_default()
    };
    for disk in &mut status.disks {
        if let Some(entry) = low.iter().find(|entry| entry.role.name() == disk.role) {
            disk.low = Some(entry.shortage.describe().to_string());
        }
    }
}

/// The space-guard machine with everything it needs to act.
pub struct SpaceDriver {
    machine: SpaceMachine,
    queue: VecDeque<SpaceCommand>,
    runtime: Arc<Runtime>,
    recorder: Option<Recorder>,
    reclaimer: Reclaimer,
    settings: GuardSettings,
    /// Free bytes of the recordings filesystem over the forecast window.
    history: VecDeque<FreeSample>,
    /// Filesystems that could not be read, so each failure is logged once.
    unreadable: BTreeSet<PathBuf>,
    /// The newest sample, for the numbers in notifications.
    last_sample: Sample,
}

impl SpaceDriver {
    /// Builds the driver with the machine in the state the journal records.
    pub fn new(runtime: Arc<Runtime>, recorder: Option<Recorder>, reclaimer: Reclaimer, settings: GuardSettings) -> SpaceDriver {
        let (state, memory) = {
            let journal = runtime.lock_journal();
            let code = journal.state().machine(MachineKind::SpaceGuard.code()).and_then(|view| view.state);
            let state = code.and_then(SpaceState::from_code).unwrap_or_else(|| {
                if let Some(code) = code {
                    tracing::warn!(machine = "space-guard", code, "the journal contains a state this version does not know; starting from Watching");
                }
                SpaceState::Watching
            });
            (state, journal.state().space_memory.clone().unwrap_or_default())
        };
        let machine = SpaceMachine::restore(state, memory, settings.machine.clone());
        SpaceDriver {
            machine,
            queue: VecDeque::new(),
            runtime,
            recorder,
            reclaimer,
            settings,
            history: VecDeque::new(),
            unreadable: BTreeSet::new(),
            last_sample: Sample::default(),
        }
    }

    /// Runs the guard until the journal fails. The caller stops it by
    /// dropping the future; a command in progress runs again after the
    /// restart because its step is already persisted.
    pub async fn run(mut self) -> Result<(), SpaceDriverError> {
        let paths: Vec<String> = self.settings.filesystems.iter().map(|filesystem| format!("{}={}", filesystem.role, filesystem.path.display())).collect();
        tracing::info!(machine = "space-guard", filesystems = ?paths, interval = %humantime::format_duration(self.settings.interval), "space guard started");
        self.publish();
        self.feed(SpaceEvents::Resumed)?;

        loop {
            if let Some(command) = self.queue.pop_front() {
                failpoint::hit("space-guard", self.machine.state().name(), Point::BeforeCommand);
                let event = self.execute(command).await;
                self.feed(event)?;
                continue;
            }

            let sample = self.sample();
            self.feed(SpaceEvents::Sampled(sample))?;
            if self.queue.is_empty() {
                tokio::time::sleep(self.settings.interval).await;
            }
        }
    }

    /// Feeds one event and persists the step before queuing its commands.
    fn feed(&mut self, event: SpaceEvents) -> Result<(), SpaceDriverError> {
        let step = match self.machine.handle(event) {
            Ok(step) => step,
            Err(unexpected) => {
                tracing::warn!(machine = "space-guard", error = %unexpected, "event ignored");
                return Ok(());
            }
        };

        let quiet = step.from == step.to && !step.memory_changed && step.failure.is_none();
        if !quiet {
            self.append_step(&step)?;
            self.log_step(&step);
        }
        self.queue.extend(step.commands.iter().copied());
        self.publish();
        Ok(())
    }

    fn append_step(&self, step: &Step) -> Result<(), SpaceDriverError> {
        let meta = self.runtime.seams.meta();
        let machine = MachineKind::SpaceGuard.code();
        let mut records =
            vec![Record::Transition(TransitionRecord { meta, machine, from: step.from.code(), event: step.event.code(), to: step.to.code(), attempt: 0 })];
        if step.memory_changed {
            records.push(Record::SpaceMemory(SpaceMemoryRecord { meta, memory: self.machine.memory().clone() }));
        }
        if let Some(failure) = &step.failure {
            records.push(Record::MachineError(MachineErrorRecord { meta, machine, message: failure.message.clone() }));
        }
        let notices = notices_for(step, self.machine.memory(), &self.last_sample);
        self.runtime.append_with_notices(records, &notices)?;
        failpoint::hit("space-guard", step.to.name(), Point::AfterPersist);
        Ok(())
    }

    fn log_step(&self, step: &Step) {
        if step.from == step.to && step.failure.is_none() {
            tracing::debug!(machine = "space-guard", state = step.to.name(), event = step.event.name(), "memory changed");
        } else {
            tracing::info!(machine = "space-guard", from = step.from.name(), event = step.event.name(), to = step.to.name(), "transition");
        }
        if let Some(failure) = &step.failure {
            tracing::warn!(machine = "space-guard", state = step.from.name(), error = %failure.message, "step failed");
        }
        let memory = self.machine.memory();
        for low in memory.low.iter().filter(|low| !step.before.low.contains(low)) {
            tracing::warn!(machine = "space-guard", role = %low.role, path = low.path, shortage = low.shortage.describe(), "filesystem below its mark");
        }
        for low in step.before.low.iter().filter(|before| !memory.low.iter().any(|low| low.role == before.role)) {
            tracing::info!(machine = "space-guard", role = %low.role, path = low.path, "filesystem back above its resume mark");
        }
    }

    /// Shows "no space" on the LED while a filesystem is low, and "needs
    /// attention" while the recorder cannot be stopped or started.
    fn publish(&self) {
        let memory = self.machine.memory();
        let condition = if !memory.low.is_empty() {
            Some(Condition::NoSpace)
        } else if memory.needs_attention.is_some() {
            Some(Condition::NeedsAttention)
        } else {
            None
        };
        self.runtime.board.set(Source::Space, condition);
    }

    /// Reads every watched filesystem and forecasts the recordings.
    fn sample(&mut self) -> Sample {
        let now = Moment { boot_id: self.runtime.seams.boot_id.boot_id(), monotonic_ms: self.runtime.seams.clock.monotonic_ms() };
        let mut measured = Vec::new();
        for filesystem in &self.settings.filesystems {
            match read_filesystem(&filesystem.path) {
                Ok(stats) => {
                    self.unreadable.remove(&filesystem.path);
                    measured.push((filesystem, stats));
                }
                Err(error) => {
                    if self.unreadable.insert(filesystem.path.clone()) {
                        tracing::warn!(machine = "space-guard", role = %filesystem.role, path = %filesystem.path.display(), %error, "cannot read the free space; check the path in [space]");
                    }
                }
            }
        }

        let docker_device = measured.iter().find(|(filesystem, _)| filesystem.role == Role::Docker).map(|(_, stats)| stats.device);
        let readings: Vec<Reading> = measured
            .iter()
            .map(|(filesystem, stats)| {
                let reclaim_helps = match docker_device {
                    Some(device) => stats.device == device,
                    None => filesystem.role == Role::Root,
                };
                Reading {
                    role: filesystem.role,
                    path: filesystem.path.display().to_string(),
                    total_bytes: stats.total_bytes,
                    free_bytes: stats.free_bytes,
                    total_inodes: stats.total_inodes,
                    free_inodes: stats.free_inodes,
                    marks: filesystem.marks,
                    reclaim_helps,
                }
            })
            .collect();

        let forecast = self.forecast(&readings, now);
        let sample = Sample { readings, forecast, now };
        self.last_sample = sample.clone();
        sample
    }

    /// Adds the recordings reading to the history and forecasts when it
    /// reaches the stop mark.
    fn forecast(&mut self, readings: &[Reading], now: Moment) -> Option<FillForecast> {
        let recordings = readings.iter().find(|reading| reading.role == Role::Recordings)?;
        let seconds = now.monotonic_ms as f64 / 1000.0;
        if self.history.back().is_some_and(|last| last.seconds > seconds) {
            // The monotonic clock went back: a new boot. Older samples do not fit.
            self.history.clear();
        }
        self.history.push_back(FreeSample { seconds, free_bytes: recordings.free_bytes as f64 });
        let oldest = seconds - self.settings.forecast_window.as_secs_f64();
        while self.history.front().is_some_and(|sample| sample.seconds < oldest) {
            self.history.pop_front();
        }

        let samples: Vec<FreeSample> = self.history.iter().copied().collect();
        let mark = recordings.total_bytes as f64 * recordings.marks.stop_below_percent / 100.0;
        let crossing = forecast::crossing(&samples, mark)?;
        Some(FillForecast { seconds_to_mark: crossing.seconds_to_mark as u64, fill_bytes_per_hour: crossing.fill_bytes_per_hour as u64 })
    }

    async fn execute(&mut self, command: SpaceCommand) -> SpaceEvents {
        match command {
            SpaceCommand::StopRecorder => match &self.recorder {
                Some(recorder) => match recorder.stop().await {
                    Ok(()) => SpaceEvents::RecorderStopped,
                    Err(error) => SpaceEvents::RecorderStopFailed(Failure::local(error.to_string())),
                },
                None => SpaceEvents::RecorderStopFailed(Failure::local("no recorder action is configured ([space.recorder])")),
            },
            SpaceCommand::StartRecorder => match &self.recorder {
                Some(recorder) => match recorder.start().await {
                    Ok(()) => SpaceEvents::RecorderStarted,
                    Err(error) => SpaceEvents::RecorderStartFailed(Failure::local(error.to_string())),
                },
                None => SpaceEvents::RecorderStartFailed(Failure::local("no recorder action is configured ([space.recorder])")),
            },
            SpaceCommand::Reclaim => match self.reclaimer.run().await {
                Ok(steps) => {
                    let freed_bytes = steps.iter().map(|step| step.freed_bytes).sum();
                    tracing::info!(machine = "space-guard", freed_bytes, freed = %format_bytes(freed_bytes), "reclaim finished");
                    SpaceEvents::Reclaimed(ReclaimReport { freed_bytes, sample: self.sample() })
                }
                Err(error) => SpaceEvents::ReclaimFailed(Failure::transient(error.to_string())),
            },
        }
    }
}

/// Returns the notifications a step causes: a filesystem that became low or
/// recovered, the recorder stopped or started, a failure (the first of a
/// streak for the recorder), a forecast warning, and a restart loop.
fn notices_for(step: &Step, memory: &SpaceMemory, sample: &Sample) -> Vec<Notice> {
    let machine = MachineKind::SpaceGuard.code();
    let notice = |severity, kind, message: String| Notice { severity, kind, machine, message };
    let reading = |role: Role| sample.readings.iter().find(|reading| reading.role == role);
    let mut notices = Vec::new();

    for low in memory.low.iter().filter(|low| !step.before.low.iter().any(|before| before.role == low.role)) {
        let numbers = reading(low.role).map(describe_reading).unwrap_or_default();
        notices.push(notice(Severity::Warning, "space-low", format!("{} filesystem {} is low on {}{numbers}", low.role, low.path, low.shortage.describe())));
    }
    for before in step.before.low.iter().filter(|before| !memory.low.iter().any(|low| low.role == before.role)) {
        let numbers = reading(before.role).map(describe_reading).unwrap_or_default();
        notices.push(notice(Severity::Info, "space-recovered", format!("{} filesystem {} is back above its resume mark{numbers}", before.role, before.path)));
    }

    match (step.event, step.to) {
        (SpaceEvent::RecorderStopped, _) => {
            let mark = reading(Role::Recordings).map(|reading| format!(" above {} % free", reading.marks.resume_above_percent)).unwrap_or_default();
            notices.push(notice(
                Severity::Warning,
                "recorder-stopped",
                format!("the recorder was stopped because the recordings filesystem is low; delete recordings, it starts again once the filesystem is{mark}"),
            ));
        }
        (SpaceEvent::RecorderStarted, _) => {
            notices.push(notice(Severity::Info, "recorder-started", "the recorder was started again: the recordings filesystem has room".into()))
        }
        _ => {}
    }
    let gave_up = step.event == SpaceEvent::Resumed && memory.needs_attention.is_some() && memory.needs_attention != step.before.needs_attention;
    if let Some(reason) = memory.needs_attention.as_ref().filter(|_| gave_up) {
        notices.push(notice(Severity::Error, "agent-crash-loop", reason.clone()));
    }

    if let Some(failure) = &step.failure {
        let first = memory.recorder_failures <= 1;
        match step.event {
            SpaceEvent::RecorderStopFailed if first => notices.push(notice(
                Severity::Error,
                "recorder-stop-failed",
                format!("cannot stop the recorder while the recordings filesystem is low: {}", failure.message),
            )),
            SpaceEvent::RecorderStartFailed if first => {
                notices.push(notice(Severity::Error, "recorder-start-failed", format!("cannot start the recorder again: {}", failure.message)))
            }
            SpaceEvent::ReclaimFailed => notices.push(notice(Severity::Warning, "reclaim-failed", failure.message.clone())),
            _ => {}
        }
    }

    let newly_warned = memory.forecast_warned && !step.before.forecast_warned;
    if newly_warned && let (Some(forecast), Some(recordings)) = (sample.forecast, reading(Role::Recordings)) {
        let time = humantime::format_duration(Duration::from_secs(forecast.seconds_to_mark / 60 * 60));
        let rate = format_bytes(forecast.fill_bytes_per_hour);
        notices.push(notice(
            Severity::Warning,
            "recordings-forecast",
            format!(
                "the recordings on {} fill at up to {rate}/h and fall below {} % free in about {time}; delete recordings before then, or the recorder stops",
                recordings.path, recordings.marks.stop_below_percent
            ),
        ));
    }
    notices
}

fn describe_reading(reading: &Reading) -> String {
    format!(
        ": {:.1} % free bytes ({} of {}), {:.1} % free inodes; stop marks {} % and {} % of inodes",
        reading.free_percent(),
        format_bytes(reading.free_bytes),
        format_bytes(reading.total_bytes),
        reading.free_inodes_percent(),
        reading.marks.stop_below_percent,
        reading.marks.stop_below_inodes_percent
    )
}
