//! The recorder action: stop and start a container or a Compose service
//! through the Docker API, or run the configured commands.

use std::collections::HashMap;
use std::time::Duration;

use bollard::query_parameters::{InspectContainerOptions, ListContainersOptionsBuilder, StopContainerOptionsBuilder};

use crate::driver::docker::{Engine, ONEOFF_LABEL, PROJECT_LABEL, SERVICE_LABEL};
use crate::driver::process::{self, CommandSpec};

/// The way the recorder is stopped and started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecorderAction {
    /// A container by name.
    Container(String),
    /// A service of a Compose project: every container of it.
    Service { project: String, service: String },
    /// Commands with their arguments.
    Commands { stop: Vec<String>, start: Vec<String> },
}

/// Errors of a stop or a start.
#[derive(Debug, thiserror::Error)]
pub enum RecorderError {
    /// The Docker API call failed.
    #[error("cannot {action} recorder container {container}: {source}")]
    Api { action: &'static str, container: String, source: bollard::errors::Error },

    /// A Compose service has no container to start.
    #[error("service {service} of project {project} has no container to start; the next stack update creates it")]
    NoContainer { project: String, service: String },

    /// The configured command failed.
    #[error("recorder {action} command failed: {source}; check space.recorder.{action}_command")]
    Command { action: &'static str, source: process::ProcessError },
}

/// The recorder and the engine that runs it.
#[derive(Clone)]
pub struct Recorder {
    pub action: RecorderAction,
    pub engine: Engine,
    pub timeout: Duration,
}

impl Recorder {
    /// Returns the service of `project` that the recorder is, if it is one:
    /// a configured service, or a container that Compose made for it.
    pub async fn compose_service(&self, project: &str) -> Option<String> {
        match &self.action {
            RecorderAction::Service { service, .. } => Some(service.clone()),
            RecorderAction::Container(name) => {
                let inspect = self.engine.api().inspect_container(name, None::<InspectContainerOptions>).await.ok()?;
                let labels = inspect.config.and_then(|config| config.labels).unwrap_or_default();
                let managed = labels.get(PROJECT_LABEL).is_some_and(|value| value == project);
                labels.get(SERVICE_LABEL).filter(|_| managed).cloned()
            }
            RecorderAction::Commands { .. } => None,
        }
    }

    /// Returns the names of the containers the action stops and starts.
    pub fn container_names(&self) -> Vec<String> {
        match &self.action {
            RecorderAction::Container(name) => vec![name.clone()],
            _ => Vec::new(),
        }
    }

    /// Stops the recorder; stopping a stopped recorder succeeds.
    pub async fn stop(&self) -> Result<(), RecorderError> {
        match &self.action {
            RecorderAction::Container(name) => self.stop_container(name).await,
            RecorderAction::Service { project, service } => {
                let containers = self.service_containers(project, service).await?;
                if containers.is_empty() {
                    tracing::warn!(machine = "space-guard", project, service, "the recorder service has no container to stop");
                }
                for container in containers {
                    self.stop_container(&container).await?;
                }
                Ok(())
            }
            RecorderAction::Commands { stop, .. } => self.run_command("stop", stop).await,
        }
    }

    /// Starts the recorder; starting a running recorder succeeds.
    ///
    /// NOTE: a held Compose service whose image or settings an update changed
    /// starts again in its old container; the next stack update that runs
    /// `compose up` with it recreates the container.
    pub async fn start(&self) -> Result<(), RecorderError> {
        match &self.action {
            RecorderAction::Container(name) => self.start_container(name).await,
            RecorderAction::Service { project, service } => {
                let containers = self.service_containers(project, service).await?;
                if containers.is_empty() {
                    return Err(RecorderError::NoContainer { project: project.clone(), service: service.clone() });
                }
                for container in containers {
                    self.start_container(&container).await?;
                }
                Ok(())
            }
            RecorderAction::Commands { start, .. } => self.run_command("start", start).await,
        }
    }

    async fn stop_container(&self, name: &str) -> Result<(), RecorderError> {
        let seconds = i32::try_from(self.timeout.as_secs()).unwrap_or(i32::MAX);
        let options = StopContainerOptionsBuilder::default().t(seconds).build();
        // Docker returns 304 for a stopped container, which bollard treats as success.
        let stop = self.engine.api().stop_container(name, Some(options));
        match tokio::time::timeout(self.timeout + Duration::from_secs(30), stop).await {
            Ok(result) => result.map_err(|source| RecorderError::Api { action: "stop", container: name.to_string(), source }),
            Err(_) => Err(RecorderError::Api { action: "stop", container: name.to_string(), source: bollard::errors::Error::RequestTimeoutError }),
        }
    }

    async fn start_container(&self, name: &str) -> Result<(), RecorderError> {
        self.engine.api().start_container(name, None).await.map_err(|source| RecorderError::Api { action: "start", container: name.to_string(), source })
    }

    async fn service_containers(&self, project: &str, service: &str) -> Result<Vec<String>, RecorderError> {
        let labels = vec![format!("{PROJECT_LABEL}={project}"), format!("{SERVICE_LABEL}={service}")];
        let filters = HashMap::from([("label".to_string(), labels)]);
        let options = ListContainersOptionsBuilder::default().all(true).filters(&filters).build();
        let containers = self.engine.api().list_containers(Some(options)).await.map_err(|source| RecorderError::Api {
            action: "list",
            container: format!("{project}/{service}"),
            source,
        })?;
        let oneoff = |labels: &HashMap<String, String>| labels.get(ONEOFF_LABEL).is_some_and(|value| value.eq_ignore_ascii_case("true"));
        Ok(containers.into_iter().filter(|container| !container.labels.as_ref().is_some_and(oneoff)).filter_map(|container| container.id).collect())
    }

    async fn run_command(&self, action: &'static str, command: &[String]) -> Result<(), RecorderError> {
        let (program, arguments) = command.split_first().expect("configuration validation rejects an empty recorder command");
        let spec = CommandSpec::new(program.clone(), self.timeout).args(arguments.iter().cloned());
        process::run(&spec).await.map(|_| ()).map_err(|source| RecorderError::Command { action, source })
    }
}
