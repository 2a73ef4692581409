"""The release's own chat template (tests/fixtures/chat_template.jinja, verbatim) through every path.

The reference for a prompt is what the release's processor does: the template rendered by
transformers' `apply_chat_template` over string contents in which each image is `<image>\\n`,
the mode marker appended, the text cut at each `<image>` and each cut filled with the image's
h*w placeholder positions (LLaVA's -200), every piece tokenized by transformers' tokenizer.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from phi4rv.chat_model import ChatModel
from phi4rv.data.dataset import SampleEncoder
from phi4rv.data.formats import Sample
from phi4rv.eval.backends import LocalBackend, Query
from phi4rv.generation.sampling import SamplingParams
from phi4rv.processing.chat import DEFAULT_CHAT_TEMPLATE, encode_chat, mode_prefix
from phi4rv.processing.image import ImageProcessorConfig, naflex_size
from phi4rv.processing.reasoning import MODES
from phi4rv.processing.tokenizer import Tokenizer
from phi4rv.processing.tokens import IGNORE_INDEX, IMAGE_TOKEN_ID, expand_image_tokens

RELEASE_TEMPLATE = (Path(__file__).parent / "fixtures" / "chat_template.jinja").read_text(encoding="utf-8")
TEMPLATES = {"release": RELEASE_TEMPLATE, "phi4rv": DEFAULT_CHAT_TEMPLATE}
GRIDS = [(3, 4), (2, 2), (1, 5)]  # the patch grids of the images, in order

# Each case: (messages as an entry point gives them, the same in the release's contract).
IMG = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
CASES = {
    "text_only": (
        [{"role": "user", "content": "What is 2+2?"}],
        [{"role": "user", "content": "What is 2+2?"}],
    ),
    "one_image_parts": (
        [{"role": "user", "content": [IMG, {"type": "text", "text": "Describe this."}]}],
        [{"role": "user", "content": "<image>\nDescribe this."}],
    ),
    "one_image_string": (
        [{"role": "user", "content": "<image>\nDescribe this."}],
        [{"role": "user", "content": "<image>\nDescribe this."}],
    ),
    "several_images": (
        [{"role": "user", "content": [{"type": "text", "text": "Compare "}, IMG, {"type": "text", "text": "and "},
                                      {"type": "image"}, {"type": "text", "text": "then "}, IMG]}],
        [{"role": "user", "content": "Compare <image>\nand <image>\nthen <image>\n"}],
    ),
    "multi_turn": (
        [{"role": "user", "content": [IMG, {"type": "text", "text": "What is shown?"}]},
         {"role": "assistant", "content": "<|dummy_84|>A chart."},
         {"role": "user", "content": "Sum the bars."},
         {"role": "assistant", "content": "<think>3 + 4 = 7</think>7"},
         {"role": "user", "content": [{"type": "text", "text": "And the mean?"}]}],
        [{"role": "user", "content": "<image>\nWhat is shown?"},
         {"role": "assistant", "content": "<|dummy_84|>A chart."},
         {"role": "user", "content": "Sum the bars."},
         {"role": "assistant", "content": "<think>3 + 4 = 7</think>7"},
         {"role": "user", "content": "And the mean?"}],
    ),
}


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def hf(tok_dir):
    from transformers import PreTrainedTokenizerFast

    # not AutoTokenizer: transformers 5 gives a GPT2Tokenizer folder GPT-2's split (README, transformers)
    return PreTrainedTokenizerFast.from_pretrained(tok_dir)


def release_processor(hf, template, messages, mode, grids, add_generation_prompt=True):
    """(text, ids) as the release's processor builds them from release-contract messages."""
    text = hf.apply_chat_template(messages, chat_template=template, add_generation_prompt=add_generation_prompt,
                                  tokenize=False)
    if add_generation_prompt:
        text += {"auto": "", "think": "<think>", "nothink": "<|dummy_84|>"}[mode]
    ids = []
    for k, piece in enumerate(text.split("<image>")):
        if k:
            h, w = grids[k - 1]
            ids += [-200] * (h * w)
        ids += hf(piece, add_special_tokens=False)["input_ids"]
    return text, ids


