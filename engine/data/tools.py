"""Tools of a record: function schemas (`tools`), built-in tools, and their harmony rendering.

A record's `tools` are OpenAI / HF function definitions (`{"type": "function", "function": {"name",
"description"?, "parameters"?}}`, or the inner object alone). Harmony renders them in the developer
message as a TypeScript-like `namespace functions { ... }`; the built-in `browser` and `python` tools
(asked for with `"builtin_tools": ["browser", "python"]`) go to the system message. The text follows
openai-harmony's renderer exactly, quirks included (nested objects keep the outer indentation, the
description of a schema object is written before its brace): the tests compare it byte for byte.
"""

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from engine.errors import DataError

# Text that the tokenizer would read as harmony structure instead of text (o200k_harmony reserves
# every <|reserved_N|> too). Refused wherever record text is rendered.
_SPECIAL = re.compile(
    r"<\|(?:start|end|message|channel|return|call|constrain|startoftext|endoftext|reserved_\d+)\|>"
)
# A name is rendered inside a header, next to other header text: keep it one plain word.
_NAME = re.compile(r"[A-Za-z0-9_\-.]+")
_MISSING = object()


class RecordError(DataError):
    """A record that does not follow the data format."""


@dataclass(frozen=True, eq=False)
class FunctionTool:
    name: str
    description: str
    parameters: dict | None  # JSON schema; None renders as a tool without arguments


@dataclass(frozen=True)
class Namespace:
    name: str
    description: str | None
    tools: tuple[FunctionTool, ...]


