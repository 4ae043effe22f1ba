//! Typed errors of the Raft storage, and their mapping to openraft's
//! [`StorageError`](openraft::StorageError).
//!
//! openraft treats every storage error as fatal for the member (it stops
//! the Raft core rather than risk acting on a half-written state), so the
//! typed error matters mostly to the operator and to [`RaftStore::open`]
//! callers: [`StorageError::is_corruption`] separates "the disk holds bytes
//! we refuse to trust" (wipe the member and let it rejoin by snapshot) from
//! I/O trouble (retry, replace the disk).
//!
//! [`RaftStore::open`]: super::RaftStore::open

use std::path::PathBuf;

use openraft::{AnyError, ErrorSubject, ErrorVerb, StorageIOError};

use super::types::{RaftNodeId, RaftStorageError};

/// What went wrong in the Raft log or state-machine storage.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The redb database of the log failed (open, transaction, table, commit).
    #[error("raft log database: {0}")]
    Database(#[from] redb::Error),
    /// A file-system operation on the storage directory failed.
    #[error("{operation} {}: {source}", path.display())]
    Io {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A stored record (log entry, vote, committed or purged log id) does not
    /// decode: bad checksum, truncated, unparsable.
    #[error("corrupt {record}: {reason}")]
    CorruptRecord { record: String, reason: String },
    /// A record or file written by a format this build does not read.
    #[error("{record} has format version {found}, this build reads {expected}")]
    UnsupportedVersion {
        record: String,
        found: u32,
        expected: u32,
    },
    /// A snapshot (the file at open, or one received from the leader) is
    /// refused: bad magic, length, checksum, encoding, metadata that does
    /// not match its content, or a state that breaks the unit's invariants.
    #[error("corrupt snapshot {source_name}: {reason}")]
    CorruptSnapshot { source_name: String, reason: String },
    /// Serializing a record failed (a bug: every type here serializes).
    #[error("encode {record}: {source}")]
    Encode {
        record: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// The blocking task doing a durable write panicked or was cancelled.
    #[error("storage task failed: {0}")]
    Task(String),
}

impl StorageError {
    /// The data on disk (or received) is not trustworthy. Retrying will not
    /// help; the member must be rebuilt from its peers.
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            StorageError::CorruptRecord { .. }
                | StorageError::CorruptSnapshot { .. }
                | StorageError::UnsupportedVersion { .. }
        )
    }

    /// Stable name of the variant, for logs and exit codes.
    pub fn code(&self) -> &'static str {
        match self {
            StorageError::Database(_) => "raft_database",
            StorageError::Io { .. } => "raft_io",
            StorageError::CorruptRecord { .. } => "raft_corrupt_record",
            StorageError::UnsupportedVersion { .. } => "raft_unsupported_version",
            StorageError::CorruptSnapshot { .. } => "raft_corrupt_snapshot",
            StorageError::Encode { .. } => "raft_encode",
            StorageError::Task(_) => "raft_storage_task",
        }
    }

    /// openraft's error for this failure while doing `verb` on `subject`.
    pub fn into_raft(self, subject: ErrorSubject<RaftNodeId>, verb: ErrorVerb) -> RaftStorageError {
        RaftStorageError::IO {
            source: StorageIOError::new(subject, verb, AnyError::new(&self)),
        }
    }

    pub(crate) fn io(
        operation: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| StorageError::Io {
            operation,
            path,
            source,
        }
    }

    pub(crate) fn db(error: impl Into<redb::Error>) -> Self {
        StorageError::Database(error.into())
    }
}
