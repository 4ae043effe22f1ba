//! Head-node messages: the **host protocol** (attach agent / volume client →
//! a partition's primary) and **replication** (primary → secondary).
//!
//! ## Host protocol
//!
//! A [`HostRequest`] names a `(volume, partition, epoch)` and one [`HostOp`].
//! The client learns the partition's primary and epoch from the partition
//! map; a head node that is not (or no longer) the primary for that epoch
//! refuses with [`HostError::NotPrimary`], [`HostError::StaleEpoch`] or
//! [`HostError::Fenced`], and the client refreshes its map
//! ([`HostError::needs_map_refresh`]) and sends again.
//!
//! * Offsets are **volume-absolute bytes** and multiples of
//!   [`SECTOR_BYTES`] (512); lengths are multiples of 512, greater than 0
//!   and at most [`MAX_HOST_IO_BYTES`] (16 MiB). The whole range must lie
//!   inside the named partition ([`HostError::OutOfRange`] otherwise).
//! * Data integrity is end to end: a write carries `crcs[i]` = CRC-32C of
//!   `data[i*4096 .. min((i+1)*4096, len)]` (chunks of one block,
//!   [`BLOCK_SIZE_BYTES`](crate::BLOCK_SIZE_BYTES), counted from the start of the *payload*, the last one possibly short:
//!   see [`chunk_crcs`]); the primary checks them ([`verify_chunk_crcs`])
//!   before logging, and a read reply carries the same kind of CRCs over
//!   the returned payload, which the client checks before handing any byte
//!   to the host.
//! * **Every host operation is idempotent** and may be resent after an
//!   unknown outcome (timeout, lost connection, failover): reads and
//!   flushes change nothing; a write of the same bytes to the same place,
//!   a trim or a write-zeroes of the same range leave the device in the same
//!   state however often they are applied.
//! * **Write ids.** Idempotence alone is not enough: a first attempt of a
//!   write W1 that timed out may still be queued at the primary (or sit in
//!   a TCP connection) while its resend is acknowledged and the host then
//!   writes W2 to the same block; applying the late first attempt would
//!   overwrite W2 with stale data. So every `Write`, `Trim` and
//!   `WriteZeroes` carries a client-assigned `write_id` ([`WriteId`]):
//!   unique per logical operation piece (a random 32-bit client id in the
//!   high bits, a per-client counter in the low bits) and **reused on every
//!   resend of that piece**. The primary keeps a bounded per-partition
//!   dedupe table (id → outcome) and answers a repeated id with the
//!   recorded outcome without applying it again; a copy of an id that is
//!   still in flight waits for the first copy's outcome. `write_id` 0 means
//!   "no id" (never deduplicated; old clients). The table is in memory
//!   only: across a primary change the new epoch fences the old primary
//!   (its queued copies fail with `StaleEpoch`/`Fenced`/`NotPrimary` and
//!   cannot reach the sleds or the secondary), and a resend to the new
//!   primary is an ordinary idempotent write whose outcome the host has not
//!   seen yet, so it cannot be reordered after a newer acknowledged write.
//!
//! * **Attachment credential.** Every request carries the
//!   [`AttachmentCredential`] of the attachment it acts for: the
//!   attachment id and its 128-bit secret token. The unit's replicated
//!   state holds, per volume, only the SHA-256 digest of each valid token
//!   ([`AttachmentToken::digest`]); the primary looks the attachment up in
//!   the state it already applies, hashes the presented token (one
//!   SHA-256 block) and compares in constant time ([`digests_equal`]). A
//!   missing, unknown or revoked credential is refused with
//!   [`HostError::Unauthorized`] before anything else is looked at; the
//!   client does not retry it.
//!
//! ## Replication
//!
//! The primary numbers each change of a partition with a per-partition
//! `sequence` and ships whole 4 KiB-block [`ReplicaRecord`]s to the
//! secondary in [`ReplicaRequest::Append`] (partial writes were already
//! read-modify-written on the primary). The secondary refuses an epoch
//! lower than the highest it has seen ([`ReplicaError::StaleEpoch`]),
//! ignores records it already holds (sequence numbers dedupe, so every
//! replication request is idempotent), refuses a hole
//! ([`ReplicaError::Gap`]: the primary then resends from
//! `expected_sequence`), logs durably and answers
//! [`ReplicaReply::Appended`]. After a flush the primary sends
//! [`ReplicaRequest::FlushCommit`] so the secondary can point its index at
//! the sleds and reclaim its log up to `up_to_sequence`.
//!
//! Wire layouts are in [`crate::message`]'s table.

