//! The head node's write log: a circular, checksummed log with group commit.
//!
//! Every write a primary (or secondary) accepts is appended here before it is
//! acknowledged (ARCHITECTURE.md, Write path); the flush to sleds
//! later reclaims the space with [`Wal::release`].
//!
//! ```text
//!  append(records) ──▶ place each record (state mutex, LogFull if no room):
//!                      join the OPEN batch, or start a new one at the head
//!                      └▶ queue of batches ──▶ writer task: take the queue
//!                         (≤ max_batch_bytes), the open batch included,
//!                         ONE durable device write (RWF_DSYNC), or 2 writes
//!                         + ONE flush when the batches cross the end of the
//!                         ring, durable := end ──▶ watch
//!  waiters: acknowledged when durable passes their records
//! ```
//!
//! **Batches.** A record is not written alone: every record placed while
//! the writer is busy joins the *open batch*, which the writer takes (and
//! lays out) on its next round. On the device a batch is one header (one
//! 4 KiB block, more only for very large batches) describing all its
//! records, then their payloads, 4 KiB aligned (format in
//! [`format`](mod@format)). So 32 concurrent 4 KiB writes cost 33 blocks,
//! not 64 as with a header per record (format version 1). A record's
//! position is `batch + i` (its index in the batch, `i <`
//! [`MAX_BATCH_RECORDS`] `<` 4 KiB): positions still grow with log order,
//! and a position rounded down to 4 KiB is its batch. [`Wal::head`] is the
//! open batch's start while it is open, so a hold taken there covers every
//! record appended after it.
//!
//! **Group commit.** The first appender that finds no writer running becomes
//! the leader: it spawns the writer task, which drains the queue batch after
//! batch; every other appender (the followers) only queues and waits. A
//! record is acknowledged only once the device write of its batch is durable
//! (a write with `RWF_DSYNC`, or a flush issued after the write completed).
//! The writer runs on its own task so that a cancelled `append` never
//! abandons a half-done write.
//!
//! **The tail in memory.** The log keeps the payload of every live record
//! in memory: until it is durable always, afterwards while the payloads of
//! durable records stay within [`WalOptions::cache_bytes`] (the oldest are
//! dropped first). [`Wal::read_blocks`], which the flush and the reads of
//! blocks still in the log use, serves them from memory; only a dropped
//! payload is read back from the device (one read of the blocks, checked
//! against the CRCs kept in memory; no header read). With the default
//! budget and a flush that keeps up, the log device is only written.
//!
//! **Fail-stop.** A failed write or flush poisons the log: every queued and
//! later append fails with [`WalError::Failed`] until the log is reopened (after
//! a failed fdatasync the state of the page cache is unknown, and continuing
//! would leave a hole that cuts acknowledged records on recovery). Reopening
//! bumps the *open generation*, which also fences every stale record.
//!
//! **Recovery** ([`Wal::open`]) scans from the superblock's tail (its batch)
//! and stops at the first record or batch that is blank, fails a checksum
//! (its header's, or any payload block's: a batch is accepted whole or not
//! at all, as it was acknowledged only after its one durable write),
//! belongs to another log instance or lap (its stored position is not the
//! expected one), or whose open generation goes backwards. Everything from
//! there on is the cut tail: new batches overwrite it. Records of the
//! tail's batch before the tail were released and are skipped.
//!
//! **Upgrade.** A log written by format version 1 (a header block per
//! record; superblock version 1) is replayed with the version 1 decoder;
//! the open then writes both superblock copies as version 2 with
//! `batches_from_position_bytes` = the end of the replayed records, and
//! appends batches from there. Recovery accepts version 1 records only
//! before that position and batches only from it on, so the two formats
//! never mix. [`legacy`] keeps a version 1 writer for the upgrade tests.
//!
//! **Reclaim.** [`Wal::release`] moves the tail after the records' data
//! reached the sleds; the superblock (two ping-pong copies) is written and
//! flushed *before* the space may be reused, so a crash can never make the
//! recovery scan start at a position that was overwritten. A batch's space
//! is reused once all its records are released.
//!
//! **Bounds.** Records are placed when queued, so queued bytes never exceed
//! the free ring space (`LogFull` is the backpressure); one batch is at most
//! `max_batch_bytes` (or one record) and [`MAX_BATCH_RECORDS`] records; one
//! record at most [`MAX_PAYLOAD_BLOCKS`] payload blocks; payloads in memory
//! at most `cache_bytes` plus the queued ones. Recovery returns the payloads
//! of all live records (the caller rebuilds its index from them) and keeps
//! the newest within the budget. `append` spawns the writer, so it must run
//! inside a tokio runtime.
//!
//! **Superblock loss.** If the newest superblock copy is torn, the previous
//! one is used: only the last `release` is forgotten (its space had not been
//! reused yet), and the records it released are recovered again; the caller
//! replays them idempotently (newest sequence wins in the index).
//!
//! Invariants: `tail <= durable <= written <= head`, `head - (tail rounded
//! down to 4 KiB) <= capacity`; batches are 4 KiB aligned and never wrap;
//! record positions increase; `durable` and `written` are batch boundaries.

pub mod format;
pub mod legacy;
pub mod ring;

use std::collections::hash_map::RandomState;
use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use hardware::{AlignedBuf, DeviceError, SharedDevice};
use thiserror::Error;
use tokio::sync::watch;

pub use format::{FormatError, LogRecord, RecordKind, MAX_PAYLOAD_BLOCKS};
use format::{
    RecordHeader, RecordStamp, Superblock, SuperblockState, RING_OFFSET, SUPERBLOCK_OFFSETS,
};
pub use format::{MAX_BATCH_RECORDS, V1_FORMAT_VERSION};
use proto::BLOCK_SIZE_BYTES;
use ring::Ring;

/// Smallest ring accepted (room for a few maximal records is the caller's
/// business; this only rejects nonsense).
pub const MIN_CAPACITY_BYTES: u64 = 16 * BLOCK_SIZE_BYTES;

/// Logical position of a record: a byte offset that grows forever (the ring
/// offset is `position % capacity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogPosition(pub u64);

/// How to open a log.
#[derive(Debug, Clone)]
pub struct WalOptions {
    /// Ring size when formatting a blank device; `None` uses the whole
    /// device. Ignored for an existing log (its superblock says).
    pub capacity_bytes: Option<u64>,
    /// Upper bound of one group-commit batch (at least one record is always
    /// taken).
    pub max_batch_bytes: usize,
    /// Read-ahead of the recovery scan.
    pub scan_window_bytes: usize,
    /// Payload bytes of durable, unreleased records kept in memory for
    /// reads and the flush ([`DEFAULT_CACHE_BYTES`]); beyond it the oldest
    /// are read back from the device.
    pub cache_bytes: u64,
}

