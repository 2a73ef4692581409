"""Generation: KV cache vs recomputation, batched vs single, transformers' greedy, budgets, stops."""

import pytest
import torch
from hf_reference import hf_phi3

from phi4rv.chat_model import ChatModel
from phi4rv.generation.generate import FORCED_CLOSE, GenerationParams, Request, generate, generate_stream
from phi4rv.generation.sampling import SamplingParams, sample
from phi4rv.model import Phi4RV
from phi4rv.processing.chat import encode_chat
from phi4rv.processing.image import process_image
from phi4rv.processing.tokens import expand_image_tokens


@pytest.fixture(scope="module")
def cm(tiny_ckpt):
    return ChatModel.load(tiny_ckpt, device="cpu")


def request(cm, text, images=(), mode="auto"):
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    req, _ = cm.prepare([{"role": "user", "content": content}], list(images), mode)
    return req


def greedy(n, **kw):
    return GenerationParams(max_new_tokens=n, sampling=SamplingParams(temperature=0), **kw)


def full_recompute(model, req, n):
    """Reference: greedy decoding that re-runs the whole sequence at every step (no cache)."""
    ids = expand_image_tokens(req.input_ids, [im.grid for im in req.images])
    pixels = torch.cat([im.pixels for im in req.images]) if req.images else None
    grids = [im.grid for im in req.images]
    out, logps = [], []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids + out]), pixels, grids)[0, -1]
            out.append(int(logits.argmax()))
            logps.append(float(logits.log_softmax(-1)[out[-1]]))
    return out, logps


def test_kv_cache_equals_full_recomputation(cm, images_dir):
    req = request(cm, "Describe the picture.", [images_dir / "photo.jpg"])
    [g] = generate(cm.model, cm.tokenizer, [req], greedy(12))
    ref_ids, ref_logps = full_recompute(cm.model, req, 12)
    assert g.token_ids == ref_ids
    assert max(abs(a - b) for a, b in zip(g.logprobs, ref_logps)) < 1e-4


def test_batched_equals_one_by_one(cm, images_dir):
    reqs = [
        request(cm, "Hi"),
        request(cm, "What is shown in this screenshot and where is the play button?", [images_dir / "desktop_screenshot.png"]),
        request(cm, "Compare the two images.", [images_dir / "photo.jpg", images_dir / "desktop_screenshot.png"]),
    ]
    batched = generate(cm.model, cm.tokenizer, reqs, greedy(10))
    for req, g in zip(reqs, batched):
        [single] = generate(cm.model, cm.tokenizer, [req], greedy(10))
        assert g.token_ids == single.token_ids
        assert max(abs(a - b) for a, b in zip(g.logprobs, single.logprobs)) < 1e-4


def test_rows_finishing_early_leave_the_batch(cm):
    reqs = [request(cm, "one"), request(cm, "a somewhat longer second prompt")]
    [first] = generate(cm.model, cm.tokenizer, reqs[:1], greedy(8))
    stop = first.token_ids[3]
    out = generate(cm.model, cm.tokenizer, reqs, greedy(8, stop_ids=(stop,)))
    assert out[0].token_ids == first.token_ids[:4] and out[0].finish_reason == "stop"
    [second] = generate(cm.model, cm.tokenizer, reqs[1:], greedy(8, stop_ids=(stop,)))
    assert out[1].token_ids == second.token_ids


def test_greedy_equals_transformers_generate(tok_dir):
    from phi4rv.config import preset
    from phi4rv.processing.tokenizer import Tokenizer

    cfg = preset("tiny")
    hf = hf_phi3(cfg.decoder, seed=5)
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(8)  # peaked distributions, so greedy paths are not decided by float noise
    model = Phi4RV(cfg).eval()
    model.decoder.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()})
    tok = Tokenizer.from_dir(tok_dir)
    prompt = tok.encode("The quick brown fox jumps over the lazy dog")
    ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24, min_new_tokens=24,
                      eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    [g] = generate(model, tok, [Request(prompt)], greedy(24))
    assert g.token_ids == ref


def test_thinking_budget_forces_the_close(cm):
    req = request(cm, "Think about it.", mode="think")
    forced = cm.tokenizer.encode(FORCED_CLOSE)
    [g] = generate(cm.model, cm.tokenizer, [req], greedy(40, thinking_budget=7))
    assert "</think>" not in cm.tokenizer.decode(g.token_ids[:7])
    assert g.token_ids[7 : 7 + len(forced)] == forced
    # Thinking tokens: the budget, then the forced tokens up to the one that writes `</think>`.
    closing = next(n for n in range(1, len(forced) + 1) if "</think>" in cm.tokenizer.decode(forced[:n]))
    assert closing < len(forced)  # the single-token marker: the blank line after it is answer text
    assert g.thinking_tokens == 7 + closing
    r = cm.chat([{"role": "user", "content": "Think about it."}], mode="think", params=greedy(40, thinking_budget=7))
    assert r.usage["thinking_tokens"] == 7 + closing
    assert r.thinking and "</think>" not in r.answer and r.mode == "think"


