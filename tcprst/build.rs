use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

/// Builds the eBPF object from `tcprst-ebpf` for the bpf target (nightly,
/// `-Z build-std=core`, bpf-linker) into OUT_DIR, where `include_bytes_aligned!`
/// embeds it.
fn main() -> anyhow::Result<()> {
    // aya-build forwards all the nested cargo prints on stderr as cargo
    // warnings: its progress, a line per crate, would fill every first build
    // (#15). Quiet, it prints only errors there; the eBPF crates' warnings
    // and errors still come through its JSON messages, which aya-build
    // forwards too. It inherits our environment; verbose goes off because
    // cargo refuses term.quiet beside term.verbose.
    // SAFETY: this build script has no other thread yet that could read the
    // environment while it changes.
    unsafe {
        std::env::set_var("CARGO_TERM_QUIET", "true");
        std::env::set_var("CARGO_TERM_VERBOSE", "false");
    }
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "tcprst-ebpf")
        .ok_or_else(|| anyhow!("tcprst-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    println!("cargo:rerun-if-changed=../tcprst-common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
