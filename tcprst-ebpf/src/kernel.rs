//! Reads of kernel memory at offsets the loader measured from BTF.

use aya_ebpf::helpers::bpf_probe_read_kernel;
use tcprst_common::{ABSENT, AF_INET, AF_INET6, RstRecord, Tuple, rst_flags};

use crate::globals::global;

/// How a program reads kernel memory: `ProbeRead` anywhere, `TypedLoad`
/// where the verifier knows what the base points to.
pub trait KernelMemory: Copy {
    /// The `T` at `offset` into `base`; None when `base` is NULL or the
    /// loader found no such member (`ABSENT`).
    fn read<T: Copy>(self, base: u64, offset: u32) -> Option<T>;
}

/// `bpf_probe_read_kernel`: any program type, any address, and a helper call
/// each (about 100 ns on this project's machine; most of a reset program's
/// cost when every read was one).
#[derive(Clone, Copy)]
pub struct ProbeRead;

impl KernelMemory for ProbeRead {
    #[inline(always)]
    fn read<T: Copy>(self, base: u64, offset: u32) -> Option<T> {
        if base == 0 || offset == ABSENT {
            return None;
        }
        // SAFETY: a probe read, which fails cleanly on any address.
        unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const T).ok() }
    }
}

/// A plain load, for tp_btf programs. When `base` is a pointer the verifier
/// knows the BTF type of (a tracepoint argument, or a pointer member loaded
/// through one) and `offset` one `global!` load, the verifier checks the
/// access against that type when the program loads and makes it fault-safe
/// (a fault reads zero), so it costs one instruction. Only members inside
/// the pointed-to struct qualify; the verifier refuses the program otherwise,
/// and the loader then falls back to the classic tracepoint programs.
#[derive(Clone, Copy)]
pub struct TypedLoad;

impl KernelMemory for TypedLoad {
    #[inline(always)]
    fn read<T: Copy>(self, base: u64, offset: u32) -> Option<T> {
        if base == 0 || offset == ABSENT {
            return None;
        }
        // SAFETY: the verifier checks this load against the BTF type of
        // `base` and turns it into a load whose fault yields zero. Members
        // are aligned to their type, and an unaligned read would become
        // byte loads, which the verifier refuses on pointer members.
        Some(unsafe { core::ptr::read((base + u64::from(offset)) as *const T) })
    }
}

/// A read that failed: which member or field, at which offset, so
/// `--debug-bpf` can say what went wrong on a kernel nobody here has.
#[derive(Clone, Copy)]
pub struct Unread {
    pub what: &'static str,
    pub offset: u32,
}

/// `what` of `base`, at `offset`.
#[inline(always)]
fn member<T: Copy>(
    mem: impl KernelMemory,
    base: u64,
    offset: u32,
    what: &'static str,
) -> Result<T, Unread> {
    mem.read(base, offset).ok_or(Unread { what, offset })
}

#[inline(always)]
pub fn sock_state(mem: impl KernelMemory, sk: u64) -> Option<u8> {
    mem.read::<u8>(sk, global!(KERNEL_OFFSETS.sk_state))
}

// A task from bpf_get_current_task is an untyped address (probe reads); one
// from bpf_get_current_task_btf, in tp_btf programs, is typed.

const PF_KTHREAD: u32 = 0x0020_0000;

#[inline(always)]
pub fn task_is_kthread(mem: impl KernelMemory, task: u64) -> bool {
    mem.read::<u32>(task, global!(KERNEL_OFFSETS.task_flags))
        .is_some_and(|flags| flags & PF_KTHREAD != 0)
}

const PF_EXITING: u32 = 0x0000_0004;

#[inline(always)]
pub fn task_is_exiting(mem: impl KernelMemory, task: u64) -> bool {
    mem.read::<u32>(task, global!(KERNEL_OFFSETS.task_flags))
        .is_some_and(|flags| flags & PF_EXITING != 0)
}

/// `task_struct.comm`, as two u64 loads; false where the loader found no
/// 8-aligned member. A plain copy of what `bpf_get_current_comm` copies
/// with a helper call and a padded string copy: the kernel keeps the name
/// NUL-padded (`__set_task_comm`), and a rename racing this read is as
/// torn as it would be for the helper.
#[inline(always)]
pub fn task_comm(mem: impl KernelMemory, task: u64, comm: &mut [u8; 16]) -> bool {
    let offset = global!(KERNEL_OFFSETS.task_comm);
    if offset == ABSENT {
        return false;
    }
    let (Some(low), Some(high)) = (
        mem.read::<u64>(task, offset),
        mem.read::<u64>(task, offset + 8),
    ) else {
        return false;
    };
    comm[..8].copy_from_slice(&low.to_ne_bytes());
    comm[8..].copy_from_slice(&high.to_ne_bytes());
    true
}

