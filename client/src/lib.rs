//! Host side of rackblock: the volume client.
//!
//! [`VolumeClient`] turns byte-addressed block I/O on one volume into host
//! protocol requests ([`proto::volume`]) to the primaries of the volume's
//! partitions:
//!
//! ```text
//! read/write/trim/write_zeroes(offset, len)
//!   └─ split at partition boundaries and at 16 MiB  (split.rs, sans-IO)
//!        └─ per piece, concurrently (bounded):
//!             route: partition map (LCP) [+ NotPrimary hint] → (primary, epoch)
//!             send over the primary's PeerLink (network A, else B)
//!             ├─ Data/Done ............................. verify CRCs (reads) → done
//!             ├─ NotPrimary / StaleEpoch / Fenced ...... refresh map, follow hint, resend
//!             ├─ Unavailable, link error, timeout ...... back off, resend
//!             ├─ ChecksumMismatch (either direction) ... resend once, then fail
//!             ├─ Unauthorized (attachment revoked) ..... fail at once (NBD EPERM)
//!             ├─ map refresh: volume unknown (deleted) . fail at once, VolumeGone (EPERM)
//!             └─ OutOfRange / BadRequest / Io .......... fail at once
//! flush() → Flush to every partition's primary
//! ```
//!
//! Every request carries the attachment credential the client was made
//! with (`VolumeClient::connect`): from the zonal attach, or registered
//! straight with the unit by [`register_attachment`]. A refused credential
//! fails the call at once ([`ClientError::Unauthorized`]).
//!
//! Invariants it keeps:
//!
//! * **No unverified byte is returned**: every read reply's CRC-32C chunks
//!   are checked against its payload (and its length against the request)
//!   before the data is used; a mismatch is retried once, then reported.
//! * **Every retry is bounded** by a count (`max_attempts`) and a time
//!   (`failover_timeout`, 120 s by default: a head-node failover takes a
//!   lease expiry and a promotion, and the host should see a pause, not an
//!   error — ARCHITECTURE.md, Leases and failover).
//! * Resending is safe because every host operation is idempotent
//!   ([`proto::volume`] explains why); the link also resends on the other
//!   network by itself. Every write / trim / write-zeroes piece gets a
//!   unique `write_id` (a random 32-bit client id in the high bits, a
//!   counter in the low bits) that is **reused on every resend of that
//!   piece**, so the primary can answer a late duplicate from its dedupe
//!   table instead of applying it over a newer write.
//! * Map refreshes are single-flight: when many pieces hit a stale map at
//!   once, one of them asks the local control plane and the rest reuse its
//!   answer (a refresh generation counter tells them).
//!
//! The NBD server that hosts attach to (ARCHITECTURE.md, `client/`), [`nbd`],
//! sits on top of this client.

pub mod admin;
mod attachment;
mod error;
mod host_map;
pub mod iscsi;
pub mod metrics;
pub mod nbd;
pub mod qos;
mod split;
pub mod tls;
mod volume;

pub use attachment::{
    register_attachment, register_expiring_attachment, remove_attachment, AttachmentError,
};
pub use error::ClientError;
pub use host_map::{HostEndpoint, HostMapSource};
pub use split::{split_range, Piece};
pub use volume::{
    ClientConfig, ClientHealth, MapSource, MapSourceError, PrimaryHealth, VolumeClient,
};
