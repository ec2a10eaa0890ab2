//! Whose socket reset: real cgroup v2 directories named exactly as each
//! container runtime names them, a process in each inside its own network
//! namespace, and a reset its socket sends from softirq (a keepalive
//! timeout), where the running task has nothing to do with it.
//!
//! These are the systemd cgroup driver's layouts, which real runtimes make
//! only under systemd, which this host does not run; runtimes.rs runs real
//! dockerd and containerd for the cgroupfs driver's layouts.

mod common;

use std::time::Duration;

use common::{Cgroup, ChildGuard, Netns, Tracer, run};
use serde_json::Value;

const ID: &str = "5f3a9c1e2b4d6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708";
const POD: &str = "7c9e6679-7425-40de-944b-e07fc1f90ae7";

/// A cgroup for one fake container under a directory of this test's own,
/// so tests running at once never share one.
fn container_cgroup(test: &str, runtime_path: &str) -> Cgroup {
    Cgroup::new(&format!(
        "/tcprst-test-{}-{test}/{runtime_path}",
        std::process::id()
    ))
}

/// A client that joins `cgroup` before it execs (so its socket is created
/// there), connects from 127.0.0.1:`port`+1, keeps the connection alive with
/// one-second keepalive probes, and holds its socket after the reset: tcprst
/// names a socket's owner from the process holding it when it looks.
fn container_client(ns: &Netns, cgroup: &Cgroup, port: u16) -> ChildGuard {
    container_client_to(ns, cgroup, "127.0.0.1", "127.0.0.1", port)
}

fn container_client_to(ns: &Netns, cgroup: &Cgroup, from: &str, to: &str, port: u16) -> ChildGuard {
    let client = format!(
        "import socket, time\n\
         s = socket.socket()\n\
         s.bind(('{from}', {port} + 1))\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)\n\
         for opt in (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT):\n    \
             s.setsockopt(socket.IPPROTO_TCP, opt, 1)\n\
         s.connect(('{to}', {port}))\n\
         try:\n    s.recv(1)\nexcept OSError:\n    pass\n\
         time.sleep(600)\n"
    );
    ChildGuard::python(ns, cgroup, &client)
}

/// The client's keepalive probes go unanswered, so its keepalive timer
/// (softirq) resets the connection.
fn keepalive_reset(test: &str, runtime_path: &str) -> (Value, Netns, Cgroup, u32) {
    let ns = Netns::new();
    let cgroup = container_cgroup(test, runtime_path);
    let mut tracer = Tracer::start(&["--netns", &ns.name, "--kind", "rst_sent"]);
    let listener = ns.listen("127.0.0.1:8080");
    let client = container_client(&ns, &cgroup, 8080);
    let (_server, _) = listener.accept().unwrap();
    // Everything to the client is lost from now on, probe answers too.
    let nft = |rule: &str| run("ip", &["netns", "exec", &ns.name, "nft", rule]);
    nft("add table inet tcprst_test");
    nft("add chain inet tcprst_test in { type filter hook input priority 0; }");
    nft("add rule inet tcprst_test in tcp dport 8081 drop");
    let reset = tracer.wait_for("the keepalive reset", |v| {
        v["kind"] == "rst_sent" && v["local_port"] == 8081
    });
    let pid = client.0.id();
    tracer.stop();
    drop(client);
    (reset, ns, cgroup, pid)
}

/// What every runtime's reset must show.
fn assert_container_reset(reset: &Value, ns: &Netns, cgroup: &Cgroup, pid: u32) {
    assert_eq!(reset["reason"], "TCP_KEEPALIVE_TIMEOUT", "{reset:#}");
    assert_eq!(reset["caller"], "tcp_keepalive_timer");
    assert_eq!(reset["context"], "softirq");
    assert!(reset["pid"].is_null(), "softirq blames no task: {reset:#}");
    assert_eq!(reset["netns"], ns.inode);
    assert_eq!(reset["netns_name"], ns.name.as_str());
    assert_eq!(reset["cgroup"]["path"], cgroup.path.as_str());
    assert_eq!(reset["container"]["id"], ID);
    assert_eq!(reset["owner"]["pid"], pid, "the socket's owner: {reset:#}");
    assert_eq!(reset["owner"]["comm"], "python3");
    assert!(!reset["node"].as_str().unwrap().is_empty());
}

#[test]
fn docker_container() {
    let (reset, ns, cgroup, pid) =
        keepalive_reset("docker", &format!("system.slice/docker-{ID}.scope"));
    assert_container_reset(&reset, &ns, &cgroup, pid);
    assert_eq!(reset["container"]["runtime"], "docker");
    assert!(reset["pod"].is_null());
}

#[test]
fn containerd_container_in_a_burstable_pod() {
    let uid = POD.replace('-', "_");
    let (reset, ns, cgroup, pid) = keepalive_reset(
        "containerd",
        &format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/cri-containerd-{ID}.scope"
        ),
    );
    assert_container_reset(&reset, &ns, &cgroup, pid);
    assert_eq!(reset["container"]["runtime"], "containerd");
    assert_eq!(reset["pod"]["uid"], POD);
    assert_eq!(reset["pod"]["qos"], "burstable");
}

