//! `rackblock attach VOLUME`: the host agent (ARCHITECTURE.md, `client/`).
//!
//! ```text
//! bind --listen ADDR | --socket PATH        (fails early: port in use)
//!   └─ zonal: POST /v1/volumes/{name}/attach → attachment id + token, volume id,
//!      size, unit's head nodes (the zonal plane registered the token's digest
//!      with the unit)
//!      (or --rack FILE --volume-id N: no zonal plane; the attachment is one an
//!       operator minted with `rackblock attachment create`, given as
//!       --attachment-file or --attachment-id/--attachment-token)
//!        └─ VolumeClient over the head nodes' host ports (partition map of
//!           this attachment's volume, then I/O; the credential goes with every
//!           request and head nodes check it; over TLS with --unit-ca). A host
//!           never reaches the unit port (SECURITY.md).
//!             └─ NbdServer { export VOLUME → VolumeClient } until SIGINT/SIGTERM
//!                  (the map is refreshed every 2 s: a grown volume shows its new
//!                   size to NBD clients that connect afterwards, and a change of
//!                   the volume's QoS limits retunes the throttle in place)
//!                  └─ stop accepting, finish in-flight requests, close the links,
//!                     DELETE /v1/volumes/{name}/attachments/{id}: the token is
//!                     revoked on every head node (without zonal the operator
//!                     revokes it: `rackblock attachment revoke`)
//! ```
//!
//! The zonal token this needs is a host's attach-scoped one (its volumes,
//! its `--host`; SECURITY.md), never the admin token: I/O runs on the
//! attachment the attach returns, and its map reads every 2 s renew an
//! attachment that expires (`attachment_ttl_ms`) through the head nodes.
//! The zonal plane is asked once, at start and at the end: the I/O path is
//! NBD client → this process → the primaries' head nodes, so the export
//! keeps working while the zonal plane is down (a detach that cannot reach
//! it is reported and leaves the attachment recorded). Across a head-node
//! failover the volume client queues and retries each request for up to
//! `--failover-timeout` (120 s) before an NBD request fails with `EIO`.
//!
//! `--memory SIZE` serves an in-memory export instead (for trying NBD
//! clients without a unit).
//!
//! **QoS** ([`client::qos`]): the limits in the volume's record at the
//! unit (`volume create/modify --iops/--bandwidth/...`), read with the
//! partition map, combined with `--qos-*` here: per dimension the
//! stricter wins, so a host can tighten but never loosen what the
//! operator set. A record change reaches the throttle at the next map
//! refresh (within [`MAP_REFRESH_INTERVAL`] plus one control-plane read).
//! Requests wait for tokens; none fails for QoS.
//!
//! `--iscsi ADDR` (repeatable: one portal per address, e.g. one per
//! network) also serves the volume as LUN 0 of the iSCSI target
//! `iqn.2026-12.io.rackblock:VOLUME` ([`client::iscsi`]), over the same
//! backend as NBD (QoS and metrics included), so failover and retries stay
//! in the volume client for both. With `--iscsi` and neither `--listen`
//! nor `--socket`, only iSCSI is served. `--iscsi-chap-user` and
//! `--iscsi-chap-secret` (env `RACKBLOCK_ISCSI_CHAP_SECRET`) require CHAP;
//! `--iscsi-chap-target-user`/`--iscsi-chap-target-secret` add mutual
//! CHAP. The LUN's identity (VPD 0x80, 0x83) derives from the volume id,
//! so it is the same on every portal and every agent.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use client::admin::AdminState;
use client::iscsi::{
    target_name_for, Chap, HostReservationSource, IscsiConfig, IscsiServer, ReservationStore,
};
use client::metrics::{AgentMetrics, MeteredBackend};
use client::nbd::{MemoryBackend, NbdBackend, NbdConfig, NbdServer, NbdTls};
use client::qos::{Limit, QosBackend, QosHandle, QosLimits};
use client::{ClientConfig, HostEndpoint, VolumeClient};
use hardware::rack::Rack;
use prometheus_client::registry::Registry;
use proto::volume::{AttachmentCredential, AttachmentToken};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::error::CliError;
use crate::http::{segment, ZonalApi};
use crate::ops::GlobalArgs;
use crate::text::{human_bytes, parse_block_size, parse_duration, parse_size};

/// Default NBD address (the IANA NBD port on loopback).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";

