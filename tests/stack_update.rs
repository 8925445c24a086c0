//! Stack updates from a git branch against a real Docker engine, registry and
//! git server.

mod support;

use std::time::Duration;

use support::{Behaviour, World, compose_file, project_containers, push_image, wait_until};

const UPDATE_TIMEOUT: Duration = Duration::from_secs(90);

/// Returns the transitions of one successful update, from the poll that
/// finds the commit to the gate that accepts it.
fn update_transitions() -> Vec<(&'static str, &'static str, &'static str)> {
    vec![
        ("Idle", "Poll", "Fetching"),
        ("Fetching", "TipFetched", "Validating"),
        ("Validating", "Valid", "Pulling"),
        ("Pulling", "Pulled", "Ready"),
        ("Ready", "PolicyAllows", "Applying"),
        ("Applying", "Applied", "Probation"),
        ("Probation", "GatePassed", "Idle"),
    ]
}

fn triples(world_agent: &support::Agent) -> Vec<(String, String, String)> {
    world_agent
        .replay()
        .into_iter()
        .filter(|transition| transition.machine == "stack")
        .map(|transition| (transition.from, transition.event, transition.to))
        .collect()
}

fn owned(expected: Vec<(&str, &str, &str)>) -> Vec<(String, String, String)> {
    expected.into_iter().map(|(from, event, to)| (from.to_string(), event.to_string(), to.to_string())).collect()
}

#[test]
fn commit_changing_one_image_is_applied() {
    let world = World::new("device-0001");
    let web_v1 = push_image(&world.registry, "web", "v1", Behaviour::Serve);
    let web_v2 = push_image(&world.registry, "web", "v2", Behaviour::Serve);
    let db = push_image(&world.registry, "db", "v1", Behaviour::Serve);
    let first = world.repo.commit("web v1", &[("compose.yaml", &compose_file(&[("web", &web_v1), ("db", &db)]))]);
    let mut agent = world.agent("");
    agent.start();
    wait_until("the first commit to become known-good", UPDATE_TIMEOUT, Some(&agent), || agent.known_good_is(&first));
    let db_before = project_containers(&world.project).into_iter().find(|container| container.service == "db").unwrap();

    let second = world.repo.commit("web v2", &[("compose.yaml", &compose_file(&[("web", &web_v2), ("db", &db)]))]);
    wait_until("the second commit to become known-good", UPDATE_TIMEOUT, Some(&agent), || agent.known_good_is(&second));

    let containers = project_containers(&world.project);
    let web = containers.iter().find(|container| container.service == "web").expect("web container");
    let db_after = containers.iter().find(|container| container.service == "db").expect("db container");
    let registry_digest = world.registry.manifest_digest("web", "v2");
    assert_eq!(web.image, format!("{}/web@{registry_digest}", world.registry.address()), "web runs the registry's v2 digest");
    assert_eq!(web.state, "running");
    assert_eq!(db_after.id, db_before.id, "the unchanged db service keeps its container");
    assert_eq!(db_after.started_at, db_before.started_at, "the unchanged db service was not restarted");

    let mut expected = update_transitions();
    expected.extend(update_transitions());
    assert_eq!(triples(&agent), owned(expected), "replayed transitions of two updates");
    assert!(agent.status().contains(&registry_digest), "status lists the known-good digest:\n{}", agent.status());
}

