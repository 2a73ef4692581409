import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path

import pytest

IMAGES = Path(__file__).resolve().parent.parent / "examples" / "images"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and a busy machine makes two threads far slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def images_dir() -> Path:
    return IMAGES


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    """A Phi-4-layout tokenizer.json built offline from cl100k (~3 s, once per test process)."""
    from phi4rv.processing.tokenizer import build_phi4_tokenizer

    path = tmp_path_factory.mktemp("phi4_tokenizer")
    build_phi4_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tok_dir) -> Path:
    """A tiny random-weight checkpoint in the release format, with tokenizer and template."""
    import torch

    from phi4rv.checkpoint import save_checkpoint
    from phi4rv.config import preset
    from phi4rv.model import Phi4RV
    from phi4rv.processing.chat import DEFAULT_CHAT_TEMPLATE
    from phi4rv.processing.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(tok_dir)
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    torch.manual_seed(0)
    model = Phi4RV(preset("tiny"))
    model.init_weights(std=0.5)  # large weights: peaked, seed-stable next-token distributions
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny", tokenizer=tokenizer)
