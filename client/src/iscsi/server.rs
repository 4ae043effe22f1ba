//! The async shell: listeners (one per portal), one task per connection,
//! login, then the full feature phase of one session per connection.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio::task::JoinSet;

use super::login::{self, encode_text, parse_text, Chap, Login, LoginStep, Negotiated};
use super::pdu::{self, op, Decoded, Digests, Pdu, PduError, BHS_BYTES, RESERVED_TAG};
use super::reserve::Nexus;
use super::scsi::{self, LogicalUnit, Outcome, Sense};
use super::shared::ReservationStore;
use crate::nbd::NbdBackend;

/// Commands the initiator may have outstanding (MaxCmdSN − ExpCmdSN + 1).
const COMMAND_WINDOW: u32 = 32;
/// Longest data segment accepted during login (before negotiation).
const LOGIN_MAX_DATA: usize = 64 * 1024;
/// Login must finish within this time.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Payload (KiB) that running commands of one connection may hold: their
/// write data and read replies (128 MiB).
const BYTE_BUDGET_KIB: u32 = 128 * 1024;
/// Most data solicited for one command (the largest READ/WRITE, 32 MiB).
const MAX_SOLICITED_BYTES: u64 = scsi::MAX_TRANSFER_BLOCKS as u64 * scsi::BLOCK_BYTES;
/// Write tasks waiting for data per connection.
const MAX_PENDING_WRITES: usize = COMMAND_WINDOW as usize;
/// Pause after a failed `accept`.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long a reinstating session waits for the old one to end (its
/// running commands answer first), then gives up and closes.
const REINSTATE_TIMEOUT: Duration = Duration::from_secs(90);

/// What an [`IscsiServer`] serves and how.
#[derive(Debug, Clone)]
pub struct IscsiConfig {
    /// The target's IQN.
    pub target_name: String,
    /// Require CHAP (and offer mutual CHAP when the target secret is set).
    pub chap: Option<Chap>,
    /// Portals listed in SendTargets answers (address:port).
    pub portals: Vec<SocketAddr>,
    /// Connections served at once; more are closed on accept.
    pub max_connections: u32,
}

/// Setting up a server failed.
#[derive(Debug, thiserror::Error)]
pub enum IscsiError {
    #[error("invalid target name {0:?}: an iqn. or eui. name of at most 223 bytes is needed")]
    TargetName(String),
    #[error("CHAP user and secret must be non-empty; the secret at least 12 bytes (RFC 7143)")]
    Chap,
    #[error("the LUN's size {0} is not a multiple of 512")]
    Size(u64),
}

/// Why one connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("connection I/O: {0}")]
    Io(#[from] io::Error),
    #[error("malformed PDU: {0}")]
    Pdu(#[from] PduError),
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    #[error("login refused (status {0:#06x})")]
    LoginRefused(u16),
}

/// The target name of a volume: `iqn.2026-12.io.rackblock:<volume>`.
pub fn target_name_for(volume: &str) -> String {
    let clean: String = volume
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':') {
                c
            } else {
                '-'
            }
        })
        .take(180)
        .collect();
    format!("iqn.2026-12.io.rackblock:{clean}")
}

/// An iSCSI target with one LUN (see the module docs).
#[derive(Clone)]
pub struct IscsiServer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for IscsiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IscsiServer")
            .field("target", &self.inner.config.target_name)
            .field("lun", &self.inner.lun)
            .finish()
    }
}

struct Inner {
    config: IscsiConfig,
    lun: LogicalUnit,
    next_tsih: AtomicU16,
    /// The sessions in full feature phase by TSIH (a login that names
    /// one is refused as too many connections, not as unknown).
    sessions: std::sync::Mutex<HashMap<u16, Session>>,
    connections: Arc<Semaphore>,
    /// Raised by TARGET COLD RESET: every connection closes.
    cold_resets: watch::Sender<u64>,
}

impl IscsiServer {
    /// A target exporting `backend` as LUN 0; `id` (the volume id) makes
    /// the LUN's identity (VPD 0x80, 0x83).
    pub fn new(
        config: IscsiConfig,
        backend: Arc<dyn NbdBackend>,
        id: u64,
    ) -> Result<IscsiServer, IscsiError> {
        IscsiServer::with_reservations(config, backend, id, ReservationStore::local())
    }

    /// [`IscsiServer::new`] with the LUN's persistent reservations kept
    /// in `reservations` (the unit's replicated state for a volume of a
    /// unit: see shared.rs).
    pub fn with_reservations(
        config: IscsiConfig,
        backend: Arc<dyn NbdBackend>,
        id: u64,
        reservations: ReservationStore,
    ) -> Result<IscsiServer, IscsiError> {
        let name = &config.target_name;
        if !(name.starts_with("iqn.") || name.starts_with("eui."))
            || name.len() > 223
            || name.contains(['\0', ' ', ','])
        {
            return Err(IscsiError::TargetName(name.clone()));
        }
        if let Some(chap) = &config.chap {
            if chap.user.is_empty() || chap.secret.len() < 12 {
                return Err(IscsiError::Chap);
            }
        }
        let size = backend.size_bytes();
        if size % scsi::BLOCK_BYTES != 0 {
            return Err(IscsiError::Size(size));
        }
        let connections = Arc::new(Semaphore::new(config.max_connections.max(1) as usize));
        Ok(IscsiServer {
            inner: Arc::new(Inner {
                config,
                lun: LogicalUnit::with_reservations(backend, id, reservations),
                next_tsih: AtomicU16::new(1),
                sessions: Default::default(),
                connections,
                cold_resets: watch::channel(0).0,
            }),
        })
    }

    pub fn target_name(&self) -> &str {
        &self.inner.config.target_name
    }

    /// Serve every listener until `shutdown` completes; then close every
    /// connection (commands in flight finish first) and return.
    pub async fn serve_tcp(
        &self,
        listeners: Vec<TcpListener>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> io::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        for listener in listeners {
            let inner = self.inner.clone();
            let stop = stop_rx.clone();
            tasks.spawn(accept_loop(inner, listener, stop));
        }
        shutdown.await;
        let _ = stop_tx.send(true);
        while tasks.join_next().await.is_some() {}
        Ok(())
    }

    /// Serve one connected stream (tests, embedding).
    pub async fn serve_stream<S>(&self, stream: S) -> Result<(), ConnectionError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (_stop_tx, stop_rx) = watch::channel(false);
        serve_connection(self.inner.clone(), stream, stop_rx).await
    }
}

/// A session in full feature phase.
struct Session {
    nexus: Arc<Nexus>,
    discovery: bool,
    /// Notified to end the session (reinstatement).
    close: Arc<Notify>,
    /// True once the session has ended and released its nexus.
    ended: watch::Receiver<bool>,
}

