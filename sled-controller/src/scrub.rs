//! Background scrubber.
//!
//! A pass walks every claimed column of every healthy device from offset 0
//! to its length (a snapshot taken at the start of the column), verifying
//! each 4 KiB block against its stored CRC-32C in chunks of
//! [`SCRUB_CHUNK_BYTES`]. Before each chunk it takes that many bytes from a
//! token bucket (`proto::rate`, the one QoS and rebuild use too) refilled
//! at `scrub_bytes_per_second` (burst: one second's worth, at least one
//! chunk), so scrubbing never takes more than its share
//! of the device. Bad blocks are logged, counted
//! (`rackblock_sled_scrub_bad_blocks_total`, once per distinct block) and kept
//! in a list for `SledRequest::ScrubReport`. A failed device is skipped;
//! per-column errors end that column's walk for this pass only.
//!
//! **The bad-block list** holds what the scrubber found and what a client
//! read found (a `Read` answered `ChecksumMismatch`, see `service.rs`),
//! deduplicated. It is bounded to [`MAX_REPORTED_BAD_BLOCKS`] entries: at
//! the bound the **oldest** entry is dropped for the new one and counted
//! (`rackblock_sled_scrub_bad_blocks_dropped_total`); a dropped block that
//! is still bad is found again by the next pass. Entries of a column are
//! forgotten when the column is freed or claimed empty, and from an
//! offset on when an append rewrites the column there: the report only
//! names blocks that are still bad. Bad blocks the store found at open
//! (metadata recovery) are added by the first pass only.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::rate::Pacer;
use proto::sled::{BadBlock, ColumnId, ScrubReport};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics::Metrics;
use crate::store::Store;

/// Bytes verified per step.
pub const SCRUB_CHUNK_BYTES: u64 = 1 << 20;
/// Bound on the bad-block list kept for reports.
pub const MAX_REPORTED_BAD_BLOCKS: usize = 4096;

#[derive(Debug, Default)]
struct State {
    passes: u64,
    bytes_verified: u64,
    bad_blocks: VecDeque<BadBlock>,
    /// Every bad block recorded (what `bad_blocks` holds, for dedupe).
    known: BTreeSet<BadBlock>,
}

/// Scrub results and the pass logic; shared by the background task and
/// `scrub_now`.
#[derive(Debug)]
pub struct Scrubber {
    state: Mutex<State>,
    metrics: Arc<Metrics>,
}

impl Scrubber {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            state: Mutex::new(State::default()),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn report(&self) -> ScrubReport {
        let st = self.lock();
        ScrubReport {
            passes: st.passes,
            bytes_verified: st.bytes_verified,
            bad_blocks: st.bad_blocks.iter().cloned().collect(),
        }
    }

    /// Records a bad block (deduplicated); returns whether it was new.
    pub fn record_bad_block(&self, column: ColumnId, offset: u64) -> bool {
        let mut st = self.lock();
        let bad = BadBlock {
            column,
            offset_bytes: offset,
        };
        if !st.known.insert(bad.clone()) {
            return false;
        }
        st.bad_blocks.push_back(bad);
        let mut dropped = 0;
        while st.bad_blocks.len() > MAX_REPORTED_BAD_BLOCKS {
            if let Some(oldest) = st.bad_blocks.pop_front() {
                st.known.remove(&oldest);
                dropped += 1;
            }
        }
        drop(st);
        if dropped > 0 {
            self.metrics.scrub_bad_blocks_dropped.inc_by(dropped);
        }
        warn!(
            device = column.device,
            column = column.index,
            offset,
            "scrub: bad block"
        );
        self.metrics.scrub_bad_blocks.inc();
        true
    }

    /// Forgets the bad blocks of `column` at or after `from_offset` (0: the
    /// whole column): it was freed, claimed empty, or rewritten from there.
    pub fn forget_column(&self, column: ColumnId, from_offset: u64) {
        let mut st = self.lock();
        let stale = |b: &BadBlock| b.column == column && b.offset_bytes >= from_offset;
        if !st.bad_blocks.iter().any(stale) {
            return;
        }
        st.bad_blocks.retain(|b| !stale(b));
        st.known.retain(|b| !stale(b));
    }

