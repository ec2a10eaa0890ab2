//! Half-closed connections, from the kernel's own socket table: every scan
//! (sock_diag, in every namespace) lists the sockets in FIN_WAIT1,
//! FIN_WAIT2, CLOSE_WAIT, LAST_ACK or CLOSING, with what each one's close
//! mark says. A connection seen stuck long enough is reported; one that
//! moves on or is gone from the next scan is resolved. Nothing here grows
//! with the connection rate: only with the half-closed sockets there are.
//!
//! Connections are keyed by namespace and both ends: the kernel allows one
//! socket per 4-tuple per namespace at a time, and resets sent with no
//! socket carry only the tuple.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, SystemTime},
};

use crate::model::{
    conn::ConnKey,
    event::{CloseHistory, Initiator, RstEvent, TcpState},
};

#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// None for the state a close mark found the socket in, whose start it
    /// did not see.
    pub at: Option<SystemTime>,
    pub state: TcpState,
    pub by: Option<Initiator>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Connection {
    pub key: ConnKey,
    pub state: TcpState,
    /// When the connection entered `state`.
    pub since: SystemTime,
    /// False for connections found already so: their ages are lower bounds.
    pub seen_from_start: bool,
    pub history: Vec<Step>,
    /// The process that started the close sequence.
    pub initiator: Option<Initiator>,
    pub initiated_at: Option<SystemTime>,
    /// Whether no descriptor holds the socket any more.
    pub orphaned: Option<bool>,
    pub our_fin_at: Option<SystemTime>,
    pub peer_fin_at: Option<SystemTime>,
    /// When a stuck report about the current state last went out.
    pub stuck_reported_at: Option<SystemTime>,
    /// The cgroup (v2) the socket was created in.
    pub cgroup_id: Option<u64>,
    /// The socket's inode while a process holds it: names that process.
    pub inode: Option<u64>,
}

impl Connection {
    /// A connection in `state` now, as a scan or a snapshot finds it.
    pub fn found(key: ConnKey, state: TcpState, orphaned: bool, now: SystemTime) -> Self {
        Self {
            key,
            state,
            since: now,
            seen_from_start: false,
            history: Vec::new(),
            initiator: None,
            initiated_at: None,
            orphaned: Some(orphaned),
            our_fin_at: None,
            peer_fin_at: None,
            stuck_reported_at: None,
            cgroup_id: None,
            inode: None,
        }
    }

    /// Dates a connection `found` in FIN_WAIT2 or CLOSE_WAIT by `peer_quiet`,
    /// how long ago the peer's last ACK came (`tcp_info`): its state began
    /// then at the latest (`TcpState::begins_with_peer_segment`). The age
    /// this gives is a lower bound, exact while the peer has sent nothing
    /// since, as a peer that leaves a socket hanging seldom does (it may
    /// answer keepalive probes). `not_before`: when a scan last looked and
    /// did not see it so. Aged from when it was found instead, a leak hours
    /// old waited `--stuck-after` to be reported.
    pub fn dated_by_peer(
        mut self,
        peer_quiet: Option<Duration>,
        not_before: Option<SystemTime>,
    ) -> Self {
        let silent_since = peer_quiet.and_then(|quiet| self.since.checked_sub(quiet));
        if let Some(silent_since) = silent_since
            && self.state.begins_with_peer_segment()
        {
            self.since = not_before.map_or(silent_since, |at| silent_since.max(at));
        }
        self
    }

    /// Adds what the socket's close mark says: who started the close, and
    /// when each step happened.
    fn learn(&mut self, mark: &CloseHistory) {
        use TcpState::*;
        self.initiator = mark.initiator.clone();
        self.initiated_at = mark.initiated_at;
        self.history = mark
            .first_state
            .map(|state| Step {
                at: None,
                state,
                by: None,
            })
            .into_iter()
            .chain(mark.steps.iter().enumerate().map(|(i, (state, at))| {
                Step {
                    at: Some(*at),
                    state: *state,
                    // The op happened with the first step the mark recorded.
                    by: mark
                        .initiator
                        .clone()
                        .filter(|_| i == 0 && mark.initiated_at.is_some()),
                }
            }))
            .collect();
        for (state, at) in &mark.steps {
            match state {
                FinWait1 | LastAck => self.our_fin_at = Some(*at),
                CloseWait | Closing => self.peer_fin_at = Some(*at),
                _ => {}
            }
        }
        if let Some(entered) = mark.entered(self.state) {
            self.since = entered;
            self.seen_from_start = true;
        }
    }
}

