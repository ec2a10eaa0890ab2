//! tcprst: explains TCP resets and half-close trouble with eBPF.
//!
//! Data flows one way: kernel programs (tcprst-ebpf) → ring buffer →
//! `decode` → `diagnosis` (and the `tracker` of half-closed sockets, fed by sock_diag scans) → `enrich` → `sink`s. `trace` runs
//! that loop; `probes` with `tracefs`, `btf` and `layout` load the programs
//! with the running kernel's layouts. The binary is only the command line.

pub mod attach;
pub mod btf;
pub mod cgroup;
pub mod cli;
pub mod clock;
pub mod conntrack;
pub mod correlate;
pub mod decode;
pub mod diagnosis;
pub mod doctor;
pub mod enrich;
pub mod errors;
pub mod event;
pub mod filter;
pub mod k8s;
pub mod layout;
mod memo;
pub mod metrics;
pub mod mountinfo;
pub mod netns;
pub mod origin;
pub mod overflows;
pub mod owner;
pub mod privileges;
pub mod probes;
pub mod runtimes;
pub mod sink;
pub mod snapshot;
pub mod sockdiag;
pub mod stacks;
pub mod tallies;
pub mod terminal;
#[cfg(test)]
mod testing;
pub mod trace;
pub mod tracefs;
pub mod tracker;
