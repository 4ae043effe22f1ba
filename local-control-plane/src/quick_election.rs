//! Quick election: a follower whose Raft leader's *process is gone* starts
//! an election as soon as the surviving voters can grant it, instead of
//! waiting out openraft's election timer.
//!
//! # Why openraft alone takes ~1.5–2 s
//!
//! In openraft 0.9 a follower that holds a committed vote for a leader
//! **rejects every vote request for `leader_lease` after the last
//! AppendEntries it received** (`Engine::handle_vote_req`; `leader_lease`
//! is set to `election_timeout_max` by `EngineConfig::new`), and its own
//! election timer fires only after `leader_lease + election_timeout` of
//! silence, `election_timeout` being drawn once per process from
//! `[election_timeout_min, election_timeout_max)`. With 0.5–1 s that is
//! 1.5–2 s of silence before the first candidate — and during it every
//! primary's lease lapses, because renewals are Raft commands.
//!
//! # What this module does
//!
//! Every member probes every other on both networks from start-up (the
//! process-wide [`PeerLink`](proto::link::PeerLink)s). A peer whose host
//! **refuses** connections on both networks (`ECONNREFUSED`: the kernel
//! answers, nothing listens) has lost its process — `kill -9`, a crash —
//! which a stall or a network fault never looks like (the detector's
//! `node_refused_down_after` rests on the same fact). When that peer is
//! this follower's leader, the surviving voters' leases on it end
//! `leader_lease` after the last heartbeat they processed — the same
//! broadcast this follower processed last, give or take scheduling — and
//! at the latest `leader_lease` after the refusals began (nothing comes
//! from a dead process), so:
//!
//! ```text
//! state: the leader L this node last followed, triggers made for its loss
//! every poll:
//!   this node leads, or is not a voter      ⇒ forget everything
//!   a leader M is known                     ⇒ follow M (new M: triggers = 0)
//!   L not refused on both paths             ⇒ triggers = 0, nothing to do
//!   this node's vote is for another node    ⇒ nothing (it granted a candidate:
//!                                              campaigning now would depose it)
//!   triggers < max_triggers and now ≥ due   ⇒ raft.trigger().elect()
//!   anchor = when this node last processed an AppendEntries from L,
//!            else refused_since(L)
//!   due = anchor + leader_lease + grace + rank·stagger
//!         (and ≥ previous trigger + retry_interval)
//!   rank = live voters (≠ L, not refused themselves) with a smaller id
//! ```
//!
//! * **Only one candidate at a time.** Voters campaign in raft-id order,
//!   `stagger` apart; a later voter holds back while the earlier one's
//!   candidacy can still succeed, and never campaigns once it granted its
//!   vote to another node. (Two simultaneous candidates split the vote and
//!   fall back to openraft's timers: slower, never unsafe.)
//! * **Retries are bounded** (`max_triggers` per lost leader,
//!   `retry_interval` apart): a vote that arrives a little before a voter's
//!   lease ends (it processed a later heartbeat than this node did) is
//!   rejected, and the next trigger, one term higher, wins. The retries
//!   span past `refused_since + leader_lease`, the latest any voter's lease
//!   can end. After that openraft's own timers run as before.
//! * **Safety is Raft's.** Triggering an election only starts a normal
//!   openraft campaign (vote persisted, log comparison, majority); no
//!   lease or vote check is bypassed. A wrong trigger (a leader whose
//!   listeners refuse while it still runs — impossible for a live
//!   process, whose kernel accepts) costs one election, not data.
//!
//! # What it does not fix
//!
//! The election still takes `leader_lease` (= `election_timeout_max`,
//! 600 ms by default) after the dead leader's last heartbeat: openraft 0.9
//! offers no way to end a follower's vote-refusal window early (no
//! pre-vote, no lease reset), short of a shorter `election_timeout_max`,
//! which also shortens the silence after which a *live* but stalled
//! leader is deposed (`election_timeout_max` + the drawn timeout). Every
//! primary's 600 ms lease lapses meanwhile (the last renewal started at
//! most 150 ms before the kill, the holder stops at 90 %), because a
//! renewal is a Raft command. Keeping leases alive without a leader was
//! not done: a primary that extends its own lease without a commit could
//! serve reads after the failover controller — which waits only for the
//! *recorded* lease plus margin — promoted its secondary and the new
//! primary accepted a write; a longer recorded lease instead would delay
//! every non-leader failover by the same amount.
//!
//! Measured with `bench/failover.sh` (see ARCHITECTURE.md "Failover in one
//! paragraph").

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use proto::link::PathStatus;

