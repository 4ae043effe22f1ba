//! `rackblock attach VOLUME --device [/dev/nbdN]`: the volume as a kernel
//! block device ([`client::nbd::kernel`] has the netlink side).
//!
//! ```text
//! prepare (before anything is registered: fails early)
//!   root? nbd family? ── no ──▶ typed error (not root / "modprobe nbd")
//!   /dev/nbdN configured?
//!     no  ─────────────────────────────────────────▶ Fresh(N)
//!     yes, device-nbdN.json names VOLUME, its agent
//!          is gone (killed, crashed, upgraded) ────▶ Reattach(N)
//!     yes, otherwise ──────────────────────────────▶ busy (exit 4)
//!   (no path given: a device of VOLUME whose agent is gone, else the
//!    kernel picks a free one)
//! start (once the NBD server exists)
//!   socketpair: one end served by the NbdServer (in this process),
//!   the other negotiated (client half of the handshake) and handed to
//!   the kernel: NBD_CMD_CONNECT, or NBD_CMD_RECONFIGURE for Reattach
//!   (retried for a few seconds while the old socket is not yet dead)
//!   record device-nbdN.json {index, volume, pid, attachment, size}
//! stop
//!   `rackblock detach` (refused while mounted unless --force):
//!     NBD_CMD_DISCONNECT from the detach process → the kernel sends
//!     NBD_CMD_DISC and closes its end → the served connection ends → the
//!     agent removes the record, revokes its attachment, exits; SIGTERM
//!     (sent too) finds it done
//!   SIGTERM alone (a service stop): not mounted → disconnect as above;
//!     mounted → the agent exits leaving the device configured and its
//!     attachment valid, like a crash: a restarted agent takes both over
//! ```
//!
//! The record lives in the agents' run directory ([`crate::agents`]),
//! which is on tmpfs like the kernel's device configuration, so both
//! vanish together at reboot. An agent that dies without detaching
//! leaves the device configured and its record behind: the kernel queues
//! I/O for `--device-reconnect-timeout`, and `rackblock attach VOLUME
//! --device /dev/nbdN` started again in that window (by hand or by a
//! service manager) takes the device over where it was; the previous
//! agent's attachment is revoked once the new one serves. Meanwhile the
//! kernel logs "Dead connection, failed to find a fallback" for the first
//! request that finds the socket dead: it then waits for the new socket.
//!
//! The agent marks itself `PR_SET_IO_FLUSHER` (as rbd-nbd does): the
//! kernel then never makes its allocations wait on writeback through the
//! very device it serves.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use client::nbd::kernel::{
    device_index, device_path, negotiate, Device, DeviceConfig, KernelNbdError,
};
use client::nbd::NbdServer;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::error::CliError;

/// What `--device` asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    /// `--device` alone: a free device (or this volume's orphaned one).
    Any,
    Index(u32),
}

impl DeviceSpec {
    pub fn parse(text: &str) -> Result<DeviceSpec, CliError> {
        if text.is_empty() || text == "auto" {
            return Ok(DeviceSpec::Any);
        }
        device_index(Path::new(text))
            .map(DeviceSpec::Index)
            .map_err(|e| {
                CliError::Usage(format!(
                    "--device: {e} (the volume name goes before --device)"
                ))
            })
    }
}

/// What an agent serving a device records (`device-nbdN.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub index: u32,
    pub volume: String,
    pub pid: u32,
    pub size_bytes: u64,
    pub attachment: Option<u64>,
}

pub fn record_path(dir: &Path, index: u32) -> PathBuf {
    dir.join(format!("device-nbd{index}.json"))
}

pub fn read_record(dir: &Path, index: u32) -> Option<DeviceRecord> {
    std::fs::read(record_path(dir, index))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
}

/// Every device record in `dir` (whatever their agents' state).
pub fn records(dir: &Path) -> Vec<DeviceRecord> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<DeviceRecord> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let index = name
                .strip_prefix("device-nbd")?
                .strip_suffix(".json")?
                .parse()
                .ok()?;
            read_record(dir, index)
        })
        .collect();
    out.sort_by_key(|record| record.index);
    out
}

