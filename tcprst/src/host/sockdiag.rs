//! TCP sockets as the kernel's sock_diag netlink interface (what `ss` uses)
//! lists them, with the timer each one has pending.

use std::{mem::size_of, net::SocketAddr, os::fd::RawFd, time::Duration};

use anyhow::{Context as _, Result, bail};
use netlink_packet_core::{
    Emitable as _, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SOCK_DIAG_BY_FAMILY, SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, InetResponseHeader, SocketId, SocketIdBuffer, StateFlags},
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};

use tcprst_common::CloseMark;

use crate::model::event::TcpState;

/// One TCP socket from a sock_diag dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiagSocket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: TcpState,
    /// 0 for orphaned sockets, which no process holds any more.
    pub inode: u64,
    pub uid: u32,
    pub cookie: u64,
    /// `idiag_rqueue`: bytes not yet read; for a listener, the connections
    /// waiting in its accept queue.
    pub rqueue: u32,
    /// `idiag_wqueue`: bytes not yet acknowledged; for a listener, its
    /// backlog (what listen() asked for, capped by net.core.somaxconn).
    pub wqueue: u32,
    pub timer: Option<Timer>,
    /// `sk_shutdown` (`INET_DIAG_SHUTDOWN`).
    pub shutdown: Option<u8>,
    /// The socket's cgroup v2 id (`INET_DIAG_CGROUP_ID`, 5.7+).
    pub cgroup_id: Option<u64>,
    /// The socket's close mark, when the dump asked for the map's storage.
    pub mark: Option<CloseMark>,
    /// How long ago the peer's last ACK came (`tcp_info.tcpi_last_ack_recv`),
    /// when the dump asked for `tcp_info`. Every segment a peer sends
    /// carries an ACK the socket takes in, its FIN too: so in FIN_WAIT2 and
    /// CLOSE_WAIT, whose start was such a segment (the ACK of our FIN, the
    /// peer's FIN), this is at most the time since the state began, and
    /// equal to it while the peer has been silent since. Timewait sockets
    /// have none.
    pub last_ack_recv: Option<Duration>,
}

/// What a dump asks the kernel to add to each socket.
#[derive(Debug, Clone, Copy, Default)]
pub struct DumpExtras {
    /// The close-mark map (`BPF_MAP_TYPE_SK_STORAGE`) whose value for each
    /// socket the kernel should add (`INET_DIAG_REQ_SK_BPF_STORAGES`).
    pub marks_fd: Option<RawFd>,
    /// Whether to ask for each socket's `tcp_info` (`INET_DIAG_INFO`), for
    /// `DiagSocket::last_ack_recv`. The kernel takes each socket's lock
    /// to fill it in, so only scans of half-closed sockets ask.
    pub tcp_info: bool,
}

/// The message type of the dump request that predates SOCK_DIAG_BY_FAMILY
/// (linux/inet_diag.h).
const TCPDIAG_GETSOCK: u16 = 18;
// Request and reply attributes (linux/inet_diag.h, linux/sock_diag.h).
const INET_DIAG_REQ_SK_BPF_STORAGES: u16 = 2;
const INET_DIAG_INFO: u16 = 2;
const SK_DIAG_BPF_STORAGE_REQ_MAP_FD: u16 = 1;
const INET_DIAG_SHUTDOWN: u16 = 8;
const INET_DIAG_SK_BPF_STORAGES: u16 = 20;
const INET_DIAG_CGROUP_ID: u16 = 21;
const SK_DIAG_BPF_STORAGE: u16 = 1;
const SK_DIAG_BPF_STORAGE_MAP_VALUE: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
/// `struct inet_diag_msg`, before the attributes.
const INET_DIAG_MSG_LEN: usize = 72;
/// Where `tcpi_last_ack_recv` (u32 milliseconds) lies in `struct tcp_info`,
/// the same in every kernel: the struct only grows at its end.
const TCPI_LAST_ACK_RECV: usize = 56;

/// Netlink attributes in `bytes`: (type, payload), padding skipped.
fn attributes(mut bytes: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16::from_ne_bytes(bytes.get(..2)?.try_into().ok()?));
        let kind = u16::from_ne_bytes(bytes.get(2..4)?.try_into().ok()?) & NLA_TYPE_MASK;
        let payload = bytes.get(4..len)?;
        bytes = bytes.get(len.next_multiple_of(4)..).unwrap_or_default();
        Some((kind, payload))
    })
}

