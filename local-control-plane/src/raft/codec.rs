//! Byte layouts of everything the Raft storage writes.
//!
//! **Record** (one redb value: a log entry, the vote, the committed and the
//! last purged log id):
//!
//! ```text
//! version: u8 | crc32c(json): u32 LE | json
//! ```
//!
//! **Snapshot** (the file `snapshot.bin` and, byte for byte, the data sent
//! to a follower by `InstallSnapshot`):
//!
//! ```text
//! magic "RBLCPSN\0": 8 | version: u32 LE | json_len: u64 LE
//!   | crc32c(version | json_len | json): u32 LE | json
//! ```
//!
//! where the json is a [`SnapshotContents`]: the snapshot's metadata and the
//! applied state (unit state, last applied log id, last membership). A
//! snapshot decodes only if every check passes, its metadata matches its
//! state, and the unit state satisfies its invariants.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::error::StorageError;
use super::state_machine::AppliedState;
use super::types::SnapshotMeta;

/// Version of the record layout and of the json inside it.
pub const RECORD_VERSION: u8 = 1;
/// Version of the snapshot layout and of the json inside it.
pub const SNAPSHOT_VERSION: u32 = 1;
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"RBLCPSN\0";
const SNAPSHOT_HEADER_BYTES: usize = 8 + 4 + 8 + 4;

pub fn encode_record<T: Serialize>(
    record: &'static str,
    value: &T,
) -> Result<Vec<u8>, StorageError> {
    let json =
        serde_json::to_vec(value).map_err(|source| StorageError::Encode { record, source })?;
    let mut bytes = Vec::with_capacity(5 + json.len());
    bytes.push(RECORD_VERSION);
    bytes.extend_from_slice(&crc32c::crc32c(&json).to_le_bytes());
    bytes.extend_from_slice(&json);
    Ok(bytes)
}

pub fn decode_record<T: DeserializeOwned>(record: &str, bytes: &[u8]) -> Result<T, StorageError> {
    let corrupt = |reason: String| StorageError::CorruptRecord {
        record: record.to_owned(),
        reason,
    };
    let (&version, rest) = bytes
        .split_first()
        .ok_or_else(|| corrupt("empty record".into()))?;
    if version != RECORD_VERSION {
        return Err(StorageError::UnsupportedVersion {
            record: record.to_owned(),
            found: u32::from(version),
            expected: u32::from(RECORD_VERSION),
        });
    }
    let (crc, json) = rest
        .split_first_chunk::<4>()
        .ok_or_else(|| corrupt(format!("{} bytes, shorter than its header", bytes.len())))?;
    let stored = u32::from_le_bytes(*crc);
    let computed = crc32c::crc32c(json);
    if stored != computed {
        return Err(corrupt(format!(
            "crc32c {computed:#010x}, stored {stored:#010x}"
        )));
    }
    serde_json::from_slice(json).map_err(|e| corrupt(e.to_string()))
}

/// What a snapshot holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotContents {
    pub meta: SnapshotMeta,
    pub state: AppliedState,
}

pub fn encode_snapshot(contents: &SnapshotContents) -> Result<Vec<u8>, StorageError> {
    let json = serde_json::to_vec(contents).map_err(|source| StorageError::Encode {
        record: "snapshot",
        source,
    })?;
    let json_len = json.len() as u64;
    let mut bytes = Vec::with_capacity(SNAPSHOT_HEADER_BYTES + json.len());
    bytes.extend_from_slice(&SNAPSHOT_MAGIC);
    bytes.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&json_len.to_le_bytes());
    bytes.extend_from_slice(&snapshot_crc(SNAPSHOT_VERSION, json_len, &json).to_le_bytes());
    bytes.extend_from_slice(&json);
    Ok(bytes)
}

