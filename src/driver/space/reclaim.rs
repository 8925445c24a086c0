//! Reclaiming Docker space, one step at a time: stopped containers of no
//! managed stack, dangling images, unused images, and the build cache.
//!
//! Never removed: volumes and any container of the managed Compose project,
//! because a stopped database is still data. The recorder's container, images
//! used by any container and images with a keep-tag (`autoupdate-keep/...`)
//! stay too. So do the images of the running, known-good or pending release,
//! and anything with the configured keep label. bollard 0.21 has no
//! system-prune call, and the image prune call would also remove untagged
//! images that a digest pins, so every removal here is one API call on one
//! object.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use bollard::query_parameters::{
    ListContainersOptionsBuilder, ListImagesOptionsBuilder, PruneBuildOptionsBuilder, RemoveContainerOptionsBuilder, RemoveImageOptionsBuilder,
};

use crate::driver::docker::{Engine, KEEP_REPOSITORY, PROJECT_LABEL};
use crate::runtime::SharedJournal;

/// Errors that end a reclaim run early.
#[derive(Debug, thiserror::Error)]
pub enum ReclaimError {
    /// A listing call failed, so the run cannot tell what is safe to remove.
    #[error("cannot {call} while reclaiming space: {source}")]
    Api { call: &'static str, source: bollard::errors::Error },
}

/// Limits on what reclaiming removes.
#[derive(Debug, Clone, Default)]
pub struct ReclaimSettings {
    /// The managed Compose project; its containers are never removed.
    pub project: String,
    /// `key` or `key=value`: only objects with this label are removed.
    pub only_label: Option<String>,
    /// Objects with this label key are never removed.
    pub keep_label: Option<String>,
    /// Container names that are never removed, such as the recorder's.
    pub kept_containers: Vec<String>,
}

/// Bytes freed by one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepResult {
    pub step: &'static str,
    pub removed: usize,
    pub freed_bytes: u64,
}

/// Removes what Docker can safely give back. Shared by the guard and the
/// pull check; runs never overlap.
#[derive(Clone)]
pub struct Reclaimer {
    engine: Engine,
    journal: SharedJournal,
    settings: ReclaimSettings,
    running: Arc<tokio::sync::Mutex<()>>,
}

impl Reclaimer {
    pub fn new(engine: Engine, journal: SharedJournal, settings: ReclaimSettings) -> Reclaimer {
        Reclaimer { engine, journal, settings, running: Arc::default() }
    }

    /// Runs every step and returns the bytes each freed. Each step is logged
    /// with what it removed.
    pub async fn run(&self) -> Result<Vec<StepResult>, ReclaimError> {
        let _running = self.running.lock().await;
        let mut results = Vec::new();

        results.push(self.remove_stopped_containers().await?);
        let (dangling, unused) = self.remove_images().await?;
        results.push(dangling);
        results.push(unused);
        if let Some(cache) = self.prune_build_cache().await {
            results.push(cache);
        }

        for result in &results {
            tracing::info!(
                machine = "space-guard",
                step = result.step,
                removed = result.removed,
                freed_bytes = result.freed_bytes,
                freed = %format_bytes(result.freed_bytes),
                "reclaim step finished"
            );
        }
        Ok(results)
    }

    fn label_filter(&self) -> HashMap<String, Vec<String>> {
        match &self.settings.only_label {
            Some(label) => HashMap::from([("label".to_string(), vec![label.clone()])]),
            None => HashMap::new(),
        }
    }

    fn kept_by_label(&self, labels: &HashMap<String, String>) -> bool {
        self.settings.keep_label.as_ref().is_some_and(|key| labels.contains_key(key))
    }

    async fn remove_stopped_containers(&self) -> Result<StepResult, ReclaimError> {
        let mut filters = self.label_filter();
        filters.insert("status".into(), vec!["exited".into(), "created".into(), "dead".into()]);
        let options = ListContainersOptionsBuilder::default().all(true).size(true).filters(&filters).build();
        let containers =
            self.engine.api().list_containers(Some(options)).await.map_err(|source| ReclaimError::Api { call: "list stopped containers", source })?;

        let mut result = StepResult { step: "stopped containers", removed: 0, freed_bytes: 0 };
        for container in containers {
            let labels = container.labels.clone().unwrap_or_default();
            let names: Vec<String> = container.names.clone().unwrap_or_default().iter().map(|name| name.trim_start_matches('/').to_string()).collect();
            let managed = labels.get(PROJECT_LABEL).is_some_and(|project| *project == self.settings.project);
            let kept = names.iter().any(|name| self.settings.kept_containers.contains(name));
            if managed || kept || self.kept_by_label(&labels) {
                continue;
            }
            let Some(id) = container.id else { continue };
            // Volumes stay: `v` is false, so even anonymous volumes are kept.
            let options = RemoveContainerOptionsBuilder::default().v(false).force(false).build();
            match self.engine.api().remove_container(&id, Some(options)).await {
                Ok(()) => {
                    tracing::debug!(machine = "space-guard", container = %names.join(","), "removed a stopped container");
                    result.removed += 1;
                    result.freed_bytes += container.size_rw.unwrap_or(0).max(0) as u64;
                }
                Err(error) => tracing::debug!(machine = "space-guard", container = %names.join(","), %error, "stopped container not removed"),
            }
        }
        Ok(result)
    }

