//! Soak run: many stack updates in a row against one agent, with random
//! faults, to find failures and leaks that single tests do not show.
//!
//! Each round pushes a new commit and injects at most one fault. The fault
//! is the registry stopped during the update, a broken image that must be
//! rolled back, or the agent and the processes it started killed with
//! SIGKILL part way, after which the agent starts again. A round with a kill may end rolled back instead of
//! completed, and the run counts those rounds. After every round the
//! Compose project must have exactly one running container, the known-good
//! images exactly one keep-tag, and the state directory no temporary files.
//!
//! Not part of `make test`: run it with `make soak`, which sets
//! `SOAK_UPDATES` (default 200) and `SOAK_SEED`.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::{Agent, Behaviour, World, project_containers, push_image};

/// Time one round may take before it counts as failed.
const ROUND_TIMEOUT: Duration = Duration::from_secs(150);

/// Time a finished round has to remove what it no longer needs.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the registry stays stopped in a registry fault.
const REGISTRY_DOWN: Duration = Duration::from_secs(6);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    RegistryStopped,
    BrokenImage,
    AgentKilled,
}

/// A small xorshift generator, so a seed replays the same faults.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

fn pick_fault(random: &mut Random) -> Fault {
    match random.below(10) {
        0 | 1 => Fault::RegistryStopped,
        2 | 3 => Fault::BrokenImage,
        4 | 5 => Fault::AgentKilled,
        _ => Fault::None,
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(text) => text.parse().unwrap_or_else(|_| panic!("{name} must be a whole number, not {text:?}")),
        Err(_) => default,
    }
}

/// Compose file of round `round`: the environment changes every round, so
/// every update recreates the container.
fn compose(image: &str, round: u64) -> String {
    format!(
        "services:\n  web:\n    image: {image}\n    environment:\n      SOAK_ROUND: \"{round}\"\n    stop_grace_period: 1s\n    labels:\n      eventpi.test: \"1\"\n"
    )
}

/// Polls `condition` every half second until it is true or `timeout` passes.
fn poll(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    condition()
}

/// Returns the resident set size of process `pid` in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn keep_tags(project: &str) -> Vec<String> {
    let output = Command::new("docker")
        .args(["images", "--format", "{{.Repository}}:{{.Tag}}", "--filter", &format!("reference=autoupdate-keep/{project}:*")])
        .output()
        .expect("docker images runs");
    String::from_utf8_lossy(&output.stdout).lines().map(str::to_string).collect()
}

