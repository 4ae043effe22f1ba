//! `rackblock up`: a whole unit on this machine.
//!
//! In a data directory (default `./rackblock-data`) it writes a rack file
//! whose nodes listen on two loopback address sets (network A `127.0.1.x`,
//! network B `127.0.2.x`), creates file-backed devices, and starts every
//! daemon as its own process, with its pid and log under `run/`, so that an
//! operator can `kill -9` one and watch the unit cope. A second `up` in the
//! same directory reuses the rack file, the devices, the zonal store and
//! the admin token (the data survives).
//!
//! ```text
//! prepare   rack.toml (head nodes' host ports on 127.0.0.x), credentials/
//!           (unit, sled and operator keys), devices/, config/{sled-N,hn-N,zonal}.toml,
//!           zonal-token, tls/ (a local CA and a server certificate for
//!           127.0.0.1 / localhost: ca.pem, server.pem, keys 0600; kept;
//!           and host-hn-N.pem/.key, each head node's host-port certificate
//!           for its 127.0.0.N, issued again by every `up`)
//! start     hn-1..3, sled-1..6, zonal          (pid + log in run/; zonal
//!           serves HTTPS only, with tls/server.pem, and the CLI and the
//!           attach agent trust tls/ca.pem; the head nodes' host ports
//!           require TLS, with host-hn-N.pem, unless --no-host-tls)
//! wait      every /health 200 ─▶ the zonal plane sees the unit (all up)
//! volume    vol0 exists? else POST /v1/volumes (retried while the unit settles)
//! attach    `rackblock attach vol0 --listen 127.0.0.1:10809 --admin 127.0.0.1:9300
//!            --tls-cert tls/server.pem --tls-key tls/server.key` (TLS offered,
//!            not required: plain clients keep working)
//!            (TLS to the host ports trusting the CA the zonal attach answer
//!            carries: the zonal config's `host_ca = tls/ca.pem`)
//!            --iscsi 127.0.0.1:3260 --iscsi 127.0.0.2:3260` (own process; two
//!           iSCSI portals, one per host address, so a multipath initiator
//!           sees two paths to the same LUN; the listeners are bound before
//!           NBD answers)
//!           ─▶ wait for the NBD handshake
//! run       report daemons that exit (the others carry on) until Ctrl-C
//! stop      attach, then zonal, then head nodes, then sleds:
//!           SIGTERM, SIGKILL after a grace period
//! ```
//!
//! `--check` does everything up to the NBD handshake, prints, stops and
//! exits 0 (for scripts and tests). Any step that fails stops what was
//! started and exits 1 with the reason and where the logs are.

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Where the rack file, device files, configs, pids and logs live.
    #[arg(long, default_value = "rackblock-data")]
    data_dir: PathBuf,
    /// Number of sleds (each a sled controller process).
    #[arg(long, default_value_t = 6)]
    sleds: u32,
    /// Devices per sled (sparse files).
    #[arg(long, default_value_t = 2)]
    devices_per_sled: u32,
    /// Size of each device file in MiB.
    #[arg(long, default_value_t = 1024)]
    device_size_mib: u64,
    /// The unit's column size when the rack file is written (an existing
    /// rack file keeps its own): one extent is 4 columns of data (4+2), so
    /// the default 64 MiB makes 256 MiB extents. Tests that show space
    /// coming back on a small volume use a smaller one.
    #[arg(long, default_value = "64MiB")]
    column_size: String,
    /// First port of the unit's data ports; sleds use base+100.
    #[arg(long, default_value_t = 7000)]
    base_port: u16,
    /// First port of the admin (HTTP) ports on 127.0.0.1; sleds use
    /// base+100+i, the attach agent base+200 (unless --attach-admin).
    #[arg(long, default_value_t = 9100)]
    admin_base_port: u16,
    /// Give up waiting for the unit to become healthy after this many seconds.
    #[arg(long, default_value_t = 60)]
    wait_seconds: u64,
    /// Address of the zonal control plane's API, /health and /metrics.
    #[arg(long, default_value = "127.0.0.1:9000")]
    zonal_listen: SocketAddr,
    /// Where the attach agent serves vol0 over NBD.
    #[arg(long, default_value = crate::attach::DEFAULT_LISTEN)]
    nbd_listen: SocketAddr,
    /// The iSCSI portals of the attach agent (repeatable or
    /// comma-separated; vol0 is LUN 0 of iqn.2026-12.io.rackblock:vol0).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.1:3260,127.0.0.2:3260"
    )]
    iscsi_listen: Vec<SocketAddr>,
    /// Do not serve vol0 over iSCSI.
    #[arg(long)]
    no_iscsi: bool,
    /// The attach agent's admin address (/metrics, /health); default
    /// 127.0.0.1 at --admin-base-port + 200 (9300).
    #[arg(long)]
    attach_admin: Option<SocketAddr>,
    /// Size of vol0 when it is created (an existing vol0 is kept as is).
    #[arg(long, default_value = "4GiB")]
    volume_size: String,
    /// Partition size of vol0 when it is created (default: the zonal
    /// plane's, 1 GiB). For benches and tests that want a small volume
    /// spread over every head node, e.g. a memory-backed unit under
    /// /dev/shm (`bench/cpu.sh`).
    #[arg(long)]
    partition_size: Option<String>,
    /// The sled controllers' background scrub rate in bytes per second
    /// (default: theirs, 32 MiB/s each); 0 turns the scrubber off. Six sleds
    /// on one disk scrub at six times that rate, which benches that count
    /// the data path's reads and CPU (`bench/cpu.sh`) do not want.
    #[arg(long)]
    scrub_bytes_per_second: Option<u64>,
    /// A `key = value` line appended to every head node's config
    /// (repeatable; deploy/head-node.example.toml lists the keys), e.g.
    /// `--head-node-setting 'gc_interval_ms = 1000'` for tests and benches.
    #[arg(long, value_name = "KEY = VALUE")]
    head_node_setting: Vec<String>,
    /// Start, wait until healthy and vol0 is served over NBD, print, stop
    /// everything and exit (for scripts and tests).
    #[arg(long)]
    check: bool,
    /// Serve the head nodes' host ports over plain TCP (default: TLS
    /// required, with certificates from the local CA; the attach agent
    /// trusts tls/ca.pem). For comparing the CPU cost (`bench/cpu.sh`).
    #[arg(long)]
    no_host_tls: bool,
    /// Async runtime threads of every daemon `up` starts (their
    /// `--worker-threads`): 1 gives each a single-threaded runtime, 0 one
    /// worker per core. Default 1, unless RACKBLOCK_WORKER_THREADS is set
    /// (the daemons then inherit it). A unit's daemons all share this
    /// machine's cores: on 2 shared vCPUs, single-threaded runtimes cut the
    /// unit's context switches per 4 KiB I/O by 25-75 % and, in 14 of 16
    /// same-run comparisons, its CPU per I/O (by up to 48 %) against one
    /// worker per core (bench/README.md, "the runtime shape").
    #[arg(long)]
    daemon_worker_threads: Option<usize>,
}

