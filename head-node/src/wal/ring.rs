//! Space accounting of the circular log (pure).
//!
//! Positions are *logical* byte offsets that only grow; the ring offset of a
//! position is `position % capacity` and its lap is `position / capacity`.
//! Live records occupy `[tail, head)`, so `head - tail <= capacity` always
//! holds: a reservation that would break it is refused ([`Full`]) rather than
//! overwrite a record that has not been released.
//!
//! A record never wraps around the end of the ring: when it does not fit in
//! the rest of the current lap, a padding record fills the rest and the record
//! starts the next lap at ring offset 0. Everything is 4 KiB aligned.

use proto::BLOCK_SIZE_BYTES;

/// The ring would have to overwrite unreleased records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full {
    /// Bytes the reservation needs (padding included).
    pub needed_bytes: u64,
    /// Bytes free now.
    pub free_bytes: u64,
}

/// Where a reserved record goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    /// A padding record `(position, skip_bytes_after_its_header)` needed first.
    pub padding: Option<(u64, u64)>,
    /// Position of the record.
    pub position: u64,
    /// The new head (end of the record).
    pub end: u64,
}

/// Ring geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ring {
    capacity_bytes: u64,
}

impl Ring {
    /// A ring of `capacity_bytes` (a non-zero multiple of 4 KiB).
    pub fn new(capacity_bytes: u64) -> Self {
        assert!(capacity_bytes > 0 && capacity_bytes % BLOCK_SIZE_BYTES == 0);
        Self { capacity_bytes }
    }

    /// Ring size in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    /// Offset of `position` inside the ring.
    pub fn offset(&self, position: u64) -> u64 {
        position % self.capacity_bytes
    }

    /// Lap of `position`.
    pub fn lap(&self, position: u64) -> u64 {
        position / self.capacity_bytes
    }

    /// Reserves `len` bytes at `head` given the live range `[tail, head)`.
    pub fn reserve(&self, head: u64, tail: u64, len: u64) -> Result<Reservation, Full> {
        debug_assert!(tail <= head && head - tail <= self.capacity_bytes);
        debug_assert!(len > 0 && len % BLOCK_SIZE_BYTES == 0 && head % BLOCK_SIZE_BYTES == 0);
        let offset = self.offset(head);
        let (padding, position) = if offset + len > self.capacity_bytes {
            let rest = self.capacity_bytes - offset;
            // The padding header is one block; it skips the rest of the lap.
            (Some((head, rest - BLOCK_SIZE_BYTES)), head + rest)
        } else {
            (None, head)
        };
        let end = position + len;
        let free_bytes = self.capacity_bytes - (head - tail);
        if end - tail > self.capacity_bytes {
            return Err(Full {
                needed_bytes: end - head,
                free_bytes,
            });
        }
        Ok(Reservation {
            padding,
            position,
            end,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const B: u64 = BLOCK_SIZE_BYTES;

    #[test]
    fn pads_to_the_end_of_the_lap() {
        let ring = Ring::new(10 * B);
        let r = ring.reserve(8 * B, 8 * B, 3 * B).unwrap();
        assert_eq!(r.padding, Some((8 * B, B)));
        assert_eq!((r.position, r.end), (10 * B, 13 * B));
        assert_eq!(ring.lap(r.position), 1);
        assert_eq!(ring.offset(r.position), 0);
    }

    #[test]
    fn refuses_to_overrun_the_tail() {
        let ring = Ring::new(10 * B);
        assert!(ring.reserve(9 * B, 0, B).is_ok());
        assert_eq!(
            ring.reserve(10 * B, 0, B),
            Err(Full {
                needed_bytes: B,
                free_bytes: 0
            })
        );
        // Needs padding of 2 blocks + 3 blocks but only 4 are free.
        assert_eq!(
            ring.reserve(18 * B, 12 * B, 3 * B),
            Err(Full {
                needed_bytes: 5 * B,
                free_bytes: 4 * B
            })
        );
    }

    proptest! {
        #[test]
        fn reservations_stay_inside_one_lap_and_the_live_window(
            ops in proptest::collection::vec((1u64..6, any::<bool>()), 1..200)
        ) {
            let ring = Ring::new(16 * B);
            let (mut head, mut tail) = (0u64, 0u64);
            let mut live: std::collections::VecDeque<(u64, u64)> = Default::default();
            for (blocks, release) in ops {
                if release {
                    if let Some((_, end)) = live.pop_front() {
                        tail = end;
                    }
                    continue;
                }
                match ring.reserve(head, tail, blocks * B) {
                    Ok(r) => {
                        prop_assert!(ring.offset(r.position) + blocks * B <= ring.capacity_bytes());
                        prop_assert!(r.end - tail <= ring.capacity_bytes());
                        if let Some((pad, skip)) = r.padding {
                            prop_assert_eq!(pad, head);
                            prop_assert_eq!(ring.offset(pad + B + skip), 0);
                            live.push_back((pad, pad + B + skip));
                        }
                        live.push_back((r.position, r.end));
                        head = r.end;
                    }
                    Err(full) => prop_assert!(full.needed_bytes > full.free_bytes),
                }
            }
        }
    }
}
