//! `autoupdate factory capture`: stores the known-good stack as the factory
//! material, so a later factory reset brings exactly that stack back.

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::credentials::Credentials;
use crate::driver::docker::Engine;
use crate::driver::factory::material::{self, FactoryImage, Manifest, MaterialError};
use crate::driver::git::GitMirror;
use crate::driver::git_auth::GitAccess;
use crate::journal::Journal;

/// Folder inside the factory directory where a capture writes before it
/// swaps the material in.
const STAGING_DIRECTORY: &str = ".capture";

/// Errors of capturing the factory material.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("the configuration has no [stack] section; the factory material is the stack's known-good commit")]
    NoStack,
    #[error("cannot read the journal in {}: {source}", directory.display())]
    Journal { directory: PathBuf, source: crate::journal::JournalError },
    #[error("the journal in {} has no known-good commit yet; let the agent apply a commit and pass its health gate first", directory.display())]
    NoKnownGood { directory: PathBuf },
    #[error("cannot prepare git access: {0}")]
    Access(String),
    #[error("cannot connect to the Docker engine: {0}")]
    Engine(String),
    #[error("cannot write the compose files of commit {commit}: {reason}")]
    Stage { commit: String, reason: String },
    #[error("image {image} of service {service} is not in the engine; the agent keeps it with a keep-tag, so check that the agent has run this commit")]
    ImageMissing { service: String, image: String },
    #[error(transparent)]
    Material(#[from] MaterialError),
}

/// Writes the material for the known-good commit into a staging folder
/// inside the factory directory, then swaps it in, so a failed capture
/// leaves the old material as it was. The factory directory itself is never
/// renamed, because it is often a bind mount.
pub async fn capture(config: &Config) -> Result<Manifest, CaptureError> {
    let stack = config.stack.as_ref().ok_or(CaptureError::NoStack)?;
    let journal_directory = &config.journal.directory;
    let journal = Journal::open_read_only(journal_directory).map_err(|source| CaptureError::Journal { directory: journal_directory.clone(), source })?;
    let known_good = journal
        .state()
        .stack_memory
        .as_ref()
        .and_then(|memory| memory.known_good.clone())
        .ok_or_else(|| CaptureError::NoKnownGood { directory: journal_directory.clone() })?;
    drop(journal);

    let credentials = Credentials::load(config).map_err(|error| CaptureError::Access(error.to_string()))?;
    let access = GitAccess::prepare(&credentials.git, &stack.repository, &config.state_directory().join("ssh"))
        .map_err(|error| CaptureError::Access(error.to_string()))?;
    let git = GitMirror::for_stack(config, stack, access);
    let engine = Engine::connect(config.docker.host.as_deref(), None).await.map_err(|error| CaptureError::Engine(error.to_string()))?;

    let directory = config.factory_directory();
    let staging = directory.join(STAGING_DIRECTORY);
    remove_directory(&staging)?;
    std::fs::create_dir_all(staging.join(material::IMAGES_DIRECTORY)).map_err(|source| MaterialError::Io {
        action: "create",
        path: staging.clone(),
        source,
    })?;

    let commit = known_good.commit.to_string();
    git.stage(known_good.commit, &staging.join(material::COMPOSE_DIRECTORY))
        .await
        .map_err(|error| CaptureError::Stage { commit: commit.clone(), reason: error.to_string() })?;

    let mut services = Vec::new();
    for service in &known_good.services {
        let pinned = service.pinned_reference();
        if !engine.has_image(&pinned).await {
            return Err(CaptureError::ImageMissing { service: service.service.clone(), image: pinned });
        }
        let tag = material::factory_tag(&stack.project, &service.service);
        let file_name = tag.rsplit_once(':').map_or("image", |(_, name)| name).to_string();
        let archive = format!("{}/{file_name}.tar", material::IMAGES_DIRECTORY);
        tracing::info!(service = %service.service, image = %pinned, archive, "saving factory image");
        material::save_image(&engine, &pinned, &tag, &staging.join(&archive)).await?;
        services.push(FactoryImage { service: service.service.clone(), image: service.image.clone(), digest: service.digest.to_string(), tag, archive });
    }

    let manifest = Manifest { project: stack.project.clone(), compose_files: stack.compose_files.clone(), commit, services };
    let manifest_path = staging.join(material::MANIFEST_FILE);
    let text = serde_json::to_string_pretty(&manifest).expect("the manifest serializes");
    std::fs::write(&manifest_path, text).map_err(|source| MaterialError::Io { action: "write", path: manifest_path.clone(), source })?;
    material::read_manifest(&staging)?;

    swap_in(&staging, &directory)?;
    Ok(manifest)
}

fn remove_directory(path: &Path) -> Result<(), MaterialError> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(MaterialError::Io { action: "remove", path: path.to_path_buf(), source }),
    }
}

/// Moves the staged material into `directory`. The old manifest goes first
/// and the new one last, so a capture cut short leaves no manifest: a reset
/// then reports missing material instead of mixing two captures.
fn swap_in(staging: &Path, directory: &Path) -> Result<(), MaterialError> {
    let manifest = directory.join(material::MANIFEST_FILE);
    match std::fs::remove_file(&manifest) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(MaterialError::Io { action: "remove", path: manifest, source }),
    }
    sync_directory(directory);

    for name in [material::COMPOSE_DIRECTORY, material::IMAGES_DIRECTORY, material::MANIFEST_FILE] {
        let target = directory.join(name);
        if name != material::MANIFEST_FILE {
            remove_directory(&target)?;
        }
        let source_path = staging.join(name);
        std::fs::rename(&source_path, &target).map_err(|source| MaterialError::Io { action: "move into place", path: source_path, source })?;
        sync_directory(directory);
    }
    remove_directory(staging)
}

/// Makes renames in `directory` durable. A failure only risks losing the
/// new material in a power cut, and the capture can be run again.
fn sync_directory(directory: &Path) {
    if let Ok(handle) = std::fs::File::open(directory) {
        let _ = handle.sync_all();
    }
}
