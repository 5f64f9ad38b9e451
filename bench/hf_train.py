"""transformers' training throughput on any device, for `plumb bench train` to be compared with.

    python bench/hf_train.py [--device cpu|cuda] [--shape quickstart|llama-125m|llama-350m|llama-1b]
                             [--batch B] [--seq T] [--steps 20] [--warmup 5]

The step is hf_baseline.py's (../shared/bench): forward with labels, backward, clipping to
norm 1, AdamW (fused on CUDA, with bf16 autocast there; fp32 on a CPU), on random tokens;
the mean of --steps steps after --warmup. Prints one JSON line in `plumb bench train`'s form.
"""
import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "quickstart": dict(vocab_size=637, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "llama-125m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                       num_attention_heads=12, num_key_value_heads=12),
    "llama-350m": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                       num_attention_heads=16, num_key_value_heads=16),
    "llama-1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", default="quickstart")
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    a = p.parse_args()
    quick = a.shape == "quickstart"
    batch = a.batch or (16 if quick or a.shape == "llama-125m" else 8)
    seq = a.seq or (128 if quick else 1024)
    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=4096, attn_implementation="sdpa", **SHAPES[a.shape])
    model = LlamaForCausalLM(cfg).to(a.device)
    model.train()
    cuda = a.device.startswith("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    x = torch.randint(0, cfg.vocab_size, (batch, seq), device=a.device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(a.warmup):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(a.steps):
        step()
    sync()
    dt = (time.perf_counter() - t) / a.steps
    params = sum(q.numel() for q in model.parameters())
    print(json.dumps(dict(case="train", model=a.shape, impl="transformers", device=a.device, params=params,
                          batch=batch, seq=seq, steps=a.steps, step_s=dt, tokens_per_s=batch * seq / dt,
                          threads=torch.get_num_threads())), flush=True)


if __name__ == "__main__":
    main()