use std::net::SocketAddr;

use bytes::Bytes;

use crate::sled::{Epoch, PartitionId};
use crate::BLOCK_SIZE_BYTES;

/// Host I/O granularity: offsets and lengths are multiples of this.
pub const SECTOR_BYTES: u64 = 512;
/// Largest host read / write / trim / write-zeroes.
pub const MAX_HOST_IO_BYTES: u32 = crate::frame::MAX_PAYLOAD_BYTES as u32;
/// Most CRCs of one host payload.
pub const MAX_HOST_CRCS: u32 = MAX_HOST_IO_BYTES / BLOCK_SIZE_BYTES as u32;
/// Most records in one [`ReplicaRequest::Append`].
pub const MAX_REPLICA_RECORDS: u32 = 4096;
/// Most mappings in one [`ReplicaRequest::FlushCommit`].
pub const MAX_FLUSHED_RANGES: u32 = 65_536;

/// CRC-32C of each [`BLOCK_SIZE_BYTES`]-byte chunk of `data`, the last one
/// possibly short. Empty data has no chunks.
pub fn chunk_crcs(data: &[u8]) -> Vec<u32> {
    data.chunks(BLOCK_SIZE_BYTES as usize)
        .map(crc32c::crc32c)
        .collect()
}

/// Why a payload does not match its CRCs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CrcError {
    #[error("{actual} CRCs for a payload of {expected} chunks")]
    WrongCount { expected: usize, actual: usize },
    /// The first chunk whose CRC differs; `offset_bytes` is relative to
    /// the payload's start.
    #[error("CRC mismatch in chunk {chunk} (payload offset {offset_bytes})")]
    Mismatch { chunk: usize, offset_bytes: u64 },
}

/// Check `data` against CRCs made by [`chunk_crcs`].
pub fn verify_chunk_crcs(data: &[u8], crcs: &[u32]) -> Result<(), CrcError> {
    let expected = data.len().div_ceil(BLOCK_SIZE_BYTES as usize);
    if crcs.len() != expected {
        return Err(CrcError::WrongCount {
            expected,
            actual: crcs.len(),
        });
    }
    for (chunk, (bytes, crc)) in data.chunks(BLOCK_SIZE_BYTES as usize).zip(crcs).enumerate() {
        if crc32c::crc32c(bytes) != *crc {
            return Err(CrcError::Mismatch {
                chunk,
                offset_bytes: chunk as u64 * BLOCK_SIZE_BYTES,
            });
        }
    }
    Ok(())
}

/// Client-assigned id of one logical write / trim / write-zeroes piece,
/// the same on every resend of it (see the module docs). 0 = no id.
pub type WriteId = u64;

/// Make a [`WriteId`] from a 32-bit client id and a per-client counter
/// (only the counter's low 32 bits are used; it wraps after 2^32 pieces,
/// far beyond any dedupe window).
pub fn make_write_id(client_id: u32, counter: u64) -> WriteId {
    let id = (u64::from(client_id) << 32) | (counter & 0xffff_ffff);
    // 0 means "no id": never hand it out.
    if id == 0 {
        1
    } else {
        id
    }
}

/// Bytes of an [`AttachmentToken`].
pub const ATTACHMENT_TOKEN_BYTES: usize = 16;
/// Bytes of a token digest (SHA-256).
pub const TOKEN_DIGEST_BYTES: usize = 32;

/// SHA-256 of an attachment token: what the unit's state stores.
pub type TokenDigest = [u8; TOKEN_DIGEST_BYTES];

/// The secret of one attachment: 128 random bits, written as 32 lowercase
/// hex digits on the APIs. `Debug` does not show it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AttachmentToken(pub [u8; ATTACHMENT_TOKEN_BYTES]);

impl std::fmt::Debug for AttachmentToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AttachmentToken(..)")
    }
}

/// Why a text is not an [`AttachmentToken`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an attachment token is {} hex digits", ATTACHMENT_TOKEN_BYTES * 2)]
pub struct TokenParseError;

