//! Restarts without loss, in one process: a data plane pinned under a bpffs directory, dropped
//! without removal and loaded again, adopts the maps with what they hold; pinned maps of other
//! sizes are refused; the agent record is never read half written; cleanup removes everything.
//! Each test pins under its own directory in /sys/fs/bpf, removed by a guard. Needs root.

use std::{net::Ipv4Addr, path::PathBuf};

use aya::maps::{HashMap, MapData};
use lb_common::{FlowEntry, FlowKey, IPPROTO_TCP, map_names};
use lb_userspace::{
    dataplane::{DataPlane, DataPlaneError, EBPF_OBJECT, LoadOptions},
    maps::MapContents,
    model::{DesiredState, Ipv4Cidr, Protocol, TrafficPolicy},
    pins::{self, MapSpec, PinDir, PinnedDataPlane},
};

mod pinned;
use pinned::{MAGLEV_SIZE, MAX_TABLES, NODE, Pins, endpoint, node, port};

/// TCP and UDP services, a Local policy (two tables for one port) and source ranges.
fn state() -> DesiredState {
    let mut local = port(
        "local",
        3,
        Protocol::Tcp,
        vec![endpoint(5, NODE), endpoint(6, "node-b")],
    );
    local.external_policy = TrafficPolicy::Local;
    local.source_ranges = vec![Ipv4Cidr {
        addr: Ipv4Addr::new(203, 0, 113, 0),
        prefix_len: 24,
    }];
    DesiredState {
        service_ports: vec![
            port(
                "web",
                1,
                Protocol::Tcp,
                vec![endpoint(1, NODE), endpoint(2, "node-b")],
            ),
            port("dns", 2, Protocol::Udp, vec![endpoint(3, NODE)]),
            local,
            port("empty", 4, Protocol::Tcp, vec![]),
        ],
    }
}

fn contents(previous: &MapContents) -> MapContents {
    MapContents::from_state(&state(), &node(), previous)
        .unwrap_or_else(|e| panic!("the test state does not fit: {e}"))
}

/// What the maps themselves hold (names are not in the maps).
fn in_maps(contents: &MapContents) -> MapContents {
    MapContents {
        service_ids: std::collections::BTreeMap::new(),
        service_names: std::collections::BTreeMap::new(),
        ..contents.clone()
    }
}

fn flow() -> (FlowKey, FlowEntry) {
    let key = FlowKey {
        src_addr_be: u32::from_ne_bytes([203, 0, 113, 9]),
        dst_addr_be: u32::from_ne_bytes([10, 96, 0, 1]),
        src_port_be: 40_000u16.to_be(),
        dst_port_be: 80u16.to_be(),
        protocol: IPPROTO_TCP,
        direction: lb_common::direction::FORWARD,
        _pad: [0; 2],
    };
    let entry = FlowEntry {
        nat_addr_be: u32::from_ne_bytes([10, 244, 1, 1]),
        nat_port_be: 8080u16.to_be(),
        service_id: 1,
        backend_id: 1,
        expires_ns: u64::MAX,
        ..FlowEntry::default()
    };
    (key, entry)
}

#[test]
fn a_restarted_data_plane_adopts_the_pinned_maps_and_rewrites_nothing() {
    let pins = Pins::new();
    let applied = contents(&MapContents::default());
    {
        let mut dp = pins.load();
        assert_eq!(dp.contents(), &MapContents::default(), "nothing pinned yet");
        dp.apply(applied.clone()).expect("first apply");
        // A tracked connection, as the data path would have inserted it.
        let conntrack = MapData::from_pin(pins.0.join("maps").join(map_names::CONNTRACK))
            .expect("pinned CONNTRACK");
        let mut conntrack: HashMap<MapData, FlowKey, FlowEntry> =
            HashMap::try_from(aya::maps::Map::from_map_data(conntrack).expect("map"))
                .expect("hash map");
        let (key, entry) = flow();
        conntrack.insert(key, entry, 0).expect("inserting a flow");
        // Dropped without removal, as after SIGTERM with --on-exit keep or kill -9.
    }
    let mut dp = pins.load();
    assert_eq!(
        in_maps(dp.contents()),
        in_maps(&applied),
        "the contents read back from the pinned maps"
    );
    assert!(
        dp.flows().expect("flows").contains(&flow()),
        "tracked flows survive"
    );
    let again = contents(dp.contents());
    assert_eq!(again.service_ids, applied.service_ids, "ids are kept");
    assert_eq!(again.backend_ids, applied.backend_ids, "ids are kept");
    assert_eq!(dp.apply(again).expect("apply after adoption"), 0);

    // A change after adoption is a normal diff: one more endpoint rewrites web's table.
    let mut changed = state();
    changed.service_ports[0].endpoints.push(endpoint(7, NODE));
    let next = MapContents::from_state(&changed, &node(), dp.contents()).expect("fits");
    assert!(dp.apply(next.clone()).expect("apply a change") > 0);
    drop(dp);
    let dp = pins.load();
    assert_eq!(in_maps(dp.contents()), in_maps(&next));
}

