//! Kernel struct member offsets from the running kernel's BTF. aya cannot
//! emit CO-RE relocations from Rust, so the loader measures every offset the
//! programs need here and passes them in as globals.

use std::path::Path;

use anyhow::{Context as _, Result, anyhow, bail};
use btf_rs::{Btf, Type};
use tcprst_common::{ABSENT, KernelOffsets};

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
/// The feature `kernel_offsets` reports lost when the function tiers'
/// members are missing.
pub const FUNCTION_TIERS: &str = "the kprobe and fentry tiers";

/// btf-rs trusts the header: offsets that overflow panic, and a string
/// section past the end of the data loops forever. Check it first.
fn check_header(bytes: &[u8]) -> Result<()> {
    const HEADER: usize = 24;
    if bytes.len() < HEADER {
        bail!("{} bytes is too short for a BTF header", bytes.len());
    }
    let u16_at = |at: usize| [bytes[at], bytes[at + 1]];
    let from = match u16_at(0) {
        [0x9f, 0xeb] => u32::from_le_bytes,
        [0xeb, 0x9f] => u32::from_be_bytes,
        _ => bail!("no BTF magic"),
    };
    let u32_at = |at: usize| from([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let [hdr_len, type_off, type_len, str_off, str_len] =
        [4, 8, 12, 16, 20].map(|at| u64::from(u32_at(at)));
    if (hdr_len as usize) < HEADER {
        bail!("BTF header length {hdr_len} is shorter than a header");
    }
    for (what, off, len) in [("type", type_off, type_len), ("string", str_off, str_len)] {
        // u64 arithmetic cannot overflow on u32 operands.
        if hdr_len + off + len > bytes.len() as u64 {
            bail!("the BTF {what} section runs past the end of the data");
        }
    }
    Ok(())
}

pub struct KernelBtf {
    btf: Btf,
}

impl KernelBtf {
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_bytes(&bytes)
            .map_err(|e| anyhow!("{} is not a usable BTF file: {e}", path.display()))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        check_header(bytes)?;
        let btf = Btf::from_bytes(bytes).map_err(|e| anyhow!("not usable BTF: {e}"))?;
        Ok(Self { btf })
    }

    /// Byte offset of `path` (member names, outermost first) inside
    /// `struct <root>`, looking through anonymous structs and unions and
    /// through typedefs, as C's `offsetof(struct root, a.b.c)` does.
    pub fn offset_of(&self, root: &str, path: &[&str]) -> Result<u32> {
        let mut ty = self.named_struct(root)?;
        let mut bits = 0u32;
        for (i, member) in path.iter().enumerate() {
            let (member_bits, member_ty) = self
                .find_member(&ty, member)?
                .ok_or_else(|| anyhow!("struct {root} has no member {}", path[..=i].join(".")))?;
            bits += member_bits;
            ty = member_ty;
        }
        if !bits.is_multiple_of(8) {
            bail!("{root}.{} is a bitfield", path.join("."));
        }
        Ok(bits / 8)
    }

    fn named_struct(&self, name: &str) -> Result<Type> {
        self.btf
            .resolve_types_by_name(name)
            .map_err(|e| anyhow!("no type {name} in BTF: {e}"))?
            .into_iter()
            .find(|t| matches!(t, Type::Struct(s) if !s.members.is_empty()))
            .ok_or_else(|| anyhow!("no struct {name} in BTF"))
    }

    /// Strips typedefs and qualifiers.
    fn concrete(&self, mut ty: Type) -> Result<Type> {
        loop {
            ty = match &ty {
                Type::Typedef(_)
                | Type::Const(_)
                | Type::Volatile(_)
                | Type::Restrict(_)
                | Type::TypeTag(_) => self.chained(&ty)?,
                _ => return Ok(ty),
            }
        }
    }

    fn chained(&self, ty: &Type) -> Result<Type> {
        let bt = ty
            .as_btf_type()
            .ok_or_else(|| anyhow!("{} has no referenced type", ty.name()))?;
        self.btf.resolve_chained_type(bt)
    }

    /// (bit offset, type) of `name` in a struct or union, searching
    /// anonymous members depth-first.
    fn find_member(&self, ty: &Type, name: &str) -> Result<Option<(u32, Type)>> {
        let (Type::Struct(s) | Type::Union(s)) = self.concrete(ty.clone())? else {
            bail!("{} is not a struct or union", ty.name());
        };
        for member in &s.members {
            let member_name = self.btf.resolve_name(member).unwrap_or_default();
            let member_ty = self.btf.resolve_chained_type(member)?;
            if member_name == name {
                return Ok(Some((member.bit_offset(), member_ty)));
            }
            if member_name.is_empty()
                && let Some((inner, found)) = self.find_member(&member_ty, name)?
            {
                return Ok(Some((member.bit_offset() + inner, found)));
            }
        }
        Ok(None)
    }

    /// A kernel module's BTF, which only adds to the kernel's (split BTF).
    pub fn module(&self, path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        check_header(&bytes)?;
        let btf = Btf::from_split_bytes(&bytes, &self.btf)
            .map_err(|e| anyhow!("{} is not a usable module BTF file: {e}", path.display()))?;
        Ok(Self { btf })
    }

    /// The parameter names of function `name`, in order.
    pub fn function_params(&self, name: &str) -> Result<Vec<String>> {
        let func = self
            .btf
            .resolve_types_by_name(name)
            .unwrap_or_default()
            .into_iter()
            .find(|t| matches!(t, Type::Func(_)))
            .ok_or_else(|| anyhow!("no function {name} in BTF"))?;
        let Type::FuncProto(proto) = self.chained(&func)? else {
            bail!("function {name} has no prototype in BTF");
        };
        proto
            .parameters
            .iter()
            .map(|p| self.btf.resolve_name(p))
            .collect()
    }

    /// The name → value pairs of `enum <name>`.
    pub fn enum_values(&self, name: &str) -> Result<Vec<(u64, String)>> {
        let types = self.btf.resolve_types_by_name(name).unwrap_or_default();
        let Some(Type::Enum(e)) = types.into_iter().find(|t| matches!(t, Type::Enum(_))) else {
            bail!("no enum {name} in BTF");
        };
        e.members
            .iter()
            .map(|m| Ok((u64::from(m.val()), self.btf.resolve_name(m)?)))
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
            skb_dev: optional(NO_SOCKET_NETNS, &[("sk_buff", &["dev"])]),
            dev_nd_net: optional(NO_SOCKET_NETNS, &[("net_device", &["nd_net", "net"])]),
            task_flags: optional(CONTEXT, &[("task_struct", &["flags"])]),
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
        };
        Ok((offsets, lost))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The running kernel's BTF is a real input every Linux CI host with BTF
    // has; these assert structural facts that hold on any kernel, not this
    // machine's numbers.
    fn vmlinux() -> Option<KernelBtf> {
        if !Path::new(VMLINUX).exists() {
            eprintln!("skipped: this kernel has no {VMLINUX}");
            return None;
        }
        Some(KernelBtf::from_file(Path::new(VMLINUX)).unwrap())
    }

    #[test]
    fn finds_members_inside_anonymous_unions() {
        let Some(btf) = vmlinux() else { return };
        // sk_buff.dev sits in an anonymous struct inside an anonymous union,
        // right after the next/prev list pointers.
        assert_eq!(btf.offset_of("sk_buff", &["dev"]).unwrap(), 16);
        // skc_family is the first member after the address/hash unions.
        let family = btf.offset_of("sock_common", &["skc_family"]).unwrap();
        let state = btf.offset_of("sock_common", &["skc_state"]).unwrap();
        assert_eq!(state, family + 2);
    }

    #[test]
    fn looks_through_typedefs() {
        let Some(btf) = vmlinux() else { return };
        let via_typedef = btf.offset_of("sock_common", &["skc_net", "net"]).unwrap();
        assert_eq!(
            via_typedef,
            btf.offset_of("sock_common", &["skc_net"]).unwrap()
        );
    }

    #[test]
    fn reports_missing_members_by_path() {
        let Some(btf) = vmlinux() else { return };
        let err = btf
            .offset_of("sock_common", &["skc_net", "nope"])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "struct sock_common has no member skc_net.nope"
        );
        assert!(btf.offset_of("no_such_struct_tcprst", &["x"]).is_err());
    }

    #[test]
    fn this_kernel_has_every_offset() {
        let Some(btf) = vmlinux() else { return };
        let (offsets, lost) = btf.kernel_offsets().unwrap();
        assert!(lost.is_empty(), "{lost:?}");
        assert_ne!(offsets.kn_id, ABSENT);
    }

    /// Without the socket's namespace and state there is nothing to run.
    #[test]
    fn missing_required_members_are_an_error() {
        // The eBPF object's own BTF has none of the kernel's structs.
        let btf = KernelBtf::from_bytes(include_bytes!(
            "../../fuzz/seeds/btf_offsets/tcprst-ebpf.btf"
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
        let Some(btf) = vmlinux() else { return };
        let states = btf.enum_values("skb_drop_reason").unwrap();
        assert!(
            states
                .iter()
                .any(|(_, n)| n == "SKB_DROP_REASON_NOT_SPECIFIED")
        );
    }

    /// Found by the btf_offsets fuzz target: header offsets that overflow.
    #[test]
    fn rejects_headers_pointing_past_the_data() {
        let crash = include_bytes!("../testdata/btf-crash-header-overflow");
        let err = KernelBtf::from_bytes(crash).err().unwrap();
        assert!(err.to_string().contains("runs past the end"), "{err}");
        let mut short = include_bytes!("../../fuzz/seeds/btf_offsets/tcprst-ebpf.btf").to_vec();
        short.truncate(100);
        assert!(KernelBtf::from_bytes(&short).is_err());
        assert!(KernelBtf::from_bytes(&[0x9f, 0xeb, 1]).is_err());
    }

    #[test]
    fn parses_a_real_object_btf() {
        let btf = KernelBtf::from_bytes(include_bytes!(
            "../../fuzz/seeds/btf_offsets/tcprst-ebpf.btf"
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
}
