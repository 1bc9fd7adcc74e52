//! Maglev consistent hashing: the lookup table every node builds identically.
//!
//! The table follows Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load
//! Balancer" (NSDI 2016), section 3.4: every backend gets a permutation of the `M` table slots
//! from two hashes of its identity, and the backends take turns claiming their next preferred
//! free slot until the table is full. The data path then picks `table[hash(flow) % M]`.
//!
//! Every node must build the same table from the same backends, or a flow that moves between
//! nodes (ECMP rehash, node failure) lands on a different backend. So the hash is `SipHash-2-4`,
//! a fixed, published function implemented here, never `std`'s `DefaultHasher`, whose output
//! may change between Rust releases; and the backends are sorted by identity first, so the
//! order they arrive in does not matter.

use std::fmt::Write as _;

/// The table size the agent uses unless configured otherwise: a prime, and more than 100 times
/// the number of backends a service usually has, which keeps the imbalance under 1%.
pub const DEFAULT_TABLE_SIZE: u32 = 16381;

/// The largest table size allowed: a prime, and the cap that keeps one service's table (4 bytes
/// a slot) at half a megabyte.
pub const MAX_TABLE_SIZE: u32 = 131_071;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MaglevError {
    #[error(
        "Maglev table size {size} is out of range: it must be a prime from 2 to {MAX_TABLE_SIZE} \
         (e.g. {DEFAULT_TABLE_SIZE} or 65537)"
    )]
    SizeOutOfRange { size: u32 },
    #[error(
        "Maglev table size {size} is not prime: it must be a prime from 2 to {MAX_TABLE_SIZE} \
         (e.g. {DEFAULT_TABLE_SIZE} or 65537)"
    )]
    SizeNotPrime { size: u32 },
    #[error(
        "Maglev table size {size} is smaller than the {backends} backends: every backend needs at \
         least one slot, and for an even spread the size should be over 100 times the backends"
    )]
    TooManyBackends { size: u32, backends: usize },
    #[error("backend {identity} is listed twice: each backend identity must appear once")]
    DuplicateBackend { identity: String },
    /// Cannot happen for a prime size (every permutation visits every slot); reported instead of
    /// panicking or handing the data path a table with holes.
    #[error("internal error: the Maglev table was left with {empty} empty slots")]
    Incomplete { empty: usize },
}

/// Trial division: sizes are at most a few hundred thousand, so this is microseconds.
#[must_use]
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    // u64 so that `d * d` cannot overflow near u32::MAX.
    let n = u64::from(n);
    let mut d = 3_u64;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// A prime size is what makes every backend's permutation cover the whole table: any skip in
/// `1..M` is coprime with `M`.
pub fn check_table_size(m: u32) -> Result<(), MaglevError> {
    if !(2..=MAX_TABLE_SIZE).contains(&m) {
        return Err(MaglevError::SizeOutOfRange { size: m });
    }
    if !is_prime(m) {
        return Err(MaglevError::SizeNotPrime { size: m });
    }
    Ok(())
}

