//! `rackblock`: the one binary of the product.
//!
//! * Daemons: `sled-controller`, `head-node`, `zonal` (the zonal control
//!   plane) and `attach` (the host agent serving a volume over NBD).
//! * Operator verbs: `volume create|list|describe|resize|delete|detach`
//!   and `unit list|status` through the zonal API (`--zonal`, `--token`);
//!   `unit status`'s live part, `sled list|drain` and `head-node list`
//!   through the unit's local control plane (`--rack`); `rack validate`;
//!   `volume register` (straight to a unit, for benches and tests).
//! * Credentials (SECURITY.md): `rack init-credentials` (the unit's keys),
//!   `attachment create|revoke` (an attachment for a host that attaches
//!   without the zonal plane), `zonal-token` (a scoped zonal API token).
//! * `up`: a whole unit on this machine as separate processes.
//!
//! Exit codes (one mapping, [`error::CliError::exit_code`]): 0 success,
//! 1 runtime failure or a service unavailable, 2 bad usage, configuration
//! or input, 3 not found, 4 conflict, 5 authentication.

mod agents;
mod attach;
mod attachment;
mod clone;
mod device;
mod error;
mod http;
mod ops;
mod sled_bench;
mod snapshot;
mod stream;
mod text;
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
    #[command(flatten)]
    global: ops::GlobalArgs,
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
    /// Run a head node daemon (`--config FILE`): a member of the unit's
    /// local control plane (Raft), serving on networks A and B, admin HTTP
    /// on its admin address. `head-node list` lists the unit's head nodes.
    #[command(args_conflicts_with_subcommands = true)]
    HeadNode {
        /// Head node config (TOML); see deploy/head-node.example.toml.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: Option<HeadNodeCommand>,
    },
    /// Run the zonal control plane: the zone's HTTP/JSON API for volumes,
    /// attachments and units (never on the I/O path).
    Zonal {
        /// Zonal config (TOML); see deploy/zonal.example.toml.
        #[arg(long)]
        config: PathBuf,
    },
    /// Attach a volume to this host and serve it over NBD until stopped
    /// (`--list`: the agents running on this host).
    Attach(Box<attach::AttachArgs>),
    /// Stop this host's attach agent of a volume: it finishes in-flight
    /// requests and revokes its attachment.
    Detach(agents::DetachArgs),
    /// Units of the zone: capacity, health, live status.
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
    /// A new zonal API token: prints the token (give it to its user) and
    /// the `[[tokens]]` entry for the zonal config, which holds only its
    /// SHA-256.
    ZonalToken {
        /// `admin` or `read-only`.
        #[arg(long, default_value = "read-only")]
        scope: String,
    },
    /// Attachments minted by an operator for `attach --rack` (no zonal
    /// plane): `create` writes the attachment file a host needs.
    Attachment {
        #[command(subcommand)]
        command: AttachmentCommand,
    },
    /// TLS material: `tls init DIR` makes a local CA and a server
    /// certificate (what `rackblock up` makes under rackblock-data/tls).
    Tls {
        #[command(subcommand)]
        command: TlsCommand,
    },
    /// Crash-consistent snapshots of a volume, taken by its unit (needs
    /// the unit's rack file: --rack or RACKBLOCK_RACK).
    Snapshot {
        #[command(subcommand)]
        command: SnapshotCommand,
    },
    /// Sleds of a unit: list, drain; sled controller tools.
    Sled {
        #[command(subcommand)]
        command: SledCommand,
    },
}

#[derive(Debug, Subcommand)]
enum HeadNodeCommand {
    /// Raft role, health, both addresses, partition roles (live, from the LCP).
    List(ops::LiveArgs),
}

#[derive(Debug, Subcommand)]
enum UnitCommand {
    /// The units the zonal plane knows: health, leader, capacity.
    List,
    /// Zonal view plus the unit's live status: leader, term, members with
    /// both addresses, sleds, devices, capacity, paths.
    Status(ops::UnitStatusArgs),
}

