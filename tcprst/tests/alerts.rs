//! deploy/prometheus-rules.yaml and deploy/grafana-dashboard.json, checked
//! for the ways a platform team would find them broken: rules Prometheus
//! rejects or that misjudge a history, a query naming a metric or label
//! tcprst does not serve, and the stuck half-close alert not firing in a
//! real Prometheus that scrapes a real tcprst.
//!
//! promtool and prometheus come from Debian's `prometheus` package, which
//! `cargo xtask setup` installs: without them these tests fail, not skip.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File},
    iter,
    net::{Shutdown, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::{Netns, http_get, scrape, trace_with_metrics};
use promql_parser::{
    label::MatchOp,
    parser::Expr,
    util::{ExprVisitor, walk_expr},
};
use serde_json::Value;

const RULES: &str = "deploy/prometheus-rules.yaml";
const DASHBOARD: &str = "deploy/grafana-dashboard.json";
/// promtool's cases for the rules whose logic needs a day of history.
const RULES_TEST: &str = "tcprst/testdata/prometheus-rules-test.yaml";
const STUCK_ALERT: &str = "TcprstHalfCloseStuck";
/// Labels Prometheus gives every series of a target; tcprst serves neither.
const TARGET_LABELS: &[&str] = &["instance", "job"];
const NOT_INSTALLED: &str = "run `cargo xtask setup`, which installs Debian's prometheus";

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// A program of Debian's prometheus package, run from the workspace.
fn prometheus_package(program: &str) -> Command {
    let mut command = Command::new(program);
    command.current_dir(workspace());
    command
}

fn output(mut command: Command) -> Output {
    let program = command.get_program().to_string_lossy().into_owned();
    command
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}: {NOT_INSTALLED}"))
}

fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_accepts_the_rules() {
    let mut check = prometheus_package("promtool");
    check.args(["check", "rules", RULES]);
    assert_success(&output(check));
}

#[test]
fn the_rules_judge_a_days_history_as_their_comments_say() {
    let mut test = prometheus_package("promtool");
    test.args(["test", "rules", RULES_TEST]);
    assert_success(&output(test));
}

/// The shipped rule file, as JSON values.
fn shipped_rules() -> Value {
    serde_norway::from_str(&fs::read_to_string(workspace().join(RULES)).unwrap()).unwrap()
}

fn rule_queries() -> Vec<String> {
    shipped_rules()["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|group| group["rules"].as_array().expect("rules"))
        .map(|rule| {
            rule["expr"]
                .as_str()
                .expect("a rule without expr")
                .to_owned()
        })
        .collect()
}

/// The shipped rules with the stuck half-close alert holding for `hold`
/// instead of 10 minutes: the shipped expression, not a twin of it.
fn rules_with_stuck_alert_for(hold: &str) -> String {
    let mut file = shipped_rules();
    let mut found = 0;
    for group in file["groups"].as_array_mut().unwrap() {
        for rule in group["rules"].as_array_mut().unwrap() {
            if rule["alert"] == STUCK_ALERT {
                assert_eq!(rule["for"], "10m");
                rule["for"] = hold.into();
                found += 1;
            }
        }
    }
    assert_eq!(found, 1, "{STUCK_ALERT} in {RULES}");
    serde_norway::to_string(&file).unwrap()
}

/// Every PromQL query of the dashboard, panels' and variables', with
/// Grafana's variables replaced by what PromQL parses: a duration for its
/// intervals, a match-all regex for the dashboard's own.
fn dashboard_queries() -> Vec<String> {
    let dashboard: Value =
        serde_json::from_str(&fs::read_to_string(workspace().join(DASHBOARD)).unwrap()).unwrap();
    assert!(dashboard["schemaVersion"].is_u64(), "no schemaVersion");
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        // A collapsed row holds its panels.
        for panel in iter::once(panel).chain(panel["panels"].as_array().into_iter().flatten()) {
            if panel["type"] == "row" {
                continue;
            }
            let targets = panel["targets"].as_array().unwrap_or_else(|| {
                panic!("panel {} has no targets", panel["title"]);
            });
            assert!(
                !targets.is_empty(),
                "panel {} has no targets",
                panel["title"]
            );
            queries.extend(targets.iter().map(|t| {
                t["expr"]
                    .as_str()
                    .expect("a target without expr")
                    .to_owned()
            }));
        }
    }
    for variable in variables.iter().filter(|v| v["type"] == "query") {
        let query = variable["query"]["query"].as_str().unwrap();
        let selector = query
            .strip_prefix("label_values(")
            .and_then(|args| args.rsplit_once(','))
            .unwrap_or_else(|| {
                panic!("variable query {query:?} is not label_values(METRIC, LABEL)")
            })
            .0;
        queries.push(selector.to_owned());
    }
    queries
        .into_iter()
        .map(|query| {
            let mut parsable = query
                .replace("$__rate_interval", "5m")
                .replace("$__interval", "1m")
                .replace("$__range", "1h");
            for name in variables.iter().map(|v| v["name"].as_str().unwrap()) {
                parsable = parsable
                    .replace(&format!("${{{name}}}"), ".*")
                    .replace(&format!("${name}"), ".*");
            }
            assert!(!parsable.contains('$'), "an unknown variable in {query}");
            parsable
        })
        .collect()
}

