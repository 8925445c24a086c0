//! The factory material on the reserved partition: the compose files of a
//! known-good commit and its images as `docker save` archives.
//!
//! ```text
//! <factory directory>/
//!   manifest.json            project, compose files, commit, one entry per service
//!   compose/                 the commit's files, as git stored them
//!   compose/factory.override.json   pins each service to its factory tag
//!   images/<service>.tar     `docker save` of the image, tagged autoupdate-factory/<project>:<service>
//! ```
//!
//! The images carry a factory tag because `docker load` restores tags but not
//! registry digests: Compose then finds every image without a registry.

use std::path::{Path, PathBuf};

use bollard::query_parameters::{ImportImageOptions, TagImageOptionsBuilder};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::driver::docker::Engine;

/// Repository of the tags that name the factory images.
pub const FACTORY_REPOSITORY: &str = "autoupdate-factory";
pub const MANIFEST_FILE: &str = "manifest.json";
pub const COMPOSE_DIRECTORY: &str = "compose";
pub const IMAGES_DIRECTORY: &str = "images";
pub const OVERRIDE_FILE: &str = "factory.override.json";

/// Contents of `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Compose project the factory stack runs as.
    pub project: String,
    /// Compose files, relative to `compose/`.
    pub compose_files: Vec<String>,
    /// The known-good commit the material was captured from.
    pub commit: String,
    pub services: Vec<FactoryImage>,
}

/// One service's image in the material.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FactoryImage {
    pub service: String,
    /// The reference the compose file wrote, for the record.
    pub image: String,
    /// The registry digest it ran with.
    pub digest: String,
    /// The factory tag, such as `autoupdate-factory/eventpi:web`.
    pub tag: String,
    /// The archive, relative to the factory directory.
    pub archive: String,
}

/// Errors of reading, writing or loading the factory material.
#[derive(Debug, thiserror::Error)]
pub enum MaterialError {
    #[error("no factory material in {}: {MANIFEST_FILE} is missing; store it with `autoupdate factory capture --config FILE`", directory.display())]
    Missing { directory: PathBuf },
    #[error("invalid factory manifest {}: {reason}; capture the material again", path.display())]
    InvalidManifest { path: PathBuf, reason: String },
    #[error("cannot {action} {}: {source}", path.display())]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("Docker engine failed to {action} {target}: {source}")]
    Engine { action: &'static str, target: String, source: bollard::errors::Error },
    #[error("loading {} did not give the image {tag}; the archive may be damaged, so capture the material again", archive.display())]
    ImageNotLoaded { archive: PathBuf, tag: String },
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> MaterialError + 'a {
    move |source| MaterialError::Io { action, path: path.to_path_buf(), source }
}

/// Returns the factory tag of one service. Docker tags allow letters,
/// digits, `_`, `.` and `-`.
pub fn factory_tag(project: &str, service: &str) -> String {
    let service: String =
        service.chars().map(|character| if character.is_ascii_alphanumeric() || "_.-".contains(character) { character } else { '_' }).take(120).collect();
    format!("{FACTORY_REPOSITORY}/{project}:{service}")
}

/// Reads and checks the manifest in `directory`.
pub fn read_manifest(directory: &Path) -> Result<Manifest, MaterialError> {
    let path = directory.join(MANIFEST_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Err(MaterialError::Missing { directory: directory.to_path_buf() }),
        Err(source) => return Err(MaterialError::Io { action: "read", path, source }),
    };
    let manifest: Manifest = serde_json::from_str(&text).map_err(|error| MaterialError::InvalidManifest { path: path.clone(), reason: error.to_string() })?;

    let invalid = |reason: String| MaterialError::InvalidManifest { path: path.clone(), reason };
    if manifest.compose_files.is_empty() {
        return Err(invalid("it lists no compose files".into()));
    }
    for file in &manifest.compose_files {
        if !directory.join(COMPOSE_DIRECTORY).join(file).is_file() {
            return Err(invalid(format!("compose file {file} is missing from {COMPOSE_DIRECTORY}/")));
        }
    }
    for image in &manifest.services {
        let archive = directory.join(&image.archive);
        let inside = Path::new(&image.archive).components().all(|part| matches!(part, std::path::Component::Normal(_)));
        if !inside || !archive.is_file() {
            return Err(invalid(format!("image archive {} of service {} is missing", image.archive, image.service)));
        }
    }
    Ok(manifest)
}

/// Writes the override file that points every service at its factory tag.
pub fn write_override(directory: &Path, manifest: &Manifest) -> Result<PathBuf, MaterialError> {
    let mut services = serde_json::Map::new();
    for image in &manifest.services {
        services.insert(image.service.clone(), serde_json::json!({ "image": image.tag, "pull_policy": "never" }));
    }
    let text = serde_json::to_string_pretty(&serde_json::json!({ "services": services })).expect("a JSON map serializes");
    let path = directory.join(COMPOSE_DIRECTORY).join(OVERRIDE_FILE);
    std::fs::write(&path, text).map_err(io_error("write", &path))?;
    Ok(path)
}

/// Loads every image archive of the manifest into the engine and checks
/// that its factory tag is there afterwards. Loading an image the engine
/// has already changes nothing.
pub async fn load_images(engine: &Engine, directory: &Path, manifest: &Manifest) -> Result<(), MaterialError> {
    for image in &manifest.services {
        let archive = directory.join(&image.archive);
        let file = tokio::fs::File::open(&archive).await.map_err(io_error("open", &archive))?;
        tracing::info!(machine = "factory-reset", archive = %archive.display(), "loading factory image");

        let options = ImportImageOptions { quiet: true, ..Default::default() };
        let mut stream = engine.api().import_image_stream(options, read_chunks(file), None);
        while let Some(item) = stream.next().await {
            let info = item.map_err(|source| MaterialError::Engine { action: "load", target: archive.display().to_string(), source })?;
            if let Some(error) = info.error_detail.and_then(|detail| detail.message) {
                return Err(MaterialError::Engine {
                    action: "load",
                    target: archive.display().to_string(),
                    source: bollard::errors::Error::DockerStreamError { error },
                });
            }
        }
        if !engine.has_image(&image.tag).await {
            return Err(MaterialError::ImageNotLoaded { archive, tag: image.tag.clone() });
        }
    }
    Ok(())
}

/// Size of the pieces an archive is sent to the engine in, so a large image
/// never has to fit in memory.
const CHUNK_BYTES: usize = 256 * 1024;

/// Returns the contents of `file` as a stream of chunks. A read error ends
/// the stream after it is passed on.
fn read_chunks(file: tokio::fs::File) -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> {
    futures_util::stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        let mut buffer = vec![0u8; CHUNK_BYTES];
        match file.read(&mut buffer).await {
            Ok(0) => None,
            Ok(length) => {
                buffer.truncate(length);
                Some((Ok(bytes::Bytes::from(buffer)), Some(file)))
            }
            Err(error) => Some((Err(error), None)),
        }
    })
}

