//! What the guests' output must say: each hook's tier as its kernel's table
//! gives it, the doctor's report, and each scenario's records.

use std::{
    collections::{BTreeSet, HashMap},
    fs,
    net::SocketAddr,
    path::Path,
};

use anyhow::{Context as _, Result};
use serde_json::Value;
use tcprst_common::stderr;
use tcprst_loadgen::scenario::{Outcome, SCENARIOS, Scenario};

use crate::process::tcprst_line;

use super::{
    AttachPlan, Guest, HookLine, Tier,
    kernels::{Expect, HookExpect},
    plans,
};

/// The tracepoint that reports resets when a hook is on the tracepoint tier.
pub(crate) const SEND_RESET_TRACEPOINT: &str = "tcp:tcp_send_reset";
/// From 6.10 `tcp:tcp_send_reset` fires without a socket too.
pub(crate) const SOCKETLESS_TRACEPOINT: (u32, u32) = (6, 10);

/// What a reset seen by no local TCP socket reads as on the receiving side.
pub(crate) const NOT_LOCAL_ORIGIN: &str = "not a local TCP socket";
pub(crate) const LOCAL_STACK_ORIGIN: &str = "this host's TCP stack";
pub(crate) const LOCAL_NETFILTER_ORIGIN: &str = "a netfilter reject rule on this host (INPUT)";

/// How tcprst attached one hook, from its `tcprst: hook HOOK: TIER` line.
pub(crate) enum Attached {
    Function(String),
    Tracepoint,
    Unavailable(String),
}

pub(crate) enum Verdict {
    Pass(Vec<String>),
    Fail(Vec<String>),
    Unavailable(String),
}

pub(crate) struct PlanResult {
    pub(crate) kernel: String,
    pub(crate) plan: String,
    pub(crate) verdict: Verdict,
}

impl PlanResult {
    pub(crate) fn new(kernel: &str, plan: &str, verdict: Verdict) -> Self {
        Self {
            kernel: kernel.to_owned(),
            plan: plan.to_owned(),
            verdict,
        }
    }
}

/// Each section in a file of its name (`kprobe.out`, …), to read by hand.
pub(crate) fn keep(run_dir: &Path, sections: &HashMap<&str, String>) -> Result<()> {
    for (name, text) in sections {
        let file = run_dir.join(name);
        fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
    }
    Ok(())
}

pub(crate) fn judge(guest: &Guest, sections: &HashMap<&str, String>) -> Vec<PlanResult> {
    let row = |plan: &str, verdict| PlanResult::new(&guest.kernel.release, plan, verdict);
    if let Some(setup) = sections.get("setup").filter(|s| !s.trim().is_empty()) {
        let errors = setup.lines().map(|l| format!("guest setup: {l}")).collect();
        return vec![row("-", Verdict::Fail(errors))];
    }
    let version = match guest.kernel.version() {
        Ok(v) => v,
        Err(e) => return vec![row("-", Verdict::Fail(vec![format!("{e:#}")]))],
    };
    let mut rows: Vec<PlanResult> = plans()
        .iter()
        .map(|plan| row(plan.name, judge_plan(plan, guest.hooks, sections, version)))
        .collect();
    match sections.get("doctor").map(|d| serde_json::from_str(d)) {
        Some(Ok(doctor)) => {
            rows.push(row("doctor", judge_doctor(&doctor, guest.hooks)));
            rows.push(row("close-marks", judge_close_marks(&doctor, version)));
            rows.push(row(
                "softirq-context",
                judge_softirq_context(&doctor, version),
            ));
            rows.push(row("socket-table", judge_socket_table(&doctor)));
        }
        _ => {
            let err = sections.get("doctor.err").map_or("", |s| s.trim());
            let why = format!("no JSON from tcprst doctor: {err}");
            rows.push(row("doctor", Verdict::Fail(vec![why])));
        }
    }
    rows
}

