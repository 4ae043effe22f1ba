//! `rackblock up`: a whole unit on this machine.
//!
//! In a data directory (default `./rackblock-data`) it writes a rack file
//! whose nodes listen on two loopback address sets (network A `127.0.1.x`,
//! network B `127.0.2.x`), creates file-backed devices, and starts every
//! daemon as its own process, with its pid and log under `run/`, so that an
//! operator can `kill -9` one and watch the unit cope. A second `up` in the
//! same directory reuses the rack file and the devices (the data survives).
//! Ctrl-C (or SIGTERM) stops every child: SIGTERM, then SIGKILL after a grace
//! period.
//!
//! What runs today: the sled controllers and three head nodes (`hn-1..3`,
//! configs in `config/hn-N.toml`, Raft data in `hn-N/`), which elect a
//! leader of the local control plane among themselves and register the
//! rack's inventory with no manual step. `up` waits until every daemon is
//! healthy (a head node is healthy once it knows a leader) and prints the
//! unit status. The zonal control plane and the NBD attach agent join as
//! their issues land.

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
    /// First port of the unit's data ports; sleds use base+100.
    #[arg(long, default_value_t = 7000)]
    base_port: u16,
    /// First port of the admin (HTTP) ports on 127.0.0.1; sleds use base+100+i.
    #[arg(long, default_value_t = 9100)]
    admin_base_port: u16,
    /// Give up waiting for the unit to become healthy after this many seconds.
    #[arg(long, default_value_t = 60)]
    wait_seconds: u64,
    /// Start, wait until healthy, print the status, stop everything and exit
    /// (for scripts and tests).
    #[arg(long)]
    check: bool,
}

const HEAD_NODES: u32 = 3;

