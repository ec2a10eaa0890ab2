//! One-line explanations a user can act on, from what the tracker saw.

use std::time::{Duration, SystemTime};

use crate::{
    event::{CloseOp, RstEvent, RstKind, ShutHow, TcpState},
    tracker::{Connection, Resolved, RstContext},
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
    pub fn name(self) -> &'static str {
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
    pub fn name(self) -> &'static str {
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

/// "12s", "1.5s", "3m20s": short enough for one line.
pub fn short(d: Duration) -> String {
    let secs = d.as_secs();
    if secs < 10 {
        format!("{:.1}s", d.as_secs_f64())
    } else if secs < 120 {
        format!("{secs}s")
    } else if secs < 7200 {
        format!("{}m{}s", secs / 60, secs % 60)
    } else {
        format!("{}h{}m", secs / 3600, (secs % 3600) / 60)
    }
}

fn since(at: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(at).unwrap_or_default()
}

/// Why a half-closed connection is stuck. `owner` names the process holding
/// the socket ("nc[1234]") where it is known.
pub fn stuck(
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

pub fn resolved(r: &Resolved) -> String {
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

/// Why a reset happened, where the socket, its close mark or the kernel
/// says.
pub fn rst(ev: &RstEvent, ctx: &RstContext) -> Option<String> {
    let conn = ctx.conn.as_ref();
    let initiator = conn.and_then(|c| c.initiator.as_ref().zip(c.initiated_at));
    let ago = |at: SystemTime| short(since(at, ev.time));
    let reason = ev.reason.as_deref();
    if ctx.ended_before {
        return Some(format!(
            "late segment: the peer sent to a connection that had closed (TIME_WAIT on {}); its socket is gone",
            ev.local
        ));
    }
    match ev.kind {
        RstKind::Received => {
            let half_closed = matches!(ev.state, Some(TcpState::FinWait1 | TcpState::FinWait2));
            match (half_closed, initiator) {
                (true, Some((i, at)))
                    if matches!(i.op, CloseOp::Shutdown(ShutHow::Write | ShutHow::Both)) =>
                {
                    return Some(format!(
                        "the peer reset a connection we half-closed ({i}, {} ago) instead of sending FIN; \
                         a proxy, middlebox or userspace stack (slirp4netns-like) may turn the FIN exchange into a reset",
                        ago(at)
                    ));
                }
                (true, Some((i, at))) => {
                    return Some(format!(
                        "the peer reset the connection after our {i} ({} ago) instead of finishing the close",
                        ago(at)
                    ));
                }
                // No mark on this kernel: the socket still says we sent FIN
                // while a process holds it, which only shutdown() does.
                (true, None) if ev.socket.is_some_and(|s| s.sent_fin && !s.orphaned) => {
                    return Some(
                        "the peer reset a connection we half-closed with shutdown() instead of sending FIN; \
                         a proxy, middlebox or userspace stack (slirp4netns-like) may turn the FIN exchange into a reset"
                            .to_owned(),
                    );
                }
                _ => {}
            }
            Some(match ev.state? {
                TcpState::CloseWait => {
                    let fin = conn
                        .and_then(|c| c.peer_fin_at)
                        .map(|at| format!(" {} ago", ago(at)))
                        .unwrap_or_default();
                    format!(
                        "the peer sent FIN{fin} and then reset while we had not closed: the application's next write fails with EPIPE"
                    )
                }
                TcpState::SynSent => format!(
                    "connection refused: nothing listens on {}, or a firewall rejected the SYN",
                    ev.remote
                ),
                TcpState::Established => {
                    "the peer (or a middlebox) aborted an open connection".to_owned()
                }
                TcpState::LastAck | TcpState::Closing => {
                    "the peer reset instead of acknowledging our FIN".to_owned()
                }
                _ => return None,
            })
        }
        RstKind::Sent => match reason? {
            "TCP_ABORT_ON_DATA" => Some(match initiator {
                Some((i, at)) => format!(
                    "data arrived after {i} ({} ago): the application closed while the peer was still sending; \
                     read to EOF, or shutdown(SHUT_WR) first",
                    ago(at)
                ),
                None => "data arrived on a socket the application had closed".to_owned(),
            }),
            "NO_SOCKET" => Some(format!(
                "a segment for {} where no socket exists: nothing listens there, or the connection is long gone",
                ev.local
            )),
            "TCP_ABORT_ON_CLOSE" => Some(format!(
                "{} with unread data: the application closed before reading everything the peer sent",
                ev.task.as_ref().map_or("close()".to_owned(), |t| format!(
                    "close() by {}[{}]",
                    t.comm, t.pid
                ))
            )),
            "TCP_ABORT_ON_LINGER" | "TCP_STATE" => Some(format!(
                "abortive close{}: SO_LINGER with a zero timeout, or a disconnect",
                ev.task
                    .as_ref()
                    .map(|t| format!(" by {}[{}]", t.comm, t.pid))
                    .unwrap_or_default()
            )),
            "TCP_KEEPALIVE_TIMEOUT" => {
                Some("keepalive probes went unanswered: the peer or the path is gone".to_owned())
            }
            "TCP_ABORT_ON_MEMORY" => Some(
                "the kernel ran short of memory for orphaned sockets and aborted this one"
                    .to_owned(),
            ),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        testing::{facts, key, mark, proxy_half_close, reset, scanned, t},
        tracker::Tracker,
    };

    fn explain(ev: &RstEvent) -> Option<String> {
        rst(ev, &RstContext::of(ev))
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

    #[test]
    fn late_segment_versus_no_socket() {
        let late = reset(RstKind::Sent, t(30), Some(TcpState::TimeWait), None);
        assert_eq!(
            explain(&late).unwrap(),
            "late segment: the peer sent to a connection that had closed (TIME_WAIT on 10.0.0.1:15001); its socket is gone"
        );
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

    #[test]
    fn durations_stay_short() {
        assert_eq!(short(Duration::from_millis(1500)), "1.5s");
        assert_eq!(short(Duration::from_secs(45)), "45s");
        assert_eq!(short(Duration::from_secs(200)), "3m20s");
        assert_eq!(short(Duration::from_secs(7300)), "2h1m");
    }
}
