//! Search tokenization shared by the entries' search documents and by search queries.
//!
//! Postgres indexes `to_tsvector('simple', document)` and matches it against a tsquery
//! built from query terms. Its default parser treats a whole run of CJK characters as
//! one word, so the title "分布式系统设计" would only be found by searching for that exact
//! run, never for the word "系统" inside it. We therefore tokenize on our side, the same
//! way for documents and for queries:
//!
//! - a run of letters and digits (any script but CJK) is one word, lowercased;
//! - a run of CJK characters (Han, Hiragana, Katakana, Hangul) becomes its overlapping
//!   bigrams ("分布 布式 式系 …"); a document also carries each single character, so a
//!   one-character query finds it, and a lone CJK character is itself;
//! - everything else (spaces, punctuation, operators) separates tokens and is dropped.
//!
//! Dropping punctuation from documents is deliberate: Postgres' parser would otherwise
//! read `example.com` or `/a/b` as single host or file tokens that the query terms
//! `example`, `com` could never match. With only letters, digits and CJK left, every
//! document token is one Postgres word and lines up with a query term.

/// The most bytes a search document may have: tsvector values are limited to 1 MB and
/// block texts can be far larger, while a few KiB already say what an entry is about.
pub const MAX_DOCUMENT_BYTES: usize = 64 * 1024;

/// The most characters of one word that are kept. Postgres ignores words over 2 KiB
/// and refuses such lexemes in a tsquery; cutting words here, the same way for
/// documents and queries, keeps long words findable by prefix.
pub const MAX_WORD_CHARS: usize = 100;

/// The most terms a query is turned into; the rest of an over-long query is ignored.
pub const MAX_QUERY_TERMS: usize = 32;

/// The text to index for a document made of `parts`: their tokens separated by single
/// spaces, at most `MAX_DOCUMENT_BYTES` long (cut between tokens).
pub fn document(parts: &[&str]) -> String {
    let mut out = String::new();
    let tokens = parts.iter().flat_map(|part| tokens(part, Mode::Document));
    for token in tokens {
        let needed = token.len() + usize::from(!out.is_empty());
        if out.len() + needed > MAX_DOCUMENT_BYTES {
            break;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&token);
    }
    out
}

/// The terms of a user query, in order, without duplicates, to be matched as prefixes
/// against a document's tokens. Each term holds only letters, digits or CJK characters
/// (no quotes, backslashes, spaces or tsquery operators), so it can be quoted into a
/// tsquery lexeme as is. An empty result means the query has nothing to search for.
pub fn query_terms(q: &str) -> Vec<String> {
    let mut terms: Vec<String> = Vec::new();
    for token in tokens(q, Mode::Query) {
        if terms.len() == MAX_QUERY_TERMS {
            break;
        }
        if !terms.contains(&token) {
            terms.push(token);
        }
    }
    terms
}

/// Whether tokens are made for a document (CJK single characters included) or a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Document,
    Query,
}

/// The tokens of `text`, lazily, so a huge text costs only what the document keeps.
fn tokens(text: &str, mode: Mode) -> impl Iterator<Item = String> + '_ {
    Runs { rest: text }.flat_map(move |run| -> Box<dyn Iterator<Item = String> + '_> {
        match run {
            Run::Word(word) => Box::new(std::iter::once(normalize_word(word))),
            Run::Cjk(cjk) => Box::new(cjk_tokens(cjk, mode)),
        }
    })
}

/// A word lowercased and cut to `MAX_WORD_CHARS`. Characters that lowercasing turns
/// into something other than a letter or digit (a combining dot) are dropped.
fn normalize_word(word: &str) -> String {
    word.chars().flat_map(char::to_lowercase).filter(|c| c.is_alphanumeric()).take(MAX_WORD_CHARS).collect()
}

/// The overlapping bigrams of a CJK run, each preceded by its first character when
/// making a document, or the run itself when it is a single character.
fn cjk_tokens(run: &str, mode: Mode) -> impl Iterator<Item = String> + '_ {
    let lone = run.chars().nth(1).is_none();
    let with_unigrams = lone || mode == Mode::Document;
    let following = run.chars().skip(1).map(Some).chain(std::iter::once(None));
    run.chars().zip(following).flat_map(move |(c, next)| {
        let unigram = with_unigrams.then(|| c.to_string());
        let bigram = next.map(|n| [c, n].iter().collect::<String>());
        unigram.into_iter().chain(bigram)
    })
}

/// A maximal run of characters of one class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run<'a> {
    Word(&'a str),
    Cjk(&'a str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Word,
    Cjk,
    Separator,
}

fn class(c: char) -> Class {
    if !c.is_alphanumeric() {
        Class::Separator
    } else if is_cjk(c) {
        Class::Cjk
    } else {
        Class::Word
    }
}

/// Whether `c` (a letter or digit) is written without spaces between words: Han,
/// Hiragana, Katakana or Hangul.
pub fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x1100..=0x11FF       // Hangul Jamo
        | 0x3005..=0x3007     // 々 〆 〇
        | 0x3040..=0x30FF     // Hiragana, Katakana
        | 0x3130..=0x318F     // Hangul Compatibility Jamo
        | 0x31F0..=0x31FF     // Katakana Phonetic Extensions
        | 0x3400..=0x4DBF     // CJK Extension A
        | 0x4E00..=0x9FFF     // CJK Unified Ideographs
        | 0xA960..=0xA97F     // Hangul Jamo Extended-A
        | 0xAC00..=0xD7FF     // Hangul Syllables, Jamo Extended-B
        | 0xF900..=0xFAFF     // CJK Compatibility Ideographs
        | 0xFF66..=0xFF9F     // Halfwidth Katakana
        | 0x1B000..=0x1B16F   // Kana Supplement and Extended-A
        | 0x20000..=0x323AF   // CJK Extensions B to H, Compatibility Supplement
    )
}

