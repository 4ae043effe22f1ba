//! A partition index checkpoint (`head_node::index::PartitionIndex`), as
//! read back from a sled or the log at recovery.
//!
//! The harness fixes up the trailing CRC-32C when the first input byte is
//! odd, so the fuzzer spends its time in the decoder proper rather than in
//! front of the checksum. What decodes must satisfy the index's invariants
//! (the reference counts recovery relies on) and re-encode to the same
//! bytes: the format is canonical, so a checkpoint read and written again
//! is unchanged.
#![no_main]

use head_node::index::PartitionIndex;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&steer, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = rest.to_vec();
    if steer & 1 == 1 {
        let crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
    }
    let Ok(index) = PartitionIndex::deserialize(&bytes) else {
        return;
    };
    if let Err(reason) = index.check_invariants() {
        panic!("a decoded checkpoint breaks the index invariants: {reason}");
    }
    assert_eq!(index.serialize(), bytes, "checkpoint decoding is canonical");
    // Lookups over the whole partition answer without a panic.
    let size = index.size_blocks();
    if size > 0 {
        let _ = index.lookup(0, size.min(1 << 20));
    }
});
