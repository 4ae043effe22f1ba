//! Cluster harness for end-to-end tests: real `rackblock` processes on
//! loopback addresses (network A `127.0.1.x`, network B `127.0.2.x`), a TCP
//! fault proxy that models a broken network path, and small helpers.
//!
//! Every process a test starts is owned by a [`Daemon`] and killed by pid
//! when the test drops it, so a failing test leaves nothing running.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod netns;
pub mod proxy;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

/// Reads `volume_bytes` of a volume in reads of `piece` bytes and hands
/// each piece and its offset to `check`; the first error ends the walk.
pub async fn check_volume_in_pieces(
    client: &client::VolumeClient,
    volume_bytes: u64,
    piece: u64,
    when: &str,
    mut check: impl FnMut(u64, &[u8]) -> Result<(), String>,
) -> Result<(), String> {
    for offset in (0..volume_bytes).step_by(piece as usize) {
        let data = client
            .read(offset, piece)
            .await
            .map_err(|e| format!("{when}: read at {offset}: {e}"))?;
        check(offset, &data)?;
    }
    Ok(())
}

/// Registers an attachment of `volume` straight with the unit (as
/// `rackblock attachment create` does) and connects a volume client with
/// it over the unit port, as a member (the harness holds the unit key): the
/// tests of network faults on A and B see the client fail over between
/// them. Head nodes refuse host requests without a valid attachment
/// credential. (Hosts use the host port: [`connect_host_client`].)
pub async fn connect_client(
    unit: &TestUnit,
    volume: u64,
    mut config: client::ClientConfig,
) -> Result<client::VolumeClient, String> {
    let lcp = unit.lcp_client();
    let credential = client::register_attachment(&lcp, volume, "test-host")
        .await
        .map_err(|e| format!("cannot register an attachment of volume {volume}: {e}"))?;
    config.link.auth = Some(unit.member());
    client::VolumeClient::connect(lcp, volume, credential, config)
        .await
        .map_err(|e| e.to_string())
}

/// A volume client as a host has one: attachment `credential`, the head
/// nodes' host ports, nothing else.
pub async fn connect_host_client(
    unit: &TestUnit,
    volume: u64,
    credential: proto::volume::AttachmentCredential,
    config: client::ClientConfig,
) -> Result<client::VolumeClient, client::ClientError> {
    client::VolumeClient::connect_host(&unit.host_endpoints(), volume, credential, config).await
}

