//! `tcprst trace` against real resets, each test in its own network
//! namespace so that parallel tests never see each other's events. The
//! resets are the scenarios of tcprst-loadgen's table, which vm-test runs
//! on other kernels: made the same way, and held to the same records.

mod common;

use common::{
    Netns, Tracer, assert_exact, assert_names_this_close, expect_reset, find, rsts, summary_count,
};
use serde_json::Value;
use tcprst_loadgen::scenario::{self, ACTIVE_REASONS_SINCE, Scenario};

/// A connect() from `from` to `to`, where nothing listens: it must fail
/// with ECONNREFUSED.
fn closed_port(ns: &Netns, from: &str, to: &str) {
    let (from, to) = (from.parse().unwrap(), to.parse().unwrap());
    ns.enter(|| scenario::refused(from, to)).unwrap();
}

/// Makes scenario `name`'s reset in `ns` between exactly these ends, and
/// returns the scenario. Its sockets stay out of the descriptor tables of
/// the processes that parallel tests spawn, so that the close that resets
/// is this process's.
fn make(ns: &Netns, name: &str, client: &str, server: &str) -> &'static Scenario {
    let scenario = Scenario::named(name).unwrap();
    let (client, server) = (client.parse().unwrap(), server.parse().unwrap());
    ns.enter_alone(|| scenario.make_between(client, server))
        .unwrap();
    scenario
}

/// The two records `scenario` must produce between these ends in namespace
/// `netns`, with reasons as kernels since 6.11 give them.
fn expected(scenario: &Scenario, client: &str, server: &str, netns: u32) -> Vec<String> {
    let (client, server) = (client.parse().unwrap(), server.parse().unwrap());
    let (sender, receiver) = scenario.sender_and_receiver(client, server);
    let state = scenario.state.unwrap_or("-");
    let reason = scenario.reason.on(ACTIVE_REASONS_SINCE).unwrap_or("-");
    let (received_state, errno) = scenario.received;
    vec![
        format!(
            "rst_sent {sender} -> {receiver} state={state} reason={reason} errno=- netns={netns}"
        ),
        format!(
            "rst_received {receiver} -> {sender} state={received_state} reason=- errno={errno} netns={netns}"
        ),
    ]
}

/// Traces scenario `name`'s reset between these ends, in a namespace of its
/// own, and holds its two records, and the sent one's caller and context, to
/// the table. Returns them, and tcprst's stderr.
fn traced_with_stderr(name: &str, client: &str, server: &str) -> (Vec<Value>, String) {
    let ns = Netns::new();
    let mut tracer = Tracer::in_netns(&ns, &[]);
    let scenario = make(&ns, name, client, server);
    tracer.wait_for_rsts(2);
    let (status, seen, stderr) = tracer.stop_with(libc::SIGTERM);
    assert!(status.success(), "tcprst exited with {status}: {stderr}");
    let events: Vec<Value> = rsts(&seen).into_iter().cloned().collect();
    assert_exact(&events, &expected(scenario, client, server, ns.inode));
    let sent = find(&events, "rst_sent");
    assert_eq!(sent["caller"], scenario.caller);
    assert_eq!(sent["context"], scenario.context);
    (events, stderr)
}

fn traced(name: &str, client: &str, server: &str) -> Vec<Value> {
    traced_with_stderr(name, client, server).0
}

/// A connect() to a closed port: the stack answers the SYN with a reset
/// (carrying the offending SYN's tuple, reversed), and the client learns
/// ECONNREFUSED.
fn closed_port_resets(client: &str, server: &str) -> Vec<Value> {
    let name = if server.starts_with('[') {
        "closed-port6"
    } else {
        "closed-port"
    };
    let events = traced(name, client, server);
    assert!(find(&events, "rst_received")["socket_cookie"].is_u64());
    // Sent while the stack handled the SYN: nobody's process to blame.
    let sent = find(&events, "rst_sent");
    assert!(sent["pid"].is_null() && sent["comm"].is_null());
    events
}

#[test]
fn closed_port_ipv4() {
    let events = closed_port_resets("127.0.0.1:40001", "127.0.0.1:9");
    assert_eq!(find(&events, "rst_sent")["family"], "ipv4");
}

