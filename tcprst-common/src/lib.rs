//! The ABI shared by the kernel programs and the loader.
//!
//! Everything here is `#[repr(C)]` and plain data: the kernel side writes these
//! records into the ring buffer and reads the layout globals, the user side
//! (feature `user`) fills the globals and decodes the records. Kernel layouts
//! are never baked in: every offset is measured on the running kernel and
//! handed to the programs through the globals below.
#![no_std]

/// Marks a field or member the running kernel does not have.
pub const ABSENT: u32 = u32::MAX;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// How a tracepoint stores the connection tuple.
///
/// `tcp:tcp_send_reset` since 6.10 stores `saddr`/`daddr` as a
/// `sockaddr_in`/`sockaddr_in6` (family and port inside); the older
/// `tcp_event_sk*` classes, and `tcp:tcp_receive_reset` still, have separate
/// `sport`, `dport`, `family`, `saddr`, `daddr`, `saddr_v6` and `daddr_v6`.
pub mod tuple_style {
    pub const SOCKADDR: u32 = 1;
    pub const SPLIT: u32 = 2;
}

/// Byte offsets of the tuple fields in a tracepoint record. The `s*` fields
/// are the local end, the `d*` fields the remote one, on every kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TupleFields {
    /// One of `tuple_style::*`.
    pub style: u32,
    pub family: u32,
    pub sport: u32,
    pub dport: u32,
    pub saddr: u32,
    pub daddr: u32,
    pub saddr_v6: u32,
    pub daddr_v6: u32,
}

/// Byte offsets of the fields a reset tracepoint program reads; `ABSENT`
/// where this kernel's tracepoint lacks the field.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResetFields {
    pub skaddr: u32,
    pub skbaddr: u32,
    pub state: u32,
    pub reason: u32,
    pub sock_cookie: u32,
    pub tuple: TupleFields,
}

impl ResetFields {
    /// The value compiled into the object; the loader always overrides it.
    pub const UNSET: Self = Self {
        skaddr: ABSENT,
        skbaddr: ABSENT,
        state: ABSENT,
        reason: ABSENT,
        sock_cookie: ABSENT,
        tuple: TupleFields {
            style: tuple_style::SPLIT,
            family: ABSENT,
            sport: ABSENT,
            dport: ABSENT,
            saddr: ABSENT,
            daddr: ABSENT,
            saddr_v6: ABSENT,
            daddr_v6: ABSENT,
        },
    };
}

/// Kernel struct member offsets, read from the running kernel's BTF.
/// Chains like `net_ns_inum` are the sum of nested member offsets.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `sock_common.skc_state`
    pub sk_state: u32,
    /// `sock_common.skc_net` (a `possible_net_t`, i.e. a `struct net *`)
    pub sk_net: u32,
    /// `net.ns.inum`
    pub net_ns_inum: u32,
    /// `net.net_cookie` (5.7+), by which each CPU caches namespaces' inodes
    pub net_cookie: u32,
    /// `sk_buff.dev`
    pub skb_dev: u32,
    /// `net_device.nd_net`
    pub dev_nd_net: u32,
    /// `task_struct.flags`
    pub task_flags: u32,
    /// `task_struct.stack`: the lowest address of the task's kernel stack
    pub task_stack: u32,
    /// `sock.sk_cgrp_data.cgroup`
    pub sk_cgroup: u32,
    /// `cgroup.kn`
    pub cgroup_kn: u32,
    /// `kernfs_node.id`: the cgroup id, which is the cgroup2 directory's inode.
    pub kn_id: u32,
    // The rest serve the function tiers, which read the tuple themselves.
    /// `sock_common.skc_family`
    pub skc_family: u32,
    /// `sock_common.skc_daddr`
    pub skc_daddr: u32,
    /// `sock_common.skc_rcv_saddr`
    pub skc_rcv_saddr: u32,
    /// `sock_common.skc_dport` (network order)
    pub skc_dport: u32,
    /// `inet_sock.inet_sport` (the local port, network order). Not
    /// `skc_num`: closing unhashes the socket and zeroes it before
    /// tcp_send_active_reset runs, unless the port was bound explicitly.
    pub inet_sport: u32,
    /// `sock_common.skc_v6_daddr`
    pub skc_v6_daddr: u32,
    /// `sock_common.skc_v6_rcv_saddr`
    pub skc_v6_rcv_saddr: u32,
    /// `sk_buff.head`
    pub skb_head: u32,
    /// `sk_buff.network_header` (a u16 offset from `head`)
    pub skb_network_header: u32,
    /// `sk_buff.transport_header` (a u16 offset from `head`)
    pub skb_transport_header: u32,
    // What a full socket itself records about its close, read at reset time.
    /// `sock.sk_shutdown` (a u8 of `SEND_SHUTDOWN`/`RCV_SHUTDOWN` bits)
    pub sk_shutdown: u32,
    /// `sock.sk_socket`: NULL once the last descriptor is closed (orphaned)
    pub sk_socket: u32,
    /// From a `struct socket *` to its inode number:
    /// `socket_alloc.vfs_inode` + `inode.i_ino`
    pub socket_ino: u32,
    /// `sock.sk_protocol` (a u16; `ABSENT` where it is a bitfield)
    pub sk_protocol: u32,
    // What the close-mark program reads with plain loads instead of helper
    // calls, where the verifier types the task and the socket.
    /// `task_struct.comm` (`ABSENT` unless 8-aligned: it is read as two u64s)
    pub task_comm: u32,
    /// `sock_common.skc_cookie`: 0 until someone asks for the cookie
    pub sk_cookie: u32,
}

