//! Where a LUN's persistent reservations live: in this agent's memory
//! ([`ReservationStore::local`], a LUN with no control plane behind it:
//! `rackblock attach --memory`), or in the unit's replicated state
//! ([`ReservationStore::replicated`], every volume of a unit), read and
//! compare-and-set through the head nodes' host ports with the
//! attachment credential (`local_control_plane::state::reservations`).
//!
//! # The replicated store
//!
//! The control plane holds one versioned record per volume; the SPC-4
//! rules stay in [`Reservations`] (reserve.rs). This agent keeps a
//! cached copy and the instant the read that produced it was *sent*
//! (the read is linearizable, so the copy holds every change committed
//! before that instant).
//!
//! ```text
//! PR OUT ─▶ fresh read ─▶ apply SPC-4 on a copy ─▶ unchanged? answer
//!             ▲                                 └▶ SetReservations(expected = version read)
//!             │ lost the race: the answer carries the current record ─┘   │ applied
//!                                                                         ▼
//!                         RESERVE / PREEMPT: wait RESTRICT_GRACE, then GOOD
//! PR IN  ─▶ fresh read ─▶ answer from it
//! other  ─▶ copy younger than FRESH_FOR? check it (and refresh it in the
//!           background once older than REFRESH_AFTER); else read first
//! ```
//!
//! **Why a PREEMPT on agent B stops agent A's writes.** Every agent
//! admits a command only against a copy read less than [`FRESH_FOR`]
//! ago. B answers a change that takes access away from someone
//! (RESERVE, PREEMPT, PREEMPT AND ABORT) only [`RESTRICT_GRACE`]
//! (> `FRESH_FOR`) after it committed: by then every other agent's copy
//! that is still fresh enough to admit a command was read after the
//! commit, so any command admitted after the initiator saw GOOD is
//! checked against the new state. Only one clock is involved per agent
//! (the elapsed time since its own read; B's grace on B's clock), so no
//! clock synchronization is assumed, only bounded drift over a second.
//!
//! The alternative, a reservation version checked by the primary on
//! every write, also closes the gap below, but it needs the version in
//! every host write and in the head nodes' data path: this design keeps
//! the data path as it is, at the cost of one linearizable read per
//! agent and per `REFRESH_AFTER` while I/O flows (none when idle) and of
//! a pause of the agent's I/O while the control plane has no leader for
//! longer than `FRESH_FOR` (commands wait, up to [`GIVE_UP`]; then
//! BUSY, which initiators retry).
//!
//! **Unit attentions.** Every new version of the record this agent
//! installs (read, or written by its own PR OUT) is compared with the
//! copy it replaces (`reserve::attentions`): the nexuses that lost their
//! registration or a registrants-only reservation to someone else get a
//! unit attention, kept here per nexus ([`Attentions`], bounded) until
//! their next command reports it (scsi.rs) or their session ends. The
//! nexus whose own PR OUT made the version through this agent hears
//! nothing; a change made through another agent is seen here as soon as
//! a command of this agent needs a fresh copy, so the preempted
//! initiator hears it on its first command after the PREEMPT was
//! answered.
//!
//! **The SPC-2 reservation (RESERVE(6)) is kept in the same record**, so
//! a RESERVE through one agent conflicts through every other, exactly as
//! a persistent RESERVE does (same fresh-copy check, same grace before
//! GOOD). Unlike a persistent one it ends with its holder's I_T nexus:
//! RELEASE(6), the end of the holder's session (this agent writes the
//! record), LUN RESET and TARGET RESET through any agent. An agent that
//! dies cannot write that, so the record names the holder's agent (a
//! random id per process) and a beat that agent raises every
//! [`RENEW_EVERY`] (2 s) while it holds the reservation; every other
//! agent notes when it first installed each (agent, beat) and, once a
//! fresh copy still shows the same beat [`LEGACY_LEASE`] (10 s) later on
//! its own clock, treats the reservation as gone (a RESERVE through it
//! then takes it over). The holder's own agent stops admitting commands
//! within [`FRESH_FOR`] of losing the control plane, long before the
//! lease runs out elsewhere. While a RESERVE(6) is held, the holder's
//! agent writes the record every 2 s (other agents' copies follow on
//! their usual refresh); otherwise nothing changes. TEST UNIT READY and
//! the other "always" commands but INQUIRY, REPORT LUNS, REQUEST SENSE
//! and RELEASE(6) now check a fresh copy too (they conflict under
//! RESERVE(6)), so they pause like I/O while the control plane has no
//! leader.
//!
//! **Not covered:** a command admitted *before* the grace ended may
//! still reach the primary later (it was admitted under the old state,
//! and a write retried across a failover can take seconds): PREEMPT AND
//! ABORT does not abort other agents' tasks in flight. A cluster that
//! fences with PREEMPT AND ABORT then waits for its own I/O timeout, as
//! it would for any target without task abort across ports.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use futures::future::BoxFuture;
use local_control_plane::state::PersistentReservations;
use local_control_plane::{HostReservationReply, HostReservationRequest};
use proto::link::{LinkConfig, LinkMetrics, PeerLink};
use proto::volume::{AttachmentCredential, HostError, HostReply};
use proto::Message;

use super::reserve::{self, Access, Legacy, Nexus, Reservations, RESERVATION_CONFLICT};
use super::scsi::{Outcome, Sense};
use crate::HostEndpoint;

