//! Benchmark 3: kernel-side cost per program run, next to empty bpftrace
//! programs on the same tracepoints.

use anyhow::{Result, bail};
use serde::Serialize;

use crate::{
    bench::{
        Ctx, ProgStat, STATS_SYSCTL, Scale, TARGET_COST_RATIO, TARGET_RESET_COST_RATIO,
        TCPRST_PROGRAMS, bpftrace_churn_script,
        report::{Table, TargetCheck, opt, print_section},
        tracer::{Load, Sample, Tracer, measure},
    },
    sys::Sysctl,
};

#[derive(Serialize)]
pub(crate) struct KernelCost {
    pub(crate) programs: Vec<ProgramCost>,
    /// The same loads with `--history`: the close-mark program then keeps
    /// every state change of every socket.
    pub(crate) programs_history: Vec<ProgramCost>,
    /// All of tcprst's program time over what empty programs would have
    /// taken for the same runs.
    pub(crate) weighted_ratio: Option<f64>,
    pub(crate) verdicts: Vec<TargetCheck>,
}

#[derive(Serialize)]
pub(crate) struct ProgramCost {
    pub(crate) program: String,
    pub(crate) tracepoints: Vec<String>,
    pub(crate) runs: u64,
    pub(crate) ns_per_run: f64,
    pub(crate) floor_ns_per_run: Option<f64>,
    pub(crate) ratio: Option<f64>,
    /// The bpftrace script that prints the same events, where it has this hook.
    pub(crate) bpftrace_printf_ns_per_run: Option<f64>,
}

pub(crate) fn kernel_cost(ctx: &Ctx, plan: &Scale) -> Result<KernelCost> {
    // Stats add two clock reads per program run; on only for these runs.
    let _stats = Sysctl::set(STATS_SYSCTL, "1")?;
    let loads = [
        Load::rst(20_000, plan.cost_secs),
        Load::churn(plan.cost_secs, None),
    ];
    let ours = measure(ctx, &Tracer::tcprst(&[]), &loads)?;
    let history = measure(ctx, &Tracer::tcprst_history(), &loads)?;
    let floor = measure(ctx, &Tracer::attach_only(), &loads)?;
    let printf = measure(ctx, &Tracer::bpftrace(&bpftrace_churn_script()), &loads)?;
    let progs = |s: &Sample| {
        s.tracer
            .as_ref()
            .map(|t| t.progs.clone())
            .unwrap_or_default()
    };
    let programs = program_costs(&progs(&ours), &progs(&floor), &progs(&printf));
    let programs_history = program_costs(&progs(&history), &progs(&floor), &progs(&printf));
    if programs.is_empty() {
        bail!(
            "no tcprst program ran with kernel.bpf_stats_enabled=1: cannot measure kernel-side cost"
        );
    }
    // Over the programs that have a floor: time spent / time empty programs
    // would have spent on the same runs.
    let (ours_ns, floor_ns) = programs
        .iter()
        .filter_map(|p| {
            Some((
                p.ns_per_run * p.runs as f64,
                p.floor_ns_per_run? * p.runs as f64,
            ))
        })
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let weighted_ratio = (floor_ns > 0.0).then(|| ours_ns / floor_ns);
    let mut verdicts: Vec<TargetCheck> = programs
        .iter()
        .filter_map(|p| {
            let target = if p.program.starts_with("tcprst_rst_") {
                TARGET_RESET_COST_RATIO
            } else {
                TARGET_COST_RATIO
            };
            Some(TargetCheck::at_most(
                &format!("kernel: {} ns/run vs empty program", p.program),
                p.ratio?,
                target,
            ))
        })
        .collect();
    if let Some(w) = weighted_ratio {
        verdicts.push(TargetCheck::at_most(
            "kernel: all programs, weighted by runs",
            w,
            TARGET_COST_RATIO,
        ));
    }
    print_section(
        "Kernel-side cost per program run",
        &program_table(&programs),
    );
    print_section(
        "Kernel-side cost per program run, with --history",
        &program_table(&programs_history),
    );
    Ok(KernelCost {
        programs,
        programs_history,
        weighted_ratio,
        verdicts,
    })
}

