//! The head node's repair worker: rebuilds the columns the control plane
//! asked the primaries of this node to replace, and turns corruption the
//! read path found into such requests.
//!
//! ```text
//! every poll_interval:
//!   tasks = LCP repair tasks (local view) whose partition this node serves as primary
//!   for each task not running here and not in back-off:
//!       spawn: Partition::rebuild_column(task)            (partition/rebuild.rs)
//!              progress ─▶ RepairProgress every second     (unit status, metrics)
//!              confirm  ─▶ CompleteRepair{epoch} + sync local view, under the
//!                          partition's flush lock
//!              error    ─▶ back-off, retried from where the new column ends
//!   for each primary: take its repair queue (degraded reads); a checksum
//!       failure on a column whose sled is Up ⇒ ReplaceColumn{reason: Corruption}
//!       (an append-only column cannot be rewritten in place: rebuild it whole)
//! ```
//!
//! Bounds: the control plane admits at most `repair_max_concurrent` tasks
//! unit-wide and gives each its share of `repair_bytes_per_second`; this
//! worker additionally runs at most [`MAX_LOCAL_REBUILDS`] at once. Reading
//! the control plane's view is local (no network); only progress and
//! completion are proposed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use local_control_plane::command::Command;
use local_control_plane::state::{ExtentId, UnitState};
use local_control_plane::{LcpNode, NodeId, RepairConfig, RepairReason, RepairTask};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use proto::sled::PartitionId;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::manager::PartitionManager;
use crate::partition::{Partition, RebuildProgress, RebuildTask};
use crate::peers::{grant_of, propose, sync_local_state, ProposeError};

/// Rebuilds this node runs at once.
pub const MAX_LOCAL_REBUILDS: usize = 16;
/// Pause after a failed rebuild before trying the task again.
const RETRY_AFTER: Duration = Duration::from_secs(2);
/// Progress reports to the control plane.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// Corruption reports acted on per poll (a flood of bad reads is bounded).
const MAX_CORRUPTION_REPORTS_PER_POLL: usize = 16;

/// Rebuild metrics of this head node.
#[derive(Debug, Clone, Default)]
pub struct RebuildMetrics {
    bytes: Counter,
    rate: Gauge,
    running: Gauge,
    pending: Gauge,
    done: Counter,
    failed: Counter,
    corruption_reports: Counter,
}

impl RebuildMetrics {
    /// Registers the metrics.
    pub fn register(registry: &mut Registry) -> RebuildMetrics {
        let m = RebuildMetrics::default();
        registry.register(
            "rackblock_rebuild_bytes",
            "Bytes of columns rebuilt by this head node",
            m.bytes.clone(),
        );
        registry.register(
            "rackblock_rebuild_rate_bytes_per_second",
            "Current rebuild rate of this head node",
            m.rate.clone(),
        );
        registry.register(
            "rackblock_rebuild_tasks_running",
            "Column rebuilds running on this head node",
            m.running.clone(),
        );
        registry.register(
            "rackblock_rebuild_tasks_pending",
            "Repair tasks of this node's primaries not running yet",
            m.pending.clone(),
        );
        registry.register(
            "rackblock_rebuild_tasks_done",
            "Column rebuilds completed by this head node",
            m.done.clone(),
        );
        registry.register(
            "rackblock_rebuild_tasks_failed",
            "Column rebuild attempts that stopped with an error (retried)",
            m.failed.clone(),
        );
        registry.register(
            "rackblock_rebuild_corruption_reports",
            "Corrupt columns found by reads and sent for replacement",
            m.corruption_reports.clone(),
        );
        m
    }
}

/// One column of one extent: what a rebuild task replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct TaskKey {
    extent: u64,
    /// Position of the column in the extent's stripe order.
    column_index: u16,
}

/// Shared between the worker loop and its rebuild tasks.
#[derive(Debug, Default)]
struct Running {
    tasks: BTreeSet<TaskKey>,
    /// Failed recently: not before then.
    backoff: BTreeMap<TaskKey, Instant>,
    /// Bytes/s of each running task.
    rates: BTreeMap<TaskKey, u64>,
}