impl Inner {
    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<u16, Session>> {
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn session_started(&self, tsih: u16, session: Session) {
        self.sessions().insert(tsih, session);
    }

    fn session_ended(&self, tsih: u16) {
        self.sessions().remove(&tsih);
    }

    fn session_live(&self, tsih: u16) -> bool {
        self.sessions().contains_key(&tsih)
    }

    /// The I_T nexuses of the normal sessions (a reset's unit attention).
    fn live_nexuses(&self) -> Vec<Nexus> {
        self.sessions()
            .values()
            .filter(|session| !session.discovery)
            .map(|session| (*session.nexus).clone())
            .collect()
    }

    /// Session reinstatement (RFC 7143 6.3.5): a new normal session of
    /// `nexus` (same initiator name and ISID, TSIH 0) ends the old one:
    /// it is told to close (a write waiting for data is dropped, running
    /// commands answer), and this waits until it has released the nexus,
    /// so that nothing it does afterwards (ending its RESERVE(6), its
    /// I_T nexus loss) touches the new session. `false`: it did not end
    /// within [`REINSTATE_TIMEOUT`].
    async fn reinstate(&self, nexus: &Nexus) -> bool {
        let old: Vec<(Arc<Notify>, watch::Receiver<bool>)> = self
            .sessions()
            .values()
            .filter(|session| !session.discovery && *session.nexus == *nexus)
            .map(|session| (session.close.clone(), session.ended.clone()))
            .collect();
        for (close, mut ended) in old {
            tracing::info!(initiator = %nexus.initiator, "iscsi: session reinstatement closes the old session");
            close.notify_one();
            let waited =
                tokio::time::timeout(REINSTATE_TIMEOUT, ended.wait_for(|ended| *ended)).await;
            if waited.is_err() {
                return false;
            }
        }
        true
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

async fn accept_loop(inner: Arc<Inner>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        tokio::select! {
            _ = stopped(&mut stop) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Ok(permit) = inner.connections.clone().try_acquire_owned() else {
                        tracing::warn!(%peer, "iscsi: too many connections, closing a new one");
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let inner = inner.clone();
                    let stop = stop.clone();
                    connections.spawn(async move {
                        let _permit = permit;
                        match serve_connection(inner, stream, stop).await {
                            Ok(()) => tracing::debug!(%peer, "iscsi: connection closed"),
                            Err(error) => tracing::info!(%peer, %error, "iscsi: connection ended"),
                        }
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, "iscsi: accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    while connections.join_next().await.is_some() {}
}

/// Read one PDU; `None` at a clean end of stream between PDUs.
async fn read_pdu<R: AsyncRead + Unpin>(
    reader: &mut R,
    digests: Digests,
    max_data: usize,
) -> Result<Option<Pdu>, ConnectionError> {
    read_pdu_with(reader, digests, max_data, pdu::decode).await
}

async fn read_pdu_with<R: AsyncRead + Unpin>(
    reader: &mut R,
    digests: Digests,
    max_data: usize,
    decode: fn(&[u8], Digests, usize) -> Result<Decoded, PduError>,
) -> Result<Option<Pdu>, ConnectionError> {
    let mut buf = BytesMut::zeroed(BHS_BYTES);
    match reader.read_exact(&mut buf).await {
        Ok(_) => {}
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error.into()),
    }
    loop {
        match decode(&buf, digests, max_data)? {
            Decoded::Pdu(pdu, _) => return Ok(Some(pdu)),
            Decoded::Need(total) => {
                let have = buf.len();
                buf.resize(total, 0);
                reader.read_exact(&mut buf[have..]).await?;
            }
        }
    }
}

async fn serve_connection<S>(
    inner: Arc<Inner>,
    stream: S,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ConnectionError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (reader, writer) = tokio::io::split(stream);
    let mut reader = BufReader::with_capacity(256 << 10, reader);
    let mut writer = BufWriter::with_capacity(256 << 10, writer);
    let login = tokio::select! {
        biased;
        _ = stopped(&mut stop) => return Ok(()),
        login = tokio::time::timeout(LOGIN_TIMEOUT, login(&inner, &mut reader, &mut writer)) => {
            login.map_err(|_| ConnectionError::Protocol("login timed out"))??
        }
    };
    let Some((negotiated, statsn, cmdsn, isid, tsih)) = login else {
        return Ok(());
    };
    let nexus = Arc::new(Nexus {
        initiator: negotiated.initiator_name.clone(),
        isid,
    });
    let discovery = negotiated.discovery;
    // The initiator may send commands already: they wait in the socket
    // until the old session (if any) is gone.
    if !discovery && !inner.reinstate(&nexus).await {
        return Err(ConnectionError::Protocol(
            "the reinstated session did not end",
        ));
    }
    let close = Arc::new(Notify::new());
    let (ended_tx, ended) = watch::channel(false);
    inner.session_started(
        tsih,
        Session {
            nexus: nexus.clone(),
            discovery,
            close: close.clone(),
            ended,
        },
    );
    if !discovery {
        inner.lun.session_started(&nexus);
    }
    let digests = Digests {
        header: negotiated.header_digest,
        data: negotiated.data_digest,
    };
    let exp_cmdsn = Arc::new(AtomicU32::new(cmdsn));
    let (tx, rx) = mpsc::channel(4 * COMMAND_WINDOW as usize);
    let writing = tokio::spawn(write_loop(writer, rx, digests, exp_cmdsn.clone(), statsn));
    let mut cold_resets = inner.cold_resets.subscribe();
    let mut connection = Connection {
        inner: inner.clone(),
        nexus: nexus.clone(),
        tx,
        negotiated,
        exp_cmdsn,
        slots: Arc::new(Semaphore::new(COMMAND_WINDOW as usize)),
        bytes: Arc::new(Semaphore::new(BYTE_BUDGET_KIB as usize)),
        pending: HashMap::new(),
        next_ttt: 1,
        logged_out: false,
        clean_logout: false,
    };
    let served = async {
        loop {
            let pdu = tokio::select! {
                biased;
                _ = stopped(&mut stop) => break,
                _ = cold_resets.changed() => break,
                _ = close.notified() => break,
                pdu = read_pdu(&mut reader, digests, login::TARGET_MAX_RECV_DATA as usize) => pdu?,
            };
            let Some(pdu) = pdu else { break };
            connection.handle(pdu).await?;
            if connection.logged_out {
                break;
            }
        }
        Ok::<(), ConnectionError>(())
    }
    .await;
    // Commands in flight answer before the connection closes.
    connection.drain().await;
    let clean_logout = connection.clean_logout;
    drop(connection);
    // The session ends: its SPC-2 reservation ends; after a logout its
    // unit attentions go, else I_T nexus loss is kept for its initiator
    // port (scsi.rs). A discovery session has no LUN.
    if !discovery {
        inner.lun.session_ended(&nexus, clean_logout).await;
    }
    inner.session_ended(tsih);
    let _ = ended_tx.send(true);
    match writing.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) if served.is_ok() => return Err(error.into()),
        Ok(Err(_)) => {}
        Err(_) => return Err(ConnectionError::Protocol("reply writer failed")),
    }
    served
}

/// One PDU for the writer; `status` PDUs take (and advance) StatSN.
#[derive(Debug)]
struct Outgoing {
    pdu: Pdu,
    status: bool,
}

/// The one writer of a connection: stamps StatSN, ExpCmdSN and MaxCmdSN
/// at sending time (so they are in wire order), encodes, and flushes
/// whenever no more replies are queued.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut rx: mpsc::Receiver<Outgoing>,
    digests: Digests,
    exp_cmdsn: Arc<AtomicU32>,
    mut statsn: u32,
) -> io::Result<()> {
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(Outgoing { mut pdu, status }) = next {
            pdu.set_u32_at(24, statsn);
            if status {
                statsn = statsn.wrapping_add(1);
            }
            let exp = exp_cmdsn.load(Ordering::Acquire);
            pdu.set_u32_at(28, exp);
            pdu.set_u32_at(32, exp.wrapping_add(COMMAND_WINDOW - 1));
            let (head, data, trailer) = pdu.encode_parts(digests);
            let (ahs, header_digest) = head.rest();
            writer.write_all(head.bhs()).await?;
            if !ahs.is_empty() {
                writer.write_all(ahs).await?;
            }
            writer.write_all(header_digest).await?;
            writer.write_all(data).await?;
            writer.write_all(trailer.as_slice()).await?;
            next = rx.try_recv().ok();
        }
        writer.flush().await?;
    }
    writer.shutdown().await
}

/// Run the login phase: `(parameters, next StatSN, ExpCmdSN)`, or `None`
/// when the initiator went away.
async fn login<R, W>(
    inner: &Inner,
    reader: &mut R,
    writer: &mut W,
) -> Result<Option<(Negotiated, u32, u32, [u8; 6], u16)>, ConnectionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut random = [0u8; 17];
    rand::fill(&mut random);
    let tsih = inner.next_tsih.fetch_add(1, Ordering::Relaxed).max(1);
    let mut machine = Login::new(
        inner.config.target_name.clone(),
        inner.config.chap.clone(),
        random,
        tsih,
    );
    let mut statsn: Option<u32> = None;
    loop {
        let Some(request) = read_pdu(reader, Digests::default(), LOGIN_MAX_DATA).await? else {
            return Ok(None);
        };
        let cmdsn = request.cmdsn();
        let mut isid = [0u8; 6];
        isid.copy_from_slice(&request.bhs[8..14]);
        let next_statsn = *statsn.get_or_insert(request.exp_statsn());
        let tsih_requested = u16::from_be_bytes([request.bhs[14], request.bhs[15]]);
        let step = if tsih_requested != 0 {
            // Connections join no existing session (MaxConnections=1):
            // "too many connections" for a live session, "session does
            // not exist" for any other TSIH (RFC 7143 11.13.5).
            let status = if inner.session_live(tsih_requested) {
                login::status::TOO_MANY_CONNECTIONS
            } else {
                login::status::SESSION_DOES_NOT_EXIST
            };
            let mut refusal = Pdu::new(op::LOGIN_RESPONSE);
            refusal.bhs[8..16].copy_from_slice(&request.bhs[8..16]);
            refusal.set_itt(request.itt());
            refusal.bhs[36..38].copy_from_slice(&status.to_be_bytes());
            LoginStep::Fail(refusal)
        } else {
            machine.step(&request)
        };
        let (mut response, done) = match step {
            LoginStep::Continue(response) => (response, None),
            LoginStep::FullFeature(response, negotiated) => (response, Some(negotiated)),
            LoginStep::Fail(mut response) => {
                response.set_u32_at(24, next_statsn);
                response.set_u32_at(28, cmdsn);
                response.set_u32_at(32, cmdsn);
                writer
                    .write_all(&response.encode(Digests::default()))
                    .await?;
                writer.flush().await?;
                let status = u16::from_be_bytes([response.bhs[36], response.bhs[37]]);
                return Err(ConnectionError::LoginRefused(status));
            }
        };
        response.set_u32_at(24, next_statsn);
        response.set_u32_at(28, cmdsn);
        response.set_u32_at(32, cmdsn.wrapping_add(COMMAND_WINDOW - 1));
        statsn = Some(next_statsn.wrapping_add(1));
        writer
            .write_all(&response.encode(Digests::default()))
            .await?;
        writer.flush().await?;
        if let Some(negotiated) = done {
            return Ok(Some((
                negotiated,
                next_statsn.wrapping_add(1),
                cmdsn,
                isid,
                tsih,
            )));
        }
    }
}

/// A write waiting for its data.
struct PendingWrite {
    lun: u64,
    cdb: [u8; 16],
    attribute: u8,
    /// Expected data transfer length of the command.
    edtl: u32,
    /// Bytes the target wants (min of the CDB's need and EDTL).
    wanted: u32,
    data: BytesMut,
    unsolicited_done: bool,
    next_unsolicited_datasn: u32,
    /// The outstanding R2T: (TTT, expected DataSN, end offset).
    r2t: Option<(u32, u32, u32)>,
    next_r2tsn: u32,
}

/// The reader side of a connection in full feature phase. Commands run
/// as their own tasks (at most [`COMMAND_WINDOW`] at once: the reader
/// waits for a slot, which is TCP backpressure); their replies and
/// everything else go to the one writer.
struct Connection {
    inner: Arc<Inner>,
    /// The I_T nexus of this session, for persistent reservations.
    nexus: Arc<Nexus>,
    tx: mpsc::Sender<Outgoing>,
    negotiated: Negotiated,
    exp_cmdsn: Arc<AtomicU32>,
    slots: Arc<Semaphore>,
    /// Payload held by running commands, in KiB.
    bytes: Arc<Semaphore>,
    pending: HashMap<u32, PendingWrite>,
    next_ttt: u32,
    /// Stop reading: a logout was answered, or TARGET COLD RESET.
    logged_out: bool,
    /// The session ended with a logout (no I_T nexus loss to report).
    clean_logout: bool,
}

/// A command ready to run.
struct Ready {
    itt: u32,
    lun: u64,
    cdb: [u8; 16],
    edtl: u32,
    read: bool,
    /// SAM task attribute (1 simple, 2 ordered, 3 head of queue).
    attribute: u8,
    data: Bytes,
}

impl Connection {
    /// Queue a PDU for the writer; `status` PDUs take a StatSN.
    async fn send(&self, pdu: Pdu, status: bool) -> Result<(), ConnectionError> {
        self.tx
            .send(Outgoing { pdu, status })
            .await
            .map_err(|_| ConnectionError::Protocol("reply writer gone"))
    }

