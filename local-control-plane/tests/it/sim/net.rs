//! `SimNet`: the in-process router that carries the Raft RPCs of a
//! simulated group, with faults injected per message.
//!
//! Every RPC `from -> to` goes through [`SimNet::deliver`]:
//!
//! 1. the fate of the message is drawn from an RNG seeded by
//!    `(seed, from, to, n)` where `n` counts the messages on that directed
//!    link: request delay, response delay, request dropped, response
//!    dropped. The n-th message on a link meets the same fate whatever the
//!    interleaving of the other links;
//! 2. after the request delay, the target must be running (else
//!    `Unreachable`, like a refused connection), the link `from -> to` must
//!    not be cut and the request not dropped (else the caller waits out
//!    the RPC's hard TTL and gets a `NetworkError`, like a black hole);
//! 3. the target's `Raft` handles the request;
//! 4. after the response delay, the link `to -> from` must not be cut and
//!    the response not dropped (else, again, the caller times out). The
//!    target has then acted on a request whose sender never learns it:
//!    this is what makes a cut asymmetric.
//!
//! The client (the test's writer) is not behind the router: it reaches
//! every running node directly.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use local_control_plane::raft::{
    AppendEntriesRequest, AppendEntriesResponse, HeadNodeInfo, InstallSnapshotError,
    InstallSnapshotRequest, InstallSnapshotResponse, Raft, RaftError, VoteRequest, VoteResponse,
};
use openraft::error::{NetworkError, RPCError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use local_control_plane::raft::TypeConfig;

type Id = u64;
type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<Id, HeadNodeInfo, RaftError<E>>>;

/// Message counters, for the report of a run.
#[derive(Debug, Default, Clone, Copy)]
pub struct NetStats {
    pub sent: u64,
    pub delivered: u64,
    pub to_crashed: u64,
    pub cut: u64,
    pub dropped: u64,
    /// `install_snapshot` RPCs sent (chunks).
    pub snapshot_chunks: u64,
}

/// The faults currently in force.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// Directed links `(from, to)` that carry nothing.
    pub cut: BTreeSet<(Id, Id)>,
    /// Probability (per mille) that one direction of an RPC is lost.
    pub drop_per_mille: u32,
    /// Each direction of an RPC is delayed uniformly in `0..=max_delay_ms`.
    pub max_delay_ms: u64,
}

struct State {
    seed: u64,
    running: BTreeMap<Id, Raft>,
    faults: Faults,
    counters: BTreeMap<(Id, Id), u64>,
    stats: NetStats,
}

/// What happens to one message, decided when it is sent.
struct Fate {
    request_delay: Duration,
    response_delay: Duration,
    request_lost: bool,
    response_lost: bool,
}

/// The router. Cheap to clone; all clones share one state.
#[derive(Clone)]
pub struct SimNet(Arc<Mutex<State>>);

