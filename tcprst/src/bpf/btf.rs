//! Kernel struct member offsets from the running kernel's BTF. aya cannot
//! emit CO-RE relocations from Rust, so the loader measures every offset the
//! programs need here and passes them in as globals.
//!
//! The reader is lazy: vmlinux describes over 100 000 types and tcprst asks
//! about a few dozen, so it keeps the raw bytes and where each type starts,
//! and finds names by scanning when asked. A full parse held ~20 MiB at
//! startup (#10). `--btf PATH` may point at anything: every read is
//! bounds-checked, and chains of types are followed a bounded number of times.
//! Layouts: the kernel's Documentation/bpf/btf.rst.

use std::{ops::Range, path::Path, sync::Arc};

use anyhow::{Context as _, Result, anyhow, bail};
use tcprst_common::{ABSENT, KernelOffsets};

pub(crate) const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
/// The feature `kernel_offsets` reports lost when the function tiers'
/// members are missing.
pub(crate) const FUNCTION_TIERS: &str = "the kprobe and fentry tiers";

// The kinds this reader looks into.
const STRUCT: u32 = 4;
const UNION: u32 = 5;
const ENUM: u32 = 6;
const TYPEDEF: u32 = 8;
const VOLATILE: u32 = 9;
const CONST: u32 = 10;
const RESTRICT: u32 = 11;
const FUNC: u32 = 12;
const FUNC_PROTO: u32 = 13;
const TYPE_TAG: u32 = 18;
const ENUM64: u32 = 19;

/// The kernel's own bound (MAX_RESOLVE_DEPTH) on typedef and qualifier
/// chains; here also on nested anonymous members. Malformed BTF may loop.
const MAX_DEPTH: usize = 32;
/// Members one lookup may visit, anonymous ones' included: bounded depth
/// alone still lets malformed BTF nest wide structs into 65535^32 visits.
/// No struct in vmlinux has more than a few hundred.
const MAX_MEMBERS: usize = 1 << 16;

/// The size of a type's header: name_off, info, size_or_type.
const TYPE_HEADER: usize = 12;

/// Bytes of kind-specific data after a type's header, or None for a kind
/// this reader does not know, and so cannot step over.
fn data_len(kind: u32, vlen: usize) -> Option<usize> {
    Some(match kind {
        // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
        2 | 7..=12 | 16 | 18 => 0,
        // INT's encoding, VAR's linkage, DECL_TAG's component index
        1 | 14 | 17 => 4,
        // ARRAY: element type, index type, count
        3 => 12,
        // ENUM values and FUNC_PROTO parameters: two u32 each
        6 | 13 => 8 * vlen,
        // STRUCT and UNION members, DATASEC variables, ENUM64 values
        4 | 5 | 15 | 19 => 12 * vlen,
        _ => return None,
    })
}

/// Where the sections are, from the header, and in which byte order.
struct Header {
    big_endian: bool,
    types: Range<usize>,
    strings: Range<usize>,
}

/// Reads the header, and refuses sections that run past the data.
fn check_header(bytes: &[u8]) -> Result<Header> {
    const HEADER: usize = 24;
    let Some(header) = bytes.first_chunk::<HEADER>() else {
        bail!("{} bytes is too short for a BTF header", bytes.len());
    };
    let big_endian = match header[..2] {
        [0x9f, 0xeb] => false,
        [0xeb, 0x9f] => true,
        _ => bail!("no BTF magic"),
    };
    let u32_at = |at: usize| {
        let word = [header[at], header[at + 1], header[at + 2], header[at + 3]];
        u64::from(if big_endian {
            u32::from_be_bytes(word)
        } else {
            u32::from_le_bytes(word)
        })
    };
    let [hdr_len, type_off, type_len, str_off, str_len] = [4, 8, 12, 16, 20].map(u32_at);
    if (hdr_len as usize) < HEADER {
        bail!("BTF header length {hdr_len} is shorter than a header");
    }
    let section = |what, off, len| {
        // u64 arithmetic cannot overflow on u32 operands, and the end fits
        // in usize once it is within the data.
        let start = hdr_len + off;
        if start + len > bytes.len() as u64 {
            bail!("the BTF {what} section runs past the end of the data");
        }
        Ok(start as usize..(start + len) as usize)
    };
    Ok(Header {
        big_endian,
        types: section("type", type_off, type_len)?,
        strings: section("string", str_off, str_len)?,
    })
}