/// Default of [`WalOptions::cache_bytes`]: 256 MiB.
pub const DEFAULT_CACHE_BYTES: u64 = 256 << 20;

impl Default for WalOptions {
    fn default() -> Self {
        Self {
            capacity_bytes: None,
            max_batch_bytes: 4 << 20,
            scan_window_bytes: 1 << 20,
            cache_bytes: DEFAULT_CACHE_BYTES,
        }
    }
}

/// A record found by recovery, in log order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredRecord {
    /// Where it is.
    pub position: LogPosition,
    /// What it says.
    pub record: LogRecord,
}

/// Why the recovery scan stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanStop {
    /// A blank block where the next record would be (clean end).
    Blank {
        /// The position.
        position: u64,
    },
    /// A block that is not the next record (torn, corrupt, stale lap or
    /// generation): the tail from here is cut.
    Cut {
        /// The position.
        position: u64,
        /// Why.
        reason: String,
    },
    /// The scan went once around the ring.
    Full {
        /// The position.
        position: u64,
    },
}

/// Fill level and counters, for flush triggers and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalStats {
    /// Ring size.
    pub capacity_bytes: u64,
    /// Bytes between tail and head (live + queued records, padding included).
    pub used_bytes: u64,
    /// Oldest live position.
    pub tail: u64,
    /// Everything below is durable.
    pub durable: u64,
    /// Next position to assign.
    pub head: u64,
    /// Records appended since open (padding excluded).
    pub appended_records: u64,
    /// Group-commit batches written since open.
    pub batches: u64,
    /// Device flushes issued since open (batches + superblock writes).
    pub flushes: u64,
    /// Payload bytes of durable records held in memory.
    pub cached_bytes: u64,
    /// The budget of `cached_bytes`.
    pub cache_budget_bytes: u64,
    /// Reads (and flush loads) served from memory since open.
    pub cache_hits: u64,
    /// Reads that went to the device since open.
    pub cache_misses: u64,
}

impl WalStats {
    /// `used / capacity` in `[0, 1]`.
    pub fn fill_ratio(&self) -> f64 {
        self.used_bytes as f64 / self.capacity_bytes as f64
    }
}

