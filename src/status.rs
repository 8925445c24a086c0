//! The agent's status. It is built from the journal alone when the agent is
//! down, or from the running agent (with its turns, LED and disks) through
//! the control socket. It renders as a short text that a technician can read
//! on a phone screen over SSH.

use std::fmt::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::coordinator::Snapshot;
use crate::journal::Journal;
use crate::journal::record::RecordMeta;
use crate::machine::host::{HostMemory, HostOutcome};
use crate::machine::selfupdate::{SelfUpdateMemory, SelfUpdateOutcome, SelfUpdateState};
use crate::machine::space::SpaceMemory;
use crate::machine::stack::{Outcome, StackMemory, StackState};
use crate::machine::{MachineKind, describe_machine, describe_state};
use crate::model::Release;
use crate::report::format_time;

/// Everything `GET /status` returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub device: String,
    pub version: String,
    /// Whether this came from the running agent or from its journal only.
    pub live: bool,
    /// The condition the LED shows, when the agent runs.
    pub led: Option<String>,
    pub lease: Option<LeaseView>,
    pub machines: Vec<MachineView>,
    /// Process holding the turn to change the device.
    pub turn: Option<TurnView>,
    pub outbox: OutboxView,
    pub disks: Vec<DiskView>,
    pub journal: JournalView,
    /// The space guard's counters, once it has written its memory.
    #[serde(default)]
    pub space: Option<SpaceView>,
}

