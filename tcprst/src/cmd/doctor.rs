//! `tcprst doctor`: what this kernel lets tcprst do, checked for real. It
//! loads and attaches every program at every tier it can, as `trace` would,
//! then detaches, so a tier it reports working is one that worked just now.

use std::{fs, path::PathBuf};

use aya::programs::ProgramType;
use tcprst_common::KernelFilter;

use crate::{
    bpf::attach::AttachRequest,
    bpf::btf::VMLINUX,
    bpf::privileges,
    bpf::probes::{ProbeConfig, Probes},
    bpf::stacks::Kallsyms,
    bpf::tracefs::Tracefs,
    host::sockdiag::dump_half_closed,
    output::doctor::DoctorReport,
    pipeline::diagnosis::RESET_TAKER,
};

pub fn examine(btf: &Option<PathBuf>, attach: &AttachRequest) -> DoctorReport {
    let privileges = privileges::check().map_err(|e| format!("{e:#}"));
    let kallsyms = Kallsyms::load();
    let mut report = DoctorReport {
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|e| format!("unknown ({e})"), |v| v.trim().to_owned()),
        lockdown: lockdown(),
        btf: match btf {
            Some(path) if path.exists() => Ok(path.clone()),
            Some(path) => Err(format!("{} does not exist", path.display())),
            None if PathBuf::from(VMLINUX).exists() => Ok(VMLINUX.into()),
            None => Err(format!("no {VMLINUX} (CONFIG_DEBUG_INFO_BTF is off)")),
        },
        tracefs: Tracefs::find_or_mount()
            .map(|t| t.root().to_owned())
            .map_err(|e| format!("{e:#}")),
        program_types: [
            ("tracepoint", ProgramType::TracePoint),
            ("raw_tracepoint", ProgramType::RawTracePoint),
            ("kprobe", ProgramType::KProbe),
            ("fentry", ProgramType::Tracing),
        ]
        .into_iter()
        .map(|(name, ty)| {
            let supported = aya::sys::is_program_supported(ty).map_err(|e| e.to_string());
            (name, supported)
        })
        .collect(),
        privileges: privileges.clone(),
        load_error: None,
        hooks: Vec::new(),
        close_marks: Err("not tried: tracing cannot start".to_owned()),
        softirq_by_stack: Err("not tried: tracing cannot start".to_owned()),
        callers: kallsyms.as_ref().map(drop).map_err(Clone::clone),
        socket_table: socket_table(),
        limitations: Vec::new(),
    };
    if let Err(why) = privileges {
        report.load_error = Some(why);
        return report;
    }
    let cfg = ProbeConfig {
        rst_sent: true,
        rst_received: true,
        filter: KernelFilter::default(),
        buffer_pages: 1,
        history: false,
        whole_stacks: false,
        detail_per_sec: 0,
        debug_bpf: false,
        btf: btf.clone(),
        attach: attach.clone(),
        probe_every_tier: true,
    };
    match Probes::load(&cfg) {
        Ok(probes) => {
            report.hooks = probes.plans.clone();
            report.close_marks = probes.marks.clone();
            report.softirq_by_stack = probes.softirq_by_stack.clone();
            report.limitations = probes.limitations.clone();
        }
        Err(e) => report.load_error = Some(format!("{e:#}")),
    }
    if kallsyms.is_ok_and(|k| !k.defines(RESET_TAKER)) {
        report.limitations.push(format!(
            "phantom received resets are shown: this kernel inlined {RESET_TAKER}, which tells a reset that arrived from the kernel's own abort of a socket shut down for reading when data comes (that abort fires tcp:tcp_receive_reset too)"
        ));
    }
    report
}

/// Whether the scans can dump this namespace's half-closed sockets, with
/// what they ask of each (`tcp_info`), and why not.
fn socket_table() -> Result<(), String> {
    dump_half_closed(None).map(drop).map_err(|e| {
        format!("sock_diag cannot dump TCP sockets ({e:#}); the kernel needs the tcp_diag module")
    })
}

/// The kernel lockdown mode: securityfs says it; the command line may.
fn lockdown() -> String {
    if let Ok(text) = fs::read_to_string("/sys/kernel/security/lockdown")
        && let Some(mode) = text.split_whitespace().find(|w| w.starts_with('['))
    {
        return mode.trim_matches(['[', ']']).to_owned();
    }
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    match cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("lockdown="))
    {
        Some(mode) => format!("{mode} (kernel command line)"),
        None => "unknown (securityfs not mounted)".to_owned(),
    }
}
