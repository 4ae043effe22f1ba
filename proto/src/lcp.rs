//! Local-control-plane messages: Raft RPCs among head nodes and the
//! control-plane client API.
//!
//! The payloads are **opaque bytes** here: the local-control-plane crate
//! serialises openraft's request and response types (and its own client
//! request/response types) with serde, so openraft stays a dependency of
//! that crate alone and `proto` only frames, checksums and routes them.
//!
//! * [`RaftRpcKind`] says which openraft RPC a `Message::Raft` carries, so
//!   the receiver can decode the payload into the right type without
//!   looking inside it.
//! * Raft RPCs are idempotent (Raft tolerates duplicates and reordering),
//!   so a link may resend them on the other network.
//! * A `Message::Lcp` request carries its own idempotency flag: reads
//!   (partition map, status) set it, commands do not — a command whose
//!   outcome is unknown must be reconciled by reading, not resent blindly.

/// Largest serialised payload of a Raft or control-plane message. Equal to
/// the frame's data limit; snapshots are sent in chunks well below it.
pub const MAX_LCP_PAYLOAD_BYTES: u32 = crate::frame::MAX_PAYLOAD_BYTES as u32;

/// Which openraft RPC a `Message::Raft` carries (one byte on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RaftRpcKind {
    /// `AppendEntriesRequest` (also heartbeats).
    AppendEntries,
    /// `VoteRequest`.
    Vote,
    /// One chunk of a snapshot (`InstallSnapshotRequest`).
    InstallSnapshot,
}

impl RaftRpcKind {
    /// Every kind, in tag order.
    pub const ALL: [RaftRpcKind; 3] = [
        RaftRpcKind::AppendEntries,
        RaftRpcKind::Vote,
        RaftRpcKind::InstallSnapshot,
    ];

    /// Wire tag.
    pub fn tag(self) -> u8 {
        match self {
            RaftRpcKind::AppendEntries => 0,
            RaftRpcKind::Vote => 1,
            RaftRpcKind::InstallSnapshot => 2,
        }
    }

    /// Inverse of [`RaftRpcKind::tag`].
    pub fn from_tag(tag: u8) -> Option<RaftRpcKind> {
        RaftRpcKind::ALL.into_iter().find(|k| k.tag() == tag)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RaftRpcKind::AppendEntries => "append_entries",
            RaftRpcKind::Vote => "vote",
            RaftRpcKind::InstallSnapshot => "install_snapshot",
        }
    }
}

impl std::fmt::Display for RaftRpcKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip() {
        for kind in RaftRpcKind::ALL {
            assert_eq!(RaftRpcKind::from_tag(kind.tag()), Some(kind));
        }
        assert_eq!(RaftRpcKind::from_tag(3), None);
    }
}
