//! Host patch runs inside the agent: on a schedule and on request, each run
//! waiting for its apply policy and then holding the turn for its whole
//! length, so it never runs beside a stack update or a self-update.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::HostConfig;
use crate::coordinator::Process;
use crate::driver::apply_gate::{ApplyGate, LockSources};
use crate::driver::docker::Engine;
use crate::driver::host::{HostDriver, HostDriverError};
use crate::driver::stack::jittered;
use crate::machine::MachineKind;
use crate::machine::host::{HostOutcome, HostState};
use crate::panel::{Condition, Source};
use crate::runtime::{Progress, Runtime};

/// Share of `host.interval` added or removed at random, in percent.
const INTERVAL_JITTER_PERCENT: u8 = 10;

/// Time between two checks of the apply policy while a run waits for it.
const POLICY_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Runs host patches until the journal fails. An attempt that a restart
/// interrupted resumes at once, before the first scheduled run.
pub async fn run(runtime: Arc<Runtime>, engine: Engine, config: HostConfig) -> Result<(), HostDriverError> {
    runtime.host_patch_enabled.store(true, Ordering::SeqCst);
    let policy = config.apply.policy().expect("configuration validation checks host.apply");
    let locks = LockSources { files: config.apply.lock_files.clone(), label: config.apply.lock_label.clone() };
    let mut gate = ApplyGate::new(MachineKind::HostPatch, policy, locks, runtime.journal.clone(), runtime.seams.clone(), engine);
    let interval = config.interval;
    let mut driver = HostDriver::new(runtime.journal.clone(), runtime.seams.clone(), config).with_runtime(runtime.clone());

    if !driver.is_resting() {
        run_once(&runtime, &mut driver, "resume the interrupted host patch").await?;
    }
    loop {
        let delay = jittered(interval, INTERVAL_JITTER_PERCENT);
        tracing::debug!(machine = "host-patch", delay = %humantime::format_duration(delay), "next host patch run");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = runtime.host_wake.notified() => tracing::info!(machine = "host-patch", "host patch requested"),
        }

        wait_for_policy(&runtime, &mut gate).await?;
        run_once(&runtime, &mut driver, "patch the host").await?;
    }
}

/// Waits until the apply policy lets a run start. The gate records why the
/// run waits, so the status shows it.
async fn wait_for_policy(runtime: &Runtime, gate: &mut ApplyGate) -> Result<(), HostDriverError> {
    let mut reported = false;
    loop {
        if gate.check(false, None).await? {
            gate.finish()?;
            return Ok(());
        }
        if !reported {
            let outcome = "waiting for the apply policy".to_string();
            runtime.report(Progress::Finished { machine: "host-patch".into(), outcome, ok: true });
            reported = true;
        }
        tokio::time::sleep(POLICY_CHECK_INTERVAL).await;
    }
}

/// Takes the turn, runs one attempt to its end, and reports its outcome.
async fn run_once(runtime: &Runtime, driver: &mut HostDriver, purpose: &str) -> Result<(), HostDriverError> {
    let turn = runtime.coordinator.acquire(Process::HostPatch, purpose).await;
    runtime.board.set(Source::Host, Some(Condition::Applying));
    let started = Instant::now();

    let result = driver.run_cycle().await;

    runtime.board.set(Source::Host, None);
    drop(turn);
    let state = result?;
    let outcome = driver.memory().last_outcome.clone();
    let text = outcome.as_ref().map_or_else(|| format!("ended in state {}", state.name()), HostOutcome::describe);
    let (label, ok) = match (&outcome, state) {
        (_, HostState::Done) => ("patched", true),
        (Some(HostOutcome::Busy { .. }), _) => ("busy", false),
        (Some(HostOutcome::HostKeyRejected { .. }), _) => ("host_key_rejected", false),
        (Some(HostOutcome::KernelNotActivated { .. }), _) => ("kernel_not_activated", false),
        _ => ("failed", false),
    };
    runtime.metrics.record_update("host-patch", label, Some(started.elapsed()));
    runtime.report(Progress::Finished { machine: "host-patch".into(), outcome: text, ok });
    Ok(())
}