#[derive(Debug, Subcommand)]
enum VolumeCommand {
    /// Create a volume (placed on a unit by free capacity, then load).
    Create(ops::CreateArgs),
    /// List the volumes of the zone.
    List,
    /// One volume with its attachments and live partition map.
    Describe(ops::NameArgs),
    /// Grow a volume.
    Resize(ops::ResizeArgs),
    /// Change a volume's QoS limits (--iops, --bandwidth, bursts; others
    /// kept unless --clear-qos); attach agents apply them within seconds.
    Modify(ops::ModifyArgs),
    /// Delete a volume: refused while attached unless --force; the unit
    /// frees its space in the background.
    Delete(ops::DeleteArgs),
    /// Remove an attachment left by an attach agent that was killed.
    Detach(ops::DetachArgs),
    /// Copy every block a clone never wrote from its parent snapshot in
    /// the background (rate-limited), so the snapshot can be deleted.
    Flatten(clone::FlattenArgs),
    /// Give a detached volume a snapshot's content (refused while
    /// attached; later snapshots keep theirs); waits for the end.
    Rollback(clone::RollbackArgs),
    /// Register a volume with the unit and print its partition map
    /// (temporary operator verb: the zonal control plane does this later).
    Register(unit::RegisterArgs),
    /// Load one volume through the volume client (see bench/datapath.sh).
    Bench(volume_bench::BenchArgs),
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Take a snapshot of VOLUME named SNAPSHOT (or with --group NAME one
    /// crash-consistent snapshot of several volumes); waits until it is
    /// ready (prints the measured I/O pause of its cut) or aborted.
    Create(snapshot::CreateArgs),
    /// The volume's snapshots: state, pause, cuts.
    List(snapshot::ListArgs),
    /// Delete a snapshot; waits until every partition dropped it.
    Delete(snapshot::DeleteArgs),
    /// One snapshot: state, pause, every partition's cut, the bytes it
    /// holds exclusively.
    Describe(snapshot::DescribeArgs),
    /// The ranges changed from snapshot FROM to snapshot TO (or the live
    /// volume), from the partitions' indexes (no data read).
    Diff(snapshot::DiffArgs),
    /// Write a snapshot's raw image, or an incremental stream of what
    /// changed since another snapshot, to a file or stdout.
    Export(snapshot::ExportArgs),
    /// Apply an incremental stream onto a raw image file.
    Apply(snapshot::ApplyArgs),
}

#[derive(Debug, Subcommand)]
enum SledCommand {
    /// Health, both paths, domains and columns of every sled (live, from the LCP).
    List(ops::LiveArgs),
    /// Set a sled Draining (no new columns) and show the columns left on it.
    Drain(ops::DrainArgs),
    /// Load one sled controller over the wire protocol (see bench/sled.sh).
    Bench(sled_bench::BenchArgs),
}

#[derive(Debug, Subcommand)]
enum AttachmentCommand {
    Create(attachment::CreateArgs),
    Revoke(attachment::RevokeArgs),
}

#[derive(Debug, Subcommand)]
enum TlsCommand {
    /// Write ca.pem, ca.key, server.pem, server.key (keys mode 0600) and
    /// client/ca-cert.pem (the directory libnbd and qemu clients take) to
    /// DIR; refuses to overwrite. Serve with `attach --tls-cert
    /// DIR/server.pem --tls-key DIR/server.key`.
    Init {
        dir: PathBuf,
        /// Names (DNS or IP) the server certificate is for; repeatable.
        #[arg(long = "name", default_values_t = client::tls::default_names())]
        names: Vec<String>,
    },
    /// Issue another server certificate from the CA in DIR (`tls init`,
    /// `up`): DIR/NAME.pem and DIR/NAME.key (mode 0600), e.g. for a head
    /// node's host port (`host_tls_cert`/`host_tls_key`) with its IP
    /// address as --san. Kept if both exist, unless --replace.
    Issue {
        dir: PathBuf,
        /// File name (without .pem / .key), e.g. host-hn-1.
        name: String,
        /// Names (DNS or IP) the certificate is for; repeatable.
        #[arg(long = "san", required = true)]
        sans: Vec<String>,
        /// Replace an existing certificate and key of that name.
        #[arg(long)]
        replace: bool,
    },
}

#[derive(Debug, Subcommand)]
enum RackCommand {
    /// Issue the unit's credentials (unit key, sled and operator keys)
    /// beside the rack file; kept if present unless --rotate.
    InitCredentials(attachment::InitCredentialsArgs),
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
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

/// Cancels the token on SIGINT or SIGTERM.
pub(crate) fn cancel_on_signal(token: CancellationToken) {
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

/// The async runtime for `--worker-threads`: 1 runs every task on the main
/// thread; 0 (one worker per core) or N > 1 a work-stealing pool.
fn runtime_builder(worker_threads: usize) -> tokio::runtime::Builder {
    match worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
    }
}

/// Runs a daemon from its loaded config until SIGINT/SIGTERM. Exit codes:
/// 0 after a clean stop, 2 when the config (or the rack it names) is wrong,
/// 1 for anything else.
async fn run_daemon<C, E, Fut>(
    what: &str,
    config: Result<C, impl std::fmt::Display>,
    run: impl FnOnce(C, CancellationToken) -> Fut,
    is_config_error: impl FnOnce(&E) -> bool,
) -> ExitCode
where
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let config = match config {
        Ok(config) => config,
        Err(error) => {
            eprintln!("rackblock {what}: {error}");
            return ExitCode::from(2);
        }
    };
    let token = CancellationToken::new();
    cancel_on_signal(token.clone());
    match run(config, token).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("rackblock {what}: {error}");
            if is_config_error(&error) {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    init_logging();
    let runtime = match runtime_builder(cli.global.worker_threads)
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
                run_daemon(
                    "sled controller",
                    sled_controller::SledControllerConfig::load(&config),
                    sled_controller::run,
                    |_| false,
                )
                .await
            }
            Command::HeadNode {
                command: Some(HeadNodeCommand::List(args)),
                ..
            } => ops::finish(
                "head-node list",
                ops::head_node_list(&cli.global, &args).await,
            ),
            Command::HeadNode {
                config: None,
                command: None,
            } => {
                eprintln!("rackblock head-node: give --config FILE (run the daemon) or `list`");
                ExitCode::from(2)
            }
            Command::HeadNode {
                config: Some(config),
                command: None,
            } => {
                run_daemon(
                    "head node",
                    head_node::HeadNodeConfig::load(&config),
                    head_node::run,
                    |error| {
                        matches!(
                            error,
                            head_node::HeadNodeError::Config(_)
                                | head_node::HeadNodeError::Rack { .. }
                                | head_node::HeadNodeError::UnknownHeadNode { .. }
                        )
                    },
                )
                .await
            }
            Command::Zonal { config } => {
                run_daemon(
                    "zonal",
                    zonal_control_plane::ZonalConfig::load(&config),
                    zonal_control_plane::run,
                    |error| {
                        matches!(
                            error,
                            zonal_control_plane::ZonalError::Config(_)
                                | zonal_control_plane::ZonalError::Rack { .. }
                        )
                    },
                )
                .await
            }
            Command::Attach(args) => {
                let token = CancellationToken::new();
                cancel_on_signal(token.clone());
                ops::finish("attach", attach::run(&cli.global, &args, token).await)
            }
            Command::Detach(args) => ops::finish("detach", agents::detach(&args)),
            Command::Unit { command } => match command {
                UnitCommand::List => ops::finish("unit list", ops::unit_list(&cli.global).await),
                UnitCommand::Status(args) => {
                    ops::finish("unit status", ops::unit_status(&cli.global, &args).await)
                }
            },
            Command::Volume {
                command: VolumeCommand::Register(args),
            } => unit::register_volume(args, cli.global.output).await,
            Command::Volume {
                command: VolumeCommand::Create(args),
            } => ops::finish(
                "volume create",
                ops::volume_create(&cli.global, &args).await,
            ),
            Command::Volume {
                command: VolumeCommand::List,
            } => ops::finish("volume list", ops::volume_list(&cli.global).await),
            Command::Volume {
                command: VolumeCommand::Describe(args),
            } => ops::finish(
                "volume describe",
                ops::volume_describe(&cli.global, &args).await,
            ),
            Command::Volume {
                command: VolumeCommand::Resize(args),
            } => ops::finish(
                "volume resize",
                ops::volume_resize(&cli.global, &args).await,
            ),
            Command::Volume {
                command: VolumeCommand::Modify(args),
            } => ops::finish(
                "volume modify",
                ops::volume_modify(&cli.global, &args).await,
            ),
            Command::Volume {
                command: VolumeCommand::Delete(args),
            } => ops::finish(
                "volume delete",
                ops::volume_delete(&cli.global, &args).await,
            ),
            Command::Volume {
                command: VolumeCommand::Detach(args),
            } => ops::finish(
                "volume detach",
                ops::volume_detach(&cli.global, &args).await,
            ),
            Command::Volume {
                command: VolumeCommand::Rollback(args),
            } => ops::finish(
                "volume rollback",
                clone::rollback(&cli.global, &args).await,
            ),
            Command::Volume {
                command: VolumeCommand::Flatten(args),
            } => ops::finish("volume flatten", clone::flatten(&cli.global, &args).await),
            Command::Snapshot { command } => match command {
                SnapshotCommand::Create(args) => ops::finish(
                    "snapshot create",
                    snapshot::create(&cli.global, &args).await,
                ),
                SnapshotCommand::List(args) => {
                    ops::finish("snapshot list", snapshot::list(&cli.global, &args).await)
                }
                SnapshotCommand::Describe(args) => ops::finish(
                    "snapshot describe",
                    snapshot::describe(&cli.global, &args).await,
                ),
                SnapshotCommand::Diff(args) => {
                    ops::finish("snapshot diff", snapshot::diff(&cli.global, &args).await)
                }
                SnapshotCommand::Export(args) => ops::finish(
                    "snapshot export",
                    snapshot::export(&cli.global, &args).await,
                ),
                SnapshotCommand::Apply(args) => {
                    ops::finish("snapshot apply", snapshot::apply(&cli.global, &args).await)
                }
                SnapshotCommand::Delete(args) => ops::finish(
                    "snapshot delete",
                    snapshot::delete(&cli.global, &args).await,
                ),
            },
            Command::Sled {
                command: SledCommand::List(args),
            } => ops::finish("sled list", ops::sled_list(&cli.global, &args).await),
            Command::Sled {
                command: SledCommand::Drain(args),
            } => ops::finish("sled drain", ops::sled_drain(&cli.global, &args).await),
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
            Command::ZonalToken { scope } => {
                if scope != "admin" && scope != "read-only" {
                    eprintln!("rackblock zonal-token: --scope is admin or read-only");
                    return ExitCode::from(2);
                }
                match proto::volume::AttachmentToken::random() {
                    Ok(random) => {
                        let token = random.to_hex();
                        let digest: String = zonal_control_plane::config::token_digest(&token)
                            .iter()
                            .map(|b| format!("{b:02x}"))
                            .collect();
                        println!("token: {token}");
                        println!("# for the zonal config:\n[[tokens]]\nsha256 = \"{digest}\"\nscope = \"{scope}\"");
                        ExitCode::SUCCESS
                    }
                    Err(error) => {
                        eprintln!("rackblock zonal-token: {error}");
                        ExitCode::from(1)
                    }
                }
            }
            Command::Attachment {
                command: AttachmentCommand::Create(args),
            } => ops::finish("attachment create", attachment::create(&args).await),
            Command::Attachment {
                command: AttachmentCommand::Revoke(args),
            } => ops::finish("attachment revoke", attachment::revoke(&args).await),
            Command::Tls {
                command: TlsCommand::Init { dir, names },
            } => match client::tls::generate(&dir, &names) {
                Ok(files) => {
                    println!("CA certificate: {}", files.ca_cert.display());
                    println!("server certificate: {}", files.server_cert.display());
                    println!("server key: {}", files.server_key.display());
                    println!(
                        "client directory (tls-certificates= / tls-creds-x509 dir=): {}",
                        files.client_dir.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("rackblock tls init: {error}");
                    ExitCode::from(1)
                }
            },
            Command::Tls {
                command:
                    TlsCommand::Issue {
                        dir,
                        name,
                        sans,
                        replace,
                    },
            } => match client::tls::issue(&dir, &name, &sans, replace) {
                Ok(files) => {
                    println!("certificate: {}", files.cert.display());
                    println!("key: {}", files.key.display());
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("rackblock tls issue: {error}");
                    ExitCode::from(1)
                }
            },
            Command::Rack {
                command: RackCommand::InitCredentials(args),
            } => ops::finish("rack init-credentials", attachment::init_credentials(&args)),
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
