//! Names the traced choose cannot act on the reader's terminal (#12): a
//! process that names itself with an escape sequence shows up in
//! `tcprst trace -o table` as text.

mod common;

use std::process::{Command, Stdio};

use common::{Netns, TableTracer};

/// Names itself ESC ] 0 ; pwn BEL, an OSC that would retitle a terminal,
/// then closes a connection with data unread, so that the kernel sends the
/// reset from this task, under this name. Python's escapes, kept as text
/// here, so that the test's own source and argv hold no control bytes.
const HOSTILE_CLOSER: &str = r#"
import ctypes, socket
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(15, b"\x1b]0;pwn\x07", 0, 0, 0) != 0:  # PR_SET_NAME
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_NAME)")
listener = socket.create_server(("127.0.0.1", 5000))
client = socket.create_connection(("127.0.0.1", 5000))
client.sendall(b"never read")
server, _ = listener.accept()
server.recv(1, socket.MSG_PEEK)
server.close()
client.settimeout(5)
try:
    client.recv(16)
except ConnectionResetError:
    raise SystemExit(0)
raise SystemExit("the close with unread data sent no reset")
"#;

#[test]
fn a_comm_with_escapes_prints_escaped() {
    let ns = Netns::new();
    let mut tracer = TableTracer::start(&["--netns", &ns.inode.to_string()]);
    // `ip netns exec` execs python in place, so the child's pid is python's.
    let closer = Command::new("ip")
        .args(["netns", "exec", &ns.name, "python3", "-c", HOSTILE_CLOSER])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = closer.id();
    let done = closer.wait_with_output().unwrap();
    assert!(
        done.status.success(),
        "the closer failed: {}; stderr:\n{:?}",
        done.status,
        String::from_utf8_lossy(&done.stderr)
    );
    tracer.wait_for("reset sent from 127.0.0.1:5000", |line| {
        line.contains("RST sent") && line.contains("127.0.0.1:5000")
    });
    let stdout = tracer.stop();
    let text = String::from_utf8_lossy(&stdout);

    // The TASK column, and the diagnosis that names the closer.
    let task = format!(r"\e]0;pwn\a[{pid}]");
    assert!(text.contains(&task), "no {task:?} in\n{text:?}");
    let because = format!(r"└─ close() by \e]0;pwn\a[{pid}] with unread data");
    assert!(text.contains(&because), "no {because:?} in\n{text:?}");
    for byte in [0x1b, 0x07] {
        assert!(
            !stdout.contains(&byte),
            "raw {byte:#04x} on stdout:\n{text:?}"
        );
    }
}
