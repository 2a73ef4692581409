"""Mixtures: target weights and think ratio, no image on both sides of the held-out split,
repeats only when asked, manifest and `data stats` figures."""

import hashlib
import io
import json
from dataclasses import replace

import pytest
from PIL import Image

from phi4rv.data.formats import Sample, read_samples, write_parquet
from phi4rv.data.mix import MixConfig, plan_mixture, split_heldout, write_mixture
from phi4rv.data.synth import GENERATORS


def make(tasks_counts, offset=0):
    out = []
    for task, n in tasks_counts:
        out += [GENERATORS[task].generate(offset + k, "tiny") for k in range(n)]
    return out


def pixel_hash(ref) -> str:
    img = Image.open(io.BytesIO(ref)).convert("RGB")
    return hashlib.md5(img.tobytes() + bytes(str(img.size), "ascii")).hexdigest()


def is_think(s) -> bool:
    return s.messages[-1]["content"].startswith("<think>")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    charts = make([("chart_value", 40), ("chart_sum", 20)])
    ui = make([("ui_ground", 30), ("ui_click_effect", 10)], offset=100)
    # samples that share images: three questions on one picture, and a two-image sample reusing two pictures
    base = ui[0]
    shared = [replace(base, id=f"shared-{k}") for k in range(3)]
    pair = Sample("pair", [{"role": "user", "content": "<image>\n<image>\nSame screen?"}, {"role": "assistant", "content": "No"}],
                  [ui[1].images[0], ui[2].images[0]], {"task": "pair"})
    write_parquet(charts, root / "charts.parquet")
    write_parquet(ui + shared + [pair], root / "ui.parquet")
    return root, charts, ui + shared + [pair]


def test_plan_by_hand():
    # 10 think + 90 nothink, and 50 + 50; equal weights, 20% think. Worked out by hand: the largest
    # mixture without repeats is 169 = 85 + 84, with the 34 think samples all from the second dataset.
    assert plan_mixture([(10, 90), (50, 50)], [1, 1], 0.2, None) == [(0, 85), (34, 50)]
    # with a total, small datasets repeat
    assert plan_mixture([(2, 8), (5, 5)], [3, 1], 0.5, 40) == [(15, 15), (5, 5)]
    assert plan_mixture([(4, 6), (0, 30)], [1, 1], None, None) == [(4, 6), (0, 10)]
    with pytest.raises(ValueError, match="think"):
        plan_mixture([(0, 50)], [1], 0.2, None)


