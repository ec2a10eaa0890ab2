//! NDJSON: one object per line. Field names are documented in README.md and
//! docs/event.schema.json; every field is always present (null when unknown)
//! so log pipelines see one stable shape.

use std::{
    io::{self, Write},
    net::{IpAddr, SocketAddr},
    time::SystemTime,
};

use serde::Serialize;

use super::{LossReport, ResolvedReport, RstReport, Sink, StuckReport, rfc3339_micros};
use crate::{
    attach::{hook_name, tier_name},
    enrich::Attribution,
    event::{CloseOp, Initiator, NfHook, Task},
    origin::Origin,
    tracker::Connection,
};

pub struct JsonSink {
    out: Box<dyn Write>,
    /// Every record names the node, for logs shipped off a cluster.
    node: String,
}

impl JsonSink {
    pub fn new(out: Box<dyn Write>, node: String) -> Self {
        Self { out, node }
    }
}

fn line(out: &mut dyn Write, value: &impl Serialize) -> io::Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    out.write_all(b"\n")
}

fn ms_before(at: SystemTime, now: SystemTime) -> u64 {
    now.duration_since(at).unwrap_or_default().as_millis() as u64
}

/// The fields every connection record starts with.
#[derive(Serialize)]
struct Head {
    time: String,
    kind: &'static str,
    #[serde(flatten)]
    endpoints: Endpoints,
    netns: Option<u32>,
}

impl Head {
    fn new(time: SystemTime, kind: &'static str, conn: &Connection) -> Self {
        Self {
            time: rfc3339_micros(time),
            kind,
            endpoints: Endpoints::new(conn.key.local, conn.key.remote),
            netns: (conn.key.netns != 0).then_some(conn.key.netns),
        }
    }
}

#[derive(Serialize)]
struct Endpoints {
    family: &'static str,
    local_addr: IpAddr,
    local_port: u16,
    remote_addr: IpAddr,
    remote_port: u16,
}

impl Endpoints {
    fn new(local: SocketAddr, remote: SocketAddr) -> Self {
        Self {
            family: if local.is_ipv6() { "ipv6" } else { "ipv4" },
            local_addr: local.ip(),
            local_port: local.port(),
            remote_addr: remote.ip(),
            remote_port: remote.port(),
        }
    }
}

#[derive(Serialize)]
struct InitiatorJson<'a> {
    op: &'static str,
    how: Option<&'static str>,
    pid: u32,
    comm: &'a str,
    ago_ms: u64,
}

fn initiator(conn: Option<&Connection>, now: SystemTime) -> Option<InitiatorJson<'_>> {
    let conn = conn?;
    let Initiator { op, task } = conn.initiator.as_ref()?;
    let (op, how) = match op {
        CloseOp::Shutdown(how) => ("shutdown", Some(how.name())),
        CloseOp::Close => ("close", None),
        CloseOp::Exit => ("exit", None),
    };
    Some(InitiatorJson {
        op,
        how,
        pid: task.pid,
        comm: &task.comm,
        ago_ms: conn.initiated_at.map_or(0, |at| ms_before(at, now)),
    })
}

#[derive(Serialize)]
struct StepJson {
    state: &'static str,
    /// None for the state a close mark found, whose start it did not see.
    ago_ms: Option<u64>,
    by: Option<String>,
}

fn history(conn: Option<&Connection>, now: SystemTime) -> Vec<StepJson> {
    conn.map(|c| {
        c.history
            .iter()
            .map(|step| StepJson {
                state: step.state.name(),
                ago_ms: step.at.map(|at| ms_before(at, now)),
                by: step.by.as_ref().map(ToString::to_string),
            })
            .collect()
    })
    .unwrap_or_default()
}

#[derive(Serialize)]
struct ProcessJson<'a> {
    pid: u32,
    comm: &'a str,
}

#[derive(Serialize)]
struct CgroupJson<'a> {
    id: u64,
    path: Option<&'a str>,
}

#[derive(Serialize)]
struct ContainerJson<'a> {
    runtime: Option<&'static str>,
    id: &'a str,
    name: Option<&'a str>,
}

#[derive(Serialize)]
struct PodJson<'a> {
    uid: &'a str,
    namespace: Option<&'a str>,
    name: Option<&'a str>,
    qos: Option<&'static str>,
    labels: Option<&'a std::collections::BTreeMap<String, String>>,
}

/// Whose socket it is: namespace, cgroup, container, pod, service, owner.
#[derive(Serialize)]
struct WhoJson<'a> {
    netns_name: Option<&'a str>,
    cgroup: Option<CgroupJson<'a>>,
    container: Option<ContainerJson<'a>>,
    pod: Option<PodJson<'a>>,
    service: Option<&'a str>,
    owner: Option<ProcessJson<'a>>,
}

