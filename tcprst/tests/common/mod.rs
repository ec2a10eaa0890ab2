//! Harness for the root integration tests: a fresh network namespace per
//! test, real sockets inside it, and the real tcprst binary tracing it.
#![allow(dead_code)] // each test binary uses a different part

use std::{
    fs,
    io::{BufRead as _, BufReader, ErrorKind},
    net::{SocketAddr, TcpListener, TcpStream},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::PathBuf,
    process::{Child, ChildStdout, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
        mpsc::{Receiver, RecvTimeoutError, channel},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use serde_json::Value;
use socket2::{Domain, Socket, Type};
use tcprst_common::{
    READY_LINE,
    stderr::{ERROR, PREFIX, STOPPED},
};
use tcprst_loadgen::netns::ScratchNetns;

pub const TCPRST: &str = env!("CARGO_BIN_EXE_tcprst");

/// What deploy/daemonset.yaml adds after dropping ALL, and nothing else:
/// deploy.rs holds the manifest to exactly this list, and capabilities.rs
/// runs tcprst with it to show what each one is needed for.
pub const DAEMONSET_CAPABILITIES: &[&str] = &[
    "BPF",
    "PERFMON",
    "SYS_RESOURCE",
    "SYS_ADMIN",
    "SYS_PTRACE",
    "DAC_READ_SEARCH",
    "SYSLOG",
];

pub fn require_root() {
    // SAFETY: geteuid() takes nothing and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests load BPF programs and create network namespaces: run them as root (cargo xtask test does)"
    );
}

/// A network namespace made for one test, deleted when dropped: the
/// test side's scratch namespace, with what tests do in it.
pub struct Netns(ScratchNetns);

static NEXT_NETNS: AtomicU32 = AtomicU32::new(0);

impl std::ops::Deref for Netns {
    type Target = ScratchNetns;

    fn deref(&self) -> &ScratchNetns {
        &self.0
    }
}

impl Netns {
    pub fn new() -> Self {
        require_root();
        let name = format!(
            "tcprst-test-{}-{}",
            std::process::id(),
            NEXT_NETNS.fetch_add(1, Ordering::Relaxed)
        );
        Self(ScratchNetns::create(name).unwrap())
    }

    /// Runs `f` on a thread inside this namespace. Sockets it creates stay in
    /// the namespace wherever they are used afterwards.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.0.enter(f).unwrap()
    }

    /// Runs `f` like [`Netns::enter`], but with a descriptor table of the
    /// thread's own, for sockets that live and die inside `f` when a test
    /// checks which process closed them. A process that another test
    /// spawns holds a copy of the process's shared table until it execs.
    /// If a socket is closed while such a copy exists, the child closes it
    /// for good at exec, and the kernel rightly names the child. No spawn
    /// copies a table that is this thread's own.
    pub fn enter_alone<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.enter(|| {
            // SAFETY: with CLOSE_RANGE_UNSHARE the call first gives this
            // thread a private copy of the table, then closes descriptors
            // 3 and up in that copy only. The rest of the process keeps
            // them, and this thread uses none of them afterwards.
            let unshared =
                unsafe { libc::close_range(3, u32::MAX, libc::CLOSE_RANGE_UNSHARE as i32) };
            assert_eq!(
                unshared,
                0,
                "close_range: {}",
                std::io::Error::last_os_error()
            );
            f()
        })
    }

    pub fn listen(&self, addr: &str) -> TcpListener {
        let addr: SocketAddr = addr.parse().unwrap();
        self.enter(|| TcpListener::bind(addr).unwrap())
    }

    /// A client socket bound to `from`, so the test knows the exact tuple.
    pub fn connect(&self, from: &str, to: &str) -> std::io::Result<TcpStream> {
        let (from, to): (SocketAddr, SocketAddr) = (from.parse().unwrap(), to.parse().unwrap());
        self.enter(|| {
            let sock = Socket::new(Domain::for_address(from), Type::STREAM, None)?;
            sock.bind(&from.into())?;
            sock.connect(&to.into())?;
            Ok(sock.into())
        })
    }
}

