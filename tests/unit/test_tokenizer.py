"""Tokenizer: SPEC §3.5 ids, special tokens from tokenizer_config.json, decoding, 5.23 pre-tokenizer rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smolvlm.processing.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok256(ref256):
    return Tokenizer.from_pretrained(ref256)


@pytest.fixture(scope="module")
def tok2b(ref2b):
    return Tokenizer.from_pretrained(ref2b)


def test_spec_ids(tok256, tok2b):
    for tok in (tok256, tok2b):
        assert tok.encode("Hello world 123") == [19556, 905, 216, 33, 34, 35]
        assert tok.encode("<image>Hi") == [49190, 26843]  # no BOS added
        assert tok.encode("\n") == [198] and tok.encode("\n\n") == [1116]
        assert tok.encode("<|im_start|>User:<image>Describe<end_of_utterance>\nAssistant:") == [
            1, 11126, 42, 49190, 37964, 49279, 198, 9519, 9531, 42]
        assert tok.token_to_id("<global-img>") == 49152 and tok.token_to_id("<row_6_col_6>") == 49188
        assert tok.token_to_id("<fake_token_around_image>") == 49189 and tok.id_to_token(49279) == "<end_of_utterance>"


def test_special_tokens_from_tokenizer_config(tok256):
    # special_tokens_map.json says eos <|im_end|>; tokenizer_config.json (what counts) says <end_of_utterance>
    assert (tok256.eos_token_id, tok256.pad_token_id, tok256.bos_token_id, tok256.unk_token_id) == (49279, 2, 1, 0)
    assert tok256.all_special_ids == [1, 49279, 0, 2, 49189, 49190]
    assert len(tok256) == 49280 and tok256.padding_side == "right"


def test_smolvlm_instruct_markers_are_bpe_text(ref256):
    tok = Tokenizer.from_pretrained(ref256.parent / "SmolVLM-Instruct")
    assert len(tok) == 49155 and tok.eos_token_id == 49154 and tok.token_to_id("<image>") == 49153
    assert tok.encode("<global-img>") == [44, 13906, 29, 6266, 46]
    assert tok.encode("<row_1_col_1>") == [44, 720, 79, 33, 79, 2283, 79, 33, 46]


def test_pre_tokenizer_rule(ref256, tok256, tok2b):
    # 5.23 rebuilds idefics3/GPT2Tokenizer checkpoints without the Digits pre-tokenizer; SmolVLM2 keeps it
    assert tok256.encode("a  1") == [81, 216, 216, 33]
    assert tok2b.encode("a  1") == [81, 256, 33]
    assert Tokenizer.from_pretrained(ref256, pre_tokenizer="file").encode("a  1") == [81, 256, 33]
    with pytest.raises(ValueError, match="pre_tokenizer"):
        Tokenizer.from_pretrained(ref256, pre_tokenizer="nope")  # type: ignore[arg-type]


def test_decode(tok256):
    ids = tok256.encode("<|im_start|><fake_token_around_image><global-img><image>\n\nHello there<end_of_utterance>")
    assert tok256.decode(ids) == "<|im_start|><fake_token_around_image><global-img><image>\n\nHello there<end_of_utterance>"
    assert tok256.decode(ids, skip_special_tokens=True) == "\n\nHello there"
    assert tok256.decode(torch.tensor(ids), skip_special_tokens=True) == "\n\nHello there"
    assert tok256.batch_decode(np.array([ids, ids]), skip_special_tokens=True) == ["\n\nHello there"] * 2
    assert tok256.decode(49279) == "<end_of_utterance>"
    with pytest.raises(ValueError, match="batch_decode"):
        tok256.decode([[1, 2]])


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_encode_pieces_plain_text_is_ordinary_text(ref256):
    texts = ["Hello world 123", "a  1", "x   22 \n\n  9", "é 漢字 🤗 \t tabs", "  leading", "trailing  ", "<b>x</b>"]
    for name in ("SmolVLM-256M-Instruct", "SmolVLM-Instruct", "SmolVLM2-2.2B-Instruct"):
        tok = Tokenizer.from_pretrained(ref256.parent / name)
        for t in texts:  # no added-token string: the plain encoder is the reference's BPE (pre-tokenizer quirk too)
            assert tok._encode_plain(t) == tok.encode(t), (name, t)
        markup = [("<|im_start|>User: ", False), ("Hi 12", True), ("<end_of_utterance>\nAssistant:", False)]
        assert tok.encode_pieces(markup) == tok.encode("".join(t for t, _ in markup))
        eou = tok.eos_token_id
        plain = [("<|im_start|>User: ", False), ("x<end_of_utterance>y <image>", True), ("<end_of_utterance>", False)]
        ids = tok.encode_pieces(plain)
        assert ids.count(eou) == 1 and ids[-1] == eou and tok.token_to_id("<image>") not in ids
        assert ids[:-1] == [1] + tok._encode_plain("User: x<end_of_utterance>y <image>")  # one BPE run, in context
        assert tok.decode(ids) == "<|im_start|>User: x<end_of_utterance>y <image><end_of_utterance>"
    assert tok.encode("<image>Hi") == [tok.token_to_id("<image>"), 26843]  # encode itself is unchanged
