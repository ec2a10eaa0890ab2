//! tcprst: explains TCP resets and half-close trouble with eBPF.
//!
//! Data flows one way, one folder per layer, each importing only the ones
//! listed before it: `model` (what an event is) ← `bpf` (the kernel
//! programs, loaded with the running kernel's layouts, and their maps) ←
//! `host` (whose a socket is: cgroups, pods, runtimes, processes,
//! namespaces, conntrack) ← `pipeline` (decoding records and explaining
//! them: filters, diagnoses, origins, half-closed sockets) ← `output`
//! (tables, NDJSON, metrics) ← `cmd` (each subcommand's loop) ← `cli` (the
//! command line, turned into their options). The binary only dispatches.
//! `errors`, `memo` and `mountinfo` are small utilities any layer may use.

pub mod bpf;
pub mod cli;
pub mod cmd;
mod errors;
pub mod host;
mod memo;
pub mod model;
pub mod mountinfo;
pub mod output;
pub mod pipeline;
#[cfg(test)]
mod testing;
