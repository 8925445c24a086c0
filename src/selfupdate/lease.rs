//! The lease rules that decide which agent acts, followed at start and after
//! another agent fenced this one out.
//!
//! | situation in the journal | what this agent does |
//! |---|---|
//! | no lease | takes one |
//! | the lease is its own (same container, after a restart) | keeps it |
//! | it handed over, and the new agent has not confirmed | watches: takes the lease back with a higher epoch when the new agent stops, restarts, or misses the confirmation deadline; once it confirms, waits to be removed |
//! | it is the candidate of the handover in progress | serves the handover API and does nothing else |
//! | the holder's container is gone or stopped | takes the lease |
//! | the holder's container runs | waits passively and looks again |
//! | the holder is a host process that is gone | takes the lease |
//! | the holder cannot be checked | takes the lease at start, waits passively after being fenced |
//!
//! Every take is an append conditional on the lease the agent looked at, so
//! two agents that decide at once cannot both win.

use std::sync::Arc;
use std::time::Duration;

use bollard::models::ContainerStateStatusEnum;

use crate::config::SelfUpdateConfig;
use crate::driver::docker::Engine;
use crate::journal::record::LeaseRecord;
use crate::journal::{JournalError, JournalState, Record};
use crate::machine::selfupdate::{Attempt, BootTime, SelfUpdateEvents, SelfUpdateMachine, SelfUpdateState};
use crate::model::Failure;
use crate::runtime::Runtime;
use crate::selfupdate::docker::{self, repository_digest};
use crate::selfupdate::driver::{facts_now, journal_machine, machine_settings, notices_for, step_records};
use crate::selfupdate::handover::{self, Candidate};
use crate::selfupdate::{IMAGE_LABEL, TOKEN_VARIABLE};

/// Time between two looks at the journal and the holder while passive.
const PASSIVE_POLL: Duration = Duration::from_secs(5);

/// Time between two looks at the journal and the new agent while watching.
const WATCH_POLL: Duration = Duration::from_secs(1);

/// Time between two tries to reach the Docker engine.
const ENGINE_RETRY: Duration = Duration::from_secs(5);

/// Liveness of the newest lease's holder, as far as this agent can check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// It runs, or will run again on its own.
    Alive,
    /// Its container or process is gone or stopped.
    Gone,
    /// This agent cannot tell.
    Unknown,
}

/// Next step of this agent on its way to the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Decision {
    Take,
    Keep(u64),
    Watch(Box<Attempt>),
    Candidate,
    Passive(String),
}

/// An agent's way to the lease.
pub struct Claim {
    runtime: Arc<Runtime>,
    /// The name this agent writes into a lease.
    holder: String,
    container_id: Option<String>,
    docker_host: Option<String>,
    self_update: Option<SelfUpdateConfig>,
    /// The handover token when the agent was started as a candidate.
    token: Option<String>,
    engine: Option<Engine>,
    /// The last reason logged for waiting, so that it is logged once.
    logged: Option<String>,
}

