//! The attach agents running on this host: `rackblock attach --list` and
//! `rackblock detach VOLUME`.
//!
//! Each agent writes one JSON file, `attach-<pid>.json`, into the run
//! directory once it serves, and removes it when it exits. A file whose
//! process is gone (the agent was killed) is stale: listing skips and
//! removes it. Detach sends the agent SIGTERM, which makes it finish its
//! in-flight requests and revoke its attachment, and waits for it to exit.
//!
//! An agent serving a kernel device (`attach --device`) also keeps
//! `device-nbdN.json` there ([`crate::device`]); `--list` shows the
//! device's kernel state, and devices whose agent is gone; `detach
//! /dev/nbdN` (or the volume) disconnects the device first, and refuses
//! while it is mounted unless `--force`.
//!
//! Run directory: `RACKBLOCK_RUN_DIR`, else `/run/rackblock` for root,
//! else `$XDG_RUNTIME_DIR/rackblock`, else `/tmp/rackblock-<uid>`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::CliError;
use crate::text::{parse_duration, Table};
use crate::unit::Output;

/// What an agent records about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub pid: u32,
    pub volume: String,
    pub uri: String,
    /// The kernel block device it serves (`--device`).
    #[serde(default)]
    pub device: Option<String>,
    pub admin: Option<String>,
    pub attachment: Option<u64>,
    pub started_unix: u64,
}

pub fn run_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("RACKBLOCK_RUN_DIR") {
        return PathBuf::from(dir);
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        return PathBuf::from("/run/rackblock");
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        return Path::new(&dir).join("rackblock");
    }
    PathBuf::from(format!("/tmp/rackblock-{uid}"))
}

fn record_path(dir: &Path, pid: u32) -> PathBuf {
    dir.join(format!("attach-{pid}.json"))
}

/// Removes the agent's record when dropped (the agent's normal exit).
#[derive(Debug)]
pub struct Registration(PathBuf);

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Record this process as serving `record.volume`. A failure is only
/// logged: the agent serves anyway (it is then missing from `--list`).
pub fn register(record: &AgentRecord) -> Option<Registration> {
    let dir = run_dir();
    let written = (|| -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(&dir)?;
        let path = record_path(&dir, record.pid);
        let text = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
        let partial = path.with_extension("json.tmp");
        std::fs::write(&partial, text)?;
        std::fs::rename(&partial, &path)?;
        Ok(path)
    })();
    match written {
        Ok(path) => Some(Registration(path)),
        Err(error) => {
            tracing::warn!(%error, dir = %dir.display(), "cannot record this agent for `attach --list`");
            None
        }
    }
}

pub fn alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    let exists = rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    // An exited agent its parent has not reaped yet is a zombie: gone.
    exists && !zombie(pid)
}

fn zombie(pid: libc::pid_t) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // "pid (comm) S ...": the state follows the last ')'.
            let after = &stat[stat.rfind(')')? + 1..];
            after.split_whitespace().next().map(|state| state == "Z")
        })
        .unwrap_or(false)
}

/// The agents running now (stale records are removed), by volume and pid.
pub fn running() -> Result<Vec<AgentRecord>, CliError> {
    let dir = run_dir();
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => {
            return Err(CliError::Runtime(format!(
                "cannot read {}: {error}",
                dir.display()
            )))
        }
    };
    let mut agents = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with("attach-") && name.ends_with(".json")) {
            continue;
        }
        let record: Option<AgentRecord> = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        match record {
            Some(record) if alive(record.pid) => agents.push(record),
            _ => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    agents.sort_by(|a, b| (&a.volume, a.pid).cmp(&(&b.volume, b.pid)));
    Ok(agents)
}

/// A device record whose agent is gone: the kernel may still hold the
/// device, queueing its I/O until an agent takes it back.
fn orphan_devices(agents: &[AgentRecord]) -> Vec<crate::device::DeviceRecord> {
    crate::device::records(&run_dir())
        .into_iter()
        .filter(|record| !agents.iter().any(|agent| agent.pid == record.pid) || !alive(record.pid))
        .collect()
}

