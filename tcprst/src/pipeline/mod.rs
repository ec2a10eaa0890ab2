//! From records to explained events: decoding, filters, diagnoses, who
//! sent a received reset, and the half-closed connections the scans find.
//! Imports `model`, `bpf` and `host`.

pub mod clock;
pub mod decode;
pub mod diagnosis;
pub(crate) mod filter;
pub mod origin;
pub(crate) mod tracker;
