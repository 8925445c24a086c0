//! The space guard against real filesystems and the real Docker engine.
//! Size-limited tmpfs mounts and a loop-mounted ext4 image with few inodes
//! are filled for real, each standing in for one role, because the engine's
//! own data root is far too large to fill.
//!
//! Reclaiming in these tests is limited with `space.reclaim.only_label` to
//! objects that carry `eventpi.test.space=<registry port>`, a label only the
//! test's own images and containers have, so it cannot remove what other
//! tests or the shared base image use. The tests whose names start with
//! `cleanup_` reclaim, and run in the `docker-serial` group.

mod support;

use std::fs;
use std::io::Write;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use eventpi_autoupdate::driver::space::read_filesystem;
use support::{
    Agent, Tmpfs, Webhook, World, compose_file, count_transitions, notifications_section, project_containers, push_large_image, run, unmount, wait_until,
};

const STEP_TIMEOUT: Duration = Duration::from_secs(150);
const SECRET: &str = "space-test-secret";

/// An ext4 image with `inodes` inodes on a loop device, mounted on a fresh
/// directory; unmounted and detached when dropped.
struct LoopExt4 {
    _directory: tempfile::TempDir,
    device: String,
    path: PathBuf,
}

impl LoopExt4 {
    fn mount(megabytes: u64, inodes: u32) -> LoopExt4 {
        let directory = tempfile::tempdir().unwrap();
        let image = directory.path().join("fs.img");
        fs::File::create(&image).unwrap().set_len(megabytes * 1024 * 1024).unwrap();
        run("mkfs.ext4", &["-q", "-F", "-N", &inodes.to_string(), image.to_str().unwrap()]);
        let device = run("losetup", &["--find", "--show", image.to_str().unwrap()]).trim().to_string();
        let path = directory.path().join("fs");
        fs::create_dir(&path).unwrap();
        let mounted = LoopExt4 { _directory: directory, device, path };
        run("mount", &[&mounted.device, mounted.path.to_str().unwrap()]);
        mounted
    }
}

impl Drop for LoopExt4 {
    fn drop(&mut self) {
        unmount(&self.path);
        let _ = Command::new("losetup").args(["--detach", &self.device]).status();
    }
}

/// Grows or shrinks `fill.bin` on the filesystem at `path` so that
/// `free_percent` of its bytes are free. The file is never emptied on the
/// way, so the guard never samples a free filesystem in between.
fn set_free_percent(path: &Path, free_percent: f64) {
    let fill = path.join("fill.bin");
    let filled = fs::metadata(&fill).map(|metadata| metadata.len()).unwrap_or(0);
    let stats = read_filesystem(path).unwrap();
    let target_free = (stats.total_bytes as f64 * free_percent / 100.0) as u64;
    let size = (filled + stats.free_bytes).saturating_sub(target_free);
    if size <= filled {
        let file = fs::OpenOptions::new().write(true).open(&fill).unwrap();
        file.set_len(size).unwrap();
        file.sync_all().unwrap();
        return;
    }
    let mut file = fs::OpenOptions::new().append(true).create(true).open(&fill).unwrap();
    append_zeros(&mut file, size - filled);
}

/// Writes `size` zero bytes to `path`; a short write on a full filesystem
/// stops early.
fn write_zeros(path: &Path, size: u64) {
    let mut file = fs::File::create(path).unwrap();
    append_zeros(&mut file, size);
}

fn append_zeros(file: &mut fs::File, size: u64) {
    let chunk = vec![0u8; 64 * 1024];
    let mut left = size;
    while left > 0 {
        let part = left.min(chunk.len() as u64) as usize;
        if file.write_all(&chunk[..part]).is_err() {
            return;
        }
        left -= part as u64;
    }
    let _ = file.sync_all();
}

/// Fills the filesystem at `path` until the kernel reports it full.
fn fill_completely(path: &Path) {
    write_zeros(&path.join("fill.bin"), u64::MAX);
    assert_eq!(read_filesystem(path).unwrap().free_bytes, 0, "the filesystem at {} is full", path.display());
}

fn free_percent(path: &Path) -> f64 {
    let stats = read_filesystem(path).unwrap();
    stats.free_bytes as f64 * 100.0 / stats.total_bytes as f64
}

/// Returns the label that limits this test's reclaiming to its own objects.
fn space_label(world: &World) -> String {
    format!("eventpi.test.space={}", world.registry.port)
}

