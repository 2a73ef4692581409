"""LoRA: merged = unmerged outputs, release-format export, adapter-only training with exact resume."""

from pathlib import Path

import pytest
import torch
from release_files import layout_differences

from phi4rv.checkpoint import load_model, save_checkpoint
from phi4rv.config import preset
from phi4rv.lora import LoRALinear, apply_lora, export_merged, merge_lora
from phi4rv.model import Phi4RV
from phi4rv.processing.byte_tokenizer import build_byte_tokenizer
from phi4rv.processing.tokenizer import Tokenizer
from phi4rv.processing.tokens import IMAGE_TOKEN_ID, expand_image_tokens
from phi4rv.train import loop
from phi4rv.train.config import load_config
from phi4rv.train.metrics import read_metrics
from phi4rv.train.setup import apply_overrides
from phi4rv.train.toy import TINY_OVERRIDES, TOY_TEMPLATE, toy_config, write_toy


def tiny(vocab=352) -> Phi4RV:
    cfg = apply_overrides(preset("tiny"), TINY_OVERRIDES)
    cfg.decoder.vocab_size = vocab
    torch.manual_seed(0)
    m = Phi4RV(cfg)
    m.init_weights(std=0.1)
    return m.eval()


def inputs():
    g = torch.Generator().manual_seed(1)
    grids = [(2, 3), (4, 4)]
    ids = expand_image_tokens([5, IMAGE_TOKEN_ID, 7, 8, IMAGE_TOKEN_ID, 9, 10], grids)
    pixels = torch.rand(sum(h * w for h, w in grids), 768, generator=g) * 2 - 1
    return dict(input_ids=torch.tensor([ids]), pixels=pixels, grids=grids)


def randomise_adapters(model):
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


def test_fresh_adapters_change_nothing_and_names_are_kept():
    model = tiny()
    before = model(**inputs())
    names = set(model.state_dict())
    adapted = apply_lora(model, rank=4, alpha=8, vision_targets=("q_proj", "fc1"))
    assert "decoder.layers.0.self_attn.qkv_proj" in adapted and "vision.encoder.layers.0.mlp.fc1" in adapted
    assert not any(n.startswith("vision.encoder.layers.1.") for n in adapted)  # the unused last layer
    assert torch.equal(model(**inputs()), before)  # B starts at zero
    assert {n for n in model.state_dict() if "lora_" not in n} == names


