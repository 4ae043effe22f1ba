//! Filled by a later issue; see ARCHITECTURE.md.

pub mod erasure;
pub mod index;
pub mod wal;
