//! Apply policies against the real agent, Docker engine, registry and git
//! server: maintenance windows, update locks and an untrusted clock. The wall
//! clock comes from the agent's `[seams] clock_file`, so the tests move time
//! by rewriting a file instead of sleeping; monotonic time stays real.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::{Agent, Behaviour, ClockFile, Transition, World, compose_file, count_transitions, epoch_ms, project_containers, push_image, run, wait_until};

const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// Time a test watches the device to see that nothing is applied.
const QUIET_PERIOD: Duration = Duration::from_secs(3);

const WARSAW_NIGHT: &str = "[stack.apply]\npolicy = \"window\"\nwindows = [\"02:00-04:00 Europe/Warsaw\"]\n";

fn transition(agent: &Agent, from: &str, event: &str, to: &str) -> Option<Transition> {
    agent.replay().into_iter().find(|transition| transition.machine == "stack" && transition.from == from && transition.event == event && transition.to == to)
}

fn status_contains(agent: &Agent, text: &str) -> bool {
    agent.status().contains(text)
}

#[test]
fn window_applies_afternoon_commit_at_night() {
    let world = World::new("policy-0001");
    let clock = ClockFile::new("2025-06-10T12:00:00Z", true);
    let image = push_image(&world.registry, "web", "v1", Behaviour::Serve);
    let commit = world.repo.commit("web v1", &[("compose.yaml", &compose_file(&[("web", &image)]))]);
    let mut agent = world.agent_with_sections("", &format!("{WARSAW_NIGHT}\n{}", clock.section()));
    agent.start();

    wait_until("the commit to be pulled at 14:00 local time", STEP_TIMEOUT, Some(&agent), || count_transitions(&agent, "Pulling", "Pulled", "Ready") == 1);
    let expected = "pulled update waits: waiting for the maintenance window 02:00-04:00 Europe/Warsaw; next opening 2025-06-11T00:00:00Z";
    wait_until("the status to name the window", STEP_TIMEOUT, Some(&agent), || status_contains(&agent, expected));
    let pulled = transition(&agent, "Pulling", "Pulled", "Ready").unwrap();
    assert_eq!(pulled.wall_ms, epoch_ms("2025-06-10T12:00:00Z"), "pulled at once, at 14:00 CEST");

    clock.set("2025-06-10T23:59:00Z", true);
    std::thread::sleep(QUIET_PERIOD);
    assert!(project_containers(&world.project).is_empty(), "nothing starts at 01:59 local time");
    assert!(!agent.known_good_is(&commit));

    clock.set("2025-06-11T00:00:00Z", true);
    wait_until("the commit to be applied once the window opens", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&commit));
    let applied = transition(&agent, "Ready", "PolicyAllows", "Applying").unwrap();
    assert_eq!(applied.wall_ms, epoch_ms("2025-06-11T00:00:00Z"), "applied at 02:00 CEST");
    assert!(!agent.status().contains("pulled update waits"), "the hold is cleared:\n{}", agent.status());
}

#[test]
fn lock_defers_update_to_next_window() {
    let world = World::new("policy-0002");
    let clock = ClockFile::new("2025-06-11T00:30:00Z", true);
    let locks = tempfile::tempdir().unwrap();
    let lock = locks.path().join("recording.lock");
    std::fs::write(&lock, "").unwrap();
    let image = push_image(&world.registry, "web", "v1", Behaviour::Serve);
    let commit = world.repo.commit("web v1", &[("compose.yaml", &compose_file(&[("web", &image)]))]);
    let apply = format!("{WARSAW_NIGHT}lock_files = [\"{}\"]\nmax_deferral = \"1h\"\n", lock.display());
    let mut agent = world.agent_with_sections("", &format!("{apply}\n{}", clock.section()));
    agent.start();

    let held = format!("pulled update waits: update lock held by file {}", lock.display());
    wait_until("the lock to hold the update inside the window", STEP_TIMEOUT, Some(&agent), || status_contains(&agent, &held));
    std::thread::sleep(QUIET_PERIOD);
    assert!(project_containers(&world.project).is_empty(), "nothing starts while the lock is held");
    wait_until("the deferral to be recorded", STEP_TIMEOUT, Some(&agent), || status_contains(&agent, "update locks have deferred the pending update for"));

    clock.set("2025-06-11T03:00:00Z", true);
    std::fs::remove_file(&lock).unwrap();
    wait_until("the window to be the hold after the lock is gone", STEP_TIMEOUT, Some(&agent), || {
        status_contains(&agent, "waiting for the maintenance window 02:00-04:00 Europe/Warsaw; next opening 2025-06-12T00:00:00Z")
    });
    std::thread::sleep(QUIET_PERIOD);
    assert!(project_containers(&world.project).is_empty(), "a released lock outside the window applies nothing");

    clock.set("2025-06-12T00:30:00Z", true);
    wait_until("the commit to be applied in the next window", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&commit));
    let applied = transition(&agent, "Ready", "PolicyAllows", "Applying").unwrap();
    assert_eq!(applied.wall_ms, epoch_ms("2025-06-12T00:30:00Z"));
    assert!(!agent.status().contains("deferred"), "the deferral restarts at zero after an apply:\n{}", agent.status());
}

