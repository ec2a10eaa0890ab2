//! Facts about a connection that only userspace can find: which process
//! holds its socket, the namespace's FIN timeout, and the half-closed
//! connections that existed before tracing started.

use std::{
    collections::HashMap,
    fs,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    cgroup::{CgroupInfo, CgroupResolver, parse_path},
    event::{ExecContext, Process, RstEvent, TcpState},
    k8s::{PodIndex, PodMeta},
    netns::{NetnsHandle, all_namespaces, in_netns},
    owner::SocketOwners,
    sockdiag::{DiagSocket, DumpExtras, dump_tcp_with},
    tracker::ConnKey,
};

pub const HALF_CLOSED: [TcpState; 5] = [
    TcpState::FinWait1,
    TcpState::FinWait2,
    TcpState::CloseWait,
    TcpState::LastAck,
    TcpState::Closing,
];

/// The kernel default, for when the namespace's sysctl cannot be read.
const DEFAULT_FIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Facts about sockets right now, each gathered at most once: one /proc
/// scan, one sock_diag dump per namespace and state, one sysctl read per
/// namespace. Make one per round of stuck reports, or per snapshot, so a
/// burst of stuck connections costs one scan, not one each.
#[derive(Default)]
pub struct Lookup {
    namespaces: Option<Vec<NetnsHandle>>,
    owners: Option<SocketOwners>,
    fin_timeouts: HashMap<u32, Duration>,
}

impl Lookup {
    fn namespace(&mut self, netns: u32) -> Option<&NetnsHandle> {
        self.namespaces
            .get_or_insert_with(all_namespaces)
            .iter()
            .find(|ns| ns.inode == netns)
    }

    pub fn owners(&mut self) -> &SocketOwners {
        self.owners.get_or_insert_with(SocketOwners::scan)
    }

    /// One process holding socket `inode`, from one /proc scan.
    pub fn socket_owner(&mut self, inode: u64) -> Option<Process> {
        self.owners().owner(inode)
    }

    /// net.ipv4.tcp_fin_timeout of a namespace (it is per namespace).
    pub fn fin_timeout(&mut self, netns: u32) -> Duration {
        if let Some(timeout) = self.fin_timeouts.get(&netns) {
            return *timeout;
        }
        let read = |ns: &NetnsHandle| -> Option<Duration> {
            let text = in_netns(ns, || {
                fs::read_to_string("/proc/sys/net/ipv4/tcp_fin_timeout")
            })
            .ok()?
            .ok()?;
            Some(Duration::from_secs(text.trim().parse().ok()?))
        };
        let timeout = self
            .namespace(netns)
            .and_then(read)
            .unwrap_or(DEFAULT_FIN_TIMEOUT);
        self.fin_timeouts.insert(netns, timeout);
        timeout
    }
}

/// A socket found by sock_diag, with the namespace it lives in.
pub struct FoundSocket {
    pub netns: NetnsHandle,
    pub socket: DiagSocket,
}

impl FoundSocket {
    pub fn key(&self) -> ConnKey {
        ConnKey::new(
            Some(self.netns.inode),
            self.socket.local,
            self.socket.remote,
        )
    }
}

/// Every socket in `states` in every visible namespace (or only `only`).
/// Namespaces that vanish or refuse are skipped: processes come and go.
pub fn find_sockets(states: &[TcpState], only: Option<u32>) -> Vec<FoundSocket> {
    find_sockets_with(states, only, DumpExtras::default())
}

/// `find_sockets`, each socket with what `extras` asks the kernel to add.
pub fn find_sockets_with(
    states: &[TcpState],
    only: Option<u32>,
    extras: DumpExtras,
) -> Vec<FoundSocket> {
    let mut found = Vec::new();
    for ns in all_namespaces() {
        if only.is_some_and(|inode| inode != ns.inode) {
            continue;
        }
        match in_netns(&ns, || dump_tcp_with(states, extras)) {
            Ok(Ok(sockets)) => found.extend(sockets.into_iter().map(|socket| FoundSocket {
                netns: ns.clone(),
                socket,
            })),
            Ok(Err(e)) | Err(e) => log::debug!("sock_diag in {}: {e:#}", ns.name),
        }
    }
    found
}

