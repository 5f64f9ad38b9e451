"""Reference outputs from `transformers` for plumb's parity tests.

    python reference.py make OUT          # small random checkpoints + reference.json in each OUT/<case>/
    python reference.py logits DIR REF    # logits of the checkpoint in DIR on REF's inputs, as JSON
    python reference.py scores DIR IDS    # AutoModelForSequenceClassification scores of DIR on IDS (JSON rows)

Each case is a tiny model of one family with the options that family is known for;
weights are drawn with a larger std than usual so greedy decoding is not decided by
float noise.
"""
import json
import os
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, initializer_range=0.3, bos_token_id=None, eos_token_id=None, pad_token_id=None)

CASES = {
    "llama3": ("LlamaConfig", dict(COMMON, num_key_value_heads=2, max_position_embeddings=64, rope_theta=5000.0,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama_linear": ("LlamaConfig", dict(COMMON, max_position_embeddings=64, attention_bias=True, mlp_bias=True,
                                         rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama_dynamic": ("LlamaConfig", dict(COMMON, num_key_value_heads=1, max_position_embeddings=16, head_dim=16,
                                          rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "qwen2": ("Qwen2Config", dict(COMMON, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(COMMON, num_key_value_heads=2, max_position_embeddings=64, sliding_window=6)),
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=48,
                                initializer_range=0.3, bos_token_id=None, eos_token_id=None, pad_token_id=None)),
}

PROMPTS = [[5, 17, 33, 2, 9, 41, 60, 7, 13, 88, 21, 3], [70, 4, 4, 19, 52]]
NEW_TOKENS = 32


def make(out):
    torch.manual_seed(0)
    for name, (config_class, kwargs) in CASES.items():
        config = getattr(transformers, config_class)(**kwargs)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
        path = os.path.join(out, name)
        model.save_pretrained(path)
        ids = torch.tensor([PROMPTS[0] + PROMPTS[0][:8], list(range(20))])
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            greedy = []
            for prompt in PROMPTS:
                x = torch.tensor([prompt])
                y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                                   min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
                greedy.append(y[0, len(prompt):].tolist())
        with open(os.path.join(path, "reference.json"), "w") as f:
            json.dump({"input_ids": ids.tolist(), "logits": logits.tolist(), "prompts": PROMPTS, "greedy": greedy}, f)
    print(json.dumps(sorted(CASES)))


def logits(path, ref):
    with open(ref) as f:
        ids = torch.tensor(json.load(f)["input_ids"])
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        print(json.dumps({"architecture": type(model).__name__, "logits": model(input_ids=ids).logits.tolist()}))


def scores(path, ids):
    model = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor(json.loads(ids))).logits
    print(json.dumps({"architecture": type(model).__name__, "num_labels": model.config.num_labels,
                      "scores": out[:, 0].tolist()}))


if __name__ == "__main__":
    {"make": make, "logits": logits, "scores": scores}[sys.argv[1]](*sys.argv[2:])
