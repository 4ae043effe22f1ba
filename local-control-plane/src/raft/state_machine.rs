//! The Raft state machine of one member: [`UnitState`] plus the last applied
//! log id and membership, and the member's latest snapshot.
//!
//! Durability: applying an entry changes memory only. What makes the state
//! survive a restart is the pair (latest snapshot file, Raft log): at open
//! the state is restored from `snapshot.bin`, and openraft replays the
//! committed log entries after the snapshot's last log id. This is sound
//! because openraft purges log entries only up to a snapshot that is
//! already durable: [`RaftSnapshotBuilder::build_snapshot`] and
//! [`RaftStateMachine::install_snapshot`] return only after the snapshot
//! file is written to a temporary file, fsynced, renamed over `snapshot.bin`
//! and the directory fsynced.
//!
//! A refused [`Command`](crate::Command) is a normal applied entry: its
//! response is the [`CommandError`](crate::CommandError) and the state is
//! unchanged (the core guarantees it). Only storage failures fail `apply`.
//!
//! Reads that need not be linearizable (partition maps, unit status) use a
//! [`SharedState`] handle: the state as of the last applied entry, without a
//! round trip through Raft.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard};

use openraft::storage::RaftStateMachine;
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, RaftLogId, RaftSnapshotBuilder};
use serde::{Deserialize, Serialize};

use super::codec::{decode_snapshot, encode_snapshot, SnapshotContents};
use super::error::StorageError;
use super::types::{
    Entry, EntryPayload, LogId, RaftStorageError, Response, Snapshot, SnapshotMeta,
    StoredMembership, TypeConfig,
};
use crate::command::Outcome;
use crate::state::UnitState;

/// Name of the latest snapshot in a member's Raft directory.
pub const SNAPSHOT_FILE: &str = "snapshot.bin";
const SNAPSHOT_TEMP_FILE: &str = "snapshot.bin.tmp";

/// The replicated state as of a log position.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedState {
    pub unit: UnitState,
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
}

/// A read handle on a member's applied state, shared with its state
/// machine. Readers hold the lock briefly; the state machine takes it to
/// apply each entry.
#[derive(Debug, Clone, Default)]
pub struct SharedState(Arc<RwLock<AppliedState>>);

impl SharedState {
    /// The state as of the last applied entry. Do not hold the guard across
    /// an `.await`: it blocks the state machine.
    pub fn read(&self) -> RwLockReadGuard<'_, AppliedState> {
        // A panic while holding the lock cannot leave a half-applied state:
        // `UnitState::apply` is all-or-nothing, so the poison is ignored.
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn replace(&self, state: AppliedState) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = state;
    }
}

/// The latest snapshot: metadata and the exact bytes of `snapshot.bin`.
#[derive(Debug, Clone)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    bytes: Vec<u8>,
}

/// The directory, the latest snapshot and the id counter, shared by the
/// state machine and its snapshot builders.
#[derive(Debug)]
struct SnapshotSlot {
    dir: PathBuf,
    current: Mutex<Option<StoredSnapshot>>,
    next_id: AtomicU64,
}

impl SnapshotSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<StoredSnapshot>> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Make `snapshot` the latest, durably. A built snapshot (`installed`
    /// false) does not replace a newer one installed meanwhile; an
    /// installed one always replaces. Blocking: call on the blocking pool.
    fn persist(&self, snapshot: StoredSnapshot, installed: bool) -> Result<(), StorageError> {
        let mut current = self.lock();
        if let Some(existing) = current.as_ref() {
            if !installed && existing.meta.last_log_id > snapshot.meta.last_log_id {
                return Ok(());
            }
        }
        write_file_durably(
            &self.dir,
            SNAPSHOT_FILE,
            SNAPSHOT_TEMP_FILE,
            &snapshot.bytes,
        )?;
        *current = Some(snapshot);
        Ok(())
    }
}

/// Write `bytes` to `dir/name` so that after a crash the file is either the
/// old one or the complete new one: temp file, fsync, rename, fsync dir.
fn write_file_durably(
    dir: &Path,
    name: &str,
    temp_name: &str,
    bytes: &[u8],
) -> Result<(), StorageError> {
    use std::io::Write;
    let temp = dir.join(temp_name);
    let path = dir.join(name);
    let mut file = std::fs::File::create(&temp).map_err(StorageError::io("create", &temp))?;
    file.write_all(bytes)
        .map_err(StorageError::io("write", &temp))?;
    file.sync_all().map_err(StorageError::io("fsync", &temp))?;
    drop(file);
    std::fs::rename(&temp, &path).map_err(StorageError::io("rename to snapshot.bin", &temp))?;
    super::fsync_dir(dir)
}

/// Raft state machine storage of one member.
#[derive(Debug)]
pub struct StateMachineStore {
    shared: SharedState,
    snapshots: Arc<SnapshotSlot>,
}