use crate::raft::RaftNodeId;

/// Timings of [`QuickElection`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuickElectionConfig {
    /// How long a follower rejects votes after the last AppendEntries from
    /// its leader: openraft 0.9's `leader_lease`, i.e. `election_timeout_max`.
    pub leader_lease: Duration,
    /// Added to the lease: another voter may have processed the same last
    /// heartbeat a little later than this one.
    pub grace: Duration,
    /// Between the first triggers of two voters adjacent in raft-id order.
    pub stagger: Duration,
    /// Between two triggers of the same voter.
    pub retry_interval: Duration,
    /// Triggers per lost leader (then openraft's timers alone).
    pub max_triggers: u32,
}

impl QuickElectionConfig {
    /// The timings for a Raft group with these settings.
    pub fn for_raft(heartbeat: Duration, election_timeout_max: Duration) -> QuickElectionConfig {
        QuickElectionConfig {
            leader_lease: election_timeout_max,
            grace: (heartbeat / 4).max(Duration::from_millis(10)),
            // An earlier voter's election (vote round trip, first
            // AppendEntries) fits well inside two heartbeats.
            stagger: heartbeat * 2,
            retry_interval: heartbeat,
            // The first trigger is anchored on this node's last heartbeat,
            // at most a heartbeat plus a probe interval before the refusals
            // began: three retries reach past `refused_since + lease`.
            max_triggers: 4,
        }
    }
}

/// This member's Raft view, as openraft's metrics give it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftView {
    pub this_node: RaftNodeId,
    /// This node is the leader.
    pub leading: bool,
    pub voters: BTreeSet<RaftNodeId>,
    /// The leader this node knows (`None` while an election runs).
    pub current_leader: Option<RaftNodeId>,
    /// The node this member's current vote is for.
    pub voted_for: Option<RaftNodeId>,
    /// The leader whose AppendEntries this node processed last, and when.
    pub last_heard: Option<(RaftNodeId, Instant)>,
}

/// Since when both paths to a peer refuse connections (the later of the
/// two), or `None` if either path has had a success or a failure of
/// another kind since.
pub fn both_refused_since(paths: &[PathStatus]) -> Option<Instant> {
    paths
        .iter()
        .map(|p| p.refused_since)
        .try_fold(None::<Instant>, |latest, since| {
            since.map(|t| Some(latest.map_or(t, |l| l.max(t))))
        })
        .flatten()
}

/// The sans-IO decision (see module docs): call [`QuickElection::step`]
/// every poll; `true` means "trigger an election now".
#[derive(Debug, Clone)]
pub struct QuickElection {
    config: QuickElectionConfig,
    /// The leader this node last followed.
    leader: Option<RaftNodeId>,
    /// Triggers made since `leader` was lost.
    triggers: u32,
    last_trigger: Option<Instant>,
}

impl QuickElection {
    pub fn new(config: QuickElectionConfig) -> QuickElection {
        QuickElection {
            config,
            leader: None,
            triggers: 0,
            last_trigger: None,
        }
    }

    fn reset_triggers(&mut self) {
        self.triggers = 0;
        self.last_trigger = None;
    }

