//! Userspace cost per reset record (#11): decoding alone, and decoding plus
//! the NDJSON line, over two streams of records a real `tcprst trace`
//! dumped with `TCPRST_DUMP_RECORDS`:
//! - `fuzz/seeds/decode_record/` (the decoder's fuzz seeds): resets of
//!   every kind, each of its own key, so what one line renders is of no
//!   use to the next;
//! - `tcprst/testdata/storm-records/`: 64 records of a refused-connect
//!   storm in a namespace (`tcprst-loadgen rst`), which alternate between
//!   two keys, as a storm's lines do.
//!
//! Criterion times one record per iteration, cycling through the stream, so
//! its time per iteration is the CPU time one record costs. Allocations per record
//! are counted once, over one pass of the stream, and printed first.
//!
//! Nothing the machine provides is read in the measured loop: reason names
//! come from the 6.18 tracepoint format in testdata, the wall clock offset
//! is taken once, and the attribution is what needs no /proc or cgroupfs.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    hint::black_box,
    io,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use criterion::{Criterion, criterion_group, criterion_main};
use tcprst::{
    bpf::layout::ReasonNames,
    bpf::tracefs::EventFormat,
    host::enrich::{Attribution, acting_owner},
    model::event::{RstEvent, RstKind},
    output::{JsonSink, Peer, RstReport, Sink},
    pipeline::clock::WallClock,
    pipeline::decode::Decoder,
    pipeline::diagnosis::KernelView,
    pipeline::origin::Origin,
};

/// The system allocator, counting allocations.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator, which
// upholds GlobalAlloc's contract; the counter has no effect on memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        // SAFETY: the caller's layout, as GlobalAlloc::alloc requires.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: ptr was allocated by System with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        // SAFETY: ptr was allocated by System with this layout.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn recorded_stream(from_manifest: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(from_manifest);
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    paths.sort();
    paths.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

fn decoder() -> Decoder {
    let format = EventFormat::parse(include_str!("../testdata/format-6.18/tcp_send_reset"))
        .expect("the 6.18 tcp_send_reset format parses");
    Decoder::new(ReasonNames::load(&format, None), WallClock::now())
}

/// What the trace loop would have to say about a record, short of what it
/// reads from the machine: the namespace's name stands for the one the
/// enricher caches, and the caller for the one kallsyms would name.
struct Pipeline {
    decoder: Decoder,
    sink: JsonSink,
    netns_name: Arc<str>,
    caller: Arc<str>,
}

impl Pipeline {
    fn new() -> Self {
        Self {
            decoder: decoder(),
            sink: JsonSink::new(Box::new(io::sink()), "node-a".into()),
            netns_name: "bench".into(),
            caller: "tcp_v4_rcv".into(),
        }
    }

    fn decode(&mut self, bytes: &[u8]) -> RstEvent {
        self.decoder
            .decode(bytes)
            .expect("a recorded record decodes")
    }

    fn line(&mut self, bytes: &[u8]) {
        let ev = self.decode(bytes);
        let netns_name = ev.netns.map(|_| self.netns_name.clone());
        // In a storm every received reset is explained by a send of this
        // host, whose socket is its peer.
        let received = ev.kind == RstKind::Received;
        let peer = received.then(|| Peer {
            netns: ev.netns,
            attribution: Attribution {
                netns_name: netns_name.clone(),
                ..Attribution::default()
            },
            sent_reason: None,
        });
        let attribution = Attribution {
            netns_name,
            cgroup_id: ev.cgroup_id,
            owner: acting_owner(&ev),
            ..Attribution::default()
        };
        let mut report = RstReport::new(
            ev,
            attribution,
            peer,
            &KernelView::default(),
            Some(self.caller.clone()),
            None,
        );
        report.origin = received.then_some(Origin::LocalTcp);
        self.sink.rst(&report).unwrap();
    }
}

fn allocations_per_record(stream: &[Vec<u8>], mut each: impl FnMut(&[u8])) -> f64 {
    // One pass first, so caches fill as they would in a long trace.
    stream.iter().for_each(|r| each(r));
    let before = ALLOCATIONS.load(Relaxed);
    stream.iter().for_each(|r| each(r));
    (ALLOCATIONS.load(Relaxed) - before) as f64 / stream.len() as f64
}

fn records(c: &mut Criterion) {
    for (name, dir) in [
        ("", "../fuzz/seeds/decode_record"),
        ("storm ", "testdata/storm-records"),
    ] {
        let stream = recorded_stream(dir);
        let mut pipeline = Pipeline::new();
        let decode = allocations_per_record(&stream, |r| drop(black_box(pipeline.decode(r))));
        let line = allocations_per_record(&stream, |r| pipeline.line(r));
        println!(
            "{}: {} recorded records; allocations per record: decode {decode:.2}, decode+json {line:.2}",
            dir,
            stream.len()
        );

        let mut next = stream.iter().cycle();
        c.bench_function(&format!("{name}decode"), |b| {
            b.iter_custom(|iters| {
                on_cpu(|| {
                    for _ in 0..iters {
                        black_box(pipeline.decode(next.next().unwrap()));
                    }
                })
            })
        });
        c.bench_function(&format!("{name}decode+json"), |b| {
            b.iter_custom(|iters| {
                on_cpu(|| {
                    for _ in 0..iters {
                        pipeline.line(black_box(next.next().unwrap()));
                    }
                })
            })
        });
    }
}

/// The CPU time this thread spent in `f`. Wall time would count the time
/// other processes held the CPU, and the machines this runs on share their
/// few CPUs with other builds.
fn on_cpu(f: impl FnOnce()) -> Duration {
    let start = thread_cpu_time();
    f();
    thread_cpu_time() - start
}

fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid pointer to a timespec, which the call fills in.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "CLOCK_THREAD_CPUTIME_ID");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

criterion_group!(benches, records);
criterion_main!(benches);
