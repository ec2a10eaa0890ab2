//! `cargo xtask soak`: tcprst under alternating load for minutes; its memory must level off

use std::{
    fs,
    path::{Path, PathBuf},
    process::{self, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use tcprst_common::stderr;

use crate::{
    bench::{
        Ctx, NETNS_PREFIX, prepare_as_root,
        report::median,
        tracer::{Kind, Load, Scrape, count_output, json_number, run_load},
    },
    mountinfo::mount_point,
    process::{Proc, create, last_line, tcprst_line, wait_for_marker},
    sys::{free_loopback_port, left_by_dead_run, proc_memory, remove_netns_where, run_netns},
};

#[derive(clap::Args, Debug)]
pub(crate) struct SoakOptions {
    /// How long to run the load
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Set when re-run as root: setup and build are already done
    #[arg(long, hide = true)]
    prepared: bool,
    /// Soak the tcprst and tcprst-loadgen in DIR instead of building release ones
    /// (`cargo xtask test` passes the static ones it built for vm-test)
    #[arg(long, value_name = "DIR")]
    binaries: Option<PathBuf>,
}

/// Seconds of each load between two samples.
pub(crate) const SOAK_SEGMENT_S: f64 = 5.0;
/// Paced so the output is not the bottleneck being measured.
pub(crate) const SOAK_RST_RATE: u32 = 2000;
/// Namespaces, each with a cgroup, that the namespace phase makes and
/// removes over a whole soak, shared evenly among its segments.
pub(crate) const SOAK_NAMESPACES: u64 = 1000;
/// The closed port of the namespace phase's connects: it tells their
/// resets apart from the rest of the host's.
pub(crate) const SOAK_NETNS_PORT: u16 = 1;
/// Samples before this share of the run are warm-up.
pub(crate) const SOAK_WARMUP: f64 = 0.25;
/// Growth after warm-up beyond both SOAK_MAX_GROWTH and the quantity's own
/// allowance is a leak.
pub(crate) const SOAK_MAX_GROWTH: f64 = 0.10;
pub(crate) const SOAK_MAX_GROWTH_KIB: u64 = 4096;
/// Traffic elsewhere on the host may show a new reason, caller or state
/// late in the run, each a series once; a cache that made a series per
/// namespace or cgroup would add one for each of hundreds.
pub(crate) const SOAK_MAX_GROWTH_SERIES: u64 = 10;

#[derive(Debug, Clone, Serialize)]
pub(crate) struct SoakSample {
    pub(crate) at_s: f64,
    pub(crate) load: &'static str,
    /// What the load completed: connections; refused connects, for netns
    /// one a namespace.
    pub(crate) connections: u64,
    pub(crate) rss_kib: u64,
    /// Lines of samples in tcprst's metrics.
    pub(crate) series: u64,
    pub(crate) tracked_connections: u64,
    /// Half-closed connections past --max-connections.
    pub(crate) untracked: u64,
}

#[derive(Debug, Serialize)]
pub(crate) struct SoakSummary {
    pub(crate) minutes: f64,
    pub(crate) samples: Vec<SoakSample>,
    pub(crate) rss_kib: Trend,
    pub(crate) series: Trend,
    pub(crate) netns: NetnsPhase,
}

/// What the namespace phase did, and what tcprst saw of it.
#[derive(Debug, Serialize)]
pub(crate) struct NetnsPhase {
    /// Namespaces made and removed, each with a cgroup and one refused
    /// connect in both.
    pub(crate) namespaces: u64,
    /// Resets tcprst reported on SOAK_NETNS_PORT: two a namespace.
    pub(crate) resets_seen: u64,
}

/// A quantity sampled through the soak: whether it levelled off.
#[derive(Debug, PartialEq, Serialize)]
pub(crate) struct Trend {
    /// Median of the quarter of the samples right after warm-up.
    pub(crate) settled: u64,
    /// Median of the last quarter.
    pub(crate) last: u64,
    pub(crate) flat: bool,
}

impl Trend {
    /// Flat unless the last quarter's median passes the one right after
    /// warm-up by more than `allowance` and by more than SOAK_MAX_GROWTH.
    pub(crate) fn of(values: &[u64], allowance: u64) -> Result<Self> {
        let warm = ((values.len() as f64 * SOAK_WARMUP).ceil() as usize).max(1);
        let quarter = (values.len() / 4).max(1);
        if values.len() < warm + quarter {
            bail!("only {} samples: soak for longer", values.len());
        }
        let median_of =
            |part: &[u64]| median(part.iter().map(|&v| v as f64).collect()).unwrap_or(0.0) as u64;
        let settled = median_of(&values[warm..warm + quarter]);
        let last = median_of(&values[values.len() - quarter..]);
        let growth = last.saturating_sub(settled);
        Ok(Self {
            settled,
            last,
            flat: growth <= allowance || (growth as f64) <= settled as f64 * SOAK_MAX_GROWTH,
        })
    }
}

impl std::fmt::Display for Trend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} after warm-up, {} at the end: {}",
            self.settled,
            self.last,
            if self.flat { "flat" } else { "STILL GROWING" }
        )
    }
}

