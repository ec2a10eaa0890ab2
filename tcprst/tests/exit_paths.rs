//! Every way `tcprst trace` ends must exit 0 and leave no program of its
//! own loaded in the kernel: each test first sees the programs loaded, by
//! the ids its tcprst holds, then sees those ids gone.

mod common;

use std::{
    collections::BTreeSet,
    fs,
    io::Read as _,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use std::sync::Mutex;

use common::{
    Netns, Spawned, TCPRST, Tracer, exit_summary, metric, metrics_addr, scrape, send_signal,
    summary_count, the_error,
};

/// Tests here compare the kernel's program lists; one at a time, so each
/// can tell its own tcprst's programs from another test's.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Programs every tcprst trace loads, whatever the kernel: both reset
/// tracepoints, as the kernel names them (15 characters:
/// `tcprst_rst_sent_btf` is `tcprst_rst_sent` too). The softirq programs
/// load only where the reset programs cannot tell softirq by themselves.
const ALWAYS_LOADED: [&str; 2] = ["tcprst_rst_sent", "tcprst_rst_recv"];

/// BPF program ids held by a process's file descriptors (programs, links,
/// perf events); none once it has exited.
fn prog_ids_of(pid: u32) -> BTreeSet<u32> {
    fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .into_iter()
        .flatten()
        .filter_map(|e| fs::read_to_string(e.ok()?.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|id| id.trim().parse().ok())
        })
        .collect()
}

fn loaded_programs() -> Vec<(u32, String)> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| (p.id(), p.name_as_str().unwrap_or("").to_owned()))
        .collect()
}

/// The loaded programs a process holds: (id, name).
fn held_by(pid: u32) -> Vec<(u32, String)> {
    let ids = prog_ids_of(pid);
    loaded_programs()
        .into_iter()
        .filter(|(id, _)| ids.contains(id))
        .collect()
}

/// Ids of `held`, checked to be tcprst's and to include every program it
/// always loads.
fn ours(held: &[(u32, String)]) -> BTreeSet<u32> {
    for name in ALWAYS_LOADED {
        assert!(held.iter().any(|(_, n)| n == name), "no {name} in {held:?}");
    }
    assert!(
        held.iter().all(|(_, name)| name.starts_with("tcprst_")),
        "{held:?}"
    );
    held.iter().map(|(id, _)| *id).collect()
}

/// The tracer's programs, loaded and ours, before it is stopped.
fn programs_of(pid: u32) -> BTreeSet<u32> {
    ours(&held_by(pid))
}

/// Program release is deferred in the kernel; give it a moment.
fn assert_unloaded(ids: &BTreeSet<u32>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let still: Vec<_> = loaded_programs()
            .into_iter()
            .filter(|(id, _)| ids.contains(id))
            .collect();
        if still.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still loaded after exit: {still:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn stops_cleanly_on(signal: i32) {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let ns = Netns::new();
    let tracer = Tracer::start(&["--netns", &ns.name]);
    let ids = programs_of(tracer.pid());
    let (status, _, stderr) = tracer.stop_with(signal);
    assert!(status.success(), "exit {status}; stderr:\n{stderr}");
    assert!(exit_summary(&stderr).is_some(), "{stderr}");
    assert_unloaded(&ids);
}

#[test]
fn sigterm_exits_0_and_unloads() {
    stops_cleanly_on(libc::SIGTERM);
}

#[test]
fn sigint_exits_0_and_unloads() {
    stops_cleanly_on(libc::SIGINT);
}

#[test]
fn closed_stdout_exits_0_and_unloads() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let ns = Netns::new();
    let mut spawned = Spawned::start(&["--netns", &ns.name]);
    let ids = programs_of(spawned.child.id());
    drop(spawned.stdout.take());
    // The next event written finds no reader.
    let _ = ns.connect("127.0.0.1:40010", "127.0.0.1:9");
    let (status, stderr) = spawned.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit {status}; stderr:\n{stderr}");
    assert_unloaded(&ids);
}

/// Nothing is pinned, so even a crash (here SIGKILL, which no cleanup code
/// sees) releases every program: so does a panic, which exits with 101.
#[test]
fn sigkill_leaves_nothing_loaded() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let ns = Netns::new();
    let tracer = Tracer::start(&["--netns", &ns.name]);
    let ids = programs_of(tracer.pid());
    let (status, _, _) = tracer.stop_with(libc::SIGKILL);
    assert_eq!(status.code(), None, "killed, not exited");
    assert_unloaded(&ids);
}

/// An error after the programs are attached (the metrics port is taken)
/// is one line, exit 1, and detaches everything.
#[test]
fn error_after_attach_unloads() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut child = Command::new(TCPRST)
        .args(["trace", "-o", "json", "--metrics-addr", &addr])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // It exits on its own, so its programs are caught while it runs: from
    // the first load to the error it also reads the kernel's symbols, which
    // takes many polls.
    let mut held = Vec::new();
    while child.try_wait().unwrap().is_none() {
        for program in held_by(child.id()) {
            if !held.contains(&program) {
                held.push(program);
            }
        }
        thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        the_error(&stderr).contains(&format!("serving metrics on {addr}")),
        "{stderr}"
    );
    assert_unloaded(&ours(&held));
}

/// A reader that stops reading cannot freeze the agent: it keeps serving
/// /metrics, stops on SIGTERM, and counts the events it could not write.
/// What did reach the pipe is whole lines, however full the pipe was when
/// tcprst stopped.
#[test]
fn a_stalled_reader_neither_freezes_tcprst_nor_hides_what_it_missed() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let ns = Netns::new();
    let mut spawned = Spawned::start(&[
        "--netns",
        &ns.name,
        "--detail-per-sec",
        "0",
        "--metrics-addr",
        "127.0.0.1:0",
    ]);
    let addr = metrics_addr(&spawned.stderr_text());
    // Held open and never read: the pipe fills, then the queue behind it.
    let mut stalled = spawned.stdout.take().expect("stdout is piped");
    ns.refused_connects(3.0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let unwritten = metric(&scrape(&addr), "tcprst_unwritten_events_total", &[]);
        if unwritten.is_some_and(|n| n > 0.0) {
            break;
        }
        assert!(Instant::now() < deadline, "no unwritten events counted");
        thread::sleep(Duration::from_millis(200));
    }
    send_signal(spawned.child.id(), libc::SIGTERM);
    // A frozen agent would never exit; the margin is for a loaded machine.
    let (status, stderr) = spawned.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "exit {status}; stderr:\n{stderr}");
    let unwritten = summary_count(&stderr, " events not written");
    assert!(unwritten > 0, "{stderr}");
    // Read only now: the pipe holds what reached it before tcprst stopped.
    let mut written = String::new();
    stalled.read_to_string(&mut written).unwrap();
    assert!(
        written.ends_with('\n'),
        "a cut last line: {:?}",
        &written[written.len().saturating_sub(200)..]
    );
    let events = written
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .unwrap_or_else(|e| panic!("{e}: {line}"))
        })
        .filter(|v| v["kind"] != "lost")
        .count() as u64;
    // Every event shown reached the pipe or is counted as not written
    // (which counts loss records too, so the sum may pass it).
    let shown = summary_count(&stderr, " events shown");
    assert!(
        events + unwritten >= shown,
        "{events} read, {unwritten} not written: {stderr}"
    );
}