const HEAD_NODES: u32 = 3;
/// The volume `up` creates and attaches.
pub const VOLUME: &str = "vol0";

/// How `up` decides a daemon is ready.
#[derive(Debug, Clone)]
enum Probe {
    /// `GET /health` answers 200.
    Http(SocketAddr),
    /// `GET /health` over HTTPS answers 2xx, the certificate signed by the
    /// CA in the file.
    Https(SocketAddr, PathBuf),
    /// An NBD server answers the fixed newstyle greeting.
    Nbd(SocketAddr),
}

/// Order of stopping: lower first (attach, zonal, head nodes, sleds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum StopRank {
    Attach,
    Zonal,
    HeadNode,
    Sled,
}

struct Daemon {
    name: String,
    probe: Probe,
    rank: StopRank,
    pid_file: PathBuf,
    child: Child,
    exited: bool,
}

impl Daemon {
    fn ready(&self) -> bool {
        match &self.probe {
            Probe::Http(address) => http_get_status(*address, "/health") == Some(200),
            Probe::Https(address, ca) => https_health(*address, ca),
            Probe::Nbd(address) => client::nbd::server_greets(*address),
        }
    }
}

/// `GET /health` over HTTPS within 2 s; called on `up`'s blocking thread
/// (inside the runtime, so its handle can run the request).
fn https_health(address: SocketAddr, ca: &Path) -> bool {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return false;
    };
    let Ok(mut api) = crate::http::ZonalApi::new(&format!("https://{address}"), None, Some(ca))
    else {
        return false;
    };
    api.timeout = std::time::Duration::from_secs(2);
    handle.block_on(api.call("GET", "/health", None)).is_ok()
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("rackblock up: {message}");
    ExitCode::from(1)
}

pub async fn run(args: UpArgs) -> ExitCode {
    if args.sleds < 6 {
        return fail(format!(
            "--sleds {} is fewer than the 6 sleds the default 4+2 erasure code needs",
            args.sleds
        ));
    }
    match tokio::task::spawn_blocking(move || up(args)).await {
        Ok(code) => code,
        Err(error) => fail(format!("internal error: {error}")),
    }
}

/// The attach agent's admin address (metrics, health).
fn attach_admin(args: &UpArgs) -> Result<SocketAddr, String> {
    if let Some(address) = args.attach_admin {
        return Ok(address);
    }
    let port = u32::from(args.admin_base_port) + 200;
    let port = u16::try_from(port).map_err(|_| format!("admin port {port} out of range"))?;
    Ok(SocketAddr::from(([127, 0, 0, 1], port)))
}

fn sled_admin(args: &UpArgs, i: u32) -> Result<SocketAddr, String> {
    let port = u32::from(args.admin_base_port) + 100 + i;
    let port = u16::try_from(port).map_err(|_| format!("admin port {port} out of range"))?;
    Ok(SocketAddr::from(([127, 0, 0, 1], port)))
}