/// A cached copy admits commands for this long after its read was sent.
pub const FRESH_FOR: Duration = Duration::from_millis(500);
/// A copy older than this is refreshed in the background.
pub const REFRESH_AFTER: Duration = Duration::from_millis(150);
/// A change that takes access away is answered this long after it
/// committed (module docs).
pub const RESTRICT_GRACE: Duration = Duration::from_millis(650);
/// A command waits this long for the control plane, then ends BUSY.
pub const GIVE_UP: Duration = Duration::from_secs(60);
/// Pause between two failed reads or updates.
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Compare-and-set attempts of one PERSISTENT RESERVE OUT.
const MAX_ATTEMPTS: usize = 64;
/// An SPC-2 reservation held through another agent ends when its beat
/// has not moved for this long on this agent's clock (module docs).
pub const LEGACY_LEASE: Duration = Duration::from_secs(10);
/// The holder's agent raises the beat this often.
const RENEW_EVERY: Duration = Duration::from_secs(2);

/// SCSI status BUSY.
const BUSY: u8 = 0x08;

/// Why the replicated record could not be read or updated.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SourceError {
    /// The attachment was revoked (final).
    #[error("the attachment credential was refused")]
    Unauthorized,
    #[error("{0}")]
    Unavailable(String),
}

/// The control plane's record of one volume, as this agent reaches it.
pub trait ReservationSource: Send + Sync + 'static {
    fn read(&self) -> BoxFuture<'_, Result<PersistentReservations, SourceError>>;
    fn set(
        &self,
        expected_version: u64,
        record: PersistentReservations,
    ) -> BoxFuture<'_, Result<HostReservationReply, SourceError>>;
}

/// [`ReservationSource`] over the head nodes' host ports.
#[derive(Debug)]
pub struct HostReservationSource {
    links: Vec<Arc<PeerLink>>,
    volume: u64,
    credential: AttachmentCredential,
    /// The link that answered last (tried first: a dead head node costs
    /// its connect timeout once, not at every read).
    preferred: AtomicUsize,
}

impl HostReservationSource {
    /// Links (made lazily) to every endpoint. Needs a tokio runtime.
    pub fn new(
        endpoints: &[HostEndpoint],
        volume: u64,
        credential: AttachmentCredential,
        config: LinkConfig,
    ) -> HostReservationSource {
        let metrics = LinkMetrics::unregistered();
        let links = endpoints
            .iter()
            .map(|endpoint| {
                PeerLink::new(
                    format!("{}-reservations", endpoint.node),
                    endpoint.address,
                    endpoint.address,
                    config.clone(),
                    metrics.clone(),
                )
            })
            .collect();
        HostReservationSource {
            links,
            volume,
            credential,
            preferred: AtomicUsize::new(0),
        }
    }

    async fn ask(
        &self,
        request: &HostReservationRequest,
    ) -> Result<HostReservationReply, SourceError> {
        let payload = Bytes::from(
            serde_json::to_vec(request).map_err(|e| SourceError::Unavailable(e.to_string()))?,
        );
        let mut last = SourceError::Unavailable("no host endpoint".into());
        let first = self.preferred.load(Ordering::Relaxed);
        for step in 0..self.links.len() {
            let index = (first + step) % self.links.len();
            let link = &self.links[index];
            let message = Message::HostReservations {
                volume: self.volume,
                credential: self.credential,
                payload: payload.clone(),
            };
            match link.call(message, false).await {
                Ok(Message::HostReservationsReply { payload }) => {
                    self.preferred.store(index, Ordering::Relaxed);
                    return serde_json::from_slice(&payload).map_err(|e| {
                        SourceError::Unavailable(format!("undecodable reservations: {e}"))
                    });
                }
                Ok(Message::HostReply(HostReply::Error(HostError::Unauthorized { .. }))) => {
                    return Err(SourceError::Unauthorized)
                }
                Ok(Message::HostReply(HostReply::Error(error))) => {
                    last = SourceError::Unavailable(format!("{}: {error}", link.peer()));
                }
                Ok(other) => {
                    last = SourceError::Unavailable(format!(
                        "{}: unexpected answer kind {:#06x}",
                        link.peer(),
                        other.kind()
                    ));
                }
                Err(error) => last = SourceError::Unavailable(error.to_string()),
            }
        }
        Err(last)
    }

    /// Close every link.
    pub fn close(&self) {
        for link in &self.links {
            link.close();
        }
    }
}

impl ReservationSource for HostReservationSource {
    fn read(&self) -> BoxFuture<'_, Result<PersistentReservations, SourceError>> {
        Box::pin(async move {
            self.ask(&HostReservationRequest::Read)
                .await
                .map(|reply| reply.record)
        })
    }

    fn set(
        &self,
        expected_version: u64,
        record: PersistentReservations,
    ) -> BoxFuture<'_, Result<HostReservationReply, SourceError>> {
        Box::pin(async move {
            self.ask(&HostReservationRequest::Set {
                expected_version,
                record,
            })
            .await
        })
    }
}

/// A LUN's persistent reservations (module docs), its SPC-2
/// reservation, and the unit attentions their changes raised for the
/// I_T nexuses of this agent.
pub struct ReservationStore {
    kind: Store,
    attentions: Arc<Attentions>,
    /// This agent's id in an SPC-2 reservation it holds (random).
    agent: u64,
}

enum Store {
    Local(Mutex<Reservations>),
    Replicated(Arc<Replicated>),
}

