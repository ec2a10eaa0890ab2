//! Conntrack entries by tuple, from ctnetlink (IPCTNL_MSG_CT_GET) in every
//! network namespace, for resets whose ends NAT rewrote: a Service's DNAT,
//! masquerading. Conntrack keeps an entry in CLOSE for about ten seconds
//! after a reset, so a lookup moments after one finds it. Where an entry is
//! found, so is how many packets that namespace's conntrack marked INVALID
//! (IPCTNL_MSG_CT_GET_STATS_CPU): the evidence for a reset a
//! `ct state invalid reject` rule sent.
//!
//! Lookups run on a thread of their own, never on the event loop, through a
//! socket per namespace (`Tables`): a netlink socket talks to the conntrack
//! table of the namespace it was made in. They are rate limited, so a storm
//! costs a bounded amount; what is skipped or fails is counted.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel},
    },
    time::{Duration, Instant},
};

use netlink_packet_core::{
    DefaultNla, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload, Nla as _,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
    conntrack::{
        ConntrackAttribute, ConntrackMessage, IPTuple, ProtoInfo, ProtoInfoTCP, ProtoTuple,
        Protocol, Tuple as CtaTuple,
    },
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_NETFILTER};

use crate::host::netns::{self, NetnsHandle};

/// One direction of a connection, as conntrack keys it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

impl Tuple {
    pub fn new(src: SocketAddr, dst: SocketAddr) -> Self {
        Self { src, dst }
    }
}

/// A conntrack entry: both directions, and the TCP state it tracks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub original: Tuple,
    pub reply: Tuple,
    /// `enum tcp_conntrack` (UAPI numbers).
    pub tcp_state: Option<u8>,
}

impl Entry {
    /// Whether NAT rewrote an end: without it the reply is the original
    /// turned around.
    pub fn natted(&self) -> bool {
        self.original.src != self.reply.dst || self.original.dst != self.reply.src
    }

    pub fn tcp_state_name(&self) -> Option<&'static str> {
        Some(match self.tcp_state? {
            0 => "NONE",
            1 => "SYN_SENT",
            2 => "SYN_RECV",
            3 => "ESTABLISHED",
            4 => "FIN_WAIT",
            5 => "CLOSE_WAIT",
            6 => "LAST_ACK",
            7 => "TIME_WAIT",
            8 => "CLOSE",
            9 => "SYN_SENT2",
            _ => return None,
        })
    }
}

/// An entry found for a tuple, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub netns: u32,
    pub netns_name: String,
    pub entry: Entry,
    /// Which of the asked tuples it was found by.
    pub by: usize,
    /// The packets that namespace's conntrack has marked INVALID since it
    /// was made, when read.
    pub invalid: Option<u64>,
}

impl Found {
    /// Whether the tuple it was found by is the entry's reply direction.
    pub fn by_reply(&self, asked: &[Tuple]) -> bool {
        asked.get(self.by) == Some(&self.entry.reply)
    }
}

fn cta_tuple(t: &Tuple) -> Vec<CtaTuple> {
    vec![
        CtaTuple::Ip(vec![
            IPTuple::SourceAddress(t.src.ip()),
            IPTuple::DestinationAddress(t.dst.ip()),
        ]),
        CtaTuple::Proto(vec![
            ProtoTuple::Protocol(Protocol::Tcp),
            ProtoTuple::SourcePort(t.src.port()),
            ProtoTuple::DestinationPort(t.dst.port()),
        ]),
    ]
}

/// The IPCTNL_MSG_CT_GET request for the entry with `tuple` in either
/// direction.
fn request(tuple: &Tuple, seq: u32) -> Vec<u8> {
    let family = match tuple.src {
        SocketAddr::V4(_) => NetfilterProtoFamily::IPv4,
        SocketAddr::V6(_) => NetfilterProtoFamily::IPv6,
    };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    header.sequence_number = seq;
    let mut message = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(family, 0, 0),
            ConntrackMessage::Get(vec![ConntrackAttribute::CtaTupleOrig(cta_tuple(tuple))]),
        )),
    );
    message.finalize();
    let mut buf = vec![0; message.buffer_len()];
    message.serialize(&mut buf);
    buf
}

