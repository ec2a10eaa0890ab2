//! A streaming table: the header once, then one aligned row per event.
//! comfy-table lays out each row against fixed column widths, so rows printed
//! seconds apart still line up; long values wrap inside their column.

use std::io::{self, Write};

use comfy_table::{
    Attribute, Cell, Color, ColumnConstraint, ContentArrangement, Table, Width, presets,
};

use super::{LossReport, ResolvedReport, RstReport, Sink, StuckReport, rfc3339_micros};
use tcprst_common::TALLY_PORTS;

use crate::{
    host::cgroup::container_label,
    host::enrich::Attribution,
    model::event::{ExecContext, RstEvent, RstKind},
    output::terminal::{cell, terminal_safe},
    pipeline::tracker::Connection,
};

const COLUMNS: [(&str, u16); 9] = [
    ("TIME (UTC)", 17),
    ("EVENT", 16),
    // Room for a /run/netns name or "docker:acc-web"; longer ones wrap.
    ("NETNS", 16),
    ("LOCAL", 24),
    ("REMOTE", 24),
    ("STATE", 13),
    ("WHY", 34),
    ("TASK", 24),
    ("WHOSE", 30),
];

pub struct TableSink {
    out: Box<dyn Write>,
    header_written: bool,
}

impl TableSink {
    pub fn new(out: Box<dyn Write>) -> Self {
        Self {
            out,
            header_written: false,
        }
    }

    fn row(&mut self, cells: Vec<Cell>) -> io::Result<()> {
        if !self.header_written {
            self.header_written = true;
            let header = COLUMNS
                .iter()
                .map(|(name, _)| cell(name).add_attribute(Attribute::Bold))
                .collect();
            self.row(header)?;
        }
        let mut table = Table::new();
        // Columns exist only once a row is in; constraints set before are dropped.
        table
            .load_preset(presets::NOTHING)
            .set_content_arrangement(ContentArrangement::Disabled)
            .add_row(cells)
            .set_constraints(
                COLUMNS.map(|(_, width)| ColumnConstraint::Absolute(Width::Fixed(width))),
            );
        for line in table.lines() {
            writeln!(self.out, "{}", line.trim_end())?;
        }
        Ok(())
    }

    /// A row about a tracked connection rather than one reset.
    fn conn_row(
        &mut self,
        time: std::time::SystemTime,
        label: Cell,
        conn: &Connection,
        netns_name: Option<&str>,
        [why, who, whose]: [String; 3],
    ) -> io::Result<()> {
        let netns = (conn.key.netns != 0).then_some(conn.key.netns);
        self.row(vec![
            cell(time_of_day(time)),
            label,
            netns_cell(netns_name, netns),
            cell(conn.key.local),
            cell(conn.key.remote),
            cell(conn.state.name()),
            cell(why),
            cell(who),
            cell(whose),
        ])
    }

    /// The explanation, under the row it explains.
    fn because(&mut self, text: &str) -> io::Result<()> {
        writeln!(self.out, "   └─ {}", terminal_safe(text))
    }
}

/// An aggregate's ends have port 0 where the clients' ports varied.
fn endpoint(addr: std::net::SocketAddr) -> String {
    match addr {
        _ if addr.port() != 0 => addr.to_string(),
        std::net::SocketAddr::V4(a) => format!("{}:*", a.ip()),
        std::net::SocketAddr::V6(a) => format!("[{}]:*", a.ip()),
    }
}

/// 48211 → "48,211".
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn time_of_day(t: std::time::SystemTime) -> String {
    let time = rfc3339_micros(t);
    time.get(11..26).unwrap_or(&time).to_owned()
}

/// The namespace as people name it; its inode only when it has no name
/// (it is gone, or was never seen by the scan that names them).
fn netns_cell(name: Option<&str>, inode: Option<u32>) -> Cell {
    match (name, inode) {
        (Some(name), _) => cell(name),
        (None, Some(inode)) => cell(inode),
        (None, None) => cell("-"),
    }
}

/// Whose socket it is: the pod, else the container, else the host service,
/// else the process that owns it.
fn whose(a: &Attribution) -> String {
    if let Some(pod) = &a.pod {
        return match &a.container_name {
            Some(c) => format!("pod {}/{} {c}", pod.namespace, pod.name),
            None => format!("pod {}/{}", pod.namespace, pod.name),
        };
    }
    if let Some(c) = a.cgroup.as_deref() {
        if let Some(id) = &c.container_id {
            let runtime = c.runtime.or(a.from_runtime.as_ref().map(|m| m.runtime));
            // People know their containers by name; the id until the
            // runtime has said it.
            return container_label(runtime, a.container_name.as_deref(), id);
        }
        if let Some(service) = &c.service {
            return format!("{service}.service");
        }
    }
    a.owner.as_ref().map_or("-".to_owned(), |o| o.label())
}

