//! Apply policies: when a pulled update may stop and restart services.
//!
//! The policy is pure. The driver gathers the facts: the wall time and whether
//! the kernel reports the clock synchronised, whether the device booted since
//! the pull, which update lock is held, and how long locks have deferred the
//! update. [`decide`] then returns whether to apply now or why to wait. A
//! policy never delays downloads, only the step that stops services.
//!
//! Maintenance windows are daily intervals of local time in an IANA time zone,
//! read from the database compiled into the agent. A local time that a
//! daylight-saving change skips resolves to the instant after the gap, and a
//! local time that occurs twice resolves to its first occurrence, so each
//! window opens exactly once per local day.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use jiff::Timestamp;
use jiff::civil::{Date, DateTime, Time};
use jiff::tz::{TimeZone, TimeZoneDatabase};

/// When a pulled update may be applied, before update locks are considered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Timing {
    /// As soon as the images are pulled.
    Immediate,
    /// Only after the device booted again since the pull.
    OnBoot,
    /// Only while one of the windows is open and the clock is synchronised.
    Windows(Vec<Window>),
}

/// The whole apply policy of one update process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyPolicy {
    pub timing: Timing,
    /// Time update locks may defer an update, summed over boots, before the
    /// update is applied despite the lock.
    pub max_deferral: Duration,
}

/// A daily maintenance window, such as `02:00-04:00 Europe/Warsaw`. An end
/// earlier than the start closes the window on the next day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    start: Time,
    end: Time,
    zone: TimeZone,
    zone_name: String,
}

/// Error for window text that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid maintenance window {text:?}: {reason}; write it as \"HH:MM-HH:MM Area/City\", for example \"02:00-04:00 Europe/Warsaw\"")]
pub struct WindowError {
    pub text: String,
    pub reason: String,
}

impl FromStr for Window {
    type Err = WindowError;

    fn from_str(text: &str) -> Result<Window, WindowError> {
        let invalid = |reason: String| WindowError { text: text.to_string(), reason };
        let mut parts = text.split_whitespace();
        let (Some(range), Some(zone_name), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(invalid("expected a time range and a time zone separated by a space".into()));
        };
        let Some((start, end)) = range.split_once('-') else {
            return Err(invalid(format!("{range:?} is not a range of two times joined by '-'")));
        };
        let start = parse_clock_time(start).map_err(invalid)?;
        let end = parse_clock_time(end).map_err(invalid)?;
        if start == end {
            return Err(invalid("the window starts and ends at the same time".into()));
        }
        let zone = TimeZoneDatabase::bundled().get(zone_name).map_err(|_| invalid(format!("{zone_name:?} is not a time zone in the IANA database")))?;
        Ok(Window { start, end, zone, zone_name: zone_name.to_string() })
    }
}

fn parse_clock_time(text: &str) -> Result<Time, String> {
    let invalid = || format!("{text:?} is not a time of day as HH:MM (00:00 to 23:59)");
    let (hours, minutes) = text.split_once(':').ok_or_else(invalid)?;
    if hours.len() != 2 || minutes.len() != 2 {
        return Err(invalid());
    }
    let hours: i8 = hours.parse().map_err(|_| invalid())?;
    let minutes: i8 = minutes.parse().map_err(|_| invalid())?;
    Time::new(hours, minutes, 0, 0).map_err(|_| invalid())
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{} {}", self.start.strftime("%H:%M"), self.end.strftime("%H:%M"), self.zone_name)
    }
}

impl Window {
    /// Returns the instants the window opens and closes on the local `date`,
    /// or `None` when a daylight-saving change leaves it empty that day.
    pub fn occurrence(&self, date: Date) -> Option<(Timestamp, Timestamp)> {
        let end_date = if self.end > self.start { date } else { date.tomorrow().ok()? };
        let opens = self.resolve(date, self.start)?;
        let closes = self.resolve(end_date, self.end)?;
        (closes > opens).then_some((opens, closes))
    }

    /// Tells whether the window is open at `now`.
    pub fn contains(&self, now: Timestamp) -> bool {
        self.nearby_occurrences(now).any(|(opens, closes)| opens <= now && now < closes)
    }

    /// Returns the first opening after `now`.
    pub fn next_open(&self, now: Timestamp) -> Option<Timestamp> {
        self.nearby_occurrences(now).map(|(opens, _)| opens).filter(|opens| *opens > now).min()
    }

    /// Occurrences on the local day of `now` and the days around it: a window
    /// that crosses midnight can still be open from the day before.
    fn nearby_occurrences(&self, now: Timestamp) -> impl Iterator<Item = (Timestamp, Timestamp)> + '_ {
        let today = self.zone.to_datetime(now).date();
        let days = [today.yesterday().ok(), Some(today), today.tomorrow().ok()];
        days.into_iter().flatten().filter_map(|date| self.occurrence(date))
    }

    fn resolve(&self, date: Date, time: Time) -> Option<Timestamp> {
        self.zone.to_ambiguous_timestamp(DateTime::from_parts(date, time)).compatible().ok()
    }
}

