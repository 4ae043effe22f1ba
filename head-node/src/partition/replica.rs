//! Replication: the primary's replicator task and the secondary's handler,
//! both drivers of the partition's [`PartitionCore`](super::core).
//!
//! The replicator sends what the core hands out
//! ([`PartitionCore::next_append`](super::core::PartitionCore::next_append):
//! unconfirmed records in sequence order, at most
//! [`BATCH_RECORDS`](super::core::BATCH_RECORDS) per request; flush commits
//! alone), and retries until the secondary confirms: a slow or stopped
//! secondary stalls acknowledgements instead of weakening them. Every
//! answer goes back to the core, which completes the writes durable on
//! both logs. On `Gap` it follows the core's catch-up plan: a `FlushCommit`
//! that moves the secondary's expected sequence to the queue's front (a
//! *jump*), over records flushed and released here, or over records this
//! log still holds, which are then flushed instead of shipped (below).
//! `StaleEpoch` fences the primary.
//!
//! **A new secondary is caught up at once.** A primary instance (opened,
//! or taken over in place because its secondary was replaced) does not
//! know what its secondary holds: one named at this epoch starts empty,
//! while this log may hold thousands of unflushed acknowledged records. It
//! asks (`Status`) before anything else and runs the catch-up from the
//! answer, retrying until the secondary answers — not only when a host
//! write meets a `Gap`, which may not come before this node dies.
//!
//! **The tail is flushed instead of shipped.** Shipping the whole
//! unflushed tail before writes are acknowledged again made the host's
//! failover pause grow with the log (35k records: 2.9 s; a half-full log:
//! 9–12 s; bench/README.md). Instead, a secondary that expects a sequence
//! below the queue's front F is sent the jump to F - 1 at once
//! ([`CatchUp::Owe`]): new writes go to it as appends and are confirmed
//! at once. The core records `owed_through = F - 1` and a flush starts at
//! once (the background flush also treats an owed flush as due first).
//! The pair is **in sync**
//! ([`PartitionCore::secondary_in_sync`](super::core::PartitionCore::secondary_in_sync),
//! which the manager reports to the control plane: only then may the
//! secondary be promoted) once the secondary is at the front *and* has
//! confirmed a flush commit with a watermark of at least `owed_through`.
//!
//! **What that costs in durability, and why it is kept safe.** New writes
//! acknowledged during the owed window are in both logs. The owed tail
//! was acknowledged earlier, when the *old* secondary (now dead or
//! replaced) held it: until the flush commits, it is in this node's log
//! only. That window is the same one the old design had (the tail was in
//! one log until shipped), now ended by a flush instead of a transfer; it
//! is safe for the same reason: a secondary that is not in sync is never
//! promoted, so a crash of this node in the window makes the partition
//! wait for this node's log (the old rule), and a crash of the secondary
//! loses nothing this log does not hold. The flush of the owed tail is
//! started immediately and goes before the fill and age triggers.
//!
//! The secondary handles one request at a time (the core's replica slot),
//! accepts records in sequence order only (duplicates are skipped, holes
//! refused with `Gap`), logs them durably before answering, keeps its own
//! index and releases its log on `FlushCommit`.

use std::sync::{Arc, Weak};

use futures::StreamExt as _;
use proto::volume::{ReplicaError, ReplicaRecord, ReplicaReply, ReplicaRequest};

use super::core::{CatchUp, ReplicaAppend};
use super::{bump, flush, PeerError, Role, Shared};
use crate::wal::WalError;

/// `Append` requests the replicator keeps in flight: with more than one,
/// the next batch leaves while the secondary is still logging the previous
/// one. Measured on the 2-vCPU bench machine (`bench/nbd.sh`, QD32 4 KiB
/// writes), 4 in flight gave ~11K IOPS against ~14K with 1: the secondary
/// logs one `Append` per partition at a time anyway, requests handled out
/// of order wait for their predecessors, and the smaller batches cost CPU
/// that this machine does not have. Kept at 1 until the secondary can log
/// several in parallel (see ARCHITECTURE.md).
pub const APPENDS_IN_FLIGHT: usize = 1;
/// How long a secondary holds an `Append` that arrived before its
/// predecessor before answering `Gap`.
const PREDECESSOR_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

