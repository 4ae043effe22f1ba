//! [`VolumeClient`]: routing, retries and end-to-end checks for one volume
//! (design in the crate docs).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use local_control_plane::state::PartitionMap;
use local_control_plane::LcpClient;
use proto::link::{LinkConfig, LinkError, LinkMetrics, PathState, PeerLink};
use proto::volume::{
    chunk_crcs, make_write_id, verify_chunk_crcs, AttachmentCredential, CrcError, HostError,
    HostOp, HostReply, HostRequest, NodeHint, WriteId, MAX_HOST_IO_BYTES, SECTOR_BYTES,
};
use proto::Message;

use crate::error::ClientError;
use crate::metrics::ClientMetrics;
use crate::split::{split_range, Piece};

/// Why a map could not be had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapSourceError {
    /// The control plane does not know the volume (deleted): permanent.
    UnknownVolume,
    /// The attachment credential is not valid (revoked, deleted, wrong
    /// token): permanent.
    Unauthorized,
    /// The head node `node`'s host port requires TLS and this client has
    /// none (`proto::link::TLS_REQUIRED`): permanent until configured.
    TlsRequired { node: String },
    /// Anything else (no leader yet, unreachable, ...): worth retrying.
    Other(String),
}

impl std::fmt::Display for MapSourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MapSourceError::UnknownVolume => f.write_str("unknown volume"),
            MapSourceError::Unauthorized => f.write_str("attachment not authorised"),
            MapSourceError::TlsRequired { node } => {
                write!(f, "{node}: {}", proto::link::TLS_REQUIRED)
            }
            MapSourceError::Other(reason) => f.write_str(reason),
        }
    }
}

/// Where the client learns a volume's partition map.
pub trait MapSource: Send + Sync + 'static {
    /// The current (linearizable) partition map of `volume`.
    fn partition_map(&self, volume: u64) -> BoxFuture<'_, Result<PartitionMap, MapSourceError>>;
}

impl MapSource for LcpClient {
    fn partition_map(&self, volume: u64) -> BoxFuture<'_, Result<PartitionMap, MapSourceError>> {
        Box::pin(async move {
            LcpClient::partition_map(self, volume)
                .await
                .map_err(|error| match error {
                    local_control_plane::client::ClientError::Lcp(
                        local_control_plane::client::LcpError::UnknownVolume { .. },
                    ) => MapSourceError::UnknownVolume,
                    other => MapSourceError::Other(other.to_string()),
                })
        })
    }
}

/// Tuning of a [`VolumeClient`].
///
/// The defaults are tuned for failover: a primary that dies is replaced
/// within about a second, and the host should see no more than that. The
/// retry pause stops doubling at 100 ms (a 1 s cap could add most of a
/// second after the new primary is ready), and the links give up on a
/// dead head node quickly (connect 300 ms, probes every 200 ms).
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Longest wait for one answer to one request, both paths included
    /// (default 13 s: above the link's 6 s per path twice, and the head
    /// node's 5 s replica timeout, so a write is not resent while its first
    /// attempt may still be acknowledged).
    pub request_timeout: Duration,
    /// How long one request keeps being retried across a failover
    /// (unreachable primary, `Unavailable`, stale map) before it fails
    /// (default 120 s).
    pub failover_timeout: Duration,
    /// Most attempts of one request within `failover_timeout` (default
    /// 5000: a bound on the loop, `failover_timeout` is the real limit).
    pub max_attempts: u32,
    /// First pause between retries; doubles up to `retry_backoff_max`
    /// (defaults 10 ms and 100 ms).
    pub retry_backoff_initial: Duration,
    pub retry_backoff_max: Duration,
    /// Pieces of one call in flight at once (default 32).
    pub max_concurrent_pieces: usize,
    /// Per-head-node transport (both networks, path failover).
    pub link: LinkConfig,
    /// Where retries, failover pauses and map refreshes are counted
    /// (default: nowhere; the attach agent registers them).
    pub metrics: ClientMetrics,
    /// Serve snapshot `id` of the volume instead of the live volume (a
    /// read-only export: reads go as [`HostOp::ReadSnapshot`] under the
    /// volume's attachment credential; writes, trims and write-zeroes
    /// fail with [`ClientError::ReadOnly`] before anything is sent).
    /// Default `None`.
    pub snapshot: Option<u64>,
}

