//! Runs the factory-reset machine: waits for a request, persists every step
//! to the journal, and only then runs the commands the step queued.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bollard::query_parameters::{ListContainersOptionsBuilder, RemoveContainerOptionsBuilder, StopContainerOptionsBuilder};

use crate::coordinator::{Process, Turn};
use crate::driver::compose::Compose;
use crate::driver::docker::{Engine, PROJECT_LABEL};
use crate::driver::factory::material;
use crate::driver::process::{self, CommandSpec};
use crate::failpoint::{self, Point};
use crate::journal::record::{FactoryResetMemoryRecord, MachineErrorRecord, TransitionRecord};
use crate::journal::{JournalError, Record};
use crate::machine::MachineKind;
use crate::machine::factory::{
    FactoryCommand, FactoryOutcome, FactoryResetEvent, FactoryResetEvents, FactoryResetMachine, FactoryResetSettings, FactoryResetState, FactoryStep,
};
use crate::model::Failure;
use crate::notify::{Notice, Severity};
use crate::panel::{Condition, Source};
use crate::runtime::{Progress, Runtime};

/// Time a service gets to stop before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Factory-reset driver settings, read from the configuration.
#[derive(Debug, Clone)]
pub struct FactorySettings {
    /// Directory of the factory material.
    pub directory: PathBuf,
    /// Compose project of the running stack, which the reset brings down.
    /// Default: the project in the material's manifest.
    pub project: Option<String>,
    /// Program and leading arguments that run Compose v2.
    pub compose_command: Vec<String>,
    pub compose_timeout: Duration,
    pub docker_host: Option<String>,
    /// Optional script run on the device after the images are restored.
    pub script: Vec<String>,
    pub script_timeout: Duration,
    pub machine: FactoryResetSettings,
}

/// Errors that stop the factory-reset driver.
#[derive(Debug, thiserror::Error)]
pub enum FactoryDriverError {
    /// The journal cannot record a step, so the driver must not act on it.
    #[error("cannot record a factory-reset transition: {0}")]
    Journal(#[from] JournalError),
}

/// The factory-reset machine with everything it needs to act.
pub struct FactoryResetDriver {
    machine: FactoryResetMachine,
    queue: VecDeque<FactoryCommand>,
    runtime: Arc<Runtime>,
    engine: Engine,
    settings: FactorySettings,
    /// The turn to change the device, held from `Armed` until `Idle`.
    turn: Option<Turn>,
}

impl FactoryResetDriver {
    /// Builds the driver with the machine in the state the journal records.
    pub fn new(runtime: Arc<Runtime>, engine: Engine, settings: FactorySettings) -> FactoryResetDriver {
        let (state, memory) = {
            let journal = runtime.lock_journal();
            let code = journal.state().machine(MachineKind::FactoryReset.code()).and_then(|view| view.state);
            let state = code.and_then(FactoryResetState::from_code).unwrap_or_else(|| {
                if let Some(code) = code {
                    tracing::warn!(machine = "factory-reset", code, "the journal contains a state this version does not know; starting from Idle");
                }
                FactoryResetState::Idle
            });
            (state, journal.state().factory_reset_memory.clone().unwrap_or_default())
        };
        let machine = FactoryResetMachine::restore(state, memory, settings.machine);
        FactoryResetDriver { machine, queue: VecDeque::new(), runtime, engine, settings, turn: None }
    }

    /// Runs the machine until the journal fails. A command cancelled by a
    /// stop runs again after the restart, because its step is persisted.
    pub async fn run(mut self) -> Result<(), FactoryDriverError> {
        self.publish();
        if self.machine.state() != FactoryResetState::Idle {
            tracing::warn!(machine = "factory-reset", state = self.machine.state().name(), "resuming the factory reset after a restart");
        }
        self.feed(FactoryResetEvents::Resumed)?;

        loop {
            if let Some(command) = self.queue.pop_front() {
                failpoint::hit("factory-reset", self.machine.state().name(), Point::BeforeCommand);
                if let Some(event) = self.execute(command).await {
                    self.feed(event)?;
                }
                continue;
            }

            if self.machine.state() != FactoryResetState::Idle {
                tracing::error!(machine = "factory-reset", state = self.machine.state().name(), "no command queued in a busy state; resuming it");
                tokio::time::sleep(Duration::from_secs(1)).await;
                self.feed(FactoryResetEvents::Resumed)?;
                continue;
            }
            let reason = self.runtime.factory_reset.next_request().await;
            self.feed(FactoryResetEvents::Requested(reason))?;
        }
    }