impl AttachmentToken {
    /// A fresh random token from the operating system's generator
    /// (`/dev/urandom`).
    pub fn random() -> std::io::Result<AttachmentToken> {
        use std::io::Read as _;
        let mut bytes = [0u8; ATTACHMENT_TOKEN_BYTES];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        Ok(AttachmentToken(bytes))
    }

    /// Parses 32 hex digits (either case).
    pub fn parse_hex(text: &str) -> Result<AttachmentToken, TokenParseError> {
        let text = text.trim().as_bytes();
        if text.len() != ATTACHMENT_TOKEN_BYTES * 2 {
            return Err(TokenParseError);
        }
        let nibble = |c: u8| match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(TokenParseError),
        };
        let mut bytes = [0u8; ATTACHMENT_TOKEN_BYTES];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = (nibble(text[2 * i])? << 4) | nibble(text[2 * i + 1])?;
        }
        Ok(AttachmentToken(bytes))
    }

    /// 32 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// SHA-256 of the token bytes.
    pub fn digest(&self) -> TokenDigest {
        use sha2::Digest as _;
        sha2::Sha256::digest(self.0).into()
    }
}

/// Compares two digests without an early exit on the first difference.
pub fn digests_equal(a: &TokenDigest, b: &TokenDigest) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What a host presents on every request: which attachment it acts for,
/// and that attachment's secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttachmentCredential {
    /// Attachment id as the unit's state records it (assigned by the zonal
    /// plane, or random with the top bit set for a unit-local attach).
    pub attachment: u64,
    pub token: AttachmentToken,
}

impl AttachmentCredential {
    /// No credential at all (attachment 0, zero token): what an old client
    /// that knows no attachment sends. Always refused.
    pub const NONE: AttachmentCredential = AttachmentCredential {
        attachment: 0,
        token: AttachmentToken([0; ATTACHMENT_TOKEN_BYTES]),
    };
}

/// One host request for one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRequest {
    pub volume: u64,
    pub partition: u32,
    /// The partition's epoch as the client's map knows it.
    pub epoch: Epoch,
    /// The attachment this request acts for (module docs).
    pub credential: AttachmentCredential,
    pub op: HostOp,
}

impl HostRequest {
    pub fn partition_id(&self) -> PartitionId {
        PartitionId {
            volume: self.volume,
            index: self.partition,
        }
    }
}

/// What a host asks of a partition. Offsets are volume-absolute bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostOp {
    Read {
        offset_bytes: u64,
        len_bytes: u32,
    },
    /// `crcs` as made by [`chunk_crcs`] over `data`. `fua`: the reply waits
    /// until the data is durable (it always is before the ack here: both
    /// logs are durable; the flag is kept for hosts that ask).
    Write {
        /// See [`WriteId`]; the same on every resend.
        write_id: WriteId,
        offset_bytes: u64,
        data: Bytes,
        crcs: Vec<u32>,
        fua: bool,
    },
    /// Everything acknowledged before is durable (already true of every
    /// acknowledged write; a barrier for the host).
    Flush,
    /// The range may read back as anything; here it reads as zeros.
    Trim {
        write_id: WriteId,
        offset_bytes: u64,
        len_bytes: u32,
    },
    /// The range reads as zeros.
    WriteZeroes {
        write_id: WriteId,
        offset_bytes: u64,
        len_bytes: u32,
    },
    /// A read of snapshot `snapshot` of the volume (a host of a read-only
    /// snapshot export; checked against the volume's attachment like
    /// [`HostOp::Read`]).
    ReadSnapshot {
        snapshot: u64,
        offset_bytes: u64,
        len_bytes: u32,
    },
    /// The unit's snapshot coordinator to a partition's primary (unit port,
    /// head nodes only: never served on the host port, never from a
    /// host's credential). Answered [`HostReply::Cut`] for a cut,
    /// [`HostReply::Done`] otherwise.
    SnapshotControl {
        snapshot: u64,
        action: SnapshotAction,
    },
    /// One page of the blocks of the partition that read differently in
    /// view `to` than in view `from` (`None`: the live volume, `Some(id)`:
    /// snapshot `id`), from `start_bytes` (volume-absolute, a multiple of
    /// 4096, inside the partition) to the partition's end; at most
    /// `max_ranges` ranges (at least one, at most [`MAX_DIFF_RANGES`]).
    /// Computed from the primary's index (no data read). Unit port only,
    /// from operators and head nodes (never a host's: it names no
    /// attachment). Answered [`HostReply::Diff`].
    SnapshotDiff {
        from: Option<u64>,
        to: Option<u64>,
        start_bytes: u64,
        max_ranges: u32,
    },
    /// The partition's snapshots and the bytes each pins and holds
    /// exclusively. Unit port only, like [`HostOp::SnapshotDiff`].
    /// Answered [`HostReply::SnapshotUsage`].
    SnapshotUsage,
    /// One page of the allocation map of view `view` (`None`: the live
    /// volume, `Some(id)`: snapshot `id`): the blocks that may hold data
    /// (all others read as zeros without a read), from `start_bytes` to
    /// the partition's end, paged like [`HostOp::SnapshotDiff`] (the diff
    /// from the empty volume; every range `zero: false`). A clone's
    /// blocks still read from its parent snapshot count as data. From the
    /// primary's index; unit port only, like the diff. Answered
    /// [`HostReply::Diff`].
    SnapshotMap {
        view: Option<u64>,
        start_bytes: u64,
        max_ranges: u32,
    },
}

