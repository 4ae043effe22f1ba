//! Splitting a volume byte range into per-partition pieces (sans-IO).

/// One piece of a request: a sub-range inside one partition and at most
/// `max_piece_bytes` long. `request_offset` is where it starts within the
/// caller's range (for slicing write data and placing read data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub partition: u32,
    pub offset_bytes: u64,
    pub len: u32,
    pub request_offset: u64,
}

/// Split `[offset_bytes, offset_bytes + len)` at multiples of
/// `partition_size_bytes` and into pieces of at most `max_piece_bytes`.
/// Pieces come in ascending order and cover the range exactly.
///
/// Returns `None` if a partition index would not fit a `u32`, the range
/// overflows, or a size is zero.
pub fn split_range(
    offset_bytes: u64,
    len: u64,
    partition_size_bytes: u64,
    max_piece_bytes: u32,
) -> Option<Vec<Piece>> {
    if partition_size_bytes == 0 || max_piece_bytes == 0 {
        return None;
    }
    let end = offset_bytes.checked_add(len)?;
    let mut pieces = Vec::new();
    let mut at = offset_bytes;
    while at < end {
        let partition = at / partition_size_bytes;
        let partition_end = (partition + 1).saturating_mul(partition_size_bytes);
        let piece_end = end
            .min(partition_end)
            .min(at.saturating_add(u64::from(max_piece_bytes)));
        pieces.push(Piece {
            partition: u32::try_from(partition).ok()?,
            offset_bytes: at,
            // piece_end - at <= max_piece_bytes, a u32.
            len: u32::try_from(piece_end - at).ok()?,
            request_offset: at - offset_bytes,
        });
        at = piece_end;
    }
    Some(pieces)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn splits_at_partition_boundaries_and_max_size() {
        let pieces = split_range(3072, 10_240, 8192, 4096).unwrap();
        assert_eq!(
            pieces,
            vec![
                Piece {
                    partition: 0,
                    offset_bytes: 3072,
                    len: 4096,
                    request_offset: 0
                },
                Piece {
                    partition: 0,
                    offset_bytes: 7168,
                    len: 1024,
                    request_offset: 4096
                },
                Piece {
                    partition: 1,
                    offset_bytes: 8192,
                    len: 4096,
                    request_offset: 5120
                },
                Piece {
                    partition: 1,
                    offset_bytes: 12_288,
                    len: 1024,
                    request_offset: 9216
                },
            ]
        );
    }

    #[test]
    fn covers_every_range_exactly() {
        for offset in (0..40_000u64).step_by(512 * 7) {
            for len in (512..30_000u64).step_by(512 * 5) {
                let pieces = split_range(offset, len, 8192, 2048).unwrap();
                let mut at = offset;
                for piece in &pieces {
                    assert_eq!(piece.offset_bytes, at);
                    assert_eq!(piece.request_offset, at - offset);
                    assert!(piece.len > 0 && piece.len <= 2048);
                    let end = piece.offset_bytes + u64::from(piece.len);
                    assert_eq!(piece.offset_bytes / 8192, u64::from(piece.partition));
                    assert_eq!((end - 1) / 8192, u64::from(piece.partition));
                    at = end;
                }
                assert_eq!(at, offset + len);
            }
        }
    }

    #[test]
    fn degenerate_inputs() {
        assert_eq!(split_range(0, 0, 8192, 4096), Some(vec![]));
        assert_eq!(split_range(0, 512, 0, 4096), None);
        assert_eq!(split_range(u64::MAX, 512, 8192, 4096), None);
        assert_eq!(split_range(u64::MAX - 1024, 512, 1, 4096), None);
    }
}
