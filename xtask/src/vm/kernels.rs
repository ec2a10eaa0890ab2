//! The kernels vm-test boots: Debian's packages, fetched once and cached,
//! and what each series gives each of tcprst's hooks on each tier.

use std::{
    collections::HashMap,
    fmt, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use super::Tier;
use crate::process::{output, status};

pub(crate) const KERNELS: &[Kernel] = &[
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
pub(crate) const HOOKS_5_10: &[HookExpect] = &[
    //               hook                    fentry           kprobe         tracepoint
    HookExpect::new("tcp_send_active_reset", NO_GET_FUNC_ARG, ATTACHED,      ATTACHED),
    HookExpect::new("tcp_v4_send_reset",     NO_GET_FUNC_ARG, ATTACHED,      ATTACHED),
    HookExpect::new("tcp_v6_send_reset",     NO_GET_FUNC_ARG, ATTACHED,      ATTACHED),
    HookExpect::new("nf_send_reset",         NO_MODULE_BTF,   NO_MODULE_BTF, NO_TRACEPOINT),
    HookExpect::new("nf_send_reset6",        NO_MODULE_BTF,   NO_MODULE_BTF, NO_TRACEPOINT),
];

/// From 5.17 every tier the kernel has: fentry, kprobes, the tracepoint.
#[rustfmt::skip]
pub(crate) const HOOKS_SINCE_5_17: &[HookExpect] = &[
    //               hook                    fentry            kprobe    tracepoint
    HookExpect::new("tcp_send_active_reset", ATTACHED,         ATTACHED, ATTACHED),
    HookExpect::new("tcp_v4_send_reset",     ATTACHED,         ATTACHED, ATTACHED),
    HookExpect::new("tcp_v6_send_reset",     ATTACHED,         ATTACHED, ATTACHED),
    HookExpect::new("nf_send_reset",         NO_MODULE_FENTRY, ATTACHED, NO_TRACEPOINT),
    HookExpect::new("nf_send_reset6",        NO_MODULE_FENTRY, ATTACHED, NO_TRACEPOINT),
];

pub(crate) const ATTACHED: Expect = Expect::Attached;
pub(crate) const NO_GET_FUNC_ARG: Expect = Expect::Refused {
    why: "no bpf_get_func_arg before 5.17",
    // The helper's number, as a verifier that does not know it names it.
    says: "invalid func unknown#183",
};
pub(crate) const NO_MODULE_BTF: Expect = Expect::Refused {
    why: "no module BTF before 5.11",
    says: "no prototype in BTF",
};
/// tcprst's own limit, not the kernel's: its loader attaches fentry only to
/// functions in vmlinux.
pub(crate) const NO_MODULE_FENTRY: Expect = Expect::Refused {
    why: "tcprst cannot attach fentry in modules",
    says: "cannot attach fentry to module BTF",
};
/// tcprst tries no tier that does not exist, so its line names no reason.
pub(crate) const NO_TRACEPOINT: Expect = Expect::Refused {
    why: "netfilter has no reset tracepoint",
    says: "",
};

pub(crate) struct Kernel {
    /// The kernel series, as the results name it.
    pub(crate) series: &'static str,
    /// A metapackage that depends on the series' newest image.
    pub(crate) metapackage: &'static str,
    /// Every hook tcprst has, and what the series gives it on each tier.
    pub(crate) hooks: &'static [HookExpect],
    pub(crate) archive: Archive,
}

/// What a kernel gives one hook on one tier.
#[derive(Clone, Copy)]
pub(crate) enum Expect {
    Attached,
    /// `why` the kernel cannot, for the results; `says`, what tcprst's
    /// reason must contain, so a refusal for another reason fails.
    Refused {
        why: &'static str,
        says: &'static str,
    },
}

/// One hook's row of a kernel's table.
pub(crate) struct HookExpect {
    pub(crate) hook: &'static str,
    pub(crate) fentry: Expect,
    pub(crate) kprobe: Expect,
    pub(crate) tracepoint: Expect,
}

impl HookExpect {
    pub(crate) const fn new(
        hook: &'static str,
        fentry: Expect,
        kprobe: Expect,
        tracepoint: Expect,
    ) -> Self {
        Self {
            hook,
            fentry,
            kprobe,
            tracepoint,
        }
    }

    pub(crate) fn on(&self, tier: Tier) -> Expect {
        match tier {
            Tier::Fentry => self.fentry,
            Tier::Kprobe => self.kprobe,
            Tier::Tracepoint => self.tracepoint,
        }
    }

    /// tcprst traces only once a hook for the resets TCP sends attaches.
    pub(crate) fn is_tcp(&self) -> bool {
        !self.hook.starts_with("nf_")
    }
}

pub(crate) enum Archive {
    /// This machine's apt sources.
    Host,
    /// Sources this machine lacks, in an apt state of their own under
    /// target/vm/apt/NAME, so the host's apt never sees them.
    Private {
        name: &'static str,
        sources: &'static str,
    },
}

/// One kernel ready to boot: the extracted package, with modules.dep.
pub(crate) struct KernelTree {
    pub(crate) release: String,
    pub(crate) root: PathBuf,
}

/// The series' newest image, downloaded and extracted once.
pub(crate) fn fetch_kernel(kernel: &Kernel, cache: &Path) -> Result<KernelTree> {
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
pub(crate) fn apt_options(archive: &Archive, cache: &Path) -> Result<Vec<String>> {
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
pub(crate) struct Unreachable(String);

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the archive is unreachable: {}", self.0)
    }
}

impl std::error::Error for Unreachable {}

/// How apt (in the C locale) says it could not reach a mirror.
pub(crate) const UNREACHABLE: &[&str] = &[
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
pub(crate) fn apt_get(options: &[String], args: &[&str], dir: &Path) -> Result<()> {
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

pub(crate) fn newest_image(apt: &[String], metapackage: &str) -> Result<String> {
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
pub(crate) fn extract_kernel(
    apt: &[String],
    package: &str,
    release: &str,
    root: &Path,
) -> Result<()> {
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
    pub(crate) fn vmlinuz(&self) -> PathBuf {
        self.root
            .join("boot")
            .join(format!("vmlinuz-{}", self.release))
    }

    /// The build config, which tcprst reads (as `/boot/config-RELEASE`) to
    /// know the layout of task stacks.
    pub(crate) fn config(&self) -> (String, PathBuf) {
        let name = format!("boot/config-{}", self.release);
        let path = self.root.join(&name);
        (name, path)
    }

    pub(crate) fn modules(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }

    /// Kernel (major, minor).
    pub(crate) fn version(&self) -> Result<(u32, u32)> {
        let mut parts = self.release.split(['.', '-']).map(str::parse);
        match (parts.next(), parts.next()) {
            (Some(Ok(major)), Some(Ok(minor))) => Ok((major, minor)),
            _ => bail!("cannot read a version from {}", self.release),
        }
    }
}

/// `wanted` and every module it needs, each after those it depends on, as
/// paths relative to the module tree.
pub(crate) fn modules_in_load_order(modules: &Path, wanted: &str) -> Result<Vec<String>> {
    let dep_file = modules.join("modules.dep");
    let text =
        fs::read_to_string(&dep_file).with_context(|| format!("reading {}", dep_file.display()))?;
    load_order(&text, wanted).with_context(|| format!("in {}", dep_file.display()))
}

/// `wanted` and what it needs, each after its dependencies, from modules.dep.
pub(crate) fn load_order(modules_dep: &str, wanted: &str) -> Result<Vec<String>> {
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

pub(crate) fn visit(
    module: &str,
    deps: &HashMap<&str, Vec<&str>>,
    order: &mut Vec<String>,
) -> Result<()> {
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
pub(crate) fn module_name(path: &str) -> &str {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split_once(".ko").map_or(file, |(name, _)| name)
}

/// A module as insmod takes it: Debian's 6.12 packages compress them with xz.
pub(crate) fn module_bytes(path: &Path) -> Result<Vec<u8>> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
