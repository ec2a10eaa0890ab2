//! Connection state lives in the kernel: a connection that ends well costs
//! no record, stuck half-closes are found in the kernel's own socket table
//! however many other connections come and go, and a record the ring buffer
//! dropped cannot invent a stuck connection.

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream},
    thread,
    time::Duration,
};

use common::{Netns, Tracer, is, records_read, send_signal};
use socket2::{Domain, Socket, Type};

/// Connections that each end well: the client sends, shuts down writing,
/// reads to the server's FIN and closes; the server reads to EOF and closes.
/// Clients come from 200 loopback addresses so ports never run out.
fn churn(ns: &Netns, port: u16, connections: u32) {
    let listener = ns.listen(&format!("127.0.0.1:{port}"));
    let server = thread::spawn(move || {
        for _ in 0..connections {
            let (mut conn, _) = listener.accept().unwrap();
            let mut sink = Vec::new();
            conn.read_to_end(&mut sink).unwrap();
        }
    });
    let to: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    ns.enter(|| {
        for i in 0..connections {
            let from = SocketAddr::from((Ipv4Addr::new(127, 1, 0, (i % 200) as u8 + 1), 0));
            let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            sock.bind(&from.into()).unwrap();
            sock.connect(&to.into()).unwrap();
            let mut conn: TcpStream = sock.into();
            conn.write_all(&[7; 64]).unwrap();
            conn.shutdown(Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            conn.read_to_end(&mut rest).unwrap();
        }
    });
    server.join().unwrap();
}

#[test]
fn connections_that_end_well_cost_no_records() {
    let ns = Netns::new();
    let tracer = Tracer::start(&["--netns", &ns.name]);
    churn(&ns, 8100, 10_000);
    let (status, records, stderr) = tracer.stop_with(libc::SIGTERM);
    assert!(status.success(), "{stderr}");
    assert_eq!(records_read(&stderr), 0, "{stderr}");
    assert!(records.is_empty(), "{records:#?}");
}

#[test]
fn stuck_half_closes_survive_heavy_churn() {
    let ns = Netns::new();
    let mut tracer = Tracer::start(&["--netns", &ns.name, "--stuck-after", "2s"]);
    let (client, server) = ns.pair("127.0.0.1:45010", "127.0.0.1:8010");
    client.shutdown(Shutdown::Write).unwrap();
    // 100,000 more sockets come and go: more than the old tracker held.
    churn(&ns, 8101, 50_000);

    let fin_wait2 = tracer.wait_for("the client's stuck report", |v| {
        is(v, "halfclose_stuck", 45010, 8010)
    });
    assert_eq!(fin_wait2["state"], "FIN_WAIT2");
    assert_eq!(fin_wait2["initiator"]["op"], "shutdown");
    assert_eq!(fin_wait2["initiator"]["how"], "SHUT_WR");
    assert_eq!(fin_wait2["initiator"]["pid"], std::process::id());
    assert_eq!(fin_wait2["age_is_lower_bound"], false);
    assert!(
        fin_wait2["diagnosis"]
            .as_str()
            .unwrap()
            .ends_with("the peer never sent FIN, and no timer will ever reap this socket because it is not orphaned"),
        "{fin_wait2}"
    );
    let close_wait = tracer.wait_for("the server's stuck report", |v| {
        is(v, "halfclose_stuck", 8010, 45010)
    });
    assert_eq!(close_wait["state"], "CLOSE_WAIT");
    assert_eq!(close_wait["owner"]["pid"], std::process::id());
    assert_eq!(close_wait["waiting_for"], "local_close");
    drop((client, server));
    tracer.stop();
}

/// The ring buffer overflows while a half-closed connection ends: nothing
/// about its end reaches userspace, and it must not be reported stuck.
#[test]
fn a_close_lost_with_the_ring_buffer_is_not_reported_stuck() {
    let ns = Netns::new();
    let tracer = Tracer::start(&[
        "--netns",
        &ns.name,
        "--stuck-after",
        "2s",
        "--buffer-pages",
        "1",
    ]);
    let (client, server) = ns.pair("127.0.0.1:45011", "127.0.0.1:8011");
    client.shutdown(Shutdown::Write).unwrap();
    // Long enough for a scan to see it half-closed.
    thread::sleep(Duration::from_millis(1500));
    send_signal(tracer.pid(), libc::SIGSTOP);
    for i in 0..500 {
        let from = format!("127.0.0.1:{}", 21000 + i);
        assert!(ns.connect(&from, "127.0.0.1:9").is_err());
    }
    drop((client, server));
    thread::sleep(Duration::from_millis(2500));
    send_signal(tracer.pid(), libc::SIGCONT);
    thread::sleep(Duration::from_millis(2500));
    let (status, records, stderr) = tracer.stop_with(libc::SIGTERM);
    assert!(status.success(), "{stderr}");
    let lost: u64 = records
        .iter()
        .filter(|r| r["kind"] == "lost")
        .map(|r| r["lost"].as_u64().unwrap())
        .sum();
    assert!(lost > 0, "the ring buffer never overflowed: {stderr}");
    let phantom: Vec<_> = records
        .iter()
        .filter(|r| r["kind"] == "halfclose_stuck")
        .collect();
    assert!(phantom.is_empty(), "{phantom:#?}");
}
