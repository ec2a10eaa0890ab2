//! Where events go: a streaming table for people, NDJSON for machines.

mod json;
mod table;

use std::io::{self, Write};

pub use json::JsonSink;
pub use table::TableSink;

use crate::event::RstEvent;

/// Ring-buffer losses over one reporting interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LossReport {
    pub lost: u64,
    pub lost_total: u64,
}

pub trait Sink {
    fn rst(&mut self, ev: &RstEvent) -> io::Result<()>;
    fn lost(&mut self, report: &LossReport) -> io::Result<()>;
    fn flush(&mut self) -> io::Result<()>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

pub fn open(format: OutputFormat, out: Box<dyn Write>) -> Box<dyn Sink> {
    match format {
        OutputFormat::Table => Box::new(TableSink::new(out)),
        OutputFormat::Json => Box::new(JsonSink::new(out)),
    }
}

fn rfc3339_micros(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}
