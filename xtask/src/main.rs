//! Developer tasks: `cargo xtask setup | run | test | vm-test | image | man | bench | fuzz`.
//!
//! Every task starts with `setup`, which installs only what is missing, so
//! the README's two commands work on a fresh machine and cost seconds after.

mod bench;
mod fuzz;
// tcprst's own reader, shared by path: xtask builds before the toolchain
// that the tcprst crate needs (it is what installs it), so it cannot
// depend on the crate.
#[path = "../../tcprst/src/mountinfo.rs"]
mod mountinfo;
mod process;
mod soak;
mod sys;
mod vm;

use std::{
    env,
    ffi::OsStr,
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

const BPF_LINKER_VERSION: &str = "0.10.3";
const NIGHTLY: &str = "nightly";
/// Debian packages the tool and its tests use: `ip` for network namespaces,
/// `nft` for rules in them, `setpriv` for the tests that run tcprst with fewer
/// capabilities (bad_input.rs, capabilities.rs), socat as a real half-closing
/// TCP proxy, bpftrace as the benchmark baseline, Python for
/// kubernetes-validate, which checks deploy/daemonset.yaml, and Prometheus
/// (with promtool) to check and evaluate deploy/prometheus-rules.yaml. On a
/// systemd host the package also enables its own service on :9090; the
/// tests start a Prometheus of their own and need none.
const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "nftables",
    "util-linux",
    "socat",
    "bpftrace",
    "python3",
    "python3-venv",
    "prometheus",
];
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
/// Under the workspace's own target/ whatever CARGO_TARGET_DIR says, because
/// tcprst/tests/deploy.rs looks for it there.
const VENV: &str = "target/venv";
/// The image is one static binary, so it runs on any node whatever its libc.
const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
const IMAGE_TAG: &str = "tcprst:dev";

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing needs, if it is missing.
    Setup,
    /// Set up, build tcprst (release) and run it as root with these arguments.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up and run every test, including the root integration tests, then
    /// vm-test and a one-minute soak.
    Test {
        /// Extra arguments for `cargo test`
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up and run the reset scenarios under every attach tier on
    /// several kernels, each booted under qemu.
    VmTest,
    /// Set up, build a static (musl) tcprst and, with podman or buildah, the
    /// container image tcprst:dev from the Containerfile.
    Image,
    /// Set up, build (release) and benchmark tracing cost against no tracer
    /// and bpftrace; prints tables and writes target/bench/summary.json.
    Bench(bench::Options),
    /// Set up, build (release) and run churn, RST storms and namespace and
    /// cgroup churn against tcprst for --minutes, sampling its RSS and metric
    /// series; fails if either keeps growing after warm-up.
    Soak(soak::SoakOptions),
    /// Set up, build tcprst (release) and write its man pages and bash, zsh and fish
    /// completions under target/man.
    Man,
    /// Set up and run every fuzz target for a bounded time (cargo-fuzz, nightly).
    Fuzz {
        /// Seconds per target
        #[arg(long, default_value_t = 30)]
        seconds: u32,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::Run { args } => {
            setup()?;
            cargo(&["build", "--release", "--package", "tcprst"])?;
            let bin = target_dir()?.join("release/tcprst");
            let err = as_root(&bin).args(&args).exec();
            Err(err).with_context(|| format!("running {}", bin.display()))
        }
        Task::Test { args } => {
            setup()?;
            test(&args)?;
            // Two builds, not three: the soak runs the release binaries
            // vm-test needs anyway, static ones as the image ships them,
            // rather than a glibc release build of its own.
            let binaries = build_static(&vm::BINARIES)?;
            vm::test(&binaries)?;
            // A minute of soak: enough to catch a leak that grows per event.
            let exe = env::current_exe().context("finding the xtask binary")?;
            status(
                Command::new(exe)
                    .args(["soak", "--minutes", "1", "--binaries"])
                    .arg(&binaries),
            )
        }
        Task::VmTest => {
            setup()?;
            vm::test(&build_static(&vm::BINARIES)?)
        }
        Task::Image => {
            setup()?;
            image()
        }
        Task::Man => {
            setup()?;
            man()
        }
        // Sets up and builds itself: it may re-run as root.
        Task::Bench(opts) => bench::main(&opts),
        Task::Soak(opts) => soak::soak(&opts),
        Task::Fuzz { seconds } => {
            setup()?;
            fuzz::run(seconds)
        }
    }
}