/// The doctor tries every tier of every hook: each must come out as the
/// kernel's table says.
pub(crate) fn judge_doctor(doctor: &Value, table: &[HookExpect]) -> Verdict {
    let reported: HashMap<&str, &Value> = doctor["hooks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|hook| Some((hook["hook"].as_str()?, &hook["tiers"])))
        .collect();
    let mut failures: Vec<String> = reported
        .keys()
        .filter(|hook| !table.iter().any(|row| row.hook == **hook))
        .map(|hook| format!("doctor reports {hook}, which the table lacks"))
        .collect();
    for row in table {
        let Some(tiers) = reported.get(row.hook) else {
            failures.push(format!("doctor does not report {}", row.hook));
            continue;
        };
        for tier in Tier::ALL {
            // A tier that does not exist for the hook is absent.
            let said = tiers[tier.name()].as_str().unwrap_or("");
            let fits = match row.on(tier) {
                Expect::Attached => said == "works",
                Expect::Refused { says, .. } => said != "works" && said.contains(says),
            };
            if !fits {
                failures.push(format!(
                    "{} {}: doctor says {said:?}, want {}",
                    row.hook,
                    tier.name(),
                    describe_expect(row.on(tier))
                ));
            }
        }
    }
    if failures.is_empty() {
        Verdict::Pass(Vec::new())
    } else {
        Verdict::Fail(failures)
    }
}

pub(crate) fn describe_expect(expect: Expect) -> String {
    match expect {
        Expect::Attached => "\"works\"".to_owned(),
        Expect::Refused { why, says } => format!("a refusal saying {says:?} ({why})"),
    }
}

/// Close marks need tp_btf with socket storage (5.11) and bpf_task_pt_regs
/// (5.15): a kernel that has both must keep them, an older one must say why
/// not. Either way tracing ran, which the plans above check.
pub(crate) fn judge_close_marks(doctor: &Value, version: (u32, u32)) -> Verdict {
    judge_works(doctor, "close_marks", "close marks", version >= (5, 15))
}

/// The reset programs tell softirq by where their context lies (no program
/// per softirq) when every one of them is tp_btf, kprobe or fentry, which
/// is so where close marks work; before, the reset tracepoints keep their
/// classic programs, whose context is not on the stack, and the softirq
/// programs run.
pub(crate) fn judge_softirq_context(doctor: &Value, version: (u32, u32)) -> Verdict {
    judge_works(
        doctor,
        "softirq_by_stack",
        "softirq context by the stack",
        version >= (5, 15),
    )
}

/// sock_diag dumps the half-closed sockets the scans ask for, with
/// `tcp_info`, on every kernel: the one-walk request for both families, or
/// a dump per family where the kernel refuses it.
pub(crate) fn judge_socket_table(doctor: &Value) -> Verdict {
    judge_works(doctor, "socket_table", "the socket table", true)
}

/// The doctor's `key` is `true` when `expected`, and otherwise an error
/// saying why not.
fn judge_works(doctor: &Value, key: &str, what: &str, expected: bool) -> Verdict {
    let says = &doctor[key];
    match (expected, says.as_bool()) {
        (true, Some(true)) => Verdict::Pass(Vec::new()),
        (false, None) if says["error"].is_string() => Verdict::Pass(vec![format!(
            "fallback: {}",
            says["error"].as_str().unwrap_or("")
        )]),
        _ => Verdict::Fail(vec![format!(
            "{what} expected {}, doctor says {says}",
            if expected { "to work" } else { "to be refused" }
        )]),
    }
}

/// A plan whose hook lines match the kernel's table: traced, and judged
/// scenario by scenario; or refused, as the table says it must be when no
/// hook for the resets TCP sends can attach.
pub(crate) fn judge_plan(
    plan: &AttachPlan,
    table: &[HookExpect],
    sections: &HashMap<&str, String>,
    version: (u32, u32),
) -> Verdict {
    let Some(stderr) = sections.get(format!("{}.err", plan.name).as_str()) else {
        return Verdict::Fail(vec!["the guest did not run it".to_owned()]);
    };
    let expected: Vec<(&HookExpect, HookLine)> =
        table.iter().map(|row| (row, plan.expected(row))).collect();
    let mut failures = check_hook_lines(&expected, stderr);
    let traces = expected
        .iter()
        .any(|(row, line)| row.is_tcp() && line.tier.is_some());
    if traces {
        return match Run::read(plan.name, sections) {
            Ok(run) => run.judge(version, failures),
            Err(why) => {
                failures.push(why);
                Verdict::Fail(failures)
            }
        };
    }
    let tracing = tcprst_line(stderr::TRACING);
    if stderr.lines().any(|l| l.starts_with(&tracing)) {
        failures.push("tcprst traced, though no TCP hook should attach".to_owned());
    }
    if sections
        .get(format!("{}.status", plan.name).as_str())
        .map(|s| s.trim())
        == Some("0")
    {
        failures.push("tcprst exited 0, though it could not trace".to_owned());
    }
    if !failures.is_empty() {
        return Verdict::Fail(failures);
    }
    let why: BTreeSet<&str> = expected
        .iter()
        .filter(|(row, _)| row.is_tcp())
        .flat_map(|(_, line)| line.refusals.iter().map(|(why, _)| *why))
        .collect();
    Verdict::Unavailable(why.into_iter().collect::<Vec<_>>().join("; "))
}

/// Each hook's line against what the table says it must be.
pub(crate) fn check_hook_lines(expected: &[(&HookExpect, HookLine)], stderr: &str) -> Vec<String> {
    let lines = hook_lines(stderr);
    let mut failures: Vec<String> = lines
        .keys()
        .filter(|hook| !expected.iter().any(|(row, _)| row.hook == **hook))
        .map(|hook| format!("tcprst named {hook}, which the table lacks"))
        .collect();
    for (row, want) in expected {
        let Some(said) = lines.get(row.hook) else {
            failures.push(format!("tcprst named no tier for {}", row.hook));
            continue;
        };
        let tier = want.tier.map_or("unavailable", Tier::name);
        let fits = said.split_whitespace().next() == Some(tier)
            && want.refusals.iter().all(|(_, says)| said.contains(says));
        if !fits {
            let reasons: Vec<String> = want
                .refusals
                .iter()
                .filter(|(_, says)| !says.is_empty())
                .map(|(why, says)| format!("{says:?} ({why})"))
                .collect();
            failures.push(format!(
                "hook {}: {said}, want {tier}{}",
                row.hook,
                if reasons.is_empty() {
                    String::new()
                } else {
                    format!(" saying {}", reasons.join(", "))
                }
            ));
        }
    }
    failures
}

/// What the guest saw of one plan that attached.
pub(crate) struct Run<'a> {
    pub(crate) stderr: &'a str,
    pub(crate) status: &'a str,
    pub(crate) records: Vec<Value>,
    /// `tcprst-loadgen scenario` output: JSON lines, or errors.
    pub(crate) scenarios: &'a str,
}