def test_mixture_weights_ratio_and_no_leakage(datasets, tmp_path):
    root, charts, ui = datasets
    cfg = MixConfig([(str(root / "charts.parquet"), 1.0), (str(root / "ui.parquet"), 1.0)], think_ratio=0.2,
                    heldout=0.25, seed=3, shard_size=16)
    m = write_mixture(cfg, tmp_path / "out")
    train, held = list(read_samples(tmp_path / "out" / "train")), list(read_samples(tmp_path / "out" / "heldout"))
    mixed = train + held
    ids = [s.id for s in mixed]
    assert len(ids) == len(set(ids))  # no repeats without --total
    by_source = {name: sum(s.meta["mix_source"] == name for s in mixed) for name in ("charts", "ui")}
    assert abs(by_source["charts"] - by_source["ui"]) <= 1  # equal weights
    assert sum(is_think(s) for s in mixed) == round(0.2 * len(mixed))
    # as large as possible: ui holds 44 samples, so 89 = 45 charts + 44 ui (equal weights, up to rounding);
    # 18 think samples: all 10 of ui's and 8 of charts'
    assert len(mixed) == 89
    # leakage: no image on both sides, shared-image groups kept together
    train_imgs = {pixel_hash(r) for s in train for r in s.images}
    held_imgs = {pixel_hash(r) for s in held for r in s.images}
    assert not train_imgs & held_imgs
    assert 5 <= len(held) <= 40
    # manifest figures match what was written
    assert m["splits"]["train"]["samples"] == len(train) and m["splits"]["heldout"]["samples"] == len(held)
    assert sum(m["splits"]["train"]["modes"].values()) == len(train)
    assert m["splits"]["train"]["modes"].get("think", 0) == sum(is_think(s) for s in train)
    tasks = {}
    for s in train:
        tasks[s.meta["task"]] = tasks.get(s.meta["task"], 0) + 1
    assert m["splits"]["train"]["tasks"] == dict(sorted(tasks.items()))
    hist = m["splits"]["train"]["image_patches"]["histogram"]
    assert sum(hist.values()) == sum(len(s.images) for s in train)
    assert hist["1-256"] == sum(len(s.images) for s in train)  # tiny images: at most 256 patches each
    assert [d["take"] for d in m["datasets"]] == [{"think": 8, "nothink": 37}, {"think": 10, "nothink": 34}]
    assert len(list((tmp_path / "out" / "train").glob("shard-*.parquet"))) == -(-len(train) // 16)
    # deterministic
    m2 = write_mixture(cfg, tmp_path / "again")
    assert [s.id for s in read_samples(tmp_path / "again" / "train")] == [s.id for s in train]
    assert m2["splits"] == m["splits"]


def test_validation_split_shares_no_image_with_train_or_heldout(datasets, tmp_path):
    root, _, _ = datasets
    cfg = MixConfig([(str(root / "charts.parquet"), 1.0), (str(root / "ui.parquet"), 1.0)], think_ratio=0.2,
                    heldout=0.2, validation=0.2, seed=3)
    m = write_mixture(cfg, tmp_path / "out")
    splits = {name: list(read_samples(tmp_path / "out" / name)) for name in ("train", "heldout", "val")}
    pixels = {name: {pixel_hash(r) for s in samples for r in s.images} for name, samples in splits.items()}
    assert all(pixels.values())
    assert not pixels["train"] & pixels["val"] and not pixels["train"] & pixels["heldout"] and not pixels["val"] & pixels["heldout"]
    assert sum(len(x) for x in splits.values()) == 89 and m["splits"]["val"]["samples"] == len(splits["val"])
    with pytest.raises(ValueError, match="validation share"):
        write_mixture(MixConfig(cfg.datasets, heldout=0.5, validation=0.5), tmp_path / "bad")


def test_split_keeps_image_groups_together():
    img = [Image.new("RGB", (20, 20), (k * 20, 0, 0)) for k in range(12)]
    pngs = []
    for im in img:
        b = io.BytesIO()
        im.save(b, format="PNG")
        pngs.append(b.getvalue())
    jpeg = io.BytesIO()
    img[0].save(jpeg, format="PNG", compress_level=1)  # same pixels, different bytes
    msgs = [{"role": "user", "content": "<image>\nQ"}, {"role": "assistant", "content": "A"}]
    two = [{"role": "user", "content": "<image>\n<image>\nQ"}, {"role": "assistant", "content": "A"}]
    # a chain: 0-1 share image 0 (re-encoded), 1-2 share image 1 through a two-image sample, ...
    samples = [Sample("a", msgs, [pngs[0]]), Sample("b", two, [jpeg.getvalue(), pngs[1]]), Sample("c", two, [pngs[1], pngs[2]]),
               Sample("d", msgs, [pngs[2]])] + [Sample(f"x{k}", msgs, [pngs[k]]) for k in range(3, 12)]
    for seed in range(20):
        train, held = split_heldout(samples, 0.5, seed)
        chain = {"a", "b", "c", "d"}
        assert chain <= {s.id for s in train} or chain <= {s.id for s in held}
        assert len(train) + len(held) == len(samples)


def test_total_repeats_small_datasets(datasets, tmp_path):
    root, _, _ = datasets
    cfg = MixConfig([(str(root / "charts.parquet"), 3.0), (str(root / "ui.parquet"), 1.0)], think_ratio=0.5,
                    heldout=0.0, total=200, seed=0)
    m = write_mixture(cfg, tmp_path / "out")
    train = list(read_samples(tmp_path / "out" / "train"))
    assert len(train) == 200 and len({s.id for s in train}) == 200
    assert sum(s.meta["mix_source"] == "charts" for s in train) == 150
    assert sum(is_think(s) for s in train) == 100
    assert m["datasets"][0]["repeated"] > 0 and m["splits"]["heldout"]["samples"] == 0


def test_cli_mix_and_stats(datasets, tmp_path, capsys):
    from phi4rv.cli import main

    root, _, _ = datasets
    out = tmp_path / "mix"
    assert main(["data", "mix", "--dataset", f"{root / 'charts.parquet'}:2", "--dataset", str(root / "ui.parquet"),
                 "--think-ratio", "0.2", "--heldout", "0.1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "== train" in printed and "chart_value" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert main(["data", "stats", str(out / "train"), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in stats.items()} == {k: v for k, v in manifest["splits"]["train"].items() if k != "shards"}
    assert main(["data", "stats", str(out / "heldout")]) == 0
    assert "think ratio" in capsys.readouterr().out
    assert main(["data", "mix", "--dataset", str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "x")]) == 1
    assert main(["data", "mix", "--dataset", f"{root / 'charts.parquet'}:0", "--out", str(tmp_path / "x")]) == 1
