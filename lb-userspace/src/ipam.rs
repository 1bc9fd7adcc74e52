//! Addresses for `type: LoadBalancer` Services on bare metal, where no cloud gives them one.
//!
//! The pools come from the settings (`loadBalancerIPPools`). The same function decides for both
//! config sources: for the files, every agent runs it on the same input and so serves the same
//! addresses; with the Kubernetes API, only the agent holding the lease runs it and writes the
//! result to `status.loadBalancer.ingress`, which every agent then serves.
//!
//! Rules, in order, so an address once given is never taken away by a later Service:
//! 1. a Service that asks for addresses (`spec.loadBalancerIP` or the
//!    `lb-agent.io/load-balancer-ips` annotation) gets exactly those, if each is in a pool (the
//!    one it names, if any) and no other Service holds it; otherwise it gets none and a
//!    conflict is reported;
//! 2. a Service that already holds an address of the pool (its status) keeps it, unless an
//!    earlier Service holds it;
//! 3. any other gets one free address of its pool (the one named by the
//!    `lb-agent.io/address-pool` annotation, else the first pool with a free address). The
//!    search starts at a hash of the Service's namespace and name, so the same Services give the
//!    same addresses whatever the order they are listed in.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

/// The annotation by which a Service asks for addresses (comma-separated).
pub const REQUESTED_IPS_ANNOTATION: &str = "lb-agent.io/load-balancer-ips";
/// The annotation that names the pool a Service's address comes from.
pub const POOL_ANNOTATION: &str = "lb-agent.io/address-pool";
/// The `spec.loadBalancerClass` lb-agent answers to (besides none).
pub const LOAD_BALANCER_CLASS: &str = "lb-agent.io/lb";

/// A named set of addresses: CIDRs and `first-last` ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    /// Inclusive ranges, as written.
    pub ranges: Vec<(Ipv4Addr, Ipv4Addr)>,
}

impl Pool {
    #[must_use]
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        self.ranges
            .iter()
            .any(|&(first, last)| (first..=last).contains(&addr))
    }

    /// How many addresses the pool has.
    #[must_use]
    pub fn size(&self) -> u64 {
        self.ranges
            .iter()
            .map(|&(first, last)| u64::from(u32::from(last) - u32::from(first)) + 1)
            .sum()
    }

    /// The `index`th address (modulo the size).
    fn nth(&self, index: u64) -> Option<Ipv4Addr> {
        let mut index = index.checked_rem(self.size())?;
        for &(first, last) in &self.ranges {
            let len = u64::from(u32::from(last) - u32::from(first)) + 1;
            if index < len {
                return u32::try_from(index)
                    .ok()
                    .map(|i| Ipv4Addr::from(u32::from(first) + i));
            }
            index -= len;
        }
        None
    }
}

/// `a, b, c`: addresses as logs and Events list them.
#[must_use]
pub fn join_addrs(addrs: &[Ipv4Addr]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parses one pool entry: `192.0.2.0/28`, `192.0.2.10-192.0.2.20` or one address.
pub fn parse_range(text: &str) -> Result<(Ipv4Addr, Ipv4Addr), String> {
    let text = text.trim();
    let bad = || {
        format!(
            "{text:?} is not an IPv4 CIDR (192.0.2.0/28), range (192.0.2.10-192.0.2.20) or address"
        )
    };
    if let Some((first, last)) = text.split_once('-') {
        let first: Ipv4Addr = first.trim().parse().map_err(|_| bad())?;
        let last: Ipv4Addr = last.trim().parse().map_err(|_| bad())?;
        if last < first {
            return Err(format!("{text:?}: the range ends before it starts"));
        }
        return Ok((first, last));
    }
    if let Some((addr, len)) = text.split_once('/') {
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let len: u32 = len.parse().ok().filter(|l| *l <= 32).ok_or_else(bad)?;
        let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
        let first = u32::from(addr) & mask;
        if first != u32::from(addr) {
            return Err(format!(
                "{text:?} has host bits set; write {}/{len}",
                Ipv4Addr::from(first)
            ));
        }
        return Ok((Ipv4Addr::from(first), Ipv4Addr::from(first | !mask)));
    }
    let addr: Ipv4Addr = text.parse().map_err(|_| bad())?;
    Ok((addr, addr))
}

/// What one `type: LoadBalancer` Service wants and has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// `namespace/name`.
    pub service: String,
    /// Asked for by `spec.loadBalancerIP` or the annotation; empty: any.
    pub requested: Vec<Ipv4Addr>,
    /// The pool named by the annotation.
    pub pool: Option<String>,
    /// What its status holds now.
    pub current: Vec<Ipv4Addr>,
}

