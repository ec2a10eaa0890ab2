//! What the DaemonSet's capabilities beyond tracing are for: tcprst runs as
//! root with exactly the manifest's set (through setpriv, as `drop: ["ALL"]`
//! plus `add:` leaves it), and again without SYSLOG, SYS_PTRACE or
//! DAC_READ_SEARCH, and what the one dropped is for stops working.
//! `appArmorProfile: Unconfined` is not tested: this machine has no AppArmor.

mod common;

use std::{
    fs::{self, File},
    io::ErrorKind,
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use common::{ChildGuard, DAEMONSET_CAPABILITIES, Netns, TCPRST, Tracer, require_root};
use serde_json::Value;

/// The command running tcprst as the DaemonSet's container does: root, no
/// capabilities but the manifest's (less `without`), and no_new_privs
/// (allowPrivilegeEscalation: false).
fn as_daemonset(without: Option<&str>) -> Command {
    let keep: Vec<String> = DAEMONSET_CAPABILITIES
        .iter()
        .filter(|cap| Some(**cap) != without)
        .map(|cap| format!("+{}", cap.to_lowercase()))
        .collect();
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--bounding-set=-all,{}", keep.join(",")))
        .args(["--inh-caps=-all", "--no-new-privs"])
        .arg(TCPRST);
    cmd
}

/// `tcprst doctor -o json`, run by `tcprst`.
fn doctor(mut tcprst: Command) -> Value {
    let out = tcprst.args(["doctor", "-o", "json"]).output().unwrap();
    assert!(
        out.status.success(),
        "doctor failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// kernel.kptr_restrict at a value for as long as this lives; dropping it,
/// a failed assertion's unwinding included, puts the old value back. An
/// exclusive lock on a file under /run/lock keeps a concurrent run of this
/// test (another checkout's) from saving our value as its "old" one.
struct KptrRestrict {
    old: String,
    _lock: File,
}

const KPTR_RESTRICT: &str = "/proc/sys/kernel/kptr_restrict";

impl KptrRestrict {
    fn set(value: &str) -> Self {
        require_root();
        let lock = File::create("/run/lock/tcprst-test-kptr_restrict").unwrap();
        // SAFETY: flock() only takes the descriptor, which `lock` keeps open.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
        let old = fs::read_to_string(KPTR_RESTRICT).unwrap();
        fs::write(KPTR_RESTRICT, value).unwrap();
        Self { old, _lock: lock }
    }
}

impl Drop for KptrRestrict {
    fn drop(&mut self) {
        fs::write(KPTR_RESTRICT, &self.old).unwrap();
    }
}

const NO_CALLERS: &str = "kallsyms addresses hidden (kernel.kptr_restrict=1 and no CAP_SYSLOG)";

/// kernel.kptr_restrict=1 shows /proc/kallsyms addresses only to readers
/// that held CAP_SYSLOG when they opened it, so without it every caller is
/// null. The setting is global, but tests running in parallel are not
/// affected: they run tcprst as full root, with CAP_SYSLOG, as the full
/// DaemonSet set below shows is enough (2 would hide them from everyone).
#[test]
fn syslog_names_callers() {
    let _restrict = KptrRestrict::set("1");

    assert_eq!(doctor(as_daemonset(None))["callers"], true);
    assert_eq!(
        doctor(as_daemonset(Some("SYSLOG")))["callers"]["error"],
        NO_CALLERS
    );

    let ns = Netns::new();
    let args = ["--netns", &ns.name, "--kind", "rst_sent"];
    let mut full = Tracer::start_by(as_daemonset(None), &args);
    let mut blind = Tracer::start_by(as_daemonset(Some("SYSLOG")), &args);
    // A connect to a closed port: tcp_v4_rcv answers with a reset.
    assert!(ns.connect("127.0.0.1:40200", "127.0.0.1:9").is_err());
    let sent = |v: &Value| v["kind"] == "rst_sent" && v["remote_port"] == 40200;
    assert_eq!(full.wait_for("the reset", sent)["caller"], "tcp_v4_rcv");
    // Still traced, only the caller is missing.
    assert!(blind.wait_for("the reset", sent)["caller"].is_null());

    let stderr = |tracer: Tracer| {
        let (status, _, stderr) = tracer.stop_with(libc::SIGTERM);
        assert!(status.success(), "{stderr}");
        stderr
    };
    let warning = format!("callers unavailable: {NO_CALLERS}");
    let full = stderr(full);
    assert!(!full.contains(&warning), "{full}");
    let blind = stderr(blind);
    assert_eq!(blind.matches(&warning).count(), 1, "{blind}");
}

/// A client running as nobody, connected from 127.0.0.1:`port`+1 to `port`
/// in `ns`, that keeps its socket after the reset.
fn nobodys_client(ns: &Netns, port: u16) -> ChildGuard {
    let client = format!(
        "import socket, time\n\
         s = socket.socket()\n\
         s.bind(('127.0.0.1', {port} + 1))\n\
         s.connect(('127.0.0.1', {port}))\n\
         try:\n    s.recv(1)\nexcept OSError:\n    pass\n\
         time.sleep(600)\n"
    );
    ChildGuard(
        Command::new("ip")
            .args(["netns", "exec", &ns.name, "setpriv"])
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            // The system's Python: one on root's PATH (pyenv under /root) need
            // not be nobody's to run.
            .args(["/usr/bin/python3", "-c", &client])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// The connection `client` makes to `listener`; fails, rather than waits
/// forever, if the client exits first.
fn accept(listener: &TcpListener, client: &mut ChildGuard) -> TcpStream {
    listener.set_nonblocking(true).unwrap();
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                conn.set_nonblocking(false).unwrap();
                return conn;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if let Some(status) = client.0.try_wait().unwrap() {
                    panic!("the client exited with {status} before connecting");
                }
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Socket owners come from /proc/PID/fd. Another user's process has that
/// directory as its own with mode 0500 (DAC_READ_SEARCH lists it), and its
/// links pass the kernel's ptrace access check only with SYS_PTRACE: without
/// either, the owner of a socket held by nobody is unknown.
#[test]
fn ptrace_and_dac_read_search_find_other_users_owners() {
    let ns = Netns::new();
    let args = ["--netns", &ns.name, "--kind", "rst_received"];
    let tracers: Vec<(Option<&str>, Tracer)> = [None, Some("SYS_PTRACE"), Some("DAC_READ_SEARCH")]
        .into_iter()
        .map(|without| (without, Tracer::start_by(as_daemonset(without), &args)))
        .collect();
    let listener = ns.listen("127.0.0.1:8300");
    let mut client = nobodys_client(&ns, 8300);
    let server = accept(&listener, &mut client);
    socket2::SockRef::from(&server)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(server);

    for (without, mut tracer) in tracers {
        let received = tracer.wait_for("nobody's reset", |v| {
            v["kind"] == "rst_received" && v["local_port"] == 8301
        });
        match without {
            None => {
                assert_eq!(received["owner"]["pid"], client.0.id(), "{received:#}");
                assert_eq!(received["owner"]["comm"], "python3");
            }
            Some(cap) => assert!(received["owner"].is_null(), "without {cap}: {received:#}"),
        }
        tracer.stop();
    }
}