fn setup() -> Result<()> {
    ensure_apt_packages(APT_PACKAGES)?;
    ensure_nightly_rust_src()?;
    ensure_bpf_linker()?;
    ensure_kubernetes_validate()?;
    Ok(())
}

fn image() -> Result<()> {
    let bin = build_static(&["tcprst"])?.join("tcprst");
    eprintln!("xtask: built {} (static)", bin.display());

    // The build context holds the binary alone, so nothing else of the
    // workspace is sent to the builder.
    let context = target_dir()?.join("image");
    fs::create_dir_all(&context).with_context(|| format!("creating {}", context.display()))?;
    fs::copy(&bin, context.join("tcprst"))
        .with_context(|| format!("copying {} into {}", bin.display(), context.display()))?;
    let containerfile = workspace_root()?.join("Containerfile");
    let Some(builder) = ["podman", "buildah"].into_iter().find(|b| has_command(b)) else {
        eprintln!(
            "xtask: no podman or buildah here, so no image: build it with `docker build -t {IMAGE_TAG} -f {} {}`",
            containerfile.display(),
            context.display()
        );
        return Ok(());
    };
    let mut build = Command::new(builder);
    build
        .args(["build", "--tag", IMAGE_TAG, "--file"])
        .arg(&containerfile)
        .arg(&context);
    status(&mut build).with_context(|| {
        format!(
            "{builder} could not build the image: if this machine cannot host container storage or user namespaces (some sandboxes cannot), build it elsewhere from the Containerfile and {}",
            context.display()
        )
    })?;
    eprintln!("xtask: built image {IMAGE_TAG} with {builder}");
    Ok(())
}

/// The man pages and completion scripts, from the binary itself: clap
/// generates both from the definition the binary parses with, so they
/// cannot drift from it. Release, as `run` builds it.
fn man() -> Result<()> {
    cargo(&["build", "--release", "--package", "tcprst"])?;
    let bin = target_dir()?.join("release/tcprst");
    let dir = target_dir()?.join("man");
    let completions = dir.join("completions");
    fs::create_dir_all(&completions)
        .with_context(|| format!("creating {}", completions.display()))?;
    status(Command::new(&bin).arg("man").arg(&dir))?;
    // Each under the name its shell looks for.
    for (shell, file) in [
        ("bash", "tcprst"),
        ("zsh", "_tcprst"),
        ("fish", "tcprst.fish"),
    ] {
        let script = output(Command::new(&bin).args(["completions", shell]))?;
        let path = completions.join(file);
        fs::write(&path, script).with_context(|| format!("writing {}", path.display()))?;
    }
    eprintln!(
        "xtask: wrote the man pages into {} (read one with `man -l {}`) and completions into {}",
        dir.display(),
        dir.join("tcprst.1").display(),
        completions.display()
    );
    Ok(())
}

/// Builds `packages` (release, static, musl) and returns the directory
/// holding their binaries, each named as its package.
fn build_static(packages: &[&str]) -> Result<PathBuf> {
    // ring, under kube's TLS, compiles C: it needs a C compiler for musl.
    ensure_apt_packages(&["musl-tools"])?;
    ensure_rust_target(MUSL_TARGET)?;
    let mut build = cargo_command();
    build.args(["build", "--release", "--target", MUSL_TARGET]);
    for package in packages {
        build.args(["--package", package]);
    }
    status(build.env(format!("CC_{}", MUSL_TARGET.replace('-', "_")), "musl-gcc"))?;
    let dir = target_dir()?.join(MUSL_TARGET).join("release");
    for package in packages {
        ensure_static(&dir.join(package))?;
    }
    Ok(dir)
}

/// A dynamically linked binary names its loader in a PT_INTERP program
/// header; a static one, PIE or not, has none.
fn ensure_static(bin: &Path) -> Result<()> {
    const PT_INTERP: u64 = 3;
    let elf = fs::read(bin).with_context(|| format!("reading {}", bin.display()))?;
    // ELF64, little-endian: what the musl target builds.
    if !elf.starts_with(b"\x7fELF\x02\x01") {
        bail!("{} is not a 64-bit little-endian ELF file", bin.display());
    }
    let field = |at: u64, len: usize| -> Result<u64> {
        let bytes = usize::try_from(at)
            .ok()
            .and_then(|at| elf.get(at..)?.get(..len))
            .with_context(|| format!("{} is truncated", bin.display()))?;
        let mut le = [0; 8];
        le[..len].copy_from_slice(bytes);
        Ok(u64::from_le_bytes(le))
    };
    let (phoff, phentsize, phnum) = (field(0x20, 8)?, field(0x36, 2)?, field(0x38, 2)?);
    for i in 0..phnum {
        if field(phoff + i * phentsize, 4)? == PT_INTERP {
            bail!("{} is dynamically linked (it has PT_INTERP)", bin.display());
        }
    }
    Ok(())
}

