//! `cargo xtask vm-test`: the reset scenarios under every attach tier, on
//! real Debian kernels booted under qemu. TCG, not KVM, so it runs wherever
//! qemu does, and the host's own kernel (which may forbid kprobes and
//! fentry) does not matter.
//!
//! One boot per kernel. Its initramfs holds busybox, static tcprst and
//! tcprst-loadgen, the host's nft with its libraries, and the modules behind
//! `reject with tcp reset`. Its /init runs `tcprst doctor`, then one
//! `tcprst trace` per plan (each tier forced, and one mixed plan) around the
//! scenarios, and writes everything to a second serial port between
//! markers. The host then checks each hook's tier against what the kernel
//! is known to give (`Kernel::hooks`), and each scenario's records.
//!
//! Kernels and the initramfs pieces are cached under target/vm/, so only
//! the first run downloads.

use std::{
    collections::{BTreeSet, HashMap},
    fmt, fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;
use serde_json::Value;

use super::{ensure_apt_packages, output, status, target_dir};

/// qemu, what goes into the initramfs, `depmod` for the kernels' module
/// trees (Debian's packages leave modules.dep to their postinst), and `xz`
/// for compressed modules, which busybox's insmod may not read.
const PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "kmod", "xz-utils"];

const KERNELS: &[Kernel] = &[
    Kernel {
        series: "5.10",
        metapackage: "linux-image-cloud-amd64",
        hooks: HOOKS_5_10,
        archive: Archive::Private {
            name: "bullseye",
            sources: "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye main\n\
                      deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bullseye-security main\n",
        },
    },
    Kernel {
        series: "6.1",
        metapackage: "linux-image-cloud-amd64",
        hooks: HOOKS_SINCE_5_17,
        archive: Archive::Host,
    },
    Kernel {
        series: "6.12",
        metapackage: "linux-image-6.12-cloud-amd64",
        hooks: HOOKS_SINCE_5_17,
        archive: Archive::Host,
    },
];

/// What each hook gives on each tier of Linux 5.10: no fentry, whose
/// programs read their arguments with bpf_get_func_arg (5.17), and no
/// netfilter hook at all: nf_send_reset lives in a module, and module BTF,
/// where kprobes too find its arguments, came in 5.11.
#[rustfmt::skip]
const HOOKS_5_10: &[HookExpect] = &[
    //               hook                    fentry           kprobe         tracepoint
    HookExpect::new("tcp_send_active_reset", NO_GET_FUNC_ARG, ATTACHED,      ATTACHED),
    HookExpect::new("tcp_v4_send_reset",     NO_GET_FUNC_ARG, ATTACHED,      ATTACHED),
    HookExpect::new("tcp_v6_send_reset",     NO_GET_FUNC_ARG, ATTACHED,      ATTACHED),
    HookExpect::new("nf_send_reset",         NO_MODULE_BTF,   NO_MODULE_BTF, NO_TRACEPOINT),
    HookExpect::new("nf_send_reset6",        NO_MODULE_BTF,   NO_MODULE_BTF, NO_TRACEPOINT),
];

/// From 5.17 every tier the kernel has: fentry, kprobes, the tracepoint.
#[rustfmt::skip]
const HOOKS_SINCE_5_17: &[HookExpect] = &[
    //               hook                    fentry            kprobe    tracepoint
    HookExpect::new("tcp_send_active_reset", ATTACHED,         ATTACHED, ATTACHED),
    HookExpect::new("tcp_v4_send_reset",     ATTACHED,         ATTACHED, ATTACHED),
    HookExpect::new("tcp_v6_send_reset",     ATTACHED,         ATTACHED, ATTACHED),
    HookExpect::new("nf_send_reset",         NO_MODULE_FENTRY, ATTACHED, NO_TRACEPOINT),
    HookExpect::new("nf_send_reset6",        NO_MODULE_FENTRY, ATTACHED, NO_TRACEPOINT),
];

const ATTACHED: Expect = Expect::Attached;
const NO_GET_FUNC_ARG: Expect = Expect::Refused {
    why: "no bpf_get_func_arg before 5.17",
    // The helper's number, as a verifier that does not know it names it.
    says: "invalid func unknown#183",
};
const NO_MODULE_BTF: Expect = Expect::Refused {
    why: "no module BTF before 5.11",
    says: "no prototype in BTF",
};
/// tcprst's own limit, not the kernel's: its loader attaches fentry only to
/// functions in vmlinux.
const NO_MODULE_FENTRY: Expect = Expect::Refused {
    why: "tcprst cannot attach fentry in modules",
    says: "cannot attach fentry to module BTF",
};
/// tcprst tries no tier that does not exist, so its line names no reason.
const NO_TRACEPOINT: Expect = Expect::Refused {
    why: "netfilter has no reset tracepoint",
    says: "",
};

/// The mixed plan: function hooks where the kernel allows them, and the
/// `tcp:tcp_send_reset` tracepoint for IPv6, which then also fires for every
/// reset the function hooks see: each must still be reported once.
const MIXED_OVERRIDES: &[(&str, Tier)] = &[("tcp_v6_send_reset", Tier::Tracepoint)];

/// The tracepoint that reports resets when a hook is on the tracepoint tier.
const SEND_RESET_TRACEPOINT: &str = "tcp:tcp_send_reset";
/// From 6.10 `tcp:tcp_send_reset` fires without a socket too, and resets
/// carry reasons, in the tracepoint and as the send functions' argument.
const SOCKETLESS_TRACEPOINT_AND_REASONS: (u32, u32) = (6, 10);
/// From 6.11 active resets say why instead of NOT_SPECIFIED.
const ACTIVE_REASONS: (u32, u32) = (6, 11);

