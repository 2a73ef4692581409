"""One generation core: generate() and the server's engine give the same tokens; attention
semantics agree with training; forced modes bind; prefix reuse; failures stay with their request."""

import copy
import math
import threading

import pytest
import torch
from engine_runs import run_engine
from torch import nn

from phi4rv.chat_model import ChatModel
from phi4rv.generation.core import (
    FORCED_CLOSE,
    Core,
    GenerationParams,
    PrefixStore,
    Request,
    Sequence,
    SequenceState,
    image_spans,
    pick,
)
from phi4rv.generation.generate import generate
from phi4rv.generation.sampling import SamplingParams
from phi4rv.processing.image import ImagePatches, process_image
from phi4rv.processing.reasoning import THINK_END, THINK_START
from phi4rv.processing.tokens import expand_image_tokens
from phi4rv.serve.engine import Engine, EngineRequest, ShuttingDown


@pytest.fixture(scope="module")
def cm(tiny_ckpt):
    return ChatModel.load(tiny_ckpt, device="cpu")


@pytest.fixture(scope="module")
def text_markers_cm(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint with Phi-4's placeholders back in the reasoning markers' slots, so that
    `<think>` / `</think>` are several ordinary tokens (a tokenizer without the markers)."""
    import json
    import shutil

    path = tmp_path_factory.mktemp("text_markers") / "model"
    shutil.copytree(tiny_ckpt, path)
    spec = json.loads((path / "tokenizer.json").read_text())
    for added in spec["added_tokens"]:
        if added["content"] in (THINK_START, THINK_END):
            added.update(content=f"<|dummy_{added['id'] - 100264}|>", special=True)
    (path / "tokenizer.json").write_text(json.dumps(spec))
    loaded = ChatModel.load(path, device="cpu")
    assert len(loaded.tokenizer.encode(THINK_START)) > 1
    return loaded


@pytest.fixture(params=["single-token markers", "text markers"])
def any_cm(request, cm, text_markers_cm):
    return cm if request.param == "single-token markers" else text_markers_cm


def req(cm, text, images=(), mode="auto"):
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    return cm.prepare([{"role": "user", "content": content}], list(images), mode)[0]


def params(n=8, temperature=0.0, seed=None, **kw):
    return GenerationParams(max_new_tokens=n, sampling=SamplingParams(temperature=temperature, top_p=0.9),
                            seed=seed, **kw)


@pytest.mark.parametrize("temperature, seed", [(0.0, None), (0.9, 5)])
def test_generate_and_engine_give_identical_tokens_and_logprobs(cm, images_dir, temperature, seed):
    photo, shot = images_dir / "photo.jpg", images_dir / "desktop_screenshot.png"
    requests = [req(cm, "Hello there"), req(cm, "Describe.", [photo]), req(cm, "Both?", [photo, shot], "think"),
                req(cm, "Short", mode="nothink")]
    p = params(8, temperature, seed)
    alone = [generate(cm.model, cm.tokenizer, [r], p)[0] for r in requests]
    together = generate(cm.model, cm.tokenizer, requests, p)
    served = run_engine(cm, requests, p)
    for a, b, events in zip(alone, together, served):
        assert a.token_ids == b.token_ids == [e.token_id for e in events]
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        assert a.logprobs == pytest.approx([e.logprob for e in events], abs=1e-4)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_prefill_attention_matches_the_training_forward(cm, images_dir, bidirectional):
    model = copy.deepcopy(cm.model)
    model.cfg.image_bidirectional_attention = bidirectional
    r = req(cm, "What is it?", [images_dir / "photo.jpg"])
    ids = torch.tensor([expand_image_tokens(r.input_ids, [im.grid for im in r.images])])
    with torch.no_grad():
        reference = model(ids, r.images[0].pixels, [r.images[0].grid])[0, -1].log_softmax(-1)
    g = generate(model, cm.tokenizer, [r], GenerationParams(max_new_tokens=1, top_logprobs=5))[0]
    assert g.token_ids[0] == int(reference.argmax())
    assert g.logprobs[0] == pytest.approx(float(reference.max()), abs=1e-4)
    # The flag changes what the model computes over image positions (so this test can tell them apart).
    other = copy.deepcopy(model)
    other.cfg.image_bidirectional_attention = not bidirectional
    with torch.no_grad():
        assert not torch.allclose(other(ids, r.images[0].pixels, [r.images[0].grid])[0, -1].log_softmax(-1), reference,
                                  atol=1e-3)


def prefer(model, token: int) -> nn.Module:
    """A copy of the model whose LM head strongly prefers `token`."""
    model = copy.deepcopy(model)
    head = model.decoder.lm_head
    biased = nn.Linear(head.in_features, head.out_features, bias=True)
    biased.weight = head.weight
    with torch.no_grad():
        biased.bias.zero_()
        biased.bias[token] = 50.0
    model.decoder.lm_head = biased
    return model


def test_forced_nothink_never_opens_a_reasoning_block(any_cm):
    cm = any_cm
    model = prefer(cm.model, cm.tokenizer.encode(THINK_START)[0])
    r = req(cm, "Think hard: 17 * 23?", mode="nothink")
    assert generate(model, cm.tokenizer, [req(cm, "Think hard: 17 * 23?", mode="auto")], params(4))[0].text.startswith("<")
    g = generate(model, cm.tokenizer, [r], params(6))[0]
    assert not g.text.lstrip().startswith(THINK_START) and g.thinking_tokens == 0


def test_forced_think_writes_reasoning_before_closing(any_cm):
    cm = any_cm
    model = prefer(cm.model, cm.tokenizer.encode(THINK_END)[0])
    r = req(cm, "What colour is the sky?", mode="think")
    free = generate(model, cm.tokenizer, [req(cm, "What colour is the sky?", mode="auto")], params(2))[0]
    assert free.token_ids[0] == cm.tokenizer.encode(THINK_END)[0]  # unbound, it would close at once
    g = generate(model, cm.tokenizer, [r], params(6))[0]
    assert g.token_ids[0] != cm.tokenizer.encode(THINK_END)[0] and g.text.split(THINK_END)[0].strip()


def test_prefix_store_keys_by_image_content_not_placeholders(cm):
    store = PrefixStore(max_bytes=2**30, block=4)
    grid = (2, 2)
    a = ImagePatches(torch.zeros(4, 768), grid)
    b = ImagePatches(torch.ones(4, 768), grid)
    ids = [5, 6, 7, 8, -200, 9, 10, 11, 12, 13]
    ka, kb = store.keys(ids, [a]), store.keys(ids, [b])
    assert ka[0] == kb[0]  # the first block is text only
    assert ka[1] != kb[1]  # the second holds image patches: different images, different keys
    same = ImagePatches(torch.zeros(4, 768), grid)
    assert store.keys(ids, [same]) == ka
    store.put_features(a.digest, torch.full((4, 8), 3.0))
    assert store.features(b.digest) is None and torch.equal(store.features(same.digest), torch.full((4, 8), 3.0))


def test_prefix_cache_reuses_a_shared_prompt_and_changes_nothing(cm, images_dir):
    system = "You are a careful assistant. " * 12
    requests = [req(cm, system + q, [images_dir / "photo.jpg"]) for q in ("First?", "Second?")]
    p = params(6)
    plain = [generate(cm.model, cm.tokenizer, [r], p)[0].token_ids for r in requests]
    core = Core(cm.model, cm.tokenizer, slots=1, slot_len=2048, prefix_bytes=2**28)
    got = []
    for r in requests:
        s = Sequence(r, p)
        events = core.admit([s])
        while not s.finished:
            events += core.step([s])
        core.release(s)
        got.append([e.token_id for e in events])
    assert got == plain
    assert core.prefixes.hits > 0.5 * requests[1].prompt_len  # the second prompt mostly came from the store


@pytest.mark.parametrize("shared_text", [True, False])
def test_an_image_seen_before_is_not_encoded_again(cm, images_dir, shared_text):
    """The whole image in the reused prefix, or the prefix ending inside it (the same image, another
    question): either way the vision tower does not run for it again, and the tokens are the same
    as without the store."""
    text = ("You are a careful assistant. " * 12 if shared_text else "") + "Question {}?"
    requests = [req(cm, text.format(q), [images_dir / "photo.jpg"]) for q in ("one", "two")]
    p = params(6)
    plain = [generate(cm.model, cm.tokenizer, [r], p)[0] for r in requests]
    core = Core(cm.model, cm.tokenizer, slots=1, slot_len=2048, prefix_bytes=2**28)
    encoded = []
    hook = cm.model.vision.register_forward_hook(lambda m, args, out: encoded.append(args[0].shape[0]))
    try:
        got = []
        for r in requests:
            s = Sequence(r, p)
            hits = core.prefixes.hits
            events = core.admit([s])
            while not s.finished:
                events += core.step([s])
            core.release(s)
            got.append(events)
    finally:
        hook.remove()
    for events, g in zip(got, plain):
        assert [e.token_id for e in events] == g.token_ids
        assert [e.logprob for e in events] == pytest.approx(g.logprobs, abs=1e-5)
    assert encoded == [requests[0].images[0].pixels.shape[0]]  # the first request's image only
    (begin, end), = image_spans(requests[1].input_ids, [requests[1].images[0].grid])
    reused = core.prefixes.hits - hits
    assert reused >= end if shared_text else begin < reused < end  # both cases happened as described


def test_a_sequence_leaving_mid_batch_leaves_no_hole(cm):
    """The middle of three sequences stops first: the last moves down into its slot, so the two
    left are read as views of the cache (not gathered), and every sequence still gets the tokens
    it gets alone."""
    requests = [req(cm, "Hello there"), req(cm, "Hi"), req(cm, "Short answer please")]
    lengths = [8, 2, 8]
    seqs = [Sequence(r, params(n), row=i) for i, (r, n) in enumerate(zip(requests, lengths))]
    core = Core(cm.model, cm.tokenizer, slots=3, slot_len=128)
    tokens = [[] for _ in seqs]
    events, slots_seen = core.admit(seqs), []
    while events:
        for e in events:
            tokens[e.row].append(e.token_id)
        for s in seqs:
            if s.finished and s.slot >= 0:
                core.release(s)
        active = [s for s in seqs if not s.finished]
        events = core.step(active) if active else []
        if active:
            assert core.cache.span == slice(0, len(active))
            slots_seen.append([s.slot for s in seqs])
    assert [0, -1, 1] in slots_seen and len(tokens[2]) > 2  # the last did run on in the middle's slot
    for r, n, got in zip(requests, lengths, tokens):
        assert got == generate(cm.model, cm.tokenizer, [r], params(n))[0].token_ids


def test_one_prefill_holds_at_most_a_slot_of_positions(cm, monkeypatch):
    """Three queued prompts, room for two in the batch: prompts are prefilled together only while
    (prompts x the longest) fits one slot, so a burst of long prompts cannot hold several slots'
    worth of activations at once; each still gets its tokens."""
    requests = [req(cm, "Hello there, how are you doing on this fine day?") for _ in range(3)]
    n = requests[0].prompt_len
    batches = []
    admit = Core.admit
    monkeypatch.setattr(Core, "admit", lambda self, seqs: batches.append(len(seqs)) or admit(self, seqs))
    out = run_engine(cm, requests, params(4), max_batch=3, queued=True, slot_len=2 * n + 12)  # two fit, three do not
    assert batches == [2, 1]
    alone = generate(cm.model, cm.tokenizer, [requests[0]], params(4))[0].token_ids
    assert all([e.token_id for e in events] == alone for events in out)


def test_a_prefill_in_chunks_gives_the_tokens_of_one_forward(cm, images_dir, monkeypatch):
    """Prompts of different lengths, one with an image cut across chunks: prefilled 7 positions a
    row at a time (the cache and the causal mask carry each chunk to the next), they decode as
    after one forward."""
    requests = [req(cm, "Hello there"), req(cm, "Describe.", [images_dir / "photo.jpg"]), req(cm, "Short", mode="nothink")]
    p = params(6)
    whole = generate(cm.model, cm.tokenizer, requests, p)
    widths = []
    forward = cm.model.decoder.forward
    monkeypatch.setattr(cm.model.decoder, "forward", lambda x, *a, **k: widths.append(x.shape[1]) or forward(x, *a, **k))
    monkeypatch.setattr("phi4rv.generation.core.prefill_tokens", lambda cfg: 7 * len(requests))
    chunked = generate(cm.model, cm.tokenizer, requests, p)
    longest = max(r.prompt_len for r in requests)
    n = math.ceil(longest / 7)
    assert n >= 3 and widths[:n] == [7] * (n - 1) + [longest - 7 * (n - 1)]  # the prefill's forwards, then decode
    for a, b in zip(whole, chunked):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_a_failing_request_fails_alone(cm, images_dir):
    good = req(cm, "Hello", [images_dir / "photo.jpg"])
    bad = Request(list(good.input_ids), [ImagePatches(torch.zeros(3, 5), (1, 3))])  # patches of the wrong width
    out = run_engine(cm, [good, bad, good], params(4), max_batch=3)
    assert isinstance(out[1][-1], BaseException)
    for events in (out[0], out[2]):
        assert [e.finish_reason for e in events][-1] == "length" and len(events) == 4


def test_shutdown_answers_queued_and_running_requests(cm):
    engine = Engine(cm.model, cm.tokenizer, max_batch=1).start()
    got = []
    r = req(cm, "Hello")
    for _ in range(3):
        engine.submit(EngineRequest(r, params(3000), got.append))
    engine.stop()
    finals = [e for e in got if isinstance(e, BaseException)]
    assert len(finals) == 3 and all(isinstance(e, ShuttingDown) for e in finals)
    with pytest.raises(ShuttingDown):
        engine.submit(EngineRequest(r, params(2), got.append))


def test_queued_requests_expire(cm):
    engine = Engine(cm.model, cm.tokenizer, max_batch=1).start()
    got: list = []
    try:
        engine.submit(EngineRequest(req(cm, "Hello"), params(3000), got.append))  # holds the only slot
        waiting = []
        engine.submit(EngineRequest(req(cm, "Hi"), params(2), waiting.append, timeout=0.2))
        deadline = threading.Event()
        deadline.wait(3)
        assert len(waiting) == 1 and isinstance(waiting[0], TimeoutError)
    finally:
        engine.stop()


@pytest.mark.parametrize("kw, match", [({"stop_strings": ("a",) * 5}, "stop strings"),
                                       ({"stop_strings": ("x" * 300,)}, "longer"),
                                       ({"seed": 2**64}, "seed"), ({"top_logprobs": 21}, "top_logprobs")])
def test_bounded_generation_parameters(kw, match):
    with pytest.raises(ValueError, match=match):
        GenerationParams(**kw)


def test_stop_string_found_across_pieces(cm):
    g = generate(cm.model, cm.tokenizer, [req(cm, "Hello")], params(12))[0]
    stop = g.text[3:7]
    cut = generate(cm.model, cm.tokenizer, [req(cm, "Hello")], params(12, stop_strings=(stop,)))[0]
    assert cut.finish_reason == "stop" and cut.text == g.text[: g.text.find(stop)]


def test_image_hash_differs_for_different_pixels(images_dir):
    from phi4rv.processing.image import ImageProcessorConfig

    cfg = ImageProcessorConfig(min_num_patches=4, max_num_patches=64)
    a = process_image(images_dir / "photo.jpg", cfg)
    b = process_image(images_dir / "desktop_screenshot.png", cfg)
    assert a.digest != b.digest and a.digest == process_image(images_dir / "photo.jpg", cfg).digest


def test_release_tokenizer_has_single_token_markers_that_bind_split_and_budget(cm):
    open_id, close_id = cm.tokenizer.encode(THINK_START), cm.tokenizer.encode(THINK_END)
    assert len(open_id) == len(close_id) == 1 and open_id != close_id
    # nothink: the reasoning markers are banned wherever they would come.
    model = prefer(cm.model, open_id[0])
    g = generate(model, cm.tokenizer, [req(cm, "Hi", mode="nothink")], params(6))[0]
    assert open_id[0] not in g.token_ids and close_id[0] not in g.token_ids
    # think: no empty reasoning; the budget's forced close is the one </think> token.
    model = prefer(cm.model, close_id[0])
    g = generate(model, cm.tokenizer, [req(cm, "Hi", mode="think")], params(8))[0]
    assert g.token_ids[0] != close_id[0] and g.token_ids.count(close_id[0]) == 1
    from phi4rv.processing.chat import encode_chat
    from phi4rv.processing.reasoning import parse_completion

    parsed = parse_completion(g.text, "think")
    assert parsed.thinking and THINK_END not in parsed.answer
    forced = cm.tokenizer.encode(FORCED_CLOSE)
    assert close_id[0] in forced
    g = generate(cm.model, cm.tokenizer, [req(cm, "Hi", mode="think")], params(10, thinking_budget=2))[0]
    assert g.token_ids[2 : 2 + len(forced)] == forced
    # Training: the assistant's markers are the single tokens and carry loss.
    enc = encode_chat(cm.tokenizer, [{"role": "user", "content": "q"},
                                     {"role": "assistant", "content": "<think>a</think>b"}], add_generation_prompt=False)
    marked = [i for i, m in zip(enc.input_ids, enc.assistant_mask) if m]
    assert marked[0] == open_id[0] and close_id[0] in marked


def test_constrained_answer_follows_reasoning_even_when_the_model_would_stop(cm):
    """With a grammar, stopping inside the reasoning would leave no answer: the stop tokens are
    banned while thinking (forced think here; auto once it has opened `<think>` takes the same
    path), and the reasoning is closed while the answer still fits."""
    import json

    import jsonschema

    from phi4rv.generation.grammar import Grammar
    from phi4rv.processing.reasoning import parse_completion

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    grammar = Grammar.from_schema(schema, cm.tokenizer)
    mode = "think"
    model = prefer(cm.model, cm.tokenizer.eos_id)
    stops = tuple(cm.stop_ids())
    free = generate(model, cm.tokenizer, [req(cm, "Is it?", mode=mode)], params(40, stop_ids=stops))[0]
    assert not parse_completion(free.text, mode).answer  # unconstrained, it stops with no answer
    for n in (40, 16):  # roomy, and tight: the close is forced early enough for the answer to fit
        g = generate(model, cm.tokenizer, [req(cm, "Is it?", mode=mode)], params(n, stop_ids=stops, grammar=grammar))[0]
        parsed = parse_completion(g.text, mode)
        assert parsed.thinking is not None and g.finish_reason == "stop", g.text
        jsonschema.validate(json.loads(parsed.answer), schema)


def test_greedy_pick_takes_the_first_of_tied_maxima_and_computes_only_asked_logprobs(cm):
    core = Core(cm.model, cm.tokenizer, 2, 64)
    seqs = []
    for wanted in (True, False):
        s = Sequence(Request([1, 2, 3]), params(logprobs=wanted))
        s.state = SequenceState(cm.tokenizer, s.params, "auto", core.markers)
        seqs.append(s)
    vocab = cm.model.cfg.decoder.vocab_size
    logits = torch.full((2, vocab), -5.0)
    logits[0, [3000, 7]] = 2.0  # tied maxima: the lower id wins, as in torch.argmax
    logits[1, [50, 9]] = 1.0
    events = pick(logits, seqs)
    assert [e.token_id for e in events] == [7, 9]
    expected = 2.0 - math.log(2 * math.exp(2.0) + (vocab - 2) * math.exp(-5.0))
    assert events[0].logprob == pytest.approx(expected, abs=1e-4)  # float32 over 100k logits
    assert events[1].logprob is None  # not asked for: not computed