/// Builds `<registry>/<name>:<tag>` with the test's space label, runs until
/// stopped, and pushes it unless `push` is false.
fn labelled_image(world: &World, name: &str, tag: &str, push: bool) -> String {
    support::ensure_base_image();
    let reference = format!("{}/{name}:{tag}", world.registry.address());
    let context = tempfile::tempdir().unwrap();
    fs::write(
        context.path().join("Dockerfile"),
        format!(
            "FROM {}\nLABEL {} {} eventpi.test.version=\"{name}-{tag}\"\nCMD [\"sh\", \"-c\", \"echo {name}-{tag}; trap 'exit 0' TERM; while true; do sleep 1; done\"]\n",
            support::BASE_IMAGE,
            support::TEST_LABEL,
            space_label(world)
        ),
    )
    .unwrap();
    run("docker", &["build", "--quiet", "--tag", &reference, context.path().to_str().unwrap()]);
    if push {
        world.registry.push(&reference);
    }
    reference
}

fn image_exists(reference: &str) -> bool {
    Command::new("docker").args(["image", "inspect", reference]).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|status| status.success())
}

fn container_state(agent: &Agent, service: &str) -> String {
    project_containers(&agent.project).into_iter().find(|container| container.service == service).map(|container| container.state).unwrap_or_default()
}

/// Counts the space guard's transitions `from --event--> to`.
fn guard_transitions(agent: &Agent, from: &str, event: &str, to: &str) -> usize {
    agent
        .replay()
        .iter()
        .filter(|transition| transition.machine == "space-guard" && transition.from == from && transition.event == event && transition.to == to)
        .count()
}

fn notification_messages(webhook: &Webhook) -> Vec<(String, String)> {
    webhook
        .accepted()
        .iter()
        .map(|request| {
            let body: serde_json::Value = serde_json::from_str(&request.body).unwrap();
            (body["kind"].as_str().unwrap_or_default().to_string(), body["message"].as_str().unwrap_or_default().to_string())
        })
        .collect()
}

/// Returns the body of a GET on the agent's control socket.
fn control_get(agent: &Agent, path: &str) -> String {
    use std::io::Read;
    let mut stream = std::os::unix::net::UnixStream::connect(agent.socket()).expect("connect to the control socket");
    stream.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    stream.write_all(format!("GET {path} HTTP/1.1\r\nhost: agent\r\nconnection: close\r\n\r\n").as_bytes()).unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default()
}

/// Returns `[space]` with a fast interval, reclaiming limited to the test's
/// label, and `extra` tables after it.
fn space_section(world: &World, extra: &str) -> String {
    format!("[space]\ninterval = \"500ms\"\nreclaim_interval = \"2s\"\n\n[space.reclaim]\nonly_label = \"{}\"\n\n{extra}", space_label(world))
}

fn recordings_section(path: &Path) -> String {
    format!("[space.recordings]\npath = \"{}\"\n\n[space.recorder]\nservice = \"recorder\"\ntimeout = \"5s\"\n", path.display())
}

#[test]
fn recorder_stops_once_and_resumes() {
    let world = World::new("space-0001");
    let web = labelled_image(&world, "web", "v1", true);
    let recorder = labelled_image(&world, "recorder", "v1", true);
    let recordings = Tmpfs::mount(32);
    let first = world.repo.commit("web and recorder", &[("compose.yaml", &compose_file(&[("web", &web), ("recorder", &recorder)]))]);
    let mut agent = world.agent_with_sections("", &space_section(&world, &recordings_section(&recordings.path)));
    agent.start();
    wait_until("the first commit to become known-good", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&first));
    assert_eq!(container_state(&agent, "recorder"), "running");

    set_free_percent(&recordings.path, 14.0);
    wait_until("the recorder to stop", STEP_TIMEOUT, Some(&agent), || container_state(&agent, "recorder") == "exited");
    for round in 0..8 {
        let free = if round % 2 == 0 { 15.5 } else { 14.5 };
        set_free_percent(&recordings.path, free);
        std::thread::sleep(Duration::from_millis(1200));
    }
    let held = container_state(&agent, "recorder");
    let status = agent.status();
    set_free_percent(&recordings.path, 30.0);
    wait_until("the recorder to start again", STEP_TIMEOUT, Some(&agent), || container_state(&agent, "recorder") == "running");
    std::thread::sleep(Duration::from_secs(2));

    assert_eq!(held, "exited", "the recorder stays stopped while free space oscillates around the stop mark");
    assert!(status.contains("recorder held stopped (service recorder)"), "{status}");
    assert!(status.contains("recordings filesystem"), "{status}");
    let guard: Vec<String> = agent
        .replay()
        .iter()
        .filter(|transition| transition.machine == "space-guard")
        .map(|transition| format!("{} {} {}", transition.from, transition.event, transition.to))
        .collect();
    assert_eq!(guard_transitions(&agent, "Watching", "Sampled", "StoppingRecorder"), 1, "one stop: {guard:?}");
    assert_eq!(guard_transitions(&agent, "StartingRecorder", "RecorderStarted", "Watching"), 1, "one start: {guard:?}");
    assert_eq!(container_state(&agent, "web"), "running", "other services keep running");
    assert!(!agent.status().contains("recorder held stopped"), "the hold ended");
}

