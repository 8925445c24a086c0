//! The Docker calls of a handover, through the engine's API (bollard).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use bollard::errors::Error as BollardError;
use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum, NetworkConnectRequest, NetworkCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, InspectContainerOptions, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder, RenameContainerOptionsBuilder,
    StopContainerOptionsBuilder,
};

use crate::driver::docker::{Engine, EngineError};
use crate::machine::selfupdate::ContainerRef;
use crate::model::{Digest, ImageReference, canonical_repository};
use crate::selfupdate::spec::{self, CandidateRequest, SpecError};
use crate::selfupdate::{AGENT_LABEL, CANDIDATE_LABEL, IMAGE_LABEL, NETWORK_LABEL};

/// Errors of the Docker calls of a handover.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The agent does not run in a container, so there is nothing to replace.
    #[error(
        "the agent does not run in a Docker container (no container id in /proc/self/mountinfo); self-update needs it to run in one, or remove [self_update]"
    )]
    NotInContainer,

    /// A container the handover needs does not exist.
    #[error("container {container} does not exist")]
    Missing { container: String },

    /// The old container's configuration cannot be copied.
    #[error(transparent)]
    Spec(#[from] SpecError),

    /// The followed image reference does not parse or is pinned to a digest.
    #[error("image reference {image:?} cannot be followed: {reason}; set self_update.image to a tag such as registry.example.net/eventpi/autoupdate:stable")]
    Reference { image: String, reason: String },

    /// A registry call through the engine failed.
    #[error(transparent)]
    Engine(#[from] EngineError),

    /// Any other API call failed.
    #[error("Docker API call {call} for {subject} failed: {source}")]
    Api { call: &'static str, subject: String, source: BollardError },
}

impl ContainerError {
    fn api<'a>(call: &'static str, subject: &'a str) -> impl FnOnce(BollardError) -> ContainerError + 'a {
        move |source| ContainerError::Api { call, subject: subject.to_string(), source }
    }
}

/// The running agent's own container, as the handover needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnContainer {
    pub container: ContainerRef,
    /// The name every generation of this agent takes over: [`AGENT_LABEL`]
    /// when set, otherwise the container's name.
    pub agent_name: String,
    /// The image reference the agent follows.
    pub followed: String,
    /// The image id (`sha256:` of its configuration) the container runs.
    pub image_id: String,
    /// Manifest digest of that image in the followed repository, when the
    /// engine recorded one.
    pub running_digest: Option<Digest>,
}

/// State of a container that the old agent watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerStatus {
    pub state: ContainerStateStatusEnum,
    pub restart_count: i64,
    pub exit_code: i64,
    /// Its address on each network, by network name.
    pub addresses: HashMap<String, IpAddr>,
}

impl ContainerStatus {
    /// Tells whether the container runs, or will run again on its own.
    pub fn is_up(&self) -> bool {
        matches!(self.state, ContainerStateStatusEnum::RUNNING | ContainerStateStatusEnum::RESTARTING | ContainerStateStatusEnum::PAUSED)
    }
}

fn not_found(error: &BollardError) -> bool {
    matches!(error, BollardError::DockerResponseServerError { status_code: 404, .. })
}

/// Inspects a container by id or name; `None` when it does not exist.
pub async fn inspect(engine: &Engine, container: &str) -> Result<Option<ContainerInspectResponse>, ContainerError> {
    match engine.api().inspect_container(container, None::<InspectContainerOptions>).await {
        Ok(inspect) => Ok(Some(inspect)),
        Err(error) if not_found(&error) => Ok(None),
        Err(source) => Err(ContainerError::Api { call: "inspect container", subject: container.to_string(), source }),
    }
}

/// Returns a container's state, restart count and addresses; `None` when it
/// does not exist.
pub async fn status(engine: &Engine, container: &str) -> Result<Option<ContainerStatus>, ContainerError> {
    let Some(inspect) = inspect(engine, container).await? else { return Ok(None) };
    let state = inspect.state.unwrap_or_default();
    let networks = inspect.network_settings.and_then(|settings| settings.networks).unwrap_or_default();
    let addresses = networks
        .into_iter()
        .filter_map(|(name, endpoint)| endpoint.ip_address.and_then(|address| address.parse().ok()).map(|address| (name, address)))
        .collect();
    Ok(Some(ContainerStatus {
        state: state.status.unwrap_or(ContainerStateStatusEnum::EMPTY),
        restart_count: inspect.restart_count.unwrap_or(0),
        exit_code: state.exit_code.unwrap_or(0),
        addresses,
    }))
}

