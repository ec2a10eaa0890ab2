//! Whether a network namespace can hold a half-closed TCP socket, from the
//! kernel's per-namespace socket counters (`/proc/net/sockstat` and
//! `sockstat6`) and its listeners. A scan's dump walks the host's whole
//! TCP socket table, every namespace's TIME_WAIT sockets included, for each
//! namespace it asks about; the counters and the listeners (a dump that
//! walks only the listening table) cost microseconds, so a namespace with
//! nothing but listeners is not walked (#10).

use std::{fs, io};

/// What the counters say of the calling thread's namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpCounts {
    /// Sockets in the kernel's TCP tables, IPv4 and IPv6: listeners and
    /// every connection from SYN_SENT until it closes or becomes a
    /// timewait socket, orphaned or not (`inuse`).
    pub in_use: u64,
    /// Timewait sockets: TIME_WAIT, and an orphaned FIN_WAIT2 the kernel
    /// keeps in that lighter form (`tw`).
    pub timewait: u64,
}

impl TcpCounts {
    /// Whether a socket that is not a listener may be half-closed here:
    /// one is in the tables beside the `listeners`, or a timewait socket
    /// may be an orphaned FIN_WAIT2. Listeners opened or closed between
    /// the two reads can only make it say yes, or hide a connection for
    /// that scan; the caller walks namespaces with tracked connections
    /// whatever this says, so none is resolved by mistake.
    pub fn may_hold_half_closed(self, listeners: usize) -> bool {
        self.timewait > 0 || self.in_use > listeners as u64
    }
}

/// The counters of the calling thread's namespace (/proc/net is the main
/// thread's).
pub fn read() -> io::Result<TcpCounts> {
    let v4 = fs::read_to_string("/proc/thread-self/net/sockstat")?;
    // Absent where IPv6 is not built in or is disabled.
    let v6 = match fs::read_to_string("/proc/thread-self/net/sockstat6") {
        Ok(text) => Some(text),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    parse(&v4, v6.as_deref())
        .ok_or_else(|| io::Error::other("no TCP inuse and tw in /proc/net/sockstat"))
}

fn parse(v4: &str, v6: Option<&str>) -> Option<TcpCounts> {
    let tcp = fields(v4, "TCP:")?;
    let in_use_v6 = match v6 {
        Some(text) => value(&fields(text, "TCP6:")?, "inuse")?,
        None => 0,
    };
    Some(TcpCounts {
        in_use: value(&tcp, "inuse")? + in_use_v6,
        timewait: value(&tcp, "tw")?,
    })
}

/// The words after `prefix` on its line: "inuse 3 orphan 0 tw 1 …".
fn fields<'a>(text: &'a str, prefix: &str) -> Option<Vec<&'a str>> {
    let line = text.lines().find_map(|l| l.strip_prefix(prefix))?;
    Some(line.split_whitespace().collect())
}

fn value(fields: &[&str], name: &str) -> Option<u64> {
    let at = fields.iter().position(|f| *f == name)?;
    fields.get(at + 1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    // As Linux 6.18 prints them, in a namespace with a listener on each
    // family, a connection, and the TIME_WAIT of an earlier one.
    const SOCKSTAT: &str = "sockets: used 5\n\
        TCP: inuse 3 orphan 0 tw 1 alloc 5 mem 22\n\
        UDP: inuse 0 mem 0\n\
        UDPLITE: inuse 0\n\
        RAW: inuse 0\n\
        FRAG: inuse 0 memory 0\n";
    const SOCKSTAT6: &str = "TCP6: inuse 1\nUDP6: inuse 0\nUDPLITE6: inuse 0\n\
        RAW6: inuse 0\nFRAG6: inuse 0 memory 0\n";

    #[test]
    fn adds_both_families_in_use() {
        assert_eq!(
            parse(SOCKSTAT, Some(SOCKSTAT6)),
            Some(TcpCounts {
                in_use: 4,
                timewait: 1
            })
        );
    }

    #[test]
    fn a_host_without_ipv6_counts_ipv4() {
        assert_eq!(
            parse(SOCKSTAT, None),
            Some(TcpCounts {
                in_use: 3,
                timewait: 1
            })
        );
    }

    #[test]
    fn text_without_the_counters_is_refused() {
        assert_eq!(parse("sockets: used 5\n", None), None);
        assert_eq!(parse("TCP: inuse x orphan 0 tw 1\n", None), None);
        assert_eq!(parse(SOCKSTAT, Some("UDP6: inuse 0\n")), None);
    }

    #[test]
    fn only_listeners_and_no_timewait_hold_nothing_half_closed() {
        let counts = |in_use, timewait| TcpCounts { in_use, timewait };
        assert!(!counts(2, 0).may_hold_half_closed(2));
        assert!(!counts(0, 0).may_hold_half_closed(0));
        assert!(
            counts(3, 0).may_hold_half_closed(2),
            "a connection beside them"
        );
        assert!(
            counts(2, 1).may_hold_half_closed(2),
            "an orphaned FIN_WAIT2 may be timewait"
        );
        // Fewer in the tables than the listeners dumped: one closed
        // between the reads, and the rest are listeners.
        assert!(!counts(1, 0).may_hold_half_closed(2));
    }

    #[test]
    fn reads_this_namespace() {
        let _listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let counts = read().expect("this host has /proc/net/sockstat");
        assert!(counts.in_use >= 1, "{counts:?} misses our listener");
    }
}
