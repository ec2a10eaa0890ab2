//! Benchmark 1: RST storms. Connects to a closed port at rising rates; and
//! data after close, whose resets tcprst explains from the close notes.

use anyhow::Result;
use serde::Serialize;

use crate::bench::{
    BPFTRACE_RESETS, Ctx, PACED_STORM_RATE, Scale, TARGET_STORM_RATIO, TARGET_VS_BPFTRACE,
    report::{
        Measurement, Table, TargetCheck, added_busy_us, added_busy_us_of, median_ratio, opt,
        print_section, rate_label, ratios_per_rep, spread,
    },
    tracer::{ATTACH_ONLY, EVERY_RESET, Load, Tracer, each_tracer},
};

#[derive(Serialize)]
pub(crate) struct Storm {
    pub(crate) rows: Vec<Measurement>,
    /// Unpaced repetitions of each tracer.
    pub(crate) reps: usize,
    /// Median unpaced throughput with the tracer / without, per tracer:
    /// tcprst with its defaults (storms counted in the kernel), tcprst with
    /// a record per reset, bpftrace, and empty programs on tcprst's hooks.
    pub(crate) max_ratio_tcprst: f64,
    pub(crate) max_ratio_every_reset: f64,
    pub(crate) max_ratio_bpftrace: f64,
    pub(crate) max_ratio_attach_only: f64,
    /// The lowest and highest of each repetition's ratio, for the same
    /// tracers.
    pub(crate) spread_tcprst: (f64, f64),
    pub(crate) spread_every_reset: (f64, f64),
    pub(crate) spread_bpftrace: (f64, f64),
    /// tcprst's ratio with a record per reset over bpftrace's (target ≥ 2):
    /// of the medians, and the spread of each repetition's.
    pub(crate) tcprst_over_bpftrace: f64,
    pub(crate) spread_over_bpftrace: (f64, f64),
    /// Whether every default tcprst run's detailed and aggregate records
    /// added up to exactly two resets per refused connect.
    pub(crate) counts_exact: bool,
    /// System-wide busy CPU each tracer adds per reset at `PACED_STORM_RATE`.
    pub(crate) paced_us_per_reset: Vec<(String, f64)>,
    /// How much throughput bpftrace costs for each unit tcprst costs.
    pub(crate) overhead_bpftrace_over_tcprst: f64,
    pub(crate) max_lost_tcprst: u64,
    pub(crate) zero_loss_rate_tcprst: Option<f64>,
    pub(crate) zero_loss_rate_bpftrace: Option<f64>,
    pub(crate) verdicts: Vec<TargetCheck>,
}