/// Splits text into runs of word or CJK characters, skipping separators.
struct Runs<'a> {
    rest: &'a str,
}

impl<'a> Iterator for Runs<'a> {
    type Item = Run<'a>;

    fn next(&mut self) -> Option<Run<'a>> {
        let start = self.rest.find(|c| class(c) != Class::Separator)?;
        let rest = &self.rest[start..];
        let kind = rest.chars().next().map(class)?;
        let end = rest.find(|c| class(c) != kind).unwrap_or(rest.len());
        self.rest = &rest[end..];
        let run = &rest[..end];
        Some(if kind == Class::Cjk { Run::Cjk(run) } else { Run::Word(run) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<&str> {
        s.split(' ').collect()
    }

    #[test]
    fn english_text_becomes_lowercase_words() {
        assert_eq!(document(&["Renamed book \"Ops\" → \"Ops Guide\""]), "renamed book ops ops guide");
        assert_eq!(query_terms("Ops GUIDE"), ["ops", "guide"]);
    }

    #[test]
    fn chinese_title_is_found_by_a_two_character_word_inside_it() {
        let doc = document(&["分布式系统设计"]);
        assert!(words(&doc).contains(&"系统"), "{doc}");
        assert_eq!(query_terms("系统"), ["系统"]);
        for term in query_terms("系统设计") {
            assert!(words(&doc).contains(&term.as_str()), "{term} not in {doc}");
        }
    }

    #[test]
    fn chinese_run_gives_bigrams_and_single_characters_in_documents() {
        assert_eq!(document(&["分布式"]), "分 分布 布 布式 式");
        assert_eq!(document(&["书"]), "书");
    }

    #[test]
    fn chinese_query_gives_bigrams_or_a_lone_character() {
        assert_eq!(query_terms("分布式"), ["分布", "布式"]);
        assert_eq!(query_terms("书"), ["书"]);
        assert_eq!(query_terms("统"), ["统"]);
        assert!(words(&document(&["系统"])).contains(&"统"));
    }

    #[test]
    fn japanese_and_korean_runs_are_split_too() {
        assert_eq!(query_terms("東京タワー"), ["東京", "京タ", "タワ", "ワー"]);
        assert_eq!(query_terms("안녕하세요"), ["안녕", "녕하", "하세", "세요"]);
    }

    #[test]
    fn mixed_text_separates_scripts_even_without_spaces() {
        assert_eq!(document(&["Rust编程v2"]), "rust 编 编程 程 v2");
        assert_eq!(query_terms("Rust编程，入门!"), ["rust", "编程", "入门"]);
        assert_eq!(query_terms("naïve Café"), ["naïve", "café"]);
    }

    #[test]
    fn punctuation_and_operators_are_dropped() {
        assert_eq!(query_terms("a & b | !c (d:*) 'e' \\f"), ["a", "b", "c", "d", "e", "f"]);
        assert_eq!(query_terms("example.com/a_b-c"), ["example", "com", "a", "b", "c"]);
        assert_eq!(document(&["example.com/a_b-c"]), "example com a b c");
        assert_eq!(query_terms("「设计」。"), ["设计"]);
    }

    #[test]
    fn sql_looking_input_gives_only_words() {
        assert_eq!(query_terms("'; drop table x; --"), ["drop", "table", "x"]);
        for term in query_terms("''; <-> <2> !! '\\' && ||") {
            assert!(term.chars().all(char::is_alphanumeric), "{term:?}");
        }
    }

    #[test]
    fn empty_or_punctuation_only_input_has_no_terms() {
        assert!(query_terms("").is_empty());
        assert!(query_terms("  &|!():*'  ").is_empty());
        assert_eq!(document(&[]), "");
        assert_eq!(document(&["", "--", ""]), "");
    }

    #[test]
    fn query_terms_are_deduplicated_and_capped() {
        assert_eq!(query_terms("ops OPS ops guide"), ["ops", "guide"]);
        let many: String = (0..100).map(|i| format!("w{i} ")).collect();
        assert_eq!(query_terms(&many).len(), MAX_QUERY_TERMS);
    }

    #[test]
    fn long_words_are_cut_the_same_way_in_documents_and_queries() {
        let long = "x".repeat(5000);
        assert_eq!(document(&[&long]).chars().count(), MAX_WORD_CHARS);
        assert_eq!(query_terms(&long), [document(&[&long])]);
    }

    #[test]
    fn parts_are_joined_with_spaces() {
        assert_eq!(document(&["Ops", "", "Work Shelf", "设计"]), "ops work shelf 设 设计 计");
    }

    #[test]
    fn document_is_capped_between_tokens() {
        let huge = "word ".repeat(100_000);
        let doc = document(&["start", &huge]);
        assert!(doc.len() <= MAX_DOCUMENT_BYTES);
        assert!(doc.len() > MAX_DOCUMENT_BYTES - 10);
        assert!(doc.starts_with("start word"));
        assert!(words(&doc).iter().all(|w| *w == "start" || *w == "word"));

        let chinese = "分布式系统设计".repeat(20_000);
        let doc = document(&[&chinese]);
        assert!(doc.len() <= MAX_DOCUMENT_BYTES);
        assert!(words(&doc).iter().all(|w| matches!(w.chars().count(), 1 | 2)));
    }
}
