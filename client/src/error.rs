//! Typed errors of the volume client.

use proto::volume::HostError;

/// Why a volume operation failed. Every variant names the volume and, where
/// one is involved, the partition and the volume-absolute byte offset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// Offset or length not a multiple of 512 bytes (caught before sending).
    #[error("volume {volume}: range {offset_bytes}+{len} is not 512-byte aligned")]
    Misaligned {
        volume: u64,
        offset_bytes: u64,
        len: u64,
    },
    /// The range ends beyond the volume (caught before sending).
    #[error(
        "volume {volume}: range {offset_bytes}+{len} outside the volume of {size_bytes} bytes"
    )]
    OutOfRange {
        volume: u64,
        offset_bytes: u64,
        len: u64,
        size_bytes: u64,
    },
    /// A head node refused the request for a reason a retry cannot fix
    /// (out of range, bad request, I/O error).
    #[error(
        "volume {volume} partition {partition}: {node} refused {op} at {offset_bytes}: {error}"
    )]
    Refused {
        volume: u64,
        partition: u32,
        node: String,
        op: &'static str,
        offset_bytes: u64,
        /// Boxed: a hint with two addresses would make every result large.
        error: Box<HostError>,
    },
    /// Data failed its CRC twice in a row (read reply, or a write's payload
    /// on arrival). No unverified data was returned.
    #[error("volume {volume} partition {partition}: checksum mismatch at {offset_bytes} ({op}, from {node})")]
    ChecksumMismatch {
        volume: u64,
        partition: u32,
        node: String,
        op: &'static str,
        offset_bytes: u64,
    },
    /// Retries (failover, unavailable, unreachable) ran out of time or
    /// attempts; `last_error` is the last reason.
    #[error("volume {volume} partition {partition}: {op} at {offset_bytes} gave up after {attempts} attempts in {elapsed_ms} ms: {last_error}")]
    Unavailable {
        volume: u64,
        partition: u32,
        op: &'static str,
        offset_bytes: u64,
        attempts: u32,
        elapsed_ms: u64,
        last_error: String,
    },
    /// The partition map could not be fetched or makes no sense.
    #[error("volume {volume}: partition map: {reason}")]
    Map { volume: u64, reason: String },
    /// A head node answered something that is not an answer to the request.
    #[error("volume {volume} partition {partition}: protocol error from {node}: {reason}")]
    Protocol {
        volume: u64,
        partition: u32,
        node: String,
        reason: String,
    },
    #[error("volume {volume}: client closed")]
    Closed { volume: u64 },
    /// A write, trim or write-zeroes through a client of a snapshot (a
    /// snapshot is read-only). Not sent, not retried.
    #[error("volume {volume}: snapshot {snapshot} is read-only")]
    ReadOnly { volume: u64, snapshot: u64 },
    /// The control plane no longer knows the volume (it was deleted).
    /// Not retried.
    #[error("volume {volume} no longer exists (deleted)")]
    VolumeGone { volume: u64 },
    /// A head node refused the attachment credential: the volume was
    /// detached (the attachment revoked), deleted, or never attached with
    /// this token. Not retried; attach again for a new credential.
    #[error("volume {volume}: attachment {attachment} is not authorised (detached, deleted or wrong token; refused by {node})")]
    Unauthorized {
        volume: u64,
        attachment: u64,
        node: String,
    },
    /// The head node's host port requires TLS and this client reaches it
    /// over plain TCP (no `--unit-ca`, no CA in the attachment). Not
    /// retried.
    #[error("volume {volume}: {node}: {}", proto::link::TLS_REQUIRED)]
    TlsRequired { volume: u64, node: String },
}

impl ClientError {
    /// The same call later (after failover completes) may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ClientError::Unavailable { .. } | ClientError::Map { .. }
        )
    }

    /// The volume concerned.
    pub fn volume(&self) -> u64 {
        match self {
            ClientError::Misaligned { volume, .. }
            | ClientError::OutOfRange { volume, .. }
            | ClientError::Refused { volume, .. }
            | ClientError::ChecksumMismatch { volume, .. }
            | ClientError::Unavailable { volume, .. }
            | ClientError::Map { volume, .. }
            | ClientError::Protocol { volume, .. }
            | ClientError::Closed { volume }
            | ClientError::ReadOnly { volume, .. }
            | ClientError::VolumeGone { volume }
            | ClientError::Unauthorized { volume, .. }
            | ClientError::TlsRequired { volume, .. } => *volume,
        }
    }
}
