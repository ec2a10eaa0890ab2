//! Reading tracepoint records at offsets taken from tracefs format files.

use aya_ebpf::programs::TracePointContext;
use tcprst_common::{ABSENT, AF_INET, Tuple, TupleFields, tuple_style};

use crate::{
    globals::global,
    kernel::{Unread, copy_v4},
};

#[inline(always)]
pub fn field<T>(ctx: &TracePointContext, offset: u32) -> Option<T> {
    if offset == ABSENT {
        return None;
    }
    // SAFETY: a probe read of the record at an offset the loader read from
    // the tracepoint's format; a bad one fails cleanly.
    unsafe { ctx.read_at::<T>(offset as usize).ok() }
}

/// Field `what` of the tracepoint record, at `offset`.
#[inline(always)]
fn named<T>(ctx: &TracePointContext, offset: u32, what: &'static str) -> Result<T, Unread> {
    field(ctx, offset).ok_or(Unread { what, offset })
}

#[inline(always)]
pub fn read_tuple(ctx: &TracePointContext, t: &TupleFields, out: &mut Tuple) -> Result<(), Unread> {
    if t.style == tuple_style::SOCKADDR {
        // struct sockaddr_in{,6}: family, then the port in network order,
        // then the address at 4 (IPv4) or 8 (IPv6, after the flow info).
        let family: u16 = named(ctx, t.saddr, "saddr (sockaddr family)")?;
        out.family = family;
        out.local_port = u16::from_be(named(ctx, t.saddr + 2, "saddr (port)")?);
        out.remote_port = u16::from_be(named(ctx, t.daddr + 2, "daddr (port)")?);
        if family == AF_INET {
            copy_v4(
                &mut out.local_addr,
                named(ctx, t.saddr + 4, "saddr (IPv4)")?,
            );
            copy_v4(
                &mut out.remote_addr,
                named(ctx, t.daddr + 4, "daddr (IPv4)")?,
            );
        } else {
            out.local_addr = named(ctx, t.saddr + 8, "saddr (IPv6)")?;
            out.remote_addr = named(ctx, t.daddr + 8, "daddr (IPv6)")?;
        }
    } else {
        // Old kernels have no family field; the IPv6 fields then hold
        // v4-mapped addresses, which the loader recognises.
        let family = field::<u16>(ctx, t.family).unwrap_or(0);
        out.family = family;
        out.local_port = named(ctx, t.sport, "sport")?;
        out.remote_port = named(ctx, t.dport, "dport")?;
        if family == AF_INET {
            copy_v4(&mut out.local_addr, named(ctx, t.saddr, "saddr")?);
            copy_v4(&mut out.remote_addr, named(ctx, t.daddr, "daddr")?);
        } else {
            out.local_addr = named(ctx, t.saddr_v6, "saddr_v6")?;
            out.remote_addr = named(ctx, t.daddr_v6, "daddr_v6")?;
        }
    }
    Ok(())
}

/// The kernel-side filters every connection record passes: port and netns.
#[inline(always)]
pub fn tuple_wanted(tuple: &Tuple, netns: u32) -> bool {
    let port = global!(FILTER.port);
    if port != 0 && tuple.local_port != port && tuple.remote_port != port {
        return false;
    }
    let wanted = global!(FILTER.netns);
    wanted == 0 || netns == wanted
}
