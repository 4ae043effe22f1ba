//! The `ErasureCodec` seam: systematic Reed–Solomon over GF(2^8).
//!
//! A flush packs logged blocks into the `k` data shards of a stripe (one shard
//! per data column of an extent), and [`ErasureCodec::encode`] computes the
//! `m` parity shards that go to the remaining columns. The code is
//! *systematic*: the data shards are stored as they are, so a healthy read
//! touches only the one data column that holds a block, and parity is read
//! only by degraded reads and repair ([`ErasureCodec::reconstruct`]).
//!
//! Invariants checked before the library is called (so every failure is a
//! typed [`ErasureError`], never a panic):
//!
//! * `1 <= k`, `1 <= m`, `k + m <= MAX_TOTAL_SHARDS` (32);
//! * all shards of one call have the same length, a non-zero multiple of
//!   [`SHARD_ALIGN_BYTES`] (one volume block), so each chunk is
//!   written to a column as whole blocks;
//! * reconstruction needs at least `k` present shards.
//!
//! Each extent records the [`ErasureScheme`] (codec id and `(k, m)`) it was
//! written with, so a later change of the default code, or a different codec
//! behind this seam, never misreads old extents.

use reed_solomon_erasure::galois_8::ReedSolomon;
use thiserror::Error;

/// Shard lengths are multiples of this: one volume block, so a shard is
/// written to a column as whole blocks.
pub const SHARD_ALIGN_BYTES: usize = proto::BLOCK_SIZE_BYTES as usize;

/// Largest `k + m` this seam accepts (GF(2^8) allows 256; extents span at
/// most this many sleds).
pub const MAX_TOTAL_SHARDS: usize = 32;

/// Codec identifier recorded per extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum CodecId {
    /// Systematic Reed–Solomon over GF(2^8), Vandermonde-derived matrix
    /// (`reed-solomon-erasure` 6.0, `galois_8`).
    ReedSolomonGf8 = 1,
}

impl CodecId {
    /// The value stored on disk and on the wire.
    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// Parses a stored codec id.
    pub fn from_u16(value: u16) -> Result<Self, ErasureError> {
        match value {
            1 => Ok(CodecId::ReedSolomonGf8),
            other => Err(ErasureError::UnknownCodec { codec_id: other }),
        }
    }
}

/// What an extent records about its code: enough to rebuild a codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErasureScheme {
    /// Which codec.
    pub codec: CodecId,
    /// Data shards per stripe.
    pub data_shards: u8,
    /// Parity shards per stripe.
    pub parity_shards: u8,
}

impl ErasureScheme {
    /// Little-endian packed form `[codec u16][k u8][m u8]`.
    pub fn to_bytes(self) -> [u8; 4] {
        let codec = self.codec.as_u16().to_le_bytes();
        [codec[0], codec[1], self.data_shards, self.parity_shards]
    }

    /// Parses [`to_bytes`](Self::to_bytes) output and validates `(k, m)`.
    pub fn from_bytes(bytes: [u8; 4]) -> Result<Self, ErasureError> {
        let codec = CodecId::from_u16(u16::from_le_bytes([bytes[0], bytes[1]]))?;
        let scheme = Self {
            codec,
            data_shards: bytes[2],
            parity_shards: bytes[3],
        };
        check_parameters(scheme.data_shards.into(), scheme.parity_shards.into())?;
        Ok(scheme)
    }
}

/// Everything the codec can refuse.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ErasureError {
    /// `(k, m)` outside `k >= 1, m >= 1, k + m <= 32`.
    #[error("invalid erasure parameters k={data_shards} m={parity_shards} (need k>=1, m>=1, k+m<={MAX_TOTAL_SHARDS})")]
    InvalidParameters {
        /// Requested data shards.
        data_shards: usize,
        /// Requested parity shards.
        parity_shards: usize,
    },
    /// A call passed the wrong number of shards.
    #[error("expected {expected} shards, got {got}")]
    WrongShardCount {
        /// Shards passed.
        got: usize,
        /// Shards the codec needs for this call.
        expected: usize,
    },
    /// Shards of one call differ in length.
    #[error("shard {shard} is {len} bytes, expected {expected}")]
    ShardSizeMismatch {
        /// Index of the offending shard.
        shard: usize,
        /// Its length.
        len: usize,
        /// Length of the first shard.
        expected: usize,
    },
    /// Shard length is zero or not a multiple of 4 KiB.
    #[error("shard length {len} is not a non-zero multiple of {SHARD_ALIGN_BYTES}")]
    UnalignedShard {
        /// The length.
        len: usize,
    },
    /// Fewer than `k` shards are present: the stripe cannot be decoded.
    #[error("only {present} shards present, need {needed}")]
    TooFewShards {
        /// Shards present.
        present: usize,
        /// `k`.
        needed: usize,
    },
    /// A stored codec id this build does not know.
    #[error("unknown erasure codec id {codec_id}")]
    UnknownCodec {
        /// The stored id.
        codec_id: u16,
    },
    /// The library refused a call that passed our checks (a bug here).
    #[error("erasure library error: {reason}")]
    Library {
        /// The library's message.
        reason: String,
    },
}