impl Netns {
    /// Connects to the closed port 9 from two threads for `seconds`, and
    /// returns how many were refused: each is one reset sent and one
    /// received, all of one key per direction (the clients' ports vary).
    pub fn refused_connects(&self, seconds: f64) -> u64 {
        let target = SocketAddr::from(([127, 0, 0, 1], 9));
        let deadline = Instant::now() + Duration::from_secs_f64(seconds);
        thread::scope(|s| {
            let workers: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        self.enter(|| {
                            let mut refused = 0u64;
                            while Instant::now() < deadline {
                                match TcpStream::connect(target) {
                                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                                        refused += 1
                                    }
                                    other => panic!("a connect to a closed port gave {other:?}"),
                                }
                            }
                            refused
                        })
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).sum()
        })
    }

    /// Links two namespaces with a veth pair: `self` gets 10.213.0.1/24 and
    /// `other` 10.213.0.2/24, addresses that exist only inside them.
    pub fn link(&self, other: &Netns) {
        self.veth(other, "10.213.0.1/24", "10.213.0.2/24");
    }

    /// A veth pair between `self` (`addr`) and `other` (`other_addr`).
    pub fn veth(&self, other: &Netns, addr: &str, other_addr: &str) {
        let n = NEXT_NETNS.fetch_add(1, Ordering::Relaxed);
        let (a, b) = (
            format!("trA{}x{n}", std::process::id()),
            format!("trB{}x{n}", std::process::id()),
        );
        run(
            "ip",
            &["link", "add", &a, "type", "veth", "peer", "name", &b],
        );
        for (dev, ns, addr) in [(&a, self, addr), (&b, other, other_addr)] {
            run("ip", &["link", "set", dev, "netns", &ns.name]);
            run("ip", &["-n", &ns.name, "addr", "add", addr, "dev", dev]);
            run("ip", &["-n", &ns.name, "link", "set", dev, "up"]);
        }
    }

    /// Two "nodes" that reach each other only through `self`, a router:
    /// `a` is 10.221.1.2, `b` 10.221.2.2.
    pub fn route_between(&self, a: &Netns, b: &Netns) {
        a.veth(self, "10.221.1.2/24", "10.221.1.1/24");
        b.veth(self, "10.221.2.2/24", "10.221.2.1/24");
        self.enter(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap());
        for (node, via) in [(a, "10.221.1.1"), (b, "10.221.2.1")] {
            run(
                "ip",
                &["-n", &node.name, "route", "add", "default", "via", via],
            );
        }
    }

    /// Runs one nft command (`add rule inet t out ...`) in this namespace.
    pub fn nft(&self, command: &str) {
        run("ip", &["netns", "exec", &self.name, "nft", command]);
    }

    /// What the accept queue of the listener on `port` holds, as `ss`
    /// shows it (its Recv-Q); None while nothing listens there.
    pub fn accept_queue(&self, port: u16) -> Option<u32> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "ss", "-Htln"])
            .arg(format!("sport = :{port}"))
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        text.split_whitespace().nth(1).map(|n| n.parse().unwrap())
    }

    /// Kernel counter `name` (`TcpExtListenOverflows`) in this namespace,
    /// as `nstat` reads it: absolute, and without touching its history.
    pub fn nstat(&self, name: &str) -> u64 {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "nstat", "-asz", name])
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in nstat's {text:?}"))
    }

    /// A connected (client, server) pair on exact addresses.
    pub fn pair(&self, client: &str, server: &str) -> (TcpStream, TcpStream) {
        let listener = self.listen(server);
        let client = self.connect(client, server).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    /// Waits up to 10 s for a process of the test's to listen on TCP `port`.
    pub fn wait_listening(&self, port: u16) {
        wait_until(
            &format!("a listener on {port}"),
            Duration::from_secs(10),
            || self.accept_queue(port).is_some(),
        );
    }
}

