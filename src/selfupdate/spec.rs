//! The candidate container's configuration, derived from the running agent's
//! container and the image it was created from.
//!
//! The candidate gets the old container's mounts, labels, environment,
//! restart policy, devices, cgroup namespace mode and networks. A setting is
//! copied only where the operator set it: a value the container shares with
//! its old image (the command, the entrypoint, an environment entry, a label)
//! is left out, so the new image's own value applies. Compose's labels are
//! never copied. The old container's own host name (its short id) is not
//! copied either.

use std::collections::HashMap;

use bollard::models::{ContainerCreateBody, ContainerInspectResponse, EndpointSettings, ImageConfig, NetworkingConfig};

use crate::selfupdate::{AGENT_LABEL, CANDIDATE_LABEL, COMPOSE_LABEL_PREFIX, IMAGE_LABEL, TOKEN_VARIABLE};

/// What the candidate is created with, beyond the old container's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CandidateRequest {
    /// Container name of the candidate.
    pub name: String,
    /// The tag reference to create it from, already pulled.
    pub image: String,
    /// The reference the agent follows, written into [`IMAGE_LABEL`].
    pub followed: String,
    /// Value of [`AGENT_LABEL`]: the name every generation takes over.
    pub agent_name: String,
    pub attempt: u32,
    /// The one-time handover token, passed in [`TOKEN_VARIABLE`].
    pub token: String,
    /// The external network the handover runs on.
    pub network: String,
}

/// The create request and the networks to connect before the start.
#[derive(Debug, Clone)]
pub struct CandidateSpec {
    pub name: String,
    pub body: ContainerCreateBody,
    /// Networks beyond the one in the create request, by name. Docker
    /// Engine 20.10 (API 1.41) takes a single network when a container is
    /// created; the others are connected before the start.
    pub extra_networks: Vec<(String, EndpointSettings)>,
}

/// Error for an old container that a candidate cannot copy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("container {container} cannot be updated by a handover: {reason}")]
pub struct SpecError {
    pub container: String,
    pub reason: String,
}

/// Builds the candidate's configuration from the old container's inspect
/// data and its image's configuration.
pub fn candidate_spec(old: &ContainerInspectResponse, old_image: &ImageConfig, request: &CandidateRequest) -> Result<CandidateSpec, SpecError> {
    let old_name = old.name.clone().unwrap_or_default().trim_start_matches('/').to_string();
    let unsupported = |reason: String| SpecError { container: old_name.clone(), reason };
    let config = old.config.clone().unwrap_or_default();
    let mut host_config = old.host_config.clone().unwrap_or_default();

    let published = host_config.port_bindings.iter().flatten().any(|(_, bindings)| bindings.as_ref().is_some_and(|list| !list.is_empty()));
    if published || host_config.publish_all_ports == Some(true) {
        return Err(unsupported(
            "it publishes ports on the host, which the new container cannot bind while the old one runs; reach the agent through its control socket instead"
                .into(),
        ));
    }
    let network_mode = host_config.network_mode.clone().unwrap_or_default();
    if network_mode == "host" || network_mode == "none" || network_mode.starts_with("container:") {
        return Err(unsupported(format!(
            "its network mode is {network_mode:?}, but the handover needs the container on the Docker network {}",
            request.network
        )));
    }

    let old_id = old.id.clone().unwrap_or_default();
    let short_id = &old_id[..old_id.len().min(12)];
    let hostname = config.hostname.clone().filter(|hostname| !hostname.is_empty() && hostname != short_id);

    let body = ContainerCreateBody {
        hostname,
        domainname: config.domainname.clone().filter(|domain| !domain.is_empty()),
        user: set_by_operator(&config.user, &old_image.user),
        attach_stdin: config.attach_stdin,
        attach_stdout: config.attach_stdout,
        attach_stderr: config.attach_stderr,
        tty: config.tty,
        open_stdin: config.open_stdin,
        stdin_once: config.stdin_once,
        env: Some(candidate_env(&config.env, &old_image.env, &request.token)),
        cmd: set_by_operator(&config.cmd, &old_image.cmd),
        healthcheck: set_by_operator(&config.healthcheck, &old_image.healthcheck),
        image: Some(request.image.clone()),
        working_dir: set_by_operator(&config.working_dir, &old_image.working_dir),
        entrypoint: set_by_operator(&config.entrypoint, &old_image.entrypoint),
        labels: Some(candidate_labels(&config.labels, &old_image.labels, request)),
        stop_signal: set_by_operator(&config.stop_signal, &old_image.stop_signal),
        stop_timeout: config.stop_timeout,
        ..ContainerCreateBody::default()
    };

    let (first, extra_networks) = networks(old, &network_mode, short_id, &request.network);
    host_config.network_mode = Some(first.0.clone());
    let networking = NetworkingConfig { endpoints_config: Some(HashMap::from([first])) };
    Ok(CandidateSpec {
        name: request.name.clone(),
        body: ContainerCreateBody { host_config: Some(host_config), networking_config: Some(networking), ..body },
        extra_networks,
    })
}

