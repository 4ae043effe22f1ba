//! The leader's snapshot coordinator: takes the snapshots the unit
//! decided (`CreateSnapshot`), and drops the layers of aborted and deleted
//! ones (records and their states in [`crate::state`]'s `snapshots`
//! module; the head-node side in `head-node`'s `partition::snapshot`).
//!
//! ```text
//! every tick (200 ms), while this node leads, per snapshot record:
//!   Creating (not started by this leader):
//!     every partition of every volume, in parallel, to its primary:
//!       SnapshotControl{Cut{hold}} at the partition's epoch ─▶ Cut{cut}
//!     all cut ─▶ Release on every primary (acks flow again; the time from
//!                the first Cut sent to the last Release answered is the
//!                snapshot's measured pause)
//!             ─▶ propose SnapshotCut{cuts, pause}   (refused: epoch moved)
//!     any failure, timeout or refusal ─▶ propose AbortSnapshot{reason}
//!   Aborted | Deleting:
//!     Drop on every partition's primary ─▶ all dropped ─▶ PurgeSnapshot
//! ```
//!
//! **Why release before `SnapshotCut`.** Causal consistency needs every
//! partition's cut taken before any partition's held acknowledgements go
//! (a write acknowledged after its partition's cut and before another
//! partition's cut could be the cause of a write that the other partition
//! holds); it does not need the Raft commit, so the pause does not include
//! a Raft round. A snapshot whose `SnapshotCut` is then refused (a
//! failover moved an epoch) is aborted and dropped: it was never visible.
//!
//! **Crash safety.** A held cut aborts itself on the head node after the
//! hold timeout, so a leader that dies between the cuts and the releases
//! stalls writes at most that long. A new leader finds the record still
//! `Creating`, tries to cut again, is refused by the partitions that
//! already hold that id (a second cut of an id is refused), and aborts:
//! the drops then clear every partial cut. Drops are idempotent, so every
//! step may be retried.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{join_all, BoxFuture};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use proto::volume::{
    AttachmentCredential, AttachmentToken, HostOp, HostReply, HostRequest, SnapshotAction,
};
use proto::Message;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::command::{Command, Outcome};
use crate::error::CommandError;
use crate::state::{PartitionCut, SnapshotId, SnapshotRecord, SnapshotState, UnitState};

/// Pause between two looks at the snapshot records.
pub const SNAPSHOTTER_INTERVAL: Duration = Duration::from_millis(200);
/// How long a primary holds the acknowledgements after its cut before it
/// aborts the cut itself (the bound on the pause a dead coordinator can
/// cause).
pub const CUT_HOLD: Duration = Duration::from_secs(2);
/// Longest wait for one primary's answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// How the coordinator reaches a head node: `(node id, request)` → its
/// answer, or why there is none.
pub type CallHeadNode =
    Arc<dyn Fn(String, Message) -> BoxFuture<'static, Result<Message, String>> + Send + Sync>;

/// Labels of the per-volume snapshot gauges.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SnapshotStateLabels {
    pub volume: String,
    pub state: &'static str,
}

/// Coordinator metrics on `/metrics` (the leader's; a member that does not
/// lead shows no per-volume gauges).
#[derive(Debug, Clone)]
pub struct SnapshotterMetrics {
    taken: Counter,
    aborted: Counter,
    purged: Counter,
    last_pause_us: Gauge,
    /// The pause of every snapshot taken (seconds).
    pause: Histogram,
    /// Snapshot records by volume and state.
    by_state: Family<SnapshotStateLabels, Gauge>,
}

impl Default for SnapshotterMetrics {
    fn default() -> Self {
        SnapshotterMetrics {
            taken: Counter::default(),
            aborted: Counter::default(),
            purged: Counter::default(),
            last_pause_us: Gauge::default(),
            // 0.5 ms .. ~4 s
            pause: Histogram::new(exponential_buckets(0.000_5, 2.0, 14)),
            by_state: Family::default(),
        }
    }
}

