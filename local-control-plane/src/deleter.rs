//! The leader's volume deleter: drives every volume in the state's
//! `deleting` set to completion (design and crash safety in
//! [`crate::state`]'s `volumes` module).
//!
//! ```text
//! every tick (500 ms), while this node leads:
//!   plan = state.deletion_plan(now, lease margin, 16 extents)
//!   per extent: FreeColumn{column, partition, epoch} on each sled
//!               (Free → Freed, already free → Freed, a column another
//!                partition holds → refused: the extent waits, nothing freed)
//!               all freed ─▶ propose ReleaseDeletedExtent
//!   per volume with no extent left ─▶ propose PurgeVolume
//! ```
//!
//! The plan is a pure function of the replicated state, so a new leader
//! picks up exactly where the old one stopped; every step is idempotent.
//! A sled that does not answer keeps its extents waiting (retried next
//! tick) until it answers or is declared Failed (its columns are then
//! retired instead of freed).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hardware::rack::Rack;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use proto::sled::{SledError, SledRequest, SledResponse};
use proto::Message;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::command::{Command, Outcome};
use crate::error::CommandError;
use crate::network::PeerLinks;
use crate::state::{ExtentToFree, UnitState};

/// Pause between two deletion plans.
pub const DELETER_INTERVAL: Duration = Duration::from_millis(500);
/// Most extents freed per tick (bounds the sled traffic of one tick).
pub const MAX_EXTENTS_PER_TICK: usize = 16;

/// Deleter counters on `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct DeleterMetrics {
    extents_released: Counter,
    volumes_purged: Counter,
    deleting_volumes: Gauge,
}

impl DeleterMetrics {
    pub fn register(registry: &mut Registry) -> DeleterMetrics {
        let m = DeleterMetrics::default();
        registry.register(
            "rackblock_lcp_deleter_extents_released",
            "Extents of deleted volumes freed on the sleds and returned to the free pool",
            m.extents_released.clone(),
        );
        registry.register(
            "rackblock_lcp_deleter_volumes_purged",
            "Deleted volumes whose space is entirely back in the free pool",
            m.volumes_purged.clone(),
        );
        registry.register(
            "rackblock_lcp_deleting_volumes",
            "Volumes being deleted (as this leader last planned)",
            m.deleting_volumes.clone(),
        );
        m
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Frees one extent's columns on their sleds. `Err` names the first
/// column that could not be freed (the extent waits for the next tick).
async fn free_on_sleds(
    links: &PeerLinks,
    rack: &Rack,
    extent: &ExtentToFree,
) -> Result<(), String> {
    for column in &extent.columns {
        let spec = rack
            .sled(&column.sled.0)
            .ok_or_else(|| format!("sled {} is not in the rack file", column.sled))?;
        let link = links.link(&column.sled.0, spec.address_a, spec.address_b);
        let request = SledRequest::FreeColumn {
            column: column.column_id(),
            partition: extent.partition,
            epoch: extent.epoch,
        };
        match link.call(Message::Sled(request), true).await {
            Ok(Message::SledReply(SledResponse::Freed)) => {}
            // Freed by an earlier attempt and maybe reused since: never ours.
            Ok(Message::SledReply(SledResponse::Error(SledError::BadColumnState { .. }))) => {}
            Ok(other) => return Err(format!("FreeColumn {column}: {other:?}")),
            Err(error) => return Err(format!("FreeColumn {column}: {error}")),
        }
    }
    Ok(())
}

/// Runs the deleter until `lost` (leadership lost) is cancelled.
pub async fn run<P, F>(
    state: impl Fn() -> UnitState,
    propose: P,
    links: Arc<PeerLinks>,
    rack: Rack,
    lease_margin: Duration,
    metrics: DeleterMetrics,
    lost: CancellationToken,
) where
    P: Fn(Command) -> F,
    F: Future<Output = Result<Result<Outcome, CommandError>, String>>,
{
    let margin_ms = u64::try_from(lease_margin.as_millis()).unwrap_or(u64::MAX);
    loop {
        let snapshot = state();
        metrics
            .deleting_volumes
            .set(i64::try_from(snapshot.deleting().len()).unwrap_or(i64::MAX));
        if !snapshot.deleting().is_empty() {
            let plan = snapshot.deletion_plan(now_ms(), margin_ms, MAX_EXTENTS_PER_TICK);
            for extent in &plan.extents {
                if lost.is_cancelled() {
                    return;
                }
                if let Err(reason) = free_on_sleds(&links, &rack, extent).await {
                    debug!(extent = %extent.extent, %reason, "extent of a deleted volume not freed yet");
                    continue;
                }
                match propose(Command::ReleaseDeletedExtent {
                    extent: extent.extent,
                })
                .await
                {
                    Ok(Ok(_)) => {
                        metrics.extents_released.inc();
                    }
                    // Released by an earlier attempt whose answer was lost.
                    Ok(Err(CommandError::UnknownExtent { .. })) => {}
                    Ok(Err(error)) => {
                        warn!(extent = %extent.extent, %error, "release refused")
                    }
                    Err(error) => {
                        debug!(extent = %extent.extent, %error, "cannot propose a release");
                        break;
                    }
                }
            }
            for volume in plan.purge {
                match propose(Command::PurgeVolume { volume }).await {
                    Ok(Ok(_)) => {
                        metrics.volumes_purged.inc();
                        info!(volume, "deleted volume purged: all its columns are free");
                    }
                    Ok(Err(CommandError::UnknownVolume { .. })) => {}
                    Ok(Err(error)) => warn!(volume, %error, "purge refused"),
                    Err(error) => debug!(volume, %error, "cannot propose a purge"),
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(DELETER_INTERVAL) => {}
            () = lost.cancelled() => return,
        }
    }
}
