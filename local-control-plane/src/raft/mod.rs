//! The Raft shell around [`UnitState`](crate::UnitState): openraft's type
//! configuration and the durable storage of one head node's Raft member.
//!
//! # Types
//!
//! [`types`] declares [`TypeConfig`]: node ids are `u64` (1-based position
//! in the rack file's `[[head_node]]` list), nodes are [`HeadNodeInfo`]
//! (both network addresses and the admin address), entries carry a
//! [`Command`](crate::Command) and answer a [`Response`].
//!
//! # Storage
//!
//! A member keeps everything Raft needs in one directory
//! ([`RaftStore::open`]):
//!
//! ```text
//! <dir>/raft-log.redb   log entries, vote, committed, last purged (redb)
//! <dir>/snapshot.bin    latest snapshot of the state machine
//! ```
//!
//! What is durable when (openraft's contract, see [`log_store`] and
//! [`state_machine`] for the details):
//!
//! * an appended entry, before openraft is told it is flushed (so before a
//!   follower acknowledges it or a leader counts it);
//! * a vote, a truncation, a purge, before the call returns: a member never
//!   votes twice in a term, even across a crash;
//! * a snapshot, before it is reported built or installed, hence before any
//!   log entry it covers is purged.
//!
//! The applied state itself is in memory: at open it is the latest
//! snapshot's, and openraft replays the committed entries after it. Every
//! on-disk structure carries a format version and a CRC-32C; a record or a
//! snapshot that fails its checks is refused with a typed
//! [`StorageError`], never used and never silently dropped.

pub mod codec;
mod error;
pub mod log_store;
pub mod state_machine;
pub mod types;

use std::path::Path;

pub use codec::{SnapshotContents, SNAPSHOT_VERSION};
pub use error::StorageError;
pub use log_store::LogStore;
pub use state_machine::{
    AppliedState, SharedState, SnapshotBuilder, StateMachineStore, SNAPSHOT_FILE,
};

pub use types::{
    AppendEntriesRequest, AppendEntriesResponse, CheckIsLeaderError, ClientWriteError,
    ClientWriteResponse, Entry, EntryPayload, HeadNodeInfo, InitializeError, InstallSnapshotError,
    InstallSnapshotRequest, InstallSnapshotResponse, LogId, LogState, Membership, RPCError, Raft,
    RaftError, RaftMetrics, RaftNodeId, RaftStorageError, Response, Snapshot, SnapshotMeta,
    StoredMembership, TypeConfig, Vote, VoteRequest, VoteResponse,
};

/// File name of the log database in a member's Raft directory.
pub const LOG_FILE: &str = "raft-log.redb";

/// Opens a member's Raft storage.
#[derive(Debug)]
pub struct RaftStore;

impl RaftStore {
    /// Open (creating if needed) the Raft storage in `dir`: the log store
    /// and the state machine restored from the latest snapshot. Hand both
    /// to [`Raft::new`](openraft::Raft::new); openraft then replays the
    /// committed entries after the snapshot.
    pub fn open(dir: &Path) -> Result<(LogStore, StateMachineStore), StorageError> {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(StorageError::io("create directory", dir))?;
            if let Some(parent) = dir.parent() {
                fsync_dir(parent)?;
            }
        }
        let log = LogStore::open(&dir.join(LOG_FILE))?;
        let state_machine = StateMachineStore::open(dir)?;
        Ok((log, state_machine))
    }
}

/// fsync a directory so that the names created or renamed in it survive a
/// crash.
fn fsync_dir(dir: &Path) -> Result<(), StorageError> {
    let dir_for_open = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    std::fs::File::open(dir_for_open)
        .and_then(|file| file.sync_all())
        .map_err(StorageError::io("fsync directory", dir_for_open))
}
