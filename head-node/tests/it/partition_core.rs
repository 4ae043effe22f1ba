//! `PartitionCore` event by event: the ack rule, the range table, fencing,
//! log holds, the secondary's ordering and the catch-up jump.

use std::time::Instant;

use bytes::Bytes;
use head_node::index::Location;
use head_node::partition::core::{
    Admission, CatchUp, Change, Completion, PartitionCore, ReplicaAppend,
};
use head_node::partition::{PartitionError, Role};
use head_node::wal::{LogPosition, RecoveredRecord};
use proto::sled::PartitionId;
use proto::volume::{FlushedRange, ReplicaError, ReplicaRecord, ReplicaRecordKind, ReplicaRequest};

const PART: PartitionId = PartitionId {
    volume: 3,
    index: 1,
};
const FIRST: u64 = 100;

fn primary() -> PartitionCore {
    PartitionCore::new(PART, FIRST, 64, Role::Primary, 5)
}

fn secondary() -> PartitionCore {
    PartitionCore::new(PART, FIRST, 64, Role::Secondary, 5)
}

fn write(lba: u64, blocks: u64, fill: u8) -> Change {
    Change::Write {
        lba,
        data: Bytes::from(vec![fill; 4096 * blocks as usize]),
    }
}

fn ok_ids(completions: &[Completion]) -> Vec<u64> {
    completions
        .iter()
        .filter(|c| c.result.is_ok())
        .map(|c| c.write.0)
        .collect()
}

/// Admits and commits a write of `blocks` at `lba`; returns its id and
/// first sequence.
fn commit(core: &mut PartitionCore, lba: u64, blocks: u64, head: u64) -> (Admission, u64) {
    let admission = core.admit(lba..lba + blocks);
    let Admission::Ready(id) = admission else {
        panic!("{admission:?}")
    };
    let plan = core
        .start_commit(
            id,
            vec![write(lba, blocks, 7)],
            LogPosition(head),
            Instant::now(),
        )
        .unwrap();
    assert!(plan.replicate);
    (admission, plan.records[0].sequence)
}

#[test]
fn a_write_completes_only_once_both_logs_have_it() {
    // Local first, then the secondary.
    let mut core = primary();
    let (a, seq) = commit(&mut core, 0, 2, 10);
    assert_eq!(seq, 1);
    let (done, _) = core.local_done(a.id(), Ok(vec![LogPosition(10)]));
    assert!(done.is_empty(), "acknowledged on one copy");
    assert!(core.index().lookup(0, 1).unwrap()[0].location.is_none());
    let (done, _) = core.on_appended(seq);
    assert_eq!(ok_ids(&done), vec![a.id().0]);
    assert_eq!(
        core.index().lookup(1, 1).unwrap()[0].location,
        Some(Location::Log {
            position: LogPosition(10),
            block_in_record: 1
        })
    );
    // The secondary first, then local.
    let (b, seq) = commit(&mut core, 4, 1, 11);
    let (done, _) = core.on_appended(seq);
    assert!(done.is_empty(), "acknowledged before the local log");
    let (done, _) = core.local_done(b.id(), Ok(vec![LogPosition(11)]));
    assert_eq!(ok_ids(&done), vec![b.id().0]);
    assert_eq!(core.applied_through(), 2);
}

#[test]
fn a_local_failure_fails_the_write_and_abandons_its_sequence() {
    let mut core = primary();
    let (a, seq) = commit(&mut core, 0, 1, 3);
    let (done, _) = core.local_done(
        a.id(),
        Err(PartitionError::Unavailable {
            partition: PART,
            reason: "device".into(),
        }),
    );
    assert_eq!(done.len(), 1);
    assert!(done[0].result.is_err());
    // The secondary may still confirm it: nothing is applied here.
    let (done, _) = core.on_appended(seq);
    assert!(done.is_empty());
    assert!(core.index().lookup(0, 1).unwrap()[0].location.is_none());
    assert_eq!(core.applied_through(), seq, "abandoned counts as applied");
    assert_eq!(core.oldest_hold(), None, "its log hold is gone");
}

