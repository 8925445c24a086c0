//! The panel and the factory reset against a real agent, Docker engine,
//! registry and git server: the LED pattern a technician watches, button presses sent
//! with `autoupdate button`, and factory resets that survive a power cut and
//! need no network.

mod support;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use eventpi_autoupdate::panel::Condition;
use eventpi_autoupdate::panel::pattern::{PATTERNS, spec, to_svg};
use support::{Agent, Behaviour, Transition, World, cli, compose_file, project_containers, push_image, wait_until};

const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// Removes the factory tags a test's captures and resets created.
struct FactoryTags(String);

impl Drop for FactoryTags {
    fn drop(&mut self) {
        let filter = format!("reference=autoupdate-factory/{}:*", self.0);
        let output = Command::new("docker").args(["images", "--format", "{{.Repository}}:{{.Tag}}", "--filter", &filter]).output();
        let listed = output.map(|output| output.stdout).unwrap_or_default();
        for reference in String::from_utf8_lossy(&listed).lines() {
            let _ = Command::new("docker").args(["rmi", reference]).output();
        }
    }
}

/// Returns the conditions the agent's LED showed, in order, from the lines
/// the simulated LED logs.
fn led_timeline(agent: &Agent) -> Vec<(String, String)> {
    let mut shown: Vec<(String, String)> = Vec::new();
    for line in agent.log().lines().filter(|line| line.contains(" LED ")) {
        let (Some(led), Some(pattern)) = (quoted_field(line, "led"), quoted_field(line, "pattern")) else { continue };
        if shown.last().map(|(last, _)| last.as_str()) != Some(led.as_str()) {
            shown.push((led, pattern));
        }
    }
    shown
}

fn quoted_field(line: &str, name: &str) -> Option<String> {
    let start = line.find(&format!("{name}=\""))? + name.len() + 2;
    let length = line[start..].find('"')?;
    Some(line[start..start + length].to_string())
}

fn factory_transitions(agent: &Agent) -> Vec<Transition> {
    agent.replay().into_iter().filter(|transition| transition.machine == "factory-reset").collect()
}

fn count_factory(agent: &Agent, from: &str, event: &str, to: &str) -> usize {
    factory_transitions(agent).iter().filter(|transition| transition.from == from && transition.event == event && transition.to == to).count()
}

fn press(agent: &Agent, kind: &str) -> String {
    cli(&["button", kind, "--config", agent.config.to_str().unwrap()])
}

/// Starts an agent on a first commit, waits until it is known-good, and
/// captures it as the factory material.
fn agent_with_factory(world: &World, extra_stack: &str) -> (Agent, String, PathBuf) {
    let web = push_image(&world.registry, "web", "v1", Behaviour::Serve);
    let first = world.repo.commit("web v1", &[("compose.yaml", &compose_file(&[("web", &web)]))]);
    let mut agent = world.agent(extra_stack);
    agent.start();
    wait_until("the first commit to become known-good", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&first));

    let output = cli(&["factory", "capture", "--config", agent.config.to_str().unwrap()]);
    assert!(output.contains(&first), "capture names the known-good commit: {output}");
    let factory = agent.journal.parent().unwrap().join("factory");
    (agent, first, factory)
}

fn assert_factory_stack_runs(project: &str) {
    let containers = project_containers(project);
    assert_eq!(containers.len(), 1, "{containers:?}");
    assert_eq!(containers[0].service, "web");
    assert_eq!(containers[0].state, "running");
    assert_eq!(containers[0].image, format!("autoupdate-factory/{project}:web"), "the web service runs the restored factory image");
}

#[test]
fn pattern_picture_matches_table() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("hw/led-patterns.svg");
    let expected = to_svg();
    if std::env::var_os("UPDATE_PATTERNS").is_some() {
        std::fs::write(&path, &expected).unwrap();
    }

    let committed = std::fs::read_to_string(&path).unwrap_or_default();

    assert!(committed == expected, "{} is out of date; regenerate with UPDATE_PATTERNS=1 cargo test --test panel pattern_picture", path.display());
    for comment in expected.split("<!--").skip(1) {
        let text = comment.split("-->").next().unwrap_or_default();
        assert!(!text.contains("--"), "XML forbids two hyphens inside a comment, so viewers reject the picture: {text}");
    }
}

#[test]
fn hw_readme_documents_every_pattern() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("hw/README.md")).unwrap();

    for row in PATTERNS {
        let phases: Vec<String> = row.phases.iter().map(|phase| phase.ms.to_string()).collect();
        let line = format!("| {} | {} | {} |", row.condition.name(), row.looks_like, phases.join(", "));
        assert!(readme.contains(&line), "hw/README.md lacks the row {line:?}");
    }
}

