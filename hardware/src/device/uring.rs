//! The production engine: io_uring, one ring per runtime thread, driven
//! inline by the tokio runtime (no ring thread).
//!
//! ```text
//!  caller task (any runtime thread)                 ring of that thread
//!   op future, first poll ── take a slot, push SQE ──▶ SQ (not yet entered)
//!        │                   wake the ring's poller ───┐
//!        │                                             ▼
//!        │           poller task: io_uring_enter(submit every queued SQE),
//!        │                        reap the CQ (completions already there)
//!        │                        wait: eventfd readable (AsyncFd, tokio's epoll)
//!        │   kernel posts a CQE ─▶ eventfd (IORING_REGISTER_EVENTFD) ─▶ poller
//!        │                        reaps: slot finished, op's waker woken
//!   op future, next poll ── reap too, take the result, free the slot
//! ```
//!
//! * **One ring per (thread, runtime)**, created on the first operation a
//!   thread issues inside a runtime and kept in a thread-local. Several
//!   devices share it; an operation carries its own file reference. There
//!   is no thread of ours between the caller and the kernel: an operation
//!   costs one `io_uring_enter` (shared by every SQE queued in the same
//!   loop turn) and one eventfd wake-up through the runtime's reactor,
//!   instead of a channel send, an eventfd write, a ring-thread wake-up and
//!   a oneshot back (two thread switches per I/O).
//! * **Batching per loop turn**: an operation only pushes its SQE and wakes
//!   the ring's poller task; the poller enters the kernel once for all the
//!   SQEs queued before it runs (a connection task that starts several
//!   pipelined requests in one poll submits them in one system call).
//! * **Prompt completion notice**: completions are reaped after every
//!   submit (reads served from the page cache complete inside the enter),
//!   on every eventfd readiness, and by every poll of an operation of the
//!   ring; none waits for another turn of anything. The eventfd is watched
//!   by the runtime's own reactor, so a completion wakes a parked worker.
//! * **Memory safety of dropped futures**: an operation in flight owns its
//!   [`AlignedBuf`] and an `Arc` of its file inside the ring's slot table
//!   until its CQE is reaped. Dropping the caller's future only marks the
//!   slot abandoned; the buffer is freed when the kernel is done with it.
//!   A ring torn down with operations still in flight (runtime shut down
//!   mid-I/O, ring failed) leaks their buffers rather than free memory the
//!   kernel may still write.
//! * Futures may move between worker threads: the slot table is behind a
//!   mutex (uncontended: the ring's thread and its poller are the only
//!   usual users), and io_uring accepts submissions from any thread.
//! * In-flight operations per device are bounded by `queue_depth` (a
//!   semaphore whose permit the slot holds until the CQE), per ring by
//!   [`RING_SLOTS`]; the CQ has room for every slot, so it cannot overflow.
//! * Kernels or sandboxes without io_uring (or without an opcode we use)
//!   are detected once at open; [`open_device`](super::open_device) then
//!   falls back to the pread/pwrite engine.

use std::collections::VecDeque;
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};

use io_uring::{opcode, types, IoUring, Probe};
use tokio::io::unix::AsyncFd;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::open::{punch_unsupported, zero_fill, DeviceFile};
use super::{check_range, AlignedBuf, BlockDevice, DeviceError, DeviceInfo, IoFuture};

/// Longest single transfer per SQE; larger ones proceed as short transfers.
const MAX_TRANSFER_BYTES: usize = 1 << 30;
/// Operations in flight per ring (all devices used from one thread).
const RING_SLOTS: usize = 256;
/// SQ entries: every slot has at most one SQE queued.
const RING_ENTRIES: u32 = RING_SLOTS as u32;

