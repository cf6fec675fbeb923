"""Image loading/preprocessing: SPEC §2 sizes, tile order, padding, normalisation, bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from smolvlm.processing.errors import ImageError
from smolvlm.processing.image import (
    ImageProcessor,
    ImageProcessorConfig,
    grid_size,
    load_image,
    plan_layout,
    resize_longest_edge,
)

CFG_512 = ImageProcessorConfig(longest_edge=2048, max_image_size=512, resample=1)
CFG_384 = ImageProcessorConfig(longest_edge=1536, max_image_size=384, resample=1)


@pytest.mark.parametrize(
    "cfg, w, h, step1, grid, rc",
    [  # SPEC §2.4 worked examples (all verified there against transformers 5.23)
        (CFG_512, 640, 480, (1536, 2048), (1536, 2048), (3, 4)),
        (CFG_512, 480, 640, (2048, 1536), (2048, 1536), (4, 3)),
        (CFG_512, 1000, 1000, (2048, 2048), (2048, 2048), (4, 4)),
        (CFG_512, 100, 30, (614, 2048), (1024, 2048), (2, 4)),
        (CFG_512, 1600, 1104, (1414, 2048), (1536, 2048), (3, 4)),
        (CFG_512, 769, 1536, (2048, 1026), (2048, 1536), (4, 3)),
        (CFG_512, 4000, 10, (6, 2048), (512, 2048), (1, 4)),
        (CFG_384, 640, 480, (1152, 1536), (1152, 1536), (3, 4)),
        (CFG_384, 100, 30, (460, 1536), (768, 1536), (2, 4)),
        (CFG_384, 1600, 1104, (1060, 1536), (1152, 1536), (3, 4)),
    ],
)
def test_spec_layouts(cfg, w, h, step1, grid, rc):
    lay = plan_layout(h, w, cfg, True)
    assert lay.resized == step1 and lay.grid == grid and (lay.rows, lay.cols) == rc
    assert lay.num_arrays == rc[0] * rc[1] + 1


def test_size_rules():
    assert resize_longest_edge(1, 1, 2048) == (2048, 2048)
    assert resize_longest_edge(1, 4000, 2048) == (1, 2048)  # int(0.5) = 0 -> even 0 -> clamped to 1
    assert resize_longest_edge(1104, 1600, 2048) == (1414, 2048)  # 1413 odd -> 1414
    # the 4096 cap (only with L > 4096) does not re-round to even
    assert resize_longest_edge(1000, 3001, 6000) == (1365, 4096)  # 2000 -> int(4096 / 3), odd
    assert grid_size(2048, 2048, 512) == (2048, 2048)
    assert plan_layout(480, 640, CFG_512, False).grid == (512, 512)
    lay = plan_layout(16, 16, ImageProcessorConfig(longest_edge=16, max_image_size=16), True)
    assert (lay.rows, lay.cols, lay.num_arrays) == (0, 0, 1)  # exactly M: no split


def _quadrants() -> Image.Image:
    a = np.zeros((64, 64, 3), np.uint8)
    a[:32, :32] = (255, 0, 0)
    a[:32, 32:] = (0, 255, 0)
    a[32:, :32] = (0, 0, 255)
    a[32:, 32:] = (255, 255, 255)
    return Image.fromarray(a)


def test_tiles_row_major_then_global_and_normalisation():
    proc = ImageProcessor(ImageProcessorConfig(longest_edge=64, max_image_size=32, resample=1))
    tiles, lay = proc.split(_quadrants())
    assert (lay.rows, lay.cols) == (2, 2) and len(tiles) == 5
    # tile (r, c) covers y in [32r, 32r+32), x in [32c, 32c+32); sizes unchanged, so pixels are exact
    assert [tuple(t[5, 5]) for t in tiles[:4]] == [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
    assert tiles[4].shape == (32, 32, 3)  # global image, resized from the grid image
    x = proc.normalize(tiles[0])  # (3, 32, 32)
    assert x.dtype == np.float32 and x.shape == (3, 32, 32)
    assert x[0, 0, 0] == 1.0 and x[1, 0, 0] == -1.0
    assert x[0, 0, 0] == np.float32((np.float64(255) * (1 / 255) - 0.5) / 0.5)


def test_batch_padding_and_mask():
    proc = ImageProcessor(ImageProcessorConfig(longest_edge=64, max_image_size=32, resample=1))
    batch = proc([[_quadrants()], [], [_quadrants(), np.zeros((10, 10, 3), np.uint8)]])
    assert batch.pixel_values.shape == (3, 10, 3, 32, 32) and batch.pixel_values.dtype == np.float32
    assert batch.pixel_attention_mask.shape == (3, 10, 32, 32) and batch.pixel_attention_mask.dtype == np.int64
    assert batch.pixel_attention_mask.sum(axis=(2, 3)).tolist()[0] == [1024] * 5 + [0] * 5
    assert (batch.pixel_values[0, 5:] == 0).all() and (batch.pixel_values[1] == 0).all()
    assert batch.rows == [[2], [], [2, 2]]
    no_split = proc([[_quadrants()]], do_image_splitting=False)
    assert no_split.pixel_values.shape == (1, 1, 3, 32, 32)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16", "float32"])
def test_pixel_dtype_builds_what_the_model_reads(dtype_name):
    """``pixel_dtype``: torch tensors, each tile cast as it is written: exactly the reference's float32
    batch cast afterwards (bf16 rounds to nearest even either way), and the mask as bool (``!= 0``),
    padded tiles and rows included."""
    import torch

    dtype = getattr(torch, dtype_name)
    proc = ImageProcessor(ImageProcessorConfig(longest_edge=64, max_image_size=32, resample=1))
    rng = np.random.default_rng(0)
    images = [[Image.fromarray(rng.integers(0, 256, (50, 40, 3), dtype=np.uint8))], [],
              [_quadrants(), np.zeros((10, 10, 3), np.uint8)]]
    want = proc(images)
    got = proc(images, pixel_dtype=dtype)
    assert got.pixel_values.dtype == dtype and got.pixel_attention_mask.dtype == torch.bool
    assert torch.equal(got.pixel_values, torch.from_numpy(want.pixel_values).to(dtype))
    assert torch.equal(got.pixel_attention_mask, torch.from_numpy(want.pixel_attention_mask) != 0)
    assert got.rows == want.rows and got.cols == want.cols


def test_a_batch_hands_its_temporaries_back(monkeypatch):
    """Once the batch arrays are built, the resized images and per-tile temporaries go back to the OS
    (``smolvlm.memory``) before the model's work on the batch, not at the next prefill: once per call,
    after the arrays exist."""
    import smolvlm.processing.image as image_mod

    proc = ImageProcessor(ImageProcessorConfig(longest_edge=64, max_image_size=32, resample=1))
    seen = []
    monkeypatch.setattr(image_mod, "release_freed_memory", lambda: seen.append("release"))
    real_pad = image_mod.pad_arrays
    monkeypatch.setattr(image_mod, "pad_arrays", lambda *a, **k: seen.append("arrays") or real_pad(*a, **k))
    proc([[_quadrants()], [_quadrants()]])
    assert seen == ["arrays", "release"]


def test_config_from_file(ref256):
    cfg = ImageProcessorConfig.from_pretrained(ref256)
    assert (cfg.longest_edge, cfg.max_image_size, cfg.resample) == (2048, 512, Image.Resampling.LANCZOS)
    assert cfg.rescale_factor == 0.00392156862745098 and cfg.image_mean == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="do_pad"):
        ImageProcessorConfig.from_dict({"do_pad": False})
    with pytest.raises(FileNotFoundError):
        ImageProcessorConfig.from_pretrained(ref256 / "nope")


def test_input_kinds(tmp_path):
    rgba = np.zeros((5, 6, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 0  # fully transparent -> white after compositing
    assert (np.asarray(load_image(rgba)) == 255).all()
    assert (np.asarray(load_image(Image.fromarray(rgba, "RGBA"))) == 255).all()
    path = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(path)
    # from a file 5.23 uses convert("RGB"): alpha dropped, hidden colour kept
    assert tuple(np.asarray(load_image(path))[0, 0]) == (200, 0, 0)
    assert load_image(str(path)).mode == "RGB"
    assert np.array_equal(np.asarray(load_image(np.full((4, 3), 7, np.uint8))), np.full((4, 3, 3), 7, np.uint8))
    buf = io.BytesIO()
    Image.new("L", (3, 2), 9).save(buf, format="PNG")
    assert load_image(buf.getvalue()).size == (3, 2)
    import base64

    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    assert load_image(uri).size == (3, 2)


def test_exif_only_for_files(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    im = Image.new("RGB", (40, 20))
    path = tmp_path / "r.jpg"
    im.save(path, exif=exif.tobytes())
    assert load_image(path).size == (20, 40)  # 5.23 load_image applies exif_transpose
    assert load_image(Image.open(path)).size == (40, 20)  # ...but not to PIL inputs


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((0, 5, 3), np.uint8), "empty"),
        (np.zeros((5, 5, 3), np.float32), "uint8"),
        (np.full((5, 5, 3), np.nan, np.float32), "NaN"),
        (np.zeros((5, 5, 2), np.uint8), "shape"),
        (np.zeros((2, 5, 5, 3), np.uint8), "shape"),
        (b"", "empty"),
        (b"not an image at all", "not a recognised image"),
        (12, "unsupported image type"),
        ("https://example.com/x.png", "allow_remote"),
    ],
)
def test_bad_inputs(bad, match):
    with pytest.raises(ImageError, match=match):
        load_image(bad)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="not a file"):
        load_image(tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(tmp_path / "empty.png")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(tmp_path / "cut.png")


def test_decompression_bomb_limit(monkeypatch, tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 50)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # 5000 px: Pillow only warns (1x..2x the limit)
    with pytest.raises(ImageError, match=r"5000 pixels.*4000"):
        load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # > 2x: Pillow raises
    with pytest.raises(ImageError, match="1000"):
        load_image(path)
    with pytest.raises(ImageError, match=r"5000 pixels .*1000"):
        load_image(np.zeros((50, 100, 3), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert load_image(path).size == (100, 50)


def _gradient16(w: int = 256, h: int = 4) -> np.ndarray:
    return (np.arange(w * h).reshape(h, w) * 65535 // (w * h - 1)).astype(np.uint16)  # 0 .. 65535


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16_bit_images_are_scaled_not_clipped(tmp_path, mode):
    """A 16-bit grey image is scaled to 8 bits (v * 255 / 65535, rounded); 5.23 clips to 255 instead,
    which made a 16-bit PNG 99.6 % white."""
    v = _gradient16()
    want = np.round(v / 65535 * 255).astype(np.uint8)
    if mode == "I;16B":
        img = Image.frombytes("I;16B", (v.shape[1], v.shape[0]), v.astype(">u2").tobytes())
    else:
        img = Image.fromarray(v) if mode == "I;16" else Image.fromarray(v.astype(np.int32), "I")
    assert img.mode == mode
    got = np.asarray(load_image(img))
    assert got.shape == (4, 256, 3) and (got == want[:, :, None]).all()
    assert (got == 255).mean() < 0.01 and got.min() == 0
    path = tmp_path / "g16.png"
    Image.fromarray(v).save(path)  # a 16-bit grey PNG
    assert Image.open(path).mode == "I;16"
    for src in (path, path.read_bytes()):
        assert (np.asarray(load_image(src)) == want[:, :, None]).all()


def test_16_bit_transparency_key_and_range():
    v = np.array([[0, 257, 1000, 65535]], dtype=np.uint16)
    img = Image.fromarray(v)
    img.info["transparency"] = 1000
    assert np.asarray(load_image(img))[0, :, 0].tolist() == [0, 1, 255, 255]  # keyed pixel -> white
    neg = Image.fromarray(np.array([[-5, 128, 70000]], dtype=np.int32), "I")
    assert np.asarray(load_image(neg))[0, :, 0].tolist() == [0, 0, 255]  # clipped to 0..65535 first