    async fn send_all(&self, replies: Vec<(Pdu, bool)>) -> Result<(), ConnectionError> {
        for (pdu, status) in replies {
            self.send(pdu, status).await?;
        }
        Ok(())
    }

    /// Wait until every command task has answered.
    async fn drain(&self) {
        if let Ok(all) = self.slots.acquire_many(COMMAND_WINDOW).await {
            drop(all);
        }
    }

    /// Run a command as its own task: execute, then queue its replies.
    /// ORDERED and HEAD OF QUEUE tasks run alone (after everything
    /// received before them, before anything after them).
    async fn run(&self, ready: Ready) -> Result<(), ConnectionError> {
        let alone = matches!(ready.attribute, 2 | 3);
        if alone {
            self.drain().await;
        }
        let Ok(permit) = self.slots.clone().acquire_owned().await else {
            return Err(ConnectionError::Protocol("command slots closed"));
        };
        // Payload budget: the larger of the data received and the
        // initiator's expected transfer length (which bounds the Data-In).
        let cost = (ready.data.len() as u64)
            .max(u64::from(ready.edtl))
            .div_ceil(1024)
            .clamp(1, u64::from(BYTE_BUDGET_KIB)) as u32;
        let Ok(bytes) = self.bytes.clone().acquire_many_owned(cost).await else {
            return Err(ConnectionError::Protocol("byte budget closed"));
        };
        let inner = self.inner.clone();
        let nexus = self.nexus.clone();
        let tx = self.tx.clone();
        let max_send_data = self.negotiated.max_send_data;
        let task = async move {
            let _permits = (permit, bytes);
            let Ready {
                itt,
                lun,
                cdb,
                edtl,
                read,
                data,
                ..
            } = ready;
            let outcome = if !read
                && scsi::exact_data_out(&cdb)
                && u64::from(edtl) != scsi::data_out_length(&cdb)
            {
                Outcome::check(Sense::INVALID_FIELD_IN_CDB)
            } else {
                inner.lun.execute(&nexus, lun, &cdb, data).await
            };
            for (pdu, status) in replies(itt, &cdb, edtl, read, outcome, max_send_data) {
                if tx.send(Outgoing { pdu, status }).await.is_err() {
                    break;
                }
            }
        };
        if alone {
            task.await;
        } else {
            tokio::spawn(task);
        }
        Ok(())
    }

