//! [`LcpNode`]: one head node's member of the unit's Raft group, and the
//! entry point for every local-control-plane message it receives.
//!
//! # Bootstrap with no manual step
//!
//! The rack file is the single source of membership. Raft ids are the
//! 1-based positions of the `[[head_node]]` entries; the first 3 head nodes
//! (5 when the rack has at least 5) are **voters**, the rest learners.
//!
//! ```text
//! start ─▶ open store (log, vote, state machine) ─▶ Raft::new
//!   voter and never initialised? ─▶ in the background: once a majority of
//!                                    the voters answers probes, the FIRST
//!                                    voter (lowest Raft id) calls
//!                                    initialize(voters) and campaigns; the
//!                                    others only vote (they learn the
//!                                    membership from its log). Voter of
//!                                    rank r initialises itself only if
//!                                    every earlier voter has been silent
//!                                    for r × BOOTSTRAP_FALLBACK (the first
//!                                    voter is missing). Same voter set everywhere, so
//!                                    a late second initialise is harmless.
//!                                    One campaign at term 1, started when
//!                                    it can win: a fresh unit serves at
//!                                    term 1, not after an election per
//!                                    timeout while its peers were starting.
//! leader duties (while this node leads, restarted on every new term):
//!   1. add_learner for rack head nodes missing from the membership
//!   2. register the rack inventory (head nodes, sleds, devices, domains,
//!      free columns) through Raft, skipping what the state already holds
//!   3. run the failure detector (crate::detector) and, next to it, the
//!      failover controller (crate::failover): promote / re-mirror the
//!      partitions of head nodes the detector recorded Down, and the
//!      repair controller (crate::repair): replacement columns for Failed
//!      and Draining sleds, rebuilt by the partitions' primaries, and the
//!      deleter (crate::deleter): frees deleted volumes' extents
//! every voter, leader or not (restarted never):
//!   quick election (crate::quick_election): when the leader's process is
//!   gone (both networks refuse), campaign as soon as the other voters'
//!   openraft leases on it end, not after the election timer
//! ```
//!
//! A restarted member finds its vote and log on disk and simply rejoins;
//! a member whose disk was wiped comes back as an empty voter and is caught
//! up by the leader (log or snapshot). No step needs an operator.
//!
//! # Requests
//!
//! [`LcpNode::handle`] takes a proto request: Raft RPCs go to openraft;
//! client requests ([`LcpRequest`]) are served as follows.
//!
//! * **Commands** are proposed with `client_write` on the leader. A
//!   follower forwards the request to the leader **once** (one hop, marked
//!   [`LcpRequest::Forwarded`] so it is never forwarded again) and relays
//!   the answer; if the leader is unknown or unreachable before the request
//!   was sent, it answers [`LcpResponse::NotLeader`] and the client retries.
//! * **Partition map and unit status are linearizable**: the leader calls
//!   `ensure_linearizable` (a heartbeat round confirms it still leads, then
//!   it waits until its state machine has applied the read index) and reads
//!   its local state; a follower forwards the read to the leader. A client
//!   that reads from any member therefore sees every committed command.
//! * **RaftStatus** is this node's local view (not linearizable) — what an
//!   operator wants when asking one node how it sees the group.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hardware::rack::Rack;
use openraft::error::{ClientWriteError as OpenraftClientWriteError, InitializeError as OiError};
use openraft::{ServerState, SnapshotPolicy};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use proto::lcp::RaftRpcKind;
use proto::link::{LinkConfig, LinkError, LinkMetrics, PeerLink};
use proto::sled::{DeviceState, SledRequest, SledResponse};
use proto::Message;
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::client::{
    decode_response, request_message, response_message, LcpError, LcpRequest, LcpResponse,
    MemberStatus, RaftStatus,
};
use crate::command::{Command, DeviceSpec, Outcome};
use crate::deleter::DeleterMetrics;
use crate::detector::{Detector, DetectorConfig, DetectorMetrics};
use crate::error::CommandError;
use crate::failover::{FailoverConfig, FailoverController, FailoverMetrics};
use crate::network::{encode_raft_reply, lock, PeerLinks, RaftNetworkFactoryImpl, RaftReply};
use crate::proposals::{ProposalMetrics, Proposals};
use crate::quick_election::{both_refused_since, QuickElection, QuickElectionConfig, RaftView};
use crate::raft::{
    AppendEntriesRequest, HeadNodeInfo, InstallSnapshotRequest, Raft, RaftMetrics, RaftNodeId,
    SharedState, VoteRequest,
};
use crate::repair::{RepairConfig, RepairController, RepairMetrics};
use crate::state::{NodeId, SledId, UnitState};

/// Voters when the rack has at least this many head nodes.
pub const LARGE_VOTER_COUNT: usize = 5;
/// Voters otherwise (or all head nodes if fewer).
pub const SMALL_VOTER_COUNT: usize = 3;

