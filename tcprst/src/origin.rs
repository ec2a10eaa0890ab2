//! Where a received reset came from. A reset this host sent, from its TCP
//! stack or from a netfilter rule tcprst watches, shows up as an rst_sent
//! with the mirrored tuple; one nothing here explains came from elsewhere:
//! another host, a middlebox, a userspace TCP stack (slirp4netns), or a
//! netfilter rule on a kernel where nf_send_reset cannot be hooked.
//!
//! The two records do not arrive in a fixed order (before 6.10 an active
//! reset fires its tracepoint after the peer already processed it), so a
//! received reset waits briefly for the send that explains it.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    time::{Duration, Instant, SystemTime},
};

use crate::event::{NfHook, ResetHook, RstEvent};

/// How far apart in kernel time a send and its receipt may be.
const MATCH_WINDOW: Duration = Duration::from_secs(1);
/// How long a received reset waits for its send.
pub const HOLD: Duration = Duration::from_millis(200);
/// Recent sends remembered; beyond this the oldest are forgotten.
const MAX_SENT: usize = 4096;

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
    pub fn describe(&self) -> String {
        match self {
            Self::LocalTcp => "this host's TCP stack".to_owned(),
            Self::LocalNetfilter(Some(hook)) => {
                format!("a netfilter reject rule on this host ({})", hook.name())
            }
            Self::LocalNetfilter(None) => "a netfilter reject rule on this host".to_owned(),
            Self::NotLocal {
                netfilter_watched: false,
            } => "not a local TCP socket (netfilter, middlebox or userspace stack)".to_owned(),
            Self::NotLocal {
                netfilter_watched: true,
            } => "not a local TCP socket or netfilter rule (another host, a middlebox or a userspace stack)"
                .to_owned(),
        }
    }
}

/// (local, remote) as the receiving end sees them.
type Ends = (SocketAddr, SocketAddr);

/// What matching needs of a received reset, so its report can move in.
#[derive(Debug, Clone, Copy)]
pub struct Receipt {
    ends: Ends,
    time: SystemTime,
}

impl Receipt {
    pub fn of(ev: &RstEvent) -> Self {
        Self {
            ends: (ev.local, ev.remote),
            time: ev.time,
        }
    }
}

/// Matches received resets with the sends that explain them; `T` is the
/// prepared report that waits meanwhile, `S` what a send tells about its
/// socket (the receipt's peer on this host).
pub struct Origins<T, S> {
    sent: VecDeque<(SystemTime, Ends, Origin, S)>,
    held: VecDeque<(Instant, SystemTime, Ends, T)>,
    netfilter_watched: bool,
}

/// A received reset's report, where it came from, and what its sender
/// told, when this host sent it.
pub type Explained<T, S> = (T, Origin, Option<S>);

impl<T, S: Clone> Origins<T, S> {
    pub fn new(netfilter_watched: bool) -> Self {
        Self {
            sent: VecDeque::new(),
            held: VecDeque::new(),
            netfilter_watched,
        }
    }

    /// Remembers a reset this host sent; returns the held received resets
    /// it explains.
    pub fn sent(&mut self, ev: &RstEvent, sender: S) -> Vec<Explained<T, S>> {
        let origin = match ev.hook {
            ResetHook::NfSendReset | ResetHook::NfSendReset6 => Origin::LocalNetfilter(ev.nf_hook),
            _ => Origin::LocalTcp,
        };
        // The receiving end's view of the same connection.
        let ends = (ev.remote, ev.local);
        let mut explained = Vec::new();
        let mut i = 0;
        while i < self.held.len() {
            let (_, time, held_ends, _) = &self.held[i];
            if *held_ends == ends && close_in_time(*time, ev.time) {
                let (.., report) = self.held.remove(i).expect("index in range");
                explained.push((report, origin.clone(), Some(sender.clone())));
            } else {
                i += 1;
            }
        }
        if self.sent.len() == MAX_SENT {
            self.sent.pop_front();
        }
        self.sent.push_back((ev.time, ends, origin, sender));
        explained
    }

