"""TRL's PPO trainer on the quickstart's SFT model with the exact-answer reward: does PPO
raise held-out accuracy on the quickstart task with TRL, where plumb's does not?

    target/release/plumb run recipes/quickstart.yaml          # makes runs/quickstart/sft/final
    .venv/bin/python bench/trl_ppo_quickstart.py runs/quickstart/sft/final /tmp/trl-ppo [STEPS]
    # then evaluate /tmp/trl-ppo/final with a cot.gsm8k stage (style gsm8k, chat, zero_shot_cot)

Settings as recipes/quickstart.yaml's `ppo` stage: 32 prompts a step from
data/arith/prompts.jsonl (chat template), 1 minibatch, 4 epochs, 48 response tokens,
temperature 0.7, stop at EOS, kl_coef 0.05, lr 5e-5 constant, the value model the SFT
transformer with a fresh head, 100 steps; the reward is 1 when the response ends with
`#### N` and N is the prompt's reference (TRL's `get_reward` is patched for the stand-in
reward module, as TRL 1.12's PPO takes only a model). Needs `trl==1.12.0` (`./dev bench-ppo`
installs it).
"""
import json, os, re, sys
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
import torch
from datasets import Dataset
from transformers import AutoTokenizer, LlamaForCausalLM, LlamaForSequenceClassification
import trl.experimental.ppo.ppo_trainer as ppo_module
from trl.experimental.ppo import PPOConfig, PPOTrainer

SFT = sys.argv[1]
OUT = sys.argv[2]
STEPS = int(sys.argv[3]) if len(sys.argv) > 3 else 100
torch.manual_seed(1234)
tok = AutoTokenizer.from_pretrained(SFT)
tok.pad_token = tok.eos_token
tok.padding_side = "left"
rows, refs = [], {}
for line in open("data/arith/prompts.jsonl"):
    d = json.loads(line)
    ids = tok.apply_chat_template(d["messages"], add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    rows.append(ids)
    refs[tuple(ids)] = d["reference"]
dataset = Dataset.from_dict({"input_ids": rows})
policy = LlamaForCausalLM.from_pretrained(SFT)
ref = LlamaForCausalLM.from_pretrained(SFT)
value = LlamaForSequenceClassification.from_pretrained(SFT, num_labels=1)
value.config.pad_token_id = tok.pad_token_id


class ExactAnswer(torch.nn.Module):
    """A stand-in reward model: get_reward is patched to score it by the exact final answer."""
    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))


reward = ExactAnswer()
ANSWER = re.compile(r"#### (-?[0-9][0-9,]*(?:\.[0-9]+)?)\s*$")
original = ppo_module.get_reward


def get_reward(model, query_responses, pad_token_id, context_length):
    if not isinstance(model, ExactAnswer):
        return original(model, query_responses, pad_token_id, context_length)
    scores = []
    for row in query_responses.tolist():
        query = [t for t in row[:context_length] if t != pad_token_id]
        response = [t for t in row[context_length:] if t != pad_token_id]
        text = tok.decode(response, skip_special_tokens=True)
        m = ANSWER.search(text.strip())
        scores.append(1.0 if m and m.group(1).replace(",", "") == refs.get(tuple(query), "?") else 0.0)
    s = torch.tensor(scores)
    return None, s, None


ppo_module.get_reward = get_reward
args = PPOConfig(
    output_dir=OUT, per_device_train_batch_size=32, gradient_accumulation_steps=1, num_mini_batches=1,
    num_ppo_epochs=4, total_episodes=32 * STEPS, response_length=48, local_rollout_forward_batch_size=32,
    temperature=0.7, stop_token="eos", kl_coef=0.05, learning_rate=5e-5, num_sample_generations=0,
    report_to=[], save_strategy="no", logging_steps=10, seed=1234, use_cpu=True, bf16=False, fp16=False,
    dataloader_num_workers=0, lr_scheduler_type="constant",
)
trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                     value_model=value, train_dataset=dataset)
trainer.train()
final = os.path.join(OUT, "final")
trainer.policy_model.save_pretrained(final)
tok.save_pretrained(final)
print("saved", final)
