//! Reads of kernel memory at offsets the loader measured from BTF.

use aya_ebpf::helpers::bpf_probe_read_kernel;
use tcprst_common::ABSENT;

use crate::globals::kernel_offsets;

#[inline(always)]
unsafe fn read_at<T>(base: u64, offset: u32) -> Option<T> {
    if base == 0 || offset == ABSENT {
        return None;
    }
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T).ok() }
}

#[inline(always)]
fn netns_of_net(net: u64) -> Option<u32> {
    unsafe { read_at::<u32>(net, kernel_offsets().net_ns_inum) }
}

/// The network namespace inode of a socket (full, request or timewait: all
/// start with `sock_common`).
#[inline(always)]
pub fn sock_netns(sk: u64) -> Option<u32> {
    let net = unsafe { read_at::<u64>(sk, kernel_offsets().sk_net)? };
    netns_of_net(net)
}

/// The namespace a segment arrived in, for resets sent with no socket.
#[inline(always)]
pub fn skb_netns(skb: u64) -> Option<u32> {
    let offsets = kernel_offsets();
    let dev = unsafe { read_at::<u64>(skb, offsets.skb_dev)? };
    let net = unsafe { read_at::<u64>(dev, offsets.dev_nd_net)? };
    netns_of_net(net)
}

#[inline(always)]
pub fn sock_state(sk: u64) -> Option<u8> {
    unsafe { read_at::<u8>(sk, kernel_offsets().sk_state) }
}

const PF_KTHREAD: u32 = 0x0020_0000;

#[inline(always)]
pub fn task_is_kthread(task: u64) -> bool {
    unsafe { read_at::<u32>(task, kernel_offsets().task_flags) }
        .is_some_and(|flags| flags & PF_KTHREAD != 0)
}
