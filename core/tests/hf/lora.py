"""References from `peft` and `transformers` for plumb's LoRA tests.

    python lora.py make OUT                 # tiny random Llama-family checkpoints in OUT/<case>/; prints the cases
    python lora.py peft BASE ADAPTER IDS    # logits of BASE with the PEFT adapter in ADAPTER on IDS (JSON rows)
    python lora.py plain DIR IDS            # logits of the plain checkpoint in DIR (e.g. a merged one)

`peft` loads the adapter as any adapter from the hub is loaded (`PeftModel.from_pretrained`);
the script fails when the adapter file holds a key PEFT does not use or lacks one it expects.
"""
import json
import os
import sys

import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              initializer_range=0.3, bos_token_id=None, eos_token_id=None, pad_token_id=None)
CASES = {
    # Biases on every projection: an adapter adds to x·Wᵀ + b.
    "llama": ("LlamaConfig", dict(COMMON, num_key_value_heads=2, max_position_embeddings=64,
                                  attention_bias=True, mlp_bias=True)),
    "qwen2": ("Qwen2Config", dict(COMMON, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)),
}


def make(out):
    torch.manual_seed(0)
    for name, (config_class, kwargs) in CASES.items():
        config = getattr(transformers, config_class)(**kwargs)
        AutoModelForCausalLM.from_config(config, attn_implementation="eager").save_pretrained(os.path.join(out, name))
    print(json.dumps(sorted(CASES)))


def run(model, ids):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(json.loads(ids))).logits
    return logits.tolist()


def peft(base, adapter, ids):
    model = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
    model = PeftModel.from_pretrained(model, adapter).eval()
    # Every tensor of the file is an adapter weight PEFT placed, and every adapter weight came from the file.
    saved = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    placed = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    if set(saved) != set(placed):
        sys.exit(f"keys differ: file only {sorted(set(saved) - set(placed))}, model only {sorted(set(placed) - set(saved))}")
    for key, value in saved.items():
        if not torch.equal(value, placed[key]):
            sys.exit(f"{key}: PEFT holds other values than the file")
    print(json.dumps({"logits": run(model, ids), "adapted": len(saved) // 2}))


def plain(path, ids):
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    print(json.dumps({"architecture": type(model).__name__, "logits": run(model, ids)}))


if __name__ == "__main__":
    {"make": make, "peft": peft, "plain": plain}[sys.argv[1]](*sys.argv[2:])