fn tuple_of(attrs: &[CtaTuple]) -> Option<Tuple> {
    let (mut src_ip, mut dst_ip, mut sport, mut dport) = (None, None, None, None);
    for attr in attrs {
        match attr {
            CtaTuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src_ip = Some(*a),
                        IPTuple::DestinationAddress(a) => dst_ip = Some(*a),
                        _ => {}
                    }
                }
            }
            CtaTuple::Proto(protos) => {
                for p in protos {
                    match p {
                        ProtoTuple::SourcePort(port) => sport = Some(*port),
                        ProtoTuple::DestinationPort(port) => dport = Some(*port),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let end = |ip: Option<IpAddr>, port| Some(SocketAddr::new(ip?.to_canonical(), port?));
    Some(Tuple::new(end(src_ip, sport)?, end(dst_ip, dport)?))
}

/// The entry a CT_GET answer carries; None when conntrack has no such
/// entry (ENOENT).
fn decode(datagram: &[u8]) -> io::Result<Option<Entry>> {
    let message = NetlinkMessage::<NetfilterMessage>::deserialize(datagram)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    let attrs = match message.payload {
        NetlinkPayload::Error(err) => {
            return match err.code {
                Some(code) if code.get() == -libc::ENOENT => Ok(None),
                Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                None => Ok(None),
            };
        }
        NetlinkPayload::InnerMessage(NetfilterMessage {
            inner: NetfilterMessageInner::Conntrack(ConntrackMessage::New(attrs)),
            ..
        }) => attrs,
        other => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected ctnetlink answer {other:?}"),
            ));
        }
    };
    let (mut original, mut reply, mut tcp_state) = (None, None, None);
    for attr in &attrs {
        match attr {
            ConntrackAttribute::CtaTupleOrig(t) => original = tuple_of(t),
            ConntrackAttribute::CtaTupleReply(t) => reply = tuple_of(t),
            ConntrackAttribute::CtaProtoInfo(infos) => {
                for info in infos {
                    if let ProtoInfo::TCP(tcp) = info {
                        for t in tcp {
                            if let ProtoInfoTCP::State(s) = t {
                                tcp_state = Some(*s);
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    match (original, reply) {
        (Some(original), Some(reply)) => Ok(Some(Entry {
            original,
            reply,
            tcp_state,
        })),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a ctnetlink entry without both tuples",
        )),
    }
}

/// CTA_STATS_INVALID in `enum ctattr_stats_cpu`.
const CTA_STATS_INVALID: u16 = 4;
/// IPCTNL_MSG_CT_GET_STATS_CPU and IPCTNL_MSG_CT_GET_STATS in `enum
/// cntl_msg_types`.
const IPCTNL_MSG_CT_GET_STATS_CPU: u8 = 4;
const IPCTNL_MSG_CT_GET_STATS: u8 = 5;
/// CTA_STATS_GLOBAL_ENTRIES in `enum ctattr_stats_global`.
const CTA_STATS_GLOBAL_ENTRIES: u16 = 1;

/// A request for conntrack's statistics: per CPU (a dump), or global.
fn stats_request(message_type: u8) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = match message_type {
        IPCTNL_MSG_CT_GET_STATS_CPU => NLM_F_REQUEST | NLM_F_DUMP,
        _ => NLM_F_REQUEST,
    };
    header.sequence_number = 2;
    let mut message = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, 0),
            ConntrackMessage::Other {
                message_type,
                attributes: Vec::new(),
            },
        )),
    );
    message.finalize();
    let mut buf = vec![0; message.buffer_len()];
    message.serialize(&mut buf);
    buf
}

fn u32_attribute(nla: &DefaultNla) -> Option<u32> {
    let mut value = [0u8; 4];
    (nla.value_len() == 4).then(|| nla.emit_value(&mut value))?;
    Some(u32::from_be_bytes(value))
}

/// The entries a global stats answer counts.
fn decode_entries(datagram: &[u8]) -> io::Result<u32> {
    let message = NetlinkMessage::<NetfilterMessage>::deserialize(datagram)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    match message.payload {
        NetlinkPayload::Error(err) => {
            let code = err.code.map_or(0, |c| -c.get());
            Err(io::Error::from_raw_os_error(code))
        }
        NetlinkPayload::InnerMessage(NetfilterMessage {
            inner: NetfilterMessageInner::Conntrack(ConntrackMessage::Other { attributes, .. }),
            ..
        }) => attributes
            .iter()
            .find(|a| a.kind() == CTA_STATS_GLOBAL_ENTRIES)
            .and_then(u32_attribute)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "conntrack stats without a count",
                )
            }),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected ctnetlink answer {other:?}"),
        )),
    }
}

