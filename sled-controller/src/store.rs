//! Column store of one device.
//!
//! A [`Store`] owns one formatted device (see [`crate::layout`]) through
//! `Arc<dyn BlockDevice>` and serves allocate / claim / append / read / free
//! / status on its columns.
//!
//! **Column state machine** (persisted in the ping-pong slots):
//!
//! ```text
//! Free --allocate--> Allocated --claim(P, e)--> Claimed(P, e)
//!   ^                    |                        |  claim(P, e' >= e): epoch := e'
//!   +-------free---------+--------free(P, e'>=e)--+  append(P, e' >= e): length += n
//! ```
//!
//! **Invariants.**
//! 1. In-memory column state equals the last state that was written *and*
//!    flushed; it is updated only after the group flush succeeded, so every
//!    reply describes durable state (fencing: owner and highest epoch are
//!    persisted before any reply that depends on them).
//! 2. Per column, operations that change it are serialized by a
//!    `tokio::sync::Mutex`; different columns proceed in parallel and share
//!    flushes. **Reads do not take that mutex across device I/O**: each
//!    column also has a [`ReadView`] (state, length, a change counter) in a
//!    plain mutex that every operation publishes when it commits. A read
//!    takes the view, reads the data and the stored CRCs without any lock,
//!    and takes the view again: an append at the tail only grows the length
//!    (bytes below it never change), while every operation that may change
//!    bytes below the length (an append retry that rewrites, a free) makes
//!    the counter odd while it runs and even again after, so a read that
//!    overlapped one sees a different counter and reads again. After
//!    [`UNLOCKED_READ_ATTEMPTS`], or while a change is running, a read takes
//!    the column's mutex as before (so a read always finishes). A read that
//!    loads a CRC block into the cache never replaces a newer version an
//!    append cached meanwhile (the cache keeps the higher generation).
//! 3. An append writes data blocks, the touched CRC blocks and the next slot
//!    concurrently, then group-flushes. A crash before the flush can leave
//!    any subset on disk; the slot records `tail_from`, and at open the range
//!    `[tail_from, length)` is verified against the CRCs. Blocks that fail are
//!    recorded as bad (length is not rolled back: the head node may have seen
//!    the ack race the crash). A retry of that append (same offset) rewrites
//!    and heals them — for in-doubt bad blocks the retry's CRCs are accepted
//!    even if the stored CRC entry never reached the disk.
//! 4. Reads never return data that fails its stored CRC.
//! 5. A device error that `is_device_failure()` marks the whole device
//!    failed; from then on every operation answers `DeviceFailed`.
//!
//! CRC blocks are cached in a FIFO-bounded map (`crc_cache_blocks`), so RAM
//! does not grow with device size.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::try_join_all;
use hardware::{AlignedBuf, BlockDevice, DeviceError};
use proto::sled::{
    ColumnId, ColumnState, ColumnStatus, DeviceInventory, DeviceState, Epoch, PartitionId,
    SledError,
};
use proto::BLOCK_SIZE_BYTES;
use thiserror::Error;
use tracing::{error, info, warn};

use crate::group_flush::GroupFlush;
use crate::layout::{
    self, recover_crc_block, recover_slots, ColumnSlot, CrcBlock, Decoded, Geometry, LayoutError,
    SlotRecovery, SlotState, Superblock, LAYOUT_VERSION, SUPERBLOCK_OFFSETS,
};
use crate::metrics::Metrics;

/// Largest append or read, in bytes.
pub const MAX_IO_BYTES: u64 = 16 << 20;
/// Columns per read of the column table at open.
const TABLE_READ_COLUMNS: u32 = 128;
/// Reads without the column's mutex before one that holds it.
pub const UNLOCKED_READ_ATTEMPTS: usize = 3;

/// Who a device belongs to; checked against its superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceIdentity {
    pub unit_name: String,
    pub sled_id: String,
    pub device_index: u16,
}

#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub column_size_bytes: u64,
    /// Bound on cached CRC blocks (4 KiB each).
    pub crc_cache_blocks: usize,
}

impl StoreOptions {
    pub fn new(column_size_bytes: u64) -> Self {
        Self {
            column_size_bytes,
            crc_cache_blocks: 4096,
        }
    }
}

/// Why a device could not be opened.
#[derive(Debug, Error)]
pub enum StoreOpenError {
    /// The device failed while being opened; the sled runs without it.
    #[error("device {device} failed during open: {source}")]
    Device { device: u16, source: DeviceError },
    /// The device holds another sled's or device's superblock.
    #[error(
        "device {device} ({path}) belongs to unit {found_unit:?} sled {found_sled:?} device {found_device}, \
         expected unit {expected_unit:?} sled {expected_sled:?} device {device}; refusing to use it"
    )]
    Foreign {
        device: u16,
        path: String,
        found_unit: String,
        found_sled: String,
        found_device: u16,
        expected_unit: String,
        expected_sled: String,
    },
    /// Neither superblock copy is valid and the device is not blank.
    #[error("device {device} ({path}) is not blank and has no valid superblock ({errors}); refusing to format it")]
    NoValidSuperblock {
        device: u16,
        path: String,
        errors: String,
    },
    /// Both copies are valid but differ.
    #[error("device {device} ({path}) has two different valid superblocks")]
    SuperblockConflict { device: u16, path: String },
    #[error("device {device} ({path}) was formatted with column size {found} but the rack says {expected}")]
    ColumnSizeMismatch {
        device: u16,
        path: String,
        found: u64,
        expected: u64,
    },
    #[error("device {device} ({path}) is {size_bytes} bytes, smaller than at format ({formatted_bytes})")]
    Shrunk {
        device: u16,
        path: String,
        size_bytes: u64,
        formatted_bytes: u64,
    },
    #[error("device {device} ({path}): {source}")]
    Layout {
        device: u16,
        path: String,
        source: LayoutError,
    },
}

