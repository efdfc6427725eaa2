"""Generate the shipped sample chat data, deterministically.

    python -m tools.make_sample [--out-dir DIR] [--train N] [--val N]

It also writes the tool-calling sample (sample_agentic*.jsonl, engine/data/agentic_sample.py).

Templated arithmetic, fact and string tasks, short enough for a tiny model to learn the format and
many of the answers within a CPU minute. The mix exercises every path of the data pipeline: the
three reasoning levels and the default, thinking or not, one to three turns, developer and
user-given system instructions that change the answer's style, and prompt/completion records.
"""

import argparse
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.data.config import REASONING_EFFORTS, default_sample_paths
from tools.agentic_sample import agentic_sample_paths, generate_agentic

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "Canada": "Ottawa",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Norway": "Oslo",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Chile": "Santiago",
    "India": "New Delhi",
    "Ireland": "Dublin",
    "Portugal": "Lisbon",
    "Austria": "Vienna",
    "Cuba": "Havana",
}
COLORS = {
    "the sky on a clear day": "blue",
    "fresh grass": "green",
    "snow": "white",
    "a ripe banana": "yellow",
    "coal": "black",
    "a ripe tomato": "red",
    "an orange": "orange",
    "a lemon": "yellow",
}
WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "piano",
    "garden",
    "window",
    "silver",
    "planet",
    "bridge",
    "candle",
    "forest",
    "rocket",
    "pencil",
    "yellow",
    "banana",
    "mirror",
    "castle",
    "orbit",
]

# Instructions that change how the final answer looks, so the developer message matters.
STYLES: dict[str, Callable[[str, str], str]] = {
    "Answer the user's questions like a robot.": lambda answer, short: f"BEEP. {answer} BOOP.",
    "Reply with only the answer.": lambda answer, short: short,
    "Reply in uppercase.": lambda answer, short: answer.upper(),
}


@dataclass(frozen=True)
class Task:
    question: str
    answer: str  # a full sentence
    short: str  # the bare result
    steps: tuple[str, ...]  # reasoning steps; the last one states the result


def arithmetic(rng: random.Random) -> Task:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 9), rng.randint(11, 29)
        tens, ones = b // 10 * 10, b % 10
        steps = (f"{a} * {tens} = {a * tens}.", f"{a} * {ones} = {a * ones}.", f"{a * tens} + {a * ones} = {a * b}.")
        result = a * b
    else:
        a, b = rng.randint(10, 99), rng.randint(1, 50)
        result = a + b if op == "+" else a - b
        steps = (f"Start from {a}.", f"{'Add' if op == '+' else 'Subtract'} {b}.", f"{a} {op} {b} = {result}.")
    return Task(f"What is {a} {op} {b}?", f"{a} {op} {b} = {result}.", str(result), steps)


def capital(rng: random.Random) -> Task:
    country = rng.choice(sorted(CAPITALS))
    city = CAPITALS[country]
    return Task(
        f"What is the capital of {country}?",
        f"The capital of {country} is {city}.",
        city,
        (f"{country} is a country.", f"Its capital city is {city}."),
    )


def color(rng: random.Random) -> Task:
    thing = rng.choice(sorted(COLORS))
    col = COLORS[thing]
    return Task(
        f"What color is {thing}?",
        f"{thing[0].upper() + thing[1:]} is {col}.",
        col,
        (f"Think of {thing}.", f"It is {col}."),
    )


def reverse_word(rng: random.Random) -> Task:
    word = rng.choice(WORDS)
    rev = word[::-1]
    return Task(
        f"Reverse the word '{word}'.",
        f"'{word}' reversed is '{rev}'.",
        rev,
        (f"The letters are {' '.join(word)}.", f"Backwards: {' '.join(rev)}.", f"That is '{rev}'."),
    )


def count_letters(rng: random.Random) -> Task:
    word = rng.choice(WORDS)
    n = len(word)
    return Task(
        f"How many letters are in '{word}'?",
        f"'{word}' has {n} letters.",
        str(n),
        (f"Spell it: {' '.join(word)}.", f"Count them: {n}."),
    )


TASKS = (arithmetic, capital, color, reverse_word, count_letters)


def thinking(task: Task, effort: str, rng: random.Random) -> str | None:
    """Chain of thought whose length follows the reasoning level; low effort often skips it."""
    if effort == "low":
        return None if rng.random() < 0.5 else task.steps[-1]
    if effort == "medium":
        return f"The user asks: {task.question} {task.steps[-1]}"
    return f'The user asks: "{task.question}" ' + " ".join(task.steps) + f" Answer: {task.short}."


def chat_record(rng: random.Random) -> dict:
    effort = rng.choice((*REASONING_EFFORTS, None))
    messages: list[dict] = []
    style = None
    roll = rng.random()
    if roll < 0.3:
        style = rng.choice(sorted(STYLES))
        messages.append({"role": "developer", "content": style})
    elif roll < 0.4:
        style = rng.choice(sorted(STYLES))
        messages.append({"role": "system", "content": style})
    for _ in range(rng.choices((1, 2, 3), weights=(6, 3, 1))[0]):
        task = rng.choice(TASKS)(rng)
        answer = STYLES[style](task.answer, task.short) if style else task.answer
        messages.append({"role": "user", "content": task.question})
        reply = {"role": "assistant", "content": answer}
        cot = thinking(task, effort or "medium", rng)
        if cot is not None:
            reply["thinking"] = cot
        messages.append(reply)
    record: dict = {"messages": messages}
    if effort is not None:
        record["reasoning_effort"] = effort
    return record


def prompt_record(rng: random.Random) -> dict:
    task = rng.choice(TASKS)(rng)
    record = {"prompt": task.question, "completion": task.answer}
    if rng.random() < 0.5:
        record["reasoning_effort"] = rng.choice(REASONING_EFFORTS)
    return record


def generate(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [prompt_record(rng) if rng.random() < 0.15 else chat_record(rng) for _ in range(n)]


def write_jsonl(records: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train_default, val_default = default_sample_paths()
    parser.add_argument("--out-dir", type=Path, default=train_default.parent)
    parser.add_argument("--train", type=int, default=400, help="number of training records")
    parser.add_argument("--val", type=int, default=48, help="number of validation records")
    parser.add_argument("--agentic-train", type=int, default=300, help="tool-calling training records")
    parser.add_argument("--agentic-val", type=int, default=40, help="tool-calling validation records")
    args = parser.parse_args(argv)
    write_jsonl(generate(args.train, seed=0), args.out_dir / train_default.name)
    write_jsonl(generate(args.val, seed=1), args.out_dir / val_default.name)
    agentic_train, agentic_val = agentic_sample_paths()
    write_jsonl(generate_agentic(args.agentic_train, seed=2), args.out_dir / agentic_train.name)
    write_jsonl(generate_agentic(args.agentic_val, seed=3), args.out_dir / agentic_val.name)
    print(
        f"wrote {args.train} + {args.val} chat and {args.agentic_train} + {args.agentic_val} "
        f"tool-calling records to {args.out_dir}"
    )


if __name__ == "__main__":
    main()
