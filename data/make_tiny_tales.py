"""Generates data/tiny_tales.txt: short children's stories from a seeded grammar.

The corpus is the project's own (no licence questions) and deterministic:
`python3 data/make_tiny_tales.py` rewrites the same file byte for byte. Stories reuse
their characters, places and objects across sentences, so a model must use context to
do well: the gap between validation loss and the unigram entropy measures exactly that.
"""
import random
import sys

SEED = 20261122
STORIES = 6000

NAMES = ["Lily", "Tom", "Mia", "Ben", "Sara", "Max", "Anna", "Leo", "Zoe", "Sam", "Ella", "Jack", "Nora", "Finn", "Ruby", "Owen"]
ANIMALS = ["cat", "dog", "bird", "rabbit", "fox", "duck", "frog", "bear", "mouse", "owl"]
PLACES = ["park", "garden", "forest", "beach", "kitchen", "farm", "river", "hill", "school", "market"]
OBJECTS = ["red ball", "blue kite", "small boat", "big box", "shiny stone", "green hat", "yellow cup", "old book", "wooden toy", "soft blanket"]
FEELINGS = ["happy", "sad", "scared", "excited", "tired", "curious", "proud", "angry"]
WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "cloudy"]
TIMES = ["One day", "One morning", "Once upon a time", "Last summer", "On a " + "{weather}" + " day", "After lunch"]
PRONOUN = {"girl": ("she", "her", "She"), "boy": ("he", "his", "He")}
GENDER = {n: ("girl" if i % 2 == 0 else "boy") for i, n in enumerate(NAMES)}


def article(noun):
    return "an" if noun[0] in "aeiou" else "a"


def story(rng):
    hero, friend = rng.sample(NAMES, 2)
    she, her, She = PRONOUN[GENDER[hero]]
    animal = rng.choice(ANIMALS)
    place, place2 = rng.sample(PLACES, 2)
    obj = rng.choice(OBJECTS)
    weather = rng.choice(WEATHER)
    feeling, feeling2 = rng.sample(FEELINGS, 2)
    opening = rng.choice(TIMES).format(weather=weather)
    lines = [
        f"{opening}, {hero} went to the {place} with {her} friend {friend}.",
        rng.choice([
            f"It was a {weather} day and {hero} felt {feeling}.",
            f"The sky was {weather}, and {hero} was {feeling}.",
            f"{hero} was {feeling} because the day was {weather}.",
        ]),
        rng.choice([
            f"At the {place}, {hero} found {article(obj)} {obj} under a tree.",
            f"In the {place}, {friend} showed {hero} {article(obj)} {obj}.",
            f"{hero} saw {article(obj)} {obj} near the {place}.",
        ]),
        rng.choice([
            f"Then a little {animal} came and took the {obj}.",
            f"Suddenly, a {animal} ran away with the {obj}.",
            f"But a hungry {animal} wanted the {obj} too.",
        ]),
        rng.choice([
            f"{hero} and {friend} followed the {animal} to the {place2}.",
            f"{friend} said, \"Let us follow the {animal}!\" and they ran to the {place2}.",
            f"{She} asked {friend} for help, and they looked for the {animal} at the {place2}.",
        ]),
        rng.choice([
            f"At the {place2}, the {animal} gave the {obj} back to {hero}.",
            f"The {animal} was playing with the {obj} at the {place2}, so {hero} shared it.",
            f"They found the {obj} at the {place2}, and the {animal} said sorry.",
        ]),
        rng.choice([
            f"{hero} felt {feeling2} and thanked {friend}.",
            f"In the end, {hero} and {friend} were {feeling2} together.",
            f"{hero} smiled. {She} was {feeling2} to have a friend like {friend}.",
        ]),
    ]
    if rng.random() < 0.5:
        lines.append(rng.choice([
            f"The next day, {hero} brought the {obj} to the {place} again.",
            f"From that day on, the {animal} came to play with {hero} and {friend}.",
            f"{hero} learned that sharing makes everyone {rng.choice(['happy', 'proud'])}.",
        ]))
    return " ".join(lines)


def main(path="data/tiny_tales.txt"):
    rng = random.Random(SEED)
    with open(path, "w", encoding="utf-8", newline="\n") as out:
        out.write("\n\n".join(story(rng) for _ in range(STORIES)) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