impl Default for ClientConfig {
    fn default() -> ClientConfig {
        ClientConfig {
            request_timeout: Duration::from_secs(13),
            failover_timeout: Duration::from_secs(120),
            max_attempts: 5000,
            retry_backoff_initial: Duration::from_millis(10),
            retry_backoff_max: Duration::from_millis(100),
            max_concurrent_pieces: 32,
            link: LinkConfig {
                connect_timeout: Duration::from_millis(300),
                request_timeout: Duration::from_secs(6),
                probe_interval: Duration::from_millis(200),
                probe_timeout: Duration::from_millis(300),
                failures_before_down: 2,
                auth: None,
                tls: None,
            },
            metrics: ClientMetrics::unregistered(),
            snapshot: None,
        }
    }
}

/// How long map refreshes may fail before [`VolumeClient::health`] calls
/// the client unusable (a Raft election takes a few seconds; the agent
/// refreshes every 5 s).
const MAP_ERROR_GRACE: Duration = Duration::from_secs(10);

/// A partition's primary as the client routes to it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    node: String,
    address_a: SocketAddr,
    address_b: SocketAddr,
    epoch: u64,
}

/// The validated map plus NotPrimary hints the map does not show yet.
#[derive(Debug)]
struct Routing {
    map: Arc<PartitionMap>,
    /// Bumped on every map install (single-flight refresh).
    generation: u64,
    targets: HashMap<u32, Target>,
    /// Partition → hinted primary, valid while the map still names the
    /// node that refused (same node, same epoch).
    hints: HashMap<u32, (Target, Target)>,
}

/// Where one attempt goes.
#[derive(Debug, Clone)]
struct Route {
    partition: u32,
    target: Target,
    link: Arc<PeerLink>,
    generation: u64,
    via_hint: bool,
}

/// Client of one volume (see the crate docs). Cheap to clone; clones share
/// links and the map.
#[derive(Clone)]
pub struct VolumeClient {
    inner: Arc<Inner>,
}

struct Inner {
    volume: u64,
    /// Sent with every request; head nodes check it.
    credential: AttachmentCredential,
    config: ClientConfig,
    source: Arc<dyn MapSource>,
    routing: RwLock<Routing>,
    refresh: tokio::sync::Mutex<()>,
    links: Mutex<HashMap<String, Arc<PeerLink>>>,
    metrics: LinkMetrics,
    closed: AtomicBool,
    /// Random per-client id: the high 32 bits of every [`WriteId`].
    client_id: u32,
    /// Low bits of the next [`WriteId`].
    next_write: AtomicU64,
    /// The last map refresh failed: when (first of a run) and why.
    map_error: Mutex<Option<(Instant, String)>>,
}

/// What `/health` of the attach agent reports ([`VolumeClient::health`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ClientHealth {
    /// `None` when usable; else why not.
    pub unusable: Option<String>,
    pub volume: u64,
    pub size_bytes: u64,
    pub map_generation: u64,
    pub partitions: usize,
    /// Requests being retried right now (a failover in progress).
    pub requests_retrying: i64,
    /// The partitions' primaries and their paths.
    pub primaries: Vec<PrimaryHealth>,
    /// The last map refresh failed, this long ago, for this reason.
    pub map_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PrimaryHealth {
    pub node: String,
    pub partitions: Vec<u32>,
    /// `connected` (a path up), `down` (both paths down), `not_connected`
    /// (no request sent yet, or no probe answered yet).
    pub state: &'static str,
}

/// A request counted as retrying in [`ClientMetrics`] from its first
/// retry until it ends (or its future is dropped).
struct PauseGuard<'a> {
    metrics: &'a ClientMetrics,
    started: Instant,
    retrying: bool,
}

impl PauseGuard<'_> {
    fn retry(&mut self) {
        self.metrics.retried();
        if !self.retrying {
            self.retrying = true;
            self.metrics.retrying_started();
        }
    }
}

impl Drop for PauseGuard<'_> {
    fn drop(&mut self) {
        if self.retrying {
            self.metrics.pause_ended(self.started.elapsed());
        }
    }
}

/// A random 32-bit client id (std's per-process random hash keys mixed
/// with the time, so two clients of one process differ too).
fn random_client_id() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    hasher.write_u128(nanos);
    hasher.write_u32(std::process::id());
    let hash = hasher.finish();
    (hash ^ (hash >> 32)) as u32
}

impl std::fmt::Debug for VolumeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeClient")
            .field("volume", &self.inner.volume)
            .field("generation", &read_lock(&self.inner.routing).generation)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// Fetches the map of `volume`, checks it and indexes its partitions.