/// What the scenarios do, each on its own port so records are easy to tell
/// apart. The caller is what tcprst reads off the kernel stack: the first
/// frame that is not a reset function (`__tcp_close` reads as `tcp_close`).
const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "closed-port",
        port: 4101,
        hook: "tcp_v4_send_reset",
        sender: End::Server,
        state: None,
        caller: "tcp_v4_rcv",
        reason: Reason::Passive("NO_SOCKET"),
        received: ("SYN_SENT", "ECONNREFUSED"),
    },
    Scenario {
        name: "closed-port6",
        port: 4102,
        hook: "tcp_v6_send_reset",
        sender: End::Server,
        state: None,
        caller: "tcp_v6_rcv",
        reason: Reason::Passive("NO_SOCKET"),
        received: ("SYN_SENT", "ECONNREFUSED"),
    },
    // __tcp_close moves the socket to CLOSE before it sends the reset.
    Scenario {
        name: "abort-on-close",
        port: 4103,
        hook: "tcp_send_active_reset",
        sender: End::Server,
        state: Some("CLOSE"),
        caller: "tcp_close",
        reason: Reason::Active("TCP_ABORT_ON_CLOSE"),
        received: ("ESTABLISHED", "ECONNRESET"),
    },
    // A zero linger time makes __tcp_close call sk_prot->disconnect, i.e.
    // tcp_disconnect, which moves to CLOSE and then resets; the same path on
    // 5.10, 6.1 and 6.12.
    Scenario {
        name: "linger0",
        port: 4104,
        hook: "tcp_send_active_reset",
        sender: End::Client,
        state: Some("CLOSE"),
        caller: "tcp_disconnect",
        reason: Reason::Active("TCP_STATE"),
        received: ("ESTABLISHED", "ECONNRESET"),
    },
    // The rule answers the SYN before TCP sees it: no socket, and nft's
    // reject expression is the caller.
    Scenario {
        name: "nft-reject",
        port: 4105,
        hook: "nf_send_reset",
        sender: End::Server,
        state: None,
        caller: "nft_reject_inet_eval",
        reason: Reason::Never,
        received: ("SYN_SENT", "ECONNREFUSED"),
    },
];

/// What `reject with tcp reset` in an inet table loads; modules.dep names
/// the rest (nf_reject_ipv4/6, nf_tables, …).
const REJECT_MODULE: &str = "nft_reject_inet";

/// What a reset seen by no local TCP socket reads as on the receiving side.
const NOT_LOCAL_ORIGIN: &str = "not a local TCP socket";
const LOCAL_STACK_ORIGIN: &str = "this host's TCP stack";
const LOCAL_NETFILTER_ORIGIN: &str = "a netfilter reject rule on this host (INPUT)";

/// How long a guest may take from boot to power-off. Three guests sharing
/// two cores take about 35 s under TCG, so this only stops a hung one.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// PID 1 in the guest. The console (ttyS0) carries the kernel's messages;
/// what the host parses goes to ttyS1 alone, between `@@begin NAME` and
/// `@@end NAME` lines, so printk never lands inside a record. The host
/// writes the plans, scenarios and modules under /vm.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/sbin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug
mount -t securityfs securityfs /sys/kernel/security
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
exec 3>/dev/ttyS1

# section NAME FILE: FILE's contents as section NAME.
section() { echo "@@begin $1" >&3; cat "$2" >&3; echo "@@end $1" >&3; }
# Setup failures are collected, not fatal: the host reports them.
try() { "$@" 2>>/tmp/setup || echo "$* failed: exit $?" >>/tmp/setup; }

# tcprst says when its programs are attached; under TCG that takes seconds.
attached() {
    for _ in $(seq 600); do
        grep -q '^tcprst: tracing' /tmp/err && return 0
        kill -0 "$1" 2>/dev/null || return 1
        usleep 100000
    done
    return 1
}

# trace PLAN ARGS...: `tcprst trace ARGS` around every scenario; -v for
# each hook's line, which the host judges.
trace() {
    plan=$1
    shift
    tcprst trace -v -o json "$@" >/tmp/out 2>/tmp/err &
    pid=$!
    : >/tmp/scenarios
    if attached "$pid"; then
        while read -r scenario port; do
            tcprst-loadgen scenario "$scenario" --port "$port" >>/tmp/scenarios 2>/tmp/why ||
                echo "$scenario: exit $?: $(cat /tmp/why)" >>/tmp/scenarios
        done </vm/scenarios
        # The last records reach userspace.
        sleep 1
    fi
    kill -INT "$pid" 2>/dev/null
    wait "$pid"
    echo $? >/tmp/status
    section "$plan.out" /tmp/out
    section "$plan.err" /tmp/err
    section "$plan.status" /tmp/status
    section "$plan.scenarios" /tmp/scenarios
}

: >/tmp/setup
try ip link set lo up
for module in $(cat /vm/load-order); do
    try insmod "/vm/modules/$module.ko"
done
port=$(cat /vm/nft-reject-port)
try nft add table inet tcprst
try nft add chain inet tcprst input '{ type filter hook input priority 0; }'
try nft add rule inet tcprst input tcp dport "$port" reject with tcp reset
section setup /tmp/setup

tcprst doctor -o json >/tmp/doctor 2>/tmp/err
section doctor /tmp/doctor
section doctor.err /tmp/err

# PLAN ARGS...: every plan, even one the kernel should refuse: the host
# checks that it does.
while read -r plan args; do
    trace "$plan" $args </dev/null
done </vm/plans
echo @@done >&3
poweroff -f
"#;

struct Kernel {
    /// The kernel series, as the results name it.
    series: &'static str,
    /// A metapackage that depends on the series' newest image.
    metapackage: &'static str,
    /// Every hook tcprst has, and what the series gives it on each tier.
    hooks: &'static [HookExpect],
    archive: Archive,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tier {
    Fentry,
    Kprobe,
    Tracepoint,
}

impl Tier {
    /// Best first, as `--attach auto` tries them.
    const ALL: [Tier; 3] = [Tier::Fentry, Tier::Kprobe, Tier::Tracepoint];

    fn name(self) -> &'static str {
        match self {
            Tier::Fentry => "fentry",
            Tier::Kprobe => "kprobe",
            Tier::Tracepoint => "tracepoint",
        }
    }
}

/// What a kernel gives one hook on one tier.
#[derive(Clone, Copy)]
enum Expect {
    Attached,
    /// `why` the kernel cannot, for the results; `says`, what tcprst's
    /// reason must contain, so a refusal for another reason fails.
    Refused {
        why: &'static str,
        says: &'static str,
    },
}

