//! What tcprst's events are: resets, connections and their keys, and how
//! they read. Imports nothing of tcprst.

pub mod conn;
pub mod event;
pub mod flow;
pub mod text;
