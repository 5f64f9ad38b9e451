"""Generates data/tiny_tales_prefs.jsonl: preference pairs for reward modelling, in TRL's
plain-text format with a shared prompt: {"prompt": …, "chosen": …, "rejected": …}.

The prompt is a tiny tale's first sentence; both responses continue it with its next
sentence (a leading space joins them, as TRL concatenates prompt + response). The rule the
preference follows: the chosen response is that sentence whole, ending with its period;
the rejected one stops mid-sentence — half of the time inside that sentence (shorter than
the chosen one), half of the time inside the sentence after it (longer) — so length says
nothing and only a finished sentence does. A reward model that learned the rule ranks
held-out pairs far above chance (0.5). Stories come from make_tiny_tales.py's grammar with
another seed; `python3 data/make_tiny_tales_prefs.py` rewrites the same file byte for byte.
"""
import json
import os
import random
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_tiny_tales import story  # noqa: E402

SEED = 20261203
PAIRS = 400


def cut(sentence, rng):
    """The sentence stopped after some of its words (at least two, never all), no period."""
    words = sentence.rstrip(".").split(" ")
    return " ".join(words[: rng.randint(2, max(2, len(words) - 1))])


def pair(rng):
    sentences = re.split(r"(?<=\.) ", story(rng))
    prompt, second, third = sentences[0], sentences[1], sentences[2]
    if rng.random() < 0.5:
        rejected = cut(second, rng)
    else:
        rejected = f"{second} {cut(third, rng)}"
    return {"prompt": prompt, "chosen": f" {second}", "rejected": f" {rejected}"}


def main(path="data/tiny_tales_prefs.jsonl"):
    rng = random.Random(SEED)
    with open(path, "w", encoding="utf-8", newline="\n") as out:
        for _ in range(PAIRS):
            out.write(json.dumps(pair(rng), ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
