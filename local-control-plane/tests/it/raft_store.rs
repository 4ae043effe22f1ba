//! The durable Raft storage against openraft's storage test suite, plus
//! restart and corruption tests on a real directory.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use local_control_plane::raft::{
    codec, AppliedState, Entry, EntryPayload, HeadNodeInfo, LogId, LogStore, Membership, RPCError,
    Raft, RaftError, RaftStore, SharedState, StateMachineStore, StorageError, TypeConfig, Vote,
    SNAPSHOT_FILE,
};
use local_control_plane::{Command, CommandError, NodeId, Outcome, UnitState};

use crate::node_info;
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, RaftLogReader, RaftSnapshotBuilder};

/// A fresh store in its own temporary directory per suite test; the
/// directory lives as long as the guard.
struct TempDirStore;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for TempDirStore {
    async fn build(
        &self,
    ) -> Result<
        (tempfile::TempDir, LogStore, StateMachineStore),
        local_control_plane::raft::RaftStorageError,
    > {
        let dir = tempfile::tempdir().unwrap();
        let (log, state_machine) = RaftStore::open(dir.path()).unwrap();
        Ok((dir, log, state_machine))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(TempDirStore).unwrap();
}

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn membership_entry(term: u64, index: u64) -> Entry {
    let nodes: BTreeMap<u64, HeadNodeInfo> = (1..=3).map(|n| (n, node_info(n))).collect();
    let voters = nodes.keys().copied().collect();
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Membership(Membership::new(vec![voters], nodes)),
    }
}

fn register_command(n: u64) -> Command {
    Command::RegisterHeadNode {
        node: NodeId(format!("head-{n}")),
        address_a: format!("10.0.0.{n}:7000"),
        address_b: format!("10.1.0.{n}:7000"),
    }
}

fn register(term: u64, index: u64, n: u64) -> Entry {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(register_command(n)),
    }
}

/// Entries 1..=6: membership, three head nodes, a refused duplicate, a
/// fourth node.
fn history() -> Vec<Entry> {
    vec![
        membership_entry(1, 1),
        register(1, 2, 1),
        register(1, 3, 2),
        register(2, 4, 1),
        register(2, 5, 3),
        register(2, 6, 4),
    ]
}

async fn snapshot_now(state_machine: &mut StateMachineStore) -> openraft::Snapshot<TypeConfig> {
    state_machine
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap()
}

#[tokio::test]
async fn refused_command_is_an_applied_entry() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut state_machine) = RaftStore::open(dir.path()).unwrap();
    let responses = state_machine
        .apply(history().into_iter().take(4))
        .await
        .unwrap();
    assert_eq!(responses.len(), 4);
    assert_eq!(responses[0], Ok(Outcome::Done));
    assert_eq!(responses[1], Ok(Outcome::Done));
    assert!(matches!(
        responses[3],
        Err(CommandError::AlreadyExists { .. })
    ));
    let state = state_machine.state();
    assert_eq!(state.last_applied, Some(log_id(2, 4)));
    assert_eq!(state.unit.nodes().len(), 2);
}

#[tokio::test]
async fn restart_restores_log_vote_and_state() {
    let dir = tempfile::tempdir().unwrap();
    let vote = Vote::new(2, 3);
    let expected: AppliedState;
    {
        let (mut log, mut state_machine) = RaftStore::open(dir.path()).unwrap();
        let shared = state_machine.shared();
        log.save_vote(&vote).await.unwrap();
        log.blocking_append(history()).await.unwrap();
        state_machine
            .apply(history().into_iter().take(3))
            .await
            .unwrap();
        let snapshot = snapshot_now(&mut state_machine).await;
        assert_eq!(snapshot.meta.last_log_id, Some(log_id(1, 3)));
        state_machine
            .apply(history().into_iter().skip(3))
            .await
            .unwrap();
        log.save_committed(Some(log_id(2, 6))).await.unwrap();
        log.purge(log_id(1, 2)).await.unwrap();
        expected = shared.read().clone();
        assert_eq!(expected.unit.nodes().len(), 4);
    }

    let (mut log, mut state_machine) = RaftStore::open(dir.path()).unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(vote));
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(2, 6)));
    let log_state = log.get_log_state().await.unwrap();
    assert_eq!(log_state.last_purged_log_id, Some(log_id(1, 2)));
    assert_eq!(log_state.last_log_id, Some(log_id(2, 6)));
    let entries = log.try_get_log_entries(0..100).await.unwrap();
    assert_eq!(entries, history()[2..].to_vec());

    // The state machine restarts from the snapshot ...
    let (applied, membership) = state_machine.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(1, 3)));
    assert_eq!(membership.log_id(), &Some(log_id(1, 1)));
    assert_eq!(state_machine.state().unit.nodes().len(), 2);
    let current = state_machine.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta.last_log_id, Some(log_id(1, 3)));
    // ... and replaying the committed tail (what openraft does at startup)
    // gives the state before the restart.
    let tail = log.try_get_log_entries(4..=6).await.unwrap();
    state_machine.apply(tail).await.unwrap();
    assert_eq!(*state_machine.state(), expected);
}

