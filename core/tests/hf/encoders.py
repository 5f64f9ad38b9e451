"""Reference outputs from `transformers` for plumb's encoder and encoder-decoder parity tests.

    python encoders.py make OUT           # tiny random checkpoints + reference.json in each OUT/<case>/
    python encoders.py logits DIR INPUTS  # logits of the checkpoint in DIR on INPUTS (a JSON file), as JSON

Each case is a tiny BertForMaskedLM or T5ForConditionalGeneration with padding in its
batch. Every parameter gets noise on top of HF's init (LayerNorm scales and biases
included), so a swapped or ignored weight shows in the logits.
"""
import json
import os
import sys

import torch
import transformers
from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

VOCAB = 96
PAD = 0

BERT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=24, type_vocab_size=2, initializer_range=0.2, pad_token_id=PAD)
T5 = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, pad_token_id=PAD,
          eos_token_id=1, decoder_start_token_id=PAD)

CASES = {
    # name: (config class, kwargs, untie the LM head)
    "bert": ("BertConfig", BERT, False),
    "bert_gelu_new": ("BertConfig", dict(BERT, hidden_act="gelu_new", num_attention_heads=2), False),
    # The original T5: ReLU feed-forward, tied head with d_model^-0.5 scaling; a deeper
    # decoder and few buckets, so the logarithmic buckets are reached in 10 tokens.
    "t5_relu": ("T5Config", dict(T5, num_decoder_layers=3, relative_attention_num_buckets=8,
                                 relative_attention_max_distance=16), False),
    # T5 v1.1: gated-gelu (gelu_new), an LM head of its own, no scaling.
    "t5_v1_1": ("T5Config", dict(T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False), True),
}

# Three rows: full, right-padded, more right padding (mask 0 where the id is PAD).
ENCODER_IDS = [[5, 17, 33, 2, 9, 41, 60, 7, 13, 88, 21, 3],
               [70, 4, 4, 19, 52, 11, 30, PAD, PAD, PAD, PAD, PAD],
               [8, 90, 45, 23, PAD, PAD, PAD, PAD, PAD, PAD, PAD, PAD]]
TOKEN_TYPES = [[0] * 6 + [1] * 6, [0] * 4 + [1] * 3 + [0] * 5, [0, 0, 1, 1] + [0] * 8]
# Span-corruption style targets, -100 where ignored (padding).
LABELS = [[12, 40, 1, 77, 5, 63, 1], [30, 2, 2, 1, -100, -100, -100], [55, 1, -100, -100, -100, -100, -100]]


def mask_of(rows):
    return [[0 if x in (PAD, -100) else 1 for x in row] for row in rows]


def perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)


def make(out):
    torch.manual_seed(0)
    for name, (config_class, kwargs, untie) in CASES.items():
        config = getattr(transformers, config_class)(**kwargs)
        t5 = config.model_type == "t5"
        auto = AutoModelForSeq2SeqLM if t5 else AutoModelForMaskedLM
        model = auto.from_config(config, attn_implementation="eager").eval()
        if untie:
            # transformers 5 always builds T5 tied; a head of its own is what v1.1 checkpoints hold.
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
        perturb(model)
        path = os.path.join(out, name)
        model.save_pretrained(path)
        ids = torch.tensor(ENCODER_IDS)
        mask = torch.tensor(mask_of(ENCODER_IDS))
        ref = {"input_ids": ids.tolist(), "attention_mask": mask.tolist()}
        with torch.no_grad():
            if t5:
                labels = torch.tensor(LABELS)
                decoder_ids = model._shift_right(labels)
                decoder_mask = torch.tensor(mask_of(LABELS))
                logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids,
                               decoder_attention_mask=decoder_mask).logits
                ref.update(labels=labels.tolist(), decoder_input_ids=decoder_ids.tolist(),
                           decoder_attention_mask=decoder_mask.tolist())
            else:
                logits = model(input_ids=ids, attention_mask=mask).logits
                types = torch.tensor(TOKEN_TYPES)
                typed = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
                ref.update(token_type_ids=types.tolist(), typed_logits=typed.tolist())
        ref["logits"] = logits.tolist()
        with open(os.path.join(path, "reference.json"), "w") as f:
            json.dump(ref, f)
    # transformers 5 saves an untied T5 with `tie_word_embeddings: true` and
    # `scale_decoder_outputs: false`; hub checkpoints of T5 v1.1 say `tie_word_embeddings:
    # false` and nothing else. The same weights under such a config:
    hub = os.path.join(out, "t5_v1_1_hub")
    os.makedirs(hub)
    for file in ["model.safetensors", "reference.json"]:
        with open(os.path.join(out, "t5_v1_1", file), "rb") as src, open(os.path.join(hub, file), "wb") as dst:
            dst.write(src.read())
    with open(os.path.join(out, "t5_v1_1", "config.json")) as f:
        config = json.load(f)
    config["tie_word_embeddings"] = False
    del config["scale_decoder_outputs"]
    with open(os.path.join(hub, "config.json"), "w") as f:
        json.dump(config, f)
    print(json.dumps(sorted(list(CASES) + ["t5_v1_1_hub"])))


def logits(path, inputs):
    with open(inputs) as f:
        ref = json.load(f)
    t5 = AutoConfig.from_pretrained(path).model_type == "t5"
    auto = AutoModelForSeq2SeqLM if t5 else AutoModelForMaskedLM
    model = auto.from_pretrained(path, attn_implementation="eager").eval()
    args = {k: torch.tensor(ref[k]) for k in ["input_ids", "attention_mask", "decoder_input_ids",
                                              "decoder_attention_mask"] if k in ref}
    with torch.no_grad():
        out = model(**args).logits
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    print(json.dumps({"architecture": type(model).__name__, "tied": tied, "logits": out.tolist()}))


if __name__ == "__main__":
    {"make": make, "logits": logits}[sys.argv[1]](*sys.argv[2:])