/// Everything the log can fail with.
#[derive(Debug, Error)]
pub enum WalError {
    /// A device operation failed (open, read, release).
    #[error("log device: {0}")]
    Device(#[from] DeviceError),
    /// An earlier write or flush failed; the log is fail-stopped until reopened.
    #[error("write log failed and is stopped until reopened: {reason}")]
    Failed {
        /// The device error that stopped it.
        reason: String,
    },
    /// No room before the tail: flush to sleds and release, then retry.
    #[error("log full: need {needed_bytes} bytes, {free_bytes} free")]
    LogFull {
        /// Bytes needed.
        needed_bytes: u64,
        /// Bytes free.
        free_bytes: u64,
    },
    /// A record larger than the whole ring.
    #[error("record of {len_bytes} bytes cannot fit a ring of {capacity_bytes}")]
    RecordTooLarge {
        /// Record bytes on the device.
        len_bytes: u64,
        /// Ring size.
        capacity_bytes: u64,
    },
    /// The record breaks a shape rule.
    #[error("invalid record: {0}")]
    InvalidRecord(#[from] FormatError),
    /// Neither superblock copy is valid and the device is not blank; refused.
    #[error("log superblocks corrupt ({first}; {second}); refusing to reformat")]
    SuperblockCorrupt {
        /// Copy A.
        first: FormatError,
        /// Copy B.
        second: FormatError,
    },
    /// The device is too small for the (requested or recorded) ring.
    #[error("log device of {size_bytes} bytes, need {needed_bytes}")]
    TooSmall {
        /// Device size.
        size_bytes: u64,
        /// Needed.
        needed_bytes: u64,
    },
    /// No live record starts at this position.
    #[error("no live record at position {position}")]
    NotFound {
        /// The position.
        position: u64,
    },
    /// A live record failed its checksum on read.
    #[error("record at position {position} is corrupt: {reason}")]
    Corrupt {
        /// The position.
        position: u64,
        /// Why.
        reason: String,
    },
    /// `release` to a position that is not a record boundary in `[tail, durable]`.
    #[error("cannot release to {position}: tail {tail}, durable {durable}, not a record boundary")]
    BadRelease {
        /// Requested.
        position: u64,
        /// Current tail.
        tail: u64,
        /// Durable position.
        durable: u64,
    },
}

impl WalError {
    /// Whether the same call may succeed later without reopening.
    pub fn is_retryable(&self) -> bool {
        matches!(self, WalError::LogFull { .. })
    }
}

/// A batch waiting for the writer. The last one of the queue may still be
/// *open*: appends join it until the writer takes it.
#[derive(Debug)]
struct PendingBatch {
    /// Logical position of the batch (its first header block).
    start: u64,
    /// `Some(len)`: a padding batch filling `len` bytes to the end of the lap.
    padding: Option<u64>,
    /// The records with their block CRCs; record `i` is at position
    /// `start + i`.
    records: Vec<(LogRecord, Arc<[u32]>)>,
    /// Bytes of the records' header entries.
    entries_bytes: u64,
    /// Payload blocks of the records.
    payload_blocks: u64,
}

impl PendingBatch {
    fn len(&self) -> u64 {
        self.padding
            .unwrap_or_else(|| format::batch_len(self.entries_bytes, self.payload_blocks))
    }

    fn end(&self) -> u64 {
        self.start + self.len()
    }
}

/// Layout of the open batch, as [`place`] sees it.
#[derive(Debug, Clone, Copy)]
struct OpenBatch {
    start: u64,
    records: u64,
    entries_bytes: u64,
    payload_blocks: u64,
}

impl OpenBatch {
    fn len(&self) -> u64 {
        format::batch_len(self.entries_bytes, self.payload_blocks)
    }
}

/// Where the next records go: the head and the batch appends may join.
#[derive(Debug, Clone, Copy)]
struct Cursor {
    head: u64,
    open: Option<OpenBatch>,
}

/// How one record is placed.
#[derive(Debug, Clone, Copy)]
enum Placement {
    /// Joins the open batch.
    Join,
    /// Starts a new batch at `start`, after a padding batch `(position, len)`
    /// when the rest of the lap is too short.
    New {
        padding: Option<(u64, u64)>,
        start: u64,
    },
}

/// A live record (or padding batch) in `[tail, head)`.
#[derive(Debug, Clone)]
struct Live {
    /// Its position (`batch + i`; a padding batch: the batch).
    position: u64,
    /// Header fields (payload empty); `None` for padding.
    meta: Option<LogRecord>,
    /// Payload bytes (unpadded).
    payload_len: u64,
    /// CRC-32C of each payload block.
    crcs: Arc<[u32]>,
    /// Logical position of its first payload block on the device, once
    /// the writer laid its batch out.
    payload_at: Option<u64>,
    /// The payload: always until durable, then while the memory budget allows.
    payload: Option<Bytes>,
}

#[derive(Debug, Clone, Default)]
struct Progress {
    durable: u64,
    failed: Option<Arc<str>>,
}

#[derive(Debug)]
struct State {
    /// End of the last reserved batch.
    head: u64,
    /// Position of the oldest live record (its batch starts at `tail`
    /// rounded down to 4 KiB: [`space_tail`]).
    tail: u64,
    written: u64,
    durable: u64,
    queue: VecDeque<PendingBatch>,
    /// The last batch of `queue` accepts more records.
    open: Option<OpenBatch>,
    writer_running: bool,
    failed: Option<Arc<str>>,
    /// Live records (and padding batches) in `[tail, head)`, by position.
    live: VecDeque<Live>,
    /// Durable records at or after this position keep their payload in
    /// memory (the oldest are dropped first, so they are a suffix).
    cache_from: u64,
    /// Payload bytes of durable records held in memory.
    cached_bytes: u64,
}

/// The ring space of a tail: its batch.
fn space_tail(tail: u64) -> u64 {
    tail / BLOCK_SIZE_BYTES * BLOCK_SIZE_BYTES
}

#[derive(Debug)]
struct Shared {
    device: SharedDevice,
    ring: Ring,
    log_id: u64,
    open_generation: u64,
    max_batch_bytes: u64,
    cache_budget_bytes: u64,
    recovery_stop: ScanStop,
    state: Mutex<State>,
    progress: watch::Sender<Progress>,
    /// Serialises superblock writes; holds the last written superblock.
    superblock: tokio::sync::Mutex<Superblock>,
    appended_records: AtomicU64,
    batches: AtomicU64,
    flushes: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
}

/// The write log. Cheap to clone; all clones share one log.
#[derive(Debug, Clone)]
pub struct Wal {
    shared: Arc<Shared>,
}

impl Wal {
    /// Opens (formatting a blank device) and recovers the log. Returns every
    /// record from the tail up to the cut, in log order. A version 1 log is
    /// replayed, then continued in version 2 (module docs, *Upgrade*).
    pub async fn open(
        device: SharedDevice,
        options: WalOptions,
    ) -> Result<(Wal, Vec<RecoveredRecord>), WalError> {
        let size_bytes = device.info().size_bytes;
        let needed = RING_OFFSET + MIN_CAPACITY_BYTES;
        if size_bytes < needed {
            return Err(WalError::TooSmall {
                size_bytes,
                needed_bytes: needed,
            });
        }
        let copies = device
            .read_at(SUPERBLOCK_OFFSETS[0], 2 * BLOCK_SIZE_BYTES as usize)
            .await?;
        let previous = match format::choose_superblock([
            &copies[..BLOCK_SIZE_BYTES as usize],
            &copies[BLOCK_SIZE_BYTES as usize..],
        ]) {
            SuperblockState::Valid(superblock) => superblock,
            SuperblockState::Corrupt { first, second } => {
                return Err(WalError::SuperblockCorrupt { first, second })
            }
            SuperblockState::Blank => {
                let ring_bytes = size_bytes - RING_OFFSET;
                let capacity_bytes = options.capacity_bytes.unwrap_or(ring_bytes).min(ring_bytes)
                    / BLOCK_SIZE_BYTES
                    * BLOCK_SIZE_BYTES;
                if capacity_bytes < MIN_CAPACITY_BYTES {
                    return Err(WalError::TooSmall {
                        size_bytes,
                        needed_bytes: needed,
                    });
                }
                let superblock = Superblock {
                    version: format::FORMAT_VERSION,
                    log_id: RandomState::new().hash_one(device.info().path.as_os_str()),
                    generation: 0,
                    capacity_bytes,
                    tail_position_bytes: 0,
                    head_position_hint_bytes: 0,
                    open_generation: 0,
                    batches_from_position_bytes: 0,
                };
                tracing::info!(path = %device.info().path.display(), capacity_bytes, "formatting write log");
                write_superblock(&device, &superblock).await?;
                superblock
            }
        };
        let capacity_bytes = previous.capacity_bytes;
        if RING_OFFSET + capacity_bytes > size_bytes || capacity_bytes < MIN_CAPACITY_BYTES {
            return Err(WalError::TooSmall {
                size_bytes,
                needed_bytes: RING_OFFSET + capacity_bytes,
            });
        }
        let ring = Ring::new(capacity_bytes);
        let scan = scan(&device, ring, &previous, options.scan_window_bytes).await?;
        match &scan.stop {
            ScanStop::Cut { position, reason } => {
                tracing::warn!(position, reason, "write log tail cut during recovery")
            }
            stop => tracing::debug!(?stop, records = scan.records.len(), "write log recovered"),
        }
        // Persist the new open generation before any append can stamp it. It
        // is above every generation seen, even if an older superblock copy
        // had to be used, so stale records stay fenced.
        let upgrade = previous.version == format::V1_FORMAT_VERSION;
        let mut current = Superblock {
            version: format::FORMAT_VERSION,
            generation: previous.generation + 1,
            open_generation: scan.max_generation + 1,
            head_position_hint_bytes: scan.head,
            batches_from_position_bytes: if upgrade {
                scan.head
            } else {
                previous.batches_from_position_bytes
            },
            ..previous
        };
        write_superblock(&device, &current).await?;
        if upgrade {
            // Both copies in version 2: a fallback to the other copy must
            // not forget where the batches start (and an older release
            // refuses the log instead of misreading it).
            tracing::info!(path = %device.info().path.display(), batches_from = scan.head, "write log upgraded to format version 2");
            current.generation += 1;
            write_superblock(&device, &current).await?;
        }
        let mut live: VecDeque<Live> = VecDeque::with_capacity(scan.live.len());
        live.extend(scan.live);
        let mut state = State {
            head: scan.head,
            tail: previous.tail_position_bytes,
            written: scan.head,
            durable: scan.head,
            queue: VecDeque::new(),
            open: None,
            writer_running: false,
            failed: None,
            cached_bytes: live
                .iter()
                .filter(|l| l.payload.is_some())
                .map(|l| l.payload_len)
                .sum(),
            live,
            cache_from: previous.tail_position_bytes,
        };
        let budget = options.cache_bytes;
        state.evict(budget);
        let (progress, _) = watch::channel(Progress {
            durable: scan.head,
            failed: None,
        });
        let wal = Wal {
            shared: Arc::new(Shared {
                device,
                ring,
                log_id: current.log_id,
                open_generation: current.open_generation,
                max_batch_bytes: options.max_batch_bytes.max(BLOCK_SIZE_BYTES as usize) as u64,
                cache_budget_bytes: budget,
                recovery_stop: scan.stop,
                state: Mutex::new(state),
                progress,
                superblock: tokio::sync::Mutex::new(current),
                appended_records: AtomicU64::new(0),
                batches: AtomicU64::new(0),
                flushes: AtomicU64::new(if upgrade { 2 } else { 1 }),
                cache_hits: AtomicU64::new(0),
                cache_misses: AtomicU64::new(0),
            }),
        };
        Ok((wal, scan.records))
    }

    /// Appends `records` (atomically reserved, in order, at increasing
    /// positions) and returns their positions once all are durable.
    /// Concurrent calls share batches: one header and one durable device
    /// write.
    pub async fn append(&self, records: Vec<LogRecord>) -> Result<Vec<LogPosition>, WalError> {
        let capacity_bytes = self.shared.ring.capacity_bytes();
        for record in &records {
            record.validate()?;
            let len_bytes =
                format::batch_len(format::entry_bytes(record), record.payload_blocks() as u64);
            if len_bytes > capacity_bytes {
                return Err(WalError::RecordTooLarge {
                    len_bytes,
                    capacity_bytes,
                });
            }
        }
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let count = records.len() as u64;
        // CRCs outside the state mutex (once per record: the header and
        // reads back from the device use them).
        let all_crcs: Vec<Arc<[u32]>> = records
            .iter()
            .map(|r| Arc::from(format::block_crcs(&r.payload)))
            .collect();
        let (positions, spawn) = {
            let mut state = self.shared.lock();
            if let Some(reason) = &state.failed {
                return Err(WalError::Failed {
                    reason: reason.to_string(),
                });
            }
            // Place everything first so that a LogFull leaves no trace.
            let mut cursor = Cursor {
                head: state.head,
                open: state.open,
            };
            let tail = space_tail(state.tail);
            let mut planned = Vec::with_capacity(records.len());
            for record in &records {
                let placed = place(
                    self.shared.ring,
                    self.shared.max_batch_bytes,
                    tail,
                    &mut cursor,
                    record,
                )
                .map_err(|full| WalError::LogFull {
                    needed_bytes: full.needed_bytes + (cursor.head - state.head),
                    free_bytes: full.free_bytes + (cursor.head - state.head),
                })?;
                planned.push(placed);
            }
            let mut positions = Vec::with_capacity(records.len());
            for ((record, crcs), (placement, position)) in
                records.into_iter().zip(all_crcs).zip(planned)
            {
                match placement {
                    Placement::Join => {}
                    Placement::New { padding, start } => {
                        if let Some((at, len)) = padding {
                            state.live.push_back(Live {
                                position: at,
                                meta: None,
                                payload_len: 0,
                                crcs: Arc::from(Vec::new()),
                                payload_at: None,
                                payload: None,
                            });
                            state.queue.push_back(PendingBatch {
                                start: at,
                                padding: Some(len),
                                records: Vec::new(),
                                entries_bytes: 0,
                                payload_blocks: 0,
                            });
                        }
                        state.queue.push_back(PendingBatch {
                            start,
                            padding: None,
                            records: Vec::new(),
                            entries_bytes: 0,
                            payload_blocks: 0,
                        });
                    }
                }
                let Some(batch) = state.queue.back_mut() else {
                    unreachable!("a placed record has a batch");
                };
                debug_assert_eq!(position, batch.start + batch.records.len() as u64);
                batch.entries_bytes += format::entry_bytes(&record);
                batch.payload_blocks += record.payload_blocks() as u64;
                let payload = record.payload.clone();
                let live = Live {
                    position,
                    payload_len: payload.len() as u64,
                    crcs: crcs.clone(),
                    meta: Some(LogRecord {
                        payload: Bytes::new(),
                        ..record.clone()
                    }),
                    payload_at: None,
                    payload: Some(payload),
                };
                batch.records.push((record, crcs));
                state.live.push_back(live);
                positions.push(LogPosition(position));
            }
            state.head = cursor.head;
            state.open = cursor.open;
            let spawn = !state.writer_running;
            state.writer_running = true;
            (positions, spawn)
        };
        self.shared
            .appended_records
            .fetch_add(count, Ordering::Relaxed);
        if spawn {
            tokio::spawn(run_writer(self.shared.clone()));
        }
        // Durable positions are batch boundaries: past the last record's
        // position means past the end of its batch.
        let last = positions.last().map_or(0, |p| p.0);
        let mut progress = self.shared.progress.subscribe();
        let outcome = progress
            .wait_for(|p| p.durable > last || p.failed.is_some())
            .await
            .map(|p| p.clone());
        match outcome {
            Ok(p) if p.durable > last => Ok(positions),
            Ok(p) => Err(WalError::Failed {
                reason: p.failed.as_deref().unwrap_or("unknown").to_string(),
            }),
            // The sender lives in `shared`, which we hold.
            Err(_) => Err(WalError::Failed {
                reason: "log closed".to_string(),
            }),
        }
    }

    /// Appends one record; see [`append`](Self::append).
    pub async fn append_one(&self, record: LogRecord) -> Result<LogPosition, WalError> {
        let positions = self.append(vec![record]).await?;
        positions
            .first()
            .copied()
            .ok_or(WalError::NotFound { position: 0 })
    }

    /// Reads the live record at `position` (from memory, or the device
    /// when its payload was dropped from memory), checking every checksum.
    pub async fn read(&self, position: LogPosition) -> Result<LogRecord, WalError> {
        let (meta, payload) = self.read_raw(position, None).await?;
        Ok(LogRecord { payload, ..meta })
    }

    /// Reads `count` payload blocks starting at payload block `first` of the
    /// record at `position`: from memory when the log still holds its
    /// payload (the common case: the unflushed tail, up to
    /// [`WalOptions::cache_bytes`]), else one device read checked against
    /// the blocks' CRCs.
    pub async fn read_blocks(
        &self,
        position: LogPosition,
        first: u32,
        count: u32,
    ) -> Result<Bytes, WalError> {
        let (_, payload) = self.read_raw(position, Some((first, count))).await?;
        Ok(payload)
    }

    async fn read_raw(
        &self,
        position: LogPosition,
        range: Option<(u32, u32)>,
    ) -> Result<(LogRecord, Bytes), WalError> {
        let position = position.0;
        let not_found = || WalError::NotFound { position };
        let (meta, crcs, payload_len, from_device) = {
            let state = self.shared.lock();
            let live = state.find(position).ok_or_else(not_found)?;
            let meta = live.meta.clone().ok_or_else(not_found)?;
            let blocks = live.crcs.len();
            let (first, count) = match range {
                None => (0, blocks),
                Some((first, count)) => {
                    let end = (first as usize).checked_add(count as usize);
                    if count == 0 || end.is_none_or(|end| end > blocks) {
                        return Err(not_found());
                    }
                    (first as usize, count as usize)
                }
            };
            if let Some(payload) = &live.payload {
                self.shared.cache_hits.fetch_add(1, Ordering::Relaxed);
                let payload = match range {
                    None => payload.clone(),
                    Some(_) => payload.slice(
                        first * BLOCK_SIZE_BYTES as usize
                            ..(first + count) * BLOCK_SIZE_BYTES as usize,
                    ),
                };
                return Ok((meta, payload));
            }
            let Some(payload_at) = live.payload_at else {
                unreachable!("a record without its payload in memory is on the device");
            };
            (
                meta,
                live.crcs.clone(),
                live.payload_len,
                (payload_at, first, count),
            )
        };
        self.shared.cache_misses.fetch_add(1, Ordering::Relaxed);
        let (payload_at, first, count) = from_device;
        if count == 0 {
            return Ok((meta, Bytes::new()));
        }
        let data = self
            .shared
            .device
            .read_at(
                RING_OFFSET + self.shared.ring.offset(payload_at) + BLOCK_SIZE_BYTES * first as u64,
                count * BLOCK_SIZE_BYTES as usize,
            )
            .await?;
        for (i, chunk) in data.chunks(BLOCK_SIZE_BYTES as usize).enumerate() {
            if crc32c::crc32c(chunk) != crcs[first + i] {
                // Released and overwritten since the lookup: moved on.
                if self.shared.lock().find(position).is_none() {
                    return Err(not_found());
                }
                return Err(WalError::Corrupt {
                    position,
                    reason: format!("payload block {} fails its CRC", first + i),
                });
            }
        }
        let mut data = data.into_bytes();
        if range.is_none() {
            data.truncate(payload_len as usize);
        }
        Ok((meta, data))
    }

    /// Frees every record before `up_to` (a record position in
    /// `[tail, durable]`, or the head): the superblock is written and
    /// flushed first, then the space becomes reusable. A batch's space is
    /// reused only once all its records are released.
    pub async fn release(&self, up_to: LogPosition) -> Result<(), WalError> {
        let up_to = up_to.0;
        let mut superblock = self.shared.superblock.lock().await;
        let head_hint = {
            let state = self.shared.lock();
            if let Some(reason) = &state.failed {
                return Err(WalError::Failed {
                    reason: reason.to_string(),
                });
            }
            let boundary = up_to == state.head || state.find(up_to).is_some();
            if up_to < state.tail || up_to > state.durable || !boundary {
                return Err(WalError::BadRelease {
                    position: up_to,
                    tail: state.tail,
                    durable: state.durable,
                });
            }
            if up_to == state.tail {
                return Ok(());
            }
            state.durable
        };
        let next = Superblock {
            generation: superblock.generation + 1,
            tail_position_bytes: up_to,
            head_position_hint_bytes: head_hint,
            ..*superblock
        };
        if let Err(error) = write_superblock(&self.shared.device, &next).await {
            self.shared.fail(&error);
            return Err(error.into());
        }
        self.shared.flushes.fetch_add(1, Ordering::Relaxed);
        *superblock = next;
        let mut state = self.shared.lock();
        // Releases are serialised by the superblock lock and `durable` only
        // grows, so the checks made before the superblock write still hold:
        // the tail moves forward only, and never past durable records (a
        // recovery would scan from a tail nothing was written at).
        assert!(
            state.tail <= up_to && up_to <= state.durable,
            "release to {up_to} outside [tail {}, durable {}]",
            state.tail,
            state.durable
        );
        state.tail = up_to;
        while state.live.front().is_some_and(|l| l.position < up_to) {
            if let Some(gone) = state.live.pop_front() {
                if gone.payload.is_some() && gone.position < state.durable {
                    state.cached_bytes -= gone.payload_len;
                }
            }
        }
        state.cache_from = state.cache_from.max(up_to);
        // The new tail is a record boundary (the first live record, or the
        // head when the log is empty): recovery starts scanning there.
        assert!(
            state
                .live
                .front()
                .map_or(up_to == state.head, |l| l.position == up_to),
            "released to {up_to}, which is not where the next record ({:?}) starts",
            state.live.front().map(|l| l.position)
        );
        state.assert_positions(self.shared.ring.capacity_bytes());
        Ok(())
    }

    /// Fill level and counters.
    pub fn stats(&self) -> WalStats {
        let state = self.shared.lock();
        WalStats {
            capacity_bytes: self.shared.ring.capacity_bytes(),
            used_bytes: state.head - space_tail(state.tail),
            tail: state.tail,
            durable: state.durable,
            head: state.head,
            appended_records: self.shared.appended_records.load(Ordering::Relaxed),
            batches: self.shared.batches.load(Ordering::Relaxed),
            flushes: self.shared.flushes.load(Ordering::Relaxed),
            cached_bytes: state.cached_bytes,
            cache_budget_bytes: self.shared.cache_budget_bytes,
            cache_hits: self.shared.cache_hits.load(Ordering::Relaxed),
            cache_misses: self.shared.cache_misses.load(Ordering::Relaxed),
        }
    }

    /// Why the log fail-stopped (the device error of the write, flush or
    /// superblock update that failed, a deadline included when the device is
    /// a `TimedDevice`), or `None` while it works.
    pub fn failure(&self) -> Option<String> {
        self.shared.lock().failed.as_deref().map(str::to_string)
    }

    /// Resolves once the log fail-stopped, with the reason (see
    /// [`failure`](Self::failure)); pending forever while it works.
    pub async fn failed(&self) -> String {
        let mut progress = self.shared.progress.subscribe();
        let outcome = progress
            .wait_for(|p| p.failed.is_some())
            .await
            .map(|p| p.failed.as_deref().unwrap_or("unknown").to_string());
        // The sender lives in `shared`, which we hold.
        outcome.unwrap_or_else(|_| "log closed".to_string())
    }

    /// The path of the log's device.
    pub fn path(&self) -> &std::path::Path {
        &self.shared.device.info().path
    }

    /// Where and why the recovery scan of [`open`](Self::open) stopped.
    pub fn recovery_stop(&self) -> &ScanStop {
        &self.shared.recovery_stop
    }

    /// A lower bound of the position the next record will get (a hold
    /// taken here protects it): the open batch's start while appends may
    /// still join it (its records are `start + i`), else the head. It is a
    /// record position or the head, so a valid [`release`](Self::release)
    /// point.
    pub fn head(&self) -> LogPosition {
        let state = self.shared.lock();
        LogPosition(state.open.map_or(state.head, |open| open.start))
    }

    /// Oldest live position.
    pub fn tail(&self) -> LogPosition {
        LogPosition(self.shared.lock().tail)
    }
}

/// Places `record` at the cursor: in the open batch if it still fits there
/// (record count, `max_batch_bytes`, the rest of the lap, free space), else
/// in a new batch (after a padding batch if the lap is too short).
fn place(
    ring: Ring,
    max_batch_bytes: u64,
    tail: u64,
    cursor: &mut Cursor,
    record: &LogRecord,
) -> Result<(Placement, u64), ring::Full> {
    let entries_bytes = format::entry_bytes(record);
    let payload_blocks = record.payload_blocks() as u64;
    if let Some(open) = cursor.open {
        let grown = OpenBatch {
            records: open.records + 1,
            entries_bytes: open.entries_bytes + entries_bytes,
            payload_blocks: open.payload_blocks + payload_blocks,
            ..open
        };
        let len = grown.len();
        if grown.records <= format::MAX_BATCH_RECORDS as u64
            && len <= max_batch_bytes
            && ring.offset(open.start) + len <= ring.capacity_bytes()
            && open.start + len - tail <= ring.capacity_bytes()
        {
            cursor.open = Some(grown);
            cursor.head = open.start + len;
            return Ok((Placement::Join, open.start + open.records));
        }
    }
    let batch = OpenBatch {
        start: 0,
        records: 1,
        entries_bytes,
        payload_blocks,
    };
    let reservation = ring.reserve(cursor.head, tail, batch.len())?;
    cursor.open = Some(OpenBatch {
        start: reservation.position,
        ..batch
    });
    cursor.head = reservation.end;
    Ok((
        Placement::New {
            padding: reservation
                .padding
                .map(|(at, skip)| (at, skip + BLOCK_SIZE_BYTES)),
            start: reservation.position,
        },
        reservation.position,
    ))
}

impl State {
    /// `tail <= durable <= written <= head` and `head - tail <= capacity`
    /// (the module's invariants): a tail past durable records would let a
    /// recovery skip acknowledged writes, and more than a ring of live
    /// bytes would mean a record overwrote one that was never released.
    fn assert_positions(&self, capacity_bytes: u64) {
        assert!(
            self.tail <= self.durable
                && self.durable <= self.written
                && self.written <= self.head
                && self.head - space_tail(self.tail) <= capacity_bytes,
            "log positions out of order: tail {}, durable {}, written {}, head {}, capacity {capacity_bytes}",
            self.tail,
            self.durable,
            self.written,
            self.head
        );
    }

    fn index_of(&self, position: u64) -> Result<usize, usize> {
        self.live.binary_search_by_key(&position, |l| l.position)
    }

    fn find(&self, position: u64) -> Option<&Live> {
        self.index_of(position).ok().and_then(|i| self.live.get(i))
    }

    /// Drops the oldest durable payloads from memory until at most
    /// `budget` bytes are held.
    fn evict(&mut self, budget: u64) {
        if self.cached_bytes <= budget {
            return;
        }
        let from = self.index_of(self.cache_from).unwrap_or_else(|i| i);
        let durable = self.durable;
        let mut cached_bytes = self.cached_bytes;
        let mut cache_from = self.cache_from;
        // Bounded by the live records.
        for live in self.live.range_mut(from..) {
            if cached_bytes <= budget || live.position >= durable {
                break;
            }
            if live.payload.take().is_some() {
                cached_bytes -= live.payload_len;
            }
            cache_from = live.position + 1;
        }
        self.cached_bytes = cached_bytes;
        self.cache_from = cache_from;
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain data, consistent between statements.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn fail(&self, error: &DeviceError) {
        let reason: Arc<str> = Arc::from(error.to_string());
        tracing::error!(%reason, "write log failed; stopping until reopened");
        let mut state = self.lock();
        state.failed = Some(reason.clone());
        state.queue.clear();
        state.open = None;
        // Never acknowledged, and maybe never on the device: not readable.
        let durable = state.durable;
        while state.live.back().is_some_and(|l| l.position >= durable) {
            state.live.pop_back();
        }
        state.writer_running = false;
        let durable = state.durable;
        drop(state);
        self.progress.send_replace(Progress {
            durable,
            failed: Some(reason),
        });
    }
}

async fn write_superblock(
    device: &SharedDevice,
    superblock: &Superblock,
) -> Result<(), DeviceError> {
    let buf = AlignedBuf::from_slice(&superblock.encode())?;
    device
        .write_at(SUPERBLOCK_OFFSETS[superblock.slot()], buf)
        .await?;
    device.flush().await
}

/// The group-commit writer: drains the queue, taking the open batch too
/// (appends arriving meanwhile start the next one), one durable write per
/// round, until it is empty (then the next appender spawns a new writer).
async fn run_writer(shared: Arc<Shared>) {
    // Bounded: each iteration writes at least one queued batch or returns.
    loop {
        let batches = {
            let mut state = shared.lock();
            if state.failed.is_some() || state.queue.is_empty() {
                state.writer_running = false;
                return;
            }
            let mut batches = Vec::new();
            let mut bytes = 0u64;
            while let Some(next) = state.queue.front() {
                if !batches.is_empty() && bytes + next.len() > shared.max_batch_bytes {
                    break;
                }
                bytes += next.len();
                if let Some(next) = state.queue.pop_front() {
                    batches.push(next);
                }
            }
            if state.queue.is_empty() {
                state.open = None;
            }
            // The layout is final now: say where each payload lands.
            for batch in &batches {
                let header = format::batch_header_blocks(batch.entries_bytes) * BLOCK_SIZE_BYTES;
                let mut at = batch.start + header;
                for (i, (record, _)) in batch.records.iter().enumerate() {
                    if let Ok(index) = state.index_of(batch.start + i as u64) {
                        state.live[index].payload_at = Some(at);
                    }
                    at += record.payload_blocks() as u64 * BLOCK_SIZE_BYTES;
                }
            }
            batches
        };
        match write_batches(&shared, &batches).await {
            Ok(end) => {
                shared.batches.fetch_add(1, Ordering::Relaxed);
                let mut state = shared.lock();
                debug_assert!(end <= state.head && end > state.durable);
                let from = state.index_of(state.durable).unwrap_or_else(|i| i);
                let newly: u64 = state
                    .live
                    .range(from..)
                    .take_while(|l| l.position < end)
                    .filter(|l| l.payload.is_some())
                    .map(|l| l.payload_len)
                    .sum();
                state.durable = end;
                state.cached_bytes += newly;
                state.evict(shared.cache_budget_bytes);
                state.assert_positions(shared.ring.capacity_bytes());
                drop(state);
                shared.progress.send_modify(|p| p.durable = end);
            }
            Err(error) => {
                shared.fail(&error);
                return;
            }
        }
    }
}

/// Writes batches (contiguous positions) as one device write per lap they
/// touch and makes them durable: batches in one segment (the usual case)
/// are one durable write ([`BlockDevice::write_durable_at`], `RWF_DSYNC` on
/// io_uring); batches that wrap are two writes and one flush. Returns the
/// end position.
///
/// [`BlockDevice::write_durable_at`]: hardware::BlockDevice::write_durable_at
async fn write_batches(shared: &Shared, batches: &[PendingBatch]) -> Result<u64, DeviceError> {
    let ring = shared.ring;
    let mut segments: Vec<Segment<'_>> = Vec::with_capacity(2);
    let mut segment_start = None;
    let mut items: Vec<&PendingBatch> = Vec::new();
    let mut end = 0;
    for (i, batch) in batches.iter().enumerate() {
        debug_assert!(i == 0 || batch.start == end, "batches not contiguous");
        segment_start.get_or_insert(batch.start);
        items.push(batch);
        end = batch.end();
        let closes_lap = ring.offset(end) == 0;
        if closes_lap || i + 1 == batches.len() {
            let start = segment_start.take().unwrap_or(batch.start);
            segments.push(Segment {
                start_position_bytes: start,
                len_bytes: end - start,
                batches: std::mem::take(&mut items),
            });
        }
    }
    if let [segment] = segments.as_slice() {
        let buf = encode_segment(shared, segment)?;
        shared
            .device
            .write_durable_at(RING_OFFSET + ring.offset(segment.start_position_bytes), buf)
            .await?;
    } else {
        for segment in &segments {
            let buf = encode_segment(shared, segment)?;
            shared
                .device
                .write_at(RING_OFFSET + ring.offset(segment.start_position_bytes), buf)
                .await?;
        }
        shared.device.flush().await?;
    }
    shared.lock().written = end;
    shared.flushes.fetch_add(1, Ordering::Relaxed);
    Ok(end)
}

/// The part of a write that lies in one lap of the ring: one device write.
struct Segment<'a> {
    /// Logical position of the first batch.
    start_position_bytes: u64,
    /// Bytes from there to the end of the last batch.
    len_bytes: u64,
    /// The batches, contiguous.
    batches: Vec<&'a PendingBatch>,
}

fn encode_segment(shared: &Shared, segment: &Segment<'_>) -> Result<AlignedBuf, DeviceError> {
    let mut buf = AlignedBuf::zeroed(segment.len_bytes as usize)?;
    for batch in &segment.batches {
        let at = (batch.start - segment.start_position_bytes) as usize;
        let stamp = RecordStamp {
            log_id: shared.log_id,
            position_bytes: batch.start,
            lap: shared.ring.lap(batch.start),
            open_generation: shared.open_generation,
        };
        let len = batch.len() as usize;
        match batch.padding {
            Some(_) => format::encode_padding_batch(stamp, batch.len(), &mut buf[at..at + len]),
            None => {
                let records: Vec<(&LogRecord, &[u32])> =
                    batch.records.iter().map(|(r, c)| (r, &c[..])).collect();
                format::encode_batch(stamp, &records, &mut buf[at..at + len]);
            }
        }
    }
    Ok(buf)
}

struct Scan {
    records: Vec<RecoveredRecord>,
    live: Vec<Live>,
    head: u64,
    stop: ScanStop,
    /// Highest open generation in the superblock or any header of this log
    /// the scan decoded (the cut one included).
    max_generation: u64,
}

/// Read-ahead window over the ring for the recovery scan.
struct Window<'a> {
    device: &'a SharedDevice,
    ring: Ring,
    window_bytes: u64,
    start: u64,
    buf: Option<AlignedBuf>,
}

impl Window<'_> {
    /// Bytes `[offset, offset + len)` of the ring (never across its end).
    async fn get(&mut self, offset: u64, len: u64) -> Result<&[u8], DeviceError> {
        debug_assert!(offset + len <= self.ring.capacity_bytes());
        let cached = self
            .buf
            .as_ref()
            .is_some_and(|b| offset >= self.start && offset + len <= self.start + b.len() as u64);
        if !cached {
            let read_len = len
                .max(self.window_bytes)
                .min(self.ring.capacity_bytes() - offset);
            let buf = self
                .device
                .read_at(RING_OFFSET + offset, read_len as usize)
                .await?;
            self.start = offset;
            self.buf = Some(buf);
        }
        let from = (offset - self.start) as usize;
        Ok(self
            .buf
            .as_ref()
            .map_or(&[][..], |b| &b[from..from + len as usize]))
    }
}

