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

// Namespaces travel as plain u32s, 0 meaning unknown (no namespace has
// inode 0): comparing an Option<u32> lets LLVM read the undefined payload of
// a None, which the verifier rejects as an uninitialised register.

#[inline(always)]
fn netns_of_net(net: u64) -> u32 {
    unsafe { read_at::<u32>(net, kernel_offsets().net_ns_inum) }.unwrap_or(0)
}

/// The network namespace inode of a socket (full, request or timewait: all
/// start with `sock_common`).
#[inline(always)]
pub fn sock_netns(sk: u64) -> u32 {
    unsafe { read_at::<u64>(sk, kernel_offsets().sk_net) }.map_or(0, netns_of_net)
}

/// The namespace a segment arrived in, for resets sent with no socket.
#[inline(always)]
pub fn skb_netns(skb: u64) -> u32 {
    let offsets = kernel_offsets();
    unsafe { read_at::<u64>(skb, offsets.skb_dev) }
        .and_then(|dev| unsafe { read_at::<u64>(dev, offsets.dev_nd_net) })
        .map_or(0, netns_of_net)
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

const PF_EXITING: u32 = 0x0000_0004;

#[inline(always)]
pub fn task_is_exiting(task: u64) -> bool {
    unsafe { read_at::<u32>(task, kernel_offsets().task_flags) }
        .is_some_and(|flags| flags & PF_EXITING != 0)
}

const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;

/// The `struct sock *` behind descriptor `fd` of `task`, if it is a socket:
/// task->files->fdt->fd[fd]->private_data->sk.
#[inline(always)]
pub fn fd_sock(task: u64, fd: i32) -> Option<u64> {
    let o = kernel_offsets();
    if fd < 0 {
        return None;
    }
    unsafe {
        let files = read_at::<u64>(task, o.task_files)?;
        let fdt = read_at::<u64>(files, o.files_fdt)?;
        if fd as u32 >= read_at::<u32>(fdt, o.fdt_max_fds)? {
            return None;
        }
        let fds = read_at::<u64>(fdt, o.fdt_fd)?;
        let file = read_at::<u64>(fds, fd as u32 * 8)?;
        let inode = read_at::<u64>(file, o.file_inode)?;
        if read_at::<u16>(inode, o.inode_mode)? & S_IFMT != S_IFSOCK {
            return None;
        }
        let socket = read_at::<u64>(file, o.file_private_data)?;
        read_at::<u64>(socket, o.socket_sk).filter(|sk| *sk != 0)
    }
}

/// The id of the cgroup (v2) a full socket was created in; 0 when unknown.
/// Request and timewait mini-sockets have no cgroup data.
#[inline(always)]
pub fn sock_cgroup_id(sk: u64) -> u64 {
    let o = kernel_offsets();
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
