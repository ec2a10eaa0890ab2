//! The measured rows, the verdicts against the targets, and the summary
//! and its Markdown tables.

use std::{fs, process::Command, thread};

use serde::Serialize;

use crate::{
    bench::{
        PACED_CHURN_RATE, PACED_STORM_RATE,
        churn::Churn,
        kernel_cost::KernelCost,
        storm::{DataAfterClose, Storm},
        tracer::{Sample, Tracer},
        userspace::Userspace,
    },
    workspace_root,
};

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Measurement {
    pub(crate) bench: &'static str,
    pub(crate) tracer: String,
    /// 0: unpaced.
    pub(crate) target_rate: u32,
    pub(crate) rep: usize,
    pub(crate) per_s: f64,
    pub(crate) completed: u64,
    pub(crate) load_errors: u64,
    pub(crate) load_s: f64,
    pub(crate) system_busy_s: f64,
    pub(crate) distinct_connections: Option<u64>,
    pub(crate) events: Option<u64>,
    pub(crate) rst_events: Option<u64>,
    pub(crate) lost: Option<u64>,
    /// tcprst's sent resets shown each on a line, and those of them that
    /// name their socket's close.
    pub(crate) sent_shown: Option<u64>,
    pub(crate) sent_naming_a_close: Option<u64>,
    pub(crate) records_read: Option<u64>,
    pub(crate) notes_overwritten: Option<u64>,
    pub(crate) cpu_s: Option<f64>,
    pub(crate) cpu_pct: Option<f64>,
    pub(crate) vm_hwm_kib: Option<u64>,
    pub(crate) vm_rss_kib: Option<u64>,
    pub(crate) idle_rss_kib: Option<u64>,
    pub(crate) map_kib: Option<u64>,
    pub(crate) tracked_half_closed: Option<u64>,
    #[serde(skip)]
    pub(crate) hooks: Vec<String>,
    pub(crate) warnings: Vec<String>,
    pub(crate) foreign_programs: Vec<String>,
}

impl Measurement {
    pub(crate) fn new(
        bench: &'static str,
        tracer: &Tracer,
        target_rate: u32,
        rep: usize,
        s: Sample,
    ) -> Self {
        let completed = s.loads.iter().map(|l| l.completed).sum();
        let elapsed: f64 = s.loads.iter().map(|l| l.elapsed_s).sum();
        let t = s.tracer.as_ref();
        let mut warnings: Vec<String> = t.map(|t| t.warnings.clone()).unwrap_or_default();
        warnings.extend(s.loads.iter().filter(|l| l.errors > 0).map(|l| {
            format!(
                "generator: {} errors, first: {}",
                l.errors,
                l.first_error.as_deref().unwrap_or("?")
            )
        }));
        Self {
            bench,
            tracer: tracer.label().into(),
            target_rate,
            rep,
            per_s: completed as f64 / elapsed,
            completed,
            load_errors: s.loads.iter().map(|l| l.errors).sum(),
            load_s: s.load_s,
            system_busy_s: s.system_busy_s,
            distinct_connections: s.loads.iter().map(|l| l.distinct_connections).sum(),
            events: t.map(|t| t.events),
            rst_events: t.map(|t| t.rst_events).filter(|_| tracer.prints_events()),
            lost: t.map(|t| t.lost),
            sent_shown: t
                .filter(|_| matches!(tracer, Tracer::Tcprst { .. }))
                .map(|t| t.sent_shown),
            sent_naming_a_close: t
                .filter(|_| matches!(tracer, Tracer::Tcprst { .. }))
                .map(|t| t.sent_naming_a_close),
            records_read: t.and_then(|t| t.records_read),
            notes_overwritten: t.and_then(|t| t.notes_overwritten),
            cpu_s: t.map(|t| t.cpu_s),
            cpu_pct: t.map(|t| t.cpu_pct),
            vm_hwm_kib: t.map(|t| t.vm_hwm_kib),
            vm_rss_kib: t.map(|t| t.vm_rss_kib),
            idle_rss_kib: t.map(|t| t.idle_rss_kib),
            map_kib: t.map(|t| t.map_kib),
            tracked_half_closed: t.and_then(|t| t.tracked_half_closed),
            hooks: t.map(|t| t.hooks.clone()).unwrap_or_default(),
            warnings,
            foreign_programs: s.foreign,
        }
    }