#[test]
fn update_and_rollback_show_documented_patterns() {
    let world = World::new("panel-led");
    let web_v1 = push_image(&world.registry, "web", "v1", Behaviour::Serve);
    let web_v2 = push_image(&world.registry, "web", "v2", Behaviour::ExitAfter { seconds: 1 });
    let first = world.repo.commit("web v1", &[("compose.yaml", &compose_file(&[("web", &web_v1)]))]);
    let mut agent = world.agent("");
    agent.start();
    wait_until("the first commit to become known-good", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&first));

    world.repo.commit("web v2 that exits", &[("compose.yaml", &compose_file(&[("web", &web_v2)]))]);
    wait_until("the rollback", STEP_TIMEOUT, Some(&agent), || agent.status().contains("last outcome: rolled back"));
    wait_until("the LED to show the rollback", STEP_TIMEOUT, Some(&agent), || {
        led_timeline(&agent).last().is_some_and(|(led, _)| led == Condition::RolledBack.name())
    });

    let timeline = led_timeline(&agent);
    let shown: Vec<&str> = timeline.iter().map(|(led, _)| led.as_str()).collect();
    let position = |condition: Condition| shown.iter().position(|led| *led == condition.name());
    for (led, pattern) in &timeline {
        let documented = PATTERNS.iter().find(|row| row.condition.name() == led).unwrap_or_else(|| panic!("{led} is not in the pattern table"));
        assert_eq!(pattern, documented.looks_like, "{led} plays its documented pattern");
    }
    assert_eq!(shown.first(), Some(&Condition::Starting.name()), "{shown:?}");
    let downloading = position(Condition::Downloading).unwrap_or_else(|| panic!("no download shown: {shown:?}"));
    let applying = position(Condition::Applying).unwrap_or_else(|| panic!("no apply shown: {shown:?}"));
    let healthy = position(Condition::Healthy).unwrap_or_else(|| panic!("never healthy: {shown:?}"));
    let rolled_back = position(Condition::RolledBack).unwrap_or_else(|| panic!("no rollback shown: {shown:?}"));
    assert!(downloading < applying, "{shown:?}");
    assert!(applying < rolled_back, "{shown:?}");
    assert!(healthy < rolled_back, "{shown:?}");
    assert_eq!(spec(Condition::RolledBack).looks_like, "two blinks, pause");
}

#[test]
fn full_disk_outranks_healthy_and_clears() {
    let world = World::new("panel-space");
    let recordings = support::Tmpfs::mount(32);
    let web = push_image(&world.registry, "web", "v1", Behaviour::Serve);
    let first = world.repo.commit("web v1", &[("compose.yaml", &compose_file(&[("web", &web)]))]);
    let space = format!("[space]\ninterval = \"500ms\"\n\n[space.recordings]\npath = \"{}\"\n", recordings.path.display());
    let mut agent = world.agent_with_sections("", &space);
    agent.start();
    wait_until("the first commit to become known-good", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&first));
    let filler = recordings.path.join("fill.bin");

    let written = std::fs::write(&filler, vec![0u8; 48 * 1024 * 1024]);
    assert!(written.is_err(), "the tmpfs is full");
    wait_until("the LED to show no space", STEP_TIMEOUT, Some(&agent), || led_timeline(&agent).last().is_some_and(|(led, _)| led == Condition::NoSpace.name()));
    std::fs::remove_file(&filler).unwrap();
    wait_until("the LED to show healthy again", STEP_TIMEOUT, Some(&agent), || {
        led_timeline(&agent).last().is_some_and(|(led, _)| led == Condition::Healthy.name())
    });

    let timeline = led_timeline(&agent);
    let no_space = timeline.iter().find(|(led, _)| led == Condition::NoSpace.name()).expect("no space was shown");
    assert_eq!(no_space.1, spec(Condition::NoSpace).looks_like, "the documented pattern plays");
    let stack_healthy_meanwhile = agent.status().contains(&format!("known-good commit {first}"));
    assert!(stack_healthy_meanwhile, "the stack stayed healthy, so no space outranked it");
}

#[test]
fn short_press_checks_now() {
    let world = World::new("panel-short");
    let web = push_image(&world.registry, "web", "v1", Behaviour::Serve);
    let web_v2 = push_image(&world.registry, "web", "v2", Behaviour::Serve);
    let first = world.repo.commit("web v1", &[("compose.yaml", &compose_file(&[("web", &web)]))]);
    let mut agent = world.agent("poll_interval = \"1h\"\npoll_jitter_percent = 0");
    agent.start();
    wait_until("the first commit to become known-good", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&first));
    let second = world.repo.commit("web v2", &[("compose.yaml", &compose_file(&[("web", &web_v2)]))]);
    std::thread::sleep(Duration::from_secs(3));
    assert!(!agent.known_good_is(&second), "no poll runs within the hour-long interval");

    let answer = press(&agent, "short");

    assert!(answer.contains("check for an update"), "{answer}");
    wait_until("the pressed check to apply the new commit", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&second));
    assert!(agent.log().contains("button: short press"), "the press went through the button logic");
}

