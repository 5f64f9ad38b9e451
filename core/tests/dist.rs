//! c10d through core's shim: Gloo collectives among 2 and 3 processes on 127.0.0.1, and the
//! errors a missing or dead peer gives. Each world is this test binary started once per rank
//! (running the ignored test `child` with the launch variables torchrun would set).
use std::net::TcpListener;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use plumb_core::dist::{data_parallel, DistError, ProcessGroup, ReduceOp, Rendezvous};
use plumb_core::model::llama::{LlamaConfig, LlamaForCausalLm};
use plumb_core::model::HeadChunks;
use plumb_core::optim::{AdamW, AdamWConfig, Optimizer};
use plumb_core::rollout::{whiten, whiten_over_ranks};
use plumb_core::tch::{Device, Kind, Tensor};
use plumb_core::train::{accumulate_gradients, Precision};

/// Which scenario a child process runs.
const SCENARIO: &str = "PLUMB_DIST_TEST_SCENARIO";

/// A port nobody listens on now (the OS's pick for a socket closed at once).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts `world` copies of this binary as ranks of one group running `scenario`; their outputs, in rank order.
fn run_world(world: usize, scenario: &str, timeout_s: f64) -> Vec<Output> {
    let port = free_port().to_string();
    let children: Vec<_> = (0..world)
        .map(|rank| {
            Command::new(std::env::current_exe().unwrap())
                .args(["child", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
                .env(SCENARIO, scenario)
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .env("PLUMB_DIST_TIMEOUT", timeout_s.to_string())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children.into_iter().map(|c| c.wait_with_output().unwrap()).collect()
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn assert_all_succeed(outputs: &[Output]) {
    for (rank, output) in outputs.iter().enumerate() {
        assert!(output.status.success(), "rank {rank} failed:\n{}", text(output));
        assert!(text(output).contains("1 passed"), "rank {rank} ran no child test:\n{}", text(output));
    }
}

#[test]
fn collectives_among_two_processes() {
    assert_all_succeed(&run_world(2, "collectives", 60.0));
}

#[test]
fn collectives_among_three_processes() {
    assert_all_succeed(&run_world(3, "collectives", 60.0));
}

/// Each rank's gradients of its share of a batch, averaged over the ranks, equal one
/// process's gradients of the whole batch.
#[test]
fn averaged_gradients_of_the_shards_equal_the_gradients_of_the_whole_batch() {
    assert_all_succeed(&run_world(2, "gradients", 60.0));
    assert_all_succeed(&run_world(3, "gradients", 60.0));
}

/// PPO's whitening over the global batch: each rank whitens its rows with the mean and
/// variance of every rank's tokens, as one process whitens the whole batch; and lists of
/// different lengths gathered from the ranks arrive whole, in rank order.
#[test]
fn whitening_over_the_ranks_equals_whitening_the_whole_batch() {
    assert_all_succeed(&run_world(2, "whitening", 60.0));
    assert_all_succeed(&run_world(3, "whitening", 60.0));
}

/// ZeRO-1: an optimizer sharded over the ranks gives the parameters of plain AdamW after
/// several steps, while each rank holds only its share of the state.
#[test]
fn sharded_adamw_matches_plain_adamw() {
    assert_all_succeed(&run_world(2, "zero1", 60.0));
    assert_all_succeed(&run_world(3, "zero1", 60.0));
}

#[test]
fn a_dead_rank_ends_the_others_with_an_error_within_the_timeout() {
    let start = Instant::now();
    let outputs = run_world(3, "rank_2_dies", 10.0);
    assert!(start.elapsed() < Duration::from_secs(30), "took {:?}", start.elapsed());
    assert_eq!(outputs[2].status.code(), Some(3), "rank 2 should exit with 3:\n{}", text(&outputs[2]));
    for output in &outputs[..2] {
        assert!(output.status.success(), "{}", text(output));
        assert!(text(output).contains(": all-reduce failed: "), "{}", text(output));
        eprintln!("{}", text(output).lines().find(|l| l.contains(" saw: ")).unwrap_or_default());
    }
}

/// The ignored test the worlds above run, one process per rank.
#[test]
#[ignore = "a rank of the multi-process tests above, started by them"]
fn child() {
    let Ok(scenario) = std::env::var(SCENARIO) else { return };
    let rendezvous = Rendezvous::from_env().unwrap().expect("the parent sets the launch variables");
    let group = ProcessGroup::join(&rendezvous).unwrap();
    match scenario.as_str() {
        "collectives" => collectives(&group),
        "rank_2_dies" => rank_2_dies(&group),
        "gradients" => gradients(&group),
        "zero1" => zero1(&group),
        "whitening" => whitening(&group),
        other => panic!("unknown scenario {other}"),
    }
}

fn floats(values: &[f32]) -> Tensor {
    Tensor::from_slice(values)
}

fn assert_tensor_eq(actual: &Tensor, expected: &Tensor, what: &str) {
    let diff = (actual - expected).abs().max().double_value(&[]);
    assert!(diff < 1e-6, "{what}: {actual} != {expected}");
}

/// Every collective, checked against the values each rank can compute by itself.
fn collectives(group: &ProcessGroup) {
    let (rank, world) = (group.rank() as f32, group.world_size() as f32);
    let rank_sum = world * (world - 1.0) / 2.0; // 0 + 1 + ... + (world - 1)

    // Sum of two tensors in one call, one of them f64 and 2-D.
    let a = floats(&[rank + 1.0, 2.0 * (rank + 1.0)]);
    let b = Tensor::full([2, 3], f64::from(rank), (Kind::Double, Device::Cpu));
    group.all_reduce(&[a.shallow_clone(), b.shallow_clone()], ReduceOp::Sum).unwrap();
    let total = rank_sum + world; // sum over ranks of rank + 1
    assert_tensor_eq(&a, &floats(&[total, 2.0 * total]), "sum");
    assert_tensor_eq(&b, &Tensor::full([2, 3], f64::from(rank_sum), (Kind::Double, Device::Cpu)), "sum (f64)");

    let avg = floats(&[rank, 10.0]);
    group.all_reduce(&[avg.shallow_clone()], ReduceOp::Avg).unwrap();
    assert_tensor_eq(&avg, &floats(&[rank_sum / world, 10.0]), "avg");

    let max = floats(&[rank, -rank]);
    group.all_reduce(&[max.shallow_clone()], ReduceOp::Max).unwrap();
    assert_tensor_eq(&max, &floats(&[world - 1.0, 0.0]), "max");

    // Broadcast from the last rank: every rank ends with its values.
    let root = group.world_size() - 1;
    let value = Tensor::arange(4, (Kind::Float, Device::Cpu)) + 100.0 * f64::from(rank);
    group.broadcast(&[value.shallow_clone()], root).unwrap();
    let expected = Tensor::arange(4, (Kind::Float, Device::Cpu)) + 100.0 * root as f64;
    assert_tensor_eq(&value, &expected, "broadcast");

    let gathered = group.all_gather(&floats(&[rank, rank * rank])).unwrap();
    assert_eq!(gathered.len(), group.world_size());
    for (r, got) in gathered.iter().enumerate() {
        let r = r as f32;
        assert_tensor_eq(got, &floats(&[r, r * r]), "all-gather");
    }

    // Rank s sends r + 100 s to rank r: rank r receives world * r + 100 * rank_sum.
    let inputs: Vec<Tensor> = (0..group.world_size()).map(|r| floats(&[r as f32 + 100.0 * rank; 3])).collect();
    let output = floats(&[0.0; 3]);
    group.reduce_scatter(&output, &inputs, ReduceOp::Sum).unwrap();
    assert_tensor_eq(&output, &floats(&[world * rank + 100.0 * rank_sum; 3]), "reduce-scatter");

    // Wrong inputs are errors, not aborts.
    let err = group.reduce_scatter(&output, &inputs[..1], ReduceOp::Sum).unwrap_err().to_string();
    assert!(err.contains("reduce-scatter failed: 1 input tensors"), "{err}");

    // A metric's figures over the ranks, in f64: sums and extremes; as they are without a group.
    let sums = data_parallel::reduce_values(Some(group), &[f64::from(rank), 0.25], ReduceOp::Sum).unwrap();
    assert_eq!(sums, [f64::from(rank_sum), 0.25 * f64::from(world)]);
    let extremes = data_parallel::reduce_values(Some(group), &[-f64::from(rank), 7.0], ReduceOp::Max).unwrap();
    assert_eq!(extremes, [0.0, 7.0]);
    assert_eq!(data_parallel::reduce_values(None, &[1.5], ReduceOp::Sum).unwrap(), [1.5]);

    group.barrier().unwrap();
}

/// Ranks start from different weights (seeded by their rank); after the broadcast they hold
/// rank 0's. Then each takes its share of 6 rows, and the averaged gradients must equal those
/// of all 6 rows on one model, computed here on rank 0's weights.
fn gradients(group: &ProcessGroup) {
    let policy = tiny_model(group.rank() as i64 + 1);
    let mut optimizer = AdamW::new(policy.var_store(), AdamWConfig::default());
    data_parallel::broadcast_parameters(group, &optimizer.parameters()).unwrap();
    let reference = tiny_model(1); // rank 0's start
    let mut whole = AdamW::new(reference.var_store(), AdamWConfig::default());
    for (p, q) in optimizer.parameters().iter().zip(whole.parameters()) {
        assert!(p.equal(q), "the broadcast gives rank 0's weights");
    }

    let data = Tensor::arange(6 * 9, (Kind::Int64, Device::Cpu)).remainder(37).view([6, 9]);
    let rows: Vec<i64> = (0..6).collect();
    whole.zero_grad();
    let whole_loss =
        accumulate_gradients(&reference, &data, &rows, 6, Device::Cpu, Precision::Fp32, HeadChunks::Whole).unwrap();

    let share = &rows[data_parallel::shard_range(rows.len(), group.rank(), group.world_size())];
    optimizer.zero_grad();
    let loss = accumulate_gradients(&policy, &data, share, 6, Device::Cpu, Precision::Fp32, HeadChunks::Whole).unwrap();
    data_parallel::average_gradients(group, &optimizer.parameters()).unwrap();
    let mean_loss = data_parallel::average_values(group, &[loss]).unwrap()[0];
    assert!((mean_loss - whole_loss).abs() < 1e-5, "loss {mean_loss} vs {whole_loss}");
    for (p, q) in optimizer.parameters().iter().zip(whole.parameters()) {
        let (g, h) = (p.grad(), q.grad());
        let diff = (&g - &h).abs().max().double_value(&[]);
        let scale = h.abs().max().double_value(&[]).max(1e-12);
        assert!(diff <= 1e-5 * scale.max(1.0), "gradient differs by {diff} (largest {scale})");
    }

    // Overlapped with backward: buckets of 1 KiB start their all-reduce as backward
    // accumulates their gradients. Two micro-batches, the first only accumulating, the
    // second armed, give the gradients that averaging after backward gives.
    let (first, second) = share.split_at(share.len() / 2);
    let accumulate = |rows: &[i64]| {
        accumulate_gradients(&policy, &data, rows, 6, Device::Cpu, Precision::Fp32, HeadChunks::Whole).unwrap()
    };
    let mut sync = group.gradient_sync(&optimizer.parameters(), 1024).unwrap();
    optimizer.zero_grad();
    accumulate(first);
    accumulate(second);
    data_parallel::average_gradients(group, &optimizer.parameters()).unwrap();
    let after: Vec<Tensor> = optimizer.parameters().iter().map(|p| p.grad().copy()).collect();
    optimizer.zero_grad();
    accumulate(first);
    sync.arm().unwrap();
    accumulate(second);
    let overlapped = sync.finish(group).unwrap();
    assert!(sync.buckets() >= 4, "{} buckets", sync.buckets());
    assert!(overlapped == sync.buckets(), "{overlapped} of {} buckets started during backward", sync.buckets());
    for (p, expected) in optimizer.parameters().iter().zip(&after) {
        let diff = (p.grad() - expected).abs().max().double_value(&[]);
        assert!(diff <= 1e-6, "overlapped gradient differs by {diff}");
    }
    // Unarmed (a rank with nothing to back-propagate), every bucket starts in `finish`.
    optimizer.zero_grad();
    if group.rank() != 0 {
        accumulate(share);
        sync.arm().unwrap();
    }
    sync.finish(group).unwrap();
}

fn tiny_model(seed: i64) -> LlamaForCausalLm {
    tch::manual_seed(seed);
    let hf: LlamaConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 40, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "max_position_embeddings": 16
    }))
    .unwrap();
    LlamaForCausalLm::new(hf, Device::Cpu).unwrap()
}

/// Two copies of one model, trained on the same batches (each rank its share, gradients
/// averaged): one with plain AdamW, one with AdamW sharded. After 5 steps their parameters
/// agree to 1e-6; each rank's state holds its parameters' moments only, and the gathered
/// state equals the plain one; a sharded optimizer restored from it continues the same.
fn zero1(group: &ProcessGroup) {
    let (rank, world) = (group.rank(), group.world_size());
    let config = AdamWConfig { lr: 0.01, weight_decay: 0.1, ..AdamWConfig::default() };
    let plain_model = tiny_model(rank as i64 + 1);
    let sharded_model = tiny_model(rank as i64 + 1);
    let mut plain = AdamW::new(plain_model.var_store(), config.clone());
    let mut sharded = AdamW::new(sharded_model.var_store(), config.clone());
    data_parallel::broadcast_parameters(group, &plain.parameters()).unwrap();
    data_parallel::broadcast_parameters(group, &sharded.parameters()).unwrap();
    sharded.shard(rank, world);
    assert!(sharded.state_bytes() < plain.state_bytes(), "{} vs {}", sharded.state_bytes(), plain.state_bytes());
    assert_eq!(plain.state_bytes(), plain.full_state_bytes());

    let data = Tensor::arange(5 * 6 * 9, (Kind::Int64, Device::Cpu)).remainder(37).view([30, 9]);
    let train = |model: &LlamaForCausalLm, opt: &mut AdamW, step: i64| {
        let rows: Vec<i64> = (6 * step..6 * step + 6).collect();
        let share = &rows[data_parallel::shard_range(rows.len(), rank, world)];
        opt.zero_grad();
        accumulate_gradients(model, &data, share, 6, Device::Cpu, Precision::Fp32, HeadChunks::Whole).unwrap();
        data_parallel::average_gradients(group, &opt.parameters()).unwrap();
        opt.step().unwrap();
        opt.broadcast_updated(group).unwrap();
    };
    for step in 0..4 {
        train(&plain_model, &mut plain, step);
        train(&sharded_model, &mut sharded, step);
    }
    let compare = |a: &AdamW, b: &AdamW, what: &str| {
        for (p, q) in a.parameters().iter().zip(b.parameters()) {
            let diff = (*p - q).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "{what}: a parameter differs by {diff}");
        }
    };
    compare(&plain, &sharded, "after 4 steps");
    // The parameters moved from rank 0's start: the comparison is not of untouched copies.
    let start = AdamW::new(tiny_model(1).var_store(), AdamWConfig::default());
    let moved = start.parameters().iter().zip(plain.parameters()).all(|(p, q)| !p.equal(q));
    assert!(moved, "a parameter did not change in 4 steps");

    // Each rank's state: the step and its own parameters' moments, every parameter owned once.
    let owners = sharded.owners();
    let own = owners.iter().filter(|&&o| o == rank).count();
    assert_eq!(sharded.state().len(), 1 + 2 * own, "rank {rank} owns {own} of {}", owners.len());
    let counts = data_parallel::reduce_values(Some(group), &[own as f64], ReduceOp::Sum).unwrap();
    assert_eq!(counts[0] as usize, owners.len());
    assert!(own > 0, "rank {rank} owns nothing: {owners:?}");

    // The gathered state is plain AdamW's, name by name.
    let gathered = sharded.gather_state(Some(group)).unwrap();
    let whole = plain.state();
    assert_eq!(gathered.len(), whole.len());
    for ((n, t), (m, u)) in gathered.iter().zip(&whole) {
        assert_eq!(n, m);
        let diff = (t.to_kind(Kind::Double) - u.to_kind(Kind::Double)).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "state `{n}` differs by {diff}");
    }

    // Resumed from the whole state (as from a checkpoint) into a fresh sharded optimizer,
    // one more step stays with plain AdamW.
    let mut resumed = AdamW::new(sharded_model.var_store(), config);
    resumed.shard(rank, world);
    resumed.load_state(&gathered).unwrap();
    assert_eq!(resumed.steps_taken(), 4);
    train(&plain_model, &mut plain, 4);
    train(&sharded_model, &mut resumed, 4);
    compare(&plain, &resumed, "after resuming");
}

