//! Data curation end to end: each filter removes exactly what it should, the report counts
//! it, and the result depends on the seed alone.
use plumb_core::data::curation::{
    count_words, curate, Counts, CurationConfig, Curator, MinHashConfig, MinHasher, QualityConfig, QualityRule, Reason,
    STOP_WORDS,
};
use plumb_core::data::seeded_rng;
use plumb_core::error::Error;
use plumb_core::rand::Rng;

/// Real prose: passes every default quality rule.
const BEES: &str = "Honeybees live in colonies that can hold tens of thousands of workers, a few hundred \
drones and a single queen. The workers are female and do almost everything: they build the wax comb, clean \
the cells, feed the larvae, guard the entrance and fly out to collect nectar and pollen. A forager may visit \
hundreds of flowers on one trip, and when she finds a rich patch she returns to the hive and dances to tell \
her sisters where it is. The angle of the waggle run points the way relative to the sun, and its length \
gives the distance to the flowers.";

/// Another document on the same topic, sharing many words but few 5-word runs with `BEES`.
const KEEPERS: &str = "Beekeepers inspect their hives every week or two during the spring to check that the \
queen is laying and that the colony has room to grow. A crowded hive tends to swarm: the old queen leaves with \
about half of the workers and settles on a branch while scouts search for a new home. Keepers prevent this by \
adding boxes, removing queen cells or splitting the colony in two. In late summer they take off the honey \
supers, leaving enough stores for the bees to survive the winter, and treat the colony against varroa mites, \
which spread viruses that weaken the workers and the larvae.";

/// `BEES` with one word changed.
fn bees_one_word_changed() -> String {
    BEES.replacen("hundreds of flowers", "dozens of flowers", 1)
}

fn quality_only(quality: QualityConfig) -> CurationConfig {
    CurationConfig { exact_dedup: false, near_dedup: None, quality: Some(quality), seed: 0 }
}

/// Made-up words, each new one different from all before it and from every stop word.
struct Words {
    next: usize,
}

impl Words {
    fn new() -> Self {
        Self { next: 0 }
    }

    fn word(&mut self, len: usize) -> String {
        loop {
            let mut i = self.next;
            self.next += 1;
            let mut letters = vec![b'a'; len];
            for slot in letters.iter_mut().rev() {
                *slot = b'a' + (i % 26) as u8;
                i /= 26;
            }
            let word = String::from_utf8(letters).unwrap();
            if !STOP_WORDS.contains(&word.as_str()) {
                return word;
            }
        }
    }

    /// `n` words: made-up words of `len` letters, with every `every`-th a stop word taken in
    /// turn from `stops` (never two stop words side by side, so no 2-gram repeats).
    fn prose_with(&mut self, n: usize, len: usize, stops: &[&str], every: usize) -> Vec<String> {
        (0..n)
            .map(|i| if i % every == 3 { stops[(i / every) % stops.len()].to_owned() } else { self.word(len) })
            .collect()
    }

    fn prose(&mut self, n: usize, len: usize) -> Vec<String> {
        self.prose_with(n, len, &["the", "of", "and", "to"], 7)
    }
}

/// Joins words into lines of `per_line`.
fn lines(words: &[String], per_line: usize) -> Vec<String> {
    words.chunks(per_line).map(|line| line.join(" ")).collect()
}

/// Prose with `phrase` inserted `copies` times, spread out, and just enough filler that the
/// copies hold about `share` of the word characters (a little less, never more).
fn repeated(phrase: &str, copies: usize, share: f64) -> String {
    let phrase_chars: usize = phrase.split_whitespace().map(str::len).sum::<usize>() * copies;
    let filler_chars = (phrase_chars as f64 / share) as usize - phrase_chars;
    let mut words = Words::new();
    let mut filler = Vec::new();
    let mut chars = 0;
    for word in words.prose(10_000, 6) {
        if chars >= filler_chars {
            break;
        }
        chars += word.len();
        filler.push(word);
    }
    let part = filler.len() / (copies + 1);
    let mut all = Vec::new();
    for (i, chunk) in filler.chunks(part).enumerate() {
        all.extend_from_slice(chunk);
        if i < copies {
            all.extend(phrase.split_whitespace().map(String::from));
        }
    }
    lines(&all, 10).join("\n")
}

