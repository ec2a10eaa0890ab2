//! Where a received reset came from. A reset this host sent, from its TCP
//! stack or from a netfilter rule tcprst watches, shows up as an rst_sent
//! with the mirrored tuple; one nothing here explains came from elsewhere:
//! another host, a middlebox, a userspace TCP stack (slirp4netns), or a
//! netfilter rule on a kernel where nf_send_reset cannot be hooked.
//!
//! The two records do not arrive in a fixed order (before 6.10 an active
//! reset fires its tracepoint after the peer already processed it), so a
//! received reset waits for the send that explains it. A send and a
//! receipt match when they have mirrored ends and their kernel times
//! (monotonic, so wall-clock steps change nothing) are at most
//! `MATCH_WINDOW` apart. Both are found by their ends, so a storm of
//! resets costs the same per record as a trickle.
//!
//! A waiting receipt is declared not local only when no send that could
//! explain it can still come, judged by what was read rather than by how
//! long reading took, so a reader that stalls behind a full ring buffer
//! mislabels nothing:
//! - the records moved on: one read is more than `MATCH_WINDOW` newer, in
//!   kernel time, than the receipt (which bounds the wait in a storm);
//! - or the ring buffer was read empty by a drain that began `HOLD` or
//!   more after the receipt was read: a send, committed within moments of
//!   its receipt, was in the ring by then and has been read (which decides
//!   a lone reset promptly once the reader caught up).
//!
//! Where NAT on this host rewrote an end (a Service's DNAT, masquerading),
//! the two records' ends do not mirror each other. A receipt no mirrored
//! send explains is then looked up in conntrack (off the event loop), and
//! the entry's other direction gives the ends its send has: the receipt is
//! also found by those (`lookup_done`). While its lookup runs, a receipt is
//! not declared not local, for at most `LOOKUP_WAIT`.

use std::{
    borrow::Cow,
    collections::{HashMap, VecDeque},
    fmt,
    net::SocketAddr,
    time::{Duration, Instant},
};

use crate::model::event::{NfHook, ResetHook, RstEvent};

/// How far apart in kernel time a send and its receipt may be.
const MATCH_WINDOW: Duration = Duration::from_secs(1);
/// How long after a receipt was read its send is surely in the ring buffer.
const HOLD: Duration = Duration::from_millis(200);
/// Recent sends remembered; beyond this the oldest are forgotten.
const MAX_SENT: usize = 4096;
/// How long a receipt waits for its conntrack lookup at most: the lookup
/// worker answers every lookup, so this only bounds a stuck one.
const LOOKUP_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// This host's TCP stack.
    LocalTcp,
    /// A netfilter REJECT rule on this host.
    LocalNetfilter(Option<NfHook>),
    /// Nothing on this host sent it.
    NotLocal {
        /// Whether local netfilter resets would have been seen.
        netfilter_watched: bool,
    },
}

impl Origin {
    /// What the origin reads as; fixed text, but for a netfilter rule's
    /// hook. A storm's every received reset carries one, and `core::fmt`
    /// cost more than writing the text (#11).
    pub fn text(&self) -> Cow<'static, str> {
        match self {
            Self::LocalTcp => "this host's TCP stack".into(),
            Self::LocalNetfilter(Some(hook)) => {
                format!("a netfilter reject rule on this host ({})", hook.name()).into()
            }
            Self::LocalNetfilter(None) => "a netfilter reject rule on this host".into(),
            Self::NotLocal {
                netfilter_watched: false,
            } => "not a local TCP socket (netfilter, middlebox or userspace stack)".into(),
            Self::NotLocal {
                netfilter_watched: true,
            } => "not a local TCP socket or netfilter rule (another host, a middlebox or a userspace stack)"
                .into(),
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

/// (local, remote) as the receiving end sees them.
pub(crate) type Ends = (SocketAddr, SocketAddr);

/// What matching needs of a received reset, so its report can move in.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Receipt {
    ends: Ends,
    kernel_time: Duration,
}

impl Receipt {
    pub(crate) fn of(ev: &RstEvent) -> Self {
        Self {
            ends: (ev.local, ev.remote),
            kernel_time: ev.kernel_time,
        }
    }
}

/// What matching could not do, for the exit summary and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OriginStats {
    /// Sends forgotten while still inside their match window because
    /// `MAX_SENT` newer ones were remembered: a receipt only one of them
    /// explains, read after that, is reported as not local.
    pub sends_overflowed: u64,
    /// Received resets no send explained before their wait ended, reported
    /// as not local.
    pub receipts_unmatched: u64,
}

