//! Text on its way to a terminal. Process names, service names from cgroup
//! paths, pod and container names, namespace names, and the diagnoses built
//! from them are chosen by whoever runs on the host: a process can name
//! itself `\e]0;…\a` to retitle the reader's terminal or `\e[2J` to wipe it.
//! Every table cell and every line under a row goes through here, so such a
//! name shows as text instead of acting on the terminal (#12).

use std::{borrow::Cow, fmt::Write as _};

use comfy_table::Cell;

/// `text` with every C0 control character, DEL, C1 control character and
/// backslash written out as an escape. The backslash is escaped too, so that
/// a name that really contains `\e` reads `\\e` and cannot pass for an ESC.
/// Text with nothing to escape comes back borrowed, as nearly all does.
pub fn terminal_safe(text: &str) -> Cow<'_, str> {
    let needs_escape = |c: char| c == '\\' || c.is_control();
    let Some(first) = text.find(needs_escape) else {
        return Cow::Borrowed(text);
    };
    let mut out = String::with_capacity(text.len() + 8);
    out.push_str(&text[..first]);
    for c in text[first..].chars() {
        // char::is_control is exactly C0, DEL and C1 (Unicode category Cc).
        match c {
            '\\' => out.push_str("\\\\"),
            '\x1b' => out.push_str("\\e"),
            '\x07' => out.push_str("\\a"),
            '\0'..='\x1f' | '\x7f' => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// A table cell holding `text` made terminal-safe. Tables build their cells
/// with this rather than `Cell::new`. Escaping the content, not the rendered
/// table, keeps comfy-table's widths right and its own colours working.
pub fn cell(text: impl ToString) -> Cell {
    let text = text.to_string();
    Cell::new(match terminal_safe(&text) {
        Cow::Borrowed(_) => text,
        Cow::Owned(escaped) => escaped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_borrowed_untouched() {
        for text in [
            "",
            "envoy[4242]",
            "pod default/web-7f9 nginx",
            "RST ×48,211 ← é",
        ] {
            let safe = terminal_safe(text);
            assert!(matches!(safe, Cow::Borrowed(_)), "{text:?} was copied");
            // Borrowed means the very same bytes, not an equal copy.
            assert_eq!(safe.as_ptr(), text.as_ptr());
        }
    }

    #[test]
    fn every_c0_character_is_escaped() {
        let expected = [
            "\\x00", "\\x01", "\\x02", "\\x03", "\\x04", "\\x05", "\\x06", "\\a", "\\x08", "\\x09",
            "\\x0a", "\\x0b", "\\x0c", "\\x0d", "\\x0e", "\\x0f", "\\x10", "\\x11", "\\x12",
            "\\x13", "\\x14", "\\x15", "\\x16", "\\x17", "\\x18", "\\x19", "\\x1a", "\\e", "\\x1c",
            "\\x1d", "\\x1e", "\\x1f",
        ];
        for (byte, want) in (0u8..0x20).zip(expected) {
            let text = format!("a{}b", byte as char);
            assert_eq!(
                terminal_safe(&text),
                format!("a{want}b"),
                "byte {byte:#04x}"
            );
        }
    }

    #[test]
    fn del_is_escaped() {
        assert_eq!(terminal_safe("a\x7fb"), "a\\x7fb");
    }

    #[test]
    fn every_c1_character_is_escaped() {
        for code in 0x80u32..=0x9f {
            let c = char::from_u32(code).unwrap();
            let want = format!("x\\u{{{code:x}}}y");
            assert_eq!(terminal_safe(&format!("x{c}y")), want);
        }
        // The two that terminals act on most: CSI and OSC.
        assert_eq!(terminal_safe("\u{9b}2J\u{9d}0;t"), "\\u{9b}2J\\u{9d}0;t");
        // Just past C1 is printable.
        assert_eq!(terminal_safe("\u{a0}"), "\u{a0}");
    }

    #[test]
    fn a_backslash_is_escaped_so_escapes_stay_unambiguous() {
        assert_eq!(terminal_safe("a\\b"), "a\\\\b");
        // A literal "\e" and a real ESC must not print the same.
        assert_eq!(terminal_safe("\\e"), "\\\\e");
        assert_eq!(terminal_safe("\x1b"), "\\e");
    }

    #[test]
    fn a_hostile_comm_prints_as_text() {
        assert_eq!(terminal_safe("\x1b]0;pwn\x07"), "\\e]0;pwn\\a");
        assert_eq!(terminal_safe("\x1b[2J"), "\\e[2J");
    }

    #[test]
    fn cells_hold_the_escaped_text() {
        assert_eq!(cell("\x1b[2J").content(), "\\e[2J");
        assert_eq!(cell(42).content(), "42");
    }
}
