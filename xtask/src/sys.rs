//! What bench and soak change on the machine and read from it: network
//! namespaces, sysctls, /proc.

use std::{
    collections::BTreeMap,
    fs,
    path::Path,
    process::{self, Command},
    thread,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use tcprst_loadgen::netns::ScratchNetns;

use crate::bench::NETNS_PREFIX;

/// A network namespace for one bench or soak run, deleted when dropped,
/// named so that a later run can tell it was left by one that died.
pub(crate) fn run_netns(run: &str) -> Result<ScratchNetns> {
    let ns = ScratchNetns::create(format!("{NETNS_PREFIX}{}-{run}", process::id()))?;
    // Churn closes tens of thousands of connections a second: a wide port
    // range and TIME_WAIT reuse keep connect() from running out of ports.
    ns.sysctl("net/ipv4/ip_local_port_range", "10000 65535")?;
    ns.sysctl("net/ipv4/tcp_tw_reuse", "1")?;
    // Linux 6.13+; older kernels reuse after 1s, which is enough too.
    let _ = ns.sysctl("net/ipv4/tcp_tw_reuse_delay", "1");
    Ok(ns)
}

/// Namespaces an earlier bench left behind when it was killed outright.
pub(crate) fn remove_stale_netns() {
    remove_netns_where(left_by_dead_run);
}

/// Deletes the namespaces under /run/netns whose names `doomed` picks.
pub(crate) fn remove_netns_where(doomed: impl Fn(&str) -> bool) {
    let Ok(entries) = fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if doomed(&name) {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

/// Whether `name` is one a bench or soak gives, NETNS_PREFIX and its pid,
/// from a run whose process is gone.
pub(crate) fn left_by_dead_run(name: &str) -> bool {
    name.strip_prefix(NETNS_PREFIX)
        .and_then(|r| r.split('-').next())
        .is_some_and(|pid| !Path::new("/proc").join(pid).exists())
}

/// A sysctl set for a while, restored when dropped.
pub(crate) struct Sysctl {
    pub(crate) path: &'static str,
    pub(crate) before: String,
}

impl Sysctl {
    pub(crate) fn set(path: &'static str, value: &str) -> Result<Self> {
        let before = fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        fs::write(path, value).with_context(|| format!("writing {path}"))?;
        Ok(Self { path, before })
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        if let Err(e) = fs::write(self.path, self.before.trim()) {
            eprintln!("bench: could not restore {}: {e}", self.path);
        }
    }
}

pub(crate) fn proc_stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may hold spaces; the fields after its closing parenthesis do not.
    let rest = stat.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

pub(crate) fn proc_state(pid: u32) -> Option<char> {
    proc_stat_fields(pid)?.first()?.chars().next()
}

/// utime + stime (fields 14 and 15 of /proc/PID/stat), every thread's.
/// Idle seconds of every CPU together (idle and iowait), from the first
/// line of /proc/stat. Under NO_HZ the kernel measures idle time with its
/// clock when a CPU sleeps, while user and system time are sampled at each
/// tick, which a load paced by timers can alias badly: busy time is taken
/// as wall time minus idle time.
pub(crate) fn system_idle_s() -> Result<f64> {
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .context("/proc/stat has no cpu line")?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("parsing /proc/stat")?;
    let [_user, _nice, _system, idle, iowait, ..] = fields[..] else {
        bail!("/proc/stat's cpu line has {} fields", fields.len());
    };
    Ok((idle + iowait) as f64 / clock_ticks_per_s())
}

/// Busy CPU seconds of the whole machine since `idle_before` was read at
/// `since`.
pub(crate) fn system_busy_s(since: Instant, idle_before: f64) -> Result<f64> {
    let cpus = thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    Ok(since.elapsed().as_secs_f64() * cpus - (system_idle_s()? - idle_before))
}

pub(crate) fn proc_cpu_ticks(pid: u32) -> Result<u64> {
    let f = proc_stat_fields(pid).with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Counted from field 3 (state), which is f[0].
    let tick = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok());
    match (tick(14), tick(15)) {
        (Some(u), Some(s)) => Ok(u + s),
        _ => bail!("unexpected /proc/{pid}/stat"),
    }
}

/// Each live thread's CPU time so far, ns, by thread id
/// (`/proc/PID/task/TID/schedstat`): exact, where /proc/PID/stat counts
/// clock ticks.
pub(crate) fn thread_cpu_ns(pid: u32) -> Result<BTreeMap<u32, u64>> {
    let dir = format!("/proc/{pid}/task");
    let mut threads = BTreeMap::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let entry = entry?;
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        // A thread may end between the listing and the read.
        let Ok(stat) = fs::read_to_string(entry.path().join("schedstat")) else {
            continue;
        };
        if let Some(ns) = stat.split(' ').next().and_then(|ns| ns.parse().ok()) {
            threads.insert(tid, ns);
        }
    }
    // A live process has at least its main thread: none read means the
    // kernel keeps no schedstat, and every thread time would read 0.
    if threads.is_empty() {
        bail!("no thread of process {pid} has a readable {dir}/*/schedstat (CONFIG_SCHED_INFO)");
    }
    Ok(threads)
}

/// The CPU time threads spent between two `thread_cpu_ns` readings, ns:
/// a thread new since the first counts whole, one gone since loses what
/// it spent between them (idle pool threads, which spend nothing).
pub(crate) fn thread_cpu_ns_between(
    before: &BTreeMap<u32, u64>,
    after: &BTreeMap<u32, u64>,
) -> u64 {
    after
        .iter()
        .map(|(tid, ns)| ns.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum()
}

pub(crate) fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf() takes a name and touches no memory.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

/// (VmHWM, VmRSS) in KiB.
pub(crate) fn proc_memory(pid: u32) -> Result<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no {key} in /proc/{pid}/status"))
    };
    Ok((kib("VmHWM:")?, kib("VmRSS:")?))
}

