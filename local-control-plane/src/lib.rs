//! Local control plane of a unit: the decisions that must never be made
//! twice (who is primary of a partition at which epoch, which columns make
//! which extent), agreed by Raft among the unit's head nodes.
//!
//! This crate is built sans-IO first:
//!
//! * [`state`] — [`UnitState`], the replicated state machine: inventory,
//!   volumes and partitions (primary, secondary, epoch, lease, sandbox),
//!   extents and free columns; its invariant checker and read models
//!   ([`PartitionMap`], [`UnitStatus`]). Pure and deterministic: no clock,
//!   no randomness, no I/O.
//! * [`command`] — [`Command`], one Raft entry's payload, and [`Outcome`].
//! * [`error`] — [`CommandError`]: a refused command changed nothing.
//! * [`raft`] — the Raft shell's storage side: openraft's type config
//!   ([`raft::TypeConfig`]) and the durable log and state-machine storage
//!   of a member ([`raft::RaftStore`]).
//!
//! RPCs on the dual-path transport, the node runtime, the leader's
//! controllers (failure detection, failover, repair) and every voter's
//! quick election on a dead leader ([`quick_election`]) drive this core.

pub mod client;
pub mod command;
pub mod deleter;
pub mod detector;
pub mod error;
pub mod failover;
#[cfg(any(test, feature = "fixture"))]
pub mod fixture;
pub mod network;
pub mod node;
pub mod proposals;
pub mod quick_election;
pub mod raft;
pub mod repair;
pub mod snapshot_query;
pub mod snapshotter;
pub mod state;

pub use client::{
    HostReservationReply, HostReservationRequest, LcpClient, LcpError, LcpRequest, LcpResponse,
    RaftStatus,
};
pub use command::{Command, DeviceSpec, Endpoint, Network, Outcome};
pub use error::{CommandError, Entity};
pub use node::{LcpConfig, LcpNode};
pub use repair::RepairConfig;
pub use state::{
    ColumnRef, DeviceRef, Epoch, ErasureCode, ExtentId, Health, NodeId, PartitionId, PartitionMap,
    RepairPhase, RepairReason, RepairStatus, RepairTask, SledId, UnitState, UnitStatus, VolumeId,
};