/// `cargo xtask soak`: churn, RST storms and namespace churn in turn
/// against `tcprst trace -o json` for `--minutes`, sampling its RSS, its
/// metric series and how full its connection tracker and the kernel's
/// owner map are. Fails when RSS or the series keep growing after warm-up,
/// or when tcprst missed resets in the namespaces that came and went.
pub(crate) fn soak(opts: &SoakOptions) -> Result<()> {
    let binaries = prepare_as_root(opts.prepared, opts.binaries.as_deref())?;
    let ctx = Ctx::prepare(false, &binaries)?;
    let ns = run_netns("soak")?;
    let cgroups = ChurnCgroup::create()?;
    let port = free_loopback_port()?;
    let (out, err) = (ctx.path("soak", "out"), ctx.path("soak", "err"));
    let mut cmd = Command::new(&ctx.tcprst);
    // No --netns: the namespace phase's namespaces are new every few
    // milliseconds, and an agent traces the whole host anyway. The output
    // stays in target/bench/runs for a look after a failure.
    cmd.args(["trace", "-o", "json", "--metrics-addr"])
        .arg(format!("127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(create(&out)?)
        .stderr(create(&err)?);
    let mut tcprst = Proc::spawn(&mut cmd, "tcprst")?;
    wait_for_marker(&tcprst, &err, &tcprst_line(stderr::TRACING))?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(opts.minutes * 60.0);
    // Three loads take turns; a namespace segment that runs out of time
    // makes fewer than its share.
    let netns_segments = (opts.minutes * 60.0 / SOAK_SEGMENT_S / 3.0).ceil().max(1.0) as u64;
    let netns_share = SOAK_NAMESPACES.div_ceil(netns_segments);
    let mut namespaces = 0;
    let mut samples = Vec::new();
    for segment in 0.. {
        if Instant::now() >= deadline {
            break;
        }
        let (name, load) = match segment % 3 {
            0 => ("churn", Load::churn(SOAK_SEGMENT_S, None)),
            1 => ("rst", Load::rst(SOAK_RST_RATE, SOAK_SEGMENT_S)),
            _ => match netns_share.min(SOAK_NAMESPACES - namespaces) {
                0 => continue,
                max => ("netns", cgroups.load(segment, max)),
            },
        };
        let result = run_load(
            &ctx,
            &ns,
            &load,
            &ctx.path("soak", &format!("load{segment}.json")),
        )?;
        if result.errors > 0 {
            eprintln!(
                "soak: warning: {} errors in the {name} load, first: {}",
                result.errors,
                result.first_error.as_deref().unwrap_or("?")
            );
        }
        if name == "netns" {
            namespaces += result.completed;
        }
        if tcprst.exited() {
            bail!("tcprst exited during the soak: {}", last_line(&err));
        }
        let metrics = Scrape::get(port)?;
        let sample = SoakSample {
            at_s: started.elapsed().as_secs_f64(),
            load: name,
            connections: result.completed,
            rss_kib: proc_memory(tcprst.pid())?.1,
            series: metrics.series(),
            tracked_connections: metrics.value("tcprst_tracked_connections")?,
            untracked: metrics.value("tcprst_untracked_connections")?,
        };
        eprintln!(
            "soak: {:>5.0}s {:<5} {:>7} connections  rss {:>6} KiB  series {:>4}  tracked {:>6}  untracked {:>6}",
            sample.at_s,
            sample.load,
            sample.connections,
            sample.rss_kib,
            sample.series,
            sample.tracked_connections,
            sample.untracked
        );
        samples.push(sample);
    }
    tcprst.signal(libc::SIGINT);
    let status = tcprst.wait(Duration::from_secs(30))?;
    if !status.success() {
        bail!(
            "tcprst failed at the end of the soak ({status}): {}",
            last_line(&err)
        );
    }
    let on_netns_port = |line: &str| {
        let port = Some(u64::from(SOAK_NETNS_PORT));
        json_number(line, "local_port") == port || json_number(line, "remote_port") == port
    };
    let resets_seen = count_output(Kind::Tcprst, &out, &err, on_netns_port)?.rsts;
    let summary = SoakSummary {
        minutes: opts.minutes,
        rss_kib: Trend::of(
            &samples.iter().map(|s| s.rss_kib).collect::<Vec<_>>(),
            SOAK_MAX_GROWTH_KIB,
        )?,
        series: Trend::of(
            &samples.iter().map(|s| s.series).collect::<Vec<_>>(),
            SOAK_MAX_GROWTH_SERIES,
        )?,
        netns: NetnsPhase {
            namespaces,
            resets_seen,
        },
        samples,
    };
    let path = ctx.out_dir.join("soak.json");
    fs::write(&path, serde_json::to_string_pretty(&summary)?)
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("soak: RSS KiB {}", summary.rss_kib);
    eprintln!(
        "soak: metric series {} at the first sample, {}",
        summary.samples.first().map_or(0, |s| s.series),
        summary.series
    );
    eprintln!(
        "soak: {namespaces} network namespaces and {namespaces} cgroups made and removed, a refused connect in each; tcprst reported {resets_seen} of their {} resets",
        2 * namespaces
    );
    eprintln!("soak: samples in {}", path.display());
    if !summary.rss_kib.flat {
        bail!("tcprst's memory kept growing after warm-up");
    }
    if !summary.series.flat {
        bail!("tcprst's metric series kept growing after warm-up");
    }
    if resets_seen < 2 * namespaces {
        bail!(
            "tcprst missed resets in namespaces that came and went: {resets_seen} of {}; its output is in {}",
            2 * namespaces,
            out.display()
        );
    }
    Ok(())
}

/// The cgroup in which the soak's namespace phase makes one cgroup per
/// namespace. Dropping it removes it, with what a generator killed
/// mid-connect left: its last cgroup and namespace.
pub(crate) struct ChurnCgroup {
    pub(crate) dir: PathBuf,
    /// Of the cgroup, and the start of every name made in it and of every
    /// namespace the phase makes.
    pub(crate) prefix: String,
}

impl ChurnCgroup {
    pub(crate) fn create() -> Result<Self> {
        let mountinfo =
            fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
        let root = mount_point(&mountinfo, "cgroup2")
            .context("cgroup2 is not mounted: the soak makes cgroups in it")?;
        for entry in fs::read_dir(&root).into_iter().flatten().flatten() {
            if left_by_dead_run(&entry.file_name().to_string_lossy()) {
                remove_cgroup(&entry.path());
            }
        }
        let prefix = format!("{NETNS_PREFIX}{}-ns", process::id());
        let dir = root.join(&prefix);
        fs::create_dir(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        Ok(Self { dir, prefix })
    }

    /// Segment `segment`'s load: up to `max` namespaces, with names of
    /// their own so that no two segments' look alike to tcprst.
    pub(crate) fn load(&self, segment: usize, max: u64) -> Load {
        Load::namespaces(
            SOAK_SEGMENT_S,
            max,
            &self.dir,
            &format!("{}{segment}", self.prefix),
        )
    }
}

impl Drop for ChurnCgroup {
    fn drop(&mut self) {
        remove_netns_where(|name| name.starts_with(&self.prefix));
        remove_cgroup(&self.dir);
    }
}

/// Removes cgroup `dir` and the cgroups in it, which hold no process.
pub(crate) fn remove_cgroup(dir: &Path) {
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            let _ = fs::remove_dir(entry.path());
        }
    }
    let _ = fs::remove_dir(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trend_is_flat_unless_it_keeps_growing_after_warm_up() {
        // Warm-up is the first quarter: its growth does not count.
        let levelled = [10, 50, 100, 100, 101, 100, 102, 101];
        assert_eq!(
            Trend::of(&levelled, 0).unwrap(),
            Trend {
                settled: 100,
                last: 101,
                flat: true
            }
        );
        let climbing = [100, 110, 120, 130, 140, 150, 160, 170];
        let trend = Trend::of(&climbing, 0).unwrap();
        assert!(!trend.flat, "{trend}");
        // Within the allowance it is flat, however large the share.
        assert!(Trend::of(&[1, 1, 1, 1, 1, 1, 5, 5], 4).unwrap().flat);
        assert!(!Trend::of(&[1, 1, 1, 1, 1, 1, 6, 6], 4).unwrap().flat);
        assert!(Trend::of(&[1], 0).is_err());
    }
}
