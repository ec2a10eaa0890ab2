//! Reset storms: the kernel counts resets past each key's budget, and the
//! detailed and aggregate records still add up to every reset, exactly.
//! The generator is connects to a closed port in a fresh namespace
//! (`Netns::refused_connects`), which counts its own refusals.

mod common;

use std::{
    io::ErrorKind,
    time::{Duration, Instant},
};

use common::{FileTracer, Netns, Tracer, records_read, summary_count};
use serde_json::Value;

const CLOSED_PORT: &str = "127.0.0.1:9";

fn of_kind<'a>(records: &'a [Value], kind: &str) -> Vec<&'a Value> {
    records.iter().filter(|v| v["kind"] == kind).collect()
}

fn count_of(records: &[&Value]) -> u64 {
    records.iter().map(|v| v["count"].as_u64().unwrap()).sum()
}

#[test]
fn every_reset_is_counted_exactly_in_a_storm() {
    let ns = Netns::new();
    let tracer = Tracer::in_netns(&ns, &[]);
    let refused = ns.refused_connects(2.0);
    assert!(refused > 1000, "only {refused} connects in 2 s");
    // The last tallies are read as tracing stops.
    let (status, records, stderr) = tracer.stop_with(libc::SIGTERM);
    assert!(status.success(), "{stderr}");
    assert_eq!(summary_count(&stderr, " lost"), 0, "{stderr}");
    for kind in ["rst_sent", "rst_received"] {
        let detailed = of_kind(&records, kind);
        let aggregates = of_kind(&records, &format!("{kind}_aggregate"));
        assert_eq!(
            count_of(&detailed) + count_of(&aggregates),
            refused,
            "{kind}: {} detailed, aggregates {:?}; stderr:\n{stderr}",
            detailed.len(),
            aggregates
                .iter()
                .map(|v| v["count"].clone())
                .collect::<Vec<_>>()
        );
        assert!(!aggregates.is_empty(), "{kind}: no aggregate records");
        for aggregate in aggregates {
            // What the key keeps: the service end; the clients' ports vary.
            let (service, client) = match kind {
                "rst_sent" => ("local", "remote"),
                _ => ("remote", "local"),
            };
            assert_eq!(aggregate[format!("{service}_port")], 9, "{aggregate:#}");
            assert_eq!(aggregate[format!("{client}_port")], 0, "{aggregate:#}");
            let ports = aggregate["aggregate"]["ports"].as_array().unwrap();
            assert!(!ports.is_empty(), "{aggregate:#}");
        }
    }
    // The detailed records are the only ones the ring buffer carried.
    let detailed =
        (of_kind(&records, "rst_sent").len() + of_kind(&records, "rst_received").len()) as u64;
    assert_eq!(records_read(&stderr), detailed, "{stderr}");
}

#[test]
fn a_key_gets_its_budget_of_detailed_records_a_second() {
    let ns = Netns::new();
    let tracer = Tracer::in_netns(&ns, &["--detail-per-sec", "5"]);
    let refused = ns.refused_connects(2.0);
    let (status, records, stderr) = tracer.stop_with(libc::SIGTERM);
    assert!(status.success(), "{stderr}");
    for kind in ["rst_sent", "rst_received"] {
        let detailed = of_kind(&records, kind).len() as u64;
        // Two seconds overlap at most three tally periods of 5 each.
        assert!(
            (5..=15).contains(&detailed),
            "{kind}: {detailed} detailed records"
        );
        let aggregates = of_kind(&records, &format!("{kind}_aggregate"));
        assert_eq!(count_of(&aggregates), refused - detailed, "{kind}");
    }
}

#[test]
fn every_reset_gets_a_record_with_no_budget() {
    let ns = Netns::new();
    // Room for every record even if the reader ran not at all during the
    // storm (a loaded machine starves it): 64 MiB is some 350,000 records,
    // where two threads refuse at most about 100,000 connects in 0.5 s here.
    // So the count is about budgets, not loss.
    let tracer = Tracer::in_netns(&ns, &["--detail-per-sec", "0", "--buffer-pages", "16384"]);
    let refused = ns.refused_connects(0.5);
    let (status, records, stderr) = tracer.stop_with(libc::SIGTERM);
    assert!(status.success(), "{stderr}");
    assert_eq!(
        summary_count(&stderr, " lost"),
        0,
        "raise the buffer for this test: {stderr}"
    );
    assert!(!records.iter().any(|v| v["aggregate"].is_object()));
    // Every reset was read as its own record; this test's reader may fall
    // behind a storm's worth of lines, which tcprst then drops whole and
    // counts rather than stall: shown plus not written is every reset.
    assert_eq!(records_read(&stderr), 2 * refused, "{stderr}");
    let shown =
        (of_kind(&records, "rst_sent").len() + of_kind(&records, "rst_received").len()) as u64;
    assert_eq!(
        shown + summary_count(&stderr, " events not written"),
        2 * refused,
        "{stderr}"
    );
}

/// `tcprst trace -o json > FILE`: a regular file takes up to a chunk of
/// lines a write, not a pipe's 4 KiB pieces, and still gets every reset of
/// a storm as one whole line, or counts it as not written.
#[test]
fn a_file_gets_every_reset_as_a_whole_line() {
    let ns = Netns::new();
    // Room for the whole storm, as in every_reset_gets_a_record_with_no_budget.
    let tracer = FileTracer::in_netns(&ns, &["--detail-per-sec", "0", "--buffer-pages", "16384"]);
    let refused = ns.refused_connects(0.5);
    let (status, text, stderr) = tracer.stop();
    assert!(status.success(), "{stderr}");
    assert_eq!(summary_count(&stderr, " lost"), 0, "{stderr}");
    assert!(
        text.ends_with('\n'),
        "the file ends in a cut line: {:?}",
        &text[text.len().saturating_sub(300)..]
    );
    let records: Vec<Value> = text
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a whole JSON line ({e}): {line:?}"))
        })
        .collect();
    assert_eq!(records_read(&stderr), 2 * refused, "{stderr}");
    let shown =
        (of_kind(&records, "rst_sent").len() + of_kind(&records, "rst_received").len()) as u64;
    assert!(shown > 0, "{stderr}");
    assert_eq!(
        shown + summary_count(&stderr, " events not written"),
        2 * refused,
        "{stderr}"
    );
}

/// Once a storm's tallies are all reported its key's budget has started
/// again, and the programs wake the reader only for a batch of records: a
/// lone reset must still show up at once, from the reader's drain timer.
#[test]
fn a_lone_reset_after_a_storm_is_shown_promptly() {
    let ns = Netns::new();
    let mut tracer = Tracer::in_netns(&ns, &[]);
    let refused = ns.refused_connects(1.0);
    tracer.wait_for_rsts(2 * refused);
    let sent_at = Instant::now();
    let err = ns.connect("127.0.0.1:40005", CLOSED_PORT).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    tracer.wait_for("the lone reset", |v| {
        v["kind"] == "rst_received" && v["local_port"] == 40005
    });
    let waited = sent_at.elapsed();
    // The drain timer runs every 50 ms: a second is a wide margin.
    assert!(waited < Duration::from_secs(1), "shown after {waited:?}");
    tracer.stop();
}
