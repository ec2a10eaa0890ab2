//! The half-close bugs tcprst exists for (shared/seeds 000, 002, 003),
//! reproduced with real sockets and processes in a fresh network namespace.

mod common;

use std::{
    io::{ErrorKind, Write as _},
    net::Shutdown,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use common::{ChildGuard, Netns, Tracer, assert_names_this_close, history_states, is, read_within};
use serde_json::Value;

/// Seed 000: the client half-closes and keeps reading; the peer answers
/// with a reset instead of a FIN (what slirp4netns did).
#[test]
fn seed_000_peer_resets_a_half_closed_connection() {
    let (received, sent) = peer_resets_a_half_closed_connection(&[]);
    // By default: the close from its start, from the kernel's close notes.
    assert_eq!(received, ["ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2"]);
    // The server reset without closing first: nothing noted.
    assert!(sent.is_empty(), "{sent:?}");
}

/// Seed 000 with `--history`: every state change the socket went through,
/// kept in its own storage from the connect on.
#[test]
fn seed_000_with_every_state_change() {
    let (received, sent) = peer_resets_a_half_closed_connection(&["--history"]);
    assert_eq!(
        received,
        ["CLOSE", "SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2"]
    );
    // The server's socket has one too, from its handshake: the sent reset's
    // program reads socket storage as the received one's does.
    assert!(sent.iter().any(|s| s == "ESTABLISHED"), "{sent:?}");
}

/// The seed 000 resets as tcprst traces them with `extra` flags: the
/// received reset's initiator and diagnosis checked, and the states of its
/// history and of the sent reset's returned.
fn peer_resets_a_half_closed_connection(extra: &[&str]) -> (Vec<String>, Vec<String>) {
    let ns = Netns::new();
    let mut tracer = Tracer::in_netns(&ns, extra);
    let (mut client, mut server) = ns.pair("127.0.0.1:43108", "127.0.0.1:9999");
    client.shutdown(Shutdown::Write).unwrap();
    server.write_all(b"Accepted.. sending pulses").unwrap();
    let mut buf = [0u8; 64];
    assert!(read_within(&mut client, &mut buf).unwrap() > 0);
    socket2::SockRef::from(&server)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(server);
    let err = read_within(&mut client, &mut buf).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);

    let rst = tracer.wait_for("the client's rst_received", |v| {
        is(v, "rst_received", 43108, 9999)
    });
    assert_eq!(rst["state"], "FIN_WAIT2");
    assert_eq!(rst["errno"], "ECONNRESET");
    assert_eq!(rst["initiator"]["op"], "shutdown");
    assert_eq!(rst["initiator"]["how"], "SHUT_WR");
    assert_eq!(rst["initiator"]["pid"], std::process::id());
    let diagnosis = rst["diagnosis"].as_str().unwrap();
    assert!(
        diagnosis.starts_with(&format!(
            "the peer reset a connection we half-closed (shutdown(SHUT_WR) by {}[{}],",
            rst["initiator"]["comm"].as_str().unwrap(),
            std::process::id()
        )),
        "{diagnosis}"
    );
    let sent = tracer.wait_for("the server's rst_sent", |v| is(v, "rst_sent", 9999, 43108));
    tracer.stop();
    (history_states(&rst), history_states(&sent))
}

