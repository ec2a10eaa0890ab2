//! What tcprst reports, independent of how the kernel encoded it.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

pub use tcprst_common::{AttachTier, CALLER_FRAMES, ResetHook};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RstKind {
    Sent,
    Received,
}

impl RstKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Sent => "rst_sent",
            Self::Received => "rst_received",
        }
    }

    /// The kind of a record that stands for many resets.
    pub(crate) fn aggregate_name(self) -> &'static str {
        match self {
            Self::Sent => "rst_sent_aggregate",
            Self::Received => "rst_received_aggregate",
        }
    }
}

/// Resets the kernel only counted, past their key's `--detail-per-sec`
/// budget: one event stands for all of them, with the attribution of the
/// key's last detailed record.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    pub count: u64,
    pub first: SystemTime,
    pub last: SystemTime,
    /// The first few distinct ports of the side whose port is 0 in
    /// `local`/`remote` (the clients' ephemeral ports), as a sample.
    pub ports: Vec<u16>,
}

/// TCP states; their numbers (`include/net/tcp_states.h`) never changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TcpState {
    Established = 1,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    NewSynRecv,
    BoundInactive,
}

impl TcpState {
    /// The states in which one side has sent FIN and the other has not.
    pub(crate) const HALF_CLOSED: [TcpState; 5] = [
        TcpState::FinWait1,
        TcpState::FinWait2,
        TcpState::CloseWait,
        TcpState::LastAck,
        TcpState::Closing,
    ];

    pub(crate) fn is_half_closed(self) -> bool {
        Self::HALF_CLOSED.contains(&self)
    }

    /// Whether the state began with a segment from the peer: the ACK of
    /// our FIN (FIN_WAIT2) or the peer's FIN (CLOSE_WAIT). Every segment
    /// carries an ACK, so the time since the peer's last ACK
    /// (`tcpi_last_ack_recv`) is how long such a state has lasted, at
    /// least. The other half-closed states begin with our own FIN, after
    /// whatever the peer sent last.
    pub(crate) fn begins_with_peer_segment(self) -> bool {
        matches!(self, Self::FinWait2 | Self::CloseWait)
    }

    pub(crate) fn from_kernel(value: u8) -> Option<Self> {
        use TcpState::*;
        Some(match value {
            1 => Established,
            2 => SynSent,
            3 => SynRecv,
            4 => FinWait1,
            5 => FinWait2,
            6 => TimeWait,
            7 => Close,
            8 => CloseWait,
            9 => LastAck,
            10 => Listen,
            11 => Closing,
            12 => NewSynRecv,
            13 => BoundInactive,
            _ => return None,
        })
    }

    pub(crate) fn name(self) -> &'static str {
        use TcpState::*;
        match self {
            Established => "ESTABLISHED",
            SynSent => "SYN_SENT",
            SynRecv => "SYN_RECV",
            FinWait1 => "FIN_WAIT1",
            FinWait2 => "FIN_WAIT2",
            TimeWait => "TIME_WAIT",
            Close => "CLOSE",
            CloseWait => "CLOSE_WAIT",
            LastAck => "LAST_ACK",
            Listen => "LISTEN",
            Closing => "CLOSING",
            NewSynRecv => "NEW_SYN_RECV",
            BoundInactive => "BOUND_INACTIVE",
        }
    }
}

/// The error a received RST hands the application, as `tcp_reset()` decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Errno {
    ConnRefused,
    Pipe,
    ConnReset,
}

impl Errno {
    pub(crate) fn for_reset_in(state: TcpState) -> Option<Self> {
        match state {
            TcpState::SynSent => Some(Self::ConnRefused),
            TcpState::CloseWait => Some(Self::Pipe),
            // tcp_reset() ignores a RST on a closed socket.
            TcpState::Close => None,
            _ => Some(Self::ConnReset),
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::ConnRefused => "ECONNREFUSED",
            Self::Pipe => "EPIPE",
            Self::ConnReset => "ECONNRESET",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecContext {
    Process,
    Softirq,
    KernelThread,
}

impl ExecContext {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Process => "process",
            Self::Softirq => "softirq",
            Self::KernelThread => "kthread",
        }
    }
}

/// The task that was running, when that task is meaningful.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub pid: u32,
    pub tid: u32,
    /// Shared: the decoder makes each command name once.
    pub comm: Arc<str>,
    pub uid: u32,
}