/// Default Raft heartbeat interval.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 100;
/// Default election timeout range. Short, because a dead leader stops
/// every lease renewal and failover until a new one is elected, yet wide
/// enough that losing network A never costs an election: the Raft links
/// probe every 50 ms and mark a path Down after two failed probes of
/// `election_timeout_min / 6` (~60 ms) each, so heartbeats move to network
/// B within ~200 ms. (Most multi-process tests run with 1.5–3 s: they share
/// two cores with debug builds.)
///
/// openraft 0.9 makes a follower refuse votes for `election_timeout_max`
/// after its leader's last heartbeat and campaign on its own only after
/// `election_timeout_max` + its drawn timeout, so: a dead leader (refused
/// connections) is replaced ~`election_timeout_max` after its death by the
/// quick election (crate::quick_election), a silent or stalled one after
/// 0.77–0.84 s of silence. History (bench/failover.sh, leader kill -9,
/// client pause p99): 1000 → 600 with the quick election (~1.2 s), 600 →
/// 420 (0.95 s, under the 1 s goal; fourth session).
pub const DEFAULT_ELECTION_TIMEOUT_MIN_MS: u64 = 350;
pub const DEFAULT_ELECTION_TIMEOUT_MAX_MS: u64 = 420;
/// Default time both paths must be *silent* before a node is declared
/// Down. With the link prober's 50 ms probes and 2 failures before a path
/// is Down, a silent node is recorded after ~1.6 s; a loaded 2-core box
/// stalls a healthy process for well under that, and a false Down only
/// costs a failover (the lease keeps it safe), never data.
pub const DEFAULT_NODE_DOWN_AFTER_MS: u64 = 1500;
/// Default time both paths must *refuse* connections before a node is
/// declared Down: its host answers but nothing listens, so the process is
/// gone (a stall never refuses). Short, so a `kill -9` or crash is
/// recorded in ~0.35 s; long enough to ride out a listener being re-bound.
pub const DEFAULT_NODE_REFUSED_DOWN_AFTER_MS: u64 = 300;
/// How often the leader's detector compares probes with the state.
const DETECTOR_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How often a voter checks whether its leader's process is gone
/// (crate::quick_election): a few reads of in-memory state.
const QUICK_ELECTION_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A voter other than the first initialises the group itself only once every
/// voter ranked before it has been silent this long (times its rank): the
/// first voter is missing at the unit's first start.
/// Long: a first voter that is merely slow to start (its listeners bind
/// after its write log is created) must not be raced by the second, whose
/// own campaign would split the vote.
const BOOTSTRAP_FALLBACK: Duration = Duration::from_secs(10);
/// How often an uninitialised voter looks at its links before bootstrap.
const BOOTSTRAP_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Largest snapshot chunk sent in one RPC (JSON-encoded, so it grows).
const SNAPSHOT_CHUNK_BYTES: u64 = 256 << 10;

/// Configuration of one member.
#[derive(Debug, Clone)]
pub struct LcpConfig {
    /// The unit (validated structurally).
    pub rack: Rack,
    /// Which `[[head_node]]` this process is.
    pub node_id: String,
    /// Where the Raft log, vote and state machine live.
    pub data_dir: PathBuf,
    pub heartbeat_interval: Duration,
    pub election_timeout_min: Duration,
    pub election_timeout_max: Duration,
    /// Both paths down this long ⇒ the node or sled is declared Down.
    pub node_down_after: Duration,
    /// Both paths refusing connections this long ⇒ Down.
    pub node_refused_down_after: Duration,
    /// A voter whose leader refuses connections on both networks starts an
    /// election as soon as it can win (crate::quick_election) instead of
    /// waiting for openraft's election timer.
    pub quick_election: bool,
    /// The leader's failover controller (lease margin, rate limits).
    pub failover: FailoverConfig,
    /// The leader's column repair controller (concurrency, bandwidth).
    pub repair: RepairConfig,
    /// The member's unit credential for every connection it makes (Raft,
    /// forwarding, probes of sleds: `proto::auth`). `None` only where the
    /// unit port is open (in-process tests).
    pub auth: Option<Arc<proto::auth::Credential>>,
}

impl LcpConfig {
    /// Config with the default timings.
    pub fn new(rack: Rack, node_id: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        LcpConfig {
            rack,
            node_id: node_id.into(),
            data_dir: data_dir.into(),
            heartbeat_interval: Duration::from_millis(DEFAULT_HEARTBEAT_INTERVAL_MS),
            election_timeout_min: Duration::from_millis(DEFAULT_ELECTION_TIMEOUT_MIN_MS),
            election_timeout_max: Duration::from_millis(DEFAULT_ELECTION_TIMEOUT_MAX_MS),
            node_down_after: Duration::from_millis(DEFAULT_NODE_DOWN_AFTER_MS),
            node_refused_down_after: Duration::from_millis(DEFAULT_NODE_REFUSED_DOWN_AFTER_MS),
            quick_election: true,
            failover: FailoverConfig::default(),
            repair: RepairConfig::default(),
            auth: None,
        }
    }
}

/// Why a member could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("head node {node_id:?} is not in the rack file")]
    UnknownNode { node_id: String },
    #[error("raft timings: {reason}")]
    BadTimings { reason: String },
    #[error("cannot create {}: {source}", path.display())]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("raft storage in {}: {reason}", path.display())]
    Storage { path: PathBuf, reason: String },
    #[error("raft: {reason}")]
    Raft { reason: String },
}

/// Raft ids and infos of the rack's head nodes, and which are voters.
pub fn rack_membership(rack: &Rack) -> (BTreeMap<RaftNodeId, HeadNodeInfo>, BTreeSet<RaftNodeId>) {
    let nodes: BTreeMap<RaftNodeId, HeadNodeInfo> = rack
        .head_node
        .iter()
        .zip(1u64..)
        .map(|(h, id)| {
            (
                id,
                HeadNodeInfo {
                    id: h.id.clone(),
                    address_a: h.address_a,
                    address_b: h.address_b,
                    admin: h.admin,
                },
            )
        })
        .collect();
    let voter_count = if nodes.len() >= LARGE_VOTER_COUNT {
        LARGE_VOTER_COUNT
    } else {
        SMALL_VOTER_COUNT.min(nodes.len())
    };
    let voters = nodes.keys().copied().take(voter_count).collect();
    (nodes, voters)
}

