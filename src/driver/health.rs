//! The health gate: after `compose up`, every service of the release must be
//! running, healthy where it has a healthcheck, on the pinned image, and must
//! not restart for the whole probation window.
//!
//! Time is measured with the monotonic clock (`tokio::time::Instant`), so a
//! jump of the wall clock neither shortens nor stretches the window.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use crate::driver::docker::{ContainerStatus, Engine};
use crate::model::Release;

/// Time between two looks at the containers.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(500);

/// Settings of one gate run.
#[derive(Debug, Clone)]
pub struct GateSettings {
    pub project: String,
    pub probation: Duration,
    /// Extra time for healthchecks still `starting` when the window ends.
    pub health_grace: Duration,
    /// Services left out of the gate, such as one the space guard holds stopped.
    pub excluded: BTreeSet<String>,
}

/// Reason a gate failed, in words an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct GateFailure(pub String);

/// Outcome of looking at the containers once.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Good,
    /// Still waiting for the healthcheck of the named service.
    Starting(String),
    Bad(String),
}

/// Runs the gate to its end and returns `Ok` when it passed.
pub async fn watch(engine: &Engine, release: &Release, settings: &GateSettings) -> Result<(), GateFailure> {
    let started = Instant::now();
    let window_end = started + settings.probation;
    let give_up = window_end + settings.health_grace;
    let mut baseline: HashMap<String, i64> = HashMap::new();

    loop {
        let containers = match engine.project_containers(&settings.project).await {
            Ok(containers) => containers,
            Err(error) => return Err(GateFailure(format!("cannot read the containers of project {}: {error}", settings.project))),
        };
        for container in &containers {
            baseline.entry(container.id.clone()).or_insert(container.restart_count);
        }

        let verdict = judge(release, &containers, &baseline, &settings.excluded);
        let now = Instant::now();
        match verdict {
            Verdict::Bad(reason) => return Err(GateFailure(reason)),
            Verdict::Good if now >= window_end => return Ok(()),
            Verdict::Starting(service) if now >= give_up => {
                let waited = humantime::format_duration(Duration::from_secs(now.duration_since(started).as_secs()));
                return Err(GateFailure(format!("service {service} is still starting its healthcheck after {waited}")));
            }
            Verdict::Good | Verdict::Starting(_) => {}
        }
        tokio::time::sleep(SAMPLE_INTERVAL).await;
    }
}

fn judge(release: &Release, containers: &[ContainerStatus], baseline: &HashMap<String, i64>, excluded: &BTreeSet<String>) -> Verdict {
    let mut starting = None;
    for service in &release.services {
        if excluded.contains(&service.service) {
            continue;
        }
        let pinned = service.pinned_reference();
        let mine: Vec<&ContainerStatus> = containers.iter().filter(|container| container.service == service.service).collect();
        if mine.is_empty() {
            return Verdict::Bad(format!("service {} has no container", service.service));
        }

        for container in mine {
            if container.image != pinned {
                return Verdict::Bad(format!("service {} runs {} instead of the pinned {}", service.service, container.image, pinned));
            }
            if container.state != "running" {
                return Verdict::Bad(format!(
                    "service {} container {} is {} (exit code {})",
                    service.service, container.name, container.state, container.exit_code
                ));
            }
            let first_seen = baseline.get(&container.id).copied().unwrap_or(container.restart_count);
            if container.restart_count > first_seen {
                return Verdict::Bad(format!(
                    "service {} container {} restarted {} times during probation",
                    service.service,
                    container.name,
                    container.restart_count - first_seen
                ));
            }
            match container.health.as_deref() {
                Some("unhealthy") => return Verdict::Bad(format!("service {} container {} is unhealthy", service.service, container.name)),
                Some("starting") => starting = Some(service.service.clone()),
                _ => {}
            }
        }
    }
    match starting {
        Some(service) => Verdict::Starting(service),
        None => Verdict::Good,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CommitId, Digest, ServiceImage};

    fn release() -> Release {
        Release { commit: CommitId([1; 20]), services: vec![ServiceImage { service: "web".into(), image: "r:5000/web:1".into(), digest: Digest([2; 32]) }] }
    }

    fn container(state: &str, health: Option<&str>, restarts: i64) -> ContainerStatus {
        ContainerStatus {
            id: "c1".into(),
            name: "p-web-1".into(),
            service: "web".into(),
            state: state.into(),
            health: health.map(str::to_string),
            restart_count: restarts,
            exit_code: 0,
            image: release().services[0].pinned_reference(),
            started_at: String::new(),
        }
    }

    fn baseline(restarts: i64) -> HashMap<String, i64> {
        HashMap::from([("c1".to_string(), restarts)])
    }

    #[test]
    fn running_without_healthcheck_is_good() {
        let verdict = judge(&release(), &[container("running", None, 0)], &baseline(0), &BTreeSet::new());
        assert_eq!(verdict, Verdict::Good);
    }

    #[test]
    fn exited_container_is_bad() {
        let verdict = judge(&release(), &[container("exited", None, 0)], &baseline(0), &BTreeSet::new());
        assert!(matches!(verdict, Verdict::Bad(reason) if reason.contains("exited")));
    }

    #[test]
    fn growing_restart_count_is_bad() {
        let verdict = judge(&release(), &[container("running", None, 3)], &baseline(1), &BTreeSet::new());
        assert!(matches!(verdict, Verdict::Bad(reason) if reason.contains("restarted 2 times")));
    }

    #[test]
    fn starting_healthcheck_waits() {
        let verdict = judge(&release(), &[container("running", Some("starting"), 0)], &baseline(0), &BTreeSet::new());
        assert_eq!(verdict, Verdict::Starting("web".into()));
    }

    #[test]
    fn wrong_image_is_bad() {
        let mut stale = container("running", None, 0);
        stale.image = "r:5000/web:1".into();
        let verdict = judge(&release(), &[stale], &baseline(0), &BTreeSet::new());
        assert!(matches!(verdict, Verdict::Bad(reason) if reason.contains("instead of the pinned")));
    }

    #[test]
    fn excluded_service_is_skipped() {
        let excluded = BTreeSet::from(["web".to_string()]);
        let verdict = judge(&release(), &[], &HashMap::new(), &excluded);
        assert_eq!(verdict, Verdict::Good);
    }
}
