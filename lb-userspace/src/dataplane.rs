//! The kernel side as the agent sees it: load the embedded object, write map updates, attach to
//! interfaces, read counters, detach.

use std::{
    collections::BTreeMap,
    fmt,
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key},
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        tc::{self, SchedClassifierLinkId},
        xdp::XdpLinkId,
    },
};
use lb_common::{
    Backend, COUNTER_COUNT, Counter, DROP_REASON_SLOTS, DropReason, FlowEntry, FlowKey,
    FrontendKey, Service, SourceRangeKey, direction, flow_flags, map_names, program_names,
};

use crate::{
    maps::{FrontendEntry, MapContents, Plan, TableKey, diff},
    model::Ipv4Cidr,
};

/// The eBPF object built by `build.rs` from `lb-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// How to attach XDP to an interface (the agent's `--xdp-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpModeChoice {
    /// Native where the driver supports it, generic otherwise.
    Auto,
    Native,
    Generic,
}

/// The XDP mode an interface actually got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachedMode {
    Native,
    Generic,
}

impl fmt::Display for AttachedMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachedMode::Native => "native",
            AttachedMode::Generic => "generic",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    #[error(
        "loading the eBPF object failed: {0}; lb-agent needs root (CAP_BPF, CAP_NET_ADMIN, \
         CAP_PERFMON) and a kernel with BTF"
    )]
    Load(#[source] aya::EbpfError),
    #[error("the eBPF object has no {kind} {name}: the embedded object and the agent disagree")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("the kernel refused program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("interface {iface} does not exist; list interfaces with `ip link`")]
    NoSuchInterface { iface: String },
    #[error(
        "attaching XDP to {iface} in {mode} mode failed: {source}; try --xdp-mode generic, or \
         check that no other XDP program is attached (`ip link show {iface}`)"
    )]
    AttachXdp {
        iface: String,
        mode: AttachedMode,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attaching the TC program to {iface} failed: {source}")]
    AttachTc {
        iface: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("mapping the Maglev tables into memory failed: {0}")]
    Mmap(#[source] std::io::Error),
    #[error(
        "{tables} Maglev tables of {size} entries do not fit in one BPF array; lower \
         maxTables or maglev.tableSize in the AgentSettings"
    )]
    TablesTooLarge { tables: u32, size: u32 },
}

/// Sums of the per-CPU counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub outcomes: Vec<(Counter, u64)>,
    pub drops: Vec<(DropReason, u64)>,
}

impl Counters {
    #[must_use]
    pub fn get(&self, counter: Counter) -> u64 {
        self.outcomes
            .iter()
            .find(|(c, _)| *c == counter)
            .map_or(0, |&(_, n)| n)
    }

    #[must_use]
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |&(_, n)| n)
    }
}

impl fmt::Display for Counters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let outcomes: Vec<String> = self
            .outcomes
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(c, n)| format!("{}={n}", c.name()))
            .collect();
        let drops: Vec<String> = self
            .drops
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| format!("{}={n}", r.name()))
            .collect();
        write!(f, "{}", outcomes.join(" "))?;
        if !drops.is_empty() {
            write!(f, " drops: {}", drops.join(" "))?;
        }
        Ok(())
    }
}

fn map_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> DataPlaneError {
    move |source| DataPlaneError::Map { name, source }
}

struct Attachment {
    iface: String,
    xdp: Option<XdpLinkId>,
    tc: SchedClassifierLinkId,
    /// `lb_tc_pod_ingress` (a pod interface) rather than `lb_tc_egress`.
    pod: bool,
}

/// How big to make the maps whose size is chosen at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Maglev tables the data path has room for.
    pub max_tables: u32,
    /// M, entries per Maglev table.
    pub maglev_table_size: u32,
    /// Entries of the flow table (`CONNTRACK`).
    pub connection_table_size: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            max_tables: lb_common::DEFAULT_MAX_TABLES,
            maglev_table_size: crate::maglev::DEFAULT_TABLE_SIZE,
            connection_table_size: lb_common::CONNTRACK_ENTRIES,
        }
    }
}

