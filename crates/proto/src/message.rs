//! INTERFACE SKETCH — filled by the proto helper.
use crate::sled::{SledRequest, SledResponse};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Ping { nonce: u64 },
    Pong { nonce: u64 },
    Sled(SledRequest),
    SledReply(SledResponse),
}
