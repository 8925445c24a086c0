//! The panel button as a pure state machine: raw edges and times go in,
//! debounced presses and their meaning come out.
//!
//! A press shorter than `long_hold` requests an update check. Holding for
//! `long_hold` arms the factory reset, and releasing before `cancel_after`
//! confirms it. Holding until `cancel_after` cancels it, so a stuck or
//! shorted button never resets a device. A button already pressed when the
//! agent starts counts only after it has been released once.

use std::time::Duration;

/// Timing of the button, from `[panel]` in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ButtonSettings {
    /// A level must stay this long before it counts.
    pub debounce: Duration,
    /// Holding this long arms the factory reset.
    pub long_hold: Duration,
    /// Holding this long, counted from the press, cancels the armed reset.
    pub cancel_after: Duration,
}

impl Default for ButtonSettings {
    fn default() -> Self {
        ButtonSettings { debounce: Duration::from_millis(50), long_hold: Duration::from_secs(5), cancel_after: Duration::from_secs(10) }
    }
}

/// Meaning of a debounced press.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ButtonAction {
    /// A short press: check for an update now.
    CheckNow,
    /// The hold reached `long_hold`: the LED shows the reset as armed.
    ResetArmed,
    /// Released while armed: start the factory reset.
    ResetConfirmed,
    /// Held until `cancel_after`: the armed reset is dropped.
    ResetCancelled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Released,
    /// Pressed since the given time, not yet held long enough to arm.
    Pressed {
        since: Duration,
    },
    Armed {
        since: Duration,
    },
    /// Held past `cancel_after`, or pressed when the agent started: nothing
    /// counts until the next release.
    Ignored,
}

/// The button's debouncer and press logic. Times are durations since any
/// fixed start, such as the agent's start; they must not go backwards.
#[derive(Debug, Clone)]
pub struct Button {
    settings: ButtonSettings,
    /// The last raw level and when it started.
    raw: bool,
    raw_since: Duration,
    /// The debounced level.
    stable: bool,
    phase: Phase,
}

impl Button {
    /// Builds the machine for a button whose level at `now` is `pressed`.
    pub fn new(settings: ButtonSettings, pressed: bool, now: Duration) -> Button {
        let phase = if pressed { Phase::Ignored } else { Phase::Released };
        Button { settings, raw: pressed, raw_since: now, stable: pressed, phase }
    }

    /// Feeds a raw edge: the input read `pressed` from `at` on.
    pub fn edge(&mut self, pressed: bool, at: Duration) -> Option<ButtonAction> {
        let action = self.tick(at);
        if pressed != self.raw {
            self.raw = pressed;
            self.raw_since = at;
        }
        action
    }

    /// Advances time to `now` with no new edge.
    pub fn tick(&mut self, now: Duration) -> Option<ButtonAction> {
        if self.raw != self.stable && now.saturating_sub(self.raw_since) >= self.settings.debounce {
            self.stable = self.raw;
            let action = self.settle(self.raw, self.raw_since);
            if action.is_some() {
                return action;
            }
        }
        self.hold(now)
    }

    /// Returns the next time at which [`Button::tick`] may return an action
    /// without a new edge.
    pub fn next_deadline(&self) -> Option<Duration> {
        if self.raw != self.stable {
            return Some(self.raw_since + self.settings.debounce);
        }
        match self.phase {
            Phase::Pressed { since } => Some(since + self.settings.long_hold),
            Phase::Armed { since } => Some(since + self.settings.cancel_after),
            Phase::Released | Phase::Ignored => None,
        }
    }

    /// Tells whether a reset is armed and waits for the release.
    pub fn is_armed(&self) -> bool {
        matches!(self.phase, Phase::Armed { .. })
    }

    /// Applies a debounced level change that happened at `at`.
    fn settle(&mut self, pressed: bool, at: Duration) -> Option<ButtonAction> {
        match (pressed, self.phase) {
            (true, Phase::Released) => {
                self.phase = Phase::Pressed { since: at };
                None
            }
            (false, Phase::Pressed { since }) => {
                self.phase = Phase::Released;
                (at.saturating_sub(since) < self.settings.long_hold).then_some(ButtonAction::CheckNow)
            }
            (false, Phase::Armed { since }) => {
                self.phase = Phase::Released;
                let inside_window = at.saturating_sub(since) < self.settings.cancel_after;
                Some(if inside_window { ButtonAction::ResetConfirmed } else { ButtonAction::ResetCancelled })
            }
            (false, Phase::Ignored) => {
                self.phase = Phase::Released;
                None
            }
            _ => None,
        }
    }