struct Sent<S> {
    kernel_time: Duration,
    origin: Origin,
    sender: S,
}

struct Held<T> {
    ends: Ends,
    kernel_time: Duration,
    read_at: Instant,
    report: T,
    /// Its conntrack lookup has not answered yet.
    awaiting_lookup: bool,
    /// The ends its send has across NAT, from conntrack.
    alias: Option<Ends>,
}

/// Matches received resets with the sends that explain them; `T` is the
/// prepared report that waits meanwhile, `S` what a send tells about its
/// socket (the receipt's peer on this host).
pub(crate) struct Origins<T, S> {
    /// Remembered sends by the ends of the receipts they explain, each list
    /// in the order read.
    sent: HashMap<Ends, VecDeque<Sent<S>>>,
    /// The ends of every remembered send in the order read, so the oldest
    /// is forgotten first: always the front of its list in `sent`.
    sent_order: VecDeque<Ends>,
    /// Waiting receipts in the order read, which is the order they are
    /// decided in; None once a send explained one. Boxed so that, while an
    /// old receipt waits at the front, the explained ones behind it cost a
    /// pointer each.
    held: VecDeque<Option<Box<Held<T>>>>,
    /// The number of receipts ever held before `held`'s front, so a
    /// receipt's number finds it in `held`.
    held_before: u64,
    /// The numbers of the waiting receipts by their ends, in the order read.
    held_by_ends: HashMap<Ends, VecDeque<u64>>,
    /// The numbers of waiting receipts by the ends NAT gave their sends.
    held_by_alias: HashMap<Ends, VecDeque<u64>>,
    /// The newest kernel time read: how far the records have moved on.
    newest: Duration,
    netfilter_watched: bool,
    stats: OriginStats,
}

/// A received reset's report, where it came from, and what its sender
/// told, when this host sent it.
pub(crate) type Explained<T, S> = (T, Origin, Option<S>);

impl<T, S: Clone> Origins<T, S> {
    pub fn new(netfilter_watched: bool) -> Self {
        Self {
            sent: HashMap::new(),
            sent_order: VecDeque::new(),
            held: VecDeque::new(),
            held_before: 0,
            held_by_ends: HashMap::new(),
            held_by_alias: HashMap::new(),
            newest: Duration::ZERO,
            netfilter_watched,
            stats: OriginStats::default(),
        }
    }

    pub(crate) fn stats(&self) -> OriginStats {
        self.stats
    }

    /// Remembers a reset this host sent; returns the held received resets
    /// it explains.
    pub(crate) fn sent(&mut self, ev: &RstEvent, sender: S) -> Vec<Explained<T, S>> {
        self.moved_to(ev.kernel_time);
        let origin = match ev.hook {
            ResetHook::NfSendReset | ResetHook::NfSendReset6 => Origin::LocalNetfilter(ev.nf_hook),
            _ => Origin::LocalTcp,
        };
        // The receiving end's view of the same connection.
        let ends = (ev.remote, ev.local);
        let mut explained = Vec::new();
        let mut aliased = Vec::new();
        if let Some(waiting) = self.held_by_ends.get_mut(&ends) {
            waiting.retain(|number| {
                let slot = &mut self.held[(number - self.held_before) as usize];
                if slot
                    .as_ref()
                    .is_some_and(|held| close_in_time(held.kernel_time, ev.kernel_time))
                {
                    let held = slot.take().expect("checked above");
                    aliased.push((held.alias, *number));
                    explained.push((held.report, origin.clone(), Some(sender.clone())));
                    return false;
                }
                true
            });
            if waiting.is_empty() {
                self.held_by_ends.remove(&ends);
            }
        }
        for (alias, number) in aliased {
            self.forget_by_alias(alias, number);
        }
        if let Some(waiting) = self.held_by_alias.remove(&ends) {
            let mut left = VecDeque::new();
            for number in waiting {
                let Some(slot) = number
                    .checked_sub(self.held_before)
                    .and_then(|i| self.held.get_mut(i as usize))
                else {
                    continue;
                };
                match slot.take() {
                    Some(held) if close_in_time(held.kernel_time, ev.kernel_time) => {
                        self.forget_by_ends(held.ends, number);
                        explained.push((held.report, origin.clone(), Some(sender.clone())));
                    }
                    other => {
                        if other.is_some() {
                            left.push_back(number);
                        }
                        *slot = other;
                    }
                }
            }
            if !left.is_empty() {
                self.held_by_alias.insert(ends, left);
            }
        }
        if self.sent_order.len() == MAX_SENT {
            // Sends out of every receipt's window went in `moved_to`.
            self.forget_oldest_send();
            self.stats.sends_overflowed += 1;
        }
        self.sent.entry(ends).or_default().push_back(Sent {
            kernel_time: ev.kernel_time,
            origin,
            sender,
        });
        self.sent_order.push_back(ends);
        explained
    }

