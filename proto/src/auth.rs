//! Unit-port authentication: who may speak on networks A and B, proven by
//! a keyed challenge-response, then a MAC on every frame.
//!
//! ```text
//! client                                              server
//!   ClientHello{role, id, nonce_c} ─────────────────▶ key K = pair key of (client role, id)
//!                                                     (unknown or refused pair: close)
//!   ◀──────── ServerHello{role, id, nonce_s, proof_s = HMAC(K, "server" | T)}
//!   K = pair key of (server role, id); check proof_s
//!   ClientFinish{proof_c = HMAC(K, "client" | T)} ──▶ check proof_c (else close)
//!   ◀─────────────────────────────────────── Welcome
//!   frames, each followed by tag = HMAC(K_dir, seq | frame)[..16]
//! ```
//!
//! `T` is the SHA-256 of both hellos (everything before `proof_s`), so a
//! proof binds both nonces and both identities; the labels make a server
//! proof useless as a client proof (no reflection). Each direction has its
//! own frame key (`K_c2s`, `K_s2c`, derived from `K` and `T`) and a
//! sequence counter starting at 0, so a frame cannot be replayed, dropped,
//! reordered or moved to the other direction or another connection
//! without the receiver's next tag failing: a bad tag closes the
//! connection ([`FrameError::Mac`]). Nothing is encrypted.
//!
//! **Keys.** A unit has one secret, the **unit key**, held by its head
//! nodes (which hold all of the unit's data anyway). Every other key is
//! derived from it with HMAC-SHA256 and a label:
//!
//! | pair | key | held by |
//! |---|---|---|
//! | head node ↔ head node | `HMAC(unit, "head-node")` | head nodes |
//! | head node ↔ sled `S` | `HMAC(unit, "sled\0" S)` | head nodes, sled `S` |
//! | operator `O` → head node | `HMAC(unit, "operator\0" O)` | head nodes, operator `O` |
//!
//! So a sled can prove only that it is itself, and only to head nodes: it
//! cannot pass for a head node to another sled, nor speak Raft. An
//! operator key opens the control-plane API of the head nodes and nothing
//! else (the daemons' access policies say which kinds each role may send).
//! Rotating the unit key re-issues every key.
//!
//! **Files** ([`init_credentials`], [`load_credential`]): a credentials
//! directory holds `unit.key` (head nodes), `sled.<id>.key` (one per sled)
//! and `operator.<name>.key`, each 64 hex digits, mode 0600.
//!
//! **Bench switch, never for production** ([`frame_macs_off`]): with
//! `RACKBLOCK_BENCH_UNIT_PORT_NO_FRAME_MAC=1` in a process's environment
//! its unit-port connections still run the whole handshake (so only
//! members connect) but carry no tag after the frames: what
//! `bench/unit-auth.sh` compares the CPU per I/O against. The switch is in
//! the handshake's transcript (other proof labels), so a process with it
//! and one without fail each other's proofs (`BadProof`) instead of one
//! side silently dropping the MACs: turning the MACs off takes both ends.
//! Daemons log a warning at start when it is set.
//!
//! The handshake is bounded: [`HANDSHAKE_TIMEOUT`] for the whole exchange,
//! at most [`MAX_ID_BYTES`] of identity. HMAC-SHA256 runs on the SHA
//! extensions where the CPU has them (`sha2` detects them at run time).

use std::fmt;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::{decode_frame, peek_frame_len, Frame, FrameError};

type HmacSha256 = Hmac<Sha256>;

/// Bytes of a key.
pub const KEY_BYTES: usize = 32;
/// Bytes of the MAC tag after every frame.
pub const TAG_BYTES: usize = 16;
/// Longest identity (node id or operator name) in a hello.
pub const MAX_ID_BYTES: usize = 255;
/// Bound on the whole handshake, either side.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Operator name used when none is given.
pub const DEFAULT_OPERATOR: &str = "operator";

const HELLO_MAGIC: [u8; 4] = *b"RBKH";
const WELCOME: [u8; 4] = *b"RBKW";
const HANDSHAKE_VERSION: u16 = 1;
const NONCE_BYTES: usize = 32;

