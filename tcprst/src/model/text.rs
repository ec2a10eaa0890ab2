//! How model values read in one line of text.

use std::{
    fmt,
    io::Write as _,
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
/// storm's every record carries three or four times, is built on the stack
/// and appended whole: `core::fmt` took about a fifth of a reset line's CPU
/// (#11), and a write per octet still a tenth.
pub fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => out.extend_from_slice(V4Text::new(v4, None).as_bytes()),
        IpAddr::V6(v6) => write!(out, "{v6}").expect("writing into a Vec cannot fail"),
    }
}

/// `addr` as Display writes it ("10.0.0.1:80", "[::1]:80"), appended to
/// `out`.
pub fn push_socket_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(v4) => {
            out.extend_from_slice(V4Text::new(*v4.ip(), Some(v4.port())).as_bytes())
        }
        SocketAddr::V6(v6) => write!(out, "{v6}").expect("writing into a Vec cannot fail"),
    }
}

/// `before`, `addr` as Display writes it, then `after`, in a string sized
/// once: the diagnosis of nearly every reset in a storm is such a text, and
/// `format!` took a tenth of the instructions of its line (#11).
pub fn around_addr(before: &str, addr: SocketAddr, after: &str) -> String {
    let mut text = String::with_capacity(before.len() + V4Text::ROOM + after.len());
    text.push_str(before);
    match addr {
        SocketAddr::V4(v4) => text.push_str(V4Text::new(*v4.ip(), Some(v4.port())).as_str()),
        SocketAddr::V6(v6) => fmt::Write::write_fmt(&mut text, format_args!("{v6}"))
            .expect("writing into a String cannot fail"),
    }
    text.push_str(after);
    text
}

/// "10.0.0.1", and ":80" after it with a port.
struct V4Text {
    text: [u8; Self::ROOM],
    len: usize,
}

/// Each octet's digits and a dot, as four bytes to copy whole, and how
/// many of them to keep.
const OCTETS: [([u8; 4], u8); 256] = {
    let mut table = [([0; 4], 0); 256];
    let mut octet = 0;
    while octet < 256 {
        let (hundreds, tens, ones) = (
            (octet / 100) as u8,
            (octet / 10 % 10) as u8,
            (octet % 10) as u8,
        );
        table[octet] = if octet >= 100 {
            ([b'0' + hundreds, b'0' + tens, b'0' + ones, b'.'], 4)
        } else if octet >= 10 {
            ([b'0' + tens, b'0' + ones, b'.', 0], 3)
        } else {
            ([b'0' + ones, b'.', 0, 0], 2)
        };
        octet += 1;
    }
    table
};

impl V4Text {
    /// The longest, "255.255.255.255:65535"; the four-byte copies of the
    /// octets end at its 16th byte at most.
    const ROOM: usize = 21;

    fn new(ip: Ipv4Addr, port: Option<u16>) -> Self {
        let mut v4 = Self {
            text: [0; Self::ROOM],
            len: 0,
        };
        for octet in ip.octets() {
            let (digits, len) = OCTETS[usize::from(octet)];
            v4.text[v4.len..v4.len + 4].copy_from_slice(&digits);
            v4.len += usize::from(len);
        }
        // The last octet's dot becomes the port's colon, or goes.
        v4.len -= 1;
        if let Some(port) = port {
            v4.text[v4.len] = b':';
            v4.len += 1;
            let mut digits = itoa::Buffer::new();
            let digits = digits.format(port).as_bytes();
            v4.text[v4.len..v4.len + digits.len()].copy_from_slice(digits);
            v4.len += digits.len();
        }
        v4
    }

    fn as_bytes(&self) -> &[u8] {
        &self.text[..self.len]
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).expect("digits, dots and a colon")
    }
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
            "192.168.100.9:8080",
            "1.20.109.99:1",
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
            assert_eq!(around_addr("<", addr, ">"), format!("<{addr}>"));
        }
    }
}