    /// One pass over `stores`; throttled by `bucket` if given. Stops early
    /// (without counting the pass) when `cancel` fires.
    pub async fn pass(
        &self,
        stores: &[Arc<Store>],
        mut bucket: Option<&mut Pacer>,
        cancel: &CancellationToken,
    ) {
        let first_pass = self.lock().passes == 0;
        for store in stores {
            for bad in store.recovered_bad_blocks().iter().filter(|_| first_pass) {
                self.record_bad_block(
                    ColumnId {
                        device: store.device_index(),
                        index: bad.column,
                    },
                    bad.offset_bytes,
                );
            }
            if store.is_failed() {
                continue;
            }
            for (index, length) in store.claimed_columns().await {
                let mut offset = 0;
                while offset < length {
                    if cancel.is_cancelled() {
                        return;
                    }
                    let len = SCRUB_CHUNK_BYTES.min(length - offset);
                    if let Some(bucket) = bucket.as_deref_mut() {
                        let wait = bucket.reserve(len, tokio::time::Instant::now());
                        if !wait.is_zero() {
                            tokio::select! {
                                () = tokio::time::sleep(wait) => {}
                                () = cancel.cancelled() => return,
                            }
                        }
                    }
                    match store.verify(index, offset, len).await {
                        Ok(bad) => {
                            for at in bad {
                                self.record_bad_block(
                                    ColumnId {
                                        device: store.device_index(),
                                        index,
                                    },
                                    at,
                                );
                            }
                            self.lock().bytes_verified += len;
                            self.metrics.scrub_bytes_verified.inc_by(len);
                        }
                        Err(error) => {
                            debug!(device = store.device_index(), column = index, %error, "scrub: column skipped");
                            break;
                        }
                    }
                    offset += len;
                }
            }
        }
        self.lock().passes += 1;
        self.metrics.scrub_passes.inc();
    }

    /// Runs passes forever: `bytes_per_second` (0 disables), pausing
    /// `pass_interval` between passes, until `cancel`.
    pub async fn run(
        &self,
        stores: Vec<Arc<Store>>,
        bytes_per_second: u64,
        pass_interval: Duration,
        cancel: CancellationToken,
    ) {
        if bytes_per_second == 0 {
            return;
        }
        let mut bucket = Pacer::new(bytes_per_second, bytes_per_second.max(SCRUB_CHUNK_BYTES));
        while !cancel.is_cancelled() {
            self.pass(&stores, Some(&mut bucket), &cancel).await;
            tokio::select! {
                () = tokio::time::sleep(pass_interval) => {}
                () = cancel.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(index: u32) -> ColumnId {
        ColumnId { device: 0, index }
    }

    #[test]
    fn bad_block_list_drops_the_oldest_at_its_bound_and_forgets_rewritten_columns() {
        let metrics = Arc::new(Metrics::new());
        let scrubber = Scrubber::new(metrics.clone());
        let over = MAX_REPORTED_BAD_BLOCKS as u64 + 10;
        for i in 0..over {
            assert!(scrubber.record_bad_block(col(1), i * 4096));
        }
        // Duplicates are not recorded twice.
        assert!(!scrubber.record_bad_block(col(1), (over - 1) * 4096));
        let report = scrubber.report();
        assert_eq!(report.bad_blocks.len(), MAX_REPORTED_BAD_BLOCKS);
        assert_eq!(
            report.bad_blocks[0].offset_bytes,
            10 * 4096,
            "oldest dropped"
        );
        assert_eq!(metrics.scrub_bad_blocks_dropped.get(), 10);
        // A dropped block found bad again is recorded again.
        assert!(scrubber.record_bad_block(col(1), 0));
        scrubber.record_bad_block(col(2), 4096);
        // Rewritten from offset 8 KiB on: earlier entries stay.
        scrubber.forget_column(col(1), 2 * 4096);
        let left: Vec<_> = scrubber.report().bad_blocks;
        assert!(left
            .iter()
            .all(|b| b.column != col(1) || b.offset_bytes < 2 * 4096));
        assert!(left
            .iter()
            .any(|b| b.column == col(1) && b.offset_bytes == 0));
        // Freed: nothing of column 1 is left, column 2 is untouched.
        scrubber.forget_column(col(1), 0);
        let left = scrubber.report().bad_blocks;
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].column, col(2));
    }

    #[tokio::test]
    async fn pacer_paces_to_rate() {
        let start = tokio::time::Instant::now();
        let mut b = Pacer::new(1 << 20, 1 << 20);
        // The first second's worth is the burst.
        assert_eq!(b.reserve(1 << 20, start), Duration::ZERO);
        // The next MiB has to wait about a second.
        let wait = b.reserve(1 << 20, start);
        assert!((wait.as_secs_f64() - 1.0).abs() < 0.01, "{wait:?}");
        // After 3 seconds the debt is repaid and the bucket is full again.
        assert_eq!(
            b.reserve(1 << 20, start + Duration::from_secs(3)),
            Duration::ZERO
        );
        let mut unlimited = Pacer::new(0, 1);
        assert_eq!(unlimited.reserve(u64::MAX, start), Duration::ZERO);
    }
}
