use which::which;

/// Linking this crate needs `bpf-linker`, which cargo cannot express as a
/// dependency; rebuild when the linker binary changes so a new linker is used.
fn main() {
    let bpf_linker =
        which("bpf-linker").expect("bpf-linker is not on PATH; run `cargo xtask setup`");
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
    // aya-build passes the target architecture, which picks pt_regs' layout.
    println!("cargo::rustc-check-cfg=cfg(bpf_target_arch, values(any()))");
}