    pub(crate) fn tracer_ran(&self) -> bool {
        self.events.is_some()
    }

    /// Each refused connect is one reset sent and one received.
    pub(crate) fn expected_events(&self) -> u64 {
        2 * self.completed
    }

    pub(crate) fn events_per_s(&self) -> Option<f64> {
        Some(self.rst_events? as f64 / self.load_s)
    }

    /// Resets the tracer should have shown and did not, lost or not.
    pub(crate) fn missing(&self) -> Option<u64> {
        Some(self.expected_events().saturating_sub(self.rst_events?))
    }

    pub(crate) fn lossless(&self) -> bool {
        self.lost == Some(0) && self.missing() == Some(0)
    }

    pub(crate) fn us_per_record(&self) -> Option<f64> {
        let records = self.records_read.or(self.events)?;
        (records > 0).then(|| self.cpu_s.unwrap_or(0.0) * 1e6 / records as f64)
    }

    /// Throughput over the no-tracer run at the same rate and repetition.
    pub(crate) fn vs_none(&self, rows: &[Measurement]) -> Option<f64> {
        let base = rows.iter().find(|r| {
            r.tracer == "none" && r.target_rate == self.target_rate && r.rep == self.rep
        })?;
        Some(self.per_s / base.per_s)
    }
}

/// System-wide busy CPU per unit of work (`units` of the row), µs.
pub(crate) fn busy_us_per(r: &Measurement, units: fn(&Measurement) -> u64) -> f64 {
    r.system_busy_s / units(r).max(1) as f64 * 1e6
}

/// What `r`'s tracer added to `busy_us_per` over the no-tracer run of the
/// same repetition and rate, so drift cancels.
pub(crate) fn added_busy_us_of(
    rows: &[Measurement],
    r: &Measurement,
    units: fn(&Measurement) -> u64,
) -> Option<f64> {
    let base = rows
        .iter()
        .find(|b| b.tracer == "none" && b.rep == r.rep && b.target_rate == r.target_rate)?;
    Some(busy_us_per(r, units) - busy_us_per(base, units))
}

/// Per tracer, the median over the repetitions of `added_busy_us_of`.
pub(crate) fn added_busy_us(
    rows: &[Measurement],
    tracers: &[Tracer],
    units: fn(&Measurement) -> u64,
) -> Vec<(String, f64)> {
    let added = |r: &Measurement| added_busy_us_of(rows, r, units);
    tracers
        .iter()
        .map(Tracer::label)
        .filter(|t| *t != "none")
        .filter_map(|t| {
            let each = rows.iter().filter(|r| r.tracer == t).filter_map(added);
            Some((t.to_owned(), median(each.collect())?))
        })
        .collect()
}

/// The lowest and highest of `each`: a figure's spread over repetitions.
pub(crate) fn spread(each: impl Iterator<Item = f64>) -> (f64, f64) {
    each.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    })
}

/// A spread as text: `0.812–0.867`.
fn range((lo, hi): (f64, f64)) -> String {
    format!("{lo:.3}–{hi:.3}")
}

/// Each repetition's throughput with `tracer` over the no-tracer run of
/// the same repetition, at `rate`.
pub(crate) fn ratios_per_rep<'a>(
    rows: &'a [Measurement],
    tracer: &'a str,
    rate: u32,
) -> impl Iterator<Item = f64> + 'a {
    rows.iter()
        .filter(move |r| r.tracer == tracer && r.target_rate == rate)
        .filter_map(|r| r.vs_none(rows))
}

/// median(with tracer) / median(without), over the repetitions at `rate`.
pub(crate) fn median_ratio(rows: &[Measurement], tracer: &str, rate: u32) -> f64 {
    let at = |t: &str| {
        median(
            rows.iter()
                .filter(|r| r.tracer == t && r.target_rate == rate)
                .map(|r| r.per_s)
                .collect(),
        )
        .unwrap_or(f64::NAN)
    };
    at(tracer) / at("none")
}