#[test]
fn factory_reset_works_offline() {
    let world_owned = World::new("panel-offline");
    let _tags = FactoryTags(world_owned.project.clone());
    let (agent, _first, factory) = agent_with_factory(&world_owned, "");
    assert!(factory.join("manifest.json").is_file());
    let tag = format!("autoupdate-factory/{}:web", world_owned.project);
    support::run("docker", &["rmi", &tag]);
    let mut world = world_owned;
    world.registry.stop();
    world.git.stop();

    let answer = press(&agent, "long");

    assert!(answer.contains("factory reset"), "{answer}");
    wait_until("the factory reset to finish", STEP_TIMEOUT, Some(&agent), || count_factory(&agent, "StartingFactory", "FactoryUp", "Idle") == 1);
    assert_factory_stack_runs(&world.project);
    let shown: Vec<String> = led_timeline(&agent).into_iter().map(|(led, _)| led).collect();
    assert!(shown.contains(&Condition::ResetArmed.name().to_string()), "{shown:?}");
    assert!(shown.contains(&Condition::ResetRunning.name().to_string()), "{shown:?}");
    let steps: Vec<(String, String)> = factory_transitions(&agent).into_iter().map(|transition| (transition.from, transition.to)).collect();
    let expected = [
        ("Idle", "Armed"),
        ("Armed", "StoppingStack"),
        ("StoppingStack", "Restoring"),
        ("Restoring", "RunningScript"),
        ("RunningScript", "StartingFactory"),
        ("StartingFactory", "Idle"),
    ];
    let expected: Vec<(String, String)> = expected.iter().map(|(from, to)| (from.to_string(), to.to_string())).collect();
    assert_eq!(steps, expected);
}

#[test]
fn power_cut_during_reset_resumes_once() {
    let world = World::new("panel-power");
    let _tags = FactoryTags(world.project.clone());
    let (mut agent, _first, _factory) = agent_with_factory(&world, "");
    assert!(agent.stop().success(), "the agent stops cleanly before the case");
    agent.set_env("AUTOUPDATE_FAILPOINT", Some("factory-reset:Restoring:after-persist"));
    agent.start();
    wait_until("the control socket", STEP_TIMEOUT, Some(&agent), || agent.socket().exists());
    std::thread::sleep(Duration::from_secs(1));

    press(&agent, "long");
    let status = agent.wait_exit(STEP_TIMEOUT);
    assert_eq!(status.signal(), Some(libc::SIGKILL), "the failpoint killed the agent\n{}", agent.log_tail());
    agent.set_env("AUTOUPDATE_FAILPOINT", None);
    agent.start();

    wait_until("the resumed reset to finish", STEP_TIMEOUT, Some(&agent), || count_factory(&agent, "StartingFactory", "FactoryUp", "Idle") == 1);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(count_factory(&agent, "Idle", "Requested", "Armed"), 1, "one request");
    assert_eq!(count_factory(&agent, "StartingFactory", "FactoryUp", "Idle"), 1, "one completed reset");
    assert_eq!(count_factory(&agent, "Restoring", "Resumed", "Restoring"), 1, "the restore step ran again after the restart");
    assert_factory_stack_runs(&world.project);
    assert!(agent.status().contains("factory-reset"), "{}", agent.status());
}

#[test]
fn long_press_during_update_waits_for_it() {
    let world = World::new("panel-wait");
    let _tags = FactoryTags(world.project.clone());
    let (agent, _first, _factory) = agent_with_factory(&world, "probation = \"15s\"");
    let web_v2 = push_image(&world.registry, "web", "v2", Behaviour::Serve);
    let second = world.repo.commit("web v2", &[("compose.yaml", &compose_file(&[("web", &web_v2)]))]);
    let in_probation =
        || agent.replay().iter().any(|transition| transition.machine == "stack" && transition.to == "Probation" && transition.from == "Applying");
    wait_until("the update to reach its probation", STEP_TIMEOUT, Some(&agent), in_probation);

    press(&agent, "long");

    wait_until("the reset to be armed", Duration::from_secs(30), Some(&agent), || count_factory(&agent, "Idle", "Requested", "Armed") == 1);
    assert_eq!(count_factory(&agent, "Armed", "TurnTaken", "StoppingStack"), 0, "the reset waits while the update is on probation");
    wait_until("the factory reset to finish", STEP_TIMEOUT, Some(&agent), || count_factory(&agent, "StartingFactory", "FactoryUp", "Idle") == 1);

    let journal = agent.replay();
    let update_done = journal.iter().position(|transition| transition.machine == "stack" && transition.from == "Probation" && transition.to == "Idle");
    let reset_started = journal.iter().position(|transition| transition.machine == "factory-reset" && transition.from == "Armed");
    let update_done = update_done.expect("the update finished");
    let reset_started = reset_started.expect("the reset started");
    assert!(update_done < reset_started, "the reset started only after the update settled");
    assert!(agent.known_good_is(&second), "the update finished before the reset");
    let shown: Vec<String> = led_timeline(&agent).into_iter().map(|(led, _)| led).collect();
    let armed = shown.iter().position(|led| led == Condition::ResetArmed.name()).expect("the LED showed the armed reset");
    let running = shown.iter().position(|led| led == Condition::ResetRunning.name()).expect("the LED showed the running reset");
    assert!(armed < running, "{shown:?}");
    assert_factory_stack_runs(&world.project);
}

