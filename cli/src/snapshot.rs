//! `rackblock snapshot create|list|delete`: crash-consistent snapshots of a
//! volume, taken by the unit's local control plane.
//!
//! ```text
//! VOL ──HTTP GET /v1/volumes/VOL──▶ zonal: the volume's id in its unit
//! create: LcpClient ─CreateSnapshot─▶ leader ─(coordinator cuts every
//!         partition, releases, records)─▶ poll UnitStatus until the
//!         record is ready (prints the measured pause) or aborted
//! list:   UnitStatus.snapshots of the volume
//! delete: DeleteSnapshot ─▶ poll until the coordinator dropped and purged it
//! ```
//!
//! The zonal plane knows nothing of snapshots yet: the verbs need the
//! unit's rack file (`--rack`, `RACKBLOCK_RACK`), like the live views.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use local_control_plane::state::{SnapshotRecord, SnapshotState};
use local_control_plane::{Command, Outcome};
use serde_json::{json, Value};

use crate::error::CliError;
use crate::ops::{GlobalArgs, RackArg};
use crate::unit::{self, Output};

/// Pause between two looks at the record while waiting.
const POLL: Duration = Duration::from_millis(100);

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Volume name.
    pub volume: String,
    /// Snapshot name (unique among the volume's snapshots; no '@' or '/').
    pub snapshot: String,
    /// Give up waiting for the snapshot to be ready after this long (it
    /// may still become ready; `snapshot list` shows it).
    #[arg(long, default_value = "60s", value_parser = crate::text::parse_duration)]
    pub wait_timeout: Duration,
    #[command(flatten)]
    pub rack: RackArg,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Volume name.
    pub volume: String,
    #[command(flatten)]
    pub rack: RackArg,
}

#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    /// Volume name.
    pub volume: String,
    /// Snapshot name.
    pub snapshot: String,
    /// Give up waiting for the unit to drop it after this long.
    #[arg(long, default_value = "60s", value_parser = crate::text::parse_duration)]
    pub wait_timeout: Duration,
    #[command(flatten)]
    pub rack: RackArg,
}

/// The volume's id in its unit, from the zonal plane.
pub async fn volume_id(global: &GlobalArgs, name: &str) -> Result<u64, CliError> {
    let path = format!("/v1/volumes/{}", crate::http::segment(name));
    let reply = global.api()?.call("GET", &path, None).await?;
    reply
        .body
        .get("id")
        .and_then(Value::as_u64)
        .ok_or_else(|| CliError::Runtime(format!("volume {name}: the zonal plane gave no id")))
}

async fn snapshots(args_rack: &RackArg) -> Result<Vec<SnapshotRecord>, CliError> {
    let rack = args_rack.load()?;
    let (_, status) = crate::ops::live_status(&rack, args_rack.credential()).await?;
    Ok(status.snapshots)
}

/// Volume `volume`'s live (creating or ready) snapshot named `name`.
pub async fn find(
    rack: &RackArg,
    volume: u64,
    name: &str,
) -> Result<Option<SnapshotRecord>, CliError> {
    Ok(snapshots(rack).await?.into_iter().find(|s| {
        s.name == name
            && s.volumes.contains(&volume)
            && matches!(s.state, SnapshotState::Creating | SnapshotState::Ready)
    }))
}

/// The id of volume `volume`'s ready snapshot `name` (what a read-only
/// export of it reads).
pub async fn ready_id(rack: &RackArg, volume: u64, name: &str) -> Result<u64, CliError> {
    match find(rack, volume, name).await? {
        Some(record) if record.state == SnapshotState::Ready => Ok(record.id),
        Some(record) => Err(CliError::Conflict(format!(
            "snapshot {name} is {}, not ready",
            record.state.as_str()
        ))),
        None => Err(CliError::NotFound(format!(
            "volume {volume} has no snapshot {name}"
        ))),
    }
}

fn record_json(record: &SnapshotRecord) -> Value {
    json!({
        "id": record.id,
        "name": record.name,
        "volumes": record.volumes,
        "state": record.state.as_str(),
        "created_ms": record.created_ms,
        "pause_us": record.pause_us,
        "cuts": record.cuts.len(),
        "reason": record.reason,
    })
}

fn record_line(record: &SnapshotRecord) -> String {
    let mut line = format!(
        "snapshot {} (id {}): {}",
        record.name,
        record.id,
        record.state.as_str()
    );
    if let Some(pause) = record.pause_us {
        line.push_str(&format!(
            ", {} partitions cut, pause {:.1} ms",
            record.cuts.len(),
            pause as f64 / 1000.0
        ));
    }
    if let Some(reason) = &record.reason {
        line.push_str(&format!(" ({reason})"));
    }
    line
}