#[derive(Debug, clap::Args)]
pub struct AttachArgs {
    /// Volume name; also the NBD export name. `VOLUME@SNAPSHOT` serves
    /// a snapshot of the volume (needs --read-only, and the unit's rack
    /// file through --rack or RACKBLOCK_RACK to find the snapshot).
    #[arg(required_unless_present = "list")]
    pub volume: Option<String>,
    /// Serve the export read-only (NBD_FLAG_READ_ONLY; writes, trims and
    /// write-zeroes fail EPERM). Required for a snapshot; only for one.
    #[arg(long)]
    pub read_only: bool,
    /// List the attach agents running on this host (volume, pid, NBD and
    /// admin addresses, attachment) instead; `rackblock detach VOLUME`
    /// stops one.
    #[arg(long, conflicts_with_all = ["listen", "socket", "rack", "memory", "admin", "device"])]
    pub list: bool,
    /// Also give this host the volume as a kernel block device (the kernel
    /// NBD client, configured over netlink; needs root and the nbd
    /// module): /dev/nbdN, or a free one when no path follows. Put the
    /// volume name first. Without --listen/--socket, NBD is not served
    /// on a socket. Started again after the agent died, it takes its
    /// device back (see --device-reconnect-timeout).
    #[arg(long, value_name = "/dev/nbdN", num_args = 0..=1, default_missing_value = "auto")]
    pub device: Option<String>,
    /// How long the kernel queues the device's I/O when this agent dies,
    /// waiting for a restarted agent to take the device back; afterwards
    /// I/O fails.
    #[arg(long, default_value = "120s", value_parser = parse_duration, requires = "device")]
    pub device_reconnect_timeout: Duration,
    /// Serve NBD on this TCP address (default 127.0.0.1:10809).
    #[arg(long, conflicts_with = "socket")]
    pub listen: Option<SocketAddr>,
    /// Serve NBD on this unix socket instead.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Offer TLS (`NBD_OPT_STARTTLS`) with this certificate chain (PEM;
    /// `rackblock tls init` makes one); needs --tls-key.
    #[arg(long, requires = "tls_key", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Serve nothing before TLS: every option but STARTTLS and ABORT is
    /// refused with NBD_REP_ERR_TLS_REQD, so plain clients are refused.
    #[arg(long, requires = "tls_cert")]
    pub tls_required: bool,
    /// Reach the head nodes' host ports over TLS, trusting this CA
    /// certificate (PEM; `rackblock up` makes rackblock-data/tls/ca.pem):
    /// each head node's certificate must chain to it and name the host
    /// port's IP address. Never falls back to plain TCP. Without it the
    /// host ports are reached over plain TCP (refused by a head node that
    /// requires TLS).
    #[arg(
        long,
        env = "RACKBLOCK_UNIT_CA",
        value_name = "FILE",
        conflicts_with = "memory"
    )]
    pub unit_ca: Option<PathBuf>,
    /// Skip the zonal plane: the unit's rack file (its head nodes' host
    /// ports), with --attachment-file or --volume-id and --attachment-id.
    #[arg(long)]
    pub rack: Option<PathBuf>,
    /// Skip the zonal plane: the volume's id in the unit (with --rack).
    #[arg(long, requires = "rack")]
    pub volume_id: Option<u64>,
    /// With --rack: the attachment file `rackblock attachment create`
    /// wrote (volume id, attachment id, token).
    #[arg(long, requires = "rack", conflicts_with_all = ["attachment_id", "volume_id"])]
    pub attachment_file: Option<PathBuf>,
    /// With --rack: act for this attachment (minted by an operator with
    /// `rackblock attachment create`, or returned by a zonal attach); needs
    /// --attachment-token (or env RACKBLOCK_ATTACHMENT_TOKEN).
    #[arg(long, requires_all = ["rack", "attachment_token"])]
    pub attachment_id: Option<u64>,
    /// The secret token of --attachment-id (32 hex digits).
    #[arg(
        long,
        env = "RACKBLOCK_ATTACHMENT_TOKEN",
        requires = "attachment_id",
        hide_env_values = true
    )]
    pub attachment_token: Option<String>,
    /// Serve an in-memory export of this size instead of a volume (trying
    /// NBD clients without a unit).
    #[arg(long, conflicts_with_all = ["rack", "volume_id"])]
    pub memory: Option<String>,
    /// How long a request is queued and retried across a head-node
    /// failover before it fails.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub failover_timeout: Duration,
    /// Host name recorded with the attachment (default: this machine's).
    #[arg(long)]
    pub host: Option<String>,
    /// Serve GET /metrics (OpenMetrics) and GET /health on this HTTP
    /// address.
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    #[command(flatten)]
    pub qos: QosArgs,
    #[command(flatten)]
    pub iscsi: IscsiArgs,
}

/// iSCSI target options.
#[derive(Debug, Default, clap::Args)]
pub struct IscsiArgs {
    /// Serve the volume over iSCSI on this portal (repeatable; e.g.
    /// 127.0.0.1:3260). Without --listen/--socket, NBD is not served.
    #[arg(long = "iscsi", value_name = "ADDR")]
    pub iscsi: Vec<SocketAddr>,
    /// Require CHAP: the initiator's user name.
    #[arg(long, requires_all = ["iscsi", "iscsi_chap_secret"])]
    pub iscsi_chap_user: Option<String>,
    /// The initiator's CHAP secret (at least 12 bytes).
    #[arg(
        long,
        env = "RACKBLOCK_ISCSI_CHAP_SECRET",
        requires = "iscsi_chap_user",
        hide_env_values = true
    )]
    pub iscsi_chap_secret: Option<String>,
    /// Mutual CHAP: the name the target answers with.
    #[arg(long, requires_all = ["iscsi_chap_user", "iscsi_chap_target_secret"])]
    pub iscsi_chap_target_user: Option<String>,
    /// Mutual CHAP: the target's secret.
    #[arg(
        long,
        env = "RACKBLOCK_ISCSI_CHAP_TARGET_SECRET",
        requires = "iscsi_chap_target_user",
        hide_env_values = true
    )]
    pub iscsi_chap_target_secret: Option<String>,
}

