//! One tracer around one workload: tcprst, bpftrace or none, started in a
//! fresh network namespace, and what it saw and cost.

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use tcprst_common::stderr;
use tcprst_loadgen::netns::ScratchNetns;

use crate::{
    bench::{
        CHURN_SOURCES, Ctx, ProgStat, kernel_cost::empty_programs_script, report::Measurement,
    },
    process::{Proc, check_interrupted, create, last_line, tcprst_line},
    soak::SOAK_NETNS_PORT,
    sys::{
        clock_ticks_per_s, proc_cpu_ticks, proc_memory, run_netns, system_busy_s, system_idle_s,
        thread_cpu_ns, thread_cpu_ns_between,
    },
};

/// A tracer, or none (the baseline).
pub(crate) enum Tracer {
    None,
    Tcprst {
        label: &'static str,
        args: Vec<String>,
    },
    Bpftrace {
        label: &'static str,
        script: String,
    },
}

/// Labels of the storm's extra tracers.
pub(crate) const EVERY_RESET: &str = "tcprst --detail-per-sec 0";
pub(crate) const ATTACH_ONLY: &str = "attach only";

impl Tracer {
    pub(crate) fn tcprst(extra: &[&str]) -> Self {
        Self::Tcprst {
            label: "tcprst",
            args: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// tcprst keeping every state change of every socket in the kernel.
    pub(crate) fn tcprst_history() -> Self {
        Self::Tcprst {
            label: "tcprst --history",
            args: vec!["--history".into()],
        }
    }

    /// tcprst with a record for every reset, as before storms were
    /// counted in the kernel.
    pub(crate) fn tcprst_every_reset() -> Self {
        Self::Tcprst {
            label: EVERY_RESET,
            args: vec!["--detail-per-sec".into(), "0".into()],
        }
    }

    pub(crate) fn bpftrace(script: &str) -> Self {
        Self::Bpftrace {
            label: "bpftrace",
            script: script.to_owned(),
        }
    }

    /// Empty programs on every tracepoint tcprst's programs use: what
    /// firing the hooks costs, apart from what the programs do.
    pub(crate) fn attach_only() -> Self {
        Self::Bpftrace {
            label: ATTACH_ONLY,
            script: empty_programs_script(),
        }
    }

    /// Whether the tracer shows the resets it sees: the empty programs
    /// print nothing, so none of theirs are missing.
    pub(crate) fn prints_events(&self) -> bool {
        self.label() != ATTACH_ONLY
    }

    /// The port of `--metrics-addr 127.0.0.1:PORT`, if given.
    pub(crate) fn metrics_port(&self) -> Option<u16> {
        let Self::Tcprst { args, .. } = self else {
            return None;
        };
        let at = args.iter().position(|a| a == "--metrics-addr")?;
        args.get(at + 1)?.rsplit(':').next()?.parse().ok()
    }

    pub(crate) fn label(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Tcprst { label, .. } => label,
            Self::Bpftrace { label, .. } => label,
        }
    }

    pub(crate) fn command(&self, ctx: &Ctx, ns: &ScratchNetns, out: &Path) -> Option<Command> {
        match self {
            Self::None => None,
            Self::Tcprst { args, .. } => {
                let mut cmd = Command::new(&ctx.tcprst);
                cmd.args(["trace", "-o", "json", "--netns", &ns.name])
                    .args(args);
                Some(cmd)
            }
            Self::Bpftrace { script, .. } => {
                let mut cmd = Command::new("bpftrace");
                cmd.arg("-o")
                    .arg(out)
                    .arg("-e")
                    .arg(script)
                    .arg(ns.inode.to_string());
                // It asks for more locked memory than the default limit;
                // raise the soft limit as far as the hard one allows.
                // SAFETY: raise_memlock_soft_limit only calls getrlimit and
                // setrlimit, async-signal-safe and allocation-free, as the
                // child between fork and exec requires.
                unsafe { cmd.pre_exec(raise_memlock_soft_limit) };
                Some(cmd)
            }
        }
    }
}

/// One generator invocation.
pub(crate) struct Load {
    pub(crate) args: Vec<String>,
    pub(crate) secs: f64,
    /// Runs in the host's namespaces, not `ip netns exec`'d into the run's:
    /// it makes namespaces of its own and needs the cgroup2 mount, which
    /// `ip netns exec` hides.
    pub(crate) on_host: bool,
}

impl Load {
    /// Connects to the closed port 9; `rate` 0 is unpaced.
    pub(crate) fn rst(rate: u32, secs: f64) -> Self {
        Self {
            args: vec![
                "rst".into(),
                "--rate".into(),
                rate.to_string(),
                "--seconds".into(),
                secs.to_string(),
            ],
            secs,
            on_host: false,
        }
    }

