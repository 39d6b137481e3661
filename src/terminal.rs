//! Text from outside (event fields, database messages, command-line values) made safe to
//! print on a terminal: control characters, which could move the cursor, retitle the
//! window, hide text or ring the bell, are shown escaped instead of sent raw, and so are
//! the invisible characters that reorder, hide or break text (bidirectional overrides and
//! marks, zero-width spaces, line separators). Everything human-readable that chronicle
//! prints passes through here, and JSON output too (`json`): JSON encoders escape only
//! the C0 controls, and a person reads JSON on a terminal as well (`| less`, `jq`'s raw
//! strings aside). Text is measured in terminal columns (`columns`, `fit`), CJK characters
//! being two wide: `Table` aligns every table by it, and `wrap` lays help text out in the
//! width of the terminal (`width`).

use std::borrow::Cow;
use std::io;

use serde::Serialize;
use unicode_width::UnicodeWidthStr;

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

/// Terminal columns a text takes: CJK characters are two wide, combining marks none
/// (the Unicode East Asian Width tables, through `unicode-width`).
pub fn columns(s: &str) -> usize {
    UnicodeWidthStr::width(s)
}

/// `text` cut to `width` terminal columns (CJK counts two), with `…` when cut.
pub fn fit(text: &str, width: usize) -> String {
    if columns(text) <= width {
        return text.to_string();
    }
    let mut end = 0;
    for (i, c) in text.char_indices() {
        if columns(&text[..i + c.len_utf8()]) + 1 > width {
            break;
        }
        end = i + c.len_utf8();
    }
    format!("{}…", &text[..end])
}

/// The width to lay text out in: `COLUMNS` when set to a number, else the width of the
/// terminal on stdout, else (not a terminal) 80.
pub fn width() -> usize {
    let from_env = std::env::var("COLUMNS").ok().and_then(|v| v.trim().parse::<usize>().ok());
    from_env.filter(|&n| n > 0).or_else(stdout_columns).unwrap_or(80)
}

#[cfg(unix)]
fn stdout_columns() -> Option<usize> {
    let mut size = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one winsize into the struct we pass; on a descriptor that
    // is not a terminal it fails and writes nothing.
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) };
    (rc == 0 && size.ws_col > 0).then_some(usize::from(size.ws_col))
}

#[cfg(not(unix))]
fn stdout_columns() -> Option<usize> {
    None
}

/// `text` reflowed into lines of at most `width` terminal columns: words are separated by
/// single spaces (line breaks in `text` count as spaces); a word wider than a line is
/// cut wherever it must be.
pub fn wrap(text: &str, width: usize) -> Vec<String> {
    let width = width.max(1);
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        let needed = if line.is_empty() { columns(word) } else { columns(&line) + 1 + columns(word) };
        if needed <= width {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
            continue;
        }
        if !line.is_empty() {
            lines.push(std::mem::take(&mut line));
        }
        for c in word.chars() {
            if !line.is_empty() && columns(&line) + columns(c.encode_utf8(&mut [0; 4])) > width {
                lines.push(std::mem::take(&mut line));
            }
            line.push(c);
        }
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(line);
    }
    lines
}

/// The least room `Table::max_total_width` leaves the last column.
const LAST_COLUMN_AT_LEAST: usize = 20;

/// How a column's cells sit in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A table for people: every cell made `printable` (so escaped control characters count
/// as printed), columns as wide as their widest cell in terminal columns (CJK two each),
/// two spaces apart, no trailing spaces. Every table chronicle prints goes through it.
#[derive(Debug, Clone)]
pub struct Table {
    indent: usize,
    align: Vec<Align>,
    max: Vec<Option<usize>>,
    total: Option<usize>,
    rows: Vec<Row>,
}

#[derive(Debug, Clone)]
enum Row {
    Cells(Vec<String>),
    /// A line of its own between rows (such as examples under a count), not measured.
    Line(String),
}

impl Table {
    /// A table with one column per entry of `align`, each line indented by `indent`.
    pub fn new(indent: usize, align: &[Align]) -> Table {
        Table { indent, align: align.to_vec(), max: vec![None; align.len()], total: None, rows: Vec::new() }
    }

    /// The last column's cells are cut so that lines stay within `width` columns, leaving
    /// it at least `LAST_COLUMN_AT_LEAST` whatever the other columns take.
    pub fn max_total_width(mut self, width: usize) -> Table {
        self.total = Some(width);
        self
    }