impl IscsiArgs {
    fn chap(&self) -> Option<Chap> {
        let (Some(user), Some(secret)) = (&self.iscsi_chap_user, &self.iscsi_chap_secret) else {
            return None;
        };
        Some(Chap {
            user: user.clone(),
            secret: secret.clone(),
            target_user: self.iscsi_chap_target_user.clone(),
            target_secret: self.iscsi_chap_target_secret.clone(),
        })
    }
}

/// The LUN identity of an in-memory export: FNV-1a of its name (a volume
/// uses its id).
fn memory_lun_id(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Host-side QoS limits, enforced here on top of the volume record's
/// (the stricter of the two wins per dimension; requests wait, never
/// fail). A request costs one I/O per started 256 KiB and its length in
/// bytes; trim and write zeroes cost one write I/O. Unset: only the
/// volume's limits.
#[derive(Debug, Default, clap::Args)]
pub struct QosArgs {
    /// Limit of I/Os per second, reads and writes together.
    #[arg(long, value_name = "N")]
    pub qos_iops: Option<u64>,
    /// Limit of read I/Os per second.
    #[arg(long, value_name = "N")]
    pub qos_read_iops: Option<u64>,
    /// Limit of write I/Os per second (trim, write zeroes included).
    #[arg(long, value_name = "N")]
    pub qos_write_iops: Option<u64>,
    /// Limit of bytes per second, reads and writes together (50MiB, ...).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub qos_bps: Option<u64>,
    /// Limit of bytes read per second.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub qos_read_bps: Option<u64>,
    /// Limit of bytes written per second.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub qos_write_bps: Option<u64>,
    /// Burst rate of --qos-iops: an idle volume may run at up to this many
    /// I/Os per second for --qos-burst-length.
    #[arg(long, value_name = "N", requires = "qos_iops")]
    pub qos_burst_iops: Option<u64>,
    /// Burst rate of --qos-bps (bytes per second).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, requires = "qos_bps")]
    pub qos_burst_bps: Option<u64>,
    /// How long a full bucket sustains the burst rate.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub qos_burst_length: Duration,
    /// Benchmarks only: leave the QoS layer out of the I/O path entirely
    /// (the volume record's limits are then not enforced).
    #[arg(long, hide = true, conflicts_with_all = ["qos_iops", "qos_read_iops", "qos_write_iops", "qos_bps", "qos_read_bps", "qos_write_bps"])]
    pub qos_bypass: bool,
}

impl QosArgs {
    pub fn limits(&self) -> Result<QosLimits, CliError> {
        let limit = |rate: Option<u64>, burst: Option<u64>| {
            rate.map(|rate| match burst {
                Some(burst) => Limit::with_burst(rate as f64, burst as f64, self.qos_burst_length),
                None => Limit::new(rate as f64),
            })
        };
        let limits = QosLimits {
            iops: limit(self.qos_iops, self.qos_burst_iops),
            read_iops: limit(self.qos_read_iops, None),
            write_iops: limit(self.qos_write_iops, None),
            bps: limit(self.qos_bps, self.qos_burst_bps),
            read_bps: limit(self.qos_read_bps, None),
            write_bps: limit(self.qos_write_bps, None),
        };
        limits
            .validate()
            .map_err(|e| CliError::Usage(e.to_string()))?;
        Ok(limits)
    }
}

/// Where NBD is served.
enum Listener {
    /// Not at all (`--iscsi` alone).
    None,
    Tcp(tokio::net::TcpListener, SocketAddr),
    Unix(tokio::net::UnixListener, PathBuf),
}

impl Listener {
    fn uri(&self, export: &str) -> String {
        match self {
            Listener::Tcp(_, address) => format!("nbd://{address}/{export}"),
            Listener::Unix(_, path) => format!("nbd+unix:///{export}?socket={}", path.display()),
            Listener::None => String::new(),
        }
    }

    /// The `nbds` URI (TLS) of `export`.
    fn tls_uri(&self, export: &str) -> String {
        match self {
            Listener::Tcp(_, address) => format!("nbds://{address}/{export}"),
            Listener::Unix(_, path) => {
                format!("nbds+unix:///{export}?socket={}", path.display())
            }
            Listener::None => String::new(),
        }
    }
}

async fn bind(args: &AttachArgs) -> Result<Listener, CliError> {
    if let Some(path) = &args.socket {
        if path.exists() {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Err(CliError::Usage(format!(
                    "--socket {}: something already serves there",
                    path.display()
                )));
            }
            // A socket file left by a process that died.
            std::fs::remove_file(path).map_err(|e| {
                CliError::Runtime(format!("cannot remove stale {}: {e}", path.display()))
            })?;
        }
        let listener = tokio::net::UnixListener::bind(path)
            .map_err(|e| CliError::Runtime(format!("cannot bind {}: {e}", path.display())))?;
        return Ok(Listener::Unix(listener, path.clone()));
    }
    if args.listen.is_none() && (!args.iscsi.iscsi.is_empty() || args.device.is_some()) {
        return Ok(Listener::None);
    }
    let address = match args.listen {
        Some(address) => address,
        None => DEFAULT_LISTEN
            .parse()
            .map_err(|e| CliError::Runtime(format!("default listen address: {e}")))?,
    };
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| CliError::Runtime(format!("cannot listen on {address}: {e}")))?;
    let address = listener.local_addr().unwrap_or(address);
    Ok(Listener::Tcp(listener, address))
}

