//! Bounded TCP load on loopback for `cargo xtask bench`, and single resets
//! for `cargo xtask vm-test`.
//!
//! `rst` makes nonblocking connects to a closed port, each answered by a
//! reset; `churn` runs whole connections (connect, send, shutdown, close)
//! against its own server; `data-after-close` runs connections whose server
//! writes after the client's close(), which the client's kernel resets. All
//! three stop by themselves after `--seconds` or a count, refuse any address
//! that is not loopback, and print one JSON line with what they achieved.
//! Run them inside a network namespace
//! (`ip netns exec NS tcprst-loadgen …`): the bench does. `namespaces` runs
//! on the host and makes a namespace and a cgroup for each refused connect,
//! for the soak. `scenario` makes one reset of a named kind on loopback and
//! prints the connection it used; the kinds, and what tcprst must record of
//! each, are the library's table (`tcprst_loadgen::scenario`).

mod churn;
mod data_after_close;
mod namespaces;
mod pace;
mod storm;

use std::{
    net::{IpAddr, SocketAddr},
    process::ExitCode,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use tcprst_loadgen::scenario::{SCENARIOS, Scenario};

/// Upper bound on `--seconds`, so a typo cannot start an hour of load.
const MAX_SECONDS: f64 = 600.0;

#[derive(Parser)]
#[command(
    name = "tcprst-loadgen",
    about = "Bounded loopback TCP load for cargo xtask bench, and single resets for cargo xtask vm-test"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Nonblocking connects to a closed port: one reset sent and one received each.
    Rst(RstArgs),
    /// Whole connections against our own server: connect, send, shutdown(SHUT_WR), read EOF, close.
    Churn(ChurnArgs),
    /// Connections whose client closes and whose server then writes: one reset sent (data after
    /// close) and one received each.
    DataAfterClose(DataAfterCloseArgs),
    /// Connects to a closed port, each in a network namespace and a cgroup made for it and
    /// removed after it. Runs on the host, as root.
    Namespaces(namespaces::NamespacesArgs),
    /// One reset of a known kind on loopback; fails unless the socket saw the error it causes.
    Scenario(ScenarioArgs),
}

#[derive(Args)]
struct ScenarioArgs {
    /// Which reset to make, at its own loopback address (nothing else may listen there)
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(SCENARIOS.iter().map(|s| s.name)))]
    name: String,
}

#[derive(Args)]
struct Common {
    /// Stop issuing after this many seconds
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Worker threads [default: one per CPU]
    #[arg(long)]
    threads: Option<usize>,
    /// Stop after this many connections in total
    #[arg(long, default_value_t = 10_000_000)]
    max: u64,
    /// Connections per second across all threads; 0 means as fast as possible
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
}

#[derive(Args)]
pub(crate) struct RstArgs {
    #[command(flatten)]
    common: Common,
    /// A loopback address and port nothing listens on
    #[arg(long, default_value = "127.0.0.1:9")]
    target: SocketAddr,
}

#[derive(Args)]
pub(crate) struct ChurnArgs {
    #[command(flatten)]
    common: Common,
    /// Loopback address and port for our server
    #[arg(long, default_value = "127.0.0.1:8080")]
    server: SocketAddr,
    /// Clients bind to this many source addresses in 127.1.0.0/16, in turn, so
    /// that many more distinct connections exist than one address has ports
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=65000))]
    sources: u16,
    /// Bytes each client sends before shutdown(SHUT_WR)
    #[arg(long, default_value_t = 64)]
    bytes: usize,
}

#[derive(Args)]
pub(crate) struct DataAfterCloseArgs {
    #[command(flatten)]
    common: Common,
    /// Loopback address each worker's server listens on, at a port of its own
    #[arg(long, default_value = "127.0.0.1")]
    address: IpAddr,
}

/// What one run achieved; the bench parses this line.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Summary {
    pub(crate) mode: &'static str,
    pub(crate) threads: usize,
    /// Connections per second asked for; 0 when unpaced.
    pub(crate) target_rate: f64,
    pub(crate) elapsed_s: f64,
    pub(crate) attempts: u64,
    /// Connects refused by a reset (rst, namespaces), or whole connections (churn).
    pub(crate) completed: u64,
    pub(crate) errors: u64,
    /// Still in flight when the drain time ran out.
    pub(crate) unfinished: u64,
    pub(crate) per_s: f64,
    /// churn: distinct client (address, port) pairs, i.e. distinct connections.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) distinct_connections: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) first_error: Option<String>,
}

/// One worker's counts, summed into the `Summary`.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub(crate) attempts: u64,
    pub(crate) completed: u64,
    pub(crate) errors: u64,
    pub(crate) unfinished: u64,
    pub(crate) first_error: Option<String>,
}