#[test]
fn held_recorder_stays_stopped_through_update() {
    let world = World::new("space-0002");
    let web_v1 = labelled_image(&world, "web", "v1", true);
    let web_v2 = labelled_image(&world, "web", "v2", true);
    let recorder = labelled_image(&world, "recorder", "v1", true);
    let recordings = Tmpfs::mount(32);
    let first = world.repo.commit("web v1 and recorder", &[("compose.yaml", &compose_file(&[("web", &web_v1), ("recorder", &recorder)]))]);
    let mut agent = world.agent_with_sections("", &space_section(&world, &recordings_section(&recordings.path)));
    agent.start();
    wait_until("the first commit to become known-good", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&first));
    set_free_percent(&recordings.path, 10.0);
    wait_until("the recorder to stop", STEP_TIMEOUT, Some(&agent), || container_state(&agent, "recorder") == "exited");

    let second = world.repo.commit("web v2", &[("compose.yaml", &compose_file(&[("web", &web_v2), ("recorder", &recorder)]))]);
    wait_until("the update to become known-good", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&second));
    let recorder_after_update = container_state(&agent, "recorder");
    let web_image =
        project_containers(&agent.project).into_iter().find(|container| container.service == "web").map(|container| container.image).unwrap_or_default();
    std::thread::sleep(Duration::from_secs(2));
    let recorder_later = container_state(&agent, "recorder");
    set_free_percent(&recordings.path, 50.0);
    wait_until("the recorder to start once space returns", STEP_TIMEOUT, Some(&agent), || container_state(&agent, "recorder") == "running");

    assert_eq!(recorder_after_update, "exited", "the update left the held recorder stopped");
    assert_eq!(recorder_later, "exited", "nothing started the recorder before space returned");
    assert!(web_image.starts_with(&format!("{}/web@sha256:", world.registry.address())), "web runs the pinned v2: {web_image}");
    assert!(agent.log().contains("leaving out services the space guard holds stopped"), "compose up left the recorder out");
    assert_eq!(count_transitions(&agent, "Probation", "GatePassed", "Idle"), 2, "both updates passed their gate");
}

#[test]
fn inode_exhaustion_reported_as_inodes() {
    let world = World::new("space-0003");
    let web = labelled_image(&world, "web", "v1", true);
    let recordings = LoopExt4::mount(16, 64);
    let webhook = Webhook::start();
    let secrets = tempfile::tempdir().unwrap();
    let sections = format!(
        "{}\n{}",
        space_section(&world, &format!("[space.recordings]\npath = \"{}\"\n", recordings.path.display())),
        notifications_section(secrets.path(), &webhook, SECRET)
    );
    let first = world.repo.commit("web", &[("compose.yaml", &compose_file(&[("web", &web)]))]);
    let mut agent = world.agent_with_sections("", &sections);
    agent.start();
    wait_until("the first commit to become known-good", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&first));

    let mut created = 0;
    while fs::File::create(recordings.path.join(format!("file-{created}"))).is_ok() {
        created += 1;
    }
    let stats = read_filesystem(&recordings.path).unwrap();
    wait_until("the inode shortage to be recorded", STEP_TIMEOUT, Some(&agent), || agent.status().contains("is below its mark: free inodes"));
    wait_until("the space-low notification", STEP_TIMEOUT, Some(&agent), || notification_messages(&webhook).iter().any(|(kind, _)| kind == "space-low"));
    let live = agent.live_status();
    let metrics = control_get(&agent, "/metrics");

    assert!(created > 0, "files were created");
    assert_eq!(stats.free_inodes, 0, "every inode is used: {stats:?}");
    assert!(free_percent(&recordings.path) > 50.0, "bytes are plentiful");
    assert!(live.contains("LOW: free inodes below the mark"), "{live}");
    assert!(!live.contains("free space and free inodes"), "bytes are not reported short:\n{live}");
    let messages = notification_messages(&webhook);
    let (_, message) = messages.iter().find(|(kind, _)| kind == "space-low").unwrap();
    assert!(message.contains("recordings filesystem"), "{message}");
    assert!(message.contains("is low on free inodes"), "{message}");
    let low_line = metrics.lines().find(|line| line.starts_with("autoupdate_filesystem_low{role=\"recordings\"")).unwrap_or_default();
    assert!(low_line.ends_with(" 1"), "{low_line}");
    let inodes_line = metrics.lines().find(|line| line.starts_with("autoupdate_filesystem_free_inodes{role=\"recordings\"")).unwrap_or_default();
    assert!(inodes_line.ends_with(" 0"), "{inodes_line}");
    assert!(live.contains("LED: no space"), "{live}");
}

