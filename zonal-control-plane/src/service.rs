//! The zonal service: volume operations over the store and the units.
//!
//! ```text
//!  HTTP handler ──▶ Zonal ──(blocking pool)──▶ Store (redb)
//!                    │
//!                    └──▶ Unit.client (LcpClient) ──▶ the unit's head nodes (A, else B)
//!                              ▲
//!  report loop (every report_interval_ms) ── UnitStatus ──┘ → UnitRecord in the store
//! ```
//!
//! * Mutations (create, resize, delete, attach, detach) take one async
//!   mutex, so a check and the write that follows it see the same state;
//!   reads do not. The zonal plane is a low-rate control path; holding the
//!   mutex across a unit's `RegisterVolume` (bounded by
//!   [`COMMAND_TIMEOUT`]) keeps two creates of one name from racing.
//! * Unit reports are *pulled*: the report loop asks each unit's LCP (its
//!   leader answers, followers redirect) for `UnitStatus`. A unit needs
//!   nothing from the zonal plane and never has to know its address. A
//!   unit that does not answer is marked unreachable (kept, with its last
//!   known capacity) and placement skips it until it answers again.
//! * Nothing here is on the I/O path: hosts get the unit and its head nodes
//!   from an attach and talk to the unit directly afterwards.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hardware::rack::Rack;
use local_control_plane::client::ClientError;
use local_control_plane::state::{Health, PartitionMap, UnitStatus};
use local_control_plane::{Command, CommandError, Entity, LcpClient, LcpError, Outcome};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::error::ApiError;
use crate::metrics::{Metrics, PollLabels, StateLabels};
use crate::model::{
    check_name, check_qos, check_size, rank_units, Attachment, Candidate, Capacity, ErasureCode,
    QosPatch, UnitRecord, VolumeRecord, VolumeSpec, VolumeState,
};
use crate::store::{Store, StoreError};
use proto::volume::AttachmentToken;

mod snapshots;
pub use snapshots::SnapshotView;

/// Longest wait for a unit to apply a command; past it the outcome is
/// unknown.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest wait for a unit's status or a partition map.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A configured unit: its rack description and a client of its LCP.
#[derive(Debug)]
pub struct Unit {
    pub name: String,
    pub rack: Rack,
    client: LcpClient,
    /// The PEM of the CA of the unit's host ports, given with every attach.
    host_ca_pem: Option<String>,
}

impl Unit {
    /// `credential`: the zonal plane's operator credential for this unit
    /// (its head nodes refuse a client without). Needs a tokio runtime
    /// (the client's links spawn tasks).
    pub fn new(
        name: String,
        rack: Rack,
        credential: Option<std::sync::Arc<proto::auth::Credential>>,
    ) -> Unit {
        let client = LcpClient::new(&rack, credential).with_retries(2, Duration::from_millis(200));
        Unit {
            name,
            rack,
            client,
            host_ca_pem: None,
        }
    }

    /// The unit's host-port CA (PEM text), returned with every attach.
    pub fn with_host_ca(mut self, pem: String) -> Unit {
        self.host_ca_pem = Some(pem);
        self
    }

    fn codes(&self) -> Vec<ErasureCode> {
        self.rack
            .unit
            .erasure_codes
            .iter()
            .map(|&c| ErasureCode::from(c))
            .collect()
    }

    /// The head nodes a host talks to, with both addresses.
    pub fn head_nodes(&self) -> Vec<HeadNodeAddress> {
        self.rack
            .head_node
            .iter()
            .map(|h| HeadNodeAddress {
                id: h.id.clone(),
                address_a: h.address_a.to_string(),
                address_b: h.address_b.to_string(),
                host: h.host.map(|host| host.to_string()),
            })
            .collect()
    }
}

/// A head node as an attach returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeadNodeAddress {
    pub id: String,
    pub address_a: String,
    pub address_b: String,
    /// The head node's host port: the only one a host may reach
    /// (SECURITY.md). `None` when the rack gives head nodes none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// What a host needs after an attach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttachInfo {
    pub attachment_id: u64,
    /// Per-attachment secret (32 hex digits), shown only here.
    pub token: String,
    pub host: String,
    pub volume: String,
    pub volume_id: u64,
    pub size_bytes: u64,
    pub partition_size_bytes: u64,
    pub erasure_code: String,
    pub unit: String,
    /// The unit's head nodes: any of them serves the volume's partition
    /// map to this attachment on its host port (`Message::HostMap`).
    pub head_nodes: Vec<HeadNodeAddress>,
    /// The CA (PEM) the head nodes' host-port certificates chain to, when
    /// the zonal config knows it (`[[units]] host_ca`): the agent trusts it
    /// for TLS to the host ports.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit_ca_pem: Option<String>,
    /// The attachment's TTL (`attachment_ttl_ms`): head nodes refuse the
    /// token once it passed without the host reading its partition map;
    /// an agent's map reads renew it. Absent: no expiry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// When it expires unless renewed (ms since the Unix epoch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
}

