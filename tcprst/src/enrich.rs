//! Facts about a connection that only userspace can find: which process
//! holds its socket, the namespace's FIN timeout, and the half-closed
//! connections that existed before tracing started.

use std::{fs, time::Duration};

use anyhow::Result;

use crate::{
    event::{Task, TcpState},
    netns::{NetnsHandle, all_namespaces, in_netns},
    owner::SocketOwners,
    sockdiag::{DiagSocket, dump_tcp},
    tracker::{ConnKey, is_half_closed},
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

fn namespace(netns: u32) -> Option<NetnsHandle> {
    all_namespaces().into_iter().find(|ns| ns.inode == netns)
}

/// One process holding the socket of `key` in `state`, found with sock_diag
/// (tuple → socket inode) and /proc (inode → process).
pub fn socket_owner(key: &ConnKey, state: TcpState) -> Option<Task> {
    let ns = namespace(key.netns)?;
    let sockets = in_netns(&ns, || dump_tcp(&[state])).ok()?.ok()?;
    let inode = sockets
        .iter()
        .find(|s| s.local == key.local && s.remote == key.remote)
        .map(|s| s.inode)
        .filter(|inode| *inode != 0)?;
    let owners = SocketOwners::scan();
    let owner = owners.owners(inode).first()?;
    Some(Task {
        pid: owner.pid,
        tid: owner.pid,
        comm: owner.comm.clone(),
        uid: 0,
    })
}

/// net.ipv4.tcp_fin_timeout of a namespace (it is per namespace).
pub fn fin_timeout(netns: u32) -> Duration {
    let read = || -> Option<Duration> {
        let ns = namespace(netns)?;
        let text = in_netns(&ns, || {
            fs::read_to_string("/proc/sys/net/ipv4/tcp_fin_timeout")
        })
        .ok()?
        .ok()?;
        Some(Duration::from_secs(text.trim().parse().ok()?))
    };
    read().unwrap_or(DEFAULT_FIN_TIMEOUT)
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
pub fn find_sockets(states: &[TcpState], only: Option<u32>) -> Result<Vec<FoundSocket>> {
    let mut found = Vec::new();
    for ns in all_namespaces() {
        if only.is_some_and(|inode| inode != ns.inode) {
            continue;
        }
        match in_netns(&ns, || dump_tcp(states)) {
            Ok(Ok(sockets)) => found.extend(sockets.into_iter().map(|socket| FoundSocket {
                netns: ns.clone(),
                socket,
            })),
            Ok(Err(e)) | Err(e) => log::debug!("sock_diag in {}: {e:#}", ns.name),
        }
    }
    Ok(found)
}

/// The half-closed connections open before tracing started.
pub fn existing_half_closed(only: Option<u32>) -> Result<Vec<FoundSocket>> {
    let mut found = find_sockets(&HALF_CLOSED, only)?;
    found.retain(|f| is_half_closed(f.socket.state));
    Ok(found)
}
