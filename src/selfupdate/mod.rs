//! Self-update by handover between two agent containers, and the lease rules
//! that decide which agent may act.
//!
//! # Layout
//!
//! - [`lease`]: what an agent does at start and after it was fenced out: act,
//!   wait passively, serve as a candidate, or watch a handover it started and
//!   take the lease back when the new agent fails.
//! - [`handover`]: the handover API that a candidate serves on the external
//!   Docker network, and the old agent's client for it.
//! - [`spec`]: the new container's configuration, derived from the old
//!   container and the two images (pure, unit-tested).
//! - [`docker`]: the Docker calls of a handover: own container, registry
//!   digest, network, create, start, stop, remove, rename.
//! - [`driver`]: runs the machine in [`crate::machine::selfupdate`].
//! - [`audit`]: reads a journal back and checks that every self-update step
//!   was written under the newest lease.
//!
//! The journal is the only proof of who may act. A candidate takes the lease
//! in the same synced append that records the handover. The old agent takes
//! it back with a higher epoch in the same append that records the failure.
//! So every step is either fenced out or written by the one holder.

pub mod audit;
pub mod docker;
pub mod driver;
pub mod handover;
pub mod lease;
pub mod spec;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

/// Label on a candidate container: the attempt number it was created for.
pub const CANDIDATE_LABEL: &str = "eventpi.autoupdate.candidate";

/// Label naming the agent a container belongs to: the container name that
/// every generation of the agent takes over.
pub const AGENT_LABEL: &str = "eventpi.autoupdate.agent";

/// Label with the image reference the agent follows, so that a container
/// created from a tag keeps following that tag.
pub const IMAGE_LABEL: &str = "eventpi.autoupdate.image";

/// Label on the external network when the agent created it.
pub const NETWORK_LABEL: &str = "eventpi.autoupdate.network";

/// Environment variable that starts the agent in candidate mode. Its value
/// is the one-time handover token.
pub const TOKEN_VARIABLE: &str = "AUTOUPDATE_HANDOVER_TOKEN";

/// Prefix of the labels Compose puts on its containers. A candidate does not
/// get them: the agent is never a service of the stack it manages.
pub const COMPOSE_LABEL_PREFIX: &str = "com.docker.compose.";

/// Requests to the self-update driver from the control API and the panel.
#[derive(Debug, Default)]
pub struct SelfUpdateHandle {
    /// Set while this agent runs the self-update process.
    pub enabled: AtomicBool,
    /// Wakes the driver for a check now.
    pub wake: Notify,
    /// Set with `wake` by an operator's request, so that a failed image is
    /// tried again without waiting for its retry time.
    pub forced: AtomicBool,
    /// Set when this agent took the lease as a candidate, so that the driver
    /// starts the probation without counting a restart.
    pub accepted: AtomicBool,
}

impl SelfUpdateHandle {
    pub fn new() -> Arc<SelfUpdateHandle> {
        Arc::new(SelfUpdateHandle::default())
    }

    /// Asks for a check now, as `update-now --self` does.
    pub fn request_check(&self) {
        self.forced.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }
}