/// How one command to a unit went.
#[derive(Debug)]
enum Sent {
    Applied(Outcome),
    Refused(CommandError),
    Unreachable(String),
    Uncertain(String),
    Protocol(String),
}

/// How one `RegisterVolume` went.
enum Registration {
    Applied,
    Refused(CommandError),
    Unreachable(String),
    Uncertain(String),
    Protocol(String),
}

#[derive(Debug)]
pub struct Zonal {
    store: Arc<Store>,
    units: BTreeMap<String, Unit>,
    mutations: tokio::sync::Mutex<()>,
    pub metrics: Arc<Metrics>,
    /// TTL of the attachments this plane makes (`attachment_ttl_ms`).
    attachment_ttl_ms: Option<u64>,
}

impl Zonal {
    pub fn new(store: Store, units: Vec<Unit>, metrics: Arc<Metrics>) -> Zonal {
        metrics
            .units
            .set(i64::try_from(units.len()).unwrap_or(i64::MAX));
        Zonal {
            store: Arc::new(store),
            units: units.into_iter().map(|u| (u.name.clone(), u)).collect(),
            mutations: tokio::sync::Mutex::new(()),
            metrics,
            attachment_ttl_ms: None,
        }
    }

    /// Attachments made from now on expire `ttl_ms` after they were made
    /// or last renewed (the config's `attachment_ttl_ms`).
    pub fn with_attachment_ttl(mut self, ttl_ms: Option<u64>) -> Zonal {
        self.attachment_ttl_ms = ttl_ms;
        self
    }