/// Builds the lookup table: `m` entries, each an index into `backends`.
///
/// `backends`: one stable identity per backend (the agent passes `"ip:port"` bytes, such as
/// `b"10.244.1.10:8080"`). The same set of identities, `m` and `seed` give the same table on
/// every machine, whatever the order of `backends`. No backends gives an empty table.
pub fn build_table(backends: &[&[u8]], m: u32, seed: u32) -> Result<Vec<u32>, MaglevError> {
    check_table_size(m)?;
    let too_many = || MaglevError::TooManyBackends {
        size: m,
        backends: backends.len(),
    };
    let n = u32::try_from(backends.len()).map_err(|_| too_many())?;
    if n > m {
        return Err(too_many());
    }
    if backends.is_empty() {
        return Ok(Vec::new());
    }

    // The turn order decides who wins a contested slot, so it must depend on the identities
    // only: sort by identity and map back to the caller's indices at the end.
    let mut order: Vec<u32> = (0..n).collect();
    order.sort_unstable_by_key(|&i| backends[i as usize]);
    if let Some(pair) = order
        .windows(2)
        .find(|pair| backends[pair[0] as usize] == backends[pair[1] as usize])
    {
        return Err(MaglevError::DuplicateBackend {
            identity: display_identity(backends[pair[0] as usize]),
        });
    }

    // Backend k's permutation is `(offset + j * skip) % m` for j = 0, 1, ...; `next` holds the
    // slot of the next j it has not tried, advanced by adding `skip`, so the inner loop does no
    // hashing and no multiplication.
    let keys = Keys::new(seed);
    let mut next = Vec::with_capacity(order.len());
    let mut skip = Vec::with_capacity(order.len());
    for &i in &order {
        let identity = backends[i as usize];
        next.push(reduce(keys.offset.hash(identity), m));
        skip.push(reduce(keys.skip.hash(identity), m - 1) + 1);
    }

    let size = m as usize;
    let mut table = vec![0_u32; size];
    let mut filled = vec![false; size];
    let mut remaining = size;
    // Each turn gives every backend exactly one slot (until the table fills mid-turn), so the
    // counts differ by at most one. A turn fills at least one slot, so `m` turns always suffice.
    'turns: for _ in 0..m {
        for (k, &backend) in order.iter().enumerate() {
            // The permutation visits every slot within `m` steps because `m` is prime and
            // `skip` is in `1..m`, and a free slot exists while `remaining > 0`.
            let mut slot = next[k];
            for _ in 0..m {
                if !filled[slot as usize] {
                    break;
                }
                slot = advance(slot, skip[k], m);
            }
            if filled[slot as usize] {
                break 'turns;
            }
            filled[slot as usize] = true;
            table[slot as usize] = backend;
            next[k] = advance(slot, skip[k], m);
            remaining -= 1;
            if remaining == 0 {
                break 'turns;
            }
        }
    }
    if remaining > 0 {
        return Err(MaglevError::Incomplete { empty: remaining });
    }
    Ok(table)
}

/// The fraction of table entries whose backend (by identity) differs between the table built
/// from `old` and the one built from `new`: the share of flows that move. An empty side counts
/// every entry as changed unless both are empty.
pub fn disruption(old: &[&[u8]], new: &[&[u8]], m: u32, seed: u32) -> Result<f64, MaglevError> {
    let old_table = build_table(old, m, seed)?;
    let new_table = build_table(new, m, seed)?;
    let changed = if old_table.is_empty() || new_table.is_empty() {
        if old_table.len() == new_table.len() {
            0
        } else {
            m
        }
    } else {
        let mut changed = 0_u32;
        for (&a, &b) in old_table.iter().zip(&new_table) {
            if old[a as usize] != new[b as usize] {
                changed += 1;
            }
        }
        changed
    };
    Ok(f64::from(changed) / f64::from(m))
}

/// `(slot + skip) % m` without a division; both are below `m`, so the sum is below `2m`.
fn advance(slot: u32, skip: u32, m: u32) -> u32 {
    let next = slot + skip;
    if next >= m { next - m } else { next }
}

/// `h % m`, which is below `m` and so fits `u32`. The bias of reducing a 64-bit hash by a
/// modulus under 2^17 is below 2^-46: irrelevant.
#[allow(clippy::cast_possible_truncation)]
fn reduce(h: u64, m: u32) -> u32 {
    (h % u64::from(m)) as u32
}

/// Identities are `ip:port` text in practice; anything else is shown as escaped bytes.
fn display_identity(identity: &[u8]) -> String {
    let mut out = String::new();
    for chunk in identity.utf8_chunks() {
        out.push_str(chunk.valid());
        for byte in chunk.invalid() {
            let _ = write!(out, "\\x{byte:02x}");
        }
    }
    out
}

/// The two hash keys. Different keys make offset and skip independent (`SipHash` is a keyed
/// pseudo-random function), and putting the seed in both lets an operator reshuffle every table
/// at once. The constants are arbitrary but fixed forever: changing them changes every table.
struct Keys {
    offset: SipHash24,
    skip: SipHash24,
}

