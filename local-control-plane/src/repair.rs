//! Column repair controller, run by the Raft leader only (next to the
//! failure detector and the failover controller).
//!
//! ```text
//! every poll_interval, from the replicated UnitState (plan, pure):
//!   sled Down for sled_failed_after (by this leader's clock)   ⇒ SetSledHealth Failed
//!   task whose reserved column's sled/device is no longer Up   ⇒ CancelRepair (re-planned)
//!   columns scrub found corrupt (sleds' ScrubReport, polled every
//!   scrub_poll_interval), then columns on Failed sleds, Failed devices or
//!   Draining sleds, without a task, while tasks < max_concurrent ⇒ ReplaceColumn{new: plan_replacement}
//!                                                                 rate = bytes_per_second / max_concurrent
//! the partition's primary (head-node `repair` worker) then rebuilds the
//! column and commits CompleteRepair; the next tick admits more work.
//!   Failed sled answering on both networks, no column in use or reserved ⇒ SetSledHealth Up
//!   retired columns on reachable sleds ⇒ FreeColumn on the sled, then ReclaimColumns
//! ```
//!
//! Invariants and limits:
//! * **Bounded storm.** At most `max_concurrent` tasks exist unit-wide, and
//!   each task carries `bytes_per_second / max_concurrent` as its rate, so
//!   the unit never rebuilds faster than `bytes_per_second` in total
//!   (a large failure must not start a re-mirroring storm; ARCHITECTURE.md,
//!   Repair).
//! * **Never two columns of an extent on one sled** (ARCHITECTURE.md
//!   invariant 3): the state machine refuses a replacement on a sled the
//!   extent (or another of its replacements) already uses; placement never
//!   proposes one.
//! * **A Down sled is not repaired at once**: it may come back with its
//!   data; only after `sled_failed_after` is it declared Failed. Time spent
//!   Down is measured by the current leader (a new leader starts counting
//!   again: a later repair, never an early one).
//! * **Idempotent across leader changes**: decisions are functions of the
//!   replicated state; a repeated `ReplaceColumn` is refused as
//!   `AlreadyExists`.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::command::{Command, Outcome};
use crate::error::CommandError;
use crate::state::RepairReason;
use crate::state::{ColumnRef, ExtentId, Health, PartitionId, SledId, UnitState};

/// Default concurrent repair tasks per unit.
pub const DEFAULT_REPAIR_MAX_CONCURRENT: usize = 4;
/// Default repair bandwidth per unit (bytes/s).
pub const DEFAULT_REPAIR_BYTES_PER_SECOND: u64 = 200 << 20;
/// Default time a sled stays Down before it is declared Failed.
pub const DEFAULT_SLED_FAILED_AFTER_MS: u64 = 60_000;
/// Default pause between two plans.
pub const DEFAULT_REPAIR_POLL_INTERVAL_MS: u64 = 500;
/// Default pause between two polls of the sleds' scrub reports.
pub const DEFAULT_SCRUB_POLL_INTERVAL_MS: u64 = 10_000;
/// Bound on corrupt columns remembered between polls.
const MAX_CORRUPT_COLUMNS: usize = 4096;
/// Bound on proposals per tick.
const MAX_COMMANDS_PER_TICK: usize = 64;
/// Bound on retired columns freed on the sleds per tick.
const MAX_RECLAIM_PER_TICK: usize = 64;

/// Tunables of the repair controller (per unit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepairConfig {
    /// Repair tasks allowed at once across the unit.
    pub max_concurrent: usize,
    /// Total rebuild bandwidth of the unit, shared by the tasks.
    pub bytes_per_second: u64,
    /// Down this long ⇒ declared Failed and its columns replaced.
    pub sled_failed_after: Duration,
    pub poll_interval: Duration,
    /// How often the sleds' scrub reports are read for corrupt columns.
    pub scrub_poll_interval: Duration,
}

