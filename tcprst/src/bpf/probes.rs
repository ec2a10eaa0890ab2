//! Loads the kernel programs with the running kernel's layouts and attaches
//! them. Dropping `Probes` detaches everything.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Btf, Ebpf, EbpfLoader, Endianness,
    maps::{Array, Map, MapData, PerCpuArray, RingBuf, StackTraceMap},
    programs::{BtfTracePoint, FEntry, KProbe, ProgramFd, RawTracePoint, TracePoint},
};
use aya_log::EbpfLogger;
use tcprst_common::{
    ABSENT, AttachTier, FUNCTION_HOOKS, FunctionArgs, KernelFilter, KernelOffsets, ResetHook,
    Settings, TALLY_MAPS, counters,
    names::{globals, maps, programs},
};

use crate::{
    bpf::attach::{
        AttachRequest, FunctionSite, HookPlan, RESET_FUNCTIONS, ResetFunction, function_args,
        plans_summary, tier_name,
    },
    bpf::btf::{BtfBytes, FUNCTION_TIERS, KernelBtf, VMLINUX},
    bpf::close_notes::{CloseNotes, NoteRings},
    bpf::layout::{ReasonNames, reset_fields},
    bpf::stack_layout::StackLayout,
    bpf::tallies::{Tallies, TallyMaps},
    bpf::tracefs::{INET_SOCK_SET_STATE, TCP_RECEIVE_RESET, TCP_SEND_RESET, Tracefs, Tracepoint},
    errors::one_line,
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcprst"));

const PAGE_SIZE: u32 = 4096;

/// What to load.
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    pub rst_sent: bool,
    pub rst_received: bool,
    pub filter: KernelFilter,
    pub buffer_pages: u32,
    /// `--history`: keep every state change of every socket in the kernel.
    pub history: bool,
    /// `--stack`: keep each reset's whole kernel stack too.
    pub whole_stacks: bool,
    /// `--detail-per-sec`: records per reset key per second; the kernel
    /// only counts the rest. 0: a record for every reset.
    pub detail_per_sec: u32,
    /// `--debug-bpf`: the programs log what they could not read.
    pub debug_bpf: bool,
    /// An explicit BTF file; otherwise the running kernel's.
    pub btf: Option<PathBuf>,
    pub attach: AttachRequest,
    /// Try every tier of every function, not just until one works: what
    /// `doctor` reports. The programs are not meant to run for long then.
    pub probe_every_tier: bool,
}