/// Returns the container's value when it differs from the image's, so that
/// the new image's value applies where the operator set nothing.
fn set_by_operator<T: Clone + PartialEq>(container: &Option<T>, image: &Option<T>) -> Option<T> {
    container.clone().filter(|value| Some(value) != image.as_ref())
}

/// Returns the old container's environment without the entries its image
/// set and without the old token, plus the new token.
fn candidate_env(container: &Option<Vec<String>>, image: &Option<Vec<String>>, token: &str) -> Vec<String> {
    let image = image.clone().unwrap_or_default();
    let token_prefix = format!("{TOKEN_VARIABLE}=");
    let mut env: Vec<String> = container.iter().flatten().filter(|entry| !image.contains(entry) && !entry.starts_with(&token_prefix)).cloned().collect();
    env.push(format!("{token_prefix}{token}"));
    env
}

/// Returns the old container's labels without Compose's, the image's and the
/// candidate's own, plus the candidate labels of this request.
fn candidate_labels(
    container: &Option<HashMap<String, String>>,
    image: &Option<HashMap<String, String>>,
    request: &CandidateRequest,
) -> HashMap<String, String> {
    let image = image.clone().unwrap_or_default();
    let own = [AGENT_LABEL, CANDIDATE_LABEL, IMAGE_LABEL];
    let mut labels: HashMap<String, String> = container
        .iter()
        .flatten()
        .filter(|(key, value)| !key.starts_with(COMPOSE_LABEL_PREFIX) && image.get(*key) != Some(value) && !own.contains(&key.as_str()))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    labels.insert(AGENT_LABEL.into(), request.agent_name.clone());
    labels.insert(CANDIDATE_LABEL.into(), request.attempt.to_string());
    labels.insert(IMAGE_LABEL.into(), request.followed.clone());
    labels
}