/// The wall clock as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WallClock {
    /// Milliseconds since the Unix epoch.
    pub wall_ms: u64,
    /// Whether the kernel reports the clock synchronised. Without this, the
    /// time may be the last shutdown time that fake-hwclock restored.
    pub synced: bool,
}

/// Facts the driver gathers before each decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyFacts {
    pub clock: WallClock,
    /// Whether the device booted since the update was pulled.
    pub booted_since_pull: bool,
    /// Description of the update lock that is held, such as
    /// `file /run/locks/recording`, or `None` when no lock is held.
    pub lock: Option<String>,
    /// Time update locks have deferred this update so far, summed over boots.
    pub deferred: Duration,
}

/// Reason a pulled update waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hold {
    /// The `on-boot` policy waits for the next boot.
    NextBoot,
    /// Windows stay closed until the kernel reports the clock synchronised.
    ClockNotSynchronised,
    /// No window is open; `next_open` is the next opening by the wall clock.
    OutsideWindow { windows: Vec<Window>, next_open: Option<Timestamp> },
    /// An application holds an update lock.
    Locked { holder: String },
}

impl fmt::Display for Hold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hold::NextBoot => f.write_str("waiting for the next boot (policy on-boot)"),
            Hold::ClockNotSynchronised => f.write_str("waiting for the clock: maintenance windows stay closed until the kernel reports the clock synchronised"),
            Hold::OutsideWindow { windows, next_open } => {
                let names: Vec<String> = windows.iter().map(Window::to_string).collect();
                write!(f, "waiting for the maintenance window {}", names.join(", "))?;
                if let Some(next_open) = next_open {
                    write!(f, "; next opening {}", next_open.strftime("%Y-%m-%dT%H:%M:%SZ"))?;
                }
                Ok(())
            }
            Hold::Locked { holder } => write!(f, "update lock held by {holder}"),
        }
    }
}

/// Outcome of one policy check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Apply,
    /// The timing allows the update, and a lock still holds it, but locks have
    /// deferred it for the maximum already.
    ApplyDespiteLock {
        holder: String,
    },
    Wait(Hold),
}

