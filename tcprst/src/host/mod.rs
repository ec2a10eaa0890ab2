//! Whose a socket is, from what only userspace can read: cgroups, pods,
//! container runtimes, processes by inode, network namespaces, sock_diag,
//! conntrack, listen-queue overflows, socket counters. Imports `model` only.

pub mod cgroup;
pub(crate) mod conntrack;
pub mod enrich;
pub(crate) mod k8s;
pub(crate) mod netns;
pub(crate) mod overflows;
pub(crate) mod owner;
pub(crate) mod runtimes;
pub(crate) mod sockdiag;
pub(crate) mod sockstat;