impl StateMachineStore {
    /// Open the state machine in `dir`: the state of the latest snapshot,
    /// or the empty state if there is none. A snapshot file that fails any
    /// check is refused ([`StorageError::CorruptSnapshot`]); it is never
    /// silently replaced by an empty state, since the log before it may
    /// be purged.
    pub fn open(dir: &Path) -> Result<StateMachineStore, StorageError> {
        let temp = dir.join(SNAPSHOT_TEMP_FILE);
        if temp.exists() {
            // A crash between create and rename; the old snapshot.bin stands.
            std::fs::remove_file(&temp).map_err(StorageError::io("remove", &temp))?;
        }
        let path = dir.join(SNAPSHOT_FILE);
        let (state, current) = match std::fs::read(&path) {
            Ok(bytes) => {
                let contents = decode_snapshot(&path.display().to_string(), &bytes)?;
                tracing::info!(
                    path = %path.display(),
                    last_log_id = ?contents.meta.last_log_id,
                    "raft state machine restored from snapshot"
                );
                let current = StoredSnapshot {
                    meta: contents.meta,
                    bytes,
                };
                (contents.state, Some(current))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (AppliedState::default(), None),
            Err(e) => return Err(StorageError::io("read", &path)(e)),
        };
        Ok(StateMachineStore {
            shared: SharedState(Arc::new(RwLock::new(state))),
            snapshots: Arc::new(SnapshotSlot {
                dir: dir.to_owned(),
                current: Mutex::new(current),
                next_id: AtomicU64::new(1),
            }),
        })
    }

    /// A read handle on the applied state, for serving reads outside Raft.
    pub fn shared(&self) -> SharedState {
        self.shared.clone()
    }

    /// The state as of the last applied entry (see [`SharedState::read`]).
    pub fn state(&self) -> RwLockReadGuard<'_, AppliedState> {
        self.shared.read()
    }

    /// Metadata of the latest snapshot, if any.
    pub fn current_snapshot_meta(&self) -> Option<SnapshotMeta> {
        self.snapshots.lock().as_ref().map(|s| s.meta.clone())
    }

    fn apply_entry(state: &mut AppliedState, entry: Entry) -> Response {
        let log_id = *entry.get_log_id();
        let response = match entry.payload {
            EntryPayload::Blank => Ok(Outcome::Done),
            EntryPayload::Normal(command) => state.unit.apply(command),
            EntryPayload::Membership(membership) => {
                state.membership = StoredMembership::new(Some(log_id), membership);
                Ok(Outcome::Done)
            }
        };
        state.last_applied = Some(log_id);
        response
    }
}

/// Builds a snapshot of the state as of when the builder was made.
#[derive(Debug)]
pub struct SnapshotBuilder {
    state: AppliedState,
    snapshots: Arc<SnapshotSlot>,
}

impl SnapshotBuilder {
    async fn build(
        self_state: AppliedState,
        snapshots: Arc<SnapshotSlot>,
    ) -> Result<Snapshot, StorageError> {
        let sequence = snapshots.next_id.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match &self_state.last_applied {
            Some(log_id) => format!("{}-{}-{sequence}", log_id.leader_id, log_id.index),
            None => format!("empty-{sequence}"),
        };
        let meta = SnapshotMeta {
            last_log_id: self_state.last_applied,
            last_membership: self_state.membership.clone(),
            snapshot_id,
        };
        let contents = SnapshotContents {
            meta: meta.clone(),
            state: self_state,
        };
        let bytes = encode_snapshot(&contents)?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            bytes: bytes.clone(),
        };
        tokio::task::spawn_blocking(move || snapshots.persist(stored, false))
            .await
            .map_err(|e| StorageError::Task(e.to_string()))??;
        tracing::info!(snapshot_id = %meta.snapshot_id, last_log_id = ?meta.last_log_id, "raft snapshot built");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(std::io::Cursor::new(bytes)),
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, RaftStorageError> {
        let state = std::mem::take(&mut self.state);
        SnapshotBuilder::build(state, Arc::clone(&self.snapshots))
            .await
            .map_err(|e| e.into_raft(ErrorSubject::Snapshot(None), ErrorVerb::Write))
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership), RaftStorageError> {
        let state = self.shared.read();
        Ok((state.last_applied, state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, RaftStorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut responses = Vec::new();
        for entry in entries {
            let mut state = self
                .shared
                .0
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            responses.push(Self::apply_entry(&mut state, entry));
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            state: self.shared.read().clone(),
            snapshots: Arc::clone(&self.snapshots),
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<std::io::Cursor<Vec<u8>>>, RaftStorageError> {
        Ok(Box::new(std::io::Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<std::io::Cursor<Vec<u8>>>,
    ) -> Result<(), RaftStorageError> {
        let to_raft = |e: StorageError| {
            e.into_raft(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Write,
            )
        };
        let bytes = snapshot.into_inner();
        let source_name = format!("{} from the leader", meta.snapshot_id);
        let contents = decode_snapshot(&source_name, &bytes).map_err(to_raft)?;
        if contents.meta.last_log_id != meta.last_log_id
            || contents.meta.last_membership != meta.last_membership
        {
            return Err(to_raft(StorageError::CorruptSnapshot {
                source_name,
                reason: format!(
                    "data is of log id {:?}, metadata says {:?}",
                    contents.meta.last_log_id, meta.last_log_id
                ),
            }));
        }
        let stored = StoredSnapshot {
            meta: contents.meta,
            bytes,
        };
        let snapshots = Arc::clone(&self.snapshots);
        tokio::task::spawn_blocking(move || snapshots.persist(stored, true))
            .await
            .map_err(|e| to_raft(StorageError::Task(e.to_string())))?
            .map_err(to_raft)?;
        tracing::info!(snapshot_id = %meta.snapshot_id, last_log_id = ?meta.last_log_id, "raft snapshot installed");
        self.shared.replace(contents.state);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, RaftStorageError> {
        Ok(self.snapshots.lock().as_ref().map(|s| Snapshot {
            meta: s.meta.clone(),
            snapshot: Box::new(std::io::Cursor::new(s.bytes.clone())),
        }))
    }
}