pub struct Probes {
    ebpf: Ebpf,
    pub reasons: ReasonNames,
    /// (tier, what) of every attached program.
    pub attached: Vec<(&'static str, String)>,
    /// How each reset function is watched; empty when resets sent are not.
    pub plans: Vec<HookPlan>,
    /// What this kernel cannot show, one sentence each.
    pub limitations: Vec<String>,
    /// Whether resets sent without a full socket go unseen (the tracepoint
    /// before 6.10, with no function tier for them).
    pub misses_socketless_resets: bool,
    /// Close marks (who shut down or closed a socket, and its steps since),
    /// or why this kernel cannot keep them.
    pub marks: Result<(), String>,
    /// Whether the reset programs tell softirq context by where their
    /// context lies on the kernel stack, or why two programs run on every
    /// softirq instead (for some reset programs, or all).
    pub softirq_by_stack: Result<(), String>,
    /// How the close-note rings are laid out.
    note_rings: NoteRings,
}

const RAW_TRACEPOINT: &str = "raw_tracepoint";
const SOFTIRQ_ENTRY: &str = "softirq_entry";
const TP_BTF: &str = "tp_btf";
const KPROBE_PMU: &str = "/sys/bus/event_source/devices/kprobe";

impl Probes {
    pub fn load(cfg: &ProbeConfig) -> Result<Self> {
        let tracefs = Tracefs::find_or_mount()?;
        let send_format = tracefs.event_format(TCP_SEND_RESET)?;
        let receive_format = tracefs.event_format(TCP_RECEIVE_RESET)?;
        let send_fields = reset_fields(&send_format).with_context(|| TCP_SEND_RESET.to_string())?;
        let receive_fields =
            reset_fields(&receive_format).with_context(|| TCP_RECEIVE_RESET.to_string())?;
        let mut limitations = Vec::new();
        let mut limit = |what: String| {
            log::warn!("{what}");
            limitations.push(what);
        };
        if send_fields.reason == ABSENT {
            limit(format!(
                "{TCP_SEND_RESET} has no reason field (Linux 6.10+): no reset reasons"
            ));
        }
        if receive_fields.sock_cookie == ABSENT {
            limit(format!(
                "{TCP_RECEIVE_RESET} has no sock_cookie field: no socket cookies"
            ));
        }

        let btf = load_btf(cfg.btf.as_deref())?;
        let mut function_tiers = Ok(());
        let offsets = match &btf {
            Some(btf) => {
                let (offsets, lost) = btf.kernel_offsets()?;
                for feature in lost {
                    if feature == FUNCTION_TIERS {
                        function_tiers =
                            Err(format!("this kernel's BTF lacks what {feature} need"));
                    } else {
                        limit(format!(
                            "this kernel's BTF lacks what {feature} needs: unavailable"
                        ));
                    }
                }
                offsets
            }
            None => {
                function_tiers = Err("no kernel BTF to read function prototypes from".to_owned());
                if cfg.filter.netns != 0 {
                    bail!("--netns needs kernel BTF ({VMLINUX}, or --btf PATH)");
                }
                limit(format!(
                    "no kernel BTF at {VMLINUX}: netns and the state of received resets will be unknown, and only the tracepoint tier can run (pass --btf PATH)"
                ));
                KernelOffsets::UNSET
            }
        };
        let stack_layout = match &btf {
            Some(btf) => StackLayout::of_this_kernel(btf, &offsets),
            None => Err("no kernel BTF".to_owned()),
        };
        let reasons = ReasonNames::load(&send_format, btf.as_ref());
        let functions = if cfg.rst_sent {
            locate_functions(btf.as_ref(), function_tiers)
        } else {
            Vec::new()
        };
        let mut args = [FunctionArgs::UNSET; FUNCTION_HOOKS.len()];
        for (slot, found) in args.iter_mut().zip(&functions) {
            if let Ok(found) = found {
                *slot = found.args;
            }
        }
        // aya needs its own parse, for the loader and for tp_btf and fentry;
        // ours is no longer needed. Handing its memory back first keeps the
        // two parses from adding up in the peak RSS.
        drop(btf);
        // EbpfLoader::new() parses vmlinux's BTF itself, and the attaches
        // after the load need one too, which the loader does not lend out:
        // so its parse goes before ours is made, rather than after.
        let aya_log_level = log_level(cfg.debug_bpf);
        let mut loader = EbpfLoader::new();
        loader.btf(None);
        release_freed_memory();
        let vmlinux = BtfBytes::open(cfg.btf.as_deref().unwrap_or(Path::new(VMLINUX)))
            .map_err(|e| format!("{e:#}"))
            .and_then(|bytes| {
                Btf::parse(&bytes, Endianness::default()).map_err(|e| format!("reading BTF: {e}"))
            });

        let note_rings = if cfg.history {
            NoteRings::UNUSED
        } else {
            NoteRings::for_this_machine()?
        };
        let settings = Settings {
            every_transition: cfg.history.into(),
            send_reset_has_reason: (send_fields.reason != ABSENT).into(),
            whole_stacks: cfg.whole_stacks.into(),
            note_slots_shift: note_rings.slots_shift,
            // A quarter of the buffer: room left while the reader wakes.
            wakeup_bytes: cfg.buffer_pages * PAGE_SIZE / 4,
            // The tally period is a second (`Tallies::PERIOD`).
            detail_per_period: cfg.detail_per_sec,
            task_stack_size: stack_layout.as_ref().map_or(0, |l| l.task_stack_size),
            user_orig_ax: stack_layout.as_ref().map_or(0, |l| l.user_orig_ax),
        };

        raise_memlock_limit();
        let ebpf = loader
            // One parse of the kernel BTF serves the loader and every attach.
            .btf(vmlinux.as_ref().ok())
            .override_global(globals::SEND_RESET_FIELDS, &send_fields, true)
            .override_global(globals::RECEIVE_RESET_FIELDS, &receive_fields, true)
            .override_global(globals::KERNEL_OFFSETS, &offsets, true)
            .override_global(globals::FILTER, &cfg.filter, true)
            .override_global(globals::FUNCTION_ARGS, &args, true)
            .override_global(globals::SETTINGS, &settings, true)
            // 0 turns the programs' failure logs off; they cost nothing then.
            .override_global(globals::AYA_LOG_LEVEL, &aya_log_level, true)
            // Unread unless asked for: one page, not aya-log's 128 KiB.
            .map_max_entries(
                maps::AYA_LOGS,
                if cfg.debug_bpf { 128 * 1024 } else { PAGE_SIZE },
            )
            .map_max_entries(maps::EVENTS, cfg.buffer_pages * PAGE_SIZE)
            // The close-note rings, only written without --history.
            .map_max_entries(maps::CLOSE_NOTES, note_rings.slots())
            .map_max_entries(maps::CLOSE_NOTE_HEADS, note_rings.heads())
            // Whole stacks only with --stack: a full map holds ~2 MB.
            .map_max_entries(maps::STACKS, if cfg.whole_stacks { 2048 } else { 1 })
            .load(OBJECT)
            .context("loading the eBPF object")?;
        drop(loader);

        let mut probes = Self {
            ebpf,
            reasons,
            attached: Vec::new(),
            plans: Vec::new(),
            limitations,
            misses_socketless_resets: false,
            marks: Err("not tried".to_owned()),
            softirq_by_stack: stack_layout.map(drop),
            note_rings,
        };
        // Context tracking first, so the first reset is already attributed.
        if probes.softirq_by_stack.is_err() {
            probes.track_softirqs()?;
        }
        // Marks before the reset programs that read them.
        probes.marks = probes
            .attach_btf_tracepoint(programs::CLOSE_MARK, INET_SOCK_SET_STATE, &vmlinux)
            .map_err(|why| {
                format!("who shut down or closed a socket, and when, is unknown: {why}")
            });
        if let Err(why) = &probes.marks {
            log::warn!("{why}");
            probes.limitations.push(why.clone());
        }
        if cfg.rst_sent {
            probes.attach_reset_functions(
                cfg,
                &functions,
                send_fields.reason == ABSENT,
                &vmlinux,
            )?;
        }
        if cfg.rst_received {
            probes.attach_reset_tracepoint(
                (programs::RST_RECV_BTF, programs::RST_RECV),
                TCP_RECEIVE_RESET,
                &vmlinux,
            )?;
        }
        // The parse is 20 MiB that tracing never reads again.
        drop(vmlinux);
        release_freed_memory();
        Ok(probes)
    }