impl StoreOpenError {
    /// True for configuration errors the daemon must not start with (a
    /// foreign or unreadable device must never be reformatted); false for a
    /// device that simply failed, which the sled runs without.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, StoreOpenError::Device { .. })
    }
}

/// In-memory state of one column (mirrors the durable slot).
#[derive(Debug)]
struct Column {
    slot: ColumnSlot,
    /// Slots unreadable at open: never allocated, every op fails.
    quarantined: bool,
    /// Offsets in the in-doubt tail that failed verification at open.
    in_doubt_bad: BTreeSet<u64>,
}

/// What a read needs of a column, published (under the column's mutex) by
/// every operation when it commits, and read without that mutex.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ReadView {
    state: SlotState,
    quarantined: bool,
    length_bytes: u64,
    /// Raised before and after every operation that may change bytes below
    /// `length_bytes`: odd while one runs.
    version: u64,
}

impl ReadView {
    fn of(c: &Column, version: u64) -> Self {
        ReadView {
            state: c.slot.state,
            quarantined: c.quarantined,
            length_bytes: c.slot.length_bytes,
            version,
        }
    }
}

/// An operation that may change bytes below a column's length is running:
/// the view's version is odd from [`Store::begin_change`] until this drops
/// (on every path out of the operation, errors included).
struct ChangeGuard<'a> {
    view: &'a Mutex<ReadView>,
}

impl Drop for ChangeGuard<'_> {
    fn drop(&mut self) {
        let mut v = lock(self.view);
        v.version += 1;
        debug_assert!(v.version % 2 == 0, "change counter left odd");
    }
}

#[derive(Debug, Clone)]
struct CachedCrc {
    block: CrcBlock,
    /// Copy holding `block`; the next write goes to the other one.
    best_copy: Option<u8>,
}

/// The next version of one CRC block of a column, ready to write.
#[derive(Debug)]
struct CrcBlockUpdate {
    /// Index of the CRC block within the column.
    crc_block: u32,
    /// What the cache holds once the write is durable.
    cached: CachedCrc,
    /// The encoded block.
    encoded: Vec<u8>,
    /// Where it goes: the copy that does not hold the current best version.
    device_offset_bytes: u64,
}

#[derive(Debug)]
struct CrcCache {
    capacity: usize,
    map: HashMap<(u32, u32), CachedCrc>,
    order: VecDeque<(u32, u32)>,
}

impl CrcCache {
    fn get(&self, key: (u32, u32)) -> Option<CachedCrc> {
        self.map.get(&key).cloned()
    }

    /// Caches `value` unless a newer generation of the block is cached: a
    /// read (which holds no column lock) may load a block from the device
    /// while an append caches the next version; the older must not win.
    fn put(&mut self, key: (u32, u32), value: CachedCrc) {
        match self.map.get_mut(&key) {
            Some(cached) => {
                if value.block.generation >= cached.block.generation {
                    *cached = value;
                }
            }
            None => {
                self.map.insert(key, value);
                self.order.push_back(key);
                while self.order.len() > self.capacity {
                    if let Some(old) = self.order.pop_front() {
                        self.map.remove(&old);
                    }
                }
            }
        }
    }
}

/// A bad block found by verification (open, read or scrub).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct BadBlockAt {
    pub column: u32,
    /// Byte offset of the block in the column.
    pub offset_bytes: u64,
}