/// Rank 2 leaves after the first barrier; the others' next collective fails (Gloo sees the
/// connection close) with an error naming the operation, their rank, and rank 2 (its
/// heartbeat stopped), and they exit cleanly.
fn rank_2_dies(group: &ProcessGroup) {
    group.barrier().unwrap();
    if group.rank() == 2 {
        std::process::exit(3);
    }
    std::thread::sleep(Duration::from_millis(300));
    let t = floats(&[1.0]);
    let err = group.all_reduce(&[t], ReduceOp::Sum).unwrap_err();
    eprintln!("rank {} saw: {err}", group.rank());
    assert!(matches!(err, DistError::Collective { op: "all-reduce", .. }), "{err}");
    assert!(err.to_string().starts_with(&format!("rank {} of 3: all-reduce failed", group.rank())), "{err}");
    assert!(err.to_string().contains("; rank 2 stopped answering (no heartbeat for "), "{err}");
    assert!(!err.to_string().contains("rank 1 stopped") && !err.to_string().contains("rank 0 stopped"), "{err}");
}

#[test]
fn a_rank_alone_times_out_naming_its_rank_and_the_address() {
    let port = free_port();
    let rendezvous = Rendezvous {
        rank: 0,
        world_size: 2,
        local_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        timeout: Duration::from_secs(2),
        agent_store: None,
    };
    let start = Instant::now();
    let err = ProcessGroup::join(&rendezvous).err().expect("rank 1 never comes").to_string();
    assert!(start.elapsed() < Duration::from_secs(20), "took {:?}", start.elapsed());
    eprintln!("{err}");
    let expected = format!("rank 0 of 2 could not join the group at 127.0.0.1:{port} within 2s: ");
    assert!(err.starts_with(&expected), "{err}");

    // A rank whose store never answers.
    let client = Rendezvous { rank: 1, ..rendezvous };
    let err = ProcessGroup::join(&client).err().expect("no rank 0 serves").to_string();
    eprintln!("{err}");
    assert!(err.starts_with(&format!("rank 1 of 2 could not join the group at 127.0.0.1:{port}")), "{err}");
}