#[test]
fn cleanup_keeps_known_good_for_offline_revert() {
    let mut world = World::new("space-0004");
    let flags = tempfile::tempdir().unwrap();
    fs::write(flags.path().join("ok"), "").unwrap();
    let good = labelled_image(&world, "web", "v1", true);
    let next = labelled_image(&world, "web", "v2", true);
    let junk = labelled_image(&world, "junk", "v1", false);
    let docker_root = Tmpfs::mount(32);
    let extra = format!("[space.docker]\npath = \"{}\"\n", docker_root.path.display());
    let first = world.repo.commit("web v1", &[("compose.yaml", &compose_file(&[("web", &good)]))]);
    let mut agent = world.agent_with_sections("probation = \"25s\"", &space_section(&world, &extra));
    agent.start();
    wait_until("the first commit to become known-good", Duration::from_secs(240), Some(&agent), || agent.known_good_is(&first));

    let flagged = format!(
        "services:\n  web:\n    image: {next}\n    command: [\"sh\", \"-c\", \"trap 'exit 0' TERM; while test -e /flags/ok; do sleep 0.2; done; exit 1\"]\n    volumes: [\"{}:/flags\"]\n    stop_grace_period: 1s\n    labels:\n      eventpi.test: \"1\"\n",
        flags.path().display()
    );
    world.repo.commit("web v2, which exits when the flag goes", &[("compose.yaml", &flagged)]);
    wait_until("the second commit to start its probation", STEP_TIMEOUT, Some(&agent), || count_transitions(&agent, "Applying", "Applied", "Probation") == 2);
    set_free_percent(&docker_root.path, 5.0);
    wait_until("the cleanup to remove the unused image", Duration::from_secs(30), Some(&agent), || !image_exists(&junk));
    let good_kept = image_exists(&good);
    set_free_percent(&docker_root.path, 90.0);
    world.registry.stop();
    fs::remove_file(flags.path().join("ok")).unwrap();
    wait_until("the revert to finish", STEP_TIMEOUT, Some(&agent), || agent.status().contains("last outcome: rolled back"));

    assert!(good_kept, "the known-good image survived the cleanup");
    assert!(agent.log().contains("reclaim finished"), "the cleanup ran");
    assert_eq!(count_transitions(&agent, "RevertProbation", "GatePassed", "Idle"), 1, "the revert passed its gate");
    assert!(agent.known_good_is(&first), "the first commit is known-good again");
    let web_image =
        project_containers(&agent.project).into_iter().find(|container| container.service == "web").map(|container| container.image).unwrap_or_default();
    assert!(web_image.starts_with(&format!("{}/web@sha256:", world.registry.address())), "{web_image}");
    assert_eq!(container_state(&agent, "web"), "running");
}

