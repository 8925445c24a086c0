//! The few sources of facts that tests and containers replace: clocks and the
//! boot id.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::journal::RecordMeta;

/// Wall time, monotonic time and the kernel's clock-synchronised flag.
pub trait Clock: Send + Sync {
    /// Milliseconds since the Unix epoch.
    fn wall_ms(&self) -> u64;
    /// Milliseconds since boot, including time suspended (`CLOCK_BOOTTIME`).
    fn monotonic_ms(&self) -> u64;
    /// Returns whether the kernel reports the wall clock as synchronised.
    fn clock_synced(&self) -> bool;
}

/// The host's clocks.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn wall_ms(&self) -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis() as u64)
    }

    fn monotonic_ms(&self) -> u64 {
        let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes into the timespec we pass and reads nothing else.
        let status = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) };
        if status != 0 {
            return 0;
        }
        now.tv_sec as u64 * 1000 + now.tv_nsec as u64 / 1_000_000
    }

    fn clock_synced(&self) -> bool {
        // SAFETY: with a zeroed timex (modes 0), adjtimex only reads the clock state.
        let mut timex: libc::timex = unsafe { std::mem::zeroed() };
        let state = unsafe { libc::adjtimex(&mut timex) };
        state >= 0 && state != libc::TIME_ERROR && timex.status & libc::STA_UNSYNC == 0
    }
}

/// A clock for tests: the wall time and the synchronised flag come from a
/// file, read on every call, so a test moves the time by rewriting the file.
/// Monotonic time is the kernel's, so timeouts and the probation window run
/// in real time whatever time the file contains.
///
/// The file holds an RFC 3339 timestamp and `synced` or `unsynced`, for
/// example `2025-06-10T12:00:00Z synced`. While the file is missing or does
/// not parse, the clock reports the system's wall time as unsynchronised, so
/// maintenance windows stay closed.
#[derive(Debug)]
pub struct FileClock {
    pub path: PathBuf,
    /// Set once the unreadable file was logged, so the log is not flooded.
    warned: AtomicBool,
}

impl FileClock {
    pub fn new(path: PathBuf) -> FileClock {
        FileClock { path, warned: AtomicBool::new(false) }
    }

    fn read(&self) -> Option<(u64, bool)> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(error) => {
                self.warn_once(&format!("cannot read the clock file: {error}"));
                return None;
            }
        };
        match parse_clock_text(&text) {
            Some(reading) => {
                self.warned.store(false, Ordering::Relaxed);
                Some(reading)
            }
            None => {
                self.warn_once(&format!("invalid clock file content {:?}: expected \"2025-06-10T12:00:00Z synced\" or \"... unsynced\"", text.trim()));
                None
            }
        }
    }

    fn warn_once(&self, message: &str) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(path = %self.path.display(), "{message}; using the system wall time as unsynchronised");
        }
    }
}

impl Clock for FileClock {
    fn wall_ms(&self) -> u64 {
        self.read().map_or_else(|| SystemClock.wall_ms(), |(wall_ms, _)| wall_ms)
    }

    fn monotonic_ms(&self) -> u64 {
        SystemClock.monotonic_ms()
    }

    fn clock_synced(&self) -> bool {
        self.read().is_some_and(|(_, synced)| synced)
    }
}

/// Parses clock file text into milliseconds since the epoch and the
/// synchronised flag.
pub fn parse_clock_text(text: &str) -> Option<(u64, bool)> {
    let mut words = text.split_whitespace();
    let (Some(time), Some(flag), None) = (words.next(), words.next(), words.next()) else { return None };
    let wall_ms = u64::try_from(time.parse::<jiff::Timestamp>().ok()?.as_millisecond()).ok()?;
    let synced = match flag {
        "synced" => true,
        "unsynced" => false,
        _ => return None,
    };
    Some((wall_ms, synced))
}

/// Source of the boot id.
pub trait BootIdSource: Send + Sync {
    /// Returns the current boot id, or all zeros when it cannot be read.
    fn boot_id(&self) -> [u8; 16];
}