/// The commands that register what the rack describes and `state` lacks.
pub fn inventory_commands(rack: &Rack, state: &UnitState) -> Vec<Command> {
    let mut commands = Vec::new();
    for h in &rack.head_node {
        if !state.nodes().contains_key(&NodeId::new(h.id.clone())) {
            commands.push(Command::RegisterHeadNode {
                node: NodeId::new(h.id.clone()),
                address_a: h.address_a.to_string(),
                address_b: h.address_b.to_string(),
            });
        }
    }
    let column_size = rack.unit.column_size_bytes;
    for s in &rack.sled {
        let id = SledId::new(s.id.clone());
        if state.sleds().contains_key(&id) {
            continue;
        }
        let first = s.device.first();
        let fault_domain = first
            .and_then(|d| d.fault_domain.clone())
            .unwrap_or_else(|| s.id.clone());
        let power_domain = first
            .and_then(|d| d.power_domain.clone())
            .unwrap_or_else(|| "default".to_string());
        let devices: Vec<DeviceSpec> = s
            .device
            .iter()
            .zip(0u16..)
            .map(|(d, device)| DeviceSpec {
                device,
                size_bytes: d.size_bytes,
            })
            .collect();
        commands.push(Command::RegisterSled {
            sled: id.clone(),
            address_a: s.address_a.to_string(),
            address_b: s.address_b.to_string(),
            fault_domain,
            power_domain,
            column_size_bytes: column_size,
            devices: devices.clone(),
        });
        // Columns come from the sled controller itself (see
        // `register_sled_columns`): only the sled knows its layout.
    }
    commands
}

/// Raft gauges on `/metrics`.
#[derive(Debug, Clone, Default)]
struct RaftGauges {
    is_leader: Gauge,
    term: Gauge,
    last_log_index: Gauge,
    last_applied: Gauge,
    members: Gauge,
    quick_elections: Counter,
}

impl RaftGauges {
    fn register(registry: &mut Registry) -> RaftGauges {
        let gauges = RaftGauges::default();
        registry.register(
            "rackblock_lcp_is_leader",
            "1 if this head node leads the unit's Raft group",
            gauges.is_leader.clone(),
        );
        registry.register(
            "rackblock_lcp_term",
            "Current Raft term",
            gauges.term.clone(),
        );
        registry.register(
            "rackblock_lcp_last_log_index",
            "Index of the last Raft log entry",
            gauges.last_log_index.clone(),
        );
        registry.register(
            "rackblock_lcp_last_applied",
            "Index of the last entry applied to the state machine",
            gauges.last_applied.clone(),
        );
        registry.register(
            "rackblock_lcp_members",
            "Voters and learners in the membership",
            gauges.members.clone(),
        );
        registry.register(
            "rackblock_lcp_quick_elections",
            "Elections this member started because its leader refused connections on both networks",
            gauges.quick_elections.clone(),
        );
        gauges
    }

    fn update(&self, m: &RaftMetrics) {
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.is_leader
            .set(i64::from(m.state == ServerState::Leader));
        self.term.set(as_i64(m.current_term));
        self.last_log_index
            .set(as_i64(m.last_log_index.unwrap_or(0)));
        self.last_applied
            .set(as_i64(m.last_applied.map(|l| l.index).unwrap_or(0)));
        let members = m.membership_config.membership().nodes().count();
        self.members.set(i64::try_from(members).unwrap_or(i64::MAX));
    }
}