/// This machine's name, reduced to what the zonal API accepts.
fn host_name() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: gethostname writes at most buffer.len() bytes into our buffer.
    let rc = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
    let raw = if rc == 0 {
        let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
        String::from_utf8_lossy(&buffer[..end]).into_owned()
    } else {
        String::new()
    };
    let clean: String = raw
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(128)
        .collect();
    let clean = clean.trim_start_matches(['.', '-']).to_owned();
    if clean.is_empty() {
        "host".to_owned()
    } else {
        clean
    }
}

/// How the attachment this process acts for is revoked at the end (one
/// given with --rack is the operator's to revoke).
enum Attached {
    /// Through the zonal plane (which revokes it with the unit).
    Zonal { api: ZonalApi, attachment_id: u64 },
}

impl Attached {
    fn attachment_id(&self) -> u64 {
        match self {
            Attached::Zonal { attachment_id, .. } => *attachment_id,
        }
    }
}

/// A zonal attachment of a volume and the client connected with it.
pub(crate) struct ZonalConnection {
    pub attachment_id: u64,
    pub volume_id: u64,
    pub endpoints: Vec<HostEndpoint>,
    pub credential: AttachmentCredential,
    pub client: VolumeClient,
    /// The TLS the client's links use: `config`'s own (`--unit-ca`) or,
    /// failing that, the unit CA carried by the attach answer.
    pub tls: Option<proto::link::LinkTls>,
}

/// Asks the zonal plane for an attachment of `volume` for `host`, then
/// connects a client with `config` to the unit's host ports it names: what
/// `attach` (a host's export) and `snapshot export` (the CLI's own reads)
/// both do. Without a CA in `config` (no `--unit-ca`), the unit CA the
/// attach answer carries (`unit_ca_pem`) is trusted. An attachment made
/// but not connected is detached again (a
/// failed detach is reported on stderr with the command that finishes it)
/// before the error is returned: no caller leaks one.
pub(crate) async fn zonal_connect(
    api: &ZonalApi,
    volume: &str,
    host: &str,
    mut config: ClientConfig,
) -> Result<ZonalConnection, CliError> {
    let path = format!("/v1/volumes/{}/attach", segment(volume));
    let info = api
        .call("POST", &path, Some(&json!({ "host": host })))
        .await?
        .body;
    let attachment_id = info
        .get("attachment_id")
        .and_then(Value::as_u64)
        .ok_or_else(|| CliError::Runtime("the zonal attach answer has no attachment_id".into()))?;
    let connected = async {
        let token = info
            .get("token")
            .and_then(Value::as_str)
            .ok_or_else(|| CliError::Runtime("the zonal attach answer has no token".into()))
            .and_then(|text| {
                AttachmentToken::parse_hex(text)
                    .map_err(|e| CliError::Runtime(format!("the zonal attach answer's token: {e}")))
            })?;
        let credential = AttachmentCredential {
            attachment: attachment_id,
            token,
        };
        let volume_id = info
            .get("volume_id")
            .and_then(Value::as_u64)
            .ok_or_else(|| CliError::Runtime("the zonal attach answer has no volume_id".into()))?;
        let endpoints = host_endpoints(&info)?;
        if config.link.tls.is_none() {
            if let Some(pem) = info.get("unit_ca_pem").and_then(Value::as_str) {
                let origin = std::path::Path::new("the zonal attach answer's unit_ca_pem");
                let tls = proto::link::LinkTls::from_ca_pem(pem.as_bytes(), origin)
                    .map_err(|e| CliError::Runtime(format!("the attachment's unit CA: {e}")))?;
                config.link.tls = Some(tls);
            }
        }
        let tls = config.link.tls.clone();
        let unit = info.get("unit").and_then(Value::as_str).unwrap_or("?");
        let client = VolumeClient::connect_host(&endpoints, volume_id, credential, config)
            .await
            .map_err(|e| {
                CliError::Unavailable(format!(
                    "cannot get volume {volume}'s partition map from unit {unit}: {e}"
                ))
            })?;
        Ok(ZonalConnection {
            attachment_id,
            volume_id,
            endpoints,
            credential,
            client,
            tls,
        })
    }
    .await;
    if connected.is_err() {
        let attached = Attached::Zonal {
            api: api.clone(),
            attachment_id,
        };
        detach_and_report(volume, Some(&attached)).await;
    }
    connected
}

/// How often the attach agent re-reads the partition map (and with it the
/// volume's QoS limits) while serving: a limit change is in force within
/// this plus one control-plane read (the issue asks for 6 s).
pub const MAP_REFRESH_INTERVAL: Duration = Duration::from_secs(2);

