//! Benchmark 2: connection churn: whole connections, with each tracer.

use anyhow::Result;
use serde::Serialize;

use crate::{
    bench::{
        Ctx, PACED_CHURN_RATE, STATS_SYSCTL, Scale, TARGET_CHURN_RATIO,
        TARGET_PACED_US_PER_CONNECTION, bpftrace_churn_script,
        report::{
            Measurement, Table, TargetCheck, added_busy_us, added_busy_us_of, busy_us_per,
            median_ratio, opt, print_section, ratios_per_rep, spread,
        },
        tracer::{Load, Sample, Tracer, each_tracer, measure},
    },
    sys::Sysctl,
};

#[derive(Serialize)]
pub(crate) struct Churn {
    pub(crate) rows: Vec<Measurement>,
    pub(crate) ratio_tcprst: f64,
    pub(crate) ratio_history: f64,
    pub(crate) ratio_bpftrace: f64,
    /// tcprst's lowest and highest ratio over the repetitions.
    pub(crate) spread_tcprst: (f64, f64),
    /// The same connections paced at PACED_CHURN_RATE, interleaved like
    /// the unpaced ones.
    pub(crate) paced: Vec<Measurement>,
    /// System-wide busy CPU each tracer adds per connection at that rate,
    /// µs: the median over the repetitions of (tracer − none).
    pub(crate) paced_us_per_connection: Vec<(String, f64)>,
    /// tcprst's own CPU per connection at that rate, measured directly.
    pub(crate) direct: DirectCost,
    pub(crate) verdicts: Vec<TargetCheck>,
}

/// What tcprst itself spends per connection of the paced churn, µs, in a
/// run of its own with `kernel.bpf_stats_enabled=1`: the system-wide
/// figure (busy CPU with tcprst minus without) is the target's, but on this
/// kind of host its repetitions lie further apart than the whole of it.
/// This one misses what tcprst costs others (caches, the hook's own
/// dispatch outside the program), and counts bpf_stats' two clock reads a
/// run.
#[derive(Serialize)]
pub(crate) struct DirectCost {
    /// Its programs' run time.
    pub(crate) programs_us: f64,
    /// Of which empty programs on the same hooks take, from a run of them.
    pub(crate) empty_programs_us: f64,
    /// Its threads' CPU time while tracing (not while exiting): reading the
    /// close notes, the scans, the timers.
    pub(crate) threads_us: f64,
}

impl DirectCost {
    fn measure(ctx: &Ctx, plan: &Scale) -> Result<Self> {
        let _stats = Sysctl::set(STATS_SYSCTL, "1")?;
        let load = || [Load::churn_paced(PACED_CHURN_RATE, plan.paced_secs, None)];
        let ours = measure(ctx, &Tracer::tcprst(&[]), &load())?;
        let empty = measure(ctx, &Tracer::attach_only(), &load())?;
        let per_connection_us = |s: &Sample, ns: f64| {
            let completed: u64 = s.loads.iter().map(|l| l.completed).sum();
            ns / 1000.0 / completed.max(1) as f64
        };
        let programs_ns = |s: &Sample| {
            s.tracer
                .iter()
                .flat_map(|t| &t.progs)
                .map(|p| p.run_time_ns as f64)
                .sum::<f64>()
        };
        let threads_ns = ours
            .tracer
            .as_ref()
            .map_or(f64::NAN, |t| t.threads_s_settled * 1e9);
        Ok(Self {
            programs_us: per_connection_us(&ours, programs_ns(&ours)),
            empty_programs_us: per_connection_us(&empty, programs_ns(&empty)),
            threads_us: per_connection_us(&ours, threads_ns),
        })
    }

    pub(crate) fn total_us(&self) -> f64 {
        self.programs_us + self.threads_us
    }
}