/// The space guard's hold and counters, for the status and the metrics.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SpaceView {
    /// Whether the recorder is held stopped.
    pub recorder_held: bool,
    pub recorder_stops: u32,
    pub recorder_starts: u32,
    /// Bytes freed by reclaiming over the life of the device.
    pub reclaimed_bytes: u64,
    /// Roles of the filesystems below their marks.
    pub low: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseView {
    pub epoch: u64,
    pub holder: String,
    pub since: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnView {
    pub process: String,
    pub purpose: String,
}

/// One machine's state in plain terms.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MachineView {
    pub name: String,
    pub state: String,
    pub since: Option<String>,
    pub clock_synced: Option<bool>,
    /// Reason the machine waits for its turn, when it does.
    pub waiting: Option<String>,
    pub known_good: Option<ReleaseView>,
    /// The running release, when it differs from the known-good one.
    pub running: Option<ReleaseView>,
    pub attempt: Option<AttemptView>,
    pub last_outcome: Option<String>,
    pub rejected: Option<RejectedView>,
    pub needs_attention: Option<String>,
    pub last_error: Option<ErrorView>,
    /// Further facts specific to the machine, one line each.
    #[serde(default)]
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseView {
    pub commit: String,
    pub services: Vec<ServiceView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceView {
    pub service: String,
    /// The digest-pinned image reference.
    pub image: String,
    pub digest: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptView {
    pub number: u32,
    pub target: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedView {
    pub commit: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorView {
    pub time: String,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct OutboxView {
    pub pending: u64,
    pub delivered: u64,
    pub dropped: u64,
}

/// Free space of one filesystem the agent watches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskView {
    pub role: String,
    pub path: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
    /// The resource the space guard finds short on this filesystem, such as
    /// "free inodes", while it counts the filesystem as below its mark.
    #[serde(default)]
    pub low: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct JournalView {
    pub path: String,
    pub transitions: u64,
    pub used_bytes: u64,
    pub region_bytes: u64,
    pub damaged_bytes: u64,
    pub torn_bytes: u64,
    pub unknown_records: u64,
    pub undecodable_records: u64,
}

fn release_view(release: &Release) -> ReleaseView {
    ReleaseView {
        commit: release.commit.to_string(),
        services: release
            .services
            .iter()
            .map(|service| ServiceView { service: service.service.clone(), image: service.pinned_reference(), digest: service.digest.to_string() })
            .collect(),
    }
}

fn describe_outcome(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Applied { commit } => format!("applied commit {}", commit.short()),
        Outcome::Rejected { commit } => format!("rejected commit {}", commit.short()),
        Outcome::RolledBack { failed, restored } => format!("rolled back from {} to {}", failed.short(), restored.short()),
        Outcome::FactoryReset { reason } => format!("factory reset ({reason})"),
        Outcome::GaveUp { reason } => format!("gave up: {reason}"),
    }
}

fn when(meta: &RecordMeta) -> String {
    format_time(meta.wall_ms)
}

fn fill_stack(view: &mut MachineView, memory: &StackMemory, state: Option<StackState>) {
    view.known_good = memory.known_good.as_ref().map(release_view);
    view.running = memory.running.as_ref().filter(|running| memory.known_good.as_ref() != Some(*running)).map(release_view);
    let busy = state.is_some_and(|state| state != StackState::Idle);
    view.attempt = memory.attempt.as_ref().filter(|_| busy).map(|attempt| AttemptView { number: attempt.number, target: attempt.target.to_string() });
    view.last_outcome = memory.last_outcome.as_ref().map(describe_outcome);
    view.rejected = memory.rejected.as_ref().map(|rejection| RejectedView {
        commit: rejection.commit.to_string(),
        reason: rejection.reason.trim_start_matches(&format!("commit {}: ", rejection.commit.short())).to_string(),
    });
    view.needs_attention = memory.needs_attention.clone();
}

fn fill_space(view: &mut MachineView, memory: &SpaceMemory) {
    for low in &memory.low {
        view.notes.push(format!("{} filesystem {} is below its mark: {}", low.role, low.path, low.shortage.describe()));
    }
    if let Some(hold) = &memory.hold {
        let service = hold.service.as_ref().map(|service| format!(" (service {service})")).unwrap_or_default();
        view.notes.push(format!("recorder held stopped{service} until the recordings filesystem is above its resume mark"));
    }
    if memory.forecast_warned {
        view.notes.push("the recordings are forecast to reach their stop mark within the forecast horizon".into());
    }
    if memory.reclaimed_bytes > 0 {
        let mib = memory.reclaimed_bytes / (1024 * 1024);
        view.notes.push(format!("reclaimed {mib} MiB of Docker space in total"));
    }
    view.needs_attention = memory.needs_attention.clone();
}

fn fill_host(view: &mut MachineView, memory: &HostMemory) {
    if let Some(attempt) = &memory.attempt {
        let mut note = format!("attempt {} in progress, {} reboot(s) so far", attempt.number, attempt.reboots);
        if let Some(job) = &attempt.job {
            note.push_str(&format!(", job {}", job.id));
        }
        view.notes.push(note);
    }
    view.last_outcome = memory.last_outcome.as_ref().map(HostOutcome::describe).filter(|outcome| memory.needs_attention.as_ref() != Some(outcome));
    if !memory.kernels_not_activated.is_empty() {
        view.notes.push(format!("kernels that a reboot did not activate: {}", memory.kernels_not_activated.join(", ")));
    }
    view.needs_attention = memory.needs_attention.clone();
}

fn fill_self_update(view: &mut MachineView, memory: &SelfUpdateMemory, state: Option<SelfUpdateState>) {
    let busy = state.is_some_and(|state| state != SelfUpdateState::Idle);
    if let Some(attempt) = memory.attempt.as_ref().filter(|_| busy) {
        let mut note = format!("attempt {} moving {} to image {}", attempt.number, attempt.target.old.name, attempt.target.digest);
        if let Some(candidate) = &attempt.candidate {
            note.push_str(&format!(", new container {} ({})", candidate.name, candidate.short_id()));
        }
        if let Some(epoch) = attempt.offered_epoch {
            note.push_str(&format!(", lease epoch {epoch} offered"));
        }
        view.notes.push(note);
    }
    for failed in &memory.failed {
        view.notes.push(format!("image {} failed {} time(s): {}", failed.digest, failed.failures, failed.reason));
    }
    if let Some(error) = &memory.check_error {
        view.notes.push(format!("last check: {error}"));
    }
    view.last_outcome = memory.last_outcome.as_ref().map(|outcome| match outcome {
        SelfUpdateOutcome::Updated { to, .. } => format!("updated to image {to}"),
        SelfUpdateOutcome::Failed { digest, reason } => format!("image {digest} failed; the old agent kept control: {reason}"),
    });
}

/// Adds why a pulled update waits and how long update locks deferred it,
/// while the stack machine waits in `Ready`.
fn add_apply_hold(view: &mut MachineView, hold: &crate::journal::record::ApplyHoldRecord) {
    if !hold.reason.is_empty() {
        view.notes.push(format!("pulled update waits: {} (since {})", hold.reason, when(&hold.meta)));
    }
    if hold.deferred_ms > 0 {
        let deferred = humantime::format_duration(std::time::Duration::from_secs(hold.deferred_ms / 1000));
        view.notes.push(format!("update locks have deferred the pending update for {deferred}"));
    }
}

/// Builds the status from a journal; `live` parts are left empty.
pub fn from_journal(journal: &Journal, device: &str) -> AgentStatus {
    let state = journal.state();
    let mut machines = Vec::new();
    for kind in MachineKind::ALL {
        let Some(machine) = state.machine(kind.code()) else { continue };
        let mut view = MachineView {
            name: kind.name().to_string(),
            state: machine.state.map_or_else(|| "not started".to_string(), |code| describe_state(kind.code(), code)),
            since: machine.last_change.as_ref().map(when),
            clock_synced: machine.last_change.as_ref().map(|meta| meta.clock_synced),
            last_error: machine.last_error.as_ref().map(|error| ErrorView { time: when(&error.meta), message: error.message.clone() }),
            ..MachineView::default()
        };
        if kind == MachineKind::Stack {
            if let Some(memory) = &state.stack_memory {
                fill_stack(&mut view, memory, machine.state.and_then(StackState::from_code));
            }
            let waiting = machine.state == Some(StackState::Ready.code());
            if let Some(hold) = state.apply_holds.get(&kind.code()).filter(|_| waiting) {
                add_apply_hold(&mut view, hold);
            }
        }
        if kind == MachineKind::SelfUpdate
            && let Some((_, memory)) = &state.self_update
        {
            fill_self_update(&mut view, memory, machine.state.and_then(SelfUpdateState::from_code));
        }
        if kind == MachineKind::HostPatch
            && let Some(memory) = &state.host_memory
        {
            fill_host(&mut view, memory);
        }
        if kind == MachineKind::SpaceGuard
            && let Some(memory) = &state.space_memory
        {
            fill_space(&mut view, memory);
        }
        machines.push(view);
    }
    for code in state.machines.keys().filter(|code| MachineKind::from_code(**code).is_none()) {
        machines.push(MachineView { name: describe_machine(*code), state: "written by a newer agent version".into(), ..MachineView::default() });
    }

    let stats = journal.stats();
    let (used, region) = journal.usage();
    AgentStatus {
        device: device.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        live: false,
        led: None,
        lease: state.lease.as_ref().map(|lease| LeaseView { epoch: lease.epoch, holder: lease.holder.clone(), since: when(&lease.meta) }),
        machines,
        turn: None,
        outbox: OutboxView { pending: state.outbox.len() as u64, delivered: state.notifications_delivered, dropped: state.notifications_dropped },
        disks: Vec::new(),
        space: state.space_memory.as_ref().map(|memory| SpaceView {
            recorder_held: memory.hold.is_some(),
            recorder_stops: memory.recorder_stops,
            recorder_starts: memory.recorder_starts,
            reclaimed_bytes: memory.reclaimed_bytes,
            low: memory.low.iter().map(|low| low.role.name().to_string()).collect(),
        }),
        journal: JournalView {
            path: journal.path().display().to_string(),
            transitions: state.total_transitions(),
            used_bytes: used,
            region_bytes: region,
            damaged_bytes: stats.damaged_bytes,
            torn_bytes: stats.torn_bytes,
            unknown_records: state.unknown_records,
            undecodable_records: state.undecodable_records,
        },
    }
}

/// Adds the parts only the running agent has: turns and waiting reasons.
pub fn add_turns(status: &mut AgentStatus, snapshot: &Snapshot) {
    status.turn = snapshot.holder.as_ref().map(|holder| TurnView { process: holder.process.name().to_string(), purpose: holder.purpose.clone() });
    for waiter in &snapshot.waiting {
        if let Some(machine) = status.machines.iter_mut().find(|machine| machine.name == waiter.process.name()) {
            machine.waiting = Some(format!("{} ({})", waiter.reason, waiter.purpose));
        } else {
            status.machines.push(MachineView {
                name: waiter.process.name().to_string(),
                state: "waiting".into(),
                waiting: Some(format!("{} ({})", waiter.reason, waiter.purpose)),
                ..MachineView::default()
            });
        }
    }
}

/// Reads free space and inodes of the filesystem holding `path`.
pub fn disk(role: &str, path: &Path) -> Option<DiskView> {
    let text = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct we pass and reads the
    // NUL-terminated path.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(text.as_ptr(), &mut stats) } != 0 {
        return None;
    }
    let block = stats.f_frsize as u64;
    Some(DiskView {
        role: role.to_string(),
        path: path.display().to_string(),
        total_bytes: stats.f_blocks as u64 * block,
        free_bytes: stats.f_bavail as u64 * block,
        total_inodes: stats.f_files as u64,
        free_inodes: stats.f_favail as u64,
        low: None,
    })
}

/// Renders the status as a few short lines.
pub fn render(status: &AgentStatus) -> String {
    let mut text = String::new();
    let source = if status.live { "running" } else { "read from its journal" };
    let _ = writeln!(text, "device {} (agent {}, {source})", status.device, status.version);
    if let Some(led) = &status.led {
        let _ = writeln!(text, "LED: {led}");
    }
    match &status.lease {
        Some(lease) => {
            let _ = writeln!(text, "lease: epoch {} held by {} since {}", lease.epoch, lease.holder, lease.since);
        }
        None => text.push_str("lease: no agent has taken one yet\n"),
    }
    if let Some(turn) = &status.turn {
        let _ = writeln!(text, "turn: {} ({})", turn.process, turn.purpose);
    }

    for machine in &status.machines {
        let since = machine.since.as_ref().map(|since| format!(" since {since}")).unwrap_or_default();
        let clock = if machine.clock_synced == Some(false) { ", clock not synchronised" } else { "" };
        let _ = writeln!(text, "{}: {}{since}{clock}", machine.name, machine.state);
        if let Some(waiting) = &machine.waiting {
            let _ = writeln!(text, "  {waiting}");
        }
        if let Some(release) = &machine.known_good {
            let _ = writeln!(text, "  known-good commit {}", release.commit);
            for service in &release.services {
                let _ = writeln!(text, "    {}  {}", service.service, service.image);
            }
        } else if machine.name == MachineKind::Stack.name() {
            text.push_str("  no known-good commit yet\n");
        }
        if let Some(running) = &machine.running {
            let _ = writeln!(text, "  running commit {} (not yet known-good)", running.commit);
        }
        if let Some(attempt) = &machine.attempt {
            let _ = writeln!(text, "  attempt {} moving to commit {}", attempt.number, attempt.target);
        }
        for note in &machine.notes {
            let _ = writeln!(text, "  {note}");
        }
        if let Some(outcome) = &machine.last_outcome {
            let _ = writeln!(text, "  last outcome: {outcome}");
        }
        if let Some(rejected) = &machine.rejected {
            let _ = writeln!(text, "  rejected commit {}: {}", &rejected.commit[..12.min(rejected.commit.len())], rejected.reason);
        }
        if let Some(reason) = &machine.needs_attention {
            let _ = writeln!(text, "  NEEDS ATTENTION: {reason}");
        }
        if let Some(error) = &machine.last_error {
            let _ = writeln!(text, "  last error ({}): {}", error.time, error.message);
        }
    }

    let outbox = status.outbox;
    if outbox.pending + outbox.delivered + outbox.dropped > 0 {
        let _ = writeln!(text, "notifications: {} pending, {} delivered, {} dropped", outbox.pending, outbox.delivered, outbox.dropped);
    }
    for disk in &status.disks {
        let percent = (disk.free_bytes * 100).checked_div(disk.total_bytes).unwrap_or(0);
        let low = disk.low.as_ref().map(|what| format!(", LOW: {what} below the mark")).unwrap_or_default();
        let inodes = (disk.free_inodes * 100).checked_div(disk.total_inodes).map(|percent| format!(", {percent} % of inodes free")).unwrap_or_default();
        let _ = writeln!(text, "disk {}: {} % free ({} MiB){inodes} at {}{low}", disk.role, percent, disk.free_bytes / (1024 * 1024), disk.path);
    }
    let journal = &status.journal;
    let _ = writeln!(
        text,
        "journal {}: {} transitions, {} of {} KiB used",
        journal.path,
        journal.transitions,
        journal.used_bytes.div_ceil(1024),
        journal.region_bytes / 1024
    );
    if journal.damaged_bytes + journal.torn_bytes + journal.unknown_records + journal.undecodable_records > 0 {
        let _ = writeln!(
            text,
            "skipped while reading: {} damaged bytes, {} torn bytes, {} records from a newer version, {} records that did not decode",
            journal.damaged_bytes, journal.torn_bytes, journal.unknown_records, journal.undecodable_records
        );
    }
    text
}
