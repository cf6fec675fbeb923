"""Processor parity: ours vs transformers 5.23 (PIL backend) built from the same checkpoint files.

Oracles: ``AutoProcessor`` on SmolVLM-256M-Instruct (Idefics3Processor + Idefics3ImageProcessorPil,
L=2048/M=512, S=64) and ``SmolVLMProcessor`` on SmolVLM2-2.2B-Instruct (SmolVLMImageProcessorPil,
L=1536/M=384, S=81; built by hand because 5.23's ``AutoProcessor`` also wants the torchvision-only
video processor). Most image grids run on "tiny" copies of those folders whose
preprocessor_config.json says L=4M with a small M: the same code paths on both sides, at a
fraction of the CPU time; a few cases use the real sizes.

Tolerances: input_ids and masks must be identical. pixel_values are compared with atol=1e-6,
rtol=0: both sides resize the same uint8 RGB data with the same Pillow LANCZOS call, rescale in
float64 -> float32 and normalize in float32 with the same elementwise operations, so they come out
bit-identical here; 1e-6 (about 8 float32 ulp at 1.0) only leaves room for a different
numpy/SIMD rounding of those two float ops on another machine.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from smolvlm.processing.processor import SmolVLMProcessor

from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
from transformers.models.smolvlm.processing_smolvlm import SmolVLMProcessor as _RefSmolVLMProcessor


class _RefSmolVLM2(_RefSmolVLMProcessor):
    """5.23 SmolVLMProcessor without its video processor (which needs torchvision)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor":
            return type(argument)
        return super().check_argument_for_proper_class(argument_name, argument)


class _NoVideo:
    num_frames = None
    fps = None


def _ref_smolvlm2(d: Path):
    template = json.loads((d / "chat_template.json").read_text())["chat_template"]
    seq = json.loads((d / "processor_config.json").read_text())["image_seq_len"]
    return _RefSmolVLM2(image_processor=AutoImageProcessor.from_pretrained(d), tokenizer=AutoTokenizer.from_pretrained(d),
                        video_processor=_NoVideo(), image_seq_len=seq, chat_template=template)


