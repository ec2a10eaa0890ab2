//! Child processes that die with xtask, Ctrl-C that unwinds through the
//! guards, and small helpers around commands and their output files.

use std::{
    env,
    ffi::OsStr,
    fs::{self, File, OpenOptions},
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Child, Command, ExitStatus},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::sys::proc_state;

/// A child process, killed when dropped if it is still running.
pub(crate) struct Proc {
    pub(crate) child: Child,
    pub(crate) what: &'static str,
}

impl Proc {
    pub(crate) fn spawn(cmd: &mut Command, what: &'static str) -> Result<Self> {
        // If xtask dies outright, its children die with it.
        // SAFETY: the closure runs between fork and exec, and only makes
        // prctl(), which is async-signal-safe and allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            })
        };
        let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        Ok(Self { child, what })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill() touches no memory; the pid is our own unreaped
        // child's, so it cannot name another process.
        unsafe { libc::kill(self.pid() as libc::pid_t, sig) };
    }

    pub(crate) fn exited(&self) -> bool {
        proc_state(self.pid()).is_none_or(|s| s == 'Z')
    }

    /// Waits for the exit, checking for Ctrl-C, for at most `limit`.
    pub(crate) fn wait(&mut self, limit: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            // Ctrl-C reaches our children too: their dying of it is no error of theirs.
            check_interrupted()?;
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{} did not finish within {}s", self.what, limit.as_secs());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits at most `limit` until it has exited but is not reaped yet, so
    /// /proc still has its final CPU times. False if it is still running.
    pub(crate) fn wait_zombie(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while !self.exited() {
            if Instant::now() > deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
        true
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub(crate) static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C and SIGTERM only set a flag: the bench then unwinds through its
/// guards, which stop processes, delete namespaces and restore sysctls.
pub(crate) fn catch_interrupts() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: on_interrupt only stores to an atomic, which is
        // async-signal-safe.
        unsafe { libc::signal(sig, on_interrupt as *const () as libc::sighandler_t) };
    }
}

pub(crate) fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; cleaned up");
    }
    Ok(())
}

pub(crate) fn create(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))
}

pub(crate) fn last_line(path: &Path) -> String {
    fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "no output".into())
}

/// A line tcprst writes to stderr that starts with `what`
/// (`tcprst_common::stderr`), as xtask looks for it.
pub(crate) fn tcprst_line(what: &str) -> String {
    format!("{}{what}", tcprst_common::stderr::PREFIX)
}

pub(crate) fn wait_for_marker(proc: &Proc, log: &Path, marker: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !fs::read_to_string(log).is_ok_and(|s| s.contains(marker)) {
        check_interrupted()?;
        if proc.exited() || Instant::now() > deadline {
            bail!("{} did not start: {}", proc.what, last_line(log));
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

pub(crate) fn cargo(args: &[&str]) -> Result<()> {
    status(cargo_command().args(args))
}

pub(crate) fn cargo_command() -> Command {
    Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

pub(crate) fn status(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

pub(crate) fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn has_command(name: &str) -> bool {
    env::var_os("PATH")
        .is_some_and(|path| env::split_paths(&path).any(|dir| dir.join(name).is_file()))
}

pub(crate) fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// `program` as a command, through sudo only when we are not root already.
pub(crate) fn as_root(program: impl AsRef<OsStr>) -> Command {
    if is_root() {
        Command::new(program)
    } else {
        let mut cmd = Command::new("sudo");
        cmd.arg("-E").arg(program);
        cmd
    }
}

pub(crate) fn host_triple() -> Result<String> {
    let info = output(Command::new("rustc").arg("-vV"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .context("rustc -vV printed no host triple")
}
