//! Where events go: a streaming table for people, NDJSON for machines,
//! Prometheus metrics; `writer` puts stdout on a thread of its own. Imports
//! `model`, `bpf`, `host` and `pipeline`.

pub mod doctor;
pub(crate) mod metrics;
pub(crate) mod snapshot;
pub(crate) mod terminal;

mod json;
mod stamp;
mod table;
pub(crate) mod writer;

use std::{
    io::{self, Write},
    sync::Arc,
    time::SystemTime,
};

pub use json::JsonSink;
pub(crate) use json::{Endpoints, ProcessJson};
pub use table::TableSink;

use crate::{
    host::conntrack::Found,
    host::enrich::Attribution,
    model::event::RstEvent,
    pipeline::diagnosis::{self, KernelView, RstDiagnosis, StuckDiagnosis},
    pipeline::origin::Origin,
    pipeline::tracker::{Connection, Resolved, RstContext},
};

/// A reset with what the tracker knew about its connection.
#[derive(Debug, Clone)]
pub struct RstReport {
    pub ev: RstEvent,
    pub conn: Option<Connection>,
    pub diagnosis: Option<RstDiagnosis>,
    pub attribution: Attribution,
    /// The connection's other end, when it is on this host too.
    pub peer: Option<Peer>,
    /// The kernel function that decided to reset.
    pub caller: Option<Arc<str>>,
    /// The whole kernel stack, innermost first, when asked for (--stack).
    pub stack: Option<Arc<[Arc<str>]>>,
    /// For received resets: who sent it, as far as this host can tell.
    pub origin: Option<Origin>,
    /// The conntrack entry of the reset's connection, where one was looked
    /// up and found (`nat` in JSON when NAT rewrote it).
    pub conntrack: Option<Found>,
}

impl RstReport {
    /// A reset explained by what it says of itself and its close mark; its
    /// origin, for a received one, is decided later.
    pub fn new(
        ev: RstEvent,
        attribution: Attribution,
        peer: Option<Peer>,
        kernel: &KernelView,
        caller: Option<Arc<str>>,
        stack: Option<Arc<[Arc<str>]>>,
    ) -> Self {
        let ctx = RstContext::of(&ev);
        Self {
            diagnosis: diagnosis::rst(&ev, &ctx, kernel),
            ev,
            conn: ctx.conn,
            attribution,
            peer,
            caller,
            stack,
            origin: None,
            conntrack: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Peer {
    pub netns: Option<u32>,
    pub attribution: Attribution,
    /// For the end that sent the reset: the kernel's reason for it.
    pub sent_reason: Option<Arc<str>>,
}

/// A connection stuck half-closed.
#[derive(Debug, Clone)]
pub struct StuckReport {
    pub time: SystemTime,
    pub conn: Connection,
    /// Its `owner` is a process holding the socket now, where one was found.
    pub attribution: Attribution,
    pub diagnosis: StuckDiagnosis,
}

/// A stuck connection that moved on.
#[derive(Debug, Clone)]
pub struct ResolvedReport {
    pub resolved: Resolved,
    pub diagnosis: String,
    /// The namespace's name, which the table shows; JSON has the inode.
    pub netns_name: Option<Arc<str>>,
}

/// Ring-buffer losses over one reporting interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LossReport {
    pub lost: u64,
    pub lost_total: u64,
}

pub trait Sink {
    fn rst(&mut self, report: &RstReport) -> io::Result<()>;
    fn stuck(&mut self, report: &StuckReport) -> io::Result<()>;
    fn resolved(&mut self, report: &ResolvedReport) -> io::Result<()>;
    fn lost(&mut self, report: &LossReport) -> io::Result<()>;
    fn flush(&mut self) -> io::Result<()>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

/// Where a sink's lines go: a `Write` that may keep a buffer of its own,
/// which a line is then built in (`QueuedWriter`), not built apart and
/// copied in.
pub trait LineOutput: Write {
    /// The buffer to build the next line at the end of, if the output keeps
    /// one: what is appended to it is the output's, and must be one line,
    /// ending in a newline. None: the line is given to `write_all`.
    fn line_buffer(&mut self) -> io::Result<Option<&mut Vec<u8>>> {
        Ok(None)
    }
}

/// Lines to nowhere: what a benchmark of the encoding writes into.
impl LineOutput for io::Sink {}

pub(crate) fn open(format: OutputFormat, out: Box<dyn LineOutput>, node: String) -> Box<dyn Sink> {
    match format {
        OutputFormat::Table => Box::new(TableSink::new(out)),
        OutputFormat::Json => Box::new(JsonSink::new(out, node)),
    }
}

fn rfc3339_micros(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

#[cfg(test)]
pub(crate) mod testing {
    use std::{
        io::{self, Write},
        sync::{Arc, Mutex},
    };

    /// A writer the test keeps a handle to after giving it to a sink.
    #[derive(Clone, Default)]
    pub(crate) struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Shared {
        pub(crate) fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl super::LineOutput for Shared {}
}