/// Tags `source` with the factory tag `tag` and writes it as a `docker
/// save` archive to `archive`.
pub async fn save_image(engine: &Engine, source: &str, tag: &str, archive: &Path) -> Result<(), MaterialError> {
    let (repository, tag_name) = tag.rsplit_once(':').expect("factory_tag always returns repository:tag");
    let options = TagImageOptionsBuilder::default().repo(repository).tag(tag_name).build();
    engine.api().tag_image(source, Some(options)).await.map_err(|error| MaterialError::Engine { action: "tag", target: source.to_string(), source: error })?;

    let mut file = tokio::fs::File::create(archive).await.map_err(io_error("create", archive))?;
    let mut stream = engine.api().export_image(tag);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|error| MaterialError::Engine { action: "save", target: tag.to_string(), source: error })?;
        file.write_all(&chunk).await.map_err(io_error("write", archive))?;
    }
    file.sync_all().await.map_err(io_error("sync", archive))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn material(directory: &Path) -> Manifest {
        std::fs::create_dir_all(directory.join(COMPOSE_DIRECTORY)).unwrap();
        std::fs::create_dir_all(directory.join(IMAGES_DIRECTORY)).unwrap();
        std::fs::write(directory.join("compose/compose.yaml"), "services: {}\n").unwrap();
        std::fs::write(directory.join("images/web.tar"), "x").unwrap();
        let manifest = Manifest {
            project: "eventpi".into(),
            compose_files: vec!["compose.yaml".into()],
            commit: "ab".repeat(20),
            services: vec![FactoryImage {
                service: "web".into(),
                image: "registry:5000/web:1".into(),
                digest: format!("sha256:{}", "cd".repeat(32)),
                tag: factory_tag("eventpi", "web"),
                archive: "images/web.tar".into(),
            }],
        };
        std::fs::write(directory.join(MANIFEST_FILE), serde_json::to_string(&manifest).unwrap()).unwrap();
        manifest
    }

    #[test]
    fn manifest_round_trips() {
        let directory = tempfile::tempdir().unwrap();
        let written = material(directory.path());

        let read = read_manifest(directory.path()).unwrap();

        assert_eq!(read, written);
    }

    #[test]
    fn missing_material_names_capture_command() {
        let directory = tempfile::tempdir().unwrap();

        let error = read_manifest(directory.path()).unwrap_err().to_string();

        assert!(error.contains("autoupdate factory capture"), "{error}");
        assert!(error.contains(&directory.path().display().to_string()), "{error}");
    }

    #[test]
    fn missing_archive_is_invalid() {
        let directory = tempfile::tempdir().unwrap();
        material(directory.path());
        std::fs::remove_file(directory.path().join("images/web.tar")).unwrap();

        let error = read_manifest(directory.path()).unwrap_err().to_string();

        assert!(error.contains("images/web.tar"), "{error}");
    }

    #[test]
    fn archive_outside_directory_is_invalid() {
        let directory = tempfile::tempdir().unwrap();
        let mut manifest = material(directory.path());
        manifest.services[0].archive = "../web.tar".into();
        std::fs::write(directory.path().join(MANIFEST_FILE), serde_json::to_string(&manifest).unwrap()).unwrap();

        let error = read_manifest(directory.path()).unwrap_err().to_string();

        assert!(error.contains("../web.tar"), "{error}");
    }

    #[test]
    fn factory_tag_replaces_odd_characters() {
        assert_eq!(factory_tag("eventpi", "web/api:1"), "autoupdate-factory/eventpi:web_api_1");
    }

    #[test]
    fn override_points_services_at_factory_tags() {
        let directory = tempfile::tempdir().unwrap();
        let manifest = material(directory.path());

        let path = write_override(directory.path(), &manifest).unwrap();

        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.contains("autoupdate-factory/eventpi:web"), "{text}");
        assert!(text.contains("\"never\""), "{text}");
    }
}
