//! `rackblock volume flatten`: a writable clone stops depending on its
//! parent snapshot.
//!
//! ```text
//! NAME ──HTTP GET /v1/volumes/NAME──▶ zonal: the clone's id in its unit
//! LcpClient ─StartFlatten{rate}─▶ the clone's primaries copy every block
//!   the clone never wrote from the parent snapshot (never one it wrote),
//!   each reporting the blocks left every second (FlattenProgress)
//! --wait: poll UnitStatus.clones until the clone is gone from it (every
//!   partition reported none left: the parent snapshot may be deleted)
//! ```
//!
//! `rackblock volume rollback NAME SNAP`: a detached volume gets the
//! snapshot's content (StartRollback, refused while attached; the
//! primaries rewrite the blocks that differ, the volume takes no
//! attachment until all are done); waits for the end.
//!
//! Like the snapshot verbs it needs the unit's rack file (`--rack`,
//! `RACKBLOCK_RACK`). `volume create NAME --from-snapshot VOL@SNAP` (in
//! `ops.rs`) makes the clone through the zonal API.

use std::time::{Duration, Instant};

use local_control_plane::state::CloneStatus;
use local_control_plane::Command;
use serde_json::json;

use crate::error::CliError;
use crate::ops::{GlobalArgs, RackArg};
use crate::text::human_bytes;
use crate::unit::Output;

/// Pause between two looks at the unit while waiting.
const POLL: Duration = Duration::from_millis(250);

#[derive(Debug, clap::Args)]
pub struct FlattenArgs {
    /// The clone's name.
    pub name: String,
    /// Wait until the clone no longer depends on its parent, printing the
    /// progress.
    #[arg(long)]
    pub wait: bool,
    /// Copy rate of each partition, MiB per second.
    #[arg(long, default_value_t = 64)]
    pub rate: u64,
    /// Give up waiting after this long (the flatten goes on).
    #[arg(long, default_value = "1h", value_parser = crate::text::parse_duration)]
    pub wait_timeout: Duration,
    #[command(flatten)]
    pub rack: RackArg,
}

async fn clone_status(rack: &RackArg, volume: u64) -> Result<Option<CloneStatus>, CliError> {
    let loaded = rack.load()?;
    let (_, status) = crate::ops::live_status(&loaded, rack.credential()).await?;
    Ok(status.clones.into_iter().find(|c| c.volume == volume))
}

/// `(blocks left, partitions reported)` of a flatten.
fn progress(clone: &CloneStatus) -> (u64, usize) {
    clone.flatten.as_ref().map_or((clone.size_blocks, 0), |f| {
        (f.remaining_blocks.values().sum(), f.remaining_blocks.len())
    })
}

pub async fn flatten(global: &GlobalArgs, args: &FlattenArgs) -> Result<(), CliError> {
    if args.rate == 0 {
        return Err(CliError::Usage("--rate must be at least 1 MiB/s".into()));
    }
    let rate_bytes_per_second = args
        .rate
        .checked_mul(1 << 20)
        .ok_or_else(|| CliError::Usage("--rate too large".into()))?;
    let volume = crate::snapshot::volume_id(global, &args.name).await?;
    if clone_status(&args.rack, volume).await?.is_none() {
        return Err(CliError::Conflict(format!(
            "volume {} is not a clone (or is flattened already)",
            args.name
        )));
    }
    crate::snapshot::propose(
        &args.rack,
        Command::StartFlatten {
            volume,
            rate_bytes_per_second,
        },
    )
    .await?;
    if !args.wait {
        return match global.output {
            Output::Json => crate::ops::print_json(&json!({
                "volume": args.name, "state": "flattening", "rate_bytes_per_second": rate_bytes_per_second,
            })),
            Output::Table => {
                println!(
                    "flattening {} at {} MiB/s per partition (volume flatten {} --wait shows the progress)",
                    args.name, args.rate, args.name
                );
                Ok(())
            }
        };
    }
    let started = Instant::now();
    let deadline = started + args.wait_timeout;
    let mut last_line = String::new();
    while let Some(clone) = clone_status(&args.rack, volume).await? {
        let (left, reported) = progress(&clone);
        let line = format!(
            "flatten {}: {} left to copy ({reported}/{} partitions reported)",
            args.name,
            human_bytes(left * proto::BLOCK_SIZE_BYTES),
            clone.partitions
        );
        if global.output == Output::Table && line != last_line {
            eprintln!("{line}");
            last_line = line;
        }
        if Instant::now() >= deadline {
            return Err(CliError::Unavailable(format!(
                "{} still flattening after {:?} ({} left)",
                args.name,
                args.wait_timeout,
                human_bytes(left * proto::BLOCK_SIZE_BYTES)
            )));
        }
        tokio::time::sleep(POLL).await;
    }
    let elapsed = started.elapsed();
    match global.output {
        Output::Json => crate::ops::print_json(&json!({
            "volume": args.name, "state": "flattened", "seconds": elapsed.as_secs_f64(),
        })),
        Output::Table => {
            println!(
                "{} flattened in {:.1} s: it no longer depends on its parent snapshot",
                args.name,
                elapsed.as_secs_f64()
            );
            Ok(())
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct RollbackArgs {
    /// Volume name (detached: refused while attached).
    pub name: String,
    /// The snapshot whose content becomes the volume's.
    pub snapshot: String,
    /// Give up waiting after this long (the rollback goes on; the volume
    /// takes no attachment until it is over).
    #[arg(long, default_value = "1h", value_parser = crate::text::parse_duration)]
    pub wait_timeout: Duration,
    #[command(flatten)]
    pub rack: RackArg,
}

pub async fn rollback(global: &GlobalArgs, args: &RollbackArgs) -> Result<(), CliError> {
    let volume = crate::snapshot::volume_id(global, &args.name).await?;
    crate::snapshot::propose(
        &args.rack,
        Command::StartRollback {
            volume,
            snapshot: args.snapshot.clone(),
        },
    )
    .await?;
    let started = Instant::now();
    let deadline = started + args.wait_timeout;
    let mut last_line = String::new();
    loop {
        let loaded = args.rack.load()?;
        let (_, status) = crate::ops::live_status(&loaded, args.rack.credential()).await?;
        let Some(state) = status.rollbacks.into_iter().find(|r| r.volume == volume) else {
            break;
        };
        let total = state.partition_size_blocks * state.partitions as u64;
        let rolled: u64 = state.rollback.cursors.values().sum();
        let line = format!(
            "rollback {} to {}: {} of {} looked at ({}/{} partitions done)",
            args.name,
            args.snapshot,
            human_bytes(rolled * proto::BLOCK_SIZE_BYTES),
            human_bytes(total * proto::BLOCK_SIZE_BYTES),
            state.rollback.done.len(),
            state.partitions
        );
        if global.output == Output::Table && line != last_line {
            eprintln!("{line}");
            last_line = line;
        }
        if Instant::now() >= deadline {
            return Err(CliError::Unavailable(format!(
                "{} still rolling back after {:?}",
                args.name, args.wait_timeout
            )));
        }
        tokio::time::sleep(POLL).await;
    }
    let elapsed = started.elapsed();
    match global.output {
        Output::Json => crate::ops::print_json(&json!({
            "volume": args.name, "snapshot": args.snapshot, "state": "rolled_back",
            "seconds": elapsed.as_secs_f64(),
        })),
        Output::Table => {
            println!(
                "{} rolled back to {} in {:.1} s",
                args.name,
                args.snapshot,
                elapsed.as_secs_f64()
            );
            Ok(())
        }
    }
}