async fn fetch_map(
    source: &dyn MapSource,
    volume: u64,
    attachment: u64,
) -> Result<(PartitionMap, HashMap<u32, Target>), ClientError> {
    let map = source
        .partition_map(volume)
        .await
        .map_err(|error| match error {
            MapSourceError::UnknownVolume => ClientError::VolumeGone { volume },
            MapSourceError::TlsRequired { node } => ClientError::TlsRequired { volume, node },
            MapSourceError::Unauthorized => ClientError::Unauthorized {
                volume,
                attachment,
                node: "the partition map's head node".into(),
            },
            MapSourceError::Other(reason) => ClientError::Map { volume, reason },
        })?;
    let targets = validate_map(volume, &map)?;
    Ok((map, targets))
}

/// Check a map and index its partitions.
fn validate_map(volume: u64, map: &PartitionMap) -> Result<HashMap<u32, Target>, ClientError> {
    let bad = |reason: String| ClientError::Map { volume, reason };
    if map.volume != volume {
        return Err(bad(format!("map is for volume {}", map.volume)));
    }
    if map.partition_size_bytes == 0 || map.partition_size_bytes % SECTOR_BYTES != 0 {
        return Err(bad(format!(
            "partition size {} is not a positive multiple of {SECTOR_BYTES}",
            map.partition_size_bytes
        )));
    }
    let count = map.size_bytes.div_ceil(map.partition_size_bytes);
    let mut targets = HashMap::with_capacity(map.partitions.len());
    for entry in &map.partitions {
        let parse = |address: &str| {
            address.parse::<SocketAddr>().map_err(|error| {
                bad(format!(
                    "partition {}: address {address:?}: {error}",
                    entry.index
                ))
            })
        };
        let target = Target {
            node: entry.primary.id.0.clone(),
            address_a: parse(&entry.primary.address_a)?,
            address_b: parse(&entry.primary.address_b)?,
            epoch: entry.epoch,
        };
        if targets.insert(entry.index, target).is_some() {
            return Err(bad(format!("partition {} listed twice", entry.index)));
        }
    }
    for index in 0..count {
        let present = u32::try_from(index).is_ok_and(|index| targets.contains_key(&index));
        if !present {
            return Err(bad(format!("partition {index} missing ({count} expected)")));
        }
    }
    Ok(targets)
}

/// One request's retry state.
#[derive(Debug)]
struct Retry {
    started: Instant,
    attempts: u32,
    backoff: Duration,
    checksum_failures: u32,
    last_error: String,
}

/// What the loop does after an attempt that did not finish the request.
enum Next {
    /// Send again at once (fresh route, or a checksum retry).
    Now,
    /// Back off first.
    Wait,
}

impl VolumeClient {
    /// Fetch `volume`'s partition map from the local control plane and
    /// get ready to serve as attachment `credential` (from the zonal
    /// attach, or [`crate::register_attachment`]). Links to head nodes
    /// connect lazily.
    pub async fn connect(
        lcp: LcpClient,
        volume: u64,
        credential: AttachmentCredential,
        config: ClientConfig,
    ) -> Result<VolumeClient, ClientError> {
        VolumeClient::connect_with_source(Arc::new(lcp), volume, credential, config).await
    }

    /// Serve as attachment `credential` of `volume` through the head nodes'
    /// host ports (`endpoints`): what a host uses (SECURITY.md). Maps come
    /// from [`crate::HostMapSource`]; I/O goes to the host ports they name.
    pub async fn connect_host(
        endpoints: &[crate::HostEndpoint],
        volume: u64,
        credential: AttachmentCredential,
        config: ClientConfig,
    ) -> Result<VolumeClient, ClientError> {
        let source = crate::HostMapSource::new(endpoints, credential, config.link.clone());
        VolumeClient::connect_with_source(Arc::new(source), volume, credential, config).await
    }

    /// [`VolumeClient::connect`] with any map source.
    pub async fn connect_with_source(
        source: Arc<dyn MapSource>,
        volume: u64,
        credential: AttachmentCredential,
        config: ClientConfig,
    ) -> Result<VolumeClient, ClientError> {
        let (map, targets) = fetch_map(source.as_ref(), volume, credential.attachment).await?;
        Ok(VolumeClient {
            inner: Arc::new(Inner {
                volume,
                credential,
                config,
                source,
                routing: RwLock::new(Routing {
                    map: Arc::new(map),
                    generation: 1,
                    targets,
                    hints: HashMap::new(),
                }),
                refresh: tokio::sync::Mutex::new(()),
                links: Mutex::new(HashMap::new()),
                metrics: LinkMetrics::unregistered(),
                closed: AtomicBool::new(false),
                client_id: random_client_id(),
                next_write: AtomicU64::new(1),
                map_error: Mutex::new(None),
            }),
        })
    }

