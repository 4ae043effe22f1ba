//! The partition engine's seams, for real: the daemon's implementations of
//! [`ReplicaPeer`], [`SledAccess`] and [`ExtentSource`]
//! (`partition/seams.rs`).
//!
//! ```text
//! Partition ──ReplicaPeer──▶ HeadNodeLinks ─ PeerLink (A, else B) ─▶ secondary head node
//!           ──SledAccess───▶ SledLinks ───── PeerLink per sled ────▶ sled controller
//!           ──ExtentSource─▶ LcpExtents ──── LcpNode (in process) ─▶ Raft leader
//!                                     └───── SledLinks (FreeColumn before FreeExtent)
//! ```
//!
//! * Links come from the **rack file** (both addresses of every head node
//!   and sled) and are created once, lazily, and shared by every partition:
//!   one `PeerLink` per peer, whose prober keeps the path states warm.
//! * Transport failures map to [`PeerError`]: `Unreachable` (both paths
//!   failed, or the link is closed), `Timeout` (no answer; also an
//!   `Uncertain` outcome, since every replication and sled request the
//!   engine sends is idempotent), `Refused` (a wrong answer, or the
//!   control plane refused). The engine treats `Unreachable` and `Timeout`
//!   as retryable and `Refused` as final for that attempt.
//! * **Extents** ([`LcpExtents`]): the primary's sandbox lives in the unit
//!   state. `next_extent` takes the lowest sandbox extent and proposes
//!   `OpenSandboxExtent` (the extent leaves the sandbox, stays owned by the
//!   partition, at the partition's epoch); an empty sandbox is refilled
//!   first (`RefillSandbox`, [`SANDBOX_TARGET`] extents). `free_extent`
//!   frees every column on its sled (fenced by partition and epoch) and
//!   then proposes `FreeExtent` — the order the state machine's docs ask
//!   for, so a column is never handed to another partition while a sled
//!   still holds it for this one. `owned_extents` is a **linearizable**
//!   read: the local state machine is first brought up to the leader's
//!   applied index ([`sync_local_state`]), because a primary that recovers
//!   from a stale list would miss an extent and lose its data.
//! * Commands go through [`LcpNode::serve`], which forwards to the leader;
//!   `NotLeader` and Raft errors (elections) are retried a bounded number
//!   of times.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use hardware::rack::Rack;
use local_control_plane::state::{ExtentId, UnitState};
use local_control_plane::{
    Command, CommandError, LcpError, LcpNode, LcpRequest, LcpResponse, Outcome,
};
use proto::link::{LinkConfig, LinkError, LinkMetrics, PeerLink};
use proto::sled::{PartitionId, SledError, SledRequest, SledResponse};
use proto::volume::{ReplicaReply, ReplicaRequest};
use proto::Message;

use crate::partition::{ExtentGrant, ExtentSource, PeerError, ReplicaPeer, SledAccess};

/// Unopened extents a primary keeps in its sandbox.
pub const SANDBOX_TARGET: u32 = 2;
/// Attempts of one control-plane command across elections.
const PROPOSE_ATTEMPTS: usize = 40;
/// Pause between those attempts.
const PROPOSE_PAUSE: Duration = Duration::from_millis(150);
/// Bound on waiting for the local state machine to catch up.
const SYNC_TIMEOUT: Duration = Duration::from_secs(5);

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A peer answered with a message of a kind the call does not expect.
fn unexpected_answer(peer: String, answer: &Message) -> PeerError {
    PeerError::Refused {
        peer,
        reason: format!("unexpected answer kind {:#06x}", answer.kind()),
    }
}

