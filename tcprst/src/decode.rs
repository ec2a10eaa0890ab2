//! Ring-buffer bytes → domain records.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{Result, anyhow, bail};
use tcprst_common::{
    AF_INET, AF_INET6, RecordKind, RstRecord, StateRecord, TaskInfo, Tuple, close_op, rst_flags,
};

use crate::{
    clock::WallClock,
    event::{
        AttachTier, CloseOp, Errno, ExecContext, Initiator, NfHook, Process, ResetHook, RstEvent,
        RstKind, ShutHow, StateChange, Task, TcpState,
    },
    layout::ReasonNames,
};

#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Rst(RstEvent),
    State(StateChange),
}

pub struct Decoder {
    reasons: ReasonNames,
    pub clock: WallClock,
}

impl Decoder {
    pub fn new(reasons: ReasonNames, clock: WallClock) -> Self {
        Self { reasons, clock }
    }

    pub fn decode(&self, bytes: &[u8]) -> Result<Record> {
        let Some(&kind) = bytes.first() else {
            bail!("empty record");
        };
        match RecordKind::from_u8(kind) {
            Some(RecordKind::RstSent) => self.rst(read(bytes)?, RstKind::Sent).map(Record::Rst),
            Some(RecordKind::RstReceived) => {
                self.rst(read(bytes)?, RstKind::Received).map(Record::Rst)
            }
            Some(RecordKind::StateChange) => self.state(read(bytes)?).map(Record::State),
            None => bail!("unknown record kind {kind}"),
        }
    }

    fn rst(&self, rec: RstRecord, kind: RstKind) -> Result<RstEvent> {
        let context = exec_context(rec.context)?;
        let has = |flag: u8| rec.flags & flag != 0;
        let state = has(rst_flags::HAS_STATE)
            .then(|| TcpState::from_kernel(rec.state))
            .flatten();
        let (local, remote) = endpoints(&rec.tuple);
        Ok(RstEvent {
            time: self.clock.wall_time(rec.timestamp_ns),
            kind,
            local,
            remote,
            state,
            reason: has(rst_flags::HAS_REASON).then(|| self.reasons.name(rec.reason)),
            sock_cookie: (has(rst_flags::HAS_COOKIE) && rec.sock_cookie != 0)
                .then_some(rec.sock_cookie),
            netns: known_netns(rec.netns),
            context,
            task: task(context, &rec.task),
            errno: match kind {
                RstKind::Received => state.and_then(Errno::for_reset_in),
                RstKind::Sent => None,
            },
            cgroup_id: nonzero(rec.cgroup_id),
            owner: (rec.owner.tgid != 0).then(|| Process {
                pid: rec.owner.tgid,
                comm: comm_str(&rec.owner.comm),
            }),
            stack_id: u32::try_from(rec.stack_id).ok(),
            hook: ResetHook::from_u8(rec.hook)
                .ok_or_else(|| anyhow!("unknown reset hook {}", rec.hook))?,
            tier: AttachTier::from_u8(rec.tier)
                .ok_or_else(|| anyhow!("unknown attach tier {}", rec.tier))?,
            nf_hook: has(rst_flags::HAS_NF_HOOK)
                .then(|| NfHook::from_kernel(rec.nf_hook))
                .flatten(),
        })
    }

