//! Raft RPCs over the dual-path transport.
//!
//! ```text
//! openraft replication task ─▶ RaftPeer::append_entries / vote / install_snapshot
//!     serde JSON ─▶ Message::Raft{rpc, payload} ─▶ PeerLink::call (A, else B)
//!                                                   │
//! remote head node: server ─▶ LcpNode::handle ─▶ Raft::append_entries / ...
//!     Message::RaftReply{ JSON of RaftReply<Result<Response, RaftError>> } ◀─┘
//! ```
//!
//! * [`PeerLinks`] is the process-wide pool: **one** [`PeerLink`] per peer
//!   (head node or sled), created from the peer's network A and B
//!   addresses and reused by every Raft replication stream to that peer
//!   and by the failure detector (which reads the link's per-path probe
//!   state). A link whose addresses changed is replaced.
//! * Raft RPCs are idempotent, so the link resends one on the other network
//!   when the first path fails or times out. The pool's links probe fast
//!   (see [`PeerLinks::raft_link_config`]), so a black-holed network A is
//!   marked Down well within an election timeout and heartbeats go over B:
//!   a single dead network never makes followers start elections.
//! * Errors map to what openraft expects: both paths down
//!   ([`LinkError::Unreachable`]) or a closed link → `Unreachable` (openraft
//!   backs off before retrying that peer); an RPC past openraft's deadline
//!   → `Timeout`; a garbled answer → `Network`; an error returned by the
//!   remote Raft → `RemoteError`.
//! * Payloads are serde JSON: control-plane entries are small, and JSON is
//!   debuggable. Snapshots go in chunks (`snapshot_max_chunk_size`, see
//!   [`crate::node`]) far below the frame limit.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use openraft::error::{NetworkError, RemoteError, Timeout, Unreachable};
use openraft::network::{RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use proto::lcp::RaftRpcKind;
use proto::link::{LinkConfig, LinkError, LinkMetrics, PeerLink};
use proto::Message;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::raft::{
    AppendEntriesRequest, AppendEntriesResponse, HeadNodeInfo, InstallSnapshotError,
    InstallSnapshotRequest, InstallSnapshotResponse, RPCError, RaftError, RaftNodeId, TypeConfig,
    VoteRequest, VoteResponse,
};

/// What a `Message::RaftReply` carries: either the remote Raft's own
/// result, or why the remote could not hand the RPC to Raft at all (bad
/// payload, Raft not running).
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftReply<T> {
    Handled(T),
    Refused(String),
}

/// Encode a reply for the wire (the server side of [`RaftPeer`]).
pub fn encode_raft_reply<T: Serialize>(reply: &RaftReply<T>) -> Message {
    let payload = serde_json::to_vec(reply).unwrap_or_else(|error| {
        // Serialising plain data structs cannot fail; keep the answer
        // well-formed anyway.
        serde_json::to_vec(&RaftReply::<()>::Refused(error.to_string())).unwrap_or_default()
    });
    Message::RaftReply {
        payload: Bytes::from(payload),
    }
}

/// The process-wide pool of links: one per peer name.
#[derive(Debug)]
pub struct PeerLinks {
    config: LinkConfig,
    metrics: LinkMetrics,
    links: Mutex<HashMap<String, Arc<PeerLink>>>,
}

impl PeerLinks {
    pub fn new(config: LinkConfig, metrics: LinkMetrics) -> PeerLinks {
        PeerLinks {
            config,
            metrics,
            links: Mutex::new(HashMap::new()),
        }
    }

    /// Link config for Raft among head nodes. openraft abandons an
    /// AppendEntries after one heartbeat interval, so what moves heartbeats
    /// off a black-holed network is the prober marking that path Down: it
    /// probes every half heartbeat and gives a probe a sixth of the minimum
    /// election timeout, so two failed probes (the Down threshold) take
    /// about a heartbeat plus a third of an election timeout — followers
    /// hear from the leader over the other network before any of them
    /// times out. A refused connection fails over at once.
    /// `auth`: the member's unit credential (the unit port requires it).
    pub fn raft_link_config(
        heartbeat: Duration,
        election_timeout_min: Duration,
        auth: Option<Arc<proto::auth::Credential>>,
    ) -> LinkConfig {
        let floor = |d: Duration, min_ms: u64| d.max(Duration::from_millis(min_ms));
        LinkConfig {
            connect_timeout: floor(election_timeout_min / 4, 50),
            request_timeout: floor(election_timeout_min / 2, 100),
            probe_interval: floor(heartbeat / 2, 20),
            probe_timeout: floor(election_timeout_min / 6, 100),
            failures_before_down: 2,
            auth,
            tls: None,
        }
    }

    /// The link to `peer`, created on first use; replaced if the
    /// addresses changed (a re-addressed node).
    pub fn link(&self, peer: &str, address_a: SocketAddr, address_b: SocketAddr) -> Arc<PeerLink> {
        let mut links = lock(&self.links);
        if let Some(link) = links.get(peer) {
            let [a, b] = link.paths();
            if a.address == address_a && b.address == address_b {
                return link.clone();
            }
            link.close();
        }
        let link = PeerLink::new(
            peer.to_owned(),
            address_a,
            address_b,
            self.config.clone(),
            self.metrics.clone(),
        );
        links.insert(peer.to_owned(), link.clone());
        link
    }

    /// The link to `peer`, if one exists.
    pub fn get(&self, peer: &str) -> Option<Arc<PeerLink>> {
        lock(&self.links).get(peer).cloned()
    }

    /// Close and forget the link to `peer`.
    pub fn remove(&self, peer: &str) {
        if let Some(link) = lock(&self.links).remove(peer) {
            link.close();
        }
    }

    /// Close every link (shutdown).
    pub fn close_all(&self) {
        for (_, link) in lock(&self.links).drain() {
            link.close();
        }
    }
}

/// Poison-tolerant lock: the maps guarded here stay consistent at every
/// step, so a panic elsewhere leaves nothing half-done.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// openraft's network factory: hands out [`RaftPeer`]s backed by the pool.
#[derive(Debug, Clone)]
pub struct RaftNetworkFactoryImpl {
    this_node: RaftNodeId,
    links: Arc<PeerLinks>,
}

impl RaftNetworkFactoryImpl {
    pub fn new(this_node: RaftNodeId, links: Arc<PeerLinks>) -> Self {
        RaftNetworkFactoryImpl { this_node, links }
    }
}

impl RaftNetworkFactory<TypeConfig> for RaftNetworkFactoryImpl {
    type Network = RaftPeer;

    async fn new_client(&mut self, target: RaftNodeId, node: &HeadNodeInfo) -> RaftPeer {
        RaftPeer {
            this_node: self.this_node,
            target,
            node: node.clone(),
            link: self.links.link(&node.id, node.address_a, node.address_b),
        }
    }
}

/// One Raft peer as openraft's replication sees it.
#[derive(Debug)]
pub struct RaftPeer {
    this_node: RaftNodeId,
    target: RaftNodeId,
    node: HeadNodeInfo,
    link: Arc<PeerLink>,
}

fn rpc_type(rpc: RaftRpcKind) -> RPCTypes {
    match rpc {
        RaftRpcKind::AppendEntries => RPCTypes::AppendEntries,
        RaftRpcKind::Vote => RPCTypes::Vote,
        RaftRpcKind::InstallSnapshot => RPCTypes::InstallSnapshot,
    }
}

/// Map a transport failure to the openraft error that makes it back off
/// (Unreachable) or simply retry (Network/Timeout).
fn link_error<E: std::error::Error>(
    error: LinkError,
    this_node: RaftNodeId,
    target: RaftNodeId,
    rpc: RaftRpcKind,
    ttl: Duration,
) -> RPCError<E> {
    match error {
        // TlsRequired: the unit port speaks no TLS, so only a
        // misaddressed peer (a host port) answers this: back off.
        LinkError::Unreachable { .. } | LinkError::Closed | LinkError::TlsRequired { .. } => {
            RPCError::Unreachable(Unreachable::new(&error))
        }
        LinkError::Timeout { .. } => RPCError::Timeout(Timeout {
            action: rpc_type(rpc),
            id: this_node,
            target,
            timeout: ttl,
        }),
        LinkError::Uncertain { .. } | LinkError::Protocol { .. } => {
            RPCError::Network(NetworkError::new(&error))
        }
    }
}

impl RaftPeer {
    async fn call<Req, Resp, E>(
        &self,
        rpc: RaftRpcKind,
        request: &Req,
        ttl: Duration,
    ) -> Result<Resp, RPCError<RaftError<E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let payload =
            serde_json::to_vec(request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let message = Message::Raft {
            rpc,
            payload: Bytes::from(payload),
        };
        let reply = match tokio::time::timeout(ttl, self.link.call(message, true)).await {
            Err(_elapsed) => {
                return Err(RPCError::Timeout(Timeout {
                    action: rpc_type(rpc),
                    id: self.this_node,
                    target: self.target,
                    timeout: ttl,
                }))
            }
            Ok(Err(error)) => return Err(link_error(error, self.this_node, self.target, rpc, ttl)),
            Ok(Ok(reply)) => reply,
        };
        let Message::RaftReply { payload } = reply else {
            return Err(RPCError::Network(NetworkError::new(&WireError(format!(
                "{rpc}: unexpected reply kind {:#06x}",
                reply.kind()
            )))));
        };
        let reply: RaftReply<Result<Resp, RaftError<E>>> = serde_json::from_slice(&payload)
            .map_err(|e| {
                RPCError::Network(NetworkError::new(&WireError(format!(
                    "{rpc}: undecodable reply: {e}"
                ))))
            })?;
        match reply {
            RaftReply::Handled(Ok(response)) => Ok(response),
            RaftReply::Handled(Err(error)) => Err(RPCError::RemoteError(
                RemoteError::new_with_node(self.target, self.node.clone(), error),
            )),
            RaftReply::Refused(reason) => Err(RPCError::Unreachable(Unreachable::new(&WireError(
                format!("{rpc} refused by {}: {reason}", self.node.id),
            )))),
        }
    }
}

/// A malformed or refused exchange.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct WireError(pub String);

impl RaftNetwork<TypeConfig> for RaftPeer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse, RPCError<RaftError>> {
        self.call(RaftRpcKind::AppendEntries, &rpc, option.hard_ttl())
            .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse, RPCError<RaftError<InstallSnapshotError>>> {
        self.call(RaftRpcKind::InstallSnapshot, &rpc, option.hard_ttl())
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest,
        option: RPCOption,
    ) -> Result<VoteResponse, RPCError<RaftError>> {
        self.call(RaftRpcKind::Vote, &rpc, option.hard_ttl()).await
    }

    fn backoff(&self) -> openraft::network::Backoff {
        // A restarted peer is back within a few hundred ms; do not wait the
        // default 500 ms between attempts to reach it.
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(200)))
    }
}
