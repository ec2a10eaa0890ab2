//! The command line: `args` is what clap parses, `options` turns it into
//! each command's options, checked before the kernel is touched. Imports
//! every layer below it.

pub mod args;
pub mod options;
