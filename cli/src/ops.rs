//! Operator verbs: volumes and units through the zonal control plane's
//! HTTP API, sleds and head nodes through the unit's local control plane.
//!
//! ```text
//! volume create|list|describe|resize|delete ──HTTP──▶ zonal (/v1/volumes)
//! unit list|status ─────────────────────────HTTP──▶ zonal (/v1/units)
//!        status (live part), sled list|drain, head-node list
//!                  ──LcpClient (networks A, B)──▶ the unit's head nodes (rack file)
//! ```
//!
//! Where things are found: `--zonal` (env `RACKBLOCK_ZONAL`, default
//! `http://127.0.0.1:9000`); `--token` (env `RACKBLOCK_TOKEN`, else the file
//! `rackblock-data/zonal-token` that `rackblock up` writes); `--zonal-ca`
//! for an https:// zonal URL (env `RACKBLOCK_ZONAL_CA`, else
//! `rackblock-data/tls/ca.pem`); `--rack` for
//! the live views (env `RACKBLOCK_RACK`, else `rackblock-data/rack.toml`).
//! The zonal API lists no head-node addresses, so the live views need the
//! unit's rack file, as every daemon of the unit does.
//!
//! Input the CLI can check (sizes, erasure codes) is checked before
//! anything is sent; a refused command changes nothing. Errors are
//! [`CliError`]s, whose exit codes are decided in one place.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use hardware::rack::Rack;
use local_control_plane::state::{Health, PartitionMap, SledId, UnitStatus};
use local_control_plane::{Command, RaftStatus};
use proto::qos::VolumeQos;
use serde_json::{json, Map, Value};

use crate::error::{report, CliError};
use crate::http::{segment, ZonalApi};
use crate::text::{
    draw_progress, human_bytes, parse_block_size, parse_duration, parse_size, Table,
};
use crate::unit::{self, Output};

/// Where `rackblock up` keeps its state; the verbs look there for defaults.
pub const DEFAULT_DATA_DIR: &str = "rackblock-data";
/// File (in the data dir) holding the zonal admin token `up` generated.
pub const TOKEN_FILE: &str = "zonal-token";
/// The CA certificate `rackblock up` makes (in the data dir), trusted for
/// an https:// zonal URL when no `--zonal-ca` is given.
pub const TLS_CA_FILE: &str = "tls/ca.pem";

/// Flags every verb understands.
#[derive(Debug, Clone, clap::Args)]
pub struct GlobalArgs {
    /// URL of the zonal control plane's API.
    #[arg(
        long,
        global = true,
        env = "RACKBLOCK_ZONAL",
        default_value = "http://127.0.0.1:9000"
    )]
    pub zonal: String,
    /// PEM file of the CA that signed the zonal plane's certificate, for an
    /// https:// --zonal (default: rackblock-data/tls/ca.pem when present).
    #[arg(long, global = true, env = "RACKBLOCK_ZONAL_CA")]
    pub zonal_ca: Option<PathBuf>,
    /// Admin bearer token of the zonal API (default: env RACKBLOCK_TOKEN,
    /// else the file rackblock-data/zonal-token when present).
    #[arg(long, global = true, env = "RACKBLOCK_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Human tables or JSON.
    #[arg(long, global = true, value_enum, default_value = "table")]
    pub output: Output,
    /// Async runtime threads of this process: 0 = one per core; 1 = a
    /// single-threaded runtime (no cross-thread wake-ups: the cheapest per
    /// request when many daemons share few cores, as under `rackblock up`).
    #[arg(
        long,
        global = true,
        env = "RACKBLOCK_WORKER_THREADS",
        default_value_t = 0
    )]
    pub worker_threads: usize,
}

