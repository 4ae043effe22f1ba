//! The seam under the NBD server: [`NbdBackend`], with the volume client
//! and an in-memory store as implementations.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use proto::volume::HostError;

use super::wire::NbdErrno;
use crate::{ClientError, VolumeClient};

/// Why a backend operation failed, as an NBD error class plus a message
/// for humans (sent in structured error chunks, logged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{errno}: {message}")]
pub struct BackendError {
    pub errno: NbdErrno,
    pub message: String,
}

impl BackendError {
    pub fn new(errno: NbdErrno, message: impl Into<String>) -> BackendError {
        BackendError {
            errno,
            message: message.into(),
        }
    }

    pub fn io(message: impl Into<String>) -> BackendError {
        BackendError::new(NbdErrno::Io, message)
    }

    pub fn invalid(message: impl Into<String>) -> BackendError {
        BackendError::new(NbdErrno::Invalid, message)
    }
}

/// A block device the NBD server exports. One backend is shared by every
/// connection to its export.
///
/// Contract (what makes `NBD_FLAG_CAN_MULTI_CONN` honest):
/// * a completed `write`/`trim`/`write_zeroes` is visible to every later
///   `read`, whichever connection issues it;
/// * a completed `flush` makes durable every write completed before it
///   was called, from any connection; `fua` makes that one write durable
///   before it completes.
///
/// Offsets and lengths arrive validated (512-byte aligned, inside
/// `size_bytes()`, lengths nonzero); implementations check again and
/// answer `EINVAL`/`ENOSPC` rather than trust it. A backend that can ride
/// out a transient fault should do so inside the call: the NBD layer does
/// not retry and never times a request out.
pub trait NbdBackend: Send + Sync + 'static {
    /// Size of the export in bytes (a multiple of 512).
    fn size_bytes(&self) -> u64;
    /// Human-readable description for `NBD_INFO_DESCRIPTION` and listings.
    fn description(&self) -> String {
        String::new()
    }
    /// Exactly `len` bytes at `offset_bytes`.
    fn read(&self, offset_bytes: u64, len: u64) -> BoxFuture<'_, Result<Bytes, BackendError>>;
    fn write(
        &self,
        offset_bytes: u64,
        data: Bytes,
        fua: bool,
    ) -> BoxFuture<'_, Result<(), BackendError>>;
    fn flush(&self) -> BoxFuture<'_, Result<(), BackendError>>;
    /// The range may be discarded (it reads back as zeros on both
    /// implementations here, though NBD does not promise that).
    fn trim(&self, offset_bytes: u64, len: u64) -> BoxFuture<'_, Result<(), BackendError>>;
    /// The range reads back as zeros.
    fn write_zeroes(&self, offset_bytes: u64, len: u64) -> BoxFuture<'_, Result<(), BackendError>>;
}

/// A shared backend is a backend (wrappers such as QoS and metrics take
/// any backend, the server takes `Arc<dyn NbdBackend>`).
impl<B: NbdBackend + ?Sized> NbdBackend for Arc<B> {
    fn size_bytes(&self) -> u64 {
        (**self).size_bytes()
    }

    fn description(&self) -> String {
        (**self).description()
    }

    fn read(&self, offset_bytes: u64, len: u64) -> BoxFuture<'_, Result<Bytes, BackendError>> {
        (**self).read(offset_bytes, len)
    }

    fn write(
        &self,
        offset_bytes: u64,
        data: Bytes,
        fua: bool,
    ) -> BoxFuture<'_, Result<(), BackendError>> {
        (**self).write(offset_bytes, data, fua)
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        (**self).flush()
    }

    fn trim(&self, offset_bytes: u64, len: u64) -> BoxFuture<'_, Result<(), BackendError>> {
        (**self).trim(offset_bytes, len)
    }

    fn write_zeroes(&self, offset_bytes: u64, len: u64) -> BoxFuture<'_, Result<(), BackendError>> {
        (**self).write_zeroes(offset_bytes, len)
    }
}

// ---------------------------------------------------------------------------
// VolumeClient

/// Which operation failed, for [`volume_error_to_nbd`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendOp {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
}

impl BackendOp {
    fn writes(self) -> bool {
        matches!(self, BackendOp::Write | BackendOp::WriteZeroes)
    }
}

