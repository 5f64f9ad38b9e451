//! Small, fixed 64-bit hashes: the same on every machine and Rust version (std's
//! `DefaultHasher` promises neither), so shingles, signatures and hence the kept documents
//! depend on the seed alone.
use std::hash::{BuildHasherDefault, Hasher};

/// The SplitMix64 / murmur3 finaliser: spreads every input bit over the output.
pub(super) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Folds a sequence of 64-bit hashes (an n-gram of word hashes) into one.
pub(super) fn combine(hashes: &[u64]) -> u64 {
    let mut h = 0x243F_6A88_85A3_08D3; // digits of pi: any odd constant
    for &x in hashes {
        h = mix64(h ^ x).wrapping_add(0x9E37_79B9_7F4A_7C15);
    }
    h
}

/// FNV-1a over bytes fed incrementally; [`Fnv::finish`] mixes the result.
#[derive(Debug, Clone, Copy)]
pub(super) struct Fnv(u64);

impl Fnv {
    pub(super) fn new() -> Self {
        Self(0xCBF2_9CE4_8422_2325)
    }

    pub(super) fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01B3);
        }
    }

    pub(super) fn char(&mut self, c: char) {
        let mut buf = [0u8; 4];
        self.bytes(c.encode_utf8(&mut buf).as_bytes());
    }

    /// Feeds `c` lowercased (Unicode: one character may lowercase to several).
    pub(super) fn char_lowercase(&mut self, c: char) {
        if c.is_ascii() {
            self.bytes(&[c.to_ascii_lowercase() as u8]);
        } else {
            for l in c.to_lowercase() {
                self.char(l);
            }
        }
    }

    pub(super) fn finish(self) -> u64 {
        mix64(self.0)
    }
}

/// A `Hasher` for keys that already are well-mixed hashes: passes them through instead of
/// hashing them again (std's SipHash would dominate the n-gram counting).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct PreHashed(u64);

impl Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not used by the u64 / u128 keys below; correct (if slow) for anything else.
        for &b in bytes {
            self.0 = mix64(self.0 ^ u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn write_u128(&mut self, n: u128) {
        self.0 = (n as u64) ^ ((n >> 64) as u64);
    }
}

pub(super) type BuildPreHashed = BuildHasherDefault<PreHashed>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_fixed() {
        // Pinned: a change here changes which documents every corpus keeps.
        let mut h = Fnv::new();
        h.bytes(b"plumb");
        assert_eq!(h.0, 0x9810_114d_ddbe_d8cb); // FNV-1a 64 of "plumb"
        assert_eq!(h.finish(), 0x368d_bf67_8d54_75dd);
        let mut a = Fnv::new();
        "Straße".chars().for_each(|c| a.char_lowercase(c));
        let mut b = Fnv::new();
        b.bytes("straße".as_bytes());
        assert_eq!(a.finish(), b.finish());
        assert_ne!(combine(&[1, 2]), combine(&[2, 1]));
        assert_ne!(combine(&[]), combine(&[0]));
    }
}
