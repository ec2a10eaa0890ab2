//! `tcprst trace`: the event loop from the ring buffer to the sink, and the
//! periodic scan for stuck half-closed connections.

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    io::{self, Write as _},
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    path::Path,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{MapData, RingBuf};
use aya_log::EbpfLogger;
use tcprst_common::{
    READY_LINE, RstKey,
    stderr::{STOPPED, TRACING},
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
    sync::mpsc::UnboundedReceiver,
    time::{MissedTickBehavior, interval, interval_at},
};

use crate::{
    bpf::close_notes::CloseNotes,
    bpf::early::EarlyRecords,
    bpf::probes::{Counters, ProbeConfig, Probes},
    bpf::stacks::{Kallsyms, KernelPath, Stacks},
    bpf::tallies::{Tallies, Tally},
    host::cgroup::CgroupResolver,
    host::conntrack::{self, Conntrack, Tuple},
    host::enrich::{self, Attribution, Enricher, OwnerCache},
    host::k8s::{self, PodIndex},
    host::overflows::{self, OverflowWatch},
    host::runtimes::{ContainerNames, RuntimeOptions},
    host::sockdiag::{dump_half_closed, dump_tcp},
    host::sockstat,
    model::conn::ConnKey,
    model::event::{Process, ResetHook, RstEvent, RstKind, TcpState},
    output::metrics::{self, Metrics, MetricsAddr, ResetSeries, Shortfalls},
    output::{
        self, LossReport, OutputFormat, Peer, ResolvedReport, RstReport, Sink, StuckReport,
        writer::{self, WriterReport},
    },
    pipeline::clock::{self, WallClock},
    pipeline::decode::Decoder,
    pipeline::diagnosis::{self, KernelView},
    pipeline::filter::EventFilter,
    pipeline::origin::{Origin, Origins, Receipt},
    pipeline::tracker::{Resolved, ScannedSocket, Tracker},
};

/// What one walk through every namespace found: the half-closed sockets
/// (sock_diag), each namespace's listen-queue overflows, and when it began.
struct Scan {
    began: SystemTime,
    /// CLOCK_MONOTONIC as the walk began (`CloseNotes::scanned`).
    began_ns: u64,
    sockets: Vec<enrich::FoundSocket>,
    overflows: Vec<overflows::Sample>,
    /// How long the walk took, over how many namespaces, and how many of
    /// them were dumped.
    took: Duration,
    namespaces: usize,
    walked: usize,
    /// The namespaces whose dump failed, and the first failure.
    unread: HashSet<u32>,
    first_failure: Option<String>,
}

/// Whether the calling thread's namespace may hold a half-closed socket,
/// by its counters and listeners (`sockstat`): the microseconds that spare
/// a walk of the host's whole socket table. Yes when either cannot be read.
fn may_hold_half_closed() -> bool {
    let listeners = dump_tcp(&[TcpState::Listen]);
    match (sockstat::read(), listeners) {
        (Ok(counts), Ok(listeners)) => counts.may_hold_half_closed(listeners.len()),
        (counts, listeners) => {
            log::debug!(
                "sockstat {:?}, listeners {:?}: dumping",
                counts.err(),
                listeners.err()
            );
            true
        }
    }
}

/// How often stuck half-closed connections are looked for while scans are
/// cheap: twice within `--stuck-after`, and at least every 5 s.
fn scan_every(stuck_after: Duration) -> Duration {
    (stuck_after / 2).clamp(Duration::from_millis(100), MAX_SCAN_EVERY)
}

/// The wait after a scan that took `took` before the next. A scan walks
/// the kernel's TCP table once per namespace that holds connections, so on
/// a host with many of them it can take seconds: the wait then stretches
/// until scanning takes a tenth of a CPU, up to half of `--stuck-after`,
/// the latest a stuck connection may be reported.
fn wait_after_scan(took: Duration, stuck_after: Duration) -> Duration {
    let every = scan_every(stuck_after);
    (took * 10).clamp(every, (stuck_after / 2).max(every))
}

/// Whether a scan that took `took` still costs over a tenth of a CPU with
/// `wait` between scans: the user should hear why, and what helps.
fn scans_are_dear(took: Duration, wait: Duration) -> bool {
    took * 10 > wait
}

/// Records handled per wake-up before signals and the loss report get a turn.
const DRAIN_BATCH: usize = 4096;
/// Startup's copies read between two copies of the ring behind them.
const EARLY_COPY_EVERY: usize = 256;
/// The programs wake the reader only for a batch of records; a lone record
/// waits at most this long.
const DRAIN_EVERY: Duration = Duration::from_millis(50);
/// How long stopping waits for stdout's reader to take the last events.
const UNWRITTEN_WAIT: Duration = Duration::from_millis(500);
/// The longest wait between two scans for stuck half-closed connections.
const MAX_SCAN_EVERY: Duration = Duration::from_secs(5);
/// How long starting waits for the runtimes to name the running containers.
const RUNTIMES_WAIT: Duration = Duration::from_secs(3);
/// How long stopping waits for the conntrack lookups still under way.
const LOOKUPS_WAIT: Duration = Duration::from_secs(1);

/// A reset waiting for its conntrack lookup, and the tuples asked.
enum Pending {
    /// A received reset held in `origins` under this number.
    Receipt { number: u64, tuples: Vec<Tuple> },
    /// A reset sent with no socket, written once the lookup answers.
    Sent(Box<RstReport>, Vec<Tuple>),
}

pub struct TraceOptions {
    pub probes: ProbeConfig,
    pub filter: EventFilter,
    pub output: OutputFormat,
    pub stuck_after: Duration,
    pub stuck_repeat: Duration,
    pub max_connections: usize,
    pub kubeconfig: Option<PathBuf>,
    /// Pod labels to report, by key.
    pub pod_labels: Vec<String>,
    /// Where to ask container runtimes for names and images.
    pub runtimes: RuntimeOptions,
    pub metrics_addr: Option<MetricsAddr>,
    /// --ready-fd's descriptor, told when tracing has started.
    pub ready: Option<File>,
}