/// Most ranges in one [`HostReply::Diff`] page.
pub const MAX_DIFF_RANGES: u32 = 65_536;
/// Most snapshots in one [`HostReply::SnapshotUsage`].
pub const MAX_SNAPSHOT_USAGE: u32 = 65_536;

/// A range of a volume that reads differently in two views (a
/// [`HostOp::SnapshotDiff`] answer), volume-absolute bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangedRange {
    pub offset_bytes: u64,
    pub len_bytes: u64,
    /// The newer view reads zeros there (trimmed, written zeroes, or never
    /// written in it).
    pub zero: bool,
}

/// One snapshot's space on one partition (a [`HostOp::SnapshotUsage`]
/// answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotUsage {
    pub snapshot: u64,
    /// The partition's cut sequence of the snapshot.
    pub cut: u64,
    /// Bytes the snapshot's copy-on-write layer maps (overwritten since
    /// its cut), some maybe shared with other snapshots.
    pub pinned_bytes: u64,
    /// Bytes no other snapshot maps: what deleting it alone frees.
    pub exclusive_bytes: u64,
}

impl HostOp {
    /// `(offset_bytes, len_bytes)` of the op's range; `None` for Flush.
    pub fn range(&self) -> Option<(u64, u32)> {
        match self {
            HostOp::Read {
                offset_bytes,
                len_bytes: len,
            }
            | HostOp::Trim {
                offset_bytes,
                len_bytes: len,
                ..
            }
            | HostOp::WriteZeroes {
                offset_bytes,
                len_bytes: len,
                ..
            }
            | HostOp::ReadSnapshot {
                offset_bytes,
                len_bytes: len,
                ..
            } => Some((*offset_bytes, *len)),
            HostOp::Write {
                offset_bytes, data, ..
            } => Some((*offset_bytes, u32::try_from(data.len()).unwrap_or(u32::MAX))),
            HostOp::Flush
            | HostOp::SnapshotControl { .. }
            | HostOp::SnapshotDiff { .. }
            | HostOp::SnapshotUsage
            | HostOp::SnapshotMap { .. } => None,
        }
    }

    /// The op's [`WriteId`] (`None` for reads, flushes and id 0).
    pub fn write_id(&self) -> Option<WriteId> {
        match self {
            HostOp::Write { write_id, .. }
            | HostOp::Trim { write_id, .. }
            | HostOp::WriteZeroes { write_id, .. } => (*write_id != 0).then_some(*write_id),
            HostOp::Read { .. }
            | HostOp::Flush
            | HostOp::ReadSnapshot { .. }
            | HostOp::SnapshotControl { .. }
            | HostOp::SnapshotDiff { .. }
            | HostOp::SnapshotUsage
            | HostOp::SnapshotMap { .. } => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            HostOp::Read { .. } => "read",
            HostOp::Write { .. } => "write",
            HostOp::Flush => "flush",
            HostOp::Trim { .. } => "trim",
            HostOp::WriteZeroes { .. } => "write_zeroes",
            HostOp::ReadSnapshot { .. } => "read_snapshot",
            HostOp::SnapshotControl { .. } => "snapshot_control",
            HostOp::SnapshotDiff { .. } => "snapshot_diff",
            HostOp::SnapshotUsage => "snapshot_usage",
            HostOp::SnapshotMap { .. } => "snapshot_map",
        }
    }