/// One netlink attribute, padded to four bytes.
fn attribute(kind: u16, payload: &[u8]) -> Vec<u8> {
    let len = 4 + payload.len();
    let mut out = Vec::with_capacity(len.next_multiple_of(4));
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(len.next_multiple_of(4), 0);
    out
}

/// The close mark among a socket's dumped BPF storages.
fn mark_in(storages: &[u8]) -> Option<CloseMark> {
    attributes(storages)
        .filter(|(kind, _)| *kind == SK_DIAG_BPF_STORAGE)
        .flat_map(|(_, storage)| attributes(storage))
        .find(|(kind, value)| {
            *kind == SK_DIAG_BPF_STORAGE_MAP_VALUE && value.len() >= size_of::<CloseMark>()
        })
        .map(|(_, value)| {
            // SAFETY: length checked; CloseMark is integers and byte arrays,
            // valid for any bit pattern; read_unaligned copes with alignment.
            unsafe { value.as_ptr().cast::<CloseMark>().read_unaligned() }
        })
}

/// The timer a socket has pending, by `idiag_timer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerKind {
    Retransmit,
    Keepalive,
    TimeWait,
    ZeroWindowProbe,
}

impl TimerKind {
    fn from_kernel(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::Retransmit,
            2 => Self::Keepalive,
            3 => Self::TimeWait,
            4 => Self::ZeroWindowProbe,
            _ => return None,
        })
    }

    fn ss_name(self) -> &'static str {
        match self {
            Self::Retransmit => "on",
            Self::Keepalive => "keepalive",
            Self::TimeWait => "timewait",
            Self::ZeroWindowProbe => "persist",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timer {
    pub kind: TimerKind,
    /// Time left until it fires.
    pub expires: Duration,
    /// Retransmissions for the retransmit timer; probes sent unanswered for
    /// the keepalive and zero-window-probe timers.
    pub retransmits: u8,
}

impl Timer {
    /// The timer as `ss -o` prints it, e.g. `timer:(keepalive,9min59sec,0)`.
    pub fn ss_style(&self) -> String {
        let expires = ss_duration(self.expires.as_millis());
        format!(
            "timer:({},{expires},{})",
            self.kind.ss_name(),
            self.retransmits
        )
    }

    /// Reads the timer from a raw `struct inet_diag_msg`. The timer that
    /// netlink-packet-sock-diag parses drops idiag_retrans of keepalive and
    /// persist timers and idiag_expires of TIME_WAIT, so the fields are read here.
    fn from_inet_diag_msg(msg: &[u8]) -> Option<Self> {
        // family, state, timer and retrans bytes, then the socket id.
        const EXPIRES: usize = 4 + size_of::<SocketIdBuffer>();
        let expires = msg.get(EXPIRES..EXPIRES + 4)?.try_into().ok()?;
        Some(Self {
            kind: TimerKind::from_kernel(*msg.get(2)?)?,
            expires: Duration::from_millis(u32::from_ne_bytes(expires).into()),
            retransmits: *msg.get(3)?,
        })
    }
}

/// iproute2's print_ms_timer(): precision drops as the time grows, below ten
/// seconds a fractional second is "S.MMMms" (1.684s prints "1.684ms"), and a
/// timer already due prints as nothing ("timer:(on,,0)").
fn ss_duration(ms: u128) -> String {
    let (minutes, secs, msecs) = (ms / 60_000, ms / 1000 % 60, ms % 1000);
    match (minutes, secs, msecs) {
        (10.., _, _) | (1.., 0, _) => format!("{minutes}min"),
        (1.., _, _) => format!("{minutes}min{secs}sec"),
        (0, 10.., _) | (0, 1.., 0) => format!("{secs}sec"),
        (0, 1.., _) => format!("{secs}.{msecs:03}ms"),
        (0, 0, 1..) => format!("{msecs:03}ms"),
        (0, 0, 0) => String::new(),
    }
}

/// Every IPv4 and IPv6 TCP socket in one of `states`, in the calling thread's
/// network namespace (see `netns::in_netns`).
pub fn dump_tcp(states: &[TcpState]) -> Result<Vec<DiagSocket>> {
    dump_tcp_with(states, DumpExtras::default())
}

/// The scans' dump: every half-closed TCP socket with its `tcp_info`, and,
/// given the close-mark map, each one's marks. `tcprst doctor` asks the
/// same without the map.
pub fn dump_half_closed(marks_fd: Option<RawFd>) -> Result<Vec<DiagSocket>> {
    let extras = DumpExtras {
        marks_fd,
        tcp_info: true,
    };
    dump_tcp_with(&TcpState::HALF_CLOSED, extras)
}

/// `dump_tcp`, with what `extras` asks the kernel to add.
///
/// The kernel answers a dump by walking its whole table of TCP sockets,
/// TIME_WAIT included and every namespace's, and a SOCK_DIAG_BY_FAMILY
/// request walks it once per family: with 131,000 TIME_WAIT sockets, 20 ms
/// each, in every namespace a scan visits. The older TCPDIAG_GETSOCK
/// request walks it once for both, so that is asked first. It takes no BPF
/// storage request, so with `--history` (`marks_fd`), or where a kernel
/// refuses it, each family is dumped on its own.
pub fn dump_tcp_with(states: &[TcpState], extras: DumpExtras) -> Result<Vec<DiagSocket>> {
    let states = states
        .iter()
        .fold(0, |mask, &state| mask | 1 << state as u32);
    if extras.marks_fd.is_none() {
        match dump(&both_families_request(states, extras.tcp_info)) {
            Ok(sockets) => return Ok(sockets),
            Err(e) => log::debug!("one sock_diag dump for both families: {e:#}; dumping each"),
        }
    }
    let mut sockets = dump(&dump_request(AF_INET, states, extras))?;
    sockets.extend(dump(&dump_request(AF_INET6, states, extras))?);
    Ok(sockets)
}

/// The sockets one dump `request` lists, on a netlink socket of its own:
/// a dump that failed partway leaves no replies behind for the next one.
fn dump(request: &[u8]) -> Result<Vec<DiagSocket>> {
    let socket = Socket::new(NETLINK_SOCK_DIAG).context("opening a sock_diag netlink socket")?;
    socket
        .send_to(request, &NetlinkAddr::new(0, 0), 0)
        .context("sending the sock_diag dump request")?;
    let mut sockets = Vec::new();
    receive_dump(&socket, &mut sockets)?;
    Ok(sockets)
}

/// What a dump asks the kernel to add to each socket's reply.
fn extensions(tcp_info: bool) -> ExtensionFlags {
    if tcp_info {
        ExtensionFlags::INFO
    } else {
        ExtensionFlags::empty()
    }
}

fn dump_request(family: u8, states: u32, extras: DumpExtras) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let request = InetRequest {
        family,
        protocol: IPPROTO_TCP,
        extensions: extensions(extras.tcp_info),
        // StateFlags has no NEW_SYN_RECV or BOUND_INACTIVE; the kernel does.
        states: StateFlags::from_bits_retain(states),
        socket_id: if family == AF_INET {
            SocketId::new_v4()
        } else {
            SocketId::new_v6()
        },
    };
    let mut message = NetlinkMessage::new(header, SockDiagMessage::InetRequest(request).into());
    message.finalize();
    let mut buf = vec![0; message.buffer_len()];
    message.serialize(&mut buf);
    if let Some(fd) = extras.marks_fd {
        let map = attribute(SK_DIAG_BPF_STORAGE_REQ_MAP_FD, &(fd as u32).to_ne_bytes());
        buf.extend(attribute(
            INET_DIAG_REQ_SK_BPF_STORAGES | NLA_F_NESTED,
            &map,
        ));
        // nlmsg_len covers the attributes too.
        let len = buf.len() as u32;
        buf[..4].copy_from_slice(&len.to_ne_bytes());
    }
    buf
}