/// Adds the INVALID counts of one datagram of the per-CPU stats dump to
/// `total`; true once the dump is done.
fn add_invalid(mut datagram: &[u8], total: &mut u64) -> io::Result<bool> {
    while !datagram.is_empty() {
        let message = NetlinkMessage::<NetfilterMessage>::deserialize(datagram)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        let len = message.header.length as usize;
        match message.payload {
            NetlinkPayload::Done(_) => return Ok(true),
            NetlinkPayload::Error(err) => {
                let code = err.code.map_or(0, |c| -c.get());
                return Err(io::Error::from_raw_os_error(code));
            }
            NetlinkPayload::InnerMessage(NetfilterMessage {
                inner: NetfilterMessageInner::Conntrack(ConntrackMessage::Other { attributes, .. }),
                ..
            }) => {
                *total += attributes
                    .iter()
                    .filter(|a| a.kind() == CTA_STATS_INVALID)
                    .filter_map(u32_attribute)
                    .map(u64::from)
                    .sum::<u64>();
            }
            _ => {}
        }
        if len == 0 {
            break;
        }
        datagram = datagram.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    Ok(false)
}

/// A netfilter netlink socket talking to the kernel, bound to the calling
/// thread's network namespace for as long as it lives.
fn ctnetlink() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    // A kernel that never answers must not stall the lookup worker: a
    // receive that times out is a failed lookup, counted.
    let timeout = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: SO_RCVTIMEO reads one timeval, which `timeout` is, for as
    // long as the call; the descriptor is the socket just made.
    let set = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::from_ref(&timeout).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(io::Error::last_os_error());
    }
    socket.bind_auto()?;
    socket.connect(&NetlinkAddr::new(0, 0))?;
    Ok(socket)
}

/// The packets the conntrack of `socket`'s namespace has marked INVALID,
/// summed over CPUs.
fn invalid_packets(socket: &Socket) -> io::Result<u64> {
    socket.send(&stats_request(IPCTNL_MSG_CT_GET_STATS_CPU), 0)?;
    let mut total = 0;
    loop {
        let (datagram, _) = socket.recv_from_full()?;
        if add_invalid(&datagram, &mut total)? {
            return Ok(total);
        }
    }
}

/// How many entries the conntrack of `socket`'s namespace holds.
fn entries(socket: &Socket) -> io::Result<u32> {
    socket.send(&stats_request(IPCTNL_MSG_CT_GET_STATS), 0)?;
    let (datagram, _) = socket.recv_from_full()?;
    decode_entries(&datagram)
}

/// The entry with `tuple` in either direction, in the conntrack of
/// `socket`'s namespace.
fn get(socket: &Socket, tuple: &Tuple) -> io::Result<Option<Entry>> {
    socket.send(&request(tuple, 1), 0)?;
    let (datagram, _) = socket.recv_from_full()?;
    decode(&datagram)
}

/// One namespace's conntrack, through a ctnetlink socket made inside it
/// once. The socket goes on talking to that namespace from any thread, so
/// a lookup costs a request and an answer per namespace. Entering each one
/// per lookup cost a thread and two setns() per namespace: 8 % of a CPU
/// under a storm on a host with 50 namespaces, and it grows with the pods
/// on a node.
struct Table {
    ns: NetnsHandle,
    /// Why there is no socket: it could not be made, or it failed once
    /// and may hold a late answer. The next listing makes it again.
    socket: Result<Socket, String>,
    /// Whether the namespace's conntrack held no entry when last counted:
    /// most on a node never track a connection (a pod's, unless it has
    /// rules of its own). Such a table is counted again before each
    /// lookup, a request instead of one per tuple: the connection looked
    /// up may be the first it tracked, reset within a millisecond (a SYN
    /// redirected to a sidecar not yet listening).
    empty: bool,
}

/// Every namespace's table, as listed at `listed`. A socket keeps its
/// namespace alive, so a namespace no longer listed loses its table at
/// the next listing, and the worker drops them all once lookups pause.
struct Tables {
    listed: Instant,
    all: Vec<Table>,
}

impl Tables {
    /// Lists the namespaces again: a table is kept while its namespace is
    /// listed, and made for a new one. The inode names the same namespace
    /// as long as the table's socket keeps it alive. Each table's entries
    /// are counted again (`Table::empty`).
    fn relist(previous: Option<Self>, now: Instant) -> Self {
        let mut kept: HashMap<u32, Socket> = previous
            .into_iter()
            .flat_map(|tables| tables.all)
            .filter_map(|table| Some((table.ns.inode, table.socket.ok()?)))
            .collect();
        let all = netns::all_namespaces()
            .into_iter()
            .filter_map(|ns| {
                let socket = match kept.remove(&ns.inode) {
                    Some(socket) => Ok(socket),
                    // Gone since it was listed: no table, and no error.
                    None => netns::in_netns(&ns, ctnetlink).ok()?,
                };
                // A count that fails fails the lookups too, as an error.
                let counted = socket.and_then(|socket| Ok((entries(&socket)?, socket)));
                Some(match counted {
                    Ok((entries, socket)) => Table {
                        ns,
                        socket: Ok(socket),
                        empty: entries == 0,
                    },
                    Err(e) => Table {
                        ns,
                        socket: Err(e.to_string()),
                        empty: false,
                    },
                })
            })
            .collect();
        Self { listed: now, all }
    }

