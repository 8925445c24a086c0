//! The factory reset: its material on the reserved partition, the driver of
//! the factory-reset machine, and the handle that requests a reset.

pub mod capture;
pub mod driver;
pub mod handle;
pub mod material;

pub use handle::FactoryResetHandle;