fn check_parameters(data_shards: usize, parity_shards: usize) -> Result<(), ErasureError> {
    if data_shards == 0
        || parity_shards == 0
        || data_shards.saturating_add(parity_shards) > MAX_TOTAL_SHARDS
    {
        return Err(ErasureError::InvalidParameters {
            data_shards,
            parity_shards,
        });
    }
    Ok(())
}

/// Checks that `lengths` are all equal and a non-zero multiple of 4 KiB;
/// returns the common length.
fn check_lengths(lengths: impl Iterator<Item = (usize, usize)>) -> Result<usize, ErasureError> {
    let mut expected = None;
    for (shard, len) in lengths {
        match expected {
            None => {
                if len == 0 || len % SHARD_ALIGN_BYTES != 0 {
                    return Err(ErasureError::UnalignedShard { len });
                }
                expected = Some(len);
            }
            Some(expected) if expected != len => {
                return Err(ErasureError::ShardSizeMismatch {
                    shard,
                    len,
                    expected,
                });
            }
            Some(_) => {}
        }
    }
    expected.ok_or(ErasureError::UnalignedShard { len: 0 })
}

fn library(error: reed_solomon_erasure::Error) -> ErasureError {
    ErasureError::Library {
        reason: format!("{error:?}"),
    }
}

/// A `(k, m)` Reed–Solomon codec. Cheap to share (`&self` methods).
pub struct ErasureCodec {
    scheme: ErasureScheme,
    inner: ReedSolomon,
}

impl std::fmt::Debug for ErasureCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ErasureCodec")
            .field("scheme", &self.scheme)
            .finish()
    }
}

impl ErasureCodec {
    /// A codec with `data_shards` (k) data and `parity_shards` (m) parity shards.
    pub fn new(data_shards: usize, parity_shards: usize) -> Result<Self, ErasureError> {
        check_parameters(data_shards, parity_shards)?;
        let inner = ReedSolomon::new(data_shards, parity_shards).map_err(library)?;
        let (Ok(k), Ok(m)) = (u8::try_from(data_shards), u8::try_from(parity_shards)) else {
            return Err(ErasureError::InvalidParameters {
                data_shards,
                parity_shards,
            });
        };
        Ok(Self {
            scheme: ErasureScheme {
                codec: CodecId::ReedSolomonGf8,
                data_shards: k,
                parity_shards: m,
            },
            inner,
        })
    }

    /// Rebuilds the codec an extent was written with.
    pub fn from_scheme(scheme: ErasureScheme) -> Result<Self, ErasureError> {
        match scheme.codec {
            CodecId::ReedSolomonGf8 => {
                Self::new(scheme.data_shards.into(), scheme.parity_shards.into())
            }
        }
    }

    /// Codec id and `(k, m)`, to record per extent.
    pub fn scheme(&self) -> ErasureScheme {
        self.scheme
    }

    /// `k`.
    pub fn data_shards(&self) -> usize {
        self.scheme.data_shards.into()
    }

    /// `m`.
    pub fn parity_shards(&self) -> usize {
        self.scheme.parity_shards.into()
    }

    /// `k + m`.
    pub fn total_shards(&self) -> usize {
        self.data_shards() + self.parity_shards()
    }

