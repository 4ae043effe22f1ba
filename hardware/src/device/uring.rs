//! The production engine: io_uring with one ring thread per device.
//!
//! ```text
//!  tokio callers ──Request{op, oneshot}──▶ bounded mpsc (capacity = queue_depth)
//!                                              │
//!                                   ring thread (std::thread, owns the IoUring)
//!                     accept while slots free ─┤─ push SQE, user_data = slot
//!   submit + wait for a CQE or the wake fd ─┤─ short transfer: resubmit the rest
//!                                              └─ complete: oneshot.send(result)
//! ```
//!
//! Invariants:
//! * at most `queue_depth` operations are in the ring; requests beyond that
//!   wait in the bounded channel, and callers beyond that wait in `send`;
//! * an in-flight operation (its slot) owns its [`AlignedBuf`] and an `Arc` of
//!   the file until its CQE arrives. A caller that drops its future only
//!   drops the oneshot receiver; the buffer is freed by the ring thread after
//!   the kernel is done with it, and the fd stays open until then;
//! * the ring thread never blocks on the channel while operations are in
//!   flight: it keeps a read of an eventfd in the ring, and every caller
//!   writes that eventfd after queueing a request, so one `submit_and_wait`
//!   wakes for whichever comes first, a completion or a new request (no
//!   polling, no timeout: a request waits for nothing but a free slot);
//! * when the device is dropped the channel disconnects; the thread finishes
//!   the operations in flight, then exits and closes its file reference.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring, Probe};
use tokio::sync::{mpsc, oneshot};

use super::open::{punch_unsupported, zero_fill, DeviceFile};
use super::{check_range, AlignedBuf, BlockDevice, DeviceError, DeviceInfo, IoFuture};

/// Longest single transfer per SQE; larger ones proceed as short transfers.
const MAX_TRANSFER_BYTES: usize = 1 << 30;
/// `user_data` of the eventfd read that wakes the ring for new requests.
const WAKE_USER_DATA: u64 = u64::MAX;

/// A device served by an io_uring ring thread.
#[derive(Debug)]
pub struct UringDevice {
    info: DeviceInfo,
    file: DeviceFile,
    requests: mpsc::Sender<Request>,
    /// Written after each queued request to wake a ring thread that waits
    /// for completions.
    wake: Arc<OwnedFd>,
}

enum Op {
    Read {
        offset: u64,
        buf: AlignedBuf,
    },
    /// `dsync`: `RWF_DSYNC`, the write completes once durable (data and
    /// the metadata needed to read it, and the device cache flushed).
    Write {
        offset: u64,
        buf: AlignedBuf,
        dsync: bool,
    },
    Fsync,
    PunchHole {
        offset: u64,
        len: u64,
    },
}

type Completion = Result<Option<AlignedBuf>, io::Error>;

struct Request {
    op: Op,
    reply: oneshot::Sender<Completion>,
}

/// A request in the ring.
struct InFlight {
    op: Op,
    /// Bytes transferred so far (reads and writes).
    done: usize,
    reply: oneshot::Sender<Completion>,
}

impl UringDevice {
    /// Builds the ring (fails with the kernel's error if io_uring is refused
    /// or lacks an opcode we use) and starts the ring thread.
    pub(crate) fn new(file: DeviceFile, info: DeviceInfo, queue_depth: u32) -> io::Result<Self> {
        let depth = queue_depth.max(1) as usize;
        // One SQE per slot plus the wake read.
        let ring = IoUring::new((queue_depth.max(1) + 1).next_power_of_two())?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for code in [
            opcode::Read::CODE,
            opcode::Write::CODE,
            opcode::Fsync::CODE,
            opcode::Fallocate::CODE,
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
            }
        }
        // SAFETY: eventfd takes no pointers; the result is checked below.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh eventfd that nothing else owns.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
        let (requests, receiver) = mpsc::channel(depth);
        let thread_file = Arc::clone(&file.file);
        let thread_wake = Arc::clone(&wake);
        let name = format!(
            "uring-{}",
            info.path
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        std::thread::Builder::new()
            .name(name)
            .spawn(move || RingThread::new(ring, thread_file, thread_wake, depth).run(receiver))?;
        Ok(Self {
            info,
            file,
            requests,
            wake,
        })
    }

    /// Sends `op` to the ring thread and waits for its completion.
    async fn submit(
        &self,
        op: Op,
        offset: u64,
        len: u64,
    ) -> Result<Option<AlignedBuf>, DeviceError> {
        let closed = || DeviceError::Closed {
            path: self.info.path.clone(),
        };
        let (reply, completion) = oneshot::channel();
        self.requests
            .send(Request { op, reply })
            .await
            .map_err(|_| closed())?;
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd. A failed
        // write can only mean the counter is saturated, i.e. already awake.
        unsafe {
            libc::write(
                self.wake.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            );
        }
        match completion.await {
            Ok(Ok(buf)) => Ok(buf),
            Ok(Err(source)) => Err(DeviceError::io(&self.info.path, offset, len, source)),
            Err(_) => Err(closed()),
        }
    }