    pub fn volume(&self) -> u64 {
        self.inner.volume
    }

    /// Volume size as of the current map.
    pub fn size_bytes(&self) -> u64 {
        read_lock(&self.inner.routing).map.size_bytes
    }

    /// The current partition map.
    pub fn partition_map(&self) -> Arc<PartitionMap> {
        read_lock(&self.inner.routing).map.clone()
    }

    /// Whether the client can serve: not closed, the last map refresh
    /// worked (or failed for under `MAP_ERROR_GRACE`), and no partition's
    /// primary is down on both networks. Links connect lazily, so a
    /// primary no request has reached yet counts as usable.
    pub fn health(&self) -> ClientHealth {
        let (map, generation, targets) = {
            let routing = read_lock(&self.inner.routing);
            (
                routing.map.clone(),
                routing.generation,
                routing.targets.clone(),
            )
        };
        let mut by_node: std::collections::BTreeMap<String, Vec<u32>> = Default::default();
        for (partition, target) in &targets {
            by_node
                .entry(target.node.clone())
                .or_default()
                .push(*partition);
        }
        let links = lock(&self.inner.links).clone();
        let mut unusable = None;
        let primaries: Vec<PrimaryHealth> = by_node
            .into_iter()
            .map(|(node, mut partitions)| {
                partitions.sort_unstable();
                let state = match links.get(&node) {
                    None => "not_connected",
                    Some(link) => {
                        let paths = link.paths();
                        if paths.iter().any(|p| p.state == PathState::Up) {
                            "connected"
                        } else if paths.iter().all(|p| p.state == PathState::Down) {
                            "down"
                        } else {
                            "not_connected"
                        }
                    }
                };
                if state == "down" && unusable.is_none() {
                    unusable = Some(format!(
                        "primary {node} of partitions {partitions:?} is down on both networks"
                    ));
                }
                PrimaryHealth {
                    node,
                    partitions,
                    state,
                }
            })
            .collect();
        let map_error = lock(&self.inner.map_error).clone();
        if let Some((since, error)) = &map_error {
            if since.elapsed() >= MAP_ERROR_GRACE {
                unusable = Some(format!(
                    "no partition map for {} s: {error}",
                    since.elapsed().as_secs()
                ));
            }
        }
        if self.is_closed() {
            unusable = Some("the volume client is closed".to_owned());
        }
        ClientHealth {
            unusable,
            volume: self.inner.volume,
            size_bytes: map.size_bytes,
            map_generation: generation,
            partitions: targets.len(),
            requests_retrying: self.inner.config.metrics.retrying(),
            primaries,
            map_error: map_error.map(|(since, error)| {
                format!("{error} (since {} ms)", since.elapsed().as_millis())
            }),
        }
    }

    /// The snapshot this client serves (`None`: the live volume).
    pub fn snapshot(&self) -> Option<u64> {
        self.inner.config.snapshot
    }

    fn check_writable(&self) -> Result<(), ClientError> {
        match self.inner.config.snapshot {
            None => Ok(()),
            Some(snapshot) => Err(ClientError::ReadOnly {
                volume: self.inner.volume,
                snapshot,
            }),
        }
    }

    /// The attachment this client acts for.
    pub fn attachment(&self) -> u64 {
        self.inner.credential.attachment
    }

    /// The credential sent with every request (tests that talk to head
    /// nodes directly).
    pub fn credential(&self) -> AttachmentCredential {
        self.inner.credential
    }

    /// Fetch the map again now (normally done on demand, and when a
    /// request reaches past the end of the volume as the map knows it: a
    /// grown volume is seen by the next request that needs it).
    pub async fn refresh_map(&self) -> Result<(), ClientError> {
        let generation = read_lock(&self.inner.routing).generation;
        self.inner.refresh(generation).await
    }