    /// Attaches the softirq-flag programs, for reset programs that cannot
    /// tell softirq by where their context lies.
    fn track_softirqs(&mut self) -> Result<()> {
        if self.attached.iter().any(|(_, what)| what == SOFTIRQ_ENTRY) {
            return Ok(());
        }
        if let Err(why) = &self.softirq_by_stack {
            log::info!("softirq context from programs on every softirq: {why}");
        }
        self.attach_raw(programs::SIRQ_IN, SOFTIRQ_ENTRY)?;
        self.attach_raw(programs::SIRQ_OUT, "softirq_exit")
    }

    fn attach_tracepoint(&mut self, program: &str, tp: Tracepoint) -> Result<()> {
        // A classic tracepoint's context is a per-CPU buffer, off the stack.
        if self.softirq_by_stack.is_ok() {
            self.softirq_by_stack = Err(format!(
                "a classic tracepoint program ({tp}) has no context on the kernel stack"
            ));
        }
        self.track_softirqs()?;
        let prog: &mut TracePoint = self
            .ebpf
            .program_mut(program)
            .ok_or_else(|| anyhow!("program {program} missing from the object"))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("loading {program} for {tp}"))?;
        prog.attach(tp.category, tp.name)
            .with_context(|| format!("attaching to tracepoint {tp}"))?;
        self.attached
            .push((tier_name(AttachTier::Tracepoint), tp.to_string()));
        Ok(())
    }

