//! The attach planner and `tcprst doctor` on this kernel, and where received
//! resets came from. On hosts without kprobes or fentry (like CI's, with
//! lockdown) the function tiers still load: the verifier checks every
//! kprobe program here, and the planner must fall back to the tracepoint
//! and say why. The VM matrix (`cargo xtask vm-test`) runs them for real.

mod common;

use std::{io::ErrorKind, path::Path, process::Command};

use common::{Netns, TCPRST, Tracer, require_root, run};
use serde_json::Value;

const FUNCTIONS: [&str; 5] = [
    "tcp_send_active_reset",
    "tcp_v4_send_reset",
    "tcp_v6_send_reset",
    "nf_send_reset",
    "nf_send_reset6",
];

fn doctor() -> Value {
    require_root();
    let out = Command::new(TCPRST)
        .args(["doctor", "-o", "json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "doctor failed: {stderr}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn kprobes_attach() -> bool {
    Path::new("/sys/bus/event_source/devices/kprobe").exists()
}

#[test]
fn doctor_checks_every_hook_at_every_tier() {
    let report = doctor();
    assert_eq!(report["can_trace"], true, "{report:#}");
    assert_eq!(report["btf"], true);
    assert_eq!(report["tracefs"], true);
    assert_eq!(report["tiers"]["tracepoint"], true);
    // This kernel has tp_btf, socket storage for it and bpf_task_pt_regs.
    assert_eq!(report["close_marks"], true, "{report:#}");
    let hooks = report["hooks"].as_array().unwrap();
    let names: Vec<&str> = hooks.iter().map(|h| h["hook"].as_str().unwrap()).collect();
    assert_eq!(names, FUNCTIONS);
    for hook in hooks {
        let kprobe = hook["tiers"]["kprobe"].as_str().unwrap();
        // Loading is the verifier's verdict, whether or not kprobes attach.
        assert!(
            kprobe == "works" || kprobe.starts_with("loads and verifies"),
            "{}: kprobe: {kprobe}",
            hook["hook"]
        );
        if !kprobes_attach() {
            assert!(kprobe.contains("no kprobes"), "{kprobe}");
        }
        let fentry = hook["tiers"]["fentry"].as_str().unwrap();
        assert!(!fentry.is_empty());
        let tcp = !hook["hook"].as_str().unwrap().starts_with("nf_");
        if tcp {
            // The tracepoint is always there to fall back to.
            assert!(hook["tier"].is_string(), "{hook:#}");
        } else {
            assert!(hook["tiers"].get("tracepoint").is_none());
        }
    }
    let works = |tier: &str| {
        hooks
            .iter()
            .any(|h| h["tiers"][tier].as_str() == Some("works"))
    };
    assert_eq!(report["tiers"]["kprobe"], works("kprobe"));
    assert_eq!(report["tiers"]["fentry"], works("fentry"));
}

/// Forcing a tier the kernel lacks is one clear error, not a silent
/// fallback; where it exists, every TCP reset function uses it.
#[test]
fn a_forced_tier_is_used_or_refused() {
    require_root();
    if kprobes_attach() {
        let mut tracer = Tracer::start(&["--attach", "kprobe", "--port", "9"]);
        let stderr = tracer.stderr_text();
        for f in &FUNCTIONS[..3] {
            assert!(stderr.contains(&format!("hook {f}: kprobe")), "{stderr}");
        }
        let ns = Netns::new();
        let err = ns.connect("127.0.0.1:40911", "127.0.0.1:9").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
        let sent = tracer.wait_for("the closed port's reset", |v| v["kind"] == "rst_sent");
        assert_eq!(sent["tier"], "kprobe");
        assert_eq!(sent["hook"], "tcp_v4_send_reset");
        return;
    }
    let out = Command::new(TCPRST)
        .args(["trace", "--attach", "kprobe"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("tcprst: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("no hook for the resets TCP sends could be attached"),
        "{stderr}"
    );
    assert!(
        stderr.contains("hook tcp_v4_send_reset: unavailable (kprobe: loads and verifies"),
        "{stderr}"
    );
}

/// One reset, seen once, and its receipt traced back to the local stack.
#[test]
fn a_local_reset_is_reported_once_and_explains_its_receipt() {
    let ns = Netns::new();
    let mut tracer = Tracer::start(&["--port", "40913"]);
    let err = ns
        .connect("127.0.0.1:40914", "127.0.0.1:40913")
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    tracer.wait_for_rsts(2);
    let events = tracer.stop();
    let sent: Vec<&Value> = events.iter().filter(|v| v["kind"] == "rst_sent").collect();
    assert_eq!(sent.len(), 1, "{events:#?}");
    let received = events
        .iter()
        .find(|v| v["kind"] == "rst_received")
        .expect("the client's reset");
    assert_eq!(received["origin"], "this host's TCP stack", "{received:#}");
    assert!(sent[0]["origin"].is_null());
    assert!(sent[0]["nf_hook"].is_null());
}

/// `reject with tcp reset` answers for a port nobody listens on... or for one
/// somebody does: the client cannot tell. tcprst can.
#[test]
fn a_netfilter_reset_is_told_apart_from_the_stack() {
    require_root();
    let ns = Netns::new();
    let nft = |rule: &str| run("ip", &["netns", "exec", &ns.name, "nft", rule]);
    nft("add table inet tcprst_reject");
    nft("add chain inet tcprst_reject in { type filter hook input priority 0; }");
    nft("add rule inet tcprst_reject in tcp dport 40915 reject with tcp reset");
    let _listener = ns.listen("127.0.0.1:40915");
    let mut tracer = Tracer::start(&["--port", "40915"]);
    let err = ns
        .connect("127.0.0.1:40916", "127.0.0.1:40915")
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    let received = tracer.wait_for("the client's reset", |v| v["kind"] == "rst_received");
    let nf_hooked = doctor()["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["hook"].as_str().unwrap().starts_with("nf_"))
        .all(|h| h["tier"].is_string());
    if nf_hooked {
        let sent = tracer.wait_for("netfilter's reset", |v| v["kind"] == "rst_sent");
        assert_eq!(sent["hook"], "nf_send_reset");
        assert_eq!(sent["nf_hook"], "INPUT");
        assert_eq!(
            received["origin"],
            "a netfilter reject rule on this host (INPUT)"
        );
    } else {
        assert_eq!(
            received["origin"], "not a local TCP socket (netfilter, middlebox or userspace stack)",
            "{received:#}"
        );
        let events = tracer.stop();
        assert!(
            events.iter().all(|v| v["kind"] != "rst_sent"),
            "the TCP stack sent nothing: {events:#?}"
        );
    }
}
