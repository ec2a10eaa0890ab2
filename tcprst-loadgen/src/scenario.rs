//! The reset scenarios: how to make each on loopback, and what tcprst must
//! record of it. One table, read by tcprst's integration tests
//! (`tests/trace_rst.rs`), by `cargo xtask vm-test` (the guest runs
//! `tcprst-loadgen scenario NAME`, the host judges by the table) and by the
//! soak (a refused connect in each of its namespaces).
//!
//! Each scenario makes exactly one connection, checks that the socket saw
//! the error its reset must cause, and gives the connection's two ends, so
//! the tracer's records for it are found by their 4-tuple.

use std::{
    fs,
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use socket2::{Domain, Socket, Type};

/// A reset that never comes must fail the scenario, not hang a test or a VM.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a scenario looks again for a state the kernel reaches on its
/// own.
const POLL: Duration = Duration::from_millis(10);

const V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

/// Each on its own port, so records are easy to tell apart when they all
/// run in one namespace, as in the vm-test guest. The caller is what tcprst
/// reads off the kernel stack: the first frame that is not a reset function
/// (`__tcp_close` reads as `tcp_close`); it is the same on 5.10, 6.1 and
/// 6.12, and on this host's kernel.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "closed-port",
        server: SocketAddr::new(V4, 4101),
        trigger: Trigger::Refused,
        hook: "tcp_v4_send_reset",
        sender: End::Server,
        state: None,
        caller: "tcp_v4_rcv",
        context: "softirq",
        reason: Reason::Passive("NO_SOCKET"),
        received: ("SYN_SENT", "ECONNREFUSED"),
    },
    Scenario {
        name: "closed-port6",
        server: SocketAddr::new(V6, 4102),
        trigger: Trigger::Refused,
        hook: "tcp_v6_send_reset",
        sender: End::Server,
        state: None,
        caller: "tcp_v6_rcv",
        context: "softirq",
        reason: Reason::Passive("NO_SOCKET"),
        received: ("SYN_SENT", "ECONNREFUSED"),
    },
    // __tcp_close moves the socket to CLOSE before it sends the reset.
    Scenario {
        name: "abort-on-close",
        server: SocketAddr::new(V4, 4103),
        trigger: Trigger::AbortOnClose,
        hook: "tcp_send_active_reset",
        sender: End::Server,
        state: Some("CLOSE"),
        caller: "tcp_close",
        context: "process",
        reason: Reason::Active("TCP_ABORT_ON_CLOSE"),
        received: ("ESTABLISHED", "ECONNRESET"),
    },
    // A zero linger time makes __tcp_close call sk_prot->disconnect, i.e.
    // tcp_disconnect, which moves to CLOSE and then resets.
    Scenario {
        name: "linger0",
        server: SocketAddr::new(V4, 4104),
        trigger: Trigger::Linger0,
        hook: "tcp_send_active_reset",
        sender: End::Client,
        state: Some("CLOSE"),
        caller: "tcp_disconnect",
        context: "process",
        reason: Reason::Active("TCP_STATE"),
        received: ("ESTABLISHED", "ECONNRESET"),
    },
    // An orphan whose FIN was acknowledged lives on as a timewait socket in
    // FIN_WAIT2 (tcp_time_wait), which resets new data from tcp_v4_rcv. The
    // server has the client's FIN, so the reset finds it in CLOSE_WAIT.
    Scenario {
        name: "timewait-data",
        server: SocketAddr::new(V4, 4106),
        trigger: Trigger::DataToTimewait,
        hook: "tcp_v4_send_reset",
        sender: End::Client,
        state: Some("TIME_WAIT"),
        caller: "tcp_v4_rcv",
        context: "softirq",
        reason: Reason::Passive("TCP_TIMEWAIT_SOCKET"),
        received: ("CLOSE_WAIT", "EPIPE"),
    },
    // A socket shut down both ways but still open: data to it makes
    // tcp_rcv_state_process abort it (tcp_reset, which fires the received
    // reset's tracepoint though no reset came) and tcp_v4_do_rcv reset the
    // peer. tcprst must show only the reset that was sent.
    Scenario {
        name: "shutdown-data",
        server: SocketAddr::new(V4, 4107),
        trigger: Trigger::DataAfterShutdown,
        hook: "tcp_v4_send_reset",
        sender: End::Client,
        state: Some("CLOSE"),
        caller: "tcp_v4_do_rcv",
        context: "softirq",
        reason: Reason::Passive("TCP_ABORT_ON_DATA"),
        received: ("CLOSE_WAIT", "EPIPE"),
    },
    // The rule answers the SYN before TCP sees it: no socket, and nft's
    // reject expression is the caller. The socket sees what closed-port
    // shows; only the tracer tells the two apart.
    Scenario {
        name: "nft-reject",
        server: SocketAddr::new(V4, 4105),
        trigger: Trigger::Refused,
        hook: "nf_send_reset",
        sender: End::Server,
        state: None,
        caller: "nft_reject_inet_eval",
        context: "softirq",
        reason: Reason::Never,
        received: ("SYN_SENT", "ECONNREFUSED"),
    },
];