def _tiny_copy(src: Path, dst: Path, m: int) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "preprocessor_config.json").read_text())
    cfg["size"] = {"longest_edge": 4 * m}
    cfg["max_image_size"] = {"longest_edge": m}
    (dst / "preprocessor_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def pair256(ref256):
    return SmolVLMProcessor.from_pretrained(ref256), AutoProcessor.from_pretrained(ref256)


@pytest.fixture(scope="module")
def pair2b(ref2b):
    return SmolVLMProcessor.from_pretrained(ref2b), _ref_smolvlm2(ref2b)


@pytest.fixture(scope="module")
def tiny256(ref256, tmp_path_factory):
    d = _tiny_copy(ref256, tmp_path_factory.mktemp("t") / "tiny256", 32)
    return SmolVLMProcessor.from_pretrained(d), AutoProcessor.from_pretrained(d)


@pytest.fixture(scope="module")
def tiny2b(ref2b, tmp_path_factory):
    d = _tiny_copy(ref2b, tmp_path_factory.mktemp("t") / "tiny2b", 24)  # 24 keeps "384/14"-style odd tiling
    return SmolVLMProcessor.from_pretrained(d), _ref_smolvlm2(d)


def assert_same(ours, ref) -> None:
    assert set(ours) == set(ref), (set(ours), set(ref))
    for k in ("input_ids", "attention_mask", "pixel_attention_mask"):
        if k in ref:
            assert ours[k].dtype == ref[k].dtype == torch.int64
            assert torch.equal(ours[k], ref[k]), k
    if "pixel_values" in ref:
        assert ours["pixel_values"].dtype == ref["pixel_values"].dtype == torch.float32
        torch.testing.assert_close(ours["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-6)


def run_both(pair, text, images, padding_side="right", **kw):
    ours, ref = pair
    a = ours(text=text, images=images, padding_side=padding_side, **kw)
    b = ref(text=text, images=images, return_tensors="pt", padding=True, padding_side=padding_side, **kw)
    assert_same(a, b)
    return a


def _rng(seed=0):
    return np.random.default_rng(seed)


def _rgb(w, h, seed=0):
    return Image.fromarray(_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _mode_images() -> dict[str, Image.Image]:
    r = _rng(1)
    w, h = 45, 29
    rgba = Image.fromarray(r.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    p = Image.fromarray(r.integers(0, 16, (h, w), dtype=np.uint8), "P")
    p.putpalette(list(r.integers(0, 256, 48, dtype=np.uint8)))
    p_t = p.copy()
    p_t.info["transparency"] = 3
    gray = Image.fromarray(r.integers(0, 256, (h, w), dtype=np.uint8), "L")
    return {
        "RGB": _rgb(w, h, 2),
        "RGBA": rgba,
        "LA": rgba.convert("LA"),
        "L": gray,
        "L+tRNS": (lambda im: (im.info.__setitem__("transparency", 7), im)[1])(gray.copy()),
        "P": p,
        "P+transparency": p_t,
        "PA": Image.merge("PA", (p, rgba.getchannel("A"))),
        "CMYK": Image.fromarray(r.integers(0, 256, (h, w, 4), dtype=np.uint8), "CMYK"),
        "I;16": Image.fromarray(r.integers(0, 65536, (h, w), dtype=np.uint16)).convert("I;16"),
        "I": Image.fromarray(r.integers(-5, 400, (h, w), dtype=np.int32), "I"),
        "1": gray.convert("1"),
        "YCbCr": _rgb(w, h, 3).convert("YCbCr"),
    }


def test_reference_uses_pil_backend(pair256, pair2b):
    with pytest.raises(ImportError):
        import torchvision  # noqa: F401  (5.23 would pick the torchvision backend if it were installed)
    assert type(pair256[1].image_processor).__name__ == "Idefics3ImageProcessorPil"
    assert type(pair2b[1].image_processor).__name__ == "SmolVLMImageProcessorPil"


SIZES = [(1, 1), (3, 7), (7, 3), (4000, 10), (10, 4000), (32, 32), (33, 33), (33, 17), (129, 65), (64, 95),
         (5000, 20), (20, 4100), (100, 30), (1600, 1104), (769, 1536)]


@pytest.mark.parametrize("tiny", ["tiny256", "tiny2b"])
def test_size_grid(tiny, request):
    pair = request.getfixturevalue(tiny)
    for i, (w, h) in enumerate(SIZES):
        run_both(pair, f"<image>size {w}x{h}", [[_rgb(w, h, i)]])


def _as_8bit(im):
    """Independent oracle of our deliberate difference (image_io.to_8bit): 16/32-bit integer grey is
    scaled to 8 bits, round(v * 255 / 65535), where 5.23 clips to 255."""
    if not isinstance(im, Image.Image) or im.mode not in ("I;16", "I"):
        return im
    return Image.fromarray(np.round(np.clip(np.asarray(im, np.float64), 0, 65535) * 255 / 65535).astype(np.uint8), "L")


def run_vs_8bit(pair, text, image, ref_image=None, **kw):
    """Ours on ``image`` vs the reference on the 8-bit version (``_as_8bit``) of ``ref_image`` or ``image``."""
    ours, ref = pair
    a = ours(text=text, images=[[image]], **kw)
    ref_image = _as_8bit(image if ref_image is None else ref_image)
    assert_same(a, ref(text=text, images=[[ref_image]], return_tensors="pt", **kw))
    return a


@pytest.mark.parametrize("split", [True, False])
def test_modes_pil(tiny256, split):
    for mode, im in _mode_images().items():
        out = run_vs_8bit(tiny256, "<image>", im, do_image_splitting=split)
        assert (out["pixel_values"].shape[1] == 1) != split, mode


def test_modes_numpy(tiny256):
    r = _rng(5)
    for c in (1, 3, 4):
        a = r.integers(0, 256, (13, 22, c), dtype=np.uint8)
        run_both(tiny256, "<image>", [[a]])
    # (H, W) is our extension (5.23 rejects 2-D arrays): it must equal the (H, W, 1) result.
    a = r.integers(0, 256, (13, 22), dtype=np.uint8)
    ours, ref = tiny256
    got = ours(text="<image>", images=[[a]])
    assert_same(got, ref(text="<image>", images=[[a[:, :, None]]], return_tensors="pt"))


def _png(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def test_files_exif_and_modes(tiny256, tmp_path):
    """Paths go through 5.23 load_image: exif_transpose + convert('RGB') (alpha dropped, not composited)."""
    ims = _mode_images()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW
    paths = [
        _png(_rgb(40, 20, 7), tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95),
        _png(ims["RGBA"], tmp_path / "rgba.png"),
        _png(ims["P+transparency"], tmp_path / "pt.png", transparency=3),
        _png(ims["L"], tmp_path / "l.png"),
        _png(ims["I;16"], tmp_path / "i16.png"),
        _png(ims["CMYK"], tmp_path / "cmyk.jpg"),
    ]
    ours, _ = tiny256
    for p in paths:
        # a 16-bit file: the reference on the decoded file scaled to 8 bits (our deliberate difference)
        run_vs_8bit(tiny256, "<image>", str(p), Image.open(p) if p.name == "i16.png" else str(p))
        # bytes are read like the file they came from (5.23 has no bytes input; compare with the path)
        assert_same(ours(text="<image>", images=[[p.read_bytes()]]), ours(text="<image>", images=[[p]]))
    lay = ours.count_tokens(images=[paths[0]])["images"][0]
    assert (lay["width"], lay["height"]) == (20, 40)  # EXIF rotation applied for files


def test_real_settings(pair256, pair2b):
    # SPEC §2.4 examples plus extreme shapes at the released sizes (few: each costs ~1 s a side).
    run_both(pair256, "<image>What is this?", [[_rgb(640, 480)]])
    run_both(pair256, "A <image> and <image>.", [[_rgb(4000, 10, 1), _rgb(10, 4000, 2)]])
    run_both(pair2b, "<image>Describe.", [[_rgb(100, 30, 3)]])
    run_both(pair2b, "<image>", [[_rgb(5000, 21, 4)]], do_image_splitting=False)


def test_batches_left_right(tiny256, tiny2b):
    texts = ["<image>one", "two <image> and <image> !", "no image here, just a longer text 123"]
    images = [[_rgb(50, 40, 1)], [_rgb(20, 90, 2), _rgb(70, 70, 3)], []]
    for pair in (tiny256, tiny2b):
        for side in ("left", "right"):
            out = run_both(pair, texts, images, padding_side=side)
        assert out["pixel_attention_mask"][2].sum() == 0 and out["pixel_values"][2].abs().sum() == 0
    # a flat image list is split over the prompts by marker count, as 5.23 does
    flat = [im for s in images for im in s]
    run_both(tiny256, texts, flat)


def test_text_only_and_split_override(tiny256):
    run_both(tiny256, ["hello", "hello world 42"], None)
    ours, ref = tiny256
    a = ours(text="<image>x", images=[[_rgb(90, 50)]], do_image_splitting=False)
    b = ref(text="<image>x", images=[[_rgb(90, 50)]], return_tensors="pt", do_image_splitting=False)
    assert_same(a, b)
    assert a["pixel_values"].shape[1] == 1


def test_tokenizers_match(ref256, ref2b):
    from smolvlm.processing.tokenizer import Tokenizer

    texts = ["Hello world 123", "a  1", "x   22 \n\n  9", "<image>Hi", "price:  $5, 10 000!", "é 漢字 🤗 \t tabs",
             "<row_1_col_1><global-img><|im_start|>User:<end_of_utterance>\nAssistant:", "  leading", "trailing  ",
             "<|reserved_special_token_3|> code:\n    def f(x):\n        return x**2"]
    root = ref256.parent
    for name in ("SmolVLM-256M-Instruct", "SmolVLM-500M-Instruct", "SmolVLM-Instruct", "SmolVLM2-2.2B-Instruct"):
        ours, ref = Tokenizer.from_pretrained(root / name), AutoTokenizer.from_pretrained(root / name)
        for t in texts:
            ids = ours.encode(t)
            assert ids == ref(t)["input_ids"], (name, t)
            for skip in (False, True):
                assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
        assert ours.all_special_ids == ref.all_special_ids
        assert (ours.eos_token_id, ours.pad_token_id, ours.bos_token_id) == (ref.eos_token_id, ref.pad_token_id,
                                                                             ref.bos_token_id)
        assert len(ours) == len(ref)
        rand = _rng(9).integers(0, len(ref), 300).tolist()
        assert ours.decode(rand, skip_special_tokens=True) == ref.decode(rand, skip_special_tokens=True)


CHATS = [
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Can you describe this image?"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "Answer briefly."}, {"type": "image"},
                                  {"type": "text", "text": "What is this?"}]}],
    [{"role": "system", "content": [{"type": "text", "text": "You are helpful."}]},
     {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]},
     {"role": "assistant", "content": [{"type": "text", "text": "They differ."}]},
     {"role": "user", "content": [{"type": "text", "text": "How?"}]}],
    [{"role": "SYSTEM", "content": [{"type": "text", "text": " spaced  "}]},
     {"role": "user", "content": [{"type": "text", "text": "multi\nline"}, {"type": "video", "path": "v.mp4"}]}],
]


def test_chat_template(pair256, pair2b):
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    for pair in (pair256, pair2b):
        ours, ref = pair
        for conv in CHATS:
            # A video chat on a v1 checkpoint: 5.23's Idefics3Processor drops the video item; we render it
            # with the SmolVLM2 video template, as its SmolVLMProcessor does (processor.py docstring).
            video_v1 = ours.processor_class == "Idefics3Processor" and any(
                i["type"] == "video" for m in conv for i in m["content"])
            kw = {"chat_template": DEFAULT_CHAT_TEMPLATE} if video_v1 else {}
            for gen in (True, False):
                assert ours.apply_chat_template(conv, add_generation_prompt=gen) == ref.apply_chat_template(
                    conv, add_generation_prompt=gen, tokenize=False, **kw)
        assert ours.apply_chat_template(CHATS[:2]) == ref.apply_chat_template(CHATS[:2], add_generation_prompt=True)


def test_chat_tokenize_with_images(tiny256, tmp_path):
    ours, ref = tiny256
    path = _png(_rgb(60, 40, 4), tmp_path / "a.png")
    conv = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "image", "path": str(path)}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
            {"role": "user", "content": [{"type": "image", "image": _rgb(30, 70, 5)}, {"type": "text", "text": "And?"}]}]
    got = ours.apply_chat_template(conv, tokenize=True)
    want = ref.apply_chat_template(conv, tokenize=True, add_generation_prompt=True)
    assert got == list(want[0] if isinstance(want[0], list) else want)