impl std::fmt::Debug for ReservationStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Store::Local(_) => f.write_str("ReservationStore::Local"),
            Store::Replicated(_) => f.write_str("ReservationStore::Replicated"),
        }
    }
}

/// Unit attentions waiting for their I_T nexus's next command (SAM-5
/// 5.14: reported once, oldest first). Bounded: at most
/// [`ATTENTIONS_PER_NEXUS`] per nexus (a repeated one is kept once) and
/// [`ATTENTION_NEXUSES`] nexuses (only registered nexuses, the nexuses
/// of this agent's sessions and the last [`LOST_NEXUSES`] lost ones get
/// one).
///
/// At most one attention of ASC 29h (power on, reset, I_T nexus loss)
/// is pending per nexus: a second one adds nothing the first does not
/// say (the initiator re-checks its state either way), so the first
/// stands.
///
/// A lost nexus (its session ended without a logout: connection loss,
/// session reinstatement, TARGET COLD RESET) keeps its attentions and
/// gets I_T NEXUS LOSS OCCURRED (SAM-5 6.3.4), reported when its
/// initiator port (name and ISID) logs in again. Most initiators never
/// reuse a lost ISID (libiscsi draws a new one per context), so lost
/// nexuses are kept in the order they were lost and the oldest is
/// dropped beyond [`LOST_NEXUSES`]: they cannot crowd out live ones.
#[derive(Debug, Default)]
pub struct Attentions {
    pending: Mutex<Pending>,
}

#[derive(Debug, Default)]
struct Pending {
    queues: HashMap<Nexus, VecDeque<Sense>>,
    /// Nexuses lost with attentions pending, oldest first.
    lost: VecDeque<Nexus>,
}

/// Bounds of [`Attentions`].
const ATTENTIONS_PER_NEXUS: usize = 8;
const ATTENTION_NEXUSES: usize = 1024;
const LOST_NEXUSES: usize = 256;

impl Attentions {
    fn raise(&self, raised: Vec<(Nexus, Sense)>) {
        if raised.is_empty() {
            return;
        }
        let mut pending = lock(&self.pending);
        for (nexus, sense) in raised {
            if pending.queues.len() >= ATTENTION_NEXUSES && !pending.queues.contains_key(&nexus) {
                tracing::warn!(initiator = %nexus.initiator, "iscsi: unit attention dropped");
                continue;
            }
            let queue = pending.queues.entry(nexus).or_default();
            let reset_pending = sense.asc == 0x29 && queue.iter().any(|s| s.asc == 0x29);
            if !reset_pending && !queue.contains(&sense) && queue.len() < ATTENTIONS_PER_NEXUS {
                queue.push_back(sense);
            }
        }
    }

    /// The oldest unit attention of `nexus`, now reported.
    fn take(&self, nexus: &Nexus) -> Option<Sense> {
        let mut pending = lock(&self.pending);
        let queue = pending.queues.get_mut(nexus)?;
        let sense = queue.pop_front();
        if queue.is_empty() {
            pending.queues.remove(nexus);
        }
        sense
    }

    fn forget(&self, nexus: &Nexus) {
        let mut pending = lock(&self.pending);
        pending.queues.remove(nexus);
        pending.lost.retain(|lost| lost != nexus);
    }

    /// `nexus` was lost: I_T NEXUS LOSS OCCURRED waits for its initiator
    /// port's next session (type docs).
    fn lost(&self, nexus: &Nexus) {
        self.raise(vec![(nexus.clone(), Sense::NEXUS_LOSS)]);
        let mut pending = lock(&self.pending);
        pending.lost.retain(|lost| lost != nexus);
        pending.lost.push_back(nexus.clone());
        while pending.lost.len() > LOST_NEXUSES {
            if let Some(oldest) = pending.lost.pop_front() {
                pending.queues.remove(&oldest);
            }
        }
    }

    /// A session of `nexus` began: it is no longer a lost one (its
    /// pending attentions are reported to the new session).
    fn found(&self, nexus: &Nexus) {
        lock(&self.pending).lost.retain(|lost| lost != nexus);
    }
}

/// The replicated store's state.
pub struct Replicated {
    source: Arc<dyn ReservationSource>,
    cache: Mutex<Cached>,
    /// One read at a time.
    reading: tokio::sync::Mutex<()>,
    /// A background refresh is running.
    refreshing: AtomicBool,
    /// Where the changes seen in new versions raise unit attentions.
    attentions: Arc<Attentions>,
    /// This agent's id (ReservationStore::agent).
    agent: u64,
    /// A task renews this agent's SPC-2 reservation.
    renewing: AtomicBool,
}

impl std::fmt::Debug for Replicated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cached = lock(&self.cache);
        f.debug_struct("Replicated")
            .field("version", &cached.version)
            .field("read_at", &cached.read_at)
            .finish()
    }
}

struct Cached {
    state: Reservations,
    version: u64,
    /// When the read that produced `state` was sent (`None`: never read).
    read_at: Option<Instant>,
    /// The SPC-2 reservation's (agent, beat) and when this agent first
    /// installed a copy with them (its lease, module docs).
    legacy_seen: Option<(u64, u64, Instant)>,
}

impl Cached {
    /// Whether the SPC-2 reservation of another agent has not been
    /// renewed for [`LEGACY_LEASE`]: its holder's agent is gone.
    fn legacy_expired(&self, agent: u64) -> bool {
        match (&self.state.legacy, self.legacy_seen) {
            (Some(legacy), Some((_, _, seen))) if legacy.agent != agent => {
                seen.elapsed() > LEGACY_LEASE
            }
            _ => false,
        }
    }
}

