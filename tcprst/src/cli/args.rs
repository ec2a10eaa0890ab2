//! Command-line interface.

use std::{
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{Args, CommandFactory as _, Parser, Subcommand, ValueEnum};
use clap_complete::Shell;

use crate::{
    bpf::attach::AttachSpec, output::OutputFormat, output::metrics::MetricsAddr,
    pipeline::filter::AddrMatch,
};

#[derive(Debug, Parser)]
#[command(
    name = "tcprst",
    version,
    about = "Explains TCP resets: who sent or received each RST, and why",
    after_help = "Exit status: 0 when tracing ends normally (Ctrl-C, SIGTERM, or the reader closing the pipe); \
                  1 when tracing fails after it started; 2 for bad flags, missing privileges or an unusable kernel."
)]
pub struct Cli {
    /// Say more on stderr: each hook's attach tier and why better ones failed (-v), and
    /// the verifier's whole log when a program is refused (-vv)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stream every TCP RST this host sends or receives, and every connection stuck half-closed.
    Trace(Box<TraceArgs>),
    /// List every half-closed or lingering connection now, in every network namespace.
    Snapshot(SnapshotArgs),
    /// Check what this kernel lets tcprst do: BTF, tracefs, program types, each hook's tier, privileges.
    Doctor(DoctorArgs),
    /// Pair each received reset with the send that caused it, from several nodes' NDJSON.
    Correlate(CorrelateArgs),
    /// Print the completion script for a shell, e.g. `tcprst completions bash > /etc/bash_completion.d/tcprst`.
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Write the man pages, tcprst.1 and one per subcommand, into DIR.
    // Hidden: `cargo xtask man` runs it, as packagers can; nobody reading
    // --help needs it.
    #[command(hide = true)]
    Man { dir: PathBuf },
}

#[derive(Debug, Args)]
pub struct CorrelateArgs {
    /// NDJSON files from `tcprst trace -o json` on several nodes [default: stdin]
    #[arg(value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

/// The completion script for `shell`, which knows every subcommand and flag.
pub fn completions(shell: Shell) -> Vec<u8> {
    // clap_complete panics when its writer fails: a buffer cannot, and the
    // caller then sees an error (a closed pipe) as an error.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "tcprst", &mut script);
    script
}

/// tcprst.1, whose SUBCOMMANDS section names the others, and a page for
/// each subcommand with its flags (tcprst-trace.1, …), into `dir`.
pub fn write_man_pages(dir: &Path) -> io::Result<()> {
    clap_mangen::generate_to(Cli::command(), dir)
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Output format [default: table on a terminal, json otherwise]
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<OutputFormat>,

    #[command(flatten)]
    pub kernel: KernelArgs,
}

/// How to reach the kernel's reset functions.
#[derive(Debug, Args)]
pub struct KernelArgs {
    /// How to hook the functions that send resets: auto (fentry, else kprobe, else the
    /// tcp:tcp_send_reset tracepoint), one tier for all, or FUNCTION=TIER for one (repeatable)
    #[arg(
        long = "attach",
        value_name = "auto|fentry|kprobe|tracepoint|FUNCTION=TIER"
    )]
    pub attach: Vec<AttachSpec>,

    /// BTF file describing the running kernel [default: /sys/kernel/btf/vmlinux]
    #[arg(long, value_name = "PATH")]
    pub btf: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// Output format [default: table on a terminal, json otherwise]
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<OutputFormat>,

    /// Only this network namespace: a name under /run/netns, a path like /proc/PID/ns/net, or an inode number
    #[arg(long, value_name = "NAME|PATH|INODE")]
    pub netns: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KindArg {
    #[value(name = "rst_sent")]
    RstSent,
    #[value(name = "rst_received")]
    RstReceived,
    /// Stuck and resolved half-closed connections
    #[value(name = "halfclose")]
    Halfclose,
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    /// Output format [default: table on a terminal, json otherwise]
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<OutputFormat>,

    /// Only connections with this local or remote port
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Option<u16>,

    /// Only connections with this local or remote address or CIDR block (repeatable)
    #[arg(long = "addr", value_name = "ADDR[/PREFIX]")]
    pub addrs: Vec<AddrMatch>,

    /// Only resets sent or received in this process's context (never softirq ones)
    #[arg(long)]
    pub pid: Option<u32>,

    /// Only resets sent or received while this command ran (never softirq ones)
    #[arg(long)]
    pub comm: Option<String>,

    /// Only this network namespace: a name under /run/netns, a path like /proc/PID/ns/net, or an inode number
    #[arg(long, value_name = "NAME|PATH|INODE")]
    pub netns: Option<String>,

    /// Only sockets of this container: an id (or its prefix), or its name (Docker's, or Kubernetes')
    #[arg(long)]
    pub container: Option<String>,

    /// Only sockets of this pod, by name or UID
    #[arg(long)]
    pub pod: Option<String>,

    /// Only sockets of pods in this Kubernetes namespace
    #[arg(long)]
    pub namespace: Option<String>,

    /// Only sockets whose cgroup path contains this
    #[arg(long)]
    pub cgroup: Option<String>,

    /// Only this kind of event
    #[arg(long, value_enum)]
    pub kind: Option<KindArg>,

    /// Only IPv4
    #[arg(short = '4', conflicts_with = "ipv6")]
    pub ipv4: bool,

    /// Only IPv6
    #[arg(short = '6')]
    pub ipv6: bool,

    /// Ring-buffer size in 4 KiB pages (a power of two)
    // 4 MiB: about 50 ms of a storm of a line per reset on two CPUs, the
    // longest the event loop was seen to wait for the output thread or for
    // a CPU; at 1 MiB such storms lost records (docs/performance.md).
    #[arg(long, default_value_t = 1024, value_parser = parse_buffer_pages)]
    pub buffer_pages: u32,

    /// Report connections half-closed for longer than this
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub stuck_after: Duration,

    /// Report a stuck connection again this often while it stays stuck
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub stuck_repeat: Duration,

    /// Keep every state change of every socket in the kernel, so each reset carries its
    /// connection's steps from the start; costs a socket-storage entry per socket
    #[arg(long)]
    pub history: bool,

    /// Half-closed connections tracked at once; beyond it the newest are counted, not tracked
    #[arg(long, default_value_t = 65536, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Watch this node's pods through this kubeconfig (in a pod, the in-cluster config is used)
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,

    /// Pod labels events carry
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "app,app.kubernetes.io/name,app.kubernetes.io/instance"
    )]
    pub pod_labels: Vec<String>,

    /// Docker's Engine API socket, asked for the name and image of each Docker container
    #[arg(long, value_name = "PATH", default_value = "/var/run/docker.sock")]
    pub docker_socket: PathBuf,

    /// containerd's state directory, whose task bundles give each container's Kubernetes name
    /// and image
    #[arg(long, value_name = "DIR", default_value = "/run/containerd")]
    pub containerd_state: PathBuf,

    /// CRI-O's socket, whose inspect API gives each CRI-O container's name and image
    #[arg(long, value_name = "PATH", default_value = "/var/run/crio/crio.sock")]
    pub crio_socket: PathBuf,

    /// Print each reset's whole kernel stack, not just the calling function
    #[arg(long)]
    pub stack: bool,

    /// Resets a second that get their own record, per kind, ends (remote port aside), reason,
    /// hook and state; the kernel only counts the rest, reported once a second as one aggregate
    /// record per key. 0: a record for every reset
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub detail_per_sec: u32,

    /// Log on stderr each read the kernel programs could not do (which hook, which member,
    /// at which offset), for bug reports from kernels tcprst was not tried on. A flood of
    /// failures can fill the 128 KiB log and skip lines; the exit summary's count is exact
    #[arg(long)]
    pub debug_bpf: bool,

    /// Serve Prometheus metrics at http://ADDR/metrics; a bare port binds 127.0.0.1
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<MetricsAddr>,

    /// Once tracing has started, write `ready` and a newline to this inherited file descriptor,
    /// then close it: for harnesses that wait for tracing
    #[arg(long, value_name = "FD")]
    pub ready_fd: Option<i32>,

    #[command(flatten)]
    pub kernel: KernelArgs,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 30s or 2m: {e}"))?;
    if d.is_zero() {
        return Err("must be longer than zero".to_owned());
    }
    Ok(d)
}