#[derive(Serialize)]
struct PeerJson<'a> {
    netns: Option<u32>,
    #[serde(flatten)]
    who: WhoJson<'a>,
}

impl<'a> WhoJson<'a> {
    fn new(a: &'a Attribution) -> Self {
        let cgroup = a.cgroup.as_deref();
        Self {
            netns_name: a.netns_name.as_deref(),
            cgroup: a.cgroup_id.map(|id| CgroupJson {
                id,
                path: cgroup.map(|c| c.path.as_str()),
            }),
            container: cgroup.and_then(|c| {
                Some(ContainerJson {
                    runtime: c.runtime,
                    id: c.container_id.as_deref()?,
                    name: a.container_name.as_deref(),
                })
            }),
            pod: cgroup.and_then(|c| {
                Some(PodJson {
                    uid: c.pod_uid.as_deref()?,
                    namespace: a.pod.as_ref().map(|p| p.namespace.as_str()),
                    name: a.pod.as_ref().map(|p| p.name.as_str()),
                    qos: c.qos,
                    labels: a.pod.as_ref().map(|p| &p.labels),
                })
            }),
            service: cgroup.and_then(|c| c.service.as_deref()),
            owner: a.owner.as_ref().map(|o| ProcessJson {
                pid: o.pid,
                comm: &o.comm,
            }),
        }
    }
}

#[derive(Serialize)]
struct AggregateJson<'a> {
    first_time: String,
    ports: &'a [u16],
}

#[derive(Serialize)]
struct RstJson<'a> {
    time: String,
    kind: &'static str,
    /// The resets this record stands for: 1, or an aggregate's count.
    count: u64,
    aggregate: Option<AggregateJson<'a>>,
    #[serde(flatten)]
    endpoints: Endpoints,
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
    initiator: Option<InitiatorJson<'a>>,
    history: Vec<StepJson>,
    diagnosis: Option<&'a str>,
    cause: Option<&'static str>,
    caller: Option<&'a str>,
    stack: Option<Vec<&'a str>>,
    hook: &'static str,
    tier: &'static str,
    nf_hook: Option<&'static str>,
    origin: Option<String>,
    node: &'a str,
    #[serde(flatten)]
    who: WhoJson<'a>,
    peer: Option<PeerJson<'a>>,
}

impl<'a> RstJson<'a> {
    fn new(report: &'a RstReport, node: &'a str) -> Self {
        let ev = &report.ev;
        let task: Option<&Task> = ev.task.as_ref();
        let conn = report.conn.as_ref();
        Self {
            time: rfc3339_micros(ev.time),
            kind: match ev.aggregate {
                Some(_) => ev.kind.aggregate_name(),
                None => ev.kind.name(),
            },
            count: ev.resets(),
            aggregate: ev.aggregate.as_ref().map(|a| AggregateJson {
                first_time: rfc3339_micros(a.first),
                ports: &a.ports,
            }),
            endpoints: Endpoints::new(ev.local, ev.remote),
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
            initiator: initiator(conn, ev.time),
            history: history(conn, ev.time),
            diagnosis: report.diagnosis.as_ref().map(|d| d.text.as_str()),
            cause: report.diagnosis.as_ref().map(|d| d.cause.name()),
            caller: report.caller.as_deref(),
            stack: report
                .stack
                .as_ref()
                .map(|s| s.iter().map(|f| &**f).collect()),
            hook: hook_name(ev.hook),
            tier: tier_name(ev.tier),
            nf_hook: ev.nf_hook.map(NfHook::name),
            origin: report.origin.as_ref().map(Origin::describe),
            node,
            who: WhoJson::new(&report.attribution),
            peer: report.peer.as_ref().map(|p| PeerJson {
                netns: p.netns,
                who: WhoJson::new(&p.attribution),
            }),
        }
    }
}

#[derive(Serialize)]
struct StuckJson<'a> {
    #[serde(flatten)]
    head: Head,
    state: &'static str,
    stuck_for_ms: u64,
    age_is_lower_bound: bool,
    waiting_for: &'static str,
    blame: &'static str,
    orphaned: Option<bool>,
    initiator: Option<InitiatorJson<'a>>,
    our_fin_ago_ms: Option<u64>,
    peer_fin_ago_ms: Option<u64>,
    history: Vec<StepJson>,
    diagnosis: &'a str,
    node: &'a str,
    #[serde(flatten)]
    who: WhoJson<'a>,
}