impl SnapshotterMetrics {
    pub fn register(registry: &mut Registry) -> SnapshotterMetrics {
        let m = SnapshotterMetrics::default();
        registry.register(
            "rackblock_lcp_snapshots_taken",
            "Snapshots every partition of which was cut and released",
            m.taken.clone(),
        );
        registry.register(
            "rackblock_lcp_snapshots_aborted",
            "Snapshots the coordinator aborted (a cut failed, timed out or an epoch moved)",
            m.aborted.clone(),
        );
        registry.register(
            "rackblock_lcp_snapshots_purged",
            "Aborted or deleted snapshots dropped on every primary and purged",
            m.purged.clone(),
        );
        registry.register(
            "rackblock_lcp_snapshot_last_pause_us",
            "The last snapshot's pause: first cut sent to last release answered, microseconds",
            m.last_pause_us.clone(),
        );
        registry.register(
            "rackblock_lcp_snapshot_pause_seconds",
            "Each snapshot's pause (first cut sent to last release answered)",
            m.pause.clone(),
        );
        registry.register(
            "rackblock_lcp_snapshots",
            "Snapshot records per volume and state (creating, ready, aborted, deleting), on the leader",
            m.by_state.clone(),
        );
        m
    }

    /// Sets the per-volume state gauges from `state` (`None`: this member
    /// stopped leading; the gauges go).
    pub fn observe_states(&self, state: Option<&UnitState>) {
        self.by_state.clear();
        let Some(state) = state else { return };
        for record in state.snapshots().values() {
            for volume in &record.volumes {
                self.by_state
                    .get_or_create(&SnapshotStateLabels {
                        volume: volume.to_string(),
                        state: record.state.as_str(),
                    })
                    .inc();
            }
        }
    }
}

/// One partition of a snapshot: where to send its requests.
#[derive(Debug, Clone)]
struct Target {
    volume: u64,
    index: u32,
    epoch: u64,
    primary: String,
}

fn targets(state: &UnitState, record: &SnapshotRecord) -> Result<Vec<Target>, String> {
    let mut out = Vec::new();
    for volume in &record.volumes {
        let entry = state
            .volumes()
            .get(volume)
            .ok_or_else(|| format!("volume {volume} is gone"))?;
        for part in &entry.partitions {
            out.push(Target {
                volume: part.id.volume,
                index: part.id.index,
                epoch: part.epoch,
                primary: part.primary.0.clone(),
            });
        }
    }
    Ok(out)
}

fn control(target: &Target, snapshot: SnapshotId, action: SnapshotAction) -> Message {
    Message::Host(HostRequest {
        volume: target.volume,
        partition: target.index,
        epoch: target.epoch,
        // Not an attachment's: the unit port serves this kind to head
        // nodes only and checks no attachment for it.
        credential: AttachmentCredential {
            attachment: 0,
            token: AttachmentToken([0; 16]),
        },
        op: HostOp::SnapshotControl { snapshot, action },
    })
}

async fn send(
    call: &CallHeadNode,
    target: &Target,
    snapshot: SnapshotId,
    action: SnapshotAction,
) -> Result<HostReply, String> {
    let request = control(target, snapshot, action);
    let where_ = format!(
        "partition {}/{} on {}",
        target.volume, target.index, target.primary
    );
    match tokio::time::timeout(CALL_TIMEOUT, call(target.primary.clone(), request)).await {
        Ok(Ok(Message::HostReply(HostReply::Error(error)))) => Err(format!("{where_}: {error}")),
        Ok(Ok(Message::HostReply(reply))) => Ok(reply),
        Ok(Ok(other)) => Err(format!("{where_}: unexpected answer {other:?}")),
        Ok(Err(error)) => Err(format!("{where_}: {error}")),
        Err(_) => Err(format!("{where_}: no answer within {CALL_TIMEOUT:?}")),
    }
}

/// Cuts every partition with a hold, then releases them all: the cuts and
/// the measured pause, or why the snapshot must abort.
async fn cut_all(
    call: &CallHeadNode,
    snapshot: SnapshotId,
    targets: &[Target],
) -> Result<(Vec<PartitionCut>, Duration), String> {
    let hold_ms = u32::try_from(CUT_HOLD.as_millis()).unwrap_or(u32::MAX);
    let started = Instant::now();
    let answers = join_all(
        targets
            .iter()
            .map(|t| send(call, t, snapshot, SnapshotAction::Cut { hold_ms })),
    )
    .await;
    let mut cuts = Vec::with_capacity(targets.len());
    let mut failure = None;
    for (target, answer) in targets.iter().zip(answers) {
        match answer {
            Ok(HostReply::Cut { cut }) => cuts.push(PartitionCut {
                partition: crate::state::PartitionId {
                    volume: target.volume,
                    index: target.index,
                },
                epoch: target.epoch,
                cut,
            }),
            Ok(other) => failure = Some(format!("unexpected answer to a cut: {other:?}")),
            Err(reason) => failure = Some(reason),
        }
    }
    // Release whatever was cut, failed or not (a failed snapshot is then
    // dropped; held acknowledgements must not wait for its timeout).
    let released = join_all(
        targets
            .iter()
            .map(|t| send(call, t, snapshot, SnapshotAction::Release)),
    )
    .await;
    let pause = started.elapsed();
    if let Some(reason) = failure {
        return Err(reason);
    }
    for answer in released {
        // A release that did not arrive: the cut aborts itself after its
        // hold, so the snapshot cannot be trusted to exist.
        answer.map_err(|reason| format!("release: {reason}"))?;
    }
    Ok((cuts, pause))
}