/// Columns of one device.
#[derive(Debug)]
pub struct Store {
    device_index: u16,
    device: Arc<dyn BlockDevice>,
    superblock: Superblock,
    geometry: Geometry,
    columns: Vec<tokio::sync::Mutex<Column>>,
    /// Per column, what reads see (module docs, invariant 2).
    views: Vec<Mutex<ReadView>>,
    free: Mutex<BTreeSet<u32>>,
    failed: AtomicBool,
    flusher: GroupFlush,
    crc_cache: Mutex<CrcCache>,
    metrics: Arc<Metrics>,
    recovered_bad_blocks: Vec<BadBlockAt>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Guarded data is plain bookkeeping, consistent between statements.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn bad_request(reason: impl Into<String>) -> SledError {
    SledError::BadRequest {
        reason: reason.into(),
    }
}

fn column_state(state: SlotState) -> ColumnState {
    match state {
        SlotState::Free => ColumnState::Free,
        SlotState::Allocated => ColumnState::Allocated,
        SlotState::Claimed => ColumnState::Claimed,
    }
}

fn aligned(data: &[u8]) -> Result<AlignedBuf, SledError> {
    AlignedBuf::from_slice(data).map_err(|e| SledError::Io {
        reason: e.to_string(),
    })
}

impl Store {
    /// Opens a device: formats it if its first 8 KiB are zero, otherwise
    /// checks its superblock against `identity`, recovers every column from
    /// its slots and verifies in-doubt tails.
    pub async fn open(
        device: Arc<dyn BlockDevice>,
        identity: &DeviceIdentity,
        options: &StoreOptions,
        metrics: Arc<Metrics>,
    ) -> Result<Store, StoreOpenError> {
        let index = identity.device_index;
        let path = device.info().path.display().to_string();
        let dev_err = |source| StoreOpenError::Device {
            device: index,
            source,
        };
        let size_bytes = device.info().size_bytes;

        let head = device
            .read_at(0, 2 * BLOCK_SIZE_BYTES as usize)
            .await
            .map_err(dev_err)?;
        let copies = [
            Decoded::from_result(Superblock::decode(&head[..BLOCK_SIZE_BYTES as usize])),
            Decoded::from_result(Superblock::decode(&head[BLOCK_SIZE_BYTES as usize..])),
        ];
        let superblock = match copies {
            [Decoded::Blank, Decoded::Blank] => {
                Self::format(&device, identity, options, size_bytes).await?
            }
            [Decoded::Valid(a), Decoded::Valid(b)] => {
                if a != b {
                    return Err(StoreOpenError::SuperblockConflict {
                        device: index,
                        path,
                    });
                }
                a
            }
            [Decoded::Valid(sb), other] | [other, Decoded::Valid(sb)] => {
                warn!(device = index, %path, ?other, "one superblock copy is damaged; rewriting it from the other");
                let block = sb.encode().map_err(|source| StoreOpenError::Layout {
                    device: index,
                    path: path.clone(),
                    source,
                })?;
                for offset in SUPERBLOCK_OFFSETS {
                    let buf = AlignedBuf::from_slice(&block).map_err(dev_err)?;
                    device.write_at(offset, buf).await.map_err(dev_err)?;
                }
                device.flush().await.map_err(dev_err)?;
                sb
            }
            [a, b] => {
                return Err(StoreOpenError::NoValidSuperblock {
                    device: index,
                    path,
                    errors: format!("copy 0: {a:?}; copy 1: {b:?}"),
                })
            }
        };
        if superblock.sled_id != identity.sled_id
            || superblock.device_index != identity.device_index
            || superblock.unit_name != identity.unit_name
        {
            return Err(StoreOpenError::Foreign {
                device: index,
                path,
                found_unit: superblock.unit_name,
                found_sled: superblock.sled_id,
                found_device: superblock.device_index,
                expected_unit: identity.unit_name.clone(),
                expected_sled: identity.sled_id.clone(),
            });
        }
        let geometry = superblock.geometry;
        if geometry.column_size_bytes != options.column_size_bytes {
            return Err(StoreOpenError::ColumnSizeMismatch {
                device: index,
                path,
                found: geometry.column_size_bytes,
                expected: options.column_size_bytes,
            });
        }
        if size_bytes < superblock.device_size_bytes {
            return Err(StoreOpenError::Shrunk {
                device: index,
                path,
                size_bytes,
                formatted_bytes: superblock.device_size_bytes,
            });
        }

        // Recover the column table in bounded chunks.
        let mut columns = Vec::with_capacity(geometry.column_count as usize);
        let mut free = BTreeSet::new();
        let mut first = 0u32;
        while first < geometry.column_count {
            let n = TABLE_READ_COLUMNS.min(geometry.column_count - first);
            let buf = device
                .read_at(
                    geometry.slot_offset(first, 0),
                    (n as u64 * 2 * BLOCK_SIZE_BYTES) as usize,
                )
                .await
                .map_err(dev_err)?;
            for i in 0..n {
                let column = first + i;
                let at = (i as usize) * 2 * BLOCK_SIZE_BYTES as usize;
                let slot = |k: usize| {
                    let b = &buf[at + k * BLOCK_SIZE_BYTES as usize
                        ..at + (k + 1) * BLOCK_SIZE_BYTES as usize];
                    Decoded::from_result(ColumnSlot::decode(b, column, geometry.column_size_bytes))
                };
                let (slot, quarantined) = match recover_slots([slot(0), slot(1)]) {
                    SlotRecovery::Recovered(s) => (s, false),
                    SlotRecovery::Unrecoverable { errors } => {
                        error!(
                            device = index,
                            column,
                            ?errors,
                            "both metadata slots of the column are corrupt; quarantining it"
                        );
                        (ColumnSlot::BLANK, true)
                    }
                };
                if slot.state == SlotState::Free && !quarantined {
                    free.insert(column);
                }
                columns.push(Column {
                    slot,
                    quarantined,
                    in_doubt_bad: BTreeSet::new(),
                });
            }
            first += n;
        }

        let mut store = Store {
            device_index: index,
            device,
            superblock,
            geometry,
            columns: Vec::new(),
            views: Vec::new(),
            free: Mutex::new(free),
            failed: AtomicBool::new(false),
            flusher: GroupFlush::default(),
            crc_cache: Mutex::new(CrcCache {
                capacity: options.crc_cache_blocks.max(8),
                map: HashMap::new(),
                order: VecDeque::new(),
            }),
            metrics,
            recovered_bad_blocks: Vec::new(),
        };

        // Verify in-doubt tails (each at most one append, <= 16 MiB).
        let mut bad = Vec::new();
        for (column, c) in columns.iter_mut().enumerate() {
            let column = column as u32;
            if c.slot.state == SlotState::Claimed && c.slot.tail_from_bytes < c.slot.length_bytes {
                let len = c.slot.length_bytes - c.slot.tail_from_bytes;
                let failing = store
                    .verify_blocks(column, c.slot.tail_from_bytes, len)
                    .await
                    .map_err(|e| match e {
                        VerifyError::Device(source) => dev_err(source),
                    })?;
                for offset in failing {
                    warn!(
                        device = index,
                        column, offset, "in-doubt tail block fails its checksum after restart"
                    );
                    c.in_doubt_bad.insert(offset);
                    bad.push(BadBlockAt {
                        column,
                        offset_bytes: offset,
                    });
                }
            }
        }
        store.views = columns
            .iter()
            .map(|c| Mutex::new(ReadView::of(c, 0)))
            .collect();
        store.columns = columns.into_iter().map(tokio::sync::Mutex::new).collect();
        store.recovered_bad_blocks = bad;
        store.metrics.set_device_up(index, true);
        store.metrics.set_free_columns(index, store.free_count());
        info!(device = index, path = %store.device.info().path.display(), columns = geometry.column_count, free = store.free_count(), "device opened");
        Ok(store)
    }