    /// Read `len` bytes at `offset_bytes` (both multiples of 512). Every
    /// returned byte passed its CRC-32C.
    pub async fn read(&self, offset_bytes: u64, len: u64) -> Result<Bytes, ClientError> {
        let pieces = self.pieces_fresh(offset_bytes, len).await?;
        let inner = &self.inner;
        let parts: Vec<Bytes> = futures::stream::iter(pieces)
            .map(|piece| async move {
                let op = match inner.config.snapshot {
                    None => HostOp::Read {
                        offset_bytes: piece.offset_bytes,
                        len_bytes: piece.len,
                    },
                    Some(snapshot) => HostOp::ReadSnapshot {
                        snapshot,
                        offset_bytes: piece.offset_bytes,
                        len_bytes: piece.len,
                    },
                };
                inner
                    .execute(piece.partition, op)
                    .await
                    .map(Option::unwrap_or_default)
            })
            .buffered(inner.config.max_concurrent_pieces.max(1))
            .try_collect()
            .await?;
        if parts.len() == 1 {
            return Ok(parts.into_iter().next().unwrap_or_default());
        }
        let mut out = BytesMut::with_capacity(usize::try_from(len).unwrap_or(0));
        for part in parts {
            out.extend_from_slice(&part);
        }
        Ok(out.freeze())
    }

    /// Write `data` at `offset_bytes` (offset and length multiples of 512).
    /// `fua`: forced unit access (every acknowledged write is durable on
    /// two head nodes anyway).
    pub async fn write(
        &self,
        offset_bytes: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<(), ClientError> {
        self.check_writable()?;
        let pieces = self.pieces_fresh(offset_bytes, data.len() as u64).await?;
        self.for_each_piece(pieces, |piece| {
            let start = usize::try_from(piece.request_offset).unwrap_or(usize::MAX);
            let slice = data.slice(start..start + piece.len as usize);
            HostOp::Write {
                write_id: self.inner.next_write_id(),
                offset_bytes: piece.offset_bytes,
                crcs: chunk_crcs(&slice),
                data: slice,
                fua,
            }
        })
        .await
    }

    /// The range reads back as zeros (a hint to the device to free it).
    pub async fn trim(&self, offset_bytes: u64, len: u64) -> Result<(), ClientError> {
        self.unmap(offset_bytes, len, false).await
    }

    /// The range reads back as zeros.
    pub async fn write_zeroes(&self, offset_bytes: u64, len: u64) -> Result<(), ClientError> {
        self.unmap(offset_bytes, len, true).await
    }

    /// Every write acknowledged before is durable: a Flush to every
    /// partition's primary.
    pub async fn flush(&self) -> Result<(), ClientError> {
        let mut partitions: Vec<u32> = read_lock(&self.inner.routing)
            .targets
            .keys()
            .copied()
            .collect();
        partitions.sort_unstable();
        let inner = &self.inner;
        futures::stream::iter(partitions)
            .map(|partition| async move { inner.execute(partition, HostOp::Flush).await.map(drop) })
            .buffer_unordered(inner.config.max_concurrent_pieces.max(1))
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    /// Close every link; later calls fail with [`ClientError::Closed`].
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        for link in lock(&self.inner.links).drain().map(|(_, link)| link) {
            link.close();
        }
    }

    /// Trims the range, or with `zeroes` writes zeroes over it.
    async fn unmap(&self, offset_bytes: u64, len: u64, zeroes: bool) -> Result<(), ClientError> {
        self.check_writable()?;
        let pieces = self.pieces_fresh(offset_bytes, len).await?;
        self.for_each_piece(pieces, |piece| {
            let write_id = self.inner.next_write_id();
            let (offset_bytes, len_bytes) = (piece.offset_bytes, piece.len);
            if zeroes {
                HostOp::WriteZeroes {
                    write_id,
                    offset_bytes,
                    len_bytes,
                }
            } else {
                HostOp::Trim {
                    write_id,
                    offset_bytes,
                    len_bytes,
                }
            }
        })
        .await
    }

    /// Executes `op(piece)` for every piece, at most `max_concurrent_pieces`
    /// at once; done when every one is. `op` runs as its piece is started,
    /// so a write id it takes is the piece's for every resend in `execute`.
    async fn for_each_piece(
        &self,
        pieces: Vec<Piece>,
        op: impl Fn(&Piece) -> HostOp,
    ) -> Result<(), ClientError> {
        let inner = &self.inner;
        let op = &op;
        futures::stream::iter(pieces)
            .map(|piece| async move { inner.execute(piece.partition, op(&piece)).await.map(drop) })
            .buffer_unordered(inner.config.max_concurrent_pieces.max(1))
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// [`Self::pieces`]; a range past the end of the volume as the map
    /// knows it first refreshes the map once (the volume may have grown).
    async fn pieces_fresh(&self, offset_bytes: u64, len: u64) -> Result<Vec<Piece>, ClientError> {
        match self.pieces(offset_bytes, len) {
            Err(ClientError::OutOfRange { .. }) => {
                if let Err(error) = self.refresh_map().await {
                    tracing::debug!(%error, "map refresh for a range past the end failed");
                }
                self.pieces(offset_bytes, len)
            }
            other => other,
        }
    }

    /// Check the range against alignment and the volume, then split it.
    fn pieces(&self, offset_bytes: u64, len: u64) -> Result<Vec<Piece>, ClientError> {
        let volume = self.inner.volume;
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(ClientError::Closed { volume });
        }
        if offset_bytes % SECTOR_BYTES != 0 || len % SECTOR_BYTES != 0 {
            return Err(ClientError::Misaligned {
                volume,
                offset_bytes,
                len,
            });
        }
        let (size_bytes, partition_size_bytes) = {
            let routing = read_lock(&self.inner.routing);
            (routing.map.size_bytes, routing.map.partition_size_bytes)
        };
        let out_of_range = ClientError::OutOfRange {
            volume,
            offset_bytes,
            len,
            size_bytes,
        };
        match offset_bytes.checked_add(len) {
            Some(end) if end <= size_bytes => {}
            _ => return Err(out_of_range),
        }
        split_range(offset_bytes, len, partition_size_bytes, MAX_HOST_IO_BYTES).ok_or(out_of_range)
    }
}

impl Inner {
    /// A fresh [`WriteId`] for one logical piece (module docs of
    /// [`proto::volume`]): the caller reuses it on every resend.
    fn next_write_id(&self) -> WriteId {
        make_write_id(
            self.client_id,
            self.next_write.fetch_add(1, Ordering::Relaxed),
        )
    }

