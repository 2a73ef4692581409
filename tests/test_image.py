import io
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from phi4rv.processing.image import (
    ImageError,
    ImagePatches,
    ImageProcessorConfig,
    load_image,
    naflex_budget,
    naflex_size,
    process_image,
    process_images,
    size_for_max_patches,
)

IMAGES = Path(__file__).resolve().parent.parent / "examples" / "images"
CFG = ImageProcessorConfig()

# The release's preprocessor_config.json, verbatim.
RELEASE_PREPROCESSOR_CONFIG = {
    "auto_map": {"AutoProcessor": "processing_phi4_visionr.Phi4VisionRProcessor"},
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "Siglip2ImageProcessorNoUpscale",
    "image_std": [0.5, 0.5, 0.5],
    "max_num_patches": 3600,
    "min_num_patches": 256,
    "patch_size": 16,
    "processor_class": "Phi4VisionRProcessor",
    "rescale_factor": 0.00392156862745098,
    "resample": 2,
}


def _rand_image(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    c = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2, "CMYK": 4}[mode]
    a = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    img = Image.fromarray(a[..., 0] if c == 1 else a)
    return img if img.mode == mode else Image.frombytes(mode, (w, h), a.tobytes())


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# parity with transformers' SigLIP-2 image processor (PIL backend)


def _hf_patches(img: Image.Image, max_num_patches: int) -> tuple[np.ndarray, tuple[int, int]]:
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    proc = Siglip2ImageProcessorPil(patch_size=16, max_num_patches=max_num_patches, do_convert_rgb=True)
    out = proc(images=[img], return_tensors="np")
    mask = out["pixel_attention_mask"][0].astype(bool)
    h, w = (int(x) for x in out["spatial_shapes"][0])
    assert mask.sum() == h * w and mask[: h * w].all()
    return out["pixel_values"][0][mask], (h, w)


def _check_parity(img: Image.Image, source=None) -> ImagePatches:
    ours = process_image(img if source is None else source, CFG)
    rgb = load_image(img)
    k = naflex_budget(rgb.height, rgb.width, CFG)
    ref, grid = _hf_patches(img, k)
    assert ours.grid == grid
    assert ours.pixels.dtype.is_floating_point and ours.pixels.shape == (grid[0] * grid[1], 768)
    assert np.abs(ours.pixels.numpy() - ref).max() <= 1e-5
    return ours


@pytest.mark.parametrize("name", ["desktop_screenshot.png", "photo.jpg"])
def test_parity_real_images(name):
    path = IMAGES / name
    with Image.open(path) as img:
        img.load()
        ours = _check_parity(img, source=path)
    h, w = ours.grid
    assert CFG.min_num_patches <= h * w <= CFG.max_num_patches


@pytest.mark.parametrize(
    "wh",
    [(10, 10), (4000, 3000), (3000, 20), (20, 3000), (512, 256), (960, 960), (37, 1001), (333, 777)],
)
def test_parity_synthetic(wh):
    _check_parity(_rand_image(*wh, seed=wh[0] * 7 + wh[1]))


def test_size_rule_matches_transformers():
    from transformers.models.siglip2.image_processing_pil_siglip2 import get_image_size_for_max_num_patches

    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 5000, (300, 2)).tolist() + [[16, 16], [540, 960], [1, 1], [3000, 20]]
    for h, w in sizes:
        for k in (1, 7, 256, 1000, 3600, naflex_budget(h, w, CFG)):
            assert size_for_max_patches(h, w, 16, k) == get_image_size_for_max_num_patches(h, w, 16, k)


def test_convert_to_rgb_matches_transformers():
    from transformers.image_transforms import convert_to_rgb

    pal = _rand_image(40, 30, "RGB", seed=3).quantize(16)
    pal.info["transparency"] = 5
    images = [_rand_image(40, 30, m, seed=i) for i, m in enumerate(["RGBA", "LA", "L", "CMYK", "RGB"])]
    images += [pal, _rand_image(40, 30, "RGB", seed=4).quantize(16), _rand_image(40, 30, "L").convert("1")]
    for img in images:
        ours = load_image(img)
        assert ours.mode == "RGB" and ours.size == img.size
        ref = convert_to_rgb(img, return_numpy=True)
        np.testing.assert_array_equal(np.asarray(ours), ref, err_msg=img.mode)


# ------------------------------------------------------------------------------------------------
# the no-upscale size rule