impl<'a> Run<'a> {
    pub(crate) fn read(plan: &str, sections: &'a HashMap<&str, String>) -> Result<Self, String> {
        let section = |part: &str| {
            sections
                .get(format!("{plan}.{part}").as_str())
                .ok_or("the guest did not run it")
        };
        let stderr = section("err")?;
        let tracing = tcprst_line(stderr::TRACING);
        if !stderr.lines().any(|l| l.starts_with(&tracing)) {
            let last = stderr.lines().last().unwrap_or("no output");
            return Err(format!("tcprst never attached: {last}"));
        }
        let records = section("out")?
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("stdout is not NDJSON: {e}"))?;
        Ok(Self {
            stderr,
            status: section("status")?.trim(),
            records,
            scenarios: section("scenarios")?,
        })
    }

    /// The scenarios' records, after `failures` found in the hook lines.
    pub(crate) fn judge(&self, version: (u32, u32), mut failures: Vec<String>) -> Verdict {
        let mut notes = Vec::new();
        if self.status != "0" {
            failures.push(format!("tcprst exited with status {}", self.status));
        }
        let hooks = attached_hooks(self.stderr);
        // Before 6.10 the tracepoint misses resets sent without a socket,
        // and tcprst then says nothing about where received ones came from.
        let origins_known = version >= SOCKETLESS_TRACEPOINT
            || ["tcp_v4_send_reset", "tcp_v6_send_reset"]
                .iter()
                .all(|h| matches!(hooks.get(h), Some(Attached::Function(_))));
        let resets: Vec<&Value> = self
            .records
            .iter()
            .filter(|r| matches!(r["kind"].as_str(), Some("rst_sent" | "rst_received")))
            .collect();
        for scenario in SCENARIOS {
            let outcome = match self.outcome(scenario) {
                Ok(outcome) => outcome,
                Err(why) => {
                    failures.push(why);
                    continue;
                }
            };
            let Some(attached) = hooks.get(scenario.hook) else {
                failures.push(format!(
                    "{}: tcprst named no tier for {}",
                    scenario.name, scenario.hook
                ));
                continue;
            };
            let check = Check {
                scenario,
                outcome: &outcome,
                version,
                resets: &resets,
                origins_known,
            };
            check.run(attached, &mut failures, &mut notes);
        }
        failures.extend(duplicates(&resets));
        failures.extend(strangers(&resets));
        if failures.is_empty() {
            Verdict::Pass(notes)
        } else {
            Verdict::Fail(failures)
        }
    }

    /// The connection `scenario` made, or why it made none.
    pub(crate) fn outcome(&self, scenario: &Scenario) -> Result<Outcome, String> {
        self.scenarios
            .lines()
            .filter_map(|l| serde_json::from_str::<Outcome>(l).ok())
            .find(|o| o.scenario == scenario.name)
            .ok_or_else(|| {
                let prefix = format!("{}: ", scenario.name);
                let why = self.scenarios.lines().find(|l| l.starts_with(&prefix));
                why.map_or_else(|| format!("{prefix}no outcome printed"), str::to_owned)
            })
    }
}

/// What each `tcprst: hook HOOK: …` line says, by hook.
pub(crate) fn hook_lines(stderr: &str) -> HashMap<&str, &str> {
    let hook = tcprst_line(stderr::HOOK);
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix(&hook)?.split_once(": "))
        .collect()
}

