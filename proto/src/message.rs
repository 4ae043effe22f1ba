//! [`Message`]: every message that crosses a rackblock network, and its
//! body layout.
//!
//! A message travels as one frame (see [`crate::frame`]): the frame's `kind`
//! says which message it is, the body holds the fields in declaration
//! order with the encodings of [`crate::wire`] (little-endian integers,
//! `u8` tags for enums/options/bools, `u32` length prefixes). Each
//! [`SledRequest`], [`SledResponse`], [`HostOp`], [`HostReply`],
//! [`ReplicaRequest`] and [`ReplicaReply`] variant has its own kind, so the
//! body carries no further tag.
//!
//! Kind numbering (`u16`): the high byte is the component, and within a
//! component `0x..00-0x..7f` are requests and `0x..80-0x..ff` responses.
//!
//! | range | component |
//! |---|---|
//! | `0x0001` Ping, `0x0002` Pong | transport (answered by the server itself) |
//! | `0x0101-0x0108` | sled controller requests, in [`SledRequest`] order |
//! | `0x0181-0x0189` | sled controller responses, in [`SledResponse`] order |
//! | `0x0201-0x0209` | host requests ([`HostOp`] order), see [`crate::volume`] |
//! | `0x0211-0x0213` | replication requests ([`ReplicaRequest`] order) |
//! | `0x0221`, `0x02a1` | host partition map request and reply |
//! | `0x0281-0x0286` | host replies ([`HostReply`] order) |
//! | `0x0291-0x0294` | replication replies ([`ReplicaReply`] order) |
//! | `0x0301-0x0302` | local control plane requests: Raft RPC, client API |
//! | `0x0381-0x0382` | local control plane responses |
//!
//! Field layouts (`|` separates fields; composite types below):
//!
//! | kind | message | body |
//! |---|---|---|
//! | 0x0001 | Ping | nonce u64 |
//! | 0x0002 | Pong | nonce u64 |
//! | 0x0101 | Inventory | (empty) |
//! | 0x0102 | AllocateColumns | column_count u32 \| device `Option<u16>` |
//! | 0x0103 | FreeColumn | column \| partition \| epoch u64 |
//! | 0x0104 | Claim | column \| partition \| epoch u64 |
//! | 0x0105 | Append | column \| partition \| epoch u64 \| offset_bytes u64 \| data bytes(≤16 MiB) \| block_crcs `Vec<u32>`(≤4096) |
//! | 0x0106 | Read | column \| offset_bytes u64 \| len_bytes u32 |
//! | 0x0107 | ColumnStatus | column |
//! | 0x0108 | ScrubReport | (empty) |
//! | 0x0181 | Inventory | sled_id string \| column_size_bytes u64 \| devices `Vec<device>`(≤1024) |
//! | 0x0182 | Allocated | `Vec<column>`(≤65536) |
//! | 0x0183 | Freed | (empty) |
//! | 0x0184 | Claimed | epoch u64 \| length_bytes u64 |
//! | 0x0185 | Appended | length_bytes u64 |
//! | 0x0186 | Data | data bytes(≤16 MiB) \| block_crcs `Vec<u32>`(≤4096) |
//! | 0x0187 | ColumnStatus | column \| state u8 \| partition `Option<partition>` \| epoch u64 \| length_bytes u64 |
//! | 0x0188 | ScrubReport | passes u64 \| bytes_verified u64 \| bad_blocks `Vec<column \| offset_bytes u64>`(≤65536) |
//! | 0x0189 | Error | error |
//! | 0x0201 | HostRead | host \| offset_bytes u64 \| len_bytes u32 |
//! | 0x0202 | HostWrite | host \| write_id u64 \| offset_bytes u64 \| data bytes(≤16 MiB) \| crcs `Vec<u32>`(≤4096) \| fua bool |
//! | 0x0203 | HostFlush | host |
//! | 0x0204 | HostTrim | host \| write_id u64 \| offset_bytes u64 \| len_bytes u32 |
//! | 0x0205 | HostWriteZeroes | host \| write_id u64 \| offset_bytes u64 \| len_bytes u32 |
//! | 0x0206 | HostReadSnapshot | host \| snapshot u64 \| offset_bytes u64 \| len_bytes u32 |
//! | 0x0207 | HostSnapshotControl (unit port only) | host \| snapshot u64 \| action u8 (0 Cut, 1 Release, 2 Drop) \| hold_ms u32 |
//! | 0x0208 | HostSnapshotDiff (unit port only) | host \| from `Option<u64>` \| to `Option<u64>` \| start_bytes u64 \| max_ranges u32 |
//! | 0x0209 | HostSnapshotUsage (unit port only) | host |
//! | 0x020a | HostSnapshotMap (unit port only) | host \| view `Option<u64>` \| start_bytes u64 \| max_ranges u32 |
//! | 0x0211 | ReplicaAppend | partition \| epoch u64 \| records `Vec<record>`(≤4096) |
//! | 0x0212 | ReplicaFlushCommit | partition \| epoch u64 \| up_to_sequence u64 \| mappings `Vec<flushed>`(≤65536) |
//! | 0x0213 | ReplicaStatus | partition |
//! | 0x0221 | HostMap | volume u64 \| attachment u64 \| token `[u8; 16]` |
//! | 0x02a1 | HostMapReply | payload bytes(≤16 MiB): the partition map, serde JSON of `local-control-plane` |
//! | 0x0222 | HostReservations | volume u64 \| attachment u64 \| token `[u8; 16]` \| payload bytes(≤16 MiB): serde JSON of `local-control-plane` |
//! | 0x02a2 | HostReservationsReply | payload bytes(≤16 MiB): serde JSON of `local-control-plane` |
//! | 0x0281 | HostData | data bytes(≤16 MiB) \| crcs `Vec<u32>`(≤4096) |
//! | 0x0282 | HostDone | (empty) |
//! | 0x0283 | HostError | host error |
//! | 0x0284 | HostCut | cut u64 |
//! | 0x0285 | HostDiff | ranges `Vec<offset_bytes u64 \| len_bytes u64 \| zero bool>`(≤65536) \| next_offset_bytes `Option<u64>` |
//! | 0x0286 | HostSnapshotUsage | snapshots `Vec<snapshot u64 \| cut u64 \| pinned_bytes u64 \| exclusive_bytes u64>`(≤65536) |
//! | 0x0291 | ReplicaAppended | up_to_sequence u64 |
//! | 0x0292 | ReplicaCommitted | (empty) |
//! | 0x0293 | ReplicaStatus | highest_epoch u64 \| highest_sequence u64 |
//! | 0x0294 | ReplicaError | replica error |
//! | 0x0301 | Raft | rpc u8 (0 AppendEntries, 1 Vote, 2 InstallSnapshot) \| payload bytes(≤16 MiB) |
//! | 0x0302 | Lcp | idempotent bool \| payload bytes(≤16 MiB) |
//! | 0x0381 | RaftReply | payload bytes(≤16 MiB) |
//! | 0x0382 | LcpReply | payload bytes(≤16 MiB) |
//!
//! * column = device u16 | index u32; partition = volume u64 | index u32
//! * device = device u16 | path string | size_bytes u64 | column_count u32 |
//!   free_columns u32 | state u8 (0 Healthy, 1 Failed)
//! * column state u8: 0 Free, 1 Allocated, 2 Claimed
//! * strings are UTF-8, at most [`MAX_STRING_BYTES`]
//! * error = tag u8, then: 0 Fenced{current_epoch u64}, 1 WrongPartition
//!   {column, owner partition}, 2 NoSuchColumn{column}, 3 BadColumnState
//!   {column, state u8}, 4 OffsetMismatch{column, offset_bytes u64,
//!   length_bytes u64}, 5 OutOfRange{column, offset_bytes u64, len_bytes
//!   u64, length_bytes u64, column_size_bytes u64}, 6 ChecksumMismatch
//!   {column, block_offsets_bytes `Vec<u64>`(≤4096)}, 7 DeviceFailed{device
//!   u16}, 8 NoSpace, 9 BadRequest{reason string}, 10 Io{reason string}
//!
//! * host = volume u64 | partition u32 | epoch u64 | attachment u64 |
//!   token `[u8; 16]` (the [`HostRequest`] header with its
//!   [`AttachmentCredential`](crate::volume::AttachmentCredential), before
//!   the op's fields)
//! * record = sequence u64 | kind u8 (0 Write, 1 Unmap) | lba u64 |
//!   blocks u32 | crcs `Vec<u32>`(≤4096) | data bytes(≤16 MiB)
//! * flushed = lba u64 | blocks u32 | sequence u64 | extent u64 | column
//!   u16 | offset_bytes u64
//! * address = tag u8, then 4: ip `[u8; 4]` | port u16, or 6: ip `[u8; 16]`
//!   | port u16 | flowinfo u32 | scope_id u32
//! * host error = tag u8, then: 0 NotPrimary{hint `Option<node_id string |
//!   address_a address | address_b address>`}, 1 StaleEpoch{current u64},
//!   2 Fenced{current u64}, 3 OutOfRange{offset_bytes u64, len_bytes u32,
//!   partition_start_bytes u64, partition_end_bytes u64}, 4 ChecksumMismatch
//!   {offset_bytes u64}, 5 Unavailable{reason string}, 6 BadRequest{reason
//!   string}, 7 Io{reason string}, 8 Unauthorized{attachment u64}
//! * replica error = tag u8, then: 0 StaleEpoch{current u64}, 1 Gap
//!   {expected_sequence u64}, 2 NotSecondary, 3 LogFull, 4 Io{reason
//!   string}, 5 BadRequest{reason string}
//!
//! Local-control-plane payloads are serde-encoded by that crate and opaque
//! here (see [`crate::lcp`]).
//!
//! Unknown kinds and tags, over-long fields and trailing bytes are decode
//! errors. `data` payloads decode zero-copy as slices of the frame body.
//! Changing any layout requires a new frame version or new kinds.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use bytes::{Bytes, BytesMut};

