//! Ring-buffer bytes → `RstEvent`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{Result, bail};
use tcprst_common::{AF_INET, AF_INET6, RecordKind, RstRecord, rst_flags};

use crate::{
    clock::WallClock,
    event::{Errno, ExecContext, RstEvent, RstKind, Task, TcpState},
    layout::ReasonNames,
};

pub struct Decoder {
    reasons: ReasonNames,
    pub clock: WallClock,
}

impl Decoder {
    pub fn new(reasons: ReasonNames, clock: WallClock) -> Self {
        Self { reasons, clock }
    }

    pub fn decode(&self, bytes: &[u8]) -> Result<RstEvent> {
        let rec = read_record(bytes)?;
        let kind = match RecordKind::from_u8(rec.kind) {
            Some(RecordKind::RstSent) => RstKind::Sent,
            Some(RecordKind::RstReceived) => RstKind::Received,
            None => bail!("unknown record kind {}", rec.kind),
        };
        let context = match tcprst_common::ExecContext::from_u8(rec.context) {
            Some(tcprst_common::ExecContext::Process) => ExecContext::Process,
            Some(tcprst_common::ExecContext::Softirq) => ExecContext::Softirq,
            Some(tcprst_common::ExecContext::KernelThread) => ExecContext::KernelThread,
            None => bail!("unknown execution context {}", rec.context),
        };
        let has = |flag: u8| rec.flags & flag != 0;
        let state = has(rst_flags::HAS_STATE)
            .then(|| TcpState::from_kernel(rec.state))
            .flatten();
        let task = (context != ExecContext::Softirq).then(|| Task {
            pid: rec.tgid,
            tid: rec.tid,
            comm: comm_str(&rec.comm),
            uid: rec.uid,
        });
        Ok(RstEvent {
            time: self.clock.wall_time(rec.timestamp_ns),
            kind,
            local: socket_addr(rec.family, &rec.local_addr, rec.local_port),
            remote: socket_addr(rec.family, &rec.remote_addr, rec.remote_port),
            state,
            reason: has(rst_flags::HAS_REASON).then(|| self.reasons.name(rec.reason)),
            sock_cookie: (has(rst_flags::HAS_COOKIE) && rec.sock_cookie != 0)
                .then_some(rec.sock_cookie),
            netns: has(rst_flags::HAS_NETNS).then_some(rec.netns),
            context,
            task,
            errno: match kind {
                RstKind::Received => state.and_then(Errno::for_reset_in),
                RstKind::Sent => None,
            },
        })
    }
}

fn read_record(bytes: &[u8]) -> Result<RstRecord> {
    if bytes.len() < size_of::<RstRecord>() {
        bail!(
            "record of {} bytes is shorter than an RstRecord ({})",
            bytes.len(),
            size_of::<RstRecord>()
        );
    }
    // SAFETY: length checked; RstRecord is integers and byte arrays, valid
    // for any bit pattern; read_unaligned copes with any alignment.
    Ok(unsafe { bytes.as_ptr().cast::<RstRecord>().read_unaligned() })
}

/// IPv4 peers of IPv6 sockets (and old kernels without a family field) show
/// up as v4-mapped addresses; report them as the IPv4 they are.
fn socket_addr(family: u16, addr: &[u8; 16], port: u16) -> SocketAddr {
    let ip = if family == AF_INET {
        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
    } else {
        let v6 = Ipv6Addr::from(*addr);
        if family == AF_INET6 {
            IpAddr::V6(v6).to_canonical()
        } else {
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        }
    };
    SocketAddr::new(ip, port)
}

