//! Configuration of `rackblock head-node --config FILE`.
//!
//! A small TOML file; addresses and membership come from the rack file it
//! points to, so the two cannot disagree. Unknown fields are errors.
//! Example: `deploy/head-node.example.toml`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hardware::EngineChoice;
use local_control_plane::node::{
    DEFAULT_ELECTION_TIMEOUT_MAX_MS, DEFAULT_ELECTION_TIMEOUT_MIN_MS,
    DEFAULT_HEARTBEAT_INTERVAL_MS, DEFAULT_NODE_DOWN_AFTER_MS, DEFAULT_NODE_REFUSED_DOWN_AFTER_MS,
};
use local_control_plane::repair::DEFAULT_REPAIR_POLL_INTERVAL_MS;
use local_control_plane::state::MAX_LEASE_DURATION_MS;
use serde::Deserialize;

/// `rackblock head-node --config FILE`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadNodeConfig {
    /// The unit's rack description (`hardware::rack::Rack` TOML): the head
    /// nodes (Raft members, in order: the first 3, or 5, are voters), their
    /// addresses on networks A and B and admin addresses, and the sleds.
    pub rack_file: PathBuf,
    /// Which `[[head_node]]` of the rack file this process is.
    pub head_node_id: String,
    /// Local storage of this head node: the Raft log, vote and state
    /// machine live in `<data_dir>/raft`.
    pub data_dir: PathBuf,
    /// Raft heartbeat interval in milliseconds (default 100).
    #[serde(default)]
    pub heartbeat_interval_ms: Option<u64>,
    /// Lower bound of the randomised Raft election timeout in milliseconds
    /// (default 350). Must exceed the heartbeat interval. A dead leader
    /// costs this much before anyone can commit (renew leases, fail over).
    #[serde(default)]
    pub election_timeout_min_ms: Option<u64>,
    /// Upper bound of the election timeout in milliseconds (default 420).
    /// openraft 0.9 followers also refuse votes for this long after the
    /// last heartbeat (its leader lease), so it bounds how soon a dead
    /// leader is replaced even with `quick_election`.
    #[serde(default)]
    pub election_timeout_max_ms: Option<u64>,
    /// The leader declares a head node or sled Down when both of its
    /// network paths have been silent this long, in milliseconds (default
    /// 1500): a stalled process must not look dead. One path down is only
    /// a path fault.
    #[serde(default)]
    pub node_down_after_ms: Option<u64>,
    /// ... or when both paths have *refused* connections this long
    /// (nothing listens: the process is gone), in milliseconds (default
    /// 300). Must not exceed `node_down_after_ms`.
    #[serde(default)]
    pub node_refused_down_after_ms: Option<u64>,
    /// A Raft voter whose leader refuses connections on both networks (its
    /// process is gone) campaigns as soon as the other voters can grant
    /// it, instead of after the election timer (default true; see
    /// `local_control_plane::quick_election`).
    #[serde(default)]
    pub quick_election: Option<bool>,
    /// Bind network A here instead of the rack's `address_a`, e.g. behind
    /// a NAT or a test proxy that owns the rack address. Peers still dial
    /// the rack address.
    #[serde(default)]
    pub listen_a: Option<SocketAddr>,
    /// Bind network B here instead of the rack's `address_b` (as `listen_a`).
    #[serde(default)]
    pub listen_b: Option<SocketAddr>,
    /// Directory of the unit's credentials (`proto::auth`: this head node
    /// reads `unit.key` there). Default: `credentials/` beside the rack
    /// file. The head node does not start without them.
    #[serde(default)]
    pub credentials_dir: Option<PathBuf>,
    /// TLS on the host port: this certificate chain (PEM), for the host
    /// port's address (its IP as a SAN: the attach agent checks it against
    /// the address it dialled), signed by a CA the hosts trust (`rackblock
    /// attach --unit-ca`). Needs `host_tls_key`. Default: no TLS.
    #[serde(default)]
    pub host_tls_cert: Option<PathBuf>,
    /// The private key of `host_tls_cert` (PEM).
    #[serde(default)]
    pub host_tls_key: Option<PathBuf>,
    /// With `host_tls_cert`: close plain-TCP connections to the host port
    /// (counted in `rackblock_server_tls_handshake_failures_total{port="host",
    /// reason="plaintext"}`) instead of serving them as well as TLS ones
    /// (default false: both, for a unit whose hosts move to TLS one by one).
    #[serde(default)]
    pub host_tls_required: Option<bool>,
    /// Connections open at once on the host port (default 1024); one more
    /// is closed on accept (`rackblock_server_connections_refused_total{port="host"}`).
    #[serde(default)]
    pub host_max_connections: Option<usize>,
    /// Of those, from one IP address (default 256: every agent of a host
    /// shares it; an agent holds a few per head node).
    #[serde(default)]
    pub host_max_connections_per_peer: Option<usize>,
    /// Close a host-port connection that sent nothing and has nothing in
    /// flight for this long (default 60 000 ms; agents' links ping every
    /// path twice a second, so only abandoned or hostile connections idle).
    #[serde(default)]
    pub host_idle_timeout_ms: Option<u64>,
    /// The write log shared by every partition of this head node: a file
    /// (created zero-filled if absent, so that log syncs need no journal
    /// commit) or a block device. Default
    /// `<data_dir>/wal.img`.
    #[serde(default)]
    pub wal_path: Option<PathBuf>,
    /// Size of the write log file when it is created, in bytes (default
    /// 1 GiB). An existing log keeps its size.
    #[serde(default)]
    pub wal_size_bytes: Option<u64>,
    /// I/O engine of the write log: "auto" | "uring" | "sync". Default:
    /// `RACKBLOCK_IO_ENGINE`, else auto (io_uring, falling back to
    /// pread/pwrite).
    #[serde(default)]
    pub io_engine: Option<String>,
    /// Deadline of one write-log device operation, in milliseconds (default
    /// 5000). A write, sync or superblock update that takes longer fails
    /// the log like an I/O error does: the head node stops acknowledging,
    /// stops renewing its leases and reports itself Failed, so its
    /// partitions fail over (a hung log device is a failed one).
    #[serde(default)]
    pub wal_timeout_ms: Option<u64>,
    /// Memory for the payloads of the write log's unflushed records, in
    /// bytes (default 256 MiB): the flush and reads of blocks still in the
    /// log take them from memory instead of the log device. Beyond it the
    /// oldest are read back from the device. 0: always read back.
    #[serde(default)]
    pub wal_cache_bytes: Option<u64>,
    /// Read lease a primary asks the local control plane for, in
    /// milliseconds (default 600). Reads and writes are served only
    /// under a valid lease (ARCHITECTURE.md, Leases and failover); a dead
    /// primary's partitions are promoted only after it expired, so it
    /// bounds the failover pause. Leases are renewed through Raft: a leader change
    /// longer than ~90 % of the lease pauses the surviving primaries too.
    #[serde(default)]
    pub lease_duration_ms: Option<u64>,
    /// How often a primary renews its lease, in milliseconds (default
    /// 150). Must be at most half of `lease_duration_ms`.
    #[serde(default)]
    pub lease_renew_interval_ms: Option<u64>,
    /// A primary flushes its log-resident blocks to the sleds when its
    /// oldest unflushed write is this old, in milliseconds (default 5000).
    #[serde(default)]
    pub flush_age_ms: Option<u64>,
    /// ... or when the shared write log is fuller than this, in percent
    /// (default 25).
    #[serde(default)]
    pub flush_fill_percent: Option<u8>,
    /// Pause between garbage-collection passes of each primary, in
    /// milliseconds (default 30000).
    #[serde(default)]
    pub gc_interval_ms: Option<u64>,
    /// A primary writes an index checkpoint to the sleds after this many
    /// flush commits (default 32; 0: only by time). A new primary reads
    /// only the stripe summaries written after the newest checkpoint.
    #[serde(default)]
    pub checkpoint_every_flushes: Option<u64>,
    /// A host write of whole 4 KiB blocks of at least this many bytes goes
    /// straight to the sleds as full stripes, with only its index record in
    /// both logs (default 0: off, every write goes through the logs;
    /// 262144 is a full stripe at k = 4).
    #[serde(default)]
    pub direct_write_min_bytes: Option<u64>,
    /// ... or once this long passed since the last one and something was
    /// flushed since, in milliseconds (default 60000; 0: only by count;
    /// both 0: no checkpoints, recovery scans every summary).
    #[serde(default)]
    pub checkpoint_interval_ms: Option<u64>,
    /// How often the partition manager compares the local control plane's
    /// partition map with the partitions it hosts, in milliseconds
    /// (default 150).
    #[serde(default)]
    pub partition_poll_interval_ms: Option<u64>,
    /// The leader promotes a dead primary's partitions only this long
    /// after the lease recorded in the control plane expired, in
    /// milliseconds (default a tenth of `lease_duration_ms`): margin for
    /// the offset between the holder's and the leader's wall clocks (the
    /// holder already stops at 90 % of the lease by its own monotonic
    /// clock, which covers clock-rate differences). At most
    /// `lease_duration_ms`.
    #[serde(default)]
    pub failover_lease_margin_ms: Option<u64>,
    /// Per-unit rate limit on failover and re-mirroring role changes, per
    /// second (default 64).
    #[serde(default)]
    pub failover_max_changes_per_second: Option<usize>,
    /// Column repair tasks allowed at once across the unit (default 4).
    #[serde(default)]
    pub repair_max_concurrent: Option<usize>,
    /// Total column rebuild bandwidth of the unit, bytes per second,
    /// shared by the running tasks (default 200 MiB/s).
    #[serde(default)]
    pub repair_bytes_per_second: Option<u64>,
    /// A sled Down this long (milliseconds) is declared Failed and its
    /// columns are rebuilt elsewhere (default 60000).
    #[serde(default)]
    pub sled_failed_after_ms: Option<u64>,
    /// How often the head node looks for repair tasks of its primaries, and
    /// the leader's repair controller for work to admit, in milliseconds
    /// (default 500).
    #[serde(default)]
    pub repair_poll_interval_ms: Option<u64>,
    /// How often the leader reads the sleds' scrub reports for corrupt
    /// columns to rebuild, in milliseconds (default 10000).
    #[serde(default)]
    pub repair_scrub_poll_interval_ms: Option<u64>,
    /// Pace of a `volume rollback` at each primary, in bytes rewritten per
    /// second (the blocks that differ from the snapshot; unset: as fast
    /// as the partition takes the writes). A rollback is an offline
    /// operation (the volume takes no attachment until it is over), so
    /// the default does not hold it back; set it to leave the unit's
    /// bandwidth to the other volumes' hosts.
    #[serde(default)]
    pub rollback_bytes_per_second: Option<u64>,
    /// **Test only** (crash tests of the snapshot coordinator): a primary
    /// answers a snapshot cut this many milliseconds late, its cut taken
    /// and holding acknowledgements meanwhile, so that a test can kill it
    /// while a snapshot is being cut. Default 0; never set in production
    /// (every snapshot's pause grows by it).
    #[serde(default)]
    pub test_snapshot_cut_reply_delay_ms: Option<u64>,
}

