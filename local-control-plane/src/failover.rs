//! Head-node failover and re-mirroring, run by the Raft leader only, next
//! to the failure [`Detector`](crate::detector::Detector).
//!
//! ```text
//! every poll_interval, from the replicated UnitState only (plan):
//!   primary on a Down/Failed node, secondary Up:
//!     secondary_catching_up                                      ⇒ wait for the old
//!                                                                   primary (counted; never
//!                                                                   promote a stale copy)
//!     lease None, or lease.expires_at_ms + lease_margin <= now  ⇒ Promote
//!         ChangePrimary{new_primary: secondary, new_secondary: pick(), expected_epoch}
//!     else                                                       ⇒ wait (counted; the
//!                                                                   controller wakes when
//!                                                                   the first one is due)
//!   secondary on a Down/Failed node, primary Up                  ⇒ Remirror
//!         ChangeSecondary{new_secondary: pick()}
//!   both copies on nodes that are not Up                         ⇒ stuck (counted, never guessed)
//!   pick(): an Up head node that is neither copy, fewest roles (planned ones
//!           included), ties by id — so a dead node's roles spread evenly.
//! act: at most `max_changes_per_tick` proposals per tick, and at most
//!      `max_changes_per_second` over a sliding second (a per-unit rate limit:
//!      a rack-wide failure must not start a storm of re-mirrors).
//! ```
//!
//! Invariants:
//! * **Node faults only.** The controller reads `Health`, which the detector
//!   sets to Down only when *both* paths have been silent for
//!   `node_down_after`; a path fault (one network down) never moves a role.
//! * **Never two primaries.** A promotion is proposed only once the old
//!   primary's lease plus a clock-skew margin is over, and the state machine
//!   refuses `ChangePrimary` while the lease is valid at the command's
//!   `now_ms` anyway (`LeaseHeld`). The old primary stops serving at 90 % of
//!   its lease by its own monotonic clock (head-node manager).
//! * **Never promote a stale copy.** A secondary named by a role change
//!   (re-mirror, or the new secondary of a promotion) starts empty; the
//!   primary catches it up from its log and reports it with
//!   `SecondaryInSync` once it holds every record the primary
//!   acknowledged. Until then (`Partition::secondary_catching_up`) a dead
//!   primary's partition is not promoted: it stays unavailable (hosts see
//!   retryable errors) until the old primary comes back, because the
//!   secondary may lack acknowledged writes only the primary's log holds.
//!   A secondary that was in sync when its primary died is promoted after
//!   the lease as before.
//! * **Idempotent across leader changes.** Every decision is a pure function
//!   of the replicated state ([`plan`]); `expected_epoch` makes a repeated
//!   promotion a harmless `StaleEpoch`, and a new leader re-derives the same
//!   plan from the same state.
//! * **Bounded.** One tick proposes a bounded number of commands, each
//!   awaited (committed and applied) before the next.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::command::{Command, Outcome};
use crate::error::CommandError;
use crate::state::{Epoch, Health, NodeId, PartitionId, UnitState};

/// Default pause between two plans.
pub const DEFAULT_FAILOVER_POLL_INTERVAL_MS: u64 = 50;
/// Default margin added to a lease expiry before promoting (wall-clock
/// offset between the head node that took the lease and the leader; the
/// head node's config defaults it to a tenth of its lease).
pub const DEFAULT_LEASE_MARGIN_MS: u64 = 60;
/// Default bound on proposals per tick.
pub const DEFAULT_MAX_CHANGES_PER_TICK: usize = 16;
/// Default per-unit rate limit on role changes.
pub const DEFAULT_MAX_CHANGES_PER_SECOND: usize = 64;

/// Tunables of the failover controller.
#[derive(Debug, Clone)]
pub struct FailoverConfig {
    /// Time between two plans.
    pub poll_interval: Duration,
    /// Added to a lease's expiry before the partition is promoted.
    pub lease_margin: Duration,
    /// Most role changes proposed in one tick (bounded concurrency).
    pub max_changes_per_tick: usize,
    /// Most role changes per second for the whole unit (rate limit).
    pub max_changes_per_second: usize,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            poll_interval: Duration::from_millis(DEFAULT_FAILOVER_POLL_INTERVAL_MS),
            lease_margin: Duration::from_millis(DEFAULT_LEASE_MARGIN_MS),
            max_changes_per_tick: DEFAULT_MAX_CHANGES_PER_TICK,
            max_changes_per_second: DEFAULT_MAX_CHANGES_PER_SECOND,
        }
    }
}