def test_merged_outputs_equal_unmerged():
    model = tiny()
    apply_lora(model, rank=4, alpha=8, vision_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"))
    randomise_adapters(model)
    base = tiny()(**inputs())
    with torch.no_grad():
        unmerged = model(**inputs())
        assert (unmerged - base).abs().max() > 1e-3  # the adapters matter
        merge_lora(model)
        merged = model(**inputs())
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert (merged - unmerged).abs().max() < 1e-5


def test_export_merged_is_a_release_checkpoint(tmp_path):
    model = tiny()
    apply_lora(model, rank=4, alpha=8)
    randomise_adapters(model)
    with torch.no_grad():
        expected = model(**inputs())
    tokenizer = Tokenizer.from_dir(build_byte_tokenizer(tmp_path / "tok", TOY_TEMPLATE))
    export_merged(model, tmp_path / "merged", tokenizer=tokenizer)
    assert any(isinstance(m, LoRALinear) for m in model.modules())  # the training model is untouched
    loaded = load_model(tmp_path / "merged")  # strict: no lora keys, nothing missing
    with torch.no_grad():
        assert (loaded(**inputs()) - expected).abs().max() < 1e-5
    assert layout_differences(tmp_path / "merged") == []  # the release's files around the weights


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_streamed_export_writes_what_export_merged_writes(tmp_path, dtype):
    """The trainer's export (one gathered tensor at a time, written straight into the shards) gives
    the files `export_merged` writes from the whole merged state dict: shard names, index, tensors."""
    import json

    from phi4rv.train.checkpointing import export_release
    from phi4rv.train.distributed import Dist

    model = tiny()
    apply_lora(model, rank=4, alpha=8, vision_targets=("q_proj", "fc1"))
    randomise_adapters(model)
    tokenizer = Tokenizer.from_dir(build_byte_tokenizer(tmp_path / "tok", TOY_TEMPLATE))
    export_merged(model, tmp_path / "whole", tokenizer=tokenizer, dtype=dtype)
    export_release(model, tmp_path / "streamed", tokenizer, Dist(), lora=True, dtype=dtype)
    index = lambda p: json.loads((p / "model.safetensors.index.json").read_text())  # noqa: E731
    assert index(tmp_path / "streamed") == index(tmp_path / "whole")
    assert (tmp_path / "streamed" / "config.json").read_text() == (tmp_path / "whole" / "config.json").read_text()
    a, b = load_model(tmp_path / "streamed").state_dict(), load_model(tmp_path / "whole").state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)

    # several shards: split where save_weights splits
    from phi4rv.checkpoint import save_weights
    from phi4rv.lora import StateView, lora_scales, merge_state_dict
    from phi4rv.train.checkpointing import write_gathered_weights

    for d in ("many-whole", "many-streamed"):
        (tmp_path / d).mkdir()
    save_weights(StateView(model.cfg, merge_state_dict(model.state_dict(), lora_scales(model))), tmp_path / "many-whole",
                 max_shard_bytes=20_000, dtype=dtype)
    write_gathered_weights(model, tmp_path / "many-streamed", lora=True, dtype=dtype, max_shard_bytes=20_000)
    assert len(list((tmp_path / "many-whole").glob("*.safetensors"))) > 3
    assert index(tmp_path / "many-streamed") == index(tmp_path / "many-whole")


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    toy = write_toy(root / "toy", n_train=96, n_test=8)
    tok = Tokenizer.from_dir(build_byte_tokenizer(root / "tok", TOY_TEMPLATE))
    base = save_checkpoint(tiny(), root / "base", tokenizer=tok)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield root, toy, base
    torch.set_num_threads(threads)


def lora_cfg(run_dir: Path, toy: Path, base: Path) -> dict:
    cfg = toy_config(run_dir, toy, steps=8, train={"lora": 5e-3, "projector": 1e-3})
    cfg["model"] = {"checkpoint": str(base)}
    cfg["lora"] = {"rank": 4, "alpha": 8, "dropout": 0.1}  # dropout: resume must restore the RNG
    cfg["checkpoint"] = {"every": 4}
    return cfg


def test_lora_stage_trains_adapters_only_and_resumes_exactly(lora_setup, tmp_path, monkeypatch):
    root, toy, base = lora_setup
    ref = loop.run(load_config(None, base=lora_cfg(tmp_path / "ref", toy, base)))["toy"]
    b, f = load_model(base).state_dict(), load_model(ref).state_dict()
    changed = {k for k in b if not torch.equal(b[k], f[k])}
    assert changed and all(k.startswith("projector.") or k.endswith(("qkv_proj.weight", "o_proj.weight", "gate_up_proj.weight", "down_proj.weight")) for k in changed)
    assert any(k.startswith("decoder.layers.") for k in changed)  # merged adapters

    calls = {"n": 0}
    real = loop.clip_grad_norm

    def crash_at_step_6(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("simulated crash")
        return real(*a, **kw)

    cfg = load_config(None, base=lora_cfg(tmp_path / "run", toy, base))
    monkeypatch.setattr(loop, "clip_grad_norm", crash_at_step_6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop.run(cfg)
    monkeypatch.undo()
    resumed = loop.run(cfg, resume=True)["toy"]
    trace = lambda p: [(r["step"], r["train/loss"]) for r in read_metrics(p.parent / "metrics.jsonl") if "train/loss" in r]  # noqa: E731
    assert trace(resumed) == trace(ref) and len(trace(ref)) == 8
    r, f = load_model(resumed).state_dict(), load_model(ref).state_dict()
    assert all(torch.equal(r[k], f[k]) for k in f)
