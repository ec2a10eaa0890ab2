//! The key both witnesses of a reset compute for its connection.

use std::{cmp::Ordering, net::SocketAddr};

use super::text::push_socket_addr;

/// The connection's two ends in a fixed order, so both witnesses compute
/// the same key whichever end they are: "10.0.0.1:80-10.0.0.2:51234".
pub fn flow(a: SocketAddr, b: SocketAddr) -> String {
    let mut out = Vec::with_capacity(48);
    push_flow(&mut out, a, b);
    String::from_utf8(out).expect("addresses are written in ASCII")
}

/// `flow(a, b)`, appended to `out`.
pub fn push_flow(out: &mut Vec<u8>, a: SocketAddr, b: SocketAddr) {
    let (low, high) = match order(&a, &b) {
        Ordering::Greater => (b, a),
        _ => (a, b),
    };
    push_socket_addr(out, low);
    out.push(b'-');
    push_socket_addr(out, high);
}

fn order(a: &SocketAddr, b: &SocketAddr) -> Ordering {
    (a.ip(), a.port()).cmp(&(b.ip(), b.port()))
}