/// A connection that stopped being stuck.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub conn: Connection,
    pub stuck_state: TcpState,
    pub stuck_for: Duration,
}

/// What is known about the connection a reset belongs to, from the socket
/// itself at that moment.
#[derive(Debug, Clone, PartialEq)]
pub struct RstContext {
    pub conn: Option<Connection>,
    /// A timewait socket sent the reset: an orphan whose close's FIN was
    /// acknowledged, still waiting in FIN_WAIT2 for the peer's, which the
    /// kernel resets only when new data (or a SYN) comes first
    /// (`tcp_timewait_state_process`). A retransmission gets an ACK.
    pub from_timewait: bool,
}

impl RstContext {
    pub fn of(ev: &RstEvent) -> Self {
        let key = ConnKey::new(ev.netns, ev.local, ev.remote);
        let conn = ev
            .state
            .filter(|_| ev.socket.is_some() || ev.history.is_some())
            .map(|state| {
                let mut conn = Connection::found(key, state, false, ev.time);
                conn.orphaned = ev.socket.map(|s| s.orphaned);
                conn.cgroup_id = ev.cgroup_id;
                conn.inode = ev.socket.and_then(|s| s.inode);
                if let Some(history) = &ev.history {
                    conn.learn(history);
                }
                conn
            });
        Self {
            conn,
            from_timewait: ev.state == Some(TcpState::TimeWait),
        }
    }
}

/// A half-closed socket as one scan found it.
#[derive(Debug, Clone, PartialEq)]
pub struct ScannedSocket {
    pub key: ConnKey,
    pub state: TcpState,
    pub orphaned: bool,
    pub inode: Option<u64>,
    pub cgroup_id: Option<u64>,
    pub history: Option<CloseHistory>,
    /// How long ago the peer's last ACK came (`tcp_info`), which in
    /// FIN_WAIT2 and CLOSE_WAIT is at most the state's age (`dated_by_peer`).
    pub peer_quiet: Option<Duration>,
}

pub struct Tracker {
    half_closed: HashMap<ConnKey, Connection>,
    capacity: usize,
    /// When the previous scan ran; None before the first.
    last_scan: Option<SystemTime>,
    /// Half-closed sockets left untracked because `capacity` was reached.
    pub untracked: u64,
}

impl Tracker {
    pub fn new(capacity: usize) -> Self {
        Self {
            half_closed: HashMap::new(),
            capacity: capacity.max(1),
            last_scan: None,
            untracked: 0,
        }
    }

    /// Connections followed now.
    pub fn tracked(&self) -> usize {
        self.half_closed.len()
    }

    /// A scan that read every namespace, as the tests' scans do.
    #[cfg(test)]
    pub fn scan(&mut self, now: SystemTime, sockets: Vec<ScannedSocket>) -> Vec<Resolved> {
        self.scan_except(now, sockets, &HashSet::new())
    }

    /// Takes one full scan, which could not read the namespaces `unread`:
    /// their connections stay as they were, since a failed dump says
    /// nothing of them. Returns the connections that were reported stuck
    /// and are no longer so, and the stuck ones gone from the table (their
    /// new state unknown: the caller looks for them).
    pub fn scan_except(
        &mut self,
        now: SystemTime,
        sockets: Vec<ScannedSocket>,
        unread: &HashSet<u32>,
    ) -> Vec<Resolved> {
        let first = self.last_scan.is_none();
        let mut seen = HashMap::with_capacity(sockets.len());
        let mut resolved = Vec::new();
        for found in sockets {
            let key = found.key;
            let conn = match self.half_closed.remove(&key) {
                Some(mut conn) if conn.state == found.state => {
                    refresh(&mut conn, &found);
                    conn
                }
                previous => {
                    // It came into this state since the last scan, which
                    // did not see it so; before the first one, it may have
                    // been so for long.
                    let mut conn = Connection::found(key, found.state, found.orphaned, now)
                        .dated_by_peer(found.peer_quiet, self.last_scan);
                    conn.seen_from_start = !first;
                    if let Some(p) = &previous {
                        conn.our_fin_at = p.our_fin_at;
                        conn.peer_fin_at = p.peer_fin_at;
                    }
                    if found.state == TcpState::CloseWait && !first {
                        conn.peer_fin_at = Some(conn.since);
                    }
                    refresh(&mut conn, &found);
                    if let Some(stuck) = previous.filter(|p| p.stuck_reported_at.is_some()) {
                        resolved.push(resolution(&stuck, conn.clone(), now));
                    }
                    conn
                }
            };
            seen.insert(key, conn);
        }
        for (key, gone) in self.half_closed.drain() {
            if unread.contains(&key.netns) {
                seen.insert(key, gone);
                continue;
            }
            if gone.stuck_reported_at.is_some() {
                let mut after = gone.clone();
                after.state = TcpState::Close;
                // A FIN_WAIT2 socket a process still holds leaves the table
                // only for TIME_WAIT, on the peer's FIN, or on a reset,
                // which `reset` took out already.
                if gone.state == TcpState::FinWait2 && gone.orphaned == Some(false) {
                    after.peer_fin_at = Some(now);
                }
                resolved.push(resolution(&gone, after, now));
            }
        }
        if seen.len() > self.capacity {
            // Keep the longest-standing: those are the ones to report.
            let mut by_age: Vec<_> = seen.into_iter().collect();
            by_age.sort_by_key(|(_, c)| c.since);
            self.untracked += (by_age.len() - self.capacity) as u64;
            by_age.truncate(self.capacity);
            seen = by_age.into_iter().collect();
        }
        self.half_closed = seen;
        self.last_scan = Some(now);
        resolved
    }