/// Seed 002: a proxy forwards the upstream's FIN with shutdown(SHUT_WR);
/// the app's FIN back never arrives (conntrack expiry, emulated with nft),
/// and the proxy's socket sits in FIN_WAIT2 with no timer to reap it.
#[test]
fn seed_002_proxy_half_close_stuck_in_fin_wait2() {
    let ns = Netns::new();
    let mut tracer = Tracer::in_netns(&ns, &["--stuck-after", "2s"]);
    let upstream = ns.listen("127.0.0.1:7777");
    // socat half-closes like Envoy's TCP proxy: on EOF from one side it
    // shuts down writing towards the other and waits (-t) for it to finish.
    let proxy = ChildGuard(
        Command::new("ip")
            .args(["netns", "exec", &ns.name, "socat", "-t", "600"])
            .args([
                "TCP-LISTEN:15001,bind=127.0.0.1,reuseaddr",
                "TCP:127.0.0.1:7777",
            ])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    ns.wait_listening(15001);
    // The app's FIN to the proxy is lost, as after the conntrack entry expired.
    ns.nft("add table inet tcprst_test");
    ns.nft("add chain inet tcprst_test out { type filter hook output priority 0; }");
    ns.nft(
        "add rule inet tcprst_test out tcp sport 44410 tcp dport 15001 tcp flags & fin == fin drop",
    );

    let mut app = ns.connect("127.0.0.1:44410", "127.0.0.1:15001").unwrap();
    let (upstream_conn, _) = upstream.accept().unwrap();
    drop(upstream_conn); // the upstream service disconnects
    let mut buf = [0u8; 16];
    assert_eq!(
        read_within(&mut app, &mut buf).unwrap(),
        0,
        "the app sees the FIN"
    );
    // The app closes later, as in the incident: its ACK of the proxy's FIN
    // goes out on its own (delayed ACK) instead of riding on its FIN.
    thread::sleep(Duration::from_millis(500));
    drop(app); // its FIN is dropped

    let stuck = tracer.wait_for("the proxy's FIN_WAIT2 stuck report", |v| {
        is(v, "halfclose_stuck", 15001, 44410)
    });
    assert_eq!(stuck["state"], "FIN_WAIT2");
    assert_eq!(stuck["orphaned"], false);
    assert_eq!(stuck["waiting_for"], "peer_fin");
    assert_eq!(stuck["blame"], "peer");
    assert_eq!(stuck["netns"], ns.inode);
    assert_eq!(stuck["age_is_lower_bound"], false);
    assert!(stuck["stuck_for_ms"].as_u64().unwrap() >= 2000);
    let initiator = &stuck["initiator"];
    assert_eq!(initiator["op"], "shutdown");
    assert_eq!(initiator["how"], "SHUT_WR");
    assert_eq!(initiator["pid"], proxy.0.id());
    assert_eq!(initiator["comm"], "socat");
    assert_eq!(stuck["owner"]["pid"], proxy.0.id());
    let diagnosis = stuck["diagnosis"].as_str().unwrap();
    assert!(
        diagnosis.contains(&format!("after shutdown(SHUT_WR) by socat[{}]", proxy.0.id()))
            && diagnosis.ends_with(
                "the peer never sent FIN, and no timer will ever reap this socket because it is not orphaned"
            ),
        "{diagnosis}"
    );
    tracer.stop();
}

/// Seed 003: the client sends FIN; the server holds its socket and never
/// sends one. Both sides are stuck, for different reasons.
#[test]
fn seed_003_peer_never_sends_fin() {
    let ns = Netns::new();
    let mut tracer = Tracer::in_netns(&ns, &["--stuck-after", "1s"]);
    let (client, server) = ns.pair("127.0.0.1:45003", "127.0.0.1:8003");
    client.shutdown(Shutdown::Write).unwrap();

    let client_side = tracer.wait_for("the client's stuck report", |v| {
        is(v, "halfclose_stuck", 45003, 8003)
    });
    assert_eq!(client_side["state"], "FIN_WAIT2");
    assert_eq!(client_side["waiting_for"], "peer_fin");
    assert_eq!(client_side["blame"], "peer");
    assert!(
        client_side["diagnosis"]
            .as_str()
            .unwrap()
            .contains("the peer never sent FIN"),
        "{client_side}"
    );
    let server_side = tracer.wait_for("the server's stuck report", |v| {
        is(v, "halfclose_stuck", 8003, 45003)
    });
    assert_eq!(server_side["state"], "CLOSE_WAIT");
    assert_eq!(server_side["waiting_for"], "local_close");
    assert_eq!(server_side["blame"], "local_process");
    assert_eq!(server_side["owner"]["pid"], std::process::id());
    let diagnosis = server_side["diagnosis"].as_str().unwrap();
    assert!(
        diagnosis.ends_with(&format!(
            "the peer closed, and {}[{}] never closed its socket",
            server_side["owner"]["comm"].as_str().unwrap(),
            std::process::id()
        )),
        "{diagnosis}"
    );
    assert!(server_side["peer_fin_ago_ms"].as_u64().unwrap() >= 1000);

    // The server closes at last: both sides are resolved.
    drop(server);
    let resolved = tracer.wait_for("the client's resolution", |v| {
        is(v, "halfclose_resolved", 45003, 8003)
    });
    assert_eq!(resolved["state"], "FIN_WAIT2");
    assert!(
        resolved["diagnosis"]
            .as_str()
            .unwrap()
            .ends_with("the peer sent FIN at last"),
        "{resolved}"
    );
    let resolved = tracer.wait_for("the server's resolution", |v| {
        is(v, "halfclose_resolved", 8003, 45003)
    });
    assert_eq!(resolved["state"], "CLOSE_WAIT");
    assert!(
        resolved["diagnosis"]
            .as_str()
            .unwrap()
            .ends_with("the application closed its socket"),
        "{resolved}"
    );
    drop(client);
    tracer.stop();
}

/// The client close()s while the server keeps its end open: the client's
/// socket is orphaned in FIN_WAIT2, and the kernel makes it a timewait
/// socket that stays in FIN_WAIT2 for tcp_fin_timeout (60 s here). That
/// step leaves FIN_WAIT2 for CLOSE without the peer's FIN, which is not the
/// end of the close: the report still names the close() that started it.
#[test]
fn an_orphan_in_fin_wait2_is_reported_with_the_close_that_left_it() {
    let ns = Netns::new();
    let mut tracer = Tracer::in_netns(&ns, &["--stuck-after", "1s"]);
    // The close() must be this process's, so both ends live on a thread
    // with a descriptor table of its own until the report is in.
    let orphan = ns.enter_alone(|| {
        let (client, server) = ns.pair("127.0.0.1:45012", "127.0.0.1:8012");
        drop(client);
        let orphan = tracer.wait_for("the orphan's stuck report", |v| {
            is(v, "halfclose_stuck", 45012, 8012)
        });
        drop(server);
        orphan
    });
    assert_eq!(orphan["state"], "FIN_WAIT2");
    assert_eq!(orphan["orphaned"], true);
    assert_eq!(orphan["waiting_for"], "peer_fin");
    let initiator = &orphan["initiator"];
    assert_eq!(initiator["op"], "close", "{orphan}");
    assert_eq!(initiator["pid"], std::process::id());
    assert!(
        orphan["diagnosis"]
            .as_str()
            .unwrap()
            .contains("the socket is orphaned, so the kernel reaps it after tcp_fin_timeout"),
        "{orphan}"
    );
    tracer.stop();
}

/// The client close()s, and the server writes after the client's FIN: the
/// client's kernel resets. Its record comes microseconds after the notes of
/// the close, before the reader's next periodic read of them, and it still
/// names that close.
#[test]
fn data_after_close_names_the_close() {
    let ns = Netns::new();
    let mut tracer = Tracer::in_netns(&ns, &[]);
    // The close() must be this process's: see Netns::enter_alone.
    ns.enter_alone(|| {
        let (client, mut server) = ns.pair("127.0.0.1:45014", "127.0.0.1:8014");
        drop(client);
        let mut buf = [0u8; 8];
        assert_eq!(
            read_within(&mut server, &mut buf).unwrap(),
            0,
            "the client's FIN"
        );
        server.write_all(b"too late").unwrap();
        tracer.wait_for("the client's reset", |v| is(v, "rst_sent", 45014, 8014));
    });
    let events = tracer.stop();
    let reset = events
        .iter()
        .find(|v| is(v, "rst_sent", 45014, 8014))
        .unwrap();
    assert_eq!(reset["reason"], "TCP_ABORT_ON_DATA", "{reset:#}");
    assert_names_this_close(reset);
}

/// A connection half-closed before tracing starts is found with sock_diag
/// and tracked, its age a lower bound: how long its peer has been silent
/// (`tcp_info`), so it is reported at once, not `--stuck-after` later.
#[test]
fn half_closed_before_tracing_is_tracked() {
    let ns = Netns::new();
    let (client, server) = ns.pair("127.0.0.1:45004", "127.0.0.1:8004");
    drop(client);
    let before_tracing = Duration::from_secs(3);
    thread::sleep(before_tracing);

    let mut tracer = Tracer::in_netns(&ns, &["--stuck-after", "1s"]);
    let stuck = tracer.wait_for("the server's stuck report", |v| {
        is(v, "halfclose_stuck", 8004, 45004)
    });
    assert_eq!(stuck["state"], "CLOSE_WAIT");
    assert_eq!(stuck["age_is_lower_bound"], true);
    // Aged from the scan that found it, it would read 1 to 2 s.
    let age = stuck["stuck_for_ms"].as_u64().unwrap();
    assert!(age >= before_tracing.as_millis() as u64, "{stuck}");
    assert_eq!(stuck["owner"]["pid"], std::process::id());
    assert!(
        stuck["diagnosis"]
            .as_str()
            .unwrap()
            .starts_with("CLOSE_WAIT for at least "),
        "{stuck}"
    );
    drop(server);
    tracer.stop();
}

/// `tcprst snapshot` finds a CLOSE_WAIT made before it ran, with its owner,
/// and how long it has been so at least: since the peer's FIN (`tcp_info`).
#[test]
fn snapshot_lists_close_wait_with_its_owner() {
    let ns = Netns::new();
    let (client, server) = ns.pair("127.0.0.1:45005", "127.0.0.1:8005");
    drop(client);
    thread::sleep(Duration::from_millis(1500));

    let out = Command::new(common::TCPRST)
        .args(["snapshot", "-o", "json", "--netns", &ns.name])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let server_row = rows
        .iter()
        .find(|r| r["local_port"] == 8005 && r["remote_port"] == 45005)
        .unwrap_or_else(|| panic!("no CLOSE_WAIT row in {rows:#?}"));
    assert_eq!(server_row["state"], "CLOSE_WAIT");
    assert_eq!(server_row["netns"], ns.inode);
    assert_eq!(server_row["orphaned"], false);
    assert!(
        server_row["owners"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["pid"] == std::process::id()),
        "{server_row}"
    );
    let at_least = server_row["diagnosis"]
        .as_str()
        .unwrap()
        .strip_prefix("CLOSE_WAIT for at least ")
        .and_then(|rest| rest.split_once("s: the peer closed, and "))
        .and_then(|(secs, _)| secs.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("{server_row}"));
    // 1.5 s, in jiffies and rounded to tenths.
    assert!((1.4..10.0).contains(&at_least), "{server_row}");
    let state_for_ms = server_row["state_for_ms"].as_u64().unwrap();
    assert!((1400..10_000).contains(&state_for_ms), "{server_row}");
    // The client closed: its orphaned FIN_WAIT2 lingers too, held by nobody.
    let client_row = rows
        .iter()
        .find(|r| r["local_port"] == 45005)
        .unwrap_or_else(|| panic!("no client row in {rows:#?}"));
    assert_eq!(client_row["state"], "FIN_WAIT2");
    assert_eq!(client_row["orphaned"], true);
    assert!(client_row["owners"].as_array().unwrap().is_empty());
    // The kernel keeps it as a timewait socket, which has no tcp_info.
    assert_eq!(client_row["state_for_ms"], Value::Null);
    drop(server);
}