impl GlobalArgs {
    /// The zonal API client with the resolved token.
    pub fn api(&self) -> Result<ZonalApi, CliError> {
        let token = match &self.token {
            Some(token) => Some(token.clone()),
            None => {
                let path = Path::new(DEFAULT_DATA_DIR).join(TOKEN_FILE);
                match std::fs::read_to_string(&path) {
                    Ok(text) => Some(text.trim().to_owned()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => {
                        return Err(CliError::Usage(format!(
                            "cannot read the token file {}: {e}",
                            path.display()
                        )))
                    }
                }
            }
        };
        let default_ca = Path::new(DEFAULT_DATA_DIR).join(TLS_CA_FILE);
        let ca = match &self.zonal_ca {
            Some(path) => Some(path.clone()),
            None => default_ca.exists().then_some(default_ca),
        };
        ZonalApi::new(&self.zonal, token, ca.as_deref())
    }
}

/// `--rack`, else env RACKBLOCK_RACK, else `rackblock-data/rack.toml` if
/// it exists.
#[derive(Debug, Clone, clap::Args)]
pub struct RackArg {
    /// The unit's rack file (its head nodes' addresses on networks A and B).
    #[arg(long, env = "RACKBLOCK_RACK")]
    pub rack: Option<PathBuf>,
}

impl RackArg {
    /// The rack file named or found, if any.
    fn path(&self) -> Option<PathBuf> {
        match &self.rack {
            Some(path) => Some(path.clone()),
            None => {
                let default = Path::new(DEFAULT_DATA_DIR).join("rack.toml");
                default.exists().then_some(default)
            }
        }
    }

    /// The rack, `None` when none was named and the default is absent.
    pub fn load_optional(&self) -> Result<Option<Rack>, CliError> {
        let Some(path) = self.path() else {
            return Ok(None);
        };
        Rack::load(&path)
            .map(Some)
            .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))
    }

    /// The operator credential for this rack's unit
    /// ([`unit::operator_credential`]).
    pub fn credential(&self) -> Option<std::sync::Arc<proto::auth::Credential>> {
        unit::operator_credential(&self.path()?)
    }

    pub fn load(&self) -> Result<Rack, CliError> {
        self.load_optional()?.ok_or_else(|| {
            CliError::Usage(format!(
                "this verb asks the unit's local control plane and needs its rack file: \
                 --rack FILE (or RACKBLOCK_RACK; {DEFAULT_DATA_DIR}/rack.toml is used when present)"
            ))
        })
    }
}

pub(crate) fn print_json(value: &Value) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| CliError::Runtime(format!("cannot encode JSON: {e}")))?;
    println!("{text}");
    Ok(())
}

fn field_str<'a>(value: &'a Value, field: &str) -> &'a str {
    value.get(field).and_then(Value::as_str).unwrap_or("-")
}

fn field_u64(value: &Value, field: &str) -> u64 {
    value.get(field).and_then(Value::as_u64).unwrap_or(0)
}

/// Runs a verb and turns its error into a message and an exit code.
pub fn finish(verb: &str, result: Result<(), CliError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => report(verb, &error),
    }
}

// ---- volumes ----

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Volume name: letters, digits, '.', '_', '-'.
    pub name: String,
    /// Size: 4GiB, 512MiB, or bytes; a positive multiple of 4096 (a
    /// clone's is its parent's).
    #[arg(long, required_unless_present = "from_snapshot")]
    pub size: Option<String>,
    /// A writable clone of snapshot SNAP of volume VOL (`VOL@SNAP`), in
    /// VOL's unit with VOL's size, partition size and code: it reads as
    /// the snapshot until written (`volume flatten` copies the rest).
    #[arg(long, value_name = "VOL@SNAP", conflicts_with_all = ["code", "partition_size"])]
    pub from_snapshot: Option<String>,
    /// Erasure code "k+m" of the volume's extents.
    #[arg(long, default_value = "4+2")]
    pub code: String,
    /// Partition size (default 1GiB): the unit of placement on head nodes.
    #[arg(long)]
    pub partition_size: Option<String>,
    #[command(flatten)]
    pub qos: QosFlags,
}

/// A volume's QoS limits, recorded by its unit and enforced by every
/// attach agent (requests wait, never fail; an I/O of up to 256 KiB
/// costs one).
#[derive(Debug, Default, clap::Args)]
pub struct QosFlags {
    /// Limit of I/Os per second (reads and writes together).
    #[arg(long, value_name = "N")]
    pub iops: Option<u64>,
    /// Limit of bytes per second (50MiB, ...; reads and writes together).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub bandwidth: Option<u64>,
    /// Burst rate of --iops: an idle volume may run this fast for
    /// --burst-length, then decays to --iops.
    #[arg(long, value_name = "N")]
    pub burst_iops: Option<u64>,
    /// Burst rate of --bandwidth (bytes per second).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub burst_bandwidth: Option<u64>,
    /// How long a full burst credit lasts at the burst rate (default 1s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub burst_length: Option<Duration>,
}