    /// Feeds one event and persists the step before queuing its commands.
    fn feed(&mut self, event: FactoryResetEvents) -> Result<(), FactoryDriverError> {
        let step = match self.machine.handle(event) {
            Ok(step) => step,
            Err(unexpected) => {
                tracing::warn!(machine = "factory-reset", error = %unexpected, "event ignored");
                return Ok(());
            }
        };

        let quiet_resume = step.event == FactoryResetEvent::Resumed && step.from == FactoryResetState::Idle && !step.memory_changed;
        if !quiet_resume {
            self.append_step(&step)?;
        }
        self.log_step(&step);
        self.queue.extend(step.commands.iter().cloned());
        self.publish();

        if step.to == FactoryResetState::Idle && step.from != FactoryResetState::Idle {
            self.turn = None;
            self.settle(&step);
        }
        Ok(())
    }

    /// Persist first, then act: the step and the machine's memory are synced
    /// before any command of the step runs.
    fn append_step(&mut self, step: &FactoryStep) -> Result<(), FactoryDriverError> {
        let meta = self.runtime.seams.meta();
        let machine = MachineKind::FactoryReset.code();
        let mut records = vec![Record::Transition(TransitionRecord {
            meta,
            machine,
            from: step.from.code(),
            event: step.event.code(),
            to: step.to.code(),
            attempt: self.machine.memory().resets_done + self.machine.memory().resets_failed,
        })];
        if step.memory_changed {
            records.push(Record::FactoryResetMemory(FactoryResetMemoryRecord { meta, memory: self.machine.memory().clone() }));
        }
        if let Some(failure) = &step.failure {
            records.push(Record::MachineError(MachineErrorRecord { meta, machine, message: failure.message.clone() }));
        }
        self.runtime.append_with_notices(records, &self.notices_for(step))?;
        failpoint::hit("factory-reset", step.to.name(), Point::AfterPersist);
        Ok(())
    }

    fn notices_for(&self, step: &FactoryStep) -> Vec<Notice> {
        let machine = MachineKind::FactoryReset.code();
        let notice = |severity, kind, message: String| Notice { severity, kind, machine, message };
        let memory = self.machine.memory();
        match (step.from, step.to, &memory.last_outcome) {
            (FactoryResetState::Armed, FactoryResetState::StoppingStack, _) => {
                vec![notice(Severity::Warning, "factory-reset-started", memory.reason.clone().unwrap_or_default())]
            }
            (from, FactoryResetState::Idle, Some(FactoryOutcome::Done { reason })) if from != FactoryResetState::Idle => {
                vec![notice(Severity::Warning, "factory-reset-done", reason.clone())]
            }
            (from, FactoryResetState::Idle, Some(FactoryOutcome::Failed { reason, error })) if from != FactoryResetState::Idle => {
                vec![notice(Severity::Error, "factory-reset-failed", format!("factory reset ({reason}) failed: {error}"))]
            }
            _ => Vec::new(),
        }
    }

    fn log_step(&self, step: &FactoryStep) {
        if step.from == step.to && step.failure.is_none() {
            tracing::debug!(machine = "factory-reset", from = step.from.name(), event = step.event.name(), to = step.to.name(), "transition");
            return;
        }
        tracing::warn!(machine = "factory-reset", from = step.from.name(), event = step.event.name(), to = step.to.name(), "transition");
        if let Some(failure) = &step.failure {
            tracing::error!(machine = "factory-reset", state = step.from.name(), error = %failure.message, "factory reset step failed");
        }
        self.runtime.report(Progress::Step {
            machine: "factory-reset".into(),
            from: step.from.name().into(),
            event: step.event.name().into(),
            to: step.to.name().into(),
            commit: None,
        });
    }

