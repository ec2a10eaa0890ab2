//! Which kernel function decided to reset: the innermost kernel frames each
//! reset record carries, and with `--stack` whole stacks from the `STACKS`
//! map, symbolized with /proc/kallsyms.

use std::{
    collections::{HashMap, HashSet},
    fs,
    io::{BufRead, BufReader},
    str::FromStr,
    sync::Arc,
};

use aya::maps::{MapData, StackTraceMap};
use tcprst_common::CALLER_FRAMES;

use crate::memo::Memo;

use crate::bpf::privileges;

/// Kernel text symbols, sorted by address. A node's kernel has over
/// 120,000 of them: their names share one string and each start is 16
/// bytes, about 5 MiB in all where a string per symbol took 9.
pub struct Kallsyms {
    /// (start address, the name's end in `names`), by address; the name
    /// starts where the one before it in `names` ends.
    starts: Vec<(u64, u32, u32)>,
    names: String,
}

impl Kallsyms {
    /// The kernel's text symbols, or why there are none to name callers
    /// with: an unreadable file, or one showing every address as zero.
    pub fn load() -> Result<Self, String> {
        let file = fs::File::open("/proc/kallsyms")
            .map_err(|e| format!("cannot read /proc/kallsyms: {e}"))?;
        // Line by line: the whole text is 5 MiB more at the peak.
        let syms = Self::read(BufReader::new(file))
            .map_err(|e| format!("cannot read /proc/kallsyms: {e}"))?;
        if syms.starts.is_empty() {
            return Err(why_hidden(
                sysctl("kptr_restrict"),
                sysctl("perf_event_paranoid"),
                privileges::has(privileges::CAP_SYSLOG),
            ));
        }
        Ok(syms)
    }

    pub fn parse(text: &str) -> Self {
        Self::read(text.as_bytes()).expect("reading from memory cannot fail")
    }

    fn read(mut input: impl BufRead) -> std::io::Result<Self> {
        let mut starts = Vec::new();
        let mut names = String::new();
        let mut line = String::new();
        while input.read_line(&mut line)? != 0 {
            let mut parts = line.split_whitespace();
            if let (Some(addr), Some(kind), Some(name)) = (parts.next(), parts.next(), parts.next())
                && let Ok(addr) = u64::from_str_radix(addr, 16)
                && addr != 0
                && matches!(kind, "t" | "T" | "w" | "W")
                && let Ok(end) = u32::try_from(names.len() + name.len())
            {
                starts.push((addr, names.len() as u32, end));
                names.push_str(name);
            }
            line.clear();
        }
        // Stable: of aliases at one address the last listed names it, as before.
        starts.sort_by_key(|(addr, ..)| *addr);
        starts.shrink_to_fit();
        names.shrink_to_fit();
        Ok(Self { starts, names })
    }

    /// Whether the kernel has `function` as a function of its own, under
    /// its name or a compiler's clone of it (`name.isra.0`), not only
    /// inlined into its callers.
    pub fn defines(&self, function: &str) -> bool {
        self.starts
            .iter()
            .filter_map(|(_, from, to)| self.names.get(*from as usize..*to as usize))
            .any(|name| plain(name) == function)
    }

    /// The function containing `addr`.
    pub fn symbol(&self, addr: u64) -> Option<&str> {
        let i = self.starts.partition_point(|(start, ..)| *start <= addr);
        let (_, from, to) = self.starts[i.checked_sub(1)?];
        self.names.get(from as usize..to as usize)
    }
}