impl QosFlags {
    /// The flags given, as JSON fields of the zonal API (`null` for the
    /// ones not given when `all` is set).
    fn fields(&self, all: bool) -> Map<String, Value> {
        let mut fields = Map::new();
        let burst_length_ms = self
            .burst_length
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        for (name, value) in [
            ("iops", self.iops),
            ("bandwidth_bytes_per_second", self.bandwidth),
            ("burst_iops", self.burst_iops),
            ("burst_bandwidth_bytes_per_second", self.burst_bandwidth),
            ("burst_length_ms", burst_length_ms),
        ] {
            match value {
                Some(value) => {
                    fields.insert(name.into(), json!(value));
                }
                None if all => {
                    fields.insert(name.into(), Value::Null);
                }
                None => {}
            }
        }
        fields
    }

    fn is_empty(&self) -> bool {
        self.fields(false).is_empty()
    }

    /// The limits as a whole (create), checked like the unit checks them.
    fn limits(&self) -> Result<Option<VolumeQos>, CliError> {
        let qos = VolumeQos {
            iops: self.iops,
            bandwidth_bytes_per_second: self.bandwidth,
            burst_iops: self.burst_iops,
            burst_bandwidth_bytes_per_second: self.burst_bandwidth,
            burst_length_ms: self
                .burst_length
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        };
        qos.validate()
            .map_err(|e| CliError::Usage(format!("--{}: {e}", flag_of(e.field()))))?;
        Ok(qos.normalized())
    }
}

/// The CLI flag of a `VolumeQos` field.
fn flag_of(field: &str) -> &'static str {
    match field {
        "iops" => "iops",
        "bandwidth_bytes_per_second" => "bandwidth",
        "burst_iops" => "burst-iops",
        "burst_bandwidth_bytes_per_second" => "burst-bandwidth",
        _ => "burst-length",
    }
}

/// One line for a volume's limits.
pub fn qos_line(qos: Option<&VolumeQos>) -> String {
    let Some(qos) = qos.filter(|q| !q.is_unlimited()) else {
        return "unlimited".into();
    };
    let burst_s = qos.burst_length_ms() as f64 / 1000.0;
    let mut parts = Vec::new();
    if let Some(iops) = qos.iops {
        parts.push(match qos.burst_iops {
            Some(burst) => format!("{iops} IOPS (burst {burst} for {burst_s}s)"),
            None => format!("{iops} IOPS"),
        });
    }
    if let Some(bandwidth) = qos.bandwidth_bytes_per_second {
        parts.push(match qos.burst_bandwidth_bytes_per_second {
            Some(burst) => format!(
                "{}/s (burst {}/s for {burst_s}s)",
                human_bytes(bandwidth),
                human_bytes(burst)
            ),
            None => format!("{}/s", human_bytes(bandwidth)),
        });
    }
    parts.join(", ")
}

#[derive(Debug, clap::Args)]
pub struct ModifyArgs {
    /// Volume name.
    pub name: String,
    /// Remove every limit first (then set the ones given here); without
    /// it, the limits not given are kept.
    #[arg(long)]
    pub clear_qos: bool,
    #[command(flatten)]
    pub qos: QosFlags,
}

/// `volume modify`: change a volume's QoS limits; attach agents apply
/// them within seconds (their next partition map read).
pub async fn volume_modify(global: &GlobalArgs, args: &ModifyArgs) -> Result<(), CliError> {
    let body = if args.qos.is_empty() {
        if !args.clear_qos {
            return Err(CliError::Usage(
                "nothing to change: give --iops, --bandwidth, --burst-iops, --burst-bandwidth, \
                 --burst-length or --clear-qos"
                    .into(),
            ));
        }
        json!({ "qos": null })
    } else {
        json!({ "qos": Value::Object(args.qos.fields(args.clear_qos)) })
    };
    let path = format!("/v1/volumes/{}", segment(&args.name));
    let reply = global.api()?.call("PATCH", &path, Some(&body)).await?;
    match global.output {
        Output::Json => print_json(&reply.body),
        Output::Table => {
            println!("{}", volume_line(&reply.body));
            println!("qos: {}", qos_line(record_qos(&reply.body).as_ref()));
            Ok(())
        }
    }
}

