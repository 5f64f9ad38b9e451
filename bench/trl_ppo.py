"""TRL's PPO trainer on the shape `plumb bench ppo` runs, for a side-by-side figure.

    ./dev bench-ppo                       # both sides, one after the other, on this machine
    .venv/bin/python bench/trl_ppo.py --iterations 4 --repeats 3 --device cpu

Needs `trl==1.12.0` (the last release with `PPOTrainer`, under `trl.experimental.ppo`;
`./dev bench-ppo` installs it into .venv). The shape mirrors `plumb bench ppo`:

- policy, reference, value and reward model: Llama, vocabulary 637, hidden 128,
  intermediate 352, 4 layers, 4 heads, tied embeddings (the quickstart model), random
  weights from `--seed`; the value and reward models are `LlamaForSequenceClassification`
  with one label, as TRL's examples build them;
- a batch of 16 prompts of 16 random tokens, exactly 32 sampled response tokens
  (temperature 1, no stop token), 4 PPO epochs over 4 minibatches of 4, no gradient
  accumulation (TRL: per_device_train_batch_size 16, num_mini_batches 4, so each
  minibatch is one optimizer step), kl_coef 0.05, lr 3e-6.

An episode is one prompt through a whole PPO iteration (rollout, scoring, 4 epochs of
updates). Each repeat trains a fresh trainer for `--iterations` updates; the first update
is a warm-up and is not timed. Printed: episodes/s of each repeat and their median, the
share of the timed iterations spent in generation, and the peak RSS of the process.
"""

import argparse
import os
import resource
import statistics
import sys
import time

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
    TrainerCallback,
)

import trl.experimental.ppo.ppo_trainer as ppo_module  # noqa: E402
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402

VOCAB = 637
BATCH = 16
PROMPT_LEN = 16
RESPONSE_LEN = 32
EPOCHS = 4
MINIBATCHES = 4
PAD, EOS = 0, 1


def llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=None,
        num_labels=1,
    )


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over VOCAB made-up tokens: TRL only needs its pad and eos ids."""
    vocab = {f"t{i}": i for i in range(VOCAB)}
    inner = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t2"))
    return PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="t0", eos_token="t1", unk_token="t2")


class StepTimes(TrainerCallback):
    """The wall time at the end of each PPO update."""

    def __init__(self):
        self.ends = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def timed_generation(record):
    """Wraps TRL's `batch_generation` so the generation share can be reported."""
    original = ppo_module.batch_generation

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        out = original(*args, **kwargs)
        record.append((started, time.perf_counter()))
        return out

    ppo_module.batch_generation = wrapper
    return original


def one_repeat(iterations: int, seed: int, device: str, out_dir: str):
    torch.manual_seed(seed)
    config = llama_config()
    policy = LlamaForCausalLM(config)
    ref = LlamaForCausalLM(config)
    ref.load_state_dict(policy.state_dict())
    reward = LlamaForSequenceClassification(config)
    value = LlamaForSequenceClassification(config)
    # Prompts avoid the pad and eos ids, so TRL's masks (token != pad) keep every token.
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, VOCAB, (BATCH * iterations, PROMPT_LEN), generator=generator)
    dataset = Dataset.from_dict({"input_ids": prompts.tolist()})
    args = PPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        num_mini_batches=MINIBATCHES,
        num_ppo_epochs=EPOCHS,
        total_episodes=BATCH * iterations,
        response_length=RESPONSE_LEN,
        local_rollout_forward_batch_size=BATCH,
        temperature=1.0,
        stop_token=None,
        kl_coef=0.05,
        learning_rate=3e-6,
        num_sample_generations=0,
        report_to=[],
        save_strategy="no",
        logging_steps=10_000,
        seed=seed,
        use_cpu=device == "cpu",
        bf16=False,
        fp16=False,
        dataloader_num_workers=0,
    )
    times = StepTimes()
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer(),
        model=policy,
        ref_model=ref,
        reward_model=reward,
        value_model=value,
        train_dataset=dataset,
        callbacks=[times],
    )
    generations = []
    original = timed_generation(generations)
    try:
        trainer.train()
    finally:
        ppo_module.batch_generation = original
    if len(times.ends) != iterations:
        sys.exit(f"trl_ppo: expected {iterations} updates, TRL ran {len(times.ends)}")
    timed = times.ends[-1] - times.ends[0]
    generation = sum(end - start for start, end in generations[1:])
    return BATCH * (iterations - 1) / timed, generation / timed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=4, help="PPO updates per repeat; the first is not timed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--output-dir", default="/tmp/plumb-bench-trl-ppo")
    args = parser.parse_args()
    if args.iterations < 2:
        sys.exit("trl_ppo: --iterations must be at least 2 (the first is a warm-up)")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("trl_ppo: --device cuda, but torch sees no CUDA device")

    import trl
    print(
        f"TRL {trl.__version__} PPO, torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}: "
        f"llama vocab {VOCAB} hidden 128 layers 4, batch {BATCH}, prompt {PROMPT_LEN}, response {RESPONSE_LEN}, "
        f"{EPOCHS} epochs x {MINIBATCHES} minibatches"
    )
    rates = []
    for repeat in range(args.repeats):
        rate, generation_share = one_repeat(args.iterations, args.seed + repeat, args.device, args.output_dir)
        rates.append(rate)
        print(f"repeat {repeat + 1}: {rate:.2f} episodes/s, generation {100 * generation_share:.0f}% of the time")
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"median: {statistics.median(rates):.2f} episodes/s; peak RSS {peak_rss / 2**20:.0f} MiB")
    if args.device == "cuda":
        print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