    /// Publishes the end of a reset. Requests that came in while it ran are
    /// served by it, so they are dropped.
    ///
    /// NOTE: after a reset from the button, the stack machine still records
    /// the release it last applied as running, so it applies the branch
    /// again only when the branch moves.
    fn settle(&mut self, step: &FactoryStep) {
        let error = match &self.machine.memory().last_outcome {
            Some(FactoryOutcome::Failed { error, .. }) => Some(error.clone()),
            _ => None,
        };
        match &error {
            None => tracing::warn!(machine = "factory-reset", "factory reset finished; the factory stack is running"),
            Some(error) => tracing::error!(machine = "factory-reset", %error, "factory reset failed; the device needs a person"),
        }
        if self.runtime.factory_reset.take_request().is_some() {
            tracing::info!(machine = "factory-reset", "a request made during the reset is served by it");
        }
        let outcome = match &error {
            None => "factory reset done".to_string(),
            Some(error) => format!("factory reset failed: {error}"),
        };
        self.runtime.report(Progress::Finished { machine: "factory-reset".into(), outcome, ok: error.is_none() && step.failure.is_none() });
        self.runtime.factory_reset.finish(error);
    }

    fn publish(&self) {
        let condition = match self.machine.state() {
            FactoryResetState::Idle => match self.machine.memory().last_outcome {
                Some(FactoryOutcome::Failed { .. }) => Some(Condition::NeedsAttention),
                _ => None,
            },
            FactoryResetState::Armed => Some(Condition::ResetArmed),
            _ => Some(Condition::ResetRunning),
        };
        self.runtime.board.set(Source::FactoryReset, condition);
    }

    async fn execute(&mut self, command: FactoryCommand) -> Option<FactoryResetEvents> {
        match command {
            FactoryCommand::WaitForTurn => {
                if self.turn.is_none() {
                    self.turn = Some(self.runtime.coordinator.acquire(Process::FactoryReset, "factory reset").await);
                }
                // After a restart in a busy state the turn is taken again
                // before the repeated step, and no event is due.
                (self.machine.state() == FactoryResetState::Armed).then_some(FactoryResetEvents::TurnTaken)
            }
            FactoryCommand::StopStack => Some(self.stop_stack().await),
            FactoryCommand::Restore => Some(self.restore().await),
            FactoryCommand::RunScript { reason } => Some(self.run_script(&reason).await),
            FactoryCommand::StartFactory => Some(self.start_factory().await),
        }
    }

    /// Returns the project to bring down: the configured one, or the one the
    /// factory material runs as.
    fn project(&self) -> Option<String> {
        self.settings.project.clone().or_else(|| material::read_manifest(&self.settings.directory).ok().map(|manifest| manifest.project))
    }

    /// Stops and removes every container of the stack's Compose project.
    /// Volumes stay: they hold the application's data.
    async fn stop_stack(&mut self) -> FactoryResetEvents {
        let Some(project) = self.project() else {
            tracing::warn!(machine = "factory-reset", "no stack project is configured and no factory material names one; nothing to bring down");
            return FactoryResetEvents::StackStopped;
        };
        let filters = HashMap::from([("label".to_string(), vec![format!("{PROJECT_LABEL}={project}")])]);
        let options = ListContainersOptionsBuilder::default().all(true).filters(&filters).build();
        let containers = match self.engine.api().list_containers(Some(options)).await {
            Ok(containers) => containers,
            Err(error) => return FactoryResetEvents::StepFailed(Failure::local(format!("cannot list the containers of project {project}: {error}"))),
        };

        for container in containers {
            let Some(id) = container.id else { continue };
            let seconds = i32::try_from(STOP_GRACE.as_secs()).unwrap_or(i32::MAX);
            let stop = StopContainerOptionsBuilder::default().t(seconds).build();
            if let Err(error) = self.engine.api().stop_container(&id, Some(stop)).await {
                tracing::warn!(machine = "factory-reset", container = %id, %error, "cannot stop a container; removing it by force");
            }
            let remove = RemoveContainerOptionsBuilder::default().v(false).force(true).build();
            match self.engine.api().remove_container(&id, Some(remove)).await {
                Ok(()) | Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => {}
                Err(error) => return FactoryResetEvents::StepFailed(Failure::local(format!("cannot remove container {id} of project {project}: {error}"))),
            }
        }
        tracing::info!(machine = "factory-reset", project, "stack brought down");
        FactoryResetEvents::StackStopped
    }

