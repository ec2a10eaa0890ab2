//! deploy/prometheus-rules.yaml and deploy/grafana-dashboard.json, checked
//! for the ways a platform team would find them broken: rules Prometheus
//! rejects or that misjudge a history, and a query naming a metric or label
//! tcprst does not serve.
//!
//! promtool comes from Debian's `prometheus` package, which `cargo xtask
//! setup` installs: without it these tests fail, not skip.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, iter,
    path::Path,
    process::{Command, Output},
};

use common::{Netns, scrape, trace_with_metrics};
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
    let (mut tracer, addr) = trace_with_metrics(&ns);
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
