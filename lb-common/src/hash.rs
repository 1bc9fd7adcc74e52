//! The flow hash that picks a backend for a new flow.

/// Mixes a flow's 5-tuple and a seed into 32 bits (the murmur3 finalizer over each word).
/// The same function runs in the data path and in tests, so both agree on a flow's slot.
#[must_use]
#[inline(always)]
pub const fn flow_hash(src: u32, dst: u32, ports: u32, protocol: u8, seed: u32) -> u32 {
    let mut h = seed ^ protocol as u32;
    h = mix(h ^ src);
    h = mix(h ^ dst);
    h = mix(h ^ ports);
    h
}

#[inline(always)]
const fn mix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

#[cfg(test)]
mod tests {
    use super::flow_hash;

    #[test]
    fn spreads_client_ports_evenly_over_three_slots() {
        let mut per_slot = [0u32; 3];
        for port in 0..30_000u32 {
            let h = flow_hash(0x0200_1eac, 0x6400_1eac, port << 16 | 0x5076, 6, 0);
            per_slot[(h % 3) as usize] += 1;
        }
        for n in per_slot {
            assert!((9_500..10_500).contains(&n), "{per_slot:?}");
        }
    }
}
