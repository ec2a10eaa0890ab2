//! Reading tracepoint records at offsets taken from tracefs format files.

use aya_ebpf::programs::TracePointContext;
use tcprst_common::{ABSENT, AF_INET, Tuple, TupleFields, tuple_style};

use crate::kernel::copy_v4;

#[inline(always)]
pub fn field<T>(ctx: &TracePointContext, offset: u32) -> Option<T> {
    if offset == ABSENT {
        return None;
    }
    unsafe { ctx.read_at::<T>(offset as usize).ok() }
}

#[inline(always)]
pub fn read_tuple(ctx: &TracePointContext, t: &TupleFields, out: &mut Tuple) -> Option<()> {
    if t.style == tuple_style::SOCKADDR {
        // struct sockaddr_in{,6}: family, then the port in network order,
        // then the address at 4 (IPv4) or 8 (IPv6, after the flow info).
        let family = field::<u16>(ctx, t.saddr)?;
        out.family = family;
        out.local_port = u16::from_be(field::<u16>(ctx, t.saddr + 2)?);
        out.remote_port = u16::from_be(field::<u16>(ctx, t.daddr + 2)?);
        if family == AF_INET {
            copy_v4(&mut out.local_addr, field::<[u8; 4]>(ctx, t.saddr + 4)?);
            copy_v4(&mut out.remote_addr, field::<[u8; 4]>(ctx, t.daddr + 4)?);
        } else {
            out.local_addr = field::<[u8; 16]>(ctx, t.saddr + 8)?;
            out.remote_addr = field::<[u8; 16]>(ctx, t.daddr + 8)?;
        }
    } else {
        // Old kernels have no family field; the IPv6 fields then hold
        // v4-mapped addresses, which the loader recognises.
        let family = field::<u16>(ctx, t.family).unwrap_or(0);
        out.family = family;
        out.local_port = field::<u16>(ctx, t.sport)?;
        out.remote_port = field::<u16>(ctx, t.dport)?;
        if family == AF_INET {
            copy_v4(&mut out.local_addr, field::<[u8; 4]>(ctx, t.saddr)?);
            copy_v4(&mut out.remote_addr, field::<[u8; 4]>(ctx, t.daddr)?);
        } else {
            out.local_addr = field::<[u8; 16]>(ctx, t.saddr_v6)?;
            out.remote_addr = field::<[u8; 16]>(ctx, t.daddr_v6)?;
        }
    }
    Some(())
}

/// The kernel-side filters every connection record passes: port and netns.
#[inline(always)]
pub fn tuple_wanted(tuple: &Tuple, netns: u32) -> bool {
    let f = crate::globals::filter();
    if f.port != 0 && tuple.local_port != f.port && tuple.remote_port != f.port {
        return false;
    }
    f.netns == 0 || netns == f.netns
}
