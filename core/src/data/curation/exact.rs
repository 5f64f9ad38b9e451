//! Exact deduplication's key: the normalised text's SHA-256, cut to 128 bits.
use sha2::{Digest, Sha256};

/// The light normalisation exact dedup compares under: Unicode lowercase, runs of
/// whitespace (any Unicode whitespace, newlines included) collapsed to one space, and
/// leading and trailing whitespace dropped. Punctuation and accents are kept.
pub fn normalize(text: &str) -> String {
    let lower = text.to_lowercase();
    let mut out = String::with_capacity(lower.len());
    for word in lower.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

/// The first 128 bits of SHA-256 of [`normalize`]`(text)`: two different texts share a key
/// with probability about n² / 2¹²⁹, nil for any corpus.
pub fn exact_key(text: &str) -> u128 {
    let digest = Sha256::digest(normalize(text).as_bytes());
    let mut prefix = [0u8; 16];
    prefix.copy_from_slice(&digest[..16]);
    u128::from_be_bytes(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation() {
        assert_eq!(normalize("  Hello,\n\tWORLD  again "), "hello, world again");
        assert_eq!(normalize("ÉCOLE  Straße"), "école straße");
        assert_eq!(normalize(" \n "), "");
    }

    #[test]
    fn keys_ignore_case_and_spacing_only() {
        assert_eq!(exact_key("The cat sat."), exact_key("the  CAT\nsat."));
        assert_ne!(exact_key("The cat sat."), exact_key("The cat sat"));
        assert_ne!(exact_key("ab c"), exact_key("a bc"));
    }
}
