//! The simulated group: real members on real stores behind a [`SimNet`],
//! crash and restart, the observers of every member's metrics, and the
//! checkers.

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use local_control_plane::raft::{
    HeadNodeInfo, LogStore, Raft, RaftMetrics, RaftStore, SharedState, StateMachineStore,
};
use openraft::ServerState;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::net::{mix, SimNet, SimNetwork};
use crate::node_info;

pub type Id = u64;

/// Heartbeat of every member (ms); openraft ticks every 1.5 heartbeats.
const HEARTBEAT_MS: u64 = 25;
/// Election timeouts are `BASE + SPREAD * slot + jitter`, `slot` a seeded
/// permutation of the members, `jitter < JITTER`.
const ELECTION_BASE_MS: u64 = 150;
const ELECTION_SPREAD_MS: u64 = 60;
const ELECTION_JITTER_MS: u64 = 20;

/// What the observers saw, and what they found wrong.
#[derive(Debug, Default)]
pub struct Observations {
    /// Term -> (leader, the member that saw it lead). From every metrics
    /// update of every member: its own `Leader` state, or the leader of its
    /// committed vote.
    pub leaders: BTreeMap<u64, (Id, Id)>,
    /// Log index -> (term of the entry applied there, member that applied
    /// it).
    pub applied: BTreeMap<u64, (u64, Id)>,
    /// Applied log position `(index, term)` -> (hash of the `UnitState`
    /// after it, member).
    pub states: BTreeMap<(u64, u64), (u64, Id)>,
    pub violations: Vec<String>,
}

impl Observations {
    pub fn leader(&mut self, term: u64, leader: Id, seen_by: Id) {
        match self.leaders.get(&term) {
            None => {
                self.leaders.insert(term, (leader, seen_by));
            }
            Some(&(known, known_by)) if known != leader => {
                self.violations.push(format!(
                    "election safety: term {term} has leader {known} (seen by {known_by}) \
                     and leader {leader} (seen by {seen_by})"
                ));
            }
            Some(_) => {}
        }
    }

    pub fn applied(&mut self, index: u64, term: u64, member: Id) {
        match self.applied.get(&index) {
            None => {
                self.applied.insert(index, (term, member));
            }
            Some(&(known, known_by)) if known != term => {
                self.violations.push(format!(
                    "state machine safety: index {index} applied from term {known} on {known_by} \
                     and from term {term} on {member}"
                ));
            }
            Some(_) => {}
        }
    }

    pub fn state(&mut self, position: (u64, u64), hash: u64, member: Id) {
        match self.states.get(&position) {
            None => {
                self.states.insert(position, (hash, member));
            }
            Some(&(known, known_by)) if known != hash => {
                self.violations.push(format!(
                    "state machine safety: after entry {position:?} member {known_by} and \
                     member {member} have different states"
                ));
            }
            Some(_) => {}
        }
    }

    pub fn record_metrics(&mut self, metrics: &RaftMetrics) {
        let id = metrics.id;
        if metrics.state == ServerState::Leader {
            self.leader(metrics.current_term, id, id);
        }
        if let Some(leader) = metrics.current_leader {
            self.leader(metrics.current_term, leader, id);
        }
        if let Some(log_id) = metrics.last_applied {
            self.applied(log_id.index, log_id.leader_id.term, id);
        }
    }
}

