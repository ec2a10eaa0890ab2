//! Ring-buffer bytes → domain records.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::{Result, anyhow, bail};
use tcprst_common::{
    AF_INET, AF_INET6, CloseMark, MARK_STEPS, MarkedRstRecord, RecordKind, RstKey, RstRecord,
    Tuple, close_op, rst_flags, shutdown_bits,
};

use crate::{
    bpf::{layout::ReasonNames, tallies::Tally},
    memo::Memo,
    model::event::{
        Aggregate, AttachTier, CALLER_FRAMES, CloseHistory, CloseOp, Errno, ExecContext, Initiator,
        NfHook, ResetHook, RstEvent, RstKind, ShutHow, SocketFacts, Task, TcpState,
    },
    pipeline::clock::WallClock,
};

pub struct Decoder {
    reasons: ReasonNames,
    pub clock: WallClock,
    /// Command names, each made a shared string once: a trace sees few
    /// distinct ones, and every reset and close mark of a process names its
    /// command again. Keyed by the kernel's NUL-padded 16 bytes.
    comms: Memo<[u8; 16], Arc<str>>,
}

impl Decoder {
    pub fn new(reasons: ReasonNames, clock: WallClock) -> Self {
        Self {
            reasons,
            clock,
            comms: Memo::new(Self::MAX_COMMS),
        }
    }

    /// Command names kept at most.
    const MAX_COMMS: usize = 4096;

    pub fn decode(&mut self, bytes: &[u8]) -> Result<RstEvent> {
        let Some(&kind) = bytes.first() else {
            bail!("empty record");
        };
        let kind = match RecordKind::from_u8(kind) {
            Some(RecordKind::RstSent) => RstKind::Sent,
            Some(RecordKind::RstReceived) => RstKind::Received,
            None => bail!("unknown record kind {kind}"),
        };
        let rec: RstRecord = read(bytes)?;
        let mark = if rec.flags & rst_flags::HAS_MARK != 0 {
            Some(read::<MarkedRstRecord>(bytes)?.mark)
        } else {
            None
        };
        self.rst(rec, mark.as_ref(), kind)
    }

    /// A close mark's steps, on the wall clock.
    pub(crate) fn history(&mut self, mark: &CloseMark) -> CloseHistory {
        let task = Task {
            pid: mark.tgid,
            tid: mark.tgid,
            comm: self.comms.get(&mark.comm, || comm_name(&mark.comm)),
            uid: 0,
        };
        let op = match mark.op {
            close_op::SHUTDOWN => ShutHow::from_kernel(mark.how).map(CloseOp::Shutdown),
            close_op::CLOSE => Some(CloseOp::Close),
            close_op::EXIT => Some(CloseOp::Exit),
            _ => None,
        };
        let steps = usize::from(mark.steps).min(MARK_STEPS);
        CloseHistory {
            initiator: op.map(|op| Initiator { op, task }),
            initiated_at: (mark.op_at_ns != 0).then(|| self.clock.wall_time(mark.op_at_ns)),
            first_state: TcpState::from_kernel(mark.first_state),
            steps: (0..steps)
                .filter_map(|i| {
                    let state = TcpState::from_kernel(mark.step_state[i])?;
                    Some((state, self.clock.wall_time(mark.step_at_ns[i])))
                })
                .collect(),
        }
    }

