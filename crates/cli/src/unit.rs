//! Operator verbs that talk to the unit's local control plane:
//! `rackblock unit status` and (temporary, until the zonal plane places
//! volumes) `rackblock volume register`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use hardware::rack::{ErasureCode, Rack};
use local_control_plane::client::ClientError;
use local_control_plane::state::PartitionMap;
use local_control_plane::{Command, LcpClient, RaftStatus, UnitStatus};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The unit's rack file (names every head node and its addresses).
    #[arg(long)]
    rack: PathBuf,
    #[arg(long, value_enum, default_value = "table")]
    output: Output,
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
    #[arg(long, value_enum, default_value = "table")]
    output: Output,
}

fn load_rack(path: &PathBuf) -> Result<Rack, ExitCode> {
    Rack::load(path).map_err(|e| {
        eprintln!("rackblock: {}: {e}", path.display());
        ExitCode::from(2)
    })
}

fn client(rack: &Rack) -> LcpClient {
    LcpClient::new(rack).with_retries(3, Duration::from_millis(500))
}

fn no_answer(error: ClientError) -> ExitCode {
    eprintln!("rackblock: no head node of the unit answered: {error}");
    ExitCode::from(1)
}

pub async fn status(args: StatusArgs) -> ExitCode {
    let rack = match load_rack(&args.rack) {
        Ok(rack) => rack,
        Err(code) => return code,
    };
    let client = client(&rack);
    let result = client.unit_status().await;
    client.close();
    let (raft, unit) = match result {
        Ok(status) => status,
        Err(error) => return no_answer(error),
    };
    match args.output {
        Output::Json => match serde_json::to_string_pretty(&serde_json::json!({
            "raft": raft,
            "unit": unit,
        })) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("rackblock: cannot encode the status: {e}");
                return ExitCode::from(1);
            }
        },
        Output::Table => print_status(&rack, &raft, &unit),
    }
    ExitCode::SUCCESS
}

fn up_down(up: bool) -> &'static str {
    if up {
        "up"
    } else {
        "DOWN"
    }
}

fn print_status(rack: &Rack, raft: &RaftStatus, unit: &UnitStatus) {
    println!(
        "unit {}: leader {} (raft id {}), term {}, {} voters, {} learners",
        rack.unit.name,
        raft.leader_name.as_deref().unwrap_or("none"),
        raft.leader.map(|l| l.to_string()).unwrap_or("-".into()),
        raft.term,
        raft.voters.len(),
        raft.learners.len()
    );
    println!(
        "{:<10} {:<5} {:<8} {:<8} {:<5} {:<5} {:<22} {:<22} {:>9} {:>9}",
        "HEAD NODE",
        "RAFT",
        "ROLE",
        "HEALTH",
        "NET A",
        "NET B",
        "ADDRESS A",
        "ADDRESS B",
        "PRIMARIES",
        "SECONDARIES"
    );
    for member in &raft.members {
        let node = unit.nodes.iter().find(|n| n.id.0 == member.id);
        let role = if raft.leader == Some(member.raft_id) {
            "leader"
        } else if member.voter {
            "voter"
        } else {
            "learner"
        };
        println!(
            "{:<10} {:<5} {:<8} {:<8} {:<5} {:<5} {:<22} {:<22} {:>9} {:>9}",
            member.id,
            member.raft_id,
            role,
            node.map(|n| format!("{:?}", n.health))
                .unwrap_or("-".into()),
            node.map(|n| up_down(n.paths.network_a_up)).unwrap_or("-"),
            node.map(|n| up_down(n.paths.network_b_up)).unwrap_or("-"),
            member.address_a,
            member.address_b,
            node.map(|n| n.primaries).unwrap_or(0),
            node.map(|n| n.secondaries).unwrap_or(0),
        );
    }
    println!(
        "{:<10} {:<8} {:<5} {:<5} {:<8} {:<8} {:>8} {:>12} {:>12}",
        "SLED", "HEALTH", "NET A", "NET B", "FAULT", "POWER", "DEVICES", "FREE COLS", "USED COLS"
    );
    for sled in &unit.sleds {
        let free: usize = sled.devices.iter().map(|d| d.free_columns).sum();
        let used: usize = sled.devices.iter().map(|d| d.used_columns).sum();
        println!(
            "{:<10} {:<8} {:<5} {:<5} {:<8} {:<8} {:>8} {:>12} {:>12}",
            sled.id.0,
            format!("{:?}", sled.health),
            up_down(sled.paths.network_a_up),
            up_down(sled.paths.network_b_up),
            sled.fault_domain,
            sled.power_domain,
            sled.devices.len(),
            free,
            used
        );
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!(
        "capacity: {:.1} GiB free ({} allocatable columns), {:.1} GiB used; {} volumes, {} partitions, {} extents",
        gib(unit.capacity.free_bytes),
        unit.capacity.allocatable_columns,
        gib(unit.capacity.used_bytes),
        unit.volumes,
        unit.partitions,
        unit.extents
    );
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

pub async fn register_volume(args: RegisterArgs) -> ExitCode {
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
    let client = client(&rack);
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
            match args.output {
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
