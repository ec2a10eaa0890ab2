//! Stdout on a thread of its own, behind a queue of whole lines bounded in
//! bytes: a reader that stops reading (`tcprst trace | (sleep 60)`) cannot
//! stall the event loop, so signals, /metrics and the ring buffer keep being
//! served. Lines that do not fit in the queue are dropped whole and counted,
//! never written in part; nor is the last one when tcprst exits with its
//! reader behind (see `whole_lines`). Once the lines left are counted the
//! thread writes no more, so a slow reader cannot get lines counted as lost.
//! A regular file has no reader to fall behind: it takes each queued chunk
//! in one write (see `Pieces`), and lines for it wait a moment for room in
//! a full queue rather than being dropped (see `QueuedWriter::room_for`).

use std::{
    fs::File,
    io::{self, Write},
    os::fd::AsFd,
    sync::{
        Arc, Condvar, Mutex, MutexGuard, PoisonError, TryLockError,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc::{Receiver, Sender, channel},
    },
    thread,
    time::{Duration, Instant},
};

use super::LineOutput;

/// The bytes the queue may hold, counting the chunk being written: a
/// reader this far behind loses lines, counted, and never holds more
/// memory than this.
const QUEUED_BYTES: usize = 4 << 20;
/// The bytes lines gather in before a chunk is queued for a regular file.
/// Large, because a file takes a chunk in one write, and ext4 gives a
/// larger write larger page-cache folios: with 1 MiB writes instead of 64
/// KiB, a storm's output took 7 times fewer folios, and the thread's CPU
/// per line fell from about 500 ns to 220–480 (docs/performance.md,
/// "Output chunks of 1 MiB").
const FILE_CHUNK: usize = 1 << 20;
/// The same for a pipe, a socket or a terminal, which take pieces of
/// `PIPE_BUF` whatever the chunk: a larger one would only hold lines back
/// from a reader that keeps up (a burst of a startup's records, read
/// through a pipe, then overflowed the queue).
const PIPE_CHUNK: usize = 64 * 1024;
/// How long the final count waits for a piece being written to land: a
/// reader that is still reading takes a piece in far less; one that
/// stopped never takes it.
const PIECE_GRACE: Duration = Duration::from_millis(100);
/// How long lines for a regular file wait for room in a full queue. A
/// file takes a chunk in the time of a copy (about a millisecond), so a
/// wait this long means the disk itself stalled: the lines are dropped,
/// counted, and none waits again until a chunk is written.
const ROOM_WAIT: Duration = Duration::from_millis(50);

/// What the writer thread and the queue share.
#[derive(Default)]
struct Progress {
    /// Lines given to the queue and not yet written out.
    queued_lines: AtomicU64,
    /// Their buffers' bytes (`Vec::capacity`), bounded by `QUEUED_BYTES`.
    queued_bytes: AtomicUsize,
    /// Lines dropped because the queue was full.
    dropped_lines: AtomicU64,
    /// The reader went away (EPIPE): tracing should end.
    closed: AtomicBool,
    /// The lines left were counted: the thread starts no piece after.
    stopped: AtomicBool,
    /// Held by the thread from writing a piece to counting it written, so
    /// that the final count never falls between the two.
    piece: Mutex<()>,
    /// Chunks written, under the lock lines waiting for room sleep on.
    chunks_written: Mutex<u64>,
    /// Signalled as each chunk is written.
    room: Condvar,
}

impl Progress {
    /// The thread's hold on the output, for one piece.
    fn lock_piece(&self) -> MutexGuard<'_, ()> {
        self.piece.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_chunks_written(&self) -> MutexGuard<'_, u64> {
        self.chunks_written
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The piece lock, once the piece being written landed; `None` if it
    /// is still blocked on the reader after `grace`.
    fn piece_landed(&self, grace: Duration) -> Option<MutexGuard<'_, ()>> {
        let deadline = Instant::now() + grace;
        loop {
            match self.piece.try_lock() {
                Ok(held) => return Some(held),
                Err(TryLockError::Poisoned(held)) => return Some(held.into_inner()),
                Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(1))
                }
                Err(TryLockError::WouldBlock) => return None,
            }
        }
    }
}