/// Drops the snapshot on every partition's primary.
async fn drop_all(
    call: &CallHeadNode,
    snapshot: SnapshotId,
    targets: &[Target],
) -> Result<(), String> {
    let answers = join_all(
        targets
            .iter()
            .map(|t| send(call, t, snapshot, SnapshotAction::Drop)),
    )
    .await;
    answers.into_iter().try_for_each(|a| a.map(drop))
}

/// Takes one `Creating` snapshot to `Ready` or `Aborted`.
async fn take<P, F>(
    call: &CallHeadNode,
    propose: &P,
    metrics: &SnapshotterMetrics,
    state: &UnitState,
    record: &SnapshotRecord,
) where
    P: Fn(Command) -> F,
    F: Future<Output = Result<Result<Outcome, CommandError>, String>>,
{
    let id = record.id;
    let result = match targets(state, record) {
        Ok(targets) => cut_all(call, id, &targets).await,
        Err(reason) => Err(reason),
    };
    let reason = match result {
        Ok((cuts, pause)) => {
            let pause_us = u64::try_from(pause.as_micros()).unwrap_or(u64::MAX);
            match propose(Command::SnapshotCut {
                snapshot: id,
                cuts,
                pause_us: Some(pause_us),
            })
            .await
            {
                Ok(Ok(_)) => {
                    metrics.taken.inc();
                    metrics
                        .last_pause_us
                        .set(i64::try_from(pause_us).unwrap_or(i64::MAX));
                    metrics.pause.observe(pause.as_secs_f64());
                    info!(snapshot = id, name = %record.name, pause_us, "snapshot ready");
                    return;
                }
                Ok(Err(error)) => format!("cuts refused: {error}"),
                // Not committed: the record stays Creating; the next
                // attempt (this leader or the next) is refused by the
                // partitions that hold the id and aborts.
                Err(error) => {
                    debug!(snapshot = id, %error, "cannot propose the cuts");
                    return;
                }
            }
        }
        Err(reason) => reason,
    };
    warn!(snapshot = id, name = %record.name, %reason, "snapshot aborted");
    match propose(Command::AbortSnapshot {
        snapshot: id,
        reason,
    })
    .await
    {
        Ok(Ok(_)) => {
            metrics.aborted.inc();
        }
        Ok(Err(error)) => warn!(snapshot = id, %error, "abort refused"),
        Err(error) => debug!(snapshot = id, %error, "cannot propose an abort"),
    }
}

/// Drops an aborted or deleted snapshot everywhere, then purges it.
async fn purge<P, F>(
    call: &CallHeadNode,
    propose: &P,
    metrics: &SnapshotterMetrics,
    state: &UnitState,
    record: &SnapshotRecord,
) where
    P: Fn(Command) -> F,
    F: Future<Output = Result<Result<Outcome, CommandError>, String>>,
{
    let id = record.id;
    let dropped = match targets(state, record) {
        Ok(targets) => drop_all(call, id, &targets).await,
        Err(reason) => Err(reason),
    };
    if let Err(reason) = dropped {
        debug!(snapshot = id, %reason, "snapshot not dropped everywhere yet");
        return;
    }
    match propose(Command::PurgeSnapshot { snapshot: id }).await {
        Ok(Ok(_)) => {
            metrics.purged.inc();
            info!(snapshot = id, name = %record.name, "snapshot dropped and purged");
        }
        Ok(Err(error)) => warn!(snapshot = id, %error, "purge refused"),
        Err(error) => debug!(snapshot = id, %error, "cannot propose a purge"),
    }
}