fn write_record(dir: &Path, record: &DeviceRecord) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = record_path(dir, record.index);
    let text = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
    let partial = path.with_extension("json.tmp");
    std::fs::write(&partial, text)?;
    std::fs::rename(&partial, &path)
}

pub fn kernel_error(error: KernelNbdError) -> CliError {
    match error {
        KernelNbdError::Busy { .. } => CliError::Conflict(error.to_string()),
        KernelNbdError::NotADevice(_) => CliError::Usage(error.to_string()),
        other => CliError::Runtime(other.to_string()),
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// How the device will be taken.
#[derive(Debug)]
enum Mode {
    /// Connect it (index, or the kernel's choice).
    Fresh(Option<u32>),
    /// Hand a new socket to a device a previous agent of this volume left.
    Reattach(DeviceRecord),
}

/// The checked plan of `--device`, made before anything is registered.
#[derive(Debug)]
pub struct Plan {
    netlink: Device,
    mode: Mode,
    run_dir: PathBuf,
    config: DeviceConfig,
}

impl Plan {
    /// The stale attachment of the agent this one replaces, if any.
    pub fn replaced_attachment(&self) -> Option<u64> {
        match &self.mode {
            Mode::Reattach(record) => record.attachment,
            Mode::Fresh(_) => None,
        }
    }
}

/// Checks root, the nbd family and the device's state (see module docs).
pub fn prepare(
    spec: &DeviceSpec,
    volume: &str,
    reconnect_timeout: Duration,
) -> Result<Plan, CliError> {
    if !is_root() {
        return Err(kernel_error(KernelNbdError::NotPermitted));
    }
    let mut netlink = Device::open().map_err(kernel_error)?;
    let run_dir = crate::agents::run_dir();
    let orphan_of_volume =
        |record: &DeviceRecord| record.volume == volume && !crate::agents::alive(record.pid);
    let mode = match spec {
        DeviceSpec::Index(index) => {
            if netlink.is_connected(*index).map_err(kernel_error)? {
                match read_record(&run_dir, *index) {
                    Some(record) if orphan_of_volume(&record) => Mode::Reattach(record),
                    Some(record) if record.volume == volume => {
                        return Err(CliError::Conflict(format!(
                            "{} already serves {volume} (agent {})",
                            device_path(*index),
                            record.pid
                        )))
                    }
                    Some(record) => {
                        return Err(CliError::Conflict(format!(
                            "{} serves volume {} (agent {}); `rackblock detach {}` first",
                            device_path(*index),
                            record.volume,
                            record.pid,
                            device_path(*index),
                        )))
                    }
                    None => {
                        return Err(kernel_error(KernelNbdError::Busy {
                            device: device_path(*index),
                        }));
                    }
                }
            } else {
                // A record of a device the kernel no longer has is stale.
                let _ = std::fs::remove_file(record_path(&run_dir, *index));
                Mode::Fresh(Some(*index))
            }
        }
        DeviceSpec::Any => {
            let mut orphan = None;
            for record in records(&run_dir) {
                if orphan_of_volume(&record)
                    && netlink.is_connected(record.index).map_err(kernel_error)?
                {
                    orphan = Some(record);
                    break;
                }
            }
            orphan.map_or(Mode::Fresh(None), Mode::Reattach)
        }
    };
    Ok(Plan {
        netlink,
        mode,
        run_dir,
        config: DeviceConfig {
            dead_conn_timeout: reconnect_timeout,
        },
    })
}

/// A device this agent serves.
#[derive(Debug)]
pub struct Session {
    pub index: u32,
    pub reattached: bool,
    netlink: Device,
    served: tokio::task::JoinHandle<()>,
    run_dir: PathBuf,
}

/// How long a reattach retries while the kernel still has the old socket
/// alive (`ENOSPC`): it sees the dead agent's end close within moments.
const REATTACH_RETRY: Duration = Duration::from_secs(10);

/// Serves `export` of `server` to the kernel as the planned device (see
/// module docs). When the kernel ends the connection (a disconnect from
/// elsewhere), `shutdown` is cancelled: the agent stops.
pub async fn start(
    plan: Plan,
    server: &NbdServer,
    export: &str,
    attachment: Option<u64>,
    shutdown: CancellationToken,
) -> Result<Session, CliError> {
    set_io_flusher();
    let Plan {
        mut netlink,
        mode,
        run_dir,
        config,
    } = plan;
    let (mut kernel_end, server_end) = tokio::net::UnixStream::pair()
        .map_err(|e| CliError::Runtime(format!("socketpair: {e}")))?;
    let server = server.clone();
    let stop = shutdown.clone();
    let served = tokio::spawn(async move {
        match server.serve_stream(server_end).await {
            Ok(()) => tracing::info!("the kernel closed the device's connection"),
            Err(error) => tracing::warn!(%error, "the device's connection ended"),
        }
        stop.cancel();
    });
    let negotiated = negotiate(&mut kernel_end, export)
        .await
        .map_err(kernel_error)?;
    let kernel_end = kernel_end
        .into_std()
        .map_err(|e| CliError::Runtime(format!("socket: {e}")))?;
    // The kernel uses the socket as it is: blocking, no timeouts.
    kernel_end
        .set_nonblocking(false)
        .map_err(|e| CliError::Runtime(format!("socket: {e}")))?;
    let handed = tokio::task::spawn_blocking(move || {
        let fd = kernel_end.as_raw_fd();
        let result = match &mode {
            Mode::Fresh(index) => netlink
                .connect(*index, fd, negotiated, &config)
                .map(|index| (index, false)),
            Mode::Reattach(record) => {
                if record.size_bytes != negotiated.size_bytes {
                    tracing::warn!(
                        device = %device_path(record.index),
                        was = record.size_bytes,
                        now = negotiated.size_bytes,
                        "the volume's size changed; the device keeps its old size until reattached"
                    );
                }
                let deadline = Instant::now() + REATTACH_RETRY;
                loop {
                    match netlink.reconfigure(record.index, fd, &config) {
                        Err(KernelNbdError::Kernel {
                            source: client::nbd::netlink::NetlinkError::Refused { errno, .. },
                            ..
                        }) if errno == libc::ENOSPC && Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        other => break other.map(|()| (record.index, true)),
                    }
                }
            }
        };
        // The kernel holds its own reference to the socket now.
        drop(kernel_end);
        result.map(|outcome| (outcome, netlink))
    })
    .await
    .map_err(|e| CliError::Runtime(format!("device task: {e}")))?;
    let ((index, reattached), netlink) = match handed {
        Ok(done) => done,
        Err(error) => {
            served.abort();
            return Err(kernel_error(error));
        }
    };
    let record = DeviceRecord {
        index,
        volume: export.to_owned(),
        pid: std::process::id(),
        size_bytes: negotiated.size_bytes,
        attachment,
    };
    if let Err(error) = write_record(&run_dir, &record) {
        tracing::warn!(%error, "cannot record the device; a restarted agent will not find it");
    }
    Ok(Session {
        index,
        reattached,
        netlink,
        served,
        run_dir,
    })
}

/// How long a detach waits for the kernel to close the connection.
const DISCONNECT_WAIT: Duration = Duration::from_secs(30);

/// How an agent's device ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Disconnected (here, or by `rackblock detach` before it signalled).
    Disconnected,
    /// Still mounted: left configured, its I/O queued by the kernel for a
    /// restarted agent (which takes it back and revokes this agent's
    /// attachment).
    LeftForRestart,
}

impl Session {
    pub fn path(&self) -> String {
        device_path(self.index)
    }

    /// The end of the agent (SIGTERM, or the kernel closed the
    /// connection): a device in use (mounted) is left for a restarted
    /// agent, as if this one had crashed, rather than pulled from under
    /// its file system; otherwise it is disconnected and its record
    /// removed. `rackblock detach` disconnects before it signals, so an
    /// operator's detach always frees the device.
    pub async fn stop(self) -> Stopped {
        let Session {
            index,
            mut netlink,
            mut served,
            run_dir,
            ..
        } = self;
        let path = device_path(index);
        if !served.is_finished() {
            if in_use(&path) {
                served.abort();
                let _ = served.await;
                eprintln!(
                    "{path} is in use: left for a restarted agent (`rackblock attach ... --device {path}` \
                     takes it back; `rackblock detach {path}` frees it)"
                );
                return Stopped::LeftForRestart;
            }
            let disconnected = tokio::task::spawn_blocking(move || netlink.disconnect(index)).await;
            match disconnected {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::warn!(%error, "disconnect"),
                Err(error) => tracing::warn!(%error, "disconnect task"),
            }
            if tokio::time::timeout(DISCONNECT_WAIT, &mut served)
                .await
                .is_err()
            {
                tracing::warn!("the kernel kept the device's connection open; closing it");
                served.abort();
            }
        }
        let _ = std::fs::remove_file(record_path(&run_dir, index));
        eprintln!("disconnected {path}");
        Stopped::Disconnected
    }
}

/// `prctl(PR_SET_IO_FLUSHER)`: best effort (needs CAP_SYS_RESOURCE).
fn set_io_flusher() {
    const PR_SET_IO_FLUSHER: libc::c_int = 57;
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
    if rc != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot set PR_SET_IO_FLUSHER");
    }
}

