//! `rackblock snapshot create|list|describe|delete|diff|export|apply`:
//! crash-consistent snapshots of a volume, taken by the unit's local
//! control plane.
//!
//! ```text
//! VOL ──HTTP GET /v1/volumes/VOL──▶ zonal: the volume's id in its unit
//! create: LcpClient ─CreateSnapshot─▶ leader ─(coordinator cuts every
//!         partition, releases, records)─▶ poll UnitStatus until the
//!         record is ready (prints the measured pause) or aborted
//! create --group NAME VOL1 VOL2 ...: the same, one record over every
//!         volume named (all in the rack file's unit): one coordinated
//!         cut of every partition of every volume
//! list:   UnitStatus.snapshots of the volume (a group's with its members)
//! delete: DeleteSnapshot ─▶ poll until the coordinator dropped and purged it
//! list, describe: the records, plus each snapshot's pinned and exclusive
//!         bytes from every partition's primary (HostSnapshotUsage, unit
//!         port, local_control_plane::snapshot_query)
//! diff:   HostSnapshotDiff pages from every partition's primary (index
//!         only, no data read), merged into volume ranges
//! export: the snapshot's allocation map (HostSnapshotMap pages from every
//!         partition's primary, index only: the ranges that hold data),
//!         then a zonal attachment for the reads of those ranges only
//!         (HostReadSnapshot through the volume client, like `attach
//!         VOL@SNAP --read-only`), detached at the end: the raw image (to
//!         a file: sparse, the unallocated ranges and every 64 KiB that
//!         reads as zeros left holes; to a pipe: zeros written for the
//!         unallocated ranges, not read), or an incremental stream
//!         (crate::stream) of the diff's ranges since another snapshot, or
//!         of the map's (zero ranges as records, no data)
//! apply:  an incremental stream onto a raw image file
//! ```
//!
//! **Consistency groups.** A group snapshot is one unit record whose
//! `volumes` are the group's members; each member sees it under the
//! group's name (`VOL@NAME` for `attach`, `export`, `diff`, clones and
//! rollback, like any snapshot of that volume), `list` and `describe`
//! show the members (`group` in JSON), and deleting it through any member
//! deletes it for every member (one record, one set of layers). No write
//! acknowledged before another was issued, on any member, is missing
//! from the group's image of one volume while the later write is in the
//! image of another (the coordinator holds every partition's
//! acknowledgements until all are cut). A failed cut aborts the group as
//! a whole.
//!
//! The verbs need the unit's rack file (`--rack`, `RACKBLOCK_RACK`), like
//! the live views; the zonal plane resolves volume names.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use client::{ClientConfig, VolumeClient};
use local_control_plane::snapshot_query::{self, SnapshotSpace};
use local_control_plane::state::{SnapshotRecord, SnapshotState};
use local_control_plane::{Command, Outcome};
use proto::volume::ChangedRange;
use serde_json::{json, Value};

use crate::stream::{Header, StreamWriter};
use crate::text::human_bytes;

use crate::error::CliError;
use crate::ops::{GlobalArgs, RackArg};
use crate::unit::{self, Output};

/// Pause between two looks at the record while waiting.
const POLL: Duration = Duration::from_millis(100);

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// VOLUME SNAPSHOT; with --group, the group's volumes (VOLUME...).
    /// A snapshot name is unique among each volume's snapshots, with no
    /// '@' or '/'.
    #[arg(required = true, value_name = "VOLUME SNAPSHOT | VOLUME...")]
    pub names: Vec<String>,
    /// Take one crash-consistent snapshot named NAME of every volume
    /// given, in one coordinated cut (a consistency group: one unit).
    #[arg(long, value_name = "NAME")]
    pub group: Option<String>,
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
    /// Volume name (any member of a consistency group: the group's
    /// snapshot is deleted from every member).
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
    Ok(volume_in_unit(global, name).await?.0)
}