/// The one mapping of link errors to the engine's peer errors.
pub fn peer_error(peer: &str, error: LinkError) -> PeerError {
    match error {
        LinkError::Unreachable { errors, .. } => PeerError::Unreachable {
            peer: peer.to_string(),
            reason: format!("{errors:?}"),
        },
        LinkError::Closed => PeerError::Unreachable {
            peer: peer.to_string(),
            reason: "link closed".to_string(),
        },
        LinkError::Timeout { .. } | LinkError::Uncertain { .. } => PeerError::Timeout {
            peer: peer.to_string(),
        },
        LinkError::Protocol { reason, .. } => PeerError::Refused {
            peer: peer.to_string(),
            reason,
        },
        error @ LinkError::TlsRequired { .. } => PeerError::Refused {
            peer: peer.to_string(),
            reason: error.to_string(),
        },
    }
}

/// Link settings of the data path: fail over fast, probe often.
/// `auth`: the head node's unit credential (the unit port requires it).
pub fn data_link_config(
    request_timeout: Duration,
    auth: Option<Arc<proto::auth::Credential>>,
) -> LinkConfig {
    LinkConfig {
        connect_timeout: Duration::from_millis(500),
        request_timeout,
        probe_interval: Duration::from_millis(250),
        probe_timeout: Duration::from_millis(500),
        failures_before_down: 2,
        auth,
        tls: None,
    }
}

/// One lazily created `PeerLink` per named peer (head nodes or sleds) of
/// the rack.
struct LinkSet {
    addresses: HashMap<String, (std::net::SocketAddr, std::net::SocketAddr)>,
    links: Mutex<HashMap<String, Arc<PeerLink>>>,
    config: LinkConfig,
    metrics: LinkMetrics,
}

impl fmt::Debug for LinkSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkSet")
            .field("peers", &self.addresses.len())
            .finish_non_exhaustive()
    }
}

impl LinkSet {
    /// No link is made before the first call to a peer.
    fn new(
        addresses: HashMap<String, (std::net::SocketAddr, std::net::SocketAddr)>,
        config: LinkConfig,
        metrics: LinkMetrics,
    ) -> Self {
        Self {
            addresses,
            links: Mutex::new(HashMap::new()),
            config,
            metrics,
        }
    }

    fn link(&self, peer: &str) -> Result<Arc<PeerLink>, PeerError> {
        let (a, b) = *self.addresses.get(peer).ok_or_else(|| PeerError::Refused {
            peer: peer.to_string(),
            reason: "not in the rack file".to_string(),
        })?;
        Ok(lock(&self.links)
            .entry(peer.to_string())
            .or_insert_with(|| {
                PeerLink::new(
                    peer.to_string(),
                    a,
                    b,
                    self.config.clone(),
                    self.metrics.clone(),
                )
            })
            .clone())
    }

    fn close(&self) {
        for (_, link) in lock(&self.links).drain() {
            link.close();
        }
    }
}

/// Links to the other head nodes (replication).
#[derive(Debug)]
pub struct HeadNodeLinks {
    links: LinkSet,
}

impl HeadNodeLinks {
    /// Every head node of `rack` except `this_node`.
    pub fn new(rack: &Rack, this_node: &str, config: LinkConfig, metrics: LinkMetrics) -> Self {
        let addresses = rack
            .head_node
            .iter()
            .filter(|h| h.id != this_node)
            .map(|h| (h.id.clone(), (h.address_a, h.address_b)))
            .collect();
        Self {
            links: LinkSet::new(addresses, config, metrics),
        }
    }

    /// The replication peer of one secondary.
    pub fn replica_peer(self: &Arc<Self>, node: &str) -> Arc<dyn ReplicaPeer> {
        Arc::new(LinkReplicaPeer {
            links: self.clone(),
            node: node.to_string(),
        })
    }

    /// Sends `request` to head node `node` (resent on the other network
    /// when `idempotent`) and waits for the answer.
    pub fn call(
        &self,
        node: &str,
        request: Message,
        idempotent: bool,
    ) -> BoxFuture<'static, Result<Message, PeerError>> {
        let link = self.links.link(node);
        let node = node.to_string();
        Box::pin(async move {
            link?
                .call(request, idempotent)
                .await
                .map_err(|error| peer_error(&node, error))
        })
    }

    /// Closes every link.
    pub fn close(&self) {
        self.links.close();
    }
}

