import base64
import io
import json

import pytest
from PIL import Image

from phi4rv.data.formats import (
    DatasetFormatError,
    Sample,
    mark_nothink,
    mode_of,
    read_samples,
    write_jsonl,
    write_parquet,
)


def png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def test_llava_json_and_jsonl(tmp_path):
    (tmp_path / "a.png").write_bytes(png("red"))
    rec = {"id": "s1", "image": "a.png", "task": "caption",
           "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Red."}]}
    (tmp_path / "d.json").write_text(json.dumps([rec]))
    (tmp_path / "d.jsonl").write_text(json.dumps({**rec, "image": None, "images": ["a.png", "a.png"]}) + "\n")
    [s] = read_samples(tmp_path / "d.json")
    assert s.messages == [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "Red."}]
    assert s.images == [str(tmp_path / "a.png")] and s.meta == {"task": "caption"} and s.num_image_tags == 1
    [s2] = read_samples(tmp_path / "d.jsonl")
    assert len(s2.images) == 2


def test_openai_messages_with_data_uri(tmp_path):
    data = "data:image/png;base64," + base64.b64encode(png("blue")).decode()
    rec = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data}},
                                                     {"type": "text", "text": "Color?"}]},
                        {"role": "assistant", "content": "<think>look</think> Blue"}]}
    (tmp_path / "m.jsonl").write_text(json.dumps(rec) + "\n")
    [s] = read_samples(tmp_path / "m.jsonl")
    assert s.messages[0]["content"] == "<image>\nColor?" and s.images == [png("blue")]
    assert mode_of(s.answers()[0]) == "think"


def test_parquet_and_jsonl_round_trip(tmp_path):
    samples = [Sample("a", [{"role": "user", "content": "<image>\nQ"}, {"role": "assistant", "content": "A"}], [png("red")], {"task": "t"}),
               Sample("b", [{"role": "user", "content": "text only"}, {"role": "assistant", "content": "B"}])]
    write_parquet(samples, tmp_path / "x.parquet")
    assert list(read_samples(tmp_path / "x.parquet")) == samples
    assert list(read_samples(tmp_path)) == samples  # a folder of shards
    write_jsonl(samples, tmp_path / "x.jsonl")
    back = list(read_samples(tmp_path / "x.jsonl"))
    assert [s.messages for s in back] == [s.messages for s in samples]
    assert open(back[0].images[0], "rb").read() == png("red")


def test_markers_and_errors(tmp_path):
    assert mark_nothink("Blue") == "<|dummy_84|>Blue" and mark_nothink("<think>x</think>y") == "<think>x</think>y"
    assert mark_nothink(mark_nothink("Blue")) == "<|dummy_84|>Blue"
    with pytest.raises(FileNotFoundError):
        list(read_samples(tmp_path / "none.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"messages": []}\n{oops\n')
    with pytest.raises(DatasetFormatError, match="bad.jsonl:2"):
        list(read_samples(tmp_path / "bad.jsonl"))
    (tmp_path / "odd.jsonl").write_text('{"foo": 1}\n')
    with pytest.raises(DatasetFormatError, match="neither"):
        list(read_samples(tmp_path / "odd.jsonl"))