use crate::frame::{Frame, FrameBuilder, FrameError, FLAG_RESPONSE, MAX_PAYLOAD_BYTES};
use crate::lcp::{RaftRpcKind, MAX_LCP_PAYLOAD_BYTES};
use crate::sled::{
    BadBlock, ColumnId, ColumnState, ColumnStatus, DeviceInventory, DeviceState, PartitionId,
    ScrubReport, SledError, SledInventory, SledRequest, SledResponse,
};
use crate::volume::{
    AttachmentCredential, AttachmentToken, ChangedRange, FlushedRange, HostError, HostOp,
    HostReply, HostRequest, NodeHint, ReplicaError, ReplicaRecord, ReplicaRecordKind, ReplicaReply,
    ReplicaRequest, SnapshotAction, SnapshotUsage, MAX_DIFF_RANGES, MAX_FLUSHED_RANGES,
    MAX_HOST_CRCS, MAX_HOST_IO_BYTES, MAX_REPLICA_RECORDS, MAX_SNAPSHOT_USAGE,
};
use crate::wire::{DecodeError, Reader, Writer};
use crate::BLOCK_SIZE_BYTES;

/// Longest string field (paths, ids, error reasons).
pub const MAX_STRING_BYTES: u32 = 4096;
/// Most block CRCs per message: one per 4 KiB block of a maximal payload.
pub const MAX_BLOCK_CRCS: u32 = (MAX_PAYLOAD_BYTES as u64 / BLOCK_SIZE_BYTES) as u32;
/// Most devices in one sled inventory.
pub const MAX_DEVICES: u32 = 1024;
/// Most columns in one allocation reply / bad blocks in one scrub report.
pub const MAX_COLUMNS: u32 = 65_536;

/// Message kinds (frame `kind` field).
pub mod kind {
    pub const PING: u16 = 0x0001;
    pub const PONG: u16 = 0x0002;

    pub const SLED_INVENTORY: u16 = 0x0101;
    pub const SLED_ALLOCATE_COLUMNS: u16 = 0x0102;
    pub const SLED_FREE_COLUMN: u16 = 0x0103;
    pub const SLED_CLAIM: u16 = 0x0104;
    pub const SLED_APPEND: u16 = 0x0105;
    pub const SLED_READ: u16 = 0x0106;
    pub const SLED_COLUMN_STATUS: u16 = 0x0107;
    pub const SLED_SCRUB_REPORT: u16 = 0x0108;

    pub const SLED_INVENTORY_REPLY: u16 = 0x0181;
    pub const SLED_ALLOCATED: u16 = 0x0182;
    pub const SLED_FREED: u16 = 0x0183;
    pub const SLED_CLAIMED: u16 = 0x0184;
    pub const SLED_APPENDED: u16 = 0x0185;
    pub const SLED_DATA: u16 = 0x0186;
    pub const SLED_COLUMN_STATUS_REPLY: u16 = 0x0187;
    pub const SLED_SCRUB_REPORT_REPLY: u16 = 0x0188;
    pub const SLED_ERROR: u16 = 0x0189;

    /// First kind reserved for head-node messages.
    pub const HEAD_NODE_FIRST: u16 = 0x0200;
    pub const HOST_READ: u16 = 0x0201;
    pub const HOST_WRITE: u16 = 0x0202;
    pub const HOST_FLUSH: u16 = 0x0203;
    pub const HOST_TRIM: u16 = 0x0204;
    pub const HOST_WRITE_ZEROES: u16 = 0x0205;
    pub const HOST_READ_SNAPSHOT: u16 = 0x0206;
    /// Not a host request: the snapshot coordinator's, unit port only.
    pub const HOST_SNAPSHOT_CONTROL: u16 = 0x0207;
    /// An index diff page of a partition (unit port only: operators and
    /// head nodes).
    pub const HOST_SNAPSHOT_DIFF: u16 = 0x0208;
    /// A partition's snapshot space (unit port only, like the diff).
    pub const HOST_SNAPSHOT_USAGE: u16 = 0x0209;
    /// An allocation-map page of a partition (unit port only, like the
    /// diff).
    pub const HOST_SNAPSHOT_MAP: u16 = 0x020a;
    pub const REPLICA_APPEND: u16 = 0x0211;
    pub const REPLICA_FLUSH_COMMIT: u16 = 0x0212;
    pub const REPLICA_STATUS: u16 = 0x0213;
    pub const HOST_MAP: u16 = 0x0221;
    pub const HOST_MAP_REPLY: u16 = 0x02a1;
    pub const HOST_RESERVATIONS: u16 = 0x0222;
    pub const HOST_RESERVATIONS_REPLY: u16 = 0x02a2;
    pub const HOST_DATA: u16 = 0x0281;
    pub const HOST_DONE: u16 = 0x0282;
    pub const HOST_ERROR: u16 = 0x0283;
    pub const HOST_CUT: u16 = 0x0284;
    pub const HOST_DIFF: u16 = 0x0285;
    pub const HOST_SNAPSHOT_USAGE_REPLY: u16 = 0x0286;
    pub const REPLICA_APPENDED: u16 = 0x0291;
    pub const REPLICA_COMMITTED: u16 = 0x0292;
    pub const REPLICA_STATUS_REPLY: u16 = 0x0293;
    pub const REPLICA_ERROR: u16 = 0x0294;

    /// The request kinds a host sends (a head node's host port takes
    /// these and Ping, nothing else).
    pub fn is_host_request(kind: u16) -> bool {
        matches!(
            kind,
            PING | HOST_READ
                | HOST_WRITE
                | HOST_FLUSH
                | HOST_TRIM
                | HOST_WRITE_ZEROES
                | HOST_READ_SNAPSHOT
                | HOST_MAP
                | HOST_RESERVATIONS
        )
    }
    /// First kind reserved for local-control-plane messages.
    pub const LOCAL_CONTROL_PLANE_FIRST: u16 = 0x0300;
    pub const LCP_RAFT: u16 = 0x0301;
    pub const LCP_CLIENT: u16 = 0x0302;
    pub const LCP_RAFT_REPLY: u16 = 0x0381;
    pub const LCP_CLIENT_REPLY: u16 = 0x0382;