#[test]
fn missing_image_is_rejected_and_changes_nothing() {
    let world = World::new("device-0002");
    let web_v1 = push_image(&world.registry, "web", "v1", Behaviour::Serve);
    let first = world.repo.commit("web v1", &[("compose.yaml", &compose_file(&[("web", &web_v1)]))]);
    let mut agent = world.agent("");
    agent.start();
    wait_until("the first commit to become known-good", UPDATE_TIMEOUT, Some(&agent), || agent.known_good_is(&first));
    let before = project_containers(&world.project);

    let missing = format!("{}/web:v9", world.registry.address());
    let bad = world.repo.commit("web v9", &[("compose.yaml", &compose_file(&[("web", &missing)]))]);
    wait_until("the bad commit to be rejected", UPDATE_TIMEOUT, Some(&agent), || agent.status().contains(&format!("rejected commit {}", &bad[..12])));
    let attempts_after_rejection = triples(&agent).iter().filter(|(from, _, to)| from == "Fetching" && to == "Validating").count();
    std::thread::sleep(Duration::from_secs(4));

    let status = agent.status();
    assert!(status.contains(&missing), "the error names the image:\n{status}");
    assert!(agent.known_good_is(&first), "the known-good commit stays:\n{status}");
    assert_eq!(project_containers(&world.project), before, "container ids and start times are unchanged");
    let attempts_later = triples(&agent).iter().filter(|(from, _, to)| from == "Fetching" && to == "Validating").count();
    assert_eq!(attempts_later, attempts_after_rejection, "the rejected commit is not retried while the branch stays");

    let web_v2 = push_image(&world.registry, "web", "v2", Behaviour::Serve);
    let fixed = world.repo.commit("web v2", &[("compose.yaml", &compose_file(&[("web", &web_v2)]))]);
    wait_until("the next commit to be applied", UPDATE_TIMEOUT, Some(&agent), || agent.known_good_is(&fixed));
}

#[test]
fn invalid_yaml_is_rejected_with_file_and_line() {
    let world = World::new("device-0003");
    let web_v1 = push_image(&world.registry, "web", "v1", Behaviour::Serve);
    let first = world.repo.commit("web v1", &[("compose.yaml", &compose_file(&[("web", &web_v1)]))]);
    let mut agent = world.agent("");
    agent.start();
    wait_until("the first commit to become known-good", UPDATE_TIMEOUT, Some(&agent), || agent.known_good_is(&first));
    let before = project_containers(&world.project);

    let broken = "services:\n  web:\n    image: nothing\n   command: [unclosed\n";
    let bad = world.repo.commit("broken yaml", &[("compose.yaml", broken)]);
    wait_until("the broken commit to be rejected", UPDATE_TIMEOUT, Some(&agent), || agent.status().contains(&format!("rejected commit {}", &bad[..12])));

    let status = agent.status();
    assert!(status.contains("compose.yaml line 4"), "the error names file and line:\n{status}");
    assert_eq!(project_containers(&world.project), before, "nothing was stopped or recreated");
    let last = triples(&agent).last().cloned().unwrap();
    assert_eq!(last, ("Validating".to_string(), "Invalid".to_string(), "Idle".to_string()));
}

#[test]
fn force_pushed_branch_is_followed() {
    let world = World::new("device-0004");
    let web_v1 = push_image(&world.registry, "web", "v1", Behaviour::Serve);
    let web_v2 = push_image(&world.registry, "web", "v2", Behaviour::Serve);
    let web_v3 = push_image(&world.registry, "web", "v3", Behaviour::Serve);
    let first = world.repo.commit("web v1", &[("compose.yaml", &compose_file(&[("web", &web_v1)]))]);
    let mut agent = world.agent("");
    agent.start();
    wait_until("the first commit to become known-good", UPDATE_TIMEOUT, Some(&agent), || agent.known_good_is(&first));
    let second = world.repo.commit("web v2", &[("compose.yaml", &compose_file(&[("web", &web_v2)]))]);
    wait_until("the second commit to become known-good", UPDATE_TIMEOUT, Some(&agent), || agent.known_good_is(&second));

    world.repo.git(&["reset", "--quiet", "--hard", &first]);
    let rewritten = world.repo.commit("web v3 on rewritten history", &[("compose.yaml", &compose_file(&[("web", &web_v3)]))]);
    wait_until("the rewritten commit to become known-good", UPDATE_TIMEOUT, Some(&agent), || agent.known_good_is(&rewritten));
    world.repo.git(&["reset", "--quiet", "--hard", &first]);
    world.repo.push();
    wait_until("the older commit to become known-good", UPDATE_TIMEOUT, Some(&agent), || agent.known_good_is(&first));

    let checkout = agent.checkout.to_str().unwrap();
    let head = support::run("git", &["-C", checkout, "rev-parse", "HEAD"]);
    let branch = support::run("git", &["-C", checkout, "symbolic-ref", "HEAD"]);
    assert_eq!(head.trim(), first, "the clone is at the older commit");
    assert_eq!(branch.trim(), "refs/heads/device-0004", "the clone is on the device branch");
    assert!(!agent.checkout.join(".git/MERGE_HEAD").exists(), "no merge in progress");
    let web = project_containers(&world.project).into_iter().find(|container| container.service == "web").unwrap();
    assert!(web.image.contains(&world.registry.manifest_digest("web", "v1")), "web runs v1 again: {}", web.image);
}

