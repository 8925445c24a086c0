//! Power cuts at every state of the stack machine: the agent is killed with
//! SIGKILL through a failpoint right after a transition is persisted or right
//! before a command runs, then started again. Every case must end in its
//! stated outcome with a valid journal, one agent process, one keep-tag for
//! the known-good image and no leftovers.
//!
//! The states come from the machine's transition table, so a state added
//! without a case here fails the test.

mod support;

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use eventpi_autoupdate::machine::stack::STACK_TABLE;
use support::{Agent, Behaviour, World, compose_file, count_transitions, project_containers, push_image, run, wait_until};

const STEP_TIMEOUT: Duration = Duration::from_secs(150);

/// How long the keep-tags may take to match the known-good release after
/// the journal shows the end state.
const KEEP_TAG_SETTLE: Duration = Duration::from_secs(30);

/// Cases running at once; each has its own registry, git server and project.
const PARALLEL_CASES: usize = 3;

/// How an update is made to go through a state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    /// A good commit that passes its gate.
    GoodUpdate,
    /// A commit whose service exits, so the agent reverts.
    FailingUpdate,
    /// A failing commit whose known-good commit fails too, so the agent runs
    /// the factory reset.
    DoubleFailure,
}

/// The outcome a case must reach after the restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Completed,
    Reverted,
    Reset,
}

fn case_for(state: &str) -> (Scenario, Outcome) {
    match state {
        "Idle" | "Fetching" | "Validating" | "Pulling" | "Ready" | "Applying" | "Probation" => (Scenario::GoodUpdate, Outcome::Completed),
        "Reverting" | "RevertProbation" => (Scenario::FailingUpdate, Outcome::Reverted),
        "FactoryReset" => (Scenario::DoubleFailure, Outcome::Reset),
        other => panic!("no power-cut case for stack state {other}; add one here"),
    }
}

struct Case {
    state: &'static str,
    point: &'static str,
    scenario: Scenario,
    expected: Outcome,
}

/// Runs one case and returns the outcome it reached, or a description of
/// what went wrong.
fn run_case(case: &Case, index: usize) -> Result<Outcome, String> {
    let world = World::new(&format!("power-{index:02}"));
    let flags = tempfile::tempdir().unwrap();
    std::fs::write(flags.path().join("ok"), "").unwrap();
    let reset_log = flags.path().join("reset.log");
    let script = flags.path().join("reset.sh");
    std::fs::write(&script, format!("#!/bin/sh\necho reset >> {}\n", reset_log.display())).unwrap();
    support::make_executable(&script);

    let good = push_image(&world.registry, "web", "v1", Behaviour::Serve);
    let next = match case.scenario {
        Scenario::GoodUpdate => push_image(&world.registry, "web", "v2", Behaviour::Serve),
        Scenario::FailingUpdate | Scenario::DoubleFailure => push_image(&world.registry, "web", "v2", Behaviour::ExitAfter { seconds: 1 }),
    };
    // The first commit runs while the flag file exists, so a double failure
    // can make the known-good commit fail by removing the flag.
    let flagged = format!(
        "services:\n  web:\n    image: {good}\n    command: [\"sh\", \"-c\", \"trap 'exit 0' TERM; while test -e /flags/ok; do sleep 0.2; done; exit 1\"]\n    volumes: [\"{}:/flags\"]\n    stop_grace_period: 1s\n    labels:\n      eventpi.test: \"1\"\n",
        flags.path().display()
    );
    let first = world.repo.commit("first", &[("compose.yaml", &flagged)]);
    let mut agent = world.agent(&format!("factory_reset_command = [\"{}\"]", script.display()));
    agent.start();
    wait_until("the first commit to become known-good", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&first));
    if !agent.stop().success() {
        return Err("the agent did not stop cleanly before the case".into());
    }

    let failpoint = format!("stack:{}:{}", case.state, case.point);
    agent.set_env("AUTOUPDATE_FAILPOINT", Some(&failpoint));
    agent.start();
    if case.scenario == Scenario::DoubleFailure {
        std::fs::remove_file(flags.path().join("ok")).unwrap();
    }
    let second = world.repo.commit("second", &[("compose.yaml", &compose_file(&[("web", &next)]))]);
    let status = agent.wait_exit(STEP_TIMEOUT);
    if status.signal() != Some(libc::SIGKILL) {
        return Err(format!("failpoint {failpoint} was not reached; the agent exited with {status}\n{}", agent.log_tail()));
    }

    agent.set_env("AUTOUPDATE_FAILPOINT", None);
    agent.start();
    let reached = |agent: &Agent| -> Option<Outcome> {
        let status = agent.status();
        if agent.known_good_is(&second) {
            Some(Outcome::Completed)
        } else if status.contains("last outcome: rolled back") && agent.known_good_is(&first) {
            Some(Outcome::Reverted)
        } else if status.contains("last outcome: factory reset") {
            Some(Outcome::Reset)
        } else {
            None
        }
    };
    wait_until(&format!("{failpoint}: an end state"), STEP_TIMEOUT, Some(&agent), || reached(&agent).is_some());
    let outcome = reached(&agent).expect("wait_until returned, so an outcome was reached");

    check_leftovers(&agent, &world, outcome)?;
    if outcome == Outcome::Reset && count_transitions(&agent, "FactoryReset", "ResetDone", "Idle") != 1 {
        return Err("the journal does not show exactly one completed reset".into());
    }
    Ok(outcome)
}