/// The environment variable of the bench switch (module docs).
pub const BENCH_NO_FRAME_MAC_ENV: &str = "RACKBLOCK_BENCH_UNIT_PORT_NO_FRAME_MAC";

/// Whether this process runs its unit-port connections without frame MACs
/// (module docs: bench switch): `RACKBLOCK_BENCH_UNIT_PORT_NO_FRAME_MAC` set
/// to `1`, read once.
pub fn frame_macs_off() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var(BENCH_NO_FRAME_MAC_ENV).is_ok_and(|v| v == "1"))
}

/// A 256-bit secret. Its `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Key([u8; KEY_BYTES]);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> Key {
        Key(bytes)
    }

    /// A fresh key from the kernel's CSPRNG.
    pub fn random() -> std::io::Result<Key> {
        let mut bytes = [0u8; KEY_BYTES];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        Ok(Key(bytes))
    }

    /// 64 hex digits (either case, surrounding whitespace ignored).
    pub fn parse_hex(text: &str) -> Result<Key, AuthError> {
        let text = text.trim().as_bytes();
        if text.len() != KEY_BYTES * 2 {
            return Err(AuthError::BadKeyText);
        }
        let nibble = |c: u8| match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(AuthError::BadKeyText),
        };
        let mut bytes = [0u8; KEY_BYTES];
        for (i, pair) in text.chunks_exact(2).enumerate() {
            bytes[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
        }
        Ok(Key(bytes))
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// `HMAC(self, parts...)`, as a key.
    fn derive(&self, parts: &[&[u8]]) -> Key {
        Key(hmac(&self.0, parts))
    }
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length: new_from_slice cannot fail.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// Compares without an early exit.
fn equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What a unit-port peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    HeadNode,
    Sled,
    Operator,
}

impl Role {
    fn tag(self) -> u8 {
        match self {
            Role::HeadNode => 1,
            Role::Sled => 2,
            Role::Operator => 3,
        }
    }

    fn from_tag(tag: u8) -> Option<Role> {
        match tag {
            1 => Some(Role::HeadNode),
            2 => Some(Role::Sled),
            3 => Some(Role::Operator),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::HeadNode => "head-node",
            Role::Sled => "sled",
            Role::Operator => "operator",
        }
    }
}

/// An authenticated peer: what the handshake proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub role: Role,
    pub id: String,
}

/// What this process proves itself with (module docs: keys).
#[derive(Debug, Clone)]
pub enum Credential {
    /// A head node (or a tool acting with the unit key, such as
    /// `rackblock up`'s own checks and the test harness).
    Member { id: String, unit_key: Key },
    /// A sled controller: its own derived key.
    Sled { id: String, key: Key },
    /// An operator (CLI, zonal plane): its own derived key.
    Operator { name: String, key: Key },
}

impl Credential {
    pub fn role(&self) -> Role {
        match self {
            Credential::Member { .. } => Role::HeadNode,
            Credential::Sled { .. } => Role::Sled,
            Credential::Operator { .. } => Role::Operator,
        }
    }

    pub fn id(&self) -> &str {
        match self {
            Credential::Member { id, .. } => id,
            Credential::Sled { id, .. } => id,
            Credential::Operator { name, .. } => name,
        }
    }

    /// Whether this process, serving, takes connections from `client`:
    /// head nodes from head nodes and operators, sleds from head nodes,
    /// operators from nobody. (Sleds never connect to anyone.)
    fn accepts(&self, client: Role) -> bool {
        matches!(
            (self.role(), client),
            (Role::HeadNode, Role::HeadNode | Role::Operator) | (Role::Sled, Role::HeadNode)
        )
    }

    /// The key this process shares with `peer`, if the pair may talk at all
    /// (module docs: keys). Symmetric: both ends find the same key.
    fn pair_key(&self, peer_role: Role, peer_id: &str) -> Option<Key> {
        match (self, peer_role) {
            (Credential::Member { unit_key, .. }, Role::HeadNode) => Some(head_node_key(unit_key)),
            (Credential::Member { unit_key, .. }, Role::Sled) => Some(sled_key(unit_key, peer_id)),
            (Credential::Member { unit_key, .. }, Role::Operator) => {
                Some(operator_key(unit_key, peer_id))
            }
            (Credential::Sled { key, .. }, Role::HeadNode)
            | (Credential::Operator { key, .. }, Role::HeadNode) => Some(key.clone()),
            _ => None,
        }
    }
}

