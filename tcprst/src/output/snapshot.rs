//! What `tcprst snapshot` found, as a table or NDJSON.

use std::io::{self, Write};

use comfy_table::{Attribute, ContentArrangement, Table, presets};
use serde::Serialize;

use crate::{
    model::event::process_label,
    output::{Endpoints, OutputFormat, ProcessJson, terminal::cell},
};

/// One socket in the snapshot, ready to print.
#[derive(Serialize)]
pub struct SnapshotRow {
    pub(crate) netns: u32,
    pub(crate) netns_name: String,
    #[serde(flatten)]
    pub(crate) endpoints: Endpoints,
    pub(crate) state: &'static str,
    pub(crate) orphaned: bool,
    pub(crate) owners: Vec<ProcessJson<String>>,
    pub(crate) uid: u32,
    pub(crate) inode: u64,
    pub(crate) timer: Option<String>,
    /// How long the socket has been in its state at least, where `tcp_info`
    /// tells (FIN_WAIT2, CLOSE_WAIT): milliseconds since the peer's last ACK.
    pub(crate) state_for_ms: Option<u64>,
    pub(crate) diagnosis: String,
}

/// The rows, one JSON object a line, or a table and a count.
pub(crate) fn write(
    rows: &[SnapshotRow],
    format: OutputFormat,
    out: &mut dyn Write,
) -> io::Result<()> {
    match format {
        OutputFormat::Json => rows.iter().try_for_each(|r| {
            serde_json::to_writer(&mut *out, r)?;
            writeln!(out)
        }),
        OutputFormat::Table => write_table(rows, out),
    }
}

fn write_table(rows: &[SnapshotRow], out: &mut dyn Write) -> io::Result<()> {
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
        let row = SnapshotRow {
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
            state_for_ms: None,
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