#[test]
fn overlapping_writes_wait_first_come_first_served() {
    let mut core = primary();
    let first = core.admit(0..4);
    let overlapping = core.admit(2..6);
    let apart = core.admit(10..12);
    let behind_the_queued = core.admit(5..7);
    assert!(matches!(first, Admission::Ready(_)));
    assert!(matches!(overlapping, Admission::Queued(_)));
    assert!(matches!(apart, Admission::Ready(_)));
    // Overlaps only the queued write: still behind it (no overtaking).
    assert!(matches!(behind_the_queued, Admission::Queued(_)));
    assert_eq!(core.end_write(first.id()), vec![overlapping.id()]);
    assert!(!core.is_admitted(behind_the_queued.id()));
    assert_eq!(
        core.end_write(overlapping.id()),
        vec![behind_the_queued.id()]
    );
}

#[test]
fn a_detached_write_keeps_its_range_until_it_is_resolved() {
    let mut core = primary();
    let (a, seq) = commit(&mut core, 0, 2, 0);
    // The host stops waiting (timeout): the write stays in the table.
    assert!(core.end_write(a.id()).is_empty());
    let next = core.admit(1..2);
    assert!(matches!(next, Admission::Queued(_)));
    let mark = core.write_mark();
    assert!(core.writes_before(mark));
    let (_, ready) = core.local_done(a.id(), Ok(vec![LogPosition(0)]));
    assert!(ready.is_empty(), "not both copies yet");
    let (done, ready) = core.on_appended(seq);
    assert_eq!(
        ok_ids(&done),
        vec![a.id().0],
        "applied although nobody waits"
    );
    assert_eq!(ready, vec![next.id()]);
    core.end_write(next.id());
    assert!(!core.writes_before(mark));
}

#[test]
fn a_fence_fails_every_write_in_flight_and_acknowledges_nothing_after() {
    let mut core = primary();
    let (a, seq_a) = commit(&mut core, 0, 1, 20);
    let (b, seq_b) = commit(&mut core, 8, 1, 20);
    core.local_done(a.id(), Ok(vec![LogPosition(20)]));
    let (done, _) = core.fence(9);
    assert_eq!(done.len(), 2);
    assert!(done
        .iter()
        .all(|c| matches!(c.result, Err(PartitionError::NotPrimary { .. }))));
    assert_eq!(core.role(), Role::Fenced { current: 9 });
    // `b`'s local append is still in flight: its hold stays.
    assert_eq!(core.oldest_hold(), Some(LogPosition(20)));
    let (done, _) = core.on_appended(seq_a.max(seq_b));
    assert!(done.is_empty());
    let (done, _) = core.local_done(b.id(), Ok(vec![LogPosition(21)]));
    assert!(done.is_empty());
    assert_eq!(core.oldest_hold(), None);
    assert!(core.index().lookup(0, 16).unwrap()[0].location.is_none());
    assert!(core.next_append().is_none());
    let late = core.admit(30..31).id();
    assert!(matches!(
        core.start_commit(late, vec![write(30, 1, 1)], LogPosition(30), Instant::now()),
        Err(PartitionError::NotPrimary { .. })
    ));
}

#[test]
fn the_log_hold_covers_appends_in_flight_and_unconfirmed_records() {
    let mut core = primary();
    let (a, seq) = commit(&mut core, 0, 1, 40);
    assert_eq!(core.log_hold(), Some(LogPosition(40)));
    core.local_done(a.id(), Ok(vec![LogPosition(41)]));
    // Not confirmed by the secondary: the append's hold stays.
    assert_eq!(core.log_hold(), Some(LogPosition(40)));
    core.on_appended(seq);
    // Now the index holds it.
    assert_eq!(core.log_hold(), Some(LogPosition(41)));
    core.forget_released(LogPosition(41));
}

#[test]
#[should_panic(expected = "under a record the index maps")]
fn releasing_under_the_index_panics() {
    let mut core = primary();
    let (a, seq) = commit(&mut core, 0, 1, 40);
    core.local_done(a.id(), Ok(vec![LogPosition(41)]));
    core.on_appended(seq);
    core.forget_released(LogPosition(42));
}

