//! "Did you mean …?": the nearest valid name to a typo.

/// The candidate closest to `word`, if it is close enough to be the name the user meant.
///
/// Compares case-insensitively by optimal-string-alignment distance (swapping two
/// neighbouring letters is one edit). A word of two to seven characters may be one edit
/// away, longer words one edit per four characters; in words under five characters a
/// changed letter does not count (`gpu` is not a typo of `cpu`, but `stf` is of `sft`).
/// On a tie the first candidate wins.
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let word_lower = word.to_lowercase();
    let len = word_lower.chars().count();
    let allowed = (len / 4).max(usize::from(len >= 2));
    let mut best: Option<(usize, &'a str)> = None;
    for candidate in candidates {
        let candidate_lower = candidate.to_lowercase();
        let distance = strsim::osa_distance(&word_lower, &candidate_lower);
        let changed_letter = len < 5 && differs_in_one_place(&word_lower, &candidate_lower);
        if distance <= allowed && !changed_letter && best.is_none_or(|(d, _)| distance < d) {
            best = Some((distance, candidate));
        }
    }
    best.map(|(_, candidate)| candidate)
}

/// Same length, one position different: a substituted letter.
fn differs_in_one_place(a: &str, b: &str) -> bool {
    a.chars().count() == b.chars().count() && a.chars().zip(b.chars()).filter(|(x, y)| x != y).count() == 1
}

/// "; did you mean `x`?" when there is a close candidate, else "".
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    suggest(word, candidates).map(|s| format!("; did you mean `{s}`?")).unwrap_or_default()
}

/// "`a`", "one of `a`, `b`", or `none` when the list is empty.
pub fn one_of<S: AsRef<str>>(names: &[S], none: &str) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("`{}`", n.as_ref())).collect();
    match quoted.len() {
        0 => none.to_owned(),
        1 => quoted.join(""),
        _ => format!("one of {}", quoted.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_typos() {
        let keys = ["learning_rate", "warmup_steps"];
        assert_eq!(suggest("lerning_rate", keys), Some("learning_rate"));
        assert_eq!(suggest("warmup_step", keys), Some("warmup_steps"));
        assert_eq!(suggest("pretrain.casual_lm", ["pretrain.causal_lm", "sft.chat"]), Some("pretrain.causal_lm"));
        assert_eq!(suggest("CPU", ["auto", "cpu", "cuda"]), Some("cpu"));
        assert_eq!(suggest("sed", ["name", "seed"]), Some("seed"));
        assert_eq!(suggest("stf", ["pretrain", "sft"]), Some("sft"));
        assert_eq!(suggest("cdua", ["cpu", "cuda"]), Some("cuda"));
    }

    #[test]
    fn stays_quiet_when_nothing_is_close() {
        assert_eq!(suggest("gpu", ["auto", "cpu", "cuda"]), None);
        assert_eq!(suggest("lm", ["lr"]), None);
        assert_eq!(suggest("x", ["y", "xy"]), None);
        assert_eq!(suggest("batch_size", ["learning_rate", "warmup_steps"]), None);
        assert_eq!(suggest("x", Vec::<&str>::new()), None);
        assert_eq!(suggest("", ["a"]), None);
    }

    #[test]
    fn picks_the_nearest() {
        assert_eq!(suggest("max_stps", ["max_tokens", "max_steps"]), Some("max_steps"));
        // A tie goes to the first candidate.
        assert_eq!(suggest("max_stepz", ["max_step", "max_steps"]), Some("max_step"));
        assert_eq!(suggest("seeds", ["seed", "speed"]), Some("seed"));
    }

    #[test]
    fn lists() {
        assert_eq!(one_of::<&str>(&[], "nothing"), "nothing");
        assert_eq!(one_of(&["a"], ""), "`a`");
        assert_eq!(one_of(&["a", "b"], ""), "one of `a`, `b`");
    }
}
