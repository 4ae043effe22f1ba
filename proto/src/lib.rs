//! Wire protocol of rackblock: frames, messages and the dual-path transport.
//!
//! * [`wire`] — checked little-endian reader/writer for message bodies; the
//!   reader never panics and returns data payloads zero-copy.
//! * [`frame`] — the frame codec: a fixed 32-byte little-endian header
//!   (magic, version, kind, flags, request id, body length, CRC-32C over
//!   header and body) and a maximum body of 16 MiB + 64 KiB. Decoding never
//!   panics and rejects an oversized length before buffering the body.
//! * [`message`] — [`Message`], every message that crosses a network, with
//!   explicit little-endian body layouts. Kinds are grouped by component:
//!   `0x00xx` transport (ping), `0x01xx` sled controller, `0x02xx` head
//!   node (host protocol, replication), `0x03xx` local control plane.
//! * [`sled`] — the sled controller's requests, replies and typed errors.
//! * [`volume`] — the host protocol (volume client → a partition's
//!   primary: read, write, flush, trim, write-zeroes with end-to-end
//!   CRC-32C) and replication (primary → secondary), with typed errors.
//! * [`lcp`] — local-control-plane messages: Raft RPCs and the client API,
//!   with payloads opaque to this crate (serde-encoded by
//!   `local-control-plane`, so openraft stays inside it).
//! * [`link`] — [`link::PeerLink`]: connections to one peer over network A
//!   and network B, per-path probing and health, retry of idempotent
//!   requests on the other path; [`link::LinkMetrics`].
//! * [`rate`] — the token bucket every pacer uses (QoS, rebuild, scrub).
//! * [`qos`] — a volume's QoS limits as the unit records them
//!   ([`qos::VolumeQos`]) and their validation.
//! * [`server`] — accepting side: decode frames, dispatch to a handler
//!   concurrently, answer (possibly out of order), drop a connection that
//!   sends a bad frame; [`server::ServerMetrics`].
//!
//! * [`auth`] — unit-port authentication: a keyed challenge-response
//!   between unit members (HMAC-SHA256 over both nonces and identities),
//!   then a truncated HMAC-SHA256 with a sequence number on every frame.
//!
//! The fuzz target `fuzz/fuzz_targets/frame_decode.rs` (top of the repo)
//! drives the frame and message decoders with arbitrary bytes.

pub mod auth;
pub mod frame;
pub mod http;
pub mod lcp;
pub mod link;
pub mod message;
pub mod qos;
pub mod rate;
pub mod server;
pub mod sled;
pub mod tls;
pub mod volume;
pub mod wire;

pub use message::Message;

/// The volume block size: the unit of the index, the write log, the sled
/// columns (one CRC-32C per block) and of replication, and the size of the
/// chunks host CRCs cover. Volume, partition and column sizes are multiples
/// of it. Every crate above `proto` uses this one constant (as
/// `BLOCK_SIZE_BYTES as usize` where a length is a `usize`); `hardware`,
/// which depends on no project crate, has its own device I/O alignment,
/// `hardware::IO_ALIGN_BYTES`, which must divide it.
pub const BLOCK_SIZE_BYTES: u64 = 4096;