fn why(report: &RstReport) -> String {
    let ev = &report.ev;
    match ev.kind {
        RstKind::Sent => {
            let reason = ev.reason.as_deref().unwrap_or("-");
            match &report.caller {
                Some(caller) => format!("{reason} in {caller}"),
                None => reason.to_owned(),
            }
        }
        RstKind::Received => ev
            .errno
            .map_or("ignored (socket closed)", |e| e.name())
            .to_owned(),
    }
}

fn task(ev: &RstEvent) -> String {
    match (&ev.task, ev.context) {
        (_, ExecContext::Softirq) | (None, _) => "(softirq)".to_owned(),
        (Some(t), ExecContext::KernelThread) => format!("[{}]", t.comm),
        (Some(t), ExecContext::Process) => t.label(),
    }
}

impl Sink for TableSink {
    fn rst(&mut self, report: &RstReport) -> io::Result<()> {
        let ev = &report.ev;
        let (label, color) = match ev.kind {
            RstKind::Sent => ("RST sent", Color::Red),
            RstKind::Received => ("RST recv", Color::Yellow),
        };
        let label = match &ev.aggregate {
            Some(a) => format!("{label} ×{}", thousands(a.count)),
            None => label.to_owned(),
        };
        self.row(vec![
            cell(time_of_day(ev.time)),
            cell(label).fg(color),
            netns_cell(report.attribution.netns_name.as_deref(), ev.netns),
            cell(endpoint(ev.local)),
            cell(endpoint(ev.remote)),
            cell(ev.state.map_or("-", |s| s.name())),
            cell(why(report)),
            cell(task(ev)),
            cell(whose(&report.attribution)),
        ])?;
        if let Some(stack) = &report.stack {
            let frames: Vec<&str> = stack.iter().map(|f| &**f).collect();
            writeln!(self.out, "   stack: {}", terminal_safe(&frames.join(" ← ")))?;
        }
        let origin = report.origin.as_ref().map(|o| format!("sent by {o}"));
        let netfilter = ev.nf_hook.map(|hook| {
            format!(
                "a netfilter reject rule answered the segment in {}",
                hook.name()
            )
        });
        let counted = ev.aggregate.as_ref().map(|a| {
            let span = a.last.duration_since(a.first).unwrap_or_default();
            let ports: Vec<String> = a.ports.iter().map(u16::to_string).collect();
            format!(
                "{} more resets like this in {:.1}s, only counted (ports {}{})",
                thousands(a.count),
                span.as_secs_f64(),
                ports.join(", "),
                if ports.len() == TALLY_PORTS {
                    ", …"
                } else {
                    ""
                }
            )
        });
        let diagnosis = report.diagnosis.as_ref().map(|d| d.text.to_string());
        match [counted, diagnosis, origin, netfilter]
            .into_iter()
            .flatten()
            .reduce(|a, b| format!("{a}; {b}"))
        {
            Some(text) => self.because(&text),
            None => Ok(()),
        }
    }

    fn stuck(&mut self, r: &StuckReport) -> io::Result<()> {
        let who = match (&r.conn.initiator, &r.attribution.owner) {
            (Some(i), _) => i.task.label(),
            (None, Some(owner)) => owner.label(),
            (None, None) => "-".to_owned(),
        };
        let why = format!("waits for {}", r.diagnosis.waiting_for.name());
        let label = cell("STUCK").fg(Color::Magenta);
        let netns_name = r.attribution.netns_name.as_deref();
        self.conn_row(
            r.time,
            label,
            &r.conn,
            netns_name,
            [why, who, whose(&r.attribution)],
        )?;
        self.because(&r.diagnosis.text)
    }

    fn resolved(&mut self, r: &ResolvedReport) -> io::Result<()> {
        let conn = &r.resolved.conn;
        let why = format!("was {}", r.resolved.stuck_state.name());
        let label = cell("RESOLVED").fg(Color::Green);
        self.conn_row(
            conn.since,
            label,
            conn,
            r.netns_name.as_deref(),
            [why, "-".to_owned(), "-".to_owned()],
        )?;
        self.because(&r.diagnosis)
    }

