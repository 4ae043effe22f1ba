//! A fake unit: one head node serving the local control plane's client
//! protocol (`Message::Lcp`) on networks A (127.0.1.x) and B (127.0.2.x),
//! answering UnitStatus, PartitionMap and the volume commands
//! (RegisterVolume, RegisterAttachment, RemoveAttachment, ResizeVolume,
//! DeleteVolume) from a small in-memory state that tests can adjust (free
//! capacity, a refusal).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use local_control_plane::client::{response_message, LcpRequest, LcpResponse, MemberStatus};
use local_control_plane::state::{
    CapacitySummary, DeviceStatus, NodeAddress, NodeStatus, PartitionEntry, PartitionMap,
    PathHealth, SledStatus, UnitStatus,
};
use local_control_plane::{
    Command, CommandError, Entity, Health, LcpError, NodeId, Outcome, RaftStatus, SledId,
};
use proto::server::{serve, Handler, ServerConfig};
use proto::Message;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub const COLUMN_SIZE_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone)]
pub struct FakeVolume {
    pub name: String,
    pub size_bytes: u64,
    pub partition_size_bytes: u64,
    /// Attachment id → token digest, as RegisterAttachment recorded them.
    pub attachments: BTreeMap<u64, [u8; 32]>,
    /// DeleteVolume applied (with `force` as given).
    pub deleted: Option<bool>,
    /// As SetVolumeQos recorded it.
    pub qos: Option<proto::qos::VolumeQos>,
}

#[derive(Debug, Default)]
pub struct FakeState {
    pub volumes: BTreeMap<u64, FakeVolume>,
    /// Free columns of the one sled device the status reports.
    pub free_columns: usize,
    /// Refuse the next command with this.
    pub refuse_next: Option<CommandError>,
    pub register_calls: usize,
    /// Apply the next command, then stop serving before replying (the
    /// caller cannot know whether it was applied).
    pub crash_after_apply: bool,
}

#[derive(Debug)]
pub struct FakeUnit {
    pub name: String,
    pub address_a: SocketAddr,
    pub address_b: SocketAddr,
    pub state: Mutex<FakeState>,
    shutdown: Mutex<CancellationToken>,
}

impl FakeUnit {
    /// A unit whose head node listens on 127.0.1.`host` / 127.0.2.`host`,
    /// with `free_bytes` allocatable.
    pub async fn start(name: &str, host: u8, free_bytes: u64) -> Arc<FakeUnit> {
        let a = TcpListener::bind(format!("127.0.1.{host}:0"))
            .await
            .unwrap();
        let b = TcpListener::bind(format!("127.0.2.{host}:0"))
            .await
            .unwrap();
        let unit = Arc::new(FakeUnit {
            name: name.into(),
            address_a: a.local_addr().unwrap(),
            address_b: b.local_addr().unwrap(),
            state: Mutex::new(FakeState {
                free_columns: usize::try_from(free_bytes / COLUMN_SIZE_BYTES).unwrap(),
                ..FakeState::default()
            }),
            shutdown: Mutex::new(CancellationToken::new()),
        });
        unit.serve(a, b);
        unit
    }

    fn serve(self: &Arc<Self>, a: TcpListener, b: TcpListener) {
        let shutdown = self.shutdown.lock().unwrap().clone();
        for listener in [a, b] {
            tokio::spawn(serve(
                listener,
                Arc::new(FakeHandler(self.clone())),
                ServerConfig::default(),
                shutdown.clone(),
            ));
        }
    }

    /// Serves again on the same addresses, with the same state.
    pub async fn restart(self: &Arc<Self>) {
        *self.shutdown.lock().unwrap() = CancellationToken::new();
        let a = TcpListener::bind(self.address_a).await.unwrap();
        let b = TcpListener::bind(self.address_b).await.unwrap();
        self.serve(a, b);
    }

