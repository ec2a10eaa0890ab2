//! Whose a socket is, from what only userspace can read: cgroups, pods,
//! container runtimes, processes by inode, network namespaces, sock_diag,
//! conntrack, listen-queue overflows. Imports `model` only.

pub mod cgroup;
pub mod conntrack;
pub mod enrich;
pub mod k8s;
pub mod netns;
pub mod overflows;
pub mod owner;
pub mod runtimes;
pub mod sockdiag;