/// The `MAGLEV` array mapped into this process: tables are written here, not through syscalls.
struct TableMemory {
    base: NonNull<u32>,
    /// Entries per table (M).
    size: usize,
    /// Entries from one table's start to the next.
    stride: usize,
    slots: u32,
    bytes: usize,
}

impl TableMemory {
    fn map(map: &Map, slots: u32, size: u32) -> Result<Self, DataPlaneError> {
        let Map::Array(data) = map else {
            return Err(DataPlaneError::Missing {
                kind: "array map",
                name: map_names::MAGLEV,
            });
        };
        let stride = lb_common::maglev_table_stride(size) as usize;
        let entries = (slots as usize) * stride;
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let bytes = (entries * 4).div_ceil(page) * page;
        // SAFETY: a shared mapping of a BPF array created with BPF_F_MMAPABLE, of its rounded-up
        // size; the kernel checks both and fails the call otherwise.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(DataPlaneError::Mmap(std::io::Error::last_os_error()));
        }
        let base = NonNull::new(base.cast::<u32>())
            .ok_or_else(|| DataPlaneError::Mmap(std::io::Error::other("null mapping")))?;
        Ok(TableMemory {
            base,
            size: size as usize,
            stride,
            slots,
            bytes,
        })
    }

    /// Writes `table` into `slot`, which no frontend points at.
    fn write(&mut self, slot: u32, table: &[u32]) {
        if slot >= self.slots || table.len() != self.size {
            return;
        }
        // SAFETY: `slot < slots` and the table has `size` entries, so the copy stays inside the
        // mapping; the data path only reads slots that frontends point at, and none points at
        // this one, so no reader sees it half written.
        unsafe {
            let start = self.base.as_ptr().add(slot as usize * self.stride);
            std::ptr::copy_nonoverlapping(table.as_ptr(), start, self.size);
        }
    }
}

impl Drop for TableMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}

/// Waits until every packet that was in the data path when it was called has left it.
///
/// XDP and TC programs run inside RCU read-side sections, and `membarrier(MEMBARRIER_CMD_GLOBAL)`
/// waits for an RCU grace period (`synchronize_rcu`). If the call is refused (`nohz_full` CPUs),
/// sleeping far longer than any program runs is the fallback.
fn wait_for_packets_in_flight() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes no pointers.
    let result = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if result != 0 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The loaded programs and maps. Dropping it detaches everything (the links are owned here).
pub struct DataPlane {
    ebpf: Ebpf,
    contents: MapContents,
    attachments: Vec<Attachment>,
    tables: TableMemory,
    /// Where each table lives in `MAGLEV`.
    table_slots: BTreeMap<TableKey, u32>,
    free_slots: Vec<u32>,
}

impl DataPlane {
    /// Loads the embedded object and every program into the kernel (this runs the verifier).
    pub fn load(options: LoadOptions) -> Result<Self, DataPlaneError> {
        // One slot more than tables: a changed table is written into a free slot before the
        // old one is let go.
        let slots = options.max_tables.saturating_add(1);
        let stride = lb_common::maglev_table_stride(options.maglev_table_size);
        let entries = slots
            .checked_mul(stride)
            .filter(|&n| n < u32::MAX / 4)
            .map(|n| n / 2)
            .ok_or(DataPlaneError::TablesTooLarge {
                tables: options.max_tables,
                size: options.maglev_table_size,
            })?;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(map_names::MAGLEV, entries)
            .map_max_entries(map_names::CONNTRACK, options.connection_table_size)
            .load(EBPF_OBJECT)
            .map_err(DataPlaneError::Load)?;
        let program_error = |name| move |source| DataPlaneError::Program { name, source };
        xdp_program(&mut ebpf)?
            .load()
            .map_err(program_error(program_names::XDP_INGRESS))?;
        for name in [program_names::TC_EGRESS, program_names::TC_POD_INGRESS] {
            program::<SchedClassifier>(&mut ebpf, name)?
                .load()
                .map_err(program_error(name))?;
        }
        let maglev = ebpf.map(map_names::MAGLEV).ok_or(DataPlaneError::Missing {
            kind: "map",
            name: map_names::MAGLEV,
        })?;
        let tables = TableMemory::map(maglev, slots, options.maglev_table_size)?;
        Ok(DataPlane {
            ebpf,
            contents: MapContents::default(),
            attachments: Vec::new(),
            tables,
            table_slots: BTreeMap::new(),
            free_slots: (0..slots).rev().collect(),
        })
    }