    /// The namespaces of the connections tracked: a scan walks these
    /// whatever their counters say, so a connection is never resolved by a
    /// namespace left out.
    pub fn namespaces(&self) -> HashSet<u32> {
        self.half_closed.keys().map(|key| key.netns).collect()
    }

    /// A reset ended the connection of `key`: resolves it if it was stuck.
    pub fn reset(&mut self, key: &ConnKey, at: SystemTime) -> Option<Resolved> {
        // Every reset asks, and a removal hashes its key even from an empty
        // table: SipHash over two socket addresses, 2 % of a storm's event
        // loop, where nothing is half-closed.
        if self.half_closed.is_empty() {
            return None;
        }
        let stuck = self.half_closed.remove(key)?;
        stuck.stuck_reported_at?;
        let mut after = stuck.clone();
        after.state = TcpState::Close;
        Some(resolution(&stuck, after, at))
    }

    /// Half-closed connections stuck for at least `after`, reported again
    /// every `repeat` while they stay so.
    pub fn stuck(&mut self, now: SystemTime, after: Duration, repeat: Duration) -> Vec<Connection> {
        let mut due = Vec::new();
        for conn in self.half_closed.values_mut() {
            let age = now.duration_since(conn.since).unwrap_or_default();
            let again = conn
                .stuck_reported_at
                .is_none_or(|at| now.duration_since(at).unwrap_or_default() >= repeat);
            if age >= after && again {
                conn.stuck_reported_at = Some(now);
                due.push(conn.clone());
            }
        }
        due.sort_by_key(|c| c.since);
        due
    }

    /// How many of the connections `wanted` keeps are stuck now (due a
    /// report and not yet moved on), per state and the cgroup they were
    /// created in: the caller names each cgroup's pod once, however many of
    /// its connections are stuck. `stuck` marks every connection due, the
    /// ones the caller's filters then drop too.
    pub fn stuck_counts(
        &self,
        mut wanted: impl FnMut(&Connection) -> bool,
    ) -> HashMap<(TcpState, Option<u64>), usize> {
        let mut counts = HashMap::new();
        for conn in self.half_closed.values() {
            if conn.stuck_reported_at.is_some() && wanted(conn) {
                *counts.entry((conn.state, conn.cgroup_id)).or_default() += 1;
            }
        }
        counts
    }
}

/// What a scan says now about a connection it already knew in this state.
fn refresh(conn: &mut Connection, found: &ScannedSocket) {
    conn.orphaned = Some(found.orphaned);
    conn.inode = found.inode;
    conn.cgroup_id = found.cgroup_id.or(conn.cgroup_id);
    if let Some(history) = &found.history {
        conn.learn(history);
    }
}