/// The one mapping from volume-client errors to NBD errors.
///
/// * Out of range (caught by the client, or refused by a head node):
///   `ENOSPC` for writes, `EINVAL` otherwise (the spec's SHOULD).
/// * Misaligned, bad request: `EINVAL`.
/// * Client closed (host agent shutting down): `ESHUTDOWN`, which tells
///   the NBD client to disconnect.
/// * Attachment credential refused (detached, deleted): `EPERM`, at once
///   (never retried).
/// * Everything else: `EIO`. Retryable errors (`Unavailable`, `Map`) only
///   get here after the client has retried them for its whole
///   `failover_timeout`, so the NBD layer never fails a request early.
pub fn volume_error_to_nbd(op: BackendOp, error: &ClientError) -> NbdErrno {
    let out_of_range = if op.writes() {
        NbdErrno::NoSpace
    } else {
        NbdErrno::Invalid
    };
    match error {
        ClientError::Misaligned { .. } => NbdErrno::Invalid,
        ClientError::OutOfRange { .. } => out_of_range,
        ClientError::Refused { error, .. } => match **error {
            HostError::OutOfRange { .. } => out_of_range,
            HostError::BadRequest { .. } => NbdErrno::Invalid,
            HostError::Unauthorized { .. } => NbdErrno::PermissionDenied,
            _ => NbdErrno::Io,
        },
        ClientError::Closed { .. } => NbdErrno::Shutdown,
        ClientError::ReadOnly { .. } => NbdErrno::PermissionDenied,
        ClientError::Unauthorized { .. } | ClientError::VolumeGone { .. } => {
            NbdErrno::PermissionDenied
        }
        ClientError::ChecksumMismatch { .. }
        | ClientError::Unavailable { .. }
        | ClientError::Map { .. }
        | ClientError::Protocol { .. }
        | ClientError::TlsRequired { .. } => NbdErrno::Io,
    }
}

fn map_volume(op: BackendOp) -> impl Fn(ClientError) -> BackendError {
    move |error| BackendError::new(volume_error_to_nbd(op, &error), error.to_string())
}

impl NbdBackend for VolumeClient {
    fn size_bytes(&self) -> u64 {
        VolumeClient::size_bytes(self)
    }

    fn description(&self) -> String {
        format!("rackblock volume {}", self.volume())
    }

    fn read(&self, offset_bytes: u64, len: u64) -> BoxFuture<'_, Result<Bytes, BackendError>> {
        Box::pin(async move {
            VolumeClient::read(self, offset_bytes, len)
                .await
                .map_err(map_volume(BackendOp::Read))
        })
    }

    fn write(
        &self,
        offset_bytes: u64,
        data: Bytes,
        fua: bool,
    ) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            VolumeClient::write(self, offset_bytes, data, fua)
                .await
                .map_err(map_volume(BackendOp::Write))
        })
    }

    /// No round trip: a volume write is acknowledged only once it is
    /// durable in two head nodes' logs, so every write an NBD client has
    /// seen completed (on any connection: the multi-conn contract) is
    /// durable already. The server waits for the writes received before
    /// the FLUSH on its connection before calling this, which makes it the
    /// barrier the spec asks for. A `HostOp::Flush` to every primary (what
    /// [`VolumeClient::flush`] does) would only add a round trip per
    /// partition to every `fsync` of the host.
    fn flush(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            if self.is_closed() {
                let error = ClientError::Closed {
                    volume: self.volume(),
                };
                return Err(map_volume(BackendOp::Flush)(error));
            }
            Ok(())
        })
    }

    fn trim(&self, offset_bytes: u64, len: u64) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            VolumeClient::trim(self, offset_bytes, len)
                .await
                .map_err(map_volume(BackendOp::Trim))
        })
    }

    fn write_zeroes(&self, offset_bytes: u64, len: u64) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            VolumeClient::write_zeroes(self, offset_bytes, len)
                .await
                .map_err(map_volume(BackendOp::WriteZeroes))
        })
    }
}

// ---------------------------------------------------------------------------
// MemoryBackend

/// Granularity of [`MemoryBackend`]'s sparse storage.
const MEMORY_CHUNK_BYTES: u64 = 64 * 1024;
const SECTOR_BYTES: u64 = 512;

/// A sparse in-memory export (tests, `rackblock attach --memory`). Chunks
/// of 64 KiB are allocated on first write and dropped again when trimmed
/// or zeroed whole, so a large empty export costs nothing. All operations
/// are synchronous under one lock, which gives the multi-conn contract for
/// free. Optional fault injection answers chosen operations with an error.
#[derive(Debug, Clone)]
pub struct MemoryBackend {
    inner: Arc<MemoryInner>,
}

#[derive(Debug)]
struct MemoryInner {
    size_bytes: u64,
    description: String,
    state: Mutex<MemoryState>,
}

#[derive(Debug, Default)]
struct MemoryState {
    chunks: BTreeMap<u64, Box<[u8]>>,
    faults: Vec<MemoryFault>,
    flushes: u64,
}