    /// Attaches `program` to `tp` as tp_btf, which may read socket storage.
    fn attach_btf_tracepoint(
        &mut self,
        program: &str,
        tp: Tracepoint,
        vmlinux: &Result<Btf, String>,
    ) -> Result<(), String> {
        let btf = vmlinux.as_ref().map_err(Clone::clone)?;
        let prog: &mut BtfTracePoint = self
            .ebpf
            .program_mut(program)
            .ok_or_else(|| format!("program {program} missing from the object"))?
            .try_into()
            .map_err(|e| format!("{e}"))?;
        prog.load(tp.name, btf)
            .map_err(|e| format!("tp_btf {tp} did not load: {}", verifier_summary(&e)))?;
        prog.attach()
            .map_err(|e| format!("tp_btf {tp} did not attach: {}", one_line(&e)))?;
        self.attached.push((TP_BTF, tp.to_string()));
        Ok(())
    }

    /// A reset tracepoint: its tp_btf program, which adds close marks, where
    /// marks work; the classic program otherwise.
    fn attach_reset_tracepoint(
        &mut self,
        (btf_program, program): (&str, &str),
        tp: Tracepoint,
        vmlinux: &Result<Btf, String>,
    ) -> Result<()> {
        if self.marks.is_ok() {
            match self.attach_btf_tracepoint(btf_program, tp, vmlinux) {
                Ok(()) => return Ok(()),
                Err(why) => {
                    let note = format!("resets on {tp} carry no close marks: {why}");
                    log::warn!("{note}");
                    self.limitations.push(note);
                }
            }
        }
        self.attach_tracepoint(program, tp)
    }

    /// Runs the attach plan of every reset-sending function, then attaches
    /// `tcp:tcp_send_reset` for those left to it, telling its program which
    /// functions report for themselves.
    fn attach_reset_functions(
        &mut self,
        cfg: &ProbeConfig,
        functions: &[Result<LocatedFunction, String>],
        pre_6_10_tracepoint: bool,
        vmlinux: &Result<Btf, String>,
    ) -> Result<()> {
        for (f, located) in RESET_FUNCTIONS.iter().zip(functions) {
            let mut plan = HookPlan {
                function: f,
                tier: None,
                passed_over: Vec::new(),
                also_works: Vec::new(),
            };
            for tier in cfg.attach.candidates(f) {
                let outcome = match (tier, located) {
                    (AttachTier::Tracepoint, _) => Ok(()),
                    (_, Err(why)) => Err(why.clone()),
                    (AttachTier::Fentry, Ok(located)) => self.attach_fentry(f, located, vmlinux),
                    (AttachTier::Kprobe, Ok(_)) => self.attach_kprobe(f),
                };
                match outcome {
                    Ok(()) if plan.tier.is_some() => plan.also_works.push(tier),
                    Ok(()) => plan.tier = Some(tier),
                    Err(why) if plan.tier.is_none() => plan.passed_over.push((tier, why)),
                    Err(why) => log::debug!("{}: {}: {why}", f.function, tier_name(tier)),
                }
                if plan.tier.is_some() && !cfg.probe_every_tier {
                    break;
                }
            }
            self.plans.push(plan);
        }
        let traced = self
            .plans
            .iter()
            .any(|p| p.function.has_tracepoint && p.tier.is_some());
        // Each hook's line is a detail (-v, and doctor's report), unless
        // none could be attached: then those lines are the error's why.
        let level = if traced {
            log::Level::Debug
        } else {
            log::Level::Info
        };
        for plan in &self.plans {
            log::log!(
                level,
                "{}{}: {plan}",
                tcprst_common::stderr::HOOK,
                plan.function.function
            );
        }
        let by_function = |tier: &Option<AttachTier>| {
            matches!(tier, Some(AttachTier::Fentry | AttachTier::Kprobe))
        };
        let covered = self
            .plans
            .iter()
            .filter(|p| p.function.has_tracepoint && by_function(&p.tier))
            .fold(0, |bits, p| bits | p.function.hook.covered_bit());
        let mut covered_map: Array<MapData, u32> = self.take(maps::TRACEPOINT_COVERED)?;
        covered_map
            .set(0, covered, 0)
            .with_context(|| format!("writing {}", maps::TRACEPOINT_COVERED))?;
        let tracepoint = Some(AttachTier::Tracepoint);
        if self
            .plans
            .iter()
            .any(|p| p.tier == tracepoint || p.also_works.contains(&AttachTier::Tracepoint))
        {
            self.attach_reset_tracepoint(
                (programs::RST_SENT_BTF, programs::RST_SENT),
                TCP_SEND_RESET,
                vmlinux,
            )?;
        }
        if traced && !cfg.probe_every_tier {
            log::info!("{}", plans_summary(&self.plans));
        }
        self.note_plan_limitations(pre_6_10_tracepoint);
        if !traced {
            bail!("no hook for the resets TCP sends could be attached (see the hook lines above)");
        }
        Ok(())
    }

