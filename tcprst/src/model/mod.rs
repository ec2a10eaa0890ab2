//! What tcprst's events are: resets, connections and their keys, and how
//! they read. Imports nothing of tcprst.

pub(crate) mod conn;
pub mod event;
pub(crate) mod flow;
pub(crate) mod text;
