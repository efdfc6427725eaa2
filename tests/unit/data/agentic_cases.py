"""Conversations written to exercise every harmony feature; compared against openai-harmony."""

import json


def fn(name: str, description: str, parameters: dict | None = None) -> dict:
    function = {"name": name, "description": description}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


def call(name: str, arguments, call_id: str | None = None) -> dict:
    out = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if call_id is not None:
        out["id"] = call_id
    return out


def obj(properties: dict, required: list | None = None, **extra) -> dict:
    schema = {"type": "object", "properties": properties, **extra}
    if required is not None:
        schema["required"] = required
    return schema


WEATHER = fn(
    "get_weather",
    "Get the current weather for a city.",
    obj(
        {
            "city": {"type": "string", "description": "City name, e.g. Oslo"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
        },
        ["city"],
    ),
)
TIME = fn("get_time", "Current local time.\nReturns HH:MM.", obj({"tz": {"type": "string"}}, ["tz"]))
NO_PARAMS = fn("list_files", "List the files in the working folder.")
EMPTY_OBJECT = fn("ping", "", obj({}))
NESTED = fn(
    "book_trip",
    "Book a trip.",
    obj(
        {
            "traveller": obj(
                {
                    "name": {"type": "string"},
                    "age": {"type": "integer", "description": "Years"},
                    "vip": {"type": "boolean", "default": False},
                },
                ["name"],
                description="Who travels",
            ),
            "legs": {
                "type": "array",
                "items": obj(
                    {
                        "from": {"type": "string"},
                        "to": {"type": "string"},
                        "date": {"type": "string", "title": "Date", "examples": ["2025-01-31"]},
                    },
                    ["from", "to"],
                ),
            },
            "budget": {"type": "number", "nullable": True, "default": 1000.5},
            "class": {
                "oneOf": [
                    {"type": "string", "enum": ["eco", "business"], "description": "Cabin"},
                    {"type": "integer", "description": "Fare code", "default": 3},
                ],
                "description": "Cabin or fare code",
                "default": "eco",
            },
            "tags": {"type": "array"},
            "when": {"type": ["string", "integer", "null"]},
            "extra": {},
        },
        ["traveller", "legs"],
    ),
)
UNION_TOP = fn(
    "lookup",
    "Look up by id or name.",
    {
        "oneOf": [
            obj({"id": {"type": "integer"}}, ["id"], description="By id"),
            {**obj({"name": {"type": "string"}}, ["name"]), "nullable": True, "default": {"name": "x"}},
        ]
    },
)
SEARCH = fn(
    "search_docs",
    "Search the documentation.",
    obj(
        {
            "query": {"type": "string", "description": "Words to find"},
            "limit": {"type": "integer", "default": 5, "description": "Most results"},
            "filters": {"type": "array", "items": {"type": "string", "enum": ["api", "guide"]}},
        },
        ["query"],
    ),
)

USER = {"role": "user", "content": "Is it cold in Oslo?"}
RESULT = {"role": "tool", "name": "get_weather", "content": json.dumps({"temp": -3})}
OSLO = call("get_weather", json.dumps({"city": "Oslo"}))


def chat(*messages, tools=None, **extra) -> dict:
    record = {"messages": list(messages), **extra}
    if tools is not None:
        record["tools"] = tools
    return record


CASES = {
    "issue_example": chat(
        USER,
        {"role": "assistant", "thinking": "Need the weather.", "tool_calls": [OSLO]},
        RESULT,
        {"role": "assistant", "content": "Yes, -3 C."},
        tools=[WEATHER],
    ),
    "single_tool_no_thinking": chat(
        USER,
        {"role": "assistant", "content": None, "tool_calls": [OSLO]},
        RESULT,
        {"role": "assistant", "content": "Yes."},
        tools=[WEATHER],
    ),
    "preamble": chat(
        USER,
        {"role": "assistant", "content": "Let me check.", "thinking": "Call it.", "tool_calls": [OSLO]},
        RESULT,
        {"role": "assistant", "content": "Cold.", "thinking": "-3 is cold."},
        tools=[WEATHER],
    ),
    "several_calls_one_turn": chat(
        {"role": "user", "content": "Weather and time in Oslo?"},
        {
            "role": "assistant",
            "thinking": "Two calls.",
            "tool_calls": [
                call("get_weather", '{"city": "Oslo"}', "c1"),
                call("get_time", '{"tz": "Europe/Oslo"}', "c2"),
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "-3"},
        {"role": "tool", "tool_call_id": "c2", "content": "09:30"},
        {"role": "assistant", "content": "-3 C at 09:30."},
        tools=[WEATHER, TIME],
    ),
    "multiple_tools_declared_one_used": chat(
        USER,
        {"role": "assistant", "tool_calls": [OSLO]},
        RESULT,
        {"role": "assistant", "content": "Yes."},
        tools=[WEATHER, TIME, NO_PARAMS, SEARCH],
    ),
    "ends_with_tool_call": chat(
        USER, {"role": "assistant", "thinking": "Look it up.", "tool_calls": [OSLO]}, tools=[WEATHER]
    ),
    "ends_with_preamble_and_call": chat(
        USER, {"role": "assistant", "content": "Checking.", "tool_calls": [OSLO]}, tools=[WEATHER]
    ),
    "tool_use_in_earlier_turn": chat(
        USER,
        {"role": "assistant", "thinking": "Old thought.", "tool_calls": [OSLO]},
        RESULT,
        {"role": "assistant", "content": "Yes.", "thinking": "Dropped later."},
        {"role": "user", "content": "Thanks! And 2+2?"},
        {"role": "assistant", "content": "4.", "thinking": "Easy."},
        tools=[WEATHER],
    ),
    "two_tool_turns": chat(
        USER,
        {"role": "assistant", "tool_calls": [OSLO]},
        RESULT,
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "And Rome?"},
        {"role": "assistant", "thinking": "Rome now.", "tool_calls": [call("get_weather", {"city": "Rome"})]},
        {"role": "tool", "name": "get_weather", "content": "18"},
        {"role": "assistant", "thinking": "Mild.", "content": "18 C, mild."},
        tools=[WEATHER],
    ),
    "chained_calls_with_thinking_between": chat(
        {"role": "user", "content": "Plan a trip."},
        {"role": "assistant", "thinking": "First the weather.", "tool_calls": [OSLO]},
        RESULT,
        {
            "role": "assistant",
            "thinking": "Now book.",
            "content": "Booking now.",
            "tool_calls": [call("book_trip", {"traveller": {"name": "Ada"}, "legs": [{"from": "OSL", "to": "ROM"}]})],
        },
        {"role": "tool", "name": "book_trip", "content": "ok"},
        {"role": "assistant", "thinking": "Done.", "content": "Booked."},
        tools=[WEATHER, NESTED],
    ),
    "nested_schema": chat(
        {"role": "user", "content": "Book Ada."},
        {"role": "assistant", "tool_calls": [call("book_trip", '{"traveller":{"name":"Ada"},"legs":[]}')]},
        tools=[NESTED],
    ),
    "union_top_level": chat(
        {"role": "user", "content": "Find 7."},
        {"role": "assistant", "tool_calls": [call("lookup", {"id": 7})]},
        {"role": "tool", "name": "lookup", "content": "found"},
        {"role": "assistant", "content": "Found."},
        tools=[UNION_TOP],
    ),
    "no_params_tool": chat(
        {"role": "user", "content": "What files?"},
        {"role": "assistant", "tool_calls": [call("list_files", "{}")]},
        {"role": "tool", "name": "list_files", "content": "a.txt\nb.txt"},
        {"role": "assistant", "content": "a.txt and b.txt."},
        tools=[NO_PARAMS, EMPTY_OBJECT],
    ),
    "arguments_object_unicode": chat(
        {"role": "user", "content": "Météo à Zürich? ☃"},
        {"role": "assistant", "thinking": "Zürich — 天气.", "tool_calls": [call("get_weather", {"city": "Zürich 😊"})]},
        {"role": "tool", "name": "get_weather", "content": '{"temp": "−2 °C"}'},
        {"role": "assistant", "content": "Il fait −2 °C ❄️."},
        tools=[WEATHER],
    ),
    "unicode_schema": chat(
        {"role": "user", "content": "こんにちは"},
        {"role": "assistant", "tool_calls": [call("translate", {"texte": "こんにちは"})]},
        {"role": "tool", "name": "translate", "content": "hello"},
        {"role": "assistant", "content": "hello"},
        tools=[
            fn(
                "translate",
                "Übersetzt Text — ✓.",
                obj({"texte": {"type": "string", "description": "Le texte à traduire"}}),
            )
        ],
    ),
    "empty_contents": chat(
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "", "tool_calls": [call("ping", "{}")]},
        {"role": "tool", "name": "ping", "content": ""},
        {"role": "assistant", "content": ""},
        tools=[EMPTY_OBJECT],
    ),
    "empty_answer_with_thinking": chat(
        {"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": "", "thinking": "Silence."}
    ),
    "effort_low": chat(
        USER,
        {"role": "assistant", "tool_calls": [OSLO]},
        RESULT,
        {"role": "assistant", "content": "Y"},
        tools=[WEATHER],
        reasoning_effort="low",
    ),
    "effort_medium": chat(
        USER,
        {"role": "assistant", "tool_calls": [OSLO]},
        RESULT,
        {"role": "assistant", "content": "Y"},
        tools=[WEATHER],
        reasoning_effort="medium",
    ),
    "effort_high": chat(
        USER,
        {"role": "assistant", "thinking": "t", "tool_calls": [OSLO]},
        RESULT,
        {"role": "assistant", "content": "Y"},
        tools=[WEATHER],
        reasoning_effort="high",
    ),
    "developer_and_tools": chat(
        {"role": "developer", "content": "Always use metric units."},
        USER,
        {"role": "assistant", "tool_calls": [OSLO]},
        RESULT,
        {"role": "assistant", "content": "-3 C."},
        tools=[WEATHER],
    ),
    "system_and_developer_and_tools": chat(
        {"role": "system", "content": "You are a weather bot."},
        {"role": "developer", "content": "Be brief.\nNo emoji."},
        USER,
        {"role": "assistant", "tool_calls": [OSLO]},
        RESULT,
        {"role": "assistant", "content": "Cold."},
        tools=[WEATHER, SEARCH],
    ),
    "tools_declared_not_used": chat(
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, tools=[WEATHER]
    ),
    "reasoning_content_key": chat(
        USER,
        {"role": "assistant", "reasoning_content": "Think.", "tool_calls": [OSLO]},
        RESULT,
        {"role": "assistant", "reasoning": "Cold.", "content": "Yes."},
        tools=[WEATHER],
    ),
    "flat_tool_definition": chat(
        USER,
        {"role": "assistant", "tool_calls": [OSLO]},
        RESULT,
        {"role": "assistant", "content": "Yes."},
        tools=[WEATHER["function"]],
    ),
    "builtin_browser": chat(
        {"role": "user", "content": "News?"}, {"role": "assistant", "content": "None."}, builtin_tools=["browser"]
    ),
    "builtin_python_and_functions": chat(
        USER,
        {"role": "assistant", "tool_calls": [OSLO]},
        RESULT,
        {"role": "assistant", "content": "Yes."},
        tools=[WEATHER],
        builtin_tools=["python", "browser"],
    ),
    "plain_multi_turn": chat(
        {"role": "user", "content": "3+4?"},
        {"role": "assistant", "content": "7", "thinking": "a"},
        {"role": "user", "content": "x2?"},
        {"role": "assistant", "content": "14", "thinking": "b"},
    ),
    "prompt_completion": {"prompt": "Capital of Peru?", "completion": "Lima.", "reasoning_effort": "low"},
    "harmony_native": {
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": "Is it cold in Oslo?"},
            {"role": "assistant", "channel": "analysis", "content": "Need weather."},
            {
                "role": "assistant",
                "channel": "commentary",
                "recipient": "functions.get_weather",
                "content_type": "<|constrain|>json",
                "content": '{"city":"Oslo"}',
            },
            {
                "role": "tool",
                "name": "functions.get_weather",
                "recipient": "assistant",
                "channel": "commentary",
                "content": "-3",
            },
            {"role": "assistant", "channel": "final", "content": "Yes."},
        ],
    },
    "harmony_native_python": {
        "builtin_tools": ["python"],
        "messages": [
            {"role": "user", "content": "2**10?"},
            {
                "role": "assistant",
                "channel": "analysis",
                "recipient": "python",
                "content_type": "code",
                "content": "print(2**10)",
            },
            {"role": "tool", "name": "python", "recipient": "assistant", "channel": "analysis", "content": "1024"},
            {"role": "assistant", "channel": "final", "content": [{"type": "text", "text": "1024"}]},
        ],
    },
    "harmony_native_multi_turn": {
        "messages": [
            {"role": "developer", "content": "Be terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "channel": "analysis", "content": "Old."},
            {"role": "assistant", "channel": "final", "content": "Hello."},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "channel": "analysis", "content": "New."},
            {"role": "assistant", "channel": "final", "content": "Bye."},
        ],
        "reasoning_effort": "high",
    },
}