    fn note_plan_limitations(&mut self, pre_6_10_tracepoint: bool) {
        let tier_of = |hook: ResetHook| {
            self.plans
                .iter()
                .find(|p| p.function.hook == hook)
                .and_then(|p| p.tier)
        };
        let mut notes = Vec::new();
        let replies = [ResetHook::V4SendReset, ResetHook::V6SendReset];
        let misses_socketless = pre_6_10_tracepoint
            && replies
                .iter()
                .any(|h| tier_of(*h) == Some(AttachTier::Tracepoint));
        if misses_socketless {
            notes.push((log::Level::Warn, format!(
                "resets sent without a full socket (closed ports, TIME_WAIT) are invisible: before Linux 6.10 {TCP_SEND_RESET} skips them, and no kprobe or fentry tier attached"
            )));
        }
        let netfilter = [ResetHook::NfSendReset, ResetHook::NfSendReset6];
        if netfilter.iter().any(|h| tier_of(*h).is_none()) {
            // The hooks' summary line says so already.
            notes.push((log::Level::Debug, "netfilter REJECT resets are not seen where they are sent; a received reset no local socket sent is marked as such".to_owned()));
        }
        for (level, note) in notes {
            log::log!(level, "{note}");
            self.limitations.push(note);
        }
        self.misses_socketless_resets = misses_socketless;
    }

    fn attach_kprobe(&mut self, f: &ResetFunction) -> Result<(), String> {
        let prog: &mut KProbe = self
            .ebpf
            .program_mut(f.kprobe_program)
            .ok_or("its kprobe program is missing from the object")?
            .try_into()
            .map_err(|e| format!("{e}"))?;
        prog.load()
            .map_err(|e| format!("the verifier rejected it: {}", verifier_summary(&e)))?;
        if !Path::new(KPROBE_PMU).exists() {
            return Err(
                "loads and verifies, but this kernel has no kprobes (CONFIG_KPROBES is off)".into(),
            );
        }
        prog.attach(f.function, 0)
            .map_err(|e| format!("loads and verifies, but attaching failed: {}", one_line(&e)))?;
        self.attached
            .push((tier_name(AttachTier::Kprobe), f.function.to_owned()));
        Ok(())
    }

    fn attach_fentry(
        &mut self,
        f: &ResetFunction,
        located: &LocatedFunction,
        vmlinux: &Result<Btf, String>,
    ) -> Result<(), String> {
        if let Some(module) = &located.module {
            return Err(format!(
                "it is in module {module}, and this loader cannot attach fentry to module BTF"
            ));
        }
        let btf = vmlinux.as_ref().map_err(Clone::clone)?;
        let prog: &mut FEntry = self
            .ebpf
            .program_mut(f.fentry_program)
            .ok_or("its fentry program is missing from the object")?
            .try_into()
            .map_err(|e| format!("{e}"))?;
        prog.load(f.function, btf).map_err(|e| {
            let why = verifier_summary(&e);
            if why.contains("Operation not permitted") {
                format!("the kernel refused to load it ({why}; kernel lockdown?)")
            } else {
                format!("loading failed: {why}")
            }
        })?;
        prog.attach()
            .map_err(|e| format!("attaching failed: {}", one_line(&e)))?;
        self.attached
            .push((tier_name(AttachTier::Fentry), f.function.to_owned()));
        Ok(())
    }