fn record_qos(v: &Value) -> Option<VolumeQos> {
    v.get("qos")
        .filter(|q| !q.is_null())
        .and_then(|q| serde_json::from_value(q.clone()).ok())
}

#[derive(Debug, clap::Args)]
pub struct NameArgs {
    /// Volume name.
    pub name: String,
}

#[derive(Debug, clap::Args)]
pub struct ResizeArgs {
    /// Volume name.
    pub name: String,
    /// New size (grow only): 8GiB, or bytes; a multiple of 4096.
    #[arg(long)]
    pub size: String,
}

fn volume_line(v: &Value) -> String {
    let clone = match v.get("from_snapshot").and_then(Value::as_str) {
        Some(source) => format!(", clone of {source}"),
        None => String::new(),
    };
    format!(
        "volume {} (id {}): {}, code {}, partitions of {}, unit {}, {}{clone}",
        field_str(v, "name"),
        field_u64(v, "id"),
        human_bytes(field_u64(v, "size_bytes")),
        field_str(v, "erasure_code"),
        human_bytes(field_u64(v, "partition_size_bytes")),
        field_str(v, "unit"),
        field_str(v, "state"),
    )
}

fn attachments(v: &Value) -> Vec<Value> {
    v.get("attachments")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

pub async fn volume_create(global: &GlobalArgs, args: &CreateArgs) -> Result<(), CliError> {
    let mut body = json!({ "name": args.name });
    if let Some(text) = &args.size {
        body["size_bytes"] = json!(parse_block_size("--size", text)?);
    }
    match &args.from_snapshot {
        Some(source) => {
            zonal_control_plane::model::SnapshotSource::parse(source)
                .map_err(|e| CliError::Usage(format!("--from-snapshot: {}", e.reason)))?;
            body["from_snapshot"] = json!(source);
        }
        None => {
            let code = zonal_control_plane::model::ErasureCode::parse(&args.code)
                .map_err(|e| CliError::Usage(format!("--code: {e}")))?;
            body["erasure_code"] = json!(code.to_string());
        }
    }
    if let Some(text) = &args.partition_size {
        let bytes = parse_block_size("--partition-size", text)?;
        body["partition_size_bytes"] = json!(bytes);
    }
    if let Some(qos) = args.qos.limits()? {
        body["qos"] = serde_json::to_value(qos).map_err(|e| CliError::Runtime(e.to_string()))?;
    }
    let api = global.api()?;
    let reply = api.call("POST", "/v1/volumes", Some(&body)).await?;
    match global.output {
        Output::Json => print_json(&reply.body),
        Output::Table => {
            let verb = if reply.status == 201 {
                "created"
            } else {
                "exists (same spec, nothing changed)"
            };
            println!("{verb}: {}", volume_line(&reply.body));
            if record_qos(&reply.body).is_some() {
                println!("qos: {}", qos_line(record_qos(&reply.body).as_ref()));
            }
            Ok(())
        }
    }
}

pub async fn volume_list(global: &GlobalArgs) -> Result<(), CliError> {
    let reply = global.api()?.call("GET", "/v1/volumes", None).await?;
    if global.output == Output::Json {
        return print_json(&reply.body);
    }
    let volumes = reply
        .body
        .get("volumes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut table = Table::new(&[
        "NAME",
        "ID",
        "SIZE",
        "CODE",
        "PARTITION",
        "UNIT",
        "STATE",
        "ATTACHED",
    ]);
    for v in &volumes {
        let hosts: Vec<String> = attachments(v)
            .iter()
            .map(|a| field_str(a, "host").to_owned())
            .collect();
        table.row(vec![
            field_str(v, "name").to_owned(),
            field_u64(v, "id").to_string(),
            human_bytes(field_u64(v, "size_bytes")),
            field_str(v, "erasure_code").to_owned(),
            human_bytes(field_u64(v, "partition_size_bytes")),
            field_str(v, "unit").to_owned(),
            field_str(v, "state").to_owned(),
            if hosts.is_empty() {
                "-".to_owned()
            } else {
                hosts.join(",")
            },
        ]);
    }
    if volumes.is_empty() {
        println!("no volumes (create one: rackblock volume create NAME --size 4GiB)");
    } else {
        table.print();
    }
    Ok(())
}