#[test]
fn cleanup_keeps_stopped_database_and_volume() {
    let world = World::new("space-0005");
    let web = labelled_image(&world, "web", "v1", true);
    let database = labelled_image(&world, "db", "v1", true);
    let docker_root = Tmpfs::mount(32);
    let compose = format!(
        "{}  db:\n    image: {database}\n    command: [\"sh\", \"-c\", \"echo kept > /data/marker; trap 'exit 0' TERM; while true; do sleep 1; done\"]\n    volumes: [\"data:/data\"]\n    stop_grace_period: 1s\n    labels:\n      eventpi.test: \"1\"\n      {}: \"{}\"\nvolumes:\n  data: {{}}\n",
        compose_file(&[("web", &web)]),
        "eventpi.test.space",
        world.registry.port
    );
    let first = world.repo.commit("web and a database", &[("compose.yaml", &compose)]);
    let extra = format!("[space.docker]\npath = \"{}\"\n", docker_root.path.display());
    let mut agent = world.agent_with_sections("", &space_section(&world, &extra));
    agent.start();
    wait_until("the first commit to become known-good", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&first));
    let database_container = project_containers(&agent.project).into_iter().find(|container| container.service == "db").expect("the database container");
    run("docker", &["stop", "--time", "1", &database_container.id]);
    let stray = format!("eventpi-test-space-stray-{}", world.registry.port);
    run("docker", &["create", "--name", &stray, "--label", support::TEST_LABEL, "--label", &space_label(&world), support::BASE_IMAGE, "true"]);

    set_free_percent(&docker_root.path, 5.0);
    wait_until("the cleanup to remove the stray container", Duration::from_secs(30), Some(&agent), || {
        !Command::new("docker").args(["container", "inspect", &stray]).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|status| status.success())
    });
    wait_until("several cleanups", Duration::from_secs(60), Some(&agent), || agent.log().matches("reclaim finished").count() >= 3);
    set_free_percent(&docker_root.path, 90.0);

    let after = project_containers(&agent.project).into_iter().find(|container| container.service == "db");
    let volume = format!("{}_data", agent.project);
    let mountpoint = run("docker", &["volume", "inspect", "--format", "{{.Mountpoint}}", &volume]).trim().to_string();
    let marker = fs::read_to_string(Path::new(&mountpoint).join("marker")).unwrap_or_default();
    assert_eq!(after.as_ref().map(|container| container.id.as_str()), Some(database_container.id.as_str()), "the stopped database container is kept");
    assert_eq!(after.map(|container| container.state).as_deref(), Some("exited"));
    assert_eq!(marker.trim(), "kept", "the volume and its marker file are kept");
    assert!(image_exists(&database), "the stopped database's image is kept");
}

#[test]
fn cleanup_then_refuse_pull_that_does_not_fit() {
    let world = World::new("space-0006");
    let web = labelled_image(&world, "web", "v1", true);
    let large = push_large_image(&world.registry, "big", "v1", 24);
    let docker_root = Tmpfs::mount(48);
    let webhook = Webhook::start();
    let secrets = tempfile::tempdir().unwrap();
    let extra = format!("[space.docker]\npath = \"{}\"\n", docker_root.path.display());
    let sections = format!("{}\n{}", space_section(&world, &extra), notifications_section(secrets.path(), &webhook, SECRET));
    let first = world.repo.commit("web", &[("compose.yaml", &compose_file(&[("web", &web)]))]);
    let mut agent = world.agent_with_sections("", &sections);
    agent.start();
    wait_until("the first commit to become known-good", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&first));
    let before = project_containers(&agent.project);

    let second = world.repo.commit("add a large image", &[("compose.yaml", &compose_file(&[("web", &web), ("big", &large)]))]);
    wait_until("the pull to be refused", STEP_TIMEOUT, Some(&agent), || count_transitions(&agent, "Pulling", "PullFailed", "Idle") >= 1);
    wait_until("the refusal notification", STEP_TIMEOUT, Some(&agent), || {
        notification_messages(&webhook).iter().any(|(_, message)| message.contains("not enough space to pull"))
    });

    let status = agent.status();
    assert!(status.contains("not enough space to pull the images"), "{status}");
    assert!(!status.contains(&format!("rejected commit {}", &second[..12])), "the commit is not rejected:\n{status}");
    assert_eq!(project_containers(&agent.project), before, "nothing stopped or changed");
    assert!(!image_exists(&large), "the large image was not pulled");
    let registry_log = world.registry.log();
    assert!(registry_log.contains("GET /v2/big/manifests/v1"), "the check read the manifest");
    assert!(!registry_log.contains("GET /v2/big/blobs/sha256"), "no layer of the large image was downloaded");
    assert!(agent.log().contains("reclaiming space before the pull"), "a cleanup ran before the refusal");
    let messages = notification_messages(&webhook);
    let (kind, _) = messages.iter().find(|(_, message)| message.contains("not enough space to pull")).unwrap();
    assert_eq!(kind, "device-problem");
    assert!(agent.known_good_is(&first));
}