/// Takes over the descriptor --ready-fd names, so that tcprst alone closes
/// it. Called before tcprst opens any file of its own, so a number that was
/// not inherited cannot name one of ours.
pub(crate) fn take_ready_fd(fd: RawFd) -> Result<File> {
    if (0..=2).contains(&fd) {
        bail!(
            "--ready-fd {fd}: 0, 1 and 2 are stdin, stdout and stderr; pass a descriptor of its own"
        );
    }
    // SAFETY: F_GETFD only asks whether `fd` is open; it reads no memory of ours.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
        bail!(
            "--ready-fd {fd}: not an open file descriptor ({})",
            io::Error::last_os_error()
        );
    }
    // SAFETY: `fd` is open and nothing else owns it: it was inherited (see
    // above), and it is taken here, once.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Tells whoever holds --ready-fd's other end that tracing has started,
/// then closes it. A reader that went away is only worth a warning.
fn announce_ready(mut ready: File) {
    if let Err(e) = ready.write_all(READY_LINE.as_bytes()) {
        log::warn!("--ready-fd: could not say tracing started: {e}");
    }
}

#[derive(Default)]
struct Counts {
    read: u64,
    shown: u64,
    undecodable: u64,
    lost_reported: u64,
    stack_failures_reported: u64,
    /// Resets the kernel only counted, and the aggregate events for them.
    counted: u64,
    aggregates: u64,
    /// Received resets that were the kernel's own aborts: not shown.
    phantom_receipts: u64,
    unwritten_warned: bool,
    skipped_runs_warned: bool,
    notes_warned: bool,
    /// Whether the cost of the scans was warned of.
    scans_warned: bool,
    /// Whether a namespace's failed dump was warned of.
    scan_failures_warned: bool,
}

/// With `TCPRST_DUMP_RECORDS=DIR`, the first records read are written to
/// DIR verbatim: real inputs for the decoder's fuzz corpus and bug reports.
struct RecordDump {
    dir: PathBuf,
    left: u32,
}

impl RecordDump {
    const MAX: u32 = 64;

    fn from_env() -> Option<Self> {
        let dir = PathBuf::from(std::env::var_os("TCPRST_DUMP_RECORDS")?);
        match Self::safe_dir(&dir) {
            Ok(()) => Some(Self {
                dir,
                left: Self::MAX,
            }),
            Err(e) => {
                log::warn!("not dumping records to {}: {e}", dir.display());
                None
            }
        }
    }

    /// tcprst runs as root: the directory must be ours and writable by no
    /// one else, or another user could plant a symlink where a record goes.
    fn safe_dir(dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let meta = std::fs::symlink_metadata(dir)?;
        // SAFETY: geteuid cannot fail.
        let euid = unsafe { libc::geteuid() };
        if !meta.is_dir() || meta.uid() != euid || meta.mode() & 0o022 != 0 {
            return Err(io::Error::other(
                "it must be a directory of this user that no one else can write",
            ));
        }
        Ok(())
    }

    fn keep(&mut self, bytes: &[u8]) {
        if self.left == 0 {
            return;
        }
        self.left -= 1;
        let path = self
            .dir
            .join(format!("record-{:02}", Self::MAX - self.left));
        // Never through a symlink, never over a file already there.
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .and_then(|mut file| file.write_all(bytes));
        if let Err(e) = written {
            log::warn!("dumping a record to {}: {e}", path.display());
            self.left = 0;
        }
    }
}

/// Everything a record passes through after the ring buffer.
struct Pipeline<'a> {
    dump: Option<RecordDump>,
    decoder: Decoder,
    tracker: Tracker,
    enricher: Enricher,
    owners: OwnerCache,
    stacks: Option<Stacks>,
    /// Whether this kernel keeps `diagnosis::RESET_TAKER` apart, so that a
    /// phantom receipt can be told from a reset that arrived.
    reset_taker_apart: bool,
    filter: &'a EventFilter,
    sink: Box<dyn Sink>,
    metrics: Arc<Metrics>,
    counts: Counts,
    /// None when kernel-side filters hide the sends that would explain
    /// received resets.
    origins: Option<Origins<RstReport, Peer>>,
    /// The close-mark map sock_diag dumps beside each socket, with
    /// `--history`. Held here so its descriptor stays open.
    marks: Option<MapData>,
    /// What startup copied out of the ring, read before the ring.
    early: EarlyRecords,
    /// The close-note rings, by default; None with `--history` or where the
    /// kernel keeps no marks.
    notes: Option<CloseNotes>,
    /// What became of the lines the sink wrote.
    written: WriterReport,
    overflows: OverflowWatch,
    /// Conntrack lookups for resets across NAT; None if its worker could
    /// not start.
    conntrack: Option<Conntrack>,
    /// Resets whose lookup has not answered, by lookup id.
    pending: HashMap<u64, Pending>,
    next_lookup: u64,
    /// When the drain under way began: the clock of its records' cache
    /// ages and rate limits, read once a drain rather than twice a record
    /// (2.7 % of a storm's event loop).
    drain_began: Instant,
}

