//! /proc/self/mountinfo: where a filesystem type is mounted.

use std::path::PathBuf;

/// The mount point of the first mount of `fstype`.
pub fn mount_point(mountinfo: &str, fstype: &str) -> Option<PathBuf> {
    // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != fstype {
            return None;
        }
        let mount_point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(c as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_tracefs_with_escaped_paths() {
        let mountinfo = "22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw\n\
                         42 23 0:13 / /sys/kernel/my\\040tracing rw,relatime - tracefs nodev rw\n";
        assert_eq!(
            mount_point(mountinfo, "tracefs"),
            Some(PathBuf::from("/sys/kernel/my tracing"))
        );
        assert_eq!(mount_point(mountinfo, "cgroup2"), None);
    }

    #[test]
    fn finds_cgroup2_on_hybrid_and_unified_hosts() {
        let hybrid = "35 25 0:30 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                      36 25 0:31 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            mount_point(hybrid, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            mount_point(unified, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }
}