    fn rst(&mut self, rec: RstRecord, mark: Option<&CloseMark>, kind: RstKind) -> Result<RstEvent> {
        let context = match exec_context(rec.context)? {
            // ksoftirqd runs the softirqs that pile up, on its own stack: the
            // kernel programs see a kernel thread (tcprst-ebpf's context.rs).
            ExecContext::KernelThread if rec.task.comm.starts_with(KSOFTIRQD) => {
                ExecContext::Softirq
            }
            context => context,
        };
        let has = |flag: u8| rec.flags & flag != 0;
        let state = has(rst_flags::HAS_STATE)
            .then(|| TcpState::from_kernel(rec.state))
            .flatten();
        let (local, remote) = endpoints(&rec.tuple);
        Ok(RstEvent {
            time: self.clock.wall_time(rec.timestamp_ns),
            kernel_time: Duration::from_nanos(rec.timestamp_ns),
            kind,
            local,
            remote,
            state,
            reason: has(rst_flags::HAS_REASON).then(|| self.reasons.name(rec.reason)),
            sock_cookie: (has(rst_flags::HAS_COOKIE) && rec.sock_cookie != 0)
                .then_some(rec.sock_cookie),
            netns: known_netns(rec.netns),
            context,
            task: (context != ExecContext::Softirq).then(|| Task {
                pid: rec.task.tgid,
                tid: rec.task.tid,
                comm: self.comms.get(&rec.task.comm, || comm_name(&rec.task.comm)),
                uid: rec.task.uid,
            }),
            errno: match kind {
                RstKind::Received => state.and_then(Errno::for_reset_in),
                RstKind::Sent => None,
            },
            cgroup_id: nonzero(rec.cgroup_id),
            socket: has(rst_flags::HAS_SOCKET_FACTS).then(|| SocketFacts {
                sent_fin: rec.shutdown & shutdown_bits::SEND_SHUTDOWN != 0,
                rcv_shutdown: rec.shutdown & shutdown_bits::RCV_SHUTDOWN != 0,
                orphaned: has(rst_flags::ORPHANED),
                inode: nonzero(rec.inode),
            }),
            history: mark.map(|m| self.history(m)),
            frames: rec.frame_addresses(),
            stack_id: u32::try_from(rec.stack_id).ok(),
            hook: ResetHook::from_u8(rec.hook)
                .ok_or_else(|| anyhow!("unknown reset hook {}", rec.hook))?,
            tier: AttachTier::from_u8(rec.tier)
                .ok_or_else(|| anyhow!("unknown attach tier {}", rec.tier))?,
            nf_hook: has(rst_flags::HAS_NF_HOOK)
                .then(|| NfHook::from_kernel(rec.nf_hook))
                .flatten(),
            aggregate: None,
        })
    }

    /// One kernel tally as an event standing for its counted resets: the
    /// key's ends and verdict, with the attribution of its last detailed
    /// record. What belonged to that one socket (cookie, inode, close mark,
    /// whole stack) is left out.
    pub(crate) fn aggregate(&mut self, key: &RstKey, tally: &Tally) -> Result<RstEvent> {
        let mut rec = tally.sample;
        if rec.kind == 0 {
            // The detailed record that should have left its sample was still
            // being written when the period ended: report the key alone.
            rec.context = tcprst_common::ExecContext::Softirq as u8;
            rec.tier = tcprst_common::AttachTier::Tracepoint as u8;
            rec.cgroup_id = 0;
            rec.frames = [0; CALLER_FRAMES];
        }
        rec.kind = key.kind;
        rec.hook = key.hook;
        rec.state = key.state;
        rec.reason = key.reason;
        rec.netns = key.netns;
        rec.tuple = key.ends;
        rec.flags = key.flags | (rec.flags & rst_flags::HAS_NF_HOOK);
        rec.stack_id = -1;
        let kind = match RecordKind::from_u8(key.kind) {
            Some(RecordKind::RstSent) => RstKind::Sent,
            Some(RecordKind::RstReceived) => RstKind::Received,
            None => bail!("unknown record kind {} in a tally", key.kind),
        };
        let mut ev = self.rst(rec, None, kind)?;
        ev.time = self.clock.wall_time(tally.last_ns);
        ev.kernel_time = Duration::from_nanos(tally.last_ns);
        ev.aggregate = Some(Aggregate {
            count: tally.counted,
            first: self.clock.wall_time(tally.first_ns),
            last: ev.time,
            ports: tally.ports.iter().copied().filter(|p| *p != 0).collect(),
        });
        Ok(ev)
    }
}

/// Copies a record of type `T` out of ring-buffer bytes.
fn read<T: Copy>(bytes: &[u8]) -> Result<T> {
    if bytes.len() < size_of::<T>() {
        bail!(
            "record of {} bytes is shorter than a {} ({})",
            bytes.len(),
            std::any::type_name::<T>(),
            size_of::<T>()
        );
    }
    // SAFETY: length checked; the record types are integers and byte arrays,
    // valid for any bit pattern; read_unaligned copes with any alignment.
    Ok(unsafe { bytes.as_ptr().cast::<T>().read_unaligned() })
}