/// What a Service gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// These addresses, from this pool.
    Addresses { pool: String, addrs: Vec<Ipv4Addr> },
    /// None, and why: reported on the Service.
    Conflict(String),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Addresses { pool, addrs } => {
                write!(f, "{} from pool {pool}", join_addrs(addrs))
            }
            Outcome::Conflict(why) => f.write_str(why),
        }
    }
}

/// Decides every claim at once (see the module's rules). Keyed by `Claim::service`.
#[must_use]
pub fn allocate(pools: &[Pool], claims: &[Claim]) -> BTreeMap<String, Outcome> {
    let mut ordered: Vec<&Claim> = claims.iter().collect();
    ordered.sort_by(|a, b| a.service.cmp(&b.service));
    let mut taken: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    let mut outcomes = BTreeMap::new();
    // Held addresses first, so no later request takes them away: a Service keeps what it
    // holds if that still fits what it asks for.
    for claim in &ordered {
        let Ok(candidates) = candidate_pools(pools, claim) else {
            continue;
        };
        let wanted: Vec<Ipv4Addr> = if claim.requested.is_empty() {
            claim.current.iter().take(1).copied().collect()
        } else {
            claim.requested.clone()
        };
        let held = !wanted.is_empty()
            && wanted.iter().all(|addr| claim.current.contains(addr))
            && wanted.iter().all(|addr| !taken.contains_key(addr));
        if let Some(pool) = held.then(|| pool_of(&candidates, &wanted)).flatten() {
            let outcome = Outcome::Addresses {
                pool: pool.name.clone(),
                addrs: wanted,
            };
            give(claim, outcome, &mut taken, &mut outcomes);
        }
    }
    // Then requests, then a free address for the rest, each in name order.
    for asks in [true, false] {
        for claim in &ordered {
            if outcomes.contains_key(&claim.service) || claim.requested.is_empty() == asks {
                continue;
            }
            let outcome = match candidate_pools(pools, claim) {
                Err(why) => Outcome::Conflict(why),
                Ok(candidates) if asks => requested_outcome(&candidates, claim, &taken),
                Ok(candidates) => free_outcome(&candidates, claim, &taken),
            };
            give(claim, outcome, &mut taken, &mut outcomes);
        }
    }
    outcomes
}

/// Records an outcome, and the addresses it takes.
fn give(
    claim: &Claim,
    outcome: Outcome,
    taken: &mut BTreeMap<Ipv4Addr, String>,
    outcomes: &mut BTreeMap<String, Outcome>,
) {
    if let Outcome::Addresses { addrs, .. } = &outcome {
        for addr in addrs {
            taken.insert(*addr, claim.service.clone());
        }
    }
    outcomes.insert(claim.service.clone(), outcome);
}

/// The pools a claim may draw from: the one it names, or all.
fn candidate_pools<'a>(pools: &'a [Pool], claim: &Claim) -> Result<Vec<&'a Pool>, String> {
    match &claim.pool {
        None => Ok(pools.iter().collect()),
        Some(name) => pools
            .iter()
            .find(|p| &p.name == name)
            .map(|p| vec![p])
            .ok_or_else(|| format!("{POOL_ANNOTATION}: no address pool is named {name:?}")),
    }
}

