//! `--metrics-addr`: /metrics scraped while tracing, parsed as Prometheus
//! text format, with the counters the resets made.

mod common;

use std::{net::TcpStream, time::Duration};

use common::{Netns, Tracer, metric, scrape, trace_with_metrics, wait_until};

/// Idle clients cannot take the endpoint: connections are capped, the
/// rest wait in the backlog, and one that sends no request is dropped
/// after a few seconds, so a scrape behind 1,000 of them still answers.
#[test]
fn a_scrape_answers_behind_a_thousand_idle_connections() {
    let ns = Netns::new();
    let (tracer, addr) = trace_with_metrics(&ns, &[]);
    // SAFETY: raises this test process's own descriptor limit to its hard limit.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    let idle: Vec<TcpStream> = (0..1000)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", tracer.pid()))
            .unwrap()
            .count()
    };
    std::thread::sleep(Duration::from_millis(500));
    let held = fds();
    assert!(
        held < 200,
        "tcprst holds {held} descriptors for 1,000 idle clients"
    );
    // `scrape` gives up after 20 s: idle clients time out after 3.
    let m = scrape(&addr);
    assert!(metric(&m, "tcprst_programs_attached", &[("tier", "tracepoint")]).is_some());
    drop(idle);
    tracer.stop();
}

#[test]
fn metrics_count_resets_programs_and_losses() {
    let ns = Netns::new();
    let (mut tracer, addr) = trace_with_metrics(&ns, &[]);
    for port in [40200, 40201] {
        assert!(
            ns.connect(&format!("127.0.0.1:{port}"), "127.0.0.1:9")
                .is_err()
        );
    }
    tracer.wait_for_rsts(4);
    // One half-close, stuck on both ends.
    let pair = half_closed_until_stuck(&ns, &mut tracer, "127.0.0.1:40202", "127.0.0.1:8080");

    let m = scrape(&addr);
    let sent = [
        ("direction", "sent"),
        ("reason", "NO_SOCKET"),
        ("caller", "tcp_v4_rcv"),
    ];
    assert_eq!(metric(&m, "tcprst_resets_total", &sent), Some(2.0));
    assert_eq!(
        metric(&m, "tcprst_resets_total", &[("direction", "received")]),
        Some(2.0)
    );
    // This kernel has tp_btf with socket storage: the close-mark program and
    // both reset tracepoints run as tp_btf, nothing as a classic tracepoint.
    assert_eq!(
        metric(&m, "tcprst_programs_attached", &[("tier", "tp_btf")]),
        Some(3.0)
    );
    assert_eq!(
        metric(&m, "tcprst_programs_attached", &[("tier", "tracepoint")]),
        Some(0.0)
    );
    // Its reset programs tell softirq by themselves: no softirq programs.
    assert_eq!(
        metric(
            &m,
            "tcprst_programs_attached",
            &[("tier", "raw_tracepoint")]
        ),
        Some(0.0)
    );
    assert_eq!(metric(&m, "tcprst_lost_events_total", &[]), Some(0.0));
    // Every reset's caller frames were read.
    assert_eq!(
        metric(&m, "tcprst_stack_capture_failures_total", &[]),
        Some(0.0)
    );
    assert_eq!(stuck_now(&m, "FIN_WAIT2"), Some(1.0));
    assert_eq!(stuck_now(&m, "CLOSE_WAIT"), Some(1.0));
    assert_eq!(stuck_now(&m, "LAST_ACK"), Some(0.0));
    // The scans that found them, and what they cost: --netns walks one
    // namespace.
    let scans = metric(&m, "tcprst_scans_total", &[]).unwrap();
    assert!(scans >= 2.0, "{scans} scans found a stuck pair");
    assert_eq!(metric(&m, "tcprst_scan_namespaces", &[]), Some(1.0));
    assert_eq!(metric(&m, "tcprst_scan_namespaces_walked", &[]), Some(1.0));
    let seconds = metric(&m, "tcprst_scan_seconds_total", &[]).unwrap();
    assert!(
        seconds > 0.0 && seconds < scans,
        "{scans} scans took {seconds} s"
    );
    drop(pair);
    tracer.stop();
}