/// One decided role change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The secondary takes over from a dead primary; a new secondary joins.
    Promote {
        partition: PartitionId,
        new_primary: NodeId,
        new_secondary: NodeId,
        expected_epoch: Epoch,
    },
    /// A new secondary replaces a dead one.
    Remirror {
        partition: PartitionId,
        new_secondary: NodeId,
    },
}

impl Action {
    /// The command that carries the action out at `now_ms`.
    pub fn command(&self, now_ms: u64) -> Command {
        match self {
            Action::Promote {
                partition,
                new_primary,
                new_secondary,
                expected_epoch,
            } => Command::ChangePrimary {
                partition: *partition,
                new_primary: new_primary.clone(),
                new_secondary: Some(new_secondary.clone()),
                expected_epoch: *expected_epoch,
                now_ms,
            },
            Action::Remirror {
                partition,
                new_secondary,
            } => Command::ChangeSecondary {
                partition: *partition,
                new_secondary: new_secondary.clone(),
            },
        }
    }
}

/// What one look at the state decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Role changes to make now, in partition order.
    pub actions: Vec<Action>,
    /// Partitions whose dead primary's lease has not expired yet.
    pub waiting_for_lease: usize,
    /// When the first of those may be promoted (lease expiry + margin,
    /// wall-clock milliseconds).
    pub next_promotion_at_ms: Option<u64>,
    /// Partitions with no Up copy, or no Up node to take a role.
    pub stuck: usize,
    /// Partitions whose primary is dead and whose secondary is still
    /// catching up: not promoted, they wait for the old primary.
    pub waiting_for_sync: usize,
    /// Partitions whose secondary is catching up (primary alive or not).
    pub catching_up: usize,
}

fn is_up(state: &UnitState, node: &NodeId) -> bool {
    state
        .nodes()
        .get(node)
        .is_some_and(|n| n.health == Health::Up)
}

/// The failover decisions for `state` at `now_ms` (pure; see module docs).
pub fn plan(state: &UnitState, now_ms: u64, lease_margin_ms: u64) -> Plan {
    // Roles per Up node, updated as actions are planned (balance).
    let mut roles: BTreeMap<NodeId, usize> = state
        .nodes()
        .values()
        .filter(|n| n.health == Health::Up)
        .map(|n| (n.id.clone(), 0))
        .collect();
    for p in state.volumes().values().flat_map(|v| v.partitions.iter()) {
        for node in [&p.primary, &p.secondary] {
            if let Some(count) = roles.get_mut(node) {
                *count += 1;
            }
        }
    }
    let pick = |roles: &BTreeMap<NodeId, usize>, exclude: [&NodeId; 2]| -> Option<NodeId> {
        roles
            .iter()
            .filter(|(id, _)| !exclude.contains(id))
            .min_by_key(|(id, count)| (**count, (*id).clone()))
            .map(|(id, _)| id.clone())
    };
    let mut plan = Plan::default();
    for p in state.volumes().values().flat_map(|v| v.partitions.iter()) {
        let primary_up = is_up(state, &p.primary);
        let secondary_up = is_up(state, &p.secondary);
        let dead = |node: &NodeId| {
            state
                .nodes()
                .get(node)
                .is_some_and(|n| matches!(n.health, Health::Down | Health::Failed))
        };
        if p.secondary_catching_up {
            plan.catching_up += 1;
        }
        if dead(&p.primary) {
            if !secondary_up {
                plan.stuck += 1;
                continue;
            }
            if p.secondary_catching_up {
                // The secondary may lack acknowledged writes that only the
                // dead primary's log holds: wait for that primary.
                plan.waiting_for_sync += 1;
                continue;
            }
            let due_ms = p
                .lease
                .as_ref()
                .map(|l| l.expires_at_ms.saturating_add(lease_margin_ms));
            if let Some(due_ms) = due_ms.filter(|due| *due > now_ms) {
                plan.waiting_for_lease += 1;
                plan.next_promotion_at_ms =
                    Some(plan.next_promotion_at_ms.map_or(due_ms, |t| t.min(due_ms)));
                continue;
            }
            let Some(new_secondary) = pick(&roles, [&p.primary, &p.secondary]) else {
                plan.stuck += 1;
                continue;
            };
            *roles.entry(new_secondary.clone()).or_default() += 1;
            plan.actions.push(Action::Promote {
                partition: p.id,
                new_primary: p.secondary.clone(),
                new_secondary,
                expected_epoch: p.epoch,
            });
        } else if dead(&p.secondary) {
            if !primary_up {
                plan.stuck += 1;
                continue;
            }
            let Some(new_secondary) = pick(&roles, [&p.primary, &p.secondary]) else {
                plan.stuck += 1;
                continue;
            };
            *roles.entry(new_secondary.clone()).or_default() += 1;
            plan.actions.push(Action::Remirror {
                partition: p.id,
                new_secondary,
            });
        }
    }
    plan
}

