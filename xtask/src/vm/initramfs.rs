//! The guest's initramfs: busybox, the static binaries, nft with its
//! libraries, the reject and TCP sock_diag modules, the kernel's build
//! config, and what /init reads under /vm.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};
use tcprst_loadgen::scenario::{SCENARIOS, Scenario};

use super::{
    BINARIES,
    kernels::{KernelTree, module_bytes, module_name, modules_in_load_order},
    plans,
};
use crate::process::output;

/// What `reject with tcp reset` in an inet table loads; modules.dep names
/// the rest (nf_reject_ipv4/6, nf_tables, …).
pub(crate) const REJECT_MODULE: &str = "nft_reject_inet";
/// What sock_diag's TCP dumps need (and inet_diag under it): Debian builds
/// them as modules, which no modprobe loads in the guest.
const TCP_DIAG_MODULE: &str = "tcp_diag";

/// PID 1 in the guest. The console (ttyS0) carries the kernel's messages;
/// what the host parses goes to ttyS1 alone, between `@@begin NAME` and
/// `@@end NAME` lines, so printk never lands inside a record. The host
/// writes the plans, scenarios and modules under /vm.
pub(crate) const INIT: &str = include_str!("init.sh");

pub(crate) fn initramfs_archive(kernel: &KernelTree, binaries: &Path) -> Result<Vec<u8>> {
    let mut cpio = Cpio::default();
    cpio.file("init", 0o755, INIT.as_bytes());
    cpio.copy("bin/busybox", Path::new("/bin/busybox"))?;
    for bin in BINARIES {
        cpio.copy(&format!("bin/{bin}"), &binaries.join(bin))?;
    }
    let (config, from) = kernel.config();
    let bytes = fs::read(&from).with_context(|| format!("reading {}", from.display()))?;
    cpio.file(&config, 0o644, &bytes);
    for path in with_libraries(Path::new("/usr/sbin/nft"))? {
        let inside = path.to_str().context("a non-UTF-8 path")?;
        cpio.copy(inside.trim_start_matches('/'), &path)?;
    }

    let mut modules = modules_in_load_order(&kernel.modules(), REJECT_MODULE)?;
    // A kernel that builds it in lists no such module; were it missing
    // altogether, the doctor's socket-table row would say so.
    let tcp_diag = modules_in_load_order(&kernel.modules(), TCP_DIAG_MODULE).unwrap_or_default();
    for module in tcp_diag {
        if !modules.contains(&module) {
            modules.push(module);
        }
    }
    let mut names = String::new();
    for module in &modules {
        let name = module_name(module);
        let bytes = module_bytes(&kernel.modules().join(module))?;
        cpio.file(&format!("vm/modules/{name}.ko"), 0o644, &bytes);
        names.push_str(name);
        names.push('\n');
    }
    cpio.file("vm/load-order", 0o644, names.as_bytes());

    let plans: String = plans()
        .iter()
        .map(|p| format!("{} {}\n", p.name, p.args().join(" ")))
        .collect();
    cpio.file("vm/plans", 0o644, plans.as_bytes());
    let scenarios: String = SCENARIOS.iter().map(|s| format!("{}\n", s.name)).collect();
    cpio.file("vm/scenarios", 0o644, scenarios.as_bytes());
    let nft = Scenario::named("nft-reject").expect("nft-reject is a scenario");
    cpio.file(
        "vm/nft-reject-port",
        0o644,
        nft.server.port().to_string().as_bytes(),
    );
    Ok(cpio.finish())
}

/// `program` and every shared object it loads, the loader included, as ldd
/// resolves them on this host.
pub(crate) fn with_libraries(program: &Path) -> Result<Vec<PathBuf>> {
    let ldd = output(Command::new("ldd").arg(program))?;
    let libraries = ldd
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
        .map(PathBuf::from);
    Ok([program.to_owned()].into_iter().chain(libraries).collect())
}

/// A newc ("070701") cpio archive, the format the kernel unpacks an
/// initramfs from.
#[derive(Default)]
pub(crate) struct Cpio {
    pub(crate) data: Vec<u8>,
    pub(crate) dirs: BTreeSet<String>,
    pub(crate) inodes: u32,
}

impl Cpio {
    pub(crate) fn copy(&mut self, inside: &str, from: &Path) -> Result<()> {
        let bytes = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
        self.file(inside, 0o755, &bytes);
        Ok(())
    }

    pub(crate) fn file(&mut self, path: &str, mode: u32, content: &[u8]) {
        self.parents(path);
        self.entry(path, libc::S_IFREG | mode, content);
    }

    /// The kernel creates no directory implicitly: each must come before
    /// what it holds.
    pub(crate) fn parents(&mut self, path: &str) {
        let ancestors: Vec<&Path> = Path::new(path)
            .ancestors()
            .skip(1)
            .filter(|d| !d.as_os_str().is_empty())
            .collect();
        for dir in ancestors.into_iter().rev() {
            let dir = dir.to_string_lossy().into_owned();
            if self.dirs.insert(dir.clone()) {
                self.entry(&dir, libc::S_IFDIR | 0o755, &[]);
            }
        }
    }

    pub(crate) fn entry(&mut self, name: &str, mode: u32, content: &[u8]) {
        self.inodes += 1;
        let size = u32::try_from(content.len()).expect("initramfs files are under 4 GiB");
        let name_size = u32::try_from(name.len() + 1).expect("short names");
        #[rustfmt::skip]
        let fields = [
            self.inodes, mode,
            0, 0, // uid, gid: root
            1, 0, // nlink, mtime
            size,
            0, 0, 0, 0, // devmajor, devminor, rdevmajor, rdevminor
            name_size,
            0, // check: newc has none
        ];
        self.data.extend_from_slice(b"070701");
        for field in fields {
            self.data
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(content);
        self.pad();
    }

    pub(crate) fn pad(&mut self) {
        self.data.resize(self.data.len().next_multiple_of(4), 0);
    }

    pub(crate) fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_names_each_directory_before_its_contents() {
        let mut cpio = Cpio::default();
        cpio.file("usr/sbin/nft", 0o755, b"elf");
        cpio.file("usr/lib/libc.so", 0o644, b"");
        let archive = cpio.finish();
        let mut names = Vec::new();
        let mut at = 0;
        while at < archive.len() {
            let header = std::str::from_utf8(&archive[at..at + 110]).unwrap();
            assert!(header.starts_with("070701"));
            let hex = |field: usize| {
                usize::from_str_radix(&header[6 + field * 8..14 + field * 8], 16).unwrap()
            };
            let (size, name_size) = (hex(6), hex(11));
            let name = &archive[at + 110..at + 110 + name_size - 1];
            names.push(String::from_utf8(name.to_vec()).unwrap());
            at = (at + 110 + name_size).next_multiple_of(4);
            at = (at + size).next_multiple_of(4);
        }
        assert_eq!(
            names,
            [
                "usr",
                "usr/sbin",
                "usr/sbin/nft",
                "usr/lib",
                "usr/lib/libc.so",
                "TRAILER!!!"
            ]
        );
    }
}