    fn missing_buffer(&self) -> DeviceError {
        // A read or write completion always carries its buffer.
        DeviceError::Closed {
            path: self.info.path.clone(),
        }
    }
}

impl BlockDevice for UringDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, AlignedBuf> {
        Box::pin(async move {
            check_range(&self.info, offset, len as u64)?;
            let buf = AlignedBuf::zeroed(len)?;
            if len == 0 {
                return Ok(buf);
            }
            self.submit(Op::Read { offset, buf }, offset, len as u64)
                .await?
                .ok_or_else(|| self.missing_buffer())
        })
    }

    fn write_at(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, AlignedBuf> {
        Box::pin(async move {
            let len = buf.len() as u64;
            check_range(&self.info, offset, len)?;
            if len == 0 {
                return Ok(buf);
            }
            self.submit(
                Op::Write {
                    offset,
                    buf,
                    dsync: false,
                },
                offset,
                len,
            )
            .await?
            .ok_or_else(|| self.missing_buffer())
        })
    }

    fn write_durable_at(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, AlignedBuf> {
        Box::pin(async move {
            let len = buf.len() as u64;
            check_range(&self.info, offset, len)?;
            if len == 0 {
                self.submit(Op::Fsync, 0, 0).await?;
                return Ok(buf);
            }
            self.submit(
                Op::Write {
                    offset,
                    buf,
                    dsync: true,
                },
                offset,
                len,
            )
            .await?
            .ok_or_else(|| self.missing_buffer())
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.submit(Op::Fsync, 0, 0).await?;
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            check_range(&self.info, offset, len)?;
            if len == 0 {
                return Ok(());
            }
            match self
                .submit(Op::PunchHole { offset, len }, offset, len)
                .await
            {
                Ok(_) => Ok(()),
                Err(DeviceError::Io { source, .. })
                    if source.raw_os_error().is_some_and(punch_unsupported) =>
                {
                    // No hole punching here: write zeros instead, off the ring.
                    let file = self.file.clone();
                    tokio::task::spawn_blocking(move || zero_fill(&file, offset, len))
                        .await
                        .map_err(|_| DeviceError::Closed {
                            path: self.info.path.clone(),
                        })?
                        .map_err(|source| DeviceError::io(&self.info.path, offset, len, source))
                }
                Err(error) => Err(error),
            }
        })
    }
}

struct RingThread {
    ring: IoUring,
    /// Keeps the fd open while any operation is in flight.
    file: Arc<File>,
    wake: Arc<OwnedFd>,
    /// Target of the eventfd read; leaked so that it outlives a read the
    /// kernel may still complete while the ring is torn down.
    wake_buf: &'static mut u64,
    /// Whether an eventfd read is in the ring.
    wake_armed: bool,
    slots: Vec<Option<InFlight>>,
    free_slots: Vec<usize>,
    /// Reused buffer of (slot, result) drained from the completion queue.
    completed: Vec<(u64, i32)>,
}

impl RingThread {
    fn new(ring: IoUring, file: Arc<File>, wake: Arc<OwnedFd>, depth: usize) -> Self {
        Self {
            ring,
            file,
            wake,
            wake_buf: Box::leak(Box::new(0u64)),
            wake_armed: false,
            slots: (0..depth).map(|_| None).collect(),
            free_slots: (0..depth).rev().collect(),
            completed: Vec::with_capacity(depth),
        }
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free_slots.len()
    }

    fn run(mut self, mut requests: mpsc::Receiver<Request>) {
        let mut open = true;
        loop {
            if self.in_flight() == 0 {
                if !open {
                    break;
                }
                // Idle: sleep until a request arrives or the device is dropped.
                match requests.blocking_recv() {
                    Some(request) => self.start(request),
                    None => break,
                }
            }
            while open && !self.free_slots.is_empty() {
                match requests.try_recv() {
                    Ok(request) => self.start(request),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                }
            }
            if self.in_flight() == 0 {
                continue;
            }
            if open && !self.wake_armed {
                self.arm_wake();
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(error)
                    if matches!(
                        error.raw_os_error(),
                        Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)
                    ) => {}
                Err(error) => {
                    tracing::error!(%error, "io_uring submit failed; device engine stops");
                    self.abandon(error);
                    return;
                }
            }
            self.reap();
        }
    }

    /// Queues a read of the wake eventfd, completed by the next request.
    fn arm_wake(&mut self) {
        let ptr: *mut u64 = &mut *self.wake_buf;
        let entry = opcode::Read::new(
            types::Fd(self.wake.as_raw_fd()),
            ptr.cast(),
            std::mem::size_of::<u64>() as u32,
        )
        .build()
        .user_data(WAKE_USER_DATA);
        // SAFETY: the target is a leaked (never freed) u64 and the eventfd
        // is kept open by `self.wake` for as long as the ring lives.
        self.wake_armed = unsafe { self.ring.submission().push(&entry) }.is_ok();
    }

    /// Takes a free slot for `request` and queues its SQE.
    fn start(&mut self, request: Request) {
        let Some(slot) = self.free_slots.pop() else {
            // Callers only start when a slot is free.
            unreachable!("no free io_uring slot");
        };
        self.slots[slot] = Some(InFlight {
            op: request.op,
            done: 0,
            reply: request.reply,
        });
        self.push(slot);
    }

    /// Queues the (remaining part of the) operation in `slot`.
    fn push(&mut self, slot: usize) {
        let fd = types::Fd(self.file.as_raw_fd());
        let Some(in_flight) = self.slots[slot].as_mut() else {
            return;
        };
        let done = in_flight.done;
        let entry = match &mut in_flight.op {
            Op::Read { offset, buf } => {
                let remaining = (buf.len() - done).min(MAX_TRANSFER_BYTES);
                // SAFETY: `done < buf.len()`, so the pointer stays inside the
                // allocation, which the slot owns until the CQE arrives.
                let ptr = unsafe { buf.as_mut_ptr().add(done) };
                opcode::Read::new(fd, ptr, remaining as u32)
                    .offset(*offset + done as u64)
                    .build()
            }
            Op::Write { offset, buf, dsync } => {
                let remaining = (buf.len() - done).min(MAX_TRANSFER_BYTES);
                // SAFETY: as for reads.
                let ptr = unsafe { buf.as_ptr().add(done) };
                // A short transfer resubmits the rest with the same flag, so
                // the last completion covers the whole buffer.
                let flags = if *dsync { libc::RWF_DSYNC } else { 0 };
                opcode::Write::new(fd, ptr, remaining as u32)
                    .offset(*offset + done as u64)
                    .rw_flags(flags)
                    .build()
            }
            Op::Fsync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Op::PunchHole { offset, len } => opcode::Fallocate::new(fd, *len)
                .offset(*offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
        }
        .user_data(slot as u64);
        // SAFETY: the buffer and fd referenced by `entry` are owned by the
        // slot (and `self.file`) until the matching CQE is reaped.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            // The SQ has >= queue_depth entries and each slot has at most one
            // SQE queued, so it cannot be full; fail the op rather than panic.
            self.finish(
                slot,
                Err(io::Error::other("io_uring submission queue full")),
            );
        }
    }

    fn reap(&mut self) {
        self.completed.clear();
        for cqe in self.ring.completion() {
            self.completed.push((cqe.user_data(), cqe.result()));
        }
        for index in 0..self.completed.len() {
            let (user_data, result) = self.completed[index];
            if user_data == WAKE_USER_DATA {
                self.wake_armed = false;
                continue;
            }
            self.complete(user_data as usize, result);
        }
    }

    fn complete(&mut self, slot: usize, result: i32) {
        let Some(in_flight) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            tracing::error!(slot, "io_uring completion for an empty slot");
            return;
        };
        if result < 0 {
            let errno = -result;
            if errno == libc::EINTR || errno == libc::EAGAIN {
                self.push(slot);
            } else {
                self.finish(slot, Err(io::Error::from_raw_os_error(errno)));
            }
            return;
        }
        let total = match &in_flight.op {
            Op::Read { buf, .. } | Op::Write { buf, .. } => buf.len(),
            Op::Fsync | Op::PunchHole { .. } => {
                self.finish(slot, Ok(()));
                return;
            }
        };
        if result == 0 {
            let error = match in_flight.op {
                Op::Read { .. } => io::Error::from(io::ErrorKind::UnexpectedEof),
                _ => io::Error::from(io::ErrorKind::WriteZero),
            };
            self.finish(slot, Err(error));
            return;
        }
        in_flight.done += result as usize;
        if in_flight.done < total {
            // Short transfer: submit the rest.
            self.push(slot);
        } else {
            self.finish(slot, Ok(()));
        }
    }

    /// Frees `slot` and answers its caller (who may be gone).
    fn finish(&mut self, slot: usize, result: io::Result<()>) {
        let Some(in_flight) = self.slots[slot].take() else {
            return;
        };
        self.free_slots.push(slot);
        let completion = result.map(|()| match in_flight.op {
            Op::Read { buf, .. } | Op::Write { buf, .. } => Some(buf),
            Op::Fsync | Op::PunchHole { .. } => None,
        });
        // A dropped receiver means the caller gave up; the buffer is freed here,
        // after the kernel finished with it.
        let _ = in_flight.reply.send(completion);
    }

    /// The ring is unusable: fail every caller, but leak the buffers of
    /// operations the kernel may still write into.
    fn abandon(&mut self, error: io::Error) {
        for slot in self.slots.iter_mut() {
            if let Some(in_flight) = slot.take() {
                let InFlight { op, reply, .. } = in_flight;
                std::mem::forget(op);
                let _ = reply.send(Err(io::Error::new(error.kind(), error.to_string())));
            }
        }
        std::mem::forget(Arc::clone(&self.file));
    }
}
