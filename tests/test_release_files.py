"""What phi4rv saves around the weights equals the release's files, field by field (issue 21)."""

import json

import pytest
import torch
from release_files import FILES, FIXTURES, differences, layout_differences, release_file

from phi4rv.checkpoint import load_model, save_checkpoint, write_metadata
from phi4rv.config import Phi4RVConfig, preset
from phi4rv.processing.tokenizer import Tokenizer

REFERENCE = FIXTURES.parent.parent.parent / "shared" / "reference"


def test_fixtures_are_the_release_files():
    if not REFERENCE.is_dir():
        pytest.skip(f"{REFERENCE} (the release's files) is not in this checkout")
    for name in FILES[:3]:
        assert json.loads((FIXTURES / name).read_text()) == json.loads((REFERENCE / name).read_text()), name


def test_15b_preset_saves_the_release_files(tok_dir, tmp_path):
    """The files save_checkpoint writes for the 15B preset (its weights left out: 30 GB), in bf16
    as the release ships, with the release's tokenizer. No allow-list: nothing may differ."""
    cfg = preset("phi4rv-15b")
    write_metadata(cfg, tmp_path, Tokenizer.from_dir(tok_dir), dtype=torch.bfloat16)
    for name in FILES:
        ours = json.loads((tmp_path / name).read_text())
        assert differences(ours, release_file(name)) == [], name


def test_a_small_checkpoint_has_the_release_layout(tiny_ckpt):
    assert layout_differences(tiny_ckpt) == []
    config = json.loads((tiny_ckpt / "config.json").read_text())
    assert config["original_max_position_embeddings"] == config["max_position_embeddings"] == 4096
    assert config["dtype"] == "float32"  # what the weights were saved in
    assert json.loads((tiny_ckpt / "generation_config.json").read_text())["eos_token_id"] == [100265]


def test_the_check_catches_what_issue_21_found(tiny_ckpt, tmp_path):
    import shutil

    bad = shutil.copytree(tiny_ckpt, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["original_max_position_embeddings"] = None
    (bad / "config.json").write_text(json.dumps(config))
    tok = json.loads((bad / "tokenizer_config.json").read_text())
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    (bad / "tokenizer_config.json").write_text(json.dumps(tok))
    found = layout_differences(bad)
    assert any("original_max_position_embeddings" in d for d in found)
    assert any("tokenizer_class" in d for d in found)


def test_null_original_max_position_embeddings_is_filled_on_save():
    ref = release_file("config.json")
    cfg = Phi4RVConfig.from_hf({**ref, "original_max_position_embeddings": None, "max_position_embeddings": 16384})
    assert cfg.to_hf()["original_max_position_embeddings"] == 16384
    kept = Phi4RVConfig.from_hf({**ref, "original_max_position_embeddings": 4096})
    assert kept.to_hf()["original_max_position_embeddings"] == 4096


def test_unknown_keys_of_a_loaded_checkpoint_survive_a_save(tiny_ckpt, tmp_path):
    import shutil

    src = shutil.copytree(tiny_ckpt, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["my_field"] = {"a": [1, 2]}
    config["vision_config"]["vision_use_head"] = False
    (src / "config.json").write_text(json.dumps(config))
    tok = json.loads((src / "tokenizer_config.json").read_text())
    tok["padding_side"] = "left"
    (src / "tokenizer_config.json").write_text(json.dumps(tok))

    out = save_checkpoint(load_model(src), tmp_path / "out", tokenizer=Tokenizer.from_dir(src))
    saved = json.loads((out / "config.json").read_text())
    assert saved["my_field"] == {"a": [1, 2]} and saved["vision_config"]["vision_use_head"] is False
    assert json.loads((out / "tokenizer_config.json").read_text())["padding_side"] == "left"
    assert [d for d in layout_differences(out) if "not in the release" not in d] == []