/// `TCPDIAG_GETSOCK` (linux/inet_diag.h) with a `struct inet_diag_req`:
/// a dump of every TCP socket in one of `states` (a mask of `1 << state`),
/// both families in one walk (the kernel dumps it as AF_UNSPEC).
fn both_families_request(states: u32, tcp_info: bool) -> Vec<u8> {
    // nlmsghdr, then the request: family, source and destination lengths,
    // extensions; a zeroed `inet_diag_sockid` (48 bytes); states; dbs.
    const LEN: usize = 16 + 4 + 48 + 4 + 4;
    let mut buf = Vec::with_capacity(LEN);
    buf.extend_from_slice(&(LEN as u32).to_ne_bytes());
    buf.extend_from_slice(&TCPDIAG_GETSOCK.to_ne_bytes());
    buf.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    buf.extend_from_slice(&[0; 8]); // sequence number and port id
    buf.extend_from_slice(&[AF_INET, 0, 0, extensions(tcp_info).bits()]);
    buf.extend_from_slice(&[0; 48]);
    buf.extend_from_slice(&states.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf
}

/// Reads replies until NLMSG_DONE; each datagram packs several messages.
fn receive_dump(socket: &Socket, sockets: &mut Vec<DiagSocket>) -> Result<()> {
    loop {
        let (mut datagram, _) = socket
            .recv_from_full()
            .context("reading the sock_diag dump")?;
        let mut rest = datagram.as_mut_slice();
        while !rest.is_empty() {
            // Replies to TCPDIAG_GETSOCK carry its type around the same
            // `inet_diag_msg` a SOCK_DIAG_BY_FAMILY reply holds, which is
            // the type the netlink crate decodes.
            if rest.get(4..6) == Some(&TCPDIAG_GETSOCK.to_ne_bytes()[..]) {
                rest[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
            }
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(rest)
                .context("decoding the sock_diag dump")?;
            let len = message.header.length as usize;
            match message.payload {
                NetlinkPayload::Done(done) if done.code != 0 => {
                    let err = std::io::Error::from_raw_os_error(-done.code);
                    bail!("sock_diag dump failed: {err}");
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(err) => bail!("sock_diag dump refused: {err}"),
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    let raw = &rest[message.header.buffer_len()..len];
                    sockets.push(DiagSocket::new(&response.header, raw)?);
                }
                _ => {}
            }
            rest = rest.get_mut(len.next_multiple_of(4)..).unwrap_or_default();
        }
    }
}

impl DiagSocket {
    fn new(header: &InetResponseHeader, raw: &[u8]) -> Result<Self> {
        let id = &header.socket_id;
        let Some(state) = TcpState::from_kernel(header.state) else {
            bail!("sock_diag reported unknown TCP state {}", header.state);
        };
        Ok(Self {
            // Dual-stack sockets report IPv4 peers as ::ffff:a.b.c.d.
            local: SocketAddr::new(id.source_address.to_canonical(), id.source_port),
            remote: SocketAddr::new(id.destination_address.to_canonical(), id.destination_port),
            state,
            inode: header.inode.into(),
            uid: header.uid,
            cookie: cookie(id.cookie),
            rqueue: header.recv_queue,
            wqueue: header.send_queue,
            timer: Timer::from_inet_diag_msg(raw),
            shutdown: None,
            cgroup_id: None,
            mark: None,
            last_ack_recv: None,
        }
        .with_attributes(raw.get(INET_DIAG_MSG_LEN..).unwrap_or_default()))
    }

    fn with_attributes(mut self, attrs: &[u8]) -> Self {
        for (kind, payload) in attributes(attrs) {
            match kind {
                INET_DIAG_SHUTDOWN => self.shutdown = payload.first().copied(),
                INET_DIAG_CGROUP_ID => {
                    self.cgroup_id = payload
                        .get(..8)
                        .and_then(|b| b.try_into().ok())
                        .map(u64::from_ne_bytes)
                }
                INET_DIAG_SK_BPF_STORAGES => self.mark = mark_in(payload),
                INET_DIAG_INFO => {
                    self.last_ack_recv = payload
                        .get(TCPI_LAST_ACK_RECV..TCPI_LAST_ACK_RECV + 4)
                        .and_then(|b| b.try_into().ok())
                        .map(|ms| Duration::from_millis(u32::from_ne_bytes(ms).into()))
                }
                _ => {}
            }
        }
        self
    }
}

/// A listener's accept queue: the connections whose handshake ended,
/// waiting for accept().
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptQueue {
    pub waiting: u32,
    pub backlog: u32,
}

impl AcceptQueue {
    /// Whether a handshake ending now finds no room: the kernel queues one
    /// more than the backlog (sk_acceptq_is_full() compares with `>`).
    pub fn full(&self) -> bool {
        self.waiting > self.backlog
    }
}

/// The accept queue that connections to `local` go to, among `listeners`:
/// a listener bound to that address before one bound to any address of its
/// family, before an IPv6 one taking IPv4 too; among equals (SO_REUSEPORT)
/// a full one, since that is the one a reset came from.
pub fn accept_queue_for(listeners: &[DiagSocket], local: SocketAddr) -> Option<AcceptQueue> {
    let rank = |l: &DiagSocket| {
        let ip = l.local.ip();
        if l.state != TcpState::Listen || l.local.port() != local.port() {
            None
        } else if ip == local.ip() {
            Some(2)
        } else if ip.is_unspecified() && ip.is_ipv4() == local.is_ipv4() {
            Some(1)
        } else if ip.is_unspecified() && ip.is_ipv6() {
            Some(0)
        } else {
            None
        }
    };
    listeners
        .iter()
        .filter_map(|l| {
            let queue = AcceptQueue {
                waiting: l.rqueue,
                backlog: l.wqueue,
            };
            Some(((rank(l)?, queue.full()), queue))
        })
        .max_by_key(|(order, _)| *order)
        .map(|(_, queue)| queue)
}

/// sock_diag_save_cookie() stores the cookie as two host-endian u32s, low
/// half first; this is the value SO_COOKIE and bpf_get_socket_cookie() give.
fn cookie(raw: [u8; 8]) -> u64 {
    let [a, b, c, d, e, f, g, h] = raw;
    u64::from(u32::from_ne_bytes([a, b, c, d])) | u64::from(u32::from_ne_bytes([e, f, g, h])) << 32
}

#[cfg(test)]
mod tests {
    use std::{
        io::Read as _,
        net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener, TcpStream},
        os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
        process::Command,
        time::Instant,
    };

    use socket2::{SockRef, TcpKeepalive};

    use super::*;
    use crate::{
        host::netns::{in_netns, testing::TestNetns},
        host::owner::SocketOwners,
    };

    /// The reply attributes as the kernel nests them: the mark's value
    /// inside a storage inside INET_DIAG_SK_BPF_STORAGES, padding between.
    #[test]
    fn reads_shutdown_cgroup_and_the_close_mark() {
        let mark = CloseMark {
            op_at_ns: 5,
            tgid: 7,
            op: 1,
            how: 1,
            first_state: 1,
            steps: 1,
            comm: *b"socat\0\0\0\0\0\0\0\0\0\0\0",
            step_state: [4, 0, 0, 0, 0, 0, 0, 0],
            step_at_ns: [5, 0, 0, 0, 0, 0],
        };
        // SAFETY: a plain repr(C) value viewed as bytes for the test.
        let value = unsafe {
            std::slice::from_raw_parts((&raw const mark).cast::<u8>(), size_of::<CloseMark>())
        };
        let storage = [
            attribute(2, &42u32.to_ne_bytes()), // SK_DIAG_BPF_STORAGE_MAP_ID
            attribute(1, &[]),                  // SK_DIAG_BPF_STORAGE_PAD
            attribute(SK_DIAG_BPF_STORAGE_MAP_VALUE, value),
        ]
        .concat();
        let storages = attribute(SK_DIAG_BPF_STORAGE | NLA_F_NESTED, &storage);
        // A tcp_info whose last ACK came 1.234 s ago.
        let mut info = [0u8; 248];
        info[56..60].copy_from_slice(&1234u32.to_ne_bytes());
        let attrs = [
            attribute(INET_DIAG_INFO, &info),
            attribute(INET_DIAG_SHUTDOWN, &[2]),
            attribute(INET_DIAG_CGROUP_ID, &9001u64.to_ne_bytes()),
            attribute(INET_DIAG_SK_BPF_STORAGES | NLA_F_NESTED, &storages),
        ]
        .concat();
        let socket = DiagSocket {
            local: "127.0.0.1:1".parse().unwrap(),
            remote: "127.0.0.1:2".parse().unwrap(),
            state: TcpState::FinWait2,
            inode: 1,
            uid: 0,
            cookie: 0,
            rqueue: 0,
            wqueue: 0,
            timer: None,
            shutdown: None,
            cgroup_id: None,
            mark: None,
            last_ack_recv: None,
        }
        .with_attributes(&attrs);
        assert_eq!(socket.shutdown, Some(2));
        assert_eq!(socket.cgroup_id, Some(9001));
        assert_eq!(socket.mark, Some(mark));
        assert_eq!(socket.last_ack_recv, Some(Duration::from_millis(1234)));
        // One too short to hold the time is none.
        let short = attribute(INET_DIAG_INFO, &info[..56]);
        assert_eq!(socket.with_attributes(&short).last_ack_recv, None);
        // A truncated value is no mark.
        let short = attribute(SK_DIAG_BPF_STORAGE_MAP_VALUE, &value[..10]);
        let storages = attribute(SK_DIAG_BPF_STORAGE, &short);
        assert_eq!(mark_in(&storages), None);
    }

    fn listener(local: &str, waiting: u32, backlog: u32) -> DiagSocket {
        DiagSocket {
            local: local.parse().unwrap(),
            remote: "0.0.0.0:0".parse().unwrap(),
            state: TcpState::Listen,
            inode: 1,
            uid: 0,
            cookie: 0,
            rqueue: waiting,
            wqueue: backlog,
            timer: None,
            shutdown: None,
            cgroup_id: None,
            mark: None,
            last_ack_recv: None,
        }
    }

    #[test]
    fn the_listener_bound_nearest_the_address_takes_its_connections() {
        let queue = |listeners: &[DiagSocket], local: &str| {
            accept_queue_for(listeners, local.parse().unwrap()).map(|q| (q.waiting, q.backlog))
        };
        let listeners = [
            listener("[::]:8080", 1, 10),
            listener("0.0.0.0:8080", 2, 20),
            listener("10.0.0.1:8080", 3, 30),
            listener("10.0.0.1:9090", 4, 40),
        ];
        assert_eq!(queue(&listeners, "10.0.0.1:8080"), Some((3, 30)));
        assert_eq!(queue(&listeners, "10.0.0.2:8080"), Some((2, 20)));
        assert_eq!(queue(&listeners[..1], "10.0.0.2:8080"), Some((1, 10)));
        assert_eq!(queue(&listeners, "[fd00::1]:8080"), Some((1, 10)));
        assert_eq!(queue(&listeners[1..], "[fd00::1]:8080"), None);
        assert_eq!(queue(&listeners, "10.0.0.1:7070"), None);
        // SO_REUSEPORT: of two on one address, the full one reset.
        let reuseport = [
            listener("0.0.0.0:8080", 0, 1),
            listener("0.0.0.0:8080", 2, 1),
        ];
        assert_eq!(queue(&reuseport, "10.0.0.1:8080"), Some((2, 1)));
    }

    /// A listener whose application never accepts: sock_diag gives its
    /// queue's length and backlog where it gives others their unread and
    /// unacknowledged bytes.
    #[test]
    fn dumps_a_listeners_accept_queue() {
        let netns = TestNetns::create();
        let (addr, _held) = in_netns(&netns.0, || {
            let listener =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            listener
                .bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
                .unwrap();
            listener.listen(3).unwrap();
            let addr = listener.local_addr().unwrap().as_socket().unwrap();
            let clients = [
                TcpStream::connect(addr).unwrap(),
                TcpStream::connect(addr).unwrap(),
            ];
            (addr, (listener, clients))
        })
        .unwrap();
        let queue = || {
            in_netns(&netns.0, || dump_tcp(&[TcpState::Listen]))
                .unwrap()
                .map(|listeners| accept_queue_for(&listeners, addr))
                .unwrap()
        };
        let expected = Some(AcceptQueue {
            waiting: 2,
            backlog: 3,
        });
        // The server side ends each handshake a moment after connect() returns.
        let deadline = Instant::now() + Duration::from_secs(2);
        while queue() != expected && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(queue(), expected);
    }

    #[test]
    fn formats_timers_like_ss() {
        // Printed by `ss -to` (iproute2 6.1) for crafted inet_diag_msg records
        // fed to it through $TCPDIAG_FILE.
        use TimerKind::*;
        let cases = [
            (Retransmit, 0, 0, "timer:(on,,0)"),
            (Retransmit, 1, 0, "timer:(on,001ms,0)"),
            (Retransmit, 999, 0, "timer:(on,999ms,0)"),
            (Retransmit, 1000, 255, "timer:(on,1sec,255)"),
            (Retransmit, 1010, 0, "timer:(on,1.010ms,0)"),
            (Retransmit, 1684, 2, "timer:(on,1.684ms,2)"),
            (Retransmit, 9999, 0, "timer:(on,9.999ms,0)"),
            (Retransmit, 10_500, 0, "timer:(on,10sec,0)"),
            (Keepalive, 59_000, 0, "timer:(keepalive,59sec,0)"),
            (Retransmit, 59_999, 0, "timer:(on,59sec,0)"),
            (Retransmit, 60_500, 0, "timer:(on,1min,0)"),
            (Retransmit, 61_500, 0, "timer:(on,1min1sec,0)"),
            (Retransmit, 599_999, 0, "timer:(on,9min59sec,0)"),
            (Retransmit, 659_999, 0, "timer:(on,10min,0)"),
            (Retransmit, 7_200_000, 0, "timer:(on,120min,0)"),
            (Retransmit, u32::MAX.into(), 0, "timer:(on,71582min,0)"),
            (TimeWait, 59_000, 0, "timer:(timewait,59sec,0)"),
            (ZeroWindowProbe, 500, 3, "timer:(persist,500ms,3)"),
        ];
        for (kind, ms, retransmits, expected) in cases {
            let timer = Timer {
                kind,
                expires: Duration::from_millis(ms),
                retransmits,
            };
            assert_eq!(timer.ss_style(), expected, "{ms}ms");
        }
    }

    #[test]
    fn decodes_cookie_halves() {
        let raw = [0x11223344u32.to_ne_bytes(), 0x55667788u32.to_ne_bytes()].concat();
        assert_eq!(cookie(raw.try_into().unwrap()), 0x5566_7788_1122_3344);
    }

    /// A connection whose client has closed: the accepted end, returned, is
    /// in CLOSE_WAIT until dropped. Also returns the client's local and peer
    /// addresses, which are what the server end's remote and local must be.
    fn close_wait(listen: IpAddr, connect: IpAddr) -> (TcpStream, SocketAddr, SocketAddr) {
        let listener = TcpListener::bind((listen, 0)).unwrap();
        let client = TcpStream::connect((connect, listener.local_addr().unwrap().port())).unwrap();
        let (client_local, client_peer) =
            (client.local_addr().unwrap(), client.peer_addr().unwrap());
        let (mut server, _) = listener.accept().unwrap();
        drop(client);
        // End of stream means the FIN arrived, so the state is CLOSE_WAIT.
        assert_eq!(server.read(&mut [0; 1]).unwrap(), 0);
        (server, client_local, client_peer)
    }

    fn socket_inode(stream: &TcpStream) -> u64 {
        std::fs::metadata(format!("/proc/self/fd/{}", stream.as_raw_fd()))
            .unwrap()
            .ino()
    }

    fn dumps_close_wait(listen: IpAddr, connect: IpAddr) {
        let netns = TestNetns::create();
        let (server, client_local, client_peer) =
            in_netns(&netns.0, || close_wait(listen, connect)).unwrap();
        let quiet = Duration::from_millis(300);
        std::thread::sleep(quiet);

        let with_info = DumpExtras {
            tcp_info: true,
            ..DumpExtras::default()
        };
        let dump = in_netns(&netns.0, || {
            dump_tcp_with(&[TcpState::CloseWait], with_info)
        })
        .unwrap()
        .unwrap();

        let [found] = dump.as_slice() else {
            panic!("expected one CLOSE_WAIT socket, got {dump:?}");
        };
        let expected = DiagSocket {
            local: client_peer,
            remote: client_local,
            state: TcpState::CloseWait,
            inode: socket_inode(&server),
            // SAFETY: geteuid has no preconditions and cannot fail.
            uid: unsafe { libc::geteuid() },
            cookie: SockRef::from(&server).cookie().unwrap(),
            rqueue: 0,
            wqueue: 0,
            timer: None,
            // The peer's FIN arrived: RCV_SHUTDOWN.
            shutdown: Some(1),
            cgroup_id: found.cgroup_id,
            mark: None,
            last_ack_recv: found.last_ack_recv,
        };
        assert_eq!(*found, expected);
        // The peer's FIN was the last segment it sent, `quiet` ago (the
        // kernel counts in jiffies: 4 ms at most at HZ=250).
        let since_fin = found.last_ack_recv.expect("tcp_info asked for");
        assert!(
            since_fin >= quiet - Duration::from_millis(10) && since_fin < Duration::from_secs(10),
            "{since_fin:?}"
        );
        assert!(found.cgroup_id.is_some_and(|id| id != 0), "{found:?}");
        assert_ne!(found.inode, 0);
        let owners = SocketOwners::scan();
        assert!(
            owners
                .owners(found.inode)
                .iter()
                .any(|o| o.pid == std::process::id()),
            "{:?}",
            owners.owners(found.inode)
        );
    }

    /// The one-walk request finds both families' sockets, with their
    /// attributes, as the per-family requests do.
    #[test]
    fn one_dump_finds_both_families() {
        let netns = TestNetns::create();
        let v4 = Ipv4Addr::LOCALHOST.into();
        let v6 = Ipv6Addr::LOCALHOST.into();
        let (_v4_server, _, v4_peer) = in_netns(&netns.0, || close_wait(v4, v4)).unwrap();
        let (_v6_server, _, v6_peer) = in_netns(&netns.0, || close_wait(v6, v6)).unwrap();
        let states = 1 << TcpState::CloseWait as u32;
        let dumped = in_netns(&netns.0, || dump(&both_families_request(states, true)))
            .unwrap()
            .unwrap();
        let mut locals: Vec<SocketAddr> = dumped.iter().map(|s| s.local).collect();
        locals.sort();
        assert_eq!(locals, [v4_peer, v6_peer], "{dumped:?}");
        assert!(
            dumped
                .iter()
                .all(|s| s.shutdown == Some(1) && s.last_ack_recv.is_some()),
            "{dumped:?}"
        );
    }

    #[test]
    fn dumps_ipv4_close_wait() {
        dumps_close_wait(Ipv4Addr::LOCALHOST.into(), Ipv4Addr::LOCALHOST.into());
    }

    #[test]
    fn dumps_ipv6_close_wait() {
        dumps_close_wait(Ipv6Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into());
    }

    #[test]
    fn dumps_dual_stack_socket_as_ipv4() {
        dumps_close_wait(Ipv6Addr::UNSPECIFIED.into(), Ipv4Addr::LOCALHOST.into());
    }

    /// An orphaned FIN_WAIT2 socket with the default tcp_fin_timeout becomes
    /// a timewait socket at once; sock_diag still reports it as FIN_WAIT2.
    #[test]
    fn orphaned_client_has_no_inode_and_a_timewait_timer() {
        let netns = TestNetns::create();
        let localhost = Ipv4Addr::LOCALHOST.into();
        let (_server, client_local, client_peer) =
            in_netns(&netns.0, || close_wait(localhost, localhost)).unwrap();
        // The server delays its ACK of the FIN, hoping to send it with data,
        // so the client leaves FIN_WAIT1 only tens of milliseconds later.
        let deadline = Instant::now() + Duration::from_secs(2);
        while in_netns(&netns.0, || dump_tcp(&[TcpState::FinWait2]))
            .unwrap()
            .unwrap()
            .is_empty()
        {
            assert!(Instant::now() < deadline, "client never reached FIN_WAIT2");
            std::thread::sleep(Duration::from_millis(5));
        }

        let (dump, ss) = dump_beside_ss(&netns, TcpState::FinWait2, "fin-wait-2");

        let [found] = dump.as_slice() else {
            panic!("expected one FIN_WAIT2 socket, got {dump:?}");
        };
        assert_eq!((found.local, found.remote), (client_local, client_peer));
        assert_eq!(found.inode, 0);
        let timer = found.timer.expect("timewait timer");
        assert_eq!(timer.kind, TimerKind::TimeWait);
        let fin_timeout = Duration::from_secs(60);
        assert!(
            timer.expires <= fin_timeout && timer.expires > fin_timeout - Duration::from_secs(10),
            "{timer:?}"
        );
        assert!(ss.contains(&timer.ss_style()), "{timer:?} vs ss {ss:?}");
    }

    #[test]
    fn keepalive_timer_matches_ss() {
        let netns = TestNetns::create();
        let localhost = Ipv4Addr::LOCALHOST.into();
        let (server, ..) = in_netns(&netns.0, || close_wait(localhost, localhost)).unwrap();
        let idle = Duration::from_secs(600);
        SockRef::from(&server)
            .set_tcp_keepalive(&TcpKeepalive::new().with_time(idle))
            .unwrap();

        let (dump, ss) = dump_beside_ss(&netns, TcpState::CloseWait, "close-wait");

        let timer = dump[0].timer.expect("keepalive timer");
        assert_eq!(timer.kind, TimerKind::Keepalive);
        assert_eq!(timer.retransmits, 0);
        assert!(
            timer.expires <= idle && timer.expires > idle - Duration::from_secs(10),
            "{timer:?}"
        );
        assert!(ss.contains(&timer.ss_style()), "{timer:?} vs ss {ss:?}");
    }

    /// Dumps `state` in `netns` between two runs of `ss` printing the timer of
    /// the one socket in that state. ss shows these timers in whole seconds,
    /// so ours must equal what it printed just before or just after.
    fn dump_beside_ss(
        netns: &TestNetns,
        state: TcpState,
        ss_state: &str,
    ) -> (Vec<DiagSocket>, [String; 2]) {
        let ss_timer = || {
            let out = Command::new("ss")
                .args(["-tonH", "state", ss_state])
                .output()
                .unwrap();
            let text = String::from_utf8(out.stdout).unwrap();
            let timer = text
                .split_whitespace()
                .find(|word| word.starts_with("timer:("));
            timer
                .unwrap_or_else(|| panic!("no timer in ss output {text:?}"))
                .to_owned()
        };
        in_netns(&netns.0, || {
            let before = ss_timer();
            let dump = dump_tcp(&[state]).unwrap();
            (dump, [before, ss_timer()])
        })
        .unwrap()
    }
}
