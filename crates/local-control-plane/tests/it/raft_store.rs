//! The durable Raft storage against openraft's storage test suite, plus
//! restart and corruption tests on a real directory.

use std::collections::BTreeMap;
use std::path::Path;

use local_control_plane::raft::{
    codec, AppliedState, Entry, EntryPayload, HeadNodeInfo, LogId, LogStore, Membership, RaftStore,
    StateMachineStore, StorageError, Vote, SNAPSHOT_FILE,
};
use local_control_plane::{Command, CommandError, NodeId, Outcome};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, RaftLogReader, RaftSnapshotBuilder};

/// A fresh store in its own temporary directory per suite test; the
/// directory lives as long as the guard.
struct TempDirStore;

impl
    StoreBuilder<
        local_control_plane::raft::TypeConfig,
        LogStore,
        StateMachineStore,
        tempfile::TempDir,
    > for TempDirStore
{
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

fn node_info(n: u64) -> HeadNodeInfo {
    HeadNodeInfo {
        id: format!("head-{n}"),
        address_a: format!("10.0.0.{n}:7000").parse().unwrap(),
        address_b: format!("10.1.0.{n}:7000").parse().unwrap(),
        admin: format!("10.2.0.{n}:8080").parse().unwrap(),
    }
}

fn membership_entry(term: u64, index: u64) -> Entry {
    let nodes: BTreeMap<u64, HeadNodeInfo> = (1..=3).map(|n| (n, node_info(n))).collect();
    let voters = nodes.keys().copied().collect();
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Membership(Membership::new(vec![voters], nodes)),
    }
}

fn register(term: u64, index: u64, n: u64) -> Entry {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(Command::RegisterHeadNode {
            node: NodeId(format!("head-{n}")),
            address_a: format!("10.0.0.{n}:7000"),
            address_b: format!("10.1.0.{n}:7000"),
        }),
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

async fn snapshot_now(
    state_machine: &mut StateMachineStore,
) -> openraft::Snapshot<local_control_plane::raft::TypeConfig> {
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
