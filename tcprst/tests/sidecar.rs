//! Sidecar blame (#14 item 5, the confusion of cilium/cilium#35485, where
//! a reset the kernel sent for the app's socket was blamed on Envoy): one
//! pod with two containers, an app and a sidecar proxying to it, and a
//! kernel-sent reset for each one's socket. Each must name the container
//! whose socket it is, never the one whose process happened to be running.
//!
//! Both resets are sent in softirq while the *other* container's process
//! runs: on loopback a segment is delivered in the softirq that its
//! sender's send() runs on the way out. So the task running at the app's
//! reset is the sidecar, and at the sidecar's reset it is the app; a tool
//! that blames the running task, or its cgroup, swaps them.
//!
//! The containers are real cgroup v2 directories where the kubelet's
//! cgroupfs driver puts two containers of one pod,
//! `/kubepods/burstable/pod<UID>/<ID>`, each with a real process in it, not
//! containers run by containerd and runc: those need a daemon that CI would
//! have to install and start, and a root filesystem with Python in it, to
//! do the same two steps the test does (make the directory, write the
//! process's pid into its cgroup.procs), and those steps are all tcprst
//! sees (the socket's cgroup id, which is that directory's inode).

mod common;

use std::{
    io::Write as _,
    net::{Shutdown, TcpStream},
};

use common::{Cgroup, ChildGuard, Netns, Tracer, read_within};
use serde_json::Value;

const APP_ID: &str = "a0e1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3e4f5061728394a5b6c7d8e9";
const SIDECAR_ID: &str = "5e1dca4e0b1c2d3e4f5061728394a5b6c7d8e9f0a1b2c3d4e5f60718293a4b5c";
/// Where the app listens (Istio's bookinfo port).
const APP_PORT: u16 = 9080;
/// Where Istio's sidecar takes inbound connections.
const SIDECAR_PORT: u16 = 15006;

/// One connection at a time. A request that starts with "reject" is
/// refused unread: the app shuts the connection down both ways and keeps
/// the socket. Any other is acknowledged at once, read to its end (the
/// sidecar's FIN), and answered a moment later.
fn app_script() -> String {
    format!(
        "\
import socket, time
listener = socket.create_server(('127.0.0.1', {APP_PORT}))
held = []
while True:
    conn, _ = listener.accept()
    held.append(conn)
    if conn.recv(64).startswith(b'reject'):
        conn.shutdown(socket.SHUT_RDWR)
        continue
    conn.sendall(b'continue\\n')
    while conn.recv(4096):
        pass
    # By now the sidecar has finished its shutdown(), so the reply lands
    # in softirq, not in the backlog of a socket the sidecar holds locked.
    time.sleep(0.2)
    try:
        conn.sendall(b'response\\n')
    except OSError:
        pass
"
    )
}

/// A TCP proxy, one upstream connection to the app per downstream one.
/// The app's FIN is passed downstream as a half-close; the client's FIN
/// shuts the upstream connection down both ways, as a proxy does that
/// expects nothing more from it. Sockets are held until the test ends.
fn sidecar_script() -> String {
    format!(
        "\
import socket, threading
listener = socket.create_server(('127.0.0.1', {SIDECAR_PORT}))
held = []
def pump(src, dst, at_end):
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        at_end()
    except OSError:
        pass
while True:
    down, _ = listener.accept()
    up = socket.create_connection(('127.0.0.1', {APP_PORT}))
    held += [down, up]
    threading.Thread(target=pump, args=(down, up, lambda up=up: up.shutdown(socket.SHUT_RDWR))).start()
    threading.Thread(target=pump, args=(up, down, lambda down=down: down.shutdown(socket.SHUT_WR))).start()
"
    )
}

fn read(conn: &mut TcpStream) -> Vec<u8> {
    let mut buf = [0; 64];
    let n = read_within(conn, &mut buf).unwrap();
    buf[..n].to_vec()
}

/// A kernel-sent reset of `container`'s socket, whose holder is `holder`.
fn assert_blames(reset: &Value, cgroup: &Cgroup, container: &str, holder: &ChildGuard) {
    assert_eq!(reset["reason"], "TCP_ABORT_ON_DATA", "{reset:#}");
    assert_eq!(reset["context"], "softirq", "{reset:#}");
    assert!(reset["pid"].is_null(), "softirq blames no task: {reset:#}");
    assert_eq!(reset["cgroup"]["path"], cgroup.path.as_str(), "{reset:#}");
    assert_eq!(reset["container"]["id"], container, "{reset:#}");
    assert_eq!(reset["pod"]["uid"], pod_uid().as_str());
    assert_eq!(reset["pod"]["qos"], "burstable");
    assert_eq!(reset["owner"]["pid"], holder.0.id(), "{reset:#}");
    assert_eq!(reset["owner"]["comm"], "python3");
}