impl Task {
    pub(crate) fn label(&self) -> String {
        process_label(self.pid, &self.comm)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RstEvent {
    pub time: SystemTime,
    /// When the kernel stamped it, on its monotonic clock: unlike `time`,
    /// never stepped, so it orders records and measures between them.
    pub kernel_time: Duration,
    pub kind: RstKind,
    /// This host's end; for a reset sent with no socket, the addressee of
    /// the offending segment.
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// None when the reset was sent with no socket.
    pub state: Option<TcpState>,
    pub reason: Option<Arc<str>>,
    pub sock_cookie: Option<u64>,
    pub netns: Option<u32>,
    pub context: ExecContext,
    /// None in softirq: the interrupted task had nothing to do with it.
    pub task: Option<Task>,
    /// For received resets: what the application's next call returns.
    pub errno: Option<Errno>,
    /// The cgroup (v2) the socket was created in.
    pub cgroup_id: Option<u64>,
    /// What the socket said of itself; None for mini-sockets (TIME_WAIT,
    /// request) and replies sent with no socket.
    pub socket: Option<SocketFacts>,
    /// The socket's close mark, where the kernel keeps them.
    pub history: Option<CloseHistory>,
    /// The innermost kernel frames, zero past the last one taken.
    pub frames: [u64; CALLER_FRAMES],
    /// The whole kernel stack in the `STACKS` map, with `--stack`.
    pub stack_id: Option<u32>,
    /// Which hook saw it, attached how.
    pub hook: ResetHook,
    pub tier: AttachTier,
    /// For netfilter resets: the hook the rejecting rule ran in.
    pub nf_hook: Option<NfHook>,
    /// Set when this event stands for `count` resets of one key.
    pub aggregate: Option<Aggregate>,
}

impl RstEvent {
    /// How many resets this event stands for.
    pub(crate) fn resets(&self) -> u64 {
        self.aggregate.as_ref().map_or(1, |a| a.count)
    }
}

/// Netfilter hooks (`enum nf_inet_hooks`, UAPI: stable numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NfHook {
    PreRouting,
    Input,
    Forward,
    Output,
    PostRouting,
}

impl NfHook {
    pub(crate) fn from_kernel(value: u8) -> Option<Self> {
        Some(match value {
            0 => Self::PreRouting,
            1 => Self::Input,
            2 => Self::Forward,
            3 => Self::Output,
            4 => Self::PostRouting,
            _ => return None,
        })
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::PreRouting => "PREROUTING",
            Self::Input => "INPUT",
            Self::Forward => "FORWARD",
            Self::Output => "OUTPUT",
            Self::PostRouting => "POSTROUTING",
        }
    }
}

/// A process, by pid and command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    pub comm: Arc<str>,
}

impl Process {
    pub(crate) fn label(&self) -> String {
        process_label(self.pid, &self.comm)
    }
}

/// `comm[pid]`, the way people name processes.
pub(crate) fn process_label(pid: impl std::fmt::Display, comm: &str) -> String {
    Label(pid, comm).to_string()
}

/// A process as people read it, "comm[pid]", written where it is wanted
/// rather than into a String of its own first.
pub(crate) struct Label<'a, Pid>(pub Pid, pub &'a str);

impl<Pid: std::fmt::Display> std::fmt::Display for Label<'_, Pid> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}[{}]", self.1, self.0)
    }
}

/// The direction `shutdown(2)` closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutHow {
    Read,
    Write,
    Both,
}

impl ShutHow {
    pub(crate) fn from_kernel(how: u8) -> Option<Self> {
        match how {
            0 => Some(Self::Read),
            1 => Some(Self::Write),
            2 => Some(Self::Both),
            _ => None,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Read => "SHUT_RD",
            Self::Write => "SHUT_WR",
            Self::Both => "SHUT_RDWR",
        }
    }
}

/// How a process started closing a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseOp {
    Shutdown(ShutHow),
    Close,
    Exit,
}

impl CloseOp {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Shutdown(ShutHow::Read) => "shutdown(SHUT_RD)",
            Self::Shutdown(ShutHow::Write) => "shutdown(SHUT_WR)",
            Self::Shutdown(ShutHow::Both) => "shutdown(SHUT_RDWR)",
            Self::Close => "close()",
            Self::Exit => "process exit",
        }
    }
}

/// Who started a socket's close sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Initiator {
    pub op: CloseOp,
    pub task: Task,
}

impl std::fmt::Display for Initiator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} by {}",
            self.op.name(),
            Label(self.task.pid, &self.task.comm)
        )
    }
}

/// What a socket's close mark says: who started its close, and the state
/// changes since (every one with `--history`).
#[derive(Debug, Clone, PartialEq)]
pub struct CloseHistory {
    pub initiator: Option<Initiator>,
    pub initiated_at: Option<SystemTime>,
    /// The state before the first step, whose start the mark does not know.
    pub first_state: Option<TcpState>,
    pub steps: Vec<(TcpState, SystemTime)>,
}

impl CloseHistory {
    /// When the socket entered `state`, if the mark saw it.
    pub(crate) fn entered(&self, state: TcpState) -> Option<SystemTime> {
        self.steps
            .iter()
            .rev()
            .find(|(s, _)| *s == state)
            .map(|(_, at)| *at)
    }
}

/// What the socket itself said about its close when the reset came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketFacts {
    /// We sent FIN (`SEND_SHUTDOWN`).
    pub sent_fin: bool,
    /// The peer's FIN arrived, or reading was shut down (`RCV_SHUTDOWN`).
    pub rcv_shutdown: bool,
    /// No descriptor holds the socket any more.
    pub orphaned: bool,
    /// The socket's inode, when a process holds it.
    pub inode: Option<u64>,
}