    fn attach_raw(&mut self, program: &str, tp: &str) -> Result<()> {
        let prog: &mut RawTracePoint = self
            .ebpf
            .program_mut(program)
            .ok_or_else(|| anyhow!("program {program} missing from the object"))?
            .try_into()?;
        prog.load().with_context(|| format!("loading {program}"))?;
        prog.attach(tp)
            .with_context(|| format!("attaching to raw tracepoint {tp}"))?;
        self.attached.push((RAW_TRACEPOINT, tp.to_owned()));
        Ok(())
    }

    /// Attached programs per attach tier, for the metrics.
    pub fn attached_by_tier(&self) -> Vec<(&'static str, usize)> {
        [
            RAW_TRACEPOINT,
            TP_BTF,
            tier_name(AttachTier::Tracepoint),
            tier_name(AttachTier::Kprobe),
            tier_name(AttachTier::Fentry),
        ]
        .into_iter()
        .map(|tier| (tier, self.attached.iter().filter(|a| a.0 == tier).count()))
        .collect()
    }

    /// Takes a map out of the object, typed, for userspace to own.
    fn take<T>(&mut self, name: &str) -> Result<T>
    where
        T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self
            .ebpf
            .take_map(name)
            .ok_or_else(|| anyhow!("{name} map missing from the object"))?;
        Ok(T::try_from(map)?)
    }

    pub fn take_ring(&mut self) -> Result<RingBuf<MapData>> {
        self.take(maps::EVENTS)
    }

    pub fn take_stacks(&mut self) -> Result<StackTraceMap<MapData>> {
        self.take(maps::STACKS)
    }

    /// The programs' counters, and a descriptor of each loaded program
    /// for the runs the kernel skipped: taken once every program is loaded.
    pub fn take_counters(&mut self) -> Result<Counters> {
        let programs = self
            .ebpf
            .programs()
            .filter_map(|(_, program)| program.fd().ok())
            .map(ProgramFd::try_clone)
            .collect::<Result<_, _>>()
            .context("keeping the programs' descriptors")?;
        Ok(Counters {
            counts: self.take(maps::COUNTERS)?,
            programs,
        })
    }

    /// The reader of the programs' failure logs, with `--debug-bpf`.
    pub fn take_logger(&mut self) -> Result<EbpfLogger<&'static dyn log::Log>> {
        EbpfLogger::init(&mut self.ebpf).context("reading the programs' logs (--debug-bpf)")
    }

    pub fn take_tallies(&mut self) -> Result<Tallies> {
        let [a, b] = TALLY_MAPS.map(|(budgets, counts)| {
            Ok::<_, anyhow::Error>(TallyMaps {
                budgets: self.take(budgets)?,
                counts: self.take(counts)?,
            })
        });
        Ok(Tallies::new([a?, b?], self.take(maps::TALLY_TURN)?))
    }

    /// The close-note rings the programs write by default, mapped; None
    /// where marks are unavailable.
    pub fn take_close_notes(&mut self) -> Result<Option<CloseNotes>> {
        if self.marks.is_err() {
            return Ok(None);
        }
        let mut array = |name: &str| match self.ebpf.take_map(name) {
            Some(Map::Array(data)) => Ok(data),
            _ => Err(anyhow!("{name} array missing from the object")),
        };
        let notes = array(maps::CLOSE_NOTES)?;
        let heads = array(maps::CLOSE_NOTE_HEADS)?;
        CloseNotes::new(notes, heads, self.note_rings).map(Some)
    }

    /// The close-mark map the programs keep with `--history`, which
    /// sock_diag dumps beside each socket; None where marks are unavailable.
    pub fn take_marks(&mut self) -> Option<MapData> {
        self.marks.as_ref().ok()?;
        match self.ebpf.take_map(maps::MARKS)? {
            Map::SkStorage(data) => Some(data),
            _ => None,
        }
    }
}

