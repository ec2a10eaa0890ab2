//! One-line explanations a user can act on, from what the tracker saw.

use std::{
    borrow::Cow,
    time::{Duration, SystemTime},
};

use crate::{
    host::conntrack::Found,
    host::sockdiag::AcceptQueue,
    model::event::{CloseOp, Label, RstEvent, RstKind, ShutHow, TcpState},
    model::text::{around_addr, short},
    pipeline::tracker::{Connection, Resolved, RstContext},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitingFor {
    /// The ACK of our FIN.
    PeerAck,
    PeerFin,
    /// The local application's close().
    LocalClose,
}

impl WaitingFor {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::PeerAck => "peer_ack",
            Self::PeerFin => "peer_fin",
            Self::LocalClose => "local_close",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    Peer,
    LocalProcess,
}

impl Blame {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Peer => "peer",
            Self::LocalProcess => "local_process",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StuckDiagnosis {
    pub waiting_for: WaitingFor,
    pub blame: Blame,
    pub text: String,
}

fn since(at: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(at).unwrap_or_default()
}

/// Why a half-closed connection is stuck. `owner` names the process holding
/// the socket ("nc[1234]") where it is known.
pub(crate) fn stuck(
    conn: &Connection,
    now: SystemTime,
    owner: Option<&str>,
    fin_timeout: Duration,
) -> StuckDiagnosis {
    let age = since(conn.since, now);
    let age = match (conn.seen_from_start, age < Duration::from_secs(1)) {
        (true, _) => format!(" for {}", short(age)),
        // Found by a snapshot just now: how long it has been so is unknown.
        (false, true) => String::new(),
        (false, false) => format!(" for at least {}", short(age)),
    };
    let state = conn.state.name();
    let by = conn
        .initiator
        .as_ref()
        .map(|i| format!(" after {i}"))
        .unwrap_or_default();
    let (waiting_for, blame, text) = match conn.state {
        TcpState::FinWait2 => {
            let tail = match conn.orphaned {
                Some(false) => {
                    ", and no timer will ever reap this socket because it is not orphaned"
                        .to_owned()
                }
                Some(true) => format!(
                    "; the socket is orphaned, so the kernel reaps it after tcp_fin_timeout ({})",
                    short(fin_timeout)
                ),
                None => String::new(),
            };
            (
                WaitingFor::PeerFin,
                Blame::Peer,
                format!("{state}{age}{by}: the peer never sent FIN{tail}"),
            )
        }
        TcpState::CloseWait => {
            let who = owner.unwrap_or("the application");
            (
                WaitingFor::LocalClose,
                Blame::LocalProcess,
                format!("{state}{age}: the peer closed, and {who} never closed its socket"),
            )
        }
        TcpState::FinWait1 => (
            WaitingFor::PeerAck,
            Blame::Peer,
            format!(
                "{state}{age}{by}: our FIN was never acknowledged; the peer or the path is not responding"
            ),
        ),
        TcpState::LastAck => (
            WaitingFor::PeerAck,
            Blame::Peer,
            format!(
                "{state}{age}{by}: the peer closed first, and the ACK of our FIN never came back"
            ),
        ),
        _ => (
            WaitingFor::PeerAck,
            Blame::Peer,
            format!(
                "{state}{age}{by}: both sides sent FIN at once, and ours was never acknowledged"
            ),
        ),
    };
    StuckDiagnosis {
        waiting_for,
        blame,
        text,
    }
}

pub(crate) fn resolved(r: &Resolved) -> String {
    let how = match (r.stuck_state, r.conn.state) {
        (TcpState::FinWait2, TcpState::Close) if r.conn.peer_fin_at.is_some() => {
            "the peer sent FIN at last".to_owned()
        }
        (TcpState::CloseWait, _) => "the application closed its socket".to_owned(),
        (_, TcpState::Close) => "the connection closed".to_owned(),
        (_, now) => format!("it moved on to {}", now.name()),
    };
    format!(
        "{} resolved after {}: {how}",
        r.stuck_state.name(),
        short(r.stuck_for)
    )
}

/// What caused a reset, as a stable name for machines: the `cause` field
/// of every reset record. The README has one line per value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The peer reset a connection we half-closed with shutdown().
    PeerResetHalfClose,
    /// The peer reset after our close() instead of finishing the close.
    PeerResetClosing,
    /// The peer sent FIN, then reset before we closed (CLOSE_WAIT).
    PeerResetAfterFin,
    /// connect() refused: nothing listens, or a firewall rejected the SYN.
    ConnectionRefused,
    /// The peer or a middlebox aborted an open connection.
    PeerAborted,
    /// The peer reset instead of acknowledging our FIN (LAST_ACK, CLOSING).
    PeerResetFin,
    /// Data arrived on a socket the application had closed, a full one or
    /// the timewait socket an orphan becomes in FIN_WAIT2.
    DataAfterClose,
    /// A segment for a socket that does not exist here.
    NoSocket,
    /// The application closed with unread data.
    UnreadDataOnClose,
    /// SO_LINGER with a zero timeout, or a disconnect.
    AbortiveClose,
    /// A listener closed with connections it never accepted.
    ListenerClosed,
    /// Keepalive probes went unanswered.
    KeepaliveTimeout,
    /// The kernel was out of memory or orphan slots for closed sockets.
    OrphanLimit,
    /// The peer's stack had no socket for an open connection: it
    /// restarted or lost its state.
    PeerLostState,
    /// A handshake ended at a full accept queue, with tcp_abort_on_overflow=1.
    AcceptQueueOverflow,
    /// A segment conntrack marked INVALID skipped reverse NAT and reached a
    /// host with no socket for it (kubernetes#74839).
    NatEscaped,
    /// No socket here sent a received reset, and a conntrack here that
    /// tracks the connection has marked packets INVALID: a `ct state
    /// invalid reject` rule answered in the peer's name.
    ConntrackInvalidRejected,
}

impl Cause {
    #[cfg(test)]
    pub(crate) const ALL: [Self; 17] = [
        Self::PeerResetHalfClose,
        Self::PeerResetClosing,
        Self::PeerResetAfterFin,
        Self::ConnectionRefused,
        Self::PeerAborted,
        Self::PeerResetFin,
        Self::DataAfterClose,
        Self::NoSocket,
        Self::UnreadDataOnClose,
        Self::AbortiveClose,
        Self::ListenerClosed,
        Self::KeepaliveTimeout,
        Self::OrphanLimit,
        Self::PeerLostState,
        Self::AcceptQueueOverflow,
        Self::NatEscaped,
        Self::ConntrackInvalidRejected,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::PeerResetHalfClose => "peer_reset_half_close",
            Self::PeerResetClosing => "peer_reset_closing",
            Self::PeerResetAfterFin => "peer_reset_after_fin",
            Self::ConnectionRefused => "connection_refused",
            Self::PeerAborted => "peer_aborted",
            Self::PeerResetFin => "peer_reset_fin",
            Self::DataAfterClose => "data_after_close",
            Self::NoSocket => "no_socket",
            Self::UnreadDataOnClose => "unread_data_on_close",
            Self::AbortiveClose => "abortive_close",
            Self::ListenerClosed => "listener_closed",
            Self::KeepaliveTimeout => "keepalive_timeout",
            Self::OrphanLimit => "orphan_limit",
            Self::PeerLostState => "peer_lost_state",
            Self::AcceptQueueOverflow => "accept_queue_overflow",
            Self::NatEscaped => "nat_escaped",
            Self::ConntrackInvalidRejected => "conntrack_invalid_rejected",
        }
    }
}

