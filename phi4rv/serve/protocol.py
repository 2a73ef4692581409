"""OpenAI Chat Completions request schema (the part phi4rv serves) and response builders."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr


class ImageURL(BaseModel):
    url: StrictStr
    detail: Literal["low", "high", "auto"] | None = None  # patch budget: 256 / the checkpoint's max / default


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[StrictStr, list[ContentPart], None] = None
    reasoning_content: StrictStr | None = None  # ignored on input turns


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields we ignore

    model: StrictStr
    messages: list[Message] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: StrictInt | None = None
    stop: Union[StrictStr, list[StrictStr], None] = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    n: StrictInt = Field(1, ge=1)
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    thinking_budget: StrictInt | None = Field(None, ge=0)  # phi4rv: max thinking tokens before </think>


def mode_for(effort: str | None) -> str:
    """`none`/`minimal` -> answer directly; any other effort -> think first; omitted -> the model decides."""
    if effort is None:
        return "auto"
    return "nothink" if effort in ("none", "minimal") else "think"


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def usage_body(usage: dict[str, int]) -> dict[str, Any]:
    return {
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
        "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
        "prompt_tokens_details": {"image_tokens": usage["image_tokens"]},
        "completion_tokens_details": {"reasoning_tokens": usage["thinking_tokens"]},
    }


def chunk(cid: str, model: str, created: int, delta: dict | None, finish: str | None = None, logprobs=None) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}


def now() -> int:
    return int(time.time())
