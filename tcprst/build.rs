use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

/// Builds the eBPF object from `tcprst-ebpf` for the bpf target (nightly,
/// `-Z build-std=core`, bpf-linker) into OUT_DIR, where `include_bytes_aligned!`
/// embeds it.
fn main() -> anyhow::Result<()> {
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