#[test]
fn replication_sends_in_order_and_resumes_after_a_failure() {
    let mut core = primary();
    commit(&mut core, 0, 1, 0);
    commit(&mut core, 1, 1, 0);
    let Some(ReplicaRequest::Append { records, epoch, .. }) = core.next_append() else {
        panic!("nothing to send")
    };
    assert_eq!(epoch, 5);
    assert_eq!(
        records.iter().map(|r| r.sequence).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(records[0].lba, FIRST, "volume blocks on the wire");
    assert!(core.next_append().is_none(), "already sent");
    core.replication_failed();
    let Some(ReplicaRequest::Append { records, .. }) = core.next_append() else {
        panic!("no resend")
    };
    assert_eq!(records.len(), 2);
}

fn record(sequence: u64, lba: u64) -> ReplicaRecord {
    let data = Bytes::from(vec![sequence as u8; 4096]);
    ReplicaRecord {
        sequence,
        kind: ReplicaRecordKind::Write,
        lba: FIRST + lba,
        blocks: 1,
        crcs: vec![crc32c::crc32c(&data)],
        data,
    }
}

fn trim(sequence: u64, lba: u64) -> ReplicaRecord {
    ReplicaRecord {
        sequence,
        kind: ReplicaRecordKind::Unmap,
        lba: FIRST + lba,
        blocks: 1,
        crcs: Vec::new(),
        data: Bytes::new(),
    }
}

/// Logs `records` on `core` at positions from `at`.
fn append(
    core: &mut PartitionCore,
    records: Vec<ReplicaRecord>,
    at: u64,
) -> Result<u64, ReplicaError> {
    match core.replica_begin_append(5, records, LogPosition(at))? {
        ReplicaAppend::Nothing { up_to_sequence } => Ok(up_to_sequence),
        ReplicaAppend::Log { records, hold } => {
            let positions = (at..at + records.len() as u64).map(LogPosition).collect();
            core.replica_appended(&records, hold, Ok(positions))
        }
    }
}

#[test]
fn the_secondary_takes_records_in_order_only() {
    let mut core = secondary();
    assert_eq!(
        append(&mut core, vec![record(1, 0), record(2, 1)], 0),
        Ok(2)
    );
    // Duplicates are skipped, a hole is refused.
    assert_eq!(append(&mut core, vec![record(2, 1)], 5), Ok(2));
    assert_eq!(
        append(&mut core, vec![record(4, 3)], 5),
        Err(ReplicaError::Gap {
            expected_sequence: 3
        })
    );
    assert!(matches!(
        core.replica_begin_append(4, vec![record(3, 2)], LogPosition(5)),
        Err(ReplicaError::StaleEpoch { current: 5 })
    ));
    // One request at a time.
    assert!(core.replica_try_enter(Some(3), false));
    assert!(!core.replica_try_enter(None, true));
    core.replica_leave();
    // A request from the future waits unless told to give up.
    assert!(!core.replica_try_enter(Some(9), false));
    assert!(core.replica_try_enter(Some(9), true));
}

#[test]
fn a_catch_up_jump_keeps_the_trims_a_flush_commit_drops() {
    let mut core = secondary();
    assert_eq!(append(&mut core, vec![record(1, 0), trim(2, 0)], 0), Ok(2));
    let primary = primary();
    let ReplicaRequest::FlushCommit {
        up_to_sequence,
        mappings,
        ..
    } = primary.jump_request(6)
    else {
        panic!("not a commit")
    };
    core.replica_commit(5, up_to_sequence, &mappings).unwrap();
    assert_eq!(core.next_sequence(), 7);
    // The trim of block 0 is carried into a take-over.
    let plan = core.take_over_plan(true);
    assert!(plan.needed.contains(&LogPosition(1)), "{plan:?}");
    // A late copy of the jump changes nothing either.
    core.replica_commit(5, up_to_sequence, &mappings).unwrap();
    assert!(core.take_over_plan(true).needed.contains(&LogPosition(1)));
    // A flush's commit means the trim is in a summary: dropped.
    core.replica_commit(5, 2, &[]).unwrap();
    assert!(core.take_over_plan(true).needed.is_empty());
}

/// The bug behind issue 14's write-log EIO under NBD load: a secondary
/// named at a new epoch is caught up with the primary's retained tail,
/// records the primary had already flushed (not yet released) among them.
/// No later flush commit maps those blocks (the primary flushed them
/// before), so the secondary's index kept them in its log for good: its
/// log hold never passed the oldest one, the node's shared log filled up
/// ~20 s later, and every partition with a copy on it stalled ("write log
/// full" on its primaries, overlapping writes queued behind unconfirmed
/// ones on the primaries it was secondary for).
#[test]
fn a_flush_commit_releases_what_a_catch_up_resent_from_before_the_join() {
    let mut core = secondary();
    // The catch-up resends 1..=3 (already flushed by the primary), then a
    // new write 4 arrives.
    assert_eq!(
        append(
            &mut core,
            vec![record(1, 0), record(2, 1), record(3, 2)],
            10
        ),
        Ok(3)
    );
    assert_eq!(append(&mut core, vec![record(4, 3)], 13), Ok(4));
    assert_eq!(core.log_hold(), Some(LogPosition(10)));
    // The primary's next flush moves block 3 (sequence 4) only: its commit
    // covers 1..=4 but maps nothing of 1..=3.
    let moved = FlushedRange {
        lba: FIRST + 3,
        blocks: 1,
        sequence: 4,
        extent: 9,
        column: 0,
        offset_bytes: 0,
    };
    let commit = core.replica_commit(5, 4, &[moved]).unwrap();
    assert_eq!(core.log_hold(), None, "{:?}", core.log_holds());
    assert_eq!(core.index().log_resident_blocks(), 0);
    // A promotion hands nothing of the log over: the sleds hold it all.
    assert!(core.take_over_plan(true).needed.is_empty());
    // Above the commit the log stays held.
    assert_eq!(append(&mut core, vec![record(5, 1)], 15), Ok(5));
    core.replica_commit(5, 4, &[]).unwrap();
    assert_eq!(core.log_hold(), Some(LogPosition(15)));

    // The same log replayed by a restarted secondary: the same holds.
    let mut logged: Vec<RecoveredRecord> = Vec::new();
    let mut replica = secondary();
    for (records, at) in [
        (vec![record(1, 0), record(2, 1), record(3, 2)], 10),
        (vec![record(4, 3)], 13),
    ] {
        let ReplicaAppend::Log { records, hold } = replica
            .replica_begin_append(5, records, LogPosition(at))
            .unwrap()
        else {
            panic!("nothing to log")
        };
        let positions: Vec<LogPosition> =
            (at..at + records.len() as u64).map(LogPosition).collect();
        replica
            .replica_appended(&records, hold, Ok(positions.clone()))
            .unwrap();
        logged.extend(
            records
                .into_iter()
                .zip(positions)
                .map(|(record, position)| RecoveredRecord { position, record }),
        );
    }
    logged.push(RecoveredRecord {
        position: LogPosition(14),
        record: commit,
    });
    let mut restarted = secondary();
    restarted.replay(true, &logged, 1, Instant::now()).unwrap();
    assert_eq!(restarted.log_hold(), None, "{:?}", restarted.log_holds());
    assert_eq!(restarted.next_sequence(), 5);
}

#[test]
fn the_catch_up_plan_jumps_released_records_and_owes_held_ones() {
    let mut core = primary();
    // Sequences 1..=3 committed, confirmed and flushed; 1 then released.
    let mut placed = Vec::new();
    for (lba, head) in [(0, 10), (1, 11), (2, 12)] {
        let (a, seq) = commit(&mut core, lba, 1, head);
        core.local_done(a.id(), Ok(vec![LogPosition(head)]));
        core.on_appended(seq);
        let location = Location::Sled {
            extent: 1,
            column: 0,
            offset_bytes: lba * 4096,
        };
        placed.push((lba, seq, location));
    }
    assert!(core.secondary_in_sync(), "confirmed appends, nothing owed");
    assert_eq!(core.commit_flushed(&placed, &[], 3).unwrap(), 3);
    core.forget_released(LogPosition(11));
    // Records held from the expected one on: a jump to the front, owed.
    assert_eq!(core.catch_up_plan(1), CatchUp::Owe { up_to: 3 });
    assert_eq!(core.catch_up_plan(3), CatchUp::Owe { up_to: 3 });
    assert_eq!(core.catch_up_plan(4), CatchUp::Caught);
    // Nothing held from the expected one to the front: released, a plain
    // jump over it (owing nothing).
    core.forget_released(LogPosition(13));
    assert_eq!(core.catch_up_plan(1), CatchUp::Skip { up_to: 3 });
    assert_eq!(core.owed_through(), 0);
}

/// A primary opened from a log holding `count` one-block writes at
/// positions 10.. (sequences 1..=count), at epoch 5.
fn opened_primary(count: u64) -> PartitionCore {
    let recovered: Vec<RecoveredRecord> = (1..=count)
        .map(|sequence| RecoveredRecord {
            position: LogPosition(9 + sequence),
            record: head_node::wal::LogRecord::write(
                PART,
                5,
                sequence,
                sequence - 1,
                Bytes::from(vec![sequence as u8; 4096]),
            ),
        })
        .collect();
    let mut core = primary();
    core.replay(false, &recovered, 1, Instant::now()).unwrap();
    core
}

/// Issue 14 item 6: the tail is flushed instead of shipped. A new
/// secondary is jumped to the queue's front, new writes are confirmed at
/// once, and the pair is in sync only once a flush commit covering the
/// jumped tail is confirmed by the secondary.
#[test]
fn a_jumped_secondary_is_in_sync_only_after_the_flush_commit_of_the_tail() {
    let mut core = opened_primary(3);
    // Whatever this log holds may be what an earlier instance jumped its
    // secondary over: owed from the start.
    assert_eq!(core.owed_through(), 3);
    assert!(!core.secondary_in_sync());
    // An empty secondary: jumped over 1..=3, not resent.
    assert_eq!(core.catch_up_plan(1), CatchUp::Owe { up_to: 3 });
    let ReplicaRequest::FlushCommit {
        up_to_sequence: 3, ..
    } = core.jump_owed(3)
    else {
        panic!("not a jump to 3")
    };
    assert!(core.note_secondary_expects(4), "at the queue's front");
    assert!(core.secondary_at_front());
    assert!(!core.secondary_in_sync(), "the tail is in this log only");
    // The owed flush is due whatever the fill and age.
    assert!(core.owes_flush());
    assert!(core.flush_due(
        Instant::now(),
        0.0,
        1.0,
        std::time::Duration::from_secs(3600)
    ));
    // A new write is acknowledged at once (both logs have it).
    let (a, seq) = commit(&mut core, 10, 1, 20);
    assert_eq!(seq, 4);
    core.local_done(a.id(), Ok(vec![LogPosition(20)]));
    let (done, _) = core.on_appended(seq);
    assert_eq!(ok_ids(&done), vec![a.id().0]);
    assert!(!core.secondary_in_sync());
    // The flush: every log-resident block to the sleds, committed at the
    // applied watermark.
    let plan = core.flush_plan(64);
    assert!(!plan.more);
    assert_eq!(plan.up_to_sequence, 4);
    let placed: Vec<(u64, u64, Location)> = plan
        .pieces
        .iter()
        .enumerate()
        .map(|(i, piece)| {
            let location = Location::Sled {
                extent: 1,
                column: 0,
                offset_bytes: i as u64 * 4096,
            };
            (piece.lba, piece.sequence, location)
        })
        .collect();
    assert_eq!(
        core.commit_flushed(&placed, &[], plan.up_to_sequence)
            .unwrap(),
        4
    );
    assert!(!core.owes_flush(), "a covering commit is queued");
    assert!(
        !core.secondary_in_sync(),
        "queued is not confirmed by the secondary"
    );
    let Some(ReplicaRequest::FlushCommit {
        up_to_sequence: 4, ..
    }) = core.next_commit()
    else {
        panic!("no flush commit for the secondary")
    };
    core.on_committed();
    assert!(core.secondary_in_sync());
}

/// A flush with nothing left to move still commits its watermark when the
/// secondary is owed one, or the pair would never get in sync: a take-over
/// offers the old instance's flushed (not yet released) tail to the new
/// secondary's catch-up, which jumps it over those records and owes them.
#[test]
fn an_owed_flush_with_nothing_to_move_commits_its_watermark() {
    let mut old = primary();
    for (lba, head) in [(0, 10), (1, 11)] {
        let (a, seq) = commit(&mut old, lba, 1, head);
        old.local_done(a.id(), Ok(vec![LogPosition(head)]));
        old.on_appended(seq);
    }
    let placed = [
        (
            0,
            1,
            Location::Sled {
                extent: 1,
                column: 0,
                offset_bytes: 0,
            },
        ),
        (
            1,
            2,
            Location::Sled {
                extent: 1,
                column: 0,
                offset_bytes: 4096,
            },
        ),
    ];
    assert_eq!(old.commit_flushed(&placed, &[], 2).unwrap(), 2);
    // The secondary is replaced: the primary moves to epoch 6 in place.
    old.take_over(6).unwrap();
    let plan = old.take_over_plan(false);
    assert!(plan.log_resident.runs.is_empty(), "{plan:?}");
    let mut core = PartitionCore::new(PART, FIRST, 64, Role::Primary, 6);
    core.adopt_log_resident(&plan.log_resident, plan.next_sequence, Instant::now())
        .unwrap();
    core.adopt_retained(&plan.retained);
    assert_eq!(core.owed_through(), 0, "nothing log-resident handed over");
    // The new, empty secondary is jumped over the offered tail: owed.
    assert_eq!(core.catch_up_plan(1), CatchUp::Owe { up_to: 2 });
    core.jump_owed(2);
    assert!(core.note_secondary_expects(3));
    assert!(!core.secondary_in_sync());
    // Nothing to move: the commit goes alone, once.
    let flush = core.flush_plan(64);
    assert!(flush.pieces.is_empty() && flush.trims.is_empty());
    assert_eq!(flush.up_to_sequence, 2);
    assert!(core.owed_commit_worth(flush.up_to_sequence));
    assert_eq!(
        core.commit_flushed(&[], &[], flush.up_to_sequence).unwrap(),
        0
    );
    assert!(!core.owed_commit_worth(flush.up_to_sequence), "queued once");
    assert!(!core.secondary_in_sync(), "not confirmed yet");
    core.on_committed();
    assert!(core.secondary_in_sync());
}

#[test]
fn a_take_over_hands_over_what_the_index_and_trims_need() {
    let mut old = primary();
    let (a, seq) = commit(&mut old, 0, 1, 50);
    old.local_done(a.id(), Ok(vec![LogPosition(50)]));
    old.on_appended(seq);
    old.end_write(a.id());
    // Superseded: no longer needed, but offered to the catch-up.
    let (b, seq) = commit(&mut old, 0, 1, 51);
    old.local_done(b.id(), Ok(vec![LogPosition(51)]));
    old.on_appended(seq);
    let (in_flight, _) = commit(&mut old, 5, 1, 52);
    let (was_secondary, done, _) = old.take_over(6).unwrap();
    assert!(!was_secondary);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].write, in_flight.id());
    let plan = old.take_over_plan(false);
    assert_eq!(
        plan.needed.into_iter().collect::<Vec<_>>(),
        vec![LogPosition(51)]
    );
    assert_eq!(plan.next_sequence, 4);
    assert_eq!(plan.retained.len(), 2);
    assert!(
        old.take_over(5).is_ok(),
        "a fenced instance can be taken again"
    );
}

