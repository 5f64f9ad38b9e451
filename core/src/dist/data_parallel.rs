//! The parts of data-parallel training (as PyTorch's DistributedDataParallel does it): the
//! same parameters everywhere by a broadcast from rank 0, each rank's share of the global
//! batch, and gradients averaged over the ranks in buckets (many small tensors flattened
//! into one, so a step costs a few collectives rather than one per parameter).
use std::ops::Range;

use tch::{Kind, Tensor};

use super::{DistError, ProcessGroup, ReduceOp};

/// PyTorch DDP's default bucket size: 25 MiB.
pub const BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// The items of a global batch of `len` that rank `rank` of `world` takes: a contiguous
/// slice, the first `len % world` ranks one item more. Concatenated in rank order, the
/// shares are the global batch, in order.
pub fn shard_range(len: usize, rank: usize, world: usize) -> Range<usize> {
    let world = world.max(1);
    let (base, extra) = (len / world, len % world);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// Groups `tensors` into runs of one dtype and device of at most `bucket_bytes` each (a
/// tensor larger than that is a bucket by itself), in order.
pub(super) fn buckets<'t>(tensors: &[&'t Tensor], bucket_bytes: usize) -> Vec<Vec<&'t Tensor>> {
    let mut out: Vec<Vec<&Tensor>> = Vec::new();
    let mut bytes = 0;
    for &t in tensors {
        let size = t.numel() * t.kind().elt_size_in_bytes();
        let fits = out.last().is_some_and(|b| {
            let first = b[0];
            first.kind() == t.kind() && first.device() == t.device() && bytes + size <= bucket_bytes
        });
        if fits {
            out.last_mut().expect("checked above").push(t);
            bytes += size;
        } else {
            out.push(vec![t]);
            bytes = size;
        }
    }
    out
}

/// Runs `collective` on each bucket of `tensors` flattened into one contiguous tensor, then
/// copies the results back into the tensors.
fn bucketed(
    tensors: &[&Tensor],
    bucket_bytes: usize,
    mut collective: impl FnMut(&Tensor) -> Result<(), DistError>,
) -> Result<(), DistError> {
    let _no_grad = tch::no_grad_guard();
    for bucket in buckets(tensors, bucket_bytes) {
        let flat = Tensor::cat(&bucket.iter().map(|t| t.reshape([-1])).collect::<Vec<_>>(), 0);
        collective(&flat)?;
        let mut offset = 0;
        for t in bucket {
            let n = t.numel() as i64;
            let mut target = t.shallow_clone();
            target.copy_(&flat.narrow(0, offset, n).view_as(t));
            offset += n;
        }
    }
    Ok(())
}

/// Overwrites `parameters` with rank 0's: the identical start of every rank.
pub fn broadcast_parameters(group: &ProcessGroup, parameters: &[&Tensor]) -> Result<(), DistError> {
    bucketed(parameters, BUCKET_BYTES, |flat| group.broadcast(std::slice::from_ref(flat), 0))
}

/// Overwrites each of `tensors` with its owner's (`owners[i]`, a rank), in buckets of
/// [`BUCKET_BYTES`] of one owner: how a sharded (ZeRO-1) optimizer shares the parameters
/// each rank updated. Every rank passes the same owners.
pub fn broadcast_from_owners(group: &ProcessGroup, tensors: &[&Tensor], owners: &[usize]) -> Result<(), DistError> {
    if tensors.len() != owners.len() {
        return Err(DistError::Invalid(format!("{} tensors but {} owners", tensors.len(), owners.len())));
    }
    for root in 0..group.world_size() {
        let own: Vec<&Tensor> = tensors.iter().zip(owners).filter(|(_, &o)| o == root).map(|(&t, _)| t).collect();
        bucketed(&own, BUCKET_BYTES, |flat| group.broadcast(std::slice::from_ref(flat), root))?;
    }
    Ok(())
}

