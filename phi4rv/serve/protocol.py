"""OpenAI Chat Completions request schema (the part phi4rv serves) and response builders."""

from __future__ import annotations

import json
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


class FunctionCall(BaseModel):
    name: StrictStr
    arguments: StrictStr


class ToolCallIn(BaseModel):
    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[StrictStr, list[ContentPart], None] = None
    reasoning_content: StrictStr | None = None  # ignored on input turns
    tool_calls: list[ToolCallIn] | None = None  # assistant turns that called tools
    tool_call_id: StrictStr | None = None  # tool turns: the call answered


class JSONSchemaSpec(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: StrictStr | None = None
    description: StrictStr | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaSpec | None = None


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
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None


class ResponsesRequest(BaseModel):
    """The part of OpenAI's Responses API that phi4rv serves (`POST /v1/responses`)."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr
    input: Union[StrictStr, list[dict[str, Any]]]
    instructions: StrictStr | None = None
    max_output_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: StrictBool = False
    reasoning: dict[str, Any] | None = None  # {"effort": ..., "summary": ...}
    text: dict[str, Any] | None = None  # {"format": {"type": "text" | "json_object" | "json_schema", ...}}
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None


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


class GroundingRequest(BaseModel):
    text: StrictStr  # the model's answer holding [x1, y1, x2, y2] in fractions
    width: StrictInt = Field(ge=1)  # of the image the model saw, in pixels
    height: StrictInt = Field(ge=1)


def reasoning_item(thinking: str, summary: bool) -> dict:
    """The reasoning as a Responses output item: its text, and as the summary when one was asked
    for (phi4rv's summary is the whole reasoning)."""
    return {"type": "reasoning", "id": "rs_" + uuid.uuid4().hex[:24],
            "summary": [{"type": "summary_text", "text": thinking}] if summary else [],
            "content": [{"type": "reasoning_text", "text": thinking}]}


def response_items(thinking: str | None, answer: str, calls, summary: bool, msg_id: str | None = None) -> list[dict]:
    items = [reasoning_item(thinking, summary)] if thinking else []
    if calls:
        return items + [{"type": "function_call", "id": "fc_" + uuid.uuid4().hex[:24], "call_id": c.id, "name": c.name,
                         "arguments": json.dumps(c.arguments, ensure_ascii=False), "status": "completed"} for c in calls]
    return items + [{"type": "message", "id": msg_id or "msg_" + uuid.uuid4().hex[:24], "status": "completed",
                     "role": "assistant", "content": [{"type": "output_text", "text": answer, "annotations": []}]}]


def response_body(rid: str, created: int, model: str, output: list[dict], usage: dict | None, req,
                  status: str | None = None) -> dict:
    if status is None:
        status = "incomplete" if usage and usage["finish_reason"] == "length" else "completed"
    return {
        "id": rid, "object": "response", "created_at": created, "status": status, "model": model,
        "output": output, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
        "temperature": req.temperature, "top_p": req.top_p, "parallel_tool_calls": False,
        "tool_choice": req.tool_choice or "auto", "tools": req.tools or [],
        "reasoning": req.reasoning or {"effort": None, "summary": None},
        "text": req.text or {"format": {"type": "text"}},
        "usage": None if usage is None else {
            "input_tokens": usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": usage["thinking_tokens"]},
            "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
        },
    }