fn write_rack_file(args: &UpArgs, data_dir: &Path) -> Result<String, String> {
    let mut rack = String::new();
    let data_port = u32::from(args.base_port);
    let sled_port = data_port + 100;
    if sled_port > u32::from(u16::MAX) {
        return Err(format!("--base-port {} too high", args.base_port));
    }
    let column_size = crate::text::parse_block_size("--column-size", &args.column_size)
        .map_err(|e| e.to_string())?;
    if column_size > args.device_size_mib * 1024 * 1024 {
        return Err(format!(
            "--column-size {} is larger than a device (--device-size-mib {})",
            args.column_size, args.device_size_mib
        ));
    }
    let _ = writeln!(
        rack,
        "# Written by `rackblock up`; edit freely, it is reused by the next `up`.\n\
         [unit]\nname = \"local\"\ncolumn_size_bytes = {column_size}\nerasure_codes = [\"4+2\"]\n"
    );
    for h in 1..=HEAD_NODES {
        let _ = writeln!(
            rack,
            "[[head_node]]\nid = \"hn-{h}\"\naddress_a = \"127.0.1.{h}:{data_port}\"\n\
             address_b = \"127.0.2.{h}:{data_port}\"\nadmin = \"127.0.0.1:{}\"\n\
             host = \"127.0.0.{h}:{data_port}\"\n",
            u32::from(args.admin_base_port) + h
        );
    }
    for s in 1..=args.sleds {
        let _ = writeln!(
            rack,
            "[[sled]]\nid = \"sled-{s}\"\naddress_a = \"127.0.1.{}:{sled_port}\"\n\
             address_b = \"127.0.2.{}:{sled_port}\"\nadmin = \"{}\"\n",
            10 + s,
            10 + s,
            sled_admin(args, s)?
        );
        for d in 0..args.devices_per_sled {
            let path = data_dir
                .join("devices")
                .join(format!("sled-{s}-dev{d}.img"));
            let _ = writeln!(
                rack,
                "[[sled.device]]\npath = \"{}\"\nsize_bytes = {}\nfault_domain = \"fd-{s}\"\n\
                 power_domain = \"pd-{}\"\n",
                path.display(),
                args.device_size_mib * 1024 * 1024,
                if s % 2 == 0 { "b" } else { "a" }
            );
        }
    }
    Ok(rack)
}

/// Creates the directory layout, the rack file and the device files unless
/// they exist. Returns the rack.
/// The local CA and server certificate, under the data directory.
const TLS_DIR: &str = "tls";

