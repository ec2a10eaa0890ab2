//! Bad input and unusable environments: one line on stderr, exit 2.

mod common;

use std::{fs, os::unix::fs::PermissionsExt as _, path::PathBuf, process::Command};

use common::{TCPRST, require_root, the_error};

/// Runs tcprst and returns (exit code, stderr), asserting stderr is one line.
fn fails(args: &[&str]) -> (i32, String) {
    check(Command::new(TCPRST).args(args))
}

fn check(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        out.stdout.is_empty(),
        "stdout: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr:?}");
    the_error(&stderr);
    (out.status.code().unwrap(), stderr)
}

/// A copy of tcprst that any user can execute, wherever the checkout
/// lives (a home directory may be closed to others); removed when dropped.
struct BinaryCopy {
    dir: PathBuf,
    bin: PathBuf,
}

impl BinaryCopy {
    fn new(what: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("tcprst-{what}-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let bin = dir.join("tcprst");
        fs::copy(TCPRST, &bin).unwrap();
        Self { dir, bin }
    }
}

impl Drop for BinaryCopy {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn unknown_flag() {
    let (code, err) = fails(&["trace", "--bogus"]);
    assert_eq!(code, 2);
    assert!(err.contains("--bogus"), "{err}");
}

#[test]
fn conflicting_flags() {
    let (code, err) = fails(&["trace", "-4", "-6"]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot be used with"), "{err}");
}

/// --ready-fd takes a descriptor the caller opened for it: not stdio, which
/// a `ready` line would corrupt, and not a number with nothing behind it.
#[test]
fn ready_fd_that_is_stdio_or_not_open() {
    for (fd, refusal) in [
        ("1", "--ready-fd 1: 0, 1 and 2 are stdin, stdout and stderr"),
        ("987", "--ready-fd 987: not an open file descriptor"),
    ] {
        let (code, err) = fails(&["trace", "--ready-fd", fd]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(refusal), "{err}");
    }
}

#[test]
fn bad_address_and_port() {
    let (code, err) = fails(&["trace", "--addr", "10.0.0.300"]);
    assert_eq!(code, 2);
    assert!(err.contains("is not an IP address or CIDR block"), "{err}");
    assert_eq!(fails(&["trace", "--port", "http"]).0, 2);
    assert_eq!(fails(&["trace", "--buffer-pages", "100"]).0, 2);
}

#[test]
fn missing_netns_and_pid() {
    require_root();
    let (code, err) = fails(&["trace", "--netns", "tcprst-no-such-ns"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("no network namespace \"tcprst-no-such-ns\""),
        "{err}"
    );
    let (code, err) = fails(&["trace", "--pid", "999999999"]);
    assert_eq!(code, 2);
    assert!(err.contains("no process with pid 999999999"), "{err}");
}

#[test]
fn garbage_btf() {
    require_root();
    let path = std::env::temp_dir().join(format!("tcprst-bad-btf-{}", std::process::id()));
    fs::write(&path, b"this is not BTF").unwrap();
    let (code, err) = fails(&["trace", "--btf", path.to_str().unwrap()]);
    fs::remove_file(&path).unwrap();
    assert_eq!(code, 2);
    assert!(err.contains("is not a usable BTF file"), "{err}");
}

#[test]
fn unprivileged_user() {
    require_root();
    let copy = BinaryCopy::new("nonroot");
    let bin = &copy.bin;
    let (code, err) = check(
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
            ])
            .arg(bin)
            .arg("trace"),
    );
    assert_eq!(code, 2);
    assert!(err.contains("missing CAP_BPF and CAP_PERFMON"), "{err}");
}

/// No tracefs, and no CAP_SYS_ADMIN to mount it: a private mount namespace
/// with tracefs (and debugfs) unmounted, and the capability dropped.
#[test]
fn tracefs_unmountable() {
    require_root();
    let copy = BinaryCopy::new("notracefs");
    let script = format!(
        "for m in $(awk '$3 == \"tracefs\" || $3 == \"debugfs\" {{print $2}}' /proc/mounts | sort -r); do umount -l \"$m\"; done; \
         exec setpriv --inh-caps=-sys_admin --bounding-set=-sys_admin {} trace",
        copy.bin.display()
    );
    let (code, err) = check(Command::new("unshare").args([
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
    ]));
    assert_eq!(code, 2);
    assert!(
        err.contains("tracefs is not mounted and mounting it at /sys/kernel/tracing failed"),
        "{err}"
    );
}
