//! `tcprst doctor`: what this kernel lets tcprst do, checked for real. It
//! loads and attaches every program at every tier it can, as `trace` would,
//! then detaches, so a tier it reports working is one that worked just now.

use std::{fs, io::Write, path::PathBuf};

use anyhow::Result;
use aya::programs::ProgramType;
use comfy_table::{ContentArrangement, Table, presets};
use serde_json::{Value, json};
use tcprst_common::{AttachTier, KernelFilter};

use crate::{
    bpf::attach::{AttachRequest, HookPlan, tier_name},
    bpf::btf::VMLINUX,
    bpf::privileges,
    bpf::probes::{ProbeConfig, Probes},
    bpf::stacks::Kallsyms,
    bpf::tracefs::Tracefs,
    output::OutputFormat,
    output::terminal::cell,
};

pub struct DoctorReport {
    kernel: String,
    lockdown: String,
    btf: Result<PathBuf, String>,
    tracefs: Result<PathBuf, String>,
    program_types: Vec<(&'static str, Result<bool, String>)>,
    privileges: Result<(), String>,
    /// Why tracing cannot start, if it cannot.
    load_error: Option<String>,
    hooks: Vec<HookPlan>,
    /// Whether close marks work: who shut down or closed a socket, and when.
    close_marks: Result<(), String>,
    /// Whether /proc/kallsyms can name the kernel function behind a reset.
    callers: Result<(), String>,
    limitations: Vec<String>,
}

pub fn examine(btf: &Option<PathBuf>, attach: &AttachRequest) -> DoctorReport {
    let privileges = privileges::check().map_err(|e| format!("{e:#}"));
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
        callers: Kallsyms::load().map(drop),
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
            report.limitations = probes.limitations.clone();
        }
        Err(e) => report.load_error = Some(format!("{e:#}")),
    }
    report
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

impl DoctorReport {
    /// Whether `tcprst trace` can run here at all.
    pub fn can_trace(&self) -> bool {
        self.load_error.is_none()
    }

    fn tier_works(&self, tier: AttachTier) -> bool {
        if tier == AttachTier::Tracepoint {
            return self.can_trace();
        }
        self.hooks
            .iter()
            .any(|h| h.tier == Some(tier) || h.also_works.contains(&tier))
    }

    fn hook_json(plan: &HookPlan) -> Value {
        let mut tiers = serde_json::Map::new();
        if let Some(tier) = plan.tier {
            tiers.insert(tier_name(tier).into(), json!("works"));
        }
        for tier in &plan.also_works {
            tiers.insert(tier_name(*tier).into(), json!("works"));
        }
        for (tier, why) in &plan.passed_over {
            tiers.insert(tier_name(*tier).into(), json!(why));
        }
        json!({
            "hook": plan.function.function,
            "tier": plan.tier.map(tier_name),
            "why": plan.to_string(),
            "tiers": tiers,
        })
    }

    pub(crate) fn to_json(&self) -> Value {
        let result = |r: &Result<PathBuf, String>| match r {
            Ok(path) => json!(path.display().to_string()),
            Err(why) => json!({ "error": why }),
        };
        let types: serde_json::Map<String, Value> = self
            .program_types
            .iter()
            .map(|(name, supported)| {
                let v = match supported {
                    Ok(ok) => json!(ok),
                    Err(why) => json!({ "error": why }),
                };
                ((*name).to_owned(), v)
            })
            .collect();
        json!({
            "kernel": self.kernel,
            "lockdown": self.lockdown,
            "btf": self.btf.is_ok(),
            "btf_path": result(&self.btf),
            "tracefs": self.tracefs.is_ok(),
            "tracefs_path": result(&self.tracefs),
            "program_types": types,
            "tiers": {
                "fentry": self.tier_works(AttachTier::Fentry),
                "kprobe": self.tier_works(AttachTier::Kprobe),
                "tracepoint": self.tier_works(AttachTier::Tracepoint),
            },
            "hooks": self.hooks.iter().map(Self::hook_json).collect::<Vec<_>>(),
            "close_marks": match &self.close_marks {
                Ok(()) => json!(true),
                Err(why) => json!({ "error": why }),
            },
            "callers": match &self.callers {
                Ok(()) => json!(true),
                Err(why) => json!({ "error": why }),
            },
            "privileges": match &self.privileges {
                Ok(()) => json!(true),
                Err(why) => json!({ "error": why }),
            },
            "limitations": self.limitations,
            "can_trace": self.can_trace(),
            "error": self.load_error,
        })
    }