fn parse_buffer_pages(s: &str) -> Result<u32, String> {
    let pages: u32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if pages == 0 || !pages.is_power_of_two() || pages > 1 << 18 {
        return Err(format!(
            "{pages} is not a power of two between 1 and {}",
            1 << 18
        ));
    }
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn rejects_conflicting_and_bad_values() {
        let parse = |args: &[&str]| Cli::try_parse_from(["tcprst", "trace"].iter().chain(args));
        assert!(parse(&["-4", "-6"]).is_err());
        assert!(parse(&["--port", "0"]).is_err());
        assert!(parse(&["--port", "70000"]).is_err());
        assert!(parse(&["--buffer-pages", "3"]).is_err());
        assert!(parse(&["--addr", "300.1.1.1"]).is_err());
        assert!(parse(&["--stuck-after", "soon"]).is_err());
        assert!(parse(&["--attach", "uprobe"]).is_err());
        assert!(parse(&["--attach", "tcp_v4_send_reset=kprobe", "--attach", "auto"]).is_ok());
        assert!(parse(&["--stuck-after", "0s"]).is_err());
        assert!(parse(&["--kind", "rst_sent", "--port", "80", "-o", "json"]).is_ok());
        assert!(parse(&["--kind", "halfclose", "--stuck-after", "2s"]).is_ok());
        assert!(parse(&["--metrics-addr", "not-an-address"]).is_err());
        assert_eq!(parse(&["-vv"]).unwrap().verbose, 2);
        assert!(
            parse(&[
                "--metrics-addr",
                "9090",
                "--pod",
                "web-1",
                "--namespace",
                "shop"
            ])
            .is_ok()
        );
    }

    #[test]
    fn bash_completion_knows_trace_and_its_flags() {
        let script = String::from_utf8(completions(Shell::Bash)).unwrap();
        assert!(script.contains("trace"), "{script}");
        assert!(script.contains("--detail-per-sec"), "{script}");
    }

    #[test]
    fn the_man_pages_render() {
        let dir = std::env::temp_dir().join(format!("tcprst-man-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write_man_pages(&dir).unwrap();
        for page in ["tcprst.1", "tcprst-trace.1", "tcprst-doctor.1"] {
            let path = dir.join(page);
            let roff = std::fs::read_to_string(&path).unwrap();
            // After clap_mangen's preamble (a quote-mark string), the title.
            let first = roff
                .lines()
                .find(|l| !l.starts_with(".ie") && !l.starts_with(".el"));
            assert!(
                first.is_some_and(|l| l.starts_with(".TH ")),
                "{page}: {roff}"
            );
            // man itself, where installed, is the real judge.
            let Ok(out) = std::process::Command::new("man")
                .arg("-l")
                .arg(&path)
                .env("MANWIDTH", "100")
                .output()
            else {
                continue;
            };
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{page}: {out:?}");
            if page == "tcprst-trace.1" {
                assert!(text.contains("--detail-per-sec"), "{text}");
            }
        }
        // The hidden subcommand gets no page.
        assert!(!dir.join("tcprst-man.1").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
