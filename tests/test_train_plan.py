"""The memory plan: exact parameter bytes, 1/N sharding, the `--plan` report, and a refusal before loading."""

import pytest

from phi4rv.cli import main
from phi4rv.train.config import ConfigError, load_config, parse_size
from phi4rv.train.loop import run
from phi4rv.train.plan import plan_memory
from phi4rv.train.setup import load_tokenizer, model_config
from phi4rv.train.toy import toy_config, write_toy


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy(tmp_path_factory.mktemp("toy"), n_train=16, n_test=4)


def test_parse_size():
    assert parse_size("24GB") == parse_size("24GiB") == 24 * 2**30
    assert parse_size("512MB") == 512 * 2**20 and parse_size("1.5T") == int(1.5 * 2**40) and parse_size("100") == 100
    with pytest.raises(ValueError):
        parse_size("lots")


def test_parameter_bytes_match_the_built_model(toy, tmp_path):
    cfg = load_config(None, base={**toy_config(tmp_path / "run", toy), "model": {
        **toy_config(tmp_path / "run", toy)["model"], "dtype": "bfloat16"}})
    cfg.stages["toy"].train = {"projector": 1e-3, "decoder": 1e-3}  # vision frozen (bf16), the rest float32
    mc = model_config(cfg, None, load_tokenizer(cfg))
    from phi4rv.model.vlm import Phi4RV

    model = Phi4RV(mc)
    last = len(model.vision.encoder.layers) - 1
    expected = sum(p.numel() * (2 if n.startswith("vision.") else 4) for n, p in model.named_parameters())
    trainable = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("vision."))
    used = sum(p.numel() for n, p in model.named_parameters()
               if not n.startswith((f"vision.encoder.layers.{last}.", "vision.post_layernorm.")))
    plan = plan_memory(cfg, "toy", mc, world=1, device="cpu")
    assert plan.parts["parameters"] == expected
    assert plan.trainable == trainable and plan.total_params == used
    assert plan.parts["optimizer"] == 8 * trainable  # AdamW: two float32 moments
    assert plan.parts["gradients"] == 4 * trainable


def test_sharded_state_falls_as_one_over_world(toy, tmp_path):
    cfg = load_config(None, base=toy_config(tmp_path / "run", toy))
    mc = model_config(cfg, None, load_tokenizer(cfg))
    one, four = (plan_memory(cfg, "toy", mc, world=w, device="cpu") for w in (1, 4))
    for key in ("parameters", "optimizer"):
        assert four.parts[key] == pytest.approx(one.parts[key] / 4, abs=4)
    assert four.parts["gathered"] > 0 == one.parts["gathered"]  # FSDP2's all-gathered units
    assert four.parts["activations"] == one.parts["activations"]  # per micro-batch, not sharded


def test_plan_report_for_the_15b(toy, tmp_path, capsys):
    cfg = tmp_path / "big.yaml"
    cfg.write_text(
        f"run_dir: {tmp_path / 'run'}\nmodel: {{preset: phi4rv-15b, tokenizer: phi4}}\nprecision: bfloat16\n"
        f"stages:\n  sft:\n    train: {{vision: 1.0e-5, projector: 1.0e-5, decoder: 1.0e-5}}\n"
        f"    data: {{datasets: [{{path: {toy / 'train.jsonl'}}}], max_len: 8192, batch_tokens: 16384}}\n"
    )
    main(["train", str(cfg), "--plan", "--world", "8", "--device-memory", "80GB"])
    out = capsys.readouterr().out
    assert "8 process(es)" in out and "does NOT fit in 80.00 GiB" in out  # no checkpointing: ~170 GiB of activations
    assert "would fit with: activation_checkpointing=true" in out
    for line in ("parameters", "gathered", "gradients", "optimizer", "activations", "logits", "buffers"):
        assert f"  {line} " in out
    main(["train", str(cfg), "activation_checkpointing=true", "--plan", "--world", "8", "--device-memory", "80GB"])
    assert "fits in 80.00 GiB" in capsys.readouterr().out


def test_a_stage_that_cannot_fit_fails_before_loading(toy, tmp_path):
    base = toy_config(tmp_path / "run", toy)
    base["device_memory"] = "100MB"
    with pytest.raises(ConfigError, match=r"stages\.toy needs ~0\.\d\d GiB per process but 0\.10 GiB is available \(parameters"):
        run(load_config(None, base=base))
    assert not (tmp_path / "run").exists()  # nothing written, nothing loaded