    /// A unit nobody serves: its addresses refuse connections.
    pub async fn dead(name: &str, host: u8) -> Arc<FakeUnit> {
        let unit = FakeUnit::start(name, host, 0).await;
        unit.stop();
        // Until the accept loops dropped their listeners: connections refused.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        for address in [unit.address_a, unit.address_b] {
            while tokio::net::TcpStream::connect(address).await.is_ok() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{name}: {address} still accepts connections 10 s after the stop"
                );
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
        unit
    }

    pub fn stop(&self) {
        self.shutdown.lock().unwrap().cancel();
    }

    pub fn set_free_bytes(&self, free_bytes: u64) {
        self.state.lock().unwrap().free_columns =
            usize::try_from(free_bytes / COLUMN_SIZE_BYTES).unwrap();
    }

    /// The unit refuses the next command with `error`.
    pub fn refuse_next(&self, error: CommandError) {
        self.state.lock().unwrap().refuse_next = Some(error);
    }

    pub fn volumes(&self) -> BTreeMap<u64, FakeVolume> {
        self.state.lock().unwrap().volumes.clone()
    }

    pub fn register_calls(&self) -> usize {
        self.state.lock().unwrap().register_calls
    }

    fn node_address(&self) -> NodeAddress {
        NodeAddress {
            id: NodeId::new(format!("{}-hn-1", self.name)),
            address_a: self.address_a.to_string(),
            address_b: self.address_b.to_string(),
        }
    }

    /// The rack file of this unit: one head node, six sleds (addresses
    /// nobody serves; the zonal plane never talks to sleds).
    pub fn write_rack_file(&self, dir: &Path, host: u8) -> PathBuf {
        let mut text = format!(
            "[unit]\nname = \"{}\"\ncolumn_size_bytes = {COLUMN_SIZE_BYTES}\nerasure_codes = [\"4+2\", \"2+1\"]\n\n\
             [[head_node]]\nid = \"{}-hn-1\"\naddress_a = \"{}\"\naddress_b = \"{}\"\nadmin = \"127.0.0.1:1\"\n",
            self.name, self.name, self.address_a, self.address_b
        );
        for s in 1..=6 {
            write!(
                text,
                "\n[[sled]]\nid = \"{name}-sled-{s}\"\naddress_a = \"127.0.3.{host}:{port}\"\naddress_b = \"127.0.4.{host}:{port}\"\nadmin = \"127.0.0.1:{admin}\"\n\
                 [[sled.device]]\npath = \"/nonexistent/{name}/{s}\"\nsize_bytes = 1073741824\n",
                name = self.name,
                port = 7100 + s,
                admin = 9200 + u32::from(host) * 10 + s,
            )
            .unwrap();
        }
        let path = dir.join(format!("{}.rack.toml", self.name));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn status(&self) -> LcpResponse {
        let state = self.state.lock().unwrap();
        let node = self.node_address();
        let free = state.free_columns;
        LcpResponse::UnitStatus {
            raft: RaftStatus {
                this_node: 1,
                this_node_name: node.id.0.clone(),
                leader: Some(1),
                leader_name: Some(node.id.0.clone()),
                term: 3,
                state: "Leader".into(),
                last_log_index: Some(10),
                last_applied: Some(10),
                members: vec![MemberStatus {
                    raft_id: 1,
                    id: node.id.0.clone(),
                    address_a: node.address_a.clone(),
                    address_b: node.address_b.clone(),
                    admin: "127.0.0.1:1".into(),
                    voter: true,
                }],
                voters: vec![1],
                learners: vec![],
            },
            unit: UnitStatus {
                nodes: vec![NodeStatus {
                    id: node.id.clone(),
                    address_a: node.address_a.clone(),
                    address_b: node.address_b.clone(),
                    health: Health::Up,
                    paths: PathHealth::default(),
                    primaries: 0,
                    secondaries: 0,
                    failure: None,
                }],
                sleds: vec![SledStatus {
                    id: SledId::new(format!("{}-sled-1", self.name)),
                    health: Health::Up,
                    paths: PathHealth::default(),
                    fault_domain: "fd".into(),
                    power_domain: "pd".into(),
                    column_size_bytes: COLUMN_SIZE_BYTES,
                    devices: vec![DeviceStatus {
                        device: 0,
                        health: Health::Up,
                        size_bytes: 1 << 40,
                        free_columns: free,
                        used_columns: 0,
                        reserved_columns: 0,
                        retired_columns: 0,
                    }],
                    drain: Default::default(),
                }],
                volumes: state
                    .volumes
                    .values()
                    .filter(|v| v.deleted.is_none())
                    .count(),
                deleting_volumes: 0,
                partitions: 0,
                extents: 0,
                failover: Default::default(),
                allocation: Default::default(),
                snapshots: Vec::new(),
                clones: Vec::new(),
                rollbacks: Vec::new(),
                capacity: CapacitySummary {
                    free_columns: free as u64,
                    used_columns: 0,
                    allocatable_columns: free as u64,
                    free_bytes: free as u64 * COLUMN_SIZE_BYTES,
                    used_bytes: 0,
                },
                repair: Default::default(),
            },
        }
    }

    fn command(&self, command: Command) -> LcpResponse {
        let mut state = self.state.lock().unwrap();
        if matches!(command, Command::RegisterVolume { .. }) {
            state.register_calls += 1;
        }
        if let Some(error) = state.refuse_next.take() {
            return LcpResponse::Applied(Err(error));
        }
        LcpResponse::Applied(match command {
            Command::RegisterVolume {
                volume,
                name,
                size_bytes,
                partition_size_bytes,
                ..
            } => {
                if state.volumes.contains_key(&volume) {
                    return LcpResponse::Applied(Err(CommandError::AlreadyExists {
                        entity: Entity::Volume,
                        id: volume.to_string(),
                    }));
                }
                if state
                    .volumes
                    .values()
                    .any(|v| v.name == name && v.deleted.is_none())
                {
                    return LcpResponse::Applied(Err(CommandError::AlreadyExists {
                        entity: Entity::VolumeName,
                        id: name,
                    }));
                }
                state.volumes.insert(
                    volume,
                    FakeVolume {
                        name,
                        size_bytes,
                        partition_size_bytes,
                        attachments: BTreeMap::new(),
                        deleted: None,
                        qos: None,
                    },
                );
                Ok(Outcome::VolumeRegistered {
                    volume,
                    placement: vec![],
                })
            }
            other => Self::volume_command(&mut state, other),
        })
    }

    fn volume_command(state: &mut FakeState, command: Command) -> Result<Outcome, CommandError> {
        let volume_of = |state: &mut FakeState, volume: u64| match state
            .volumes
            .get(&volume)
            .map(|v| v.deleted.is_some())
        {
            None => Err(CommandError::UnknownVolume { volume }),
            Some(true) => Err(CommandError::VolumeDeleting { volume }),
            Some(false) => Ok(()),
        };
        match command {
            Command::RegisterAttachment {
                volume,
                attachment,
                token_digest,
                ..
            } => {
                volume_of(state, volume)?;
                let v = state.volumes.get_mut(&volume).unwrap();
                v.attachments.insert(attachment, token_digest);
                Ok(Outcome::Done)
            }
            Command::RemoveAttachment { volume, attachment } => {
                volume_of(state, volume)?;
                let v = state.volumes.get_mut(&volume).unwrap();
                v.attachments
                    .remove(&attachment)
                    .map(|_| Outcome::Done)
                    .ok_or(CommandError::UnknownAttachment { volume, attachment })
            }
            Command::ResizeVolume { volume, size_bytes } => {
                volume_of(state, volume)?;
                let v = state.volumes.get_mut(&volume).unwrap();
                if size_bytes < v.size_bytes {
                    return Err(CommandError::ShrinkRefused {
                        volume,
                        current_bytes: v.size_bytes,
                        requested_bytes: size_bytes,
                    });
                }
                v.size_bytes = size_bytes;
                Ok(Outcome::VolumeResized {
                    volume,
                    size_bytes,
                    added: vec![],
                })
            }
            Command::SetVolumeQos { volume, qos } => {
                volume_of(state, volume)?;
                let v = state.volumes.get_mut(&volume).unwrap();
                v.qos = qos.and_then(proto::qos::VolumeQos::normalized);
                Ok(Outcome::Done)
            }
            Command::DeleteVolume { volume, force, .. } => {
                volume_of(state, volume)?;
                let v = state.volumes.get_mut(&volume).unwrap();
                if !v.attachments.is_empty() && !force {
                    return Err(CommandError::VolumeAttached {
                        volume,
                        attachments: v.attachments.len(),
                    });
                }
                let revoked_attachments = v.attachments.len();
                v.attachments.clear();
                v.deleted = Some(force);
                Ok(Outcome::DeleteStarted {
                    volume,
                    extents: 0,
                    revoked_attachments,
                })
            }
            other => Err(CommandError::InvalidArgument {
                reason: format!("fake LCP does not serve {other:?}"),
            }),
        }
    }

    fn partition_map(&self, volume: u64) -> LcpResponse {
        let state = self.state.lock().unwrap();
        let Some(v) = state.volumes.get(&volume).filter(|v| v.deleted.is_none()) else {
            return LcpResponse::Error(LcpError::UnknownVolume { volume });
        };
        let count = v.size_bytes.div_ceil(v.partition_size_bytes);
        let node = self.node_address();
        LcpResponse::PartitionMap(PartitionMap {
            volume,
            size_bytes: v.size_bytes,
            partition_size_bytes: v.partition_size_bytes,
            partitions: (0..u32::try_from(count).unwrap())
                .map(|index| PartitionEntry {
                    index,
                    primary: node.clone(),
                    secondary: node.clone(),
                    epoch: 1,
                    lease_expires_at_ms: None,
                })
                .collect(),
            qos: v.qos,
        })
    }

    fn lcp(&self, payload: &[u8]) -> Message {
        let response = match serde_json::from_slice::<LcpRequest>(payload) {
            Ok(LcpRequest::UnitStatus) => self.status(),
            Ok(LcpRequest::Command(command)) => self.command(command),
            Ok(LcpRequest::PartitionMap { volume }) => self.partition_map(volume),
            Ok(other) => LcpResponse::Error(LcpError::BadRequest {
                reason: format!("fake LCP serves no {other:?}"),
            }),
            Err(error) => LcpResponse::Error(LcpError::BadRequest {
                reason: error.to_string(),
            }),
        };
        response_message(&response)
    }
}

#[derive(Debug)]
struct FakeHandler(Arc<FakeUnit>);

impl Handler for FakeHandler {
    fn handle(&self, request: Message) -> BoxFuture<'static, Message> {
        let unit = self.0.clone();
        Box::pin(async move {
            match request {
                Message::Lcp { payload, .. } => {
                    let reply = unit.lcp(&payload);
                    let crash = std::mem::take(&mut unit.state.lock().unwrap().crash_after_apply);
                    if crash {
                        unit.stop();
                        // Shutdown aborts this handler: no reply is sent.
                        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                    }
                    reply
                }
                other => response_message(&LcpResponse::Error(LcpError::BadRequest {
                    reason: format!("fake serves no kind {:#06x}", other.kind()),
                })),
            }
        })
    }
}