enum Step {
    Idle,
    Progress,
    Retry,
    Stop,
}

type InFlight = futures::stream::FuturesUnordered<
    futures::future::BoxFuture<'static, Result<ReplicaReply, Option<PeerError>>>,
>;

/// The primary's replicator; ends when the partition is dropped or stops
/// being primary.
///
/// Up to [`APPENDS_IN_FLIGHT`] `Append`s are outstanding, each with the
/// records after the previous one's (the secondary logs them in sequence
/// order, waiting briefly for a predecessor that arrives late). A flush
/// commit is sent only when no `Append` is outstanding. Any failure drops
/// what is outstanding (the secondary skips the duplicates a resend
/// brings) and resumes from the last confirmed sequence.
pub(super) async fn run_replicator(weak: Weak<Shared>) {
    let mut in_flight = InFlight::new();
    loop {
        let Some(shared) = weak.upgrade() else { return };
        let wakeup = shared.repl_wakeup.clone();
        let retry = shared.config.replica_retry_interval;
        let (has_commit, at_front) = {
            let state = shared.lock();
            (
                !state.core.pending_commits.is_empty(),
                state.core.secondary_at_front(),
            )
        };
        let step = if in_flight.is_empty() && has_commit {
            replicate_commit(&shared).await
        } else if in_flight.is_empty() && !at_front {
            probe_secondary(&shared).await
        } else {
            match fill(&shared, &mut in_flight) {
                Err(step) => step,
                Ok(()) if in_flight.is_empty() => Step::Idle,
                Ok(()) => {
                    drop(shared);
                    // A new record or commit wakes us to send more; a reply
                    // is handled as it comes.
                    let reply = tokio::select! {
                        reply = in_flight.next() => reply,
                        () = wakeup.notified() => continue,
                    };
                    let Some(shared) = weak.upgrade() else { return };
                    match reply {
                        None => Step::Progress,
                        Some(reply) => {
                            if !matches!(reply, Ok(ReplicaReply::Appended { .. })) {
                                // Resume from what the secondary confirmed
                                // once this answer is dealt with.
                                in_flight = InFlight::new();
                                shared.lock().core.replication_failed();
                            }
                            on_reply(&shared, reply, false).await
                        }
                    }
                }
            }
        };
        match step {
            Step::Stop => return,
            Step::Progress => {}
            Step::Retry => {
                in_flight = InFlight::new();
                if let Some(shared) = weak.upgrade() {
                    shared.lock().core.replication_failed();
                }
                tokio::time::sleep(retry).await
            }
            Step::Idle => {
                // Re-check periodically so a dropped partition ends the task.
                let _ =
                    tokio::time::timeout(std::time::Duration::from_millis(200), wakeup.notified())
                        .await;
            }
        }
    }
}

fn send_timeout(shared: &Shared) -> std::time::Duration {
    shared
        .config
        .replica_timeout
        .min(std::time::Duration::from_secs(1))
}

/// Sends the core's next `Append`s until [`APPENDS_IN_FLIGHT`] are
/// outstanding or nothing is left. `Err`: stop.
fn fill(shared: &Shared, in_flight: &mut InFlight) -> Result<(), Step> {
    let Some(peer) = shared.replica.clone() else {
        return Err(Step::Stop);
    };
    let timeout = send_timeout(shared);
    while in_flight.len() < APPENDS_IN_FLIGHT {
        let request = {
            let mut state = shared.lock();
            if !matches!(state.core.role, Role::Primary) || state.core.stopped() {
                return Err(Step::Stop);
            }
            match state.core.next_append() {
                Some(request) => request,
                // Nothing new, or a flush commit goes first, alone.
                None => return Ok(()),
            }
        };
        let send = peer.send(request);
        in_flight.push(Box::pin(async move {
            match tokio::time::timeout(timeout, send).await {
                Ok(Ok(reply)) => Ok(reply),
                Ok(Err(error)) => Err(Some(error)),
                Err(_) => Err(None),
            }
        }));
    }
    Ok(())
}