/// One pass over the records: every `Creating` one not yet attempted by
/// this coordinator is taken (or aborted), every `Aborted` or `Deleting`
/// one dropped and purged. `attempted` is this leader's memory.
pub async fn tick<P, F>(
    state: &UnitState,
    call: &CallHeadNode,
    propose: &P,
    metrics: &SnapshotterMetrics,
    attempted: &Mutex<BTreeSet<SnapshotId>>,
) where
    P: Fn(Command) -> F,
    F: Future<Output = Result<Result<Outcome, CommandError>, String>>,
{
    for record in state.snapshots().values() {
        match record.state {
            SnapshotState::Creating => {
                let first = attempted
                    .lock()
                    .map(|mut set| set.insert(record.id))
                    .unwrap_or(false);
                if first {
                    take(call, propose, metrics, state, record).await;
                } else {
                    // Attempted and still Creating: its SnapshotCut or
                    // abort was not committed. Abort it (a retried cut is
                    // refused where the id exists).
                    let reason = "coordinator did not finish it".to_string();
                    if let Ok(Ok(_)) = propose(Command::AbortSnapshot {
                        snapshot: record.id,
                        reason,
                    })
                    .await
                    {
                        metrics.aborted.inc();
                    }
                }
            }
            SnapshotState::Aborted | SnapshotState::Deleting => {
                purge(call, propose, metrics, state, record).await;
            }
            SnapshotState::Ready => {}
        }
    }
    // Forget the purged ones (the set stays as small as the records).
    if let Ok(mut set) = attempted.lock() {
        set.retain(|id| state.snapshots().contains_key(id));
    }
}