def test_spec_worked_examples(pair256):
    ours, ref = pair256
    for (w, h), n in (((1000, 1000), 1127), ((640, 480), 862), ((100, 30), 597)):
        counted = ours.count_tokens(images=[_rgb(w, h)])
        assert counted["total_tokens"] == counted["image_tokens"] == n
    # the ids of SPEC §3.5's example prompt (marker not expanded: plain tokenization)
    prompt = "<|im_start|>User:<image>Describe<end_of_utterance>\nAssistant:"
    want = [1, 11126, 42, 49190, 37964, 49279, 198, 9519, 9531, 42]
    assert ours.tokenizer.encode(prompt) == want == ref.tokenizer(prompt)["input_ids"]
    # SPEC §3.4 renderings
    assert ours.apply_chat_template(CHATS[0]) == (
        "<|im_start|>User:<image>Can you describe this image?<end_of_utterance>\nAssistant:")
    assert ours.apply_chat_template(CHATS[1]) == (
        "<|im_start|>User: Answer briefly.<image>What is this?<end_of_utterance>\nAssistant:")
    assert ours.apply_chat_template(CHATS[2]) == (
        "<|im_start|>System: You are helpful.<end_of_utterance>\nUser:<image><image>Compare.<end_of_utterance>\n"
        "Assistant: They differ.<end_of_utterance>\nUser: How?<end_of_utterance>\nAssistant:")


