//! Integration tests of the volume client against in-process fake head
//! nodes (one binary, see STYLE.md).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fake;
mod nbd;
mod nbd_harness;
mod volume_client;