/// Reads the boot id from a file holding a UUID, such as
/// `/proc/sys/kernel/random/boot_id`. It is read on every call so that a test
/// can change it without restarting the agent.
#[derive(Debug, Clone)]
pub struct FileBootId {
    pub path: PathBuf,
}

impl BootIdSource for FileBootId {
    fn boot_id(&self) -> [u8; 16] {
        std::fs::read_to_string(&self.path).ok().and_then(|text| parse_uuid(&text)).unwrap_or([0; 16])
    }
}

/// Parses a UUID in its usual text form into 16 bytes.
pub fn parse_uuid(text: &str) -> Option<[u8; 16]> {
    let hex: String = text.trim().chars().filter(|character| *character != '-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut bytes = [0u8; 16];
    for (index, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(index * 2..index * 2 + 2)?, 16).ok()?;
    }
    Some(bytes)
}

/// Formats 16 bytes as a UUID.
pub fn format_uuid(bytes: &[u8; 16]) -> String {
    let hex: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

/// The clocks and the boot id source an agent runs with.
#[derive(Clone)]
pub struct Seams {
    pub clock: Arc<dyn Clock>,
    pub boot_id: Arc<dyn BootIdSource>,
}

impl Seams {
    pub fn system(boot_id_file: PathBuf) -> Seams {
        Seams { clock: Arc::new(SystemClock), boot_id: Arc::new(FileBootId { path: boot_id_file }) }
    }

    /// Returns the seams a configuration names: the system clock, or the
    /// clock file of `[seams] clock_file`.
    pub fn from_config(config: &crate::config::SeamsConfig) -> Seams {
        let clock: Arc<dyn Clock> = match &config.clock_file {
            Some(path) => Arc::new(FileClock::new(path.clone())),
            None => Arc::new(SystemClock),
        };
        Seams { clock, boot_id: Arc::new(FileBootId { path: config.boot_id_file.clone() }) }
    }

    /// Returns the metadata for a record written now.
    pub fn meta(&self) -> RecordMeta {
        RecordMeta {
            boot_id: self.boot_id.boot_id(),
            monotonic_ms: self.clock.monotonic_ms(),
            wall_ms: self.clock.wall_ms(),
            clock_synced: self.clock.clock_synced(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_round_trips() {
        let text = "6f1c8a9e-2b3d-4e5f-8a9b-0c1d2e3f4a5b";
        assert_eq!(format_uuid(&parse_uuid(text).unwrap()), text);
    }

    #[test]
    fn clock_text_sets_time_and_flag() {
        assert_eq!(parse_clock_text("2025-06-10T12:00:00Z synced\n"), Some((1_749_556_800_000, true)));
        assert_eq!(parse_clock_text("2025-06-10T14:00:00+02:00 unsynced"), Some((1_749_556_800_000, false)));
    }

    #[test]
    fn clock_text_rejects_garbage() {
        for text in ["", "2025-06-10T12:00:00Z", "2025-06-10T12:00:00Z maybe", "yesterday synced", "1969-12-31T00:00:00Z synced"] {
            assert_eq!(parse_clock_text(text), None, "{text:?}");
        }
    }

    #[test]
    fn missing_clock_file_is_unsynchronised() {
        let clock = FileClock::new(PathBuf::from("/nonexistent/eventpi-clock"));

        assert!(!clock.clock_synced());
        assert!(clock.wall_ms() > 1_700_000_000_000, "falls back to the system wall time");
    }

    #[test]
    fn clock_file_is_read_on_every_call() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("clock");
        let clock = FileClock::new(path.clone());

        std::fs::write(&path, "2025-06-10T12:00:00Z unsynced").unwrap();
        let first = (clock.wall_ms(), clock.clock_synced());
        std::fs::write(&path, "2026-06-10T12:00:00Z synced").unwrap();
        let second = (clock.wall_ms(), clock.clock_synced());

        assert_eq!(first, (1_749_556_800_000, false));
        assert_eq!(second, (1_781_092_800_000, true));
    }

    #[test]
    fn uuid_rejects_garbage() {
        assert_eq!(parse_uuid("not a uuid"), None);
    }
}
