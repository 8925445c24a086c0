//! eventpi-autoupdate keeps a headless Raspberry Pi up to date without a
//! technician on site.
//!
//! # Layout
//!
//! - [`machine`]: the pure state machines, one per update process, each
//!   written once as a transition list that also yields a constant table.
//! - [`journal`]: the append-only, fenced journal on the reserved partition
//!   that persists every transition before its command runs.
//! - [`model`]: values shared by machines, journal and drivers (commit ids,
//!   digests, releases, failures).
//! - [`kernel`]: kernel release strings, their flavour and their order.
//! - [`driver`]: runs the commands the machines queue; [`driver::host`] patches
//!   the Docker host over SSH ([`driver::ssh`]) with jobs detached on the host.
//! - [`credentials`] and [`secret`]: registry and git credentials read from
//!   owner-only files, and the redaction that keeps them out of every output.
//! - [`forecast`]: the least-squares trend of free space and when its
//!   pessimistic bound crosses a mark; [`driver::space`] runs the space guard
//!   ([`machine::space`]) with it.
//! - [`policy`]: apply policies (immediate, on-boot, maintenance windows in a
//!   time zone, update locks), decided from facts the drivers gather.
//! - [`panel`]: the status LED's blink patterns and the debounced button;
//!   [`driver::factory`] runs the factory reset ([`machine::factory`]) that a
//!   long press or the stack update's last fallback starts.
//! - [`selfupdate`]: the lease rules that decide which agent acts, and the
//!   handover of the lease from the running agent's container to a new one.

pub mod agent;
pub mod config;
pub mod control;
pub mod coordinator;
pub mod credentials;
pub mod diagram;
pub mod driver;
pub mod failpoint;
pub mod forecast;
pub mod identity;
pub mod journal;
pub mod kernel;
pub mod machine;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod panel;
pub mod platform;
pub mod policy;
pub mod report;
pub mod runtime;
pub mod seams;
pub mod secret;
pub mod selfupdate;
pub mod status;