/// `sock_common.skc_cookie`: the socket's cookie if anyone (a close note,
/// a reset program, sock_diag) asked for it, else 0; None where the loader
/// found no member.
#[inline(always)]
pub fn sock_cookie(mem: impl KernelMemory, sk: u64) -> Option<u64> {
    mem.read::<u64>(sk, global!(KERNEL_OFFSETS.sk_cookie))
}

/// `sock.sk_protocol`; None where the loader found no plain member.
#[inline(always)]
pub fn sock_protocol(mem: impl KernelMemory, sk: u64) -> Option<u16> {
    mem.read::<u16>(sk, global!(KERNEL_OFFSETS.sk_protocol))
}

/// `sock.sk_socket`: the `struct socket` a process holds, 0 once the
/// socket is orphaned; None where the loader found no member.
#[inline(always)]
pub fn sock_socket(mem: impl KernelMemory, sk: u64) -> Option<u64> {
    mem.read::<u64>(sk, global!(KERNEL_OFFSETS.sk_socket))
}

/// What a full socket records about its own close: `sk_shutdown`, and its
/// inode unless it is orphaned (no `struct socket` left). Request and
/// timewait mini-sockets have neither.
#[inline(always)]
pub fn socket_facts(mem: impl KernelMemory, sk: u64, rec: &mut RstRecord) {
    let Some(shutdown) = mem.read::<u8>(sk, global!(KERNEL_OFFSETS.sk_shutdown)) else {
        return;
    };
    rec.shutdown = shutdown;
    rec.flags |= rst_flags::HAS_SOCKET_FACTS;
    match sock_socket(mem, sk) {
        Some(0) => rec.flags |= rst_flags::ORPHANED,
        // The inode lies past `struct socket`, in the `socket_alloc` around
        // it, where no typed load may go.
        Some(socket) => {
            rec.inode = ProbeRead
                .read::<u64>(socket, global!(KERNEL_OFFSETS.socket_ino))
                .unwrap_or(0)
        }
        None => {}
    }
}

/// The id of the cgroup (v2) a full socket was created in; 0 when unknown.
/// Request and timewait mini-sockets have no cgroup data.
#[inline(always)]
pub fn sock_cgroup_id(mem: impl KernelMemory, sk: u64) -> u64 {
    mem.read::<u64>(sk, global!(KERNEL_OFFSETS.sk_cgroup))
        .and_then(|cgroup| mem.read::<u64>(cgroup, global!(KERNEL_OFFSETS.cgroup_kn)))
        .and_then(|kn| mem.read::<u64>(kn, global!(KERNEL_OFFSETS.kn_id)))
        .unwrap_or(0)
}

const TCP_TIME_WAIT: u8 = 6;
const TCP_NEW_SYN_RECV: u8 = 12;

/// Only full sockets carry a cgroup; `state` tells them apart.
#[inline(always)]
pub fn is_full_sock(state: u8) -> bool {
    state != TCP_TIME_WAIT && state != TCP_NEW_SYN_RECV
}

#[inline(always)]
pub fn copy_v4(dst: &mut [u8; 16], src: [u8; 4]) {
    dst[0] = src[0];
    dst[1] = src[1];
    dst[2] = src[2];
    dst[3] = src[3];
}

/// A socket's own tuple, from its `sock_common` (full, request or timewait).
#[inline(always)]
pub fn sock_tuple(mem: impl KernelMemory, sk: u64, out: &mut Tuple) -> Result<(), Unread> {
    out.family = member(
        mem,
        sk,
        global!(KERNEL_OFFSETS.skc_family),
        "sock_common.skc_family",
    )?;
    // `inet_sock` extends `struct sock`, past what a typed load may reach.
    out.local_port = u16::from_be(member(
        ProbeRead,
        sk,
        global!(KERNEL_OFFSETS.inet_sport),
        "inet_sock.inet_sport",
    )?);
    out.remote_port = u16::from_be(member(
        mem,
        sk,
        global!(KERNEL_OFFSETS.skc_dport),
        "sock_common.skc_dport",
    )?);
    if out.family == AF_INET {
        copy_v4(
            &mut out.local_addr,
            member(
                mem,
                sk,
                global!(KERNEL_OFFSETS.skc_rcv_saddr),
                "sock_common.skc_rcv_saddr",
            )?,
        );
        copy_v4(
            &mut out.remote_addr,
            member(
                mem,
                sk,
                global!(KERNEL_OFFSETS.skc_daddr),
                "sock_common.skc_daddr",
            )?,
        );
    } else {
        out.local_addr = member(
            mem,
            sk,
            global!(KERNEL_OFFSETS.skc_v6_rcv_saddr),
            "sock_common.skc_v6_rcv_saddr",
        )?;
        out.remote_addr = member(
            mem,
            sk,
            global!(KERNEL_OFFSETS.skc_v6_daddr),
            "sock_common.skc_v6_daddr",
        )?;
    }
    Ok(())
}