impl Pipeline<'_> {
    /// Asks conntrack about `tuples`; the lookup's id, or None when it was
    /// skipped (counted) or there is no lookup worker.
    fn look_up(&mut self, tuples: &[Tuple]) -> Option<u64> {
        let conntrack = self.conntrack.as_mut()?;
        let id = self.next_lookup;
        conntrack.ask(id, tuples, self.drain_began).then(|| {
            self.next_lookup += 1;
            id
        })
    }

    /// A conntrack lookup answered: the reset waiting for it gets the NAT'd
    /// entry found, a received one is matched through it, and a sent one
    /// is explained by it and written.
    fn conntrack_answer(&mut self, answer: conntrack::Answer) -> io::Result<()> {
        if let Some(conntrack) = &mut self.conntrack {
            conntrack.heard(&answer, Instant::now());
        }
        match self.pending.remove(&answer.id) {
            Some(Pending::Receipt { number, tuples }) => {
                // The entry's other direction is the sender's view: its
                // send is remembered under the ends that view gives.
                let alias = answer.found.as_ref().map(|found| {
                    let entry = &found.entry;
                    let other = if tuples.first() == Some(&entry.original) {
                        entry.reply
                    } else {
                        entry.original
                    };
                    (other.dst, other.src)
                });
                let explained = match &mut self.origins {
                    Some(origins) => {
                        origins.lookup_done(number, alias, |report| report.conntrack = answer.found)
                    }
                    None => None,
                };
                if let Some(explained) = explained {
                    self.emit_rst(explained)?;
                }
                Ok(())
            }
            Some(Pending::Sent(mut report, tuples)) => {
                if let Some(found) = &answer.found {
                    // Asked first: the offending segment's own direction.
                    let fits_reply = found.by == 0 && tuples.first() == Some(&found.entry.reply);
                    if let Some(d) = diagnosis::escaped_nat(&report.ev, found, fits_reply) {
                        report.diagnosis = Some(d);
                    }
                }
                report.conntrack = answer.found;
                self.write_rst(&report)
            }
            None => Ok(()),
        }
    }

    /// Stopping: waits a moment for the lookups under way, then writes
    /// what still waits without them, counted as skipped.
    async fn finish_lookups(
        &mut self,
        answers: &mut Option<UnboundedReceiver<conntrack::Answer>>,
    ) -> io::Result<()> {
        let deadline = tokio::time::Instant::now() + LOOKUPS_WAIT;
        while !self.pending.is_empty() {
            let Some(answers) = answers.as_mut() else {
                break;
            };
            match tokio::time::timeout_at(deadline, answers.recv()).await {
                Ok(Some(answer)) => self.conntrack_answer(answer)?,
                Ok(None) | Err(_) => break,
            }
        }
        let left: Vec<Pending> = self.pending.drain().map(|(_, p)| p).collect();
        if let Some(conntrack) = &mut self.conntrack {
            conntrack.finish();
            conntrack
                .stats
                .skipped
                .fetch_add(left.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        for pending in left {
            if let Pending::Sent(report, _) = pending {
                self.write_rst(&report)?;
            }
        }
        Ok(())
    }

    fn write_rst(&mut self, report: &RstReport) -> io::Result<()> {
        self.count_reset(report);
        self.sink.rst(report)?;
        self.counts.shown += 1;
        Ok(())
    }

    fn record(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.counts.read += 1;
        if let Some(dump) = &mut self.dump {
            dump.keep(bytes);
        }
        match self.decoder.decode(bytes) {
            Ok(ev) if self.is_phantom_receipt(&ev) => {
                self.phantom_receipts(1);
                Ok(())
            }
            Ok(mut ev) => {
                self.add_close_notes(&mut ev);
                self.rst(ev)
            }
            Err(e) => {
                if self.counts.undecodable == 0 {
                    log::warn!("undecodable record: {e}");
                }
                self.counts.undecodable += 1;
                Ok(())
            }
        }
    }

    /// Whether a received reset is the kernel's own abort, no reset having
    /// arrived (`diagnosis::is_phantom_receipt`). Its connection's rst_sent
    /// is the reset on the wire.
    fn is_phantom_receipt(&mut self, ev: &RstEvent) -> bool {
        let Some(stacks) = &mut self.stacks else {
            return false;
        };
        diagnosis::is_phantom_receipt(ev, self.reset_taker_apart, || {
            stacks.path(&ev.frames).caller
        })
    }

    fn phantom_receipts(&mut self, n: u64) {
        self.counts.phantom_receipts += n;
        self.metrics.phantom_receipts(n);
    }

    /// The close history of a reset's socket that sent its FIN, from the
    /// close notes (with `--history` the record carries it). A timewait
    /// socket sent its FIN as the socket it replaced, whose cookie it keeps.
    fn add_close_notes(&mut self, ev: &mut RstEvent) {
        let sent_fin =
            ev.socket.is_some_and(|s| s.sent_fin) || ev.state == Some(TcpState::TimeWait);
        if ev.history.is_some() || !sent_fin {
            return;
        }
        let (Some(notes), Some(cookie)) = (&mut self.notes, ev.sock_cookie) else {
            return;
        };
        ev.history = notes.mark_of(cookie).map(|m| self.decoder.history(&m));
    }

    /// Whose socket it is: the task acting on it in process context, which
    /// is right even after close() dropped the descriptor; otherwise the
    /// process holding the socket's inode, from /proc.
    fn owner_of(&mut self, ev: &RstEvent) -> Option<Process> {
        enrich::acting_owner(ev).or_else(|| self.owners.owner(ev.socket?.inode?))
    }

    fn rst(&mut self, ev: RstEvent) -> io::Result<()> {
        let key = ConnKey::new(ev.netns, ev.local, ev.remote);
        if ev.kind == RstKind::Received
            && let Some(resolved) = self.tracker.reset(&key, ev.time)
        {
            self.emit_resolved(resolved)?;
        }
        let owner = self.owner_of(&ev);
        let attribution = self
            .enricher
            .attribute(&key, ev.cgroup_id, owner, self.drain_began);
        let wanted = self.filter.matches(&ev) && self.filter.wants_owner(&attribution);
        // A send explains the receipts waiting for it, wanted or not; they
        // are its peer, and it is theirs.
        let explained = match &mut self.origins {
            Some(origins) if ev.kind == RstKind::Sent => {
                let sender = Peer {
                    netns: ev.netns,
                    attribution: attribution.clone(),
                    sent_reason: ev.reason.clone(),
                };
                origins.sent(&ev, sender)
            }
            _ => Vec::new(),
        };
        if wanted {
            let peer = explained.first().map(|(receipt, ..)| Peer {
                netns: receipt.ev.netns,
                attribution: receipt.attribution.clone(),
                sent_reason: None,
            });
            self.report_rst(ev, attribution, peer)?;
        }
        for receipt in explained {
            self.emit_rst(receipt)?;
        }
        Ok(())
    }

    /// A reset's report: the function that decided it, and why it
    /// happened, from its frames, its socket and what the kernel's settings
    /// say where they explain it.
    fn report(
        &mut self,
        ev: RstEvent,
        attribution: Attribution,
        peer: Option<Peer>,
        stack: Option<Arc<[Arc<str>]>>,
    ) -> RstReport {
        let path = match &mut self.stacks {
            Some(stacks) => stacks.path(&ev.frames),
            None => KernelPath::default(),
        };
        let mut kernel = KernelView {
            path: &path.functions,
            ..KernelView::default()
        };
        // Each fact read only for the rare reset it explains.
        let mut lookup = enrich::Lookup::default();
        let netns = ev.netns.unwrap_or(0);
        if ev.reason.as_deref() == Some("TCP_ABORT_ON_MEMORY") {
            kernel.max_orphans = lookup.sysctl(netns, "net/ipv4/tcp_max_orphans");
        }
        if ev.kind == RstKind::Sent && kernel.ended_a_handshake() {
            kernel.abort_on_overflow = lookup
                .sysctl(netns, "net/ipv4/tcp_abort_on_overflow")
                .map(|v| v != 0);
            if kernel.abort_on_overflow == Some(true) {
                kernel.accept_queue = lookup.accept_queue(netns, ev.local);
            }
        }
        RstReport::new(ev, attribution, peer, &kernel, path.caller.clone(), stack)
    }

    /// Explains a wanted reset and writes it; a received one first waits in
    /// `origins` for the send that explains it.
    fn report_rst(
        &mut self,
        ev: RstEvent,
        attribution: Attribution,
        peer: Option<Peer>,
    ) -> io::Result<()> {
        let stack = match (&mut self.stacks, ev.stack_id) {
            (Some(stacks), Some(id)) => stacks.whole(id),
            _ => None,
        };
        let report = self.report(ev, attribution, peer, stack.map(|s| s.frames));
        let (local, remote) = (report.ev.local, report.ev.remote);
        if report.ev.kind == RstKind::Received
            && let Some(origins) = &mut self.origins
        {
            let receipt = Receipt::of(&report.ev);
            return match origins.receive(receipt, report, Instant::now()) {
                Ok(explained) => self.emit_rst(explained),
                // No mirrored send yet: NAT may have rewritten its ends.
                Err(number) => {
                    let tuples = [Tuple::new(local, remote)];
                    if let Some(id) = self.look_up(&tuples)
                        && let Some(origins) = &mut self.origins
                    {
                        origins.await_lookup(number);
                        let tuples = tuples.to_vec();
                        self.pending.insert(id, Pending::Receipt { number, tuples });
                    }
                    Ok(())
                }
            };
        }
        // A sent reset carries its connection's NAT'd ends, if conntrack
        // here has them. With no socket, the segment it answers may also
        // have escaped reverse NAT: looked up first as it came, remote to
        // local.
        if report.ev.kind == RstKind::Sent {
            let both = [Tuple::new(remote, local), Tuple::new(local, remote)];
            let tuples = if report.ev.state.is_none() {
                &both[..]
            } else {
                &both[1..]
            };
            if let Some(id) = self.look_up(tuples) {
                let tuples = tuples.to_vec();
                self.pending
                    .insert(id, Pending::Sent(Box::new(report), tuples));
                return Ok(());
            }
        }
        self.write_rst(&report)
    }

    fn count_reset(&self, report: &RstReport) {
        let series = ResetSeries {
            sent: report.ev.kind == RstKind::Sent,
            reason: report.ev.reason.as_ref(),
            caller: report.caller.as_ref(),
            pod: report.attribution.pod.as_ref(),
        };
        self.metrics.reset(series, report.ev.resets());
    }

    /// The resets the kernel only counted, one aggregate event per key.
    /// They skip origin matching: a count has no single send to pair with,
    /// and the key's detailed records were matched already.
    fn aggregates(&mut self, tallies: Vec<(RstKey, Tally)>) -> io::Result<()> {
        for (key, tally) in tallies {
            let ev = match self.decoder.aggregate(&key, &tally) {
                Ok(ev) if self.is_phantom_receipt(&ev) => {
                    self.phantom_receipts(tally.counted);
                    continue;
                }
                Ok(ev) => ev,
                Err(e) => {
                    // Not silent: the count goes into the exit summary.
                    log::warn!("undecodable reset tally of {} resets: {e}", tally.counted);
                    self.counts.undecodable += 1;
                    continue;
                }
            };
            self.counts.counted += tally.counted;
            let conn = ConnKey::new(ev.netns, ev.local, ev.remote);
            let owner = self.owner_of(&ev);
            let attribution = self
                .enricher
                .attribute(&conn, ev.cgroup_id, owner, Instant::now());
            if !(self.filter.matches(&ev) && self.filter.wants_owner(&attribution)) {
                continue;
            }
            let report = self.report(ev, attribution, None, None);
            self.count_reset(&report);
            self.sink.rst(&report)?;
            self.counts.shown += 1;
            self.counts.aggregates += 1;
        }
        self.sink.flush()
    }

    fn emit_resolved(&mut self, resolved: Resolved) -> io::Result<()> {
        let conn = &resolved.conn;
        let attribution = self
            .enricher
            .attribute(&conn.key, conn.cgroup_id, None, Instant::now());
        if self.filter.wants_halfclose(&conn.key, &attribution) {
            let diagnosis = diagnosis::resolved(&resolved);
            self.sink.resolved(&ResolvedReport {
                resolved,
                diagnosis,
                netns_name: attribution.netns_name,
            })?;
            self.counts.shown += 1;
        }
        Ok(())
    }

    /// A received reset, with where it came from and, when this host sent
    /// it, the sending socket as its peer.
    fn emit_rst(
        &mut self,
        (mut report, origin, sender): (RstReport, Origin, Option<Peer>),
    ) -> io::Result<()> {
        let sent_reason = sender.as_ref().and_then(|s| s.sent_reason.as_deref());
        if let Some(d) = diagnosis::explained_by_sender(&report.ev, sent_reason) {
            report.diagnosis = Some(d);
        }
        // Sent by nothing here, on a connection a conntrack here tracks.
        if matches!(origin, Origin::NotLocal { .. })
            && let Some(found) = &report.conntrack
            && let Some(d) = diagnosis::rejected_by_conntrack(&report.ev, found)
        {
            report.diagnosis = Some(d);
        }
        report.origin = Some(origin);
        report.peer = sender;
        self.write_rst(&report)
    }

    /// Received resets no send can explain any more; `read_all_before` is
    /// when a drain that read the ring buffer empty began.
    fn release_origins(&mut self, read_all_before: Option<Instant>) -> io::Result<()> {
        let released = match &mut self.origins {
            Some(origins) => origins.expired(read_all_before),
            None => Vec::new(),
        };
        released.into_iter().try_for_each(|e| self.emit_rst(e))
    }

    /// Every received reset still waiting, when tracing stops.
    fn flush_origins(&mut self) -> io::Result<()> {
        let released = match &mut self.origins {
            Some(origins) => origins.flush(),
            None => Vec::new(),
        };
        released.into_iter().try_for_each(|e| self.emit_rst(e))
    }

    fn drain(&mut self, ring: &mut RingBuf<MapData>) -> io::Result<usize> {
        // Once the ring is read empty, all the kernel wrote before this was read.
        let began = Instant::now();
        self.drain_began = began;
        let mut n = 0;
        // Startup's copies come first. The ring is copied behind them as
        // they are read, or it would fill meanwhile: there were thousands
        // of them, read at 20 µs each in a debug build.
        while n < DRAIN_BATCH {
            if n % EARLY_COPY_EVERY == 0 && self.early.catching_up() {
                self.early.copy(ring);
            }
            let Some(record) = self.early.pop() else {
                break;
            };
            n += 1;
            self.record(&record)?;
        }
        while n < DRAIN_BATCH {
            let Some(item) = ring.next() else { break };
            n += 1;
            self.record(&item)?;
        }
        let emptied = n < DRAIN_BATCH;
        self.release_origins(emptied.then_some(began))?;
        self.sink.flush()?;
        Ok(n)
    }

    /// The part of a scan that walks every namespace, as a job that can run
    /// off the event loop: the half-closed sockets from sock_diag (with
    /// their marks, with `--history`), and the namespace's listen-queue
    /// overflows, read in the same visit. A namespace whose counters show
    /// nothing but listeners, and none of whose connections are tracked,
    /// is not dumped (`sockstat`).
    fn namespace_walk(&self, opts: &TraceOptions) -> impl FnOnce() -> Scan + Send + 'static {
        let only = (opts.probes.filter.netns != 0).then_some(opts.probes.filter.netns);
        let tracked = self.tracker.namespaces();
        // Its own descriptor of the mark map, which the job closes.
        let marks = self
            .marks
            .as_ref()
            .and_then(|m| m.fd().as_fd().try_clone_to_owned().ok());
        move || {
            let began = SystemTime::now();
            let began_ns = clock::monotonic_ns();
            let started = Instant::now();
            let visits = enrich::in_every_namespace(only, |ns| {
                let walked = tracked.contains(&ns.inode) || may_hold_half_closed();
                let dump = if walked {
                    dump_half_closed(marks.as_ref().map(|fd| fd.as_raw_fd()))
                } else {
                    Ok(Vec::new())
                };
                (dump, walked, overflows::read())
            });
            let took = started.elapsed();
            let namespaces = visits.len();
            let mut walked = 0;
            let mut dumps = Vec::with_capacity(visits.len());
            let mut counts = Vec::with_capacity(visits.len());
            for (ns, (dump, dumped, count)) in visits {
                walked += usize::from(dumped);
                match count {
                    Ok(total) => counts.push(overflows::Sample {
                        netns: ns.inode,
                        name: enrich::namespace_label(&ns),
                        total,
                    }),
                    Err(e) => log::debug!("listen overflows in {}: {e}", ns.name),
                }
                dumps.push((ns, dump));
            }
            let found = enrich::found_sockets(dumps);
            Scan {
                began,
                began_ns,
                sockets: found.sockets,
                overflows: counts,
                took,
                namespaces,
                walked,
                unread: found.unread.iter().map(|(ns, _)| ns.inode).collect(),
                first_failure: found
                    .unread
                    .first()
                    .map(|(ns, why)| format!("{}: {why}", ns.name)),
            }
        }
    }

    /// Resolves what moved on since the last dump, reports the stuck, and
    /// warns of new listen-queue overflows. Returns the wait before the
    /// next scan (`wait_after_scan`).
    fn scanned(&mut self, opts: &TraceOptions, scan: Scan) -> io::Result<Duration> {
        for warning in self.overflows.sample(Instant::now(), &scan.overflows) {
            log::warn!("{warning}");
        }
        self.metrics.listen_overflows(&scan.overflows);
        self.metrics
            .scanned(scan.took, scan.namespaces, scan.walked);
        self.metrics.scan_failures(scan.unread.len());
        if let Some(failure) = &scan.first_failure
            && !self.counts.scan_failures_warned
        {
            self.counts.scan_failures_warned = true;
            log::warn!(
                "sock_diag could not dump {} of {} network namespaces ({failure}): their stuck half-closed connections go unreported, and those tracked there stay as they were. The kernel needs the tcp_diag module (modprobe tcp_diag); `tcprst doctor` checks (tcprst_scan_failures_total)",
                scan.unread.len(),
                scan.namespaces
            );
        }
        let wait = wait_after_scan(scan.took, opts.stuck_after);
        if scans_are_dear(scan.took, wait) && !self.counts.scans_warned {
            self.counts.scans_warned = true;
            log::warn!(
                "a scan for stuck half-closed connections took {} ms dumping {} of {} network namespaces, and scans cannot be further apart than {} ms (half of --stuck-after): the kernel walks its whole TCP socket table, TIME_WAIT included, once for each namespace that holds more than listeners. A longer --stuck-after lets scans space out, --netns scans one namespace, and on Linux 6.1 and later sysctl net.ipv4.tcp_child_ehash_entries gives each namespace made after it a socket table of its own, which its dump alone walks (tcprst_scan_seconds_total)",
                scan.took.as_millis(),
                scan.walked,
                scan.namespaces,
                wait.as_millis()
            );
        }
        let now = scan.began;
        let noted = match &mut self.notes {
            Some(notes) => {
                // A namespace left unread may hold any of the closes in
                // progress: forget none, as if the dump began at boot.
                let began_ns = if scan.unread.is_empty() {
                    scan.began_ns
                } else {
                    0
                };
                notes.scanned(began_ns, scan.sockets.iter().map(|f| f.socket.cookie))
            }
            None => HashMap::new(),
        };
        let port = opts.probes.filter.port;
        let sockets = scan
            .sockets
            .into_iter()
            .filter(|f| {
                port == 0 || f.socket.local.port() == port || f.socket.remote.port() == port
            })
            .map(|f| ScannedSocket {
                key: f.key(),
                state: f.socket.state,
                orphaned: f.socket.inode == 0,
                inode: (f.socket.inode != 0).then_some(f.socket.inode),
                cgroup_id: f.socket.cgroup_id.filter(|id| *id != 0),
                history: f
                    .socket
                    .mark
                    .or_else(|| noted.get(&f.socket.cookie).copied())
                    .map(|m| self.decoder.history(&m)),
                peer_quiet: f.socket.last_ack_recv,
            })
            .collect();
        for resolved in self.tracker.scan_except(now, sockets, &scan.unread) {
            self.emit_resolved(resolved)?;
        }
        let mut lookup = enrich::Lookup::default();
        let clock = Instant::now();
        for conn in self.tracker.stuck(now, opts.stuck_after, opts.stuck_repeat) {
            // Who holds the socket now, which may not be who started closing it.
            let owner = conn.inode.and_then(|inode| lookup.socket_owner(inode));
            let attribution = self
                .enricher
                .attribute(&conn.key, conn.cgroup_id, owner, clock);
            if !self.filter.wants_halfclose(&conn.key, &attribution) {
                continue;
            }
            let label = attribution.owner.as_ref().map(|o| o.label());
            let fin_timeout = lookup.fin_timeout(conn.key.netns);
            let diagnosis = diagnosis::stuck(&conn, now, label.as_deref(), fin_timeout);
            self.sink.stuck(&StuckReport {
                time: now,
                conn,
                attribution,
                diagnosis,
            })?;
            self.counts.shown += 1;
        }
        // Every stuck connection the filters keep, not only those due a
        // report now: the gauges say how many are stuck, and where, at each
        // scan. Who holds a socket filters nothing, so it is not looked up.
        let (filter, enricher) = (&self.filter, &mut self.enricher);
        let stuck: Vec<_> = self
            .tracker
            .stuck_counts(|conn| {
                let attribution = enricher.attribute(&conn.key, conn.cgroup_id, None, clock);
                filter.wants_halfclose(&conn.key, &attribution)
            })
            .into_iter()
            .map(|((state, cgroup_id), n)| {
                (state, cgroup_id.and_then(|id| self.enricher.pod(id)), n)
            })
            .collect();
        self.metrics.set_stuck(stuck.iter().map(|(state, pod, n)| {
            let pod = pod
                .as_ref()
                .map(|p| (p.namespace.as_str(), p.name.as_str()));
            (*state, pod, *n)
        }));
        self.metrics
            .tracker(self.tracker.tracked(), self.tracker.untracked);
        self.sink.flush()?;
        Ok(wait)
    }

    /// What tcprst could not do or decide, since start.
    fn shortfalls(&self, counters: &Counters) -> Shortfalls {
        let origins = self
            .origins
            .as_ref()
            .map(Origins::stats)
            .unwrap_or_default();
        Shortfalls {
            undecodable: self.counts.undecodable,
            sends_forgotten: origins.sends_overflowed,
            receipts_unmatched: origins.receipts_unmatched,
            tally_full: counters.tally_full().unwrap_or(0),
            unwritten: self.written.dropped(),
            tuple_failures: counters.tuple_failures().unwrap_or(0),
            skipped_runs: counters.skipped_runs().unwrap_or(0),
            conntrack_skipped: self.conntrack.as_ref().map_or(0, |c| {
                c.stats.skipped.load(std::sync::atomic::Ordering::Relaxed)
            }),
            conntrack_failed: self.conntrack.as_ref().map_or(0, |c| {
                c.stats.failed.load(std::sync::atomic::Ordering::Relaxed)
            }),
            close_notes_overwritten: self.notes.as_ref().map_or(0, CloseNotes::overwritten),
        }
    }

    /// What the programs could not do since the last report: records the
    /// ring buffer had no room for, and resets with no readable stack.
    fn report_counters(&mut self, counters: &Counters) -> io::Result<()> {
        let shortfalls = self.shortfalls(counters);
        if shortfalls.unwritten > 0 && !self.counts.unwritten_warned {
            self.counts.unwritten_warned = true;
            log::warn!(
                "the reader of stdout is not keeping up: events are dropped whole and counted (tcprst_unwritten_events_total, and the exit summary)"
            );
        }
        if shortfalls.close_notes_overwritten > 0 && !self.counts.notes_warned {
            self.counts.notes_warned = true;
            log::warn!(
                "connections close faster than tcprst reads the kernel's close notes, or too many closes are in progress: {} notes were lost unread, so some half-closed sockets may be reported without who started their close (tcprst_close_notes_overwritten_total, and the exit summary)",
                shortfalls.close_notes_overwritten
            );
        }
        if shortfalls.skipped_runs > 0 && !self.counts.skipped_runs_warned {
            self.counts.skipped_runs_warned = true;
            log::warn!(
                "the kernel skipped {} runs of tcprst's programs because a tracing program was already running on that CPU: those resets or state changes are missing (tcprst_skipped_program_runs_total, and the exit summary)",
                shortfalls.skipped_runs
            );
        }
        self.metrics.shortfalls(&shortfalls);
        match counters.stack_failures() {
            Ok(total) if total > self.counts.stack_failures_reported => {
                if self.counts.stack_failures_reported == 0 {
                    log::warn!(
                        "the kernel could not unwind the stack of {total} resets: their caller is null (counted in the exit summary and metrics)"
                    );
                }
                self.metrics
                    .stack_failures(total - self.counts.stack_failures_reported);
                self.counts.stack_failures_reported = total;
            }
            Ok(_) => {}
            Err(e) => log::warn!("reading the stack-failure counter: {e}"),
        }
        let total = match counters.lost() {
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
            self.metrics.lost(report.lost);
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

pub async fn run(mut probes: Probes, mut opts: TraceOptions) -> Result<()> {
    let ready = opts.ready.take();
    // First, so a stop asked for during startup (the pod watch, the first
    // scan) still ends cleanly once the loop runs.
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut ring = probes.take_ring()?;
    // Until the event loop reads the ring, startup copies it (see `early`).
    let mut early = EarlyRecords::default();
    early.copy(&mut ring);
    let counters = probes.take_counters()?;
    let mut tallies = probes.take_tallies()?;
    let mut bpf_logs = if opts.probes.debug_bpf {
        Some(poll_bpf_logs(probes.take_logger()?)?)
    } else {
        None
    };
    // Socket storage with --history; the ring of close notes otherwise.
    let (marks, notes) = if opts.probes.history {
        (probes.take_marks(), None)
    } else {
        // Tracing goes on without them: a reset or a stuck report then
        // names no initiator, as on a kernel without marks.
        let notes = probes.take_close_notes().unwrap_or_else(|e| {
            log::warn!("who shut down or closed a socket is unknown: {e:#}");
            None
        });
        (None, notes)
    };
    let kallsyms = early
        .during(
            &mut ring,
            tokio::task::spawn_blocking(|| {
                let kallsyms = Kallsyms::load()?;
                let taker_apart = kallsyms.defines(diagnosis::RESET_TAKER);
                Ok((kallsyms, taker_apart))
            }),
        )
        .await
        .unwrap_or_else(|e| Err(format!("reading /proc/kallsyms failed: {e}")));
    let mut reset_taker_apart = false;
    let stacks = match kallsyms {
        Ok((kallsyms, taker_apart)) => {
            reset_taker_apart = taker_apart;
            let whole = opts
                .probes
                .whole_stacks
                .then(|| probes.take_stacks())
                .transpose()?;
            Some(Stacks::new(whole, kallsyms))
        }
        Err(why) => {
            log::warn!("callers unavailable: {why}: every reset's caller is null");
            None
        }
    };
    let metrics = Arc::new(Metrics::default());
    for (tier, n) in probes.attached_by_tier() {
        metrics.programs_attached(tier, n);
    }
    if let Some(MetricsAddr(addr)) = opts.metrics_addr {
        metrics::serve(addr, metrics.clone()).await?;
    }
    let node = k8s::node_name();
    let pods = start_pod_watcher(&opts, &node).await;
    let pieces = writer::Pieces::for_output(&io::stdout());
    let (stdout, written) =
        writer::spawn(io::stdout(), pieces).context("starting the output thread")?;
    let (conntrack, mut answers) = match Conntrack::spawn() {
        Ok((conntrack, answers)) => (Some(conntrack), Some(answers)),
        Err(e) => {
            log::warn!("no conntrack lookups ({e}): resets across NAT are not matched");
            (None, None)
        }
    };
    let mut pipeline = Pipeline {
        dump: RecordDump::from_env(),
        decoder: Decoder::new(std::mem::take(&mut probes.reasons), WallClock::now()),
        tracker: Tracker::new(opts.max_connections),
        enricher: Enricher::new(CgroupResolver::discover(), pods),
        owners: OwnerCache::default(),
        stacks,
        reset_taker_apart,
        filter: &opts.filter,
        sink: output::open(opts.output, Box::new(stdout), node),
        metrics,
        counts: Counts::default(),
        origins: origins_for(&probes, &opts),
        marks,
        early: EarlyRecords::default(),
        notes,
        written,
        overflows: OverflowWatch::default(),
        conntrack,
        pending: HashMap::new(),
        next_lookup: 0,
        drain_began: Instant::now(),
    };
    // Containers running now are named from their first reset; a runtime
    // slow to answer delays the start by RUNTIMES_WAIT at most.
    early
        .during(
            &mut ring,
            pipeline
                .enricher
                .ask_runtimes(ContainerNames::start(opts.runtimes.clone()), RUNTIMES_WAIT),
        )
        .await;
    let mut tick = interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // The first scan ends before tracing is announced, so that what it
    // finds half-closed and the overflows it counts predate tracing: only
    // those ages are lower bounds. It walks on a thread of its own, as the
    // later scans do, while the ring is copied.
    let first_scan = early
        .during(
            &mut ring,
            tokio::task::spawn_blocking(pipeline.namespace_walk(&opts)),
        )
        .await
        .context("the first scan for half-closed connections")?;
    let first_wait = pipeline.scanned(&opts, first_scan)?;
    early.startup_done();
    pipeline.early = early;
    // SAFETY: the ring buffer's fd stays open for as long as the AsyncFd owns it.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(io::Error::from)
        .context("polling the ring buffer")?;
    // Each scan sets the wait before the next (`wait_after_scan`).
    let mut scan_tick = interval_at(
        tokio::time::Instant::now() + first_wait,
        scan_every(opts.stuck_after),
    );
    let mut walk: Option<tokio::task::JoinHandle<Scan>> = None;
    scan_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut drain_tick = interval(DRAIN_EVERY);
    drain_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut tally_tick = interval_at(
        tokio::time::Instant::now() + Tallies::PERIOD,
        Tallies::PERIOD,
    );
    // A late turn only makes one period longer; none is skipped.
    tally_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);

    log::info!(
        "{TRACING}RSTs and half-closes ({}); Ctrl-C to stop",
        probes
            .attached
            .iter()
            .map(|(tier, what)| format!("{what} ({tier})"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(ready) = ready {
        announce_ready(ready);
    }

    let outcome: io::Result<()> = async {
        loop {
            tokio::select! {
                biased;
                _ = sigint.recv() => return Ok(()),
                _ = sigterm.recv() => return Ok(()),
                _ = tick.tick() => {
                    pipeline.decoder.clock.refresh();
                    pipeline.report_counters(&counters)?;
                    let enricher = &pipeline.enricher;
                    pipeline
                        .metrics
                        .forget_pods(|namespace, pod| enricher.pod_exists(namespace, pod));
                }
                // The walk runs on a blocking thread; records, signals and
                // metrics are served meanwhile.
                _ = scan_tick.tick(), if walk.is_none() => {
                    walk = Some(tokio::task::spawn_blocking(pipeline.namespace_walk(&opts)));
                }
                found = async { walk.as_mut().expect("guarded by is_some").await }, if walk.is_some() => {
                    walk = None;
                    let wait = pipeline.scanned(&opts, found.map_err(io::Error::other)?)?;
                    scan_tick.reset_after(wait);
                }
                _ = tally_tick.tick() => pipeline.aggregates(read_tallies(tallies.turn()))?,
                Some(answer) = next_answer(&mut answers) => pipeline.conntrack_answer(answer)?,
                // Records below the wake-up batch are read here, and a lone
                // received reset decided once the ring is read empty.
                _ = drain_tick.tick() => {
                    pipeline.drain(ring.get_mut())?;
                    if let Some(notes) = &mut pipeline.notes {
                        notes.read();
                        if walk.is_none() && notes.due() {
                            walk = Some(tokio::task::spawn_blocking(pipeline.namespace_walk(&opts)));
                        }
                    }
                }
                guard = bpf_logs_ready(&mut bpf_logs) => {
                    // Cleared first, then read empty: the kernel wakes a
                    // reader only for a line written after it caught up, so
                    // clearing after the read could lose that wake-up and
                    // stall the log for good.
                    let mut guard = guard?;
                    guard.clear_ready();
                    guard.get_inner_mut().flush();
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

    let outcome = match outcome {
        Ok(()) => stop(&mut pipeline, ring.get_mut(), &mut answers).await,
        Err(e) => Err(e),
    };
    let outcome = outcome.and_then(|()| {
        pipeline.flush_origins()?;
        pipeline.aggregates(read_tallies(tallies.finish()))?;
        pipeline.report_counters(&counters)?;
        pipeline.sink.flush()
    });
    match outcome {
        Ok(()) => {}
        // `tcprst trace | head`: the reader is gone, which is a normal end.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
        Err(e) => return Err(e).context("writing events"),
    }
    drop(probes);
    // The programs are detached: what they logged before is all there is,
    // and the summary's counts below say as much as the log says.
    if let Some(logs) = &mut bpf_logs {
        logs.get_mut().flush();
    }
    // A reader that stopped reading gets a moment, not a hang.
    let unwritten = pipeline.written.unwritten_after(UNWRITTEN_WAIT);
    let counts = &pipeline.counts;
    let shortfalls = pipeline.shortfalls(&counters);
    log::info!(
        "{STOPPED}{} records read, {} events shown, {} lost, {} undecodable, {} half-closed connections left untracked, {} resets with no readable stack, {} resets only counted in the kernel (in {} aggregate events), {} past their budget shown in detail because the tally map was full, {} received resets no local send explained, {} sends forgotten by origin matching, {} events not written because the reader of stdout fell behind, {} resets dropped because their ends could not be read, {} program runs the kernel skipped, {} conntrack lookups skipped, {} conntrack lookups failed, {} close notes overwritten unread, {} received resets that were the kernel's own aborts (not shown)",
        counts.read,
        counts.shown,
        counters.lost().unwrap_or(counts.lost_reported),
        counts.undecodable,
        pipeline.tracker.untracked,
        counters
            .stack_failures()
            .unwrap_or(counts.stack_failures_reported),
        counts.counted,
        counts.aggregates,
        shortfalls.tally_full,
        shortfalls.receipts_unmatched,
        shortfalls.sends_forgotten,
        unwritten,
        shortfalls.tuple_failures,
        shortfalls.skipped_runs,
        shortfalls.conntrack_skipped,
        shortfalls.conntrack_failed,
        shortfalls.close_notes_overwritten,
        counts.phantom_receipts,
    );
    Ok(())
}

/// The next conntrack answer; never, without a lookup worker.
async fn next_answer(
    answers: &mut Option<UnboundedReceiver<conntrack::Answer>>,
) -> Option<conntrack::Answer> {
    match answers {
        Some(answers) => answers.recv().await,
        None => std::future::pending().await,
    }
}

/// What was already in the ring when we were told to stop, and the
/// conntrack lookups its resets wait for.
async fn stop(
    pipeline: &mut Pipeline<'_>,
    ring: &mut RingBuf<MapData>,
    answers: &mut Option<UnboundedReceiver<conntrack::Answer>>,
) -> io::Result<()> {
    while pipeline.drain(ring)? == DRAIN_BATCH {}
    pipeline.finish_lookups(answers).await
}

type BpfLogs = AsyncFd<EbpfLogger<&'static dyn log::Log>>;

/// The programs' failure logs (`--debug-bpf`), forwarded to stderr as they
/// come. The trace loop owns them, not a task of their own, so that it can
/// read them a last time once the programs are detached: a task dropped at
/// exit took the last lines with it, while the summary counted them.
fn poll_bpf_logs(logger: EbpfLogger<&'static dyn log::Log>) -> Result<BpfLogs> {
    // SAFETY: the log ring's fd stays open for as long as the AsyncFd owns it.
    unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(io::Error::from)
        .context("polling the programs' logs")
}

/// The logs once readable; never, without `--debug-bpf`.
async fn bpf_logs_ready(
    logs: &mut Option<BpfLogs>,
) -> io::Result<tokio::io::unix::AsyncFdReadyMutGuard<'_, EbpfLogger<&'static dyn log::Log>>> {
    match logs {
        Some(logs) => logs.readable_mut().await,
        None => std::future::pending().await,
    }
}

/// The tallies a turn read; a map that cannot be read is reported, and
/// tracing goes on with the records it has.
fn read_tallies(turned: Result<Vec<(RstKey, Tally)>>) -> Vec<(RstKey, Tally)> {
    turned.unwrap_or_else(|e| {
        log::warn!("{e:#}: the resets counted in the kernel this second are not reported");
        Vec::new()
    })
}

/// Received resets are explained by the sends this host makes, unless
/// those are not all traced: the in-kernel netns and pid filters drop sends
/// made elsewhere (the other end of a veth, or softirq), and before 6.10 the
/// tracepoint alone misses every reset sent without a socket.
fn origins_for(probes: &Probes, opts: &TraceOptions) -> Option<Origins<RstReport, Peer>> {
    let filter = &opts.probes.filter;
    if !opts.probes.rst_sent
        || filter.netns != 0
        || filter.tgid != 0
        || probes.misses_socketless_resets
    {
        return None;
    }
    let netfilter = [ResetHook::NfSendReset, ResetHook::NfSendReset6];
    let netfilter_watched = netfilter.iter().all(|hook| {
        probes
            .plans
            .iter()
            .any(|p| p.function.hook == *hook && p.tier.is_some())
    });
    Some(Origins::new(netfilter_watched))
}

/// On Kubernetes (or with --kubeconfig), a background watch of this node's
/// pods; without the API, events keep the ids their cgroups carry.
async fn start_pod_watcher(opts: &TraceOptions, node: &str) -> Option<PodIndex> {
    match k8s::client_config(opts.kubeconfig.as_deref()).await {
        Ok(Some(config)) => {
            let index = PodIndex::new(opts.pod_labels.clone());
            tokio::spawn(k8s::watch_pods(config, node.to_owned(), index.clone()));
            log::info!("watching the pods of node {node}");
            Some(index)
        }
        Ok(None) => None,
        Err(e) => {
            log::warn!("no Kubernetes client: {e:#}; events keep cgroup-derived ids");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_scans_space_out_up_to_half_of_stuck_after() {
        let ms = Duration::from_millis;
        let default = Duration::from_secs(30);
        // Cheap scans come every 5 s.
        assert_eq!(wait_after_scan(ms(40), default), ms(5_000));
        // A scan of 1.2 s waits 12 s, so that scanning takes a tenth of a
        // CPU; one of 3 s waits no longer than 15 s, and is still dear.
        assert_eq!(wait_after_scan(ms(1_200), default), ms(12_000));
        assert!(!scans_are_dear(
            ms(1_200),
            wait_after_scan(ms(1_200), default)
        ));
        assert_eq!(wait_after_scan(ms(3_000), default), ms(15_000));
        assert!(scans_are_dear(
            ms(3_000),
            wait_after_scan(ms(3_000), default)
        ));
        // Below 10 s, scans come at half of --stuck-after, however slow.
        let short = Duration::from_secs(1);
        assert_eq!(wait_after_scan(ms(300), short), ms(500));
        assert!(scans_are_dear(ms(300), ms(500)));
        assert!(!scans_are_dear(ms(50), ms(500)));
    }
}