#[test]
fn cleanup_with_every_filesystem_full() {
    let world = World::new("space-0007");
    let web_v1 = labelled_image(&world, "web", "v1", true);
    let web_v2 = labelled_image(&world, "web", "v2", true);
    let recorder = labelled_image(&world, "recorder", "v1", true);
    let data = Tmpfs::mount(32);
    let reserved = Tmpfs::mount(16);
    let checkout = data.path.join("stack");
    let extra = format!(
        "[space.docker]\npath = \"{path}\"\n\n[space.root]\npath = \"{path}\"\n\n[space.reserved]\npath = \"{reserved}\"\n\n{recordings}",
        path = data.path.display(),
        reserved = reserved.path.display(),
        recordings = recordings_section(&data.path)
    );
    let mut agent = world.agent_with_sections(&format!("checkout = \"{}\"", checkout.display()), &space_section(&world, &extra));
    // The journal directory lies on the reserved tmpfs.
    symlink(&reserved.path, agent.directory.path().join("reserved")).unwrap();
    let first = world.repo.commit("web v1 and recorder", &[("compose.yaml", &compose_file(&[("web", &web_v1), ("recorder", &recorder)]))]);
    agent.start();
    wait_until("the first commit to become known-good", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&first));
    let transitions_before = agent.replay().len();

    fill_completely(&data.path);
    let second = world.repo.commit("web v2", &[("compose.yaml", &compose_file(&[("web", &web_v2), ("recorder", &recorder)]))]);
    wait_until("the recorder to stop", STEP_TIMEOUT, Some(&agent), || container_state(&agent, "recorder") == "exited");
    wait_until("a failed step of the update to be recorded", STEP_TIMEOUT, Some(&agent), || {
        agent.replay().iter().any(|transition| {
            transition.machine == "stack" && transition.to == "Idle" && ["FetchFailed", "Invalid", "PullFailed"].contains(&transition.event.as_str())
        })
    });
    let status_while_full = agent.status();
    let transitions_while_full = agent.replay().len();
    let reserved_free = free_percent(&reserved.path);
    fs::remove_file(data.path.join("fill.bin")).unwrap();
    wait_until("the update once space returns", Duration::from_secs(240), Some(&agent), || agent.known_good_is(&second));
    wait_until("the recorder to start again", STEP_TIMEOUT, Some(&agent), || container_state(&agent, "recorder") == "running");

    assert!(transitions_while_full > transitions_before + 2, "transitions were recorded while the data filesystem was full");
    assert!(status_while_full.to_lowercase().contains("no space left"), "the error was recorded:\n{status_while_full}");
    assert!(!agent.log().contains("cloning it again"), "a full filesystem is not taken for a damaged clone");
    assert!(status_while_full.contains("recorder held stopped"), "{status_while_full}");
    assert!(reserved_free > 50.0, "the reserved partition had room: {reserved_free} %");
    assert!(reserved.path.join("journal/journal.bin").exists(), "the journal lies on the reserved partition");
    assert!(agent.log().contains("reclaim finished"), "the guard reclaimed while the data filesystem was full");
    assert_eq!(container_state(&agent, "web"), "running");
}

#[test]
fn power_cut_while_stopping_recorder() {
    let world = World::new("space-0008");
    let web = labelled_image(&world, "web", "v1", true);
    let recorder = labelled_image(&world, "recorder", "v1", true);
    let recordings = Tmpfs::mount(32);
    let first = world.repo.commit("web and recorder", &[("compose.yaml", &compose_file(&[("web", &web), ("recorder", &recorder)]))]);
    let mut agent = world
        .agent_with_sections("", &space_section(&world, &recordings_section(&recordings.path)))
        .with_env("AUTOUPDATE_FAILPOINT", "space-guard:StoppingRecorder:after-persist");
    agent.start();
    wait_until("the first commit to become known-good", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&first));

    set_free_percent(&recordings.path, 10.0);
    let exit = agent.wait_exit(STEP_TIMEOUT);
    let status_after_cut = agent.status();
    let recorder_after_cut = container_state(&agent, "recorder");
    agent.set_env("AUTOUPDATE_FAILPOINT", None);
    agent.start();
    wait_until("the recorder to stop after the restart", STEP_TIMEOUT, Some(&agent), || container_state(&agent, "recorder") == "exited");
    wait_until("the guard to hold the recorder", STEP_TIMEOUT, Some(&agent), || {
        guard_transitions(&agent, "StoppingRecorder", "RecorderStopped", "Holding") == 1
    });
    set_free_percent(&recordings.path, 50.0);
    wait_until("the recorder to start again", STEP_TIMEOUT, Some(&agent), || container_state(&agent, "recorder") == "running");

    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&exit), Some(libc::SIGKILL), "the failpoint killed the agent");
    assert!(status_after_cut.contains("space-guard: StoppingRecorder"), "{status_after_cut}");
    assert!(status_after_cut.contains("recorder held stopped (service recorder)"), "the hold was persisted before the stop:\n{status_after_cut}");
    assert_eq!(recorder_after_cut, "running", "the stop had not run when the power was cut");
    assert_eq!(guard_transitions(&agent, "StoppingRecorder", "Resumed", "StoppingRecorder"), 1, "the restart repeated the stop");
    assert_eq!(guard_transitions(&agent, "Watching", "Sampled", "StoppingRecorder"), 1, "one stop decision");
}

