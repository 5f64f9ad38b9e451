//! NCCL through core's shim, in a group of one rank on cuda:0 (NCCL refuses two ranks on one
//! GPU, so one rank is what a one-GPU machine can test): collectives on CUDA tensors give
//! the right numbers through NCCL, CPU tensors on the same group still go through Gloo, and
//! gradients averaged over CUDA parameters while backward runs come back unchanged. Where
//! libtorch sees no GPU these are skipped with a line saying so; what runs everywhere is the
//! error of attaching NCCL where it cannot be, after which the group goes on with Gloo.
//!
//! The tests need no cargo variables or Python at run time: a copy of the binary runs on a
//! GPU machine without Rust (`devrun/nccl.sh`).
use std::net::TcpListener;
use std::sync::Mutex;
use std::time::Duration;

use plumb_core::dist::{data_parallel, Backend, DistError, ProcessGroup, ReduceOp, Rendezvous};
use plumb_core::model::llama::{LlamaConfig, LlamaForCausalLm};
use plumb_core::model::HeadChunks;
use plumb_core::optim::{AdamW, AdamWConfig, Optimizer};
use plumb_core::tch::{self, Device, Kind, Tensor};
use plumb_core::train::{accumulate_gradients, Precision};

/// One test at a time on the GPU: each makes NCCL communicators of its own on cuda:0.
static GPU: Mutex<()> = Mutex::new(());

/// A group of one rank with its own store on a free port of 127.0.0.1.
fn group_of_one() -> ProcessGroup {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let rendezvous = Rendezvous {
        rank: 0,
        world_size: 1,
        local_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        timeout: Duration::from_secs(60),
        agent_store: None,
    };
    ProcessGroup::join(&rendezvous).unwrap()
}

/// cuda:0, or `None` (saying so) where libtorch sees no GPU.
fn gpu(test: &str) -> Option<Device> {
    if tch::Cuda::device_count() == 0 {
        eprintln!("{test}: skipped: libtorch sees no CUDA device (NCCL needs one)");
        return None;
    }
    Some(Device::Cuda(0))
}

/// A group of one with NCCL attached on `device`.
fn nccl_group(device: Device) -> ProcessGroup {
    let mut group = group_of_one();
    group.attach_nccl(device).unwrap();
    assert_eq!(group.nccl_device(), Some(device));
    group
}

fn assert_close(actual: &Tensor, expected: &Tensor, what: &str) {
    assert_eq!(actual.device(), expected.device(), "{what}: device");
    assert_eq!(actual.size(), expected.size(), "{what}: shape");
    let diff = (actual.to_kind(Kind::Double) - expected.to_kind(Kind::Double)).abs().max().double_value(&[]);
    assert!(diff < 1e-6, "{what}: {actual} != {expected}");
}

#[test]
fn attaching_nccl_where_it_cannot_be_is_an_error_and_gloo_goes_on() {
    let mut group = group_of_one();
    let err = group.attach_nccl(Device::Cpu).unwrap_err();
    assert!(matches!(err, DistError::Collective { op: "attaching NCCL", .. }), "{err}");
    assert_eq!(err.to_string(), "rank 0 of 1: attaching NCCL failed: NCCL needs a CUDA device, not cpu");

    // A GPU this machine lacks: one past those libtorch sees.
    let seen = tch::Cuda::device_count() as usize;
    let err = group.attach_nccl(Device::Cuda(seen)).unwrap_err().to_string();
    eprintln!("{err}");
    assert!(err.starts_with("rank 0 of 1: attaching NCCL failed: "), "{err}");
    let expected = [
        // A build without CUDA's headers (CPU-only libtorch, or the headers not installed).
        "plumb was built without CUDA's headers, so it has no NCCL".to_string(),
        "NCCL needs a CUDA device, but libtorch sees none".to_string(),
        format!("cuda:{seen} asked for, but libtorch sees {seen} CUDA device(s)"),
    ];
    assert!(expected.iter().any(|e| err.contains(e.as_str())), "{err}");

    // The group is as it was: Gloo for everything.
    assert_eq!(group.nccl_device(), None);
    let t = Tensor::from_slice(&[1.5f32, -2.0]);
    assert_eq!(group.backend_for(&t), Backend::Gloo);
    group.all_reduce(&[t.shallow_clone()], ReduceOp::Avg).unwrap();
    assert_close(&t, &Tensor::from_slice(&[1.5f32, -2.0]), "all-reduce on Gloo");
}