    /// Returns the image ids nothing may remove: those of every container,
    /// and those of the running, known-good and pending releases.
    async fn protected_images(&self) -> Result<BTreeSet<String>, ReclaimError> {
        let options = ListContainersOptionsBuilder::default().all(true).build();
        let containers = self.engine.api().list_containers(Some(options)).await.map_err(|source| ReclaimError::Api { call: "list containers", source })?;
        let mut protected: BTreeSet<String> = containers.into_iter().filter_map(|container| container.image_id).collect();

        let references: Vec<String> = {
            let journal = self.journal.lock().expect("no code panics while holding the journal lock");
            let memory = journal.state().stack_memory.clone().unwrap_or_default();
            let pending = memory.attempt.and_then(|attempt| attempt.pulled);
            [memory.running, memory.known_good, pending]
                .into_iter()
                .flatten()
                .flat_map(|release| release.services)
                .map(|service| service.pinned_reference())
                .collect()
        };
        for reference in references {
            if let Ok(image) = self.engine.api().inspect_image(&reference).await {
                protected.extend(image.id);
            }
        }
        Ok(protected)
    }

    /// Removes dangling images, then unused tagged ones, and returns both steps.
    async fn remove_images(&self) -> Result<(StepResult, StepResult), ReclaimError> {
        let protected = self.protected_images().await?;
        let filters = self.label_filter();
        let options = ListImagesOptionsBuilder::default().all(false).shared_size(true).filters(&filters).build();
        let images = self.engine.api().list_images(Some(options)).await.map_err(|source| ReclaimError::Api { call: "list images", source })?;

        // A parent keeps its layers for its children, so removing its tags
        // frees nothing and only loses the tags.
        let every = ListImagesOptionsBuilder::default().all(true).build();
        let all_images = self.engine.api().list_images(Some(every)).await.map_err(|source| ReclaimError::Api { call: "list images", source })?;
        let parents: BTreeSet<String> = all_images.into_iter().map(|image| image.parent_id).filter(|parent| !parent.is_empty()).collect();

        let mut dangling = StepResult { step: "dangling images", removed: 0, freed_bytes: 0 };
        let mut unused = StepResult { step: "unused images", removed: 0, freed_bytes: 0 };
        for image in images {
            let tags: Vec<&String> = image.repo_tags.iter().filter(|tag| tag.as_str() != "<none>:<none>").collect();
            let keep_tagged = tags.iter().any(|tag| tag.starts_with(&format!("{KEEP_REPOSITORY}/")));
            if keep_tagged || protected.contains(&image.id) || parents.contains(&image.id) || self.kept_by_label(&image.labels) {
                continue;
            }

            let mut references: Vec<String> = tags.iter().map(|tag| tag.to_string()).collect();
            references.extend(image.repo_digests.iter().filter(|digest| !digest.starts_with("<none>")).cloned());
            if !self.remove_image(&image.id, &references).await {
                continue;
            }
            // Layers shared with other images stay, so only the image's own part is freed.
            let own = if image.shared_size >= 0 { image.size - image.shared_size } else { image.size };
            let step = if tags.is_empty() { &mut dangling } else { &mut unused };
            step.removed += 1;
            step.freed_bytes += own.max(0) as u64;
        }
        Ok((dangling, unused))
    }

    /// Removes every reference of one image without force, then the image
    /// itself, and returns whether it is gone. Docker refuses each removal
    /// while a container uses the image, even one created after the listing.
    async fn remove_image(&self, id: &str, references: &[String]) -> bool {
        let options = || RemoveImageOptionsBuilder::default().force(false).noprune(false).build();
        for reference in references {
            if let Err(error) = self.engine.api().remove_image(reference, Some(options()), None).await {
                tracing::debug!(machine = "space-guard", image = %reference, %error, "image reference not removed");
            }
        }
        match self.engine.api().inspect_image(id).await {
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => true,
            Err(error) => {
                tracing::debug!(machine = "space-guard", image = id, %error, "cannot tell whether the image is gone");
                false
            }
            Ok(_) => match self.engine.api().remove_image(id, Some(options()), None).await {
                Ok(_) => {
                    tracing::debug!(machine = "space-guard", image = id, "removed an image");
                    true
                }
                Err(error) => {
                    tracing::debug!(machine = "space-guard", image = id, %error, "image not removed");
                    false
                }
            },
        }
    }

    /// Prunes the whole unused build cache, unless `only_label` limits
    /// reclaiming: build cache entries carry no labels.
    async fn prune_build_cache(&self) -> Option<StepResult> {
        if self.settings.only_label.is_some() {
            return None;
        }
        let options = PruneBuildOptionsBuilder::default().all(true).build();
        match self.engine.api().prune_build(Some(options)).await {
            Ok(response) => Some(StepResult {
                step: "build cache",
                removed: response.caches_deleted.map_or(0, |deleted| deleted.len()),
                freed_bytes: response.space_reclaimed.unwrap_or(0).max(0) as u64,
            }),
            Err(error) => {
                tracing::warn!(machine = "space-guard", %error, "cannot prune the build cache");
                None
            }
        }
    }
}

/// Formats a byte count with a binary unit, such as `1.5 GiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_get_binary_units() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }
}