/// A port nothing on host loopback uses right now.
pub(crate) fn free_loopback_port() -> Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(listener.local_addr()?.port())
}

/// The fdinfo of each BPF object of `kind` (`map`, `prog`) that process
/// `pid` holds a descriptor for; one that closes meanwhile reads as empty.
pub(crate) fn bpf_fdinfos(pid: u32, kind: &str) -> Result<Vec<FdInfo>> {
    let link = format!("anon_inode:bpf-{kind}");
    let fds = fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("listing /proc/{pid}/fd"))?;
    Ok(fds
        .flatten()
        .filter(|fd| fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == link.as_str()))
        .map(|fd| {
            let path = format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy());
            FdInfo(fs::read_to_string(path).unwrap_or_default())
        })
        .collect())
}

/// A /proc/PID/fdinfo/FD file's text.
pub(crate) struct FdInfo(String);

impl FdInfo {
    /// The number in its `key:` line.
    pub(crate) fn field(&self, key: &str) -> Option<u64> {
        self.0
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn thread_time_between_counts_new_threads_whole_and_gone_ones_not() {
        let before = BTreeMap::from([(1, 100), (2, 50), (3, 70)]);
        // 1 ran 20 more, 2 ended, 4 began and ran 5; 3 did nothing.
        let after = BTreeMap::from([(1, 120), (3, 70), (4, 5)]);
        assert_eq!(thread_cpu_ns_between(&before, &after), 25);
    }

    #[test]
    fn this_process_threads_are_read() {
        let threads = thread_cpu_ns(std::process::id()).unwrap();
        assert!(!threads.is_empty());
        // Spins until the readings show 10 ms more; a busy host only
        // makes that take longer.
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while thread_cpu_ns_between(&threads, &thread_cpu_ns(std::process::id()).unwrap())
            < 10_000_000
        {
            assert!(Instant::now() < deadline, "no thread time counted");
        }
    }
}