/// How each hook attached, from its line.
pub(crate) fn attached_hooks(stderr: &str) -> HashMap<&str, Attached> {
    hook_lines(stderr)
        .into_iter()
        .map(|(hook, how)| {
            let attached = match how.split_whitespace().next().unwrap_or(how) {
                "tracepoint" => Attached::Tracepoint,
                "unavailable" => Attached::Unavailable(how.to_owned()),
                tier => Attached::Function(tier.to_owned()),
            };
            (hook, attached)
        })
        .collect()
}

/// One scenario's records under one plan.
pub(crate) struct Check<'a> {
    pub(crate) scenario: &'a Scenario,
    pub(crate) outcome: &'a Outcome,
    pub(crate) version: (u32, u32),
    pub(crate) resets: &'a [&'a Value],
    /// Whether tcprst can say where received resets came from.
    pub(crate) origins_known: bool,
}

impl Check<'_> {
    pub(crate) fn run(
        &self,
        attached: &Attached,
        failures: &mut Vec<String>,
        notes: &mut Vec<String>,
    ) {
        let reporter = self.reporter(attached, notes);
        failures.extend(self.check_sent(reporter, &self.find("rst_sent")));
        failures.extend(self.check_received(reporter, &self.find("rst_received")));
        failures.extend(self.others());
    }

    /// Records of the scenario's connection that are neither its sent
    /// reset nor its received one: a received reset the kernel's own abort
    /// fires its tracepoint for, say, where none arrived.
    pub(crate) fn others(&self) -> Vec<String> {
        let (client, server) = (self.outcome.client, self.outcome.server);
        let connection = [Some((client, server)), Some((server, client))];
        let expected = ["rst_sent", "rst_received"].map(|kind| (kind, Some(self.ends(kind))));
        self.resets
            .iter()
            .filter(|r| connection.contains(&record_ends(r)))
            .filter(|r| {
                !expected
                    .iter()
                    .any(|(kind, ends)| r["kind"] == *kind && record_ends(r) == *ends)
            })
            .map(|r| {
                format!(
                    "{}: a reset not on the wire: {}",
                    self.scenario.name,
                    describe(r)
                )
            })
            .collect()
    }

    /// This host's end, then the remote one, in a record of `kind`: the
    /// sender's end is local in `rst_sent`, the receiver's in `rst_received`.
    pub(crate) fn ends(&self, kind: &str) -> (SocketAddr, SocketAddr) {
        let (sender, receiver) = self
            .scenario
            .sender_and_receiver(self.outcome.client, self.outcome.server);
        if kind == "rst_sent" {
            (sender, receiver)
        } else {
            (receiver, sender)
        }
    }

    pub(crate) fn tuple(&self, kind: &str) -> String {
        let (local, remote) = self.ends(kind);
        format!("{kind} {local} ← {remote}")
    }

    /// The hook and tier that should report the sent reset, if any can.
    pub(crate) fn reporter<'a>(
        &self,
        attached: &'a Attached,
        notes: &mut Vec<String>,
    ) -> Option<(&'static str, &'a str)> {
        let name = self.scenario.name;
        match attached {
            Attached::Function(tier) => Some((self.scenario.hook, tier.as_str())),
            Attached::Tracepoint if self.tracepoint_sees_it() => {
                Some((SEND_RESET_TRACEPOINT, "tracepoint"))
            }
            Attached::Tracepoint => {
                notes.push(format!("{name} invisible (pre-6.10 tracepoint)"));
                None
            }
            Attached::Unavailable(why) => {
                notes.push(format!("{name}: {} {why}", self.scenario.hook));
                None
            }
        }
    }

    pub(crate) fn check_sent(
        &self,
        reporter: Option<(&str, &str)>,
        sent: &[&Value],
    ) -> Vec<String> {
        let name = self.scenario.name;
        match (reporter, sent) {
            (None, []) => Vec::new(),
            (None, [record, ..]) => vec![format!(
                "{name}: a reset no hook should see was reported by {}",
                record["hook"]
            )],
            (Some(_), []) => vec![format!("{name}: no {}", self.tuple("rst_sent"))],
            (Some((hook, tier)), [record, ..]) => {
                let want = [
                    ("hook", Some(hook)),
                    ("tier", Some(tier)),
                    ("state", self.scenario.state),
                    ("caller", Some(self.scenario.caller)),
                    ("context", Some(self.scenario.context)),
                    ("reason", self.reason()),
                ];
                mismatches(name, "rst_sent", record, &want)
            }
        }
    }

    /// Where the reset landed, and whether tcprst traced it to its sender:
    /// the local stack or netfilter when a hook saw it sent, "not a local
    /// TCP socket" for a netfilter reset no hook saw.
    pub(crate) fn check_received(
        &self,
        reporter: Option<(&str, &str)>,
        received: &[&Value],
    ) -> Vec<String> {
        let name = self.scenario.name;
        let Some(record) = received.first() else {
            return vec![format!("{name}: no {}", self.tuple("rst_received"))];
        };
        let (state, errno) = self.scenario.received;
        let want = [("state", Some(state)), ("errno", Some(errno))];
        let mut failures = mismatches(name, "rst_received", record, &want);
        let netfilter = self.scenario.hook.starts_with("nf_");
        let want = match (self.origins_known, reporter, netfilter) {
            (false, ..) => None,
            (true, Some(_), true) => Some(LOCAL_NETFILTER_ORIGIN),
            (true, Some(_), false) => Some(LOCAL_STACK_ORIGIN),
            (true, None, true) => Some(NOT_LOCAL_ORIGIN),
            // The local stack sent it, unseen: not the case on any plan.
            (true, None, false) => return failures,
        };
        let origin = record["origin"].as_str();
        let fits = match want {
            None => origin.is_none(),
            Some(want) => origin.is_some_and(|o| o.starts_with(want)),
        };
        if !fits {
            failures.push(format!(
                "{name}: rst_received origin is {}, want {}",
                record["origin"],
                want.map_or("null".to_owned(), |w| format!("one starting with \"{w}\""))
            ));
        }
        failures
    }

    pub(crate) fn find(&self, kind: &str) -> Vec<&Value> {
        let ends = Some(self.ends(kind));
        self.resets
            .iter()
            .copied()
            .filter(|r| r["kind"] == kind && record_ends(r) == ends)
            .collect()
    }

    /// Before 6.10 `tcp:tcp_send_reset` fires only for a full socket: not
    /// for none, nor for a timewait socket.
    pub(crate) fn tracepoint_sees_it(&self) -> bool {
        self.scenario.sent_by_full_socket() || self.version >= SOCKETLESS_TRACEPOINT
    }

    pub(crate) fn reason(&self) -> Option<&'static str> {
        self.scenario.reason.on(self.version)
    }
}

