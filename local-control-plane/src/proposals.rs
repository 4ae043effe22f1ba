//! The member's proposal queue: every command this member proposes goes
//! through one task that commits them **in batches**.
//!
//! ```text
//! propose(command) ─▶ queue ─▶ proposal task: wait for the entry in flight,
//!                                take every queued command (at most
//!                                MAX_BATCH), one client_write:
//!                                  1 command  ─▶ the command itself
//!                                  n commands ─▶ Command::Batch(n)
//!                              ◀─ each caller gets its own command's result
//!                                 (or the write's error: ForwardToLeader…)
//! ```
//!
//! **Why.** openraft 0.9's core awaits the sync of every log append before
//! it handles anything else, ticks included, and appends each proposal
//! separately. A unit's leader gets a lease renewal per primary partition
//! every renew interval (150 ms) besides the controllers' commands; on a
//! loaded box where one sync of the Raft log takes 50–300 ms (measured:
//! `bench/raft-term.sh` beside a disk-bound load, a quarter of the leader's
//! time in syncs of 50 ms or more), the queue of proposals kept the core in
//! syncs back to back: no heartbeat left, followers' election timers ran
//! out and the term rose. With one entry in flight and the rest of the
//! queue batched behind it, the core syncs at most once per commit round
//! trip however many partitions renew.
//!
//! A batch is applied command by command ([`Command::Batch`]): a refused
//! command changes nothing and does not affect the others, exactly as if
//! each had been proposed alone. On a follower the write fails with
//! `ForwardToLeader` for every command of the batch, and each caller
//! forwards its own command as before.

use openraft::error::{ClientWriteError, RaftError};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::command::{Command, Outcome};
use crate::error::CommandError;
use crate::raft::{HeadNodeInfo, Raft, RaftNodeId};

/// Most commands in one Raft entry (a lease renewal encodes to ~150
/// bytes: a full batch stays far below a snapshot chunk).
pub const MAX_BATCH: usize = 256;

/// Why a proposal was not committed: openraft's error, as `client_write`
/// returns it (boxed: it is large).
pub type ProposeError = Box<RaftError<RaftNodeId, ClientWriteError<RaftNodeId, HeadNodeInfo>>>;

/// What the state machine answered to one proposed command.
pub type Applied = Result<Outcome, CommandError>;

struct Pending {
    command: Command,
    reply: oneshot::Sender<Result<Applied, ProposeError>>,
}

/// The handle: cheap to clone, one queue per member.
#[derive(Debug, Clone)]
pub struct Proposals {
    queue: mpsc::UnboundedSender<Pending>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("command", &self.command)
            .finish_non_exhaustive()
    }
}

/// How well proposals batch: commands proposed and Raft entries written
/// for them (`rackblock_lcp_proposals_total`,
/// `rackblock_lcp_proposal_entries_total`).
#[derive(Debug, Clone, Default)]
pub struct ProposalMetrics {
    pub commands: Counter,
    pub entries: Counter,
}

impl ProposalMetrics {
    pub fn register(registry: &mut Registry) -> ProposalMetrics {
        let metrics = ProposalMetrics::default();
        registry.register(
            "rackblock_lcp_proposals",
            "Commands this member proposed to Raft",
            metrics.commands.clone(),
        );
        registry.register(
            "rackblock_lcp_proposal_entries",
            "Raft entries (one per batch of commands) this member proposed",
            metrics.entries.clone(),
        );
        metrics
    }
}

impl Proposals {
    /// Starts the proposal task for `raft` (on the current runtime); it
    /// ends with `shutdown` or when the last handle is dropped.
    pub fn start(
        raft: Raft,
        metrics: ProposalMetrics,
        shutdown: CancellationToken,
    ) -> (Proposals, tokio::task::JoinHandle<()>) {
        let (queue, receiver) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(raft, receiver, metrics, shutdown));
        (Proposals { queue }, task)
    }

    /// Proposes `command` and waits until it is committed and applied (or
    /// the write failed). Dropping the future abandons only the wait: the
    /// command may still be committed, as with `client_write`.
    pub async fn propose(&self, command: Command) -> Result<Applied, ProposeError> {
        let (reply, answer) = oneshot::channel();
        if self.queue.send(Pending { command, reply }).is_err() {
            return Err(stopped());
        }
        answer.await.unwrap_or_else(|_| Err(stopped()))
    }
}

/// The error a proposal gets once the member is shutting down.
fn stopped() -> ProposeError {
    Box::new(RaftError::Fatal(openraft::error::Fatal::Stopped))
}

async fn run(
    raft: Raft,
    mut queue: mpsc::UnboundedReceiver<Pending>,
    metrics: ProposalMetrics,
    shutdown: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            () = shutdown.cancelled() => return,
            next = queue.recv() => match next {
                Some(pending) => pending,
                None => return,
            },
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(pending) => batch.push(pending),
                Err(_) => break,
            }
        }
        metrics.commands.inc_by(batch.len() as u64);
        metrics.entries.inc();
        // The write itself is not abandoned at shutdown: openraft's own
        // shutdown ends it.
        commit(&raft, batch).await;
    }
}

/// One `client_write` for `batch`; every caller gets its own answer.
async fn commit(raft: &Raft, mut batch: Vec<Pending>) {
    if batch.len() == 1 {
        let Some(pending) = batch.pop() else { return };
        let result = raft
            .client_write(pending.command)
            .await
            .map(|r| r.data)
            .map_err(Box::new);
        let _ = pending.reply.send(result);
        return;
    }
    let (commands, replies): (Vec<Command>, Vec<_>) =
        batch.into_iter().map(|p| (p.command, p.reply)).unzip();
    let count = commands.len();
    match raft.client_write(Command::Batch(commands)).await {
        Ok(response) => match response.data {
            Ok(Outcome::Batch(results)) if results.len() == count => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(Ok(result));
                }
            }
            // Cannot happen: the state machine answers a batch with one
            // result per command. Tell every caller rather than guess.
            other => {
                tracing::error!(?other, count, "a batch was answered with something else");
                let refused = CommandError::invalid(format!(
                    "the batch of {count} commands was answered with {other:?}"
                ));
                for reply in replies {
                    let _ = reply.send(Ok(Err(refused.clone())));
                }
            }
        },
        Err(error) => {
            for reply in replies {
                let _ = reply.send(Err(Box::new(error.clone())));
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_applied_command_by_command_and_refuses_nesting() {
        let mut state = crate::state::UnitState::default();
        let node = |name: &str| Command::RegisterHeadNode {
            node: crate::state::NodeId(name.into()),
            address_a: "127.0.0.1:1".into(),
            address_b: "127.0.0.2:1".into(),
        };
        let outcome = state.apply(Command::Batch(vec![
            node("hn-1"),
            node("hn-1"),
            Command::Batch(vec![node("hn-2")]),
            node("hn-3"),
        ]));
        let Ok(Outcome::Batch(results)) = outcome else {
            panic!("a batch answers a batch: {outcome:?}");
        };
        assert_eq!(results.len(), 4);
        assert_eq!(results[0], Ok(Outcome::Done));
        assert!(matches!(
            results[1],
            Err(CommandError::AlreadyExists { .. })
        ));
        assert!(matches!(
            results[2],
            Err(CommandError::InvalidArgument { .. })
        ));
        assert_eq!(results[3], Ok(Outcome::Done));
        // The refused ones changed nothing: hn-2 is not registered.
        let mut alone = crate::state::UnitState::default();
        alone.apply(node("hn-1")).expect("first");
        alone.apply(node("hn-3")).expect("second");
        assert_eq!(state, alone);
    }
}
