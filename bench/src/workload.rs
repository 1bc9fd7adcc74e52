//! The Services the benchmark serves, written three ways: as the manifests `lb-agent` reads,
//! as kube-proxy's iptables rules, and as kube-proxy's nftables ruleset.
//!
//! Service `i` (0-based) is `bench/svc-<i>`, UDP port 80 on clusterIP `10.96.0.0 + i + 1`, with
//! `endpoints` endpoints on port 8080 at `10.2.0.0 + i * endpoints + j + 1` (routed to the sink
//! in the live topology).

use std::{fmt::Write as _, net::Ipv4Addr};

pub const SERVICE_PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;
pub const NODE_NAME: &str = "bench-node";

#[must_use]
pub fn vip(i: usize) -> Ipv4Addr {
    let base = u32::from(Ipv4Addr::new(10, 96, 0, 0));
    Ipv4Addr::from(base + u32::try_from(i + 1).unwrap_or(u32::MAX))
}

#[must_use]
pub fn endpoint(i: usize, j: usize, endpoints: usize) -> Ipv4Addr {
    let base = u32::from(Ipv4Addr::new(10, 2, 0, 0));
    Ipv4Addr::from(base + u32::try_from(i * endpoints + j + 1).unwrap_or(u32::MAX))
}

/// An endpoint address outside every Service's set (for endpoint changes), by generation.
#[must_use]
pub fn spare_endpoint(generation: usize) -> Ipv4Addr {
    let base = u32::from(Ipv4Addr::new(10, 3, 240, 0));
    Ipv4Addr::from(base + u32::try_from(generation % 4000 + 1).unwrap_or(1))
}

/// `count` Services with `endpoints` endpoints each; `overrides` replaces endpoint `(i, j)`.
pub struct Workload {
    pub count: usize,
    pub endpoints: usize,
    pub overrides: Vec<((usize, usize), Ipv4Addr)>,
}

impl Workload {
    #[must_use]
    pub fn new(count: usize, endpoints: usize) -> Self {
        Workload {
            count,
            endpoints,
            overrides: Vec::new(),
        }
    }

    #[must_use]
    pub fn endpoint(&self, i: usize, j: usize) -> Ipv4Addr {
        self.overrides
            .iter()
            .rev()
            .find(|(at, _)| *at == (i, j))
            .map_or_else(|| endpoint(i, j, self.endpoints), |&(_, addr)| addr)
    }

    /// The manifests: an `AgentSettings` document, then a Service and an `EndpointSlice` each.
    #[must_use]
    pub fn yaml(&self, table_size: u32) -> String {
        let mut out = String::with_capacity(self.count * 700);
        let _ = write!(
            out,
            "apiVersion: lb-agent/v1alpha1\nkind: AgentSettings\nmaxTables: {}\nmaglev:\n  \
             tableSize: {table_size}\n",
            self.count.max(1)
        );
        for i in 0..self.count {
            let _ = write!(
                out,
                "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{i}\n  namespace: \
                 bench\nspec:\n  type: ClusterIP\n  clusterIP: {}\n  ports:\n    - name: p\n      \
                 protocol: UDP\n      port: {SERVICE_PORT}\n      targetPort: {TARGET_PORT}\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: \
                 svc-{i}-x\n  namespace: bench\n  labels:\n    kubernetes.io/service-name: \
                 svc-{i}\naddressType: IPv4\nports:\n  - name: p\n    protocol: UDP\n    port: \
                 {TARGET_PORT}\nendpoints:\n",
                vip(i)
            );
            for j in 0..self.endpoints {
                let _ = write!(
                    out,
                    "  - addresses: [{}]\n    conditions: {{ready: true}}\n    nodeName: \
                     {NODE_NAME}\n",
                    self.endpoint(i, j)
                );
            }
        }
        out
    }

    fn svc_chain(i: usize) -> String {
        format!("KUBE-SVC-{i:06}")
    }

    fn sep_chain(i: usize, j: usize, generation: usize) -> String {
        format!("KUBE-SEP-{i:06}-{j}-{generation}")
    }

    /// kube-proxy's iptables layout for one Service's `KUBE-SVC-*` chain: endpoint `j` of `n`
    /// is taken with probability 1/(n-j) among the rest, the last unconditionally.
    fn iptables_svc_rules(&self, out: &mut String, i: usize, generations: &[usize]) {
        let n = self.endpoints;
        for (j, &generation) in generations.iter().enumerate().take(n) {
            let sep = Self::sep_chain(i, j, generation);
            if j + 1 < n {
                #[expect(clippy::cast_precision_loss, reason = "small counts")]
                let p = 1.0 / (n - j) as f64;
                let _ = writeln!(
                    out,
                    "-A {} -m statistic --mode random --probability {p:.11} -j {sep}",
                    Self::svc_chain(i)
                );
            } else {
                let _ = writeln!(out, "-A {} -j {sep}", Self::svc_chain(i));
            }
        }
    }

    fn iptables_sep_rule(&self, out: &mut String, i: usize, j: usize, generation: usize) {
        let _ = writeln!(
            out,
            "-A {} -p udp -m udp -j DNAT --to-destination {}:{TARGET_PORT}",
            Self::sep_chain(i, j, generation),
            self.endpoint(i, j)
        );
    }

