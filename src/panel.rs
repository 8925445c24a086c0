//! The panel: one status LED and one button.
//!
//! - [`Board`] collects the condition each part of the agent reports and
//!   publishes the one the LED shows when several hold.
//! - [`pattern`]: the blink pattern of each condition.
//! - [`led`]: plays the shown condition's pattern on an LED.
//! - [`button`]: the debounced button as a pure state machine.
//! - [`gpio`] (cargo feature `gpio`): the LED and the button on a Raspberry
//!   Pi through rppal. Without it, the LED is simulated and the button is
//!   pressed with `autoupdate button short|long`.

pub mod button;
#[cfg(feature = "gpio")]
pub mod gpio;
pub mod led;
pub mod pattern;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::config::{PanelBackend, PanelConfig};
use crate::panel::button::{Button, ButtonAction, ButtonSettings};
use crate::panel::led::{Led, SimulatedLed};
use crate::runtime::Runtime;

/// Agent condition shown on the LED, from the highest priority to the
/// lowest. When several conditions apply, the LED shows the first in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Condition {
    ResetRunning,
    ResetArmed,
    NeedsAttention,
    NoSpace,
    WaitingForDocker,
    Applying,
    Downloading,
    Checking,
    RolledBack,
    Starting,
    Healthy,
}

impl Condition {
    pub const ALL: [Condition; 11] = [
        Condition::ResetRunning,
        Condition::ResetArmed,
        Condition::NeedsAttention,
        Condition::NoSpace,
        Condition::WaitingForDocker,
        Condition::Applying,
        Condition::Downloading,
        Condition::Checking,
        Condition::RolledBack,
        Condition::Starting,
        Condition::Healthy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Condition::ResetRunning => "factory reset running",
            Condition::ResetArmed => "factory reset armed",
            Condition::NeedsAttention => "needs attention",
            Condition::NoSpace => "no space",
            Condition::WaitingForDocker => "waiting for the Docker engine",
            Condition::Applying => "applying",
            Condition::Downloading => "downloading",
            Condition::Checking => "checking",
            Condition::RolledBack => "rolled back",
            Condition::Starting => "starting",
            Condition::Healthy => "idle and healthy",
        }
    }
}

/// Parts of the agent that report a condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    Agent,
    Stack,
    Host,
    /// The space guard: "no space" while a watched filesystem is low.
    Space,
    SelfUpdate,
    /// The button while a long hold has armed the factory reset.
    Button,
    FactoryReset,
}

/// Collects the condition of every source and publishes the one that wins.
#[derive(Debug, Clone)]
pub struct Board {
    conditions: Arc<Mutex<BTreeMap<Source, Condition>>>,
    shown: watch::Sender<Condition>,
}

impl Default for Board {
    fn default() -> Self {
        Board::new()
    }
}

impl Board {
    pub fn new() -> Board {
        let (shown, _) = watch::channel(Condition::Starting);
        Board { conditions: Arc::default(), shown }
    }

    /// Sets or clears the condition one source reports.
    pub fn set(&self, source: Source, condition: Option<Condition>) {
        let winner = {
            let mut conditions = self.conditions.lock().expect("no code panics while holding the board lock");
            match condition {
                Some(condition) => conditions.insert(source, condition),
                None => conditions.remove(&source),
            };
            conditions.values().min().copied().unwrap_or(Condition::Healthy)
        };
        self.shown.send_if_modified(|shown| {
            let changed = *shown != winner;
            *shown = winner;
            changed
        });
    }

    /// Returns the condition the LED shows now.
    pub fn shown(&self) -> Condition {
        *self.shown.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<Condition> {
        self.shown.subscribe()
    }
}

/// A raw change of the button input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edge {
    pub pressed: bool,
    pub at: Instant,
}

/// Sends button edges to the running agent: from the GPIO interrupt, or
/// simulated presses from the control API. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ButtonHandle {
    edges: mpsc::Sender<Edge>,
    pub settings: ButtonSettings,
}