pub(crate) fn program_table(programs: &[ProgramCost]) -> Table {
    let mut t = Table::new(&[
        "program",
        "tracepoint(s)",
        "runs",
        "ns/run",
        "empty ns/run",
        "ratio",
        "bpftrace printf ns/run",
    ]);
    for p in programs {
        t.row(vec![
            p.program.clone(),
            p.tracepoints.join(" + "),
            p.runs.to_string(),
            format!("{:.0}", p.ns_per_run),
            opt(p.floor_ns_per_run, |v| format!("{v:.0}")),
            opt(p.ratio, |v| format!("{v:.1}")),
            opt(p.bpftrace_printf_ns_per_run, |v| format!("{v:.0}")),
        ]);
    }
    t
}

/// One empty program per tracepoint tcprst uses: the tp_btf and classic
/// variants of a reset program share theirs.
pub(crate) fn empty_programs_script() -> String {
    TCPRST_PROGRAMS
        .iter()
        .flat_map(|(_, tps)| tps.iter())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .map(|tp| format!("tracepoint:{tp} {{}}\n"))
        .collect()
}

/// Each tcprst program that ran, next to the empty and the printing
/// bpftrace programs on its tracepoints.
pub(crate) fn program_costs(
    ours: &[ProgStat],
    floor: &[ProgStat],
    printf: &[ProgStat],
) -> Vec<ProgramCost> {
    ours.iter()
        .filter(|p| p.run_cnt > 0)
        .map(|p| {
            let tracepoints: Vec<String> = TCPRST_PROGRAMS
                .iter()
                .find(|(name, _)| *name == p.name)
                .map(|(_, tps)| tps.iter().map(|s| s.to_string()).collect())
                .unwrap_or_default();
            let floor_ns = ns_per_run_on(floor, &tracepoints);
            let ns = p.ns_per_run();
            ProgramCost {
                program: p.name.clone(),
                runs: p.run_cnt,
                ns_per_run: ns,
                ratio: floor_ns.map(|f| ns / f),
                floor_ns_per_run: floor_ns,
                bpftrace_printf_ns_per_run: ns_per_run_on(printf, &tracepoints),
                tracepoints,
            }
        })
        .collect()
}

/// ns per run of the programs attached to `tracepoints` among `progs`,
/// which bpftrace names after the tracepoint, cut to the kernel's 15 bytes.
pub(crate) fn ns_per_run_on(progs: &[ProgStat], tracepoints: &[String]) -> Option<f64> {
    let names: Vec<String> = tracepoints
        .iter()
        .filter_map(|tp| tp.split(':').nth(1))
        .map(|event| event.chars().take(15).collect())
        .collect();
    let (time, runs) = progs
        .iter()
        .filter(|p| names.contains(&p.name))
        .fold((0, 0), |(t, n), p| (t + p.run_time_ns, n + p.run_cnt));
    (runs > 0).then(|| time as f64 / runs as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::median;

    #[test]
    fn median_and_floor_lookup() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0]), Some(2.5));
        assert_eq!(median(Vec::new()), None);
        let prog = |name: &str, t, n| ProgStat {
            id: 0,
            name: name.into(),
            run_time_ns: t,
            run_cnt: n,
        };
        // bpftrace names both accept programs "sys_exit_accept" (15 bytes).
        let floor = [
            prog("sys_exit_accept", 100, 2),
            prog("sys_exit_accept", 300, 2),
            prog("tcp_send_reset", 9, 1),
        ];
        let tps = [
            "syscalls:sys_exit_accept4".to_string(),
            "syscalls:sys_exit_accept".to_string(),
        ];
        assert_eq!(ns_per_run_on(&floor, &tps), Some(100.0));
        assert_eq!(
            ns_per_run_on(&floor, &["sock:inet_sock_set_state".to_string()]),
            None
        );
    }
}
