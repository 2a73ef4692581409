import json
from pathlib import Path

import pytest

from phi4rv.cli import parameter_counts
from phi4rv.config import Phi4RVConfig, preset

FIXTURES = Path(__file__).parent / "fixtures"


def test_release_config_round_trips_exactly(tmp_path):
    ref = json.loads((FIXTURES / "config.json").read_text())
    cfg = Phi4RVConfig.from_hf(ref)
    assert cfg.to_hf() == ref
    cfg.save(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == ref


def test_release_config_fields():
    cfg = Phi4RVConfig.load(FIXTURES / "config.json")
    assert cfg.vision.patch_size == 16  # implied by the tower name
    assert (cfg.decoder.head_dim, cfg.decoder.num_key_value_heads, cfg.decoder.rotary_dim) == (128, 10, 128)
    assert (cfg.min_num_patches, cfg.max_num_patches, cfg.max_length) == (256, 3600, 8192)
    assert (cfg.vision.hidden_size, cfg.decoder.hidden_size) == (1152, 5120)  # the projector's in and out


def test_unknown_fields_survive_edits():
    ref = json.loads((FIXTURES / "config.json").read_text())
    ref["my_field"] = {"x": 1}
    ref["vision_config"]["vision_use_head"] = False
    cfg = Phi4RVConfig.from_hf(ref)
    cfg.decoder.num_hidden_layers = 3
    out = cfg.to_hf()
    assert out["my_field"] == {"x": 1} and out["vision_config"]["vision_use_head"] is False
    assert out["num_hidden_layers"] == 3


def test_tiny_preset_round_trips():
    cfg = preset("tiny")
    again = Phi4RVConfig.from_hf(cfg.to_hf())
    assert (again.vision, again.decoder) == (cfg.vision, cfg.decoder)


def test_bad_configs_are_refused():
    ref = json.loads((FIXTURES / "config.json").read_text())
    with pytest.raises(ValueError, match="mm_projector_type"):
        Phi4RVConfig.from_hf({**ref, "mm_projector_type": "linear"})
    with pytest.raises(ValueError, match="mm_hidden_size"):
        Phi4RVConfig.from_hf({**ref, "mm_hidden_size": 1024})
    with pytest.raises(ValueError, match="vision_config"):
        Phi4RVConfig.from_hf({k: v for k, v in ref.items() if k != "vision_config"})
    with pytest.raises(ValueError, match="preset"):
        preset("nope")


def test_15b_parameter_count_on_meta_device():
    """Shapes from the release's weight table (DESIGN.md §1), counted by hand."""
    d, L, V, ff, vocab = 5120, 40, 27, 17920, 100352
    lm = vocab * d * 2 + L * (2 * d + (40 + 2 * 10) * 128 * d + d * d + 2 * ff * d + ff * d) + d
    vd, vff = 1152, 4304
    vision = (768 * vd + vd) + 256 * vd + V * (4 * (vd * vd + vd) + 2 * 2 * vd + vd * vff + vff + vff * vd + vd) + 2 * vd
    projector = (vd * d + d) + (d * d + d)
    counts = parameter_counts(Phi4RVConfig.load(FIXTURES / "config.json"))
    assert counts["total"] == lm + vision + projector
    assert 15.1e9 < counts["total"] < 15.3e9