pub async fn volume_describe(global: &GlobalArgs, args: &NameArgs) -> Result<(), CliError> {
    let path = format!("/v1/volumes/{}", segment(&args.name));
    let reply = global.api()?.call("GET", &path, None).await?;
    if global.output == Output::Json {
        return print_json(&reply.body);
    }
    let v = &reply.body;
    println!("{}", volume_line(v));
    let recorded = record_qos(v);
    println!("qos: {}", qos_line(recorded.as_ref()));
    let at_unit: Option<VolumeQos> = v
        .get("partition_map")
        .and_then(|m| m.get("qos"))
        .filter(|q| !q.is_null())
        .and_then(|q| serde_json::from_value(q.clone()).ok());
    if v.get("partition_map").is_some_and(|m| !m.is_null()) && at_unit != recorded {
        println!(
            "qos at the unit (what agents enforce): {} (repeat `volume modify` to settle)",
            qos_line(at_unit.as_ref())
        );
    }
    let attached = attachments(v);
    if attached.is_empty() {
        println!("attachments: none");
    } else {
        for a in &attached {
            println!(
                "attachment {}: host {} (created at {} ms)",
                field_u64(a, "id"),
                field_str(a, "host"),
                field_u64(a, "created_at_ms")
            );
        }
    }
    if let Some(snapshots) = v.get("snapshots").and_then(Value::as_array) {
        if snapshots.is_empty() {
            println!("snapshots: none");
        }
        for s in snapshots {
            let space = match s.get("exclusive_bytes").and_then(Value::as_u64) {
                Some(bytes) => format!("holds {} exclusively", crate::text::human_bytes(bytes)),
                None => "space unknown".into(),
            };
            println!(
                "snapshot {} (id {}): {}, {space}",
                field_str(s, "name"),
                field_u64(s, "id"),
                field_str(s, "state")
            );
        }
    }
    if let Some(clone) = v.get("clone").filter(|c| !c.is_null()) {
        println!("{}", clone_line(clone));
    }
    match v.get("partition_map") {
        Some(map) if !map.is_null() => match serde_json::from_value::<PartitionMap>(map.clone()) {
            Ok(map) => unit::print_partition_map(&map),
            Err(e) => println!("partition map: unreadable ({e})"),
        },
        _ => println!(
            "partition map: not available ({})",
            v.get("partition_map_error")
                .and_then(Value::as_str)
                .unwrap_or("the unit did not answer")
        ),
    }
    Ok(())
}

/// A clone's parent and its flatten's progress (the zonal `clone` field).
fn clone_line(clone: &Value) -> String {
    let parent = format!(
        "clone of snapshot {} of volume id {}",
        field_u64(clone, "parent_snapshot"),
        field_u64(clone, "parent_volume")
    );
    match clone.get("flatten").filter(|f| !f.is_null()) {
        None => format!("{parent}: not flattening (`volume flatten` copies the rest)"),
        Some(f) => {
            let size = field_u64(clone, "size_bytes");
            let copied = field_u64(f, "copied_bytes");
            format!(
                "{parent}: flattening at {}/s per partition, {} of {} copied ({:.1} %), {} left ({}/{} partitions reported)",
                crate::text::human_bytes(field_u64(f, "rate_bytes_per_second")),
                crate::text::human_bytes(copied),
                crate::text::human_bytes(size),
                if size == 0 { 100.0 } else { copied as f64 * 100.0 / size as f64 },
                crate::text::human_bytes(field_u64(f, "remaining_bytes")),
                field_u64(f, "partitions_reported"),
                field_u64(f, "partitions"),
            )
        }
    }
}

