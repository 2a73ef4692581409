"""Chat prompts, reasoning modes and output parsing.

Prompts are rendered from a Jinja chat template the way transformers' `apply_chat_template` renders
them, including the `{% generation %}` blocks that mark assistant text, so the assistant-only loss
mask comes from the template. `<image>` in the rendered text becomes IMAGE_TOKEN_ID, one per image;
the model widens each into that image's features.
"""

from __future__ import annotations

import json
import re
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from phi4rv.processing.reasoning import MODES, NOTHINK_TOKEN, THINK_START, Mode
from phi4rv.processing.tokenizer import Tokenizer
from phi4rv.processing.tokens import IMAGE_TOKEN_ID

IMAGE_TOKEN = "<image>"

# Our own template with the release's structure: a fixed system turn that explains the two modes
# (a user's system message is appended to it), then `<|im_start|>{role}<|im_sep|>{content}<|im_end|>`
# per turn with nothing between turns, each assistant turn's content and <|im_end|> inside a
# generation block. Like the release's template it sees string contents only (`release_messages`).
DEFAULT_CHAT_TEMPLATE = """\
{%- set system = "You are a helpful assistant that understands images and text. \
You answer in one of two ways. For a question that needs careful, step-by-step work, such as math, \
science or a chart that must be read closely, first reason inside <think> and </think>, then write \
the final answer after </think>. For a question you can answer at once, such as describing an \
image, reading its text or locating an element, answer directly, without a reasoning block. \
Keep final answers short and precise." -%}
{%- set turns = messages -%}
{%- if messages and messages[0].role == "system" -%}
{%- set system = system ~ "\\n\\n" ~ messages[0].content -%}
{%- set turns = messages[1:] -%}
{%- endif -%}
{{- "<|im_start|>system<|im_sep|>" ~ system ~ "<|im_end|>" -}}
{%- for message in turns -%}
{%- if message.role == "assistant" -%}
{{- "<|im_start|>assistant<|im_sep|>" -}}
{%- generation -%}
{{- message.content ~ "<|im_end|>" -}}
{%- endgeneration -%}
{%- else -%}
{{- "<|im_start|>" ~ message.role ~ "<|im_sep|>" ~ message.content ~ "<|im_end|>" -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- "<|im_start|>assistant<|im_sep|>" -}}
{%- endif -%}
"""