fn resolution(stuck: &Connection, now_conn: Connection, now: SystemTime) -> Resolved {
    Resolved {
        stuck_state: stuck.state,
        stuck_for: now.duration_since(stuck.since).unwrap_or_default(),
        conn: now_conn,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::event::RstKind,
        testing::{facts, key, proxy_half_close, reset, scanned, t},
    };

    const AFTER: Duration = Duration::from_secs(30);
    const REPEAT: Duration = Duration::from_secs(60);

    #[test]
    fn a_marked_half_close_is_stuck_once_per_interval_with_its_history() {
        let mut tracker = Tracker::new(100);
        tracker.scan(t(0), Vec::new());
        let fw2 = || vec![scanned(TcpState::FinWait2, Some(proxy_half_close()), false)];
        assert!(tracker.scan(t(11), fw2()).is_empty());
        assert!(tracker.stuck(t(11), AFTER, REPEAT).is_empty());
        tracker.scan(t(40), fw2());
        let stuck = tracker.stuck(t(40), AFTER, REPEAT);
        let [conn] = stuck.as_slice() else {
            panic!("{stuck:?}")
        };
        assert_eq!(conn.state, TcpState::FinWait2);
        // From the mark: when FIN_WAIT2 began, not when the scan saw it.
        assert_eq!(conn.since, t(10));
        assert!(conn.seen_from_start);
        assert_eq!(conn.orphaned, Some(false));
        assert_eq!(
            conn.initiator.as_ref().unwrap().to_string(),
            "shutdown(SHUT_WR) by envoy[51435]"
        );
        assert_eq!(conn.our_fin_at, Some(t(10)));
        assert_eq!(conn.peer_fin_at, None);
        let states: Vec<_> = conn.history.iter().map(|s| (s.state, s.at)).collect();
        assert_eq!(
            states,
            [
                (TcpState::Established, None),
                (TcpState::FinWait1, Some(t(10))),
                (TcpState::FinWait2, Some(t(10)))
            ]
        );
        assert!(tracker.stuck(t(41), AFTER, REPEAT).is_empty());
        assert_eq!(tracker.stuck(t(101), AFTER, REPEAT).len(), 1);
        assert_eq!(
            tracker.stuck_counts(|_| true),
            HashMap::from([((TcpState::FinWait2, None), 1)])
        );
        assert_eq!(tracker.stuck_counts(|_| false), HashMap::new());
    }

    /// A socket found with a silent peer: aged from the peer's last ACK,
    /// so a leak older than tcprst is reported at the first scan.
    #[test]
    fn a_silent_peer_dates_fin_wait2_and_close_wait() {
        let quiet = |state, secs| ScannedSocket {
            peer_quiet: Some(Duration::from_secs(secs)),
            ..scanned(state, None, false)
        };
        let mut tracker = Tracker::new(100);
        tracker.scan(t(100), vec![quiet(TcpState::CloseWait, 40)]);
        let [conn] = tracker.stuck(t(100), AFTER, REPEAT).try_into().unwrap();
        assert_eq!(conn.since, t(60));
        assert!(!conn.seen_from_start, "a lower bound");
        // Unknown before the first scan, as without tcp_info.
        assert_eq!(conn.peer_fin_at, None);

        // Not seen so by the scan at t(100): it entered FIN_WAIT2 since, not
        // when the peer's last ACK says.
        let mut tracker = Tracker::new(100);
        tracker.scan(t(100), Vec::new());
        tracker.scan(t(110), vec![quiet(TcpState::FinWait2, 40)]);
        let [conn] = tracker.stuck(t(140), AFTER, REPEAT).try_into().unwrap();
        assert_eq!(conn.since, t(100));
        assert!(conn.seen_from_start);

        // Later in CLOSE_WAIT, the peer's FIN is dated too.
        tracker.scan(t(120), vec![quiet(TcpState::CloseWait, 5)]);
        let [conn] = tracker.stuck(t(150), AFTER, REPEAT).try_into().unwrap();
        assert_eq!((conn.since, conn.peer_fin_at), (t(115), Some(t(115))));

        // FIN_WAIT1 starts with our FIN, after whatever the peer sent last.
        let mut tracker = Tracker::new(100);
        tracker.scan(t(100), vec![quiet(TcpState::FinWait1, 40)]);
        assert!(tracker.stuck(t(100), AFTER, REPEAT).is_empty());
    }

    #[test]
    fn a_held_fin_wait2_gone_from_the_table_got_the_peers_fin() {
        let mut tracker = Tracker::new(100);
        tracker.scan(t(0), Vec::new());
        tracker.scan(
            t(11),
            vec![scanned(TcpState::FinWait2, Some(proxy_half_close()), false)],
        );
        tracker.stuck(t(40), AFTER, REPEAT);
        let [resolved] = tracker.scan(t(50), Vec::new()).try_into().unwrap();
        assert_eq!(resolved.stuck_state, TcpState::FinWait2);
        assert_eq!(resolved.stuck_for, Duration::from_secs(40));
        assert_eq!(resolved.conn.peer_fin_at, Some(t(50)));
        assert_eq!(tracker.tracked(), 0);
    }

    #[test]
    fn a_namespace_left_unread_resolves_none_of_its_connections() {
        let mut tracker = Tracker::new(100);
        tracker.scan(t(0), Vec::new());
        tracker.scan(t(11), vec![scanned(TcpState::CloseWait, None, false)]);
        assert_eq!(tracker.stuck(t(45), AFTER, REPEAT).len(), 1);
        // Its dump failed: nothing is known of it.
        let unread = HashSet::from([key().netns]);
        assert!(tracker.scan_except(t(50), Vec::new(), &unread).is_empty());
        assert_eq!(tracker.tracked(), 1);
        // Read again, and gone.
        let [resolved] = tracker.scan(t(60), Vec::new()).try_into().unwrap();
        assert_eq!(resolved.stuck_state, TcpState::CloseWait);
        assert_eq!(tracker.tracked(), 0);
    }

    #[test]
    fn a_reset_resolves_without_a_peer_fin() {
        let mut tracker = Tracker::new(100);
        tracker.scan(t(0), Vec::new());
        tracker.scan(
            t(11),
            vec![scanned(TcpState::FinWait2, Some(proxy_half_close()), false)],
        );
        assert_eq!(tracker.reset(&key(), t(20)), None, "not reported yet");
        tracker.scan(
            t(21),
            vec![scanned(TcpState::FinWait2, Some(proxy_half_close()), false)],
        );
        tracker.stuck(t(40), AFTER, REPEAT);
        let resolved = tracker.reset(&key(), t(45)).unwrap();
        assert_eq!(resolved.conn.state, TcpState::Close);
        assert_eq!(resolved.conn.peer_fin_at, None);
        assert!(tracker.scan(t(50), Vec::new()).is_empty());
    }

    #[test]
    fn close_wait_moving_to_last_ack_is_resolved_and_tracked_on() {
        let mut tracker = Tracker::new(100);
        tracker.scan(t(0), Vec::new());
        tracker.scan(t(5), vec![scanned(TcpState::CloseWait, None, false)]);
        let stuck = tracker.stuck(t(40), AFTER, REPEAT);
        assert_eq!(stuck[0].peer_fin_at, Some(t(5)));
        assert!(stuck[0].seen_from_start);
        let [resolved] = tracker
            .scan(t(41), vec![scanned(TcpState::LastAck, None, true)])
            .try_into()
            .unwrap();
        assert_eq!(
            (resolved.stuck_state, resolved.conn.state),
            (TcpState::CloseWait, TcpState::LastAck)
        );
        assert_eq!(tracker.tracked(), 1);
    }

    #[test]
    fn sockets_half_closed_before_the_first_scan_have_lower_bound_ages() {
        let mut tracker = Tracker::new(100);
        tracker.scan(t(0), vec![scanned(TcpState::CloseWait, None, false)]);
        let stuck = tracker.stuck(t(100), AFTER, REPEAT);
        assert!(!stuck[0].seen_from_start);
        assert_eq!(stuck[0].since, t(0));
        assert_eq!(stuck[0].peer_fin_at, None);
    }

    #[test]
    fn bounded_keeping_the_oldest() {
        let mut tracker = Tracker::new(2);
        tracker.scan(t(0), Vec::new());
        let at = |port: u16, secs: u64| {
            let mut s = scanned(TcpState::FinWait2, None, true);
            s.key.local.set_port(port);
            s.history = Some(crate::testing::mark(
                crate::model::event::CloseOp::Close,
                t(secs),
                &[(TcpState::FinWait2, t(secs))],
            ));
            s
        };
        tracker.scan(t(10), vec![at(1, 3), at(2, 1), at(3, 2)]);
        assert_eq!(tracker.tracked(), 2);
        assert_eq!(tracker.untracked, 1);
        let ports: Vec<_> = tracker
            .stuck(t(100), AFTER, REPEAT)
            .iter()
            .map(|c| c.key.local.port())
            .collect();
        assert_eq!(ports, [2, 3]);
    }

    #[test]
    fn a_reset_reads_its_context_from_the_socket() {
        let mut ev = reset(RstKind::Received, t(15), Some(TcpState::FinWait2), None);
        assert_eq!(RstContext::of(&ev).conn, None);
        ev.socket = Some(facts(true, false));
        ev.history = Some(proxy_half_close());
        let ctx = RstContext::of(&ev);
        let conn = ctx.conn.unwrap();
        assert!(!ctx.from_timewait);
        assert_eq!(conn.orphaned, Some(false));
        assert_eq!(conn.inode, Some(4242));
        assert_eq!(conn.initiated_at, Some(t(10)));
        assert_eq!(conn.history.len(), 3);
        let timewait = reset(
            RstKind::Sent,
            t(15),
            Some(TcpState::TimeWait),
            Some("TCP_TIMEWAIT_SOCKET"),
        );
        assert!(RstContext::of(&timewait).from_timewait);
    }
}
