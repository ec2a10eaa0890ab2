//! Reads of kernel memory at offsets the loader measured from BTF.

use aya_ebpf::helpers::bpf_probe_read_kernel;
use tcprst_common::{ABSENT, AF_INET, AF_INET6, RstRecord, Tuple, rst_flags};

use crate::globals::kernel_offsets;

#[inline(always)]
unsafe fn read_at<T>(base: u64, offset: u32) -> Option<T> {
    if base == 0 || offset == ABSENT {
        return None;
    }
    // SAFETY: a probe read, which fails cleanly on any address.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T).ok() }
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
fn member<T>(base: u64, offset: u32, what: &'static str) -> Result<T, Unread> {
    // SAFETY: a probe read, which fails cleanly on any address.
    unsafe { read_at(base, offset) }.ok_or(Unread { what, offset })
}

// Namespaces travel as plain u32s, 0 meaning unknown (no namespace has
// inode 0): comparing an Option<u32> lets LLVM read the undefined payload of
// a None, which the verifier rejects as an uninitialised register.

#[inline(always)]
pub fn netns_of_net(net: u64) -> u32 {
    // SAFETY: a checked kernel read.
    unsafe { read_at::<u32>(net, kernel_offsets().net_ns_inum) }.unwrap_or(0)
}

/// The network namespace inode of a socket (full, request or timewait: all
/// start with `sock_common`).
#[inline(always)]
pub fn sock_netns(sk: u64) -> u32 {
    // SAFETY: a checked kernel read.
    unsafe { read_at::<u64>(sk, kernel_offsets().sk_net) }.map_or(0, netns_of_net)
}

/// The namespace a segment arrived in, for resets sent with no socket.
#[inline(always)]
pub fn skb_netns(skb: u64) -> u32 {
    let offsets = kernel_offsets();
    // SAFETY: checked kernel reads.
    unsafe { read_at::<u64>(skb, offsets.skb_dev) }
        // SAFETY: as above.
        .and_then(|dev| unsafe { read_at::<u64>(dev, offsets.dev_nd_net) })
        .map_or(0, netns_of_net)
}

#[inline(always)]
pub fn sock_state(sk: u64) -> Option<u8> {
    // SAFETY: a checked kernel read.
    unsafe { read_at::<u8>(sk, kernel_offsets().sk_state) }
}

const PF_KTHREAD: u32 = 0x0020_0000;

#[inline(always)]
pub fn task_is_kthread(task: u64) -> bool {
    // SAFETY: a checked kernel read.
    unsafe { read_at::<u32>(task, kernel_offsets().task_flags) }
        .is_some_and(|flags| flags & PF_KTHREAD != 0)
}

const PF_EXITING: u32 = 0x0000_0004;

#[inline(always)]
pub fn task_is_exiting(task: u64) -> bool {
    // SAFETY: a checked kernel read.
    unsafe { read_at::<u32>(task, kernel_offsets().task_flags) }
        .is_some_and(|flags| flags & PF_EXITING != 0)
}

/// `sock.sk_protocol`; None where the loader found no plain member.
#[inline(always)]
pub fn sock_protocol(sk: u64) -> Option<u16> {
    // SAFETY: a checked kernel read.
    unsafe { read_at::<u16>(sk, kernel_offsets().sk_protocol) }
}

/// What a full socket records about its own close: `sk_shutdown`, and its
/// inode unless it is orphaned (no `struct socket` left). Request and
/// timewait mini-sockets have neither.
#[inline(always)]
pub fn socket_facts(sk: u64, rec: &mut RstRecord) {
    let o = kernel_offsets();
    // SAFETY: checked kernel reads.
    unsafe {
        let Some(shutdown) = read_at::<u8>(sk, o.sk_shutdown) else {
            return;
        };
        rec.shutdown = shutdown;
        rec.flags |= rst_flags::HAS_SOCKET_FACTS;
        match read_at::<u64>(sk, o.sk_socket) {
            Some(0) => rec.flags |= rst_flags::ORPHANED,
            Some(socket) => rec.inode = read_at::<u64>(socket, o.socket_ino).unwrap_or(0),
            None => {}
        }
    }
}

/// The id of the cgroup (v2) a full socket was created in; 0 when unknown.
/// Request and timewait mini-sockets have no cgroup data.
#[inline(always)]
pub fn sock_cgroup_id(sk: u64) -> u64 {
    let o = kernel_offsets();
    // SAFETY: checked kernel reads.
    unsafe {
        read_at::<u64>(sk, o.sk_cgroup)
            .and_then(|cgroup| read_at::<u64>(cgroup, o.cgroup_kn))
            .and_then(|kn| read_at::<u64>(kn, o.kn_id))
            .unwrap_or(0)
    }
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
pub fn sock_tuple(sk: u64, out: &mut Tuple) -> Result<(), Unread> {
    let o = kernel_offsets();
    out.family = member(sk, o.skc_family, "sock_common.skc_family")?;
    out.local_port = u16::from_be(member(sk, o.inet_sport, "inet_sock.inet_sport")?);
    out.remote_port = u16::from_be(member(sk, o.skc_dport, "sock_common.skc_dport")?);
    if out.family == AF_INET {
        copy_v4(
            &mut out.local_addr,
            member(sk, o.skc_rcv_saddr, "sock_common.skc_rcv_saddr")?,
        );
        copy_v4(
            &mut out.remote_addr,
            member(sk, o.skc_daddr, "sock_common.skc_daddr")?,
        );
    } else {
        out.local_addr = member(sk, o.skc_v6_rcv_saddr, "sock_common.skc_v6_rcv_saddr")?;
        out.remote_addr = member(sk, o.skc_v6_daddr, "sock_common.skc_v6_daddr")?;
    }
    Ok(())
}

/// Where a segment's IP header starts, and its version (4 or 6).
#[inline(always)]
fn network_header(skb: u64) -> Result<(u64, u8), Unread> {
    let o = kernel_offsets();
    let head: u64 = member(skb, o.skb_head, "sk_buff.head")?;
    let offset: u16 = member(skb, o.skb_network_header, "sk_buff.network_header")?;
    let ip = head + u64::from(offset);
    let first: u8 = member(ip, 0, "the IP header")?;
    Ok((ip, first >> 4))
}

/// The IP version of a segment: tells which of tcp_v4_send_reset and
/// tcp_v6_send_reset answers it, whatever the family of the socket.
#[inline(always)]
pub fn segment_ip_version(skb: u64) -> u8 {
    network_header(skb).map_or(0, |(_, version)| version)
}

const TCP_FLAGS_OFFSET: u32 = 13;
pub const TCP_FLAG_RST: u8 = 0x04;
const IPV6_HEADER_LEN: u64 = 40;
const NO_HEADER: u16 = 0xffff;

/// The tuple of the reset that answers a segment (our end is the segment's
/// destination), and the segment's TCP flags.
#[inline(always)]
pub fn reply_tuple(skb: u64, out: &mut Tuple) -> Result<u8, Unread> {
    let (ip, version) = network_header(skb)?;
    let tcp = if version == 4 {
        out.family = AF_INET;
        copy_v4(&mut out.remote_addr, member(ip, 12, "iphdr.saddr")?);
        copy_v4(&mut out.local_addr, member(ip, 16, "iphdr.daddr")?);
        // IHL, not transport_header: netfilter hooks may run before the
        // stack sets it.
        let first: u8 = member(ip, 0, "iphdr.ihl")?;
        ip + u64::from(first & 0x0f) * 4
    } else if version == 6 {
        out.family = AF_INET6;
        out.remote_addr = member(ip, 8, "ipv6hdr.saddr")?;
        out.local_addr = member(ip, 24, "ipv6hdr.daddr")?;
        // Extension headers are only skipped through transport_header.
        let o = kernel_offsets();
        let head: u64 = member(skb, o.skb_head, "sk_buff.head")?;
        let th: u16 = member(skb, o.skb_transport_header, "sk_buff.transport_header")?;
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
    let ports: [u8; 4] = member(tcp, 0, "tcphdr.source")?;
    out.remote_port = u16::from_be_bytes([ports[0], ports[1]]);
    out.local_port = u16::from_be_bytes([ports[2], ports[3]]);
    member(tcp, TCP_FLAGS_OFFSET, "tcphdr flags")
}