    /// Connections whose client closes before its server writes, unpaced:
    /// two resets each, the sent one on a socket that sent its FIN.
    pub(crate) fn data_after_close(secs: f64) -> Self {
        Self {
            args: vec![
                "data-after-close".into(),
                "--seconds".into(),
                secs.to_string(),
            ],
            secs,
            on_host: false,
        }
    }

    /// Whole connections for `secs`, or until `max` of them, unpaced.
    pub(crate) fn churn(secs: f64, max: Option<u64>) -> Self {
        Self::churn_paced(0, secs, max)
    }

    /// Whole connections at `rate` per second (0: unpaced).
    pub(crate) fn churn_paced(rate: u32, secs: f64, max: Option<u64>) -> Self {
        let mut args: Vec<String> = ["churn", "--sources", CHURN_SOURCES, "--seconds"]
            .map(String::from)
            .into();
        args.push(secs.to_string());
        args.extend(["--rate".into(), rate.to_string()]);
        if let Some(max) = max {
            args.extend(["--max".into(), max.to_string()]);
        }
        Self {
            args,
            secs,
            on_host: false,
        }
    }

    /// Up to `max` refused connects to SOAK_NETNS_PORT, each in a network
    /// namespace and a cgroup (in `cgroup_parent`) made for it and removed
    /// after it, all named `prefix-N`.
    pub(crate) fn namespaces(secs: f64, max: u64, cgroup_parent: &Path, prefix: &str) -> Self {
        Self {
            args: vec![
                "namespaces".into(),
                "--seconds".into(),
                secs.to_string(),
                "--max".into(),
                max.to_string(),
                "--cgroup-parent".into(),
                cgroup_parent.display().to_string(),
                "--prefix".into(),
                prefix.into(),
                "--target".into(),
                format!("127.0.0.1:{SOAK_NETNS_PORT}"),
            ],
            secs,
            on_host: true,
        }
    }
}

/// What the generator printed (see tcprst-loadgen's `Summary`).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub(crate) struct LoadResult {
    pub(crate) per_s: f64,
    pub(crate) completed: u64,
    pub(crate) errors: u64,
    pub(crate) elapsed_s: f64,
    pub(crate) distinct_connections: Option<u64>,
    pub(crate) first_error: Option<String>,
}