/// One hook's row of a kernel's table.
struct HookExpect {
    hook: &'static str,
    fentry: Expect,
    kprobe: Expect,
    tracepoint: Expect,
}

impl HookExpect {
    const fn new(hook: &'static str, fentry: Expect, kprobe: Expect, tracepoint: Expect) -> Self {
        Self {
            hook,
            fentry,
            kprobe,
            tracepoint,
        }
    }

    fn on(&self, tier: Tier) -> Expect {
        match tier {
            Tier::Fentry => self.fentry,
            Tier::Kprobe => self.kprobe,
            Tier::Tracepoint => self.tracepoint,
        }
    }

    /// tcprst traces only once a hook for the resets TCP sends attaches.
    fn is_tcp(&self) -> bool {
        !self.hook.starts_with("nf_")
    }
}

enum Archive {
    /// This machine's apt sources.
    Host,
    /// Sources this machine lacks, in an apt state of their own under
    /// target/vm/apt/NAME, so the host's apt never sees them.
    Private {
        name: &'static str,
        sources: &'static str,
    },
}

#[derive(Clone, Copy)]
enum End {
    Client,
    Server,
}

enum Reason {
    /// The kernel's reason for a reset answering a segment.
    Passive(&'static str),
    /// The kernel's reason for a reset a socket sends of its own accord.
    Active(&'static str),
    /// A reset the kernel gives no reason for.
    Never,
}

struct Scenario {
    /// As `tcprst-loadgen scenario` names it.
    name: &'static str,
    port: u16,
    /// The function that sends the reset, as `--attach HOOK=TIER` names it.
    hook: &'static str,
    sender: End,
    /// The sending socket's state in the record; `None` when none sent it.
    state: Option<&'static str>,
    caller: &'static str,
    reason: Reason,
    /// The receiving socket's state and the error its application gets.
    received: (&'static str, &'static str),
}

struct Plan {
    name: &'static str,
    /// The tier every hook is forced to; `None`: auto.
    all: Option<Tier>,
    /// Hooks forced to a tier of their own.
    one: &'static [(&'static str, Tier)],
}

impl Plan {
    /// Its `--attach` arguments.
    fn args(&self) -> Vec<String> {
        let all = self.all.map_or("auto", Tier::name);
        let one = self
            .one
            .iter()
            .map(|(hook, tier)| format!("{hook}={}", tier.name()));
        [all.to_owned()]
            .into_iter()
            .chain(one)
            .flat_map(|spec| ["--attach".to_owned(), spec])
            .collect()
    }

    /// What tcprst must say of `row`'s hook under this plan: a forced tier
    /// is the only one tried; auto tries each, best first, until one works.
    fn expected(&self, row: &HookExpect) -> HookLine {
        let forced = self
            .one
            .iter()
            .find(|(hook, _)| *hook == row.hook)
            .map(|(_, tier)| *tier)
            .or(self.all);
        let tiers = forced.map_or(Tier::ALL.to_vec(), |tier| vec![tier]);
        let mut line = HookLine {
            tier: None,
            refusals: Vec::new(),
        };
        for tier in tiers {
            match row.on(tier) {
                Expect::Attached => {
                    line.tier = Some(tier);
                    break;
                }
                Expect::Refused { why, says } => line.refusals.push((why, says)),
            }
        }
        line
    }
}

/// What a `tcprst: hook HOOK: …` line must say.
struct HookLine {
    /// Where it attached; `None`: unavailable.
    tier: Option<Tier>,
    /// (why, says) of each tier tried before: the line gives each reason.
    refusals: Vec<(&'static str, &'static str)>,
}

/// One kernel ready to boot: the extracted package, with modules.dep.
struct KernelTree {
    release: String,
    root: PathBuf,
}

/// A connection a scenario made, as `tcprst-loadgen scenario` prints it.
#[derive(Deserialize)]
struct Outcome {
    scenario: String,
    client: SocketAddr,
    server: SocketAddr,
}

/// How tcprst attached one hook, from its `tcprst: hook HOOK: TIER` line.
enum Attached {
    Function(String),
    Tracepoint,
    Unavailable(String),
}

enum Verdict {
    Pass(Vec<String>),
    Fail(Vec<String>),
    Unavailable(String),
}

struct Row {
    kernel: String,
    plan: String,
    verdict: Verdict,
}

impl Row {
    fn new(kernel: &str, plan: &str, verdict: Verdict) -> Self {
        Self {
            kernel: kernel.to_owned(),
            plan: plan.to_owned(),
            verdict,
        }
    }
}

/// What the guests run, built static: they have no libc of their own.
pub const BINARIES: [&str; 2] = ["tcprst", "tcprst-loadgen"];

/// Runs every kernel × plan with the `BINARIES` in `binaries` (from
/// `build_static`).
pub fn test(binaries: &Path) -> Result<()> {
    ensure_apt_packages(PACKAGES)?;
    let cache = target_dir()?.join("vm");
    let (guests, mut rows) = prepare_all(&cache, binaries)?;
    for (guest, boot) in guests.iter().zip(boot_all(&guests)) {
        let release = &guest.kernel.release;
        match boot {
            Ok(data) => {
                let sections = sections(&data);
                keep(&guest.run_dir, &sections)?;
                rows.extend(judge(guest, &sections));
            }
            Err(e) => rows.push(Row::new(
                release,
                "-",
                Verdict::Fail(vec![format!("{e:#}")]),
            )),
        }
    }
    print_rows(&rows);
    let failed = rows
        .iter()
        .filter(|r| matches!(r.verdict, Verdict::Fail(_)))
        .count();
    if failed > 0 {
        bail!(
            "{failed} of {} kernel × plan results failed; guest logs are under {}",
            rows.len(),
            cache.join("runs").display()
        );
    }
    Ok(())
}