/// Callers come from the few frames each record carries; `--stack` adds
/// the whole stack, innermost first, which the caller is part of.
#[test]
fn whole_stacks_only_with_the_stack_flag() {
    let ns = Netns::new();
    let mut tracer = Tracer::in_netns(&ns, &["--stack"]);
    closed_port(&ns, "127.0.0.1:40003", "127.0.0.1:9");
    tracer.wait_for_rsts(2);
    let events = tracer.stop();
    let sent = find(&events, "rst_sent");
    assert_eq!(sent["caller"], "tcp_v4_rcv");
    let frames: Vec<&str> = sent["stack"]
        .as_array()
        .unwrap_or_else(|| panic!("no stack: {sent:#}"))
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    let send = frames.iter().position(|f| *f == "tcp_v4_send_reset");
    let rcv = frames.iter().position(|f| *f == "tcp_v4_rcv");
    assert!(
        matches!((send, rcv), (Some(s), Some(r)) if s < r),
        "{frames:?}"
    );
    let events = closed_port_resets("127.0.0.1:40004", "127.0.0.1:9");
    assert!(find(&events, "rst_sent")["stack"].is_null());
}

#[test]
fn closed_port_ipv6() {
    let events = closed_port_resets("[::1]:40001", "[::1]:9");
    assert_eq!(find(&events, "rst_sent")["family"], "ipv6");
}

/// close() with unread data: the closer aborts the connection.
fn close_with_unread_data(server: &str, client: &str) {
    let events = traced("abort-on-close", client, server);
    // The closing thread sent it, in process context.
    let sent = find(&events, "rst_sent");
    assert_eq!(sent["pid"], std::process::id());
    assert_eq!(sent["uid"], 0);
}

#[test]
fn close_with_unread_data_ipv4() {
    close_with_unread_data("127.0.0.1:5000", "127.0.0.1:40002");
}

#[test]
fn close_with_unread_data_ipv6() {
    close_with_unread_data("[::1]:5000", "[::1]:40002");
}

#[test]
fn linger_zero_close_is_an_active_reset() {
    let events = traced("linger0", "127.0.0.1:40003", "127.0.0.1:5001");
    assert_eq!(find(&events, "rst_sent")["pid"], std::process::id());
}

/// The client close()s, and the server writes once the client's socket
/// has become a timewait socket: the kernel resets from it. The timewait
/// socket keeps the closed socket's cookie, which names the close.
#[test]
fn data_to_a_timewait_socket_names_the_close() {
    let events = traced("timewait-data", "127.0.0.1:40005", "127.0.0.1:5002");
    assert_names_this_close(find(&events, "rst_sent"));
}

/// Data to a socket shut down both ways: the kernel aborts it and resets
/// the peer. The abort fires tcp:tcp_receive_reset too, for a reset that
/// never arrived: tcprst shows only the reset sent (`traced` holds the
/// records to exactly the two on the wire) and counts the other.
#[test]
fn data_after_shutdown_shows_only_the_reset_sent() {
    let (events, stderr) = traced_with_stderr("shutdown-data", "127.0.0.1:40006", "127.0.0.1:5003");
    let sent = find(&events, "rst_sent");
    assert_eq!(sent["cause"], "data_after_close", "{sent:#}");
    assert_eq!(sent["initiator"]["op"], "shutdown", "{sent:#}");
    assert_eq!(sent["initiator"]["how"], "SHUT_RDWR", "{sent:#}");
    let phantoms = summary_count(
        &stderr,
        " received resets that were the kernel's own aborts",
    );
    assert_eq!(phantoms, 1, "{stderr}");
}

/// A listener on `server` closed while `client`'s connection waits in its
/// accept queue: the kernel resets that connection.
fn close_listener_with_queued(ns: &Netns, client: &str, server: &str) {
    let listener = ns.listen(server);
    let mut client = ns.connect(client, server).unwrap();
    drop(listener);
    expect_reset(&mut client);
}

