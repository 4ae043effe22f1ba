//! The sled's on-device structures (superblock, column slot, CRC block)
//! decoded from arbitrary 4 KiB blocks. The harness fixes up the trailing
//! CRC-32C (first input byte: leave it, or fix it) so that the fuzzer gets
//! past the checksum to the field checks. Whatever decodes must encode back
//! to the same block.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sled_controller::layout::{ColumnSlot, CrcBlock, Superblock};

const BLOCK: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let mut block = [0u8; BLOCK];
    let n = rest.len().min(BLOCK);
    block[..n].copy_from_slice(&rest[..n]);
    if control & 1 == 1 {
        let crc = crc32c::crc32c(&block[..BLOCK - 4]);
        block[BLOCK - 4..].copy_from_slice(&crc.to_le_bytes());
    }
    let column = u32::from(control >> 4);
    if let Ok(superblock) = Superblock::decode(&block) {
        if let Ok(again) = superblock.encode() {
            assert_eq!(Superblock::decode(&again).ok(), Some(superblock));
        }
    }
    let column_size_bytes = 1u64 << (12 + (control >> 1 & 7));
    if let Ok(slot) = ColumnSlot::decode(&block, column, column_size_bytes) {
        let again = slot.encode(column);
        assert_eq!(
            ColumnSlot::decode(&again, column, column_size_bytes).ok(),
            Some(slot)
        );
    }
    if let Ok(crcs) = CrcBlock::decode(&block, column, 0) {
        let again = crcs.encode(column, 0);
        assert_eq!(CrcBlock::decode(&again, column, 0).ok(), Some(crcs));
    }
});
