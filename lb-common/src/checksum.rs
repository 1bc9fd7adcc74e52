//! Internet checksum arithmetic (RFC 1071), with the incremental update of RFC 1624.
//!
//! The data path rewrites a destination address and port and must fix the IPv4 header checksum
//! and the TCP/UDP checksum without summing the payload. All words are taken in the packet's own
//! byte order (read as native integers): the ones' complement sum is independent of byte order as
//! long as every operand uses the same one, so no swapping is needed.

/// Folds a 32-bit ones' complement accumulator into 16 bits.
#[must_use]
#[inline(always)]
pub const fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    #[expect(
        clippy::cast_possible_truncation,
        reason = "folded twice: fits in 16 bits"
    )]
    let folded = sum as u16;
    folded
}

/// The sum of every replaced word's change, applied to each checksum that covers those words.
///
/// RFC 1624 eqn. 3: `HC' = ~(~HC + ~m + m')`. One delta serves both the IPv4 header checksum
/// (addresses) and the L4 checksum (addresses through the pseudo-header, plus ports).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delta(u32);

impl Delta {
    #[must_use]
    #[inline(always)]
    pub const fn new() -> Self {
        Delta(0)
    }

    /// Records that a 16-bit word changed from `old` to `new`.
    #[must_use]
    #[inline(always)]
    pub const fn replace_u16(self, old: u16, new: u16) -> Self {
        // Each step adds at most 0x1fffe; fold keeps the accumulator far from overflow.
        Delta(fold(self.0 + (!old as u32) + new as u32) as u32)
    }

    /// Records that a 32-bit field (two words) changed from `old` to `new`.
    #[must_use]
    #[inline(always)]
    pub const fn replace_u32(self, old: u32, new: u32) -> Self {
        #[expect(
            clippy::cast_possible_truncation,
            reason = "splitting into 16-bit words"
        )]
        let this = self
            .replace_u16(old as u16, new as u16)
            .replace_u16((old >> 16) as u16, (new >> 16) as u16);
        this
    }

    /// The checksum `check` after the recorded changes.
    #[must_use]
    #[inline(always)]
    pub const fn apply(self, check: u16) -> u16 {
        !fold((!check) as u32 + self.0)
    }

    /// Like [`Delta::apply`] for a UDP checksum, where 0 means "no checksum" (RFC 768): a zero
    /// checksum stays zero, and a computed zero is sent as all ones.
    #[must_use]
    #[inline(always)]
    pub const fn apply_udp(self, check: u16) -> u16 {
        if check == 0 {
            return 0;
        }
        match self.apply(check) {
            0 => 0xffff,
            c => c,
        }
    }
}

/// The full RFC 1071 checksum of `data` in network byte order, continuing from `initial`.
/// Used by tests and the agent to build and check frames, never on the packet path.
#[must_use]
pub fn sum_be(initial: u32, data: &[u8]) -> u32 {
    let mut sum = u64::from(initial);
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    while sum >> 32 != 0 {
        sum = (sum & 0xffff_ffff) + (sum >> 32);
    }
    #[expect(clippy::cast_possible_truncation, reason = "folded above")]
    let sum = sum as u32;
    sum
}

/// `!fold(sum_be(0, data))`: the value to store in a checksum field, big-endian.
#[must_use]
pub fn checksum_be(data: &[u8]) -> u16 {
    !fold(sum_be(0, data))
}

/// The TCP/UDP checksum over the IPv4 pseudo-header and `segment` (whose checksum field must be
/// zero), big-endian.
#[must_use]
pub fn l4_checksum_be(src: [u8; 4], dst: [u8; 4], protocol: u8, segment: &[u8]) -> u16 {
    let len = u16::try_from(segment.len())
        .unwrap_or(u16::MAX)
        .to_be_bytes();
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&src);
    pseudo[4..8].copy_from_slice(&dst);
    pseudo[9] = protocol;
    pseudo[10..12].copy_from_slice(&len);
    !fold(sum_be(sum_be(0, &pseudo), segment))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic byte stream (xorshift) so the tests cover many values without a crate.
    fn bytes(seed: u64, n: usize) -> impl Iterator<Item = u8> {
        let mut x = seed | 1;
        (0..n).map(move |_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[3]
        })
    }

    fn ne_u32(b: &[u8]) -> u32 {
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
    }

    fn ne_u16(b: &[u8]) -> u16 {
        u16::from_ne_bytes([b[0], b[1]])
    }

    /// Rewrites destination address and port of a UDP/TCP-like segment incrementally, exactly as
    /// the data path does, and compares with a full recomputation.
    #[test]
    fn incremental_matches_full_recomputation() {
        for seed in 1..2_000u64 {
            let mut rnd = bytes(seed, 64);
            let mut next = || rnd.next().unwrap_or(0);
            let src = [next(), next(), next(), next()];
            let old_dst = [next(), next(), next(), next()];
            let new_dst = [next(), next(), next(), next()];
            let new_port = [next(), next()];
            // 8-byte header: sport, dport, len, check; then an odd-length payload.
            let mut seg: std::vec::Vec<u8> =
                (0..8 + (seed % 23) as usize).map(|_| next()).collect();
            seg[6] = 0;
            seg[7] = 0;
            let full_old = l4_checksum_be(src, old_dst, 6, &seg);
            seg[6..8].copy_from_slice(&full_old.to_be_bytes());

            let old_port = [seg[2], seg[3]];
            let delta = Delta::new()
                .replace_u32(ne_u32(&old_dst), ne_u32(&new_dst))
                .replace_u16(ne_u16(&old_port), ne_u16(&new_port));
            let incremental = delta.apply(ne_u16(&seg[6..8]));

            seg[2..4].copy_from_slice(&new_port);
            seg[6] = 0;
            seg[7] = 0;
            let full_new = l4_checksum_be(src, new_dst, 6, &seg);
            // 0x0000 and 0xffff are the same ones' complement number.
            let norm = |c: u16| if c == 0xffff { 0 } else { c };
            assert_eq!(
                norm(u16::from_be(incremental)),
                norm(full_new),
                "seed {seed}"
            );
        }
    }

    #[test]
    fn ipv4_header_checksum_verifies_to_zero() {
        let mut hdr = [
            0x45, 0, 0, 0x54, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        let c = checksum_be(&hdr);
        hdr[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(checksum_be(&hdr), 0);
        // Rewrite the destination incrementally; the header must still verify.
        let old = ne_u32(&hdr[16..20]);
        let new = u32::from_ne_bytes([10, 244, 1, 10]);
        let check = Delta::new()
            .replace_u32(old, new)
            .apply(ne_u16(&hdr[10..12]));
        hdr[16..20].copy_from_slice(&[10, 244, 1, 10]);
        hdr[10..12].copy_from_slice(&check.to_ne_bytes());
        assert_eq!(checksum_be(&hdr), 0);
    }

    #[test]
    fn udp_zero_checksum_stays_zero_and_zero_result_becomes_ffff() {
        let d = Delta::new().replace_u16(1, 2);
        assert_eq!(d.apply_udp(0), 0);
        // Choose a checksum whose update yields 0: apply(c) == 0 <=> c == apply^-1(0).
        let mut found = false;
        for c in 1..=u16::MAX {
            if d.apply(c) == 0 {
                assert_eq!(d.apply_udp(c), 0xffff);
                found = true;
            }
        }
        assert!(found);
    }
}
