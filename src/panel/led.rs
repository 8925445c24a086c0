//! Plays the blink pattern of the condition the board shows.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::panel::Condition;
use crate::panel::pattern::{Pattern, spec};

/// An LED that can be switched on and off.
pub trait Led: Send {
    fn set(&mut self, on: bool);
}

impl<T: Led + ?Sized> Led for Box<T> {
    fn set(&mut self, on: bool) {
        (**self).set(on);
    }
}

/// One change of a simulated LED.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedChange {
    /// Time since the LED task started.
    pub at: Duration,
    pub on: bool,
}

/// An LED that records its changes and writes them to the log at trace
/// level, for tests and for running the agent on a laptop.
#[derive(Debug, Clone)]
pub struct SimulatedLed {
    started: Instant,
    level: Option<bool>,
    changes: Arc<Mutex<Vec<LedChange>>>,
}

impl Default for SimulatedLed {
    fn default() -> Self {
        SimulatedLed::new()
    }
}

impl SimulatedLed {
    pub fn new() -> SimulatedLed {
        SimulatedLed { started: Instant::now(), level: None, changes: Arc::default() }
    }

    /// Returns every change so far, oldest first.
    pub fn changes(&self) -> Vec<LedChange> {
        self.changes.lock().expect("no code panics while holding the LED lock").clone()
    }
}

impl Led for SimulatedLed {
    fn set(&mut self, on: bool) {
        if self.level == Some(on) {
            return;
        }
        self.level = Some(on);
        let at = self.started.elapsed();
        tracing::trace!(on, at_ms = at.as_millis() as u64, "LED level");
        self.changes.lock().expect("no code panics while holding the LED lock").push(LedChange { at, on });
    }
}

/// Plays the pattern of the shown condition on `led` until the board is
/// dropped. A change of condition starts the new pattern at once, from its
/// first phase. Each change is logged: at info level, except the short
/// "checking" that every quiet poll shows, which goes to debug.
pub async fn run_led(mut shown: watch::Receiver<Condition>, mut led: impl Led) {
    let mut current = *shown.borrow_and_update();
    tracing::info!(led = current.name(), pattern = spec(current).looks_like, "LED");
    loop {
        let pattern = Pattern::of(current);
        let changed = play(&pattern, &mut led, &mut shown).await;
        if !changed {
            return;
        }

        let next = *shown.borrow_and_update();
        if next != current {
            let routine = matches!((current, next), (Condition::Healthy, Condition::Checking) | (Condition::Checking, Condition::Healthy));
            current = next;
            let pattern = spec(current).looks_like;
            if routine {
                tracing::debug!(led = current.name(), pattern, "LED");
            } else {
                tracing::info!(led = current.name(), pattern, "LED");
            }
        }
    }
}

/// Plays `pattern` in a loop until the shown condition changes. Returns
/// `false` when the board is gone.
async fn play(pattern: &Pattern, led: &mut impl Led, shown: &mut watch::Receiver<Condition>) -> bool {
    if pattern.is_steady() {
        led.set(pattern.phases()[0].on);
        return shown.changed().await.is_ok();
    }
    loop {
        for phase in pattern.phases() {
            led.set(phase.on);
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(u64::from(phase.ms))) => {}
                changed = shown.changed() => return changed.is_ok(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::panel::{Board, Source};

    /// Returns the levels the LED showed, as (milliseconds, on) pairs.
    fn timeline(led: &SimulatedLed) -> Vec<(u64, bool)> {
        led.changes().iter().map(|change| (change.at.as_millis() as u64, change.on)).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn healthy_blips_every_three_seconds() {
        let board = Board::new();
        board.set(Source::Agent, None);
        let led = SimulatedLed::new();
        let task = tokio::spawn(run_led(board.subscribe(), led.clone()));

        tokio::time::sleep(Duration::from_millis(6050)).await;

        assert_eq!(timeline(&led), vec![(0, true), (100, false), (3000, true), (3100, false), (6000, true)]);
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn rolled_back_blinks_twice() {
        let board = Board::new();
        board.set(Source::Stack, Some(Condition::RolledBack));
        let led = SimulatedLed::new();
        let task = tokio::spawn(run_led(board.subscribe(), led.clone()));

        tokio::time::sleep(Duration::from_millis(2100)).await;

        assert_eq!(timeline(&led), vec![(0, true), (200, false), (400, true), (600, false), (2000, true)]);
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn change_restarts_pattern() {
        let board = Board::new();
        board.set(Source::Stack, Some(Condition::Checking));
        let led = SimulatedLed::new();
        let task = tokio::spawn(run_led(board.subscribe(), led.clone()));
        tokio::time::sleep(Duration::from_millis(700)).await;

        board.set(Source::Stack, Some(Condition::Applying));
        tokio::time::sleep(Duration::from_millis(400)).await;

        assert_eq!(timeline(&led), vec![(0, true), (500, false), (700, true), (850, false), (1000, true)]);
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn higher_priority_pattern_wins() {
        let board = Board::new();
        board.set(Source::Stack, Some(Condition::Applying));
        board.set(Source::Space, Some(Condition::NoSpace));
        let led = SimulatedLed::new();
        let task = tokio::spawn(run_led(board.subscribe(), led.clone()));

        tokio::time::sleep(Duration::from_millis(1650)).await;

        let expected = vec![(0, true), (200, false), (400, true), (600, false), (800, true), (1000, false), (1200, true), (1400, false)];
        assert_eq!(timeline(&led), expected, "no space outranks applying");
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn steady_pattern_stays_on() {
        let board = Board::new();
        board.set(Source::Agent, Some(Condition::Starting));
        let led = SimulatedLed::new();
        let task = tokio::spawn(run_led(board.subscribe(), led.clone()));

        tokio::time::sleep(Duration::from_secs(30)).await;

        assert_eq!(timeline(&led), vec![(0, true)]);
        task.abort();
    }
}