/// Lists what a round left behind that a finished update must not leave.
fn leaks(agent: &Agent, project: &str) -> Vec<String> {
    let mut found = Vec::new();
    let containers = project_containers(project);
    let running = containers.iter().filter(|container| container.state == "running").count();
    if containers.len() != 1 || running != 1 {
        found.push(format!("{} containers, {running} running: {containers:?}", containers.len()));
    }
    let tags = keep_tags(project);
    if tags.len() != 1 {
        found.push(format!("{} keep-tags: {tags:?}", tags.len()));
    }
    let state = agent.journal.parent().expect("the journal has a parent directory").join("state");
    if state.join("staging").exists() {
        found.push("the staging directory was left behind".into());
    }
    let temporary: Vec<String> =
        std::fs::read_dir(&state).map(|entries| entries.flatten().map(|entry| entry.file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default();
    for name in temporary.iter().filter(|name| name.ends_with(".tmp") || name.ends_with(".new")) {
        found.push(format!("temporary file {name} in {}", state.display()));
    }
    found
}

/// Tells whether the status shows the rollback from `commit` as the last
/// outcome. The status is read instead of counting transitions, because a
/// compaction drops old transitions from the journal.
fn rolled_back_from(agent: &Agent, commit: &str) -> bool {
    agent.status().contains(&format!("rolled back from {} to", &commit[..12]))
}

/// Kills the agent and every process it started with SIGKILL, as a crash
/// of the agent's container or a power cut does. Killing the agent alone
/// would leave a `docker compose` it started running beside the restarted
/// agent, which cannot happen in a container.
fn kill_agent_and_children(agent: &mut Agent) {
    let Some(pid) = agent.pid() else { return };
    let mut pending = vec![pid.to_string()];
    let mut tree = Vec::new();
    while let Some(parent) = pending.pop() {
        let output = Command::new("pgrep").args(["-P", &parent]).output().expect("pgrep runs");
        for child in String::from_utf8_lossy(&output.stdout).split_whitespace() {
            pending.push(child.to_string());
            tree.push(child.to_string());
        }
    }
    // SAFETY: kill(2) on the agent's pid. SIGSTOP keeps the agent from
    // starting new processes while its children are killed.
    unsafe {
        libc::kill(pid as i32, libc::SIGSTOP);
    }
    for child in &tree {
        let _ = Command::new("kill").args(["-KILL", child]).status();
    }
    agent.kill();
}

/// Writes the agent's whole log into the temporary directory and returns its path.
fn save_log(agent: &Agent, round: u64) -> String {
    let path = std::env::temp_dir().join(format!("eventpi-soak-round-{round}.log"));
    std::fs::write(&path, agent.log()).expect("the agent log can be saved");
    path.display().to_string()
}

fn agents_running(agent: &Agent) -> usize {
    let config = agent.config.to_str().expect("the configuration path is UTF-8");
    let output = Command::new("pgrep").args(["-f", &format!("autoupdate run --config {config}")]).output().expect("pgrep runs");
    String::from_utf8_lossy(&output.stdout).lines().count()
}

#[test]
#[ignore = "soak run of many updates; run with make soak"]
fn soak_stack_updates() {
    let updates = env_number("SOAK_UPDATES", 200);
    let seed = env_number("SOAK_SEED", 1_592_532_006).max(1);
    let mut random = Random(seed);

    let mut world = World::new("soak-0001");
    let good = [push_image(&world.registry, "web", "v1", Behaviour::Serve), push_image(&world.registry, "web", "v2", Behaviour::Serve)];
    let broken = push_image(&world.registry, "web", "broken", Behaviour::ExitAfter { seconds: 1 });
    let first = world.repo.commit("round 0", &[("compose.yaml", &compose(&good[0], 0))]);
    let mut agent = world.agent("");
    agent.start();
    assert!(poll(ROUND_TIMEOUT, || agent.known_good_is(&first)), "the first commit was not applied:\n{}", agent.log_tail());
    let rss_start = agent.pid().and_then(rss_kib).expect("the agent's RSS is readable");
    let mut rss_max = rss_start;
    let mut restarts = 0u32;
    let mut last_restart_round = 0u64;

    let started = Instant::now();
    let mut failures = Vec::new();
    let mut leaked = Vec::new();
    let mut killed_and_rolled_back = Vec::new();
    let mut counts = [0u32; 4];
    for round in 1..=updates {
        let fault = pick_fault(&mut random);
        counts[fault as usize] += 1;
        let image = if fault == Fault::BrokenImage { &broken } else { &good[(round % 2) as usize] };

        if fault == Fault::RegistryStopped {
            world.registry.stop();
        }
        let commit = world.repo.commit(&format!("round {round}"), &[("compose.yaml", &compose(image, round))]);
        match fault {
            Fault::RegistryStopped => {
                std::thread::sleep(REGISTRY_DOWN);
                world.registry.resume();
            }
            Fault::AgentKilled => {
                std::thread::sleep(Duration::from_millis(random.below(5000)));
                kill_agent_and_children(&mut agent);
                agent.start();
                restarts += 1;
                last_restart_round = round;
            }
            Fault::None | Fault::BrokenImage => {}
        }

        // A kill may end an update either way: completed, or rolled back to
        // the known-good commit.
        let reached = match fault {
            Fault::BrokenImage => poll(ROUND_TIMEOUT, || rolled_back_from(&agent, &commit)),
            Fault::AgentKilled => poll(ROUND_TIMEOUT, || agent.known_good_is(&commit) || rolled_back_from(&agent, &commit)),
            Fault::None | Fault::RegistryStopped => poll(ROUND_TIMEOUT, || agent.known_good_is(&commit)),
        };
        if reached && fault == Fault::AgentKilled && !agent.known_good_is(&commit) {
            killed_and_rolled_back.push(round);
        }
        if !reached {
            let log = save_log(&agent, round);
            failures.push(format!(
                "round {round} ({fault:?}, commit {}): no end state in {ROUND_TIMEOUT:?}; agent log in {log}\n{}",
                &commit[..12],
                agent.log_tail()
            ));
            continue;
        }
        // The old keep-tag goes after the new known-good commit is
        // recorded, so a round gets a few seconds to settle.
        let mut found = Vec::new();
        poll(SETTLE_TIMEOUT, || {
            found = leaks(&agent, &world.project);
            found.is_empty()
        });
        if !found.is_empty() {
            leaked.push(format!("round {round} ({fault:?}): {}", found.join("; ")));
        }
        let agents = agents_running(&agent);
        if agents != 1 {
            failures.push(format!("round {round} ({fault:?}): {agents} agent processes run"));
        }
        if let Some(rss) = agent.pid().and_then(rss_kib) {
            rss_max = rss_max.max(rss);
        }
    }
    let rss_end = agent.pid().and_then(rss_kib).expect("the agent's RSS is readable");
    let status = agent.status();
    agent.stop();
    drop(agent);
    for image in good.iter().chain([&broken]) {
        let _ = Command::new("docker").args(["rmi", "--force", image]).output();
    }

    println!("soak: {updates} updates in {:.0} s, seed {seed}", started.elapsed().as_secs_f64());
    println!(
        "faults: none {}, registry stopped {}, broken image {}, agent killed {}",
        counts[Fault::None as usize],
        counts[Fault::RegistryStopped as usize],
        counts[Fault::BrokenImage as usize],
        counts[Fault::AgentKilled as usize]
    );
    println!("failures: {}, rounds with leaks: {}", failures.len(), leaked.len());
    println!("good commits rolled back after a kill: {} (rounds {killed_and_rolled_back:?})", killed_and_rolled_back.len());
    println!("agent RSS: {rss_start} KiB after the first update, {rss_end} KiB at the end, {rss_max} KiB at most");
    println!(
        "agent restarts by SIGKILL: {restarts}, the last in round {last_restart_round}, so the end figure is of a process that ran {} rounds",
        updates - last_restart_round
    );
    assert!(!status.contains("skipped while reading"), "the journal has damaged records:\n{status}");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(leaked.is_empty(), "{}", leaked.join("\n"));
}
