//! The factory-reset machine: wait for the turn, bring the stack down,
//! restore the factory images from the reserved partition, run the optional
//! script, and bring the factory stack up. It needs no network.
//!
//! The machine is pure. Its memory ([`FactoryResetMemory`]) is persisted in
//! the journal with every transition, and the commands it queues
//! ([`FactoryCommand`]) run only after that record is synced. Every command
//! can run again after a power cut: stopping a stopped stack, loading a
//! loaded image and starting a running stack change nothing.

use serde::{Deserialize, Serialize};

use crate::machine::MachineKind;
use crate::model::Failure;

crate::define_machine! {
    machine: MachineKind::FactoryReset,
    smlang: FactoryReset, FactoryResetStates, FactoryResetEvents,
    states: FactoryResetState {
        Idle = 1,
        Armed = 2,
        StoppingStack = 3,
        Restoring = 4,
        RunningScript = 5,
        StartingFactory = 6,
    },
    events: FactoryResetEvent {
        Requested = 1,
        Resumed = 2,
        TurnTaken = 3,
        StackStopped = 4,
        Restored = 5,
        ScriptDone = 6,
        FactoryUp = 7,
        StepFailed = 8,
    },
    table: FACTORY_RESET_TABLE,
    transitions: {
        Idle + Requested(String) / arm = Armed,
        Idle + Resumed = Idle,

        Armed + TurnTaken / stop_stack = StoppingStack,
        Armed + StepFailed(Failure) / give_up = Idle,
        Armed + Resumed / wait_for_turn = Armed,

        StoppingStack + StackStopped / restore = Restoring,
        StoppingStack + StepFailed(Failure) / give_up = Idle,
        StoppingStack + Resumed [can_resume] / stop_stack_again = StoppingStack,
        StoppingStack + Resumed / give_up_after_crashes = Idle,

        Restoring + Restored / run_script = RunningScript,
        Restoring + StepFailed(Failure) / give_up = Idle,
        Restoring + Resumed [can_resume] / restore_again = Restoring,
        Restoring + Resumed / give_up_after_crashes = Idle,

        RunningScript + ScriptDone / start_factory = StartingFactory,
        RunningScript + StepFailed(Failure) / give_up = Idle,
        RunningScript + Resumed [can_resume] / run_script_again = RunningScript,
        RunningScript + Resumed / give_up_after_crashes = Idle,

        StartingFactory + FactoryUp / finish = Idle,
        StartingFactory + StepFailed(Failure) / give_up = Idle,
        StartingFactory + Resumed [can_resume] / start_factory_again = StartingFactory,
        StartingFactory + Resumed / give_up_after_crashes = Idle,
    }
}

/// Result of the last factory reset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FactoryOutcome {
    /// The factory stack is up.
    Done { reason: String },
    /// A step failed or the agent restarted too often; the device needs a person.
    Failed { reason: String, error: String },
}

/// Factory-reset memory kept between transitions and persisted in the journal.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FactoryResetMemory {
    /// Reason for the reset in progress: the button, or the stack update's
    /// last fallback.
    pub reason: Option<String>,
    /// Restarts of the agent since the reset left `Armed`.
    pub resumes: u32,
    pub resets_done: u32,
    pub resets_failed: u32,
    pub last_outcome: Option<FactoryOutcome>,
}

/// Work for the driver, queued by the machine's actions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FactoryCommand {
    /// Wait until no other process changes the device, then report `TurnTaken`.
    WaitForTurn,
    /// Stop and remove the containers of the stack's Compose project.
    StopStack,
    /// Load the factory image archives into the engine.
    Restore,
    /// Run the configured script, or report `ScriptDone` at once without one.
    RunScript { reason: String },
    /// Bring the factory compose files up.
    StartFactory,
}

/// Limits the machine reads from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FactoryResetSettings {
    /// Agent restarts allowed in one reset before it gives up.
    pub max_resumes: u32,
}

impl Default for FactoryResetSettings {
    fn default() -> Self {
        FactoryResetSettings { max_resumes: 5 }
    }
}

/// Memory and queued commands of a running factory-reset machine.
#[derive(Debug, Default)]
pub struct FactoryResetContext {
    pub memory: FactoryResetMemory,
    pub settings: FactoryResetSettings,
    pub commands: Vec<FactoryCommand>,
}

/// Result type smlang expects from an action; `Err` leaves the state as it was.
type ActionResult = Result<(), ()>;

impl FactoryResetContext {
    fn reason(&self) -> String {
        self.memory.reason.clone().unwrap_or_default()
    }

    fn fail(&mut self, error: String) {
        let reason = self.memory.reason.take().unwrap_or_default();
        self.memory.resets_failed += 1;
        self.memory.resumes = 0;
        self.memory.last_outcome = Some(FactoryOutcome::Failed { reason, error });
    }
}

