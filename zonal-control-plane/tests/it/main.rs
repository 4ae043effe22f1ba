//! Integration tests of the zonal control plane: the HTTP API in-process
//! against fake units (one binary, see STYLE.md).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api;
mod fake_unit;
mod harness;