/// Registers a volume (`command` is a `RegisterVolume`) through the LCP,
/// retrying every 200 ms until `timeout` while the unit settles (a
/// retryable refusal, an unreachable leader); panics on anything else.
/// Returns the placement: (primary, secondary) per partition.
pub async fn register_volume(
    lcp: &local_control_plane::LcpClient,
    command: local_control_plane::Command,
    timeout: Duration,
) -> Vec<(local_control_plane::NodeId, local_control_plane::NodeId)> {
    use local_control_plane::Outcome;
    let deadline = Instant::now() + timeout;
    loop {
        match lcp.command(command.clone()).await {
            Ok(Ok(Outcome::VolumeRegistered { placement, .. })) => return placement,
            Ok(Err(e)) if e.is_retryable() && Instant::now() < deadline => {}
            Err(e) if Instant::now() < deadline => eprintln!("register: {e}"),
            other => panic!("register volume ({command:?}): {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The seed of a randomized test: the environment variable `var` when it
/// is set to a number (to replay a failure), else the clock. Callers print
/// it.
pub fn seed_from_env(var: &str) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
}

/// The `rackblock` binary the end-to-end tests start: `$RACKBLOCK_BIN` when
/// set (benches point it at a release build), else `target/debug/rackblock`
/// of this workspace, brought up to date first by `cargo build -p cli` (once
/// per test process), so that a plain `cargo test` never runs the end-to-end
/// tests against a binary built from older sources. Cargo releases its build
/// lock before it runs tests, so the nested build does not wait on it.
pub fn rackblock_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("RACKBLOCK_BIN") {
        return PathBuf::from(bin);
    }
    static FRESH: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    match FRESH.get_or_init(build_rackblock) {
        Ok(bin) => bin.clone(),
        Err(error) => panic!("{error}"),
    }
}

/// Runs `cargo build -p cli --bin rackblock` in this workspace and returns
/// the binary's path.
fn build_rackblock() -> Result<PathBuf, String> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let output = Command::new(&cargo)
        .args(["build", "--quiet", "-p", "cli", "--bin", "rackblock"])
        .current_dir(&workspace)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {cargo} to build rackblock: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "`cargo build -p cli --bin rackblock` failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    // The nested cargo ran in `workspace`: a relative target dir is taken
    // from there.
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(|dir| workspace.join(dir))
        .unwrap_or_else(|_| workspace.join("target"));
    let bin = target.join("debug/rackblock");
    if !bin.exists() {
        return Err(format!("{} is missing after cargo build", bin.display()));
    }
    Ok(bin)
}

/// Ports handed out to tests of this process; distinct per test so tests can
/// run in parallel. Based on the pid to avoid clashes between test binaries:
/// 1000 ports per process in 10000..30000, below the kernel's ephemeral
/// range (32768..) and the ranges `rackblock up` tests use (30000.., 40000..).
pub fn next_port() -> u16 {
    port_base() + NEXT_PORT.fetch_add(1, Ordering::SeqCst) % 1000
}

/// The counter behind [`next_port`] and [`next_ports`].
static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

fn port_base() -> u16 {
    // Engineers running several test runs side by side (one per worktree)
    // pin each run to its own block: RACKBLOCK_TEST_PORT_SLOT=0..19.
    let slot = std::env::var("RACKBLOCK_TEST_PORT_SLOT")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .map(|slot| slot % 20)
        .unwrap_or(std::process::id() % 20);
    10000 + slot as u16 * 1000
}

/// Reserves `count` consecutive ports from [`next_port`]'s range (a block
/// never wraps around the end of the range); returns the first.
pub fn next_ports(count: u16) -> u16 {
    assert!((1..=500).contains(&count), "next_ports({count})");
    // At most one attempt lands across the end; the next one starts at 0.
    for _ in 0..3 {
        let start = NEXT_PORT.fetch_add(count, Ordering::SeqCst) % 1000;
        if start + count <= 1000 {
            return port_base() + start;
        }
    }
    unreachable!("a block of {count} ports fits after one wrap");
}

/// A child process killed (SIGKILL, by pid) when dropped.
#[derive(Debug)]
pub struct Daemon {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn spawn(name: &str, args: &[&str], log_dir: &Path) -> Daemon {
        Daemon::spawn_with_env(name, args, log_dir, &[])
    }

    /// [`Daemon::spawn`] with extra environment variables (test hooks such
    /// as `RACKBLOCK_TEST_WAL_FAULT_FILE`).
    pub fn spawn_with_env(
        name: &str,
        args: &[&str],
        log_dir: &Path,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Daemon {
        let mut command = Command::new(rackblock_bin());
        command.args(args).envs(env.iter().copied());
        Daemon::spawn_command(name, command, log_dir.join(format!("{name}.log")))
    }

    /// Runs `command` as daemon `name` at `RUST_LOG=info`, its output
    /// appended to `log`.
    pub fn spawn_command(name: &str, mut command: Command, log: PathBuf) -> Daemon {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let err = out.try_clone().unwrap();
        let child = command
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap();
        Daemon {
            name: name.to_string(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// `kill -9`, and reap.
    pub fn kill9(&mut self) {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.pid(), libc::SIGKILL) };
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait (bounded) for a clean exit; returns whether it exited 0.
    pub fn terminate(&mut self) -> bool {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        false
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

/// The value of the first sample of an OpenMetrics text whose line starts
/// with `prefix` (name and labels), or `None`.
pub fn metric_sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|line| line.starts_with(prefix))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// Minimal HTTP/1.0 GET: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    http_exchange(addr, &request, Duration::from_secs(5))
}

/// Minimal HTTP/1.0 POST with an empty body: (status, body).
pub fn http_post(addr: SocketAddr, path: &str, timeout: Duration) -> Option<(u16, String)> {
    let request = format!("POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n");
    http_exchange(addr, &request, timeout)
}

/// Sends `request` and reads the response to EOF: (status, body).
fn http_exchange(addr: SocketAddr, request: &str, timeout: Duration) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// Polls `GET /health` until 200 or the deadline; panics with the log tail.
pub fn wait_healthy(admin: SocketAddr, daemon: &Daemon, timeout: Duration) {
    poll_daemon(daemon, "not healthy", timeout, || {
        matches!(http_get(admin, "/health"), Some((200, _)))
    });
}

/// Polls `ready` every 50 ms until it holds; after `timeout`, panics
/// saying `daemon` is `not_yet`, with its log.
fn poll_daemon(daemon: &Daemon, not_yet: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ready() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "{} {not_yet} after {timeout:?}; log:\n{}",
        daemon.name,
        daemon.log_text()
    );
}

/// A small unit on disk: a rack file with `sleds` sleds (two devices each,
/// `device_bytes` each) using code `k+m`, sled configs, device files, and
/// head nodes with their configs.
#[derive(Debug)]
pub struct TestUnit {
    pub dir: tempfile::TempDir,
    pub rack_path: PathBuf,
    pub sleds: Vec<TestSled>,
    pub head_nodes: Vec<TestHeadNode>,
}

/// How [`TestUnit::build`] lays out head nodes.
#[derive(Debug, Clone)]
pub struct HeadNodeOptions {
    /// Number of `[[head_node]]` entries.
    pub count: u32,
    /// Put network A behind a proxy: the rack's `address_a` is where a test
    /// [`proxy::FaultProxy`] should listen, the head node binds
    /// `listen_a` (a different port) and the proxy forwards there.
    pub proxied_a: bool,
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    pub node_down_after_ms: u64,
    /// Both paths refusing connections this long ⇒ Down (a dead process).
    pub node_refused_down_after_ms: u64,
}

impl HeadNodeOptions {
    /// The head node's production timing defaults (failover tests and
    /// benchmarks measure what a deployment gets).
    pub fn production_timings(count: u32) -> HeadNodeOptions {
        use local_control_plane::node as lcp;
        HeadNodeOptions {
            count,
            proxied_a: false,
            heartbeat_interval_ms: lcp::DEFAULT_HEARTBEAT_INTERVAL_MS,
            election_timeout_min_ms: lcp::DEFAULT_ELECTION_TIMEOUT_MIN_MS,
            election_timeout_max_ms: lcp::DEFAULT_ELECTION_TIMEOUT_MAX_MS,
            node_down_after_ms: lcp::DEFAULT_NODE_DOWN_AFTER_MS,
            node_refused_down_after_ms: lcp::DEFAULT_NODE_REFUSED_DOWN_AFTER_MS,
        }
    }
}

impl Default for HeadNodeOptions {
    fn default() -> Self {
        // Slower than production defaults: tests share two cores with
        // debug builds and must not see spurious elections.
        HeadNodeOptions {
            count: 1,
            proxied_a: false,
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 1500,
            election_timeout_max_ms: 3000,
            node_down_after_ms: 3000,
            node_refused_down_after_ms: 1000,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TestHeadNode {
    pub id: String,
    /// The rack's network A address (the proxy's, when proxied).
    pub address_a: SocketAddr,
    pub address_b: SocketAddr,
    /// Where the head node binds network A.
    pub listen_a: SocketAddr,
    pub admin: SocketAddr,
    /// The host port (on 127.0.0.x).
    pub host: SocketAddr,
    pub config: PathBuf,
    pub data_dir: PathBuf,
}

/// The unit key of the test unit whose directory holds `file` (a daemon's
/// config: the rack file and `credentials/` are beside it).
fn member_beside(file: &Path) -> std::sync::Arc<proto::auth::Credential> {
    let dir = file.parent().unwrap_or_else(|| Path::new("."));
    std::sync::Arc::new(
        proto::auth::load_credential(
            &dir.join("credentials"),
            proto::auth::Role::HeadNode,
            "test-harness",
        )
        .unwrap(),
    )
}

impl TestHeadNode {
    /// The unit key (what a member shows on the unit port).
    pub fn member(&self) -> std::sync::Arc<proto::auth::Credential> {
        member_beside(&self.config)
    }
}

impl TestSled {
    /// The unit key: a sled takes requests only from members.
    pub fn member(&self) -> std::sync::Arc<proto::auth::Credential> {
        member_beside(&self.config)
    }
}

#[derive(Debug, Clone)]
pub struct TestSled {
    pub id: String,
    pub address_a: SocketAddr,
    pub address_b: SocketAddr,
    pub admin: SocketAddr,
    pub config: PathBuf,
    pub devices: Vec<PathBuf>,
}

impl TestUnit {
    /// A client of this unit's local control plane with the timings the
    /// end-to-end tests use: fast probes and connects, a 3 s request
    /// timeout, 10 retries 300 ms apart (a leader change fits inside).
    pub fn lcp_client(&self) -> local_control_plane::LcpClient {
        local_control_plane::LcpClient::with_config(
            &self.rack(),
            proto::link::LinkConfig {
                connect_timeout: Duration::from_millis(300),
                request_timeout: Duration::from_secs(3),
                probe_interval: Duration::from_millis(200),
                probe_timeout: Duration::from_millis(300),
                failures_before_down: 2,
                auth: Some(self.member()),
                tls: None,
            },
        )
        .with_retries(10, Duration::from_millis(300))
    }

    /// The unit key, as a member (what the harness and its tools use on
    /// the unit port).
    pub fn member(&self) -> std::sync::Arc<proto::auth::Credential> {
        std::sync::Arc::new(
            proto::auth::load_credential(
                &self.credentials_dir(),
                proto::auth::Role::HeadNode,
                "test-harness",
            )
            .unwrap(),
        )
    }

    /// Where the unit's credentials are (beside the rack file).
    pub fn credentials_dir(&self) -> PathBuf {
        proto::auth::default_credentials_dir(&self.rack_path)
    }

    /// The head nodes' host ports.
    pub fn host_endpoints(&self) -> Vec<client::HostEndpoint> {
        self.head_nodes
            .iter()
            .map(|h| client::HostEndpoint {
                node: h.id.clone(),
                address: h.host,
            })
            .collect()
    }

    pub fn new(sleds: u32, code: &str, device_bytes: u64, column_bytes: u64) -> TestUnit {
        TestUnit::build(
            HeadNodeOptions::default(),
            sleds,
            code,
            device_bytes,
            column_bytes,
        )
    }

    pub fn build(
        heads: HeadNodeOptions,
        sleds: u32,
        code: &str,
        device_bytes: u64,
        column_bytes: u64,
    ) -> TestUnit {
        let dir = tempfile::tempdir().unwrap();
        let mut rack = format!(
            "[unit]\nname = \"test\"\ncolumn_size_bytes = {column_bytes}\nerasure_codes = [\"{code}\"]\n\n"
        );
        let mut head_nodes = Vec::new();
        for h in 1..=heads.count {
            let port = next_port();
            let address_a: SocketAddr = format!("127.0.1.{h}:{port}").parse().unwrap();
            let address_b: SocketAddr = format!("127.0.2.{h}:{port}").parse().unwrap();
            let listen_a: SocketAddr = if heads.proxied_a {
                format!("127.0.1.{h}:{}", next_port()).parse().unwrap()
            } else {
                address_a
            };
            let admin = SocketAddr::from(([127, 0, 0, 1], next_port()));
            let host: SocketAddr = format!("127.0.0.{h}:{}", next_port()).parse().unwrap();
            rack.push_str(&format!(
                "[[head_node]]\nid = \"hn-{h}\"\naddress_a = \"{address_a}\"\naddress_b = \"{address_b}\"\nadmin = \"{admin}\"\nhost = \"{host}\"\n\n"
            ));
            head_nodes.push(TestHeadNode {
                id: format!("hn-{h}"),
                address_a,
                address_b,
                listen_a,
                admin,
                host,
                config: dir.path().join(format!("hn-{h}.toml")),
                data_dir: dir.path().join(format!("hn-{h}")),
            });
        }
        let mut list = Vec::new();
        for s in 1..=sleds {
            let port = next_port();
            let admin = SocketAddr::from(([127, 0, 0, 1], next_port()));
            let address_a: SocketAddr = format!("127.0.1.{}:{port}", 100 + s).parse().unwrap();
            let address_b: SocketAddr = format!("127.0.2.{}:{port}", 100 + s).parse().unwrap();
            rack.push_str(&format!(
                "[[sled]]\nid = \"sled-{s}\"\naddress_a = \"{address_a}\"\naddress_b = \"{address_b}\"\nadmin = \"{admin}\"\n"
            ));
            let mut devices = Vec::new();
            for d in 0..2 {
                let path = dir.path().join(format!("sled-{s}-dev{d}.img"));
                std::fs::File::create(&path)
                    .unwrap()
                    .set_len(device_bytes)
                    .unwrap();
                rack.push_str(&format!(
                    "[[sled.device]]\npath = \"{}\"\nsize_bytes = {device_bytes}\nfault_domain = \"fd-{s}\"\n",
                    path.display()
                ));
                devices.push(path);
            }
            rack.push('\n');
            let config = dir.path().join(format!("sled-{s}.toml"));
            list.push(TestSled {
                id: format!("sled-{s}"),
                address_a,
                address_b,
                admin,
                config,
                devices,
            });
        }
        let rack_path = dir.path().join("rack.toml");
        std::fs::write(&rack_path, rack).unwrap();
        let sled_ids: Vec<String> = list.iter().map(|s| s.id.clone()).collect();
        proto::auth::init_credentials(
            &proto::auth::default_credentials_dir(&rack_path),
            &sled_ids,
            &[proto::auth::DEFAULT_OPERATOR.into(), "zonal".into()],
            false,
        )
        .unwrap();
        for sled in &list {
            std::fs::write(
                &sled.config,
                format!(
                    "rack_file = \"{}\"\nsled_id = \"{}\"\nscrub_bytes_per_second = 0\nscrub_pass_interval_ms = 60000\n",
                    rack_path.display(),
                    sled.id
                ),
            )
            .unwrap();
        }
        for head in &head_nodes {
            let mut config = format!(
                "rack_file = \"{}\"\nhead_node_id = \"{}\"\ndata_dir = \"{}\"\n\
                 heartbeat_interval_ms = {}\nelection_timeout_min_ms = {}\n\
                 election_timeout_max_ms = {}\nnode_down_after_ms = {}\n\
                 node_refused_down_after_ms = {}\n",
                rack_path.display(),
                head.id,
                head.data_dir.display(),
                heads.heartbeat_interval_ms,
                heads.election_timeout_min_ms,
                heads.election_timeout_max_ms,
                heads.node_down_after_ms,
                heads
                    .node_refused_down_after_ms
                    .min(heads.node_down_after_ms),
            );
            if head.listen_a != head.address_a {
                config.push_str(&format!("listen_a = \"{}\"\n", head.listen_a));
            }
            std::fs::write(&head.config, config).unwrap();
        }
        TestUnit {
            dir,
            rack_path,
            sleds: list,
            head_nodes,
        }
    }

    /// The index in [`TestUnit::head_nodes`] (and in the daemons
    /// [`TestUnit::start_head_nodes`] returns) of the head node named `id`.
    pub fn head_node_index(&self, id: &str) -> usize {
        self.head_nodes
            .iter()
            .position(|h| h.id == id)
            .unwrap_or_else(|| panic!("no head node {id}"))
    }

    /// Starts head node `i` (0-based) without waiting: it becomes healthy
    /// only once a leader is elected, which needs a quorum.
    pub fn start_head_node(&self, i: usize) -> Daemon {
        let head = &self.head_nodes[i];
        Daemon::spawn(
            &head.id,
            &["head-node", "--config", head.config.to_str().unwrap()],
            self.dir.path(),
        )
    }

    /// Starts head node `i` with its write log on a fault-injection device
    /// driven by `control` (`eio`, `hang`, anything else heals; see
    /// `head_node::manager`'s `RACKBLOCK_TEST_WAL_FAULT_FILE`).
    pub fn start_head_node_with_wal_faults(&self, i: usize, control: &Path) -> Daemon {
        let head = &self.head_nodes[i];
        Daemon::spawn_with_env(
            &head.id,
            &["head-node", "--config", head.config.to_str().unwrap()],
            self.dir.path(),
            &[("RACKBLOCK_TEST_WAL_FAULT_FILE", control.as_os_str())],
        )
    }

    /// Starts every head node and waits until each knows a leader.
    pub fn start_head_nodes(&self) -> Vec<Daemon> {
        let daemons: Vec<Daemon> = (0..self.head_nodes.len())
            .map(|i| self.start_head_node(i))
            .collect();
        for (head, daemon) in self.head_nodes.iter().zip(&daemons) {
            wait_healthy(head.admin, daemon, Duration::from_secs(30));
        }
        daemons
    }

    /// The rack as parsed by the product.
    pub fn rack(&self) -> hardware::rack::Rack {
        hardware::rack::Rack::load(&self.rack_path).unwrap()
    }

    /// Appends TOML lines (data-path settings such as `wal_size_bytes`,
    /// `flush_age_ms`) to every head node's config. Call before starting
    /// the head nodes.
    pub fn append_head_node_config(&self, toml: &str) {
        for head in &self.head_nodes {
            let mut config = std::fs::read_to_string(&head.config).unwrap();
            config.push_str(toml);
            if !config.ends_with('\n') {
                config.push('\n');
            }
            std::fs::write(&head.config, config).unwrap();
        }
    }

    /// Starts every sled (each waited healthy).
    pub fn start_sleds(&self) -> Vec<Daemon> {
        (0..self.sleds.len()).map(|i| self.start_sled(i)).collect()
    }

    /// Finds the one 512-byte-aligned place on the sleds' device files that
    /// starts with `needle` (a stamped data block; panics unless exactly
    /// one), flips bit 4 of the byte 100 bytes into it on the medium, and
    /// returns (sled index, device file, offset of the block).
    pub fn flip_bit_in_stamped_block(&self, needle: &[u8]) -> (usize, PathBuf, u64) {
        use std::os::unix::fs::FileExt;
        let hits: Vec<(usize, PathBuf, u64)> = self
            .sleds
            .iter()
            .enumerate()
            .flat_map(|(s, sled)| {
                sled.devices.iter().flat_map(move |d| {
                    let bytes = std::fs::read(d).unwrap();
                    bytes
                        .chunks(512)
                        .enumerate()
                        .filter(|(_, sector)| sector.starts_with(needle))
                        .map(|(i, _)| (s, d.clone(), i as u64 * 512))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        assert_eq!(hits.len(), 1, "{needle:?} found at {hits:?}");
        let (sled, path, at) = hits[0].clone();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .read(true)
            .open(&path)
            .unwrap();
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, at + 100).unwrap();
        file.write_all_at(&[byte[0] ^ 0x10], at + 100).unwrap();
        file.sync_all().unwrap();
        (sled, path, at)
    }

    /// Waits until the unit's control plane knows the columns of every
    /// sled (the leader registers them from each sled's inventory after it
    /// is elected); returns the sleds' free columns per sled id. Panics
    /// after `timeout` with what it saw.
    pub async fn wait_sled_columns_registered(
        &self,
        lcp: &local_control_plane::LcpClient,
        timeout: Duration,
    ) -> Vec<(String, usize)> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = lcp.unit_status().await.ok().map(|(_, unit)| {
                unit.sleds
                    .iter()
                    .map(|sled| {
                        let known: usize = sled
                            .devices
                            .iter()
                            .map(|d| d.free_columns + d.used_columns)
                            .sum();
                        let free: usize = sled.devices.iter().map(|d| d.free_columns).sum();
                        (sled.id.0.clone(), known, free)
                    })
                    .collect::<Vec<_>>()
            });
            if let Some(sleds) = &seen {
                if sleds.len() == self.sleds.len() && sleds.iter().all(|(_, known, _)| *known > 0) {
                    return sleds
                        .iter()
                        .map(|(id, _, free)| (id.clone(), *free))
                        .collect();
                }
            }
            assert!(
                Instant::now() < deadline,
                "sled columns not registered after {timeout:?}: {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until head node `i` reports its data path ready (every
    /// partition with recovered log records open); panics with the log.
    pub fn wait_datapath_ready(&self, i: usize, daemon: &Daemon, timeout: Duration) {
        let admin = self.head_nodes[i].admin;
        poll_daemon(daemon, "data path not ready", timeout, || {
            matches!(http_get(admin, "/partitions"),
                Some((200, body)) if body.contains("\"ready\":true"))
        });
    }

    /// [`TestUnit::wait_datapath_ready`] for every head node, `heads` as
    /// [`TestUnit::start_head_nodes`] returned them (`timeout` for each).
    pub fn wait_datapaths_ready(&self, heads: &[Daemon], timeout: Duration) {
        for (i, head) in heads.iter().enumerate() {
            self.wait_datapath_ready(i, head, timeout);
        }
    }

    /// Free columns as the sled controllers count them (the sum of their
    /// `rackblock_sled_free_columns` metrics).
    pub fn sled_free_columns(&self) -> u64 {
        self.sleds
            .iter()
            .map(|sled| {
                let (status, text) = http_get(sled.admin, "/metrics").expect("sled metrics");
                assert_eq!(status, 200, "{}: {text}", sled.id);
                text.lines()
                    .filter(|l| l.starts_with("rackblock_sled_free_columns{"))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                    .sum::<u64>()
            })
            .sum()
    }

    /// `POST /flush` on every head node: every primary flushes its log to
    /// the sleds. Returns each node's (status, body).
    pub fn flush_all(&self) -> Vec<Option<(u16, String)>> {
        self.head_nodes
            .iter()
            .map(|h| http_post(h.admin, "/flush", Duration::from_secs(60)))
            .collect()
    }

    /// Puts every device of sled `i` behind the fault device (the sled
    /// controller's `fault_control_file`, healthy at first); call before
    /// starting it. Returns the control file: write `eio` or `hang` into it
    /// to fail the devices, anything else heals (a device the store failed
    /// stays failed until the sled controller restarts).
    pub fn enable_sled_faults(&self, i: usize) -> PathBuf {
        let sled = &self.sleds[i];
        let control = self.dir.path().join(format!("{}.fault", sled.id));
        std::fs::write(&control, "").unwrap();
        let mut config = std::fs::read_to_string(&sled.config).unwrap();
        if !config.ends_with('\n') {
            config.push('\n');
        }
        config.push_str(&format!("fault_control_file = \"{}\"\n", control.display()));
        std::fs::write(&sled.config, config).unwrap();
        control
    }

    /// Starts sled `i` (0-based) and waits until it is healthy.
    pub fn start_sled(&self, i: usize) -> Daemon {
        let sled = &self.sleds[i];
        let daemon = Daemon::spawn(
            &sled.id,
            &["sled-controller", "--config", sled.config.to_str().unwrap()],
            self.dir.path(),
        );
        wait_healthy(sled.admin, &daemon, Duration::from_secs(30));
        daemon
    }
}

// ---- `rackblock up` as a fixture, and programs nobody here wrote ----

/// Ports of one [`RunningUnit`], all from one block of [`next_ports`]:
///
/// ```text
/// block+0        head nodes' data port (127.0.1.1-3, 127.0.2.1-3) and
///                host port (127.0.0.1-3)
/// block+1        --admin-base-port: head nodes' admin block+2..4
/// block+5, +6    zonal API, NBD export of vol0
/// block+7..99    spare (extra attach agents)
/// block+100      sleds' data port (127.0.1.11-16, 127.0.2.11-16)
/// block+102..107 sleds' admin ports
/// block+108      the attach agent's admin port (/metrics, /health)
/// block+109      the attach agent's iSCSI portals (127.0.0.1 and 127.0.0.2)
/// ```
#[derive(Debug, Clone, Copy)]
pub struct UpPorts {
    pub base: u16,
    pub admin_base: u16,
    pub zonal: SocketAddr,
    pub nbd: SocketAddr,
    /// The attach agent's admin address (block+108).
    pub attach_admin: SocketAddr,
    /// The attach agent's two iSCSI portals (block+109 on 127.0.0.1 and
    /// 127.0.0.2).
    pub iscsi: [SocketAddr; 2],
    /// Next spare port handed out by [`RunningUnit::spare_port`].
    spare: u16,
}

/// Size of the port block of one `rackblock up`.
const UP_PORT_BLOCK: u16 = 110;

impl UpPorts {
    pub fn reserve() -> UpPorts {
        let block = next_ports(UP_PORT_BLOCK);
        UpPorts {
            base: block,
            admin_base: block + 1,
            zonal: SocketAddr::from(([127, 0, 0, 1], block + 5)),
            nbd: SocketAddr::from(([127, 0, 0, 1], block + 6)),
            attach_admin: SocketAddr::from(([127, 0, 0, 1], block + 108)),
            iscsi: [
                SocketAddr::from(([127, 0, 0, 1], block + 109)),
                SocketAddr::from(([127, 0, 0, 2], block + 109)),
            ],
            spare: block + 7,
        }
    }

    /// Admin address of head node `h` (1-based), as `up` lays them out.
    pub fn head_admin(&self, h: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.admin_base + h))
    }
}

/// Only one [`RunningUnit`] of this process runs at a time: a unit is 11
/// processes, and two of them plus the NBD tools on two shared cores turn
/// timeouts into flakes.
static UNIT_SLOT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `rackblock up` (not `--check`) in a temporary directory with its own
/// ports: the zonal control plane, 3 head nodes, 6 sleds and vol0 served
/// over NBD by an attach agent, all started by the product's own code.
/// Dropping it sends SIGTERM to `up` (which stops its daemons in order) and
/// waits; whatever is still alive after the grace period is killed by the
/// pids `up` wrote under `run/`.
#[derive(Debug)]
pub struct RunningUnit {
    pub dir: tempfile::TempDir,
    pub data_dir: PathBuf,
    pub ports: UpPorts,
    pub token: String,
    /// When this unit got its slot (the wait for another unit excluded).
    pub started: Instant,
    up: Child,
    log: PathBuf,
    next_spare: std::cell::Cell<u16>,
    _slot: std::sync::MutexGuard<'static, ()>,
}

/// `rackblock up --data-dir DATA_DIR --wait-seconds 120`, run in `dir`
/// with its output (at `RUST_LOG=info`) to `log` and without the caller's
/// `RACKBLOCK_*` settings; the caller adds its own arguments.
pub fn up_command(dir: &Path, data_dir: &Path, log: &Path) -> Command {
    let out = std::fs::File::create(log).unwrap();
    let err = out.try_clone().unwrap();
    let mut command = Command::new(rackblock_bin());
    command
        .current_dir(dir)
        .args(["up", "--data-dir", data_dir.to_str().unwrap()])
        .args(["--wait-seconds", "120"])
        .env("RUST_LOG", "info")
        .env_remove("RACKBLOCK_TOKEN")
        .env_remove("RACKBLOCK_ZONAL")
        .env_remove("RACKBLOCK_ZONAL_CA")
        .env_remove("RACKBLOCK_UNIT_CA")
        .env_remove("RACKBLOCK_RACK")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    command
}

impl RunningUnit {
    /// Starts `rackblock up --volume-size VOLUME_SIZE` and waits (bounded)
    /// until it says the unit is up and vol0 answers NBD.
    pub fn start(volume_size: &str) -> RunningUnit {
        Self::start_with(volume_size, &[])
    }

    /// [`RunningUnit::start`] with more arguments to `up` (e.g.
    /// `--head-node-setting`).
    pub fn start_with(volume_size: &str, extra: &[&str]) -> RunningUnit {
        let slot = UNIT_SLOT.lock().unwrap_or_else(|e| e.into_inner());
        let started = Instant::now();
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let ports = UpPorts::reserve();
        let log = dir.path().join("up.log");
        let up = up_command(dir.path(), &data_dir, &log)
            .args(["--base-port", &ports.base.to_string()])
            .args(["--admin-base-port", &ports.admin_base.to_string()])
            .args(["--zonal-listen", &ports.zonal.to_string()])
            .args(["--nbd-listen", &ports.nbd.to_string()])
            .args(["--attach-admin", &ports.attach_admin.to_string()])
            .args([
                "--iscsi-listen",
                &format!("{},{}", ports.iscsi[0], ports.iscsi[1]),
            ])
            .args(["--volume-size", volume_size])
            .args(extra)
            .spawn()
            .unwrap();
        let mut unit = RunningUnit {
            dir,
            data_dir,
            ports,
            token: String::new(),
            started,
            up,
            log,
            next_spare: std::cell::Cell::new(ports.spare),
            _slot: slot,
        };
        let deadline = Instant::now() + Duration::from_secs(150);
        loop {
            let text = unit.log_text();
            if text.contains("Ctrl-C stops the unit.") {
                break;
            }
            if let Ok(Some(status)) = unit.up.try_wait() {
                panic!("rackblock up exited ({status}):\n{text}");
            }
            assert!(Instant::now() < deadline, "rackblock up not ready:\n{text}");
            std::thread::sleep(Duration::from_millis(100));
        }
        unit.token = std::fs::read_to_string(unit.data_dir.join("zonal-token"))
            .unwrap()
            .trim()
            .to_string();
        unit
    }

    /// The local CA `up` made (`tls/ca.pem`): it signed the zonal plane's
    /// HTTPS certificate and the agent's NBD TLS certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.data_dir.join("tls").join("ca.pem")
    }

    /// `curl --cacert CA https://ZONAL/PATH` (with the admin token when
    /// `token`), bounded by 10 s: the zonal plane as a client nobody here
    /// wrote sees it. Panics if curl does not get an HTTP answer.
    pub fn zonal_https_get(&self, path: &str, token: bool) -> (u16, String) {
        let url = format!("https://{}{path}", self.ports.zonal);
        let ca = self.ca_cert();
        let auth = format!("Authorization: Bearer {}", self.token);
        let mut args = vec![
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            ca.to_str().unwrap(),
            "-w",
            "\n%{http_code}",
        ];
        if token {
            args.extend(["-H", &auth]);
        }
        args.push(&url);
        let out = run_tool("curl", &args, Duration::from_secs(20)).expect_success();
        let (body, status) = out.stdout.rsplit_once('\n').unwrap_or(("", &out.stdout));
        let status = status.trim().parse().unwrap_or_else(|_| panic!("{out}"));
        (status, body.to_owned())
    }

    /// `nbd://127.0.0.1:PORT/vol0`.
    pub fn vol0_uri(&self) -> String {
        format!("nbd://{}/vol0", self.ports.nbd)
    }

    /// A port of this unit's block nobody else uses (at most 90).
    pub fn spare_port(&self) -> u16 {
        let port = self.next_spare.get();
        assert!(port < self.ports.base + 100, "spare ports used up");
        self.next_spare.set(port + 1);
        port
    }

    pub fn head_admins(&self) -> Vec<SocketAddr> {
        (1..=3).map(|h| self.ports.head_admin(h)).collect()
    }

    /// `rackblock ARGS` against this unit (zonal URL, token and rack file in
    /// the environment), run in the unit's directory.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        self.cli_command().args(args).output().unwrap()
    }

    /// The `rackblock` command [`RunningUnit::cli`] runs (to spawn it).
    pub fn cli_command(&self) -> Command {
        let mut command = Command::new(rackblock_bin());
        command
            .current_dir(self.dir.path())
            .env("RACKBLOCK_ZONAL", format!("https://{}", self.ports.zonal))
            .env("RACKBLOCK_ZONAL_CA", self.ca_cert())
            // The host ports require TLS under `up` (its CA signed them).
            .env("RACKBLOCK_UNIT_CA", self.ca_cert())
            .env("RACKBLOCK_TOKEN", &self.token)
            .env("RACKBLOCK_RACK", self.data_dir.join("rack.toml"));
        command
    }

    /// `rackblock attach VOLUME --listen 127.0.0.1:SPARE` as its own process
    /// (killed by pid on drop), waited (bounded) until it answers NBD.
    /// Returns the agent and its export's URI.
    pub fn attach(&self, volume: &str) -> (Daemon, String) {
        self.attach_with(volume, &[])
    }

    /// [`RunningUnit::attach`] with more arguments (QoS, `--admin`).
    pub fn attach_with(&self, volume: &str, extra: &[&str]) -> (Daemon, String) {
        self.try_attach_with(volume, extra)
            .unwrap_or_else(|error| panic!("{error}"))
    }

    /// [`attach_with`](Self::attach_with), an agent that exits before it
    /// serves an `Err` with its log (e.g. its one look-up of the
    /// partition map failed while the unit recovers from a killed head
    /// node) for a caller that retries; still panics after 60 s.
    pub fn try_attach_with(
        &self,
        volume: &str,
        extra: &[&str],
    ) -> Result<(Daemon, String), String> {
        let listen = SocketAddr::from(([127, 0, 0, 1], self.spare_port()));
        let log = self.dir.path().join(format!("attach-{volume}.log"));
        let mut command = self.cli_command();
        command
            .args(["attach", volume, "--listen", &listen.to_string()])
            .args(extra);
        let mut daemon = Daemon::spawn_command(&format!("attach {volume}"), command, log);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !client::nbd::server_greets(listen) {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                return Err(format!(
                    "attach {volume} exited ({status}):\n{}",
                    daemon.log_text()
                ));
            }
            assert!(
                Instant::now() < deadline,
                "attach {volume} not serving NBD after 60 s:\n{}",
                daemon.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok((daemon, format!("nbd://{listen}/{volume}")))
    }

    /// `POST /flush` on every head node: each primary writes its log to
    /// the sleds. Panics unless all three answer 200 with no error. Returns
    /// the blocks flushed in all.
    pub fn flush_all(&self) -> u64 {
        let mut blocks = 0;
        for admin in self.head_admins() {
            let reply = http_post(admin, "/flush", Duration::from_secs(60));
            let Some((200, body)) = reply else {
                panic!("POST /flush on {admin}: {reply:?}");
            };
            let body: serde_json::Value = serde_json::from_str(&body).unwrap();
            for outcome in body["flushed"].as_array().unwrap() {
                assert!(outcome["error"].is_null(), "flush on {admin}: {outcome}");
                blocks += outcome["blocks"].as_u64().unwrap();
            }
        }
        blocks
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM to `up`, wait (bounded) for it to stop its daemons; returns
    /// whether it exited 0 with no daemon left running.
    pub fn stop(&mut self) -> bool {
        if let Ok(Some(status)) = self.up.try_wait() {
            return status.success() && self.kill_leftovers() == 0;
        }
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.up.id() as i32, libc::SIGTERM) };
        // `up` gives each of its 4 ranks 10 s before SIGKILL.
        let deadline = Instant::now() + Duration::from_secs(60);
        let clean = loop {
            match self.up.try_wait() {
                Ok(Some(status)) => break status.success(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    // SAFETY: signalling our own child by pid.
                    unsafe { libc::kill(self.up.id() as i32, libc::SIGKILL) };
                    let _ = self.up.wait();
                    break false;
                }
            }
        };
        self.kill_leftovers() == 0 && clean
    }

    /// SIGKILL to every daemon whose pid file `up` left under `run/` and
    /// that is still alive; returns how many there were.
    fn kill_leftovers(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(self.data_dir.join("run")) else {
            return 0;
        };
        let mut killed = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "pid") {
                continue;
            }
            let Some(pid) = std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
            else {
                continue;
            };
            // SAFETY: signal 0 probes; SIGKILL goes to a daemon `up` started
            // (its pid file is removed when `up` reaps it).
            if pid > 0 && unsafe { libc::kill(pid, 0) } == 0 {
                unsafe { libc::kill(pid, libc::SIGKILL) };
                killed += 1;
            }
        }
        killed
    }
}

impl Drop for RunningUnit {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Panics unless `program` is on `PATH`, naming the Debian package that
/// has it: a missing tool fails the test rather than skipping it.
pub fn require_tool(program: &str, package: &str) {
    let found = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::metadata(dir.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    });
    assert!(
        found,
        "{program} is not installed: install the Debian package {package} \
         (scripts/install-deps.sh does)"
    );
}

/// What a [`run_tool`] run printed and how it ended.
#[derive(Debug)]
pub struct ToolOutput {
    pub command: String,
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl ToolOutput {
    /// Panics with the whole output unless the tool exited 0.
    pub fn expect_success(self) -> ToolOutput {
        assert!(self.status.success(), "{self}");
        self
    }
}

impl std::fmt::Display for ToolOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` ended with {} after {:?}\nstdout:\n{}\nstderr:\n{}",
            self.command, self.status, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// Kills (SIGKILL, by pid) and reaps a child unless it has ended.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGKILL) };
            let _ = self.0.wait();
        }
    }
}

/// Runs `program ARGS` to completion with a deadline; output goes to
/// temporary files (no pipe can fill up). On timeout the tool is killed by
/// pid and the test fails with what it printed; a panic elsewhere kills
/// it too.
pub fn run_tool(program: &str, args: &[&str], timeout: Duration) -> ToolOutput {
    let command = std::iter::once(program)
        .chain(args.iter().copied())
        .map(|a| {
            if a.contains([' ', '\'']) {
                format!("'{a}'")
            } else {
                a.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    let mut out = tempfile::tempfile().unwrap();
    let mut err = tempfile::tempfile().unwrap();
    let started = Instant::now();
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(err.try_clone().unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{command}`: {e}"));
    let mut child = KillOnDrop(child);
    let deadline = started + timeout;
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let read = |file: &mut std::fs::File| {
        use std::io::Seek as _;
        file.seek(std::io::SeekFrom::Start(0)).unwrap();
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).unwrap();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    let Some(status) = status else {
        drop(child);
        panic!(
            "`{command}` still running after {timeout:?}; killed\nstdout:\n{}\nstderr:\n{}",
            read(&mut out),
            read(&mut err)
        );
    };
    ToolOutput {
        command,
        status,
        stdout: read(&mut out),
        stderr: read(&mut err),
        elapsed: started.elapsed(),
    }
}

/// `len` bytes of a deterministic xorshift pattern from `seed`: data a
/// test can recognize and regenerate.
pub fn pattern(seed: u64, len: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Small deterministic generator (xorshift64*) for test workloads: tests
/// print their seed, so a failure reproduces.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// `len` pseudo-random bytes.
    pub fn bytes(&mut self, len: u64) -> Vec<u8> {
        (0..len.div_ceil(8))
            .flat_map(|_| self.next().to_le_bytes())
            .take(len as usize)
            .collect()
    }
}