/// Every collective on CUDA tensors, through NCCL; the same group's CPU tensors through Gloo.
#[test]
fn collectives_on_cuda_tensors_go_through_nccl_and_cpu_tensors_through_gloo() {
    let Some(cuda) = gpu("collectives_on_cuda_tensors") else { return };
    let _gpu = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let mut group = nccl_group(cuda);
    let err = group.attach_nccl(cuda).unwrap_err().to_string();
    assert!(err.contains("NCCL is already attached to this group"), "{err}");

    let on = |values: &[f32]| Tensor::from_slice(values).to_device(cuda);
    assert_eq!(group.backend_for(&on(&[0.0])), Backend::Nccl);
    assert_eq!(group.backend_for(&Tensor::from_slice(&[0.0f32])), Backend::Gloo);

    // Sum of two tensors in one call, one f64 and 2-D, one computed just before on the GPU
    // (NCCL's stream must wait for it): a world of one sums to itself.
    let big = Tensor::arange(1 << 20, (Kind::Float, cuda)) * 0.5 - 7.0;
    let expected_big = big.to_device(Device::Cpu);
    let b = Tensor::full([2, 3], 2.5, (Kind::Double, cuda));
    group.all_reduce(&[big.shallow_clone(), b.shallow_clone()], ReduceOp::Sum).unwrap();
    assert_close(&big.to_device(Device::Cpu), &expected_big, "sum of 1 Mi floats");
    assert_close(&b, &Tensor::full([2, 3], 2.5, (Kind::Double, cuda)), "sum (f64)");

    // Average, then work queued after it on the current stream sees its result.
    let avg = on(&[3.0, 10.0]);
    group.all_reduce(&[avg.shallow_clone()], ReduceOp::Avg).unwrap();
    let doubled = &avg * 2.0;
    assert_close(&doubled, &on(&[6.0, 20.0]), "twice the average");
    for op in [ReduceOp::Max, ReduceOp::Min] {
        let t = on(&[-1.0, 4.0]);
        group.all_reduce(&[t.shallow_clone()], op).unwrap();
        assert_close(&t, &on(&[-1.0, 4.0]), &format!("{op:?}"));
    }
    let half = Tensor::from_slice(&[0.25f32, -8.0]).to_kind(Kind::BFloat16).to_device(cuda);
    group.all_reduce(&[half.shallow_clone()], ReduceOp::Avg).unwrap();
    assert_close(&half, &on(&[0.25, -8.0]), "bf16 average");

    // Broadcast from rank 0 keeps rank 0's tensor; a root outside the world is an error.
    let t = on(&[5.0, 6.0, 7.0]);
    group.broadcast(&[t.shallow_clone()], 0).unwrap();
    assert_close(&t, &on(&[5.0, 6.0, 7.0]), "broadcast");
    let err = group.broadcast(&[t.shallow_clone()], 1).unwrap_err().to_string();
    assert!(err.contains("broadcast root 1 is outside a world of 1"), "{err}");

    // All-gather: one tensor per rank, on the input's device.
    let input = on(&[1.0, 2.0, 3.0, 4.0]).view([2, 2]);
    let gathered = group.all_gather(&input).unwrap();
    assert_eq!(gathered.len(), 1);
    assert_close(&gathered[0], &input, "all-gather");
    // Outputs on another device than the input are refused, naming both.
    let cpu_output = [Tensor::zeros([2, 2], (Kind::Float, Device::Cpu))];
    let err = group.all_gather_into(&cpu_output, &input).unwrap_err().to_string();
    assert!(err.contains("all-gather expected every tensor on cuda:0 (the input's device), found one on cpu"), "{err}");

    // Reduce-scatter: rank 0's share of the reduction of every rank's inputs[0].
    for (op, what) in [(ReduceOp::Sum, "reduce-scatter sum"), (ReduceOp::Avg, "reduce-scatter average")] {
        let output = Tensor::zeros([3], (Kind::Float, cuda));
        group.reduce_scatter(&output, &[on(&[1.0, -2.0, 9.0])], op).unwrap();
        assert_close(&output, &on(&[1.0, -2.0, 9.0]), what);
    }

    // The same group's CPU tensors go through Gloo (NCCL refuses CPU tensors).
    let cpu = Tensor::from_slice(&[4.0f32, 8.0]);
    group.all_reduce(&[cpu.shallow_clone()], ReduceOp::Avg).unwrap();
    assert_close(&cpu, &Tensor::from_slice(&[4.0f32, 8.0]), "average on the CPU");
    let gathered = group.all_gather(&cpu).unwrap();
    assert_close(&gathered[0], &cpu, "all-gather on the CPU");
    let values = data_parallel::average_values(&group, &[1.25, 3.0]).unwrap();
    assert_eq!(values, [1.25, 3.0]);
    group.barrier().unwrap();
    tch::Cuda::synchronize(0);
}

