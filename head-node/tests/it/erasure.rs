//! Properties of the erasure codec: any m erasures reconstruct, and decoding
//! what was encoded gives the data back.

use head_node::erasure::{ErasureCodec, ErasureError};
use proptest::prelude::*;

/// `(k, m, shard_len_blocks, seed)`.
fn shape() -> impl Strategy<Value = (usize, usize, usize, u64)> {
    (1usize..=8, 1usize..=4, 1usize..=2, any::<u64>())
}

fn data_shards(k: usize, len: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut state = seed | 1;
    (0..k)
        .map(|_| {
            (0..len)
                .map(|_| {
                    // xorshift64: cheap deterministic bytes.
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect()
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn any_m_erasures_reconstruct((k, m, blocks, seed) in shape(), pick in any::<u64>()) {
        let codec = ErasureCodec::new(k, m).unwrap();
        let data = data_shards(k, blocks * 4096, seed);
        let parity = codec.encode(&data).unwrap();
        let full: Vec<Vec<u8>> = data.iter().chain(parity.iter()).cloned().collect();
        prop_assert!(codec.verify(&full).unwrap());
        // Erase exactly m shards chosen by `pick` (a random subset of size m).
        let n = k + m;
        let mut order: Vec<usize> = (0..n).collect();
        let mut r = pick | 1;
        for i in (1..n).rev() {
            r ^= r << 13; r ^= r >> 7; r ^= r << 17;
            order.swap(i, (r % (i as u64 + 1)) as usize);
        }
        let mut shards: Vec<Option<Vec<u8>>> = full.iter().cloned().map(Some).collect();
        for &i in &order[..m] {
            shards[i] = None;
        }
        codec.reconstruct(&mut shards).unwrap();
        let restored: Vec<Vec<u8>> = shards.into_iter().map(|s| s.unwrap()).collect();
        prop_assert_eq!(restored, full);
    }

    #[test]
    fn decode_of_encode_is_identity((k, m, blocks, seed) in shape(), lose_data in any::<bool>()) {
        let codec = ErasureCodec::new(k, m).unwrap();
        let data = data_shards(k, blocks * 4096, seed);
        let parity = codec.encode(&data).unwrap();
        let mut shards: Vec<Option<Vec<u8>>> =
            data.iter().chain(parity.iter()).cloned().map(Some).collect();
        // Lose the first min(k, m) data shards (or nothing): decode must give the data back.
        if lose_data {
            for s in shards.iter_mut().take(k.min(m)) {
                *s = None;
            }
        }
        codec.reconstruct_data(&mut shards).unwrap();
        let decoded: Vec<Vec<u8>> = shards.into_iter().take(k).map(|s| s.unwrap()).collect();
        prop_assert_eq!(decoded, data);
    }

    #[test]
    fn more_than_m_erasures_is_a_typed_error((k, m, _blocks, seed) in shape()) {
        let codec = ErasureCodec::new(k, m).unwrap();
        let data = data_shards(k, 4096, seed);
        let parity = codec.encode(&data).unwrap();
        let mut shards: Vec<Option<Vec<u8>>> =
            data.into_iter().chain(parity).map(Some).collect();
        for s in shards.iter_mut().take(m + 1) {
            *s = None;
        }
        prop_assert_eq!(
            codec.reconstruct(&mut shards),
            Err(ErasureError::TooFewShards { present: k - 1, needed: k })
        );
    }
}

#[test]
fn default_four_plus_two_survives_every_pair_of_losses() {
    let codec = ErasureCodec::new(4, 2).unwrap();
    let data = data_shards(4, 4096, 7);
    let parity = codec.encode(&data).unwrap();
    let full: Vec<Vec<u8>> = data.into_iter().chain(parity).collect();
    for a in 0..6 {
        for b in a + 1..6 {
            let mut shards: Vec<Option<Vec<u8>>> = full.iter().cloned().map(Some).collect();
            shards[a] = None;
            shards[b] = None;
            codec.reconstruct(&mut shards).unwrap();
            assert!(shards.iter().zip(&full).all(|(s, f)| s.as_ref() == Some(f)));
        }
    }
}