/// Sends the oldest unconfirmed flush commit and waits for the answer.
async fn replicate_commit(shared: &Arc<Shared>) -> Step {
    let Some(peer) = shared.replica.clone() else {
        return Step::Stop;
    };
    let request = {
        let state = shared.lock();
        if !matches!(state.core.role, Role::Primary) || state.core.stopped() {
            return Step::Stop;
        }
        match state.core.next_commit() {
            Some(commit) => commit,
            None => return Step::Progress,
        }
    };
    let reply = match tokio::time::timeout(send_timeout(shared), peer.send(request)).await {
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(error)) => Err(Some(error)),
        Err(_) => Err(None),
    };
    on_reply(shared, reply, true).await
}

/// Asks the secondary which sequence it expects and catches it up from
/// there (see the module docs): run until the core holds it at the queue's
/// front.
async fn probe_secondary(shared: &Arc<Shared>) -> Step {
    let Some(peer) = shared.replica.clone() else {
        return Step::Stop;
    };
    {
        let state = shared.lock();
        if !matches!(state.core.role, Role::Primary) || state.core.stopped() {
            return Step::Stop;
        }
    }
    let request = ReplicaRequest::Status {
        partition: shared.id(),
    };
    let reply = tokio::time::timeout(send_timeout(shared), peer.send(request)).await;
    match reply {
        Ok(Ok(ReplicaReply::Status {
            highest_sequence, ..
        })) => {
            let expected = highest_sequence.saturating_add(1);
            if shared.lock().core.note_secondary_expects(expected) {
                let owed = kick_owed_flush(shared);
                tracing::info!(partition = ?shared.id(), expected, owed, "secondary at the queue's front");
                return Step::Progress;
            }
            tracing::info!(partition = ?shared.id(), expected, "catching the secondary up");
            bump(&shared.metrics.replica_gaps);
            catch_up(shared, expected).await
        }
        Ok(Ok(other)) => {
            tracing::debug!(partition = ?shared.id(), ?other, "secondary status refused; retrying");
            bump(&shared.metrics.replica_retries);
            Step::Retry
        }
        Ok(Err(error)) => {
            tracing::debug!(partition = ?shared.id(), %error, "secondary status failed; retrying");
            bump(&shared.metrics.replica_retries);
            Step::Retry
        }
        Err(_) => {
            bump(&shared.metrics.replica_retries);
            Step::Retry
        }
    }
}

/// Applies one answer of the secondary (or the failure to get one).
async fn on_reply(
    shared: &Arc<Shared>,
    reply: Result<ReplicaReply, Option<PeerError>>,
    is_commit: bool,
) -> Step {
    let reply = match reply {
        Ok(reply) => reply,
        Err(error) => {
            if let Some(error) = error {
                tracing::debug!(partition = ?shared.id(), %error, "replication send failed");
            }
            bump(&shared.metrics.replica_retries);
            return Step::Retry;
        }
    };
    match reply {
        ReplicaReply::Committed if is_commit => {
            shared.lock().core.on_committed();
            Step::Progress
        }
        ReplicaReply::Appended { up_to_sequence } => {
            let resolved = shared.lock().core.on_appended(up_to_sequence);
            shared.deliver(resolved);
            Step::Progress
        }
        ReplicaReply::Error(ReplicaError::Gap { expected_sequence }) => {
            bump(&shared.metrics.replica_gaps);
            catch_up(shared, expected_sequence).await
        }
        ReplicaReply::Error(ReplicaError::StaleEpoch { current }) => {
            shared.fence(current);
            Step::Stop
        }
        ReplicaReply::Error(ReplicaError::LogFull) => {
            // The secondary frees its log on our flush commits.
            let flusher = shared.clone();
            tokio::spawn(async move { flush::flush_now(&flusher).await });
            bump(&shared.metrics.replica_retries);
            Step::Retry
        }
        other => {
            tracing::debug!(partition = ?shared.id(), ?other, "replication refused; retrying");
            bump(&shared.metrics.replica_retries);
            Step::Retry
        }
    }
}