/// One tracer around one workload.
pub(crate) struct Sample {
    /// Names of other tracing programs loaded when the run started.
    pub(crate) foreign: Vec<String>,
    pub(crate) loads: Vec<LoadResult>,
    pub(crate) load_s: f64,
    /// Busy CPU seconds of the whole machine (every CPU) during the loads.
    pub(crate) system_busy_s: f64,
    pub(crate) tracer: Option<TracerNumbers>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct TracerNumbers {
    /// Lines of events written (tcprst: every kind but `lost`; bpftrace:
    /// every printf line).
    pub(crate) events: u64,
    /// RST lines only.
    pub(crate) rst_events: u64,
    pub(crate) lost: u64,
    /// tcprst's sent resets shown each on a line of its own, and those of
    /// them that name their socket's close.
    pub(crate) sent_shown: u64,
    pub(crate) sent_naming_a_close: u64,
    /// tcprst's own count of ring-buffer records read (its final log line).
    pub(crate) records_read: Option<u64>,
    /// tcprst's close notes lost unread (its final log line): closes a
    /// reset cannot name.
    pub(crate) notes_overwritten: Option<u64>,
    pub(crate) cpu_s: f64,
    /// Its threads' CPU time from the load's start until its output
    /// stopped growing, before it was stopped: tracing without the exit's
    /// work, to the ns.
    pub(crate) threads_s_settled: f64,
    pub(crate) cpu_pct: f64,
    pub(crate) vm_hwm_kib: u64,
    pub(crate) vm_rss_kib: u64,
    pub(crate) idle_rss_kib: u64,
    /// Kernel memory of its BPF maps.
    pub(crate) map_kib: u64,
    /// tcprst_tracked_connections: half-closed connections it follows.
    pub(crate) tracked_half_closed: Option<u64>,
    pub(crate) hooks: Vec<String>,
    pub(crate) progs: Vec<ProgStat>,
    pub(crate) warnings: Vec<String>,
}

/// Each tracer around the same load, in turn.
pub(crate) fn each_tracer(
    ctx: &Ctx,
    bench: &'static str,
    tracers: &[Tracer],
    rate: u32,
    rep: usize,
    load: impl Fn() -> Load,
) -> Result<Vec<Measurement>> {
    tracers
        .iter()
        .map(|tracer| {
            let sample = measure(ctx, tracer, &[load()])?;
            Ok(Measurement::new(bench, tracer, rate, rep, sample))
        })
        .collect()
}

/// The one way every number is taken: start the tracer in a fresh netns
/// and wait until it is attached, run the loads in that netns, let the
/// tracer catch up, then stop it and read what it saw and what it cost.
pub(crate) fn measure(ctx: &Ctx, tracer: &Tracer, loads: &[Load]) -> Result<Sample> {
    check_interrupted()?;
    let run = ctx.next_run(tracer.label());
    eprintln!(
        "bench: {run}: {}",
        loads
            .iter()
            .map(|l| l.args.join(" "))
            .collect::<Vec<_>>()
            .join(", then ")
    );
    let foreign = ctx.foreign_tracing_programs()?;
    // Declared first so it is deleted last, after every process in it.
    let ns = run_netns(&run)?;
    let running = match tracer.command(ctx, &ns, &ctx.path(&run, "out")) {
        Some(cmd) => Some(Running::start(ctx, &run, tracer, cmd)?),
        None => None,
    };
    let ticks = running.as_ref().map(Running::cpu_ticks).transpose()?;
    let threads = running
        .as_ref()
        .map(|r| thread_cpu_ns(r.proc.pid()))
        .transpose()?;
    let idle_before = system_idle_s()?;
    let start = Instant::now();
    let results = loads
        .iter()
        .enumerate()
        .map(|(i, load)| run_load(ctx, &ns, load, &ctx.path(&run, &format!("load{i}.json"))))
        .collect::<Result<Vec<_>>>()?;
    let system_busy_s = system_busy_s(start, idle_before)?;
    let load_s = start.elapsed().as_secs_f64();
    let tracer = match running {
        Some(running) => Some(running.finish(
            ticks.unwrap_or(0),
            &threads.unwrap_or_default(),
            load_s,
            ctx,
        )?),
        None => None,
    };
    Ok(Sample {
        foreign,
        loads: results,
        load_s,
        system_busy_s,
        tracer,
    })
}

pub(crate) fn run_load(
    ctx: &Ctx,
    ns: &ScratchNetns,
    load: &Load,
    out: &Path,
) -> Result<LoadResult> {
    let err = out.with_extension("err");
    let mut cmd = if load.on_host {
        Command::new(&ctx.loadgen)
    } else {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name]).arg(&ctx.loadgen);
        cmd
    };
    cmd.args(&load.args)
        .stdin(Stdio::null())
        .stdout(create(out)?)
        .stderr(create(&err)?);
    let mut proc = Proc::spawn(&mut cmd, "tcprst-loadgen")?;
    // It stops itself at --seconds; the grace covers the drain and exit.
    let status = proc.wait(Duration::from_secs_f64(load.secs) + Duration::from_secs(30))?;
    if !status.success() {
        check_interrupted()?;
        bail!(
            "tcprst-loadgen {} failed ({status}): {}",
            load.args.join(" "),
            last_line(&err)
        );
    }
    let text = fs::read_to_string(out).with_context(|| format!("reading {}", out.display()))?;
    serde_json::from_str(text.trim())
        .with_context(|| format!("tcprst-loadgen printed no summary: {}", text.trim()))
}

