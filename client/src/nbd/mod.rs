//! NBD server: how hosts attach to a volume (ARCHITECTURE.md, `client/`).
//!
//! Any NBD client (qemu, libnbd's tools, fio's nbd engine, the kernel)
//! connects over TCP or a unix socket, negotiates an export, and then
//! issues block requests that an [`NbdBackend`] serves: the
//! [`VolumeClient`](crate::VolumeClient) in production, [`MemoryBackend`]
//! for tests and `rackblock attach --memory`.
//!
//! # Handshake (fixed newstyle, sans-IO in `handshake.rs`)
//!
//! ```text
//! S: NBDMAGIC IHAVEOPT flags=FIXED_NEWSTYLE|NO_ZEROES
//! C: client flags            unknown bits ─────────────────────▶ close
//! loop (≤ max_options_per_handshake, data ≤ max_option_bytes):
//!   C: IHAVEOPT option length data           bad magic ─────────▶ close
//!   STRUCTURED_REPLY ─▶ ACK (reads now answered with chunks)
//!   LIST             ─▶ SERVER per export, ACK
//!   INFO             ─▶ INFO(EXPORT, [NAME], [DESCRIPTION], BLOCK_SIZE), ACK
//!   GO               ─▶ same as INFO, then ───────────────────▶ transmission
//!   EXPORT_NAME      ─▶ size, flags[, 124 zeroes] ───────────▶ transmission
//!                       (unknown export: close, it cannot error)
//!   ABORT            ─▶ ACK, close
//!   anything else    ─▶ ERR_UNSUP (STARTTLS, META_CONTEXT, ...)
//!   bad lengths      ─▶ ERR_INVALID; unknown export ─▶ ERR_UNKNOWN
//! ```
//!
//! Option data longer than `max_option_bytes` is discarded unread (never
//! allocated) and refused; beyond 1 MiB the server hangs up. Block sizes:
//! minimum 512, preferred 4096, maximum = the payload limit (32 MiB).
//! Transmission flags: `HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM |
//! SEND_WRITE_ZEROES | CAN_MULTI_CONN`, plus `SEND_DF` when structured
//! replies were negotiated (every read is answered with one data chunk,
//! so "don't fragment" always holds).
//!
//! # Transmission phase
//!
//! ```text
//! reader loop ──(slot ≤ max_requests_per_connection, payload bytes ≤ budget)──▶
//!    validate (request.rs, sans-IO) ── rejected ──▶ error reply
//!    READ / WRITE / TRIM / WRITE_ZEROES ──▶ one task each ──▶ backend
//!    FLUSH ──▶ task: wait for the writes received before it, then backend.flush
//!    DISC / EOF / server shutdown ──▶ stop reading, finish in-flight, close
//!    bad magic ──▶ stop reading, finish in-flight, close (this connection only)
//!                                    │
//!              replies (mpsc, bounded) ▼
//!          one writer task: encodes simple or structured replies in
//!          completion order (matched by handle), batches, flushes
//! ```
//!
//! * **Ordering and concurrency.** Requests on one connection run
//!   concurrently and are answered out of order; the client matches
//!   replies by handle. A FLUSH snapshots the writes (WRITE, TRIM,
//!   WRITE_ZEROES) received before it on this connection and waits for
//!   them to complete before flushing, so it covers everything the spec
//!   requires (all writes already replied to) and more. Writes received
//!   after it are not held back.
//! * **Bounds.** A request slot is taken before each header is read and a
//!   byte-budget permit before a payload is buffered or a read issued;
//!   both travel with the reply until it is written. So a connection
//!   buffers at most `max_requests_per_connection` requests and
//!   `max_in_flight_bytes_per_connection` payload bytes, and stops reading
//!   the socket (TCP backpressure) when either runs out. A WRITE longer
//!   than the maximum payload is discarded unread and gets `EOVERFLOW`.
//! * **Errors** (see `request.rs` for the full table): out of range is
//!   `ENOSPC` for writes and `EINVAL` otherwise (the spec's SHOULD),
//!   misaligned or zero-length `EINVAL`, too long `EOVERFLOW`, unknown
//!   commands and flags, `CACHE` and `BLOCK_STATUS` `EINVAL`. Backend
//!   failures carry their own class ([`BackendError`]);
//!   [`volume_error_to_nbd`] is the one mapping from volume-client errors.
//!   A malformed request (bad magic) closes only its own connection.
//! * **Failover.** The NBD layer never times out or fails a request early:
//!   the volume client queues and retries across a head-node failover
//!   until its `failover_timeout` (120 s by default), and only then
//!   reports `EIO`.
//!
//! # Why `CAN_MULTI_CONN` is safe
//!
//! All connections to an export share one backend. For the volume client
//! that means one set of head-node links and one partition map: a WRITE is
//! acknowledged only once it is durable on two head nodes (the partition's
//! replicated log), so it is visible to any later read from any connection
//! and survives a crash without a flush; a FLUSH goes to every
//! partition's primary and completes only after everything acknowledged
//! before it is durable, whichever connection wrote it. That is exactly
//! the flag's contract: the effect of FLUSH and FUA is visible across all
//! connections when their reply is sent. The memory backend applies every
//! operation under one lock, which gives the same.

mod backend;
mod handshake;
pub mod kernel;
pub mod netlink;
mod request;
mod server;
pub mod wire;

pub use backend::{
    volume_error_to_nbd, BackendError, BackendOp, MemoryBackend, MemoryFault, NbdBackend,
};
pub use handshake::TlsMode;
pub use server::{ConnectionError, NbdConfig, NbdError, NbdServer, NbdTls, MINIMUM_BLOCK_BYTES};
pub use wire::NbdErrno;

/// Whether an NBD server answers at `address`: connects (300 ms), reads the
/// fixed newstyle greeting (`NBDMAGIC IHAVEOPT`, 2 s), then ends the
/// handshake politely (client flags, `NBD_OPT_ABORT`). A blocking probe for
/// whoever waits for a server to come up (`rackblock up`, the end-to-end
/// tests).
pub fn server_greets(address: std::net::SocketAddr) -> bool {
    use std::io::{Read as _, Write as _};
    use std::time::Duration;

    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&address, Duration::from_millis(300))
    else {
        return false;
    };
    if stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .is_err()
    {
        return false;
    }
    let mut greeting = [0u8; 18];
    if stream.read_exact(&mut greeting).is_err() || &greeting[..16] != b"NBDMAGICIHAVEOPT" {
        return false;
    }
    let mut bye = Vec::with_capacity(20);
    bye.extend_from_slice(&3u32.to_be_bytes()); // FIXED_NEWSTYLE | NO_ZEROES
    bye.extend_from_slice(b"IHAVEOPT");
    bye.extend_from_slice(&2u32.to_be_bytes()); // NBD_OPT_ABORT
    bye.extend_from_slice(&0u32.to_be_bytes());
    let _ = stream.write_all(&bye);
    let mut reply = [0u8; 20];
    let _ = stream.read(&mut reply);
    true
}
