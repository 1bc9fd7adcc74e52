//! What outlives the agent: maps and links pinned under a bpffs directory (`--pin-dir`), the
//! agent's record of what it applied, and read-only access to all of it for `lb-agent status`.
//!
//! ```text
//! <pin_dir>/maps/<MAP_NAME>        every map the data path uses, and AGENT_RECORD
//! <pin_dir>/links/<kind>-<iface>   xdp-native-eth0, xdp-generic-eth0, tc-egress-eth0, tc-pod-veth1
//! ```
//!
//! A pinned link keeps its program attached with no process holding it, and a pinned map keeps
//! its contents, so the data plane forwards while no agent runs (also after `kill -9`). The XDP
//! link's name carries its mode because the kernel's link info does not say it.

use std::{
    borrow::{Borrow, BorrowMut},
    collections::BTreeMap,
    ffi::CString,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use aya::maps::{Array, Map, MapData, MapInfo, MapType, PerCpuArray};
use lb_common::{
    AffinityKey, AffinityValue, Backend, BackendStats, FlowEntry, FlowKey, FrontendKey, Service,
    Settings, SourceRangeKey, map_names,
};

use crate::dataplane::{AttachedMode, Counters, DataPlaneError, LoadOptions};

/// Where the host's bpffs is normally mounted; the agent mounts it there if it is missing.
const BPFFS_ROOT: &str = "/sys/fs/bpf";
/// `statfs` magic of a bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The map holding the agent's record of what it applied (see [`write_record`]). It is created
/// by the agent, not by the eBPF object.
pub const AGENT_RECORD: &str = "AGENT_RECORD";

/// The maps of the eBPF object that are pinned, with what the agent needs each to be. Every map
/// of the object must be listed here (a test checks it), or a restart would lose it.
#[expect(clippy::too_many_lines, reason = "one plain spec per map")]
fn map_specs(options: &LoadOptions, maglev_entries: u32) -> Vec<MapSpec> {
    use core::mem::size_of;
    let size = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    let spec = |name, map_type, key: usize, value: usize, max_entries, flags| MapSpec {
        name,
        map_type,
        key_size: size(key),
        value_size: size(value),
        max_entries,
        flags,
    };
    let index = size_of::<u32>();
    vec![
        spec(
            map_names::SETTINGS,
            MapType::Array,
            index,
            size_of::<Settings>(),
            1,
            0,
        ),
        spec(
            map_names::FRONTENDS,
            MapType::Hash,
            size_of::<FrontendKey>(),
            size_of::<Service>(),
            lb_common::MAX_FRONTENDS,
            0,
        ),
        spec(
            map_names::MAGLEV,
            MapType::Array,
            index,
            size_of::<[u32; 2]>(),
            maglev_entries,
            BPF_F_MMAPABLE,
        ),
        spec(
            map_names::BACKENDS,
            MapType::Array,
            index,
            size_of::<Backend>(),
            lb_common::MAX_BACKENDS,
            0,
        ),
        spec(
            map_names::SOURCE_RANGES,
            MapType::LpmTrie,
            index + size_of::<SourceRangeKey>(),
            size_of::<u8>(),
            lb_common::SOURCE_RANGE_ENTRIES,
            BPF_F_NO_PREALLOC,
        ),
        spec(
            map_names::AFFINITY,
            MapType::LruHash,
            size_of::<AffinityKey>(),
            size_of::<AffinityValue>(),
            lb_common::AFFINITY_ENTRIES,
            0,
        ),
        spec(
            map_names::CONNTRACK,
            MapType::LruHash,
            size_of::<FlowKey>(),
            size_of::<FlowEntry>(),
            options.conntrack_entries,
            0,
        ),
        spec(
            map_names::COUNTERS,
            MapType::PerCpuArray,
            index,
            size_of::<u64>(),
            lb_common::COUNTER_COUNT,
            0,
        ),
        spec(
            map_names::DROPS,
            MapType::PerCpuArray,
            index,
            size_of::<u64>(),
            lb_common::DROP_REASON_SLOTS,
            0,
        ),
        spec(
            map_names::EGRESS,
            MapType::PerCpuArray,
            index,
            size_of::<u64>(),
            lb_common::EGRESS_SLOTS,
            0,
        ),
        spec(
            map_names::FORWARD_TARGETS,
            MapType::DevMapHash,
            index,
            size_of::<u64>(),
            lb_common::MAX_FORWARD_TARGETS,
            // The kernel makes every device map read-only to programs.
            BPF_F_RDONLY_PROG,
        ),
        spec(
            map_names::BACKEND_STATS,
            MapType::PerCpuArray,
            index,
            size_of::<BackendStats>(),
            lb_common::MAX_BACKENDS,
            0,
        ),
    ]
}

const BPF_F_NO_PREALLOC: u32 = 1;
const BPF_F_MMAPABLE: u32 = 1 << 10;
const BPF_F_RDONLY_PROG: u32 = 1 << 7;

/// What a pinned map must be for this agent to use it.
#[derive(Clone, Debug, PartialEq)]
pub struct MapSpec {
    pub name: &'static str,
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl MapSpec {
    fn describe(&self) -> String {
        format!(
            "type {:?}, key {} bytes, value {} bytes, {} entries, flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }

    /// The spec of a map as the kernel reports it.
    pub fn of(name: &'static str, info: &MapInfo) -> Result<Self, DataPlaneError> {
        Ok(MapSpec {
            name,
            map_type: info
                .map_type()
                .map_err(|source| DataPlaneError::Map { name, source })?,
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        })
    }
}

/// The pinned maps' specs this agent needs, for `options` (also checked against the eBPF
/// object's own maps in the tests).
#[must_use]
pub fn pinned_map_specs(options: &LoadOptions, maglev_entries: u32) -> Vec<MapSpec> {
    let mut specs = map_specs(options, maglev_entries);
    specs.push(record_spec());
    specs
}

/// What a link pins: which program on which side of an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LinkKind {
    /// `lb_xdp_ingress`, in the mode it was attached in.
    Xdp(AttachedMode),
    /// `lb_tc_egress` on a node interface.
    TcEgress,
    /// `lb_tc_ingress` on a node interface.
    TcIngress,
    /// `lb_tc_pod_ingress` on a pod interface.
    TcPod,
}

impl LinkKind {
    const ALL: [LinkKind; 5] = [
        LinkKind::Xdp(AttachedMode::Native),
        LinkKind::Xdp(AttachedMode::Generic),
        LinkKind::TcEgress,
        LinkKind::TcIngress,
        LinkKind::TcPod,
    ];

    /// The prefix of its pin's file name.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            LinkKind::Xdp(AttachedMode::Native) => "xdp-native",
            LinkKind::Xdp(AttachedMode::Generic) => "xdp-generic",
            LinkKind::TcEgress => "tc-egress",
            LinkKind::TcIngress => "tc-ingress",
            LinkKind::TcPod => "tc-pod",
        }
    }

    /// Splits a link pin's file name into its kind and interface.
    #[must_use]
    pub fn parse(file_name: &str) -> Option<(LinkKind, String)> {
        LinkKind::ALL.iter().find_map(|&kind| {
            let iface = file_name.strip_prefix(kind.name())?.strip_prefix('-')?;
            (!iface.is_empty()).then(|| (kind, iface.to_owned()))
        })
    }
}

impl std::fmt::Display for LinkKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A pin directory on a bpffs, with its `maps` and `links` subdirectories.
#[derive(Clone, Debug)]
pub struct PinDir {
    root: PathBuf,
}

fn pin_error(path: &Path, what: impl std::fmt::Display) -> DataPlaneError {
    DataPlaneError::PinDir {
        path: path.to_owned(),
        reason: what.to_string(),
    }
}

impl PinDir {
    /// Makes sure `root` is on a bpffs (mounting the host's on `/sys/fs/bpf` if the directory
    /// is under it and nothing is mounted there) and creates its subdirectories.
    pub fn prepare(root: &Path) -> Result<Self, DataPlaneError> {
        let root = if root.is_absolute() {
            root.to_owned()
        } else {
            std::env::current_dir()
                .map_err(|e| pin_error(root, e))?
                .join(root)
        };
        let bpffs = Path::new(BPFFS_ROOT);
        if root.starts_with(bpffs) && !is_bpffs(bpffs) {
            mount_bpffs(bpffs)?;
        }
        let pins = PinDir { root };
        for dir in [pins.maps_dir(), pins.links_dir()] {
            std::fs::create_dir_all(&dir)
                .map_err(|e| pin_error(&dir, format!("cannot create the directory: {e}")))?;
        }
        if !is_bpffs(&pins.root) {
            return Err(pin_error(
                &pins.root,
                "is not on a bpffs; pins must live on the host's bpffs: mount one with `mount -t \
                 bpf bpf /sys/fs/bpf` and use a directory under it",
            ));
        }
        Ok(pins)
    }

    /// An existing pin directory, as it is (for readers and cleanup: nothing is created).
    #[must_use]
    pub fn existing(root: &Path) -> Self {
        PinDir {
            root: root.to_owned(),
        }
    }

    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    #[must_use]
    pub fn map_path(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    #[must_use]
    pub fn link_path(&self, kind: LinkKind, iface: &str) -> PathBuf {
        self.links_dir().join(format!("{}-{iface}", kind.name()))
    }

    /// Whether a previous agent left its maps here.
    #[must_use]
    pub fn has_pinned_maps(&self) -> bool {
        self.map_path(map_names::FRONTENDS).exists()
    }

    /// The pinned links, by kind and interface.
    #[must_use]
    pub fn links(&self) -> Vec<(LinkKind, String)> {
        let mut links: Vec<_> = file_names(&self.links_dir())
            .iter()
            .filter_map(|name| LinkKind::parse(name))
            .collect();
        links.sort();
        links
    }

    /// Refuses pinned maps that are not what this agent needs (another build, or other sizes):
    /// the loader would otherwise use them as they are.
    pub fn check_maps(&self, specs: &[MapSpec]) -> Result<(), DataPlaneError> {
        for needed in specs {
            let path = self.map_path(needed.name);
            if !path.exists() {
                continue;
            }
            let info = MapInfo::from_pin(&path).map_err(|source| DataPlaneError::Map {
                name: needed.name,
                source,
            })?;
            let pinned = MapSpec::of(needed.name, &info)?;
            if pinned != *needed {
                return Err(DataPlaneError::PinnedMapMismatch {
                    name: needed.name,
                    pinned: pinned.describe(),
                    needed: needed.describe(),
                    pin_dir: self.root.clone(),
                });
            }
        }
        Ok(())
    }

    /// Unpins every link (which detaches it: no process holds them) and every map, and removes
    /// the directories. Returns what it removed; nothing there is not an error.
    pub fn remove_all(&self) -> Result<Vec<PathBuf>, DataPlaneError> {
        let mut removed = Vec::new();
        // Links first: a program stays attached while its link is pinned.
        for dir in [self.links_dir(), self.maps_dir()] {
            for name in file_names(&dir) {
                let path = dir.join(name);
                std::fs::remove_file(&path)
                    .map_err(|e| pin_error(&path, format!("cannot unpin: {e}")))?;
                removed.push(path);
            }
            remove_dir_if_present(&dir)?;
        }
        remove_dir_if_present(&self.root)?;
        Ok(removed)
    }
}

fn remove_dir_if_present(dir: &Path) -> Result<(), DataPlaneError> {
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(pin_error(
            dir,
            format!("cannot remove the directory: {e} (something else is pinned in it?)"),
        )),
        _ => Ok(()),
    }
}

/// The names of the entries of `dir`; none if it does not exist.
fn file_names(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: an all-zero statfs is a valid value to be overwritten.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statfs to write into.
    let result = unsafe { libc::statfs(c_path.as_ptr(), &raw mut stat) };
    // f_type is an i64 with glibc on x86_64, a u64 with musl (the static agent of the image),
    // narrower on other targets: compare as i128, which holds all of them.
    #[allow(
        clippy::useless_conversion,
        reason = "a conversion on one target, none on another"
    )]
    let f_type = i128::from(stat.f_type);
    result == 0 && f_type == i128::from(BPF_FS_MAGIC)
}

