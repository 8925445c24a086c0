//! Drivers run the commands that the pure machines queue, against the real
//! world: the `git` and `docker compose` commands, the Docker API, and SSH to
//! the Docker host.

pub mod apply_gate;
pub mod compose;
pub mod docker;
pub mod factory;
pub mod git;
pub mod git_auth;
pub mod health;
pub mod host;
pub mod host_schedule;
pub mod host_script;
pub mod process;
pub mod signing;
pub mod space;
pub mod ssh;
pub mod stack;