struct Inner {
    raft: Raft,
    raft_id: RaftNodeId,
    name: String,
    rack: Rack,
    nodes: BTreeMap<RaftNodeId, HeadNodeInfo>,
    voters: BTreeSet<RaftNodeId>,
    state: SharedState,
    links: Arc<PeerLinks>,
    /// Links for forwarding client requests to the leader: the generous
    /// timeout of a client request, not the Raft links' short one.
    forward_links: Mutex<HashMap<RaftNodeId, Arc<PeerLink>>>,
    link_metrics: LinkMetrics,
    /// The credential of `forward_links`.
    auth: Option<Arc<proto::auth::Credential>>,
    detector_config: DetectorConfig,
    detector_metrics: DetectorMetrics,
    failover_config: FailoverConfig,
    failover_metrics: FailoverMetrics,
    repair_config: RepairConfig,
    repair_metrics: RepairMetrics,
    deleter_metrics: DeleterMetrics,
    snapshotter_metrics: crate::snapshotter::SnapshotterMetrics,
    /// The leader whose AppendEntries this member processed last, and when
    /// (crate::quick_election anchors on it).
    last_heard: Mutex<Option<(RaftNodeId, std::time::Instant)>>,
    /// Every command this member proposes (crate::proposals: batched).
    proposals: Proposals,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LcpNode")
            .field("raft_id", &self.raft_id)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A running member. Cheap to clone.
#[derive(Debug, Clone)]
pub struct LcpNode {
    inner: Arc<Inner>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl LcpNode {
    /// Open the store, start Raft, bootstrap if needed, start the leader
    /// duties (see module docs). Registers its metrics in `registry`.
    pub async fn start(config: LcpConfig, registry: &mut Registry) -> Result<LcpNode, StartError> {
        let (nodes, voters) = rack_membership(&config.rack);
        let raft_id = nodes
            .iter()
            .find(|(_, info)| info.id == config.node_id)
            .map(|(id, _)| *id)
            .ok_or_else(|| StartError::UnknownNode {
                node_id: config.node_id.clone(),
            })?;
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let raft_config = openraft::Config {
            cluster_name: config.rack.unit.name.clone(),
            heartbeat_interval: ms(config.heartbeat_interval),
            election_timeout_min: ms(config.election_timeout_min),
            election_timeout_max: ms(config.election_timeout_max),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(2000),
            snapshot_max_chunk_size: SNAPSHOT_CHUNK_BYTES,
            max_in_snapshot_log_to_keep: 500,
            ..openraft::Config::default()
        }
        .validate()
        .map_err(|e| StartError::BadTimings {
            reason: e.to_string(),
        })?;

        std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let (log_store, state_machine) =
            crate::raft::RaftStore::open(&config.data_dir).map_err(|e| StartError::Storage {
                path: config.data_dir.clone(),
                reason: e.to_string(),
            })?;
        let state = state_machine.shared();

        let link_metrics = LinkMetrics::new(registry);
        let links = Arc::new(PeerLinks::new(
            PeerLinks::raft_link_config(
                config.heartbeat_interval,
                config.election_timeout_min,
                config.auth.clone(),
            ),
            link_metrics.clone(),
        ));
        let network = RaftNetworkFactoryImpl::new(raft_id, links.clone());
        let raft = Raft::new(
            raft_id,
            Arc::new(raft_config),
            network,
            log_store,
            state_machine,
        )
        .await
        .map_err(|e| StartError::Raft {
            reason: e.to_string(),
        })?;

        let shutdown = CancellationToken::new();
        let (proposals, proposals_task) = Proposals::start(
            raft.clone(),
            ProposalMetrics::register(registry),
            shutdown.clone(),
        );
        let gauges = RaftGauges::register(registry);
        let detector_metrics = DetectorMetrics::register(registry);
        let failover_metrics = FailoverMetrics::register(registry);
        let repair_metrics = RepairMetrics::register(registry);
        let deleter_metrics = DeleterMetrics::register(registry);
        let snapshotter_metrics = crate::snapshotter::SnapshotterMetrics::register(registry);
        let inner = Arc::new(Inner {
            raft,
            raft_id,
            name: config.node_id.clone(),
            rack: config.rack.clone(),
            nodes,
            voters,
            state,
            links,
            forward_links: Mutex::new(HashMap::new()),
            link_metrics,
            auth: config.auth.clone(),
            detector_config: DetectorConfig {
                node_down_after: config.node_down_after,
                node_refused_down_after: config.node_refused_down_after,
                poll_interval: DETECTOR_POLL_INTERVAL,
            },
            detector_metrics,
            failover_config: config.failover.clone(),
            failover_metrics,
            repair_config: config.repair.clone(),
            repair_metrics,
            deleter_metrics,
            snapshotter_metrics,
            last_heard: Mutex::new(None),
            proposals,
            shutdown,
        });
        // Forwarding links exist from the start so that their probers know
        // which network works before a command needs them (a command sent
        // into a black hole cannot be resent, see `forward`).
        // The Raft links to every other member exist (and probe) from the
        // start too, leader or not: a node elected because the leader died
        // finds in them how long the old leader has been silent.
        for (id, info) in &inner.nodes {
            if *id != raft_id {
                forward_link(&inner, *id, info);
                inner.links.link(&info.id, info.address_a, info.address_b);
            }
        }
        let node = LcpNode {
            inner,
            tasks: Arc::new(Mutex::new(vec![proposals_task])),
        };
        if node.inner.voters.contains(&raft_id) && !node.initialized().await? {
            let bootstrap = tokio::spawn(bootstrap(node.inner.clone()));
            lock(&node.tasks).push(bootstrap);
        }
        if config.quick_election {
            let quick_election = QuickElection::new(QuickElectionConfig::for_raft(
                config.heartbeat_interval,
                config.election_timeout_max,
            ));
            let quick_election_task = tokio::spawn(quick_election_loop(
                node.inner.clone(),
                quick_election,
                gauges.quick_elections.clone(),
            ));
            lock(&node.tasks).push(quick_election_task);
        }
        let metrics_task = tokio::spawn(metrics_loop(node.inner.clone(), gauges));
        let duties_task = tokio::spawn(leader_duties(node.inner.clone()));
        lock(&node.tasks).extend([metrics_task, duties_task]);
        info!(
            node = %node.inner.name,
            raft_id,
            voter = node.inner.voters.contains(&raft_id),
            "local control plane member started"
        );
        Ok(node)
    }

    async fn initialized(&self) -> Result<bool, StartError> {
        self.inner
            .raft
            .is_initialized()
            .await
            .map_err(|e| StartError::Raft {
                reason: e.to_string(),
            })
    }

    /// This node's Raft id.
    pub fn raft_id(&self) -> RaftNodeId {
        self.inner.raft_id
    }

    /// The openraft handle (metrics, tests).
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// A copy of the local (possibly stale) state machine.
    pub fn local_state(&self) -> UnitState {
        self.inner.state.read().unit.clone()
    }

    /// `f` of the local (possibly stale) state machine, under its read lock
    /// (no copy; `f` must be short: it holds off applying entries).
    pub fn with_state<R>(&self, f: impl FnOnce(&UnitState) -> R) -> R {
        f(&self.inner.state.read().unit)
    }

    /// Checks a host request's attachment credential against the applied
    /// state (no copy of it: one read lock, two map lookups, one SHA-256
    /// block). On success, the volume's size in bytes.
    pub fn host_access(
        &self,
        volume: crate::state::VolumeId,
        credential: &proto::volume::AttachmentCredential,
        now_ms: u64,
    ) -> Result<u64, crate::state::AccessRefusal> {
        self.inner
            .state
            .read()
            .unit
            .host_access(volume, credential, now_ms)
    }

    /// The volume's size, the token digest of `attachment` and its expiry
    /// in the applied state (one read lock, two map lookups).
    pub fn attachment_digest(
        &self,
        volume: crate::state::VolumeId,
        attachment: crate::state::AttachmentId,
    ) -> Result<(u64, crate::state::TokenDigest, Option<u64>), crate::state::AccessRefusal> {
        self.inner
            .state
            .read()
            .unit
            .attachment_digest(volume, attachment)
    }

    /// The TTL and expiry of an expiring attachment in the applied state.
    pub fn attachment_expiry(
        &self,
        volume: crate::state::VolumeId,
        attachment: crate::state::AttachmentId,
    ) -> Option<(u64, u64)> {
        self.inner
            .state
            .read()
            .unit
            .attachment_expiry(volume, attachment)
    }

    /// Whether this node knows a leader (its own or another).
    pub fn leader_known(&self) -> bool {
        self.inner.raft.metrics().borrow().current_leader.is_some()
    }

    /// This node's view of Raft.
    pub fn raft_status(&self) -> RaftStatus {
        raft_status(&self.inner)
    }

    /// Answer one proto request (Raft RPC or client request).
    pub async fn handle(&self, request: Message) -> Message {
        match request {
            Message::Raft { rpc, payload } => handle_raft(&self.inner, rpc, payload).await,
            Message::Lcp { payload, .. } => {
                let response = match serde_json::from_slice::<LcpRequest>(&payload) {
                    Ok(request) => self.serve(request).await,
                    Err(e) => LcpResponse::Error(LcpError::BadRequest {
                        reason: format!("undecodable request: {e}"),
                    }),
                };
                response_message(&response)
            }
            other => response_message(&LcpResponse::Error(LcpError::BadRequest {
                reason: format!("kind {:#06x} is not for the control plane", other.kind()),
            })),
        }
    }

    /// Serve a client request (see the module docs).
    pub async fn serve(&self, request: LcpRequest) -> LcpResponse {
        let inner = &self.inner;
        let (request, forwarded) = match request {
            LcpRequest::Forwarded(inner_request) => (*inner_request, true),
            other => (other, false),
        };
        match request {
            LcpRequest::RaftStatus => LcpResponse::RaftStatus(raft_status(inner)),
            LcpRequest::Forwarded(_) => LcpResponse::Error(LcpError::BadRequest {
                reason: "nested forward".into(),
            }),
            LcpRequest::Command(command) => match inner
                .proposals
                .propose(command.clone())
                .await
                .map_err(|e| *e)
            {
                Ok(applied) => LcpResponse::Applied(applied),
                Err(openraft::error::RaftError::APIError(
                    OpenraftClientWriteError::ForwardToLeader(to),
                )) => {
                    self.forward(LcpRequest::Command(command), to.leader_id, forwarded)
                        .await
                }
                Err(e) => LcpResponse::Error(LcpError::Raft {
                    reason: e.to_string(),
                }),
            },
            read @ (LcpRequest::PartitionMap { .. }
            | LcpRequest::Reservations { .. }
            | LcpRequest::UnitStatus) => match inner.raft.ensure_linearizable().await {
                Ok(_) => read_local(inner, &read),
                Err(openraft::error::RaftError::APIError(
                    openraft::error::CheckIsLeaderError::ForwardToLeader(to),
                )) => self.forward(read, to.leader_id, forwarded).await,
                Err(e) => LcpResponse::Error(LcpError::Raft {
                    reason: e.to_string(),
                }),
            },
        }
    }

    async fn forward(
        &self,
        request: LcpRequest,
        leader: Option<RaftNodeId>,
        already_forwarded: bool,
    ) -> LcpResponse {
        let inner = &self.inner;
        let not_leader = || LcpResponse::NotLeader {
            leader,
            leader_name: leader.and_then(|l| inner.nodes.get(&l).map(|n| n.id.clone())),
        };
        let Some(leader_id) = leader.filter(|l| *l != inner.raft_id) else {
            return not_leader();
        };
        if already_forwarded {
            return not_leader();
        }
        let Some(info) = inner.nodes.get(&leader_id).cloned() else {
            return not_leader();
        };
        let link = forward_link(inner, leader_id, &info);
        let idempotent = request.is_idempotent();
        let message = match request_message(&LcpRequest::Forwarded(Box::new(request))) {
            Ok(message) => message,
            Err(e) => {
                return LcpResponse::Error(LcpError::BadRequest {
                    reason: e.to_string(),
                })
            }
        };
        match link.call(message, idempotent).await {
            Ok(reply) => match decode_response(reply) {
                Ok(response) => response,
                Err(e) => LcpResponse::Error(LcpError::Forward {
                    reason: e.to_string(),
                }),
            },
            Err(LinkError::Uncertain { reason, .. }) => LcpResponse::Error(LcpError::Uncertain {
                reason: format!("forwarded to {}: {reason}", info.id),
            }),
            Err(e) => {
                debug!(leader = %info.id, error = %e, "cannot forward to the leader");
                not_leader()
            }
        }
    }

    /// Resolves with the error if this member's Raft core stops on a fatal
    /// error (storage failure, or openraft 0.9.25's replication-channel race
    /// found by the simulation test: a leader whose snapshot stream exited
    /// on a higher vote quits with `Fatal::StorageError`). A stopped core
    /// answers no Raft traffic, so the process must restart from its data
    /// directory: the head-node daemon exits non-zero and its supervisor
    /// (systemd, `rackblock up`) starts it again. Never resolves while the
    /// core runs; resolves with `None` on a clean shutdown.
    pub async fn fatal(&self) -> Option<String> {
        let mut rx = self.inner.raft.metrics();
        loop {
            if let Err(error) = &rx.borrow_and_update().running_state {
                return (!self.inner.shutdown.is_cancelled()).then(|| error.to_string());
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return None },
                () = self.inner.shutdown.cancelled() => return None,
            }
        }
    }