/// [`ReplicaPeer`] over the secondary's `PeerLink`.
#[derive(Debug)]
struct LinkReplicaPeer {
    links: Arc<HeadNodeLinks>,
    node: String,
}

impl ReplicaPeer for LinkReplicaPeer {
    fn send(&self, request: ReplicaRequest) -> BoxFuture<'static, Result<ReplicaReply, PeerError>> {
        let link = self.links.links.link(&self.node);
        let node = self.node.clone();
        Box::pin(async move {
            let link = link?;
            // Every replication request is idempotent (sequence numbers
            // dedupe), so the link may resend it on the other network.
            match link.call(Message::Replica(request), true).await {
                Ok(Message::ReplicaReply(reply)) => Ok(reply),
                Ok(other) => Err(unexpected_answer(node, &other)),
                Err(error) => Err(peer_error(&node, error)),
            }
        })
    }
}

/// [`SledAccess`]: one `PeerLink` per sled of the rack.
#[derive(Debug)]
pub struct SledLinks {
    links: LinkSet,
    /// Devices that answered `DeviceFailed` since the last
    /// [`take_failed_devices`](SledLinks::take_failed_devices): the
    /// manager reports them to the control plane.
    failed_devices: Arc<Mutex<BTreeSet<(String, u16)>>>,
}

impl SledLinks {
    /// Every sled of `rack`.
    pub fn new(rack: &Rack, config: LinkConfig, metrics: LinkMetrics) -> Self {
        let addresses = rack
            .sled
            .iter()
            .map(|s| (s.id.clone(), (s.address_a, s.address_b)))
            .collect();
        Self {
            links: LinkSet::new(addresses, config, metrics),
            failed_devices: Arc::new(Mutex::new(BTreeSet::new())),
        }
    }

    /// Closes every link.
    pub fn close(&self) {
        self.links.close();
    }

    /// The `(sled, device)`s that answered `DeviceFailed` since the last
    /// call (each once).
    pub fn take_failed_devices(&self) -> BTreeSet<(String, u16)> {
        std::mem::take(&mut *lock(&self.failed_devices))
    }

    /// Asks `sled` for its inventory (device states).
    pub async fn inventory(&self, sled: &str) -> Result<proto::sled::SledInventory, PeerError> {
        match self.call(sled, SledRequest::Inventory).await? {
            SledResponse::Inventory(inventory) => Ok(inventory),
            other => Err(PeerError::Refused {
                peer: sled.to_string(),
                reason: format!("unexpected answer to an inventory request: {other:?}"),
            }),
        }
    }
}

impl SledAccess for SledLinks {
    fn call(
        &self,
        sled: &str,
        request: SledRequest,
    ) -> BoxFuture<'static, Result<SledResponse, PeerError>> {
        let link = self.links.link(sled);
        let sled = sled.to_string();
        let failed_devices = self.failed_devices.clone();
        Box::pin(async move {
            let link = link?;
            let idempotent = request.is_idempotent();
            match link.call(Message::Sled(request), idempotent).await {
                Ok(Message::SledReply(response)) => {
                    if let SledResponse::Error(SledError::DeviceFailed { device }) = &response {
                        lock(&failed_devices).insert((sled, *device));
                    }
                    Ok(response)
                }
                Ok(other) => Err(unexpected_answer(sled, &other)),
                Err(error) => Err(peer_error(&sled, error)),
            }
        })
    }
}

/// Why a control-plane command did not apply.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProposeError {
    /// The state machine refused it (changed nothing).
    #[error("refused: {0}")]
    Refused(CommandError),
    /// No leader answered in time, or the outcome is unknown.
    #[error("control plane unavailable: {0}")]
    Unavailable(String),
}