#[test]
fn cleanup_checks_pull_size_with_registry_credentials() {
    use std::os::unix::fs::PermissionsExt;

    let password = format!("Pw-{}-space", std::process::id());
    let registry = support::Registry::start_with_auth("device", &password);
    let git = support::GitServer::start();
    let repo = support::StackRepo::create(&git, "space-0009");
    let large = push_large_image(&registry, "big", "v1", 24);
    let docker_root = Tmpfs::mount(48);
    let sections = format!(
        "[space]\ninterval = \"500ms\"\n\n[space.reclaim]\nonly_label = \"eventpi.test.space={}\"\n\n[space.docker]\npath = \"{}\"\n",
        registry.port,
        docker_root.path.display()
    );
    let mut agent = Agent::configure(support::AgentSetup {
        repository: git.url("stack.git"),
        branch: "space-0009",
        project: format!("eventpi-test-{}", registry.port),
        extra_stack: "",
        extra_sections: &sections,
    });
    let password_file = agent.directory.path().join("secrets/registry-password");
    fs::create_dir_all(password_file.parent().unwrap()).unwrap();
    fs::write(&password_file, format!("{password}\n")).unwrap();
    fs::set_permissions(&password_file, fs::Permissions::from_mode(0o600)).unwrap();
    agent.append_config(&format!("[[registry]]\nhost = \"{}\"\nusername = \"device\"\npassword_file = \"{}\"", registry.address(), password_file.display()));
    repo.commit("a large image", &[("compose.yaml", &compose_file(&[("big", &large)]))]);

    agent.start();
    wait_until("the pull to be refused", STEP_TIMEOUT, Some(&agent), || agent.status().contains("not enough space to pull the images"));

    let registry_log = registry.log();
    assert!(registry_log.contains("GET /v2/big/manifests/v1"), "the check read the manifest");
    assert!(!registry_log.contains("GET /v2/big/blobs/sha256"), "no layer was downloaded");
    let log = agent.log();
    assert!(log.contains("MiB compressed"), "the size came from the manifest behind the login");
    assert!(!log.contains("(0 B compressed"), "the manifest was read");
    assert!(!log.contains(&password), "the password is not logged");
    assert!(!agent.status().contains(&password), "the password is not in the status");
    assert!(project_containers(&agent.project).is_empty(), "nothing was started");
}

/// How a space-guard kill case drives the guard into its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SpaceScenario {
    /// Recordings run low, then space comes back: stop, hold and start the
    /// recorder.
    RecorderCycle,
    /// The Docker filesystem runs low: reclaim the test's unused objects.
    Reclaim,
}

/// Returns the failpoints a space-guard state can reach, with the scenario
/// that reaches them. A point the driver never passes in that state is left out,
/// with the reason in `unreachable_points`.
fn space_case_for(state: &str) -> (SpaceScenario, &'static [&'static str]) {
    match state {
        // Entered by persisting the recorder's release; Watching runs no
        // command of its own.
        "Watching" => (SpaceScenario::RecorderCycle, &["after-persist"]),
        "StoppingRecorder" | "StartingRecorder" => (SpaceScenario::RecorderCycle, &["after-persist", "before-command"]),
        // Holding runs no command: its restart path goes through
        // StoppingRecorder, whose command the row above covers.
        "Holding" => (SpaceScenario::RecorderCycle, &["after-persist"]),
        "Reclaiming" => (SpaceScenario::Reclaim, &["after-persist", "before-command"]),
        other => panic!("no power-cut case for space-guard state {other}; add one here"),
    }
}

