//! `tcprst trace`: the event loop from ring buffer to sink.

use std::io::{self, BufWriter};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
    time::{Duration, MissedTickBehavior, interval},
};

use crate::{
    clock::WallClock,
    decode::Decoder,
    filter::EventFilter,
    probes::{LostCounter, ProbeConfig, Probes},
    sink::{self, LossReport, OutputFormat, Sink},
};

/// Records handled per wake-up before signals and the loss report get a turn.
const DRAIN_BATCH: usize = 4096;

pub struct TraceOptions {
    pub probes: ProbeConfig,
    pub filter: EventFilter,
    pub output: OutputFormat,
}

#[derive(Default)]
struct Counts {
    shown: u64,
    undecodable: u64,
    lost_reported: u64,
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
    let mut decoder = Decoder::new(std::mem::take(&mut probes.reasons), WallClock::new());
    let stdout = BufWriter::with_capacity(64 * 1024, io::stdout());
    let mut sink = sink::open(opts.output, Box::new(stdout));
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut tick = interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut counts = Counts::default();

    log::info!(
        "tracing RSTs ({}); Ctrl-C to stop",
        probes.attached.join(", ")
    );

    let outcome: io::Result<()> = async {
        loop {
            tokio::select! {
                biased;
                _ = sigint.recv() => return Ok(()),
                _ = sigterm.recv() => return Ok(()),
                _ = tick.tick() => {
                    decoder.clock.refresh();
                    report_losses(&lost, &mut counts, sink.as_mut())?;
                }
                guard = ring.readable_mut() => {
                    let mut guard = guard?;
                    let drained = drain(guard.get_inner_mut(), &decoder, &opts.filter, sink.as_mut(), &mut counts)?;
                    if drained < DRAIN_BATCH {
                        guard.clear_ready();
                    }
                }
            }
        }
    }
    .await;

    let outcome = outcome.and_then(|()| {
        // What was already in the ring when we were told to stop.
        while drain(
            ring.get_mut(),
            &decoder,
            &opts.filter,
            sink.as_mut(),
            &mut counts,
        )? == DRAIN_BATCH
        {}
        report_losses(&lost, &mut counts, sink.as_mut())?;
        sink.flush()
    });
    match outcome {
        Ok(()) => {}
        // `tcprst trace | head`: the reader is gone, which is a normal end.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
        Err(e) => return Err(e).context("writing events"),
    }
    drop(probes);
    let lost_total = lost.total().unwrap_or(counts.lost_reported);
    log::info!(
        "stopped: {} events shown, {} lost, {} undecodable",
        counts.shown,
        lost_total,
        counts.undecodable
    );
    Ok(())
}

fn drain(
    ring: &mut RingBuf<MapData>,
    decoder: &Decoder,
    filter: &EventFilter,
    sink: &mut dyn Sink,
    counts: &mut Counts,
) -> io::Result<usize> {
    let mut n = 0;
    while n < DRAIN_BATCH {
        let Some(item) = ring.next() else { break };
        n += 1;
        match decoder.decode(&item) {
            Ok(ev) if filter.matches(&ev) => {
                sink.rst(&ev)?;
                counts.shown += 1;
            }
            Ok(_) => {}
            Err(e) => {
                if counts.undecodable == 0 {
                    log::warn!("undecodable record: {e}");
                }
                counts.undecodable += 1;
            }
        }
    }
    sink.flush()?;
    Ok(n)
}

fn report_losses(lost: &LostCounter, counts: &mut Counts, sink: &mut dyn Sink) -> io::Result<()> {
    let total = match lost.total() {
        Ok(total) => total,
        Err(e) => {
            log::warn!("reading the lost-record counter: {e}");
            return Ok(());
        }
    };
    if total > counts.lost_reported {
        let report = LossReport {
            lost: total - counts.lost_reported,
            lost_total: total,
        };
        log::warn!(
            "{} events lost since the last report ({} in total): the ring buffer was full; raise --buffer-pages",
            report.lost,
            report.lost_total
        );
        counts.lost_reported = total;
        sink.lost(&report)?;
        sink.flush()?;
    }
    Ok(())
}