/// What the scan found at one position.
struct Found {
    stamp: RecordStamp,
    /// Ring bytes of the record (version 1) or batch (version 2).
    len: u64,
    /// A padding record or batch.
    padding: bool,
    /// `(position, record, payload position)` of each record.
    records: Vec<(u64, LogRecord, u64)>,
}

/// Decodes the version 1 record or version 2 batch at `position`, payload
/// CRCs included; `Err(stop)` where the scan ends. Which format is allowed
/// depends on `position` against the superblock's
/// `batches_from_position_bytes`.
async fn decode_at(
    window: &mut Window<'_>,
    ring: Ring,
    superblock: &Superblock,
    position: u64,
) -> Result<Result<Found, ScanStop>, DeviceError> {
    let cut = |reason: String| ScanStop::Cut { position, reason };
    let capacity = ring.capacity_bytes();
    let offset = ring.offset(position);
    let first = window.get(offset, BLOCK_SIZE_BYTES).await?;
    let batches = position >= superblock.batches_from_position_bytes;
    match format::classify(first) {
        format::BlockKind::Blank => Ok(Err(ScanStop::Blank { position })),
        format::BlockKind::Other { magic } => Ok(Err(cut(format!("bad magic {magic:#x}")))),
        format::BlockKind::Record if batches => Ok(Err(cut(
            "version 1 record where the log holds batches".to_string(),
        ))),
        format::BlockKind::Batch { .. } if !batches => Ok(Err(cut(
            "batch where the log holds version 1 records".to_string(),
        ))),
        format::BlockKind::Record => {
            let header = match format::decode_header(first) {
                Ok(header) => header,
                Err(error) => return Ok(Err(cut(error.to_string()))),
            };
            let len = header.encoded_len();
            if offset + len > capacity {
                return Ok(Err(cut(format!("record of {len} bytes overruns the ring"))));
            }
            let padding = header.kind == RecordKind::Padding;
            let mut records = Vec::new();
            if !padding {
                let payload_len = len - BLOCK_SIZE_BYTES;
                let payload = if payload_len == 0 {
                    Bytes::new()
                } else {
                    let payload = window.get(offset + BLOCK_SIZE_BYTES, payload_len).await?;
                    if let Some(bad) = format::first_bad_block(&header, payload) {
                        return Ok(Err(cut(format!("payload block {bad} fails its CRC"))));
                    }
                    Bytes::copy_from_slice(&payload[..header.payload_len_bytes as usize])
                };
                records.push((
                    position,
                    record_from(&header, payload),
                    position + BLOCK_SIZE_BYTES,
                ));
            }
            Ok(Ok(Found {
                stamp: header.stamp,
                len,
                padding,
                records,
            }))
        }
        format::BlockKind::Batch { header_blocks } => {
            let header_len = header_blocks.saturating_mul(BLOCK_SIZE_BYTES);
            if header_blocks == 0 || offset + header_len > capacity {
                return Ok(Err(cut(format!("batch of {header_blocks} header blocks"))));
            }
            let header = match format::decode_batch_header(window.get(offset, header_len).await?) {
                Ok(header) => header,
                Err(error) => return Ok(Err(cut(error.to_string()))),
            };
            let len = header.len_bytes;
            if offset + len > capacity {
                return Ok(Err(cut(format!("batch of {len} bytes overruns the ring"))));
            }
            let mut records = Vec::with_capacity(header.entries.len());
            if !header.padding {
                let payloads = window.get(offset + header_len, len - header_len).await?;
                // All or nothing: the batch was one write, acknowledged
                // only once all of it was durable.
                if let Some((entry, block)) = format::first_bad_entry(&header, payloads) {
                    return Ok(Err(cut(format!(
                        "record {entry} payload block {block} fails its CRC"
                    ))));
                }
                for (i, (entry, at)) in header
                    .entries
                    .iter()
                    .zip(header.payload_offsets())
                    .enumerate()
                {
                    let from = (at - header_len) as usize;
                    let payload = Bytes::copy_from_slice(
                        &payloads[from..from + entry.payload_len_bytes as usize],
                    );
                    records.push((position + i as u64, entry.record(payload), position + at));
                }
            }
            Ok(Ok(Found {
                stamp: header.stamp,
                len,
                padding: header.padding,
                records,
            }))
        }
    }
}