    fn in_use(&self) -> bool {
        self.all.iter().any(|table| !table.empty)
    }
}

/// Lookups no faster than this on average; a storm beyond it is counted as
/// skipped rather than queued.
const LOOKUPS_PER_SEC: f64 = 50.0;
const BURST: f64 = 100.0;
/// Lookups queued for the worker at most.
const QUEUED: usize = 256;
/// How long a list of namespaces is reused; after this long without a
/// lookup the worker closes its sockets, so that none keeps a namespace
/// alive.
const NAMESPACES_FOR: Duration = Duration::from_secs(1);
/// How long an answer that found every namespace's conntrack empty
/// stands for the lookups a storm skips: until the listing after next.
const UNUSED_FOR: Duration = Duration::from_secs(2);
/// How long an answer is reused for the same tuples, and how many are kept.
const CACHED_FOR: Duration = Duration::from_millis(500);
const CACHED: usize = 1024;

/// What lookups could not do, for the exit summary and metrics.
#[derive(Debug, Default)]
pub struct LookupStats {
    /// Skipped under a storm (rate limit or a full queue).
    pub skipped: AtomicU64,
    /// Failed in some namespace for a reason other than "no entry".
    pub failed: AtomicU64,
}

/// A lookup for the resets of `id`: the tuples to try, in order.
struct Ask {
    id: u64,
    tuples: Vec<Tuple>,
}

/// The first NAT'd entry found for a lookup, else the first entry.
#[derive(Debug)]
pub struct Answer {
    pub id: u64,
    pub found: Option<Found>,
    /// Whether any namespace's conntrack held entries (or could not be
    /// counted) when the namespaces were last listed.
    pub in_use: bool,
}

/// The lookup worker's handle.
pub struct Conntrack {
    asks: SyncSender<Ask>,
    tokens: f64,
    refilled: Instant,
    /// When the last answer came, and whether it found conntrack holding
    /// entries in any namespace.
    heard: Option<(Instant, bool)>,
    /// Lookups skipped with no answer in the last `UNUSED_FOR` to say
    /// whether they had anything to find (a storm's start): the next
    /// answer counts them or drops them, and stopping counts them.
    unjudged: u64,
    pub stats: Arc<LookupStats>,
}

impl Conntrack {
    /// Starts the worker; its answers arrive on the returned channel.
    pub fn spawn() -> io::Result<(Self, tokio::sync::mpsc::UnboundedReceiver<Answer>)> {
        raise_open_files_limit();
        let (asks, asked) = sync_channel(QUEUED);
        let (answers, answered) = tokio::sync::mpsc::unbounded_channel();
        let stats = Arc::new(LookupStats::default());
        let worker_stats = stats.clone();
        std::thread::Builder::new()
            .name("conntrack".into())
            .spawn(move || work(&asked, &answers, &worker_stats))?;
        Ok((Self::new(asks, stats), answered))
    }

    /// The handle on a worker that takes `asks`, with a full bucket.
    fn new(asks: SyncSender<Ask>, stats: Arc<LookupStats>) -> Self {
        Self {
            asks,
            tokens: BURST,
            refilled: Instant::now(),
            heard: None,
            unjudged: 0,
            stats,
        }
    }

    /// Asks for a lookup at `now`; false when it is skipped, which counts
    /// where conntrack holds entries (`heard`, `finish`). Each one asked
    /// gets exactly one answer. `now` is the caller's clock,
    /// read once per batch of records (a storm asks for every sent reset);
    /// it never runs the bucket backwards.
    pub fn ask(&mut self, id: u64, tuples: &[Tuple], now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = self.refilled.max(now);
        self.tokens = (self.tokens + elapsed * LOOKUPS_PER_SEC).min(BURST);
        // A full queue or a worker gone: skipped either way.
        let sent = self.tokens >= 1.0
            && self
                .asks
                .try_send(Ask {
                    id,
                    tuples: tuples.to_vec(),
                })
                .is_ok();
        if sent {
            self.tokens -= 1.0;
            return true;
        }
        // A lookup skipped while no conntrack held an entry had nothing to
        // find, and is not counted: it would be every reset of a storm on
        // a host without NAT.
        let recent = self
            .heard
            .filter(|(at, _)| now.saturating_duration_since(*at) < UNUSED_FOR);
        match recent {
            Some((_, false)) => {}
            Some((_, true)) => self.skip(1),
            None => self.unjudged += 1,
        }
        false
    }

