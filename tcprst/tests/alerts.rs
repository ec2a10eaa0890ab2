//! deploy/prometheus-rules.yaml, checked for the ways a platform team would
//! find it broken: rules Prometheus rejects, or that misjudge a history.
//!
//! promtool comes from Debian's `prometheus` package, which `cargo xtask
//! setup` installs: without it these tests fail, not skip.

use std::{
    path::Path,
    process::{Command, Output},
};

const RULES: &str = "deploy/prometheus-rules.yaml";
/// promtool's cases for the rules whose logic needs a day of history.
const RULES_TEST: &str = "tcprst/testdata/prometheus-rules-test.yaml";
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