    /// Loads the factory images. Without material, a configured script is
    /// the whole reset, as before factory material existed.
    async fn restore(&mut self) -> FactoryResetEvents {
        let manifest = match material::read_manifest(&self.settings.directory) {
            Ok(manifest) => manifest,
            Err(material::MaterialError::Missing { .. }) if !self.settings.script.is_empty() => {
                tracing::warn!(machine = "factory-reset", directory = %self.settings.directory.display(), "no factory material; only the factory reset script runs");
                return FactoryResetEvents::Restored;
            }
            Err(error) => return FactoryResetEvents::StepFailed(Failure::local(error.to_string())),
        };
        match material::load_images(&self.engine, &self.settings.directory, &manifest).await {
            Ok(()) => {
                tracing::info!(machine = "factory-reset", images = manifest.services.len(), commit = %manifest.commit, "factory images restored");
                FactoryResetEvents::Restored
            }
            Err(error) => FactoryResetEvents::StepFailed(Failure::local(error.to_string())),
        }
    }

    async fn run_script(&mut self, reason: &str) -> FactoryResetEvents {
        let Some((program, arguments)) = self.settings.script.split_first() else {
            return FactoryResetEvents::ScriptDone;
        };
        // TODO: the script runs on the device only; a host-side step over SSH
        // is not wired in yet.
        let spec = CommandSpec::new(program.clone(), self.settings.script_timeout)
            .args(arguments.iter().cloned())
            .env("AUTOUPDATE_RESET_REASON", reason)
            .env("AUTOUPDATE_PROJECT", self.project().unwrap_or_default())
            .env("AUTOUPDATE_FACTORY_DIRECTORY", self.settings.directory.to_string_lossy().into_owned());
        match process::run(&spec).await {
            Ok(_) => FactoryResetEvents::ScriptDone,
            Err(error) => FactoryResetEvents::StepFailed(Failure::local(format!("factory reset script {program} failed: {error}"))),
        }
    }

    async fn start_factory(&mut self) -> FactoryResetEvents {
        let manifest = match material::read_manifest(&self.settings.directory) {
            Ok(manifest) => manifest,
            Err(material::MaterialError::Missing { .. }) if !self.settings.script.is_empty() => return FactoryResetEvents::FactoryUp,
            Err(error) => return FactoryResetEvents::StepFailed(Failure::local(error.to_string())),
        };
        let override_file = match material::write_override(&self.settings.directory, &manifest) {
            Ok(path) => path,
            Err(error) => return FactoryResetEvents::StepFailed(Failure::local(error.to_string())),
        };
        let compose = Compose {
            command: self.settings.compose_command.clone(),
            project: self.project().unwrap_or_else(|| manifest.project.clone()),
            files: manifest.compose_files.clone(),
            timeout: self.settings.compose_timeout,
            docker_host: self.settings.docker_host.clone(),
        };
        let compose_directory = self.settings.directory.join(material::COMPOSE_DIRECTORY);
        match compose.up(&compose_directory, &override_file, &[]).await {
            Ok(()) => FactoryResetEvents::FactoryUp,
            Err(error) => FactoryResetEvents::StepFailed(Failure::local(format!("docker compose up of the factory stack failed: {error}"))),
        }
    }
}
