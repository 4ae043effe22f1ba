//! The Raft shell around [`UnitState`](crate::UnitState): openraft's type
//! configuration and the durable storage of one head node's Raft member.
//!
//! # Types
//!
//! [`types`] declares [`TypeConfig`]: node ids are `u64` (1-based position
//! in the rack file's `[[head_node]]` list), nodes are [`HeadNodeInfo`]
//! (both network addresses and the admin address), entries carry a
//! [`Command`](crate::Command) and answer a [`Response`].

pub mod types;

pub use types::{
    AppendEntriesRequest, AppendEntriesResponse, CheckIsLeaderError, ClientWriteError,
    ClientWriteResponse, Entry, EntryPayload, HeadNodeInfo, InitializeError, InstallSnapshotError,
    InstallSnapshotRequest, InstallSnapshotResponse, LogId, LogState, Membership, NodeId, RPCError,
    Raft, RaftError, RaftMetrics, RaftStorageError, Response, Snapshot, SnapshotMeta,
    StoredMembership, TypeConfig, Vote, VoteRequest, VoteResponse,
};