    /// Stop Raft and every task of this member.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        let tasks: Vec<_> = lock(&self.tasks).drain(..).collect();
        for task in tasks {
            task.abort();
        }
        if let Err(e) = self.inner.raft.shutdown().await {
            warn!(error = %e, "raft shutdown");
        }
        self.inner.links.close_all();
        for (_, link) in lock(&self.inner.forward_links).drain() {
            link.close();
        }
    }
}

fn forward_link(inner: &Inner, id: RaftNodeId, info: &HeadNodeInfo) -> Arc<PeerLink> {
    lock(&inner.forward_links)
        .entry(id)
        .or_insert_with(|| {
            PeerLink::new(
                format!("{}-forward", info.id),
                info.address_a,
                info.address_b,
                LinkConfig {
                    connect_timeout: Duration::from_millis(500),
                    probe_interval: Duration::from_millis(250),
                    probe_timeout: Duration::from_millis(500),
                    auth: inner.auth.clone(),
                    ..LinkConfig::default()
                },
                inner.link_metrics.clone(),
            )
        })
        .clone()
}

fn read_local(inner: &Inner, request: &LcpRequest) -> LcpResponse {
    if let LcpRequest::Reservations { volume } = request {
        // Read often (every attach agent keeps its copy fresh): no clone
        // of the whole state.
        return match inner.state.read().unit.reservations(*volume) {
            Ok(record) => LcpResponse::Reservations(record),
            Err(
                CommandError::UnknownVolume { volume } | CommandError::VolumeDeleting { volume },
            ) => LcpResponse::Error(LcpError::UnknownVolume { volume }),
            Err(e) => LcpResponse::Error(LcpError::BadRequest {
                reason: e.to_string(),
            }),
        };
    }
    let state = inner.state.read().unit.clone();
    match request {
        LcpRequest::PartitionMap { volume } => match state.partition_map(*volume) {
            Ok(map) => LcpResponse::PartitionMap(map),
            Err(
                CommandError::UnknownVolume { volume } | CommandError::VolumeDeleting { volume },
            ) => LcpResponse::Error(LcpError::UnknownVolume { volume }),
            Err(e) => LcpResponse::Error(LcpError::BadRequest {
                reason: e.to_string(),
            }),
        },
        _ => LcpResponse::UnitStatus {
            raft: raft_status(inner),
            unit: state.unit_status(),
        },
    }
}