fn prepare(args: &UpArgs) -> Result<(PathBuf, hardware::rack::Rack), String> {
    let data_dir = std::path::absolute(&args.data_dir)
        .map_err(|e| format!("{}: {e}", args.data_dir.display()))?;
    for sub in ["", "devices", "run", "config"] {
        std::fs::create_dir_all(data_dir.join(sub))
            .map_err(|e| format!("cannot create {}: {e}", data_dir.join(sub).display()))?;
    }
    let tls = client::tls::ensure(&data_dir.join(TLS_DIR)).map_err(|e| e.to_string())?;
    let rack_path = data_dir.join("rack.toml");
    if !rack_path.exists() {
        let text = write_rack_file(args, &data_dir)?;
        std::fs::write(&rack_path, text)
            .map_err(|e| format!("cannot write {}: {e}", rack_path.display()))?;
        println!("wrote {}", rack_path.display());
    } else {
        println!("reusing {}", rack_path.display());
    }
    let rack = hardware::rack::Rack::load(&rack_path)
        .map_err(|e| format!("{}: {e}", rack_path.display()))?;
    for sled in &rack.sled {
        for device in &sled.device {
            if !device.path.exists() {
                let file = std::fs::File::create(&device.path)
                    .map_err(|e| format!("cannot create {}: {e}", device.path.display()))?;
                file.set_len(device.size_bytes)
                    .map_err(|e| format!("cannot size {}: {e}", device.path.display()))?;
            }
        }
    }
    rack.validate_devices()
        .map_err(|e| format!("{}: {e}", rack_path.display()))?;
    if rack.head_node.iter().any(|h| h.host.is_none()) {
        return Err(format!(
            "{}: every head node needs a `host` port (hosts reach the unit only there; \
             a rack file written by an older `up` has none: add `host = \"127.0.0.N:PORT\"` \
             to each [[head_node]] or remove the file)",
            rack_path.display()
        ));
    }
    // The unit's keys, beside the rack file where every daemon looks for
    // them (kept across runs; SECURITY.md).
    let sleds: Vec<String> = rack.sled.iter().map(|s| s.id.clone()).collect();
    proto::auth::init_credentials(
        &proto::auth::default_credentials_dir(&rack_path),
        &sleds,
        &[proto::auth::DEFAULT_OPERATOR.to_owned(), "zonal".to_owned()],
        false,
    )
    .map_err(|e| format!("cannot write the unit's credentials: {e}"))?;
    for sled in &rack.sled {
        // Only what has no default: every other setting is the code's
        // (deploy/sled-controller.example.toml lists them).
        let mut config = format!(
            "# Written by `rackblock up`.\nrack_file = \"{}\"\nsled_id = \"{}\"\n",
            rack_path.display(),
            sled.id
        );
        if let Some(rate) = args.scrub_bytes_per_second {
            let _ = writeln!(config, "scrub_bytes_per_second = {rate}");
        }
        let path = data_dir.join("config").join(format!("{}.toml", sled.id));
        std::fs::write(&path, config)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    for head in &rack.head_node {
        let mut config = format!(
            "# Written by `rackblock up`.\nrack_file = \"{}\"\nhead_node_id = \"{}\"\n\
             data_dir = \"{}\"\n",
            rack_path.display(),
            head.id,
            data_dir.join(&head.id).display()
        );
        // The host port's certificate names its IP address (hosts check
        // it); issued again each time, so an edited rack file's new address
        // is covered. Hosts trust the CA, not the certificate.
        if let (false, Some(host)) = (args.no_host_tls, head.host) {
            let issued = client::tls::issue(
                &data_dir.join(TLS_DIR),
                &format!("host-{}", head.id),
                &[host.ip().to_string()],
                true,
            )
            .map_err(|e| format!("cannot issue {}'s host-port certificate: {e}", head.id))?;
            let _ = writeln!(
                config,
                "host_tls_cert = \"{}\"\nhost_tls_key = \"{}\"\nhost_tls_required = true",
                issued.cert.display(),
                issued.key.display()
            );
        }
        for setting in &args.head_node_setting {
            let _ = writeln!(config, "{}", setting.trim());
        }
        let path = data_dir.join("config").join(format!("{}.toml", head.id));
        std::fs::write(&path, config)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    let token_path = data_dir.join(crate::ops::TOKEN_FILE);
    if !token_path.exists() {
        write_secret(&token_path, &random_token()?)?;
    }
    // Units are polled every second, not at the default interval, so that
    // `up` sees the unit healthy soon after it is.
    // With host-port TLS, every attach answer carries the CA (the agent
    // needs no --unit-ca).
    let host_ca = match args.no_host_tls {
        true => String::new(),
        false => format!("host_ca = \"{}\"\n", tls.ca_cert.display()),
    };
    let config = format!(
        "# Written by `rackblock up`.\nlisten = \"{}\"\ndata_dir = \"{}\"\n\
         admin_token_file = \"{}\"\nreport_interval_ms = 1000\n\
         tls_cert = \"{}\"\ntls_key = \"{}\"\n\n\
         [[units]]\nname = \"{}\"\nrack_file = \"{}\"\n{host_ca}",
        args.zonal_listen,
        data_dir.join("zonal").display(),
        token_path.display(),
        tls.server_cert.display(),
        tls.server_key.display(),
        rack.unit.name,
        rack_path.display()
    );
    let path = data_dir.join("config").join("zonal.toml");
    std::fs::write(&path, config).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok((data_dir, rack))
}

/// 128 random bits as 32 hex digits.
fn random_token() -> Result<String, String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| format!("cannot read /dev/urandom: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes a file only its owner can read.
fn write_secret(path: &Path, text: &str) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    writeln!(file, "{text}").map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Whether `pid` is a running process. A zombie (killed, not yet reaped by
/// its parent) is not running: after a `kill -9` of a whole unit the next
/// `up` must not be refused because init has not reaped the corpses yet.
fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence and permission.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return false;
    }
    // /proc/PID/stat is "pid (comm) STATE ..."; comm may hold spaces or
    // parentheses, so the state is the first field after the last ')'.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state != "Z" && state != "X"),
        Err(_) => true,
    }
}

fn refuse_if_running(data_dir: &Path) -> Result<(), String> {
    let run = data_dir.join("run");
    let entries = std::fs::read_dir(&run).map_err(|e| format!("{}: {e}", run.display()))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "pid") {
            let pid = std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok());
            match pid {
                Some(pid) if pid_alive(pid) => {
                    return Err(format!(
                        "a unit is already running from {} ({} has pid {pid}); stop it first",
                        data_dir.display(),
                        path.display()
                    ))
                }
                _ => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }
    Ok(())
}

/// The environment variable of the global `--worker-threads`.
const WORKER_THREADS_ENV: &str = "RACKBLOCK_WORKER_THREADS";

/// The runtime arguments every daemon gets (`--daemon-worker-threads`):
/// the flag when given; nothing when `RACKBLOCK_WORKER_THREADS` is set in
/// `up`'s environment (the daemons inherit it); else single-threaded
/// runtimes, measured the cheapest when all of a unit's daemons share a
/// few cores.
fn daemon_runtime_args(flag: Option<usize>, env_set: bool) -> Vec<String> {
    match (flag, env_set) {
        (Some(threads), _) => vec!["--worker-threads".to_string(), threads.to_string()],
        (None, true) => Vec::new(),
        (None, false) => vec!["--worker-threads".to_string(), "1".to_string()],
    }
}