/// The same config with `rule` off.
fn without(rule: QualityRule, mut q: QualityConfig) -> QualityConfig {
    use QualityRule::*;
    match rule {
        MinWords => q.min_words = None,
        MaxWords => q.max_words = None,
        MinMeanWordLength => q.min_mean_word_length = None,
        MaxMeanWordLength => q.max_mean_word_length = None,
        MaxSymbolWordRatio => q.max_symbol_word_ratio = None,
        MaxBulletLineFraction => q.max_bullet_line_fraction = None,
        MaxEllipsisLineFraction => q.max_ellipsis_line_fraction = None,
        MinAlphaWordFraction => q.min_alpha_word_fraction = None,
        MinStopWords => q.min_stop_words = None,
        MinStopWordFraction => q.min_stop_word_fraction = None,
        MaxDigitFraction => q.max_digit_fraction = None,
        MaxDuplicateLineFraction => q.max_duplicate_line_fraction = None,
        MaxDuplicateLineCharFraction => q.max_duplicate_line_char_fraction = None,
        MaxTopNgramCharFraction(n) => {
            q.max_top_ngram_char_fraction.as_mut().unwrap().remove(&n);
        }
        MaxDuplicateNgramCharFraction(n) => {
            q.max_duplicate_ngram_char_fraction.as_mut().unwrap().remove(&n);
        }
    }
    q
}

/// `text` fails `rule` under `quality`, the report puts it in that rule's row and nowhere
/// else, and with `rule` off the text passes every other rule.
fn assert_fails_only(text: &str, rule: QualityRule, quality: QualityConfig) {
    let config = quality_only(quality.clone());
    let (kept, report) = curate([BEES.to_owned(), text.to_owned()], &config, &count_words).unwrap();
    assert_eq!(kept, vec![BEES.to_owned()], "{rule}: the clean document stays, the crafted one goes");
    assert_eq!(report.rejections.len(), 1);
    let rejection = &report.rejections[0];
    assert_eq!(rejection.index, 1);
    match &rejection.reason {
        Reason::Quality { rule: found, value, limit } => {
            assert_eq!(*found, rule, "{}", rejection.reason);
            assert_eq!(*value, found.measure(text));
            assert!(if rule.is_minimum() { value < limit } else { value > limit });
        }
        other => panic!("{rule}: removed for {other}"),
    }
    for row in &report.filters {
        let expected = if row.filter == rule.key() {
            Counts { documents: 1, tokens: count_words(text) as u64 }
        } else {
            Counts::default()
        };
        assert_eq!(row.removed, expected, "row {}", row.filter);
    }
    assert_eq!(report.kept, Counts { documents: 1, tokens: count_words(BEES) as u64 });

    let mut relaxed = Curator::new(&quality_only(without(rule, quality))).unwrap();
    let verdict = relaxed.check(text, 0);
    assert!(verdict.is_none(), "{rule} off, the document still fails: {}", verdict.unwrap());
}

#[test]
fn clean_documents_pass_every_rule() {
    // min_stop_word_fraction is the one rule off by default
    let quality = QualityConfig { min_stop_word_fraction: Some(0.05), ..QualityConfig::default() };
    let config = CurationConfig { quality: Some(quality), ..CurationConfig::default() };
    let generated = lines(&Words::new().prose(120, 6), 10).join("\n");
    let docs = vec![BEES.to_owned(), KEEPERS.to_owned(), generated];
    let (kept, report) = curate(docs.clone(), &config, &count_words).unwrap();
    assert_eq!(kept, docs, "{:?}", report.rejections);
}

