//! The partition engine's dependencies, as traits (sans-IO seams).
//!
//! The daemon plugs in `PeerLink`-based implementations (replication to the
//! secondary head node, requests to sled controllers, the local control
//! plane's sandbox); tests plug in in-process ones (a `sled_controller::Sled`
//! over memory devices, a second `Partition` as the secondary).

use std::collections::BTreeSet;
use std::fmt;

use bytes::Bytes;
use futures::future::BoxFuture;
use proto::sled::{ColumnId, PartitionId, SledRequest, SledResponse};
use proto::volume::{ReplicaReply, ReplicaRequest};
use thiserror::Error;

/// A transport failure talking to a peer (head node, sled, control plane).
/// Typed answers of the peer travel inside the reply, not here.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PeerError {
    /// No path to the peer (both networks down, process stopped).
    #[error("peer {peer} unreachable: {reason}")]
    Unreachable {
        /// Who.
        peer: String,
        /// Why.
        reason: String,
    },
    /// No answer in time.
    #[error("peer {peer} timed out")]
    Timeout {
        /// Who.
        peer: String,
    },
    /// The peer refused the request (control plane: no sandbox space, ...).
    #[error("peer {peer} refused: {reason}")]
    Refused {
        /// Who.
        peer: String,
        /// Why.
        reason: String,
    },
}

/// The secondary head node of a partition, seen from its primary.
pub trait ReplicaPeer: Send + Sync + fmt::Debug {
    /// Sends one replication request and waits for the answer.
    fn send(&self, request: ReplicaRequest) -> BoxFuture<'static, Result<ReplicaReply, PeerError>>;
}

/// The sled controllers of the unit, by sled id.
pub trait SledAccess: Send + Sync + fmt::Debug {
    /// Sends one request to sled `sled`.
    fn call(
        &self,
        sled: &str,
        request: SledRequest,
    ) -> BoxFuture<'static, Result<SledResponse, PeerError>>;
}

/// An extent handed to a partition: `k + m` columns on `k + m` different
/// sleds, in stripe order (k data columns, then m parity columns), of
/// which those in `owed` are not there yet (a degraded extent: see
/// `local_control_plane::state::Extent::columns`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentGrant {
    /// Extent id (unit-wide).
    pub extent: u64,
    /// Data columns.
    pub k: u8,
    /// Parity columns.
    pub m: u8,
    /// Size of every column in bytes (the sleds' column size).
    pub column_size_bytes: u64,
    /// `(sled id, column)` in stripe order; an owed slot holds
    /// [`ExtentGrant::owed_slot`], which names no sled.
    pub columns: Vec<(String, ColumnId)>,
    /// Indexes of owed columns: never claimed, appended to or read; a
    /// stripe is durable once every present column holds it, and reads,
    /// recovery and rebuild treat an owed column like a lost one (decode
    /// from k others). Repair replaces the slot like a lost column.
    pub owed: BTreeSet<u16>,
}

impl ExtentGrant {
    /// What an owed slot of `columns` holds: no sled (an empty id).
    pub fn owed_slot() -> (String, ColumnId) {
        (
            String::new(),
            ColumnId {
                device: 0,
                index: 0,
            },
        )
    }

    /// Whether column `index` is owed.
    pub fn is_owed(&self, index: usize) -> bool {
        u16::try_from(index).is_ok_and(|i| self.owed.contains(&i))
    }

    /// Present columns with their index in stripe order.
    pub fn present(&self) -> impl Iterator<Item = (usize, &(String, ColumnId))> + '_ {
        self.columns
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.is_owed(*i))
    }
}

/// The local control plane, as far as a partition needs it: extents of its
/// sandbox.
pub trait ExtentSource: Send + Sync + fmt::Debug {
    /// Another extent for `partition` (from its sandbox, refilled by the
    /// control plane), recorded as owned by the partition.
    fn next_extent(
        &self,
        partition: PartitionId,
        epoch: u64,
    ) -> BoxFuture<'static, Result<ExtentGrant, PeerError>>;
    /// Gives an extent back (its columns are freed on the sleds).
    fn free_extent(
        &self,
        partition: PartitionId,
        epoch: u64,
        extent: u64,
    ) -> BoxFuture<'static, Result<(), PeerError>>;
    /// Every extent the partition owns (recovery reads their summaries).
    fn owned_extents(
        &self,
        partition: PartitionId,
    ) -> BoxFuture<'static, Result<Vec<ExtentGrant>, PeerError>>;
}

/// The parent snapshot of a clone's partition: the snapshot's partition of
/// the same index in the parent volume (a clone has its parent's size and
/// partition size, so the same volume offsets). Reads of blocks the clone
/// never wrote (no version in its index: not even a tombstone) are
/// answered from here; the daemon's implementation asks the parent
/// partition's primary (this node's own partition when it is here, else
/// over the unit port), found in the unit state at each call, so a
/// failover of the parent's primary costs the clone a retry, not an
/// error.
pub trait ParentSnapshot: Send + Sync + fmt::Debug {
    /// `len_bytes` of the parent snapshot at volume-absolute
    /// `offset_bytes` (block aligned), checked against their CRCs.
    fn read(
        &self,
        offset_bytes: u64,
        len_bytes: u32,
    ) -> BoxFuture<'static, Result<Bytes, PeerError>>;
}
