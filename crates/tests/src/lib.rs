//! Cluster harness for end-to-end tests: real `rackblock` processes on
//! loopback addresses (network A `127.0.1.x`, network B `127.0.2.x`), a TCP
//! fault proxy that models a broken network path, and small helpers.
//!
//! Every process a test starts is owned by a [`Daemon`] and killed by pid
//! when the test drops it, so a failing test leaves nothing running.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod proxy;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

/// The `rackblock` binary: `$RACKBLOCK_BIN`, else `target/debug/rackblock`
/// of this workspace (the test script builds it before running tests).
pub fn rackblock_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("RACKBLOCK_BIN") {
        return PathBuf::from(bin);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let bin = target.join("debug/rackblock");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p cli` first (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// Ports handed out to tests of this process; distinct per test so tests can
/// run in parallel. Based on the pid to avoid clashes between test binaries:
/// 1000 ports per process in 10000..30000, below the kernel's ephemeral
/// range (32768..) and the ranges `rackblock up` tests use (30000.., 40000..).
pub fn next_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 10000 + (std::process::id() % 20) as u16 * 1000;
    base + NEXT.fetch_add(1, Ordering::SeqCst) % 1000
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
        let log = log_dir.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let err = out.try_clone().unwrap();
        let child = Command::new(rackblock_bin())
            .args(args)
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

/// Minimal HTTP/1.0 GET: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// Minimal HTTP/1.0 POST with an empty body: (status, body).
pub fn http_post(addr: SocketAddr, path: &str, timeout: Duration) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    write!(
        stream,
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n"
    )
    .ok()?;
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
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some((200, _)) = http_get(admin, "/health") {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "{} not healthy after {timeout:?}; log:\n{}",
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
    pub config: PathBuf,
    pub data_dir: PathBuf,
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
            rack.push_str(&format!(
                "[[head_node]]\nid = \"hn-{h}\"\naddress_a = \"{address_a}\"\naddress_b = \"{address_b}\"\nadmin = \"{admin}\"\n\n"
            ));
            head_nodes.push(TestHeadNode {
                id: format!("hn-{h}"),
                address_a,
                address_b,
                listen_a,
                admin,
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
                 election_timeout_max_ms = {}\nnode_down_after_ms = {}\n",
                rack_path.display(),
                head.id,
                head.data_dir.display(),
                heads.heartbeat_interval_ms,
                heads.election_timeout_min_ms,
                heads.election_timeout_max_ms,
                heads.node_down_after_ms,
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

    /// Waits until head node `i` reports its data path ready (every
    /// partition with recovered log records open); panics with the log.
    pub fn wait_datapath_ready(&self, i: usize, daemon: &Daemon, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some((200, body)) = http_get(self.head_nodes[i].admin, "/partitions") {
                if body.contains("\"ready\":true") {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{} data path not ready after {timeout:?}; log:\n{}",
            daemon.name,
            daemon.log_text()
        );
    }

    /// `POST /flush` on every head node: every primary flushes its log to
    /// the sleds. Returns each node's (status, body).
    pub fn flush_all(&self) -> Vec<Option<(u16, String)>> {
        self.head_nodes
            .iter()
            .map(|h| http_post(h.admin, "/flush", Duration::from_secs(60)))
            .collect()
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