#[test]
fn each_quality_rule_rejects_what_violates_it_alone() {
    use QualityRule::*;
    let q = QualityConfig::default;
    let text = |words: &[String]| lines(words, 10).join("\n");

    assert_fails_only(&text(&Words::new().prose(30, 6)), MinWords, q());
    assert_fails_only(&text(&Words::new().prose(100_001, 6)), MaxWords, q());
    assert_fails_only(&text(&Words::new().prose(70, 2)), MinMeanWordLength, q());
    assert_fails_only(&text(&Words::new().prose(70, 14)), MaxMeanWordLength, q());

    // 15 hashtags in 120 words: ratio 0.125
    let mut words = Words::new().prose(120, 6);
    words.iter_mut().step_by(8).for_each(|w| w.insert(0, '#'));
    assert_fails_only(&text(&words), MaxSymbolWordRatio, q());

    let bulleted: Vec<String> = lines(&Words::new().prose(120, 6), 10).iter().map(|l| format!("• {l}")).collect();
    assert_fails_only(&bulleted.join("\n"), MaxBulletLineFraction, q());

    // 4 of 12 lines trail off
    let trailing: Vec<String> = lines(&Words::new().prose(120, 6), 10)
        .into_iter()
        .enumerate()
        .map(|(i, l)| if i % 3 == 0 { format!("{l}...") } else { l })
        .collect();
    assert_fails_only(&trailing.join("\n"), MaxEllipsisLineFraction, q());

    // a "|" after every third word: 100 of 133 words have letters
    let mut piped = Vec::new();
    for (i, w) in Words::new().prose(100, 6).into_iter().enumerate() {
        piped.push(w);
        if i % 3 == 2 {
            piped.push("|".to_owned());
        }
    }
    assert_fails_only(&text(&piped), MinAlphaWordFraction, q());

    assert_fails_only(&text(&Words::new().prose_with(120, 6, &["the"], 7)), MinStopWords, q());

    // two stop words ("the", "and") in 120 words: 2 distinct, but a fraction of 0.017
    let sparse = text(&Words::new().prose_with(120, 6, &["the", "and"], 60));
    assert_fails_only(&sparse, MinStopWordFraction, QualityConfig { min_stop_word_fraction: Some(0.05), ..q() });

    let digits: Vec<String> =
        Words::new().prose(120, 6).into_iter().map(|w| if w.len() == 6 { format!("{w}12") } else { w }).collect();
    assert_fails_only(&text(&digits), MaxDigitFraction, q());

    // 10 lines, and "Share" after each of the first 6: 5 of 16 lines repeat (0.31), few characters
    let mut shared = Vec::new();
    for (i, line) in lines(&Words::new().prose(100, 6), 10).into_iter().enumerate() {
        shared.push(line);
        if i < 6 {
            shared.push("Share".to_owned());
        }
    }
    assert_fails_only(&shared.join("\n"), MaxDuplicateLineFraction, q());

    // short lines, and a long one-word line 8 times: 7 of 28 lines repeat (0.25), ~24% of characters
    let mut adverts = Vec::new();
    for (i, line) in lines(&Words::new().prose(60, 4), 3).into_iter().enumerate() {
        adverts.push(line);
        if i % 2 == 0 && i < 16 {
            adverts.push("Advertisement".to_owned());
        }
    }
    assert_fails_only(&adverts.join("\n"), MaxDuplicateLineCharFraction, q());

    // A phrase repeated with unique words around it: its n-grams repeat, its (n+1)-grams don't.
    // Shares are set between this rule's limit and the next looser one's.
    assert_fails_only(&repeated("marketplace listings", 8, 0.25), MaxTopNgramCharFraction(2), q());
    assert_fails_only(&repeated("marketplace listings today", 6, 0.19), MaxTopNgramCharFraction(3), q());
    assert_fails_only(&repeated("marketplace listings today only", 5, 0.17), MaxTopNgramCharFraction(4), q());
    assert_fails_only(
        &repeated("marketplace listings today only here", 3, 0.155),
        MaxDuplicateNgramCharFraction(5),
        q(),
    );
    assert_fails_only(
        &repeated("buy cheap watches online today with free shipping and returns", 2, 0.105),
        MaxDuplicateNgramCharFraction(10),
        q(),
    );
}

#[test]
fn exact_duplicates_differing_in_case_and_spacing_are_removed_first_kept() {
    let config = CurationConfig { near_dedup: None, ..CurationConfig::default() };
    let shouted = BEES.to_uppercase().replace(' ', "  \n ");
    let docs = vec![BEES.to_owned(), KEEPERS.to_owned(), shouted.clone(), format!("\t{}\n", KEEPERS.to_lowercase())];
    let (kept, report) = curate(docs.clone(), &config, &count_words).unwrap();
    assert_eq!(kept, vec![BEES.to_owned(), KEEPERS.to_owned()]);
    let reasons: Vec<_> = report.rejections.iter().map(|r| (r.index, r.reason.clone())).collect();
    assert_eq!(reasons, vec![(2, Reason::ExactDuplicate { of: 0 }), (3, Reason::ExactDuplicate { of: 1 })]);

    // A changed character is not an exact duplicate.
    let (kept, _) = curate([BEES.to_owned(), BEES.replace("queen.", "queen!")], &config, &count_words).unwrap();
    assert_eq!(kept.len(), 2);
}