    async fn reject(&mut self, offending: &Pdu, reason: u8) -> Result<(), ConnectionError> {
        let mut pdu = Pdu::new(op::REJECT);
        pdu.set_flags(0x80);
        pdu.bhs[2] = reason;
        pdu.set_itt(RESERVED_TAG);
        let pdu = pdu.with_data(Bytes::copy_from_slice(&offending.bhs));
        self.send(pdu, true).await
    }

    /// CmdSN check of a non-immediate request: whether to process it.
    fn accept_cmdsn(&mut self, pdu: &Pdu) -> bool {
        if pdu.immediate() {
            return true;
        }
        let cmdsn = pdu.cmdsn();
        let exp = self.exp_cmdsn.load(Ordering::Acquire);
        if cmdsn == exp {
            self.exp_cmdsn.store(exp.wrapping_add(1), Ordering::Release);
            return true;
        }
        // Outside [ExpCmdSN, MaxCmdSN] (or a gap one connection cannot
        // have): silently ignored (RFC 7143 §4.2.2.1).
        tracing::debug!(cmdsn, exp, "iscsi: command outside the window ignored");
        false
    }

    async fn handle(&mut self, pdu: Pdu) -> Result<(), ConnectionError> {
        let discovery = self.negotiated.discovery;
        match pdu.opcode() {
            op::NOP_OUT => self.nop_out(pdu).await,
            op::SCSI_COMMAND if discovery => self.reject(&pdu, 0x05).await,
            op::SCSI_COMMAND => {
                if self.accept_cmdsn(&pdu) {
                    self.scsi_command(pdu).await
                } else {
                    Ok(())
                }
            }
            op::DATA_OUT if discovery => Err(ConnectionError::Protocol("Data-Out in discovery")),
            op::DATA_OUT => self.data_out(pdu).await,
            op::TASK_MANAGEMENT if discovery => self.reject(&pdu, 0x05).await,
            op::TASK_MANAGEMENT => {
                if self.accept_cmdsn(&pdu) {
                    self.task_management(pdu).await
                } else {
                    Ok(())
                }
            }
            op::TEXT => {
                if self.accept_cmdsn(&pdu) {
                    self.text(pdu).await
                } else {
                    Ok(())
                }
            }
            op::LOGOUT => {
                if self.accept_cmdsn(&pdu) {
                    self.logout(pdu).await
                } else {
                    Ok(())
                }
            }
            // ERL 0: no SNACK support; a login in FFP is a protocol error.
            _ => self.reject(&pdu, 0x04).await,
        }
    }

    async fn nop_out(&mut self, pdu: Pdu) -> Result<(), ConnectionError> {
        if pdu.itt() == RESERVED_TAG {
            // An answer to a NOP-In of ours (we send none) or a ping that
            // wants no answer.
            return Ok(());
        }
        if !pdu.immediate() && !self.accept_cmdsn(&pdu) {
            return Ok(());
        }
        let mut reply = Pdu::new(op::NOP_IN);
        reply.set_flags(0x80);
        reply.set_lun(pdu.lun());
        reply.set_itt(pdu.itt());
        reply.set_u32_at(20, RESERVED_TAG);
        let len = pdu.data.len().min(self.negotiated.max_send_data as usize);
        let reply = reply.with_data(pdu.data.slice(..len));
        self.send(reply, true).await
    }

