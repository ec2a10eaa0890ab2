//! One reset of a known kind, for `cargo xtask vm-test`: each scenario makes
//! exactly one connection on loopback, checks that the socket saw the error
//! that reset must cause, and prints the connection's two ends, so the test
//! can find the tracer's records for it by their 4-tuple.

use std::{
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, ValueEnum};
use serde::Serialize;
use socket2::{Domain, Socket, Type};

/// A reset that never comes must fail the scenario, not hang the VM.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Args)]
pub struct ScenarioArgs {
    name: Name,
    /// The server's port on loopback; nothing may listen there unless the scenario listens itself
    #[arg(long)]
    port: u16,
}

#[derive(Clone, Copy, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Name {
    /// Connect to 127.0.0.1:PORT where nothing listens: tcp_v4_send_reset answers the SYN.
    ClosedPort,
    /// Connect to [::1]:PORT where nothing listens: tcp_v6_send_reset answers the SYN.
    ClosedPort6,
    /// The server closes with the client's bytes unread: tcp_close sends a reset.
    AbortOnClose,
    /// The client closes with SO_LINGER {on, 0}: tcp_disconnect sends a reset.
    Linger0,
    /// Connect to a port an nft rule rejects with a TCP reset: nf_send_reset answers. The
    /// socket sees what closed-port shows; only the tracer tells the two apart.
    NftReject,
}

/// The connection a scenario made: the server's end is the one that
/// listened, or would have.
#[derive(Serialize)]
pub struct Outcome {
    scenario: Name,
    client: SocketAddr,
    server: SocketAddr,
}

pub fn run(args: &ScenarioArgs) -> Result<Outcome> {
    let ip = match args.name {
        Name::ClosedPort6 => IpAddr::V6(Ipv6Addr::LOCALHOST),
        _ => IpAddr::V4(Ipv4Addr::LOCALHOST),
    };
    let server = SocketAddr::new(ip, args.port);
    let client = match args.name {
        Name::ClosedPort | Name::ClosedPort6 | Name::NftReject => refused(server),
        Name::AbortOnClose => abort_on_close(server),
        Name::Linger0 => linger0(server),
    }?;
    Ok(Outcome {
        scenario: args.name,
        client,
        server,
    })
}

/// Whatever answers the SYN with a reset, connect() fails with ECONNREFUSED.
pub fn refused(server: SocketAddr) -> Result<SocketAddr> {
    let (socket, client) = bound_client(server)?;
    expect_error(
        socket.connect(&server.into()),
        io::ErrorKind::ConnectionRefused,
        "connect",
    )?;
    Ok(client)
}

/// Unread data makes close() abort instead of sending FIN (RFC 2525, 2.17).
fn abort_on_close(server: SocketAddr) -> Result<SocketAddr> {
    let listener = TcpListener::bind(server).with_context(|| format!("binding {server}"))?;
    let (mut stream, client) = connect(server)?;
    stream.write_all(b"never read")?;
    let (accepted, _) = listener.accept()?;
    // Close only once the bytes are queued, or the close is a clean FIN.
    accepted.set_read_timeout(Some(IO_TIMEOUT))?;
    accepted.peek(&mut [0])?;
    drop(accepted);
    expect_error(
        stream.read(&mut [0; 16]),
        io::ErrorKind::ConnectionReset,
        "read",
    )?;
    Ok(client)
}

/// A zero linger time turns close() into tcp_disconnect, which resets an
/// established connection; with nothing unread, nothing else does.
fn linger0(server: SocketAddr) -> Result<SocketAddr> {
    let listener = TcpListener::bind(server).with_context(|| format!("binding {server}"))?;
    let (stream, client) = connect(server)?;
    let (mut accepted, _) = listener.accept()?;
    let stream = Socket::from(stream);
    stream.set_linger(Some(Duration::ZERO))?;
    drop(stream);
    accepted.set_read_timeout(Some(IO_TIMEOUT))?;
    expect_error(
        accepted.read(&mut [0; 16]),
        io::ErrorKind::ConnectionReset,
        "read",
    )?;
    Ok(client)
}

fn connect(server: SocketAddr) -> Result<(TcpStream, SocketAddr)> {
    let (socket, client) = bound_client(server)?;
    socket
        .connect(&server.into())
        .with_context(|| format!("connecting to {server}"))?;
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    Ok((stream, client))
}

/// Bound before connecting, because a socket whose connect failed forgets
/// an automatically chosen port, and the client's port is what tells this
/// connection's records apart.
fn bound_client(server: SocketAddr) -> Result<(Socket, SocketAddr)> {
    let socket = Socket::new(Domain::for_address(server), Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(server.ip(), 0).into())?;
    let client = socket
        .local_addr()?
        .as_socket()
        .context("a TCP socket's address is not an IP address")?;
    Ok((socket, client))
}

fn expect_error<T>(result: io::Result<T>, want: io::ErrorKind, what: &str) -> Result<()> {
    match result {
        Err(e) if e.kind() == want => Ok(()),
        Err(e) => bail!("{what} failed with {e}, not {want}"),
        Ok(_) => bail!("{what} succeeded; expected {want}"),
    }
}