#[test]
fn a_near_duplicate_goes_and_a_document_on_the_same_topic_stays() {
    let config = CurationConfig::default();
    let near = bees_one_word_changed();
    assert_eq!(count_words(&near), count_words(BEES));
    assert!(count_words(BEES) >= 100);
    let (kept, report) = curate([BEES.to_owned(), KEEPERS.to_owned(), near.clone()], &config, &count_words).unwrap();
    assert_eq!(kept, vec![BEES.to_owned(), KEEPERS.to_owned()]);
    assert_eq!(report.rejections.len(), 1);
    assert_eq!(report.rejections[0].index, 2);
    match report.rejections[0].reason {
        Reason::NearDuplicate { of, similarity } => {
            assert_eq!(of, 0);
            assert!((0.8..1.0).contains(&similarity), "{similarity}");
        }
        ref other => panic!("{other}"),
    }
    // Without near dedup both stay: they are not exact duplicates.
    let off = CurationConfig { near_dedup: None, ..config };
    assert_eq!(curate([BEES.to_owned(), near], &off, &count_words).unwrap().0.len(), 2);
}

#[test]
fn minhash_estimates_are_within_a_tenth_of_the_true_jaccard() {
    let config = MinHashConfig::default();
    let hasher = MinHasher::new(&config, 0);
    let half = format!(
        "{} {}",
        BEES.split_whitespace().take(50).collect::<Vec<_>>().join(" "),
        KEEPERS.split_whitespace().skip(50).collect::<Vec<_>>().join(" ")
    );
    let mut words = Words::new();
    let base = words.prose(300, 6);
    let mut two_thirds = base.clone();
    two_thirds[100..].iter_mut().for_each(|w| *w = format!("{w}x"));
    let pairs = [
        (BEES.to_owned(), bees_one_word_changed()),
        (BEES.to_owned(), half),
        (BEES.to_owned(), KEEPERS.to_owned()),
        (base.join(" "), two_thirds.join(" ")),
    ];
    for (a, b) in &pairs {
        let (sa, sb) = (hasher.shingles(a), hasher.shingles(b));
        let common = sa.iter().filter(|x| sb.binary_search(x).is_ok()).count();
        let truth = common as f64 / (sa.len() + sb.len() - common) as f64;
        let estimate = MinHasher::jaccard(&hasher.signature(a).unwrap(), &hasher.signature(b).unwrap());
        assert!((estimate - truth).abs() <= 0.1, "estimate {estimate}, true {truth}");
    }
}

#[test]
fn report_counts_are_exact() {
    // Tokens by a counter of our own: characters, to tell it from word counts.
    let chars = |text: &str| text.chars().count();
    let short = "Too short to keep, and it has the stop words.".to_owned();
    let no_stop_words = lines(&Words::new().prose_with(80, 6, &["bees"], 7), 10).join("\n");
    let docs = vec![
        BEES.to_owned(),          // 0 kept
        short.clone(),            // 1 quality.min_words
        BEES.to_uppercase(),      // 2 exact_dedup, of 0
        bees_one_word_changed(),  // 3 near_dedup, of 0
        KEEPERS.to_owned(),       // 4 kept
        no_stop_words.clone(),    // 5 quality.min_stop_words
        format!("  {KEEPERS}  "), // 6 exact_dedup, of 4
    ];
    let (kept, report) = curate(docs.clone(), &CurationConfig::default(), &chars).unwrap();
    assert_eq!(kept, vec![BEES.to_owned(), KEEPERS.to_owned()]);

    let n = |i: usize| chars(&docs[i]) as u64;
    let total: u64 = (0..docs.len()).map(n).sum();
    assert_eq!(report.input, Counts { documents: 7, tokens: total });
    assert_eq!(report.kept, Counts { documents: 2, tokens: n(0) + n(4) });
    let removed = |filter: &str| report.filter(filter).unwrap().removed;
    assert_eq!(removed("quality.min_words"), Counts { documents: 1, tokens: n(1) });
    assert_eq!(removed("quality.min_stop_words"), Counts { documents: 1, tokens: n(5) });
    assert_eq!(removed("exact_dedup"), Counts { documents: 2, tokens: n(2) + n(6) });
    assert_eq!(removed("near_dedup"), Counts { documents: 1, tokens: n(3) });
    let quality_rows = report.filters.iter().filter(|r| r.filter.starts_with("quality.")).count();
    assert_eq!(report.filters.len(), quality_rows + 2);
    assert_eq!(&report.filters[quality_rows].filter, "exact_dedup");
    assert_eq!(&report.filters[quality_rows + 1].filter, "near_dedup");
    let removed_docs: u64 = report.filters.iter().map(|r| r.removed.documents).sum();
    assert_eq!(removed_docs, 5);
    // "remaining" runs down the table to what was kept
    assert_eq!(report.filters.last().unwrap().remaining, report.kept);
    let after_quality = report.filters[quality_rows - 1].remaining;
    assert_eq!(after_quality, Counts { documents: 5, tokens: total - n(1) - n(5) });

    let indices: Vec<usize> = report.rejections.iter().map(|r| r.index).collect();
    assert_eq!(indices, vec![1, 2, 3, 5, 6]);
    assert_eq!(report.rejections[3].reason.filter(), "quality.min_stop_words");

    // Readable renderings.
    let table = report.to_string();
    assert!(table.lines().any(|l| l.starts_with("near_dedup") && l.contains("1 (14.3%)")), "{table}");
    assert!(report.to_markdown().contains("| `exact_dedup` | 2 (28.6%) |"));
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["input"]["documents"], 7);
    assert_eq!(json["kept"]["tokens"], n(0) + n(4));
    let reason = serde_json::to_value(&report.rejections[2].reason).unwrap();
    assert_eq!(reason["filter"], "near_duplicate");
    assert_eq!(reason["of"], 0);
    let reason = serde_json::to_value(&report.rejections[0].reason).unwrap();
    assert_eq!(reason["rule"], "quality.min_words");
    assert_eq!(reason["limit"], 50.0);
}

