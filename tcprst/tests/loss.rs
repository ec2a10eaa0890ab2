//! Nothing is lost silently: when the ring buffer overflows, the kernel
//! counts what it dropped and tcprst reports it, on stdout and stderr.

mod common;

use common::{Netns, Tracer, records_read, rsts, send_signal};

#[test]
fn overflow_is_counted_and_reported() {
    const CONNECTS: u64 = 500;
    let ns = Netns::new();
    // One page holds a few dozen records; a record for every reset, so the
    // kernel's tallies do not absorb the overflow this test makes.
    let tracer = Tracer::start(&[
        "--netns",
        &ns.name,
        "--buffer-pages",
        "1",
        "--detail-per-sec",
        "0",
    ]);
    // Freeze the reader so the ring buffer fills up.
    send_signal(tracer.pid(), libc::SIGSTOP);
    for i in 0..CONNECTS {
        let from = format!("127.0.0.1:{}", 20000 + i);
        assert!(ns.connect(&from, "127.0.0.1:9").is_err());
    }
    send_signal(tracer.pid(), libc::SIGCONT);
    // The loss report comes within a second of the reader resuming.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let (status, records, stderr) = tracer.stop_with(libc::SIGTERM);
    assert!(status.success(), "{stderr}");

    let shown = rsts(&records).len() as u64;
    let lost_records: Vec<_> = records.iter().filter(|r| r["kind"] == "lost").collect();
    assert!(
        !lost_records.is_empty(),
        "no lost record; stderr:\n{stderr}"
    );
    let lost_sum: u64 = lost_records
        .iter()
        .map(|r| r["lost"].as_u64().unwrap())
        .sum();
    let lost_total = lost_records.last().unwrap()["lost_total"].as_u64().unwrap();
    assert_eq!(lost_sum, lost_total);
    // Every record is either read or counted as lost. Each connect makes
    // two: the RST sent and the RST received (state changes make none).
    let read = records_read(&stderr);
    assert_eq!(
        read + lost_total,
        2 * CONNECTS,
        "read {read}, lost {lost_total}"
    );
    assert!(shown > 0 && lost_total > 0 && shown <= read);
    assert!(
        stderr.contains(&format!("({lost_total} in total)"))
            && stderr.contains(&format!(
                "{read} records read, {shown} events shown, {lost_total} lost"
            )),
        "{stderr}"
    );
}