/// The metrics a query selects, each with the labels its matchers name.
fn selected(query: &str) -> Vec<(String, Vec<String>)> {
    struct Selectors(Vec<(String, Vec<String>)>);
    impl ExprVisitor for Selectors {
        type Error = &'static str;
        fn pre_visit(&mut self, expr: &Expr) -> Result<bool, Self::Error> {
            let selector = match expr {
                Expr::VectorSelector(vs) => vs,
                Expr::MatrixSelector(ms) => &ms.vs,
                _ => return Ok(true),
            };
            let matchers = || {
                let any_of = selector.matchers.or_matchers.iter().flatten();
                selector.matchers.matchers.iter().chain(any_of)
            };
            let name = selector
                .name
                .clone()
                .or_else(|| {
                    matchers()
                        .find(|m| m.name == "__name__" && matches!(m.op, MatchOp::Equal))
                        .map(|m| m.value.clone())
                })
                .ok_or("a selector without a literal metric name")?;
            let labels = matchers()
                .map(|m| m.name.clone())
                .filter(|label| label != "__name__")
                .collect();
            self.0.push((name, labels));
            Ok(true)
        }
    }
    let expr = promql_parser::parser::parse(query).unwrap_or_else(|e| panic!("{query}: {e}"));
    let mut selectors = Selectors(Vec::new());
    walk_expr(&mut selectors, &expr).unwrap_or_else(|e| panic!("{query}: {e}"));
    assert!(!selectors.0.is_empty(), "{query} selects no metric");
    selectors.0
}

#[test]
fn the_rules_and_the_dashboard_query_only_what_tcprst_serves() {
    let ns = Netns::new();
    let (mut tracer, addr) = trace_with_metrics(&ns, &[]);
    // A reset sent and received: a labelled family shows only the series it has.
    assert!(ns.connect("127.0.0.1:40310", "127.0.0.1:9").is_err());
    tracer.wait_for_rsts(2);
    let mut served: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for sample in scrape(&addr).samples {
        served
            .entry(sample.metric)
            .or_default()
            .extend(sample.labels.keys().cloned());
    }
    let (rules, dashboard) = (rule_queries(), dashboard_queries());
    assert!(!rules.is_empty() && !dashboard.is_empty());
    for query in rules.iter().chain(&dashboard) {
        for (name, labels) in selected(query) {
            let have = served.get(&name).unwrap_or_else(|| {
                panic!("{query} selects {name}, which tcprst does not serve; it serves {served:#?}")
            });
            for label in labels {
                assert!(
                    have.contains(&label) || TARGET_LABELS.contains(&label.as_str()),
                    "{query} matches label {label} of {name}, which has only {have:?}"
                );
            }
        }
    }
    tracer.stop();
}

