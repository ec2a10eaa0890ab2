//! Turns parsed tracepoint formats into the offset globals the kernel
//! programs read, and the reason numbers into the running kernel's names.

use std::{collections::BTreeMap, sync::Arc};

use anyhow::{Result, bail};
use tcprst_common::{ABSENT, ResetFields, TupleFields, tuple_style};

use crate::{bpf::btf::KernelBtf, bpf::tracefs::EventFormat};

/// Size of the `sockaddr_in6`-sized storage 6.10+ uses for `saddr`/`daddr`.
const SOCKADDR_STORAGE: u32 = 28;

fn offset(format: &EventFormat, name: &str) -> u32 {
    format.field(name).map_or(ABSENT, |f| f.offset)
}

fn require(format: &EventFormat, names: &[&str]) -> Result<()> {
    match names.iter().find(|n| format.field(n).is_none()) {
        Some(name) => bail!("the tracepoint has no {name} field; tcprst does not know this layout"),
        None => Ok(()),
    }
}

fn tuple_fields(format: &EventFormat) -> Result<TupleFields> {
    let offset = |name: &str| offset(format, name);
    let sockaddr_style = format
        .field("saddr")
        .is_some_and(|f| f.size == SOCKADDR_STORAGE);
    let tuple = if sockaddr_style {
        TupleFields {
            style: tuple_style::SOCKADDR,
            family: ABSENT,
            sport: ABSENT,
            dport: ABSENT,
            saddr: offset("saddr"),
            daddr: offset("daddr"),
            saddr_v6: ABSENT,
            daddr_v6: ABSENT,
        }
    } else {
        TupleFields {
            style: tuple_style::SPLIT,
            family: offset("family"),
            sport: offset("sport"),
            dport: offset("dport"),
            saddr: offset("saddr"),
            daddr: offset("daddr"),
            saddr_v6: offset("saddr_v6"),
            daddr_v6: offset("daddr_v6"),
        }
    };
    if sockaddr_style {
        require(format, &["saddr", "daddr"])?;
    } else {
        require(format, &["sport", "dport", "saddr_v6", "daddr_v6"])?;
    }
    Ok(tuple)
}

pub fn reset_fields(format: &EventFormat) -> Result<ResetFields> {
    Ok(ResetFields {
        skaddr: offset(format, "skaddr"),
        skbaddr: offset(format, "skbaddr"),
        state: offset(format, "state"),
        reason: offset(format, "reason"),
        sock_cookie: offset(format, "sock_cookie"),
        tuple: tuple_fields(format)?,
    })
}

/// `enum sk_rst_reason` names, whose numbering changes between kernels.
#[derive(Debug, Clone, Default)]
pub struct ReasonNames {
    names: BTreeMap<u64, Arc<str>>,
    /// Numbers named `REASON_n` and kept among `names`.
    unnamed: usize,
}

impl ReasonNames {
    /// From the `print fmt` of `tcp:tcp_send_reset`, or, where the kernel
    /// left the values symbolic there, from the BTF enum.
    pub fn load(send_format: &EventFormat, btf: Option<&KernelBtf>) -> Self {
        let from_format = send_format.symbolic_values("reason");
        if !from_format.is_empty() {
            return Self::from_pairs(from_format);
        }
        let from_btf = btf
            .and_then(|btf| btf.enum_values("sk_rst_reason").ok())
            .unwrap_or_default()
            .into_iter()
            .map(|(v, n)| (v, n.strip_prefix("SK_RST_REASON_").unwrap_or(&n).to_owned()));
        Self::from_pairs(from_btf)
    }

    pub(crate) fn from_pairs(pairs: impl IntoIterator<Item = (u64, String)>) -> Self {
        Self {
            names: pairs.into_iter().map(|(v, n)| (v, Arc::from(n))).collect(),
            unnamed: 0,
        }
    }

