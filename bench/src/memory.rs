//! Section 4: the kernel memory of the data path's maps, as the kernel accounts it (`memlock`
//! in `/proc/self/fdinfo` of each map's file descriptor), with the Services applied.

use std::collections::BTreeMap;

use aya::maps::MapInfo;
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct MapMemory {
    pub name: String,
    pub map_type: u32,
    pub max_entries: u64,
    pub memlock_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct MemoryRow {
    pub services: usize,
    pub endpoints_per_service: usize,
    pub maglev_table_size: u32,
    pub max_tables: u32,
    pub total_bytes: u64,
    pub maps: Vec<MapMemory>,
    /// `MAGLEV` bytes / `maxTables` + `FRONTENDS` bytes / its entries.
    pub per_service_bytes: f64,
    /// (`BACKENDS` + `BACKEND_STATS`) bytes / their entries.
    pub per_backend_bytes: f64,
    /// `CONNTRACK` bytes / its entries x 2 (a flow has a forward and a reply entry).
    pub per_flow_bytes: f64,
    /// Total / Services.
    pub total_per_service_bytes: f64,
}

#[derive(Debug, Serialize, Default)]
pub struct MemorySection {
    pub rows: Vec<MemoryRow>,
}

fn fdinfo_field(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.trim().strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
}

/// Every BPF map this process holds open, by name (the benchmark holds one data plane then).
#[must_use]
pub fn open_maps() -> Vec<MapMemory> {
    let mut by_id: BTreeMap<u64, MapMemory> = BTreeMap::new();
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    for fd in fds.flatten() {
        let is_map = std::fs::read_link(fd.path())
            .is_ok_and(|target| target.to_string_lossy() == "anon_inode:bpf-map");
        if !is_map {
            continue;
        }
        let Ok(info) =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.file_name().display()))
        else {
            continue;
        };
        let (Some(id), Some(memlock)) = (
            fdinfo_field(&info, "map_id"),
            fdinfo_field(&info, "memlock"),
        ) else {
            continue;
        };
        let name = u32::try_from(id)
            .ok()
            .and_then(|id| MapInfo::from_id(id).ok())
            .and_then(|i| i.name_as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("id {id}"));
        by_id.insert(
            id,
            MapMemory {
                name,
                map_type: u32::try_from(fdinfo_field(&info, "map_type").unwrap_or(0)).unwrap_or(0),
                max_entries: fdinfo_field(&info, "max_entries").unwrap_or(0),
                memlock_bytes: memlock,
            },
        );
    }
    let mut maps: Vec<MapMemory> = by_id.into_values().collect();
    maps.sort_by_key(|m| std::cmp::Reverse(m.memlock_bytes));
    maps
}

#[expect(clippy::cast_precision_loss, reason = "byte counts")]
pub fn row(
    services: usize,
    endpoints_per_service: usize,
    maglev_table_size: u32,
    max_tables: u32,
) -> MemoryRow {
    let maps = open_maps();
    let find = |name: &str| maps.iter().find(|m| m.name == name);
    let per_entry = |name: &str| {
        find(name).map_or(0.0, |m| {
            m.memlock_bytes as f64 / (m.max_entries.max(1)) as f64
        })
    };
    let total_bytes = maps.iter().map(|m| m.memlock_bytes).sum::<u64>();
    let maglev = find("MAGLEV").map_or(0.0, |m| m.memlock_bytes as f64);
    MemoryRow {
        services,
        endpoints_per_service,
        maglev_table_size,
        max_tables,
        total_bytes,
        per_service_bytes: maglev / f64::from(max_tables.max(1)) + per_entry("FRONTENDS"),
        per_backend_bytes: per_entry("BACKENDS") + per_entry("BACKEND_STATS"),
        per_flow_bytes: 2.0 * per_entry("CONNTRACK"),
        total_per_service_bytes: total_bytes as f64 / services.max(1) as f64,
        maps,
    }
}