/// A server that closes its listener with a connection still queued:
/// the kernel resets it, which is not the application's abortive close.
#[test]
fn a_listener_closed_with_a_queued_connection() {
    let ns = Netns::new();
    let mut tracer = Tracer::in_netns(&ns, &[]);
    close_listener_with_queued(&ns, "127.0.0.1:40009", "127.0.0.1:5004");
    tracer.wait_for_rsts(2);
    let events = tracer.stop();
    let sent = find(&events, "rst_sent");
    assert_eq!(sent["cause"], "listener_closed", "{sent:#}");
    let diagnosis = sent["diagnosis"].as_str().unwrap();
    assert!(
        diagnosis.starts_with("the listener on 127.0.0.1:5004 closed (close() by "),
        "{diagnosis}"
    );
    assert!(diagnosis.contains("never accepted"), "{diagnosis}");
    assert_eq!(find(&events, "rst_received")["cause"], "peer_aborted");
}

/// A close() with SO_LINGER 0 and a listener closing its accept queue both
/// reset through tcp_disconnect, with reason TCP_STATE, in CLOSE, from a
/// process, and only the frames name the listener: its reset right after a
/// linger-0 close must not be given the frames the kernel kept from that
/// one (the cache tells them apart by the queued socket being orphaned).
#[test]
fn a_listener_closed_right_after_a_linger_zero_close_is_still_the_listener() {
    let ns = Netns::new();
    let mut tracer = Tracer::in_netns(&ns, &[]);
    make(&ns, "linger0", "127.0.0.1:40010", "127.0.0.1:5005");
    tracer.wait_for_rsts(2);
    close_listener_with_queued(&ns, "127.0.0.1:40011", "127.0.0.1:5006");
    tracer.wait_for_rsts(4);
    let events = tracer.stop();
    let sent_from = |port: u16| {
        events
            .iter()
            .find(|v| v["kind"] == "rst_sent" && v["local_port"] == port)
            .unwrap_or_else(|| panic!("no reset sent from port {port} in {events:#?}"))
    };
    assert_eq!(sent_from(40010)["cause"], "abortive_close");
    assert_eq!(
        sent_from(5006)["cause"],
        "listener_closed",
        "{:#}",
        sent_from(5006)
    );
}

#[test]
fn port_filter_excludes_other_ports() {
    let ns = Netns::new();
    let mut tracer = Tracer::in_netns(&ns, &["--port", "5003"]);
    // First a reset the filter must drop, then one it must keep: when the
    // second has arrived, the first would have too.
    closed_port(&ns, "127.0.0.1:40004", "127.0.0.1:5002");
    closed_port(&ns, "127.0.0.1:40005", "127.0.0.1:5003");
    tracer.wait_for_rsts(2);
    let events = tracer.stop();
    let n = ns.inode;
    assert_exact(
        &events,
        &[
            format!(
                "rst_sent 127.0.0.1:5003 -> 127.0.0.1:40005 state=- reason=NO_SOCKET errno=- netns={n}"
            ),
            format!(
                "rst_received 127.0.0.1:40005 -> 127.0.0.1:5003 state=SYN_SENT reason=- errno=ECONNREFUSED netns={n}"
            ),
        ],
    );
}

#[test]
fn kind_addr_and_family_filters() {
    let ns = Netns::new();
    let mut tracer = Tracer::in_netns(&ns, &["--kind", "rst_received", "--addr", "::1", "-6"]);
    closed_port(&ns, "127.0.0.1:40006", "127.0.0.1:9");
    closed_port(&ns, "[::1]:40006", "[::1]:9");
    tracer.wait_for_rsts(1);
    let events = tracer.stop();
    let n = ns.inode;
    assert_exact(
        &events,
        &[format!(
            "rst_received [::1]:40006 -> [::1]:9 state=SYN_SENT reason=- errno=ECONNREFUSED netns={n}"
        )],
    );
}

#[test]
fn netns_filter_excludes_other_namespaces() {
    let watched = Netns::new();
    let other = Netns::new();
    let mut tracer = Tracer::start(&["--netns", &watched.name]);
    closed_port(&other, "127.0.0.1:40007", "127.0.0.1:9");
    closed_port(&watched, "127.0.0.1:40008", "127.0.0.1:9");
    tracer.wait_for_rsts(2);
    let events = tracer.stop();
    assert_eq!(events.len(), 2, "{events:#?}");
    assert!(
        events
            .iter()
            .all(|e| e["netns"] == watched.inode && e["remote_port"] != 40007)
    );
}
