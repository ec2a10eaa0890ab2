//! Follows every TCP connection's close sequence from state changes, so a
//! reset or a stuck socket can be explained by what happened before it.
//!
//! Connections are keyed by namespace and both ends: the kernel allows one
//! socket per 4-tuple per namespace at a time, resets sent with no socket
//! and sock_diag snapshots carry only the tuple, and the tuple survives the
//! hand-over from a full socket to its timewait mini-socket. Successive
//! connections reusing a tuple get distinct generations and never merge.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::SocketAddr,
    num::NonZeroUsize,
    time::{Duration, SystemTime},
};

use lru::LruCache;

use crate::event::{ExecContext, Initiator, Process, RstEvent, StateChange, TcpState};

/// Transitions kept per connection.
const HISTORY: usize = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// 0 when the kernel BTF was unavailable.
    pub netns: u32,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

impl ConnKey {
    pub fn new(netns: Option<u32>, local: SocketAddr, remote: SocketAddr) -> Self {
        Self {
            netns: netns.unwrap_or(0),
            local,
            remote,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub at: SystemTime,
    pub state: TcpState,
    pub by: Option<Initiator>,
}

/// The states in which one side has sent FIN and the other has not.
pub fn is_half_closed(state: TcpState) -> bool {
    use TcpState::*;
    matches!(state, FinWait1 | FinWait2 | CloseWait | LastAck | Closing)
}

#[derive(Debug, Clone, PartialEq)]
pub struct Connection {
    pub key: ConnKey,
    pub generation: u64,
    pub state: TcpState,
    /// When the connection entered `state`.
    pub since: SystemTime,
    /// False for connections found already open: their ages are lower bounds.
    pub seen_from_start: bool,
    pub history: VecDeque<Step>,
    /// The process that started the close sequence.
    pub initiator: Option<Initiator>,
    pub initiated_at: Option<SystemTime>,
    /// Known from the initiator, or from sock_diag for snapshot entries.
    pub orphaned: Option<bool>,
    pub our_fin_at: Option<SystemTime>,
    pub peer_fin_at: Option<SystemTime>,
    pub ended_at: Option<SystemTime>,
    /// When a stuck report about the current state last went out.
    pub stuck_reported_at: Option<SystemTime>,
    /// The cgroup (v2) the socket was created in.
    pub cgroup_id: Option<u64>,
    /// The last process seen changing the connection's state.
    pub owner: Option<Process>,
}

impl Connection {
    fn new(
        key: ConnKey,
        generation: u64,
        state: TcpState,
        at: SystemTime,
        from_start: bool,
    ) -> Self {
        Self {
            key,
            generation,
            state,
            since: at,
            seen_from_start: from_start,
            history: VecDeque::new(),
            initiator: None,
            initiated_at: None,
            orphaned: None,
            our_fin_at: None,
            peer_fin_at: None,
            ended_at: None,
            stuck_reported_at: None,
            cgroup_id: None,
            owner: None,
        }
    }

    /// A connection found open (by sock_diag) rather than seen starting.
    pub fn found(key: ConnKey, state: TcpState, orphaned: bool, now: SystemTime) -> Self {
        let mut conn = Self::new(key, 0, state, now, false);
        conn.orphaned = Some(orphaned);
        conn
    }

    fn apply(&mut self, ev: &StateChange) {
        use TcpState::*;
        let from = self.state;
        self.state = ev.new;
        self.since = ev.time;
        self.cgroup_id = ev.cgroup_id.or(self.cgroup_id);
        if ev.context == ExecContext::Process
            && let Some(task) = &ev.task
        {
            self.owner = Some(Process {
                pid: task.pid,
                comm: task.comm.clone(),
            });
        }
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(Step {
            at: ev.time,
            state: ev.new,
            by: ev.initiator.clone(),
        });
        if let Some(initiator) = &ev.initiator
            && self.initiator.is_none()
        {
            self.orphaned = Some(initiator.op.orphans());
            self.initiator = Some(initiator.clone());
            self.initiated_at = Some(ev.time);
        } else if let Some(initiator) = &ev.initiator
            && initiator.op.orphans()
        {
            // A close() after an earlier shutdown() orphans the socket.
            self.orphaned = Some(true);
        }
        match (from, ev.new) {
            (_, FinWait1 | LastAck) => self.our_fin_at = Some(ev.time),
            (_, CloseWait | Closing) => self.peer_fin_at = Some(ev.time),
            // A full socket in FIN_WAIT2 that gets the peer's FIN goes on as
            // a timewait mini-socket, so the tracepoint shows FIN_WAIT2 →
            // CLOSE. An orphan reaching FIN_WAIT2 is handed over the same way
            // without any FIN, so only count it for sockets a process holds.
            (FinWait2, Close) if self.orphaned != Some(true) => self.peer_fin_at = Some(ev.time),
            _ => {}
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

/// What the tracker knows about the connection a reset belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct RstContext {
    pub conn: Option<Connection>,
    /// The connection had ended before this reset (a late segment).
    pub ended_before: bool,
}

pub struct Tracker {
    live: LruCache<ConnKey, Connection>,
    /// Recently ended connections, for resets that arrive after the end.
    ended: LruCache<ConnKey, Connection>,
    /// (local, remote) → namespace, to find a connection's other end when it
    /// lives in another namespace on this host (a pod across a veth).
    by_ends: HashMap<(SocketAddr, SocketAddr), u32>,
    half_closed: HashSet<ConnKey>,
    next_generation: u64,
    pub evicted: u64,
}

impl Tracker {
    pub fn new(capacity: usize) -> Self {
        let cap = NonZeroUsize::new(capacity.max(1)).expect("nonzero");
        let ended_cap = NonZeroUsize::new((capacity / 4).max(1)).expect("nonzero");
        Self {
            live: LruCache::new(cap),
            ended: LruCache::new(ended_cap),
            by_ends: HashMap::new(),
            half_closed: HashSet::new(),
            next_generation: 1,
            evicted: 0,
        }
    }

    /// Connections followed now.
    pub fn tracked(&self) -> usize {
        self.live.len()
    }

    /// Adds a connection found open before tracing started.
    pub fn seed(&mut self, key: ConnKey, state: TcpState, orphaned: bool, now: SystemTime) {
        if self.live.contains(&key) {
            // Already seen changing state since tracing started.
            return;
        }
        let mut conn = Connection::found(key, state, orphaned, now);
        conn.generation = self.generation();
        self.insert(conn);
    }

    /// Applies a state change. Returns the resolution of a stuck connection
    /// when this change ends its stuck state.
    pub fn on_state(&mut self, ev: &StateChange) -> Option<Resolved> {
        use TcpState::*;
        let key = ConnKey::new(ev.netns, ev.local, ev.remote);
        let starts = ev.new == Established && matches!(ev.old, Some(SynSent | SynRecv));
        if starts && let Some(previous) = self.live.pop(&key) {
            self.end(previous, ev.time);
        }
        if !self.live.contains(&key) {
            // Not started under our eyes: it was open before tracing began.
            let generation = self.generation();
            let state = ev.old.unwrap_or(ev.new);
            self.insert(Connection::new(key, generation, state, ev.time, starts));
        }
        let conn = self.live.get_mut(&key)?;
        let stuck = conn.stuck_reported_at.map(|_| (conn.state, conn.since));
        conn.apply(ev);
        conn.stuck_reported_at = None;
        let conn = conn.clone();
        if is_half_closed(conn.state) {
            self.half_closed.insert(key);
        } else {
            self.half_closed.remove(&key);
        }
        if conn.state == Close
            && let Some(ended) = self.live.pop(&key)
        {
            self.end(ended, ev.time);
        }
        stuck.map(|(stuck_state, since)| Resolved {
            stuck_for: ev.time.duration_since(since).unwrap_or_default(),
            stuck_state,
            conn,
        })
    }

    /// The connection a reset belongs to, live or recently ended.
    pub fn context_of(&mut self, ev: &RstEvent) -> RstContext {
        let key = ConnKey::new(ev.netns, ev.local, ev.remote);
        if let Some(conn) = self.live.get(&key) {
            return RstContext {
                conn: Some(conn.clone()),
                ended_before: false,
            };
        }
        match self.ended.get(&key) {
            Some(conn) => RstContext {
                // An active reset moves the socket to CLOSE just before it is
                // sent: that end is part of this reset, not before it.
                ended_before: conn.ended_at.is_some_and(|end| {
                    ev.time.duration_since(end).unwrap_or_default() > Duration::from_millis(5)
                }),
                conn: Some(conn.clone()),
            },
            None => RstContext {
                conn: None,
                ended_before: false,
            },
        }
    }

    /// The other end of a connection, when this host has it too: over
    /// loopback in the same namespace, or in another namespace.
    pub fn peer_of(&self, key: &ConnKey) -> Option<Connection> {
        let (local, remote) = (key.remote, key.local);
        let same_netns = ConnKey {
            netns: key.netns,
            local,
            remote,
        };
        let other_netns = self.by_ends.get(&(local, remote)).map(|&netns| ConnKey {
            netns,
            local,
            remote,
        });
        [Some(same_netns), other_netns]
            .into_iter()
            .flatten()
            .find_map(|k| self.live.peek(&k).or_else(|| self.ended.peek(&k)))
            .cloned()
    }

    /// Half-closed connections stuck for at least `after`, reported again
    /// every `repeat` while they stay so.
    pub fn stuck(&mut self, now: SystemTime, after: Duration, repeat: Duration) -> Vec<Connection> {
        let mut due = Vec::new();
        for key in &self.half_closed {
            let Some(conn) = self.live.peek_mut(key) else {
                continue;
            };
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

    /// How many connections are stuck now (reported and not yet moved on),
    /// per half-closed state.
    pub fn stuck_counts(&self) -> Vec<(TcpState, usize)> {
        use TcpState::*;
        [FinWait1, FinWait2, CloseWait, LastAck, Closing]
            .into_iter()
            .map(|state| {
                let n = self
                    .half_closed
                    .iter()
                    .filter_map(|key| self.live.peek(key))
                    .filter(|c| c.state == state && c.stuck_reported_at.is_some())
                    .count();
                (state, n)
            })
            .collect()
    }

    fn generation(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation - 1
    }

    fn insert(&mut self, conn: Connection) {
        let key = conn.key;
        if is_half_closed(conn.state) {
            self.half_closed.insert(key);
        }
        self.by_ends.insert((key.local, key.remote), key.netns);
        if let Some((evicted, _)) = self.live.push(key, conn)
            && evicted != key
        {
            self.half_closed.remove(&evicted);
            self.forget_ends(&evicted);
            self.evicted += 1;
        }
    }

    fn end(&mut self, mut conn: Connection, at: SystemTime) {
        let key = conn.key;
        self.half_closed.remove(&key);
        conn.ended_at = Some(at);
        if let Some((evicted, _)) = self.ended.push(key, conn)
            && evicted != key
        {
            self.forget_ends(&evicted);
        }
    }

    /// Drops the index entry of a connection no longer tracked anywhere.
    fn forget_ends(&mut self, key: &ConnKey) {
        let ends = (key.local, key.remote);
        if self.by_ends.get(&ends) == Some(&key.netns)
            && !self.live.contains(key)
            && !self.ended.contains(key)
        {
            self.by_ends.remove(&ends);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::event::{AttachTier, CloseOp, Errno, ResetHook, RstKind, ShutHow, Task};

    pub fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    pub fn task(pid: u32, comm: &str) -> Task {
        Task {
            pid,
            tid: pid,
            comm: comm.into(),
            uid: 0,
        }
    }

    pub fn change(
        at: SystemTime,
        old: TcpState,
        new: TcpState,
        by: Option<CloseOp>,
    ) -> StateChange {
        StateChange {
            time: at,
            local: "10.0.0.1:15001".parse().unwrap(),
            remote: "10.0.0.2:44410".parse().unwrap(),
            netns: Some(4026532000),
            old: Some(old),
            new,
            context: if by.is_some() {
                ExecContext::Process
            } else {
                ExecContext::Softirq
            },
            task: by.map(|_| task(51435, "envoy")),
            initiator: by.map(|op| Initiator {
                op,
                task: task(51435, "envoy"),
            }),
            cgroup_id: None,
        }
    }

    pub fn reset(
        kind: RstKind,
        at: SystemTime,
        state: Option<TcpState>,
        reason: Option<&str>,
    ) -> RstEvent {
        RstEvent {
            time: at,
            kind,
            local: "10.0.0.1:15001".parse().unwrap(),
            remote: "10.0.0.2:44410".parse().unwrap(),
            state,
            reason: reason.map(Into::into),
            sock_cookie: None,
            netns: Some(4026532000),
            context: ExecContext::Softirq,
            task: None,
            errno: state.and_then(Errno::for_reset_in),
            cgroup_id: None,
            owner: None,
            stack_id: None,
            hook: match kind {
                RstKind::Sent => ResetHook::SendResetTracepoint,
                RstKind::Received => ResetHook::ReceiveResetTracepoint,
            },
            tier: AttachTier::Tracepoint,
            nf_hook: None,
        }
    }

    /// The seed 002 sequence on the proxy's downstream socket.
    pub fn proxy_half_close(tracker: &mut Tracker) {
        use TcpState::*;
        tracker.on_state(&change(t(0), SynRecv, Established, None));
        tracker.on_state(&change(
            t(10),
            Established,
            FinWait1,
            Some(CloseOp::Shutdown(ShutHow::Write)),
        ));
        tracker.on_state(&change(t(10), FinWait1, FinWait2, None));
    }

    #[test]
    fn follows_a_half_close_and_reports_it_stuck_once_per_interval() {
        let mut tracker = Tracker::new(100);
        proxy_half_close(&mut tracker);
        let repeat = Duration::from_secs(60);
        assert!(
            tracker
                .stuck(t(11), Duration::from_secs(30), repeat)
                .is_empty()
        );
        let stuck = tracker.stuck(t(40), Duration::from_secs(30), repeat);
        assert_eq!(stuck.len(), 1);
        let conn = &stuck[0];
        assert_eq!(conn.state, TcpState::FinWait2);
        assert_eq!(conn.since, t(10));
        assert_eq!(conn.orphaned, Some(false));
        assert_eq!(
            conn.initiator.as_ref().unwrap().to_string(),
            "shutdown(SHUT_WR) by envoy[51435]"
        );
        assert_eq!(conn.our_fin_at, Some(t(10)));
        assert_eq!(conn.peer_fin_at, None);
        assert!(conn.seen_from_start);
        let states: Vec<_> = conn.history.iter().map(|s| s.state).collect();
        assert_eq!(
            states,
            [
                TcpState::Established,
                TcpState::FinWait1,
                TcpState::FinWait2
            ]
        );
        // Not again until `repeat` has passed.
        assert!(
            tracker
                .stuck(t(41), Duration::from_secs(30), repeat)
                .is_empty()
        );
        assert_eq!(
            tracker.stuck(t(101), Duration::from_secs(30), repeat).len(),
            1
        );
    }

    #[test]
    fn a_stuck_connection_that_moves_on_is_resolved() {
        let mut tracker = Tracker::new(100);
        proxy_half_close(&mut tracker);
        tracker.stuck(t(40), Duration::from_secs(30), Duration::from_secs(60));
        let resolved = tracker
            .on_state(&change(t(50), TcpState::FinWait2, TcpState::Close, None))
            .unwrap();
        assert_eq!(resolved.stuck_state, TcpState::FinWait2);
        assert_eq!(resolved.stuck_for, Duration::from_secs(40));
        assert_eq!(resolved.conn.peer_fin_at, Some(t(50)));
        assert_eq!(tracker.tracked(), 0);
        assert!(
            tracker
                .stuck(t(200), Duration::from_secs(30), Duration::from_secs(60))
                .is_empty()
        );
    }

    #[test]
    fn unreported_connections_resolve_silently() {
        let mut tracker = Tracker::new(100);
        proxy_half_close(&mut tracker);
        assert_eq!(
            tracker.on_state(&change(t(12), TcpState::FinWait2, TcpState::Close, None)),
            None
        );
    }

    #[test]
    fn a_reused_tuple_starts_a_new_generation() {
        use TcpState::*;
        let mut tracker = Tracker::new(100);
        proxy_half_close(&mut tracker);
        tracker.on_state(&change(t(20), FinWait2, Close, None));
        tracker.on_state(&change(t(30), SynRecv, Established, None));
        let rst = reset(RstKind::Received, t(31), Some(Established), None);
        let ctx = tracker.context_of(&rst);
        let conn = ctx.conn.unwrap();
        assert_eq!(conn.history.len(), 1);
        assert_eq!(conn.initiator, None);
        assert!(!ctx.ended_before);
    }

    #[test]
    fn an_orphan_handed_to_timewait_is_not_a_peer_fin() {
        use TcpState::*;
        let mut tracker = Tracker::new(100);
        tracker.on_state(&change(t(0), SynSent, Established, None));
        tracker.on_state(&change(t(1), Established, FinWait1, Some(CloseOp::Close)));
        tracker.on_state(&change(t(1), FinWait1, FinWait2, None));
        tracker.on_state(&change(t(1), FinWait2, Close, None));
        let ctx = tracker.context_of(&reset(RstKind::Sent, t(9), None, Some("NO_SOCKET")));
        let conn = ctx.conn.unwrap();
        assert!(ctx.ended_before);
        assert_eq!(conn.peer_fin_at, None);
        assert_eq!(conn.orphaned, Some(true));
    }

    #[test]
    fn first_seen_mid_life_and_seeded_connections_are_not_from_start() {
        let mut tracker = Tracker::new(100);
        let ev = change(t(5), TcpState::Established, TcpState::CloseWait, None);
        tracker.on_state(&ev);
        let stuck = tracker.stuck(t(100), Duration::from_secs(30), Duration::from_secs(60));
        assert!(!stuck[0].seen_from_start);
        let key = ConnKey::new(
            Some(1),
            "[::1]:1".parse().unwrap(),
            "[::1]:2".parse().unwrap(),
        );
        tracker.seed(key, TcpState::FinWait2, true, t(0));
        let stuck = tracker.stuck(t(200), Duration::from_secs(30), Duration::from_secs(60));
        assert_eq!(stuck.len(), 2);
    }

    #[test]
    fn finds_the_other_end_in_any_namespace() {
        use TcpState::*;
        let mut tracker = Tracker::new(100);
        let mut client = change(t(0), SynSent, Established, None);
        (client.local, client.remote) = (client.remote, client.local);
        client.netns = Some(1);
        tracker.on_state(&client);
        tracker.on_state(&change(t(0), SynRecv, Established, None));
        let server = ConnKey::new(
            Some(4026532000),
            "10.0.0.1:15001".parse().unwrap(),
            "10.0.0.2:44410".parse().unwrap(),
        );
        let peer = tracker.peer_of(&server).unwrap();
        assert_eq!(peer.key.netns, 1);
        assert_eq!(peer.key.local, server.remote);
        // It stays findable for a while after it ends.
        let mut end = client.clone();
        (end.old, end.new) = (Some(Established), Close);
        tracker.on_state(&end);
        assert_eq!(tracker.peer_of(&server).unwrap().key.netns, 1);
        let nobody = ConnKey::new(
            Some(1),
            "10.9.9.9:1".parse().unwrap(),
            "10.9.9.8:2".parse().unwrap(),
        );
        assert!(tracker.peer_of(&nobody).is_none());
    }

    #[test]
    fn bounded_with_evictions_counted() {
        let mut tracker = Tracker::new(2);
        for port in 1..=3u16 {
            let mut ev = change(t(0), TcpState::SynSent, TcpState::Established, None);
            ev.local.set_port(port);
            tracker.on_state(&ev);
        }
        assert_eq!(tracker.tracked(), 2);
        assert_eq!(tracker.evicted, 1);
    }
}