impl KernelOffsets {
    pub const UNSET: Self = Self {
        sk_state: ABSENT,
        sk_net: ABSENT,
        net_ns_inum: ABSENT,
        net_cookie: ABSENT,
        skb_dev: ABSENT,
        dev_nd_net: ABSENT,
        task_flags: ABSENT,
        task_stack: ABSENT,
        sk_cgroup: ABSENT,
        cgroup_kn: ABSENT,
        kn_id: ABSENT,
        skc_family: ABSENT,
        skc_daddr: ABSENT,
        skc_rcv_saddr: ABSENT,
        skc_dport: ABSENT,
        inet_sport: ABSENT,
        skc_v6_daddr: ABSENT,
        skc_v6_rcv_saddr: ABSENT,
        skb_head: ABSENT,
        skb_network_header: ABSENT,
        skb_transport_header: ABSENT,
        sk_shutdown: ABSENT,
        sk_socket: ABSENT,
        socket_ino: ABSENT,
        sk_protocol: ABSENT,
        task_comm: ABSENT,
        sk_cookie: ABSENT,
    };
}

/// The kernel hooks that see resets. Records carry one, so userspace can say
/// where a reset was seen and de-duplicate nothing by guesswork.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResetHook {
    /// `tcp:tcp_send_reset`
    SendResetTracepoint = 1,
    /// `tcp:tcp_receive_reset`
    ReceiveResetTracepoint = 2,
    /// `tcp_send_active_reset()`: resets a socket decided to send.
    ActiveReset = 3,
    /// `tcp_v4_send_reset()`: replies to IPv4 segments.
    V4SendReset = 4,
    /// `tcp_v6_send_reset()`
    V6SendReset = 5,
    /// `nf_send_reset()`: netfilter REJECT with tcp-reset, IPv4.
    NfSendReset = 6,
    /// `nf_send_reset6()`
    NfSendReset6 = 7,
}

/// Kernel functions that send resets, in `FUNCTION_ARGS` order.
pub const FUNCTION_HOOKS: [ResetHook; 5] = [
    ResetHook::ActiveReset,
    ResetHook::V4SendReset,
    ResetHook::V6SendReset,
    ResetHook::NfSendReset,
    ResetHook::NfSendReset6,
];

impl ResetHook {
    /// What it is called: the tracepoint, or the kernel function.
    pub const fn name(self) -> &'static str {
        match self {
            Self::SendResetTracepoint => "tcp:tcp_send_reset",
            Self::ReceiveResetTracepoint => "tcp:tcp_receive_reset",
            Self::ActiveReset => "tcp_send_active_reset",
            Self::V4SendReset => "tcp_v4_send_reset",
            Self::V6SendReset => "tcp_v6_send_reset",
            Self::NfSendReset => "nf_send_reset",
            Self::NfSendReset6 => "nf_send_reset6",
        }
    }

    /// Bit in `TRACEPOINT_COVERED`: resets of this function are reported by
    /// its function-tier program, so the tracepoint program skips them.
    pub const fn covered_bit(self) -> u32 {
        1 << self as u32
    }
}