/// The host ports of the unit's head nodes in a zonal attach answer.
pub(crate) fn host_endpoints(info: &Value) -> Result<Vec<HostEndpoint>, CliError> {
    let bad = |reason: String| {
        CliError::Runtime(format!("the zonal attach answer is unusable: {reason}"))
    };
    let nodes = info
        .get("head_nodes")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no head_nodes".into()))?;
    let mut endpoints = Vec::with_capacity(nodes.len());
    for node in nodes {
        let text = |field: &str| -> Result<String, CliError> {
            node.get(field)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| {
                    bad(format!(
                        "head node without {field} (the unit serves no host port)"
                    ))
                })
        };
        let host = text("host")?;
        endpoints.push(HostEndpoint {
            node: text("id")?,
            address: host
                .parse()
                .map_err(|e| bad(format!("host {host:?}: {e}")))?,
        });
    }
    if endpoints.is_empty() {
        return Err(bad("the unit has no head nodes".into()));
    }
    Ok(endpoints)
}

/// TLS to the host ports trusting `ca` (`--unit-ca`), if given.
pub(crate) fn unit_tls(
    ca: Option<&std::path::Path>,
) -> Result<Option<proto::link::LinkTls>, CliError> {
    ca.map(|ca| {
        proto::link::LinkTls::from_ca_file(ca)
            .map_err(|e| CliError::Usage(format!("--unit-ca: {e}")))
    })
    .transpose()
}

/// TLS to the host ports trusting the unit CA that came with the
/// attachment (`pem`, from `origin`), unless `--unit-ca` overrides it: set
/// in both link configurations (the volume client's and the reservations').
fn adopt_unit_ca(
    args: &AttachArgs,
    volume_link: &mut proto::link::LinkConfig,
    other_link: &mut proto::link::LinkConfig,
    pem: &str,
    origin: &std::path::Path,
) -> Result<(), CliError> {
    if args.unit_ca.is_some() {
        return Ok(());
    }
    let tls = proto::link::LinkTls::from_ca_pem(pem.as_bytes(), origin)
        .map_err(|e| CliError::Runtime(format!("the attachment's unit CA: {e}")))?;
    volume_link.tls = Some(tls.clone());
    other_link.tls = Some(tls);
    Ok(())
}

/// The host ports of `rack`'s head nodes.
fn rack_host_endpoints(rack: &Rack, path: &std::path::Path) -> Result<Vec<HostEndpoint>, CliError> {
    let endpoints: Vec<HostEndpoint> = rack
        .head_node
        .iter()
        .filter_map(|h| {
            Some(HostEndpoint {
                node: h.id.clone(),
                address: h.host?,
            })
        })
        .collect();
    if endpoints.is_empty() {
        return Err(CliError::Usage(format!(
            "{}: no head node has a `host` port, and hosts reach a unit only there",
            path.display()
        )));
    }
    Ok(endpoints)
}

async fn detach(volume: &str, attached: &Attached) -> Result<(), CliError> {
    match attached {
        Attached::Zonal { api, attachment_id } => {
            let path = format!(
                "/v1/volumes/{}/attachments/{attachment_id}",
                segment(volume)
            );
            let mut api = api.clone();
            api.timeout = Duration::from_secs(10);
            api.call("DELETE", &path, None).await.map(|_| ())
        }
    }
}

/// Revokes the attachment of the agent whose device this one took back
/// (it was killed before it could): reported, never fatal. Only a zonal
/// attachment is revoked here; one an operator minted for `--rack` is the
/// operator's to revoke (`rackblock attachment revoke`), and a restarted
/// agent usually holds the same one.
async fn revoke_replaced(volume: &str, current: &Attached, old: u64) {
    let stale = match current {
        Attached::Zonal { api, .. } => Attached::Zonal {
            api: api.clone(),
            attachment_id: old,
        },
    };
    match detach(volume, &stale).await {
        Ok(()) => eprintln!("revoked attachment {old} of the agent that exited"),
        Err(error) => eprintln!(
            "rackblock attach: could not revoke attachment {old} of the agent that exited: {}",
            error.line()
        ),
    }
}

async fn detach_and_report(volume: &str, attached: Option<&Attached>) {
    let Some(attached) = attached else { return };
    let id = attached.attachment_id();
    match detach(volume, attached).await {
        Ok(()) => eprintln!("detached {volume} (attachment {id})"),
        Err(error) => match attached {
            Attached::Zonal { .. } => eprintln!(
                "rackblock attach: could not detach {volume} (attachment {id}): {}; \
                 detach it later with `rackblock volume detach {volume} --attachment {id}`",
                error.line(),
            ),
        },
    }
}

