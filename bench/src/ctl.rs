//! The benchmark object's `BENCH_CTL` array (slots in `lb_common::bench_ctl`).

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{Array, MapData},
};

fn array(ebpf: &mut Ebpf) -> anyhow::Result<Array<&mut MapData, u64>> {
    Ok(Array::try_from(
        ebpf.map_mut("BENCH_CTL").context("no BENCH_CTL map")?,
    )?)
}

pub fn set(ebpf: &mut Ebpf, slot: u32, value: u64) -> anyhow::Result<()> {
    array(ebpf)?.set(slot, value, 0)?;
    Ok(())
}

pub fn get(ebpf: &mut Ebpf, slot: u32) -> anyhow::Result<u64> {
    Ok(array(ebpf)?.get(&slot, 0)?)
}
