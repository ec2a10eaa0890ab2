//! Connections a full accept queue turned away, per network namespace: the
//! kernel's `ListenOverflows` counter. With the default
//! tcp_abort_on_overflow=0 the kernel drops the SYN or the handshake's last
//! ACK and sends no reset, so there is no reset for tcprst to explain; the
//! count and a warning are all that tell of it.

use std::{
    collections::HashMap,
    fs, io,
    time::{Duration, Instant},
};

use crate::model::text::short;

/// At most one warning per namespace this often: a listener that cannot
/// keep up overflows many times a second, for as long as the load lasts.
pub const WARN_EVERY: Duration = Duration::from_secs(60);

/// One namespace's count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub netns: u32,
    /// As events name the namespace (`netns_name`).
    pub name: String,
    /// Since the namespace was made.
    pub total: u64,
}

/// `name` in `group` of a /proc/net/netstat or /proc/net/snmp text, where
/// each group is a line of names and a line of values, both starting
/// "Group:".
fn counter(text: &str, group: &str, name: &str) -> Option<u64> {
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter_map(|l| l.strip_prefix(&prefix));
    let (names, values) = (lines.next()?, lines.next()?);
    let at = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// `TcpExt: ListenOverflows` of the calling thread's namespace.
pub fn read() -> io::Result<u64> {
    // /proc/net is /proc/self/net, the namespace of the process's main
    // thread; a thread that entered another one reads its own.
    let text = fs::read_to_string("/proc/thread-self/net/netstat")?;
    counter(&text, "TcpExt", "ListenOverflows")
        .ok_or_else(|| io::Error::other("no TcpExt ListenOverflows in /proc/net/netstat"))
}

struct Seen {
    total: u64,
    /// Overflows not warned about yet, and since when they count.
    unwarned: u64,
    since: Instant,
    warned_at: Option<Instant>,
}

/// Turns samples into warnings: a namespace's overflows since its last
/// warning, at most once per `WARN_EVERY`. Its first sample only sets where
/// counting starts: what happened before tracing is not news.
#[derive(Default)]
pub struct OverflowWatch {
    seen: HashMap<u32, Seen>,
}

impl OverflowWatch {
    pub fn sample(&mut self, now: Instant, samples: &[Sample]) -> Vec<String> {
        // Namespaces gone since are forgotten, so memory follows the host.
        self.seen
            .retain(|netns, _| samples.iter().any(|s| s.netns == *netns));
        let mut warnings = Vec::new();
        for sample in samples {
            let Some(seen) = self.seen.get_mut(&sample.netns) else {
                self.seen.insert(
                    sample.netns,
                    Seen {
                        total: sample.total,
                        unwarned: 0,
                        since: now,
                        warned_at: None,
                    },
                );
                continue;
            };
            // A smaller count is a new namespace that got a gone one's inode.
            seen.unwarned += match sample.total.checked_sub(seen.total) {
                Some(new) => new,
                None => sample.total,
            };
            seen.total = sample.total;
            let due = seen
                .warned_at
                .is_none_or(|at| now.duration_since(at) >= WARN_EVERY);
            if seen.unwarned > 0 && due {
                warnings.push(format!(
                    "network namespace {}: {} listen queue overflows in the last {} (TcpExt ListenOverflows): \
                     a listener's accept queue was full, so the kernel dropped SYNs or handshake ACKs \
                     (or reset, with net.ipv4.tcp_abort_on_overflow=1); its application accepts too slowly \
                     or its backlog is too small",
                    sample.name,
                    seen.unwarned,
                    short(now.duration_since(seen.since)),
                ));
                seen.unwarned = 0;
                seen.since = now;
                seen.warned_at = Some(now);
            }
        }
        warnings
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::netns::{in_netns, testing::TestNetns};

    /// The start of a real /proc/net/netstat (6.18), shortened.
    const NETSTAT: &str = "\
TcpExt: SyncookiesSent SyncookiesRecv SyncookiesFailed EmbryonicRsts PruneCalled ListenOverflows ListenDrops
TcpExt: 2 14 0 0 0 14 15
IpExt: InNoRoutes InTruncatedPkts ListenOverflows
IpExt: 0 0 99
";

    #[test]
    fn reads_a_counter_of_its_group() {
        assert_eq!(counter(NETSTAT, "TcpExt", "ListenOverflows"), Some(14));
        assert_eq!(counter(NETSTAT, "TcpExt", "ListenDrops"), Some(15));
        assert_eq!(counter(NETSTAT, "IpExt", "ListenOverflows"), Some(99));
        assert_eq!(counter(NETSTAT, "TcpExt", "NoSuchCounter"), None);
        assert_eq!(counter(NETSTAT, "MPTcpExt", "ListenOverflows"), None);
        assert_eq!(
            counter("TcpExt: ListenOverflows\n", "TcpExt", "ListenOverflows"),
            None
        );
    }

    /// A SYN to a listener whose queue is full is dropped and counted in
    /// the namespace it arrived in, which is what `read` must see.
    #[test]
    fn reads_the_count_of_the_namespace_entered() {
        let netns = TestNetns::create();
        let overflows = in_netns(&netns.0, || {
            let before = read().unwrap();
            let listener =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            let addr: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
            listener.bind(&addr.into()).unwrap();
            // One waiting connection fills a queue of backlog 0.
            listener.listen(0).unwrap();
            let addr = listener.local_addr().unwrap().as_socket().unwrap();
            let _queued = std::net::TcpStream::connect(addr).unwrap();
            let turned_away =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            turned_away.set_nonblocking(true).unwrap();
            let _ = turned_away.connect(&addr.into());
            let deadline = Instant::now() + Duration::from_secs(2);
            while read().unwrap() == before && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            (before, read().unwrap())
        })
        .unwrap();
        assert_eq!(overflows.0, 0, "a new namespace has counted nothing");
        assert!(overflows.1 > 0, "{overflows:?}");
    }

    fn sample(total: u64) -> Vec<Sample> {
        vec![Sample {
            netns: 7,
            name: "shop".into(),
            total,
        }]
    }

    #[test]
    fn warns_of_new_overflows_at_most_once_a_minute() {
        let mut watch = OverflowWatch::default();
        let start = Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        // Overflows before tracing started are not news.
        assert!(watch.sample(at(0), &sample(40)).is_empty());
        assert!(watch.sample(at(5), &sample(40)).is_empty());
        let first = watch.sample(at(10), &sample(43));
        assert_eq!(first.len(), 1);
        assert!(
            first[0]
                .starts_with("network namespace shop: 3 listen queue overflows in the last 10s"),
            "{}",
            first[0]
        );
        // More within the minute wait, and add up.
        assert!(watch.sample(at(15), &sample(50)).is_empty());
        assert!(watch.sample(at(69), &sample(52)).is_empty());
        let second = watch.sample(at(70), &sample(52));
        assert_eq!(second.len(), 1);
        assert!(
            second[0]
                .starts_with("network namespace shop: 9 listen queue overflows in the last 60s"),
            "{}",
            second[0]
        );
        // Quiet namespaces say nothing, however long.
        assert!(watch.sample(at(500), &sample(52)).is_empty());
    }

    #[test]
    fn a_namespace_seen_again_counts_afresh() {
        let mut watch = OverflowWatch::default();
        let start = Instant::now();
        watch.sample(start, &sample(40));
        // Gone from one sample: forgotten, so its next sample is a baseline.
        watch.sample(start, &[]);
        assert!(watch.sample(start, &sample(45)).is_empty());
        // A smaller total is a new namespace under a reused inode.
        let warned = watch.sample(start + Duration::from_secs(1), &sample(2));
        assert!(
            warned[0].contains(": 2 listen queue overflows"),
            "{warned:?}"
        );
    }
}