def _patches(hw: tuple[int, int]) -> int:
    return (hw[0] // 16) * (hw[1] // 16)


@pytest.mark.parametrize("hw", [(512, 256), (256, 512), (960, 960), (1024, 768), (16 * 50, 16 * 72)])
def test_naflex_keeps_multiples_in_range(hw):
    assert CFG.min_num_patches <= _patches(hw) <= CFG.max_num_patches
    assert naflex_size(*hw, CFG) == hw


def test_naflex_small_image_goes_up_to_min():
    assert naflex_size(10, 10, CFG) == (256, 256)
    assert naflex_size(100, 150, CFG) == (208, 304)  # 13x19 = 247 <= 256 patches
    for h, w in [(10, 10), (100, 150), (200, 200), (33, 47)]:
        H, W = naflex_size(h, w, CFG)
        assert H > h and W > w and H % 16 == 0 and W % 16 == 0
        assert 200 <= _patches((H, W)) <= CFG.min_num_patches


def test_naflex_huge_image_goes_down_to_max():
    assert naflex_size(3000, 4000, CFG) == (832, 1104)  # 52x69 = 3588 patches
    for h, w in [(3000, 4000), (8000, 8000), (1080, 1920), (5000, 1200)]:
        H, W = naflex_size(h, w, CFG)
        assert H < h and W < w
        assert 3400 <= _patches((H, W)) <= CFG.max_num_patches


def test_naflex_in_range_never_upscales():
    # One scale for both sides: 540x960 has 33x60 native patches, but 60 patches wide needs a
    # scale > 540/528 allows for the height, so the width also loses a bit (960 -> 944).
    assert naflex_size(540, 960, CFG) == (528, 944)
    rng = np.random.default_rng(2)
    for h, w in rng.integers(16, 2000, (300, 2)).tolist():
        H, W = naflex_size(h, w, CFG)
        assert H % 16 == 0 and W % 16 == 0 and H >= 16 and W >= 16
        n = _patches((h, w))
        assert _patches((H, W)) <= max(n, CFG.min_num_patches)
        if CFG.min_num_patches <= n <= CFG.max_num_patches:
            assert H <= h and W <= w
        assert _patches((H, W)) <= CFG.max_num_patches


def test_naflex_extreme_aspect():
    # A 20-pixel-wide strip stays one patch wide; the rule shrinks it rather than distorting it.
    assert naflex_size(3000, 20, CFG) == (2400, 16)
    assert naflex_size(20, 3000, CFG) == (16, 2400)


# ------------------------------------------------------------------------------------------------
# output layout


def test_patch_layout_row_major_row_col_channel():
    cfg = ImageProcessorConfig(min_num_patches=1)
    a = np.random.default_rng(5).integers(0, 256, (32, 48, 3), dtype=np.uint8)  # 2x3 patches, kept as is
    out = process_image(Image.fromarray(a), cfg)
    assert out.grid == (2, 3) and out.pixels.shape == (6, 768) and out.pixels.dtype.is_floating_point
    x = (a.astype(np.float32) / 255 - 0.5) / 0.5
    for r in range(2):
        for c in range(3):
            patch = x[16 * r : 16 * r + 16, 16 * c : 16 * c + 16]  # [row, col, channel]
            np.testing.assert_allclose(out.pixels[r * 3 + c].numpy(), patch.reshape(-1), atol=1e-6)


def test_process_images_and_sources(tmp_path):
    img = _rand_image(300, 200, seed=9)
    path = tmp_path / "a.png"
    img.save(path)
    outs = process_images([img, path, str(path), path.read_bytes()], CFG)
    assert len(outs) == 4
    for o in outs[1:]:
        assert o.grid == outs[0].grid and (o.pixels == outs[0].pixels).all()


# ------------------------------------------------------------------------------------------------
# config


def test_config_roundtrip():
    cfg = ImageProcessorConfig.from_dict({**RELEASE_PREPROCESSOR_CONFIG, "something_else": 1})
    assert cfg == ImageProcessorConfig()
    assert cfg.to_dict() == RELEASE_PREPROCESSOR_CONFIG
    other = ImageProcessorConfig.from_dict(
        {"patch_size": 14, "max_num_patches": 1024, "image_mean": [0.1, 0.2, 0.3]}
    )
    assert (other.patch_size, other.max_num_patches, other.min_num_patches) == (14, 1024, 256)
    assert other.image_mean == (0.1, 0.2, 0.3)
    assert ImageProcessorConfig.from_dict(other.to_dict()) == other


def test_config_from_model_takes_patch_settings_from_the_model_and_the_rest_from_base():
    from phi4rv.config import Phi4RVConfig, VisionConfig

    model_cfg = Phi4RVConfig(vision=VisionConfig(patch_size=14), min_num_patches=4, max_num_patches=64)
    cfg = ImageProcessorConfig.from_model(model_cfg)
    assert (cfg.patch_size, cfg.min_num_patches, cfg.max_num_patches) == (14, 4, 64)
    assert cfg.image_mean == ImageProcessorConfig().image_mean
    base = ImageProcessorConfig(max_num_patches=9, image_mean=(0.1, 0.2, 0.3))
    cfg = ImageProcessorConfig.from_model(model_cfg, base)
    assert (cfg.patch_size, cfg.max_num_patches, cfg.image_mean) == (14, 64, (0.1, 0.2, 0.3))
    assert base.max_num_patches == 9  # not changed in place


# ------------------------------------------------------------------------------------------------
# input handling


def test_rgba_composited_on_white():
    a = np.zeros((8, 8, 4), np.uint8)
    a[..., 0] = 200  # red, fully transparent on the left half, opaque on the right
    a[:, 4:, 3] = 255
    rgb = np.asarray(load_image(Image.fromarray(a, "RGBA")))
    assert (rgb[:, :4] == 255).all()
    assert (rgb[:, 4:] == [200, 0, 0]).all()


def test_palette_with_transparency(tmp_path):
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.putpixel((0, 0), 0)
    path = tmp_path / "p.png"
    pal.save(path, transparency=0)
    rgb = np.asarray(load_image(path))
    assert (rgb[0, 0] == 255).all() and (rgb[1, 1] == [10, 20, 30]).all()


def test_greyscale_modes(tmp_path):
    rgb = np.asarray(load_image(Image.fromarray(np.full((4, 4), 77, np.uint8))))
    assert rgb.shape == (4, 4, 3) and (rgb == 77).all()
    la = np.asarray(load_image(Image.fromarray(np.dstack([np.full((4, 4), 77, np.uint8)] * 2), "LA")))
    assert la.shape == (4, 4, 3) and (la == round(77 * 77 / 255 + 255 * (1 - 77 / 255))).all()
    # 16-bit greyscale is scaled to 8 bits (PIL's convert("RGB") would clip it to white).
    a16 = np.array([[0, 257, 32896, 65535]], np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(a16).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16"
    assert np.asarray(load_image(path))[0, :, 0].tolist() == [0, 1, 128, 255]


def test_cmyk_jpeg():
    data = _encode(_rand_image(40, 24, "CMYK", seed=6), "JPEG")
    img = load_image(data)
    assert img.mode == "RGB" and img.size == (40, 24)


def test_exif_orientation(tmp_path):
    img = _rand_image(64, 32, seed=7)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif.tobytes())
    with Image.open(path) as raw:
        assert raw.size == (64, 32)
    out = load_image(path)
    assert out.size == (32, 64)
    assert process_image(path, ImageProcessorConfig(min_num_patches=1)).grid == (4, 2)
    assert load_image(path.read_bytes()).size == (32, 64)
    with Image.open(path) as caller:  # a caller's image is read, not rotated in place
        assert load_image(caller).size == (32, 64)
        assert caller.size == (64, 32) and caller.getexif().get(0x0112) == 6


def test_not_an_image(tmp_path):
    path = tmp_path / "foo.txt"
    path.write_text("hello, I am not a picture\n")
    with pytest.raises(ImageError, match=r"^not an image: .*foo\.txt"):
        load_image(path)
    with pytest.raises(ImageError, match="not an image"):
        process_image(b"\x00\x01garbage", CFG)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="not found.*nope.png"):
        load_image(tmp_path / "nope.png")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(tmp_path, fmt):
    data = _encode(_rand_image(128, 96, seed=8), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"^truncated image: .*cut\."):
        load_image(path)


