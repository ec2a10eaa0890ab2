//! Namespace and cgroup churn, for `cargo xtask soak`: each connect to a
//! closed port runs in a network namespace and a cgroup made for it alone,
//! both removed right after, so a tracer's caches keyed by namespace and by
//! cgroup see a steady stream of ones that come and go. Unlike the other
//! modes this one runs on the host: it makes its own namespaces, and it
//! needs the cgroup2 mount, which `ip netns exec` hides.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    thread,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use tcprst_loadgen::{netns::ScratchNetns, scenario};

use crate::{Bounds, Common, Summary, Tally, ensure_loopback, pace::Pacer, spawn_workers};

#[derive(Args)]
pub(crate) struct NamespacesArgs {
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

pub(crate) fn run(args: &NamespacesArgs) -> Result<Summary> {
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
    // Not deleted if making it failed: the name may be someone else's.
    let refused = ScratchNetns::create(name).and_then(|ns| {
        let client = SocketAddr::new(args.target.ip(), 0);
        let refused = join(&cgroup).and_then(|()| {
            ns.enter(|| scenario::refused(client, args.target))?
                .map(drop)
        });
        refused.and(ns.delete())
    });
    let left = join(&args.cgroup_parent).and_then(|()| {
        fs::remove_dir(&cgroup).with_context(|| format!("removing cgroup {}", cgroup.display()))
    });
    refused.and(left)
}

/// Moves this whole process, every thread, into cgroup `dir`.
fn join(dir: &Path) -> Result<()> {
    fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("joining cgroup {}", dir.display()))
}
