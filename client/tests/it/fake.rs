//! A fake unit: head nodes that serve the host protocol from a shared
//! sector map and answer the local control plane's PartitionMap read, with
//! switches for the failures the client must survive.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use client::{ClientConfig, VolumeClient};
use futures::future::BoxFuture;
use hardware::rack::{ErasureCode, HeadNodeSpec, Rack, UnitSpec};
use local_control_plane::client::{response_message, LcpRequest, LcpResponse};
use local_control_plane::state::{NodeAddress, PartitionEntry, PartitionMap};
use local_control_plane::{LcpClient, LcpError, NodeId};
use proto::link::LinkConfig;
use proto::server::{serve, Handler, ServerConfig};
use proto::volume::AttachmentCredential;
use proto::volume::{chunk_crcs, HostError, HostOp, HostReply, HostRequest, NodeHint};
use proto::Message;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub const VOLUME: u64 = 7;
const SECTOR: u64 = 512;

/// How a node misbehaves; counters decrement as they fire.
#[derive(Debug, Default)]
pub struct Behaviour {
    /// Refuse every host request as not primary, with this hint.
    pub not_primary: Option<Option<NodeHint>>,
    /// Refuse the next host request with StaleEpoch{current}.
    pub stale_epoch_once: Option<u64>,
    /// Refuse this many host requests with Unavailable.
    pub unavailable: u32,
    /// Corrupt the CRCs of this many read replies.
    pub corrupt_reads: u32,
    /// Refuse every host request with OutOfRange.
    pub out_of_range: bool,
    /// Refuse epochs below this with StaleEpoch.
    pub min_epoch: u64,
}

/// One host request as a node saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub partition: u32,
    pub op: &'static str,
    pub epoch: u64,
    pub offset_bytes: u64,
}

#[derive(Debug)]
pub struct FakeNode {
    pub id: String,
    pub address_a: SocketAddr,
    pub address_b: SocketAddr,
    pub behaviour: Mutex<Behaviour>,
    pub seen: Mutex<Vec<Seen>>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
}

#[derive(Debug)]
struct Shared {
    /// Sector index → contents (absent reads as zeros).
    sectors: Mutex<BTreeMap<u64, Bytes>>,
    map: Mutex<PartitionMap>,
}

impl FakeNode {
    pub fn hint(&self) -> NodeHint {
        NodeHint {
            node_id: self.id.clone(),
            address_a: self.address_a,
            address_b: self.address_b,
        }
    }

