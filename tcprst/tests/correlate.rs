//! Records from different nodes join up: two "nodes" (namespaces) each
//! traced by their own tcprst with their own NODE_NAME, joined through a
//! router namespace. `tcprst correlate` pairs node-a's receipt with
//! node-b's send, and calls a reset the router injected (an nft
//! `reject with tcp reset`) sent by none of the nodes.

mod common;

use std::{io::ErrorKind, process::Command};

use common::{Netns, TCPRST, Tracer};
use serde_json::Value;

fn ndjson(records: &[Value]) -> String {
    records.iter().map(|r| format!("{r}\n")).collect()
}

#[test]
fn a_receipt_on_one_node_pairs_with_the_send_on_another() {
    let (a, router, b) = (Netns::new(), Netns::new(), Netns::new());
    router.route_between(&a, &b);
    router.nft("add table inet tcprst_test");
    router.nft("add chain inet tcprst_test forwarded { type filter hook forward priority 0; }");
    router.nft("add rule inet tcprst_test forwarded tcp dport 5031 reject with tcp reset");
    let mut on_a = Tracer::on_node("node-a", &["--netns", &a.name]);
    let mut on_b = Tracer::on_node("node-b", &["--netns", &b.name]);

    // node-b's stack refuses; the router refuses on node-b's behalf.
    for (from, to) in [
        ("10.221.1.2:40600", "10.221.2.2:5030"),
        ("10.221.1.2:40601", "10.221.2.2:5031"),
    ] {
        let err = a.connect(from, to).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{to}");
    }
    on_a.wait_for("the second receipt", |v| {
        v["kind"] == "rst_received" && v["local_port"] == 40601
    });
    on_b.wait_for("node-b's send", |v| v["kind"] == "rst_sent");
    let dir = std::env::temp_dir().join(format!("tcprst-correlate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (log_a, log_b) = (dir.join("node-a.ndjson"), dir.join("node-b.ndjson"));
    std::fs::write(&log_a, ndjson(&on_a.stop())).unwrap();
    std::fs::write(&log_b, ndjson(&on_b.stop())).unwrap();

    let out = Command::new(TCPRST)
        .arg("correlate")
        .args([&log_a, &log_b])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    let line_of = |port: &str| {
        *lines
            .iter()
            .find(|l| l.contains(port))
            .unwrap_or_else(|| panic!("no line for {port}: {stdout}"))
    };
    let paired = line_of("10.221.1.2:40600 <- 10.221.2.2:5030");
    assert!(paired.contains("received on node-a"), "{paired}");
    assert!(paired.contains("sent by node-b (NO_SOCKET"), "{paired}");
    let injected = line_of("10.221.1.2:40601 <- 10.221.2.2:5031");
    assert!(
        injected.ends_with(
            "sent by none of these nodes: a middlebox, a load balancer, or an untraced host"
        ),
        "{injected}"
    );
    assert!(
        stderr
            .contains("2 received resets: 1 paired with their send, 1 sent by none of these nodes"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_line_that_is_not_json_is_a_clear_error() {
    let path = std::env::temp_dir().join(format!("tcprst-correlate-bad-{}", std::process::id()));
    std::fs::write(&path, "{\"kind\":\"lost\"}\nnot json\n").unwrap();
    let out = Command::new(TCPRST)
        .arg("correlate")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(":2: not a tcprst JSON record"), "{stderr}");
    std::fs::remove_file(&path).unwrap();
}