/// A running container that holds the update lock through its label, removed
/// when dropped.
struct LockContainer {
    name: String,
}

impl LockContainer {
    fn start(name: &str, label: &str) -> LockContainer {
        support::ensure_base_image();
        let _ = Command::new("docker").args(["rm", "--force", name]).output();
        run("docker", &["run", "--detach", "--name", name, "--label", support::TEST_LABEL, "--label", label, support::BASE_IMAGE, "sleep", "600"]);
        LockContainer { name: name.to_string() }
    }
}

impl Drop for LockContainer {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "--force", &self.name]).output();
    }
}

/// Reads the deferral that `autoupdate status` reports, in whole seconds.
fn deferred_seconds(agent: &Agent) -> u64 {
    let status = agent.status();
    let Some(line) = status.lines().find(|line| line.contains("update locks have deferred the pending update for")) else { return 0 };
    let text = line.rsplit(" for ").next().unwrap_or_default().trim();
    humantime_seconds(text)
}

/// Parses the `1m 5s` form that the status prints.
fn humantime_seconds(text: &str) -> u64 {
    text.split_whitespace()
        .map(|part| {
            let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
            let value: u64 = digits.parse().unwrap_or(0);
            match &part[digits.len()..] {
                "h" => value * 3600,
                "m" => value * 60,
                _ => value,
            }
        })
        .sum()
}

#[test]
fn lock_past_maximum_deferral_is_overridden() {
    let world = World::new("policy-0003");
    let clock = ClockFile::new("2025-06-10T12:00:00Z", true);
    let label = format!("eventpi.test.update-lock-{}", world.registry.port);
    let holder = format!("eventpi-test-lock-{}", world.registry.port);
    let _lock = LockContainer::start(&holder, &label);
    let image = push_image(&world.registry, "web", "v1", Behaviour::Serve);
    let commit = world.repo.commit("web v1", &[("compose.yaml", &compose_file(&[("web", &image)]))]);
    let apply = format!("[stack.apply]\nlock_label = \"{label}\"\nmax_deferral = \"16s\"\n");
    let mut agent = world.agent_with_sections("", &format!("{apply}\n{}", clock.section()));
    agent.start();

    let held = format!("pulled update waits: update lock held by container {holder} (label {label})");
    wait_until("the label lock to hold the update", STEP_TIMEOUT, Some(&agent), || status_contains(&agent, &held));
    clock.set("2026-06-10T12:00:00Z", true);
    std::thread::sleep(Duration::from_secs(2));
    assert!(project_containers(&world.project).is_empty(), "a wall clock a year ahead adds no deferral");
    wait_until("10 seconds of deferral in the journal", STEP_TIMEOUT, Some(&agent), || deferred_seconds(&agent) >= 10);

    agent.kill();
    let before_restart = deferred_seconds(&agent);
    std::thread::sleep(Duration::from_secs(2));
    assert!(project_containers(&world.project).is_empty());
    let restarted = Instant::now();
    agent.start();
    wait_until("the update to be applied despite the lock", STEP_TIMEOUT, Some(&agent), || transition(&agent, "Ready", "PolicyAllows", "Applying").is_some());
    let waited = restarted.elapsed();

    assert!(
        waited < Duration::from_secs(13),
        "the deferral of {before_restart}s before the restart counts towards the 16s maximum; the restart waited {waited:?}"
    );
    wait_until("the commit to become known-good", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&commit));
    let log = agent.log();
    assert!(log.contains("applying despite the lock"), "the override is logged");
    assert!(log.contains(&holder), "the log names the lock holder");
}