    /// Send one piece until it succeeds or fails for good (module docs).
    /// Returns the verified data of a read, `None` otherwise.
    async fn execute(&self, partition: u32, op: HostOp) -> Result<Option<Bytes>, ClientError> {
        let volume = self.volume;
        let offset_bytes = op.range().map_or(0, |(offset, _)| offset);
        let name = op.name();
        let mut retry = Retry {
            started: Instant::now(),
            attempts: 0,
            backoff: self.config.retry_backoff_initial,
            checksum_failures: 0,
            last_error: String::new(),
        };
        let deadline = retry.started + self.config.failover_timeout;
        let mut pause = PauseGuard {
            metrics: &self.config.metrics,
            started: retry.started,
            retrying: false,
        };
        loop {
            if self.closed.load(Ordering::Acquire) {
                return Err(ClientError::Closed { volume });
            }
            retry.attempts += 1;
            if retry.attempts > 1 {
                pause.retry();
            }
            let next = match self.route(partition) {
                Err(error) => {
                    retry.last_error = error.to_string();
                    let generation = read_lock(&self.routing).generation;
                    match self.refresh(generation).await {
                        Err(gone @ ClientError::VolumeGone { .. }) => return Err(gone),
                        Err(error) => retry.last_error = error.to_string(),
                        Ok(()) => {}
                    }
                    Next::Wait
                }
                Ok(route) => match self.attempt(partition, &op, &route, &mut retry).await? {
                    Ok(data) => return Ok(data),
                    Err(next) => next,
                },
            };
            let now = Instant::now();
            if retry.attempts >= self.config.max_attempts || now >= deadline {
                return Err(ClientError::Unavailable {
                    volume,
                    partition,
                    op: name,
                    offset_bytes,
                    attempts: retry.attempts,
                    elapsed_ms: u64::try_from(retry.started.elapsed().as_millis())
                        .unwrap_or(u64::MAX),
                    last_error: retry.last_error,
                });
            }
            if let Next::Wait = next {
                tokio::time::sleep(retry.backoff.min(deadline - now)).await;
                retry.backoff = (retry.backoff * 2).min(self.config.retry_backoff_max);
            }
        }
    }

