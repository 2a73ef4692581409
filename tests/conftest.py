import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

IMAGES = Path(__file__).resolve().parent.parent / "examples" / "images"


@pytest.fixture(scope="session")
def images_dir() -> Path:
    return IMAGES