/// Replaces each parameter's gradient with its mean over the ranks, in buckets of
/// [`BUCKET_BYTES`]. A parameter with no gradient on this rank takes part with zeros (so
/// every rank reduces the same buckets) and keeps no gradient.
pub fn average_gradients(group: &ProcessGroup, parameters: &[&Tensor]) -> Result<(), DistError> {
    let grads: Vec<Tensor> = parameters
        .iter()
        .map(|p| {
            let g = p.grad();
            if g.defined() {
                g
            } else {
                p.zeros_like()
            }
        })
        .collect();
    let refs: Vec<&Tensor> = grads.iter().collect();
    bucketed(&refs, BUCKET_BYTES, |flat| group.all_reduce(std::slice::from_ref(flat), ReduceOp::Avg))
}

/// The mean over the ranks of each rank's `values` (a step's loss and the like).
pub fn average_values(group: &ProcessGroup, values: &[f64]) -> Result<Vec<f64>, DistError> {
    let t = Tensor::from_slice(values).to_kind(Kind::Double);
    group.all_reduce(std::slice::from_ref(&t), ReduceOp::Avg)?;
    Ok(Vec::<f64>::try_from(&t).unwrap_or_else(|_| values.to_vec()))
}

/// Each of `values` combined over the ranks by `op` (the sums, counts or extremes behind a
/// metric of the global batch), in f64; the values as they are without a group (a
/// single-process run).
pub fn reduce_values(group: Option<&ProcessGroup>, values: &[f64], op: ReduceOp) -> Result<Vec<f64>, DistError> {
    let Some(group) = group else { return Ok(values.to_vec()) };
    let t = Tensor::from_slice(values).to_kind(Kind::Double);
    group.all_reduce(std::slice::from_ref(&t), op)?;
    Vec::<f64>::try_from(&t).map_err(|e| DistError::Invalid(format!("reading the reduced values back: {e}")))
}

/// Every rank's `values`, lists of any length, in rank order (each rank's list as it is);
/// just `values` without a group (a single-process run).
pub fn gather_values(group: Option<&ProcessGroup>, values: &[f64]) -> Result<Vec<Vec<f64>>, DistError> {
    let Some(group) = group else { return Ok(vec![values.to_vec()]) };
    // One row per rank: its length, then its values, padded to the longest list.
    let longest = reduce_values(Some(group), &[values.len() as f64], ReduceOp::Max)?[0] as usize;
    let mut row = Vec::with_capacity(longest + 1);
    row.push(values.len() as f64);
    row.extend_from_slice(values);
    row.resize(longest + 1, 0.0);
    let rows = group.all_gather(&Tensor::from_slice(&row))?;
    rows.iter()
        .map(|t| {
            let row = Vec::<f64>::try_from(t)
                .map_err(|e| DistError::Invalid(format!("reading the gathered values back: {e}")))?;
            let len = (row[0] as usize).min(longest);
            Ok(row[1..=len].to_vec())
        })
        .collect()
}

/// True on every rank when `flag` is true on any (an agreement, e.g. to stop together).
pub fn any(group: &ProcessGroup, flag: bool) -> Result<bool, DistError> {
    let t = Tensor::from_slice(&[i64::from(flag)]);
    group.all_reduce(std::slice::from_ref(&t), ReduceOp::Max)?;
    Ok(t.int64_value(&[0]) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_batch_in_order() {
        for (len, world) in [(8, 2), (7, 3), (2, 3), (0, 2), (5, 1)] {
            let ranges: Vec<_> = (0..world).map(|r| shard_range(len, r, world)).collect();
            assert_eq!(ranges[0].start, 0);
            assert_eq!(ranges[world - 1].end, len);
            for pair in ranges.windows(2) {
                assert_eq!(pair[0].end, pair[1].start);
                assert!(pair[0].len() >= pair[1].len() && pair[0].len() <= pair[1].len() + 1);
            }
        }
        assert_eq!(shard_range(7, 1, 3), 3..5);
    }

    #[test]
    fn buckets_keep_order_dtype_and_size() {
        let a = Tensor::zeros([4], (Kind::Float, tch::Device::Cpu)); // 16 bytes
        let b = Tensor::zeros([4], (Kind::Float, tch::Device::Cpu));
        let c = Tensor::zeros([4], (Kind::Double, tch::Device::Cpu));
        let d = Tensor::zeros([100], (Kind::Double, tch::Device::Cpu));
        let sizes: Vec<usize> = buckets(&[&a, &b, &c, &d], 40).iter().map(Vec::len).collect();
        assert_eq!(sizes, [2, 1, 1]);
    }
}
