// What the BTF unit tests in tcprst/src/bpf/btf.rs read, as CO-RE relocations:
// `bpftool gen min_core_btf` keeps only the types and members an object
// relocates, at the kernel's own offsets. Made on Linux 6.18.44 (x86_64) with
//   bpftool btf dump file /sys/kernel/btf/vmlinux format c > vmlinux.h
//   clang -target bpf -g -O2 -c btf-6.18-min.c -o btf-6.18-min.o
//   bpftool gen min_core_btf /sys/kernel/btf/vmlinux btf-6.18-min btf-6.18-min.o
#include "vmlinux.h"

#define OFFSET(expr) __builtin_preserve_field_info(expr, 0 /* BPF_FIELD_BYTE_OFFSET */)

// One relocation per member path KernelBtf::kernel_offsets reads.
__attribute__((section("tracepoint/x"), used)) int offsets(void *ctx)
{
	struct sock *sk = ctx;
	struct sk_buff *skb = ctx;
	struct net *net = ctx;
	struct net_device *dev = ctx;
	struct task_struct *task = ctx;
	struct cgroup *cgroup = ctx;
	struct kernfs_node *kn = ctx;
	struct inet_sock *inet = ctx;
	struct socket_alloc *alloc = ctx;
	struct pt_regs *regs = ctx;
	unsigned long sum = 0;

	sum += OFFSET(sk->__sk_common.skc_state);
	sum += OFFSET(sk->__sk_common.skc_net.net);
	sum += OFFSET(sk->__sk_common.skc_family);
	sum += OFFSET(sk->__sk_common.skc_daddr);
	sum += OFFSET(sk->__sk_common.skc_rcv_saddr);
	sum += OFFSET(sk->__sk_common.skc_dport);
	sum += OFFSET(sk->__sk_common.skc_v6_daddr);
	sum += OFFSET(sk->__sk_common.skc_v6_rcv_saddr);
	sum += OFFSET(sk->sk_cgrp_data.cgroup);
	sum += OFFSET(sk->sk_shutdown);
	sum += OFFSET(sk->sk_socket);
	sum += OFFSET(sk->sk_protocol);
	sum += OFFSET(sk->__sk_common.skc_cookie.counter);
	sum += OFFSET(net->ns.inum);
	sum += OFFSET(net->net_cookie);
	sum += OFFSET(skb->dev);
	sum += OFFSET(skb->head);
	sum += OFFSET(skb->network_header);
	sum += OFFSET(skb->transport_header);
	sum += OFFSET(dev->nd_net.net);
	sum += OFFSET(task->flags);
	sum += OFFSET(task->stack);
	sum += OFFSET(task->comm);
	sum += OFFSET(regs->orig_ax);
	// The size of the registers saved at the top of a task's stack.
	sum += __builtin_preserve_type_info(*regs, 1 /* BPF_TYPE_SIZE */);
	sum += OFFSET(cgroup->kn);
	sum += OFFSET(kn->id);
	sum += OFFSET(inet->inet_sport);
	sum += OFFSET(alloc->vfs_inode.i_ino);
	// The enum reset reasons are named from.
	sum += __builtin_preserve_enum_value(*(enum skb_drop_reason *)SKB_DROP_REASON_NOT_SPECIFIED,
					     1 /* BPF_ENUMVAL_VALUE */);
	return sum;
}

char LICENSE[] __attribute__((section("license"), used)) = "GPL";