/// The volume's id and its unit's name, from the zonal plane.
async fn volume_in_unit(global: &GlobalArgs, name: &str) -> Result<(u64, String), CliError> {
    let path = format!("/v1/volumes/{}", crate::http::segment(name));
    let reply = global.api()?.call("GET", &path, None).await?;
    let id = reply.body.get("id").and_then(Value::as_u64);
    let unit = reply.body.get("unit").and_then(Value::as_str);
    match (id, unit) {
        (Some(id), Some(unit)) => Ok((id, unit.to_owned())),
        _ => Err(CliError::Runtime(format!(
            "volume {name}: the zonal plane gave no id or unit"
        ))),
    }
}

/// The names of unit `unit`'s volumes by id (ids are per unit), for
/// showing a group's members; empty (ids shown) if the zonal plane
/// cannot list them.
async fn volume_names(global: &GlobalArgs, unit: &str) -> BTreeMap<u64, String> {
    let Ok(api) = global.api() else {
        return BTreeMap::new();
    };
    let Ok(reply) = api.call("GET", "/v1/volumes", None).await else {
        return BTreeMap::new();
    };
    reply
        .body
        .get("volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|v| v.get("unit").and_then(Value::as_str) == Some(unit))
        .filter_map(|v| Some((v.get("id")?.as_u64()?, v.get("name")?.as_str()?.to_owned())))
        .collect()
}

/// A group's member names (`None` for a one-volume snapshot), by id
/// where the name is unknown.
fn group_names(record: &SnapshotRecord, names: &BTreeMap<u64, String>) -> Option<Vec<String>> {
    (record.volumes.len() > 1).then(|| {
        record
            .volumes
            .iter()
            .map(|v| names.get(v).cloned().unwrap_or_else(|| format!("id {v}")))
            .collect()
    })
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

fn record_json(record: &SnapshotRecord, names: &BTreeMap<u64, String>) -> Value {
    json!({
        "id": record.id,
        "name": record.name,
        "volumes": record.volumes,
        "group": group_names(record, names),
        "state": record.state.as_str(),
        "created_ms": record.created_ms,
        "pause_us": record.pause_us,
        "cuts": record.cuts.len(),
        "reason": record.reason,
    })
}

/// [`record_json`] with the snapshot's space on the volume (`null` when
/// the partitions could not be asked).
fn record_space_json(
    record: &SnapshotRecord,
    names: &BTreeMap<u64, String>,
    space: Option<&SnapshotSpace>,
) -> Value {
    let mut value = record_json(record, names);
    if let Value::Object(map) = &mut value {
        map.insert(
            "pinned_bytes".into(),
            space.map_or(Value::Null, |s| s.pinned_bytes.into()),
        );
        map.insert(
            "exclusive_bytes".into(),
            space.map_or(Value::Null, |s| s.exclusive_bytes.into()),
        );
    }
    value
}

fn record_line(record: &SnapshotRecord, names: &BTreeMap<u64, String>) -> String {
    let mut line = format!(
        "snapshot {} (id {}): {}",
        record.name,
        record.id,
        record.state.as_str()
    );
    if let Some(group) = group_names(record, names) {
        line.push_str(&format!(", consistency group of {}", group.join(", ")));
    }
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

fn space_text(space: Option<&SnapshotSpace>) -> String {
    match space {
        Some(s) => format!(
            "holds {} exclusively ({} pinned)",
            human_bytes(s.exclusive_bytes),
            human_bytes(s.pinned_bytes)
        ),
        None => "space unknown".into(),
    }
}

/// Every snapshot's space on volume `volume`, from its partitions'
/// primaries; `None` (with a note on stderr) if they cannot be asked.
async fn usage(rack: &RackArg, volume: u64) -> Option<BTreeMap<u64, SnapshotSpace>> {
    let loaded = match rack.load() {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("snapshot space unknown: {}", error.line());
            return None;
        }
    };
    let client = unit::client(&loaded, rack.credential());
    let result = snapshot_query::volume_usage(&client, volume).await;
    client.close();
    match result {
        Ok(space) => Some(space),
        Err(error) => {
            eprintln!("snapshot space unknown: {error}");
            None
        }
    }
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

/// What `snapshot create` takes: the snapshot's name and its volumes.
fn create_target(args: &CreateArgs) -> Result<(String, Vec<String>), CliError> {
    match (&args.group, args.names.as_slice()) {
        (Some(group), volumes) => {
            let mut seen = std::collections::BTreeSet::new();
            if let Some(twice) = volumes.iter().find(|v| !seen.insert(v.as_str())) {
                return Err(CliError::Usage(format!(
                    "--group {group}: volume {twice} named twice"
                )));
            }
            Ok((group.clone(), volumes.to_vec()))
        }
        (None, [volume, snapshot]) => Ok((snapshot.clone(), vec![volume.clone()])),
        (None, _) => Err(CliError::Usage(
            "snapshot create VOLUME SNAPSHOT, or snapshot create --group NAME VOLUME...".into(),
        )),
    }
}

pub async fn create(global: &GlobalArgs, args: &CreateArgs) -> Result<(), CliError> {
    let (name, members) = create_target(args)?;
    let mut volumes = Vec::with_capacity(members.len());
    let mut unit_of_group: Option<String> = None;
    for member in &members {
        let (id, unit) = volume_in_unit(global, member).await?;
        match &unit_of_group {
            Some(first) if *first != unit => {
                return Err(CliError::Usage(format!(
                    "a consistency group lives in one unit: {} is in {first}, {member} in {unit}",
                    members[0]
                )))
            }
            _ => unit_of_group = Some(unit),
        }
        volumes.push(id);
    }
    let names: BTreeMap<u64, String> = volumes.iter().copied().zip(members.clone()).collect();
    let what = if members.len() > 1 {
        format!("group {}", members.join(", "))
    } else {
        members.join("")
    };
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let outcome = propose(
        &args.rack,
        Command::CreateSnapshot {
            name: name.clone(),
            volumes,
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
                "snapshot {name} (id {id}) is still being created after {:?}",
                args.wait_timeout
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
                "id": id, "name": name, "state": "aborted", "reason": reason
            }))?;
        }
        return Err(CliError::Conflict(format!(
            "snapshot {name} of {what} was aborted: {reason}"
        )));
    };
    match global.output {
        Output::Json => crate::ops::print_json(&record_json(&record, &names)),
        Output::Table => {
            println!("{}", record_line(&record, &names));
            Ok(())
        }
    }
}