def _png_claiming(width: int, height: int) -> bytes:
    """A small real PNG whose IHDR is rewritten to claim width x height (the data stays tiny)."""
    data = bytearray(_encode(_rand_image(8, 8, seed=0), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_pixel_limit_checked_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_claiming(5000, 4000))  # would fail as truncated if it were decoded
    with pytest.raises(ImageError, match=r"^image too large: 5000x4000 = 20\.0M pixels > limit 1\.0M"):
        load_image(path, max_pixels=1_000_000)
    with pytest.raises(ImageError, match="truncated"):
        load_image(path)  # under the default limit: decoding is attempted
    with pytest.raises(ImageError, match="image too large"):
        process_image(_png_claiming(3000, 3000), ImageProcessorConfig(max_pixels=8_000_000))
    with pytest.raises(ImageError, match=r"^image too large: 10000x10000 = 100\.0M pixels > limit 89\.5M"):
        load_image(_png_claiming(10000, 10000))
    with pytest.raises(ImageError, match="image too large"):  # beyond 2x PIL's own limit
        load_image(_png_claiming(20000, 20000))
    with Image.open(path) as im, pytest.raises(ImageError, match="image too large"):
        load_image(im, max_pixels=1000)  # an opened, not yet decoded PIL image


def test_patch_cache_processes_the_same_bytes_once_per_setting(tmp_path):
    from phi4rv.processing.image import PatchCache

    data = [_encode(_rand_image(64, 48, seed=i), "PNG") for i in range(3)]
    cfg = ImageProcessorConfig(min_num_patches=1, max_num_patches=16)
    size = process_image(data[0], cfg).pixels.numel() * 4
    cache = PatchCache(max_bytes=2 * size)
    first = cache.process(data[0], cfg)
    assert torch.equal(first.pixels, process_image(data[0], cfg).pixels) and first.grid == process_image(data[0], cfg).grid
    assert cache.process(bytes(data[0]), cfg) is first and (cache.hits, cache.lookups) == (1, 2)
    assert cache.process(data[0], replace(cfg, max_num_patches=8)) is not first  # another budget: processed anew
    cache.process(data[1], cfg)  # over the byte budget: the least recently used entry goes
    assert cache.nbytes <= 2 * size and len(cache.lru) == 2
    assert cache.process(data[0], cfg) is not first
    path = tmp_path / "a.png"
    path.write_bytes(data[2])
    assert cache.process(path, cfg) is not cache.process(path, cfg)  # a file can change: never cached