    /// One poll. `refused_since(id)`: since when voter `id` refuses
    /// connections on both paths ([`both_refused_since`]).
    pub fn step(
        &mut self,
        view: &RaftView,
        refused_since: impl Fn(RaftNodeId) -> Option<Instant>,
        now: Instant,
    ) -> bool {
        if view.leading || !view.voters.contains(&view.this_node) {
            self.leader = None;
            self.reset_triggers();
            return false;
        }
        if let Some(known) = view.current_leader.filter(|l| *l != view.this_node) {
            if self.leader != Some(known) {
                self.leader = Some(known);
                self.reset_triggers();
            }
        }
        let Some(leader) = self.leader else {
            return false;
        };
        let Some(since) = refused_since(leader) else {
            self.reset_triggers();
            return false;
        };
        if view
            .voted_for
            .is_some_and(|v| v != leader && v != view.this_node)
        {
            return false;
        }
        if self.triggers >= self.config.max_triggers {
            return false;
        }
        let rank = view
            .voters
            .iter()
            .filter(|v| **v < view.this_node && **v != leader && refused_since(**v).is_none())
            .count();
        let stagger = self
            .config
            .stagger
            .saturating_mul(u32::try_from(rank).unwrap_or(u32::MAX));
        let anchor = match view.last_heard {
            Some((from, at)) if from == leader => at,
            _ => since,
        };
        let first = anchor + self.config.leader_lease + self.config.grace + stagger;
        let due = match self.last_trigger {
            Some(last) => first.max(last + self.config.retry_interval),
            None => first,
        };
        if now < due {
            return false;
        }
        self.triggers += 1;
        self.last_trigger = Some(now);
        debug_assert!(self.triggers <= self.config.max_triggers);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::link::{PathId, PathState};

    fn config() -> QuickElectionConfig {
        QuickElectionConfig::for_raft(Duration::from_millis(100), Duration::from_millis(600))
    }

    fn view(
        this_node: RaftNodeId,
        leader: Option<RaftNodeId>,
        voted_for: Option<RaftNodeId>,
    ) -> RaftView {
        RaftView {
            this_node,
            leading: false,
            voters: BTreeSet::from([1, 2, 3]),
            current_leader: leader,
            voted_for,
            last_heard: None,
        }
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn waits_for_the_voters_lease_then_triggers_a_bounded_number_of_times() {
        let t0 = Instant::now();
        let mut q = QuickElection::new(config());
        // Following 1, which answers.
        assert!(!q.step(&view(2, Some(1), Some(1)), |_| None, t0));
        let dead = |id| (id == 1).then_some(t0);
        // 1 refuses from t0: nothing before lease + grace (625 ms).
        assert!(!q.step(&view(2, Some(1), Some(1)), dead, t0 + 600 * MS));
        assert!(q.step(&view(2, Some(1), Some(1)), dead, t0 + 625 * MS));
        // Candidate now (vote for itself, no leader): retries a heartbeat
        // apart, at most 3 triggers.
        assert!(!q.step(&view(2, None, Some(2)), dead, t0 + 700 * MS));
        assert!(q.step(&view(2, None, Some(2)), dead, t0 + 725 * MS));
        assert!(q.step(&view(2, None, Some(2)), dead, t0 + 825 * MS));
        assert!(q.step(&view(2, None, Some(2)), dead, t0 + 925 * MS));
        assert!(!q.step(&view(2, None, Some(2)), dead, t0 + 5000 * MS));
    }

    #[test]
    fn the_first_trigger_is_anchored_on_the_last_heartbeat_heard() {
        let t0 = Instant::now();
        let mut q = QuickElection::new(config());
        assert!(!q.step(&view(2, Some(1), Some(1)), |_| None, t0));
        // Last heartbeat from 1 at t0, refusals from t0 + 80 ms.
        let dead = |id| (id == 1).then_some(t0 + 80 * MS);
        let mut heard = view(2, Some(1), Some(1));
        heard.last_heard = Some((1, t0));
        assert!(!q.step(&heard, dead, t0 + 620 * MS));
        assert!(q.step(&heard, dead, t0 + 625 * MS));
        // A heartbeat from another (earlier) leader is no anchor.
        let mut q = QuickElection::new(config());
        assert!(!q.step(&view(2, Some(1), Some(1)), |_| None, t0));
        heard.last_heard = Some((3, t0));
        assert!(!q.step(&heard, dead, t0 + 700 * MS));
        assert!(q.step(&heard, dead, t0 + 705 * MS));
    }

    #[test]
    fn later_voters_hold_back_and_never_depose_a_granted_candidate() {
        let t0 = Instant::now();
        let dead = |id| (id == 1).then_some(t0);
        let mut q = QuickElection::new(config());
        assert!(!q.step(&view(3, Some(1), Some(1)), |_| None, t0));
        // Rank 1 (voter 2 is alive): one stagger later.
        assert!(!q.step(&view(3, Some(1), Some(1)), dead, t0 + 700 * MS));
        // It granted 2's vote: no campaign of its own.
        assert!(!q.step(&view(3, None, Some(2)), dead, t0 + 900 * MS));
        // 2 won: a new leader, nothing to do.
        assert!(!q.step(&view(3, Some(2), Some(2)), dead, t0 + 950 * MS));
        // Voter 2 refusing too: 3 is first in line (and 2 was never its
        // candidate).
        let mut q = QuickElection::new(config());
        assert!(!q.step(&view(3, Some(1), Some(1)), |_| None, t0));
        let both = |id| (id != 3).then_some(t0);
        assert!(q.step(&view(3, Some(1), Some(1)), both, t0 + 625 * MS));
    }

    #[test]
    fn a_leader_that_answers_again_or_never_refused_is_left_alone() {
        let t0 = Instant::now();
        let mut q = QuickElection::new(config());
        assert!(!q.step(&view(2, Some(1), Some(1)), |_| None, t0));
        // Silent (no refusal) for a long time: openraft's timers decide.
        assert!(!q.step(&view(2, Some(1), Some(1)), |_| None, t0 + 10_000 * MS));
        // Refusing, then answering again before the lease: no trigger, and
        // a later refusal counts from its own start.
        let dead_at = |t: Instant| move |id| (id == 1).then_some(t);
        assert!(!q.step(&view(2, Some(1), Some(1)), dead_at(t0), t0 + 300 * MS));
        assert!(!q.step(&view(2, Some(1), Some(1)), |_| None, t0 + 400 * MS));
        let t1 = t0 + 500 * MS;
        assert!(!q.step(&view(2, Some(1), Some(1)), dead_at(t1), t1 + 600 * MS));
        assert!(q.step(&view(2, Some(1), Some(1)), dead_at(t1), t1 + 625 * MS));
        // Never a trigger while leading or as a learner.
        let mut leading = view(1, Some(1), Some(1));
        leading.leading = true;
        let mut q = QuickElection::new(config());
        assert!(!q.step(&leading, |_| Some(t0), t0 + 10_000 * MS));
        let mut q = QuickElection::new(config());
        assert!(!q.step(&view(4, Some(1), Some(1)), |_| None, t0));
        assert!(!q.step(&view(4, Some(1), Some(1)), dead_at(t0), t0 + 10_000 * MS));
    }

    #[test]
    fn both_paths_must_refuse() {
        let t0 = Instant::now();
        let path = |id, refused_since| PathStatus {
            path: id,
            address: std::net::SocketAddr::from(([127, 0, 0, 1], 1)),
            state: PathState::Down,
            last_error: None,
            consecutive_failures: 2,
            last_rtt_us: None,
            down_since: Some(t0),
            refused_since,
            ever_up: true,
        };
        assert_eq!(
            both_refused_since(&[path(PathId::A, Some(t0)), path(PathId::B, None)]),
            None
        );
        assert_eq!(
            both_refused_since(&[
                path(PathId::A, Some(t0)),
                path(PathId::B, Some(t0 + 5 * MS))
            ]),
            Some(t0 + 5 * MS)
        );
    }
}