#[derive(Serialize)]
struct ResolvedJson<'a> {
    #[serde(flatten)]
    head: Head,
    state: &'static str,
    now_state: &'static str,
    stuck_for_ms: u64,
    initiator: Option<InitiatorJson<'a>>,
    diagnosis: &'a str,
    node: &'a str,
}

#[derive(Serialize)]
struct LostJson<'a> {
    time: String,
    kind: &'static str,
    lost: u64,
    lost_total: u64,
    node: &'a str,
}

impl Sink for JsonSink {
    fn rst(&mut self, report: &RstReport) -> io::Result<()> {
        line(&mut self.out, &RstJson::new(report, &self.node))
    }

    fn stuck(&mut self, r: &StuckReport) -> io::Result<()> {
        let conn = &r.conn;
        line(
            &mut self.out,
            &StuckJson {
                head: Head::new(r.time, "halfclose_stuck", conn),
                state: conn.state.name(),
                stuck_for_ms: ms_before(conn.since, r.time),
                age_is_lower_bound: !conn.seen_from_start,
                waiting_for: r.diagnosis.waiting_for.name(),
                blame: r.diagnosis.blame.name(),
                orphaned: conn.orphaned,
                initiator: initiator(Some(conn), r.time),
                our_fin_ago_ms: conn.our_fin_at.map(|at| ms_before(at, r.time)),
                peer_fin_ago_ms: conn.peer_fin_at.map(|at| ms_before(at, r.time)),
                history: history(Some(conn), r.time),
                diagnosis: &r.diagnosis.text,
                node: &self.node,
                who: WhoJson::new(&r.attribution),
            },
        )
    }

    fn resolved(&mut self, r: &ResolvedReport) -> io::Result<()> {
        let conn = &r.resolved.conn;
        line(
            &mut self.out,
            &ResolvedJson {
                head: Head::new(conn.since, "halfclose_resolved", conn),
                state: r.resolved.stuck_state.name(),
                now_state: conn.state.name(),
                stuck_for_ms: r.resolved.stuck_for.as_millis() as u64,
                initiator: initiator(Some(conn), conn.since),
                diagnosis: &r.diagnosis,
                node: &self.node,
            },
        )
    }

    fn lost(&mut self, report: &LossReport) -> io::Result<()> {
        line(
            &mut self.out,
            &LostJson {
                time: rfc3339_micros(SystemTime::now()),
                kind: "lost",
                lost: report.lost,
                lost_total: report.lost_total,
                node: &self.node,
            },
        )
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::{
        diagnosis::{self, Blame, WaitingFor},
        event::{Errno, ExecContext, RstEvent, RstKind, TcpState},
        sink::{Peer, testing::Shared},
        testing::{facts, proxy_half_close, reset, scanned, t},
        tracker::{RstContext, Tracker},
    };

    fn lines(buf: &Shared) -> Vec<serde_json::Value> {
        buf.text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn received(at: SystemTime) -> RstEvent {
        let mut ev = reset(RstKind::Received, at, Some(TcpState::FinWait2), None);
        ev.socket = Some(facts(true, false));
        ev.history = Some(proxy_half_close());
        ev.sock_cookie = Some(4097);
        ev.context = ExecContext::Process;
        ev.task = Some(Task {
            pid: 10,
            tid: 11,
            comm: "nc".into(),
            uid: 0,
        });
        ev
    }

    const CONTAINER: &str = "0e7859b44b4e93d620108bda2c5103614fd6ff83a2798742f0ddd3fa3db3b3b7";
    const POD: &str = "2e7a1c5d-8f0b-4c3a-9d6e-1f2a3b4c5d6e";

    /// A socket of container "web" in pod shop/web-1, owned by envoy.
    fn attribution() -> Attribution {
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CONTAINER}.scope",
            POD.replace('-', "_")
        );
        Attribution {
            netns_name: Some("cri-containerd:0e7859b44b4e".into()),
            cgroup_id: Some(8812),
            cgroup: Some(std::sync::Arc::new(crate::cgroup::parse_path(&path))),
            pod: Some(crate::k8s::PodMeta {
                namespace: "shop".into(),
                name: "web-1".into(),
                uid: POD.into(),
                labels: [("app".to_owned(), "web".to_owned())].into(),
                containers: [(CONTAINER.to_owned(), "web".to_owned())].into(),
            }),
            container_name: Some("web".into()),
            owner: Some(crate::event::Process {
                pid: 7,
                comm: "envoy".into(),
            }),
        }
    }

