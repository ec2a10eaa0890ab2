//! Loads the kernel programs with the running kernel's layouts and attaches
//! them. Dropping `Probes` detaches everything.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf, StackTraceMap},
    programs::{RawTracePoint, TracePoint},
};
use tcprst_common::{KernelFilter, KernelOffsets, LOST_RECORDS, SyscallFields};

use crate::{
    btf::{KernelBtf, VMLINUX},
    layout::{ReasonNames, reset_fields, state_fields, syscall_fields},
    tracefs::{
        EventFormat, INET_SOCK_SET_STATE, SYS_ENTER_CLOSE, SYS_ENTER_SHUTDOWN, SYS_EXIT_ACCEPT,
        SYS_EXIT_ACCEPT4, SYS_EXIT_SHUTDOWN, TCP_DESTROY_SOCK, TCP_RECEIVE_RESET, TCP_SEND_RESET,
        Tracefs, Tracepoint,
    },
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcprst"));

const PAGE_SIZE: u32 = 4096;

/// What to load.
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    pub rst_sent: bool,
    pub rst_received: bool,
    pub filter: KernelFilter,
    pub buffer_pages: u32,
    /// An explicit BTF file; otherwise the running kernel's.
    pub btf: Option<PathBuf>,
}

pub struct Probes {
    ebpf: Ebpf,
    pub reasons: ReasonNames,
    pub attached: Vec<String>,
}

impl Probes {
    pub fn load(cfg: &ProbeConfig) -> Result<Self> {
        let tracefs = Tracefs::find_or_mount()?;
        let send_format = tracefs.event_format(TCP_SEND_RESET)?;
        let receive_format = tracefs.event_format(TCP_RECEIVE_RESET)?;
        let state_format = tracefs.event_format(INET_SOCK_SET_STATE)?;
        let destroy_format = tracefs.event_format(TCP_DESTROY_SOCK)?;
        let send_fields = reset_fields(&send_format).with_context(|| TCP_SEND_RESET.to_string())?;
        let receive_fields =
            reset_fields(&receive_format).with_context(|| TCP_RECEIVE_RESET.to_string())?;
        let state_fields = state_fields(&state_format, &destroy_format)
            .with_context(|| INET_SOCK_SET_STATE.to_string())?;
        // Without syscall tracepoints we still track states; only who
        // started a close is lost.
        let syscall_fields = match syscall_layout(&tracefs) {
            Ok(fields) => Some(fields),
            Err(e) => {
                log::warn!("{e:#}: shutdown()/close() callers will not be named");
                None
            }
        };

        let btf = load_btf(cfg.btf.as_deref())?;
        let offsets = match &btf {
            Some(btf) => {
                let (offsets, lost) = btf.kernel_offsets()?;
                for feature in lost {
                    log::warn!("this kernel's BTF lacks what {feature} needs: unavailable");
                }
                offsets
            }
            None => {
                if cfg.filter.netns != 0 {
                    bail!("--netns needs kernel BTF ({VMLINUX}, or --btf PATH)");
                }
                log::warn!(
                    "no kernel BTF at {VMLINUX}: netns and the state of received resets will be unknown (pass --btf PATH)"
                );
                KernelOffsets::UNSET
            }
        };
        let reasons = ReasonNames::load(&send_format, btf.as_ref());

        raise_memlock_limit();
        let ebpf = EbpfLoader::new()
            .override_global("SEND_RESET_FIELDS", &send_fields, true)
            .override_global("RECEIVE_RESET_FIELDS", &receive_fields, true)
            .override_global("STATE_FIELDS", &state_fields, true)
            .override_global(
                "SYSCALL_FIELDS",
                &syscall_fields.unwrap_or(SyscallFields::UNSET),
                true,
            )
            .override_global("KERNEL_OFFSETS", &offsets, true)
            .override_global("FILTER", &cfg.filter, true)
            .map_max_entries("EVENTS", cfg.buffer_pages * PAGE_SIZE)
            .load(OBJECT)
            .context("loading the eBPF object")?;

        let mut probes = Self {
            ebpf,
            reasons,
            attached: Vec::new(),
        };
        // Context tracking first, so the first reset is already attributed.
        probes.attach_raw("tcprst_sirq_in", "softirq_entry")?;
        probes.attach_raw("tcprst_sirq_out", "softirq_exit")?;
        if cfg.rst_sent {
            probes.attach_tracepoint("tcprst_rst_sent", TCP_SEND_RESET)?;
        }
        if cfg.rst_received {
            probes.attach_tracepoint("tcprst_rst_recv", TCP_RECEIVE_RESET)?;
        }
        if syscall_fields.is_some() {
            // Before the state hook, so a close already under way is seen.
            probes.attach_tracepoint("tcprst_shut_in", SYS_ENTER_SHUTDOWN)?;
            probes.attach_tracepoint("tcprst_shut_out", SYS_EXIT_SHUTDOWN)?;
            probes.attach_tracepoint("tcprst_close_in", SYS_ENTER_CLOSE)?;
            probes.attach_tracepoint("tcprst_accepted", SYS_EXIT_ACCEPT4)?;
            probes.attach_tracepoint("tcprst_accepted", SYS_EXIT_ACCEPT)?;
        }
        probes.attach_tracepoint("tcprst_state", INET_SOCK_SET_STATE)?;
        probes.attach_tracepoint("tcprst_destroy", TCP_DESTROY_SOCK)?;
        Ok(probes)
    }