/// Socket owners looked up when an event names a socket inode: one /proc
/// scan answers every inode of a burst, and a miss rescans at most every
/// `OWNER_RESCAN_EVERY`, so a reset storm costs a few scans a second, not
/// one per reset. Memory is one scan's worth, whatever the connection rate.
#[derive(Default)]
pub struct OwnerCache {
    owners: SocketOwners,
    scanned_at: Option<Instant>,
}

const OWNER_RESCAN_EVERY: Duration = Duration::from_millis(100);

impl OwnerCache {
    pub fn owner(&mut self, inode: u64) -> Option<Process> {
        if let Some(owner) = self.owners.owner(inode) {
            return Some(owner);
        }
        if self
            .scanned_at
            .is_some_and(|at| at.elapsed() < OWNER_RESCAN_EVERY)
        {
            return None;
        }
        self.owners = SocketOwners::scan();
        self.scanned_at = Some(Instant::now());
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
    pub pod: Option<PodMeta>,
    pub container_name: Option<String>,
    /// The process holding the socket (not the task running when the
    /// event happened).
    pub owner: Option<Process>,
}

/// Namespace names are re-read at most this often when one is unknown.
const NETNS_RESCAN_EVERY: Duration = Duration::from_secs(1);

pub struct Enricher {
    cgroups: CgroupResolver,
    pods: Option<PodIndex>,
    /// The pod labels events carry; pods can have many.
    pod_labels: Vec<String>,
    netns_names: HashMap<u32, Arc<str>>,
    netns_scanned_at: Option<Instant>,
}

impl Enricher {
    pub fn new(cgroups: CgroupResolver, pods: Option<PodIndex>, pod_labels: Vec<String>) -> Self {
        Self {
            cgroups,
            pods,
            pod_labels,
            netns_names: HashMap::new(),
            netns_scanned_at: None,
        }
    }

    pub fn attribute(
        &mut self,
        key: &ConnKey,
        cgroup_id: Option<u64>,
        owner: Option<Process>,
    ) -> Attribution {
        let cgroup = cgroup_id.and_then(|id| self.cgroups.resolve(id));
        let pod = cgroup
            .as_ref()
            .and_then(|c| Some((self.pods.as_ref()?, c.pod_uid.as_deref()?)))
            .and_then(|(pods, uid)| pods.get(uid))
            .map(|mut pod| {
                pod.labels.retain(|k, _| self.pod_labels.contains(k));
                pod
            });
        let container_name = cgroup.as_ref().and_then(|c| {
            self.pods
                .as_ref()?
                .container_name(c.pod_uid.as_deref()?, c.container_id.as_deref()?)
        });
        Attribution {
            netns_name: self.netns_name(key.netns),
            cgroup_id,
            cgroup,
            pod,
            container_name,
            owner,
        }
    }

    fn netns_name(&mut self, inode: u32) -> Option<Arc<str>> {
        if inode == 0 {
            return None;
        }
        if !self.netns_names.contains_key(&inode)
            && self
                .netns_scanned_at
                .is_none_or(|at| at.elapsed() >= NETNS_RESCAN_EVERY)
        {
            self.netns_scanned_at = Some(Instant::now());
            for ns in all_namespaces() {
                let name = namespace_label(&ns);
                self.netns_names.entry(ns.inode).or_insert(name.into());
            }
        }
        self.netns_names.get(&inode).cloned()
    }
}

/// "host", a /run/netns name, a container ("docker:0e7859b44b4e") when the
/// namespace is only known through a process in a container, or "pid:N".
fn namespace_label(ns: &NetnsHandle) -> String {
    let Some(pid) = ns.name.strip_prefix("pid:") else {
        return ns.name.clone();
    };
    let container = fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|text| {
            let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
            let info = parse_path(path);
            let id = info.container_id?;
            Some(format!(
                "{}:{}",
                info.runtime.unwrap_or("container"),
                &id[..12]
            ))
        });
    container.unwrap_or_else(|| ns.name.clone())
}