impl Claim {
    pub fn new(runtime: Arc<Runtime>, docker_host: Option<String>, self_update: Option<SelfUpdateConfig>) -> Claim {
        let token = std::env::var(TOKEN_VARIABLE).ok().filter(|token| !token.is_empty());
        Claim {
            runtime,
            holder: crate::identity::holder_name(),
            container_id: crate::identity::own_container_id(),
            docker_host,
            self_update,
            token,
            engine: None,
            logged: None,
        }
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Returns once this agent holds the newest lease, with its epoch. Until
    /// then it waits passively, serves as a candidate or watches a handover.
    /// `first_start` is false after the agent was fenced out.
    pub async fn acquire(&mut self, first_start: bool) -> Result<u64, JournalError> {
        loop {
            let decision = self.decide(first_start).await?;
            match decision {
                Decision::Keep(epoch) => {
                    self.runtime.lock_journal().assume_epoch(epoch);
                    tracing::info!(holder = %self.holder, epoch, "this agent holds the newest lease; it goes on acting");
                    return Ok(epoch);
                }
                Decision::Take => {
                    if let Some(epoch) = self.take()? {
                        tracing::info!(holder = %self.holder, epoch, "took the lease");
                        return Ok(epoch);
                    }
                }
                Decision::Candidate => {
                    if let Some(epoch) = self.serve_as_candidate().await {
                        return Ok(epoch);
                    }
                }
                Decision::Watch(attempt) => {
                    if let Some(epoch) = self.watch(*attempt).await? {
                        return Ok(epoch);
                    }
                }
                Decision::Passive(reason) => {
                    self.log_once(&reason);
                    tokio::time::sleep(PASSIVE_POLL).await;
                }
            }
        }
    }

    fn log_once(&mut self, reason: &str) {
        if self.logged.as_deref() != Some(reason) {
            tracing::warn!(holder = %self.holder, reason, "this agent is passive: it does not act");
            self.logged = Some(reason.to_string());
        }
    }

    async fn decide(&mut self, first_start: bool) -> Result<Decision, JournalError> {
        let state = {
            let mut journal = self.runtime.lock_journal();
            journal.refresh()?;
            journal.state().clone()
        };
        let Some(lease) = state.lease.clone() else { return Ok(Decision::Take) };
        if lease.holder == self.holder {
            return Ok(Decision::Keep(lease.epoch));
        }

        let (machine_state, memory) = journal_machine(&state);
        if let (Some(own), Some(attempt)) = (&self.container_id, memory.attempt.clone()) {
            let watching = matches!(machine_state, SelfUpdateState::Probation | SelfUpdateState::Retiring);
            if watching && attempt.target.old.id == *own && attempt.offered_epoch == Some(lease.epoch) {
                return Ok(Decision::Watch(Box::new(attempt)));
            }
            let offering = matches!(machine_state, SelfUpdateState::Starting | SelfUpdateState::HandingOver);
            let chosen = attempt.candidate.as_ref().is_some_and(|candidate| candidate.id == *own);
            if offering && chosen && self.token.is_some() && self.self_update.is_some() {
                return Ok(Decision::Candidate);
            }
        }

        match self.liveness(&lease).await {
            Liveness::Gone => Ok(Decision::Take),
            Liveness::Alive => Ok(Decision::Passive(format!("lease epoch {} is held by {}, which runs", lease.epoch, lease.holder))),
            Liveness::Unknown if first_start => Ok(Decision::Take),
            Liveness::Unknown => Ok(Decision::Passive(format!(
                "lease epoch {} is held by {}, which this agent cannot check; restart this agent to take the lease",
                lease.epoch, lease.holder
            ))),
        }
    }

    /// Takes the lease with the next epoch, unless the lease changed since
    /// this agent looked. Returns `None` when it changed.
    fn take(&mut self) -> Result<Option<u64>, JournalError> {
        let meta = self.runtime.seams.meta();
        let mut journal = self.runtime.lock_journal();
        let seen = journal.state().lease_epoch();
        let holder = self.holder.clone();
        let result = journal.append_with(|state| {
            if state.lease_epoch() != seen {
                return Err(JournalError::Refused(format!("lease epoch {} was taken meanwhile", state.lease_epoch())));
            }
            let epoch = state.next_epoch();
            Ok((vec![Record::Lease(LeaseRecord { meta, epoch, holder })], epoch))
        });
        match result {
            Ok(epoch) => Ok(Some(epoch)),
            Err(JournalError::Refused(reason)) => {
                tracing::info!(reason, "did not take the lease");
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    async fn liveness(&mut self, lease: &LeaseRecord) -> Liveness {
        if let Some(short_id) = lease.holder.strip_prefix("container:") {
            let engine = self.engine().await;
            return match docker::status(&engine, short_id).await {
                Ok(None) => Liveness::Gone,
                Ok(Some(status)) if status.is_up() => Liveness::Alive,
                Ok(Some(_)) => Liveness::Gone,
                Err(error) => {
                    tracing::warn!(%error, holder = %lease.holder, "cannot inspect the lease holder's container");
                    Liveness::Unknown
                }
            };
        }
        host_process_liveness(&lease.holder, self.container_id.is_some())
    }

    /// Returns the engine, connecting first and retrying until it responds.
    async fn engine(&mut self) -> Engine {
        if let Some(engine) = &self.engine {
            return engine.clone();
        }
        let mut failures = 0u32;
        loop {
            match Engine::connect(self.docker_host.as_deref(), None).await {
                Ok(engine) => {
                    self.engine = Some(engine.clone());
                    return engine;
                }
                Err(error) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(12) {
                        tracing::warn!(%error, failures, "waiting for the Docker engine to decide who holds the lease");
                    }
                    tokio::time::sleep(ENGINE_RETRY).await;
                }
            }
        }
    }

    /// Serves the handover API until the old agent hands over; returns the
    /// epoch taken, or `None` when the API could not start.
    async fn serve_as_candidate(&mut self) -> Option<u64> {
        let config = self.self_update.clone()?;
        let token = self.token.clone()?;
        let own_id = self.container_id.clone()?;
        let engine = self.engine().await;

        let inspect = match docker::inspect(&engine, &own_id).await {
            Ok(Some(inspect)) => inspect,
            other => {
                tracing::error!(result = ?other.map(|_| ()), "candidate: cannot inspect its own container");
                tokio::time::sleep(PASSIVE_POLL).await;
                return None;
            }
        };
        let address = inspect
            .network_settings
            .as_ref()
            .and_then(|settings| settings.networks.as_ref())
            .and_then(|networks| networks.get(&config.network))
            .and_then(|endpoint| endpoint.ip_address.as_ref())
            .and_then(|address| address.parse().ok());
        let Some(address) = address else {
            tracing::error!(network = %config.network, "candidate: this container has no address on the handover network");
            tokio::time::sleep(PASSIVE_POLL).await;
            return None;
        };
        let labels = inspect.config.as_ref().and_then(|config| config.labels.clone()).unwrap_or_default();
        let followed = config.image.clone().or_else(|| labels.get(IMAGE_LABEL).cloned()).unwrap_or_default();
        let running_digest = repository_digest(&engine, inspect.image.as_deref().unwrap_or_default(), &followed).await;
        let name = inspect.name.clone().unwrap_or_default().trim_start_matches('/').to_string();
        let own = crate::machine::selfupdate::ContainerRef { id: own_id, name };

        crate::failpoint::hit("self-update", "Candidate", crate::failpoint::Point::BeforeCommand);
        let socket = std::net::SocketAddr::new(address, config.handover_port);
        let listener = match handover::listen(socket).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::error!(%error, "candidate: the handover API cannot start");
                tokio::time::sleep(PASSIVE_POLL).await;
                return None;
            }
        };
        tracing::info!(address = %socket, "candidate: serving the handover API; this agent does nothing else until it holds the lease");
        let candidate = Candidate::new(&token, own, self.holder.clone(), running_digest, machine_settings(&config));
        let epoch = handover::serve(listener, self.runtime.clone(), candidate).await;
        self.runtime.self_update.accepted.store(true, std::sync::atomic::Ordering::SeqCst);
        self.token = None;
        Some(epoch)
    }

    /// Watches a handover this agent started. Returns the epoch when it took
    /// the lease back, or `None` when the journal no longer shows the
    /// handover (the caller decides again).
    async fn watch(&mut self, attempt: Attempt) -> Result<Option<u64>, JournalError> {
        let Some(config) = self.self_update.clone() else {
            self.log_once("this agent handed over, but [self_update] is missing, so it cannot take the lease back");
            tokio::time::sleep(PASSIVE_POLL).await;
            return Ok(None);
        };
        let candidate = attempt.candidate.clone().unwrap_or_default();
        let Some(offered) = attempt.offered_epoch else { return Ok(None) };
        let started = self.now();
        let deadline = match attempt.accepted_at {
            Some(accepted) if accepted.boot_id == started.boot_id => accepted.ms + config.confirm_timeout.as_millis() as u64,
            _ => started.ms + config.confirm_timeout.as_millis() as u64,
        };
        tracing::info!(candidate = %candidate.name, epoch = offered, confirm_within_ms = deadline.saturating_sub(started.ms), "handed over; watching the new agent's probation without acting");

        loop {
            let state = {
                let mut journal = self.runtime.lock_journal();
                journal.refresh()?;
                journal.state().clone()
            };
            let (machine_state, _) = journal_machine(&state);
            if state.confirmed_epochs.contains(&offered) || machine_state == SelfUpdateState::Retiring {
                self.log_once(&format!("the new agent {} confirmed the handover; this agent waits to be removed", candidate.name));
                tokio::time::sleep(PASSIVE_POLL).await;
                continue;
            }
            if machine_state != SelfUpdateState::Probation || state.lease_epoch() != offered {
                return Ok(None);
            }

            let engine = self.engine().await;
            let problem = match docker::status(&engine, &candidate.id).await {
                Ok(None) => Some(format!("the new agent's container {} was removed before it confirmed", candidate.name)),
                Ok(Some(status)) if status.restart_count > 0 => {
                    Some(format!("the new agent restarted {} time(s) before it confirmed; last exit code {}", status.restart_count, status.exit_code))
                }
                Ok(Some(status)) if status.state != ContainerStateStatusEnum::RUNNING => {
                    Some(format!("the new agent's container is {} (exit code {}) before it confirmed", status.state, status.exit_code))
                }
                Ok(Some(_)) => None,
                Err(error) => {
                    tracing::warn!(%error, "cannot inspect the new agent's container");
                    None
                }
            };
            let timed_out = self.now().ms >= deadline && self.now().boot_id == started.boot_id;
            let reason = match (problem, timed_out) {
                (Some(problem), _) => problem,
                (None, true) => format!("the new agent did not confirm within {} of the handover", humantime::format_duration(config.confirm_timeout)),
                (None, false) => {
                    tokio::time::sleep(WATCH_POLL).await;
                    continue;
                }
            };
            if let Some(epoch) = self.take_back(&config, offered, &reason)? {
                return Ok(Some(epoch));
            }
        }
    }

    /// Takes the lease back from the candidate with the next epoch, in the
    /// same append as the step that records the failure, unless the new
    /// agent confirmed first.
    fn take_back(&mut self, config: &SelfUpdateConfig, offered: u64, reason: &str) -> Result<Option<u64>, JournalError> {
        let meta = self.runtime.seams.meta();
        let facts = facts_now(&meta, false);
        let holder = self.holder.clone();
        let capacity = self.runtime.outbox_capacity;
        let settings = machine_settings(config);
        let failure = Failure::rejected(reason.to_string());
        let result = self.runtime.lock_journal().append_with(|state: &JournalState| {
            if state.confirmed_epochs.contains(&offered) {
                return Err(JournalError::Refused("the new agent confirmed first".into()));
            }
            let (machine_state, memory) = journal_machine(state);
            if state.lease_epoch() != offered || machine_state != SelfUpdateState::Probation {
                return Err(JournalError::Refused("the journal no longer shows the handover in probation".into()));
            }
            let mut machine = SelfUpdateMachine::restore(machine_state, memory, settings);
            let step = machine.handle(SelfUpdateEvents::TakenBack(failure), facts).map_err(|error| JournalError::Refused(error.to_string()))?;
            let epoch = state.next_epoch();
            let mut records = vec![Record::Lease(LeaseRecord { meta, epoch, holder })];
            records.extend(step_records(meta, epoch, &step, machine.memory()));
            let notices = notices_for(&step, machine.memory());
            records.extend(crate::notify::queue_records(state, &notices, meta, capacity));
            Ok((records, epoch))
        });
        match result {
            Ok(epoch) => {
                self.runtime.outbox_wake.notify_one();
                tracing::warn!(epoch, reason, "took the lease back from the new agent");
                Ok(Some(epoch))
            }
            Err(JournalError::Refused(why)) => {
                tracing::info!(why, "did not take the lease back");
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    fn now(&self) -> BootTime {
        let meta = self.runtime.seams.meta();
        BootTime { boot_id: meta.boot_id, ms: meta.monotonic_ms }
    }
}

/// Checks a holder named `host:<name>:<pid>`: only an agent on the same
/// host, outside a container, can see that process.
///
/// NOTE: a pid reused by another `autoupdate` process after a crash looks
/// alive; that agent then waits passively until the process ends.
pub fn host_process_liveness(holder: &str, in_container: bool) -> Liveness {
    let Some(rest) = holder.strip_prefix("host:") else { return Liveness::Unknown };
    let Some((host, pid)) = rest.rsplit_once(':') else { return Liveness::Unknown };
    let own_host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let Ok(pid) = pid.parse::<u32>() else { return Liveness::Unknown };
    if in_container || host != own_host.trim() {
        return Liveness::Unknown;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return Liveness::Gone };
    // The state follows the command name in parentheses, which may itself
    // contain spaces and parentheses.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).unwrap_or("X");
    let own_command = std::fs::read_to_string("/proc/self/comm").unwrap_or_default();
    let command = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if matches!(state, "Z" | "X" | "x") || command != own_command {
        return Liveness::Gone;
    }
    Liveness::Alive
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_host() -> String {
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string()
    }

    #[test]
    fn other_host_cannot_be_checked() {
        assert_eq!(host_process_liveness("host:elsewhere-0001:1", false), Liveness::Unknown);
        assert_eq!(host_process_liveness(&format!("host:{}:1", own_host()), true), Liveness::Unknown);
        assert_eq!(host_process_liveness("agent-a", false), Liveness::Unknown);
    }

    #[test]
    fn missing_process_is_gone() {
        let holder = format!("host:{}:{}", own_host(), u32::MAX - 1);

        assert_eq!(host_process_liveness(&holder, false), Liveness::Gone);
    }

    #[test]
    fn own_process_is_alive() {
        let holder = format!("host:{}:{}", own_host(), std::process::id());

        assert_eq!(host_process_liveness(&holder, false), Liveness::Alive);
    }

    #[test]
    fn other_command_is_gone() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let holder = format!("host:{}:{}", own_host(), child.id());

        let liveness = host_process_liveness(&holder, false);
        child.kill().unwrap();
        child.wait().unwrap();

        assert_eq!(liveness, Liveness::Gone);
    }
}
