//! Sled controller messages.
//!
//! A sled controller owns the columns of its devices. Head nodes allocate,
//! claim (with a partition and an epoch), append to, read and free columns.
//! Every mutating request carries an epoch; the sled refuses a lower epoch
//! than the highest it has persisted for that column with
//! [`SledError::Fenced`].

use std::fmt;

use bytes::Bytes;

/// Fencing credential: raised by the local control plane on every change of a
/// partition's primary.
pub type Epoch = u64;

/// A volume partition: the `index`-th (from 0) partition of `volume`. The
/// one partition identifier of the system: sleds record it as a column's
/// owner, the host and replication protocols name it, and the local control
/// plane keeps it in its replicated state (with the `serde` feature: JSON
/// `{"volume": u64, "index": u32}`, the form that state has always had).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PartitionId {
    pub volume: u64,
    pub index: u32,
}

impl fmt::Display for PartitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.volume, self.index)
    }
}

/// A column of one sled: its device index within the sled and its index on
/// that device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ColumnId {
    pub device: u16,
    pub index: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SledRequest {
    /// Devices, columns and health of the sled.
    Inventory,
    /// Reserve `column_count` free columns (on `device` if given). Not
    /// fenced: an allocated column has no owner until it is claimed.
    AllocateColumns {
        column_count: u32,
        device: Option<u16>,
    },
    /// Give a column back. Fenced by epoch like a write.
    FreeColumn {
        column: ColumnId,
        partition: PartitionId,
        epoch: Epoch,
    },
    /// Take ownership of a column for a partition at an epoch (>= stored).
    Claim {
        column: ColumnId,
        partition: PartitionId,
        epoch: Epoch,
    },
    /// Append whole 4 KiB blocks at byte `offset_bytes`, which must equal
    /// the column's length, or be a retry of blocks already appended with
    /// the same CRCs. `block_crcs[i]` is the CRC-32C of the i-th 4 KiB block
    /// of `data`.
    Append {
        column: ColumnId,
        partition: PartitionId,
        epoch: Epoch,
        offset_bytes: u64,
        data: Bytes,
        block_crcs: Vec<u32>,
    },
    /// Read whole 4 KiB blocks of a column below its length: `len_bytes`
    /// bytes from byte `offset_bytes`.
    Read {
        column: ColumnId,
        offset_bytes: u64,
        len_bytes: u32,
    },
    /// State of one column.
    ColumnStatus { column: ColumnId },
    /// Results of the background scrubber so far.
    ScrubReport,
}

impl SledRequest {
    /// Safe to send again when the first send's outcome is unknown.
    /// Append is idempotent by construction (same offset + same CRCs).
    pub fn is_idempotent(&self) -> bool {
        !matches!(self, SledRequest::AllocateColumns { .. })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    Healthy,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInventory {
    pub device: u16,
    pub path: String,
    pub size_bytes: u64,
    pub column_count: u32,
    pub free_columns: u32,
    pub state: DeviceState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SledInventory {
    pub sled_id: String,
    pub column_size_bytes: u64,
    pub devices: Vec<DeviceInventory>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnState {
    Free,
    Allocated,
    Claimed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnStatus {
    pub column: ColumnId,
    pub state: ColumnState,
    /// Owner, once claimed.
    pub partition: Option<PartitionId>,
    /// Highest epoch accepted (0 before the first claim).
    pub epoch: Epoch,
    /// Bytes appended so far (a multiple of 4 KiB).
    pub length_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BadBlock {
    pub column: ColumnId,
    /// Byte offset of the block in the column.
    pub offset_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrubReport {
    /// Completed passes over every claimed column.
    pub passes: u64,
    pub bytes_verified: u64,
    pub bad_blocks: Vec<BadBlock>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SledResponse {
    Inventory(SledInventory),
    Allocated(Vec<ColumnId>),
    Freed,
    Claimed {
        epoch: Epoch,
        length_bytes: u64,
    },
    Appended {
        length_bytes: u64,
    },
    /// `block_crcs` are the stored CRCs, so the reader checks end to end.
    Data {
        data: Bytes,
        block_crcs: Vec<u32>,
    },
    ColumnStatus(ColumnStatus),
    ScrubReport(ScrubReport),
    Error(SledError),
}

/// Typed refusals; every one leaves the sled's state unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SledError {
    #[error("fenced: column epoch is {current_epoch}")]
    Fenced { current_epoch: Epoch },
    #[error("column {column:?} belongs to partition {owner:?}")]
    WrongPartition {
        column: ColumnId,
        owner: PartitionId,
    },
    #[error("no such column {column:?}")]
    NoSuchColumn { column: ColumnId },
    #[error("column {column:?} is {state:?}, operation needs another state")]
    BadColumnState {
        column: ColumnId,
        state: ColumnState,
    },
    #[error("append at {offset_bytes} but column {column:?} has length {length_bytes}")]
    OffsetMismatch {
        column: ColumnId,
        offset_bytes: u64,
        length_bytes: u64,
    },
    #[error("range {offset_bytes}+{len_bytes} outside column {column:?} (length {length_bytes}, size {column_size_bytes})")]
    OutOfRange {
        column: ColumnId,
        offset_bytes: u64,
        len_bytes: u64,
        length_bytes: u64,
        column_size_bytes: u64,
    },
    /// `block_offsets_bytes`: byte offset in the column of each bad block.
    #[error("checksum mismatch in column {column:?} at offsets {block_offsets_bytes:?}")]
    ChecksumMismatch {
        column: ColumnId,
        block_offsets_bytes: Vec<u64>,
    },
    #[error("device {device} has failed")]
    DeviceFailed { device: u16 },
    #[error("no free column")]
    NoSpace,
    #[error("bad request: {reason}")]
    BadRequest { reason: String },
    #[error("I/O error: {reason}")]
    Io { reason: String },
}

impl SledError {
    /// Worth retrying later (possibly elsewhere) without changing the request.
    pub fn is_retryable(&self) -> bool {
        matches!(self, SledError::Io { .. })
    }
}