/// Why a reset happened: a cause for machines, a line for people. Most
/// lines name nothing of the reset, so they are borrowed, not copied into
/// a String for every record of a storm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RstDiagnosis {
    pub cause: Cause,
    pub text: Cow<'static, str>,
}

fn because(cause: Cause, text: impl Into<Cow<'static, str>>) -> Option<RstDiagnosis> {
    Some(RstDiagnosis {
        cause,
        text: text.into(),
    })
}

/// A received reset whose send this host saw too says more than the
/// receipt alone: a stack that answered an open connection with NO_SOCKET
/// had lost it (a restarted server, a pod rescheduled behind the same
/// address, a conntrack or NAT change that sent it elsewhere).
pub(crate) fn explained_by_sender(
    ev: &RstEvent,
    sent_reason: Option<&str>,
) -> Option<RstDiagnosis> {
    let open = !matches!(ev.state?, TcpState::SynSent | TcpState::SynRecv);
    (ev.kind == RstKind::Received && open && sent_reason == Some("NO_SOCKET")).then(|| {
        RstDiagnosis {
            cause: Cause::PeerLostState,
            text: format!(
                "the peer {} had no socket for this open connection (its stack answered NO_SOCKET): \
                 it restarted or lost the connection's state, so our next segment met a reset; reconnect",
                ev.remote
            )
        .into(),
        }
    })
}

