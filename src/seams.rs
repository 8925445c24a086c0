//! The few sources of facts that tests and containers replace: clocks and the
//! boot id.

use std::path::PathBuf;
use std::sync::Arc;

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
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_millis() as u64)
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
    fn uuid_rejects_garbage() {
        assert_eq!(parse_uuid("not a uuid"), None);
    }
}