    /// One record of each kind, from a real tracker sequence.
    fn every_kind() -> Shared {
        let buf = Shared::default();
        let mut sink = JsonSink::new(Box::new(buf.clone()), "node-a".into());
        let mut tracker = Tracker::new(10);
        tracker.scan(t(0), Vec::new());
        tracker.scan(
            t(11),
            vec![scanned(TcpState::FinWait2, Some(proxy_half_close()), false)],
        );
        let ev = received(t(15));
        let ctx = RstContext::of(&ev);
        sink.rst(&RstReport {
            diagnosis: diagnosis::rst(&ev, &ctx, &diagnosis::KernelView::default()),
            ev,
            conn: ctx.conn,
            attribution: attribution(),
            peer: Some(Peer {
                sent_reason: None,
                netns: Some(4026532999),
                attribution: Attribution {
                    netns_name: Some("host".into()),
                    owner: Some(crate::event::Process {
                        pid: 99,
                        comm: "curl".into(),
                    }),
                    ..Attribution::default()
                },
            }),
            caller: Some("tcp_v4_rcv".into()),
            stack: Some(
                ["tcp_v4_send_reset", "tcp_v4_rcv"]
                    .map(std::sync::Arc::from)
                    .into(),
            ),
            origin: Some(Origin::LocalTcp),
        })
        .unwrap();
        let conn = tracker
            .stuck(t(40), Duration::from_secs(2), Duration::from_secs(60))
            .remove(0);
        sink.stuck(&StuckReport {
            time: t(40),
            diagnosis: diagnosis::stuck(&conn, t(40), None, Duration::from_secs(60)),
            attribution: Attribution {
                owner: Some(crate::event::Process {
                    pid: 7,
                    comm: "socat".into(),
                }),
                ..Attribution::default()
            },
            conn,
        })
        .unwrap();
        let resolved = tracker.scan(t(50), Vec::new()).remove(0);
        sink.resolved(&ResolvedReport {
            diagnosis: diagnosis::resolved(&resolved),
            resolved,
            netns_name: None,
        })
        .unwrap();
        sink.lost(&LossReport {
            lost: 3,
            lost_total: 10,
        })
        .unwrap();
        buf
    }

    #[test]
    fn rst_shape() {
        let buf = Shared::default();
        let mut sink = JsonSink::new(Box::new(buf.clone()), "node-a".into());
        let mut ev = received(UNIX_EPOCH + Duration::from_micros(1_795_000_000_123_456));
        ev.local = "[::1]:5000".parse().unwrap();
        ev.remote = "[::1]:40000".parse().unwrap();
        ev.state = Some(TcpState::SynSent);
        ev.errno = Some(Errno::ConnRefused);
        sink.rst(&RstReport {
            ev,
            conn: None,
            diagnosis: None,
            attribution: Attribution::default(),
            peer: None,
            caller: None,
            stack: None,
            origin: Some(Origin::NotLocal {
                netfilter_watched: false,
            }),
        })
        .unwrap();
        let expected = serde_json::json!({
            "time": "2026-11-18T11:06:40.123456Z",
            "kind": "rst_received",
            "count": 1,
            "aggregate": null,
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
            "initiator": null,
            "history": [],
            "diagnosis": null,
            "cause": null,
            "node": "node-a",
            "netns_name": null,
            "cgroup": null,
            "container": null,
            "pod": null,
            "service": null,
            "owner": null,
            "peer": null,
            "caller": null,
            "stack": null,
            "hook": "tcp:tcp_receive_reset",
            "tier": "tracepoint",
            "nf_hook": null,
            "origin": "not a local TCP socket (netfilter, middlebox or userspace stack)",
        });
        assert_eq!(lines(&buf)[0], expected);
    }

    #[test]
    fn aggregate_shape() {
        let buf = Shared::default();
        let mut sink = JsonSink::new(Box::new(buf.clone()), "node-a".into());
        let last = UNIX_EPOCH + Duration::from_micros(1_795_000_001_000_000);
        let mut ev = reset(RstKind::Sent, last, None, Some("NO_SOCKET"));
        ev.remote = "127.0.0.1:0".parse().unwrap();
        ev.aggregate = Some(crate::event::Aggregate {
            count: 48211,
            first: UNIX_EPOCH + Duration::from_micros(1_795_000_000_000_000),
            last,
            ports: vec![40001, 40002],
        });
        sink.rst(&RstReport {
            ev,
            conn: None,
            diagnosis: None,
            attribution: Attribution::default(),
            peer: None,
            caller: Some("tcp_v4_rcv".into()),
            stack: None,
            origin: None,
        })
        .unwrap();
        let v = &lines(&buf)[0];
        assert_eq!(v["kind"], "rst_sent_aggregate");
        assert_eq!(v["count"], 48211);
        assert_eq!(v["time"], "2026-11-18T11:06:41.000000Z");
        assert_eq!(
            v["aggregate"],
            serde_json::json!({
                "first_time": "2026-11-18T11:06:40.000000Z",
                "ports": [40001, 40002],
            })
        );
        assert_eq!(v["remote_port"], 0);
        assert_eq!(v["reason"], "NO_SOCKET");
        assert_eq!(v["caller"], "tcp_v4_rcv");
    }