fn sysctl<T: FromStr>(name: &str) -> Option<T> {
    fs::read_to_string(format!("/proc/sys/kernel/{name}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Why /proc/kallsyms reads as zeros, by the kernel's rule
/// (kallsyms_show_value, kernel/ksyms_common.c): kptr_restrict 0 shows the
/// addresses to everyone while perf_event_paranoid is 1 or less, otherwise
/// to CAP_SYSLOG holders, and so does kptr_restrict 1; 2 hides them from
/// all. CAP_SYSLOG counts only in the initial user namespace, and only as
/// held when the file was opened.
fn why_hidden(
    kptr_restrict: Option<u32>,
    perf_event_paranoid: Option<i32>,
    syslog: bool,
) -> String {
    let why = match (kptr_restrict, syslog) {
        (Some(n @ 2..), _) => format!("kernel.kptr_restrict={n} hides them even from CAP_SYSLOG"),
        (Some(0), false) => format!(
            "kernel.kptr_restrict=0, kernel.perf_event_paranoid={} and no CAP_SYSLOG",
            perf_event_paranoid.map_or("?".to_owned(), |p| p.to_string())
        ),
        (Some(n), false) => format!("kernel.kptr_restrict={n} and no CAP_SYSLOG"),
        (Some(n), true) => format!(
            "kernel.kptr_restrict={n}, and CAP_SYSLOG counts only in the initial user namespace"
        ),
        (None, _) => "kernel.kptr_restrict unreadable".to_owned(),
    };
    format!("kallsyms addresses hidden ({why})")
}

/// Functions that send or take the reset, and the tracing machinery above
/// them: the caller is the first frame that is neither.
const NOT_CALLERS: [&str; 9] = [
    "tcp_v4_send_reset",
    "tcp_v6_send_reset",
    "tcp_send_active_reset",
    "tcp_reset",
    "tcp_done_with_error",
    "nf_send_reset",
    "nf_send_reset6",
    "trace_call_bpf",
    "bpf_get_stackid",
];

const MACHINERY_PREFIXES: [&str; 5] = ["perf_", "bpf_", "__bpf_", "__traceiter_", "trace_event_"];

/// `__tcp_close` and `tcp_close.cold` are tcp_close to a reader.
fn plain(name: &str) -> &str {
    let name = name.split('.').next().unwrap_or(name);
    name.trim_start_matches('_')
}

/// The first meaningful frame, innermost first.
pub fn caller<'a>(frames: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    frames
        .into_iter()
        .filter(|f| !MACHINERY_PREFIXES.iter().any(|p| f.starts_with(p)))
        .map(plain)
        .find(|f| !NOT_CALLERS.contains(f))
}

/// The functions a reset went through, innermost first, and the one
/// that decided it.
#[derive(Debug, Clone, Default)]
pub(crate) struct KernelPath {
    pub functions: Arc<[Arc<str>]>,
    pub caller: Option<Arc<str>>,
}

/// One symbolized stack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stack {
    pub caller: Option<Arc<str>>,
    /// Innermost first.
    pub frames: Arc<[Arc<str>]>,
}

/// Symbolizes frames, each address once (kernel text is finite), and whole
/// stacks once per id: without BPF_F_REUSE_STACKID an id keeps naming the
/// same stack.
pub(crate) struct Stacks {
    /// Whole stacks, with `--stack`.
    map: Option<StackTraceMap<MapData>>,
    kallsyms: Kallsyms,
    symbols: HashMap<u64, Option<Arc<str>>>,
    /// Paths by a record's frames: a storm repeats a few code paths, and
    /// naming one is a symbol lookup per frame and new strings.
    paths: Memo<[u64; CALLER_FRAMES], KernelPath>,
    whole: HashMap<u32, Stack>,
    /// One `Arc` per caller name, however many paths and stacks name it:
    /// the metrics find a storm's series by the address of its caller.
    callers: HashSet<Arc<str>>,
}

fn interned(callers: &mut HashSet<Arc<str>>, name: &str) -> Arc<str> {
    if let Some(known) = callers.get(name) {
        return known.clone();
    }
    let name: Arc<str> = name.into();
    callers.insert(name.clone());
    name
}

impl Stacks {
    pub fn new(map: Option<StackTraceMap<MapData>>, kallsyms: Kallsyms) -> Self {
        Self {
            map,
            kallsyms,
            symbols: HashMap::new(),
            paths: Memo::new(Self::MAX_PATHS),
            whole: HashMap::new(),
            callers: HashSet::new(),
        }
    }

    /// Frame sets whose paths are kept at most.
    const MAX_PATHS: usize = 4096;

    /// A record's innermost frames (zero past the last), symbolized, and
    /// the caller they name; made once per set of frames.
    pub(crate) fn path(&mut self, frames: &[u64; CALLER_FRAMES]) -> KernelPath {
        let Self {
            paths,
            symbols,
            kallsyms,
            callers,
            ..
        } = self;
        paths.get(frames, || {
            let functions: Arc<[Arc<str>]> = frames
                .iter()
                .take_while(|ip| **ip != 0)
                .filter_map(|ip| {
                    symbols
                        .entry(*ip)
                        .or_insert_with(|| kallsyms.symbol(*ip).map(Arc::from))
                        .clone()
                })
                .collect();
            let caller = caller(functions.iter().map(|f| &**f)).map(|c| interned(callers, c));
            KernelPath { functions, caller }
        })
    }
}

impl Stacks {
    /// A whole stack, taken with `--stack`.
    pub(crate) fn whole(&mut self, stack_id: u32) -> Option<Stack> {
        if let Some(stack) = self.whole.get(&stack_id) {
            return Some(stack.clone());
        }
        let trace = self.map.as_ref()?.get(&stack_id, 0).ok()?;
        let frames: Arc<[Arc<str>]> = trace
            .frames()
            .iter()
            .filter_map(|f| self.kallsyms.symbol(f.ip).map(Arc::from))
            .collect();
        let stack = Stack {
            caller: caller(frames.iter().map(|f| &**f)).map(|c| interned(&mut self.callers, c)),
            frames,
        };
        self.whole.insert(stack_id, stack.clone());
        Some(stack)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KALLSYMS: &str = include_str!("../../testdata/kallsyms-excerpt-6.18.txt");
    /// bpf_get_stackid from tcp:tcp_send_reset for a connect() to a closed
    /// port, as bpftrace symbolized it on this kernel.
    const CLOSED_PORT: &str = include_str!("../../testdata/stack-closed-port-6.18.txt");

    fn names(stack: &str) -> Vec<&str> {
        stack
            .lines()
            .map(|l| l.split('+').next().unwrap())
            .collect()
    }

    #[test]
    fn symbolizes_addresses_inside_functions() {
        let k = Kallsyms::parse(KALLSYMS);
        let (addr, name) = KALLSYMS
            .lines()
            .find_map(|l| {
                let mut p = l.split_whitespace();
                let addr = u64::from_str_radix(p.next()?, 16).ok()?;
                Some((addr, p.nth(1)?.to_owned()))
            })
            .unwrap();
        assert_eq!(k.symbol(addr), Some(name.as_str()));
        assert_eq!(k.symbol(addr + 3), Some(name.as_str()));
        assert!(k.symbol(0x1000).is_none());
    }

    #[test]
    fn says_which_setting_hides_addresses() {
        assert_eq!(
            why_hidden(Some(1), Some(2), false),
            "kallsyms addresses hidden (kernel.kptr_restrict=1 and no CAP_SYSLOG)"
        );
        assert_eq!(
            why_hidden(Some(0), Some(2), false),
            "kallsyms addresses hidden (kernel.kptr_restrict=0, kernel.perf_event_paranoid=2 and no CAP_SYSLOG)"
        );
        assert_eq!(
            why_hidden(Some(2), Some(-1), true),
            "kallsyms addresses hidden (kernel.kptr_restrict=2 hides them even from CAP_SYSLOG)"
        );
        assert_eq!(
            why_hidden(Some(1), Some(2), true),
            "kallsyms addresses hidden (kernel.kptr_restrict=1, and CAP_SYSLOG counts only in the initial user namespace)"
        );
        assert_eq!(
            why_hidden(None, None, false),
            "kallsyms addresses hidden (kernel.kptr_restrict unreadable)"
        );
    }

    /// This kernel keeps tcp_validate_incoming apart and inlined
    /// tcp_rcv_synsent_state_process into tcp_rcv_state_process.
    #[test]
    fn knows_which_functions_stand_apart() {
        let k = Kallsyms::parse(KALLSYMS);
        assert!(k.defines("tcp_validate_incoming"));
        assert!(!k.defines("tcp_rcv_synsent_state_process"));
        assert!(!k.defines("tcp_validate"));
        let clone = Kallsyms::parse("ffffffff82000000 t tcp_validate_incoming.isra.0\n");
        assert!(clone.defines("tcp_validate_incoming"));
    }

    #[test]
    fn hidden_addresses_give_no_symbols() {
        let hidden = "0000000000000000 T tcp_close\n0000000000000000 t __tcp_close\n";
        assert!(Kallsyms::parse(hidden).starts.is_empty());
        let data = "ffffffff82000000 D some_variable\n";
        assert!(Kallsyms::parse(data).starts.is_empty());
    }

    /// A record's frames: addresses inside the excerpt's functions, zero
    /// past the last one taken.
    #[test]
    fn names_the_caller_from_a_records_frames() {
        let k = Kallsyms::parse(KALLSYMS);
        let at = |name: &str| {
            let (start, ..) = k
                .starts
                .iter()
                .find(|(start, ..)| k.symbol(*start) == Some(name))
                .unwrap();
            start + 4
        };
        let mut stacks = Stacks::new(None, Kallsyms::parse(KALLSYMS));
        let mut frames = [0u64; 8];
        for (slot, name) in
            frames
                .iter_mut()
                .zip(["tcp_v4_send_reset", "tcp_v4_rcv", "ip_protocol_deliver_rcu"])
        {
            *slot = at(name);
        }
        let path = stacks.path(&frames);
        assert_eq!(path.functions.len(), 3);
        assert_eq!(path.caller.as_deref(), Some("tcp_v4_rcv"));
        // Named once: the same frames give the same string, and so do
        // other frames with the same caller.
        let again = stacks.path(&frames).caller.unwrap();
        let first = path.caller.unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        frames[2] = 0;
        let shorter = stacks.path(&frames);
        assert_eq!(shorter.functions.len(), 2);
        assert!(Arc::ptr_eq(&first, &shorter.caller.unwrap()));
        assert_eq!(stacks.path(&[0; 8]).caller, None);
        // No whole stacks without --stack.
        assert_eq!(stacks.whole(3), None);
    }

    #[test]
    fn closed_port_reset_comes_from_tcp_v4_rcv() {
        assert_eq!(caller(names(CLOSED_PORT)), Some("tcp_v4_rcv"));
    }

    #[test]
    fn callers_skip_machinery_and_normalise_names() {
        let close = [
            "perf_trace_run_bpf_submit",
            "tcp_send_active_reset",
            "__tcp_close",
            "tcp_close",
        ];
        assert_eq!(caller(close), Some("tcp_close"));
        let linger = ["tcp_send_active_reset", "tcp_disconnect", "__tcp_close"];
        assert_eq!(caller(linger), Some("tcp_disconnect"));
        let keepalive = [
            "tcp_send_active_reset",
            "tcp_keepalive_timer.cold",
            "call_timer_fn",
        ];
        assert_eq!(caller(keepalive), Some("tcp_keepalive_timer"));
        assert_eq!(caller(["tcp_v4_send_reset"]), None);
    }
}