fn head_node_key(unit_key: &Key) -> Key {
    unit_key.derive(&[b"rackblock head-node v1"])
}

/// The key of sled `sled_id` (what `sled.<id>.key` holds).
pub fn sled_key(unit_key: &Key, sled_id: &str) -> Key {
    unit_key.derive(&[b"rackblock sled v1\0", sled_id.as_bytes()])
}

/// The key of operator `name` (what `operator.<name>.key` holds).
pub fn operator_key(unit_key: &Key, name: &str) -> Key {
    unit_key.derive(&[b"rackblock operator v1\0", name.as_bytes()])
}

/// Why a handshake or a credential failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("handshake I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("handshake timed out after {0:?}")]
    Timeout(Duration),
    #[error("not a rackblock handshake (bad magic or version)")]
    NotAHandshake,
    #[error("identity longer than {MAX_ID_BYTES} bytes or not UTF-8")]
    BadIdentity,
    #[error("unknown role tag {0}")]
    UnknownRole(u8),
    /// The pair has no key: this role may not talk to this node.
    #[error("{role} {id:?} may not connect here")]
    RefusedPeer { role: &'static str, id: String },
    /// A proof did not verify: the peer does not hold the key.
    #[error("{side} proof does not verify (wrong or missing credentials)")]
    BadProof { side: &'static str },
    #[error("the server closed the connection during the handshake (credentials refused)")]
    Rejected,
    #[error("a key file must hold 64 hex digits")]
    BadKeyText,
    #[error("credential file {}: {source}", path.display())]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl AuthError {
    /// Short stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            AuthError::Io(_) => "io",
            AuthError::Timeout(_) => "timeout",
            AuthError::NotAHandshake => "not_a_handshake",
            AuthError::BadIdentity | AuthError::UnknownRole(_) => "bad_hello",
            AuthError::RefusedPeer { .. } => "refused_peer",
            AuthError::BadProof { .. } => "bad_proof",
            AuthError::Rejected => "rejected",
            AuthError::BadKeyText | AuthError::File { .. } => "credential",
        }
    }
}

// ---- handshake messages (sans-IO) ------------------------------------------

/// magic | version u16 | role u8 | id_len u8 | id | nonce [32]
fn encode_hello(role: Role, id: &str, nonce: &[u8; NONCE_BYTES]) -> Result<Vec<u8>, AuthError> {
    if id.len() > MAX_ID_BYTES {
        return Err(AuthError::BadIdentity);
    }
    let mut out = Vec::with_capacity(8 + id.len() + NONCE_BYTES);
    out.extend_from_slice(&HELLO_MAGIC);
    out.extend_from_slice(&HANDSHAKE_VERSION.to_le_bytes());
    out.push(role.tag());
    out.push(id.len() as u8); // bounded above
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(nonce);
    Ok(out)
}

/// Reads one hello; returns its bytes (for the transcript) and contents.
async fn read_hello<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<(Vec<u8>, Peer, [u8; NONCE_BYTES]), AuthError> {
    let mut head = [0u8; 8];
    stream.read_exact(&mut head).await?;
    if head[0..4] != HELLO_MAGIC || u16::from_le_bytes([head[4], head[5]]) != HANDSHAKE_VERSION {
        return Err(AuthError::NotAHandshake);
    }
    let role = Role::from_tag(head[6]).ok_or(AuthError::UnknownRole(head[6]))?;
    let mut rest = vec![0u8; usize::from(head[7]) + NONCE_BYTES];
    stream.read_exact(&mut rest).await?;
    let id_len = usize::from(head[7]);
    let id = std::str::from_utf8(&rest[..id_len])
        .map_err(|_| AuthError::BadIdentity)?
        .to_owned();
    let mut nonce = [0u8; NONCE_BYTES];
    nonce.copy_from_slice(&rest[id_len..]);
    let mut bytes = head.to_vec();
    bytes.extend_from_slice(&rest);
    Ok((bytes, Peer { role, id }, nonce))
}

