//! tcprst started during a reset storm traced a line per reset. Its reset
//! programs attach before its event loop reads the ring buffer: reading the
//! kernel's symbols, asking the container runtimes and the first scan come
//! between, some 100 ms here. Startup copies the ring meanwhile, so the
//! storm's records of that time are all read. A file of its own: other
//! tests' storms running beside it would stretch the startup past what
//! any ring holds.

mod common;

use std::{
    io::ErrorKind,
    net::{SocketAddr, TcpStream},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use common::{FileTracer, Netns, records_read, rsts, summary_count};
use serde_json::Value;

/// Refused connects to the closed port 9, at about `rate` a second from one
/// thread, until `stop`; how many were refused.
fn paced_refused_connects(ns: &Netns, rate: u32, stop: &AtomicBool) -> u64 {
    let target = SocketAddr::from(([127, 0, 0, 1], 9));
    let started = Instant::now();
    ns.enter(|| {
        let mut refused = 0u64;
        while !stop.load(Ordering::Relaxed) {
            match TcpStream::connect(target) {
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => refused += 1,
                other => panic!("a connect to a closed port gave {other:?}"),
            }
            let due = started + Duration::from_secs_f64(refused as f64 / f64::from(rate));
            if let Some(ahead) = due.checked_duration_since(Instant::now()) {
                thread::sleep(ahead);
            }
        }
        refused
    })
}

/// 5,000 connects a second are 10,000 records; a ring of 32 pages holds
/// about 1,200 of them, some 120 ms of the storm: less than the startup of
/// the debug build the tests run (reading the kernel's symbols alone takes
/// some 450 ms), and many times a copy's interval.
#[test]
fn a_storm_under_way_at_start_loses_nothing() {
    let ns = Netns::new();
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        let storm = s.spawn(|| paced_refused_connects(&ns, 5_000, &stop));
        thread::sleep(Duration::from_millis(300));
        // Returns once tcprst is tracing: its whole startup fell in the
        // storm. Into a file, which never falls behind as this test's
        // reader of a pipe could (its lines would be dropped, counted).
        let tracer = FileTracer::in_netns(&ns, &["--detail-per-sec", "0", "--buffer-pages", "32"]);
        thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        let refused = storm.join().unwrap();
        let (status, text, stderr) = tracer.stop();
        assert!(status.success(), "{stderr}");
        let records: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(summary_count(&stderr, " lost"), 0, "{stderr}");
        // Read at startup as well as after: more than the 500 ms after it.
        let read = records_read(&stderr);
        assert!(
            read > 5_000 && read <= 2 * refused,
            "{read} read of {refused} connects"
        );
        assert_eq!(rsts(&records).len() as u64, read, "{stderr}");
    });
}
