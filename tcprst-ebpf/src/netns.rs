//! The network namespace of a socket or segment, as its inode number.
//!
//! `net.ns.inum` shares its cache line with the namespace's reference
//! count, which every socket created or freed in that namespace changes.
//! In a connect storm on two CPUs that line is nearly always another CPU's:
//! a profile put over half of the sent-reset program's own samples on that
//! one load (docs/performance.md). So each CPU keeps the inodes of the
//! namespaces it saw, found by `net.net_cookie`: written once, far from
//! the reference count, and never reused, so a cookie that matches names
//! the same namespace.

use aya_ebpf::{macros::map, maps::PerCpuArray};

use crate::{globals::global, kernel::KernelMemory};

/// Slots per CPU, found by the cookie's low bits: a node's resets come
/// from a few namespaces at a time.
const SLOTS: u32 = 64;

/// Each slot is the low 32 bits of a namespace's cookie, then its inode,
/// in one word: a program that interrupts another on this CPU (a softirq's)
/// reads a whole slot or none. A slot's cookie bits match another
/// namespace only once 2^32 more namespaces have been created since it
/// was written, and the slot was not reused meanwhile.
#[map]
static NETNS_INODES: PerCpuArray<u64> = PerCpuArray::with_max_entries(SLOTS, 0);

// Namespaces travel as plain u32s, 0 meaning unknown (no namespace has
// inode 0): comparing an Option<u32> lets LLVM read the undefined payload of
// a None, which the verifier rejects as an uninitialised register.

/// The inode of the namespace at `net`.
#[inline(always)]
pub fn netns_of_net(mem: impl KernelMemory, net: u64) -> u32 {
    let read_inode = || {
        mem.read::<u32>(net, global!(KERNEL_OFFSETS.net_ns_inum))
            .unwrap_or(0)
    };
    // A kernel without cookies reads the inode each time. So does a cookie
    // whose low 32 bits are 0, which an empty slot would match; 0 itself is
    // a cookie not yet given, before 5.12.
    let cookie = match mem.read::<u64>(net, global!(KERNEL_OFFSETS.net_cookie)) {
        Some(cookie) if cookie as u32 != 0 => cookie as u32,
        _ => return read_inode(),
    };
    let Some(slot) = NETNS_INODES.get_ptr_mut(cookie & (SLOTS - 1)) else {
        return read_inode();
    };
    // SAFETY: this CPU's slot of a live map value, read and written whole.
    let known = unsafe { core::ptr::read_volatile(slot) };
    if (known >> 32) as u32 == cookie {
        return known as u32;
    }
    let inode = read_inode();
    if inode != 0 {
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(slot, (u64::from(cookie) << 32) | u64::from(inode)) };
    }
    inode
}

/// The network namespace inode of a socket (full, request or timewait: all
/// start with `sock_common`).
#[inline(always)]
pub fn sock_netns(mem: impl KernelMemory, sk: u64) -> u32 {
    mem.read::<u64>(sk, global!(KERNEL_OFFSETS.sk_net))
        .map_or(0, |net| netns_of_net(mem, net))
}

/// The namespace a segment arrived in, for resets sent with no socket.
#[inline(always)]
pub fn skb_netns(mem: impl KernelMemory, skb: u64) -> u32 {
    mem.read::<u64>(skb, global!(KERNEL_OFFSETS.skb_dev))
        .and_then(|dev| mem.read::<u64>(dev, global!(KERNEL_OFFSETS.dev_nd_net)))
        .map_or(0, |net| netns_of_net(mem, net))
}
