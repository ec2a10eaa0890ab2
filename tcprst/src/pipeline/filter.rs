//! What the user asked to see: address, command, family and owner here;
//! port, netns and pid are checked in the kernel (cli::options builds that
//! filter), so no ring-buffer space is spent on them.

use std::{
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

use anyhow::{Result, anyhow};

use crate::{
    host::enrich::Attribution,
    model::conn::ConnKey,
    model::event::{RstEvent, RstKind},
};

/// An address or a CIDR block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrMatch {
    net: IpAddr,
    prefix: u8,
}

impl FromStr for AddrMatch {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = addr
            .trim_matches(['[', ']'])
            .parse()
            .map_err(|_| anyhow!("{s:?} is not an IP address or CIDR block"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| anyhow!("{s:?} has a bad prefix length (0 to {max})"))?,
        };
        Ok(Self { net, prefix })
    }
}

impl AddrMatch {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(
                u128::from(net.to_bits()) << 96,
                u128::from(ip.to_bits()) << 96,
                self.prefix,
            ),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(net.to_bits(), ip.to_bits(), self.prefix)
            }
            _ => false,
        }
    }
}

fn prefix_eq(a: u128, b: u128, prefix: u8) -> bool {
    prefix == 0 || (a ^ b) >> (128 - u32::from(prefix)) == 0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// The filters applied after decoding.
#[derive(Debug, Clone)]
pub struct EventFilter {
    pub addrs: Vec<AddrMatch>,
    pub comm: Option<String>,
    pub family: Option<Family>,
    /// Report stuck and resolved half-closes.
    pub halfclose: bool,
    /// Report resets sent (they are traced anyway when received ones are,
    /// to tell where those came from).
    pub rst_sent: bool,
    /// A container id (or its prefix) or Kubernetes container name.
    pub container: Option<String>,
    /// A pod name or UID.
    pub pod: Option<String>,
    /// A Kubernetes namespace.
    pub namespace: Option<String>,
    /// Part of a cgroup path.
    pub cgroup: Option<String>,
}

impl Default for EventFilter {
    fn default() -> Self {
        Self {
            addrs: Vec::new(),
            comm: None,
            family: None,
            halfclose: true,
            rst_sent: true,
            container: None,
            pod: None,
            namespace: None,
            cgroup: None,
        }
    }
}

impl EventFilter {
    fn endpoints_match(&self, local: SocketAddr, remote: SocketAddr) -> bool {
        if !self.addrs.is_empty()
            && !self
                .addrs
                .iter()
                .any(|m| m.contains(local.ip()) || m.contains(remote.ip()))
        {
            return false;
        }
        match self.family {
            Some(Family::V4) => !local.is_ipv6(),
            Some(Family::V6) => local.is_ipv6(),
            None => true,
        }
    }

    pub fn matches(&self, ev: &RstEvent) -> bool {
        if ev.kind == RstKind::Sent && !self.rst_sent {
            return false;
        }
        if let Some(comm) = &self.comm
            && ev.task.as_ref().is_none_or(|t| *t.comm != **comm)
        {
            return false;
        }
        self.endpoints_match(ev.local, ev.remote)
    }

    /// Stuck and resolved reports: no task to match a command against.
    pub fn wants_halfclose(&self, key: &ConnKey, who: &Attribution) -> bool {
        self.halfclose
            && self.comm.is_none()
            && self.endpoints_match(key.local, key.remote)
            && self.wants_owner(who)
    }

    /// The container, pod, namespace and cgroup filters.
    pub fn wants_owner(&self, who: &Attribution) -> bool {
        let cgroup = who.cgroup.as_deref();
        let pod = who.pod.as_ref();
        let matches = |wanted: &Option<String>, found: &[Option<&str>]| {
            wanted
                .as_deref()
                .is_none_or(|w| found.iter().flatten().any(|f| *f == w))
        };
        let container_ok = self.container.as_deref().is_none_or(|w| {
            cgroup
                .and_then(|c| c.container_id.as_deref())
                .is_some_and(|id| id.starts_with(w))
                || who.container_name.as_deref() == Some(w)
        });
        container_ok
            && matches(
                &self.pod,
                &[
                    pod.map(|p| p.name.as_str()),
                    cgroup.and_then(|c| c.pod_uid.as_deref()),
                ],
            )
            && matches(&self.namespace, &[pod.map(|p| p.namespace.as_str())])
            && self
                .cgroup
                .as_deref()
                .is_none_or(|w| cgroup.is_some_and(|c| c.path.contains(w)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{bytes, record, rst};
    use tcprst_common::RecordKind;

    fn event() -> RstEvent {
        rst(&bytes(&record(RecordKind::RstSent)))
    }

    #[test]
    fn parses_addresses_and_cidrs() {
        let m: AddrMatch = "10.0.0.0/8".parse().unwrap();
        assert!(m.contains("10.200.1.1".parse().unwrap()));
        assert!(!m.contains("11.0.0.1".parse().unwrap()));
        assert!(!m.contains("::1".parse().unwrap()));
        let m: AddrMatch = "[::1]".parse().unwrap();
        assert!(m.contains("::1".parse().unwrap()));
        let any: AddrMatch = "0.0.0.0/0".parse().unwrap();
        assert!(any.contains("1.2.3.4".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<AddrMatch>().is_err());
        assert!("not-an-ip".parse::<AddrMatch>().is_err());
    }

    #[test]
    fn filters_on_either_end_comm_and_family() {
        let ev = event();
        let f = |filter: EventFilter| filter.matches(&ev);
        assert!(f(EventFilter::default()));
        assert!(f(EventFilter {
            addrs: vec!["10.1.2.3".parse().unwrap()],
            ..Default::default()
        }));
        assert!(f(EventFilter {
            addrs: vec!["127.0.0.0/8".parse().unwrap()],
            ..Default::default()
        }));
        assert!(!f(EventFilter {
            addrs: vec!["192.0.2.1".parse().unwrap()],
            ..Default::default()
        }));
        assert!(f(EventFilter {
            comm: Some("curl".into()),
            ..Default::default()
        }));
        assert!(!f(EventFilter {
            comm: Some("wget".into()),
            ..Default::default()
        }));
        assert!(f(EventFilter {
            family: Some(Family::V4),
            ..Default::default()
        }));
        assert!(!f(EventFilter {
            family: Some(Family::V6),
            ..Default::default()
        }));
    }

    #[test]
    fn comm_filter_never_matches_softirq() {
        let mut ev = event();
        ev.task = None;
        assert!(
            !EventFilter {
                comm: Some("curl".into()),
                ..Default::default()
            }
            .matches(&ev)
        );
    }
}