impl FactoryResetStateMachineContext for FactoryResetContext {
    fn can_resume(&self) -> Result<bool, ()> {
        Ok(self.memory.resumes < self.settings.max_resumes)
    }

    fn arm(&mut self, reason: String) -> ActionResult {
        self.memory.reason = Some(reason);
        self.memory.resumes = 0;
        self.commands.push(FactoryCommand::WaitForTurn);
        Ok(())
    }

    /// Waits for the turn again after a restart. Restarts do not count here:
    /// nothing on the device has changed yet.
    fn wait_for_turn(&mut self) -> ActionResult {
        self.commands.push(FactoryCommand::WaitForTurn);
        Ok(())
    }

    fn stop_stack(&mut self) -> ActionResult {
        self.commands.push(FactoryCommand::StopStack);
        Ok(())
    }

    fn stop_stack_again(&mut self) -> ActionResult {
        self.memory.resumes += 1;
        self.commands.push(FactoryCommand::WaitForTurn);
        self.commands.push(FactoryCommand::StopStack);
        Ok(())
    }

    fn restore(&mut self) -> ActionResult {
        self.commands.push(FactoryCommand::Restore);
        Ok(())
    }

    fn restore_again(&mut self) -> ActionResult {
        self.memory.resumes += 1;
        self.commands.push(FactoryCommand::WaitForTurn);
        self.commands.push(FactoryCommand::Restore);
        Ok(())
    }

    fn run_script(&mut self) -> ActionResult {
        let reason = self.reason();
        self.commands.push(FactoryCommand::RunScript { reason });
        Ok(())
    }

    fn run_script_again(&mut self) -> ActionResult {
        self.memory.resumes += 1;
        self.commands.push(FactoryCommand::WaitForTurn);
        self.run_script()
    }

    fn start_factory(&mut self) -> ActionResult {
        self.commands.push(FactoryCommand::StartFactory);
        Ok(())
    }

    fn start_factory_again(&mut self) -> ActionResult {
        self.memory.resumes += 1;
        self.commands.push(FactoryCommand::WaitForTurn);
        self.commands.push(FactoryCommand::StartFactory);
        Ok(())
    }

    fn finish(&mut self) -> ActionResult {
        let reason = self.memory.reason.take().unwrap_or_default();
        self.memory.resets_done += 1;
        self.memory.resumes = 0;
        self.memory.last_outcome = Some(FactoryOutcome::Done { reason });
        Ok(())
    }

    fn give_up(&mut self, failure: Failure) -> ActionResult {
        self.fail(failure.message);
        Ok(())
    }

    fn give_up_after_crashes(&mut self) -> ActionResult {
        self.fail("the agent restarted too often during the factory reset".into());
        Ok(())
    }
}

/// Result of feeding one event to the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FactoryStep {
    pub from: FactoryResetState,
    pub event: FactoryResetEvent,
    pub to: FactoryResetState,
    /// Commands to run once the transition is persisted.
    pub commands: Vec<FactoryCommand>,
    pub failure: Option<Failure>,
    pub memory_changed: bool,
}

/// Error for an event the current state does not take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the factory-reset machine in state {state:?} does not take event {event:?}")]
pub struct UnexpectedEvent {
    pub state: FactoryResetState,
    pub event: FactoryResetEvent,
}

/// The factory-reset machine with its context.
pub struct FactoryResetMachine {
    inner: FactoryResetStateMachine<FactoryResetContext>,
}

impl FactoryResetMachine {
    /// Builds a machine in `state` with persisted `memory`, as after a restart.
    pub fn restore(state: FactoryResetState, memory: FactoryResetMemory, settings: FactoryResetSettings) -> Self {
        let context = FactoryResetContext { memory, settings, commands: Vec::new() };
        FactoryResetMachine { inner: FactoryResetStateMachine::new_with_state(context, state.into()) }
    }

    pub fn state(&self) -> FactoryResetState {
        self.inner.state().into()
    }

    pub fn memory(&self) -> &FactoryResetMemory {
        &self.inner.context().memory
    }