/// The pool holding the first of `addrs`, if every one is in some candidate pool.
fn pool_of<'a>(candidates: &[&'a Pool], addrs: &[Ipv4Addr]) -> Option<&'a Pool> {
    if !addrs
        .iter()
        .all(|&a| candidates.iter().any(|p| p.contains(a)))
    {
        return None;
    }
    candidates.iter().copied().find(|p| p.contains(addrs[0]))
}

fn requested_outcome(
    candidates: &[&Pool],
    claim: &Claim,
    taken: &BTreeMap<Ipv4Addr, String>,
) -> Outcome {
    for addr in &claim.requested {
        if !candidates.iter().any(|p| p.contains(*addr)) {
            return Outcome::Conflict(format!("requested address {addr} is in no address pool"));
        }
        if let Some(holder) = taken.get(addr) {
            return Outcome::Conflict(format!(
                "requested address {addr} is already used by Service {holder}"
            ));
        }
    }
    match pool_of(candidates, &claim.requested) {
        Some(pool) => Outcome::Addresses {
            pool: pool.name.clone(),
            addrs: claim.requested.clone(),
        },
        None => Outcome::Conflict("requested addresses are in no address pool".to_owned()),
    }
}

fn free_outcome(
    candidates: &[&Pool],
    claim: &Claim,
    taken: &BTreeMap<Ipv4Addr, String>,
) -> Outcome {
    for pool in candidates {
        if let Some(addr) = free_address(pool, &claim.service, taken) {
            return Outcome::Addresses {
                pool: pool.name.clone(),
                addrs: vec![addr],
            };
        }
    }
    if candidates.is_empty() {
        return Outcome::Conflict("no address pool is configured".to_owned());
    }
    let names: Vec<&str> = candidates.iter().map(|p| p.name.as_str()).collect();
    Outcome::Conflict(format!("no free address in pool {}", names.join(", ")))
}

/// The first free address of `pool` from a start given by the Service's name.
fn free_address(
    pool: &Pool,
    service: &str,
    taken: &BTreeMap<Ipv4Addr, String>,
) -> Option<Ipv4Addr> {
    let size = pool.size();
    let start = u64::from(crate::config::stable_hash(service));
    // At most one step more than the addresses taken: bounded whatever the pool's size.
    let steps = size.min(taken.len() as u64 + 1);
    (0..steps)
        .filter_map(|i| pool.nth(start.wrapping_add(i)))
        .find(|addr| !taken.contains_key(addr))
}

/// One of the settings' `loadBalancerIPPools`, as written.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolSettings {
    pub name: String,
    /// CIDRs (`192.0.2.0/28`), ranges (`192.0.2.10-192.0.2.20`) or single addresses.
    pub addresses: Vec<String>,
}

