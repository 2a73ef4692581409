"""Structured outputs, tool calls, the Responses API and grounding, through the official client."""

import json

import httpx
import jsonschema
import openai
import pytest
from test_serve import Server

from phi4rv.chat_model import ChatModel
from phi4rv.generation.core import GenerationParams
from phi4rv.generation.generate import generate
from phi4rv.generation.grammar import JSON_OBJECT_SCHEMA, Grammar
from phi4rv.generation.sampling import SamplingParams
from phi4rv.processing.chat import ground
from phi4rv.processing.image import image_size

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                      "zip": {"type": "integer"}}, "required": ["city", "zip"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "role", "address", "tags"],
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"]}}}


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    s = Server(tiny_ckpt, "--max-batch", "4", "--default-max-tokens", "96")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.mark.parametrize("schema, seeds", [(PERSON, 40), (JSON_OBJECT_SCHEMA, 16)], ids=["person", "json_object"])
def test_constrained_answers_always_parse_and_validate(tiny_ckpt, schema, seeds):
    # 3 modes x `seeds` samples of a random-weight model at temperature 1 (120 + 48 answers).
    cm = ChatModel.load(tiny_ckpt, device="cpu")
    grammar = Grammar.from_schema(schema, cm.tokenizer)
    n = 0
    for mode in ("nothink", "think", "auto"):
        request, _ = cm.prepare([{"role": "user", "content": "Describe a person as JSON."}], [], mode)
        for seed in range(0, seeds, 8):
            params = GenerationParams(max_new_tokens=80, sampling=SamplingParams(temperature=1.0), seed=seed,
                                      stop_ids=cm.stop_ids(), grammar=grammar, thinking_budget=4)
            for g in generate(cm.model, cm.tokenizer, [request] * 8, params):
                from phi4rv.processing.reasoning import parse_completion

                answer = parse_completion(g.text, mode).answer
                jsonschema.validate(json.loads(answer), schema)
                n += 1
    assert n == 3 * seeds


def test_json_schema_and_json_object_through_the_client(client):
    for fmt in ({"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}, {"type": "json_object"}):
        for seed in range(3):
            r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "A person?"}],
                                               response_format=fmt, temperature=1.0, seed=seed, max_tokens=96,
                                               reasoning_effort="none")
            value = json.loads(r.choices[0].message.content)
            jsonschema.validate(value, PERSON if fmt["type"] == "json_schema" else {"type": "object"})


def test_streamed_json_schema_parses(client):
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "A person?"}], stream=True, max_tokens=96,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}, reasoning_effort="none")
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), PERSON)


def test_tool_call_round_trip(client):
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], tool_choice="required",
                                       max_tokens=64, reasoning_effort="none")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 3}'}]
    second = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], tool_choice="none",
                                            max_tokens=8, reasoning_effort="none")
    assert second.choices[0].finish_reason in ("stop", "length") and second.choices[0].message.tool_calls is None
    # The named choice, streamed: one tool_calls delta.
    stream = client.chat.completions.create(model="tiny", messages=messages[:1], tools=[WEATHER], stream=True,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            max_tokens=64, reasoning_effort="none")
    chunks = [c for c in stream if c.choices]
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].function.name == "get_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("kw, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nosuchtype"}}}}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"tools": [{"type": "retrieval"}]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool"),
])
def test_bad_structure_requests_are_400(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, **kw)
    assert param in (e.value.body.get("param") or "") + e.value.body.get("message", "")


def test_responses_api(client, images_dir):
    import base64

    image = "data:image/png;base64," + base64.b64encode((images_dir / "desktop_screenshot.png").read_bytes()).decode()
    r = client.responses.create(
        model="tiny", instructions="Be brief.", max_output_tokens=12, reasoning={"effort": "low", "summary": "auto"},
        input=[{"role": "user", "content": [{"type": "input_text", "text": "What is on screen?"},
                                            {"type": "input_image", "image_url": image, "detail": "low"}]}])
    assert r.status in ("completed", "incomplete") and r.usage.input_tokens > 256
    kinds = [item.type for item in r.output]
    assert kinds[-1] == "message" and set(kinds) <= {"reasoning", "message"}

    structured = client.responses.create(model="tiny", input="A person?", max_output_tokens=96,
                                         reasoning={"effort": "none"},
                                         text={"format": {"type": "json_schema", "name": "p", "schema": PERSON}})
    jsonschema.validate(json.loads(structured.output_text), PERSON)

    events = list(client.responses.create(model="tiny", input="Hello", max_output_tokens=6, stream=True,
                                          reasoning={"effort": "none"}))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] in ("response.completed", "response.incomplete")
    order = ["response.output_item.added", "response.content_part.added", "response.output_text.delta",
             "response.output_text.done", "response.content_part.done", "response.output_item.done"]
    positions = [types.index(t) for t in order]
    assert positions == sorted(positions)
    assert [e.sequence_number for e in events] == list(range(1, len(events) + 1))
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert streamed == events[-1].response.output_text

    call = client.responses.create(model="tiny", input="Weather in Oslo?", max_output_tokens=64,
                                   reasoning={"effort": "none"}, tool_choice="required",
                                   tools=[{"type": "function", **WEATHER["function"]}])
    fc = call.output[-1]
    assert fc.type == "function_call" and fc.name == "get_weather"
    follow = client.responses.create(model="tiny", max_output_tokens=6, reasoning={"effort": "none"},
                                     input=[{"role": "user", "content": "Weather in Oslo?"},
                                            {"type": "function_call", "call_id": fc.call_id, "name": fc.name,
                                             "arguments": fc.arguments},
                                            {"type": "function_call_output", "call_id": fc.call_id, "output": "3 C"}])
    assert follow.output[-1].type == "message"