fn random_nonce() -> Result<[u8; NONCE_BYTES], AuthError> {
    let mut nonce = [0u8; NONCE_BYTES];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut nonce)?;
    Ok(nonce)
}

/// The session's secrets, from the pair key and the transcript hash.
struct Session {
    server_proof: [u8; 32],
    client_proof: [u8; 32],
    client_to_server: Key,
    server_to_client: Key,
}

impl Session {
    /// `macs`: whether frames will carry tags; part of the proofs, so both
    /// ends must agree (module docs: bench switch).
    fn new(pair_key: &Key, client_hello: &[u8], server_hello: &[u8], macs: bool) -> Session {
        let transcript: [u8; 32] = Sha256::new()
            .chain_update(client_hello)
            .chain_update(server_hello)
            .finalize()
            .into();
        let (server_label, client_label): (&[u8], &[u8]) = match macs {
            true => (b"rackblock server proof v1", b"rackblock client proof v1"),
            false => (
                b"rackblock server proof v1 bench-no-frame-mac",
                b"rackblock client proof v1 bench-no-frame-mac",
            ),
        };
        Session {
            server_proof: hmac(&pair_key.0, &[server_label, &transcript]),
            client_proof: hmac(&pair_key.0, &[client_label, &transcript]),
            client_to_server: pair_key.derive(&[b"rackblock frames c2s v1", &transcript]),
            server_to_client: pair_key.derive(&[b"rackblock frames s2c v1", &transcript]),
        }
    }
}

/// An authenticated connection's frame keys, one per direction.
#[derive(Debug)]
pub struct Authenticated {
    pub peer: Peer,
    /// Seals the frames this side sends.
    pub send: FrameMac,
    /// Verifies the frames this side receives.
    pub receive: FrameMac,
    /// Whether frames carry tags (false only under the bench switch, on
    /// both ends: module docs).
    pub frame_macs: bool,
}

impl Authenticated {
    /// The sending and receiving MACs to use: none under the bench switch.
    pub fn macs(self) -> (Option<FrameMac>, Option<FrameMac>) {
        match self.frame_macs {
            true => (Some(self.send), Some(self.receive)),
            false => (None, None),
        }
    }
}

/// The client side of the handshake on a fresh connection.
pub async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    credential: &Credential,
) -> Result<Authenticated, AuthError> {
    match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        client_exchange(stream, credential, !frame_macs_off()),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Err(AuthError::Timeout(HANDSHAKE_TIMEOUT)),
    }
}

/// `macs`: whether this end tags frames (false only under the bench switch).
async fn client_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    credential: &Credential,
    macs: bool,
) -> Result<Authenticated, AuthError> {
    let hello = encode_hello(credential.role(), credential.id(), &random_nonce()?)?;
    stream.write_all(&hello).await?;
    let (server_hello, server, _) = match read_hello(stream).await {
        Ok(read) => read,
        Err(AuthError::Io(error)) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(AuthError::Rejected)
        }
        Err(error) => return Err(error),
    };
    let mut proof = [0u8; 32];
    stream.read_exact(&mut proof).await?;
    let key = credential
        .pair_key(server.role, &server.id)
        .ok_or_else(|| AuthError::RefusedPeer {
            role: server.role.as_str(),
            id: server.id.clone(),
        })?;
    let session = Session::new(&key, &hello, &server_hello, macs);
    if !equal(&proof, &session.server_proof) {
        return Err(AuthError::BadProof { side: "server" });
    }
    stream.write_all(&session.client_proof).await?;
    let mut welcome = [0u8; 4];
    match stream.read_exact(&mut welcome).await {
        Ok(_) if welcome == WELCOME => {}
        Ok(_) => return Err(AuthError::NotAHandshake),
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(AuthError::Rejected)
        }
        Err(error) => return Err(error.into()),
    }
    Ok(Authenticated {
        peer: server,
        send: FrameMac::new(&session.client_to_server),
        receive: FrameMac::new(&session.server_to_client),
        frame_macs: macs,
    })
}