/// Reads this agent's own container: its id comes from
/// `/proc/self/mountinfo`, never from the host name or the image.
pub async fn own_container(engine: &Engine, followed_override: Option<&str>) -> Result<OwnContainer, ContainerError> {
    let id = crate::identity::own_container_id().ok_or(ContainerError::NotInContainer)?;
    let inspect = inspect(engine, &id).await?.ok_or_else(|| ContainerError::Missing { container: id.clone() })?;
    let name = inspect.name.clone().unwrap_or_default().trim_start_matches('/').to_string();
    let config = inspect.config.clone().unwrap_or_default();
    let labels = config.labels.clone().unwrap_or_default();

    let followed = followed_override.map(str::to_string).or_else(|| labels.get(IMAGE_LABEL).cloned()).or(config.image.clone()).unwrap_or_default();
    let image_id = inspect.image.clone().unwrap_or_default();
    let running_digest = repository_digest(engine, &image_id, &followed).await;
    Ok(OwnContainer {
        agent_name: labels.get(AGENT_LABEL).cloned().unwrap_or_else(|| name.clone()),
        container: ContainerRef { id, name },
        followed,
        image_id,
        running_digest,
    })
}

/// Checks that `followed` is a reference that can move: a tag, not a digest.
pub fn check_followed(followed: &str) -> Result<ImageReference, ContainerError> {
    let reference = ImageReference::parse(followed).map_err(|error| ContainerError::Reference { image: followed.to_string(), reason: error.to_string() })?;
    if reference.digest.is_some() || followed.starts_with("sha256:") {
        return Err(ContainerError::Reference { image: followed.to_string(), reason: "it is pinned to a digest".into() });
    }
    Ok(reference)
}

/// Returns the manifest digest that the engine recorded for `image` (an id
/// or a reference) in the repository of `followed`.
pub async fn repository_digest(engine: &Engine, image: &str, followed: &str) -> Option<Digest> {
    let wanted = ImageReference::parse(followed).ok()?.canonical_repository();
    let inspect = engine.api().inspect_image(image).await.ok()?;
    inspect
        .repo_digests
        .unwrap_or_default()
        .iter()
        .filter_map(|entry| entry.split_once('@'))
        .find(|(repository, _)| canonical_repository(repository) == wanted)
        .and_then(|(_, digest)| digest.parse().ok())
}

/// Returns the manifest digest the registry serves for `reference`, asked
/// through the engine, which pulls nothing.
pub async fn registry_digest(engine: &Engine, reference: &str) -> Result<Digest, ContainerError> {
    let credentials = engine.credentials().for_image(reference);
    let inspect = engine.api().inspect_registry_image(reference, credentials).await.map_err(ContainerError::api("inspect registry image", reference))?;
    let digest = inspect.descriptor.digest.unwrap_or_default();
    digest.parse().map_err(|_| ContainerError::Reference { image: reference.to_string(), reason: format!("the registry returned the digest {digest:?}") })
}

/// Returns the configuration of a local image.
pub async fn image_config(engine: &Engine, image: &str) -> Result<bollard::models::ImageConfig, ContainerError> {
    let inspect = engine.api().inspect_image(image).await.map_err(ContainerError::api("inspect image", image))?;
    Ok(inspect.config.unwrap_or_default())
}

/// Creates the external network when it is missing.
pub async fn ensure_network(engine: &Engine, network: &str) -> Result<(), ContainerError> {
    match engine.api().inspect_network(network, None).await {
        Ok(_) => return Ok(()),
        Err(error) if not_found(&error) => {}
        Err(source) => return Err(ContainerError::Api { call: "inspect network", subject: network.to_string(), source }),
    }
    let request = NetworkCreateRequest {
        name: network.to_string(),
        driver: Some("bridge".into()),
        attachable: Some(true),
        labels: Some(HashMap::from([(NETWORK_LABEL.to_string(), "1".to_string())])),
        ..NetworkCreateRequest::default()
    };
    match engine.api().create_network(request).await {
        Ok(_) => {
            tracing::info!(machine = "self-update", network, "created the external network for handovers");
            Ok(())
        }
        // Created by someone else between the inspect and the create.
        Err(BollardError::DockerResponseServerError { status_code: 409, .. }) => Ok(()),
        Err(source) => Err(ContainerError::Api { call: "create network", subject: network.to_string(), source }),
    }
}

