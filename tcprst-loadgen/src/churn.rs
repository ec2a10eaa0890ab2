//! Connection churn: every client connection runs the whole close sequence
//! against our own server, as clean applications do. The client connects,
//! sends, half-closes with shutdown(SHUT_WR) and reads until the server's
//! FIN; the server accepts, reads to EOF and closes. No resets: what a tracer
//! costs here is its state tracking and syscall hooks.

use std::{
    collections::HashSet,
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::atomic::{AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use socket2::{Domain, SockAddr, Socket, Type};

use crate::{
    Bounds, ChurnArgs, Summary, Tally, pace::Pacer, spawn_workers, threads, tight_timer_slack,
};

/// No read or write may block longer than this: a lost peer ends one
/// connection with an error, not the run.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// The first source address clients bind to with `--sources`.
const FIRST_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 1, 0, 1);

pub(crate) fn run(args: &ChurnArgs) -> Result<Summary> {
    let listener = Socket::new(Domain::for_address(args.server), Type::STREAM, None)?;
    listener.set_reuse_address(true)?;
    listener
        .bind(&args.server.into())
        .with_context(|| format!("binding {}", args.server))?;
    listener.listen(4096)?;
    let listener: TcpListener = listener.into();
    let threads = threads(&args.common);
    let next_source = AtomicU64::new(0);
    let payload = vec![b'x'; args.bytes];

    let (summary, served) = thread::scope(|s| {
        let servers: Vec<_> = (0..threads).map(|_| s.spawn(|| serve(&listener))).collect();
        let summary = spawn_workers(&args.common, threads, |bounds| {
            client(args, &payload, &next_source, bounds)
        });
        // Wakes every accept() with EINVAL: the servers are done.
        // SAFETY: the listener's descriptor is open for this whole scope;
        // shutdown() touches no memory.
        unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
        let served: u64 = servers
            .into_iter()
            .map(|h| h.join().expect("server panicked"))
            .sum();
        (summary, served)
    });
    let mut summary = summary?;
    summary.mode = "churn";
    if served < summary.completed {
        summary.first_error.get_or_insert_with(|| {
            format!(
                "the server served {served} connections, fewer than the {} clients completed",
                summary.completed
            )
        });
    }
    Ok(summary)
}

/// One client thread: whole connections until the bounds say stop.
fn client(
    args: &ChurnArgs,
    payload: &[u8],
    next_source: &AtomicU64,
    bounds: Bounds,
) -> (Tally, Option<Vec<u64>>) {
    tight_timer_slack();
    let mut tally = Tally::default();
    let mut seen = HashSet::new();
    // Paced runs measure what each connection costs when the machine is not
    // saturated; unpaced ones, how many connections it manages.
    let pacer = Pacer::new(bounds.per_sec);
    while Instant::now() < bounds.deadline && tally.attempts < bounds.max {
        if let Some(due) = pacer.next_at(tally.attempts) {
            thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        tally.attempts += 1;
        let source = (args.sources > 0).then(|| {
            let i = next_source.fetch_add(1, Ordering::Relaxed) % u64::from(args.sources);
            Ipv4Addr::from(u32::from(FIRST_SOURCE) + i as u32)
        });
        match one_connection(args.server, source, payload) {
            Ok(local) => {
                tally.completed += 1;
                seen.insert(u64::from(local.ip().to_bits()) << 16 | u64::from(local.port()));
            }
            Err(e) => tally.error("connection", &e),
        }
    }
    (tally, Some(seen.into_iter().collect()))
}

/// connect, send, shutdown(SHUT_WR), read to EOF, close. Returns the
/// client's own address, which names the connection.
fn one_connection(
    server: SocketAddr,
    source: Option<Ipv4Addr>,
    payload: &[u8],
) -> io::Result<SocketAddrV4> {
    let sock = Socket::new(Domain::IPV4, Type::STREAM.cloexec(), None)?;
    sock.set_read_timeout(Some(IO_TIMEOUT))?;
    sock.set_write_timeout(Some(IO_TIMEOUT))?;
    if let Some(source) = source {
        // Let connect() pick the port for the whole 4-tuple, as an unbound
        // client's would be, instead of reserving one at bind().
        set_bind_address_no_port(&sock)?;
        sock.bind(&SockAddr::from(SocketAddrV4::new(source, 0)))?;
    }
    sock.connect(&server.into())?;
    let local = sock
        .local_addr()?
        .as_socket_ipv4()
        .ok_or_else(|| io::Error::other("not an IPv4 socket"))?;
    let mut stream: TcpStream = sock.into();
    stream.write_all(payload)?;
    stream.shutdown(Shutdown::Write)?;
    read_to_eof(&mut stream)?;
    Ok(local)
}

/// One server thread: accept, read to EOF, close, until the listener is shut down.
fn serve(listener: &TcpListener) -> u64 {
    let mut served = 0;
    loop {
        match listener.accept() {
            Ok((mut stream, _)) => {
                let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
                if read_to_eof(&mut stream).is_ok() {
                    served += 1;
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return served,
            // ECONNABORTED and the like end one connection, not the server;
            // EMFILE passes once clients close.
            Err(_) => thread::sleep(Duration::from_millis(1)),
        }
    }
}

fn read_to_eof(stream: &mut TcpStream) -> io::Result<()> {
    let mut buf = [0u8; 4096];
    while stream.read(&mut buf)? > 0 {}
    Ok(())
}

fn set_bind_address_no_port(sock: &Socket) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: the option's value is `on`, an int that lives across the call,
    // and the length given is an int's.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
