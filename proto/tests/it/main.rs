//! Integration tests of the proto crate, in one binary (see STYLE.md).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod codec;
mod http;
mod link;
mod net;
mod server;
mod strategies;
