//! The control-plane client API: what operators, the CLI and (later) the
//! zonal plane and head-node data path ask the local control plane.
//!
//! ```text
//! LcpClient ── Message::Lcp{ JSON LcpRequest } ──▶ any head node (A, else B)
//!    ▲                                              │ LcpNode::handle
//!    │          NotLeader{leader} ◀── not leader and cannot forward
//!    └───────── Applied / PartitionMap / UnitStatus ◀── leader (maybe one hop away)
//! ```
//!
//! * Requests and responses are serde JSON inside `Message::Lcp` /
//!   `Message::LcpReply`. Reads are sent idempotent (the link may resend
//!   them on the other network); commands are not, so a command whose
//!   outcome is unknown surfaces as an error instead of being applied twice.
//! * [`LcpClient`] knows every head node of the rack (both addresses). It
//!   starts with the last node that answered, follows `NotLeader` hints, and
//!   tries the other nodes when one is unreachable, for a bounded number of
//!   rounds.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hardware::rack::Rack;
use proto::link::{LinkConfig, LinkMetrics, PeerLink};
use proto::Message;
use serde::{Deserialize, Serialize};

use crate::command::{Command, Outcome};
use crate::error::CommandError;
use crate::network::lock;
use crate::state::{PartitionMap, PersistentReservations, UnitStatus, VolumeId};

/// A request to the local control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LcpRequest {
    /// Propose a command through Raft (forwarded to the leader).
    Command(Command),
    /// Linearizable read of a volume's partition map.
    PartitionMap { volume: VolumeId },
    /// Linearizable read of the unit state plus Raft facts.
    UnitStatus,
    /// Linearizable read of a volume's persistent reservation record.
    Reservations { volume: VolumeId },
    /// This node's view of Raft (local, not linearizable).
    RaftStatus,
    /// A request a follower relays to the leader (one hop: a forwarded
    /// request is never forwarded again). Not for clients.
    Forwarded(Box<LcpRequest>),
}

impl LcpRequest {
    /// Reads may be resent; commands may not.
    pub fn is_idempotent(&self) -> bool {
        match self {
            LcpRequest::Command(_) => false,
            LcpRequest::Forwarded(inner) => inner.is_idempotent(),
            _ => true,
        }
    }
}

/// One Raft member as a status reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Raft node id (1-based position in the rack file).
    pub raft_id: u64,
    /// Head node name.
    pub id: String,
    pub address_a: String,
    pub address_b: String,
    pub admin: String,
    pub voter: bool,
}

/// Raft as one node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftStatus {
    /// This node's Raft id and name.
    pub this_node: u64,
    pub this_node_name: String,
    /// Leader (Raft id and name) if one is known.
    pub leader: Option<u64>,
    pub leader_name: Option<String>,
    pub term: u64,
    /// "Leader", "Follower", "Candidate", "Learner", "Shutdown".
    pub state: String,
    pub last_log_index: Option<u64>,
    pub last_applied: Option<u64>,
    pub members: Vec<MemberStatus>,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
}

/// Why a request could not be served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum LcpError {
    #[error("unknown volume {volume}")]
    UnknownVolume { volume: VolumeId },
    #[error("raft: {reason}")]
    Raft { reason: String },
    #[error("forwarding to the leader failed: {reason}")]
    Forward { reason: String },
    /// A forwarded command may or may not have been applied: read the
    /// state before retrying.
    #[error("outcome unknown: {reason}")]
    Uncertain { reason: String },
    #[error("bad request: {reason}")]
    BadRequest { reason: String },
}

/// An answer of the local control plane.
// One answer per request, moved once: the unit status's size is not worth
// a box that every match on a response would have to see through.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LcpResponse {
    /// The command was committed and applied (or refused by the state
    /// machine, which changed nothing).
    Applied(Result<Outcome, CommandError>),
    PartitionMap(PartitionMap),
    Reservations(PersistentReservations),
    UnitStatus {
        raft: RaftStatus,
        unit: UnitStatus,
    },
    RaftStatus(RaftStatus),
    /// This node cannot serve it; try the leader (if known).
    NotLeader {
        leader: Option<u64>,
        leader_name: Option<String>,
    },
    Error(LcpError),
}

/// What a host asks of its volume's persistent reservations, through a
/// head node's host port (`proto::Message::HostReservations`, JSON; the
/// head node checks the attachment credential first and turns it into a
/// [`LcpRequest::Reservations`] read or a [`Command::SetReservations`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostReservationRequest {
    /// The current record (linearizable).
    Read,
    /// Compare-and-set (see `state::reservations`).
    Set {
        expected_version: u64,
        record: PersistentReservations,
    },
}

