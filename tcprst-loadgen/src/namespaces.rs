//! Namespace and cgroup churn, for `cargo xtask soak`: each connect to a
//! closed port runs in a network namespace and a cgroup made for it alone,
//! both removed right after, so a tracer's caches keyed by namespace and by
//! cgroup see a steady stream of ones that come and go. Unlike the other
//! modes this one runs on the host: it makes its own namespaces, and it
//! needs the cgroup2 mount, which `ip netns exec` hides.

use std::{
    fs::{self, File},
    io,
    net::SocketAddr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use socket2::{Domain, Socket, Type};

use crate::{
    Bounds, Common, Summary, Tally, ensure_loopback, pace::Pacer, scenario, spawn_workers,
};

#[derive(Args)]
pub struct NamespacesArgs {
    #[command(flatten)]
    common: Common,
    /// A cgroup2 directory, empty of processes, to wait in between connects; each connect's
    /// cgroup is made in it
    #[arg(long, value_name = "DIR")]
    cgroup_parent: PathBuf,
    /// Namespaces (under /run/netns) and cgroups are named PREFIX-1, PREFIX-2, …
    #[arg(long)]
    prefix: String,
    /// A loopback address and port, closed in every new namespace
    #[arg(long, default_value = "127.0.0.1:9")]
    target: SocketAddr,
}

pub fn run(args: &NamespacesArgs) -> Result<Summary> {
    ensure_loopback(args.target)?;
    // Joining a cgroup moves the whole process: one connect at a time.
    if args.common.threads.is_some_and(|t| t != 1) {
        bail!("namespaces runs one connect at a time: --threads must be 1");
    }
    // The per-connect cgroups can be removed only once nothing is in them,
    // so between connects the process waits in their parent.
    join(&args.cgroup_parent)?;
    let mut summary = spawn_workers(&args.common, 1, |bounds| (worker(args, bounds), None))?;
    summary.mode = "namespaces";
    Ok(summary)
}

fn worker(args: &NamespacesArgs, bounds: Bounds) -> Tally {
    let pacer = Pacer::new(bounds.per_sec);
    let mut tally = Tally::default();
    while Instant::now() < bounds.deadline && tally.attempts < bounds.max {
        if let Some(at) = pacer.next_at(tally.attempts) {
            thread::sleep(at.saturating_duration_since(Instant::now()));
        }
        tally.attempts += 1;
        let name = format!("{}-{}", args.prefix, tally.attempts);
        match refuse_in_fresh(args, &name) {
            Ok(()) => tally.completed += 1,
            Err(e) => tally.error(&name, &format_args!("{e:#}")),
        }
    }
    tally
}

/// One refused connect in a namespace and a cgroup made for it. Both are
/// removed whatever happened in between: the first error is the one told.
fn refuse_in_fresh(args: &NamespacesArgs, name: &str) -> Result<()> {
    let cgroup = args.cgroup_parent.join(name);
    fs::create_dir(&cgroup).with_context(|| format!("creating cgroup {}", cgroup.display()))?;
    let refused = with_netns(name, || {
        join(&cgroup).and_then(|()| refuse_in(name, args.target))
    });
    let left = join(&args.cgroup_parent).and_then(|()| {
        fs::remove_dir(&cgroup).with_context(|| format!("removing cgroup {}", cgroup.display()))
    });
    refused.and(left)
}

/// Runs `f` with network namespace `name` made for it, and deleted after
/// it, unless making it failed: the name may be someone else's.
fn with_netns(name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    ip(&["netns", "add", name])?;
    let done = f();
    done.and(ip(&["netns", "del", name]))
}

/// Brings up loopback in namespace `name` and connects to `target` there,
/// on a thread of its own: setns() moves only the calling thread, and the
/// next `ip` must start from the host's namespace.
fn refuse_in(name: &str, target: SocketAddr) -> Result<()> {
    let path = Path::new("/run/netns").join(name);
    let ns = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: `ns` is an open descriptor that outlives the call.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error())
                    .with_context(|| format!("entering network namespace {name}"));
            }
            loopback_up().context("bringing up lo")?;
            scenario::refused(target).map(drop)
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// `ip link set lo up` in this thread's namespace, without starting `ip`:
/// one process fewer for each of the many namespaces.
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

/// Moves this whole process, every thread, into cgroup `dir`.
fn join(dir: &Path) -> Result<()> {
    fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("joining cgroup {}", dir.display()))
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
