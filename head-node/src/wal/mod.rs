//! The head node's write log: a circular, checksummed log with group commit.
//!
//! Every write a primary (or secondary) accepts is appended here before it is
//! acknowledged (ARCHITECTURE.md, Write path); the flush to sleds
//! later reclaims the space with [`Wal::release`].
//!
//! ```text
//!  append(records) ──▶ reserve positions (state mutex, LogFull if no room)
//!                      └▶ queue ──▶ writer task: take ≤ max_batch_bytes,
//!                                   ONE durable device write (RWF_DSYNC), or
//!                                   2 writes + ONE flush when the batch
//!                                   crosses the end of the ring,
//!                                   durable := batch end ──▶ watch
//!  waiters: acknowledged when durable >= end of their records
//! ```
//!
//! **Group commit.** The first appender that finds no writer running becomes
//! the leader: it spawns the writer task, which drains the queue batch after
//! batch; every other appender (the followers) only queues and waits. A
//! record is acknowledged only once the device write of its bytes is durable
//! (a write with `RWF_DSYNC`, or a flush issued after the write completed). The writer runs on its own task so that a
//! cancelled `append` never abandons a half-done write.
//!
//! **Fail-stop.** A failed write or flush poisons the log: every queued and
//! later append fails with [`WalError::Failed`] until the log is reopened (after
//! a failed fdatasync the state of the page cache is unknown, and continuing
//! would leave a hole that cuts acknowledged records on recovery). Reopening
//! bumps the *open generation*, which also fences every stale record.
//!
//! **Recovery** ([`Wal::open`]) scans from the superblock's tail and stops at
//! the first record that is blank, fails a checksum, belongs to another log
//! instance or lap (its stored position is not the expected one), or whose
//! open generation goes backwards. Everything from there on is the cut tail:
//! new records overwrite it. The on-device format is in [`format`](mod@format), the space
//! accounting in [`ring`].
//!
//! **Reclaim.** [`Wal::release`] moves the tail after the records' data
//! reached the sleds; the superblock (two ping-pong copies) is written and
//! flushed *before* the space may be reused, so a crash can never make the
//! recovery scan start at a position that was overwritten.
//!
//! **Bounds.** Positions are reserved when a record is queued, so queued
//! bytes never exceed the free ring space (`LogFull` is the backpressure);
//! one batch is at most `max_batch_bytes` (or one record); one record at most
//! [`MAX_PAYLOAD_BLOCKS`] payload blocks. Recovery holds the payloads of all
//! live records in memory (the caller rebuilds its index and cache from them).
//! `append` spawns the writer, so it must run inside a tokio runtime.
//!
//! **Superblock loss.** If the newest superblock copy is torn, the previous
//! one is used: only the last `release` is forgotten (its space had not been
//! reused yet), and the records it released are recovered again; the caller
//! replays them idempotently (newest sequence wins in the index).
//!
//! Invariants: `tail <= durable <= written <= head`, `head - tail <=
//! capacity`; positions of live records are 4 KiB aligned, increase, and
//! never wrap inside a record.

pub mod format;
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
}