def type_name(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def check_text(where: str, value: object) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{where} must be a string, got {type_name(value)}")
    if not value.isascii():  # JSON's `\ud800` decodes to half a UTF-16 pair, which no tokenizer takes
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise RecordError(
                f"{where} holds a lone surrogate {value[exc.start]!r} at character {exc.start} (half of a "
                "UTF-16 pair, not a character); fix that escape in the data"
            ) from None
    if "<|" in value:
        match = _SPECIAL.search(value)
        if match:
            raise RecordError(
                f"{where} contains the special token {match.group(0)!r}, which the tokenizer reads as "
                "harmony structure, never as text; remove it"
            )
    return value


def check_name(where: str, name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise RecordError(f"{where} = {name!r} must be a name of letters, digits, '_', '-' or '.'")
    return name


_PARSED: dict[str, tuple[tuple[FunctionTool, ...], str]] = {}


def parse_tools(raw: object) -> tuple[tuple[FunctionTool, ...], str]:
    """The record's `tools` list as FunctionTools, in order (names unique), and a text identifying them.

    Records of one dataset usually share their tools: a list seen before (same `repr`, which tells
    every JSON value apart) is validated once, and its rendering is remembered under that text.
    """
    if raw is None:
        return (), ""
    if not isinstance(raw, list):
        raise RecordError(f"'tools' must be a list of function definitions, got {type_name(raw)}")
    key = repr(raw)
    seen = _PARSED.get(key)
    if seen is not None:
        return seen
    tools: list[FunctionTool] = []
    for k, item in enumerate(raw):
        where = f"tools[{k}]"
        if not isinstance(item, dict):
            raise RecordError(f"{where} must be an object, got {type_name(item)}")
        if "function" in item:
            if item.get("type", "function") != "function":
                raise RecordError(f"{where}.type = {item['type']!r}: only 'function' tools are supported")
            item, where = item["function"], f"{where}.function"
            if not isinstance(item, dict):
                raise RecordError(f"{where} must be an object, got {type_name(item)}")
        name = check_name(f"{where}.name", item.get("name"))
        if any(t.name == name for t in tools):
            raise RecordError(f"{where}.name: function {name!r} is defined twice")
        description = check_text(f"{where}.description", item.get("description") or "")
        parameters = item.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise RecordError(f"{where}.parameters must be a JSON schema object, got {type_name(parameters)}")
        tools.append(FunctionTool(name, description, parameters))
    if "<|" in key:
        for k, tool in enumerate(tools):
            check_text(f"tools[{k}] parameters", json.dumps(tool.parameters, ensure_ascii=False))
    if len(_PARSED) > 1024:
        _PARSED.clear()
    _PARSED[key] = result = (tuple(tools), key)
    return result


def parse_builtin_tools(raw: object) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or any(t not in BUILTIN_TOOLS for t in raw):
        raise RecordError(f"'builtin_tools' = {raw!r} must be a list drawn from: {', '.join(BUILTIN_TOOLS)}")
    return tuple(sorted(set(raw)))


def tools_section(namespaces: Sequence[Namespace]) -> str:
    """The `# Tools` section of a system or developer message (namespaces sorted by name)."""
    sections = ["# Tools"]
    for ns in sorted(namespaces, key=lambda n: n.name):
        lines = [f"## {ns.name}\n"]
        if ns.description is not None:
            lines += [f"// {line}" if ns.tools else line for line in _lines(ns.description)]
        if ns.tools:
            lines.append(f"namespace {ns.name} {{\n")
            for tool in ns.tools:
                lines += [f"// {line}" for line in _lines(tool.description)]
                args = "" if tool.parameters is None else f"_: {schema_to_typescript(tool.parameters, '')}"
                lines.append(f"type {tool.name} = ({args}) => any;\n")
            lines.append(f"}} // namespace {ns.name}")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def _lines(text: str) -> list[str]:
    """Lines as harmony splits them: on '\\n', one trailing '\\r' dropped, no empty last line."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _get(schema: object, key: str, default: object = None) -> object:
    return schema.get(key, default) if isinstance(schema, dict) else default


def _str(schema: object, key: str) -> str | None:
    value = _get(schema, key)
    return value if isinstance(value, str) else None


def _is_enum(schema: object) -> bool:
    values = _get(schema, "enum")
    return isinstance(values, list) and bool(values)


def _default(schema: object, quote_plain: bool) -> str | None:
    """`default: ...` text. A string default is quoted raw unless the schema is an enum; then it is
    JSON-quoted (`quote_plain=False`, oneOf variants at top level) or bare (elsewhere)."""
    value = _get(schema, "default", _MISSING)
    if value is _MISSING:
        return None
    if isinstance(value, str) and not _is_enum(schema):
        return f'default: "{value}"'
    if isinstance(value, str) and quote_plain:
        return f"default: {value}"
    return f"default: {_json(value)}"


def _nullable(schema: object, text: str) -> str:
    if _get(schema, "nullable") is True and "null" not in text:
        return f"{text} | null"
    return text


def schema_to_typescript(schema: object, indent: str) -> str:
    """A JSON schema as the TypeScript-like type harmony writes."""
    variants = _get(schema, "oneOf")
    if isinstance(variants, list):
        out = ""
        for variant in variants:
            out += f"\n{indent} | " + _nullable(variant, schema_to_typescript(variant, indent + "   "))
            comments = [c for c in (_str(variant, "description"), _default(variant, False)) if c is not None]
            if comments:
                out += " // " + " ".join(comments)
        return out
    kind = _get(schema, "type")
    if isinstance(kind, list):
        names = ["number" if k == "integer" else k for k in kind if isinstance(k, str)]
        if names:
            return " | ".join(names)
    if not isinstance(kind, str):
        return "any"
    if kind == "object":
        return _object(schema, indent)
    if kind == "string":
        values = [f'"{v}"' for v in _get(schema, "enum") or () if isinstance(v, str)] if _is_enum(schema) else []
        return " | ".join(values) if values else "string"
    if kind in ("number", "integer"):
        return "number"
    if kind == "boolean":
        return "boolean"
    if kind == "array":
        items = _get(schema, "items", _MISSING)
        return "Array<any>" if items is _MISSING else schema_to_typescript(items, indent) + "[]"
    return "any"


def _object(schema: dict, indent: str) -> str:
    out = ""
    description = _str(schema, "description")
    if description is not None:
        out += f"{indent}// {description}\n"
    out += "{\n"
    properties = _get(schema, "properties")
    required = _get(schema, "required")
    required = {r for r in required if isinstance(r, str)} if isinstance(required, list) else set()
    for key, value in properties.items() if isinstance(properties, dict) else ():
        mark = "" if key in required else "?"
        title = _str(value, "title")
        if title is not None:
            out += f"{indent}// {title}\n{indent}//\n"
        has_one_of = isinstance(value, dict) and "oneOf" in value
        prop_description = _str(value, "description")
        if not has_one_of and prop_description is not None:
            out += f"{indent}// {prop_description}\n"
        examples = _get(value, "examples")
        if isinstance(examples, list) and examples:
            out += f"{indent}// Examples:\n" + "".join(f'{indent}// - "{e}"\n' for e in examples if isinstance(e, str))
        variants = _get(value, "oneOf")
        if isinstance(variants, list):
            out += _one_of_property(key + mark, value, variants, prop_description, indent)
            continue
        out += f"{indent}{key}{mark}: " + _nullable(value, schema_to_typescript(value, indent + "    ")) + ","
        default = None if has_one_of else _default(value, True)
        if default is not None:
            out += f" // {default}"
        out += "\n"
    return out + f"{indent}}}"


def _one_of_property(label: str, value: dict, variants: list, description: str | None, indent: str) -> str:
    out = ""
    # The property's description is not repeated when the first variant already says it.
    above = description is not None and not (variants and _str(variants[0], "description") == description)
    if above:
        out += f"{indent}// {description}\n"
    default = _default(value, True)
    if default is not None:
        out += f"{indent}// {default}\n"
    out += f"{indent}{label}:\n"
    for i, variant in enumerate(variants):
        out += f"{indent} | " + _nullable(variant, schema_to_typescript(variant, indent + "   "))
        comments = []
        variant_description = _str(variant, "description")
        if not (i == 0 and above) and variant_description is not None and variant_description != description:
            comments.append(variant_description)
        variant_default = _default(variant, True)
        if variant_default is not None:
            comments.append(variant_default)
        if comments:
            out += " // " + " ".join(comments)
        out += "\n"
    return out + f"{indent},\n"


_BROWSER_DESCRIPTION = (
    "Tool for browsing.\n"
    "The `cursor` appears in brackets before each browsing display: `[{cursor}]`.\n"
    "Cite information from the tool using the following format:\n"
    "`【{cursor}†L{line_start}(-L{line_end})?】`, for example: `【6†L9-L11】` or `【8†L3】`.\n"
    "Do not quote more than 10 words directly from the tool output.\n"
    "sources=web (default: web)"
)
_PYTHON_DESCRIPTION = (
    "Use this tool to execute Python code in your chain of thought. The code will not be shown to the "
    "user. This tool should be used for internal reasoning, but not for code that is intended to be "
    "visible to the user (e.g. when creating plots, tables, or files).\n\n"
    "When you send a message containing Python code to python, it will be executed in a stateful "
    "Jupyter notebook environment. python will respond with the output of the execution or time out "
    "after 120.0 seconds. The drive at '/mnt/data' can be used to save and persist user files. "
    "Internet access for this session is UNKNOWN. Depends on the cluster."
)
_NUMBER_DEFAULT_MINUS_ONE = {"type": "number", "default": -1}
BUILTIN_TOOLS = {
    "browser": Namespace("browser", _BROWSER_DESCRIPTION, (
        FunctionTool(
            "search", "Searches for information related to `query` and displays `topn` results.",
            {"type": "object", "properties": {"query": {"type": "string"}, "topn": {"type": "number", "default": 10},
                                              "source": {"type": "string"}}, "required": ["query"]},
        ),
        FunctionTool(
            "open",
            "Opens the link `id` from the page indicated by `cursor` starting at line number `loc`, showing "
            "`num_lines` lines.\nValid link ids are displayed with the formatting: `【{id}†.*】`.\nIf `cursor` is "
            "not provided, the most recent page is implied.\nIf `id` is a string, it is treated as a fully "
            "qualified URL associated with `source`.\nIf `loc` is not provided, the viewport will be positioned "
            "at the beginning of the document or centered on the most relevant passage, if available.\nUse this "
            "function without `id` to scroll to a new location of an opened page.",
            {"type": "object", "properties": {
                "id": {"type": ["number", "string"], "default": -1}, "cursor": _NUMBER_DEFAULT_MINUS_ONE,
                "loc": _NUMBER_DEFAULT_MINUS_ONE, "num_lines": _NUMBER_DEFAULT_MINUS_ONE,
                "view_source": {"type": "boolean", "default": False}, "source": {"type": "string"}}},
        ),
        FunctionTool(
            "find", "Finds exact matches of `pattern` in the current page, or the page given by `cursor`.",
            {"type": "object", "properties": {"pattern": {"type": "string"}, "cursor": _NUMBER_DEFAULT_MINUS_ONE},
             "required": ["pattern"]},
        ),
    )),
    "python": Namespace("python", _PYTHON_DESCRIPTION, ()),
}
