//! `tcprst trace`: the event loop from ring buffer through the connection
//! tracker to the sink.

use std::{
    io::{self, BufWriter},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
    time::{MissedTickBehavior, interval},
};

use crate::{
    clock::WallClock,
    decode::{Decoder, Record},
    diagnosis, enrich,
    filter::EventFilter,
    probes::{LostCounter, ProbeConfig, Probes},
    sink::{self, LossReport, OutputFormat, ResolvedReport, RstReport, Sink, StuckReport},
    tracker::Tracker,
};

/// Records handled per wake-up before signals and the loss report get a turn.
const DRAIN_BATCH: usize = 4096;

pub struct TraceOptions {
    pub probes: ProbeConfig,
    pub filter: EventFilter,
    pub output: OutputFormat,
    pub stuck_after: Duration,
    pub stuck_repeat: Duration,
    pub max_connections: usize,
}

#[derive(Default)]
struct Counts {
    read: u64,
    shown: u64,
    undecodable: u64,
    lost_reported: u64,
}

/// Everything a record passes through after the ring buffer.
struct Pipeline<'a> {
    decoder: Decoder,
    tracker: Tracker,
    filter: &'a EventFilter,
    sink: Box<dyn Sink>,
    counts: Counts,
}

impl Pipeline<'_> {
    fn record(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.counts.read += 1;
        match self.decoder.decode(bytes) {
            Ok(Record::State(change)) => {
                if let Some(resolved) = self.tracker.on_state(&change)
                    && self.filter.wants_halfclose(&resolved.conn.key)
                {
                    let diagnosis = diagnosis::resolved(&resolved);
                    self.sink.resolved(&ResolvedReport {
                        resolved,
                        diagnosis,
                    })?;
                    self.counts.shown += 1;
                }
            }
            Ok(Record::Rst(ev)) if self.filter.matches(&ev) => {
                let ctx = self.tracker.context_of(&ev);
                let diagnosis = diagnosis::rst(&ev, &ctx);
                self.sink.rst(&RstReport {
                    ev,
                    conn: ctx.conn,
                    diagnosis,
                })?;
                self.counts.shown += 1;
            }
            Ok(Record::Rst(_)) => {}
            Err(e) => {
                if self.counts.undecodable == 0 {
                    log::warn!("undecodable record: {e}");
                }
                self.counts.undecodable += 1;
            }
        }
        Ok(())
    }

    fn drain(&mut self, ring: &mut RingBuf<MapData>) -> io::Result<usize> {
        let mut n = 0;
        while n < DRAIN_BATCH {
            let Some(item) = ring.next() else { break };
            n += 1;
            self.record(&item)?;
        }
        self.sink.flush()?;
        Ok(n)
    }

    fn report_stuck(&mut self, opts: &TraceOptions) -> io::Result<()> {
        let now = SystemTime::now();
        for conn in self.tracker.stuck(now, opts.stuck_after, opts.stuck_repeat) {
            if !self.filter.wants_halfclose(&conn.key) {
                continue;
            }
            let owner = enrich::socket_owner(&conn.key, conn.state);
            let label = owner.as_ref().map(sink::task_label);
            let fin_timeout = enrich::fin_timeout(conn.key.netns);
            let diagnosis = diagnosis::stuck(&conn, now, label.as_deref(), fin_timeout);
            self.sink.stuck(&StuckReport {
                time: now,
                conn,
                owner,
                diagnosis,
            })?;
            self.counts.shown += 1;
        }
        self.sink.flush()
    }

    fn report_losses(&mut self, lost: &LostCounter) -> io::Result<()> {
        let total = match lost.total() {
            Ok(total) => total,
            Err(e) => {
                log::warn!("reading the lost-record counter: {e}");
                return Ok(());
            }
        };
        if total > self.counts.lost_reported {
            let report = LossReport {
                lost: total - self.counts.lost_reported,
                lost_total: total,
            };
            log::warn!(
                "{} events lost since the last report ({} in total): the ring buffer was full; raise --buffer-pages",
                report.lost,
                report.lost_total
            );
            self.counts.lost_reported = total;
            self.sink.lost(&report)?;
            self.sink.flush()?;
        }
        Ok(())
    }
}

/// Loads and attaches; errors here mean tracing never started.
pub fn start(opts: &TraceOptions) -> Result<Probes> {
    Probes::load(&opts.probes)
}

pub async fn run(mut probes: Probes, opts: TraceOptions) -> Result<()> {
    let ring = probes.take_ring()?;
    let lost = probes.take_lost_counter()?;
    // SAFETY: the ring buffer's fd stays open for as long as the AsyncFd owns it.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(io::Error::from)
        .context("polling the ring buffer")?;
    let stdout = BufWriter::with_capacity(64 * 1024, io::stdout());
    let mut pipeline = Pipeline {
        decoder: Decoder::new(std::mem::take(&mut probes.reasons), WallClock::new()),
        tracker: Tracker::new(opts.max_connections),
        filter: &opts.filter,
        sink: sink::open(opts.output, Box::new(stdout)),
        counts: Counts::default(),
    };
    seed_existing(&mut pipeline.tracker, &opts);
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut tick = interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);

    log::info!(
        "tracing RSTs and half-closes ({}); Ctrl-C to stop",
        probes.attached.join(", ")
    );

    let outcome: io::Result<()> = async {
        loop {
            tokio::select! {
                biased;
                _ = sigint.recv() => return Ok(()),
                _ = sigterm.recv() => return Ok(()),
                _ = tick.tick() => {
                    pipeline.decoder.clock.refresh();
                    pipeline.report_losses(&lost)?;
                    pipeline.report_stuck(&opts)?;
                }
                guard = ring.readable_mut() => {
                    let mut guard = guard?;
                    if pipeline.drain(guard.get_inner_mut())? < DRAIN_BATCH {
                        guard.clear_ready();
                    }
                }
            }
        }
    }
    .await;

    let outcome = outcome.and_then(|()| {
        // What was already in the ring when we were told to stop.
        while pipeline.drain(ring.get_mut())? == DRAIN_BATCH {}
        pipeline.report_losses(&lost)?;
        pipeline.sink.flush()
    });
    match outcome {
        Ok(()) => {}
        // `tcprst trace | head`: the reader is gone, which is a normal end.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
        Err(e) => return Err(e).context("writing events"),
    }
    drop(probes);
    let counts = &pipeline.counts;
    log::info!(
        "stopped: {} records read, {} events shown, {} lost, {} undecodable, {} connections evicted from tracking",
        counts.read,
        counts.shown,
        lost.total().unwrap_or(counts.lost_reported),
        counts.undecodable,
        pipeline.tracker.evicted
    );
    Ok(())
}

/// Half-closed connections that predate tracing are tracked from now on,
/// their ages reported as lower bounds.
fn seed_existing(tracker: &mut Tracker, opts: &TraceOptions) {
    let only = (opts.probes.filter.netns != 0).then_some(opts.probes.filter.netns);
    let port = opts.probes.filter.port;
    match enrich::existing_half_closed(only) {
        Ok(found) => {
            let now = SystemTime::now();
            for f in found {
                let s = &f.socket;
                if port != 0 && s.local.port() != port && s.remote.port() != port {
                    continue;
                }
                tracker.seed(f.key(), s.state, s.inode == 0, now);
            }
        }
        Err(e) => log::warn!("could not list existing half-closed connections: {e:#}"),
    }
}