    /// Cells of column `col` are cut (`fit`) to at most `width` columns.
    pub fn max_width(mut self, col: usize, width: usize) -> Table {
        if let Some(m) = self.max.get_mut(col) {
            *m = Some(width);
        }
        self
    }

    /// Adds a row (the first is usually the header); missing cells are empty, extra ones
    /// ignored.
    pub fn row<I, S>(&mut self, cells: I)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut row: Vec<String> = cells
            .into_iter()
            .take(self.align.len())
            .enumerate()
            .map(|(i, c)| {
                let shown = printable(c.as_ref());
                match self.max[i] {
                    Some(m) => fit(&shown, m),
                    None => shown.into_owned(),
                }
            })
            .collect();
        row.resize(self.align.len(), String::new());
        self.rows.push(Row::Cells(row));
    }

    /// A line printed as it is (escaped) after the rows so far: it takes no part in the
    /// columns' widths.
    pub fn line(&mut self, text: impl AsRef<str>) {
        self.rows.push(Row::Line(printable(text.as_ref()).into_owned()));
    }

    /// The table, one line per row.
    pub fn render(&self) -> String {
        let mut rows = self.rows.clone();
        let width_of = |rows: &[Row], i: usize| {
            rows.iter()
                .filter_map(|r| match r {
                    Row::Cells(cells) => Some(columns(&cells[i])),
                    Row::Line(_) => None,
                })
                .max()
                .unwrap_or(0)
        };
        if let (Some(total), Some(last)) = (self.total, self.align.len().checked_sub(1)) {
            let others: usize = (0..last).map(|i| width_of(&rows, i) + 2).sum();
            let room = total.saturating_sub(self.indent + others).max(LAST_COLUMN_AT_LEAST);
            for r in &mut rows {
                if let Row::Cells(cells) = r {
                    cells[last] = fit(&cells[last], room);
                }
            }
        }
        let widths: Vec<usize> = (0..self.align.len()).map(|i| width_of(&rows, i)).collect();
        let mut out = String::new();
        for row in &rows {
            let row = match row {
                Row::Cells(cells) => cells,
                Row::Line(text) => {
                    out.push_str(text);
                    out.push('\n');
                    continue;
                }
            };
            let mut line = " ".repeat(self.indent);
            // Up to the end of the last cell's text: no padding trails a line, and a cell's
            // own spaces stay.
            let mut end = line.len();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = " ".repeat(widths[i] - columns(cell));
                if self.align[i] == Align::Right {
                    line.push_str(&pad);
                }
                line.push_str(cell);
                if !cell.is_empty() {
                    end = line.len();
                }
                if self.align[i] == Align::Left {
                    line.push_str(&pad);
                }
            }
            out.push_str(&line[..end]);
            out.push('\n');
        }
        out
    }
}

