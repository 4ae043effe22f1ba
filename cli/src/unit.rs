//! Views of the unit's local control plane (the live part of
//! `rackblock unit status`, `sled list`, `head-node list`) and the direct
//! `rackblock volume register` (registers a volume with the unit without
//! the zonal control plane; benches and tests use it).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use hardware::rack::{ErasureCode, Rack};
use local_control_plane::client::ClientError;
use local_control_plane::state::PartitionMap;
use local_control_plane::{Command, LcpClient, RaftStatus, UnitStatus};
use proto::auth::Credential;

use crate::text::{human_bytes, Table};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct RegisterArgs {
    /// The unit's rack file.
    #[arg(long)]
    rack: PathBuf,
    /// Volume id (as the zonal control plane would number it).
    #[arg(long)]
    id: u64,
    /// Volume name, unique in the unit.
    #[arg(long)]
    name: String,
    /// Size in GiB.
    #[arg(long)]
    size_gib: u64,
    /// Erasure code "k+m".
    #[arg(long, default_value = "4+2")]
    code: String,
    /// Partition size in MiB.
    #[arg(long, default_value_t = 1024)]
    partition_size_mib: u64,
}

fn load_rack(path: &PathBuf) -> Result<Rack, ExitCode> {
    Rack::load(path).map_err(|e| {
        eprintln!("rackblock: {}: {e}", path.display());
        ExitCode::from(2)
    })
}

/// An operator's control-plane client of the unit (`credential`: see
/// [`operator_credential`]).
pub fn client(rack: &Rack, credential: Option<Arc<Credential>>) -> LcpClient {
    LcpClient::new(rack, credential).with_retries(3, Duration::from_millis(500))
}

/// The credential an operator verb uses with the unit of `rack_file`
/// (SECURITY.md): from `$RACKBLOCK_CREDENTIALS` (a directory), else the
/// `credentials/` directory beside the rack file; the operator key of
/// `$RACKBLOCK_OPERATOR` (default `operator`), else one derived from the
/// unit key found there. `None` when neither is readable: the unit's head
/// nodes then refuse the connection.
pub fn operator_credential(rack_file: &Path) -> Option<Arc<Credential>> {
    let dir = std::env::var_os("RACKBLOCK_CREDENTIALS")
        .map(PathBuf::from)
        .unwrap_or_else(|| proto::auth::default_credentials_dir(rack_file));
    let name = std::env::var("RACKBLOCK_OPERATOR")
        .unwrap_or_else(|_| proto::auth::DEFAULT_OPERATOR.to_owned());
    proto::auth::operator_credential(&dir, &name).map(Arc::new)
}

fn no_answer(error: ClientError) -> ExitCode {
    eprintln!("rackblock: no head node of the unit answered: {error}");
    ExitCode::from(1)
}

fn up_down(up: bool) -> &'static str {
    if up {
        "up"
    } else {
        "DOWN"
    }
}

pub fn print_status(rack: &Rack, raft: &RaftStatus, unit: &UnitStatus) {
    println!(
        "unit {}: leader {} (raft id {}), term {}, {} voters, {} learners",
        rack.unit.name,
        raft.leader_name.as_deref().unwrap_or("none"),
        raft.leader.map(|l| l.to_string()).unwrap_or("-".into()),
        raft.term,
        raft.voters.len(),
        raft.learners.len()
    );
    print_head_nodes(raft, unit);
    print_sleds(unit);
    print_devices(unit);
    println!(
        "capacity: {} free ({} allocatable columns), {} used; {} volumes ({} being deleted), {} partitions, {} extents",
        human_bytes(unit.capacity.free_bytes),
        unit.capacity.allocatable_columns,
        human_bytes(unit.capacity.used_bytes),
        unit.volumes,
        unit.deleting_volumes,
        unit.partitions,
        unit.extents
    );
    print_repair(unit);
    let a = &unit.allocation;
    println!(
        "allocation: {} sleds can take a column; {} degraded extents, {} owed columns",
        a.writable_sleds, a.degraded_extents, a.owed_columns
    );
    for reason in &a.reasons {
        println!("  {reason}");
    }
    let f = &unit.failover;
    println!(
        "failover: {} partitions failing over, {} re-mirroring, {} with no live copy",
        f.failing_over, f.remirroring, f.no_live_copy
    );
    if f.secondary_catching_up > 0 || f.waiting_for_old_primary > 0 {
        println!(
            "  {} partitions with a secondary catching up, {} of them waiting for their old primary (not promoted: the secondary lacks acknowledged writes)",
            f.secondary_catching_up, f.waiting_for_old_primary
        );
    }
}

