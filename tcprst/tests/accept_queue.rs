//! A listener whose application never accepts, and a handshake that ends
//! after its accept queue filled (#14): with net.ipv4.tcp_abort_on_overflow=1
//! the kernel resets the connection and tcprst names the queue; with the
//! default 0 it drops the handshake's last segment, sends nothing, and only
//! a counter tells.
//!
//! A full queue turns SYNs away before any request socket exists, and the
//! kernel keeps no more request sockets than the queue has room for (past
//! that it answers with syncookies, which never overflow into a reset), so a
//! burst of connects to an empty queue cannot overflow it: the request
//! sockets must be made while the queue fills. The server and the client
//! are two namespaces on a veth, and in the client's an nft rule drops pure
//! ACKs to the listener: each handshake waits on the server as a request
//! socket until the client's first data segment, which carries the ACK,
//! ends it, in the order the test writes. (Delaying the ACKs with tc netem
//! would do too, but this kernel has no sch_netem.)

mod common;

use std::{
    fs,
    io::Write as _,
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use common::{
    Netns, Tracer, assert_exact, expect_reset, is, metric, metrics_addr, scrape, wait_until,
};
use socket2::{Domain, Socket, Type};

const PORT: u16 = 8080;
const SERVER: &str = "10.213.0.1:8080";

/// A server namespace with tcp_abort_on_overflow set as asked (it is per
/// namespace), linked to a client namespace that drops its handshakes'
/// last ACKs.
fn namespaces(abort_on_overflow: bool) -> (Netns, Netns) {
    let (server, client) = (Netns::new(), Netns::new());
    server.link(&client);
    let value = if abort_on_overflow { "1" } else { "0" };
    server.enter(|| fs::write("/proc/sys/net/ipv4/tcp_abort_on_overflow", value).unwrap());
    client.nft("add table inet tcprst_test");
    client.nft("add chain inet tcprst_test out { type filter hook output priority 0; }");
    client.nft(&format!(
        "add rule inet tcprst_test out tcp dport {PORT} tcp flags == ack drop"
    ));
    (server, client)
}

/// Three connections to a listener of backlog 1 that never accepts; the
/// third one's handshake ends when the queue holds two, which is full (the
/// kernel queues one more than the backlog). Returns the listener and the
/// clients, from ports 40501, 40502 and 40503.
fn overflow(server: &Netns, client: &Netns) -> (Socket, [TcpStream; 3]) {
    let listener = server.enter(|| {
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        listener
            .bind(&SERVER.parse::<SocketAddr>().unwrap().into())
            .unwrap();
        listener.listen(1).unwrap();
        listener
    });
    // connect() returns at the SYN-ACK; the server keeps a request socket.
    let connect = |port: u16| {
        client
            .connect(&format!("10.213.0.2:{port}"), SERVER)
            .unwrap()
    };
    let queued = |n: u32| {
        wait_until(
            &format!("accept queue of {n}"),
            Duration::from_secs(5),
            || server.accept_queue(PORT) == Some(n),
        )
    };
    let mut first = connect(40501);
    let mut second = connect(40502);
    first.write_all(b"x").unwrap();
    queued(1);
    // Two request sockets were all a backlog of 1 allows; with one of them
    // now queued, this one gets a request socket too.
    let mut third = connect(40503);
    second.write_all(b"x").unwrap();
    queued(2);
    third.write_all(b"x").unwrap();
    (listener, [first, second, third])
}

#[test]
fn a_handshake_ending_at_a_full_queue_is_reset_and_the_queue_named() {
    let (server, client) = namespaces(true);
    let mut tracer = Tracer::start(&["--netns", &server.name]);
    let (_listener, [_first, _second, mut third]) = overflow(&server, &client);
    expect_reset(&mut third);

    let sent = tracer.wait_for("the overflow's reset", |v| is(v, "rst_sent", PORT, 40503));
    // tcp_check_req() sends it for the listener, with the reason 6.18 gives
    // a stray SYN too.
    assert_eq!(sent["caller"], "tcp_check_req", "{sent:#}");
    assert_eq!(sent["cause"], "accept_queue_overflow", "{sent:#}");
    assert_eq!(
        sent["diagnosis"],
        "the accept queue of 10.213.0.1:8080 (backlog 1, 2 waiting) was full: the application accepts too slowly; \
         with tcp_abort_on_overflow=1 the kernel resets instead of dropping",
        "{sent:#}"
    );
    let events = tracer.stop();
    assert_exact(
        &events,
        &[format!(
            "rst_sent 10.213.0.1:8080 -> 10.213.0.2:40503 state=LISTEN reason=INVALID_SYN errno=- netns={}",
            server.inode
        )],
    );
}

#[test]
fn with_the_default_overflows_are_dropped_counted_and_warned_of() {
    let (server, client) = namespaces(false);
    let tracer = Tracer::start(&[
        "--netns",
        &server.name,
        "--metrics-addr",
        "127.0.0.1:0",
        "--stuck-after",
        "1s",
    ]);
    let addr = metrics_addr(&tracer.stderr_text());
    let counted = || {
        metric(
            &scrape(&addr),
            "tcprst_listen_overflows_total",
            &[("netns_name", &server.name)],
        )
    };
    // The scan before tracing started counted the new namespace.
    assert_eq!(counted(), Some(0.0));

    let (_listener, _clients) = overflow(&server, &client);
    let kernel = || server.nstat("TcpExtListenOverflows");
    wait_until("an overflow", Duration::from_secs(5), || kernel() > 0);
    // The third client retransmits into the full queue, each time counted:
    // cut it off so the count holds still.
    client.nft(&format!(
        "add rule inet tcprst_test out tcp dport {PORT} drop"
    ));
    wait_until(
        "the kernel's count in /metrics",
        Duration::from_secs(10),
        || counted() == Some(kernel() as f64),
    );
    wait_until(
        "a warning naming the namespace",
        Duration::from_secs(10),
        || {
            tracer.stderr_text().lines().any(|l| {
                l.contains(&format!("network namespace {}: ", server.name))
                    && l.contains("listen queue overflows")
            })
        },
    );
    let resets = tracer.stop();
    assert!(
        resets.is_empty(),
        "the kernel dropped, and reset nothing: {resets:#?}"
    );
}