# (character count rendered so far, spans found) of the render in progress, if it records spans.
_RENDER_STATE: ContextVar[tuple[list[int], list[tuple[int, int]]] | None] = ContextVar(
    "phi4rv_render_state", default=None
)


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body and records where it landed."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_record", []), [], [], body).set_lineno(lineno)

    def _record(self, caller: Any) -> str:
        text = caller()
        state = _RENDER_STATE.get()
        if state is not None:
            # Everything before this block has been yielded already; the block comes next.
            rendered, spans = state
            spans.append((rendered[0], rendered[0] + len(text)))
        return text


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, >, & for HTML; chat templates want plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_chat(
    template: str, messages: list[dict], add_generation_prompt: bool = False, **kwargs: Any
) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages` with a chat template as transformers does; return the text and the
    character spans `[start, end)` of its generation blocks.

    Like transformers, keys whose value is None are dropped from each message, and the template
    also sees `tools` and `documents` (None unless given) and any other keyword argument.
    """
    for m in messages:
        if not isinstance(m, dict):
            raise TypeError(f"each message must be a dict, got {type(m).__name__}")
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    kwargs.setdefault("tools", None)
    kwargs.setdefault("documents", None)
    compiled = _compile(template)
    rendered, spans, pieces = [0], [], []  # rendered: a mutable count the extension reads
    token = _RENDER_STATE.set((rendered, spans))
    try:
        for piece in compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt, **kwargs):
            pieces.append(piece)
            rendered[0] += len(piece)
    finally:
        _RENDER_STATE.reset(token)
    return "".join(pieces), spans


IMAGE_PART_TYPES = ("image", "image_url")
TEXT_PART_TYPES = ("text",)
_SYSTEM_ROLES = ("system", "developer")
_PROBE = "phi4rv-system-probe-7f3a"


@lru_cache(maxsize=32)
def template_renders_system(template: str) -> bool:
    """Whether `template` shows a system message's text (the release's template drops system turns)."""
    messages = [{"role": "system", "content": _PROBE}, {"role": "user", "content": "u"}]
    return _PROBE in render_chat(template, messages, add_generation_prompt=True)[0]


def _valid(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone UTF-16 surrogate, e.g. from a "\ud800" escape in JSON
        raise ValueError("message text is not valid Unicode (a lone surrogate)") from None
    return text


def content_text(content: Any) -> str:
    """A message content as the release's processor expects it: a string in which each image is
    `<image>\\n` at its place. Text parts are joined as they are; other part types are refused."""
    if content is None:
        return ""
    if isinstance(content, str):
        return _valid(content)
    if not isinstance(content, list):
        raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")
    text = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in TEXT_PART_TYPES:
            if not isinstance(part.get("text"), str):
                raise ValueError(f"a {kind} part needs a string 'text'")
            text.append(_valid(part["text"]))
        elif kind in IMAGE_PART_TYPES:
            text.append(IMAGE_TOKEN + "\n")
        else:
            raise ValueError(f"unsupported content part type: {kind!r}")
    return "".join(text)


def release_messages(messages: list[dict], template: str) -> list[dict]:
    """Messages in the release's contract, whatever form they came in (OpenAI parts, strings).

    Every content becomes a string with one `<image>\\n` per image at its place (`content_text`).
    `developer` turns are system turns. A template that does not show system turns (the
    release's) would drop them silently, so their text goes in front of the first user turn
    instead (or becomes a user turn of its own when no user turn follows).
    """
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise TypeError(f"each message must be a dict, got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str):
            raise ValueError("each message needs a string 'role'")
        role = "system" if role in _SYSTEM_ROLES else role
        out.append({**m, "role": role, "content": content_text(m.get("content"))})
    if any(m["role"] == "system" for m in out) and not template_renders_system(template):
        system = "\n\n".join(m["content"] for m in out if m["role"] == "system")
        out = [m for m in out if m["role"] != "system"]
        first_user = next((i for i, m in enumerate(out) if m["role"] == "user"), None)
        if first_user is None:
            out.insert(0, {"role": "user", "content": system})
        else:
            out[first_user] = {**out[first_user], "content": system + "\n\n" + out[first_user]["content"]}
    return out


def mode_prefix(mode: Mode) -> str:
    """What follows the generation prompt in each mode: nothing, `<think>`, or the nothink marker."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return {"auto": "", "think": THINK_START, "nothink": NOTHINK_TOKEN}[mode]


@dataclass
class EncodedChat:
    input_ids: list[int]
    assistant_mask: list[bool]
    num_images: int


def encode_chat(
    tokenizer: Tokenizer,
    messages: list[dict],
    mode: Mode = "auto",
    add_generation_prompt: bool = True,
    template: str | None = None,
    special_tokens: bool = True,
) -> EncodedChat:
    """Render and tokenize a conversation (contents in any form `release_messages` accepts).

    The template is `template`, else the tokenizer's own, else DEFAULT_CHAT_TEMPLATE. The mode
    prefix is appended only after a generation prompt. A token is assistant iff its characters
    overlap a generation block (the same rule as transformers' char_to_token mask); image
    placeholders never are. With `special_tokens=False` (text from users), a control token
    spelled inside a message's content is encoded as text, so a user cannot forge turns.
    """
    prefix = mode_prefix(mode)
    template = template or tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
    messages = release_messages(messages, template)
    try:
        text, spans = render_chat(template, messages, add_generation_prompt, **tokenizer.special_tokens())
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template: {e}") from None
    if add_generation_prompt:
        text += prefix
    plain = [] if special_tokens else _content_spans(text, messages)

    ids: list[int] = []
    mask: list[bool] = []
    pieces = text.split(IMAGE_TOKEN)
    base = 0
    for n, piece in enumerate(pieces):
        if n:
            ids.append(IMAGE_TOKEN_ID)
            mask.append(False)
            base += len(IMAGE_TOKEN)
        local = [(max(a - base, 0), min(b - base, len(piece))) for a, b in plain if a < base + len(piece) and b > base]
        piece_ids, offsets = tokenizer.encode_with_offsets(piece, local)
        ids.extend(piece_ids)
        for start, end in offsets:
            start, end = base + start, base + end
            mask.append(any(start < s_end and end > s_start for s_start, s_end in spans))
        base += len(piece)
    return EncodedChat(ids, mask, len(pieces) - 1)


def _content_spans(text: str, messages: list[dict]) -> list[tuple[int, int]]:
    """Where each message's content sits in the rendered `text`, found in order (as it is, or
    stripped, as templates that trim contents render it)."""
    spans, at = [], 0
    for m in messages:
        for content in (m["content"], m["content"].strip()):
            i = text.find(content, at) if content else -1
            if i >= 0:
                spans.append((i, i + len(content)))
                at = i + len(content)
                break
    return spans


_NUMBER = r"\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+))\s*"
_BOX = re.compile(r"\[" + ",".join([_NUMBER] * 4) + r"\]")


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The last `[x1, y1, x2, y2]` in `text` as fractions of width/height, or None when there is
    none or the last one is not a valid box (a coordinate outside [0, 1], or x1 > x2, y1 > y2)."""
    matches = _BOX.findall(text)
    if not matches:
        return None
    x1, y1, x2, y2 = (float(v) for v in matches[-1])
    if not all(0.0 <= v <= 1.0 for v in (x1, y1, x2, y2)) or x1 > x2 or y1 > y2:
        return None
    return x1, y1, x2, y2


def box_center(box: tuple[float, float, float, float]) -> tuple[float, float]:
    x1, y1, x2, y2 = box
    return (x1 + x2) / 2, (y1 + y2) / 2


def to_pixels(box: tuple[float, float, float, float], width: int, height: int) -> tuple[float, float, float, float]:
    """A fractional box in pixel coordinates of a `width` x `height` image."""
    x1, y1, x2, y2 = box
    return x1 * width, y1 * height, x2 * width, y2 * height


GROUNDING_ASK = ("Output its bounding box as [x1, y1, x2, y2], each coordinate a fraction of the image width or "
                 "height between 0.0000 and 1.0000.")


def grounding_prompt(target: str) -> str:
    """The release's grounding request for a UI element described by `target`."""
    return f"<image>\nLocate the element: {target}\n{GROUNDING_ASK}"


@dataclass
class Grounding:
    box: tuple[float, float, float, float]  # [x1, y1, x2, y2], fractions of the image
    pixels: tuple[int, int, int, int]  # (x, y, width, height) in the image's pixels
    point: tuple[int, int]  # the click point: the box's centre, in pixels

    def to_json(self) -> dict:
        x, y, w, h = self.pixels
        return {"box": list(self.box), "pixels": {"x": x, "y": y, "width": w, "height": h}, "point": list(self.point)}


def ground(text: str, width: int, height: int) -> Grounding | None:
    """A model's grounding answer (its last `[x1, y1, x2, y2]` in fractions; corners in either
    order) in a `width` x `height` image; None if there is no such box."""
    matches = _BOX.findall(text)
    values = [float(v) for v in matches[-1]] if matches else []
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        return None
    x1, y1, x2, y2 = values
    box = (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))
    x1, y1, x2, y2 = (round(v) for v in to_pixels(box, width, height))
    cx, cy = box_center(box)
    return Grounding(box, (x1, y1, x2 - x1, y2 - y1), (min(round(cx * width), width - 1), min(round(cy * height), height - 1)))
