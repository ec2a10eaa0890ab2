//! One module a subcommand: `trace` (the event loop), `snapshot`, `doctor`,
//! `correlate`. Imports `model`, `bpf`, `host`, `pipeline` and `output`.

pub mod correlate;
pub mod doctor;
pub mod snapshot;
pub mod trace;