/// Runs the coordinator until `lost` (leadership lost) is cancelled.
pub async fn run<P, F>(
    state: impl Fn() -> UnitState,
    propose: P,
    call: CallHeadNode,
    metrics: SnapshotterMetrics,
    lost: CancellationToken,
) where
    P: Fn(Command) -> F,
    F: Future<Output = Result<Result<Outcome, CommandError>, String>>,
{
    let attempted = Mutex::new(BTreeSet::new());
    loop {
        let snapshot = state();
        metrics.observe_states(Some(&snapshot));
        if !snapshot.snapshots().is_empty() {
            tokio::select! {
                () = tick(&snapshot, &call, &propose, &metrics, &attempted) => {}
                () = lost.cancelled() => {
                    metrics.observe_states(None);
                    return;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(SNAPSHOTTER_INTERVAL) => {}
            () = lost.cancelled() => {
                metrics.observe_states(None);
                return;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::state::tests::{ok, unit, volume};
    use std::collections::HashMap;

    /// Head nodes as the coordinator sees them: per (partition, snapshot)
    /// the cut taken, whether held, and a switch to fail cuts.
    #[derive(Default)]
    struct Fake {
        cuts: HashMap<(u64, u32, u64), (u64, bool)>,
        fail_cut_of: Option<(u64, u32)>,
        next: u64,
        log: Vec<String>,
    }

    fn fake_call(fake: Arc<Mutex<Fake>>) -> CallHeadNode {
        Arc::new(move |_node, message| {
            let fake = fake.clone();
            Box::pin(async move {
                let Message::Host(request) = message else {
                    return Err("not a host message".into());
                };
                let HostOp::SnapshotControl { snapshot, action } = request.op else {
                    return Err("not a snapshot control".into());
                };
                let mut f = fake.lock().unwrap();
                let key = (request.volume, request.partition, snapshot);
                f.log.push(format!("{action:?} {key:?}"));
                let reply = match action {
                    SnapshotAction::Cut { hold_ms } => {
                        if f.fail_cut_of == Some((request.volume, request.partition)) {
                            HostReply::Error(proto::volume::HostError::Unavailable {
                                reason: "log full".into(),
                            })
                        } else if f.cuts.contains_key(&key) {
                            HostReply::Error(proto::volume::HostError::BadRequest {
                                reason: "exists".into(),
                            })
                        } else {
                            f.next += 1;
                            let cut = f.next;
                            f.cuts.insert(key, (cut, hold_ms > 0));
                            HostReply::Cut { cut }
                        }
                    }
                    SnapshotAction::Release => {
                        if let Some(entry) = f.cuts.get_mut(&key) {
                            entry.1 = false;
                        }
                        HostReply::Done
                    }
                    SnapshotAction::Drop => {
                        f.cuts.remove(&key);
                        HostReply::Done
                    }
                };
                Ok(Message::HostReply(reply))
            })
        })
    }

    /// Applies commands to a local state (the Raft log of one member).
    fn proposer(
        state: Arc<Mutex<UnitState>>,
    ) -> impl Fn(Command) -> BoxFuture<'static, Result<Result<Outcome, CommandError>, String>> {
        move |command| {
            let state = state.clone();
            Box::pin(async move { Ok(state.lock().unwrap().apply(command)) })
        }
    }

    async fn pass(
        state: &Arc<Mutex<UnitState>>,
        fake: &Arc<Mutex<Fake>>,
        attempted: &Mutex<BTreeSet<SnapshotId>>,
    ) {
        let view = state.lock().unwrap().clone();
        tick(
            &view,
            &fake_call(fake.clone()),
            &proposer(state.clone()),
            &SnapshotterMetrics::default(),
            attempted,
        )
        .await;
    }

    fn create(state: &Arc<Mutex<UnitState>>, name: &str, volumes: Vec<u64>) -> SnapshotId {
        match ok(
            &mut state.lock().unwrap(),
            Command::CreateSnapshot {
                name: name.into(),
                volumes,
                now_ms: 1,
            },
        ) {
            Outcome::SnapshotCreated { snapshot } => snapshot,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_snapshot_is_cut_everywhere_released_then_ready_and_deleted() {
        let state = Arc::new(Mutex::new(unit()));
        ok(&mut state.lock().unwrap(), volume(2, 2, 4, 2));
        let fake = Arc::new(Mutex::new(Fake::default()));
        let attempted = Mutex::new(BTreeSet::new());
        let id = create(&state, "group", vec![1, 2]);
        pass(&state, &fake, &attempted).await;
        let record = state.lock().unwrap().snapshots()[&id].clone();
        assert_eq!(record.state, SnapshotState::Ready, "{record:?}");
        let partitions: usize = {
            let s = state.lock().unwrap();
            [1u64, 2]
                .iter()
                .map(|v| s.volumes()[v].partitions.len())
                .sum()
        };
        assert_eq!(record.cuts.len(), partitions);
        assert!(record.pause_us.is_some());
        {
            let f = fake.lock().unwrap();
            assert_eq!(f.cuts.len(), partitions);
            // Every cut was held, and every hold released before Ready.
            assert!(f.cuts.values().all(|(_, held)| !held));
            let last_cut = f.log.iter().rposition(|l| l.starts_with("Cut")).unwrap();
            let first_release = f.log.iter().position(|l| l.starts_with("Release")).unwrap();
            assert!(last_cut < first_release, "{:?}", f.log);
        }
        ok(
            &mut state.lock().unwrap(),
            Command::DeleteSnapshot { snapshot: id },
        );
        pass(&state, &fake, &attempted).await;
        assert!(state.lock().unwrap().snapshots().is_empty());
        assert!(fake.lock().unwrap().cuts.is_empty());
    }

    /// The metrics: the states per volume of a consistency group's
    /// snapshot as it goes creating → ready, the pause observed once, and
    /// no gauges on a member that stopped leading.
    #[tokio::test]
    async fn metrics_count_states_per_volume_and_observe_the_pause() {
        let mut registry = Registry::default();
        let metrics = SnapshotterMetrics::register(&mut registry);
        let text = |registry: &Registry| {
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
            out
        };
        let state = Arc::new(Mutex::new(unit()));
        ok(&mut state.lock().unwrap(), volume(2, 2, 4, 2));
        let fake = Arc::new(Mutex::new(Fake::default()));
        let attempted = Mutex::new(BTreeSet::new());
        create(&state, "group", vec![1, 2]);
        metrics.observe_states(Some(&state.lock().unwrap()));
        let before = text(&registry);
        for volume in ["1", "2"] {
            let line =
                format!("rackblock_lcp_snapshots{{volume=\"{volume}\",state=\"creating\"}} 1");
            assert!(before.contains(&line), "{line} in {before}");
        }
        assert!(
            before.contains("rackblock_lcp_snapshot_pause_seconds_count 0"),
            "{before}"
        );
        let view = state.lock().unwrap().clone();
        tick(
            &view,
            &fake_call(fake.clone()),
            &proposer(state.clone()),
            &metrics,
            &attempted,
        )
        .await;
        metrics.observe_states(Some(&state.lock().unwrap()));
        let after = text(&registry);
        assert!(
            after.contains("rackblock_lcp_snapshots{volume=\"1\",state=\"ready\"} 1"),
            "{after}"
        );
        assert!(!after.contains("state=\"creating\""), "{after}");
        assert!(
            after.contains("rackblock_lcp_snapshot_pause_seconds_count 1"),
            "{after}"
        );
        metrics.observe_states(None);
        assert!(!text(&registry).contains("rackblock_lcp_snapshots{"));
    }

    #[tokio::test]
    async fn a_failed_cut_aborts_releases_and_drops_every_partial_cut() {
        let state = Arc::new(Mutex::new(unit()));
        let fake = Arc::new(Mutex::new(Fake::default()));
        let first = state.lock().unwrap().volumes()[&1].partitions[0].id;
        fake.lock().unwrap().fail_cut_of = Some((first.volume, first.index));
        let attempted = Mutex::new(BTreeSet::new());
        let id = create(&state, "s", vec![1]);
        pass(&state, &fake, &attempted).await;
        let record = state.lock().unwrap().snapshots()[&id].clone();
        assert_eq!(record.state, SnapshotState::Aborted);
        assert!(record.reason.unwrap().contains("log full"));
        // Partial cuts were released at once (not left to their timeout).
        assert!(fake.lock().unwrap().cuts.values().all(|(_, held)| !held));
        assert!(!fake.lock().unwrap().cuts.is_empty());
        pass(&state, &fake, &attempted).await;
        assert!(state.lock().unwrap().snapshots().is_empty());
        assert!(fake.lock().unwrap().cuts.is_empty());
    }

    /// A consistency group whose cut fails on one member's partition:
    /// the whole group aborts, every partition of both volumes is
    /// released at once, and the drops clear the other member's cuts too
    /// (nothing of the group stays visible or pinned).
    #[tokio::test]
    async fn a_failed_cut_on_one_member_aborts_and_drops_the_whole_group() {
        let state = Arc::new(Mutex::new(unit()));
        ok(&mut state.lock().unwrap(), volume(2, 2, 4, 2));
        let fake = Arc::new(Mutex::new(Fake::default()));
        let last = *state.lock().unwrap().volumes()[&2]
            .partitions
            .last()
            .map(|p| &p.id)
            .unwrap();
        fake.lock().unwrap().fail_cut_of = Some((last.volume, last.index));
        let attempted = Mutex::new(BTreeSet::new());
        let id = create(&state, "g", vec![1, 2]);
        pass(&state, &fake, &attempted).await;
        let record = state.lock().unwrap().snapshots()[&id].clone();
        assert_eq!(record.state, SnapshotState::Aborted, "{record:?}");
        assert!(record.cuts.is_empty());
        for v in [1, 2] {
            assert!(state.lock().unwrap().snapshot_named(v, "g").is_none());
        }
        {
            let f = fake.lock().unwrap();
            // Volume 1's partitions were cut, and released with the rest.
            assert!(f.cuts.keys().any(|(v, _, _)| *v == 1), "{:?}", f.log);
            assert!(f.cuts.values().all(|(_, held)| !held));
        }
        pass(&state, &fake, &attempted).await;
        assert!(state.lock().unwrap().snapshots().is_empty());
        assert!(fake.lock().unwrap().cuts.is_empty());
        // The name is free again on both volumes: a retry is taken.
        fake.lock().unwrap().fail_cut_of = None;
        let again = create(&state, "g", vec![1, 2]);
        pass(&state, &fake, &attempted).await;
        assert_eq!(
            state.lock().unwrap().snapshots()[&again].state,
            SnapshotState::Ready
        );
    }

    #[tokio::test]
    async fn a_cut_refused_for_a_moved_epoch_aborts() {
        let state = Arc::new(Mutex::new(unit()));
        let fake = Arc::new(Mutex::new(Fake::default()));
        let id = create(&state, "s", vec![1]);
        // The cuts are taken at the epochs of this view; a failover
        // commits before the coordinator proposes them.
        let view = state.lock().unwrap().clone();
        let part = view.volumes()[&1].partitions[0].clone();
        ok(
            &mut state.lock().unwrap(),
            Command::ChangePrimary {
                partition: part.id,
                new_primary: part.secondary.clone(),
                new_secondary: Some(part.primary.clone()),
                expected_epoch: part.epoch,
                now_ms: u64::MAX / 2,
            },
        );
        let attempted = Mutex::new(BTreeSet::new());
        tick(
            &view,
            &fake_call(fake.clone()),
            &proposer(state.clone()),
            &SnapshotterMetrics::default(),
            &attempted,
        )
        .await;
        assert_eq!(
            state.lock().unwrap().snapshots()[&id].state,
            SnapshotState::Aborted
        );
    }
}