/// An injected failure: any matching operation overlapping
/// `[offset_bytes, offset_bytes + len)` fails with `errno`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryFault {
    pub op: BackendOp,
    pub offset_bytes: u64,
    pub len: u64,
    pub errno: NbdErrno,
}

impl MemoryBackend {
    /// An all-zero export of `size_bytes` (rounded down to 512).
    pub fn new(size_bytes: u64) -> MemoryBackend {
        MemoryBackend::with_description(size_bytes, "rackblock in-memory export")
    }

    pub fn with_description(size_bytes: u64, description: impl Into<String>) -> MemoryBackend {
        MemoryBackend {
            inner: Arc::new(MemoryInner {
                size_bytes: size_bytes - size_bytes % SECTOR_BYTES,
                description: description.into(),
                state: Mutex::new(MemoryState::default()),
            }),
        }
    }

    /// Fail matching operations from now on.
    pub fn inject_fault(&self, fault: MemoryFault) {
        self.lock().faults.push(fault);
    }

    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// Number of completed flushes (for tests).
    pub fn flush_count(&self) -> u64 {
        self.lock().flushes
    }

    /// Bytes of memory holding data.
    pub fn allocated_bytes(&self) -> u64 {
        self.lock().chunks.len() as u64 * MEMORY_CHUNK_BYTES
    }

    /// Synchronous read for tests and tools.
    pub fn read_sync(&self, offset_bytes: u64, len: u64) -> Result<Bytes, BackendError> {
        self.check(BackendOp::Read, offset_bytes, len)?;
        let state = self.lock();
        let capacity = usize::try_from(len).map_err(|_| BackendError::invalid("length"))?;
        let mut out = BytesMut::zeroed(capacity);
        for_each_chunk(offset_bytes, len, |chunk, within, at, n| {
            if let Some(data) = state.chunks.get(&chunk) {
                out[at..at + n].copy_from_slice(&data[within..within + n]);
            }
        });
        Ok(out.freeze())
    }

    /// Synchronous write for tests and tools.
    pub fn write_sync(&self, offset_bytes: u64, data: &[u8]) -> Result<(), BackendError> {
        self.check(BackendOp::Write, offset_bytes, data.len() as u64)?;
        let mut state = self.lock();
        for_each_chunk(offset_bytes, data.len() as u64, |chunk, within, at, n| {
            let stored = state
                .chunks
                .entry(chunk)
                .or_insert_with(|| vec![0u8; MEMORY_CHUNK_BYTES as usize].into_boxed_slice());
            stored[within..within + n].copy_from_slice(&data[at..at + n]);
        });
        Ok(())
    }

    fn zero_sync(&self, op: BackendOp, offset_bytes: u64, len: u64) -> Result<(), BackendError> {
        self.check(op, offset_bytes, len)?;
        let mut state = self.lock();
        for_each_chunk(offset_bytes, len, |chunk, within, _, n| {
            if n as u64 == MEMORY_CHUNK_BYTES {
                state.chunks.remove(&chunk);
            } else if let Some(stored) = state.chunks.get_mut(&chunk) {
                stored[within..within + n].fill(0);
            }
        });
        Ok(())
    }

