//! `tcprst snapshot`: every half-closed or lingering connection on the host
//! right now, in every network namespace, with who holds it and why it is
//! there.

use std::{
    io::{self, Write},
    time::SystemTime,
};

use anyhow::{Context as _, Result};
use comfy_table::{Attribute, ContentArrangement, Table, presets};
use serde::Serialize;

use crate::{
    host::enrich::{self, FoundSocket, Lookup},
    model::event::{TcpState, process_label},
    output::terminal::cell,
    output::{Endpoints, OutputFormat, ProcessJson},
    pipeline::diagnosis,
    pipeline::tracker::Connection,
};

pub struct SnapshotOptions {
    pub output: OutputFormat,
    pub netns: Option<u32>,
}

/// One socket in the snapshot, ready to print.
#[derive(Serialize)]
struct Row {
    netns: u32,
    netns_name: String,
    #[serde(flatten)]
    endpoints: Endpoints,
    state: &'static str,
    orphaned: bool,
    owners: Vec<ProcessJson<String>>,
    uid: u32,
    inode: u64,
    timer: Option<String>,
    diagnosis: String,
}

fn lingering_diagnosis(state: TcpState) -> &'static str {
    match state {
        TcpState::TimeWait => {
            "TIME_WAIT: closed cleanly; the kernel keeps it for 60s to absorb late segments"
        }
        _ => "",
    }
}

fn row(found: &FoundSocket, lookup: &mut Lookup, now: SystemTime) -> Row {
    let s = &found.socket;
    let owners: Vec<ProcessJson<String>> = lookup
        .owners()
        .owners(s.inode)
        .iter()
        .map(|o| ProcessJson {
            pid: o.pid,
            comm: o.comm.to_string(),
        })
        .collect();
    let orphaned = s.inode == 0;
    let diagnosis = if s.state.is_half_closed() {
        let conn = Connection::found(found.key(), s.state, orphaned, now);
        let owner = owners.first().map(|o| process_label(o.pid, &o.comm));
        let fin_timeout = lookup.fin_timeout(found.netns.inode);
        diagnosis::stuck(&conn, now, owner.as_deref(), fin_timeout).text
    } else {
        lingering_diagnosis(s.state).to_owned()
    };
    Row {
        netns: found.netns.inode,
        netns_name: found.netns.name.clone(),
        endpoints: Endpoints::new(s.local, s.remote),
        state: s.state.name(),
        orphaned,
        owners,
        uid: s.uid,
        inode: s.inode,
        timer: s.timer.map(|t| t.ss_style()),
        diagnosis,
    }
}

/// Rows by namespace, then state, then ports.
fn order(row: &Row) -> (&str, &str, u16, u16) {
    let ends = &row.endpoints;
    (
        &row.netns_name,
        row.state,
        ends.local_port,
        ends.remote_port,
    )
}

pub fn run(opts: &SnapshotOptions, out: &mut dyn Write) -> Result<()> {
    let mut states = TcpState::HALF_CLOSED.to_vec();
    states.push(TcpState::TimeWait);
    let found = enrich::find_sockets(&states, opts.netns);
    let mut lookup = Lookup::default();
    let now = SystemTime::now();
    let mut rows: Vec<Row> = found.iter().map(|f| row(f, &mut lookup, now)).collect();
    rows.sort_by(|a, b| order(a).cmp(&order(b)));
    let written = match opts.output {
        OutputFormat::Json => rows.iter().try_for_each(|r| {
            serde_json::to_writer(&mut *out, r)?;
            writeln!(out)
        }),
        OutputFormat::Table => write_table(&rows, out),
    };
    match written.and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing the snapshot"),
    }
}

fn write_table(rows: &[Row], out: &mut dyn Write) -> io::Result<()> {
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(
            [
                "NETNS",
                "STATE",
                "LOCAL",
                "REMOTE",
                "OWNER",
                "TIMER",
                "DIAGNOSIS",
            ]
            .map(|h| cell(h).add_attribute(Attribute::Bold)),
        );
    for r in rows {
        let owner = match (r.owners.first(), r.orphaned) {
            (Some(o), _) => process_label(o.pid, &o.comm),
            (None, true) => "(orphaned)".to_owned(),
            (None, false) => "?".to_owned(),
        };
        table.add_row(vec![
            cell(&r.netns_name),
            cell(r.state),
            cell(r.endpoints.local()),
            cell(r.endpoints.remote()),
            cell(owner),
            cell(r.timer.as_deref().unwrap_or("-")),
            cell(&r.diagnosis),
        ]);
    }
    for line in table.lines() {
        writeln!(out, "{}", line.trim_end())?;
    }
    writeln!(out, "{} connections", rows.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_print_escaped() {
        let row = Row {
            netns: 1,
            netns_name: "ns\x1b[2J".into(),
            endpoints: Endpoints::new(
                "127.0.0.1:5000".parse().unwrap(),
                "127.0.0.1:40000".parse().unwrap(),
            ),
            state: "CLOSE_WAIT",
            orphaned: false,
            owners: vec![ProcessJson {
                pid: 7,
                comm: "\x1b]0;pwn\x07".into(),
            }],
            uid: 0,
            inode: 1,
            timer: None,
            diagnosis: "held by \x1b]0;pwn\x07[7]".into(),
        };
        let mut out = Vec::new();
        write_table(&[row], &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("ns\\e[2J"), "{text}");
        assert!(text.contains("\\e]0;pwn\\a[7]"), "{text}");
        assert!(!text.contains(['\x1b', '\x07']), "{text:?}");
    }
}