/// A BTF file's bytes. Linux 6.16+ lets vmlinux's BTF be mapped straight
/// from kernel memory: no copy, and no RSS, where reading it costs 5 MiB
/// and tcprst's startup peak is two parses of it (this reader's and
/// aya's). Other files, and older kernels, are read.
pub(crate) enum BtfBytes {
    Mapped(memmap2::Mmap),
    Read(Vec<u8>),
}

impl BtfBytes {
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let read = || std::fs::read(path).with_context(|| format!("reading {}", path.display()));
        // Only the kernel's own files: a user's file truncated while mapped
        // would fault, and only vmlinux can be mapped anyway.
        if !path.starts_with("/sys/kernel/btf") {
            return read().map(Self::Read);
        }
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: the kernel's BTF never changes while it runs, and the map
        // is private and read-only (the kernel refuses anything else).
        match unsafe { memmap2::MmapOptions::new().map_copy_read_only(&file) } {
            Ok(map) => Ok(Self::Mapped(map)),
            Err(_) => read().map(Self::Read),
        }
    }
}

impl std::ops::Deref for BtfBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Self::Mapped(map) => map,
            Self::Read(bytes) => bytes,
        }
    }
}

/// One BTF file: vmlinux, or a module's split BTF on top of it.
struct Blob {
    data: BtfBytes,
    big_endian: bool,
    strings: Range<usize>,
    /// Where each type's header starts in `data`: type `first_id + i` at
    /// `types[i]`. The only index kept, 4 bytes a type.
    types: Vec<u32>,
    first_id: u32,
    /// The string offset of `strings.start`: split BTF numbers its strings
    /// after its base's, as it numbers its types after the base's.
    first_str: u32,
}

impl Blob {
    /// Walks the type section once to index it; kind-specific data must be
    /// stepped over, so every type is checked to fit here.
    fn parse(data: BtfBytes, first_id: u32, first_str: u32) -> Result<Self> {
        let header = check_header(&data)?;
        let mut blob = Blob {
            data,
            big_endian: header.big_endian,
            strings: header.strings,
            types: Vec::new(),
            first_id,
            first_str,
        };
        let end = header.types.end;
        let mut at = header.types.start;
        while at < end {
            let id = u64::from(first_id) + blob.types.len() as u64;
            if end - at < TYPE_HEADER {
                bail!("type #{id} runs past the end of the type section");
            }
            let info = blob.u32_at(at + 4)?;
            let kind = (info >> 24) & 0x1f;
            let len = data_len(kind, (info & 0xffff) as usize)
                .ok_or_else(|| anyhow!("type #{id} has unknown BTF kind {kind}"))?;
            if end - at - TYPE_HEADER < len {
                bail!("type #{id} runs past the end of the type section");
            }
            blob.types
                .push(u32::try_from(at).context("BTF type section past 4 GiB")?);
            at += TYPE_HEADER + len;
        }
        blob.types.shrink_to_fit();
        blob.end_id()?;
        Ok(blob)
    }

    /// The id after this blob's last type: a split BTF's first.
    fn end_id(&self) -> Result<u32> {
        u32::try_from(self.types.len())
            .ok()
            .and_then(|n| self.first_id.checked_add(n))
            .ok_or_else(|| anyhow!("too many BTF types"))
    }

    fn u32_at(&self, at: usize) -> Result<u32> {
        let word = self
            .data
            .get(at..)
            .and_then(|rest| rest.first_chunk::<4>())
            .ok_or_else(|| anyhow!("BTF read at byte {at} is past the end"))?;
        Ok(if self.big_endian {
            u32::from_be_bytes(*word)
        } else {
            u32::from_le_bytes(*word)
        })
    }

    /// The header of the `i`th type; `i` must be below `types.len()`.
    fn type_at(&self, i: usize) -> Result<Type<'_>> {
        let at = *self
            .types
            .get(i)
            .ok_or_else(|| anyhow!("no BTF type at index {i}"))? as usize;
        let info = self.u32_at(at + 4)?;
        Ok(Type {
            blob: self,
            // `end_id` checked this cannot overflow.
            id: self.first_id + i as u32,
            name_off: self.u32_at(at)?,
            kind: (info >> 24) & 0x1f,
            vlen: (info & 0xffff) as usize,
            kind_flag: info >> 31 == 1,
            size_or_type: self.u32_at(at + 8)?,
            data: at + TYPE_HEADER,
        })
    }

    /// The string section from string offset `off` to its end, unless `off`
    /// is in another blob's.
    fn strings_from(&self, off: u32) -> Option<&[u8]> {
        let rel = off.checked_sub(self.first_str)? as usize;
        let rest = self.data.get(self.strings.clone())?.get(rel..)?;
        (!rest.is_empty()).then_some(rest)
    }
}