/// A device served by the io_uring rings of the runtime threads.
#[derive(Debug)]
pub struct UringDevice {
    info: DeviceInfo,
    file: DeviceFile,
    /// `queue_depth` permits; an operation holds one until its CQE.
    permits: Arc<Semaphore>,
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

/// Whether this kernel lets us build a ring with every opcode we use;
/// checked once per process.
fn uring_supported() -> io::Result<()> {
    static SUPPORT: OnceLock<Result<(), (io::ErrorKind, Option<i32>)>> = OnceLock::new();
    let probe = SUPPORT.get_or_init(|| {
        let check = || -> io::Result<()> {
            let ring = IoUring::new(2)?;
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
            Ok(())
        };
        check().map_err(|error| (error.kind(), error.raw_os_error()))
    });
    match probe {
        Ok(()) => Ok(()),
        Err((_, Some(errno))) => Err(io::Error::from_raw_os_error(*errno)),
        Err((kind, None)) => Err(io::Error::from(*kind)),
    }
}

impl UringDevice {
    /// Checks that the kernel allows io_uring with every opcode we use
    /// (fails with the kernel's error otherwise). Rings are made lazily,
    /// one per runtime thread, on first use.
    pub(crate) fn new(file: DeviceFile, info: DeviceInfo, queue_depth: u32) -> io::Result<Self> {
        uring_supported()?;
        Ok(Self {
            info,
            file,
            permits: Arc::new(Semaphore::new(queue_depth.max(1) as usize)),
        })
    }

