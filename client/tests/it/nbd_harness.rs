//! Harness for the NBD tests: an [`NbdServer`] over memory exports on a
//! random 127.0.0.1 port and a unix socket, and a runner for the real NBD
//! clients (bounded by a timeout, killed on drop, and failing with the
//! package name when a tool is missing).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use client::nbd::{MemoryBackend, NbdBackend, NbdConfig, NbdServer};
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const VOL0_BYTES: u64 = 64 << 20;
pub const VOL1_BYTES: u64 = 16 << 20;

/// A running server with exports `vol0` (64 MiB) and `vol1` (16 MiB).
pub struct Served {
    pub port: u16,
    pub socket: PathBuf,
    pub vol0: MemoryBackend,
    pub vol1: MemoryBackend,
    pub dir: tempfile::TempDir,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Served {
    pub async fn start() -> Served {
        let vol0 = MemoryBackend::with_description(VOL0_BYTES, "test volume 0");
        let vol1 = MemoryBackend::with_description(VOL1_BYTES, "test volume 1");
        let mut exports: BTreeMap<String, Arc<dyn NbdBackend>> = BTreeMap::new();
        exports.insert("vol0".into(), Arc::new(vol0.clone()));
        exports.insert("vol1".into(), Arc::new(vol1.clone()));
        let server = NbdServer::new(exports, NbdConfig::default()).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = tcp.local_addr().unwrap().port();
        let unix = UnixListener::bind(&socket).unwrap();
        let stop = CancellationToken::new();
        let tasks = vec![
            tokio::spawn({
                let server = server.clone();
                let stop = stop.clone();
                async move {
                    server
                        .serve_tcp(tcp, async move { stop.cancelled().await })
                        .await
                        .unwrap();
                }
            }),
            tokio::spawn({
                let stop = stop.clone();
                async move {
                    server
                        .serve_unix(unix, async move { stop.cancelled().await })
                        .await
                        .unwrap();
                }
            }),
        ];
        Served {
            port,
            socket,
            vol0,
            vol1,
            dir,
            stop,
            tasks,
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }

    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// Stop serving and wait until every connection is closed.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        for task in self.tasks.drain(..) {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("server did not stop within 10 s")
                .unwrap();
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.cancel();
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A real NBD client and the Debian package that ships it.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    pub program: &'static str,
    pub package: &'static str,
}

pub const QEMU_IO: Tool = Tool {
    program: "qemu-io",
    package: "qemu-utils",
};
pub const QEMU_IMG: Tool = Tool {
    program: "qemu-img",
    package: "qemu-utils",
};
pub const NBDINFO: Tool = Tool {
    program: "nbdinfo",
    package: "libnbd-bin",
};
pub const NBDCOPY: Tool = Tool {
    program: "nbdcopy",
    package: "libnbd-bin",
};
/// Debian's python, which has the `nbd` module (python3-libnbd) that
/// nbdsh is. The `nbdsh` wrapper runs whichever `python3` is first in
/// PATH (pyenv on CI machines, without the module), so the tests call
/// `/usr/bin/python3 -m nbd` (that is, nbdsh) directly.
pub const DEBIAN_PYTHON: Tool = Tool {
    program: "/usr/bin/python3",
    package: "python3-libnbd",
};
pub const FIO: Tool = Tool {
    program: "fio",
    package: "fio",
};

fn find_in_path(program: &str) -> Option<PathBuf> {
    if program.starts_with('/') {
        let path = PathBuf::from(program);
        return path.is_file().then_some(path);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// Run `tool args…`, killed after `timeout`. Panics (the test fails) if
/// the tool is missing or runs out of time.
pub async fn run(tool: Tool, args: &[&str], timeout: Duration) -> Output {
    let Some(program) = find_in_path(tool.program) else {
        panic!(
            "`{}` not found in PATH: install the Debian package `{}` \
             (scripts/install-deps.sh; CI installs it)",
            tool.program, tool.package
        );
    };
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // Dropping the future on timeout drops the child, which kills it.
    match tokio::time::timeout(timeout, command.output()).await {
        Ok(output) => output.unwrap(),
        Err(_) => panic!(
            "`{} {}` did not finish within {timeout:?} (killed)",
            tool.program,
            args.join(" ")
        ),
    }
}

/// [`run`], asserting a zero exit status; returns stdout.
pub async fn run_ok(tool: Tool, args: &[&str], timeout: Duration) -> String {
    let output = run(tool, args, timeout).await;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "`{} {}` failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        tool.program,
        args.join(" "),
        output.status
    );
    stdout
}

/// Deterministic pseudo-random bytes (xorshift64*).
pub fn random_bytes(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        out.extend_from_slice(&seed.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Run `script` under nbdsh (`/usr/bin/python3 -m nbd -c SCRIPT`), which
/// must exit 0; returns stdout. Fails naming python3-libnbd when the `nbd`
/// module is missing.
pub async fn run_nbdsh(script: &str, timeout: Duration) -> String {
    let probe = run(DEBIAN_PYTHON, &["-c", "import nbd"], timeout).await;
    assert!(
        probe.status.success(),
        "Debian's /usr/bin/python3 has no `nbd` module: install the Debian package \
         `python3-libnbd` (CI installs it): {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    run_ok(DEBIAN_PYTHON, &["-m", "nbd", "-c", script], timeout).await
}