    /// Feeds one event. On error the machine, its memory and its queue are
    /// unchanged.
    pub fn handle(&mut self, event: FactoryResetEvents) -> Result<FactoryStep, UnexpectedEvent> {
        let from = self.state();
        let event_code = FactoryResetEvent::from(&event);
        let failure = match &event {
            FactoryResetEvents::StepFailed(failure) => Some(failure.clone()),
            _ => None,
        };
        let before = self.inner.context().memory.clone();

        if self.inner.process_event(event).is_err() {
            let context = self.inner.context_mut();
            context.memory = before;
            context.commands.clear();
            return Err(UnexpectedEvent { state: from, event: event_code });
        }

        let context = self.inner.context_mut();
        let commands = std::mem::take(&mut context.commands);
        let memory_changed = context.memory != before;
        Ok(FactoryStep { from, event: event_code, to: self.state(), commands, failure, memory_changed })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use FactoryResetState::*;

    fn fresh() -> FactoryResetMachine {
        FactoryResetMachine::restore(Idle, FactoryResetMemory::default(), FactoryResetSettings::default())
    }

    fn feed(machine: &mut FactoryResetMachine, events: Vec<FactoryResetEvents>) -> Vec<FactoryResetState> {
        events.into_iter().map(|event| machine.handle(event).expect("every event in these scenarios is expected").to).collect()
    }

    fn full_reset() -> Vec<FactoryResetEvents> {
        vec![
            FactoryResetEvents::Requested("button".into()),
            FactoryResetEvents::TurnTaken,
            FactoryResetEvents::StackStopped,
            FactoryResetEvents::Restored,
            FactoryResetEvents::ScriptDone,
            FactoryResetEvents::FactoryUp,
        ]
    }

    #[test]
    fn reset_runs_every_step() {
        let mut machine = fresh();

        let states = feed(&mut machine, full_reset());

        assert_eq!(states, vec![Armed, StoppingStack, Restoring, RunningScript, StartingFactory, Idle]);
        assert_eq!(machine.memory().resets_done, 1);
        assert_eq!(machine.memory().reason, None);
        assert_eq!(machine.memory().last_outcome, Some(FactoryOutcome::Done { reason: "button".into() }));
    }

    #[test]
    fn each_step_queues_its_command() {
        let mut machine = fresh();

        let commands: Vec<Vec<FactoryCommand>> = full_reset().into_iter().map(|event| machine.handle(event).unwrap().commands).collect();

        assert_eq!(
            commands,
            vec![
                vec![FactoryCommand::WaitForTurn],
                vec![FactoryCommand::StopStack],
                vec![FactoryCommand::Restore],
                vec![FactoryCommand::RunScript { reason: "button".into() }],
                vec![FactoryCommand::StartFactory],
                vec![],
            ]
        );
    }

    #[test]
    fn resume_repeats_step_after_turn() {
        let mut machine = fresh();
        feed(&mut machine, full_reset()[..3].to_vec());

        let step = machine.handle(FactoryResetEvents::Resumed).unwrap();

        assert_eq!(step.to, Restoring);
        assert_eq!(step.commands, vec![FactoryCommand::WaitForTurn, FactoryCommand::Restore]);
        assert_eq!(machine.memory().resumes, 1);
    }

    #[test]
    fn armed_reset_waits_again_after_restart() {
        let mut machine = fresh();
        feed(&mut machine, vec![FactoryResetEvents::Requested("button".into())]);

        let step = machine.handle(FactoryResetEvents::Resumed).unwrap();

        assert_eq!(step.to, Armed);
        assert_eq!(step.commands, vec![FactoryCommand::WaitForTurn]);
        assert_eq!(machine.memory().resumes, 0);
    }

    #[test]
    fn crash_loop_gives_up() {
        let mut machine = fresh();
        feed(&mut machine, full_reset()[..4].to_vec());

        let states: Vec<FactoryResetState> = (0..6).map(|_| machine.handle(FactoryResetEvents::Resumed).unwrap().to).collect();

        assert_eq!(&states[..5], &[RunningScript; 5]);
        assert_eq!(states[5], Idle);
        assert_eq!(machine.memory().resets_failed, 1);
        assert!(matches!(&machine.memory().last_outcome, Some(FactoryOutcome::Failed { error, .. }) if error.contains("restarted too often")));
    }

    #[test]
    fn failed_step_ends_reset() {
        let mut machine = fresh();
        feed(&mut machine, full_reset()[..3].to_vec());

        let step = machine.handle(FactoryResetEvents::StepFailed(Failure::local("no factory images"))).unwrap();

        assert_eq!(step.to, Idle);
        assert_eq!(step.failure.map(|failure| failure.message), Some("no factory images".to_string()));
        assert_eq!(machine.memory().resets_failed, 1);
        assert_eq!(machine.memory().resets_done, 0);
    }

    #[test]
    fn request_during_reset_is_unexpected() {
        let mut machine = fresh();
        feed(&mut machine, full_reset()[..2].to_vec());
        let before = machine.memory().clone();

        let error = machine.handle(FactoryResetEvents::Requested("again".into())).unwrap_err();

        assert_eq!(error.state, StoppingStack);
        assert_eq!(machine.memory(), &before);
    }

    #[test]
    fn busy_states_handle_resumed_and_failure() {
        let resumed = FactoryResetEvent::Resumed.code();
        let failed = FactoryResetEvent::StepFailed.code();
        for state in FactoryResetState::ALL.iter().filter(|state| **state != Idle) {
            assert!(FACTORY_RESET_TABLE.handles(state.code(), resumed), "{state:?} handles Resumed");
            assert!(FACTORY_RESET_TABLE.handles(state.code(), failed), "{state:?} handles StepFailed");
        }
    }
}