#[test]
fn a_pinned_map_of_another_size_is_refused_with_the_cleanup_hint() {
    let pins = Pins::new();
    drop(pins.load());
    let bigger = LoadOptions {
        conntrack_entries: 2048,
        ..pins.options()
    };
    let Err(error) = DataPlane::load(bigger) else {
        panic!("a CONNTRACK of another size was adopted")
    };
    assert!(
        matches!(error, DataPlaneError::PinnedMapMismatch { name, .. } if name == map_names::CONNTRACK),
        "{error}"
    );
    let message = error.to_string();
    assert!(
        message.contains(&format!("lb-agent cleanup --pin-dir {}", pins.0.display())),
        "{message}"
    );
    // The same sizes still load.
    drop(pins.load());
}

#[test]
fn every_map_of_the_object_is_pinned_as_specified() {
    let options = LoadOptions {
        conntrack_entries: 1024,
        max_tables: MAX_TABLES,
        maglev_table_size: MAGLEV_SIZE,
        pin_dir: None,
        ..LoadOptions::default()
    };
    let entries = options.maglev_entries().expect("sizes");
    let specs = pins::pinned_map_specs(&options, entries);
    let ebpf = aya::EbpfLoader::new()
        .map_max_entries(map_names::MAGLEV, entries)
        .map_max_entries(map_names::CONNTRACK, options.conntrack_entries)
        .load(EBPF_OBJECT)
        .expect("loading the object");
    for (name, map) in ebpf.maps() {
        if name.starts_with('.') {
            continue;
        }
        let spec = specs
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("map {name} is not pinned: add it to pins::map_specs"));
        let data: &MapData = match map {
            aya::maps::Map::Array(d)
            | aya::maps::Map::HashMap(d)
            | aya::maps::Map::LruHashMap(d)
            | aya::maps::Map::LpmTrie(d)
            | aya::maps::Map::PerCpuArray(d)
            | aya::maps::Map::DevMapHash(d) => d,
            other => panic!("map {name} has an unexpected type: {other:?}"),
        };
        let info = data.info().expect("map info");
        assert_eq!(
            &MapSpec::of(spec.name, &info).expect("spec"),
            spec,
            "map {name}"
        );
    }
}

#[test]
fn the_record_is_read_whole_by_another_handle_while_it_is_rewritten() {
    let pins = Pins::new();
    let mut dp = pins.load();
    assert_eq!(dp.record().expect("record"), None);
    dp.write_record(b"{\"generation\":1}")
        .expect("small record");
    assert_eq!(
        dp.record().expect("record").as_deref(),
        Some(&b"{\"generation\":1}"[..])
    );
    let largest = vec![b'x'; pins::RECORD_CAPACITY];
    dp.write_record(&largest).expect("the largest record");
    let reader = PinnedDataPlane::open(&pins.0).expect("opening the pins");
    assert_eq!(reader.record().expect("record"), Some(largest));
    // Too large: refused, the previous record stays.
    let error = dp
        .write_record(&vec![b'y'; pins::RECORD_CAPACITY + 1])
        .expect_err("a record above the capacity");
    assert!(
        matches!(error, DataPlaneError::RecordTooLarge { .. }),
        "{error}"
    );
    assert_eq!(
        reader.record().expect("record").map(|r| r.len()),
        Some(pins::RECORD_CAPACITY)
    );

    // Records of uniform bytes and different lengths: a reader mixing two would see both.
    let done = std::sync::atomic::AtomicBool::new(false);
    let reads = std::thread::scope(|scope| {
        let handle = scope.spawn(|| {
            let mut reads = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let record = reader.record().expect("record").expect("written");
                let first = record[0];
                let expected_len = 100_000 + usize::from(first) * 1000;
                assert_eq!(record.len(), expected_len, "length of a '{first}' record");
                assert!(record.iter().all(|&b| b == first), "mixed record");
                reads += 1;
            }
            reads
        });
        for i in 0..200u8 {
            let fill = b'a' + i % 26;
            dp.write_record(&vec![fill; 100_000 + usize::from(fill) * 1000])
                .expect("write");
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        handle.join().expect("reader")
    });
    assert!(reads > 0);
}

#[test]
fn cleanup_unpins_everything_and_a_second_cleanup_finds_nothing() {
    let pins = Pins::new();
    let mut dp = pins.load();
    dp.write_record(b"x").expect("record");
    drop(dp);
    let opened = PinnedDataPlane::open(&pins.0).expect("pins");
    assert_eq!(
        opened
            .counters()
            .expect("counters")
            .get(lb_common::Counter::XdpSeen),
        0
    );
    drop(opened);
    let removed = PinDir::existing(&pins.0).remove_all().expect("cleanup");
    assert!(
        removed
            .iter()
            .any(|p| p.ends_with(format!("maps/{}", map_names::CONNTRACK))),
        "{removed:?}"
    );
    assert!(
        removed.iter().any(|p| p.ends_with("maps/AGENT_RECORD")),
        "{removed:?}"
    );
    assert!(!pins.0.exists(), "the pin directory is gone");
    assert_eq!(
        PinDir::existing(&pins.0).remove_all().expect("again"),
        Vec::<PathBuf>::new()
    );
    assert!(PinnedDataPlane::open(&pins.0).is_err());
}