pub async fn list(global: &GlobalArgs, args: &ListArgs) -> Result<(), CliError> {
    let (volume, unit_name) = volume_in_unit(global, &args.volume).await?;
    let records: Vec<SnapshotRecord> = snapshots(&args.rack)
        .await?
        .into_iter()
        .filter(|s| s.volumes.contains(&volume))
        .collect();
    let space = if records.is_empty() {
        Some(BTreeMap::new())
    } else {
        usage(&args.rack, volume).await
    };
    let names = if records.iter().any(|r| r.volumes.len() > 1) {
        volume_names(global, &unit_name).await
    } else {
        BTreeMap::new()
    };
    let space_of = |record: &SnapshotRecord| -> Option<SnapshotSpace> {
        // A snapshot no partition holds (yet, or any more) holds nothing.
        space
            .as_ref()
            .map(|s| s.get(&record.id).copied().unwrap_or_default())
    };
    match global.output {
        Output::Json => crate::ops::print_json(&json!({
            "volume": args.volume,
            "snapshots": records
                .iter()
                .map(|r| record_space_json(r, &names, space_of(r).as_ref()))
                .collect::<Vec<_>>(),
        })),
        Output::Table => {
            if records.is_empty() {
                println!("volume {} has no snapshots", args.volume);
            }
            for record in &records {
                println!(
                    "{}; {}",
                    record_line(record, &names),
                    space_text(space_of(record).as_ref())
                );
            }
            Ok(())
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct DescribeArgs {
    /// Volume name.
    pub volume: String,
    /// Snapshot name.
    pub snapshot: String,
    #[command(flatten)]
    pub rack: RackArg,
}

/// One snapshot: its record, every partition's cut, and its space.
pub async fn describe(global: &GlobalArgs, args: &DescribeArgs) -> Result<(), CliError> {
    let (volume, unit_name) = volume_in_unit(global, &args.volume).await?;
    let Some(record) = find(&args.rack, volume, &args.snapshot).await? else {
        return Err(CliError::NotFound(format!(
            "volume {} has no snapshot {}",
            args.volume, args.snapshot
        )));
    };
    let space = usage(&args.rack, volume)
        .await
        .map(|s| s.get(&record.id).copied().unwrap_or_default());
    let names = if record.volumes.len() > 1 {
        volume_names(global, &unit_name).await
    } else {
        BTreeMap::new()
    };
    match global.output {
        Output::Json => {
            let mut value = record_space_json(&record, &names, space.as_ref());
            if let Value::Object(map) = &mut value {
                map.insert(
                    "partition_cuts".into(),
                    record
                        .cuts
                        .iter()
                        .map(|c| {
                            json!({
                                "volume": c.partition.volume,
                                "partition": c.partition.index,
                                "epoch": c.epoch,
                                "cut": c.cut,
                            })
                        })
                        .collect::<Vec<_>>()
                        .into(),
                );
            }
            crate::ops::print_json(&value)
        }
        Output::Table => {
            println!("{}", record_line(&record, &names));
            println!("space: {}", space_text(space.as_ref()));
            println!("created at {} ms (unix)", record.created_ms);
            for c in &record.cuts {
                println!(
                    "partition {}/{}: cut at sequence {} (epoch {})",
                    c.partition.volume, c.partition.index, c.cut, c.epoch
                );
            }
            Ok(())
        }
    }
}

// ---- diff ----

#[derive(Debug, clap::Args)]
pub struct DiffArgs {
    /// Volume name.
    pub volume: String,
    /// The older snapshot.
    pub from: String,
    /// The newer snapshot (default, or with --live: the live volume).
    #[arg(conflicts_with = "live")]
    pub to: Option<String>,
    /// Compare with the live volume.
    #[arg(long)]
    pub live: bool,
    #[command(flatten)]
    pub rack: RackArg,
}

/// The changed ranges of volume `volume` from snapshot `from` to `to`
/// (`None`: live), from the partitions' indexes.
async fn changed_ranges(
    rack: &RackArg,
    volume: u64,
    from: Option<u64>,
    to: Option<u64>,
) -> Result<Vec<ChangedRange>, CliError> {
    let loaded = rack.load()?;
    let client = unit::client(&loaded, rack.credential());
    let result = snapshot_query::volume_diff(&client, volume, from, to).await;
    client.close();
    result.map_err(|e| CliError::Unavailable(format!("snapshot diff: {e}")))
}

/// The allocation map of volume `volume`'s snapshot `snapshot` (the ranges
/// that may hold data; the rest reads as zeros), from the partitions'
/// indexes.
async fn allocated_ranges(
    rack: &RackArg,
    volume: u64,
    snapshot: u64,
) -> Result<Vec<ChangedRange>, CliError> {
    let loaded = rack.load()?;
    let client = unit::client(&loaded, rack.credential());
    let result = snapshot_query::volume_map(&client, volume, Some(snapshot)).await;
    client.close();
    result.map_err(|e| CliError::Unavailable(format!("snapshot map: {e}")))
}

/// The whole volume `0..size` as ranges: `allocated`'s (data) and the
/// gaps between them (zero), in offset order.
fn with_gaps(allocated: &[ChangedRange], size: u64) -> Vec<ChangedRange> {
    let mut out = Vec::with_capacity(allocated.len() * 2 + 1);
    let mut at = 0;
    for range in allocated {
        if range.offset_bytes > at {
            out.push(ChangedRange {
                offset_bytes: at,
                len_bytes: range.offset_bytes - at,
                zero: true,
            });
        }
        out.push(ChangedRange {
            zero: false,
            ..*range
        });
        at = range.offset_bytes + range.len_bytes;
    }
    if size > at {
        out.push(ChangedRange {
            offset_bytes: at,
            len_bytes: size - at,
            zero: true,
        });
    }
    out
}

/// The diff's JSON: ranges (offset, length, zero) and their totals.
pub fn diff_json(volume: &str, from: &str, to: &str, ranges: &[ChangedRange]) -> Value {
    let (mut data, mut zero) = (0u64, 0u64);
    for r in ranges {
        if r.zero {
            zero += r.len_bytes;
        } else {
            data += r.len_bytes;
        }
    }
    json!({
        "volume": volume,
        "from": from,
        "to": to,
        "block_size": proto::BLOCK_SIZE_BYTES,
        "changed_bytes": data + zero,
        "zero_bytes": zero,
        "ranges": ranges
            .iter()
            .map(|r| json!({"offset": r.offset_bytes, "length": r.len_bytes, "zero": r.zero}))
            .collect::<Vec<_>>(),
    })
}

pub async fn diff(global: &GlobalArgs, args: &DiffArgs) -> Result<(), CliError> {
    let volume = volume_id(global, &args.volume).await?;
    let from = ready_id(&args.rack, volume, &args.from).await?;
    // clap refuses SNAP_B with --live; neither means live too.
    let (to, to_name) = match (&args.to, args.live) {
        (Some(name), false) => (
            Some(ready_id(&args.rack, volume, name).await?),
            name.clone(),
        ),
        _ => (None, "live".to_owned()),
    };
    let ranges = changed_ranges(&args.rack, volume, Some(from), to).await?;
    match global.output {
        Output::Json => {
            crate::ops::print_json(&diff_json(&args.volume, &args.from, &to_name, &ranges))
        }
        Output::Table => {
            let mut out = std::io::stdout().lock();
            let mut total = 0;
            for r in &ranges {
                total += r.len_bytes;
                writeln!(
                    out,
                    "{:>16} {:>12} {}",
                    r.offset_bytes,
                    r.len_bytes,
                    if r.zero { "zero" } else { "data" }
                )
                .map_err(|e| CliError::Runtime(format!("stdout: {e}")))?;
            }
            writeln!(
                out,
                "{} → {}: {} ranges, {} changed",
                args.from,
                to_name,
                ranges.len(),
                human_bytes(total)
            )
            .map_err(|e| CliError::Runtime(format!("stdout: {e}")))
        }
    }
}

// ---- export ----

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// The whole image, byte for byte.
    Raw,
    /// A header and (offset, length, data) records (crate::stream): the
    /// ranges changed since --since, or every non-zero range.
    Incremental,
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// Volume name.
    pub volume: String,
    /// Snapshot name.
    pub snapshot: String,
    /// Only what changed since this older snapshot (incremental only).
    #[arg(long)]
    pub since: Option<String>,
    #[arg(long, value_enum, default_value = "raw")]
    pub format: ExportFormat,
    /// Where to write: a file, or - for stdout.
    #[arg(short = 'o', long = "to")]
    pub to: String,
    /// The unit's CA (PEM) for TLS to the head nodes' host ports, as
    /// `attach --unit-ca`; never falls back to plain TCP when given.
    #[arg(long, env = "RACKBLOCK_UNIT_CA", value_name = "FILE")]
    pub unit_ca: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub rack: RackArg,
}

/// A byte range of the volume: (offset, length).
type Span = (u64, u64);

/// Bytes read per request of an export.
const EXPORT_CHUNK: u64 = 4 << 20;
/// Granule of a raw file export's holes: a piece of this size that reads
/// as zeros is not written.
const HOLE_GRAIN: usize = 64 << 10;
/// Requests of an export in flight.
const EXPORT_DEPTH: usize = 4;

/// Progress on stderr, at most once a second, and a last line.
struct Progress {
    total: u64,
    done: u64,
    started: Instant,
    last: Instant,
}

impl Progress {
    fn new(total: u64) -> Progress {
        let now = Instant::now();
        Progress {
            total,
            done: 0,
            started: now,
            last: now,
        }
    }

    fn add(&mut self, bytes: u64) {
        self.done += bytes;
        if self.last.elapsed() >= Duration::from_secs(1) {
            self.last = Instant::now();
            self.print("");
        }
    }

    fn print(&self, end: &str) {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        eprintln!(
            "exported {} of {} ({:.1} MiB/s){end}",
            human_bytes(self.done),
            human_bytes(self.total),
            self.done as f64 / secs / (1 << 20) as f64
        );
    }
}

/// A zonal attachment for the export's reads, detached on drop of
/// [`ExportSession::close`].
struct ExportSession {
    api: crate::http::ZonalApi,
    volume: String,
    attachment: u64,
    client: VolumeClient,
}

impl ExportSession {
    async fn open(
        global: &GlobalArgs,
        volume: &str,
        snapshot: u64,
        unit_ca: Option<&std::path::Path>,
    ) -> Result<Self, CliError> {
        let mut config = ClientConfig {
            snapshot: Some(snapshot),
            ..ClientConfig::default()
        };
        config.link.tls = crate::attach::unit_tls(unit_ca)?;
        let api = global.api()?;
        let connection =
            crate::attach::zonal_connect(&api, volume, "snapshot-export", config).await?;
        Ok(ExportSession {
            api,
            volume: volume.to_owned(),
            attachment: connection.attachment_id,
            client: connection.client,
        })
    }

    async fn detach(
        api: &crate::http::ZonalApi,
        volume: &str,
        attachment: u64,
    ) -> Result<(), CliError> {
        let path = format!(
            "/v1/volumes/{}/attachments/{attachment}",
            crate::http::segment(volume)
        );
        api.call("DELETE", &path, None).await.map(|_| ())
    }

    async fn close(self) {
        self.client.close();
        if let Err(error) = Self::detach(&self.api, &self.volume, self.attachment).await {
            eprintln!(
                "could not detach the export's attachment {} of {}: {}; detach it with `rackblock volume detach {} --attachment {}`",
                self.attachment,
                self.volume,
                error.line(),
                self.volume,
                self.attachment
            );
        }
    }

    /// Reads `ranges` (offset, length) in chunks, [`EXPORT_DEPTH`] in
    /// flight, handing each chunk to `sink` in offset order.
    async fn read_ranges(
        &self,
        ranges: &[(u64, u64)],
        mut sink: impl FnMut(u64, bytes::Bytes) -> Result<(), CliError>,
    ) -> Result<(), CliError> {
        use futures::StreamExt;
        let chunks: Vec<(u64, u64)> = ranges
            .iter()
            .flat_map(|&(offset, len)| {
                (0..len.div_ceil(EXPORT_CHUNK)).map(move |i| {
                    let at = offset + i * EXPORT_CHUNK;
                    (at, EXPORT_CHUNK.min(offset + len - at))
                })
            })
            .collect();
        let client = &self.client;
        let mut reads = futures::stream::iter(chunks)
            .map(|(at, len)| async move { (at, client.read(at, len).await) })
            .buffered(EXPORT_DEPTH);
        while let Some((at, read)) = reads.next().await {
            let data = read.map_err(|e| CliError::Unavailable(format!("read at {at}: {e}")))?;
            sink(at, data)?;
        }
        Ok(())
    }
}

fn open_output(to: &str) -> Result<Box<dyn Write>, CliError> {
    if to == "-" {
        return Ok(Box::new(std::io::BufWriter::with_capacity(
            1 << 20,
            std::io::stdout(),
        )));
    }
    let file = std::fs::File::create(to)
        .map_err(|e| CliError::Runtime(format!("cannot create {to}: {e}")))?;
    Ok(Box::new(std::io::BufWriter::with_capacity(1 << 20, file)))
}

fn write_error(e: impl std::fmt::Display) -> CliError {
    CliError::Runtime(format!("export output: {e}"))
}

pub async fn export(global: &GlobalArgs, args: &ExportArgs) -> Result<(), CliError> {
    if args.since.is_some() && args.format == ExportFormat::Raw {
        return Err(CliError::Usage(
            "--since makes an incremental stream: add --format incremental".into(),
        ));
    }
    let volume = volume_id(global, &args.volume).await?;
    let snapshot = ready_id(&args.rack, volume, &args.snapshot).await?;
    let base = match &args.since {
        Some(name) => Some(ready_id(&args.rack, volume, name).await?),
        None => None,
    };
    // The ranges to write: the diff's, or the whole volume as the
    // snapshot's allocation map and its gaps (read: only the map's).
    let ranges = match base {
        Some(base) => changed_ranges(&args.rack, volume, Some(base), Some(snapshot)).await?,
        None => allocated_ranges(&args.rack, volume, snapshot).await?,
    };
    let session =
        ExportSession::open(global, &args.volume, snapshot, args.unit_ca.as_deref()).await?;
    let ranges = match base {
        Some(_) => ranges,
        None => with_gaps(&ranges, session.client.size_bytes()),
    };
    let result = export_with(&session, args, snapshot, base, &ranges).await;
    session.close().await;
    let (bytes, records) = result?;
    match global.output {
        // The stream owns stdout: the summary goes to stderr then.
        Output::Json if args.to == "-" => {
            eprintln!(
                "{}",
                json!({
                    "volume": args.volume,
                    "snapshot": args.snapshot,
                    "since": args.since,
                    "bytes": bytes,
                    "records": records,
                })
            );
            Ok(())
        }
        Output::Json => crate::ops::print_json(&json!({
            "volume": args.volume,
            "snapshot": args.snapshot,
            "since": args.since,
            "format": match args.format { ExportFormat::Raw => "raw", ExportFormat::Incremental => "incremental" },
            "bytes": bytes,
            "records": records,
        })),
        Output::Table => {
            if args.to != "-" {
                println!(
                    "exported {}@{} to {} ({})",
                    args.volume,
                    args.snapshot,
                    args.to,
                    human_bytes(bytes)
                );
            }
            Ok(())
        }
    }
}

/// Writes the export; returns the bytes of volume written and the
/// stream's records (0 for raw). `ranges` are in offset order: with a
/// `base`, the diff's (zero: trimmed since); without, the whole volume,
/// the snapshot's allocation map (data) and its gaps (zero). Only the data
/// ranges are read.
async fn export_with(
    session: &ExportSession,
    args: &ExportArgs,
    snapshot: u64,
    base: Option<u64>,
    ranges: &[ChangedRange],
) -> Result<(u64, u64), CliError> {
    let size = session.client.size_bytes();
    // Ranges read, and the zero ranges written without a read.
    let pick = |zero: bool| -> Vec<Span> {
        ranges
            .iter()
            .filter(|r| r.zero == zero)
            .map(|r| (r.offset_bytes, r.len_bytes))
            .collect()
    };
    let (zeros, data) = (pick(true), pick(false));
    let read_bytes: u64 = data.iter().map(|(_, len)| len).sum();
    match args.format {
        // A file gets a sparse image: the file is sized first; the gaps of
        // the map are not read, and a read piece that is zeros (written
        // zeros) is not written either, so an image of a mostly empty
        // volume takes the space of its data. A pipe gets every byte.
        ExportFormat::Raw if args.to != "-" => {
            use std::os::unix::fs::FileExt as _;
            let file = std::fs::File::create(&args.to)
                .map_err(|e| CliError::Runtime(format!("cannot create {}: {e}", args.to)))?;
            file.set_len(size).map_err(write_error)?;
            let mut progress = Progress::new(size);
            progress.add(size - read_bytes);
            let mut written = 0u64;
            session
                .read_ranges(&data, |at, chunk| {
                    for (i, piece) in chunk.chunks(HOLE_GRAIN).enumerate() {
                        if piece.iter().any(|b| *b != 0) {
                            let offset = at + (i * HOLE_GRAIN) as u64;
                            file.write_all_at(piece, offset).map_err(write_error)?;
                            written += piece.len() as u64;
                        }
                    }
                    progress.add(chunk.len() as u64);
                    Ok(())
                })
                .await?;
            file.sync_all().map_err(write_error)?;
            progress.print(&format!(
                ", done ({} read, {} left as holes)",
                human_bytes(read_bytes),
                human_bytes(size - written)
            ));
            Ok((size, 0))
        }
        ExportFormat::Raw => {
            let mut out = open_output(&args.to)?;
            let mut progress = Progress::new(size);
            // Zeros from `*at` to `to` (a gap of the map), not read.
            let zero_fill = |out: &mut Box<dyn Write>, at: &mut u64, to: u64| {
                static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
                while *at < to {
                    let n = (to - *at).min(ZEROS.len() as u64);
                    out.write_all(&ZEROS[..n as usize]).map_err(write_error)?;
                    *at += n;
                }
                Ok::<(), CliError>(())
            };
            let mut at = 0u64;
            session
                .read_ranges(&data, |offset, chunk| {
                    let gap = offset - at;
                    zero_fill(&mut out, &mut at, offset)?;
                    out.write_all(&chunk).map_err(write_error)?;
                    at += chunk.len() as u64;
                    progress.add(gap + chunk.len() as u64);
                    Ok(())
                })
                .await?;
            progress.add(size - at);
            zero_fill(&mut out, &mut at, size)?;
            out.flush().map_err(write_error)?;
            progress.print(&format!(", done ({} read)", human_bytes(read_bytes)));
            Ok((size, 0))
        }
        ExportFormat::Incremental => {
            let out = open_output(&args.to)?;
            let header = Header {
                volume_size_bytes: size,
                base_snapshot: base.unwrap_or(0),
                snapshot,
            };
            let mut writer = StreamWriter::new(out, header).map_err(write_error)?;
            let mut records = 0u64;
            let total = ranges.iter().map(|r| r.len_bytes).sum();
            let mut progress = Progress::new(total);
            // Zero ranges are written without a read, between the reads.
            let mut zeros = zeros.into_iter().peekable();
            session
                .read_ranges(&data, |at, chunk| {
                    while let Some((z, len)) = zeros.next_if(|(z, _)| *z < at) {
                        writer.zero(z, len).map_err(write_error)?;
                        records += 1;
                        progress.add(len);
                    }
                    // A full stream leaves out what reads as zeros.
                    if base.is_none() && chunk.iter().all(|b| *b == 0) {
                        writer.zero(at, chunk.len() as u64).map_err(write_error)?;
                    } else {
                        writer.data(at, &chunk).map_err(write_error)?;
                    }
                    records += 1;
                    progress.add(chunk.len() as u64);
                    Ok(())
                })
                .await?;
            for (z, len) in zeros {
                writer.zero(z, len).map_err(write_error)?;
                records += 1;
                progress.add(len);
            }
            writer.finish().map_err(write_error)?;
            progress.print(", done");
            Ok((total, records))
        }
    }
}

// ---- apply ----

#[derive(Debug, clap::Args)]
pub struct ApplyArgs {
    /// The incremental stream: a file, or - for stdin.
    #[arg(short = 'i', long = "from")]
    pub from: String,
    /// The raw image to apply it to (an image of the stream's base
    /// snapshot, the volume's size), changed in place.
    #[arg(long = "to")]
    pub to: PathBuf,
}

/// Applies an incremental stream onto a raw image file.
pub async fn apply(global: &GlobalArgs, args: &ApplyArgs) -> Result<(), CliError> {
    let target = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&args.to)
        .map_err(|e| CliError::Runtime(format!("cannot open {}: {e}", args.to.display())))?;
    let input: Box<dyn std::io::Read> = if args.from == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        Box::new(std::io::BufReader::with_capacity(
            1 << 20,
            std::fs::File::open(&args.from)
                .map_err(|e| CliError::Runtime(format!("cannot open {}: {e}", args.from)))?,
        ))
    };
    let (header, applied) = crate::stream::apply(input, &target)
        .map_err(|e| CliError::Runtime(format!("{}: {e}", args.from)))?;
    match global.output {
        Output::Json => crate::ops::print_json(&json!({
            "image": args.to,
            "base_snapshot": header.base_snapshot,
            "snapshot": header.snapshot,
            "applied_bytes": applied,
        })),
        Output::Table => {
            println!(
                "applied {} of snapshot {} onto {}",
                human_bytes(applied),
                header.snapshot,
                args.to.display()
            );
            Ok(())
        }
    }
}

pub async fn delete(global: &GlobalArgs, args: &DeleteArgs) -> Result<(), CliError> {
    let (volume, unit_name) = volume_in_unit(global, &args.volume).await?;
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
    // A group's snapshot is one record: it went from every member.
    let group = if record.volumes.len() > 1 {
        group_names(&record, &volume_names(global, &unit_name).await)
    } else {
        None
    };
    match global.output {
        Output::Json => crate::ops::print_json(&json!({
            "id": record.id, "name": record.name, "state": "purged", "group": group
        })),
        Output::Table => {
            match group {
                Some(group) => println!(
                    "snapshot {} of consistency group {} deleted",
                    args.snapshot,
                    group.join(", ")
                ),
                None => println!("snapshot {} of {} deleted", args.snapshot, args.volume),
            }
            Ok(())
        }
    }
}