    fn rows(&self) -> Vec<(String, String)> {
        let shown = |r: &Result<PathBuf, String>| match r {
            Ok(path) => format!("yes ({})", path.display()),
            Err(why) => format!("no: {why}"),
        };
        let mut rows = vec![
            ("kernel".to_owned(), self.kernel.clone()),
            ("lockdown".to_owned(), self.lockdown.clone()),
            ("BTF".to_owned(), shown(&self.btf)),
            ("tracefs".to_owned(), shown(&self.tracefs)),
        ];
        for (name, supported) in &self.program_types {
            let v = match supported {
                Ok(true) => "loads".to_owned(),
                Ok(false) => "not supported".to_owned(),
                Err(why) => format!("unknown: {why}"),
            };
            rows.push((format!("{name} programs"), v));
        }
        for plan in &self.hooks {
            let mut v = plan.to_string();
            if !plan.also_works.is_empty() {
                let also: Vec<_> = plan.also_works.iter().map(|t| tier_name(*t)).collect();
                v.push_str(&format!("; also works: {}", also.join(", ")));
            }
            rows.push((format!("hook {}", plan.function.function), v));
        }
        rows.push((
            "close marks".to_owned(),
            match &self.close_marks {
                Ok(()) => "yes: tp_btf on sock:inet_sock_set_state, in socket storage".to_owned(),
                Err(why) => format!("no: {why}"),
            },
        ));
        rows.push((
            "callers".to_owned(),
            match &self.callers {
                Ok(()) => "yes: /proc/kallsyms names the kernel functions".to_owned(),
                Err(why) => format!("unavailable: {why}"),
            },
        ));
        rows.push((
            "privileges".to_owned(),
            match &self.privileges {
                Ok(()) => "enough".to_owned(),
                Err(why) => why.clone(),
            },
        ));
        for note in &self.limitations {
            rows.push(("limitation".to_owned(), note.clone()));
        }
        rows.push((
            "tracing".to_owned(),
            match &self.load_error {
                None => "can run".to_owned(),
                Some(why) => format!("cannot run: {why}"),
            },
        ));
        rows
    }

    pub fn write(&self, format: OutputFormat, out: &mut dyn Write) -> Result<()> {
        match format {
            OutputFormat::Json => writeln!(out, "{}", self.to_json())?,
            OutputFormat::Table => {
                let mut table = Table::new();
                table
                    .load_preset(presets::NOTHING)
                    .set_content_arrangement(ContentArrangement::Dynamic)
                    .set_header(["CHECK", "RESULT"]);
                for (check, result) in self.rows() {
                    table.add_row([cell(check), cell(result)]);
                }
                writeln!(out, "{table}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report of a kernel where everything works.
    fn healthy() -> DoctorReport {
        DoctorReport {
            kernel: "6.18.0".into(),
            lockdown: "none".into(),
            btf: Ok(VMLINUX.into()),
            tracefs: Ok("/sys/kernel/tracing".into()),
            program_types: Vec::new(),
            privileges: Ok(()),
            load_error: None,
            hooks: Vec::new(),
            close_marks: Ok(()),
            callers: Ok(()),
            limitations: Vec::new(),
        }
    }

    fn table(report: &DoctorReport) -> String {
        let mut out = Vec::new();
        report.write(OutputFormat::Table, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn hostile_text_prints_escaped() {
        let report = DoctorReport {
            kernel: "6.1\x1b[2J".into(),
            btf: Err("no \x1b]0;pwn\x07".into()),
            limitations: vec!["\u{9b}31m".into()],
            ..healthy()
        };
        let text = table(&report);
        assert!(text.contains("6.1\\e[2J"), "{text}");
        assert!(text.contains("no: no \\e]0;pwn\\a"), "{text}");
        assert!(text.contains("\\u{9b}31m"), "{text}");
        assert!(!text.contains(['\x1b', '\x07', '\u{9b}']), "{text:?}");
    }

    #[test]
    fn says_why_callers_are_unavailable() {
        let why = "kallsyms addresses hidden (kernel.kptr_restrict=1 and no CAP_SYSLOG)";
        let report = DoctorReport {
            callers: Err(why.into()),
            ..healthy()
        };
        let row = table(&report)
            .lines()
            .find(|l| l.trim_start().starts_with("callers"))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "));
        assert_eq!(
            row.as_deref(),
            Some(&*format!("callers unavailable: {why}"))
        );
        assert_eq!(report.to_json()["callers"]["error"], why);
        assert_eq!(healthy().to_json()["callers"], true);
    }
}
