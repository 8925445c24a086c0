//! `[self_update]`: the agent replaces its own container with a newer image
//! of itself, handing the lease over to the new container.

use std::time::Duration;

use serde::Deserialize;

use super::{Problem, duration, line_of_key};
use crate::model::ImageReference;

/// Default name of the external network on which the agents hand over.
pub const DEFAULT_NETWORK: &str = "eventpi-agent";

/// Default TCP port of the handover API inside that network.
pub const DEFAULT_HANDOVER_PORT: u16 = 8750;

/// `[self_update]`: how the agent updates its own container.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct SelfUpdateConfig {
    /// Image reference to follow, such as
    /// `registry.example.net/eventpi/autoupdate:stable`. Default: the
    /// reference the agent's own container was created from.
    pub image: Option<String>,
    /// External Docker network on which the old and the new agent talk. The
    /// agent creates it when it is missing.
    pub network: String,
    /// TCP port of the handover API on that network. It is never published
    /// on a host port.
    pub handover_port: u16,
    /// Time between two checks of the registry.
    #[serde(deserialize_with = "duration")]
    pub check_interval: Duration,
    /// Share of the check interval added or removed at random, in percent.
    pub check_jitter_percent: u8,
    #[serde(deserialize_with = "duration")]
    pub pull_timeout: Duration,
    /// How long the new container may take to respond on the handover API.
    #[serde(deserialize_with = "duration")]
    pub start_timeout: Duration,
    /// How long the new container may take to respond to the handover request.
    #[serde(deserialize_with = "duration")]
    pub handover_timeout: Duration,
    /// How long the new agent runs and checks itself before it confirms.
    #[serde(deserialize_with = "duration")]
    pub probation: Duration,
    /// How long after the handover the old agent waits for the confirmation
    /// before it takes the lease back.
    #[serde(deserialize_with = "duration")]
    pub confirm_timeout: Duration,
    /// First wait before a failed image is tried again; it doubles up to the
    /// maximum.
    #[serde(deserialize_with = "duration")]
    pub retry_backoff_min: Duration,
    #[serde(deserialize_with = "duration")]
    pub retry_backoff_max: Duration,
    /// Agent restarts allowed while checking or pulling before the attempt
    /// fails.
    pub max_resumes: u32,
    /// Time the old agent gets to stop after SIGTERM before SIGKILL.
    #[serde(deserialize_with = "duration")]
    pub stop_timeout: Duration,
}

impl Default for SelfUpdateConfig {
    fn default() -> Self {
        SelfUpdateConfig {
            image: None,
            network: DEFAULT_NETWORK.to_string(),
            handover_port: DEFAULT_HANDOVER_PORT,
            check_interval: Duration::from_secs(3600),
            check_jitter_percent: 10,
            pull_timeout: Duration::from_secs(1800),
            start_timeout: Duration::from_secs(120),
            handover_timeout: Duration::from_secs(30),
            probation: Duration::from_secs(60),
            confirm_timeout: Duration::from_secs(600),
            retry_backoff_min: Duration::from_secs(600),
            retry_backoff_max: Duration::from_secs(24 * 3600),
            max_resumes: 5,
            stop_timeout: Duration::from_secs(10),
        }
    }
}

/// Checks values of `[self_update]` that parse but cannot work.
pub(super) fn check(config: &SelfUpdateConfig, text: &str) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut report = |key: &str, message: String| {
        let key = format!("self_update.{key}");
        problems.push(Problem { line: line_of_key(text, &key), key, message });
    };

    if let Some(image) = &config.image {
        match ImageReference::parse(image) {
            Ok(reference) if reference.digest.is_some() => {
                report(
                    "image",
                    format!("{image:?} is pinned to a digest, so it can never move: name a tag, such as registry.example.net/eventpi/autoupdate:stable"),
                );
            }
            Ok(_) => {}
            Err(error) => report("image", error.to_string()),
        }
    }
    if !valid_network_name(&config.network) {
        report("network", format!("{:?} is not a Docker network name: use letters, digits, '_', '.' and '-', starting with a letter or digit", config.network));
    }
    if config.handover_port == 0 {
        report("handover_port", "must be a port number from 1 to 65535".into());
    }
    for (key, value) in [
        ("check_interval", config.check_interval),
        ("pull_timeout", config.pull_timeout),
        ("start_timeout", config.start_timeout),
        ("handover_timeout", config.handover_timeout),
        ("probation", config.probation),
        ("confirm_timeout", config.confirm_timeout),
        ("retry_backoff_min", config.retry_backoff_min),
        ("stop_timeout", config.stop_timeout),
    ] {
        if value.is_zero() {
            report(key, "must be longer than zero".into());
        }
    }
    if config.check_jitter_percent > 50 {
        report("check_jitter_percent", format!("{} is above the maximum of 50", config.check_jitter_percent));
    }
    if config.confirm_timeout <= config.probation {
        report("confirm_timeout", "must be longer than self_update.probation, because the new agent confirms only after its probation".into());
    }
    if config.retry_backoff_max < config.retry_backoff_min {
        report("retry_backoff_max", "must not be shorter than self_update.retry_backoff_min".into());
    }
    problems
}

fn valid_network_name(name: &str) -> bool {
    let mut characters = name.chars();
    let first_valid = characters.next().is_some_and(|first| first.is_ascii_alphanumeric());
    first_valid && characters.all(|character| character.is_ascii_alphanumeric() || "_.-".contains(character))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems_of(config: &SelfUpdateConfig) -> Vec<String> {
        check(config, "").into_iter().map(|problem| problem.key).collect()
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(problems_of(&SelfUpdateConfig::default()), Vec::<String>::new());
    }

    #[test]
    fn pinned_image_is_rejected() {
        let image = format!("r:5000/agent@sha256:{}", "ab".repeat(32));
        let config = SelfUpdateConfig { image: Some(image), ..SelfUpdateConfig::default() };

        assert_eq!(problems_of(&config), vec!["self_update.image"]);
    }

    #[test]
    fn confirmation_must_outlast_probation() {
        let config = SelfUpdateConfig { probation: Duration::from_secs(60), confirm_timeout: Duration::from_secs(60), ..SelfUpdateConfig::default() };

        assert_eq!(problems_of(&config), vec!["self_update.confirm_timeout"]);
    }

    #[test]
    fn bad_network_and_port_are_named() {
        let config = SelfUpdateConfig { network: "-bad net".into(), handover_port: 0, ..SelfUpdateConfig::default() };

        assert_eq!(problems_of(&config), vec!["self_update.network", "self_update.handover_port"]);
    }
}