/// A reset sent with no socket, for a segment that fits the reply tuple of
/// a NAT'd conntrack entry on this host (`fits_reply`): had conntrack
/// tracked that segment, NAT would have given it the original's addresses,
/// so conntrack found it INVALID (out of window, kubernetes#74839) and let
/// it through untranslated.
pub(crate) fn escaped_nat(ev: &RstEvent, found: &Found, fits_reply: bool) -> Option<RstDiagnosis> {
    let no_socket = ev.kind == RstKind::Sent && ev.state.is_none();
    (no_socket && fits_reply).then(|| RstDiagnosis {
        cause: Cause::NatEscaped,
        text: format!(
            "a segment from {} matched no socket here, but conntrack has a NAT'd connection whose reply tuple it fits \
             ({} -> {}): conntrack marked it INVALID and it escaped reverse NAT; drop INVALID packets, or set \
             nf_conntrack_tcp_be_liberal",
            ev.remote, found.entry.original.src, found.entry.original.dst
        )
        .into(),
    })
}

/// A received reset no socket on this host sent (its origin is not local),
/// on a connection that conntrack in some namespace here tracks, and that
/// conntrack has marked packets INVALID. nf_send_reset, which a `reject with
/// tcp reset` rule calls, has no tracepoint and cannot be hooked on kernels
/// without kprobes or fentry, so that is the evidence there is: the entry,
/// and the namespace's INVALID count.
pub(crate) fn rejected_by_conntrack(ev: &RstEvent, found: &Found) -> Option<RstDiagnosis> {
    let invalid = found.invalid.filter(|n| *n > 0)?;
    (ev.kind == RstKind::Received).then(|| RstDiagnosis {
        cause: Cause::ConntrackInvalidRejected,
        text: format!(
            "no socket on this host sent this reset, but conntrack in {} tracks this connection ({}) and has marked \
             {invalid} packets INVALID: a rule there that rejects INVALID packets (`ct state invalid reject`) \
             answered one in {}'s name; drop INVALID packets instead of rejecting them, or find why they are INVALID \
             (out-of-window segments: nf_conntrack_tcp_be_liberal)",
            found.netns_name,
            found.entry.tcp_state_name().unwrap_or("unknown state"),
            ev.remote
        )
        .into(),
    })
}

/// The function that takes a reset that arrived on an open connection,
/// where the kernel has it as a function of its own (`is_phantom_receipt`).
pub(crate) const RESET_TAKER: &str = "tcp_validate_incoming";

/// Whether a received reset is a phantom: none arrived. When data comes to
/// a socket in FIN_WAIT1 or FIN_WAIT2 that was shut down for reading
/// (close(), or shutdown() with SHUT_RD or SHUT_RDWR), tcp_rcv_state_process
/// aborts it with tcp_reset(), which fires tcp:tcp_receive_reset, and then
/// sends a reset, the connection's rst_sent (TCP_ABORT_ON_DATA). A reset
/// that did arrive came through `RESET_TAKER`, which names the caller only
/// where the kernel did not inline it: `taker_apart`. Without it no receipt
/// is called a phantom. (In SYN_SENT, tcp_rcv_state_process is the caller
/// of a real receipt, through the function it inlined.)
///
/// `caller` is asked last: naming frames is the dear part.
pub(crate) fn is_phantom_receipt<C: AsRef<str>>(
    ev: &RstEvent,
    taker_apart: bool,
    caller: impl FnOnce() -> Option<C>,
) -> bool {
    taker_apart
        && ev.kind == RstKind::Received
        && matches!(ev.state, Some(TcpState::FinWait1 | TcpState::FinWait2))
        && caller().is_some_and(|c| c.as_ref() == "tcp_rcv_state_process")
}