/// How a program is attached, from the most to the least capable.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AttachTier {
    Tracepoint = 1,
    Kprobe = 2,
    Fentry = 3,
}

impl AttachTier {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Tracepoint => "tracepoint",
            Self::Kprobe => "kprobe",
            Self::Fentry => "fentry",
        }
    }
}

/// Argument positions (0-based) of a reset function, read from its BTF
/// prototype because they moved when 6.10 added `reason`; `ABSENT` where the
/// function has no such argument.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FunctionArgs {
    pub sk: u32,
    /// The segment being answered (`skb`, or `oldskb` for netfilter).
    pub skb: u32,
    pub reason: u32,
    /// `struct net *` (netfilter)
    pub net: u32,
    /// The netfilter hook number (netfilter)
    pub hook: u32,
}

impl FunctionArgs {
    pub const UNSET: Self = Self {
        sk: ABSENT,
        skb: ABSENT,
        reason: ABSENT,
        net: ABSENT,
        hook: ABSENT,
    };
}

/// Filters cheap enough to apply in the kernel, before a record is reserved.
/// Zero means "any" for every field.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct KernelFilter {
    pub netns: u32,
    /// Matches the current process's tgid; records not in process context never match.
    pub tgid: u32,
    /// Matches the local or the remote port (host order).
    pub port: u16,
    pub _pad: u16,
}

/// The first field of every ring-buffer record, so the decoder can dispatch.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    RstSent = 1,
    RstReceived = 2,
}

/// Where the kernel was running when it produced a record.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecContext {
    /// A system call or another path of the current user process.
    Process = 1,
    /// Softirq (packet receive, timers): the current task is unrelated.
    Softirq = 2,
    /// A kernel thread (threaded NAPI, workqueues): no user process to blame.
    KernelThread = 3,
}

/// `RstRecord::flags` bits.
pub mod rst_flags {
    /// The tracepoint had no socket (a reply to a segment for no socket).
    pub const NO_SOCKET: u8 = 1 << 0;
    pub const HAS_REASON: u8 = 1 << 1;
    pub const HAS_COOKIE: u8 = 1 << 2;
    pub const HAS_STATE: u8 = 1 << 3;
    /// `nf_hook` is meaningful.
    pub const HAS_NF_HOOK: u8 = 1 << 4;
    /// `shutdown` and `inode` were read from a full socket.
    pub const HAS_SOCKET_FACTS: u8 = 1 << 5;
    /// The socket has no descriptor left (`sk_socket` is NULL): orphaned.
    pub const ORPHANED: u8 = 1 << 6;
    /// A `CloseMark` follows the record (`MarkedRstRecord`).
    pub const HAS_MARK: u8 = 1 << 7;
}

/// `sock.sk_shutdown` bits.
pub mod shutdown_bits {
    /// The peer's FIN arrived, or the application shut down reading.
    pub const RCV_SHUTDOWN: u8 = 1;
    /// We sent FIN: `shutdown(SHUT_WR)` or `close()`.
    pub const SEND_SHUTDOWN: u8 = 2;
}

/// A connection's two ends. IPv4 addresses use the first four bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub family: u16,
    /// Host order.
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad: u16,
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
}

/// The current task, filled only outside softirq.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskInfo {
    pub tgid: u32,
    pub tid: u32,
    pub uid: u32,
    pub comm: [u8; 16],
}

/// One reset sent or received.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RstRecord {
    /// `RecordKind as u8`.
    pub kind: u8,
    /// `ExecContext as u8`.
    pub context: u8,
    /// `rst_flags::*`.
    pub flags: u8,
    /// `TCP_*` state number (stable across kernels).
    pub state: u8,
    /// `enum sk_rst_reason` value; its names are read from the running kernel.
    pub reason: u32,
    /// CLOCK_MONOTONIC nanoseconds.
    pub timestamp_ns: u64,
    pub sock_cookie: u64,
    /// Network namespace inode; 0 when unknown (no namespace has inode 0).
    pub netns: u32,
    /// The whole kernel stack in the `STACKS` map, with `--stack`;
    /// negative when none was taken.
    pub stack_id: i32,
    /// The socket's cgroup (v2) id; 0 when unknown.
    pub cgroup_id: u64,
    /// The socket's inode, which names the process holding it
    /// (`/proc/*/fd`); 0 when orphaned or not a full socket.
    pub inode: u64,
    pub tuple: Tuple,
    pub task: TaskInfo,
    /// `ResetHook as u8`: which hook saw it.
    pub hook: u8,
    /// `AttachTier as u8`: how that hook was attached.
    pub tier: u8,
    /// The netfilter hook number (`NF_INET_*`) for netfilter resets.
    pub nf_hook: u8,
    /// `sock.sk_shutdown` (`shutdown_bits`), with `HAS_SOCKET_FACTS`.
    pub shutdown: u8,
    /// The innermost kernel frames, zero past the last one taken: enough to
    /// name the caller past the tracing machinery, and all the kernel
    /// unwinds (a whole stack per reset cost microseconds). Each is the low
    /// half of its address (`frame_addresses`), which made the record 152
    /// bytes instead of 184: a fifth more records in the same ring (#11).
    pub frames: [u32; CALLER_FRAMES],
}

