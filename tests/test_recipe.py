"""The tiny end-to-end recipe: its world, its stage-0 parts and the whole run at test size."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from phi4rv.data.curate import CurateConfig, curate
from phi4rv.data.formats import read_samples, write_parquet
from phi4rv.data.synth import GENERATORS, with_knobs
from phi4rv.data.synth.cards import PLACES
from phi4rv.processing.image import ImageProcessorConfig, load_image, process_image
from phi4rv.recipe import data as world
from phi4rv.recipe.presets import get_preset

GRID = with_knobs("tiny", width=(96, 128), height=(32, 48), font_size=(11, 12), elements=(2, 3), grid=16)


def test_cards_are_drawn_as_the_scene_says():
    for seed in range(20):
        s = GENERATORS["card_sum"].generate(seed, GRID)
        img = np.asarray(load_image(s.images[0]))
        scene = s.meta["scene"]
        digits = []
        for card in scene["cards"]:
            x1, y1, x2, y2 = card["box"]
            assert x1 % 16 == y1 % 16 == 0 and x2 - x1 == 16  # one card per 16 px patch
            patch = img[y1:y2, x1:x2].reshape(-1, 3)
            colours, counts = np.unique(patch, axis=0, return_counts=True)
            assert tuple(colours[counts.argmax()]) == (255, 255, 255)  # a white face
            assert (patch.max(axis=1) <= 100).sum() >= 6  # a dark (anti-aliased) glyph on it
            digits.append(card["digit"])
        assert [c["place"] for c in scene["cards"]] == list(PLACES[: len(scene["cards"])])
        xs = [c["box"][0] for c in scene["cards"]]
        assert xs == sorted(xs) and len(set(digits)) == len(digits)
        assert len({c["box"][1] for c in scene["cards"]}) == 1  # one row
        assert s.meta["answer"] == str(sum(digits))
        assert s.meta["reading"] == ", ".join(f"{p} {d}" for p, d in zip(PLACES, digits))
        # with the recipe's budget the image is not resized, so patches and cards line up
        assert process_image(s.images[0], ImageProcessorConfig(min_num_patches=4, max_num_patches=64)).grid == (
            img.shape[0] // 16, img.shape[1] // 16)


def test_product_and_questions_match_the_scene():
    for seed in range(20):
        s = GENERATORS["card_product"].generate(seed, GRID)
        cards = {c["place"]: c["digit"] for c in s.meta["scene"]["cards"]}
        question = s.messages[0]["content"]
        a, b = [p for p in PLACES if f"the {p} number" in question]  # in the order asked
        a, b = sorted((a, b), key=question.index)
        assert s.meta["answer"] == str(cards[a] * cards[b])
        assert s.messages[1]["content"].endswith(f"{cards[a]}*{cards[b]}={cards[a] * cards[b]}\n</think>\n\n{s.meta['answer']}")


def test_reasoning_text_traces_are_right():
    for s in world.reasoning_text(200, 3):
        answer = s.messages[1]["content"]
        trace = answer.split("</think>")[0]
        for a, op, b, c in re.findall(r"(\d+)([+*])(\d+)=(\d+)", trace):
            assert int(c) == (int(a) + int(b) if op == "+" else int(a) * int(b))
        assert answer.endswith("\n\n" + s.meta["answer"])


def test_as_mode_switches_between_think_and_direct_answers():
    direct = GENERATORS["card_digit"].generate(1, GRID)
    think = world.as_mode(direct, "think")
    assert think.messages[-1]["content"] == f"<think>\n{direct.meta['reading']}\n</think>\n\n{direct.meta['answer']}"
    reasoning = GENERATORS["card_sum"].generate(1, GRID)
    assert world.as_mode(reasoning, "nothink").messages[-1]["content"] == reasoning.meta["answer"]
    assert world.as_mode(reasoning, "think") == reasoning


def test_curation_removes_every_planted_defect(tmp_path):
    rng = random.Random(0)
    clean = [GENERATORS[t].generate(k, GRID) for k in range(30) for t in ("card_digit", "card_place", "card_sum")]
    broken = {s.id for s in clean if rng.random() < 0.3}
    mixed = [world.plant_defect(s, rng) if s.id in broken else s for s in clean]
    assert sum(a.messages != b.messages for a, b in zip(mixed, clean)) == len(broken)
    write_parquet(mixed, tmp_path / "in.parquet")
    curate([tmp_path / "in.parquet"], CurateConfig(near_duplicate_bits=-1), tmp_path / "out")
    kept = {s.id for s in read_samples(tmp_path / "out")}
    assert kept == {s.id for s in clean} - broken


def test_bpe_tokenizer_learns_numbers_and_keeps_phi4_specials(tmp_path):
    from phi4rv.processing.byte_tokenizer import build_byte_tokenizer
    from phi4rv.processing.tokenizer import Tokenizer
    from phi4rv.train.toy import TOY_TEMPLATE

    corpus = [m["content"] for s in world.reasoning_text(300, 0) for m in s.messages]
    build_byte_tokenizer(tmp_path, TOY_TEMPLATE, corpus=corpus, vocab_size=400)
    tok = Tokenizer.from_dir(tmp_path)
    for text in ("What is 7*8?", "red 4, blue 7\n4+7=11", "naïve ünïcode ✓ not in the corpus"):
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("56")) == 1 and len(tok.encode("4+7=11")) == 5
    assert tok.token_id("<|im_end|>") >= 256 and tok.eos_id == tok.token_id("<|im_end|>")


def test_sigmoid_loss_matches_its_definition():
    from phi4rv.config import VisionConfig
    from phi4rv.recipe.contrastive import SigLIP

    torch.manual_seed(0)
    vision = VisionConfig(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2)
    model = SigLIP(vision, ["red", "blue", "1", "2"])
    pairs = [(GENERATORS["card_digit"].generate(k, GRID).images[0], c) for k, c in enumerate(["red 1", "blue 2", "red 2"])]
    cfg = ImageProcessorConfig(min_num_patches=4, max_num_patches=64)
    patches = [process_image(png, cfg) for png, _ in pairs]
    captions = [c for _, c in pairs]
    img, txt = model.embed_images(patches), model.embed_texts(captions)
    t, b = model.logit_scale.exp().item(), model.logit_bias.item()
    expected = 0.0
    for i in range(3):
        for j in range(3):
            z = 1 if i == j else -1
            expected -= math.log(1 / (1 + math.exp(-z * (t * float((img[i] @ txt[j]).detach()) + b))))
    assert model.loss(patches, captions).item() == pytest.approx(expected / 3, rel=1e-5)


def test_contrastive_pretraining_makes_features_that_find_their_captions():
    from phi4rv.config import VisionConfig
    from phi4rv.recipe.contrastive import ContrastiveConfig, pretrain_vision

    vision = VisionConfig(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2)
    d = with_knobs(GRID, elements=(2, 2), width=(64, 64), height=(32, 32))
    pairs = list(world.caption_pairs(600, 0, d))
    heldout = list(world.caption_pairs(64, 1, d))
    state, info = pretrain_vision(vision, pairs, heldout, ImageProcessorConfig(min_num_patches=4, max_num_patches=64),
                                  ContrastiveConfig(steps=200, batch=64), progress=False)
    assert info["retrieval_after"] >= info["retrieval_before"] + 0.5
    assert set(state) == {k for k in state if not k.startswith(("pool.", "text."))}  # only the encoder's weights


def _pixels(png: bytes) -> str:
    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    return hashlib.sha1(str(a.shape).encode() + a.tobytes()).hexdigest()


def _prompt(s) -> str:
    return " ".join(m["content"] for m in s.messages if m["role"] == "user").strip()


def test_registered_evaluation_sets_are_drawn_around():
    from phi4rv.recipe.heldout import HeldOut

    d = get_preset("tiny").difficulty()
    # the card world is small: the same seed draws the same images, an independent one many of them
    held = world.alignment_samples(300, 7, d)
    registry = HeldOut().add(held)
    again = world.alignment_samples(300, 7, d, leaks=registry.holds_image)
    assert len(again) == 300 and not {_pixels(s.images[0]) for s in again} & {_pixels(s.images[0]) for s in held}
    text_held = world.reasoning_text(200, 2)
    unguarded = world.reasoning_text(2000, 1)
    assert {_prompt(s) for s in unguarded} & {_prompt(s) for s in text_held}  # without the registry they meet
    guarded = world.reasoning_text(2000, 1, leaks=HeldOut().add(text_held).holds)
    assert len(guarded) == 2000 and not {_prompt(s) for s in guarded} & {_prompt(s) for s in text_held}
    pair = world.stage3_samples(50, 4, d)
    registry = HeldOut().add(s for s in pair if s.images)
    assert all(not registry.holds(s) for s in world.stage3_samples(50, 4, d, leaks=registry.holds))


@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory):
    from phi4rv.recipe.run import run_recipe

    root = tmp_path_factory.mktemp("recipe")
    preset = get_preset("test")
    first = run_recipe(root / "a", preset, seed=0)
    second = run_recipe(root / "b", preset, seed=0)
    return root, first, second


def _metrics(results: dict) -> dict:
    results = copy.deepcopy(results)
    out = {k: {kk: vv for kk, vv in v.items() if kk not in ("seconds", "cpu_seconds") and "checkpoint" not in kk
               and kk not in ("path", "model")}
           for k, v in results.items() if k not in ("report",)}
    for mode in ("auto", "think", "nothink"):  # times differ from run to run; accuracy and tokens must not
        for row in out["eval"][mode].values():
            row.pop("seconds")
    out["stages"] = {k: v["steps"] for k, v in out["stages"]["stages"].items()}
    return out


def test_no_training_stage_holds_a_held_out_image_or_prompt(recipe_runs):
    root, _, _ = recipe_runs
    run = root / "a"
    trained_on = {run / "data" / "captions"}  # stage 0 vision reads its pairs from here
    for config in (run / "stage0_decoder" / "config.yaml", run / "stages" / "config.yaml"):
        for st in yaml.safe_load(config.read_text())["stages"].values():
            trained_on |= {Path(d["path"]) for d in st["data"]["datasets"]}
    assert {p.relative_to(run / "data").as_posix() for p in trained_on} == {"text", "captions", "align", "mix/train", "stage3"}
    evaluated = [run / "data" / name for name in ("mix/heldout", "mix/val", "text_heldout", "captions_heldout")]
    held_pixels, held_prompts = set(), set()
    for folder in evaluated:
        for s in read_samples(folder):
            held_pixels |= {_pixels(png) for png in s.images}
            if not s.images:
                held_prompts.add(_prompt(s))
    assert held_pixels and held_prompts
    for folder in sorted(trained_on):
        samples = list(read_samples(folder))
        assert samples, folder
        assert not {_pixels(png) for s in samples for png in s.images} & held_pixels, folder
        assert not {_prompt(s) for s in samples if not s.images} & held_prompts, folder
    # the reported split and the validation split are apart too
    val = {_pixels(png) for s in read_samples(run / "data" / "mix" / "val") for png in s.images}
    assert val and not val & {_pixels(png) for s in read_samples(run / "data" / "mix" / "heldout") for png in s.images}


def test_same_seed_gives_the_same_metrics(recipe_runs):
    root, first, second = recipe_runs
    assert _metrics(first) == _metrics(second)
    for mode in ("auto", "think", "nothink"):
        a = (root / "a" / "eval" / "synthetic" / f"{mode}.jsonl").read_text().splitlines()
        b = (root / "b" / "eval" / "synthetic" / f"{mode}.jsonl").read_text().splitlines()
        assert [json.loads(x)["output"] for x in a] == [json.loads(x)["output"] for x in b]


def test_recipe_writes_a_report_and_a_model_chat_can_use(recipe_runs):
    root, first, _ = recipe_runs
    run = root / "a"
    report = (run / "REPORT.md").read_text()
    for section in ("## Steps", "## Targets", "## Modes", "## Training", "## Chat", "## The final model"):
        assert section in report
    for step in ("tokenizer", "data", "stage0_decoder", "stage0_vision", "stages", "eval"):
        assert f"| {step} |" in report
    assert (run / "eval" / "report" / "pareto_synthetic.png").is_file()
    assert first["eval"]["think"]["all"]["think_share"] == 100 and first["eval"]["nothink"]["all"]["think_share"] == 0
    held = next(iter(read_samples(run / "data" / "mix" / "heldout")))
    image = run / "q.png"
    image.write_bytes(held.images[0])
    out = subprocess.run([sys.executable, "-m", "phi4rv", "chat", "--model", str(run / "model"), "--image", str(image),
                          "--temperature", "0", "--max-new-tokens", "8", "--json", "How many cards are there?"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["usage"]["completion_tokens"] >= 1


def test_final_model_has_the_release_files(recipe_runs):
    from release_files import layout_differences

    root, _, _ = recipe_runs
    assert layout_differences(root / "a" / "model") == []


def test_stage_2_learns_what_the_validation_split_asks(recipe_runs):
    """At the test preset (seconds of training) no answer is right more often than chance, so the
    claim checked is the step before: on the validation split (no image shared with training),
    stage 2 raises the share of answer tokens predicted right well above what stage 1 left (same
    samples, same tokens) and far above chance (one in the vocabulary)."""
    root, _, _ = recipe_runs

    def last_eval(stage):
        lines = (root / "a" / "stages" / stage / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x) for x in lines if "eval/token_acc" in x][-1]["eval/token_acc"]

    before, after = last_eval("alignment"), last_eval("instruction")
    vocab = json.loads((root / "a" / "steps" / "tokenizer.json").read_text())["vocab_size"]
    assert after >= before + 0.03 and after >= 20 / vocab, (before, after)


def test_seed_table_lists_each_seed_and_the_spread(recipe_runs, tmp_path):
    from phi4rv.recipe.report import write_seed_table

    _, first, second = recipe_runs
    text = write_seed_table(tmp_path, get_preset("test"), {0: first, 7: second}).read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert {"0", "7", "min", "max", "mean", "spread (max - min)"} <= set(rows)
    perception = f"{first['eval']['nothink']['perception']['accuracy']:.1f}"
    assert rows["0"].split("|")[4].strip() == perception
    assert set(rows["spread (max - min)"].split("|")[4:11]) == {" 0.0 "}  # one seed twice: no spread but in times


def test_rerun_skips_finished_steps(recipe_runs, capsys):
    from phi4rv.recipe.run import run_recipe

    root, first, _ = recipe_runs
    again = run_recipe(root / "a", get_preset("test"), seed=0)
    assert again["eval"] == first["eval"]
    assert capsys.readouterr().out.count("done before") == 7
    with pytest.raises(ValueError, match="other settings"):
        run_recipe(root / "a", get_preset("test"), seed=1)


def test_ablate_runs_the_three_lessons_on_one_held_out_split(recipe_runs, capsys):
    from phi4rv.checkpoint import load_model
    from phi4rv.recipe.ablate import ARMS, run_ablations

    root, _, _ = recipe_runs
    preset = get_preset("test")
    arms = run_ablations(root / "a", preset, seed=0)
    assert set(arms) == set(ARMS)
    report = (root / "a" / "ABLATIONS.md").read_text()
    for section in ("## 1. Native resolution", "## 2. Curated vs uncurated", "## 3. Think ratio"):
        assert section in report
    assert (root / "a" / "ablations.png").is_file()

    # resolution: the low arm's model really sees fewer patches of the same image
    held = next(iter(read_samples(root / "a" / "data" / "mix" / "heldout")))
    grids = {arm: process_image(held.images[0], ImageProcessorConfig.from_model(load_model(arms[arm]["model"]).cfg)).grid
             for arm in ("reference", "low_res")}
    assert math.prod(grids["low_res"]) <= preset.ablate_low_patches < math.prod(grids["reference"])

    # curation: the uncurated arm trains on exactly the planted wrong answers, the curated arm on none
    reference = {s.id: s for s in read_samples(root / "a" / "data" / "mix" / "train")}
    uncurated = list(read_samples(root / "a" / "ablate" / "data" / "uncurated"))
    changed = [s for s in uncurated if s.messages[-1]["content"] != reference[s.id].messages[-1]["content"]]
    assert len(changed) == arms["uncurated"]["planted"] > 0
    assert all(not s.messages[-1]["content"].endswith(s.meta["answer"]) for s in changed)
    curated = {s.id for s in read_samples(root / "a" / "ablate" / "data" / "curated")}
    assert curated == set(reference) - {s.id for s in changed}
    assert arms["curated"]["steps"] == arms["reference"]["steps"]  # same compute on less data

    # think ratio: 0, the recipe's 0.2, 1
    assert (arms["think_0"]["think_ratio"], arms["think_1"]["think_ratio"]) == (0, 1)
    assert abs(arms["reference"]["think_ratio"] - preset.think_ratio) < 0.05

    # every arm is scored on the same questions
    ids = {arm: sorted(json.loads(x)["id"] for x in (root / "a" / "ablate" / arm / "eval" / "synthetic" / "auto.jsonl")
                       .read_text().splitlines()) for arm in ARMS}
    assert all(v == ids["reference"] for v in ids.values())

    capsys.readouterr()
    run_ablations(root / "a", preset, seed=0)
    assert capsys.readouterr().out.count("done before") == 7 + len(ARMS)
