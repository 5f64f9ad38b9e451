"""Generates the quickstart's arithmetic task: two-step word problems with step-by-step
solutions ending in `#### N`, as GSM8K writes them, in every form the pipeline needs.

    python3 data/make_arith.py [--out DIR]          # rewrites data/arith/* byte for byte
    python3 data/make_arith.py --check [--out DIR]  # held-out problems never in training files

A problem is a template and its three numbers; names and objects only dress it. Every
problem the templates allow is enumerated, shuffled with a fixed seed and split once, so
the held-out problems (`test.jsonl`) never appear, under any name, in the files used for
training (checked by `--check`, which the test suite runs):

- `corpus.txt`      pretraining: documents `<question>\\n<worked steps>` separated by blank
                    lines, in prose: no chat turns and no `#### N` answer line, so the answer
                    format is what SFT teaches (and the quickstart can show it rising)
- `sft.jsonl`       SFT, chat format: `{"messages": [user question, assistant solution]}`
- `prefs.jsonl`     reward model, TRL's conversational format: `{"prompt": [user turn],
                    "chosen": [assistant turn], "rejected": [assistant turn]}`, chosen the correct
                    solution, rejected one with a plausible slip carried to the end: a
                    wrong result in a step, a wrong operation, or a final answer
                    miscopied from the last step (a third each)
- `prompts.jsonl`   PPO: `{"messages": [user question], "reference": "<N>"}`
- `train.jsonl`     GSM8K format (`question`, `answer`), for few-shot exemplars
- `test.jsonl`      GSM8K format, the held-out evaluation set
"""
import json
import os
import random
import re
import sys

SEED = 20261203
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "arith")
TEST_PROBLEMS = 200
COUNTS = {"corpus": 4000, "sft": 2000, "prefs": 4000, "prompts": 512, "train": 400}

NAMES = [("Tom", "he"), ("Mia", "she"), ("Leo", "he"), ("Ella", "she"), ("Sam", "he"), ("Ruby", "she"),
         ("Owen", "he"), ("Lily", "she"), ("Max", "he"), ("Zoe", "she"), ("Ben", "he"), ("Ava", "she")]
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "shells", "coins", "cards", "stones"]
OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y, "/": lambda x, y: x // y}

# kind: (question, first step (x, op, y), its sentence, second step's op and operand, its sentence).
# The first step works on two of the problem's numbers; the second on the first's result `p`
# and the third number. `{r}` is where a step's result goes.
TEMPLATES = {
    "share_out": (
        "{name} has {a} bags with {b} {item} in each bag. {They} gives away {c} {item}. How many {item} does {name} have left?",
        ("a", "*", "b"), "{name} has {a} * {b} = {r} {item}.",
        ("-", "c"), "After giving away {c}, {name} has {p} - {c} = {r} {item}.",
    ),
    "buy": (
        "{name} buys {a} {item} on Monday and {b} {item} on Tuesday. Each one costs {c} dollars. How many dollars does {name} spend?",
        ("a", "+", "b"), "{name} buys {a} + {b} = {r} {item}.",
        ("*", "c"), "They cost {p} * {c} = {r} dollars.",
    ),
    "found_lost": (
        "{name} had {a} {item}. {They} found {b} more and then lost {c}. How many {item} does {name} have now?",
        ("a", "+", "b"), "After finding {b}, {name} has {a} + {b} = {r} {item}.",
        ("-", "c"), "After losing {c}, {name} has {p} - {c} = {r} {item}.",
    ),
    "rows": (
        "There are {a} rows of {item} with {b} in each row. {name} adds {c} more. How many {item} are there in total?",
        ("a", "*", "b"), "The rows hold {a} * {b} = {r} {item}.",
        ("+", "c"), "With {c} more there are {p} + {c} = {r} {item}.",
    ),
    "split": (
        "{name} has {a} {item} and shares them equally among {b} friends. Each friend then gets {c} more. How many {item} does each friend have?",
        ("a", "/", "b"), "Each friend first gets {a} / {b} = {r} {item}.",
        ("+", "c"), "Then each friend has {p} + {c} = {r} {item}.",
    ),
}


def problem_keys():
    """Every (template, a, b, c) the templates allow, in a fixed order."""
    keys = []
    for x in range(2, 10):
        for y in range(2, 10):
            for c in range(1, 10):
                if x * y - c >= 0:
                    keys.append(("share_out", x, y, c))
                keys.append(("buy", x, y, c))
                keys.append(("found_lost", 2 * x, y, c))
                keys.append(("rows", x, y, c))
                keys.append(("split", x * y, y, c))
    return keys


# The operation a solver who misread the question might use instead.
WRONG_OP = {"+": "-", "-": "+", "*": "+", "/": "*"}


def dress(key, name, pronoun, item, slip=None):
    """(question, solution, final answer) of problem `key`. `slip` = (kind, step, error)
    solves it wrongly, as a model that slipped would, and carries the slip to the end:
    `arithmetic` writes step `step`'s result off by `error`; `operation` uses the wrong
    operation in step `step` (a sum for a product, ...); `answer` works every step right
    and then writes a final answer off by `error`."""
    kind, a, b, c = key
    question, (x, op1, y), first, (op2, z), second = TEMPLATES[kind]
    numbers = {"a": a, "b": b, "c": c}
    words = {"name": name, "They": pronoun.capitalize(), "item": item, **numbers}
    slip_kind, slip_step, error = slip or (None, None, 0)
    ops = [op1, op2]
    if slip_kind == "operation":
        ops[slip_step] = WRONG_OP[ops[slip_step]]
    p = OPS[ops[0]](numbers[x], numbers[y]) + (error if slip_kind == "arithmetic" and slip_step == 0 else 0)
    r = OPS[ops[1]](p, numbers[z]) + (error if slip_kind == "arithmetic" and slip_step == 1 else 0)
    lines = [first.format(r=p, **words), second.format(p=p, r=r, **words)]
    # The templates spell the right operation; a wrong one replaces it in its sentence.
    lines = [line.replace(f" {op} ", f" {used} ", 1) for line, op, used in zip(lines, (op1, op2), ops)]
    answer = r + (error if slip_kind == "answer" else 0)
    return question.format(**words), "\n".join(lines) + f"\n#### {answer}", answer