pub async fn run(
    global: &GlobalArgs,
    args: &AttachArgs,
    shutdown: CancellationToken,
) -> Result<(), CliError> {
    if args.list {
        return crate::agents::list(global.output);
    }
    let volume = args
        .volume
        .clone()
        .ok_or_else(|| CliError::Usage("a volume name is needed (or --list)".into()))?;
    // VOLUME@SNAPSHOT: the zonal volume is VOLUME, the export keeps the
    // whole name.
    let (volume_name, snapshot_name) = match volume.split_once('@') {
        Some((name, snapshot)) => (name.to_owned(), Some(snapshot.to_owned())),
        None => (volume.clone(), None),
    };
    match (&snapshot_name, args.read_only) {
        (Some(_), false) => {
            return Err(CliError::Usage(format!(
                "{volume} is a snapshot: snapshots are read-only, add --read-only"
            )))
        }
        (None, true) => return Err(CliError::Usage(
            "--read-only serves a snapshot (VOLUME@SNAPSHOT); a live volume is served read-write"
                .into(),
        )),
        _ => {}
    }
    if snapshot_name.is_some() && (args.memory.is_some() || args.device.is_some()) {
        return Err(CliError::Usage(
            "a snapshot is served over NBD or iSCSI only (no --memory, no --device)".into(),
        ));
    }
    // Where the snapshot's id is found: the unit's rack file.
    let snapshot_rack = crate::ops::RackArg {
        rack: args
            .rack
            .clone()
            .or_else(|| std::env::var_os("RACKBLOCK_RACK").map(std::path::PathBuf::from)),
    };
    let qos = args.qos.limits()?;
    // Checked before anything is registered: root, the nbd module, the
    // device's state.
    let device_plan = match args.device.as_deref() {
        Some(spec) => Some(crate::device::prepare(
            &crate::device::DeviceSpec::parse(spec)?,
            &volume,
            args.device_reconnect_timeout,
        )?),
        None => None,
    };
    let mut registry = Registry::default();
    let metrics = AgentMetrics::new(&mut registry);
    let mut config = ClientConfig {
        failover_timeout: args.failover_timeout,
        metrics: metrics.client.clone(),
        ..ClientConfig::default()
    };
    config.link.tls = unit_tls(args.unit_ca.as_deref())?;
    let listener = bind(args).await?;
    let mut iscsi_listeners = Vec::with_capacity(args.iscsi.iscsi.len());
    let mut portals = Vec::with_capacity(args.iscsi.iscsi.len());
    for address in &args.iscsi.iscsi {
        let bound = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|e| CliError::Runtime(format!("cannot listen on --iscsi {address}: {e}")))?;
        portals.push(bound.local_addr().unwrap_or(*address));
        iscsi_listeners.push(bound);
    }
    let admin_listener =
        match args.admin {
            Some(address) => Some(tokio::net::TcpListener::bind(address).await.map_err(|e| {
                CliError::Runtime(format!("cannot listen on --admin {address}: {e}"))
            })?),
            None => None,
        };
    // Where a unit's volume keeps its persistent reservations: the unit,
    // through the host ports (client::iscsi::HostReservationSource).
    let mut reservation_target: Option<(Vec<HostEndpoint>, u64, AttachmentCredential)> = None;
    let mut link_config = config.link.clone();
    let (backend, attached, volume_client): (
        Arc<dyn NbdBackend>,
        Option<Attached>,
        Option<VolumeClient>,
    ) = if let Some(size) = &args.memory {
        let size_bytes = parse_block_size("--memory", size)?;
        let backend =
            MemoryBackend::with_description(size_bytes, format!("memory export {}", volume));
        (Arc::new(backend), None, None)
    } else if let Some(rack_path) = &args.rack {
        let rack = Rack::load(rack_path)
            .map_err(|e| CliError::Usage(format!("{}: {e}", rack_path.display())))?;
        let endpoints = rack_host_endpoints(&rack, rack_path)?;
        let file = match (&args.attachment_file, args.volume_id, args.attachment_id, &args.attachment_token) {
            (Some(file), _, _, _) => crate::attachment::read_file(file)?,
            (None, Some(volume_id), Some(attachment), Some(token)) => {
                let token = AttachmentToken::parse_hex(token)
                    .map_err(|e| CliError::Usage(format!("--attachment-token: {e}")))?;
                crate::attachment::AttachmentFile {
                    volume_id,
                    credential: AttachmentCredential { attachment, token },
                    unit_ca_pem: None,
                }
            }
            _ => {
                return Err(CliError::Usage(
                    "--rack needs an attachment an operator minted (`rackblock attachment create`): \
                     --attachment-file FILE, or --volume-id, --attachment-id and --attachment-token"
                        .into(),
                ))
            }
        };
        let (volume_id, credential) = (file.volume_id, file.credential);
        if let (Some(pem), Some(origin)) = (&file.unit_ca_pem, &args.attachment_file) {
            adopt_unit_ca(args, &mut config.link, &mut link_config, pem, origin)?;
        }
        reservation_target = Some((endpoints.clone(), volume_id, credential));
        if let Some(name) = &snapshot_name {
            config.snapshot =
                Some(crate::snapshot::ready_id(&snapshot_rack, volume_id, name).await?);
        }
        match VolumeClient::connect_host(&endpoints, volume_id, credential, config).await {
            Ok(client) => (Arc::new(client.clone()), None, Some(client)),
            Err(e) => {
                return Err(CliError::Unavailable(format!(
                    "cannot get volume {volume_id}'s partition map: {e}"
                )));
            }
        }
    } else {
        let api = global.api()?;
        let host = args.host.clone().unwrap_or_else(host_name);
        // The snapshot is found before an attachment is made.
        if let Some(name) = &snapshot_name {
            let volume_id = crate::snapshot::volume_id(global, &volume_name).await?;
            config.snapshot =
                Some(crate::snapshot::ready_id(&snapshot_rack, volume_id, name).await?);
        }
        let connection = zonal_connect(&api, &volume_name, &host, config).await?;
        reservation_target = Some((
            connection.endpoints,
            connection.volume_id,
            connection.credential,
        ));
        let attached = Attached::Zonal {
            api,
            attachment_id: connection.attachment_id,
        };
        // The unit CA that came with the attachment (unless --unit-ca
        // overrode it) also serves the reservations' link.
        if link_config.tls.is_none() {
            link_config.tls = connection.tls.clone();
        }
        let client = connection.client;
        (Arc::new(client.clone()), Some(attached), Some(client))
    };
    let size_bytes = backend.size_bytes();
    // The seam every front end goes through: metrics outside (host-seen
    // latency includes QoS waits), QoS inside. A volume of a unit always
    // gets the QoS layer (its record's limits may be set later, live).
    let volume_qos = volume_client
        .as_ref()
        .and_then(|client| client.partition_map().qos);
    let limits = qos.stricter(&QosLimits::from_volume(volume_qos.as_ref()));
    let (backend, qos_handle): (Arc<dyn NbdBackend>, Option<QosHandle>) =
        if args.qos.qos_bypass || (volume_client.is_none() && qos.is_unlimited()) {
            (
                Arc::new(MeteredBackend::new(backend, metrics.clone())),
                None,
            )
        } else {
            match QosBackend::new(backend, limits, Some(metrics.clone())) {
                Ok(throttled) => {
                    let handle = throttled.handle();
                    (
                        Arc::new(MeteredBackend::new(throttled, metrics.clone())),
                        Some(handle),
                    )
                }
                Err(error) => {
                    detach_and_report(&volume_name, attached.as_ref()).await;
                    return Err(CliError::Usage(error.to_string()));
                }
            }
        };
    let nbd_backend = backend.clone();
    let mut exports = BTreeMap::new();
    exports.insert(volume.clone(), backend);
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => match client::tls::acceptor(cert, key) {
            Ok(acceptor) => Some(NbdTls {
                acceptor,
                required: args.tls_required,
            }),
            Err(error) => {
                detach_and_report(&volume_name, attached.as_ref()).await;
                return Err(CliError::Usage(format!("--tls-cert/--tls-key: {error}")));
            }
        },
        _ => None,
    };
    let nbd_config = NbdConfig {
        read_only: args.read_only,
        ..NbdConfig::default()
    };
    let server = match NbdServer::with_tls(exports, nbd_config, metrics.nbd.clone(), tls) {
        Ok(server) => server,
        Err(error) => {
            detach_and_report(&volume_name, attached.as_ref()).await;
            return Err(CliError::Usage(format!("cannot serve {}: {error}", volume)));
        }
    };
    let attachment_note = attached
        .as_ref()
        .map(|a| format!(" (attachment {})", a.attachment_id()))
        .unwrap_or_default();
    let iscsi = if iscsi_listeners.is_empty() {
        None
    } else {
        let lun_id = volume_client
            .as_ref()
            .map_or_else(|| memory_lun_id(&volume), VolumeClient::volume);
        let config = IscsiConfig {
            target_name: target_name_for(&volume),
            chap: args.iscsi.chap(),
            portals: portals.clone(),
            max_connections: 128,
        };
        let reservations = match &reservation_target {
            Some((endpoints, volume_id, credential)) => ReservationStore::replicated(Arc::new(
                HostReservationSource::new(endpoints, *volume_id, *credential, link_config.clone()),
            )),
            None => ReservationStore::local(),
        };
        match IscsiServer::with_reservations(config, nbd_backend.clone(), lun_id, reservations) {
            Ok(server) => Some(server),
            Err(error) => {
                detach_and_report(&volume_name, attached.as_ref()).await;
                return Err(CliError::Usage(format!(
                    "cannot serve {volume} over iSCSI: {error}"
                )));
            }
        }
    };
    let device_session = match device_plan {
        Some(plan) => {
            let replaced = plan.replaced_attachment();
            match crate::device::start(
                plan,
                &server,
                &volume,
                attached.as_ref().map(Attached::attachment_id),
                shutdown.clone(),
            )
            .await
            {
                Ok(session) => {
                    println!(
                        "serving {} ({}) as {}{}{}",
                        volume,
                        human_bytes(size_bytes),
                        session.path(),
                        if session.reattached {
                            " (taken back from an agent that exited)"
                        } else {
                            ""
                        },
                        attachment_note,
                    );
                    if let (Some(old), Some(current)) = (replaced, attached.as_ref()) {
                        if old != current.attachment_id() {
                            revoke_replaced(&volume, current, old).await;
                        }
                    }
                    Some(session)
                }
                Err(error) => {
                    detach_and_report(&volume_name, attached.as_ref()).await;
                    return Err(error);
                }
            }
        }
        None => None,
    };
    if !matches!(listener, Listener::None) {
        println!(
            "serving {} ({}) over NBD at {}{}",
            volume,
            human_bytes(size_bytes),
            listener.uri(&volume),
            attachment_note,
        );
        if let Some(cert) = &args.tls_cert {
            println!(
                "TLS {} at {} (certificate {})",
                if args.tls_required {
                    "required"
                } else {
                    "offered"
                },
                listener.tls_uri(&volume),
                cert.display(),
            );
        }
    }
    if let Some(server) = &iscsi {
        for portal in &portals {
            println!(
                "serving {} ({}) over iSCSI: target {} LUN 0 at portal {} (iscsi://{}/{}/0){}",
                volume,
                human_bytes(size_bytes),
                server.target_name(),
                portal,
                portal,
                server.target_name(),
                attachment_note,
            );
        }
    }
    let uri = match (&listener, portals.first(), &iscsi, &device_session) {
        (Listener::None, Some(portal), Some(server), _) => {
            format!("iscsi://{portal}/{}/0", server.target_name())
        }
        (Listener::None, None, _, Some(session)) => session.path(),
        _ => listener.uri(&volume),
    };
    tracing::info!(volume = %volume, size_bytes, %uri, iscsi_portals = ?portals, ?limits, ?volume_qos, host_qos = ?qos, "attached; serving");
    let admin_address = admin_listener
        .as_ref()
        .and_then(|listener| listener.local_addr().ok());
    let _registration = crate::agents::register(&crate::agents::AgentRecord {
        pid: std::process::id(),
        volume: volume.clone(),
        uri,
        device: device_session.as_ref().map(crate::device::Session::path),
        admin: admin_address.map(|address| format!("http://{address}")),
        attachment: attached.as_ref().map(Attached::attachment_id),
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs()),
    });
    let admin = admin_listener.map(|admin_listener| {
        if let Some(address) = admin_address {
            println!("admin (metrics, health) at http://{address}/metrics");
        }
        let state = AdminState {
            export: volume.clone(),
            registry: Arc::new(registry),
            client: volume_client.clone(),
            nbd: metrics.nbd.clone(),
            metrics: metrics.clone(),
            qos: qos_handle.clone(),
            host_qos: qos,
        };
        let stop = shutdown.clone().cancelled_owned();
        tokio::spawn(async move {
            if let Err(error) = client::admin::serve(admin_listener, state, stop).await {
                tracing::error!(%error, "admin server failed");
            }
        })
    });
    // New NBD connections see the size of the last map read: re-read it
    // now and then so that a grown volume shows up on reconnect; the map
    // carries the volume's QoS limits, applied here when they change.
    let refresher = volume_client.clone().map(|client| {
        let stop = shutdown.clone();
        let qos_handle = qos_handle.clone();
        let mut applied = volume_qos;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(MAP_REFRESH_INTERVAL) => {}
                    () = stop.cancelled() => return,
                }
                if let Err(error) = client.refresh_map().await {
                    tracing::debug!(%error, "periodic partition map refresh failed");
                }
                let Some(handle) = &qos_handle else { continue };
                let record = client.partition_map().qos;
                if record == applied {
                    continue;
                }
                let limits = qos.stricter(&QosLimits::from_volume(record.as_ref()));
                match handle.set_limits(limits) {
                    Ok(()) => {
                        tracing::info!(volume = client.volume(), ?record, ?limits, "QoS limits changed");
                        applied = record;
                    }
                    Err(error) => {
                        tracing::warn!(%error, ?record, "the volume's QoS limits are unusable; keeping the previous ones");
                        applied = record;
                    }
                }
            }
        })
    });
    let stop = shutdown.clone().cancelled_owned();
    let iscsi_served = iscsi.map(|server| {
        let stop = shutdown.clone().cancelled_owned();
        tokio::spawn(async move { server.serve_tcp(iscsi_listeners, stop).await })
    });
    let served = match listener {
        Listener::Tcp(listener, _) => server.serve_tcp(listener, stop).await,
        Listener::Unix(listener, path) => {
            let served = server.serve_unix(listener, stop).await;
            let _ = std::fs::remove_file(&path);
            served
        }
        Listener::None => {
            stop.await;
            Ok(())
        }
    };
    // A device still mounted is left to a restarted agent, and so is the
    // attachment it will revoke when it takes the device back.
    let left_for_restart = match device_session {
        Some(session) => session.stop().await == crate::device::Stopped::LeftForRestart,
        None => false,
    };
    if let Some(iscsi_served) = iscsi_served {
        match iscsi_served.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::error!(%error, "iSCSI target failed"),
            Err(error) => tracing::error!(%error, "iSCSI target task failed"),
        }
    }
    if let Some(refresher) = refresher {
        refresher.abort();
    }
    if let Some(admin) = admin {
        admin.abort();
    }
    if let Some(client) = &volume_client {
        client.close();
    }
    if !left_for_restart {
        detach_and_report(&volume_name, attached.as_ref()).await;
    }
    served.map_err(|e| CliError::Runtime(format!("NBD server: {e}")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn host_ports_from_an_attach_answer() {
        let info = json!({
            "unit": "local",
            "head_nodes": [
                {"id": "hn-1", "address_a": "127.0.1.1:7000", "address_b": "127.0.2.1:7000",
                 "host": "127.0.0.1:7000"},
            ],
        });
        let endpoints = host_endpoints(&info).unwrap();
        assert_eq!(endpoints[0].node, "hn-1");
        assert_eq!(endpoints[0].address.to_string(), "127.0.0.1:7000");
        assert!(host_endpoints(&json!({"head_nodes": []})).is_err());
        // A unit without host ports: hosts cannot reach it.
        assert!(host_endpoints(
            &json!({"head_nodes": [{"id": "x", "address_a": "1.2.3.4:5", "address_b": "1.2.3.4:6"}]})
        )
        .is_err());
    }

    #[test]
    fn host_names_are_acceptable() {
        let name = host_name();
        assert!(!name.is_empty());
        assert!(name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')));
    }
}