/// Default size of a newly created write log file.
pub const DEFAULT_WAL_SIZE_BYTES: u64 = 1 << 30;
/// Default deadline of one write-log device operation.
pub const DEFAULT_WAL_TIMEOUT_MS: u64 = 5_000;
/// Default primary lease.
pub const DEFAULT_LEASE_DURATION_MS: u64 = 600;
/// Default lease renewal interval.
pub const DEFAULT_LEASE_RENEW_INTERVAL_MS: u64 = 150;
/// Default failover lease margin, as a divisor of the lease duration.
pub const DEFAULT_LEASE_MARGIN_DIVISOR: u32 = 10;
/// Default flush age trigger.
pub const DEFAULT_FLUSH_AGE_MS: u64 = 5_000;
pub const DEFAULT_CHECKPOINT_EVERY_FLUSHES: u64 = 32;
/// Default `direct_write_min_bytes` (0: full-stripe writes off until the
/// failover e2e tests pass with them on; 262144 is a full stripe at k = 4).
pub const DEFAULT_DIRECT_WRITE_MIN_BYTES: u64 = 0;
pub const DEFAULT_CHECKPOINT_INTERVAL_MS: u64 = 60_000;
/// Default flush fill trigger (early, so a write rarely finds the log full).
pub const DEFAULT_FLUSH_FILL_PERCENT: u8 = 25;
/// Default GC interval.
pub const DEFAULT_GC_INTERVAL_MS: u64 = 30_000;
/// Default partition-map poll interval.
pub const DEFAULT_PARTITION_POLL_INTERVAL_MS: u64 = 150;

