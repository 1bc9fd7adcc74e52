//! The kernel side as the agent sees it: load the embedded object, write map updates, attach to
//! interfaces, read counters, detach.

use std::fmt;

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        tc::{self, SchedClassifierLinkId},
        xdp::XdpLinkId,
    },
};
use lb_common::{
    Backend, COUNTER_COUNT, Counter, DROP_REASON_SLOTS, DropReason, FlowKey, FlowTarget,
    FrontendKey, Service, map_names, program_names,
};

use crate::maps::{MapContents, MapUpdate, diff};

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
    #[error("attaching the TC egress program to {iface} failed: {source}")]
    AttachTc {
        iface: String,
        #[source]
        source: aya::programs::ProgramError,
    },
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
    xdp: XdpLinkId,
    tc: SchedClassifierLinkId,
}

/// The loaded programs and maps. Dropping it detaches everything (the links are owned here).
pub struct DataPlane {
    ebpf: Ebpf,
    contents: MapContents,
    attachments: Vec<Attachment>,
}

impl DataPlane {
    /// Loads the embedded object and both programs into the kernel (this runs the verifier).
    pub fn load() -> Result<Self, DataPlaneError> {
        let mut ebpf = Ebpf::load(EBPF_OBJECT).map_err(DataPlaneError::Load)?;
        let program_error = |name| move |source| DataPlaneError::Program { name, source };
        xdp_program(&mut ebpf)?
            .load()
            .map_err(program_error(program_names::XDP_INGRESS))?;
        tc_program(&mut ebpf)?
            .load()
            .map_err(program_error(program_names::TC_EGRESS))?;
        Ok(DataPlane {
            ebpf,
            contents: MapContents::default(),
            attachments: Vec::new(),
        })
    }

    /// Writes what differs between the current maps and `new`; returns the number of writes.
    pub fn apply(&mut self, new: MapContents) -> Result<usize, DataPlaneError> {
        let updates = diff(&self.contents, &new);
        for update in &updates {
            self.write(*update)?;
        }
        self.contents = new;
        Ok(updates.len())
    }

    fn write(&mut self, update: MapUpdate) -> Result<(), DataPlaneError> {
        let (backends, slots, frontends) = (
            map_names::BACKENDS,
            map_names::BACKEND_SLOTS,
            map_names::FRONTENDS,
        );
        match update {
            MapUpdate::SetBackend(id, backend) => self.set_array(backends, id, backend),
            MapUpdate::ClearBackend(id) => self.set_array(backends, id, Backend::default()),
            MapUpdate::SetSlot(index, id) => self.set_array(slots, index, id),
            MapUpdate::ClearSlot(index) => self.set_array(slots, index, 0_u32),
            MapUpdate::SetFrontend(key, service) => {
                let mut map: HashMap<&mut MapData, FrontendKey, Service> =
                    self.typed_map(frontends)?;
                map.insert(key, service, 0).map_err(map_error(frontends))
            }
            MapUpdate::RemoveFrontend(key) => {
                let mut map: HashMap<&mut MapData, FrontendKey, Service> =
                    self.typed_map(frontends)?;
                map.remove(&key).map_err(map_error(frontends))
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

        let tc_error = |source| DataPlaneError::AttachTc {
            iface: iface.to_owned(),
            source,
        };
        let tc_program = tc_program(&mut self.ebpf)?;
        // Kernels from 6.6 attach through TCX links; older ones need a clsact qdisc first.
        let tc_link = if let Ok(link) = tc_program.attach(iface, TcAttachType::Egress) {
            link
        } else {
            // An "already exists" error here is fine: the qdisc is shared.
            let _ = tc::qdisc_add_clsact(iface);
            tc_program
                .attach(iface, TcAttachType::Egress)
                .map_err(tc_error)?
        };
        self.attachments.push(Attachment {
            iface: iface.to_owned(),
            xdp: xdp_link,
            tc: tc_link,
        });
        Ok(mode)
    }

    /// Detaches from every interface, last attached first. Returns the interfaces detached.
    pub fn detach_all(&mut self) -> Vec<String> {
        let mut detached = Vec::new();
        while let Some(attachment) = self.attachments.pop() {
            if let Ok(tc) = tc_program(&mut self.ebpf)
                && let Err(e) = tc.detach(attachment.tc)
            {
                log::warn!("{}: detaching TC egress: {e}", attachment.iface);
            }
            if let Ok(xdp) = xdp_program(&mut self.ebpf)
                && let Err(e) = xdp.detach(attachment.xdp)
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

    /// Every tracked flow direction (for tests and reports).
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowTarget)>, DataPlaneError> {
        let name = map_names::CONNTRACK;
        let map = self
            .ebpf
            .map(name)
            .ok_or(DataPlaneError::Missing { kind: "map", name })?;
        let table = HashMap::<_, FlowKey, FlowTarget>::try_from(map)
            .map_err(|source| DataPlaneError::Map { name, source })?;
        table
            .iter()
            .map(|entry| entry.map_err(|source| DataPlaneError::Map { name, source }))
            .collect()
    }

    /// The XDP program, for `BPF_PROG_TEST_RUN`.
    pub fn xdp_program(&mut self) -> Result<&mut Xdp, DataPlaneError> {
        xdp_program(&mut self.ebpf)
    }

    /// The TC egress program, for `BPF_PROG_TEST_RUN`.
    pub fn tc_program(&mut self) -> Result<&mut SchedClassifier, DataPlaneError> {
        tc_program(&mut self.ebpf)
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

fn tc_program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, DataPlaneError> {
    program(ebpf, program_names::TC_EGRESS)
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
