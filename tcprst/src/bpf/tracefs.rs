//! tracefs: where it is, mounting it when it is not, and parsing the
//! `events/<category>/<name>/format` files that give the running kernel's
//! tracepoint record layouts.

use std::{
    collections::BTreeMap,
    ffi::CString,
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::mountinfo::mount_point;

const DEFAULT_MOUNT: &str = "/sys/kernel/tracing";
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

/// A mounted tracefs.
#[derive(Debug, Clone)]
pub(crate) struct Tracefs {
    root: PathBuf,
}

impl Tracefs {
    /// Finds tracefs in /proc/self/mountinfo, or under debugfs, and mounts it
    /// at /sys/kernel/tracing when neither has it.
    pub(crate) fn find_or_mount() -> Result<Self> {
        let mountinfo =
            fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
        if let Some(root) = mount_point(&mountinfo, "tracefs") {
            return Ok(Self { root });
        }
        if Path::new(DEBUGFS_TRACING).join("events").is_dir() {
            return Ok(Self {
                root: DEBUGFS_TRACING.into(),
            });
        }
        mount_tracefs(Path::new(DEFAULT_MOUNT))?;
        log::info!("mounted tracefs at {DEFAULT_MOUNT}");
        Ok(Self {
            root: DEFAULT_MOUNT.into(),
        })
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    #[cfg(test)]
    pub(crate) fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Reads and parses a tracepoint's format; a missing tracepoint is an
    /// error that names it and the kernel version that added it.
    pub(crate) fn event_format(&self, tp: Tracepoint) -> Result<EventFormat> {
        let path = self
            .root
            .join("events")
            .join(tp.category)
            .join(tp.name)
            .join("format");
        match fs::read_to_string(&path) {
            Ok(text) => {
                EventFormat::parse(&text).with_context(|| format!("parsing {}", path.display()))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => bail!(
                "tracepoint {tp} is missing from this kernel (it was added in Linux {})",
                tp.since
            ),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
}

fn mount_tracefs(at: &Path) -> Result<()> {
    let target = CString::new(at.as_os_str().as_encoded_bytes())?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the
    // call (`target` is owned above; the rest are literals), and tracefs
    // takes no data.
    let ret = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret != 0 {
        let err = std::io::Error::last_os_error();
        bail!(
            "tracefs is not mounted and mounting it at {} failed: {err} (needs CAP_SYS_ADMIN, or mount it yourself: mount -t tracefs nodev {})",
            at.display(),
            at.display()
        );
    }
    Ok(())
}

/// A tracepoint tcprst uses, with the first kernel that has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tracepoint {
    pub category: &'static str,
    pub name: &'static str,
    pub since: &'static str,
}

impl std::fmt::Display for Tracepoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.category, self.name)
    }
}

pub(crate) const TCP_SEND_RESET: Tracepoint = Tracepoint {
    category: "tcp",
    name: "tcp_send_reset",
    since: "4.15",
};
pub(crate) const TCP_RECEIVE_RESET: Tracepoint = Tracepoint {
    category: "tcp",
    name: "tcp_receive_reset",
    since: "4.15",
};

pub(crate) const INET_SOCK_SET_STATE: Tracepoint = Tracepoint {
    category: "sock",
    name: "inet_sock_set_state",
    since: "4.16",
};
/// One `field:` line of a format file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
}

/// A parsed tracepoint format file.
#[derive(Debug, Clone, Default)]
pub struct EventFormat {
    pub fields: BTreeMap<String, Field>,
    pub print_fmt: String,
}

impl EventFormat {
    pub fn parse(text: &str) -> Result<Self> {
        let mut format = Self::default();
        for line in text.lines() {
            let line = line.trim();
            if let Some(fmt) = line.strip_prefix("print fmt:") {
                format.print_fmt = fmt.trim().to_owned();
            } else if line.starts_with("field:") {
                let (name, field) =
                    parse_field(line).with_context(|| format!("bad field line {line:?}"))?;
                format.fields.insert(name, field);
            }
        }
        if format.fields.is_empty() {
            bail!("no fields");
        }
        Ok(format)
    }

    pub(crate) fn field(&self, name: &str) -> Option<&Field> {
        self.fields.get(name)
    }

    /// The `{ value, "NAME" }` pairs of `__print_symbolic(REC-><field>, …)`.
    /// Entries whose value the kernel left as an unresolved symbol are skipped.
    pub fn symbolic_values(&self, field: &str) -> BTreeMap<u64, String> {
        let marker = format!("__print_symbolic(REC->{field},");
        let Some(start) = self.print_fmt.find(&marker) else {
            return BTreeMap::new();
        };
        let mut rest = &self.print_fmt[start + marker.len()..];
        let mut values = BTreeMap::new();
        loop {
            rest = rest.trim_start_matches([' ', ',']);
            let Some(body) = rest.strip_prefix('{') else {
                break;
            };
            let Some(end) = body.find('}') else {
                break;
            };
            if let Some((value, name)) = body[..end].split_once(',') {
                let name = name.trim().trim_matches('"');
                if let Some(value) = parse_c_integer(value.trim()) {
                    values.insert(value, name.to_owned());
                }
            }
            rest = &body[end + 1..];
        }
        values
    }
}