fn comm_str(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn record(kind: RecordKind) -> RstRecord {
        RstRecord {
            kind: kind as u8,
            context: tcprst_common::ExecContext::Process as u8,
            flags: rst_flags::HAS_STATE | rst_flags::HAS_NETNS,
            state: 1,
            family: AF_INET,
            local_port: 8080,
            remote_port: 40000,
            _pad: 0,
            reason: 0,
            timestamp_ns: 1_000,
            skaddr: 0xffff_8880_0000_1000,
            sock_cookie: 0,
            netns: 4026531840,
            tgid: 42,
            tid: 43,
            uid: 1000,
            local_addr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            remote_addr: [10, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
        }
    }

    pub fn bytes(rec: &RstRecord) -> Vec<u8> {
        // SAFETY: a plain repr(C) value viewed as bytes for the test.
        unsafe {
            std::slice::from_raw_parts(
                (rec as *const RstRecord).cast::<u8>(),
                size_of::<RstRecord>(),
            )
        }
        .to_vec()
    }

    fn decoder() -> Decoder {
        Decoder::new(
            ReasonNames::from_pairs([(1, "NO_SOCKET".into()), (11, "TCP_ABORT_ON_CLOSE".into())]),
            WallClock::new(),
        )
    }

    #[test]
    fn decodes_a_sent_reset_with_reason() {
        let mut rec = record(RecordKind::RstSent);
        rec.flags |= rst_flags::HAS_REASON;
        rec.reason = 11;
        rec.state = 7;
        let ev = decoder().decode(&bytes(&rec)).unwrap();
        assert_eq!(ev.kind, RstKind::Sent);
        assert_eq!(ev.local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(ev.remote, "10.1.2.3:40000".parse().unwrap());
        assert_eq!(ev.state, Some(TcpState::Close));
        assert_eq!(ev.reason.as_deref(), Some("TCP_ABORT_ON_CLOSE"));
        assert_eq!(ev.errno, None);
        assert_eq!(ev.netns, Some(4026531840));
        assert_eq!(
            ev.task,
            Some(Task {
                pid: 42,
                tid: 43,
                comm: "curl".into(),
                uid: 1000
            })
        );
    }

    #[test]
    fn received_reset_errno_follows_the_state() {
        let d = decoder();
        let errno_in = |state: u8| {
            let mut rec = record(RecordKind::RstReceived);
            rec.state = state;
            d.decode(&bytes(&rec)).unwrap().errno
        };
        assert_eq!(errno_in(2), Some(Errno::ConnRefused));
        assert_eq!(errno_in(8), Some(Errno::Pipe));
        assert_eq!(errno_in(1), Some(Errno::ConnReset));
        assert_eq!(errno_in(5), Some(Errno::ConnReset));
        assert_eq!(errno_in(7), None);
    }

    #[test]
    fn softirq_resets_blame_no_task() {
        let mut rec = record(RecordKind::RstSent);
        rec.context = tcprst_common::ExecContext::Softirq as u8;
        rec.flags = rst_flags::NO_SOCKET | rst_flags::HAS_NETNS | rst_flags::HAS_REASON;
        rec.reason = 1;
        let ev = decoder().decode(&bytes(&rec)).unwrap();
        assert_eq!(ev.context, ExecContext::Softirq);
        assert_eq!(ev.task, None);
        assert_eq!(ev.state, None);
        assert_eq!(ev.reason.as_deref(), Some("NO_SOCKET"));
    }

    #[test]
    fn ipv6_and_v4_mapped_addresses() {
        let d = decoder();
        let mut rec = record(RecordKind::RstReceived);
        rec.family = AF_INET6;
        rec.local_addr = "::1".parse::<Ipv6Addr>().unwrap().octets();
        rec.remote_addr = "::ffff:192.0.2.7".parse::<Ipv6Addr>().unwrap().octets();
        let ev = d.decode(&bytes(&rec)).unwrap();
        assert_eq!(ev.local, "[::1]:8080".parse().unwrap());
        assert_eq!(ev.remote, "192.0.2.7:40000".parse().unwrap());
        // Old kernels: no family field at all.
        rec.family = 0;
        rec.local_addr = "::ffff:127.0.0.1".parse::<Ipv6Addr>().unwrap().octets();
        let ev = d.decode(&bytes(&rec)).unwrap();
        assert_eq!(ev.local, "127.0.0.1:8080".parse().unwrap());
    }

    #[test]
    fn cookie_only_when_the_kernel_gave_one() {
        let d = decoder();
        let mut rec = record(RecordKind::RstReceived);
        rec.sock_cookie = 77;
        assert_eq!(d.decode(&bytes(&rec)).unwrap().sock_cookie, None);
        rec.flags |= rst_flags::HAS_COOKIE;
        assert_eq!(d.decode(&bytes(&rec)).unwrap().sock_cookie, Some(77));
    }

    #[test]
    fn rejects_short_and_unknown_records() {
        let d = decoder();
        let full = bytes(&record(RecordKind::RstSent));
        assert!(d.decode(&full[..50]).is_err());
        let mut bad = record(RecordKind::RstSent);
        bad.kind = 99;
        assert!(d.decode(&bytes(&bad)).is_err());
        let mut bad = record(RecordKind::RstSent);
        bad.context = 0;
        assert!(d.decode(&bytes(&bad)).is_err());
    }
}