    async fn format(
        device: &Arc<dyn BlockDevice>,
        identity: &DeviceIdentity,
        options: &StoreOptions,
        size_bytes: u64,
    ) -> Result<Superblock, StoreOpenError> {
        let index = identity.device_index;
        let path = device.info().path.display().to_string();
        let layout_err = |source| StoreOpenError::Layout {
            device: index,
            path: path.clone(),
            source,
        };
        let dev_err = |source| StoreOpenError::Device {
            device: index,
            source,
        };
        let geometry =
            Geometry::compute(size_bytes, options.column_size_bytes).map_err(layout_err)?;
        let superblock = Superblock {
            layout_version: LAYOUT_VERSION,
            unit_name: identity.unit_name.clone(),
            sled_id: identity.sled_id.clone(),
            device_index: index,
            device_uuid: rand::random::<u128>(),
            device_size_bytes: size_bytes,
            geometry,
        };
        let block = superblock.encode().map_err(layout_err)?;
        info!(device = index, %path, columns = geometry.column_count, "formatting blank device");
        // Zero the column table first (a reused device may hold old bytes
        // there), flush, and only then write the superblocks: a crash in
        // between leaves a blank device that is formatted again.
        let table_end = geometry.crc_region_offset_bytes;
        let chunk = 1u64 << 20;
        let mut at = geometry.column_table_offset_bytes;
        while at < table_end {
            let n = chunk.min(table_end - at);
            let buf = AlignedBuf::zeroed(n as usize).map_err(dev_err)?;
            device.write_at(at, buf).await.map_err(dev_err)?;
            at += n;
        }
        device.flush().await.map_err(dev_err)?;
        for offset in SUPERBLOCK_OFFSETS {
            let buf = AlignedBuf::from_slice(&block).map_err(dev_err)?;
            device.write_at(offset, buf).await.map_err(dev_err)?;
        }
        device.flush().await.map_err(dev_err)?;
        Ok(superblock)
    }

    pub fn device_index(&self) -> u16 {
        self.device_index
    }

    pub fn superblock(&self) -> &Superblock {
        &self.superblock
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.device
    }

    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    pub fn free_count(&self) -> u32 {
        lock(&self.free).len() as u32
    }

    /// Blocks found bad in in-doubt tails at open.
    pub fn recovered_bad_blocks(&self) -> &[BadBlockAt] {
        &self.recovered_bad_blocks
    }

    pub fn inventory(&self) -> DeviceInventory {
        DeviceInventory {
            device: self.device_index,
            path: self.device.info().path.display().to_string(),
            size_bytes: self.device.info().size_bytes,
            column_count: self.geometry.column_count,
            free_columns: self.free_count(),
            state: if self.is_failed() {
                DeviceState::Failed
            } else {
                DeviceState::Healthy
            },
        }
    }

    fn column_id(&self, index: u32) -> ColumnId {
        ColumnId {
            device: self.device_index,
            index,
        }
    }

    /// Marks the device failed (idempotent) and returns the error to reply.
    pub fn mark_failed(&self, reason: &str) -> SledError {
        if !self.failed.swap(true, Ordering::AcqRel) {
            error!(device = self.device_index, path = %self.device.info().path.display(), reason, "device failed; isolating it");
            self.metrics.set_device_up(self.device_index, false);
        }
        SledError::DeviceFailed {
            device: self.device_index,
        }
    }

    fn device_error(&self, e: DeviceError) -> SledError {
        if e.is_device_failure() {
            self.mark_failed(&e.to_string())
        } else {
            // Argument errors are our bug, not the device's.
            error!(device = self.device_index, error = %e, "device rejected an operation");
            SledError::Io {
                reason: e.to_string(),
            }
        }
    }

    fn check_healthy(&self) -> Result<(), SledError> {
        if self.is_failed() {
            return Err(SledError::DeviceFailed {
                device: self.device_index,
            });
        }
        Ok(())
    }

    fn column(&self, index: u32) -> Result<&tokio::sync::Mutex<Column>, SledError> {
        self.columns
            .get(index as usize)
            .ok_or(SledError::NoSuchColumn {
                column: self.column_id(index),
            })
    }

    fn view(&self, index: u32) -> Result<&Mutex<ReadView>, SledError> {
        self.views
            .get(index as usize)
            .ok_or(SledError::NoSuchColumn {
                column: self.column_id(index),
            })
    }

    /// Publishes the committed state of column `index` to readers (called
    /// with its mutex held, after `c.slot` changed).
    fn publish(&self, index: u32, c: &Column) {
        if let Ok(view) = self.view(index) {
            let mut v = lock(view);
            *v = ReadView::of(c, v.version);
        }
    }

    /// Starts an operation that may change bytes below the length of column
    /// `index` (called with its mutex held); readers that overlap it read
    /// again.
    fn begin_change(&self, index: u32) -> Result<ChangeGuard<'_>, SledError> {
        let view = self.view(index)?;
        let mut v = lock(view);
        v.version += 1;
        debug_assert!(v.version % 2 == 1, "nested column change");
        Ok(ChangeGuard { view })
    }

    async fn write(&self, offset: u64, buf: AlignedBuf) -> Result<(), SledError> {
        self.device
            .write_at(offset, buf)
            .await
            .map(|_| ())
            .map_err(|e| self.device_error(e))
    }

    async fn read_device(&self, offset: u64, len: usize) -> Result<AlignedBuf, SledError> {
        self.device
            .read_at(offset, len)
            .await
            .map_err(|e| self.device_error(e))
    }

