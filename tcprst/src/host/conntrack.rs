//! Conntrack entries by tuple, from ctnetlink (IPCTNL_MSG_CT_GET) in every
//! network namespace, for resets whose ends NAT rewrote: a Service's DNAT,
//! masquerading. Conntrack keeps an entry in CLOSE for about ten seconds
//! after a reset, so a lookup moments after one finds it. Where an entry is
//! found, so is how many packets that namespace's conntrack marked INVALID
//! (IPCTNL_MSG_CT_GET_STATS_CPU): the evidence for a reset a
//! `ct state invalid reject` rule sent.
//!
//! Lookups run on a thread of their own, never on the event loop: each
//! enters every namespace (a netlink socket talks to the conntrack table of
//! the namespace it was made in). They are rate limited, so a storm costs a
//! bounded amount; what is skipped or fails is counted.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender, sync_channel},
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
/// IPCTNL_MSG_CT_GET_STATS_CPU in `enum cntl_msg_types`.
const IPCTNL_MSG_CT_GET_STATS_CPU: u8 = 4;

fn stats_request() -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = 2;
    let mut message = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, 0),
            ConntrackMessage::Other {
                message_type: IPCTNL_MSG_CT_GET_STATS_CPU,
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

/// The packets conntrack in the calling thread's network namespace has
/// marked INVALID, summed over CPUs.
pub fn invalid_packets() -> io::Result<u64> {
    let socket = ctnetlink()?;
    socket.send(&stats_request(), 0)?;
    let mut total = 0;
    loop {
        let (datagram, _) = socket.recv_from_full()?;
        if add_invalid(&datagram, &mut total)? {
            return Ok(total);
        }
    }
}

/// The entry with `tuple` in either direction, in the calling thread's
/// network namespace.
pub fn get(tuple: &Tuple) -> io::Result<Option<Entry>> {
    let socket = ctnetlink()?;
    socket.send(&request(tuple, 1), 0)?;
    let (datagram, _) = socket.recv_from_full()?;
    decode(&datagram)
}

/// Lookups no faster than this on average; a storm beyond it is counted as
/// skipped rather than queued.
const LOOKUPS_PER_SEC: f64 = 50.0;
const BURST: f64 = 100.0;
/// Lookups queued for the worker at most.
const QUEUED: usize = 256;
/// How long a list of namespaces is reused.
const NAMESPACES_FOR: Duration = Duration::from_secs(1);
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
}

/// The lookup worker's handle.
pub struct Conntrack {
    asks: SyncSender<Ask>,
    tokens: f64,
    refilled: Instant,
    pub stats: Arc<LookupStats>,
}

impl Conntrack {
    /// Starts the worker; its answers arrive on the returned channel.
    pub fn spawn() -> io::Result<(Self, tokio::sync::mpsc::UnboundedReceiver<Answer>)> {
        let (asks, asked) = sync_channel(QUEUED);
        let (answers, answered) = tokio::sync::mpsc::unbounded_channel();
        let stats = Arc::new(LookupStats::default());
        let worker_stats = stats.clone();
        std::thread::Builder::new()
            .name("conntrack".into())
            .spawn(move || work(&asked, &answers, &worker_stats))?;
        Ok((
            Self {
                asks,
                tokens: BURST,
                refilled: Instant::now(),
                stats,
            },
            answered,
        ))
    }

    /// Asks for a lookup at `now`; false (and counted) when it is skipped.
    /// Each one asked gets exactly one answer. `now` is the caller's clock,
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
        } else {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }
}

fn work(
    asked: &Receiver<Ask>,
    answers: &tokio::sync::mpsc::UnboundedSender<Answer>,
    stats: &LookupStats,
) {
    let mut namespaces: Option<(Instant, Vec<NetnsHandle>)> = None;
    let mut cache: HashMap<Vec<Tuple>, (Instant, Option<Found>)> = HashMap::new();
    let mut warned = false;
    while let Ok(Ask { id, tuples }) = asked.recv() {
        let now = Instant::now();
        let cached = cache
            .get(&tuples)
            .filter(|(at, _)| now.duration_since(*at) < CACHED_FOR)
            .map(|(_, found)| found.clone());
        let found = match cached {
            Some(found) => found,
            None => {
                let fresh = namespaces
                    .as_ref()
                    .is_some_and(|(at, _)| now.duration_since(*at) < NAMESPACES_FOR);
                if !fresh {
                    namespaces = Some((now, netns::all_namespaces()));
                }
                let all = &namespaces.as_ref().expect("just listed").1;
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
        if answers.send(Answer { id, found }).is_err() {
            return;
        }
    }
}

/// The first NAT'd entry for any of `tuples` in any namespace, else the
/// first entry, and the first error met on the way. A namespace gone since
/// it was listed is not an error.
fn find(all: &[NetnsHandle], tuples: &[Tuple]) -> (Option<Found>, Option<String>) {
    let mut error = None;
    let mut plain = None;
    for ns in all {
        let entered = netns::in_netns(ns, || {
            for (by, tuple) in tuples.iter().enumerate() {
                if let Some(entry) = get(tuple)? {
                    // Evidence to go with the entry; its absence is no failure.
                    return Ok(Some((by, entry, invalid_packets().ok())));
                }
            }
            Ok::<_, io::Error>(None)
        });
        match entered {
            Ok(Ok(Some((by, entry, invalid)))) => {
                let found = Found {
                    netns: ns.inode,
                    netns_name: ns.name.clone(),
                    entry,
                    by,
                    invalid,
                };
                if found.entry.natted() {
                    return (Some(found), error);
                }
                plain.get_or_insert(found);
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                error.get_or_insert_with(|| format!("in network namespace {}: {e}", ns.name));
            }
            Err(_) => {}
        }
    }
    (plain, error)
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
        let mut conntrack = Conntrack {
            asks,
            tokens: BURST,
            refilled: Instant::now(),
            stats: Arc::default(),
        };
        let lookup = [tuple("10.0.0.1:1", "10.0.0.2:2")];
        let now = Instant::now();
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
            get(&Tuple::new(tx, rx)).unwrap()
        })
        .unwrap()
        .expect("the DNAT'd connection's entry");
        assert_eq!(found.original, Tuple::new(tx, rx));
        assert_eq!(found.reply, tuple("127.0.0.1:8080", "127.0.0.1:40700"));
        assert_eq!(found.tcp_state_name(), Some("ESTABLISHED"));
        let (answer, error) = find(std::slice::from_ref(&ns.0), &[Tuple::new(tx, rx)]);
        assert_eq!(error, None);
        let answer = answer.expect("found in the namespace");
        assert_eq!(answer.netns, ns.0.inode);
        // Nothing here was INVALID, and the counter says so.
        assert_eq!(answer.invalid, Some(0));
    }
}