    /// One attempt. `Ok(Ok(data))`: done; `Ok(Err(next))`: retry;
    /// `Err`: fail the request.
    async fn attempt(
        &self,
        partition: u32,
        op: &HostOp,
        route: &Route,
        retry: &mut Retry,
    ) -> Result<Result<Option<Bytes>, Next>, ClientError> {
        let volume = self.volume;
        let node = &route.target.node;
        let offset_bytes = op.range().map_or(0, |(offset, _)| offset);
        let request = Message::Host(HostRequest {
            volume,
            partition,
            epoch: route.target.epoch,
            credential: self.credential,
            op: op.clone(),
        });
        let protocol = |reason: String| ClientError::Protocol {
            volume,
            partition,
            node: node.clone(),
            reason,
        };
        let checksum = |retry: &mut Retry, at: u64| {
            retry.checksum_failures += 1;
            retry.last_error = format!("{node}: checksum mismatch at {at}");
            if retry.checksum_failures > 1 {
                Err(ClientError::ChecksumMismatch {
                    volume,
                    partition,
                    node: node.clone(),
                    op: op.name(),
                    offset_bytes: at,
                })
            } else {
                Ok(Err(Next::Now))
            }
        };
        let answer =
            tokio::time::timeout(self.config.request_timeout, route.link.call(request, true)).await;
        let reply = match answer {
            Err(_) => {
                retry.last_error = format!(
                    "{node}: no answer within {} ms",
                    self.config.request_timeout.as_millis()
                );
                self.after_link_failure(route, retry).await?;
                return Ok(Err(Next::Wait));
            }
            Ok(Err(LinkError::Protocol { reason, .. })) => return Err(protocol(reason)),
            Ok(Err(LinkError::TlsRequired { peer })) => {
                return Err(ClientError::TlsRequired { volume, node: peer })
            }
            Ok(Err(error)) => {
                // Unreachable, Timeout, or a link closed under us (replaced):
                // the primary may be failing over.
                retry.last_error = format!("{node}: {error}");
                self.after_link_failure(route, retry).await?;
                return Ok(Err(Next::Wait));
            }
            Ok(Ok(Message::HostReply(reply))) => reply,
            Ok(Ok(other)) => {
                return Err(protocol(format!(
                    "answer of kind {:#06x} to a host request",
                    other.kind()
                )))
            }
        };
        match reply {
            HostReply::Data { data, crcs } => {
                let (HostOp::Read { len_bytes: len, .. }
                | HostOp::ReadSnapshot { len_bytes: len, .. }) = op
                else {
                    return Err(protocol(format!("data reply to a {}", op.name())));
                };
                if data.len() != *len as usize {
                    return Err(protocol(format!(
                        "read of {len} bytes answered with {} bytes",
                        data.len()
                    )));
                }
                match verify_chunk_crcs(&data, &crcs) {
                    Ok(()) => Ok(Ok(Some(data))),
                    Err(CrcError::Mismatch {
                        offset_bytes: at, ..
                    }) => checksum(retry, offset_bytes + at),
                    Err(CrcError::WrongCount { .. }) => checksum(retry, offset_bytes),
                }
            }
            HostReply::Done => {
                if matches!(op, HostOp::Read { .. } | HostOp::ReadSnapshot { .. }) {
                    return Err(protocol("done reply to a read".into()));
                }
                Ok(Ok(None))
            }
            HostReply::Cut { .. } | HostReply::Diff { .. } | HostReply::SnapshotUsage { .. } => {
                Err(protocol(format!("snapshot reply to a {}", op.name())))
            }
            HostReply::Error(error) if error.needs_map_refresh() => {
                retry.last_error = format!("{node}: {error}");
                let hint = match &error {
                    HostError::NotPrimary { hint } => hint.clone(),
                    _ => None,
                };
                let refreshed = self.after_refusal(route, hint).await;
                if let Err(error) = refreshed {
                    retry.last_error = error.to_string();
                    return Ok(Err(Next::Wait));
                }
                // A stale map right after a refresh: the control plane is
                // mid-failover; do not spin.
                Ok(Err(if retry.attempts > 1 {
                    Next::Wait
                } else {
                    Next::Now
                }))
            }
            HostReply::Error(HostError::ChecksumMismatch { offset_bytes: at }) => {
                checksum(retry, at)
            }
            // Never retried: the attachment was revoked (or never valid).
            HostReply::Error(HostError::Unauthorized { attachment }) => {
                Err(ClientError::Unauthorized {
                    volume,
                    attachment,
                    node: node.clone(),
                })
            }
            HostReply::Error(error) if error.is_retryable() => {
                retry.last_error = format!("{node}: {error}");
                // A node that answers but cannot serve twice in a row (its
                // write log failed, it is being taken out of service) may
                // already have been replaced: read the map again rather
                // than wait out the failover timeout on it. The refresh is
                // single-flight, so a full log that keeps writers waiting
                // costs one map read per round, not one per request.
                if retry.attempts > 1 {
                    if let Err(error) = self.after_refusal(route, None).await {
                        retry.last_error = error.to_string();
                    }
                }
                Ok(Err(Next::Wait))
            }
            HostReply::Error(error) => Err(ClientError::Refused {
                volume,
                partition,
                node: node.clone(),
                op: op.name(),
                offset_bytes,
                error: Box::new(error),
            }),
        }
    }