@pytest.mark.parametrize("template", list(TEMPLATES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_prompt_ids_equal_the_release_processor(tok, hf, template, mode, case):
    given, contract = CASES[case]
    text, ref_ids = release_processor(hf, TEMPLATES[template], contract, mode, GRIDS)
    enc = encode_chat(tok, given, mode=mode, template=TEMPLATES[template])
    grids = GRIDS[: enc.num_images]
    assert expand_image_tokens(enc.input_ids, grids) == ref_ids
    assert enc.num_images == text.count("<image>")
    assert IMAGE_TOKEN_ID == -200


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_assistant_mask_equals_transformers(tok, hf, template):
    # Text-only turns: transformers' own assistant mask from the {% generation %} blocks is the reference.
    _, contract = CASES["multi_turn"]
    messages = [{**m, "content": m["content"].replace("<image>\n", "")} for m in contract]
    ref = hf.apply_chat_template(messages, chat_template=TEMPLATES[template], tokenize=True, return_dict=True,
                                 return_assistant_tokens_mask=True)
    enc = encode_chat(tok, messages, add_generation_prompt=False, template=TEMPLATES[template])
    assert enc.input_ids == list(ref["input_ids"])
    assert enc.assistant_mask == [bool(m) for m in ref["assistant_masks"]]
    masked = tok.decode([i for i, m in zip(enc.input_ids, enc.assistant_mask) if m])
    assert "A chart." in masked and "<think>3 + 4 = 7</think>7" in masked and "Sum the bars" not in masked


def test_release_template_drops_system_turns_so_phi4rv_folds_them_into_the_first_user_turn(tok, hf):
    messages = [{"role": "system", "content": "Answer in French."},
                {"role": "user", "content": [IMG, {"type": "text", "text": "What is it?"}]}]
    text, ref_ids = release_processor(
        hf, RELEASE_TEMPLATE, [{"role": "user", "content": "Answer in French.\n\n<image>\nWhat is it?"}], "auto", GRIDS)
    enc = encode_chat(tok, messages, template=RELEASE_TEMPLATE)
    assert expand_image_tokens(enc.input_ids, GRIDS[:1]) == ref_ids
    assert text.count("Answer in French.") == 1
    # A developer turn is a system turn; with no user turn after it, it becomes a user turn.
    alone = encode_chat(tok, [{"role": "developer", "content": "Be brief."}], template=RELEASE_TEMPLATE)
    assert "<|im_start|>user<|im_sep|>Be brief.<|im_end|>" in tok.decode(alone.input_ids)


def test_phi4rv_template_keeps_system_turns_in_its_system_part(tok):
    messages = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"}]
    text = tok.decode(encode_chat(tok, messages, template=DEFAULT_CHAT_TEMPLATE).input_ids)
    assert "\n\nAnswer in French.<|im_end|><|im_start|>user<|im_sep|>Hi<|im_end|>" in text


@pytest.mark.parametrize("content", [[{"type": "audio", "audio": "x"}], [{"text": "no type"}], [{"type": "text"}], 7])
def test_bad_content_is_a_clear_error(tok, content):
    with pytest.raises(ValueError, match="part|content|text"):
        encode_chat(tok, [{"role": "user", "content": content}], template=RELEASE_TEMPLATE)


def test_mode_prefix_after_the_release_generation_prompt(tok):
    for mode in MODES:
        text = tok.decode(encode_chat(tok, [{"role": "user", "content": "Hi"}], mode=mode,
                                      template=RELEASE_TEMPLATE).input_ids)
        assert text.endswith("<|im_start|>assistant<|im_sep|>\n" + mode_prefix(mode))


# ---- every entry point on a checkpoint that carries the release's template ----------------------


@pytest.fixture(scope="module", params=list(TEMPLATES))
def ckpt(request, tiny_ckpt, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"ckpt_{request.param}") / "model"
    shutil.copytree(tiny_ckpt, path)
    (path / "chat_template.jinja").write_text(TEMPLATES[request.param], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def photo(images_dir):
    return str(images_dir / "photo.jpg")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "phi4rv", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_chat_model_text_and_image(ckpt, photo):
    cm = ChatModel.load(ckpt, device="cpu")
    assert cm.tokenizer.chat_template == (ckpt / "chat_template.jinja").read_text(encoding="utf-8")
    params = cm.params(max_new_tokens=4, sampling=SamplingParams(temperature=0))
    for messages, images in ([{"role": "user", "content": "Hello"}], []), (CASES["one_image_parts"][0], [photo]):
        r = cm.chat(messages, images, "auto", params)
        assert len(r.token_ids) == 4 and r.usage["image_tokens"] == (len(images) and r.usage["image_tokens"])
    with pytest.raises(ValueError, match="2 <image> tag"):
        cm.prepare([{"role": "user", "content": "<image>\n<image>\nTwo?"}], [photo], "auto")


def test_chat_cli_server_and_eval_give_the_same_greedy_tokens(ckpt, photo, images_dir):
    from test_serve import Server, data_uri

    prompt = "Describe this."
    cli = run_cli("chat", "--model", ckpt, "--image", photo, "--json", "--temperature", "0", "--max-new-tokens", "6",
                  "--mode", "think", prompt)
    assert cli.returncode == 0, cli.stderr
    chat = json.loads(cli.stdout)
    assert len(chat["token_ids"]) == 6

    server = Server(ckpt)
    try:
        r = server.client().chat.completions.create(
            model="tiny", max_tokens=6, temperature=0, reasoning_effort="high", logprobs=True,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(photo)}},
                                                   {"type": "text", "text": prompt}]}])
    finally:
        server.stop()
    served = r.choices[0].logprobs.content
    cm = ChatModel.load(ckpt, device="cpu")
    assert [bytes(t.bytes) for t in served] == [cm.tokenizer.token_bytes(i) for i in chat["token_ids"]]
    assert [t.logprob for t in served] == pytest.approx(chat["logprobs"], abs=1e-5)
    assert r.usage.prompt_tokens == chat["usage"]["prompt_tokens"]

    backend = LocalBackend(ckpt, warmup=False)
    [(_, reply)] = list(backend.generate([Query([{"role": "user", "content": f"<image>\n{prompt}"}], [photo],
                                                "think", 6)]))
    assert reply.error is None and reply.output == chat["text"]


def test_cli_text_only_and_a_bad_prompt(ckpt, photo):
    out = run_cli("chat", "--model", ckpt, "--temperature", "0", "--max-new-tokens", "3", "Hello")
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
    bad = run_cli("chat", "--model", ckpt, "--image", photo, "--max-new-tokens", "3", "<image>\n<image>\nTwo?")
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "<image> tag" in bad.stderr


def test_dataset_encoding_with_the_release_template(tok, tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 48), "white").save(image)
    sample = Sample("s", [{"role": "user", "content": "<image>\nWhat colour?"},
                          {"role": "assistant", "content": "White."}], [str(image)], {})
    cfg = ImageProcessorConfig(min_num_patches=4, max_num_patches=64)
    ex = SampleEncoder(tok, cfg, max_len=4096, template=RELEASE_TEMPLATE).encode(sample)
    H, W = naflex_size(48, 64, cfg)
    assert ex.grids == [(H // 16, W // 16)]
    answer = [t for t in ex.targets if t != IGNORE_INDEX]
    # The nothink marker is added to a plain answer; the answer and <|im_end|> (and the template's
    # newline after it, inside its generation block) carry loss, nothing else does.
    assert tok.decode(answer) == "<|dummy_84|>White.<|im_end|>\n"