/// Checks the journal, the containers and the state directory after a case.
fn check_leftovers(agent: &Agent, world: &World, outcome: Outcome) -> Result<(), String> {
    let status = agent.status();
    if status.contains("skipped while reading") {
        return Err(format!("the journal has damaged records:\n{status}"));
    }
    if agent.replay().is_empty() {
        return Err("the journal replays no transitions".into());
    }
    let containers = project_containers(&world.project);
    let expected_containers = if outcome == Outcome::Reset { 0..=1 } else { 1..=1 };
    if !expected_containers.contains(&containers.len()) {
        return Err(format!("unexpected containers: {containers:?}"));
    }
    if outcome != Outcome::Reset {
        // The journal can show the end state before the resumed step removes
        // the previous release's keep-tag, so the count may take a moment.
        let list_keep_tags =
            || run("docker", &["images", "--format", "{{.Repository}}:{{.Tag}}", "--filter", &format!("reference=autoupdate-keep/{}:*", world.project)]);
        let deadline = std::time::Instant::now() + KEEP_TAG_SETTLE;
        let mut keep_tags = list_keep_tags();
        while keep_tags.lines().count() != 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            keep_tags = list_keep_tags();
        }
        if keep_tags.lines().count() != 1 {
            return Err(format!("expected one keep-tag for the known-good image after {KEEP_TAG_SETTLE:?}, found {keep_tags:?}\n{}", agent.log_tail()));
        }
    }
    let config = agent.config.to_str().unwrap().to_string();
    let agents = run("pgrep", &["-c", "-f", &format!("autoupdate run --config {config}")]);
    if agents.trim() != "1" {
        return Err(format!("{} agent processes run instead of one", agents.trim()));
    }
    let state = agent.journal.parent().unwrap().join("state");
    let staging: PathBuf = state.join("staging");
    if staging.exists() {
        return Err(format!("the staging directory {} was left behind", staging.display()));
    }
    for entry in std::fs::read_dir(&state).map(|entries| entries.flatten().collect::<Vec<_>>()).unwrap_or_default() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".tmp") || name.ends_with(".new") {
            return Err(format!("temporary file {name} was left in {}", state.display()));
        }
    }
    Ok(())
}

#[test]
fn kill_at_every_state_recovers() {
    let mut cases = Vec::new();
    for state in STACK_TABLE.states {
        let (scenario, expected) = case_for(state.name);
        for point in ["after-persist", "before-command"] {
            cases.push(Case { state: state.name, point, scenario, expected });
        }
    }

    let results: Mutex<Vec<(usize, Result<Outcome, String>)>> = Mutex::new(Vec::new());
    let next_case = Mutex::new(0usize);
    std::thread::scope(|scope| {
        for _ in 0..PARALLEL_CASES {
            scope.spawn(|| {
                loop {
                    let index = {
                        let mut next = next_case.lock().unwrap();
                        let index = *next;
                        *next += 1;
                        index
                    };
                    let Some(case) = cases.get(index) else { break };
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_case(case, index)))
                        .unwrap_or_else(|panic| Err(panic.downcast_ref::<String>().cloned().unwrap_or_else(|| "the case panicked".into())));
                    results.lock().unwrap().push((index, result));
                }
            });
        }
    });

    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|(index, _)| *index);
    let mut table = String::from("machine  state            point           expected   outcome\n");
    let mut failures = Vec::new();
    for (index, result) in &results {
        let case = &cases[*index];
        let outcome = match result {
            Ok(outcome) => format!("{outcome:?}"),
            Err(_) => "FAILED".to_string(),
        };
        table.push_str(&format!("stack    {:<16} {:<15} {:<10} {outcome}\n", case.state, case.point, format!("{:?}", case.expected)));
        match result {
            Ok(outcome) if *outcome == case.expected => {}
            Ok(outcome) => failures.push(format!("{} {}: expected {:?}, reached {outcome:?}", case.state, case.point, case.expected)),
            Err(error) => failures.push(format!("{} {}: {error}", case.state, case.point)),
        }
    }
    println!("{table}");
    assert_eq!(results.len(), cases.len(), "every case ran");
    assert!(failures.is_empty(), "{table}\n{}", failures.join("\n\n"));
}