/// Where this host mounts cgroup2, from mountinfo: hybrid hosts put it
/// under /sys/fs/cgroup/unified, unified ones at /sys/fs/cgroup.
pub fn cgroup2_root() -> PathBuf {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    mountinfo
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| PathBuf::from(left.split_whitespace().nth(4).unwrap()))
        })
        .expect("no cgroup2 mounted")
}

/// A real cgroup v2 directory, made with whichever of its parents were
/// missing; when dropped it removes what it made, leaf first. A directory
/// another guard (or a runtime) still uses is not empty and stays.
pub struct Cgroup {
    /// As the kernel and tcprst name it: relative to the cgroup2 root.
    pub path: String,
    dir: PathBuf,
    /// The directories this guard made, deepest first.
    made: Vec<PathBuf>,
}

impl Cgroup {
    /// `path` is relative to the cgroup2 root, `/kubepods/...`.
    pub fn new(path: &str) -> Self {
        require_root();
        let mut dir = cgroup2_root();
        let mut made = Vec::new();
        for component in path.split('/').filter(|c| !c.is_empty()) {
            dir.push(component);
            match fs::create_dir(&dir) {
                Ok(()) => made.push(dir.clone()),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => panic!("mkdir {}: {e}", dir.display()),
            }
        }
        made.reverse();
        Self {
            path: path.to_owned(),
            dir,
            made,
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for dir in &self.made {
            let _ = fs::remove_dir(dir);
        }
    }
}

/// A child process, killed when dropped.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// `python3 -c script` in `cgroup` and `ns`, as a runtime starts a
    /// container's process: it joins the cgroup before it execs, so every
    /// socket it creates belongs to the cgroup. The shell joins it before
    /// entering the namespace because `ip netns exec` remounts /sys, which
    /// hides the cgroup2 mount. Both execs keep the pid: it is python's.
    pub fn python(ns: &Netns, cgroup: &Cgroup, script: &str) -> Self {
        let launch = format!(
            "echo $$ > {procs} && exec ip netns exec {ns} python3 -c \"$0\"",
            procs = cgroup.dir.join("cgroup.procs").display(),
            ns = ns.name,
        );
        Self(
            Command::new("sh")
                .args(["-c", &launch, script])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                // A script that fails says why in the test's output.
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        )
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends `signal` to `pid`, which must be a child this test started and
/// has not reaped (so the pid cannot have been reused for another process).
pub fn send_signal(pid: u32, signal: i32) {
    // SAFETY: kill() reads no memory of ours; the caller vouches for `pid`.
    unsafe { libc::kill(pid as i32, signal) };
}

/// Polls `done` until it holds, for at most `timeout`; panics naming `what`.
pub fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "no {what} within {timeout:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

pub fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A started `tcprst trace`, attached and ready.
pub struct Spawned {
    pub child: Child,
    /// Taken by `Tracer`, or dropped by a test to close the pipe.
    pub stdout: Option<ChildStdout>,
    stderr: Arc<Mutex<Vec<String>>>,
    /// Reads stderr into `stderr` until end of file, which comes when
    /// tcprst exits.
    stderr_reader: Option<JoinHandle<()>>,
}

impl Spawned {
    /// Starts tracing with JSON output and returns once the programs are
    /// attached.
    pub fn start(args: &[&str]) -> Self {
        Self::start_as("json", args)
    }

    /// Starts tracing with `output` (`json` or `table`) and returns once the
    /// programs are attached.
    pub fn start_as(output: &str, args: &[&str]) -> Self {
        Self::start_by(Command::new(TCPRST), output, args)
    }

    /// Like `start_as`, with `tcprst` the command given: TCPRST itself, or
    /// a wrapper such as setpriv that ends in it.
    pub fn start_by(tcprst: Command, output: &str, args: &[&str]) -> Self {
        Self::start_into(tcprst, output, args, Stdio::piped())
    }

    /// Like `start_by`, with stdout going to `stdout` (a pipe the test
    /// reads, or a file).
    pub fn start_into(mut tcprst: Command, output: &str, args: &[&str], stdout: Stdio) -> Self {
        require_root();
        // tcprst says it is tracing on this pipe (--ready-fd): READY_LINE,
        // then EOF; EOF alone if it exits first.
        let (ready_reader, ready_writer) = std::io::pipe().unwrap();
        let ready_fd = ready_writer.as_raw_fd();
        // SAFETY: between fork and exec the closure only calls fcntl(),
        // which is async-signal-safe, on a descriptor `ready_writer` keeps
        // open until the spawn returns.
        unsafe {
            tcprst.pre_exec(move || {
                // The pipe is close-on-exec; only tcprst may keep it.
                if libc::fcntl(ready_fd, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = tcprst
            .args(["trace", "-o", output, "--ready-fd", &ready_fd.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(ready_writer);
        let (ready_tx, ready_rx) = channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(ready_reader).read_line(&mut line);
            let _ = ready_tx.send(line == READY_LINE);
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let stderr_reader = {
            let stderr = stderr.clone();
            let pipe = child.stderr.take().unwrap();
            thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    stderr.lock().unwrap().push(line);
                }
            })
        };
        let stdout = child.stdout.take();
        let mut spawned = Self {
            child,
            stdout,
            stderr,
            stderr_reader: Some(stderr_reader),
        };
        let ready = ready_rx.recv_timeout(Duration::from_secs(60));
        if ready != Ok(true) {
            if ready == Ok(false) {
                // It exited: its last words are on their way to the end
                // of its stderr.
                spawned.wait_exit(Duration::from_secs(10));
            }
            panic!(
                "tcprst did not start tracing; stderr:\n{}",
                spawned.stderr_text()
            );
        }
        spawned
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Waits up to `timeout` for tcprst to exit, then for its stderr to be
    /// read to the end, and returns the exit status and all of stderr.
    pub fn wait_exit(&mut self, timeout: Duration) -> (ExitStatus, String) {
        let status = wait_timeout(&mut self.child, timeout);
        if let Some(reader) = self.stderr_reader.take() {
            read_to_end(reader);
        }
        (status, self.stderr_text())
    }
}

/// Waits for `reader`, a thread reading one of tcprst's pipes, to reach
/// end of file once tcprst has exited, and passes on its panic: a reader
/// still on its last lines would leave them out of what the test checks.
fn read_to_end(reader: JoinHandle<()>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !reader.is_finished() {
        assert!(
            Instant::now() < deadline,
            "a pipe of tcprst's was still open 10 s after it exited"
        );
        thread::sleep(Duration::from_millis(5));
    }
    if let Err(panic) = reader.join() {
        std::panic::resume_unwind(panic);
    }
}

/// A running `tcprst trace -o json` whose records are collected.
pub struct Tracer {
    spawned: Spawned,
    events: Receiver<Value>,
    /// Parses stdout into `events` until end of file.
    stdout_reader: Option<JoinHandle<()>>,
    seen: Vec<Value>,
}

impl Tracer {
    pub fn start(args: &[&str]) -> Self {
        Self::start_by(Command::new(TCPRST), args)
    }

    /// Tracing only `ns` (named by its inode), with `extra` flags.
    pub fn in_netns(ns: &Netns, extra: &[&str]) -> Self {
        let inode = ns.inode.to_string();
        let mut args = vec!["--netns", inode.as_str()];
        args.extend_from_slice(extra);
        Self::start(&args)
    }

    /// Tracing as if on the Kubernetes node `node` (NODE_NAME).
    pub fn on_node(node: &str, args: &[&str]) -> Self {
        let mut tcprst = Command::new(TCPRST);
        tcprst.env("NODE_NAME", node);
        Self::start_by(tcprst, args)
    }

    /// Like `start`, with `tcprst` the command given (see `Spawned::start_by`).
    pub fn start_by(tcprst: Command, args: &[&str]) -> Self {
        let mut spawned = Spawned::start_by(tcprst, "json", args);
        let (tx, events) = channel();
        let pipe = spawned.stdout.take().unwrap();
        let stdout_reader = thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let value: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("tcprst printed non-JSON {line:?}: {e}"));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        Self {
            spawned,
            events,
            stdout_reader: Some(stdout_reader),
            seen: Vec::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.spawned.child.id()
    }

    pub fn stderr_text(&self) -> String {
        self.spawned.stderr_text()
    }

    /// Waits until records for `n` resets have arrived (or 10 s), counting
    /// what aggregate records stand for, then a little longer so that any
    /// unexpected extra record shows up too.
    pub fn wait_for_rsts(&mut self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while resets(&self.seen) < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(v) => self.seen.push(v),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "tcprst stopped early; stderr:\n{}",
                        self.spawned.stderr_text()
                    )
                }
            }
        }
        let grace = Instant::now() + Duration::from_millis(300);
        while let Ok(v) = self
            .events
            .recv_timeout(grace.saturating_duration_since(Instant::now()))
        {
            self.seen.push(v);
        }
    }

    /// Waits up to 20 s for a record `wanted` accepts, and returns it.
    pub fn wait_for(&mut self, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
        if let Some(v) = self.seen.iter().find(|v| wanted(v)) {
            return v.clone();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if wanted(&v) {
                        return v;
                    }
                }
                Err(_) => panic!(
                    "no {what} within 20 s; records:\n{:#?}\nstderr:\n{}",
                    self.seen,
                    self.spawned.stderr_text()
                ),
            }
        }
    }