    fn state(&self, rec: StateRecord) -> Result<StateChange> {
        let context = exec_context(rec.context)?;
        let Some(new) = TcpState::from_kernel(rec.new_state) else {
            bail!("unknown TCP state {}", rec.new_state);
        };
        let task = task(context, &rec.task);
        let op = match rec.op {
            close_op::SHUTDOWN => ShutHow::from_kernel(rec.how).map(CloseOp::Shutdown),
            close_op::CLOSE => Some(CloseOp::Close),
            close_op::EXIT => Some(CloseOp::Exit),
            _ => None,
        };
        let (local, remote) = endpoints(&rec.tuple);
        Ok(StateChange {
            time: self.clock.wall_time(rec.timestamp_ns),
            local,
            remote,
            netns: known_netns(rec.netns),
            old: TcpState::from_kernel(rec.old_state),
            new,
            context,
            initiator: op
                .zip(task.clone())
                .map(|(op, task)| Initiator { op, task }),
            task,
            cgroup_id: nonzero(rec.cgroup_id),
        })
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

fn exec_context(raw: u8) -> Result<ExecContext> {
    Ok(match tcprst_common::ExecContext::from_u8(raw) {
        Some(tcprst_common::ExecContext::Process) => ExecContext::Process,
        Some(tcprst_common::ExecContext::Softirq) => ExecContext::Softirq,
        Some(tcprst_common::ExecContext::KernelThread) => ExecContext::KernelThread,
        None => bail!("unknown execution context {raw}"),
    })
}

fn task(context: ExecContext, info: &TaskInfo) -> Option<Task> {
    (context != ExecContext::Softirq).then(|| Task {
        pid: info.tgid,
        tid: info.tid,
        comm: comm_str(&info.comm),
        uid: info.uid,
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

fn comm_str(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tcprst_common::SocketOwner;

    const LOOPBACK_V4: [u8; 16] = [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

    pub fn tuple() -> Tuple {
        Tuple {
            family: AF_INET,
            local_port: 8080,
            remote_port: 40000,
            _pad: 0,
            local_addr: LOOPBACK_V4,
            remote_addr: [10, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        }
    }

    pub fn task_info() -> TaskInfo {
        TaskInfo {
            tgid: 42,
            tid: 43,
            uid: 1000,
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
        }
    }

    pub fn record(kind: RecordKind) -> RstRecord {
        RstRecord {
            kind: kind as u8,
            context: tcprst_common::ExecContext::Process as u8,
            flags: rst_flags::HAS_STATE,
            state: 1,
            reason: 0,
            timestamp_ns: 1_000,
            skaddr: 0xffff_8880_0000_1000,
            sock_cookie: 0,
            netns: 4026531840,
            stack_id: -1,
            cgroup_id: 0,
            tuple: tuple(),
            task: task_info(),
            owner: SocketOwner {
                tgid: 0,
                comm: [0; 16],
            },
            hook: match kind {
                RecordKind::RstReceived => ResetHook::ReceiveResetTracepoint,
                _ => ResetHook::SendResetTracepoint,
            } as u8,
            tier: AttachTier::Tracepoint as u8,
            nf_hook: 0,
            _pad: [0; 5],
        }
    }

    pub fn state_record(old: u8, new: u8) -> StateRecord {
        StateRecord {
            kind: RecordKind::StateChange as u8,
            context: tcprst_common::ExecContext::Process as u8,
            _pad0: 0,
            old_state: old,
            new_state: new,
            op: close_op::NONE,
            how: 0,
            _pad: 0,
            timestamp_ns: 2_000,
            skaddr: 0xffff_8880_0000_1000,
            netns: 4026531840,
            fd: -1,
            cgroup_id: 0,
            tuple: tuple(),
            task: task_info(),
        }
    }

    pub fn bytes<T>(rec: &T) -> Vec<u8> {
        // SAFETY: a plain repr(C) value viewed as bytes for the test.
        unsafe { std::slice::from_raw_parts((rec as *const T).cast::<u8>(), size_of::<T>()) }
            .to_vec()
    }

    fn decoder() -> Decoder {
        Decoder::new(
            ReasonNames::from_pairs([(1, "NO_SOCKET".into()), (11, "TCP_ABORT_ON_CLOSE".into())]),
            WallClock::now(),
        )
    }

    pub fn rst(bytes: &[u8]) -> RstEvent {
        match decoder().decode(bytes).unwrap() {
            Record::Rst(ev) => ev,
            other => panic!("not a reset: {other:?}"),
        }
    }

    fn state(rec: &StateRecord) -> StateChange {
        match decoder().decode(&bytes(rec)).unwrap() {
            Record::State(ev) => ev,
            other => panic!("not a state change: {other:?}"),
        }
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
    fn socket_cgroup_and_owner_are_not_the_current_task() {
        let mut rec = record(RecordKind::RstReceived);
        rec.context = tcprst_common::ExecContext::Softirq as u8;
        assert_eq!(
            (rst(&bytes(&rec)).cgroup_id, rst(&bytes(&rec)).owner),
            (None, None)
        );
        rec.cgroup_id = 9001;
        rec.owner = SocketOwner {
            tgid: 77,
            comm: *b"envoy\0\0\0\0\0\0\0\0\0\0\0",
        };
        let ev = rst(&bytes(&rec));
        assert_eq!(ev.task, None);
        assert_eq!(ev.cgroup_id, Some(9001));
        assert_eq!(
            ev.owner,
            Some(Process {
                pid: 77,
                comm: "envoy".into()
            })
        );
    }

    #[test]
    fn cookie_only_when_the_kernel_gave_one() {
        let mut rec = record(RecordKind::RstReceived);
        rec.sock_cookie = 77;
        assert_eq!(rst(&bytes(&rec)).sock_cookie, None);
        rec.flags |= rst_flags::HAS_COOKIE;
        assert_eq!(rst(&bytes(&rec)).sock_cookie, Some(77));
    }

    #[test]
    fn decodes_state_changes_and_who_started_closing() {
        let mut rec = state_record(1, 4);
        rec.op = close_op::SHUTDOWN;
        rec.how = 1;
        rec.fd = 5;
        let ev = state(&rec);
        assert_eq!(
            (ev.old, ev.new),
            (Some(TcpState::Established), TcpState::FinWait1)
        );
        let initiator = ev.initiator.unwrap();
        assert_eq!(initiator.op, CloseOp::Shutdown(ShutHow::Write));
        assert!(!initiator.op.orphans());
        assert_eq!(initiator.to_string(), "shutdown(SHUT_WR) by curl[42]");

        rec.op = close_op::CLOSE;
        assert!(state(&rec).initiator.unwrap().op.orphans());
        rec.op = close_op::NONE;
        assert_eq!(state(&rec).initiator, None);
        // Softirq transitions have no task, so no initiator either.
        rec.op = close_op::EXIT;
        rec.context = tcprst_common::ExecContext::Softirq as u8;
        assert_eq!(state(&rec).initiator, None);
    }

    #[test]
    fn rejects_short_and_unknown_records() {
        let d = decoder();
        let full = bytes(&record(RecordKind::RstSent));
        assert!(d.decode(&full[..50]).is_err());
        assert!(d.decode(&[]).is_err());
        let mut bad = record(RecordKind::RstSent);
        bad.kind = 99;
        assert!(d.decode(&bytes(&bad)).is_err());
        let mut bad = record(RecordKind::RstSent);
        bad.context = 0;
        assert!(d.decode(&bytes(&bad)).is_err());
        assert!(d.decode(&bytes(&state_record(1, 99))).is_err());
    }
}
