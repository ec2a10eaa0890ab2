//! Prometheus metrics on `--metrics-addr`: what a dashboard or an alert
//! needs, where the NDJSON stream is for reading incidents.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    str::FromStr,
    sync::{Arc, Mutex, MutexGuard, PoisonError, atomic::AtomicU64},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow};
use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::CONTENT_TYPE,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{net::TcpListener, sync::Semaphore};

use crate::{
    host::{k8s::PodMeta, overflows::Sample},
    memo::same_value,
    model::event::TcpState,
};

/// Where to serve: `IP:PORT`, or a bare `PORT` (or `:PORT`) on 127.0.0.1 so
/// nothing is exposed beyond the host unless asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsAddr(pub SocketAddr);

impl FromStr for MetricsAddr {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        if let Ok(addr) = s.parse() {
            return Ok(Self(addr));
        }
        let port: u16 = s
            .trim_start_matches(':')
            .parse()
            .map_err(|_| anyhow!("{s:?} is not IP:PORT or a port"))?;
        Ok(Self(SocketAddr::from(([127, 0, 0, 1], port))))
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RstLabels {
    direction: &'static str,
    reason: String,
    caller: String,
    namespace: String,
    pod: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StuckLabels {
    state: &'static str,
    namespace: String,
    pod: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabels {
    tier: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NetnsLabels {
    netns_name: String,
}

pub struct Metrics {
    registry: Registry,
    rsts: Family<RstLabels, Counter>,
    /// The reset series of each (namespace, pod), so they go when the pod
    /// does: pods come and go, and their series would otherwise pile up.
    pod_series: Mutex<HashMap<(String, String), HashSet<RstLabels>>>,
    /// The reset series counted last, and their counters: a storm counts
    /// into a few series, and finding one here compares addresses, where
    /// the family would copy four label strings and hash them for each
    /// reset.
    recent_rsts: Mutex<VecDeque<(RecentSeries, Counter)>>,
    stuck: Family<StuckLabels, Gauge>,
    /// The stuck series the last scan set, so the next removes those it
    /// does not set: a pod's series lasts only while it has stuck
    /// connections.
    stuck_series: Mutex<HashSet<StuckLabels>>,
    lost: Counter,
    stack_failures: Counter,
    programs: Family<TierLabels, Gauge>,
    tracked: Gauge,
    evicted: Gauge,
    undecodable: Counter,
    sends_forgotten: Counter,
    receipts_unmatched: Counter,
    tally_full: Counter,
    unwritten: Counter,
    tuple_failures: Counter,
    skipped_runs: Counter,
    conntrack_skipped: Counter,
    conntrack_failed: Counter,
    close_notes_overwritten: Counter,
    phantom_receipts: Counter,
    scans: Counter,
    scan_seconds: Counter<f64, AtomicU64>,
    scan_namespaces: Gauge,
    scan_namespaces_walked: Gauge,
    scan_failures: Counter,
    listen_overflows: Family<NetnsLabels, Counter>,
    /// The namespaces `listen_overflows` has a series for, so those of
    /// namespaces gone go too.
    overflow_series: Mutex<HashSet<NetnsLabels>>,
}

/// Totals since start of what tcprst could not do or decide; the metrics
/// advance to them.
#[derive(Debug, Default, Clone, Copy)]
pub struct Shortfalls {
    pub undecodable: u64,
    pub sends_forgotten: u64,
    pub receipts_unmatched: u64,
    pub tally_full: u64,
    pub unwritten: u64,
    pub tuple_failures: u64,
    pub skipped_runs: u64,
    pub conntrack_skipped: u64,
    pub conntrack_failed: u64,
    pub close_notes_overwritten: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tcprst");
        let rsts = Family::<RstLabels, Counter>::default();
        registry.register(
            "resets",
            "TCP resets sent and received, by kernel reason, calling kernel function, and Kubernetes namespace and pod",
            rsts.clone(),
        );
        let stuck = Family::<StuckLabels, Gauge>::default();
        registry.register(
            "halfclose_stuck",
            "Connections half-closed longer than --stuck-after, by TCP state and Kubernetes namespace and pod",
            stuck.clone(),
        );
        let lost = Counter::default();
        registry.register(
            "lost_events",
            "Events the kernel dropped because the ring buffer was full",
            lost.clone(),
        );
        let stack_failures = Counter::default();
        registry.register(
            "stack_capture_failures",
            "Resets whose calling kernel function could not be read from the stack (their caller is null)",
            stack_failures.clone(),
        );
        let programs = Family::<TierLabels, Gauge>::default();
        registry.register(
            "programs_attached",
            "eBPF programs attached, by attach tier",
            programs.clone(),
        );
        let tracked = Gauge::default();
        registry.register(
            "tracked_connections",
            "Half-closed connections the last scan found and tcprst follows (bounded by --max-connections)",
            tracked.clone(),
        );
        let listen_overflows = Family::<NetnsLabels, Counter>::default();
        registry.register(
            "listen_overflows",
            "Connections turned away at a full accept queue (TcpExt ListenOverflows: SYNs or handshake ACKs dropped, or reset with tcp_abort_on_overflow=1), by network namespace, as the kernel counts them since the namespace was made",
            listen_overflows.clone(),
        );
        let evicted = Gauge::default();
        registry.register(
            "untracked_connections",
            "Half-closed connections the last scans left untracked because --max-connections was reached, since start",
            evicted.clone(),
        );
        let mut counter = |name: &str, help: &str| {
            let counter = Counter::default();
            registry.register(name, help, counter.clone());
            counter
        };
        let undecodable = counter(
            "undecodable_records",
            "Ring-buffer records or kernel tallies tcprst could not decode (a version mismatch or a bug)",
        );
        let sends_forgotten = counter(
            "origin_sends_forgotten",
            "Resets sent that origin matching forgot within their match window, to stay bounded in a storm: a receipt only they explain is reported as not local",
        );
        let receipts_unmatched = counter(
            "origin_receipts_unmatched",
            "Received resets no reset sent on this host explained (reported as from another host, a middlebox or a userspace stack)",
        );
        let tally_full = counter(
            "tally_full_resets",
            "Resets past their key's --detail-per-sec budget that still got their own record because the kernel's tally map was full",
        );
        let unwritten = counter(
            "unwritten_events",
            "Events dropped whole because the reader of stdout fell behind (the queue to it was full)",
        );
        let tuple_failures = counter(
            "tuple_read_failures",
            "Resets the kernel programs dropped because the connection's ends could not be read (--debug-bpf logs which read)",
        );
        let skipped_runs = counter(
            "skipped_program_runs",
            "Runs of tcprst's kernel programs the kernel skipped because a tracing program was already running on that CPU: resets or state changes nothing recorded or counted",
        );
        let conntrack_skipped = counter(
            "conntrack_lookups_skipped",
            "Conntrack lookups for resets across NAT skipped under a storm (rate limit or a full queue) while some namespace's conntrack held entries, or unanswered when tracing stopped",
        );
        let conntrack_failed = counter(
            "conntrack_lookup_failures",
            "Conntrack lookups that failed in some network namespace for a reason other than no such entry",
        );
        let close_notes_overwritten = counter(
            "close_notes_overwritten",
            "Close notes (who started closing a socket, and its steps) lost unread: overwritten in the kernel's ring before tcprst read them, or not kept because 65,536 closes were in progress. A socket they belong to is reported without who started its close",
        );
        let phantom_receipts = counter(
            "phantom_receipts",
            "Received resets the kernel reported though none arrived: its own abort of a socket shut down for reading when data came (TCP_ABORT_ON_DATA), whose reset it sent is counted as sent. Not shown, and not in tcprst_resets_total",
        );
        let scans = counter(
            "scans",
            "Scans for stuck half-closed connections: each asks sock_diag for the half-closed sockets of every network namespace tcprst watches",
        );
        let scan_seconds = Counter::<f64, AtomicU64>::default();
        registry.register(
            "scan_seconds",
            "Time the scans took. The kernel walks its whole TCP socket table, TIME_WAIT included, once for each namespace dumped, so this grows with those namespaces times sockets",
            scan_seconds.clone(),
        );
        let scan_namespaces = Gauge::default();
        registry.register(
            "scan_namespaces",
            "Network namespaces the last scan visited",
            scan_namespaces.clone(),
        );
        let scan_failures = Counter::default();
        registry.register(
            "scan_failures",
            "Namespaces a scan could not dump (sock_diag refused or failed, e.g. without the tcp_diag module): their stuck half-closed connections go unreported",
            scan_failures.clone(),
        );
        let scan_namespaces_walked = Gauge::default();
        registry.register(
            "scan_namespaces_walked",
            "Of those, the namespaces whose half-closed sockets the last scan dumped, walking the whole TCP socket table; the others' socket counters showed nothing but listeners",
            scan_namespaces_walked.clone(),
        );
        Self {
            registry,
            rsts,
            pod_series: Mutex::default(),
            recent_rsts: Mutex::default(),
            stuck,
            stuck_series: Mutex::default(),
            lost,
            stack_failures,
            programs,
            tracked,
            evicted,
            undecodable,
            sends_forgotten,
            receipts_unmatched,
            tally_full,
            unwritten,
            tuple_failures,
            skipped_runs,
            conntrack_skipped,
            conntrack_failed,
            close_notes_overwritten,
            phantom_receipts,
            scans,
            scan_seconds,
            scan_namespaces,
            scan_namespaces_walked,
            scan_failures,
            listen_overflows,
            overflow_series: Mutex::default(),
        }
    }
}

/// The labels of a reset, as a record carries them: each a value the
/// decoder, the caller's cache and the pod watch share among records.
#[derive(Clone, Copy)]
pub struct ResetSeries<'a> {
    pub sent: bool,
    pub reason: Option<&'a Arc<str>>,
    pub caller: Option<&'a Arc<str>>,
    pub pod: Option<&'a Arc<PodMeta>>,
}

/// A series counted lately, by the addresses of its labels. It holds them,
/// so no address can be reused by another value while it is kept; equal
/// labels at other addresses only take another entry for the same counter.
struct RecentSeries {
    sent: bool,
    reason: Option<Arc<str>>,
    caller: Option<Arc<str>>,
    pod: Option<Arc<PodMeta>>,
}

impl RecentSeries {
    fn is(&self, s: &ResetSeries) -> bool {
        self.sent == s.sent
            && same_value(self.reason.as_ref(), s.reason)
            && same_value(self.caller.as_ref(), s.caller)
            && same_value(self.pod.as_ref(), s.pod)
    }
}

impl Metrics {
    /// Counts `resets` resets into their series.
    pub fn reset(&self, series: ResetSeries, resets: u64) {
        let mut recent = lock(&self.recent_rsts);
        if let Some((_, counter)) = recent.iter().find(|(kept, _)| kept.is(&series)) {
            counter.inc_by(resets);
            return;
        }
        let text = |label: Option<&Arc<str>>| label.map_or(String::new(), |l| l.to_string());
        let pod = series.pod;
        let labels = RstLabels {
            direction: if series.sent { "sent" } else { "received" },
            reason: text(series.reason),
            caller: text(series.caller),
            namespace: pod.map_or(String::new(), |p| p.namespace.clone()),
            pod: pod.map_or(String::new(), |p| p.name.clone()),
        };
        let counter = self.rsts.get_or_create(&labels).clone();
        counter.inc_by(resets);
        if !labels.pod.is_empty() {
            lock(&self.pod_series)
                .entry((labels.namespace.clone(), labels.pod.clone()))
                .or_default()
                .insert(labels.clone());
        }
        if recent.len() == RECENT_RST_SERIES {
            recent.pop_back();
        }
        let kept = RecentSeries {
            sent: series.sent,
            reason: series.reason.cloned(),
            caller: series.caller.cloned(),
            pod: series.pod.cloned(),
        };
        recent.push_front((kept, counter));
    }

    /// Drops the reset series of every pod `exists` no longer knows.
    pub fn forget_pods(&self, exists: impl Fn(&str, &str) -> bool) {
        // A counter kept here may be one about to leave the family.
        lock(&self.recent_rsts).clear();
        lock(&self.pod_series).retain(|(namespace, pod), series| {
            let keep = exists(namespace, pod);
            if !keep {
                for labels in series.iter() {
                    self.rsts.remove(labels);
                }
            }
            keep
        });
    }

    /// Sets the stuck gauges to one scan's counts, each of connections in
    /// a state and, when known, a pod (namespace, name). Every half-closed
    /// state keeps its series outside any pod, 0 when nothing is stuck, so
    /// a state's total is always there; a pod's series go with its last
    /// stuck connection.
    pub fn set_stuck<'a>(
        &self,
        counts: impl IntoIterator<Item = (TcpState, Option<(&'a str, &'a str)>, usize)>,
    ) {
        let labels = |state: TcpState, (namespace, pod): (&str, &str)| StuckLabels {
            state: state.name(),
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
        };
        let mut now: HashMap<StuckLabels, i64> = TcpState::HALF_CLOSED
            .iter()
            .map(|state| (labels(*state, ("", "")), 0))
            .collect();
        for (state, pod, n) in counts {
            *now.entry(labels(state, pod.unwrap_or_default()))
                .or_default() += n as i64;
        }
        // Set before removing, never cleared first: a scrape in between
        // would miss series that are still stuck, and Prometheus would
        // restart the `for:` of their alerts.
        let mut last = lock(&self.stuck_series);
        for (labels, n) in &now {
            self.stuck.get_or_create(labels).set(*n);
        }
        for gone in last.iter().filter(|l| !now.contains_key(*l)) {
            self.stuck.remove(gone);
        }
        *last = now.into_keys().collect();
    }

    pub fn tracker(&self, tracked: usize, untracked: u64) {
        self.tracked.set(tracked as i64);
        self.evicted.set(untracked as i64);
    }

    pub fn lost(&self, n: u64) {
        self.lost.inc_by(n);
    }

    pub fn phantom_receipts(&self, n: u64) {
        self.phantom_receipts.inc_by(n);
    }

    pub fn stack_failures(&self, n: u64) {
        self.stack_failures.inc_by(n);
    }

    pub fn shortfalls(&self, totals: &Shortfalls) {
        for (counter, total) in [
            (&self.undecodable, totals.undecodable),
            (&self.sends_forgotten, totals.sends_forgotten),
            (&self.receipts_unmatched, totals.receipts_unmatched),
            (&self.tally_full, totals.tally_full),
            (&self.unwritten, totals.unwritten),
            (&self.tuple_failures, totals.tuple_failures),
            (&self.skipped_runs, totals.skipped_runs),
            (&self.conntrack_skipped, totals.conntrack_skipped),
            (&self.conntrack_failed, totals.conntrack_failed),
            (
                &self.close_notes_overwritten,
                totals.close_notes_overwritten,
            ),
        ] {
            counter.inc_by(total.saturating_sub(counter.get()));
        }
    }

    /// One scan, which took `took` over `namespaces` network namespaces,
    /// dumping `walked` of them.
    pub fn scanned(&self, took: Duration, namespaces: usize, walked: usize) {
        self.scans.inc();
        self.scan_seconds.inc_by(took.as_secs_f64());
        self.scan_namespaces.set(namespaces as i64);
        self.scan_namespaces_walked.set(walked as i64);
    }

    /// Namespaces one scan could not dump.
    pub fn scan_failures(&self, unread: usize) {
        self.scan_failures.inc_by(unread as u64);
    }

    /// Each sampled namespace's count, as the kernel has it; namespaces
    /// not sampled any more lose their series.
    pub fn listen_overflows(&self, samples: &[Sample]) {
        let mut totals: HashMap<NetnsLabels, u64> = HashMap::new();
        // Two namespaces can carry one name (a container's); their counts add.
        for sample in samples {
            let labels = NetnsLabels {
                netns_name: sample.name.clone(),
            };
            *totals.entry(labels).or_default() += sample.total;
        }
        let mut series = self
            .overflow_series
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        series.retain(|labels| {
            let keep = totals.contains_key(labels);
            if !keep {
                self.listen_overflows.remove(labels);
            }
            keep
        });
        for (labels, total) in totals {
            let current = self.listen_overflows.get_or_create(&labels).get();
            // A name now on a newer namespace, with a smaller count, starts over.
            if total < current {
                self.listen_overflows.remove(&labels);
            }
            let counter = self.listen_overflows.get_or_create(&labels);
            counter.inc_by(total - counter.get());
            series.insert(labels);
        }
    }

    pub fn programs_attached(&self, tier: &'static str, n: usize) {
        self.programs
            .get_or_create(&TierLabels { tier })
            .set(n as i64);
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

// Every update of these maps and sets is one insert, retain or assignment:
// a panic elsewhere cannot leave one half-changed, so a poisoned lock is
// still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Connections served at once; more wait in the listen backlog, so idle
/// or slow clients cannot take the agent's descriptors or memory.
const MAX_CONNECTIONS: usize = 64;
/// Reset series whose counters `Metrics::reset` keeps at hand.
const RECENT_RST_SERIES: usize = 8;
/// A client that has not sent its request headers by then is dropped, so
/// idle connections free their slot for the next scrape.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest pause after failed accepts (EMFILE, ENFILE, ENOBUFS), which
/// would otherwise fail again at once and spin.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Binds now, so a bad or busy address fails before tracing starts, and
/// returns the task that serves `/metrics`.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("serving metrics on {addr}"))?;
    log::info!("metrics on http://{}/metrics", listener.local_addr()?);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    Ok(tokio::spawn(async move {
        let mut backoff = Duration::ZERO;
        loop {
            // Accept only with a free slot: the rest wait in the backlog.
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let stream = match listener.accept().await {
                Ok((stream, _)) => {
                    backoff = Duration::ZERO;
                    stream
                }
                Err(e) => {
                    if backoff.is_zero() {
                        log::warn!("metrics: accepting a connection: {e}");
                    }
                    backoff = (backoff * 2).clamp(Duration::from_millis(10), MAX_ACCEPT_BACKOFF);
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| answer(req, metrics.clone()));
                let _ = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                drop(slot);
            });
        }
    }))
}

async fn answer(
    req: Request<Incoming>,
    metrics: Arc<Metrics>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = if req.uri().path() == "/metrics" {
        Response::builder()
            .header(
                CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Full::from(metrics.encode()))
    } else {
        Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Full::from("try /metrics\n"))
    };
    Ok(response.expect("static response parts are valid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts as a record would, its labels in values of their own.
    fn count(
        m: &Metrics,
        sent: bool,
        reason: Option<&str>,
        caller: Option<&str>,
        pod: Option<(&str, &str)>,
        resets: u64,
    ) {
        let text = |t: Option<&str>| t.map(Arc::<str>::from);
        let (reason, caller) = (text(reason), text(caller));
        let pod = pod.map(|(namespace, name)| {
            Arc::new(PodMeta {
                namespace: namespace.into(),
                name: name.into(),
                ..PodMeta::default()
            })
        });
        let series = ResetSeries {
            sent,
            reason: reason.as_ref(),
            caller: caller.as_ref(),
            pod: pod.as_ref(),
        };
        m.reset(series, resets);
    }

    #[test]
    fn addresses_default_to_loopback() {
        let parse = |s: &str| s.parse::<MetricsAddr>().map(|a| a.0.to_string());
        assert_eq!(parse("9090").unwrap(), "127.0.0.1:9090");
        assert_eq!(parse(":9090").unwrap(), "127.0.0.1:9090");
        assert_eq!(parse("0.0.0.0:9090").unwrap(), "0.0.0.0:9090");
        assert_eq!(parse("[::]:9090").unwrap(), "[::]:9090");
        assert!(parse("localhost").is_err());
        assert!(parse("1.2.3.4").is_err());
    }

    #[test]
    fn a_gone_pods_series_go_with_it() {
        let m = Metrics::default();
        count(
            &m,
            true,
            Some("NO_SOCKET"),
            None,
            Some(("shop", "web-1")),
            3,
        );
        count(&m, false, None, None, Some(("shop", "web-1")), 1);
        count(&m, false, None, None, Some(("shop", "web-2")), 1);
        count(&m, false, None, None, None, 1);
        m.forget_pods(|namespace, pod| (namespace, pod) != ("shop", "web-1"));
        let text = m.encode();
        assert!(!text.contains(r#"pod="web-1""#), "{text}");
        assert!(text.contains(r#"pod="web-2"} 1"#), "{text}");
        assert!(text.contains(r#"namespace="",pod=""} 1"#), "{text}");
        // A pod name seen again (a StatefulSet's) starts a series of its own.
        count(&m, false, None, None, Some(("shop", "web-1")), 2);
        count(&m, false, None, None, Some(("shop", "web-1")), 2);
        let text = m.encode();
        assert!(
            text.contains(r#"namespace="shop",pod="web-1"} 4"#),
            "{text}"
        );
    }

    #[test]
    fn a_storm_counts_into_its_series_past_the_kept_counters() {
        let m = Metrics::default();
        // More series than are kept at hand, taking turns.
        for round in 0..3 {
            for pod in 0..(RECENT_RST_SERIES + 3) {
                count(
                    &m,
                    true,
                    Some("NO_SOCKET"),
                    None,
                    Some(("shop", &format!("web-{pod}"))),
                    round + 1,
                );
            }
        }
        let text = m.encode();
        for pod in 0..(RECENT_RST_SERIES + 3) {
            let series = format!(r#"namespace="shop",pod="web-{pod}"}} 6"#);
            assert!(text.contains(&series), "{series} missing from:\n{text}");
        }
    }

    #[test]
    fn listen_overflows_follow_the_namespaces() {
        let m = Metrics::default();
        let sample = |name: &str, netns, total| Sample {
            netns,
            name: name.into(),
            total,
        };
        m.listen_overflows(&[sample("host", 1, 5), sample("shop", 2, 0)]);
        m.listen_overflows(&[
            sample("host", 1, 7),
            sample("shop", 2, 1),
            // A second namespace of the same container adds to its count.
            sample("shop", 3, 2),
            sample("gone-soon", 4, 9),
        ]);
        let text = m.encode();
        for line in [
            r#"tcprst_listen_overflows_total{netns_name="host"} 7"#,
            r#"tcprst_listen_overflows_total{netns_name="shop"} 3"#,
            r#"tcprst_listen_overflows_total{netns_name="gone-soon"} 9"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
        // A gone namespace's series goes; a name on a new namespace restarts.
        m.listen_overflows(&[sample("host", 1, 7), sample("shop", 5, 1)]);
        let text = m.encode();
        assert!(!text.contains("gone-soon"), "{text}");
        assert!(
            text.lines()
                .any(|l| l == r#"tcprst_listen_overflows_total{netns_name="shop"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn a_pods_stuck_series_goes_with_its_last_stuck_connection() {
        let m = Metrics::default();
        let web = Some(("shop", "web-1"));
        // Two cgroups (containers) of one pod add up.
        m.set_stuck([
            (TcpState::CloseWait, web, 2),
            (TcpState::CloseWait, web, 1),
            (TcpState::CloseWait, None, 1),
        ]);
        let text = m.encode();
        for line in [
            r#"tcprst_halfclose_stuck{state="CLOSE_WAIT",namespace="shop",pod="web-1"} 3"#,
            r#"tcprst_halfclose_stuck{state="CLOSE_WAIT",namespace="",pod=""} 1"#,
            r#"tcprst_halfclose_stuck{state="LAST_ACK",namespace="",pod=""} 0"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
        m.set_stuck([(TcpState::LastAck, web, 1)]);
        let text = m.encode();
        assert!(
            !text.contains(r#"state="CLOSE_WAIT",namespace="shop""#),
            "{text}"
        );
        for line in [
            r#"tcprst_halfclose_stuck{state="LAST_ACK",namespace="shop",pod="web-1"} 1"#,
            r#"tcprst_halfclose_stuck{state="CLOSE_WAIT",namespace="",pod=""} 0"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
        m.set_stuck([]);
        let text = m.encode();
        assert!(!text.contains(r#"pod="web-1""#), "{text}");
        assert_eq!(text.matches("tcprst_halfclose_stuck{").count(), 5, "{text}");
    }

    #[test]
    fn a_storm_counts_into_its_series_by_the_values_its_records_share() {
        let m = Metrics::default();
        let reason: Arc<str> = "NO_SOCKET".into();
        let caller: Arc<str> = "tcp_v4_rcv".into();
        let pod = Arc::new(PodMeta {
            namespace: "shop".into(),
            name: "web-1".into(),
            ..PodMeta::default()
        });
        let sent = ResetSeries {
            sent: true,
            reason: Some(&reason),
            caller: Some(&caller),
            pod: Some(&pod),
        };
        let received = ResetSeries {
            sent: false,
            ..sent
        };
        let elsewhere = ResetSeries { pod: None, ..sent };
        for _ in 0..1000 {
            m.reset(sent, 1);
            m.reset(received, 2);
            m.reset(elsewhere, 3);
        }
        // The same labels in values of their own (the pod stored anew by
        // the watch, another caller's cache entry) are the same series.
        count(
            &m,
            true,
            Some("NO_SOCKET"),
            Some("tcp_v4_rcv"),
            Some(("shop", "web-1")),
            5,
        );
        let text = m.encode();
        for line in [
            r#"tcprst_resets_total{direction="sent",reason="NO_SOCKET",caller="tcp_v4_rcv",namespace="shop",pod="web-1"} 1005"#,
            r#"tcprst_resets_total{direction="received",reason="NO_SOCKET",caller="tcp_v4_rcv",namespace="shop",pod="web-1"} 2000"#,
            r#"tcprst_resets_total{direction="sent",reason="NO_SOCKET",caller="tcp_v4_rcv",namespace="",pod=""} 3000"#,
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        assert_eq!(text.matches("tcprst_resets_total{").count(), 3, "{text}");
    }

    #[test]
    fn encodes_counters_with_labels() {
        let m = Metrics::default();
        count(&m, true, Some("NO_SOCKET"), Some("tcp_v4_rcv"), None, 1);
        // An aggregate event counts every reset it stands for.
        count(&m, true, Some("NO_SOCKET"), Some("tcp_v4_rcv"), None, 48211);
        count(&m, false, None, None, Some(("shop", "web-1")), 1);
        m.set_stuck([(TcpState::FinWait2, None, 3)]);
        m.lost(7);
        m.stack_failures(2);
        m.programs_attached("tracepoint", 5);
        m.tracker(42, 2);
        let mut shortfalls = Shortfalls {
            undecodable: 1,
            sends_forgotten: 2,
            receipts_unmatched: 3,
            tally_full: 4,
            unwritten: 5,
            tuple_failures: 7,
            skipped_runs: 10,
            conntrack_skipped: 8,
            conntrack_failed: 9,
            close_notes_overwritten: 11,
        };
        m.shortfalls(&shortfalls);
        m.scanned(Duration::from_millis(250), 4, 4);
        m.scanned(Duration::from_millis(500), 3, 1);
        m.scan_failures(2);
        shortfalls.tally_full = 6;
        m.shortfalls(&shortfalls);
        let text = m.encode();
        for line in [
            r#"tcprst_resets_total{direction="sent",reason="NO_SOCKET",caller="tcp_v4_rcv",namespace="",pod=""} 48212"#,
            r#"tcprst_resets_total{direction="received",reason="",caller="",namespace="shop",pod="web-1"} 1"#,
            r#"tcprst_halfclose_stuck{state="FIN_WAIT2",namespace="",pod=""} 3"#,
            "tcprst_lost_events_total 7",
            "tcprst_stack_capture_failures_total 2",
            r#"tcprst_programs_attached{tier="tracepoint"} 5"#,
            "tcprst_tracked_connections 42",
            "tcprst_untracked_connections 2",
            "tcprst_undecodable_records_total 1",
            "tcprst_origin_sends_forgotten_total 2",
            "tcprst_origin_receipts_unmatched_total 3",
            "tcprst_tally_full_resets_total 6",
            "tcprst_unwritten_events_total 5",
            "tcprst_tuple_read_failures_total 7",
            "tcprst_scans_total 2",
            "tcprst_scan_seconds_total 0.75",
            "tcprst_scan_namespaces 3",
            "tcprst_scan_namespaces_walked 1",
            "tcprst_scan_failures_total 2",
            "tcprst_skipped_program_runs_total 10",
            "tcprst_conntrack_lookups_skipped_total 8",
            "tcprst_conntrack_lookup_failures_total 9",
            "tcprst_close_notes_overwritten_total 11",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
