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
/// A time after the year 9999, which only a damaged record or a wrong clock
/// gives, is shown as milliseconds, because humantime 2 formats years up to
/// 9999 only and returns an error for later ones.
pub fn format_time(wall_ms: u64) -> String {
    let mut text = String::new();
    match write!(text, "{}", humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(wall_ms))) {
        Ok(()) => text,
        Err(_) => format!("{wall_ms} ms after the Unix epoch"),
    }
}

#[cfg(test)]
mod tests {
    use super::format_time;

    #[test]
    fn format_time_rfc3339() {
        assert_eq!(format_time(1_793_606_400_000), "2026-11-02T08:00:00Z");
    }

    #[test]
    fn format_time_past_year_9999() {
        assert_eq!(format_time(u64::MAX), "18446744073709551615 ms after the Unix epoch");
        assert_eq!(format_time(253_402_300_800_000), "253402300800000 ms after the Unix epoch");
    }
}