/// A guest for each kernel, and a row for each kernel that has none.
fn prepare_all(cache: &Path, binaries: &Path) -> Result<(Vec<Guest>, Vec<Row>)> {
    let mut guests = Vec::new();
    let mut rows = Vec::new();
    for kernel in KERNELS {
        let private = matches!(kernel.archive, Archive::Private { .. });
        match prepare(kernel, cache, binaries) {
            Ok(guest) => guests.push(guest),
            // A kernel from an archive this machine may not reach is a
            // bonus where the network stops it, and a fault for any other
            // reason.
            Err(e) if private && e.chain().any(|c| c.is::<Unreachable>()) => {
                eprintln!("xtask: skipping Linux {}: {e:#}", kernel.series);
                let why = format!("skipped: {e:#}");
                rows.push(Row::new(kernel.series, "-", Verdict::Unavailable(why)));
            }
            Err(e) if private => {
                let why = format!("preparing it: {e:#}");
                rows.push(Row::new(kernel.series, "-", Verdict::Fail(vec![why])));
            }
            Err(e) => return Err(e.context(format!("preparing Linux {}", kernel.series))),
        }
    }
    Ok((guests, rows))
}

/// Boots every guest at once: each is one single-threaded TCG process.
fn boot_all(guests: &[Guest]) -> Vec<Result<String>> {
    let started = Instant::now();
    let boots = thread::scope(|s| {
        let handles: Vec<_> = guests.iter().map(|g| s.spawn(|| g.boot())).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("boot thread panicked"))
            .collect()
    });
    eprintln!(
        "xtask: {} guests ran in {:.0?}",
        guests.len(),
        started.elapsed()
    );
    boots
}

/// Each tier forced, then the mixed plan.
fn plans() -> Vec<Plan> {
    let forced = Tier::ALL.into_iter().map(|tier| Plan {
        name: tier.name(),
        all: Some(tier),
        one: &[],
    });
    forced
        .chain([Plan {
            name: "mixed",
            all: None,
            one: MIXED_OVERRIDES,
        }])
        .collect()
}

/// A kernel with its initramfs, and where its boot's logs go.
struct Guest {
    kernel: KernelTree,
    /// What its series must give each hook.
    hooks: &'static [HookExpect],
    initramfs: PathBuf,
    run_dir: PathBuf,
}

fn prepare(kernel: &'static Kernel, cache: &Path, binaries: &Path) -> Result<Guest> {
    let tree = fetch_kernel(kernel, cache)?;
    let run_dir = cache.join("runs").join(&tree.release);
    // No file of an earlier run may pass for this one's.
    if run_dir.exists() {
        fs::remove_dir_all(&run_dir).with_context(|| format!("removing {}", run_dir.display()))?;
    }
    fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let initramfs = run_dir.join("initramfs.cpio");
    fs::write(&initramfs, initramfs_archive(&tree, binaries)?)
        .with_context(|| format!("writing {}", initramfs.display()))?;
    Ok(Guest {
        kernel: tree,
        hooks: kernel.hooks,
        initramfs,
        run_dir,
    })
}

// ---- Kernels ----------------------------------------------------------

/// The series' newest image, downloaded and extracted once.
fn fetch_kernel(kernel: &Kernel, cache: &Path) -> Result<KernelTree> {
    let apt = apt_options(&kernel.archive, cache)?;
    let package = newest_image(&apt, kernel.metapackage)?;
    let release = package
        .strip_prefix("linux-image-")
        .with_context(|| {
            format!(
                "{} depends on {package}, not a kernel image",
                kernel.metapackage
            )
        })?
        .to_owned();
    let root = cache.join("kernels").join(&package);
    if !root.exists() {
        eprintln!("xtask: downloading {package}");
        extract_kernel(&apt, &package, &release, &root)?;
    }
    Ok(KernelTree { release, root })
}

/// apt options that point at a private state for `archive`, after fetching
/// its package lists once.
fn apt_options(archive: &Archive, cache: &Path) -> Result<Vec<String>> {
    let Archive::Private { name, sources } = archive else {
        return Ok(Vec::new());
    };
    let dir = cache.join("apt").join(name);
    let lists = dir.join("lists");
    let options: Vec<String> = [
        format!(
            "Dir::Etc::SourceList={}",
            dir.join("sources.list").display()
        ),
        "Dir::Etc::SourceParts=/dev/null".to_owned(),
        format!("Dir::State::Lists={}", lists.display()),
        format!("Dir::Cache={}", dir.join("cache").display()),
        "Dir::State::Status=/dev/null".to_owned(),
        // Unreachable mirrors should skip the kernel soon, not after minutes.
        "Acquire::http::Timeout=15".to_owned(),
        "Acquire::Retries=0".to_owned(),
    ]
    .into_iter()
    .flat_map(|o| ["-o".to_owned(), o])
    .collect();
    let updated = dir.join("updated");
    if !updated.exists() {
        fs::create_dir_all(lists.join("partial"))?;
        fs::create_dir_all(dir.join("cache/archives/partial"))?;
        fs::write(dir.join("sources.list"), sources)?;
        eprintln!("xtask: fetching the {name} package lists");
        // Otherwise a source it cannot reach is only a warning.
        apt_get(&options, &["update", "-q", "--error-on=any"], &dir)
            .with_context(|| format!("fetching the {name} package lists"))?;
        fs::write(&updated, "")?;
    }
    Ok(options)
}

/// An archive apt could not reach: the one reason to skip a kernel.
#[derive(Debug)]
struct Unreachable(String);

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the archive is unreachable: {}", self.0)
    }
}

impl std::error::Error for Unreachable {}

/// How apt (in the C locale) says it could not reach a mirror.
const UNREACHABLE: &[&str] = &[
    "Temporary failure resolving",
    "Could not resolve",
    "Could not connect",
    "Unable to connect",
    "Connection failed",
    "Connection timed out",
    "Network is unreachable",
    "No route to host",
];

/// `apt-get ARGS` in `dir`; a failure to reach the archive is `Unreachable`.
fn apt_get(options: &[String], args: &[&str], dir: &Path) -> Result<()> {
    let out = Command::new("apt-get")
        .args(options)
        .args(args)
        .current_dir(dir)
        .env("LC_ALL", "C")
        .output()
        .context("running apt-get")?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let error = stderr
        .lines()
        .find(|l| l.starts_with("E: "))
        .unwrap_or("apt-get failed")
        .to_owned();
    if UNREACHABLE.iter().any(|words| stderr.contains(words)) {
        return Err(Unreachable(error).into());
    }
    bail!("apt-get {} failed: {}", args.join(" "), stderr.trim())
}