    /// Runs a store call on the blocking pool.
    async fn store<T, F>(&self, call: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || call(&store))
            .await
            .map_err(|e| ApiError::Internal(format!("store task failed: {e}")))?
            .map_err(ApiError::from)
    }

    fn unit(&self, name: &str) -> Result<&Unit, ApiError> {
        self.units.get(name).ok_or_else(|| ApiError::UnitNotFound {
            name: name.to_owned(),
        })
    }

    /// Erasure codes the unit's rack offers (empty for an unknown unit).
    pub fn unit_codes(&self, name: &str) -> Vec<ErasureCode> {
        self.units.get(name).map(Unit::codes).unwrap_or_default()
    }

    /// Closes the links to every unit.
    pub fn close(&self) {
        for unit in self.units.values() {
            unit.client.close();
        }
    }

    // ---- unit reports ----

    /// Asks `unit` for its status and stores the result.
    pub async fn poll_unit(&self, name: &str) -> Result<UnitRecord, ApiError> {
        let unit = self.unit(name)?;
        let answer = tokio::time::timeout(READ_TIMEOUT, unit.client.unit_status()).await;
        let key = name.to_owned();
        let mut record = self
            .store(move |s| s.unit(&key))
            .await?
            .unwrap_or_else(|| UnitRecord::unknown(name));
        let now = now_ms();
        record.checked_at_ms = Some(now);
        let result = match answer {
            Ok(Ok((raft, status))) => {
                apply_status(&mut record, &status);
                record.leader = raft.leader_name;
                record.reachable = true;
                record.reported_at_ms = Some(now);
                record.last_error = None;
                "ok"
            }
            Ok(Err(error)) => {
                mark_unreachable(&mut record, error.to_string());
                "unreachable"
            }
            Err(_) => {
                mark_unreachable(&mut record, format!("no answer within {READ_TIMEOUT:?}"));
                "unreachable"
            }
        };
        self.metrics
            .polls
            .get_or_create(&PollLabels {
                unit: name.to_owned(),
                result,
            })
            .inc();
        if !record.reachable {
            warn!(
                unit = name,
                error = record.last_error.as_deref().unwrap_or(""),
                "unit unreachable"
            );
        }
        let stored = record.clone();
        self.store(move |s| s.put_unit(&stored)).await?;
        Ok(record)
    }

    /// Polls every unit at once.
    pub async fn poll_all(self: &Arc<Self>) {
        let mut polls = JoinSet::new();
        for name in self.units.keys() {
            let zonal = self.clone();
            let name = name.clone();
            polls.spawn(async move { (zonal.poll_unit(&name).await, name) });
        }
        while let Some(joined) = polls.join_next().await {
            if let Ok((Err(error), name)) = joined {
                warn!(unit = %name, %error, "cannot record unit report");
            }
        }
    }

    /// Polls every unit now and then every `interval` until `shutdown`.
    pub async fn report_loop(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = self.poll_all() => {}
                () = shutdown.cancelled() => return,
            }
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    async fn record_unreachable(&self, name: &str, reason: &str) -> Result<(), ApiError> {
        let key = name.to_owned();
        let mut record = self
            .store(move |s| s.unit(&key))
            .await?
            .unwrap_or_else(|| UnitRecord::unknown(name));
        record.checked_at_ms = Some(now_ms());
        mark_unreachable(&mut record, reason.to_owned());
        self.store(move |s| s.put_unit(&record)).await
    }

    /// Every configured unit with its last report and the count of live
    /// volumes placed there.
    pub async fn units(&self) -> Result<Vec<(UnitRecord, usize)>, ApiError> {
        let stored = self.store(|s| s.units()).await?;
        let volumes = self.store(|s| s.volumes()).await?;
        let mut by_name: BTreeMap<String, UnitRecord> =
            stored.into_iter().map(|u| (u.name.clone(), u)).collect();
        Ok(self
            .units
            .keys()
            .map(|name| {
                let record = by_name
                    .remove(name)
                    .unwrap_or_else(|| UnitRecord::unknown(name));
                let count = volumes
                    .iter()
                    .filter(|v| v.unit == *name && v.state != VolumeState::Deleted)
                    .count();
                (record, count)
            })
            .collect())
    }

    // ---- volumes ----

    /// Creates a volume, or returns the live one of the same name and spec
    /// (`false`: nothing was created).
    pub async fn create_volume(
        &self,
        mut spec: VolumeSpec,
    ) -> Result<(VolumeRecord, bool), ApiError> {
        let _guard = self.mutations.lock().await;
        // A clone goes to its parent's unit, with the parent's geometry.
        let clone_unit = match spec.from_snapshot.clone() {
            Some(source) => Some(self.resolve_clone(&mut spec, source).await?),
            None => None,
        };
        spec.validate()?;
        let name = spec.name.clone();
        if let Some(existing) = self.store(move |s| s.volume_by_name(&name)).await? {
            if existing.spec != spec {
                return Err(ApiError::NameConflict {
                    name: spec.name,
                    existing: format!(
                        "size_bytes {}, partition_size_bytes {}, erasure_code {}",
                        existing.spec.size_bytes,
                        existing.spec.partition_size_bytes,
                        existing.spec.erasure_code
                    ),
                });
            }
            return match existing.state {
                VolumeState::Available => Ok((existing, false)),
                VolumeState::Creating => self.finish_creating(existing).await.map(|r| (r, true)),
                state => Err(ApiError::VolumeNotAvailable {
                    name: spec.name,
                    state,
                }),
            };
        }

        let ranked = match clone_unit {
            Some(unit) => vec![unit],
            None => rank_units(
                &self.candidates(&spec).await?,
                spec.raw_bytes(),
                spec.erasure_code,
            )
            .map_err(|reason| ApiError::NoUnitFits { reason })?,
        };
        let mut reserved: Option<VolumeRecord> = None;
        let mut passed_over = Vec::new();
        for unit_name in ranked {
            let record = match reserved.take() {
                None => {
                    let (spec, unit_name) = (spec.clone(), unit_name.clone());
                    self.store(move |s| s.reserve_volume(&spec, &unit_name, now_ms()))
                        .await?
                }
                Some(mut record) => {
                    record.unit = unit_name.clone();
                    let stored = record.clone();
                    self.store(move |s| s.put_volume(&stored)).await?;
                    record
                }
            };
            let unit = self.unit(&unit_name)?;
            match self.register(unit, &record).await {
                Registration::Applied => {
                    info!(volume = %record.spec.name, id = record.id, unit = %unit_name, "volume created");
                    return self.set_available(record).await.map(|r| (r, true));
                }
                Registration::Unreachable(reason) => {
                    self.record_unreachable(&unit_name, &reason).await?;
                    passed_over.push(format!("{unit_name}: unreachable ({reason})"));
                }
                Registration::Refused(error)
                    if error.is_retryable()
                        || matches!(
                            error,
                            CommandError::AlreadyExists {
                                entity: Entity::VolumeName,
                                ..
                            }
                        ) =>
                {
                    passed_over.push(format!("{unit_name}: {error}"));
                }
                Registration::Refused(error) => {
                    self.forget(&record).await?;
                    return Err(ApiError::UnitRefused {
                        unit: unit_name,
                        error,
                    });
                }
                Registration::Uncertain(reason) => {
                    // Stays Creating on this unit: the same create settles it.
                    return Err(ApiError::OutcomeUnknown {
                        unit: unit_name,
                        volume: record.id,
                        reason,
                    });
                }
                Registration::Protocol(reason) => {
                    self.forget(&record).await?;
                    return Err(ApiError::UnitProtocol {
                        unit: unit_name,
                        reason,
                    });
                }
            }
            reserved = Some(record);
        }
        if let Some(record) = reserved {
            self.forget(&record).await?;
        }
        Err(ApiError::NoUnitFits {
            reason: passed_over.join("; "),
        })
    }

    /// Fills a clone's spec in from its parent volume (size, partition
    /// size and code; a size or partition size given must be the
    /// parent's) and returns the parent's unit. The unit checks the
    /// snapshot when it registers the clone.
    async fn resolve_clone(
        &self,
        spec: &mut VolumeSpec,
        mut source: crate::model::SnapshotSource,
    ) -> Result<String, ApiError> {
        let name = source.volume.clone();
        let parent = self
            .store(move |s| s.volume_by_name(&name))
            .await?
            .filter(|v| v.state != VolumeState::Deleted)
            .ok_or_else(|| ApiError::VolumeNotFound {
                name: source.volume.clone(),
            })?;
        if parent.state != VolumeState::Available {
            return Err(ApiError::VolumeNotAvailable {
                name: source.volume,
                state: parent.state,
            });
        }
        for (field, given, parents) in [
            ("size_bytes", spec.size_bytes, parent.spec.size_bytes),
            (
                "partition_size_bytes",
                spec.partition_size_bytes,
                parent.spec.partition_size_bytes,
            ),
        ] {
            if given != 0 && given != parents {
                return Err(ApiError::bad(
                    field,
                    format!("a clone has its parent's {parents} (asked {given})"),
                ));
            }
        }
        spec.size_bytes = parent.spec.size_bytes;
        spec.partition_size_bytes = parent.spec.partition_size_bytes;
        spec.erasure_code = parent.spec.erasure_code;
        source.volume_id = parent.id;
        spec.from_snapshot = Some(source);
        Ok(parent.unit)
    }

    /// Re-sends the registration of a volume left `Creating` (its first
    /// attempt's outcome was unknown) to the same unit.
    async fn finish_creating(&self, record: VolumeRecord) -> Result<VolumeRecord, ApiError> {
        let unit = self.unit(&record.unit)?;
        match self.register(unit, &record).await {
            Registration::Applied => self.set_available(record).await,
            Registration::Unreachable(reason) => {
                self.record_unreachable(&record.unit, &reason).await?;
                Err(ApiError::UnitUnreachable {
                    unit: record.unit,
                    reason,
                })
            }
            Registration::Uncertain(reason) => Err(ApiError::OutcomeUnknown {
                unit: record.unit,
                volume: record.id,
                reason,
            }),
            Registration::Refused(error) => {
                self.forget(&record).await?;
                Err(ApiError::UnitRefused {
                    unit: record.unit,
                    error,
                })
            }
            Registration::Protocol(reason) => Err(ApiError::UnitProtocol {
                unit: record.unit,
                reason,
            }),
        }
    }

    async fn set_available(&self, mut record: VolumeRecord) -> Result<VolumeRecord, ApiError> {
        record.state = VolumeState::Available;
        let stored = record.clone();
        self.store(move |s| s.put_volume(&stored)).await?;
        Ok(record)
    }

    async fn forget(&self, record: &VolumeRecord) -> Result<(), ApiError> {
        let (id, name) = (record.id, record.spec.name.clone());
        self.store(move |s| s.remove_volume(id, &name)).await
    }

    async fn candidates(&self, spec: &VolumeSpec) -> Result<Vec<Candidate>, ApiError> {
        let units = self.units().await?;
        let volumes = self.store(|s| s.volumes()).await?;
        Ok(units
            .into_iter()
            .filter_map(|(record, count)| {
                let unit = self.units.get(&record.name)?;
                // A volume whose delete the unit has not confirmed yet
                // still holds its name there.
                let excluded = volumes.iter().any(|v| {
                    v.unit == record.name
                        && v.spec.name == spec.name
                        && v.state == VolumeState::Deleting
                });
                Some(Candidate {
                    name: record.name.clone(),
                    reachable: record.reachable,
                    allocatable_bytes: record.capacity.allocatable_bytes,
                    volumes: count,
                    codes: unit.codes(),
                    excluded,
                })
            })
            .collect())
    }

    async fn register(&self, unit: &Unit, record: &VolumeRecord) -> Registration {
        let command = match &record.spec.from_snapshot {
            Some(source) => Command::RegisterClone {
                volume: record.id,
                name: record.spec.name.clone(),
                parent: source.volume_id,
                snapshot: source.snapshot.clone(),
            },
            None => Command::RegisterVolume {
                volume: record.id,
                name: record.spec.name.clone(),
                size_bytes: record.spec.size_bytes,
                partition_size_bytes: record.spec.partition_size_bytes,
                k: record.spec.erasure_code.k,
                m: record.spec.erasure_code.m,
            },
        };
        let answer = match tokio::time::timeout(COMMAND_TIMEOUT, unit.client.command(command)).await
        {
            Ok(answer) => answer,
            Err(_) => {
                return Registration::Uncertain(format!("no answer within {COMMAND_TIMEOUT:?}"))
            }
        };
        let registered = match answer {
            Ok(Ok(Outcome::VolumeRegistered { .. })) => Registration::Applied,
            Ok(Ok(other)) => Registration::Protocol(format!("RegisterVolume answered {other:?}")),
            Ok(Err(CommandError::AlreadyExists {
                entity: Entity::Volume,
                id,
            })) if id == record.id.to_string() => {
                // An earlier attempt was applied, unless the unit holds a
                // different volume under our id; the partition map tells.
                match tokio::time::timeout(READ_TIMEOUT, unit.client.partition_map(record.id)).await
                {
                    Ok(Ok(map))
                        if map.size_bytes == record.spec.size_bytes
                            && map.partition_size_bytes == record.spec.partition_size_bytes =>
                    {
                        Registration::Applied
                    }
                    Ok(Ok(map)) => Registration::Protocol(format!(
                        "the unit holds a different volume {} ({} bytes)",
                        record.id, map.size_bytes
                    )),
                    Ok(Err(e)) => Registration::Uncertain(e.to_string()),
                    Err(_) => Registration::Uncertain("partition map read timed out".into()),
                }
            }
            Ok(Err(error)) => Registration::Refused(error),
            Err(error @ ClientError::NoHeadNode { .. }) => {
                Registration::Unreachable(error.to_string())
            }
            Err(ClientError::Uncertain(reason)) => Registration::Uncertain(reason),
            Err(ClientError::Lcp(LcpError::Uncertain { reason })) => {
                Registration::Uncertain(reason)
            }
            Err(error) => Registration::Protocol(error.to_string()),
        };
        match (registered, record.spec.qos) {
            (Registration::Applied, Some(qos)) => {
                // The volume exists on the unit: whatever goes wrong now
                // leaves the record Creating, and the same create settles
                // it (registering again answers AlreadyExists, setting the
                // same limits again is a no-op).
                let command = Command::SetVolumeQos {
                    volume: record.id,
                    qos: Some(qos),
                };
                match self.send(unit, command).await {
                    Sent::Applied(Outcome::Done) => Registration::Applied,
                    other => Registration::Uncertain(format!(
                        "the volume is registered but its QoS limits are not set yet: {other:?}"
                    )),
                }
            }
            (registered, _) => registered,
        }
    }

    pub async fn list_volumes(&self) -> Result<Vec<VolumeRecord>, ApiError> {
        let mut volumes = self.store(|s| s.volumes()).await?;
        volumes.retain(|v| v.state != VolumeState::Deleted);
        Ok(volumes)
    }

    async fn live_volume(&self, name: &str) -> Result<VolumeRecord, ApiError> {
        let key = name.to_owned();
        self.store(move |s| s.volume_by_name(&key))
            .await?
            .ok_or_else(|| ApiError::VolumeNotFound {
                name: name.to_owned(),
            })
    }

    /// The volume and, read live from its unit, its partition map (or why
    /// it could not be read).
    pub async fn describe_volume(
        &self,
        name: &str,
    ) -> Result<(VolumeRecord, Result<PartitionMap, String>), ApiError> {
        let record = self.live_volume(name).await?;
        let map = match (record.state, self.units.get(&record.unit)) {
            (VolumeState::Available, Some(unit)) => {
                match tokio::time::timeout(READ_TIMEOUT, unit.client.partition_map(record.id)).await
                {
                    Ok(Ok(map)) => Ok(map),
                    Ok(Err(error)) => Err(format!("unit {}: {error}", record.unit)),
                    Err(_) => Err(format!(
                        "unit {}: no answer within {READ_TIMEOUT:?}",
                        record.unit
                    )),
                }
            }
            (VolumeState::Available, None) => {
                Err(format!("unit {} is not in the configuration", record.unit))
            }
            (state, _) => Err(format!("volume is {}", state.name())),
        };
        Ok((record, map))
    }

    /// Sends one command to `unit` (bounded by [`COMMAND_TIMEOUT`]).
    async fn send(&self, unit: &Unit, command: Command) -> Sent {
        match tokio::time::timeout(COMMAND_TIMEOUT, unit.client.command(command)).await {
            Err(_) => Sent::Uncertain(format!("no answer within {COMMAND_TIMEOUT:?}")),
            Ok(Ok(Ok(outcome))) => Sent::Applied(outcome),
            Ok(Ok(Err(error))) => Sent::Refused(error),
            Ok(Err(error @ ClientError::NoHeadNode { .. })) => Sent::Unreachable(error.to_string()),
            Ok(Err(ClientError::Uncertain(reason)))
            | Ok(Err(ClientError::Lcp(LcpError::Uncertain { reason }))) => Sent::Uncertain(reason),
            Ok(Err(error)) => Sent::Protocol(error.to_string()),
        }
    }

    /// The API error for a command that did not apply.
    async fn not_applied(&self, record: &VolumeRecord, sent: Sent) -> ApiError {
        let unit = record.unit.clone();
        match sent {
            Sent::Applied(outcome) => ApiError::UnitProtocol {
                unit,
                reason: format!("unexpected answer {outcome:?}"),
            },
            Sent::Refused(error) => ApiError::UnitRefused { unit, error },
            Sent::Unreachable(reason) => {
                if let Err(error) = self.record_unreachable(&unit, &reason).await {
                    warn!(%unit, %error, "cannot record the unit unreachable");
                }
                ApiError::UnitUnreachable { unit, reason }
            }
            Sent::Uncertain(reason) => ApiError::OutcomeUnknown {
                unit,
                volume: record.id,
                reason,
            },
            Sent::Protocol(reason) => ApiError::UnitProtocol { unit, reason },
        }
    }

    /// Grows a volume: the unit places the new partitions
    /// (`ResizeVolume`), and only once it applied the resize does the
    /// record change. Shrinking is refused; the same size is a no-op; a
    /// resize whose outcome was unknown is settled by repeating it.
    pub async fn resize_volume(
        &self,
        name: &str,
        size_bytes: u64,
    ) -> Result<VolumeRecord, ApiError> {
        check_size("size_bytes", size_bytes)?;
        let _guard = self.mutations.lock().await;
        let mut record = self.live_volume(name).await?;
        if record.state != VolumeState::Available {
            return Err(ApiError::VolumeNotAvailable {
                name: name.to_owned(),
                state: record.state,
            });
        }
        if size_bytes < record.spec.size_bytes {
            return Err(ApiError::bad(
                "size_bytes",
                format!(
                    "{size_bytes} is smaller than the volume's {} bytes; volumes only grow",
                    record.spec.size_bytes
                ),
            ));
        }
        if size_bytes == record.spec.size_bytes {
            return Ok(record);
        }
        let grown = VolumeSpec {
            size_bytes,
            ..record.spec.clone()
        };
        grown.validate()?;
        let unit = self.unit(&record.unit)?;
        let sent = self
            .send(
                unit,
                Command::ResizeVolume {
                    volume: record.id,
                    size_bytes,
                },
            )
            .await;
        match sent {
            Sent::Applied(Outcome::VolumeResized {
                size_bytes: got, ..
            }) if got == size_bytes => {}
            other => return Err(self.not_applied(&record, other).await),
        }
        record.spec = grown;
        let stored = record.clone();
        self.store(move |s| s.put_volume(&stored)).await?;
        info!(volume = name, id = record.id, size_bytes, "volume grown");
        Ok(record)
    }

    /// Changes a volume's QoS limits: the unit applies them
    /// (`SetVolumeQos`, attach agents pick them up with their next map
    /// read), and only then does the record change. The same limits are a
    /// no-op; an unknown outcome is settled by repeating the change.
    pub async fn modify_volume(
        &self,
        name: &str,
        patch: QosPatch,
    ) -> Result<VolumeRecord, ApiError> {
        let _guard = self.mutations.lock().await;
        let mut record = self.live_volume(name).await?;
        if record.state != VolumeState::Available {
            return Err(ApiError::VolumeNotAvailable {
                name: name.to_owned(),
                state: record.state,
            });
        }
        let qos = patch.apply(record.spec.qos);
        check_qos(qos.as_ref())?;
        let unit = self.unit(&record.unit)?;
        // Sent even when the record already holds these limits: the unit's
        // record is the one agents read, and a previous change whose
        // outcome was unknown is settled this way.
        let sent = self
            .send(
                unit,
                Command::SetVolumeQos {
                    volume: record.id,
                    qos,
                },
            )
            .await;
        match sent {
            Sent::Applied(Outcome::Done) => {}
            other => return Err(self.not_applied(&record, other).await),
        }
        record.spec.qos = qos;
        let stored = record.clone();
        self.store(move |s| s.put_volume(&stored)).await?;
        info!(volume = name, id = record.id, ?qos, "volume QoS changed");
        Ok(record)
    }

    /// Deletes a volume: refused while attached unless `force` (which
    /// revokes the attachments on the unit too). The record turns
    /// `deleting`, the unit is asked to delete (`DeleteVolume`: the volume
    /// leaves its maps at once and its space is freed in the background),
    /// and the record turns `deleted` once the unit confirmed. A unit that
    /// cannot be reached leaves the record `deleting`; repeating the delete
    /// settles it.
    pub async fn delete_volume(&self, name: &str, force: bool) -> Result<VolumeRecord, ApiError> {
        let _guard = self.mutations.lock().await;
        let mut record = self.live_volume(name).await?;
        if !record.attachments.is_empty() && !force {
            return Err(ApiError::VolumeAttached {
                name: name.to_owned(),
                attachments: record.attachments.len(),
            });
        }
        let was = record.state;
        if record.state != VolumeState::Creating {
            record.state = VolumeState::Deleting;
            let stored = record.clone();
            self.store(move |s| s.put_volume(&stored)).await?;
        }
        let unit = self.unit(&record.unit)?;
        let sent = self
            .send(
                unit,
                Command::DeleteVolume {
                    volume: record.id,
                    force,
                    now_ms: now_ms(),
                },
            )
            .await;
        match sent {
            Sent::Applied(Outcome::DeleteStarted { .. })
            | Sent::Refused(
                CommandError::VolumeDeleting { .. } | CommandError::UnknownVolume { .. },
            ) => {}
            Sent::Refused(error) => {
                // Nothing changed on the unit (e.g. attachments the zonal
                // plane does not know): the volume stays as it was.
                record.state = was;
                let stored = record.clone();
                self.store(move |s| s.put_volume(&stored)).await?;
                return Err(self.not_applied(&record, Sent::Refused(error)).await);
            }
            other => return Err(self.not_applied(&record, other).await),
        }
        record.state = VolumeState::Deleted;
        record.attachments.clear();
        let stored = record.clone();
        self.store(move |s| s.put_volume(&stored)).await?;
        info!(volume = name, id = record.id, unit = %record.unit, force, "volume deleted; the unit frees its space");
        Ok(record)
    }

    /// Attaches a volume to `host`: a new attachment with a fresh token,
    /// registered with the unit (`RegisterAttachment`, the token's SHA-256)
    /// before it is returned, so head nodes accept the token — and keep
    /// accepting it while this plane is down.
    pub async fn attach(&self, name: &str, host: &str) -> Result<AttachInfo, ApiError> {
        check_name("host", host)?;
        let _guard = self.mutations.lock().await;
        let record = self.live_volume(name).await?;
        if record.state != VolumeState::Available {
            return Err(ApiError::VolumeNotAvailable {
                name: name.to_owned(),
                state: record.state,
            });
        }
        let unit = self.unit(&record.unit)?;
        let token = AttachmentToken::random()
            .map_err(|e| ApiError::Internal(format!("cannot make a token: {e}")))?;
        let digest_hex: String = token.digest().iter().map(|b| format!("{b:02x}")).collect();
        let (id, host_owned) = (record.id, host.to_owned());
        let (record, attachment): (VolumeRecord, Attachment) = self
            .store(move |s| s.add_attachment(id, &host_owned, digest_hex, now_ms()))
            .await?;
        let sent = self
            .send(
                unit,
                Command::RegisterAttachment {
                    volume: record.id,
                    attachment: attachment.id,
                    token_digest: token.digest(),
                    host: host.to_owned(),
                    now_ms: attachment.created_at_ms,
                    ttl_ms: self.attachment_ttl_ms,
                },
            )
            .await;
        if !matches!(sent, Sent::Applied(_)) {
            // Not usable: forget it here, and make sure the unit does not
            // keep a credential nobody was given.
            if matches!(sent, Sent::Uncertain(_)) {
                let revoke = Command::RemoveAttachment {
                    volume: record.id,
                    attachment: attachment.id,
                };
                if let Sent::Uncertain(reason) | Sent::Unreachable(reason) =
                    self.send(unit, revoke).await
                {
                    warn!(volume = name, attachment = attachment.id, %reason, "could not revoke an attachment of unknown outcome");
                }
            }
            let mut kept = record.clone();
            kept.attachments.retain(|a| a.id != attachment.id);
            self.store(move |s| s.put_volume(&kept)).await?;
            return Err(self.not_applied(&record, sent).await);
        }
        info!(volume = name, host, attachment = attachment.id, "attached");
        Ok(AttachInfo {
            attachment_id: attachment.id,
            token: token.to_hex(),
            host: attachment.host,
            volume: record.spec.name.clone(),
            volume_id: record.id,
            size_bytes: record.spec.size_bytes,
            partition_size_bytes: record.spec.partition_size_bytes,
            erasure_code: record.spec.erasure_code.to_string(),
            unit: record.unit.clone(),
            head_nodes: unit.head_nodes(),
            unit_ca_pem: unit.host_ca_pem.clone(),
            ttl_ms: self.attachment_ttl_ms,
            expires_at_ms: self
                .attachment_ttl_ms
                .map(|ttl| attachment.created_at_ms.saturating_add(ttl)),
        })
    }

    /// Detaches: the unit revokes the attachment (`RemoveAttachment`;
    /// head nodes refuse its token from then on), then the record drops
    /// it. An unreachable unit leaves the attachment in place (and valid).
    /// With `only_host` (a host's attach-scoped token) an attachment of
    /// another host is refused (403).
    pub async fn detach(
        &self,
        name: &str,
        attachment: &str,
        only_host: Option<&str>,
    ) -> Result<VolumeRecord, ApiError> {
        let not_found = || ApiError::AttachmentNotFound {
            volume: name.to_owned(),
            attachment: attachment.to_owned(),
        };
        let id: u64 = attachment.parse().map_err(|_| not_found())?;
        let _guard = self.mutations.lock().await;
        let mut record = self.live_volume(name).await?;
        let Some(listed) = record.attachments.iter().find(|a| a.id == id) else {
            return Err(not_found());
        };
        if only_host.is_some_and(|host| host != listed.host) {
            return Err(ApiError::Forbidden);
        }
        let unit = self.unit(&record.unit)?;
        let sent = self
            .send(
                unit,
                Command::RemoveAttachment {
                    volume: record.id,
                    attachment: id,
                },
            )
            .await;
        match sent {
            Sent::Applied(_)
            | Sent::Refused(
                CommandError::UnknownAttachment { .. }
                | CommandError::UnknownVolume { .. }
                | CommandError::VolumeDeleting { .. },
            ) => {}
            other => return Err(self.not_applied(&record, other).await),
        }
        record.attachments.retain(|a| a.id != id);
        let stored = record.clone();
        self.store(move |s| s.put_volume(&stored)).await?;
        info!(
            volume = name,
            attachment = id,
            "detached; the unit revoked its token"
        );
        Ok(record)
    }

    /// Refreshes the store-derived gauges (called at every scrape).
    pub async fn refresh_gauges(&self) -> Result<(), ApiError> {
        let volumes = self.store(|s| s.volumes()).await?;
        for state in VolumeState::ALL {
            let count = volumes.iter().filter(|v| v.state == state).count();
            self.metrics
                .volumes
                .get_or_create(&StateLabels {
                    state: state.name(),
                })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        let reachable = self
            .units()
            .await?
            .iter()
            .filter(|(u, _)| u.reachable)
            .count();
        self.metrics
            .units_reachable
            .set(i64::try_from(reachable).unwrap_or(i64::MAX));
        Ok(())
    }
}