fn test(extra: &[String]) -> Result<()> {
    let mut cmd = cargo_command();
    // The default members: tcprst-ebpf only builds for the bpf target, and
    // tcprst's build script builds it from there.
    cmd.arg("test").args(extra);
    if !is_root() {
        // The integration tests load BPF programs and create network
        // namespaces; run only the test binaries, not the build, as root.
        let triple = host_triple()?.to_uppercase().replace('-', "_");
        cmd.env(format!("CARGO_TARGET_{triple}_RUNNER"), "sudo -E");
    }
    status(&mut cmd)
}

fn ensure_apt_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|pkg| !dpkg_installed(pkg))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !has_command("apt-get") {
        bail!(
            "missing packages {} and no apt-get to install them: install them with your package manager",
            missing.join(", ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(", "));
    status(as_root("apt-get").arg("update").arg("-q"))?;
    status(
        as_root("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn ensure_nightly_rust_src() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with(NIGHTLY)) {
        eprintln!("xtask: installing the nightly toolchain (eBPF programs need -Z build-std)");
        status(Command::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
        ]))?;
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        NIGHTLY,
        "--installed",
    ]))?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask: adding rust-src to nightly");
        status(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            NIGHTLY,
        ]))?;
    }
    Ok(())
}

fn ensure_bpf_linker() -> Result<()> {
    ensure_cargo_install(
        Command::new("bpf-linker").arg("--version"),
        "bpf-linker",
        BPF_LINKER_VERSION,
    )
}

/// Installs `krate` at `version` with cargo unless `check`'s output already
/// names that version.
fn ensure_cargo_install(check: &mut Command, krate: &str, version: &str) -> Result<()> {
    let current = check
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if current.contains(version) {
        return Ok(());
    }
    eprintln!("xtask: installing {krate} {version}");
    cargo(&["install", krate, "--version", version, "--locked"])
}

fn ensure_rust_target(target: &str) -> Result<()> {
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if installed.lines().any(|l| l == target) {
        return Ok(());
    }
    eprintln!("xtask: adding the {target} target");
    status(Command::new("rustup").args(["target", "add", target]))
}

fn ensure_kubernetes_validate() -> Result<()> {
    let venv = workspace_root()?.join(VENV);
    let validator = venv.join("bin/kubernetes-validate");
    let current = Command::new(&validator)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if current.trim() == KUBERNETES_VALIDATE_VERSION {
        return Ok(());
    }
    eprintln!("xtask: installing kubernetes-validate {KUBERNETES_VALIDATE_VERSION} into {VENV}");
    if !venv.join("bin/python3").exists() {
        // Debian's interpreter, the one python3-venv completes.
        status(
            Command::new("/usr/bin/python3")
                .args(["-m", "venv"])
                .arg(&venv),
        )?;
    }
    status(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"),
    ]))
}

fn cargo(args: &[&str]) -> Result<()> {
    status(cargo_command().args(args))
}

fn cargo_command() -> Command {
    Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn status(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn has_command(name: &str) -> bool {
    env::var_os("PATH")
        .is_some_and(|path| env::split_paths(&path).any(|dir| dir.join(name).is_file()))
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// `program` as a command, through sudo only when we are not root already.
fn as_root(program: impl AsRef<OsStr>) -> Command {
    if is_root() {
        Command::new(program)
    } else {
        let mut cmd = Command::new("sudo");
        cmd.arg("-E").arg(program);
        cmd
    }
}

fn host_triple() -> Result<String> {
    let info = output(Command::new("rustc").arg("-vV"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .context("rustc -vV printed no host triple")
}

/// Where cargo puts what it builds, as it decides: CARGO_TARGET_DIR, or target/.
fn target_dir() -> Result<PathBuf> {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => Ok(PathBuf::from(dir)),
        None => Ok(workspace_root()?.join("target")),
    }
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(PathBuf::from)
        .context("xtask has no parent directory")
}
