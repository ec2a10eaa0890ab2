//! A peer that lost a connection's state answers our next segment with a
//! reset of its own, NO_SOCKET: a restarted server, or a pod rescheduled
//! behind the same address. Seen on this host from both ends, the received
//! reset says so. The server's socket is made to vanish silently: it closes
//! with SO_LINGER 0 while an nft rule drops its reset, so only the client's
//! next segment finds out.

mod common;

use std::{io::Write as _, time::Duration};

use common::{Netns, Tracer};

#[test]
fn a_reset_from_a_peer_without_the_socket_says_it_lost_state() {
    let (client_ns, server_ns) = (Netns::new(), Netns::new());
    client_ns.link(&server_ns);
    // No --netns: matching a receipt with its send needs both namespaces.
    let mut tracer = Tracer::start(&["--port", "5020"]);
    let listener = server_ns.listen("10.213.0.2:5020");
    let mut client = client_ns
        .connect("10.213.0.1:40500", "10.213.0.2:5020")
        .unwrap();
    let (server, _) = listener.accept().unwrap();
    server_ns.nft("add table inet tcprst_test");
    server_ns.nft("add chain inet tcprst_test out { type filter hook output priority 0; }");
    server_ns.nft("add rule inet tcprst_test out tcp flags rst drop");
    socket2::SockRef::from(&server)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(server);
    drop(listener);
    server_ns.nft("delete table inet tcprst_test");
    client.write_all(b"anyone there?").unwrap();
    let received = tracer.wait_for("the client's reset", |v| {
        v["kind"] == "rst_received" && v["local_port"] == 40500
    });
    assert_eq!(received["state"], "ESTABLISHED");
    assert_eq!(received["cause"], "peer_lost_state", "{received:#}");
    assert!(
        received["diagnosis"]
            .as_str()
            .unwrap()
            .starts_with("the peer 10.213.0.2:5020 had no socket for this open connection"),
        "{received:#}"
    );
    assert_eq!(received["peer"]["netns"], server_ns.inode);
    tracer.stop();
}