impl RstRecord {
    /// The frames' whole addresses. x86-64 keeps all kernel code in the
    /// top 2 GiB of addresses (the kernel is built with `-mcmodel=kernel`,
    /// and modules, BPF programs and their trampolines are placed within
    /// its reach), so the high half of every frame is all ones.
    pub fn frame_addresses(&self) -> [u64; CALLER_FRAMES] {
        self.frames.map(|low| match low {
            0 => 0,
            low => 0xffff_ffff_0000_0000 | u64::from(low),
        })
    }
}

/// Kernel frames a reset record carries.
pub const CALLER_FRAMES: usize = 8;

/// Steps a `CloseMark` keeps.
pub const MARK_STEPS: usize = 6;

/// What tcprst knows of a socket's close: who started it and how, and the
/// state changes since. With `--history` the programs keep one in each
/// socket's own storage (`BPF_MAP_TYPE_SK_STORAGE`, freed with the socket),
/// with every state change; by default userspace assembles one from the
/// socket's `CloseNote`s.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloseMark {
    /// CLOCK_MONOTONIC ns of `op`; 0 when no process acted.
    pub op_at_ns: u64,
    pub tgid: u32,
    /// `close_op::*`
    pub op: u8,
    /// `SHUT_RD` 0, `SHUT_WR` 1, `SHUT_RDWR` 2, for `close_op::SHUTDOWN`.
    pub how: u8,
    /// The state before `step_state[0]`.
    pub first_state: u8,
    /// Valid entries in the step arrays.
    pub steps: u8,
    pub comm: [u8; 16],
    pub step_state: [u8; 8],
    /// CLOCK_MONOTONIC ns of each step.
    pub step_at_ns: [u64; MARK_STEPS],
}

/// Memory the `CLOSE_NOTES` rings take together, at most: each CPU has
/// its own ring of `2^Settings::note_slots_shift` slots, so a program never
/// shares a head or a slot with another CPU's. 3 MiB is 65,536 notes: at
/// five notes a connection (start, FIN_WAIT2 and end on the side that
/// closes first; start and end on the other), 0.65 s of a 20,000/s churn
/// before the oldest is overwritten. Userspace reads the rings every 50 ms
/// (`tcprst/src/bpf/close_notes.rs`), so a stalled reader has margin.
pub const CLOSE_NOTES_BYTES: u32 = 3 << 20;

/// The u64s between two CPUs' heads in `CLOSE_NOTE_HEADS`: 128 bytes, a
/// cache line and the neighbour x86's prefetcher fetches with it. Each
/// note bumps its CPU's head, and heads side by side made every CPU's notes
/// take the line from the others.
pub const NOTE_HEAD_STRIDE: u32 = 16;

/// `CloseNote::seq` while a program writes the note.
pub const NOTE_WRITING: u64 = u64::MAX;

/// One step of a socket's close, by default: the start of a close by a
/// process (FIN_WAIT1 or LAST_ACK: who, how, and when), a step after it
/// (FIN_WAIT2, CLOSING), or its end (CLOSE, from one of those states).
/// Notes go into rings that userspace maps and reads as they fill, keeping
/// those of closes not ended: writing one costs a slot and no
/// allocation, where a `CloseMark` in socket storage costs an allocation
/// when created and another free with its socket (#10).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloseNote {
    /// The note's number in its CPU's ring, whose slot it takes modulo the
    /// ring's size. Written `NOTE_WRITING` first and `seq` last, so a reader
    /// can tell a copy the writer tore, or a slot a later note took.
    pub seq: u64,
    /// The socket's cookie, as sock_diag and the reset records give it.
    pub cookie: u64,
    /// CLOCK_MONOTONIC ns.
    pub at_ns: u64,
    pub tgid: u32,
    /// `close_op::*`; `NONE` for a step after the start.
    pub op: u8,
    /// As `CloseMark::how`.
    pub how: u8,
    /// `TCP_*` states, before and after.
    pub old_state: u8,
    pub new_state: u8,
    /// The process's command, with an op.
    pub comm: [u8; 16],
}

