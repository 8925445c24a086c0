//! Prometheus metrics: counters the machines update, and gauges read from the
//! status when `/metrics` is scraped.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use crate::status::AgentStatus;

/// Upper bounds of the update-duration histogram buckets, in seconds.
const DURATION_BUCKETS: [f64; 10] = [5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0];

#[derive(Debug, Default)]
struct Histogram {
    buckets: [u64; DURATION_BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Debug, Default)]
struct Counters {
    /// (machine, outcome) → updates that ended so.
    outcomes: BTreeMap<(String, String), u64>,
    durations: BTreeMap<String, Histogram>,
    rollbacks: BTreeMap<String, u64>,
}

/// Counters kept since the agent started.
#[derive(Debug, Default)]
pub struct Metrics {
    counters: Mutex<Counters>,
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::default()
    }

    /// Counts an update that ended with `outcome`, and its duration when known.
    pub fn record_update(&self, machine: &str, outcome: &str, duration: Option<Duration>) {
        let mut counters = self.lock();
        *counters.outcomes.entry((machine.to_string(), outcome.to_string())).or_default() += 1;
        if outcome == "rolled_back" {
            *counters.rollbacks.entry(machine.to_string()).or_default() += 1;
        }
        if let Some(duration) = duration {
            let seconds = duration.as_secs_f64();
            let histogram = counters.durations.entry(machine.to_string()).or_default();
            histogram.count += 1;
            histogram.sum += seconds;
            for (index, bound) in DURATION_BUCKETS.iter().enumerate() {
                if seconds <= *bound {
                    histogram.buckets[index] += 1;
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counters> {
        // The counters stay consistent if a panic interrupts an increment.
        self.counters.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Renders every metric in the Prometheus text format 0.0.4.
    pub fn render(&self, status: &AgentStatus) -> String {
        let counters = self.lock();
        let mut text = String::new();

        family(&mut text, "autoupdate_updates_total", "counter", "Updates that ended, by machine and outcome, since the agent started.");
        for ((machine, outcome), count) in &counters.outcomes {
            let _ = writeln!(text, "autoupdate_updates_total{{machine=\"{}\",outcome=\"{}\"}} {count}", escape(machine), escape(outcome));
        }

        family(&mut text, "autoupdate_rollbacks_total", "counter", "Rollbacks to the known-good release since the agent started.");
        for (machine, count) in &counters.rollbacks {
            let _ = writeln!(text, "autoupdate_rollbacks_total{{machine=\"{}\"}} {count}", escape(machine));
        }

        family(&mut text, "autoupdate_update_duration_seconds", "histogram", "Time from leaving idle to the end of an update.");
        for (machine, histogram) in &counters.durations {
            let machine = escape(machine);
            for (index, bound) in DURATION_BUCKETS.iter().enumerate() {
                let _ = writeln!(text, "autoupdate_update_duration_seconds_bucket{{machine=\"{machine}\",le=\"{bound}\"}} {}", histogram.buckets[index]);
            }
            let _ = writeln!(text, "autoupdate_update_duration_seconds_bucket{{machine=\"{machine}\",le=\"+Inf\"}} {}", histogram.count);
            let _ = writeln!(text, "autoupdate_update_duration_seconds_sum{{machine=\"{machine}\"}} {}", histogram.sum);
            let _ = writeln!(text, "autoupdate_update_duration_seconds_count{{machine=\"{machine}\"}} {}", histogram.count);
        }

        family(&mut text, "autoupdate_machine_state", "gauge", "1 for the current state of each machine.");
        for machine in &status.machines {
            let _ = writeln!(text, "autoupdate_machine_state{{machine=\"{}\",state=\"{}\"}} 1", escape(&machine.name), escape(&machine.state));
        }

        family(&mut text, "autoupdate_machine_waiting", "gauge", "1 when a machine waits for its turn to change the device.");
        for machine in &status.machines {
            let waiting = u8::from(machine.waiting.is_some());
            let _ = writeln!(text, "autoupdate_machine_waiting{{machine=\"{}\"}} {waiting}", escape(&machine.name));
        }

        family(&mut text, "autoupdate_filesystem_free_bytes", "gauge", "Free bytes of each watched filesystem, as non-root users see them.");
        for disk in &status.disks {
            let _ = writeln!(text, "autoupdate_filesystem_free_bytes{{role=\"{}\",path=\"{}\"}} {}", escape(&disk.role), escape(&disk.path), disk.free_bytes);
        }
        family(&mut text, "autoupdate_filesystem_size_bytes", "gauge", "Size of each watched filesystem.");
        for disk in &status.disks {
            let _ = writeln!(text, "autoupdate_filesystem_size_bytes{{role=\"{}\",path=\"{}\"}} {}", escape(&disk.role), escape(&disk.path), disk.total_bytes);
        }
        family(&mut text, "autoupdate_filesystem_free_inodes", "gauge", "Free inodes of each watched filesystem.");
        for disk in &status.disks {
            let _ = writeln!(text, "autoupdate_filesystem_free_inodes{{role=\"{}\",path=\"{}\"}} {}", escape(&disk.role), escape(&disk.path), disk.free_inodes);
        }

        family(&mut text, "autoupdate_filesystem_size_inodes", "gauge", "Inodes of each watched filesystem; 0 without an inode limit.");
        for disk in &status.disks {
            let _ =
                writeln!(text, "autoupdate_filesystem_size_inodes{{role=\"{}\",path=\"{}\"}} {}", escape(&disk.role), escape(&disk.path), disk.total_inodes);
        }
        family(&mut text, "autoupdate_filesystem_low", "gauge", "1 while the space guard counts a filesystem as below its mark.");
        for disk in &status.disks {
            let _ =
                writeln!(text, "autoupdate_filesystem_low{{role=\"{}\",path=\"{}\"}} {}", escape(&disk.role), escape(&disk.path), u8::from(disk.low.is_some()));
        }
        if let Some(space) = &status.space {
            family(&mut text, "autoupdate_recorder_held", "gauge", "1 while the space guard holds the recorder stopped.");
            let _ = writeln!(text, "autoupdate_recorder_held {}", u8::from(space.recorder_held));
            family(&mut text, "autoupdate_recorder_stops_total", "counter", "Times the space guard stopped the recorder.");
            let _ = writeln!(text, "autoupdate_recorder_stops_total {}", space.recorder_stops);
            family(&mut text, "autoupdate_space_reclaimed_bytes_total", "counter", "Bytes freed by reclaiming Docker space, as Docker reported them.");
            let _ = writeln!(text, "autoupdate_space_reclaimed_bytes_total {}", space.reclaimed_bytes);
        }

        family(&mut text, "autoupdate_journal_used_bytes", "gauge", "Bytes used in the journal's active region.");
        let _ = writeln!(text, "autoupdate_journal_used_bytes {}", status.journal.used_bytes);
        family(&mut text, "autoupdate_journal_region_bytes", "gauge", "Size of one journal region; compaction runs at 75 %.");
        let _ = writeln!(text, "autoupdate_journal_region_bytes {}", status.journal.region_bytes);
        family(&mut text, "autoupdate_journal_transitions_total", "counter", "Transitions written to the journal over its life.");
        let _ = writeln!(text, "autoupdate_journal_transitions_total {}", status.journal.transitions);

        family(&mut text, "autoupdate_notifications_pending", "gauge", "Notifications waiting in the outbox.");
        let _ = writeln!(text, "autoupdate_notifications_pending {}", status.outbox.pending);
        family(&mut text, "autoupdate_notifications_delivered_total", "counter", "Notifications the webhook accepted.");
        let _ = writeln!(text, "autoupdate_notifications_delivered_total {}", status.outbox.delivered);
        family(&mut text, "autoupdate_notifications_dropped_total", "counter", "Notifications dropped from a full outbox.");
        let _ = writeln!(text, "autoupdate_notifications_dropped_total {}", status.outbox.dropped);

        family(&mut text, "autoupdate_lease_epoch", "gauge", "Epoch of the newest lease in the journal.");
        let _ = writeln!(text, "autoupdate_lease_epoch {}", status.lease.as_ref().map_or(0, |lease| lease.epoch));
        text
    }
}

fn family(text: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(text, "# HELP {name} {help}");
    let _ = writeln!(text, "# TYPE {name} {kind}");
}

/// Escapes a label value: backslash, double quote and newline.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn histogram_counts_into_every_larger_bucket() {
        let metrics = Metrics::new();
        metrics.record_update("stack", "applied", Some(Duration::from_secs(20)));
        let counters = metrics.lock();
        let histogram = &counters.durations["stack"];
        assert_eq!(histogram.buckets[0], 0);
        assert_eq!(histogram.buckets[1], 0);
        assert_eq!(histogram.buckets[2], 1);
        assert_eq!(histogram.buckets[9], 1);
    }
}