/// A reset function found in this kernel, with its argument positions.
struct LocatedFunction {
    module: Option<String>,
    args: FunctionArgs,
}

/// Where each of `RESET_FUNCTIONS` is and how to read its arguments, or why
/// no function tier can serve it.
fn locate_functions(
    btf: Option<&KernelBtf>,
    function_tiers: Result<(), String>,
) -> Vec<Result<LocatedFunction, String>> {
    let kallsyms = std::fs::read_to_string("/proc/kallsyms").unwrap_or_default();
    RESET_FUNCTIONS
        .iter()
        .map(|f| {
            function_tiers.clone()?;
            let btf = btf.ok_or("no kernel BTF")?;
            let module = match FunctionSite::find(&kallsyms, f.function) {
                FunctionSite::Missing if f.has_tracepoint => {
                    return Err(format!("{} is not in this kernel", f.function));
                }
                FunctionSite::Missing => {
                    return Err(format!(
                        "{} is not in this kernel (nf_reject_ipv4/6 load with the first reject rule; restart tcprst after adding one)",
                        f.function
                    ));
                }
                FunctionSite::Vmlinux => None,
                FunctionSite::Module(module) => Some(module),
            };
            let params = match &module {
                None => btf.function_params(f.function),
                Some(module) => {
                    let path = Path::new(MODULE_BTF_DIR).join(module);
                    btf.module(&path)
                        .and_then(|m| m.function_params(f.function))
                }
            }
            .map_err(|e| format!("no prototype in BTF: {e}"))?;
            let args = function_args(f.hook, &params).ok_or_else(|| {
                format!("unexpected prototype {}({})", f.function, params.join(", "))
            })?;
            Ok(LocatedFunction { module, args })
        })
        .collect()
}

const MODULE_BTF_DIR: &str = "/sys/kernel/btf";

/// A load failure in one line: the errno, and the verifier's last word
/// (the line that says what it refused), with the whole log at trace level
/// (-vv): it can run to thousands of lines.
fn verifier_summary(e: &aya::programs::ProgramError) -> String {
    if let aya::programs::ProgramError::LoadError {
        io_error,
        verifier_log,
    } = e
    {
        let log = verifier_log.to_string();
        log::trace!("verifier log:\n{log}");
        let refusal = log
            .lines()
            .rev()
            .find(|l| {
                let l = l.trim();
                !l.is_empty()
                    && !l.starts_with("verification time")
                    && !l.starts_with("stack depth")
                    && !l.starts_with("processed ")
            })
            .map(str::trim);
        return match refusal {
            Some(refusal) => format!("{io_error}: {refusal}"),
            None => io_error.to_string(),
        };
    }
    one_line(e)
}

/// Returns freed heap pages to the kernel, so a large structure just
/// dropped does not stay in RSS (glibc keeps them otherwise; musl's
/// allocator unmaps them itself).
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn load_btf(explicit: Option<&Path>) -> Result<Option<KernelBtf>> {
    match explicit {
        Some(path) => KernelBtf::from_file(path).map(Some),
        None if Path::new(VMLINUX).exists() => KernelBtf::from_file(Path::new(VMLINUX)).map(Some),
        None => Ok(None),
    }
}

