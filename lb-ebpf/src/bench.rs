//! Benchmark-only programs and hooks: compiled only with the `bench` feature, which the
//! production object (`lb-agent`'s) never has. `lb-bench` loads the object built with it.
//!
//! - `bench_xdp_pass`: `XDP_PASS` and nothing else, the floor of a test run.
//! - `bench_xdp_sink`: counts every frame (`BENCH_SINK`) and drops it: the end of the live
//!   forwarding topology.
//! - `bench_xdp_redirect`: redirects every frame to `BENCH_CTL[REDIRECT_IFINDEX]`, the ceiling
//!   of forwarding on this machine.
//! - `bench_xdp_gen`: the live-frames traffic generator. Pages of a live-frames test run are
//!   recycled with whatever the previous run left in them, so it writes the whole frame from
//!   `BENCH_TEMPLATE` every time, then varies the source as `BENCH_CTL[GEN_MODE]` says, and
//!   sends the frame out of its interface (`XDP_TX`).
//! - [`new_flow_prologue`], called first by `lb_xdp_ingress`: with `BENCH_CTL[NEW_FLOW]` set,
//!   it gives every frame a source address and port never used before, so every repeat of a
//!   `BPF_PROG_TEST_RUN` is a new flow (test-run does not restore the frame between repeats,
//!   and the same tuple would hit the entry the first repeat tracked).

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_redirect,
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};
use lb_common::bench_ctl::{
    GEN_64K_FLOWS, GEN_MODE, GEN_NEW_FLOWS, GEN_ONE_FLOW, GEN_SEQ, NEW_FLOW, NEW_FLOW_SEQ,
    REDIRECT_IFINDEX, SINK_PORT, SLOTS as CTL_SLOTS,
};

use crate::parse::ptr_at;

/// The generator's frame: Ethernet + IPv4 (no options) + UDP, 64 bytes.
const FRAME_LEN: usize = 64;
const IPV4_PROTO_AT: usize = 14 + 9;
const IPPROTO_UDP: u8 = 17;
const IPV4_CHECK_AT: usize = 14 + 10;
const IPV4_SRC_AT: usize = 14 + 12;
const UDP_SRC_PORT_AT: usize = 14 + 20;

#[map(name = "BENCH_CTL")]
static BENCH_CTL: Array<u64> = Array::with_max_entries(CTL_SLOTS, 0);

#[map(name = "BENCH_TEMPLATE")]
static BENCH_TEMPLATE: Array<[u64; FRAME_LEN / 8]> = Array::with_max_entries(1, 0);

/// Frames the sink saw (slot 0), per CPU.
#[map(name = "BENCH_SINK")]
static BENCH_SINK: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Frames the generator wrote (slot 0), per CPU.
#[map(name = "BENCH_GEN_COUNT")]
static BENCH_GEN_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn ctl(slot: u32) -> u64 {
    BENCH_CTL.get(slot).copied().unwrap_or(0)
}

/// Returns the sequence number in `slot` and increments it. Test runs and the generator run
/// on one CPU at a time, so a plain increment does not race.
#[inline(always)]
fn next_seq(slot: u32) -> Option<u64> {
    let seq = BENCH_CTL.get_ptr_mut(slot)?;
    // SAFETY: a valid array value pointer from a successful lookup.
    unsafe {
        let value = *seq;
        *seq = value.wrapping_add(1);
        Some(value)
    }
}

#[inline(always)]
fn count(map: &PerCpuArray<u64>) {
    if let Some(slot) = map.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array, written only by this CPU.
        unsafe { *slot += 1 };
    }
}

/// Gives the frame a source never used before when `BENCH_CTL[NEW_FLOW]` is set: the low 16
/// bits of the IPv4 source address and the L4 source port come from a sequence number (an
/// untagged IPv4 frame without options, as the benchmark sends). Checksums are left as they
/// are: the data path updates them incrementally and never verifies them.
#[inline(always)]
pub fn new_flow_prologue(ctx: &XdpContext) {
    if ctl(NEW_FLOW) == 0 {
        return;
    }
    let Some(seq) = next_seq(NEW_FLOW_SEQ) else {
        return;
    };
    #[expect(
        clippy::cast_possible_truncation,
        reason = "16 bits of the sequence each"
    )]
    let (addr_low, port) = ((seq >> 16) as u16, seq as u16);
    if let (Some(addr), Some(sport)) = (
        ptr_at::<[u8; 2]>(ctx, IPV4_SRC_AT + 2),
        ptr_at::<[u8; 2]>(ctx, UDP_SRC_PORT_AT),
    ) {
        // SAFETY: `ptr_at` checked both lie inside the packet.
        unsafe {
            addr.write_unaligned(addr_low.to_be_bytes());
            sport.write_unaligned(port.to_be_bytes());
        }
    }
}

