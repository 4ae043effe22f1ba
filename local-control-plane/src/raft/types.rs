//! The openraft type configuration of a unit's Raft group, and short aliases
//! for the openraft types the node runtime, the network and the storage use.
//!
//! * Raft node ids are `u64` ([`RaftNodeId`]): the position of the head
//!   node in the rack file's `[[head_node]]` list, plus one (0 is never a
//!   member). The state machine's own [`crate::NodeId`] is the head node's
//!   *name*, the one `NodeId` of the system; [`HeadNodeInfo::id`] links the
//!   two.
//! * A log entry's payload is a [`Command`]; its response is the result of
//!   [`UnitState::apply`](crate::UnitState::apply): a refused command is a
//!   normally applied entry whose response is the [`CommandError`]. Blank and
//!   membership entries answer `Ok(Outcome::Done)`.
//! * Snapshots travel and rest as one byte buffer (`Cursor<Vec<u8>>`): the
//!   whole unit state is small (inventory and maps, no data).

use std::io::Cursor;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use serde::{Deserialize, Serialize};

use crate::command::{Command, Outcome};
use crate::error::CommandError;

/// Raft node id (openraft's member id): 1-based position in the rack file's
/// `[[head_node]]` list. Not the head node's name ([`crate::NodeId`]).
pub type RaftNodeId = u64;

/// What a member knows about another member: its name and where to reach
/// it on both networks, plus its admin (operator HTTP) address.
///
/// It is stored in membership log entries and snapshots, so it is not
/// `deny_unknown_fields`: a member must read what a newer member wrote.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HeadNodeInfo {
    /// Head node name from the rack file (the state machine's
    /// [`crate::NodeId`]).
    pub id: String,
    /// Raft RPC address on network A.
    pub address_a: SocketAddr,
    /// Raft RPC address on network B.
    pub address_b: SocketAddr,
    /// Admin / operator address.
    pub admin: SocketAddr,
}

/// openraft requires `Node: Default`; an unspecified node has unroutable
/// addresses and an empty name.
impl Default for HeadNodeInfo {
    fn default() -> Self {
        let unspecified = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
        HeadNodeInfo {
            id: String::new(),
            address_a: unspecified,
            address_b: unspecified,
            admin: unspecified,
        }
    }
}

impl std::fmt::Display for HeadNodeInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (a={}, b={}, admin={})",
            self.id, self.address_a, self.address_b, self.admin
        )
    }
}

/// Response of one applied log entry.
pub type Response = Result<Outcome, CommandError>;

openraft::declare_raft_types!(
    /// Type configuration of a unit's Raft group.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = RaftNodeId,
        Node = HeadNodeInfo,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A running Raft member of this unit.
pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<RaftNodeId>;
pub type Vote = openraft::Vote<RaftNodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type EntryPayload = openraft::EntryPayload<TypeConfig>;
pub type Membership = openraft::Membership<RaftNodeId, HeadNodeInfo>;
pub type StoredMembership = openraft::StoredMembership<RaftNodeId, HeadNodeInfo>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type SnapshotMeta = openraft::SnapshotMeta<RaftNodeId, HeadNodeInfo>;
pub type LogState = openraft::LogState<TypeConfig>;
pub type RaftMetrics = openraft::RaftMetrics<RaftNodeId, HeadNodeInfo>;
/// openraft's storage error, what the storage traits return (our typed
/// [`StorageError`](super::StorageError) converts into it).
pub type RaftStorageError = openraft::StorageError<RaftNodeId>;

/// RPC messages (what the network carries).
pub type AppendEntriesRequest = openraft::raft::AppendEntriesRequest<TypeConfig>;
pub type AppendEntriesResponse = openraft::raft::AppendEntriesResponse<RaftNodeId>;
pub type VoteRequest = openraft::raft::VoteRequest<RaftNodeId>;
pub type VoteResponse = openraft::raft::VoteResponse<RaftNodeId>;
pub type InstallSnapshotRequest = openraft::raft::InstallSnapshotRequest<TypeConfig>;
pub type InstallSnapshotResponse = openraft::raft::InstallSnapshotResponse<RaftNodeId>;
pub type ClientWriteResponse = openraft::raft::ClientWriteResponse<TypeConfig>;

/// Errors of the Raft API and of RPCs.
pub type RaftError<E = openraft::error::Infallible> = openraft::error::RaftError<RaftNodeId, E>;
pub type ClientWriteError = openraft::error::ClientWriteError<RaftNodeId, HeadNodeInfo>;
pub type CheckIsLeaderError = openraft::error::CheckIsLeaderError<RaftNodeId, HeadNodeInfo>;
pub type InitializeError = openraft::error::InitializeError<RaftNodeId, HeadNodeInfo>;
pub type InstallSnapshotError = openraft::error::InstallSnapshotError;
pub type RPCError<E = openraft::error::Infallible> =
    openraft::error::RPCError<RaftNodeId, HeadNodeInfo, E>;