impl Keys {
    fn new(seed: u32) -> Self {
        let seed = u64::from(seed);
        Self {
            offset: SipHash24 {
                k0: seed,
                k1: 0x6d61_676c_6576_6f66, // "maglevof"
            },
            skip: SipHash24 {
                k0: seed,
                k1: 0x6d61_676c_6576_736b, // "maglevsk"
            },
        }
    }
}

/// `SipHash-2-4` (Aumasson and Bernstein, 2012) with a 128-bit key `(k0, k1)`, both read as
/// little-endian words, as in the reference implementation. Written out here because its output
/// is fixed by the specification, unlike `std`'s hashers, and checked against the paper's test
/// vector below.
struct SipHash24 {
    k0: u64,
    k1: u64,
}

impl SipHash24 {
    fn hash(&self, message: &[u8]) -> u64 {
        let mut v = [
            self.k0 ^ 0x736f_6d65_7073_6575, // "somepseu"
            self.k1 ^ 0x646f_7261_6e64_6f6d, // "dorandom"
            self.k0 ^ 0x6c79_6765_6e65_7261, // "lygenera"
            self.k1 ^ 0x7465_6462_7974_6573, // "tedbytes"
        ];
        let mut chunks = message.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0_u8; 8];
            word.copy_from_slice(chunk);
            compress(&mut v, u64::from_le_bytes(word));
        }
        // The last word holds the 0-7 leftover bytes and, in the top byte, the message length
        // mod 256, so messages that differ only in trailing zero bytes hash differently.
        let rest = chunks.remainder();
        let mut last = [0_u8; 8];
        last[..rest.len()].copy_from_slice(rest);
        #[allow(clippy::cast_possible_truncation)]
        {
            last[7] = message.len() as u8;
        }
        compress(&mut v, u64::from_le_bytes(last));
        v[2] ^= 0xff;
        for _ in 0..4 {
            sip_round(&mut v);
        }
        v[0] ^ v[1] ^ v[2] ^ v[3]
    }
}

/// Two `SipRound`s per message word: the "2" of `SipHash-2-4`.
fn compress(v: &mut [u64; 4], m: u64) {
    v[3] ^= m;
    sip_round(v);
    sip_round(v);
    v[0] ^= m;
}