#[xdp]
pub fn bench_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Counts (in `BENCH_SINK`) the IPv4 UDP frames to port `BENCH_CTL[SINK_PORT]` (the endpoints'
/// port, so only translated frames count) and drops every frame.
#[xdp]
pub fn bench_xdp_sink(ctx: XdpContext) -> u32 {
    if let Some(frame) = ptr_at::<[u8; UDP_SRC_PORT_AT + 4]>(&ctx, 0) {
        // SAFETY: `ptr_at` checked the bytes lie inside the packet.
        let frame = unsafe { frame.read_unaligned() };
        let port = u16::from_be_bytes([frame[UDP_SRC_PORT_AT + 2], frame[UDP_SRC_PORT_AT + 3]]);
        if frame[12] == 0x08
            && frame[13] == 0x00
            && frame[IPV4_PROTO_AT] == IPPROTO_UDP
            && u64::from(port) == ctl(SINK_PORT)
        {
            count(&BENCH_SINK);
        }
    }
    xdp_action::XDP_DROP
}

#[xdp]
pub fn bench_xdp_redirect(_ctx: XdpContext) -> u32 {
    #[expect(clippy::cast_possible_truncation, reason = "an ifindex fits in u32")]
    let ifindex = ctl(REDIRECT_IFINDEX) as u32;
    // SAFETY: a helper taking plain integers.
    #[expect(clippy::cast_possible_truncation, reason = "XDP verdicts fit in u32")]
    let verdict = unsafe { bpf_redirect(ifindex, 0) } as u32;
    verdict
}

/// One's complement sum of the 16-bit words, folded.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    #[expect(
        clippy::cast_possible_truncation,
        reason = "folded twice: fits 16 bits"
    )]
    let folded = sum as u16;
    folded
}

#[xdp]
pub fn bench_xdp_gen(ctx: XdpContext) -> u32 {
    // One bounds check for the whole frame; every write below is at a constant offset from it
    // (several checked pointers let LLVM mix them in ways the verifier refuses).
    let (Some(frame), Some(template)) = (ptr_at::<[u8; FRAME_LEN]>(&ctx, 0), BENCH_TEMPLATE.get(0))
    else {
        return xdp_action::XDP_ABORTED;
    };
    let base = frame.cast::<u8>();
    // SAFETY: `ptr_at` checked that FRAME_LEN bytes from `base` lie inside the packet, and
    // every offset written below is inside them.
    unsafe {
        base.cast::<[u64; FRAME_LEN / 8]>()
            .write_unaligned(*template)
    };
    let mode = ctl(GEN_MODE);
    if mode != GEN_ONE_FLOW && (mode == GEN_64K_FLOWS || mode == GEN_NEW_FLOWS) {
        let seq = next_seq(GEN_SEQ).unwrap_or(0);
        #[expect(
            clippy::cast_possible_truncation,
            reason = "16 bits of the sequence each"
        )]
        let (addr_low, port) = if mode == GEN_NEW_FLOWS {
            // Skip address low halves 0 and 0xffff, so sources are never .0.0 or .255.255.
            (((seq >> 16) % 0xfffe + 1) as u16, seq as u16)
        } else {
            (0, seq as u16)
        };
        // SAFETY: as above, constant offsets inside the checked frame.
        unsafe {
            base.add(UDP_SRC_PORT_AT)
                .cast::<[u8; 2]>()
                .write_unaligned(port.to_be_bytes());
            if mode == GEN_NEW_FLOWS {
                // The template's low address half is 0; RFC 1624: HC' = ~(~HC + m') with m = 0.
                let check = base.add(IPV4_CHECK_AT).cast::<[u8; 2]>();
                let old = u16::from_be_bytes(check.read_unaligned());
                let sum = u32::from(!old) + u32::from(addr_low);
                check.write_unaligned((!fold(sum)).to_be_bytes());
                base.add(IPV4_SRC_AT + 2)
                    .cast::<[u8; 2]>()
                    .write_unaligned(addr_low.to_be_bytes());
            }
        }
    }
    count(&BENCH_GEN_COUNT);
    xdp_action::XDP_TX
}