/// A reset whose socket had a `CloseMark`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MarkedRstRecord {
    pub rst: RstRecord,
    pub mark: CloseMark,
}

/// What the loader tells the programs beyond layouts and filters.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// `--history`: keep every state change of every socket in its storage;
    /// otherwise only `CloseNote`s are written.
    pub every_transition: u8,
    /// `tcp:tcp_send_reset` has a `reason` argument (Linux 6.10+).
    pub send_reset_has_reason: u8,
    /// `--stack`: also store each reset's whole stack in `STACKS`.
    pub whole_stacks: u8,
    /// Each CPU's `CLOSE_NOTES` ring has `1 << note_slots_shift` slots.
    pub note_slots_shift: u8,
    /// Records wake the reader only once this many bytes wait in the ring
    /// buffer; the reader also drains on a short timer.
    pub wakeup_bytes: u32,
    /// `--detail-per-sec`: resets of one `RstKey` that get their own record
    /// per tally period; the rest are only counted. 0: every reset.
    pub detail_per_period: u32,
    /// How a reset program tells softirq from process context: by where its
    /// own stack lies, when this is the size of every task's kernel stack
    /// (`THREAD_SIZE`); by the `softirq_entry`/`softirq_exit` programs when
    /// 0 (`StackLayout` in the loader says when).
    pub task_stack_size: u32,
    /// From `task_struct.stack` to the `orig_ax` of the user registers the
    /// kernel saved at the top of that stack: the system call the task is in,
    /// or an interrupt's vector (negative). Set with `task_stack_size`.
    pub user_orig_ax: u32,
}

/// What makes two resets "the same" for counting in the kernel: the
/// connection's addresses and its service port, the namespace, and what
/// the kernel decided. The other port, the higher of the two, is the
/// client's ephemeral one, which a storm varies on every connection: it is
/// zeroed in the key and sampled in the tally. (Keeping "the remote port
/// out" would not do: for a client's received resets the ephemeral port is
/// the local one.) The caller is not in the key: finding it is the
/// unwinding that counting saves, and within one (hook, reason, state) it
/// hardly ever differs; each key's detailed records still show theirs. No
/// implicit padding: the kernel hashes every byte.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RstKey {
    /// The higher of the two ports is 0.
    pub ends: Tuple,
    pub netns: u32,
    pub reason: u32,
    /// `RecordKind as u8`.
    pub kind: u8,
    /// `ResetHook as u8`.
    pub hook: u8,
    /// The socket's `TCP_*` state; 0 with no socket.
    pub state: u8,
    /// `rst_flags::NO_SOCKET`, `HAS_REASON` and `HAS_STATE` of the record.
    pub flags: u8,
}

/// Ephemeral ports an `RstCount` keeps as a sample.
pub const TALLY_PORTS: usize = 4;

/// One key's budget in one tally period, shared by every CPU: the first
/// `detail_per_period` resets get their own record. Written only by those,
/// so once the budget is spent every CPU reads it from its own cache.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RstBudget {
    /// Resets that got their own record (may pass the budget by the few
    /// that raced on other CPUs).
    pub detailed: u32,
    pub _pad: u32,
    /// The key's last detailed record: the attribution (process, cgroup,
    /// caller) the aggregate reports.
    pub sample: RstRecord,
}

/// One CPU's count of a key's resets past its budget in one tally period.
/// Per CPU, so that counting a reset writes only this CPU's memory: a
/// shared count is written by every CPU a storm runs on, and each write
/// takes the line from the others. Userspace adds the CPUs up and turns
/// each key with resets counted into one aggregate record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RstCount {
    /// Resets only counted here.
    pub counted: u64,
    /// CLOCK_MONOTONIC ns of this CPU's first and last counted reset.
    pub first_ns: u64,
    pub last_ns: u64,
    /// The first distinct ports of counted resets on the side the key
    /// zeroed; 0 is unused.
    pub ports: [u16; TALLY_PORTS],
    /// This CPU found the key's budget spent: it counts without looking.
    pub spent: u32,
    pub _pad: u32,
}

