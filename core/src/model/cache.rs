//! The key/value cache of incremental decoding and the attention masks around it.
use tch::{Device, Kind, Tensor};

/// Keys and values of past positions for every layer, allocated once for a batch:
/// each (B, n_kv_heads, capacity, head_dim), filled up to `len`.
///
/// A cache can also decode in *fixed shape* ([`KvCache::fix_shape`]), the form a CUDA
/// graph replays: each step writes its keys and values at the position a device tensor
/// holds, and attention runs over the whole capacity under a mask (B, 1, 1, capacity)
/// that the caller keeps, so no shape and no host-side offset changes between steps.
/// Only models whose decoding step reads nothing else from the host offer it
/// ([`KvCache::offers_fixed_shape`]).
pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    len: i64,
    capacity: i64,
    offers_fixed_shape: bool,
    fixed: Option<FixedShape>,
}

/// What fixed-shape decoding steps read: where the new position goes, and the additive
/// attention mask over every position of the cache.
struct FixedShape {
    write_at: Tensor,
    mask: Tensor,
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
            offers_fixed_shape: false,
            fixed: None,
        }
    }

    /// Marks the cache as one its model can decode in fixed shape (the model reads the
    /// mask of [`KvCache::fixed_mask`] and nothing else from outside the step).
    pub fn offering_fixed_shape(mut self) -> Self {
        self.offers_fixed_shape = true;
        self
    }

    /// Whether the model that made this cache can decode in fixed shape.
    pub fn offers_fixed_shape(&self) -> bool {
        self.offers_fixed_shape
    }

    /// Decodes one position a step in fixed shape from now on: [`KvCache::append`] writes
    /// at the position `write_at` (int64, (1), on the cache's device) holds and returns
    /// every position, and the model attends under `mask` (B, 1, 1, capacity), additive,
    /// in the model's dtype. The caller updates both in place between steps.
    pub fn fix_shape(&mut self, write_at: Tensor, mask: Tensor) {
        self.fixed = Some(FixedShape { write_at, mask });
    }

    /// The dtype of the cached keys and values (the model's).
    pub fn kind(&self) -> Kind {
        self.keys.first().map_or(Kind::Float, Tensor::kind)
    }

    /// The attention mask of a fixed-shape step, when the cache decodes in fixed shape.
    pub fn fixed_mask(&self) -> Option<&Tensor> {
        self.fixed.as_ref().map(|f| &f.mask)
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
        if let Some(fixed) = &self.fixed {
            let _ = keys.index_copy_(2, &fixed.write_at, k);
            let _ = values.index_copy_(2, &fixed.write_at, v);
            return (keys.shallow_clone(), values.shallow_clone());
        }
        keys.narrow(2, self.len, t).copy_(k);
        values.narrow(2, self.len, t).copy_(v);
        (keys.narrow(2, 0, self.len + t), values.narrow(2, 0, self.len + t))
    }

    pub fn advance(&mut self, t: i64) {
        self.len += t;
    }

    /// Keeps only the batch rows `rows` (1-D int64 indices, in the order given) of every
    /// layer, e.g. when finished sequences leave a generation batch; the cached length
    /// is unchanged. A fixed-shape mask keeps the same rows.
    pub fn keep_rows(&mut self, rows: &Tensor) {
        for t in self.keys.iter_mut().chain(self.values.iter_mut()) {
            *t = t.index_select(0, rows);
        }
        if let Some(fixed) = &mut self.fixed {
            fixed.mask = fixed.mask.index_select(0, rows);
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