/// aya-log's level for the programs: all of their (failure) logs with
/// `--debug-bpf`, none otherwise.
fn log_level(debug_bpf: bool) -> u8 {
    if debug_bpf {
        aya_log::Level::Trace as u8
    } else {
        0
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit only reads `unlimited`, which outlives the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        log::debug!(
            "could not lift RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// What the programs could not do, counted per CPU by the programs
/// themselves, and by the kernel for runs it skipped.
pub struct Counters {
    counts: PerCpuArray<MapData, u64>,
    programs: Vec<ProgramFd>,
}

impl Counters {
    fn total(&self, counter: u32) -> Result<u64> {
        Ok(self.counts.get(&counter, 0)?.iter().sum())
    }

    /// Records that found the ring buffer full.
    pub fn lost(&self) -> Result<u64> {
        self.total(counters::LOST_RECORDS)
    }

    /// Resets whose caller frames the kernel could not unwind.
    pub fn stack_failures(&self) -> Result<u64> {
        self.total(counters::STACK_FAILURES)
    }

    /// Resets past their key's budget that still got their own record
    /// because the tally map was full.
    pub fn tally_full(&self) -> Result<u64> {
        self.total(counters::TALLY_FULL)
    }

    /// Resets dropped because their connection's ends could not be read.
    pub fn tuple_failures(&self) -> Result<u64> {
        self.total(counters::TUPLE_FAILURES)
    }

    /// Runs of our programs the kernel skipped, each a reset or a state
    /// change no record or tally has: a tracing program does not run while
    /// another (kprobe and tracepoint tiers) or the same one (tp_btf,
    /// raw_tp, fentry) is running on that CPU, as when a softirq's reset
    /// interrupts a program in process context. The kernel counts these as
    /// `recursion_misses` in each program's fdinfo, since 5.12; an older
    /// kernel reads 0.
    pub fn skipped_runs(&self) -> Result<u64> {
        let mut total = 0;
        for program in &self.programs {
            let path = format!("/proc/self/fdinfo/{}", program.as_fd().as_raw_fd());
            let info = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
            total += recursion_misses(&info);
        }
        Ok(total)
    }
}

/// The `recursion_misses:` count of a BPF program's fdinfo; 0 without one.
fn recursion_misses(fdinfo: &str) -> u64 {
    fdinfo
        .lines()
        .find_map(|line| line.strip_prefix("recursion_misses:"))
        .and_then(|count| count.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use object::{Object as _, ObjectSymbol as _};

    use super::*;

    /// Programs, maps and globals are looked up by name only when the
    /// object loads, as root: a renamed one would fail there, or (a
    /// fallback program) quietly never attach. Checked here on the object
    /// this binary embeds, as aya's parser reads it.
    #[test]
    fn every_name_the_loader_looks_up_is_in_the_object() {
        let object = aya_obj::Object::parse(OBJECT).expect("aya parses the embedded object");
        let missing = |names: &[&str], found: &dyn Fn(&str) -> bool| -> Vec<String> {
            names
                .iter()
                .filter(|name| !found(name))
                .map(|name| (*name).to_owned())
                .collect()
        };
        let programs = missing(programs::ALL, &|n| object.programs.contains_key(n));
        assert!(
            programs.is_empty(),
            "programs not in the object: {programs:?}"
        );
        let maps = missing(maps::ALL, &|n| object.maps.contains_key(n));
        assert!(maps.is_empty(), "maps not in the object: {maps:?}");
        // override_global finds a global by its ELF symbol; aya keeps its
        // symbol table to itself.
        let elf = object::File::parse(OBJECT).expect("the embedded object is ELF");
        let symbols: BTreeSet<&str> = elf.symbols().filter_map(|s| s.name().ok()).collect();
        let globals = missing(globals::ALL, &|n| symbols.contains(n));
        assert!(globals.is_empty(), "globals not in the object: {globals:?}");
    }

    #[test]
    fn skipped_runs_are_read_from_a_programs_fdinfo() {
        // A 6.18 tp_btf program's fdinfo, with bpf_stats on.
        let fdinfo = "pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t2075\nprog_type:\t26\n\
            prog_jited:\t1\nprog_tag:\t8dd6b3a7bc9b4a8e\nmemlock:\t4096\nprog_id:\t91\n\
            run_time_ns:\t1240\nrun_cnt:\t3\nrecursion_misses:\t17\nverified_insns:\t520211\n";
        assert_eq!(recursion_misses(fdinfo), 17);
        // 5.10 has no such line: nothing counted there.
        assert_eq!(recursion_misses("prog_type:\t5\nprog_id:\t7\n"), 0);
    }
}