/// A Prometheus server of one test's own, scraping one target and
/// evaluating rules every second; killed, and its files removed, when
/// dropped.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    addr: String,
}

impl Prometheus {
    const WAIT: Duration = Duration::from_secs(60);

    fn start(target: &str, rules: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("tcprst-prometheus-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("rules.yaml"), rules).unwrap();
        // rule_files are found beside the configuration.
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files: [rules.yaml]\n\
             scrape_configs:\n  - job_name: tcprst\n    static_configs:\n      - targets: ['{target}']\n"
        );
        fs::write(dir.join("prometheus.yml"), config).unwrap();
        // Free now: Prometheus would not say which port it picked itself.
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let log = File::create(dir.join("log")).unwrap();
        let mut command = prometheus_package("prometheus");
        command
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("prometheus: {e}: {NOT_INSTALLED}"));
        let mut server = Self { child, dir, addr };
        server.wait_for("readiness", |addr| {
            matches!(http_get(addr, "/-/ready"), Ok((200, _))).then_some(())
        });
        server
    }

    /// Polls `found` with this server's address until it finds something;
    /// fails with what Prometheus knows if it does not within a minute, or
    /// if Prometheus exits.
    fn wait_for<T>(&mut self, what: &str, mut found: impl FnMut(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + Self::WAIT;
        loop {
            if let Some(t) = found(&self.addr) {
                return t;
            }
            let exited = self.child.try_wait().unwrap();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "no {what} within {:?} (Prometheus exited: {exited:?})\ntargets: {}\nalerts: {}\nlog:\n{}",
                Self::WAIT,
                self.api("targets"),
                self.api("alerts"),
                fs::read_to_string(self.dir.join("log")).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(250));
        }
    }

    /// The body of /api/v1/`what`, or why there is none.
    fn api(&self, what: &str) -> String {
        match http_get(&self.addr, &format!("/api/v1/{what}")) {
            Ok((_, body)) => body,
            Err(e) => e.to_string(),
        }
    }

    /// Waits for an alert `wanted` accepts, as /api/v1/alerts gives it.
    fn wait_for_alert(&mut self, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
        self.wait_for(what, |addr| {
            let (_, body) = http_get(addr, "/api/v1/alerts").ok()?;
            let answer: Value = serde_json::from_str(&body).unwrap();
            answer["data"]["alerts"]
                .as_array()?
                .iter()
                .find(|alert| wanted(alert))
                .cloned()
        })
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The shipped expression fires, with its annotation naming the state and
/// where: a CLOSE_WAIT whose application never closes, in the test's own
/// namespace, which is no pod.
#[test]
fn a_stuck_close_wait_fires_the_shipped_alert_in_prometheus() {
    let ns = Netns::new();
    let (tracer, addr) = trace_with_metrics(&ns, &[]);
    let mut prometheus = Prometheus::start(&addr, &rules_with_stuck_alert_for("1s"));
    let (client, server) = ns.pair("127.0.0.1:40311", "127.0.0.1:8080");
    client.shutdown(Shutdown::Write).unwrap();
    let alert = prometheus.wait_for_alert("stuck CLOSE_WAIT alert firing", |alert| {
        alert["labels"]["alertname"] == STUCK_ALERT
            && alert["labels"]["state"] == "CLOSE_WAIT"
            && alert["state"] == "firing"
    });
    assert_eq!(
        alert["annotations"]["summary"],
        format!("1 connection(s) stuck in CLOSE_WAIT outside any pod on {addr}")
    );
    assert_eq!(alert["labels"]["severity"], "warning");
    drop((client, server));
    drop(prometheus);
    tracer.stop();
}