    /// A received reset: explained now (Ok), or held until its send arrives
    /// or `expired` finds that none can (Err: the held receipt's number, for
    /// `await_lookup` and `lookup_done`).
    pub(crate) fn receive(
        &mut self,
        receipt: Receipt,
        report: T,
        read_at: Instant,
    ) -> Result<Explained<T, S>, u64> {
        let Receipt { ends, kernel_time } = receipt;
        self.moved_to(kernel_time);
        let known = self.sent.get(&ends).and_then(|sends| {
            sends
                .iter()
                .rev()
                .find(|s| close_in_time(s.kernel_time, kernel_time))
        });
        if let Some(send) = known {
            return Ok((report, send.origin.clone(), Some(send.sender.clone())));
        }
        let number = self.held_before + self.held.len() as u64;
        self.held.push_back(Some(Box::new(Held {
            ends,
            kernel_time,
            read_at,
            report,
            awaiting_lookup: false,
            alias: None,
        })));
        self.held_by_ends.entry(ends).or_default().push_back(number);
        Err(number)
    }

    fn held_mut(&mut self, number: u64) -> Option<&mut Held<T>> {
        let index = number.checked_sub(self.held_before)?;
        self.held.get_mut(index as usize)?.as_deref_mut()
    }

    /// Held receipt `number` waits for a conntrack lookup before it can be
    /// declared not local.
    pub(crate) fn await_lookup(&mut self, number: u64) {
        if let Some(held) = self.held_mut(number) {
            held.awaiting_lookup = true;
        }
    }

    /// Receipt `number`'s lookup answered: `update` adds what it found to
    /// the report, and `alias`, the ends its send has across NAT, explains
    /// it now if that send was read, or when it is.
    pub(crate) fn lookup_done(
        &mut self,
        number: u64,
        alias: Option<Ends>,
        update: impl FnOnce(&mut T),
    ) -> Option<Explained<T, S>> {
        let held = self.held_mut(number)?;
        held.awaiting_lookup = false;
        update(&mut held.report);
        let alias = alias?;
        let kernel_time = held.kernel_time;
        let known = self.sent.get(&alias).and_then(|sends| {
            sends
                .iter()
                .rev()
                .find(|s| close_in_time(s.kernel_time, kernel_time))
        });
        if let Some(send) = known {
            let (origin, sender) = (send.origin.clone(), send.sender.clone());
            let index = (number - self.held_before) as usize;
            let held = self.held[index].take().expect("held above");
            self.forget_by_ends(held.ends, number);
            return Some((held.report, origin, Some(sender)));
        }
        self.held_mut(number).expect("held above").alias = Some(alias);
        self.held_by_alias
            .entry(alias)
            .or_default()
            .push_back(number);
        None
    }

    /// Removes number `number` from the receipts waiting under `ends`.
    fn forget_by_ends(&mut self, ends: Ends, number: u64) {
        forget(&mut self.held_by_ends, ends, number);
    }

    fn forget_by_alias(&mut self, alias: Option<Ends>, number: u64) {
        if let Some(alias) = alias {
            forget(&mut self.held_by_alias, alias, number);
        }
    }

