//! A release build has no failpoints: AUTOUPDATE_FAILPOINT changes nothing.
//! `make test` builds the release binary before the tests run.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use support::{Behaviour, World, compose_file, push_image, wait_until};

fn release_binary() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let binary = target.join("release/autoupdate");
    assert!(binary.is_file(), "{} is missing: build it with `cargo build --release` (make test does)", binary.display());
    binary
}

#[test]
fn release_binary_ignores_failpoints() {
    let world = World::new("release-0001");
    let image = push_image(&world.registry, "web", "v1", Behaviour::Serve);
    let commit = world.repo.commit("web v1", &[("compose.yaml", &compose_file(&[("web", &image)]))]);
    let mut agent = world.agent("").with_binary(release_binary()).with_env("AUTOUPDATE_FAILPOINT", "stack:Applying:after-persist");

    agent.start();
    wait_until("the commit to become known-good", Duration::from_secs(90), Some(&agent), || agent.known_good_is(&commit));

    assert!(agent.is_running(), "the release binary is still running after passing the failpoint's state");
    assert!(!agent.log().contains("failpoint reached"), "no failpoint fired");
}