fn newest_image(apt: &[String], metapackage: &str) -> Result<String> {
    let depends =
        output(
            Command::new("apt-cache")
                .args(apt)
                .args(["depends", "--important", metapackage]),
        )
        .with_context(|| format!("no {metapackage} in the package lists"))?;
    depends
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .map(str::to_owned)
        .with_context(|| format!("{metapackage} depends on no image"))
}

/// Extracts into a scratch directory renamed into place at the end, so an
/// interrupted download is never mistaken for a cached kernel.
fn extract_kernel(apt: &[String], package: &str, release: &str, root: &Path) -> Result<()> {
    let scratch = root.with_file_name(format!("{package}.partial"));
    if scratch.exists() {
        fs::remove_dir_all(&scratch)?;
    }
    fs::create_dir_all(&scratch)?;
    // As root, apt would try and fail to drop to _apt to write here.
    let download = ["-o", "APT::Sandbox::User=root", "-q", "download", package];
    apt_get(apt, &download, &scratch)?;
    let deb = fs::read_dir(&scratch)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download {package} left no .deb"))?;
    status(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&scratch))?;
    fs::remove_file(&deb)?;
    status(Command::new("depmod").arg("-b").arg(&scratch).arg(release))?;
    fs::rename(&scratch, root)?;
    Ok(())
}

impl KernelTree {
    fn vmlinuz(&self) -> PathBuf {
        self.root
            .join("boot")
            .join(format!("vmlinuz-{}", self.release))
    }

    fn modules(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }

    /// Kernel (major, minor).
    fn version(&self) -> Result<(u32, u32)> {
        let mut parts = self.release.split(['.', '-']).map(str::parse);
        match (parts.next(), parts.next()) {
            (Some(Ok(major)), Some(Ok(minor))) => Ok((major, minor)),
            _ => bail!("cannot read a version from {}", self.release),
        }
    }
}

/// `wanted` and every module it needs, each after those it depends on, as
/// paths relative to the module tree.
fn modules_in_load_order(modules: &Path, wanted: &str) -> Result<Vec<String>> {
    let dep_file = modules.join("modules.dep");
    let text =
        fs::read_to_string(&dep_file).with_context(|| format!("reading {}", dep_file.display()))?;
    load_order(&text, wanted).with_context(|| format!("in {}", dep_file.display()))
}

/// `wanted` and what it needs, each after its dependencies, from modules.dep.
fn load_order(modules_dep: &str, wanted: &str) -> Result<Vec<String>> {
    let deps: HashMap<&str, Vec<&str>> = modules_dep
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(module, deps)| (module, deps.split_whitespace().collect()))
        .collect();
    let root = deps
        .keys()
        .find(|path| module_name(path) == wanted)
        .with_context(|| format!("no module {wanted}"))?;
    let mut order = Vec::new();
    visit(root, &deps, &mut order)?;
    Ok(order)
}

fn visit(module: &str, deps: &HashMap<&str, Vec<&str>>, order: &mut Vec<String>) -> Result<()> {
    if order.iter().any(|m| m == module) {
        return Ok(());
    }
    let needs = deps
        .get(module)
        .with_context(|| format!("{module} is not in modules.dep"))?;
    for dep in needs {
        visit(dep, deps, order)?;
    }
    order.push(module.to_owned());
    Ok(())
}

/// `kernel/net/netfilter/nft_reject.ko.xz` → `nft_reject`.
fn module_name(path: &str) -> &str {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split_once(".ko").map_or(file, |(name, _)| name)
}

/// A module as insmod takes it: Debian's 6.12 packages compress them with xz.
fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    if path.extension().is_some_and(|e| e == "xz") {
        let out = Command::new("xz")
            .arg("-dc")
            .arg(path)
            .output()
            .with_context(|| format!("running xz -dc {}", path.display()))?;
        if !out.status.success() {
            bail!("xz -dc {} failed: {}", path.display(), out.status);
        }
        Ok(out.stdout)
    } else {
        fs::read(path).with_context(|| format!("reading {}", path.display()))
    }
}

// ---- Initramfs --------------------------------------------------------

fn initramfs_archive(kernel: &KernelTree, binaries: &Path) -> Result<Vec<u8>> {
    let mut cpio = Cpio::default();
    cpio.file("init", 0o755, INIT.as_bytes());
    cpio.copy("bin/busybox", Path::new("/bin/busybox"))?;
    for bin in BINARIES {
        cpio.copy(&format!("bin/{bin}"), &binaries.join(bin))?;
    }
    for path in with_libraries(Path::new("/usr/sbin/nft"))? {
        let inside = path.to_str().context("a non-UTF-8 path")?;
        cpio.copy(inside.trim_start_matches('/'), &path)?;
    }

    let modules = modules_in_load_order(&kernel.modules(), REJECT_MODULE)?;
    let mut names = String::new();
    for module in &modules {
        let name = module_name(module);
        let bytes = module_bytes(&kernel.modules().join(module))?;
        cpio.file(&format!("vm/modules/{name}.ko"), 0o644, &bytes);
        names.push_str(name);
        names.push('\n');
    }
    cpio.file("vm/load-order", 0o644, names.as_bytes());

    let plans: String = plans()
        .iter()
        .map(|p| format!("{} {}\n", p.name, p.args().join(" ")))
        .collect();
    cpio.file("vm/plans", 0o644, plans.as_bytes());
    let scenarios: String = SCENARIOS
        .iter()
        .map(|s| format!("{} {}\n", s.name, s.port))
        .collect();
    cpio.file("vm/scenarios", 0o644, scenarios.as_bytes());
    let nft = SCENARIOS
        .iter()
        .find(|s| s.name == "nft-reject")
        .expect("nft-reject is a scenario");
    cpio.file("vm/nft-reject-port", 0o644, nft.port.to_string().as_bytes());
    Ok(cpio.finish())
}

