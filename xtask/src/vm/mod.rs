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

mod initramfs;
mod judge;
mod kernels;

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use self::{
    initramfs::initramfs_archive,
    judge::{PlanResult, Verdict, judge, keep, print_rows},
    kernels::{
        Archive, Expect, HookExpect, KERNELS, Kernel, KernelTree, Unreachable, fetch_kernel,
    },
};

use crate::{setup::ensure_apt_packages, target_dir};

/// qemu, what goes into the initramfs, `depmod` for the kernels' module
/// trees (Debian's packages leave modules.dep to their postinst), and `xz`
/// for compressed modules, which busybox's insmod may not read.
const PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "kmod", "xz-utils"];

/// The mixed plan: function hooks where the kernel allows them, and the
/// `tcp:tcp_send_reset` tracepoint for IPv6, which then also fires for every
/// reset the function hooks see: each must still be reported once.
const MIXED_OVERRIDES: &[(&str, Tier)] = &[("tcp_v6_send_reset", Tier::Tracepoint)];

/// How long a guest may take from boot to power-off, only to stop a hung
/// one. Three guests sharing two cores took 187–239 s under TCG on this
/// project's machine once the reset programs grew to ~520,000 verified
/// instructions each: 240 s left no margin.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

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

struct AttachPlan {
    name: &'static str,
    /// The tier every hook is forced to; `None`: auto.
    all: Option<Tier>,
    /// Hooks forced to a tier of their own.
    one: &'static [(&'static str, Tier)],
}

impl AttachPlan {
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

/// What the guests run, built static: they have no libc of their own.
pub(crate) const BINARIES: [&str; 2] = ["tcprst", "tcprst-loadgen"];

/// Runs every kernel × plan with the `BINARIES` in `binaries` (from
/// `build_static`).
pub(crate) fn test(binaries: &Path) -> Result<()> {
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
            Err(e) => rows.push(PlanResult::new(
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
fn prepare_all(cache: &Path, binaries: &Path) -> Result<(Vec<Guest>, Vec<PlanResult>)> {
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
                rows.push(PlanResult::new(
                    kernel.series,
                    "-",
                    Verdict::Unavailable(why),
                ));
            }
            Err(e) if private => {
                let why = format!("preparing it: {e:#}");
                rows.push(PlanResult::new(
                    kernel.series,
                    "-",
                    Verdict::Fail(vec![why]),
                ));
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
fn plans() -> Vec<AttachPlan> {
    let forced = Tier::ALL.into_iter().map(|tier| AttachPlan {
        name: tier.name(),
        all: Some(tier),
        one: &[],
    });
    forced
        .chain([AttachPlan {
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

#[cfg(test)]
mod tests {
    use super::{kernels::HOOKS_5_10, *};

    fn plan(name: &str) -> AttachPlan {
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

    #[test]
    fn sections_are_split_at_markers() {
        let data = "noise\n@@begin kprobe.out\n{\"a\":1}\n{\"b\":2}\n@@end kprobe.out\n@@begin setup\n@@end setup\n@@done\n";
        let sections = sections(data);
        assert_eq!(sections["kprobe.out"], "{\"a\":1}\n{\"b\":2}\n");
        assert_eq!(sections["setup"], "");
        assert_eq!(sections.len(), 2);
    }
}
