//! Replication: the primary's replicator task and the secondary's handler.
//!
//! The replicator sends the primary's queue of unconfirmed records in
//! sequence order (at most [`BATCH_RECORDS`] per request), one request at a
//! time, and retries until the secondary confirms: a slow or stopped
//! secondary stalls acknowledgements instead of weakening them. On `Gap` it
//! resends from its own log; records it no longer has (flushed and
//! released) are covered by a `FlushCommit` that moves the secondary's
//! expected sequence past them. `StaleEpoch` fences the primary.
//!
//! The secondary accepts records in sequence order only (duplicates are
//! skipped, holes refused with `Gap`), logs them durably before answering,
//! keeps its own index and releases its log on `FlushCommit`.

use std::sync::{Arc, Weak};

use futures::StreamExt as _;
use proto::volume::{ReplicaError, ReplicaRecord, ReplicaRecordKind, ReplicaReply, ReplicaRequest};

use super::{bump, flush, PeerError, PendingTrim, Role, Shared, LOG_READS_IN_FLIGHT};
use crate::wal::{LogRecord, RecordKind, WalError};

/// Most records per `Append`.
pub const BATCH_RECORDS: usize = 128;
/// Most payload bytes per `Append`.
const BATCH_BYTES: usize = 8 << 20;
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
    // Highest sequence handed to an outstanding `Append`.
    let mut sent_through = 0;
    loop {
        let Some(shared) = weak.upgrade() else { return };
        let wakeup = shared.repl_wakeup.clone();
        let retry = shared.config.replica_retry_interval;
        let acked = shared.progress.borrow().acked_through;
        sent_through = sent_through.max(acked);
        let step = if in_flight.is_empty() && !shared.lock().pending_commits.is_empty() {
            replicate_once(&shared).await
        } else {
            match fill(&shared, &mut in_flight, &mut sent_through) {
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
                            let appended = matches!(reply, Ok(ReplicaReply::Appended { .. }));
                            if !appended {
                                // Resume from what the secondary confirmed
                                // once this answer is dealt with.
                                in_flight = InFlight::new();
                            }
                            let step = on_reply(&shared, reply, false).await;
                            if !appended {
                                sent_through = shared.progress.borrow().acked_through;
                            }
                            step
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
                sent_through = 0;
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

/// Sends `Append`s of the records after `sent_through` until
/// [`APPENDS_IN_FLIGHT`] are outstanding or nothing is left. `Err`: stop.
fn fill(shared: &Shared, in_flight: &mut InFlight, sent_through: &mut u64) -> Result<(), Step> {
    let Some(peer) = shared.replica.clone() else {
        return Err(Step::Stop);
    };
    let timeout = send_timeout(shared);
    while in_flight.len() < APPENDS_IN_FLIGHT {
        let request = {
            let state = shared.lock();
            if !matches!(state.role, Role::Primary) || shared.progress.borrow().stopped {
                return Err(Step::Stop);
            }
            if !state.pending_commits.is_empty() {
                // Sent alone, once the outstanding appends are answered.
                return Ok(());
            }
            let mut bytes = 0;
            let records: Vec<ReplicaRecord> = state
                .repl_queue
                .iter()
                .skip_while(|r| r.sequence <= *sent_through)
                .enumerate()
                .take_while(|(i, r)| {
                    bytes += r.data.len();
                    *i == 0 || bytes <= BATCH_BYTES
                })
                .take(BATCH_RECORDS)
                .map(|(_, r)| r.clone())
                .collect();
            let Some(last) = records.last() else {
                return Ok(());
            };
            *sent_through = last.sequence;
            ReplicaRequest::Append {
                partition: shared.id(),
                epoch: state.epoch,
                records,
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

/// Sends the oldest unconfirmed flush commit (or, with none, one batch of
/// records) and waits for the answer.
async fn replicate_once(shared: &Arc<Shared>) -> Step {
    let Some(peer) = shared.replica.clone() else {
        return Step::Stop;
    };
    let (request, is_commit) = {
        let state = shared.lock();
        if !matches!(state.role, Role::Primary) || shared.progress.borrow().stopped {
            return Step::Stop;
        }
        if let Some(commit) = state.pending_commits.front() {
            (commit.clone(), true)
        } else if state.repl_queue.is_empty() {
            return Step::Idle;
        } else {
            let mut bytes = 0;
            let records: Vec<ReplicaRecord> = state
                .repl_queue
                .iter()
                .take_while(|r| {
                    bytes += r.data.len();
                    bytes <= BATCH_BYTES
                })
                .take(BATCH_RECORDS)
                .cloned()
                .collect();
            let records = if records.is_empty() {
                state.repl_queue.iter().take(1).cloned().collect()
            } else {
                records
            };
            (
                ReplicaRequest::Append {
                    partition: shared.id(),
                    epoch: state.epoch,
                    records,
                },
                false,
            )
        }
    };
    let reply = match tokio::time::timeout(send_timeout(shared), peer.send(request)).await {
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(error)) => Err(Some(error)),
        Err(_) => Err(None),
    };
    on_reply(shared, reply, is_commit).await
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
            shared.lock().pending_commits.pop_front();
            Step::Progress
        }
        ReplicaReply::Appended { up_to_sequence } => {
            {
                let mut state = shared.lock();
                while state
                    .repl_queue
                    .front()
                    .is_some_and(|r| r.sequence <= up_to_sequence)
                {
                    state.repl_queue.pop_front();
                }
            }
            shared.progress.send_modify(|p| {
                p.acked_through = p.acked_through.max(up_to_sequence);
            });
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

/// What one catch-up request did.
enum Round {
    /// The secondary now expects this sequence.
    Next(u64),
    /// Nothing sent (a released record was forgotten): look again.
    Again,
    /// The secondary is at the queue's front: the normal path goes on.
    Caught,
    /// Stop catching up with this step.
    Done(Step),
}

/// Most catch-up requests in one go (each moves the secondary forward).
const CATCH_UP_ROUNDS: usize = 4096;

/// The secondary expects `expected`: resend what it misses from the log, or
/// move it past records flushed and released here, request after request
/// (no failed `Append` and no idle wait between them), until it reaches the
/// queue's front, a request fails, or `replica_timeout` passed.
async fn catch_up(shared: &Arc<Shared>, mut expected: u64) -> Step {
    let deadline = tokio::time::Instant::now() + shared.config.replica_timeout;
    for round in 0..CATCH_UP_ROUNDS {
        let outcome = catch_up_round(shared, expected).await;
        let late = tokio::time::Instant::now() >= deadline;
        match outcome {
            Round::Next(next) if next > expected && !late => expected = next,
            Round::Again if !late => {}
            Round::Next(_) | Round::Again => return Step::Progress,
            Round::Caught if round > 0 => return Step::Progress,
            Round::Caught => return Step::Retry,
            Round::Done(step) => return step,
        }
    }
    Step::Progress
}

/// One catch-up request (see [`catch_up`]).
async fn catch_up_round(shared: &Arc<Shared>, expected: u64) -> Round {
    let (front, released_through, epoch, wanted) = {
        let state = shared.lock();
        let front = state
            .repl_queue
            .front()
            .map_or(state.next_sequence, |r| r.sequence);
        // Sequences from `expected` up to the next one this log still has
        // (and at most the applied watermark) are flushed, superseded or
        // abandoned writes: a flush commit moves the secondary past them.
        // This covers a released prefix and the holes a take-over leaves
        // (it replays only the records still needed).
        let next_retained = state
            .retained
            .range(expected..)
            .next()
            .map_or(front, |(s, _)| *s);
        let released_through = next_retained
            .min(state.applied_through + 1)
            .saturating_sub(1);
        let wanted: Vec<_> = state
            .retained
            .range(expected..front)
            .take(super::replica::BATCH_RECORDS)
            .map(|(s, p)| (*s, *p))
            .collect();
        (front, released_through, state.epoch, wanted)
    };
    let Some(peer) = shared.replica.clone() else {
        return Round::Done(Step::Stop);
    };
    if expected >= front {
        return Round::Caught;
    }
    let request = if expected <= released_through {
        ReplicaRequest::FlushCommit {
            partition: shared.id(),
            epoch,
            up_to_sequence: released_through,
            mappings: Vec::new(),
        }
    } else {
        let contiguous: Vec<(u64, crate::wal::LogPosition)> = (expected..)
            .zip(wanted)
            .take_while(|(next, (sequence, _))| sequence == next)
            .map(|(_, entry)| entry)
            .collect();
        let wal = shared.log.wal();
        let mut reads =
            futures::stream::iter(contiguous)
                .map(|(sequence, position)| async move {
                    (sequence, position, wal.read(position).await)
                })
                .buffered(LOG_READS_IN_FLIGHT);
        let mut records = Vec::new();
        while let Some((sequence, position, read)) = reads.next().await {
            match read {
                Ok(record) => records.push(to_replica(shared, &record)),
                // Send what precedes it; the next round deals with it.
                Err(WalError::NotFound { .. }) if !records.is_empty() => break,
                Err(WalError::NotFound { .. }) => {
                    // Released behind our back: nothing the index, a trim
                    // or an unconfirmed append needs (those hold the log),
                    // so flushed or superseded. Forget it; the next round
                    // moves the secondary past it with a flush commit
                    // instead of retrying a record that will never return.
                    let mut state = shared.lock();
                    if state.retained.get(&sequence) == Some(&position) {
                        state.retained.remove(&sequence);
                    }
                    tracing::info!(partition = ?shared.id(), sequence, "catch-up record already released; skipping it");
                    return Round::Again;
                }
                Err(error) => {
                    tracing::warn!(partition = ?shared.id(), sequence, %error, "catch-up record unreadable");
                    return Round::Done(Step::Retry);
                }
            }
        }
        if records.is_empty() {
            tracing::warn!(partition = ?shared.id(), expected, "secondary misses records this log no longer has; needs re-mirror");
            return Round::Done(Step::Retry);
        }
        ReplicaRequest::Append {
            partition: shared.id(),
            epoch,
            records,
        }
    };
    match tokio::time::timeout(shared.config.replica_timeout, peer.send(request)).await {
        Ok(Ok(ReplicaReply::Appended { up_to_sequence })) => Round::Next(up_to_sequence + 1),
        Ok(Ok(ReplicaReply::Committed)) => Round::Next(released_through + 1),
        Ok(Ok(ReplicaReply::Error(ReplicaError::StaleEpoch { current }))) => {
            shared.fence(current);
            Round::Done(Step::Stop)
        }
        _ => Round::Done(Step::Retry),
    }
}

fn to_replica(shared: &Shared, record: &LogRecord) -> ReplicaRecord {
    let write = record.kind == RecordKind::Write;
    ReplicaRecord {
        sequence: record.sequence,
        kind: if write {
            ReplicaRecordKind::Write
        } else {
            ReplicaRecordKind::Unmap
        },
        lba: shared.config.first_block + record.lba,
        blocks: record.block_count,
        crcs: if write {
            crate::wal::format::block_crcs(&record.payload)
        } else {
            Vec::new()
        },
        data: if write {
            record.payload.clone()
        } else {
            bytes::Bytes::new()
        },
    }
}

/// The secondary's side of one replication request.
pub(super) async fn handle(shared: &Arc<Shared>, request: ReplicaRequest) -> ReplicaReply {
    if request.partition() != shared.id() {
        return ReplicaReply::Error(ReplicaError::NotSecondary);
    }
    // Appends may arrive out of order (the primary keeps several in
    // flight): one that starts past the next expected sequence waits,
    // briefly and without the lock, for its predecessors.
    let first = match &request {
        ReplicaRequest::Append { records, .. } => records.first().map(|r| r.sequence),
        _ => None,
    };
    let deadline = tokio::time::Instant::now() + PREDECESSOR_WAIT;
    let _serial = loop {
        let advanced = shared.replica_advanced.notified();
        let serial = shared.replica_lock.lock().await;
        let ready = first.is_none_or(|first| first <= shared.lock().next_sequence);
        if ready || tokio::time::Instant::now() >= deadline {
            break serial;
        }
        drop(serial);
        let _ = tokio::time::timeout_at(deadline, advanced).await;
    };
    match request {
        ReplicaRequest::Status { .. } => {
            let state = shared.lock();
            ReplicaReply::Status {
                highest_epoch: state.epoch,
                highest_sequence: state.next_sequence - 1,
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

/// Epoch check shared by every mutating request: refuse lower, adopt higher.
fn check_epoch(shared: &Shared, epoch: u64) -> Result<(), ReplicaError> {
    let mut state = shared.lock();
    if !matches!(state.role, Role::Secondary) {
        return Err(ReplicaError::NotSecondary);
    }
    if epoch < state.epoch {
        return Err(ReplicaError::StaleEpoch {
            current: state.epoch,
        });
    }
    state.epoch = epoch;
    Ok(())
}

async fn append(
    shared: &Arc<Shared>,
    epoch: u64,
    records: Vec<ReplicaRecord>,
) -> Result<u64, ReplicaError> {
    check_epoch(shared, epoch)?;
    let bad = |reason: String| ReplicaError::BadRequest { reason };
    let (expected, hold) = {
        let state = shared.lock();
        (state.next_sequence, shared.log.wal().head())
    };
    let mut log_records = Vec::new();
    let mut next = expected;
    for record in records.into_iter().filter(|r| r.sequence >= expected) {
        if record.sequence != next {
            return Err(ReplicaError::Gap {
                expected_sequence: next,
            });
        }
        let lba = record
            .lba
            .checked_sub(shared.config.first_block)
            .filter(|lba| lba + u64::from(record.blocks) <= shared.config.size_blocks)
            .ok_or_else(|| bad(format!("record {} outside the partition", record.sequence)))?;
        let log = match record.kind {
            ReplicaRecordKind::Write => LogRecord::write_with_crcs(
                shared.id(),
                epoch,
                record.sequence,
                lba,
                record.data,
                &record.crcs,
            )
            .map_err(|e| bad(e.to_string()))?,
            ReplicaRecordKind::Unmap => {
                LogRecord::trim(shared.id(), epoch, record.sequence, lba, record.blocks)
            }
        };
        if log.kind == RecordKind::Write && u64::from(log.block_count) != u64::from(record.blocks) {
            return Err(bad(format!("record {} block count", record.sequence)));
        }
        log_records.push(log);
        next += 1;
    }
    if log_records.is_empty() {
        return Ok(expected - 1);
    }
    shared.lock().add_hold(hold);
    let appended = shared.log.wal().append(log_records.clone()).await;
    let mut state = shared.lock();
    state.remove_hold(hold);
    let positions = match appended {
        Ok(positions) => positions,
        Err(WalError::LogFull { .. }) => return Err(ReplicaError::LogFull),
        Err(error) => {
            return Err(ReplicaError::Io {
                reason: error.to_string(),
            })
        }
    };
    for (record, position) in log_records.iter().zip(positions) {
        state.retained.insert(record.sequence, position);
        let count = u64::from(record.block_count);
        let applied = if record.kind == RecordKind::Write {
            super::index_logged_write(&mut state.index, record, position)
        } else {
            let trim = PendingTrim::of(record, position);
            state.pending_trims.insert(record.sequence, trim);
            state.index.apply_unmap(record.lba, count, record.sequence)
        };
        if let Err(error) = applied {
            return Err(ReplicaError::Io {
                reason: error.to_string(),
            });
        }
    }
    state.next_sequence = next;
    state.applied_through = next - 1;
    drop(state);
    shared.replica_advanced.notify_waiters();
    Ok(next - 1)
}

async fn apply_commit(
    shared: &Arc<Shared>,
    epoch: u64,
    up_to_sequence: u64,
    mappings: Vec<proto::volume::FlushedRange>,
) -> Result<(), ReplicaError> {
    check_epoch(shared, epoch)?;
    let payload = flush::encode_commit(up_to_sequence, &mappings);
    {
        let mut state = shared.lock();
        for m in &mappings {
            // Advisory on a secondary (GC moves are not replicated): it only
            // tells which log records the sleds now hold.
            let _ = super::map_flushed(&mut state.index, shared.config.first_block, m);
        }
        state
            .pending_trims
            .retain(|sequence, _| *sequence > up_to_sequence);
        state
            .retained
            .retain(|sequence, _| *sequence > up_to_sequence);
        if up_to_sequence >= state.next_sequence {
            state.next_sequence = up_to_sequence + 1;
            state.applied_through = up_to_sequence;
        }
    }
    shared.replica_advanced.notify_waiters();
    let record = LogRecord {
        kind: RecordKind::FlushCommit,
        partition: shared.id(),
        epoch,
        sequence: up_to_sequence,
        lba: 0,
        block_count: 0,
        payload: payload.into(),
    };
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
    Ok(())
}
