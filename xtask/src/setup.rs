//! `cargo xtask setup`: installs only what is missing, so a fresh machine
//! needs nothing but cargo and a second run takes seconds.

use std::process::{Command, Stdio};

use anyhow::{Result, bail};

use crate::{
    process::{as_root, cargo, has_command, output, status},
    workspace_root,
};

pub(crate) const BPF_LINKER_VERSION: &str = "0.10.3";
pub(crate) const NIGHTLY: &str = "nightly";
/// Debian packages the tool and its tests use: `ip` for network namespaces,
/// `nft` for rules in them, `setpriv` for the tests that run tcprst with fewer
/// capabilities (bad_input.rs, capabilities.rs), socat as a real half-closing
/// TCP proxy, bpftrace as the benchmark baseline, Python for
/// kubernetes-validate, which checks deploy/daemonset.yaml, and Prometheus
/// (with promtool) to check and evaluate deploy/prometheus-rules.yaml. On a
/// systemd host the package also enables its own service on :9090; the
/// tests start a Prometheus of their own and need none.
pub(crate) const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "nftables",
    "util-linux",
    "socat",
    "bpftrace",
    "python3",
    "python3-venv",
    "prometheus",
    // Real container runtimes for tests/runtimes.rs, and a static busybox
    // as the containers' root file system.
    "docker.io",
    "containerd",
    "runc",
    "busybox-static",
];
pub(crate) const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
/// Under the workspace's own target/ whatever CARGO_TARGET_DIR says, because
/// tcprst/tests/deploy.rs looks for it there.
pub(crate) const VENV: &str = "target/venv";

pub(crate) fn setup() -> Result<()> {
    ensure_apt_packages(APT_PACKAGES)?;
    ensure_nightly_rust_src()?;
    ensure_bpf_linker()?;
    ensure_kubernetes_validate()?;
    Ok(())
}

pub(crate) fn ensure_apt_packages(packages: &[&str]) -> Result<()> {
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

pub(crate) fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

pub(crate) fn ensure_nightly_rust_src() -> Result<()> {
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

pub(crate) fn ensure_bpf_linker() -> Result<()> {
    ensure_cargo_install(
        Command::new("bpf-linker").arg("--version"),
        "bpf-linker",
        BPF_LINKER_VERSION,
    )
}

/// Installs `krate` at `version` with cargo unless `check`'s output already
/// names that version.
pub(crate) fn ensure_cargo_install(check: &mut Command, krate: &str, version: &str) -> Result<()> {
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

pub(crate) fn ensure_rust_target(target: &str) -> Result<()> {
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if installed.lines().any(|l| l == target) {
        return Ok(());
    }
    eprintln!("xtask: adding the {target} target");
    status(Command::new("rustup").args(["target", "add", target]))
}

pub(crate) fn ensure_kubernetes_validate() -> Result<()> {
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