/// A record's local and remote ends.
pub(crate) fn record_ends(record: &Value) -> Option<(SocketAddr, SocketAddr)> {
    let end = |end: &str| {
        let addr = record[format!("{end}_addr")].as_str()?.parse().ok()?;
        let port = u16::try_from(record[format!("{end}_port")].as_u64()?).ok()?;
        Some(SocketAddr::new(addr, port))
    };
    Some((end("local")?, end("remote")?))
}

/// `rst_sent 127.0.0.1:4101 ← 127.0.0.1:40000`, for messages.
pub(crate) fn describe(record: &Value) -> String {
    let kind = record["kind"].as_str().unwrap_or("?");
    match record_ends(record) {
        Some((local, remote)) => format!("{kind} {local} ← {remote}"),
        None => format!("{kind} with unreadable ends"),
    }
}

/// Each field whose value differs from what is wanted (`None`: null).
pub(crate) fn mismatches(
    scenario: &str,
    kind: &str,
    record: &Value,
    want: &[(&str, Option<&str>)],
) -> Vec<String> {
    want.iter()
        .filter(|(field, value)| record[field].as_str() != *value)
        .map(|(field, value)| {
            let want = value.map_or("null".to_owned(), |v| format!("\"{v}\""));
            format!(
                "{scenario}: {kind} {field} is {}, want {want}",
                record[field]
            )
        })
        .collect()
}

/// A reset is one record, whichever hooks saw it.
pub(crate) fn duplicates(resets: &[&Value]) -> Vec<String> {
    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    for record in resets {
        seen.entry(describe(record))
            .or_default()
            .push(record["hook"].to_string());
    }
    seen.into_iter()
        .filter(|(_, hooks)| hooks.len() > 1)
        .map(|(key, hooks)| {
            format!(
                "reported {} times: {key} (hooks {})",
                hooks.len(),
                hooks.join(", ")
            )
        })
        .collect()
}

/// Resets on no scenario's port: only the scenarios make connections.
pub(crate) fn strangers(resets: &[&Value]) -> Vec<String> {
    let ports: Vec<u64> = SCENARIOS
        .iter()
        .map(|s| u64::from(s.server.port()))
        .collect();
    resets
        .iter()
        .filter(|r| {
            !ports
                .iter()
                .any(|p| r["local_port"] == *p || r["remote_port"] == *p)
        })
        .map(|r| {
            format!(
                "a reset no scenario made: {} (hook {})",
                describe(r),
                r["hook"]
            )
        })
        .collect()
}

