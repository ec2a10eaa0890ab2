//! Resets across NAT and conntrack (#14): a client, a router and a server
//! in three namespaces, the router DNAT'ing a "service" address to the
//! server as kube-proxy does.
//!
//! - A reset the server's stack sends crosses the router's DNAT and
//!   masquerade: the client receives it from the service address, so the
//!   two records' ends do not mirror each other. tcprst finds the router's
//!   conntrack entry and matches them through its reply tuple.
//! - A server segment far outside the window: conntrack marks it INVALID,
//!   so it is not un-DNAT'ed, reaches the client from the server's own
//!   address, and the client's stack answers NO_SOCKET (kubernetes#74839).
//! - The same segment, where the router rejects INVALID packets with a
//!   reset (`ct state invalid reject`): the reset reaches the server in the
//!   client's name, and no socket sent it.

mod common;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpStream,
    process::{Command, Stdio},
    time::Duration,
};

use common::{Netns, Tracer};

const SERVICE: &str = "10.96.0.10:80";
const BACKEND: &str = "10.221.2.2:8080";

/// Client (10.221.1.2), router, server (10.221.2.2); the router DNATs
/// the service address to the server, and with `masquerade` also SNATs
/// what it forwards to the server to its own address, 10.221.2.1.
fn service(masquerade: bool) -> (Netns, Netns, Netns) {
    let (client, router, server) = (Netns::new(), Netns::new(), Netns::new());
    router.route_between(&client, &server);
    router.nft("add table ip tcprst_nat");
    router.nft("add chain ip tcprst_nat pre { type nat hook prerouting priority -100; }");
    router.nft(&format!(
        "add rule ip tcprst_nat pre ip daddr 10.96.0.10 tcp dport 80 dnat to {BACKEND}"
    ));
    if masquerade {
        router.nft("add chain ip tcprst_nat post { type nat hook postrouting priority 100; }");
        router.nft("add rule ip tcprst_nat post ip daddr 10.221.2.2 masquerade");
    }
    // Out-of-window segments are INVALID, not let through (the default,
    // set here so the test does not depend on the host's).
    router.enter(|| {
        std::fs::write("/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal", "0").unwrap()
    });
    (client, router, server)
}

fn tuple(v: &serde_json::Value) -> (String, String) {
    (
        v["src"].as_str().unwrap().to_owned(),
        v["dst"].as_str().unwrap().to_owned(),
    )
}

#[test]
fn a_reset_across_dnat_and_masquerade_is_matched_to_its_sender() {
    let (client, router, server) = service(true);
    // Masquerade keeps the client's port, which is all the filter sees of
    // the server's end of the connection.
    let mut tracer = Tracer::start(&["--port", "40700"]);
    let listener = server.listen(BACKEND);
    let _conn = client.connect("10.221.1.2:40700", SERVICE).unwrap();
    let (accepted, from) = listener.accept().unwrap();
    assert_eq!(from.to_string(), "10.221.2.1:40700", "masqueraded");
    socket2::SockRef::from(&accepted)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(accepted);

    let sent = tracer.wait_for("the server's reset", |v| {
        v["kind"] == "rst_sent" && v["local_port"] == 8080
    });
    assert_eq!(sent["remote_addr"], "10.221.2.1", "{sent:#}");
    let received = tracer.wait_for("the client's reset", |v| {
        v["kind"] == "rst_received" && v["local_port"] == 40700
    });
    assert_eq!(received["remote_addr"], "10.96.0.10", "{received:#}");
    assert_eq!(received["origin"], "this host's TCP stack", "{received:#}");
    assert_eq!(received["peer"]["netns"], server.inode, "{received:#}");
    // Both witnesses carry the router's entry: the sender's reset through
    // its reply direction, the receiver's through its original one.
    for record in [&sent, &received] {
        let nat = &record["nat"];
        assert_eq!(nat["netns"], router.inode, "{record:#}");
        assert_eq!(nat["netns_name"], router.name.as_str(), "{record:#}");
        assert_eq!(
            tuple(&nat["original"]),
            ("10.221.1.2:40700".into(), SERVICE.into()),
            "{record:#}"
        );
        assert_eq!(
            tuple(&nat["reply"]),
            (BACKEND.into(), "10.221.2.1:40700".into()),
            "{record:#}"
        );
    }
    let (status, _, stderr) = tracer.stop_with(libc::SIGTERM);
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains(" 0 conntrack lookups failed"), "{stderr}");
}

