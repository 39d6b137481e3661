//! Text from outside (event fields, database messages, command-line values) made safe to
//! print on a terminal: control characters, which could move the cursor, retitle the
//! window, hide text or ring the bell, are shown escaped instead of sent raw, and so are
//! the invisible characters that reorder, hide or break text (bidirectional overrides and
//! marks, zero-width spaces, line separators). Everything human-readable that chronicle
//! prints passes through here, and JSON output too (`json`): JSON encoders escape only
//! the C0 controls, and a person reads JSON on a terminal as well (`| less`, `jq`'s raw
//! strings aside). Tables measure text in terminal columns (`columns`, `fit`), CJK
//! characters being two wide.

use std::borrow::Cow;
use std::io;

use serde::Serialize;

/// Whether printing `c` raw could change what a terminal shows beyond the character, or
/// hide what is around it.
pub fn is_unsafe(c: char) -> bool {
    c.is_control() // C0 (ESC, BEL, CR, ...), DEL and C1 (CSI, OSC, ...)
        || ('\u{202A}'..='\u{202E}').contains(&c) // bidi embeddings and overrides
        || ('\u{2066}'..='\u{2069}').contains(&c) // bidi isolates
        || matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}') // bidi marks (Arabic, LTR, RTL)
        || matches!(c, '\u{200B}' | '\u{FEFF}') // zero-width space, zero-width no-break space (BOM)
        || matches!(c, '\u{2028}' | '\u{2029}') // line and paragraph separators
}

/// serde_json's compact output, with every character `is_unsafe` calls unsafe written as
/// a `\uXXXX` escape: the same JSON value, nothing a terminal obeys. serde_json escapes
/// the C0 controls itself (`write_char_escape`); the rest of a string reaches the
/// formatter as fragments, which this one escapes where it must.
#[derive(Debug, Clone, Copy, Default)]
pub struct SafeJsonFormatter;

impl serde_json::ser::Formatter for SafeJsonFormatter {
    fn write_string_fragment<W: ?Sized + io::Write>(&mut self, writer: &mut W, fragment: &str) -> io::Result<()> {
        let mut from = 0;
        for (i, c) in fragment.char_indices().filter(|&(_, c)| is_unsafe(c)) {
            writer.write_all(&fragment.as_bytes()[from..i])?;
            // Every unsafe character is in the Basic Multilingual Plane: one escape each.
            write!(writer, "\\u{:04x}", c as u32)?;
            from = i + c.len_utf8();
        }
        writer.write_all(&fragment.as_bytes()[from..])
    }
}

/// `value` as one line of JSON, through `SafeJsonFormatter`.
pub fn json(value: &impl Serialize) -> Result<String, serde_json::Error> {
    let mut out = Vec::new();
    value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, SafeJsonFormatter))?;
    // The formatter writes whole characters or ASCII escapes: the output is UTF-8.
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// `s` with every unsafe character escaped (`\x1b`, `\n`, `\u{202e}`), on one line.
pub fn printable(s: &str) -> Cow<'_, str> {
    escape(s, false)
}

/// Like `printable`, but keeps line breaks: for multi-line messages (errors) whose lines
/// chronicle wrote itself.
pub fn printable_lines(s: &str) -> Cow<'_, str> {
    escape(s, true)
}

fn escape(s: &str, keep_newlines: bool) -> Cow<'_, str> {
    let unsafe_here = |c: char| is_unsafe(c) && !(keep_newlines && c == '\n');
    if !s.chars().any(unsafe_here) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            _ if !unsafe_here(c) => out.push(c),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x80 => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
        }
    }
    Cow::Owned(out)
}

/// Terminal columns a text takes: CJK characters are two wide.
pub fn columns(s: &str) -> usize {
    s.chars()
        .map(|c| {
            if crate::search::is_cjk(c)
                || ('\u{3000}'..='\u{303F}').contains(&c)
                || ('\u{FF01}'..='\u{FF60}').contains(&c)
            {
                2
            } else {
                1
            }
        })
        .sum()
}