/// A scan dumps no namespace whose socket counters show nothing but
/// listeners, since each dump walks the host's whole socket table. Once a
/// connection there half-closes, it is found all the same.
#[test]
fn scans_walk_no_namespace_of_mere_listeners() {
    let ns = Netns::new();
    let (mut tracer, addr) = trace_with_metrics(&ns, &[]);
    let _listeners = (ns.listen("127.0.0.1:8083"), ns.listen("[::1]:8084"));
    let scans = |m: &prometheus_parse::Scrape| metric(m, "tcprst_scans_total", &[]).unwrap();
    let before = scans(&scrape(&addr));
    // The scan after next began after the listeners were made.
    let mut m = scrape(&addr);
    wait_until("two more scans", Duration::from_secs(10), || {
        m = scrape(&addr);
        scans(&m) >= before + 2.0
    });
    assert_eq!(metric(&m, "tcprst_scan_namespaces", &[]), Some(1.0));
    assert_eq!(metric(&m, "tcprst_scan_namespaces_walked", &[]), Some(0.0));

    let pair = half_closed_until_stuck(&ns, &mut tracer, "127.0.0.1:40220", "127.0.0.1:8085");
    let m = scrape(&addr);
    assert_eq!(stuck_now(&m, "FIN_WAIT2"), Some(1.0));
    assert_eq!(stuck_now(&m, "CLOSE_WAIT"), Some(1.0));
    assert_eq!(metric(&m, "tcprst_scan_namespaces_walked", &[]), Some(1.0));
    drop(pair);
    tracer.stop();
}

/// The stuck gauges count what the filters keep, as the stuck reports do:
/// a half-close between addresses `--addr` leaves out is neither. (The
/// scan itself drops what `--port` leaves out; `--addr` is applied after.)
#[test]
fn stuck_gauges_count_only_what_the_filters_keep() {
    let ns = Netns::new();
    let (mut tracer, addr) = trace_with_metrics(&ns, &["--addr", "127.0.0.1"]);
    // Left out, and half-closed first: the scan that finds the kept pair
    // stuck finds this one stuck too.
    let (other_client, other_server) = ns.pair("127.0.0.2:40210", "127.0.0.2:8090");
    other_client.shutdown(std::net::Shutdown::Write).unwrap();
    let kept = half_closed_until_stuck(&ns, &mut tracer, "127.0.0.1:40211", "127.0.0.1:8080");
    let m = scrape(&addr);
    assert_eq!(stuck_now(&m, "FIN_WAIT2"), Some(1.0));
    assert_eq!(stuck_now(&m, "CLOSE_WAIT"), Some(1.0));
    drop((kept, other_client, other_server));
    let (status, records, stderr) = tracer.stop_with(libc::SIGTERM);
    assert!(status.success(), "{stderr}");
    assert!(
        !records
            .iter()
            .any(|v| v["local_port"] == 8090 || v["remote_port"] == 8090),
        "a record of the left-out pair"
    );
}

/// A pair from `client` to `server` whose client half-closed, once tcprst
/// reported both ends stuck.
fn half_closed_until_stuck(
    ns: &Netns,
    tracer: &mut Tracer,
    client: &str,
    server: &str,
) -> (TcpStream, TcpStream) {
    let (client_end, server_end) = ns.pair(client, server);
    client_end.shutdown(std::net::Shutdown::Write).unwrap();
    for (end, addr) in [("server", server), ("client", client)] {
        let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
        tracer.wait_for(&format!("the {end}'s stuck report"), |v| {
            v["kind"] == "halfclose_stuck" && v["local_port"] == port
        });
    }
    (client_end, server_end)
}

/// `tcprst_halfclose_stuck` for `state`: one series, as these tests make
/// connections in no pod.
fn stuck_now(m: &prometheus_parse::Scrape, state: &str) -> Option<f64> {
    metric(m, "tcprst_halfclose_stuck", &[("state", state)])
}