impl Default for RepairConfig {
    fn default() -> Self {
        RepairConfig {
            max_concurrent: DEFAULT_REPAIR_MAX_CONCURRENT,
            bytes_per_second: DEFAULT_REPAIR_BYTES_PER_SECOND,
            sled_failed_after: Duration::from_millis(DEFAULT_SLED_FAILED_AFTER_MS),
            poll_interval: Duration::from_millis(DEFAULT_REPAIR_POLL_INTERVAL_MS),
            scrub_poll_interval: Duration::from_millis(DEFAULT_SCRUB_POLL_INTERVAL_MS),
        }
    }
}

impl RepairConfig {
    /// One task's share of the unit's bandwidth.
    pub fn task_rate_bytes_per_second(&self) -> u64 {
        let share = self.bytes_per_second / self.max_concurrent.max(1) as u64;
        share.max(1)
    }
}

/// Repair gauges on `/metrics` (the leader's view).
#[derive(Debug, Clone, Default)]
pub struct RepairMetrics {
    pending: Gauge,
    running: Gauge,
    waiting: Gauge,
    blocked: Family<BlockLabels, Gauge>,
    degraded_extents: Gauge,
    owed_columns: Gauge,
    bytes_remaining: Gauge,
    rate: Gauge,
    scheduled: Counter,
    declared_failed: Counter,
    returned: Counter,
    reclaimed: Counter,
}

impl RepairMetrics {
    pub fn register(registry: &mut Registry) -> RepairMetrics {
        let m = RepairMetrics::default();
        registry.register(
            "rackblock_repair_tasks_pending",
            "Column repair tasks waiting for their primary (leader's view)",
            m.pending.clone(),
        );
        registry.register(
            "rackblock_repair_tasks_running",
            "Column repair tasks rebuilding (leader's view)",
            m.running.clone(),
        );
        registry.register(
            "rackblock_repair_columns_waiting",
            "Columns on failed or draining sleds without a repair task yet",
            m.waiting.clone(),
        );
        registry.register(
            "rackblock_repair_columns_blocked",
            "Columns needing repair that no sled can take now, by reason \
             (no_other_sled: every usable sled holds a column of the extent; \
             no_free_column: no free column on a healthy device)",
            m.blocked.clone(),
        );
        registry.register(
            "rackblock_repair_degraded_extents",
            "Extents allocated on fewer than k+m sleds, with owed columns",
            m.degraded_extents.clone(),
        );
        registry.register(
            "rackblock_repair_owed_columns",
            "Owed columns of degraded extents (repair writes them when a sled can take them)",
            m.owed_columns.clone(),
        );
        registry.register(
            "rackblock_repair_bytes_remaining",
            "Bytes still to rebuild in known repair tasks",
            m.bytes_remaining.clone(),
        );
        registry.register(
            "rackblock_repair_rate_bytes_per_second",
            "Measured rebuild rate of the running tasks",
            m.rate.clone(),
        );
        registry.register(
            "rackblock_repair_tasks_scheduled",
            "Replacement columns reserved by this leader",
            m.scheduled.clone(),
        );
        registry.register(
            "rackblock_repair_sleds_declared_failed",
            "Sleds this leader declared Failed after being Down too long",
            m.declared_failed.clone(),
        );
        registry.register(
            "rackblock_repair_sleds_returned",
            "Failed sleds this leader returned to service (empty and reachable again)",
            m.returned.clone(),
        );
        registry.register(
            "rackblock_repair_columns_reclaimed",
            "Retired columns this leader freed on their sleds and returned to the free pool",
            m.reclaimed.clone(),
        );
        m
    }

