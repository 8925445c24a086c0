//! Failpoints: `AUTOUPDATE_FAILPOINT=machine:State:point` kills the process
//! with SIGKILL at that spot, as a power cut would.
//!
//! `point` is `after-persist` (the transition into `State` is synced to the
//! journal) or `before-command` (the command of `State` is about to start).
//! With `AUTOUPDATE_FAILPOINT_ONCE=FILE` the failpoint fires only while FILE
//! does not exist, and creates it first. A container keeps its environment
//! across restarts, so this is how a test kills an agent in a container once.
//! The check is compiled in only with the `failpoints` cargo feature, so a
//! release build ignores the variable.
//!
//! Two points change behaviour instead of killing, and only the self-update
//! process checks them. `self-update:Candidate:stall` makes a candidate's
//! handover API never respond, and `self-update:Candidate:drop-response` makes
//! it take the lease and close the connection without a response.
//! `self-update:Starting:stall` makes the old agent wait for the whole start
//! timeout without asking the candidate. `self-update:Candidate:before-command`
//! kills a candidate as it starts.

/// Spots where a failpoint can stop the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    AfterPersist,
    BeforeCommand,
    Stall,
    DropResponse,
}

impl Point {
    pub fn name(self) -> &'static str {
        match self {
            Point::AfterPersist => "after-persist",
            Point::BeforeCommand => "before-command",
            Point::Stall => "stall",
            Point::DropResponse => "drop-response",
        }
    }
}

/// Name of the environment variable that arms a failpoint.
pub const VARIABLE: &str = "AUTOUPDATE_FAILPOINT";

/// Name of the environment variable with the file that makes a failpoint
/// fire once.
pub const ONCE_VARIABLE: &str = "AUTOUPDATE_FAILPOINT_ONCE";

/// Tells whether this build honours failpoints.
pub const ENABLED: bool = cfg!(feature = "failpoints");

/// Kills the process when the armed failpoint matches this spot.
#[cfg(feature = "failpoints")]
pub fn hit(machine: &str, state: &str, point: Point) {
    let Ok(armed) = std::env::var(VARIABLE) else { return };
    if armed == format!("{machine}:{state}:{}", point.name()) && first_time() {
        tracing::warn!(machine, state, point = point.name(), "failpoint reached, killing the agent");
        // SAFETY: sending a signal to our own pid and _exit have no memory
        // effects on this process that outlive it.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
            // The kernel drops a SIGKILL that a PID namespace's init, such
            // as the agent in its container, sends itself. _exit ends it
            // just as abruptly, without destructors or atexit handlers,
            // with the status a shell reports for SIGKILL.
            libc::_exit(137);
        }
    }
}

/// Tells whether a failpoint may fire: always without
/// `AUTOUPDATE_FAILPOINT_ONCE`, otherwise only when this call creates its file.
#[cfg(feature = "failpoints")]
fn first_time() -> bool {
    let Ok(path) = std::env::var(ONCE_VARIABLE) else { return true };
    let created = std::fs::OpenOptions::new().write(true).create_new(true).open(&path);
    created.and_then(|file| file.sync_all()).is_ok()
}

/// Tells whether the armed failpoint is this spot, for the points that
/// change behaviour instead of killing.
#[cfg(feature = "failpoints")]
pub fn armed(machine: &str, state: &str, point: Point) -> bool {
    let armed = std::env::var(VARIABLE).is_ok_and(|armed| armed == format!("{machine}:{state}:{}", point.name()));
    if armed {
        tracing::warn!(machine, state, point = point.name(), "failpoint reached");
    }
    armed
}

/// Returns false: this build has no failpoints.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn armed(_machine: &str, _state: &str, _point: Point) -> bool {
    false
}

/// Does nothing: this build has no failpoints.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_machine: &str, _state: &str, _point: Point) {}