    /// Sends `signal`, waits for the exit, and returns every record seen
    /// and stderr.
    pub fn stop_with(mut self, signal: i32) -> (ExitStatus, Vec<Value>, String) {
        send_signal(self.spawned.child.id(), signal);
        let (status, stderr) = self.spawned.wait_exit(Duration::from_secs(10));
        if let Some(reader) = self.stdout_reader.take() {
            read_to_end(reader);
        }
        self.seen.extend(self.events.try_iter());
        (status, std::mem::take(&mut self.seen), stderr)
    }

    /// Stops with SIGTERM and returns the RST events seen.
    pub fn stop(self) -> Vec<Value> {
        let (status, seen, stderr) = self.stop_with(libc::SIGTERM);
        assert!(
            status.success(),
            "tcprst exited with {status}; stderr:\n{stderr}"
        );
        rsts(&seen).into_iter().cloned().collect()
    }
}

/// A running `tcprst trace -o json > FILE`: stdout is a regular file,
/// which tcprst writes in larger pieces than a pipe.
pub struct FileTracer {
    spawned: Spawned,
    path: PathBuf,
}

impl FileTracer {
    /// Tracing only `ns`, with `extra` flags, into a file of its own.
    pub fn in_netns(ns: &Netns, extra: &[&str]) -> Self {
        let path = std::env::temp_dir().join(format!(
            "tcprst-test-{}-{}.ndjson",
            std::process::id(),
            ns.name
        ));
        let file = fs::File::create(&path).unwrap();
        let mut args = vec!["--netns", ns.name.as_str()];
        args.extend_from_slice(extra);
        let spawned = Spawned::start_into(Command::new(TCPRST), "json", &args, file.into());
        Self { spawned, path }
    }

