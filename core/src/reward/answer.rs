//! Final answers of math word problems: numbers read out of a model's text and written
//! in one canonical form, so that `1,000`, `1000` and `$1,000.00` compare (and vote) as
//! the same answer.
//!
//! Two ways to find the answer, as lm-evaluation-harness names them:
//! - **strict** ([`extract_strict`]): the number after the last `####` (GSM8K's own
//!   format) or in the last "The answer is N" (the few-shot CoT exemplars' format);
//! - **flexible** ([`extract_flexible`]): the last number anywhere in the text.
//!
//! Fixed against the harness: its strict pattern `The answer is (\-?[0-9\.\,]+).` needs
//! one more character after the number, so `The answer is 18` at the very end of a text
//! reads as `1`; here a number is read whole wherever it ends. Its answers are compared
//! as raw strings (`1,000` ≠ `1000`); here they are canonical first.
//!
//! What counts as a number (see [`numbers`]):
//! - digits, with `,` thousands separators (a comma followed by exactly three digits),
//!   and an optional decimal part (`.` followed by digits); `.5` is a number;
//! - a sign `-` (or the Unicode minus `−`) right before the digits or before a `$`,
//!   when it does not follow a letter, digit or closing bracket (`5-3` is two numbers,
//!   5 and 3: a subtraction, not a negative);
//! - `$` before it, and a `%`, units or words after it are left out: `$18`, `18%`,
//!   `18 apples` all read as 18.
//!
//! Not handled, on purpose (GSM8K's answers are plain integers):
//! - fractions: `3/4` is two numbers, 3 and 4;
//! - scientific notation: `1e5` is two numbers, 1 and 5;
//! - percent as a fraction: `50%` is 50, not 0.5;
//! - numbers in words (`eighteen`), and European separators (`1.000,5`);
//! - a comma not followed by exactly three digits ends the number: `1,2` is 1 and 2.

/// One number found in a text: where it is (byte offsets) and its canonical form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumberSpan {
    /// Byte offset of the first character (the sign or `$` when present).
    pub start: usize,
    /// Byte offset one past the last digit.
    pub end: usize,
    /// Canonical text, as [`normalize_number`] returns it.
    pub canonical: String,
}

/// Canonical text of a number as written in a model's output: commas, `$`, a trailing
/// period, surrounding units/words dropped; `1,000` = `1000` = `1000.0` → "1000";
/// "-3.50" → "-3.5"; "0.5" and ".5" → "0.5"; "-0" → "0"; None if `text` holds no number.
///
/// When `text` holds several numbers this is the first of them (the function is meant
/// for one written answer such as a reference "$1,000.00"; to find the answer in a
/// whole generation use [`extract_strict`] or [`extract_flexible`]). The canonical form
/// is exact text, never a float: big numbers keep every digit.
pub fn normalize_number(text: &str) -> Option<String> {
    numbers(text).into_iter().next().map(|n| n.canonical)
}

/// Strict: the number after the last `####`, or in the last "The answer is N"
/// (case-insensitive), normalised; whichever of the two markers comes last in the text.
///
/// Between the marker and the number only spaces, `:`, `=` and `*` (markdown bold) may
/// stand; a marker followed by anything else (`The answer is eighteen`) is no answer, and
/// an earlier marker is not used in its place (the model's final statement is what is
/// graded). `The answer is 18` at the very end of a text reads 18.
pub fn extract_strict(text: &str) -> Option<String> {
    let lower = text.to_lowercase();
    // `to_lowercase` can change byte lengths outside ASCII; search the lowered text
    // only when it maps offsets one to one, else fall back to an ASCII-only lowering.
    let haystack = if lower.len() == text.len() { lower } else { text.to_ascii_lowercase() };
    let last_marker =
        ["####", "the answer is"].iter().filter_map(|m| haystack.rfind(m).map(|at| at + m.len())).max()?;
    let rest = &text[last_marker..];
    let skipped = rest.len() - rest.trim_start_matches([' ', '\t', '\n', '\r', ':', '=', '*']).len();
    let first = numbers(&rest[skipped..]).into_iter().next()?;
    (first.start == 0).then_some(first.canonical)
}