impl SimNet {
    pub fn new(seed: u64) -> Self {
        SimNet(Arc::new(Mutex::new(State {
            seed,
            running: BTreeMap::new(),
            faults: Faults::default(),
            counters: BTreeMap::new(),
            stats: NetStats::default(),
        })))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Route messages for `id` to `raft` (the node is up).
    pub fn attach(&self, id: Id, raft: Raft) {
        self.lock().running.insert(id, raft);
    }

    /// Messages for `id` now fail as `Unreachable` (the node is down).
    pub fn detach(&self, id: Id) {
        self.lock().running.remove(&id);
    }

    pub fn running(&self, id: Id) -> Option<Raft> {
        self.lock().running.get(&id).cloned()
    }

    pub fn faults(&self) -> Faults {
        self.lock().faults.clone()
    }

    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    pub fn stats(&self) -> NetStats {
        self.lock().stats
    }

    fn fate(&self, from: Id, to: Id) -> Fate {
        let mut state = self.lock();
        let counter = state.counters.entry((from, to)).or_insert(0);
        let n = *counter;
        *counter += 1;
        state.stats.sent += 1;
        let mut rng = StdRng::seed_from_u64(mix(&[state.seed, from, to, n]));
        let faults = &state.faults;
        let mut delay = || Duration::from_millis(rng.random_range(0..=faults.max_delay_ms));
        let request_delay = delay();
        let response_delay = delay();
        let request_lost = rng.random_range(0..1000) < faults.drop_per_mille;
        let response_lost = rng.random_range(0..1000) < faults.drop_per_mille;
        Fate {
            request_delay,
            response_delay,
            request_lost,
            response_lost,
        }
    }

    /// Carry one RPC `from -> to` and its response, applying the faults.
    async fn deliver<Req, Resp, E, F, Fut>(
        &self,
        from: Id,
        to: Id,
        option: &RPCOption,
        request: Req,
        call: F,
    ) -> RpcResult<Resp, E>
    where
        E: std::error::Error,
        F: FnOnce(Raft, Req) -> Fut,
        Fut: Future<Output = Result<Resp, RaftError<E>>>,
    {
        let fate = self.fate(from, to);
        tokio::time::sleep(fate.request_delay).await;

        let target = {
            let mut state = self.lock();
            let target = state.running.get(&to).cloned();
            if target.is_none() {
                state.stats.to_crashed += 1;
                Err(None)
            } else if state.faults.cut.contains(&(from, to)) {
                state.stats.cut += 1;
                Err(Some("link cut"))
            } else if fate.request_lost {
                state.stats.dropped += 1;
                Err(Some("request dropped"))
            } else {
                target.ok_or(None)
            }
        };
        let target = match target {
            Ok(target) => target,
            Err(Some(what)) => return black_hole(option, what).await,
            Err(None) => {
                return Err(RPCError::Unreachable(Unreachable::new(
                    &std::io::Error::other(format!("node {to} is down")),
                )))
            }
        };

        let result = call(target, request).await;

        tokio::time::sleep(fate.response_delay).await;
        let lost = {
            let mut state = self.lock();
            if state.faults.cut.contains(&(to, from)) {
                state.stats.cut += 1;
                Some("response link cut")
            } else if fate.response_lost {
                state.stats.dropped += 1;
                Some("response dropped")
            } else {
                state.stats.delivered += 1;
                None
            }
        };
        if let Some(what) = lost {
            return black_hole(option, what).await;
        }
        match result {
            Ok(response) => Ok(response),
            // The target shut down while handling it: as if it had crashed.
            Err(RaftError::Fatal(fatal)) => Err(RPCError::Unreachable(Unreachable::new(&fatal))),
            Err(error) => Err(RPCError::RemoteError(RemoteError::new(to, error))),
        }
    }
}

/// A lost message: the sender hears nothing until its deadline.
async fn black_hole<T, E: std::error::Error>(option: &RPCOption, what: &str) -> RpcResult<T, E> {
    tokio::time::sleep(option.hard_ttl()).await;
    Err(RPCError::Network(NetworkError::new(
        &std::io::Error::other(what.to_owned()),
    )))
}

/// splitmix64 over the words: a well-spread seed per message.
pub fn mix(words: &[u64]) -> u64 {
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    for &word in words {
        x ^= word;
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x = z ^ (z >> 31);
    }
    x
}

/// The `RaftNetworkFactory` of node `from`.
pub struct SimNetwork {
    pub net: SimNet,
    pub from: Id,
}

impl RaftNetworkFactory<TypeConfig> for SimNetwork {
    type Network = SimConnection;

    async fn new_client(&mut self, target: Id, _node: &HeadNodeInfo) -> SimConnection {
        SimConnection {
            net: self.net.clone(),
            from: self.from,
            to: target,
        }
    }
}

/// One node's connection to one peer.
pub struct SimConnection {
    net: SimNet,
    from: Id,
    to: Id,
}

impl RaftNetwork<TypeConfig> for SimConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse> {
        self.net
            .deliver(self.from, self.to, &option, rpc, |raft, rpc| async move {
                raft.append_entries(rpc).await
            })
            .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse, InstallSnapshotError> {
        self.net.lock().stats.snapshot_chunks += 1;
        self.net
            .deliver(self.from, self.to, &option, rpc, |raft, rpc| async move {
                raft.install_snapshot(rpc).await
            })
            .await
    }

    async fn vote(&mut self, rpc: VoteRequest, option: RPCOption) -> RpcResult<VoteResponse> {
        self.net
            .deliver(self.from, self.to, &option, rpc, |raft, rpc| async move {
                raft.vote(rpc).await
            })
            .await
    }
}