    async fn scsi_command(&mut self, pdu: Pdu) -> Result<(), ConnectionError> {
        let mut cdb = [0u8; 16];
        cdb.copy_from_slice(&pdu.bhs[32..48]);
        let flags = pdu.flags();
        let write = flags & 0x20 != 0;
        let edtl = pdu.u32_at(20);
        if !pdu.ahs.is_empty() {
            // Extended CDBs (AHS type 1) are not used by SBC commands.
            let outcome = Outcome::check(Sense::INVALID_FIELD_IN_CDB);
            let max = self.negotiated.max_send_data;
            return self
                .send_all(replies(pdu.itt(), &cdb, edtl, false, outcome, max))
                .await;
        }
        if !write {
            if !pdu.data.is_empty() {
                return Err(ConnectionError::Protocol(
                    "immediate data without the W bit",
                ));
            }
            return self
                .run(Ready {
                    itt: pdu.itt(),
                    lun: pdu.lun(),
                    cdb,
                    edtl,
                    read: flags & 0x40 != 0,
                    attribute: flags & 0x07,
                    data: Bytes::new(),
                })
                .await;
        }
        if pdu.data.len() > edtl as usize
            || pdu.data.len() > self.negotiated.first_burst as usize
            || (!self.negotiated.immediate_data && !pdu.data.is_empty())
        {
            return Err(ConnectionError::Protocol(
                "immediate data beyond the allowed burst",
            ));
        }
        if self.pending.len() >= MAX_PENDING_WRITES || self.pending.contains_key(&pdu.itt()) {
            return Err(ConnectionError::Protocol(
                "too many writes waiting for data",
            ));
        }
        // Never solicit more than the largest transfer: a CDB asking for
        // more is refused when it runs, after at most this much data.
        let wanted = scsi::data_out_length(&cdb)
            .min(u64::from(edtl))
            .min(MAX_SOLICITED_BYTES) as u32;
        // Unsolicited Data-Out may follow only when InitialR2T=No; the F
        // bit says none follow.
        let unsolicited_done = flags & 0x80 != 0 || self.negotiated.initial_r2t;
        let mut data = BytesMut::with_capacity(edtl.min(32 << 20) as usize);
        data.extend_from_slice(&pdu.data);
        let task = PendingWrite {
            lun: pdu.lun(),
            cdb,
            attribute: flags & 0x07,
            edtl,
            wanted,
            data,
            unsolicited_done,
            next_unsolicited_datasn: 0,
            r2t: None,
            next_r2tsn: 0,
        };
        self.advance(pdu.itt(), task).await
    }

    /// Solicit more data, or run the command once it has all it needs.
    async fn advance(&mut self, itt: u32, mut task: PendingWrite) -> Result<(), ConnectionError> {
        let received = task.data.len() as u32;
        if task.unsolicited_done && task.r2t.is_none() {
            if received >= task.wanted {
                return self
                    .run(Ready {
                        itt,
                        lun: task.lun,
                        cdb: task.cdb,
                        edtl: task.edtl,
                        read: false,
                        attribute: task.attribute,
                        data: task.data.freeze(),
                    })
                    .await;
            }
            let len = (task.wanted - received).min(self.negotiated.max_burst);
            let ttt = self.next_ttt;
            self.next_ttt = self.next_ttt.wrapping_add(1);
            if self.next_ttt == RESERVED_TAG {
                self.next_ttt = 1;
            }
            let mut r2t = Pdu::new(op::R2T);
            r2t.set_flags(0x80);
            r2t.set_lun(task.lun);
            r2t.set_itt(itt);
            r2t.set_u32_at(20, ttt);
            r2t.set_u32_at(36, task.next_r2tsn);
            r2t.set_u32_at(40, received);
            r2t.set_u32_at(44, len);
            task.next_r2tsn += 1;
            task.r2t = Some((ttt, 0, received + len));
            self.send(r2t, false).await?;
        }
        self.pending.insert(itt, task);
        Ok(())
    }

    async fn data_out(&mut self, pdu: Pdu) -> Result<(), ConnectionError> {
        let itt = pdu.itt();
        let Some(mut task) = self.pending.remove(&itt) else {
            // Data of an aborted or failed task: dropped.
            return Ok(());
        };
        match self.accept_data(&mut task, &pdu) {
            Ok(()) => self.advance(itt, task).await,
            Err(reason) => {
                // A sequence error fails the task (ABORTED COMMAND, DATA
                // PHASE ERROR); the rest of its data is dropped on arrival
                // and the connection carries on.
                tracing::info!(itt, reason, "iscsi: Data-Out refused");
                let outcome = Outcome::check(Sense::DATA_PHASE_ERROR);
                let max = self.negotiated.max_send_data;
                self.send_all(replies(itt, &task.cdb, task.edtl, false, outcome, max))
                    .await
            }
        }
    }

    /// Checks one Data-Out against its task (DataSN, offset, TTT, bounds)
    /// and appends its data.
    fn accept_data(&self, task: &mut PendingWrite, pdu: &Pdu) -> Result<(), &'static str> {
        let datasn = pdu.u32_at(36);
        let offset = pdu.u32_at(40);
        let ttt = pdu.ttt();
        let end_of_sequence = pdu.final_bit();
        if offset as usize != task.data.len() {
            return Err("Data-Out out of order");
        }
        let end = u64::from(offset) + pdu.data.len() as u64;
        if end > u64::from(task.edtl) {
            return Err("Data-Out beyond the expected length");
        }
        if ttt == RESERVED_TAG {
            if task.unsolicited_done
                || datasn != task.next_unsolicited_datasn
                || end > u64::from(self.negotiated.first_burst)
            {
                return Err("bad unsolicited Data-Out");
            }
            task.next_unsolicited_datasn += 1;
            task.data.extend_from_slice(&pdu.data);
            if end_of_sequence {
                task.unsolicited_done = true;
            }
            return Ok(());
        }
        let Some((r2t_ttt, expected_datasn, r2t_end)) = task.r2t else {
            return Err("Data-Out for no R2T");
        };
        if ttt != r2t_ttt || datasn != expected_datasn || end > u64::from(r2t_end) {
            return Err("Data-Out does not match its R2T");
        }
        if end_of_sequence && end != u64::from(r2t_end) {
            return Err("R2T sequence ended short");
        }
        task.data.extend_from_slice(&pdu.data);
        task.r2t = if end_of_sequence {
            None
        } else {
            Some((r2t_ttt, expected_datasn + 1, r2t_end))
        };
        Ok(())
    }

    async fn task_management(&mut self, pdu: Pdu) -> Result<(), ConnectionError> {
        // Commands already running complete (they are never cut short);
        // the answer comes after their replies, so "task does not exist"
        // is true of them when it is sent.
        self.drain().await;
        let function = pdu.flags() & 0x7f;
        let lun = pdu.lun();
        let response = match function {
            // ABORT TASK: a write waiting for data is dropped (no
            // response for it); any other task has completed already
            // (commands run to completion in order).
            1 => {
                let rtt = pdu.u32_at(20);
                if self.pending.remove(&rtt).is_some() {
                    0
                } else {
                    1 // task does not exist
                }
            }
            // ABORT TASK SET, CLEAR TASK SET, LUN RESET.
            2 | 4 | 5 => {
                if lun != 0 {
                    2 // LUN does not exist
                } else {
                    self.pending.retain(|_, task| task.lun != lun);
                    if function == 5 {
                        let nexuses = self.inner.live_nexuses();
                        self.inner.lun.reset(Sense::DEVICE_RESET, &nexuses).await;
                    }
                    0
                }
            }
            // TARGET WARM RESET: every task of this session, the LUN's
            // SPC-2 reservation. TARGET COLD RESET: the same, then every
            // connection of the target closes (RFC 7143 11.5.1), this one
            // after its answer.
            6 | 7 => {
                self.pending.clear();
                let sense = if function == 7 {
                    Sense::POWER_ON
                } else {
                    Sense::DEVICE_RESET
                };
                let nexuses = self.inner.live_nexuses();
                self.inner.lun.reset(sense, &nexuses).await;
                if function == 7 {
                    self.logged_out = true;
                }
                0
            }
            // CLEAR ACA.
            3 => 5, // not supported
            // TASK REASSIGN: no allegiance reassignment at ERL 0.
            8 => 4,
            _ => 255,
        };
        let mut reply = Pdu::new(op::TASK_MANAGEMENT_RESPONSE);
        reply.set_flags(0x80);
        reply.bhs[2] = response;
        reply.set_itt(pdu.itt());
        self.send(reply, true).await?;
        if function == 7 {
            self.inner
                .cold_resets
                .send_modify(|n| *n = n.wrapping_add(1));
        }
        Ok(())
    }