/// Edges that may wait for the button task before new ones are dropped.
const EDGE_QUEUE: usize = 64;

impl ButtonHandle {
    /// Returns the handle and the receiver that [`run_button`] reads.
    pub fn new(settings: ButtonSettings) -> (ButtonHandle, mpsc::Receiver<Edge>) {
        let (edges, receiver) = mpsc::channel(EDGE_QUEUE);
        (ButtonHandle { edges, settings }, receiver)
    }

    /// Queues one edge. A full queue drops it: a button that bounces that
    /// fast is not being pressed on purpose.
    pub fn send(&self, pressed: bool, at: Instant) {
        if self.edges.try_send(Edge { pressed, at }).is_err() {
            tracing::debug!(pressed, "button edge dropped: the queue is full or the button task stopped");
        }
    }

    /// Simulates a press held for `hold`, then a clean release.
    pub fn press_for(&self, hold: Duration) {
        let handle = self.clone();
        self.send(true, Instant::now());
        tokio::spawn(async move {
            tokio::time::sleep(hold).await;
            handle.send(false, Instant::now());
        });
    }

    /// Returns how long `autoupdate button long` holds the button: past the
    /// arming time and halfway into the confirmation window.
    pub fn long_press(&self) -> Duration {
        let window = self.settings.cancel_after.saturating_sub(self.settings.long_hold);
        self.settings.long_hold + window / 2
    }
}

/// Feeds the button's edges through the debouncer and press logic and
/// passes each action to `on_action`, until every sender is gone.
pub async fn run_button(mut edges: mpsc::Receiver<Edge>, settings: ButtonSettings, pressed_at_start: bool, mut on_action: impl FnMut(ButtonAction)) {
    let start = Instant::now();
    let since_start = |at: Instant| at.saturating_duration_since(start);
    let mut button = Button::new(settings, pressed_at_start, Duration::ZERO);
    let mut closed = false;
    loop {
        let deadline = button.next_deadline().map(|deadline| start + deadline);
        if closed && deadline.is_none() {
            return;
        }
        let action = tokio::select! {
            edge = edges.recv(), if !closed => match edge {
                Some(edge) => button.edge(edge.pressed, since_start(edge.at)),
                // The last edges still settle before the task ends.
                None => {
                    closed = true;
                    None
                }
            },
            () = sleep_until(deadline) => button.tick(since_start(Instant::now())),
        };
        if let Some(action) = action {
            tracing::info!(?action, "button");
            on_action(action);
        }
    }
}

/// Starts the LED and the button tasks of `config.backend`, which run until
/// the returned task is aborted.
pub fn spawn(config: &PanelConfig, runtime: Arc<Runtime>, edges: mpsc::Receiver<Edge>) -> tokio::task::JoinHandle<()> {
    let shown = runtime.board.subscribe();
    let settings = config.button_settings();
    let (led, pressed_at_start): (Box<dyn Led>, bool) = match config.backend {
        PanelBackend::Simulated => (Box::new(SimulatedLed::new()), false),
        #[cfg(feature = "gpio")]
        PanelBackend::Gpio => match gpio::open(config.led_pin, config.button_pin, runtime.button.clone()) {
            Ok((led, button)) => {
                let pressed = button.pressed_at_start;
                // The input pin must live as long as the agent: its interrupt
                // thread sends the button's edges.
                std::mem::forget(button);
                (Box::new(led), pressed)
            }
            Err(error) => {
                tracing::error!(%error, "GPIO not available; the LED is simulated in the log");
                (Box::new(SimulatedLed::new()), false)
            }
        },
        #[cfg(not(feature = "gpio"))]
        PanelBackend::Gpio => {
            tracing::error!("panel.backend is \"gpio\", but this build has no GPIO support (cargo feature gpio); the LED is simulated in the log");
            (Box::new(SimulatedLed::new()), false)
        }
    };

    tokio::spawn(async move {
        let button = run_button(edges, settings, pressed_at_start, |action| handle_action(&runtime, action));
        tokio::join!(led::run_led(shown, led), button);
    })
}

