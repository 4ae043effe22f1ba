//! The write log's on-device structures: a version 2 batch header, a
//! version 1 record header and a superblock, decoded from arbitrary bytes.
//!
//! The first input byte steers the harness: its low bits say how many 4 KiB
//! blocks the batch header region has (1..=4) and whether to fix up the
//! trailing CRC-32C of the region (and of the single-block structures), so
//! that the fuzzer gets past the checksums to the field checks. Whatever
//! decodes as a batch must have payload offsets inside its length, its
//! payload check must not panic on short data, and (when small) it must
//! re-encode to a header that decodes to the same batch.
#![no_main]

use bytes::Bytes;
use head_node::wal::format::{batch_len, encode_batch, entry_bytes, LogRecord};
use head_node::wal::format::{
    choose_superblock, decode_batch_header, decode_header, first_bad_entry, Superblock,
};
use libfuzzer_sys::fuzz_target;

const BLOCK: usize = 4096;

fn seal(region: &mut [u8]) {
    let at = region.len() - 4;
    let crc = crc32c::crc32c(&region[..at]);
    region[at..].copy_from_slice(&crc.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    let Some((&steer, rest)) = data.split_first() else {
        return;
    };
    let blocks = usize::from(steer & 3) + 1;
    let fix = steer & 4 != 0;
    let mut region = vec![0u8; blocks * BLOCK];
    let n = rest.len().min(region.len());
    region[..n].copy_from_slice(&rest[..n]);
    if fix {
        seal(&mut region);
    }
    let payloads = rest.get(n..).unwrap_or_default();

    if let Ok(header) = decode_batch_header(&region) {
        for offset in header.payload_offsets() {
            assert!(offset <= header.len_bytes, "payload offset past the batch");
        }
        let _ = first_bad_entry(&header, payloads);
        // Re-encode what decoded (payloads of zeros, their CRCs as decoded:
        // the header round trip is what is checked here).
        if !header.padding && header.len_bytes <= 1 << 20 {
            let records: Vec<LogRecord> = header
                .entries
                .iter()
                .map(|e| {
                    let len = usize::try_from(e.payload_len_bytes).unwrap_or(usize::MAX);
                    e.record(Bytes::from(vec![0u8; len]))
                })
                .collect();
            let entries_bytes: u64 = records.iter().map(entry_bytes).sum();
            let payload_blocks: u64 = header
                .entries
                .iter()
                .map(|e| e.block_crcs.len() as u64)
                .sum();
            assert_eq!(batch_len(entries_bytes, payload_blocks), header.len_bytes);
            let pairs: Vec<(&LogRecord, &[u32])> = records
                .iter()
                .zip(&header.entries)
                .map(|(r, e)| (r, e.block_crcs.as_slice()))
                .collect();
            let mut out = vec![0u8; header.len_bytes as usize];
            encode_batch(header.stamp, &pairs, &mut out);
            let again = decode_batch_header(&out[..(header.header_blocks as usize) * BLOCK]);
            assert_eq!(again.ok(), Some(header));
        }
    }

    // The first block as a version 1 record header and as a superblock.
    let mut block = [0u8; BLOCK];
    block.copy_from_slice(&region[..BLOCK]);
    if fix {
        seal(&mut block);
    }
    let _ = decode_header(&block);
    if let Ok(superblock) = Superblock::decode(&block) {
        let again = superblock.encode();
        assert_eq!(Superblock::decode(&again).ok(), Some(superblock));
    }
    let other = region.get(BLOCK..2 * BLOCK).unwrap_or(&block);
    let _ = choose_superblock([&block, other]);
});
