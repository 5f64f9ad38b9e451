"""transformers' batched generation on any device, for `plumb bench generate` to be compared with.

    python bench/hf_generate.py --model DIR --prompts FILE [--new-tokens 64] [--repeats 3]
                                [--device cpu|cuda] [--threads N]
    python bench/hf_generate.py --shape quickstart|llama-125m [--batch B] [--prompt-len T] ...

`plumb bench generate --transformers PYTHON` runs this script itself, with the checkpoint it
generates from (--model, random weights written in HF layout) and its prompts (--prompts, a
JSON list of token-id lists), so both sides sample from the same model and prompts. Prompts
are left-padded with an attention mask; sampling at temperature 1 with top-k and top-p off,
exactly --new-tokens new tokens (min_new_tokens, no early stop). The figure is the median of
--repeats runs after one warm-up. Prints one JSON line in `plumb bench generate`'s form.

With --paced the runs are paced by the caller, so that each of its own runs and one of these
land in the same few hundred milliseconds (a shared machine's speed drifts between seconds):
after the warm-up the script prints {"ready": true}, then for each line read from stdin runs
once and prints {"seconds": S}; at the end of stdin it prints the summary line over those runs.
"""
import argparse
import json
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "quickstart": dict(vocab_size=637, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "llama-125m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                       num_attention_heads=12, num_key_value_heads=12),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", help="a checkpoint directory in HF layout")
    p.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape instead of --model")
    p.add_argument("--prompts", help="a JSON file: a list of prompts, each a list of token ids")
    p.add_argument("--batch", type=int, default=1, help="with --shape and no --prompts: random prompts")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--paced", action="store_true", help="one run per line read from stdin (see above)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.model:
        model = LlamaForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa")
    elif a.shape:
        model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=4096, attn_implementation="sdpa", **SHAPES[a.shape]))
    else:
        p.error("give --model or --shape")
    model = model.to(a.device).eval()
    vocab = model.config.vocab_size
    if a.prompts:
        with open(a.prompts) as f:
            prompts = json.load(f)
    else:
        prompts = torch.randint(0, vocab, (a.batch, a.prompt_len)).tolist()
    longest = max(len(q) for q in prompts)
    ids = torch.tensor([[0] * (longest - len(q)) + q for q in prompts], device=a.device)
    mask = torch.tensor([[0] * (longest - len(q)) + [1] * len(q) for q in prompts], device=a.device)
    cuda = a.device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def run(new):
        kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                  pad_token_id=0)
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, **kw)
        sync()
        assert out.shape[1] == longest + new
        return time.perf_counter() - t

    run(min(32, a.new_tokens))  # warm-up
    if a.paced:
        print(json.dumps(dict(ready=True)), flush=True)
        runs = []
        for _ in sys.stdin:
            runs.append(run(a.new_tokens))
            print(json.dumps(dict(seconds=runs[-1])), flush=True)
        if not runs:
            sys.exit("hf_generate.py --paced: stdin ended before the first run")
    else:
        runs = [run(a.new_tokens) for _ in range(a.repeats)]
    seconds = sorted(runs)[len(runs) // 2]
    tokens = len(prompts) * a.new_tokens
    print(json.dumps(dict(case="generate", impl="transformers", model=a.model or a.shape, device=a.device,
                          batch=len(prompts), prompt_min=min(len(q) for q in prompts), prompt_max=longest,
                          new_tokens=a.new_tokens, repeats=len(runs), seconds=seconds, tokens_per_s=tokens / seconds,
                          runs_s=runs, threads=torch.get_num_threads())), flush=True)


if __name__ == "__main__":
    main()