/// Runs one factory reset with the agent killed at `point` of `state`, then
/// starts the agent again. Returns what went wrong, if anything.
fn run_reset_kill_case(state: &str, point: &str) -> Result<(), String> {
    let world = World::new(&format!("reset-kill-{}-{}", state.to_lowercase(), &point[..5]));
    let _tags = FactoryTags(world.project.clone());
    let scratch = tempfile::tempdir().unwrap();
    let script = scratch.path().join("factory-script.sh");
    std::fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (mut agent, _first, _factory) = agent_with_factory(&world, &format!("factory_reset_command = [\"{}\"]", script.display()));
    if !agent.stop().success() {
        return Err("the agent did not stop cleanly before the case".into());
    }
    let failpoint = format!("factory-reset:{state}:{point}");
    agent.set_env("AUTOUPDATE_FAILPOINT", Some(&failpoint));
    agent.start();
    // A kill at a state the agent passes while it starts ends it before
    // the control socket is up.
    let socket = agent.socket();
    let started = std::time::Instant::now();
    while agent.is_running() && !socket.exists() && started.elapsed() < STEP_TIMEOUT {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(1));
    let killed_at_start = !agent.is_running();
    if killed_at_start {
        agent.wait_exit(Duration::from_secs(5));
        agent.set_env("AUTOUPDATE_FAILPOINT", None);
        agent.start();
        wait_until("the control socket", STEP_TIMEOUT, Some(&agent), || agent.socket().exists());
        std::thread::sleep(Duration::from_secs(1));
    }
    press(&agent, "long");
    if !killed_at_start {
        let status = agent.wait_exit(STEP_TIMEOUT);
        if status.signal() != Some(libc::SIGKILL) {
            return Err(format!("the failpoint {failpoint} did not kill the agent: {status}"));
        }
        agent.set_env("AUTOUPDATE_FAILPOINT", None);
        agent.start();
    }

    let completed = || count_factory(&agent, "StartingFactory", "FactoryUp", "Idle");
    wait_until("the reset to finish", STEP_TIMEOUT, Some(&agent), || completed() >= 1);
    std::thread::sleep(Duration::from_secs(3));
    let requests = count_factory(&agent, "Idle", "Requested", "Armed");
    if requests != 1 || completed() != 1 {
        return Err(format!("{requests} requests and {} completed resets, expected one of each", completed()));
    }
    let containers = project_containers(&world.project);
    let factory_image = format!("autoupdate-factory/{}:web", world.project);
    if containers.len() != 1 || containers[0].state != "running" || containers[0].image != factory_image {
        return Err(format!("the factory stack is not the one running container: {containers:?}"));
    }
    let listing = cli(&["replay", "--journal", agent.journal.to_str().unwrap()]);
    if listing.contains("damaged") || listing.contains("skipped") {
        return Err(format!("the journal has damaged or skipped records: {listing}"));
    }
    agent.stop();
    Ok(())
}

#[test]
fn reset_killed_in_every_state_recovers() {
    let table = &eventpi_autoupdate::machine::factory::FACTORY_RESET_TABLE;
    let mut cases = Vec::new();
    for state in table.states {
        for point in ["after-persist", "before-command"] {
            // Idle waits for a request and runs no command of its own.
            if state.name == "Idle" && point == "before-command" {
                continue;
            }
            cases.push((state.name, point));
        }
    }
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for (state, point) in &cases {
        let outcome = run_reset_kill_case(state, point);
        rows.push(format!("factory-reset  {state:<16} {point:<15} {}", if outcome.is_ok() { "one completed reset" } else { "FAILED" }));
        if let Err(problem) = outcome {
            failures.push(format!("{state} {point}: {problem}"));
        }
    }
    println!("machine        state            point           outcome\n{}", rows.join("\n"));
    assert!(failures.is_empty(), "{failures:#?}");
}