/// Whose output and logs to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Tcprst,
    Bpftrace,
}

impl Kind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Tcprst => "tcprst",
            Self::Bpftrace => "bpftrace",
        }
    }
}

/// A started tracer.
pub(crate) struct Running {
    pub(crate) proc: Proc,
    pub(crate) kind: Kind,
    pub(crate) out: PathBuf,
    pub(crate) err: PathBuf,
    /// VmRSS once attached, before any load: what the load adds is the rest.
    pub(crate) idle_rss_kib: u64,
    /// Where tcprst serves its metrics, when asked to.
    pub(crate) metrics_port: Option<u16>,
}

impl Running {
    pub(crate) fn start(ctx: &Ctx, run: &str, tracer: &Tracer, mut cmd: Command) -> Result<Self> {
        let (out, err) = (ctx.path(run, "out"), ctx.path(run, "err"));
        let err_file = create(&err)?;
        // bpftrace writes events itself (-o); tcprst writes them to stdout.
        let (kind, stdout) = match tracer {
            Tracer::Tcprst { .. } => (Kind::Tcprst, create(&out)?),
            _ => (Kind::Bpftrace, err_file.try_clone()?),
        };
        cmd.stdin(Stdio::null()).stdout(stdout).stderr(err_file);
        let proc = Proc::spawn(&mut cmd, tracer.label())?;
        let mut running = Self {
            proc,
            kind,
            out,
            err,
            idle_rss_kib: 0,
            metrics_port: tracer.metrics_port(),
        };
        running.wait_ready()?;
        running.idle_rss_kib = proc_memory(running.proc.pid())?.1;
        Ok(running)
    }

