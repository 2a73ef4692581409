"""Image -> NaFlex patches for the SigLIP-2 tower (DESIGN.md §2).

Numerically this is transformers' SigLIP-2 PIL image processor with the release's no-upscale size
rule in front of it: PIL bilinear resize on the uint8 RGB image, rescale in float64 then cast to
float32, normalise in float32, cut into row-major patches flattened as (row, col, channel).
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import astuple, dataclass, replace
from typing import TYPE_CHECKING, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from phi4rv.memory import ByteLRU

if TYPE_CHECKING:
    from phi4rv.config import Phi4RVConfig

ImageSource = Union[str, os.PathLike, bytes, Image.Image]


class ImageError(ValueError):
    """An input that can't be turned into an image; the message is meant for the user."""


@dataclass
class ImageProcessorConfig:
    patch_size: int = 16
    min_num_patches: int = 256
    max_num_patches: int = 3600
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    max_pixels: int = 89_478_485  # decompression-bomb limit (PIL's default), checked before decoding

    @classmethod
    def from_model(cls, cfg: Phi4RVConfig, base: ImageProcessorConfig | None = None) -> ImageProcessorConfig:
        """`base` (default: the defaults) with the patch size and patch budget the model was built for."""
        return replace(base or cls(), patch_size=cfg.vision.patch_size, min_num_patches=cfg.min_num_patches,
                       max_num_patches=cfg.max_num_patches)

    @classmethod
    def from_dict(cls, d: dict) -> ImageProcessorConfig:
        keys = ("patch_size", "min_num_patches", "max_num_patches", "rescale_factor")
        kw = {k: d[k] for k in keys if k in d}
        for k in ("image_mean", "image_std"):
            if k in d:
                kw[k] = tuple(float(x) for x in d[k])
        return cls(**kw)

    def to_dict(self) -> dict:
        # Same keys and values as the release's preprocessor_config.json.
        return {
            "auto_map": {"AutoProcessor": "processing_phi4_visionr.Phi4VisionRProcessor"},
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": list(self.image_mean),
            "image_processor_type": "Siglip2ImageProcessorNoUpscale",
            "image_std": list(self.image_std),
            "max_num_patches": self.max_num_patches,
            "min_num_patches": self.min_num_patches,
            "patch_size": self.patch_size,
            "processor_class": "Phi4VisionRProcessor",
            "rescale_factor": self.rescale_factor,
            "resample": int(Image.Resampling.BILINEAR),  # 2
        }


@dataclass
class ImagePatches:
    pixels: torch.Tensor  # [h*w, 3*p*p] float32, each patch flattened as (row, col, channel)
    grid: tuple[int, int]  # (h, w) in patches

    @functools.cached_property
    def digest(self) -> bytes:
        """A hash of the content, computed once: the pixels are never changed after processing
        (the image cache hands the same patches to every request that sends the image)."""
        return hashlib.blake2b(self.pixels.numpy().tobytes() + str(self.grid).encode(), digest_size=16).digest()


# ---------------------------------------------------------------------------------------------
# decoding


def _name(source: ImageSource) -> str:
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return "<PIL image>"
    return os.fspath(source)


def _too_large(w: int, h: int, max_pixels: int, name: str) -> ImageError:
    return ImageError(
        f"image too large: {w}x{h} = {w * h / 1e6:.1f}M pixels > limit {max_pixels / 1e6:.1f}M ({name})"
    )


def _open(source: ImageSource, name: str) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray)):
        fp = io.BytesIO(source)
    else:
        path = os.fspath(source)
        if not os.path.exists(path):
            raise ImageError(f"image not found: {name}")
        if os.path.isdir(path):
            raise ImageError(f"not an image (a directory): {name}")
        fp = path
    try:
        with warnings.catch_warnings():
            # We enforce our own limit just below; PIL's warning between 1x and 2x its limit is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(fp)
    except Image.DecompressionBombError as e:  # header claims > 2x PIL's limit; PIL refuses to open it
        raise ImageError(f"image too large: {e} ({name})") from None
    except UnidentifiedImageError:
        raise ImageError(f"not an image: {name}") from None
    except OSError as e:
        raise ImageError(f"cannot read image: {name} ({e})") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """transformers' `convert_to_rgb`: transparency is composited onto white, the rest is
    `convert("RGB")`. One deliberate difference: 16-bit greyscale ("I;16*") is scaled to 8 bits
    first, where PIL's convert would clip every value above 255 to white."""
    if img.mode.startswith("I;16"):
        a = np.asarray(img).astype(np.float64) / 257.0
        img = Image.fromarray(np.rint(a).astype(np.uint8))
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def image_size(source: ImageSource) -> tuple[int, int]:
    """(width, height) as `load_image` will see it (EXIF rotation applied), from the header only."""
    name = _name(source)
    img = _open(source, name)
    try:
        w, h = img.size
        if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 degrees
            w, h = h, w
        return w, h
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"corrupt image: {name} ({e})") from None
    finally:
        if img is not source:
            img.close()


