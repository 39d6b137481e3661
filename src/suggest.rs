//! "Did you mean …?": the nearest of the names a value could have been, for a typo in an
//! event's key, a command or a flag. One measure everywhere, so every suggestion reads
//! the same.

/// The candidate within edit distance 2 of `word`, to suggest for a typo (the first of the
/// nearest when several tie).
pub fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates.iter().copied().map(|c| (edit_distance(word, c), c)).filter(|(d, _)| *d <= 2).min().map(|(_, c)| c)
}

/// Levenshtein distance in characters: insertions, deletions and substitutions.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance_counts_insertions_deletions_and_substitutions() {
        assert_eq!(edit_distance("batchsize", "batch-size"), 1);
        assert_eq!(edit_distance("batch_size", "batch-size"), 1);
        assert_eq!(edit_distance("limt", "limit"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("系统", "系统设计"), 2);
        assert_eq!(edit_distance("same", "same"), 0);
    }

    #[test]
    fn the_nearest_within_two_edits_or_nothing() {
        let flags = ["batch-size", "max-attempts", "limit", "listen"];
        assert_eq!(closest("batchsize", &flags), Some("batch-size"));
        assert_eq!(closest("limt", &flags), Some("limit"));
        assert_eq!(closest("frobnicate", &flags), None);
    }
}