/// `program` and every shared object it loads, the loader included, as ldd
/// resolves them on this host.
fn with_libraries(program: &Path) -> Result<Vec<PathBuf>> {
    let ldd = output(Command::new("ldd").arg(program))?;
    let libraries = ldd
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
        .map(PathBuf::from);
    Ok([program.to_owned()].into_iter().chain(libraries).collect())
}

/// A newc ("070701") cpio archive, the format the kernel unpacks an
/// initramfs from.
#[derive(Default)]
struct Cpio {
    data: Vec<u8>,
    dirs: BTreeSet<String>,
    inodes: u32,
}

impl Cpio {
    fn copy(&mut self, inside: &str, from: &Path) -> Result<()> {
        let bytes = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
        self.file(inside, 0o755, &bytes);
        Ok(())
    }

    fn file(&mut self, path: &str, mode: u32, content: &[u8]) {
        self.parents(path);
        self.entry(path, libc::S_IFREG | mode, content);
    }

    /// The kernel creates no directory implicitly: each must come before
    /// what it holds.
    fn parents(&mut self, path: &str) {
        let ancestors: Vec<&Path> = Path::new(path)
            .ancestors()
            .skip(1)
            .filter(|d| !d.as_os_str().is_empty())
            .collect();
        for dir in ancestors.into_iter().rev() {
            let dir = dir.to_string_lossy().into_owned();
            if self.dirs.insert(dir.clone()) {
                self.entry(&dir, libc::S_IFDIR | 0o755, &[]);
            }
        }
    }

