//! The key/value cache of incremental decoding and the attention masks around it.
use tch::{Device, Kind, Tensor};

/// Keys and values of past positions for every layer, allocated once for a batch:
/// each (B, n_kv_heads, capacity, head_dim), filled up to `len`.
pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    len: i64,
    capacity: i64,
}

impl KvCache {
    pub fn new(
        layers: usize,
        batch: i64,
        kv_heads: i64,
        capacity: i64,
        head_dim: i64,
        kind: Kind,
        device: Device,
    ) -> Self {
        let alloc = || Tensor::zeros([batch, kv_heads, capacity, head_dim], (kind, device));
        Self {
            keys: (0..layers).map(|_| alloc()).collect(),
            values: (0..layers).map(|_| alloc()).collect(),
            len: 0,
            capacity,
        }
    }

    /// Positions already cached.
    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> i64 {
        self.capacity
    }

    /// Writes layer `layer`'s new keys/values (B, H, t, hd) after the cached ones and
    /// returns all of them, (B, H, len + t, hd). Call [`KvCache::advance`] once all
    /// layers have written.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
        let t = k.size()[2];
        let (keys, values) = (&mut self.keys[layer], &mut self.values[layer]);
        keys.narrow(2, self.len, t).copy_(k);
        values.narrow(2, self.len, t).copy_(v);
        (keys.narrow(2, 0, self.len + t), values.narrow(2, 0, self.len + t))
    }

    pub fn advance(&mut self, t: i64) {
        self.len += t;
    }

    /// Keeps only the batch rows `rows` (1-D int64 indices, in the order given) of every
    /// layer, e.g. when finished sequences leave a generation batch; the cached length
    /// is unchanged.
    pub fn keep_rows(&mut self, rows: &Tensor) {
        for t in self.keys.iter_mut().chain(self.values.iter_mut()) {
            *t = t.index_select(0, rows);
        }
    }
}

/// Additive attention mask (B, 1, t, past + t) for `t` new queries after `past` cached
/// positions: causal, hiding padded keys, and, with a window, keys more than
/// `window - 1` positions back. `key_mask` (B, past + t) is 0 for padding and a segment
/// id otherwise: a token sees only earlier tokens of its own segment, so examples packed
/// into one row stay isolated (with all-ones, it is a plain padding mask). A query row
/// with nothing to attend to (a padding query) sees itself, so no row is all -inf.
pub fn attention_mask(key_mask: &Tensor, past: i64, t: i64, window: Option<i64>) -> Tensor {
    let device = key_mask.device();
    let total = past + t;
    let b = key_mask.size()[0];
    if t == 1 && window.is_none() {
        // A decoding step: one query, the last position, so causality hides nothing. The
        // same rule in a few kernels instead of twenty (a step is launch-bound).
        let key_segment = key_mask.to_kind(Kind::Int64); // (B, total)
        let query_segment = key_segment.narrow(1, past, 1);
        let allowed = key_segment.ne(0).logical_and(&key_segment.eq_tensor(&query_segment));
        let _ = allowed.narrow(1, past, 1).fill_(1); // it sees itself
        let hidden = allowed.logical_not().view([b, 1, 1, total]);
        return Tensor::zeros([b, 1, 1, total], (Kind::Float, device)).masked_fill(&hidden, f64::NEG_INFINITY);
    }
    let query_pos = Tensor::arange_start(past, total, (Kind::Int64, device)).view([t, 1]);
    let key_pos = Tensor::arange(total, (Kind::Int64, device)).view([1, total]);
    let mut allowed = key_pos.le_tensor(&query_pos); // (t, total)
    if let Some(w) = window {
        allowed = allowed.logical_and(&(&query_pos - &key_pos).lt(w));
    }
    let key_segment = key_mask.to_kind(Kind::Int64);
    let query_segment = key_segment.narrow(1, past, t).view([b, 1, t, 1]);
    let key_segment = key_segment.view([b, 1, 1, total]);
    let same_segment = key_segment.ne(0).logical_and(&key_segment.eq_tensor(&query_segment)); // (B, 1, t, total)
    let allowed = allowed.view([1, 1, t, total]).logical_and(&same_segment);
    let itself = key_pos.eq_tensor(&query_pos).view([1, 1, t, total]);
    let allowed = allowed.logical_or(&itself);
    Tensor::zeros([b, 1, t, total], (Kind::Float, device)).masked_fill(&allowed.logical_not(), f64::NEG_INFINITY)
}