/// Decode and verify a snapshot. `source_name` names where the bytes came
/// from (a path, "install from leader") for the error.
pub fn decode_snapshot(source_name: &str, bytes: &[u8]) -> Result<SnapshotContents, StorageError> {
    let corrupt = |reason: String| StorageError::CorruptSnapshot {
        source_name: source_name.to_owned(),
        reason,
    };
    let Some((header, json)) = bytes.split_at_checked(SNAPSHOT_HEADER_BYTES) else {
        return Err(corrupt(format!(
            "{} bytes, shorter than the {SNAPSHOT_HEADER_BYTES}-byte header",
            bytes.len()
        )));
    };
    let (magic, rest) = header.split_at(8);
    if magic != SNAPSHOT_MAGIC {
        return Err(corrupt(format!("bad magic {magic:02x?}")));
    }
    let (version, json_len, stored_crc) = match (
        rest.first_chunk::<4>(),
        rest.get(4..).and_then(|r| r.first_chunk::<8>()),
        rest.get(12..).and_then(|r| r.first_chunk::<4>()),
    ) {
        (Some(version), Some(json_len), Some(crc)) => (
            u32::from_le_bytes(*version),
            u64::from_le_bytes(*json_len),
            u32::from_le_bytes(*crc),
        ),
        _ => return Err(corrupt("short header".into())),
    };
    if version != SNAPSHOT_VERSION {
        return Err(StorageError::UnsupportedVersion {
            record: format!("snapshot {source_name}"),
            found: version,
            expected: SNAPSHOT_VERSION,
        });
    }
    if json_len != json.len() as u64 {
        return Err(corrupt(format!(
            "header says {json_len} payload bytes, {} present",
            json.len()
        )));
    }
    let computed_crc = snapshot_crc(version, json_len, json);
    if computed_crc != stored_crc {
        return Err(corrupt(format!(
            "crc32c {computed_crc:#010x}, stored {stored_crc:#010x}"
        )));
    }
    let contents: SnapshotContents =
        serde_json::from_slice(json).map_err(|e| corrupt(format!("decode: {e}")))?;
    if contents.meta.last_log_id != contents.state.last_applied {
        return Err(corrupt(format!(
            "metadata last log id {:?} but state applied up to {:?}",
            contents.meta.last_log_id, contents.state.last_applied
        )));
    }
    if contents.meta.last_membership != contents.state.membership {
        return Err(corrupt(
            "metadata membership differs from the state's".into(),
        ));
    }
    contents
        .state
        .unit
        .check_invariants()
        .map_err(|violation| corrupt(format!("unit state breaks an invariant: {violation}")))?;
    Ok(contents)
}

fn snapshot_crc(version: u32, json_len: u64, json: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&version.to_le_bytes());
    let crc = crc32c::crc32c_append(crc, &json_len.to_le_bytes());
    crc32c::crc32c_append(crc, json)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::raft::types::LogId;

    #[test]
    fn record_round_trips() {
        let log_id = LogId::new(openraft::CommittedLeaderId::new(3, 2), 17);
        let bytes = encode_record("log id", &log_id).unwrap();
        assert_eq!(bytes[0], RECORD_VERSION);
        assert_eq!(decode_record::<LogId>("log id", &bytes).unwrap(), log_id);
    }

    #[test]
    fn every_flipped_bit_of_a_record_is_refused() {
        let log_id = LogId::new(openraft::CommittedLeaderId::new(3, 2), 17);
        let bytes = encode_record("log id", &log_id).unwrap();
        for bit in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            let error = decode_record::<LogId>("log id", &damaged).unwrap_err();
            assert!(error.is_corruption(), "bit {bit}: {error}");
        }
    }

    #[test]
    fn short_records_are_refused() {
        for len in 0..5 {
            let bytes = vec![RECORD_VERSION; len];
            let error = decode_record::<u32>("short", &bytes).unwrap_err();
            assert!(error.is_corruption(), "{len}: {error}");
        }
    }

    #[test]
    fn every_flipped_bit_of_a_snapshot_is_refused() {
        let contents = SnapshotContents {
            meta: SnapshotMeta::default(),
            state: AppliedState::default(),
        };
        let bytes = encode_snapshot(&contents).unwrap();
        assert_eq!(decode_snapshot("test", &bytes).unwrap(), contents);
        for bit in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            let error = decode_snapshot("test", &damaged).unwrap_err();
            assert!(error.is_corruption(), "bit {bit}: {error}");
        }
    }
}
