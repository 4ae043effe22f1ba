//! A writer of the previous log format (version 1: one header block per
//! record), kept so that tests can build a log as the previous release left
//! it and check that [`Wal::open`](super::Wal::open) replays it and then
//! continues in version 2 without losing an acknowledged record.
//!
//! The node never uses it: it formats a blank device and appends records
//! one durable device write each, as the version 1 writer's batches of one
//! record did. No group commit, no release, no fail-stop.

use hardware::{AlignedBuf, SharedDevice};
use proto::BLOCK_SIZE_BYTES;

use super::format::{self, RecordStamp, Superblock, RING_OFFSET, SUPERBLOCK_OFFSETS};
use super::ring::Ring;
use super::{LogPosition, LogRecord, WalError, MIN_CAPACITY_BYTES};

/// Appends version 1 records to a log it formatted itself.
#[derive(Debug)]
pub struct V1Writer {
    device: SharedDevice,
    ring: Ring,
    log_id: u64,
    open_generation: u64,
    head: u64,
}

impl V1Writer {
    /// Formats `device` (whatever it holds) as an empty version 1 log of
    /// `capacity_bytes`, opened once (open generation 1, as the previous
    /// release's first open left it).
    pub async fn format(
        device: SharedDevice,
        capacity_bytes: u64,
        log_id: u64,
    ) -> Result<Self, WalError> {
        let size_bytes = device.info().size_bytes;
        if capacity_bytes < MIN_CAPACITY_BYTES
            || capacity_bytes % BLOCK_SIZE_BYTES != 0
            || RING_OFFSET + capacity_bytes > size_bytes
        {
            return Err(WalError::TooSmall {
                size_bytes,
                needed_bytes: RING_OFFSET + capacity_bytes.max(MIN_CAPACITY_BYTES),
            });
        }
        for generation in 0..2 {
            let superblock = Superblock {
                version: format::V1_FORMAT_VERSION,
                log_id,
                generation,
                capacity_bytes,
                tail_position_bytes: 0,
                head_position_hint_bytes: 0,
                open_generation: generation,
                batches_from_position_bytes: u64::MAX,
            };
            let buf = AlignedBuf::from_slice(&superblock.encode())?;
            device
                .write_at(SUPERBLOCK_OFFSETS[superblock.slot()], buf)
                .await?;
            device.flush().await?;
        }
        // The ring as a fresh file leaves it: zeros.
        let zeros = AlignedBuf::zeroed(capacity_bytes as usize)?;
        device.write_at(RING_OFFSET, zeros).await?;
        device.flush().await?;
        Ok(Self {
            device,
            ring: Ring::new(capacity_bytes),
            log_id,
            open_generation: 1,
            head: 0,
        })
    }

    /// Appends one record (with a padding record first when it does not fit
    /// in the rest of the lap) in one durable write; returns its position.
    pub async fn append(&mut self, record: &LogRecord) -> Result<LogPosition, WalError> {
        record.validate()?;
        let reservation = self
            .ring
            .reserve(self.head, 0, record.encoded_len())
            .map_err(|full| WalError::LogFull {
                needed_bytes: full.needed_bytes,
                free_bytes: full.free_bytes,
            })?;
        if let Some((at, skip_bytes)) = reservation.padding {
            let mut buf = AlignedBuf::zeroed(BLOCK_SIZE_BYTES as usize)?;
            format::encode_padding(self.stamp(at), skip_bytes, &mut buf);
            self.device
                .write_durable_at(RING_OFFSET + self.ring.offset(at), buf)
                .await?;
        }
        let mut buf = AlignedBuf::zeroed(record.encoded_len() as usize)?;
        format::encode_record(record, self.stamp(reservation.position), &mut buf);
        self.device
            .write_durable_at(RING_OFFSET + self.ring.offset(reservation.position), buf)
            .await?;
        self.head = reservation.end;
        Ok(LogPosition(reservation.position))
    }

    fn stamp(&self, position: u64) -> RecordStamp {
        RecordStamp {
            log_id: self.log_id,
            position_bytes: position,
            lap: self.ring.lap(position),
            open_generation: self.open_generation,
        }
    }
}