/// How the thread cuts a chunk into writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pieces {
    /// Whole lines of at most `PIPE_BUF` bytes a write: a pipe, a socket
    /// or a terminal, whose reader may stop with a write half taken.
    PipeSized,
    /// The whole chunk in one write: a regular file, which takes it all
    /// (or fails). Cut to 4 KiB, each write of a storm's lines to a file
    /// zeroed the rest of a new page cache page and counted its lines
    /// again (docs/performance.md, "Results at 5eb2232").
    WholeChunks,
}

impl Pieces {
    /// How many bytes of lines make a chunk for these pieces.
    fn chunk(self) -> usize {
        match self {
            Self::PipeSized => PIPE_CHUNK,
            Self::WholeChunks => FILE_CHUNK,
        }
    }

    /// Room left in a chunk's buffer for the line that fills it, which is
    /// built in place (`LineOutput`): a longer line makes the buffer grow.
    fn line_room(self) -> usize {
        self.chunk() / 16
    }

    /// A flush with fewer bytes than this copies them out, so that the
    /// queue holds what they take, and the chunk's buffer is kept: a lone
    /// reset queued in a chunk's buffer would count as a whole chunk.
    fn copied_below(self) -> usize {
        self.chunk() / 8
    }

    /// The pieces `out` needs: whole chunks only if it is a regular file.
    pub fn for_output(out: &impl AsFd) -> Self {
        let is_file = out
            .as_fd()
            .try_clone_to_owned()
            .map(File::from)
            .and_then(|file| file.metadata())
            .is_ok_and(|meta| meta.file_type().is_file());
        if is_file {
            Self::WholeChunks
        } else {
            Self::PipeSized
        }
    }
}

/// Complete lines queued for the thread, and how many.
struct Chunk {
    bytes: Vec<u8>,
    lines: u64,
}

/// The `Write` end the sinks write into.
pub struct QueuedWriter {
    pending: Vec<u8>,
    /// How many lines `pending` holds while each came whole from
    /// `line_buffer`, so that a chunk of them needs no count (a count over
    /// every byte was 2.5 % of a storm's event loop); None once `write`
    /// added bytes, which may end mid-line.
    whole_lines: Option<u64>,
    pieces: Pieces,
    queue: Sender<Chunk>,
    progress: Arc<Progress>,
    /// The chunks written when lines last waited for room in vain.
    stalled_at: Option<u64>,
}

/// Reads what became of the lines after the sinks are gone.
#[derive(Clone)]
pub struct WriterReport(Arc<Progress>);

impl WriterReport {
    /// Lines dropped because the reader fell behind.
    pub fn dropped(&self) -> u64 {
        self.0.dropped_lines.load(Ordering::Relaxed)
    }

    /// Waits up to `limit` for the queue to be written out, stops the
    /// writes, and returns the lines that never were: dropped, or still
    /// queued behind a reader that fell behind or stopped reading.
    pub fn unwritten_after(&self, limit: Duration) -> u64 {
        let deadline = Instant::now() + limit;
        while self.0.queued_lines.load(Ordering::Relaxed) > 0
            && !self.0.closed.load(Ordering::Relaxed)
            && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(5));
        }
        self.0.stopped.store(true, Ordering::Relaxed);
        // A reader still reading takes the piece being written, which is
        // then counted written. Only a piece blocked on a reader that
        // stopped is counted unwritten without the lock: should that
        // reader resume in the moment before tcprst exits, it gets lines
        // counted as unwritten.
        let _landed = self.0.piece_landed(PIECE_GRACE);
        self.dropped() + self.0.queued_lines.load(Ordering::Relaxed)
    }
}