/// Failover gauges and counters (valid while this node leads).
#[derive(Debug, Clone, Default)]
pub struct FailoverMetrics {
    pending_promotions: Gauge,
    pending_remirrors: Gauge,
    waiting_for_lease: Gauge,
    stuck: Gauge,
    waiting_for_sync: Gauge,
    catching_up: Gauge,
    promotions: Counter,
    remirrors: Counter,
}

impl FailoverMetrics {
    /// Registers `rackblock_lcp_failover_*`.
    pub fn register(registry: &mut Registry) -> FailoverMetrics {
        let m = FailoverMetrics::default();
        registry.register(
            "rackblock_lcp_failover_pending_promotions",
            "Partitions whose primary is down and that are being promoted",
            m.pending_promotions.clone(),
        );
        registry.register(
            "rackblock_lcp_failover_pending_remirrors",
            "Partitions whose secondary is down and that are being re-mirrored",
            m.pending_remirrors.clone(),
        );
        registry.register(
            "rackblock_lcp_failover_waiting_for_lease",
            "Partitions with a down primary whose lease has not expired yet",
            m.waiting_for_lease.clone(),
        );
        registry.register(
            "rackblock_lcp_failover_stuck",
            "Partitions with no Up copy or no Up node to take a role",
            m.stuck.clone(),
        );
        registry.register(
            "rackblock_lcp_failover_waiting_for_sync",
            "Partitions with a down primary whose secondary is still catching up (not promoted)",
            m.waiting_for_sync.clone(),
        );
        registry.register(
            "rackblock_lcp_failover_secondary_catching_up",
            "Partitions whose secondary has not been reported in sync by its primary",
            m.catching_up.clone(),
        );
        registry.register(
            "rackblock_lcp_failover_promotions",
            "Promotions committed by this leader",
            m.promotions.clone(),
        );
        registry.register(
            "rackblock_lcp_failover_remirrors",
            "Secondary replacements committed by this leader",
            m.remirrors.clone(),
        );
        m
    }

    fn observe(&self, plan: &Plan) {
        let count = |f: fn(&Action) -> bool| {
            i64::try_from(plan.actions.iter().filter(|a| f(a)).count()).unwrap_or(i64::MAX)
        };
        self.pending_promotions
            .set(count(|a| matches!(a, Action::Promote { .. })));
        self.pending_remirrors
            .set(count(|a| matches!(a, Action::Remirror { .. })));
        self.waiting_for_lease
            .set(i64::try_from(plan.waiting_for_lease).unwrap_or(i64::MAX));
        self.stuck
            .set(i64::try_from(plan.stuck).unwrap_or(i64::MAX));
        self.waiting_for_sync
            .set(i64::try_from(plan.waiting_for_sync).unwrap_or(i64::MAX));
        self.catching_up
            .set(i64::try_from(plan.catching_up).unwrap_or(i64::MAX));
    }
}

fn wall_clock_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The leader's failover controller (see module docs).
#[derive(Debug)]
pub struct FailoverController {
    config: FailoverConfig,
    metrics: FailoverMetrics,
    /// When the recent proposals were made (sliding one-second window).
    recent: VecDeque<Instant>,
}

impl FailoverController {
    pub fn new(config: FailoverConfig, metrics: FailoverMetrics) -> FailoverController {
        FailoverController {
            config,
            metrics,
            recent: VecDeque::new(),
        }
    }