pub(crate) fn print_rows(rows: &[PlanResult]) {
    let kernel_width = rows.iter().map(|r| r.kernel.len()).max().unwrap_or(0);
    println!("\n{:kernel_width$}  {:10}  RESULT", "KERNEL", "PLAN");
    for row in rows {
        let result = match &row.verdict {
            Verdict::Pass(notes) if notes.is_empty() => "pass".to_owned(),
            Verdict::Pass(notes) => format!("pass ({})", notes.join("; ")),
            Verdict::Fail(why) => format!("FAIL: {}", why.join("; ")),
            Verdict::Unavailable(why) => format!("unavailable: {why}"),
        };
        println!("{:kernel_width$}  {:10}  {result}", row.kernel, row.plan);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::vm::kernels::{HOOKS_5_10, HOOKS_SINCE_5_17};

    /// Close marks and the softirq test by the stack both come with 5.15's
    /// tp_btf programs: true from there, an error saying why before.
    #[test]
    fn the_doctor_must_match_the_kernel() {
        type Judge = fn(&Value, (u32, u32)) -> Verdict;
        let cases: [(Judge, &str, &str); 2] = [
            (
                judge_close_marks,
                "close_marks",
                "unknown func bpf_sk_storage_get#107",
            ),
            (
                judge_softirq_context,
                "softirq_by_stack",
                "a classic tracepoint program (tcp:tcp_send_reset) has no context on the kernel stack",
            ),
        ];
        for (judge, key, why) in cases {
            let works = json!({ key: true });
            let refused = json!({ key: { "error": why } });
            let passes =
                |doctor: &Value, version| matches!(judge(doctor, version), Verdict::Pass(_));
            let fails =
                |doctor: &Value, version| matches!(judge(doctor, version), Verdict::Fail(_));
            assert!(passes(&works, (6, 1)), "{key}");
            assert!(passes(&refused, (5, 10)), "{key}");
            assert!(fails(&refused, (6, 12)), "{key}");
            assert!(fails(&works, (5, 10)), "{key}");
            assert!(fails(&json!({}), (6, 12)), "{key}");
        }
    }

    /// tcprst's hook lines: `(hook, what it says)`.
    fn hook_stderr(lines: &[(&str, &str)]) -> String {
        lines
            .iter()
            .map(|(hook, how)| format!("tcprst: hook {hook}: {how}\n"))
            .collect()
    }

    fn plan(name: &str) -> AttachPlan {
        plans().into_iter().find(|p| p.name == name).unwrap()
    }

    /// Where fentry should work, tcprst refusing it for every hook is a
    /// failure, not an unavailable plan.
    #[test]
    fn a_tier_refused_against_the_table_fails() {
        let refused = "unavailable (fentry: the kernel refused to load it (Operation not permitted (os error 1); kernel lockdown?))";
        let stderr = hook_stderr(&[
            ("tcp_send_active_reset", refused),
            ("tcp_v4_send_reset", refused),
            ("tcp_v6_send_reset", refused),
            ("nf_send_reset", refused),
            ("nf_send_reset6", refused),
        ]);
        let sections = HashMap::from([("fentry.err", stderr), ("fentry.status", "2\n".to_owned())]);
        let Verdict::Fail(failures) =
            judge_plan(&plan("fentry"), HOOKS_SINCE_5_17, &sections, (6, 1))
        else {
            panic!("not a failure");
        };
        // Each hook's line, and the trace that never started.
        assert_eq!(failures.len(), 6, "{failures:?}");
        assert!(failures[0].starts_with("hook tcp_send_active_reset: unavailable"));
        assert!(failures[0].ends_with("want fentry"), "{failures:?}");
        assert!(failures[5].starts_with("tcprst never attached"));
    }

    /// 5.10 refuses fentry for its own reason: the plan is unavailable.
    #[test]
    fn a_tier_refused_as_the_table_says_is_unavailable() {
        let no_arg = "unavailable (fentry: loading failed: Invalid argument (os error 22): invalid func unknown#183)";
        let no_btf =
            "unavailable (fentry: no prototype in BTF: reading /sys/kernel/btf/nf_reject_ipv4)";
        let mut stderr = hook_stderr(&[
            ("tcp_send_active_reset", no_arg),
            ("tcp_v4_send_reset", no_arg),
            ("tcp_v6_send_reset", no_arg),
            ("nf_send_reset", no_btf),
            ("nf_send_reset6", no_btf),
        ]);
        stderr.push_str("tcprst: error: no hook for the resets TCP sends could be attached\n");
        let mut sections = HashMap::from([
            ("fentry.err", stderr.clone()),
            ("fentry.status", "2\n".to_owned()),
        ]);
        assert!(matches!(
            judge_plan(&plan("fentry"), HOOKS_5_10, &sections, (5, 10)),
            Verdict::Unavailable(why) if why == "no bpf_get_func_arg before 5.17"
        ));
        // Refused for a reason the table does not give.
        let eperm = stderr.replace("invalid func unknown#183", "Operation not permitted");
        sections.insert("fentry.err", eperm);
        assert!(matches!(
            judge_plan(&plan("fentry"), HOOKS_5_10, &sections, (5, 10)),
            Verdict::Fail(_)
        ));
    }

    /// One hook attached is enough to trace, and was enough to pass.
    #[test]
    fn every_hook_is_held_to_its_tier() {
        let unavailable =
            "unavailable (kprobe: loads and verifies, but attaching failed: Invalid argument)";
        let stderr = hook_stderr(&[
            ("tcp_send_active_reset", "kprobe"),
            ("tcp_v4_send_reset", unavailable),
            ("tcp_v6_send_reset", unavailable),
            ("nf_send_reset", unavailable),
            ("nf_send_reset6", "kprobe"),
            ("tcp_v5_send_reset", "kprobe"),
        ]);
        let expected: Vec<_> = HOOKS_SINCE_5_17
            .iter()
            .map(|row| (row, plan("kprobe").expected(row)))
            .collect();
        let failures = check_hook_lines(&expected, &stderr);
        assert_eq!(
            failures,
            [
                "tcprst named tcp_v5_send_reset, which the table lacks",
                &format!("hook tcp_v4_send_reset: {unavailable}, want kprobe"),
                &format!("hook tcp_v6_send_reset: {unavailable}, want kprobe"),
                &format!("hook nf_send_reset: {unavailable}, want kprobe"),
            ]
        );
    }

    #[test]
    fn the_doctor_must_match_the_table() {
        let tcp = json!({"fentry": "works", "kprobe": "works", "tracepoint": "works"});
        let nf = json!({"fentry": "it is in module nf_reject_ipv4, and this loader cannot attach fentry to module BTF", "kprobe": "works"});
        let hooks: Vec<Value> = HOOKS_SINCE_5_17
            .iter()
            .map(|row| json!({"hook": row.hook, "tiers": if row.is_tcp() { &tcp } else { &nf }}))
            .collect();
        let mut doctor = json!({ "hooks": hooks });
        assert!(matches!(
            judge_doctor(&doctor, HOOKS_SINCE_5_17),
            Verdict::Pass(_)
        ));
        doctor["hooks"][1]["tiers"]["fentry"] = json!("attaching failed: EBUSY");
        doctor["hooks"][3]["tiers"]["fentry"] = json!("works");
        let Verdict::Fail(failures) = judge_doctor(&doctor, HOOKS_SINCE_5_17) else {
            panic!("not a failure");
        };
        assert_eq!(failures.len(), 2, "{failures:?}");
        assert!(matches!(
            judge_doctor(&doctor, HOOKS_5_10),
            Verdict::Fail(_)
        ));
    }

    fn reset(kind: &str, local: &str, remote: &str, fields: Value) -> Value {
        let (local, remote): (SocketAddr, SocketAddr) =
            (local.parse().unwrap(), remote.parse().unwrap());
        let mut record = json!({
            "kind": kind,
            "local_addr": local.ip().to_string(), "local_port": local.port(),
            "remote_addr": remote.ip().to_string(), "remote_port": remote.port(),
        });
        record
            .as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        record
    }

    fn check(
        scenario: &str,
        version: (u32, u32),
        attached: &Attached,
        resets: &[Value],
    ) -> (Vec<String>, Vec<String>) {
        let scenario = SCENARIOS.iter().find(|s| s.name == scenario).unwrap();
        let outcome = Outcome {
            scenario: scenario.name.to_owned(),
            client: "127.0.0.1:40000".parse().unwrap(),
            server: scenario.server,
        };
        let resets: Vec<&Value> = resets.iter().collect();
        let check = Check {
            scenario,
            outcome: &outcome,
            version,
            resets: &resets,
            // As judge() decides it, with every TCP reply hook like this one.
            origins_known: version >= SOCKETLESS_TRACEPOINT
                || matches!(attached, Attached::Function(_)),
        };
        let (mut failures, mut notes) = (Vec::new(), Vec::new());
        check.run(attached, &mut failures, &mut notes);
        (failures, notes)
    }

    #[test]
    fn closed_port_resets_are_invisible_to_the_tracepoint_before_6_10() {
        let received = reset(
            "rst_received",
            "127.0.0.1:40000",
            "127.0.0.1:4101",
            json!({"state": "SYN_SENT", "errno": "ECONNREFUSED"}),
        );
        let (failures, notes) = check(
            "closed-port",
            (6, 1),
            &Attached::Tracepoint,
            std::slice::from_ref(&received),
        );
        assert!(failures.is_empty(), "{failures:?}");
        assert_eq!(notes, ["closed-port invisible (pre-6.10 tracepoint)"]);

        let mut received = received;
        received["origin"] = json!("this host's TCP stack");
        let (failures, _) = check("closed-port", (6, 12), &Attached::Tracepoint, &[received]);
        assert_eq!(
            failures,
            ["closed-port: no rst_sent 127.0.0.1:4101 ← 127.0.0.1:40000"]
        );
    }

    #[test]
    fn every_field_of_a_reset_is_checked() {
        let sent = reset(
            "rst_sent",
            "127.0.0.1:4103",
            "127.0.0.1:40000",
            json!({"hook": "tcp_send_active_reset", "tier": "kprobe", "state": "CLOSE", "caller": "tcp_close", "context": "process", "reason": "NOT_SPECIFIED"}),
        );
        let received = reset(
            "rst_received",
            "127.0.0.1:40000",
            "127.0.0.1:4103",
            json!({"state": "ESTABLISHED", "errno": "ECONNRESET", "origin": "this host's TCP stack"}),
        );
        let kprobe = Attached::Function("kprobe".to_owned());
        let resets = [sent, received];
        let (failures, _) = check("abort-on-close", (6, 1), &kprobe, &resets);
        assert_eq!(
            failures,
            ["abort-on-close: rst_sent reason is \"NOT_SPECIFIED\", want null"]
        );
        let (failures, _) = check("abort-on-close", (6, 12), &kprobe, &resets);
        assert_eq!(
            failures,
            ["abort-on-close: rst_sent reason is \"NOT_SPECIFIED\", want \"TCP_ABORT_ON_CLOSE\""]
        );
    }

    #[test]
    fn a_netfilter_reset_without_a_hook_must_be_named_on_the_receiving_side() {
        let received = reset(
            "rst_received",
            "127.0.0.1:40000",
            "127.0.0.1:4105",
            json!({"state": "SYN_SENT", "errno": "ECONNREFUSED", "origin": "a reset from tcp_v4_send_reset"}),
        );
        let unavailable = Attached::Unavailable("unavailable (no tracepoint)".to_owned());
        let (failures, _) = check("nft-reject", (6, 12), &unavailable, &[received]);
        assert_eq!(failures.len(), 1);
        assert!(failures[0].contains(NOT_LOCAL_ORIGIN), "{failures:?}");
    }

    /// The kernel's abort of a socket shut down for reading fires the
    /// received reset's tracepoint on that socket; tcprst must not show it.
    #[test]
    fn a_reset_not_on_the_wire_fails() {
        let sent = reset(
            "rst_sent",
            "127.0.0.1:40000",
            "127.0.0.1:4107",
            json!({"hook": "tcp:tcp_send_reset", "tier": "tracepoint", "state": "CLOSE", "caller": "tcp_v4_do_rcv", "context": "softirq", "reason": "TCP_ABORT_ON_DATA"}),
        );
        let received = reset(
            "rst_received",
            "127.0.0.1:4107",
            "127.0.0.1:40000",
            json!({"state": "CLOSE_WAIT", "errno": "EPIPE", "origin": "this host's TCP stack"}),
        );
        let phantom = reset(
            "rst_received",
            "127.0.0.1:40000",
            "127.0.0.1:4107",
            json!({"state": "FIN_WAIT2", "errno": "ECONNRESET"}),
        );
        let on_the_wire = [sent, received];
        let (failures, _) = check(
            "shutdown-data",
            (6, 12),
            &Attached::Tracepoint,
            &on_the_wire,
        );
        assert!(failures.is_empty(), "{failures:?}");
        let mut with_phantom = on_the_wire.to_vec();
        with_phantom.push(phantom);
        let (failures, _) = check(
            "shutdown-data",
            (6, 12),
            &Attached::Tracepoint,
            &with_phantom,
        );
        assert_eq!(
            failures,
            [
                "shutdown-data: a reset not on the wire: rst_received 127.0.0.1:40000 ← 127.0.0.1:4107"
            ]
        );
    }

    #[test]
    fn a_reset_seen_by_two_hooks_is_a_duplicate() {
        let sent = |hook| {
            reset(
                "rst_sent",
                "127.0.0.1:4101",
                "127.0.0.1:40000",
                json!({"hook": hook}),
            )
        };
        let records = [sent("tcp_v4_send_reset"), sent("tcp:tcp_send_reset")];
        let resets: Vec<&Value> = records.iter().collect();
        assert_eq!(
            duplicates(&resets),
            [
                "reported 2 times: rst_sent 127.0.0.1:4101 ← 127.0.0.1:40000 (hooks \"tcp_v4_send_reset\", \"tcp:tcp_send_reset\")"
            ]
        );
        assert!(duplicates(&resets[..1]).is_empty());
    }
}
