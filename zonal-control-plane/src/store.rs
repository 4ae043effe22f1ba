//! The zonal store: volumes, their attachments and the units' last reports
//! in one redb database (`<data_dir>/zonal.redb`).
//!
//! Tables:
//!
//! * `volumes`: volume id (u64) → JSON [`VolumeRecord`], deleted ones kept
//!   (their ids are never reused).
//! * `volume_names`: name → id of the live (not deleted) volume of that name.
//!   Invariant: a name maps to the id of a record with that name whose state
//!   is not `Deleted`, and every such record has its name here.
//! * `units`: unit name → JSON [`UnitRecord`].
//! * `meta`: `format` (= [`FORMAT`]), `next_volume_id`, `next_attachment_id`.
//!
//! Every mutation is one write transaction committed with
//! [`Durability::Immediate`] (fsync before the call returns), so an answer
//! the API gave is never lost by a crash. redb checksums its pages; values
//! are JSON so that a newer version can read older records. The calls are
//! blocking: the service runs them on tokio's blocking pool.

use std::path::Path;

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use thiserror::Error;

use crate::model::{Attachment, UnitRecord, VolumeRecord, VolumeSpec, VolumeState};

/// Version of the store layout.
pub const FORMAT: u64 = 1;

const VOLUMES: TableDefinition<'static, u64, &'static [u8]> = TableDefinition::new("volumes");
const NAMES: TableDefinition<'static, &'static str, u64> = TableDefinition::new("volume_names");
const UNITS: TableDefinition<'static, &'static str, &'static [u8]> = TableDefinition::new("units");
const META: TableDefinition<'static, &'static str, u64> = TableDefinition::new("meta");

const KEY_FORMAT: &str = "format";
const KEY_NEXT_VOLUME: &str = "next_volume_id";
const KEY_NEXT_ATTACHMENT: &str = "next_attachment_id";

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Database(#[from] redb::Error),
    #[error("store record {what} does not decode: {reason}")]
    Corrupt { what: String, reason: String },
    #[error("store format {found} is not supported (this build reads {FORMAT})")]
    Format { found: u64 },
    /// A write lost a race the service's mutation lock should prevent.
    #[error("store conflict: {0}")]
    Conflict(String),
}

fn db(error: impl Into<redb::Error>) -> StoreError {
    StoreError::Database(error.into())
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Corrupt {
        what: "(encode)".into(),
        reason: e.to_string(),
    })
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        what: what.to_owned(),
        reason: e.to_string(),
    })
}

#[derive(Debug)]
pub struct Store {
    db: Database,
}