    /// The whole `nat` table for `iptables-restore`: `PREROUTING -> KUBE-SERVICES`, one rule per
    /// Service to its `KUBE-SVC-*`, `statistic` rules to `KUBE-SEP-*`, each a DNAT.
    #[must_use]
    pub fn iptables(&self) -> String {
        let mut out = String::with_capacity(self.count * 900);
        out.push_str("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
        out.push_str(":POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n");
        for i in 0..self.count {
            let _ = writeln!(out, ":{} - [0:0]", Self::svc_chain(i));
            for j in 0..self.endpoints {
                let _ = writeln!(out, ":{} - [0:0]", Self::sep_chain(i, j, 0));
            }
        }
        out.push_str("-A PREROUTING -j KUBE-SERVICES\n");
        for i in 0..self.count {
            let _ = writeln!(
                out,
                "-A KUBE-SERVICES -d {}/32 -p udp -m udp --dport {SERVICE_PORT} -j {}",
                vip(i),
                Self::svc_chain(i)
            );
        }
        let zeros = vec![0; self.endpoints];
        for i in 0..self.count {
            self.iptables_svc_rules(&mut out, i, &zeros);
            for j in 0..self.endpoints {
                self.iptables_sep_rule(&mut out, i, j, 0);
            }
        }
        out.push_str("COMMIT\n");
        out
    }

    /// What kube-proxy (with minimised restores) sends for one endpoint change: the Service's
    /// chain rewritten, the new endpoint's chain added, the old one removed
    /// (`iptables-restore --noflush`). Endpoint `(i, j)` goes from generation `from` to
    /// `from + 1`; call after pushing the override.
    #[must_use]
    pub fn iptables_change(&self, i: usize, j: usize, from: usize) -> String {
        let mut out = String::from("*nat\n");
        let old = Self::sep_chain(i, j, from);
        let new = Self::sep_chain(i, j, from + 1);
        let _ = writeln!(
            out,
            ":{} - [0:0]\n:{new} - [0:0]\n:{old} - [0:0]",
            Self::svc_chain(i)
        );
        let mut generations = vec![0; self.endpoints];
        generations[j] = from + 1;
        self.iptables_svc_rules(&mut out, i, &generations);
        self.iptables_sep_rule(&mut out, i, j, from + 1);
        let _ = writeln!(out, "-X {old}\nCOMMIT");
        out
    }

    fn nft_endpoint(&self, out: &mut String, i: usize, j: usize, generation: usize) {
        let _ = writeln!(
            out,
            "add chain ip kube-proxy endpoint-{i}-{j}-{generation}\nadd rule ip kube-proxy \
             endpoint-{i}-{j}-{generation} meta l4proto udp dnat to {}:{TARGET_PORT}",
            self.endpoint(i, j)
        );
    }

    fn nft_service_rule(&self, out: &mut String, i: usize, generations: &[usize]) {
        let targets: Vec<String> = (0..self.endpoints)
            .map(|j| format!("{j} : goto endpoint-{i}-{j}-{}", generations[j]))
            .collect();
        let _ = writeln!(
            out,
            "add rule ip kube-proxy service-{i} numgen random mod {} vmap {{ {} }}",
            self.endpoints,
            targets.join(", ")
        );
    }

    /// kube-proxy's nftables layout for `nft -f`: a `service-ips` verdict map from address,
    /// protocol and port to a per-Service chain, which picks an endpoint chain with
    /// `numgen random mod N`, which DNATs.
    #[must_use]
    pub fn nft(&self) -> String {
        let mut out = String::with_capacity(self.count * 800);
        out.push_str(
            "table ip kube-proxy\ndelete table ip kube-proxy\nadd table ip kube-proxy\nadd map \
             ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; \
             }\nadd chain ip kube-proxy nat-prerouting { type nat hook prerouting priority \
             dstnat ; policy accept ; }\nadd chain ip kube-proxy services\nadd rule ip \
             kube-proxy nat-prerouting jump services\nadd rule ip kube-proxy services ip daddr \
             . meta l4proto . th dport vmap @service-ips\n",
        );
        let zeros = vec![0; self.endpoints];
        for i in 0..self.count {
            for j in 0..self.endpoints {
                self.nft_endpoint(&mut out, i, j, 0);
            }
            let _ = writeln!(out, "add chain ip kube-proxy service-{i}");
            self.nft_service_rule(&mut out, i, &zeros);
        }
        for chunk in (0..self.count).collect::<Vec<_>>().chunks(1000) {
            let elements: Vec<String> = chunk
                .iter()
                .map(|&i| format!("{} . udp . {SERVICE_PORT} : goto service-{i}", vip(i)))
                .collect();
            let _ = writeln!(
                out,
                "add element ip kube-proxy service-ips {{ {} }}",
                elements.join(", ")
            );
        }
        out
    }

    /// One endpoint change as one `nft -f` transaction, like kube-proxy's: the Service chain
    /// flushed and rewritten, the new endpoint chain added, the old one deleted.
    #[must_use]
    pub fn nft_change(&self, i: usize, j: usize, from: usize) -> String {
        let mut out = String::new();
        self.nft_endpoint(&mut out, i, j, from + 1);
        let _ = writeln!(out, "flush chain ip kube-proxy service-{i}");
        let mut generations = vec![0; self.endpoints];
        generations[j] = from + 1;
        self.nft_service_rule(&mut out, i, &generations);
        let _ = writeln!(out, "delete chain ip kube-proxy endpoint-{i}-{j}-{from}");
        out
    }
}