fn known_netns(inode: u32) -> Option<u32> {
    (inode != 0).then_some(inode)
}

fn nonzero(id: u64) -> Option<u64> {
    (id != 0).then_some(id)
}

/// The start of the comm of every ksoftirqd (`ksoftirqd/CPU`).
const KSOFTIRQD: &[u8] = b"ksoftirqd/";

fn exec_context(raw: u8) -> Result<ExecContext> {
    Ok(match tcprst_common::ExecContext::from_u8(raw) {
        Some(tcprst_common::ExecContext::Process) => ExecContext::Process,
        Some(tcprst_common::ExecContext::Softirq) => ExecContext::Softirq,
        Some(tcprst_common::ExecContext::KernelThread) => ExecContext::KernelThread,
        None => bail!("unknown execution context {raw}"),
    })
}

fn endpoints(t: &Tuple) -> (SocketAddr, SocketAddr) {
    (
        socket_addr(t.family, &t.local_addr, t.local_port),
        socket_addr(t.family, &t.remote_addr, t.remote_port),
    )
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

fn comm_name(comm: &[u8; 16]) -> Arc<str> {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{bytes, decoder, record, rst, tuple};

    fn tally_of(sample: RstRecord) -> (RstKey, Tally) {
        let mut ends = tuple();
        ends.remote_port = 0;
        let key = RstKey {
            ends,
            netns: 4026531840,
            reason: 1,
            kind: RecordKind::RstSent as u8,
            hook: ResetHook::SendResetTracepoint as u8,
            state: 0,
            flags: rst_flags::NO_SOCKET | rst_flags::HAS_REASON,
        };
        let tally = Tally {
            counted: 48211,
            first_ns: 2_000,
            last_ns: 1_000_002_000,
            ports: [40001, 40002, 0, 0],
            sample,
        };
        (key, tally)
    }

    #[test]
    fn a_tally_becomes_one_event_with_its_sample_attribution() {
        let mut sample = record(RecordKind::RstSent);
        sample.cgroup_id = 77;
        sample.sock_cookie = 5;
        sample.flags |= rst_flags::HAS_COOKIE | rst_flags::HAS_SOCKET_FACTS;
        sample.frames[0] = 0x8100_0000;
        let (key, tally) = tally_of(sample);
        let ev = decoder().aggregate(&key, &tally).unwrap();
        assert_eq!(ev.kind, RstKind::Sent);
        assert_eq!(ev.resets(), 48211);
        let agg = ev.aggregate.as_ref().unwrap();
        assert_eq!(agg.ports, [40001, 40002]);
        assert_eq!(
            agg.last.duration_since(agg.first).unwrap(),
            std::time::Duration::from_secs(1)
        );
        assert_eq!(ev.time, agg.last);
        // The key's verdict and ends, without the ephemeral port.
        assert_eq!(ev.reason.as_deref(), Some("NO_SOCKET"));
        assert_eq!(ev.state, None);
        assert_eq!(ev.remote, "10.1.2.3:0".parse().unwrap());
        // The sample's attribution; nothing of its one socket.
        assert_eq!(ev.cgroup_id, Some(77));
        assert_eq!(&*ev.task.as_ref().unwrap().comm, "curl");
        assert_eq!(ev.frames[0], 0xffff_ffff_8100_0000);
        assert_eq!(ev.frames[1], 0, "a frame not taken stays none");
        assert_eq!(ev.sock_cookie, None);
        assert_eq!(ev.socket, None);
        assert_eq!(ev.stack_id, None);
    }

    #[test]
    fn a_tally_without_a_sample_still_reports_its_count() {
        // SAFETY: RstRecord is plain integers and byte arrays.
        let blank: RstRecord = unsafe { std::mem::zeroed() };
        let (key, tally) = tally_of(blank);
        let ev = decoder().aggregate(&key, &tally).unwrap();
        assert_eq!(ev.resets(), 48211);
        assert_eq!(ev.context, ExecContext::Softirq);
        assert_eq!(ev.task, None);
        assert_eq!(ev.local, "127.0.0.1:8080".parse().unwrap());
    }

    #[test]
    fn decodes_a_sent_reset_with_reason() {
        let mut rec = record(RecordKind::RstSent);
        rec.flags |= rst_flags::HAS_REASON;
        rec.reason = 11;
        rec.state = 7;
        let ev = rst(&bytes(&rec));
        assert_eq!(ev.kind, RstKind::Sent);
        assert_eq!(ev.local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(ev.remote, "10.1.2.3:40000".parse().unwrap());
        assert_eq!(ev.state, Some(TcpState::Close));
        assert_eq!(ev.reason.as_deref(), Some("TCP_ABORT_ON_CLOSE"));
        assert_eq!(ev.errno, None);
        assert_eq!(ev.netns, Some(4026531840));
        rec.netns = 0;
        assert_eq!(rst(&bytes(&rec)).netns, None);
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
        let errno_in = |state: u8| {
            let mut rec = record(RecordKind::RstReceived);
            rec.state = state;
            rst(&bytes(&rec)).errno
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
        rec.flags = rst_flags::NO_SOCKET | rst_flags::HAS_REASON;
        rec.reason = 1;
        let ev = rst(&bytes(&rec));
        assert_eq!(ev.context, ExecContext::Softirq);
        assert_eq!(ev.task, None);
        assert_eq!(ev.state, None);
        assert_eq!(ev.reason.as_deref(), Some("NO_SOCKET"));
    }

    /// Softirqs that pile up run in ksoftirqd, a kernel thread to the
    /// kernel programs; other kernel threads stay themselves.
    #[test]
    fn ksoftirqd_is_softirq() {
        let mut rec = record(RecordKind::RstSent);
        rec.context = tcprst_common::ExecContext::KernelThread as u8;
        rec.task.comm = *b"ksoftirqd/1\0\0\0\0\0";
        let ev = rst(&bytes(&rec));
        assert_eq!(ev.context, ExecContext::Softirq);
        assert_eq!(ev.task, None);
        rec.task.comm = *b"kworker/1:2\0\0\0\0\0";
        assert_eq!(rst(&bytes(&rec)).context, ExecContext::KernelThread);
    }

    #[test]
    fn ipv6_and_v4_mapped_addresses() {
        let mut rec = record(RecordKind::RstReceived);
        rec.tuple.family = AF_INET6;
        rec.tuple.local_addr = "::1".parse::<Ipv6Addr>().unwrap().octets();
        rec.tuple.remote_addr = "::ffff:192.0.2.7".parse::<Ipv6Addr>().unwrap().octets();
        let ev = rst(&bytes(&rec));
        assert_eq!(ev.local, "[::1]:8080".parse().unwrap());
        assert_eq!(ev.remote, "192.0.2.7:40000".parse().unwrap());
        // Old kernels: no family field at all.
        rec.tuple.family = 0;
        rec.tuple.local_addr = "::ffff:127.0.0.1".parse::<Ipv6Addr>().unwrap().octets();
        assert_eq!(rst(&bytes(&rec)).local, "127.0.0.1:8080".parse().unwrap());
    }

    #[test]
    fn socket_facts_come_from_the_socket_not_the_current_task() {
        let mut rec = record(RecordKind::RstReceived);
        rec.context = tcprst_common::ExecContext::Softirq as u8;
        let ev = rst(&bytes(&rec));
        assert_eq!((ev.cgroup_id, ev.socket), (None, None));
        rec.cgroup_id = 9001;
        rec.flags |= rst_flags::HAS_SOCKET_FACTS;
        rec.shutdown = shutdown_bits::SEND_SHUTDOWN;
        rec.inode = 31337;
        let ev = rst(&bytes(&rec));
        assert_eq!(ev.task, None);
        assert_eq!(ev.cgroup_id, Some(9001));
        assert_eq!(
            ev.socket,
            Some(SocketFacts {
                sent_fin: true,
                rcv_shutdown: false,
                orphaned: false,
                inode: Some(31337),
            })
        );
        rec.flags |= rst_flags::ORPHANED;
        rec.inode = 0;
        rec.shutdown = shutdown_bits::SEND_SHUTDOWN | shutdown_bits::RCV_SHUTDOWN;
        let facts = rst(&bytes(&rec)).socket.unwrap();
        assert!(facts.orphaned && facts.rcv_shutdown && facts.inode.is_none());
    }

    #[test]
    fn cookie_only_when_the_kernel_gave_one() {
        let mut rec = record(RecordKind::RstReceived);
        rec.sock_cookie = 77;
        assert_eq!(rst(&bytes(&rec)).sock_cookie, None);
        rec.flags |= rst_flags::HAS_COOKIE;
        assert_eq!(rst(&bytes(&rec)).sock_cookie, Some(77));
    }

    pub(crate) fn mark(op: u8, how: u8, steps: &[(u8, u64)]) -> CloseMark {
        let mut mark = CloseMark {
            op_at_ns: if op == close_op::NONE { 0 } else { 1_000 },
            tgid: 51435,
            op,
            how,
            first_state: 1,
            steps: steps.len() as u8,
            comm: *b"envoy\0\0\0\0\0\0\0\0\0\0\0",
            step_state: [0; 8],
            step_at_ns: [0; MARK_STEPS],
        };
        for (i, (state, at)) in steps.iter().enumerate() {
            mark.step_state[i] = *state;
            mark.step_at_ns[i] = *at;
        }
        mark
    }

    #[test]
    fn decodes_the_close_mark_after_a_reset() {
        let mut rec = record(RecordKind::RstReceived);
        rec.flags |= rst_flags::HAS_MARK;
        let marked = MarkedRstRecord {
            rst: rec,
            mark: mark(close_op::SHUTDOWN, 1, &[(4, 1_000), (5, 2_000)]),
        };
        let ev = rst(&bytes(&marked));
        let history = ev.history.unwrap();
        let initiator = history.initiator.unwrap();
        assert_eq!(initiator.op, CloseOp::Shutdown(ShutHow::Write));
        assert_eq!(initiator.to_string(), "shutdown(SHUT_WR) by envoy[51435]");
        assert_eq!(history.first_state, Some(TcpState::Established));
        let states: Vec<_> = history.steps.iter().map(|(s, _)| *s).collect();
        assert_eq!(states, [TcpState::FinWait1, TcpState::FinWait2]);
        assert!(history.steps[0].1 < history.steps[1].1);
        // A flagged record too short to hold its mark is refused, not misread.
        assert!(decoder().decode(&bytes(&rec)).is_err());
        // A mark no process made (softirq transitions under --history).
        let quiet = decoder().history(&mark(close_op::NONE, 0, &[(8, 5)]));
        assert_eq!((quiet.initiator, quiet.initiated_at), (None, None));
    }

    #[test]
    fn rejects_short_and_unknown_records() {
        let mut d = decoder();
        let full = bytes(&record(RecordKind::RstSent));
        assert!(d.decode(&full[..50]).is_err());
        assert!(d.decode(&[]).is_err());
        let mut bad = record(RecordKind::RstSent);
        bad.kind = 99;
        assert!(d.decode(&bytes(&bad)).is_err());
        let mut bad = record(RecordKind::RstSent);
        bad.context = 0;
        assert!(d.decode(&bytes(&bad)).is_err());
    }

    #[test]
    fn a_command_name_is_made_once() {
        let mut d = decoder();
        let rec = bytes(&record(RecordKind::RstSent));
        let first = d.decode(&rec).unwrap().task.unwrap().comm;
        assert_eq!(&*first, "curl");
        let again = d.decode(&rec).unwrap().task.unwrap().comm;
        assert!(Arc::ptr_eq(&first, &again));
        // Sixteen bytes with no NUL, and bytes that are not UTF-8.
        assert_eq!(&*comm_name(b"kworker/u8:3-ev0"), "kworker/u8:3-ev0");
        assert_eq!(
            &*comm_name(b"a\xffb\0\0\0\0\0\0\0\0\0\0\0\0\0"),
            "a\u{fffd}b"
        );
    }
}
