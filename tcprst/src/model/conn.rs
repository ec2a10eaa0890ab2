//! A connection as the kernel names it: its namespace and two ends.

use std::net::SocketAddr;

/// One TCP connection, from one end: the key the pipeline, the host
/// lookups and the outputs all find it by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// 0 when the kernel BTF was unavailable.
    pub netns: u32,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

impl ConnKey {
    pub fn new(netns: Option<u32>, local: SocketAddr, remote: SocketAddr) -> Self {
        Self {
            netns: netns.unwrap_or(0),
            local,
            remote,
        }
    }
}