impl ProposeError {
    fn into_peer(self) -> PeerError {
        match self {
            ProposeError::Refused(error) if !error.is_retryable() => PeerError::Refused {
                peer: "local-control-plane".to_string(),
                reason: error.to_string(),
            },
            ProposeError::Refused(error) => PeerError::Unreachable {
                peer: "local-control-plane".to_string(),
                reason: error.to_string(),
            },
            ProposeError::Unavailable(reason) => PeerError::Unreachable {
                peer: "local-control-plane".to_string(),
                reason,
            },
        }
    }
}

/// Proposes `command` through the in-process member (forwarded to the
/// leader), retrying elections a bounded number of times.
pub async fn propose(node: &LcpNode, command: Command) -> Result<Outcome, ProposeError> {
    let mut last = String::new();
    for attempt in 0..PROPOSE_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(PROPOSE_PAUSE).await;
        }
        match node.serve(LcpRequest::Command(command.clone())).await {
            LcpResponse::Applied(Ok(outcome)) => return Ok(outcome),
            LcpResponse::Applied(Err(error)) => return Err(ProposeError::Refused(error)),
            LcpResponse::NotLeader { leader_name, .. } => {
                last = format!("no leader reachable (leader: {leader_name:?})");
            }
            LcpResponse::Error(LcpError::Uncertain { reason }) => {
                return Err(ProposeError::Unavailable(format!(
                    "outcome unknown: {reason}"
                )))
            }
            LcpResponse::Error(error) => last = error.to_string(),
            other => last = format!("unexpected answer {other:?}"),
        }
    }
    Err(ProposeError::Unavailable(last))
}