    /// Computes the `m` parity shards of `k` equal-length data shards.
    pub fn encode<S: AsRef<[u8]>>(&self, data: &[S]) -> Result<Vec<Vec<u8>>, ErasureError> {
        if data.len() != self.data_shards() {
            return Err(ErasureError::WrongShardCount {
                got: data.len(),
                expected: self.data_shards(),
            });
        }
        let len = check_lengths(data.iter().map(|s| s.as_ref().len()).enumerate())?;
        let mut parity = vec![vec![0u8; len]; self.parity_shards()];
        self.inner.encode_sep(data, &mut parity).map_err(library)?;
        Ok(parity)
    }

    /// Restores every missing (`None`) shard of a stripe in place, data and
    /// parity, from any `k` present ones. `shards` holds all `k + m` shards in
    /// column order.
    pub fn reconstruct(&self, shards: &mut [Option<Vec<u8>>]) -> Result<(), ErasureError> {
        self.check_stripe(shards)?;
        self.inner.reconstruct(shards).map_err(library)
    }

    /// Like [`reconstruct`](Self::reconstruct) but restores only the data
    /// shards (what a degraded read needs).
    pub fn reconstruct_data(&self, shards: &mut [Option<Vec<u8>>]) -> Result<(), ErasureError> {
        self.check_stripe(shards)?;
        self.inner.reconstruct_data(shards).map_err(library)
    }

    /// Whether the parity of a complete stripe matches its data (scrub).
    pub fn verify<S: AsRef<[u8]>>(&self, shards: &[S]) -> Result<bool, ErasureError> {
        if shards.len() != self.total_shards() {
            return Err(ErasureError::WrongShardCount {
                got: shards.len(),
                expected: self.total_shards(),
            });
        }
        check_lengths(shards.iter().map(|s| s.as_ref().len()).enumerate())?;
        self.inner.verify(shards).map_err(library)
    }

    fn check_stripe(&self, shards: &[Option<Vec<u8>>]) -> Result<(), ErasureError> {
        if shards.len() != self.total_shards() {
            return Err(ErasureError::WrongShardCount {
                got: shards.len(),
                expected: self.total_shards(),
            });
        }
        let present = shards.iter().filter(|s| s.is_some()).count();
        if present < self.data_shards() {
            return Err(ErasureError::TooFewShards {
                present,
                needed: self.data_shards(),
            });
        }
        check_lengths(
            shards
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.as_ref().map(|s| (i, s.len()))),
        )?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_checked() {
        assert!(ErasureCodec::new(4, 2).is_ok());
        assert!(ErasureCodec::new(1, 1).is_ok());
        assert!(ErasureCodec::new(16, 16).is_ok());
        for (k, m) in [(0, 2), (4, 0), (17, 16), (31, 2)] {
            assert_eq!(
                ErasureCodec::new(k, m).err(),
                Some(ErasureError::InvalidParameters {
                    data_shards: k,
                    parity_shards: m
                })
            );
        }
    }

    #[test]
    fn shard_shapes_are_checked() {
        let codec = ErasureCodec::new(2, 1).unwrap();
        let a = vec![1u8; 4096];
        assert_eq!(
            codec.encode(&[&a[..]]).err(),
            Some(ErasureError::WrongShardCount {
                got: 1,
                expected: 2
            })
        );
        assert_eq!(
            codec.encode(&[&a[..], &a[..4000]]).err(),
            Some(ErasureError::ShardSizeMismatch {
                shard: 1,
                len: 4000,
                expected: 4096
            })
        );
        assert_eq!(
            codec.encode(&[&a[..100], &a[..100]]).err(),
            Some(ErasureError::UnalignedShard { len: 100 })
        );
        let mut shards = vec![Some(a.clone()), None, None];
        assert_eq!(
            codec.reconstruct(&mut shards).err(),
            Some(ErasureError::TooFewShards {
                present: 1,
                needed: 2
            })
        );
    }

    #[test]
    fn scheme_round_trips() {
        let codec = ErasureCodec::new(4, 2).unwrap();
        let scheme = codec.scheme();
        assert_eq!(ErasureScheme::from_bytes(scheme.to_bytes()), Ok(scheme));
        assert_eq!(
            ErasureScheme::from_bytes([9, 0, 4, 2]),
            Err(ErasureError::UnknownCodec { codec_id: 9 })
        );
        assert!(ErasureScheme::from_bytes([1, 0, 0, 2]).is_err());
        assert_eq!(ErasureCodec::from_scheme(scheme).unwrap().scheme(), scheme);
    }
}
