//! Plain-text and JSON views of a journal's transitions, for
//! `autoupdate replay`.

use std::fmt::Write;
use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;

use crate::journal::JournalState;
use crate::machine::{describe_event, describe_machine, describe_state};

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
