//! `--metrics-addr`: /metrics scraped while tracing, parsed as Prometheus
//! text format, with the counters the resets made.

mod common;

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
};

use common::{Netns, Tracer};
use prometheus_parse::{Scrape, Value};

fn scrape(addr: &str) -> Scrape {
    let mut conn = TcpStream::connect(addr).unwrap();
    write!(
        conn,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            ref other => panic!("{name} is {other:?}"),
        })
}

#[test]
fn metrics_count_resets_programs_and_losses() {
    let ns = Netns::new();
    let mut tracer = Tracer::start(&[
        "--netns",
        &ns.name,
        "--metrics-addr",
        "127.0.0.1:0",
        "--stuck-after",
        "1s",
    ]);
    let stderr = tracer.stderr_text();
    let addr = stderr
        .split("metrics on http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("no metrics address in {stderr}"))
        .to_owned();
    for port in [40200, 40201] {
        assert!(
            ns.connect(&format!("127.0.0.1:{port}"), "127.0.0.1:9")
                .is_err()
        );
    }
    tracer.wait_for_rsts(4);
    // One half-close, stuck on both ends.
    let (client, server) = ns.pair("127.0.0.1:40202", "127.0.0.1:8080");
    client.shutdown(std::net::Shutdown::Write).unwrap();
    tracer.wait_for("the server's stuck report", |v| {
        v["kind"] == "halfclose_stuck" && v["local_port"] == 8080
    });
    tracer.wait_for("the client's stuck report", |v| {
        v["kind"] == "halfclose_stuck" && v["local_port"] == 40202
    });

    let m = scrape(&addr);
    let sent = [
        ("direction", "sent"),
        ("reason", "NO_SOCKET"),
        ("caller", "tcp_v4_rcv"),
    ];
    assert_eq!(value(&m, "tcprst_resets_total", &sent), Some(2.0));
    assert_eq!(
        value(&m, "tcprst_resets_total", &[("direction", "received")]),
        Some(2.0)
    );
    // This kernel has tp_btf with socket storage: the close-mark program and
    // both reset tracepoints run as tp_btf, nothing as a classic tracepoint.
    assert_eq!(
        value(&m, "tcprst_programs_attached", &[("tier", "tp_btf")]),
        Some(3.0)
    );
    assert_eq!(
        value(&m, "tcprst_programs_attached", &[("tier", "tracepoint")]),
        Some(0.0)
    );
    assert_eq!(
        value(
            &m,
            "tcprst_programs_attached",
            &[("tier", "raw_tracepoint")]
        ),
        Some(2.0)
    );
    assert_eq!(value(&m, "tcprst_lost_events_total", &[]), Some(0.0));
    // Every reset's caller frames were read.
    assert_eq!(
        value(&m, "tcprst_stack_capture_failures_total", &[]),
        Some(0.0)
    );
    assert_eq!(
        value(&m, "tcprst_halfclose_stuck", &[("state", "FIN_WAIT2")]),
        Some(1.0)
    );
    assert_eq!(
        value(&m, "tcprst_halfclose_stuck", &[("state", "CLOSE_WAIT")]),
        Some(1.0)
    );
    assert_eq!(
        value(&m, "tcprst_halfclose_stuck", &[("state", "LAST_ACK")]),
        Some(0.0)
    );
    drop((client, server));
    tracer.stop();
}
