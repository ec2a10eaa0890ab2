//! Benchmark 4: userspace cost per record, and memory with many
//! connections tracked.

use anyhow::{Context as _, Result};
use serde::Serialize;

use crate::{
    bench::{
        Ctx, Scale, TARGET_RSS_MIB,
        churn::Churn,
        report::{Measurement, Table, TargetCheck, median, opt, print_section, rate_label},
        storm::Storm,
        tracer::{Load, Tracer, measure},
    },
    sys::free_loopback_port,
};

#[derive(Serialize)]
pub(crate) struct Userspace {
    /// tcprst CPU per ring-buffer record, from the storm runs.
    pub(crate) us_per_record: Vec<RecordCost>,
    /// Records/s one core could decode and encode at the median cost.
    pub(crate) records_per_core_s: Option<f64>,
    pub(crate) memory: Vec<MemoryPoint>,
    pub(crate) verdicts: Vec<TargetCheck>,
}

#[derive(Serialize)]
pub(crate) struct RecordCost {
    pub(crate) target_rate: u32,
    pub(crate) records_per_s: f64,
    pub(crate) rst_events_per_s: f64,
    pub(crate) cpu_pct: f64,
    pub(crate) us_per_record: f64,
    pub(crate) us_per_rst_event: f64,
    pub(crate) lost: u64,
}

#[derive(Serialize)]
pub(crate) struct MemoryPoint {
    pub(crate) run: String,
    /// Connections the generator completed while tcprst traced.
    pub(crate) connections: u64,
    /// Half-closed connections tcprst followed at the end, when scraped.
    pub(crate) tracked: Option<u64>,
    /// VmRSS once attached, before the load.
    pub(crate) idle_rss_mib: f64,
    pub(crate) vm_rss_mib: f64,
    /// Peak RSS, startup included.
    pub(crate) vm_hwm_mib: f64,
    /// Kernel memory of tcprst's BPF maps.
    pub(crate) map_mib: f64,
    pub(crate) lost: u64,
}

pub(crate) fn userspace(
    ctx: &Ctx,
    plan: &Scale,
    storm: &Storm,
    churn: &Churn,
) -> Result<Userspace> {
    let costs = record_costs(storm);
    let median_us = median(costs.iter().map(|c| c.us_per_record).collect());
    let memory = memory_points(ctx, plan, churn)?;
    let big = memory.last().context("no memory point")?;
    let verdicts = vec![
        TargetCheck::at_most(
            &format!(
                "memory: tcprst peak RSS MiB (startup included) over {} churned connections, 0 lost",
                big.connections
            ),
            big.vm_hwm_mib,
            TARGET_RSS_MIB,
        )
        .and(big.lost == 0, format!("{} lost", big.lost)),
    ];
    print_section(
        "Userspace cost per record (tcprst, from the storm runs)",
        &cost_table(&costs),
    );
    print_section(
        "tcprst memory under connection churn",
        &memory_table(&memory),
    );
    Ok(Userspace {
        us_per_record: costs,
        records_per_core_s: median_us.map(|us| 1e6 / us),
        memory,
        verdicts,
    })
}

/// tcprst CPU per record read and per reset shown, in each storm run.
pub(crate) fn record_costs(storm: &Storm) -> Vec<RecordCost> {
    let mut costs: Vec<RecordCost> = storm
        .rows
        .iter()
        .filter(|r| r.tracer == "tcprst")
        .filter_map(|r| {
            Some(RecordCost {
                target_rate: r.target_rate,
                records_per_s: r.records_read? as f64 / r.load_s,
                rst_events_per_s: r.events_per_s()?,
                cpu_pct: r.cpu_pct?,
                us_per_record: r.us_per_record()?,
                us_per_rst_event: r.cpu_s? * 1e6 / r.rst_events?.max(1) as f64,
                lost: r.lost?,
            })
        })
        .collect();
    costs.sort_by(|a, b| a.records_per_s.total_cmp(&b.records_per_s));
    costs
}

pub(crate) fn cost_table(costs: &[RecordCost]) -> Table {
    let mut t = Table::new(&[
        "target/s",
        "records/s",
        "RST events/s",
        "tcprst CPU%",
        "µs/record",
        "µs/RST event",
        "lost",
    ]);
    for c in costs {
        t.row(vec![
            rate_label(c.target_rate),
            format!("{:.0}", c.records_per_s),
            format!("{:.0}", c.rst_events_per_s),
            format!("{:.1}", c.cpu_pct),
            format!("{:.2}", c.us_per_record),
            format!("{:.2}", c.us_per_rst_event),
            c.lost.to_string(),
        ]);
    }
    t
}

/// The last churn run with tcprst's defaults, then a dedicated churn of
/// `rss_connections` connections: RSS must not grow with them.
pub(crate) fn memory_points(ctx: &Ctx, plan: &Scale, churn: &Churn) -> Result<Vec<MemoryPoint>> {
    let defaults = churn
        .rows
        .iter()
        .rev()
        .find(|r| r.tracer == "tcprst")
        .context("no tcprst churn run to read memory from")?;
    let load = Load::churn(plan.rss_secs, Some(plan.rss_connections));
    let metrics = format!("127.0.0.1:{}", free_loopback_port()?);
    let tracer = Tracer::tcprst(&["--metrics-addr", &metrics]);
    let dedicated = Measurement::new("memory", &tracer, 0, 0, measure(ctx, &tracer, &[load])?);
    Ok(vec![
        MemoryPoint::from_row("churn (defaults)", defaults)?,
        MemoryPoint::from_row("dedicated churn", &dedicated)?,
    ])
}

pub(crate) const MIB: f64 = 1024.0 * 1024.0;

impl MemoryPoint {
    pub(crate) fn from_row(run: &str, row: &Measurement) -> Result<Self> {
        let mib = |v: Option<u64>, what: &str| -> Result<f64> {
            Ok(v.with_context(|| format!("no {what} for tcprst"))? as f64 * 1024.0 / MIB)
        };
        Ok(Self {
            run: run.into(),
            connections: row.completed,
            tracked: row.tracked_half_closed,
            idle_rss_mib: mib(row.idle_rss_kib, "idle VmRSS")?,
            vm_rss_mib: mib(row.vm_rss_kib, "VmRSS")?,
            vm_hwm_mib: mib(row.vm_hwm_kib, "VmHWM")?,
            map_mib: mib(row.map_kib, "BPF map memory")?,
            lost: row.lost.unwrap_or(0),
        })
    }
}

pub(crate) fn memory_table(points: &[MemoryPoint]) -> Table {
    let mut t = Table::new(&[
        "run",
        "connections churned",
        "half-closed tracked at the end",
        "idle VmRSS MiB",
        "VmRSS MiB",
        "VmHWM MiB",
        "BPF maps MiB",
        "lost records",
    ]);
    for p in points {
        t.row(vec![
            p.run.clone(),
            p.connections.to_string(),
            opt(p.tracked, |v| v.to_string()),
            format!("{:.1}", p.idle_rss_mib),
            format!("{:.1}", p.vm_rss_mib),
            format!("{:.1}", p.vm_hwm_mib),
            format!("{:.1}", p.map_mib),
            p.lost.to_string(),
        ]);
    }
    t
}