#[test]
fn a_flush_batch_never_covers_a_run_it_leaves_in_the_log() {
    let mut core = primary();
    // Three one-block writes (sequences 1..=3) and a trim (4), all applied.
    for (lba, head) in [(0, 10), (5, 11), (9, 12)] {
        let (a, seq) = commit(&mut core, lba, 1, head);
        core.local_done(a.id(), Ok(vec![LogPosition(head)]));
        core.on_appended(seq);
        core.end_write(a.id());
    }
    let t = core.admit(20..22);
    let plan = core
        .start_commit(
            t.id(),
            vec![Change::Unmap { lba: 20, count: 2 }],
            LogPosition(13),
            Instant::now(),
        )
        .unwrap();
    let trim_sequence = plan.records[0].sequence;
    core.local_done(t.id(), Ok(vec![LogPosition(13)]));
    core.on_appended(trim_sequence);
    // Everything fits: the watermark is the applied one, the trim goes.
    let all = core.flush_plan(100);
    assert_eq!(all.pieces.len(), 3);
    assert_eq!(all.up_to_sequence, 4);
    assert_eq!(all.trims.len(), 1);
    assert!(!all.more);
    // Two blocks per batch: block 9 (sequence 3) stays in the log, so the
    // watermark stops below it and the trim waits for a later batch.
    let part = core.flush_plan(2);
    assert_eq!(part.pieces.len(), 2);
    assert!(part.more);
    assert_eq!(part.up_to_sequence, 2);
    assert!(part.trims.is_empty());
}

