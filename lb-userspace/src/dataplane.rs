//! The kernel side as the agent sees it: load the embedded object, write map updates, attach to
//! interfaces, read counters, detach.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    ptr::NonNull,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, DevMapHash, HashMap, LpmTrie, Map, MapData, PerCpuArray, PerCpuValues, lpm_trie::Key,
    },
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{self, SchedClassifierLink, SchedClassifierLinkId},
        xdp::{XdpLink, XdpLinkId},
    },
};
use lb_common::{
    Backend, BackendStats, COUNTER_COUNT, Counter, DROP_REASON_SLOTS, DropReason, EGRESS_SLOTS,
    Egress, FlowEntry, FlowKey, FrontendKey, Service, Settings, SourceRangeKey, direction,
    flow_flags, global_names, map_names, program_names, service_flags,
};

use crate::{
    maps::{FrontendEntry, MaglevTable, MapContents, Plan, TableKey, diff},
    model::Ipv4Cidr,
    pins::{self, LinkKind, MapSource, PinDir, RecordChunk},
};

/// The eBPF object built by `build.rs` from `lb-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// The same data path built with `lb-ebpf`'s `bench` feature (benchmark programs and the
/// new-flow prologue); for `lb-bench` only.
#[cfg(feature = "bench")]
pub static BENCH_EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench/lb-ebpf"));

/// How to attach XDP to an interface (the agent's `--xdp-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpModeChoice {
    /// Native where the driver supports it, generic otherwise.
    Auto,
    Native,
    Generic,
}

/// How XDP sends the packets it translated (the agent's `--forwarding`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Forwarding {
    /// Routed in XDP and sent straight out of the egress interface (`XDP_TX`/`XDP_REDIRECT`),
    /// past the stack and its netfilter FORWARD chain; the stack only sees the fallbacks.
    #[default]
    Xdp,
    /// Handed to the kernel stack (`XDP_PASS`), which routes them through netfilter; the agent
    /// sets `accept_local` on its interfaces for the replies whose source is a node address.
    Stack,
}

impl Forwarding {
    /// The name `--forwarding` takes.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Forwarding::Xdp => "xdp",
            Forwarding::Stack => "stack",
        }
    }

    /// The value of the eBPF object's `FORWARDING` global.
    fn global(self) -> u32 {
        match self {
            Forwarding::Xdp => lb_common::forwarding::XDP,
            Forwarding::Stack => lb_common::forwarding::STACK,
        }
    }
}

/// The XDP mode an interface actually got.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
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
    #[error("pin directory {path}: {reason}")]
    PinDir { path: PathBuf, reason: String },
    #[error(
        "pinned map {name} (in {pin_dir}) was created with {pinned}; this agent needs {needed}; \
         run `lb-agent cleanup --pin-dir {pin_dir}` (drops tracked connections) and start again"
    )]
    PinnedMapMismatch {
        name: &'static str,
        pinned: String,
        needed: String,
        pin_dir: PathBuf,
    },
    #[error(
        "{iface}: the {kind} link cannot be pinned ({source}); pinning needs BPF links (XDP \
         links: kernel 5.9, TCX: 6.6); run without --pin-dir on this kernel"
    )]
    PinLink {
        iface: String,
        kind: LinkKind,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("{iface}: replacing the program behind the pinned {kind} link failed: {source}")]
    AdoptLink {
        iface: String,
        kind: LinkKind,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("the agent record is {len} bytes, more than the {max} bytes it has room for")]
    RecordTooLarge { len: usize, max: usize },
    #[error("the pinned agent record cannot be read: {0}")]
    RecordCorrupt(String),
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
    /// How the packets XDP translated left it.
    pub egress: Vec<(Egress, u64)>,
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

    #[must_use]
    pub fn egress(&self, egress: Egress) -> u64 {
        self.egress
            .iter()
            .find(|(e, _)| *e == egress)
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
        let egress: Vec<String> = self
            .egress
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(e, n)| format!("{}={n}", e.name()))
            .collect();
        write!(f, "{}", outcomes.join(" "))?;
        if !drops.is_empty() {
            write!(f, " drops: {}", drops.join(" "))?;
        }
        if !egress.is_empty() {
            write!(f, " egress: {}", egress.join(" "))?;
        }
        Ok(())
    }
}