/// Connects a container to a network; connecting it again changes nothing.
pub async fn connect(engine: &Engine, network: &str, container: &str, endpoint: bollard::models::EndpointSettings) -> Result<(), ContainerError> {
    let request = NetworkConnectRequest { container: container.to_string(), endpoint_config: Some(endpoint) };
    match engine.api().connect_network(network, request).await {
        Ok(()) => Ok(()),
        Err(BollardError::DockerResponseServerError { status_code: 403, message }) if message.contains("already exists") => Ok(()),
        Err(source) => Err(ContainerError::Api { call: "connect network", subject: format!("{container} to {network}"), source }),
    }
}

/// Creates the candidate container from the old one and connects it to its
/// networks. A leftover container with the same name that belongs to this
/// agent is removed first.
pub async fn create_candidate(
    engine: &Engine,
    old: &ContainerInspectResponse,
    old_image: &bollard::models::ImageConfig,
    request: &CandidateRequest,
) -> Result<ContainerRef, ContainerError> {
    let spec = spec::candidate_spec(old, old_image, request)?;
    if let Some(leftover) = inspect(engine, &spec.name).await? {
        let labels = leftover.config.and_then(|config| config.labels).unwrap_or_default();
        if labels.get(AGENT_LABEL) == Some(&request.agent_name) && labels.contains_key(CANDIDATE_LABEL) {
            let id = leftover.id.unwrap_or_default();
            tracing::info!(machine = "self-update", container = %id, name = %spec.name, "removing a leftover candidate with the same name");
            remove(engine, &id, Duration::from_secs(1)).await?;
        }
    }

    let options = CreateContainerOptionsBuilder::default().name(&spec.name).build();
    let created = engine.api().create_container(Some(options), spec.body).await.map_err(ContainerError::api("create container", &spec.name))?;
    for (network, endpoint) in spec.extra_networks {
        connect(engine, &network, &created.id, endpoint).await?;
    }
    Ok(ContainerRef { id: created.id, name: spec.name })
}

pub async fn start(engine: &Engine, container: &str) -> Result<(), ContainerError> {
    engine.api().start_container(container, None).await.map_err(ContainerError::api("start container", container))
}

/// Stops a container, giving it `grace` after SIGTERM, and removes it. A
/// container that is already gone counts as removed.
pub async fn remove(engine: &Engine, container: &str, grace: Duration) -> Result<(), ContainerError> {
    let stop = StopContainerOptionsBuilder::default().t(grace.as_secs().max(1) as i32).build();
    match engine.api().stop_container(container, Some(stop)).await {
        Ok(()) => {}
        Err(BollardError::DockerResponseServerError { status_code: 304 | 404, .. }) => {}
        Err(error) => tracing::warn!(machine = "self-update", container, %error, "stop failed; removing the container by force"),
    }
    let options = RemoveContainerOptionsBuilder::default().force(true).build();
    match engine.api().remove_container(container, Some(options)).await {
        Ok(()) => Ok(()),
        Err(error) if not_found(&error) => Ok(()),
        // A removal already in progress, started by the engine or another call.
        Err(BollardError::DockerResponseServerError { status_code: 409, message }) if message.contains("already in progress") => Ok(()),
        Err(source) => Err(ContainerError::Api { call: "remove container", subject: container.to_string(), source }),
    }
}

pub async fn rename(engine: &Engine, container: &str, name: &str) -> Result<(), ContainerError> {
    let options = RenameContainerOptionsBuilder::default().name(name).build();
    engine.api().rename_container(container, options).await.map_err(ContainerError::api("rename container", container))
}

/// Returns every container, running or not, that carries the candidate
/// label of the agent `agent_name`.
pub async fn candidates(engine: &Engine, agent_name: &str) -> Result<Vec<(ContainerRef, HashMap<String, String>)>, ContainerError> {
    let filters = HashMap::from([("label".to_string(), vec![CANDIDATE_LABEL.to_string(), format!("{AGENT_LABEL}={agent_name}")])]);
    let options = ListContainersOptionsBuilder::default().all(true).filters(&filters).build();
    let summaries = engine.api().list_containers(Some(options)).await.map_err(ContainerError::api("list containers", agent_name))?;
    Ok(summaries
        .into_iter()
        .map(|summary| {
            let name = summary.names.and_then(|names| names.into_iter().next()).unwrap_or_default().trim_start_matches('/').to_string();
            (ContainerRef { id: summary.id.unwrap_or_default(), name }, summary.labels.unwrap_or_default())
        })
        .collect())
}