#[tokio::test]
async fn truncate_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut log, _) = RaftStore::open(dir.path()).unwrap();
        log.blocking_append(history()).await.unwrap();
        log.truncate(log_id(2, 4)).await.unwrap();
    }
    let (mut log, _) = RaftStore::open(dir.path()).unwrap();
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(log_id(1, 3)));
    assert_eq!(
        log.try_get_log_entries(..).await.unwrap(),
        history()[..3].to_vec()
    );
}

/// Dir with a snapshot of entries 1..=5 and nothing else.
async fn dir_with_snapshot() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut state_machine) = RaftStore::open(dir.path()).unwrap();
    state_machine
        .apply(history().into_iter().take(5))
        .await
        .unwrap();
    snapshot_now(&mut state_machine).await;
    dir
}

fn expect_corrupt(dir: &Path) -> StorageError {
    let error = RaftStore::open(dir).unwrap_err();
    assert!(error.is_corruption(), "{error}");
    error
}

#[tokio::test]
async fn flipped_byte_in_snapshot_file_is_refused() {
    let dir = dir_with_snapshot().await;
    let path = dir.path().join(SNAPSHOT_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    std::fs::write(&path, &bytes).unwrap();
    let error = expect_corrupt(dir.path());
    assert!(
        matches!(&error, StorageError::CorruptSnapshot { reason, .. } if reason.contains("crc32c")),
        "{error}"
    );
}

#[tokio::test]
async fn truncated_or_foreign_snapshot_file_is_refused() {
    let dir = dir_with_snapshot().await;
    let path = dir.path().join(SNAPSHOT_FILE);
    let bytes = std::fs::read(&path).unwrap();

    std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
    assert!(matches!(
        expect_corrupt(dir.path()),
        StorageError::CorruptSnapshot { .. }
    ));

    std::fs::write(&path, &bytes[..10]).unwrap();
    assert!(matches!(
        expect_corrupt(dir.path()),
        StorageError::CorruptSnapshot { .. }
    ));

    std::fs::write(&path, b"{\"not\": \"a snapshot\"} padding padding").unwrap();
    assert!(matches!(
        expect_corrupt(dir.path()),
        StorageError::CorruptSnapshot { .. }
    ));

    let mut newer = bytes.clone();
    newer[8] = 9; // version 9
    std::fs::write(&path, &newer).unwrap();
    assert!(matches!(
        expect_corrupt(dir.path()),
        StorageError::UnsupportedVersion { found: 9, .. }
    ));

    // The intact bytes open again.
    std::fs::write(&path, &bytes).unwrap();
    RaftStore::open(dir.path()).unwrap();
}

#[tokio::test]
async fn snapshot_with_broken_invariants_is_refused() {
    let dir = dir_with_snapshot().await;
    let path = dir.path().join(SNAPSHOT_FILE);
    let mut contents = codec::decode_snapshot("test", &std::fs::read(&path).unwrap()).unwrap();
    // Metadata that does not match the state, with a valid checksum.
    contents.meta.last_log_id = Some(log_id(9, 99));
    std::fs::write(&path, codec::encode_snapshot(&contents).unwrap()).unwrap();
    let error = expect_corrupt(dir.path());
    assert!(error.to_string().contains("applied up to"), "{error}");
}

#[tokio::test]
async fn corrupt_snapshot_from_the_leader_is_not_installed() {
    let leader_dir = dir_with_snapshot().await;
    let (_, mut leader) = RaftStore::open(leader_dir.path()).unwrap();
    let snapshot = leader.get_current_snapshot().await.unwrap().unwrap();

    let follower_dir = tempfile::tempdir().unwrap();
    let (_, mut follower) = RaftStore::open(follower_dir.path()).unwrap();
    let mut bytes = snapshot.snapshot.into_inner();
    let last = bytes.len() - 2;
    bytes[last] ^= 1;
    let result = follower
        .install_snapshot(&snapshot.meta, Box::new(std::io::Cursor::new(bytes)))
        .await;
    assert!(result.is_err());
    assert_eq!(*follower.state(), AppliedState::default());
    assert!(follower.get_current_snapshot().await.unwrap().is_none());
    assert!(!follower_dir.path().join(SNAPSHOT_FILE).exists());

    // The intact snapshot installs, durably.
    let snapshot = leader.get_current_snapshot().await.unwrap().unwrap();
    follower
        .install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await
        .unwrap();
    assert_eq!(*follower.state(), *leader.state());
    drop(follower);
    let (_, follower) = RaftStore::open(follower_dir.path()).unwrap();
    assert_eq!(*follower.state(), *leader.state());
}

/// A network with no peers: a single-voter group never sends an RPC.
struct NoPeers;

fn no_peer<E: std::error::Error>() -> openraft::error::RPCError<u64, HeadNodeInfo, E> {
    openraft::error::RPCError::Unreachable(openraft::error::Unreachable::new(
        &std::io::Error::other("single-node test has no peers"),
    ))
}

impl openraft::RaftNetworkFactory<TypeConfig> for NoPeers {
    type Network = NoPeers;

    async fn new_client(&mut self, _target: u64, _node: &HeadNodeInfo) -> NoPeers {
        NoPeers
    }
}

impl openraft::RaftNetwork<TypeConfig> for NoPeers {
    async fn append_entries(
        &mut self,
        _rpc: local_control_plane::raft::AppendEntriesRequest,
        _option: openraft::network::RPCOption,
    ) -> Result<local_control_plane::raft::AppendEntriesResponse, RPCError<RaftError>> {
        Err(no_peer())
    }

    async fn install_snapshot(
        &mut self,
        _rpc: local_control_plane::raft::InstallSnapshotRequest,
        _option: openraft::network::RPCOption,
    ) -> Result<
        local_control_plane::raft::InstallSnapshotResponse,
        RPCError<RaftError<local_control_plane::raft::InstallSnapshotError>>,
    > {
        Err(no_peer())
    }

    async fn vote(
        &mut self,
        _rpc: local_control_plane::raft::VoteRequest,
        _option: openraft::network::RPCOption,
    ) -> Result<local_control_plane::raft::VoteResponse, RPCError<RaftError>> {
        Err(no_peer())
    }
}

async fn start_single(dir: &Path) -> (Raft, SharedState) {
    let config = openraft::Config {
        heartbeat_interval: 50,
        election_timeout_min: 150,
        election_timeout_max: 300,
        // Snapshot (and purge the log) every few entries, so that a restart
        // needs both the snapshot and the log tail.
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(4),
        max_in_snapshot_log_to_keep: 0,
        ..openraft::Config::default()
    };
    let config = std::sync::Arc::new(config.validate().unwrap());
    let (log, state_machine) = RaftStore::open(dir).unwrap();
    let shared = state_machine.shared();
    let raft = Raft::new(1, config, NoPeers, log, state_machine)
        .await
        .unwrap();
    (raft, shared)
}

async fn wait_leader(raft: &Raft) {
    raft.wait(Some(Duration::from_secs(10)))
        .state(openraft::ServerState::Leader, "single node leads")
        .await
        .unwrap();
}

/// A real openraft member on the real store: writes, snapshots and purges,
/// is shut down and restarted from its directory with no manual step, and
/// comes back with every committed command applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_member_restarts_with_its_committed_state() {
    let dir = tempfile::tempdir().unwrap();
    let mut expected = UnitState::new();
    let last_applied;
    {
        let (raft, shared) = start_single(dir.path()).await;
        raft.initialize(BTreeMap::from([(1, node_info(1))]))
            .await
            .unwrap();
        wait_leader(&raft).await;
        for n in 1..=9 {
            let response = raft.client_write(register_command(n)).await.unwrap();
            assert_eq!(response.data, Ok(Outcome::Done));
            expected.apply(register_command(n)).unwrap();
        }
        let refused = raft.client_write(register_command(3)).await.unwrap();
        assert!(matches!(
            refused.data,
            Err(CommandError::AlreadyExists { .. })
        ));
        raft.wait(Some(Duration::from_secs(10)))
            .metrics(
                |m| m.snapshot.is_some() && m.purged.is_some(),
                "snapshot built and log purged",
            )
            .await
            .unwrap();
        last_applied = shared.read().last_applied;
        assert_eq!(shared.read().unit, expected);
        raft.shutdown().await.unwrap();
    }

    // On disk: a snapshot behind the last applied entry, and the log tail.
    {
        let (mut log, state_machine) = RaftStore::open(dir.path()).unwrap();
        let from_snapshot = state_machine.state().last_applied;
        assert!(from_snapshot.is_some() && from_snapshot <= last_applied);
        assert_eq!(log.read_committed().await.unwrap(), last_applied);
        assert_eq!(log.get_log_state().await.unwrap().last_log_id, last_applied);
    }

    let (raft, shared) = start_single(dir.path()).await;
    let last_index = last_applied.map(|log_id| log_id.index);
    raft.wait(Some(Duration::from_secs(10)))
        .applied_index_at_least(last_index, "committed tail replayed")
        .await
        .unwrap();
    assert_eq!(shared.read().unit, expected);
    assert_eq!(
        shared
            .read()
            .membership
            .membership()
            .voter_ids()
            .collect::<Vec<_>>(),
        vec![1]
    );
    wait_leader(&raft).await;
    let response = raft.client_write(register_command(10)).await.unwrap();
    assert_eq!(response.data, Ok(Outcome::Done));
    assert_eq!(shared.read().unit.nodes().len(), 10);
    raft.shutdown().await.unwrap();
}