/// One type's header, read on demand.
#[derive(Clone, Copy)]
struct Type<'a> {
    blob: &'a Blob,
    id: u32,
    name_off: u32,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    /// A struct's, union's or enum's size; the referenced type's id for
    /// typedefs, qualifiers, pointers and functions.
    size_or_type: u32,
    /// Where its kind-specific data starts in `blob.data`.
    data: usize,
}

impl Type<'_> {
    /// Word `word` of item `i` of the kind-specific data, whose items are
    /// `size` bytes (members, parameters, enum values).
    fn item(&self, i: usize, size: usize, word: usize) -> Result<u32> {
        self.blob.u32_at(self.data + i * size + word * 4)
    }
}

pub struct KernelBtf {
    base: Arc<Blob>,
    /// A module's split BTF, whose ids and strings continue the base's.
    split: Option<Blob>,
}

impl KernelBtf {
    pub(crate) fn from_file(path: &Path) -> Result<Self> {
        Self::from_data(BtfBytes::open(path)?)
            .map_err(|e| anyhow!("{} is not a usable BTF file: {e}", path.display()))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Self::from_data(BtfBytes::Read(bytes.to_vec()))
    }

    fn from_data(bytes: BtfBytes) -> Result<Self> {
        // Type id 0 is void, which has no entry.
        let base = Blob::parse(bytes, 1, 0).map_err(|e| anyhow!("not usable BTF: {e}"))?;
        Ok(Self {
            base: Arc::new(base),
            split: None,
        })
    }

    /// A kernel module's BTF, which only adds to the kernel's (split BTF).
    /// It shares this one's base rather than copying it.
    pub(crate) fn module(&self, path: &Path) -> Result<Self> {
        let bytes = BtfBytes::open(path)?;
        let base = &self.base;
        let first_str = u32::try_from(base.strings.len())
            .ok()
            .and_then(|n| base.first_str.checked_add(n));
        let split = first_str
            .ok_or_else(|| anyhow!("the base BTF's strings are too long"))
            .and_then(|first_str| Blob::parse(bytes, base.end_id()?, first_str))
            .map_err(|e| anyhow!("{} is not a usable module BTF file: {e}", path.display()))?;
        Ok(Self {
            base: Arc::clone(base),
            split: Some(split),
        })
    }

    fn blobs(&self) -> impl Iterator<Item = &Blob> {
        std::iter::once(&*self.base).chain(&self.split)
    }