#[test]
fn unreachable_git_server_keeps_stack_running() {
    let mut world = World::new("device-0005");
    let web_v1 = push_image(&world.registry, "web", "v1", Behaviour::Serve);
    let web_v2 = push_image(&world.registry, "web", "v2", Behaviour::Serve);
    let first = world.repo.commit("web v1", &[("compose.yaml", &compose_file(&[("web", &web_v1)]))]);
    let mut agent = world.agent("");
    agent.start();
    wait_until("the first commit to become known-good", UPDATE_TIMEOUT, Some(&agent), || agent.known_good_is(&first));
    let before = project_containers(&world.project);

    world.git.stop();
    wait_until("the agent to report the unreachable server", UPDATE_TIMEOUT, Some(&agent), || agent.status().contains("is unreachable"));
    assert_eq!(project_containers(&world.project), before, "the stack keeps running unchanged");
    assert!(agent.log().contains("unreachable"), "the log names the problem");

    let second = world.repo.commit("web v2", &[("compose.yaml", &compose_file(&[("web", &web_v2)]))]);
    world.git.resume();
    wait_until("the next commit after the server is back", UPDATE_TIMEOUT, Some(&agent), || agent.known_good_is(&second));
}

#[test]
fn empty_device_clones_and_applies() {
    let world = World::new("device-0006");
    let web_v1 = push_image(&world.registry, "web", "v1", Behaviour::Serve);
    let first = world.repo.commit("web v1", &[("compose.yaml", &compose_file(&[("web", &web_v1)]))]);
    let mut agent = world.agent("");
    assert!(!agent.checkout.exists(), "the device starts without a clone");

    agent.start();
    wait_until("the first commit to become known-good", UPDATE_TIMEOUT, Some(&agent), || agent.known_good_is(&first));

    assert!(agent.checkout.join(".git").is_dir(), "the branch was cloned");
    assert_eq!(owned(update_transitions()), triples(&agent));
    let containers = project_containers(&world.project);
    assert_eq!(containers.len(), 1, "one web container: {containers:?}");
    assert_eq!(containers[0].state, "running");
}

#[test]
fn sigterm_stops_cleanly() {
    let world = World::new("device-0007");
    let web_v1 = push_image(&world.registry, "web", "v1", Behaviour::Serve);
    let first = world.repo.commit("web v1", &[("compose.yaml", &compose_file(&[("web", &web_v1)]))]);
    let mut agent = world.agent("");
    agent.start();
    wait_until("the first commit to become known-good", UPDATE_TIMEOUT, Some(&agent), || agent.known_good_is(&first));

    let status = agent.stop();

    assert!(status.success(), "the agent exits with status 0 on SIGTERM: {status}");
    assert!(agent.log().contains("agent stopped"), "the log says the agent stopped");
    for pattern in [world.project.as_str(), agent.checkout.to_str().unwrap()] {
        let left = std::process::Command::new("pgrep").args(["-af", pattern]).output().unwrap();
        let left = String::from_utf8_lossy(&left.stdout).into_owned();
        assert!(left.trim().is_empty(), "no process for {pattern} left: {left}");
    }
    assert!(agent.known_good_is(&first), "the journal still reads after the stop");
}