pub async fn volume_resize(global: &GlobalArgs, args: &ResizeArgs) -> Result<(), CliError> {
    let size_bytes = parse_block_size("--size", &args.size)?;
    let path = format!("/v1/volumes/{}/resize", segment(&args.name));
    let body = json!({ "size_bytes": size_bytes });
    let reply = global.api()?.call("POST", &path, Some(&body)).await?;
    match global.output {
        Output::Json => print_json(&reply.body),
        Output::Table => {
            println!("{}", volume_line(&reply.body));
            Ok(())
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    /// Volume name.
    pub name: String,
    /// Delete even while attached: revokes every attachment (their hosts'
    /// I/O is refused from then on).
    #[arg(long)]
    pub force: bool,
}

pub async fn volume_delete(global: &GlobalArgs, args: &DeleteArgs) -> Result<(), CliError> {
    let mut path = format!("/v1/volumes/{}", segment(&args.name));
    if args.force {
        path.push_str("?force=true");
    }
    let reply = global.api()?.call("DELETE", &path, None).await?;
    match global.output {
        Output::Json => print_json(&reply.body),
        Output::Table => {
            println!("deleted: {}", volume_line(&reply.body));
            Ok(())
        }
    }
}

// ---- units ----

#[derive(Debug, clap::Args)]
pub struct UnitStatusArgs {
    /// Unit name in the zone (default: every unit the zonal plane knows).
    pub unit: Option<String>,
    #[command(flatten)]
    pub rack: RackArg,
}

fn unit_rows(units: &[Value]) -> Table {
    let mut table = Table::new(&[
        "UNIT",
        "HEALTH",
        "LEADER",
        "HEAD NODES",
        "SLEDS",
        "ALLOCATABLE",
        "FREE",
        "USED",
        "VOLUMES",
        "LAST ERROR",
    ]);
    for u in units {
        let capacity = u.get("capacity").cloned().unwrap_or(Value::Null);
        table.row(vec![
            field_str(u, "name").to_owned(),
            field_str(u, "health").to_owned(),
            field_str(u, "leader").to_owned(),
            format!(
                "{}/{} up",
                field_u64(u, "head_nodes_up"),
                field_u64(u, "head_nodes")
            ),
            format!("{}/{} up", field_u64(u, "sleds_up"), field_u64(u, "sleds")),
            human_bytes(field_u64(&capacity, "allocatable_bytes")),
            human_bytes(field_u64(&capacity, "free_bytes")),
            human_bytes(field_u64(&capacity, "used_bytes")),
            field_u64(u, "volumes").to_string(),
            field_str(u, "last_error").to_owned(),
        ]);
    }
    table
}

async fn zonal_units(api: &ZonalApi, name: Option<&str>) -> Result<Vec<Value>, CliError> {
    match name {
        Some(name) => {
            let path = format!("/v1/units/{}", segment(name));
            Ok(vec![api.call("GET", &path, None).await?.body])
        }
        None => Ok(api
            .call("GET", "/v1/units", None)
            .await?
            .body
            .get("units")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()),
    }
}

pub async fn unit_list(global: &GlobalArgs) -> Result<(), CliError> {
    let units = zonal_units(&global.api()?, None).await?;
    if global.output == Output::Json {
        return print_json(&json!({ "units": units }));
    }
    if units.is_empty() {
        println!("the zonal control plane knows no units (add [[units]] to its config)");
    } else {
        unit_rows(&units).print();
    }
    Ok(())
}

/// The live view of one unit from its LCP.
pub async fn live_status(
    rack: &Rack,
    credential: Option<std::sync::Arc<proto::auth::Credential>>,
) -> Result<(RaftStatus, UnitStatus), CliError> {
    let client = unit::client(rack, credential);
    let result = client.unit_status().await;
    client.close();
    result.map_err(|e| {
        CliError::Unavailable(format!(
            "no head node of unit {} answered: {e}",
            rack.unit.name
        ))
    })
}

/// Zonal view (when the zonal plane answers) plus the live view (when the
/// unit's rack file is known). Either alone is enough; an explicit API
/// error (auth, unknown unit) is an error.
pub async fn unit_status(global: &GlobalArgs, args: &UnitStatusArgs) -> Result<(), CliError> {
    let rack = args.rack.load_optional()?;
    let zonal = match zonal_units(&global.api()?, args.unit.as_deref()).await {
        Ok(units) => Some(units),
        Err(CliError::Unavailable(reason)) if rack.is_some() => {
            eprintln!("note: {reason}; showing the unit's own view only");
            None
        }
        Err(error) => return Err(error),
    };
    let rack = rack.filter(|rack| args.unit.as_deref().is_none_or(|u| u == rack.unit.name));
    let live = match &rack {
        Some(rack) => Some(live_status(rack, args.rack.credential()).await?),
        None => None,
    };
    if global.output == Output::Json {
        let (raft, unit) = match &live {
            Some((raft, unit)) => (json!(raft), json!(unit)),
            None => (Value::Null, Value::Null),
        };
        return print_json(&json!({ "zonal": zonal, "raft": raft, "unit": unit }));
    }
    if let Some(units) = &zonal {
        println!("zonal control plane ({}):", global.zonal);
        unit_rows(units).print();
        println!();
    }
    match (&rack, &live) {
        (Some(rack), Some((raft, unit))) => unit::print_status(rack, raft, unit),
        _ => println!(
            "live view: needs the unit's rack file (--rack FILE, RACKBLOCK_RACK, or {DEFAULT_DATA_DIR}/rack.toml)"
        ),
    }
    Ok(())
}

// ---- sleds and head nodes (live, through the LCP) ----

#[derive(Debug, clap::Args)]
pub struct LiveArgs {
    #[command(flatten)]
    pub rack: RackArg,
}

#[derive(Debug, clap::Args)]
pub struct DrainArgs {
    /// Sled id as in the rack file (e.g. sled-3).
    pub sled: String,
    /// Wait until no column is left on the sled, drawing progress.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this long (with --wait).
    #[arg(long, default_value = "10m", value_parser = crate::text::parse_duration)]
    pub wait_timeout: Duration,
    /// Set the sled back to Up instead (cancel a drain).
    #[arg(long)]
    pub undo: bool,
    /// Mark the sled Draining even when some of its columns cannot be
    /// placed elsewhere now (they stay on it, serving, until a sled or
    /// capacity is added).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub rack: RackArg,
}

pub async fn sled_list(global: &GlobalArgs, args: &LiveArgs) -> Result<(), CliError> {
    let rack = args.rack.load()?;
    let (_, unit) = live_status(&rack, args.rack.credential()).await?;
    if global.output == Output::Json {
        return print_json(&json!({ "unit": rack.unit.name, "sleds": unit.sleds }));
    }
    unit::print_sleds(&unit);
    Ok(())
}

pub async fn head_node_list(global: &GlobalArgs, args: &LiveArgs) -> Result<(), CliError> {
    let rack = args.rack.load()?;
    let (raft, unit) = live_status(&rack, args.rack.credential()).await?;
    if global.output == Output::Json {
        return print_json(&json!({
            "unit": rack.unit.name,
            "leader": raft.leader_name,
            "term": raft.term,
            "members": raft.members,
            "head_nodes": unit.nodes,
        }));
    }
    unit::print_head_nodes(&raft, &unit);
    Ok(())
}

/// One line per reason: "N columns: why".
fn blocked_lines(blocked: &[local_control_plane::state::BlockedColumns]) -> Vec<String> {
    blocked
        .iter()
        .map(|b| format!("{} columns: {}", b.columns, b.block))
        .collect()
}

fn used_columns(unit: &UnitStatus, sled: &str) -> Option<(Health, u64, u64)> {
    unit.sleds.iter().find(|s| s.id.0 == sled).map(|s| {
        let used: usize = s.devices.iter().map(|d| d.used_columns).sum();
        let free: usize = s.devices.iter().map(|d| d.free_columns).sum();
        (s.health, used as u64, (used + free) as u64)
    })
}

pub async fn sled_drain(global: &GlobalArgs, args: &DrainArgs) -> Result<(), CliError> {
    let rack = args.rack.load()?;
    let (_, before) = live_status(&rack, args.rack.credential()).await?;
    let Some((health_before, used_before, _)) = used_columns(&before, &args.sled) else {
        return Err(CliError::NotFound(format!(
            "unit {} has no sled {:?} (see `rackblock sled list`)",
            rack.unit.name, args.sled
        )));
    };
    let health = if args.undo {
        Health::Up
    } else {
        Health::Draining
    };
    if matches!(health_before, Health::Failed) {
        return Err(CliError::Api {
            status: 409,
            code: "sled_failed".into(),
            message: format!(
                "sled {} is Failed; it cannot be drained or brought back by the CLI",
                args.sled
            ),
        });
    }
    // Up front: a drain that cannot place the columns would wait forever.
    let outlook = before
        .sleds
        .iter()
        .find(|s| s.id.0 == args.sled)
        .map(|s| s.drain.clone())
        .unwrap_or_default();
    let stuck = outlook.blocked_columns();
    if !args.undo && stuck > 0 && !args.force && health_before != Health::Draining {
        return Err(CliError::Api {
            status: 409,
            code: "drain_cannot_place".into(),
            message: format!(
                "sled {} holds {} columns and {stuck} of them cannot be placed on another sled now ({}); \
                 draining would leave those on {} (still serving) until a sled or capacity is added. \
                 Nothing was changed: add a sled first, or re-run with --force to mark it Draining anyway",
                args.sled,
                outlook.columns,
                blocked_lines(&outlook.blocked).join("; "),
                args.sled
            ),
        });
    }
    let client = unit::client(&rack, args.rack.credential());
    let result = client
        .command(Command::SetSledHealth {
            sled: SledId(args.sled.clone()),
            health,
        })
        .await;
    client.close();
    match result {
        Ok(Ok(_)) => {}
        Ok(Err(refused)) => {
            return Err(CliError::Api {
                status: 409,
                code: refused.code().to_owned(),
                message: format!("the unit refused: {refused}"),
            })
        }
        Err(e) => {
            return Err(CliError::Unavailable(format!(
                "the unit's local control plane did not confirm the change (it may or may not be applied; \
                 repeating is safe): {e}"
            )))
        }
    }
    if args.undo {
        return match global.output {
            Output::Json => print_json(&json!({ "sled": args.sled, "health": "Up" })),
            Output::Table => {
                println!("sled {} is Up again (was {health_before:?})", args.sled);
                Ok(())
            }
        };
    }
    if global.output == Output::Json && !args.wait {
        return print_json(&json!({
            "sled": args.sled,
            "health": "Draining",
            "used_columns": used_before,
            "unplaceable_columns": stuck,
            "blocked": outlook.blocked,
        }));
    }
    println!(
        "sled {} is Draining: it keeps serving its {used_before} columns and gets no new ones.",
        args.sled
    );
    println!(
        "the control plane moves them to other sleds (rebuilt by the partitions' primaries, \
         rate-limited per unit; see `rackblock unit status`)."
    );
    if stuck > 0 {
        println!(
            "{stuck} of them cannot be placed now and stay on {} until a sled or capacity is added:",
            args.sled
        );
        for line in blocked_lines(&outlook.blocked) {
            println!("  {line}");
        }
    }
    if !args.wait {
        if used_before > 0 {
            draw_progress(0, used_before, "columns moved off");
            crate::text::end_progress();
        }
        return Ok(());
    }
    let deadline = Instant::now() + args.wait_timeout;
    loop {
        let (_, now) = live_status(&rack, args.rack.credential()).await?;
        let used = used_columns(&now, &args.sled).map_or(0, |(_, used, _)| used);
        let moved = used_before.saturating_sub(used);
        draw_progress(moved, used_before, "columns moved off");
        if used == 0 {
            crate::text::end_progress();
            println!("sled {} holds no columns", args.sled);
            return Ok(());
        }
        // Nothing running and every column left blocked: waiting cannot end.
        let r = &now.repair;
        let left = now
            .sleds
            .iter()
            .find(|s| s.id.0 == args.sled)
            .map(|s| s.drain.clone())
            .unwrap_or_default();
        if r.pending + r.running == 0 && left.blocked_columns() as u64 >= used {
            crate::text::end_progress();
            return Err(CliError::Runtime(format!(
                "sled {} still holds {used} columns and none can move now: {}",
                args.sled,
                blocked_lines(&left.blocked).join("; ")
            )));
        }
        if Instant::now() >= deadline {
            crate::text::end_progress();
            return Err(CliError::Runtime(format!(
                "sled {} still holds {used} columns after {:?}",
                args.sled, args.wait_timeout
            )));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[derive(Debug, clap::Args)]
pub struct DetachArgs {
    /// Volume name.
    pub name: String,
    /// Attachment id (see `rackblock volume describe`).
    #[arg(long)]
    pub attachment: u64,
}

/// Removes an attachment record (an attach agent that was killed leaves
/// its attachment behind, and a volume with attachments cannot be deleted
/// without `--force`).
pub async fn volume_detach(global: &GlobalArgs, args: &DetachArgs) -> Result<(), CliError> {
    let path = format!(
        "/v1/volumes/{}/attachments/{}",
        segment(&args.name),
        args.attachment
    );
    let reply = global.api()?.call("DELETE", &path, None).await?;
    match global.output {
        Output::Json => print_json(&reply.body),
        Output::Table => {
            println!(
                "detached attachment {}: {}",
                args.attachment,
                volume_line(&reply.body)
            );
            Ok(())
        }
    }
}