pub(crate) async fn propose(rack: &RackArg, command: Command) -> Result<Outcome, CliError> {
    let loaded = rack.load()?;
    let client = unit::client(&loaded, rack.credential());
    let result = client.command(command).await;
    client.close();
    match result {
        Ok(Ok(outcome)) => Ok(outcome),
        Ok(Err(refused)) => Err(CliError::Api {
            status: 409,
            code: refused.code().to_owned(),
            message: format!("the unit refused: {refused}"),
        }),
        Err(e) => Err(CliError::Unavailable(format!(
            "the unit's local control plane did not confirm the command: {e}"
        ))),
    }
}

pub async fn create(global: &GlobalArgs, args: &CreateArgs) -> Result<(), CliError> {
    let volume = volume_id(global, &args.volume).await?;
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let outcome = propose(
        &args.rack,
        Command::CreateSnapshot {
            name: args.snapshot.clone(),
            volumes: vec![volume],
            now_ms,
        },
    )
    .await?;
    let Outcome::SnapshotCreated { snapshot: id } = outcome else {
        return Err(CliError::Runtime(format!("unexpected outcome {outcome:?}")));
    };
    let deadline = Instant::now() + args.wait_timeout;
    let record = loop {
        let found = snapshots(&args.rack)
            .await?
            .into_iter()
            .find(|s| s.id == id);
        match found {
            Some(record) if record.state != SnapshotState::Creating => break Some(record),
            // Aborted and already purged by the coordinator.
            None => break None,
            Some(_) => {}
        }
        if Instant::now() >= deadline {
            return Err(CliError::Unavailable(format!(
                "snapshot {} (id {id}) is still being created after {:?}",
                args.snapshot, args.wait_timeout
            )));
        }
        tokio::time::sleep(POLL).await;
    };
    let Some(record) = record.clone().filter(|r| r.state == SnapshotState::Ready) else {
        let reason = record
            .and_then(|r| r.reason)
            .unwrap_or_else(|| "aborted and dropped".into());
        if global.output == Output::Json {
            crate::ops::print_json(&json!({
                "id": id, "name": args.snapshot, "state": "aborted", "reason": reason
            }))?;
        }
        return Err(CliError::Conflict(format!(
            "snapshot {} of {} was aborted: {reason}",
            args.snapshot, args.volume
        )));
    };
    match global.output {
        Output::Json => crate::ops::print_json(&record_json(&record)),
        Output::Table => {
            println!("{}", record_line(&record));
            Ok(())
        }
    }
}

pub async fn list(global: &GlobalArgs, args: &ListArgs) -> Result<(), CliError> {
    let volume = volume_id(global, &args.volume).await?;
    let records: Vec<SnapshotRecord> = snapshots(&args.rack)
        .await?
        .into_iter()
        .filter(|s| s.volumes.contains(&volume))
        .collect();
    match global.output {
        Output::Json => crate::ops::print_json(&json!({
            "volume": args.volume,
            "snapshots": records.iter().map(record_json).collect::<Vec<_>>(),
        })),
        Output::Table => {
            if records.is_empty() {
                println!("volume {} has no snapshots", args.volume);
            }
            for record in &records {
                println!("{}", record_line(record));
            }
            Ok(())
        }
    }
}

pub async fn delete(global: &GlobalArgs, args: &DeleteArgs) -> Result<(), CliError> {
    let volume = volume_id(global, &args.volume).await?;
    let Some(record) = find(&args.rack, volume, &args.snapshot).await? else {
        return Err(CliError::NotFound(format!(
            "volume {} has no snapshot {}",
            args.volume, args.snapshot
        )));
    };
    propose(
        &args.rack,
        Command::DeleteSnapshot {
            snapshot: record.id,
        },
    )
    .await?;
    let deadline = Instant::now() + args.wait_timeout;
    while snapshots(&args.rack)
        .await?
        .iter()
        .any(|s| s.id == record.id)
    {
        if Instant::now() >= deadline {
            return Err(CliError::Unavailable(format!(
                "snapshot {} is deleted but not yet dropped on every partition after {:?}",
                args.snapshot, args.wait_timeout
            )));
        }
        tokio::time::sleep(POLL).await;
    }
    match global.output {
        Output::Json => crate::ops::print_json(&json!({
            "id": record.id, "name": record.name, "state": "purged"
        })),
        Output::Table => {
            println!("snapshot {} of {} deleted", args.snapshot, args.volume);
            Ok(())
        }
    }
}