def test_count_tokens_matches_processing(tiny2b):
    ours, ref = tiny2b
    imgs = [_rgb(50, 20, 1), _rgb(17, 90, 2)]
    text = "Look: <image> then <image> done."
    c = ours.count_tokens(text, imgs)
    out = ref(text=text, images=[imgs], return_tensors="pt")
    assert c["total_tokens"] == out["input_ids"].shape[1]
    for im in c["images"]:  # single-token markers (49280 vocab): rows*cols*(S+2) + rows + (S+3)
        assert im["tokens"] == im["rows"] * im["cols"] * 83 + im["rows"] + 84
    assert sum(im["tiles"] for im in c["images"]) == out["pixel_values"].shape[1]


def test_decode(pair256):
    ours, ref = pair256
    ids = ours(text="<image>Hi there", images=[[_rgb(30, 20)]], do_image_splitting=False)["input_ids"][0]
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True) == "Hi there"
    assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
    assert ours.batch_decode(ids[None]) == ref.batch_decode(ids[None], skip_special_tokens=True)


def test_bytes_io_roundtrip_png(tiny256):
    buf = io.BytesIO()
    _rgb(33, 12, 8).save(buf, format="PNG")
    ours, _ = tiny256
    assert_same(ours(text="<image>", images=[[buf.getvalue()]]), ours(text="<image>", images=[[_rgb(33, 12, 8)]]))


def test_resize_sizes_match_reference_helper():
    """Step-1 sizes (incl. the 4096 cap, reachable with L > 4096) equal 5.23's own helper."""
    from transformers.models.idefics3.image_processing_pil_idefics3 import get_resize_output_image_size

    from smolvlm.processing.image import resize_longest_edge

    rng = _rng(3)
    for L in (1536, 2048, 6000):
        for h, w in [(1, 1), (1, 4000), (4000, 1), *rng.integers(1, 9000, (300, 2)).tolist()]:
            want = get_resize_output_image_size(np.zeros((1, h, w)), resolution_max_side=L)
            assert resize_longest_edge(h, w, L) == tuple(want), (h, w, L)