/// `container`'s socket received a reset, and tcprst found who sent it:
/// `sender`'s socket, held by `holder`.
fn assert_heard_from(receipt: &Value, container: &str, sender: &str, holder: &ChildGuard) {
    assert_eq!(receipt["container"]["id"], container, "{receipt:#}");
    assert_eq!(receipt["peer"]["container"]["id"], sender, "{receipt:#}");
    assert_eq!(
        receipt["peer"]["owner"]["pid"],
        holder.0.id(),
        "{receipt:#}"
    );
}

/// Unique to this run, so that a pod left behind by a killed run is not
/// this one.
fn pod_uid() -> String {
    format!("{:08x}-5d1c-4e8a-9f3b-2c6d7e8f9a0b", std::process::id())
}

#[test]
fn each_kernel_reset_names_its_sockets_container() {
    let ns = Netns::new();
    // The pod before its containers, so it is dropped after them.
    let pod = Cgroup::new(&format!("/kubepods/burstable/pod{}", pod_uid()));
    let app_cgroup = Cgroup::new(&format!("{}/{APP_ID}", pod.path));
    let sidecar_cgroup = Cgroup::new(&format!("{}/{SIDECAR_ID}", pod.path));
    // Both ends of the sidecar's upstream connections. Not --netns: that
    // filter would hide from tcprst the sends that tell each receipt who
    // reset it (its peer).
    let mut tracer = Tracer::start(&["--port", &APP_PORT.to_string()]);
    let app = ChildGuard::python(&ns, &app_cgroup, &app_script());
    let sidecar = ChildGuard::python(&ns, &sidecar_cgroup, &sidecar_script());
    ns.wait_listening(APP_PORT);
    ns.wait_listening(SIDECAR_PORT);
    let client = || {
        ns.connect("127.0.0.1:0", &format!("127.0.0.1:{SIDECAR_PORT}"))
            .unwrap()
    };
    // Another test's resets on the same port are not this pod's.
    let here = |v: &Value, kind: &str| v["netns"] == ns.inode && v["kind"] == kind;

    // Both connections exist before either reset: in softirq tcprst finds
    // a socket's holder in a scan of /proc, redone on a miss at most every
    // 100 ms, so the scan made for the first reset must see the second's.
    let mut rejected = client();
    rejected.write_all(b"reject\n").unwrap();
    assert_eq!(read(&mut rejected), b"", "the app's FIN, passed on");
    let mut served = client();
    served.write_all(b"request\n").unwrap();
    assert_eq!(read(&mut served), b"continue\n");

    // (a) The sidecar forwards more of the refused request: the app's
    // socket, shut down for reading, answers data with a reset.
    rejected.write_all(b"body").unwrap();
    let app_reset = tracer.wait_for("the app's reset", |v| {
        here(v, "rst_sent") && v["local_port"] == APP_PORT
    });
    let sidecar_receipt = tracer.wait_for("the sidecar's receipt of it", |v| {
        here(v, "rst_received") && v["local_port"] == app_reset["remote_port"]
    });
    // (b) The client's request ends; the sidecar shuts its upstream
    // connection down both ways, and its socket answers the app's reply
    // with a reset.
    served.shutdown(Shutdown::Write).unwrap();
    let sidecar_reset = tracer.wait_for("the sidecar's reset", |v| {
        here(v, "rst_sent") && v["remote_port"] == APP_PORT
    });
    let app_receipt = tracer.wait_for("the app's receipt of it", |v| {
        here(v, "rst_received") && v["remote_port"] == sidecar_reset["local_port"]
    });
    let records = tracer.stop();

    assert_blames(&app_reset, &app_cgroup, APP_ID, &app);
    assert_heard_from(&sidecar_receipt, SIDECAR_ID, APP_ID, &app);
    assert_blames(&sidecar_reset, &sidecar_cgroup, SIDECAR_ID, &sidecar);
    assert_heard_from(&app_receipt, APP_ID, SIDECAR_ID, &sidecar);
    // Every record of the pod names the container of its own socket (the
    // app's listens on APP_PORT, the sidecar's connect to it), and in
    // softirq the process holding it. That includes the receipt the kernel
    // reports for each aborting socket itself (tcp_reset() on it).
    for record in records.iter().filter(|v| v["netns"] == ns.inode) {
        let (container, holder) = if record["local_port"] == APP_PORT {
            (APP_ID, &app)
        } else {
            (SIDECAR_ID, &sidecar)
        };
        assert_eq!(record["container"]["id"], container, "{record:#}");
        if record["context"] == "softirq" {
            assert_eq!(record["owner"]["pid"], holder.0.id(), "{record:#}");
        }
    }
}