    #[test]
    fn reset_names_the_container_pod_and_owner() {
        let v = &lines(&every_kind())[0];
        assert_eq!(v["node"], "node-a");
        assert_eq!(v["netns_name"], "cri-containerd:0e7859b44b4e");
        assert_eq!(v["cgroup"]["id"], 8812);
        assert!(v["cgroup"]["path"].as_str().unwrap().ends_with(".scope"));
        assert_eq!(
            v["container"],
            serde_json::json!({"runtime": "containerd", "id": CONTAINER, "name": "web"})
        );
        assert_eq!(
            v["pod"],
            serde_json::json!({"uid": POD, "namespace": "shop", "name": "web-1", "qos": "burstable", "labels": {"app": "web"}})
        );
        assert_eq!(v["owner"], serde_json::json!({"pid": 7, "comm": "envoy"}));
        assert_eq!(v["caller"], "tcp_v4_rcv");
        assert_eq!(
            v["stack"],
            serde_json::json!(["tcp_v4_send_reset", "tcp_v4_rcv"])
        );
        assert_eq!(
            v["peer"],
            serde_json::json!({
                "netns": 4026532999u32, "netns_name": "host", "cgroup": null, "container": null,
                "pod": null, "service": null, "owner": {"pid": 99, "comm": "curl"},
            })
        );
    }

    #[test]
    fn explained_reset_carries_history_and_initiator() {
        let v = &lines(&every_kind())[0];
        assert_eq!(
            v["initiator"],
            serde_json::json!({"op": "shutdown", "how": "SHUT_WR", "pid": 51435, "comm": "envoy", "ago_ms": 5000})
        );
        assert_eq!(
            v["history"],
            serde_json::json!([
                // The mark began at the shutdown: when ESTABLISHED began is unknown.
                {"state": "ESTABLISHED", "ago_ms": null, "by": null},
                {"state": "FIN_WAIT1", "ago_ms": 5000, "by": "shutdown(SHUT_WR) by envoy[51435]"},
                {"state": "FIN_WAIT2", "ago_ms": 5000, "by": null},
            ])
        );
        assert!(
            v["diagnosis"]
                .as_str()
                .unwrap()
                .starts_with("the peer reset a connection we half-closed")
        );
    }

    #[test]
    fn stuck_and_resolved_shapes() {
        let all = lines(&every_kind());
        let stuck = &all[1];
        assert_eq!(stuck["kind"], "halfclose_stuck");
        assert_eq!(stuck["state"], "FIN_WAIT2");
        assert_eq!(stuck["stuck_for_ms"], 30_000);
        assert_eq!(stuck["age_is_lower_bound"], false);
        assert_eq!(stuck["waiting_for"], WaitingFor::PeerFin.name());
        assert_eq!(stuck["blame"], Blame::Peer.name());
        assert_eq!(stuck["orphaned"], false);
        assert_eq!(
            stuck["owner"],
            serde_json::json!({"pid": 7, "comm": "socat"})
        );
        assert_eq!(stuck["our_fin_ago_ms"], 30_000);
        assert!(stuck["peer_fin_ago_ms"].is_null());
        assert_eq!(stuck["initiator"]["pid"], 51435);
        let resolved = &all[2];
        assert_eq!(resolved["kind"], "halfclose_resolved");
        assert_eq!(resolved["state"], "FIN_WAIT2");
        assert_eq!(resolved["now_state"], "CLOSE");
        assert_eq!(resolved["stuck_for_ms"], 40_000);
    }

    /// docs/event.schema.json documents exactly the fields we print.
    #[test]
    fn schema_lists_every_field() {
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../../docs/event.schema.json")).unwrap();
        let all = lines(&every_kind());
        for (line, def) in all.iter().zip(["rst", "stuck", "resolved", "lost"]) {
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
            assert_eq!(printed, required, "{def}");
            assert_eq!(printed, documented, "{def}");
        }
    }

    #[test]
    fn lost_shape() {
        let v = &lines(&every_kind())[3];
        assert_eq!(v["kind"], "lost");
        assert_eq!(v["lost"], 3);
        assert_eq!(v["lost_total"], 10);
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
    }
}