    /// A received reset: explained now, or held until its send arrives or
    /// `HOLD` passes.
    pub fn received(
        &mut self,
        receipt: Receipt,
        report: T,
        now: Instant,
    ) -> Option<Explained<T, S>> {
        let Receipt { ends, time: at } = receipt;
        while self
            .sent
            .front()
            .is_some_and(|(time, ..)| !close_in_time(*time, at) && *time < at)
        {
            self.sent.pop_front();
        }
        let known = self
            .sent
            .iter()
            .rev()
            .find(|(time, sent_ends, ..)| *sent_ends == ends && close_in_time(*time, at));
        match known {
            Some((_, _, origin, sender)) => Some((report, origin.clone(), Some(sender.clone()))),
            None => {
                self.held.push_back((now, at, ends, report));
                None
            }
        }
    }

    /// Received resets that waited `HOLD` for a send that never came.
    pub fn expired(&mut self, now: Instant) -> Vec<Explained<T, S>> {
        let mut out = Vec::new();
        while self
            .held
            .front()
            .is_some_and(|(since, ..)| now.duration_since(*since) >= HOLD)
        {
            let (.., report) = self.held.pop_front().expect("front exists");
            out.push((
                report,
                Origin::NotLocal {
                    netfilter_watched: self.netfilter_watched,
                },
                None,
            ));
        }
        out
    }

    /// Everything still waiting, when tracing stops: nothing is dropped.
    pub fn flush(&mut self) -> Vec<Explained<T, S>> {
        self.expired(Instant::now() + HOLD)
    }
}

fn close_in_time(a: SystemTime, b: SystemTime) -> bool {
    let gap = a.duration_since(b).unwrap_or_else(|e| e.duration());
    gap <= MATCH_WINDOW
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        event::{RstKind, TcpState},
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

    #[test]
    fn a_send_seen_first_explains_the_receipt_at_once() {
        let mut origins = Origins::new(false);
        let rx = received(t(10));
        assert!(origins.sent(&sent_to(&rx, t(10)), "sender").is_empty());
        let now = Instant::now();
        assert_eq!(
            origins.received(Receipt::of(&rx), "report", now),
            Some(("report", Origin::LocalTcp, Some("sender")))
        );
    }

    #[test]
    fn a_receipt_waits_for_a_send_that_comes_later() {
        let mut origins = Origins::new(false);
        let rx = received(t(10));
        let now = Instant::now();
        assert_eq!(origins.received(Receipt::of(&rx), "report", now), None);
        assert!(origins.expired(now).is_empty());
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
        assert!(origins.expired(now + HOLD).is_empty());
    }

    #[test]
    fn an_unexplained_receipt_is_not_local_after_the_hold() {
        let mut origins = Origins::new(false);
        let now = Instant::now();
        let rx = received(t(10));
        // A send for another connection, and one long before, explain nothing.
        let mut other = sent_to(&rx, t(10));
        other.local = "10.9.9.9:1".parse().unwrap();
        origins.sent(&other, "other");
        origins.sent(&sent_to(&rx, t(2)), "long before");
        assert_eq!(origins.received(Receipt::of(&rx), "report", now), None);
        let out = origins.expired(now + HOLD);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].2, None);
        assert_eq!(
            out[0].1.describe(),
            "not a local TCP socket (netfilter, middlebox or userspace stack)"
        );
    }

    #[test]
    fn stopping_releases_what_waits() {
        let mut origins: Origins<_, ()> = Origins::new(true);
        origins.received(Receipt::of(&received(t(1))), 1, Instant::now());
        origins.received(Receipt::of(&received(t(2))), 2, Instant::now());
        let out = origins.flush();
        assert_eq!(out.iter().map(|(r, ..)| *r).collect::<Vec<_>>(), [1, 2]);
        assert!(out[0].1.describe().contains("or netfilter rule"));
    }
}