#[test]
fn crio_container_in_a_besteffort_pod() {
    let uid = POD.replace('-', "_");
    let (reset, ns, cgroup, pid) = keepalive_reset(
        "crio",
        &format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice/crio-{ID}.scope"
        ),
    );
    assert_container_reset(&reset, &ns, &cgroup, pid);
    assert_eq!(reset["container"]["runtime"], "cri-o");
    assert_eq!(reset["pod"]["qos"], "besteffort");
}

#[test]
fn podman_container() {
    let (reset, ns, cgroup, pid) =
        keepalive_reset("podman", &format!("machine.slice/libpod-{ID}.scope"));
    assert_container_reset(&reset, &ns, &cgroup, pid);
    assert_eq!(reset["container"]["runtime"], "podman");
}

#[test]
fn container_filter_keeps_only_its_sockets() {
    let ns = Netns::new();
    let cgroup = container_cgroup("filter", &format!("system.slice/docker-{ID}.scope"));
    let mut tracer = Tracer::start(&["--netns", &ns.name, "--container", &ID[..12]]);
    // A reset from the test process (no container), then one from the container.
    let _ = ns.connect("127.0.0.1:40100", "127.0.0.1:9");
    let listener = ns.listen("127.0.0.1:8080");
    let client = container_client(&ns, &cgroup, 8080);
    let (server, _) = listener.accept().unwrap();
    socket2::SockRef::from(&server)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(server);
    let received = tracer.wait_for("the container's rst_received", |v| {
        v["kind"] == "rst_received" && v["local_port"] == 8081
    });
    assert_eq!(received["container"]["id"], ID);
    drop(client);
    let events = tracer.stop();
    assert!(
        events.iter().all(|e| e["container"]["id"] == ID),
        "only the container's events: {events:#?}"
    );
}

/// A container started while tcprst runs is named from its first reset:
/// its cgroup is newer than the walk of the tree tcprst made at startup, and
/// the next walk is not due yet, so tcprst asks the kernel for that one
/// cgroup by its id.
#[test]
fn a_container_started_after_the_last_walk_is_named_from_its_first_reset() {
    let ns = Netns::new();
    let mut tracer = Tracer::start(&["--netns", &ns.name, "--kind", "rst_received"]);
    let cgroup = container_cgroup("new", &format!("system.slice/docker-{ID}.scope"));
    let client = ChildGuard::python(
        &ns,
        &cgroup,
        "import socket, time\n\
         s = socket.socket()\n\
         s.bind(('127.0.0.1', 40120))\n\
         try:\n    s.connect(('127.0.0.1', 9))\nexcept OSError:\n    pass\n\
         time.sleep(600)\n",
    );
    let refused = tracer.wait_for("the container's refused connect", |v| {
        v["kind"] == "rst_received" && v["local_port"] == 40120
    });
    assert_eq!(
        refused["cgroup"]["path"],
        cgroup.path.as_str(),
        "{refused:#}"
    );
    assert_eq!(refused["container"]["id"], ID);
    assert_eq!(refused["container"]["runtime"], "docker");
    drop(client);
    tracer.stop();
}

/// Both ends on this host, in different namespaces (a container talking to
/// a server across a veth): each reset names its own socket's owner and the
/// other end's.
#[test]
fn both_ends_are_attributed() {
    let container_ns = Netns::new();
    let server_ns = Netns::new();
    container_ns.link(&server_ns);
    let cgroup = container_cgroup("peer", &format!("system.slice/docker-{ID}.scope"));
    // Both namespaces are watched; the port keeps other tests out.
    let mut tracer = Tracer::start(&["--port", "8095"]);
    let listener = server_ns.listen("10.213.0.2:8095");
    let client = container_client_to(&container_ns, &cgroup, "10.213.0.1", "10.213.0.2", 8095);
    let (server, _) = listener.accept().unwrap();
    socket2::SockRef::from(&server)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(server);

    let sent = tracer.wait_for("the server's rst_sent", |v| {
        v["kind"] == "rst_sent" && v["local_port"] == 8095
    });
    assert_eq!(sent["netns"], server_ns.inode);
    assert_eq!(sent["owner"]["pid"], std::process::id());
    assert!(sent["container"].is_null());
    let peer = &sent["peer"];
    assert_eq!(peer["netns"], container_ns.inode, "{sent:#}");
    assert_eq!(peer["container"]["id"], ID);
    assert_eq!(peer["owner"]["pid"], client.0.id());

    let received = tracer.wait_for("the container's rst_received", |v| {
        v["kind"] == "rst_received" && v["local_port"] == 8096
    });
    assert_eq!(received["container"]["id"], ID);
    assert_eq!(received["owner"]["pid"], client.0.id());
    assert_eq!(received["peer"]["netns"], server_ns.inode, "{received:#}");
    assert_eq!(received["peer"]["owner"]["pid"], std::process::id());
    drop(client);
    tracer.stop();
}