/// `mount -t bpf bpf DIR`; a bpffs mounted there meanwhile is fine.
fn mount_bpffs(dir: &Path) -> Result<(), DataPlaneError> {
    let hint = "mount the host's bpffs with `mount -t bpf bpf /sys/fs/bpf` (in a container: \
                mount it from the host)";
    let c_dir = CString::new(dir.as_os_str().as_bytes()).map_err(|e| pin_error(dir, e))?;
    // SAFETY: NUL-terminated strings; no mount data.
    let result = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c_dir.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if result != 0 && !is_bpffs(dir) {
        let error = std::io::Error::last_os_error();
        return Err(pin_error(
            dir,
            format!("is not a bpffs and mounting one failed: {error}; {hint}"),
        ));
    }
    log::info!("mounted a bpffs on {}", dir.display());
    Ok(())
}

// ---- The agent's record ------------------------------------------------------------------------

/// One element of `AGENT_RECORD`.
pub type RecordChunk = [u8; RECORD_CHUNK];
const RECORD_CHUNK: usize = 4096;
/// The largest record: 8 MiB. A record is written into the half readers are not reading, then
/// the header switches to it, so the map holds two halves of this size.
pub const RECORD_CAPACITY: usize = 8 << 20;
#[expect(clippy::cast_possible_truncation, reason = "2048")]
const HALF_CHUNKS: u32 = (RECORD_CAPACITY / RECORD_CHUNK) as u32;
const RECORD_ENTRIES: u32 = 1 + 2 * HALF_CHUNKS;
const RECORD_MAGIC: [u8; 4] = *b"LBRC";
const RECORD_VERSION: u32 = 1;