/// The server side of the handshake on an accepted connection. Nothing
/// the client sends before it succeeds reaches a handler.
pub async fn server_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    credential: &Credential,
) -> Result<Authenticated, AuthError> {
    match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        server_exchange(stream, credential, !frame_macs_off()),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Err(AuthError::Timeout(HANDSHAKE_TIMEOUT)),
    }
}

/// `macs`: as [`client_exchange`]'s.
async fn server_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    credential: &Credential,
    macs: bool,
) -> Result<Authenticated, AuthError> {
    let (client_hello, client, _) = read_hello(stream).await?;
    let key = Some(())
        .filter(|()| credential.accepts(client.role))
        .and_then(|()| credential.pair_key(client.role, &client.id))
        .ok_or_else(|| AuthError::RefusedPeer {
            role: client.role.as_str(),
            id: client.id.clone(),
        })?;
    let server_hello = encode_hello(credential.role(), credential.id(), &random_nonce()?)?;
    let session = Session::new(&key, &client_hello, &server_hello, macs);
    let mut reply = server_hello;
    reply.extend_from_slice(&session.server_proof);
    stream.write_all(&reply).await?;
    let mut proof = [0u8; 32];
    stream.read_exact(&mut proof).await?;
    if !equal(&proof, &session.client_proof) {
        return Err(AuthError::BadProof { side: "client" });
    }
    stream.write_all(&WELCOME).await?;
    Ok(Authenticated {
        peer: client,
        send: FrameMac::new(&session.server_to_client),
        receive: FrameMac::new(&session.client_to_server),
        frame_macs: macs,
    })
}

// ---- per-frame MAC ----------------------------------------------------------

/// One direction's frame MAC: `HMAC-SHA256(key, seq_le | frame)`, first
/// [`TAG_BYTES`] bytes, `seq` counting frames from 0.
#[derive(Clone)]
pub struct FrameMac {
    /// Keyed once; cloned per frame (the inner and outer pads are hashed).
    keyed: HmacSha256,
    sequence: u64,
}

impl fmt::Debug for FrameMac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameMac")
            .field("sequence", &self.sequence)
            .finish_non_exhaustive()
    }
}

impl FrameMac {
    pub fn new(key: &Key) -> FrameMac {
        let keyed = match HmacSha256::new_from_slice(&key.0) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC takes keys of any length"),
        };
        FrameMac { keyed, sequence: 0 }
    }

    fn next(&mut self, frame: &[u8]) -> HmacSha256 {
        let mut mac = self.keyed.clone();
        mac.update(&self.sequence.to_le_bytes());
        mac.update(frame);
        self.sequence = self.sequence.wrapping_add(1);
        mac
    }

    /// The tag of the next frame sent.
    pub fn seal(&mut self, frame: &[u8]) -> [u8; TAG_BYTES] {
        let full = self.next(frame).finalize().into_bytes();
        let mut tag = [0u8; TAG_BYTES];
        tag.copy_from_slice(&full[..TAG_BYTES]);
        tag
    }

    /// Whether `tag` is the next received frame's (constant time).
    pub fn verify(&mut self, frame: &[u8], tag: &[u8]) -> bool {
        self.next(frame).verify_truncated_left(tag).is_ok()
    }
}

/// Frame decoder of an authenticated connection: every frame must be
/// followed by its tag, checked before the frame is decoded. Without a MAC
/// it is the plain [`crate::frame::FrameCodec`] decoder.
#[derive(Debug, Default)]
pub struct AuthCodec {
    receive: Option<FrameMac>,
}

impl AuthCodec {
    pub fn new(receive: Option<FrameMac>) -> AuthCodec {
        AuthCodec { receive }
    }
}

/// Most buffer space reserved ahead of a body's bytes (as the frame codec).
const RESERVE_AHEAD_BYTES: usize = 64 << 10;

