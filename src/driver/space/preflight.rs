//! The check before a pull: the images must fit on the Docker data root with
//! room to unpack them, above its stop mark, and with inodes to spare.
//!
//! Stack updates and self-updates call [`PullCheck::check`] before every
//! pull. When the images do not fit, it reclaims once and checks again. A
//! check that still fails stops nothing: the
//! pull is reported as failed, and the update is retried later.

use std::collections::BTreeSet;
use std::path::PathBuf;

use crate::driver::docker::Engine;
use crate::driver::space::reclaim::{Reclaimer, format_bytes};
use crate::driver::space::registry::ManifestReader;
use crate::driver::space::{FilesystemStats, read_filesystem};
use crate::machine::space::{Marks, Role};

/// The filesystem that pulls fill, with its marks.
#[derive(Debug, Clone)]
pub struct PullTarget {
    pub role: Role,
    pub path: PathBuf,
    pub marks: Marks,
}

/// Everything the check needs.
#[derive(Clone)]
pub struct PullCheck {
    pub engine: Engine,
    pub reader: ManifestReader,
    pub reclaimer: Reclaimer,
    /// The Docker data root, or the root filesystem when only that is
    /// configured; without either the check passes.
    pub target: Option<PullTarget>,
    /// Free bytes needed per compressed byte.
    pub size_factor: f64,
    /// Machine named in the check's log lines: `stack` or `self-update`.
    pub machine: &'static str,
}

impl std::fmt::Debug for PullCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullCheck").field("target", &self.target).field("size_factor", &self.size_factor).finish()
    }
}

/// Error for images that do not fit, in words an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NoRoom(pub String);

/// The space the images of one pull need.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PullEstimate {
    pub compressed_bytes: u64,
    /// Part of `needed_bytes` estimated from local images of the same
    /// repository, for images whose manifest the agent could not read.
    pub local_estimate_bytes: u64,
    pub needed_bytes: u64,
}

/// Free bytes needed per unpacked byte of the local image used for an image
/// whose manifest cannot be read. The download takes at most the unpacked
/// size and the unpacked layers take the rest. An estimate, not a measurement.
const LOCAL_SIZE_FACTOR: u64 = 2;

impl PullCheck {
    /// Returns this check with its log lines naming `machine`.
    pub fn for_machine(mut self, machine: &'static str) -> PullCheck {
        self.machine = machine;
        self
    }

    /// Estimates the space `images` need and checks that it is free,
    /// reclaiming once when it is not.
    pub async fn check(&self, images: &[String]) -> Result<PullEstimate, NoRoom> {
        let Some(target) = &self.target else { return Ok(PullEstimate::default()) };
        let estimate = self.estimate(images).await;

        let stats = self.read(target)?;
        let Some(reason) = shortage(target, &stats, estimate) else {
            tracing::debug!(machine = self.machine, needed = %format_bytes(estimate.needed_bytes), free = %format_bytes(stats.free_bytes), "the images fit");
            return Ok(estimate);
        };

        tracing::info!(machine = self.machine, path = %target.path.display(), %reason, "the images do not fit; reclaiming space before the pull");
        let freed = match self.reclaimer.run().await {
            Ok(steps) => steps.iter().map(|step| step.freed_bytes).sum(),
            Err(error) => {
                tracing::warn!(machine = self.machine, %error, "reclaiming before the pull failed");
                0
            }
        };
        let stats = self.read(target)?;
        match shortage(target, &stats, estimate) {
            None => Ok(estimate),
            Some(reason) => Err(NoRoom(format!(
                "{reason} after reclaiming {}; delete files there or give Docker a larger filesystem. Nothing was stopped, and the pull is retried later",
                format_bytes(freed)
            ))),
        }
    }

    fn read(&self, target: &PullTarget) -> Result<FilesystemStats, NoRoom> {
        read_filesystem(&target.path).map_err(|error| {
            NoRoom(format!("cannot read the free space of {} ({}): {error}; check space.{}.path", target.path.display(), target.role, target.role))
        })
    }

