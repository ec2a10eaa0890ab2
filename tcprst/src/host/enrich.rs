//! Facts about a connection that only userspace can find: which process
//! holds its socket, the namespace's FIN timeout and listeners, and the
//! half-closed connections that existed before tracing started.

use std::{
    collections::HashMap,
    fs, io,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Result;

use crate::{
    host::cgroup::{CgroupInfo, CgroupResolver, container_label, parse_path},
    host::k8s::{PodIndex, PodMeta},
    host::netns::{NetnsHandle, all_namespaces, in_netns},
    host::owner::SocketOwners,
    host::runtimes::{ContainerMeta, ContainerNames},
    host::sockdiag::{
        AcceptQueue, DiagSocket, DumpExtras, accept_queue_for, dump_tcp, dump_tcp_with,
    },
    model::conn::ConnKey,
    model::event::{ExecContext, Process, RstEvent, TcpState},
};

/// The kernel default, for when the namespace's sysctl cannot be read.
const DEFAULT_FIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Facts about sockets right now, each gathered at most once: one /proc
/// scan, one sock_diag dump per namespace and state, one sysctl read per
/// namespace. Make one per round of stuck reports, or per snapshot, so a
/// burst of stuck connections costs one scan, not one each.
#[derive(Default)]
pub(crate) struct Lookup {
    namespaces: Option<Vec<NetnsHandle>>,
    owners: Option<SocketOwners>,
    sysctls: HashMap<(u32, &'static str), Option<u64>>,
}

impl Lookup {
    fn namespace(&mut self, netns: u32) -> Option<&NetnsHandle> {
        self.namespaces
            .get_or_insert_with(all_namespaces)
            .iter()
            .find(|ns| ns.inode == netns)
    }

    pub(crate) fn owners(&mut self) -> &SocketOwners {
        self.owners.get_or_insert_with(SocketOwners::scan)
    }

    /// One process holding socket `inode`, from one /proc scan.
    pub(crate) fn socket_owner(&mut self, inode: u64) -> Option<Process> {
        self.owners().owner(inode)
    }

    /// net.ipv4.tcp_fin_timeout of a namespace (it is per namespace).
    pub(crate) fn fin_timeout(&mut self, netns: u32) -> Duration {
        self.sysctl(netns, "net/ipv4/tcp_fin_timeout")
            .map_or(DEFAULT_FIN_TIMEOUT, Duration::from_secs)
    }

    /// A numeric sysctl under /proc/sys as namespace `netns` sees it, or
    /// the host's where the namespace has no copy of it.
    pub(crate) fn sysctl(&mut self, netns: u32, path: &'static str) -> Option<u64> {
        if let Some(value) = self.sysctls.get(&(netns, path)) {
            return *value;
        }
        let file = format!("/proc/sys/{path}");
        let parse = |text: io::Result<String>| text.ok()?.trim().parse().ok();
        let value = self
            .namespace(netns)
            .and_then(|ns| in_netns(ns, || parse(fs::read_to_string(&file))).ok())
            .flatten()
            .or_else(|| parse(fs::read_to_string(&file)));
        self.sysctls.insert((netns, path), value);
        value
    }

    /// The accept queue of the listener that takes connections to `local`
    /// in namespace `netns`, if the namespace and the listener still exist.
    pub(crate) fn accept_queue(&mut self, netns: u32, local: SocketAddr) -> Option<AcceptQueue> {
        let ns = self.namespace(netns)?;
        let listeners = in_netns(ns, || dump_tcp(&[TcpState::Listen]))
            .and_then(|dump| dump)
            .inspect_err(|e| log::debug!("listeners in {}: {e:#}", ns.name))
            .ok()?;
        accept_queue_for(&listeners, local)
    }
}

/// A socket found by sock_diag, with the namespace it lives in.
pub(crate) struct FoundSocket {
    pub netns: NetnsHandle,
    pub socket: DiagSocket,
}

impl FoundSocket {
    pub(crate) fn key(&self) -> ConnKey {
        ConnKey::new(
            Some(self.netns.inode),
            self.socket.local,
            self.socket.remote,
        )
    }
}

/// What `f` returns inside every visible namespace (or only `only`), given
/// it and kept beside it. Namespaces that vanish or refuse are skipped:
/// processes come and go.
pub(crate) fn in_every_namespace<T: Send>(
    only: Option<u32>,
    f: impl Fn(&NetnsHandle) -> T + Sync,
) -> Vec<(NetnsHandle, T)> {
    all_namespaces()
        .into_iter()
        .filter(|ns| only.is_none_or(|inode| inode == ns.inode))
        .filter_map(|ns| match in_netns(&ns, || f(&ns)) {
            Ok(found) => Some((ns, found)),
            Err(e) => {
                log::debug!("{e:#}");
                None
            }
        })
        .collect()
}

/// Every socket in `states` in every visible namespace (or only `only`),
/// each with what `extras` asks the kernel to add.
pub(crate) fn find_sockets(states: &[TcpState], only: Option<u32>, extras: DumpExtras) -> Found {
    found_sockets(in_every_namespace(only, |_| dump_tcp_with(states, extras)))
}

/// What the sock_diag dumps of several namespaces found, and which of them
/// could not be dumped: those say nothing of their sockets, which the
/// caller must not take for none.
#[derive(Default)]
pub(crate) struct Found {
    pub sockets: Vec<FoundSocket>,
    /// Each namespace whose dump failed, with why.
    pub unread: Vec<(NetnsHandle, String)>,
}

impl Found {
    /// An error naming each namespace whose dump failed, if any: what was
    /// found then lacks their sockets.
    pub(crate) fn complete(&self) -> Result<()> {
        if self.unread.is_empty() {
            return Ok(());
        }
        let each: Vec<String> = self
            .unread
            .iter()
            .map(|(ns, why)| format!("{} ({why})", ns.name))
            .collect();
        anyhow::bail!(
            "sock_diag could not dump {} network namespace(s), so their sockets are missing: {}",
            self.unread.len(),
            each.join(", ")
        )
    }
}

/// The sockets of each namespace's sock_diag dump, and the namespaces whose
/// dump failed.
pub(crate) fn found_sockets(dumps: Vec<(NetnsHandle, Result<Vec<DiagSocket>>)>) -> Found {
    let mut found = Found::default();
    for (ns, dump) in dumps {
        match dump {
            Ok(sockets) => found
                .sockets
                .extend(sockets.into_iter().map(|socket| FoundSocket {
                    netns: ns.clone(),
                    socket,
                })),
            Err(e) => found.unread.push((ns, format!("{e:#}"))),
        }
    }
    found
}

/// Socket owners looked up when an event names a socket inode: one /proc
/// scan answers every inode of a burst, and a miss rescans at most every
/// `rescan_after`, so a reset storm costs a few scans a second, not one per
/// reset. Memory is one scan's worth, whatever the connection rate.
#[derive(Default)]
pub(crate) struct OwnerCache {
    owners: SocketOwners,
    scanned_at: Option<Instant>,
    /// How long the last scan took.
    took: Duration,
}

const OWNER_RESCAN_EVERY: Duration = Duration::from_millis(100);

/// How long after a /proc scan that took `took` a miss may scan again: at
/// most every `OWNER_RESCAN_EVERY`, and at most a twentieth of the time.
/// A scan reads one link per descriptor on the host, on the event loop, at
/// about 0.5 µs each here: a node with 100,000 descriptors takes about
/// 50 ms, and a storm of resets on sockets opened since each scan would
/// otherwise keep the loop scanning half the time.
fn rescan_after(took: Duration) -> Duration {
    (took * 20).max(OWNER_RESCAN_EVERY)
}

impl OwnerCache {
    pub(crate) fn owner(&mut self, inode: u64) -> Option<Process> {
        if let Some(owner) = self.owners.owner(inode) {
            return Some(owner);
        }
        if self
            .scanned_at
            .is_some_and(|at| at.elapsed() < rescan_after(self.took))
        {
            return None;
        }
        let began = Instant::now();
        self.owners = SocketOwners::scan();
        self.scanned_at = Some(began);
        self.took = began.elapsed();
        self.owners.owner(inode)
    }
}

/// The task acting on the socket, when a reset happened in process context
/// (its own close() or connect(), or the backlog it releases): it holds the
/// socket, or did until that close(), and naming it costs no /proc scan.
pub fn acting_owner(ev: &RstEvent) -> Option<Process> {
    let task = ev.task.as_ref()?;
    (ev.context == ExecContext::Process).then(|| Process {
        pid: task.pid,
        comm: task.comm.clone(),
    })
}

/// Who a socket belongs to, as far as this host can tell.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Attribution {
    /// Shared with the enricher's table: every reset in a namespace names it.
    pub netns_name: Option<Arc<str>>,
    pub cgroup_id: Option<u64>,
    pub cgroup: Option<Arc<CgroupInfo>>,
    pub pod: Option<Arc<PodMeta>>,
    /// The pod watch's name for the container, else its runtime's.
    pub container_name: Option<Arc<str>>,
    /// What the container's runtime says about it, once it has answered.
    pub from_runtime: Option<Arc<ContainerMeta>>,
    /// The process holding the socket (not the task running when the
    /// event happened).
    pub owner: Option<Process>,
}

/// Namespace names are re-read at most this often when one is unknown.
const NETNS_RESCAN_EVERY: Duration = Duration::from_secs(1);
/// How long a namespace's name is trusted before it is looked up again.
const NETNS_REFRESH_EVERY: Duration = Duration::from_secs(30);

pub(crate) struct Enricher {
    cgroups: CgroupResolver,
    pods: Option<PodIndex>,
    netns_names: HashMap<u32, Arc<str>>,
    netns_scanned_at: Option<Instant>,
    /// None without a tokio runtime to ask the container runtimes from.
    runtimes: Option<ContainerNames>,
    /// The cgroup walk `runtimes` was last pruned after.
    pruned_after_scan: u64,
}

impl Enricher {
    pub fn new(cgroups: CgroupResolver, pods: Option<PodIndex>) -> Self {
        Self {
            cgroups,
            pods,
            netns_names: HashMap::new(),
            netns_scanned_at: None,
            runtimes: None,
            pruned_after_scan: 0,
        }
    }

    /// Names containers by asking their runtimes, starting with those
    /// running now (waiting for those answers at most `timeout`).
    pub(crate) async fn ask_runtimes(&mut self, mut names: ContainerNames, timeout: Duration) {
        self.cgroups.rescan();
        self.pruned_after_scan = self.cgroups.scans();
        let running = self
            .cgroups
            .containers()
            .filter_map(|c| Some((c.container_id.as_deref()?, c.runtime)));
        names.prefetch(running, timeout).await;
        self.runtimes = Some(names);
    }

    /// What the runtime says about the container in `cgroup`. After a walk
    /// of the cgroup tree, containers whose cgroup is gone are forgotten.
    fn runtime_meta(&mut self, cgroup: &CgroupInfo) -> Option<Arc<ContainerMeta>> {
        let names = self.runtimes.as_mut()?;
        if self.cgroups.scans() != self.pruned_after_scan {
            self.pruned_after_scan = self.cgroups.scans();
            let live: std::collections::HashSet<&str> = self
                .cgroups
                .containers()
                .filter_map(|c| c.container_id.as_deref())
                .collect();
            names.retain(|id| live.contains(id));
        }
        names.get(cgroup.container_id.as_deref()?, cgroup.runtime)
    }

    pub(crate) fn attribute(
        &mut self,
        key: &ConnKey,
        cgroup_id: Option<u64>,
        owner: Option<Process>,
        now: Instant,
    ) -> Attribution {
        let cgroup = cgroup_id.and_then(|id| self.cgroups.resolve(id));
        let pod = cgroup.as_deref().and_then(|c| self.pod_in(c));
        let from_runtime = cgroup.as_deref().and_then(|c| self.runtime_meta(c));
        let container_name = cgroup
            .as_ref()
            .and_then(|c| {
                self.pods
                    .as_ref()?
                    .container_name(c.pod_uid.as_deref()?, c.container_id.as_deref()?)
            })
            .or_else(|| from_runtime.as_ref()?.name.clone());
        Attribution {
            netns_name: self.netns_name(key.netns, now),
            cgroup_id,
            cgroup,
            pod,
            container_name,
            from_runtime,
            owner,
        }
    }

    /// The pod whose container made cgroup `cgroup_id`, as the pod watch
    /// knows it now.
    pub(crate) fn pod(&mut self, cgroup_id: u64) -> Option<Arc<PodMeta>> {
        let cgroup = self.cgroups.resolve(cgroup_id)?;
        self.pod_in(&cgroup)
    }

    fn pod_in(&self, cgroup: &CgroupInfo) -> Option<Arc<PodMeta>> {
        self.pods.as_ref()?.get(cgroup.pod_uid.as_deref()?)
    }

    /// Whether pod `namespace`/`name` is still on this node, as far as the
    /// pod watch knows; without one no event names a pod.
    pub(crate) fn pod_exists(&self, namespace: &str, name: &str) -> bool {
        self.pods
            .as_ref()
            .is_none_or(|pods| pods.has_pod(namespace, name))
    }

    /// The namespace's name from the last scan of every namespace. A miss
    /// rescans at most every `NETNS_RESCAN_EVERY`; a hit on names older than
    /// `NETNS_REFRESH_EVERY` rescans too, because the kernel reuses the
    /// inode of a namespace that went away. Each scan replaces the map, so
    /// it holds only namespaces that exist.
    fn netns_name(&mut self, inode: u32, now: Instant) -> Option<Arc<str>> {
        if inode == 0 {
            return None;
        }
        let age = self
            .netns_scanned_at
            .map(|at| now.saturating_duration_since(at));
        let due = match age {
            None => true,
            Some(age) if self.netns_names.contains_key(&inode) => age >= NETNS_REFRESH_EVERY,
            Some(age) => age >= NETNS_RESCAN_EVERY,
        };
        if due {
            self.netns_scanned_at = Some(now);
            self.netns_names = all_namespaces()
                .into_iter()
                .map(|ns| (ns.inode, namespace_label(&ns).into()))
                .collect();
        }
        self.netns_names.get(&inode).cloned()
    }
}

/// "host", a /run/netns name, a container ("docker:0e7859b44b4e") when the
/// namespace is only known through a process in a container, or "pid:N".
pub(crate) fn namespace_label(ns: &NetnsHandle) -> String {
    let Some(pid) = ns.name.strip_prefix("pid:") else {
        return ns.name.clone();
    };
    let container = fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|text| {
            let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
            let info = parse_path(path);
            let id = info.container_id?;
            Some(container_label(info.runtime, None, &id))
        });
    container.unwrap_or_else(|| ns.name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_dump_is_kept_apart_from_an_empty_one() {
        let ns = |inode, name: &str| NetnsHandle {
            inode,
            name: name.into(),
            path: format!("/run/netns/{name}").into(),
        };
        let found = found_sockets(vec![
            (ns(1, "empty"), Ok(Vec::new())),
            (
                ns(2, "refused"),
                Err(anyhow::anyhow!("No such file or directory")),
            ),
        ]);
        assert!(found.sockets.is_empty());
        let [(unread, why)] = &found.unread[..] else {
            panic!("{} unread", found.unread.len());
        };
        assert_eq!(
            (unread.inode, why.as_str()),
            (2, "No such file or directory")
        );
        assert_eq!(
            found.complete().unwrap_err().to_string(),
            "sock_diag could not dump 1 network namespace(s), so their sockets are missing: refused (No such file or directory)"
        );
        assert!(
            found_sockets(vec![(ns(1, "empty"), Ok(Vec::new()))])
                .complete()
                .is_ok()
        );
    }

    #[test]
    fn owners_rescan_at_most_a_twentieth_of_the_time() {
        let ms = Duration::from_millis;
        assert_eq!(rescan_after(ms(0)), ms(100));
        assert_eq!(rescan_after(ms(5)), ms(100));
        assert_eq!(rescan_after(ms(50)), ms(1000));
    }
}
