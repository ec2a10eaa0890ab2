//! What `tcprst doctor` found, as a table or one JSON object.

use std::{io::Write, path::PathBuf};

use anyhow::Result;
use comfy_table::{ContentArrangement, Table, presets};
use serde_json::{Value, json};
use tcprst_common::AttachTier;

use crate::{
    bpf::attach::{HookPlan, tier_name},
    output::{OutputFormat, terminal::cell},
};

pub struct DoctorReport {
    pub(crate) kernel: String,
    pub(crate) lockdown: String,
    pub(crate) btf: Result<PathBuf, String>,
    pub(crate) tracefs: Result<PathBuf, String>,
    pub(crate) program_types: Vec<(&'static str, Result<bool, String>)>,
    pub(crate) privileges: Result<(), String>,
    /// Why tracing cannot start, if it cannot.
    pub(crate) load_error: Option<String>,
    pub(crate) hooks: Vec<HookPlan>,
    /// Whether close marks work: who shut down or closed a socket, and when.
    pub(crate) close_marks: Result<(), String>,
    /// Whether reset programs tell softirq by where their context lies, or
    /// why two programs run on every softirq instead.
    pub(crate) softirq_by_stack: Result<(), String>,
    /// Whether /proc/kallsyms can name the kernel function behind a reset.
    pub(crate) callers: Result<(), String>,
    /// Whether sock_diag dumps this namespace's half-closed TCP sockets, as
    /// the scans for stuck half-closes ask.
    pub(crate) socket_table: Result<(), String>,
    pub(crate) limitations: Vec<String>,
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
            "softirq_by_stack": match &self.softirq_by_stack {
                Ok(()) => json!(true),
                Err(why) => json!({ "error": why }),
            },
            "callers": match &self.callers {
                Ok(()) => json!(true),
                Err(why) => json!({ "error": why }),
            },
            "socket_table": match &self.socket_table {
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
                Ok(()) => "yes: tp_btf on sock:inet_sock_set_state; notes in per-CPU rings, socket storage with --history".to_owned(),
                Err(why) => format!("no: {why}"),
            },
        ));
        rows.push((
            "softirq context".to_owned(),
            match &self.softirq_by_stack {
                Ok(()) => {
                    "told by where a reset program's context lies: nothing runs per softirq"
                        .to_owned()
                }
                Err(why) => format!(
                    "told by programs on irq:softirq_entry and softirq_exit, which run on every softirq: {why}"
                ),
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
            "stuck half-closes".to_owned(),
            match &self.socket_table {
                Ok(()) => "found by scanning the kernel's socket table (sock_diag)".to_owned(),
                Err(why) => format!("never reported: {why}"),
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
    use crate::bpf::btf::VMLINUX;

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
            softirq_by_stack: Ok(()),
            callers: Ok(()),
            socket_table: Ok(()),
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