    /// Arms or cancels when a hold reaches its limit.
    fn hold(&mut self, now: Duration) -> Option<ButtonAction> {
        match self.phase {
            Phase::Pressed { since } if now.saturating_sub(since) >= self.settings.long_hold => {
                self.phase = Phase::Armed { since };
                Some(ButtonAction::ResetArmed)
            }
            Phase::Armed { since } if now.saturating_sub(since) >= self.settings.cancel_after => {
                self.phase = Phase::Ignored;
                Some(ButtonAction::ResetCancelled)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(value: u64) -> Duration {
        Duration::from_millis(value)
    }

    /// Feeds `edges` as (milliseconds, pressed) and ticks every 10 ms up to
    /// `end_ms`, collecting every action with its time.
    fn run(edges: &[(u64, bool)], end_ms: u64) -> Vec<(u64, ButtonAction)> {
        let mut button = Button::new(ButtonSettings::default(), false, ms(0));
        let mut actions = Vec::new();
        let mut pending = edges.iter().peekable();
        for now in (0..=end_ms).step_by(10) {
            while let Some(&&(at, pressed)) = pending.peek() {
                if at > now {
                    break;
                }
                if let Some(action) = button.edge(pressed, ms(at)) {
                    actions.push((at, action));
                }
                pending.next();
            }
            if let Some(action) = button.tick(ms(now)) {
                actions.push((now, action));
            }
        }
        actions
    }

    #[test]
    fn bounce_counts_as_one_press() {
        let bouncy = [(100, true), (103, false), (107, true), (112, false), (115, true), (300, false), (304, true), (309, false)];

        let actions = run(&bouncy, 1000);

        assert_eq!(actions.iter().map(|(_, action)| *action).collect::<Vec<_>>(), vec![ButtonAction::CheckNow]);
    }

    #[test]
    fn glitch_shorter_than_debounce_is_ignored() {
        let actions = run(&[(100, true), (120, false)], 1000);

        assert!(actions.is_empty(), "{actions:?}");
    }

    #[test]
    fn short_press_checks_now() {
        let actions = run(&[(100, true), (400, false)], 1000);

        assert_eq!(actions, vec![(450, ButtonAction::CheckNow)]);
    }

    #[test]
    fn long_hold_then_release_confirms() {
        let actions = run(&[(0, true), (7000, false)], 8000);

        assert_eq!(actions, vec![(5000, ButtonAction::ResetArmed), (7050, ButtonAction::ResetConfirmed)]);
    }

    #[test]
    fn hold_past_cancel_time_does_not_reset() {
        let actions = run(&[(0, true), (30_000, false)], 31_000);

        assert_eq!(actions, vec![(5000, ButtonAction::ResetArmed), (10_000, ButtonAction::ResetCancelled)]);
    }

    #[test]
    fn stuck_button_never_resets() {
        let actions = run(&[(0, true)], 120_000);

        assert_eq!(actions, vec![(5000, ButtonAction::ResetArmed), (10_000, ButtonAction::ResetCancelled)]);
    }

    #[test]
    fn button_pressed_at_start_is_ignored_until_released() {
        let mut button = Button::new(ButtonSettings::default(), true, ms(0));

        let during_hold = (0..=20_000).step_by(10).filter_map(|now| button.tick(ms(now))).count();
        let release = button.edge(false, ms(20_000));
        let after_release = button.tick(ms(20_100));
        button.edge(true, ms(21_000));
        button.edge(false, ms(21_200));
        let next_press = button.tick(ms(21_300));

        assert_eq!(during_hold, 0);
        assert_eq!(release, None);
        assert_eq!(after_release, None);
        assert_eq!(next_press, Some(ButtonAction::CheckNow));
    }

    #[test]
    fn bounce_on_release_of_long_hold_confirms_once() {
        let edges = [(0, true), (6000, false), (6004, true), (6010, false), (6013, true), (6020, false)];

        let actions = run(&edges, 8000);

        assert_eq!(actions, vec![(5000, ButtonAction::ResetArmed), (6070, ButtonAction::ResetConfirmed)]);
    }

    #[test]
    fn deadline_points_at_next_action() {
        let mut button = Button::new(ButtonSettings::default(), false, ms(0));
        assert_eq!(button.next_deadline(), None);

        button.edge(true, ms(100));
        assert_eq!(button.next_deadline(), Some(ms(150)));
        button.tick(ms(150));
        assert_eq!(button.next_deadline(), Some(ms(5100)));
        assert_eq!(button.tick(ms(5100)), Some(ButtonAction::ResetArmed));
        assert!(button.is_armed());
        assert_eq!(button.next_deadline(), Some(ms(10_100)));
    }
}
