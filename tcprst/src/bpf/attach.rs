//! The attach planner: which tier serves each reset function on this
//! kernel. fentry is cheapest and sees the arguments as the kernel typed
//! them; kprobes work without the trampoline support fentry needs; the
//! `tcp:tcp_send_reset` tracepoint is the last resort for the TCP
//! functions (before 6.10 it misses resets sent without a full socket), and
//! netfilter has no tracepoint at all. `probes` tries the candidates in
//! order; this module decides the order and explains the outcome.

use std::{fmt, str::FromStr};

use anyhow::{Result, bail};
use tcprst_common::{ABSENT, AttachTier, FunctionArgs, ResetHook, names::programs};

/// A kernel function that sends resets, and its programs.
#[derive(Debug)]
pub struct ResetFunction {
    pub hook: ResetHook,
    pub function: &'static str,
    pub kprobe_program: &'static str,
    pub fentry_program: &'static str,
    /// Whether `tcp:tcp_send_reset` fires inside it.
    pub has_tracepoint: bool,
}

/// In `tcprst_common::FUNCTION_HOOKS` order, which the programs index by.
pub(crate) const RESET_FUNCTIONS: [ResetFunction; 5] = [
    ResetFunction {
        hook: ResetHook::ActiveReset,
        function: ResetHook::ActiveReset.name(),
        kprobe_program: programs::KP_ACTIVE_RESET,
        fentry_program: programs::FE_ACTIVE_RESET,
        has_tracepoint: true,
    },
    ResetFunction {
        hook: ResetHook::V4SendReset,
        function: ResetHook::V4SendReset.name(),
        kprobe_program: programs::KP_V4_SEND_RESET,
        fentry_program: programs::FE_V4_SEND_RESET,
        has_tracepoint: true,
    },
    ResetFunction {
        hook: ResetHook::V6SendReset,
        function: ResetHook::V6SendReset.name(),
        kprobe_program: programs::KP_V6_SEND_RESET,
        fentry_program: programs::FE_V6_SEND_RESET,
        has_tracepoint: true,
    },
    ResetFunction {
        hook: ResetHook::NfSendReset,
        function: ResetHook::NfSendReset.name(),
        kprobe_program: programs::KP_NF_SEND_RESET,
        fentry_program: programs::FE_NF_SEND_RESET,
        has_tracepoint: false,
    },
    ResetFunction {
        hook: ResetHook::NfSendReset6,
        function: ResetHook::NfSendReset6.name(),
        kprobe_program: programs::KP_NF_SEND_RESET6,
        fentry_program: programs::FE_NF_SEND_RESET6,
        has_tracepoint: false,
    },
];

pub(crate) fn tier_name(tier: AttachTier) -> &'static str {
    tier.name()
}

/// What a record's hook is called in output: the function, or the tracepoint.
pub(crate) fn hook_name(hook: ResetHook) -> &'static str {
    hook.name()
}

fn parse_tier(s: &str) -> Result<AttachTier> {
    Ok(match s {
        "fentry" => AttachTier::Fentry,
        "kprobe" => AttachTier::Kprobe,
        "tracepoint" => AttachTier::Tracepoint,
        _ => bail!("unknown attach tier {s:?} (expected auto, fentry, kprobe or tracepoint)"),
    })
}

/// One `--attach` value: `auto`, a tier for every function, or `FUNCTION=TIER`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachSpec {
    Auto,
    All(AttachTier),
    One(ResetHook, AttachTier),
}

impl FromStr for AttachSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        if s == "auto" {
            return Ok(Self::Auto);
        }
        let Some((function, tier)) = s.split_once('=') else {
            return parse_tier(s).map(Self::All);
        };
        let Some(f) = RESET_FUNCTIONS.iter().find(|f| f.function == function) else {
            let known: Vec<_> = RESET_FUNCTIONS.iter().map(|f| f.function).collect();
            bail!(
                "unknown reset function {function:?} (expected one of {})",
                known.join(", ")
            );
        };
        Ok(Self::One(f.hook, parse_tier(tier)?))
    }
}

/// What `--attach` asked for; the last value for a function wins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttachRequest {
    all: Option<AttachTier>,
    one: Vec<(ResetHook, AttachTier)>,
}

