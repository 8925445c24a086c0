//! The real `docker compose` (v2), run as a command: validation of a staged
//! commit, and `up` with an override file that pins every image to a digest.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::driver::process::{self, CommandSpec, ProcessError};
use crate::machine::stack::{PlannedService, StackPlan};
use crate::model::Release;

/// Errors of Compose operations.
#[derive(Debug, thiserror::Error)]
pub enum ComposeError {
    /// A compose file named in the configuration is not in the commit.
    #[error("compose file {file} is missing from the commit")]
    MissingFile { file: String },

    /// A compose file is not valid YAML.
    #[error("{file} line {line} column {column}: invalid YAML: {message}")]
    InvalidYaml { file: String, line: usize, column: usize, message: String },

    /// Compose rejected the files.
    #[error("docker compose rejected the files: {message}")]
    Invalid { message: String },

    /// A service has no image; the agent pulls images and never builds them.
    #[error("service {service:?} has no image: the agent only runs images from a registry and never builds them")]
    NoImage { service: String },

    /// `docker compose config` printed something that is not its JSON model.
    #[error("could not read the output of docker compose config: {0}")]
    BadModel(String),

    /// The override file could not be written.
    #[error("cannot write the override file {path}: {source}")]
    WriteOverride { path: PathBuf, source: std::io::Error },

    /// Compose failed while starting the stack.
    #[error(transparent)]
    Command(#[from] ProcessError),
}

impl ComposeError {
    /// Tells whether the commit itself is at fault, so it must be rejected.
    pub fn is_rejection(&self) -> bool {
        matches!(
            self,
            ComposeError::MissingFile { .. }
                | ComposeError::InvalidYaml { .. }
                | ComposeError::Invalid { .. }
                | ComposeError::NoImage { .. }
                | ComposeError::BadModel(_)
        )
    }
}

/// The Compose project the agent manages.
#[derive(Debug, Clone)]
pub struct Compose {
    /// Program and leading arguments that run Compose v2, such as
    /// `["docker", "compose"]`.
    pub command: Vec<String>,
    pub project: String,
    /// Compose files relative to the project directory.
    pub files: Vec<String>,
    pub timeout: Duration,
    /// `DOCKER_HOST` for the compose command, when the engine is not at the
    /// default socket.
    pub docker_host: Option<String>,
}

impl Compose {
    fn command(&self, project_directory: &Path, overrides: &[&Path]) -> CommandSpec {
        let (program, leading) = self.command.split_first().expect("configuration validation rejects an empty compose_command");
        let mut spec = CommandSpec::new(program.clone(), self.timeout)
            .args(leading.iter().map(String::as_str))
            .args(["--ansi", "never", "--progress", "plain", "--project-name", &self.project])
            .arg("--project-directory")
            .arg(project_directory.as_os_str())
            .current_dir(project_directory);
        for file in &self.files {
            spec = spec.arg("--file").arg(project_directory.join(file).into_os_string());
        }
        for file in overrides {
            spec = spec.arg("--file").arg(file.as_os_str());
        }
        if let Some(host) = &self.docker_host {
            spec = spec.env("DOCKER_HOST", host.clone());
        }
        spec
    }

    /// Validates the compose files in `staged` (a checkout of one commit) and
    /// returns each service with the image it names.
    pub async fn plan(&self, staged: &Path) -> Result<StackPlan, ComposeError> {
        for file in &self.files {
            let path = staged.join(file);
            let text = std::fs::read_to_string(&path).map_err(|_| ComposeError::MissingFile { file: file.clone() })?;
            if let Err(error) = yaml_rust2::YamlLoader::load_from_str(&text) {
                return Err(ComposeError::InvalidYaml {
                    file: file.clone(),
                    line: error.marker().line(),
                    column: error.marker().col() + 1,
                    message: error.info().to_string(),
                });
            }
        }

        let spec = self.command(staged, &[]).args(["config", "--format", "json"]);
        let output = match process::run(&spec).await {
            Ok(output) => output,
            Err(ProcessError::Failed { stderr, .. }) => {
                let staged_prefix = format!("{}/", staged.display());
                let message = process::last_lines(&stderr, 4).replace(&staged_prefix, "");
                return Err(ComposeError::Invalid { message });
            }
            Err(other) => return Err(other.into()),
        };
        parse_model(&output.stdout)
    }