fn record_spec() -> MapSpec {
    MapSpec {
        name: AGENT_RECORD,
        map_type: MapType::Array,
        key_size: 4,
        value_size: u32::try_from(RECORD_CHUNK).unwrap_or(u32::MAX),
        max_entries: RECORD_ENTRIES,
        flags: 0,
    }
}

/// The record map: pinned as `maps/AGENT_RECORD` when there is a pin directory (an existing one
/// is adopted), unpinned otherwise.
pub fn open_or_create_record(
    pins: Option<&PinDir>,
) -> Result<Array<MapData, RecordChunk>, DataPlaneError> {
    let name = AGENT_RECORD;
    let error = |source| DataPlaneError::Map { name, source };
    if let Some(pins) = pins {
        let path = pins.map_path(name);
        if path.exists() {
            let data = MapData::from_pin(&path).map_err(error)?;
            return Array::try_from(Map::from_map_data(data).map_err(error)?).map_err(error);
        }
    }
    let array = Array::<MapData, RecordChunk>::create(RECORD_ENTRIES, 0).map_err(error)?;
    if let Some(pins) = pins {
        let path = pins.map_path(name);
        aya::maps::IterableMap::map(&array)
            .pin(&path)
            .map_err(|e| pin_error(&path, format!("cannot pin: {e}")))?;
    }
    Ok(array)
}