/// The answer to a [`HostReservationRequest`]: the record as it is after
/// the request (for a `Set`: the new record if `applied`, else the
/// current one the host must recompute from).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostReservationReply {
    pub applied: bool,
    pub record: PersistentReservations,
}

/// Encode a request as a proto message.
pub fn request_message(request: &LcpRequest) -> Result<Message, serde_json::Error> {
    Ok(Message::Lcp {
        idempotent: request.is_idempotent(),
        payload: Bytes::from(serde_json::to_vec(request)?),
    })
}

/// Encode a response as a proto message.
pub fn response_message(response: &LcpResponse) -> Message {
    let payload = serde_json::to_vec(response).unwrap_or_else(|error| {
        serde_json::to_vec(&LcpResponse::Error(LcpError::BadRequest {
            reason: format!("cannot encode response: {error}"),
        }))
        .unwrap_or_default()
    });
    Message::LcpReply {
        payload: Bytes::from(payload),
    }
}

/// Decode a response message.
pub fn decode_response(message: Message) -> Result<LcpResponse, ClientError> {
    match message {
        Message::LcpReply { payload } => serde_json::from_slice(&payload)
            .map_err(|e| ClientError::Protocol(format!("undecodable reply: {e}"))),
        other => Err(ClientError::Protocol(format!(
            "unexpected reply kind {:#06x}",
            other.kind()
        ))),
    }
}

/// Why [`LcpClient`] got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Every head node was tried and none served the request.
    #[error("no head node answered ({attempts} attempts): {last_error}")]
    NoHeadNode { attempts: usize, last_error: String },
    /// A command's outcome is unknown (sent, then the connection failed):
    /// read the state before retrying.
    #[error("outcome unknown: {0}")]
    Uncertain(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("{0}")]
    Lcp(#[from] LcpError),
}

#[derive(Debug)]
struct Target {
    name: String,
    link: Arc<PeerLink>,
}

/// Sends requests to the unit's head nodes (see the module docs).
#[derive(Debug)]
pub struct LcpClient {
    targets: Vec<Target>,
    /// Index of the node to try first (the last that answered).
    preferred: Mutex<usize>,
    rounds: usize,
    retry_pause: Duration,
}

impl LcpClient {
    /// A client for every head node of `rack`, authenticating with `auth`
    /// (an operator's or a member's credential: the unit port refuses a
    /// client without). Needs a tokio runtime.
    pub fn new(rack: &Rack, auth: Option<Arc<proto::auth::Credential>>) -> LcpClient {
        let config = LinkConfig {
            connect_timeout: Duration::from_millis(500),
            request_timeout: Duration::from_secs(5),
            auth,
            ..LinkConfig::default()
        };
        LcpClient::with_config(rack, config)
    }

    pub fn with_config(rack: &Rack, config: LinkConfig) -> LcpClient {
        let metrics = LinkMetrics::unregistered();
        let targets = rack
            .head_node
            .iter()
            .map(|h| Target {
                name: h.id.clone(),
                link: PeerLink::new(
                    h.id.clone(),
                    h.address_a,
                    h.address_b,
                    config.clone(),
                    metrics.clone(),
                ),
            })
            .collect();
        LcpClient {
            targets,
            preferred: Mutex::new(0),
            rounds: 3,
            retry_pause: Duration::from_millis(300),
        }
    }

    /// How many times every node is tried before giving up (default 3),
    /// with `pause` between rounds (a leader election takes about one
    /// election timeout).
    pub fn with_retries(mut self, rounds: usize, pause: Duration) -> LcpClient {
        self.rounds = rounds.max(1);
        self.retry_pause = pause;
        self
    }

    /// Send `request` to one head node, no redirects.
    pub async fn call_node(
        &self,
        node: &str,
        request: &LcpRequest,
    ) -> Result<LcpResponse, ClientError> {
        let target = self
            .targets
            .iter()
            .find(|t| t.name == node)
            .ok_or_else(|| ClientError::Protocol(format!("{node} is not a head node")))?;
        Self::send(target, request).await
    }

    /// Send a proto `message` (an operator's head-node request such as a
    /// snapshot diff page, see [`crate::snapshot_query`]) to head node
    /// `node`'s unit port and return its answer. Sent idempotent: only
    /// read-only requests go this way.
    pub async fn call_head_node(
        &self,
        node: &str,
        message: Message,
    ) -> Result<Message, ClientError> {
        let target = self
            .targets
            .iter()
            .find(|t| t.name == node)
            .ok_or_else(|| ClientError::Protocol(format!("{node} is not a head node")))?;
        target
            .link
            .call(message, true)
            .await
            .map_err(|error| ClientError::NoHeadNode {
                attempts: 1,
                last_error: format!("{}: {error}", target.name),
            })
    }

