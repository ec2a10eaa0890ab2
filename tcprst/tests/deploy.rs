//! deploy/daemonset.yaml: accepted by the Kubernetes API schema, and keeping
//! what users rely on: no privileged mode, exactly the capabilities tcprst
//! needs (tests/capabilities.rs runs it with them), each with its reason,
//! and read-only access to pods.
//!
//! The schema check runs kubernetes-validate from the virtualenv that
//! `cargo xtask setup` installs under target/venv.

mod common;

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::LazyLock,
};

use common::DAEMONSET_CAPABILITIES;
use serde_json::Value;

/// The oldest release with `securityContext.appArmorProfile`, and the newest
/// that kubernetes-validate knows: fields removed later would show there.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.37.0"];

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn manifest_path() -> PathBuf {
    workspace().join("deploy/daemonset.yaml")
}

/// A program of the virtualenv `cargo xtask setup` makes, or a failure
/// saying to run it: a missing validator must not pass for a valid manifest.
fn venv_bin(name: &str) -> PathBuf {
    let path = workspace().join("target/venv/bin").join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask setup`",
        path.display()
    );
    path
}

fn validate(path: &Path, version: &str) -> Output {
    // --strict rejects unknown fields, so a misspelt one cannot pass as absent.
    Command::new(venv_bin("kubernetes-validate"))
        .args(["--strict", "--quiet", "--kubernetes-version", version])
        .arg(path)
        .output()
        .unwrap()
}

fn report(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every document of the manifest, parsed by the PyYAML kubernetes-validate
/// brings along.
static DOCUMENTS: LazyLock<Vec<Value>> = LazyLock::new(|| {
    let out = Command::new(venv_bin("python3"))
        .args([
            "-c",
            "import json, sys, yaml; json.dump(list(yaml.safe_load_all(sys.stdin)), sys.stdout)",
        ])
        .stdin(fs::File::open(manifest_path()).unwrap())
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "could not parse {}",
        manifest_path().display()
    );
    serde_json::from_slice(&out.stdout).unwrap()
});

fn document(kind: &str) -> &'static Value {
    DOCUMENTS
        .iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in {}", manifest_path().display()))
}

fn container() -> &'static Value {
    let containers = document("DaemonSet")["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    assert_eq!(containers.len(), 1, "the DaemonSet runs tcprst alone");
    &containers[0]
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("{value} is not a list"))
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect()
}

#[test]
fn manifest_matches_the_kubernetes_schema() {
    for version in KUBERNETES_VERSIONS {
        let out = validate(&manifest_path(), version);
        assert!(
            out.status.success(),
            "Kubernetes {version}: {}",
            report(&out)
        );
    }
}

#[test]
fn validator_rejects_a_broken_manifest() {
    let dir = std::env::temp_dir().join(format!("tcprst-deploy-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let broken = dir.join("daemonset.yaml");
    let manifest = fs::read_to_string(manifest_path()).unwrap();
    assert!(manifest.contains("hostPID: true"));
    fs::write(&broken, manifest.replace("hostPID: true", "hostPid: true")).unwrap();
    let out = validate(&broken, KUBERNETES_VERSIONS[0]);
    fs::remove_dir_all(&dir).unwrap();
    assert!(
        !out.status.success(),
        "a misspelt field passed: {}",
        report(&out)
    );
    assert!(report(&out).contains("hostPid"), "{}", report(&out));
}

#[test]
fn nothing_runs_privileged() {
    fn privileged(value: &Value) -> bool {
        match value {
            Value::Object(map) => map
                .iter()
                .any(|(k, v)| (k == "privileged" && v == true) || privileged(v)),
            Value::Array(items) => items.iter().any(privileged),
            _ => false,
        }
    }
    assert!(
        !DOCUMENTS.iter().any(privileged),
        "privileged: true gives every capability and device; add named capabilities instead"
    );
}

#[test]
fn container_is_locked_down_and_configured() {
    let container = container();
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(strings(&security["capabilities"]["drop"]), ["ALL"]);
    // A capability added or removed here is one capabilities.rs must show
    // needed (or no longer needed) on a real kernel first.
    let added: BTreeSet<&str> = strings(&security["capabilities"]["add"])
        .into_iter()
        .collect();
    let expected: BTreeSet<&str> = DAEMONSET_CAPABILITIES.iter().copied().collect();
    assert_eq!(added, expected);

    let args = strings(&container["args"]);
    assert!(args.contains(&"--metrics-addr"), "{args:?}");
    assert!(
        container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "metrics" && p["containerPort"] == 9090),
        "no containerPort 9090 named metrics"
    );
    assert!(
        container["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "NODE_NAME"
                && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"),
        "NODE_NAME does not come from spec.nodeName"
    );
}

#[test]
fn every_capability_says_why() {
    let manifest = fs::read_to_string(manifest_path()).unwrap();
    let lines: Vec<&str> = manifest.lines().collect();
    let add = lines
        .iter()
        .position(|l| l.trim() == "add:")
        .expect("capabilities.add as a block list, one capability a line");
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut listed = BTreeSet::new();
    for (i, line) in lines.iter().enumerate().skip(add + 1) {
        let trimmed = line.trim();
        if trimmed.starts_with('#') {
            continue;
        }
        let Some(item) = trimmed.strip_prefix("- ") else {
            break;
        };
        if indent(line) < indent(lines[add]) {
            break;
        }
        let (cap, comment) = item.split_once('#').unwrap_or((item, ""));
        let cap = cap.trim().trim_matches('"');
        let explained = !comment.trim().is_empty() || lines[i - 1].trim().starts_with('#');
        assert!(
            explained,
            "capability {cap} has no comment saying why it is needed"
        );
        listed.insert(cap);
    }
    let added: BTreeSet<&str> = strings(&container()["securityContext"]["capabilities"]["add"])
        .into_iter()
        .collect();
    assert_eq!(listed, added, "capabilities.add must be one block list");
}

#[test]
fn cluster_role_only_reads_pods() {
    let rules = document("ClusterRole")["rules"].as_array().unwrap();
    assert!(!rules.is_empty());
    for rule in rules {
        assert_eq!(strings(&rule["apiGroups"]), [""], "{rule}");
        assert_eq!(strings(&rule["resources"]), ["pods"], "{rule}");
        let verbs: BTreeSet<&str> = strings(&rule["verbs"]).into_iter().collect();
        assert_eq!(verbs, BTreeSet::from(["get", "list", "watch"]), "{rule}");
    }
}