/// One kind of reset, and what tcprst must say of it.
#[derive(Debug)]
pub struct Scenario {
    /// As `tcprst-loadgen scenario` takes it.
    pub name: &'static str,
    /// Where its server listens, or would; nothing else may listen there.
    pub server: SocketAddr,
    pub trigger: Trigger,
    /// The function that sends the reset, as `--attach HOOK=TIER` names it.
    pub hook: &'static str,
    pub sender: End,
    /// The sending socket's state in the record; `None` when none sent it,
    /// TIME_WAIT when a timewait socket did.
    pub state: Option<&'static str>,
    pub caller: &'static str,
    /// Where the kernel ran when it sent the reset, as the record's
    /// `context`: `softirq` while it handled the segment that caused it,
    /// `process` in the closing system call.
    pub context: &'static str,
    pub reason: Reason,
    /// The receiving socket's state and the error its application gets.
    pub received: (&'static str, &'static str),
}

/// How a scenario makes its reset.
#[derive(Debug, Clone, Copy)]
pub enum Trigger {
    /// Connect to a port where something answers the SYN with a reset
    /// (nothing listens, or an nft rule rejects).
    Refused,
    /// The server closes with the client's bytes unread: tcp_close resets.
    AbortOnClose,
    /// The client closes with SO_LINGER {on, 0}: tcp_disconnect resets.
    Linger0,
    /// The client closes; once its socket is a timewait socket, the server
    /// writes.
    DataToTimewait,
    /// The client shuts its socket down both ways and keeps it; the server
    /// writes.
    DataAfterShutdown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Client,
    Server,
}

#[derive(Debug, Clone, Copy)]
pub enum Reason {
    /// The kernel's reason for a reset answering a segment.
    Passive(&'static str),
    /// The kernel's reason for a reset a socket sends of its own accord.
    Active(&'static str),
    /// A reset the kernel gives no reason for.
    Never,
}

/// From 6.10 resets carry reasons, in the tracepoint and as the send
/// functions' argument.
pub const REASONS_SINCE: (u32, u32) = (6, 10);
/// From 6.11 active resets say why instead of NOT_SPECIFIED.
pub const ACTIVE_REASONS_SINCE: (u32, u32) = (6, 11);

impl Reason {
    /// The reason a record must carry on kernel `version` (major, minor).
    pub fn on(self, version: (u32, u32)) -> Option<&'static str> {
        if version < REASONS_SINCE {
            return None;
        }
        match self {
            Reason::Passive(reason) => Some(reason),
            Reason::Active(reason) if version >= ACTIVE_REASONS_SINCE => Some(reason),
            Reason::Active(_) => Some("NOT_SPECIFIED"),
            Reason::Never => None,
        }
    }
}

/// The connection a scenario made: the server's end is the one that
/// listened, or would have.
#[derive(Debug, Serialize, Deserialize)]
pub struct Outcome {
    pub scenario: String,
    pub client: SocketAddr,
    pub server: SocketAddr,
}

impl Scenario {
    pub fn named(name: &str) -> Option<&'static Scenario> {
        SCENARIOS.iter().find(|s| s.name == name)
    }

    /// Makes the reset at `self.server` from an automatically chosen port.
    pub fn make(&self) -> Result<Outcome> {
        let client = self.make_between(SocketAddr::new(self.server.ip(), 0), self.server)?;
        Ok(Outcome {
            scenario: self.name.to_owned(),
            client,
            server: self.server,
        })
    }

    /// Makes the reset between a client bound to `client` and `server`,
    /// and returns the client's address. It fails unless the socket saw
    /// the error the reset causes.
    pub fn make_between(&self, client: SocketAddr, server: SocketAddr) -> Result<SocketAddr> {
        match self.trigger {
            Trigger::Refused => refused(client, server),
            Trigger::AbortOnClose => abort_on_close(client, server),
            Trigger::Linger0 => linger0(client, server),
            Trigger::DataToTimewait => data_to_timewait(client, server),
            Trigger::DataAfterShutdown => data_after_shutdown(client, server),
        }
    }

    /// Whether a full socket sends the reset, which is all that
    /// `tcp:tcp_send_reset` reports before 6.10.
    pub fn sent_by_full_socket(&self) -> bool {
        self.state.is_some_and(|state| state != "TIME_WAIT")
    }

    /// (sender, receiver) of the reset, among a connection's two ends.
    pub fn sender_and_receiver(
        &self,
        client: SocketAddr,
        server: SocketAddr,
    ) -> (SocketAddr, SocketAddr) {
        match self.sender {
            End::Server => (server, client),
            End::Client => (client, server),
        }
    }
}

/// Whatever answers the SYN with a reset, connect() fails with ECONNREFUSED.
pub fn refused(client: SocketAddr, server: SocketAddr) -> Result<SocketAddr> {
    let (socket, client) = bound(client)?;
    expect_error(
        socket.connect(&server.into()),
        io::ErrorKind::ConnectionRefused,
        "connect",
    )?;
    Ok(client)
}

