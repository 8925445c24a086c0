//! The `autoupdate` command line.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use eventpi_autoupdate::config::{Config, LogFormat};
use eventpi_autoupdate::journal::Journal;
use eventpi_autoupdate::machine::{MachineKind, TABLES};
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

    /// Validates a configuration file: exit status 0, or every problem with
    /// its key and line.
    CheckConfig {
        /// Configuration file (TOML).
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },

    /// Prints the current state of every machine, the last known-good commit
    /// with its image digests, and the last error, read from the journal.
    Status {
        /// Journal directory (journal.directory in the configuration).
        #[arg(long, value_name = "DIR")]
        journal: PathBuf,
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
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run { config } => {
            let config = Config::load(&config)?;
            init_logging(cli.log_format, Some(config.agent.log_format), &config.agent.log_level);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(agent::run(config, shutdown_signal()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(config) => {
                for warning in &config.warnings {
                    eprintln!("warning: {}: {warning}", file.display());
                }
                println!("{}: valid", file.display());
                Ok(ExitCode::SUCCESS)
            }
            Err(error) => {
                eprintln!("{error}");
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Status { journal } => {
            let journal = Journal::open_read_only(&journal)?;
            print!("{}", report::status_text(&journal));
            Ok(ExitCode::SUCCESS)
        }
        Command::Replay { journal, json } => {
            let journal = Journal::open_read_only(&journal)?;
            if json {
                let entries = report::replay_entries(journal.state());
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                print!("{}", report::replay_text(journal.state()));
            }
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
    let filter = tracing_subscriber::EnvFilter::try_from_env("AUTOUPDATE_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).with_current_span(false).init();
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).init();
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