fn raft_status(inner: &Inner) -> RaftStatus {
    let m = inner.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let voters: BTreeSet<RaftNodeId> = membership.voter_ids().collect();
    let members = membership
        .nodes()
        .map(|(id, info)| MemberStatus {
            raft_id: *id,
            id: info.id.clone(),
            address_a: info.address_a.to_string(),
            address_b: info.address_b.to_string(),
            admin: info.admin.to_string(),
            voter: voters.contains(id),
        })
        .collect::<Vec<_>>();
    let learners = members
        .iter()
        .filter(|m| !m.voter)
        .map(|m| m.raft_id)
        .collect();
    RaftStatus {
        this_node: inner.raft_id,
        this_node_name: inner.name.clone(),
        leader: m.current_leader,
        leader_name: m
            .current_leader
            .and_then(|l| inner.nodes.get(&l).map(|n| n.id.clone())),
        term: m.current_term,
        state: format!("{:?}", m.state),
        last_log_index: m.last_log_index,
        last_applied: m.last_applied.map(|l| l.index),
        members,
        voters: voters.into_iter().collect(),
        learners,
    }
}

async fn handle_raft(inner: &Inner, rpc: RaftRpcKind, payload: Bytes) -> Message {
    fn refused(reason: String) -> Message {
        encode_raft_reply(&RaftReply::<()>::Refused(reason))
    }
    fn reply<T: Serialize>(value: T) -> Message {
        encode_raft_reply(&RaftReply::Handled(value))
    }
    match rpc {
        RaftRpcKind::AppendEntries => {
            match serde_json::from_slice::<AppendEntriesRequest>(&payload) {
                Ok(request) => {
                    let leader = request.vote.leader_id().voted_for();
                    let result = inner.raft.append_entries(request).await;
                    // Any answer but HigherVote means the leader's vote was
                    // accepted, which restarts openraft's vote-refusal window.
                    let accepted = result.as_ref().is_ok_and(|r| {
                        !matches!(r, openraft::raft::AppendEntriesResponse::HigherVote(_))
                    });
                    if let (true, Some(leader)) = (accepted, leader) {
                        *lock(&inner.last_heard) = Some((leader, std::time::Instant::now()));
                    }
                    reply(result)
                }
                Err(e) => refused(format!("undecodable append_entries: {e}")),
            }
        }
        RaftRpcKind::Vote => match serde_json::from_slice::<VoteRequest>(&payload) {
            Ok(request) => reply(inner.raft.vote(request).await),
            Err(e) => refused(format!("undecodable vote: {e}")),
        },
        RaftRpcKind::InstallSnapshot => {
            match serde_json::from_slice::<InstallSnapshotRequest>(&payload) {
                Ok(request) => reply(inner.raft.install_snapshot(request).await),
                Err(e) => refused(format!("undecodable install_snapshot: {e}")),
            }
        }
    }
}

async fn metrics_loop(inner: Arc<Inner>, gauges: RaftGauges) {
    let mut rx = inner.raft.metrics();
    loop {
        gauges.update(&rx.borrow_and_update().clone());
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            () = inner.shutdown.cancelled() => return,
        }
    }
}