impl Default for WalOptions {
    fn default() -> Self {
        Self {
            capacity_bytes: None,
            max_batch_bytes: 4 << 20,
            scan_window_bytes: 1 << 20,
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

#[derive(Debug, Clone)]
enum Item {
    Record(LogRecord),
    Padding { skip_bytes: u64 },
}

#[derive(Debug, Clone)]
struct Pending {
    position: u64,
    item: Item,
}

impl Pending {
    fn len(&self) -> u64 {
        match &self.item {
            Item::Record(record) => record.encoded_len(),
            Item::Padding { skip_bytes } => BLOCK_SIZE_BYTES + skip_bytes,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Progress {
    durable: u64,
    failed: Option<Arc<str>>,
}

#[derive(Debug)]
struct State {
    head: u64,
    tail: u64,
    written: u64,
    durable: u64,
    queue: VecDeque<Pending>,
    /// Taken by the writer, not yet written.
    in_flight: Arc<Vec<Pending>>,
    writer_running: bool,
    failed: Option<Arc<str>>,
    /// Start positions of live records (padding included) in `[tail, head)`.
    starts: VecDeque<u64>,
}

#[derive(Debug)]
struct Shared {
    device: SharedDevice,
    ring: Ring,
    log_id: u64,
    open_generation: u64,
    max_batch_bytes: u64,
    recovery_stop: ScanStop,
    state: Mutex<State>,
    progress: watch::Sender<Progress>,
    /// Serialises superblock writes; holds the last written superblock.
    superblock: tokio::sync::Mutex<Superblock>,
    appended_records: AtomicU64,
    batches: AtomicU64,
    flushes: AtomicU64,
}

/// The write log. Cheap to clone; all clones share one log.
#[derive(Debug, Clone)]
pub struct Wal {
    shared: Arc<Shared>,
}

impl Wal {
    /// Opens (formatting a blank device) and recovers the log. Returns every
    /// record from the tail up to the cut, in log order.
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
                    log_id: RandomState::new().hash_one(device.info().path.as_os_str()),
                    generation: 0,
                    capacity_bytes,
                    tail_position_bytes: 0,
                    head_position_hint_bytes: 0,
                    open_generation: 0,
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
        let current = Superblock {
            generation: previous.generation + 1,
            open_generation: scan.max_generation + 1,
            head_position_hint_bytes: scan.head,
            ..previous
        };
        write_superblock(&device, &current).await?;
        let state = State {
            head: scan.head,
            tail: previous.tail_position_bytes,
            written: scan.head,
            durable: scan.head,
            queue: VecDeque::new(),
            in_flight: Arc::new(Vec::new()),
            writer_running: false,
            failed: None,
            starts: scan.starts,
        };
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
                recovery_stop: scan.stop,
                state: Mutex::new(state),
                progress,
                superblock: tokio::sync::Mutex::new(current),
                appended_records: AtomicU64::new(0),
                batches: AtomicU64::new(0),
                flushes: AtomicU64::new(1),
            }),
        };
        Ok((wal, scan.records))
    }

    /// Appends `records` (atomically reserved, contiguous, in order) and
    /// returns their positions once all are durable. Concurrent calls share
    /// device writes and flushes.
    pub async fn append(&self, records: Vec<LogRecord>) -> Result<Vec<LogPosition>, WalError> {
        let capacity_bytes = self.shared.ring.capacity_bytes();
        for record in &records {
            record.validate()?;
            if record.encoded_len() > capacity_bytes {
                return Err(WalError::RecordTooLarge {
                    len_bytes: record.encoded_len(),
                    capacity_bytes,
                });
            }
        }
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let count = records.len() as u64;
        let (positions, end, spawn) = {
            let mut state = self.shared.lock();
            if let Some(reason) = &state.failed {
                return Err(WalError::Failed {
                    reason: reason.to_string(),
                });
            }
            // Reserve everything first so that a LogFull leaves no trace.
            let mut head = state.head;
            let mut planned = Vec::with_capacity(records.len() + 1);
            for record in &records {
                let reservation = self
                    .shared
                    .ring
                    .reserve(head, state.tail, record.encoded_len())
                    .map_err(|full| WalError::LogFull {
                        needed_bytes: full.needed_bytes + (head - state.head),
                        free_bytes: full.free_bytes + (head - state.head),
                    })?;
                planned.push(reservation);
                head = reservation.end;
            }
            let mut positions = Vec::with_capacity(records.len());
            for (record, reservation) in records.into_iter().zip(planned) {
                if let Some((position, skip_bytes)) = reservation.padding {
                    state.starts.push_back(position);
                    state.queue.push_back(Pending {
                        position,
                        item: Item::Padding { skip_bytes },
                    });
                }
                state.starts.push_back(reservation.position);
                state.queue.push_back(Pending {
                    position: reservation.position,
                    item: Item::Record(record),
                });
                positions.push(LogPosition(reservation.position));
            }
            state.head = head;
            let spawn = !state.writer_running;
            state.writer_running = true;
            (positions, head, spawn)
        };
        self.shared
            .appended_records
            .fetch_add(count, Ordering::Relaxed);
        if spawn {
            tokio::spawn(run_writer(self.shared.clone()));
        }
        let mut progress = self.shared.progress.subscribe();
        let outcome = progress
            .wait_for(|p| p.durable >= end || p.failed.is_some())
            .await
            .map(|p| p.clone());
        match outcome {
            Ok(p) if p.durable >= end => Ok(positions),
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

    /// Reads the live record at `position` (queued, in flight or on the
    /// device), checking every checksum.
    pub async fn read(&self, position: LogPosition) -> Result<LogRecord, WalError> {
        let (header, payload) = self.read_raw(position, None).await?;
        let mut payload = payload;
        payload.truncate(header.payload_len_bytes as usize);
        Ok(record_from(&header, payload))
    }

    /// Reads `count` payload blocks starting at payload block `first` of the
    /// record at `position`, checking their CRCs (what a read of logged data
    /// needs: one header block and the asked blocks).
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
    ) -> Result<(RecordHeader, Bytes), WalError> {
        let position = position.0;
        let not_found = || WalError::NotFound { position };
        let corrupt = |reason: String| WalError::Corrupt { position, reason };
        let in_memory = {
            let state = self.shared.lock();
            if position < state.tail
                || position >= state.head
                || state.starts.binary_search(&position).is_err()
            {
                return Err(not_found());
            }
            if position >= state.written {
                let found = state
                    .queue
                    .iter()
                    .chain(state.in_flight.iter())
                    .find(|p| p.position == position)
                    .cloned();
                Some(found.ok_or_else(not_found)?)
            } else {
                None
            }
        };
        if let Some(pending) = in_memory {
            let Item::Record(record) = pending.item else {
                return Err(not_found());
            };
            let header = RecordHeader::of(&record, self.stamp(position));
            let payload = match range {
                None => record.payload.clone(),
                Some((first, count)) => {
                    let (start, end) = block_range(&header, first, count).ok_or_else(not_found)?;
                    record.payload.slice(start..end)
                }
            };
            return Ok((header, payload));
        }
        let ring_offset = self.shared.ring.offset(position);
        let block = self
            .shared
            .device
            .read_at(RING_OFFSET + ring_offset, BLOCK_SIZE_BYTES as usize)
            .await?;
        let header = format::decode_header(&block).map_err(|e| corrupt(e.to_string()))?;
        if header.stamp.position_bytes != position || header.stamp.log_id != self.shared.log_id {
            return Err(corrupt(format!(
                "header says position {} of log {:#x}",
                header.stamp.position_bytes, header.stamp.log_id
            )));
        }
        if header.kind == RecordKind::Padding {
            return Err(not_found());
        }
        let (first, count) = match range {
            None => (0, header.block_crcs.len()),
            Some((first, count)) => {
                block_range(&header, first, count).ok_or_else(not_found)?;
                (first as usize, count as usize)
            }
        };
        if count == 0 {
            return Ok((header, Bytes::new()));
        }
        let data = self
            .shared
            .device
            .read_at(
                RING_OFFSET + ring_offset + BLOCK_SIZE_BYTES * (1 + first as u64),
                count * BLOCK_SIZE_BYTES as usize,
            )
            .await?;
        for (i, chunk) in data.chunks(BLOCK_SIZE_BYTES as usize).enumerate() {
            if crc32c::crc32c(chunk) != header.block_crcs[first + i] {
                return Err(corrupt(format!(
                    "payload block {} fails its CRC",
                    first + i
                )));
            }
        }
        Ok((header, data.into_bytes()))
    }

    /// Frees every record before `up_to` (a record boundary in
    /// `[tail, durable]`): the superblock is written and flushed first, then
    /// the space becomes reusable.
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
            let boundary = up_to == state.head || state.starts.binary_search(&up_to).is_ok();
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
        while state.starts.front().is_some_and(|&start| start < up_to) {
            state.starts.pop_front();
        }
        // The new tail is a record boundary (the first live record, or the
        // head when the log is empty): recovery starts scanning there.
        assert!(
            state
                .starts
                .front()
                .map_or(up_to == state.head, |&start| start == up_to),
            "released to {up_to}, which is not where the next record ({:?}) starts",
            state.starts.front()
        );
        state.assert_positions(self.shared.ring.capacity_bytes());
        Ok(())
    }

    /// Fill level and counters.
    pub fn stats(&self) -> WalStats {
        let state = self.shared.lock();
        WalStats {
            capacity_bytes: self.shared.ring.capacity_bytes(),
            used_bytes: state.head - state.tail,
            tail: state.tail,
            durable: state.durable,
            head: state.head,
            appended_records: self.shared.appended_records.load(Ordering::Relaxed),
            batches: self.shared.batches.load(Ordering::Relaxed),
            flushes: self.shared.flushes.load(Ordering::Relaxed),
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

    /// Position the next record will (at the earliest) get.
    pub fn head(&self) -> LogPosition {
        LogPosition(self.shared.lock().head)
    }

    /// Oldest live position.
    pub fn tail(&self) -> LogPosition {
        LogPosition(self.shared.lock().tail)
    }

    fn stamp(&self, position: u64) -> RecordStamp {
        RecordStamp {
            log_id: self.shared.log_id,
            position_bytes: position,
            lap: self.shared.ring.lap(position),
            open_generation: self.shared.open_generation,
        }
    }
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
                && self.head - self.tail <= capacity_bytes,
            "log positions out of order: tail {}, durable {}, written {}, head {}, capacity {capacity_bytes}",
            self.tail,
            self.durable,
            self.written,
            self.head
        );
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
        state.in_flight = Arc::new(Vec::new());
        state.writer_running = false;
        let durable = state.durable;
        drop(state);
        self.progress.send_replace(Progress {
            durable,
            failed: Some(reason),
        });
    }
}

fn block_range(header: &RecordHeader, first: u32, count: u32) -> Option<(usize, usize)> {
    let end = first.checked_add(count)? as usize;
    (count > 0 && end <= header.block_crcs.len()).then_some((
        first as usize * BLOCK_SIZE_BYTES as usize,
        end * BLOCK_SIZE_BYTES as usize,
    ))
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

/// The group-commit writer: drains the queue batch by batch, one flush per
/// batch, until it is empty (then the next appender spawns a new writer).
async fn run_writer(shared: Arc<Shared>) {
    // Bounded: each iteration writes at least one queued record or returns.
    loop {
        let batch = {
            let mut state = shared.lock();
            if state.failed.is_some() || state.queue.is_empty() {
                state.writer_running = false;
                return;
            }
            let mut batch = Vec::new();
            let mut bytes = 0u64;
            while let Some(next) = state.queue.front() {
                if !batch.is_empty() && bytes + next.len() > shared.max_batch_bytes {
                    break;
                }
                bytes += next.len();
                if let Some(next) = state.queue.pop_front() {
                    batch.push(next);
                }
            }
            let batch = Arc::new(batch);
            state.in_flight = batch.clone();
            batch
        };
        match write_batch(&shared, &batch).await {
            Ok(end) => {
                shared.batches.fetch_add(1, Ordering::Relaxed);
                let mut state = shared.lock();
                debug_assert!(end <= state.head && end > state.durable);
                state.durable = end;
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

/// Writes a batch (contiguous positions) as one device write per lap it
/// touches and makes it durable: a batch in one segment (the usual case) is
/// one durable write ([`BlockDevice::write_durable_at`], `RWF_DSYNC` on
/// io_uring); a batch that wraps is two writes and one flush. Returns the
/// end position.
///
/// [`BlockDevice::write_durable_at`]: hardware::BlockDevice::write_durable_at
async fn write_batch(shared: &Shared, batch: &[Pending]) -> Result<u64, DeviceError> {
    let ring = shared.ring;
    let mut segments: Vec<Segment<'_>> = Vec::with_capacity(2);
    let mut segment_start = None;
    let mut items: Vec<&Pending> = Vec::new();
    let mut end = 0;
    for (i, pending) in batch.iter().enumerate() {
        debug_assert!(i == 0 || pending.position == end, "batch not contiguous");
        segment_start.get_or_insert(pending.position);
        items.push(pending);
        end = pending.position + pending.len();
        let closes_lap = ring.offset(end) == 0;
        if closes_lap || i + 1 == batch.len() {
            let start = segment_start.take().unwrap_or(pending.position);
            segments.push(Segment {
                start_position_bytes: start,
                len_bytes: end - start,
                items: std::mem::take(&mut items),
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
    {
        let mut state = shared.lock();
        state.written = end;
        state.in_flight = Arc::new(Vec::new());
    }
    shared.flushes.fetch_add(1, Ordering::Relaxed);
    Ok(end)
}

/// The part of a batch that lies in one lap of the ring: one device write.
struct Segment<'a> {
    /// Logical position of the first record.
    start_position_bytes: u64,
    /// Bytes from there to the end of the last record.
    len_bytes: u64,
    /// The records, contiguous.
    items: Vec<&'a Pending>,
}

fn encode_segment(shared: &Shared, segment: &Segment<'_>) -> Result<AlignedBuf, DeviceError> {
    let mut buf = AlignedBuf::zeroed(segment.len_bytes as usize)?;
    for pending in &segment.items {
        let at = (pending.position - segment.start_position_bytes) as usize;
        let stamp = RecordStamp {
            log_id: shared.log_id,
            position_bytes: pending.position,
            lap: shared.ring.lap(pending.position),
            open_generation: shared.open_generation,
        };
        match &pending.item {
            Item::Record(record) => {
                let len = record.encoded_len() as usize;
                format::encode_record(record, stamp, &mut buf[at..at + len]);
            }
            Item::Padding { skip_bytes } => {
                format::encode_padding(
                    stamp,
                    *skip_bytes,
                    &mut buf[at..at + BLOCK_SIZE_BYTES as usize],
                );
            }
        }
    }
    Ok(buf)
}

struct Scan {
    records: Vec<RecoveredRecord>,
    starts: VecDeque<u64>,
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

async fn scan(
    device: &SharedDevice,
    ring: Ring,
    superblock: &Superblock,
    window_bytes: usize,
) -> Result<Scan, DeviceError> {
    let tail = superblock.tail_position_bytes;
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
    let mut starts = VecDeque::new();
    let mut position = tail;
    let mut last_generation = 0;
    let mut max_generation = superblock.open_generation;
    let cut = |position: u64, reason: String| ScanStop::Cut { position, reason };
    // Bounded: every iteration advances by at least one block or stops.
    let stop = loop {
        if position - tail >= capacity {
            break ScanStop::Full { position };
        }
        let offset = ring.offset(position);
        let header = match format::decode_header(window.get(offset, BLOCK_SIZE_BYTES).await?) {
            Ok(header) => header,
            Err(FormatError::Blank) => break ScanStop::Blank { position },
            Err(error) => break cut(position, error.to_string()),
        };
        let stamp = header.stamp;
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
        let len = header.encoded_len();
        if offset + len > capacity || position + len - tail > capacity {
            break cut(position, format!("record of {len} bytes overruns the ring"));
        }
        if header.kind == RecordKind::Padding {
            if offset + len != capacity {
                break cut(position, "padding does not end the lap".to_string());
            }
        } else {
            let payload_len = len - BLOCK_SIZE_BYTES;
            let payload = if payload_len == 0 {
                Bytes::new()
            } else {
                let payload = window.get(offset + BLOCK_SIZE_BYTES, payload_len).await?;
                if let Some(bad) = format::first_bad_block(&header, payload) {
                    break cut(position, format!("payload block {bad} fails its CRC"));
                }
                Bytes::copy_from_slice(&payload[..header.payload_len_bytes as usize])
            };
            records.push(RecoveredRecord {
                position: LogPosition(position),
                record: record_from(&header, payload),
            });
        }
        last_generation = stamp.open_generation;
        starts.push_back(position);
        position += len;
    };
    Ok(Scan {
        records,
        starts,
        head: position,
        stop,
        max_generation,
    })
}