    /// Sums the compressed size of every image not present locally, and
    /// multiplies it by the size factor. An image whose manifest cannot be
    /// read (the daemon may reach a registry that the agent's network
    /// cannot) is estimated from the largest local image of its repository,
    /// such as the running agent or the previous release of a service.
    /// Without one it counts as 0, because its pull then fails on its own
    /// when the registry is down.
    async fn estimate(&self, images: &[String]) -> PullEstimate {
        let mut compressed = 0u64;
        let mut local_estimate = 0u64;
        let unique: BTreeSet<&String> = images.iter().collect();
        for image in unique {
            let repository = crate::model::ImageReference::parse(image).map(|reference| reference.repository).unwrap_or_default();
            match self.reader.size(image, self.engine.platform()).await {
                Ok(size) => {
                    let present = match &size.digest {
                        Some(digest) => self.engine.has_image(&format!("{repository}@{digest}")).await,
                        None => false,
                    };
                    tracing::debug!(
                        machine = self.machine,
                        image,
                        compressed = size.compressed_bytes,
                        layers = size.layers,
                        present,
                        "image size from its manifest"
                    );
                    if !present {
                        compressed += size.compressed_bytes;
                    }
                }
                Err(error) => match self.engine.largest_local_image(&repository).await {
                    Some(unpacked) => {
                        tracing::warn!(machine = self.machine, image, %error, local_unpacked = %format_bytes(unpacked), "cannot read the image size from the registry; estimating it from the largest local image of the same repository");
                        local_estimate = local_estimate.saturating_add(unpacked.saturating_mul(LOCAL_SIZE_FACTOR));
                    }
                    None => {
                        tracing::warn!(machine = self.machine, image, %error, "cannot read the image size from the registry and no local image of its repository exists; it is left out of the space check")
                    }
                },
            }
        }
        // NOTE: layers that local images already hold are counted again, so
        // the estimate is high for an image that shares a base with one on
        // the device.
        let needed = ((compressed as f64 * self.size_factor).ceil() as u64).saturating_add(local_estimate);
        PullEstimate { compressed_bytes: compressed, local_estimate_bytes: local_estimate, needed_bytes: needed }
    }
}

/// Describes why `estimate` does not fit on `stats`, or returns `None`.
fn shortage(target: &PullTarget, stats: &FilesystemStats, estimate: PullEstimate) -> Option<String> {
    let place = format!("{} ({})", target.path.display(), target.role);
    let inodes_percent = if stats.total_inodes == 0 { 100.0 } else { stats.free_inodes as f64 * 100.0 / stats.total_inodes as f64 };
    if inodes_percent < target.marks.stop_below_inodes_percent {
        return Some(format!(
            "not enough free inodes to pull the images: {place} has {inodes_percent:.1} % free inodes ({} of {}), below its {} % mark",
            stats.free_inodes, stats.total_inodes, target.marks.stop_below_inodes_percent
        ));
    }

    let reserve = (stats.total_bytes as f64 * target.marks.stop_below_percent / 100.0) as u64;
    let usable = stats.free_bytes.saturating_sub(reserve);
    if usable >= estimate.needed_bytes {
        return None;
    }
    let basis = if estimate.local_estimate_bytes == 0 {
        format!("{} compressed, times the space.pull_size_factor for unpacking", format_bytes(estimate.compressed_bytes))
    } else {
        format!(
            "{} compressed, times the space.pull_size_factor for unpacking, plus {} estimated from local images because the registry's manifests could not be read",
            format_bytes(estimate.compressed_bytes),
            format_bytes(estimate.local_estimate_bytes)
        )
    };
    Some(format!(
        "not enough space to pull the images: they need about {} ({basis}), but {place} has {} free above its {} % stop mark",
        format_bytes(estimate.needed_bytes),
        format_bytes(usable),
        target.marks.stop_below_percent
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> PullTarget {
        let marks = Marks { stop_below_percent: 10.0, resume_above_percent: 15.0, stop_below_inodes_percent: 5.0, resume_above_inodes_percent: 10.0 };
        PullTarget { role: Role::Docker, path: PathBuf::from("/var/lib/docker"), marks }
    }

    fn stats(free_bytes: u64, free_inodes: u64) -> FilesystemStats {
        FilesystemStats { total_bytes: 1000, free_bytes, total_inodes: 100, free_inodes, device: 1 }
    }

    #[test]
    fn pull_fits_above_stop_mark() {
        let estimate = PullEstimate { compressed_bytes: 100, needed_bytes: 300, ..PullEstimate::default() };
        assert_eq!(shortage(&target(), &stats(400, 50), estimate), None);
    }

    #[test]
    fn pull_into_stop_mark_is_short() {
        let estimate = PullEstimate { compressed_bytes: 100, needed_bytes: 300, ..PullEstimate::default() };

        let message = shortage(&target(), &stats(350, 50), estimate).expect("300 B do not fit above a 100 B reserve in 350 B");

        assert!(message.contains("not enough space"), "{message}");
        assert!(message.contains("/var/lib/docker (docker)"), "{message}");
    }

    #[test]
    fn local_estimate_is_named_in_shortage() {
        let estimate = PullEstimate { compressed_bytes: 0, local_estimate_bytes: 600, needed_bytes: 600 };

        let message = shortage(&target(), &stats(400, 50), estimate).expect("600 B do not fit in 400 B");

        assert!(message.contains("estimated from local images"), "{message}");
        assert!(message.contains("600 B"), "{message}");
    }

    #[test]
    fn few_inodes_are_reported_as_inodes() {
        let message = shortage(&target(), &stats(1000, 2), PullEstimate::default()).expect("2 % free inodes are below the 5 % mark");
        assert!(message.contains("free inodes"), "{message}");
    }
}