    fn skip(&self, lookups: u64) {
        self.stats.skipped.fetch_add(lookups, Ordering::Relaxed);
    }

    /// Takes in what an answer says of conntrack at `now`, and judges the
    /// lookups skipped before it.
    pub fn heard(&mut self, answer: &Answer, now: Instant) {
        let unjudged = std::mem::take(&mut self.unjudged);
        if answer.in_use {
            self.skip(unjudged);
        }
        self.heard = Some((now, answer.in_use));
    }

    /// Stopping: the skipped lookups no answer judged count as skipped.
    pub fn finish(&mut self) {
        let unjudged = std::mem::take(&mut self.unjudged);
        self.skip(unjudged);
    }
}

/// Lifts the soft limit on open files to the hard one: the worker keeps a
/// socket per namespace, hundreds on a node, and the soft limit (often
/// 1024) is kept low only for select(), which tcprst does not use. Past
/// the hard limit a namespace's socket fails, and its lookups are counted
/// as failed.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `limit`, which outlives the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: setrlimit only reads `limit`, which outlives the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        log::debug!(
            "could not raise RLIMIT_NOFILE: {}",
            io::Error::last_os_error()
        );
    }
}

fn work(
    asked: &Receiver<Ask>,
    answers: &tokio::sync::mpsc::UnboundedSender<Answer>,
    stats: &LookupStats,
) {
    let mut tables: Option<Tables> = None;
    let mut cache: HashMap<Vec<Tuple>, (Instant, Option<Found>)> = HashMap::new();
    let mut warned = false;
    loop {
        let Ask { id, tuples } = match asked.recv_timeout(NAMESPACES_FOR) {
            Ok(ask) => ask,
            Err(RecvTimeoutError::Timeout) => {
                tables = None;
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let now = Instant::now();
        let cached = cache
            .get(&tuples)
            .filter(|(at, _)| now.duration_since(*at) < CACHED_FOR)
            .map(|(_, found)| found.clone());
        let found = match cached {
            Some(found) => found,
            None => {
                let fresh = tables
                    .as_ref()
                    .is_some_and(|t| now.duration_since(t.listed) < NAMESPACES_FOR);
                if !fresh {
                    tables = Some(Tables::relist(tables.take(), now));
                }
                let all = &mut tables.as_mut().expect("just listed").all;
                let (found, error) = find(all, &tuples);
                if let Some(e) = error {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    if !warned {
                        warned = true;
                        log::warn!(
                            "conntrack lookup failed: {e}; resets behind NAT may go unmatched (counted in the exit summary and metrics)"
                        );
                    }
                }
                if cache.len() >= CACHED {
                    cache.clear();
                }
                cache.insert(tuples, (now, found.clone()));
                found
            }
        };
        let in_use = tables.as_ref().is_none_or(Tables::in_use);
        if answers.send(Answer { id, found, in_use }).is_err() {
            return;
        }
    }
}

/// The first NAT'd entry for any of `tuples` in any namespace, else the
/// first entry, and the first error met on the way. A table whose socket
/// fails loses it, so that a late answer is never read as the next one's.
fn find(tables: &mut [Table], tuples: &[Tuple]) -> (Option<Found>, Option<String>) {
    let mut error = None;
    let mut plain = None;
    for table in tables.iter_mut() {
        let looked_up = match &table.socket {
            Ok(socket) => look_up_in(socket, &mut table.empty, tuples),
            Err(e) => {
                error.get_or_insert_with(|| format!("in network namespace {}: {e}", table.ns.name));
                continue;
            }
        };
        match looked_up {
            Ok(Some((by, entry, invalid))) => {
                let found = Found {
                    netns: table.ns.inode,
                    netns_name: table.ns.name.clone(),
                    entry,
                    by,
                    invalid,
                };
                if found.entry.natted() {
                    return (Some(found), error);
                }
                plain.get_or_insert(found);
            }
            Ok(None) => {}
            Err(e) => {
                let e = e.to_string();
                error.get_or_insert_with(|| format!("in network namespace {}: {e}", table.ns.name));
                table.socket = Err(e);
            }
        }
    }
    (plain, error)
}

/// The entry for the first of `tuples` found in the conntrack of
/// `socket`'s namespace, which of them found it, and the namespace's
/// INVALID count. Where the table was `empty`, its entries are counted
/// first, and only a table that now has some is asked for them.
fn look_up_in(
    socket: &Socket,
    empty: &mut bool,
    tuples: &[Tuple],
) -> io::Result<Option<(usize, Entry, Option<u64>)>> {
    if *empty {
        if entries(socket)? == 0 {
            return Ok(None);
        }
        *empty = false;
    }
    for (by, tuple) in tuples.iter().enumerate() {
        if let Some(entry) = get(socket, tuple)? {
            // Evidence to go with the entry; its absence is no failure.
            return Ok(Some((by, entry, invalid_packets(socket).ok())));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(src: &str, dst: &str) -> Tuple {
        Tuple::new(src.parse().unwrap(), dst.parse().unwrap())
    }

    /// CTA_TUPLE_ORIG (`kind` 1) or CTA_TUPLE_REPLY (2), nested: CTA_TUPLE_IP
    /// (CTA_IP_V4_SRC, CTA_IP_V4_DST), then CTA_TUPLE_PROTO (CTA_PROTO_NUM 6,
    /// the ports big endian).
    fn tuple_bytes(kind: u8, src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut b = vec![52, 0, kind, 0x80, 20, 0, 0x01, 0x80, 8, 0, 1, 0];
        b.extend(src);
        b.extend([8, 0, 2, 0]);
        b.extend(dst);
        b.extend([28, 0, 0x02, 0x80, 5, 0, 1, 0, 6, 0, 0, 0, 6, 0, 2, 0]);
        b.extend(sport.to_be_bytes());
        b.extend([0, 0, 6, 0, 3, 0]);
        b.extend(dport.to_be_bytes());
        b.extend([0, 0]);
        b
    }

    /// An nlmsghdr of type (NFNL_SUBSYS_CTNETLINK << 8) | `message`, seq 7,
    /// and an nfgenmsg for AF_INET, then `body`.
    fn ctnetlink(message: u8, flags: u8, body: &[u8]) -> Vec<u8> {
        let len = (20 + body.len()) as u8;
        let mut b = vec![
            len, 0, 0, 0, message, 0x01, flags, 0, 7, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0,
        ];
        b.extend(body);
        b
    }

    /// The request for 10.221.1.2:40700 -> 10.96.0.10:80, byte by byte as
    /// linux/netfilter/nfnetlink_conntrack.h lays it out: CTA_TUPLE_ORIG.
    #[test]
    fn a_get_request_carries_the_tuple_as_ctnetlink_lays_it_out() {
        let bytes = request(&tuple("10.221.1.2:40700", "10.96.0.10:80"), 7);
        let orig = tuple_bytes(1, [10, 221, 1, 2], [10, 96, 0, 10], 40700, 80);
        // IPCTNL_MSG_CT_GET, NLM_F_REQUEST
        assert_eq!(bytes, ctnetlink(1, 1, &orig));
    }

    #[test]
    fn an_answer_gives_both_tuples_and_the_tcp_state() {
        let mut body = tuple_bytes(1, [10, 221, 1, 2], [10, 96, 0, 10], 40700, 80);
        // CTA_TUPLE_REPLY 10.221.2.2:8080 -> 10.221.2.1:40700
        body.extend(tuple_bytes(
            2,
            [10, 221, 2, 2],
            [10, 221, 2, 1],
            8080,
            40700,
        ));
        // CTA_PROTOINFO { CTA_PROTOINFO_TCP { CTA_PROTOINFO_TCP_STATE 8 (CLOSE) } }
        body.extend([16, 0, 0x04, 0x80, 12, 0, 0x01, 0x80, 5, 0, 1, 0, 8, 0, 0, 0]);
        // CTA_STATUS, ignored
        body.extend([8, 0, 3, 0, 0, 0, 0x01, 0xb8]);
        // IPCTNL_MSG_CT_NEW, as the kernel answers a GET
        let entry = decode(&ctnetlink(0, 0, &body)).unwrap().unwrap();
        assert_eq!(entry.original, tuple("10.221.1.2:40700", "10.96.0.10:80"));
        assert_eq!(entry.reply, tuple("10.221.2.2:8080", "10.221.2.1:40700"));
        assert_eq!(entry.tcp_state_name(), Some("CLOSE"));
        assert!(entry.natted());
    }

    #[test]
    fn the_invalid_counts_of_every_cpu_add_up() {
        // One IPCTNL_MSG_CT_GET_STATS_CPU answer (NLM_F_MULTI) for CPU
        // `cpu`: CTA_STATS_FOUND 1000, CTA_STATS_INVALID `invalid`.
        let cpu = |cpu: u8, invalid: u32| {
            let mut b = vec![
                36, 0, 0, 0, 4, 1, 2, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, cpu,
            ];
            b.extend([8, 0, 2, 0, 0, 0, 0x03, 0xe8, 8, 0, 4, 0]);
            b.extend(invalid.to_be_bytes());
            b
        };
        let mut first = cpu(0, 3);
        first.extend(cpu(1, 4));
        let mut total = 0;
        assert!(!add_invalid(&first, &mut total).unwrap());
        // NLMSG_DONE
        let done = [20, 0, 0, 0, 3, 0, 2, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(add_invalid(&done, &mut total).unwrap());
        assert_eq!(total, 7);
    }

    #[test]
    fn a_lookup_the_worker_has_no_room_for_is_skipped_and_counted() {
        // A worker that takes one lookup and is busy with it.
        let (asks, asked) = sync_channel(1);
        let mut conntrack = Conntrack::new(asks, Arc::default());
        let lookup = [tuple("10.0.0.1:1", "10.0.0.2:2")];
        let now = Instant::now();
        // Conntrack holds entries somewhere: every skip counts at once.
        conntrack.heard(&answer(true), now);
        assert!(conntrack.ask(1, &lookup, now));
        assert!(!conntrack.ask(2, &lookup, now));
        assert_eq!(conntrack.stats.skipped.load(Ordering::Relaxed), 1);
        assert_eq!(asked.recv().unwrap().id, 1);
        // Out of tokens, however empty the queue.
        conntrack.tokens = 0.0;
        assert!(!conntrack.ask(3, &lookup, now));
        assert_eq!(conntrack.stats.skipped.load(Ordering::Relaxed), 2);
        // A token back after 1/LOOKUPS_PER_SEC; a clock read earlier than
        // the last one takes none back.
        let later = now + Duration::from_secs_f64(1.0 / LOOKUPS_PER_SEC);
        assert!(conntrack.ask(4, &lookup, later));
        assert_eq!(asked.recv().unwrap().id, 4);
        assert!(!conntrack.ask(5, &lookup, now));
        assert!(!conntrack.ask(6, &lookup, later));
        assert_eq!(conntrack.stats.skipped.load(Ordering::Relaxed), 4);
    }

    fn answer(in_use: bool) -> Answer {
        Answer {
            id: 0,
            found: None,
            in_use,
        }
    }

    /// A skip counts where some namespace's conntrack held entries: it had
    /// something to find. Before any answer it waits for one.
    #[test]
    fn skips_count_only_where_conntrack_holds_entries() {
        // A worker that takes nothing: every lookup is skipped.
        let (asks, _asked) = sync_channel(0);
        let mut conntrack = Conntrack::new(asks, Arc::default());
        let skipped = |c: &Conntrack| c.stats.skipped.load(Ordering::Relaxed);
        let lookup = [tuple("10.0.0.1:1", "10.0.0.2:2")];
        let now = Instant::now();
        // A storm's start: judged by the answer that comes next.
        assert!(!conntrack.ask(1, &lookup, now));
        assert!(!conntrack.ask(2, &lookup, now));
        assert_eq!(skipped(&conntrack), 0);
        conntrack.heard(&answer(false), now);
        assert_eq!(skipped(&conntrack), 0);
        // Within UNUSED_FOR of an answer that found conntrack empty
        // everywhere: nothing to find.
        assert!(!conntrack.ask(3, &lookup, now + UNUSED_FOR / 2));
        assert_eq!(skipped(&conntrack), 0);
        // Past it, judged again by the next answer, which found entries.
        let after = now + UNUSED_FOR;
        assert!(!conntrack.ask(4, &lookup, after));
        assert!(!conntrack.ask(5, &lookup, after));
        assert_eq!(skipped(&conntrack), 0);
        conntrack.heard(&answer(true), after);
        assert_eq!(skipped(&conntrack), 2);
        assert!(!conntrack.ask(6, &lookup, after));
        assert_eq!(skipped(&conntrack), 3);
        // Stopping counts what no answer judged.
        let last = after + UNUSED_FOR;
        assert!(!conntrack.ask(7, &lookup, last));
        assert_eq!(skipped(&conntrack), 3);
        conntrack.finish();
        assert_eq!(skipped(&conntrack), 4);
    }

    #[test]
    fn the_global_stats_give_the_entries() {
        // IPCTNL_MSG_CT_GET_STATS: CTA_STATS_GLOBAL_ENTRIES 42, then
        // CTA_STATS_GLOBAL_MAX_ENTRIES 262144.
        let body = [8, 0, 1, 0, 0, 0, 0, 42, 8, 0, 2, 0, 0, 4, 0, 0];
        assert_eq!(decode_entries(&ctnetlink(5, 0, &body)).unwrap(), 42);
        let without = decode_entries(&ctnetlink(5, 0, &body[8..])).unwrap_err();
        assert_eq!(without.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn no_entry_is_none_and_other_errors_are_errors() {
        let error = |errno: i32| {
            let mut bytes = vec![36, 0, 0, 0, 2, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0];
            bytes.extend((-errno).to_le_bytes());
            // The request's header, echoed back.
            bytes.extend([20, 0, 0, 0, 1, 1, 1, 0, 7, 0, 0, 0, 0, 0, 0, 0]);
            decode(&bytes)
        };
        assert_eq!(error(libc::ENOENT).unwrap(), None);
        let err = error(libc::EPERM).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    }

    #[test]
    fn an_entry_without_nat_is_its_reply_turned_around() {
        let plain = Entry {
            original: tuple("10.0.0.1:1000", "10.0.0.2:80"),
            reply: tuple("10.0.0.2:80", "10.0.0.1:1000"),
            tcp_state: Some(3),
        };
        assert!(!plain.natted());
    }

    /// A real lookup in a namespace of its own, against an entry the
    /// kernel made for a DNAT'd connection there.
    #[test]
    fn finds_a_dnat_entry_in_a_namespace() {
        use crate::host::netns::testing::TestNetns;
        let ns = TestNetns::create();
        let nft = |rule: &str| {
            let status = std::process::Command::new("ip")
                .args(["netns", "exec", &ns.0.name, "nft", rule])
                .status()
                .unwrap();
            assert!(status.success(), "nft {rule}");
        };
        nft("add table ip tcprst_ut");
        nft("add chain ip tcprst_ut out { type nat hook output priority -100; }");
        nft("add rule ip tcprst_ut out tcp dport 80 dnat to 127.0.0.1:8080");
        let (tx, rx) = (
            std::net::SocketAddr::from(([127, 0, 0, 1], 40700)),
            std::net::SocketAddr::from(([127, 0, 0, 9], 80)),
        );
        let found = crate::host::netns::in_netns(&ns.0, || {
            let listener = std::net::TcpListener::bind("127.0.0.1:8080").unwrap();
            let sock =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            sock.bind(&tx.into()).unwrap();
            sock.connect(&rx.into()).unwrap();
            let _accepted = listener.accept().unwrap();
            get(&super::ctnetlink().unwrap(), &Tuple::new(tx, rx)).unwrap()
        })
        .unwrap()
        .expect("the DNAT'd connection's entry");
        assert_eq!(found.original, Tuple::new(tx, rx));
        assert_eq!(found.reply, tuple("127.0.0.1:8080", "127.0.0.1:40700"));
        assert_eq!(found.tcp_state_name(), Some("ESTABLISHED"));
        // Looked up from this thread, through the namespace's socket.
        let socket = crate::host::netns::in_netns(&ns.0, super::ctnetlink).unwrap();
        let socket = socket.unwrap();
        assert!(entries(&socket).unwrap() >= 1, "the entry is counted");
        // Through a table counted empty before the connection came: it is
        // counted again, and asked.
        let mut tables = [Table {
            ns: ns.0.clone(),
            socket: Ok(socket),
            empty: true,
        }];
        let (answer, error) = find(&mut tables, &[Tuple::new(tx, rx)]);
        assert_eq!(error, None);
        assert!(!tables[0].empty);
        let answer = answer.expect("found in the namespace");
        assert_eq!(answer.netns, ns.0.inode);
        // Nothing here was INVALID, and the counter says so.
        assert_eq!(answer.invalid, Some(0));
    }

    /// A table outlives a listing while its namespace is listed, and goes
    /// with the first listing that no longer has it: its socket would keep
    /// a deleted namespace alive.
    #[test]
    fn a_namespace_keeps_its_table_while_listed() {
        use std::os::fd::AsRawFd as _;

        use crate::host::netns::testing::TestNetns;
        let socket_of = |tables: &Tables, inode: u32| {
            let table = tables.all.iter().find(|t| t.ns.inode == inode)?;
            Some(table.socket.as_ref().expect("a socket").as_raw_fd())
        };
        let ns = TestNetns::create();
        let inode = ns.0.inode;
        let first = Tables::relist(None, Instant::now());
        let fd = socket_of(&first, inode).expect("a table for the new namespace");
        // Nothing ever went through its conntrack.
        let table = first.all.iter().find(|t| t.ns.inode == inode).unwrap();
        assert!(table.empty);
        let second = Tables::relist(Some(first), Instant::now());
        assert_eq!(socket_of(&second, inode), Some(fd), "the same socket, kept");
        drop(ns);
        let third = Tables::relist(Some(second), Instant::now());
        assert_eq!(socket_of(&third, inode), None);
    }
}