pub fn list(output: Output) -> Result<(), CliError> {
    let agents = running()?;
    let orphans = orphan_devices(&agents);
    // The kernel's view, when it can be asked (root, nbd module).
    let mut netlink = if agents.iter().any(|a| a.device.is_some()) || !orphans.is_empty() {
        client::nbd::kernel::Device::open().ok()
    } else {
        None
    };
    let state = |netlink: &mut Option<client::nbd::kernel::Device>, device: &str, orphan: bool| {
        let connected = client::nbd::kernel::device_index(Path::new(device))
            .ok()
            .and_then(|index| crate::device::kernel_connected(netlink, index));
        match (connected, orphan) {
            (Some(false), _) => "not connected",
            (_, true) => "waiting for its agent (run attach --device again)",
            (Some(true), false) => "connected",
            (None, false) => "unknown",
        }
    };
    match output {
        Output::Json => {
            let mut rows = Vec::with_capacity(agents.len() + orphans.len());
            for agent in &agents {
                let mut row = serde_json::to_value(agent)
                    .map_err(|e| CliError::Runtime(format!("cannot encode JSON: {e}")))?;
                if let Some(device) = &agent.device {
                    row["device_state"] = state(&mut netlink, device, false).into();
                }
                rows.push(row);
            }
            for orphan in &orphans {
                let device = client::nbd::kernel::device_path(orphan.index);
                rows.push(serde_json::json!({
                    "volume": orphan.volume,
                    "pid": null,
                    "uri": null,
                    "device": device,
                    "device_state": state(&mut netlink, &device, true),
                    "admin": null,
                    "attachment": orphan.attachment,
                }));
            }
            let text = serde_json::to_string_pretty(&rows)
                .map_err(|e| CliError::Runtime(format!("cannot encode JSON: {e}")))?;
            println!("{text}");
        }
        Output::Table => {
            let mut table = Table::new(&["VOLUME", "PID", "NBD", "DEVICE", "ADMIN", "ATTACHMENT"]);
            for agent in &agents {
                table.row(vec![
                    agent.volume.clone(),
                    agent.pid.to_string(),
                    agent.uri.clone(),
                    agent.device.as_ref().map_or_else(
                        || "-".into(),
                        |device| format!("{device} ({})", state(&mut netlink, device, false)),
                    ),
                    agent.admin.clone().unwrap_or_else(|| "-".into()),
                    agent
                        .attachment
                        .map_or_else(|| "-".into(), |id| id.to_string()),
                ]);
            }
            for orphan in &orphans {
                let device = client::nbd::kernel::device_path(orphan.index);
                table.row(vec![
                    orphan.volume.clone(),
                    "-".into(),
                    "-".into(),
                    format!("{device} ({})", state(&mut netlink, &device, true)),
                    "-".into(),
                    orphan
                        .attachment
                        .map_or_else(|| "-".into(), |id| id.to_string()),
                ]);
            }
            table.print();
        }
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct DetachArgs {
    /// The volume (NBD export) whose agent on this host stops, or the
    /// device (/dev/nbdN) it serves. A device still in use (mounted) is
    /// refused unless --force.
    pub volume: String,
    /// Detach a device even while it is mounted or held (its file
    /// system then sees I/O errors), or one no agent here recorded.
    #[arg(long)]
    pub force: bool,
    /// Which agent, when several serve the volume here.
    #[arg(long)]
    pub pid: Option<u32>,
    /// How long to wait for the agent to finish and exit.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// Stop the agent serving `args.volume` (a volume or its device):
/// SIGTERM, then wait for it to exit (it disconnects its device, finishes
/// in-flight requests and revokes its attachment). A device whose agent
/// is gone is disconnected here.
pub fn detach(args: &DetachArgs) -> Result<(), CliError> {
    let device = args
        .volume
        .starts_with("/dev/")
        .then(|| client::nbd::kernel::device_index(Path::new(&args.volume)))
        .transpose()
        .map_err(crate::device::kernel_error)?;
    let agents: Vec<AgentRecord> = running()?
        .into_iter()
        .filter(|agent| match device {
            Some(index) => {
                agent.device.as_deref() == Some(client::nbd::kernel::device_path(index).as_str())
            }
            None => agent.volume == args.volume,
        })
        .filter(|agent| args.pid.is_none_or(|pid| agent.pid == pid))
        .collect();
    let busy = |device: &str| -> Result<(), CliError> {
        if !args.force && crate::device::in_use(device) {
            return Err(CliError::Conflict(format!(
                "{device} is in use (mounted or held open exclusively): unmount it, or --force"
            )));
        }
        Ok(())
    };
    if agents.is_empty() {
        // A device whose agent is gone: disconnect it here.
        let orphans: Vec<u32> = match device {
            // With --force, a device without a record too (an agent killed
            // between connecting it and recording it, or another program).
            Some(index) if args.force => vec![index],
            Some(index) => crate::device::read_record(&run_dir(), index)
                .map(|record| record.index)
                .into_iter()
                .collect(),
            None => orphan_devices(&[])
                .into_iter()
                .filter(|record| record.volume == args.volume && !alive(record.pid))
                .map(|record| record.index)
                .collect(),
        };
        if let [index] = orphans.as_slice() {
            let path = client::nbd::kernel::device_path(*index);
            busy(&path)?;
            crate::device::disconnect(*index)?;
            println!("detached {path} (its agent had exited)");
            return Ok(());
        }
        if device.is_some() {
            return Err(CliError::NotFound(format!(
                "no attach agent serves {} on this host (`rackblock attach --list`; \
                 --force disconnects it anyway)",
                args.volume
            )));
        }
    }
    let agent = match agents.as_slice() {
        [] => {
            return Err(CliError::NotFound(format!(
                "no attach agent of {} runs on this host (`rackblock attach --list`)",
                args.volume
            )))
        }
        [agent] => agent,
        several => {
            let pids: Vec<String> = several.iter().map(|a| a.pid.to_string()).collect();
            return Err(CliError::Usage(format!(
                "{} agents serve {} here (pids {}): choose one with --pid",
                several.len(),
                args.volume,
                pids.join(", ")
            )));
        }
    };
    if let Some(device) = &agent.device {
        busy(device)?;
        // Disconnected here, so that the agent cannot leave a device in
        // use for a restart (it does on a bare SIGTERM): it sees its
        // connection end and exits by itself.
        let index = client::nbd::kernel::device_index(Path::new(device))
            .map_err(crate::device::kernel_error)?;
        crate::device::disconnect(index)?;
    }
    let pid = libc::pid_t::try_from(agent.pid)
        .map_err(|_| CliError::Runtime(format!("pid {} out of range", agent.pid)))?;
    // SAFETY: SIGTERM to the agent process its own record names.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        let error = std::io::Error::last_os_error();
        // Already gone (it exited after its device's disconnect).
        if error.raw_os_error() != Some(libc::ESRCH) {
            return Err(CliError::Runtime(format!(
                "cannot signal agent {pid}: {error}"
            )));
        }
    }
    let deadline = Instant::now() + args.timeout;
    while alive(agent.pid) {
        if Instant::now() >= deadline {
            return Err(CliError::Runtime(format!(
                "agent {pid} of {} still runs after {} s",
                args.volume,
                args.timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_file(record_path(&run_dir(), agent.pid));
    println!(
        "detached {} (agent {pid}{})",
        args.volume,
        agent
            .attachment
            .map(|id| format!(", attachment {id}"))
            .unwrap_or_default()
    );
    Ok(())
}