/// Returns the network the candidate is created on and the ones connected
/// afterwards: the old container's networks plus the external one. Aliases
/// are copied without the old container's short id, which Docker adds on
/// its own. Fixed addresses are not copied, because the old container still
/// uses them.
fn networks(
    old: &ContainerInspectResponse,
    network_mode: &str,
    short_id: &str,
    external: &str,
) -> ((String, EndpointSettings), Vec<(String, EndpointSettings)>) {
    let attached = old.network_settings.as_ref().and_then(|settings| settings.networks.clone()).unwrap_or_default();
    let mut names: Vec<String> = attached.keys().cloned().collect();
    names.sort();
    if !names.iter().any(|name| name == external) {
        names.push(external.to_string());
    }

    let endpoint = |name: &str| {
        let aliases: Vec<String> =
            attached.get(name).and_then(|settings| settings.aliases.clone()).unwrap_or_default().into_iter().filter(|alias| alias != short_id).collect();
        EndpointSettings { aliases: (!aliases.is_empty()).then_some(aliases), ..EndpointSettings::default() }
    };

    // The network named in the network mode comes first; "default" and an
    // empty mode mean the engine's default bridge.
    let mode_network = match network_mode {
        "" | "default" => "bridge",
        other => other,
    };
    let first = names.iter().position(|name| name == mode_network).unwrap_or(0);
    let first_name = names.remove(first);
    let first = (first_name.clone(), endpoint(&first_name));
    let extra = names.iter().map(|name| (name.clone(), endpoint(name))).collect();
    (first, extra)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{ContainerConfig, HostConfig, NetworkSettings, PortBinding, RestartPolicy, RestartPolicyNameEnum};

    const OLD_ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn request() -> CandidateRequest {
        CandidateRequest {
            name: "agent-update-3".into(),
            image: "r:5000/agent:stable".into(),
            followed: "r:5000/agent:stable".into(),
            agent_name: "agent".into(),
            attempt: 3,
            token: "t0k3n".into(),
            network: "eventpi-agent".into(),
        }
    }

    fn image() -> ImageConfig {
        ImageConfig {
            env: Some(vec!["PATH=/usr/bin".into()]),
            cmd: Some(vec!["run".into(), "--config".into(), "/etc/eventpi/autoupdate.toml".into()]),
            entrypoint: Some(vec!["/autoupdate".into()]),
            labels: Some(HashMap::from([("org.opencontainers.image.version".into(), "1".into())])),
            ..ImageConfig::default()
        }
    }

    fn old_container() -> ContainerInspectResponse {
        let labels = HashMap::from([
            ("org.opencontainers.image.version".to_string(), "1".to_string()),
            ("site".to_string(), "hall-4".to_string()),
            ("com.docker.compose.project".to_string(), "eventpi".to_string()),
            (CANDIDATE_LABEL.to_string(), "2".to_string()),
        ]);
        let networks = HashMap::from([
            ("bridge".to_string(), EndpointSettings { ip_address: Some("172.17.0.5".into()), ..EndpointSettings::default() }),
            ("eventpi-agent".to_string(), EndpointSettings { aliases: Some(vec!["0123456789ab".into(), "agent".into()]), ..EndpointSettings::default() }),
        ]);
        ContainerInspectResponse {
            id: Some(OLD_ID.into()),
            name: Some("/agent".into()),
            config: Some(ContainerConfig {
                hostname: Some("0123456789ab".into()),
                env: Some(vec!["PATH=/usr/bin".into(), "TZ=Europe/Warsaw".into(), format!("{TOKEN_VARIABLE}=old")]),
                cmd: Some(vec!["run".into(), "--config".into(), "/etc/eventpi/autoupdate.toml".into()]),
                entrypoint: Some(vec!["/autoupdate".into()]),
                image: Some("r:5000/agent:stable".into()),
                labels: Some(labels),
                ..ContainerConfig::default()
            }),
            host_config: Some(HostConfig {
                binds: Some(vec!["/var/run/docker.sock:/var/run/docker.sock".into()]),
                restart_policy: Some(RestartPolicy { name: Some(RestartPolicyNameEnum::UNLESS_STOPPED), maximum_retry_count: None }),
                network_mode: Some("default".into()),
                extra_hosts: Some(vec!["host.docker.internal:host-gateway".into()]),
                ..HostConfig::default()
            }),
            network_settings: Some(NetworkSettings { networks: Some(networks), ..NetworkSettings::default() }),
            ..ContainerInspectResponse::default()
        }
    }

    #[test]
    fn operator_settings_are_copied() {
        let spec = candidate_spec(&old_container(), &image(), &request()).unwrap();
        let host = spec.body.host_config.clone().unwrap();

        assert_eq!(spec.name, "agent-update-3");
        assert_eq!(spec.body.image.as_deref(), Some("r:5000/agent:stable"));
        assert_eq!(host.binds, Some(vec!["/var/run/docker.sock:/var/run/docker.sock".to_string()]));
        assert_eq!(host.restart_policy.and_then(|policy| policy.name), Some(RestartPolicyNameEnum::UNLESS_STOPPED));
        assert_eq!(host.extra_hosts, Some(vec!["host.docker.internal:host-gateway".to_string()]));
    }

    #[test]
    fn image_defaults_are_left_to_new_image() {
        let spec = candidate_spec(&old_container(), &image(), &request()).unwrap();

        assert_eq!(spec.body.cmd, None);
        assert_eq!(spec.body.entrypoint, None);
        assert_eq!(spec.body.hostname, None, "the old container's short id is not copied as host name");
        assert_eq!(spec.body.env, Some(vec!["TZ=Europe/Warsaw".to_string(), format!("{TOKEN_VARIABLE}=t0k3n")]));
    }

    #[test]
    fn changed_command_is_kept() {
        let mut old = old_container();
        old.config.as_mut().unwrap().cmd = Some(vec!["run".into(), "--config".into(), "/srv/agent.toml".into()]);

        let spec = candidate_spec(&old, &image(), &request()).unwrap();

        assert_eq!(spec.body.cmd, Some(vec!["run".to_string(), "--config".to_string(), "/srv/agent.toml".to_string()]));
    }

    #[test]
    fn labels_drop_compose_image_and_old_candidate() {
        let spec = candidate_spec(&old_container(), &image(), &request()).unwrap();
        let labels = spec.body.labels.unwrap();

        assert_eq!(labels.get("site").map(String::as_str), Some("hall-4"));
        assert!(!labels.keys().any(|key| key.starts_with("com.docker.compose.")), "{labels:?}");
        assert!(!labels.contains_key("org.opencontainers.image.version"), "{labels:?}");
        assert_eq!(labels.get(CANDIDATE_LABEL).map(String::as_str), Some("3"));
        assert_eq!(labels.get(AGENT_LABEL).map(String::as_str), Some("agent"));
        assert_eq!(labels.get(IMAGE_LABEL).map(String::as_str), Some("r:5000/agent:stable"));
    }

    #[test]
    fn networks_start_with_mode_network() {
        let spec = candidate_spec(&old_container(), &image(), &request()).unwrap();
        let endpoints = spec.body.networking_config.unwrap().endpoints_config.unwrap();

        assert_eq!(endpoints.keys().collect::<Vec<_>>(), vec!["bridge"]);
        assert_eq!(endpoints["bridge"].ip_address, None, "fixed addresses are not copied");
        assert_eq!(spec.body.host_config.unwrap().network_mode.as_deref(), Some("bridge"));
        assert_eq!(spec.extra_networks.len(), 1);
        assert_eq!(spec.extra_networks[0].0, "eventpi-agent");
        assert_eq!(spec.extra_networks[0].1.aliases, Some(vec!["agent".to_string()]));
    }

    #[test]
    fn external_network_is_added() {
        let mut old = old_container();
        old.network_settings.as_mut().unwrap().networks.as_mut().unwrap().remove("eventpi-agent");

        let spec = candidate_spec(&old, &image(), &request()).unwrap();

        let names: Vec<&str> = spec.extra_networks.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, vec!["eventpi-agent"]);
    }

    #[test]
    fn published_port_is_rejected() {
        let mut old = old_container();
        let binding = PortBinding { host_ip: Some("127.0.0.1".into()), host_port: Some("9100".into()) };
        old.host_config.as_mut().unwrap().port_bindings = Some(HashMap::from([("9100/tcp".to_string(), Some(vec![binding]))]));

        let error = candidate_spec(&old, &image(), &request()).unwrap_err();

        assert!(error.reason.contains("publishes ports"), "{error}");
    }

    #[test]
    fn host_network_is_rejected() {
        let mut old = old_container();
        old.host_config.as_mut().unwrap().network_mode = Some("host".into());

        let error = candidate_spec(&old, &image(), &request()).unwrap_err();

        assert!(error.reason.contains("\"host\""), "{error}");
    }
}