/// The start of a segment's IP header. The header's bytes are behind
/// `head`, which the verifier does not type: they take probe reads.
#[inline(always)]
fn network_header(mem: impl KernelMemory, skb: u64) -> Result<u64, Unread> {
    let head: u64 = member(mem, skb, global!(KERNEL_OFFSETS.skb_head), "sk_buff.head")?;
    let offset: u16 = member(
        mem,
        skb,
        global!(KERNEL_OFFSETS.skb_network_header),
        "sk_buff.network_header",
    )?;
    Ok(head + u64::from(offset))
}

/// The IP version of a segment: tells which of tcp_v4_send_reset and
/// tcp_v6_send_reset answers it, whatever the family of the socket.
#[inline(always)]
pub fn segment_ip_version(mem: impl KernelMemory, skb: u64) -> u8 {
    network_header(mem, skb)
        .and_then(|ip| member::<u8>(ProbeRead, ip, 0, "the IP header"))
        .map_or(0, |first| first >> 4)
}

pub const TCP_FLAG_RST: u8 = 0x04;
const IPV6_HEADER_LEN: u64 = 40;
const NO_HEADER: u16 = 0xffff;

/// The first 20 bytes of an IP header: all of IPv4's but its options, and
/// IPv6's version. Read whole, as `TcpStart` is, because each probe read
/// costs ~50 ns and a reset counted in a storm took four.
#[repr(C)]
#[derive(Clone, Copy)]
struct IpStart {
    /// Version and IHL in the first byte.
    version_ihl: u32,
    _id_fragment: u32,
    _ttl_protocol_check: u32,
    /// IPv4's source and destination addresses.
    saddr: [u8; 4],
    daddr: [u8; 4],
}

const _: () = assert!(core::mem::offset_of!(IpStart, saddr) == 12);
const _: () = assert!(core::mem::size_of::<IpStart>() == 20);

/// The first 16 bytes of a TCP header.
#[repr(C)]
#[derive(Clone, Copy)]
struct TcpStart {
    /// Source and destination ports, in network order.
    ports: u32,
    _seq: u32,
    _ack_seq: u32,
    /// Data offset, then the flags.
    offset_flags: u32,
}

const _: () = assert!(core::mem::offset_of!(TcpStart, offset_flags) == 12);

/// The tuple of the reset that answers a segment (our end is the segment's
/// destination), and the segment's TCP flags.
#[inline(always)]
pub fn reply_tuple(mem: impl KernelMemory, skb: u64, out: &mut Tuple) -> Result<u8, Unread> {
    let ip = network_header(mem, skb)?;
    let start: IpStart = member(ProbeRead, ip, 0, "the IP header")?;
    let first = start.version_ihl as u8;
    let version = first >> 4;
    let tcp = if version == 4 {
        out.family = AF_INET;
        copy_v4(&mut out.remote_addr, start.saddr);
        copy_v4(&mut out.local_addr, start.daddr);
        // IHL, not transport_header: netfilter hooks may run before the
        // stack sets it.
        ip + u64::from(first & 0x0f) * 4
    } else if version == 6 {
        out.family = AF_INET6;
        out.remote_addr = member(ProbeRead, ip, 8, "ipv6hdr.saddr")?;
        out.local_addr = member(ProbeRead, ip, 24, "ipv6hdr.daddr")?;
        // Extension headers are only skipped through transport_header.
        let head: u64 = member(mem, skb, global!(KERNEL_OFFSETS.skb_head), "sk_buff.head")?;
        let th: u16 = member(
            mem,
            skb,
            global!(KERNEL_OFFSETS.skb_transport_header),
            "sk_buff.transport_header",
        )?;
        if th != NO_HEADER && head + u64::from(th) > ip {
            head + u64::from(th)
        } else {
            ip + IPV6_HEADER_LEN
        }
    } else {
        return Err(Unread {
            what: "the IP version (neither 4 nor 6)",
            offset: 0,
        });
    };
    let start: TcpStart = member(ProbeRead, tcp, 0, "the TCP header")?;
    let [s0, s1, d0, d1] = start.ports.to_ne_bytes();
    out.remote_port = u16::from_be_bytes([s0, s1]);
    out.local_port = u16::from_be_bytes([d0, d1]);
    Ok(start.offset_flags.to_ne_bytes()[1])
}