def test_grounding_helper_maps_the_box_to_pixels(server, images_dir):
    width, height = image_size(images_dir / "desktop_screenshot.png")
    answer = "The play button is at [0.1719, 0.8648, 0.2271, 0.9611]."
    g = ground(answer, width, height)
    assert g.pixels == (165, 467, 53, 52)
    x, y, w, h = g.pixels
    assert x <= g.point[0] <= x + w and y <= g.point[1] <= y + h
    r = httpx.post(server.url + "/v1/grounding", json={"text": answer, "width": width, "height": height})
    assert r.status_code == 200 and r.json()["pixels"] == {"x": 165, "y": 467, "width": 53, "height": 52}
    assert httpx.post(server.url + "/v1/grounding", json={"text": "no box", "width": 9, "height": 9}).status_code == 400


def test_chat_ground_cli_draws(tiny_ckpt, images_dir, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    out = tmp_path / "ground.png"
    r = subprocess.run([sys.executable, "-m", "phi4rv", "chat", "--model", str(tiny_ckpt), "--image",
                        str(images_dir / "desktop_screenshot.png"), "--ground", "start playback", "--draw", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)
    assert set(found) >= {"box", "pixels", "point"} and len(found["box"]) == 4
    assert Image.open(out).size == (960, 540)


@pytest.fixture(scope="module")
def release_client(tiny_ckpt, tmp_path_factory):
    """A server on a checkpoint that carries the release's own chat template (no system turns, no
    tool turns, string contents only)."""
    import shutil
    from pathlib import Path

    path = tmp_path_factory.mktemp("release_template") / "model"
    shutil.copytree(tiny_ckpt, path)
    shutil.copy(Path(__file__).parent / "fixtures" / "chat_template.jinja", path / "chat_template.jinja")
    s = Server(path, "--max-batch", "4", "--default-max-tokens", "96")
    yield s.client()
    s.stop()


def test_structured_tools_and_responses_on_the_release_template(release_client):
    client = release_client
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "A person?"}],
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "person", "schema": PERSON}},
                                       temperature=1.0, seed=0, max_tokens=96, reasoning_effort="none")
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)

    # Tools: the template shows neither system nor tool turns; the tool list and the tool's result
    # still reach the prompt (as user text), so each turn's prompt grows by them.
    ask = [{"role": "user", "content": "Weather in Oslo?"}]
    plain = client.chat.completions.create(model="tiny", messages=ask, max_tokens=1, reasoning_effort="none")
    first = client.chat.completions.create(model="tiny", messages=ask, tools=[WEATHER], tool_choice="required",
                                           max_tokens=64, reasoning_effort="none")
    assert first.usage.prompt_tokens > plain.usage.prompt_tokens + 20  # the tool's description
    call = first.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    result = "temperature 3 degrees, light snow, wind from the north-west"

    def second_turn(content):
        turn = [*ask, first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": content}]
        return client.chat.completions.create(model="tiny", messages=turn, tools=[WEATHER], tool_choice="none",
                                              max_tokens=4, reasoning_effort="none")

    second = second_turn(result)
    assert second.usage.prompt_tokens >= second_turn("").usage.prompt_tokens + len(result.split())
    assert second.choices[0].message.tool_calls is None

    events = [e.type for e in client.responses.create(model="tiny", input="Hello", instructions="Be brief.",
                                                      max_output_tokens=6, stream=True, reasoning={"effort": "none"})]
    assert events[0] == "response.created" and events[-1] in ("response.completed", "response.incomplete")
