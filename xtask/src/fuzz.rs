//! `cargo xtask fuzz`: every fuzz target for a bounded time, from the
//! committed seeds (real inputs) plus what earlier runs found.

use std::{fs, process::Command};

use anyhow::{Result, bail};

use crate::{
    process::status,
    setup::{NIGHTLY, ensure_cargo_install},
    workspace_root,
};

/// The parsers of untrusted or kernel-dependent input, one target each.
const TARGETS: [&str; 5] = [
    "decode_record",
    "tracefs_format",
    "btf_offsets",
    "cgroup_path",
    "kallsyms",
];

const CARGO_FUZZ_VERSION: &str = "0.13.2";

pub(crate) fn run(seconds: u32) -> Result<()> {
    ensure_cargo_install(
        Command::new("cargo").args(["fuzz", "--version"]),
        "cargo-fuzz",
        CARGO_FUZZ_VERSION,
    )?;
    let root = workspace_root()?;
    let mut crashed = Vec::new();
    for target in TARGETS {
        let corpus = root.join("fuzz/corpus").join(target);
        fs::create_dir_all(&corpus)?;
        let seeds = root.join("fuzz/seeds").join(target);
        eprintln!("xtask: fuzzing {target} for {seconds}s");
        let ran = status(
            Command::new("cargo")
                .current_dir(&root)
                .arg(format!("+{NIGHTLY}"))
                .args(["fuzz", "run", target])
                .arg(&corpus)
                .arg(&seeds)
                .arg("--")
                .arg(format!("-max_total_time={seconds}")),
        );
        if ran.is_err() {
            crashed.push(target);
        }
    }
    if !crashed.is_empty() {
        bail!(
            "crashes in {}: inputs are under fuzz/artifacts/; fix them and keep each as a unit test",
            crashed.join(", ")
        );
    }
    Ok(())
}
