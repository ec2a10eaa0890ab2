//! The key both witnesses of a reset compute for its connection.

use std::{cmp::Ordering, net::SocketAddr};

/// The connection's two ends in a fixed order, so both witnesses compute
/// the same key whichever end they are: "10.0.0.1:80-10.0.0.2:51234".
pub fn flow(a: SocketAddr, b: SocketAddr) -> String {
    let (low, high) = match order(&a, &b) {
        Ordering::Greater => (b, a),
        _ => (a, b),
    };
    format!("{low}-{high}")
}

fn order(a: &SocketAddr, b: &SocketAddr) -> Ordering {
    (a.ip(), a.port()).cmp(&(b.ip(), b.port()))
}
