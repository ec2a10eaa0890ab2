//! The command line, checked and turned into each command's options before
//! anything touches the kernel: a bad argument is a one-line error.

use std::{io::IsTerminal as _, os::unix::fs::MetadataExt as _, path::Path};

use anyhow::{Context as _, Result, anyhow, bail};
use tcprst_common::KernelFilter;

use crate::{
    bpf::{attach::AttachRequest, privileges, probes::ProbeConfig},
    cli::args::{KindArg, SnapshotArgs, TraceArgs},
    cmd::{
        snapshot::SnapshotOptions,
        trace::{self, TraceOptions},
    },
    host::runtimes::RuntimeOptions,
    output::OutputFormat,
    pipeline::filter::{EventFilter, Family},
};

/// Checks everything about the request before touching the kernel.
pub fn trace_options(args: TraceArgs) -> Result<TraceOptions> {
    // First, before tcprst opens anything that could take the number.
    let ready = args.ready_fd.map(trace::take_ready_fd).transpose()?;
    privileges::check()?;
    let netns = args.netns.as_deref().map(resolve_netns).transpose()?;
    if let Some(pid) = args.pid {
        check_pid_exists(pid)?;
    }
    let output = output_format(args.output);
    Ok(TraceOptions {
        probes: ProbeConfig {
            // Received resets are explained by the sent ones they match.
            rst_sent: args.kind != Some(KindArg::Halfclose),
            rst_received: matches!(args.kind, None | Some(KindArg::RstReceived)),
            filter: kernel_filter(args.port, netns, args.pid),
            buffer_pages: args.buffer_pages,
            history: args.history,
            whole_stacks: args.stack,
            detail_per_sec: args.detail_per_sec,
            debug_bpf: args.debug_bpf,
            btf: args.kernel.btf,
            attach: AttachRequest::new(&args.kernel.attach),
            probe_every_tier: false,
        },
        filter: EventFilter {
            addrs: args.addrs,
            comm: args.comm,
            family: match (args.ipv4, args.ipv6) {
                (true, _) => Some(Family::V4),
                (_, true) => Some(Family::V6),
                _ => None,
            },
            halfclose: matches!(args.kind, None | Some(KindArg::Halfclose)),
            rst_sent: matches!(args.kind, None | Some(KindArg::RstSent)),
            container: args.container,
            pod: args.pod,
            namespace: args.namespace,
            cgroup: args.cgroup,
        },
        output,
        stuck_after: args.stuck_after,
        stuck_repeat: args.stuck_repeat,
        max_connections: args.max_connections as usize,
        kubeconfig: args.kubeconfig,
        pod_labels: args.pod_labels,
        runtimes: RuntimeOptions {
            docker_socket: args.docker_socket,
            containerd_state: args.containerd_state,
            crio_socket: args.crio_socket,
        },
        metrics_addr: args.metrics_addr,
        ready,
    })
}

pub fn snapshot_options(args: &SnapshotArgs) -> Result<SnapshotOptions> {
    // SAFETY: geteuid takes nothing and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        log::warn!("not root: other namespaces and other users' processes are not visible");
    }
    Ok(SnapshotOptions {
        output: output_format(args.output),
        netns: args.netns.as_deref().map(resolve_netns).transpose()?,
    })
}

/// What was asked for, else a table for a terminal and NDJSON for a pipe.
pub fn output_format(requested: Option<OutputFormat>) -> OutputFormat {
    requested.unwrap_or(if std::io::stdout().is_terminal() {
        OutputFormat::Table
    } else {
        OutputFormat::Json
    })
}

/// A network namespace given as an inode number, a path such as
/// /proc/PID/ns/net, or a name under /run/netns.
pub(crate) fn resolve_netns(spec: &str) -> Result<u32> {
    if let Ok(inode) = spec.parse::<u32>() {
        return Ok(inode);
    }
    let path = if spec.contains('/') {
        Path::new(spec).to_path_buf()
    } else {
        Path::new("/run/netns").join(spec)
    };
    let meta = std::fs::metadata(&path)
        .with_context(|| format!("no network namespace {spec:?} ({})", path.display()))?;
    u32::try_from(meta.ino()).map_err(|_| anyhow!("{} is not a namespace file", path.display()))
}

fn check_pid_exists(pid: u32) -> Result<()> {
    if pid == 0 || !Path::new(&format!("/proc/{pid}")).exists() {
        bail!("no process with pid {pid}");
    }
    Ok(())
}

fn kernel_filter(port: Option<u16>, netns: Option<u32>, pid: Option<u32>) -> KernelFilter {
    KernelFilter {
        netns: netns.unwrap_or(0),
        tgid: pid.unwrap_or(0),
        port: port.unwrap_or(0),
        _pad: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_netns_specs() {
        assert_eq!(resolve_netns("4026531840").unwrap(), 4026531840);
        let own = std::fs::metadata("/proc/self/ns/net").unwrap().ino() as u32;
        assert_eq!(resolve_netns("/proc/self/ns/net").unwrap(), own);
        let err = resolve_netns("tcprst-no-such-netns").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("no network namespace \"tcprst-no-such-netns\""),
            "{err}"
        );
    }
}