    /// tcprst logs once its programs are attached. bpftrace prints
    /// "Attaching N probes..." as it starts attaching, which for
    /// tracepoints takes milliseconds: a second more is plenty.
    pub(crate) fn wait_ready(&self) -> Result<()> {
        let (file, marker) = match self.kind {
            Kind::Tcprst => (&self.err, tcprst_line(stderr::TRACING)),
            Kind::Bpftrace => (&self.out, "Attaching ".to_owned()),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            check_interrupted()?;
            if fs::read_to_string(file).is_ok_and(|s| s.contains(&marker)) {
                break;
            }
            if self.proc.exited() {
                bail!(
                    "{} exited before tracing: {}",
                    self.kind.name(),
                    last_line(&self.err)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not start tracing within 60s: {}",
                    self.kind.name(),
                    last_line(&self.err)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        if self.kind == Kind::Bpftrace {
            thread::sleep(Duration::from_secs(1));
        }
        Ok(())
    }

    pub(crate) fn cpu_ticks(&self) -> Result<u64> {
        proc_cpu_ticks(self.proc.pid())
    }

    /// Waits until the tracer's output stops growing, so it has caught up
    /// with the load, reads its memory and programs, and stops it.
    pub(crate) fn finish(
        mut self,
        ticks_before: u64,
        threads_before: &BTreeMap<u32, u64>,
        load_s: f64,
        ctx: &Ctx,
    ) -> Result<TracerNumbers> {
        self.settle()?;
        let threads_ns = thread_cpu_ns_between(threads_before, &thread_cpu_ns(self.proc.pid())?);
        let (vm_hwm_kib, vm_rss_kib) = proc_memory(self.proc.pid())?;
        let progs = ctx.prog_stats(self.proc.pid())?;
        let map_kib = ctx.map_kib(self.proc.pid())?;
        let tracked_half_closed = self
            .metrics_port
            .map(|port| Scrape::get(port)?.value("tcprst_tracked_connections"))
            .transpose()?;
        let insisted = self.stop()?;
        let ticks = proc_cpu_ticks(self.proc.pid()).unwrap_or(ticks_before);
        let status = self.proc.wait(Duration::from_secs(5))?;
        if !status.success() && insisted.is_none() {
            check_interrupted()?;
            bail!(
                "{} failed ({status}): {}",
                self.kind.name(),
                last_line(&self.err)
            );
        }
        let cpu_s = (ticks - ticks_before) as f64 / clock_ticks_per_s();
        let counts = count_output(self.kind, &self.out, &self.err, |_| true)?;
        let stderr = fs::read_to_string(&self.err).unwrap_or_default();
        let stopped = stderr.lines().find_map(|l| l.split(stderr::STOPPED).nth(1));
        let records_read = stopped.and_then(|s| s.split(' ').next()?.parse().ok());
        let final_lost = stopped.and_then(|s| number_before(s, " lost,"));
        let notes_overwritten = stopped.and_then(|s| number_before(s, " close notes overwritten"));
        let hooks = stderr
            .lines()
            // "… half-closes (hook (tier), hook (tier)); Ctrl-C to stop"
            .find_map(|l| Some(l.split_once("half-closes (")?.1.rsplit_once("); ")?.0))
            .map(|h| h.split(", ").map(str::to_owned).collect())
            .unwrap_or_default();
        let warnings = stderr
            .lines()
            .filter(|l| l.contains("RLIMIT_MEMLOCK") || l.contains("WARNING"))
            .map(explain_warning)
            .chain(insisted)
            .collect();
        if !ctx.keep_output {
            let _ = fs::remove_file(&self.out);
        }
        Ok(TracerNumbers {
            events: counts.events,
            rst_events: counts.rsts,
            lost: counts.lost.max(final_lost.unwrap_or(0)),
            sent_shown: counts.sent_shown,
            sent_naming_a_close: counts.sent_naming_a_close,
            records_read,
            notes_overwritten,
            cpu_s,
            threads_s_settled: threads_ns as f64 / 1e9,
            cpu_pct: cpu_s * 100.0 / load_s,
            vm_hwm_kib,
            vm_rss_kib,
            idle_rss_kib: self.idle_rss_kib,
            map_kib,
            tracked_half_closed,
            hooks,
            progs,
            warnings,
        })
    }

    /// SIGINT, as Ctrl-C: both tracers drain what is buffered and exit, and
    /// the CPU they spend draining counts, so we wait for the zombie, whose
    /// /proc entry still has its CPU times. bpftrace 0.17 sometimes misses a
    /// SIGINT under load: ask again, then insist, and say so.
    pub(crate) fn stop(&mut self) -> Result<Option<String>> {
        let steps = [
            (libc::SIGINT, "SIGINT", 20),
            (libc::SIGINT, "a second SIGINT", 10),
            (libc::SIGTERM, "SIGTERM", 10),
            (libc::SIGKILL, "SIGKILL", 10),
        ];
        for (i, (signal, name, secs)) in steps.into_iter().enumerate() {
            self.proc.signal(signal);
            if self.proc.wait_zombie(Duration::from_secs(secs)) {
                return Ok(
                    (i > 0).then(|| format!("{} stopped only after {name}", self.kind.name()))
                );
            }
        }
        bail!("{} did not stop even after SIGKILL", self.kind.name())
    }

    pub(crate) fn settle(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = None;
        loop {
            thread::sleep(Duration::from_millis(500));
            check_interrupted()?;
            let size = fs::metadata(&self.out).map(|m| m.len()).ok();
            if size == last || Instant::now() > deadline {
                return Ok(());
            }
            last = size;
        }
    }
}

/// What a tracer's output holds, of the lines a count accepts.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct OutputCounts {
    /// Event lines (tcprst: every kind but `lost`).
    pub(crate) events: u64,
    /// Resets, an aggregate standing for its count.
    pub(crate) rsts: u64,
    pub(crate) lost: u64,
    /// tcprst's sent resets, each on a line of its own, and those of them
    /// that name who closed their socket (an `initiator`): the two differ
    /// by the resets that could not name a close, not by lines unwritten.
    pub(crate) sent_shown: u64,
    pub(crate) sent_naming_a_close: u64,
}

/// What a tracer's output holds, of the lines `counted` accepts.
pub(crate) fn count_output(
    kind: Kind,
    out: &Path,
    err: &Path,
    counted: impl Fn(&str) -> bool,
) -> Result<OutputCounts> {
    let mut n = OutputCounts::default();
    for path in [out, err] {
        let Ok(file) = File::open(path) else { continue };
        for line in BufReader::new(file).lines() {
            let line = line.with_context(|| format!("reading {}", path.display()))?;
            if !counted(&line) {
                continue;
            }
            match kind {
                Kind::Tcprst if path == out => {
                    if line.contains(r#""kind":"lost""#) {
                        n.lost = n.lost.max(json_number(&line, "lost_total").unwrap_or(0));
                    } else {
                        n.events += 1;
                        // An aggregate record stands for `count` resets.
                        if line.contains(r#""kind":"rst_"#) {
                            n.rsts += json_number(&line, "count").unwrap_or(1);
                        }
                        if line.contains(r#""kind":"rst_sent","#) {
                            n.sent_shown += 1;
                            n.sent_naming_a_close += u64::from(line.contains(r#""initiator":{"#));
                        }
                    }
                }
                Kind::Bpftrace => {
                    if line.starts_with(|c: char| c.is_ascii_digit()) {
                        n.events += 1;
                        n.rsts += u64::from(line.contains(" rst_"));
                    } else if let Some(lost) = line.strip_prefix("Lost ") {
                        n.lost += lost
                            .split(' ')
                            .next()
                            .and_then(|lost| lost.parse().ok())
                            .unwrap_or(0);
                    }
                }
                Kind::Tcprst => {}
            }
        }
    }
    Ok(n)
}

pub(crate) fn json_number(line: &str, key: &str) -> Option<u64> {
    let rest = line.split(&format!("\"{key}\":")).nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// In "…, 12 lost, 3 close notes overwritten unread, …", the number
/// before the first `phrase` (" lost,", " close notes overwritten"); None
/// where there is no such phrase.
pub(crate) fn number_before(s: &str, phrase: &str) -> Option<u64> {
    let (before, _) = s.split_once(phrase)?;
    before
        .rsplit([' ', ','])
        .find(|w| !w.is_empty())?
        .parse()
        .ok()
}

/// One scrape of tcprst's metrics on host loopback.
pub(crate) struct Scrape(String);

impl Scrape {
    pub(crate) fn get(port: u16) -> Result<Self> {
        use std::io::{Read as _, Write as _};
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port))
            .with_context(|| format!("connecting to tcprst's metrics on 127.0.0.1:{port}"))?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
        let mut body = String::new();
        conn.read_to_string(&mut body)
            .context("reading tcprst's metrics")?;
        Ok(Self(body))
    }

    /// An unlabelled metric.
    pub(crate) fn value(&self, name: &str) -> Result<u64> {
        self.0
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("tcprst's metrics have no {name}"))
    }

    /// Samples, one a series: what a leak of labels would grow.
    pub(crate) fn series(&self) -> u64 {
        self.0.lines().filter(|l| l.starts_with("tcprst_")).count() as u64
    }
}

/// bpftrace's memlock complaint, said plainly; other warnings as they are.
pub(crate) fn explain_warning(line: &str) -> String {
    if !line.contains("RLIMIT_MEMLOCK") {
        return line.to_owned();
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only `lim`, which lives across the call.
    unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    format!(
        "bpftrace could not raise RLIMIT_MEMLOCK past the hard limit ({} KiB; raising it needs CAP_SYS_RESOURCE) and said so, then ran normally: since Linux 5.11 BPF memory is charged to the memory cgroup, not to this limit",
        lim.rlim_max / 1024
    )
}

pub(crate) fn raise_memlock_soft_limit() -> std::io::Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes and setrlimit reads only `lim`, which lives
    // across both calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{env, process};

    use super::*;

    #[test]
    fn reads_tcprst_final_line_and_lost_records() {
        let stopped = "1200 records read, 600 events shown, 7 lost, 0 undecodable, 3 connections evicted from tracking";
        assert_eq!(number_before(stopped, " lost,"), Some(7));
        assert_eq!(number_before(stopped, " missing,"), None);
        let notes = "9 records read, 2 lost, 3 close notes overwritten unread, 12";
        assert_eq!(number_before(notes, " close notes overwritten"), Some(3));
        // An absent phrase is None, whatever number ends the line.
        assert_eq!(number_before(notes, " phantoms"), None);
        let lost = r#"{"time":"…","kind":"lost","lost":964,"lost_total":1964}"#;
        assert_eq!(json_number(lost, "lost_total"), Some(1964));
    }

    #[test]
    fn counts_each_tracers_output() {
        let dir = env::temp_dir().join(format!("xtask-bench-test-{}", process::id()));
        fs::create_dir_all(&dir).unwrap();
        let (out, err) = (dir.join("out"), dir.join("err"));
        fs::write(
            &out,
            concat!(
                r#"{"kind":"rst_sent","count":1,"initiator":{"op":"close"}}"#,
                "\n",
                r#"{"kind":"rst_sent","count":1,"initiator":null}"#,
                "\n",
                r#"{"kind":"rst_sent_aggregate","count":480,"x":1}"#,
                "\n",
                r#"{"kind":"halfclose_stuck"}"#,
                "\n",
                r#"{"kind":"lost","lost":5,"lost_total":5}"#,
                "\n",
                r#"{"kind":"lost","lost":2,"lost_total":7}"#,
                "\n",
            ),
        )
        .unwrap();
        fs::write(&err, "tcprst: stopped: …\n").unwrap();
        let counts = |events, rsts, lost, (sent_shown, sent_naming_a_close)| OutputCounts {
            events,
            rsts,
            lost,
            sent_shown,
            sent_naming_a_close,
        };
        assert_eq!(
            count_output(Kind::Tcprst, &out, &err, |_| true).unwrap(),
            counts(4, 482, 7, (2, 1))
        );
        let aggregates = |line: &str| line.contains("aggregate");
        assert_eq!(
            count_output(Kind::Tcprst, &out, &err, aggregates).unwrap(),
            counts(1, 480, 0, (0, 0))
        );
        fs::write(
            &out,
            "Attaching 2 probes...\n12 rst_sent pid=1\n13 state pid=1\nLost 4 events\n14 rst_received pid=1\n",
        )
        .unwrap();
        fs::write(&err, "Lost 1 events\n").unwrap();
        assert_eq!(
            count_output(Kind::Bpftrace, &out, &err, |_| true).unwrap(),
            counts(3, 2, 5, (0, 0))
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