    /// Received resets no send can explain any more (see the module
    /// comment), as not local. `read_all_before`, when known, is an instant
    /// before which everything the kernel wrote has been read: the start of
    /// a drain that read the ring buffer empty.
    pub(crate) fn expired(&mut self, read_all_before: Option<Instant>) -> Vec<Explained<T, S>> {
        let mut out = Vec::new();
        while let Some(front) = self.held.front() {
            let decided = match front {
                // Explained by a send meanwhile.
                None => false,
                Some(held) => {
                    let caught_up = read_all_before
                        .is_some_and(|at| at.saturating_duration_since(held.read_at) >= HOLD);
                    if !caught_up && !self.moved_past(held.kernel_time) {
                        break;
                    }
                    if held.awaiting_lookup && held.read_at.elapsed() < LOOKUP_WAIT {
                        break;
                    }
                    true
                }
            };
            let slot = self.held.pop_front().expect("front exists");
            let number = self.held_before;
            self.held_before += 1;
            if decided {
                let held = slot.expect("decided only when waiting");
                self.unhold(held.ends, number);
                self.forget_by_alias(held.alias, number);
                out.push(self.not_local(held.report));
            }
        }
        out
    }

    /// Everything still waiting, when tracing stops: nothing is dropped.
    pub(crate) fn flush(&mut self) -> Vec<Explained<T, S>> {
        self.held_by_ends.clear();
        self.held_by_alias.clear();
        self.held_before += self.held.len() as u64;
        let waiting: Vec<_> = self.held.drain(..).flatten().collect();
        waiting
            .into_iter()
            .map(|held| self.not_local(held.report))
            .collect()
    }

    fn not_local(&mut self, report: T) -> Explained<T, S> {
        self.stats.receipts_unmatched += 1;
        let origin = Origin::NotLocal {
            netfilter_watched: self.netfilter_watched,
        };
        (report, origin, None)
    }

    /// Removes the oldest waiting receipt of `ends`, number `number`.
    fn unhold(&mut self, ends: Ends, number: u64) {
        let waiting = self
            .held_by_ends
            .get_mut(&ends)
            .expect("a waiting receipt is indexed");
        let front = waiting.pop_front();
        debug_assert_eq!(front, Some(number), "receipts are decided in order read");
        if waiting.is_empty() {
            self.held_by_ends.remove(&ends);
        }
    }

    /// A record of kernel time `kernel_time` was read: sends too old for
    /// any receipt still to come are forgotten.
    fn moved_to(&mut self, kernel_time: Duration) {
        self.newest = self.newest.max(kernel_time);
        while let Some(ends) = self.sent_order.front() {
            let oldest = self.sent[ends].front().expect("an ordered send is kept");
            if !self.moved_past(oldest.kernel_time) {
                break;
            }
            self.forget_oldest_send();
        }
    }

    fn forget_oldest_send(&mut self) {
        let ends = self.sent_order.pop_front().expect("a send is remembered");
        let sends = self.sent.get_mut(&ends).expect("an ordered send is kept");
        sends.pop_front();
        if sends.is_empty() {
            self.sent.remove(&ends);
        }
    }

    /// Whether the records read moved more than `MATCH_WINDOW` past
    /// `kernel_time`, so that what matches a record of then was read.
    fn moved_past(&self, kernel_time: Duration) -> bool {
        self.newest.saturating_sub(kernel_time) > MATCH_WINDOW
    }
}

/// Removes `number` from the list of `ends` in `index`, and the list once empty.
fn forget(index: &mut HashMap<Ends, VecDeque<u64>>, ends: Ends, number: u64) {
    if let Some(waiting) = index.get_mut(&ends) {
        waiting.retain(|n| *n != number);
        if waiting.is_empty() {
            index.remove(&ends);
        }
    }
}