struct Daemon {
    name: String,
    admin: SocketAddr,
    pid_file: PathBuf,
    child: Child,
    exited: bool,
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
    let _ = writeln!(
        rack,
        "# Written by `rackblock up`; edit freely, it is reused by the next `up`.\n\
         [unit]\nname = \"local\"\ncolumn_size_bytes = 67108864\nerasure_codes = [\"4+2\"]\n"
    );
    for h in 1..=HEAD_NODES {
        let _ = writeln!(
            rack,
            "[[head_node]]\nid = \"hn-{h}\"\naddress_a = \"127.0.1.{h}:{data_port}\"\n\
             address_b = \"127.0.2.{h}:{data_port}\"\nadmin = \"127.0.0.1:{}\"\n",
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
fn prepare(args: &UpArgs) -> Result<(PathBuf, hardware::rack::Rack), String> {
    let data_dir = std::path::absolute(&args.data_dir)
        .map_err(|e| format!("{}: {e}", args.data_dir.display()))?;
    for sub in ["", "devices", "run", "config"] {
        std::fs::create_dir_all(data_dir.join(sub))
            .map_err(|e| format!("cannot create {}: {e}", data_dir.join(sub).display()))?;
    }
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
    for sled in &rack.sled {
        let config = format!(
            "# Written by `rackblock up`.\nrack_file = \"{}\"\nsled_id = \"{}\"\n\
             scrub_bytes_per_second = 33554432\nscrub_pass_interval_ms = 60000\n",
            rack_path.display(),
            sled.id
        );
        let path = data_dir.join("config").join(format!("{}.toml", sled.id));
        std::fs::write(&path, config)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    for head in &rack.head_node {
        let config = format!(
            "# Written by `rackblock up`.\nrack_file = \"{}\"\nhead_node_id = \"{}\"\n\
             data_dir = \"{}\"\n",
            rack_path.display(),
            head.id,
            data_dir.join(&head.id).display()
        );
        let path = data_dir.join("config").join(format!("{}.toml", head.id));
        std::fs::write(&path, config)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok((data_dir, rack))
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence and permission.
    unsafe { libc::kill(pid, 0) == 0 }
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

fn spawn_daemon(
    data_dir: &Path,
    name: &str,
    args: &[String],
    admin: SocketAddr,
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
        admin,
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

fn stop_all(daemons: &mut [Daemon]) {
    for daemon in daemons.iter_mut().filter(|d| !d.exited) {
        if let Ok(pid) = i32::try_from(daemon.child.id()) {
            // SAFETY: signalling our own child process by pid.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for daemon in daemons.iter_mut() {
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
        let _ = std::fs::remove_file(&daemon.pid_file);
    }
}

fn up(args: UpArgs) -> ExitCode {
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
    for head in &rack.head_node {
        let config = data_dir.join("config").join(format!("{}.toml", head.id));
        let argv = vec![
            "head-node".to_string(),
            "--config".to_string(),
            config.display().to_string(),
        ];
        match spawn_daemon(&data_dir, &head.id, &argv, head.admin) {
            Ok(daemon) => daemons.push(daemon),
            Err(error) => {
                stop_all(&mut daemons);
                return fail(error);
            }
        }
    }
    for sled in &rack.sled {
        let config = data_dir.join("config").join(format!("{}.toml", sled.id));
        let argv = vec![
            "sled-controller".to_string(),
            "--config".to_string(),
            config.display().to_string(),
        ];
        match spawn_daemon(&data_dir, &sled.id, &argv, sled.admin) {
            Ok(daemon) => daemons.push(daemon),
            Err(error) => {
                stop_all(&mut daemons);
                return fail(error);
            }
        }
    }
    // Wait for every daemon's /health, with a one-line progress display.
    let deadline = Instant::now() + Duration::from_secs(args.wait_seconds);
    loop {
        let healthy = daemons
            .iter()
            .filter(|d| http_get_status(d.admin, "/health") == Some(200))
            .count();
        print!(
            "\rwaiting for the unit: {healthy}/{} daemons healthy ",
            daemons.len()
        );
        let _ = std::io::stdout().flush();
        if healthy == daemons.len() {
            println!();
            break;
        }
        let dead: Vec<String> = daemons
            .iter_mut()
            .filter_map(|d| match d.child.try_wait() {
                Ok(Some(status)) => Some(format!("{} exited ({status})", d.name)),
                _ => None,
            })
            .collect();
        if !dead.is_empty() || Instant::now() >= deadline || stop.load() {
            println!();
            stop_all(&mut daemons);
            let why = if dead.is_empty() {
                "timed out".to_string()
            } else {
                dead.join(", ")
            };
            return fail(format!(
                "unit did not become healthy: {why}; logs are in {}",
                data_dir.join("run").display()
            ));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    print_status(&data_dir, &rack, &args);
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
                eprintln!(
                    "{} exited ({status}); the unit carries on without it. `rackblock up` in another \
                     shell will not restart it while this one runs; restart this `up` to bring it back.",
                    daemon.name
                );
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("stopping the unit");
    stop_all(&mut daemons);
    ExitCode::SUCCESS
}

/// The local control plane's view, once it has registered the inventory
/// (the leader does that right after its election).
fn unit_status(
    rack: &hardware::rack::Rack,
    wait: Duration,
) -> Option<(
    local_control_plane::RaftStatus,
    local_control_plane::UnitStatus,
)> {
    let handle = tokio::runtime::Handle::try_current().ok()?;
    let deadline = Instant::now() + wait;
    let client = handle.block_on(async { local_control_plane::LcpClient::new(rack) });
    let mut status = None;
    while Instant::now() < deadline {
        status = handle.block_on(client.unit_status()).ok();
        if let Some((_, unit)) = &status {
            if unit.nodes.len() == rack.head_node.len() && unit.sleds.len() == rack.sled.len() {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    client.close();
    status
}

fn print_status(data_dir: &Path, rack: &hardware::rack::Rack, args: &UpArgs) {
    println!(
        "unit {} is up (data in {})",
        rack.unit.name,
        data_dir.display()
    );
    match unit_status(rack, Duration::from_secs(args.wait_seconds.min(20))) {
        Some((raft, _)) => {
            println!(
                "local control plane: leader {}, term {}",
                raft.leader_name.as_deref().unwrap_or("none"),
                raft.term
            );
        }
        None => println!("local control plane: no status yet (see `rackblock unit status`)"),
    }
    println!(
        "{:<10} {:<22} {:<22} {:<40}",
        "HEAD NODE", "NETWORK A", "NETWORK B", "METRICS"
    );
    for head in &rack.head_node {
        println!(
            "{:<10} {:<22} {:<22} http://{}/metrics",
            head.id,
            head.address_a.to_string(),
            head.address_b.to_string(),
            head.admin
        );
    }
    println!(
        "{:<10} {:<22} {:<22} {:<40}",
        "SLED", "NETWORK A", "NETWORK B", "METRICS"
    );
    for sled in &rack.sled {
        println!(
            "{:<10} {:<22} {:<22} http://{}/metrics",
            sled.id,
            sled.address_a.to_string(),
            sled.address_b.to_string(),
            sled.admin
        );
    }
    println!(
        "pids and logs: {}/run/  (kill -9 one sled and watch the others carry on)",
        data_dir.display()
    );
    println!(
        "unit status: rackblock unit status --rack {}",
        data_dir.join("rack.toml").display()
    );
    println!("not yet running: zonal control plane and the NBD attach of vol0 (issues 4-5)");
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