    /// What the maps hold now.
    #[must_use]
    pub fn contents(&self) -> &MapContents {
        &self.contents
    }

    /// Makes the maps hold `new`, writing only what differs, in the order `Plan` describes.
    /// Returns the number of map writes.
    pub fn apply(&mut self, new: MapContents) -> Result<usize, DataPlaneError> {
        let plan = diff(&self.contents, &new);
        let writes = plan.writes();
        self.execute(&plan, &new)?;
        self.contents = new;
        Ok(writes)
    }

    fn execute(&mut self, plan: &Plan, new: &MapContents) -> Result<(), DataPlaneError> {
        if let Some(settings) = plan.settings {
            self.set_array(map_names::SETTINGS, 0, settings)?;
        }
        for &(id, backend) in &plan.set_backends {
            self.set_array(map_names::BACKENDS, id, backend)?;
        }
        for range in &plan.add_source_ranges {
            self.source_range(range, true)?;
        }
        for key in &plan.remove_frontends {
            let mut map: HashMap<&mut MapData, FrontendKey, Service> =
                self.typed_map(map_names::FRONTENDS)?;
            map.remove(key).map_err(map_error(map_names::FRONTENDS))?;
        }
        for (key, entry) in &plan.set_frontends {
            self.set_frontend(*key, entry)?;
        }
        let mut retired = Vec::new();
        for (table_key, frontends) in &plan.write_tables {
            let slot = if let Some(slot) = self.free_slots.pop() {
                slot
            } else {
                // Every slot retired so far is pointed at by no frontend any more.
                wait_for_packets_in_flight();
                self.free_slots.append(&mut retired);
                self.free_slots
                    .pop()
                    .ok_or(DataPlaneError::TablesTooLarge {
                        tables: self.tables.slots - 1,
                        size: u32::try_from(self.tables.size).unwrap_or(u32::MAX),
                    })?
            };
            if let Some(table) = new.tables.get(table_key) {
                self.tables.write(slot, table);
            }
            if let Some(old) = self.table_slots.insert(*table_key, slot) {
                // Switched below before anything can reuse it.
                retired.push(old);
            }
            for (key, entry) in frontends {
                self.set_frontend(*key, entry)?;
            }
        }
        for table_key in &plan.drop_tables {
            if let Some(old) = self.table_slots.remove(table_key) {
                retired.push(old);
            }
        }
        let cleanup = !retired.is_empty()
            || !plan.clear_backends.is_empty()
            || !plan.remove_source_ranges.is_empty();
        if cleanup {
            wait_for_packets_in_flight();
        }
        self.free_slots.append(&mut retired);
        for &id in &plan.clear_backends {
            self.set_array(map_names::BACKENDS, id, Backend::default())?;
        }
        for range in &plan.remove_source_ranges {
            self.source_range(range, false)?;
        }
        if !plan.stale_udp_backends.is_empty() {
            let removed = self.remove_flows(|key, entry| {
                key.protocol == lb_common::IPPROTO_UDP
                    && plan.stale_udp_backends.iter().any(|(service_id, b)| {
                        entry.service_id == *service_id
                            && entry.nat_addr_be == b.addr_be
                            && entry.nat_port_be == b.port_be
                    })
            })?;
            log::debug!("removed {removed} UDP flows to endpoints that went away");
        }
        Ok(())
    }

    fn set_frontend(
        &mut self,
        key: FrontendKey,
        entry: &FrontendEntry,
    ) -> Result<(), DataPlaneError> {
        let mut service = entry.service;
        service.table = entry
            .table_key
            .and_then(|t| self.table_slots.get(&t).copied())
            .unwrap_or(0);
        if entry
            .table_key
            .is_some_and(|t| !self.table_slots.contains_key(&t))
        {
            // A frontend whose table is not written yet must not select from slot 0.
            service.backend_count = 0;
        }
        let mut map: HashMap<&mut MapData, FrontendKey, Service> =
            self.typed_map(map_names::FRONTENDS)?;
        map.insert(key, service, 0)
            .map_err(map_error(map_names::FRONTENDS))
    }

