//! Text from outside (event fields, database messages, command-line values) made safe to
//! print on a terminal: control characters, which could move the cursor, retitle the
//! window, hide text or ring the bell, are shown escaped instead of sent raw, and so are
//! the invisible characters that reorder text (bidirectional overrides). Everything
//! human-readable that chronicle prints passes through here; JSON output does not need
//! it (the encoder escapes control characters itself). Tables measure text in terminal
//! columns (`columns`, `fit`), CJK characters being two wide.

use std::borrow::Cow;

/// Whether printing `c` raw could change what a terminal shows beyond the character.
fn is_unsafe(c: char) -> bool {
    c.is_control() // C0 (ESC, BEL, CR, ...), DEL and C1 (CSI, OSC, ...)
        || ('\u{202A}'..='\u{202E}').contains(&c) // bidi embeddings and overrides
        || ('\u{2066}'..='\u{2069}').contains(&c) // bidi isolates
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
    fn nothing_unsafe_survives_any_input() {
        let all: String = (0u32..0x3000).filter_map(char::from_u32).collect();
        for out in [printable(&all), printable_lines(&all)] {
            assert!(!out.chars().any(|c| is_unsafe(c) && c != '\n'), "an unsafe character survived");
        }
        assert!(!printable(&all).contains('\n'));
    }
}