    /// Stops with SIGTERM; returns the exit status, the file's text and
    /// stderr.
    pub fn stop(mut self) -> (ExitStatus, String, String) {
        send_signal(self.spawned.child.id(), libc::SIGTERM);
        let (status, stderr) = self.spawned.wait_exit(Duration::from_secs(10));
        let text = fs::read_to_string(&self.path).unwrap();
        (status, text, stderr)
    }
}

impl Drop for FileTracer {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// A running `tcprst trace -o table` whose stdout is kept byte for byte, so
/// a test can tell what a terminal would have received.
pub struct TableTracer {
    spawned: Spawned,
    lines: Receiver<Vec<u8>>,
    seen: Vec<u8>,
}

impl TableTracer {
    pub fn start(args: &[&str]) -> Self {
        let mut spawned = Spawned::start_as("table", args);
        let (tx, lines) = channel();
        let mut pipe = BufReader::new(spawned.stdout.take().unwrap());
        thread::spawn(move || {
            loop {
                let mut line = Vec::new();
                match pipe.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) if tx.send(line).is_err() => break,
                    Ok(_) => {}
                }
            }
        });
        Self {
            spawned,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits up to 20 s for a line `wanted` accepts.
    pub fn wait_for(&mut self, what: &str, wanted: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.extend_from_slice(&line);
                    if wanted(&String::from_utf8_lossy(&line)) {
                        return;
                    }
                }
                // Debug-formatted, so that what is shown cannot act on the
                // terminal of whoever reads the failure either.
                Err(_) => panic!(
                    "no {what} within 20 s; stdout:\n{:?}\nstderr:\n{:?}",
                    String::from_utf8_lossy(&self.seen),
                    self.spawned.stderr_text()
                ),
            }
        }
    }

    /// Stops with SIGTERM and returns all of stdout.
    pub fn stop(mut self) -> Vec<u8> {
        send_signal(self.spawned.child.id(), libc::SIGTERM);
        let (status, stderr) = self.spawned.wait_exit(Duration::from_secs(10));
        assert!(
            status.success(),
            "tcprst exited with {status}; stderr:\n{stderr:?}"
        );
        // The reader thread ends at end of file, after the last line.
        for line in self.lines.iter() {
            self.seen.extend_from_slice(&line);
        }
        std::mem::take(&mut self.seen)
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_timeout(child: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "tcprst did not exit within {timeout:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// The rest of a tcprst stderr `line` whose message starts with `start`
/// (one of `tcprst_common::stderr`'s).
pub fn message<'l>(line: &'l str, start: &str) -> Option<&'l str> {
    line.strip_prefix(PREFIX)?.strip_prefix(start)
}

