//! Scratch network namespaces: made for one test, run or connect, with
//! loopback up, and deleted when dropped. tcprst's own `netns.rs` enters the
//! namespaces a user names and never makes one; this is the test side's.

use std::{
    fs::{self, File},
    io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::PathBuf,
    process::{Command, Stdio},
    thread,
};

use anyhow::{Context as _, Result, bail};
use socket2::{Domain, Socket, Type};

/// A network namespace under /run/netns that this process made.
#[derive(Debug)]
pub struct ScratchNetns {
    /// Its name under /run/netns; empty once deleted.
    pub name: String,
    /// Its nsfs inode, as tcprst reports namespaces.
    pub inode: u32,
}

impl ScratchNetns {
    /// Makes namespace `name` and brings up its loopback. A name already
    /// taken is an error: it may be someone else's.
    pub fn create(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        ip(&["netns", "add", &name])?;
        // From here on, dropping deletes it.
        let mut ns = Self { name, inode: 0 };
        let path = ns.path();
        ns.inode = fs::metadata(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .ino()
            .try_into()
            .context("an nsfs inode wider than 32 bits")?;
        ns.enter(loopback_up)?
            .with_context(|| format!("bringing up lo in {}", ns.name))?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `f` on a thread inside this namespace: setns() moves only the
    /// calling thread, so the caller stays where it is. Sockets `f` makes
    /// stay in the namespace wherever they are used afterwards.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = self.path();
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: `file` is an open descriptor that outlives the
                // call, and setns() moves only this thread, which exists for
                // `f` alone.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error())
                        .with_context(|| format!("entering network namespace {}", self.name));
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Sets `key` (`net/ipv4/tcp_tw_reuse`) under /proc/sys in this
    /// namespace: a thread in it sees the namespace's own net sysctls.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = PathBuf::from("/proc/sys").join(key);
        self.enter(|| fs::write(&path, value))?
            .with_context(|| format!("setting {key} in netns {}", self.name))
    }

    /// Deletes it now, and says whether that worked; dropping deletes it
    /// too, silently.
    pub fn delete(mut self) -> Result<()> {
        let name = std::mem::take(&mut self.name);
        ip(&["netns", "del", &name])
    }
}

impl Drop for ScratchNetns {
    fn drop(&mut self) {
        if !self.name.is_empty() {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// `ip link set lo up` in this thread's namespace, without starting `ip`:
/// one process fewer for each of the soak's many namespaces.
fn loopback_up() -> io::Result<()> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
    // SAFETY: ifreq is plain data (a name and a union of integers, arrays
    // and pointers), for which all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (to, from) in req.ifr_name.iter_mut().zip(b"lo") {
        *to = *from as libc::c_char;
    }
    let ioctl = |request, req: &mut libc::ifreq| {
        // SAFETY: both requests read and write only the ifreq, which lives
        // across the call; its name is NUL-terminated by the zeroes.
        if unsafe { libc::ioctl(socket.as_raw_fd(), request as _, req as *mut libc::ifreq) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    ioctl(libc::SIOCGIFFLAGS, &mut req)?;
    // SAFETY: SIOCGIFFLAGS has just filled in the flags member.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    ioctl(libc::SIOCSIFFLAGS, &mut req)
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