/// A synthetic corpus: random prose over a 5,000-word vocabulary, with planted exact
/// duplicates (recased, respaced) and near duplicates (one word changed) of earlier documents.
struct Corpus {
    docs: Vec<String>,
    exact: Vec<usize>,
    near: Vec<usize>,
    originals: Vec<usize>,
}

fn synthetic(n: usize, seed: u64) -> Corpus {
    let mut rng = seeded_rng(seed);
    let mut words = Words::new();
    let vocab: Vec<String> = (0..5000).map(|_| words.word(7)).collect();
    let mut corpus = Corpus { docs: Vec::with_capacity(n), exact: vec![], near: vec![], originals: vec![] };
    for i in 0..n {
        let roll = rng.random_range(0..100);
        if i > 10 && roll < 10 {
            let of = corpus.originals[rng.random_range(0..corpus.originals.len() as u64) as usize];
            corpus.docs.push(corpus.docs[of].to_uppercase().replace(' ', "  "));
            corpus.exact.push(i);
        } else if i > 10 && roll < 20 {
            let of = corpus.originals[rng.random_range(0..corpus.originals.len() as u64) as usize];
            let mut doc: Vec<String> = corpus.docs[of].split(' ').map(String::from).collect();
            let at = rng.random_range(0..doc.len() as u64) as usize;
            doc[at] = "changed".to_owned();
            corpus.docs.push(doc.join(" "));
            corpus.near.push(i);
        } else {
            let len = 100 + rng.random_range(0..100) as usize;
            let doc: Vec<&str> = (0..len)
                .map(|j| {
                    if j % 6 == 2 {
                        STOP_WORDS[rng.random_range(0..8) as usize]
                    } else {
                        vocab[rng.random_range(0..vocab.len() as u64) as usize].as_str()
                    }
                })
                .collect();
            corpus.docs.push(doc.join(" "));
            corpus.originals.push(i);
        }
    }
    corpus
}

#[test]
fn results_depend_on_the_seed_alone() {
    let corpus = synthetic(2000, 7);
    let config = CurationConfig { seed: 42, ..CurationConfig::default() };
    let (kept_a, report_a) = curate(corpus.docs.clone(), &config, &count_words).unwrap();
    let (kept_b, report_b) = curate(corpus.docs.clone(), &config, &count_words).unwrap();
    assert_eq!(kept_a, kept_b);
    assert_eq!(report_a, report_b);
    // One document at a time, as a streaming caller would: the same verdicts.
    let mut curator = Curator::new(&config).unwrap();
    let one_by_one: Vec<Option<Reason>> = corpus.docs.iter().map(|d| curator.check(d, count_words(d))).collect();
    let batch: Vec<Option<Reason>> = {
        let mut reasons = vec![None; corpus.docs.len()];
        for r in &report_a.rejections {
            reasons[r.index] = Some(r.reason.clone());
        }
        reasons
    };
    assert_eq!(one_by_one, batch);
    let mut streamed = curator.finish();
    streamed.rejections = report_a.rejections.clone();
    assert_eq!(streamed, report_a);
}

