//! Static (musl) builds, and the container image made from one.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    process::{cargo_command, has_command, status},
    setup::{ensure_apt_packages, ensure_rust_target},
    target_dir, workspace_root,
};

/// The image is one static binary, so it runs on any node whatever its libc.
pub(crate) const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
pub(crate) const IMAGE_TAG: &str = "tcprst:dev";

pub(crate) fn image() -> Result<()> {
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

/// Builds `packages` (release, static, musl) and returns the directory
/// holding their binaries, each named as its package.
pub(crate) fn build_static(packages: &[&str]) -> Result<PathBuf> {
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
pub(crate) fn ensure_static(bin: &Path) -> Result<()> {
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