/// The header in element 0: which half holds the current record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RecordHeader {
    /// 0: nothing written yet. Grows by one per write.
    generation: u64,
    len: u64,
    half: u32,
    /// FNV-1a of the record's bytes.
    digest: u64,
}

impl RecordHeader {
    fn encode(self) -> RecordChunk {
        let mut chunk = [0; RECORD_CHUNK];
        let fields = [
            &RECORD_MAGIC[..],
            &RECORD_VERSION.to_le_bytes(),
            &self.generation.to_le_bytes(),
            &self.len.to_le_bytes(),
            &self.half.to_le_bytes(),
            &self.digest.to_le_bytes(),
        ];
        let mut at = 0;
        for field in fields {
            chunk[at..at + field.len()].copy_from_slice(field);
            at += field.len();
        }
        // A check over the fields, so a header read while it was being written is recognised.
        let check = fnv1a(&chunk[..at]);
        chunk[at..at + 8].copy_from_slice(&check.to_le_bytes());
        chunk
    }

    /// `None` for a header never written or read torn.
    fn decode(chunk: &RecordChunk) -> Option<Self> {
        let u32_at = |at: usize| Some(u32::from_le_bytes(chunk.get(at..at + 4)?.try_into().ok()?));
        let u64_at = |at: usize| Some(u64::from_le_bytes(chunk.get(at..at + 8)?.try_into().ok()?));
        if chunk[..4] != RECORD_MAGIC || u32_at(4)? != RECORD_VERSION {
            return None;
        }
        if u64_at(36)? != fnv1a(&chunk[..36]) {
            return None;
        }
        Some(RecordHeader {
            generation: u64_at(8)?,
            len: u64_at(16)?,
            half: u32_at(24)?,
            digest: u64_at(28)?,
        })
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn record_error(source: aya::maps::MapError) -> DataPlaneError {
    DataPlaneError::Map {
        name: AGENT_RECORD,
        source,
    }
}

fn read_header<T: Borrow<MapData>>(
    map: &Array<T, RecordChunk>,
) -> Result<Option<RecordHeader>, DataPlaneError> {
    Ok(RecordHeader::decode(&map.get(&0, 0).map_err(record_error)?))
}

/// Stores `bytes` as the current record. Readers see the previous record until the header
/// switches to this one. A record above [`RECORD_CAPACITY`] is refused with an error and the
/// previous record stays current.
pub fn write_record<T: BorrowMut<MapData>>(
    map: &mut Array<T, RecordChunk>,
    bytes: &[u8],
) -> Result<(), DataPlaneError> {
    if bytes.len() > RECORD_CAPACITY {
        return Err(DataPlaneError::RecordTooLarge {
            len: bytes.len(),
            max: RECORD_CAPACITY,
        });
    }
    let current = read_header(map)?;
    let half = current.map_or(0, |h| 1 - (h.half & 1));
    let first = 1 + half * HALF_CHUNKS;
    for (i, part) in bytes.chunks(RECORD_CHUNK).enumerate() {
        let mut chunk = [0; RECORD_CHUNK];
        chunk[..part.len()].copy_from_slice(part);
        let index = first + u32::try_from(i).unwrap_or(u32::MAX);
        map.set(index, chunk, 0).map_err(record_error)?;
    }
    let header = RecordHeader {
        generation: current.map_or(0, |h| h.generation) + 1,
        len: bytes.len() as u64,
        half,
        digest: fnv1a(bytes),
    };
    map.set(0, header.encode(), 0).map_err(record_error)
}

/// The current record, `None` if none was written. A record being replaced while it is read is
/// read again, so the result is always one whole record.
pub fn read_record<T: Borrow<MapData>>(
    map: &Array<T, RecordChunk>,
) -> Result<Option<Vec<u8>>, DataPlaneError> {
    const ATTEMPTS: usize = 20;
    for _ in 0..ATTEMPTS {
        let Some(header) = read_header(map)? else {
            let first = map.get(&0, 0).map_err(record_error)?;
            if first.iter().all(|&b| b == 0) {
                return Ok(None);
            }
            // Read while it was being written: try again.
            continue;
        };
        let len = usize::try_from(header.len).unwrap_or(usize::MAX);
        if len > RECORD_CAPACITY || header.half > 1 {
            return Err(DataPlaneError::RecordCorrupt(format!(
                "header says {len} bytes in half {}",
                header.half
            )));
        }
        let first = 1 + header.half * HALF_CHUNKS;
        let mut bytes = Vec::with_capacity(len);
        let mut index = first;
        while bytes.len() < len {
            let chunk = map.get(&index, 0).map_err(record_error)?;
            let take = (len - bytes.len()).min(RECORD_CHUNK);
            bytes.extend_from_slice(&chunk[..take]);
            index += 1;
        }
        // A writer only overwrites this half after switching the header away from it, so an
        // unchanged header means the copy is whole; the digest catches anything else.
        if read_header(map)? == Some(header) && fnv1a(&bytes) == header.digest {
            return Ok(Some(bytes));
        }
    }
    Err(DataPlaneError::RecordCorrupt(format!(
        "it changed or did not match its digest in {ATTEMPTS} reads in a row"
    )))
}

// ---- Reading pinned state ----------------------------------------------------------------------

/// Maps by name, as the agent's loaded object and the pinned directory both provide them; the
/// readers below work on either.
pub trait MapSource {
    /// The map `name`, or an error naming it.
    fn map(&self, name: &'static str) -> Result<&Map, DataPlaneError>;

    /// A per-CPU array by name, for example
    /// `source.per_cpu_array::<BackendStats>(map_names::BACKEND_STATS)`.
    fn per_cpu_array<V: aya::Pod>(
        &self,
        name: &'static str,
    ) -> Result<PerCpuArray<&MapData, V>, DataPlaneError> {
        PerCpuArray::try_from(self.map(name)?)
            .map_err(|source| DataPlaneError::Map { name, source })
    }
}

/// The pinned maps of a data plane, opened for reading: what `lb-agent status` shows, while the
/// agent runs and after it stopped.
pub struct PinnedDataPlane {
    pins: PinDir,
    maps: BTreeMap<String, Map>,
}

impl PinnedDataPlane {
    /// Opens every map pinned under `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Self, DataPlaneError> {
        let pins = PinDir::existing(pin_dir);
        let names = file_names(&pins.maps_dir());
        if names.is_empty() {
            return Err(pin_error(
                pin_dir,
                "has no pinned maps: is an agent running (or was one) with this --pin-dir?",
            ));
        }
        let mut maps = BTreeMap::new();
        for name in names {
            let path = pins.map_path(&name);
            let map = MapData::from_pin(&path)
                .and_then(Map::from_map_data)
                .map_err(|e| pin_error(&path, format!("cannot open the pinned map: {e}")))?;
            maps.insert(name, map);
        }
        Ok(PinnedDataPlane { pins, maps })
    }

    /// The counters summed over CPUs.
    pub fn counters(&self) -> Result<Counters, DataPlaneError> {
        crate::dataplane::read_counters(self)
    }

    /// Every tracked flow entry.
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowEntry)>, DataPlaneError> {
        crate::dataplane::read_flows(self)
    }

    /// The agent's last record, `None` if it wrote none.
    pub fn record(&self) -> Result<Option<Vec<u8>>, DataPlaneError> {
        let array: Array<&MapData, RecordChunk> =
            Array::try_from(self.map(AGENT_RECORD)?).map_err(record_error)?;
        read_record(&array)
    }

    /// The pinned links: what is attached where.
    #[must_use]
    pub fn links(&self) -> Vec<(LinkKind, String)> {
        self.pins.links()
    }
}

impl MapSource for PinnedDataPlane {
    fn map(&self, name: &'static str) -> Result<&Map, DataPlaneError> {
        self.maps.get(name).ok_or_else(|| {
            pin_error(
                &self.pins.map_path(name),
                "is not pinned (an agent of another version?)",
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_round_trip_including_dashes_in_interface_names() {
        for kind in LinkKind::ALL {
            let name = format!("{}-veth-a1", kind.name());
            assert_eq!(LinkKind::parse(&name), Some((kind, "veth-a1".to_owned())));
        }
        assert_eq!(LinkKind::parse("xdp-native-"), None);
        assert_eq!(LinkKind::parse("xdp-eth0"), None);
        assert_eq!(LinkKind::parse("other"), None);
    }

    #[test]
    fn a_header_survives_encoding_and_a_torn_one_is_refused() {
        let header = RecordHeader {
            generation: 7,
            len: 12_345,
            half: 1,
            digest: 0xdead_beef,
        };
        let mut chunk = header.encode();
        assert_eq!(RecordHeader::decode(&chunk), Some(header));
        // A length from another write: the check no longer matches.
        chunk[16] ^= 1;
        assert_eq!(RecordHeader::decode(&chunk), None);
        assert_eq!(RecordHeader::decode(&[0; RECORD_CHUNK]), None);
    }
}
