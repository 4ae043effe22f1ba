//! Failure detection, run by the Raft leader only.
//!
//! ```text
//! every poll_interval, for each other head node and each sled:
//!   observed = link.paths()            (PeerLink probes A and B on its own)
//!   recorded = unit state (replicated) paths + health
//!   path A/B observed Up/Down ≠ recorded      ⇒ ReportPathFault{endpoint, network, up}
//!   both paths Down continuously ≥ node_down_after, recorded Up ⇒ Set*Health Down
//!   both paths refused continuously ≥ node_refused_down_after   ⇒ Set*Health Down
//!   any path Up, recorded Down                                  ⇒ Set*Health Up
//! ```
//!
//! * **Two kinds of silence.** A peer that answers nothing (probe
//!   timeouts) may be a stalled process on a loaded machine, so it is Down
//!   only after `node_down_after`. A peer whose host *refuses* connections
//!   on both networks (`ECONNREFUSED`: the host's kernel answers, nothing
//!   listens) has lost its process — `kill -9`, a crash, a restart — which
//!   a stall never looks like, so it is Down after the much shorter
//!   `node_refused_down_after`. Either way a false Down costs a failover,
//!   never data (leases and epochs keep it safe).
//! * **The clock is the link's.** How long a path has been down (or
//!   refused) comes from the process-wide [`PeerLink`](proto::link::PeerLink),
//!   which probes from start-up whether or not this node leads: a leader
//!   elected *because* the old leader died finds the silence already
//!   measured instead of starting its own clock at the election. Only for
//!   a peer this process has reached before on both paths: one it never
//!   reached may still be starting (a whole unit restarting), and its
//!   silence counts from the detector's start at the earliest.
//!
//! * The comparison is against the **replicated** state, not a local memory:
//!   a command is only proposed when the state machine disagrees with what
//!   the probes see, and it is awaited (committed and applied on this
//!   leader) before the next comparison, so a transition is recorded exactly
//!   once, also across leader changes — a new leader finds the previous
//!   leader's records and does not repeat them.
//! * A path in state `Unknown` (no probe completed yet, e.g. just after
//!   this node became leader) is never reported.
//! * A lost path is a **path fault**, never a node fault: a node is Down
//!   only when both paths have been Down for `node_down_after`. Draining
//!   and Failed (operator decisions) are left alone.
//! * The detector only records; the failover controller ([`crate::failover`])
//!   and the repair controller ([`crate::repair`]) act on the records.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hardware::rack::Rack;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use proto::link::{PathId, PathState};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::command::{Command, Endpoint, Network, Outcome};
use crate::error::CommandError;
use crate::network::PeerLinks;
use crate::state::{Health, NodeId, PathHealth, SledId, UnitState};

#[derive(Debug, Clone)]
pub struct DetectorConfig {
    /// Both paths down this long ⇒ Down.
    pub node_down_after: Duration,
    /// Both paths refusing connections this long ⇒ Down.
    pub node_refused_down_after: Duration,
    /// Time between two comparisons.
    pub poll_interval: Duration,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathLabels {
    endpoint: String,
    network: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: String,
}

/// Detector gauges (valid while this node leads).
#[derive(Debug, Clone, Default)]
pub struct DetectorMetrics {
    path_up: Family<PathLabels, Gauge>,
    endpoint_down: Family<EndpointLabels, Gauge>,
    is_running: Gauge,
}

impl DetectorMetrics {
    /// Registers `rackblock_lcp_detector_path_up{endpoint,network}`,
    /// `rackblock_lcp_detector_endpoint_down{endpoint}` and
    /// `rackblock_lcp_detector_running`.
    pub fn register(registry: &mut Registry) -> DetectorMetrics {
        let metrics = DetectorMetrics::default();
        registry.register(
            "rackblock_lcp_detector_path_up",
            "Path as the leader's detector sees it: 1 up, 0 down, -1 unknown",
            metrics.path_up.clone(),
        );
        registry.register(
            "rackblock_lcp_detector_endpoint_down",
            "1 if both paths of the endpoint are down",
            metrics.endpoint_down.clone(),
        );
        registry.register(
            "rackblock_lcp_detector_running",
            "1 while this node runs the failure detector (it leads)",
            metrics.is_running.clone(),
        );
        metrics
    }
}

#[derive(Debug, Clone)]
struct Watched {
    endpoint: Endpoint,
    name: String,
    address_a: SocketAddr,
    address_b: SocketAddr,
}

/// The leader's failure detector (see module docs).
#[derive(Debug)]
pub struct Detector {
    /// The node running this detector (the leader); never probed.
    this_node: NodeId,
    watched: Vec<Watched>,
    links: Arc<PeerLinks>,
    config: DetectorConfig,
    metrics: DetectorMetrics,
    /// When this detector started (this node became leader).
    started: Instant,
}

fn network_of(path: PathId) -> Network {
    match path {
        PathId::A => Network::A,
        PathId::B => Network::B,
    }
}

fn recorded_up(paths: &PathHealth, network: Network) -> bool {
    match network {
        Network::A => paths.network_a_up,
        Network::B => paths.network_b_up,
    }
}

impl Detector {
    /// Watches every head node except `this_node`, and every sled.
    pub fn new(
        this_node: String,
        rack: Rack,
        links: Arc<PeerLinks>,
        config: DetectorConfig,
        metrics: DetectorMetrics,
    ) -> Detector {
        let mut watched: Vec<Watched> = rack
            .head_node
            .iter()
            .filter(|h| h.id != this_node)
            .map(|h| Watched {
                endpoint: Endpoint::Node(NodeId::new(h.id.clone())),
                name: h.id.clone(),
                address_a: h.address_a,
                address_b: h.address_b,
            })
            .collect();
        watched.extend(rack.sled.iter().map(|s| Watched {
            endpoint: Endpoint::Sled(SledId::new(s.id.clone())),
            name: s.id.clone(),
            address_a: s.address_a,
            address_b: s.address_b,
        }));
        Detector {
            this_node: NodeId::new(this_node),
            watched,
            links,
            config,
            metrics,
            started: Instant::now(),
        }
    }