/// Column repair: tasks pending/running, work left, rate, each task.
pub fn print_repair(unit: &UnitStatus) {
    let r = &unit.repair;
    println!(
        "repair: {} pending, {} running, {} columns waiting, {} to rebuild at {}/s; {} done ({}), {} cancelled",
        r.pending,
        r.running,
        r.columns_waiting,
        human_bytes(r.bytes_remaining),
        human_bytes(r.rate_bytes_per_second),
        r.completed,
        human_bytes(r.completed_bytes),
        r.cancelled
    );
    for b in &r.blocked {
        println!("  {} columns cannot be placed: {}", b.columns, b.block);
    }
    if r.tasks.is_empty() {
        return;
    }
    let mut table = Table::new(&[
        "EXTENT",
        "COLUMN",
        "PARTITION",
        "REASON",
        "PHASE",
        "OLD",
        "NEW",
        "DONE",
        "TOTAL",
        "RATE",
    ]);
    for t in &r.tasks {
        table.row(vec![
            t.extent.to_string(),
            t.column_index.to_string(),
            t.partition.to_string(),
            format!("{:?}", t.reason),
            format!("{:?}", t.phase),
            t.old
                .as_ref()
                .map_or_else(|| "(owed)".to_string(), ToString::to_string),
            t.new.to_string(),
            human_bytes(t.bytes_done),
            human_bytes(t.bytes_total),
            format!("{}/s", human_bytes(t.measured_bytes_per_second())),
        ]);
    }
    table.print();
}

/// Raft members with their role, health, both paths and partition roles.
pub fn print_head_nodes(raft: &RaftStatus, unit: &UnitStatus) {
    let mut table = Table::new(&[
        "HEAD NODE",
        "RAFT",
        "ROLE",
        "HEALTH",
        "NET A",
        "NET B",
        "ADDRESS A",
        "ADDRESS B",
        "ADMIN",
        "PRIMARIES",
        "SECONDARIES",
    ]);
    for member in &raft.members {
        let node = unit.nodes.iter().find(|n| n.id.0 == member.id);
        let role = if raft.leader == Some(member.raft_id) {
            "leader"
        } else if member.voter {
            "voter"
        } else {
            "learner"
        };
        table.row(vec![
            member.id.clone(),
            member.raft_id.to_string(),
            role.to_owned(),
            node.map(|n| format!("{:?}", n.health))
                .unwrap_or("-".into()),
            node.map(|n| up_down(n.paths.network_a_up))
                .unwrap_or("-")
                .to_owned(),
            node.map(|n| up_down(n.paths.network_b_up))
                .unwrap_or("-")
                .to_owned(),
            member.address_a.clone(),
            member.address_b.clone(),
            member.admin.clone(),
            node.map(|n| n.primaries).unwrap_or(0).to_string(),
            node.map(|n| n.secondaries).unwrap_or(0).to_string(),
        ]);
    }
    table.print();
    for node in unit.nodes.iter().filter(|n| n.failure.is_some()) {
        println!(
            "head node {} out of service: {}",
            node.id,
            node.failure.as_deref().unwrap_or_default()
        );
    }
}