pub(crate) fn storm(ctx: &Ctx, plan: &Scale) -> Result<Storm> {
    let tracers = [
        Tracer::None,
        Tracer::tcprst(&[]),
        Tracer::tcprst_every_reset(),
        Tracer::bpftrace(BPFTRACE_RESETS),
        Tracer::attach_only(),
    ];
    let mut rows = Vec::new();
    for &rate in plan.storm_rates {
        rows.extend(each_tracer(ctx, "storm", &tracers, rate, 0, || {
            Load::rst(rate, plan.storm_secs)
        })?);
    }
    // The unpaced maximum decides the ratios: repeated and interleaved, so
    // drift on the machine hits every tracer alike.
    for rep in 0..plan.storm_reps {
        rows.extend(each_tracer(ctx, "storm", &tracers, 0, rep, || {
            Load::rst(0, plan.storm_secs)
        })?);
    }
    let ratio = |t: &str| median_ratio(&rows, t, 0);
    let (tcprst, every_reset, bpftrace, attach_only) = (
        ratio("tcprst"),
        ratio(EVERY_RESET),
        ratio("bpftrace"),
        ratio(ATTACH_ONLY),
    );
    let spread_of = |t| spread(ratios_per_rep(&rows, t, 0));
    let over_bpftrace = spread_of_quotients(&rows, EVERY_RESET, "bpftrace");
    // Lost in the kernel, or never written out: an event tcprst had to
    // drop because its output fell behind is as gone for the reader. The
    // defaults' aggregated counts answer to `inexact` instead.
    let max_lost = |t: &str| {
        rows.iter()
            .filter(|r| r.tracer == t && r.target_rate == 0)
            .map(|r| {
                let missing = if t == EVERY_RESET { r.missing() } else { None };
                r.lost.unwrap_or(0).max(missing.unwrap_or(0))
            })
            .max()
            .unwrap_or(0)
    };
    let max_lost_tcprst = max_lost("tcprst").max(max_lost(EVERY_RESET));
    let inexact: Vec<String> = rows
        .iter()
        .filter(|r| r.tracer == "tcprst" && r.rst_events != Some(r.expected_events()))
        .map(|r| {
            format!(
                "{} resets counted of {} at {}/s",
                opt(r.rst_events, |n| n.to_string()),
                r.expected_events(),
                rate_label(r.target_rate)
            )
        })
        .collect();
    let paced_us_per_reset = added_busy_us(
        &rows
            .iter()
            .filter(|r| r.target_rate == PACED_STORM_RATE)
            .cloned()
            .collect::<Vec<_>>(),
        &tracers,
        Measurement::expected_events,
    );
    let zero_loss = |t: &str| {
        rows.iter()
            .filter(|r| r.tracer == t && r.lossless())
            .map(|r| r.per_s)
            .reduce(f64::max)
    };
    let verdicts = vec![
        TargetCheck::at_least(
            "storm: tcprst (defaults) unpaced throughput ratio, counts exact",
            tcprst,
            TARGET_STORM_RATIO,
        )
        .and(inexact.is_empty(), inexact.join("; ")),
        TargetCheck::at_least(
            "storm: tcprst --detail-per-sec 0 ratio / bpftrace ratio (of the medians), 0 lost",
            every_reset / bpftrace,
            TARGET_VS_BPFTRACE,
        )
        .and(
            max_lost_tcprst == 0,
            format!("{max_lost_tcprst} lost or not written"),
        ),
    ];
    print_section("RST storm", &storm_table(&rows));
    Ok(Storm {
        reps: plan.storm_reps,
        max_ratio_tcprst: tcprst,
        max_ratio_every_reset: every_reset,
        max_ratio_bpftrace: bpftrace,
        max_ratio_attach_only: attach_only,
        spread_tcprst: spread_of("tcprst"),
        spread_every_reset: spread_of(EVERY_RESET),
        spread_bpftrace: spread_of("bpftrace"),
        tcprst_over_bpftrace: every_reset / bpftrace,
        spread_over_bpftrace: over_bpftrace,
        counts_exact: inexact.is_empty(),
        paced_us_per_reset,
        overhead_bpftrace_over_tcprst: (1.0 - bpftrace) / (1.0 - tcprst),
        max_lost_tcprst,
        zero_loss_rate_tcprst: zero_loss("tcprst"),
        zero_loss_rate_bpftrace: zero_loss("bpftrace"),
        verdicts,
        rows,
    })
}

/// A storm of data after close, a line per reset: the resets on sockets
/// that sent their FIN, whose records name their close from the close
/// notes, which the refused connects never exercise.
#[derive(Serialize)]
pub(crate) struct DataAfterClose {
    pub(crate) rows: Vec<Measurement>,
    pub(crate) reps: usize,
    /// Median throughput with the tracer over without.
    pub(crate) ratio_every_reset: f64,
    pub(crate) ratio_bpftrace: f64,
    /// Each repetition's quotient of the two.
    pub(crate) spread_over_bpftrace: (f64, f64),
    /// Resets lost or not written, at most, over tcprst's runs.
    pub(crate) max_lost_tcprst: u64,
    /// Over tcprst's runs: sent resets that named their close, of those
    /// shown, and connections (each made one sent reset; those not shown
    /// are counted as lost or not written).
    pub(crate) sent_naming_a_close: u64,
    pub(crate) sent_shown: u64,
    pub(crate) connections: u64,
    /// Close notes tcprst lost unread over its runs: the closes it could
    /// not name for want of them.
    pub(crate) notes_overwritten: u64,
    pub(crate) verdicts: Vec<TargetCheck>,
}