/// Runs while the process lives: starts an election at once when the
/// leader's process is gone (see crate::quick_election).
/// First start of a voter (see the module docs): the first voter
/// initialises the group once a majority of voters answers; another voter
/// only if the first one has not done it `rank × BOOTSTRAP_FALLBACK` later.
async fn bootstrap(inner: Arc<Inner>) {
    let rank = inner
        .voters
        .iter()
        .position(|id| *id == inner.raft_id)
        .unwrap_or(0);
    let quorum = inner.voters.len() / 2 + 1;
    let fallback = BOOTSTRAP_FALLBACK * rank as u32;
    // When a voter ranked before this one last answered (the start counts
    // as an answer: it may still be starting).
    let mut earlier_seen = tokio::time::Instant::now();
    loop {
        match inner.raft.is_initialized().await {
            Ok(true) => return,
            Ok(false) => {}
            Err(error) => {
                warn!(%error, "bootstrap: raft stopped");
                return;
            }
        }
        let answers = |id: &RaftNodeId| {
            inner.nodes.get(id).is_some_and(|info| {
                inner
                    .links
                    .link(&info.id, info.address_a, info.address_b)
                    .paths()
                    .iter()
                    .any(|p| p.state == proto::link::PathState::Up)
            })
        };
        let reachable = 1 + inner
            .voters
            .iter()
            .filter(|id| **id != inner.raft_id && answers(id))
            .count();
        if inner
            .voters
            .iter()
            .take_while(|id| **id != inner.raft_id)
            .any(answers)
        {
            earlier_seen = tokio::time::Instant::now();
        }
        // An earlier voter that answers initialises (or will): only when
        // every earlier one has been silent for `fallback` does this one.
        let my_turn = rank == 0 || earlier_seen.elapsed() >= fallback;
        if my_turn && reachable >= quorum {
            break;
        }
        tokio::time::sleep(BOOTSTRAP_POLL_INTERVAL).await;
    }
    let voters: BTreeMap<RaftNodeId, HeadNodeInfo> = inner
        .nodes
        .iter()
        .filter(|(id, _)| inner.voters.contains(id))
        .map(|(id, info)| (*id, info.clone()))
        .collect();
    match inner.raft.initialize(voters).await {
        Ok(()) => {
            info!(node = %inner.name, rank, "initialised the unit's raft group from the rack file");
        }
        Err(openraft::error::RaftError::APIError(OiError::NotAllowed(_))) => {}
        Err(error) => warn!(node = %inner.name, %error, "cannot initialise the raft group"),
    }
}

async fn quick_election_loop(inner: Arc<Inner>, mut policy: QuickElection, triggered: Counter) {
    let mut tick = tokio::time::interval(QUICK_ELECTION_POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let metrics = inner.raft.metrics();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = inner.shutdown.cancelled() => return,
        }
        let view = {
            let m = metrics.borrow();
            RaftView {
                this_node: inner.raft_id,
                leading: m.state == ServerState::Leader,
                voters: m.membership_config.membership().voter_ids().collect(),
                current_leader: m.current_leader,
                voted_for: m.vote.leader_id().voted_for(),
                last_heard: *lock(&inner.last_heard),
            }
        };
        let refused_since = |id: RaftNodeId| {
            let info = inner.nodes.get(&id)?;
            both_refused_since(&inner.links.get(&info.id)?.paths())
        };
        if !policy.step(&view, refused_since, std::time::Instant::now()) {
            continue;
        }
        info!(
            node = %inner.name,
            lost_leader = ?view.current_leader,
            "the raft leader refuses connections on both networks: starting an election"
        );
        triggered.inc();
        if let Err(error) = inner.raft.trigger().elect().await {
            // The core stopped (LcpNode::fatal reports it).
            warn!(%error, "cannot trigger an election");
            return;
        }
    }
}

/// Runs while the process lives: each time this node becomes leader (a new
/// term), adds learners, registers the inventory and runs the detector
/// until leadership is lost.
async fn leader_duties(inner: Arc<Inner>) {
    let mut rx = inner.raft.metrics();
    loop {
        let leading_term = {
            let m = rx.borrow_and_update();
            (m.state == ServerState::Leader).then_some(m.current_term)
        };
        if let Some(term) = leading_term {
            info!(node = %inner.name, term, "became leader of the unit's raft group");
            let lost = CancellationToken::new();
            let duty = tokio::spawn(lead(inner.clone(), lost.clone()));
            // Wait until we stop leading in this term.
            loop {
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { lost.cancel(); duty.abort(); return },
                    () = inner.shutdown.cancelled() => { lost.cancel(); duty.abort(); return },
                }
                let m = rx.borrow_and_update();
                if m.state != ServerState::Leader || m.current_term != term {
                    break;
                }
            }
            info!(node = %inner.name, term, "no longer leader");
            lost.cancel();
            duty.abort();
            continue;
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            () = inner.shutdown.cancelled() => return,
        }
    }
}

/// Registers the columns of every sled whose devices the unit state knows
/// no column of: asks the sled controller for its inventory (its layout
/// decides how many columns a device holds) and commits `AddFreeColumns` for
/// each healthy device. The local control plane is the unit's column
/// allocator from then on; a sled controller lets the first claim of a free
/// column allocate it.
async fn register_sled_columns(inner: Arc<Inner>, lost: CancellationToken) {
    let mut pending: Vec<_> = inner.rack.sled.iter().map(|s| s.id.clone()).collect();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for sled_id in pending {
            match register_one_sled(&inner, &sled_id).await {
                Ok(()) => {}
                Err(reason) => {
                    debug!(sled = %sled_id, %reason, "sled columns not registered yet");
                    still.push(sled_id);
                }
            }
        }
        pending = still;
        if pending.is_empty() {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = lost.cancelled() => return,
        }
    }
    info!(node = %inner.name, "sled columns registered");
}

async fn register_one_sled(inner: &Inner, sled_id: &str) -> Result<(), String> {
    let id = SledId::new(sled_id.to_string());
    let known = {
        let state = inner.state.read();
        let Some(sled) = state.unit.sleds().get(&id) else {
            return Err("sled not registered".into());
        };
        sled.devices
            .values()
            .any(|d| !d.free_columns.is_empty() || !d.used_columns.is_empty())
    };
    if known {
        return Ok(());
    }
    let spec = inner
        .rack
        .sled(sled_id)
        .ok_or_else(|| "sled not in the rack file".to_string())?;
    let link = inner.links.link(sled_id, spec.address_a, spec.address_b);
    let inventory = match link.call(Message::Sled(SledRequest::Inventory), true).await {
        Ok(Message::SledReply(SledResponse::Inventory(inventory))) => inventory,
        Ok(other) => return Err(format!("unexpected inventory reply {other:?}")),
        Err(error) => return Err(error.to_string()),
    };
    for device in inventory.devices {
        if device.state != DeviceState::Healthy || device.column_count == 0 {
            continue;
        }
        let command = Command::AddFreeColumns {
            sled: id.clone(),
            device: device.device,
            columns: (0..device.column_count).collect(),
        };
        match inner.proposals.propose(command).await {
            Ok(applied) => match applied {
                Ok(_) | Err(CommandError::AlreadyExists { .. }) => {}
                Err(error) => {
                    warn!(sled = %sled_id, device = device.device, %error, "columns refused")
                }
            },
            Err(error) => return Err(error.to_string()),
        }
    }
    Ok(())
}

