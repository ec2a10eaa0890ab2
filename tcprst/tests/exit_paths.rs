//! Every way `tcprst trace` ends must exit 0 and leave no program of its
//! own loaded in the kernel.

mod common;

use std::{
    collections::BTreeSet,
    fs, thread,
    time::{Duration, Instant},
};

use common::{Netns, Spawned, Tracer, wait_timeout};

/// BPF program ids held by a process's file descriptors (programs, links,
/// perf events).
fn prog_ids_of(pid: u32) -> BTreeSet<u32> {
    fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
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

/// The tracer's programs, checked to be ours, before it is stopped.
fn programs_of(pid: u32) -> BTreeSet<u32> {
    let ids = prog_ids_of(pid);
    let ours: Vec<_> = loaded_programs()
        .into_iter()
        .filter(|(id, _)| ids.contains(id))
        .collect();
    assert!(
        ours.len() >= 4,
        "expected tcprst's programs, found {ours:?}"
    );
    assert!(
        ours.iter().all(|(_, name)| name.starts_with("tcprst_")),
        "{ours:?}"
    );
    ids
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
    let ns = Netns::new();
    let tracer = Tracer::start(&["--netns", &ns.name]);
    let ids = programs_of(tracer.pid());
    let (status, _, stderr) = tracer.stop_with(signal);
    assert!(status.success(), "exit {status}; stderr:\n{stderr}");
    assert!(stderr.contains("tcprst: stopped: "), "{stderr}");
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
    let ns = Netns::new();
    let mut spawned = Spawned::start(&["--netns", &ns.name]);
    let ids = programs_of(spawned.child.id());
    drop(spawned.stdout.take());
    // The next event written finds no reader.
    let _ = ns.connect("127.0.0.1:40010", "127.0.0.1:9");
    let status = wait_timeout(&mut spawned.child, Duration::from_secs(10));
    assert!(
        status.success(),
        "exit {status}; stderr:\n{}",
        spawned.stderr_text()
    );
    assert_unloaded(&ids);
}