impl Store {
    /// Opens (or creates) the store at `path` and checks its format.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let database = Database::create(path).map_err(db)?;
        let store = Store { db: database };
        let txn = store.begin()?;
        {
            txn.open_table(VOLUMES).map_err(db)?;
            txn.open_table(NAMES).map_err(db)?;
            txn.open_table(UNITS).map_err(db)?;
            let mut meta = txn.open_table(META).map_err(db)?;
            let found = meta.get(KEY_FORMAT).map_err(db)?.map(|v| v.value());
            match found {
                None => {
                    meta.insert(KEY_FORMAT, FORMAT).map_err(db)?;
                    meta.insert(KEY_NEXT_VOLUME, 1).map_err(db)?;
                    meta.insert(KEY_NEXT_ATTACHMENT, 1).map_err(db)?;
                }
                Some(FORMAT) => {}
                Some(found) => return Err(StoreError::Format { found }),
            }
        }
        txn.commit().map_err(db)?;
        Ok(store)
    }

    fn begin(&self) -> Result<WriteTransaction, StoreError> {
        let mut txn = self.db.begin_write().map_err(db)?;
        txn.set_durability(Durability::Immediate).map_err(db)?;
        Ok(txn)
    }

    fn next_id(txn: &WriteTransaction, key: &str) -> Result<u64, StoreError> {
        let mut meta = txn.open_table(META).map_err(db)?;
        let id = meta.get(key).map_err(db)?.map_or(1, |v| v.value());
        let next = id
            .checked_add(1)
            .ok_or_else(|| StoreError::Conflict(format!("{key} exhausted")))?;
        meta.insert(key, next).map_err(db)?;
        Ok(id)
    }

    /// Allocates the next volume id and stores a `Creating` record for
    /// `spec` on `unit`, reserving the name. Refuses a name already live.
    pub fn reserve_volume(
        &self,
        spec: &VolumeSpec,
        unit: &str,
        now_ms: u64,
    ) -> Result<VolumeRecord, StoreError> {
        let txn = self.begin()?;
        let record = {
            let mut names = txn.open_table(NAMES).map_err(db)?;
            if names.get(spec.name.as_str()).map_err(db)?.is_some() {
                return Err(StoreError::Conflict(format!(
                    "volume name {:?} is taken",
                    spec.name
                )));
            }
            let id = Self::next_id(&txn, KEY_NEXT_VOLUME)?;
            let record = VolumeRecord {
                id,
                spec: spec.clone(),
                unit: unit.to_owned(),
                state: VolumeState::Creating,
                created_at_ms: now_ms,
                attachments: Vec::new(),
            };
            names.insert(spec.name.as_str(), id).map_err(db)?;
            let mut volumes = txn.open_table(VOLUMES).map_err(db)?;
            volumes
                .insert(id, encode(&record)?.as_slice())
                .map_err(db)?;
            record
        };
        txn.commit().map_err(db)?;
        Ok(record)
    }

    /// Replaces a volume record; a record becoming `Deleted` releases its
    /// name.
    pub fn put_volume(&self, record: &VolumeRecord) -> Result<(), StoreError> {
        let txn = self.begin()?;
        {
            let mut volumes = txn.open_table(VOLUMES).map_err(db)?;
            if volumes.get(record.id).map_err(db)?.is_none() {
                return Err(StoreError::Conflict(format!(
                    "volume {} does not exist",
                    record.id
                )));
            }
            volumes
                .insert(record.id, encode(record)?.as_slice())
                .map_err(db)?;
            let mut names = txn.open_table(NAMES).map_err(db)?;
            if record.state == VolumeState::Deleted {
                let owner = names
                    .get(record.spec.name.as_str())
                    .map_err(db)?
                    .map(|v| v.value());
                if owner == Some(record.id) {
                    names.remove(record.spec.name.as_str()).map_err(db)?;
                }
            }
        }
        txn.commit().map_err(db)
    }

    /// Forgets a volume that never came to exist (its unit refused it):
    /// the record and its name go; the id is not reused.
    pub fn remove_volume(&self, id: u64, name: &str) -> Result<(), StoreError> {
        let txn = self.begin()?;
        {
            let mut volumes = txn.open_table(VOLUMES).map_err(db)?;
            volumes.remove(id).map_err(db)?;
            let mut names = txn.open_table(NAMES).map_err(db)?;
            let owner = names.get(name).map_err(db)?.map(|v| v.value());
            if owner == Some(id) {
                names.remove(name).map_err(db)?;
            }
        }
        txn.commit().map_err(db)
    }

    /// The live volume named `name`.
    pub fn volume_by_name(&self, name: &str) -> Result<Option<VolumeRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let names = txn.open_table(NAMES).map_err(db)?;
        let Some(id) = names.get(name).map_err(db)?.map(|v| v.value()) else {
            return Ok(None);
        };
        let volumes = txn.open_table(VOLUMES).map_err(db)?;
        let Some(bytes) = volumes.get(id).map_err(db)? else {
            return Err(StoreError::Corrupt {
                what: format!("volume_names[{name:?}]"),
                reason: format!("points at missing volume {id}"),
            });
        };
        decode(&format!("volume {id}"), bytes.value()).map(Some)
    }

    /// Every volume record, deleted ones included, by id.
    pub fn volumes(&self) -> Result<Vec<VolumeRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let volumes = txn.open_table(VOLUMES).map_err(db)?;
        let mut out = Vec::new();
        for entry in volumes.iter().map_err(db)? {
            let (id, bytes) = entry.map_err(db)?;
            out.push(decode(&format!("volume {}", id.value()), bytes.value())?);
        }
        Ok(out)
    }

    /// Adds an attachment (id allocated in the same transaction) to the
    /// volume `volume_id`.
    pub fn add_attachment(
        &self,
        volume_id: u64,
        host: &str,
        token_sha256: String,
        now_ms: u64,
    ) -> Result<(VolumeRecord, Attachment), StoreError> {
        let txn = self.begin()?;
        let result = {
            let mut volumes = txn.open_table(VOLUMES).map_err(db)?;
            let mut record: VolumeRecord = match volumes.get(volume_id).map_err(db)? {
                Some(bytes) => decode(&format!("volume {volume_id}"), bytes.value())?,
                None => {
                    return Err(StoreError::Conflict(format!(
                        "volume {volume_id} does not exist"
                    )))
                }
            };
            let attachment = Attachment {
                id: Self::next_id(&txn, KEY_NEXT_ATTACHMENT)?,
                host: host.to_owned(),
                token_sha256,
                created_at_ms: now_ms,
            };
            record.attachments.push(attachment.clone());
            volumes
                .insert(volume_id, encode(&record)?.as_slice())
                .map_err(db)?;
            (record, attachment)
        };
        txn.commit().map_err(db)?;
        Ok(result)
    }

    pub fn put_unit(&self, unit: &UnitRecord) -> Result<(), StoreError> {
        let txn = self.begin()?;
        {
            let mut units = txn.open_table(UNITS).map_err(db)?;
            units
                .insert(unit.name.as_str(), encode(unit)?.as_slice())
                .map_err(db)?;
        }
        txn.commit().map_err(db)
    }

    pub fn unit(&self, name: &str) -> Result<Option<UnitRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let units = txn.open_table(UNITS).map_err(db)?;
        match units.get(name).map_err(db)? {
            Some(bytes) => decode(&format!("unit {name:?}"), bytes.value()).map(Some),
            None => Ok(None),
        }
    }

    /// Every stored unit record, by name.
    pub fn units(&self) -> Result<Vec<UnitRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let units = txn.open_table(UNITS).map_err(db)?;
        let mut out = Vec::new();
        for entry in units.iter().map_err(db)? {
            let (name, bytes) = entry.map_err(db)?;
            out.push(decode(&format!("unit {:?}", name.value()), bytes.value())?);
        }
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::DEFAULT_ERASURE_CODE;

    fn spec(name: &str) -> VolumeSpec {
        VolumeSpec {
            name: name.into(),
            size_bytes: 1 << 20,
            partition_size_bytes: 1 << 20,
            erasure_code: DEFAULT_ERASURE_CODE,
            qos: None,
            from_snapshot: None,
        }
    }

    #[test]
    fn ids_are_monotonic_names_unique_and_everything_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("z.redb");
        {
            let store = Store::open(&path).unwrap();
            let a = store.reserve_volume(&spec("a"), "u1", 1).unwrap();
            assert_eq!(a.id, 1);
            assert!(matches!(
                store.reserve_volume(&spec("a"), "u1", 2),
                Err(StoreError::Conflict(_))
            ));
            let b = store.reserve_volume(&spec("b"), "u1", 3).unwrap();
            assert_eq!(b.id, 2);
            store.remove_volume(b.id, "b").unwrap();
            assert!(store.volume_by_name("b").unwrap().is_none());
            let (record, attachment) = store.add_attachment(a.id, "h1", "t".into(), 4).unwrap();
            assert_eq!(record.attachments, vec![attachment]);
            let mut unit = UnitRecord::unknown("u1");
            unit.reachable = true;
            store.put_unit(&unit).unwrap();
        }
        let store = Store::open(&path).unwrap();
        // The removed id 2 is not reused.
        assert_eq!(store.reserve_volume(&spec("c"), "u1", 5).unwrap().id, 3);
        let mut a = store.volume_by_name("a").unwrap().unwrap();
        assert_eq!(a.attachments.len(), 1);
        a.state = VolumeState::Deleted;
        store.put_volume(&a).unwrap();
        assert!(store.volume_by_name("a").unwrap().is_none());
        assert_eq!(store.volumes().unwrap().len(), 2);
        // The name is free again; the deleted record stays.
        assert_eq!(store.reserve_volume(&spec("a"), "u1", 6).unwrap().id, 4);
        assert!(store.unit("u1").unwrap().unwrap().reachable);
        assert_eq!(store.units().unwrap().len(), 1);
    }
}
