//! NDJSON: one object per line. Field names are documented in README.md and
//! docs/event.schema.json; every field is always present (null when unknown)
//! so log pipelines see one stable shape.

use std::{
    io::{self, Write},
    net::IpAddr,
};

use serde::Serialize;

use super::{LossReport, Sink, rfc3339_micros};
use crate::event::RstEvent;

pub struct JsonSink {
    out: Box<dyn Write>,
}

impl JsonSink {
    pub fn new(out: Box<dyn Write>) -> Self {
        Self { out }
    }

    fn line(&mut self, value: &impl Serialize) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, value)?;
        self.out.write_all(b"\n")
    }
}

#[derive(Serialize)]
struct RstJson<'a> {
    time: String,
    kind: &'static str,
    family: &'static str,
    local_addr: IpAddr,
    local_port: u16,
    remote_addr: IpAddr,
    remote_port: u16,
    state: Option<&'static str>,
    reason: Option<&'a str>,
    errno: Option<&'static str>,
    socket_cookie: Option<u64>,
    netns: Option<u32>,
    context: &'static str,
    pid: Option<u32>,
    tid: Option<u32>,
    comm: Option<&'a str>,
    uid: Option<u32>,
}

impl<'a> RstJson<'a> {
    fn new(ev: &'a RstEvent) -> Self {
        let task = ev.task.as_ref();
        Self {
            time: rfc3339_micros(ev.time),
            kind: ev.kind.name(),
            family: if ev.is_ipv6() { "ipv6" } else { "ipv4" },
            local_addr: ev.local.ip(),
            local_port: ev.local.port(),
            remote_addr: ev.remote.ip(),
            remote_port: ev.remote.port(),
            state: ev.state.map(|s| s.name()),
            reason: ev.reason.as_deref(),
            errno: ev.errno.map(|e| e.name()),
            socket_cookie: ev.sock_cookie,
            netns: ev.netns,
            context: ev.context.name(),
            pid: task.map(|t| t.pid),
            tid: task.map(|t| t.tid),
            comm: task.map(|t| t.comm.as_str()),
            uid: task.map(|t| t.uid),
        }
    }
}

#[derive(Serialize)]
struct LostJson {
    time: String,
    kind: &'static str,
    lost: u64,
    lost_total: u64,
}

impl Sink for JsonSink {
    fn rst(&mut self, ev: &RstEvent) -> io::Result<()> {
        self.line(&RstJson::new(ev))
    }

    fn lost(&mut self, report: &LossReport) -> io::Result<()> {
        self.line(&LostJson {
            time: rfc3339_micros(std::time::SystemTime::now()),
            kind: "lost",
            lost: report.lost,
            lost_total: report.lost_total,
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, Mutex},
        time::{Duration, UNIX_EPOCH},
    };

    use super::*;
    use crate::event::{Errno, ExecContext, RstKind, Task, TcpState};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn lines(buf: &Shared) -> Vec<serde_json::Value> {
        String::from_utf8(buf.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn rst_shape() {
        let buf = Shared::default();
        let mut sink = JsonSink::new(Box::new(buf.clone()));
        sink.rst(&RstEvent {
            time: UNIX_EPOCH + Duration::from_micros(1_795_000_000_123_456),
            kind: RstKind::Received,
            local: "[::1]:5000".parse().unwrap(),
            remote: "[::1]:40000".parse().unwrap(),
            state: Some(TcpState::SynSent),
            reason: None,
            sock_cookie: Some(4097),
            netns: Some(4026532000),
            context: ExecContext::Process,
            task: Some(Task {
                pid: 10,
                tid: 11,
                comm: "nc".into(),
                uid: 0,
            }),
            errno: Some(Errno::ConnRefused),
        })
        .unwrap();
        let v = &lines(&buf)[0];
        let expected = serde_json::json!({
            "time": "2026-11-18T11:06:40.123456Z",
            "kind": "rst_received",
            "family": "ipv6",
            "local_addr": "::1", "local_port": 5000,
            "remote_addr": "::1", "remote_port": 40000,
            "state": "SYN_SENT",
            "reason": null,
            "errno": "ECONNREFUSED",
            "socket_cookie": 4097,
            "netns": 4026532000u32,
            "context": "process",
            "pid": 10, "tid": 11, "comm": "nc", "uid": 0,
        });
        assert_eq!(v, &expected);
    }

    /// docs/event.schema.json documents exactly the fields we print.
    #[test]
    fn schema_lists_every_field() {
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../../docs/event.schema.json")).unwrap();
        let buf = Shared::default();
        let mut sink = JsonSink::new(Box::new(buf.clone()));
        sink.rst(&RstEvent {
            time: UNIX_EPOCH,
            kind: RstKind::Sent,
            local: "127.0.0.1:1".parse().unwrap(),
            remote: "127.0.0.1:2".parse().unwrap(),
            state: None,
            reason: None,
            sock_cookie: None,
            netns: None,
            context: ExecContext::Softirq,
            task: None,
            errno: None,
        })
        .unwrap();
        sink.lost(&LossReport {
            lost: 1,
            lost_total: 1,
        })
        .unwrap();
        for (line, def) in lines(&buf).iter().zip(["rst", "lost"]) {
            let mut printed: Vec<&str> = line
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            let def = &schema["$defs"][def];
            let mut required: Vec<&str> = def["required"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            let mut documented: Vec<&str> = def["properties"]
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            printed.sort();
            required.sort();
            documented.sort();
            assert_eq!(printed, required);
            assert_eq!(printed, documented);
        }
    }

    #[test]
    fn lost_shape() {
        let buf = Shared::default();
        let mut sink = JsonSink::new(Box::new(buf.clone()));
        sink.lost(&LossReport {
            lost: 3,
            lost_total: 10,
        })
        .unwrap();
        let v = &lines(&buf)[0];
        assert_eq!(v["kind"], "lost");
        assert_eq!(v["lost"], 3);
        assert_eq!(v["lost_total"], 10);
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
    }
}