    /// Compare and record until `stop`. `read` gives the current state,
    /// `propose` commits a command through Raft.
    pub async fn run<R, P, F>(mut self, read: R, propose: P, stop: CancellationToken)
    where
        R: Fn() -> UnitState,
        P: Fn(Command) -> F,
        F: Future<Output = Result<Result<Outcome, CommandError>, String>>,
    {
        self.metrics.is_running.set(1);
        self.started = Instant::now();
        // Make sure every link exists (and probes) from the start.
        for w in &self.watched {
            self.links.link(&w.name, w.address_a, w.address_b);
        }
        loop {
            for command in self.step(&read(), Instant::now()) {
                info!(?command, "failure detector records a transition");
                match propose(command).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => warn!(error = %e, "detector command refused"),
                    Err(e) => {
                        // Probably lost leadership; the next leader re-derives.
                        warn!(error = %e, "detector cannot commit");
                        break;
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(self.config.poll_interval) => {}
                () = stop.cancelled() => break,
            }
        }
        self.metrics.is_running.set(0);
    }

    /// One comparison: the commands that bring the state in line with the
    /// observations (pure given the links' states; unit-testable).
    fn step(&mut self, state: &UnitState, now: Instant) -> Vec<Command> {
        let mut commands = own_health(&self.this_node, state);
        for w in &self.watched {
            let link = self.links.link(&w.name, w.address_a, w.address_b);
            let observed = link.paths();
            let (health, paths) = match &w.endpoint {
                Endpoint::Node(id) => match state.nodes().get(id) {
                    Some(n) => (n.health, n.paths),
                    None => continue, // not registered yet
                },
                Endpoint::Sled(id) => match state.sleds().get(id) {
                    Some(s) => (s.health, s.paths),
                    None => continue,
                },
            };
            for status in &observed {
                let network = network_of(status.path);
                let gauge = self
                    .metrics
                    .path_up
                    .get_or_create(&PathLabels {
                        endpoint: w.name.clone(),
                        network: status.path.as_str(),
                    })
                    .clone();
                let up = match status.state {
                    PathState::Up => true,
                    PathState::Down => false,
                    PathState::Unknown => {
                        gauge.set(-1);
                        continue;
                    }
                };
                gauge.set(i64::from(up));
                if recorded_up(&paths, network) != up {
                    commands.push(Command::ReportPathFault {
                        endpoint: w.endpoint.clone(),
                        network,
                        up,
                    });
                }
            }
            let all_down = observed.iter().all(|p| p.state == PathState::Down);
            let any_up = observed.iter().any(|p| p.state == PathState::Up);
            self.metrics
                .endpoint_down
                .get_or_create(&EndpointLabels {
                    endpoint: w.name.clone(),
                })
                .set(i64::from(all_down));
            // Both down (refused) since the later of the two paths' times.
            let both_since = |since: fn(&proto::link::PathStatus) -> Option<Instant>| {
                observed
                    .iter()
                    .map(|p| since(p).filter(|_| p.state == PathState::Down))
                    .try_fold(None::<Instant>, |latest, t| {
                        t.map(|t| Some(latest.map_or(t, |l| l.max(t))))
                    })
                    .flatten()
            };
            // A peer this process never reached on some path may just not
            // have started yet (a whole unit restarting): its silence counts
            // from this detector's start at the earliest, as if measured by
            // the detector itself. Silence after a path was up (a peer that
            // went away) counts from when the link saw it go.
            let never_up = observed.iter().any(|p| !p.ever_up);
            let started = self.started;
            let down_for = |since: Option<Instant>| {
                since
                    .map(|t| if never_up { t.max(started) } else { t })
                    .map(|t| now.saturating_duration_since(t))
            };
            let silent_for = down_for(both_since(|p| p.down_since));
            let refused_for = down_for(both_since(|p| p.refused_since));
            let set_health = |health| match &w.endpoint {
                Endpoint::Node(node) => Command::SetNodeHealth {
                    node: node.clone(),
                    health,
                },
                Endpoint::Sled(sled) => Command::SetSledHealth {
                    sled: sled.clone(),
                    health,
                },
            };
            match health {
                Health::Up => {
                    let silent = silent_for.is_some_and(|d| d >= self.config.node_down_after);
                    let refused =
                        refused_for.is_some_and(|d| d >= self.config.node_refused_down_after);
                    if all_down && (silent || refused) {
                        info!(
                            endpoint = %w.name,
                            ?silent_for,
                            ?refused_for,
                            "both paths down: recording the endpoint Down"
                        );
                        commands.push(set_health(Health::Down));
                    }
                }
                Health::Down => {
                    if any_up {
                        commands.push(set_health(Health::Up));
                    }
                }
                Health::Draining | Health::Failed => {}
            }
        }
        commands
    }
}

/// The leader is alive and a quorum reached it: a restarted node that
/// won an election before another leader saw it come back would stay
/// recorded Down (its own detector never probes itself), and no role
/// could move onto it — with three head nodes, the next failure would
/// find no new secondary. Only Down and path faults are healed; Failed
/// and Draining are an operator's or the node's own word.
fn own_health(this_node: &NodeId, state: &UnitState) -> Vec<Command> {
    let Some(node) = state.nodes().get(this_node) else {
        return Vec::new();
    };
    let mut commands = Vec::new();
    for (network, up) in [
        (Network::A, node.paths.network_a_up),
        (Network::B, node.paths.network_b_up),
    ] {
        if !up {
            commands.push(Command::ReportPathFault {
                endpoint: Endpoint::Node(this_node.clone()),
                network,
                up: true,
            });
        }
    }
    if node.health == Health::Down {
        info!(node = %this_node, "leader recorded Down: recording itself Up");
        commands.push(Command::SetNodeHealth {
            node: this_node.clone(),
            health: Health::Up,
        });
    }
    commands
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::{apply, register_nodes_and_sleds};

    #[test]
    fn a_leader_recorded_down_records_itself_up_and_its_paths_healed() {
        let mut state = UnitState::default();
        register_nodes_and_sleds(&mut state, 3, 0);
        let me = NodeId::new("hn-2");
        assert!(
            own_health(&me, &state).is_empty(),
            "Up with both paths: nothing to do"
        );
        for network in [Network::A, Network::B] {
            apply(
                &mut state,
                Command::ReportPathFault {
                    endpoint: Endpoint::Node(me.clone()),
                    network,
                    up: false,
                },
            );
        }
        apply(
            &mut state,
            Command::SetNodeHealth {
                node: me.clone(),
                health: Health::Down,
            },
        );
        let commands = own_health(&me, &state);
        assert_eq!(commands.len(), 3, "{commands:?}");
        for command in commands {
            apply(&mut state, command);
        }
        let node = &state.nodes()[&me];
        assert_eq!(node.health, Health::Up);
        assert!(node.paths.network_a_up && node.paths.network_b_up);
        assert!(own_health(&me, &state).is_empty());
    }

    #[test]
    fn failed_and_draining_are_not_overridden() {
        for health in [Health::Failed, Health::Draining] {
            let mut state = UnitState::default();
            register_nodes_and_sleds(&mut state, 3, 0);
            let me = NodeId::new("hn-1");
            apply(
                &mut state,
                Command::SetNodeHealth {
                    node: me.clone(),
                    health,
                },
            );
            assert!(own_health(&me, &state).is_empty(), "{health:?}");
        }
    }
}
