//! Drivers run the commands that the pure machines queue, against the real
//! world: the `git` and `docker compose` commands and the Docker API.

pub mod apply_gate;
pub mod compose;
pub mod docker;
pub mod git;
pub mod health;
pub mod process;
pub mod stack;