/// Every distinct warning the tracers and the generator gave, and whether
/// someone else's tracing programs ran alongside.
pub(crate) fn notes<'a>(rows: impl Iterator<Item = &'a Measurement> + Clone) -> Vec<String> {
    let mut notes: Vec<String> = rows
        .clone()
        .flat_map(|r| r.warnings.iter().cloned())
        .collect();
    notes.sort();
    notes.dedup();
    let busy: Vec<&Measurement> = rows
        .clone()
        .filter(|r| !r.foreign_programs.is_empty())
        .collect();
    if !busy.is_empty() {
        let mut names: Vec<&str> = busy
            .iter()
            .flat_map(|r| r.foreign_programs.iter().map(String::as_str))
            .collect();
        names.sort();
        names.dedup();
        notes.push(format!(
            "{} of {} runs started with other tracing BPF programs loaded ({}): they run on the same hooks, baselines included, so those numbers are not clean",
            busy.len(),
            rows.count(),
            names.join(", ")
        ));
    }
    notes
}

pub(crate) fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct TargetCheck {
    pub(crate) what: String,
    pub(crate) value: f64,
    pub(crate) target: String,
    pub(crate) met: bool,
    /// Why it is missed beyond the number, if it is.
    pub(crate) also: Option<String>,
}

impl TargetCheck {
    pub(crate) fn at_least(what: &str, value: f64, target: f64) -> Self {
        Self {
            what: what.into(),
            value,
            target: format!("≥ {target}"),
            met: value >= target,
            also: None,
        }
    }

    pub(crate) fn at_most(what: &str, value: f64, target: f64) -> Self {
        Self {
            what: what.into(),
            value,
            target: format!("≤ {target}"),
            met: value <= target,
            also: None,
        }
    }

    /// A second condition the target needs.
    pub(crate) fn and(mut self, ok: bool, otherwise: String) -> Self {
        if !ok {
            self.met = false;
            self.also = Some(otherwise);
        }
        self
    }
}

#[derive(Serialize)]
pub(crate) struct Summary {
    pub(crate) machine: Machine,
    pub(crate) quick: bool,
    pub(crate) finished_unix_s: u64,
    pub(crate) runtime_s: f64,
    pub(crate) hooks: Hooks,
    pub(crate) notes: Vec<String>,
    pub(crate) storm: Storm,
    pub(crate) data_after_close: DataAfterClose,
    pub(crate) churn: Churn,
    pub(crate) kernel_cost: KernelCost,
    pub(crate) userspace: Userspace,
}

#[derive(Serialize)]
pub(crate) struct Hooks {
    pub(crate) tcprst: Vec<String>,
    pub(crate) bpftrace_storm: Vec<String>,
    pub(crate) bpftrace_churn: Vec<String>,
}

#[derive(Serialize)]
pub(crate) struct Machine {
    pub(crate) kernel: String,
    pub(crate) cpus: usize,
    pub(crate) bpftrace: String,
    /// What was measured: `git describe --always --dirty` of the workspace.
    pub(crate) revision: String,
}

impl Machine {
    pub(crate) fn read() -> Self {
        let first_line = |cmd: &mut Command| {
            cmd.output()
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .to_owned()
                })
                .unwrap_or_default()
        };
        Self {
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            cpus: thread::available_parallelism().map_or(0, |n| n.get()),
            bpftrace: first_line(Command::new("bpftrace").arg("--version")),
            revision: workspace_root()
                .map(|root| {
                    first_line(
                        Command::new("git")
                            .arg("-C")
                            .arg(root)
                            .args(["describe", "--always", "--dirty"]),
                    )
                })
                .unwrap_or_default(),
        }
    }
}