async fn lead(inner: Arc<Inner>, lost: CancellationToken) {
    // 1. Learners: rack head nodes beyond the voters.
    loop {
        let membership = inner
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .clone();
        let present: BTreeSet<RaftNodeId> = membership.nodes().map(|(id, _)| *id).collect();
        let missing: Vec<(RaftNodeId, HeadNodeInfo)> = inner
            .nodes
            .iter()
            .filter(|(id, _)| !present.contains(id))
            .map(|(id, info)| (*id, info.clone()))
            .collect();
        let mut failed = false;
        for (id, info) in missing {
            match inner.raft.add_learner(id, info.clone(), false).await {
                Ok(_) => info!(learner = %info.id, raft_id = id, "added learner"),
                Err(e) => {
                    warn!(learner = %info.id, error = %e, "cannot add learner; retrying");
                    failed = true;
                }
            }
        }
        if !failed {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = lost.cancelled() => return,
        }
    }
    // 2. Inventory from the rack file.
    loop {
        let commands = inventory_commands(&inner.rack, &inner.state.read().unit.clone());
        let mut failed = false;
        for command in commands {
            match inner.proposals.propose(command).await {
                Ok(applied) => match applied {
                    Ok(Outcome::Done) | Ok(_) => {}
                    Err(CommandError::AlreadyExists { .. }) => {}
                    Err(e) => warn!(error = %e, "inventory command refused"),
                },
                Err(e) => {
                    warn!(error = %e, "cannot register inventory; retrying");
                    failed = true;
                    break;
                }
            }
        }
        if !failed {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = lost.cancelled() => return,
        }
    }
    info!(node = %inner.name, "rack inventory registered");
    // 2b. Columns of every sled, from the sled controllers themselves; a sled
    // that is down now is retried until it answers (or leadership is lost).
    tokio::spawn(register_sled_columns(inner.clone(), lost.clone()));
    // 3c. Column repair (crate::repair): replacement columns for Failed and
    // Draining sleds, rebuilt by the partitions' primaries.
    let repair = RepairController::new(inner.repair_config.clone(), inner.repair_metrics.clone());
    let scrub_inner = inner.clone();
    let free_inner = inner.clone();
    tokio::spawn(
        repair.run(
            state_reader(&inner.state),
            proposer(&inner.proposals),
            move |state| {
                let inner = scrub_inner.clone();
                async move { crate::repair::scrub_reports(&inner.links, &inner.rack, &state).await }
            },
            move |columns| {
                let inner = free_inner.clone();
                async move {
                    crate::repair::free_retired_columns(&inner.links, &inner.rack, columns).await
                }
            },
            lost.clone(),
        ),
    );
    // 3d. Deleted volumes: free their extents on the sleds, release them
    // to the free pool, purge the records (crate::deleter).
    tokio::spawn(crate::deleter::run(
        state_reader(&inner.state),
        proposer(&inner.proposals),
        inner.links.clone(),
        inner.rack.clone(),
        inner.failover_config.lease_margin,
        inner.deleter_metrics.clone(),
        lost.clone(),
    ));
    // 3e. Snapshots: cut, release, record; drop and purge the aborted and
    // deleted ones (crate::snapshotter), over the forwarding links (a
    // client request's timeout, not Raft's).
    let call_inner = inner.clone();
    let call: crate::snapshotter::CallHeadNode = Arc::new(move |node: String, message| {
        let inner = call_inner.clone();
        Box::pin(async move {
            let (id, info) = inner
                .nodes
                .iter()
                .find(|(_, info)| info.id == node)
                .ok_or_else(|| format!("head node {node} is not a member"))?;
            let link = forward_link(&inner, *id, info);
            link.call(message, false).await.map_err(|e| e.to_string())
        })
    });
    tokio::spawn(crate::snapshotter::run(
        state_reader(&inner.state),
        proposer(&inner.proposals),
        call,
        inner.snapshotter_metrics.clone(),
        lost.clone(),
    ));
    // 3b. Failover from the recorded health, next to the detector.
    let controller = FailoverController::new(
        inner.failover_config.clone(),
        inner.failover_metrics.clone(),
    );
    tokio::spawn(controller.run(
        state_reader(&inner.state),
        proposer(&inner.proposals),
        lost.clone(),
    ));
    // 3. Failure detection until leadership is lost.
    let detector = Detector::new(
        inner.name.clone(),
        inner.rack.clone(),
        inner.links.clone(),
        inner.detector_config.clone(),
        inner.detector_metrics.clone(),
    );
    detector
        .run(state_reader(&inner.state), proposer(&inner.proposals), lost)
        .await;
}

/// How the leader's controllers read the unit: the state machine's
/// current state.
fn state_reader(state: &SharedState) -> impl Fn() -> UnitState {
    let state = state.clone();
    move || state.read().unit.clone()
}

/// How the leader's controllers propose a command: through Raft; the state
/// machine's outcome, or why the command was not committed.
fn proposer(
    proposals: &Proposals,
) -> impl Fn(Command) -> futures::future::BoxFuture<'static, Result<Result<Outcome, CommandError>, String>>
{
    let proposals = proposals.clone();
    move |command| {
        let proposals = proposals.clone();
        Box::pin(async move { proposals.propose(command).await.map_err(|e| e.to_string()) })
    }
}
