"""Stage-1 word targets (training/lexical.py): which words each visual token must be, the cosine loss
against a frozen embedding table, the nearest-embedding read-out, and the stage-1 run with them."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from smolvlm.config import SmolVLMConfig, TextConfig, VisionConfig
from smolvlm.model.vlm import SmolVLM
from smolvlm.processing.image import ImageProcessor, ImageProcessorConfig
from smolvlm.processing.tokenizer import Tokenizer
from smolvlm import synth
from smolvlm.synth import make_sample
from smolvlm.synth.draw import canvas, font, record_glyphs
from smolvlm.training import lexical
from smolvlm.training import vision_pretrain as vp
from smolvlm.weights.default_model import assets_dir

GRID = vp.TokenGrid(image_size=384, n=6)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained(assets_dir())  # the SmolVLM-256M tokenizer the default model ships


@pytest.fixture(scope="module")
def vocab(tok) -> lexical.WordVocab:
    return lexical.WordVocab.build(tok, (*vp.COLOUR_NAMES, *vp.KINDS[1:]))


def ids_of(t: torch.Tensor) -> list[int]:
    return [i for i in t.tolist() if i != lexical.IGNORE]


def test_word_vocab_is_one_token_per_word(tok, vocab):
    assert vocab.space == tok.encode(" ")[0]
    assert tok.decode([vocab.words["red"]]) == " red" and tok.decode([vocab.words["bar"]]) == " bar"
    with pytest.raises(ValueError, match="tokens for this tokenizer, need 1"):
        lexical.WordVocab.build(tok, ["zzqx"])


def test_line_pieces_cover_every_inked_character_once(tok):
    img = Image.new("RGB", (384, 96), "white")
    with record_glyphs() as glyphs:
        canvas(img).text((10, 20), "Hello world 4096", font=font("default", 28), fill=(0, 0, 0))
    assert {g.text for g in glyphs} == {"Hello world 4096"} and len({g.run for g in glyphs}) == 1
    pieces = lexical.line_pieces(tok, glyphs)
    # every piece but the whitespace-only one (SmolLM2 spells " 4096" as " ", "4", "0", "9", "6")
    all_ids = tok.encode(" Hello world 4096")
    assert [t for t, _ in pieces] == [t for t in all_ids if tok.decode([t]).strip()] and len(all_ids) == len(pieces) + 1
    covered = [g.index for _, gs in pieces for g in gs]
    assert sorted(covered) == [g.index for g in glyphs]  # each inked character in exactly one piece
    for tid, gs in pieces:
        assert tok.decode([tid]).strip() == "".join(g.char for g in gs)


def test_shape_tokens_are_colour_and_kind_and_empty_ones_the_space(tok, vocab):
    s = make_sample("shapes", 10)
    (t,) = lexical.word_targets(s, [], GRID, tok, vocab, vp._shapes_of)
    assert t.shape == (36, lexical.MAX_PIECES)
    side = s["images"][0].width
    marked = set()
    for sh in s["meta"]["shapes"]:
        x0, y0, x1, y1 = sh["box"]
        i, j = GRID.token_of((x0 + x1) / 2 * 384 / side, (y0 + y1) / 2 * 384 / side)
        got = ids_of(t[i * 6 + j])
        assert got[:2] == [vocab.words[sh["colour"]], vocab.words[sh["kind"]]]
        marked.add(i * 6 + j)
    empty = [k for k in range(36) if ids_of(t[k]) == [vocab.space]]
    assert empty and not set(empty) & marked


def test_text_tokens_hold_the_word_pieces_drawn_on_them(tok, vocab):
    with record_glyphs() as glyphs:
        s = make_sample("text", 12)
    (t,) = lexical.word_targets(s, glyphs, GRID, tok, vocab, vp._shapes_of)
    want = [tid for line in s["meta"]["lines"] for tid in tok.encode(" " + line) if tok.decode([tid]).strip()]
    placed = [i for k in range(36) for i in ids_of(t[k]) if i != vocab.space]
    assert set(placed) == set(want) and len(placed) >= len(want)  # every piece of every line, where its ink is
    side_x, side_y = 384 / s["images"][0].width, 384 / s["images"][0].height
    for g in glyphs:  # every token under a character's ink holds a piece of its line
        for k in lexical._touched(GRID, [g.box], side_x, side_y):
            assert set(ids_of(t[k])) & set(want), (g.char, k)


def test_character_targets_put_each_glyph_once_under_its_ink_centre(tok, vocab):
    with record_glyphs() as glyphs:
        s = make_sample("text", 12)
    (t,) = lexical.word_targets(s, glyphs, GRID, tok, vocab, vp._shapes_of, text_targets="characters")
    sx, sy = 384 / s["images"][0].width, 384 / s["images"][0].height
    want: dict[int, list[int]] = {}
    for line in sorted({g.run for g in glyphs}, key=lambda r: next(g.box[1] for g in glyphs if g.run == r)):
        for g in (g for g in glyphs if g.run == line and g.char.strip()):
            i, j = GRID.token_of((g.box[0] + g.box[2]) / 2 * sx, (g.box[1] + g.box[3]) / 2 * sy)
            (cid,) = tok.encode(g.char)  # every generator character is one token, without a leading space
            want.setdefault(i * 6 + j, []).append(cid)
    assert want and sum(map(len, want.values())) == sum(1 for g in glyphs if g.char.strip())
    for k in range(36):  # each glyph once, at its centre's token, in reading order; the rest blank
        assert ids_of(t[k]) == (want.get(k, [])[:lexical.MAX_PIECES] or [vocab.space]), k
    with pytest.raises(ValueError, match="text_targets must be one of"):
        lexical.word_targets(s, glyphs, GRID, tok, vocab, vp._shapes_of, text_targets="letters")


def test_hybrid_targets_read_the_text_category_as_characters_and_receipts_as_pieces(tok, vocab):
    for category, like in (("text", "characters"), ("receipt", "pieces"), ("form", "pieces")):
        with record_glyphs() as glyphs:
            s = make_sample(category, 3)
        (hybrid,) = lexical.word_targets(s, glyphs, GRID, tok, vocab, vp._shapes_of, text_targets="hybrid")
        (same,) = lexical.word_targets(s, glyphs, GRID, tok, vocab, vp._shapes_of, text_targets=like)
        (other,) = lexical.word_targets(s, glyphs, GRID, tok, vocab, vp._shapes_of,
                                        text_targets="pieces" if like == "characters" else "characters")
        assert torch.equal(hybrid, same) and not torch.equal(hybrid, other), category


def test_a_piece_is_the_target_of_every_token_its_ink_touches():
    assert lexical._touched(GRID, [(0, 0, 10, 10)], 1.0, 1.0) == [0]
    assert lexical._touched(GRID, [(60, 0, 70, 10)], 1.0, 1.0) == [0, 1]  # straddles the 64 px border
    assert lexical._touched(GRID, [(0, 0, 64, 64)], 1.0, 1.0) == [0]  # x1/y1 exclusive
    assert lexical._touched(GRID, [(10, 100, 20, 110), (300, 110, 383, 120)], 1.0, 1.0) == list(range(6, 12))
    assert lexical._touched(GRID, [(0, 0, 10, 10)], 2.0, 2.0) == [0]  # scaled onto the tower's square
    assert lexical._touched(GRID, [(0, 0, 40, 10)], 2.0, 2.0) == [0, 1]


def test_loss_prefers_the_target_embedding_and_readout_finds_it():
    torch.manual_seed(0)
    table = torch.randn(500, 16)
    loss = lexical.WordTargetLoss(table, space_id=0)
    targets = torch.full((1, 3, lexical.MAX_PIECES), lexical.IGNORE)
    targets[0, 0, 0] = 7                       # one word
    targets[0, 1, :2] = torch.tensor([11, 12])  # two words on one token
    targets[0, 2, 0] = 0                       # nothing drawn: the space
    exact = torch.stack([table[7], (table[11] + table[12]) / 2, table[0]])[None]
    noise = torch.randn_like(exact) * exact.norm(dim=-1, keepdim=True) / 4
    good, bad = loss(exact, targets), loss(noise, targets)
    assert good["words"] < bad["words"]
    assert loss(exact[:, :1], targets[:, :1])["word_norm"] == pytest.approx(0.0, abs=1e-6)  # |o| = |e|
    assert float(loss(2 * exact[:, :1], targets[:, :1])["word_norm"]) == pytest.approx(1.0, rel=1e-5)
    r = loss.readout(exact, targets)
    assert r["words_top1"] == 1.0 and r["blank_top1"] == 1.0 and r["words_recall"] == 1.0
    r = loss.readout(-exact, targets)
    assert r["words_top1"] == 0.0 and r["blank_top1"] == 0.0


def tiny_model(vocab_size: int) -> SmolVLM:
    torch.manual_seed(0)
    cfg = SmolVLMConfig(
        vision_config=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=48, patch_size=8),
        text_config=TextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8),
        image_token_id=vocab_size - 1, scale_factor=3)
    return SmolVLM.from_config(cfg)


def image_processor(size: int) -> ImageProcessor:
    return ImageProcessor(ImageProcessorConfig.from_dict({"do_image_splitting": False, "size": {"longest_edge": size},
                                                          "max_image_size": {"longest_edge": size}}))


def test_pretrain_with_word_targets_learns_them_and_keeps_the_table_frozen(tmp_path, tok):
    model = tiny_model(len(tok))
    table = model.model.text_model.embed_tokens.weight.detach().clone()
    res = vp.pretrain_vision(model, image_processor(48), tmp_path / "s1", steps=6, batch_size=8, warmup_steps=1,
                             lr=3e-3, eval_images=8, progress=False, eval_every=3, tokenizer=tok, word_weight=1.0,
                             backbone_rows=49152)
    assert torch.equal(model.model.text_model.embed_tokens.weight, table)
    assert {"words_top1", "words_recall", "blank_top1"} <= set(res.metrics)
    recs = [json.loads(x) for x in (tmp_path / "s1" / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_words" in r and "loss_word_norm" in r for r in recs)
    assert recs[-1]["loss_words"] < recs[0]["loss_words"]
    with pytest.raises(ValueError, match="tokenizer"):
        vp.pretrain_vision(model, image_processor(48), tmp_path / "s2", steps=1, batch_size=2, progress=False,
                           word_weight=1.0)


def test_recipe_key_word_weight(tmp_path):
    from smolvlm.training.recipe import RecipeError, load_recipe

    p = tmp_path / "r.yaml"
    p.write_text("train: {max_steps: 2}\nvision_pretrain: {steps: 3, word_weight: 0.5}\n")
    assert load_recipe(p).vision_pretrain.word_weight == 0.5
    with pytest.raises(RecipeError, match="vision_pretrain.word_weight must be >= 0"):
        load_recipe(p, ["vision_pretrain.word_weight=-1"]).validate()
    assert load_recipe(p).vision_pretrain.text_targets == "pieces"
    assert load_recipe(p, ["vision_pretrain.text_targets=characters"]).vision_pretrain.text_targets == "characters"
    with pytest.raises(RecipeError, match="text_targets: 'letters' is not one of"):
        load_recipe(p, ["vision_pretrain.text_targets=letters"])


def test_dense_images_read_text_as_the_targets_asked_for(tok, vocab):
    with record_glyphs() as glyphs:
        sample = synth.dataset_sample(0, "train", 0, ["text"])
    read = {}
    for targets in lexical.TEXT_TARGETS:
        data = vp.DenseImages(image_processor(48), GRID, categories=["text"], tokenizer=tok, text_targets=targets)
        want = lexical.word_targets(sample, glyphs, GRID, tok, vocab, vp._shapes_of, targets)
        _, got = data.sample(0)
        assert all(torch.equal(a["words"], b) for a, b in zip(got, want, strict=True))
        read[targets] = got[0]["words"]
    assert not torch.equal(read["pieces"], read["characters"])


def test_a_stage_1_saved_before_text_targets_existed_is_reused(tmp_path):
    from smolvlm.training import build
    from smolvlm.training.recipe import RecipeError, load_recipe

    p = tmp_path / "r.yaml"
    p.write_text(f"train: {{max_steps: 2, output_dir: {tmp_path / 'run'}}}\nvision_pretrain: {{steps: 3}}\n")
    rec = load_recipe(p)
    stage = tmp_path / "run" / "vision_pretrain"
    stage.mkdir(parents=True)
    (stage / "vision.safetensors").write_bytes(b"")
    old = build._stage1_settings(rec)
    del old["vision_pretrain"]["text_targets"]  # written by a version without the key: it ran "pieces"
    (stage / "settings.json").write_text(json.dumps(old))
    assert build._finished_stage1(rec) == stage / "vision.safetensors"
    with pytest.raises(RecipeError, match="other settings"):
        build._finished_stage1(load_recipe(p, ["vision_pretrain.text_targets=characters"]))
