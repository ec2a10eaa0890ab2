//! RST storm: nonblocking connects to a closed port. The kernel answers each
//! SYN with a reset (one `tcp_send_reset`) that the connecting socket then
//! receives (one `tcp_receive_reset`); we wait for that error before closing,
//! so every connect counted produced both.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    os::fd::{AsRawFd as _, RawFd},
    time::{Duration, Instant},
};

use socket2::{Domain, SockAddr, Socket, Type};

use crate::{Bounds, Tally, pace::Pacer, tight_timer_slack};

/// Connects in flight per worker: enough to keep the CPU busy while the
/// kernel works through them, few enough that epoll stays cheap.
const WINDOW: usize = 256;
/// How long connects still in flight at the deadline may take to finish.
const DRAIN: Duration = Duration::from_secs(2);

pub(crate) fn worker(target: SocketAddr, bounds: Bounds) -> Tally {
    tight_timer_slack();
    let mut tally = Tally::default();
    let mut epoll = match Epoll::new() {
        Ok(epoll) => epoll,
        Err(e) => {
            tally.error("epoll_create1", &e);
            return tally;
        }
    };
    let target = SockAddr::from(target);
    let pacer = Pacer::new(bounds.per_sec);
    let mut inflight: HashMap<RawFd, Socket> = HashMap::with_capacity(WINDOW);
    loop {
        let now = Instant::now();
        let issuing = now < bounds.deadline && tally.attempts < bounds.max;
        if !issuing && (inflight.is_empty() || now >= bounds.deadline + DRAIN) {
            break;
        }
        if issuing {
            let room = (WINDOW - inflight.len()) as u64;
            let due = pacer.due(tally.attempts, now);
            for _ in 0..due.min(room).min(bounds.max - tally.attempts) {
                start_connect(&target, &epoll, &mut inflight, &mut tally);
            }
        }
        let wake = if issuing {
            pacer.next_at(tally.attempts).unwrap_or(now)
        } else {
            bounds.deadline + DRAIN
        };
        if inflight.is_empty() {
            // Nothing to wait for but the schedule.
            std::thread::sleep(wake.saturating_duration_since(Instant::now()));
            continue;
        }
        let timeout_ms = if wake > Instant::now() { 1 } else { 0 };
        match epoll.ready(timeout_ms) {
            Ok(fds) => {
                for fd in fds {
                    if let Some(sock) = inflight.remove(&fd) {
                        finish_connect(sock, &mut tally);
                    }
                }
            }
            Err(e) => {
                tally.error("epoll_wait", &e);
                break;
            }
        }
    }
    tally.unfinished = inflight.len() as u64;
    tally
}

fn start_connect(
    target: &SockAddr,
    epoll: &Epoll,
    inflight: &mut HashMap<RawFd, Socket>,
    tally: &mut Tally,
) {
    tally.attempts += 1;
    let sock = match Socket::new(Domain::IPV4, Type::STREAM.nonblocking().cloexec(), None) {
        Ok(sock) => sock,
        Err(e) => return tally.error("socket", &e),
    };
    match sock.connect(target) {
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
            if let Err(e) = epoll.add(sock.as_raw_fd()) {
                return tally.error("epoll_ctl", &e);
            }
            inflight.insert(sock.as_raw_fd(), sock);
        }
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => tally.completed += 1,
        Err(e) => tally.error("connect", &e),
        Ok(()) => tally.error(
            "connect",
            &io::Error::other("connected: something listens on the target port"),
        ),
    }
}

/// Closing is implicit: dropping the socket removes it from the epoll set.
fn finish_connect(sock: Socket, tally: &mut Tally) {
    match sock.take_error() {
        Ok(Some(e)) if e.raw_os_error() == Some(libc::ECONNREFUSED) => tally.completed += 1,
        Ok(Some(e)) | Err(e) => tally.error("connect", &e),
        Ok(None) => tally.error(
            "connect",
            &io::Error::other("connected: something listens on the target port"),
        ),
    }
}

/// The few epoll calls we need.
struct Epoll {
    fd: RawFd,
    events: Vec<libc::epoll_event>,
}

impl Epoll {
    fn new() -> io::Result<Self> {
        // SAFETY: takes flags only; the descriptor it returns is ours to close.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            fd,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; WINDOW],
        })
    }

    /// Watches `fd` for the end of its connect: writable, or an error.
    fn add(&self, fd: RawFd) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLOUT | libc::EPOLLERR | libc::EPOLLHUP) as u32,
            u64: fd as u64,
        };
        // SAFETY: `ev` lives across the call, which only reads it.
        if unsafe { libc::epoll_ctl(self.fd, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn ready(&mut self, timeout_ms: i32) -> io::Result<Vec<RawFd>> {
        // SAFETY: the kernel writes at most `events.len()` entries into
        // `events`, which the pointer and length describe.
        let n = unsafe {
            libc::epoll_wait(
                self.fd,
                self.events.as_mut_ptr(),
                self.events.len() as i32,
                timeout_ms,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::Interrupted => Ok(Vec::new()),
                _ => Err(e),
            };
        }
        Ok(self.events[..n as usize]
            .iter()
            .map(|ev| ev.u64 as RawFd)
            .collect())
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: `fd` is the epoll descriptor this value owns, closed once.
        unsafe { libc::close(self.fd) };
    }
}