/// The exit summary after its "stopped: ", if tcprst wrote one.
pub fn exit_summary(stderr: &str) -> Option<&str> {
    stderr.lines().find_map(|line| message(line, STOPPED))
}

/// The message of the one error line a failed run writes; panics, showing
/// `stderr`, when there is none or more than one.
pub fn the_error(stderr: &str) -> &str {
    let errors: Vec<&str> = stderr
        .lines()
        .filter_map(|line| message(line, ERROR))
        .collect();
    match errors[..] {
        [error] => error,
        _ => panic!("expected exactly one error line in:\n{stderr}"),
    }
}

/// The number just before `what` in the exit summary ("…, 0 lost, …"
/// for `" lost"`); panics naming `what` when the summary has none.
pub fn summary_count(stderr: &str, what: &str) -> u64 {
    exit_summary(stderr)
        .and_then(|s| s.split(what).next())
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count before {what:?} in {stderr}"))
}

/// N in the exit summary's "stopped: N records read, …".
pub fn records_read(stderr: &str) -> u64 {
    exit_summary(stderr)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no totals in {stderr}"))
}

/// A record of `kind` for the connection with these local and remote ports.
pub fn is(v: &Value, kind: &str, local_port: u16, remote_port: u16) -> bool {
    v["kind"] == kind && v["local_port"] == local_port && v["remote_port"] == remote_port
}

pub fn rsts(records: &[Value]) -> Vec<&Value> {
    records
        .iter()
        .filter(|v| matches!(v["kind"].as_str(), Some("rst_sent" | "rst_received")))
        .collect()
}

/// The resets these records stand for: one per rst_sent and rst_received,
/// `count` per aggregate record.
pub fn resets(records: &[Value]) -> u64 {
    records
        .iter()
        .filter(|v| v["kind"].as_str().is_some_and(|k| k.starts_with("rst_")))
        .map(|v| v["count"].as_u64().unwrap())
        .sum()
}

/// An end of the connection, `[::1]:9` style.
pub fn endpoint(v: &Value, side: &str) -> SocketAddr {
    let ip: std::net::IpAddr = v[format!("{side}_addr")].as_str().unwrap().parse().unwrap();
    SocketAddr::new(ip, v[format!("{side}_port")].as_u64().unwrap() as u16)
}