/// Starts the thread that writes to `out`, cut into `pieces`.
pub fn spawn(
    out: impl Write + Send + 'static,
    pieces: Pieces,
) -> io::Result<(QueuedWriter, WriterReport)> {
    let (queue, chunks) = channel();
    let progress = Arc::new(Progress::default());
    let shared = progress.clone();
    thread::Builder::new()
        .name("tcprst-stdout".into())
        .spawn(move || write_out(out, pieces, chunks, &shared))?;
    Ok((
        QueuedWriter {
            pending: Vec::with_capacity(pieces.chunk()),
            whole_lines: Some(0),
            pieces,
            queue,
            progress: progress.clone(),
            stalled_at: None,
        },
        WriterReport(progress),
    ))
}

fn write_out(mut out: impl Write, pieces: Pieces, chunks: Receiver<Chunk>, progress: &Progress) {
    let mut write = |piece: &[u8], lines: u64| {
        let _writing = progress.lock_piece();
        if progress.stopped.load(Ordering::Relaxed) {
            return false;
        }
        if let Err(e) = out.write_all(piece).and_then(|()| out.flush()) {
            if e.kind() != io::ErrorKind::BrokenPipe {
                log::warn!("writing events: {e}");
            }
            progress.closed.store(true, Ordering::Relaxed);
            return false;
        }
        progress.queued_lines.fetch_sub(lines, Ordering::Relaxed);
        true
    };
    for chunk in chunks {
        let written = match pieces {
            Pieces::WholeChunks => write(&chunk.bytes, chunk.lines),
            Pieces::PipeSized => whole_lines(&chunk.bytes).all(|piece| write(piece, lines(piece))),
        };
        if !written {
            return;
        }
        progress
            .queued_bytes
            .fetch_sub(chunk.bytes.capacity(), Ordering::Relaxed);
        *progress.lock_chunks_written() += 1;
        progress.room.notify_one();
    }
}

/// A pipe takes a write of at most this many bytes whole or not at all
/// (pipe(7)); a larger one is cut wherever the pipe fills.
const PIPE_BUF: usize = libc::PIPE_BUF;

/// `chunk`, whole lines, in pieces of at most `PIPE_BUF` bytes; a line
/// longer than that is a piece of its own. tcprst exits while this thread
/// may still be blocked on a reader that stopped reading: a piece either
/// reached the pipe or did not, so the reader never gets half a line, and
/// the lines counted as unwritten are exactly those it did not get.
fn whole_lines(chunk: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = chunk;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let window = &rest[..rest.len().min(PIPE_BUF)];
        let end = match memchr::memrchr(b'\n', window) {
            Some(newline) if window.len() < rest.len() => newline + 1,
            // All that is left fits, or its first line does not fit alone.
            _ if window.len() == rest.len() => rest.len(),
            _ => memchr::memchr(b'\n', rest).map_or(rest.len(), |newline| newline + 1),
        };
        let (piece, after) = rest.split_at(end);
        rest = after;
        Some(piece)
    })
}

/// memchr's searches, not a loop over bytes: every byte of a storm's
/// output passes through here twice, and a byte loop took a sixth of
/// tcprst's CPU in one.
fn lines(bytes: &[u8]) -> u64 {
    memchr::memchr_iter(b'\n', bytes).count() as u64
}