/// Runs one space-guard kill case and returns what went wrong, if anything.
fn run_space_kill_case(state: &str, point: &str, scenario: SpaceScenario, index: usize) -> Result<(), String> {
    let world = World::new(&format!("space-kill-{index:02}"));
    let web = labelled_image(&world, "web", "v1", true);
    let recorder = labelled_image(&world, "recorder", "v1", true);
    let junk = labelled_image(&world, "junk", "v1", false);
    let recordings = Tmpfs::mount(32);
    let docker_root = Tmpfs::mount(32);
    let extra = format!("{}[space.docker]\npath = \"{}\"\n", recordings_section(&recordings.path), docker_root.path.display());
    let first = world.repo.commit("web and recorder", &[("compose.yaml", &compose_file(&[("web", &web), ("recorder", &recorder)]))]);
    let failpoint = format!("space-guard:{state}:{point}");
    let mut agent = world.agent_with_sections("", &space_section(&world, &extra));
    agent.start();
    wait_until("the first commit to become known-good", STEP_TIMEOUT, Some(&agent), || agent.known_good_is(&first));

    // A case killed when the recorder starts again begins with it held.
    let from_hold = matches!(state, "StartingRecorder" | "Watching");
    if from_hold {
        set_free_percent(&recordings.path, 10.0);
        wait_until("the guard to hold the recorder", STEP_TIMEOUT, Some(&agent), || agent.status().contains("recorder held stopped"));
    }
    // The failpoint is armed only now, because the guard also passes through
    // Watching while the agent starts.
    if !agent.stop().success() {
        return Err("the agent did not stop cleanly before the case".into());
    }
    agent.set_env("AUTOUPDATE_FAILPOINT", Some(&failpoint));
    agent.start();
    match scenario {
        SpaceScenario::RecorderCycle if from_hold => set_free_percent(&recordings.path, 50.0),
        SpaceScenario::RecorderCycle => set_free_percent(&recordings.path, 10.0),
        SpaceScenario::Reclaim => set_free_percent(&docker_root.path, 5.0),
    }
    let exit = agent.wait_exit(STEP_TIMEOUT);
    if std::os::unix::process::ExitStatusExt::signal(&exit) != Some(libc::SIGKILL) {
        return Err(format!("failpoint {failpoint} was not reached; the agent exited with {exit}\n{}", agent.log_tail()));
    }

    agent.set_env("AUTOUPDATE_FAILPOINT", None);
    agent.start();
    match scenario {
        SpaceScenario::RecorderCycle => {
            if !from_hold {
                wait_until("the recorder to be held after the restart", STEP_TIMEOUT, Some(&agent), || {
                    container_state(&agent, "recorder") == "exited" && agent.status().contains("recorder held stopped")
                });
                set_free_percent(&recordings.path, 50.0);
            }
        }
        SpaceScenario::Reclaim => {
            wait_until("the reclaim to finish after the restart", STEP_TIMEOUT, Some(&agent), || !image_exists(&junk));
            set_free_percent(&docker_root.path, 90.0);
        }
    }
    wait_until("the guard to watch with the recorder running", STEP_TIMEOUT, Some(&agent), || {
        let status = agent.status();
        container_state(&agent, "recorder") == "running" && status.contains("space-guard: Watching") && !status.contains("recorder held stopped")
    });

    let status = agent.status();
    if status.contains("skipped while reading") {
        return Err(format!("the journal has damaged records:\n{status}"));
    }
    let containers = project_containers(&agent.project);
    let running = containers.iter().filter(|container| container.state == "running").count();
    if containers.len() != 2 || running != 2 {
        return Err(format!("expected web and recorder running, found {containers:?}"));
    }
    let stops = guard_transitions(&agent, "Watching", "Sampled", "StoppingRecorder");
    if scenario == SpaceScenario::RecorderCycle && stops != 1 {
        return Err(format!("{stops} stop decisions instead of 1"));
    }
    if !image_exists(&web) || !image_exists(&recorder) {
        return Err("the reclaim removed an image the stack runs".into());
    }
    let config = agent.config.to_str().unwrap().to_string();
    let agents = run("pgrep", &["-c", "-f", &format!("autoupdate run --config {config}")]).trim().parse::<u32>().unwrap_or(0);
    if agents != 1 {
        return Err(format!("{agents} agent processes run"));
    }
    Ok(())
}

/// Kills the agent at every state of the space guard, after the record is
/// persisted and before the command runs. The restarted agent must end with
/// the recorder running, the guard watching, a valid journal and no extra
/// container. The name starts with `cleanup_` because its reclaim case
/// removes the test's own unused image, so it runs in the `docker-serial` group.
#[test]
fn cleanup_kill_at_every_state_recovers() {
    use eventpi_autoupdate::machine::space::SPACE_TABLE;

    let mut cases = Vec::new();
    for state in SPACE_TABLE.states {
        let (scenario, points) = space_case_for(state.name);
        for point in points {
            cases.push((state.name, *point, scenario));
        }
    }

    let mut table = String::from("machine      state             point           outcome\n");
    let mut failures = Vec::new();
    for (index, (state, point, scenario)) in cases.iter().enumerate() {
        let result = std::panic::catch_unwind(|| run_space_kill_case(state, point, *scenario, index))
            .unwrap_or_else(|panic| Err(panic.downcast_ref::<String>().cloned().unwrap_or_else(|| "the case panicked".into())));
        let outcome = if result.is_ok() { "Recovered" } else { "FAILED" };
        table.push_str(&format!("space-guard  {state:<17} {point:<15} {outcome}\n"));
        if let Err(error) = result {
            failures.push(format!("{state} {point}: {error}"));
        }
    }
    println!("{table}");
    assert!(failures.is_empty(), "{table}\n{}", failures.join("\n\n"));
}