fn mark_unreachable(record: &mut UnitRecord, reason: String) {
    record.reachable = false;
    record.health = "unreachable".into();
    record.last_error = Some(reason);
}

/// Fills a unit record from the LCP's status.
fn apply_status(record: &mut UnitRecord, status: &UnitStatus) {
    let mut allocatable_bytes = 0u64;
    let mut all_up = true;
    for sled in &status.sleds {
        all_up &= sled.health == Health::Up;
        for device in &sled.devices {
            all_up &= device.health == Health::Up;
            if sled.health == Health::Up && device.health == Health::Up {
                let free = u64::try_from(device.free_columns).unwrap_or(u64::MAX);
                allocatable_bytes =
                    allocatable_bytes.saturating_add(free.saturating_mul(sled.column_size_bytes));
            }
        }
    }
    record.head_nodes = status.nodes.len();
    record.head_nodes_up = status
        .nodes
        .iter()
        .filter(|n| n.health == Health::Up)
        .count();
    record.sleds = status.sleds.len();
    record.sleds_up = status
        .sleds
        .iter()
        .filter(|s| s.health == Health::Up)
        .count();
    all_up &= record.head_nodes_up == record.head_nodes;
    record.health = if all_up { "ok" } else { "degraded" }.into();
    record.capacity = Capacity {
        free_bytes: status.capacity.free_bytes,
        used_bytes: status.capacity.used_bytes,
        allocatable_bytes,
    };
    record.lcp_volumes = status.volumes;
}