    /// Brings the stack up from `checkout` with `override_file` pinning the
    /// images. With `services` empty, every service is started. Otherwise
    /// only the listed ones are, with `--no-deps`, so a service left out is
    /// not started as a dependency of a listed one.
    pub async fn up(&self, checkout: &Path, override_file: &Path, services: &[String]) -> Result<(), ComposeError> {
        let mut spec = self.command(checkout, &[override_file]).args(["up", "--detach", "--remove-orphans", "--no-build", "--pull", "never"]);
        if !services.is_empty() {
            spec = spec.arg("--no-deps");
        }
        let spec = spec.args(services.iter().map(String::as_str));
        process::run(&spec).await?;
        Ok(())
    }

    /// Writes the override file that pins every service of `release` to its
    /// digest. It is JSON, which Compose reads as YAML, so no value needs
    /// YAML quoting. The file is written beside its final name and renamed.
    pub fn write_override(path: &Path, release: &Release) -> Result<(), ComposeError> {
        let mut services = serde_json::Map::new();
        for service in &release.services {
            let pinned = serde_json::json!({ "image": service.pinned_reference() });
            services.insert(service.service.clone(), pinned);
        }
        let document = serde_json::json!({ "services": services });
        let text = serde_json::to_string_pretty(&document).expect("a JSON value always serializes");

        let write = || -> std::io::Result<()> {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let temporary = path.with_extension("tmp");
            std::fs::write(&temporary, text.as_bytes())?;
            std::fs::File::open(&temporary)?.sync_all()?;
            std::fs::rename(&temporary, path)
        };
        write().map_err(|source| ComposeError::WriteOverride { path: path.to_path_buf(), source })
    }
}

/// Reads the services and images from `docker compose config --format json`.
fn parse_model(json: &str) -> Result<StackPlan, ComposeError> {
    let model: serde_json::Value = serde_json::from_str(json).map_err(|error| ComposeError::BadModel(error.to_string()))?;
    let services = model.get("services").and_then(serde_json::Value::as_object).ok_or_else(|| ComposeError::BadModel("the model has no services".into()))?;

    let mut plan = StackPlan::default();
    for (name, service) in services {
        let image = service.get("image").and_then(serde_json::Value::as_str);
        let Some(image) = image.filter(|image| !image.trim().is_empty()) else {
            return Err(ComposeError::NoImage { service: name.clone() });
        };
        plan.services.push(PlannedService { service: name.clone(), image: image.to_string() });
    }
    if plan.services.is_empty() {
        return Err(ComposeError::BadModel("the compose files define no services".into()));
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CommitId, Digest, ServiceImage};

    #[test]
    fn model_lists_services_and_images() {
        let json = r#"{"services": {"web": {"image": "reg:5000/web:1"}, "db": {"image": "reg:5000/db:2"}}}"#;

        let plan = parse_model(json).unwrap();

        let names: Vec<&str> = plan.services.iter().map(|service| service.service.as_str()).collect();
        assert_eq!(names, vec!["db", "web"]);
        assert_eq!(plan.services[1].image, "reg:5000/web:1");
    }

    #[test]
    fn service_without_image_is_rejected() {
        let json = r#"{"services": {"app": {"build": {"context": "."}}}}"#;

        let error = parse_model(json).unwrap_err();

        assert!(matches!(error, ComposeError::NoImage { ref service } if service == "app"));
        assert!(error.is_rejection());
    }

    #[test]
    fn override_pins_digests() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("pinned.json");
        let digest = Digest([7; 32]);
        let release =
            Release { commit: CommitId([1; 20]), services: vec![ServiceImage { service: "web".into(), image: "127.0.0.1:5000/web:v2".into(), digest }] };

        Compose::write_override(&path, &release).unwrap();

        let written: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(written["services"]["web"]["image"], format!("127.0.0.1:5000/web@{digest}"));
    }

    #[tokio::test]
    async fn invalid_yaml_names_file_and_line() {
        let directory = tempfile::tempdir().unwrap();
        std::fs::write(directory.path().join("compose.yaml"), "services:\n  web:\n    image: busybox\n   command: [x\n").unwrap();
        let compose = Compose {
            command: vec!["docker".into(), "compose".into()],
            project: "unit".into(),
            files: vec!["compose.yaml".into()],
            timeout: Duration::from_secs(30),
            docker_host: None,
        };

        let error = compose.plan(directory.path()).await.unwrap_err();

        assert!(matches!(error, ComposeError::InvalidYaml { line: 4, .. }), "{error}");
        assert!(error.to_string().starts_with("compose.yaml line 4"), "{error}");
    }
}
