"""Samples -> training examples: loss only on assistant text, mode markers, skip-and-count, mixtures."""

import io
import json
from collections import Counter

import pytest
from PIL import Image

from phi4rv.data.dataset import SampleEncoder, SkipSample, Source, mixture_order
from phi4rv.data.formats import Sample, read_samples, write_parquet
from phi4rv.processing.chat import DEFAULT_CHAT_TEMPLATE
from phi4rv.processing.image import ImageProcessorConfig
from phi4rv.processing.tokenizer import Tokenizer
from phi4rv.processing.tokens import IGNORE_INDEX, IMAGE_TOKEN_ID


@pytest.fixture(scope="module")
def encoder(tok_dir):
    tok = Tokenizer.from_dir(tok_dir)
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return SampleEncoder(tok, ImageProcessorConfig(min_num_patches=4, max_num_patches=64), max_len=1024)


def png(w=48, h=32, colour=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


def supervised_text(encoder, ex) -> list[str]:
    """Decoded runs of consecutive supervised target tokens."""
    runs, cur = [], []
    for t in ex.targets:
        if t == IGNORE_INDEX:
            if cur:
                runs.append(encoder.tokenizer.decode(cur))
            cur = []
        else:
            cur.append(t)
    if cur:
        runs.append(encoder.tokenizer.decode(cur))
    return runs


def test_loss_only_on_assistant_turns_with_mode_markers(encoder):
    s = Sample("a", [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "<image>\nWhat colour?"},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Sum 2 and 3?"},
        {"role": "assistant", "content": "<think>2+3=5</think> 5"},
    ], [png()])
    ex = encoder.encode(s)
    assert supervised_text(encoder, ex) == ["<|dummy_84|>Red.<|im_end|>", "<think>2+3=5</think> 5<|im_end|>"]
    assert ex.mode == "nothink"
    # images: (32x48 px -> 2x3 patches) expanded in the ids, never a target
    assert ex.grids == [(2, 3)]
    assert ex.input_ids.count(IMAGE_TOKEN_ID) == 6
    assert IMAGE_TOKEN_ID not in ex.targets
    # targets are next tokens: wherever a target is set it equals the following input id
    for i, t in enumerate(ex.targets[:-1]):
        if t != IGNORE_INDEX:
            assert t == ex.input_ids[i + 1]
    assert ex.targets[-1] == IGNORE_INDEX


def test_already_marked_answer_is_not_marked_twice(encoder):
    s = Sample("b", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<|dummy_84|>Hello"}])
    assert supervised_text(encoder, encoder.encode(s)) == ["<|dummy_84|>Hello<|im_end|>"]


def test_pixels_match_the_measured_grid(encoder):
    s = Sample("c", [{"role": "user", "content": "<image><image>"}, {"role": "assistant", "content": "two"}], [png(64, 64), png(20, 90)])
    ex = encoder.load_pixels(encoder.encode(s))
    assert [p.shape[0] for p in ex.pixels] == [h * w for h, w in ex.grids]
    assert ex.input_ids.count(IMAGE_TOKEN_ID) == sum(h * w for h, w in ex.grids)


@pytest.mark.parametrize(
    "sample, reason",
    [
        (Sample("m", [{"role": "user", "content": "<image>x"}, {"role": "assistant", "content": "y"}], ["/no/such.png"]), "missing_image"),
        (Sample("n", [{"role": "user", "content": "<image><image>x"}, {"role": "assistant", "content": "y"}], [png()]), "image_count"),
        (Sample("o", [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], [png()]), "image_count"),
        (Sample("p", [{"role": "user", "content": "word " * 2000}, {"role": "assistant", "content": "y"}]), "too_long"),
        (Sample("q", [{"role": "user", "content": "only a question"}]), "no_answer"),
        (Sample("r", [{"role": "user", "content": "<image>x"}, {"role": "assistant", "content": "y"}], [b"not an image"]), "bad_image"),
    ],
)
def test_unusable_samples_are_skipped_with_a_reason(encoder, sample, reason):
    with pytest.raises(SkipSample) as e:
        encoder.encode(sample)
    assert e.value.reason == reason


def test_measure_counts_skips_from_a_llava_file(encoder, tmp_path):
    Image.new("RGB", (40, 40), (0, 0, 255)).save(tmp_path / "ok.png")
    recs = [
        {"id": "1", "image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "blue"}]},
        {"id": "2", "image": "gone.png", "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "blue"}]},
        {"id": "3", "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "blue"}]},
        {"id": "4", "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "<think>2+2=4</think>4"}]},
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    src = Source.measure("d", list(read_samples(tmp_path / "d.jsonl")), encoder)
    assert src.usable == [0, 3]
    assert src.skipped == Counter({"missing_image": 1, "image_count": 1})
    assert src.modes == ["nothink", "nothink", "nothink", "think"]


def test_parquet_with_embedded_images_encodes_like_files(encoder, tmp_path):
    img = png(50, 30)
    (tmp_path / "a.png").write_bytes(img)
    msgs = [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "a box"}]
    write_parquet([Sample("x", msgs, [img])], tmp_path / "d.parquet")
    from_parquet = encoder.load_pixels(encoder.encode(next(read_samples(tmp_path / "d.parquet"))))
    from_file = encoder.load_pixels(encoder.encode(Sample("x", msgs, [str(tmp_path / "a.png")])))
    assert from_parquet.input_ids == from_file.input_ids and from_parquet.targets == from_file.targets
    assert (from_parquet.pixels[0] == from_file.pixels[0]).all()


def _source(name, n, think_every=0):
    modes = ["think" if think_every and i % think_every == 0 else "nothink" for i in range(n)]
    return Source(name, [None] * n, [10] * n, modes)


def test_mixture_weights_repeat_and_subsample():
    a, b = _source("a", 100), _source("b", 40)
    a.weight, b.weight = 0.5, 2.0
    order = mixture_order([a, b], seed=0, epoch=0)
    counts = Counter(k for k, _ in order)
    assert counts == {0: 50, 1: 80}
    assert Counter(i for k, i in order if k == 1) == {i: 2 for i in range(40)}
    assert len({i for k, i in order if k == 0}) == 50  # a half, without repeats
    assert order == mixture_order([a, b], seed=0, epoch=0)  # a pure function of (seed, epoch)
    assert order != mixture_order([a, b], seed=0, epoch=1)


def test_mixture_think_ratio():
    src = _source("a", 200, think_every=10)  # 10% think
    order = mixture_order([src], seed=3, epoch=0, think_ratio=0.2)
    assert len(order) == 200
    assert sum(src.modes[i] == "think" for _, i in order) == 40
    with pytest.raises(ValueError, match="think_ratio"):
        mixture_order([_source("b", 10)], seed=0, epoch=0, think_ratio=0.5)


def test_skipped_samples_never_enter_the_mixture():
    src = Source("a", [None] * 5, [10, None, 10, None, 10], ["nothink"] * 5)
    order = mixture_order([src], seed=0, epoch=0)
    assert sorted(i for _, i in order) == [0, 2, 4]