/// `text` cut to `width` terminal columns (CJK counts two), with `…` when cut.
pub fn fit(text: &str, width: usize) -> String {
    if columns(text) <= width {
        return text.to_string();
    }
    let mut out = String::new();
    for c in text.chars() {
        if columns(&out) + columns(&c.to_string()) + 1 > width {
            break;
        }
        out.push(c);
    }
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_in_any_script_is_left_alone() {
        for s in ["Renamed book \"Old\" → \"New\"", "分布式系统", "naïve café", "", "a\u{200d}b emoji 👩‍💻"]
        {
            assert!(matches!(printable(s), Cow::Borrowed(_)), "{s:?}");
        }
    }

    #[test]
    fn escape_sequences_bells_and_overrides_are_shown_not_sent() {
        assert_eq!(printable("\u{1b}[31mred\u{1b}[0m"), "\\x1b[31mred\\x1b[0m");
        assert_eq!(printable("\u{1b}]0;title\u{7}"), "\\x1b]0;title\\x07");
        assert_eq!(printable("a\u{9b}2Jb"), "a\\u{9b}2Jb"); // C1 CSI
        assert_eq!(printable("x\u{7f}y"), "x\\x7fy");
        assert_eq!(printable("admin\u{202e}txt.exe"), "admin\\u{202e}txt.exe");
        assert_eq!(printable("one\ntwo\r\tthree"), "one\\ntwo\\r\\tthree");
        assert_eq!(printable_lines("line one\nline \u{1b}[2J two"), "line one\nline \\x1b[2J two");
    }

    #[test]
    fn invisible_marks_and_separators_are_shown_not_sent() {
        for (c, shown) in [
            ('\u{200b}', "\\u{200b}"),
            ('\u{200f}', "\\u{200f}"),
            ('\u{061c}', "\\u{61c}"),
            ('\u{2028}', "\\u{2028}"),
            ('\u{feff}', "\\u{feff}"),
            ('\u{2067}', "\\u{2067}"),
        ] {
            assert_eq!(printable(&format!("a{c}b")), format!("a{shown}b"));
        }
    }

    #[test]
    fn json_escapes_what_text_escapes_and_keeps_the_value() {
        let hostile = "\u{1b}[2J\u{7f}\u{9b}31m\u{202e}\u{2067}\u{200b}\u{200f}\u{061c}\u{2028}\u{feff}\"\\\n 分布式 👩\u{200d}💻";
        let value = serde_json::json!({ "title": hostile, hostile: [1, 2.5, null, true] });
        let out = json(&value).unwrap();
        assert!(!out.chars().any(is_unsafe), "{out}");
        assert!(
            out.contains("\\u001b[2J\\u007f\\u009b31m\\u202e\\u2067\\u200b\\u200f\\u061c\\u2028\\ufeff\\\"\\\\\\n 分布式 👩\u{200d}💻"),
            "{out}"
        );
        assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap(), value, "the same value");
        // Nothing to escape: exactly serde_json's compact output.
        let plain = serde_json::json!({ "a": "naïve café 分布式", "n": 12345678901234567890u64 });
        assert_eq!(json(&plain).unwrap(), plain.to_string());
    }

    #[test]
    fn nothing_unsafe_survives_any_input() {
        let all: String = (0u32..0x3000).chain(0xFE00..0xFF00).filter_map(char::from_u32).collect();
        for out in [printable(&all), printable_lines(&all)] {
            assert!(!out.chars().any(|c| is_unsafe(c) && c != '\n'), "an unsafe character survived");
        }
        assert!(!printable(&all).contains('\n'));
        let out = json(&all).unwrap();
        assert!(!out.chars().any(is_unsafe), "an unsafe character survived in JSON");
        assert_eq!(serde_json::from_str::<String>(&out).unwrap(), all);
    }
}
