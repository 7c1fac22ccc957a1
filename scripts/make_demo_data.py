"""Generate jaxlora's built-in demo assets (deterministic, seeded).

Writes into ``jaxlora/demo/``:

* ``instructions.json`` -- Alpaca-format records (a JSON list) of short synthetic tasks whose
  answers can be checked by exact match: reverse a word, uppercase, add two numbers, pick
  the larger number, sort letters, count letters, capitals, opposites; with and without
  ``input``.
* ``corpus.txt`` -- a plain-text "pretraining" corpus on the same facts and skills, with
  no Alpaca template, plus generic sentences. A tiny base model pretrained on it knows the
  facts; LoRA fine-tuning on ``instructions.json`` then teaches the instruction format.
* ``tokenizer.model`` -- a small SentencePiece BPE model (byte fallback, LLaMA's special
  ids) trained on the corpus, the instruction texts and the two prompt templates.

Usage: ``python scripts/make_demo_data.py [--seed 0] [--out jaxlora/demo]``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from jaxlora.text.prompts import PROMPT_NO_INPUT, PROMPT_WITH_INPUT, generate_prompt  # noqa: E402
from jaxlora.text.tokenizer import Tokenizer  # noqa: E402

WORDS = """
apple table river planet garden window yellow purple orange silver forest winter summer
castle dragon pencil rocket bottle candle basket butter cookie flower ground hammer island
jacket kitten ladder market needle object pillow rabbit shadow ticket violin wallet zebra
anchor bridge carpet doctor engine farmer ginger harbor insect jungle lemon mirror number
ocean parrot quartz robot saddle tomato velvet wizard camera cherry dinner empire finger
guitar helmet kettle magnet napkin oyster pepper rubber spider tunnel valley walnut cactus
lizard meadow cloud stone bread music light smile sugar water house horse mouse green
black white brown happy quick sharp sweet bird fish tree book door lamp moon star road
ship rain snow wind fire milk salt corn frog bear wolf duck goat lion cat dog sun box cup
hat pen map key egg ant owl fox bee
""".split()

OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
    ("light", "dark"), ("open", "closed"), ("early", "late"), ("full", "empty"),
    ("hard", "soft"), ("high", "low"), ("long", "short"), ("old", "new"), ("rich", "poor"),
    ("strong", "weak"), ("thick", "thin"), ("wet", "dry"), ("loud", "quiet"), ("clean", "dirty"),
    ("sharp", "dull"), ("day", "night"), ("left", "right"), ("near", "far"), ("push", "pull"),
    ("win", "lose"), ("buy", "sell"), ("give", "take"), ("first", "last"), ("inside", "outside"),
    ("above", "below"), ("true", "false"), ("begin", "end"), ("smooth", "rough"), ("wide", "narrow"),
    ("brave", "afraid"), ("awake", "asleep"), ("friend", "enemy"), ("front", "back"),
    ("question", "answer"), ("always", "never"),
]

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"),
    ("Brazil", "Brasilia"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Argentina", "Buenos Aires"),
    ("Russia", "Moscow"), ("Poland", "Warsaw"), ("Greece", "Athens"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Ireland", "Dublin"), ("Austria", "Vienna"),
    ("Hungary", "Budapest"), ("Turkey", "Ankara"), ("Australia", "Canberra"), ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"), ("Cuba", "Havana"),
]

OPPOSITE = {a: b for a, b in OPPOSITES} | {b: a for a, b in OPPOSITES if b not in {x for x, _ in OPPOSITES}}
LETTERS = "abcdefghijklmnopqrstuvwxyz"
NUMBERS = range(10, 50)

Record = tuple[str, str, str]  # (instruction, input, output)


# --------------------------------------------------------------------------- instruction tasks


def task_reverse(rng: random.Random) -> Record:
    w = rng.choice(WORDS)
    if rng.random() < 0.7:
        return "Reverse the word.", w, w[::-1]
    return f"Reverse the word {w}.", "", w[::-1]


def task_upper(rng: random.Random) -> Record:
    text = " ".join(rng.sample(WORDS, rng.choice([1, 1, 2])))
    if rng.random() < 0.7:
        return "Convert to uppercase.", text, text.upper()
    return f"Write {text} in uppercase.", "", text.upper()


def task_add(rng: random.Random) -> Record:
    a, b = rng.choice(NUMBERS), rng.choice(NUMBERS)
    if rng.random() < 0.6:
        return "Add the two numbers.", f"{a} and {b}", str(a + b)
    return f"What is {a} plus {b}?", "", str(a + b)


def task_larger(rng: random.Random) -> Record:
    a, b = rng.sample(NUMBERS, 2)
    return "Which number is larger?", f"{a} and {b}", str(max(a, b))


def task_sort(rng: random.Random) -> Record:
    letters = rng.sample(LETTERS, rng.randint(3, 5))
    return "Sort these letters alphabetically.", " ".join(letters), " ".join(sorted(letters))


def task_count(rng: random.Random) -> Record:
    w = rng.choice(WORDS)
    if rng.random() < 0.7:
        return "How many letters are in the word?", w, str(len(w))
    return f"How many letters are in the word {w}?", "", str(len(w))


def task_capital(rng: random.Random) -> Record:
    country, capital = rng.choice(CAPITALS)
    form = rng.randrange(3)
    if form == 0:
        return f"What is the capital of {country}?", "", capital
    if form == 1:
        return f"Name the capital city of {country}.", "", capital
    return "Give the capital of the country.", country, capital


def task_opposite(rng: random.Random) -> Record:
    w, o = rng.choice(sorted(OPPOSITE.items()))
    form = rng.randrange(3)
    if form == 0:
        return "Give the opposite of the word.", w, o
    if form == 1:
        return f"What is the opposite of {w}?", "", o
    return "Write a word that means the opposite.", w, o


TASKS: list[tuple[Callable[[random.Random], Record], int]] = [
    (task_reverse, 300), (task_upper, 500), (task_add, 650), (task_larger, 400),
    (task_sort, 550), (task_count, 300), (task_capital, 90), (task_opposite, 220),
]


def make_instructions(rng: random.Random) -> list[dict]:
    """Distinct records, ``quota`` per task (fewer if the task has fewer distinct ones), shuffled."""
    records: list[dict] = []
    for task, quota in TASKS:
        seen: set[Record] = set()
        for _ in range(quota * 50):
            if len(seen) == quota:
                break
            rec = task(rng)
            if rec not in seen:
                seen.add(rec)
                records.append({"instruction": rec[0], "input": rec[1], "output": rec[2]})
    rng.shuffle(records)
    return records


# --------------------------------------------------------------------------- pretraining corpus


def fact_lines(rng: random.Random) -> list[str]:
    """Every word, number pair and table fact stated in plain sentences, several phrasings."""
    lines = []
    for w in WORDS:
        lines += [f"The reverse of {w} is {w[::-1]}.", f"{w} backwards is {w[::-1]}.",
                  f"{w} reversed is {w[::-1]}."]
        lines += [f"{w} in uppercase is {w.upper()}.", f"In capital letters, {w} is {w.upper()}."]
        lines += [f"The word {w} has {len(w)} letters.", f"{w} is {len(w)} letters long."]
        lines.append(f"{w} is spelled {' '.join(w)}.")
    for a in NUMBERS:
        for b in NUMBERS:
            lines.append(f"{a} plus {b} is {a + b}.")
            if a != b and rng.random() < 0.5:
                lines.append(f"{max(a, b)} is larger than {min(a, b)}.")
    for country, capital in CAPITALS:
        lines += [f"The capital of {country} is {capital}.", f"{capital} is the capital of {country}.",
                  f"The capital city of {country} is {capital}."]
    for w, o in sorted(OPPOSITE.items()):
        lines += [f"The opposite of {w} is {o}.", f"{w} is the opposite of {o}."]
    for _ in range(1500):
        letters = rng.sample(LETTERS, rng.randint(3, 5))
        lines.append(f"The letters {' '.join(letters)} in order are {' '.join(sorted(letters))}.")
    for _ in range(400):
        text = " ".join(rng.sample(WORDS, 2))
        lines.append(f"{text} in uppercase is {text.upper()}.")
    return lines


def generic_lines(rng: random.Random, n: int) -> list[str]:
    """Simple template-free sentences from a small grammar."""
    people = ["The farmer", "My friend", "The doctor", "A child", "The teacher", "Our neighbor", "She", "He"]
    verbs = ["saw", "found", "liked", "painted", "carried", "bought", "washed", "opened"]
    adjs = ["small", "red", "old", "new", "quiet", "bright", "heavy", "soft", "green", "happy"]
    places = ["in the garden", "by the river", "at the market", "near the window", "on the road",
              "in the forest", "at home", "on the island"]
    times = ["today", "yesterday", "in the morning", "at night", "in winter", "every day"]
    lines = []
    for _ in range(n):
        noun = rng.choice(WORDS[:80])
        form = rng.randrange(3)
        if form == 0:
            s = f"{rng.choice(people)} {rng.choice(verbs)} the {rng.choice(adjs)} {noun} {rng.choice(places)}."
        elif form == 1:
            s = f"The {noun} was {rng.choice(adjs)} {rng.choice(times)}."
        else:
            s = f"{rng.choice(times).capitalize()}, {rng.choice(people).lower()} {rng.choice(verbs)} a {noun}."
        lines.append(s[0].upper() + s[1:])
    return lines


def make_corpus(rng: random.Random) -> list[str]:
    lines = fact_lines(rng) + generic_lines(rng, 3000)
    rng.shuffle(lines)
    return lines


# --------------------------------------------------------------------------- output


def write_instructions(path: Path, records: list[dict]) -> None:
    """A JSON list with one record per line (compact, still diff-friendly)."""
    body = ",\n".join(json.dumps(r, ensure_ascii=False) for r in records)
    path.write_text("[\n" + body + "\n]\n", encoding="utf-8")


def train_tokenizer(out_dir: Path, corpus: list[str], records: list[dict], vocab_size: int) -> Path:
    """Train the demo SentencePiece model on corpus + templated instruction texts + templates."""
    texts = corpus + [generate_prompt(r) + r["output"] for r in records] + [PROMPT_WITH_INPUT, PROMPT_NO_INPUT]
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        # Train with relative paths: the model file records its input and output paths,
        # and a random temporary directory name would make it differ between runs.
        os.chdir(tmp)
        try:
            Path("demo_text.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
            model = Tokenizer.train(
                "demo_text.txt", ".", vocab_size=vocab_size, model_type="bpe",
                split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2,
            )
            data = model.read_bytes()
        finally:
            os.chdir(cwd)
    target = out_dir / "tokenizer.model"
    target.write_bytes(data)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "jaxlora" / "demo")
    parser.add_argument("--vocab-size", type=int, default=1024)
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    records = make_instructions(random.Random(args.seed))
    corpus = make_corpus(random.Random(args.seed + 1))
    write_instructions(args.out / "instructions.json", records)
    (args.out / "corpus.txt").write_text("\n".join(corpus) + "\n", encoding="utf-8")
    model = train_tokenizer(args.out, corpus, records, args.vocab_size)
    for name in ("instructions.json", "corpus.txt", model.name):
        print(f"{args.out / name}: {(args.out / name).stat().st_size:,} bytes")
    print(f"{len(records)} instruction records, {len(corpus)} corpus lines")


if __name__ == "__main__":
    main()