    fn attach_tracepoint(&mut self, program: &str, tp: Tracepoint) -> Result<()> {
        let prog: &mut TracePoint = self
            .ebpf
            .program_mut(program)
            .ok_or_else(|| anyhow!("program {program} missing from the object"))?
            .try_into()?;
        // One program may serve several tracepoints (accept and accept4).
        if prog.fd().is_err() {
            prog.load()
                .with_context(|| format!("loading {program} for {tp}"))?;
        }
        prog.attach(tp.category, tp.name)
            .with_context(|| format!("attaching to tracepoint {tp}"))?;
        self.attached.push(tp.to_string());
        Ok(())
    }

    fn attach_raw(&mut self, program: &str, tp: &str) -> Result<()> {
        let prog: &mut RawTracePoint = self
            .ebpf
            .program_mut(program)
            .ok_or_else(|| anyhow!("program {program} missing from the object"))?
            .try_into()?;
        prog.load().with_context(|| format!("loading {program}"))?;
        prog.attach(tp)
            .with_context(|| format!("attaching to raw tracepoint {tp}"))?;
        self.attached.push(format!("raw_tp:{tp}"));
        Ok(())
    }

    /// Attached programs per attach tier, for the metrics.
    pub fn attached_by_tier(&self) -> [(&'static str, usize); 2] {
        let raw = self
            .attached
            .iter()
            .filter(|a| a.starts_with("raw_tp:"))
            .count();
        [
            ("raw_tracepoint", raw),
            ("tracepoint", self.attached.len() - raw),
        ]
    }

    /// Takes a map out of the object, typed, for userspace to own.
    fn take<T>(&mut self, name: &str) -> Result<T>
    where
        T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self
            .ebpf
            .take_map(name)
            .ok_or_else(|| anyhow!("{name} map missing from the object"))?;
        Ok(T::try_from(map)?)
    }

    pub fn take_ring(&mut self) -> Result<RingBuf<MapData>> {
        self.take("EVENTS")
    }

    pub fn take_stacks(&mut self) -> Result<StackTraceMap<MapData>> {
        self.take("STACKS")
    }

    pub fn take_lost_counter(&mut self) -> Result<LostCounter> {
        Ok(LostCounter(self.take("LOST")?))
    }
}

fn syscall_layout(tracefs: &Tracefs) -> Result<SyscallFields> {
    let format = |tp: Tracepoint| -> Result<EventFormat> { tracefs.event_format(tp) };
    format(SYS_EXIT_SHUTDOWN)?;
    format(SYS_EXIT_ACCEPT)?;
    syscall_fields(
        &format(SYS_ENTER_SHUTDOWN)?,
        &format(SYS_ENTER_CLOSE)?,
        &format(SYS_EXIT_ACCEPT4)?,
    )
}

fn load_btf(explicit: Option<&Path>) -> Result<Option<KernelBtf>> {
    match explicit {
        Some(path) => KernelBtf::from_file(path).map(Some),
        None if Path::new(VMLINUX).exists() => KernelBtf::from_file(Path::new(VMLINUX)).map(Some),
        None => Ok(None),
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        log::debug!(
            "could not lift RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The kernel's per-CPU count of records that found the ring buffer full.
pub struct LostCounter(PerCpuArray<MapData, u64>);

impl LostCounter {
    pub fn total(&self) -> Result<u64> {
        Ok(self.0.get(&LOST_RECORDS, 0)?.iter().sum())
    }
}