    async fn flush(&self) -> Result<(), SledError> {
        let device = &self.device;
        match self
            .flusher
            .wait(|| async { device.flush().await.map_err(|e| e.to_string()) })
            .await
        {
            Ok(()) => Ok(()),
            Err(reason) => Err(self.mark_failed(&format!("flush failed: {reason}"))),
        }
    }

    async fn write_slot(&self, index: u32, slot: &ColumnSlot) -> Result<(), SledError> {
        let block = slot.encode(index);
        self.write(
            self.geometry.slot_offset(index, slot.slot_index()),
            aligned(&block)?,
        )
        .await
    }

    /// Loads (or returns cached) CRC block `crc_block` of `index`.
    async fn load_crc_block(&self, index: u32, crc_block: u32) -> Result<CachedCrc, DeviceError> {
        if let Some(c) = lock(&self.crc_cache).get((index, crc_block)) {
            return Ok(c);
        }
        let buf = self
            .device
            .read_at(
                self.geometry.crc_block_offset(index, crc_block, 0),
                2 * BLOCK_SIZE_BYTES as usize,
            )
            .await?;
        let half = BLOCK_SIZE_BYTES as usize;
        let copies = [
            Decoded::from_result(CrcBlock::decode(&buf[..half], index, crc_block)),
            Decoded::from_result(CrcBlock::decode(&buf[half..], index, crc_block)),
        ];
        let (block, best_copy) = recover_crc_block(copies);
        let cached = CachedCrc { block, best_copy };
        lock(&self.crc_cache).put((index, crc_block), cached.clone());
        Ok(cached)
    }

