//! Checks the capabilities loading tracing programs needs, so a user gets
//! one line naming what is missing instead of an EPERM from deep inside.

use std::fs;

use anyhow::{Result, bail};

const CAP_SYS_ADMIN: u32 = 21;
/// What lets /proc/kallsyms show addresses (stacks.rs).
pub const CAP_SYSLOG: u32 = 34;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// CAP_BPF and CAP_PERFMON (5.8+), or CAP_SYS_ADMIN, which covers both.
pub fn check() -> Result<()> {
    let status = fs::read_to_string("/proc/self/status")?;
    let effective = effective_caps(&status).unwrap_or(0);
    if let Some(missing) = missing_caps(effective) {
        bail!("missing {missing}: run tcprst as root (sudo tcprst …) or grant those capabilities");
    }
    Ok(())
}

/// Whether this process holds `cap` in its effective set.
pub fn has(cap: u32) -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| effective_caps(&status))
        .is_some_and(|effective| effective & (1 << cap) != 0)
}

fn effective_caps(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

fn missing_caps(effective: u64) -> Option<String> {
    let has = |cap: u32| effective & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) {
        return None;
    }
    let missing: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
        .into_iter()
        .filter(|(cap, _)| !has(*cap))
        .map(|(_, name)| name)
        .collect();
    (!missing.is_empty()).then(|| missing.join(" and "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cap_eff() {
        let status = "Name:\tcat\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_caps(status), Some(0x1ff_ffff_ffff));
    }

    #[test]
    fn names_what_is_missing() {
        assert_eq!(missing_caps(0).as_deref(), Some("CAP_BPF and CAP_PERFMON"));
        assert_eq!(missing_caps(1 << CAP_BPF).as_deref(), Some("CAP_PERFMON"));
        assert_eq!(missing_caps((1 << CAP_BPF) | (1 << CAP_PERFMON)), None);
        assert_eq!(missing_caps(1 << CAP_SYS_ADMIN), None);
    }
}