impl tokio_util::codec::Decoder for AuthCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let Some(mac) = &mut self.receive else {
            return decode_frame(src);
        };
        let Some(frame_len) = peek_frame_len(src)? else {
            return Ok(None);
        };
        let needed = frame_len + TAG_BYTES;
        if src.len() < needed {
            src.reserve((needed - src.len()).min(RESERVE_AHEAD_BYTES));
            return Ok(None);
        }
        if !mac.verify(&src[..frame_len], &src[frame_len..needed]) {
            return Err(FrameError::Mac);
        }
        let frame = decode_frame(src)?.ok_or(FrameError::Truncated)?;
        src.advance(TAG_BYTES);
        Ok(Some(frame))
    }
}

// ---- credential files -------------------------------------------------------

/// `unit.key`: the unit key, for head nodes.
pub const UNIT_KEY_FILE: &str = "unit.key";

/// File name of sled `id`'s key.
pub fn sled_key_file(id: &str) -> String {
    format!("sled.{id}.key")
}

/// File name of operator `name`'s key.
pub fn operator_key_file(name: &str) -> String {
    format!("operator.{name}.key")
}

/// Creates `dir` (mode 0700) with a fresh unit key and the derived keys of
/// `sleds` and `operators` (mode 0600 each). An existing `unit.key` is kept
/// unless `rotate`, so running it again only adds missing files; with
/// `rotate` every key is new (restart every member afterwards).
pub fn init_credentials(
    dir: &Path,
    sleds: &[String],
    operators: &[String],
    rotate: bool,
) -> Result<Vec<PathBuf>, AuthError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let file_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AuthError::File { path, source }
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(file_error(dir))?;
    let unit_path = dir.join(UNIT_KEY_FILE);
    let existing = if rotate {
        None
    } else {
        match std::fs::read_to_string(&unit_path) {
            Ok(text) => Some(Key::parse_hex(&text)?),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(AuthError::File {
                    path: unit_path,
                    source,
                })
            }
        }
    };
    let unit_key = match existing {
        Some(key) => key,
        None => Key::random().map_err(file_error(&unit_path))?,
    };
    let mut files = vec![(unit_path, unit_key.clone())];
    for sled in sleds {
        files.push((dir.join(sled_key_file(sled)), sled_key(&unit_key, sled)));
    }
    for name in operators {
        files.push((
            dir.join(operator_key_file(name)),
            operator_key(&unit_key, name),
        ));
    }
    let mut written = Vec::with_capacity(files.len());
    for (path, key) in files {
        // Written beside and renamed, so a reader never sees half a key.
        let temporary = path.with_extension("key.tmp");
        {
            use std::io::Write as _;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temporary)
                .map_err(file_error(&temporary))?;
            file.write_all(format!("{}\n", key.to_hex()).as_bytes())
                .map_err(file_error(&temporary))?;
            file.sync_all().map_err(file_error(&temporary))?;
        }
        std::fs::rename(&temporary, &path).map_err(file_error(&path))?;
        written.push(path);
    }
    Ok(written)
}

fn read_key(path: &Path) -> Result<Key, AuthError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuthError::File {
        path: path.to_path_buf(),
        source,
    })?;
    Key::parse_hex(&text)
}

/// The credential of `role` `id` from `dir` (module docs: files).
pub fn load_credential(dir: &Path, role: Role, id: &str) -> Result<Credential, AuthError> {
    Ok(match role {
        Role::HeadNode => Credential::Member {
            id: id.to_owned(),
            unit_key: read_key(&dir.join(UNIT_KEY_FILE))?,
        },
        Role::Sled => Credential::Sled {
            id: id.to_owned(),
            key: read_key(&dir.join(sled_key_file(id)))?,
        },
        Role::Operator => Credential::Operator {
            name: id.to_owned(),
            key: read_key(&dir.join(operator_key_file(id)))?,
        },
    })
}

/// Where a unit's credentials are unless configured otherwise: the
/// `credentials` directory beside its rack file.
pub fn default_credentials_dir(rack_file: &Path) -> PathBuf {
    rack_file
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("credentials")
}