/// Position ids from a padding mask (B, T): 0, 1, 2... counting tokens only, as HF's
/// `generate` computes them, so a left-padded prompt gets the positions it has alone.
pub fn positions_from_mask(mask: &Tensor) -> Tensor {
    (mask.to_kind(Kind::Int64).cumsum(-1, Kind::Int64) - 1).clamp_min(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mask_is_causal_hides_padding_and_windows() {
        let key_mask = Tensor::from_slice(&[0i64, 1, 1, 1]).view([1, 4]);
        let m = attention_mask(&key_mask, 0, 4, Some(2));
        let allowed: Vec<Vec<bool>> =
            (0..4).map(|q| (0..4).map(|k| m.double_value(&[0, 0, q, k]) == 0.0).collect()).collect();
        assert_eq!(
            allowed,
            vec![
                vec![true, false, false, false], // a padding query sees only itself
                vec![false, true, false, false],
                vec![false, true, true, false],
                vec![false, false, true, true], // window of 2
            ]
        );
        assert_eq!(Vec::<i64>::try_from(positions_from_mask(&key_mask).view([-1])).unwrap(), vec![0, 0, 1, 2]);
    }

    /// The one-query path of a decoding step gives what the general rule gives for the
    /// last row: padding and other segments hidden, a padding query seeing itself.
    #[test]
    fn a_decoding_steps_mask_is_the_last_row_of_the_full_mask() {
        for keys in [[0i64, 1, 1, 1, 1], [1, 1, 2, 2, 2], [1, 1, 0, 1, 0], [0, 0, 0, 0, 1]] {
            let key_mask = Tensor::from_slice(&keys).view([1, 5]);
            let full = attention_mask(&key_mask, 0, 5, None).narrow(2, 4, 1);
            let step = attention_mask(&key_mask, 4, 1, None);
            assert_eq!(step.size(), [1, 1, 1, 5]);
            assert!(step.equal(&full), "{keys:?}: {step} vs {full}");
        }
    }

    #[test]
    fn packed_segments_only_see_themselves() {
        let key_mask = Tensor::from_slice(&[1i64, 1, 2, 2, 2, 0]).view([1, 6]);
        let m = attention_mask(&key_mask, 0, 6, None);
        let allowed: Vec<Vec<bool>> =
            (0..6).map(|q| (0..6).map(|k| m.double_value(&[0, 0, q, k]) == 0.0).collect()).collect();
        let expected: Vec<Vec<bool>> = [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 1], // padding sees only itself
        ]
        .iter()
        .map(|row| row.iter().map(|&a| a == 1).collect())
        .collect();
        assert_eq!(allowed, expected);
    }

    #[test]
    fn the_cache_returns_everything_written_so_far() {
        let mut cache = KvCache::new(1, 1, 1, 5, 2, Kind::Float, Device::Cpu);
        let a = Tensor::ones([1, 1, 2, 2], (Kind::Float, Device::Cpu));
        let (k, _) = cache.append(0, &a, &a);
        assert_eq!(k.size(), vec![1, 1, 2, 2]);
        cache.advance(2);
        let (k, _) = cache.append(0, &(&a.narrow(2, 0, 1) * 3.0), &a.narrow(2, 0, 1));
        cache.advance(1);
        assert_eq!(k.size(), vec![1, 1, 3, 2]);
        assert_eq!(k.double_value(&[0, 0, 2, 0]), 3.0);
        assert_eq!(cache.len(), 3);
    }

    #[test]
    fn kept_rows_keep_their_keys_and_values() {
        let mut cache = KvCache::new(2, 3, 1, 4, 2, Kind::Float, Device::Cpu);
        // Row b holds the value b everywhere.
        let k = Tensor::arange(3, (Kind::Float, Device::Cpu)).view([3, 1, 1, 1]).expand([3, 1, 2, 2], false);
        for layer in 0..2 {
            let _ = cache.append(layer, &k, &(&k * 10.0));
        }
        cache.advance(2);
        cache.keep_rows(&Tensor::from_slice(&[0i64, 2]));
        let (keys, values) = cache.append(1, &k.narrow(0, 0, 2).narrow(2, 0, 1), &k.narrow(0, 0, 2).narrow(2, 0, 1));
        assert_eq!(keys.size(), vec![2, 1, 3, 2]);
        assert_eq!((keys.double_value(&[1, 0, 0, 0]), values.double_value(&[1, 0, 1, 1])), (2.0, 20.0));
        assert_eq!(cache.len(), 2);
    }
}
