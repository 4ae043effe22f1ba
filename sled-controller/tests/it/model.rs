//! Model-based test: the store and a BTreeMap model receive the same random
//! operations (reopen included) and must agree on every result.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use hardware::BlockDevice;
use proto::sled::{ColumnId, ColumnState, PartitionId, SledError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sled_controller::store::Store;

use crate::common::*;

#[derive(Debug, Clone)]
struct ModelColumn {
    state: ColumnState,
    owner: PartitionId,
    epoch: u64,
    data: Vec<u8>,
}

impl ModelColumn {
    fn free() -> Self {
        Self {
            state: ColumnState::Free,
            owner: p(0, 0),
            epoch: 0,
            data: Vec::new(),
        }
    }
}

struct Model {
    columns: BTreeMap<u32, ModelColumn>,
}

impl Model {
    fn id(i: u32) -> ColumnId {
        ColumnId {
            device: 0,
            index: i,
        }
    }

    fn owner_check(&self, i: u32, part: PartitionId, epoch: u64) -> Result<(), SledError> {
        let c = &self.columns[&i];
        if c.owner != part {
            return Err(SledError::WrongPartition {
                column: Self::id(i),
                owner: c.owner,
            });
        }
        if epoch < c.epoch {
            return Err(SledError::Fenced {
                current_epoch: c.epoch,
            });
        }
        Ok(())
    }

    fn claim(&mut self, i: u32, part: PartitionId, epoch: u64) -> Result<(u64, u64), SledError> {
        let state = self.columns[&i].state;
        match state {
            ColumnState::Free | ColumnState::Allocated => {
                let c = self.columns.get_mut(&i).unwrap();
                *c = ModelColumn {
                    state: ColumnState::Claimed,
                    owner: part,
                    epoch,
                    data: Vec::new(),
                };
                Ok((epoch, 0))
            }
            ColumnState::Claimed => {
                self.owner_check(i, part, epoch)?;
                let c = self.columns.get_mut(&i).unwrap();
                c.epoch = epoch;
                Ok((epoch, c.data.len() as u64))
            }
        }
    }

    fn append(
        &mut self,
        i: u32,
        part: PartitionId,
        epoch: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<u64, SledError> {
        let column = Self::id(i);
        let state = self.columns[&i].state;
        if state != ColumnState::Claimed {
            return Err(SledError::BadColumnState { column, state });
        }
        self.owner_check(i, part, epoch)?;
        let c = self.columns.get_mut(&i).unwrap();
        let length = c.data.len() as u64;
        let len = data.len() as u64;
        if offset + len > COLUMN {
            return Err(SledError::OutOfRange {
                column,
                offset_bytes: offset,
                len_bytes: len,
                length_bytes: length,
                column_size_bytes: COLUMN,
            });
        }
        if offset == length {
            c.data.extend_from_slice(data);
            c.epoch = epoch;
            return Ok(c.data.len() as u64);
        }
        if offset + len > length || c.data[offset as usize..(offset + len) as usize] != *data {
            return Err(SledError::OffsetMismatch {
                column,
                offset_bytes: offset,
                length_bytes: length,
            });
        }
        c.epoch = epoch;
        Ok(length)
    }

    fn read(&self, i: u32, offset: u64, len: u64) -> Result<Vec<u8>, SledError> {
        let column = Self::id(i);
        let c = &self.columns[&i];
        if c.state == ColumnState::Free {
            return Err(SledError::BadColumnState {
                column,
                state: c.state,
            });
        }
        let length = c.data.len() as u64;
        if offset + len > length {
            return Err(SledError::OutOfRange {
                column,
                offset_bytes: offset,
                len_bytes: len,
                length_bytes: length,
                column_size_bytes: COLUMN,
            });
        }
        Ok(c.data[offset as usize..(offset + len) as usize].to_vec())
    }

    fn free(&mut self, i: u32, part: PartitionId, epoch: u64) -> Result<(), SledError> {
        if self.columns[&i].state == ColumnState::Claimed {
            self.owner_check(i, part, epoch)?;
        }
        self.columns.insert(i, ModelColumn::free());
        Ok(())
    }
}

fn random_data(rng: &mut StdRng, blocks: usize) -> (Bytes, Vec<u32>) {
    let mut v = vec![0u8; blocks * 4096];
    rng.fill(&mut v[..]);
    let crcs = v.chunks(4096).map(crc32c::crc32c).collect();
    (Bytes::from(v), crcs)
}

#[derive(Debug, Default)]
struct Outcomes {
    appended: u32,
    retried: u32,
    fenced: u32,
    read: u32,
    reopened: u32,
}

async fn run_model(seed: u64, steps: usize, out: &mut Outcomes) {
    let mut rng = StdRng::seed_from_u64(seed);
    let dev: Arc<dyn BlockDevice> = memory(8 << 20);
    let mut store: Store = open(&dev, 0).await;
    let count = store.geometry().column_count;
    let mut model = Model {
        columns: (0..count).map(|i| (i, ModelColumn::free())).collect(),
    };
    let parts = [p(1, 0), p(2, 3)];
    for step in 0..steps {
        let ctx = format!("seed {seed} step {step}");
        let i = rng.random_range(0..count);
        let part = parts[rng.random_range(0..parts.len())];
        let epoch = rng.random_range(0..6u64);
        match rng.random_range(0..100u32) {
            0..10 => {
                let n = rng.random_range(1..3u32);
                let free = model
                    .columns
                    .values()
                    .filter(|c| c.state == ColumnState::Free)
                    .count() as u32;
                match store.allocate(n).await {
                    Ok(cols) => {
                        assert!(free >= n, "{ctx}");
                        assert_eq!(cols.len() as u32, n, "{ctx}");
                        for c in cols {
                            let m = model.columns.get_mut(&c).unwrap();
                            assert_eq!(
                                m.state,
                                ColumnState::Free,
                                "{ctx}: allocated a non-free column {c}"
                            );
                            m.state = ColumnState::Allocated;
                        }
                    }
                    Err(e) => assert!(free < n && e == SledError::NoSpace, "{ctx}: {e:?}"),
                }
            }
            10..25 => assert_eq!(
                store.claim(i, part, epoch).await,
                model.claim(i, part, epoch),
                "{ctx}"
            ),
            25..60 => {
                let length = model.columns[&i].data.len() as u64;
                let blocks = rng.random_range(1..4usize);
                let (offset, data, crcs) = match rng.random_range(0..10u32) {
                    // A retry of earlier blocks, with the stored data.
                    0..3 if length >= 4096 => {
                        let start = rng.random_range(0..length / 4096) * 4096;
                        let end = (start + blocks as u64 * 4096).min(length);
                        let d = Bytes::copy_from_slice(
                            &model.columns[&i].data[start as usize..end as usize],
                        );
                        let crcs = d.chunks(4096).map(crc32c::crc32c).collect();
                        (start, d, crcs)
                    }
                    3 => {
                        let (d, c) = random_data(&mut rng, blocks);
                        (rng.random_range(0..=COLUMN / 4096) * 4096, d, c)
                    }
                    _ => {
                        let (d, c) = random_data(&mut rng, blocks);
                        (length, d, c)
                    }
                };
                let before = model.columns[&i].data.len() as u64;
                let expected = model.append(i, part, epoch, offset, &data);
                match &expected {
                    Ok(_) if offset < before => out.retried += 1,
                    Ok(_) => out.appended += 1,
                    Err(SledError::Fenced { .. }) => out.fenced += 1,
                    Err(_) => {}
                }
                assert_eq!(
                    store.append(i, part, epoch, offset, &data, &crcs).await,
                    expected,
                    "{ctx}"
                );
            }
            60..80 => {
                let length = model.columns[&i].data.len() as u64;
                let offset = rng.random_range(0..=length / 4096 + 1) * 4096;
                let len = rng.random_range(1..4u64) * 4096;
                let expected = model.read(i, offset, len);
                out.read += u32::from(expected.is_ok());
                let got = store.read(i, offset, len).await.map(|(d, _)| d.to_vec());
                assert_eq!(got, expected, "{ctx}");
            }
            80..90 => assert_eq!(
                store.free(i, part, epoch).await,
                model.free(i, part, epoch),
                "{ctx}"
            ),
            _ => {
                drop(store);
                store = open(&dev, 0).await;
                out.reopened += 1;
                for (&index, m) in &model.columns {
                    let s = store.status(index).await.unwrap();
                    assert_eq!(
                        (s.state, s.length_bytes),
                        (m.state, m.data.len() as u64),
                        "{ctx} column {index}"
                    );
                    if m.state == ColumnState::Claimed {
                        assert_eq!(
                            (s.partition, s.epoch),
                            (Some(m.owner), m.epoch),
                            "{ctx} column {index}"
                        );
                    }
                }
                let free = model
                    .columns
                    .values()
                    .filter(|c| c.state == ColumnState::Free)
                    .count() as u32;
                assert_eq!(store.free_count(), free, "{ctx}");
            }
        }
    }
}

#[tokio::test]
async fn store_agrees_with_model() {
    let mut out = Outcomes::default();
    for seed in 0..6 {
        run_model(seed, 600, &mut out).await;
    }
    // The random walk must reach every interesting outcome.
    assert!(
        out.appended > 50
            && out.retried > 5
            && out.fenced > 5
            && out.read > 20
            && out.reopened > 20,
        "{out:?}"
    );
}