impl AttachRequest {
    pub fn new(specs: &[AttachSpec]) -> Self {
        let mut request = Self::default();
        for spec in specs {
            match *spec {
                AttachSpec::Auto => request.all = None,
                AttachSpec::All(tier) => request.all = Some(tier),
                AttachSpec::One(hook, tier) => request.one.push((hook, tier)),
            }
        }
        request
    }

    /// The tiers to try for `f`, best first. A forced tier is the only
    /// candidate: someone who forces kprobes wants to know they failed.
    pub(crate) fn candidates(&self, f: &ResetFunction) -> Vec<AttachTier> {
        let forced = self
            .one
            .iter()
            .rev()
            .find(|(hook, _)| *hook == f.hook)
            .map(|(_, tier)| *tier)
            .or(self.all);
        let mut tiers = match forced {
            Some(tier) => vec![tier],
            None => vec![
                AttachTier::Fentry,
                AttachTier::Kprobe,
                AttachTier::Tracepoint,
            ],
        };
        tiers.retain(|t| *t != AttachTier::Tracepoint || f.has_tracepoint);
        tiers
    }
}

/// Where a kernel function lives, from /proc/kallsyms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FunctionSite {
    Missing,
    Vmlinux,
    Module(String),
}

impl FunctionSite {
    pub(crate) fn find(kallsyms: &str, function: &str) -> Self {
        for line in kallsyms.lines() {
            let mut parts = line.split_whitespace();
            let (Some(_), Some(kind), Some(name)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if name == function && matches!(kind, "t" | "T") {
                return match parts.next() {
                    Some(module) => Self::Module(module.trim_matches(['[', ']']).to_owned()),
                    None => Self::Vmlinux,
                };
            }
        }
        Self::Missing
    }
}

/// The argument positions the programs read, from the parameter names of
/// the function's BTF prototype. None when a needed one is missing.
pub(crate) fn function_args(hook: ResetHook, params: &[String]) -> Option<FunctionArgs> {
    let position = |names: &[&str]| {
        params
            .iter()
            .position(|p| names.contains(&p.as_str()))
            .map_or(ABSENT, |i| i as u32)
    };
    let args = FunctionArgs {
        sk: position(&["sk"]),
        skb: position(&["skb", "oldskb"]),
        reason: position(&["reason"]),
        net: position(&["net"]),
        hook: position(&["hook"]),
    };
    let complete = match hook {
        ResetHook::ActiveReset => args.sk != ABSENT,
        ResetHook::V4SendReset
        | ResetHook::V6SendReset
        | ResetHook::NfSendReset
        | ResetHook::NfSendReset6 => args.skb != ABSENT,
        ResetHook::SendResetTracepoint | ResetHook::ReceiveResetTracepoint => false,
    };
    complete.then_some(args)
}

/// How one reset function ended up attached, and why not better.
#[derive(Debug, Clone)]
pub struct HookPlan {
    pub function: &'static ResetFunction,
    pub tier: Option<AttachTier>,
    /// Each better tier tried, and why it did not work.
    pub passed_over: Vec<(AttachTier, String)>,
    /// Worse tiers that work too, when every tier was tried (`doctor`).
    pub also_works: Vec<AttachTier>,
}

impl fmt::Display for HookPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.tier {
            Some(tier) => write!(f, "{}", tier_name(tier))?,
            None => write!(f, "unavailable")?,
        }
        if !self.passed_over.is_empty() {
            let why: Vec<String> = self
                .passed_over
                .iter()
                .map(|(tier, why)| format!("{}: {why}", tier_name(*tier)))
                .collect();
            write!(f, " ({})", why.join("; "))?;
        }
        Ok(())
    }
}

