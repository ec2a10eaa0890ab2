//! The attach planner and `tcprst doctor` on this kernel, and where received
//! resets came from. What each tier must give is fixed per kind of host in
//! `HOSTS`, told apart by the kernel's build config, not by what tcprst
//! reports: a tier that breaks must fail here, not turn into another
//! "unavailable". The VM matrix (`cargo xtask vm-test`) runs the function
//! tiers for real.

mod common;

use std::{io::ErrorKind, process::Command};

use common::{Netns, TCPRST, Tracer, require_root, the_error};
use serde_json::Value;

const FUNCTIONS: [&str; 5] = [
    "tcp_send_active_reset",
    "tcp_v4_send_reset",
    "tcp_v6_send_reset",
    "nf_send_reset",
    "nf_send_reset6",
];

/// A kind of host where only the tracepoint tier works: fentry and kprobes
/// load but are refused, for the reasons given.
struct Host {
    name: &'static str,
    /// Lines of the kernel's build config (/proc/config.gz) that tell it.
    config: &'static [&'static str],
    /// What tcprst's reason for refusing each tier must contain.
    fentry: &'static str,
    kprobe: &'static str,
}

/// The kinds these tests know; a host of another kind fails, for want of
/// a row, rather than pass on whatever it gives.
const HOSTS: &[Host] = &[Host {
    name: "CI's kind: Linux 6.18 without modules or kprobes, locked down",
    config: &[
        "# CONFIG_MODULES is not set",
        "# CONFIG_KPROBES is not set",
        "CONFIG_LOCK_DOWN_KERNEL_FORCE_INTEGRITY=y",
    ],
    // It loads no BPF_PROG_TYPE_TRACING program at all (EPERM), netfilter's
    // built-in functions included.
    fentry: "the kernel refused to load it (Operation not permitted",
    kprobe: "loads and verifies, but this kernel has no kprobes (CONFIG_KPROBES is off)",
}];

/// This host's row, from its kernel's build config.
fn host() -> &'static Host {
    let out = Command::new("zcat")
        .arg("/proc/config.gz")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "/proc/config.gz tells the kind of host: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = config.lines().collect();
    HOSTS
        .iter()
        .find(|host| host.config.iter().all(|line| lines.contains(line)))
        .unwrap_or_else(|| panic!("no row in HOSTS for this kernel: add what it must give"))
}

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

#[test]
fn doctor_checks_every_hook_at_every_tier() {
    let host = host();
    let report = doctor();
    assert_eq!(report["can_trace"], true, "{report:#}");
    assert_eq!(report["btf"], true);
    assert_eq!(report["tracefs"], true);
    assert_eq!(
        report["tiers"],
        serde_json::json!({"fentry": false, "kprobe": false, "tracepoint": true}),
        "{}",
        host.name
    );
    // This kernel has tp_btf, socket storage for it and bpf_task_pt_regs.
    assert_eq!(report["close_marks"], true, "{report:#}");
    // Its build config is readable and says nothing of KASAN, FRED or
    // PREEMPT_RT, and its reset programs are tp_btf: no softirq programs.
    assert_eq!(report["softirq_by_stack"], true, "{report:#}");
    // sock_diag dumps the half-closed sockets the scans ask for.
    assert_eq!(report["socket_table"], true, "{report:#}");
    let hooks = report["hooks"].as_array().unwrap();
    let names: Vec<&str> = hooks.iter().map(|h| h["hook"].as_str().unwrap()).collect();
    assert_eq!(names, FUNCTIONS);
    for hook in hooks {
        let tiers = &hook["tiers"];
        let said = |tier: &str| tiers[tier].as_str().unwrap_or_default();
        assert!(said("fentry").contains(host.fentry), "{hook:#}");
        assert!(said("kprobe").contains(host.kprobe), "{hook:#}");
        if hook["hook"].as_str().unwrap().starts_with("nf_") {
            // Netfilter has no tracepoint to fall back to.
            assert!(tiers.get("tracepoint").is_none(), "{hook:#}");
            assert!(hook["tier"].is_null(), "{hook:#}");
        } else {
            assert_eq!(said("tracepoint"), "works", "{hook:#}");
            assert_eq!(hook["tier"], "tracepoint", "{hook:#}");
        }
    }
}

/// Forcing a tier the kernel refuses is one clear error, not a silent
/// fallback, with that tier's reason on every hook.
#[test]
fn a_forced_tier_is_refused_with_its_reason() {
    require_root();
    let host = host();
    for (tier, reason) in [("kprobe", host.kprobe), ("fentry", host.fentry)] {
        let out = Command::new(TCPRST)
            .args(["trace", "--attach", tier])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            the_error(&stderr).contains("no hook for the resets TCP sends could be attached"),
            "{stderr}"
        );
        for function in FUNCTIONS {
            let refused = format!("hook {function}: unavailable ({tier}: {reason}");
            assert!(stderr.contains(&refused), "{refused}: {stderr}");
        }
    }
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
    ns.nft("add table inet tcprst_reject");
    ns.nft("add chain inet tcprst_reject in { type filter hook input priority 0; }");
    ns.nft("add rule inet tcprst_reject in tcp dport 40915 reject with tcp reset");
    let _listener = ns.listen("127.0.0.1:40915");
    let mut tracer = Tracer::start(&["--port", "40915"]);
    let err = ns
        .connect("127.0.0.1:40916", "127.0.0.1:40915")
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    let received = tracer.wait_for("the client's reset", |v| v["kind"] == "rst_received");
    // No tier hooks netfilter on this kind of host (`HOSTS`); the VM matrix
    // checks the kernels where kprobes see it send.
    host();
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