fn spawn_daemon(
    data_dir: &Path,
    name: &str,
    args: &[String],
    env: &[(&str, String)],
    probe: Probe,
    rank: StopRank,
) -> Result<Daemon, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own binary: {e}"))?;
    let log_path = data_dir.join("run").join(format!("{name}.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
    let log_err = log
        .try_clone()
        .map_err(|e| format!("{}: {e}", log_path.display()))?;
    let child = std::process::Command::new(exe)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(|e| format!("cannot start {name}: {e}"))?;
    let pid_file = data_dir.join("run").join(format!("{name}.pid"));
    std::fs::write(&pid_file, format!("{}\n", child.id()))
        .map_err(|e| format!("cannot write {}: {e}", pid_file.display()))?;
    Ok(Daemon {
        name: name.to_string(),
        probe,
        rank,
        pid_file,
        child,
        exited: false,
    })
}

/// GET `path` on `addr`; returns the status code. A tiny HTTP/1.0 client so
/// that `up` needs no HTTP client dependency.
pub fn http_get_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut head = [0u8; 64];
    let n = stream.read(&mut head).ok()?;
    let line = std::str::from_utf8(&head[..n]).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Stops the daemons rank by rank (attach, zonal, head nodes, sleds): each
/// rank gets SIGTERM and up to 10 s before SIGKILL.
fn stop_all(daemons: &mut [Daemon]) {
    for rank in [
        StopRank::Attach,
        StopRank::Zonal,
        StopRank::HeadNode,
        StopRank::Sled,
    ] {
        for daemon in daemons.iter_mut().filter(|d| d.rank == rank && !d.exited) {
            if let Ok(pid) = i32::try_from(daemon.child.id()) {
                // SAFETY: signalling our own child process by pid.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for daemon in daemons.iter_mut().filter(|d| d.rank == rank) {
            loop {
                match daemon.child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        eprintln!("{} did not stop in time; killing it", daemon.name);
                        let _ = daemon.child.kill();
                        let _ = daemon.child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
            daemon.exited = true;
            let _ = std::fs::remove_file(&daemon.pid_file);
        }
    }
}

/// Why `up` gave up, with everything started so far to stop.
struct Failed(String);

fn up(args: UpArgs) -> ExitCode {
    let volume_size_bytes = match crate::text::parse_block_size("--volume-size", &args.volume_size)
    {
        Ok(bytes) => bytes,
        Err(error) => {
            eprintln!("rackblock up: {error}");
            return ExitCode::from(2);
        }
    };
    let partition_size_bytes = match args
        .partition_size
        .as_deref()
        .map(|text| crate::text::parse_block_size("--partition-size", text))
    {
        None => None,
        Some(Ok(bytes)) => Some(bytes),
        Some(Err(error)) => {
            eprintln!("rackblock up: {error}");
            return ExitCode::from(2);
        }
    };
    let (data_dir, rack) = match prepare(&args) {
        Ok(prepared) => prepared,
        Err(error) => return fail(error),
    };
    if let Err(error) = refuse_if_running(&data_dir) {
        return fail(error);
    }
    let stop = match install_stop_flag() {
        Ok(stop) => stop,
        Err(error) => return fail(error),
    };
    let mut daemons = Vec::new();
    let started = start_unit(
        &args,
        &data_dir,
        &rack,
        (volume_size_bytes, partition_size_bytes),
        &stop,
        &mut daemons,
    );
    if let Err(Failed(why)) = started {
        crate::text::end_progress();
        stop_all(&mut daemons);
        return fail(format!(
            "{why}; logs are in {}",
            data_dir.join("run").display()
        ));
    }
    print_status(&data_dir, &rack, &args, &daemons);
    if args.check {
        stop_all(&mut daemons);
        println!("stopped (--check)");
        return ExitCode::SUCCESS;
    }
    println!("Ctrl-C stops the unit.");
    while !stop.load() {
        for daemon in daemons.iter_mut().filter(|d| !d.exited) {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                daemon.exited = true;
                let _ = std::fs::remove_file(&daemon.pid_file);
                let log = data_dir.join("run").join(format!("{}.log", daemon.name));
                eprintln!(
                    "{} exited ({status}); the others carry on without it (log: {}). \
                     Restart this `up` to bring it back.",
                    daemon.name,
                    log.display()
                );
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("stopping the unit (attach agent, zonal control plane, head nodes, sleds)");
    stop_all(&mut daemons);
    ExitCode::SUCCESS
}

/// Waits until every daemon's probe answers, drawing progress; fails when
/// one exits, on Ctrl-C, or at the deadline.
fn wait_ready(
    daemons: &mut [Daemon],
    what: &str,
    deadline: Instant,
    stop: &StopFlag,
) -> Result<(), Failed> {
    loop {
        let ready = daemons.iter().filter(|d| d.exited || d.ready()).count();
        let total = daemons.len();
        crate::text::draw_progress(ready as u64, total as u64, what);
        if ready == total {
            crate::text::end_progress();
            return Ok(());
        }
        let dead: Vec<String> = daemons
            .iter_mut()
            .filter_map(|d| match d.child.try_wait() {
                Ok(Some(status)) => {
                    d.exited = true;
                    Some(format!("{} exited ({status})", d.name))
                }
                _ => None,
            })
            .collect();
        if !dead.is_empty() {
            return Err(Failed(dead.join(", ")));
        }
        if stop.load() {
            return Err(Failed("interrupted".into()));
        }
        if Instant::now() >= deadline {
            let waiting: Vec<&str> = daemons
                .iter()
                .filter(|d| !d.ready())
                .map(|d| d.name.as_str())
                .collect();
            return Err(Failed(format!(
                "timed out waiting for {}",
                waiting.join(", ")
            )));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn start_unit(
    args: &UpArgs,
    data_dir: &Path,
    rack: &hardware::rack::Rack,
    (volume_size_bytes, partition_size_bytes): (u64, Option<u64>),
    stop: &StopFlag,
    daemons: &mut Vec<Daemon>,
) -> Result<(), Failed> {
    let deadline = Instant::now() + Duration::from_secs(args.wait_seconds);
    let tls_ca = client::tls::TlsFiles::in_dir(&data_dir.join(TLS_DIR)).ca_cert;
    let config = |name: &str| data_dir.join("config").join(format!("{name}.toml"));
    let runtime = daemon_runtime_args(
        args.daemon_worker_threads,
        std::env::var_os(WORKER_THREADS_ENV).is_some(),
    );
    let argv = |verb: &str, config: PathBuf| {
        let mut argv = runtime.clone();
        argv.extend([
            verb.to_string(),
            "--config".to_string(),
            config.display().to_string(),
        ]);
        argv
    };
    for head in &rack.head_node {
        let argv = argv("head-node", config(&head.id));
        let daemon = spawn_daemon(
            data_dir,
            &head.id,
            &argv,
            &[],
            Probe::Http(head.admin),
            StopRank::HeadNode,
        )
        .map_err(Failed)?;
        daemons.push(daemon);
    }
    for sled in &rack.sled {
        let argv = argv("sled-controller", config(&sled.id));
        let daemon = spawn_daemon(
            data_dir,
            &sled.id,
            &argv,
            &[],
            Probe::Http(sled.admin),
            StopRank::Sled,
        )
        .map_err(Failed)?;
        daemons.push(daemon);
    }
    let argv = argv("zonal", config("zonal"));
    let zonal = spawn_daemon(
        data_dir,
        "zonal",
        &argv,
        &[],
        Probe::Https(args.zonal_listen, tls_ca.clone()),
        StopRank::Zonal,
    )
    .map_err(Failed)?;
    daemons.push(zonal);
    wait_ready(daemons, "daemons healthy", deadline, stop)?;

    let handle = tokio::runtime::Handle::try_current()
        .map_err(|e| Failed(format!("internal error: {e}")))?;
    let token = std::fs::read_to_string(data_dir.join(crate::ops::TOKEN_FILE))
        .map_err(|e| Failed(format!("cannot read the zonal token: {e}")))?;
    let zonal_url = format!("https://{}", args.zonal_listen);
    let api = crate::http::ZonalApi::new(&zonal_url, Some(token.trim().to_owned()), Some(&tls_ca))
        .map_err(|e| Failed(e.to_string()))?;
    wait_unit_seen(&handle, &api, rack, deadline, stop)?;
    ensure_volume(
        &handle,
        &api,
        (volume_size_bytes, partition_size_bytes),
        deadline,
        stop,
    )?;

    let mut attach_argv = runtime.clone();
    attach_argv.extend([
        "attach".to_string(),
        VOLUME.to_string(),
        "--listen".to_string(),
        args.nbd_listen.to_string(),
        "--zonal".to_string(),
        zonal_url,
        "--zonal-ca".to_string(),
        tls_ca.display().to_string(),
        "--host".to_string(),
        "rackblock-up".to_string(),
        "--admin".to_string(),
        attach_admin(args).map_err(Failed)?.to_string(),
    ]);
    let tls = client::tls::TlsFiles::in_dir(&data_dir.join(TLS_DIR));
    attach_argv.extend([
        "--tls-cert".to_string(),
        tls.server_cert.display().to_string(),
        "--tls-key".to_string(),
        tls.server_key.display().to_string(),
    ]);
    if !args.no_iscsi {
        for portal in &args.iscsi_listen {
            attach_argv.push("--iscsi".to_string());
            attach_argv.push(portal.to_string());
        }
    }
    // The token goes through the environment, not argv (ps shows argv).
    let attach = spawn_daemon(
        data_dir,
        "attach",
        &attach_argv,
        &[("RACKBLOCK_TOKEN", token.trim().to_owned())],
        Probe::Nbd(args.nbd_listen),
        StopRank::Attach,
    )
    .map_err(Failed)?;
    daemons.push(attach);
    let deadline = deadline.max(Instant::now() + Duration::from_secs(30));
    let attach_only = daemons.len() - 1;
    wait_ready(
        &mut daemons[attach_only..],
        "NBD export of vol0 answering",
        deadline,
        stop,
    )
}

/// Waits until the zonal plane's report of the unit says every head node
/// and sled is up (the zonal plane polls each second; `refresh` asks now).
fn wait_unit_seen(
    handle: &tokio::runtime::Handle,
    api: &crate::http::ZonalApi,
    rack: &hardware::rack::Rack,
    deadline: Instant,
    stop: &StopFlag,
) -> Result<(), Failed> {
    let total = (rack.head_node.len() + rack.sled.len()) as u64;
    let path = format!(
        "/v1/units/{}/refresh",
        crate::http::segment(&rack.unit.name)
    );
    loop {
        let mut up = 0;
        let last = match handle.block_on(api.call("POST", &path, None)) {
            Ok(reply) => {
                let field = |name: &str| reply.body.get(name).and_then(|v| v.as_u64()).unwrap_or(0);
                up = field("head_nodes_up") + field("sleds_up");
                let last = format!(
                    "health {}, {}",
                    reply
                        .body
                        .get("health")
                        .and_then(|v| v.as_str())
                        .unwrap_or("?"),
                    reply
                        .body
                        .get("last_error")
                        .and_then(|v| v.as_str())
                        .unwrap_or("no error")
                );
                if reply.body.get("reachable").and_then(|v| v.as_bool()) == Some(true)
                    && up >= total
                {
                    crate::text::draw_progress(total, total, "up as the zonal plane sees the unit");
                    crate::text::end_progress();
                    return Ok(());
                }
                last
            }
            Err(error) => error.line(),
        };
        crate::text::draw_progress(up, total, "up as the zonal plane sees the unit");
        if stop.load() {
            return Err(Failed("interrupted".into()));
        }
        if Instant::now() >= deadline {
            return Err(Failed(format!(
                "the zonal control plane does not see unit {} healthy: {last}",
                rack.unit.name
            )));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Creates vol0 unless it exists (of `size_bytes`, in partitions of
/// `partition_size_bytes` or the zonal plane's default); retries while the
/// unit settles (503).
fn ensure_volume(
    handle: &tokio::runtime::Handle,
    api: &crate::http::ZonalApi,
    (size_bytes, partition_size_bytes): (u64, Option<u64>),
    deadline: Instant,
    stop: &StopFlag,
) -> Result<(), Failed> {
    let path = format!("/v1/volumes/{VOLUME}");
    match handle.block_on(api.call("GET", &path, None)) {
        Ok(reply) => {
            let size = reply
                .body
                .get("size_bytes")
                .and_then(|v| v.as_u64())
                .unwrap_or(0);
            let state = reply
                .body
                .get("state")
                .and_then(|v| v.as_str())
                .unwrap_or("?");
            if state == "available" {
                println!(
                    "reusing volume {VOLUME} ({})",
                    crate::text::human_bytes(size)
                );
                return Ok(());
            }
            // `creating`: the same create below settles it.
        }
        Err(crate::error::CliError::Api { status: 404, .. }) => {}
        Err(error) => return Err(Failed(format!("cannot look up {VOLUME}: {}", error.line()))),
    }
    let mut body = serde_json::json!({ "name": VOLUME, "size_bytes": size_bytes });
    if let Some(bytes) = partition_size_bytes {
        body["partition_size_bytes"] = serde_json::json!(bytes);
    }
    loop {
        match handle.block_on(api.call("POST", "/v1/volumes", Some(&body))) {
            Ok(reply) => {
                let size = reply
                    .body
                    .get("size_bytes")
                    .and_then(|v| v.as_u64())
                    .unwrap_or(size_bytes);
                println!(
                    "created volume {VOLUME} ({})",
                    crate::text::human_bytes(size)
                );
                return Ok(());
            }
            Err(error @ crate::error::CliError::Api { status: 503, .. })
            | Err(error @ crate::error::CliError::Unavailable(_)) => {
                if stop.load() {
                    return Err(Failed("interrupted".into()));
                }
                if Instant::now() >= deadline {
                    return Err(Failed(format!("cannot create {VOLUME}: {}", error.line())));
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(crate::error::CliError::Api { status: 409, .. }) => {
                // Exists with another spec (another --volume-size): keep it.
                println!("reusing volume {VOLUME} (created earlier with another size)");
                return Ok(());
            }
            Err(error) => return Err(Failed(format!("cannot create {VOLUME}: {}", error.line()))),
        }
    }
}

/// The local control plane's view (leader and term), bounded.
fn unit_status(
    rack: &hardware::rack::Rack,
    rack_path: &Path,
    wait: Duration,
) -> Option<local_control_plane::RaftStatus> {
    let handle = tokio::runtime::Handle::try_current().ok()?;
    let credential = crate::unit::operator_credential(rack_path);
    let client = handle.block_on(async { local_control_plane::LcpClient::new(rack, credential) });
    let status = handle
        .block_on(tokio::time::timeout(wait, client.unit_status()))
        .ok()
        .and_then(Result::ok);
    client.close();
    status.map(|(raft, _)| raft)
}

fn print_status(data_dir: &Path, rack: &hardware::rack::Rack, args: &UpArgs, daemons: &[Daemon]) {
    println!(
        "unit {} is up (data in {})",
        rack.unit.name,
        data_dir.display()
    );
    match unit_status(rack, &data_dir.join("rack.toml"), Duration::from_secs(10)) {
        Some(raft) => println!(
            "local control plane: leader {}, term {}",
            raft.leader_name.as_deref().unwrap_or("none"),
            raft.term
        ),
        None => println!("local control plane: no status yet (see `rackblock unit status`)"),
    }
    let uri = format!("nbd://{}/{VOLUME}", args.nbd_listen);
    println!();
    println!("{VOLUME} is attached and served over NBD at {uri}:");
    println!("  nbdinfo {uri}");
    println!("  qemu-io -f raw {uri} -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M'");
    println!("  qemu-img convert -n -O raw disk.img {uri}");
    let tls = client::tls::TlsFiles::in_dir(&data_dir.join(TLS_DIR));
    let client_dir = tls.client_dir.display();
    println!(
        "TLS is offered (NBD_OPT_STARTTLS) with the local CA {}:",
        tls.ca_cert.display()
    );
    println!(
        "  nbdinfo 'nbds://{}/{VOLUME}?tls-certificates={client_dir}'",
        args.nbd_listen
    );
    println!(
        "  qemu-io --object tls-creds-x509,id=tls0,endpoint=client,dir={client_dir} \\\n      --image-opts driver=nbd,host={},port={},export={VOLUME},tls-creds=tls0 -c 'read 0 1M'",
        args.nbd_listen.ip(),
        args.nbd_listen.port()
    );
    println!(
        "  fio --name=randwrite --ioengine=nbd --uri={uri} --rw=randwrite --bs=4k --iodepth=32 --size=1G --time_based --runtime=10"
    );
    if !args.no_iscsi && !args.iscsi_listen.is_empty() {
        let target = client::iscsi::target_name_for(VOLUME);
        println!();
        println!("{VOLUME} is also LUN 0 of iSCSI target {target}, portals:");
        for portal in &args.iscsi_listen {
            println!("  {portal}  iscsi://{portal}/{target}/0");
        }
        if let Some(portal) = args.iscsi_listen.first() {
            println!("  iscsi-ls -s iscsi://{portal}");
            println!("  iscsi-inq iscsi://{portal}/{target}/0");
            println!("  iscsiadm -m discovery -t sendtargets -p {portal}");
        }
    }
    println!();
    let mut table =
        crate::text::Table::new(&["DAEMON", "HOST PORT", "NETWORK A", "NETWORK B", "METRICS"]);
    for head in &rack.head_node {
        table.row(vec![
            head.id.clone(),
            head.host
                .map_or_else(|| "-".into(), |host| host.to_string()),
            head.address_a.to_string(),
            head.address_b.to_string(),
            format!("http://{}/metrics", head.admin),
        ]);
    }
    for sled in &rack.sled {
        table.row(vec![
            sled.id.clone(),
            "-".into(),
            sled.address_a.to_string(),
            sled.address_b.to_string(),
            format!("http://{}/metrics", sled.admin),
        ]);
    }
    table.row(vec![
        "zonal".into(),
        format!("https://{}/v1", args.zonal_listen),
        "-".into(),
        "-".into(),
        format!("https://{}/metrics", args.zonal_listen),
    ]);
    table.row(vec![
        "attach".into(),
        uri.clone(),
        "-".into(),
        "-".into(),
        attach_admin(args).map_or_else(|e| e, |a| format!("http://{a}/metrics")),
    ]);
    table.print();
    println!(
        "the unit's keys are in {} (SECURITY.md); hosts use only the host ports",
        proto::auth::default_credentials_dir(&data_dir.join("rack.toml")).display()
    );
    println!();
    let default_dir = std::path::absolute(crate::ops::DEFAULT_DATA_DIR).ok();
    let default_zonal = args.zonal_listen.to_string() == "127.0.0.1:9000";
    if default_dir.as_deref() != Some(data_dir) || !default_zonal {
        println!("for the CLI from another directory or shell:");
        println!(
            "  export RACKBLOCK_ZONAL=https://{} RACKBLOCK_ZONAL_CA={} RACKBLOCK_UNIT_CA={} RACKBLOCK_TOKEN=$(cat {}) RACKBLOCK_RACK={}",
            args.zonal_listen,
            tls.ca_cert.display(),
            tls.ca_cert.display(),
            data_dir.join(crate::ops::TOKEN_FILE).display(),
            data_dir.join("rack.toml").display()
        );
    }
    println!("  rackblock unit status          # zonal view + leader, term, members, sleds, devices, capacity");
    println!("  rackblock volume describe {VOLUME}  # partition map");
    println!("  rackblock volume list | sled list | head-node list");
    println!(
        "pids and logs: {}/run/  ({} daemons; kill -9 one sled and watch the others carry on)",
        data_dir.display(),
        daemons.len()
    );
}

/// A flag set by SIGINT/SIGTERM, read by the blocking supervisor loop.
struct StopFlag(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl StopFlag {
    fn load(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

fn install_stop_flag() -> Result<StopFlag, String> {
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handle = tokio::runtime::Handle::try_current().map_err(|e| e.to_string())?;
    let set = flag.clone();
    handle.spawn(async move {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        set.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    Ok(StopFlag(flag))
}

#[cfg(test)]
mod tests {
    use super::daemon_runtime_args;

    #[test]
    fn daemons_get_single_threaded_runtimes_unless_told_otherwise() {
        let flag = |threads: &str| vec!["--worker-threads".to_string(), threads.to_string()];
        assert_eq!(daemon_runtime_args(None, false), flag("1"));
        // RACKBLOCK_WORKER_THREADS in up's environment reaches the daemons.
        assert!(daemon_runtime_args(None, true).is_empty());
        // The flag wins over the environment.
        assert_eq!(daemon_runtime_args(Some(0), true), flag("0"));
        assert_eq!(daemon_runtime_args(Some(4), false), flag("4"));
    }
}