/// The one start-up line about `plans`: how many functions each tier
/// serves and which none can. Each plan's own line (`HookPlan`'s Display)
/// is a detail for `-v` and `doctor`; this line says where to find it when
/// any function got less than the best tier.
pub(crate) fn plans_summary(plans: &[HookPlan]) -> String {
    let mut parts = Vec::new();
    for tier in [
        AttachTier::Fentry,
        AttachTier::Kprobe,
        AttachTier::Tracepoint,
    ] {
        let n = plans.iter().filter(|p| p.tier == Some(tier)).count();
        if n > 0 {
            let on = match tier {
                AttachTier::Fentry => "fentry",
                AttachTier::Kprobe => "kprobes",
                AttachTier::Tracepoint => "tracepoints",
            };
            parts.push(format!("{n} on {on}"));
        }
    }
    let unseen: Vec<&ResetFunction> = plans
        .iter()
        .filter(|p| p.tier.is_none())
        .map(|p| p.function)
        .collect();
    let netfilter = RESET_FUNCTIONS.iter().filter(|f| !f.has_tracepoint).count();
    if unseen.len() == netfilter && unseen.iter().all(|f| !f.has_tracepoint) {
        parts.push("netfilter not visible on this kernel".to_owned());
    } else if !unseen.is_empty() {
        let names: Vec<&str> = unseen.iter().map(|f| f.function).collect();
        parts.push(format!("{} not visible on this kernel", names.join(", ")));
    }
    let mut line = format!("hooks: {}", parts.join(", "));
    if plans.iter().any(|p| !p.passed_over.is_empty()) {
        line.push_str(" — `tcprst doctor` explains");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn function(hook: ResetHook) -> &'static ResetFunction {
        RESET_FUNCTIONS.iter().find(|f| f.hook == hook).unwrap()
    }

    #[test]
    fn functions_follow_the_kernel_programs_index() {
        let hooks: Vec<_> = RESET_FUNCTIONS.iter().map(|f| f.hook).collect();
        assert_eq!(hooks, tcprst_common::FUNCTION_HOOKS);
    }

    #[test]
    fn auto_tries_fentry_then_kprobe_then_the_tracepoint() {
        let auto = AttachRequest::new(&["auto".parse().unwrap()]);
        assert_eq!(
            auto.candidates(function(ResetHook::V4SendReset)),
            [
                AttachTier::Fentry,
                AttachTier::Kprobe,
                AttachTier::Tracepoint
            ]
        );
        // Netfilter has no tracepoint to fall back to.
        assert_eq!(
            auto.candidates(function(ResetHook::NfSendReset)),
            [AttachTier::Fentry, AttachTier::Kprobe]
        );
    }

    #[test]
    fn a_forced_tier_is_the_only_candidate() {
        let specs: Vec<AttachSpec> = ["kprobe", "tcp_v6_send_reset=tracepoint"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let request = AttachRequest::new(&specs);
        assert_eq!(
            request.candidates(function(ResetHook::ActiveReset)),
            [AttachTier::Kprobe]
        );
        assert_eq!(
            request.candidates(function(ResetHook::V6SendReset)),
            [AttachTier::Tracepoint]
        );
        let tracepoint = AttachRequest::new(&["tracepoint".parse().unwrap()]);
        assert!(
            tracepoint
                .candidates(function(ResetHook::NfSendReset6))
                .is_empty()
        );
    }

    #[test]
    fn rejects_unknown_tiers_and_functions() {
        let err = "uprobe".parse::<AttachSpec>().unwrap_err();
        assert!(err.to_string().contains("unknown attach tier"), "{err}");
        let err = "tcp_v5_send_reset=kprobe"
            .parse::<AttachSpec>()
            .unwrap_err();
        assert!(err.to_string().contains("unknown reset function"), "{err}");
        assert!("tcp_v4_send_reset=nope".parse::<AttachSpec>().is_err());
    }

    #[test]
    fn finds_functions_in_vmlinux_and_modules() {
        let kallsyms = "\
ffffffff8202a560 T tcp_send_active_reset
ffffffff82031a30 t tcp_v4_send_reset
ffffffffc0a01230 t nf_send_reset\t[nf_reject_ipv4]
ffffffff82031a30 d tcp_v6_send_reset
";
        let find = |f| FunctionSite::find(kallsyms, f);
        assert_eq!(find("tcp_send_active_reset"), FunctionSite::Vmlinux);
        assert_eq!(find("tcp_v4_send_reset"), FunctionSite::Vmlinux);
        assert_eq!(
            find("nf_send_reset"),
            FunctionSite::Module("nf_reject_ipv4".into())
        );
        // Data symbols are not functions.
        assert_eq!(find("tcp_v6_send_reset"), FunctionSite::Missing);
        assert_eq!(find("nf_send_reset6"), FunctionSite::Missing);
    }

    /// Prototypes as the kernels' BTF spells them.
    #[test]
    fn argument_positions_follow_the_prototype() {
        // 6.10+: tcp_v4_send_reset(sk, skb, reason)
        let v610 = function_args(ResetHook::V4SendReset, &names(&["sk", "skb", "reason"]));
        assert_eq!(
            v610,
            Some(FunctionArgs {
                sk: 0,
                skb: 1,
                reason: 2,
                net: ABSENT,
                hook: ABSENT
            })
        );
        // Before: no reason.
        let v61 = function_args(ResetHook::V4SendReset, &names(&["sk", "skb"])).unwrap();
        assert_eq!(v61.reason, ABSENT);
        // nf_send_reset gained sk in 5.x: oldskb moved.
        let old = function_args(ResetHook::NfSendReset, &names(&["net", "oldskb", "hook"]));
        let new = function_args(
            ResetHook::NfSendReset,
            &names(&["net", "sk", "oldskb", "hook"]),
        );
        assert_eq!((old.unwrap().skb, old.unwrap().hook), (1, 2));
        assert_eq!(
            (new.unwrap().skb, new.unwrap().hook, new.unwrap().sk),
            (2, 3, 1)
        );
        // tcp_send_active_reset(sk, priority[, reason]) needs the socket.
        assert!(function_args(ResetHook::ActiveReset, &names(&["priority"])).is_none());
    }

    #[test]
    fn a_plan_says_what_was_passed_over() {
        let plan = HookPlan {
            function: function(ResetHook::V4SendReset),
            tier: Some(AttachTier::Tracepoint),
            passed_over: vec![
                (AttachTier::Fentry, "EPERM".into()),
                (AttachTier::Kprobe, "no kprobes".into()),
            ],
            also_works: Vec::new(),
        };
        assert_eq!(
            plan.to_string(),
            "tracepoint (fentry: EPERM; kprobe: no kprobes)"
        );
    }

    fn plan(hook: ResetHook, tier: Option<AttachTier>) -> HookPlan {
        let passed_over = [AttachTier::Fentry, AttachTier::Kprobe]
            .into_iter()
            .filter(|better| tier.is_none_or(|tier| *better > tier))
            .map(|better| (better, "refused".to_owned()))
            .collect();
        HookPlan {
            function: function(hook),
            tier,
            passed_over,
            also_works: Vec::new(),
        }
    }

    #[test]
    fn the_summary_counts_tiers_and_names_what_none_serves() {
        let tracepoint = Some(AttachTier::Tracepoint);
        let locked_down = [
            plan(ResetHook::ActiveReset, tracepoint),
            plan(ResetHook::V4SendReset, tracepoint),
            plan(ResetHook::V6SendReset, tracepoint),
            plan(ResetHook::NfSendReset, None),
            plan(ResetHook::NfSendReset6, None),
        ];
        assert_eq!(
            plans_summary(&locked_down),
            "hooks: 3 on tracepoints, netfilter not visible on this kernel — `tcprst doctor` explains"
        );
        let fentry = Some(AttachTier::Fentry);
        let all_fentry = RESET_FUNCTIONS.map(|f| plan(f.hook, fentry));
        assert_eq!(plans_summary(&all_fentry), "hooks: 5 on fentry");
        let mixed = [
            plan(ResetHook::ActiveReset, fentry),
            plan(ResetHook::V4SendReset, Some(AttachTier::Kprobe)),
            plan(ResetHook::V6SendReset, tracepoint),
            plan(ResetHook::NfSendReset, fentry),
            plan(ResetHook::NfSendReset6, None),
        ];
        assert_eq!(
            plans_summary(&mixed),
            "hooks: 2 on fentry, 1 on kprobes, 1 on tracepoints, nf_send_reset6 not visible on this kernel — `tcprst doctor` explains"
        );
    }
}