    /// Whether `kind` is in the response half of its component range.
    pub fn is_response(kind: u16) -> bool {
        kind == PONG || (kind >= 0x0100 && kind & 0x0080 != 0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    Sled(SledRequest),
    SledReply(SledResponse),
    /// One openraft RPC between head nodes; `payload` is the serde-encoded
    /// openraft request of kind `rpc`.
    Raft {
        rpc: RaftRpcKind,
        payload: Bytes,
    },
    /// Answer to [`Message::Raft`]: the serde-encoded result.
    RaftReply {
        payload: Bytes,
    },
    /// A control-plane client request (serde JSON of the local control
    /// plane's request type). `idempotent`: safe to resend (reads).
    Lcp {
        idempotent: bool,
        payload: Bytes,
    },
    /// Answer to [`Message::Lcp`].
    LcpReply {
        payload: Bytes,
    },
    /// Host I/O for one partition, to its primary.
    Host(HostRequest),
    /// Answer to [`Message::Host`].
    HostReply(HostReply),
    /// Replication, primary to secondary.
    Replica(ReplicaRequest),
    /// Answer to [`Message::Replica`].
    ReplicaReply(ReplicaReply),
    /// A host asks for the partition map of the volume its attachment
    /// credential is for (the host port's only control-plane read).
    HostMap {
        volume: u64,
        credential: AttachmentCredential,
    },
    /// Answer to [`Message::HostMap`] (a refusal is a
    /// [`HostReply::Error`] instead): the map, opaque here.
    HostMapReply {
        payload: Bytes,
    },
    /// A host reads or compare-and-sets the SCSI persistent reservations
    /// of the volume its attachment credential is for (the request,
    /// opaque here, is the control plane's).
    HostReservations {
        volume: u64,
        credential: AttachmentCredential,
        payload: Bytes,
    },
    /// Answer to [`Message::HostReservations`] (a refusal is a
    /// [`HostReply::Error`] instead): opaque here.
    HostReservationsReply {
        payload: Bytes,
    },
}

impl Message {
    pub fn kind(&self) -> u16 {
        use kind::*;
        match self {
            Message::Ping { .. } => PING,
            Message::Pong { .. } => PONG,
            Message::Sled(request) => match request {
                SledRequest::Inventory => SLED_INVENTORY,
                SledRequest::AllocateColumns { .. } => SLED_ALLOCATE_COLUMNS,
                SledRequest::FreeColumn { .. } => SLED_FREE_COLUMN,
                SledRequest::Claim { .. } => SLED_CLAIM,
                SledRequest::Append { .. } => SLED_APPEND,
                SledRequest::Read { .. } => SLED_READ,
                SledRequest::ColumnStatus { .. } => SLED_COLUMN_STATUS,
                SledRequest::ScrubReport => SLED_SCRUB_REPORT,
            },
            Message::SledReply(response) => match response {
                SledResponse::Inventory(_) => SLED_INVENTORY_REPLY,
                SledResponse::Allocated(_) => SLED_ALLOCATED,
                SledResponse::Freed => SLED_FREED,
                SledResponse::Claimed { .. } => SLED_CLAIMED,
                SledResponse::Appended { .. } => SLED_APPENDED,
                SledResponse::Data { .. } => SLED_DATA,
                SledResponse::ColumnStatus(_) => SLED_COLUMN_STATUS_REPLY,
                SledResponse::ScrubReport(_) => SLED_SCRUB_REPORT_REPLY,
                SledResponse::Error(_) => SLED_ERROR,
            },
            Message::Raft { .. } => LCP_RAFT,
            Message::Lcp { .. } => LCP_CLIENT,
            Message::RaftReply { .. } => LCP_RAFT_REPLY,
            Message::LcpReply { .. } => LCP_CLIENT_REPLY,
            Message::Host(request) => match request.op {
                HostOp::Read { .. } => HOST_READ,
                HostOp::Write { .. } => HOST_WRITE,
                HostOp::Flush => HOST_FLUSH,
                HostOp::Trim { .. } => HOST_TRIM,
                HostOp::WriteZeroes { .. } => HOST_WRITE_ZEROES,
                HostOp::ReadSnapshot { .. } => HOST_READ_SNAPSHOT,
                HostOp::SnapshotControl { .. } => HOST_SNAPSHOT_CONTROL,
                HostOp::SnapshotDiff { .. } => HOST_SNAPSHOT_DIFF,
                HostOp::SnapshotUsage => HOST_SNAPSHOT_USAGE,
                HostOp::SnapshotMap { .. } => HOST_SNAPSHOT_MAP,
            },
            Message::HostReply(reply) => match reply {
                HostReply::Data { .. } => HOST_DATA,
                HostReply::Done => HOST_DONE,
                HostReply::Cut { .. } => HOST_CUT,
                HostReply::Diff { .. } => HOST_DIFF,
                HostReply::SnapshotUsage { .. } => HOST_SNAPSHOT_USAGE_REPLY,
                HostReply::Error(_) => HOST_ERROR,
            },
            Message::Replica(request) => match request {
                ReplicaRequest::Append { .. } => REPLICA_APPEND,
                ReplicaRequest::FlushCommit { .. } => REPLICA_FLUSH_COMMIT,
                ReplicaRequest::Status { .. } => REPLICA_STATUS,
            },
            Message::ReplicaReply(reply) => match reply {
                ReplicaReply::Appended { .. } => REPLICA_APPENDED,
                ReplicaReply::Committed => REPLICA_COMMITTED,
                ReplicaReply::Status { .. } => REPLICA_STATUS_REPLY,
                ReplicaReply::Error(_) => REPLICA_ERROR,
            },
            Message::HostMap { .. } => HOST_MAP,
            Message::HostMapReply { .. } => HOST_MAP_REPLY,
            Message::HostReservations { .. } => HOST_RESERVATIONS,
            Message::HostReservationsReply { .. } => HOST_RESERVATIONS_REPLY,
        }
    }

    /// Responses answer a request; they are never sent as requests.
    pub fn is_response(&self) -> bool {
        matches!(
            self,
            Message::Pong { .. }
                | Message::SledReply(_)
                | Message::RaftReply { .. }
                | Message::LcpReply { .. }
                | Message::HostReply(_)
                | Message::ReplicaReply(_)
                | Message::HostMapReply { .. }
                | Message::HostReservationsReply { .. }
        )
    }

    /// A control-plane request (Raft RPC or LCP client request): what a
    /// server with a control runtime serves there (crate::server).
    pub fn is_control(&self) -> bool {
        matches!(self, Message::Raft { .. } | Message::Lcp { .. })
    }

    /// Safe to send again when the first send's outcome is unknown.
    /// Responses are not requests and report `false`.
    pub fn is_idempotent(&self) -> bool {
        match self {
            Message::Ping { .. } => true,
            Message::Sled(request) => request.is_idempotent(),
            // Raft tolerates duplicated and reordered RPCs.
            Message::Raft { .. } => true,
            Message::Lcp { idempotent, .. } => *idempotent,
            // Every host op is idempotent for a block device, and replicas
            // dedupe by sequence (see `crate::volume`).
            Message::Host(_) | Message::Replica(_) | Message::HostMap { .. } => true,
            // A compare-and-set sent twice fails the second time (the
            // version moved): the sender cannot tell it applied.
            Message::HostReservations { .. } => false,
            Message::Pong { .. }
            | Message::SledReply(_)
            | Message::RaftReply { .. }
            | Message::LcpReply { .. }
            | Message::HostReply(_)
            | Message::ReplicaReply(_)
            | Message::HostMapReply { .. }
            | Message::HostReservationsReply { .. } => false,
        }
    }

    /// Bytes of data payload carried (for capacity hints).
    fn payload_len(&self) -> usize {
        match self {
            Message::Sled(SledRequest::Append { data, .. })
            | Message::SledReply(SledResponse::Data { data, .. }) => data.len(),
            Message::Raft { payload, .. }
            | Message::RaftReply { payload }
            | Message::Lcp { payload, .. }
            | Message::LcpReply { payload }
            | Message::HostMapReply { payload }
            | Message::HostReservations { payload, .. }
            | Message::HostReservationsReply { payload } => payload.len(),
            Message::Host(HostRequest {
                op: HostOp::Write { data, .. },
                ..
            })
            | Message::HostReply(HostReply::Data { data, .. }) => data.len(),
            Message::Replica(ReplicaRequest::Append { records, .. }) => {
                records.iter().map(|record| record.data.len()).sum()
            }
            _ => 0,
        }
    }

    /// Append the body (layout in the module docs) to `buf`.
    pub fn encode_body(&self, buf: &mut BytesMut) {
        let w = &mut Writer::new(buf);
        match self {
            Message::Ping { nonce } | Message::Pong { nonce } => w.u64(*nonce),
            Message::Sled(request) => match request {
                SledRequest::Inventory | SledRequest::ScrubReport => {}
                SledRequest::AllocateColumns {
                    column_count,
                    device,
                } => {
                    w.u32(*column_count);
                    w.option(device.as_ref(), |w, d| w.u16(*d));
                }
                SledRequest::FreeColumn {
                    column,
                    partition,
                    epoch,
                }
                | SledRequest::Claim {
                    column,
                    partition,
                    epoch,
                } => {
                    put_column(w, column);
                    put_partition(w, partition);
                    w.u64(*epoch);
                }
                SledRequest::Append {
                    column,
                    partition,
                    epoch,
                    offset_bytes,
                    data,
                    block_crcs,
                } => {
                    put_column(w, column);
                    put_partition(w, partition);
                    w.u64(*epoch);
                    w.u64(*offset_bytes);
                    w.bytes(data);
                    w.vec(block_crcs, |w, crc| w.u32(*crc));
                }
                SledRequest::Read {
                    column,
                    offset_bytes,
                    len_bytes,
                } => {
                    put_column(w, column);
                    w.u64(*offset_bytes);
                    w.u32(*len_bytes);
                }
                SledRequest::ColumnStatus { column } => put_column(w, column),
            },
            Message::SledReply(response) => match response {
                SledResponse::Inventory(inventory) => {
                    w.string(&inventory.sled_id);
                    w.u64(inventory.column_size_bytes);
                    w.vec(&inventory.devices, |w, device| {
                        w.u16(device.device);
                        w.string(&device.path);
                        w.u64(device.size_bytes);
                        w.u32(device.column_count);
                        w.u32(device.free_columns);
                        w.u8(device_state_tag(device.state));
                    });
                }
                SledResponse::Allocated(columns) => w.vec(columns, put_column),
                SledResponse::Freed => {}
                SledResponse::Claimed {
                    epoch,
                    length_bytes,
                } => {
                    w.u64(*epoch);
                    w.u64(*length_bytes);
                }
                SledResponse::Appended { length_bytes } => w.u64(*length_bytes),
                SledResponse::Data { data, block_crcs } => {
                    w.bytes(data);
                    w.vec(block_crcs, |w, crc| w.u32(*crc));
                }
                SledResponse::ColumnStatus(status) => {
                    put_column(w, &status.column);
                    w.u8(column_state_tag(status.state));
                    w.option(status.partition.as_ref(), put_partition);
                    w.u64(status.epoch);
                    w.u64(status.length_bytes);
                }
                SledResponse::ScrubReport(report) => {
                    w.u64(report.passes);
                    w.u64(report.bytes_verified);
                    w.vec(&report.bad_blocks, |w, bad| {
                        put_column(w, &bad.column);
                        w.u64(bad.offset_bytes);
                    });
                }
                SledResponse::Error(error) => put_sled_error(w, error),
            },
            Message::Raft { rpc, payload } => {
                w.u8(rpc.tag());
                w.bytes(payload);
            }
            Message::Lcp {
                idempotent,
                payload,
            } => {
                w.bool(*idempotent);
                w.bytes(payload);
            }
            Message::RaftReply { payload }
            | Message::LcpReply { payload }
            | Message::HostMapReply { payload }
            | Message::HostReservationsReply { payload } => w.bytes(payload),
            Message::HostReservations {
                volume,
                credential,
                payload,
            } => {
                w.u64(*volume);
                w.u64(credential.attachment);
                w.raw(&credential.token.0);
                w.bytes(payload);
            }
            Message::HostMap { volume, credential } => {
                w.u64(*volume);
                w.u64(credential.attachment);
                w.raw(&credential.token.0);
            }
            Message::Host(request) => {
                w.u64(request.volume);
                w.u32(request.partition);
                w.u64(request.epoch);
                w.u64(request.credential.attachment);
                w.raw(&request.credential.token.0);
                match &request.op {
                    HostOp::Read {
                        offset_bytes,
                        len_bytes,
                    } => {
                        w.u64(*offset_bytes);
                        w.u32(*len_bytes);
                    }
                    HostOp::Trim {
                        write_id,
                        offset_bytes,
                        len_bytes,
                    }
                    | HostOp::WriteZeroes {
                        write_id,
                        offset_bytes,
                        len_bytes,
                    } => {
                        w.u64(*write_id);
                        w.u64(*offset_bytes);
                        w.u32(*len_bytes);
                    }
                    HostOp::Write {
                        write_id,
                        offset_bytes,
                        data,
                        crcs,
                        fua,
                    } => {
                        w.u64(*write_id);
                        w.u64(*offset_bytes);
                        w.bytes(data);
                        w.vec(crcs, |w, crc| w.u32(*crc));
                        w.bool(*fua);
                    }
                    HostOp::Flush => {}
                    HostOp::ReadSnapshot {
                        snapshot,
                        offset_bytes,
                        len_bytes,
                    } => {
                        w.u64(*snapshot);
                        w.u64(*offset_bytes);
                        w.u32(*len_bytes);
                    }
                    HostOp::SnapshotControl { snapshot, action } => {
                        w.u64(*snapshot);
                        let (tag, hold_ms) = match action {
                            SnapshotAction::Cut { hold_ms } => (0, *hold_ms),
                            SnapshotAction::Release => (1, 0),
                            SnapshotAction::Drop => (2, 0),
                        };
                        w.u8(tag);
                        w.u32(hold_ms);
                    }
                    HostOp::SnapshotDiff {
                        from,
                        to,
                        start_bytes,
                        max_ranges,
                    } => {
                        w.option(from.as_ref(), |w, v| w.u64(*v));
                        w.option(to.as_ref(), |w, v| w.u64(*v));
                        w.u64(*start_bytes);
                        w.u32(*max_ranges);
                    }
                    HostOp::SnapshotUsage => {}
                    HostOp::SnapshotMap {
                        view,
                        start_bytes,
                        max_ranges,
                    } => {
                        w.option(view.as_ref(), |w, v| w.u64(*v));
                        w.u64(*start_bytes);
                        w.u32(*max_ranges);
                    }
                }
            }
            Message::HostReply(reply) => match reply {
                HostReply::Data { data, crcs } => {
                    w.bytes(data);
                    w.vec(crcs, |w, crc| w.u32(*crc));
                }
                HostReply::Done => {}
                HostReply::Cut { cut } => w.u64(*cut),
                HostReply::Diff {
                    ranges,
                    next_offset_bytes,
                } => {
                    w.vec(ranges, |w, r| {
                        w.u64(r.offset_bytes);
                        w.u64(r.len_bytes);
                        w.bool(r.zero);
                    });
                    w.option(next_offset_bytes.as_ref(), |w, v| w.u64(*v));
                }
                HostReply::SnapshotUsage { snapshots } => {
                    w.vec(snapshots, |w, s| {
                        w.u64(s.snapshot);
                        w.u64(s.cut);
                        w.u64(s.pinned_bytes);
                        w.u64(s.exclusive_bytes);
                    });
                }
                HostReply::Error(error) => put_host_error(w, error),
            },
            Message::Replica(request) => match request {
                ReplicaRequest::Append {
                    partition,
                    epoch,
                    records,
                } => {
                    put_partition(w, partition);
                    w.u64(*epoch);
                    w.vec(records, put_replica_record);
                }
                ReplicaRequest::FlushCommit {
                    partition,
                    epoch,
                    up_to_sequence,
                    mappings,
                } => {
                    put_partition(w, partition);
                    w.u64(*epoch);
                    w.u64(*up_to_sequence);
                    w.vec(mappings, |w, range| {
                        w.u64(range.lba);
                        w.u32(range.blocks);
                        w.u64(range.sequence);
                        w.u64(range.extent);
                        w.u16(range.column);
                        w.u64(range.offset_bytes);
                    });
                }
                ReplicaRequest::Status { partition } => put_partition(w, partition),
            },
            Message::ReplicaReply(reply) => match reply {
                ReplicaReply::Appended { up_to_sequence } => w.u64(*up_to_sequence),
                ReplicaReply::Committed => {}
                ReplicaReply::Status {
                    highest_epoch,
                    highest_sequence,
                } => {
                    w.u64(*highest_epoch);
                    w.u64(*highest_sequence);
                }
                ReplicaReply::Error(error) => put_replica_error(w, error),
            },
        }
    }

    /// Decode a body of the given kind. `data` payloads are zero-copy
    /// slices of `body`.
    pub fn decode(kind: u16, body: Bytes) -> Result<Message, DecodeError> {
        use kind::*;
        let mut reader = Reader::new(body);
        let r = &mut reader;
        let message = match kind {
            PING => Message::Ping {
                nonce: r.u64("nonce")?,
            },
            PONG => Message::Pong {
                nonce: r.u64("nonce")?,
            },
            SLED_INVENTORY => Message::Sled(SledRequest::Inventory),
            SLED_ALLOCATE_COLUMNS => Message::Sled(SledRequest::AllocateColumns {
                column_count: r.u32("column_count")?,
                device: r.option("device", |r| r.u16("device"))?,
            }),
            SLED_FREE_COLUMN => Message::Sled(SledRequest::FreeColumn {
                column: get_column(r)?,
                partition: get_partition(r)?,
                epoch: r.u64("epoch")?,
            }),
            SLED_CLAIM => Message::Sled(SledRequest::Claim {
                column: get_column(r)?,
                partition: get_partition(r)?,
                epoch: r.u64("epoch")?,
            }),
            SLED_APPEND => Message::Sled(SledRequest::Append {
                column: get_column(r)?,
                partition: get_partition(r)?,
                epoch: r.u64("epoch")?,
                offset_bytes: r.u64("offset_bytes")?,
                data: r.bytes("data", MAX_PAYLOAD_BYTES as u32)?,
                block_crcs: r.vec("block_crcs", MAX_BLOCK_CRCS, |r| r.u32("block_crc"))?,
            }),
            SLED_READ => Message::Sled(SledRequest::Read {
                column: get_column(r)?,
                offset_bytes: r.u64("offset_bytes")?,
                len_bytes: r.u32("len_bytes")?,
            }),
            SLED_COLUMN_STATUS => Message::Sled(SledRequest::ColumnStatus {
                column: get_column(r)?,
            }),
            SLED_SCRUB_REPORT => Message::Sled(SledRequest::ScrubReport),
            SLED_INVENTORY_REPLY => Message::SledReply(SledResponse::Inventory(SledInventory {
                sled_id: r.string("sled_id", MAX_STRING_BYTES)?,
                column_size_bytes: r.u64("column_size_bytes")?,
                devices: r.vec("devices", MAX_DEVICES, |r| {
                    Ok(DeviceInventory {
                        device: r.u16("device")?,
                        path: r.string("path", MAX_STRING_BYTES)?,
                        size_bytes: r.u64("size_bytes")?,
                        column_count: r.u32("column_count")?,
                        free_columns: r.u32("free_columns")?,
                        state: get_device_state(r)?,
                    })
                })?,
            })),
            SLED_ALLOCATED => Message::SledReply(SledResponse::Allocated(r.vec(
                "columns",
                MAX_COLUMNS,
                get_column,
            )?)),
            SLED_FREED => Message::SledReply(SledResponse::Freed),
            SLED_CLAIMED => Message::SledReply(SledResponse::Claimed {
                epoch: r.u64("epoch")?,
                length_bytes: r.u64("length_bytes")?,
            }),
            SLED_APPENDED => Message::SledReply(SledResponse::Appended {
                length_bytes: r.u64("length_bytes")?,
            }),
            SLED_DATA => Message::SledReply(SledResponse::Data {
                data: r.bytes("data", MAX_PAYLOAD_BYTES as u32)?,
                block_crcs: r.vec("block_crcs", MAX_BLOCK_CRCS, |r| r.u32("block_crc"))?,
            }),
            SLED_COLUMN_STATUS_REPLY => {
                Message::SledReply(SledResponse::ColumnStatus(ColumnStatus {
                    column: get_column(r)?,
                    state: get_column_state(r)?,
                    partition: r.option("partition", get_partition)?,
                    epoch: r.u64("epoch")?,
                    length_bytes: r.u64("length_bytes")?,
                }))
            }
            SLED_SCRUB_REPORT_REPLY => Message::SledReply(SledResponse::ScrubReport(ScrubReport {
                passes: r.u64("passes")?,
                bytes_verified: r.u64("bytes_verified")?,
                bad_blocks: r.vec("bad_blocks", MAX_COLUMNS, |r| {
                    Ok(BadBlock {
                        column: get_column(r)?,
                        offset_bytes: r.u64("offset_bytes")?,
                    })
                })?,
            })),
            SLED_ERROR => Message::SledReply(SledResponse::Error(get_sled_error(r)?)),
            LCP_RAFT => {
                let tag = r.u8("rpc")?;
                let rpc = RaftRpcKind::from_tag(tag)
                    .ok_or(DecodeError::UnknownTag { field: "rpc", tag })?;
                Message::Raft {
                    rpc,
                    payload: r.bytes("payload", MAX_LCP_PAYLOAD_BYTES)?,
                }
            }
            LCP_CLIENT => Message::Lcp {
                idempotent: r.bool("idempotent")?,
                payload: r.bytes("payload", MAX_LCP_PAYLOAD_BYTES)?,
            },
            LCP_RAFT_REPLY => Message::RaftReply {
                payload: r.bytes("payload", MAX_LCP_PAYLOAD_BYTES)?,
            },
            LCP_CLIENT_REPLY => Message::LcpReply {
                payload: r.bytes("payload", MAX_LCP_PAYLOAD_BYTES)?,
            },
            HOST_MAP => Message::HostMap {
                volume: r.u64("volume")?,
                credential: AttachmentCredential {
                    attachment: r.u64("attachment")?,
                    token: AttachmentToken(r.array("token")?),
                },
            },
            HOST_MAP_REPLY => Message::HostMapReply {
                payload: r.bytes("payload", MAX_LCP_PAYLOAD_BYTES)?,
            },
            HOST_RESERVATIONS => Message::HostReservations {
                volume: r.u64("volume")?,
                credential: AttachmentCredential {
                    attachment: r.u64("attachment")?,
                    token: AttachmentToken(r.array("token")?),
                },
                payload: r.bytes("payload", MAX_LCP_PAYLOAD_BYTES)?,
            },
            HOST_RESERVATIONS_REPLY => Message::HostReservationsReply {
                payload: r.bytes("payload", MAX_LCP_PAYLOAD_BYTES)?,
            },
            HOST_READ
            | HOST_WRITE
            | HOST_FLUSH
            | HOST_TRIM
            | HOST_WRITE_ZEROES
            | HOST_READ_SNAPSHOT
            | HOST_SNAPSHOT_CONTROL
            | HOST_SNAPSHOT_DIFF
            | HOST_SNAPSHOT_USAGE
            | HOST_SNAPSHOT_MAP => {
                let volume = r.u64("volume")?;
                let partition = r.u32("partition")?;
                let epoch = r.u64("epoch")?;
                let credential = AttachmentCredential {
                    attachment: r.u64("attachment")?,
                    token: AttachmentToken(r.array("token")?),
                };
                let op = match kind {
                    HOST_READ => HostOp::Read {
                        offset_bytes: r.u64("offset_bytes")?,
                        len_bytes: r.u32("len_bytes")?,
                    },
                    HOST_WRITE => HostOp::Write {
                        write_id: r.u64("write_id")?,
                        offset_bytes: r.u64("offset_bytes")?,
                        data: r.bytes("data", MAX_HOST_IO_BYTES)?,
                        crcs: r.vec("crcs", MAX_HOST_CRCS, |r| r.u32("crc"))?,
                        fua: r.bool("fua")?,
                    },
                    HOST_TRIM => HostOp::Trim {
                        write_id: r.u64("write_id")?,
                        offset_bytes: r.u64("offset_bytes")?,
                        len_bytes: r.u32("len_bytes")?,
                    },
                    HOST_WRITE_ZEROES => HostOp::WriteZeroes {
                        write_id: r.u64("write_id")?,
                        offset_bytes: r.u64("offset_bytes")?,
                        len_bytes: r.u32("len_bytes")?,
                    },
                    HOST_READ_SNAPSHOT => HostOp::ReadSnapshot {
                        snapshot: r.u64("snapshot")?,
                        offset_bytes: r.u64("offset_bytes")?,
                        len_bytes: r.u32("len_bytes")?,
                    },
                    HOST_SNAPSHOT_CONTROL => {
                        let snapshot = r.u64("snapshot")?;
                        let tag = r.u8("action")?;
                        let hold_ms = r.u32("hold_ms")?;
                        if tag != 0 && hold_ms != 0 {
                            // Release and Drop carry no hold: a nonzero one
                            // would decode to a message that encodes
                            // differently.
                            return Err(DecodeError::NotZero {
                                field: "hold_ms",
                                value: u64::from(hold_ms),
                            });
                        }
                        let action = match tag {
                            0 => SnapshotAction::Cut { hold_ms },
                            1 => SnapshotAction::Release,
                            2 => SnapshotAction::Drop,
                            tag => {
                                return Err(DecodeError::UnknownTag {
                                    field: "action",
                                    tag,
                                })
                            }
                        };
                        HostOp::SnapshotControl { snapshot, action }
                    }
                    HOST_SNAPSHOT_DIFF => HostOp::SnapshotDiff {
                        from: r.option("from", |r| r.u64("from"))?,
                        to: r.option("to", |r| r.u64("to"))?,
                        start_bytes: r.u64("start_bytes")?,
                        max_ranges: r.u32("max_ranges")?,
                    },
                    HOST_SNAPSHOT_USAGE => HostOp::SnapshotUsage,
                    HOST_SNAPSHOT_MAP => HostOp::SnapshotMap {
                        view: r.option("view", |r| r.u64("view"))?,
                        start_bytes: r.u64("start_bytes")?,
                        max_ranges: r.u32("max_ranges")?,
                    },
                    _ => HostOp::Flush,
                };
                Message::Host(HostRequest {
                    volume,
                    partition,
                    epoch,
                    credential,
                    op,
                })
            }
            HOST_DATA => Message::HostReply(HostReply::Data {
                data: r.bytes("data", MAX_HOST_IO_BYTES)?,
                crcs: r.vec("crcs", MAX_HOST_CRCS, |r| r.u32("crc"))?,
            }),
            HOST_DONE => Message::HostReply(HostReply::Done),
            HOST_CUT => Message::HostReply(HostReply::Cut { cut: r.u64("cut")? }),
            HOST_DIFF => Message::HostReply(HostReply::Diff {
                ranges: r.vec("ranges", MAX_DIFF_RANGES, |r| {
                    Ok(ChangedRange {
                        offset_bytes: r.u64("offset_bytes")?,
                        len_bytes: r.u64("len_bytes")?,
                        zero: r.bool("zero")?,
                    })
                })?,
                next_offset_bytes: r.option("next_offset_bytes", |r| r.u64("next_offset_bytes"))?,
            }),
            HOST_SNAPSHOT_USAGE_REPLY => Message::HostReply(HostReply::SnapshotUsage {
                snapshots: r.vec("snapshots", MAX_SNAPSHOT_USAGE, |r| {
                    Ok(SnapshotUsage {
                        snapshot: r.u64("snapshot")?,
                        cut: r.u64("cut")?,
                        pinned_bytes: r.u64("pinned_bytes")?,
                        exclusive_bytes: r.u64("exclusive_bytes")?,
                    })
                })?,
            }),
            HOST_ERROR => Message::HostReply(HostReply::Error(get_host_error(r)?)),
            REPLICA_APPEND => Message::Replica(ReplicaRequest::Append {
                partition: get_partition(r)?,
                epoch: r.u64("epoch")?,
                records: r.vec("records", MAX_REPLICA_RECORDS, get_replica_record)?,
            }),
            REPLICA_FLUSH_COMMIT => Message::Replica(ReplicaRequest::FlushCommit {
                partition: get_partition(r)?,
                epoch: r.u64("epoch")?,
                up_to_sequence: r.u64("up_to_sequence")?,
                mappings: r.vec("mappings", MAX_FLUSHED_RANGES, |r| {
                    Ok(FlushedRange {
                        lba: r.u64("lba")?,
                        blocks: r.u32("blocks")?,
                        sequence: r.u64("sequence")?,
                        extent: r.u64("extent")?,
                        column: r.u16("column")?,
                        offset_bytes: r.u64("offset_bytes")?,
                    })
                })?,
            }),
            REPLICA_STATUS => Message::Replica(ReplicaRequest::Status {
                partition: get_partition(r)?,
            }),
            REPLICA_APPENDED => Message::ReplicaReply(ReplicaReply::Appended {
                up_to_sequence: r.u64("up_to_sequence")?,
            }),
            REPLICA_COMMITTED => Message::ReplicaReply(ReplicaReply::Committed),
            REPLICA_STATUS_REPLY => Message::ReplicaReply(ReplicaReply::Status {
                highest_epoch: r.u64("highest_epoch")?,
                highest_sequence: r.u64("highest_sequence")?,
            }),
            REPLICA_ERROR => Message::ReplicaReply(ReplicaReply::Error(get_replica_error(r)?)),
            kind => return Err(DecodeError::UnknownKind { kind }),
        };
        reader.finish()?;
        Ok(message)
    }

    /// Encode as one frame. Fails only if the body exceeds
    /// [`crate::frame::MAX_FRAME_BODY_BYTES`] (a payload over 16 MiB).
    pub fn try_to_frame(&self, request_id: u64, response: bool) -> Result<Bytes, FrameError> {
        let flags = if response { FLAG_RESPONSE } else { 0 };
        let mut builder =
            FrameBuilder::new(self.kind(), flags, request_id, 64 + self.payload_len());
        self.encode_body(builder.body_mut());
        builder.finish()
    }

    /// Encode as one frame.
    ///
    /// # Panics
    /// If a payload exceeds 16 MiB: callers must bound what they send; use
    /// [`Message::try_to_frame`] where the size comes from outside.
    pub fn to_frame(&self, request_id: u64, response: bool) -> Bytes {
        match self.try_to_frame(request_id, response) {
            Ok(frame) => frame,
            Err(error) => panic!("message does not fit a frame: {error}"),
        }
    }

    /// Decode a frame's message, checking that the RESPONSE flag agrees
    /// with the kind.
    pub fn from_frame(frame: &Frame) -> Result<Message, FrameError> {
        let kind = frame.header.kind;
        let message = Message::decode(kind, frame.body.clone()).map_err(|error| match error {
            DecodeError::UnknownKind { kind } => FrameError::UnknownKind { kind },
            other => FrameError::Body(other),
        })?;
        if message.is_response() != frame.header.is_response() {
            return Err(FrameError::ResponseFlagMismatch {
                kind,
                flags: frame.header.flags,
            });
        }
        Ok(message)
    }
}

fn put_column(w: &mut Writer<'_>, column: &ColumnId) {
    w.u16(column.device);
    w.u32(column.index);
}

fn get_column(r: &mut Reader) -> Result<ColumnId, DecodeError> {
    Ok(ColumnId {
        device: r.u16("column.device")?,
        index: r.u32("column.index")?,
    })
}

fn put_partition(w: &mut Writer<'_>, partition: &PartitionId) {
    w.u64(partition.volume);
    w.u32(partition.index);
}

fn get_partition(r: &mut Reader) -> Result<PartitionId, DecodeError> {
    Ok(PartitionId {
        volume: r.u64("partition.volume")?,
        index: r.u32("partition.index")?,
    })
}

fn device_state_tag(state: DeviceState) -> u8 {
    match state {
        DeviceState::Healthy => 0,
        DeviceState::Failed => 1,
    }
}

fn get_device_state(r: &mut Reader) -> Result<DeviceState, DecodeError> {
    match r.u8("device_state")? {
        0 => Ok(DeviceState::Healthy),
        1 => Ok(DeviceState::Failed),
        tag => Err(DecodeError::UnknownTag {
            field: "device_state",
            tag,
        }),
    }
}

fn column_state_tag(state: ColumnState) -> u8 {
    match state {
        ColumnState::Free => 0,
        ColumnState::Allocated => 1,
        ColumnState::Claimed => 2,
    }
}

fn get_column_state(r: &mut Reader) -> Result<ColumnState, DecodeError> {
    match r.u8("column_state")? {
        0 => Ok(ColumnState::Free),
        1 => Ok(ColumnState::Allocated),
        2 => Ok(ColumnState::Claimed),
        tag => Err(DecodeError::UnknownTag {
            field: "column_state",
            tag,
        }),
    }
}

fn put_sled_error(w: &mut Writer<'_>, error: &SledError) {
    match error {
        SledError::Fenced { current_epoch } => {
            w.u8(0);
            w.u64(*current_epoch);
        }
        SledError::WrongPartition { column, owner } => {
            w.u8(1);
            put_column(w, column);
            put_partition(w, owner);
        }
        SledError::NoSuchColumn { column } => {
            w.u8(2);
            put_column(w, column);
        }
        SledError::BadColumnState { column, state } => {
            w.u8(3);
            put_column(w, column);
            w.u8(column_state_tag(*state));
        }
        SledError::OffsetMismatch {
            column,
            offset_bytes,
            length_bytes,
        } => {
            w.u8(4);
            put_column(w, column);
            w.u64(*offset_bytes);
            w.u64(*length_bytes);
        }
        SledError::OutOfRange {
            column,
            offset_bytes,
            len_bytes,
            length_bytes,
            column_size_bytes,
        } => {
            w.u8(5);
            put_column(w, column);
            w.u64(*offset_bytes);
            w.u64(*len_bytes);
            w.u64(*length_bytes);
            w.u64(*column_size_bytes);
        }
        SledError::ChecksumMismatch {
            column,
            block_offsets_bytes,
        } => {
            w.u8(6);
            put_column(w, column);
            w.vec(block_offsets_bytes, |w, offset_bytes| w.u64(*offset_bytes));
        }
        SledError::DeviceFailed { device } => {
            w.u8(7);
            w.u16(*device);
        }
        SledError::NoSpace => w.u8(8),
        SledError::BadRequest { reason } => {
            w.u8(9);
            w.string(reason);
        }
        SledError::Io { reason } => {
            w.u8(10);
            w.string(reason);
        }
    }
}

fn get_sled_error(r: &mut Reader) -> Result<SledError, DecodeError> {
    Ok(match r.u8("sled_error")? {
        0 => SledError::Fenced {
            current_epoch: r.u64("current_epoch")?,
        },
        1 => SledError::WrongPartition {
            column: get_column(r)?,
            owner: get_partition(r)?,
        },
        2 => SledError::NoSuchColumn {
            column: get_column(r)?,
        },
        3 => SledError::BadColumnState {
            column: get_column(r)?,
            state: get_column_state(r)?,
        },
        4 => SledError::OffsetMismatch {
            column: get_column(r)?,
            offset_bytes: r.u64("offset_bytes")?,
            length_bytes: r.u64("length_bytes")?,
        },
        5 => SledError::OutOfRange {
            column: get_column(r)?,
            offset_bytes: r.u64("offset_bytes")?,
            len_bytes: r.u64("len_bytes")?,
            length_bytes: r.u64("length_bytes")?,
            column_size_bytes: r.u64("column_size_bytes")?,
        },
        6 => SledError::ChecksumMismatch {
            column: get_column(r)?,
            block_offsets_bytes: r.vec("block_offsets_bytes", MAX_BLOCK_CRCS, |r| {
                r.u64("block_offset_bytes")
            })?,
        },
        7 => SledError::DeviceFailed {
            device: r.u16("device")?,
        },
        8 => SledError::NoSpace,
        9 => SledError::BadRequest {
            reason: r.string("reason", MAX_STRING_BYTES)?,
        },
        10 => SledError::Io {
            reason: r.string("reason", MAX_STRING_BYTES)?,
        },
        tag => {
            return Err(DecodeError::UnknownTag {
                field: "sled_error",
                tag,
            })
        }
    })
}

fn put_replica_record(w: &mut Writer<'_>, record: &ReplicaRecord) {
    w.u64(record.sequence);
    w.u8(match record.kind {
        ReplicaRecordKind::Write => 0,
        ReplicaRecordKind::Unmap => 1,
        ReplicaRecordKind::Snapshot => 2,
        ReplicaRecordKind::Direct => 3,
    });
    w.u64(record.lba);
    w.u32(record.blocks);
    w.vec(&record.crcs, |w, crc| w.u32(*crc));
    w.bytes(&record.data);
}

fn get_replica_record(r: &mut Reader) -> Result<ReplicaRecord, DecodeError> {
    Ok(ReplicaRecord {
        sequence: r.u64("sequence")?,
        kind: match r.u8("record_kind")? {
            0 => ReplicaRecordKind::Write,
            1 => ReplicaRecordKind::Unmap,
            2 => ReplicaRecordKind::Snapshot,
            3 => ReplicaRecordKind::Direct,
            tag => {
                return Err(DecodeError::UnknownTag {
                    field: "record_kind",
                    tag,
                })
            }
        },
        lba: r.u64("lba")?,
        blocks: r.u32("blocks")?,
        crcs: r.vec("crcs", MAX_BLOCK_CRCS, |r| r.u32("crc"))?,
        data: r.bytes("data", MAX_PAYLOAD_BYTES as u32)?,
    })
}

fn put_address(w: &mut Writer<'_>, address: &SocketAddr) {
    match address {
        SocketAddr::V4(v4) => {
            w.u8(4);
            for octet in v4.ip().octets() {
                w.u8(octet);
            }
            w.u16(v4.port());
        }
        SocketAddr::V6(v6) => {
            w.u8(6);
            for octet in v6.ip().octets() {
                w.u8(octet);
            }
            w.u16(v6.port());
            w.u32(v6.flowinfo());
            w.u32(v6.scope_id());
        }
    }
}

fn get_address(r: &mut Reader) -> Result<SocketAddr, DecodeError> {
    fn octets<const N: usize>(r: &mut Reader) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        for octet in &mut out {
            *octet = r.u8("address.ip")?;
        }
        Ok(out)
    }
    match r.u8("address")? {
        4 => {
            let ip = Ipv4Addr::from(octets::<4>(r)?);
            Ok(SocketAddr::V4(SocketAddrV4::new(
                ip,
                r.u16("address.port")?,
            )))
        }
        6 => {
            let ip = Ipv6Addr::from(octets::<16>(r)?);
            let port = r.u16("address.port")?;
            let flowinfo = r.u32("address.flowinfo")?;
            let scope_id = r.u32("address.scope_id")?;
            Ok(SocketAddr::V6(SocketAddrV6::new(
                ip, port, flowinfo, scope_id,
            )))
        }
        tag => Err(DecodeError::UnknownTag {
            field: "address",
            tag,
        }),
    }
}

fn put_host_error(w: &mut Writer<'_>, error: &HostError) {
    match error {
        HostError::NotPrimary { hint } => {
            w.u8(0);
            w.option(hint.as_ref(), |w, hint| {
                w.string(&hint.node_id);
                put_address(w, &hint.address_a);
                put_address(w, &hint.address_b);
            });
        }
        HostError::StaleEpoch { current } => {
            w.u8(1);
            w.u64(*current);
        }
        HostError::Fenced { current } => {
            w.u8(2);
            w.u64(*current);
        }
        HostError::OutOfRange {
            offset_bytes,
            len_bytes,
            partition_start_bytes,
            partition_end_bytes,
        } => {
            w.u8(3);
            w.u64(*offset_bytes);
            w.u32(*len_bytes);
            w.u64(*partition_start_bytes);
            w.u64(*partition_end_bytes);
        }
        HostError::ChecksumMismatch { offset_bytes } => {
            w.u8(4);
            w.u64(*offset_bytes);
        }
        HostError::Unavailable { reason } => {
            w.u8(5);
            w.string(reason);
        }
        HostError::BadRequest { reason } => {
            w.u8(6);
            w.string(reason);
        }
        HostError::Io { reason } => {
            w.u8(7);
            w.string(reason);
        }
        HostError::Unauthorized { attachment } => {
            w.u8(8);
            w.u64(*attachment);
        }
    }
}

fn get_host_error(r: &mut Reader) -> Result<HostError, DecodeError> {
    Ok(match r.u8("host_error")? {
        0 => HostError::NotPrimary {
            hint: r.option("hint", |r| {
                Ok(NodeHint {
                    node_id: r.string("node_id", MAX_STRING_BYTES)?,
                    address_a: get_address(r)?,
                    address_b: get_address(r)?,
                })
            })?,
        },
        1 => HostError::StaleEpoch {
            current: r.u64("current")?,
        },
        2 => HostError::Fenced {
            current: r.u64("current")?,
        },
        3 => HostError::OutOfRange {
            offset_bytes: r.u64("offset_bytes")?,
            len_bytes: r.u32("len_bytes")?,
            partition_start_bytes: r.u64("partition_start_bytes")?,
            partition_end_bytes: r.u64("partition_end_bytes")?,
        },
        4 => HostError::ChecksumMismatch {
            offset_bytes: r.u64("offset_bytes")?,
        },
        5 => HostError::Unavailable {
            reason: r.string("reason", MAX_STRING_BYTES)?,
        },
        6 => HostError::BadRequest {
            reason: r.string("reason", MAX_STRING_BYTES)?,
        },
        7 => HostError::Io {
            reason: r.string("reason", MAX_STRING_BYTES)?,
        },
        8 => HostError::Unauthorized {
            attachment: r.u64("attachment")?,
        },
        tag => {
            return Err(DecodeError::UnknownTag {
                field: "host_error",
                tag,
            })
        }
    })
}

fn put_replica_error(w: &mut Writer<'_>, error: &ReplicaError) {
    match error {
        ReplicaError::StaleEpoch { current } => {
            w.u8(0);
            w.u64(*current);
        }
        ReplicaError::Gap { expected_sequence } => {
            w.u8(1);
            w.u64(*expected_sequence);
        }
        ReplicaError::NotSecondary => w.u8(2),
        ReplicaError::LogFull => w.u8(3),
        ReplicaError::Io { reason } => {
            w.u8(4);
            w.string(reason);
        }
        ReplicaError::BadRequest { reason } => {
            w.u8(5);
            w.string(reason);
        }
    }
}

fn get_replica_error(r: &mut Reader) -> Result<ReplicaError, DecodeError> {
    Ok(match r.u8("replica_error")? {
        0 => ReplicaError::StaleEpoch {
            current: r.u64("current")?,
        },
        1 => ReplicaError::Gap {
            expected_sequence: r.u64("expected_sequence")?,
        },
        2 => ReplicaError::NotSecondary,
        3 => ReplicaError::LogFull,
        4 => ReplicaError::Io {
            reason: r.string("reason", MAX_STRING_BYTES)?,
        },
        5 => ReplicaError::BadRequest {
            reason: r.string("reason", MAX_STRING_BYTES)?,
        },
        tag => {
            return Err(DecodeError::UnknownTag {
                field: "replica_error",
                tag,
            })
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::frame::decode_frame_exact;

    #[test]
    fn append_payload_is_zero_copy() {
        let data = Bytes::from(vec![7u8; 8192]);
        let message = Message::Sled(SledRequest::Append {
            column: ColumnId {
                device: 1,
                index: 2,
            },
            partition: PartitionId {
                volume: 3,
                index: 4,
            },
            epoch: 5,
            offset_bytes: 4096,
            data,
            block_crcs: vec![1, 2],
        });
        let frame = decode_frame_exact(message.to_frame(9, false)).unwrap();
        let decoded = Message::from_frame(&frame).unwrap();
        assert_eq!(decoded, message);
        let Message::Sled(SledRequest::Append { data, .. }) = decoded else {
            unreachable!()
        };
        assert!(frame.body.as_ptr_range().contains(&data.as_ptr()));
    }

    #[test]
    fn response_flag_must_match_kind() {
        let frame = decode_frame_exact(Message::Pong { nonce: 1 }.to_frame(1, false)).unwrap();
        assert!(matches!(
            Message::from_frame(&frame),
            Err(FrameError::ResponseFlagMismatch { .. })
        ));
        let frame = decode_frame_exact(Message::Ping { nonce: 1 }.to_frame(1, true)).unwrap();
        assert!(matches!(
            Message::from_frame(&frame),
            Err(FrameError::ResponseFlagMismatch { .. })
        ));
    }

    #[test]
    fn unknown_kinds_and_tags() {
        assert_eq!(
            Message::decode(0x0200, Bytes::new()),
            Err(DecodeError::UnknownKind { kind: 0x0200 })
        );
        assert_eq!(
            Message::decode(0x020b, Bytes::new()),
            Err(DecodeError::UnknownKind { kind: 0x020b })
        );
        assert!(matches!(
            Message::decode(kind::SLED_ERROR, Bytes::from_static(&[11])),
            Err(DecodeError::UnknownTag { tag: 11, .. })
        ));
        assert_eq!(
            Message::decode(kind::SLED_FREED, Bytes::from_static(&[0])),
            Err(DecodeError::TrailingBytes { remaining: 1 })
        );
    }

    #[test]
    fn kind_halves() {
        for message in [
            Message::Ping { nonce: 0 },
            Message::Pong { nonce: 0 },
            Message::Sled(SledRequest::Inventory),
            Message::SledReply(SledResponse::Freed),
            Message::Raft {
                rpc: RaftRpcKind::Vote,
                payload: Bytes::new(),
            },
            Message::RaftReply {
                payload: Bytes::new(),
            },
            Message::Lcp {
                idempotent: true,
                payload: Bytes::new(),
            },
            Message::LcpReply {
                payload: Bytes::new(),
            },
            Message::Host(HostRequest {
                volume: 1,
                partition: 2,
                epoch: 3,
                credential: AttachmentCredential::NONE,
                op: HostOp::Flush,
            }),
            Message::HostReply(HostReply::Done),
            Message::Replica(ReplicaRequest::Status {
                partition: PartitionId {
                    volume: 1,
                    index: 2,
                },
            }),
            Message::ReplicaReply(ReplicaReply::Committed),
        ] {
            assert_eq!(kind::is_response(message.kind()), message.is_response());
            assert!(message.is_response() || message.is_idempotent());
        }
    }

    #[test]
    fn host_and_replica_payloads_are_zero_copy() {
        let data = Bytes::from(vec![3u8; 8192]);
        let crcs = crate::volume::chunk_crcs(&data);
        let messages = [
            Message::Host(HostRequest {
                volume: 1,
                partition: 2,
                epoch: 3,
                credential: AttachmentCredential {
                    attachment: 11,
                    token: AttachmentToken([9; 16]),
                },
                op: HostOp::Write {
                    write_id: 7,
                    offset_bytes: 4096,
                    data: data.clone(),
                    crcs: crcs.clone(),
                    fua: true,
                },
            }),
            Message::HostReply(HostReply::Data {
                data: data.clone(),
                crcs: crcs.clone(),
            }),
            Message::Replica(ReplicaRequest::Append {
                partition: PartitionId {
                    volume: 1,
                    index: 2,
                },
                epoch: 3,
                records: vec![ReplicaRecord {
                    sequence: 9,
                    kind: ReplicaRecordKind::Write,
                    lba: 1,
                    blocks: 2,
                    crcs,
                    data,
                }],
            }),
        ];
        for message in messages {
            let frame = decode_frame_exact(message.to_frame(9, message.is_response())).unwrap();
            let decoded = Message::from_frame(&frame).unwrap();
            assert_eq!(decoded, message);
            let data = match decoded {
                Message::Host(HostRequest {
                    op: HostOp::Write { data, .. },
                    ..
                })
                | Message::HostReply(HostReply::Data { data, .. }) => data,
                Message::Replica(ReplicaRequest::Append { mut records, .. }) => {
                    records.remove(0).data
                }
                _ => unreachable!(),
            };
            assert!(frame.body.as_ptr_range().contains(&data.as_ptr()));
        }
    }

    #[test]
    fn largest_host_write_fits_a_frame() {
        let data = Bytes::from(vec![0u8; crate::volume::MAX_HOST_IO_BYTES as usize]);
        let crcs = crate::volume::chunk_crcs(&data);
        let message = Message::Host(HostRequest {
            volume: u64::MAX,
            partition: u32::MAX,
            epoch: u64::MAX,
            credential: AttachmentCredential {
                attachment: u64::MAX,
                token: AttachmentToken([0xff; 16]),
            },
            op: HostOp::Write {
                write_id: u64::MAX,
                offset_bytes: 0,
                data,
                crcs,
                fua: false,
            },
        });
        assert!(message.try_to_frame(1, false).is_ok());
    }
}
