//! `rackblock`: the one binary of the product.
//!
//! Daemons (`sled-controller`, `head-node`; `zonal` comes with a later
//! issue), operator verbs (`rack validate`, `unit status`, `volume
//! register`), and `up`, which runs a whole
//! unit on this machine as separate processes. Exit codes: 0 success,
//! 1 runtime failure, 2 bad usage or configuration.

mod sled_bench;
mod unit;
mod up;
mod volume_bench;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(name = "rackblock", version, about = "rack-scale block storage")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a sled controller daemon: owns one sled's devices, serves columns
    /// on networks A and B, metrics and health on its admin address.
    SledController {
        /// Sled controller config (TOML); see deploy/sled-controller.example.toml.
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a head node daemon: a member of the unit's local control plane
    /// (Raft), serving on networks A and B, admin HTTP on its admin address.
    HeadNode {
        /// Head node config (TOML); see deploy/head-node.example.toml.
        #[arg(long)]
        config: PathBuf,
    },
    /// Unit commands (ask the local control plane).
    Unit {
        #[command(subcommand)]
        command: UnitCommand,
    },
    /// Volume commands.
    Volume {
        #[command(subcommand)]
        command: VolumeCommand,
    },
    /// Rack description commands.
    Rack {
        #[command(subcommand)]
        command: RackCommand,
    },
    /// Start a whole unit on this machine as separate processes.
    Up(up::UpArgs),
    /// Sled controller tools.
    Sled {
        #[command(subcommand)]
        command: SledCommand,
    },
}

#[derive(Debug, Subcommand)]
enum UnitCommand {
    /// Leader, term, members with both addresses, sleds, capacity.
    Status(unit::StatusArgs),
}

#[derive(Debug, Subcommand)]
enum VolumeCommand {
    /// Register a volume with the unit and print its partition map
    /// (temporary operator verb: the zonal control plane does this later).
    Register(unit::RegisterArgs),
    /// Load one volume through the volume client (see bench/datapath.sh).
    Bench(volume_bench::BenchArgs),
}

#[derive(Debug, Subcommand)]
enum SledCommand {
    /// Load one sled controller over the wire protocol (see bench/sled.sh).
    Bench(sled_bench::BenchArgs),
}

#[derive(Debug, Subcommand)]
enum RackCommand {
    /// Parse and validate a rack file, including its device paths and sizes.
    Validate {
        /// The rack description (TOML).
        file: PathBuf,
        /// Skip the checks that open device paths.
        #[arg(long)]
        no_devices: bool,
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Cancels the token on SIGINT or SIGTERM.
fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(error) => {
                    tracing::error!(%error, "cannot install SIGTERM handler");
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        token.cancel();
    });
}

/// Keeps large buffers (1 MiB chunks, 16 MiB frames) in the heap instead of
/// mmap-ing and unmapping them per request: each fresh mapping costs a page
/// fault per 4 KiB, which was the sled controller's top cost under load.
fn tune_allocator() {
    // SAFETY: mallopt only adjusts glibc's allocator parameters; called once
    // before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("rackblock: cannot start the async runtime: {error}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::SledController { config } => {
                let config = match sled_controller::SledControllerConfig::load(&config) {
                    Ok(config) => config,
                    Err(error) => {
                        eprintln!("rackblock: {error}");
                        return ExitCode::from(2);
                    }
                };
                let token = CancellationToken::new();
                cancel_on_signal(token.clone());
                match sled_controller::run(config, token).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(error) => {
                        eprintln!("rackblock: sled controller: {error}");
                        ExitCode::from(1)
                    }
                }
            }
            Command::HeadNode { config } => {
                let config = match head_node::HeadNodeConfig::load(&config) {
                    Ok(config) => config,
                    Err(error) => {
                        eprintln!("rackblock: {error}");
                        return ExitCode::from(2);
                    }
                };
                let token = CancellationToken::new();
                cancel_on_signal(token.clone());
                match head_node::run(config, token).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(
                        error @ (head_node::HeadNodeError::Config(_)
                        | head_node::HeadNodeError::Rack { .. }
                        | head_node::HeadNodeError::UnknownHeadNode { .. }),
                    ) => {
                        eprintln!("rackblock: head node: {error}");
                        ExitCode::from(2)
                    }
                    Err(error) => {
                        eprintln!("rackblock: head node: {error}");
                        ExitCode::from(1)
                    }
                }
            }
            Command::Unit {
                command: UnitCommand::Status(args),
            } => unit::status(args).await,
            Command::Volume {
                command: VolumeCommand::Register(args),
            } => unit::register_volume(args).await,
            Command::Volume {
                command: VolumeCommand::Bench(args),
            } => match volume_bench::run(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("rackblock volume bench: {error}");
                    ExitCode::from(1)
                }
            },
            Command::Rack {
                command: RackCommand::Validate { file, no_devices },
            } => {
                let result = hardware::rack::Rack::load(&file).and_then(|rack| {
                    if !no_devices {
                        rack.validate_devices()?;
                    }
                    Ok(rack)
                });
                match result {
                    Ok(rack) => {
                        println!(
                            "{}: unit {} with {} head nodes and {} sleds is valid",
                            file.display(),
                            rack.unit.name,
                            rack.head_node.len(),
                            rack.sled.len()
                        );
                        ExitCode::SUCCESS
                    }
                    Err(error) => {
                        eprintln!("rackblock: {}: {error}", file.display());
                        ExitCode::from(2)
                    }
                }
            }
            Command::Up(args) => up::run(args).await,
            Command::Sled {
                command: SledCommand::Bench(args),
            } => match sled_bench::run(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("rackblock sled bench: {error}");
                    ExitCode::from(1)
                }
            },
        }
    })
}