fn tiny_model(seed: i64, device: Device) -> LlamaForCausalLm {
    tch::manual_seed(seed);
    let hf: LlamaConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 40, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "max_position_embeddings": 16
    }))
    .unwrap();
    LlamaForCausalLm::new(hf, device).unwrap()
}

/// In a world of one, the gradients averaged over the ranks (on NCCL, overlapped with
/// backward, in buckets of 1 KiB) are the gradients backward gave.
#[test]
fn gradients_of_cuda_parameters_averaged_over_one_rank_are_unchanged() {
    let Some(cuda) = gpu("gradients_of_cuda_parameters") else { return };
    let _gpu = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let group = nccl_group(cuda);
    let policy = tiny_model(3, cuda);
    let mut optimizer = AdamW::new(policy.var_store(), AdamWConfig::default());
    // The optimizer's own tensors (shallow copies share them), while it is borrowed mutably.
    let owned: Vec<Tensor> = optimizer.parameters().iter().map(|p| p.shallow_clone()).collect();
    let parameters: Vec<&Tensor> = owned.iter().collect();
    assert!(parameters.iter().all(|p| p.device() == cuda));
    let before: Vec<Tensor> = parameters.iter().map(|p| p.copy()).collect();
    data_parallel::broadcast_parameters(&group, &parameters).unwrap();
    for (p, q) in parameters.iter().zip(&before) {
        assert!(p.equal(q), "a broadcast in a world of one changes nothing");
    }

    let data = Tensor::arange(6 * 9, (Kind::Int64, Device::Cpu)).remainder(37).view([6, 9]);
    let rows: Vec<i64> = (0..6).collect();
    let (first, second) = rows.split_at(3);
    let accumulate =
        |rows: &[i64]| accumulate_gradients(&policy, &data, rows, 6, cuda, Precision::Fp32, HeadChunks::Whole).unwrap();
    let grads = |parameters: &[&Tensor]| -> Vec<Tensor> { parameters.iter().map(|p| p.grad().copy()).collect() };
    let assert_same = |actual: &[Tensor], expected: &[Tensor], what: &str| {
        for (i, (g, h)) in actual.iter().zip(expected).enumerate() {
            assert_eq!(g.device(), cuda, "{what}: gradient {i} left the GPU");
            let diff = (g - h).abs().max().double_value(&[]);
            let scale = h.abs().max().double_value(&[]).max(1e-12);
            // Backward on a GPU may add in another order from one run to the next.
            assert!(diff <= 1e-6 * scale.max(1.0), "{what}: gradient {i} differs by {diff} (largest {scale})");
        }
    };

    optimizer.zero_grad();
    accumulate(first);
    accumulate(second);
    let plain = grads(&parameters);
    assert!(plain.iter().any(|g| g.abs().max().double_value(&[]) > 0.0), "backward gave gradients");

    // Averaged after backward, bucket by bucket.
    data_parallel::average_gradients(&group, &parameters).unwrap();
    assert_same(&grads(&parameters), &plain, "averaged after backward");

    // Overlapped with backward: the first micro-batch only accumulates, the armed second
    // starts each bucket's all-reduce as backward completes it.
    let mut sync = group.gradient_sync(&parameters, 1024).unwrap();
    optimizer.zero_grad();
    accumulate(first);
    sync.arm().unwrap();
    accumulate(second);
    let overlapped = sync.finish(&group).unwrap();
    assert!(sync.buckets() >= 4, "{} buckets", sync.buckets());
    assert_eq!(overlapped, sync.buckets(), "buckets started during backward");
    assert_same(&grads(&parameters), &plain, "overlapped with backward");

    // Unarmed, every bucket starts in `finish`.
    optimizer.zero_grad();
    accumulate(first);
    accumulate(second);
    assert_eq!(sync.finish(&group).unwrap(), 0);
    assert_same(&grads(&parameters), &plain, "all-reduced in finish");

    // A step with the averaged gradients moves the parameters, on the GPU.
    optimizer.step().unwrap();
    assert!(parameters.iter().zip(&before).any(|(p, q)| !p.equal(q)), "the step moved nothing");
    drop(sync);
    drop(group);
    tch::Cuda::synchronize(0);
}