    /// Runs `op` on the calling thread's ring and waits for its completion.
    async fn submit(
        &self,
        op: Op,
        offset: u64,
        len: u64,
    ) -> Result<Option<AlignedBuf>, DeviceError> {
        let closed = || DeviceError::Closed {
            path: self.info.path.clone(),
        };
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| closed())?;
        let operation = Operation {
            ring: None,
            slot: None,
            start: Some(Start {
                op,
                file: Arc::clone(&self.file.file),
                permit,
            }),
        };
        match operation.await {
            Ok(buf) => Ok(buf),
            Err(source) => Err(DeviceError::io(&self.info.path, offset, len, source)),
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

/// What an operation needs before it has a slot.
struct Start {
    op: Op,
    file: Arc<File>,
    permit: OwnedSemaphorePermit,
}

/// One device operation: takes a slot of the current thread's ring on
/// first poll, then waits for the slot to finish.
struct Operation {
    ring: Option<Arc<Ring>>,
    slot: Option<usize>,
    start: Option<Start>,
}

impl Future for Operation {
    type Output = io::Result<Option<AlignedBuf>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let ring = match &this.ring {
            Some(ring) => Arc::clone(ring),
            None => {
                let ring = current_ring()?;
                this.ring = Some(Arc::clone(&ring));
                ring
            }
        };
        let mut guard = ring.lock();
        let state = &mut *guard;
        if let Some(error) = &state.broken {
            if this.slot.is_none() {
                return Poll::Ready(Err(io::Error::new(error.kind(), error.to_string())));
            }
        }
        let Some(slot) = this.slot else {
            let Some(slot) = state.free.pop() else {
                // Every slot of this ring is busy: wait for one.
                state.slot_waiters.push_back(cx.waker().clone());
                return Poll::Pending;
            };
            let Some(start) = this.start.take() else {
                state.free.push(slot);
                return Poll::Ready(Err(io::Error::other("operation polled after completion")));
            };
            state.slots[slot] = Some(Slot {
                op: start.op,
                file: start.file,
                done: 0,
                progress: Progress::Waiting(Some(cx.waker().clone())),
                _permit: start.permit,
            });
            this.slot = Some(slot);
            state.push(slot);
            // Starting an operation is a moment this thread runs anyway:
            // notice completions of others now rather than on the next
            // reactor turn (a busy worker polls its reactor only every few
            // dozen tasks).
            state.reap();
            return Poll::Pending;
        };
        state.reap();
        let Some(in_slot) = state.slots[slot].as_mut() else {
            this.slot = None;
            return Poll::Ready(Err(io::Error::other("io_uring slot lost")));
        };
        match &mut in_slot.progress {
            Progress::Finished(_) => {
                let Some(finished) = state.release(slot) else {
                    return Poll::Ready(Err(io::Error::other("io_uring slot lost")));
                };
                this.slot = None;
                let Progress::Finished(result) = finished.progress else {
                    return Poll::Ready(Err(io::Error::other("io_uring slot lost")));
                };
                Poll::Ready(result.map(|()| match finished.op {
                    Op::Read { buf, .. } | Op::Write { buf, .. } => Some(buf),
                    Op::Fsync | Op::PunchHole { .. } => None,
                }))
            }
            Progress::Waiting(_) if state.broken.is_some() => {
                // The ring failed with this operation in the kernel: give
                // up on it, but leave its buffer to the ring (leaked).
                in_slot.progress = Progress::Abandoned;
                this.slot = None;
                let error = state
                    .broken
                    .as_ref()
                    .map(|error| io::Error::new(error.kind(), error.to_string()))
                    .unwrap_or_else(|| io::Error::other("io_uring ring failed"));
                Poll::Ready(Err(error))
            }
            Progress::Waiting(waker) => {
                match waker {
                    Some(waker) if waker.will_wake(cx.waker()) => {}
                    _ => *waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            Progress::Abandoned => Poll::Ready(Err(io::Error::other("io_uring slot abandoned"))),
        }
    }
}

impl Drop for Operation {
    fn drop(&mut self) {
        let (Some(ring), Some(slot)) = (&self.ring, self.slot) else {
            return;
        };
        let mut state = ring.lock();
        let finished = match state.slots[slot].as_mut() {
            Some(in_slot) => match in_slot.progress {
                Progress::Finished(_) => true,
                // The kernel still owns the buffer: the slot keeps it until
                // the CQE arrives, then frees it.
                _ => {
                    in_slot.progress = Progress::Abandoned;
                    false
                }
            },
            None => false,
        };
        if finished {
            drop(state.release(slot));
        }
    }
}

/// Where an in-flight operation stands.
enum Progress {
    /// In the kernel; the caller's waker.
    Waiting(Option<Waker>),
    /// CQE reaped; the caller takes the result.
    Finished(io::Result<()>),
    /// The caller dropped its future; free on completion.
    Abandoned,
}

/// A ring's in-flight operation: it owns the buffer and the file until
/// its CQE is reaped.
struct Slot {
    op: Op,
    file: Arc<File>,
    /// Bytes transferred so far (reads and writes).
    done: usize,
    progress: Progress,
    _permit: OwnedSemaphorePermit,
}

/// One io_uring plus its slot table, shared by the thread that owns it,
/// its poller task and the operations in flight.
struct Ring {
    state: Mutex<RingState>,
    /// Registered with the ring: written by the kernel on every CQE.
    eventfd: AsyncFd<OwnedFd>,
    /// False once the poller task is gone (its runtime shut down): the
    /// thread then makes a fresh ring.
    poller_alive: AtomicBool,
    /// Set when the owning thread forgot the ring; the poller exits once
    /// nothing is in flight.
    orphaned: AtomicBool,
}

struct RingState {
    ring: IoUring,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// Operations waiting for a free slot.
    slot_waiters: VecDeque<Waker>,
    /// SQEs pushed since the last submit.
    unsubmitted: bool,
    /// The poller task, woken to submit.
    poller: Option<Waker>,
    /// A failed submit: the ring takes no new operations.
    broken: Option<io::Error>,
    /// Reused buffer of (slot, result) drained from the CQ.
    completed: Vec<(u64, i32)>,
}

thread_local! {
    /// This thread's rings, one per runtime it issued I/O in.
    static RINGS: std::cell::RefCell<ThreadRings> = const {
        std::cell::RefCell::new(ThreadRings(Vec::new()))
    };
}

struct ThreadRings(Vec<(tokio::runtime::Id, Arc<Ring>)>);

impl Drop for ThreadRings {
    fn drop(&mut self) {
        for (_, ring) in self.0.drain(..) {
            ring.orphan();
        }
    }
}

/// The ring of the current thread for the current runtime, made on first
/// use (with its poller task).
fn current_ring() -> io::Result<Arc<Ring>> {
    let handle = tokio::runtime::Handle::try_current()
        .map_err(|_| io::Error::other("io_uring device used outside a tokio runtime"))?;
    let id = handle.id();
    let found = RINGS
        .try_with(|rings| {
            let mut rings = rings.borrow_mut();
            rings.0.retain(|(_, ring)| {
                let alive = ring.poller_alive.load(Ordering::Acquire) && !ring.is_broken();
                if !alive {
                    ring.orphan();
                }
                alive
            });
            rings
                .0
                .iter()
                .find(|(ring_id, _)| *ring_id == id)
                .map(|(_, ring)| Arc::clone(ring))
        })
        .map_err(|_| io::Error::other("thread is exiting"))?;
    if let Some(ring) = found {
        return Ok(ring);
    }
    let ring = Ring::new()?;
    let poller = Arc::clone(&ring);
    handle.spawn(async move { poller.poll_loop().await });
    let _ = RINGS.try_with(|rings| rings.borrow_mut().0.push((id, Arc::clone(&ring))));
    Ok(ring)
}

impl Ring {
    fn new() -> io::Result<Arc<Self>> {
        // The CQ is twice the SQ (the kernel's default): more than the slots.
        let ring = IoUring::new(RING_ENTRIES)?;
        // SAFETY: eventfd takes no pointers; the result is checked below.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh eventfd that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(raw) };
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        // SAFETY: the `OwnedFd` is moved into the `AsyncFd` and neither
        // replaced nor closed while registered.
        let eventfd =
            unsafe { AsyncFd::register_with_interest(eventfd, tokio::io::Interest::READABLE) }
                .map_err(io::Error::from)?;
        Ok(Arc::new(Self {
            state: Mutex::new(RingState {
                ring,
                slots: (0..RING_SLOTS).map(|_| None).collect(),
                free: (0..RING_SLOTS).rev().collect(),
                slot_waiters: VecDeque::new(),
                unsubmitted: false,
                poller: None,
                broken: None,
                completed: Vec::with_capacity(RING_SLOTS),
            }),
            eventfd,
            poller_alive: AtomicBool::new(true),
            orphaned: AtomicBool::new(false),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, RingState> {
        // A panic while holding the lock cannot leave a slot half-updated in
        // a way that frees a buffer early; keep serving.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn is_broken(&self) -> bool {
        self.lock().broken.is_some()
    }

    fn orphan(&self) {
        self.orphaned.store(true, Ordering::Release);
        if let Some(poller) = &self.lock().poller {
            poller.wake_by_ref();
        }
    }

    /// The poller task: submits what operations queued, reaps completions,
    /// sleeps on the eventfd. Ends when the ring is orphaned and idle.
    async fn poll_loop(self: Arc<Self>) {
        struct Alive<'a>(&'a AtomicBool);
        impl Drop for Alive<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _alive = Alive(&self.poller_alive);
        std::future::poll_fn(|cx| self.poll_once(cx)).await;
    }

    fn poll_once(&self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            {
                let mut state = self.lock();
                if !state
                    .poller
                    .as_ref()
                    .is_some_and(|waker| waker.will_wake(cx.waker()))
                {
                    state.poller = Some(cx.waker().clone());
                }
                state.submit();
                state.reap();
                if state.broken.is_some()
                    || (self.orphaned.load(Ordering::Acquire) && state.in_flight() == 0)
                {
                    state.poller = None;
                    return Poll::Ready(());
                }
            }
            match self.eventfd.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(mut guard)) => {
                    let mut count = 0u64;
                    // SAFETY: reads 8 bytes into a live u64 from our eventfd.
                    let read = unsafe {
                        libc::read(
                            self.eventfd.get_ref().as_raw_fd(),
                            (&mut count as *mut u64).cast(),
                            std::mem::size_of::<u64>(),
                        )
                    };
                    let error = io::Error::last_os_error();
                    if read < 0 && error.kind() != io::ErrorKind::WouldBlock {
                        tracing::error!(%error, "io_uring eventfd read failed; ring stops taking operations");
                        self.lock().fail(error);
                        return Poll::Ready(());
                    }
                    // The counter is reset: a CQE posted from now on makes
                    // the eventfd readable again (a new edge for the reactor).
                    guard.clear_ready();
                    // Loop to reap what made it readable.
                }
                Poll::Ready(Err(error)) => {
                    tracing::error!(%error, "io_uring eventfd failed; ring stops taking operations");
                    self.lock().fail(error);
                    return Poll::Ready(());
                }
            }
        }
    }
}

impl RingState {
    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Queues the (remaining part of the) operation in `slot` and asks the
    /// poller to submit it.
    fn push(&mut self, slot: usize) {
        let Some(in_slot) = self.slots[slot].as_mut() else {
            return;
        };
        let fd = types::Fd(in_slot.file.as_raw_fd());
        let done = in_slot.done;
        let entry = match &mut in_slot.op {
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
        // slot until the matching CQE is reaped.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            // The SQ has one entry per slot and each slot has at most one
            // SQE queued, so it cannot be full; fail the op rather than panic.
            self.finish(
                slot,
                Err(io::Error::other("io_uring submission queue full")),
            );
            return;
        }
        if !self.unsubmitted {
            self.unsubmitted = true;
            if let Some(poller) = &self.poller {
                poller.wake_by_ref();
            }
        }
    }

    /// Enters the kernel once for every queued SQE.
    fn submit(&mut self) {
        if !self.unsubmitted {
            return;
        }
        match self.ring.submit() {
            Ok(_) => self.unsubmitted = !self.ring.submission().is_empty(),
            Err(error)
                if matches!(
                    error.raw_os_error(),
                    Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) =>
            {
                // Kernel short of resources: retry on the next turn.
                if let Some(poller) = &self.poller {
                    poller.wake_by_ref();
                }
            }
            Err(error) => {
                tracing::error!(%error, "io_uring submit failed; ring stops taking operations");
                self.fail(error);
            }
        }
    }

    fn reap(&mut self) {
        self.completed.clear();
        for cqe in self.ring.completion() {
            self.completed.push((cqe.user_data(), cqe.result()));
        }
        for index in 0..self.completed.len() {
            let (user_data, result) = self.completed[index];
            self.complete(user_data as usize, result);
        }
    }

    fn complete(&mut self, slot: usize, result: i32) {
        let Some(in_slot) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
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
        let total = match &in_slot.op {
            Op::Read { buf, .. } | Op::Write { buf, .. } => buf.len(),
            Op::Fsync | Op::PunchHole { .. } => {
                self.finish(slot, Ok(()));
                return;
            }
        };
        if result == 0 {
            let error = match in_slot.op {
                Op::Read { .. } => io::Error::from(io::ErrorKind::UnexpectedEof),
                _ => io::Error::from(io::ErrorKind::WriteZero),
            };
            self.finish(slot, Err(error));
            return;
        }
        in_slot.done += result as usize;
        if in_slot.done < total {
            // Short transfer: submit the rest.
            self.push(slot);
        } else {
            self.finish(slot, Ok(()));
        }
    }

    /// The kernel is done with `slot`: wake its caller, or free it if the
    /// caller is gone.
    fn finish(&mut self, slot: usize, result: io::Result<()>) {
        let Some(in_slot) = self.slots[slot].as_mut() else {
            return;
        };
        match std::mem::replace(&mut in_slot.progress, Progress::Finished(result)) {
            Progress::Waiting(waker) => {
                if let Some(waker) = waker {
                    waker.wake();
                }
            }
            Progress::Abandoned => drop(self.release(slot)),
            Progress::Finished(_) => {}
        }
    }

    /// Empties `slot` (the kernel is done with it) and wakes operations
    /// waiting for one.
    fn release(&mut self, slot: usize) -> Option<Slot> {
        let taken = self.slots[slot].take()?;
        self.free.push(slot);
        for waiter in self.slot_waiters.drain(..) {
            waiter.wake();
        }
        Some(taken)
    }

    /// The ring is unusable: fail every caller that has not submitted yet,
    /// and leave in-flight slots (their buffers) to the leak in `Drop`.
    fn fail(&mut self, error: io::Error) {
        for slot in self.slots.iter_mut().flatten() {
            if let Progress::Waiting(Some(waker)) = &slot.progress {
                waker.wake_by_ref();
            }
        }
        for waiter in self.slot_waiters.drain(..) {
            waiter.wake();
        }
        self.broken = Some(error);
    }
}

impl Drop for RingState {
    fn drop(&mut self) {
        // Operations the kernel may still complete: leak their buffers and
        // file references rather than free memory it could write into.
        for slot in self.slots.iter_mut() {
            if let Some(in_slot) = slot.take() {
                std::mem::forget(in_slot);
            }
        }
    }
}
