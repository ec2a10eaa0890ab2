//! Stdout on a thread of its own, behind a bounded queue of whole lines: a
//! reader that stops reading (`tcprst trace | (sleep 60)`) cannot stall the
//! event loop, so signals, /metrics and the ring buffer keep being served.
//! Lines that do not fit in the queue are dropped whole and counted, never
//! written in part.

use std::{
    io::{self, Write},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    thread,
    time::{Duration, Instant},
};

/// Chunks the queue holds; with `CHUNK` that bounds it to a few MiB.
const QUEUED_CHUNKS: usize = 64;
/// Pending bytes that make a chunk before a flush asks for one.
const CHUNK: usize = 64 * 1024;

/// What the writer thread and the queue share.
#[derive(Default)]
struct Progress {
    /// Lines given to the queue and not yet written out.
    queued_lines: AtomicU64,
    /// Lines dropped because the queue was full.
    dropped_lines: AtomicU64,
    /// The reader went away (EPIPE): tracing should end.
    closed: AtomicBool,
}

/// The `Write` end the sinks write into.
pub struct QueuedWriter {
    pending: Vec<u8>,
    queue: SyncSender<Vec<u8>>,
    progress: Arc<Progress>,
}

/// Reads what became of the lines after the sinks are gone.
#[derive(Clone)]
pub struct WriterReport(Arc<Progress>);

impl WriterReport {
    /// Lines dropped because the reader fell behind.
    pub fn dropped(&self) -> u64 {
        self.0.dropped_lines.load(Ordering::Relaxed)
    }

    /// Waits up to `limit` for the queue to be written out, and returns the
    /// lines that never were: dropped, or still queued behind a reader that
    /// stopped reading.
    pub fn unwritten_after(&self, limit: Duration) -> u64 {
        let deadline = Instant::now() + limit;
        while self.0.queued_lines.load(Ordering::Relaxed) > 0
            && !self.0.closed.load(Ordering::Relaxed)
            && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(5));
        }
        self.dropped() + self.0.queued_lines.load(Ordering::Relaxed)
    }
}

/// Starts the thread that writes to `out`.
pub fn spawn(out: impl Write + Send + 'static) -> io::Result<(QueuedWriter, WriterReport)> {
    let (queue, chunks) = sync_channel(QUEUED_CHUNKS);
    let progress = Arc::new(Progress::default());
    let shared = progress.clone();
    thread::Builder::new()
        .name("tcprst-stdout".into())
        .spawn(move || write_out(out, chunks, &shared))?;
    Ok((
        QueuedWriter {
            pending: Vec::with_capacity(CHUNK),
            queue,
            progress: progress.clone(),
        },
        WriterReport(progress),
    ))
}

fn write_out(mut out: impl Write, chunks: Receiver<Vec<u8>>, progress: &Progress) {
    for chunk in chunks {
        if let Err(e) = out.write_all(&chunk).and_then(|()| out.flush()) {
            if e.kind() != io::ErrorKind::BrokenPipe {
                log::warn!("writing events: {e}");
            }
            progress.closed.store(true, Ordering::Relaxed);
            return;
        }
        progress
            .queued_lines
            .fetch_sub(lines(&chunk), Ordering::Relaxed);
    }
}

fn lines(bytes: &[u8]) -> u64 {
    bytes.iter().filter(|&&b| b == b'\n').count() as u64
}

impl QueuedWriter {
    /// Queues every complete line pending, or drops them if the queue is
    /// full; a partial line waits for its end.
    fn send_lines(&mut self) -> io::Result<()> {
        if self.progress.closed.load(Ordering::Relaxed) {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let Some(end) = self.pending.iter().rposition(|&b| b == b'\n') else {
            return Ok(());
        };
        let rest = self.pending.split_off(end + 1);
        let chunk = std::mem::replace(&mut self.pending, rest);
        let n = lines(&chunk);
        self.progress.queued_lines.fetch_add(n, Ordering::Relaxed);
        match self.queue.try_send(chunk) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                self.progress.queued_lines.fetch_sub(n, Ordering::Relaxed);
                self.progress.dropped_lines.fetch_add(n, Ordering::Relaxed);
                Ok(())
            }
            Err(TrySendError::Disconnected(_)) => Err(io::ErrorKind::BrokenPipe.into()),
        }
    }
}

impl Write for QueuedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(buf);
        if self.pending.len() >= CHUNK {
            self.send_lines()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_lines()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Condvar, Mutex};

    use super::*;
    use crate::output::testing::Shared;

    #[test]
    fn lines_reach_the_output_whole_and_in_order() {
        let out = Shared::default();
        let (mut writer, report) = spawn(out.clone()).unwrap();
        write!(writer, "one\ntw").unwrap();
        writer.flush().unwrap();
        writeln!(writer, "o").unwrap();
        writer.flush().unwrap();
        assert_eq!(report.unwritten_after(Duration::from_secs(5)), 0);
        assert_eq!(out.text(), "one\ntwo\n");
    }

    /// An output whose writes block until the test opens the gate.
    #[derive(Clone, Default)]
    struct Gate(Arc<(Mutex<bool>, Condvar)>);

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (open, cvar) = &*self.0;
            let _open = cvar
                .wait_while(open.lock().unwrap(), |open| !*open)
                .unwrap();
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_blocked_reader_costs_whole_lines_counted_not_a_stall() {
        let gate = Gate::default();
        let (mut writer, report) = spawn(gate.clone()).unwrap();
        // Far more flushed chunks than the queue holds, none of them waits.
        for i in 0..(QUEUED_CHUNKS * 4) {
            writeln!(writer, "line {i}").unwrap();
            writer.flush().unwrap();
        }
        let dropped = report.dropped();
        // The thread holds one chunk and the queue the next QUEUED_CHUNKS.
        let kept = (QUEUED_CHUNKS * 4) as u64 - dropped;
        assert!(
            (QUEUED_CHUNKS as u64..=QUEUED_CHUNKS as u64 + 1).contains(&kept),
            "{dropped} dropped"
        );
        assert_eq!(
            report.unwritten_after(Duration::from_millis(50)),
            (QUEUED_CHUNKS * 4) as u64,
            "nothing was written yet"
        );
        *gate.0.0.lock().unwrap() = true;
        gate.0.1.notify_all();
        assert_eq!(report.unwritten_after(Duration::from_secs(5)), dropped);
    }

    #[test]
    fn a_closed_reader_ends_the_writes() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let (mut writer, _report) = spawn(Closed).unwrap();
        writeln!(writer, "to nobody").unwrap();
        writer.flush().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            writeln!(writer, "again").unwrap();
            match writer.flush() {
                Err(e) => break assert_eq!(e.kind(), io::ErrorKind::BrokenPipe),
                Ok(()) => assert!(Instant::now() < deadline, "never told"),
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}