    /// Check alignment, length bounds and (for writes) the CRCs — what a
    /// primary checks before anything else. Partition bounds are the
    /// caller's ([`HostError::OutOfRange`]).
    pub fn validate(&self) -> Result<(), HostError> {
        let Some((offset_bytes, len)) = self.range() else {
            return Ok(());
        };
        let bad = |reason: String| Err(HostError::BadRequest { reason });
        if offset_bytes % SECTOR_BYTES != 0 {
            return bad(format!(
                "{} offset {offset_bytes} is not a multiple of {SECTOR_BYTES}",
                self.name()
            ));
        }
        if len == 0 || len > MAX_HOST_IO_BYTES || u64::from(len) % SECTOR_BYTES != 0 {
            return bad(format!(
                "{} length {len} must be a non-zero multiple of {SECTOR_BYTES} up to {MAX_HOST_IO_BYTES}",
                self.name()
            ));
        }
        if offset_bytes.checked_add(u64::from(len)).is_none() {
            return bad(format!("{} range overflows", self.name()));
        }
        if let HostOp::Write { data, crcs, .. } = self {
            match verify_chunk_crcs(data, crcs) {
                Ok(()) => {}
                Err(CrcError::WrongCount { expected, actual }) => {
                    return bad(format!("write has {actual} CRCs, needs {expected}"));
                }
                Err(CrcError::Mismatch {
                    offset_bytes: at, ..
                }) => {
                    return Err(HostError::ChecksumMismatch {
                        offset_bytes: offset_bytes + at,
                    });
                }
            }
        }
        Ok(())
    }
}

/// What the snapshot coordinator asks of a partition's primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotAction {
    /// Take the cut; with `hold_ms > 0` the acknowledgements of later
    /// writes wait for [`SnapshotAction::Release`] (or at most `hold_ms`,
    /// after which the partition aborts the cut itself).
    Cut { hold_ms: u32 },
    /// Release the acknowledgements held by the cut.
    Release,
    /// Drop the snapshot (idempotent; also what aborts a cut).
    Drop,
}

/// Where the current primary of a partition can be reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeHint {
    pub node_id: String,
    pub address_a: SocketAddr,
    pub address_b: SocketAddr,
}

/// A head node's answer to a [`HostRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostReply {
    /// Read data with [`chunk_crcs`] of it.
    Data {
        data: Bytes,
        crcs: Vec<u32>,
    },
    /// Write, flush, trim or write-zeroes completed (durable on both logs).
    Done,
    /// A snapshot cut was taken at sequence `cut` (durable on both logs).
    Cut {
        cut: u64,
    },
    /// A page of a [`HostOp::SnapshotDiff`]: the ranges in offset order,
    /// and where the next page starts (`None`: the partition's end).
    Diff {
        ranges: Vec<ChangedRange>,
        next_offset_bytes: Option<u64>,
    },
    /// The answer to [`HostOp::SnapshotUsage`], by snapshot id.
    SnapshotUsage {
        snapshots: Vec<SnapshotUsage>,
    },
    Error(HostError),
}