#[test]
fn a_take_over_hands_over_what_replaying_its_records_builds() {
    let mut core = secondary();
    let wide = |sequence: u64, lba: u64, blocks: usize| {
        let data = Bytes::from(vec![sequence as u8; 4096 * blocks]);
        ReplicaRecord {
            sequence,
            kind: ReplicaRecordKind::Write,
            lba: FIRST + lba,
            blocks: blocks as u32,
            crcs: data.chunks(4096).map(crc32c::crc32c).collect(),
            data,
        }
    };
    // Overlapping writes, a trim inside one, a write that a flush moves to
    // the sleds, and one left alone.
    let incoming = vec![
        wide(1, 0, 8),
        wide(2, 4, 8),
        trim(3, 5),
        wide(4, 20, 4),
        wide(5, 30, 2),
    ];
    let ReplicaAppend::Log { records, hold } = core
        .replica_begin_append(5, incoming, LogPosition(40))
        .unwrap()
    else {
        panic!("nothing to log")
    };
    let positions: Vec<LogPosition> = (40..45).map(LogPosition).collect();
    assert_eq!(
        core.replica_appended(&records, hold, Ok(positions.clone())),
        Ok(5)
    );
    // A flush up to 1: blocks 0..4 of record 1 are on the sleds now.
    let flushed = FlushedRange {
        lba: FIRST,
        blocks: 4,
        sequence: 1,
        extent: 9,
        column: 0,
        offset_bytes: 0,
    };
    core.replica_commit(5, 1, &[flushed]).unwrap();
    let plan = core.take_over_plan(true);
    // Record 1 is on the sleds or superseded: not needed, not handed.
    let needed: Vec<u64> = plan.needed.iter().map(|p| p.0).collect();
    assert_eq!(needed, vec![41, 42, 43, 44]);
    assert!(plan
        .log_resident
        .runs
        .iter()
        .all(|(_, run)| run.sequence != 1));
    // The cold way: replay the needed records read back from the log.
    let read_back: Vec<RecoveredRecord> = records
        .iter()
        .zip(&positions)
        .filter(|(_, p)| plan.needed.contains(p))
        .map(|(record, position)| RecoveredRecord {
            position: *position,
            record: record.clone(),
        })
        .collect();
    let now = Instant::now();
    let mut replayed = PartitionCore::new(PART, FIRST, 64, Role::Primary, 6);
    replayed
        .replay(false, &read_back, plan.next_sequence, now)
        .unwrap();
    let mut handed = PartitionCore::new(PART, FIRST, 64, Role::Primary, 6);
    handed
        .adopt_log_resident(&plan.log_resident, plan.next_sequence, now)
        .unwrap();
    let runs = |core: &PartitionCore| {
        core.index()
            .runs()
            .map(|(lba, run)| (lba, *run))
            .collect::<Vec<_>>()
    };
    assert_eq!(runs(&handed), runs(&replayed));
    assert_eq!(handed.next_sequence(), 6);
    assert_eq!(handed.next_sequence(), replayed.next_sequence());
    assert_eq!(handed.applied_through(), replayed.applied_through());
    assert_eq!(
        handed.take_over_plan(false),
        replayed.take_over_plan(false),
        "same log-resident state, tail and sequences"
    );
    // The trim is still pending: block 5 reads as zeros, its record held.
    assert_eq!(handed.index().lookup(5, 1).unwrap()[0].location, None);
    assert!(handed.log_hold().is_some_and(|p| p <= LogPosition(42)));
}