impl QueuedWriter {
    /// Queues every complete line pending, or drops them if the queue has
    /// no room for them (`room_for`); a partial line waits for its end.
    fn send_lines(&mut self) -> io::Result<()> {
        if self.progress.closed.load(Ordering::Relaxed) {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let Some(end) = memchr::memrchr(b'\n', &self.pending) else {
            return Ok(());
        };
        let bytes = if end < self.pieces.copied_below() {
            let bytes = self.pending[..=end].to_vec();
            self.pending.drain(..=end);
            bytes
        } else {
            // The partial line left goes into a new buffer of a chunk's
            // size: one that grew from the partial line's size would copy
            // itself over at every doubling.
            let mut rest = Vec::with_capacity(self.pieces.chunk());
            rest.extend_from_slice(&self.pending[end + 1..]);
            self.pending.truncate(end + 1);
            std::mem::replace(&mut self.pending, rest)
        };
        // Lines from `line_buffer` alone end with `pending`: all were taken.
        let n = self.whole_lines.unwrap_or_else(|| lines(&bytes));
        self.whole_lines = self.pending.is_empty().then_some(0);
        let size = bytes.capacity();
        if !self.room_for(size) {
            self.progress.dropped_lines.fetch_add(n, Ordering::Relaxed);
            return Ok(());
        }
        self.progress
            .queued_bytes
            .fetch_add(size, Ordering::Relaxed);
        self.progress.queued_lines.fetch_add(n, Ordering::Relaxed);
        self.queue
            .send(Chunk { bytes, lines: n })
            .map_err(|_| io::ErrorKind::BrokenPipe.into())
    }

    /// Whether the queue has room for `size` bytes more. Lines for a
    /// regular file wait up to `ROOM_WAIT` for it: on a busy host the
    /// thread that writes them is most often only waiting for a CPU, and
    /// this wait gives it this one (in a storm of a line per reset on two
    /// CPUs, without it up to a sixth of the lines were dropped while that
    /// thread slept; see docs/performance.md). The records left meanwhile
    /// wait in the ring buffer, in a quarter of the bytes of their lines.
    /// Lines for a pipe never wait: its reader sets the pace, and must not
    /// set the event loop's (metrics count every reset read). Nor do they
    /// wait again after a wait ran out until a chunk was written.
    fn room_for(&mut self, size: usize) -> bool {
        let queued = &self.progress.queued_bytes;
        let fits = || queued.load(Ordering::Relaxed) + size <= QUEUED_BYTES;
        if fits() {
            return true;
        }
        if self.pieces != Pieces::WholeChunks {
            return false;
        }
        let written = self.progress.lock_chunks_written();
        if self.stalled_at == Some(*written) {
            return false;
        }
        let (written, _) = self
            .progress
            .room
            .wait_timeout_while(written, ROOM_WAIT, |_| {
                let progress = &self.progress;
                !fits()
                    && !progress.closed.load(Ordering::Relaxed)
                    && !progress.stopped.load(Ordering::Relaxed)
            })
            .unwrap_or_else(PoisonError::into_inner);
        let room = fits();
        self.stalled_at = (!room).then_some(*written);
        room
    }
}

impl LineOutput for QueuedWriter {
    fn line_buffer(&mut self) -> io::Result<Option<&mut Vec<u8>>> {
        if self.pending.len() + self.pieces.line_room() > self.pieces.chunk() {
            self.send_lines()?;
        }
        if let Some(n) = &mut self.whole_lines {
            *n += 1;
        }
        Ok(Some(&mut self.pending))
    }
}

impl Write for QueuedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Sent before it would grow: a chunk that outgrew its buffer would be
        // copied whole into one twice its size.
        if self.pending.len() + buf.len() > self.pieces.chunk() {
            self.send_lines()?;
        }
        if !buf.is_empty() {
            self.whole_lines = None;
        }
        self.pending.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_lines()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::Read as _,
        sync::{Condvar, Mutex},
    };

    use super::*;
    use crate::output::testing::Shared;

    const BOTH: [Pieces; 2] = [Pieces::PipeSized, Pieces::WholeChunks];

    #[test]
    fn lines_reach_the_output_whole_and_in_order() {
        for pieces in BOTH {
            let out = Shared::default();
            let (mut writer, report) = spawn(out.clone(), pieces).unwrap();
            write!(writer, "one\ntw").unwrap();
            writer.flush().unwrap();
            writeln!(writer, "o").unwrap();
            writer.flush().unwrap();
            assert_eq!(report.unwritten_after(Duration::from_secs(5)), 0);
            assert_eq!(out.text(), "one\ntwo\n", "{pieces:?}");
        }
    }

    #[test]
    fn only_a_regular_file_takes_whole_chunks() {
        let path = std::env::temp_dir().join(format!("tcprst-pieces-{}", std::process::id()));
        let file = File::create(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(Pieces::for_output(&file), Pieces::WholeChunks);
        let (reader, pipe) = io::pipe().unwrap();
        assert_eq!(Pieces::for_output(&pipe), Pieces::PipeSized);
        assert_eq!(Pieces::for_output(&reader), Pieces::PipeSized);
        let null = File::options().write(true).open("/dev/null").unwrap();
        assert_eq!(Pieces::for_output(&null), Pieces::PipeSized);
    }

    /// Records the size of every write.
    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<usize>>>);

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().push(buf.len());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_file_gets_a_chunk_a_write_and_a_pipe_pieces() {
        let line = format!("{}\n", "x".repeat(99));
        let lines = PIPE_CHUNK / line.len();
        for (pieces, writes) in [
            (Pieces::WholeChunks, vec![lines * line.len()]),
            (
                Pieces::PipeSized,
                (0..lines)
                    .step_by(PIPE_BUF / line.len())
                    .map(|first| (lines - first).min(PIPE_BUF / line.len()) * line.len())
                    .collect(),
            ),
        ] {
            let out = Writes::default();
            let (mut writer, report) = spawn(out.clone(), pieces).unwrap();
            for _ in 0..lines {
                writer.write_all(line.as_bytes()).unwrap();
            }
            writer.flush().unwrap();
            assert_eq!(report.unwritten_after(Duration::from_secs(5)), 0);
            assert_eq!(*out.0.lock().unwrap(), writes, "{pieces:?}");
        }
    }

    #[test]
    fn lines_built_in_place_fill_chunks_that_never_grow() {
        let out = Writes::default();
        let (mut writer, report) = spawn(out.clone(), Pieces::WholeChunks).unwrap();
        let line = format!("{}\n", "x".repeat(999));
        let lines = 3 * FILE_CHUNK / line.len();
        for _ in 0..lines {
            let buffer = writer.line_buffer().unwrap().expect("a buffer of its own");
            buffer.extend_from_slice(line.as_bytes());
            assert_eq!(buffer.capacity(), FILE_CHUNK);
        }
        writer.flush().unwrap();
        assert_eq!(report.unwritten_after(Duration::from_secs(5)), 0);
        // Each chunk was sent once the next line might not fit in it.
        let full = (FILE_CHUNK - Pieces::WholeChunks.line_room()) / line.len() + 1;
        let writes = out.0.lock().unwrap().clone();
        assert_eq!(writes.len(), lines.div_ceil(full), "{writes:?}");
        assert!(
            writes
                .iter()
                .all(|&w| w % line.len() == 0 && w <= full * line.len())
        );
        assert_eq!(writes.iter().sum::<usize>(), lines * line.len());
    }

    #[test]
    fn lines_built_in_place_and_written_are_counted_alike() {
        for pieces in BOTH {
            let out = Shared::default();
            let (mut writer, report) = spawn(out.clone(), pieces).unwrap();
            let build = |writer: &mut QueuedWriter, line: &str| {
                let buffer = writer.line_buffer().unwrap().expect("a buffer of its own");
                buffer.extend_from_slice(line.as_bytes());
            };
            build(&mut writer, "one\n");
            build(&mut writer, "two\n");
            writer.flush().unwrap();
            // A line written in parts around a flush, then one built again.
            write!(writer, "thr").unwrap();
            writer.flush().unwrap();
            writeln!(writer, "ee").unwrap();
            build(&mut writer, "four\n");
            writer.flush().unwrap();
            build(&mut writer, "five\n");
            writer.flush().unwrap();
            assert_eq!(report.unwritten_after(Duration::from_secs(5)), 0);
            assert_eq!(report.0.queued_lines.load(Ordering::Relaxed), 0);
            assert_eq!(out.text(), "one\ntwo\nthree\nfour\nfive\n", "{pieces:?}");
        }
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

    /// The lines `overfill` writes, and how many a flush queues.
    const LINE: &str = "ninety-nine bytes and a newline, written fifty at a time: five thousand bytes a flush..............\n";
    const LINES_A_FLUSH: usize = 50;

    /// Fills `writer` with flushed chunks of twice the bytes the queue
    /// holds, none of which waits; returns how many lines that was.
    fn overfill(writer: &mut QueuedWriter) -> u64 {
        let lines = (2 * QUEUED_BYTES / LINE.len()).next_multiple_of(LINES_A_FLUSH);
        for i in 0..lines {
            writer.write_all(LINE.as_bytes()).unwrap();
            if (i + 1) % LINES_A_FLUSH == 0 {
                writer.flush().unwrap();
            }
        }
        writer.flush().unwrap();
        lines as u64
    }

    #[test]
    fn a_blocked_reader_costs_whole_lines_counted_not_a_stall() {
        assert_eq!(LINE.len(), 100);
        let gate = Gate::default();
        let (mut writer, report) = spawn(gate.clone(), Pieces::PipeSized).unwrap();
        let lines = overfill(&mut writer);
        let dropped = report.dropped();
        // The queue, with the chunk the thread holds, keeps all the whole
        // flushes that fit in its bytes.
        let kept = (lines - dropped) as usize;
        assert_eq!(kept % LINES_A_FLUSH, 0, "{dropped} dropped");
        assert_eq!(
            kept / LINES_A_FLUSH,
            QUEUED_BYTES / (LINES_A_FLUSH * LINE.len())
        );
        let began = Instant::now();
        assert_eq!(
            report.unwritten_after(Duration::from_millis(50)),
            lines,
            "nothing was written"
        );
        assert!(
            began.elapsed() < Duration::from_secs(2),
            "{:?}",
            began.elapsed()
        );
    }

    #[test]
    fn a_full_chunk_counts_its_buffer_and_a_flush_its_lines() {
        let gate = Gate::default();
        let set_gate = |open: bool| {
            *gate.0.0.lock().unwrap() = open;
            gate.0.1.notify_all();
        };
        let (mut writer, report) = spawn(gate.clone(), Pieces::WholeChunks).unwrap();
        let queued = || report.0.queued_bytes.load(Ordering::Relaxed);
        // Each full chunk counts a chunk's buffer: the queue, with the one
        // the thread holds, takes QUEUED_BYTES / FILE_CHUNK of them, and drops
        // the next; a line more starts the chunk after.
        let chunk_lines = FILE_CHUNK / LINE.len();
        for _ in 0..(QUEUED_BYTES / FILE_CHUNK + 1) * chunk_lines + 1 {
            writer.write_all(LINE.as_bytes()).unwrap();
        }
        assert_eq!(report.dropped() as usize, chunk_lines);
        assert_eq!(queued(), QUEUED_BYTES);
        // That line, flushed, is copied into a buffer its size: still one
        // byte too many for the full queue.
        writer.flush().unwrap();
        assert_eq!(report.dropped() as usize, chunk_lines + 1);
        set_gate(true);
        let deadline = Instant::now() + Duration::from_secs(5);
        while queued() > 0 {
            assert!(Instant::now() < deadline, "the queue never emptied");
            thread::sleep(Duration::from_millis(5));
        }
        // Once written, the queue takes lines again; held by a blocked
        // write, a flushed line counts its own bytes.
        set_gate(false);
        writer.write_all(LINE.as_bytes()).unwrap();
        writer.flush().unwrap();
        assert_eq!(queued(), LINE.len());
        assert_eq!(report.dropped() as usize, chunk_lines + 1);
        set_gate(true);
        assert_eq!(
            report.unwritten_after(Duration::from_secs(5)) as usize,
            chunk_lines + 1
        );
    }

    #[test]
    fn a_reader_that_catches_up_in_time_gets_every_line_kept() {
        let gate = Gate::default();
        let (mut writer, report) = spawn(gate.clone(), Pieces::PipeSized).unwrap();
        overfill(&mut writer);
        let dropped = report.dropped();
        assert!(dropped > 0);
        *gate.0.0.lock().unwrap() = true;
        gate.0.1.notify_all();
        assert_eq!(report.unwritten_after(Duration::from_secs(5)), dropped);
    }

    /// An output that takes each write after a pause: a reader that keeps
    /// reading, behind.
    struct Slow(Shared, Duration);

    impl Write for Slow {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            thread::sleep(self.1);
            self.0.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Writes `chunks` chunks' worth of lines without a flush, so that each
    /// chunk is queued as it fills; returns how many lines that was.
    fn fill_chunks(writer: &mut QueuedWriter, chunks: usize) -> u64 {
        let lines = chunks * FILE_CHUNK / LINE.len();
        for _ in 0..lines {
            writer.write_all(LINE.as_bytes()).unwrap();
        }
        writer.flush().unwrap();
        lines as u64
    }

    /// A file behind: twice the chunks the queue holds, each written after a
    /// pause far shorter than `ROOM_WAIT`, and none dropped, where a pipe's
    /// reader as slow loses lines.
    #[test]
    fn lines_for_a_file_wait_for_room_and_a_pipes_do_not() {
        let chunks = 2 * QUEUED_BYTES / FILE_CHUNK;
        let pause = Duration::from_millis(1);
        let out = Shared::default();
        let (mut writer, report) = spawn(Slow(out.clone(), pause), Pieces::WholeChunks).unwrap();
        let lines = fill_chunks(&mut writer, chunks);
        assert_eq!(report.dropped(), 0);
        assert_eq!(report.unwritten_after(Duration::from_secs(5)), 0);
        assert_eq!(out.text().lines().count() as u64, lines);

        let slow = Slow(Shared::default(), pause);
        let (mut writer, report) = spawn(slow, Pieces::PipeSized).unwrap();
        fill_chunks(&mut writer, chunks);
        assert!(report.dropped() > 0);
        // Stops the thread, which would go on writing the queue for a second.
        report.unwritten_after(Duration::ZERO);
    }

    /// A file whose writes stopped (a stalled disk) is waited for once, not
    /// at every chunk: the event loop goes on, dropping lines, counted.
    #[test]
    fn a_stalled_file_is_waited_for_once() {
        let chunks = 40;
        let (mut writer, report) = spawn(Gate::default(), Pieces::WholeChunks).unwrap();
        let began = Instant::now();
        let lines = fill_chunks(&mut writer, chunks);
        // Waiting at each of the chunks past the queue's would take 1.8 s.
        assert!(
            began.elapsed() < Duration::from_secs(1),
            "{:?}",
            began.elapsed()
        );
        let kept = QUEUED_BYTES / FILE_CHUNK;
        assert!(report.dropped() as usize >= (chunks - kept - 1) * FILE_CHUNK / LINE.len());
        assert_eq!(report.unwritten_after(Duration::from_millis(10)), lines);
    }

    /// tcprst counts the lines left as it exits, and a reader that is only
    /// slow goes on reading until then: what it gets after the count must
    /// not be lines the count called unwritten.
    #[test]
    fn lines_counted_unwritten_never_arrive() {
        for pieces in BOTH {
            let out = Shared::default();
            let slow = Slow(out.clone(), Duration::from_millis(50));
            let (mut writer, report) = spawn(slow, pieces).unwrap();
            let line = format!("{}\n", "x".repeat(99));
            // 40 lines a pipe's piece, 10,485 a file's chunk; 50 ms a write: not
            // nearly all in 20 ms.
            let lines = 20_000;
            for _ in 0..lines {
                writer.write_all(line.as_bytes()).unwrap();
            }
            writer.flush().unwrap();
            let unwritten = report.unwritten_after(Duration::from_millis(20));
            assert!(unwritten > 0, "{pieces:?}");
            thread::sleep(Duration::from_millis(200));
            let written = out.text().lines().count() as u64;
            assert_eq!(written + unwritten, lines, "{pieces:?}: {written} written");
        }
    }

    #[test]
    fn pieces_are_whole_lines_that_a_pipe_takes_in_one_write() {
        let line = |n: usize| format!("{}\n", "x".repeat(n - 1)).into_bytes();
        let pieces = |chunk: &[u8]| whole_lines(chunk).map(<[u8]>::len).collect::<Vec<_>>();
        // Short lines gather into pieces up to PIPE_BUF, cut only between lines.
        let chunk: Vec<u8> = (0..100).flat_map(|_| line(100)).collect();
        assert_eq!(
            pieces(&chunk),
            [
                PIPE_BUF / 100 * 100,
                PIPE_BUF / 100 * 100,
                10_000 - 2 * (PIPE_BUF / 100 * 100)
            ]
        );
        // A line longer than PIPE_BUF is written alone, and whole.
        let chunk = [line(10), line(PIPE_BUF + 7), line(20)].concat();
        assert_eq!(pieces(&chunk), [10, PIPE_BUF + 7, 20]);
        // A chunk that fits is one write.
        assert_eq!(pieces(&line(PIPE_BUF)), [PIPE_BUF]);
        assert_eq!(pieces(&[]), Vec::<usize>::new());
    }

    /// The bytes waiting in a pipe.
    fn pipe_holds(reader: &io::PipeReader) -> usize {
        use std::os::fd::AsRawFd as _;
        let mut held: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int through the pointer, which
        // points at `held`; the descriptor is the reader's, open.
        let rc = unsafe { libc::ioctl(reader.as_raw_fd(), libc::FIONREAD, &mut held) };
        assert_eq!(rc, 0, "FIONREAD: {}", io::Error::last_os_error());
        held as usize
    }

    /// What tcprst leaves in a pipe when it exits with the writer thread
    /// blocked on it: the reader must find whole lines there.
    #[test]
    fn a_full_pipe_holds_whole_lines_only() {
        let (mut reader, pipe) = io::pipe().unwrap();
        let (mut writer, _report) = spawn(pipe, Pieces::PipeSized).unwrap();
        let line = format!("{}\n", "x".repeat(299));
        // A small chunk, then a chunk the pipe has room for only part of: a
        // single write of it would stop wherever the pipe filled.
        for lines in [10, PIPE_CHUNK / line.len()] {
            for _ in 0..lines {
                writer.write_all(line.as_bytes()).unwrap();
            }
            writer.flush().unwrap();
        }
        // The thread is blocked once the pipe stops filling.
        let mut held = pipe_holds(&reader);
        loop {
            thread::sleep(Duration::from_millis(200));
            let now = pipe_holds(&reader);
            if now == held {
                break;
            }
            held = now;
        }
        assert!(
            held > 0 && held < 10 * line.len() + PIPE_CHUNK,
            "{held} bytes held"
        );
        let mut bytes = vec![0; held];
        reader.read_exact(&mut bytes).unwrap();
        assert_eq!(
            held % line.len(),
            0,
            "{held} bytes: a line cut after {}",
            held % line.len()
        );
        assert!(bytes.ends_with(b"\n"));
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
        let (mut writer, _report) = spawn(Closed, Pieces::PipeSized).unwrap();
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