    fn entry(&mut self, name: &str, mode: u32, content: &[u8]) {
        self.inodes += 1;
        let size = u32::try_from(content.len()).expect("initramfs files are under 4 GiB");
        let name_size = u32::try_from(name.len() + 1).expect("short names");
        #[rustfmt::skip]
        let fields = [
            self.inodes, mode,
            0, 0, // uid, gid: root
            1, 0, // nlink, mtime
            size,
            0, 0, 0, 0, // devmajor, devminor, rdevmajor, rdevminor
            name_size,
            0, // check: newc has none
        ];
        self.data.extend_from_slice(b"070701");
        for field in fields {
            self.data
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(content);
        self.pad();
    }

    fn pad(&mut self) {
        self.data.resize(self.data.len().next_multiple_of(4), 0);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.data
    }
}

// ---- Boot -------------------------------------------------------------

impl Guest {
    /// Boots, and returns what the guest wrote to its data port.
    fn boot(&self) -> Result<String> {
        let console = self.run_dir.join("console.log");
        let data = self.run_dir.join("data.log");
        eprintln!("xtask: booting {} under qemu (TCG)", self.kernel.release);
        let mut qemu = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-m", "1024", "-smp", "1"])
            .args(["-nodefaults", "-display", "none", "-no-reboot"])
            .arg("-kernel")
            .arg(self.kernel.vmlinuz())
            .arg("-initrd")
            .arg(&self.initramfs)
            .args(["-append", "console=ttyS0 panic=-1 loglevel=4"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-serial")
            .arg(format!("file:{}", data.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting qemu-system-x86_64")?;
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let exit = loop {
            if let Some(exit) = qemu.try_wait()? {
                break exit;
            }
            if Instant::now() > deadline {
                qemu.kill()?;
                qemu.wait()?;
                bail!(
                    "the guest still ran after {BOOT_TIMEOUT:?}; see {}",
                    console.display()
                );
            }
            thread::sleep(Duration::from_millis(200));
        };
        // A tty turns each "\n" into "\r\n".
        let text = fs::read_to_string(&data)
            .with_context(|| format!("reading {}", data.display()))?
            .replace('\r', "");
        if !text.lines().any(|l| l == "@@done") {
            bail!(
                "the guest stopped early (qemu: {exit}); see {}",
                console.display()
            );
        }
        Ok(text)
    }
}

/// The guest's `@@begin NAME` … `@@end NAME` sections.
fn sections(data: &str) -> HashMap<&str, String> {
    let mut sections = HashMap::new();
    let mut open: Option<(&str, String)> = None;
    for line in data.lines() {
        if let Some(name) = line.strip_prefix("@@begin ") {
            open = Some((name, String::new()));
        } else if line.strip_prefix("@@end ").is_some() {
            if let Some((name, text)) = open.take() {
                sections.insert(name, text);
            }
        } else if let Some((_, text)) = &mut open {
            text.push_str(line);
            text.push('\n');
        }
    }
    sections
}

// ---- Judging ----------------------------------------------------------

/// Each section in a file of its name (`kprobe.out`, …), to read by hand.
fn keep(run_dir: &Path, sections: &HashMap<&str, String>) -> Result<()> {
    for (name, text) in sections {
        let file = run_dir.join(name);
        fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
    }
    Ok(())
}

fn judge(guest: &Guest, sections: &HashMap<&str, String>) -> Vec<Row> {
    let row = |plan: &str, verdict| Row::new(&guest.kernel.release, plan, verdict);
    if let Some(setup) = sections.get("setup").filter(|s| !s.trim().is_empty()) {
        let errors = setup.lines().map(|l| format!("guest setup: {l}")).collect();
        return vec![row("-", Verdict::Fail(errors))];
    }
    let version = match guest.kernel.version() {
        Ok(v) => v,
        Err(e) => return vec![row("-", Verdict::Fail(vec![format!("{e:#}")]))],
    };
    let mut rows: Vec<Row> = plans()
        .iter()
        .map(|plan| row(plan.name, judge_plan(plan, guest.hooks, sections, version)))
        .collect();
    match sections.get("doctor").map(|d| serde_json::from_str(d)) {
        Some(Ok(doctor)) => {
            rows.push(row("doctor", judge_doctor(&doctor, guest.hooks)));
            rows.push(row("close-marks", judge_close_marks(&doctor, version)));
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
fn judge_doctor(doctor: &Value, table: &[HookExpect]) -> Verdict {
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

fn describe_expect(expect: Expect) -> String {
    match expect {
        Expect::Attached => "\"works\"".to_owned(),
        Expect::Refused { why, says } => format!("a refusal saying {says:?} ({why})"),
    }
}

/// Close marks need tp_btf with socket storage (5.11) and bpf_task_pt_regs
/// (5.15): a kernel that has both must keep them, an older one must say why
/// not. Either way tracing ran, which the plans above check.
fn judge_close_marks(doctor: &Value, version: (u32, u32)) -> Verdict {
    let expected = version >= (5, 15);
    let marks = &doctor["close_marks"];
    match (expected, marks.as_bool()) {
        (true, Some(true)) => Verdict::Pass(Vec::new()),
        (false, None) if marks["error"].is_string() => Verdict::Pass(vec![format!(
            "fallback: {}",
            marks["error"].as_str().unwrap_or("")
        )]),
        _ => Verdict::Fail(vec![format!(
            "close marks expected {}, doctor says {marks}",
            if expected { "to work" } else { "to be refused" }
        )]),
    }
}

/// A plan whose hook lines match the kernel's table: traced, and judged
/// scenario by scenario; or refused, as the table says it must be when no
/// hook for the resets TCP sends can attach.
fn judge_plan(
    plan: &Plan,
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
    if stderr.lines().any(|l| l.starts_with("tcprst: tracing")) {
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
fn check_hook_lines(expected: &[(&HookExpect, HookLine)], stderr: &str) -> Vec<String> {
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
struct Run<'a> {
    stderr: &'a str,
    status: &'a str,
    records: Vec<Value>,
    /// `tcprst-loadgen scenario` output: JSON lines, or errors.
    scenarios: &'a str,
}

impl<'a> Run<'a> {
    fn read(plan: &str, sections: &'a HashMap<&str, String>) -> Result<Self, String> {
        let section = |part: &str| {
            sections
                .get(format!("{plan}.{part}").as_str())
                .ok_or("the guest did not run it")
        };
        let stderr = section("err")?;
        if !stderr.lines().any(|l| l.starts_with("tcprst: tracing")) {
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
    fn judge(&self, version: (u32, u32), mut failures: Vec<String>) -> Verdict {
        let mut notes = Vec::new();
        if self.status != "0" {
            failures.push(format!("tcprst exited with status {}", self.status));
        }
        let hooks = attached_hooks(self.stderr);
        // Before 6.10 the tracepoint misses resets sent without a socket,
        // and tcprst then says nothing about where received ones came from.
        let origins_known = version >= SOCKETLESS_TRACEPOINT_AND_REASONS
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
    fn outcome(&self, scenario: &Scenario) -> Result<Outcome, String> {
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
fn hook_lines(stderr: &str) -> HashMap<&str, &str> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("tcprst: hook ")?.split_once(": "))
        .collect()
}

/// How each hook attached, from its line.
fn attached_hooks(stderr: &str) -> HashMap<&str, Attached> {
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
struct Check<'a> {
    scenario: &'a Scenario,
    outcome: &'a Outcome,
    version: (u32, u32),
    resets: &'a [&'a Value],
    /// Whether tcprst can say where received resets came from.
    origins_known: bool,
}

impl Check<'_> {
    fn run(&self, attached: &Attached, failures: &mut Vec<String>, notes: &mut Vec<String>) {
        let reporter = self.reporter(attached, notes);
        failures.extend(self.check_sent(reporter, &self.find("rst_sent")));
        failures.extend(self.check_received(reporter, &self.find("rst_received")));
    }

    /// This host's end, then the remote one, in a record of `kind`: the
    /// sender's end is local in `rst_sent`, the receiver's in `rst_received`.
    fn ends(&self, kind: &str) -> (SocketAddr, SocketAddr) {
        let (sender, receiver) = match self.scenario.sender {
            End::Server => (self.outcome.server, self.outcome.client),
            End::Client => (self.outcome.client, self.outcome.server),
        };
        if kind == "rst_sent" {
            (sender, receiver)
        } else {
            (receiver, sender)
        }
    }

    fn tuple(&self, kind: &str) -> String {
        let (local, remote) = self.ends(kind);
        format!("{kind} {local} ← {remote}")
    }

    /// The hook and tier that should report the sent reset, if any can.
    fn reporter<'a>(
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

    fn check_sent(&self, reporter: Option<(&str, &str)>, sent: &[&Value]) -> Vec<String> {
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
                    ("reason", self.reason()),
                ];
                mismatches(name, "rst_sent", record, &want)
            }
        }
    }

    /// Where the reset landed, and whether tcprst traced it to its sender:
    /// the local stack or netfilter when a hook saw it sent, "not a local
    /// TCP socket" for a netfilter reset no hook saw.
    fn check_received(&self, reporter: Option<(&str, &str)>, received: &[&Value]) -> Vec<String> {
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

    fn find(&self, kind: &str) -> Vec<&Value> {
        let ends = Some(self.ends(kind));
        self.resets
            .iter()
            .copied()
            .filter(|r| r["kind"] == kind && record_ends(r) == ends)
            .collect()
    }

    /// Before 6.10 `tcp:tcp_send_reset` fires only for a full socket.
    fn tracepoint_sees_it(&self) -> bool {
        self.scenario.state.is_some() || self.version >= SOCKETLESS_TRACEPOINT_AND_REASONS
    }

    fn reason(&self) -> Option<&'static str> {
        if self.version < SOCKETLESS_TRACEPOINT_AND_REASONS {
            return None;
        }
        match self.scenario.reason {
            Reason::Passive(reason) => Some(reason),
            Reason::Active(reason) if self.version >= ACTIVE_REASONS => Some(reason),
            Reason::Active(_) => Some("NOT_SPECIFIED"),
            Reason::Never => None,
        }
    }
}

/// A record's local and remote ends.
fn record_ends(record: &Value) -> Option<(SocketAddr, SocketAddr)> {
    let end = |end: &str| {
        let addr = record[format!("{end}_addr")].as_str()?.parse().ok()?;
        let port = u16::try_from(record[format!("{end}_port")].as_u64()?).ok()?;
        Some(SocketAddr::new(addr, port))
    };
    Some((end("local")?, end("remote")?))
}

/// `rst_sent 127.0.0.1:4101 ← 127.0.0.1:40000`, for messages.
fn describe(record: &Value) -> String {
    let kind = record["kind"].as_str().unwrap_or("?");
    match record_ends(record) {
        Some((local, remote)) => format!("{kind} {local} ← {remote}"),
        None => format!("{kind} with unreadable ends"),
    }
}

/// Each field whose value differs from what is wanted (`None`: null).
fn mismatches(
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
fn duplicates(resets: &[&Value]) -> Vec<String> {
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
fn strangers(resets: &[&Value]) -> Vec<String> {
    let ports: Vec<u64> = SCENARIOS.iter().map(|s| u64::from(s.port)).collect();
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

fn print_rows(rows: &[Row]) {
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

    #[test]
    fn close_marks_must_match_the_kernel() {
        let works = json!({"close_marks": true});
        let refused = json!({"close_marks": {"error": "unknown func bpf_sk_storage_get#107"}});
        assert!(matches!(
            judge_close_marks(&works, (6, 1)),
            Verdict::Pass(_)
        ));
        assert!(matches!(
            judge_close_marks(&refused, (5, 10)),
            Verdict::Pass(_)
        ));
        assert!(matches!(
            judge_close_marks(&refused, (6, 12)),
            Verdict::Fail(_)
        ));
        assert!(matches!(
            judge_close_marks(&works, (5, 10)),
            Verdict::Fail(_)
        ));
        assert!(matches!(
            judge_close_marks(&json!({}), (6, 12)),
            Verdict::Fail(_)
        ));
    }

    /// tcprst's hook lines: `(hook, what it says)`.
    fn hook_stderr(lines: &[(&str, &str)]) -> String {
        lines
            .iter()
            .map(|(hook, how)| format!("tcprst: hook {hook}: {how}\n"))
            .collect()
    }

    fn plan(name: &str) -> Plan {
        plans().into_iter().find(|p| p.name == name).unwrap()
    }

    #[test]
    fn plans_pass_their_attach_arguments() {
        assert_eq!(plan("kprobe").args(), ["--attach", "kprobe"]);
        assert_eq!(
            plan("mixed").args(),
            [
                "--attach",
                "auto",
                "--attach",
                "tcp_v6_send_reset=tracepoint"
            ]
        );
    }

    #[test]
    fn auto_expects_the_best_tier_the_kernel_gives_and_why_not_better() {
        let mixed = plan("mixed");
        let expected = |hook: &str| {
            let row = HOOKS_5_10.iter().find(|r| r.hook == hook).unwrap();
            let line = mixed.expected(row);
            let says: Vec<&str> = line.refusals.iter().map(|(_, says)| *says).collect();
            (line.tier, says)
        };
        assert_eq!(
            expected("tcp_v4_send_reset"),
            (Some(Tier::Kprobe), vec!["invalid func unknown#183"])
        );
        assert_eq!(
            expected("tcp_v6_send_reset"),
            (Some(Tier::Tracepoint), vec![])
        );
        assert_eq!(
            expected("nf_send_reset"),
            (None, vec!["no prototype in BTF", "no prototype in BTF", ""])
        );
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

    #[test]
    fn modules_load_after_their_dependencies() {
        let dep = "kernel/net/netfilter/nf_tables.ko.xz: kernel/net/netfilter/nfnetlink.ko.xz kernel/lib/libcrc32c.ko.xz\n\
                   kernel/net/netfilter/nfnetlink.ko.xz:\n\
                   kernel/lib/libcrc32c.ko.xz:\n\
                   kernel/net/netfilter/nft_reject.ko.xz: kernel/net/netfilter/nf_tables.ko.xz kernel/net/netfilter/nfnetlink.ko.xz kernel/lib/libcrc32c.ko.xz\n";
        let order = load_order(dep, "nft_reject").unwrap();
        let names: Vec<&str> = order.iter().map(|m| module_name(m)).collect();
        assert_eq!(names, ["nfnetlink", "libcrc32c", "nf_tables", "nft_reject"]);
        assert!(load_order(dep, "nft_reject_inet").is_err());
    }

    #[test]
    fn cpio_names_each_directory_before_its_contents() {
        let mut cpio = Cpio::default();
        cpio.file("usr/sbin/nft", 0o755, b"elf");
        cpio.file("usr/lib/libc.so", 0o644, b"");
        let archive = cpio.finish();
        let mut names = Vec::new();
        let mut at = 0;
        while at < archive.len() {
            let header = std::str::from_utf8(&archive[at..at + 110]).unwrap();
            assert!(header.starts_with("070701"));
            let hex = |field: usize| {
                usize::from_str_radix(&header[6 + field * 8..14 + field * 8], 16).unwrap()
            };
            let (size, name_size) = (hex(6), hex(11));
            let name = &archive[at + 110..at + 110 + name_size - 1];
            names.push(String::from_utf8(name.to_vec()).unwrap());
            at = (at + 110 + name_size).next_multiple_of(4);
            at = (at + size).next_multiple_of(4);
        }
        assert_eq!(
            names,
            [
                "usr",
                "usr/sbin",
                "usr/sbin/nft",
                "usr/lib",
                "usr/lib/libc.so",
                "TRAILER!!!"
            ]
        );
    }

    #[test]
    fn sections_are_split_at_markers() {
        let data = "noise\n@@begin kprobe.out\n{\"a\":1}\n{\"b\":2}\n@@end kprobe.out\n@@begin setup\n@@end setup\n@@done\n";
        let sections = sections(data);
        assert_eq!(sections["kprobe.out"], "{\"a\":1}\n{\"b\":2}\n");
        assert_eq!(sections["setup"], "");
        assert_eq!(sections.len(), 2);
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
            server: SocketAddr::new("127.0.0.1".parse().unwrap(), scenario.port),
        };
        let resets: Vec<&Value> = resets.iter().collect();
        let check = Check {
            scenario,
            outcome: &outcome,
            version,
            resets: &resets,
            // As judge() decides it, with every TCP reply hook like this one.
            origins_known: version >= SOCKETLESS_TRACEPOINT_AND_REASONS
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
            json!({"hook": "tcp_send_active_reset", "tier": "kprobe", "state": "CLOSE", "caller": "tcp_close", "reason": "NOT_SPECIFIED"}),
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