    fn observe(&self, state: &UnitState) {
        let status = state.repair_status();
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.pending.set(as_i64(status.pending as u64));
        self.running.set(as_i64(status.running as u64));
        self.waiting.set(as_i64(status.columns_waiting as u64));
        for reason in ["no_other_sled", "no_free_column"] {
            let columns: usize = status
                .blocked
                .iter()
                .filter(|b| b.block.label() == reason)
                .map(|b| b.columns)
                .sum();
            self.blocked
                .get_or_create(&BlockLabels { reason })
                .set(as_i64(columns as u64));
        }
        let (degraded, owed) = state
            .extents()
            .values()
            .map(|e| e.owed().count())
            .filter(|owed| *owed > 0)
            .fold((0u64, 0u64), |(d, o), owed| (d + 1, o + owed as u64));
        self.degraded_extents.set(as_i64(degraded));
        self.owed_columns.set(as_i64(owed));
        self.bytes_remaining.set(as_i64(status.bytes_remaining));
        self.rate.set(as_i64(status.rate_bytes_per_second));
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BlockLabels {
    reason: &'static str,
}

/// Sleds this leader has seen Down, and since when.
pub type DownSince = BTreeMap<SledId, Instant>;

/// The extent and column index using `column`, if any.
fn user_of(state: &UnitState, column: &ColumnRef) -> Option<(ExtentId, u16)> {
    let extent = *state
        .sleds()
        .get(&column.sled)?
        .devices
        .get(&column.device)?
        .used_columns
        .get(&column.index)?;
    let index = state
        .extents()
        .get(&extent)?
        .columns
        .iter()
        .position(|c| c.as_ref() == Some(column))?;
    Some((extent, u16::try_from(index).ok()?))
}

/// What to propose now (pure: state, clock readings, the Down times and
/// the columns scrub found corrupt).
pub fn plan(
    state: &UnitState,
    config: &RepairConfig,
    now: Instant,
    now_ms: u64,
    down_since: &mut DownSince,
    corrupt: &BTreeSet<ColumnRef>,
) -> Vec<Command> {
    let mut commands = Vec::new();
    // 1. Down long enough ⇒ Failed.
    down_since.retain(|sled, _| {
        state
            .sleds()
            .get(sled)
            .is_some_and(|s| s.health == Health::Down)
    });
    for sled in state.sleds().values() {
        if sled.health != Health::Down {
            continue;
        }
        let since = *down_since.entry(sled.id.clone()).or_insert(now);
        if now.duration_since(since) >= config.sled_failed_after {
            commands.push(Command::SetSledHealth {
                sled: sled.id.clone(),
                health: Health::Failed,
            });
        }
    }
    // 2. Replacements that can no longer be written.
    let book = state.repairs();
    let mut active = book.tasks.len();
    for task in &book.tasks {
        let usable = state.sleds().get(&task.new.sled).is_some_and(|s| {
            s.health == Health::Up
                && s.devices
                    .get(&task.new.device)
                    .is_some_and(|d| d.health == Health::Up)
        });
        if !usable {
            commands.push(Command::CancelRepair {
                extent: task.extent,
                column_index: task.column_index,
            });
            active = active.saturating_sub(1);
        }
    }
    // 3. Admit new work up to the concurrency limit. Placement is planned
    // against the current state; two replacements of one extent in the same
    // tick could pick one sled, so one per extent per tick.
    let mut planned_extents = std::collections::BTreeSet::new();
    let mut taken = std::collections::BTreeSet::new();
    let corrupt_columns = corrupt
        .iter()
        .filter_map(|c| user_of(state, c))
        .filter(|(extent, index)| state.repairs().find(*extent, *index).is_none())
        .map(|(extent, index)| (extent, index, RepairReason::Corruption));
    let lost_columns = state.columns_needing_repair();
    for (extent, column_index, reason) in corrupt_columns.chain(lost_columns) {
        if active >= config.max_concurrent.max(1) || commands.len() >= MAX_COMMANDS_PER_TICK {
            break;
        }
        if !planned_extents.insert(extent) {
            continue;
        }
        let Ok(new) = state.plan_replacement_avoiding(extent, column_index, &taken) else {
            continue; // no space now; counted as waiting in the status
        };
        taken.insert(new.clone());
        commands.push(Command::ReplaceColumn {
            extent,
            column_index,
            new,
            expected_epoch: None,
            reason,
            rate_bytes_per_second: config.task_rate_bytes_per_second(),
            now_ms,
        });
        active += 1;
    }
    // 4. Failed sleds whose every column was rebuilt elsewhere and that
    // answer again on both networks return to service.
    for sled in state.failed_sleds_ready_to_return() {
        commands.push(Command::SetSledHealth {
            sled,
            health: Health::Up,
        });
    }
    commands.truncate(MAX_COMMANDS_PER_TICK);
    commands
}

/// The leader's repair loop.
#[derive(Debug)]
pub struct RepairController {
    config: RepairConfig,
    metrics: RepairMetrics,
    down_since: DownSince,
    /// Columns the sleds' scrubbers reported bad and still in use.
    corrupt: BTreeSet<ColumnRef>,
}

impl RepairController {
    pub fn new(config: RepairConfig, metrics: RepairMetrics) -> Self {
        RepairController {
            config,
            metrics,
            down_since: DownSince::new(),
            corrupt: BTreeSet::new(),
        }
    }

    /// Plans and proposes until `stop` (leadership lost) or a proposal
    /// cannot be committed (probably no longer leader). `scrub(state)`
    /// returns the columns the sleds' scrub reports list as bad.
    /// `free(columns)` frees retired columns on their sleds and returns
    /// the ones now free there.
    pub async fn run<R, P, F, S, G, X, H>(
        mut self,
        read: R,
        propose: P,
        scrub: S,
        free: X,
        stop: CancellationToken,
    ) where
        R: Fn() -> UnitState,
        P: Fn(Command) -> F,
        F: Future<Output = Result<Result<Outcome, CommandError>, String>>,
        S: Fn(UnitState) -> G,
        G: Future<Output = Vec<ColumnRef>>,
        X: Fn(Vec<ColumnRef>) -> H,
        H: Future<Output = Vec<ColumnRef>>,
    {
        let mut last_scrub: Option<Instant> = None;
        'ticks: loop {
            let state = read();
            self.metrics.observe(&state);
            if last_scrub.is_none_or(|t| t.elapsed() >= self.config.scrub_poll_interval) {
                last_scrub = Some(Instant::now());
                for column in scrub(state.clone()).await {
                    if self.corrupt.len() < MAX_CORRUPT_COLUMNS {
                        self.corrupt.insert(column);
                    }
                }
            }
            // Replaced (retired) columns are forgotten.
            self.corrupt.retain(|c| user_of(&state, c).is_some());
            let commands = plan(
                &state,
                &self.config,
                Instant::now(),
                wall_clock_ms(),
                &mut self.down_since,
                &self.corrupt,
            );
            for command in commands {
                info!(?command, "repair: proposing");
                let scheduled = matches!(command, Command::ReplaceColumn { .. });
                let failed = matches!(
                    command,
                    Command::SetSledHealth {
                        health: Health::Failed,
                        ..
                    }
                );
                let returned = matches!(
                    command,
                    Command::SetSledHealth {
                        health: Health::Up,
                        ..
                    }
                );
                match propose(command).await {
                    Ok(Ok(_)) => {
                        if scheduled {
                            self.metrics.scheduled.inc();
                        }
                        if failed {
                            self.metrics.declared_failed.inc();
                        }
                        if returned {
                            self.metrics.returned.inc();
                        }
                    }
                    Ok(Err(error)) => warn!(%error, "repair command refused"),
                    Err(error) => {
                        warn!(%error, "repair controller cannot commit");
                        break 'ticks;
                    }
                }
            }
            // 5. Retired columns: free them on the sled, then in the state.
            let retired = read().reclaimable_columns(MAX_RECLAIM_PER_TICK);
            if !retired.is_empty() {
                let freed = free(retired).await;
                if !freed.is_empty() {
                    let count = freed.len() as u64;
                    match propose(Command::ReclaimColumns { columns: freed }).await {
                        Ok(Ok(_)) => {
                            info!(count, "repair: retired columns reclaimed");
                            self.metrics.reclaimed.inc_by(count);
                        }
                        Ok(Err(error)) => warn!(%error, "ReclaimColumns refused"),
                        Err(error) => {
                            warn!(%error, "repair controller cannot commit");
                            break 'ticks;
                        }
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(self.config.poll_interval) => {}
                () = stop.cancelled() => break,
            }
        }
    }
}

fn wall_clock_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Columns in use that the sleds' scrub reports list as bad (one
/// `ScrubReport` per Up sled; unreachable sleds are skipped).
pub async fn scrub_reports(
    links: &crate::network::PeerLinks,
    rack: &hardware::rack::Rack,
    state: &UnitState,
) -> Vec<ColumnRef> {
    use proto::sled::{SledRequest, SledResponse};
    use proto::Message;
    let mut out = Vec::new();
    for sled in state.sleds().values().filter(|s| s.health == Health::Up) {
        let Some(spec) = rack.sled(&sled.id.0) else {
            continue;
        };
        let link = links.link(&sled.id.0, spec.address_a, spec.address_b);
        let reply = link
            .call(Message::Sled(SledRequest::ScrubReport), true)
            .await;
        let Ok(Message::SledReply(SledResponse::ScrubReport(report))) = reply else {
            continue;
        };
        for bad in report.bad_blocks {
            let column = ColumnRef {
                sled: sled.id.clone(),
                device: bad.column.device,
                index: bad.column.index,
            };
            if user_of(state, &column).is_some() && !out.contains(&column) {
                warn!(%column, offset = bad.offset_bytes, "scrub found a bad block; column to be rebuilt");
                out.push(column);
            }
            if out.len() >= MAX_CORRUPT_COLUMNS {
                return out;
            }
        }
    }
    out
}

/// Frees retired columns on their sleds (`FreeColumn` as the owner and at
/// the epoch the sled reports: the column is in no extent any more, so no
/// partition needs it) and returns those the sleds now hold free.
/// Unreachable sleds and refusals (a stale primary claimed it meanwhile,
/// say) are skipped; the next pass tries again.
pub async fn free_retired_columns(
    links: &crate::network::PeerLinks,
    rack: &hardware::rack::Rack,
    columns: Vec<ColumnRef>,
) -> Vec<ColumnRef> {
    use proto::sled::{ColumnId, ColumnState, SledRequest, SledResponse};
    use proto::Message;
    let mut freed = Vec::new();
    for column in columns {
        let Some(spec) = rack.sled(&column.sled.0) else {
            continue;
        };
        let link = links.link(&column.sled.0, spec.address_a, spec.address_b);
        let id = ColumnId {
            device: column.device,
            index: column.index,
        };
        let status = match link
            .call(
                Message::Sled(SledRequest::ColumnStatus { column: id }),
                true,
            )
            .await
        {
            Ok(Message::SledReply(SledResponse::ColumnStatus(status))) => status,
            other => {
                warn!(%column, ?other, "reclaim: column status unavailable");
                continue;
            }
        };
        if status.state != ColumnState::Free {
            let partition = status.partition.unwrap_or(PartitionId {
                volume: 0,
                index: 0,
            });
            let request = SledRequest::FreeColumn {
                column: id,
                partition,
                epoch: status.epoch,
            };
            match link.call(Message::Sled(request), true).await {
                Ok(Message::SledReply(SledResponse::Freed)) => {}
                other => {
                    warn!(%column, ?other, "reclaim: sled did not free the column");
                    continue;
                }
            }
        }
        freed.push(column);
    }
    freed
}