/// The repair worker of one head node.
#[derive(Debug, Clone)]
pub struct RepairWorker {
    node: LcpNode,
    manager: PartitionManager,
    this_node: NodeId,
    config: RepairConfig,
    poll_interval: Duration,
    metrics: RebuildMetrics,
    running: Arc<Mutex<Running>>,
    rebuilt_bytes: Arc<AtomicU64>,
}

fn lock(running: &Mutex<Running>) -> std::sync::MutexGuard<'_, Running> {
    running
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl RepairWorker {
    /// A worker for head node `this_node`.
    pub fn new(
        node: LcpNode,
        manager: PartitionManager,
        this_node: &str,
        config: RepairConfig,
        poll_interval: Duration,
        metrics: RebuildMetrics,
    ) -> Self {
        RepairWorker {
            node,
            manager,
            this_node: NodeId::new(this_node),
            config,
            poll_interval,
            metrics,
            running: Arc::new(Mutex::new(Running::default())),
            rebuilt_bytes: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Runs until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            self.poll(&shutdown).await;
            tokio::select! {
                () = tokio::time::sleep(self.poll_interval) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    async fn poll(&self, shutdown: &CancellationToken) {
        let state = self.node.local_state();
        let primaries: BTreeMap<PartitionId, Partition> = self
            .manager
            .primaries()
            .into_iter()
            .map(|p| (p.id(), p))
            .collect();
        let mine: Vec<&RepairTask> = state
            .repairs()
            .tasks
            .iter()
            .filter(|t| primaries.contains_key(&t.partition))
            .collect();
        let now = Instant::now();
        let mut pending = 0i64;
        for task in mine {
            let key = TaskKey {
                extent: task.extent.0,
                column_index: task.column_index,
            };
            {
                let mut running = lock(&self.running);
                running.backoff.retain(|_, until| *until > now);
                if running.tasks.contains(&key) {
                    continue;
                }
                if running.backoff.contains_key(&key) || running.tasks.len() >= MAX_LOCAL_REBUILDS {
                    pending += 1;
                    continue;
                }
                running.tasks.insert(key);
            }
            let Some(partition) = primaries.get(&task.partition).cloned() else {
                continue;
            };
            let Some(grant) = grant_of(&state, task.extent) else {
                lock(&self.running).tasks.remove(&key);
                continue;
            };
            let rebuild = RebuildTask {
                grant,
                column: task.column_index,
                new: (task.new.sled.0.clone(), task.new.column_id()),
                rate_bytes_per_second: task.rate_bytes_per_second,
            };
            let worker = self.clone();
            let task = task.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = worker.rebuild(partition, task, rebuild) => {}
                    () = stop.cancelled() => {}
                }
                lock(&worker.running).tasks.remove(&key);
            });
        }
        self.metrics.pending.set(pending);
        {
            let running = lock(&self.running);
            self.metrics
                .running
                .set(i64::try_from(running.tasks.len()).unwrap_or(i64::MAX));
            self.metrics
                .rate
                .set(i64::try_from(running.rates.values().sum::<u64>()).unwrap_or(i64::MAX));
        }
        self.report_corruption(&state, primaries.values()).await;
    }

    async fn rebuild(&self, partition: Partition, task: RepairTask, rebuild: RebuildTask) {
        let key = TaskKey {
            extent: task.extent.0,
            column_index: task.column_index,
        };
        let (progress_tx, mut progress_rx) = watch::channel(RebuildProgress::default());
        info!(extent = %task.extent, column = task.column_index, old = ?task.old, new = %task.new, reason = ?task.reason, "rebuilding a column");
        let started = Instant::now();
        let node = self.node.clone();
        let epoch = partition.epoch();
        let this_node = self.this_node.clone();
        let running = self.running.clone();
        // Progress reporter: ends when the sender is dropped.
        let reporter = tokio::spawn(async move {
            let mut reported = None;
            loop {
                let ended = tokio::time::timeout(PROGRESS_INTERVAL, progress_rx.changed())
                    .await
                    .is_ok_and(|r| r.is_err());
                let p = *progress_rx.borrow_and_update();
                let elapsed = started.elapsed().as_secs_f64().max(0.001);
                lock(&running)
                    .rates
                    .insert(key, (p.bytes_done as f64 / elapsed) as u64);
                if ended {
                    return;
                }
                if reported == Some(p) {
                    continue;
                }
                reported = Some(p);
                let command = Command::RepairProgress {
                    extent: task.extent,
                    column_index: task.column_index,
                    node: this_node.clone(),
                    epoch,
                    bytes_done: p.bytes_done,
                    bytes_total: p.bytes_total,
                    now_ms: wall_clock_ms(),
                };
                if let Err(error) = propose(&node, command).await {
                    tracing::debug!(%error, "repair progress not recorded");
                }
            }
        });
        let confirm_node = self.node.clone();
        let new = task.new.clone();
        let confirm = |epoch: u64| async move {
            let command = Command::CompleteRepair {
                extent: task.extent,
                column_index: task.column_index,
                new,
                epoch,
            };
            match propose(&confirm_node, command).await {
                Ok(_) => {}
                Err(ProposeError::Refused(error)) => return Err(error.to_string()),
                Err(error) => return Err(error.to_string()),
            }
            sync_local_state(&confirm_node)
                .await
                .map_err(|e| e.to_string())
        };
        let result = partition
            .rebuild_column(rebuild, &progress_tx, confirm)
            .await;
        drop(progress_tx);
        let _ = reporter.await;
        lock(&self.running).rates.remove(&key);
        match result {
            Ok(done) => {
                self.metrics.bytes.inc_by(done.bytes_total);
                self.rebuilt_bytes
                    .fetch_add(done.bytes_total, Ordering::Relaxed);
                self.metrics.done.inc();
                let seconds = started.elapsed().as_secs_f64();
                info!(
                    extent = %task.extent,
                    column = task.column_index,
                    bytes = done.bytes_total,
                    seconds,
                    mb_per_second = done.bytes_total as f64 / seconds.max(0.001) / 1e6,
                    "column rebuilt"
                );
            }
            Err(error) => {
                self.metrics.failed.inc();
                warn!(extent = %task.extent, column = task.column_index, %error, "column rebuild stopped; retrying later");
                lock(&self.running)
                    .backoff
                    .insert(key, Instant::now() + RETRY_AFTER);
            }
        }
    }

    /// Read-found checksum failures on columns of Up sleds become
    /// `Corruption` replacements (unreachable columns are the sled-failure
    /// path's business).
    async fn report_corruption<'a>(
        &self,
        state: &UnitState,
        primaries: impl Iterator<Item = &'a Partition>,
    ) {
        let mut wanted: BTreeSet<TaskKey> = BTreeSet::new();
        for partition in primaries {
            for item in partition.take_repair_items() {
                let corrupt = item.kind == crate::partition::ColumnFaultKind::Corrupt;
                if corrupt && wanted.len() < MAX_CORRUPTION_REPORTS_PER_POLL {
                    wanted.insert(TaskKey {
                        extent: item.extent,
                        column_index: item.column,
                    });
                }
            }
        }
        for TaskKey {
            extent,
            column_index,
        } in wanted
        {
            let extent = ExtentId(extent);
            if state.repairs().find(extent, column_index).is_some() {
                continue;
            }
            let Some(column) = state
                .extents()
                .get(&extent)
                .and_then(|e| e.columns.get(usize::from(column_index)))
                .and_then(Option::as_ref)
            else {
                continue;
            };
            let sled_up = state
                .sleds()
                .get(&column.sled)
                .is_some_and(|s| s.health == local_control_plane::Health::Up);
            if !sled_up {
                continue;
            }
            let Ok(new) = state.plan_replacement(extent, column_index) else {
                continue;
            };
            self.metrics.corruption_reports.inc();
            warn!(%extent, column_index, %column, "corrupt column: asking for a replacement");
            let command = Command::ReplaceColumn {
                extent,
                column_index,
                new,
                expected_epoch: None,
                reason: RepairReason::Corruption,
                rate_bytes_per_second: self.config.task_rate_bytes_per_second(),
                now_ms: wall_clock_ms(),
            };
            if let Err(error) = propose(&self.node, command).await {
                warn!(%error, "replacement of a corrupt column refused");
            }
        }
    }
}

fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