    fn ty(&self, id: u32) -> Result<Type<'_>> {
        for blob in self.blobs() {
            if let Some(i) = id.checked_sub(blob.first_id)
                && (i as usize) < blob.types.len()
            {
                return blob.type_at(i as usize);
            }
        }
        bail!("no BTF type #{id}")
    }

    fn strings_from(&self, off: u32) -> Option<&[u8]> {
        self.blobs().find_map(|blob| blob.strings_from(off))
    }

    fn string(&self, off: u32) -> Result<&str> {
        let rest = self
            .strings_from(off)
            .ok_or_else(|| anyhow!("BTF string offset {off} is outside the string section"))?;
        let len = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| anyhow!("BTF string at {off} has no end"))?;
        std::str::from_utf8(&rest[..len]).with_context(|| format!("BTF string at {off}"))
    }

    /// Whether the string at `off` is `name`, without building it: the scan
    /// in `find` compares every candidate.
    fn name_is(&self, off: u32, name: &str) -> bool {
        self.strings_from(off).is_some_and(|rest| {
            rest.strip_prefix(name.as_bytes())
                .is_some_and(|after| after.first() == Some(&0))
        })
    }

    fn describe(&self, ty: &Type) -> String {
        match self.string(ty.name_off) {
            Ok(name) if !name.is_empty() => name.to_owned(),
            _ => format!("type #{}", ty.id),
        }
    }

    /// The first type named `name` that `wanted` accepts, base first.
    fn find(&self, name: &str, wanted: impl Fn(&Type) -> bool) -> Result<Option<Type<'_>>> {
        for blob in self.blobs() {
            for i in 0..blob.types.len() {
                let ty = blob.type_at(i)?;
                if wanted(&ty) && self.name_is(ty.name_off, name) {
                    return Ok(Some(ty));
                }
            }
        }
        Ok(None)
    }

    /// Byte offset of `path` (member names, outermost first) inside
    /// `struct <root>`, looking through anonymous structs and unions and
    /// through typedefs, as C's `offsetof(struct root, a.b.c)` does.
    pub(crate) fn offset_of(&self, root: &str, path: &[&str]) -> Result<u32> {
        // A declaration elsewhere may leave an empty struct of the same name.
        let mut id = self
            .find(root, |t| t.kind == STRUCT && t.vlen > 0)?
            .ok_or_else(|| anyhow!("no struct {root} in BTF"))?
            .id;
        let (mut bits, mut budget) = (0u32, MAX_MEMBERS);
        for (i, member) in path.iter().enumerate() {
            let (member_bits, member_ty) = self
                .find_member(id, member, 0, &mut budget)?
                .ok_or_else(|| anyhow!("struct {root} has no member {}", path[..=i].join(".")))?;
            bits = bits
                .checked_add(member_bits)
                .ok_or_else(|| anyhow!("{root}.{} is past 4 GiB", path.join(".")))?;
            id = member_ty;
        }
        if !bits.is_multiple_of(8) {
            bail!("{root}.{} is a bitfield", path.join("."));
        }
        Ok(bits / 8)
    }

    /// Strips typedefs and qualifiers.
    fn concrete(&self, id: u32) -> Result<Type<'_>> {
        let mut ty = self.ty(id)?;
        for _ in 0..MAX_DEPTH {
            match ty.kind {
                TYPEDEF | VOLATILE | CONST | RESTRICT | TYPE_TAG => ty = self.ty(ty.size_or_type)?,
                _ => return Ok(ty),
            }
        }
        bail!("the typedefs from BTF type #{id} loop or go too deep")
    }

    /// (bit offset, type id) of `name` in struct or union `id`, searching
    /// anonymous members depth-first, and at most `budget` of them.
    fn find_member(
        &self,
        id: u32,
        name: &str,
        depth: usize,
        budget: &mut usize,
    ) -> Result<Option<(u32, u32)>> {
        let ty = self.concrete(id)?;
        if !matches!(ty.kind, STRUCT | UNION) {
            bail!("{} is not a struct or union", self.describe(&self.ty(id)?));
        }
        for i in 0..ty.vlen {
            *budget = budget
                .checked_sub(1)
                .ok_or_else(|| anyhow!("{} has too many nested members", self.describe(&ty)))?;
            let [name_off, member_ty, offset] = [0, 1, 2].map(|word| ty.item(i, 12, word));
            let (member_name, member_ty) = (self.string(name_off?)?, member_ty?);
            // With kind_flag, the high 8 bits are a bitfield's size.
            let bits = if ty.kind_flag {
                offset? & 0xff_ffff
            } else {
                offset?
            };
            if member_name == name {
                return Ok(Some((bits, member_ty)));
            }
            // Unnamed bitfields are anonymous too, but hold no members.
            if member_name.is_empty() && matches!(self.concrete(member_ty)?.kind, STRUCT | UNION) {
                if depth >= MAX_DEPTH {
                    bail!("anonymous members of {} nest too deep", self.describe(&ty));
                }
                if let Some((inner, found)) =
                    self.find_member(member_ty, name, depth + 1, budget)?
                {
                    let bits = bits
                        .checked_add(inner)
                        .ok_or_else(|| anyhow!("member {name} is past 4 GiB"))?;
                    return Ok(Some((bits, found)));
                }
            }
        }
        Ok(None)
    }

    /// The size of `struct <name>`, in bytes.
    pub(crate) fn size_of(&self, name: &str) -> Result<u32> {
        let ty = self
            .find(name, |t| t.kind == STRUCT && t.vlen > 0)?
            .ok_or_else(|| anyhow!("no struct {name} in BTF"))?;
        Ok(ty.size_or_type)
    }

    /// The parameter names of function `name`, in order.
    pub(crate) fn function_params(&self, name: &str) -> Result<Vec<String>> {
        let func = self
            .find(name, |t| t.kind == FUNC)?
            .ok_or_else(|| anyhow!("no function {name} in BTF"))?;
        let proto = self.ty(func.size_or_type)?;
        if proto.kind != FUNC_PROTO {
            bail!("function {name} has no prototype in BTF");
        }
        (0..proto.vlen)
            .map(|i| Ok(self.string(proto.item(i, 8, 0)?)?.to_owned()))
            .collect()
    }

    /// The name → value pairs of `enum <name>` (ENUM or ENUM64).
    pub fn enum_values(&self, name: &str) -> Result<Vec<(u64, String)>> {
        let e = self
            .find(name, |t| matches!(t.kind, ENUM | ENUM64))?
            .ok_or_else(|| anyhow!("no enum {name} in BTF"))?;
        let size = if e.kind == ENUM64 { 12 } else { 8 };
        (0..e.vlen)
            .map(|i| {
                let mut value = u64::from(e.item(i, size, 1)?);
                if e.kind == ENUM64 {
                    value |= u64::from(e.item(i, size, 2)?) << 32;
                }
                Ok((value, self.string(e.item(i, size, 0)?)?.to_owned()))
            })
            .collect()
    }

    /// Every offset the kernel programs read, and what this kernel's BTF
    /// cannot support. Only the socket's namespace and state are required:
    /// older kernels lack some members (sock_cgroup_data had no cgroup
    /// pointer before 5.15, kernfs_node.id was no u64 before 5.5), and the
    /// programs skip what needs an ABSENT offset rather than refuse to run.
    pub fn kernel_offsets(&self) -> Result<(KernelOffsets, Vec<&'static str>)> {
        let sum = |parts: &[(&str, &[&str])]| -> Result<u32> {
            parts
                .iter()
                .map(|(root, path)| self.offset_of(root, path))
                .sum()
        };
        let required = || -> Result<[u32; 3]> {
            Ok([
                sum(&[("sock_common", &["skc_state"])])?,
                sum(&[("sock_common", &["skc_net", "net"])])?,
                sum(&[("net", &["ns"]), ("ns_common", &["inum"])])?,
            ])
        };
        let [sk_state, sk_net, net_ns_inum] =
            required().context("reading kernel struct offsets from BTF")?;
        let mut lost = Vec::new();
        let mut optional = |feature: &'static str, parts: &[(&str, &[&str])]| {
            sum(parts).unwrap_or_else(|_| {
                if !lost.contains(&feature) {
                    lost.push(feature);
                }
                ABSENT
            })
        };
        const NO_SOCKET_NETNS: &str = "the namespace of resets sent with no socket";
        const CONTEXT: &str = "kernel-thread and process-exit detection";
        const SOCKET_FACTS: &str =
            "what a reset's socket says of its close (half-closed, orphaned, its process)";
        const CGROUP: &str = "container and pod attribution";
        let offsets = KernelOffsets {
            sk_state,
            sk_net,
            net_ns_inum,
            // Only a cache's key: without it the programs read the inode
            // each time, which costs speed, not facts.
            net_cookie: self.offset_of("net", &["net_cookie"]).unwrap_or(ABSENT),
            skb_dev: optional(NO_SOCKET_NETNS, &[("sk_buff", &["dev"])]),
            dev_nd_net: optional(NO_SOCKET_NETNS, &[("net_device", &["nd_net", "net"])]),
            task_flags: optional(CONTEXT, &[("task_struct", &["flags"])]),
            task_stack: optional(CONTEXT, &[("task_struct", &["stack"])]),
            sk_cgroup: optional(CGROUP, &[("sock", &["sk_cgrp_data", "cgroup"])]),
            cgroup_kn: optional(CGROUP, &[("cgroup", &["kn"])]),
            kn_id: optional(CGROUP, &[("kernfs_node", &["id"])]),
            skc_family: optional(FUNCTION_TIERS, &[("sock_common", &["skc_family"])]),
            skc_daddr: optional(FUNCTION_TIERS, &[("sock_common", &["skc_daddr"])]),
            skc_rcv_saddr: optional(FUNCTION_TIERS, &[("sock_common", &["skc_rcv_saddr"])]),
            skc_dport: optional(FUNCTION_TIERS, &[("sock_common", &["skc_dport"])]),
            inet_sport: optional(FUNCTION_TIERS, &[("inet_sock", &["inet_sport"])]),
            skc_v6_daddr: optional(FUNCTION_TIERS, &[("sock_common", &["skc_v6_daddr"])]),
            skc_v6_rcv_saddr: optional(FUNCTION_TIERS, &[("sock_common", &["skc_v6_rcv_saddr"])]),
            skb_head: optional(FUNCTION_TIERS, &[("sk_buff", &["head"])]),
            skb_network_header: optional(FUNCTION_TIERS, &[("sk_buff", &["network_header"])]),
            skb_transport_header: optional(FUNCTION_TIERS, &[("sk_buff", &["transport_header"])]),
            sk_shutdown: optional(SOCKET_FACTS, &[("sock", &["sk_shutdown"])]),
            sk_socket: optional(SOCKET_FACTS, &[("sock", &["sk_socket"])]),
            socket_ino: optional(
                SOCKET_FACTS,
                &[("socket_alloc", &["vfs_inode"]), ("inode", &["i_ino"])],
            ),
            // A bitfield before 5.6; the close-mark program then skips the
            // protocol check (SCTP never enters the states it marks).
            sk_protocol: self.offset_of("sock", &["sk_protocol"]).unwrap_or(ABSENT),
            // Speed only, like `net_cookie`: without them the close-mark
            // program calls the helpers these loads replace. The name is
            // read as two u64s, which the verifier takes inside the array
            // but which must not straddle its alignment.
            task_comm: self
                .offset_of("task_struct", &["comm"])
                .ok()
                .filter(|offset| offset % 8 == 0)
                .unwrap_or(ABSENT),
            sk_cookie: self
                .offset_of("sock_common", &["skc_cookie", "counter"])
                .unwrap_or(ABSENT),
        };
        Ok((offsets, lost))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What these tests read of Linux 6.18's BTF, at that kernel's own
    /// offsets (testdata/btf-6.18-min.c says how it was cut out): real
    /// kernel BTF on every machine, whether or not its kernel has any.
    fn linux_6_18() -> KernelBtf {
        KernelBtf::from_bytes(include_bytes!("../../testdata/btf-6.18-min")).unwrap()
    }

    #[test]
    fn finds_members_inside_anonymous_unions() {
        let btf = linux_6_18();
        // sk_buff.dev sits in an anonymous struct inside an anonymous union,
        // right after the next/prev list pointers.
        assert_eq!(btf.offset_of("sk_buff", &["dev"]).unwrap(), 16);
        // skc_family is the first member after the address/hash unions.
        assert_eq!(btf.offset_of("sock_common", &["skc_family"]).unwrap(), 16);
        assert_eq!(btf.offset_of("sock_common", &["skc_state"]).unwrap(), 18);
    }

    #[test]
    fn looks_through_typedefs() {
        let btf = linux_6_18();
        // skc_net is a possible_net_t, a typedef of a struct around `net`.
        let via_typedef = btf.offset_of("sock_common", &["skc_net", "net"]).unwrap();
        assert_eq!(via_typedef, 48);
        assert_eq!(btf.offset_of("sock_common", &["skc_net"]).unwrap(), 48);
    }

    #[test]
    fn reports_missing_members_by_path() {
        let btf = linux_6_18();
        let err = btf
            .offset_of("sock_common", &["skc_net", "nope"])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "struct sock_common has no member skc_net.nope"
        );
        assert!(btf.offset_of("no_such_struct_tcprst", &["x"]).is_err());
    }

    /// Every offset, as 6.18 (x86_64) lays its structs out.
    #[test]
    fn linux_6_18_has_every_offset() {
        let (offsets, lost) = linux_6_18().kernel_offsets().unwrap();
        assert!(lost.is_empty(), "{lost:?}");
        assert_eq!(
            offsets,
            KernelOffsets {
                sk_state: 18,
                sk_net: 48,
                net_ns_inum: 176,
                net_cookie: 4096,
                skb_dev: 16,
                dev_nd_net: 264,
                task_flags: 44,
                task_stack: 32,
                sk_cgroup: 672,
                cgroup_kn: 256,
                kn_id: 96,
                skc_family: 16,
                skc_daddr: 0,
                skc_rcv_saddr: 4,
                skc_dport: 12,
                inet_sport: 814,
                skc_v6_daddr: 56,
                skc_v6_rcv_saddr: 72,
                skb_head: 192,
                skb_network_header: 180,
                skb_transport_header: 178,
                sk_shutdown: 575,
                sk_socket: 288,
                socket_ino: 192,
                sk_protocol: 532,
                task_comm: 1752,
                sk_cookie: 88,
            }
        );
    }

    /// The registers a task saves at the top of its stack, whose `orig_ax`
    /// tells a softirq on that stack (`stack_layout.rs`).
    #[test]
    fn linux_6_18_pt_regs() {
        let btf = linux_6_18();
        assert_eq!(btf.size_of("pt_regs").unwrap(), 168);
        assert_eq!(btf.offset_of("pt_regs", &["orig_ax"]).unwrap(), 120);
    }

    /// Without the socket's namespace and state there is nothing to run.
    #[test]
    fn missing_required_members_are_an_error() {
        // The eBPF object's own BTF has none of the kernel's structs.
        let btf = KernelBtf::from_bytes(include_bytes!(
            "../../../fuzz/seeds/btf_offsets/tcprst-ebpf.btf"
        ))
        .unwrap();
        let err = btf.kernel_offsets().unwrap_err();
        assert!(
            err.to_string()
                .starts_with("reading kernel struct offsets from BTF"),
            "{err}"
        );
    }

    #[test]
    fn reads_enums() {
        let reasons = linux_6_18().enum_values("skb_drop_reason").unwrap();
        assert!(reasons.contains(&(2, "SKB_DROP_REASON_NOT_SPECIFIED".to_owned())));
    }

    /// Found by the btf_offsets fuzz target: header offsets that overflow.
    #[test]
    fn rejects_headers_pointing_past_the_data() {
        let crash = include_bytes!("../../testdata/btf-crash-header-overflow");
        let err = KernelBtf::from_bytes(crash).err().unwrap();
        assert!(err.to_string().contains("runs past the end"), "{err}");
        let mut short = include_bytes!("../../../fuzz/seeds/btf_offsets/tcprst-ebpf.btf").to_vec();
        short.truncate(100);
        assert!(KernelBtf::from_bytes(&short).is_err());
        assert!(KernelBtf::from_bytes(&[0x9f, 0xeb, 1]).is_err());
    }

    #[test]
    fn parses_a_real_object_btf() {
        let btf = KernelBtf::from_bytes(include_bytes!(
            "../../../fuzz/seeds/btf_offsets/tcprst-ebpf.btf"
        ))
        .unwrap();
        // The filter global is described in the eBPF object's own BTF.
        assert_eq!(btf.offset_of("KernelFilter", &["port"]).unwrap(), 8);
    }

    #[test]
    fn rejects_garbage() {
        let path = std::env::temp_dir().join(format!("tcprst-garbage-btf-{}", std::process::id()));
        std::fs::write(&path, b"definitely not BTF").unwrap();
        let err = KernelBtf::from_file(&path).err().unwrap();
        assert!(
            err.to_string().contains("is not a usable BTF file"),
            "{err}"
        );
        std::fs::remove_file(&path).unwrap();
    }

    /// Type kinds for the hand-made BTF below.
    const INT: u32 = 1;
    const PTR: u32 = 2;

    const fn info(kind: u32, vlen: u32) -> u32 {
        kind << 24 | vlen
    }

    /// A BTF file of `types` (u32 words) and `strings`.
    fn blob_in(big_endian: bool, types: &[u32], strings: &[u8]) -> Vec<u8> {
        let word = |w: u32| {
            if big_endian {
                w.to_be_bytes()
            } else {
                w.to_le_bytes()
            }
        };
        let type_len = types.len() as u32 * 4;
        let mut out = if big_endian {
            vec![0xeb, 0x9f, 1, 0]
        } else {
            vec![0x9f, 0xeb, 1, 0]
        };
        for w in [24, 0, type_len, type_len, strings.len() as u32] {
            out.extend(word(w));
        }
        types.iter().for_each(|&w| out.extend(word(w)));
        out.extend(strings);
        out
    }

    fn blob(types: &[u32], strings: &[u8]) -> Vec<u8> {
        blob_in(false, types, strings)
    }

    /// Strings of `BASE_TYPES`: int at 1, base_s at 5, a at 12, b at 14.
    const BASE_STRINGS: &[u8] = b"\0int\0base_s\0a\0b\0";
    /// 1: int; 2: struct base_s { int a; int b; }, b at byte 4.
    #[rustfmt::skip]
    const BASE_TYPES: &[u32] = &[
        1, info(INT, 0), 4, 32,
        5, info(STRUCT, 2), 8, 12, 1, 0, 14, 1, 32,
    ];

    #[test]
    fn reads_both_byte_orders() {
        for big_endian in [false, true] {
            let btf =
                KernelBtf::from_bytes(&blob_in(big_endian, BASE_TYPES, BASE_STRINGS)).unwrap();
            assert_eq!(btf.offset_of("base_s", &["b"]).unwrap(), 4);
        }
    }

    /// A module's types and strings are numbered after the base's, and its
    /// lookups see the base's types.
    #[test]
    fn reads_split_module_btf() {
        let base = KernelBtf::from_bytes(&blob(BASE_TYPES, BASE_STRINGS)).unwrap();
        // Offsets from 16, the base's string length: mod_fn 17, x 24, y 26,
        // mod_e 28, V 34.
        let strings = b"\0mod_fn\0x\0y\0mod_e\0V\0";
        #[rustfmt::skip]
        let types = [
            // 3: int (int x, struct base_s *y)
            0, info(FUNC_PROTO, 2), 1, 24, 1, 26, 4,
            // 4: struct base_s *
            0, info(PTR, 0), 2,
            // 5: mod_fn, of type 3
            17, info(FUNC, 0), 3,
            // 6: enum64 mod_e { V = 1 << 32 | 5 }
            28, info(ENUM64, 1), 8, 34, 5, 1,
        ];
        let path = std::env::temp_dir().join(format!("tcprst-split-btf-{}", std::process::id()));
        std::fs::write(&path, blob(&types, strings)).unwrap();
        let module = base.module(&path);
        std::fs::remove_file(&path).unwrap();
        let module = module.unwrap();
        assert_eq!(module.function_params("mod_fn").unwrap(), ["x", "y"]);
        assert_eq!(
            module.enum_values("mod_e").unwrap(),
            [((1 << 32) | 5, "V".to_owned())]
        );
        assert_eq!(module.offset_of("base_s", &["b"]).unwrap(), 4);
        assert!(base.function_params("mod_fn").is_err());
    }

    #[test]
    fn rejects_a_truncated_type_section() {
        let mut bytes = blob(BASE_TYPES, BASE_STRINGS);
        // The type section now ends inside base_s's last member.
        bytes[12] -= 4;
        let err = KernelBtf::from_bytes(&bytes).err().unwrap();
        assert!(
            err.to_string().contains("type #2 runs past the end"),
            "{err}"
        );
        // And inside a header.
        bytes[12] = 4 * 4 + 8;
        assert!(KernelBtf::from_bytes(&bytes).is_err());
        let unknown = blob(&[0, info(20, 0), 0], b"\0");
        let err = KernelBtf::from_bytes(&unknown).err().unwrap();
        assert!(err.to_string().contains("unknown BTF kind 20"), "{err}");
    }

    #[test]
    fn survives_strings_outside_the_string_section() {
        // base_s's member b is named at offset 99, past the strings.
        let mut types = BASE_TYPES.to_vec();
        types[10] = 99;
        let btf = KernelBtf::from_bytes(&blob(&types, BASE_STRINGS)).unwrap();
        let err = btf.offset_of("base_s", &["b"]).unwrap_err();
        assert!(
            err.to_string().contains("outside the string section"),
            "{err}"
        );
        assert_eq!(btf.offset_of("base_s", &["a"]).unwrap(), 0);
        // A string section that ends without a NUL.
        let btf = KernelBtf::from_bytes(&blob(BASE_TYPES, b"\0int\0base_s\0a\0b")).unwrap();
        assert!(btf.offset_of("base_s", &["b"]).is_err());
        // A struct name out of range is no match, not a failure to read.
        types[4] = u32::MAX;
        let btf = KernelBtf::from_bytes(&blob(&types, BASE_STRINGS)).unwrap();
        let err = btf.offset_of("base_s", &["a"]).unwrap_err();
        assert_eq!(err.to_string(), "no struct base_s in BTF");
    }

    /// Malformed BTF whose types refer to themselves ends in an error.
    #[test]
    fn stops_on_loops() {
        // 1: typedef t t; 2: struct s { t; struct s; }, both anonymous.
        #[rustfmt::skip]
        let types = [
            1, info(TYPEDEF, 0), 1,
            3, info(STRUCT, 2), 8, 0, 1, 0, 0, 2, 0,
        ];
        let btf = KernelBtf::from_bytes(&blob(&types, b"\0t\0s\0")).unwrap();
        assert!(btf.offset_of("s", &["x"]).is_err());
        let mut types = types.to_vec();
        types[7] = 2;
        let btf = KernelBtf::from_bytes(&blob(&types, b"\0t\0s\0")).unwrap();
        let err = btf.offset_of("s", &["x"]).unwrap_err();
        assert!(err.to_string().contains("nest too deep"), "{err}");
        // 20 structs, each of two anonymous members of the one before: no
        // loop, but 2^20 members to visit.
        let mut types = vec![1, info(INT, 0), 4, 32];
        for id in 2..22 {
            types.extend([0, info(STRUCT, 2), 8, 0, id - 1, 0, 0, id - 1, 0]);
        }
        let last = types.len() - 9;
        types[last] = 1; // named s
        let btf = KernelBtf::from_bytes(&blob(&types, b"\0s\0")).unwrap();
        let err = btf.offset_of("s", &["x"]).unwrap_err();
        assert!(err.to_string().contains("too many nested members"), "{err}");
    }
}