    pub fn address(&self) -> NodeAddress {
        NodeAddress {
            id: NodeId(self.id.clone()),
            address_a: self.address_a.to_string(),
            address_b: self.address_b.to_string(),
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Stop serving (both networks); open connections are closed.
    pub fn stop(&self) {
        self.shutdown.cancel();
    }

    fn lcp(&self, payload: &[u8]) -> Message {
        let response = match serde_json::from_slice::<LcpRequest>(payload) {
            Ok(LcpRequest::PartitionMap { volume }) => {
                let map = self.shared.map.lock().unwrap().clone();
                if map.volume == volume {
                    LcpResponse::PartitionMap(map)
                } else {
                    LcpResponse::Error(LcpError::UnknownVolume { volume })
                }
            }
            Ok(other) => LcpResponse::Error(LcpError::BadRequest {
                reason: format!("fake LCP serves no {other:?}"),
            }),
            Err(error) => LcpResponse::Error(LcpError::BadRequest {
                reason: error.to_string(),
            }),
        };
        response_message(&response)
    }

    fn host(&self, request: HostRequest) -> HostReply {
        self.seen.lock().unwrap().push(Seen {
            partition: request.partition,
            op: request.op.name(),
            epoch: request.epoch,
            offset_bytes: request.op.range().map_or(0, |r| r.0),
        });
        let partition_size = self.shared.map.lock().unwrap().partition_size_bytes;
        let partition_start = u64::from(request.partition) * partition_size;
        let partition_end = partition_start + partition_size;
        let mut corrupt = false;
        {
            let mut behaviour = self.behaviour.lock().unwrap();
            if let Some(hint) = &behaviour.not_primary {
                return HostReply::Error(HostError::NotPrimary { hint: hint.clone() });
            }
            if let Some(current) = behaviour.stale_epoch_once.take() {
                return HostReply::Error(HostError::StaleEpoch { current });
            }
            if behaviour.unavailable > 0 {
                behaviour.unavailable -= 1;
                return HostReply::Error(HostError::Unavailable {
                    reason: "secondary not reachable".into(),
                });
            }
            if request.epoch < behaviour.min_epoch {
                return HostReply::Error(HostError::StaleEpoch {
                    current: behaviour.min_epoch,
                });
            }
            let (offset_bytes, len) = request.op.range().unwrap_or((partition_start, 0));
            let end = offset_bytes + u64::from(len);
            if behaviour.out_of_range || offset_bytes < partition_start || end > partition_end {
                return HostReply::Error(HostError::OutOfRange {
                    offset_bytes,
                    len_bytes: len,
                    partition_start_bytes: partition_start,
                    partition_end_bytes: partition_end,
                });
            }
            if matches!(request.op, HostOp::Read { .. }) && behaviour.corrupt_reads > 0 {
                behaviour.corrupt_reads -= 1;
                corrupt = true;
            }
        }
        if let Err(error) = request.op.validate() {
            return HostReply::Error(error);
        }
        let mut sectors = self.shared.sectors.lock().unwrap();
        match request.op {
            HostOp::Read {
                offset_bytes,
                len_bytes: len,
            } => {
                let mut data = Vec::with_capacity(len as usize);
                for sector in offset_bytes / SECTOR..(offset_bytes + u64::from(len)) / SECTOR {
                    match sectors.get(&sector) {
                        Some(bytes) => data.extend_from_slice(bytes),
                        None => data.extend_from_slice(&[0u8; SECTOR as usize]),
                    }
                }
                let mut crcs = chunk_crcs(&data);
                if corrupt {
                    crcs[0] ^= 1;
                }
                HostReply::Data {
                    data: Bytes::from(data),
                    crcs,
                }
            }
            HostOp::Write {
                offset_bytes, data, ..
            } => {
                for (i, chunk) in data.chunks(SECTOR as usize).enumerate() {
                    sectors.insert(
                        offset_bytes / SECTOR + i as u64,
                        Bytes::copy_from_slice(chunk),
                    );
                }
                HostReply::Done
            }
            HostOp::Trim {
                offset_bytes,
                len_bytes: len,
                ..
            }
            | HostOp::WriteZeroes {
                offset_bytes,
                len_bytes: len,
                ..
            } => {
                for sector in offset_bytes / SECTOR..(offset_bytes + u64::from(len)) / SECTOR {
                    sectors.remove(&sector);
                }
                HostReply::Done
            }
            HostOp::Flush => HostReply::Done,
            // The fake head node keeps no snapshots.
            HostOp::ReadSnapshot { .. }
            | HostOp::SnapshotControl { .. }
            | HostOp::SnapshotDiff { .. }
            | HostOp::SnapshotUsage
            | HostOp::SnapshotMap { .. } => HostReply::Error(HostError::BadRequest {
                reason: "the fake head node has no snapshots".into(),
            }),
        }
    }
}

#[derive(Debug)]
struct FakeHandler(Arc<FakeNode>);

impl Handler for FakeHandler {
    fn handle(&self, request: Message) -> BoxFuture<'static, Message> {
        let node = self.0.clone();
        Box::pin(async move {
            match request {
                Message::Lcp { payload, .. } => node.lcp(&payload),
                Message::Host(request) => Message::HostReply(node.host(request)),
                other => Message::HostReply(HostReply::Error(HostError::BadRequest {
                    reason: format!("fake serves no kind {:#06x}", other.kind()),
                })),
            }
        })
    }
}

/// Head nodes `hn-0..n` on 127.0.1.(n+1) (network A) and 127.0.2.(n+1)
/// (network B), one volume of `partitions` partitions; partition `p`'s
/// primary is node `p % n`, epoch 1.
#[derive(Debug)]
pub struct Unit {
    pub nodes: Vec<Arc<FakeNode>>,
    shared: Arc<Shared>,
}

impl Unit {
    pub async fn start(node_count: usize, partitions: u32, partition_size_bytes: u64) -> Unit {
        let shared = Arc::new(Shared {
            sectors: Mutex::new(BTreeMap::new()),
            map: Mutex::new(PartitionMap {
                volume: VOLUME,
                size_bytes: u64::from(partitions) * partition_size_bytes,
                partition_size_bytes,
                partitions: Vec::new(),
                qos: None,
            }),
        });
        let mut nodes = Vec::new();
        for n in 0..node_count {
            let host = n + 1;
            let a = TcpListener::bind(format!("127.0.1.{host}:0"))
                .await
                .unwrap();
            let b = TcpListener::bind(format!("127.0.2.{host}:0"))
                .await
                .unwrap();
            let node = Arc::new(FakeNode {
                id: format!("hn-{n}"),
                address_a: a.local_addr().unwrap(),
                address_b: b.local_addr().unwrap(),
                behaviour: Mutex::new(Behaviour::default()),
                seen: Mutex::new(Vec::new()),
                shared: shared.clone(),
                shutdown: CancellationToken::new(),
            });
            for listener in [a, b] {
                tokio::spawn(serve(
                    listener,
                    Arc::new(FakeHandler(node.clone())),
                    ServerConfig::default(),
                    node.shutdown.clone(),
                ));
            }
            nodes.push(node);
        }
        let entries = (0..partitions)
            .map(|p| PartitionEntry {
                index: p,
                primary: nodes[p as usize % node_count].address(),
                secondary: nodes[(p as usize + 1) % node_count].address(),
                epoch: 1,
                lease_expires_at_ms: None,
            })
            .collect();
        shared.map.lock().unwrap().partitions = entries;
        Unit { nodes, shared }
    }