/// Typed refusals of a host request. None of them applied the request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// This node is not the partition's primary; `hint` names the one it
    /// believes is.
    #[error("not the primary (hint: {hint:?})")]
    NotPrimary { hint: Option<NodeHint> },
    /// The request's epoch is older than the partition's `current`.
    #[error("stale epoch: partition is at epoch {current}")]
    StaleEpoch { current: Epoch },
    /// This node was fenced by a newer primary (epoch `current`).
    #[error("fenced by epoch {current}")]
    Fenced { current: Epoch },
    /// The range is not inside the partition `[partition_start_bytes,
    /// partition_end_bytes)` (volume-absolute bytes).
    #[error("range {offset_bytes}+{len_bytes} outside partition [{partition_start_bytes}, {partition_end_bytes})")]
    OutOfRange {
        offset_bytes: u64,
        len_bytes: u32,
        partition_start_bytes: u64,
        partition_end_bytes: u64,
    },
    /// Data failed its CRC: a write's payload on arrival (resend), or
    /// stored data that could not be reconstructed (volume-absolute
    /// offset of the first bad chunk).
    #[error("checksum mismatch at offset {offset_bytes}")]
    ChecksumMismatch { offset_bytes: u64 },
    /// Temporarily unable (secondary unreachable, log full, partition
    /// recovering): retry later.
    #[error("unavailable: {reason}")]
    Unavailable { reason: String },
    #[error("bad request: {reason}")]
    BadRequest { reason: String },
    #[error("I/O error: {reason}")]
    Io { reason: String },
    /// The request's attachment credential is missing, unknown, revoked
    /// (detached) or for another volume. Nothing was read or applied; the
    /// client must not retry with the same credential.
    #[error("attachment {attachment} is not authorised for this volume (missing, unknown or revoked credential)")]
    Unauthorized { attachment: u64 },
}

impl HostError {
    /// Sending the same request to the same node later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            HostError::Unavailable { .. } | HostError::ChecksumMismatch { .. }
        )
    }

    /// The client's partition map is out of date: refresh it (follow the
    /// hint) and send again.
    pub fn needs_map_refresh(&self) -> bool {
        matches!(
            self,
            HostError::NotPrimary { .. } | HostError::StaleEpoch { .. } | HostError::Fenced { .. }
        )
    }
}

/// Primary → secondary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaRequest {
    /// Log `records` (consecutive sequences, possibly starting below what
    /// the secondary already holds: those are skipped).
    Append {
        partition: PartitionId,
        epoch: Epoch,
        records: Vec<ReplicaRecord>,
    },
    /// Records up to `up_to_sequence` are flushed to the sleds at
    /// `mappings`; the secondary updates its index and may reclaim log.
    FlushCommit {
        partition: PartitionId,
        epoch: Epoch,
        up_to_sequence: u64,
        mappings: Vec<FlushedRange>,
    },
    /// What the secondary holds for the partition.
    Status { partition: PartitionId },
}

impl ReplicaRequest {
    pub fn partition(&self) -> PartitionId {
        match self {
            ReplicaRequest::Append { partition, .. }
            | ReplicaRequest::FlushCommit { partition, .. }
            | ReplicaRequest::Status { partition } => *partition,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicaRecordKind {
    /// `data` holds `blocks` whole blocks.
    Write,
    /// The blocks read as zeros (trim, write-zeroes); `data` is empty.
    Unmap,
    /// A snapshot marker at `sequence` (a cut, or the drop of a snapshot):
    /// `blocks` is 0, `data` the head node's encoded marker.
    Snapshot,
    /// A full-stripe write that went straight to the sleds: `blocks` is 0,
    /// `data` the head node's encoded index record (where the blocks of
    /// `sequence` landed); the blocks themselves are on the sleds already.
    Direct,
}

/// One logged change of whole 4 KiB blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaRecord {
    pub sequence: u64,
    pub kind: ReplicaRecordKind,
    /// First block, volume-absolute, in 4 KiB blocks.
    pub lba: u64,
    pub blocks: u32,
    /// One CRC-32C per block of `data` (empty for Unmap).
    pub crcs: Vec<u32>,
    pub data: Bytes,
}

/// Blocks `[lba, lba + blocks)` written at `sequence` now live in `extent`,
/// `column`, at `offset_bytes` within the column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushedRange {
    pub lba: u64,
    pub blocks: u32,
    pub sequence: u64,
    pub extent: u64,
    pub column: u16,
    pub offset_bytes: u64,
}

/// Secondary → primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaReply {
    /// Every record up to `up_to_sequence` is durable on the secondary.
    Appended {
        up_to_sequence: u64,
    },
    Committed,
    Status {
        highest_epoch: Epoch,
        highest_sequence: u64,
    },
    Error(ReplicaError),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaError {
    #[error("stale epoch: secondary has seen epoch {current}")]
    StaleEpoch { current: Epoch },
    #[error("sequence gap: secondary expects {expected_sequence}")]
    Gap { expected_sequence: u64 },
    #[error("not a secondary of this partition")]
    NotSecondary,
    #[error("secondary log full")]
    LogFull,
    #[error("I/O error: {reason}")]
    Io { reason: String },
    #[error("bad request: {reason}")]
    BadRequest { reason: String },
}

impl ReplicaError {
    /// Sending the same request later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ReplicaError::LogFull | ReplicaError::Io { .. })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn chunk_crcs_cover_a_short_tail() {
        let data = vec![7u8; 4096 + 512];
        let crcs = chunk_crcs(&data);
        assert_eq!(crcs.len(), 2);
        assert_eq!(crcs[1], crc32c::crc32c(&data[4096..]));
        verify_chunk_crcs(&data, &crcs).unwrap();
        assert!(chunk_crcs(&[]).is_empty());
        let mut bad = data.clone();
        bad[4100] ^= 1;
        assert_eq!(
            verify_chunk_crcs(&bad, &crcs),
            Err(CrcError::Mismatch {
                chunk: 1,
                offset_bytes: 4096
            })
        );
        assert!(matches!(
            verify_chunk_crcs(&data, &crcs[..1]),
            Err(CrcError::WrongCount { .. })
        ));
    }