impl Tally {
    pub(crate) fn error(&mut self, what: &str, e: &dyn std::fmt::Display) {
        self.errors += 1;
        self.first_error
            .get_or_insert_with(|| format!("{what}: {e}"));
    }

    fn add(&mut self, other: Tally) {
        self.attempts += other.attempts;
        self.completed += other.completed;
        self.errors += other.errors;
        self.unfinished += other.unfinished;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// The limits every worker obeys.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bounds {
    pub(crate) deadline: Instant,
    /// This worker's share of `--max`.
    pub(crate) max: u64,
    /// This worker's share of `--rate`; None when unpaced.
    pub(crate) per_sec: Option<f64>,
}

fn main() -> ExitCode {
    match Cli::parse().mode {
        Mode::Rst(args) => report(rst(&args)),
        Mode::Churn(args) => report(ensure_loopback(args.server).and_then(|()| churn::run(&args))),
        Mode::DataAfterClose(args) => report(
            ensure_loopback(SocketAddr::new(args.address, 0))
                .and_then(|()| data_after_close::run(&args)),
        ),
        Mode::Namespaces(args) => report(namespaces::run(&args)),
        Mode::Scenario(args) => match Scenario::named(&args.name)
            .expect("clap admits only the table's names")
            .make()
        {
            Ok(outcome) => {
                println!("{}", serde_json::to_string(&outcome).expect("plain data"));
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
    }
}

/// Prints a load run's summary; a run in which nothing completed failed.
fn report(run: Result<Summary>) -> ExitCode {
    match run {
        Ok(summary) => {
            println!("{}", serde_json::to_string(&summary).expect("plain data"));
            if summary.completed == 0 {
                eprintln!(
                    "tcprst-loadgen: nothing completed: {}",
                    summary.first_error.as_deref().unwrap_or("no error seen")
                );
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

fn fail(e: &anyhow::Error) -> ExitCode {
    eprintln!("tcprst-loadgen: {e:#}");
    ExitCode::FAILURE
}

fn rst(args: &RstArgs) -> Result<Summary> {
    ensure_loopback(args.target)?;
    let threads = threads(&args.common);
    let mut summary = spawn_workers(&args.common, threads, |bounds| {
        let tally = storm::worker(args.target, bounds);
        (tally, None)
    })?;
    summary.mode = "rst";
    Ok(summary)
}

fn threads(common: &Common) -> usize {
    common
        .threads
        .unwrap_or_else(|| thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1)
}

fn bounds(common: &Common, threads: usize) -> Result<Bounds> {
    if !(common.seconds > 0.0 && common.seconds <= MAX_SECONDS) {
        bail!("--seconds must be between 0 and {MAX_SECONDS}");
    }
    if !(common.rate >= 0.0 && common.rate.is_finite()) {
        bail!("--rate must be 0 (unpaced) or a positive number");
    }
    Ok(Bounds {
        deadline: Instant::now() + Duration::from_secs_f64(common.seconds),
        max: common.max.div_ceil(threads as u64),
        per_sec: (common.rate > 0.0).then(|| common.rate / threads as f64),
    })
}

/// Runs `work` on `threads` threads under the same bounds and sums what they
/// did. Each worker may also return the distinct connections it made.
fn spawn_workers<F>(common: &Common, threads: usize, work: F) -> Result<Summary>
where
    F: Fn(Bounds) -> (Tally, Option<Vec<u64>>) + Sync,
{
    let bounds = bounds(common, threads)?;
    let start = Instant::now();
    let results: Vec<_> = thread::scope(|s| {
        let handles: Vec<_> = (0..threads).map(|_| s.spawn(|| work(bounds))).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("worker panicked"))
            .collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let mut total = Tally::default();
    let mut distinct: Option<std::collections::HashSet<u64>> = None;
    for (tally, seen) in results {
        total.add(tally);
        if let Some(seen) = seen {
            distinct.get_or_insert_default().extend(seen);
        }
    }
    Ok(Summary {
        threads,
        elapsed_s: elapsed,
        attempts: total.attempts,
        completed: total.completed,
        errors: total.errors,
        unfinished: total.unfinished,
        per_s: total.completed as f64 / elapsed,
        distinct_connections: distinct.map(|d| d.len() as u64),
        first_error: total.first_error,
        target_rate: common.rate,
        ..Summary::default()
    })
}

/// Load must never leave the machine, whatever the caller passes.
fn ensure_loopback(addr: SocketAddr) -> Result<()> {
    if !addr.ip().is_loopback() {
        bail!("{addr} is not a loopback address; this generator only loads loopback");
    }
    Ok(())
}

/// Sleeps of a few microseconds must not round up to the default 50 µs
/// timer slack, or pacing undershoots at high rates.
pub(crate) fn tight_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes an integer and touches no memory.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
}