fn whitening(group: &ProcessGroup) {
    let (rank, world) = (group.rank(), group.world_size());
    // Six episodes of up to 5 tokens, of lengths 5, 4, 2, 5, 1, 3 (junk past each end).
    let values = (Tensor::arange(30, (Kind::Float, Device::Cpu)) * 0.37).sin().view([6, 5]) * 3.0 + 0.5;
    let lengths = Tensor::from_slice(&[5i64, 4, 2, 5, 1, 3]).unsqueeze(1);
    let mask = Tensor::arange(5, (Kind::Int64, Device::Cpu)).unsqueeze(0).lt_tensor(&lengths).to_kind(Kind::Float);
    let rows = data_parallel::shard_range(6, rank, world);
    let (start, len) = (rows.start as i64, rows.len() as i64);
    for shift_mean in [true, false] {
        let mine =
            whiten_over_ranks(&values.narrow(0, start, len), &mask.narrow(0, start, len), shift_mean, Some(group))
                .unwrap();
        let whole = whiten(&values, &mask, shift_mean).narrow(0, start, len);
        let diff = (&mine - &whole).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "rank {rank}, shift_mean {shift_mean}: {mine} != {whole}");
    }
    // Without a group it is plain whitening.
    let alone = whiten_over_ranks(&values, &mask, true, None).unwrap();
    assert_tensor_eq(&alone, &whiten(&values, &mask, true), "whitening without a group");

    // Rank r gives r + 1 values (10r, 10r + 1, ...); rank 1 of 3 gives none.
    let mine: Vec<f64> =
        if rank == 1 && world == 3 { Vec::new() } else { (0..=rank).map(|i| (10 * rank + i) as f64).collect() };
    let gathered = data_parallel::gather_values(Some(group), &mine).unwrap();
    let expected: Vec<Vec<f64>> = (0..world)
        .map(|r| if r == 1 && world == 3 { Vec::new() } else { (0..=r).map(|i| (10 * r + i) as f64).collect() })
        .collect();
    assert_eq!(gathered, expected);
}
