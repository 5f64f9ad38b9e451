"""Generates data/tiny_tales_sft.jsonl: instruction data for the quickstart's task, in Alpaca format.

Each example asks for a short story about two named children at a place (and, half of the
time, with an animal in it); the answer follows a fixed format the pretrained model has
never seen:

    Title: <Hero> and the <animal>
    <four sentences of a tiny tale> The end.

so the share of answers in that format (`eval.response_pattern` in recipes/sft.yaml) shows
what fine-tuning taught. Stories come from make_tiny_tales.py's grammar with another seed;
`python3 data/make_tiny_tales_sft.py` rewrites the same file byte for byte.
"""
import json
import os
import random
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_tiny_tales import ANIMALS, story  # noqa: E402

SEED = 20261123
EXAMPLES = 3000
OPENING = re.compile(r", (\w+) went to the (\w+) with (?:his|her) friend (\w+)\.")
ASKS = [
    "Write a short story about {hero} and {friend} at the {place}.",
    "Tell me a story where {hero} goes to the {place} with {friend}.",
    "Please write a tiny tale about {hero}, {friend} and the {place}.",
]


def example(rng):
    sentences = re.split(r"(?<=\.) ", story(rng))
    hero, place, friend = OPENING.search(sentences[0]).groups()
    animal = next(a for a in ANIMALS if re.search(rf"\b{a}\b", sentences[3]))
    body = " ".join(sentences[:4])
    return {
        "instruction": rng.choice(ASKS).format(hero=hero, friend=friend, place=place),
        "input": f"Put a {animal} in it." if rng.random() < 0.5 else "",
        "output": f"Title: {hero} and the {animal}\n{body} The end.",
    }


def main(path="data/tiny_tales_sft.jsonl"):
    rng = random.Random(SEED)
    with open(path, "w", encoding="utf-8", newline="\n") as out:
        for _ in range(EXAMPLES):
            out.write(json.dumps(example(rng), ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
