//! Help text as data, laid out for the terminal when printed: paragraphs are reflowed to
//! its width, flags and their descriptions are two aligned columns whose descriptions
//! wrap under their own column, and commands to copy are shown as written. The flags a
//! command accepts are read from its help too, to suggest one for a typo.

use crate::config::Setting;
use crate::terminal::{columns, wrap};

/// Help narrower than this is not laid out any narrower (the terminal wraps it).
const MIN_WIDTH: usize = 40;
/// Nor wider than this: long lines are hard to read.
const MAX_WIDTH: usize = 100;

#[derive(Debug, Clone)]
enum Block {
    /// Paragraphs separated by blank lines; line breaks inside one are spaces.
    Text(String),
    /// A title such as `FLAGS:`; what follows it comes without a blank line.
    Heading(String),
    /// Two columns: names on the left, descriptions wrapped under their own column.
    Rows(Vec<(String, String)>),
    /// Lines shown as written, indented by 4 (usage lines and examples to copy).
    Verbatim(Vec<String>),
}

/// The help of a command (or of chronicle): blocks rendered in order.
#[derive(Debug, Clone, Default)]
pub struct Help {
    blocks: Vec<Block>,
}

impl Help {
    /// Help that starts with `about` (reflowed paragraphs).
    pub fn new(about: impl Into<String>) -> Help {
        Help::default().text(about)
    }

    /// Paragraphs, separated by blank lines, each reflowed to the width.
    pub fn text(mut self, text: impl Into<String>) -> Help {
        self.blocks.push(Block::Text(text.into()));
        self
    }

    pub fn heading(mut self, title: impl Into<String>) -> Help {
        self.blocks.push(Block::Heading(title.into()));
        self
    }

    /// Two aligned columns, such as a flag and what it does.
    pub fn rows<I, L, R>(mut self, rows: I) -> Help
    where
        I: IntoIterator<Item = (L, R)>,
        L: Into<String>,
        R: Into<String>,
    {
        self.blocks.push(Block::Rows(rows.into_iter().map(|(l, r)| (l.into(), r.into())).collect()));
        self
    }

    /// Lines shown as written: they must fit in 80 columns themselves (a test checks).
    pub fn verbatim(mut self, lines: &[&str]) -> Help {
        self.blocks.push(Block::Verbatim(lines.iter().map(|l| l.to_string()).collect()));
        self
    }

    /// `USAGE:` and its lines.
    pub fn usage(self, lines: &[&str]) -> Help {
        self.heading("USAGE:").verbatim(lines)
    }

    /// `FLAGS:`: the settings (each with its variable and default), then `others`.
    pub fn flags(self, settings: &[&Setting], others: &[(&str, String)]) -> Help {
        self.flags_titled("FLAGS:", settings, others)
    }

    pub fn flags_titled(self, title: &str, settings: &[&Setting], others: &[(&str, String)]) -> Help {
        let rows =
            settings.iter().map(|s| setting_row(s)).chain(others.iter().map(|(f, d)| (f.to_string(), d.clone())));
        self.heading(title).rows(rows.collect::<Vec<_>>())
    }

    /// `EXAMPLES:` and its lines.
    pub fn examples(self, lines: &[&str]) -> Help {
        self.heading("EXAMPLES:").verbatim(lines)
    }

    /// Every long flag named at the start of a row (`--batch-size N` gives `batch-size`),
    /// and `help`.
    pub fn long_flags(&self) -> Vec<&str> {
        let mut flags = vec!["help"];
        for block in &self.blocks {
            if let Block::Rows(rows) = block {
                for (left, _) in rows {
                    let names = left.split([' ', ',', '|', '[', ']']).filter_map(|w| w.strip_prefix("--"));
                    flags.extend(names.filter(|n| !n.is_empty()));
                }
            }
        }
        flags.dedup();
        flags
    }

    /// The verbatim lines as printed, for tests: the only lines that may be wider than
    /// the width asked for.
    #[cfg(test)]
    pub(crate) fn verbatim_lines(&self) -> Vec<String> {
        let lines = self.blocks.iter().filter_map(|b| match b {
            Block::Verbatim(lines) => Some(lines.iter().map(|l| format!("    {l}"))),
            _ => None,
        });
        lines.flatten().collect()
    }

    /// The help laid out in the terminal's width (see `terminal::width`), kept between
    /// 40 and 100 columns.
    pub fn render_for_terminal(&self) -> String {
        self.render(crate::terminal::width().clamp(MIN_WIDTH, MAX_WIDTH))
    }

