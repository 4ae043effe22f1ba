//! Per-partition dedupe of host write ids (`proto::volume` module docs,
//! "Write ids").
//!
//! A client resends a write / trim / write-zeroes piece with the **same**
//! `write_id` after an unknown outcome. Without this table a late first
//! copy (still queued here, or delayed in a TCP connection) could be applied
//! after the resend was acknowledged and after a newer write W2 to the same
//! blocks, overwriting W2 with stale data. The primary therefore records
//! every id it has seen:
//!
//! * **unknown id** → applied; while it runs the id is *in flight*;
//! * **in flight** → the copy waits for the first copy's outcome and returns
//!   it (applied once);
//! * **completed** (`Done`) → answered `Done` at once, **never applied
//!   again**;
//! * a copy that **failed** (typed refusal: nothing acknowledged) is
//!   forgotten, so the client's resend is applied normally; copies waiting
//!   on it get the same error and resend.
//!
//! **Bounds.** Completed ids are kept for [`DEDUPE_MAX_AGE`] (10 minutes) or
//! the last [`DEDUPE_CAPACITY`] (65 536) completed ids of the partition,
//! whichever is smaller (≈ 3 MiB per partition at most). A client gives up
//! on a piece after its `failover_timeout` (120 s by default) and a link
//! attempt times out after 5 s, so live copies are far younger than the
//! age bound; the count bound is only reached by a partition completing
//! more than 64 K writes while one copy is stuck, a window that is
//! documented, not closed.
//!
//! **Not persisted.** The table lives in the primary's memory. Across a
//! primary change it starts empty: the new primary's epoch fences the old
//! one (the sleds refuse its appends with `Fenced`, the secondary refuses
//! its records with `StaleEpoch`, it fails its queue with `NotPrimary`), so
//! copies queued at the old primary can never be applied; copies reaching
//! the new primary carry the old epoch and are refused `StaleEpoch` until
//! the client refreshes its map, and a resend with the new epoch is only
//! sent while the host still waits for that piece, so no newer acknowledged
//! write to the same blocks can exist for it to overwrite.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::volume::{HostReply, WriteId};
use tokio::sync::watch;

/// Most completed ids remembered per partition.
pub const DEDUPE_CAPACITY: usize = 65_536;
/// Longest a completed id is remembered.
pub const DEDUPE_MAX_AGE: Duration = Duration::from_secs(600);

/// What a write id covers: a reused id with another range is a client bug
/// and is refused rather than answered from the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OpKey {
    pub kind: &'static str,
    pub offset_bytes: u64,
    pub len: u32,
}

#[derive(Debug)]
enum Slot {
    /// The first copy runs; waiters watch for its outcome.
    InFlight {
        key: OpKey,
        outcome: watch::Receiver<Option<HostReply>>,
    },
    Done {
        key: OpKey,
    },
}

#[derive(Debug, Default)]
struct Table {
    slots: HashMap<WriteId, Slot>,
    /// Completed ids, oldest first (eviction order).
    done: VecDeque<(WriteId, Instant)>,
}

impl Table {
    fn evict(&mut self, now: Instant, capacity: usize, max_age: Duration) {
        while let Some(&(id, at)) = self.done.front() {
            if self.done.len() <= capacity && now.saturating_duration_since(at) < max_age {
                break;
            }
            self.done.pop_front();
            if matches!(self.slots.get(&id), Some(Slot::Done { .. })) {
                self.slots.remove(&id);
            }
        }
    }
}

/// The table (cheap to share).
#[derive(Debug)]
pub(crate) struct WriteDedupe {
    table: Mutex<Table>,
    capacity: usize,
    max_age: Duration,
}

/// How to handle one copy of a write id.
#[derive(Debug)]
pub(crate) enum Begin {
    /// First copy (or the previous one failed): apply it and report the
    /// outcome through the ticket.
    Apply(Ticket),
    /// Already completed: answer with this reply, do not apply.
    Answer(HostReply),
    /// Another copy is in flight: wait for its outcome.
    Wait(watch::Receiver<Option<HostReply>>),
}

/// Held by the copy that applies an id. Dropping it without
/// [`Ticket::finish`] (the handler was cancelled) forgets the id and wakes
/// the waiters, which then begin again.
#[derive(Debug)]
pub(crate) struct Ticket {
    dedupe: Arc<WriteDedupe>,
    id: WriteId,
    key: OpKey,
    sender: Option<watch::Sender<Option<HostReply>>>,
}

impl WriteDedupe {
    pub(crate) fn new() -> Arc<Self> {
        Self::with_bounds(DEDUPE_CAPACITY, DEDUPE_MAX_AGE)
    }

    pub(crate) fn with_bounds(capacity: usize, max_age: Duration) -> Arc<Self> {
        Arc::new(Self {
            table: Mutex::new(Table::default()),
            capacity: capacity.max(1),
            max_age,
        })
    }

    /// Completed ids currently remembered.
    pub(crate) fn completed(&self) -> usize {
        super::lock(&self.table).done.len()
    }

    pub(crate) fn begin(self: &Arc<Self>, id: WriteId, key: OpKey) -> Begin {
        let mut table = super::lock(&self.table);
        table.evict(Instant::now(), self.capacity, self.max_age);
        match table.slots.get(&id) {
            Some(Slot::Done { key: known }) | Some(Slot::InFlight { key: known, .. })
                if *known != key =>
            {
                Begin::Answer(HostReply::Error(proto::volume::HostError::BadRequest {
                    reason: format!(
                        "write id {id:#x} reused for {key:?}, first seen for {known:?}"
                    ),
                }))
            }
            Some(Slot::Done { .. }) => Begin::Answer(HostReply::Done),
            Some(Slot::InFlight { outcome, .. }) => Begin::Wait(outcome.clone()),
            None => {
                let (sender, outcome) = watch::channel(None);
                table.slots.insert(id, Slot::InFlight { key, outcome });
                Begin::Apply(Ticket {
                    dedupe: self.clone(),
                    id,
                    key,
                    sender: Some(sender),
                })
            }
        }
    }
}

impl Ticket {
    /// Records the outcome of the applying copy and wakes the waiters.
    pub(crate) fn finish(mut self, reply: &HostReply) {
        let Some(sender) = self.sender.take() else {
            return;
        };
        {
            let mut table = super::lock(&self.dedupe.table);
            if matches!(reply, HostReply::Done) {
                table.slots.insert(self.id, Slot::Done { key: self.key });
                table.done.push_back((self.id, Instant::now()));
                table.evict(Instant::now(), self.dedupe.capacity, self.dedupe.max_age);
            } else {
                // Refused: nothing was acknowledged; a resend applies again.
                table.slots.remove(&self.id);
            }
        }
        sender.send_replace(Some(reply.clone()));
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.sender.take().is_some() {
            // Cancelled: forget the id; waiters see the sender close.
            super::lock(&self.dedupe.table).slots.remove(&self.id);
        }
    }
}