/// The credential an operator tool uses with the unit of `credentials_dir`:
/// the operator key of `name` if present, else the unit key (a tool running
/// beside a head node, such as `rackblock up`), else `None` (the unit's
/// head nodes will refuse it).
pub fn operator_credential(credentials_dir: &Path, name: &str) -> Option<Credential> {
    load_credential(credentials_dir, Role::Operator, name)
        .or_else(|_| {
            read_key(&credentials_dir.join(UNIT_KEY_FILE)).map(|unit_key| Credential::Operator {
                name: name.to_owned(),
                key: operator_key(&unit_key, name),
            })
        })
        .ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    fn unit_key() -> Key {
        Key::from_bytes([7; KEY_BYTES])
    }

    async fn pair(
        client: Credential,
        server: Credential,
    ) -> (
        Result<Authenticated, AuthError>,
        Result<Authenticated, AuthError>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server_side = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            server_handshake(&mut stream, &server).await
        });
        let mut stream = TcpStream::connect(address).await.unwrap();
        let client_result = client_handshake(&mut stream, &client).await;
        drop(stream);
        (client_result, server_side.await.unwrap())
    }

    fn member(id: &str) -> Credential {
        Credential::Member {
            id: id.into(),
            unit_key: unit_key(),
        }
    }

    /// The bench switch (module docs) takes both ends: one end without
    /// frame MACs and one with fail each other's proofs; both without
    /// authenticate and use no MAC.
    #[tokio::test]
    async fn the_bench_switch_needs_both_ends() {
        for (client_macs, server_macs) in [(true, false), (false, true), (false, false)] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            let server = tokio::spawn(async move {
                let (mut stream, _) = listener.accept().await.unwrap();
                server_exchange(&mut stream, &member("hn-2"), server_macs).await
            });
            let mut stream = TcpStream::connect(address).await.unwrap();
            let client = client_exchange(&mut stream, &member("hn-1"), client_macs).await;
            drop(stream);
            let server = server.await.unwrap();
            if client_macs == server_macs {
                let (client, server) = (client.unwrap(), server.unwrap());
                assert!(!client.frame_macs && !server.frame_macs);
                assert!(matches!(client.macs(), (None, None)));
                assert!(matches!(server.macs(), (None, None)));
            } else {
                assert!(
                    matches!(client, Err(AuthError::BadProof { side: "server" })),
                    "{client:?}"
                );
                assert!(server.is_err(), "{server:?}");
            }
        }
    }

    #[tokio::test]
    async fn members_sleds_and_operators_authenticate_where_allowed() {
        let (c, s) = pair(member("hn-1"), member("hn-2")).await;
        let (c, s) = (c.unwrap(), s.unwrap());
        assert_eq!(
            c.peer,
            Peer {
                role: Role::HeadNode,
                id: "hn-2".into()
            }
        );
        assert_eq!(
            s.peer,
            Peer {
                role: Role::HeadNode,
                id: "hn-1".into()
            }
        );
        let sled = Credential::Sled {
            id: "sled-1".into(),
            key: sled_key(&unit_key(), "sled-1"),
        };
        let (c, s) = pair(member("hn-1"), sled.clone()).await;
        assert!(c.is_ok() && s.is_ok());
        let operator = Credential::Operator {
            name: "ops".into(),
            key: operator_key(&unit_key(), "ops"),
        };
        let (c, s) = pair(operator.clone(), member("hn-1")).await;
        assert_eq!(s.unwrap().peer.role, Role::Operator);
        assert!(c.is_ok());
        // An operator may not reach a sled; a sled may not pass for another.
        let (_, s) = pair(operator, sled.clone()).await;
        assert!(matches!(s, Err(AuthError::RefusedPeer { .. })));
        let other_sled = Credential::Sled {
            id: "sled-2".into(),
            key: sled_key(&unit_key(), "sled-2"),
        };
        let (_, s) = pair(other_sled.clone(), sled).await;
        assert!(matches!(s, Err(AuthError::RefusedPeer { .. })));
        // A sled connects to no one; a head node does not take it.
        let (_, s) = pair(other_sled, member("hn-1")).await;
        assert!(matches!(s, Err(AuthError::RefusedPeer { .. })));
    }

    #[tokio::test]
    async fn a_wrong_key_fails_on_both_sides() {
        let stranger = Credential::Member {
            id: "hn-1".into(),
            unit_key: Key::from_bytes([8; KEY_BYTES]),
        };
        let (c, s) = pair(stranger, member("hn-2")).await;
        assert!(matches!(c, Err(AuthError::BadProof { side: "server" })));
        assert!(s.is_err());
        // A sled key claimed under another sled's name.
        let forged = Credential::Sled {
            id: "sled-1".into(),
            key: sled_key(&unit_key(), "sled-9"),
        };
        let sled1 = Credential::Sled {
            id: "sled-1".into(),
            key: sled_key(&unit_key(), "sled-1"),
        };
        let (c, _) = pair(member("hn-1"), forged.clone()).await;
        assert!(matches!(c, Err(AuthError::BadProof { .. })));
        let _ = sled1;
    }

    #[test]
    fn frame_tags_bind_key_sequence_and_bytes() {
        let key = Key::from_bytes([1; KEY_BYTES]);
        let mut send = FrameMac::new(&key);
        let mut receive = FrameMac::new(&key);
        let first = send.seal(b"frame one");
        let second = send.seal(b"frame two");
        // Replaying or reordering fails.
        assert!(!receive.clone().verify(b"frame two", &second));
        assert!(receive.verify(b"frame one", &first));
        assert!(!receive.clone().verify(b"frame one", &first));
        assert!(!receive.clone().verify(b"frame twO", &second));
        assert!(receive.verify(b"frame two", &second));
        let mut other = FrameMac::new(&Key::from_bytes([2; KEY_BYTES]));
        assert!(!other.verify(b"frame one", &first));
    }

    #[test]
    fn codec_refuses_a_tampered_frame() {
        use tokio_util::codec::Decoder as _;
        let key = Key::from_bytes([3; KEY_BYTES]);
        let mut send = FrameMac::new(&key);
        let frame = crate::frame::encode_frame(0x0001, 0, 9, &5u64.to_le_bytes()).unwrap();
        let mut wire = BytesMut::new();
        for _ in 0..2 {
            wire.extend_from_slice(&frame);
            wire.extend_from_slice(&send.seal(&frame));
        }
        let mut codec = AuthCodec::new(Some(FrameMac::new(&key)));
        let mut good = wire.clone();
        assert!(codec.decode(&mut good).unwrap().is_some());
        assert!(codec.decode(&mut good).unwrap().is_some());
        assert!(good.is_empty());
        let mut bad = wire.clone();
        let at = bad.len() - 1;
        bad[at] ^= 1;
        let mut codec = AuthCodec::new(Some(FrameMac::new(&key)));
        assert!(codec.decode(&mut bad).unwrap().is_some());
        assert!(matches!(codec.decode(&mut bad), Err(FrameError::Mac)));
    }

    #[test]
    fn credential_files_round_trip_and_survive_a_rerun() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials");
        init_credentials(&path, &["sled-1".into()], &[DEFAULT_OPERATOR.into()], false).unwrap();
        let first = load_credential(&path, Role::HeadNode, "hn-1").unwrap();
        init_credentials(&path, &["sled-1".into()], &[DEFAULT_OPERATOR.into()], false).unwrap();
        let again = load_credential(&path, Role::HeadNode, "hn-1").unwrap();
        let (Credential::Member { unit_key: a, .. }, Credential::Member { unit_key: b, .. }) =
            (&first, &again)
        else {
            panic!("members")
        };
        assert_eq!(a, b, "a rerun keeps the unit key");
        let Credential::Sled { key, .. } = load_credential(&path, Role::Sled, "sled-1").unwrap()
        else {
            panic!("sled")
        };
        assert_eq!(key, sled_key(a, "sled-1"));
        assert!(operator_credential(&path, DEFAULT_OPERATOR).is_some());
        init_credentials(&path, &[], &[], true).unwrap();
        let Credential::Member {
            unit_key: rotated, ..
        } = load_credential(&path, Role::HeadNode, "hn-1").unwrap()
        else {
            panic!("member")
        };
        assert_ne!(&rotated, a, "rotation makes a new unit key");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(path.join(UNIT_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
