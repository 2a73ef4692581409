"""Function calling in the release's chat format, which has no tool syntax of its own.

The tools are described in the system part (which the release's template folds into the first
user turn, see `release_messages`); the model calls one by answering with nothing but the JSON
object `{"name": ..., "arguments": {...}}` (several calls: a JSON array of them). An assistant
turn that called tools is rendered as that JSON; a tool's result comes back as a user turn that
names the call. With `tool_choice` required or naming a function, the answer is constrained to
the calls' JSON schema, so a call always parses.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from phi4rv.generation.grammar import JSON_OBJECT_SCHEMA

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ToolError(ValueError):
    pass


@dataclass
class Function:
    name: str
    description: str | None
    parameters: dict | None


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: dict

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


def functions(tools: list[dict]) -> list[Function]:
    """OpenAI `tools` (chat: `{"type": "function", "function": {...}}`; responses: flat) -> functions."""
    out = []
    for tool in tools:
        if tool.get("type") != "function":
            raise ToolError(f"unsupported tool type {tool.get('type')!r} (only 'function')")
        spec = tool.get("function", tool)
        name = spec.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise ToolError(f"invalid function name {name!r} (letters, digits, _ and -, at most 64)")
        params = spec.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ToolError(f"function {name}: parameters must be a JSON schema object")
        out.append(Function(name, spec.get("description"), params))
    if len({f.name for f in out}) != len(out):
        raise ToolError("function names must be unique")
    return out


def system_text(fns: list[Function]) -> str:
    listing = json.dumps([{"name": f.name, "description": f.description or "", "parameters": f.parameters or {}}
                          for f in fns], ensure_ascii=False)
    return ("You can call these functions:\n" + listing + "\nTo call one, answer with only a JSON object "
            '{"name": <function name>, "arguments": <its arguments>}. Otherwise answer normally.')


def call_schema(fns: list[Function], choice: str | dict | None) -> dict | None:
    """The answer's JSON schema for a tool choice: None for auto/none, the calls otherwise."""
    if choice in (None, "auto", "none"):
        return None
    if choice == "required":
        chosen = fns
    elif isinstance(choice, dict):
        name = (choice.get("function") or choice).get("name")
        chosen = [f for f in fns if f.name == name]
        if not chosen:
            raise ToolError(f"tool_choice names function {name!r}, which is not among the tools")
    else:
        raise ToolError(f"invalid tool_choice {choice!r}")
    if not fns:
        raise ToolError("tool_choice needs tools")
    variants = [{"type": "object", "properties": {"name": {"const": f.name},
                                                  "arguments": f.parameters or JSON_OBJECT_SCHEMA},
                 "required": ["name", "arguments"], "additionalProperties": False} for f in chosen]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def conversation(messages: list[dict], fns: list[Function], choice: str | dict | None) -> list[dict]:
    """OpenAI messages with tool turns -> plain user/assistant/system messages (tool text included)."""
    names: dict[str, str] = {}
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                names[c["id"]] = c["function"]["name"]
                try:
                    args = json.loads(c["function"]["arguments"] or "{}")
                except json.JSONDecodeError:
                    raise ToolError(f"tool call {c['id']}: arguments are not JSON") from None
                calls.append({"name": c["function"]["name"], "arguments": args})
            out.append({"role": "assistant", "content": json.dumps(calls[0] if len(calls) == 1 else calls)})
        elif m["role"] == "tool":
            call = m.get("tool_call_id")
            label = f"{names.get(call, 'the function')} (call {call})" if call else "the function"
            out.append({"role": "user", "content": f"Result of {label}:\n{m.get('content') or ''}"})
        else:
            out.append({"role": m["role"], "content": m.get("content")})
    if fns and choice != "none":
        out.insert(0, {"role": "system", "content": system_text(fns)})
    return out


def parse_calls(answer: str, fns: list[Function]) -> list[ToolCall] | None:
    """The calls an answer makes, or None when it is not (only) calls to known functions."""
    try:
        value = json.loads(answer)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    known = {f.name for f in fns}
    calls = []
    for item in items:
        if not (isinstance(item, dict) and item.get("name") in known and isinstance(item.get("arguments"), dict)):
            return None
        calls.append(ToolCall("call_" + uuid.uuid4().hex[:24], item["name"], item["arguments"]))
    return calls or None