    async fn text(&mut self, pdu: Pdu) -> Result<(), ConnectionError> {
        if pdu.flags() & 0x40 != 0 {
            return self.reject(&pdu, 0x09).await; // no continued text
        }
        let keys = parse_text(&pdu.data);
        let mut answer = Vec::new();
        for (key, value) in keys {
            match key.as_str() {
                "SendTargets"
                    if value == "All"
                        || value == self.inner.config.target_name
                        || (value.is_empty() && !self.negotiated.discovery) =>
                {
                    answer.push((
                        "TargetName".to_owned(),
                        self.inner.config.target_name.clone(),
                    ));
                    for portal in &self.inner.config.portals {
                        answer.push(("TargetAddress".to_owned(), format!("{portal},1")));
                    }
                }
                "SendTargets" => {}
                _ => answer.push((key, "NotUnderstood".to_owned())),
            }
        }
        let mut data = encode_text(&answer);
        if data.len() > self.negotiated.max_send_data as usize {
            data = data.slice(..0);
        }
        let mut reply = Pdu::new(op::TEXT_RESPONSE);
        reply.set_flags(0x80);
        reply.set_itt(pdu.itt());
        reply.set_u32_at(20, RESERVED_TAG);
        self.send(reply.with_data(data), true).await
    }

    async fn logout(&mut self, pdu: Pdu) -> Result<(), ConnectionError> {
        let reason = pdu.flags() & 0x7f;
        let mut reply = Pdu::new(op::LOGOUT_RESPONSE);
        reply.set_flags(0x80);
        // 0: closed; 2: recovery not supported (ERL 0).
        reply.bhs[2] = if reason == 2 { 2 } else { 0 };
        reply.set_itt(pdu.itt());
        self.pending.clear();
        self.drain().await;
        if reason != 2 {
            // The session's SPC-2 reservation ends before the initiator
            // hears the logout answered: another initiator's RESERVE(6)
            // right after it must not meet a conflict (libiscsi's
            // Reserve6.Logout). The session's end releases it again, a
            // no-op then.
            self.inner.lun.logging_out(&self.nexus).await;
        }
        self.send(reply, true).await?;
        self.logged_out = reason != 2;
        self.clean_logout = self.logged_out;
        Ok(())
    }
}

