//! Data after close, as a storm: each connection's client closes, and its
//! server writes once it has read the client's FIN, so the client's kernel
//! resets (`TCP_ABORT_ON_DATA`, or from a timewait socket). Every connection
//! counted made exactly two resets, one sent and one received, and the sent
//! one is on a socket that sent its FIN, whose close a tracer should name.
//! Neither end keeps a port afterwards: the reset ends both.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use tcprst_loadgen::scenario::await_reset_after_fin;

use crate::{
    Bounds, DataAfterCloseArgs, Summary, Tally, pace::Pacer, spawn_workers, threads,
    tight_timer_slack,
};

/// No read may block longer than this: a lost FIN ends one connection with
/// an error, not the run.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) fn run(args: &DataAfterCloseArgs) -> Result<Summary> {
    let threads = threads(&args.common);
    let mut summary = spawn_workers(&args.common, threads, |bounds| {
        (worker(args.address, bounds), None)
    })?;
    summary.mode = "data-after-close";
    Ok(summary)
}

/// Connections until the bounds say stop, each against this worker's own
/// listener on `address`, so that what it accepts is the connection it just
/// made.
fn worker(address: IpAddr, bounds: Bounds) -> Tally {
    tight_timer_slack();
    let mut tally = Tally::default();
    let bound = TcpListener::bind((address, 0)).and_then(|l| Ok((l.local_addr()?, l)));
    let listener = match bound {
        Ok(bound) => bound,
        Err(e) => {
            tally.error("bind", &e);
            return tally;
        }
    };
    let pacer = Pacer::new(bounds.per_sec);
    while Instant::now() < bounds.deadline && tally.attempts < bounds.max {
        if let Some(due) = pacer.next_at(tally.attempts) {
            thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        tally.attempts += 1;
        match one_connection(&listener) {
            Ok(()) => tally.completed += 1,
            Err(e) => tally.error("connection", &format!("{e:#}")),
        }
    }
    tally
}

/// connect, accept, the client's close(), the server's read of its FIN and
/// write, and the reset that answers it.
fn one_connection((server, listener): &(SocketAddr, TcpListener)) -> Result<()> {
    let client = TcpStream::connect(server).context("connect")?;
    let (mut accepted, _) = listener.accept().context("accept")?;
    drop(client);
    accepted.set_read_timeout(Some(IO_TIMEOUT))?;
    if accepted.read(&mut [0; 1]).context("read")? != 0 {
        bail!("the server read data, not the client's FIN");
    }
    accepted.write_all(b"x").context("write")?;
    await_reset_after_fin(&accepted)
}