pub use hardware::config::ConfigError;

impl HeadNodeConfig {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        hardware::config::load_toml(path, Self::validate)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.head_node_id.trim().is_empty() {
            return Err(ConfigError::Invalid {
                field: "head_node_id",
                reason: "must not be empty".into(),
            });
        }
        match (&self.host_tls_cert, &self.host_tls_key) {
            (Some(_), None) => {
                return Err(ConfigError::Invalid {
                    field: "host_tls_key",
                    reason: "host_tls_cert needs its key".into(),
                })
            }
            (None, Some(_)) => {
                return Err(ConfigError::Invalid {
                    field: "host_tls_cert",
                    reason: "host_tls_key without a certificate".into(),
                })
            }
            _ => {}
        }
        if self.host_tls_required() && self.host_tls_cert.is_none() {
            return Err(ConfigError::Invalid {
                field: "host_tls_required",
                reason: "requiring TLS needs host_tls_cert and host_tls_key".into(),
            });
        }
        let heartbeat = self.heartbeat_interval().as_millis();
        let min = self.election_timeout_min().as_millis();
        let max = self.election_timeout_max().as_millis();
        if heartbeat == 0 {
            return Err(ConfigError::Invalid {
                field: "heartbeat_interval_ms",
                reason: "must be positive".into(),
            });
        }
        if min <= heartbeat {
            return Err(ConfigError::Invalid {
                field: "election_timeout_min_ms",
                reason: format!("{min} must exceed the heartbeat interval {heartbeat}"),
            });
        }
        if max <= min {
            return Err(ConfigError::Invalid {
                field: "election_timeout_max_ms",
                reason: format!("{max} must exceed election_timeout_min_ms {min}"),
            });
        }
        let caps = self.host_connection_caps();
        for (field, zero) in [
            ("host_max_connections", caps.total == 0),
            ("host_max_connections_per_peer", caps.per_peer == 0),
            ("host_idle_timeout_ms", self.host_idle_timeout().is_zero()),
            (
                "rollback_bytes_per_second",
                self.rollback_bytes_per_second == Some(0),
            ),
        ] {
            if zero {
                return Err(ConfigError::Invalid {
                    field,
                    reason: "must be positive".into(),
                });
            }
        }
        if self.node_down_after().is_zero() {
            return Err(ConfigError::Invalid {
                field: "node_down_after_ms",
                reason: "must be positive".into(),
            });
        }
        let refused = self.node_refused_down_after();
        if refused.is_zero() || refused > self.node_down_after() {
            return Err(ConfigError::Invalid {
                field: "node_refused_down_after_ms",
                reason: format!(
                    "{} must be positive and at most node_down_after_ms {}",
                    refused.as_millis(),
                    self.node_down_after().as_millis()
                ),
            });
        }
        self.engine()?;
        let lease = self.lease_duration();
        if lease.is_zero() || lease > Duration::from_millis(MAX_LEASE_DURATION_MS) {
            return Err(ConfigError::Invalid {
                field: "lease_duration_ms",
                reason: format!("must be in 1..={MAX_LEASE_DURATION_MS}"),
            });
        }
        let renew = self.lease_renew_interval();
        if renew.is_zero() || renew * 2 > lease {
            return Err(ConfigError::Invalid {
                field: "lease_renew_interval_ms",
                reason: format!(
                    "{} must be positive and at most half of lease_duration_ms {}",
                    renew.as_millis(),
                    lease.as_millis()
                ),
            });
        }
        if self.failover_lease_margin() > lease {
            return Err(ConfigError::Invalid {
                field: "failover_lease_margin_ms",
                reason: format!("must be at most lease_duration_ms {}", lease.as_millis()),
            });
        }
        if self.flush_fill_percent.is_some_and(|p| p == 0 || p > 100) {
            return Err(ConfigError::Invalid {
                field: "flush_fill_percent",
                reason: "must be in 1..=100".into(),
            });
        }
        for (field, value) in [
            ("flush_age_ms", self.flush_age_ms),
            ("gc_interval_ms", self.gc_interval_ms),
            (
                "partition_poll_interval_ms",
                self.partition_poll_interval_ms,
            ),
            ("wal_size_bytes", self.wal_size_bytes),
            ("wal_timeout_ms", self.wal_timeout_ms),
        ] {
            if value == Some(0) {
                return Err(ConfigError::Invalid {
                    field,
                    reason: "must be positive".into(),
                });
            }
        }
        Ok(())
    }

    /// The host port's connection caps (`host_max_connections`,
    /// `host_max_connections_per_peer`).
    pub fn host_connection_caps(&self) -> proto::server::ConnectionCaps {
        proto::server::ConnectionCaps {
            total: self.host_max_connections.unwrap_or(1024),
            per_peer: self.host_max_connections_per_peer.unwrap_or(256),
        }
    }

    /// `host_idle_timeout_ms`.
    pub fn host_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.host_idle_timeout_ms.unwrap_or(60_000))
    }

    /// Whether the host port refuses plain TCP (`host_tls_required`).
    pub fn host_tls_required(&self) -> bool {
        self.host_tls_required.unwrap_or(false)
    }

    /// Where the unit's credentials are (`credentials_dir`).
    pub fn credentials_dir(&self) -> PathBuf {
        self.credentials_dir
            .clone()
            .unwrap_or_else(|| proto::auth::default_credentials_dir(&self.rack_file))
    }

    /// The write log's path.
    pub fn wal_path(&self) -> PathBuf {
        self.wal_path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("wal.img"))
    }

    /// Size of a newly created write log.
    pub fn wal_size_bytes(&self) -> u64 {
        self.wal_size_bytes.unwrap_or(DEFAULT_WAL_SIZE_BYTES)
    }

    /// Memory budget of the write log's in-memory tail.
    pub fn wal_cache_bytes(&self) -> u64 {
        self.wal_cache_bytes
            .unwrap_or(crate::wal::DEFAULT_CACHE_BYTES)
    }

    /// Deadline of one write-log device operation.
    pub fn wal_timeout(&self) -> Duration {
        Duration::from_millis(self.wal_timeout_ms.unwrap_or(DEFAULT_WAL_TIMEOUT_MS))
    }

    /// The write log's I/O engine (config, else the environment, else auto).
    pub fn engine(&self) -> Result<EngineChoice, ConfigError> {
        match &self.io_engine {
            Some(value) => value
                .parse()
                .map_err(|e: hardware::DeviceError| ConfigError::Invalid {
                    field: "io_engine",
                    reason: e.to_string(),
                }),
            None => EngineChoice::from_env().map_err(|e| ConfigError::Invalid {
                field: "io_engine (RACKBLOCK_IO_ENGINE)",
                reason: e.to_string(),
            }),
        }
    }

    pub fn lease_duration(&self) -> Duration {
        Duration::from_millis(self.lease_duration_ms.unwrap_or(DEFAULT_LEASE_DURATION_MS))
    }

    pub fn lease_renew_interval(&self) -> Duration {
        Duration::from_millis(
            self.lease_renew_interval_ms
                .unwrap_or(DEFAULT_LEASE_RENEW_INTERVAL_MS),
        )
    }

    /// Smallest write that goes straight to the sleds (0: none).
    pub fn direct_write_min_bytes(&self) -> u64 {
        self.direct_write_min_bytes
            .unwrap_or(DEFAULT_DIRECT_WRITE_MIN_BYTES)
    }

    /// Flush commits between two index checkpoints (0: only by time).
    pub fn checkpoint_every_flushes(&self) -> u64 {
        self.checkpoint_every_flushes
            .unwrap_or(DEFAULT_CHECKPOINT_EVERY_FLUSHES)
    }

    /// Longest pause between two index checkpoints (zero: only by count).
    pub fn checkpoint_interval(&self) -> Duration {
        Duration::from_millis(
            self.checkpoint_interval_ms
                .unwrap_or(DEFAULT_CHECKPOINT_INTERVAL_MS),
        )
    }

    pub fn flush_age(&self) -> Duration {
        Duration::from_millis(self.flush_age_ms.unwrap_or(DEFAULT_FLUSH_AGE_MS))
    }

    /// Flush fill trigger as a ratio in (0, 1].
    pub fn flush_fill_ratio(&self) -> f64 {
        f64::from(
            self.flush_fill_percent
                .unwrap_or(DEFAULT_FLUSH_FILL_PERCENT),
        ) / 100.0
    }

    /// See [`HeadNodeConfig::test_snapshot_cut_reply_delay_ms`].
    pub fn test_snapshot_cut_reply_delay(&self) -> Duration {
        Duration::from_millis(self.test_snapshot_cut_reply_delay_ms.unwrap_or(0))
    }

    pub fn gc_interval(&self) -> Duration {
        Duration::from_millis(self.gc_interval_ms.unwrap_or(DEFAULT_GC_INTERVAL_MS))
    }

    pub fn partition_poll_interval(&self) -> Duration {
        Duration::from_millis(
            self.partition_poll_interval_ms
                .unwrap_or(DEFAULT_PARTITION_POLL_INTERVAL_MS),
        )
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(
            self.heartbeat_interval_ms
                .unwrap_or(DEFAULT_HEARTBEAT_INTERVAL_MS),
        )
    }

    pub fn election_timeout_min(&self) -> Duration {
        Duration::from_millis(
            self.election_timeout_min_ms
                .unwrap_or(DEFAULT_ELECTION_TIMEOUT_MIN_MS),
        )
    }

    pub fn election_timeout_max(&self) -> Duration {
        Duration::from_millis(
            self.election_timeout_max_ms
                .unwrap_or(DEFAULT_ELECTION_TIMEOUT_MAX_MS),
        )
    }

    /// The leader's failover controller settings.
    pub fn failover(&self) -> local_control_plane::failover::FailoverConfig {
        let mut failover = local_control_plane::failover::FailoverConfig {
            lease_margin: self.failover_lease_margin(),
            ..Default::default()
        };
        if let Some(n) = self.failover_max_changes_per_second {
            failover.max_changes_per_second = n.max(1);
        }
        failover
    }

    /// The leader's repair controller settings.
    pub fn repair(&self) -> local_control_plane::RepairConfig {
        let mut repair = local_control_plane::RepairConfig::default();
        if let Some(n) = self.repair_max_concurrent {
            repair.max_concurrent = n.max(1);
        }
        if let Some(rate) = self.repair_bytes_per_second {
            repair.bytes_per_second = rate.max(1);
        }
        if let Some(ms) = self.sled_failed_after_ms {
            repair.sled_failed_after = Duration::from_millis(ms);
        }
        repair.poll_interval = self.repair_poll_interval();
        if let Some(ms) = self.repair_scrub_poll_interval_ms {
            repair.scrub_poll_interval = Duration::from_millis(ms.max(100));
        }
        repair
    }

    /// Pause between two looks for repair work of this head node.
    pub fn repair_poll_interval(&self) -> Duration {
        Duration::from_millis(
            self.repair_poll_interval_ms
                .unwrap_or(DEFAULT_REPAIR_POLL_INTERVAL_MS)
                .max(10),
        )
    }

    /// This config with every setting the daemon reads through the
    /// accessors above filled in with the value it runs with: a default
    /// where the file left a setting out. `io_engine` (whose default is
    /// the environment's), `listen_a` and `listen_b` (no default: the rack
    /// addresses) stay as given. The daemon's defaults live in those
    /// accessors and the constants they use; this is how a test compares
    /// `deploy/head-node.example.toml` with them.
    pub fn resolved(&self) -> HeadNodeConfig {
        fn ms(duration: Duration) -> Option<u64> {
            Some(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
        }
        let failover = self.failover();
        let repair = self.repair();
        // No `..`: a new field must be resolved here too.
        HeadNodeConfig {
            rack_file: self.rack_file.clone(),
            head_node_id: self.head_node_id.clone(),
            data_dir: self.data_dir.clone(),
            heartbeat_interval_ms: ms(self.heartbeat_interval()),
            election_timeout_min_ms: ms(self.election_timeout_min()),
            election_timeout_max_ms: ms(self.election_timeout_max()),
            node_down_after_ms: ms(self.node_down_after()),
            node_refused_down_after_ms: ms(self.node_refused_down_after()),
            quick_election: Some(self.quick_election()),
            listen_a: self.listen_a,
            listen_b: self.listen_b,
            credentials_dir: self.credentials_dir.clone(),
            host_tls_cert: self.host_tls_cert.clone(),
            host_tls_key: self.host_tls_key.clone(),
            host_tls_required: Some(self.host_tls_required()),
            host_max_connections: Some(self.host_connection_caps().total),
            host_max_connections_per_peer: Some(self.host_connection_caps().per_peer),
            host_idle_timeout_ms: ms(self.host_idle_timeout()),
            wal_path: Some(self.wal_path()),
            wal_size_bytes: Some(self.wal_size_bytes()),
            io_engine: self.io_engine.clone(),
            wal_timeout_ms: ms(self.wal_timeout()),
            wal_cache_bytes: Some(self.wal_cache_bytes()),
            lease_duration_ms: ms(self.lease_duration()),
            lease_renew_interval_ms: ms(self.lease_renew_interval()),
            flush_age_ms: ms(self.flush_age()),
            flush_fill_percent: Some(
                self.flush_fill_percent
                    .unwrap_or(DEFAULT_FLUSH_FILL_PERCENT),
            ),
            gc_interval_ms: ms(self.gc_interval()),
            checkpoint_every_flushes: Some(self.checkpoint_every_flushes()),
            direct_write_min_bytes: Some(self.direct_write_min_bytes()),
            checkpoint_interval_ms: ms(self.checkpoint_interval()),
            partition_poll_interval_ms: ms(self.partition_poll_interval()),
            failover_lease_margin_ms: ms(failover.lease_margin),
            failover_max_changes_per_second: Some(failover.max_changes_per_second),
            repair_max_concurrent: Some(repair.max_concurrent),
            repair_bytes_per_second: Some(repair.bytes_per_second),
            sled_failed_after_ms: ms(repair.sled_failed_after),
            repair_poll_interval_ms: ms(self.repair_poll_interval()),
            repair_scrub_poll_interval_ms: ms(repair.scrub_poll_interval),
            // Unset: unpaced (shown as such).
            rollback_bytes_per_second: self.rollback_bytes_per_second,
            // Test only: shown only where set.
            test_snapshot_cut_reply_delay_ms: self.test_snapshot_cut_reply_delay_ms,
        }
    }

    /// Margin after a recorded lease expiry before promotion.
    pub fn failover_lease_margin(&self) -> Duration {
        self.failover_lease_margin_ms.map_or(
            self.lease_duration() / DEFAULT_LEASE_MARGIN_DIVISOR,
            Duration::from_millis,
        )
    }

    pub fn quick_election(&self) -> bool {
        self.quick_election.unwrap_or(true)
    }

    pub fn node_refused_down_after(&self) -> Duration {
        Duration::from_millis(
            self.node_refused_down_after_ms
                .unwrap_or(DEFAULT_NODE_REFUSED_DOWN_AFTER_MS),
        )
    }

    pub fn node_down_after(&self) -> Duration {
        Duration::from_millis(
            self.node_down_after_ms
                .unwrap_or(DEFAULT_NODE_DOWN_AFTER_MS),
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_unknown_fields_and_timings() {
        let c: HeadNodeConfig =
            toml::from_str("rack_file = \"/r.toml\"\nhead_node_id = \"hn-1\"\ndata_dir = \"/d\"\n")
                .unwrap();
        c.validate().unwrap();
        assert_eq!(c.heartbeat_interval(), Duration::from_millis(100));
        assert_eq!(c.election_timeout_min(), Duration::from_millis(350));
        assert_eq!(c.election_timeout_max(), Duration::from_millis(420));
        assert_eq!(c.node_down_after(), Duration::from_millis(1500));
        assert_eq!(c.node_refused_down_after(), Duration::from_millis(300));
        assert_eq!(c.failover_lease_margin(), Duration::from_millis(60));
        assert_eq!(c.failover().lease_margin, Duration::from_millis(60));
        assert_eq!(c.wal_path(), PathBuf::from("/d/wal.img"));
        assert_eq!(c.wal_size_bytes(), 1 << 30);
        assert_eq!(c.wal_cache_bytes(), 256 << 20);
        assert_eq!(c.lease_duration(), Duration::from_millis(600));
        assert_eq!(c.lease_renew_interval(), Duration::from_millis(150));
        for (bad, field) in [
            (
                HeadNodeConfig {
                    node_refused_down_after_ms: Some(2000),
                    ..c.clone()
                },
                "node_refused_down_after_ms",
            ),
            (
                HeadNodeConfig {
                    node_refused_down_after_ms: Some(0),
                    ..c.clone()
                },
                "node_refused_down_after_ms",
            ),
            (
                HeadNodeConfig {
                    failover_lease_margin_ms: Some(601),
                    ..c.clone()
                },
                "failover_lease_margin_ms",
            ),
            (
                HeadNodeConfig {
                    rollback_bytes_per_second: Some(0),
                    ..c.clone()
                },
                "rollback_bytes_per_second",
            ),
        ] {
            assert!(
                matches!(bad.validate(), Err(ConfigError::Invalid { field: f, .. }) if f == field),
                "{field}"
            );
        }
        assert!((c.flush_fill_ratio() - 0.25).abs() < 1e-9);
        let bad = HeadNodeConfig {
            lease_renew_interval_ms: Some(1500),
            ..c.clone()
        };
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::Invalid {
                field: "lease_renew_interval_ms",
                ..
            })
        ));
        let bad = HeadNodeConfig {
            io_engine: Some("turbo".into()),
            ..c.clone()
        };
        assert!(bad.validate().is_err());
        assert!(toml::from_str::<HeadNodeConfig>(
            "rack_file = \"/r\"\nhead_node_id = \"h\"\ndata_dir = \"/d\"\nbogus = 1\n"
        )
        .is_err());
        let bad = HeadNodeConfig {
            election_timeout_min_ms: Some(50),
            ..c.clone()
        };
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::Invalid {
                field: "election_timeout_min_ms",
                ..
            })
        ));
        let bad = HeadNodeConfig {
            election_timeout_max_ms: Some(300),
            ..c
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn example_config_in_deploy_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/head-node.example.toml");
        let c = HeadNodeConfig::load(&path).unwrap();
        assert_eq!(c.head_node_id, "hn-1");
    }

    /// The code is the one source of defaults: every optional setting the
    /// example states must be the value the daemon uses without it.
    #[test]
    fn example_config_in_deploy_states_only_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/head-node.example.toml");
        let resolve = |text: &str| {
            let config: HeadNodeConfig = toml::from_str(text).ok()?;
            config.validate().ok()?;
            Some(config.resolved())
        };
        // The check has teeth: a stated value that is not the default is found.
        let drift = ("flush_age_ms = ", "flush_age_ms = 1");
        let drifted = hardware::config::assert_example_at_defaults(&path, &[], drift, resolve);
        assert_eq!(drifted.len(), 1);
    }

    #[test]
    fn resolved_is_what_the_accessors_return() {
        let c: HeadNodeConfig =
            toml::from_str("rack_file = \"/r.toml\"\nhead_node_id = \"hn-1\"\ndata_dir = \"/d\"\n")
                .unwrap();
        let r = c.resolved();
        assert_eq!(r.resolved(), r, "resolving twice changes nothing");
        assert_eq!(r.flush_fill_percent, Some(DEFAULT_FLUSH_FILL_PERCENT));
        assert_eq!(r.wal_path, Some(PathBuf::from("/d/wal.img")));
        assert_eq!(r.failover_lease_margin_ms, Some(60));
        assert_eq!(
            r.repair_poll_interval_ms,
            Some(DEFAULT_REPAIR_POLL_INTERVAL_MS)
        );
        assert_eq!(r.io_engine, None);
        assert_eq!(r.heartbeat_interval(), c.heartbeat_interval());
        assert_eq!(r.repair(), c.repair());
        assert_eq!(r.failover().lease_margin, c.failover().lease_margin);
        assert_eq!(
            r.failover().max_changes_per_second,
            c.failover().max_changes_per_second
        );
    }
}