/// The replies of a finished command: Data-In PDUs (the last with status
/// and residual) or a SCSI Response (with sense), each with whether it
/// takes a StatSN.
fn replies(
    itt: u32,
    cdb: &[u8; 16],
    edtl: u32,
    read: bool,
    outcome: Outcome,
    max_send_data: u32,
) -> Vec<(Pdu, bool)> {
    let mut out = Vec::new();
    // (residual flags, count): 0x04 overflow, 0x02 underflow.
    let needed = if read {
        outcome.data.len() as u64
    } else {
        scsi::data_out_length(cdb)
    };
    let (residual_flags, residual_count) = match needed.cmp(&u64::from(edtl)) {
        std::cmp::Ordering::Less => (0x02u8, (u64::from(edtl) - needed) as u32),
        std::cmp::Ordering::Greater => (
            0x04,
            (needed - u64::from(edtl)).min(u64::from(u32::MAX)) as u32,
        ),
        std::cmp::Ordering::Equal => (0, 0),
    };
    let data = if read {
        outcome.data.slice(..outcome.data.len().min(edtl as usize))
    } else {
        Bytes::new()
    };
    let mut datasn = 0u32;
    if !data.is_empty() {
        let chunk = max_send_data.max(512) as usize;
        let mut at = 0;
        while at < data.len() {
            let n = chunk.min(data.len() - at);
            let last = at + n == data.len();
            let mut pdu = Pdu::new(op::DATA_IN);
            let with_status = last && outcome.sense.is_none();
            let mut flags = if last { 0x80 } else { 0 };
            if with_status {
                flags |= 0x01 | residual_flags;
                pdu.bhs[3] = outcome.status;
                pdu.set_u32_at(44, residual_count);
            }
            pdu.set_flags(flags);
            pdu.set_itt(itt);
            pdu.set_u32_at(20, RESERVED_TAG);
            pdu.set_u32_at(36, datasn);
            pdu.set_u32_at(40, at as u32);
            out.push((pdu.with_data(data.slice(at..at + n)), with_status));
            datasn += 1;
            at += n;
            if with_status {
                return out;
            }
        }
    }
    let mut pdu = Pdu::new(op::SCSI_RESPONSE);
    pdu.set_flags(0x80 | residual_flags);
    pdu.bhs[2] = 0x00; // command completed at target
    pdu.bhs[3] = outcome.status;
    pdu.set_itt(itt);
    pdu.set_u32_at(36, datasn);
    pdu.set_u32_at(44, residual_count);
    let pdu = match outcome.sense {
        Some(sense) => {
            let sense = sense.encode();
            let mut body = Vec::with_capacity(2 + sense.len());
            body.extend_from_slice(&(sense.len() as u16).to_be_bytes());
            body.extend_from_slice(&sense);
            pdu.with_data(Bytes::from(body))
        }
        None => pdu,
    };
    out.push((pdu, true));
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::nbd::MemoryBackend;
    use tokio::io::DuplexStream;

    #[test]
    fn target_names_are_iqns() {
        assert_eq!(target_name_for("Vol_0"), "iqn.2026-12.io.rackblock:vol-0");
    }

    struct Initiator {
        stream: DuplexStream,
        cmdsn: u32,
        itt: u32,
    }

    impl Initiator {
        async fn send(&mut self, pdu: Pdu) {
            self.stream
                .write_all(&pdu.encode(Digests::default()))
                .await
                .unwrap();
        }

        async fn recv(&mut self) -> Pdu {
            read_pdu_with(
                &mut self.stream,
                Digests::default(),
                1 << 20,
                pdu::decode_target,
            )
            .await
            .unwrap()
            .unwrap()
        }

        async fn login_as(&mut self, isid: [u8; 6], keys: &[(&str, &str)]) -> Pdu {
            let mut pdu = Pdu::new(op::LOGIN);
            pdu.bhs[0] |= 0x40;
            pdu.set_flags(0x87);
            pdu.bhs[8..14].copy_from_slice(&isid);
            pdu.set_u32_at(24, self.cmdsn);
            let pairs: Vec<(String, String)> = keys
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            self.send(pdu.with_data(encode_text(&pairs))).await;
            self.recv().await
        }

        fn command(&mut self, cdb: &[u8], flags: u8, edtl: u32) -> Pdu {
            let mut pdu = Pdu::new(op::SCSI_COMMAND);
            pdu.set_flags(flags);
            self.itt += 1;
            pdu.set_itt(self.itt);
            pdu.set_u32_at(20, edtl);
            pdu.set_u32_at(24, self.cmdsn);
            self.cmdsn += 1;
            pdu.bhs[32..32 + cdb.len()].copy_from_slice(cdb);
            pdu
        }
    }

    fn target() -> (IscsiServer, MemoryBackend) {
        let backend = MemoryBackend::new(1 << 20);
        let config = IscsiConfig {
            target_name: "iqn.2026-12.io.rackblock:t".into(),
            chap: None,
            portals: vec!["127.0.0.1:3260".parse().unwrap()],
            max_connections: 4,
        };
        let server = IscsiServer::new(config, Arc::new(backend.clone()), 7).unwrap();
        (server, backend)
    }

    /// A session of initiator port ("iqn.test", `isid`) on `server`.
    async fn session(server: &IscsiServer, isid: [u8; 6], initial_r2t: &str) -> Initiator {
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let server = server.clone();
        tokio::spawn(async move { server.serve_stream(theirs).await });
        let mut initiator = Initiator {
            stream: ours,
            cmdsn: 1,
            itt: 0,
        };
        let response = initiator
            .login_as(
                isid,
                &[
                    ("InitiatorName", "iqn.test"),
                    ("TargetName", "iqn.2026-12.io.rackblock:t"),
                    ("InitialR2T", initial_r2t),
                    ("FirstBurstLength", "1024"),
                    ("MaxBurstLength", "2048"),
                ],
            )
            .await;
        assert_eq!(response.opcode(), op::LOGIN_RESPONSE);
        assert_eq!(&response.bhs[36..38], &[0, 0]);
        initiator
    }

    async fn connected(initial_r2t: &str) -> (Initiator, MemoryBackend) {
        let (server, backend) = target();
        let initiator = session(&server, [0x40, 0, 0, 1, 0, 0], initial_r2t).await;
        (initiator, backend)
    }

    /// Status and sense key/ASC/ASCQ of a TEST UNIT READY.
    async fn test_unit_ready(initiator: &mut Initiator) -> (u8, Option<(u8, u8, u8)>) {
        let tur = initiator.command(&[0, 0, 0, 0, 0, 0], 0x80, 0);
        initiator.send(tur).await;
        let response = initiator.recv().await;
        assert_eq!(response.opcode(), op::SCSI_RESPONSE);
        // Sense data: a 2-byte length, then fixed format.
        let sense = (response.data.len() >= 16).then(|| {
            (
                response.data[4] & 0x0f,
                response.data[14],
                response.data[15],
            )
        });
        (response.bhs[3], sense)
    }

    /// LUN RESET: every session of the target, the issuer's included,
    /// hears BUS DEVICE RESET FUNCTION OCCURRED once (libiscsi's
    /// MultipathIO.Reset asks this of every path).
    #[tokio::test]
    async fn lun_reset_raises_a_unit_attention_on_every_session() {
        let (server, _) = target();
        let mut first = session(&server, [0x40, 0, 0, 1, 0, 0], "Yes").await;
        let mut second = session(&server, [0x40, 0, 0, 2, 0, 0], "Yes").await;
        assert_eq!(test_unit_ready(&mut first).await, (scsi::GOOD, None));
        assert_eq!(test_unit_ready(&mut second).await, (scsi::GOOD, None));
        let mut reset = Pdu::new(op::TASK_MANAGEMENT);
        reset.bhs[0] |= 0x40;
        reset.set_flags(0x80 | 5);
        reset.set_itt(99);
        reset.set_u32_at(20, RESERVED_TAG);
        reset.set_u32_at(24, first.cmdsn);
        first.send(reset).await;
        let answer = first.recv().await;
        assert_eq!(answer.opcode(), op::TASK_MANAGEMENT_RESPONSE);
        assert_eq!(answer.bhs[2], 0);
        for initiator in [&mut first, &mut second] {
            assert_eq!(
                test_unit_ready(initiator).await,
                (scsi::CHECK_CONDITION, Some((0x06, 0x29, 0x03)))
            );
            assert_eq!(test_unit_ready(initiator).await, (scsi::GOOD, None));
        }
    }

    /// Session reinstatement (RFC 7143 6.3.5): a login with the ISID of
    /// a live session closes the old connection (its write waiting for
    /// data is dropped, unanswered), and the new session's first command
    /// hears I_T NEXUS LOSS OCCURRED. A session of another ISID stays.
    #[tokio::test]
    async fn reinstatement_closes_the_old_session() {
        let (server, backend) = target();
        let isid = [0x40, 0, 0, 1, 0, 0];
        let mut old = session(&server, isid, "Yes").await;
        let mut other = session(&server, [0x40, 0, 0, 2, 0, 0], "Yes").await;
        // A write of one block waiting for its data (an R2T).
        let write = old.command(&[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0], 0xa0, 512);
        old.send(write).await;
        assert_eq!(old.recv().await.opcode(), op::R2T);
        let mut new = session(&server, isid, "Yes").await;
        // The old connection ends: end of stream, no reply to the write.
        let mut rest = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(10), old.stream.read_to_end(&mut rest)).await;
        assert!(matches!(read, Ok(Ok(_))), "the old connection stays open");
        assert!(
            rest.is_empty(),
            "{} bytes after the reinstatement",
            rest.len()
        );
        assert_eq!(backend.read_sync(0, 512).unwrap(), vec![0u8; 512]);
        assert_eq!(
            test_unit_ready(&mut new).await,
            (scsi::CHECK_CONDITION, Some((0x06, 0x29, 0x07)))
        );
        assert_eq!(test_unit_ready(&mut new).await, (scsi::GOOD, None));
        assert_eq!(test_unit_ready(&mut other).await, (scsi::GOOD, None));
    }

    #[tokio::test]
    async fn write_with_r2t_then_read_back() {
        let (mut initiator, backend) = connected("Yes").await;
        // WRITE(10) of 8 blocks = 4096 bytes, 512 immediate, the rest by R2T
        // in bursts of 2048.
        let cdb = [0x2a, 0, 0, 0, 0, 4, 0, 0, 8, 0];
        let payload: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let command = initiator
            .command(&cdb, 0xa0, 4096)
            .with_data(Bytes::copy_from_slice(&payload[..512]));
        initiator.send(command).await;
        let mut offset = 512usize;
        for expected_len in [2048usize, 1536] {
            let r2t = initiator.recv().await;
            assert_eq!(r2t.opcode(), op::R2T);
            assert_eq!(r2t.u32_at(40) as usize, offset);
            assert_eq!(r2t.u32_at(44) as usize, expected_len);
            // Two Data-Out PDUs per burst.
            let half = expected_len / 2;
            for (i, part) in [0, half].into_iter().enumerate() {
                let mut out = Pdu::new(op::DATA_OUT);
                out.set_flags(if i == 1 { 0x80 } else { 0 });
                out.set_itt(r2t.itt());
                out.set_u32_at(20, r2t.ttt());
                out.set_u32_at(36, i as u32);
                out.set_u32_at(40, (offset + part) as u32);
                let from = offset + part;
                initiator
                    .send(out.with_data(Bytes::copy_from_slice(&payload[from..from + half])))
                    .await;
            }
            offset += expected_len;
        }
        let response = initiator.recv().await;
        assert_eq!(response.opcode(), op::SCSI_RESPONSE);
        assert_eq!(response.bhs[3], scsi::GOOD);
        assert_eq!(backend.read_sync(4 * 512, 4096).unwrap(), payload);
        // READ(10) of the same 8 blocks with a larger EDTL: underflow.
        let read = initiator.command(&[0x28, 0, 0, 0, 0, 4, 0, 0, 8, 0], 0xc0, 5000);
        initiator.send(read).await;
        let data_in = initiator.recv().await;
        assert_eq!(data_in.opcode(), op::DATA_IN);
        assert_eq!(data_in.data, payload);
        assert_eq!(data_in.flags() & 0x83, 0x83); // F, U, S
        assert_eq!(data_in.u32_at(44), 904);
    }

    #[tokio::test]
    async fn unsolicited_data_cmdsn_window_and_errors() {
        let (mut initiator, backend) = connected("No").await;
        // WRITE(10) of 2 blocks: 512 immediate + 512 unsolicited Data-Out.
        let command = initiator
            .command(&[0x2a, 0, 0, 0, 0, 0, 0, 0, 2, 0], 0x20, 1024)
            .with_data(Bytes::from(vec![1u8; 512]));
        let itt = command.itt();
        initiator.send(command).await;
        let mut out = Pdu::new(op::DATA_OUT);
        out.set_flags(0x80);
        out.set_itt(itt);
        out.set_u32_at(20, RESERVED_TAG);
        out.set_u32_at(40, 512);
        initiator
            .send(out.with_data(Bytes::from(vec![2u8; 512])))
            .await;
        let response = initiator.recv().await;
        assert_eq!(response.bhs[3], scsi::GOOD);
        let max_cmdsn = response.u32_at(32);
        assert_eq!(&backend.read_sync(512, 512).unwrap()[..], &[2u8; 512][..]);
        // A command beyond MaxCmdSN is ignored: the next answer is the NOP's.
        let mut ignored = initiator.command(&[0x00], 0x80, 0);
        ignored.set_u32_at(24, max_cmdsn + 1);
        initiator.cmdsn -= 1;
        initiator.send(ignored).await;
        let mut nop = Pdu::new(op::NOP_OUT);
        nop.bhs[0] |= 0x40;
        nop.set_flags(0x80);
        nop.set_itt(99);
        nop.set_u32_at(20, RESERVED_TAG);
        nop.set_u32_at(24, initiator.cmdsn);
        initiator
            .send(nop.with_data(Bytes::from_static(b"ping")))
            .await;
        let pong = initiator.recv().await;
        assert_eq!(pong.opcode(), op::NOP_IN);
        assert_eq!(pong.itt(), 99);
        assert_eq!(&pong.data[..], b"ping");
        // Out of range read: CHECK CONDITION with fixed sense.
        let read = initiator.command(&[0x28, 0, 0, 0, 0x10, 0, 0, 0, 1, 0], 0xc0, 512);
        initiator.send(read).await;
        let response = initiator.recv().await;
        assert_eq!(response.opcode(), op::SCSI_RESPONSE);
        assert_eq!(response.bhs[3], scsi::CHECK_CONDITION);
        assert_eq!(response.data[2 + 2], 0x05);
        assert_eq!(response.data[2 + 12], 0x21);
        // SendTargets lists the portal.
        let mut text = Pdu::new(op::TEXT);
        text.bhs[0] |= 0x40;
        text.set_flags(0x80);
        text.set_itt(100);
        text.set_u32_at(20, RESERVED_TAG);
        text.set_u32_at(24, initiator.cmdsn);
        initiator
            .send(text.with_data(encode_text(&[("SendTargets".into(), "All".into())])))
            .await;
        let targets = initiator.recv().await;
        let keys = parse_text(&targets.data);
        assert!(keys.contains(&("TargetAddress".into(), "127.0.0.1:3260,1".into())));
        // A Data-Out with a DataSN out of sequence fails its task.
        let command = initiator.command(&[0x2a, 0, 0, 0, 0, 0, 0, 0, 2, 0], 0x20, 1024);
        let itt = command.itt();
        initiator.send(command).await;
        let mut out = Pdu::new(op::DATA_OUT);
        out.set_itt(itt);
        out.set_u32_at(20, RESERVED_TAG);
        out.set_u32_at(36, 27);
        initiator
            .send(out.with_data(Bytes::from(vec![2u8; 512])))
            .await;
        let failed = initiator.recv().await;
        assert_eq!(failed.opcode(), op::SCSI_RESPONSE);
        assert_eq!(failed.bhs[3], scsi::CHECK_CONDITION);
        assert_eq!(failed.data[2 + 2], 0x0b);
        // Its remaining data is dropped; the connection still answers.
        let mut late = Pdu::new(op::DATA_OUT);
        late.set_flags(0x80);
        late.set_itt(itt);
        late.set_u32_at(20, RESERVED_TAG);
        late.set_u32_at(36, 1);
        late.set_u32_at(40, 512);
        initiator
            .send(late.with_data(Bytes::from(vec![2u8; 512])))
            .await;
        let tur = initiator.command(&[0x00], 0x80, 0);
        initiator.send(tur).await;
        let good = initiator.recv().await;
        assert_eq!(
            (good.opcode(), good.bhs[3]),
            (op::SCSI_RESPONSE, scsi::GOOD)
        );
    }
}