/// Two sets of tally maps take turns, one period each: the programs count
/// into the set `names::maps::TALLY_TURN` (a one-entry array) names, while
/// userspace empties the other, which no program has written for a whole
/// period, so draining it races nothing. Each set is a budget map and a
/// per-CPU count map.
pub const TALLY_MAPS: [(&str, &str); 2] = [
    (names::maps::BUDGETS_A, names::maps::COUNTS_A),
    (names::maps::BUDGETS_B, names::maps::COUNTS_B),
];
/// Keys each budget map holds; past that, resets get their own record.
pub const TALLY_KEYS: u32 = 2048;
/// Keys past their budget each count map holds, per CPU. Only a storm's
/// keys spend their budget, and they are few; a port scan's keys are many
/// but each one small.
pub const COUNTED_KEYS: u32 = 512;

/// What made a socket start closing, when a process did.
pub mod close_op {
    pub const NONE: u8 = 0;
    /// `shutdown(2)`; `CloseMark::how` says which direction.
    pub const SHUTDOWN: u8 = 1;
    /// The last `close(2)` of the socket: it is orphaned now.
    pub const CLOSE: u8 = 2;
    /// The owning process exited: the socket is orphaned now.
    pub const EXIT: u8 = 3;
}

// The loader decodes records by size; a silent layout change must not build.
const _: () = assert!(core::mem::size_of::<RstRecord>() == 152);
const _: () = assert!(core::mem::size_of::<CloseMark>() == 88);
const _: () = assert!(core::mem::size_of::<CloseNote>() == 48);
const _: () = assert!(core::mem::size_of::<RstKey>() == 52);

/// Slots of the per-CPU `COUNTERS` array: what the programs could not do,
/// so none of it goes unseen.
pub mod counters {
    /// Records that did not fit in the ring buffer.
    pub const LOST_RECORDS: u32 = 0;
    /// Resets whose caller frames could not be taken.
    pub const STACK_FAILURES: u32 = 1;
    /// Resets that got their own record past their key's budget because
    /// a tally map was full: nothing is lost, but the storm costs more.
    pub const TALLY_FULL: u32 = 2;
    /// Resets dropped because their connection's ends could not be read
    /// (`--debug-bpf` logs which field, at which offset).
    pub const TUPLE_FAILURES: u32 = 3;
    pub const SLOTS: u32 = 4;
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    /// aya::Pod lets a value be copied to and from a map or global as bytes.
    macro_rules! pod {
        ($($t:ty),+) => {$(
            // SAFETY: `#[repr(C)]` plain data, with no padding the kernel
            // could read as meaningful.
            unsafe impl aya::Pod for $t {}
        )+};
    }
    pod!(
        ResetFields,
        KernelOffsets,
        KernelFilter,
        Settings,
        FunctionArgs,
        CloseMark,
        CloseNote,
        RstKey,
        RstBudget,
        RstCount
    );

    impl RecordKind {
        pub fn from_u8(v: u8) -> Option<Self> {
            match v {
                1 => Some(Self::RstSent),
                2 => Some(Self::RstReceived),
                _ => None,
            }
        }
    }

    impl ResetHook {
        pub fn from_u8(v: u8) -> Option<Self> {
            [
                Self::SendResetTracepoint,
                Self::ReceiveResetTracepoint,
                Self::ActiveReset,
                Self::V4SendReset,
                Self::V6SendReset,
                Self::NfSendReset,
                Self::NfSendReset6,
            ]
            .into_iter()
            .find(|h| *h as u8 == v)
        }
    }

    impl AttachTier {
        pub fn from_u8(v: u8) -> Option<Self> {
            [Self::Tracepoint, Self::Kprobe, Self::Fentry]
                .into_iter()
                .find(|t| *t as u8 == v)
        }
    }

    impl ExecContext {
        pub fn from_u8(v: u8) -> Option<Self> {
            match v {
                1 => Some(Self::Process),
                2 => Some(Self::Softirq),
                3 => Some(Self::KernelThread),
                _ => None,
            }
        }
    }
}