/// Decides whether a pulled update may be applied now.
pub fn decide(policy: &ApplyPolicy, facts: &PolicyFacts) -> Decision {
    match &policy.timing {
        Timing::Immediate => {}
        Timing::OnBoot if facts.booted_since_pull => {}
        Timing::OnBoot => return Decision::Wait(Hold::NextBoot),
        Timing::Windows(_) if !facts.clock.synced => return Decision::Wait(Hold::ClockNotSynchronised),
        Timing::Windows(windows) => {
            let Ok(now) = Timestamp::from_millisecond(i64::try_from(facts.clock.wall_ms).unwrap_or(i64::MAX)) else {
                return Decision::Wait(Hold::ClockNotSynchronised);
            };
            if !windows.iter().any(|window| window.contains(now)) {
                let next_open = windows.iter().filter_map(|window| window.next_open(now)).min();
                return Decision::Wait(Hold::OutsideWindow { windows: windows.clone(), next_open });
            }
        }
    }

    match &facts.lock {
        None => Decision::Apply,
        Some(holder) if facts.deferred >= policy.max_deferral => Decision::ApplyDespiteLock { holder: holder.clone() },
        Some(holder) => Decision::Wait(Hold::Locked { holder: holder.clone() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().expect("test timestamps are valid RFC 3339")
    }

    fn warsaw() -> Window {
        "02:00-04:00 Europe/Warsaw".parse().unwrap()
    }

    /// Returns every instant, minute by minute from `from` to `to`, at which
    /// the window goes from closed to open.
    fn openings(window: &Window, from: &str, to: &str) -> Vec<Timestamp> {
        let (mut now, end) = (at(from), at(to));
        let mut was_open = window.contains(now);
        let mut found = Vec::new();
        while now < end {
            now += jiff::SignedDuration::from_secs(60);
            let open = window.contains(now);
            if open && !was_open {
                found.push(now);
            }
            was_open = open;
        }
        found
    }

    fn policy(timing: Timing) -> ApplyPolicy {
        ApplyPolicy { timing, max_deferral: Duration::from_secs(3600) }
    }

    fn facts(wall: &str, synced: bool) -> PolicyFacts {
        PolicyFacts { clock: WallClock { wall_ms: at(wall).as_millisecond() as u64, synced }, booted_since_pull: false, lock: None, deferred: Duration::ZERO }
    }

    #[test]
    fn window_opens_once_on_spring_forward_day() {
        let window = warsaw();

        let (opens, closes) = window.occurrence(Date::new(2025, 3, 30).unwrap()).unwrap();
        let found = openings(&window, "2025-03-29T20:00:00Z", "2025-03-30T21:00:00Z");

        assert_eq!(opens, at("2025-03-30T01:00:00Z"), "02:00 does not exist, so the window opens at 03:00 CEST");
        assert_eq!(closes, at("2025-03-30T02:00:00Z"));
        assert_eq!(found, vec![at("2025-03-30T01:00:00Z")]);
    }

    #[test]
    fn window_opens_once_on_fall_back_day() {
        let window = warsaw();

        let (opens, closes) = window.occurrence(Date::new(2025, 10, 26).unwrap()).unwrap();
        let found = openings(&window, "2025-10-25T20:00:00Z", "2025-10-26T22:00:00Z");

        assert_eq!(opens, at("2025-10-26T00:00:00Z"), "the first 02:00, still CEST");
        assert_eq!(closes, at("2025-10-26T03:00:00Z"), "04:00 CET");
        assert_eq!(found, vec![at("2025-10-26T00:00:00Z")]);
    }

    #[test]
    fn window_inside_repeated_hour_opens_once() {
        let window: Window = "02:15-02:45 Europe/Warsaw".parse().unwrap();

        let found = openings(&window, "2025-10-25T20:00:00Z", "2025-10-26T22:00:00Z");

        assert_eq!(found, vec![at("2025-10-26T00:15:00Z")]);
    }

    #[test]
    fn window_across_midnight_is_open_after_midnight() {
        let window: Window = "23:00-01:00 UTC".parse().unwrap();

        assert!(window.contains(at("2025-06-10T23:30:00Z")));
        assert!(window.contains(at("2025-06-11T00:30:00Z")));
        assert!(!window.contains(at("2025-06-11T01:00:00Z")));
        assert_eq!(window.next_open(at("2025-06-11T12:00:00Z")), Some(at("2025-06-11T23:00:00Z")));
    }

    #[test]
    fn window_text_round_trips() {
        assert_eq!(warsaw().to_string(), "02:00-04:00 Europe/Warsaw");
    }

    #[test]
    fn bad_window_text_is_rejected() {
        for text in ["02:00-04:00", "2:00-04:00 UTC", "02:00-04:00 Mars/Olympus", "02:00-02:00 UTC", "25:00-04:00 UTC", "02:00 UTC", "02:00-04:00 UTC extra"] {
            let error = text.parse::<Window>().unwrap_err();
            assert!(error.to_string().contains("for example"), "{text}: {error}");
        }
    }

    #[test]
    fn afternoon_commit_waits_for_window() {
        let policy = policy(Timing::Windows(vec![warsaw()]));

        let afternoon = decide(&policy, &facts("2025-06-10T12:00:00Z", true));
        let night = decide(&policy, &facts("2025-06-11T00:00:00Z", true));

        let Decision::Wait(Hold::OutsideWindow { next_open, .. }) = afternoon else { panic!("{afternoon:?}") };
        assert_eq!(next_open, Some(at("2025-06-11T00:00:00Z")), "02:00 CEST");
        assert_eq!(night, Decision::Apply);
    }

    #[test]
    fn unsynchronised_clock_keeps_windows_closed() {
        let policy = policy(Timing::Windows(vec![warsaw()]));

        let decision = decide(&policy, &facts("2025-06-11T00:30:00Z", false));

        assert_eq!(decision, Decision::Wait(Hold::ClockNotSynchronised));
    }

    #[test]
    fn unsynchronised_clock_does_not_hold_immediate() {
        let decision = decide(&policy(Timing::Immediate), &facts("2025-06-11T00:30:00Z", false));

        assert_eq!(decision, Decision::Apply);
    }

    #[test]
    fn on_boot_waits_for_new_boot() {
        let policy = policy(Timing::OnBoot);
        let mut booted = facts("2025-06-11T00:30:00Z", false);
        booted.booted_since_pull = true;

        assert_eq!(decide(&policy, &facts("2025-06-11T00:30:00Z", false)), Decision::Wait(Hold::NextBoot));
        assert_eq!(decide(&policy, &booted), Decision::Apply);
    }

    #[test]
    fn lock_holds_until_maximum_deferral() {
        let policy = policy(Timing::Immediate);
        let mut locked = facts("2025-06-11T00:30:00Z", true);
        locked.lock = Some("file /run/lock".into());
        locked.deferred = Duration::from_secs(3599);
        let mut overdue = locked.clone();
        overdue.deferred = Duration::from_secs(3600);

        assert_eq!(decide(&policy, &locked), Decision::Wait(Hold::Locked { holder: "file /run/lock".into() }));
        assert_eq!(decide(&policy, &overdue), Decision::ApplyDespiteLock { holder: "file /run/lock".into() });
    }

    #[test]
    fn overdue_lock_still_waits_for_window() {
        let policy = policy(Timing::Windows(vec![warsaw()]));
        let mut overdue = facts("2025-06-10T12:00:00Z", true);
        overdue.lock = Some("file /run/lock".into());
        overdue.deferred = Duration::from_secs(7200);

        assert!(matches!(decide(&policy, &overdue), Decision::Wait(Hold::OutsideWindow { .. })));
    }
}