    fn check(&self, op: BackendOp, offset_bytes: u64, len: u64) -> Result<(), BackendError> {
        if offset_bytes % SECTOR_BYTES != 0 || len % SECTOR_BYTES != 0 {
            return Err(BackendError::invalid(format!(
                "range {offset_bytes}+{len} is not 512-byte aligned"
            )));
        }
        let end = offset_bytes.checked_add(len);
        if end.is_none_or(|end| end > self.inner.size_bytes) {
            let errno = if op.writes() {
                NbdErrno::NoSpace
            } else {
                NbdErrno::Invalid
            };
            return Err(BackendError::new(
                errno,
                format!(
                    "range {offset_bytes}+{len} beyond the export of {} bytes",
                    self.inner.size_bytes
                ),
            ));
        }
        let state = self.lock();
        let end = offset_bytes.saturating_add(len);
        if let Some(fault) = state.faults.iter().find(|fault| {
            fault.op == op
                && fault.offset_bytes < end.max(offset_bytes + 1)
                && offset_bytes < fault.offset_bytes.saturating_add(fault.len)
        }) {
            return Err(BackendError::new(
                fault.errno,
                format!("injected fault at {}", fault.offset_bytes),
            ));
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, MemoryState> {
        // The state stays consistent across a panic (plain byte copies).
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Call `f(chunk_index, offset_within_chunk, offset_within_range, len)`
/// for each chunk piece of the range.
fn for_each_chunk(offset_bytes: u64, len: u64, mut f: impl FnMut(u64, usize, usize, usize)) {
    let mut at = 0u64;
    while at < len {
        let absolute = offset_bytes + at;
        let chunk = absolute / MEMORY_CHUNK_BYTES;
        let within = absolute % MEMORY_CHUNK_BYTES;
        let n = (MEMORY_CHUNK_BYTES - within).min(len - at);
        f(chunk, within as usize, at as usize, n as usize);
        at += n;
    }
}

impl NbdBackend for MemoryBackend {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes
    }

    fn description(&self) -> String {
        self.inner.description.clone()
    }

    fn read(&self, offset_bytes: u64, len: u64) -> BoxFuture<'_, Result<Bytes, BackendError>> {
        Box::pin(async move { self.read_sync(offset_bytes, len) })
    }

    fn write(
        &self,
        offset_bytes: u64,
        data: Bytes,
        _fua: bool,
    ) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move { self.write_sync(offset_bytes, &data) })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            self.check(BackendOp::Flush, 0, 0)?;
            self.lock().flushes += 1;
            Ok(())
        })
    }

    fn trim(&self, offset_bytes: u64, len: u64) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move { self.zero_sync(BackendOp::Trim, offset_bytes, len) })
    }

    fn write_zeroes(&self, offset_bytes: u64, len: u64) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move { self.zero_sync(BackendOp::WriteZeroes, offset_bytes, len) })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn memory_backend_matches_a_flat_model() {
        let size = 4 * MEMORY_CHUNK_BYTES;
        let backend = MemoryBackend::new(size);
        let mut model = vec![0u8; size as usize];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..500 {
            let offset = (next() % (size / 512)) * 512;
            let len = ((next() % 300) + 1) * 512;
            let len = len.min(size - offset);
            match next() % 3 {
                0 => {
                    let byte = next() as u8;
                    backend
                        .write_sync(offset, &vec![byte; len as usize])
                        .unwrap();
                    model[offset as usize..(offset + len) as usize].fill(byte);
                }
                1 => {
                    backend.zero_sync(BackendOp::Trim, offset, len).unwrap();
                    model[offset as usize..(offset + len) as usize].fill(0);
                }
                _ => {
                    let got = backend.read_sync(offset, len).unwrap();
                    assert_eq!(&got[..], &model[offset as usize..(offset + len) as usize]);
                }
            }
        }
        assert_eq!(&backend.read_sync(0, size).unwrap()[..], &model[..]);
    }

    #[test]
    fn memory_backend_checks_ranges_and_faults() {
        let backend = MemoryBackend::new(1 << 20);
        assert_eq!(
            backend.read_sync(1 << 20, 512).unwrap_err().errno,
            NbdErrno::Invalid
        );
        assert_eq!(
            backend.write_sync(1 << 20, &[0; 512]).unwrap_err().errno,
            NbdErrno::NoSpace
        );
        assert_eq!(
            backend.read_sync(1, 512).unwrap_err().errno,
            NbdErrno::Invalid
        );
        backend.inject_fault(MemoryFault {
            op: BackendOp::Read,
            offset_bytes: 4096,
            len: 512,
            errno: NbdErrno::Io,
        });
        assert_eq!(backend.read_sync(0, 8192).unwrap_err().errno, NbdErrno::Io);
        assert!(backend.read_sync(0, 4096).is_ok());
        backend.clear_faults();
        assert!(backend.read_sync(0, 8192).is_ok());
    }

    #[test]
    fn volume_errors_map_per_spec() {
        let oor = ClientError::OutOfRange {
            volume: 1,
            offset_bytes: 0,
            len: 512,
            size_bytes: 0,
        };
        assert_eq!(
            volume_error_to_nbd(BackendOp::Read, &oor),
            NbdErrno::Invalid
        );
        assert_eq!(
            volume_error_to_nbd(BackendOp::Write, &oor),
            NbdErrno::NoSpace
        );
        let unavailable = ClientError::Unavailable {
            volume: 1,
            partition: 0,
            op: "write",
            offset_bytes: 0,
            attempts: 3,
            elapsed_ms: 120_000,
            last_error: "x".into(),
        };
        assert_eq!(
            volume_error_to_nbd(BackendOp::Write, &unavailable),
            NbdErrno::Io
        );
        assert_eq!(
            volume_error_to_nbd(BackendOp::Flush, &ClientError::Closed { volume: 1 }),
            NbdErrno::Shutdown
        );
        let unauthorized = ClientError::Unauthorized {
            volume: 1,
            attachment: 2,
            node: "hn-1".into(),
        };
        assert_eq!(
            volume_error_to_nbd(BackendOp::Write, &unauthorized),
            NbdErrno::PermissionDenied
        );
        assert!(!unauthorized.is_retryable());
    }
}