/// Flexible: the last number in the text, normalised.
pub fn extract_flexible(text: &str) -> Option<String> {
    numbers(text).pop().map(|n| n.canonical)
}

/// Every number in `text`, in order, with its canonical form (rules in the module doc).
pub fn numbers(text: &str) -> Vec<NumberSpan> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let at = |i: usize| chars.get(i).map(|&(_, c)| c);
    let byte = |i: usize| chars.get(i).map_or(text.len(), |&(b, _)| b);
    let mut found = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let starts_digits = |j: usize| {
            at(j).is_some_and(|c| c.is_ascii_digit())
                || (at(j) == Some('.')
                    && at(j + 1).is_some_and(|c| c.is_ascii_digit())
                    && !(j > 0 && at(j - 1).is_some_and(|c| c.is_ascii_digit())))
        };
        if !starts_digits(i) {
            i += 1;
            continue;
        }
        // Look back for `$`, `-`, `-$` or `$-` directly before the digits.
        let mut start = i;
        let mut negative = false;
        if i >= 2 && is_minus(at(i - 1)) && at(i - 2) == Some('$') {
            start = i - 2;
            negative = true;
        } else {
            if start > 0 && at(start - 1) == Some('$') {
                start -= 1;
            }
            let before_sign = if start >= 2 { at(start - 2) } else { None };
            if start > 0 && is_minus(at(start - 1)) && sign_allowed_after(before_sign) {
                start -= 1;
                negative = true;
            }
        }
        // Integer part with thousands groups.
        let mut j = i;
        let mut int_digits = String::new();
        while let Some(c) = at(j) {
            if c.is_ascii_digit() {
                int_digits.push(c);
                j += 1;
            } else if c == ','
                && !int_digits.is_empty()
                && (1..=3).all(|k| at(j + k).is_some_and(|d| d.is_ascii_digit()))
                && !at(j + 4).is_some_and(|d| d.is_ascii_digit())
            {
                j += 1;
            } else {
                break;
            }
        }
        // Decimal part: a `.` followed by a digit (a trailing period ends the sentence).
        let mut frac_digits = String::new();
        if at(j) == Some('.') && at(j + 1).is_some_and(|c| c.is_ascii_digit()) {
            j += 1;
            while let Some(c) = at(j).filter(|c| c.is_ascii_digit()) {
                frac_digits.push(c);
                j += 1;
            }
        }
        found.push(NumberSpan {
            start: byte(start),
            end: byte(j),
            canonical: canonical(negative, &int_digits, &frac_digits),
        });
        i = j;
    }
    found
}

fn is_minus(c: Option<char>) -> bool {
    matches!(c, Some('-') | Some('−'))
}

/// A `-` is a sign unless it follows something a subtraction or a hyphenated word
/// would: `5-3`, `x-3`, `(2)-3`.
fn sign_allowed_after(before: Option<char>) -> bool {
    match before {
        None => true,
        Some(c) => !(c.is_alphanumeric() || matches!(c, ')' | ']' | '}' | '.' | '_')),
    }
}

