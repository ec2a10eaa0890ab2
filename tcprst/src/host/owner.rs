//! Which processes hold a socket, from the `socket:[INODE]` links under
//! /proc/PID/fd.

use std::{collections::HashMap, fs, path::Path, sync::Arc};

use crate::model::event::Process;

/// A process holding a descriptor for a socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub comm: Arc<str>,
}

/// Socket inode to the processes holding it, as of one scan of /proc.
#[derive(Debug, Default)]
pub struct SocketOwners {
    by_inode: HashMap<u64, Vec<Owner>>,
}

impl SocketOwners {
    /// Reads every process's descriptor table. Processes that exit, or whose
    /// table we may not read, are skipped: the scan is a best-effort snapshot.
    pub fn scan() -> Self {
        let mut by_inode: HashMap<u64, Vec<Owner>> = HashMap::new();
        for process in procfs::process::all_processes()
            .into_iter()
            .flatten()
            .flatten()
        {
            let Ok(pid) = u32::try_from(process.pid()) else {
                continue;
            };
            // procfs's Process::fd() also opens and stats every descriptor to
            // report its mode; one readlink each is all this needs.
            let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
                continue;
            };
            let inodes: Vec<u64> = fds
                .flatten()
                .filter_map(|fd| socket_inode(&fs::read_link(fd.path()).ok()?))
                .collect();
            if inodes.is_empty() {
                continue;
            }
            let Ok(comm) = fs::read_to_string(format!("/proc/{pid}/comm")) else {
                continue;
            };
            let owner = Owner {
                pid,
                comm: comm.trim_end_matches('\n').into(),
            };
            for inode in inodes {
                by_inode.entry(inode).or_default().push(owner.clone());
            }
        }
        // A process is listed once however many descriptors it has for the
        // socket (dup(), SCM_RIGHTS).
        for owners in by_inode.values_mut() {
            owners.sort_by_key(|owner| owner.pid);
            owners.dedup();
        }
        Self { by_inode }
    }

    /// The processes holding socket `inode`, by pid; none for orphaned
    /// sockets (inode 0) and for sockets opened after the scan.
    pub fn owners(&self, inode: u64) -> &[Owner] {
        self.by_inode.get(&inode).map_or(&[], Vec::as_slice)
    }

    /// One process holding socket `inode`: the lowest pid.
    pub fn owner(&self, inode: u64) -> Option<Process> {
        self.owners(inode).first().map(|o| Process {
            pid: o.pid,
            comm: o.comm.clone(),
        })
    }
}

/// The inode in a `socket:[INODE]` descriptor link; None for anything else.
fn socket_inode(link: &Path) -> Option<u64> {
    link.to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use std::os::{fd::AsRawFd as _, unix::fs::MetadataExt as _, unix::net::UnixStream};

    use super::*;

    #[test]
    fn parses_socket_links() {
        let parse = |link: &str| socket_inode(Path::new(link));
        assert_eq!(parse("socket:[123]"), Some(123));
        assert_eq!(parse("socket:[18446744073709551615]"), Some(u64::MAX));
        assert_eq!(parse("pipe:[123]"), None);
        assert_eq!(parse("socket:[]"), None);
        assert_eq!(parse("socket:[12x]"), None);
        assert_eq!(parse("/tmp/socket:[123]"), None);
        assert_eq!(parse("anon_inode:[eventfd]"), None);
    }

    #[test]
    fn finds_own_socket_once() {
        let (a, _b) = UnixStream::pair().unwrap();
        // A second descriptor for the same socket must not list us twice.
        let _dup = a.try_clone().unwrap();
        let inode = fs::metadata(format!("/proc/self/fd/{}", a.as_raw_fd()))
            .unwrap()
            .ino();
        let comm = fs::read_to_string("/proc/self/comm").unwrap();

        let owners = SocketOwners::scan();

        let me = Owner {
            pid: std::process::id(),
            comm: comm.trim_end_matches('\n').into(),
        };
        // A child forked by a concurrent test holds it too until it execs.
        let ours: Vec<_> = owners
            .owners(inode)
            .iter()
            .filter(|o| o.pid == me.pid)
            .collect();
        assert_eq!(ours, [&me]);
        assert!(owners.owners(0).is_empty());
    }
}