/// Whether `state`'s SPC-2 reservation keeps `nexus` out (`expired`:
/// the lease of its holder's agent ran out).
fn legacy_conflict(state: &Reservations, nexus: &Nexus, expired: bool) -> bool {
    state
        .legacy
        .as_ref()
        .is_some_and(|legacy| legacy.holder != *nexus && !expired)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn conflict() -> Outcome {
    Outcome {
        status: RESERVATION_CONFLICT,
        sense: None,
        data: Bytes::new(),
    }
}

fn busy() -> Outcome {
    Outcome {
        status: BUSY,
        sense: None,
        data: Bytes::new(),
    }
}

/// Whether a PERSISTENT RESERVE OUT service action may take access away
/// from another I_T nexus: RESERVE, PREEMPT, PREEMPT AND ABORT.
fn restricts(cdb: &[u8; 16]) -> bool {
    matches!(cdb[1] & 0x1f, 1 | 4 | 5)
}

impl ReservationStore {
    /// Held in this agent only (lost with it: no APTPL).
    pub fn local() -> ReservationStore {
        ReservationStore {
            kind: Store::Local(Mutex::new(Reservations::default())),
            attentions: Arc::default(),
            agent: rand::random(),
        }
    }

    /// Kept in the unit's replicated state, reached through `source`
    /// (persists through power loss: APTPL offered).
    pub fn replicated(source: Arc<dyn ReservationSource>) -> ReservationStore {
        let attentions = Arc::<Attentions>::default();
        let agent = rand::random();
        ReservationStore {
            kind: Store::Replicated(Arc::new(Replicated {
                source,
                cache: Mutex::new(Cached {
                    state: Reservations::default(),
                    version: 0,
                    read_at: None,
                    legacy_seen: None,
                }),
                reading: tokio::sync::Mutex::new(()),
                refreshing: AtomicBool::new(false),
                attentions: attentions.clone(),
                agent,
                renewing: AtomicBool::new(false),
            })),
            attentions,
            agent,
        }
    }

    /// Whether the state survives power loss (PTPL_C, APTPL accepted).
    fn ptpl_capable(&self) -> bool {
        matches!(self.kind, Store::Replicated(_))
    }

    /// The oldest unit attention waiting for `nexus` (reported now).
    pub fn take_attention(&self, nexus: &Nexus) -> Option<Sense> {
        self.attentions.take(nexus)
    }

    /// `nexus`'s session ended with a logout: its unit attentions go
    /// with it.
    pub fn forget(&self, nexus: &Nexus) {
        self.attentions.forget(nexus);
    }

    /// `nexus`'s session ended without a logout (I_T nexus loss,
    /// [`Attentions`]).
    pub fn nexus_lost(&self, nexus: &Nexus) {
        self.attentions.lost(nexus);
    }

    /// A session of `nexus` began.
    pub fn nexus_found(&self, nexus: &Nexus) {
        self.attentions.found(nexus);
    }

    /// Raise `sense` for each of `nexuses` (a reset's unit attention).
    pub fn raise(&self, nexuses: &[Nexus], sense: Sense) {
        self.attentions
            .raise(nexuses.iter().map(|n| (n.clone(), sense)).collect());
    }

    /// `f` of a copy fresh enough to admit a command (shared.rs module
    /// docs); `Err` is the outcome to answer instead (BUSY when the
    /// control plane could not be read for [`GIVE_UP`]).
    async fn check<T>(&self, f: impl Fn(&Reservations, bool) -> T) -> Result<T, Outcome> {
        let shared = match &self.kind {
            Store::Local(state) => return Ok(f(&lock(state), false)),
            Store::Replicated(shared) => shared,
        };
        let deadline = Instant::now() + GIVE_UP;
        loop {
            {
                let cached = lock(&shared.cache);
                if let Some(age) = cached.read_at.map(|at| at.elapsed()) {
                    if age < FRESH_FOR {
                        let answer = f(&cached.state, cached.legacy_expired(shared.agent));
                        drop(cached);
                        if age >= REFRESH_AFTER {
                            Replicated::refresh_in_background(shared);
                        }
                        return Ok(answer);
                    }
                }
            }
            if shared.refresh(Instant::now()).await.is_err() {
                if Instant::now() >= deadline {
                    return Err(busy());
                }
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }

    /// Whether `nexus` may run a command of class `access` now; `Err` is
    /// the outcome to answer instead of running it (BUSY when the control
    /// plane could not be read for [`GIVE_UP`]).
    pub async fn permits(&self, nexus: &Nexus, access: Access) -> Result<bool, Outcome> {
        self.admit(nexus, access, true)
            .await
            .map(|(permitted, _)| permitted)
    }

    /// Whether `nexus` may run a command of class `access` now, and
    /// whether the SPC-2 reservation keeps it out (`false` when
    /// `legacy_exempt`: INQUIRY, REPORT LUNS, REQUEST SENSE, RELEASE(6)),
    /// from one fresh copy; `Err` as for [`ReservationStore::permits`].
    pub async fn admit(
        &self,
        nexus: &Nexus,
        access: Access,
        legacy_exempt: bool,
    ) -> Result<(bool, bool), Outcome> {
        if access == Access::Always && legacy_exempt && matches!(self.kind, Store::Replicated(_)) {
            return Ok((true, false));
        }
        self.check(|state, expired| {
            (
                state.permits(nexus, access),
                !legacy_exempt && legacy_conflict(state, nexus, expired),
            )
        })
        .await
    }

    /// RESERVE(6) (`reserve`) or RELEASE(6) of `nexus` (scsi.rs module
    /// docs): kept with the persistent state, so every agent of the
    /// volume enforces it; a RESERVE that takes access away is answered
    /// after [`RESTRICT_GRACE`] like a persistent RESERVE.
    pub async fn reserve6(&self, nexus: &Nexus, reserve: bool) -> Outcome {
        let agent = self.agent;
        let change = |state: &mut Reservations, expired: bool| {
            if state.any_registered() {
                // Persistent registrations: RESERVE conflicts, RELEASE
                // does nothing (SPC-4 5.13.3).
                return if reserve { conflict() } else { Outcome::good() };
            }
            let held_by_other = legacy_conflict(state, nexus, expired);
            match (reserve, held_by_other) {
                (true, true) => conflict(),
                (true, false) => {
                    let current = state
                        .legacy
                        .as_ref()
                        .is_some_and(|l| l.holder == *nexus && l.agent == agent);
                    if !current {
                        state.legacy = Some(Legacy {
                            holder: nexus.clone(),
                            agent,
                            beat: 0,
                        });
                    }
                    Outcome::good()
                }
                (false, true) => Outcome::good(),
                (false, false) => {
                    if state.legacy.as_ref().is_some_and(|l| l.holder == *nexus) {
                        state.legacy = None;
                    }
                    Outcome::good()
                }
            }
        };
        let outcome = self.update(nexus, reserve, change).await;
        if let Store::Replicated(shared) = &self.kind {
            if reserve && outcome.status == super::scsi::GOOD {
                Replicated::renew_in_background(shared);
            }
        }
        outcome
    }

    /// The SPC-2 reservation ends: `Some(nexus)`: if `nexus` holds it
    /// through this agent (its session ended); `None`: whoever holds it
    /// (LUN RESET, TARGET RESET).
    pub async fn end_reserve6(&self, nexus: Option<&Nexus>) {
        let agent = self.agent;
        if let (Some(nexus), Store::Replicated(shared)) = (nexus, &self.kind) {
            // Only this agent writes a reservation naming it, and it
            // installs what it writes: a copy without one for `nexus`
            // needs no read (a session's end does not wait for the
            // control plane then).
            let held = lock(&shared.cache)
                .state
                .legacy
                .as_ref()
                .is_some_and(|l| l.holder == *nexus && l.agent == agent);
            if !held {
                return;
            }
        }
        let actor = nexus.cloned().unwrap_or_else(|| Nexus {
            initiator: String::new(),
            isid: [0; 6],
        });
        self.update(&actor, false, |state: &mut Reservations, _| {
            let ends = state.legacy.as_ref().is_some_and(|l| match nexus {
                Some(nexus) => l.holder == *nexus && l.agent == agent,
                None => true,
            });
            if ends {
                state.legacy = None;
            }
            Outcome::good()
        })
        .await;
    }

    /// Apply `change` to the state (a fresh copy for the replicated
    /// store, compare-and-set until it sticks); `actor` made it,
    /// `restricting`: answer only after [`RESTRICT_GRACE`] once stored.
    async fn update(
        &self,
        actor: &Nexus,
        restricting: bool,
        change: impl Fn(&mut Reservations, bool) -> Outcome + Sync,
    ) -> Outcome {
        match &self.kind {
            Store::Local(state) => {
                let mut state = lock(state);
                let before = state.clone();
                let outcome = change(&mut state, false);
                self.attentions
                    .raise(reserve::attentions(&before, &state, Some(actor)));
                outcome
            }
            Store::Replicated(shared) => shared.apply(actor, restricting, &change).await,
        }
    }

    /// PERSISTENT RESERVE IN.
    pub async fn read(&self, cdb: &[u8; 16]) -> Outcome {
        let capable = self.ptpl_capable();
        match &self.kind {
            Store::Local(state) => lock(state)
                .read(cdb, capable)
                .unwrap_or_else(Outcome::check),
            Store::Replicated(shared) => {
                if shared
                    .refresh_until(Instant::now() + GIVE_UP)
                    .await
                    .is_err()
                {
                    return busy();
                }
                lock(&shared.cache)
                    .state
                    .read(cdb, capable)
                    .unwrap_or_else(Outcome::check)
            }
        }
    }

    /// PERSISTENT RESERVE OUT with its parameter list.
    pub async fn write(&self, nexus: &Nexus, cdb: &[u8; 16], parameters: &[u8]) -> Outcome {
        let capable = self.ptpl_capable();
        self.update(nexus, restricts(cdb), |state: &mut Reservations, _| {
            state.write(nexus, cdb, parameters, capable)
        })
        .await
    }
}

impl Replicated {
    /// Read the record if the copy was not read after `needed_after`.
    async fn refresh(&self, needed_after: Instant) -> Result<(), SourceError> {
        let _one = self.reading.lock().await;
        if lock(&self.cache)
            .read_at
            // Strictly after: a read sent in the same clock tick as the
            // request may have been sent before it.
            .is_some_and(|at| at > needed_after)
        {
            return Ok(());
        }
        let sent = Instant::now();
        let record = self.source.read().await?;
        self.install(record, sent, None);
        Ok(())
    }

    /// A fresh read (one sent after this call), retried until `deadline`.
    async fn refresh_until(&self, deadline: Instant) -> Result<(), SourceError> {
        let needed_after = Instant::now();
        loop {
            match self.refresh(needed_after).await {
                Ok(()) => return Ok(()),
                Err(SourceError::Unauthorized) => return Err(SourceError::Unauthorized),
                Err(error) if Instant::now() >= deadline => return Err(error),
                Err(error) => {
                    tracing::debug!(%error, "reading the persistent reservations");
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
    }

    fn refresh_in_background(shared: &Arc<Replicated>) {
        if shared.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(error) = shared.refresh(Instant::now()).await {
                tracing::debug!(%error, "refreshing the persistent reservations");
            }
            shared.refreshing.store(false, Ordering::Release);
        });
    }

    /// Take `record` (read or written at `at`) unless the copy is newer;
    /// a newer version raises the unit attentions of what changed since
    /// the copy (`actor`: the nexus whose write made it, when it is this
    /// agent's applied write; nobody hears about their own change).
    fn install(&self, record: PersistentReservations, at: Instant, actor: Option<&Nexus>) {
        let mut cached = lock(&self.cache);
        if record.version < cached.version {
            return;
        }
        let next = Reservations::from_record(&record);
        if record.version > cached.version {
            self.attentions
                .raise(reserve::attentions(&cached.state, &next, actor));
        }
        let legacy = next.legacy.as_ref().map(|l| (l.agent, l.beat));
        let seen = cached.legacy_seen.map(|(agent, beat, _)| (agent, beat));
        if legacy != seen {
            cached.legacy_seen = legacy.map(|(agent, beat)| (agent, beat, Instant::now()));
        }
        cached.version = record.version;
        cached.state = next;
        cached.read_at = Some(cached.read_at.map_or(at, |before| before.max(at)));
    }

    /// Raise this agent's SPC-2 reservation's beat every
    /// [`RENEW_EVERY`] while it holds it (one task at a time).
    fn renew_in_background(shared: &Arc<Replicated>) {
        if shared.renewing.swap(true, Ordering::AcqRel) {
            return;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            let agent = shared.agent;
            let ours = |shared: &Replicated| {
                lock(&shared.cache)
                    .state
                    .legacy
                    .as_ref()
                    .is_some_and(|l| l.agent == agent)
            };
            loop {
                tokio::time::sleep(RENEW_EVERY).await;
                if !ours(&shared) {
                    shared.renewing.store(false, Ordering::Release);
                    // A RESERVE between the check and the store found the
                    // flag still set: carry on for it.
                    if ours(&shared) && !shared.renewing.swap(true, Ordering::AcqRel) {
                        continue;
                    }
                    return;
                }
                let nobody = Nexus {
                    initiator: String::new(),
                    isid: [0; 6],
                };
                shared
                    .apply(&nobody, false, &|state: &mut Reservations, _| {
                        if let Some(legacy) = state.legacy.as_mut().filter(|l| l.agent == agent) {
                            legacy.beat = legacy.beat.wrapping_add(1);
                        }
                        Outcome::good()
                    })
                    .await;
            }
        });
    }

    async fn apply(
        &self,
        nexus: &Nexus,
        restricting: bool,
        change: &(dyn Fn(&mut Reservations, bool) -> Outcome + Sync),
    ) -> Outcome {
        let deadline = Instant::now() + GIVE_UP;
        if self.refresh_until(deadline).await.is_err() {
            return busy();
        }
        for _ in 0..MAX_ATTEMPTS {
            let (mut next, version, expired) = {
                let cached = lock(&self.cache);
                (
                    cached.state.clone(),
                    cached.version,
                    cached.legacy_expired(self.agent),
                )
            };
            let before = next.clone();
            let outcome = change(&mut next, expired);
            if next == before {
                // Refused, or a no-op (RELEASE of nothing, a repeated
                // RESERVE): nothing to store.
                return outcome;
            }
            let record = next.to_record();
            loop {
                let sent = Instant::now();
                match self.source.set(version, record.clone()).await {
                    Ok(reply) => {
                        let ours = reply.applied
                            || PersistentReservations {
                                version: 0,
                                ..reply.record.clone()
                            } == record;
                        self.install(reply.record, sent, ours.then_some(nexus));
                        if !ours {
                            // Another agent changed it first: recompute.
                            break;
                        }
                        if restricting {
                            tokio::time::sleep(RESTRICT_GRACE).await;
                        }
                        return outcome;
                    }
                    Err(SourceError::Unauthorized) => return Outcome::check(Sense::NOT_READY),
                    Err(error) if Instant::now() >= deadline => {
                        tracing::warn!(%error, "updating the persistent reservations");
                        return busy();
                    }
                    Err(_) => tokio::time::sleep(RETRY_PAUSE).await,
                }
            }
        }
        busy()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::iscsi::reserve::tests::{nexus, params, prout};
    use crate::iscsi::reserve::RESERVATION_CONFLICT;

    /// The control plane's register, in memory: compare-and-set on the
    /// version like `SetReservations`; counts reads.
    #[derive(Default)]
    struct Register {
        record: Mutex<PersistentReservations>,
        reads: std::sync::atomic::AtomicUsize,
    }

    impl ReservationSource for Register {
        fn read(&self) -> BoxFuture<'_, Result<PersistentReservations, SourceError>> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            let record = lock(&self.record).clone();
            Box::pin(async move { Ok(record) })
        }

        fn set(
            &self,
            expected_version: u64,
            record: PersistentReservations,
        ) -> BoxFuture<'_, Result<HostReservationReply, SourceError>> {
            let mut current = lock(&self.record);
            let reply = if current.version == expected_version {
                *current = PersistentReservations {
                    version: expected_version + 1,
                    ..record
                };
                HostReservationReply {
                    applied: true,
                    record: current.clone(),
                }
            } else {
                HostReservationReply {
                    applied: false,
                    record: current.clone(),
                }
            };
            Box::pin(async move { Ok(reply) })
        }
    }

    /// Two agents over one register: what one registers and reserves,
    /// the other enforces; a PREEMPT through the second stops the first's
    /// writes as soon as it is answered; a new agent (a restart) starts
    /// from the register, not from nothing.
    #[tokio::test(start_paused = true)]
    async fn two_agents_share_one_record() {
        let register = Arc::new(Register::default());
        let first = ReservationStore::replicated(register.clone());
        let second = ReservationStore::replicated(register.clone());
        let (a, b) = (nexus("iqn.a"), nexus("iqn.b"));
        // Both agents admitted a write before anything was reserved.
        assert_eq!(second.permits(&b, Access::Write).await, Ok(true));
        assert_eq!(
            first.write(&a, &prout(0, 0), &params(0, 0xa)).await.status,
            0
        );
        let started = tokio::time::Instant::now();
        assert_eq!(
            first.write(&a, &prout(1, 1), &params(0xa, 0)).await.status,
            0
        );
        assert!(
            started.elapsed() >= RESTRICT_GRACE,
            "RESERVE answered before the grace"
        );
        // The second agent's copy is older than FRESH_FOR now: it reads.
        assert_eq!(second.permits(&b, Access::Write).await, Ok(false));
        assert_eq!(second.permits(&b, Access::Read).await, Ok(true));
        assert_eq!(first.permits(&a, Access::Write).await, Ok(true));
        // b registers and preempts a through the second agent, taking EA.
        assert_eq!(
            second.write(&b, &prout(0, 0), &params(0, 0xb)).await.status,
            0
        );
        // The first agent reads its copy now (it is fresh afterwards).
        assert_eq!(first.permits(&a, Access::Write).await, Ok(true));
        assert_eq!(
            second
                .write(&b, &prout(4, 3), &params(0xb, 0xa))
                .await
                .status,
            0
        );
        // Answered: the first agent refuses a at once, though its copy
        // was fresh when the PREEMPT began.
        assert_eq!(first.permits(&a, Access::Write).await, Ok(false));
        assert_eq!(first.permits(&a, Access::Read).await, Ok(false));
        assert_eq!(first.permits(&a, Access::Always).await, Ok(true));
        // A restarted agent: the reservation is still there.
        let restarted = ReservationStore::replicated(register.clone());
        assert_eq!(restarted.permits(&a, Access::Write).await, Ok(false));
        assert_eq!(restarted.permits(&b, Access::Write).await, Ok(true));
        let mut read_keys = [0u8; 16];
        read_keys[0] = 0x5e;
        read_keys[8] = 0xff;
        let keys = restarted.read(&read_keys).await.data;
        assert_eq!(&keys[4..8], &8u32.to_be_bytes());
        assert_eq!(&keys[8..16], &0xbu64.to_be_bytes());
        // A lost compare-and-set is recomputed: the first agent's copy is
        // stale (version behind) when a registers again, and the register
        // ends with both changes.
        assert_eq!(
            first.write(&a, &prout(0, 0), &params(0, 0xc)).await.status,
            0
        );
        let record = lock(&register.record).clone();
        assert_eq!(record.registrations.len(), 2);
        assert_eq!(record.reservation.as_ref().unwrap().initiator, "iqn.b");
        // A conflicting PR OUT changes nothing and is not stored.
        let version = record.version;
        let refused = first.write(&a, &prout(1, 1), &params(0xc, 0)).await;
        assert_eq!(refused.status, RESERVATION_CONFLICT);
        assert_eq!(lock(&register.record).version, version);
    }

    /// RESERVE(6) through one agent conflicts through another (after the
    /// grace, every command but the exempt ones); it ends with its
    /// holder's session; the holder's agent keeps it alive by renewing
    /// it; an agent that stops renewing (it died) loses it after the
    /// lease, measured by the other agent.
    #[tokio::test(start_paused = true)]
    async fn reserve6_is_shared_by_agents_and_leased() {
        let register = Arc::new(Register::default());
        let first = ReservationStore::replicated(register.clone());
        let second = ReservationStore::replicated(register.clone());
        let (a, b) = (nexus("iqn.a"), nexus("iqn.b"));
        // Both agents admitted a command before anything was reserved.
        assert_eq!(
            second.admit(&b, Access::Write, false).await,
            Ok((true, false))
        );
        let started = tokio::time::Instant::now();
        assert_eq!(first.reserve6(&a, true).await.status, 0);
        assert!(
            started.elapsed() >= RESTRICT_GRACE,
            "answered before the grace"
        );
        // The second agent keeps b out at once: reads, TUR, RESERVE.
        assert_eq!(
            second.admit(&b, Access::Read, false).await,
            Ok((true, true))
        );
        assert_eq!(
            second.admit(&b, Access::Always, false).await,
            Ok((true, true))
        );
        assert_eq!(
            second.admit(&b, Access::Always, true).await,
            Ok((true, false))
        );
        assert_eq!(second.reserve6(&b, true).await.status, RESERVATION_CONFLICT);
        // b's RELEASE is GOOD and changes nothing.
        assert_eq!(second.reserve6(&b, false).await.status, 0);
        assert_eq!(
            first.admit(&a, Access::Write, false).await,
            Ok((true, false))
        );
        // Held for a minute: the holder's agent renews it, so it stands.
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(
                second.admit(&b, Access::Write, false).await,
                Ok((true, true))
            );
        }
        // a's session ends through the first agent: b takes it.
        first.end_reserve6(Some(&a)).await;
        tokio::time::sleep(FRESH_FOR).await;
        assert_eq!(second.reserve6(&b, true).await.status, 0);
        tokio::time::sleep(FRESH_FOR).await;
        assert_eq!(first.admit(&a, Access::Read, false).await, Ok((true, true)));
        // A LUN reset through the first agent ends b's.
        first.end_reserve6(None).await;
        tokio::time::sleep(FRESH_FOR).await;
        assert_eq!(
            second.admit(&b, Access::Write, false).await,
            Ok((true, false))
        );
        assert!(lock(&register.record).legacy.is_none());
        // An agent that died holding it (its beat never moves again): the
        // others keep out until the lease has run out on their clock.
        {
            let mut record = lock(&register.record);
            record.version += 1;
            record.legacy = Some(local_control_plane::state::LegacyReservation {
                initiator: "iqn.dead".into(),
                isid: [0x80, 0, 0, 0, 0, 9],
                agent: 42,
                beat: 7,
            });
        }
        tokio::time::sleep(FRESH_FOR).await;
        assert_eq!(
            second.admit(&b, Access::Write, false).await,
            Ok((true, true))
        );
        tokio::time::sleep(LEGACY_LEASE - Duration::from_secs(1)).await;
        assert_eq!(
            second.admit(&b, Access::Write, false).await,
            Ok((true, true))
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            second.admit(&b, Access::Write, false).await,
            Ok((true, false))
        );
        assert_eq!(second.reserve6(&b, true).await.status, 0);
        assert_eq!(
            lock(&register.record)
                .legacy
                .as_ref()
                .map(|l| l.initiator.clone()),
            Some("iqn.b".to_owned())
        );
        // A persistent registration makes RESERVE(6) conflict.
        second.end_reserve6(Some(&b)).await;
        assert_eq!(
            first.write(&a, &prout(0, 0), &params(0, 0xa)).await.status,
            0
        );
        assert_eq!(second.reserve6(&b, true).await.status, RESERVATION_CONFLICT);
    }

    /// With no reservation anywhere, reads of the control plane happen at
    /// most once per REFRESH_AFTER while commands flow, never per command.
    #[tokio::test(start_paused = true)]
    async fn commands_check_a_fresh_copy_without_a_read_each() {
        let register = Arc::new(Register::default());
        let store = ReservationStore::replicated(register.clone());
        let a = nexus("iqn.a");
        for _ in 0..1000 {
            assert_eq!(store.permits(&a, Access::Write).await, Ok(true));
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // About 1000 ms of commands: one read per REFRESH_AFTER at most
        // (+1 for the first), far from one per command.
        let reads = register.reads.load(Ordering::Relaxed);
        assert!((2..=10).contains(&reads), "{reads} reads");
    }

    /// A PREEMPT through one agent raises REGISTRATIONS PREEMPTED for the
    /// preempted nexus on the other agent (seen in the record's next
    /// version), once; the preemptor hears nothing.
    #[tokio::test(start_paused = true)]
    async fn preemption_through_another_agent_raises_a_unit_attention() {
        let register = Arc::new(Register::default());
        let first = ReservationStore::replicated(register.clone());
        let second = ReservationStore::replicated(register.clone());
        let (a, b) = (nexus("iqn.a"), nexus("iqn.b"));
        assert_eq!(
            first.write(&a, &prout(0, 0), &params(0, 0xa)).await.status,
            0
        );
        assert_eq!(
            second.write(&b, &prout(0, 0), &params(0, 0xb)).await.status,
            0
        );
        // The first agent has a copy with both registrations.
        assert_eq!(first.permits(&a, Access::Write).await, Ok(true));
        assert_eq!(first.take_attention(&a), None);
        assert_eq!(
            second
                .write(&b, &prout(4, 3), &params(0xb, 0xa))
                .await
                .status,
            0
        );
        assert_eq!(second.take_attention(&b), None);
        // The first agent's next check reads the new version (nothing is
        // reserved: a PREEMPT without a reservation only removes
        // registrations).
        assert_eq!(first.permits(&a, Access::Write).await, Ok(true));
        assert_eq!(
            first.take_attention(&a),
            Some(Sense::REGISTRATIONS_PREEMPTED)
        );
        assert_eq!(first.take_attention(&a), None);
        // APTPL is offered and kept in the record.
        let mut p = params(0xb, 0xb);
        p[20] = 1;
        assert_eq!(second.write(&b, &prout(0, 0), &p).await.status, 0);
        assert!(lock(&register.record).aptpl);
        let mut caps = [0u8; 16];
        caps[0] = 0x5e;
        caps[1] = 2;
        caps[8] = 8;
        let caps = first.read(&caps).await.data;
        assert_eq!((caps[2] & 1, caps[3] & 1), (1, 1));
    }
}