def test_stop_strings_cut_the_text(cm):
    req = request(cm, "Say something.")
    [free] = generate(cm.model, cm.tokenizer, [req], greedy(30))
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 3]
    assert stop.strip()
    [g] = generate(cm.model, cm.tokenizer, [req], greedy(30, stop_strings=(stop,)))
    assert g.finish_reason == "stop"
    assert g.text == free.text[: free.text.find(stop)]


def test_stream_deltas_add_up(cm):
    req = request(cm, "Stream this.")
    [g] = generate(cm.model, cm.tokenizer, [req], greedy(25))
    pieces, n = "", 0
    for events in generate_stream(cm.model, cm.tokenizer, [req], greedy(25)):
        for e in events:
            pieces += e.text
            n += 1
    assert pieces == g.text == cm.tokenizer.decode(g.token_ids)
    assert n == len(g.token_ids) == 25 and g.finish_reason == "length"


def test_sampling_is_seeded(cm):
    req = request(cm, "Sample.")
    params = lambda seed, **kw: GenerationParams(max_new_tokens=15, seed=seed, sampling=SamplingParams(**kw))  # noqa: E731
    a = generate(cm.model, cm.tokenizer, [req], params(1, temperature=1.5))[0].token_ids
    b = generate(cm.model, cm.tokenizer, [req], params(1, temperature=1.5))[0].token_ids
    c = generate(cm.model, cm.tokenizer, [req], params(2, temperature=1.5))[0].token_ids
    assert a == b and a != c
    g = generate(cm.model, cm.tokenizer, [req], greedy(15))[0].token_ids
    assert generate(cm.model, cm.tokenizer, [req], params(3, temperature=2.0, top_k=1))[0].token_ids == g
    assert generate(cm.model, cm.tokenizer, [req], params(3, temperature=2.0, top_p=1e-6))[0].token_ids == g


def test_top_logprobs(cm):
    req = request(cm, "Top.")
    [g] = generate(cm.model, cm.tokenizer, [req], greedy(5, top_logprobs=3))
    for tok, lp, top in zip(g.token_ids, g.logprobs, g.top_logprobs):
        assert len(top) == 3 and top[0] == (tok, pytest.approx(lp))  # greedy picks the top-1
        assert top[0][1] >= top[1][1] >= top[2][1]


def test_chat_usage_and_timing(cm, images_dir):
    msgs = [{"role": "user", "content": "<image>\nWhat is this?"}]
    r = cm.chat(msgs, [images_dir / "photo.jpg"], mode="nothink", params=greedy(6))
    grid = process_image(images_dir / "photo.jpg", cm.image_cfg).grid
    enc = encode_chat(cm.tokenizer, msgs, mode="nothink")
    assert r.usage["image_tokens"] == grid[0] * grid[1]
    assert r.usage["prompt_tokens"] == len(enc.input_ids) - 1 + grid[0] * grid[1]
    assert r.usage["completion_tokens"] == 6 == r.usage["answer_tokens"] and r.usage["thinking_tokens"] == 0
    assert set(r.timing) == {"preprocess", "vision", "prefill", "decode"}
    with pytest.raises(ValueError, match="1 <image> tag"):
        cm.chat(msgs, [], params=greedy(2))


def test_chat_batch_equals_single_chats(cm, images_dir):
    from phi4rv.chat_model import Conversation

    convs = [
        Conversation([{"role": "user", "content": "Hello there"}], mode="nothink"),
        Conversation([{"role": "user", "content": "<image>\nWhat?"}], [images_dir / "photo.jpg"], mode="think"),
    ]
    batch = cm.chat_batch(convs, greedy(8))
    for conv, r in zip(convs, batch):
        single = cm.chat(conv.messages, conv.images, conv.mode, greedy(8))
        assert (r.token_ids, r.answer, r.thinking, r.usage) == (single.token_ids, single.answer, single.thinking, single.usage)


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, top_p=1e-230), SamplingParams(temperature=1e-300),
                                    SamplingParams(temperature=1e-300, top_p=1e-230, top_k=3)])
def test_extreme_sampling_settings_pick_the_top_token(params):
    # A top_p or temperature below float32's range used to turn every probability into nan (a 500 in serve).
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.9], [7.0, 7.5, 0.0, -3.0]])
    assert sample(logits, params).tolist() == [1, 1]
