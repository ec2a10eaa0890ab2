//! Joining the records of a reset's two witnesses: the node whose stack
//! sent it and the node whose application received it. Both compute the
//! same `flow` key from the connection's two ends as seen on the wire, so a
//! log query can join them; `tcprst correlate` pairs them from the NDJSON of
//! several nodes (`kubectl logs` of every pod).
//!
//! Ends are compared as this host's stack saw them: where NAT rewrote one
//! end between the two nodes (a Service's DNAT, masquerading), the two
//! records do not share a flow and the receipt is reported unexplained.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::model::{event::process_label, flow::flow};

/// How far apart the two records' clocks may be: nodes' clocks drift apart
/// by milliseconds under NTP, and a reset reaches its receiver within a
/// round trip; beyond this a receipt is not paired with that send.
pub(crate) const SKEW: Duration = Duration::from_secs(2);

/// One reset record, as `correlate` needs it.
#[derive(Debug, Clone)]
pub struct Witness {
    pub sent: bool,
    pub flow: String,
    /// The receiving end of a received reset, the sending end of a sent one.
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Microseconds since the epoch.
    pub time_us: i64,
    pub record: Value,
}

impl Witness {
    /// A reset record, or None for other kinds (stuck, lost, aggregates:
    /// an aggregate has no single connection to pair).
    pub(crate) fn of(record: Value) -> Result<Option<Self>> {
        let sent = match record["kind"].as_str() {
            Some("rst_sent") => true,
            Some("rst_received") => false,
            _ => return Ok(None),
        };
        let end = |side: &str| -> Result<SocketAddr> {
            let addr = record[format!("{side}_addr")]
                .as_str()
                .with_context(|| format!("no {side}_addr"))?;
            let port = record[format!("{side}_port")]
                .as_u64()
                .with_context(|| format!("no {side}_port"))?;
            Ok(SocketAddr::new(addr.parse()?, u16::try_from(port)?))
        };
        let (local, remote) = (end("local")?, end("remote")?);
        let time = record["time"].as_str().context("no time")?;
        let time_us = humantime::parse_rfc3339(time)
            .with_context(|| format!("time {time:?}"))?
            .duration_since(std::time::UNIX_EPOCH)?
            .as_micros() as i64;
        Ok(Some(Self {
            sent,
            flow: record["flow"]
                .as_str()
                .map_or_else(|| flow(local, remote), str::to_owned),
            local,
            remote,
            time_us,
            record,
        }))
    }
}

/// A received reset, and the send that explains it if any node saw it.
#[derive(Debug)]
pub struct Pair<'a> {
    pub received: &'a Witness,
    pub sent: Option<&'a Witness>,
}

/// Pairs each received reset with the closest send of the same connection
/// whose sender is the receiver's peer, within `SKEW`.
pub fn pair(witnesses: &[Witness]) -> Vec<Pair<'_>> {
    let sends: Vec<&Witness> = witnesses.iter().filter(|w| w.sent).collect();
    witnesses
        .iter()
        .filter(|w| !w.sent)
        .map(|received| {
            let sent = sends
                .iter()
                .filter(|s| {
                    s.flow == received.flow
                        && s.local == received.remote
                        && s.remote == received.local
                })
                .filter(|s| {
                    (s.time_us - received.time_us).unsigned_abs() <= SKEW.as_micros() as u64
                })
                .min_by_key(|s| (s.time_us - received.time_us).unsigned_abs())
                .copied();
            Pair { received, sent }
        })
        .collect()
}

/// Reads NDJSON lines, skipping none silently: a line that is not JSON is
/// an error naming its place.
pub fn read(name: &str, text: &str) -> Result<Vec<Witness>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => bail!("{name}:{}: not a tcprst JSON record: {e}", i + 1),
        };
        if let Some(w) = Witness::of(record).with_context(|| format!("{name}:{}", i + 1))? {
            out.push(w);
        }
    }
    Ok(out)
}

/// One line per received reset: who got it, and who sent it and why.
pub fn describe(pair: &Pair) -> String {
    let r = &pair.received.record;
    let who = |v: &Value| {
        let owner = v["owner"]["comm"]
            .as_str()
            .map(|c| format!(" {}", process_label(&v["owner"]["pid"], c)))
            .unwrap_or_default();
        format!("{}{owner}", v["node"].as_str().unwrap_or("?"))
    };
    let head = format!(
        "{} {} <- {}: received on {}",
        r["time"].as_str().unwrap_or("?"),
        pair.received.local,
        pair.received.remote,
        who(r)
    );
    match pair.sent {
        Some(sent) => {
            let s = &sent.record;
            format!(
                "{head}; sent by {} ({}{})",
                who(s),
                s["reason"].as_str().unwrap_or("no reason given"),
                s["diagnosis"]
                    .as_str()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default()
            )
        }
        None => format!(
            "{head}; sent by none of these nodes: a middlebox, a load balancer, or an untraced host"
        ),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn record(kind: &str, node: &str, local: &str, remote: &str, time: &str) -> Value {
        let (local, remote): (SocketAddr, SocketAddr) =
            (local.parse().unwrap(), remote.parse().unwrap());
        json!({
            "kind": kind, "node": node, "time": time,
            "local_addr": local.ip().to_string(), "local_port": local.port(),
            "remote_addr": remote.ip().to_string(), "remote_port": remote.port(),
            "reason": if kind == "rst_sent" { json!("NO_SOCKET") } else { json!(null) },
            "owner": null, "diagnosis": null,
        })
    }

    #[test]
    fn both_ends_compute_the_same_flow() {
        let (a, b) = (
            "10.1.0.2:40000".parse().unwrap(),
            "10.2.0.2:80".parse().unwrap(),
        );
        assert_eq!(flow(a, b), flow(b, a));
        assert_eq!(flow(a, b), "10.1.0.2:40000-10.2.0.2:80");
    }

    #[test]
    fn a_receipt_pairs_with_its_peers_send_within_the_skew() {
        let text = [
            record(
                "rst_received",
                "node-a",
                "10.1.0.2:40000",
                "10.2.0.2:80",
                "2026-12-02T00:00:01.000000Z",
            ),
            // The sender's clock runs 1.5 s ahead: still paired.
            record(
                "rst_sent",
                "node-b",
                "10.2.0.2:80",
                "10.1.0.2:40000",
                "2026-12-02T00:00:02.500000Z",
            ),
            // Same ends, but outside the skew: not this receipt's send.
            record(
                "rst_received",
                "node-a",
                "10.1.0.2:40000",
                "10.2.0.2:80",
                "2026-12-02T00:01:00.000000Z",
            ),
            record(
                "halfclose_stuck",
                "node-a",
                "10.1.0.2:1",
                "10.2.0.2:2",
                "2026-12-02T00:00:00.000000Z",
            ),
        ]
        .map(|v| v.to_string())
        .join("\n");
        let witnesses = read("logs", &text).unwrap();
        assert_eq!(witnesses.len(), 3);
        let pairs = pair(&witnesses);
        assert_eq!(pairs.len(), 2);
        assert!(pairs[0].sent.is_some());
        assert!(
            describe(&pairs[0]).ends_with("; sent by node-b (NO_SOCKET)"),
            "{}",
            describe(&pairs[0])
        );
        assert!(pairs[1].sent.is_none());
        assert!(describe(&pairs[1]).contains("sent by none of these nodes"));
    }

    #[test]
    fn bad_lines_are_named() {
        let err = read("node-a.log", "{}\nnot json\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("node-a.log:2: not a tcprst JSON record"),
            "{err}"
        );
    }
}
