//! A partition index checkpoint (`head_node::index::PartitionIndex`), as
//! read back from a sled or the log at recovery.
//!
//! The harness fixes up the trailing CRC-32C when the first input byte is
//! odd, so the fuzzer spends its time in the decoder proper rather than in
//! front of the checksum. What decodes must satisfy the index's invariants
//! (the reference counts recovery relies on) and re-encode to the same
//! bytes when it is of the current version: the format is canonical, so a
//! checkpoint read and written again is unchanged. An older version (still
//! loaded) is written as the current one: that encoding decodes to the same
//! index.
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
    let encoded = index.serialize();
    let version = bytes.get(8..10).map(|v| u16::from_le_bytes([v[0], v[1]]));
    if version == Some(head_node::index::CHECKPOINT_VERSION) {
        assert_eq!(encoded, bytes, "checkpoint decoding is canonical");
    } else {
        let again = PartitionIndex::deserialize(&encoded)
            .unwrap_or_else(|e| panic!("an upgraded checkpoint does not decode: {e}"));
        assert_eq!(
            again.serialize(),
            encoded,
            "an upgraded checkpoint is canonical"
        );
        assert_eq!(
            again.runs().collect::<Vec<_>>(),
            index.runs().collect::<Vec<_>>(),
            "an upgraded checkpoint maps the same blocks"
        );
    }
    // Lookups over the whole partition answer without a panic.
    let size = index.size_blocks();
    if size > 0 {
        let _ = index.lookup(0, size.min(1 << 20));
    }
});