/// Records every metrics update of one member until it stops.
async fn observe(
    mut metrics: watch::Receiver<RaftMetrics>,
    observations: Arc<Mutex<Observations>>,
) {
    loop {
        lock(&observations).record_metrics(&metrics.borrow_and_update());
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Member {
    dir: PathBuf,
    raft: Option<Raft>,
    shared: SharedState,
    observer: Option<JoinHandle<()>>,
    /// Election timeout of the running incarnation (ms).
    election_timeout_ms: u64,
    /// Starts so far.
    incarnation: u64,
}

/// A group of `size` voters, ids `1..=size`.
pub struct Cluster {
    pub net: SimNet,
    pub observations: Arc<Mutex<Observations>>,
    pub size: u64,
    pub crashes: u64,
    pub restarts: u64,
    /// Members restarted by [`Cluster::supervise`] after openraft's
    /// "replication channel closed" fatal error.
    pub fatal_restarts: u64,
    members: BTreeMap<Id, Member>,
    /// Election-timeout slot per member (a seeded permutation).
    slots: BTreeMap<Id, u64>,
    seed: u64,
    /// Start stagger of the members.
    rng: StdRng,
    _root: tempfile::TempDir,
}

impl Cluster {
    /// Start `size` members on fresh stores and initialize the group from
    /// member 1 (what bootstrap from the rack file does).
    pub async fn start(seed: u64, size: u64) -> Result<Cluster, String> {
        let root = tempfile::Builder::new()
            .prefix("lcp-sim-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let mut rng = StdRng::seed_from_u64(mix(&[seed, 0x5107]));
        let mut order: Vec<u64> = (0..size).collect();
        order.shuffle(&mut rng);
        let slots = (1..=size).zip(order).collect();
        let mut cluster = Cluster {
            net: SimNet::new(seed),
            observations: Arc::default(),
            size,
            crashes: 0,
            restarts: 0,
            fatal_restarts: 0,
            members: BTreeMap::new(),
            slots,
            seed,
            rng,
            _root: root,
        };
        for id in 1..=size {
            let dir = cluster._root.path().join(format!("member-{id}"));
            cluster.members.insert(
                id,
                Member {
                    dir,
                    raft: None,
                    shared: SharedState::default(),
                    observer: None,
                    election_timeout_ms: 0,
                    incarnation: 0,
                },
            );
            cluster.boot(id).await?;
            // Members do not start in the same instant.
            let stagger = cluster.rng.random_range(0..HEARTBEAT_MS * 3 / 2);
            tokio::time::sleep(Duration::from_millis(stagger)).await;
        }
        let voters: BTreeMap<Id, HeadNodeInfo> = (1..=size).map(|id| (id, node_info(id))).collect();
        cluster
            .raft(1)
            .ok_or("member 1 not running")?
            .initialize(voters)
            .await
            .map_err(|e| format!("initialize: {e}"))?;
        Ok(cluster)
    }

    pub fn quorum(&self) -> usize {
        usize::try_from(self.size).unwrap_or(usize::MAX) / 2 + 1
    }

    pub fn raft(&self, id: Id) -> Option<Raft> {
        self.members.get(&id)?.raft.clone()
    }

    pub fn running(&self) -> Vec<Id> {
        self.members
            .iter()
            .filter(|(_, member)| member.raft.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    pub fn crashed(&self) -> Vec<Id> {
        self.members
            .iter()
            .filter(|(_, member)| member.raft.is_none())
            .map(|(id, _)| *id)
            .collect()
    }

    pub fn metrics(&self, id: Id) -> Option<RaftMetrics> {
        Some(self.raft(id)?.metrics().borrow().clone())
    }

    /// A member that believes it leads, if any (highest term first).
    pub fn leader(&self) -> Option<Id> {
        self.running()
            .into_iter()
            .filter_map(|id| self.metrics(id))
            .filter(|m| m.state == ServerState::Leader)
            .max_by_key(|m| m.current_term)
            .map(|m| m.id)
    }

    pub fn election_timeouts(&self) -> BTreeMap<Id, u64> {
        self.members
            .iter()
            .map(|(id, member)| (*id, member.election_timeout_ms))
            .collect()
    }

    fn config(&mut self, id: Id) -> Arc<openraft::Config> {
        let member = self.members.get_mut(&id).expect("member");
        member.incarnation += 1;
        let jitter = mix(&[self.seed, id, member.incarnation]) % ELECTION_JITTER_MS;
        let min = ELECTION_BASE_MS + ELECTION_SPREAD_MS * self.slots[&id] + jitter;
        member.election_timeout_ms = min;
        let config = openraft::Config {
            cluster_name: "lcp-sim".to_owned(),
            heartbeat_interval: HEARTBEAT_MS,
            // openraft draws the timeout from [min, max) with an unseeded
            // RNG, once per incarnation: a window of one millisecond makes
            // that draw a constant, chosen here from the seed.
            election_timeout_min: min,
            election_timeout_max: min + 1,
            // Snapshot and purge often, so that restarts replay a snapshot
            // plus a log tail and lagging members get `install_snapshot`.
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(16),
            max_in_snapshot_log_to_keep: 0,
            purge_batch_size: 1,
            ..openraft::Config::default()
        };
        Arc::new(config.validate().expect("valid raft config"))
    }

    /// Start member `id` from whatever its directory holds.
    async fn boot(&mut self, id: Id) -> Result<(), String> {
        let config = self.config(id);
        let dir = self.members[&id].dir.clone();
        let (log, state_machine) = open_store(&dir).await?;
        let shared = state_machine.shared();
        let network = SimNetwork {
            net: self.net.clone(),
            from: id,
        };
        let raft = Raft::new(id, config, network, log, state_machine)
            .await
            .map_err(|e| format!("member {id}: Raft::new: {e}"))?;
        self.net.attach(id, raft.clone());
        let observer = tokio::spawn(observe(raft.metrics(), self.observations.clone()));
        let member = self.members.get_mut(&id).ok_or("no such member")?;
        member.raft = Some(raft);
        member.shared = shared;
        member.observer = Some(observer);
        Ok(())
    }

    /// Crash member `id`: it stops answering at once, its Raft stops and
    /// its store handles are dropped. Only what its store made durable
    /// survives (see the module docs for what "crash" cannot cover).
    pub async fn crash(&mut self, id: Id) -> Result<(), String> {
        self.net.detach(id);
        let member = self.members.get_mut(&id).ok_or("no such member")?;
        let Some(raft) = member.raft.take() else {
            return Ok(());
        };
        self.crashes += 1;
        raft.shutdown()
            .await
            .map_err(|e| format!("member {id}: RaftCore panicked: {e}"))?;
        if let Some(observer) = member.observer.take() {
            // The metrics channel closes with the core; the observer has
            // recorded the last metrics and returns.
            observer.await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Restart member `id` from its directory, no manual step.
    pub async fn restart(&mut self, id: Id) -> Result<(), String> {
        if self.members[&id].raft.is_some() {
            return Ok(());
        }
        self.restarts += 1;
        self.boot(id).await
    }

    pub async fn restart_all(&mut self) -> Result<(), String> {
        for id in self.crashed() {
            self.restart(id).await?;
        }
        Ok(())
    }

    pub async fn shutdown(&mut self) -> Result<(), String> {
        for id in self.running() {
            self.crash(id).await?;
        }
        Ok(())
    }

    /// What a head node's supervisor does: a member whose `RaftCore`
    /// stopped by itself is restarted from its directory. One fatal error
    /// is expected, an openraft 0.9.25 race: a leader's replication stream
    /// to a follower exits on seeing a higher vote, and before the core
    /// handles that, it sends the stream a snapshot request, finds the
    /// channel closed and quits with `StorageError(Read Snapshot(None):
    /// replication channel closed)`. Any other fatal error fails the run.
    pub async fn supervise(&mut self) -> Result<(), String> {
        for id in self.running() {
            let fatal = self
                .metrics(id)
                .and_then(|m| m.running_state.err().map(|fatal| fatal.to_string()));
            if let Some(fatal) = fatal {
                if !fatal.contains("replication channel closed") {
                    return Err(format!("member {id} stopped by itself: {fatal}"));
                }
                self.fatal_restarts += 1;
                self.crash(id).await?;
                self.crashes -= 1;
                self.boot(id).await?;
            }
        }
        Ok(())
    }

    /// The checkers that run after every step: what the observers found
    /// (election safety, one term per index), the state-machine invariants
    /// of every running member, and one state per applied log position.
    pub fn check(&self) -> Result<(), String> {
        let mut observations = lock(&self.observations);
        for id in self.running() {
            let state = self.members[&id].shared.read().clone();
            state
                .unit
                .check_invariants()
                .map_err(|e| format!("member {id}: invariant broken: {e}"))?;
            if let Some(log_id) = state.last_applied {
                let json = serde_json::to_string(&state.unit).map_err(|e| e.to_string())?;
                let mut hasher = DefaultHasher::new();
                json.hash(&mut hasher);
                observations.applied(log_id.index, log_id.leader_id.term, id);
                observations.state((log_id.index, log_id.leader_id.term), hasher.finish(), id);
            }
        }
        if observations.violations.is_empty() {
            Ok(())
        } else {
            Err(observations.violations.join("\n"))
        }
    }

    /// The applied state of a running member.
    pub fn state(&self, id: Id) -> local_control_plane::raft::AppliedState {
        self.members[&id].shared.read().clone()
    }

    /// Wait (simulated time) until one running member leads, every running
    /// member follows it in its term, and every running member has applied
    /// the leader's whole log. Returns the leader and how long it took.
    pub async fn settle(&mut self, budget: Duration) -> Result<(Id, Duration), String> {
        let start = Instant::now();
        loop {
            self.supervise().await?;
            if let Some(leader) = self.converged() {
                return Ok((leader, start.elapsed()));
            }
            if start.elapsed() > budget {
                let view: Vec<String> = self
                    .running()
                    .into_iter()
                    .filter_map(|id| self.metrics(id))
                    .map(|m| {
                        format!(
                            "{}: {:?} ({:?}) term {} leader {:?} log {:?} applied {:?}",
                            m.id,
                            m.state,
                            m.running_state,
                            m.current_term,
                            m.current_leader,
                            m.last_log_index,
                            m.last_applied.map(|l| l.index)
                        )
                    })
                    .collect();
                return Err(format!(
                    "liveness: no converged leader within {budget:?} of simulated time \
                     after heal: {}",
                    view.join("; ")
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn converged(&self) -> Option<Id> {
        let running = self.running();
        if running.len() < self.quorum() {
            return None;
        }
        let leader = self.leader()?;
        let lead = self.metrics(leader)?;
        let last = lead.last_log_index;
        running
            .iter()
            .all(|&id| {
                self.metrics(id).is_some_and(|m| {
                    m.current_term == lead.current_term
                        && m.current_leader == Some(leader)
                        && m.last_applied.map(|l| l.index) == last
                })
            })
            .then_some(leader)
    }
}

/// Open a member's store. The previous incarnation's handles may still be
/// held for a moment by a blocking storage task or an RPC in flight (redb
/// locks its file); such a wait is bounded.
async fn open_store(dir: &std::path::Path) -> Result<(LogStore, StateMachineStore), String> {
    let mut attempts = 0;
    loop {
        match RaftStore::open(dir) {
            Ok(store) => return Ok(store),
            Err(error) if attempts < 100 => {
                attempts += 1;
                if attempts == 100 {
                    return Err(format!("open {}: {error}", dir.display()));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(error) => return Err(format!("open {}: {error}", dir.display())),
        }
    }
}
