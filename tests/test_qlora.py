"""QLoRA: adapters on a frozen int8/int4 base train through the quantized kernels' input gradient,
export a dense release checkpoint (dequantized base + delta) that chat loads, and resume."""

import copy
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from phi4rv.chat_model import ChatModel
from phi4rv.checkpoint import CheckpointError, load_model, save_checkpoint, save_quantized
from phi4rv.config import preset
from phi4rv.lora import QLoRALinear, apply_lora, export_merged, merge_lora
from phi4rv.model import Phi4RV, quant
from phi4rv.model.linear import Linear
from phi4rv.model.quant import Int4Linear, Int8Linear
from phi4rv.processing.byte_tokenizer import build_byte_tokenizer
from phi4rv.processing.tokenizer import Tokenizer
from phi4rv.train import loop
from phi4rv.train.config import ConfigError, load_config
from phi4rv.train.metrics import read_metrics
from phi4rv.train.setup import apply_overrides
from phi4rv.train.toy import TINY_OVERRIDES, TOY_TEMPLATE, toy_config, write_toy


def hand_int8(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per output row, dequantized: the reference the layer must reproduce."""
    s = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
    return torch.round(w / s).clamp(-127, 127) * s


def hand_int4(w: torch.Tensor, group: int) -> torch.Tensor:
    """Asymmetric int4 in groups of `group` inputs, dequantized."""
    g = w.reshape(w.shape[0], -1, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s = (hi - lo).clamp(min=1e-8) / 15
    return (torch.round((g - lo) / s).clamp(0, 15) * s + lo).reshape(w.shape)


@pytest.mark.parametrize("kind,out", [("int8", 96), ("int4", 96), ("int4", 192)])  # int4: by columns / by rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_input_gradient_through_the_quantized_base_equals_the_dequantized_reference(kind, out, dtype, monkeypatch):
    monkeypatch.setattr(quant, "DEQUANT_BLOCK_ELEMENTS", 40 * 256)  # several blocks, the last one partial
    torch.manual_seed(0)
    w = torch.randn(out, 256) * 0.05
    layer = Int8Linear(256, out, bias=True, dtype=dtype) if kind == "int8" else Int4Linear(256, out, bias=True, dtype=dtype, group=64)
    layer.set_weight(w, "cpu")
    assert kind == "int8" or (layer._row_block() is not None) == (out % 64 == 0)
    layer.bias = torch.nn.Parameter(torch.randn(out, dtype=dtype), requires_grad=False)
    ref_w = hand_int8(w) if kind == "int8" else hand_int4(w, 64)
    x = torch.randn(3, 7, 256, requires_grad=True)
    gy = torch.randn(3, 7, out)
    layer(x).backward(gy)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=3e-2)
    torch.testing.assert_close(x.grad, (gy @ ref_w).float(), **tol)
    x2 = x.detach().clone().requires_grad_(True)
    torch.autograd.backward(layer(x2), gy)
    assert torch.equal(x2.grad, x.grad)
    with torch.no_grad():  # no autograd Function when nothing needs a gradient
        torch.testing.assert_close(layer(x.detach()).float(), x.detach() @ ref_w.T + layer.bias.float(), **tol)


def test_adapter_gradients_equal_lora_on_the_dequantized_base():
    cfg = apply_overrides(preset("tiny"), TINY_OVERRIDES)
    cfg.decoder.vocab_size = 352
    torch.manual_seed(0)
    dense = Phi4RV(cfg)
    dense.init_weights(std=0.1)
    qmodel = copy.deepcopy(dense)
    quant.quantize_modules(qmodel, "int8", torch.float32, lm_head=False)
    with torch.no_grad():  # the reference: plain LoRA on hand-dequantized weights
        for name, m in dense.named_modules():
            if name.startswith("decoder.layers.") and isinstance(m, torch.nn.Linear):
                m.weight.copy_(hand_int8(m.weight))
    names = apply_lora(qmodel, rank=4, alpha=8)
    assert apply_lora(dense, rank=4, alpha=8) == names and len(names) == 8
    assert all(isinstance(qmodel.get_submodule(n), QLoRALinear) for n in names)
    g = torch.Generator().manual_seed(3)
    for n in names:
        a, b = torch.randn(4, qmodel.get_submodule(n).in_features, generator=g), torch.randn(qmodel.get_submodule(n).out_features, 4, generator=g)
        for m in (qmodel, dense):
            m.get_submodule(n).lora_A.data.copy_(a * 0.1)
            m.get_submodule(n).lora_B.data.copy_(b * 0.1)
    ids = torch.randint(0, 352, (2, 12), generator=g)
    for m in (qmodel, dense):
        for pname, p in m.named_parameters():
            p.requires_grad_(pname.endswith(("lora_A", "lora_B")))
        m(input_ids=ids).logsumexp(-1).sum().backward()
    for n in names:  # layer 0's adapters get their gradient through layer 1's quantized base
        for leaf in ("lora_A", "lora_B"):
            got, want = getattr(qmodel.get_submodule(n), leaf).grad, getattr(dense.get_submodule(n), leaf).grad
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


@pytest.fixture(scope="module")
def qlora_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    toy = write_toy(root / "toy", n_train=96, n_test=8)
    tok = Tokenizer.from_dir(build_byte_tokenizer(root / "tok", TOY_TEMPLATE))
    cfg = apply_overrides(preset("tiny"), TINY_OVERRIDES)
    cfg.decoder.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    m = Phi4RV(cfg)
    m.init_weights(std=0.1)
    base = save_checkpoint(m.eval(), root / "base", tokenizer=tok)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield root, toy, base
    torch.set_num_threads(threads)


def qlora_cfg(run_dir: Path, toy: Path, base: Path, mode: str, steps: int = 12) -> dict:
    cfg = toy_config(run_dir, toy, steps=steps, train={"lora": 1e-2})
    cfg["model"] = {"checkpoint": str(base), "quantize": mode}
    cfg["lora"] = {"rank": 4, "alpha": 8, "dropout": 0.1}
    cfg["activation_checkpointing"] = True
    cfg["checkpoint"] = {"every": 6, "export_dtype": "bfloat16"}
    return cfg


def trained_adapters(step: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in (step / "trainer" / "shards").glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                name = k.split("::", 1)[1]
                out[name] = st.get_tensor(k)
    return out


def train_loss(final: Path) -> list[float]:
    return [r["train/loss"] for r in read_metrics(final.parent / "metrics.jsonl") if "train/loss" in r]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_qlora_stage_lowers_the_loss_and_exports_the_dequantized_merge(qlora_setup, tmp_path, mode):
    root, toy, base = qlora_setup
    final = loop.run(load_config(None, base=qlora_cfg(tmp_path / "run", toy, base, mode)))["toy"]
    losses = train_loss(final)
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3

    # the export: a dense bf16 release checkpoint = hand-dequantized base + B A * alpha/r
    steps = sorted(final.parent.glob("step-*"))
    adapters = trained_adapters(steps[-1])
    exported, start = load_model(final).state_dict(), load_model(base).state_dict()
    assert all(t.dtype == torch.bfloat16 for t in exported.values())
    merged = 0
    for name, w in start.items():
        module = name.removesuffix(".weight")
        if f"{module}.lora_A" in adapters:
            group = quant.int4_group_size(w.shape[1]) if mode == "int4" and w.shape[0] % 16 == 0 else None
            deq = hand_int4(w.float(), group) if group else hand_int8(w.float())
            want = deq + adapters[f"{module}.lora_B"] @ adapters[f"{module}.lora_A"] * 2.0
            assert not torch.allclose(want, deq)
            torch.testing.assert_close(exported[name].float(), want, rtol=1e-2, atol=2e-3)
            merged += 1
        else:  # everything else is the base, untouched (LM head, embeddings, norms, vision)
            assert torch.equal(exported[name], w.to(torch.bfloat16)), name
    assert merged == 8

    chat = ChatModel.load(final, device="cpu")
    result = chat.chat([{"role": "user", "content": "2+3"}], params=chat.params(max_new_tokens=4))
    assert isinstance(result.text, str)


def test_qlora_resume_rebuilds_the_quantized_base_and_continues_exactly(qlora_setup, tmp_path, monkeypatch):
    root, toy, base = qlora_setup
    ref = loop.run(load_config(None, base=qlora_cfg(tmp_path / "ref", toy, base, "int4")))["toy"]
    calls = {"n": 0}
    real = loop.clip_grad_norm

    def crash_at_step_9(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 9:
            raise RuntimeError("simulated crash")
        return real(*a, **kw)

    cfg = load_config(None, base=qlora_cfg(tmp_path / "run", toy, base, "int4"))
    monkeypatch.setattr(loop, "clip_grad_norm", crash_at_step_9)
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop.run(cfg)
    monkeypatch.undo()
    resumed = loop.run(cfg, resume=True)["toy"]
    assert train_loss(resumed) == train_loss(ref)
    r, f = load_model(resumed).state_dict(), load_model(ref).state_dict()
    assert all(torch.equal(r[k], f[k]) for k in f)


def test_quantized_base_needs_a_lora_stage(qlora_setup, tmp_path):
    root, toy, base = qlora_setup
    cfg = qlora_cfg(tmp_path / "run", toy, base, "int8")
    cfg["stages"]["toy"]["train"] = {"decoder": 1e-3}
    with pytest.raises(ConfigError, match=r"^model.quantize: .*stages.toy.train has no 'lora' part$"):
        load_config(None, base=cfg)
    cfg["stages"]["toy"]["train"] = {"lora": 1e-3}
    cfg["model"]["quantize"] = "nf4"
    with pytest.raises(ConfigError, match="model.quantize must be int8 or int4"):
        load_config(None, base=cfg)


def test_training_refuses_a_prequantized_folder_in_one_line(qlora_setup, tmp_path):
    root, toy, base = qlora_setup
    folder = save_quantized(base, tmp_path / "q", "int8")
    cfg = qlora_cfg(tmp_path / "run", toy, folder, "int8")
    with pytest.raises(CheckpointError, match="written by `phi4rv quantize`: train from the checkpoint it came from"):
        loop.run(load_config(None, base=cfg))


def test_plan_counts_a_quantized_15b_base_at_its_bytes_per_weight(qlora_setup, tmp_path):
    from phi4rv.train.plan import plan_memory

    root, toy, base = qlora_setup
    mc = preset("phi4rv-15b")
    d = mc.decoder
    kv = d.num_key_value_heads * (d.hidden_size // d.num_attention_heads)
    per_layer = d.hidden_size * (d.hidden_size + 2 * kv) + d.hidden_size**2 + 3 * d.hidden_size * d.intermediate_size
    weights = d.num_hidden_layers * per_layer
    plans = {}
    for mode in (None, "int8", "int4"):
        cfg = qlora_cfg(tmp_path, toy, base, mode)
        cfg["model"]["dtype"] = "bfloat16"
        plans[mode] = plan_memory(load_config(None, base=cfg), "toy", mc).parts["parameters"]
    saved = {mode: plans[None] - plans[mode] for mode in ("int8", "int4")}
    assert saved["int8"] == pytest.approx(weights * (2 - 1), rel=2e-3)  # + one bf16 scale per row
    assert saved["int4"] == pytest.approx(weights * (2 - 0.5 - 2 * 2 / 128), rel=2e-3)  # + scale and zero per 128


def test_merge_lora_and_export_merged_fold_the_adapter_into_the_dequantized_base(tmp_path):
    cfg = apply_overrides(preset("tiny"), TINY_OVERRIDES)
    cfg.decoder.vocab_size = 352
    torch.manual_seed(0)
    model = Phi4RV(cfg)
    model.init_weights(std=0.1)
    quant.quantize_modules(model, "int8", torch.float32, lm_head=False)
    names = apply_lora(model, rank=4, alpha=8)
    g = torch.Generator().manual_seed(4)
    for n in names:
        model.get_submodule(n).lora_B.data.normal_(0, 0.1, generator=g)
    ids = torch.randint(0, 352, (1, 10), generator=g)
    with torch.no_grad():
        unmerged = model.eval()(input_ids=ids)
    exported = load_model(export_merged(model, tmp_path / "exported")).state_dict()
    merge_lora(model)
    assert all(type(model.get_submodule(n)) is Linear for n in names)  # the model's own plain linear again
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids), unmerged, rtol=1e-4, atol=1e-4)
    dense = model.state_dict()  # merge_lora's weights, computed by another path than export_merged's
    assert exported.keys() == dense.keys()
    assert all(torch.equal(exported[k], dense[k]) for k in dense)