fn close_in_time(a: Duration, b: Duration) -> bool {
    a.abs_diff(b) <= MATCH_WINDOW
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, time::SystemTime};

    use super::*;
    use crate::{
        model::event::{RstKind, TcpState},
        testing::{reset, t},
    };

    fn sent_to(received: &RstEvent, at: SystemTime) -> RstEvent {
        let mut ev = reset(RstKind::Sent, at, Some(TcpState::Close), None);
        ev.local = received.remote;
        ev.remote = received.local;
        ev
    }

    fn received(at: SystemTime) -> RstEvent {
        reset(RstKind::Received, at, Some(TcpState::Established), None)
    }

    /// A receipt on connection `n`, one of many with distinct ends.
    fn received_on(n: u32, at: SystemTime) -> RstEvent {
        let mut ev = received(at);
        ev.local = SocketAddr::new(Ipv4Addr::from(0x0a00_0000 + n).into(), 40000);
        ev
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_send_seen_first_explains_the_receipt_at_once() {
        let mut origins = Origins::new(false);
        let rx = received(t(10));
        assert!(origins.sent(&sent_to(&rx, t(10)), "sender").is_empty());
        let now = Instant::now();
        assert_eq!(
            origins.receive(Receipt::of(&rx), "report", now).ok(),
            Some(("report", Origin::LocalTcp, Some("sender")))
        );
    }

    #[test]
    fn a_receipt_waits_for_a_send_that_comes_later() {
        let mut origins = Origins::new(false);
        let rx = received(t(10));
        let now = Instant::now();
        assert_eq!(origins.receive(Receipt::of(&rx), "report", now).ok(), None);
        assert!(origins.expired(Some(now)).is_empty());
        let mut nf = sent_to(&rx, t(10));
        nf.hook = ResetHook::NfSendReset;
        nf.nf_hook = Some(NfHook::Input);
        assert_eq!(
            origins.sent(&nf, "nft"),
            [(
                "report",
                Origin::LocalNetfilter(Some(NfHook::Input)),
                Some("nft")
            )]
        );
        assert!(origins.expired(Some(now + ms(200))).is_empty());
        assert_eq!(origins.stats(), OriginStats::default());
    }

    #[test]
    fn an_unexplained_receipt_is_not_local_once_the_ring_is_read_empty_200ms_later() {
        let mut origins = Origins::new(false);
        let now = Instant::now();
        let rx = received(t(10));
        // A send for another connection, and one long before, explain nothing.
        let mut other = sent_to(&rx, t(10));
        other.local = "10.9.9.9:1".parse().unwrap();
        origins.sent(&other, "other");
        origins.sent(&sent_to(&rx, t(2)), "long before");
        assert_eq!(origins.receive(Receipt::of(&rx), "report", now).ok(), None);
        assert!(origins.expired(Some(now + ms(199))).is_empty());
        // However long it waited, a ring not yet read empty may hold its send.
        assert!(origins.expired(None).is_empty());
        let out = origins.expired(Some(now + ms(200)));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].2, None);
        assert_eq!(
            out[0].1.to_string(),
            "not a local TCP socket (netfilter, middlebox or userspace stack)"
        );
        assert_eq!(origins.stats().receipts_unmatched, 1);
    }

    #[test]
    fn records_moving_past_the_window_decide_a_receipt() {
        let mut origins: Origins<_, ()> = Origins::new(false);
        let now = Instant::now();
        let rx = received(t(10));
        assert_eq!(origins.receive(Receipt::of(&rx), "report", now).ok(), None);
        // A record of another connection a whole window later: a send for
        // this receipt could still come.
        origins
            .receive(Receipt::of(&received_on(1, t(11))), "other", now)
            .ok();
        assert!(origins.expired(None).is_empty());
        origins
            .receive(Receipt::of(&received_on(2, t(11) + ms(1))), "later", now)
            .ok();
        let out = origins.expired(None);
        assert_eq!(
            out,
            [(
                "report",
                Origin::NotLocal {
                    netfilter_watched: false
                },
                None
            )]
        );
    }

    /// The reader reads the receipts, then stalls for two seconds while
    /// their sends wait in the ring buffer behind them.
    #[test]
    fn a_stalled_reader_mislabels_nothing() {
        let mut origins = Origins::new(false);
        let read_at = Instant::now();
        let receipts: Vec<_> = (0..3)
            .map(|n| received_on(n, t(10) + ms(100 * u64::from(n))))
            .collect();
        for (n, rx) in receipts.iter().enumerate() {
            assert_eq!(origins.receive(Receipt::of(rx), n, read_at).ok(), None);
        }
        // Each drain reads a full batch: the ring is not read empty.
        assert!(origins.expired(None).is_empty());
        let resumed = read_at + Duration::from_secs(2);
        // A receipt read after the stall, with nothing to explain it.
        let stranger = received_on(9, t(10) + ms(500));
        assert_eq!(
            origins.receive(Receipt::of(&stranger), 9, resumed).ok(),
            None
        );
        let mut explained = Vec::new();
        for rx in &receipts {
            explained.extend(origins.sent(&sent_to(rx, rx.time + ms(1)), "sender"));
        }
        assert_eq!(
            explained,
            [0, 1, 2].map(|n| (n, Origin::LocalTcp, Some("sender")))
        );
        // The ring read empty by a drain that began as the reader resumed.
        assert!(origins.expired(Some(resumed)).is_empty());
        let out = origins.expired(Some(resumed + ms(200)));
        assert_eq!(out.iter().map(|(n, ..)| *n).collect::<Vec<_>>(), [9]);
        assert_eq!(origins.stats().receipts_unmatched, 1);
    }

    /// 100k resets in one second of kernel time, each send and receipt
    /// read up to a thousand records away from the other, either first.
    #[test]
    fn a_storm_matches_every_reset() {
        const RESETS: u32 = 100_000;
        let mut origins = Origins::new(false);
        let read_at = Instant::now();
        let records: Vec<(u32, RstEvent)> = (0..RESETS)
            .flat_map(|n| {
                let rx = received_on(n, t(10) + Duration::from_micros(10 * u64::from(n)));
                [(n, sent_to(&rx, rx.time)), (n, rx)]
            })
            .collect();
        // Within each block of 1000 the k-th record read is the (7k mod
        // 1000)-th written: 7 is coprime with 1000, so each is read once.
        let shuffled = records
            .chunks(1000)
            .flat_map(|block| (0..1000).map(move |k| &block[k * 7 % 1000]));
        let mut explained = Vec::new();
        for (i, (n, ev)) in shuffled.enumerate() {
            match ev.kind {
                RstKind::Sent => explained.extend(origins.sent(ev, *n)),
                RstKind::Received => {
                    explained.extend(origins.receive(Receipt::of(ev), *n, read_at).ok())
                }
            }
            // After each batch a drain reads, the ring not yet empty.
            if i % 4096 == 4095 {
                assert!(origins.expired(None).is_empty());
            }
        }
        assert!(origins.expired(Some(read_at + ms(200))).is_empty());
        assert_eq!(explained.len(), RESETS as usize);
        assert!(
            explained
                .iter()
                .all(|(n, origin, sender)| *origin == Origin::LocalTcp && *sender == Some(*n))
        );
        assert_eq!(origins.stats().receipts_unmatched, 0);
    }

    #[test]
    fn sends_beyond_the_limit_within_the_window_are_counted() {
        let mut origins = Origins::new(false);
        let read_at = Instant::now();
        let receipts: Vec<_> = (0..5000)
            .map(|n| received_on(n, t(10) + Duration::from_micros(u64::from(n))))
            .collect();
        for rx in &receipts {
            origins.sent(&sent_to(rx, rx.time), "sender");
        }
        // 4096 sends are remembered, the 904 oldest forgotten.
        assert_eq!(origins.stats().sends_overflowed, 904);
        assert!(
            origins
                .receive(Receipt::of(&receipts[904]), 904, read_at)
                .ok()
                .is_some()
        );
        assert_eq!(
            origins
                .receive(Receipt::of(&receipts[903]), 903, read_at)
                .ok(),
            None
        );
        let out = origins.expired(Some(read_at + ms(200)));
        assert_eq!(out.iter().map(|(n, ..)| *n).collect::<Vec<_>>(), [903]);
        assert_eq!(origins.stats().receipts_unmatched, 1);
    }

    #[test]
    fn sends_out_of_the_window_are_forgotten_without_counting() {
        let mut origins = Origins::new(false);
        let read_at = Instant::now();
        // Five seconds of sends, a millisecond apart.
        let receipts: Vec<_> = (0..5000)
            .map(|n| received_on(n, t(10) + ms(u64::from(n))))
            .collect();
        for rx in &receipts {
            origins.sent(&sent_to(rx, rx.time), "sender");
        }
        assert_eq!(origins.stats().sends_overflowed, 0);
        assert!(
            origins
                .receive(Receipt::of(&receipts[4000]), 4000, read_at)
                .ok()
                .is_some()
        );
    }

    #[test]
    fn a_wall_clock_step_between_send_and_receipt_changes_nothing() {
        let mut origins = Origins::new(false);
        let rx = received(t(10));
        let mut tx = sent_to(&rx, t(10));
        // Converted after the wall clock stepped back an hour.
        tx.time = t(10) - Duration::from_secs(3600);
        tx.kernel_time += ms(1);
        assert_eq!(
            origins
                .receive(Receipt::of(&rx), "report", Instant::now())
                .ok(),
            None
        );
        assert_eq!(
            origins.sent(&tx, "sender"),
            [("report", Origin::LocalTcp, Some("sender"))]
        );
    }

    /// The sender's view of a connection NAT rewrote: backend to masquerading address.
    fn sent_across_nat(at: SystemTime, port: u16) -> (RstEvent, Ends) {
        let mut tx = reset(RstKind::Sent, at, Some(TcpState::Close), None);
        tx.local = "10.221.2.2:8080".parse().unwrap();
        tx.remote = SocketAddr::new(Ipv4Addr::new(10, 221, 2, 1).into(), port);
        let alias = (tx.remote, tx.local);
        (tx, alias)
    }

    #[test]
    fn a_receipt_across_nat_is_matched_through_its_lookup_in_either_order() {
        let mut origins = Origins::new(false);
        let now = Instant::now();
        // The send is read before the lookup answers.
        let rx = received_on(1, t(10));
        let (tx, alias) = sent_across_nat(t(10), 1);
        let number = origins.receive(Receipt::of(&rx), "first", now).unwrap_err();
        origins.await_lookup(number);
        // However long ago the ring was read empty, it waits for its lookup.
        assert!(origins.expired(Some(now + ms(500))).is_empty());
        assert!(origins.sent(&tx, "sender").is_empty());
        assert_eq!(
            origins.lookup_done(number, Some(alias), |r| *r = "first, natted"),
            Some(("first, natted", Origin::LocalTcp, Some("sender")))
        );
        // The lookup answers before the send is read.
        let rx = received_on(2, t(20));
        let (tx, alias) = sent_across_nat(t(20), 2);
        let number = origins
            .receive(Receipt::of(&rx), "second", now)
            .unwrap_err();
        origins.await_lookup(number);
        assert_eq!(origins.lookup_done(number, Some(alias), |_| {}), None);
        assert_eq!(
            origins.sent(&tx, "sender"),
            [("second", Origin::LocalTcp, Some("sender"))]
        );
        assert!(origins.held_by_alias.is_empty() && origins.held_by_ends.is_empty());
        assert_eq!(origins.stats().receipts_unmatched, 0);
    }

    #[test]
    fn a_lookup_that_found_nothing_lets_the_receipt_go_as_not_local() {
        let mut origins: Origins<_, ()> = Origins::new(false);
        let now = Instant::now();
        let number = origins
            .receive(Receipt::of(&received(t(10))), "report", now)
            .unwrap_err();
        origins.await_lookup(number);
        assert!(origins.expired(Some(now + ms(500))).is_empty());
        assert_eq!(origins.lookup_done(number, None, |_| {}), None);
        let out = origins.expired(Some(now + ms(500)));
        assert_eq!(out.iter().map(|(r, ..)| *r).collect::<Vec<_>>(), ["report"]);
    }

    #[test]
    fn stopping_releases_what_waits() {
        let mut origins: Origins<_, ()> = Origins::new(true);
        origins
            .receive(Receipt::of(&received(t(1))), 1, Instant::now())
            .ok();
        origins
            .receive(Receipt::of(&received(t(2))), 2, Instant::now())
            .ok();
        let out = origins.flush();
        assert_eq!(out.iter().map(|(r, ..)| *r).collect::<Vec<_>>(), [1, 2]);
        assert!(out[0].1.to_string().contains("or netfilter rule"));
        assert_eq!(origins.stats().receipts_unmatched, 2);
    }
}
