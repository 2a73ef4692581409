"""Checkpoint I/O in the release format, checked against transformers' own loaders."""

import json
import os
import subprocess
import sys

import pytest
import torch
from hf_reference import hf_phi3, hf_siglip2
from safetensors.torch import load_file, save_file
from transformers import Siglip2VisionConfig, Siglip2VisionModel

from phi4rv.checkpoint import VISION_PREFIX, CheckpointError, load_model, save_checkpoint
from phi4rv.config import preset
from phi4rv.model import Phi4RV


def tiny_model(seed=0) -> Phi4RV:
    cfg = preset("tiny")
    cfg.decoder.vocab_size = 512
    torch.manual_seed(seed)
    model = Phi4RV(cfg)
    model.init_weights()
    return model.eval()


def all_tensors(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for f in sorted(set(index["weight_map"].values())):
        out.update(load_file(folder / f))
    assert set(out) == set(index["weight_map"])
    return out


def test_save_writes_release_layout_and_loads_back(tmp_path):
    model = tiny_model()
    out = save_checkpoint(model, tmp_path / "ckpt", max_shard_bytes=200_000)
    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for name in ("config.json", "generation_config.json", "preprocessor_config.json", "model.safetensors.index.json"):
        assert name in files
    keys = set(all_tensors(out))
    assert "lm_head.weight" in keys and "model.embed_tokens.weight" in keys
    assert "model.mm_projector.0.weight" in keys and "model.mm_projector.2.bias" in keys
    assert VISION_PREFIX + "embeddings.position_embedding.weight" in keys
    assert "model.layers.1.self_attn.qkv_proj.weight" in keys and "model.layers.0.mlp.gate_up_proj.weight" in keys
    again = load_model(out)
    saved, loaded = model.state_dict(), again.state_dict()
    assert list(loaded) == list(saved)  # no key missing, none extra, the same order
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name


def test_save_is_atomic_and_replaces(tmp_path):
    model = tiny_model()
    save_checkpoint(model, tmp_path / "ckpt")
    before = all_tensors(tmp_path / "ckpt")

    class Boom(Exception):
        pass

    def explode(*a, **k):
        raise Boom

    import phi4rv.checkpoint as ck

    orig = ck.save_file
    ck.save_file = explode
    try:
        with pytest.raises(Boom):
            save_checkpoint(tiny_model(1), tmp_path / "ckpt")
    finally:
        ck.save_file = orig
    after = all_tensors(tmp_path / "ckpt")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp folders left
    save_checkpoint(tiny_model(1), tmp_path / "ckpt")
    assert not torch.equal(all_tensors(tmp_path / "ckpt")["lm_head.weight"], before["lm_head.weight"])


def test_phi4rv_checkpoint_loads_into_transformers_classes(tmp_path):
    model = tiny_model()
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    tensors = all_tensors(ckpt)
    cfg = model.cfg
    # LM keys -> Phi3ForCausalLM, strictly
    lm = {k: v for k, v in tensors.items() if not k.startswith(("model.vision_tower.", "model.mm_projector."))}
    hf_lm = hf_phi3(cfg.decoder)
    result = hf_lm.load_state_dict(lm, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # vision keys -> Siglip2VisionModel.from_pretrained, which reads the `vision_model.` layout
    vis_dir = tmp_path / "siglip"
    vis_dir.mkdir()
    vision = {k.removeprefix("model.vision_tower.vision_tower."): v for k, v in tensors.items() if k.startswith("model.vision_tower.")}
    save_file(vision, vis_dir / "model.safetensors", metadata={"format": "pt"})
    v = cfg.vision
    Siglip2VisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                        num_attention_heads=v.num_attention_heads, num_hidden_layers=v.num_hidden_layers,
                        patch_size=v.patch_size, num_patches=v.num_patches, vision_use_head=False).save_pretrained(vis_dir)
    hf_vis, info = Siglip2VisionModel.from_pretrained(vis_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for k, t in hf_vis.state_dict().items():
        assert torch.equal(t, tensors[VISION_PREFIX + k])
    ids = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        ours = model(ids)
        assert (hf_lm(input_ids=ids).logits - ours).abs().max() < 1e-5


def release_folder(tmp_path, seed=0):
    """A checkpoint assembled from transformers' classes in the release's layout (with the unused head)."""
    cfg = preset("tiny")
    cfg.decoder.vocab_size = 512
    lm, vis = hf_phi3(cfg.decoder, seed), hf_siglip2(cfg.vision, seed)
    proj = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    tensors = dict(lm.state_dict())
    tensors.update({VISION_PREFIX + k: t for k, t in vis.state_dict().items()})
    tensors.update({f"model.mm_projector.{k}": t for k, t in proj.state_dict().items()})
    folder = tmp_path / "release"
    folder.mkdir()
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, chunk in enumerate([names[:half], names[half:]], 1):
        fname = f"model-{i:05d}-of-00002.safetensors"
        save_file({k: tensors[k].contiguous() for k in chunk}, folder / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in chunk})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save(folder)
    return folder, lm, vis, proj


def test_release_layout_from_transformers_loads_and_matches(tmp_path):
    folder, lm, vis, proj = release_folder(tmp_path)
    assert any(k.startswith(VISION_PREFIX + "head.") for k in json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"])
    model = load_model(folder)
    # one image of 5x7 patches inside a prompt: reference = HF vision hidden_states[-2] -> projector -> Phi3 embeds
    grid = (5, 7)
    pixels = torch.rand(35, 768) * 2 - 1
    ids = torch.tensor([[3, 4] + [-200] * 35 + [5, 6, 7]])
    with torch.no_grad():
        hs = vis(pixel_values=pixels[None], pixel_attention_mask=torch.ones(1, 35, dtype=torch.long),
                 spatial_shapes=torch.tensor([grid]), output_hidden_states=True).hidden_states[-2][0]
        embeds = lm.model.embed_tokens(ids.clamp(min=0))
        embeds[0, 2:37] = proj(hs)
        ref = lm(inputs_embeds=embeds).logits
        got = model(ids, pixels, [grid])
    assert (got - ref).abs().max() < 1e-5


def test_load_dtype_choice(tmp_path):
    folder, *_ = release_folder(tmp_path)
    model = load_model(folder, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope")
    folder = save_checkpoint(tiny_model(), tmp_path / "ckpt")
    # wrong shapes: config says a wider decoder than the weights
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(CheckpointError, match="shape"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps(cfg))
    # corrupt weights
    shard = next(folder.glob("model-*.safetensors"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError):
        load_model(folder)
    # missing shard listed in the index
    shard.unlink()
    with pytest.raises(CheckpointError, match="missing weight files"):
        load_model(folder)
    # pickled weights only: refused, never unpickled
    (folder / "model.safetensors.index.json").unlink()
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled"):
        load_model(folder)


def test_missing_and_unexpected_keys_are_reported(tmp_path):
    folder = save_checkpoint(tiny_model(), tmp_path / "ckpt")
    shard = next(folder.glob("model-*.safetensors"))
    tensors = load_file(shard)
    del tensors["model.norm.weight"]
    tensors["model.extra.weight"] = torch.zeros(2)
    save_file(tensors, shard)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    with pytest.raises(CheckpointError, match="unexpected weights: model.extra.weight"):
        load_model(folder)
    del tensors["model.extra.weight"]
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match="missing weights: model.norm.weight"):
        load_model(folder)
    assert index


PEAK_SCRIPT = """
import resource, sys, torch
from phi4rv.checkpoint import load_model
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model = load_model(sys.argv[1])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(before, after, weights)
"""


def test_loading_peak_memory_stays_near_weight_size(tmp_path):
    cfg = preset("tiny")
    cfg.decoder.num_hidden_layers = 8
    cfg.decoder.hidden_size = 512
    cfg.decoder.intermediate_size = 2048
    torch.manual_seed(0)
    model = Phi4RV(cfg)
    folder = save_checkpoint(model, tmp_path / "big", max_shard_bytes=100_000_000)
    del model
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(folder)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    before, after, weights = map(int, out.stdout.split())
    assert weights > 300e6
    assert after - before < 1.35 * weights, (after - before) / weights