/// Checks the pools: names unique and not empty, every entry parsed, no address in two pools.
/// The problems are (field under `loadBalancerIPPools`, message).
pub fn check_pools(pools: &[PoolSettings]) -> Result<Vec<Pool>, Vec<(String, String)>> {
    let mut problems = Vec::new();
    let mut parsed = Vec::new();
    let mut names = BTreeSet::new();
    for (i, PoolSettings { name, addresses }) in pools.iter().enumerate() {
        let field = format!("loadBalancerIPPools[{i}]");
        if name.is_empty() {
            problems.push((
                format!("{field}.name"),
                "missing; every pool needs a name".to_owned(),
            ));
        } else if !names.insert(name.clone()) {
            problems.push((format!("{field}.name"), format!("{name:?} is used twice")));
        }
        if addresses.is_empty() {
            problems.push((
                format!("{field}.addresses"),
                "empty; list CIDRs or first-last ranges".to_owned(),
            ));
        }
        let mut ranges = Vec::new();
        for (j, text) in addresses.iter().enumerate() {
            match parse_range(text) {
                Ok(range) => ranges.push(range),
                Err(why) => problems.push((format!("{field}.addresses[{j}]"), why)),
            }
        }
        parsed.push(Pool {
            name: name.clone(),
            ranges,
        });
    }
    for (i, a) in parsed.iter().enumerate() {
        for b in &parsed[i + 1..] {
            for &(first, last) in &a.ranges {
                if let Some(&(f, l)) = b.ranges.iter().find(|&&(f, l)| f <= last && first <= l) {
                    problems.push((
                        format!("loadBalancerIPPools[{i}].addresses"),
                        format!(
                            "{first}-{last} overlaps {f}-{l} of pool {:?}; an address belongs to \
                             one pool",
                            b.name
                        ),
                    ));
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(parsed)
    } else {
        Err(problems)
    }
}

/// The addresses a Service asks for: the annotation wins over `spec.loadBalancerIP`.
pub fn requested_addresses(
    annotation: Option<&str>,
    load_balancer_ip: Option<&str>,
) -> Result<Vec<Ipv4Addr>, String> {
    let (text, field) = match (annotation, load_balancer_ip) {
        (Some(text), _) => (text, REQUESTED_IPS_ANNOTATION),
        (None, Some(text)) => (text, "spec.loadBalancerIP"),
        (None, None) => return Ok(Vec::new()),
    };
    text.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<Ipv4Addr>()
                .map_err(|_| format!("{field}: {t:?} is not an IPv4 address"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(name: &str, ranges: &[&str]) -> Pool {
        Pool {
            name: name.to_owned(),
            ranges: ranges.iter().map(|r| parse_range(r).unwrap()).collect(),
        }
    }

    fn claim(service: &str) -> Claim {
        Claim {
            service: service.to_owned(),
            requested: Vec::new(),
            pool: None,
            current: Vec::new(),
        }
    }

    fn addrs(outcome: &Outcome) -> Vec<Ipv4Addr> {
        match outcome {
            Outcome::Addresses { addrs, .. } => addrs.clone(),
            Outcome::Conflict(why) => panic!("conflict: {why}"),
        }
    }

    #[test]
    fn ranges_parse_as_written() {
        assert_eq!(
            parse_range("192.0.2.0/30").unwrap(),
            ("192.0.2.0".parse().unwrap(), "192.0.2.3".parse().unwrap())
        );
        assert_eq!(
            parse_range("192.0.2.10 - 192.0.2.12").unwrap(),
            ("192.0.2.10".parse().unwrap(), "192.0.2.12".parse().unwrap())
        );
        assert_eq!(pool("p", &["192.0.2.7"]).size(), 1);
        assert!(
            parse_range("192.0.2.1/30")
                .unwrap_err()
                .contains("192.0.2.0/30")
        );
        assert!(parse_range("192.0.2.9-192.0.2.1").is_err());
        assert!(parse_range("10.0.0.0/33").is_err());
        assert!(parse_range("pool").is_err());
    }

    #[test]
    fn allocation_is_the_same_whatever_the_order() {
        let pools = [pool("default", &["192.0.2.0/28"])];
        let claims: Vec<Claim> = (0..10).map(|i| claim(&format!("ns/svc-{i}"))).collect();
        let forward = allocate(&pools, &claims);
        let mut reversed = claims.clone();
        reversed.reverse();
        assert_eq!(forward, allocate(&pools, &reversed));
        let all: BTreeSet<Ipv4Addr> = forward.values().flat_map(addrs).collect();
        assert_eq!(all.len(), 10, "every Service its own address");
        assert!(all.iter().all(|a| pools[0].contains(*a)));
    }

    #[test]
    fn held_addresses_are_kept_and_requests_are_honoured_or_refused() {
        let pools = [
            pool("a", &["192.0.2.1-192.0.2.2"]),
            pool("b", &["198.51.100.0/31"]),
        ];
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let mut holder = claim("ns/zz-holder");
        holder.current = vec![ip("192.0.2.1")];
        let mut asks_free = claim("ns/asks");
        asks_free.requested = vec![ip("198.51.100.1")];
        let mut asks_taken = claim("ns/asks-taken");
        asks_taken.requested = vec![ip("198.51.100.1")];
        let mut outside = claim("ns/outside");
        outside.requested = vec![ip("203.0.113.1")];
        let mut in_b = claim("ns/in-b");
        in_b.pool = Some("b".to_owned());
        let mut wants_held = claim("ns/aa-wants-held");
        wants_held.requested = vec![ip("192.0.2.1")];
        let mut unknown_pool = claim("ns/unknown-pool");
        unknown_pool.pool = Some("c".to_owned());
        let out = allocate(
            &pools,
            &[
                holder,
                wants_held,
                asks_free,
                asks_taken,
                outside,
                in_b,
                unknown_pool,
                claim("ns/any"),
            ],
        );
        assert_eq!(addrs(&out["ns/zz-holder"]), [ip("192.0.2.1")]);
        assert!(
            matches!(&out["ns/aa-wants-held"], Outcome::Conflict(w) if w.contains("ns/zz-holder")),
            "an address held is not taken away by a request"
        );
        assert_eq!(addrs(&out["ns/asks"]), [ip("198.51.100.1")]);
        assert!(matches!(&out["ns/asks-taken"], Outcome::Conflict(w) if w.contains("ns/asks")));
        assert!(
            matches!(&out["ns/outside"], Outcome::Conflict(w) if w.contains("no address pool"))
        );
        assert_eq!(addrs(&out["ns/in-b"]), [ip("198.51.100.0")]);
        assert!(matches!(&out["ns/unknown-pool"], Outcome::Conflict(w) if w.contains("\"c\"")));
        assert_eq!(addrs(&out["ns/any"]), [ip("192.0.2.2")]);
        // The pools are full now: one more gets a conflict, not someone else's address.
        let mut more: Vec<Claim> = ["ns/zz-holder", "ns/asks", "ns/in-b", "ns/any"]
            .iter()
            .map(|s| {
                let mut c = claim(s);
                c.current = addrs(&out[*s]);
                c
            })
            .collect();
        more.push(claim("ns/late"));
        let again = allocate(&pools, &more);
        assert!(matches!(&again["ns/late"], Outcome::Conflict(w) if w.contains("no free address")));
        for s in ["ns/zz-holder", "ns/asks", "ns/in-b", "ns/any"] {
            assert_eq!(again[s], out[s], "{s} keeps its address");
        }
    }

    #[test]
    fn pools_are_checked() {
        let settings = |name: &str, addresses: &[&str]| PoolSettings {
            name: name.to_owned(),
            addresses: addresses.iter().map(|a| (*a).to_owned()).collect(),
        };
        let problems = check_pools(&[
            settings("a", &["192.0.2.0/29"]),
            settings("a", &["192.0.2.4-192.0.2.9", "x"]),
            settings("", &[]),
        ])
        .unwrap_err();
        let text = format!("{problems:?}");
        assert!(text.contains("used twice"), "{text}");
        assert!(text.contains("addresses[1]"), "{text}");
        assert!(text.contains("overlaps"), "{text}");
        assert!(text.contains("[2].name"), "{text}");
        assert!(text.contains("[2].addresses"), "{text}");
    }

    #[test]
    fn requests_come_from_the_annotation_first() {
        assert_eq!(
            requested_addresses(Some("192.0.2.1, 192.0.2.2"), Some("192.0.2.9")).unwrap(),
            [
                "192.0.2.1".parse::<Ipv4Addr>().unwrap(),
                "192.0.2.2".parse().unwrap()
            ]
        );
        assert!(
            requested_addresses(None, Some("nope"))
                .unwrap_err()
                .contains("loadBalancerIP")
        );
        assert!(requested_addresses(None, None).unwrap().is_empty());
    }
}