impl Summary {
    pub(crate) fn report(&self) -> String {
        let mut t = Table::new(&["target", "value", "wanted", "met"]);
        let verdicts = self
            .storm
            .verdicts
            .iter()
            .chain(&self.data_after_close.verdicts)
            .chain(&self.churn.verdicts)
            .chain(&self.kernel_cost.verdicts)
            .chain(&self.userspace.verdicts);
        for v in verdicts {
            let met = match (&v.also, v.met) {
                (_, true) => "yes".to_owned(),
                (Some(also), false) => format!("NO ({also})"),
                (None, false) => "NO".to_owned(),
            };
            t.row(vec![
                v.what.clone(),
                format!("{:.3}", v.value),
                v.target.clone(),
                met,
            ]);
        }
        let s = &self.storm;
        let zero = |r: Option<f64>| opt(r, |v| format!("{v:.0} connects/s"));
        format!(
            "\n## Targets ({} on {} CPUs, {}, tcprst {})\n\n{}\nRST storm, unpaced, medians (spreads) of {} repetitions: tcprst {:.3}× ({}; counts exact: {}), tcprst --detail-per-sec 0 {:.3}× ({}), bpftrace {:.3}× ({}), empty programs on the same hooks {:.3}× of the generator's throughput without a tracer; \
             tcprst --detail-per-sec 0 over bpftrace {:.3} (each repetition's: {}); bpftrace costs {:.2}× the throughput tcprst costs. Highest rate with zero loss: tcprst {}, bpftrace {}. System CPU added per reset at {PACED_STORM_RATE} connects/s: {}.\n\
             Data after close, unpaced, medians of {}: tcprst --detail-per-sec 0 {:.3}×, bpftrace {:.3}× (tcprst over bpftrace, each repetition's: {}); tcprst's sent resets naming their close: {} of {} shown, for {} connections ({} close notes overwritten unread).\n\
             Churn: tcprst {:.3}× (spread {}), tcprst --history {:.3}×, bpftrace {:.3}×; system CPU added per connection at {PACED_CHURN_RATE}/s: {}; tcprst's direct cost (its programs, {:.2} µs of which empty programs would take, and its threads) {:.2} µs.\n\
             tcprst hooks: {}\nbpftrace hooks: storm {}; churn {}\n{}",
            self.machine.kernel,
            self.machine.cpus,
            self.machine.bpftrace,
            self.machine.revision,
            t.render(),
            s.reps,
            s.max_ratio_tcprst,
            range(s.spread_tcprst),
            if s.counts_exact { "yes" } else { "NO" },
            s.max_ratio_every_reset,
            range(s.spread_every_reset),
            s.max_ratio_bpftrace,
            range(s.spread_bpftrace),
            s.max_ratio_attach_only,
            s.tcprst_over_bpftrace,
            range(s.spread_over_bpftrace),
            s.overhead_bpftrace_over_tcprst,
            zero(s.zero_loss_rate_tcprst),
            zero(s.zero_loss_rate_bpftrace),
            s.paced_us_per_reset
                .iter()
                .map(|(t, us)| format!("{t} {us:.2} µs"))
                .collect::<Vec<_>>()
                .join(", "),
            self.data_after_close.reps,
            self.data_after_close.ratio_every_reset,
            self.data_after_close.ratio_bpftrace,
            range(self.data_after_close.spread_over_bpftrace),
            self.data_after_close.sent_naming_a_close,
            self.data_after_close.sent_shown,
            self.data_after_close.connections,
            self.data_after_close.notes_overwritten,
            self.churn.ratio_tcprst,
            range(self.churn.spread_tcprst),
            self.churn.ratio_history,
            self.churn.ratio_bpftrace,
            self.churn
                .paced_us_per_connection
                .iter()
                .map(|(t, us)| format!("{t} {us:.2} µs"))
                .collect::<Vec<_>>()
                .join(", "),
            self.churn.direct.empty_programs_us,
            self.churn.direct.total_us(),
            self.hooks.tcprst.join(", "),
            self.hooks.bpftrace_storm.join(", "),
            self.hooks.bpftrace_churn.join(", "),
            self.notes
                .iter()
                .map(|n| format!("note: {n}\n"))
                .collect::<String>(),
        )
    }
}

pub(crate) fn rate_label(rate: u32) -> String {
    if rate == 0 {
        "max".into()
    } else {
        rate.to_string()
    }
}

pub(crate) fn opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map_or_else(|| "-".into(), f)
}

/// A Markdown table: readable on a terminal, and pasted as is into
/// docs/performance.md.
pub(crate) struct Table {
    pub(crate) head: Vec<String>,
    pub(crate) rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(head: &[&str]) -> Self {
        Self {
            head: head.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub(crate) fn row(&mut self, row: Vec<String>) {
        self.rows.push(row);
    }

    pub(crate) fn render(&self) -> String {
        let widths: Vec<usize> = (0..self.head.len())
            .map(|i| {
                std::iter::once(&self.head)
                    .chain(&self.rows)
                    .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: &[String]| {
            let cells: Vec<String> = widths
                .iter()
                .enumerate()
                .map(|(i, w)| format!("{:<w$}", cells.get(i).map_or("", |c| c.as_str())))
                .collect();
            format!("| {} |\n", cells.join(" | "))
        };
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        let mut out = line(&self.head);
        out.push_str(&line(&rule));
        for r in &self.rows {
            out.push_str(&line(r));
        }
        out
    }
}

pub(crate) fn print_section(title: &str, table: &Table) {
    println!("\n## {title}\n\n{}", table.render());
}