/// Whether a delete failed only because the key is not there, which is what it wanted: a retry
/// after a failed apply must not fail on a delete that already happened.
fn already_gone(error: &aya::maps::MapError) -> bool {
    match error {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn map_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> DataPlaneError {
    move |source| DataPlaneError::Map { name, source }
}

/// Who keeps a program attached.
enum LinkHandle {
    /// The program object (no pin directory): detached when it is dropped.
    Xdp(XdpLinkId),
    Tc(SchedClassifierLinkId),
    /// A pin: stays attached without any process until the file is removed.
    Pinned(PathBuf),
}

struct Attachment {
    iface: String,
    xdp: Option<LinkHandle>,
    tc: LinkHandle,
    /// `lb_tc_ingress` (node interfaces).
    tc_ingress: Option<LinkHandle>,
    /// `lb_tc_pod_ingress` (a pod interface) rather than `lb_tc_egress`.
    pod: bool,
}

/// How big to make the maps whose size is chosen at load time, and where they live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Maglev tables the data path has room for.
    pub max_tables: u32,
    /// M, entries per Maglev table.
    pub maglev_table_size: u32,
    /// Entries of the connection table (`CONNTRACK`).
    pub conntrack_entries: u32,
    /// A directory on a bpffs: maps and links are pinned there, so the data plane outlives this
    /// process, and a later load adopts them. `None`: nothing outlives the process.
    pub pin_dir: Option<PathBuf>,
    pub forwarding: Forwarding,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            max_tables: lb_common::DEFAULT_MAX_TABLES,
            maglev_table_size: crate::maglev::DEFAULT_TABLE_SIZE,
            conntrack_entries: lb_common::CONNTRACK_ENTRIES,
            pin_dir: None,
            forwarding: Forwarding::default(),
        }
    }
}

