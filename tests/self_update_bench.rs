//! Benchmark of the self-update handover, run by scripts/bench-self-update.sh
//! (ignored in normal test runs).
//!
//! Each round updates an agent container from v1 to v2 on the local engine.
//! The handover time starts at the step that finds the new image pulled
//! (`Pulling --Pulled--> Creating`). It ends at the step that finds the old
//! container removed and its name taken (`Retiring --Retired--> Idle`). The
//! new agent's confirmation cycle, from its lease to its confirmation, is a
//! configured wait and is left out. All times come from the journal's
//! monotonic clock.
//! The baseline is the wall time of `docker run -d` of the same image. The
//! time with two agents acting comes from the journal, not from timing: the
//! number of self-update steps written under an older lease than the newest.

mod support;

#[path = "support/selfupdate.rs"]
mod fleet;

use std::time::{Duration, Instant};

use fleet::{Fleet, inspect};
use support::{run, wait_until};

/// Rounds per run; `BENCH_ROUNDS` overrides it.
const DEFAULT_ROUNDS: usize = 5;

struct Round {
    handover_ms: u64,
    start_ms: u64,
    request_ms: u64,
    retire_ms: u64,
    confirmation_ms: u64,
    docker_run_ms: u64,
    overlaps: usize,
}

fn median(mut values: Vec<u64>) -> u64 {
    values.sort_unstable();
    values[values.len() / 2]
}

fn round() -> Round {
    let fleet = Fleet::new("check_interval = \"1h\"\nprobation = \"2s\"");
    fleet.push_version("v1", None);
    let old = fleet.start_agent(&[]);
    fleet.wait_for_lease_of(&old, Duration::from_secs(60));
    fleet.push_version("v2", None);

    run("docker", &["exec", &old, "/autoupdate", "update-now", "--self", "--config", "/etc/eventpi/autoupdate.toml"]);
    wait_until("the old agent to be removed", Duration::from_secs(120), None, || {
        inspect(&old).is_none() && fleet.machine().is_some_and(|(state, _)| state == "Idle")
    });

    let audit = fleet.audit();
    let step = |to: &str| audit.first_step_to(to).unwrap_or_else(|| panic!("no step to {to}: {:?}", audit.steps)).monotonic_ms;
    let pulled = step("Creating");
    let handing_over = step("HandingOver");
    let done = audit.steps.iter().rev().find(|step| step.from == "Retiring" && step.to == "Idle").expect("a finished handover").monotonic_ms;
    let lease = audit.leases.last().expect("the new agent's lease").monotonic_ms;
    let confirmed = audit.confirmed.last().expect("the confirmation").monotonic_ms;

    let fleet_label = fleet.label();
    let started = Instant::now();
    let id = run("docker", &["run", "--detach", "--label", "eventpi.test=1", "--label", &fleet_label, "--entrypoint", "sleep", &fleet.followed, "60"]);
    let docker_run_ms = started.elapsed().as_millis() as u64;
    run("docker", &["rm", "--force", id.trim()]);

    Round {
        handover_ms: (done - pulled) - (confirmed - lease),
        start_ms: handing_over - pulled,
        request_ms: lease - handing_over,
        retire_ms: done - confirmed,
        confirmation_ms: confirmed - lease,
        docker_run_ms,
        overlaps: audit.overlaps().len(),
    }
}

#[test]
#[ignore = "a benchmark: run scripts/bench-self-update.sh"]
fn handover_benchmark() {
    let rounds: usize = std::env::var("BENCH_ROUNDS").ok().and_then(|text| text.parse().ok()).unwrap_or(DEFAULT_ROUNDS);
    let results: Vec<Round> = (0..rounds).map(|_| round()).collect();

    println!("round  handover_ms  create+start+ready_ms  request_ms  retire_ms  confirmation_ms(excluded)  docker_run_d_ms  ratio  steps_under_older_lease");
    for (index, result) in results.iter().enumerate() {
        println!(
            "{:>5}  {:>11}  {:>21}  {:>10}  {:>9}  {:>25}  {:>15}  {:>5.1}  {:>23}",
            index + 1,
            result.handover_ms,
            result.start_ms,
            result.request_ms,
            result.retire_ms,
            result.confirmation_ms,
            result.docker_run_ms,
            result.handover_ms as f64 / result.docker_run_ms.max(1) as f64,
            result.overlaps
        );
    }
    let handover = median(results.iter().map(|result| result.handover_ms).collect());
    let docker_run = median(results.iter().map(|result| result.docker_run_ms).collect());
    let overlaps: usize = results.iter().map(|result| result.overlaps).sum();
    println!("median handover {handover} ms, median docker run -d {docker_run} ms, ratio {:.1}", handover as f64 / docker_run.max(1) as f64);
    println!("self-update steps written while another agent held a newer lease: {overlaps} (time with two agents acting: 0 ms when this is 0)");
    assert_eq!(overlaps, 0);
}