/// Makes the server's socket `accepted` send a segment to the client's
/// port `client_port`, and sends a copy of it far out of window.
fn out_of_window(server: &Netns, accepted: &mut TcpStream, client_port: u16) {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/scripts/out_of_window.py"
    );
    let mut raw = Command::new("ip")
        .args(["netns", "exec", &server.name, "python3", script])
        .args(["10.221.2.2", "8080", "10.221.1.2", &client_port.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = BufReader::new(raw.stdout.take().unwrap()).lines();
    assert_eq!(said.next().unwrap().unwrap(), "ready");
    // The segment the script copies.
    accepted.write_all(b"x").unwrap();
    assert_eq!(said.next().unwrap().unwrap(), "sent");
    assert!(raw.wait().unwrap().success());
}

#[test]
fn a_segment_that_escaped_reverse_nat_is_named_in_the_clients_reset() {
    let (client, _router, server) = service(false);
    let mut tracer = Tracer::start(&["--port", "40710"]);
    let listener = server.listen(BACKEND);
    let _conn = client.connect("10.221.1.2:40710", SERVICE).unwrap();
    let (mut accepted, from) = listener.accept().unwrap();
    assert_eq!(from.to_string(), "10.221.1.2:40710", "not masqueraded");

    out_of_window(&server, &mut accepted, 40710);

    let sent = tracer.wait_for("the client's NO_SOCKET reset", |v| {
        v["kind"] == "rst_sent" && v["local_port"] == 40710
    });
    assert_eq!(sent["netns"], client.inode, "{sent:#}");
    assert_eq!(sent["reason"], "NO_SOCKET", "{sent:#}");
    assert_eq!(sent["remote_addr"], "10.221.2.2", "{sent:#}");
    assert_eq!(sent["cause"], "nat_escaped", "{sent:#}");
    assert_eq!(
        sent["diagnosis"],
        "a segment from 10.221.2.2:8080 matched no socket here, but conntrack has a NAT'd connection \
         whose reply tuple it fits (10.221.1.2:40710 -> 10.96.0.10:80): conntrack marked it INVALID \
         and it escaped reverse NAT; drop INVALID packets, or set nf_conntrack_tcp_be_liberal",
        "{sent:#}"
    );
    assert_eq!(
        tuple(&sent["nat"]["reply"]),
        (BACKEND.into(), "10.221.1.2:40710".into())
    );
    tracer.stop();
}

#[test]
fn a_reset_a_conntrack_reject_rule_sent_is_told_apart_from_the_stack() {
    let (client, router, server) = service(false);
    router.nft("add table inet tcprst_ct");
    router.nft("add chain inet tcprst_ct forwarded { type filter hook forward priority 0; }");
    router.nft("add rule inet tcprst_ct forwarded ct state invalid reject with tcp reset");
    let mut tracer = Tracer::start(&["--port", "40720"]);
    let listener = server.listen(BACKEND);
    // Straight to the server, no NAT: the router only routes and tracks.
    let _conn = client.connect("10.221.1.2:40720", BACKEND).unwrap();
    let (mut accepted, _) = listener.accept().unwrap();
    out_of_window(&server, &mut accepted, 40720);

    let received = tracer.wait_for("the server's reset", |v| {
        v["kind"] == "rst_received" && v["local_port"] == 8080
    });
    assert_eq!(received["netns"], server.inode, "{received:#}");
    assert_eq!(received["remote_addr"], "10.221.1.2", "{received:#}");
    assert_eq!(
        received["origin"], "not a local TCP socket (netfilter, middlebox or userspace stack)",
        "{received:#}"
    );
    assert_eq!(
        received["cause"], "conntrack_invalid_rejected",
        "{received:#}"
    );
    let diagnosis = received["diagnosis"].as_str().unwrap();
    assert!(
        diagnosis.starts_with(&format!(
            "no socket on this host sent this reset, but conntrack in {} tracks this connection",
            router.name
        )),
        "{diagnosis}"
    );
    assert!(
        diagnosis.contains("answered one in 10.221.1.2:40720's name"),
        "{diagnosis}"
    );
    // Conntrack saw no NAT here.
    assert_eq!(received["nat"], serde_json::Value::Null, "{received:#}");
    let events = tracer.stop();
    assert!(
        !events.iter().any(|v| v["kind"] == "rst_sent"),
        "the client's stack sent nothing: {events:#?}"
    );
}