    /// The help laid out in `width` columns: every line within it but for verbatim lines
    /// wider than it.
    pub fn render(&self, width: usize) -> String {
        let mut out = String::new();
        let mut after_heading = true;
        for block in &self.blocks {
            if !after_heading {
                out.push('\n');
            }
            after_heading = matches!(block, Block::Heading(_));
            match block {
                Block::Text(text) => {
                    for (i, paragraph) in text.split("\n\n").enumerate() {
                        if i > 0 {
                            out.push('\n');
                        }
                        push_lines(&mut out, "", &wrap(paragraph, width));
                    }
                }
                Block::Heading(title) => push_lines(&mut out, "", &wrap(title, width)),
                Block::Rows(rows) => render_rows(&mut out, rows, width),
                Block::Verbatim(lines) => {
                    for l in lines {
                        out.push_str(&format!("    {l}\n"));
                    }
                }
            }
        }
        out
    }
}

/// A setting's row: `--flag METAVAR`, then what it does, its variable and its default.
fn setting_row(s: &Setting) -> (String, String) {
    let default = match s.default {
        Some(d) => format!("default {d}"),
        None if s.var == crate::config::DATABASE_URL.var => "required".to_string(),
        None => "unset".to_string(),
    };
    (format!("--{} {}", s.flag, s.metavar()), format!("{} [{}; {}]", s.help, s.var, default))
}

fn push_lines(out: &mut String, indent: &str, lines: &[String]) {
    for l in lines {
        out.push_str(indent);
        out.push_str(l);
        out.push('\n');
    }
}

/// Rows indented by 2: the left column as wide as its widest cell up to a third of the
/// width; a wider cell has its description start on the next line. Descriptions wrap
/// under their own column.
fn render_rows(out: &mut String, rows: &[(String, String)], width: usize) {
    let cap = width / 3;
    let left = rows.iter().map(|(l, _)| columns(l)).filter(|&w| w <= cap).max().unwrap_or(cap);
    let at = 2 + left + 2;
    let indent = " ".repeat(at);
    for (l, r) in rows {
        let lines = if r.is_empty() { Vec::new() } else { wrap(r, width.saturating_sub(at)) };
        let mut lines = lines.iter();
        if columns(l) <= left {
            let pad = " ".repeat(left - columns(l));
            match lines.next() {
                Some(first) => out.push_str(&format!("  {l}{pad}  {first}\n")),
                None => out.push_str(&format!("  {l}\n")),
            }
        } else {
            out.push_str(&format!("  {l}\n"));
        }
        for line in lines {
            out.push_str(&format!("{indent}{line}\n"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Help {
        Help::new("First paragraph that is long enough to need more than one line at forty columns.\n\nSecond.")
            .usage(&["chronicle sample [FLAGS]"])
            .flags(
                &[&crate::config::BATCH_SIZE],
                &[
                    ("--json", "Print JSON.".to_string()),
                    ("--a-flag-too-long-for-the-column VALUE", "Goes under its own column.".to_string()),
                ],
            )
            .examples(&["chronicle sample --json"])
    }

    #[test]
    fn every_line_fits_and_descriptions_wrap_under_their_column() {
        for width in [40, 60, 80, 100] {
            let text = sample().render(width);
            for l in text.lines() {
                assert!(columns(l) <= width, "{width}: {l:?}\n{text}");
            }
            // Every description line starts at one column.
            let lines: Vec<&str> = text.lines().collect();
            let json = lines.iter().find(|l| l.starts_with("  --json")).unwrap();
            let at = json.find("Print").unwrap();
            let start = lines.iter().position(|l| l.starts_with("  --batch-size")).unwrap();
            for l in &lines[start..] {
                if l.is_empty() {
                    break;
                }
                if !l.starts_with("  --") {
                    assert!(l[..at].trim().is_empty() && !l[at..].starts_with(' '), "{width}: {l:?}\n{text}");
                }
            }
        }
    }

    #[test]
    fn settings_show_their_variable_and_default() {
        let text = sample().render(80);
        assert!(text.contains("--batch-size N"), "{text}");
        let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(flat.contains("[OUTBOX_BATCH_SIZE; default 50]"), "{text}");
    }

    #[test]
    fn the_layout_at_forty_columns_wider_names_above_their_description() {
        let text = sample().render(40);
        let expected = "\
First paragraph that is long enough to
need more than one line at forty
columns.

Second.

USAGE:
    chronicle sample [FLAGS]

FLAGS:
  --batch-size N
          Outbox rows claimed per batch
          (1-10000). [OUTBOX_BATCH_SIZE;
          default 50]
  --json  Print JSON.
  --a-flag-too-long-for-the-column VALUE
          Goes under its own column.

EXAMPLES:
    chronicle sample --json
";
        assert_eq!(text, expected);
    }

    #[test]
    fn long_flags_are_read_from_the_rows() {
        assert_eq!(sample().long_flags(), ["help", "batch-size", "json", "a-flag-too-long-for-the-column"]);
        let modes = Help::new("x").rows([("--truncate, --swap", "modes"), ("required", "no flag")]);
        assert_eq!(modes.long_flags(), ["help", "truncate", "swap"]);
    }
}