/// Where each cell of a table's line starts and ends, in terminal columns: cells are
/// separated by two spaces or more. For tests of the tables.
#[cfg(test)]
pub(crate) fn cell_spans(line: &str) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let (mut at, mut spaces) = (0, 0);
    let mut current: Option<(usize, usize)> = None;
    for c in line.chars() {
        let w = columns(c.encode_utf8(&mut [0; 4]));
        if c == ' ' {
            spaces += 1;
        } else {
            match current.as_mut() {
                Some(span) if spaces < 2 => span.1 = at + w,
                _ => {
                    spans.extend(current.take());
                    current = Some((at, at + w));
                }
            }
            spaces = 0;
        }
        at += w;
    }
    spans.extend(current);
    spans
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

    /// The column each cell of a line starts at, in terminal columns.
    fn starts(line: &str) -> Vec<usize> {
        let mut out = Vec::new();
        let mut prev_space = true;
        let mut at = 0;
        for c in line.chars() {
            if c != ' ' && prev_space {
                out.push(at);
            }
            prev_space = c == ' ';
            at += columns(c.encode_utf8(&mut [0; 4]));
        }
        out
    }

    #[test]
    fn columns_count_cjk_twice_and_combining_marks_not_at_all() {
        assert_eq!(columns("abc"), 3);
        assert_eq!(columns("分布式系统"), 10);
        assert_eq!(columns("《读书笔记》，第一章"), 20);
        assert_eq!(columns("ｆｕｌｌ"), 8);
        assert_eq!(columns("cafe\u{301}"), 4);
        assert_eq!(columns("한국어"), 6);
    }

    #[test]
    fn fit_cuts_to_the_columns_and_marks_the_cut() {
        assert_eq!(fit("short", 10), "short");
        assert_eq!(fit("a longer name", 6), "a lon…");
        assert_eq!(fit("分布式系统设计", 7), "分布式…");
        assert!(columns(&fit("分布式系统设计", 8)) <= 8);
    }

    #[test]
    fn table_columns_line_up_in_english_and_chinese() {
        let mut t = Table::new(2, &[Align::Left, Align::Right, Align::Left]);
        t.row(["NAME", "EVENTS", "NEWEST"]);
        t.row(["Reading notes", "7", "2025-03-01"]);
        t.row(["读书笔记", "1234567", "2025-03-02"]);
        t.row(["分布式系统设计与实践", "12", "2025-03-03"]);
        t.row(["mixed 混合 names", "0", "2025-03-04"]);
        let text = t.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5);
        let first = starts(lines[0]);
        for l in &lines[1..] {
            // The name column starts at the indent, the last one at the same column on
            // every line; the right-aligned counts end at the same column.
            assert_eq!(starts(l)[0], 2, "{text}");
            assert_eq!(starts(l).last(), first.last(), "{text}");
            let count_end = columns(l) - columns("2025-03-01") - 2;
            assert_eq!(count_end, columns(lines[0]) - columns("NEWEST") - 2, "{text}");
        }
        assert!(lines.iter().all(|l| !l.ends_with(' ')));

        let mut kv = Table::new(2, &[Align::Left, Align::Left]);
        kv.row(["reason", "ends with a space "]);
        kv.row(["client", ""]);
        assert_eq!(kv.render(), "  reason  ends with a space \n  client\n");
    }

    #[test]
    fn escaped_control_characters_count_as_printed() {
        let mut t = Table::new(0, &[Align::Left, Align::Left]);
        t.row(["NAME", "ID"]);
        t.row(["bad\u{1b}[2Jname", "1"]);
        t.row(["ok", "2"]);
        let text = t.render();
        assert!(!text.contains('\u{1b}'), "{text}");
        let lines: Vec<&str> = text.lines().collect();
        let id_at = |l: &str| columns(l) - 1;
        assert_eq!(id_at(lines[1]), id_at(lines[2]), "{text}");
        assert_eq!(id_at(lines[1]), columns("bad\\x1b[2Jname") + 2, "{text}");
    }

    #[test]
    fn lines_between_rows_take_no_part_in_the_widths() {
        let mut t = Table::new(0, &[Align::Left, Align::Right]);
        t.row(["stale entries:", "2"]);
        t.line("      0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e01 \u{7}");
        t.row(["in flight:", "10"]);
        assert_eq!(
            t.render(),
            "stale entries:   2\n      0195f3a0-1c2b-7d3e-8f40-5a6b7c8d9e01 \\x07\nin flight:      10\n"
        );
    }

    #[test]
    fn a_cut_column_stays_within_its_width() {
        let mut t = Table::new(0, &[Align::Left, Align::Left]).max_width(0, 10);
        t.row(["分布式系统设计与实践", "x"]);
        t.row(["a", "y"]);
        let text = t.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "分布式系…  x");
        assert_eq!(columns(lines[0]), columns(lines[1]), "{text}");
    }

    #[test]
    fn wrap_fills_lines_up_to_the_width_and_never_past_it() {
        let text = "Claims of one row before it ends failed with max_attempts_exceeded (1-1000).";
        for width in [21, 25, 33, 50, 80] {
            let lines = wrap(text, width);
            assert!(lines.iter().all(|l| columns(l) <= width), "{width}: {lines:?}");
            assert_eq!(lines.join(" "), text, "{width}");
            for pair in lines.windows(2) {
                let next_word = pair[1].split(' ').next().unwrap_or("");
                assert!(columns(&pair[0]) + 1 + columns(next_word) > width, "{width}: {lines:?}");
            }
        }
        assert_eq!(wrap("one\ntwo   three", 80), ["one two three"]);
        assert_eq!(wrap("", 80), [""]);
        assert_eq!(wrap("分布式系统设计", 6), ["分布式", "系统设", "计"]);
        assert_eq!(wrap("abcdefgh ij", 3), ["abc", "def", "gh", "ij"]);
    }
}