/// What the kernel knew when a reset was decided that the socket and its
/// record do not say.
#[derive(Debug, Default, Clone)]
pub struct KernelView<'a> {
    /// The functions the reset went through, innermost first (the record's
    /// caller frames, symbolized).
    pub path: &'a [std::sync::Arc<str>],
    /// `net.ipv4.tcp_max_orphans` in the reset's namespace, when read.
    pub max_orphans: Option<u64>,
    /// `net.ipv4.tcp_abort_on_overflow` in the reset's namespace, when read.
    pub abort_on_overflow: Option<bool>,
    /// The accept queue of the listener the reset came from, when read.
    pub accept_queue: Option<AcceptQueue>,
}

impl KernelView<'_> {
    fn went_through(&self, function: &str) -> bool {
        self.path.iter().any(|f| &**f == function)
    }

    /// Whether the reset answered the last segment of a handshake, sent
    /// by tcp_check_req() for a request socket: because the accept queue
    /// was full and tcp_abort_on_overflow is 1, or for a stray SYN. The
    /// kernel gives both one reason (INVALID_SYN on 6.18), so the sysctl
    /// tells them apart.
    pub(crate) fn ended_a_handshake(&self) -> bool {
        self.went_through("tcp_check_req")
    }
}

/// `format!` into a String sized once for a whole diagnosis: they run to
/// 100-300 bytes, and `format!` sizes its String from the literal pieces
/// alone, so it grew, a copy at a time, several times per reset (#11).
/// The short pieces some diagnoses put together first stay `format!`s.
macro_rules! text {
    ($($arg:tt)*) => {{
        let mut text = String::with_capacity(320);
        std::fmt::Write::write_fmt(&mut text, format_args!($($arg)*))
            .expect("writing into a String cannot fail");
        text
    }};
}

