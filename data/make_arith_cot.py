"""Generates a small arithmetic word-problem task with step-by-step solutions, in GSM8K's
format, for recipes/cot_arith.yaml:

- data/arith_cot_train.jsonl, data/arith_cot_test.jsonl: {"question", "answer"}, the answer
  a worked solution ending with `#### N`, as GSM8K writes it;
- data/arith_cot_corpus.txt: the training problems as `Q: …\\nA: …` documents (blank-line
  separated) for pretraining a tiny model: most show the reasoning then "The answer is N.",
  some open with "Let's think step by step.", some give the answer alone, so every
  prompting mode of the cot.gsm8k evaluator asks for something the model has seen.

Each problem takes two operations on small numbers, so answering directly needs the
arithmetic done "in the head" while the written steps do it one operation at a time.
Deterministic: `python3 data/make_arith_cot.py` rewrites the same files byte for byte.
"""
import json
import os
import random

SEED = 20261203
TRAIN, TEST = 6000, 200
HERE = os.path.dirname(os.path.abspath(__file__))

NAMES = ["Lily", "Tom", "Mia", "Ben", "Sara", "Max", "Anna", "Leo", "Zoe", "Sam"]
THINGS = ["apples", "pens", "stones", "cards", "books", "shells", "coins", "eggs"]
PRONOUN = {n: ("She" if i % 2 == 0 else "He") for i, n in enumerate(NAMES)}


def add_then_take(rng):
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    c = rng.randint(1, a + b - 1)
    s, r = a + b, a + b - c
    he = PRONOUN[name]
    q = f"{name} has {a} {thing}. {he} gets {b} more. Then {he.lower()} gives away {c}. How many {thing} does {name} have now?"
    steps = f"{name} starts with {a} {thing}. After getting {b} more, {name} has {a} + {b} = {s}. After giving away {c}, {name} has {s} - {c} = {r}."
    return q, steps, r


def groups_then_take(rng):
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 5), rng.randint(2, 5)
    c = rng.randint(1, a * b - 1)
    p, r = a * b, a * b - c
    he = PRONOUN[name]
    q = f"{name} buys {a} bags with {b} {thing} in each bag. {he} loses {c}. How many {thing} are left?"
    steps = f"{a} bags of {b} {thing} is {a} * {b} = {p}. After losing {c}, {p} - {c} = {r} are left."
    return q, steps, r


def take_then_add(rng):
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a = rng.randint(5, 15)
    b = rng.randint(1, a - 1)
    c = rng.randint(2, 9)
    d, r = a - b, a - b + c
    he = PRONOUN[name]
    q = f"{name} had {a} {thing} and used {b}. Later {he.lower()} found {c} more. How many {thing} does {name} have?"
    steps = f"{name} had {a} {thing}. After using {b}, {a} - {b} = {d} were left. After finding {c} more, {d} + {c} = {r}."
    return q, steps, r


KINDS = [add_then_take, groups_then_take, take_then_add]


def problems(rng, n, seen):
    out = []
    while len(out) < n:
        q, steps, r = rng.choice(KINDS)(rng)
        if q in seen:
            continue
        seen.add(q)
        out.append((q, steps, r))
    return out


def main():
    rng = random.Random(SEED)
    seen = set()
    test = problems(rng, TEST, seen)
    train = problems(rng, TRAIN, seen)
    for name, rows in [("arith_cot_train.jsonl", train), ("arith_cot_test.jsonl", test)]:
        with open(os.path.join(HERE, name), "w", encoding="utf-8") as f:
            for q, steps, r in rows:
                f.write(json.dumps({"question": q, "answer": f"{steps}\n#### {r}"}) + "\n")
    docs = []
    for q, steps, r in train:
        style = rng.random()
        if style < 0.7:
            a = f"{steps} The answer is {r}."
        elif style < 0.85:
            a = f"Let's think step by step. {steps} The answer is {r}."
        else:
            a = f"The answer is {r}."
        docs.append(f"Q: {q}\nA: {a}")
    with open(os.path.join(HERE, "arith_cot_corpus.txt"), "w", encoding="utf-8") as f:
        f.write("\n\n".join(docs) + "\n")


if __name__ == "__main__":
    main()
