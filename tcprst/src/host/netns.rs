//! Network namespaces: finding every one on the host and running code inside
//! one of them.

use std::{
    collections::HashSet,
    fs::{self, File},
    io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::PathBuf,
};

use anyhow::{Context as _, Result};

const HOST: &str = "/proc/1/ns/net";
const NAMED_DIR: &str = "/run/netns";

/// A network namespace and a file that keeps a handle on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetnsHandle {
    /// The namespace's nsfs inode, as the kernel reports it in `net->ns.inum`.
    pub inode: u32,
    /// "host", the name under /run/netns, or "pid:PID" of a process in it.
    pub name: String,
    pub path: PathBuf,
}

/// The host namespace first, then the named ones (`ip netns`), then those only
/// processes hold; each namespace once, under the first name found for it.
pub fn all_namespaces() -> Vec<NetnsHandle> {
    let mut named: Vec<(String, PathBuf)> = fs::read_dir(NAMED_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| {
            (
                entry.file_name().to_string_lossy().into_owned(),
                entry.path(),
            )
        })
        .collect();
    named.sort();
    // Processes come and go while we look, so any that vanished are skipped.
    let by_process = procfs::process::all_processes()
        .into_iter()
        .flatten()
        .flatten()
        .map(|process| {
            let pid = process.pid();
            (
                format!("pid:{pid}"),
                PathBuf::from(format!("/proc/{pid}/ns/net")),
            )
        });

    let nsfs_dev = fs::metadata("/proc/self/ns/net").map(|m| m.dev()).ok();
    let mut seen = HashSet::new();
    std::iter::once(("host".to_owned(), PathBuf::from(HOST)))
        .chain(named)
        .chain(by_process)
        .filter_map(|(name, path)| {
            let meta = fs::metadata(&path).ok()?;
            // A /run/netns entry whose bind mount is gone (`ip netns add` died
            // half-way, or a racing delete) is a plain tmpfs file, not nsfs.
            if Some(meta.dev()) != nsfs_dev {
                return None;
            }
            let inode = u32::try_from(meta.ino()).ok()?;
            seen.insert(inode)
                .then_some(NetnsHandle { inode, name, path })
        })
        .collect()
}

/// Runs `f` inside `ns`. setns() moves only the calling thread, so `f` gets a
/// thread of its own and the caller (and any async runtime on it) stays put.
/// The opened file must still be the namespace that was found: a
/// `/proc/PID/ns/net` path names another one once the process is gone and
/// its pid reused, and a `/run/netns` name can be deleted and made again.
pub fn in_netns<T: Send>(ns: &NetnsHandle, f: impl FnOnce() -> T + Send) -> Result<T> {
    let file = File::open(&ns.path).with_context(|| {
        format!(
            "opening network namespace {} ({})",
            ns.name,
            ns.path.display()
        )
    })?;
    let inode = file
        .metadata()
        .with_context(|| format!("reading network namespace {}", ns.name))?
        .ino();
    if inode != u64::from(ns.inode) {
        anyhow::bail!(
            "network namespace {} ({}) is now namespace {inode}, not {}: it went away",
            ns.name,
            ns.path.display(),
            ns.inode
        );
    }
    std::thread::scope(|scope| {
        let worker = scope.spawn(|| {
            // SAFETY: `file` is an open descriptor that outlives the call.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error())
                    .with_context(|| format!("entering network namespace {}", ns.name));
            }
            Ok(f())
        });
        worker
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Network namespaces made for tests, shared with the other modules' tests.
#[cfg(test)]
pub mod testing {
    use std::{
        process::Command,
        sync::atomic::{AtomicU32, Ordering},
    };

    use super::*;

    /// A namespace created with `ip netns add` for one test, deleted on drop.
    pub struct TestNetns(pub NetnsHandle);

    impl TestNetns {
        pub fn create() -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let name = format!("tcprst-ut-{}-{n}", std::process::id());
            ip(&["netns", "add", &name]);
            let path = PathBuf::from(NAMED_DIR).join(&name);
            // Made before anything else can fail, so Drop deletes the namespace.
            let mut netns = Self(NetnsHandle {
                inode: 0,
                name,
                path,
            });
            ip(&["-n", &netns.0.name, "link", "set", "lo", "up"]);
            let inode = fs::metadata(&netns.0.path)
                .expect("stat the new netns")
                .ino();
            netns.0.inode = inode.try_into().expect("nsfs inodes are 32-bit");
            netns
        }
    }

    impl Drop for TestNetns {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["netns", "delete", &self.0.name])
                .status();
        }
    }

    pub fn ip(args: &[&str]) {
        let status = Command::new("ip").args(args).status().expect("running ip");
        assert!(status.success(), "ip {} failed", args.join(" "));
    }
}

#[cfg(test)]
mod tests {
    use super::{
        testing::{TestNetns, ip},
        *,
    };

    fn own_netns_inode() -> u64 {
        fs::metadata("/proc/thread-self/ns/net").unwrap().ino()
    }

    #[test]
    fn lists_host_first_then_each_namespace_once() {
        let netns = TestNetns::create();
        let all = all_namespaces();

        match fs::metadata(HOST) {
            Ok(host) => assert_eq!(
                (&*all[0].name, u64::from(all[0].inode)),
                ("host", host.ino())
            ),
            // Some sandboxes keep even root out of pid 1's namespaces.
            Err(_) => assert!(all.iter().all(|ns| ns.name != "host"), "{all:?}"),
        }
        let found = all.iter().find(|ns| ns.inode == netns.0.inode);
        assert_eq!(found, Some(&netns.0));
        let unique: HashSet<u32> = all.iter().map(|ns| ns.inode).collect();
        assert_eq!(unique.len(), all.len(), "duplicate inodes in {all:?}");
    }

    #[test]
    fn runs_closure_inside_namespace_only() {
        let netns = TestNetns::create();
        let before = own_netns_inode();

        let inside = in_netns(&netns.0, own_netns_inode).unwrap();

        assert_eq!(inside, u64::from(netns.0.inode));
        assert_eq!(own_netns_inode(), before);
    }

    #[test]
    fn a_namespace_made_again_under_the_same_name_is_refused() {
        let netns = TestNetns::create();
        let found = netns.0.clone();
        ip(&["netns", "delete", &found.name]);
        ip(&["netns", "add", &found.name]);
        let err = format!("{:#}", in_netns(&found, || ()).unwrap_err());
        assert!(err.contains("it went away"), "{err}");
    }

    #[test]
    fn errors_name_the_namespace() {
        let error = |name: &str, path: &str| {
            let ns = NetnsHandle {
                // What the file is, so the inode check passes and setns decides.
                inode: fs::metadata(path).map_or(1, |m| m.ino() as u32),
                name: name.into(),
                path: path.into(),
            };
            format!("{:#}", in_netns(&ns, || ()).unwrap_err())
        };

        let missing = error("gone", "/run/netns/tcprst-no-such-netns");
        assert!(
            missing.starts_with("opening network namespace gone"),
            "{missing}"
        );
        // A mount namespace file opens fine, but setns() refuses it for CLONE_NEWNET.
        let wrong = error("not-a-netns", "/proc/self/ns/mnt");
        assert!(
            wrong.starts_with("entering network namespace not-a-netns"),
            "{wrong}"
        );
    }
}