    /// Stored CRCs of the blocks in `[offset, offset + len)`.
    async fn stored_crcs(
        &self,
        index: u32,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u32>, DeviceError> {
        let mut out = Vec::with_capacity((len / BLOCK_SIZE_BYTES) as usize);
        let mut at = offset;
        let mut current: Option<(u32, CachedCrc)> = None;
        while at < offset + len {
            let (cb, entry) = Geometry::crc_position(at);
            if current.as_ref().is_none_or(|(k, _)| *k != cb) {
                current = Some((cb, self.load_crc_block(index, cb).await?));
            }
            if let Some((_, c)) = &current {
                out.push(c.block.entries[entry]);
            }
            at += BLOCK_SIZE_BYTES;
        }
        Ok(out)
    }

    /// Offsets in `[offset, offset+len)` whose data fails its stored CRC.
    async fn verify_blocks(
        &self,
        index: u32,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u64>, VerifyError> {
        let data = self
            .device
            .read_at(self.geometry.data_offset(index, offset), len as usize)
            .await
            .map_err(VerifyError::Device)?;
        let stored = self
            .stored_crcs(index, offset, len)
            .await
            .map_err(VerifyError::Device)?;
        Ok(data
            .chunks(BLOCK_SIZE_BYTES as usize)
            .zip(stored)
            .enumerate()
            .filter(|(_, (block, crc))| crc32c::crc32c(block) != *crc)
            .map(|(i, _)| offset + i as u64 * BLOCK_SIZE_BYTES)
            .collect())
    }

    /// Builds the new versions of the CRC blocks touched by writing `crcs`
    /// at `offset`.
    async fn updated_crc_blocks(
        &self,
        index: u32,
        offset: u64,
        crcs: &[u32],
    ) -> Result<Vec<CrcBlockUpdate>, SledError> {
        let mut out: Vec<(u32, CachedCrc)> = Vec::new();
        for (i, crc) in crcs.iter().enumerate() {
            let (cb, entry) = Geometry::crc_position(offset + i as u64 * BLOCK_SIZE_BYTES);
            if out.last().is_none_or(|(k, _)| *k != cb) {
                let cached = self
                    .load_crc_block(index, cb)
                    .await
                    .map_err(|e| self.device_error(e))?;
                out.push((cb, cached));
            }
            if let Some((_, c)) = out.last_mut() {
                c.block.entries[entry] = *crc;
            }
        }
        let mut result = Vec::with_capacity(out.len());
        for (cb, mut c) in out {
            let copy = match c.best_copy {
                Some(k) => 1 - k,
                None => 0,
            };
            c.block.generation += 1;
            c.best_copy = Some(copy);
            let encoded = c.block.encode(index, cb).to_vec();
            let device_offset_bytes = self.geometry.crc_block_offset(index, cb, copy);
            result.push(CrcBlockUpdate {
                crc_block: cb,
                cached: c,
                encoded,
                device_offset_bytes,
            });
        }
        Ok(result)
    }

    /// Writes `data` at `offset` of column `index`, the CRC blocks
    /// `crc_updates` and, if given, the column's new `slot`, then flushes and
    /// caches the new CRC blocks. Order on disk is only fixed by the flush;
    /// the writes are issued all at once and each is let complete (a crash
    /// could persist any subset too; recovery handles every subset).
    async fn write_and_flush(
        &self,
        index: u32,
        offset: u64,
        data: &[u8],
        crc_updates: Vec<CrcBlockUpdate>,
        slot: Option<&ColumnSlot>,
    ) -> Result<(), SledError> {
        let data_write = self.write(self.geometry.data_offset(index, offset), aligned(data)?);
        let crc_writes = try_join_all(crc_updates.iter().map(|update| async move {
            self.write(update.device_offset_bytes, aligned(&update.encoded)?)
                .await
        }));
        let slot_write = async {
            match slot {
                Some(slot) => self.write_slot(index, slot).await,
                None => Ok(()),
            }
        };
        let (d, c2, s2) = futures::join!(data_write, crc_writes, slot_write);
        d?;
        c2?;
        s2?;
        self.flush().await?;
        let mut cache = lock(&self.crc_cache);
        for update in crc_updates {
            cache.put((index, update.crc_block), update.cached);
        }
        Ok(())
    }

    /// Reserves `count` free columns (all or nothing).
    pub async fn allocate(&self, count: u32) -> Result<Vec<u32>, SledError> {
        self.check_healthy()?;
        let picked: Vec<u32> = {
            let mut free = lock(&self.free);
            if (free.len() as u64) < count as u64 {
                return Err(SledError::NoSpace);
            }
            (0..count).filter_map(|_| free.pop_first()).collect()
        };
        let result = self.allocate_picked(&picked).await;
        if result.is_err() {
            let mut free = lock(&self.free);
            free.extend(picked.iter().copied());
        }
        self.metrics
            .set_free_columns(self.device_index, self.free_count());
        result.map(|()| picked)
    }

    async fn allocate_picked(&self, picked: &[u32]) -> Result<(), SledError> {
        let mut guards = Vec::with_capacity(picked.len());
        for &index in picked {
            guards.push(self.column(index)?.lock().await);
        }
        let mut next = Vec::with_capacity(picked.len());
        for (guard, &index) in guards.iter().zip(picked) {
            // Free columns are only in the free set; a free-set entry in
            // another state would be a broken invariant.
            assert_eq!(
                guard.slot.state,
                SlotState::Free,
                "column {index} in free set but not free"
            );
            next.push(ColumnSlot {
                generation: guard.slot.generation + 1,
                state: SlotState::Allocated,
                volume: 0,
                partition: 0,
                epoch: 0,
                length_bytes: 0,
                tail_from_bytes: 0,
            });
        }
        try_join_all(
            picked
                .iter()
                .zip(&next)
                .map(|(&i, s)| self.write_slot(i, s)),
        )
        .await?;
        self.flush().await?;
        for ((guard, slot), &index) in guards.iter_mut().zip(next).zip(picked) {
            guard.slot = slot;
            guard.in_doubt_bad.clear();
            self.publish(index, guard);
        }
        Ok(())
    }

    fn check_usable(&self, index: u32, c: &Column) -> Result<(), SledError> {
        self.check_healthy()?;
        if c.quarantined {
            return Err(SledError::Io {
                reason: format!(
                    "metadata of column {index} on device {} is unreadable",
                    self.device_index
                ),
            });
        }
        Ok(())
    }

    /// Takes ownership of a Free or Allocated column, or raises the epoch of
    /// a column already claimed by the same partition.
    pub async fn claim(
        &self,
        index: u32,
        partition: PartitionId,
        epoch: Epoch,
    ) -> Result<(Epoch, u64), SledError> {
        self.check_healthy()?;
        let mut c = self.column(index)?.lock().await;
        self.check_usable(index, &c)?;
        let column = self.column_id(index);
        let mut taken_from_free_set = false;
        // A Free or Allocated column starts empty, owned by `partition`.
        let fresh = ColumnSlot {
            generation: c.slot.generation + 1,
            state: SlotState::Claimed,
            volume: partition.volume,
            partition: partition.index,
            epoch,
            length_bytes: 0,
            tail_from_bytes: 0,
        };
        let next = match c.slot.state {
            // The unit's allocator is the local control plane: it learns the
            // columns from the sled's inventory and hands each to exactly one
            // extent, so claiming a free column allocates it. A column that a
            // concurrent `allocate` already took off the free set is refused.
            SlotState::Free => {
                if !lock(&self.free).remove(&index) {
                    return Err(SledError::BadColumnState {
                        column,
                        state: ColumnState::Free,
                    });
                }
                taken_from_free_set = true;
                fresh
            }
            SlotState::Allocated => {
                if epoch < c.slot.epoch {
                    return Err(SledError::Fenced {
                        current_epoch: c.slot.epoch,
                    });
                }
                fresh
            }
            SlotState::Claimed => {
                self.check_owner(index, &c, partition, epoch)?;
                if epoch == c.slot.epoch {
                    return Ok((c.slot.epoch, c.slot.length_bytes));
                }
                ColumnSlot {
                    generation: c.slot.generation + 1,
                    epoch,
                    ..c.slot
                }
            }
        };
        let persisted = match self.write_slot(index, &next).await {
            Ok(()) => self.flush().await,
            Err(error) => Err(error),
        };
        if let Err(error) = persisted {
            if taken_from_free_set {
                lock(&self.free).insert(index);
            }
            return Err(error);
        }
        if taken_from_free_set {
            c.in_doubt_bad.clear();
            self.metrics
                .set_free_columns(self.device_index, self.free_count());
        }
        c.slot = next;
        self.publish(index, &c);
        Ok((next.epoch, next.length_bytes))
    }

    fn check_owner(
        &self,
        index: u32,
        c: &Column,
        partition: PartitionId,
        epoch: Epoch,
    ) -> Result<(), SledError> {
        let owner = PartitionId {
            volume: c.slot.volume,
            index: c.slot.partition,
        };
        if owner != partition {
            return Err(SledError::WrongPartition {
                column: self.column_id(index),
                owner,
            });
        }
        if epoch < c.slot.epoch {
            return Err(SledError::Fenced {
                current_epoch: c.slot.epoch,
            });
        }
        Ok(())
    }

    /// Appends whole blocks at `offset` (see module docs for retries).
    pub async fn append(
        &self,
        index: u32,
        partition: PartitionId,
        epoch: Epoch,
        offset: u64,
        data: &Bytes,
        block_crcs: &[u32],
    ) -> Result<u64, SledError> {
        let column = self.column_id(index);
        let len = data.len() as u64;
        if len == 0 || len % BLOCK_SIZE_BYTES != 0 || len > MAX_IO_BYTES {
            return Err(bad_request(format!(
                "append length {len} is not a non-zero multiple of {BLOCK_SIZE_BYTES} up to {MAX_IO_BYTES}"
            )));
        }
        if offset % BLOCK_SIZE_BYTES != 0 {
            return Err(bad_request(format!(
                "append offset {offset} is not a multiple of {BLOCK_SIZE_BYTES}"
            )));
        }
        let blocks = (len / BLOCK_SIZE_BYTES) as usize;
        if block_crcs.len() != blocks {
            return Err(bad_request(format!(
                "{} block CRCs for {blocks} blocks",
                block_crcs.len()
            )));
        }
        let computed = layout::block_crcs(data);
        if let Some(i) = computed.iter().zip(block_crcs).position(|(a, b)| a != b) {
            return Err(bad_request(format!(
                "CRC of block {i} does not match its data"
            )));
        }
        self.check_healthy()?;
        let mut c = self.column(index)?.lock().await;
        self.check_usable(index, &c)?;
        if c.slot.state != SlotState::Claimed {
            return Err(SledError::BadColumnState {
                column,
                state: column_state(c.slot.state),
            });
        }
        self.check_owner(index, &c, partition, epoch)?;
        let length = c.slot.length_bytes;
        let size = self.geometry.column_size_bytes;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(SledError::OutOfRange {
                column,
                offset_bytes: offset,
                len_bytes: len,
                length_bytes: length,
                column_size_bytes: size,
            });
        }
        if offset == length {
            let crc_updates = self.updated_crc_blocks(index, offset, block_crcs).await?;
            let next = ColumnSlot {
                generation: c.slot.generation + 1,
                epoch,
                length_bytes: length + len,
                tail_from_bytes: offset,
                ..c.slot
            };
            self.write_and_flush(index, offset, data, crc_updates, Some(&next))
                .await?;
            c.slot = next;
            // Only the length grew: bytes below the old length are
            // unchanged, so reads in flight stay valid.
            self.publish(index, &c);
            // Earlier in-doubt blocks are now behind a later write; they stay
            // bad (recorded) until rewritten by a retry.
            self.metrics.appended_bytes.inc_by(len);
            return Ok(next.length_bytes);
        }
        if offset > length || offset + len > length {
            return Err(SledError::OffsetMismatch {
                column,
                offset_bytes: offset,
                length_bytes: length,
            });
        }
        // A retry of blocks already below length.
        let stored = self
            .stored_crcs(index, offset, len)
            .await
            .map_err(|e| self.device_error(e))?;
        let mut heals_in_doubt = false;
        for (i, (s, given)) in stored.iter().zip(block_crcs).enumerate() {
            let at = offset + i as u64 * BLOCK_SIZE_BYTES;
            if s != given {
                if c.in_doubt_bad.contains(&at) {
                    heals_in_doubt = true;
                } else {
                    return Err(SledError::OffsetMismatch {
                        column,
                        offset_bytes: offset,
                        length_bytes: length,
                    });
                }
            }
        }
        let crc_updates = if heals_in_doubt {
            self.updated_crc_blocks(index, offset, block_crcs).await?
        } else {
            Vec::new()
        };
        let raise = epoch > c.slot.epoch;
        let next = ColumnSlot {
            generation: c.slot.generation + 1,
            epoch,
            ..c.slot
        };
        // Rewrites blocks below the length: reads that overlap it read again.
        let change = self.begin_change(index)?;
        self.write_and_flush(index, offset, data, crc_updates, raise.then_some(&next))
            .await?;
        if raise {
            c.slot = next;
            self.publish(index, &c);
        }
        drop(change);
        for i in 0..blocks as u64 {
            c.in_doubt_bad.remove(&(offset + i * BLOCK_SIZE_BYTES));
        }
        info!(
            device = self.device_index,
            column = index,
            offset,
            len,
            "append retry rewrote blocks"
        );
        Ok(c.slot.length_bytes)
    }

    /// Reads whole blocks below the column's length, verified. Holds no
    /// lock across device I/O unless changes keep overlapping it (module
    /// docs, invariant 2).
    pub async fn read(
        &self,
        index: u32,
        offset: u64,
        len: u64,
    ) -> Result<(Bytes, Vec<u32>), SledError> {
        if len == 0
            || len % BLOCK_SIZE_BYTES != 0
            || len > MAX_IO_BYTES
            || offset % BLOCK_SIZE_BYTES != 0
        {
            return Err(bad_request(format!(
                "read {offset}+{len} is not whole 4 KiB blocks up to {MAX_IO_BYTES} bytes"
            )));
        }
        for _ in 0..UNLOCKED_READ_ATTEMPTS {
            self.check_healthy()?;
            let before = *lock(self.view(index)?);
            if before.version % 2 == 1 {
                // A rewrite or free is running: wait for it below.
                break;
            }
            self.check_readable(index, before, offset, len)?;
            let (data, stored) = self.read_blocks(index, offset, len).await?;
            if lock(self.view(index)?).version == before.version {
                return self.verified(index, offset, len, data, stored);
            }
            self.metrics.read_retries.inc();
        }
        let c = self.column(index)?.lock().await;
        self.check_usable(index, &c)?;
        self.check_readable(index, ReadView::of(&c, 0), offset, len)?;
        let (data, stored) = self.read_blocks(index, offset, len).await?;
        drop(c);
        self.verified(index, offset, len, data, stored)
    }

    /// Refuses a read of a free column or past its length.
    fn check_readable(
        &self,
        index: u32,
        view: ReadView,
        offset: u64,
        len: u64,
    ) -> Result<(), SledError> {
        let column = self.column_id(index);
        if view.quarantined {
            return Err(SledError::Io {
                reason: format!(
                    "metadata of column {index} on device {} is unreadable",
                    self.device_index
                ),
            });
        }
        if view.state == SlotState::Free {
            return Err(SledError::BadColumnState {
                column,
                state: ColumnState::Free,
            });
        }
        let length = view.length_bytes;
        if offset.checked_add(len).is_none_or(|end| end > length) {
            return Err(SledError::OutOfRange {
                column,
                offset_bytes: offset,
                len_bytes: len,
                length_bytes: length,
                column_size_bytes: self.geometry.column_size_bytes,
            });
        }
        Ok(())
    }

    /// The data of `[offset, offset+len)` of a column and its stored CRCs,
    /// read concurrently, unverified.
    async fn read_blocks(
        &self,
        index: u32,
        offset: u64,
        len: u64,
    ) -> Result<(AlignedBuf, Vec<u32>), SledError> {
        let (data, stored) = futures::join!(
            self.read_device(self.geometry.data_offset(index, offset), len as usize),
            self.stored_crcs(index, offset, len)
        );
        Ok((data?, stored.map_err(|e| self.device_error(e))?))
    }

    /// `data` if every block matches its stored CRC, else `ChecksumMismatch`.
    fn verified(
        &self,
        index: u32,
        offset: u64,
        len: u64,
        data: AlignedBuf,
        stored: Vec<u32>,
    ) -> Result<(Bytes, Vec<u32>), SledError> {
        let bad: Vec<u64> = data
            .chunks(BLOCK_SIZE_BYTES as usize)
            .zip(&stored)
            .enumerate()
            .filter(|(_, (block, crc))| crc32c::crc32c(block) != **crc)
            .map(|(i, _)| offset + i as u64 * BLOCK_SIZE_BYTES)
            .collect();
        if !bad.is_empty() {
            self.metrics.checksum_errors.inc_by(bad.len() as u64);
            warn!(
                device = self.device_index,
                column = index,
                ?bad,
                "checksum mismatch on read"
            );
            return Err(SledError::ChecksumMismatch {
                column: self.column_id(index),
                block_offsets_bytes: bad,
            });
        }
        self.metrics.read_bytes.inc_by(len);
        Ok((data.into_bytes(), stored))
    }

    /// Gives a column back (see module docs for the fencing rule).
    pub async fn free(
        &self,
        index: u32,
        partition: PartitionId,
        epoch: Epoch,
    ) -> Result<(), SledError> {
        self.check_healthy()?;
        let mut c = self.column(index)?.lock().await;
        self.check_usable(index, &c)?;
        match c.slot.state {
            SlotState::Free => return Ok(()),
            SlotState::Allocated => {}
            SlotState::Claimed => self.check_owner(index, &c, partition, epoch)?,
        }
        let next = ColumnSlot {
            generation: c.slot.generation + 1,
            ..ColumnSlot::BLANK
        };
        // The column's bytes go away (discarded, then reused): reads that
        // overlap the free read again and find it Free.
        let change = self.begin_change(index)?;
        self.write_slot(index, &next).await?;
        self.flush().await?;
        c.slot = next;
        c.in_doubt_bad.clear();
        self.publish(index, &c);
        // Discard is advisory: the slot already says Free and the data is
        // unreachable below length 0.
        let size = self.geometry.column_size_bytes;
        if let Err(e) = self
            .device
            .discard(self.geometry.data_offset(index, 0), size)
            .await
        {
            if e.is_device_failure() {
                self.mark_failed(&e.to_string());
            } else {
                warn!(device = self.device_index, column = index, error = %e, "discard failed");
            }
        }
        drop(change);
        drop(c);
        lock(&self.free).insert(index);
        self.metrics
            .set_free_columns(self.device_index, self.free_count());
        Ok(())
    }

    pub async fn status(&self, index: u32) -> Result<ColumnStatus, SledError> {
        self.check_healthy()?;
        let c = self.column(index)?.lock().await;
        self.check_usable(index, &c)?;
        Ok(ColumnStatus {
            column: self.column_id(index),
            state: column_state(c.slot.state),
            partition: (c.slot.state == SlotState::Claimed).then_some(PartitionId {
                volume: c.slot.volume,
                index: c.slot.partition,
            }),
            epoch: c.slot.epoch,
            length_bytes: c.slot.length_bytes,
        })
    }

    /// Claimed columns and their lengths (a snapshot, for the scrubber).
    pub async fn claimed_columns(&self) -> Vec<(u32, u64)> {
        let mut out = Vec::new();
        for (i, c) in self.columns.iter().enumerate() {
            let c = c.lock().await;
            if c.slot.state == SlotState::Claimed && c.slot.length_bytes > 0 {
                out.push((i as u32, c.slot.length_bytes));
            }
        }
        out
    }

    /// Verifies `[offset, offset+len)` of a column (clamped to its current
    /// length) and returns the failing block offsets.
    pub async fn verify(&self, index: u32, offset: u64, len: u64) -> Result<Vec<u64>, SledError> {
        self.check_healthy()?;
        let c = self.column(index)?.lock().await;
        self.check_usable(index, &c)?;
        if c.slot.state != SlotState::Claimed || offset >= c.slot.length_bytes {
            return Ok(Vec::new());
        }
        let len = len.min(c.slot.length_bytes - offset);
        self.verify_blocks(index, offset, len)
            .await
            .map_err(|VerifyError::Device(e)| self.device_error(e))
    }
}

#[derive(Debug)]
enum VerifyError {
    Device(DeviceError),
}
