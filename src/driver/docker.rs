//! The Docker engine, through its API (bollard): pulls, image platforms,
//! keep-tags and the state of a Compose project's containers.

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::query_parameters::{
    CreateImageOptionsBuilder, InspectContainerOptions, ListContainersOptionsBuilder, ListImagesOptionsBuilder, RemoveContainerOptionsBuilder,
    RemoveImageOptionsBuilder, RenameContainerOptionsBuilder, TagImageOptionsBuilder,
};
use futures_util::StreamExt;

use crate::credentials::{RegistryCredentials, registry_host};
use crate::model::{Digest, ImageReference, canonical_repository};
use crate::platform::Platform;

/// Compose's label naming the project of a container.
pub const PROJECT_LABEL: &str = "com.docker.compose.project";
/// Compose's label naming the service of a container.
pub const SERVICE_LABEL: &str = "com.docker.compose.service";
/// Compose's label on containers of `docker compose run`.
pub const ONEOFF_LABEL: &str = "com.docker.compose.oneoff";

/// Repository of the keep-tags, under which known-good images stay tagged.
pub const KEEP_REPOSITORY: &str = "autoupdate-keep";

/// Errors of engine operations.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The engine's socket cannot be reached.
    #[error("Docker engine at {host} is unreachable: {source}")]
    Unreachable { host: String, source: bollard::errors::Error },

    /// The registry has no such image or tag.
    #[error("image {image} does not exist in its registry: {detail}")]
    ImageNotFound { image: String, detail: String },

    /// The registry refused the credentials, or asked for some.
    #[error("registry refused access to {image}: {detail}; check the [[registry]] entry for {}", registry_host(image))]
    AccessDenied { image: String, detail: String },

    /// The registry could not be reached or failed during the pull.
    #[error("pull of {image} failed: {detail}")]
    PullFailed { image: String, detail: String },

    /// The pull took longer than its timeout.
    #[error("pull of {image} timed out after {}", humantime::format_duration(*timeout))]
    PullTimedOut { image: String, timeout: Duration },

    /// The image was pulled but is built for another platform.
    #[error("image {image} is built for {image_platform}, but this device runs {device_platform}")]
    WrongPlatform { image: String, image_platform: String, device_platform: String },

    /// The pulled image carries no digest for its repository.
    #[error("image {image} has no registry digest after the pull")]
    NoDigest { image: String },

    /// An image reference in a compose file does not parse.
    #[error("invalid image reference {image:?}")]
    BadReference { image: String },

    /// Any other API call failed.
    #[error("Docker API call {call} failed: {source}")]
    Api { call: &'static str, source: bollard::errors::Error },
}

/// State of one container, as the health gate reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerStatus {
    pub id: String,
    pub name: String,
    pub service: String,
    /// Docker's state: `running`, `exited`, `restarting`, ...
    pub state: String,
    /// `starting`, `healthy` or `unhealthy` for a container with a healthcheck.
    pub health: Option<String>,
    pub restart_count: i64,
    pub exit_code: i64,
    /// The image reference the container was created from.
    pub image: String,
    pub started_at: String,
}

/// A connected engine with a negotiated API version.
#[derive(Debug, Clone)]
pub struct Engine {
    docker: Docker,
    host: String,
    platform: Platform,
    credentials: RegistryCredentials,
}

impl Engine {
    /// Connects to the engine and negotiates the API version (the engine may
    /// be older than bollard's default). `platform` overrides the platform
    /// that images must match; by default it is the engine's own.
    pub async fn connect(host: Option<&str>, platform: Option<Platform>) -> Result<Engine, EngineError> {
        let host = host.map(str::to_string).or_else(|| std::env::var("DOCKER_HOST").ok()).unwrap_or_else(|| "unix:///var/run/docker.sock".to_string());
        let unreachable = |source| EngineError::Unreachable { host: host.clone(), source };

        let socket = host.strip_prefix("unix://").unwrap_or(&host);
        let docker = Docker::connect_with_unix(socket, 120, bollard::API_DEFAULT_VERSION).map_err(unreachable)?;
        let docker = docker.negotiate_version().await.map_err(unreachable)?;
        let info = docker.info().await.map_err(unreachable)?;

        let engine_platform = Platform::from_engine(info.os_type.as_deref().unwrap_or("linux"), info.architecture.as_deref().unwrap_or("unknown"));
        let platform = platform.unwrap_or(engine_platform);
        Ok(Engine { docker, host, platform, credentials: RegistryCredentials::default() })
    }