/// Sleds with health, both paths, domains and column counts.
pub fn print_sleds(unit: &UnitStatus) {
    let mut table = Table::new(&[
        "SLED",
        "HEALTH",
        "NET A",
        "NET B",
        "FAULT",
        "POWER",
        "DEVICES",
        "FREE COLS",
        "USED COLS",
        "FREE",
    ]);
    for sled in &unit.sleds {
        let free: usize = sled.devices.iter().map(|d| d.free_columns).sum();
        let used: usize = sled.devices.iter().map(|d| d.used_columns).sum();
        table.row(vec![
            sled.id.0.clone(),
            format!("{:?}", sled.health),
            up_down(sled.paths.network_a_up).to_owned(),
            up_down(sled.paths.network_b_up).to_owned(),
            sled.fault_domain.clone(),
            sled.power_domain.clone(),
            sled.devices.len().to_string(),
            free.to_string(),
            used.to_string(),
            human_bytes((free as u64).saturating_mul(sled.column_size_bytes)),
        ]);
    }
    table.print();
}

/// Every device of every sled.
pub fn print_devices(unit: &UnitStatus) {
    let mut table = Table::new(&["SLED", "DEVICE", "HEALTH", "SIZE", "FREE COLS", "USED COLS"]);
    for sled in &unit.sleds {
        for device in &sled.devices {
            table.row(vec![
                sled.id.0.clone(),
                device.device.to_string(),
                format!("{:?}", device.health),
                human_bytes(device.size_bytes),
                device.free_columns.to_string(),
                device.used_columns.to_string(),
            ]);
        }
    }
    table.print();
}

pub fn print_partition_map(map: &PartitionMap) {
    println!(
        "volume {}: {} bytes in {} partitions of {} bytes",
        map.volume,
        map.size_bytes,
        map.partitions.len(),
        map.partition_size_bytes
    );
    println!(
        "{:<9} {:>5} {:<10} {:<22} {:<22} {:<10} {:<22} {:<22}",
        "PARTITION",
        "EPOCH",
        "PRIMARY",
        "PRIMARY A",
        "PRIMARY B",
        "SECONDARY",
        "SECONDARY A",
        "SECONDARY B"
    );
    for p in &map.partitions {
        println!(
            "{:<9} {:>5} {:<10} {:<22} {:<22} {:<10} {:<22} {:<22}",
            p.index,
            p.epoch,
            p.primary.id.0,
            p.primary.address_a,
            p.primary.address_b,
            p.secondary.id.0,
            p.secondary.address_a,
            p.secondary.address_b
        );
    }
}

pub async fn register_volume(args: RegisterArgs, output: Output) -> ExitCode {
    let rack = match load_rack(&args.rack) {
        Ok(rack) => rack,
        Err(code) => return code,
    };
    let code: ErasureCode = match args.code.parse() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rackblock: --code: {e}");
            return ExitCode::from(2);
        }
    };
    let (Some(size_bytes), Some(partition_size_bytes)) = (
        args.size_gib.checked_mul(1 << 30),
        args.partition_size_mib.checked_mul(1 << 20),
    ) else {
        eprintln!("rackblock: size out of range");
        return ExitCode::from(2);
    };
    let client = client(&rack, operator_credential(&args.rack));
    let command = Command::RegisterVolume {
        volume: args.id,
        name: args.name.clone(),
        size_bytes,
        partition_size_bytes,
        k: code.k,
        m: code.m,
    };
    let result = match client.command(command).await {
        Ok(result) => result,
        Err(error) => {
            client.close();
            return no_answer(error);
        }
    };
    if let Err(refused) = result {
        client.close();
        eprintln!(
            "rackblock: volume {} refused ({}): {refused}",
            args.id,
            refused.code()
        );
        return ExitCode::from(1);
    }
    let map = client.partition_map(args.id).await;
    client.close();
    match map {
        Ok(map) => {
            match output {
                Output::Json => match serde_json::to_string_pretty(&map) {
                    Ok(text) => println!("{text}"),
                    Err(e) => {
                        eprintln!("rackblock: {e}");
                        return ExitCode::from(1);
                    }
                },
                Output::Table => {
                    println!("registered volume {} ({})", args.id, args.name);
                    print_partition_map(&map);
                }
            }
            ExitCode::SUCCESS
        }
        Err(error) => no_answer(error),
    }
}
