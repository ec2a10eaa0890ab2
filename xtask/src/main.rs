//! Developer tasks: `cargo xtask setup | run | test`.
//!
//! Every task starts with `setup`, which installs only what is missing, so
//! the README's two commands work on a fresh machine and cost seconds after.

use std::{
    env,
    ffi::OsStr,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

const BPF_LINKER_VERSION: &str = "0.10.3";
const NIGHTLY: &str = "nightly";
/// Debian packages the tool and its tests use: `ip` for network namespaces,
/// `nft` for rules in them, `setpriv` for the unprivileged-user test, socat
/// as a real half-closing TCP proxy, and bpftrace as the benchmark baseline.
const APT_PACKAGES: &[&str] = &["iproute2", "nftables", "util-linux", "socat", "bpftrace"];

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
    /// Set up and run every test, including the root integration tests.
    Test {
        /// Extra arguments for `cargo test`
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::Run { args } => {
            setup()?;
            cargo(&["build", "--release", "--package", "tcprst"])?;
            let bin = workspace_root()?.join("target/release/tcprst");
            let err = as_root(&bin).args(&args).exec();
            Err(err).with_context(|| format!("running {}", bin.display()))
        }
        Task::Test { args } => {
            setup()?;
            test(&args)
        }
    }
}

fn setup() -> Result<()> {
    ensure_apt_packages()?;
    ensure_nightly_rust_src()?;
    ensure_bpf_linker()?;
    Ok(())
}

fn test(extra: &[String]) -> Result<()> {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
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

fn ensure_apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
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
    let current = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if current.contains(BPF_LINKER_VERSION) {
        return Ok(());
    }
    eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION}");
    cargo(&[
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--locked",
    ])
}

fn cargo(args: &[&str]) -> Result<()> {
    status(Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into())).args(args))
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

fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(PathBuf::from)
        .context("xtask has no parent directory")
}