/// Carries out what a button press means.
fn handle_action(runtime: &Runtime, action: ButtonAction) {
    match action {
        ButtonAction::CheckNow => {
            tracing::info!("button: short press, checking for an update");
            runtime.stack_wake.notify_one();
        }
        ButtonAction::ResetArmed => {
            tracing::warn!("button: factory reset armed; release the button now to start it, or keep holding to cancel");
            runtime.board.set(Source::Button, Some(Condition::ResetArmed));
        }
        ButtonAction::ResetCancelled => {
            tracing::info!("button: held too long, factory reset cancelled");
            runtime.board.set(Source::Button, None);
        }
        ButtonAction::ResetConfirmed => {
            runtime.board.set(Source::Button, None);
            runtime.factory_reset.request("requested with the panel button");
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn higher_priority_condition_wins() {
        let board = Board::new();

        board.set(Source::Stack, Some(Condition::Applying));
        board.set(Source::Agent, Some(Condition::NoSpace));

        assert_eq!(board.shown(), Condition::NoSpace);
    }

    #[test]
    fn cleared_condition_falls_back() {
        let board = Board::new();
        board.set(Source::Stack, Some(Condition::Applying));

        board.set(Source::Stack, None);

        assert_eq!(board.shown(), Condition::Healthy);
    }

    /// Runs the button task on `edges` and returns the actions with the
    /// milliseconds since the start at which they came.
    async fn button_actions(script: impl FnOnce(ButtonHandle) -> tokio::task::JoinHandle<()>, run_for: Duration) -> Vec<(u64, ButtonAction)> {
        let (handle, edges) = ButtonHandle::new(ButtonSettings::default());
        let actions = Arc::new(Mutex::new(Vec::new()));
        let start = Instant::now();
        let recorded = actions.clone();
        let task = tokio::spawn(run_button(edges, ButtonSettings::default(), false, move |action| {
            recorded.lock().unwrap().push((start.elapsed().as_millis() as u64, action));
        }));

        let script = script(handle);
        tokio::time::sleep(run_for).await;
        script.abort();
        task.abort();
        actions.lock().unwrap().clone()
    }

    #[tokio::test(start_paused = true)]
    async fn simulated_short_press_checks_now() {
        let actions = button_actions(|button| tokio::spawn(async move { button.press_for(Duration::from_millis(200)) }), Duration::from_secs(2)).await;

        assert_eq!(actions, vec![(250, ButtonAction::CheckNow)]);
    }

    #[tokio::test(start_paused = true)]
    async fn simulated_long_press_arms_then_confirms() {
        let actions = button_actions(
            |button| {
                tokio::spawn(async move {
                    let hold = button.long_press();
                    button.press_for(hold);
                })
            },
            Duration::from_secs(12),
        )
        .await;

        assert_eq!(actions, vec![(5000, ButtonAction::ResetArmed), (7550, ButtonAction::ResetConfirmed)]);
    }

    #[tokio::test(start_paused = true)]
    async fn bouncing_edges_count_once() {
        let actions = button_actions(
            |button| {
                tokio::spawn(async move {
                    for (delay_ms, pressed) in [(0, true), (3, false), (4, true), (5, false), (2, true), (150, false), (4, true), (3, false)] {
                        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                        button.send(pressed, Instant::now());
                    }
                })
            },
            Duration::from_secs(2),
        )
        .await;

        assert_eq!(actions, vec![(221, ButtonAction::CheckNow)]);
    }

    #[tokio::test(start_paused = true)]
    async fn held_button_cancels_itself() {
        let actions = button_actions(|button| tokio::spawn(async move { button.press_for(Duration::from_secs(60)) }), Duration::from_secs(70)).await;

        assert_eq!(actions, vec![(5000, ButtonAction::ResetArmed), (10_000, ButtonAction::ResetCancelled)]);
    }
}