    /// The kernel's name, or the number when this kernel gave none. A
    /// number is named once and kept, as the kernel's names are, so that
    /// every reset of one reason shares one `Arc`: the JSON sink picks a
    /// key's slot by its address. Past `UNNAMED_KEPT` such numbers (only
    /// garbled input could bring so many) each is named anew.
    pub(crate) fn name(&mut self, value: u32) -> Arc<str> {
        if let Some(name) = self.names.get(&u64::from(value)) {
            return name.clone();
        }
        let name: Arc<str> = Arc::from(format!("REASON_{value}"));
        if self.unnamed < UNNAMED_KEPT {
            self.unnamed += 1;
            self.names.insert(u64::from(value), name.clone());
        }
        name
    }
}

/// How many numbers without a kernel name `ReasonNames` keeps.
const UNNAMED_KEPT: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    fn format(text: &str) -> EventFormat {
        EventFormat::parse(text).unwrap()
    }

    #[test]
    fn sockaddr_layout_of_6_10_and_later() {
        let f = reset_fields(&format(include_str!(
            "../../testdata/format-6.18/tcp_send_reset"
        )))
        .unwrap();
        assert_eq!(f.tuple.style, tuple_style::SOCKADDR);
        assert_eq!((f.tuple.saddr, f.tuple.daddr), (32, 60));
        assert_eq!((f.skaddr, f.skbaddr, f.state, f.reason), (16, 8, 24, 28));
        assert_eq!(f.sock_cookie, ABSENT);
    }

    #[test]
    fn split_layout_of_older_kernels() {
        let f = reset_fields(&format(include_str!(
            "../../testdata/format-5.x/tcp_send_reset"
        )))
        .unwrap();
        assert_eq!(f.tuple.style, tuple_style::SPLIT);
        assert_eq!((f.tuple.sport, f.tuple.dport, f.tuple.family), (28, 30, 32));
        assert_eq!(
            (f.tuple.saddr, f.tuple.saddr_v6, f.tuple.daddr_v6),
            (34, 42, 58)
        );
        assert_eq!(f.reason, ABSENT);
    }

    #[test]
    fn receive_reset_has_a_cookie_and_no_state() {
        let f = reset_fields(&format(include_str!(
            "../../testdata/format-6.18/tcp_receive_reset"
        )))
        .unwrap();
        assert_eq!(f.tuple.style, tuple_style::SPLIT);
        assert_eq!((f.skaddr, f.sock_cookie, f.state), (8, 64, ABSENT));
    }

    #[test]
    fn refuses_an_unknown_layout() {
        let err = reset_fields(&format(
            "field:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;",
        ))
        .unwrap_err();
        assert!(err.to_string().contains("no sport field"), "{err}");
    }

    #[test]
    fn reason_names_come_from_the_kernel() {
        let mut names = ReasonNames::load(
            &format(include_str!("../../testdata/format-6.18/tcp_send_reset")),
            None,
        );
        assert_eq!(&*names.name(1), "NO_SOCKET");
        assert_eq!(&*names.name(8), "TCP_ABORT_ON_DATA");
        assert_eq!(&*names.name(999), "REASON_999");
    }

    /// Every reset of a reason shares one name, the kernel's or a number's;
    /// past 64 numbers, a number is still named, only not kept.
    #[test]
    fn an_unnamed_reason_is_named_once() {
        let mut names = ReasonNames::from_pairs([(1, "NO_SOCKET".into())]);
        assert!(Arc::ptr_eq(&names.name(1), &names.name(1)));
        let first = names.name(999);
        assert!(Arc::ptr_eq(&first, &names.name(999)));
        for value in 1000..1063 {
            names.name(value);
        }
        let past = names.name(5000);
        assert_eq!(&*past, "REASON_5000");
        assert!(!Arc::ptr_eq(&past, &names.name(5000)));
        assert!(Arc::ptr_eq(&first, &names.name(999)));
    }
}