    fn lost(&mut self, _report: &LossReport) -> io::Result<()> {
        // People read losses on stderr, where the loader always reports them.
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::model::event::{Task, TcpState};
    use crate::output::testing::Shared;
    use crate::testing::{bare_report, reset};

    fn event(kind: RstKind, local: &str, task: Option<Task>) -> RstReport {
        let mut ev = reset(kind, SystemTime::now(), Some(TcpState::Established), None);
        ev.local = local.parse().unwrap();
        ev.remote = "10.0.0.1:443".parse().unwrap();
        ev.netns = Some(4026531840);
        if task.is_some() {
            ev.context = ExecContext::Process;
        }
        ev.task = task;
        RstReport {
            diagnosis: Some(crate::testing::diagnosis("because of a test")),
            ..bare_report(ev)
        }
    }

    #[test]
    fn rows_printed_apart_line_up_under_the_header() {
        let buf = Shared::default();
        let mut sink = TableSink::new(Box::new(buf.clone()));
        sink.rst(&event(RstKind::Received, "127.0.0.1:1", None))
            .unwrap();
        let task = Task {
            pid: 4242,
            tid: 4242,
            comm: "envoy".into(),
            uid: 0,
        };
        sink.rst(&event(RstKind::Sent, "192.168.100.200:65535", Some(task)))
            .unwrap();
        let text = buf.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        let column_of = |line: &str, needle: &str| line.find(needle).unwrap();
        assert_eq!(
            column_of(lines[0], "REMOTE"),
            column_of(lines[1], "10.0.0.1:443")
        );
        assert_eq!(
            column_of(lines[1], "10.0.0.1:443"),
            column_of(lines[3], "10.0.0.1:443")
        );
        assert_eq!(
            column_of(lines[0], "TASK"),
            column_of(lines[3], "envoy[4242]")
        );
        assert!(lines[1].contains("(softirq)") && lines[1].contains("ECONNRESET"));
        assert_eq!(lines[2], "   └─ because of a test");
    }

    #[test]
    fn the_netns_column_names_the_namespace_else_shows_its_inode() {
        let buf = Shared::default();
        let mut sink = TableSink::new(Box::new(buf.clone()));
        let mut named = event(RstKind::Sent, "127.0.0.1:1", None);
        named.attribution.netns_name = Some("docker:acc-web".into());
        sink.rst(&named).unwrap();
        sink.rst(&event(RstKind::Sent, "127.0.0.1:2", None))
            .unwrap();
        let text = buf.text();
        let lines: Vec<&str> = text.lines().collect();
        let netns = lines[0].find("NETNS");
        assert!(netns.is_some(), "{text}");
        assert_eq!(lines[1].find("docker:acc-web"), netns, "{text}");
        // A namespace gone before the scan that names it is still told apart.
        assert_eq!(lines[3].find("4026531840"), netns, "{text}");
        // The name fits its column: LOCAL starts where the header says.
        assert_eq!(lines[1].find("127.0.0.1:1"), lines[0].find("LOCAL"));
    }

    #[test]
    fn an_aggregate_row_shows_its_count_and_a_port_sample() {
        let buf = Shared::default();
        let mut sink = TableSink::new(Box::new(buf.clone()));
        let mut report = event(RstKind::Sent, "127.0.0.1:9", None);
        let last = report.ev.time;
        report.ev.remote = "127.0.0.1:0".parse().unwrap();
        report.ev.aggregate = Some(crate::model::event::Aggregate {
            count: 48211,
            first: last - std::time::Duration::from_millis(1000),
            last,
            ports: vec![40001, 40002, 40003, 40004],
        });
        sink.rst(&report).unwrap();
        let text = buf.text();
        assert!(text.contains("RST sent"), "{text}");
        assert!(text.contains("×48,211"), "{text}");
        assert!(text.contains("127.0.0.1:*"), "{text}");
        assert!(
            text.contains(
                "└─ 48,211 more resets like this in 1.0s, only counted (ports 40001, 40002, 40003, 40004, …); because of a test"
            ),
            "{text}"
        );
    }

    #[test]
    fn hostile_names_and_diagnoses_print_escaped() {
        let buf = Shared::default();
        let mut sink = TableSink::new(Box::new(buf.clone()));
        let task = Task {
            pid: 7,
            tid: 7,
            comm: "\x1b]0;pwn\x07".into(),
            uid: 0,
        };
        let mut report = event(RstKind::Sent, "127.0.0.1:1", Some(task));
        report.diagnosis = Some(crate::testing::diagnosis("closed by \x1b[2J"));
        report.stack = Some(["tcp_close\u{9b}".into()].into());
        sink.rst(&report).unwrap();
        let text = buf.text();
        assert!(text.contains("\\e]0;pwn\\a[7]"), "{text}");
        assert!(text.contains("   stack: tcp_close\\u{9b}\n"), "{text}");
        assert!(text.contains("   └─ closed by \\e[2J\n"), "{text}");
        assert!(!text.contains(['\x1b', '\x07', '\u{9b}']), "{text:?}");
    }

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(48211), "48,211");
        assert_eq!(thousands(1234567), "1,234,567");
    }
}