pub(crate) fn data_after_close(ctx: &Ctx, plan: &Scale) -> Result<DataAfterClose> {
    let tracers = [
        Tracer::None,
        Tracer::tcprst_every_reset(),
        Tracer::bpftrace(BPFTRACE_RESETS),
    ];
    let mut rows = Vec::new();
    for rep in 0..plan.data_after_close_reps {
        rows.extend(each_tracer(
            ctx,
            "data after close",
            &tracers,
            0,
            rep,
            || Load::data_after_close(plan.storm_secs),
        )?);
    }
    let tcprst_rows = || rows.iter().filter(|r| r.tracer == EVERY_RESET);
    let max_lost_tcprst = tcprst_rows()
        .map(|r| r.lost.unwrap_or(0).max(r.missing().unwrap_or(0)))
        .max()
        .unwrap_or(0);
    let sent_naming_a_close = tcprst_rows().filter_map(|r| r.sent_naming_a_close).sum();
    let sent_shown = tcprst_rows().filter_map(|r| r.sent_shown).sum();
    let connections = tcprst_rows().map(|r| r.completed).sum();
    let notes_overwritten = tcprst_rows().filter_map(|r| r.notes_overwritten).sum();
    let verdicts = vec![TargetCheck::at_most(
        "data after close: tcprst --detail-per-sec 0, resets lost or not written",
        max_lost_tcprst as f64,
        0.0,
    )];
    print_section("Data after close", &storm_table(&rows));
    Ok(DataAfterClose {
        reps: plan.data_after_close_reps,
        ratio_every_reset: median_ratio(&rows, EVERY_RESET, 0),
        ratio_bpftrace: median_ratio(&rows, "bpftrace", 0),
        spread_over_bpftrace: spread_of_quotients(&rows, EVERY_RESET, "bpftrace"),
        max_lost_tcprst,
        sent_naming_a_close,
        sent_shown,
        connections,
        notes_overwritten,
        verdicts,
        rows,
    })
}

/// The lowest and highest of each unpaced repetition's quotient of `ours`
/// over `theirs`: both ran between the same two drifts.
fn spread_of_quotients(rows: &[Measurement], ours: &str, theirs: &str) -> (f64, f64) {
    spread(
        ratios_per_rep(rows, ours, 0)
            .zip(ratios_per_rep(rows, theirs, 0))
            .map(|(ours, theirs)| ours / theirs),
    )
}

pub(crate) fn storm_table(rows: &[Measurement]) -> Table {
    let mut t = Table::new(&[
        "tracer",
        "target/s",
        "rep",
        "connects/s",
        "vs none",
        "RST events/s",
        "expected/s",
        "lost",
        "missing",
        "tracer CPU%",
        "µs/record",
        "added busy µs/reset",
    ]);
    for r in rows {
        t.row(vec![
            r.tracer.clone(),
            rate_label(r.target_rate),
            (r.rep + 1).to_string(),
            format!("{:.0}", r.per_s),
            opt(r.vs_none(rows), |v| format!("{v:.3}")),
            opt(r.events_per_s(), |v| format!("{v:.0}")),
            opt(
                r.tracer_ran()
                    .then_some(r.expected_events() as f64 / r.load_s),
                |v| format!("{v:.0}"),
            ),
            opt(r.lost, |v| v.to_string()),
            opt(r.missing(), |v| v.to_string()),
            opt(r.cpu_pct, |v| format!("{v:.1}")),
            opt(r.us_per_record(), |v| format!("{v:.2}")),
            opt(
                added_busy_us_of(rows, r, Measurement::expected_events),
                |v| format!("{v:.2}"),
            ),
        ]);
    }
    t
}
