//! The `autoupdate` command line.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use eventpi_autoupdate::config::{Config, ConfigError, HostPatchConfig, LogFormat};
use eventpi_autoupdate::control::client::{self, ClientError, Endpoint};
use eventpi_autoupdate::credentials::Credentials;
use eventpi_autoupdate::driver::host::HostDriver;
use eventpi_autoupdate::journal::Journal;
use eventpi_autoupdate::machine::host::{HostOutcome, HostState};
use eventpi_autoupdate::machine::{MachineKind, TABLES};
use eventpi_autoupdate::runtime::Progress;
use eventpi_autoupdate::seams::Seams;
use eventpi_autoupdate::status::{self, AgentStatus};
use eventpi_autoupdate::{agent, diagram, report};

/// Keeps a headless Raspberry Pi up to date: its Compose stack from a git
/// branch, the agent itself, the host, and its free disk space.
#[derive(Debug, Parser)]
#[command(name = "autoupdate", version, propagate_version = true)]
struct Cli {
    /// Log format: human-readable lines or one JSON object per line. Default:
    /// the configuration's agent.log_format, or human.
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormatArgument>,

    #[command(subcommand)]
    command: Command,
}

/// Where to find the running agent.
#[derive(Debug, clap::Args)]
struct Target {
    /// Configuration file: its control.socket and journal.directory are used.
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Control socket of the running agent. Default: control.socket of
    /// --config, or /run/eventpi/autoupdate.sock.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Press {
    Short,
    Long,
}

