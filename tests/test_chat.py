import os

import jinja2
import pytest

from phi4rv.processing.chat import (
    DEFAULT_CHAT_TEMPLATE,
    IMAGE_TOKEN_ID,
    MODES,
    box_center,
    encode_chat,
    mode_prefix,
    parse_box,
    release_messages,
    render_chat,
    to_pixels,
)
from phi4rv.processing.tokenizer import Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# A differently shaped template: plain (non-dash) tags that lean on trim_blocks/lstrip_blocks, a
# newline between turns but not after the last (loop.last), bos_token from the tokenizer, and a
# generation block around the content only, with <|im_end|> outside it.
OTHER_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
{% if loop.first and message.role != "system" %}
<|im_start|>system<|im_sep|>You are terse.<|im_end|>

{% endif %}
<|im_start|>{{ message.role }}<|im_sep|>
{%- if message.role == "assistant" %}
{% generation %}{{ message.content }}{% endgeneration %}<|im_end|>
{%- else %}
{{ message.content }}<|im_end|>
{%- endif %}
{% if not loop.last %}

{% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant<|im_sep|>
{%- endif %}
"""

TEXT_ONLY = [{"role": "user", "content": "What is the capital of France?"}]
ONE_IMAGE_PARTS = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]},
    {"role": "assistant", "content": "<|dummy_84|>A cat on a mat."},
]
ONE_IMAGE_TEXT = [
    {"role": "user", "content": "<image>\nDescribe this image."},
    {"role": "assistant", "content": "<|dummy_84|>A cat on a mat."},
]
MULTI_TURN = [
    {"role": "system", "content": "Answer in English."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello, how can I help?"},
    {"role": "user", "content": "Count to 3."},
    {"role": "assistant", "content": " 1, 2, 3 "},
    {"role": "user", "content": "Thanks."},
]
THINK_ANSWER = [
    {"role": "user", "content": "What is 17 * 23?"},
    {"role": "assistant", "content": "<think> 17 * 23 = 17 * 20 + 17 * 3 = 340 + 51 = 391 </think> 391"},
]
NOTHINK_ANSWER = [
    {"role": "user", "content": "Say yes."},
    {"role": "assistant", "content": "<|dummy_84|>Yes."},
]
TEXT_CASES = {"text_only": TEXT_ONLY, "multi_turn": MULTI_TURN, "think": THINK_ANSWER, "nothink": NOTHINK_ANSWER}


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def hf(tok_dir):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(tok_dir)  # not AutoTokenizer: see README, transformers 5


def _hf_encode(hf, messages, template, add_generation_prompt):
    out = hf.apply_chat_template(
        messages,
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]


@pytest.mark.parametrize("template", [DEFAULT_CHAT_TEMPLATE, OTHER_TEMPLATE], ids=["default", "other"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("case", list(TEXT_CASES))
def test_text_chats_match_transformers(tok, hf, template, add_generation_prompt, case):
    messages = TEXT_CASES[case]
    ids, mask = _hf_encode(hf, messages, template, add_generation_prompt)
    encoded = encode_chat(tok, messages, add_generation_prompt=add_generation_prompt, template=template)
    assert encoded.input_ids == ids
    assert encoded.assistant_mask == mask
    assert encoded.num_images == 0
    text = hf.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    assert render_chat(template, messages, add_generation_prompt, **tok.special_tokens())[0] == text
    if case != "text_only":
        assert any(mask)


@pytest.mark.parametrize("template", [DEFAULT_CHAT_TEMPLATE, OTHER_TEMPLATE], ids=["default", "other"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_image_chat_matches_transformers(tok, hf, template, add_generation_prompt):
    # transformers tokenizes "<image>" as text, while we cut the text there and put one IMAGE_TOKEN_ID
    # in its place, so the token sequences differ around the image. We compare what must agree:
    # the rendered text, and the assistant tokens (the image is in a user turn, so those are the same).
    messages = ONE_IMAGE_TEXT
    text = hf.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    assert render_chat(template, messages, add_generation_prompt, **tok.special_tokens())[0] == text
    assert "<image>\nDescribe" in text

    ids, mask = _hf_encode(hf, messages, template, add_generation_prompt)
    encoded = encode_chat(tok, messages, add_generation_prompt=add_generation_prompt, template=template)
    assert encode_chat(tok, ONE_IMAGE_PARTS, add_generation_prompt=add_generation_prompt, template=template) == encoded
    assert encoded.num_images == 1
    assert encoded.input_ids.count(IMAGE_TOKEN_ID) == 1
    assert [i for i, m in zip(encoded.input_ids, encoded.assistant_mask) if m] == [i for i, m in zip(ids, mask) if m]
    assert not encoded.assistant_mask[encoded.input_ids.index(IMAGE_TOKEN_ID)]
    # Everything but the image placeholder tokenizes as the text around it does.
    before, after = text.split("<image>")
    image_at = encoded.input_ids.index(IMAGE_TOKEN_ID)
    assert encoded.input_ids[:image_at] == tok.encode(before)
    assert encoded.input_ids[image_at + 1 :] == tok.encode(after)


def test_default_template_structure(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}, {"type": "image"},
                                     {"type": "text", "text": "Compare."}]},
    ]
    text, spans = render_chat(DEFAULT_CHAT_TEMPLATE, release_messages(messages, DEFAULT_CHAT_TEMPLATE),
                              add_generation_prompt=True)
    assert text.startswith("<|im_start|>system<|im_sep|>You are")
    assert text.count("<|im_start|>system") == 1
    assert "\n\nBe brief.<|im_end|><|im_start|>user<|im_sep|><image>\n<image>\nCompare.<|im_end|>" in text
    assert text.endswith("<|im_end|><|im_start|>assistant<|im_sep|>")
    assert spans == []
    # Without a system message the fixed one is still there.
    plain, _ = render_chat(DEFAULT_CHAT_TEMPLATE, TEXT_ONLY)
    assert plain.startswith("<|im_start|>system<|im_sep|>You are") and "\n\n" not in plain
    encoded = encode_chat(tok, messages)
    assert encoded.num_images == 2 and not any(encoded.assistant_mask)


def test_generation_spans_cover_assistant_content_and_end():
    text, spans = render_chat(DEFAULT_CHAT_TEMPLATE, MULTI_TURN)
    assert [text[a:b] for a, b in spans] == ["Hello, how can I help?<|im_end|>", " 1, 2, 3 <|im_end|>"]


def test_render_environment_matches_transformers():
    template = (
        "{{ messages[0].content | tojson }}|{{ tools is none }}|{{ extra }}|"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}|"
        "{{ strftime_now('%Y') | length }}"
    )
    text, _ = render_chat(template, [{"role": "user", "content": "<a & b>", "name": None}, {"role": "x", "content": ""}],
                          extra=7)
    assert text == '"<a & b>"|True|7|user|4'
    with pytest.raises(jinja2.exceptions.TemplateError, match="nope"):
        render_chat("{{ raise_exception('nope') }}", TEXT_ONLY)
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat("{{ messages.append(1) }}", TEXT_ONLY)
    with pytest.raises(TypeError, match="each message must be a dict"):
        render_chat(DEFAULT_CHAT_TEMPLATE, ["hi"])


@pytest.mark.parametrize("mode", MODES)
def test_mode_prefix_follows_the_generation_prompt(tok, mode):
    encoded = encode_chat(tok, TEXT_ONLY, mode=mode)
    base = encode_chat(tok, TEXT_ONLY, mode="auto")
    prefix = tok.encode(mode_prefix(mode))
    assert encoded.input_ids == base.input_ids + prefix
    assert not any(encoded.assistant_mask)
    if mode == "nothink":
        assert prefix == [tok.token_id("<|dummy_84|>")]
    # No generation prompt, no prefix.
    assert encode_chat(tok, TEXT_ONLY, mode=mode, add_generation_prompt=False).input_ids == base.input_ids[: -len(
        tok.encode("<|im_start|>assistant<|im_sep|>"))]


def test_unknown_mode_is_rejected(tok):
    with pytest.raises(ValueError, match="mode must be one of"):
        encode_chat(tok, TEXT_ONLY, mode="fast")


def test_encode_chat_uses_the_tokenizers_template(tok, tmp_path):
    tok.save(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    custom = Tokenizer.from_dir(tmp_path)
    assert custom.decode(encode_chat(custom, TEXT_ONLY).input_ids) == "[What is the capital of France?]"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The button is at [0.1, 0.2, 0.3, 0.4].", (0.1, 0.2, 0.3, 0.4)),
        ("[ 0.1234 ,0.5,  0.6000 , 0.9 ]", (0.1234, 0.5, 0.6, 0.9)),
        ("[0, 0, 1, 1]", (0.0, 0.0, 1.0, 1.0)),
        ("[.25, .5, 1., 1]", (0.25, 0.5, 1.0, 1.0)),
        ("first [0.1, 0.1, 0.2, 0.2] then [0.5, 0.5, 0.7, 0.8]", (0.5, 0.5, 0.7, 0.8)),
        ("[0.1, 0.2, 1.3, 0.4]", None),
        ("[165, 467, 218, 519]", None),
        ("[-0.1, 0.2, 0.3, 0.4]", None),
        ("[0.5, 0.2, 0.3, 0.4]", None),
        ("[0.1, 0.5, 0.3, 0.4]", None),
        ("good [0.1, 0.1, 0.2, 0.2] bad last [0.9, 0.1, 0.2, 0.2]", None),
        ("[0.1, 0.2, 0.3]", None),
        ("no box here", None),
    ],
)
def test_parse_box(text, expected):
    assert parse_box(text) == expected


def test_box_center_and_pixels():
    box = (0.1, 0.2, 0.3, 0.6)
    x, y = box_center(box)
    assert x == pytest.approx(0.2) and y == pytest.approx(0.4)
    assert to_pixels(box, 1000, 500) == pytest.approx((100.0, 100.0, 300.0, 300.0))


def test_patch_budget_from_detail_and_max_num_patches(tiny_ckpt):
    from phi4rv.chat_model import ChatModel

    cm = ChatModel.load(tiny_ckpt, device="cpu", max_num_patches=64)  # the tiny preset allows 16..256
    assert (cm.patch_budget("low"), cm.patch_budget("high"), cm.patch_budget("auto"), cm.patch_budget()) == (256, 256, 64, 64)
    with pytest.raises(ValueError, match="detail"):
        cm.patch_budget("medium")
    with pytest.raises(ValueError, match="maximum 256"):
        ChatModel.load(tiny_ckpt, device="cpu", max_num_patches=257)