    /// Node serving `partition` per the control plane's map.
    pub fn primary(&self, partition: u32) -> usize {
        let map = self.shared.map.lock().unwrap();
        let id = &map.partitions[partition as usize].primary.id.0;
        self.nodes.iter().position(|n| &n.id == id).unwrap()
    }

    /// Fail over `partition` to node `to` in the control plane's map,
    /// raising the epoch; returns the new epoch.
    pub fn move_partition(&self, partition: u32, to: usize) -> u64 {
        let mut map = self.shared.map.lock().unwrap();
        let entry = &mut map.partitions[partition as usize];
        entry.primary = self.nodes[to].address();
        entry.epoch += 1;
        entry.epoch
    }

    fn rack(&self) -> Rack {
        Rack {
            unit: UnitSpec {
                name: "fake".into(),
                column_size_bytes: 1 << 20,
                erasure_codes: vec![ErasureCode { k: 4, m: 2 }],
                min_flush_columns: None,
            },
            head_node: self
                .nodes
                .iter()
                .map(|n| HeadNodeSpec {
                    id: n.id.clone(),
                    address_a: n.address_a,
                    address_b: n.address_b,
                    admin: "127.0.0.1:1".parse().unwrap(),
                    host: None,
                })
                .collect(),
            sled: Vec::new(),
        }
    }

    pub fn config() -> ClientConfig {
        ClientConfig {
            request_timeout: Duration::from_secs(3),
            failover_timeout: Duration::from_secs(10),
            retry_backoff_initial: Duration::from_millis(5),
            retry_backoff_max: Duration::from_millis(50),
            link: LinkConfig {
                connect_timeout: Duration::from_millis(300),
                request_timeout: Duration::from_secs(1),
                ..LinkConfig::default()
            },
            ..ClientConfig::default()
        }
    }

    pub async fn client(&self, config: ClientConfig) -> VolumeClient {
        let lcp = LcpClient::with_config(&self.rack(), config.link.clone());
        VolumeClient::connect(lcp, VOLUME, AttachmentCredential::NONE, config)
            .await
            .unwrap()
    }
}

impl Drop for Unit {
    fn drop(&mut self) {
        for node in &self.nodes {
            node.stop();
        }
    }
}