    fn source_range(
        &mut self,
        &(service_id, cidr): &(u32, Ipv4Cidr),
        add: bool,
    ) -> Result<(), DataPlaneError> {
        let name = map_names::SOURCE_RANGES;
        let mut trie: LpmTrie<&mut MapData, SourceRangeKey, u8> = self.typed_map(name)?;
        let key = Key::new(
            32 + u32::from(cidr.prefix_len),
            SourceRangeKey {
                service_id_be: service_id.to_be(),
                addr_be: u32::from_ne_bytes(cidr.addr.octets()),
            },
        );
        if add {
            trie.insert(&key, 1, 0).map_err(map_error(name))
        } else {
            trie.remove(&key).map_err(map_error(name))
        }
    }

    fn set_array<V: aya::Pod>(
        &mut self,
        name: &'static str,
        index: u32,
        value: V,
    ) -> Result<(), DataPlaneError> {
        let mut map: Array<&mut MapData, V> = self.typed_map(name)?;
        map.set(index, value, 0).map_err(map_error(name))
    }

    fn typed_map<'a, T>(&'a mut self, name: &'static str) -> Result<T, DataPlaneError>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DataPlaneError::Missing { kind: "map", name })?;
        T::try_from(map).map_err(map_error(name))
    }

    /// Attaches XDP (ingress) and TC (egress) to `iface`, and says which XDP mode it got.
    pub fn attach(
        &mut self,
        iface: &str,
        choice: XdpModeChoice,
    ) -> Result<AttachedMode, DataPlaneError> {
        if crate::netif::index(iface).is_none() {
            return Err(DataPlaneError::NoSuchInterface {
                iface: iface.to_owned(),
            });
        }
        let (first, fallback) = match choice {
            XdpModeChoice::Auto => (AttachedMode::Native, Some(AttachedMode::Generic)),
            XdpModeChoice::Native => (AttachedMode::Native, None),
            XdpModeChoice::Generic => (AttachedMode::Generic, None),
        };
        let xdp = xdp_program(&mut self.ebpf)?;
        let mut attach_xdp = |mode: AttachedMode| {
            let flags = match mode {
                AttachedMode::Native => XdpMode::Driver,
                AttachedMode::Generic => XdpMode::Skb,
            };
            xdp.attach(iface, flags)
                .map_err(|source| DataPlaneError::AttachXdp {
                    iface: iface.to_owned(),
                    mode,
                    source,
                })
        };
        let (xdp_link, mode) = match (attach_xdp(first), fallback) {
            (Ok(link), _) => (link, first),
            (Err(error), Some(second)) => {
                log::info!("{error}; falling back to {second} mode");
                (attach_xdp(second)?, second)
            }
            (Err(error), None) => return Err(error),
        };

        let tc = attach_tc(
            &mut self.ebpf,
            iface,
            program_names::TC_EGRESS,
            TcAttachType::Egress,
        )?;
        self.attachments.push(Attachment {
            iface: iface.to_owned(),
            xdp: Some(xdp_link),
            tc,
            pod: false,
        });
        Ok(mode)
    }

    /// Attaches the pod program to the ingress of a pod's host-side interface.
    pub fn attach_pod(&mut self, iface: &str) -> Result<(), DataPlaneError> {
        let tc = attach_tc(
            &mut self.ebpf,
            iface,
            program_names::TC_POD_INGRESS,
            TcAttachType::Ingress,
        )?;
        self.attachments.push(Attachment {
            iface: iface.to_owned(),
            xdp: None,
            tc,
            pod: true,
        });
        Ok(())
    }

    /// Forgets a pod interface: detaches if it still exists (a deleted interface took its
    /// programs with it).
    pub fn forget_pod(&mut self, iface: &str) {
        let Some(i) = self
            .attachments
            .iter()
            .position(|a| a.pod && a.iface == iface)
        else {
            return;
        };
        let attachment = self.attachments.remove(i);
        if let Ok(program) =
            program::<SchedClassifier>(&mut self.ebpf, program_names::TC_POD_INGRESS)
        {
            // Fails when the interface is gone, which is the usual case and fine.
            let _ = program.detach(attachment.tc);
        }
    }

    /// Detaches from every interface, last attached first. Returns the interfaces detached.
    pub fn detach_all(&mut self) -> Vec<String> {
        let mut detached = Vec::new();
        while let Some(attachment) = self.attachments.pop() {
            let name = if attachment.pod {
                program_names::TC_POD_INGRESS
            } else {
                program_names::TC_EGRESS
            };
            if let Ok(tc) = program::<SchedClassifier>(&mut self.ebpf, name)
                && let Err(e) = tc.detach(attachment.tc)
                && !attachment.pod
            {
                log::warn!("{}: detaching TC: {e}", attachment.iface);
            }
            if let Some(link) = attachment.xdp
                && let Ok(xdp) = xdp_program(&mut self.ebpf)
                && let Err(e) = xdp.detach(link)
            {
                log::warn!("{}: detaching XDP: {e}", attachment.iface);
            }
            detached.push(attachment.iface);
        }
        detached
    }

    /// The counters summed over CPUs.
    pub fn counters(&self) -> Result<Counters, DataPlaneError> {
        let read = |name: &'static str, count: u32| -> Result<Vec<u64>, DataPlaneError> {
            let map = self
                .ebpf
                .map(name)
                .ok_or(DataPlaneError::Missing { kind: "map", name })?;
            let array = PerCpuArray::<_, u64>::try_from(map)
                .map_err(|source| DataPlaneError::Map { name, source })?;
            (0..count)
                .map(|i| {
                    array
                        .get(&i, 0)
                        .map(|values| values.iter().sum())
                        .map_err(|source| DataPlaneError::Map { name, source })
                })
                .collect()
        };
        let outcomes = read(map_names::COUNTERS, COUNTER_COUNT)?;
        let drops = read(map_names::DROPS, DROP_REASON_SLOTS)?;
        Ok(Counters {
            outcomes: Counter::ALL
                .iter()
                .map(|&c| (c, outcomes.get(c as usize).copied().unwrap_or(0)))
                .collect(),
            drops: DropReason::ALL
                .iter()
                .map(|&r| (r, drops.get(r as usize).copied().unwrap_or(0)))
                .collect(),
        })
    }

    /// Every tracked flow entry (for tests and reports).
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowEntry)>, DataPlaneError> {
        let name = map_names::CONNTRACK;
        let map = self
            .ebpf
            .map(name)
            .ok_or(DataPlaneError::Missing { kind: "map", name })?;
        let table = HashMap::<_, FlowKey, FlowEntry>::try_from(map).map_err(map_error(name))?;
        // Entries can vanish while we walk (the data path's LRU evicts): skip those.
        Ok(table.iter().filter_map(Result::ok).collect())
    }

    /// Removes every flow, all its directions, for which `doomed` holds of its FORWARD entry.
    /// Returns the number of flows removed.
    pub fn remove_flows(
        &mut self,
        doomed: impl Fn(&FlowKey, &FlowEntry) -> bool,
    ) -> Result<usize, DataPlaneError> {
        let flows = self.flows()?;
        let forwards: Vec<_> = flows
            .iter()
            .filter(|(key, entry)| key.direction == direction::FORWARD && doomed(key, entry))
            .collect();
        self.remove_entries(&forwards, &[])?;
        Ok(forwards.len())
    }

    /// Removes flows whose every direction has been idle past its timeout (the data path
    /// refreshes each direction's expiry; it never deletes), and idle directions whose FORWARD
    /// entry is gone (evicted). Returns the flows removed.
    pub fn expire_flows(&mut self, now_ns: u64) -> Result<usize, DataPlaneError> {
        let flows = self.flows()?;
        let expires: BTreeMap<FlowKey, u64> =
            flows.iter().map(|(k, e)| (*k, e.expires_ns)).collect();
        let idle = |key: &FlowKey| expires.get(key).is_none_or(|&e| e < now_ns);
        let forwards: Vec<_> = flows
            .iter()
            .filter(|(key, entry)| {
                key.direction == direction::FORWARD
                    && idle(key)
                    && partner_keys(key, entry).iter().all(idle)
            })
            .collect();
        // A live flow's idle direction stays: one-way UDP still needs its reply entry.
        let owned: std::collections::BTreeSet<FlowKey> = flows
            .iter()
            .filter(|(key, _)| key.direction == direction::FORWARD)
            .flat_map(|(key, entry)| partner_keys(key, entry))
            .collect();
        let orphans: Vec<FlowKey> = flows
            .iter()
            .map(|(key, _)| *key)
            .filter(|key| key.direction != direction::FORWARD && idle(key) && !owned.contains(key))
            .collect();
        self.remove_entries(&forwards, &orphans)?;
        Ok(forwards.len())
    }

    /// Removes each FORWARD entry with its other directions, and the `others` keys. An entry
    /// already gone is fine: the data path's LRU may have evicted it.
    fn remove_entries(
        &mut self,
        forwards: &[&(FlowKey, FlowEntry)],
        others: &[FlowKey],
    ) -> Result<(), DataPlaneError> {
        let mut map: HashMap<&mut MapData, FlowKey, FlowEntry> =
            self.typed_map(map_names::CONNTRACK)?;
        for (key, entry) in forwards {
            for doomed in partner_keys(key, entry).iter().chain([key]) {
                let _ = map.remove(doomed);
            }
        }
        for key in others {
            let _ = map.remove(key);
        }
        Ok(())
    }

    /// The XDP program, for `BPF_PROG_TEST_RUN`.
    pub fn xdp_program(&mut self) -> Result<&mut Xdp, DataPlaneError> {
        xdp_program(&mut self.ebpf)
    }

    /// The TC egress program, for `BPF_PROG_TEST_RUN`.
    pub fn tc_program(&mut self) -> Result<&mut SchedClassifier, DataPlaneError> {
        program(&mut self.ebpf, program_names::TC_EGRESS)
    }

    /// The pod-interface TC ingress program, for `BPF_PROG_TEST_RUN`.
    pub fn pod_program(&mut self) -> Result<&mut SchedClassifier, DataPlaneError> {
        program(&mut self.ebpf, program_names::TC_POD_INGRESS)
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        self.detach_all();
    }
}

fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, DataPlaneError> {
    program(ebpf, program_names::XDP_INGRESS)
}

/// Attaches TC program `name` to `iface` in `direction`.
fn attach_tc(
    ebpf: &mut Ebpf,
    iface: &str,
    name: &'static str,
    direction: TcAttachType,
) -> Result<SchedClassifierLinkId, DataPlaneError> {
    let tc_error = |source| DataPlaneError::AttachTc {
        iface: iface.to_owned(),
        source,
    };
    let program = program::<SchedClassifier>(ebpf, name)?;
    // Kernels from 6.6 attach through TCX links; older ones need a clsact qdisc first.
    if let Ok(link) = program.attach(iface, direction) {
        return Ok(link);
    }
    // An "already exists" error here is fine: the qdisc is shared.
    let _ = tc::qdisc_add_clsact(iface);
    program.attach(iface, direction).map_err(tc_error)
}

/// The other directions of the flow whose FORWARD entry this is.
fn partner_keys(forward: &FlowKey, entry: &FlowEntry) -> Vec<FlowKey> {
    let snat = entry.flags & flow_flags::SNAT != 0;
    let (reply_dst, reply_dst_port) = if snat {
        (entry.peer_addr_be, entry.peer_port_be)
    } else {
        (forward.src_addr_be, forward.src_port_be)
    };
    let reply = FlowKey {
        src_addr_be: entry.nat_addr_be,
        dst_addr_be: reply_dst,
        src_port_be: entry.nat_port_be,
        dst_port_be: reply_dst_port,
        protocol: forward.protocol,
        direction: direction::REPLY,
        _pad: [0; 2],
    };
    let mut keys = vec![reply];
    if snat {
        keys.push(FlowKey {
            dst_addr_be: entry.nat_addr_be,
            dst_port_be: entry.nat_port_be,
            direction: direction::SNAT,
            ..*forward
        });
    }
    keys
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DataPlaneError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DataPlaneError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|source| DataPlaneError::Program { name, source })
}