/// Starts a flush now if the secondary is owed one (the jump of a
/// catch-up, or an instance opened from its log); returns what is owed
/// (0: nothing).
fn kick_owed_flush(shared: &Arc<Shared>) -> u64 {
    let (owes, owed) = {
        let state = shared.lock();
        (state.core.owes_flush(), state.core.owed_through())
    };
    if owes {
        super::kick_flush(shared);
    }
    owed
}

/// What one catch-up request did.
enum Round {
    /// The secondary now expects this sequence.
    Next(u64),
    /// The secondary is at the queue's front: the normal path goes on.
    Caught,
    /// Stop catching up with this step.
    Done(Step),
}

/// Most catch-up requests in one go (each moves the secondary forward).
const CATCH_UP_ROUNDS: usize = 4096;

/// The secondary expects `expected`: move it to the queue's front with
/// jumps (over records flushed and released here, or over records this log
/// holds, which it is then owed a flush of), request after request (no
/// failed `Append` and no idle wait between them), until it reaches the
/// queue's front, a request fails, or `replica_timeout` passed.
async fn catch_up(shared: &Arc<Shared>, mut expected: u64) -> Step {
    let deadline = tokio::time::Instant::now() + shared.config.replica_timeout;
    for round in 0..CATCH_UP_ROUNDS {
        let outcome = catch_up_round(shared, expected).await;
        let late = tokio::time::Instant::now() >= deadline;
        match outcome {
            Round::Next(next) if next > expected && !late => expected = next,
            Round::Next(_) => return Step::Progress,
            Round::Caught if round > 0 => {
                tracing::info!(partition = ?shared.id(), rounds = round, "secondary at the queue's front after the catch-up");
                return Step::Progress;
            }
            Round::Caught => return Step::Retry,
            Round::Done(step) => return step,
        }
    }
    Step::Progress
}

/// One catch-up request (see [`catch_up`]), as the core plans it.
async fn catch_up_round(shared: &Arc<Shared>, expected: u64) -> Round {
    let plan = shared.lock().core.catch_up_plan(expected);
    let Some(peer) = shared.replica.clone() else {
        return Round::Done(Step::Stop);
    };
    let (request, jumped_to, owed) = match plan {
        CatchUp::Caught => {
            shared.lock().core.note_secondary_expects(expected);
            return Round::Caught;
        }
        CatchUp::Lost => {
            tracing::warn!(partition = ?shared.id(), expected, "secondary misses records this log no longer has; needs re-mirror");
            return Round::Done(Step::Retry);
        }
        CatchUp::Skip { up_to } => (shared.lock().core.jump_request(up_to), up_to, false),
        CatchUp::Owe { up_to } => {
            let request = shared.lock().core.jump_owed(up_to);
            tracing::info!(partition = ?shared.id(), expected, owed_through = up_to, "secondary jumped over the unflushed tail; flushing it");
            (request, up_to, true)
        }
    };
    // The owed tail is in this log only until a flush commits it: the
    // flush starts now, not when the jump is answered.
    if owed {
        kick_owed_flush(shared);
    }
    match tokio::time::timeout(shared.config.replica_timeout, peer.send(request)).await {
        Ok(Ok(ReplicaReply::Appended { up_to_sequence })) => Round::Next(up_to_sequence + 1),
        Ok(Ok(ReplicaReply::Committed)) => Round::Next(jumped_to + 1),
        Ok(Ok(ReplicaReply::Error(ReplicaError::StaleEpoch { current }))) => {
            shared.fence(current);
            Round::Done(Step::Stop)
        }
        _ => Round::Done(Step::Retry),
    }
}

/// The core's replica slot, taken by [`enter`]; left on drop (and the
/// requests waiting for it woken).
pub(super) struct ReplicaSlot<'a> {
    shared: &'a Shared,
}

impl Drop for ReplicaSlot<'_> {
    fn drop(&mut self) {
        self.shared.lock().core.replica_leave();
        self.shared.replica_advanced.notify_waiters();
    }
}

