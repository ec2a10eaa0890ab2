//! `tcprst snapshot`: every half-closed or lingering connection on the host
//! right now, in every network namespace, with who holds it and why it is
//! there.

use std::{
    io::{self, Write},
    time::SystemTime,
};

use anyhow::{Context as _, Result};

use crate::{
    host::{
        enrich::{self, FoundSocket, Lookup},
        sockdiag::DumpExtras,
    },
    model::event::{TcpState, process_label},
    output::{
        Endpoints, OutputFormat, ProcessJson,
        snapshot::{self, SnapshotRow},
    },
    pipeline::diagnosis,
    pipeline::tracker::Connection,
};

pub struct SnapshotOptions {
    pub output: OutputFormat,
    pub netns: Option<u32>,
}

fn lingering_diagnosis(state: TcpState) -> &'static str {
    match state {
        TcpState::TimeWait => {
            "TIME_WAIT: closed cleanly; the kernel keeps it for 60s to absorb late segments"
        }
        _ => "",
    }
}

fn row(found: &FoundSocket, lookup: &mut Lookup, now: SystemTime) -> SnapshotRow {
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
        let conn = Connection::found(found.key(), s.state, orphaned, now)
            .dated_by_peer(s.last_ack_recv, None);
        let owner = owners.first().map(|o| process_label(o.pid, &o.comm));
        let fin_timeout = lookup.fin_timeout(found.netns.inode);
        diagnosis::stuck(&conn, now, owner.as_deref(), fin_timeout).text
    } else {
        lingering_diagnosis(s.state).to_owned()
    };
    SnapshotRow {
        netns: found.netns.inode,
        netns_name: found.netns.name.clone(),
        endpoints: Endpoints::new(s.local, s.remote),
        state: s.state.name(),
        orphaned,
        owners,
        uid: s.uid,
        inode: s.inode,
        timer: s.timer.map(|t| t.ss_style()),
        state_for_ms: s
            .last_ack_recv
            .filter(|_| s.state.begins_with_peer_segment())
            .map(|quiet| quiet.as_millis() as u64),
        diagnosis,
    }
}

/// Rows by namespace, then state, then ports.
fn order(row: &SnapshotRow) -> (&str, &str, u16, u16) {
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
    let with_info = DumpExtras {
        tcp_info: true,
        ..DumpExtras::default()
    };
    let found = enrich::find_sockets(&states, opts.netns, with_info);
    let mut lookup = Lookup::default();
    let now = SystemTime::now();
    let mut rows: Vec<SnapshotRow> = found
        .sockets
        .iter()
        .map(|f| row(f, &mut lookup, now))
        .collect();
    rows.sort_by(|a, b| order(a).cmp(&order(b)));
    match snapshot::write(&rows, opts.output, out).and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
        other => other.context("writing the snapshot")?,
    }
    // What could be read is shown; an incomplete list must still fail.
    found.complete()
}
