"""Stage 1 (vision pretraining on dense generator labels): glyph recording, targets, heads, the loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from smolvlm.config import SmolVLMConfig, TextConfig, VisionConfig
from smolvlm.model.vlm import SmolVLM
from smolvlm.processing.image import ImageProcessor, ImageProcessorConfig
from smolvlm.training import vision_pretrain as vp
from smolvlm.synth import make_sample
from smolvlm.synth.draw import record_glyphs


def tiny_model(image_size: int = 48, patch: int = 8, scale: int = 3) -> SmolVLM:
    torch.manual_seed(0)
    cfg = SmolVLMConfig(
        vision_config=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=image_size, patch_size=patch),
        text_config=TextConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8),
        image_token_id=299, scale_factor=scale)
    return SmolVLM.from_config(cfg)


def image_processor(size: int) -> ImageProcessor:
    return ImageProcessor(ImageProcessorConfig.from_dict({"do_image_splitting": False, "size": {"longest_edge": size},
                                                          "max_image_size": {"longest_edge": size}}))


@pytest.mark.parametrize("category", ["text", "receipt", "form", "chart"])
def test_recording_glyphs_changes_no_pixel_and_logs_every_character(category):
    plain = make_sample(category, 6)
    with record_glyphs() as glyphs:
        rec = make_sample(category, 6)
    for a, b in zip(plain["images"], rec["images"]):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    img = rec["images"][0]
    drawn = "".join(g.char for g in glyphs)
    if category == "text":  # the lines, in order, without spaces
        assert drawn == "".join(rec["meta"]["lines"]).replace(" ", "")
    if category == "receipt":
        assert rec["meta"]["shop"].replace(" ", "") in drawn and rec["meta"]["date"] in drawn
    for g in glyphs:
        assert g.image is img
        x0, y0, x1, y1 = g.box
        assert 0 <= x0 < x1 <= img.width and 0 <= y0 < y1 <= img.height
    # outside a recording nothing is logged
    with record_glyphs() as outer:
        pass
    make_sample(category, 6)
    assert outer == []


def test_recording_refuses_text_it_cannot_place():
    from PIL import Image

    from smolvlm.synth.draw import canvas, font

    d = canvas(Image.new("RGB", (64, 32)))
    d.text((2, 2), "ok", font=font("default", 12), anchor="mm")  # not recording: any option draws
    with record_glyphs(), pytest.raises(ValueError, match="record_glyphs"):
        d.text((2, 2), "ok", font=font("default", 12), anchor="mm")
    with record_glyphs(), pytest.raises(ValueError, match="line breaks"):
        d.text((2, 2), "a\nb", font=font("default", 12))


def test_glyph_boxes_hold_ink():
    with record_glyphs() as glyphs:
        s = make_sample("text", 8)
    arr = np.asarray(s["images"][0]).astype(int)
    bg = np.array(s["meta"]["bg"])
    for g in glyphs:
        x0, y0, x1, y1 = g.box
        patch = arr[y0:y1, x0:x1]
        assert np.abs(patch - bg).sum(-1).max() > 100, g  # ink differs clearly from the background


def test_dense_targets_for_shapes_follow_the_drawn_shapes():
    grid = vp.TokenGrid(image_size=384, n=6)
    s = make_sample("shapes", 10)
    (t,) = vp.dense_targets(s, [], grid)
    assert t["kind"].shape == (36,) and t["chars"].shape == (36, grid.n_slots)
    assert int(t["chars"].sum()) == 0 and int(t["background"]) == vp.BACKGROUND_NAMES.index(s["meta"]["background"])
    side = s["images"][0].width
    for sh in s["meta"]["shapes"]:
        x0, y0, x1, y1 = sh["box"]
        i, j = grid.token_of((x0 + x1) / 2 * 384 / side, (y0 + y1) / 2 * 384 / side)
        assert vp.KINDS[int(t["kind"][i * 6 + j])] == sh["kind"]
        assert vp.COLOUR_NAMES[int(t["colour"][i * 6 + j]) - 1] == sh["colour"]
    assert int((t["kind"] > 0).sum()) >= len(s["meta"]["shapes"])
    assert torch.equal(t["kind"] > 0, t["colour"] > 0)


def test_dense_targets_for_text_place_each_character():
    grid = vp.TokenGrid(image_size=384, n=6)
    with record_glyphs() as glyphs:
        s = make_sample("text", 12)
    (t,) = vp.dense_targets(s, glyphs, grid)
    assert int(t["background"]) == vp.IGNORE and int(t["kind"].sum()) == 0
    got = sorted(vp.CHARS[c - 1] for c in t["chars"].flatten().tolist() if c)
    want = sorted(ch.lower() for ch in "".join(s["meta"]["lines"]) if not ch.isspace())
    assert len(got) <= len(want) and len(got) >= 0.9 * len(want)  # two centres may share a slot, rarely
    assert set(got) <= set(want)


def test_dense_targets_multi_image_and_chart():
    grid = vp.TokenGrid(image_size=384, n=6)
    s = make_sample("multi_image", 3)
    ts = vp.dense_targets(s, [], grid)
    assert len(ts) == 2
    with record_glyphs() as glyphs:
        c = make_sample("chart", 3)
    (t,) = vp.dense_targets(c, glyphs, grid)
    assert (t["kind"] == vp.KINDS.index("bar")).sum() >= len(c["meta"]["values"])
    assert int((t["chars"] > 0).sum()) > 10  # title, labels and values


def test_char_classes():
    assert vp.char_class("a") == 1 and vp.char_class("A") == 1 and vp.char_class("9") == vp.CHARS.index("9") + 1
    assert vp.char_class("$") == len(vp.CHARS) + 1


def test_heads_losses_and_accuracies():
    heads = vp.DenseHeads(16, 32)
    feats = torch.randn(3, 4, 16)
    logits = heads(feats)
    assert logits["chars"].shape == (3, 4, 32, len(vp.CHARS) + 2) and logits["background"].shape == (3, len(vp.BACKGROUND_NAMES))
    tg = {"kind": torch.randint(0, 5, (3, 4)), "colour": torch.randint(0, 9, (3, 4)),
          "background": torch.tensor([0, vp.IGNORE, 2]), "chars": torch.zeros(3, 4, 32, dtype=torch.long)}
    tg["chars"][0, 1, 5] = 7
    losses = heads.losses(logits, tg)
    assert set(losses) == {"kind", "colour", "background", "chars"} and all(torch.isfinite(v) for v in losses.values())
    no_background = heads.losses(logits, {**tg, "background": torch.full((3,), vp.IGNORE)})
    assert float(no_background["background"]) == 0.0  # a batch with no named background: zero, not NaN
    perfect = {k: torch.nn.functional.one_hot(v.clamp(min=0), logits[k].shape[-1]).float() * 10 for k, v in tg.items()}
    acc = vp.accuracies(perfect, tg)
    assert acc == {"kind": 1.0, "colour": 1.0, "background": 1.0, "chars_ink": 1.0, "chars_exact": 1.0}


def test_pretrain_trains_only_vision_and_connector_and_saves(tmp_path):
    model = tiny_model()
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith("model.vision_model."))  # as stage 2 will have it
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = vp.pretrain_vision(model, image_processor(48), tmp_path / "s1", steps=3, batch_size=4, warmup_steps=1,
                             eval_images=4, progress=False, eval_every=2)
    assert res.steps == 3 and res.images >= 12 and res.path.is_file()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(vp.VISION_PREFIXES) for n in changed)
    assert any(n.startswith("model.vision_model.") for n in changed)
    assert set(res.metrics) == {"kind", "colour", "background", "chars_ink", "chars_exact"}
    assert (tmp_path / "s1" / "summary.json").is_file()
    # the one loop's log: a line per step, held-out accuracies every eval_every steps and at the end
    recs = [json.loads(x) for x in (tmp_path / "s1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3] and all("loss_chars" in r and "lr" in r for r in recs)
    assert ["eval_kind" in r for r in recs] == [False, True, True]
    assert recs[0]["lr"] == 0.0 and recs[1]["lr"] == pytest.approx(1e-3)  # warmup from 0, then cosine
    # a fresh model loads the saved tower + connector exactly
    other = tiny_model()
    vp.load_vision_state(other, res.path)
    sd, so = model.state_dict(), other.state_dict()
    assert all(torch.equal(sd[k], so[k]) for k in sd if k.startswith(vp.VISION_PREFIXES))


def test_load_vision_state_rejects_another_architecture(tmp_path):
    from safetensors.torch import save_file

    model = tiny_model()
    save_file(vp.vision_state(model), str(tmp_path / "v.safetensors"))
    with pytest.raises(ValueError, match="shape"):
        vp.load_vision_state(tiny_model(image_size=72), tmp_path / "v.safetensors")
    save_file({"model.vision_model.nope": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="do not match"):
        vp.load_vision_state(model, tmp_path / "w.safetensors")


def test_match_feature_scale_matches_the_embedding_std():
    model = tiny_model()
    with torch.no_grad():
        model.model.text_model.embed_tokens.weight.normal_(0.0, 0.07)
    grid = vp.TokenGrid.for_config(model.config)
    pv, _, _ = vp.DenseImages(image_processor(48), grid).batch(0, 4)
    vp.match_feature_scale(model, pv, 300)
    with torch.no_grad():
        std = float(vp.encode(model, pv).std())
    assert std == pytest.approx(float(model.model.text_model.embed_tokens.weight.detach().std()), rel=1e-3)