impl LoadOptions {
    /// Entries of `MAGLEV` (pairs of u32): one slot more than tables, so a changed table is
    /// written into a free slot before the old one is let go.
    pub fn maglev_entries(&self) -> Result<u32, DataPlaneError> {
        let slots = self.max_tables.saturating_add(1);
        let stride = lb_common::maglev_table_stride(self.maglev_table_size);
        slots
            .checked_mul(stride)
            .filter(|&n| n < u32::MAX / 4)
            .map(|n| n / 2)
            .ok_or(DataPlaneError::TablesTooLarge {
                tables: self.max_tables,
                size: self.maglev_table_size,
            })
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

    /// The table in `slot`, as written.
    fn read(&self, slot: u32) -> Option<Vec<u32>> {
        if slot >= self.slots {
            return None;
        }
        // SAFETY: `slot < slots`, so `size` entries from its start stay inside the mapping.
        let table = unsafe {
            std::slice::from_raw_parts(
                self.base.as_ptr().add(slot as usize * self.stride),
                self.size,
            )
        };
        Some(table.to_vec())
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

/// The loaded programs and maps. Without a pin directory, dropping it detaches everything (the
/// links are owned here); with one, maps and links stay pinned and keep forwarding.
pub struct DataPlane {
    ebpf: Ebpf,
    contents: MapContents,
    attachments: Vec<Attachment>,
    tables: TableMemory,
    /// Where each table lives in `MAGLEV`.
    table_slots: BTreeMap<TableKey, u32>,
    free_slots: Vec<u32>,
    /// Slots that pinned frontends pointed at but no table of `contents` owns (an agent stopped
    /// halfway through switching a table): free once the next apply has switched them away.
    stray_slots: Vec<u32>,
    /// A plan failed and reading the maps back failed too: `contents` may not be what the maps
    /// hold, so the next apply reads them back first.
    out_of_sync: bool,
    pins: Option<PinDir>,
    /// Links a previous agent pinned that this one has not taken over (yet).
    unclaimed_links: BTreeSet<(LinkKind, String)>,
    record: Array<MapData, RecordChunk>,
    forwarding: Forwarding,
    /// Node interfaces, and whether they are in `FORWARD_TARGETS`.
    forward_targets: BTreeMap<String, bool>,
}

impl DataPlane {
    /// Loads the embedded object and every program into the kernel (this runs the verifier).
    /// With a pin directory that already holds maps, they are adopted: kept with their contents
    /// (tracked flows included), and [`DataPlane::contents`] says what they hold.
    pub fn load(options: LoadOptions) -> Result<Self, DataPlaneError> {
        Self::load_object(options, EBPF_OBJECT)
    }

    /// [`DataPlane::load`] with another build of the data path's object (the benchmark's).
    pub fn load_object(options: LoadOptions, object: &[u8]) -> Result<Self, DataPlaneError> {
        let entries = options.maglev_entries()?;
        let slots = options.max_tables.saturating_add(1);
        let specs = pins::pinned_map_specs(&options, entries);
        let pins = options
            .pin_dir
            .map(|dir| PinDir::prepare(&dir))
            .transpose()?;
        let adopting = pins.as_ref().is_some_and(PinDir::has_pinned_maps);
        if let Some(pins) = &pins {
            pins.check_maps(&specs)?;
        }
        let mut loader = EbpfLoader::new();
        let forwarding = options.forwarding.global();
        loader
            .override_global(global_names::FORWARDING, &forwarding, true)
            .map_max_entries(map_names::MAGLEV, entries)
            .map_max_entries(map_names::CONNTRACK, options.conntrack_entries);
        if let Some(pins) = &pins {
            for spec in &specs {
                if spec.name != pins::AGENT_RECORD {
                    // The loader opens the map pinned there, or creates and pins it.
                    loader.map_pin_path(spec.name, pins.map_path(spec.name));
                }
            }
        }
        let mut ebpf = loader.load(object).map_err(DataPlaneError::Load)?;
        let program_error = |name| move |source| DataPlaneError::Program { name, source };
        xdp_program(&mut ebpf)?
            .load()
            .map_err(program_error(program_names::XDP_INGRESS))?;
        for name in [
            program_names::TC_EGRESS,
            program_names::TC_INGRESS,
            program_names::TC_POD_INGRESS,
        ] {
            program::<SchedClassifier>(&mut ebpf, name)?
                .load()
                .map_err(program_error(name))?;
        }
        let maglev = ebpf.map(map_names::MAGLEV).ok_or(DataPlaneError::Missing {
            kind: "map",
            name: map_names::MAGLEV,
        })?;
        let tables = TableMemory::map(maglev, slots, options.maglev_table_size)?;
        let record = pins::open_or_create_record(pins.as_ref())?;
        let unclaimed_links = pins
            .as_ref()
            .map(|p| p.links().into_iter().collect())
            .unwrap_or_default();
        let mut dataplane = DataPlane {
            forwarding: options.forwarding,
            forward_targets: BTreeMap::new(),
            ebpf,
            contents: MapContents::default(),
            attachments: Vec::new(),
            tables,
            table_slots: BTreeMap::new(),
            free_slots: (0..slots).rev().collect(),
            stray_slots: Vec::new(),
            out_of_sync: false,
            pins,
            unclaimed_links,
            record,
        };
        if adopting {
            dataplane.read_back_contents()?;
            dataplane.unpin_links_of_missing_interfaces();
        }
        Ok(dataplane)
    }

    /// The loaded object itself, for the benchmark (its extra programs and maps).
    #[cfg(feature = "bench")]
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// The pin directory, if the data plane is pinned.
    #[must_use]
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pins.as_ref().map(PinDir::root)
    }

    /// Rebuilds `contents`, `table_slots` and `free_slots` from adopted maps, so the first
    /// apply writes only what differs from what a previous agent left.
    fn read_back_contents(&mut self) -> Result<(), DataPlaneError> {
        let mut contents = MapContents::default();
        let settings_map: Array<&MapData, Settings> =
            Array::try_from(self.map(map_names::SETTINGS)?)
                .map_err(map_error(map_names::SETTINGS))?;
        contents.settings = settings_map
            .get(&0, 0)
            .map_err(map_error(map_names::SETTINGS))?;
        let table_size = u32::try_from(self.tables.size).unwrap_or(u32::MAX);
        if contents.settings.maglev_table_size != 0
            && contents.settings.maglev_table_size != table_size
        {
            return Err(DataPlaneError::PinnedMapMismatch {
                name: map_names::MAGLEV,
                pinned: format!("tables of {} entries", contents.settings.maglev_table_size),
                needed: format!(
                    "tables of {table_size} entries (maglev.tableSize in AgentSettings)"
                ),
                pin_dir: self.pin_dir().unwrap_or(Path::new("")).to_owned(),
            });
        }

        let frontends: HashMap<&MapData, FrontendKey, Service> =
            HashMap::try_from(self.map(map_names::FRONTENDS)?)
                .map_err(map_error(map_names::FRONTENDS))?;
        let mut slots_of: BTreeMap<TableKey, BTreeSet<u32>> = BTreeMap::new();
        for (key, service) in frontends.iter().filter_map(Result::ok) {
            let table_key = (service.backend_count > 0).then_some(TableKey {
                service_id: service.service_id,
                local: service.flags & service_flags::LOCAL_ONLY != 0,
            });
            if let Some(table_key) = table_key {
                slots_of.entry(table_key).or_default().insert(service.table);
            }
            if key.protocol == lb_common::IPPROTO_UDP {
                contents.udp_services.insert(service.service_id);
            }
            let service = Service {
                table: 0,
                ..service
            };
            contents
                .frontends
                .insert(key, FrontendEntry { service, table_key });
        }
        let mut used = BTreeSet::new();
        for (table_key, slots) in slots_of {
            used.extend(slots.iter().copied());
            let mut slots = slots.into_iter();
            match (slots.next(), slots.next()) {
                (Some(slot), None) => {
                    if let Some(table) = self.tables.read(slot) {
                        contents
                            .tables
                            .insert(table_key, MaglevTable::from_slots(table));
                        self.table_slots.insert(table_key, slot);
                    }
                }
                // Frontends of one table in two slots: leave it out, so the next apply
                // writes it anew and switches every frontend to it.
                (first, second) => {
                    self.stray_slots
                        .extend(first.into_iter().chain(second).chain(slots));
                }
            }
        }
        self.free_slots.retain(|slot| !used.contains(slot));

        let backends: Array<&MapData, Backend> = Array::try_from(self.map(map_names::BACKENDS)?)
            .map_err(map_error(map_names::BACKENDS))?;
        for (id, backend) in backends.iter().enumerate() {
            let backend = backend.map_err(map_error(map_names::BACKENDS))?;
            let Ok(id) = u32::try_from(id) else { break };
            if backend == Backend::default() {
                continue;
            }
            contents.backends.insert(id, backend);
            let addr = Ipv4Addr::from(backend.addr_be.to_ne_bytes());
            contents.backend_ids.insert(
                (backend.service_id, addr, u16::from_be(backend.port_be)),
                id,
            );
        }

        let ranges: LpmTrie<&MapData, SourceRangeKey, u8> =
            LpmTrie::try_from(self.map(map_names::SOURCE_RANGES)?)
                .map_err(map_error(map_names::SOURCE_RANGES))?;
        for key in ranges.keys().filter_map(Result::ok) {
            let data = key.data();
            let prefix_len = key.prefix_len().saturating_sub(32);
            contents.source_ranges.insert((
                u32::from_be(data.service_id_be),
                Ipv4Cidr {
                    addr: Ipv4Addr::from(data.addr_be.to_ne_bytes()),
                    prefix_len: u8::try_from(prefix_len).unwrap_or(32),
                },
            ));
        }
        self.contents = contents;
        Ok(())
    }

    /// Unpins the links of pod interfaces that went away while no agent ran (the kernel already
    /// detached them with the interface).
    fn unpin_links_of_missing_interfaces(&mut self) {
        let Some(pins) = &self.pins else { return };
        self.unclaimed_links.retain(|(kind, iface)| {
            if crate::netif::index(iface).is_some() {
                return true;
            }
            let path = pins.link_path(*kind, iface);
            match std::fs::remove_file(&path) {
                Ok(()) => log::info!("{iface} is gone: unpinned its {kind} link"),
                Err(e) => log::warn!("unpinning {}: {e}", path.display()),
            }
            false
        });
    }

    /// Detaches and unpins the links a previous agent pinned that this one did not take over
    /// (interfaces no longer served). Returns them.
    pub fn drop_unclaimed_links(&mut self) -> Vec<(LinkKind, String)> {
        let Some(pins) = &self.pins else {
            return Vec::new();
        };
        let unclaimed = std::mem::take(&mut self.unclaimed_links);
        for (kind, iface) in &unclaimed {
            let path = pins.link_path(*kind, iface);
            if let Err(e) = std::fs::remove_file(&path) {
                log::warn!("unpinning {}: {e}", path.display());
            }
        }
        unclaimed.into_iter().collect()
    }

    /// Stores the agent's record of what it applied (opaque bytes, at most
    /// [`pins::RECORD_CAPACITY`]). Readers — also other processes through
    /// [`pins::PinnedDataPlane`] — see the previous record until this one is whole. A record too
    /// large is refused with [`DataPlaneError::RecordTooLarge`] and the previous one stays.
    pub fn write_record(&mut self, bytes: &[u8]) -> Result<(), DataPlaneError> {
        pins::write_record(&mut self.record, bytes)
    }

    /// The last record written (also by a previous agent on the same pins).
    pub fn record(&self) -> Result<Option<Vec<u8>>, DataPlaneError> {
        pins::read_record(&self.record)
    }

    /// Detaches from every interface and removes every pin (maps, links, the directories).
    /// Returns the pins removed. Without a pin directory it only detaches.
    pub fn remove_pins(&mut self) -> Result<Vec<PathBuf>, DataPlaneError> {
        self.detach_all();
        self.drop_unclaimed_links();
        match &self.pins {
            Some(pins) => pins.remove_all(),
            None => Ok(Vec::new()),
        }
    }

    /// What the maps hold now.
    #[must_use]
    pub fn contents(&self) -> &MapContents {
        &self.contents
    }

    /// A plan failed and reading the maps back failed too: [`DataPlane::contents`] may not be
    /// what they hold, and the next apply reads them back before it diffs.
    #[must_use]
    pub fn out_of_sync(&self) -> bool {
        self.out_of_sync
    }

    /// Makes the maps hold `new`, writing only what differs, in the order `Plan` describes.
    /// Returns the number of map writes.
    ///
    /// A plan that fails halfway (a map full, a write the kernel refuses) has made some of its
    /// writes: the contents are then read back from the maps, so the next apply diffs from what
    /// they hold and neither repeats a delete that happened nor skips a write that did not.
    pub fn apply(&mut self, new: MapContents) -> Result<usize, DataPlaneError> {
        if self.out_of_sync {
            // The read-back after the last failure failed too: try it again first.
            self.resync(&new)?;
        }
        let plan = diff(&self.contents, &new);
        let writes = plan.writes();
        if let Err(error) = self.execute(&plan, &new) {
            if let Err(read) = self.resync(&new) {
                log::warn!("reading the maps back after a failed apply failed: {read}");
            }
            return Err(error);
        }
        self.contents = new;
        Ok(writes)
    }

    /// Rebuilds `contents` and the table slots from what the maps hold, after a plan failed
    /// halfway. Service port names (not kept in the maps) come from the contents before and
    /// `new` for the ids the maps still use, so ids stay with their service ports.
    fn resync(&mut self, new: &MapContents) -> Result<(), DataPlaneError> {
        self.out_of_sync = true;
        let old = self.contents.clone();
        // Slots the failed plan retired may still be read by packets in flight; the read-back
        // counts every slot no frontend points at as free.
        wait_for_packets_in_flight();
        self.table_slots.clear();
        self.stray_slots.clear();
        self.free_slots = (0..self.tables.slots).rev().collect();
        self.read_back_contents()?;
        let contents = &mut self.contents;
        let in_use: BTreeSet<u32> = contents
            .frontends
            .values()
            .map(|f| f.service.service_id)
            .chain(contents.backends.values().map(|b| b.service_id))
            .collect();
        for known in [new, &old] {
            for (identity, &id) in &known.service_ids {
                if in_use.contains(&id)
                    && !contents.service_ids.contains_key(identity)
                    && !contents.service_ids.values().any(|&named| named == id)
                {
                    contents.service_ids.insert(identity.clone(), id);
                    if let Some(name) = known.service_names.get(&id) {
                        contents.service_names.insert(id, name.clone());
                    }
                    if known.udp_services.contains(&id) {
                        contents.udp_services.insert(id);
                    }
                }
            }
        }
        self.out_of_sync = false;
        Ok(())
    }

    fn execute(&mut self, plan: &Plan, new: &MapContents) -> Result<(), DataPlaneError> {
        if let Some(settings) = plan.settings {
            self.set_array(map_names::SETTINGS, 0, settings)?;
        }
        for &(id, backend) in &plan.set_backends {
            if !self.contents.backends.contains_key(&id) {
                // A reused id must not start with the counts of the endpoint it named before
                // (or of flows to that endpoint that outlived it).
                self.zero_backend_stats(id)?;
            }
            self.set_array(map_names::BACKENDS, id, backend)?;
        }
        for range in &plan.add_source_ranges {
            self.source_range(range, true)?;
        }
        for key in &plan.remove_frontends {
            let mut map: HashMap<&mut MapData, FrontendKey, Service> =
                self.typed_map(map_names::FRONTENDS)?;
            match map.remove(key) {
                // Gone already: what this step wants.
                Err(error) if !already_gone(&error) => {
                    return Err(map_error(map_names::FRONTENDS)(error));
                }
                _ => {}
            }
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
                self.tables.write(slot, table.slots());
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
        // Stray slots are freed only now: this plan switched their frontends away.
        retired.append(&mut self.stray_slots);
        let cleanup = !retired.is_empty()
            || !plan.clear_backends.is_empty()
            || !plan.remove_source_ranges.is_empty();
        if cleanup {
            wait_for_packets_in_flight();
        }
        self.free_slots.append(&mut retired);
        for &id in &plan.clear_backends {
            self.set_array(map_names::BACKENDS, id, Backend::default())?;
            self.zero_backend_stats(id)?;
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

    /// Sets backend `id`'s statistics to zero on every CPU.
    fn zero_backend_stats(&mut self, id: u32) -> Result<(), DataPlaneError> {
        let name = map_names::BACKEND_STATS;
        let zeros = aya::util::nr_cpus()
            .map_err(|(_, error)| error)
            .and_then(|cpus| PerCpuValues::try_from(vec![BackendStats::default(); cpus]))
            .map_err(|error| DataPlaneError::Map {
                name,
                source: aya::maps::MapError::IoError(error),
            })?;
        let mut stats: PerCpuArray<&mut MapData, BackendStats> = self.typed_map(name)?;
        stats.set(id, zeros, 0).map_err(map_error(name))
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
            match trie.remove(&key) {
                Err(error) if !already_gone(&error) => Err(map_error(name)(error)),
                _ => Ok(()),
            }
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

    /// Attaches XDP (ingress) and TC (egress) to `iface`, and says which XDP mode it got. With a
    /// pin directory the links are pinned; links a previous agent pinned there are taken over:
    /// the new programs replace the old ones behind them in one step, so no packet meets an
    /// interface without a program (an adopted XDP link keeps its mode).
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
        let (xdp_link, mode) = if let Some((handle, mode)) = self.adopt_xdp(iface)? {
            let wanted = match choice {
                XdpModeChoice::Auto => None,
                XdpModeChoice::Native => Some(AttachedMode::Native),
                XdpModeChoice::Generic => Some(AttachedMode::Generic),
            };
            if wanted.is_some_and(|w| w != mode) {
                log::warn!(
                    "{iface}: took over the pinned XDP link in {mode} mode; --xdp-mode takes \
                     effect after `lb-agent cleanup`"
                );
            }
            (handle, mode)
        } else {
            let (id, mode) = self.attach_xdp(iface, choice)?;
            (self.keep_xdp(iface, mode, id)?, mode)
        };
        let tc = self.attach_or_adopt_tc(iface, LinkKind::TcEgress)?;
        let tc_ingress = self.attach_or_adopt_tc(iface, LinkKind::TcIngress)?;
        self.set_forward_target(iface)?;
        self.attachments.push(Attachment {
            iface: iface.to_owned(),
            xdp: Some(xdp_link),
            tc,
            tc_ingress: Some(tc_ingress),
            pod: false,
        });
        Ok(mode)
    }

    /// How XDP sends what it translated, as loaded.
    #[must_use]
    pub fn forwarding(&self) -> Forwarding {
        self.forwarding
    }

    /// Makes `iface` one of the interfaces XDP sends to (`FORWARD_TARGETS`) while it takes
    /// XDP frames. Logs each change.
    fn set_forward_target(&mut self, iface: &str) -> Result<(), DataPlaneError> {
        let name = map_names::FORWARD_TARGETS;
        let ifindex =
            crate::netif::index(iface).ok_or_else(|| DataPlaneError::NoSuchInterface {
                iface: iface.to_owned(),
            })?;
        let target = self.forwarding == Forwarding::Xdp
            && crate::netif::takes_xdp_frames(ifindex).unwrap_or_else(|e| {
                log::warn!("{iface}: reading its XDP features: {e}; XDP does not send to it");
                false
            });
        // The first time always writes: a pinned map may hold what a previous agent left.
        if self.forward_targets.get(iface) == Some(&target) {
            return Ok(());
        }
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DataPlaneError::Missing { kind: "map", name })?;
        let mut targets = DevMapHash::try_from(map).map_err(map_error(name))?;
        if target {
            targets
                .insert(ifindex, ifindex, None, 0)
                .map_err(|e| DataPlaneError::Map {
                    name,
                    source: aya::maps::MapError::IoError(std::io::Error::other(e.to_string())),
                })?;
            log::info!("{iface}: takes XDP frames; XDP sends to it");
        } else {
            // Absent already is as good as removed.
            let _ = targets.remove(ifindex);
            if self.forwarding == Forwarding::Xdp {
                log::info!(
                    "{iface}: takes no XDP frames (a veth whose peer has no XDP program or GRO); \
                     the stack sends what goes out of it"
                );
            }
        }
        self.forward_targets.insert(iface.to_owned(), target);
        Ok(())
    }

    /// Takes `iface` out of `FORWARD_TARGETS` (detaching from it).
    fn forget_forward_target(&mut self, iface: &str) {
        self.forward_targets.remove(iface);
        let name = map_names::FORWARD_TARGETS;
        if let (Some(ifindex), Some(map)) = (crate::netif::index(iface), self.ebpf.map_mut(name))
            && let Ok(mut targets) = DevMapHash::try_from(map)
        {
            // Absent already is as good as removed.
            let _ = targets.remove(ifindex);
        }
    }

    /// Checks again which node interfaces take XDP frames: a veth starts or stops with its
    /// peer's XDP program or GRO.
    pub fn refresh_forward_targets(&mut self) {
        let node_ifaces: Vec<String> = self
            .attachments
            .iter()
            .filter(|a| !a.pod)
            .map(|a| a.iface.clone())
            .collect();
        for iface in node_ifaces {
            if let Err(e) = self.set_forward_target(&iface) {
                log::warn!("{iface}: {e}");
            }
        }
    }

    fn attach_xdp(
        &mut self,
        iface: &str,
        choice: XdpModeChoice,
    ) -> Result<(XdpLinkId, AttachedMode), DataPlaneError> {
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
        match (attach_xdp(first), fallback) {
            (Ok(link), _) => Ok((link, first)),
            (Err(error), Some(second)) => {
                log::info!("{error}; falling back to {second} mode");
                Ok((attach_xdp(second)?, second))
            }
            (Err(error), None) => Err(error),
        }
    }

    /// Takes over an XDP link pinned for `iface`, if there is one.
    fn adopt_xdp(
        &mut self,
        iface: &str,
    ) -> Result<Option<(LinkHandle, AttachedMode)>, DataPlaneError> {
        let Some(pins) = &self.pins else {
            return Ok(None);
        };
        for mode in [AttachedMode::Native, AttachedMode::Generic] {
            let kind = LinkKind::Xdp(mode);
            let path = pins.link_path(kind, iface);
            if !path.exists() {
                continue;
            }
            let pin_error = |source| DataPlaneError::PinLink {
                iface: iface.to_owned(),
                kind,
                source,
            };
            let link = PinnedLink::from_pin(&path).map_err(pin_error)?;
            let link = XdpLink::try_from(FdLink::from(link)).map_err(pin_error)?;
            let program = xdp_program(&mut self.ebpf)?;
            let adopt_error = |source| DataPlaneError::AdoptLink {
                iface: iface.to_owned(),
                kind,
                source,
            };
            let id = program.attach_to_link(link).map_err(adopt_error)?;
            // The pin keeps it attached; this process's descriptor is not needed.
            drop(program.take_link(id).map_err(adopt_error)?);
            self.unclaimed_links.remove(&(kind, iface.to_owned()));
            log::info!("{iface}: took over the pinned {kind} link");
            return Ok(Some((LinkHandle::Pinned(path), mode)));
        }
        Ok(None)
    }

    /// The TC program of `kind` on `iface`: a link pinned there taken over, or a new one
    /// (pinned when there is a pin directory).
    fn attach_or_adopt_tc(
        &mut self,
        iface: &str,
        kind: LinkKind,
    ) -> Result<LinkHandle, DataPlaneError> {
        if let Some(handle) = self.adopt_tc(iface, kind)? {
            return Ok(handle);
        }
        let direction = if kind == LinkKind::TcEgress {
            TcAttachType::Egress
        } else {
            TcAttachType::Ingress
        };
        let id = attach_tc(&mut self.ebpf, iface, tc_program_name(kind), direction)?;
        self.keep_tc(iface, kind, id)
    }

    /// Takes over a TC link of `kind` pinned for `iface`, if there is one.
    fn adopt_tc(
        &mut self,
        iface: &str,
        kind: LinkKind,
    ) -> Result<Option<LinkHandle>, DataPlaneError> {
        let Some(pins) = &self.pins else {
            return Ok(None);
        };
        let path = pins.link_path(kind, iface);
        if !path.exists() {
            return Ok(None);
        }
        let pin_error = |source| DataPlaneError::PinLink {
            iface: iface.to_owned(),
            kind,
            source,
        };
        let link = PinnedLink::from_pin(&path).map_err(pin_error)?;
        let link = SchedClassifierLink::try_from(FdLink::from(link)).map_err(pin_error)?;
        let program = program::<SchedClassifier>(&mut self.ebpf, tc_program_name(kind))?;
        let adopt_error = |source| DataPlaneError::AdoptLink {
            iface: iface.to_owned(),
            kind,
            source,
        };
        let id = program.attach_to_link(link).map_err(adopt_error)?;
        drop(program.take_link(id).map_err(adopt_error)?);
        self.unclaimed_links.remove(&(kind, iface.to_owned()));
        log::info!("{iface}: took over the pinned {kind} link");
        Ok(Some(LinkHandle::Pinned(path)))
    }

    /// Pins a new XDP link when there is a pin directory; otherwise the program keeps it.
    fn keep_xdp(
        &mut self,
        iface: &str,
        mode: AttachedMode,
        id: XdpLinkId,
    ) -> Result<LinkHandle, DataPlaneError> {
        let Some(pins) = &self.pins else {
            return Ok(LinkHandle::Xdp(id));
        };
        let kind = LinkKind::Xdp(mode);
        let link = xdp_program(&mut self.ebpf)?
            .take_link(id)
            .map_err(|source| DataPlaneError::AttachXdp {
                iface: iface.to_owned(),
                mode,
                source,
            })?;
        let link = FdLink::try_from(link).map_err(|source| DataPlaneError::PinLink {
            iface: iface.to_owned(),
            kind,
            source,
        })?;
        pin_link(link, pins.link_path(kind, iface))
    }

    /// Pins a new TC link when there is a pin directory; otherwise the program keeps it.
    fn keep_tc(
        &mut self,
        iface: &str,
        kind: LinkKind,
        id: SchedClassifierLinkId,
    ) -> Result<LinkHandle, DataPlaneError> {
        let Some(pins) = &self.pins else {
            return Ok(LinkHandle::Tc(id));
        };
        let link = program::<SchedClassifier>(&mut self.ebpf, tc_program_name(kind))?
            .take_link(id)
            .map_err(|source| DataPlaneError::AttachTc {
                iface: iface.to_owned(),
                source,
            })?;
        let link = FdLink::try_from(link).map_err(|source| DataPlaneError::PinLink {
            iface: iface.to_owned(),
            kind,
            source,
        })?;
        pin_link(link, pins.link_path(kind, iface))
    }

    /// Attaches the pod program to the ingress of a pod's host-side interface (taking over a
    /// pinned link, as [`DataPlane::attach`] does).
    pub fn attach_pod(&mut self, iface: &str) -> Result<(), DataPlaneError> {
        let tc = self.attach_or_adopt_tc(iface, LinkKind::TcPod)?;
        self.attachments.push(Attachment {
            iface: iface.to_owned(),
            xdp: None,
            tc,
            tc_ingress: None,
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
        // Fails when the interface is gone, which is the usual case and fine.
        let _ = self.release(attachment.tc, LinkKind::TcPod);
    }

    /// Detaches one link: the program lets go of it, or its pin is removed.
    fn release(&mut self, handle: LinkHandle, kind: LinkKind) -> Result<(), String> {
        match handle {
            LinkHandle::Xdp(id) => xdp_program(&mut self.ebpf)
                .map_err(|e| e.to_string())?
                .detach(id)
                .map_err(|e| e.to_string()),
            LinkHandle::Tc(id) => program::<SchedClassifier>(&mut self.ebpf, tc_program_name(kind))
                .map_err(|e| e.to_string())?
                .detach(id)
                .map_err(|e| e.to_string()),
            // No process holds the link: removing its pin releases and detaches it.
            LinkHandle::Pinned(path) => std::fs::remove_file(&path)
                .map_err(|e| format!("unpinning {}: {e}", path.display())),
        }
    }

    /// Detaches from every interface, last attached first (pinned links are unpinned). Returns
    /// the interfaces detached.
    pub fn detach_all(&mut self) -> Vec<String> {
        let mut detached = Vec::new();
        while let Some(attachment) = self.attachments.pop() {
            let kind = if attachment.pod {
                LinkKind::TcPod
            } else {
                LinkKind::TcEgress
            };
            // A pod interface may be gone already, which detached it.
            if let Err(e) = self.release(attachment.tc, kind)
                && !attachment.pod
            {
                log::warn!("{}: detaching TC: {e}", attachment.iface);
            }
            if let Some(link) = attachment.xdp
                && let Err(e) = self.release(link, LinkKind::Xdp(AttachedMode::Native))
            {
                log::warn!("{}: detaching XDP: {e}", attachment.iface);
            }
            if let Some(link) = attachment.tc_ingress {
                if let Err(e) = self.release(link, LinkKind::TcIngress) {
                    log::warn!("{}: detaching TC ingress: {e}", attachment.iface);
                }
                self.forget_forward_target(&attachment.iface);
            }
            detached.push(attachment.iface);
        }
        detached
    }

    /// The counters summed over CPUs.
    pub fn counters(&self) -> Result<Counters, DataPlaneError> {
        read_counters(self)
    }

    /// Packets and bytes per backend id, summed over CPUs: the backends the maps hold now that
    /// have carried any traffic since their id was given to them.
    pub fn backend_stats(&self) -> Result<BTreeMap<u32, BackendStats>, DataPlaneError> {
        read_backend_stats(self, self.contents.backends.keys().copied())
    }

    /// Every tracked flow entry (for tests and reports).
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowEntry)>, DataPlaneError> {
        read_flows(self)
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
    /// Without pins everything is detached; pinned links and maps stay (they are meant to
    /// outlive this process: [`DataPlane::remove_pins`] removes them).
    fn drop(&mut self) {
        if self.pins.is_none() {
            self.detach_all();
        }
    }
}

impl MapSource for DataPlane {
    fn map(&self, name: &'static str) -> Result<&Map, DataPlaneError> {
        self.ebpf
            .map(name)
            .ok_or(DataPlaneError::Missing { kind: "map", name })
    }
}

/// The TC program a link of `kind` runs.
fn tc_program_name(kind: LinkKind) -> &'static str {
    match kind {
        LinkKind::TcPod => program_names::TC_POD_INGRESS,
        LinkKind::TcIngress => program_names::TC_INGRESS,
        LinkKind::TcEgress | LinkKind::Xdp(_) => program_names::TC_EGRESS,
    }
}

fn pin_link(link: FdLink, path: PathBuf) -> Result<LinkHandle, DataPlaneError> {
    // Dropping the returned handle only closes this process's descriptor: the pin keeps the
    // link, and so the program, attached.
    link.pin(&path).map_err(|e| DataPlaneError::PinDir {
        path: path.clone(),
        reason: format!("cannot pin the link: {e}"),
    })?;
    Ok(LinkHandle::Pinned(path))
}

/// The counters summed over CPUs, from the agent's maps or pinned ones.
pub fn read_counters(maps: &impl MapSource) -> Result<Counters, DataPlaneError> {
    let read = |name: &'static str, count: u32| -> Result<Vec<u64>, DataPlaneError> {
        let array = maps.per_cpu_array::<u64>(name)?;
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
    let egress = read(map_names::EGRESS, EGRESS_SLOTS)?;
    Ok(Counters {
        egress: Egress::ALL
            .iter()
            .map(|&e| (e, egress.get(e as usize).copied().unwrap_or(0)))
            .collect(),
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

/// Every tracked flow entry, from the agent's maps or pinned ones.
pub fn read_flows(maps: &impl MapSource) -> Result<Vec<(FlowKey, FlowEntry)>, DataPlaneError> {
    let name = map_names::CONNTRACK;
    let table =
        HashMap::<_, FlowKey, FlowEntry>::try_from(maps.map(name)?).map_err(map_error(name))?;
    // Entries can vanish while we walk (the data path's LRU evicts): skip those.
    Ok(table.iter().filter_map(Result::ok).collect())
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

/// Reads the `BACKEND_STATS` map for backend ids `ids`, summed over CPUs; ids that counted
/// nothing are left out. Reads one slot per id (a syscall each), so pass the ids in use rather
/// than every slot. Works on the loaded object's map or on a pinned one
/// (`Map::PerCpuArray(MapData::from_pin(..)?)`).
pub fn read_backend_stats(
    source: &impl MapSource,
    ids: impl Iterator<Item = u32>,
) -> Result<BTreeMap<u32, BackendStats>, DataPlaneError> {
    let name = map_names::BACKEND_STATS;
    let array = source.per_cpu_array::<BackendStats>(name)?;
    let mut all = BTreeMap::new();
    for id in ids {
        let per_cpu = array.get(&id, 0).map_err(map_error(name))?;
        let mut sum = BackendStats::default();
        for cpu in per_cpu.iter() {
            sum.accumulate(cpu);
        }
        if !sum.is_zero() {
            all.insert(id, sum);
        }
    }
    Ok(all)
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
