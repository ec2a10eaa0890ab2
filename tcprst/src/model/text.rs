//! How model values read in one line of text.

use std::{
    fmt::{self, Display, Formatter},
    io::{self, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

/// "12s", "1.5s", "3m20s": short enough for one line.
pub fn short(d: Duration) -> String {
    let secs = d.as_secs();
    if secs < 10 {
        format!("{:.1}s", d.as_secs_f64())
    } else if secs < 120 {
        format!("{secs}s")
    } else if secs < 7200 {
        format!("{}m{}s", secs / 60, secs % 60)
    } else {
        format!("{}h{}m", secs / 3600, (secs % 3600) / 60)
    }
}

/// `ip` as Display writes it, appended to `out`. An IPv4 address, which a
/// storm's every record carries three or four times, is written octet by
/// octet with itoa: `core::fmt` took about a fifth of a reset line's CPU
/// (#11).
pub fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => write_v4(out, v4, None),
        IpAddr::V6(v6) => write!(out, "{v6}"),
    }
    .expect("writing into a Vec cannot fail");
}

/// `addr` as Display writes it ("10.0.0.1:80", "[::1]:80"), appended to
/// `out`.
pub fn push_socket_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(v4) => write_v4(out, *v4.ip(), Some(v4.port())),
        SocketAddr::V6(v6) => write!(out, "{v6}"),
    }
    .expect("writing into a Vec cannot fail");
}

/// A socket address in `format!`, as `push_socket_addr` writes it: the
/// diagnosis of nearly every reset in a storm names one.
pub struct Addr(pub SocketAddr);

impl Display for Addr {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let SocketAddr::V4(v4) = self.0 else {
            return self.0.fmt(f);
        };
        const LONGEST: usize = "255.255.255.255:65535".len();
        let mut text = [0; LONGEST];
        let len = {
            let mut rest = &mut text[..];
            write_v4(&mut rest, *v4.ip(), Some(v4.port())).map_err(|_| fmt::Error)?;
            LONGEST - rest.len()
        };
        f.write_str(std::str::from_utf8(&text[..len]).map_err(|_| fmt::Error)?)
    }
}

/// "10.0.0.1", and ":80" after it with a port.
fn write_v4(out: &mut impl io::Write, ip: Ipv4Addr, port: Option<u16>) -> io::Result<()> {
    let mut digits = itoa::Buffer::new();
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out.write_all(b".")?;
        }
        out.write_all(digits.format(octet).as_bytes())?;
    }
    if let Some(port) = port {
        out.write_all(b":")?;
        out.write_all(digits.format(port).as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_read_as_display_writes_them() {
        for addr in [
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "10.0.7.1:80",
            "127.0.0.1:9",
            "[::1]:443",
            "[fe80::1%2]:8080",
            "[::ffff:10.0.0.1]:53",
        ] {
            let addr: SocketAddr = addr.parse().unwrap();
            let mut out = Vec::new();
            push_socket_addr(&mut out, addr);
            assert_eq!(String::from_utf8(out).unwrap(), addr.to_string());
            let mut out = Vec::new();
            push_ip(&mut out, addr.ip());
            assert_eq!(String::from_utf8(out).unwrap(), addr.ip().to_string());
            assert_eq!(Addr(addr).to_string(), addr.to_string());
        }
    }
}