/// Whether `path` is in use (mounted, or opened exclusively): an
/// exclusive open fails with EBUSY then.
pub fn in_use(path: &str) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path) else {
        return false;
    };
    // SAFETY: open with a valid NUL-terminated path; the fd is closed below.
    let fd = unsafe {
        libc::open(
            c_path.as_ptr(),
            libc::O_RDONLY | libc::O_EXCL | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::EBUSY);
    }
    // SAFETY: fd was opened above and is closed once.
    unsafe {
        libc::fsync(fd);
        libc::close(fd);
    }
    false
}

/// Disconnects device `index` (`rackblock detach`: before it signals the
/// device's agent, or for a device whose agent is gone) and removes its
/// record.
pub fn disconnect(index: u32) -> Result<(), CliError> {
    if !is_root() {
        return Err(kernel_error(KernelNbdError::NotPermitted));
    }
    let mut netlink = Device::open().map_err(kernel_error)?;
    if netlink.is_connected(index).map_err(kernel_error)? {
        netlink.disconnect(index).map_err(kernel_error)?;
    }
    let _ = std::fs::remove_file(record_path(&crate::agents::run_dir(), index));
    Ok(())
}

/// The kernel's view of `index` for `attach --list`: `None` when it
/// cannot be asked (no module, not root).
pub fn kernel_connected(netlink: &mut Option<Device>, index: u32) -> Option<bool> {
    netlink.as_mut()?.is_connected(index).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn device_specs() {
        assert_eq!(DeviceSpec::parse("").unwrap(), DeviceSpec::Any);
        assert_eq!(DeviceSpec::parse("auto").unwrap(), DeviceSpec::Any);
        assert_eq!(
            DeviceSpec::parse("/dev/nbd3").unwrap(),
            DeviceSpec::Index(3)
        );
        assert!(matches!(
            DeviceSpec::parse("vol0"),
            Err(CliError::Usage(message)) if message.contains("before --device")
        ));
    }

    #[test]
    fn records_round_trip_and_list() {
        let dir = tempfile::tempdir().unwrap();
        for index in [3, 1] {
            write_record(
                dir.path(),
                &DeviceRecord {
                    index,
                    volume: format!("v{index}"),
                    pid: 1,
                    size_bytes: 1 << 20,
                    attachment: Some(7),
                },
            )
            .unwrap();
        }
        std::fs::write(dir.path().join("device-nbdx.json"), "{}").unwrap();
        std::fs::write(dir.path().join("attach-5.json"), "{}").unwrap();
        let listed = records(dir.path());
        assert_eq!(
            listed.iter().map(|r| r.index).collect::<Vec<_>>(),
            vec![1, 3]
        );
        assert_eq!(read_record(dir.path(), 3).unwrap().volume, "v3");
        assert!(read_record(dir.path(), 2).is_none());
    }
}