    async fn send(target: &Target, request: &LcpRequest) -> Result<LcpResponse, ClientError> {
        let message = request_message(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
        match target.link.call(message, request.is_idempotent()).await {
            Ok(reply) => decode_response(reply),
            Err(proto::link::LinkError::Uncertain { reason, .. }) => {
                Err(ClientError::Uncertain(format!("{}: {reason}", target.name)))
            }
            Err(error) => Err(ClientError::NoHeadNode {
                attempts: 1,
                last_error: format!("{}: {error}", target.name),
            }),
        }
    }

    /// Send `request` to the unit: any node, following leader hints,
    /// trying others when one fails. `NotLeader` and transport errors are
    /// retried; every other answer is returned.
    pub async fn call(&self, request: &LcpRequest) -> Result<LcpResponse, ClientError> {
        if self.targets.is_empty() {
            return Err(ClientError::NoHeadNode {
                attempts: 0,
                last_error: "the rack has no head node".into(),
            });
        }
        let mut attempts = 0;
        let mut last_error = String::new();
        let mut next = *lock(&self.preferred) % self.targets.len();
        for round in 0..self.rounds {
            if round > 0 {
                tokio::time::sleep(self.retry_pause).await;
            }
            // Each round: at most one try per node, plus hint hops.
            let mut tried = vec![false; self.targets.len()];
            let budget = self.targets.len() * 2;
            for _ in 0..budget {
                if tried.iter().all(|t| *t) {
                    break;
                }
                let index = if tried[next] {
                    match tried.iter().position(|t| !*t) {
                        Some(i) => i,
                        None => break,
                    }
                } else {
                    next
                };
                tried[index] = true;
                attempts += 1;
                let target = &self.targets[index];
                match Self::send(target, request).await {
                    Ok(LcpResponse::NotLeader { leader_name, .. }) => {
                        last_error = format!(
                            "{} is not the leader (leader: {})",
                            target.name,
                            leader_name.as_deref().unwrap_or("unknown")
                        );
                        next = leader_name
                            .and_then(|name| self.targets.iter().position(|t| t.name == name))
                            .unwrap_or((index + 1) % self.targets.len());
                    }
                    Ok(LcpResponse::Error(LcpError::Raft { reason }))
                    | Ok(LcpResponse::Error(LcpError::Forward { reason })) => {
                        last_error = format!("{}: {reason}", target.name);
                        next = (index + 1) % self.targets.len();
                    }
                    Ok(response) => {
                        *lock(&self.preferred) = index;
                        return Ok(response);
                    }
                    Err(ClientError::Uncertain(reason)) => {
                        return Err(ClientError::Uncertain(reason))
                    }
                    Err(error) => {
                        last_error = error.to_string();
                        next = (index + 1) % self.targets.len();
                    }
                }
            }
        }
        Err(ClientError::NoHeadNode {
            attempts,
            last_error,
        })
    }

    /// Propose a command; returns the state machine's verdict.
    pub async fn command(
        &self,
        command: Command,
    ) -> Result<Result<Outcome, CommandError>, ClientError> {
        match self.call(&LcpRequest::Command(command)).await? {
            LcpResponse::Applied(result) => Ok(result),
            other => Err(unexpected(other)),
        }
    }

    pub async fn partition_map(&self, volume: VolumeId) -> Result<PartitionMap, ClientError> {
        match self.call(&LcpRequest::PartitionMap { volume }).await? {
            LcpResponse::PartitionMap(map) => Ok(map),
            LcpResponse::Error(error) => Err(ClientError::Lcp(error)),
            other => Err(unexpected(other)),
        }
    }

    pub async fn unit_status(&self) -> Result<(RaftStatus, UnitStatus), ClientError> {
        match self.call(&LcpRequest::UnitStatus).await? {
            LcpResponse::UnitStatus { raft, unit } => Ok((raft, unit)),
            LcpResponse::Error(error) => Err(ClientError::Lcp(error)),
            other => Err(unexpected(other)),
        }
    }

    /// Close every link.
    pub fn close(&self) {
        for target in &self.targets {
            target.link.close();
        }
    }
}

fn unexpected(response: LcpResponse) -> ClientError {
    match response {
        LcpResponse::Error(error) => ClientError::Lcp(error),
        other => ClientError::Protocol(format!("unexpected answer {other:?}")),
    }
}