pub(crate) fn churn(ctx: &Ctx, plan: &Scale) -> Result<Churn> {
    let tracers = [
        Tracer::None,
        Tracer::tcprst(&[]),
        Tracer::tcprst_history(),
        Tracer::bpftrace(&bpftrace_churn_script()),
    ];
    let mut rows = Vec::new();
    for rep in 0..plan.churn_reps {
        rows.extend(each_tracer(ctx, "churn", &tracers, 0, rep, || {
            Load::churn(plan.churn_secs, None)
        })?);
    }
    let ratio = |t: &str| median_ratio(&rows, t, 0);
    let (tcprst, history, bpftrace) = (
        ratio("tcprst"),
        ratio("tcprst --history"),
        ratio("bpftrace"),
    );
    let spread_tcprst = spread(ratios_per_rep(&rows, "tcprst", 0));
    let mut paced = Vec::new();
    for rep in 0..plan.churn_reps {
        paced.extend(each_tracer(
            ctx,
            "churn-paced",
            &tracers,
            PACED_CHURN_RATE,
            rep,
            || Load::churn_paced(PACED_CHURN_RATE, plan.paced_secs, None),
        )?);
    }
    let paced_us_per_connection = added_busy_us(&paced, &tracers, |r| r.completed);
    let direct = DirectCost::measure(ctx, plan)?;
    let tcprst_us = paced_us_per_connection
        .iter()
        .find(|(t, _)| t == "tcprst")
        .map_or(f64::NAN, |(_, us)| *us);
    let verdicts = vec![
        TargetCheck::at_least("churn: tcprst throughput ratio", tcprst, TARGET_CHURN_RATIO),
        TargetCheck::at_least(
            "churn: tcprst ratio / bpftrace ratio",
            tcprst / bpftrace,
            1.0,
        ),
        TargetCheck::at_most(
            &format!("churn: tcprst system CPU µs per connection at {PACED_CHURN_RATE}/s"),
            tcprst_us,
            TARGET_PACED_US_PER_CONNECTION,
        ),
    ];
    let mut t = Table::new(&[
        "tracer",
        "rep",
        "connections/s",
        "vs none",
        "tracer CPU%",
        "records read",
        "lines out",
        "lost",
        "µs/record",
    ]);
    for r in &rows {
        t.row(vec![
            r.tracer.clone(),
            (r.rep + 1).to_string(),
            format!("{:.0}", r.per_s),
            opt(r.vs_none(&rows), |v| format!("{v:.3}")),
            opt(r.cpu_pct, |v| format!("{v:.1}")),
            opt(r.records_read, |v| v.to_string()),
            opt(r.events, |v| v.to_string()),
            opt(r.lost, |v| v.to_string()),
            opt(r.us_per_record(), |v| format!("{v:.2}")),
        ]);
    }
    print_section("Connection churn", &t);
    let mut t = Table::new(&[
        "tracer",
        "rep",
        "connections/s",
        "system busy CPU s",
        "busy µs/connection",
        "added µs/connection",
    ]);
    for r in &paced {
        t.row(vec![
            r.tracer.clone(),
            (r.rep + 1).to_string(),
            format!("{:.0}", r.per_s),
            format!("{:.2}", r.system_busy_s),
            format!("{:.2}", busy_us_per(r, |r| r.completed)),
            opt(added_busy_us_of(&paced, r, |r| r.completed), |v| {
                format!("{v:.2}")
            }),
        ]);
    }
    print_section(
        &format!("Connection churn paced at {PACED_CHURN_RATE}/s"),
        &t,
    );
    let mut t = Table::new(&["tcprst, per connection", "µs"]);
    for (what, us) in [
        ("its programs (bpf_stats on)", direct.programs_us),
        (
            "of which empty programs on the same hooks",
            direct.empty_programs_us,
        ),
        ("its threads", direct.threads_us),
        ("direct total", direct.total_us()),
    ] {
        t.row(vec![what.to_owned(), format!("{us:.2}")]);
    }
    print_section(
        &format!("tcprst's direct cost per connection at {PACED_CHURN_RATE}/s"),
        &t,
    );
    Ok(Churn {
        rows,
        ratio_tcprst: tcprst,
        ratio_history: history,
        ratio_bpftrace: bpftrace,
        spread_tcprst,
        paced,
        paced_us_per_connection,
        direct,
        verdicts,
    })
}