    #[test]
    fn validate_checks_alignment_length_and_crcs() {
        let read = |offset_bytes, len| {
            HostOp::Read {
                offset_bytes,
                len_bytes: len,
            }
            .validate()
        };
        assert!(read(512, 512).is_ok());
        assert!(read(100, 512).is_err());
        assert!(read(0, 0).is_err());
        assert!(read(0, 513).is_err());
        assert!(read(0, MAX_HOST_IO_BYTES + 512).is_err());
        assert!(HostOp::Flush.validate().is_ok());
        let data = Bytes::from(vec![1u8; 8192]);
        let mut crcs = chunk_crcs(&data);
        let write = |crcs: Vec<u32>| HostOp::Write {
            write_id: 1,
            offset_bytes: 4096,
            data: data.clone(),
            crcs,
            fua: false,
        };
        assert!(write(crcs.clone()).validate().is_ok());
        crcs[1] ^= 1;
        assert_eq!(
            write(crcs).validate(),
            Err(HostError::ChecksumMismatch { offset_bytes: 8192 })
        );
    }

    #[test]
    fn tokens_parse_print_and_digest() {
        let token = AttachmentToken::random().unwrap();
        let hex = token.to_hex();
        assert_eq!(hex.len(), 32);
        assert_eq!(AttachmentToken::parse_hex(&hex), Ok(token));
        assert_eq!(AttachmentToken::parse_hex(&hex.to_uppercase()), Ok(token));
        for bad in ["", "abc", &hex[..31], &format!("{hex}0"), &"g".repeat(32)] {
            assert_eq!(
                AttachmentToken::parse_hex(bad),
                Err(TokenParseError),
                "{bad}"
            );
        }
        assert_ne!(AttachmentToken::random().unwrap(), token);
        // SHA-256 of 16 zero bytes (a published test vector).
        let zero = AttachmentToken([0; 16]).digest();
        assert_eq!(zero[..4], [0x37, 0x47, 0x08, 0xff], "{zero:02x?}");
        assert!(digests_equal(&token.digest(), &token.digest()));
        assert!(!digests_equal(&token.digest(), &zero));
        assert!(!format!("{token:?}").contains(&hex[..8]));
        let unauthorized = HostError::Unauthorized { attachment: 3 };
        assert!(!unauthorized.is_retryable() && !unauthorized.needs_map_refresh());
    }

    #[test]
    fn error_predicates() {
        assert!(HostError::NotPrimary { hint: None }.needs_map_refresh());
        assert!(HostError::StaleEpoch { current: 2 }.needs_map_refresh());
        assert!(HostError::Fenced { current: 2 }.needs_map_refresh());
        assert!(HostError::Unavailable {
            reason: String::new()
        }
        .is_retryable());
        let out_of_range = HostError::OutOfRange {
            offset_bytes: 0,
            len_bytes: 512,
            partition_start_bytes: 4096,
            partition_end_bytes: 8192,
        };
        assert!(!out_of_range.is_retryable() && !out_of_range.needs_map_refresh());
    }
}