    /// Sets the registry credentials that pulls send to the daemon.
    pub fn with_credentials(mut self, credentials: RegistryCredentials) -> Engine {
        self.credentials = credentials;
        self
    }

    /// Returns the registry credentials, for pulls and manifest reads.
    pub fn credentials(&self) -> &RegistryCredentials {
        &self.credentials
    }

    pub fn platform(&self) -> &Platform {
        &self.platform
    }

    pub fn api(&self) -> &Docker {
        &self.docker
    }

    /// Pulls `image`, checks its platform and returns the manifest digest
    /// that the registry served.
    pub async fn pull(&self, image: &str, timeout: Duration) -> Result<Digest, EngineError> {
        self.pull_with_progress(image, timeout, &|_, _| {}).await
    }

    /// Pulls like [`Engine::pull`] and calls `progress` with the bytes
    /// downloaded so far and the total of the layers seen, at most four times
    /// a second.
    pub async fn pull_with_progress(&self, image: &str, timeout: Duration, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<Digest, EngineError> {
        let reference = ImageReference::parse(image).map_err(|_| EngineError::BadReference { image: image.to_string() })?;
        let tag = match (&reference.digest, &reference.tag) {
            (Some(digest), _) => digest.to_string(),
            (None, Some(tag)) => tag.clone(),
            (None, None) => "latest".to_string(),
        };
        let options = CreateImageOptionsBuilder::default().from_image(&reference.repository).tag(&tag).build();

        let pull = async {
            // The daemon gets the credentials in the X-Registry-Auth header of
            // this one request; it does not store them.
            let credentials = self.credentials.for_image(image);
            let mut stream = self.docker.create_image(Some(options), None, credentials);
            let mut served_digest = None;
            let mut layers_done = 0usize;
            let mut layers: HashMap<String, (u64, u64)> = HashMap::new();
            let mut last_report = tokio::time::Instant::now();
            while let Some(item) = stream.next().await {
                let info = item.map_err(|error| classify_pull_error(image, error))?;
                let status = info.status.clone().unwrap_or_default();
                if let (Some(layer), Some(detail)) = (&info.id, &info.progress_detail)
                    && status == "Downloading"
                {
                    let current = detail.current.unwrap_or(0).max(0) as u64;
                    let total = detail.total.unwrap_or(0).max(0) as u64;
                    layers.insert(layer.clone(), (current, total));
                }
                if (status == "Download complete" || status == "Pull complete")
                    && let Some(layer) = &info.id
                    && let Some(entry) = layers.get_mut(layer)
                {
                    entry.0 = entry.1;
                }
                if last_report.elapsed() >= Duration::from_millis(250) && !layers.is_empty() {
                    let current = layers.values().map(|(current, _)| current).sum();
                    let total = layers.values().map(|(_, total)| total).sum();
                    progress(current, total);
                    last_report = tokio::time::Instant::now();
                }
                if let Some(digest) = status.strip_prefix("Digest: ") {
                    served_digest = digest.trim().parse::<Digest>().ok();
                }
                if status == "Pull complete" || status == "Already exists" {
                    layers_done += 1;
                    tracing::debug!(image, layer = info.id.as_deref().unwrap_or(""), layers_done, "layer ready");
                }
            }
            let total = layers.values().map(|(_, total)| total).sum();
            progress(total, total);
            Ok::<_, EngineError>(served_digest)
        };
        let served_digest = tokio::time::timeout(timeout, pull).await.map_err(|_| EngineError::PullTimedOut { image: image.to_string(), timeout })??;

        let inspect = self.docker.inspect_image(image).await.map_err(|source| EngineError::Api { call: "inspect image", source })?;
        self.check_platform(image, &inspect)?;

        if let Some(digest) = reference.digest.or(served_digest) {
            return Ok(digest);
        }
        let wanted = reference.canonical_repository();
        inspect
            .repo_digests
            .unwrap_or_default()
            .iter()
            .filter_map(|entry| entry.split_once('@'))
            .find(|(repository, _)| canonical_repository(repository) == wanted)
            .and_then(|(_, digest)| digest.parse().ok())
            .ok_or_else(|| EngineError::NoDigest { image: image.to_string() })
    }

    fn check_platform(&self, image: &str, inspect: &bollard::models::ImageInspect) -> Result<(), EngineError> {
        let image_platform = Platform {
            os: inspect.os.clone().unwrap_or_else(|| "linux".into()),
            architecture: inspect.architecture.clone().unwrap_or_default(),
            variant: inspect.variant.clone().filter(|variant| !variant.is_empty()),
        };
        if self.platform.accepts(&image_platform) {
            return Ok(());
        }
        Err(EngineError::WrongPlatform { image: image.to_string(), image_platform: image_platform.to_string(), device_platform: self.platform.to_string() })
    }

    /// Tells whether the engine has an image for `reference` (a tag or a
    /// `repository@digest`).
    pub async fn has_image(&self, reference: &str) -> bool {
        self.docker.inspect_image(reference).await.is_ok()
    }

    /// Returns the unpacked size in bytes of the largest local image with a
    /// tag or digest in `repository`, or `None` when there is none.
    pub async fn largest_local_image(&self, repository: &str) -> Option<u64> {
        let target_repository = crate::model::canonical_repository(repository);
        let images = match self.docker.list_images(None::<bollard::query_parameters::ListImagesOptions>).await {
            Ok(images) => images,
            Err(error) => {
                tracing::debug!(repository, %error, "cannot list local images");
                return None;
            }
        };
        let in_repository = |name: &String| {
            let local = name.rsplit_once('@').map_or_else(
                || crate::model::ImageReference::parse(name).map(|reference| reference.repository).unwrap_or_default(),
                |(repository, _)| repository.to_string(),
            );
            crate::model::canonical_repository(&local) == target_repository
        };
        images
            .into_iter()
            .filter(|image| image.repo_tags.iter().chain(image.repo_digests.iter()).any(in_repository))
            .map(|image| u64::try_from(image.size).unwrap_or(0))
            .max()
    }

    /// Tags `source` as `autoupdate-keep/<project>:<tag>`.
    pub async fn keep_tag(&self, source: &str, project: &str, tag: &str) -> Result<(), EngineError> {
        let repository = format!("{KEEP_REPOSITORY}/{project}");
        let options = TagImageOptionsBuilder::default().repo(&repository).tag(tag).build();
        self.docker.tag_image(source, Some(options)).await.map_err(|source| EngineError::Api { call: "tag image", source })
    }

    /// Lists the keep-tags of `project`, as full `repository:tag` references.
    pub async fn keep_tags(&self, project: &str) -> Result<Vec<String>, EngineError> {
        let repository = format!("{KEEP_REPOSITORY}/{project}");
        let filters = HashMap::from([("reference".to_string(), vec![format!("{repository}:*")])]);
        let options = ListImagesOptionsBuilder::default().filters(&filters).build();
        let images = self.docker.list_images(Some(options)).await.map_err(|source| EngineError::Api { call: "list images", source })?;
        let prefix = format!("{repository}:");
        Ok(images.into_iter().flat_map(|image| image.repo_tags).filter(|tag| tag.starts_with(&prefix)).collect())
    }

    /// Removes one tag; the image stays while other tags or containers use it.
    pub async fn remove_tag(&self, reference: &str) -> Result<(), EngineError> {
        let options = RemoveImageOptionsBuilder::default().noprune(false).force(false).build();
        match self.docker.remove_image(reference, Some(options), None).await {
            Ok(_) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(()),
            Err(source) => Err(EngineError::Api { call: "remove image tag", source }),
        }
    }

    /// Returns every container of a Compose project except one-off ones.
    pub async fn project_containers(&self, project: &str) -> Result<Vec<ContainerStatus>, EngineError> {
        let filters = HashMap::from([("label".to_string(), vec![format!("{PROJECT_LABEL}={project}")])]);
        let options = ListContainersOptionsBuilder::default().all(true).filters(&filters).build();
        let summaries = self.docker.list_containers(Some(options)).await.map_err(|source| EngineError::Api { call: "list containers", source })?;

        let mut containers = Vec::new();
        for summary in summaries {
            let labels = summary.labels.unwrap_or_default();
            if labels.get(ONEOFF_LABEL).is_some_and(|value| value.eq_ignore_ascii_case("true")) {
                continue;
            }
            let Some(id) = summary.id else { continue };
            let inspect = match self.docker.inspect_container(&id, None::<InspectContainerOptions>).await {
                Ok(inspect) => inspect,
                // Removed between the list and the inspect: not part of the project any more.
                Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => continue,
                Err(source) => return Err(EngineError::Api { call: "inspect container", source }),
            };
            let state = inspect.state.unwrap_or_default();
            containers.push(ContainerStatus {
                id: id.clone(),
                name: inspect.name.unwrap_or_default().trim_start_matches('/').to_string(),
                service: labels.get(SERVICE_LABEL).cloned().unwrap_or_default(),
                state: state.status.map(|status| status.to_string()).unwrap_or_default(),
                health: state.health.and_then(|health| health.status).map(|status| status.to_string()).filter(|status| !status.is_empty() && status != "none"),
                restart_count: inspect.restart_count.unwrap_or(0),
                exit_code: state.exit_code.unwrap_or(0),
                image: inspect.config.and_then(|config| config.image).unwrap_or_default(),
                started_at: state.started_at.unwrap_or_default(),
            });
        }
        Ok(containers)
    }

    /// Repairs what an interrupted `docker compose up` leaves when it was
    /// recreating a container. Compose v2 creates the replacement under the
    /// temporary name `<first 12 hex digits of the old id>_<name>`, removes
    /// the old container, then renames the replacement. When Compose stopped
    /// after the removal, the replacement gets the final name. When the old
    /// container is still there, the replacement never ran, so it is
    /// removed. Volumes are never removed. Returns one line per repair.
    pub async fn repair_interrupted_recreate(&self, project: &str) -> Result<Vec<String>, EngineError> {
        let containers = self.project_containers(project).await?;
        let mut repairs = Vec::new();
        for container in &containers {
            let Some(name) = interrupted_recreate_name(&container.name) else { continue };
            if containers.iter().any(|other| other.name == name) {
                let options = RemoveContainerOptionsBuilder::default().v(false).force(true).build();
                self.docker.remove_container(&container.id, Some(options)).await.map_err(|source| EngineError::Api { call: "remove container", source })?;
                repairs.push(format!("removed {}, a replacement for {name} that an interrupted compose up created", container.name));
            } else {
                let options = RenameContainerOptionsBuilder::default().name(name).build();
                self.docker.rename_container(&container.id, options).await.map_err(|source| EngineError::Api { call: "rename container", source })?;
                repairs.push(format!("renamed {} back to {name}; an interrupted compose up removed the container it replaced", container.name));
            }
        }
        Ok(repairs)
    }

    /// Returns the names of the running containers that carry the label key
    /// `label`, whatever its value.
    pub async fn running_with_label(&self, label: &str) -> Result<Vec<String>, EngineError> {
        let filters = HashMap::from([("label".to_string(), vec![label.to_string()]), ("status".to_string(), vec!["running".to_string()])]);
        let options = ListContainersOptionsBuilder::default().filters(&filters).build();
        let summaries = self.docker.list_containers(Some(options)).await.map_err(|source| EngineError::Api { call: "list containers", source })?;
        let name_of = |names: Option<Vec<String>>| names.and_then(|names| names.into_iter().next()).unwrap_or_default().trim_start_matches('/').to_string();
        Ok(summaries.into_iter().map(|summary| name_of(summary.names)).collect())
    }

    pub fn host(&self) -> &str {
        &self.host
    }
}

impl EngineError {
    /// Tells whether the registry's TLS certificate was rejected as expired
    /// or not yet valid, which a wrong wall clock causes. Docker 20.10 reports
    /// it with Go's x509 text "certificate has expired or is not yet valid".
    pub fn is_certificate_validity(&self) -> bool {
        let detail = match self {
            EngineError::PullFailed { detail, .. } | EngineError::ImageNotFound { detail, .. } | EngineError::AccessDenied { detail, .. } => detail,
            _ => return false,
        };
        let lower = detail.to_lowercase();
        lower.contains("certificate has expired or is not yet valid")
            || lower.contains("certificate is not yet valid")
            || lower.contains("certificate has expired")
    }
}

/// Sorts a pull failure into "the image does not exist" (the commit is at
/// fault), "access denied" (the device's credentials are), and everything else
/// (the registry or the network failed, so retrying may help).
fn classify_pull_error(image: &str, error: bollard::errors::Error) -> EngineError {
    let detail = match &error {
        bollard::errors::Error::DockerResponseServerError { message, .. } => message.clone(),
        bollard::errors::Error::DockerStreamError { error } => error.clone(),
        other => other.to_string(),
    };
    let lower = detail.to_lowercase();
    let missing = ["manifest unknown", "not found", "name unknown", "repository does not exist", "no such image"];
    let denied = ["unauthorized", "authentication required", "denied", "no basic auth credentials"];
    if let bollard::errors::Error::DockerResponseServerError { status_code: 404, .. } = error {
        return EngineError::ImageNotFound { image: image.to_string(), detail };
    }
    if missing.iter().any(|pattern| lower.contains(pattern)) && !lower.contains("dial tcp") {
        return EngineError::ImageNotFound { image: image.to_string(), detail };
    }
    if denied.iter().any(|pattern| lower.contains(pattern)) && !lower.contains("repository does not exist") {
        return EngineError::AccessDenied { image: image.to_string(), detail };
    }
    EngineError::PullFailed { image: image.to_string(), detail }
}

/// Returns the final name of a container that Compose v2 created under its
/// temporary name `<12 lowercase hex digits>_<name>` during a recreate.
fn interrupted_recreate_name(name: &str) -> Option<&str> {
    let (prefix, rest) = name.split_once('_')?;
    let is_short_id = prefix.len() == 12 && prefix.bytes().all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte));
    (is_short_id && !rest.is_empty()).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recreate_name_needs_short_id_prefix() {
        assert_eq!(interrupted_recreate_name("0123456789ab_eventpi-web-1"), Some("eventpi-web-1"));
        assert_eq!(interrupted_recreate_name("eventpi-web-1"), None);
        assert_eq!(interrupted_recreate_name("0123456789AB_web"), None, "Docker ids are lowercase");
        assert_eq!(interrupted_recreate_name("0123456789a_web"), None, "11 digits");
        assert_eq!(interrupted_recreate_name("0123456789ab_"), None);
        assert_eq!(interrupted_recreate_name("my_service"), None);
    }

    fn server_error(status_code: u16, message: &str) -> bollard::errors::Error {
        bollard::errors::Error::DockerResponseServerError { status_code, message: message.to_string() }
    }

    #[test]
    fn missing_manifest_is_image_not_found() {
        let error = classify_pull_error("r/app:9", server_error(404, "manifest for r/app:9 not found: manifest unknown"));
        assert!(matches!(error, EngineError::ImageNotFound { .. }));
    }

    #[test]
    fn refused_connection_is_pull_failure() {
        let message = "Get \"http://127.0.0.1:5999/v2/\": dial tcp 127.0.0.1:5999: connect: connection refused";
        let error = classify_pull_error("r/app:1", server_error(500, message));
        assert!(matches!(error, EngineError::PullFailed { .. }));
    }

    #[test]
    fn future_certificate_is_certificate_validity() {
        let message = "Get \"https://registry.example:5000/v2/\": x509: certificate has expired or is not yet valid: current time 2025-06-10T12:00:00Z is before 2026-01-01T00:00:00Z";
        let error = classify_pull_error("registry.example:5000/app:1", server_error(500, message));
        assert!(matches!(error, EngineError::PullFailed { .. }));
        assert!(error.is_certificate_validity());
    }

    #[test]
    fn unknown_authority_is_not_certificate_validity() {
        let message = "Get \"https://registry.example:5000/v2/\": x509: certificate signed by unknown authority";
        assert!(!classify_pull_error("registry.example:5000/app:1", server_error(500, message)).is_certificate_validity());
    }

    #[test]
    fn unauthorized_is_access_denied() {
        let error = classify_pull_error("r/app:1", server_error(500, "Head \"...\": unauthorized: authentication required"));
        assert!(matches!(error, EngineError::AccessDenied { .. }));
    }
}