/// Brings the local state machine up to the leader's applied index (a
/// read-index read on a follower): afterwards [`LcpNode::local_state`]
/// reflects every command committed before the call.
pub async fn sync_local_state(node: &LcpNode) -> Result<(), PeerError> {
    let unavailable = |reason: String| PeerError::Unreachable {
        peer: "local-control-plane".to_string(),
        reason,
    };
    let target = match node.serve(LcpRequest::UnitStatus).await {
        LcpResponse::UnitStatus { raft, .. } => raft.last_applied.unwrap_or(0),
        other => return Err(unavailable(format!("linearizable read failed: {other:?}"))),
    };
    let deadline = Instant::now() + SYNC_TIMEOUT;
    loop {
        if node.raft_status().last_applied.unwrap_or(0) >= target {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(unavailable(format!(
                "local state machine did not reach index {target} in {SYNC_TIMEOUT:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`ExtentSource`] through the local control plane (see the module docs).
#[derive(Debug, Clone)]
pub struct LcpExtents {
    inner: Arc<ExtentsInner>,
}

#[derive(Debug)]
struct ExtentsInner {
    node: LcpNode,
    sleds: Arc<SledLinks>,
    /// One extent request at a time per head node: two partitions racing
    /// for sandbox refills gain nothing.
    serial: tokio::sync::Mutex<()>,
    /// Least present columns of a new extent when fewer than k+m sleds can
    /// take one (`min_flush_columns` of the rack file's `[unit]`); `None`:
    /// k+1. The control plane clamps it to `[k, k+m]`.
    min_flush_columns: Option<u16>,
}

impl LcpExtents {
    pub fn new(node: LcpNode, sleds: Arc<SledLinks>) -> Self {
        Self {
            inner: Arc::new(ExtentsInner {
                node,
                sleds,
                serial: tokio::sync::Mutex::new(()),
                min_flush_columns: None,
            }),
        }
    }

    /// Sets the least present columns of a degraded extent (see
    /// `hardware::rack::UnitSpec::min_flush_columns`).
    pub fn with_min_flush_columns(self, min_flush_columns: Option<u16>) -> Self {
        Self {
            inner: Arc::new(ExtentsInner {
                node: self.inner.node.clone(),
                sleds: self.inner.sleds.clone(),
                serial: tokio::sync::Mutex::new(()),
                min_flush_columns,
            }),
        }
    }

    fn clone_handle(&self) -> Arc<ExtentsInner> {
        self.inner.clone()
    }
}

/// The grant of `extent` as the unit state records it: its code, its
/// columns and their size; `None` if the extent or its first sled is unknown.
pub(crate) fn grant_of(state: &UnitState, extent: ExtentId) -> Option<ExtentGrant> {
    let entry = state.extents().get(&extent)?;
    let (_, first) = entry.present().next()?;
    let column_size_bytes = state.sleds().get(&first.sled)?.column_size_bytes;
    Some(ExtentGrant {
        extent: extent.0,
        k: entry.code.k,
        m: entry.code.m,
        column_size_bytes,
        columns: entry
            .columns
            .iter()
            .map(|c| {
                c.as_ref().map_or_else(ExtentGrant::owed_slot, |c| {
                    (c.sled.0.clone(), c.column_id())
                })
            })
            .collect(),
        owed: entry.owed().collect(),
    })
}

async fn next_extent(
    this: &ExtentsInner,
    partition: PartitionId,
    epoch: u64,
) -> Result<ExtentGrant, PeerError> {
    let _serial = this.serial.lock().await;
    // Bounded: a refill, an open, and a few lost races.
    for _ in 0..8 {
        let state = this.node.local_state();
        let Some(entry) = state.partition(partition) else {
            return Err(PeerError::Refused {
                peer: "local-control-plane".to_string(),
                reason: format!("unknown partition {partition}"),
            });
        };
        // Only an extent whose every present column can be claimed now:
        // the refill below drops the others and allocates degraded extents
        // when fewer than k+m sleds can take a column.
        let candidate = entry
            .sandbox
            .iter()
            .copied()
            .filter(|e| state.extent_writable(*e))
            .find_map(|e| grant_of(&state, e).map(|g| (e, g)));
        let Some((extent, grant)) = candidate else {
            let k = state
                .volumes()
                .get(&partition.volume)
                .map_or(0, |v| u16::from(v.code.k));
            let min_columns = this.min_flush_columns.unwrap_or(k + 1);
            propose(
                &this.node,
                Command::RefillSandbox {
                    partition,
                    target: SANDBOX_TARGET,
                    min_columns: Some(min_columns),
                },
            )
            .await
            .map_err(ProposeError::into_peer)?;
            sync_local_state(&this.node).await?;
            continue;
        };
        match propose(
            &this.node,
            Command::OpenSandboxExtent {
                partition,
                extent,
                epoch,
            },
        )
        .await
        {
            Ok(_) => return Ok(grant),
            // Taken by an earlier attempt whose answer was lost: ours.
            Err(ProposeError::Refused(CommandError::NotInSandbox { .. })) => {
                sync_local_state(&this.node).await?;
            }
            Err(error) => return Err(error.into_peer()),
        }
    }
    Err(PeerError::Unreachable {
        peer: "local-control-plane".to_string(),
        reason: format!("no sandbox extent for {partition} after repeated refills"),
    })
}

async fn free_extent(
    this: &ExtentsInner,
    partition: PartitionId,
    epoch: u64,
    extent: u64,
) -> Result<(), PeerError> {
    sync_local_state(&this.node).await?;
    let state = this.node.local_state();
    let Some(grant) = grant_of(&state, ExtentId(extent)) else {
        // Already freed (an earlier attempt's answer was lost).
        return Ok(());
    };
    for (_, (sled, column)) in grant.present() {
        let request = SledRequest::FreeColumn {
            column: *column,
            partition,
            epoch,
        };
        match this.sleds.call(sled, request).await? {
            SledResponse::Freed => {}
            // Freed by an earlier attempt.
            SledResponse::Error(SledError::BadColumnState { .. }) => {}
            other => {
                return Err(PeerError::Refused {
                    peer: sled.clone(),
                    reason: format!("FreeColumn {column:?}: {other:?}"),
                })
            }
        }
    }
    match propose(
        &this.node,
        Command::FreeExtent {
            extent: ExtentId(extent),
            partition,
            epoch,
        },
    )
    .await
    {
        Ok(_) | Err(ProposeError::Refused(CommandError::UnknownExtent { .. })) => Ok(()),
        Err(error) => Err(error.into_peer()),
    }
}

/// Commits a no-op command (`RefillSandbox` to 0 extents: it only
/// validates that `partition` exists) and then syncs the local state.
///
/// Why not only [`sync_local_state`]: a leader that restarts with its
/// committed vote keeps its term without a new blank entry, and its
/// persisted commit index may lag its durable log (it is saved without an
/// fsync), so right after a full restart its "linearizable" read index can
/// miss committed commands. A write in the current term commits every
/// entry before it; applying it moves the read index past them.
pub async fn write_barrier(node: &LcpNode, partition: PartitionId) -> Result<(), PeerError> {
    propose(
        node,
        Command::RefillSandbox {
            partition,
            target: 0,
            min_columns: None,
        },
    )
    .await
    .map_err(ProposeError::into_peer)?;
    sync_local_state(node).await
}

/// Extents `partition` owns outside its sandbox, linearizably (see
/// [`write_barrier`]).
pub async fn owned_extents(
    node: &LcpNode,
    partition: PartitionId,
) -> Result<Vec<ExtentGrant>, PeerError> {
    write_barrier(node, partition).await?;
    let state = node.local_state();
    let Some(entry) = state.partition(partition) else {
        return Ok(Vec::new());
    };
    let mut grants = Vec::new();
    for (extent_id, extent) in state.extents() {
        if extent.owner != partition || entry.sandbox.contains(extent_id) {
            continue;
        }
        let grant = grant_of(&state, *extent_id).ok_or_else(|| PeerError::Refused {
            peer: "local-control-plane".to_string(),
            reason: format!("extent {extent_id} has no columns or an unknown sled"),
        })?;
        grants.push(grant);
    }
    Ok(grants)
}

impl ExtentSource for LcpExtents {
    fn next_extent(
        &self,
        partition: PartitionId,
        epoch: u64,
    ) -> BoxFuture<'static, Result<ExtentGrant, PeerError>> {
        let this = self.clone_handle();
        Box::pin(async move { next_extent(&this, partition, epoch).await })
    }

    fn free_extent(
        &self,
        partition: PartitionId,
        epoch: u64,
        extent: u64,
    ) -> BoxFuture<'static, Result<(), PeerError>> {
        let this = self.clone_handle();
        Box::pin(async move { free_extent(&this, partition, epoch, extent).await })
    }

    fn owned_extents(
        &self,
        partition: PartitionId,
    ) -> BoxFuture<'static, Result<Vec<ExtentGrant>, PeerError>> {
        let node = self.inner.node.clone();
        Box::pin(async move { owned_extents(&node, partition).await })
    }
}

#[cfg(test)]
mod tests {
    use proto::link::PathId;

    use super::*;

    #[test]
    fn link_errors_map_to_retryable_or_final_peer_errors() {
        let unreachable = peer_error(
            "sled-1",
            LinkError::Unreachable {
                peer: "sled-1".into(),
                errors: vec![(PathId::A, "refused".into())],
            },
        );
        assert!(matches!(unreachable, PeerError::Unreachable { ref peer, .. } if peer == "sled-1"));
        let uncertain = peer_error(
            "hn-2",
            LinkError::Uncertain {
                peer: "hn-2".into(),
                path: PathId::B,
                reason: "reset".into(),
            },
        );
        assert!(matches!(uncertain, PeerError::Timeout { .. }));
        assert!(matches!(
            peer_error("hn-2", LinkError::Closed),
            PeerError::Unreachable { .. }
        ));
        assert!(matches!(
            peer_error(
                "hn-2",
                LinkError::Protocol {
                    peer: "hn-2".into(),
                    reason: "bad".into()
                }
            ),
            PeerError::Refused { .. }
        ));
        let refused = ProposeError::Refused(CommandError::NoSpace {
            needed: 6,
            available: 0,
        });
        assert!(matches!(refused.into_peer(), PeerError::Unreachable { .. }));
    }
}
