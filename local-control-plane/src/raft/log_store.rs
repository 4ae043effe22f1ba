//! The Raft log, vote, committed and last-purged log ids of one member, in
//! a redb database.
//!
//! Tables: `raft_log` maps a log index (u64, big-endian in redb's key
//! encoding) to an encoded [`Entry`]; `raft_meta` maps a name (`vote`,
//! `committed`, `last_purged`, `format`) to an encoded record (see
//! [`codec`](super::codec)).
//!
//! Durability, as openraft's `RaftLogStorage` contract demands:
//!
//! * `append`: the entries are committed in one redb transaction with
//!   [`Durability::Immediate`] (fsync) **before** the flush callback fires,
//!   so a follower never acknowledges, and a leader never counts, an entry
//!   that a crash could lose.
//! * `save_vote`, `truncate`, `purge`: one immediate transaction each,
//!   durable before they return. Truncate and purge are atomic: a crash
//!   leaves the log before or after, never half-way; purge writes the new
//!   last-purged id in the same transaction that deletes the entries.
//! * `save_committed`: written with [`Durability::None`]. Losing it in a
//!   crash only means the restarted member replays less of its log before
//!   hearing the leader again; it never points past a durable entry because
//!   the entries it names were fsynced earlier, and redb makes a
//!   non-durable commit durable with the next immediate one.
//!
//! Writes run on tokio's blocking pool so an fsync does not stall a runtime
//! worker; reads are short redb read transactions on the calling task.

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, RaftLogId, RaftLogReader};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};

use super::codec::{decode_record, encode_record, RECORD_VERSION};
use super::error::StorageError;
use super::types::{Entry, LogId, LogState, RaftStorageError, TypeConfig, Vote};

const LOG: TableDefinition<'static, u64, &'static [u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<'static, &'static str, &'static [u8]> =
    TableDefinition::new("raft_meta");

/// A log write slower than this is logged (it holds openraft's core).
const SLOW_WRITE: std::time::Duration = std::time::Duration::from_millis(50);

const KEY_FORMAT: &str = "format";
const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_LAST_PURGED: &str = "last_purged";

/// Raft log storage of one member. Cheap to clone (the clones share the
/// database); a clone is also the log reader openraft asks for.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    path: Arc<PathBuf>,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("path", &self.path)
            .finish()
    }
}

impl LogStore {
    /// Open (or create) the log database at `path`. The directory holding
    /// it must exist; it is fsynced when the file is new.
    pub fn open(path: &Path) -> Result<LogStore, StorageError> {
        let is_new = !path.exists();
        let db = Database::create(path).map_err(StorageError::db)?;
        if is_new {
            if let Some(dir) = path.parent() {
                super::fsync_dir(dir)?;
            }
        }
        let store = LogStore {
            db: Arc::new(db),
            path: Arc::new(path.to_owned()),
        };
        store.init_format()?;
        Ok(store)
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Create the tables and check (or stamp) the format version.
    fn init_format(&self) -> Result<(), StorageError> {
        let txn = self.begin_durable()?;
        {
            txn.open_table(LOG).map_err(StorageError::db)?;
            let mut meta = txn.open_table(META).map_err(StorageError::db)?;
            let stored = match meta.get(KEY_FORMAT).map_err(StorageError::db)? {
                Some(value) => Some(decode_record::<u32>(KEY_FORMAT, value.value())?),
                None => None,
            };
            match stored {
                Some(found) if found != u32::from(RECORD_VERSION) => {
                    return Err(StorageError::UnsupportedVersion {
                        record: format!("raft log {}", self.path.display()),
                        found,
                        expected: u32::from(RECORD_VERSION),
                    });
                }
                Some(_) => {}
                None => {
                    let value = encode_record(KEY_FORMAT, &u32::from(RECORD_VERSION))?;
                    meta.insert(KEY_FORMAT, value.as_slice())
                        .map_err(StorageError::db)?;
                }
            }
        }
        txn.commit().map_err(StorageError::db)
    }

    fn begin_durable(&self) -> Result<WriteTransaction, StorageError> {
        begin(&self.db, Durability::Immediate)
    }

    /// Run `write` in one write transaction of the given durability on the
    /// blocking pool; returns once the commit (and its fsync) is done.
    async fn write<F>(&self, durability: Durability, write: F) -> Result<(), StorageError>
    where
        F: FnOnce(&WriteTransaction) -> Result<(), StorageError> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        let queued = std::time::Instant::now();
        let result = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let txn = begin(&db, durability)?;
            write(&txn)?;
            txn.commit().map_err(StorageError::db)?;
            Ok(started.elapsed())
        })
        .await
        .map_err(|e| StorageError::Task(e.to_string()))?;
        let total = queued.elapsed();
        if total >= SLOW_WRITE {
            tracing::warn!(
                durable = matches!(durability, Durability::Immediate),
                total_ms = total.as_millis() as u64,
                commit_ms = result.as_ref().map_or(0, |d| d.as_millis() as u64),
                "slow raft log write"
            );
        }
        result.map(|_| ())
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StorageError> {
        let txn = self.db.begin_read().map_err(StorageError::db)?;
        let meta = txn.open_table(META).map_err(StorageError::db)?;
        let value = meta.get(key).map_err(StorageError::db)?;
        value.map(|v| decode_record(key, v.value())).transpose()
    }

    /// Entries whose index is in `range`, in order.
    pub fn entries<R: RangeBounds<u64>>(&self, range: R) -> Result<Vec<Entry>, StorageError> {
        let txn = self.db.begin_read().map_err(StorageError::db)?;
        let log = txn.open_table(LOG).map_err(StorageError::db)?;
        let mut entries = Vec::new();
        for item in log.range::<u64>(range).map_err(StorageError::db)? {
            let (index, value) = item.map_err(StorageError::db)?;
            let index = index.value();
            let entry: Entry = decode_record(&format!("log entry {index}"), value.value())?;
            if entry.get_log_id().index != index {
                return Err(StorageError::CorruptRecord {
                    record: format!("log entry {index}"),
                    reason: format!("holds log id {}", entry.get_log_id()),
                });
            }
            entries.push(entry);
        }
        Ok(entries)
    }

    /// Last purged log id and last log id.
    pub fn log_state(&self) -> Result<LogState, StorageError> {
        let last_purged_log_id: Option<LogId> = self.read_meta(KEY_LAST_PURGED)?;
        let txn = self.db.begin_read().map_err(StorageError::db)?;
        let log = txn.open_table(LOG).map_err(StorageError::db)?;
        let last = match log.last().map_err(StorageError::db)? {
            Some((index, value)) => {
                let entry: Entry =
                    decode_record(&format!("log entry {}", index.value()), value.value())?;
                Some(*entry.get_log_id())
            }
            None => None,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.or(last_purged_log_id),
        })
    }

    pub fn vote(&self) -> Result<Option<Vote>, StorageError> {
        self.read_meta(KEY_VOTE)
    }

    pub fn committed(&self) -> Result<Option<LogId>, StorageError> {
        self.read_meta(KEY_COMMITTED)
    }
}