/// Why a reset happened, where the socket, its close mark or the kernel
/// says.
pub(crate) fn rst(ev: &RstEvent, ctx: &RstContext, kernel: &KernelView) -> Option<RstDiagnosis> {
    let conn = ctx.conn.as_ref();
    let initiator = conn.and_then(|c| c.initiator.as_ref().zip(c.initiated_at));
    let ago = |at: SystemTime| short(since(at, ev.time));
    let reason = ev.reason.as_deref();
    let data_after_close = || match initiator {
        Some((i, at)) => because(
            Cause::DataAfterClose,
            text!(
                "data arrived after {i} ({} ago): the application closed while the peer was still sending; \
                 read to EOF, or shutdown(SHUT_WR) first",
                ago(at)
            ),
        ),
        None => because(
            Cause::DataAfterClose,
            "data arrived on a socket the application had closed",
        ),
    };
    let by_task = |what: &str| {
        ev.task.as_ref().map_or(what.to_owned(), |t| {
            format!("{what} by {}", Label(t.pid, &t.comm))
        })
    };
    match ev.kind {
        RstKind::Received => {
            let half_closed = matches!(ev.state, Some(TcpState::FinWait1 | TcpState::FinWait2));
            match (half_closed, initiator) {
                (true, Some((i, at)))
                    if matches!(i.op, CloseOp::Shutdown(ShutHow::Write | ShutHow::Both)) =>
                {
                    return because(
                        Cause::PeerResetHalfClose,
                        text!(
                            "the peer reset a connection we half-closed ({i}, {} ago) instead of sending FIN; \
                             a proxy, middlebox or userspace stack (slirp4netns-like) may turn the FIN exchange into a reset",
                            ago(at)
                        ),
                    );
                }
                (true, Some((i, at))) => {
                    return because(
                        Cause::PeerResetClosing,
                        text!(
                            "the peer reset the connection after our {i} ({} ago) instead of finishing the close",
                            ago(at)
                        ),
                    );
                }
                // No mark on this kernel: the socket still says we sent FIN
                // while a process holds it, which only shutdown() does.
                (true, None) if ev.socket.is_some_and(|s| s.sent_fin && !s.orphaned) => {
                    return because(
                        Cause::PeerResetHalfClose,
                        "the peer reset a connection we half-closed with shutdown() instead of sending FIN; \
                         a proxy, middlebox or userspace stack (slirp4netns-like) may turn the FIN exchange into a reset",
                    );
                }
                _ => {}
            }
            match ev.state? {
                TcpState::CloseWait => {
                    let fin = conn
                        .and_then(|c| c.peer_fin_at)
                        .map(|at| format!(" {} ago", ago(at)))
                        .unwrap_or_default();
                    because(
                        Cause::PeerResetAfterFin,
                        text!(
                            "the peer sent FIN{fin} and then reset while we had not closed: the application's next write fails with EPIPE"
                        ),
                    )
                }
                TcpState::SynSent => because(
                    Cause::ConnectionRefused,
                    around_addr(
                        "connection refused: nothing listens on ",
                        ev.remote,
                        ", or a firewall rejected the SYN",
                    ),
                ),
                TcpState::Established => because(
                    Cause::PeerAborted,
                    "the peer (or a middlebox) aborted an open connection",
                ),
                TcpState::LastAck | TcpState::Closing => because(
                    Cause::PeerResetFin,
                    "the peer reset instead of acknowledging our FIN",
                ),
                _ => None,
            }
        }
        // inet_csk_listen_stop() disconnects every child still queued, whatever
        // reason the kernel gives the reset (TCP_STATE on 6.18).
        RstKind::Sent if kernel.went_through("inet_csk_listen_stop") => because(
            Cause::ListenerClosed,
            text!(
                "the listener on {} closed ({}) with this connection still in its accept queue, never accepted: \
                 the kernel resets every such connection; a server restart or crash, or a shutdown that does not drain the queue",
                ev.local,
                by_task("close()")
            ),
        ),
        RstKind::Sent if kernel.ended_a_handshake() && kernel.abort_on_overflow == Some(true) => {
            let queue = kernel.accept_queue.map(|q| {
                // Read after the reset, so an application may have
                // accepted some since.
                let when = if q.full() {
                    ""
                } else {
                    " by the time tcprst looked"
                };
                format!(" (backlog {}, {} waiting{when})", q.backlog, q.waiting)
            });
            because(
                Cause::AcceptQueueOverflow,
                text!(
                    "the accept queue of {}{} was full: the application accepts too slowly; \
                     with tcp_abort_on_overflow=1 the kernel resets instead of dropping",
                    ev.local,
                    queue.unwrap_or_default()
                ),
            )
        }
        // Its state says what no reason before 6.10 does.
        RstKind::Sent if ctx.from_timewait => data_after_close(),
        RstKind::Sent => match reason? {
            "TCP_ABORT_ON_DATA" => data_after_close(),
            "NO_SOCKET" => because(
                Cause::NoSocket,
                around_addr(
                    "a segment for ",
                    ev.local,
                    " where no socket exists: nothing listens there, or the connection is long gone",
                ),
            ),
            "TCP_ABORT_ON_CLOSE" => because(
                Cause::UnreadDataOnClose,
                text!(
                    "{} with unread data: the application closed before reading everything the peer sent",
                    by_task("close()")
                ),
            ),
            "TCP_ABORT_ON_LINGER" | "TCP_STATE" => because(
                Cause::AbortiveClose,
                text!(
                    "{}: SO_LINGER with a zero timeout, or a disconnect",
                    by_task("abortive close")
                ),
            ),
            "TCP_KEEPALIVE_TIMEOUT" => because(
                Cause::KeepaliveTimeout,
                "keepalive probes went unanswered: the peer or the path is gone",
            ),
            "TCP_ABORT_ON_MEMORY" => because(
                Cause::OrphanLimit,
                match kernel.max_orphans {
                    Some(max) => text!(
                        "the kernel aborted this closed (orphaned) socket instead of finishing its close: \
                         more orphans than net.ipv4.tcp_max_orphans ({max}) or TCP memory past net.ipv4.tcp_mem; \
                         raise them, or close connections before they pile up"
                    ),
                    None => "the kernel aborted this closed (orphaned) socket: too many orphans \
                             (net.ipv4.tcp_max_orphans) or TCP memory past net.ipv4.tcp_mem"
                        .to_owned(),
                },
            ),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        pipeline::tracker::Tracker,
        testing::{facts, key, mark, proxy_half_close, reset, scanned, t},
    };

    fn explain(ev: &RstEvent) -> Option<String> {
        diagnose(ev).map(|d| d.text.into_owned())
    }

    fn diagnose(ev: &RstEvent) -> Option<RstDiagnosis> {
        rst(ev, &RstContext::of(ev), &KernelView::default())
    }

    #[test]
    fn peer_reset_after_our_half_close() {
        let mut ev = reset(RstKind::Received, t(15), Some(TcpState::FinWait2), None);
        ev.socket = Some(facts(true, false));
        ev.history = Some(proxy_half_close());
        let text = explain(&ev).unwrap();
        assert!(
            text.starts_with(
                "the peer reset a connection we half-closed (shutdown(SHUT_WR) by envoy[51435], 5.0s ago) instead of sending FIN"
            ),
            "{text}"
        );
        // Without a mark, the socket alone still tells a shutdown().
        ev.history = None;
        assert!(
            explain(&ev)
                .unwrap()
                .starts_with("the peer reset a connection we half-closed with shutdown()")
        );
        // An orphaned socket was closed, not shut down: no such claim.
        ev.socket = Some(facts(true, true));
        assert_eq!(explain(&ev), None);
    }

    #[test]
    fn data_after_close() {
        let mut ev = reset(
            RstKind::Sent,
            t(4),
            Some(TcpState::Close),
            Some("TCP_ABORT_ON_DATA"),
        );
        ev.socket = Some(facts(true, true));
        ev.history = Some(mark(
            CloseOp::Close,
            t(3),
            &[(TcpState::FinWait1, t(3)), (TcpState::FinWait2, t(3))],
        ));
        assert!(
            explain(&ev)
                .unwrap()
                .starts_with("data arrived after close() by envoy[51435] (1.0s ago)")
        );
        ev.history = None;
        assert_eq!(
            explain(&ev).unwrap(),
            "data arrived on a socket the application had closed"
        );
    }

    #[test]
    fn reset_in_close_wait_means_epipe() {
        let ev = reset(RstKind::Received, t(9), Some(TcpState::CloseWait), None);
        assert_eq!(
            explain(&ev).unwrap(),
            "the peer sent FIN and then reset while we had not closed: the application's next write fails with EPIPE"
        );
    }

    /// The kernel's abort of a socket shut for reading fires the received
    /// reset's tracepoint from tcp_rcv_state_process; a reset that arrived
    /// comes through tcp_validate_incoming, or, in SYN_SENT, through the
    /// function tcp_rcv_state_process inlined.
    #[test]
    fn phantom_receipts_are_aborts_on_data() {
        let phantom = |ev: &RstEvent, caller: &'static str, taker_apart: bool| {
            is_phantom_receipt(ev, taker_apart, || Some(caller))
        };
        let state_process = "tcp_rcv_state_process";
        let abort = reset(RstKind::Received, t(1), Some(TcpState::FinWait2), None);
        assert!(phantom(&abort, state_process, true));
        assert!(!phantom(&abort, RESET_TAKER, true));
        assert!(!is_phantom_receipt(&abort, true, || None::<&str>));
        // A kernel that inlined the taker: nothing tells them apart.
        assert!(!phantom(&abort, state_process, false));
        let in_fin_wait1 = reset(RstKind::Received, t(1), Some(TcpState::FinWait1), None);
        assert!(phantom(&in_fin_wait1, state_process, true));
        let refused = reset(RstKind::Received, t(1), Some(TcpState::SynSent), None);
        assert!(!phantom(&refused, state_process, true));
        let sent = reset(RstKind::Sent, t(1), Some(TcpState::FinWait2), None);
        assert!(!phantom(&sent, state_process, true));
    }

    /// The kernel resets from a timewait socket only when data comes before
    /// the peer's FIN: data after close, whether or not the kernel gives a
    /// reason (before 6.10 it gives none).
    #[test]
    fn a_timewait_socket_resets_data_after_close() {
        for reason in [Some("TCP_TIMEWAIT_SOCKET"), None] {
            let mut ev = reset(RstKind::Sent, t(30), Some(TcpState::TimeWait), reason);
            let d = diagnose(&ev).unwrap();
            assert_eq!(d.cause, Cause::DataAfterClose);
            assert_eq!(
                d.text,
                "data arrived on a socket the application had closed"
            );
            ev.history = Some(mark(
                CloseOp::Close,
                t(28),
                &[(TcpState::FinWait1, t(28)), (TcpState::FinWait2, t(28))],
            ));
            let text = explain(&ev).unwrap();
            assert!(
                text.starts_with("data arrived after close() by envoy[51435] (2.0s ago)"),
                "{text}"
            );
        }
        let none = reset(RstKind::Sent, t(30), None, Some("NO_SOCKET"));
        assert!(explain(&none).unwrap().contains("where no socket exists"));
    }

    #[test]
    fn stuck_texts_name_the_waiting_side() {
        let mut tracker = Tracker::new(10);
        tracker.scan(t(0), Vec::new());
        tracker.scan(
            t(11),
            vec![scanned(TcpState::FinWait2, Some(proxy_half_close()), false)],
        );
        let conn = &tracker.stuck(t(40), Duration::from_secs(2), Duration::from_secs(60))[0];
        let d = stuck(conn, t(40), None, Duration::from_secs(60));
        assert_eq!((d.waiting_for, d.blame), (WaitingFor::PeerFin, Blame::Peer));
        assert_eq!(
            d.text,
            "FIN_WAIT2 for 30s after shutdown(SHUT_WR) by envoy[51435]: the peer never sent FIN, \
             and no timer will ever reap this socket because it is not orphaned"
        );

        let mut tracker = Tracker::new(10);
        tracker.scan(t(0), Vec::new());
        tracker.scan(t(0), vec![scanned(TcpState::CloseWait, None, false)]);
        let conn = &tracker.stuck(t(300), Duration::from_secs(2), Duration::from_secs(60))[0];
        let d = stuck(conn, t(300), Some("nc[1234]"), Duration::from_secs(60));
        assert_eq!(
            (d.waiting_for, d.blame),
            (WaitingFor::LocalClose, Blame::LocalProcess)
        );
        assert_eq!(
            d.text,
            "CLOSE_WAIT for 5m0s: the peer closed, and nc[1234] never closed its socket"
        );
    }

    #[test]
    fn ages_found_at_the_first_scan_are_lower_bounds() {
        let mut tracker = Tracker::new(10);
        tracker.scan(t(0), vec![scanned(TcpState::FinWait2, None, true)]);
        let conn = &tracker.stuck(t(5), Duration::from_secs(2), Duration::from_secs(60))[0];
        let d = stuck(conn, t(5), None, Duration::from_secs(60));
        assert_eq!(
            d.text,
            "FIN_WAIT2 for at least 5.0s: the peer never sent FIN; the socket is orphaned, \
             so the kernel reaps it after tcp_fin_timeout (60s)"
        );
    }

    #[test]
    fn a_fresh_snapshot_has_no_age() {
        let conn = Connection::found(key(), TcpState::CloseWait, false, t(0));
        let d = stuck(&conn, t(0), Some("nc[7]"), Duration::from_secs(60));
        assert_eq!(
            d.text,
            "CLOSE_WAIT: the peer closed, and nc[7] never closed its socket"
        );
    }

    #[test]
    fn resolution_says_what_happened() {
        let mut tracker = Tracker::new(10);
        tracker.scan(t(0), Vec::new());
        tracker.scan(
            t(11),
            vec![scanned(TcpState::FinWait2, Some(proxy_half_close()), false)],
        );
        tracker.stuck(t(40), Duration::from_secs(30), Duration::from_secs(60));
        let r = &tracker.scan(t(50), Vec::new())[0];
        assert_eq!(
            resolved(r),
            "FIN_WAIT2 resolved after 40s: the peer sent FIN at last"
        );
    }

    /// The schema's enum and the README's Causes table list every cause,
    /// and nothing else: they are what log queries and alerts match on.
    #[test]
    fn every_cause_is_documented() {
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../../docs/event.schema.json")).unwrap();
        let mut listed: Vec<&str> = schema["$defs"]["rst"]["properties"]["cause"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        let mut ours: Vec<&str> = Cause::ALL.iter().map(|c| c.name()).collect();
        listed.sort();
        ours.sort();
        assert_eq!(listed, ours);
        let readme = include_str!("../../../README.md");
        for cause in ours {
            assert!(
                readme.contains(&format!("| `{cause}` |")),
                "{cause} not in the README"
            );
        }
    }

    #[test]
    fn a_listener_closed_with_a_queue_is_not_a_linger_abort() {
        let mut ev = reset(
            RstKind::Sent,
            t(4),
            Some(TcpState::Close),
            Some("TCP_STATE"),
        );
        ev.task = Some(crate::testing::task(77, "python3"));
        let path: Vec<std::sync::Arc<str>> = [
            "tcp_send_active_reset",
            "tcp_disconnect",
            "inet_child_forget",
            "inet_csk_listen_stop",
            "__tcp_close",
        ]
        .map(std::sync::Arc::from)
        .into();
        let kernel = KernelView {
            path: &path,
            ..KernelView::default()
        };
        let d = rst(&ev, &RstContext::of(&ev), &kernel).unwrap();
        assert_eq!(d.cause, Cause::ListenerClosed);
        assert!(
            d.text
                .starts_with("the listener on 10.0.0.1:15001 closed (close() by python3[77])"),
            "{}",
            d.text
        );
        assert_eq!(diagnose(&ev).unwrap().cause, Cause::AbortiveClose);
    }

    #[test]
    fn an_orphan_limit_names_the_sysctl_and_its_value() {
        let ev = reset(
            RstKind::Sent,
            t(4),
            Some(TcpState::Close),
            Some("TCP_ABORT_ON_MEMORY"),
        );
        let kernel = KernelView {
            max_orphans: Some(0),
            ..KernelView::default()
        };
        let d = rst(&ev, &RstContext::of(&ev), &kernel).unwrap();
        assert_eq!(d.cause, Cause::OrphanLimit);
        assert!(
            d.text.contains("net.ipv4.tcp_max_orphans (0)"),
            "{}",
            d.text
        );
    }

    /// What tcp_check_req() sent on 6.18 for a handshake's last ACK that
    /// found the accept queue full.
    #[test]
    fn a_handshake_ending_at_a_full_accept_queue() {
        let ev = reset(
            RstKind::Sent,
            t(4),
            Some(TcpState::Listen),
            Some("INVALID_SYN"),
        );
        let path: Vec<std::sync::Arc<str>> = ["tcp_v4_send_reset", "tcp_check_req", "tcp_v4_rcv"]
            .map(std::sync::Arc::from)
            .into();
        let queue = |waiting| AcceptQueue {
            waiting,
            backlog: 1,
        };
        let mut kernel = KernelView {
            path: &path,
            abort_on_overflow: Some(true),
            accept_queue: Some(queue(2)),
            ..KernelView::default()
        };
        let text = |kernel: &KernelView| {
            let d = rst(&ev, &RstContext::of(&ev), kernel)?;
            assert_eq!(d.cause, Cause::AcceptQueueOverflow);
            Some(d.text)
        };
        assert_eq!(
            text(&kernel).unwrap(),
            "the accept queue of 10.0.0.1:15001 (backlog 1, 2 waiting) was full: the application accepts too slowly; \
             with tcp_abort_on_overflow=1 the kernel resets instead of dropping"
        );
        kernel.accept_queue = Some(queue(0));
        assert!(
            text(&kernel)
                .unwrap()
                .starts_with("the accept queue of 10.0.0.1:15001 (backlog 1, 0 waiting by the time tcprst looked) was full"),
        );
        kernel.accept_queue = None;
        assert!(
            text(&kernel)
                .unwrap()
                .starts_with("the accept queue of 10.0.0.1:15001 was full: ")
        );
        // With the sysctl at 0 a full queue drops; a reset there answered a
        // stray SYN, which tcprst does not name.
        kernel.abort_on_overflow = Some(false);
        assert_eq!(text(&kernel), None);
    }

    #[test]
    fn a_no_socket_answer_to_an_open_connection_means_the_peer_lost_it() {
        let ev = reset(RstKind::Received, t(4), Some(TcpState::Established), None);
        let d = explained_by_sender(&ev, Some("NO_SOCKET")).unwrap();
        assert_eq!(d.cause, Cause::PeerLostState);
        assert!(
            d.text.starts_with("the peer 10.0.0.2:44410 had no socket"),
            "{}",
            d.text
        );
        assert_eq!(explained_by_sender(&ev, Some("TCP_ABORT_ON_CLOSE")), None);
        let refused = reset(RstKind::Received, t(4), Some(TcpState::SynSent), None);
        assert_eq!(explained_by_sender(&refused, Some("NO_SOCKET")), None);
    }

    #[test]
    fn durations_stay_short() {
        assert_eq!(short(Duration::from_millis(1500)), "1.5s");
        assert_eq!(short(Duration::from_secs(45)), "45s");
        assert_eq!(short(Duration::from_secs(200)), "3m20s");
        assert_eq!(short(Duration::from_secs(7300)), "2h1m");
    }
}
