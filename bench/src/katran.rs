//! The peer: the Katran-derived XDP load balancer of the kernel's BPF selftests
//! (`tools/testing/selftests/bpf/progs/test_xdp_noinline.c`), taken from Debian's
//! `linux-source-6.1` at bench time into a scratch directory (nothing of it is committed),
//! built with Debian's clang, loaded with aya and driven exactly as its own test
//! (`prog_tests/xdp_noinline.c`) drives it: one VIP, one ring slot, one real, and its IPv4 test
//! packet (`pkt_v4` of `network_helpers.c`), whose flow hash the program checks.
//!
//! In 6.1 the program writes the real's address over the first 4 bytes and returns `XDP_DROP`
//! after encapsulating; it skips its connection-table insert (a rate limiter), so a repeat is a
//! new flow without an insert. The per-CPU `stats[VIP_NUM].v1` grows by one per repeat: that,
//! the verdict and the magic value prove every repeat took the whole path.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::Xdp,
};

use crate::testrun::timed;

const TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
const SOURCE: &str = "linux-source-6.1/tools/testing/selftests/bpf/progs/test_xdp_noinline.c";
/// From `network_helpers.h`.
const MAGIC_VAL: u32 = 0x1234;
const VIP_NUM: u32 = 5;
const MAGIC_BYTES: u16 = 123;
/// `prog_tests/xdp_noinline.c`: ring slot 11 (2 * `VIP_NUM` + hash % 2) holds real 3.
const CH_KEY: u32 = 11;
const REAL_NUM: u32 = 3;
const XDP_DROP: u32 = 1;
const PROGRAM: &str = "balancer_ingress_v4";

/// Debian clang versions that build it (16 is the one seen working).
const CLANGS: [&str; 3] = ["clang-16", "clang-19", "clang"];

pub struct Katran {
    ebpf: Ebpf,
    stats: PerCpuArray<MapData, [u64; 2]>,
    frame: Vec<u8>,
    pub clang: String,
}

/// Extracts the source (once per scratch directory) and builds the object.
pub fn build(scratch: &Path) -> anyhow::Result<(PathBuf, String)> {
    let dir = scratch.join("katran");
    let source = dir.join(SOURCE);
    if !source.exists() {
        std::fs::create_dir_all(&dir)?;
        let status = Command::new("tar")
            .args(["-xJf", TARBALL, "-C"])
            .arg(&dir)
            .arg(SOURCE)
            .status()
            .context("running tar")?;
        ensure!(
            status.success(),
            "extracting {SOURCE} from {TARBALL} failed (apt-get install linux-source-6.1)"
        );
    }
    // glibc's headers ask for gnu/stubs-32.h under -target bpf; an empty one is enough.
    let stubs = dir.join("include/gnu");
    std::fs::create_dir_all(&stubs)?;
    std::fs::write(stubs.join("stubs-32.h"), "")?;
    let object = dir.join("test_xdp_noinline.o");
    let clang = CLANGS
        .iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .context("no clang found (apt-get install clang-16)")?;
    let version = crate::report::first_line(clang, &["--version"]);
    let output = Command::new(clang)
        .args(["-O2", "-g", "-target", "bpf", "-w", "-I"])
        .arg(dir.join("include"))
        .args(["-I", "/usr/include/x86_64-linux-gnu", "-c"])
        .arg(&source)
        .arg("-o")
        .arg(&object)
        .output()
        .context("running clang")?;
    if !output.status.success() {
        bail!(
            "building the Katran peer failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok((object, version))
}

/// `pkt_v4` of the selftests' `network_helpers.c`: Ethernet (zero addresses), IPv4 with IHL 5,
/// protocol TCP, total length `MAGIC_BYTES` and every other field 0, TCP with data offset 5 and
/// urgent pointer 123 (stored in host order, as the C initialiser does).
fn pkt_v4() -> Vec<u8> {
    let mut frame = vec![0_u8; 14 + 20 + 20];
    frame[12..14].copy_from_slice(&0x0800_u16.to_be_bytes());
    frame[14] = 0x05;
    frame[16..18].copy_from_slice(&MAGIC_BYTES.to_be_bytes());
    frame[23] = 6;
    frame[34 + 12] = 0x50;
    frame[34 + 18..34 + 20].copy_from_slice(&123_u16.to_ne_bytes());
    frame
}

impl Katran {
    pub fn load(object: &Path, clang: String) -> anyhow::Result<Self> {
        let mut ebpf = Ebpf::load_file(object).context("loading test_xdp_noinline.o with aya")?;
        {
            // struct vip_definition: 16 address bytes, port, family, proto, padding (24).
            let mut vip = [0_u8; 24];
            vip[20] = 6;
            // struct vip_meta { flags, vip_num }.
            let mut meta = [0_u8; 8];
            meta[4..8].copy_from_slice(&VIP_NUM.to_ne_bytes());
            let mut vips: HashMap<&mut MapData, [u8; 24], [u8; 8]> =
                HashMap::try_from(ebpf.map_mut("vip_map").context("vip_map")?)?;
            vips.insert(vip, meta, 0)?;
            let mut rings: Array<&mut MapData, u32> =
                Array::try_from(ebpf.map_mut("ch_rings").context("ch_rings")?)?;
            rings.set(CH_KEY, REAL_NUM, 0)?;
            // struct real_definition: 16 address bytes, flags, padding (20).
            let mut real = [0_u8; 20];
            real[0..4].copy_from_slice(&MAGIC_VAL.to_ne_bytes());
            let mut reals: Array<&mut MapData, [u8; 20]> =
                Array::try_from(ebpf.map_mut("reals").context("reals")?)?;
            reals.set(REAL_NUM, real, 0)?;
        }
        let stats: PerCpuArray<MapData, [u64; 2]> =
            PerCpuArray::try_from(ebpf.take_map("stats").context("stats")?)?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .context("no balancer_ingress_v4")?
            .try_into()?;
        program
            .load()
            .context("the kernel refused balancer_ingress_v4")?;
        Ok(Katran {
            ebpf,
            stats,
            frame: pkt_v4(),
            clang,
        })
    }

    fn packets(&self) -> anyhow::Result<u64> {
        // struct lb_stats { v2, v1 }: v1 counts packets.
        Ok(self.stats.get(&VIP_NUM, 0)?.iter().map(|s| s[1]).sum())
    }

    pub fn run(&mut self, repeat: u32) -> anyhow::Result<(f64, Vec<String>)> {
        let before = self.packets()?;
        let program: &Xdp = self
            .ebpf
            .program(PROGRAM)
            .context("no balancer_ingress_v4")?
            .try_into()?;
        let t = timed(program, &self.frame, repeat)?;
        let after = self.packets()?;
        ensure!(t.verdict == XDP_DROP, "katran: verdict {}", t.verdict);
        ensure!(t.out.len() == 54, "katran: output of {} bytes", t.out.len());
        let magic = u32::from_ne_bytes([t.out[0], t.out[1], t.out[2], t.out[3]]);
        ensure!(magic == MAGIC_VAL, "katran: magic {magic:#x}");
        ensure!(
            after - before == u64::from(repeat),
            "katran: stats[VIP_NUM] grew by {} for {repeat} repeats",
            after - before
        );
        Ok((
            t.ns,
            vec![
                "verdict XDP_DROP, real's address written (magic), 54-byte output".to_owned(),
                format!("stats[VIP_NUM].pkts exactly +{repeat}"),
            ],
        ))
    }
}