/// Sequences of an `Append` request.
fn append_sequences(request: Option<ReplicaRequest>) -> Vec<u64> {
    match request {
        Some(ReplicaRequest::Append { records, .. }) => {
            records.iter().map(|r| r.sequence).collect()
        }
        None => Vec::new(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_reserved_direct_sequence_holds_replication_until_its_record_is_queued() {
    let mut core = primary();
    let Admission::Ready(direct) = core.admit(0..16) else {
        panic!("not ready")
    };
    let reserved = core.reserve_direct(direct).unwrap();
    assert_eq!(reserved, 1);
    // A later small write logs at once, but the secondary must not get it
    // before the reserved sequence (it accepts sequences in order).
    let (small, seq) = commit(&mut core, 20, 1, 10);
    assert_eq!(seq, 2);
    assert!(append_sequences(core.next_append()).is_empty());
    assert!(!core.has_replication_work());
    let (done, _) = core.local_done(small.id(), Ok(vec![LogPosition(10)]));
    assert!(done.is_empty());
    // A direct record goes alone, at its reserved sequence.
    let mapping = FlushedRange {
        lba: FIRST,
        blocks: 16,
        sequence: reserved,
        extent: 1,
        column: 0,
        offset_bytes: 0,
    };
    let plan = core
        .start_commit(
            direct,
            vec![Change::Direct {
                lba: 0,
                mappings: vec![mapping],
            }],
            LogPosition(11),
            Instant::now(),
        )
        .unwrap();
    assert_eq!(plan.records[0].sequence, reserved);
    // Mapped at once: the stripes are durable on every present column.
    assert_eq!(
        core.index().lookup(3, 1).unwrap()[0].location,
        Some(Location::Sled {
            extent: 1,
            column: 0,
            offset_bytes: 3 * 4096
        })
    );
    assert_eq!(append_sequences(core.next_append()), vec![1, 2]);
    let (done, _) = core.local_done(direct, Ok(vec![LogPosition(11)]));
    assert!(done.is_empty(), "acknowledged before the secondary");
    let (done, _) = core.on_appended(2);
    let mut ids = ok_ids(&done);
    ids.sort_unstable();
    assert_eq!(ids, vec![direct.0, small.id().0]);
    assert_eq!(core.applied_through(), 2);
    // A secondary accepts the record and keeps it out of its tail.
    let mut replica = secondary();
    let record = core.replica_record(&plan.records[0]);
    assert_eq!(record.kind, ReplicaRecordKind::Direct);
    let ReplicaAppend::Log { records, hold } = replica
        .replica_begin_append(5, vec![record], LogPosition(0))
        .unwrap()
    else {
        panic!("nothing to log")
    };
    assert_eq!(
        replica
            .replica_appended(&records, hold, Ok(vec![LogPosition(0)]))
            .unwrap(),
        1
    );
    assert_eq!(replica.retained_tail(), Vec::new());
    assert_eq!(replica.log_hold(), None);
}

/// Found by the seeded simulation (`SIM_SEED=376`, with direct writes): a
/// catch-up jump to the queue's front moved a new secondary past a
/// reserved sequence whose record was not queued yet; the record came
/// later, below what the secondary already confirmed.
#[test]
fn a_catch_up_jump_stops_before_a_reserved_direct_sequence() {
    let mut core = opened_primary(3);
    let Admission::Ready(direct) = core.admit(0..16) else {
        panic!("not ready")
    };
    let reserved = core.reserve_direct(direct).unwrap();
    assert_eq!(reserved, 4);
    let (_, seq) = commit(&mut core, 20, 1, 20);
    assert_eq!(seq, 5);
    // The secondary is jumped over the held tail only, not over 4.
    assert_eq!(core.catch_up_plan(1), CatchUp::Owe { up_to: 3 });
    assert_eq!(core.catch_up_plan(4), CatchUp::Caught);
}

#[test]
fn a_direct_write_that_ends_before_its_record_voids_its_sequence() {
    let mut core = primary();
    let Admission::Ready(direct) = core.admit(0..16) else {
        panic!("not ready")
    };
    let reserved = core.reserve_direct(direct).unwrap();
    let (small, seq) = commit(&mut core, 20, 1, 10);
    assert!(append_sequences(core.next_append()).is_empty());
    // The host gave up (stripes failed to be fenced, cancelled, ...).
    core.end_write(direct);
    let Some(ReplicaRequest::Append { records, .. }) = core.next_append() else {
        panic!("nothing sent")
    };
    assert_eq!(records[0].sequence, reserved);
    assert_eq!(records[0].kind, ReplicaRecordKind::Direct);
    assert_eq!(records[1].sequence, seq);
    core.local_done(small.id(), Ok(vec![LogPosition(10)]));
    let (done, _) = core.on_appended(seq);
    assert_eq!(ok_ids(&done), vec![small.id().0]);
    assert_eq!(core.applied_through(), seq);
    // Direct records must go alone, and only at a reserved sequence.
    let Admission::Ready(other) = core.admit(30..31) else {
        panic!("not ready")
    };
    let refused = core.start_commit(
        other,
        vec![Change::Direct {
            lba: 30,
            mappings: Vec::new(),
        }],
        LogPosition(12),
        Instant::now(),
    );
    assert!(matches!(refused, Err(PartitionError::BadRequest { .. })));
}