fn parse_field(line: &str) -> Result<(String, Field)> {
    // field:__u8 saddr[28];	offset:32;	size:28;	signed:0;
    let mut decl = None;
    let mut offset = None;
    let mut size = None;
    for part in line.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = part
            .split_once(':')
            .ok_or_else(|| anyhow!("no ':' in {part:?}"))?;
        match key {
            "field" => decl = Some(value),
            "offset" => offset = Some(value.parse()?),
            "size" => size = Some(value.parse()?),
            _ => {}
        }
    }
    let decl = decl.ok_or_else(|| anyhow!("no declaration"))?;
    let name = decl
        .rsplit([' ', '*'])
        .next()
        .and_then(|last| last.split('[').next())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| anyhow!("no field name in {decl:?}"))?;
    Ok((
        name.to_owned(),
        Field {
            offset: offset.ok_or_else(|| anyhow!("no offset"))?,
            size: size.ok_or_else(|| anyhow!("no size"))?,
        },
    ))
}

fn parse_c_integer(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEND_6_18: &str = include_str!("../../testdata/format-6.18/tcp_send_reset");
    const RECEIVE_6_18: &str = include_str!("../../testdata/format-6.18/tcp_receive_reset");
    const SEND_5_X: &str = include_str!("../../testdata/format-5.x/tcp_send_reset");

    #[test]
    fn parses_fields_of_a_real_format() {
        let f = EventFormat::parse(SEND_6_18).unwrap();
        assert_eq!(
            f.field("skaddr"),
            Some(&Field {
                offset: 16,
                size: 8
            })
        );
        assert_eq!(
            f.field("reason"),
            Some(&Field {
                offset: 28,
                size: 4
            })
        );
        assert_eq!(
            f.field("saddr"),
            Some(&Field {
                offset: 32,
                size: 28
            })
        );
        assert_eq!(
            f.field("daddr"),
            Some(&Field {
                offset: 60,
                size: 28
            })
        );
        assert_eq!(f.field("common_pid"), Some(&Field { offset: 4, size: 4 }));
        assert!(f.field("sport").is_none());
    }

    #[test]
    fn reads_reset_reason_names_from_print_fmt() {
        let f = EventFormat::parse(SEND_6_18).unwrap();
        let reasons = f.symbolic_values("reason");
        assert_eq!(reasons.get(&0).map(String::as_str), Some("NOT_SPECIFIED"));
        assert_eq!(reasons.get(&1).map(String::as_str), Some("NO_SOCKET"));
        assert_eq!(
            reasons.get(&11).map(String::as_str),
            Some("TCP_ABORT_ON_CLOSE")
        );
        assert_eq!(reasons.get(&25).map(String::as_str), Some("MAX"));
        assert_eq!(reasons.len(), 26);
    }

    #[test]
    fn skips_unresolved_symbols() {
        // State values print as TCP_ESTABLISHED, not numbers, on this kernel.
        let f = EventFormat::parse(SEND_6_18).unwrap();
        assert!(f.symbolic_values("state").is_empty());
        assert!(f.symbolic_values("no_such_field").is_empty());
    }

    #[test]
    fn parses_split_tuple_formats() {
        let old = EventFormat::parse(SEND_5_X).unwrap();
        assert_eq!(
            old.field("sport"),
            Some(&Field {
                offset: 28,
                size: 2
            })
        );
        assert_eq!(
            old.field("saddr_v6"),
            Some(&Field {
                offset: 42,
                size: 16
            })
        );
        assert!(old.field("reason").is_none());
        let recv = EventFormat::parse(RECEIVE_6_18).unwrap();
        assert_eq!(
            recv.field("sock_cookie"),
            Some(&Field {
                offset: 64,
                size: 8
            })
        );
        assert_eq!(
            recv.field("family"),
            Some(&Field {
                offset: 20,
                size: 2
            })
        );
    }

    #[test]
    fn rejects_a_file_without_fields() {
        assert!(EventFormat::parse("name: x\nID: 1\nprint fmt: \"\"\n").is_err());
        assert!(EventFormat::parse("field:int x;\toffset:zz;\tsize:4;").is_err());
    }

    #[test]
    fn names_a_missing_tracepoint_and_its_kernel_version() {
        let empty =
            std::env::temp_dir().join(format!("tcprst-empty-tracefs-{}", std::process::id()));
        fs::create_dir_all(&empty).unwrap();
        let err = Tracefs::at(&empty)
            .event_format(TCP_RECEIVE_RESET)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "tracepoint tcp:tcp_receive_reset is missing from this kernel (it was added in Linux 4.15)"
        );
        fs::remove_dir_all(&empty).unwrap();
    }
}
