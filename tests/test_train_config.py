"""Training configs: YAML + dotted overrides, typed, and bad configs refused up front in one line."""

from pathlib import Path

import pytest
import yaml

from phi4rv.cli import main
from phi4rv.train.config import ConfigError, TrainConfig, load_config
from phi4rv.train.toy import toy_config, write_toy

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return write_toy(tmp_path_factory.mktemp("toy"), n_train=8, n_test=2)


@pytest.fixture
def cfg_file(toy, tmp_path):
    def write(edit=None) -> Path:
        cfg = toy_config(tmp_path / "run", toy, steps=2)
        if edit:
            edit(cfg)
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    return write


def test_yaml_with_overrides_gives_a_typed_config(cfg_file):
    cfg = load_config(cfg_file(), ["stages.toy.train.decoder=1e-4", "seed=7", "stages.toy.data.datasets.0.weight=2",
                                   "stages.toy.data.packing=false", "eval.every=5"])
    assert isinstance(cfg, TrainConfig)
    st = cfg.stages["toy"]
    assert st.train["decoder"] == 1e-4 and isinstance(st.train["decoder"], float)  # YAML 1.1 reads 1e-4 as text
    assert cfg.seed == 7 and st.data.datasets[0].weight == 2.0 and st.data.packing is False and cfg.eval.every == 5
    assert load_config(None, base=cfg.to_dict()) == cfg  # the resolved config round-trips


BAD = [
    (lambda c: c["stages"]["toy"].update(lr=1e-3), ["unknown key 'stages.toy.lr'"]),
    (lambda c: c["stages"]["toy"]["data"].update(max_lenght=10), ["unknown key 'stages.toy.data.max_lenght'", "did you mean 'max_len'"]),
    (lambda c: c["stages"]["toy"].update(max_steps="ten"), ["stages.toy.max_steps", "expected int"]),
    (lambda c: c["stages"]["toy"]["data"].update(packing="yes please"), ["stages.toy.data.packing", "expected bool"]),
    (lambda c: c["stages"]["toy"]["data"]["datasets"][0].update(path="/no/such/data.jsonl"), ["dataset not found", "/no/such/data.jsonl"]),
    (lambda c: c["stages"]["toy"].update(train={}), ["stages.toy.train", "trains nothing"]),
    (lambda c: c["stages"]["toy"].update(train={"decoder": 1e-4, "lora": 1e-4}), ["exclude each other"]),
    (lambda c: c["stages"]["toy"].update(train={"llm": 1e-4}), ["unknown part 'llm'"]),
    (lambda c: c["stages"]["toy"].update(train={"decoder": 0}), ["learning rate must be > 0"]),
    (lambda c: c["stages"]["toy"]["data"].update(tokens_per_step=1000), ["multiple of batch_tokens"]),
    (lambda c: c["model"].update(checkpoint="/no/ckpt"), ["exactly one of model.checkpoint or model.preset"]),
    (lambda c: c.pop("run_dir"), ["missing key 'run_dir'"]),
]


@pytest.mark.parametrize("edit, words", BAD)
def test_bad_config_fails_at_start_with_one_line(cfg_file, tmp_path, capsys, edit, words):
    path = cfg_file(edit)
    assert main(["train", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("phi4rv: error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_bad_override_is_refused(cfg_file, capsys):
    assert main(["train", str(cfg_file()), "stages.toy.epochs=two"]) == 1
    assert "stages.toy.epochs: expected int" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(cfg_file(), ["seed"])


def test_data_that_cannot_fill_one_step_is_refused_before_training(cfg_file, capsys):
    path = cfg_file(lambda c: c["stages"]["toy"]["data"].update(tokens_per_step=768 * 50))
    assert main(["train", str(path)]) == 1
    assert "one optimizer step needs 50" in capsys.readouterr().err


def test_shipped_configs_are_valid(tmp_path, monkeypatch):
    """Every config in configs/ type-checks and validates once the files it names exist."""
    from phi4rv.checkpoint import save_checkpoint
    from phi4rv.config import preset
    from phi4rv.model import Phi4RV

    monkeypatch.chdir(tmp_path)
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(configs) >= 2
    for path in configs:
        raw = yaml.safe_load(path.read_text())
        specs = [ds for st in raw["stages"].values() for ds in st["data"]["datasets"]] + raw.get("eval", {}).get("datasets", [])
        for ds in specs:
            Path(ds["path"]).parent.mkdir(parents=True, exist_ok=True)
            Path(ds["path"]).touch()
        for key in ("checkpoint", "tokenizer"):
            folder = raw["model"].get(key)
            if folder and folder != "phi4" and not Path(folder).exists():
                save_checkpoint(Phi4RV(preset("tiny")), folder, tokenizer=_tokenizer())
        cfg = load_config(path)
        assert cfg.stages and all(st.train for st in cfg.stages.values())


def _tokenizer():
    from phi4rv.processing.byte_tokenizer import build_byte_tokenizer
    from phi4rv.processing.tokenizer import Tokenizer
    from phi4rv.train.toy import TOY_TEMPLATE

    return Tokenizer.from_dir(build_byte_tokenizer(Path("_tok"), TOY_TEMPLATE))