/// Unread data makes close() abort instead of sending FIN (RFC 2525, 2.17).
fn abort_on_close(client: SocketAddr, server: SocketAddr) -> Result<SocketAddr> {
    let listener = TcpListener::bind(server).with_context(|| format!("binding {server}"))?;
    let (mut stream, client) = connect(client, server)?;
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
fn linger0(client: SocketAddr, server: SocketAddr) -> Result<SocketAddr> {
    let listener = TcpListener::bind(server).with_context(|| format!("binding {server}"))?;
    let (stream, client) = connect(client, server)?;
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

/// A timewait socket in FIN_WAIT2 resets new data: the peer was still
/// sending when the application closed.
fn data_to_timewait(client: SocketAddr, server: SocketAddr) -> Result<SocketAddr> {
    let listener = TcpListener::bind(server).with_context(|| format!("binding {server}"))?;
    let (stream, client) = connect(client, server)?;
    let (mut accepted, _) = listener.accept()?;
    drop(stream);
    accepted.set_read_timeout(Some(IO_TIMEOUT))?;
    if accepted.read(&mut [0; 16])? != 0 {
        bail!("the server read data, not the client's FIN");
    }
    // Written any earlier, the data would carry the ACK of the client's
    // FIN, and the full socket would reset it.
    wait_until_timewait(client, server)?;
    accepted.write_all(b"too late")?;
    await_reset_after_fin(&accepted)?;
    Ok(client)
}

/// A socket shut down for reading, in FIN_WAIT1 or FIN_WAIT2, is aborted
/// when data comes (RFC 1122 4.2.2.13).
fn data_after_shutdown(client: SocketAddr, server: SocketAddr) -> Result<SocketAddr> {
    let listener = TcpListener::bind(server).with_context(|| format!("binding {server}"))?;
    let (stream, client) = connect(client, server)?;
    let (mut accepted, _) = listener.accept()?;
    stream.shutdown(Shutdown::Both)?;
    accepted.set_read_timeout(Some(IO_TIMEOUT))?;
    if accepted.read(&mut [0; 16])? != 0 {
        bail!("the server read data, not the client's FIN");
    }
    accepted.write_all(b"too late")?;
    await_reset_after_fin(&accepted)?;
    expect_error(
        stream.take_error()?.map_or(Ok(()), Err),
        io::ErrorKind::ConnectionReset,
        "the client's socket",
    )?;
    Ok(client)
}

/// Waits for a reset to end `stream`, whose peer's FIN it has read: the
/// error the application then gets is EPIPE. poll() asked for no events
/// wakes only on POLLERR and POLLHUP, which the reset raises and the FIN
/// did not.
pub fn await_reset_after_fin(stream: &TcpStream) -> Result<()> {
    let mut fd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: `fd` is one pollfd, which lives across the call.
    let ready = unsafe { libc::poll(&mut fd, 1, IO_TIMEOUT.as_millis() as libc::c_int) };
    match ready {
        0 => bail!("no reset came within {IO_TIMEOUT:?}"),
        1.. => expect_error(
            stream.take_error()?.map_or(Ok(()), Err),
            io::ErrorKind::BrokenPipe,
            "the socket",
        ),
        _ => Err(io::Error::last_os_error()).context("poll"),
    }
}

/// Waits until the kernel has turned `client`'s closed socket into a
/// timewait socket: `/proc/net/tcp` shows one in its substate (FIN_WAIT2,
/// 05) with the timewait timer (03), where a full socket in FIN_WAIT2 has
/// the keepalive timer (02). Read through `thread-self`, whose namespace is
/// this thread's, which a test's may not share with the process's.
fn wait_until_timewait(client: SocketAddr, server: SocketAddr) -> Result<()> {
    let table = match client {
        SocketAddr::V4(_) => "/proc/thread-self/net/tcp",
        SocketAddr::V6(_) => "/proc/thread-self/net/tcp6",
    };
    let client_port = format!(":{:04X}", client.port());
    let server_port = format!(":{:04X}", server.port());
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let text = fs::read_to_string(table).with_context(|| format!("reading {table}"))?;
        let timewait = text.lines().skip(1).any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            matches!(fields[..], [_, local, peer, "05", _, timer, ..]
                if local.ends_with(&client_port) && peer.ends_with(&server_port) && timer.starts_with("03:"))
        });
        if timewait {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{client}'s closed socket never became a timewait socket in FIN_WAIT2");
        }
        thread::sleep(POLL);
    }
}

fn connect(client: SocketAddr, server: SocketAddr) -> Result<(TcpStream, SocketAddr)> {
    let (socket, client) = bound(client)?;
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
fn bound(client: SocketAddr) -> Result<(Socket, SocketAddr)> {
    let socket = Socket::new(Domain::for_address(client), Type::STREAM, None)?;
    socket
        .bind(&client.into())
        .with_context(|| format!("binding {client}"))?;
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
