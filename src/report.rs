//! Plain-text and JSON views of a journal, for `autoupdate status` and
//! `autoupdate replay`.

use std::fmt::Write;
use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;

use crate::journal::record::RecordMeta;
use crate::journal::{Journal, JournalState};
use crate::machine::stack::{Outcome, StackState};
use crate::machine::{MachineKind, describe_event, describe_machine, describe_state};
use crate::model::Release;

/// One transition as `replay` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplayEntry {
    /// Wall time as RFC 3339 in UTC.
    pub time: String,
    pub wall_ms: u64,
    pub monotonic_ms: u64,
    pub clock_synced: bool,
    pub boot_id: String,
    pub machine: String,
    pub from: String,
    pub event: String,
    pub to: String,
    pub attempt: u32,
}

/// Returns the transitions of a journal in the order they were appended.
pub fn replay_entries(state: &JournalState) -> Vec<ReplayEntry> {
    state
        .transitions
        .iter()
        .map(|transition| ReplayEntry {
            time: format_time(transition.meta.wall_ms),
            wall_ms: transition.meta.wall_ms,
            monotonic_ms: transition.meta.monotonic_ms,
            clock_synced: transition.meta.clock_synced,
            boot_id: crate::seams::format_uuid(&transition.meta.boot_id),
            machine: describe_machine(transition.machine),
            from: describe_state(transition.machine, transition.from),
            event: describe_event(transition.machine, transition.event),
            to: describe_state(transition.machine, transition.to),
            attempt: transition.attempt,
        })
        .collect()
}

/// Formats the transitions one per line: time, machine, from, event, to.
pub fn replay_text(state: &JournalState) -> String {
    let mut text = String::new();
    if state.dropped_transitions > 0 {
        let _ = writeln!(text, "({} earlier transitions were compacted away)", state.dropped_transitions);
    }
    for entry in replay_entries(state) {
        let clock = if entry.clock_synced { "" } else { " (clock not synchronised)" };
        let attempt = if entry.attempt > 0 { format!("  attempt {}", entry.attempt) } else { String::new() };
        let _ = writeln!(text, "{}  {:<12} {} --{}--> {}{attempt}{clock}", entry.time, entry.machine, entry.from, entry.event, entry.to);
    }
    if state.transitions.is_empty() {
        text.push_str("no transitions recorded\n");
    }
    text
}

/// Formats milliseconds since the epoch as RFC 3339 in UTC, to the second.
pub fn format_time(wall_ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(wall_ms)).to_string()
}

fn format_when(meta: &RecordMeta) -> String {
    let time = format_time(meta.wall_ms);
    if meta.clock_synced { time } else { format!("{time}, clock not synchronised") }
}

/// Summarises a journal in plain words: every machine's state, the stack's
/// known-good commit with its digests, and the last errors.
pub fn status_text(journal: &Journal) -> String {
    let state = journal.state();
    let mut text = String::new();
    let (used, region) = journal.usage();
    let _ = writeln!(
        text,
        "journal {}: {} transitions, {} of {} KiB used",
        journal.path().display(),
        state.total_transitions(),
        used.div_ceil(1024),
        region / 1024
    );
    match &state.lease {
        Some(lease) => {
            let _ = writeln!(text, "lease: epoch {} held by {} since {}", lease.epoch, lease.holder, format_when(&lease.meta));
        }
        None => text.push_str("lease: nobody has taken one yet\n"),
    }

    for kind in MachineKind::ALL {
        let Some(view) = state.machine(kind.code()) else { continue };
        let state_name = view.state.map_or_else(|| "not started".to_string(), |code| describe_state(kind.code(), code));
        let since = view.last_change.as_ref().map(|meta| format!(" since {}", format_when(meta))).unwrap_or_default();
        let _ = writeln!(text, "{}: {state_name}{since}", kind.name());
        if kind == MachineKind::Stack {
            write_stack_details(&mut text, state, view.state);
        }
        if let Some(error) = &view.last_error {
            let _ = writeln!(text, "  last error ({}): {}", format_when(&error.meta), error.message);
        }
    }
    for code in state.machines.keys().filter(|code| MachineKind::from_code(**code).is_none()) {
        let _ = writeln!(text, "{}: written by a newer version of the agent", describe_machine(*code));
    }

    let stats = journal.stats();
    if stats.ignored_bytes() > 0 || state.unknown_records > 0 || state.undecodable_records > 0 {
        let _ = writeln!(
            text,
            "skipped while reading: {} damaged bytes, {} torn bytes, {} records from a newer version, {} records that did not decode",
            stats.damaged_bytes, stats.torn_bytes, state.unknown_records, state.undecodable_records
        );
    }
    text
}

fn write_stack_details(text: &mut String, state: &JournalState, code: Option<u8>) {
    let Some(memory) = &state.stack_memory else {
        text.push_str("  no update applied yet\n");
        return;
    };
    match &memory.known_good {
        Some(release) => {
            let _ = writeln!(text, "  known-good commit {}", release.commit);
            write_images(text, release);
        }
        None => text.push_str("  no known-good commit yet\n"),
    }
    if let Some(running) = &memory.running {
        if memory.known_good.as_ref() != Some(running) {
            let _ = writeln!(text, "  running commit {} (not yet known-good)", running.commit);
            write_images(text, running);
        }
    }
    if let Some(attempt) = &memory.attempt {
        let busy = code.and_then(StackState::from_code).is_some_and(|state| state != StackState::Idle);
        if busy {
            let _ = writeln!(text, "  attempt {} moving to commit {}", attempt.number, attempt.target);
        }
    }
    write_apply_hold(text, state, code == Some(StackState::Ready.code()));
    if let Some(outcome) = &memory.last_outcome {
        let _ = writeln!(text, "  last outcome: {}", describe_outcome(outcome));
    }
    if let Some(rejection) = &memory.rejected {
        let _ = writeln!(text, "  rejected commit {}: {}", rejection.commit.short(), rejection.reason.trim_start_matches(&format!("commit {}: ", rejection.commit.short())));
    }
    if let Some(reason) = &memory.needs_attention {
        let _ = writeln!(text, "  NEEDS ATTENTION: {reason}");
    }
}

/// Writes why a pulled update waits and how long update locks have deferred
/// it, while the machine is `waiting` in `Ready`.
fn write_apply_hold(text: &mut String, state: &JournalState, waiting: bool) {
    let Some(hold) = state.apply_holds.get(&MachineKind::Stack.code()) else { return };
    if !waiting {
        return;
    }
    if !hold.reason.is_empty() {
        let _ = writeln!(text, "  pulled update waits: {} (since {})", hold.reason, format_when(&hold.meta));
    }
    if hold.deferred_ms > 0 {
        let deferred = humantime::format_duration(Duration::from_secs(hold.deferred_ms / 1000));
        let _ = writeln!(text, "  update locks have deferred the pending update for {deferred}");
    }
}

fn write_images(text: &mut String, release: &Release) {
    for service in &release.services {
        let _ = writeln!(text, "    {}  {}", service.service, service.pinned_reference());
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
