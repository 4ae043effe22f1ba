//! Model test of the partition index: random writes, unmaps and flushes
//! applied to the index and to a per-block `HashMap`, compared after every
//! step.

use std::collections::{BTreeMap, HashMap};

use head_node::index::{Location, PartitionIndex};
use head_node::wal::LogPosition;
use proptest::prelude::*;
use proto::sled::PartitionId;

const SIZE_BLOCKS: u64 = 64;

#[derive(Debug, Clone)]
enum Op {
    Write {
        lba: u64,
        count: u64,
        seq: u64,
    },
    Unmap {
        lba: u64,
        count: u64,
        seq: u64,
    },
    Flush {
        lba: u64,
        count: u64,
        seq: u64,
        extent: u64,
        column: u16,
    },
    Lookup {
        lba: u64,
        count: u64,
    },
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..SIZE_BLOCKS).prop_flat_map(|lba| (Just(lba), 1..=(SIZE_BLOCKS - lba).min(16)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (range(), 0u64..40).prop_map(|((lba, count), seq)| Op::Write { lba, count, seq }),
        1 => (range(), 0u64..40).prop_map(|((lba, count), seq)| Op::Unmap { lba, count, seq }),
        3 => (range(), 0u64..40, 0u64..4, 0u16..6)
            .prop_map(|((lba, count), seq, extent, column)| Op::Flush { lba, count, seq, extent, column }),
        2 => range().prop_map(|(lba, count)| Op::Lookup { lba, count }),
    ]
}

/// Per block: (sequence, location of exactly that block).
type Model = HashMap<u64, (u64, Option<Location>)>;

fn expand(index: &PartitionIndex, lba: u64, count: u64) -> Vec<Option<(u64, Location)>> {
    let pieces = index.lookup_with_sequence(lba, count).unwrap();
    // Covers exactly the asked range, in order, without gaps or overlaps.
    assert_eq!(pieces.first().unwrap().lbas.start, lba);
    assert_eq!(pieces.last().unwrap().lbas.end, lba + count);
    for pair in pieces.windows(2) {
        assert_eq!(pair[0].lbas.end, pair[1].lbas.start);
    }
    let plain = index.lookup(lba, count).unwrap();
    assert_eq!(plain.len(), pieces.len());
    let mut out = Vec::new();
    for piece in pieces {
        assert!(!piece.lbas.is_empty());
        for i in 0..piece.lbas.end - piece.lbas.start {
            out.push(
                piece
                    .location
                    .map(|l| (piece.sequence.unwrap(), l.advanced(i))),
            );
        }
    }
    out
}

fn expected(model: &Model, lba: u64, count: u64) -> Vec<Option<(u64, Location)>> {
    (lba..lba + count)
        .map(|b| match model.get(&b) {
            Some((seq, Some(l))) => Some((*seq, *l)),
            _ => None,
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn index_matches_a_per_block_model(ops in proptest::collection::vec(op(), 1..80)) {
        let partition = PartitionId { volume: 1, index: 0 };
        let mut index = PartitionIndex::new(partition, SIZE_BLOCKS);
        let mut model: Model = HashMap::new();
        for (step, op) in ops.iter().enumerate() {
            match *op {
                Op::Write { lba, count, seq } => {
                    let base = Location::Log { position: LogPosition(step as u64 * 4096), block_in_record: 0 };
                    index.apply_write(lba, count, seq, base).unwrap();
                    for i in 0..count {
                        let old = model.get(&(lba + i)).map(|(s, _)| *s);
                        if old.is_none_or(|s| s <= seq) {
                            model.insert(lba + i, (seq, Some(base.advanced(i))));
                        }
                    }
                }
                Op::Unmap { lba, count, seq } => {
                    index.apply_unmap(lba, count, seq).unwrap();
                    for i in 0..count {
                        let old = model.get(&(lba + i)).map(|(s, _)| *s);
                        if old.is_none_or(|s| s <= seq) {
                            model.insert(lba + i, (seq, None));
                        }
                    }
                }
                Op::Flush { lba, count, seq, extent, column } => {
                    let base = Location::Sled { extent, column, offset_bytes: step as u64 * 65536 };
                    let moved = index.apply_flush(lba, count, seq, base).unwrap();
                    let mut model_moved = 0;
                    for i in 0..count {
                        if let Some((s, Some(Location::Log { .. }))) = model.get(&(lba + i)).copied() {
                            if s <= seq {
                                model.insert(lba + i, (seq, Some(base.advanced(i))));
                                model_moved += 1;
                            }
                        }
                    }
                    prop_assert_eq!(moved, model_moved);
                }
                Op::Lookup { lba, count } => {
                    prop_assert_eq!(expand(&index, lba, count), expected(&model, lba, count));
                }
            }
            index.check_invariants().map_err(TestCaseError::fail)?;
            prop_assert_eq!(expand(&index, 0, SIZE_BLOCKS), expected(&model, 0, SIZE_BLOCKS), "after step {} {:?}", step, op);
            // GC and log-release bookkeeping agree with the model.
            let mut live: BTreeMap<u64, u64> = BTreeMap::new();
            let mut oldest_log = None::<LogPosition>;
            for (_, location) in model.values() {
                match location {
                    Some(Location::Sled { extent, .. }) => *live.entry(*extent).or_default() += 1,
                    Some(Location::Log { position, .. }) => {
                        oldest_log = Some(oldest_log.map_or(*position, |o| o.min(*position)))
                    }
                    None => {}
                }
            }
            prop_assert_eq!(index.live_blocks_per_extent(), &live);
            prop_assert_eq!(index.oldest_log_position(), oldest_log);
            if let Some(oldest) = oldest_log {
                prop_assert!(index.entries_referencing_log_before(oldest).is_empty());
                let next = LogPosition(oldest.0 + 1);
                prop_assert!(!index.entries_referencing_log_before(next).is_empty());
            }
        }
        let restored = PartitionIndex::deserialize(&index.serialize()).unwrap();
        prop_assert_eq!(&restored, &index);
    }
}

#[test]
fn sequential_writes_of_one_record_stay_one_run() {
    let mut index = PartitionIndex::new(
        PartitionId {
            volume: 1,
            index: 0,
        },
        1024,
    );
    let base = Location::Log {
        position: LogPosition(0),
        block_in_record: 0,
    };
    for i in 0..16 {
        index
            .apply_write(i * 4, 4, 1, base.advanced(i * 4))
            .unwrap();
    }
    assert_eq!(index.run_count(), 1);
    index
        .apply_flush(
            0,
            64,
            1,
            Location::Sled {
                extent: 1,
                column: 0,
                offset_bytes: 0,
            },
        )
        .unwrap();
    assert_eq!(index.run_count(), 1);
    assert_eq!(index.live_blocks_per_extent().get(&1), Some(&64));
    assert_eq!(index.oldest_log_position(), None);
}
