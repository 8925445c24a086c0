//! Failpoints: `AUTOUPDATE_FAILPOINT=machine:State:point` kills the process
//! with SIGKILL at that spot, as a power cut would.
//!
//! `point` is `after-persist` (the transition into `State` is synced to the
//! journal) or `before-command` (the command of `State` is about to start).
//! The check is compiled in only with the `failpoints` cargo feature, so a
//! release build ignores the variable.

/// Spots where a failpoint can stop the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    AfterPersist,
    BeforeCommand,
}

impl Point {
    pub fn name(self) -> &'static str {
        match self {
            Point::AfterPersist => "after-persist",
            Point::BeforeCommand => "before-command",
        }
    }
}

/// Name of the environment variable that arms a failpoint.
pub const VARIABLE: &str = "AUTOUPDATE_FAILPOINT";

/// Tells whether this build honours failpoints.
pub const ENABLED: bool = cfg!(feature = "failpoints");

/// Kills the process when the armed failpoint matches this spot.
#[cfg(feature = "failpoints")]
pub fn hit(machine: &str, state: &str, point: Point) {
    let Ok(armed) = std::env::var(VARIABLE) else { return };
    if armed == format!("{machine}:{state}:{}", point.name()) {
        tracing::warn!(machine, state, point = point.name(), "failpoint reached, killing the agent");
        // SAFETY: sending a signal to our own pid has no memory effects.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// Does nothing: this build has no failpoints.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_machine: &str, _state: &str, _point: Point) {}