#[derive(Debug, Subcommand)]
enum FactoryAction {
    /// Stores the known-good stack as the factory material: the compose
    /// files at the known-good commit and its pinned images as `docker save`
    /// archives, in panel.factory_directory (default: `factory` beside
    /// journal.directory). Replaces earlier material only once the new one
    /// is complete.
    Capture {
        /// Configuration file (TOML).
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormatArgument {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the agent in the foreground until SIGTERM or SIGINT.
    ///
    /// The agent polls the device branch every stack.poll_interval (default
    /// 60s, jittered by stack.poll_jitter_percent, default 10 %), applies new
    /// commits, and keeps the device on its last known-good commit. On SIGTERM
    /// or SIGINT it stops the command in progress and exits. The journal is
    /// synced after every record, so the interrupted step runs again at the
    /// next start.
    Run {
        /// Configuration file (TOML).
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },

    /// Patches the Docker host once over SSH and exits.
    ///
    /// Resumes the attempt that the journal shows in progress, or starts a
    /// new one. An attempt runs preflight checks, apt-get update and apt-get
    /// full-upgrade as jobs detached on the host, reboots when the host needs
    /// it (at most host.max_reboots times), and checks the new boot and kernel. Needs the
    /// [journal] and [host] sections. It takes the journal's lease, so an
    /// agent running on the same journal stops acting; stop the agent first.
    ///
    /// Exit status: 0 when the host is patched, 75 when another process held
    /// the dpkg lock for all of host.dpkg_lock_wait, 1 when the attempt failed
    /// (the reason is printed and kept in the journal).
    HostPatch {
        /// Configuration file (TOML).
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },

    /// Validates a configuration file and the credentials files it names:
    /// exit status 0, or every problem with its key and line. A file with [host] and without [stack] is valid for
    /// host-patch only.
    CheckConfig {
        /// Configuration file (TOML).
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },

    /// Prints the current state of every machine, the last known-good commit
    /// with its image digests, and the last error.
    ///
    /// Asks the running agent through its control socket. When the agent does
    /// not respond, reads the journal instead. With --journal alone, reads the
    /// journal without asking the agent.
    Status {
        #[command(flatten)]
        target: Target,

        /// Journal directory to read when the agent does not answer. Default:
        /// journal.directory of --config.
        #[arg(long, value_name = "DIR")]
        journal: Option<PathBuf>,

        /// Prints the status as JSON.
        #[arg(long)]
        json: bool,
    },

    /// Asks the running agent to check for an update now and shows the
    /// progress until the run ends. On a terminal, image pulls show a
    /// progress bar; otherwise every line is plain text. The exit status is 1
    /// when the run failed or rolled back.
    UpdateNow {
        #[command(flatten)]
        target: Target,

        /// Check the stack's branch (the default).
        #[arg(long, group = "process")]
        stack: bool,

        /// Check for a new image of the agent itself.
        #[arg(long = "self", group = "process")]
        self_update: bool,

        /// Patch the host.
        #[arg(long, group = "process")]
        host: bool,
    },

    /// Presses the panel button of the running agent. A short press checks
    /// for an update now. A long press is held past panel.long_hold and
    /// released inside the confirmation window, so it starts the factory
    /// reset.
    Button {
        #[command(flatten)]
        target: Target,

        /// `short` or `long`.
        #[arg(value_enum)]
        press: Press,
    },

    /// Prints every transition in the journal in order: time (UTC), machine,
    /// from, event, to.
    Replay {
        /// Journal directory (journal.directory in the configuration).
        #[arg(long, value_name = "DIR")]
        journal: PathBuf,

        /// Prints a JSON array instead of text.
        #[arg(long)]
        json: bool,
    },

    /// Manages the factory material that a factory reset restores.
    Factory {
        #[command(subcommand)]
        action: FactoryAction,
    },

    /// Prints the DOT diagram of a machine, generated from its transition
    /// list.
    Diagram {
        /// Machine name; default: every machine, one after the other.
        #[arg(value_name = "MACHINE")]
        machine: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", error_text(&error));
            ExitCode::FAILURE
        }
    }
}

/// Joins an error and its causes with ": ", leaving out a cause whose text
/// the message before it already contains. Most of the agent's errors quote
/// their source in their own message.
fn error_text(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run { config } => {
            limit_heap_growth();
            let config = Config::load(&config)?;
            init_logging(cli.log_format, Some(config.agent.log_format), &config.agent.log_level);
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("cannot start the async runtime")?;
            runtime.block_on(agent::run(config, shutdown_signal()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::HostPatch { config } => {
            let config = HostPatchConfig::load(&config)?;
            init_logging(cli.log_format, Some(config.agent.log_format), &config.agent.log_level);
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("cannot start the async runtime")?;
            runtime.block_on(host_patch(config))
        }
        Command::CheckConfig { file } => match Config::load(&file).map(|config| {
            let credentials = Credentials::load(&config);
            (config, credentials)
        }) {
            Ok((config, Ok(_))) => {
                for warning in &config.warnings {
                    eprintln!("warning: {}: {warning}", file.display());
                }
                println!("{}: valid", file.display());
                Ok(ExitCode::SUCCESS)
            }
            Ok((_, Err(error))) => {
                eprintln!("{}: {error}", file.display());
                Ok(ExitCode::FAILURE)
            }
            Err(error) if lacks_only_stack(&error) && HostPatchConfig::load(&file).is_ok() => {
                println!("{}: valid for host-patch; autoupdate run also needs a [stack] or [self_update] section", file.display());
                Ok(ExitCode::SUCCESS)
            }
            Err(error) => {
                eprintln!("{error}");
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Status { target, journal, json } => status(&target, journal, json),
        Command::UpdateNow { target, self_update, host, .. } => {
            let process = if self_update {
                "self"
            } else if host {
                "host"
            } else {
                "stack"
            };
            update_now(&target, process)
        }
        Command::Button { target, press } => {
            let (endpoint, _, _) = resolve(&target)?;
            let press = match press {
                Press::Short => "short",
                Press::Long => "long",
            };
            let body = serde_json::json!({ "press": press }).to_string();
            let answer = block_on(client::call(&endpoint, hyper::Method::POST, "/button", Some(body))).map_err(with_agent_hint)?;
            println!("{answer}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Replay { journal, json } => {
            let journal = Journal::open_read_only(&journal)?;
            let state = journal.state();
            if state.unknown_records > 0 {
                eprintln!("warning: skipped {} records with tags from a newer agent version", state.unknown_records);
            }
            if state.undecodable_records > 0 {
                eprintln!("warning: skipped {} records whose payload does not decode", state.undecodable_records);
            }
            if json {
                let entries = report::replay_entries(journal.state());
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                print!("{}", report::replay_text(journal.state()));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Factory { action: FactoryAction::Capture { config } } => {
            let config = Config::load(&config)?;
            init_logging(cli.log_format, Some(config.agent.log_format), &config.agent.log_level);
            let manifest = block_on(eventpi_autoupdate::driver::factory::capture::capture(&config))?;
            println!(
                "stored commit {} with {} image(s) as the factory material in {}",
                manifest.commit,
                manifest.services.len(),
                config.factory_directory().display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Diagram { machine } => {
            let tables: Vec<_> = match machine {
                None => TABLES.to_vec(),
                Some(name) => {
                    let kind = MachineKind::from_name(&name).with_context(|| format!("unknown machine {name:?}; the machines are {}", machine_names()))?;
                    vec![kind.table().with_context(|| format!("machine {name} is not in this build"))?]
                }
            };
            for table in tables {
                print!("{}", diagram::to_dot(table));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Returns the control endpoint and the journal directory a command uses,
/// and the device name that a configuration file gives.
fn resolve(target: &Target) -> anyhow::Result<(Endpoint, Option<PathBuf>, Option<String>)> {
    let config = match &target.config {
        Some(path) => Some(Config::load(path)?),
        None => None,
    };
    let socket = target
        .socket
        .clone()
        .or_else(|| config.as_ref().map(|config| config.control.socket.clone()))
        .unwrap_or_else(|| PathBuf::from("/run/eventpi/autoupdate.sock"));
    let device = config.as_ref().and_then(|config| config.agent.name.clone());
    Ok((Endpoint::Unix(socket), config.map(|config| config.journal.directory), device))
}

/// Adds what to do to an error of a command that needs the running agent.
fn with_agent_hint(error: ClientError) -> anyhow::Error {
    match error {
        ClientError::Unreachable { .. } => {
            anyhow::anyhow!("{error}; start the agent, or pass --config FILE to use its control.socket, or --socket PATH")
        }
        other => other.into(),
    }
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a current-thread runtime always builds").block_on(future)
}

fn status(target: &Target, journal: Option<PathBuf>, json: bool) -> anyhow::Result<ExitCode> {
    let (endpoint, configured_journal, device) = resolve(target)?;
    let journal = journal.or(configured_journal);
    let live = if journal.is_some() && target.socket.is_none() && target.config.is_none() {
        None
    } else {
        match block_on(client::call(&endpoint, hyper::Method::GET, "/status", None)) {
            Ok(text) => Some(serde_json::from_str::<AgentStatus>(&text).context("the agent's status is not valid JSON")?),
            Err(error @ (ClientError::Unreachable { .. } | ClientError::TimedOut { .. })) => {
                if journal.is_none() {
                    anyhow::bail!("{error}; pass --journal DIR to read its journal, or --config FILE to use its control.socket and journal.directory");
                }
                eprintln!("note: {error}; reading the journal instead");
                None
            }
            Err(error) => return Err(error.into()),
        }
    };
    if let (Some(status), Some(directory)) = (&live, &journal) {
        let expected = directory.join(eventpi_autoupdate::journal::FILE_NAME);
        if Path::new(&status.journal.path) != expected {
            eprintln!(
                "warning: the agent at {endpoint} writes the journal {}, not {}; another agent may use this socket, so give each agent its own control.socket",
                status.journal.path,
                expected.display()
            );
        }
    }
    let status = match live {
        Some(status) => status,
        None => {
            let directory = journal.context("the agent does not answer and no journal directory is known: pass --journal or --config")?;
            let journal = Journal::open_read_only(&directory)?;
            // Without agent.name the agent names the device by its host name.
            let device = device.unwrap_or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string());
            status::from_journal(&journal, &device)
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", status::render(&status));
    }
    Ok(ExitCode::SUCCESS)
}

fn update_now(target: &Target, process: &str) -> anyhow::Result<ExitCode> {
    let (endpoint, _, _) = resolve(target)?;
    let terminal = std::io::stdout().is_terminal();
    let mut printer = ProgressPrinter::new(terminal);
    let body = serde_json::json!({ "process": process }).to_string();
    block_on(client::stream_lines(&endpoint, "/update-now", body, |line| printer.line(line))).map_err(with_agent_hint)?;
    printer.finish();
    Ok(if printer.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Shows the `update-now` stream: a bar per image pull on a terminal, plain
/// lines otherwise.
struct ProgressPrinter {
    terminal: bool,
    bars: std::collections::HashMap<String, indicatif::ProgressBar>,
    printed_tenths: std::collections::HashMap<String, u64>,
    ok: bool,
}

impl ProgressPrinter {
    fn new(terminal: bool) -> Self {
        ProgressPrinter { terminal, bars: Default::default(), printed_tenths: Default::default(), ok: true }
    }

    fn line(&mut self, line: &str) {
        let event = match serde_json::from_str::<Progress>(line) {
            Ok(event) => event,
            Err(_) => {
                println!("{line}");
                return;
            }
        };
        match event {
            Progress::Step { machine, from, event, to, commit } => {
                let commit = commit.map(|commit| format!(" (commit {commit})")).unwrap_or_default();
                self.println(format!("{machine}: {from} --{event}--> {to}{commit}"));
            }
            Progress::Pull { image, current, total } => self.pull(image, current, total),
            Progress::Finished { machine, outcome, ok } => {
                self.ok = ok;
                self.println(format!("{machine}: {outcome}"));
            }
            Progress::Error { message } => {
                self.ok = false;
                self.println(format!("error: {message}"));
            }
        }
    }

    fn pull(&mut self, image: String, current: u64, total: u64) {
        if self.terminal && total > 0 {
            let bar = self.bars.entry(image.clone()).or_insert_with(|| {
                let bar = indicatif::ProgressBar::new(total);
                let style = indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
                    .expect("the template is valid")
                    .progress_chars("=> ");
                bar.set_style(style);
                bar.set_message(image.clone());
                bar
            });
            bar.set_length(total);
            bar.set_position(current);
            return;
        }
        if total == 0 {
            println!("pull {image}: every layer is already present");
            return;
        }
        let tenth = current * 10 / total;
        let printed = self.printed_tenths.entry(image.clone()).or_insert(u64::MAX);
        if *printed != tenth {
            *printed = tenth;
            println!("pull {image}: {} of {} MiB", current / (1024 * 1024), total.div_ceil(1024 * 1024));
        }
    }

    fn println(&self, text: String) {
        match self.bars.values().next() {
            Some(bar) if self.terminal => bar.println(text),
            _ => println!("{text}"),
        }
    }

    fn finish(&mut self) {
        for bar in self.bars.values() {
            bar.finish();
        }
    }
}

/// Tells whether a missing `[stack]` section is the only problem.
fn lacks_only_stack(error: &ConfigError) -> bool {
    matches!(&error.problems[..], [problem] if problem.key == "stack")
}

/// Exit status for a host whose dpkg lock stayed held (EX_TEMPFAIL).
const EXIT_BUSY: u8 = 75;

async fn host_patch(config: HostPatchConfig) -> anyhow::Result<ExitCode> {
    let seams = Seams::system(config.seams.boot_id_file.clone());
    let journal = agent::open_journal(&config.journal)?;
    let holder = eventpi_autoupdate::identity::holder_name();
    let epoch = journal.lock().expect("the journal lock is not shared yet").take_lease(&holder, seams.meta())?;
    tracing::info!(holder, epoch, journal = %config.journal.directory.display(), "took the journal lease for a host patch");

    let mut driver = HostDriver::new(journal, seams, config.host);
    let state = tokio::select! {
        result = driver.run_cycle() => result?,
        () = shutdown_signal() => {
            anyhow::bail!("stopped by a signal in state {}. The next run resumes the attempt", driver.state().name());
        }
    };

    let outcome = driver.memory().last_outcome.clone();
    let summary = outcome.as_ref().map_or_else(|| format!("ended in state {}", state.name()), HostOutcome::describe);
    match (state, outcome) {
        (HostState::Done, _) => {
            println!("host-patch: {summary}");
            Ok(ExitCode::SUCCESS)
        }
        (_, Some(HostOutcome::Busy { .. })) => {
            eprintln!("host-patch: {summary}");
            Ok(ExitCode::from(EXIT_BUSY))
        }
        _ => {
            eprintln!("host-patch: {summary}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Keeps the agent's heap small over weeks of running. glibc raises its
/// mmap threshold after a large buffer is freed, so later large buffers (a
/// journal region read at start or refresh, a compose model) come from the
/// heap and are never returned. A fixed threshold keeps them in their own
/// mappings, which free returns, and one arena per two threads is plenty for
/// an agent that mostly waits.
fn limit_heap_growth() {
    // SAFETY: mallopt only changes glibc allocator parameters; it is called
    // before any thread of the runtime starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn machine_names() -> String {
    TABLES.iter().map(|table| table.machine.name()).collect::<Vec<_>>().join(", ")
}

fn init_logging(argument: Option<LogFormatArgument>, configured: Option<LogFormat>, level: &str) {
    let json = match (argument, configured) {
        (Some(LogFormatArgument::Json), _) => true,
        (Some(LogFormatArgument::Human), _) => false,
        (None, Some(LogFormat::Json)) => true,
        (None, _) => false,
    };
    // `Targets` parses the usual `info,crate=debug` syntax without the regex
    // engine that an `EnvFilter` brings, which keeps the binary smaller.
    let from_environment = std::env::var("AUTOUPDATE_LOG").ok().and_then(|text| text.parse::<Targets>().ok());
    let filter = from_environment.unwrap_or_else(|| level.parse::<Targets>().unwrap_or_else(|_| Targets::new().with_default(tracing::Level::INFO)));
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if json {
        tracing_subscriber::registry().with(layer.json().flatten_event(true).with_current_span(false).with_filter(filter)).init();
    } else {
        tracing_subscriber::registry().with(layer.with_ansi(std::io::stderr().is_terminal()).with_filter(filter)).init();
    }
}

async fn shutdown_signal() {
    let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGTERM; only SIGINT stops the agent");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = terminate.recv() => tracing::info!("received SIGTERM"),
        _ = tokio::signal::ctrl_c() => tracing::info!("received SIGINT"),
    }
}
