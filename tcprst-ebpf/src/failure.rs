//! What a program could not read. Always counted (`counters::TUPLE_FAILURES`,
//! shown in the exit summary and metrics); with `--debug-bpf` also logged
//! through aya-log, naming the hook, the tier, the member or field, and its
//! offset, so a bug report from an unfamiliar kernel says what went wrong.
//! Only failure paths log: the loader leaves `AYA_LOG_LEVEL` at 0 unless
//! asked, and a reset that reads well never reaches this module.

use aya_ebpf::EbpfContext;
use aya_log_ebpf::warn;
use tcprst_common::{AttachTier, ResetHook, counters};

use crate::{kernel::Unread, maps::count};

/// A reset dropped because its connection's ends could not be read. A
/// function of its own (a BPF subprogram): inlined, the log's formatting
/// multiplied every caller's paths past what the verifier explores.
#[inline(never)]
pub fn tuple_unread(ctx: &impl EbpfContext, hook: ResetHook, tier: AttachTier, unread: Unread) {
    count(counters::TUPLE_FAILURES);
    warn!(
        ctx,
        "{} ({}): reading the connection's ends failed at {} (offset {})",
        hook.name(),
        tier.name(),
        unread.what,
        unread.offset
    );
}
