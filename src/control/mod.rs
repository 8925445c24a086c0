//! The control API: a local HTTP server on a unix socket for the CLI and
//! monitoring, and the client the CLI uses.

pub mod client;
pub mod server;