async fn scan(
    device: &SharedDevice,
    ring: Ring,
    superblock: &Superblock,
    window_bytes: usize,
) -> Result<Scan, DeviceError> {
    let tail = superblock.tail_position_bytes;
    let start = space_tail(tail);
    let capacity = ring.capacity_bytes();
    let mut window = Window {
        device,
        ring,
        window_bytes: (window_bytes.max(BLOCK_SIZE_BYTES as usize) / BLOCK_SIZE_BYTES as usize
            * BLOCK_SIZE_BYTES as usize) as u64,
        start: 0,
        buf: None,
    };
    let mut records = Vec::new();
    let mut live = Vec::new();
    let mut position = start;
    let mut last_generation = 0;
    let mut max_generation = superblock.open_generation;
    let cut = |position: u64, reason: String| ScanStop::Cut { position, reason };
    // Bounded: every iteration advances by at least one block or stops.
    let stop = loop {
        if position - start >= capacity {
            break ScanStop::Full { position };
        }
        let found = match decode_at(&mut window, ring, superblock, position).await? {
            Ok(found) => found,
            Err(stop) => break stop,
        };
        let stamp = found.stamp;
        if stamp.log_id != superblock.log_id {
            break cut(
                position,
                format!("record of another log {:#x}", stamp.log_id),
            );
        }
        max_generation = max_generation.max(stamp.open_generation);
        if stamp.position_bytes != position || stamp.lap != ring.lap(position) {
            break cut(
                position,
                format!(
                    "stale record of position {} (lap {})",
                    stamp.position_bytes, stamp.lap
                ),
            );
        }
        if stamp.open_generation < last_generation {
            break cut(
                position,
                format!(
                    "open generation {} after {last_generation}",
                    stamp.open_generation
                ),
            );
        }
        let len = found.len;
        if position + len - start > capacity {
            break cut(position, format!("{len} bytes overrun the ring"));
        }
        if found.padding && ring.offset(position) + len != capacity {
            break cut(position, "padding does not end the lap".to_string());
        }
        if found.padding && position >= tail {
            live.push(Live {
                position,
                meta: None,
                payload_len: 0,
                crcs: Arc::from(Vec::new()),
                payload_at: None,
                payload: None,
            });
        }
        for (at, record, payload_at) in found.records {
            // Records of the tail's batch released before the tail.
            if at < tail {
                continue;
            }
            live.push(Live {
                position: at,
                payload_len: record.payload.len() as u64,
                crcs: Arc::from(format::block_crcs(&record.payload)),
                meta: Some(LogRecord {
                    payload: Bytes::new(),
                    ..record.clone()
                }),
                payload_at: Some(payload_at),
                payload: Some(record.payload.clone()),
            });
            records.push(RecoveredRecord {
                position: LogPosition(at),
                record,
            });
        }
        last_generation = stamp.open_generation;
        position += len;
    };
    Ok(Scan {
        records,
        live,
        head: position,
        stop,
        max_generation,
    })
}

fn record_from(header: &RecordHeader, payload: Bytes) -> LogRecord {
    LogRecord {
        kind: header.kind,
        partition: header.partition,
        epoch: header.epoch,
        sequence: header.sequence,
        lba: header.lba,
        block_count: header.block_count,
        payload,
    }
}