#[test]
fn twenty_thousand_documents() {
    let corpus = synthetic(20_000, 1);
    let start = std::time::Instant::now();
    let (kept, report) = curate(corpus.docs.clone(), &CurationConfig::default(), &count_words).unwrap();
    eprintln!("curated {} documents in {:.2?}\n{report}", corpus.docs.len(), start.elapsed());

    let removed: std::collections::HashMap<usize, &Reason> =
        report.rejections.iter().map(|r| (r.index, &r.reason)).collect();
    assert!(corpus.exact.iter().all(|i| removed.contains_key(i)), "every exact duplicate goes");
    let near_found =
        corpus.near.iter().filter(|i| matches!(removed.get(i), Some(Reason::NearDuplicate { .. }))).count();
    assert!(near_found * 100 >= corpus.near.len() * 95, "{near_found} of {} near duplicates", corpus.near.len());
    let originals_kept = corpus.originals.iter().filter(|i| !removed.contains_key(i)).count();
    assert!(originals_kept * 100 >= corpus.originals.len() * 99, "{originals_kept} of {}", corpus.originals.len());
    assert_eq!(kept.len() as u64, report.kept.documents);
}

#[test]
fn config_errors_name_the_key() {
    let bad = CurationConfig {
        near_dedup: Some(MinHashConfig { bands: 20, rows: 5, ..MinHashConfig::default() }),
        ..CurationConfig::default()
    };
    let error = bad.validate().unwrap_err();
    assert_eq!(error.to_string(), "near_dedup.bands: bands × rows must equal num_perm (128), found 20 × 5");
    match curate(Vec::<String>::new(), &bad, &count_words) {
        Err(Error::Config(section)) => assert_eq!(section.path, "near_dedup.bands"),
        other => panic!("{other:?}"),
    }
    let bad = CurationConfig {
        quality: Some(QualityConfig { min_alpha_word_fraction: Some(80.0), ..QualityConfig::default() }),
        ..CurationConfig::default()
    };
    assert_eq!(
        bad.validate().unwrap_err().to_string(),
        "quality.min_alpha_word_fraction: must be a fraction in [0, 1], found 80"
    );

    // From a recipe section: typos are errors at their key, `null` turns a filter off.
    let e = plumb_core::recipe::parse_section::<CurationConfig>("quality:\n  min_word: 10\n").unwrap_err();
    assert_eq!(e.path, "quality.min_word");
    let config: CurationConfig = plumb_core::recipe::parse_section(
        "near_dedup: {bands: 32, rows: 4}\nquality:\n  max_digit_fraction: null\n  max_top_ngram_char_fraction: {2: 0.3}\n",
    )
    .unwrap();
    config.validate().unwrap();
    let quality = config.quality.unwrap();
    assert_eq!(quality.max_digit_fraction, None);
    assert_eq!(quality.min_words, Some(50));
    assert_eq!(quality.max_top_ngram_char_fraction.unwrap().into_iter().collect::<Vec<_>>(), vec![(2, 0.3)]);
    assert_eq!(config.near_dedup.unwrap().bands, 32);
}

#[test]
fn empty_input_gives_an_empty_report() {
    let (kept, report) = curate(Vec::new(), &CurationConfig::default(), &count_words).unwrap();
    assert!(kept.is_empty());
    assert_eq!(report.input, Counts::default());
    assert_eq!(report.kept, Counts::default());
}

/// Timing on 100k synthetic documents, filter by filter:
/// `cargo test --release -p plumb-core --test curation -- --ignored --nocapture`.
#[test]
#[ignore = "a timing run; minutes in debug builds"]
fn hundred_thousand_documents_timing() {
    let corpus = synthetic(100_000, 3);
    let off = CurationConfig { exact_dedup: false, near_dedup: None, quality: None, seed: 0 };
    let configs = [
        ("quality", CurationConfig { quality: Some(QualityConfig::default()), ..off.clone() }),
        ("exact_dedup", CurationConfig { exact_dedup: true, ..off.clone() }),
        ("near_dedup", CurationConfig { near_dedup: Some(MinHashConfig::default()), ..off.clone() }),
        ("all", CurationConfig::default()),
    ];
    for (name, config) in configs {
        let start = std::time::Instant::now();
        let (kept, _) = curate(corpus.docs.clone(), &config, &count_words).unwrap();
        eprintln!("{name:>12}: {:.2?} ({} kept)", start.elapsed(), kept.len());
    }
}