/// `-`, integer digits without leading zeros, `.` and fraction digits without trailing
/// zeros; no sign on zero.
fn canonical(negative: bool, int_digits: &str, frac_digits: &str) -> String {
    let int = int_digits.trim_start_matches('0');
    let frac = frac_digits.trim_end_matches('0');
    let int = if int.is_empty() { "0" } else { int };
    let is_zero = int == "0" && frac.is_empty();
    let mut out = String::new();
    if negative && !is_zero {
        out.push('-');
    }
    out.push_str(int);
    if !frac.is_empty() {
        out.push('.');
        out.push_str(frac);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (model output, strict, flexible): realistic endings of generations.
    const TABLE: &[(&str, Option<&str>, Option<&str>)] = &[
        ("She makes 9 * 2 = $18 every day.\n#### 18", Some("18"), Some("18")),
        ("So she has 72 clips in all. The answer is 18", Some("18"), Some("18")),
        ("The answer is 18.", Some("18"), Some("18")),
        ("Total: $1,000.00", None, Some("1000")),
        ("The answer is $1,000.00.", Some("1000"), Some("1000")),
        ("#### 1,000", Some("1000"), Some("1000")),
        ("He is left with -3 degrees. The answer is -3.", Some("-3"), Some("-3")),
        ("Each costs 2.50 dollars. The answer is 2.50", Some("2.5"), Some("2.5")),
        ("She picked 12 apples", None, Some("12")),
        ("I don't know.", None, None),
        ("The answer is eighteen.", None, None),
        ("First 3 + 4 = 7, then 7 * 2 = 14, so 14 - 1 = 13 cookies.", None, Some("13")),
        ("Natalia sold 48/2 = 24 clips.\n#### 72", Some("72"), Some("72")),
        ("The answer is: **42**", Some("42"), Some("42")),
        ("THE ANSWER IS 5 and later 6", Some("5"), Some("6")),
        ("The answer is 3. Wait, #### 4", Some("4"), Some("4")),
        ("#### 4. Hmm, the answer is 3", Some("3"), Some("3")),
        ("It costs .5 dollars", None, Some("0.5")),
        ("The temperature fell 10 - 3 = 7 degrees", None, Some("7")),
        ("A loss of -$25.", None, Some("-25")),
        ("It grew by 50%.", None, Some("50")),
        ("1000.0", None, Some("1000")),
        ("The answer is 007", Some("7"), Some("7")),
        ("The answer is -0", Some("0"), Some("0")),
    ];

    #[test]
    fn extraction_table() {
        for &(text, strict, flexible) in TABLE {
            assert_eq!(extract_strict(text).as_deref(), strict, "strict on {text:?}");
            assert_eq!(extract_flexible(text).as_deref(), flexible, "flexible on {text:?}");
        }
    }

    #[test]
    fn normalisation() {
        for (text, want) in [
            ("1,000", "1000"),
            ("1000", "1000"),
            ("1000.0", "1000"),
            ("$1,000.00", "1000"),
            ("-3.50", "-3.5"),
            ("0.5", "0.5"),
            (".5", "0.5"),
            ("-3", "-3"),
            ("2.50", "2.5"),
            ("12 apples", "12"),
            ("18.", "18"),
            ("−7", "-7"),
            ("1,234,567.890", "1234567.89"),
            ("123456789012345678901234567890", "123456789012345678901234567890"),
        ] {
            assert_eq!(normalize_number(text).as_deref(), Some(want), "{text:?}");
        }
        assert_eq!(normalize_number("no number here"), None);
        assert_eq!(normalize_number(""), None);
    }

    #[test]
    fn subtraction_and_lists_are_not_negatives() {
        let canon = |t: &str| numbers(t).into_iter().map(|n| n.canonical).collect::<Vec<_>>();
        assert_eq!(canon("5-3=2"), ["5", "3", "2"]);
        assert_eq!(canon("1, 2, 3"), ["1", "2", "3"]);
        assert_eq!(canon("1,2"), ["1", "2"]);
        assert_eq!(canon("3/4"), ["3", "4"]);
        assert_eq!(canon("x = -4"), ["-4"]);
        assert_eq!(canon("well-3"), ["3"]);
    }

    #[test]
    fn spans_cover_sign_and_dollar() {
        let n = numbers("pay -$1,250.50 now");
        assert_eq!(n.len(), 1);
        assert_eq!((n[0].start, n[0].end), (4, 14));
        assert_eq!(n[0].canonical, "-1250.5");
    }
}
