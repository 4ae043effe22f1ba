//! Wire protocol of rackblock: frames, messages and the dual-path transport.
//!
//! * [`frame`] — the frame codec: a fixed 32-byte little-endian header
//!   (magic, version, kind, flags, request id, body length, CRC-32C over
//!   header and body) and a maximum frame size. Decoding never panics.
//! * [`message`] — [`Message`], every message that crosses a network, with
//!   explicit little-endian body layouts. Kinds are grouped by component:
//!   `0x00xx` transport (ping), `0x01xx` sled controller; later issues add
//!   `0x02xx` head node, `0x03xx` local control plane.
//! * [`sled`] — the sled controller's requests, replies and typed errors.
//! * [`link`] — [`link::PeerLink`]: connections to one peer over network A
//!   and network B, per-path probing and health, retry of idempotent
//!   requests on the other path.
//! * [`server`] — accepting side: decode frames, dispatch to a handler,
//!   answer, drop a connection that sends a bad frame.

pub mod frame;
pub mod link;
pub mod message;
pub mod server;
pub mod sled;
pub mod wire;

pub use message::Message;