def examples(keys, count, rng, slips=False):
    """`count` problems from `keys` (cycling through them), each with a random name and
    object; with `slips`, also a wrongly solved version of each (a slip of each kind in
    turn, drawn again in the rare case it lands on the right answer)."""
    out = []
    for i in range(count):
        key = keys[i % len(keys)]
        name, pronoun = rng.choice(NAMES)
        item = rng.choice(ITEMS)
        q, sol, answer = dress(key, name, pronoun, item)
        row = {"question": q, "solution": sol, "answer": answer}
        if slips:
            kind = ("arithmetic", "operation", "answer")[i % 3]
            wrong = answer
            while wrong == answer:
                slip = (kind, rng.randrange(2), rng.choice([-3, -2, -1, 1, 2, 3]))
                _, row["wrong"], wrong = dress(key, name, pronoun, item, slip)
        out.append(row)
    return out


def steps(solution):
    """A solution's worked steps, without its `#### N` line."""
    return solution.rsplit("\n#### ", 1)[0]


def split():
    keys = problem_keys()
    random.Random(SEED).shuffle(keys)
    return keys[TEST_PROBLEMS:], keys[:TEST_PROBLEMS]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main():
    train_keys, test_keys = split()
    rng = random.Random(SEED + 1)
    os.makedirs(OUT, exist_ok=True)

    def draw(count, slips=False):
        keys = list(train_keys)
        rng.shuffle(keys)
        return examples(keys, count, rng, slips)

    with open(os.path.join(OUT, "corpus.txt"), "w") as f:
        f.write("\n\n".join(f"{e['question']}\n{steps(e['solution'])}" for e in draw(COUNTS["corpus"])) + "\n")
    write_jsonl(os.path.join(OUT, "sft.jsonl"), [
        {"messages": [{"role": "user", "content": e["question"]}, {"role": "assistant", "content": e["solution"]}]}
        for e in draw(COUNTS["sft"])
    ])
    write_jsonl(os.path.join(OUT, "prefs.jsonl"), [
        {"prompt": [user(e["question"])], "chosen": [assistant(e["solution"])], "rejected": [assistant(e["wrong"])]}
        for e in draw(COUNTS["prefs"], True)
    ])
    write_jsonl(os.path.join(OUT, "prompts.jsonl"), [
        {"messages": [{"role": "user", "content": e["question"]}], "reference": str(e["answer"])}
        for e in draw(COUNTS["prompts"])
    ])
    write_jsonl(os.path.join(OUT, "train.jsonl"), [
        {"question": e["question"], "answer": e["solution"]} for e in draw(COUNTS["train"])
    ])
    write_jsonl(os.path.join(OUT, "test.jsonl"), [
        {"question": e["question"], "answer": e["solution"]}
        for e in examples(test_keys, len(test_keys), random.Random(SEED + 2))
    ])


def parse(question):
    """The (template, a, b, c) a question was made from, whatever its name and object."""
    for kind, (template, *_rest) in TEMPLATES.items():
        pattern = re.escape(template)
        for word in ("name", "They", "item"):
            pattern = pattern.replace(re.escape("{" + word + "}"), r"\w+")
        for number in "abc":
            pattern = pattern.replace(re.escape("{" + number + "}"), rf"(?P<{number}>\d+)", 1)
            pattern = pattern.replace(re.escape("{" + number + "}"), rf"(?P={number})")
        m = re.fullmatch(pattern, question)
        if m:
            return (kind, int(m["a"]), int(m["b"]), int(m["c"]))
    raise ValueError(f"no template makes {question!r}")


def check():
    """Exits non-zero unless no held-out problem appears in a training file (under any
    name or object) and every solution's final answer is the problem's."""
    def questions(name, field):
        for line in open(os.path.join(OUT, name)):
            yield field(json.loads(line))

    held_out = {parse(q) for q in questions("test.jsonl", lambda r: r["question"])}
    training = [
        *questions("sft.jsonl", lambda r: r["messages"][0]["content"]),
        *questions("prefs.jsonl", lambda r: r["prompt"][0]["content"]),
        *questions("prompts.jsonl", lambda r: r["messages"][0]["content"]),
        *questions("train.jsonl", lambda r: r["question"]),
        *(doc.split("\n")[0] for doc in open(os.path.join(OUT, "corpus.txt")).read().split("\n\n")),
    ]
    leaks = [q for q in training if parse(q) in held_out]
    if leaks:
        sys.exit(f"{len(leaks)} training questions repeat a held-out problem, e.g. {leaks[0]!r}")
    for line in open(os.path.join(OUT, "prompts.jsonl")):
        row = json.loads(line)
        key = parse(row["messages"][0]["content"])
        if str(dress(key, "x", "he", "y")[2]) != row["reference"]:
            sys.exit(f"wrong reference in prompts.jsonl: {row}")
    print(f"ok: {len(training)} training questions, {len(held_out)} held-out problems, disjoint")


if __name__ == "__main__":
    if "--out" in sys.argv:
        OUT = sys.argv[sys.argv.index("--out") + 1]
    check() if "--check" in sys.argv else main()
