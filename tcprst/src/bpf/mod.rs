//! The kernel side, from userspace: the running kernel's layouts (tracefs
//! formats, BTF), the attach plan of each hook, loading and attaching the
//! programs, and reading their maps (counters, tallies, stacks, close
//! notes). Imports
//! tcprst-common, nothing of tcprst's layers.

pub mod attach;
pub mod btf;
pub(crate) mod close_notes;
pub(crate) mod early;
pub mod layout;
pub(crate) mod privileges;
pub(crate) mod probes;
pub(crate) mod stack_layout;
pub mod stacks;
pub(crate) mod tallies;
pub mod tracefs;