fn sip_round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13);
    v[1] ^= v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16);
    v[3] ^= v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21);
    v[3] ^= v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17);
    v[1] ^= v[2];
    v[2] = v[2].rotate_left(32);
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn identities(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| format!("10.244.{}.{}:8080", i / 250, i % 250 + 1).into_bytes())
            .collect()
    }

    fn refs(ids: &[Vec<u8>]) -> Vec<&[u8]> {
        ids.iter().map(Vec::as_slice).collect()
    }

    /// The table with each entry replaced by its backend's identity.
    fn by_identity<'a>(backends: &[&'a [u8]], table: &[u32]) -> Vec<&'a [u8]> {
        table.iter().map(|&i| backends[i as usize]).collect()
    }

    /// A fixed permutation (Fisher-Yates over a linear congruential generator), so the test needs
    /// no random number crate and is reproducible.
    fn shuffled<T: Copy>(items: &[T], mut state: u64) -> Vec<T> {
        let mut out = items.to_vec();
        for i in (1..out.len()).rev() {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let j = usize::try_from((state >> 33) % (i as u64 + 1)).unwrap();
            out.swap(i, j);
        }
        out
    }

    #[test]
    fn siphash_matches_the_reference_vectors() {
        // The paper's appendix: key 00..0f, message 00..0e.
        let key = SipHash24 {
            k0: 0x0706_0504_0302_0100,
            k1: 0x0f0e_0d0c_0b0a_0908,
        };
        let message: Vec<u8> = (0..15).collect();
        assert_eq!(key.hash(&message), 0xa129_ca61_49be_45e5);
        // The reference implementation's vectors.h, messages of length 0 and 8.
        assert_eq!(key.hash(&[]), 0x726f_db47_dd0e_0e31);
        let message: Vec<u8> = (0..8).collect();
        assert_eq!(key.hash(&message), 0x93f5_f579_9a93_2462);
    }

    #[test]
    #[allow(deprecated)]
    fn siphash_matches_std_siphasher() {
        // `std::hash::SipHasher` is documented as SipHash-2-4; it cross-checks every length
        // around the 8-byte word boundaries.
        use std::hash::Hasher as _;
        let data: Vec<u8> = (0_u8..40).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
        for len in 0..data.len() {
            let ours = SipHash24 {
                k0: 0x0123_4567_89ab_cdef,
                k1: 0xfedc_ba98_7654_3210,
            }
            .hash(&data[..len]);
            let mut theirs =
                std::hash::SipHasher::new_with_keys(0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210);
            theirs.write(&data[..len]);
            assert_eq!(ours, theirs.finish(), "length {len}");
        }
    }

    #[test]
    fn primes() {
        let primes: Vec<u32> = (0..40).filter(|&n| is_prime(n)).collect();
        assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37]);
        assert!(is_prime(DEFAULT_TABLE_SIZE));
        assert!(is_prime(65537));
        assert!(is_prime(MAX_TABLE_SIZE));
        assert!(!is_prime(65535));
        assert!(is_prime(4_294_967_291)); // The largest u32 prime: no overflow in `d * d`.
        assert!(!is_prime(u32::MAX));
    }

    #[test]
    fn table_sizes() {
        assert_eq!(check_table_size(2), Ok(()));
        assert_eq!(check_table_size(DEFAULT_TABLE_SIZE), Ok(()));
        assert_eq!(check_table_size(MAX_TABLE_SIZE), Ok(()));
        assert_eq!(
            check_table_size(0),
            Err(MaglevError::SizeOutOfRange { size: 0 })
        );
        assert_eq!(
            check_table_size(1),
            Err(MaglevError::SizeOutOfRange { size: 1 })
        );
        assert_eq!(
            check_table_size(16384),
            Err(MaglevError::SizeNotPrime { size: 16384 })
        );
        // 131101 is prime but above the cap.
        assert!(is_prime(131_101));
        let err = check_table_size(131_101).unwrap_err();
        assert_eq!(err, MaglevError::SizeOutOfRange { size: 131_101 });
        assert!(err.to_string().contains("prime from 2 to 131071"), "{err}");
    }

    #[test]
    fn balance() {
        for (n, m) in [
            (1, 7),
            (3, DEFAULT_TABLE_SIZE),
            (10, DEFAULT_TABLE_SIZE),
            (100, DEFAULT_TABLE_SIZE),
            (100, 65537),
            (1000, 65537),
            (7, 7),
        ] {
            let ids = identities(n);
            let backends = refs(&ids);
            let table = build_table(&backends, m, 0).unwrap();
            assert_eq!(table.len(), m as usize);
            let mut counts = vec![0_u32; n];
            for &b in &table {
                counts[b as usize] += 1;
            }
            let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            eprintln!("balance N={n} M={m}: entries per backend {min}..={max}");
            assert!(max - min <= 1, "N={n} M={m}: {min}..={max}");
        }
    }

    #[test]
    fn disruption_when_one_backend_leaves_or_joins() {
        let m = 65537;
        let ids = identities(101);
        let all = refs(&ids);
        let hundred = &all[..100];
        let removed: Vec<&[u8]> = hundred
            .iter()
            .copied()
            .filter(|&b| b != hundred[42])
            .collect();

        let remove = disruption(hundred, &removed, m, 0).unwrap();
        eprintln!(
            "disruption N=100 M={m}, one removed: {:.3}% (its own share is 1%)",
            remove * 100.0
        );
        assert!((0.010..=0.025).contains(&remove), "{remove}");

        let add = disruption(hundred, &all, m, 0).unwrap();
        eprintln!(
            "disruption N=100 M={m}, one added: {:.3}% (its own share is 0.99%)",
            add * 100.0
        );
        assert!((0.0099..=0.025).contains(&add), "{add}");

        // Nothing changes, nothing moves.
        assert!(disruption(hundred, hundred, m, 0).unwrap().abs() < f64::EPSILON);
    }

    #[test]
    fn determinism() {
        let m = DEFAULT_TABLE_SIZE;
        let ids = identities(50);
        let backends = refs(&ids);
        let reordered = shuffled(&backends, 7);
        assert_ne!(backends, reordered);

        let a = build_table(&backends, m, 0).unwrap();
        let b = build_table(&reordered, m, 0).unwrap();
        assert_eq!(by_identity(&backends, &a), by_identity(&reordered, &b));
        assert_eq!(a, build_table(&backends, m, 0).unwrap());

        let other_seed = build_table(&backends, m, 1).unwrap();
        let differ = a.iter().zip(&other_seed).filter(|(x, y)| x != y).count();
        assert!(differ > m as usize / 2, "only {differ} entries differ");
    }

    #[test]
    fn table_is_pinned_across_machines_and_versions() {
        // Any change to the hash, the keys, the sort or the fill changes this, and with it every
        // node's table: then nodes running different agent versions disagree mid-upgrade.
        let backends: [&[u8]; 3] = [
            b"10.244.1.10:8080",
            b"10.244.2.11:8080",
            b"10.244.3.12:8080",
        ];
        assert_eq!(
            build_table(&backends, 13, 0).unwrap(),
            [2, 0, 1, 2, 1, 0, 0, 1, 2, 1, 0, 2, 0]
        );
        // And a shuffled caller slice gets the same identities in every slot.
        let reordered = [backends[2], backends[0], backends[1]];
        let table = build_table(&reordered, 13, 0).unwrap();
        assert_eq!(
            by_identity(&reordered, &table),
            by_identity(&backends, &[2, 0, 1, 2, 1, 0, 0, 1, 2, 1, 0, 2, 0])
        );
    }

    #[test]
    fn edge_cases() {
        assert_eq!(build_table(&[], DEFAULT_TABLE_SIZE, 0), Ok(Vec::new()));

        let one: [&[u8]; 1] = [b"10.244.1.10:8080"];
        let table = build_table(&one, DEFAULT_TABLE_SIZE, 9).unwrap();
        assert_eq!(table.len(), DEFAULT_TABLE_SIZE as usize);
        assert!(table.iter().all(|&b| b == 0));

        let two: [&[u8]; 2] = [b"a", b"b"];
        let mut table = build_table(&two, 2, 0).unwrap();
        table.sort_unstable();
        assert_eq!(table, [0, 1]);
        assert_eq!(build_table(&one, 2, 0), Ok(vec![0, 0]));

        assert_eq!(
            build_table(&two, 16, 0),
            Err(MaglevError::SizeNotPrime { size: 16 })
        );
        assert_eq!(
            build_table(&one, 0, 0),
            Err(MaglevError::SizeOutOfRange { size: 0 })
        );
        let ids = identities(5);
        assert_eq!(
            build_table(&refs(&ids), 3, 0),
            Err(MaglevError::TooManyBackends {
                size: 3,
                backends: 5
            })
        );
        let duplicated: [&[u8]; 3] = [b"10.0.0.1:80", b"10.0.0.2:80", b"10.0.0.1:80"];
        assert_eq!(
            build_table(&duplicated, 7, 0),
            Err(MaglevError::DuplicateBackend {
                identity: "10.0.0.1:80".to_owned()
            })
        );
        assert_eq!(display_identity(b"a\xffb"), "a\\xffb");
        assert!((disruption(&[], &one, 7, 0).unwrap() - 1.0).abs() < f64::EPSILON);
        assert!(disruption(&[], &[], 7, 0).unwrap().abs() < f64::EPSILON);
    }

    #[test]
    fn build_time() {
        let ids = identities(1000);
        let backends = refs(&ids);
        let start = Instant::now();
        let table = build_table(&backends, 65537, 0).unwrap();
        eprintln!(
            "build M=65537 N=1000: {:?} ({} entries)",
            start.elapsed(),
            table.len()
        );
    }
}
