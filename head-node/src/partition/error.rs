//! Typed errors of the partition engine and their wire mapping.

use proto::sled::{PartitionId, SledError};
use proto::volume::HostError;
use thiserror::Error;

use super::seams::PeerError;
use crate::erasure::ErasureError;
use crate::index::IndexError;
use crate::wal::WalError;

/// Everything a partition operation can fail with.
#[derive(Debug, Error)]
pub enum PartitionError {
    /// This node does not (or no longer) serve the partition as primary.
    #[error("partition {partition:?}: not the primary")]
    NotPrimary {
        /// Partition.
        partition: PartitionId,
    },
    /// The request's epoch is not the partition's.
    #[error("partition {partition:?}: request epoch {requested}, partition at {current}")]
    StaleEpoch {
        /// Partition.
        partition: PartitionId,
        /// Epoch of the request.
        requested: u64,
        /// Epoch of the partition here.
        current: u64,
    },
    /// A newer primary claimed the columns (or the secondary saw a newer
    /// epoch): this node stopped acknowledging.
    #[error("partition {partition:?}: fenced by epoch {current}")]
    Fenced {
        /// Partition.
        partition: PartitionId,
        /// The newer epoch.
        current: u64,
    },
    /// The byte range is outside the partition.
    #[error("partition {partition:?}: range {offset_bytes}+{len_bytes} outside [{partition_start_bytes}, {partition_end_bytes})")]
    OutOfRange {
        /// Partition.
        partition: PartitionId,
        /// Volume-absolute offset.
        offset_bytes: u64,
        /// Length.
        len_bytes: u32,
        /// Partition start (volume bytes).
        partition_start_bytes: u64,
        /// Partition end (volume bytes).
        partition_end_bytes: u64,
    },
    /// Data failed its checksum and could not be reconstructed (reads), or
    /// arrived corrupt (writes).
    #[error("partition {partition:?}: checksum mismatch at volume offset {offset_bytes}")]
    ChecksumMismatch {
        /// Partition.
        partition: PartitionId,
        /// Volume-absolute byte offset of the first bad block.
        offset_bytes: u64,
    },
    /// Malformed request.
    #[error("partition {partition:?}: bad request: {reason}")]
    BadRequest {
        /// Partition.
        partition: PartitionId,
        /// Why.
        reason: String,
    },
    /// Temporarily unable: the secondary did not confirm in time, the log is
    /// full, too many writes in flight. Nothing was acknowledged; retry.
    #[error("partition {partition:?}: unavailable: {reason}")]
    Unavailable {
        /// Partition.
        partition: PartitionId,
        /// Why.
        reason: String,
    },
    /// The write log failed.
    #[error("partition {partition:?}: write log: {source}")]
    Wal {
        /// Partition.
        partition: PartitionId,
        /// Cause.
        source: WalError,
    },
    /// The index refused an update (a broken invariant upstream).
    #[error("partition {partition:?}: index: {source}")]
    Index {
        /// Partition.
        partition: PartitionId,
        /// Cause.
        source: IndexError,
    },
    /// Erasure coding failed.
    #[error("partition {partition:?} extent {extent}: erasure code: {source}")]
    Erasure {
        /// Partition.
        partition: PartitionId,
        /// Extent.
        extent: u64,
        /// Cause.
        source: ErasureError,
    },
    /// A sled refused or failed a request.
    #[error("partition {partition:?}: sled {sled}: {source}")]
    Sled {
        /// Partition.
        partition: PartitionId,
        /// Sled id.
        sled: String,
        /// Cause.
        source: SledError,
    },
    /// A peer (sled, secondary, control plane) could not be reached.
    #[error("partition {partition:?}: {source}")]
    Peer {
        /// Partition.
        partition: PartitionId,
        /// Cause.
        source: PeerError,
    },
    /// Fewer than k chunks of a stripe could be read.
    #[error("partition {partition:?} extent {extent} stripe {stripe}: only {available} of {needed} chunks readable")]
    Unrecoverable {
        /// Partition.
        partition: PartitionId,
        /// Extent.
        extent: u64,
        /// Stripe.
        stripe: u64,
        /// Chunks read.
        available: usize,
        /// Chunks needed (k).
        needed: usize,
    },
    /// Recovery found something inconsistent.
    #[error("partition {partition:?}: recovery: {reason}")]
    Recovery {
        /// Partition.
        partition: PartitionId,
        /// Why.
        reason: String,
    },
}

impl PartitionError {
    /// The same request may succeed later on this node.
    pub fn is_retryable(&self) -> bool {
        match self {
            PartitionError::Unavailable { .. } | PartitionError::Peer { .. } => true,
            PartitionError::Wal { source, .. } => source.is_retryable(),
            PartitionError::Sled { source, .. } => source.is_retryable(),
            _ => false,
        }
    }

    /// The one mapping to host-protocol status codes.
    pub fn to_host_error(&self) -> HostError {
        match self {
            PartitionError::NotPrimary { .. } => HostError::NotPrimary { hint: None },
            PartitionError::StaleEpoch { current, .. } => {
                HostError::StaleEpoch { current: *current }
            }
            PartitionError::Fenced { current, .. } => HostError::Fenced { current: *current },
            PartitionError::OutOfRange {
                offset_bytes,
                len_bytes: len,
                partition_start_bytes: start,
                partition_end_bytes: end,
                ..
            } => HostError::OutOfRange {
                offset_bytes: *offset_bytes,
                len_bytes: *len,
                partition_start_bytes: *start,
                partition_end_bytes: *end,
            },
            PartitionError::ChecksumMismatch { offset_bytes, .. } => HostError::ChecksumMismatch {
                offset_bytes: *offset_bytes,
            },
            PartitionError::BadRequest { reason, .. } => HostError::BadRequest {
                reason: reason.clone(),
            },
            PartitionError::Unavailable { .. }
            | PartitionError::Peer { .. }
            | PartitionError::Unrecoverable { .. } => HostError::Unavailable {
                reason: self.to_string(),
            },
            PartitionError::Wal { source, .. } if source.is_retryable() => HostError::Unavailable {
                reason: self.to_string(),
            },
            // The write was not acknowledged and this head node is leaving
            // service (manager: a failed log): the client resends, with the
            // same write id, to whoever serves the partition next.
            PartitionError::Wal {
                source: WalError::Failed { .. },
                ..
            } => HostError::Unavailable {
                reason: self.to_string(),
            },
            _ => HostError::Io {
                reason: self.to_string(),
            },
        }
    }
}
