//! Fixtures the unit tests of several modules share.

use std::time::{Duration, SystemTime};

use tcprst_common::{AF_INET, RecordKind, RstRecord, TaskInfo, Tuple, rst_flags};

use crate::{
    bpf::layout::ReasonNames,
    host::enrich::Attribution,
    model::conn::ConnKey,
    model::event::{
        AttachTier, CloseHistory, CloseOp, Errno, ExecContext, Initiator, ResetHook, RstEvent,
        RstKind, ShutHow, SocketFacts, Task, TcpState,
    },
    output::RstReport,
    pipeline::clock::WallClock,
    pipeline::decode::Decoder,
    pipeline::tracker::ScannedSocket,
};

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

pub fn key() -> ConnKey {
    ConnKey::new(
        Some(4026532000),
        "10.0.0.1:15001".parse().unwrap(),
        "10.0.0.2:44410".parse().unwrap(),
    )
}

pub fn reset(
    kind: RstKind,
    at: SystemTime,
    state: Option<TcpState>,
    reason: Option<&str>,
) -> RstEvent {
    let key = key();
    RstEvent {
        time: at,
        // The wall clock never stepped.
        kernel_time: at.duration_since(SystemTime::UNIX_EPOCH).unwrap(),
        kind,
        local: key.local,
        remote: key.remote,
        state,
        reason: reason.map(Into::into),
        sock_cookie: None,
        netns: Some(key.netns),
        context: ExecContext::Softirq,
        task: None,
        errno: state.and_then(Errno::for_reset_in),
        cgroup_id: None,
        socket: None,
        history: None,
        frames: [0; crate::model::event::CALLER_FRAMES],
        stack_id: None,
        hook: match kind {
            RstKind::Sent => ResetHook::SendResetTracepoint,
            RstKind::Received => ResetHook::ReceiveResetTracepoint,
        },
        tier: AttachTier::Tracepoint,
        nf_hook: None,
        aggregate: None,
    }
}

/// The socket as it says itself: held by a process, or orphaned.
pub fn facts(sent_fin: bool, orphaned: bool) -> SocketFacts {
    SocketFacts {
        sent_fin,
        rcv_shutdown: false,
        orphaned,
        inode: (!orphaned).then_some(4242),
    }
}

/// The close mark envoy[51435] leaves by `op` at `at`, then `steps`.
pub fn mark(op: CloseOp, at: SystemTime, steps: &[(TcpState, SystemTime)]) -> CloseHistory {
    CloseHistory {
        initiator: Some(Initiator {
            op,
            task: task(51435, "envoy"),
        }),
        initiated_at: Some(at),
        first_state: Some(TcpState::Established),
        steps: steps.to_vec(),
    }
}

/// The seed 002 proxy socket's mark: shutdown(SHUT_WR) at t(10), FIN_WAIT2
/// right after.
pub fn proxy_half_close() -> CloseHistory {
    mark(
        CloseOp::Shutdown(ShutHow::Write),
        t(10),
        &[(TcpState::FinWait1, t(10)), (TcpState::FinWait2, t(10))],
    )
}

pub fn scanned(state: TcpState, history: Option<CloseHistory>, orphaned: bool) -> ScannedSocket {
    ScannedSocket {
        key: key(),
        state,
        orphaned,
        inode: (!orphaned).then_some(4242),
        cgroup_id: None,
        history,
        peer_quiet: None,
    }
}

/// A diagnosis with this text (its cause is not what the test is about).
pub fn diagnosis(text: &str) -> crate::pipeline::diagnosis::RstDiagnosis {
    crate::pipeline::diagnosis::RstDiagnosis {
        cause: crate::pipeline::diagnosis::Cause::PeerAborted,
        text: text.to_owned().into(),
    }
}

// The kernel's side: records as the programs write them, and a decoder
// that knows two reasons.

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
        sock_cookie: 0,
        netns: 4026531840,
        stack_id: -1,
        cgroup_id: 0,
        inode: 0,
        tuple: tuple(),
        task: task_info(),
        hook: match kind {
            RecordKind::RstReceived => ResetHook::ReceiveResetTracepoint,
            _ => ResetHook::SendResetTracepoint,
        } as u8,
        tier: AttachTier::Tracepoint as u8,
        nf_hook: 0,
        shutdown: 0,
        frames: [0; tcprst_common::CALLER_FRAMES],
    }
}

pub fn bytes<T>(rec: &T) -> Vec<u8> {
    // SAFETY: a plain repr(C) value viewed as bytes for the test.
    unsafe { std::slice::from_raw_parts((rec as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}

pub fn decoder() -> Decoder {
    Decoder::new(
        ReasonNames::from_pairs([(1, "NO_SOCKET".into()), (11, "TCP_ABORT_ON_CLOSE".into())]),
        WallClock::now(),
    )
}

pub fn rst(bytes: &[u8]) -> RstEvent {
    decoder().decode(bytes).unwrap()
}

/// A report of `ev` alone: no connection, attribution or explanation.
pub fn bare_report(ev: RstEvent) -> RstReport {
    RstReport {
        ev,
        conn: None,
        diagnosis: None,
        attribution: Attribution::default(),
        peer: None,
        caller: None,
        stack: None,
        origin: None,
        conntrack: None,
    }
}