#[test]
fn unsynchronised_clock_keeps_window_closed() {
    let world = World::new("policy-0004");
    let clock = ClockFile::new("2025-06-11T00:30:00Z", false);
    let image = push_image(&world.registry, "web", "v1", Behaviour::Serve);
    let commit = world.repo.commit("web v1", &[("compose.yaml", &compose_file(&[("web", &image)]))]);
    let mut agent = world.agent_with_sections("", &format!("{WARSAW_NIGHT}\n{}", clock.section()));
    agent.start();

    wait_until("the clock to be the hold", STEP_TIMEOUT, Some(&agent), || status_contains(&agent, "pulled update waits: waiting for the clock"));
    std::thread::sleep(QUIET_PERIOD);
    assert!(project_containers(&world.project).is_empty(), "02:30 local time by an unsynchronised clock opens no window");
    assert!(agent.status().contains("clock not synchronised"), "{}", agent.status());

    clock.set("2025-06-11T00:30:00Z", true);
    wait_until("the commit to be applied once the clock is synchronised", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&commit));
}

#[test]
fn wall_clock_jump_keeps_probation_length() {
    let world = World::new("policy-0005");
    let clock = ClockFile::new("2025-06-10T12:00:00Z", true);
    let image = push_image(&world.registry, "web", "v1", Behaviour::Serve);
    let commit = world.repo.commit("web v1", &[("compose.yaml", &compose_file(&[("web", &image)]))]);
    let mut agent = world.agent_with_sections("probation = \"8s\"", &clock.section());
    agent.start();

    wait_until("probation to start", STEP_TIMEOUT, Some(&agent), || transition(&agent, "Applying", "Applied", "Probation").is_some());
    clock.set("2026-06-10T12:00:00Z", true);
    std::thread::sleep(Duration::from_secs(2));
    clock.set("2025-06-10T12:00:05Z", true);
    wait_until("probation to pass", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&commit));

    let entered = transition(&agent, "Applying", "Applied", "Probation").unwrap();
    let passed = transition(&agent, "Probation", "GatePassed", "Idle").unwrap();
    let probation_ms = passed.monotonic_ms - entered.monotonic_ms;
    assert!(probation_ms >= 8_000, "probation lasted {probation_ms} ms by the monotonic clock");
    assert!(probation_ms < 14_000, "probation lasted {probation_ms} ms by the monotonic clock");
    assert_eq!(entered.wall_ms, epoch_ms("2025-06-10T12:00:00Z"));
    assert_eq!(passed.wall_ms, epoch_ms("2025-06-10T12:00:05Z"), "the wall clock went back before the gate passed");
}

#[test]
fn missing_image_is_pulled_before_window_apply() {
    let mut world = World::new("policy-0006");
    let clock = ClockFile::new("2025-06-10T12:00:00Z", true);
    let image = push_image(&world.registry, "web", "v1", Behaviour::Serve);
    let digest = world.registry.manifest_digest("web", "v1");
    let commit = world.repo.commit("web v1", &[("compose.yaml", &compose_file(&[("web", &image)]))]);
    let mut agent = world.agent_with_sections("", &format!("{WARSAW_NIGHT}\n{}", clock.section()));
    agent.start();
    wait_until("the commit to be pulled", STEP_TIMEOUT, Some(&agent), || count_transitions(&agent, "Pulling", "Pulled", "Ready") == 1);

    let pinned = format!("{}/web@{digest}", world.registry.address());
    world.registry.stop();
    run("docker", &["rmi", "--force", &image, &pinned]);
    wait_until("the missing image to be the hold", STEP_TIMEOUT, Some(&agent), || {
        status_contains(&agent, &format!("pulled update waits: image {pinned} is missing and cannot be pulled"))
    });
    clock.set("2025-06-11T00:30:00Z", true);
    std::thread::sleep(QUIET_PERIOD);
    assert!(project_containers(&world.project).is_empty(), "an open window applies nothing while an image is missing");
    assert_eq!(count_transitions(&agent, "Ready", "PolicyAllows", "Applying"), 0);

    world.registry.resume();
    wait_until("the commit to be applied once the image is back", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&commit));
    assert!(!agent.status().contains("factory reset"), "{}", agent.status());
}