/// The stderr lines harnesses wait for or parse: the integration tests,
/// xtask's VM runs and benches. Every line is `PREFIX` then a message;
/// these are how the messages start. Kept here, in the crate everyone
/// can depend on, so the printer and its readers cannot drift apart.
pub mod stderr {
    /// What every line tcprst writes to stderr starts with.
    pub const PREFIX: &str = "tcprst: ";
    /// The line logged once every program is attached: from here on,
    /// resets are seen (`tracing RSTs and half-closes (…); Ctrl-C to stop`).
    pub const TRACING: &str = "tracing ";
    /// The exit summary: `stopped: N records read, …`.
    pub const STOPPED: &str = "stopped: ";
    /// Starts the one line a failed run ends with, saying what failed.
    pub const ERROR: &str = "error: ";
    /// With `-v`, a line per reset function: `hook NAME: how it attached`.
    pub const HOOK: &str = "hook ";
}

/// What `tcprst trace --ready-fd N` writes to descriptor N, once, when
/// tracing has started (as the `TRACING` line is logged); then N is closed.
/// A harness waits for it instead of parsing stderr.
pub const READY_LINE: &str = "ready\n";

/// The names userspace finds the object's programs, maps and globals by:
/// tcprst-ebpf's program functions and statics. They are only looked up
/// when the object loads, as root, so each list is kept here once and a
/// unit test in tcprst checks every name in it against the built object.
pub mod names {
    /// `pub const NAME: &str`s, and `ALL`, every one of them.
    macro_rules! names {
        ($($name:ident = $value:literal;)+) => {
            $(pub const $name: &str = $value;)+
            /// Every name in this module.
            pub const ALL: &[&str] = &[$($name),+];
        };
    }

    pub mod programs {
        names! {
            SIRQ_IN = "tcprst_sirq_in";
            SIRQ_OUT = "tcprst_sirq_out";
            CLOSE_MARK = "tcprst_close_mark";
            RST_SENT = "tcprst_rst_sent";
            RST_SENT_BTF = "tcprst_rst_sent_btf";
            RST_RECV = "tcprst_rst_recv";
            RST_RECV_BTF = "tcprst_rst_recv_btf";
            KP_ACTIVE_RESET = "tcprst_kp_active_reset";
            FE_ACTIVE_RESET = "tcprst_fe_active_reset";
            KP_V4_SEND_RESET = "tcprst_kp_v4_send_reset";
            FE_V4_SEND_RESET = "tcprst_fe_v4_send_reset";
            KP_V6_SEND_RESET = "tcprst_kp_v6_send_reset";
            FE_V6_SEND_RESET = "tcprst_fe_v6_send_reset";
            KP_NF_SEND_RESET = "tcprst_kp_nf_send_reset";
            FE_NF_SEND_RESET = "tcprst_fe_nf_send_reset";
            KP_NF_SEND_RESET6 = "tcprst_kp_nf_send_reset6";
            FE_NF_SEND_RESET6 = "tcprst_fe_nf_send_reset6";
        }
    }

    /// The maps userspace sizes or takes; the rest are the programs' own.
    pub mod maps {
        names! {
            EVENTS = "EVENTS";
            STACKS = "STACKS";
            COUNTERS = "COUNTERS";
            TRACEPOINT_COVERED = "TRACEPOINT_COVERED";
            MARKS = "MARKS";
            CLOSE_NOTES = "CLOSE_NOTES";
            CLOSE_NOTE_HEADS = "CLOSE_NOTE_HEADS";
            BUDGETS_A = "BUDGETS_A";
            BUDGETS_B = "BUDGETS_B";
            COUNTS_A = "COUNTS_A";
            COUNTS_B = "COUNTS_B";
            TALLY_TURN = "TALLY_TURN";
            // aya-log-ebpf's, for --debug-bpf.
            AYA_LOGS = "AYA_LOGS";
        }
    }

    /// The globals the loader writes before loading.
    pub mod globals {
        names! {
            SEND_RESET_FIELDS = "SEND_RESET_FIELDS";
            RECEIVE_RESET_FIELDS = "RECEIVE_RESET_FIELDS";
            KERNEL_OFFSETS = "KERNEL_OFFSETS";
            FILTER = "FILTER";
            FUNCTION_ARGS = "FUNCTION_ARGS";
            SETTINGS = "SETTINGS";
            // aya-log-ebpf's: 0 keeps the programs' failure logs off.
            AYA_LOG_LEVEL = "AYA_LOG_LEVEL";
        }
    }
}