/// Takes the core's replica slot (one replication request at a time). An
/// `Append` whose first record is past the next expected sequence (`first`)
/// waits, until `deadline`, for its predecessors.
pub(super) async fn enter<'a>(
    shared: &'a Shared,
    first: Option<u64>,
    deadline: Option<tokio::time::Instant>,
) -> ReplicaSlot<'a> {
    loop {
        let advanced = shared.replica_advanced.notified();
        tokio::pin!(advanced);
        advanced.as_mut().enable();
        let late = deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
        if shared.lock().core.replica_try_enter(first, late) {
            return ReplicaSlot { shared };
        }
        match deadline {
            Some(deadline) => {
                let _ = tokio::time::timeout_at(deadline, advanced).await;
            }
            None => advanced.await,
        }
    }
}

/// The secondary's side of one replication request.
pub(super) async fn handle(shared: &Arc<Shared>, request: ReplicaRequest) -> ReplicaReply {
    if request.partition() != shared.id() {
        return ReplicaReply::Error(ReplicaError::NotSecondary);
    }
    // Appends may arrive out of order (the primary keeps several in
    // flight): one that starts past the next expected sequence waits,
    // briefly, for its predecessors.
    let first = match &request {
        ReplicaRequest::Append { records, .. } => records.first().map(|r| r.sequence),
        _ => None,
    };
    let deadline = tokio::time::Instant::now() + PREDECESSOR_WAIT;
    let _slot = enter(shared, first, Some(deadline)).await;
    match request {
        ReplicaRequest::Status { .. } => {
            let state = shared.lock();
            ReplicaReply::Status {
                highest_epoch: state.core.epoch,
                highest_sequence: state.core.next_sequence - 1,
            }
        }
        ReplicaRequest::Append { epoch, records, .. } => match append(shared, epoch, records).await
        {
            Ok(up_to_sequence) => ReplicaReply::Appended { up_to_sequence },
            Err(error) => ReplicaReply::Error(error),
        },
        ReplicaRequest::FlushCommit {
            epoch,
            up_to_sequence,
            mappings,
            ..
        } => match apply_commit(shared, epoch, up_to_sequence, mappings).await {
            Ok(()) => ReplicaReply::Committed,
            Err(error) => ReplicaReply::Error(error),
        },
    }
}

/// Logs an `Append` as the core plans it (the caller holds the slot).
async fn append(
    shared: &Arc<Shared>,
    epoch: u64,
    records: Vec<ReplicaRecord>,
) -> Result<u64, ReplicaError> {
    let plan = {
        let mut state = shared.lock();
        let head = shared.log.wal().head();
        state.core.replica_begin_append(epoch, records, head)?
    };
    let (records, hold) = match plan {
        ReplicaAppend::Nothing { up_to_sequence } => return Ok(up_to_sequence),
        ReplicaAppend::Log { records, hold } => (records, hold),
    };
    let appended = shared
        .log
        .wal()
        .append(records.clone())
        .await
        .map_err(|error| match error {
            WalError::LogFull { .. } => ReplicaError::LogFull,
            error => ReplicaError::Io {
                reason: error.to_string(),
            },
        });
    shared
        .lock()
        .core
        .replica_appended(&records, hold, appended)
}

/// Applies a flush commit as the core decides, logs it, releases the log.
async fn apply_commit(
    shared: &Arc<Shared>,
    epoch: u64,
    up_to_sequence: u64,
    mappings: Vec<proto::volume::FlushedRange>,
) -> Result<(), ReplicaError> {
    let record = shared
        .lock()
        .core
        .replica_commit(epoch, up_to_sequence, &mappings)?;
    match shared.log.wal().append_one(record).await {
        Ok(_) => {}
        Err(WalError::LogFull { .. }) => {}
        Err(error) => {
            return Err(ReplicaError::Io {
                reason: error.to_string(),
            })
        }
    }
    if let Err(error) = shared.log.release().await {
        tracing::warn!(partition = ?shared.id(), %error, "secondary log release failed");
    }
    // New rows on the sleds: the index of the flushed data catches up in
    // the background (a jump flushed nothing).
    if !super::core::is_jump(&mappings) {
        super::kick_shadow(shared);
    }
    Ok(())
}