/// The fields a test pins down exactly, as one comparable line.
pub fn summary(v: &Value) -> String {
    format!(
        "{} {} -> {} state={} reason={} errno={} netns={}",
        v["kind"].as_str().unwrap(),
        endpoint(v, "local"),
        endpoint(v, "remote"),
        v["state"].as_str().unwrap_or("-"),
        v["reason"].as_str().unwrap_or("-"),
        v["errno"].as_str().unwrap_or("-"),
        v["netns"],
    )
}

/// The states of a record's `history`, oldest first.
pub fn history_states(v: &Value) -> Vec<String> {
    let steps = v["history"].as_array();
    let steps = steps.unwrap_or_else(|| panic!("no history: {v:#}"));
    let state = |step: &Value| step["state"].as_str().unwrap().to_owned();
    steps.iter().map(state).collect()
}

/// Asserts that `reset`, which this process's client socket sent for data
/// that came after its close(), names that close: as its cause, its
/// initiator, the steps of its history and its diagnosis.
pub fn assert_names_this_close(reset: &Value) {
    let pid = std::process::id();
    assert_eq!(reset["cause"], "data_after_close", "{reset:#}");
    assert_eq!(reset["initiator"]["op"], "close", "{reset:#}");
    assert_eq!(reset["initiator"]["pid"], pid, "{reset:#}");
    assert_eq!(
        history_states(reset),
        ["ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2"],
        "{reset:#}"
    );
    let diagnosis = reset["diagnosis"].as_str().unwrap();
    assert!(
        diagnosis.starts_with("data arrived after close() by ")
            && diagnosis.contains(&format!("[{pid}]")),
        "{diagnosis}"
    );
}

/// Asserts that exactly these events arrived, in any order (on loopback the
/// peer often handles a RST before the sender's tracepoint fires).
pub fn assert_exact(events: &[Value], expected: &[String]) {
    let mut got: Vec<String> = events.iter().map(summary).collect();
    let mut want = expected.to_vec();
    got.sort();
    want.sort();
    assert_eq!(got, want, "events:\n{events:#?}");
}

pub fn find<'a>(events: &'a [Value], kind: &str) -> &'a Value {
    events
        .iter()
        .find(|v| v["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in {events:#?}"))
}

/// tcprst tracing `ns` with metrics on a free loopback port, and that
/// port's address. Connections count as stuck after a second, so tests
/// need not wait; `extra` are more arguments.
pub fn trace_with_metrics(ns: &Netns, extra: &[&str]) -> (Tracer, String) {
    let mut args = vec![
        "--netns",
        &ns.name,
        "--metrics-addr",
        "127.0.0.1:0",
        "--stuck-after",
        "1s",
    ];
    args.extend_from_slice(extra);
    let tracer = Tracer::start(&args);
    let addr = metrics_addr(&tracer.stderr_text());
    (tracer, addr)
}

/// The address tcprst announced for `--metrics-addr` on stderr.
pub fn metrics_addr(stderr: &str) -> String {
    stderr
        .split("metrics on http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("no metrics address in {stderr}"))
        .to_owned()
}

/// GET `path` from `addr`: the status and the body. HTTP/1.0, so that no
/// server chunks the body; gives up after 20 s.
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut conn = TcpStream::connect(addr)?;
    conn.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    conn.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("GET {path}: no end of headers in {response:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("GET {path}: no status in {head:?}"));
    Ok((status, body.to_owned()))
}

/// GET /metrics, parsed; gives up after 20 s.
pub fn scrape(addr: &str) -> prometheus_parse::Scrape {
    let (status, body) = http_get(addr, "/metrics").unwrap();
    assert_eq!(status, 200, "{body}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

/// The sample of `name` with these labels, if scraped.
pub fn metric(
    scrape: &prometheus_parse::Scrape,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    use prometheus_parse::Value;
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            ref other => panic!("{name} is {other:?}"),
        })
}

/// One read from `stream`, waiting 5 s at most: a peer that never answers
/// fails the test instead of hanging it.
pub fn read_within(stream: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::io::Read as _;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.read(buf)
}

/// Reads from `stream` until the reset the test made arrives (5 s at most).
pub fn expect_reset(stream: &mut TcpStream) {
    let err = read_within(stream, &mut [0u8; 16]).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
}