    /// The primary did not answer: it may be failing over, so pick up a
    /// new map if the control plane has one (errors only noted).
    /// A deleted volume ends the retries at once (`VolumeGone`).
    async fn after_link_failure(
        &self,
        route: &Route,
        retry: &mut Retry,
    ) -> Result<(), ClientError> {
        if route.via_hint {
            self.drop_hint(route);
        }
        match self.refresh(route.generation).await {
            Err(gone @ ClientError::VolumeGone { .. }) => return Err(gone),
            Err(error) => retry.last_error = format!("{}; {error}", retry.last_error),
            Ok(()) => {}
        }
        Ok(())
    }

    /// `route`'s node refused as not (or no longer) primary.
    async fn after_refusal(
        &self,
        route: &Route,
        hint: Option<NodeHint>,
    ) -> Result<(), ClientError> {
        if route.via_hint {
            self.drop_hint(route);
        }
        self.refresh(route.generation).await?;
        let Some(hint) = hint else {
            return Ok(());
        };
        if hint.node_id == route.target.node {
            return Ok(());
        }
        let mut routing = write_lock(&self.routing);
        let partition = route.partition;
        // Follow the hint only while the map still names the refusing node:
        // a newer map wins over any hint.
        if let Some(mapped) = routing.targets.get(&partition) {
            if mapped.node == route.target.node && mapped.epoch == route.target.epoch {
                let hinted = Target {
                    node: hint.node_id,
                    address_a: hint.address_a,
                    address_b: hint.address_b,
                    epoch: mapped.epoch,
                };
                let mapped = mapped.clone();
                routing.hints.insert(partition, (mapped, hinted));
            }
        }
        Ok(())
    }

    fn drop_hint(&self, route: &Route) {
        write_lock(&self.routing)
            .hints
            .retain(|_, (_, hinted)| hinted.node != route.target.node);
    }

    /// The primary (or hinted primary) of `partition` and its link.
    fn route(&self, partition: u32) -> Result<Route, ClientError> {
        let (target, generation, via_hint) = {
            let routing = read_lock(&self.routing);
            let mapped = routing
                .targets
                .get(&partition)
                .ok_or_else(|| ClientError::Map {
                    volume: self.volume,
                    reason: format!("no partition {partition}"),
                })?;
            match routing.hints.get(&partition) {
                Some((hinted_over, hinted)) if hinted_over == mapped => {
                    (hinted.clone(), routing.generation, true)
                }
                _ => (mapped.clone(), routing.generation, false),
            }
        };
        let link = self.link(&target);
        Ok(Route {
            partition,
            target,
            link,
            generation,
            via_hint,
        })
    }

    /// The link to `target`'s node, made (or remade, if its addresses
    /// changed) on demand.
    fn link(&self, target: &Target) -> Arc<PeerLink> {
        let mut links = lock(&self.links);
        if let Some(link) = links.get(&target.node) {
            let [a, b] = link.paths();
            if a.address == target.address_a && b.address == target.address_b {
                return link.clone();
            }
            link.close();
        }
        let link = PeerLink::new(
            target.node.clone(),
            target.address_a,
            target.address_b,
            self.config.link.clone(),
            self.metrics.clone(),
        );
        links.insert(target.node.clone(), link.clone());
        link
    }

    /// Fetch and install a new map, unless one newer than `seen_generation`
    /// is already installed (another request refreshed meanwhile).
    async fn refresh(&self, seen_generation: u64) -> Result<(), ClientError> {
        let _single_flight = self.refresh.lock().await;
        if read_lock(&self.routing).generation != seen_generation {
            return Ok(());
        }
        let volume = self.volume;
        let fetched = fetch_map(self.source.as_ref(), volume, self.credential.attachment).await;
        self.config.metrics.map_refreshed(fetched.is_ok());
        let (map, targets) = match fetched {
            Ok(fetched) => {
                *lock(&self.map_error) = None;
                fetched
            }
            Err(error) => {
                let mut map_error = lock(&self.map_error);
                let since = map_error.as_ref().map_or_else(Instant::now, |(at, _)| *at);
                *map_error = Some((since, error.to_string()));
                return Err(error);
            }
        };
        let mut routing = write_lock(&self.routing);
        routing.generation += 1;
        routing.map = Arc::new(map);
        routing.targets = targets;
        let Routing { hints, targets, .. } = &mut *routing;
        hints.retain(|partition, (hinted_over, _)| targets.get(partition) == Some(hinted_over));
        tracing::debug!(
            volume,
            generation = routing.generation,
            "partition map refreshed"
        );
        Ok(())
    }
}
