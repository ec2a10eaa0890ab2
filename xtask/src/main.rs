//! Developer tasks: `cargo xtask setup | run | test | vm-test | image | man | bench | fuzz`.
//!
//! Every task starts with `setup`, which installs only what is missing, so
//! the README's two commands work on a fresh machine and cost seconds after.

mod bench;
mod fuzz;
mod image;
// tcprst's own reader, shared by path: xtask builds before the toolchain
// that the tcprst crate needs (it is what installs it), so it cannot
// depend on the crate.
#[path = "../../tcprst/src/mountinfo.rs"]
mod mountinfo;
mod process;
mod setup;
mod soak;
mod sys;
mod vm;

use std::{env, fs, os::unix::process::CommandExt as _, path::PathBuf, process::Command};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

use crate::{
    image::{build_static, image},
    process::{as_root, cargo, cargo_command, host_triple, is_root, output, status},
    setup::setup,
};

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
    status(&mut cmd)?;
    // The fuzz targets are a crate of their own, which nothing else builds:
    // a checked build keeps them from falling behind the library's API.
    let fuzz = workspace_root()?.join("fuzz/Cargo.toml");
    status(
        cargo_command()
            .args(["check", "--bins", "--manifest-path"])
            .arg(fuzz),
    )
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