    /// Plans and acts until `stop`. `read` gives the current state,
    /// `propose` commits a command through Raft.
    pub async fn run<R, P, F>(mut self, read: R, propose: P, stop: CancellationToken)
    where
        R: Fn() -> UnitState,
        P: Fn(Command) -> F,
        F: Future<Output = Result<Result<Outcome, CommandError>, String>>,
    {
        let margin_ms = u64::try_from(self.config.lease_margin.as_millis()).unwrap_or(u64::MAX);
        'ticks: loop {
            let plan = plan(&read(), wall_clock_ms(), margin_ms);
            self.metrics.observe(&plan);
            for action in plan
                .actions
                .iter()
                .take(self.config.max_changes_per_tick.max(1))
            {
                let now = Instant::now();
                while self
                    .recent
                    .front()
                    .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
                {
                    self.recent.pop_front();
                }
                if self.recent.len() >= self.config.max_changes_per_second.max(1) {
                    break; // rate limited: the rest waits for the next tick
                }
                self.recent.push_back(now);
                let command = action.command(wall_clock_ms());
                info!(?action, "failover: proposing a role change");
                match propose(command).await {
                    Ok(Ok(_)) => {
                        let counter = match action {
                            Action::Promote { .. } => &self.metrics.promotions,
                            Action::Remirror { .. } => &self.metrics.remirrors,
                        };
                        counter.inc();
                    }
                    Ok(Err(error)) => warn!(?action, %error, "failover command refused"),
                    Err(error) => {
                        // Probably lost leadership; the next leader re-plans.
                        warn!(%error, "failover cannot commit");
                        break 'ticks;
                    }
                };
            }
            // Wake when the first waiting lease is over, not a poll later.
            let pause = plan
                .next_promotion_at_ms
                .map_or(self.config.poll_interval, |due_ms| {
                    let wait = Duration::from_millis(due_ms.saturating_sub(wall_clock_ms()) + 1);
                    wait.min(self.config.poll_interval)
                });
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = stop.cancelled() => break,
            }
        }
        self.metrics.observe(&Plan::default());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn unit(nodes: u32, partitions: u64) -> UnitState {
        let mut state = UnitState::new();
        crate::fixture::register_nodes_and_sleds(&mut state, nodes, 3);
        state
            .apply(Command::RegisterVolume {
                volume: 1,
                name: "v".into(),
                size_bytes: partitions << 20,
                partition_size_bytes: 1 << 20,
                k: 2,
                m: 1,
            })
            .unwrap();
        state
    }

    fn down(state: &mut UnitState, node: &str) {
        state
            .apply(Command::SetNodeHealth {
                node: NodeId::new(node),
                health: Health::Down,
            })
            .unwrap();
    }

    fn lease(state: &mut UnitState, p: PartitionId, now_ms: u64, duration_ms: u64) {
        let entry = state.partition(p).unwrap().clone();
        state
            .apply(Command::GrantLease {
                partition: p,
                holder: entry.primary,
                epoch: entry.epoch,
                now_ms,
                duration_ms,
            })
            .unwrap();
    }

    /// Applies every planned action; all must be accepted.
    fn apply(state: &mut UnitState, plan: &Plan, now_ms: u64) {
        for action in &plan.actions {
            state.apply(action.command(now_ms)).unwrap();
        }
        state.check_invariants().unwrap();
    }

    /// A head node whose write log failed reports itself Failed with the
    /// reason: every role it holds moves (primaries once the lease is
    /// over), no new one lands on it, and Up again clears the reason.
    #[test]
    fn a_reported_log_failure_moves_every_role_off_the_node() {
        let mut state = unit(4, 8);
        let held = |state: &UnitState| {
            state
                .volumes()
                .values()
                .flat_map(|v| v.partitions.iter())
                .filter(|p| p.primary.0 == "hn-1" || p.secondary.0 == "hn-1")
                .count()
        };
        assert!(held(&state) > 0);
        let primaries: Vec<PartitionId> = state
            .volumes()
            .values()
            .flat_map(|v| v.partitions.iter())
            .filter(|p| p.primary.0 == "hn-1")
            .map(|p| p.id)
            .collect();
        for p in &primaries {
            lease(&mut state, *p, 10_000, 600);
        }
        state
            .apply(Command::ReportNodeFailure {
                node: NodeId::new("hn-1"),
                reason: "write log /d/wal.img failed: EIO".into(),
            })
            .unwrap();
        let node = &state.nodes()[&NodeId::new("hn-1")];
        assert_eq!(node.health, Health::Failed);
        assert_eq!(
            node.failure.as_deref(),
            Some("write log /d/wal.img failed: EIO")
        );
        // Secondaries move at once; primaries wait for their leases.
        let early = plan(&state, 10_100, 60);
        apply(&mut state, &early, 10_100);
        let late = plan(&state, 10_700, 60);
        apply(&mut state, &late, 10_700);
        assert_eq!(held(&state), 0, "{early:?} {late:?}");
        state
            .apply(Command::SetNodeHealth {
                node: NodeId::new("hn-1"),
                health: Health::Up,
            })
            .unwrap();
        assert_eq!(state.nodes()[&NodeId::new("hn-1")].failure, None);
    }

    #[test]
    fn healthy_unit_plans_nothing() {
        let state = unit(3, 6);
        assert_eq!(plan(&state, 0, 500), Plan::default());
    }

    #[test]
    fn dead_primary_waits_for_its_lease_then_promotes_the_secondary() {
        let mut state = unit(3, 6);
        let victims: Vec<PartitionId> = state
            .volumes()
            .values()
            .flat_map(|v| v.partitions.iter())
            .filter(|p| p.primary.0 == "hn-1")
            .map(|p| p.id)
            .collect();
        assert!(!victims.is_empty());
        for p in &victims {
            lease(&mut state, *p, 10_000, 2_000);
        }
        down(&mut state, "hn-1");
        let before: BTreeMap<PartitionId, _> = victims
            .iter()
            .map(|p| (*p, state.partition(*p).unwrap().clone()))
            .collect();
        // Lease until 12_000, margin 500: nothing before 12_500.
        let early = plan(&state, 12_499, 500);
        assert!(early
            .actions
            .iter()
            .all(|a| matches!(a, Action::Remirror { .. })));
        assert_eq!(early.waiting_for_lease, victims.len());
        // The controller sleeps until exactly then, not a poll later.
        assert_eq!(early.next_promotion_at_ms, Some(12_500));
        let status = state.unit_status().failover;
        assert_eq!(status.failing_over, victims.len());
        assert_eq!(
            status.failing_over + status.remirroring,
            early.actions.len() + victims.len()
        );
        let now = 12_500;
        let decided = plan(&state, now, 500);
        apply(&mut state, &decided, now);
        for (p, old) in before {
            let new = state.partition(p).unwrap();
            assert_eq!(new.primary, old.secondary, "{p}");
            assert_ne!(new.secondary.0, "hn-1");
            assert_eq!(new.epoch, old.epoch + 1);
        }
        // Idempotent: the same state plans nothing more for the dead node;
        // the new secondaries are catching up until their primaries report.
        let again = plan(&state, now, 500);
        assert!(again.actions.is_empty(), "{again:?}");
        // (every partition that had a role on the dead node: promoted or
        // re-mirrored)
        assert!(again.catching_up >= victims.len(), "{again:?}");
        let status = state.unit_status().failover;
        assert_eq!(status.secondary_catching_up, again.catching_up);
        assert_eq!((status.failing_over, status.remirroring), (0, 0));
    }

    fn report_in_sync(state: &mut UnitState, p: PartitionId) {
        let entry = state.partition(p).unwrap().clone();
        state
            .apply(Command::SecondaryInSync {
                partition: p,
                primary: entry.primary,
                secondary: entry.secondary,
                epoch: entry.epoch,
            })
            .unwrap();
    }

    /// The bug of the kernel-NBD VM test: the secondary dies, a fresh one is
    /// named (empty), no write comes, the primary dies. The fresh secondary
    /// lacks what only the primary's log held: it must not be promoted; the
    /// partition waits for the old primary. Once the primary reports it in
    /// sync, it is promoted as usual (and its own new secondary is
    /// catching up in turn).
    #[test]
    fn a_secondary_still_catching_up_is_never_promoted() {
        let mut state = unit(4, 1);
        let p = state.volumes()[&1].partitions[0].clone();
        assert!(
            !p.secondary_catching_up,
            "a new volume's copies are both empty"
        );
        down(&mut state, &p.secondary.0.clone());
        let remirror = plan(&state, 0, 500);
        assert_eq!(remirror.actions.len(), 1);
        apply(&mut state, &remirror, 0);
        let fresh = state.partition(p.id).unwrap().clone();
        assert!(fresh.secondary_catching_up);
        assert_eq!(state.unit_status().failover.secondary_catching_up, 1);

        // The primary dies before reporting the new secondary in sync.
        down(&mut state, &p.primary.0.clone());
        let waiting = plan(&state, u64::MAX / 2, 500);
        assert!(waiting.actions.is_empty(), "{waiting:?}");
        assert_eq!(waiting.waiting_for_sync, 1);
        let status = state.unit_status().failover;
        assert_eq!(status.waiting_for_old_primary, 1);
        assert_eq!(status.failing_over, 0);
        // The state machine keeps the flag across a refused stale report.
        let stale = state.apply(Command::SecondaryInSync {
            partition: p.id,
            primary: fresh.primary.clone(),
            secondary: fresh.secondary.clone(),
            epoch: fresh.epoch - 1,
        });
        assert!(
            matches!(stale, Err(CommandError::StaleEpoch { .. })),
            "{stale:?}"
        );
        let wrong = state.apply(Command::SecondaryInSync {
            partition: p.id,
            primary: fresh.secondary.clone(),
            secondary: fresh.primary.clone(),
            epoch: fresh.epoch,
        });
        assert!(
            matches!(wrong, Err(CommandError::NotPrimary { .. })),
            "{wrong:?}"
        );
        assert!(state.partition(p.id).unwrap().secondary_catching_up);

        // The old primary returns and catches the secondary up: promotion
        // works again the next time it dies.
        state
            .apply(Command::SetNodeHealth {
                node: p.primary.clone(),
                health: Health::Up,
            })
            .unwrap();
        report_in_sync(&mut state, p.id);
        assert!(!state.partition(p.id).unwrap().secondary_catching_up);
        assert_eq!(state.unit_status().failover.secondary_catching_up, 0);
        down(&mut state, &p.primary.0.clone());
        let promote = plan(&state, u64::MAX / 2, 500);
        assert_eq!(promote.actions.len(), 1, "{promote:?}");
        assert!(matches!(promote.actions[0], Action::Promote { .. }));
        apply(&mut state, &promote, u64::MAX / 2);
        let promoted = state.partition(p.id).unwrap();
        assert_eq!(promoted.primary, fresh.secondary);
        assert!(
            promoted.secondary_catching_up,
            "the promotion names a new, empty secondary"
        );
    }

    #[test]
    fn dead_secondary_is_replaced_and_roles_stay_balanced() {
        let mut state = unit(4, 8);
        down(&mut state, "hn-2");
        let decided = plan(&state, 0, 500);
        assert!(!decided.actions.is_empty());
        apply(&mut state, &decided, 0);
        let mut roles: BTreeMap<String, usize> = BTreeMap::new();
        for p in state.volumes().values().flat_map(|v| v.partitions.iter()) {
            assert_ne!(p.primary.0, "hn-2");
            assert_ne!(p.secondary.0, "hn-2");
            *roles.entry(p.primary.0.clone()).or_default() += 1;
            *roles.entry(p.secondary.0.clone()).or_default() += 1;
        }
        let (min, max) = (
            roles.values().min().copied().unwrap(),
            roles.values().max().copied().unwrap(),
        );
        assert!(max - min <= 2, "{roles:?}");
    }

    #[test]
    fn path_faults_and_draining_move_nothing_and_two_dead_copies_are_stuck() {
        let mut state = unit(3, 3);
        state
            .apply(Command::ReportPathFault {
                endpoint: crate::command::Endpoint::Node(NodeId::new("hn-1")),
                network: crate::command::Network::A,
                up: false,
            })
            .unwrap();
        state
            .apply(Command::SetNodeHealth {
                node: NodeId::new("hn-3"),
                health: Health::Draining,
            })
            .unwrap();
        assert_eq!(plan(&state, u64::MAX / 2, 500), Plan::default());
        let mut state = unit(3, 3);
        down(&mut state, "hn-1");
        down(&mut state, "hn-2");
        let decided = plan(&state, u64::MAX / 2, 500);
        assert!(decided.actions.is_empty());
        assert!(decided.stuck > 0);
    }

    #[test]
    fn two_nodes_cannot_fail_over() {
        let mut state = unit(2, 2);
        down(&mut state, "hn-1");
        let decided = plan(&state, u64::MAX / 2, 500);
        assert!(decided.actions.is_empty());
        assert_eq!(decided.stuck, 2);
    }
}
