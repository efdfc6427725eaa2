"""Templated tool-calling conversations for the shipped agentic sample (written by make_sample).

Short enough for the tiny recipes (max_seq_len 256 with the shipped tokenizer, most records), and
covering every path of tool traffic: one call, several calls in a turn (answered by
`tool_call_id`), a commentary preamble, thinking before calls, tool use in an earlier turn, a
record that ends with its call, a direct answer although tools are offered, arguments given as an
object, the harmony-native form, and every reasoning level.
"""

import json
import random
from pathlib import Path

from engine.data.config import ASSETS_DIR, REASONING_EFFORTS


def agentic_sample_paths() -> tuple[Path, Path]:
    """(train, val) JSONL files of the shipped tool-calling sample."""
    return ASSETS_DIR / "sample_agentic.jsonl", ASSETS_DIR / "sample_agentic_val.jsonl"


TEMPS = {"Oslo": -3, "Rome": 18, "Cairo": 31, "Lima": 19, "Tokyo": 12, "Paris": 9, "Nairobi": 24, "Dublin": 7}
CAPITALS = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Peru": "Lima",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Norway": "Oslo",
    "Italy": "Rome",
    "Ireland": "Dublin",
}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current temperature of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
MULTIPLY = {
    "type": "function",
    "function": {
        "name": "multiply",
        "description": "Multiply two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
CAPITAL = {
    "type": "function",
    "function": {
        "name": "capital_of",
        "description": "Capital city of a country.",
        "parameters": {"type": "object", "properties": {"country": {"type": "string"}}, "required": ["country"]},
    },
}


def _call(name: str, arguments: dict, call_id: str | None = None, as_object: bool = False) -> dict:
    call = {
        "type": "function",
        "function": {"name": name, "arguments": arguments if as_object else json.dumps(arguments)},
    }
    if call_id is not None:
        call["id"] = call_id
    return call


def _weather(rng: random.Random) -> dict:
    city = rng.choice(sorted(TEMPS))
    temp = TEMPS[city]
    answer = f"It is {temp} C in {city}."
    assistant = {
        "role": "assistant",
        "tool_calls": [_call("get_weather", {"city": city}, as_object=rng.random() < 0.3)],
    }
    if rng.random() < 0.6:
        assistant["thinking"] = f"Need the weather in {city}."
    if rng.random() < 0.3:
        assistant["content"] = "Let me check."
    return {
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": f"How warm is it in {city}?"},
            assistant,
            {"role": "tool", "name": "get_weather", "content": json.dumps({"temp_c": temp})},
            {"role": "assistant", "content": answer},
        ],
    }


def _multiply(rng: random.Random) -> dict:
    a, b = rng.randint(11, 99), rng.randint(11, 99)
    return {
        "tools": [MULTIPLY],
        "messages": [
            {"role": "user", "content": f"What is {a} * {b}?"},
            {
                "role": "assistant",
                "thinking": "Use the tool.",
                "tool_calls": [_call("multiply", {"a": a, "b": b}, "m1")],
            },
            {"role": "tool", "tool_call_id": "m1", "content": str(a * b)},
            {"role": "assistant", "content": f"{a} * {b} = {a * b}."},
        ],
    }


def _two_cities(rng: random.Random) -> dict:
    first, second = rng.sample(sorted(TEMPS), 2)
    return {
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": f"Is {first} warmer than {second}?"},
            {
                "role": "assistant",
                "thinking": "Two lookups.",
                "tool_calls": [
                    _call("get_weather", {"city": first}, "w1"),
                    _call("get_weather", {"city": second}, "w2"),
                ],
            },
            {"role": "tool", "tool_call_id": "w1", "content": json.dumps({"temp_c": TEMPS[first]})},
            {"role": "tool", "tool_call_id": "w2", "content": json.dumps({"temp_c": TEMPS[second]})},
            {
                "role": "assistant",
                "content": f"{'Yes' if TEMPS[first] > TEMPS[second] else 'No'}: {TEMPS[first]} C vs {TEMPS[second]} C.",
            },
        ],
    }


def _capital_then_chat(rng: random.Random) -> dict:
    country = rng.choice(sorted(CAPITALS))
    city = CAPITALS[country]
    return {
        "tools": [CAPITAL],
        "messages": [
            {"role": "user", "content": f"Capital of {country}?"},
            {"role": "assistant", "thinking": "Look it up.", "tool_calls": [_call("capital_of", {"country": country})]},
            {"role": "tool", "name": "capital_of", "content": city},
            {"role": "assistant", "content": f"{city}."},
            {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "thinking": "Be polite.", "content": "You are welcome."},
        ],
    }


def _ends_with_call(rng: random.Random) -> dict:
    city = rng.choice(sorted(TEMPS))
    return {
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": f"Weather in {city}?"},
            {"role": "assistant", "thinking": "Call the tool.", "tool_calls": [_call("get_weather", {"city": city})]},
        ],
    }


def _no_tool_needed(rng: random.Random) -> dict:
    return {
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": rng.choice(("Hi!", "Hello!", "Good morning!"))},
            {"role": "assistant", "content": "Hello! Ask me about the weather."},
        ],
    }


def _native(rng: random.Random) -> dict:
    a, b = rng.randint(11, 99), rng.randint(11, 99)
    return {
        "tools": [MULTIPLY],
        "messages": [
            {"role": "user", "content": f"{a} times {b}?"},
            {"role": "assistant", "channel": "analysis", "content": "Use multiply."},
            {
                "role": "assistant",
                "channel": "commentary",
                "recipient": "functions.multiply",
                "content_type": "<|constrain|>json",
                "content": json.dumps({"a": a, "b": b}),
            },
            {
                "role": "tool",
                "name": "functions.multiply",
                "recipient": "assistant",
                "channel": "commentary",
                "content": str(a * b),
            },
            {"role": "assistant", "channel": "final", "content": f"{a * b}."},
        ],
    }


KINDS = (
    (_weather, 5),
    (_multiply, 4),
    (_two_cities, 2),
    (_capital_then_chat, 2),
    (_ends_with_call, 1),
    (_no_tool_needed, 1),
    (_native, 1),
)


def generate_agentic(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    makers, weights = zip(*KINDS)
    records = []
    for _ in range(n):
        record = rng.choices(makers, weights)[0](rng)
        effort = rng.choice((*REASONING_EFFORTS, None))
        if effort is not None:
            record["reasoning_effort"] = effort
        records.append(record)
    return records