fn begin(db: &Database, durability: Durability) -> Result<WriteTransaction, StorageError> {
    let mut txn = db.begin_write().map_err(StorageError::db)?;
    txn.set_durability(durability).map_err(StorageError::db)?;
    Ok(txn)
}

fn put_meta(txn: &WriteTransaction, key: &str, value: &[u8]) -> Result<(), StorageError> {
    let mut meta = txn.open_table(META).map_err(StorageError::db)?;
    meta.insert(key, value).map_err(StorageError::db)?;
    Ok(())
}

fn log_err(
    subject: ErrorSubject<u64>,
    verb: ErrorVerb,
) -> impl FnOnce(StorageError) -> RaftStorageError {
    move |e| e.into_raft(subject, verb)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, RaftStorageError> {
        self.entries(range)
            .map_err(log_err(ErrorSubject::Logs, ErrorVerb::Read))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState, RaftStorageError> {
        self.log_state()
            .map_err(log_err(ErrorSubject::Logs, ErrorVerb::Read))
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), RaftStorageError> {
        let to_raft = log_err(ErrorSubject::Vote, ErrorVerb::Write);
        let value = encode_record(KEY_VOTE, vote).map_err(to_raft)?;
        self.write(Durability::Immediate, move |txn| {
            put_meta(txn, KEY_VOTE, &value)
        })
        .await
        .map_err(log_err(ErrorSubject::Vote, ErrorVerb::Write))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, RaftStorageError> {
        self.vote()
            .map_err(log_err(ErrorSubject::Vote, ErrorVerb::Read))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), RaftStorageError> {
        let to_raft = log_err(ErrorSubject::Store, ErrorVerb::Write);
        let Some(committed) = committed else {
            return Ok(());
        };
        let value = encode_record(KEY_COMMITTED, &committed).map_err(to_raft)?;
        self.write(Durability::None, move |txn| {
            put_meta(txn, KEY_COMMITTED, &value)
        })
        .await
        .map_err(log_err(ErrorSubject::Store, ErrorVerb::Write))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, RaftStorageError> {
        self.committed()
            .map_err(log_err(ErrorSubject::Store, ErrorVerb::Read))
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), RaftStorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let encoded: Result<Vec<(u64, Vec<u8>)>, StorageError> = entries
            .into_iter()
            .map(|entry| {
                let index = entry.get_log_id().index;
                encode_record("log entry", &entry).map(|bytes| (index, bytes))
            })
            .collect();
        let result = match encoded {
            Ok(encoded) => {
                self.write(Durability::Immediate, move |txn| {
                    let mut log = txn.open_table(LOG).map_err(StorageError::db)?;
                    for (index, bytes) in &encoded {
                        log.insert(*index, bytes.as_slice())
                            .map_err(StorageError::db)?;
                    }
                    Ok(())
                })
                .await
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                // Durable now: only now may openraft count these entries.
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(e.into_raft(ErrorSubject::Logs, ErrorVerb::Write))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), RaftStorageError> {
        tracing::debug!(%log_id, "truncate raft log from");
        self.write(Durability::Immediate, move |txn| {
            let mut log = txn.open_table(LOG).map_err(StorageError::db)?;
            log.retain_in::<u64, _>(log_id.index.., |_, _| false)
                .map_err(StorageError::db)?;
            Ok(())
        })
        .await
        .map_err(log_err(ErrorSubject::Log(log_id), ErrorVerb::Delete))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), RaftStorageError> {
        tracing::debug!(%log_id, "purge raft log up to");
        let value = encode_record(KEY_LAST_PURGED, &log_id)
            .map_err(log_err(ErrorSubject::Log(log_id), ErrorVerb::Delete))?;
        self.write(Durability::Immediate, move |txn| {
            put_meta(txn, KEY_LAST_PURGED, &value)?;
            let mut log = txn.open_table(LOG).map_err(StorageError::db)?;
            log.retain_in::<u64, _>(..=log_id.index, |_, _| false)
                .map_err(StorageError::db)?;
            Ok(())
        })
        .await
        .map_err(log_err(ErrorSubject::Log(log_id), ErrorVerb::Delete))
    }
}