def load_image(source: ImageSource, max_pixels: int = ImageProcessorConfig.max_pixels) -> Image.Image:
    """Decode `source` (path, raw bytes or PIL image) into an upright, fully loaded RGB image."""
    name = _name(source)
    img = _open(source, name)
    try:
        w, h = img.size
        if w * h > max_pixels:  # only the header has been read so far
            raise _too_large(w, h, max_pixels, name)
        img.load()
        if img is not source:  # ours: rotate in place, as the caller's image must stay as it was
            ImageOps.exif_transpose(img, in_place=True)
            return _to_rgb(img)  # always a new image
        return _to_rgb(ImageOps.exif_transpose(img))
    except OSError as e:
        kind = "truncated image" if "truncated" in str(e) else "corrupt image"
        raise ImageError(f"{kind}: {name} ({e})") from None
    except (SyntaxError, ValueError, EOFError) as e:  # what some PIL plugins raise on bad data
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"corrupt image: {name} ({e})") from None
    finally:
        if img is not source:
            img.close()


# ---------------------------------------------------------------------------------------------
# sizing


def size_for_max_patches(
    height: int, width: int, patch_size: int, max_num_patches: int, eps: float = 1e-5
) -> tuple[int, int]:
    """Largest (H, W) with at most `max_num_patches` patches, as SigLIP-2 computes it
    (transformers `get_image_size_for_max_num_patches`): binary search on one scale factor in
    [1e-6, 100], each side rounded up to a multiple of the patch, at least one patch. The float
    steps are kept identical so edge cases round the same way."""

    def side(scale: float, size: int) -> int:
        return max(patch_size, math.ceil(size * scale / patch_size) * patch_size)

    lo, hi = eps / 10, 100.0
    while hi - lo >= eps:
        mid = (lo + hi) / 2
        if (side(mid, height) // patch_size) * (side(mid, width) // patch_size) <= max_num_patches:
            lo = mid
        else:
            hi = mid
    return side(lo, height), side(lo, width)


def naflex_budget(height: int, width: int, cfg: ImageProcessorConfig) -> int:
    """The patch budget K of the no-upscale rule: native patch count clamped to [min, max]."""
    p = cfg.patch_size
    n = (height // p) * (width // p)
    return min(max(n, cfg.min_num_patches), cfg.max_num_patches)


def naflex_size(height: int, width: int, cfg: ImageProcessorConfig) -> tuple[int, int]:
    """Target (H, W) in pixels under the release's no-upscale rule (DESIGN.md §2)."""
    return size_for_max_patches(height, width, cfg.patch_size, naflex_budget(height, width, cfg))


# ---------------------------------------------------------------------------------------------
# patches


def process_image(image: ImageSource, cfg: ImageProcessorConfig) -> ImagePatches:
    img = load_image(image, cfg.max_pixels)
    p = cfg.patch_size
    H, W = naflex_size(img.height, img.width, cfg)
    img = img.resize((W, H), resample=Image.Resampling.BILINEAR)
    x = (np.asarray(img).astype(np.float64) * cfg.rescale_factor).astype(np.float32)  # [H, W, 3]
    x = (x - np.array(cfg.image_mean, np.float32)) / np.array(cfg.image_std, np.float32)
    h, w = H // p, W // p
    x = x.reshape(h, p, w, p, 3).transpose(0, 2, 1, 3, 4).reshape(h * w, p * p * 3)
    return ImagePatches(pixels=torch.from_numpy(np.ascontiguousarray(x)), grid=(h, w))


def process_images(images: Sequence[ImageSource], cfg: ImageProcessorConfig) -> list[ImagePatches]:
    return [process_image(im, cfg) for im in images]


class PatchCache:
    """Processed images by content: the same encoded bytes under the same settings are decoded and
    resized once (an API client resends a conversation's images with every turn). Least recently
    used out first, within `max_bytes` of patches; shared by threads."""

    def __init__(self, max_bytes: int):
        self.lru = ByteLRU(max_bytes)
        self.lock = threading.Lock()
        self.hits = self.lookups = 0

    @property
    def nbytes(self) -> int:
        return self.lru.nbytes

    def process(self, source: ImageSource, cfg: ImageProcessorConfig) -> ImagePatches:
        if not isinstance(source, (bytes, bytearray)):  # a file or a caller's image may change: not cached
            return process_image(source, cfg)
        key = (hashlib.blake2b(source, digest_size=16).digest(), astuple(cfg))
        with self.lock:
            self.lookups += 1
            cached = self.lru.get(key)
            if cached is not None:
                self.hits += 1
                return cached
        patches = process_image(source, cfg)
        with self.lock:
            self.lru.put(key, patches, patches.pixels.numel() * patches.pixels.element_size())
        return patches
