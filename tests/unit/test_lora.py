"""LoRA: injection, merge equivalence, PEFT file layout (checked with the ``peft`` library)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.testing import assert_close

from smolvlm.config import SmolVLMConfig, TextConfig, VisionConfig
from smolvlm.model.vlm import SmolVLM
from smolvlm.training.lora import (LoRAError, LoRALinear, inject_lora, load_lora, lora_modules, merge_lora,
                                   save_lora)

TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_config() -> SmolVLMConfig:
    return SmolVLMConfig(
        vision_config=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=32, patch_size=8),
        text_config=TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                               pad_token_id=2),
        image_token_id=100, scale_factor=2)


def tiny_inputs(cfg: SmolVLMConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    S = cfg.image_seq_len
    ids = torch.randint(3, 99, (2, 12), generator=g)
    ids[:, 1:1 + S] = cfg.image_token_id
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(2, 1, 3, 32, 32, generator=g),
            "pixel_attention_mask": torch.ones(2, 1, 32, 32, dtype=torch.long)}


def randomize_b(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(2)
    for m in lora_modules(model).values():
        with torch.no_grad():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


@pytest.fixture
def model() -> SmolVLM:
    torch.manual_seed(0)
    return SmolVLM.from_config(tiny_config())


def test_fresh_adapter_is_noop_and_base_frozen(model):
    x = tiny_inputs(model.config)
    ref = model(**x).logits
    names = inject_lora(model, TEXT_TARGETS, r=4, alpha=8)
    # suffix matching (PEFT rule) hits 7 text projections x 2 layers and the vision q/k/v (3 x 2)
    assert len(names) == 2 * 7 + 2 * 3
    assert all(".vision_model." in n for n in names if n.endswith(("q_proj", "k_proj", "v_proj")) and "text" not in n)
    assert_close(model(**x).logits, ref, rtol=0, atol=0)  # B = 0: exactly the base model
    for m in lora_modules(model).values():
        assert not m.weight.requires_grad and m.lora_A.weight.requires_grad and m.lora_B.weight.requires_grad
        assert torch.count_nonzero(m.lora_B.weight) == 0


def test_regex_targets_and_errors(model):
    names = inject_lora(model, [r"model\.text_model\.layers\.\d+\.self_attn\.q_proj"], r=2, alpha=2)
    assert names == ["model.text_model.layers.0.self_attn.q_proj", "model.text_model.layers.1.self_attn.q_proj"]
    with pytest.raises(LoRAError, match="already has LoRA"):
        inject_lora(model, ["v_proj"])
    fresh = SmolVLM.from_config(tiny_config())
    with pytest.raises(LoRAError, match="match no nn.Linear"):
        inject_lora(fresh, ["nonexistent_proj"])
    with pytest.raises(LoRAError, match="only nn.Linear"):
        inject_lora(fresh, ["embed_tokens"])


def test_merged_equals_unmerged(model):
    x = tiny_inputs(model.config)
    base_keys = set(model.state_dict())
    inject_lora(model, TEXT_TARGETS, r=4, alpha=8)
    randomize_b(model)
    model.eval()
    unmerged = model(**x).logits
    assert (unmerged - SmolVLM.from_config(tiny_config())(**x).logits).abs().max() > 1e-3  # adapters matter
    merge_lora(model)
    assert not lora_modules(model) and all(type(m) is not LoRALinear for m in model.modules())
    assert set(model.state_dict()) == base_keys  # plain checkpoint keys again
    # fp32; merging reorders the sums (W x + B A x vs (W + B A) x): rounding-level differences only
    assert_close(model(**x).logits, unmerged, rtol=1e-5, atol=1e-5)


def test_save_load_roundtrip_and_layout(model, tmp_path):
    inject_lora(model, TEXT_TARGETS, r=4, alpha=8, dropout=0.1)
    randomize_b(model)
    model.eval()
    x = tiny_inputs(model.config)
    ref = model(**x).logits
    save_lora(model, tmp_path, base_model_name_or_path="tiny")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] is None and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["lora_dropout"] == 0.1 and cfg["base_model_name_or_path"] == "tiny"
    assert sorted(cfg["target_modules"]) == sorted(TEXT_TARGETS)
    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.text_model.layers.0.self_attn.q_proj.lora_A.weight" in sd
    assert sd["base_model.model.model.text_model.layers.1.mlp.down_proj.lora_B.weight"].shape == (32, 4)
    assert len(sd) == 2 * (2 * 7 + 2 * 3)

    torch.manual_seed(0)
    other = SmolVLM.from_config(tiny_config())
    load_lora(other, tmp_path)
    other.eval()
    assert_close(other(**x).logits, ref, rtol=0, atol=0)  # same weights, same ops


def test_load_rejects_mismatched_adapter(model, tmp_path):
    inject_lora(model, ["q_proj"], r=2, alpha=2)
    save_lora(model, tmp_path)
    other = SmolVLM.from_config(tiny_config())
    inject_lora(other, ["q_proj", "v_proj"], r=2, alpha=2)
    with pytest.raises(LoRAError, match="missing"):
        load_lora(other, tmp_path)


def test_regex_over_match_is_saved_as_regex(model, tmp_path):
    # only the text q_proj: the suffix "q_proj" would also hit the vision tower, so save a regex
    inject_lora(model, [r"model\.text_model\..*q_proj"], r=2, alpha=2)
    save_lora(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert isinstance(cfg["target_modules"], str)
    other = SmolVLM.from_config(tiny_config())
    load_lora(other, tmp_path)
    assert sorted(lora_modules(other)) == sorted(lora_modules(model))


def test_peft_library_loads_our_files(model, tmp_path):
    """peft (installed with -c constraints.txt, torch unchanged) reads our adapter onto the
    transformers model with the same weights and gives the same logits as our unmerged model."""
    import peft  # in the venv (pip install -c constraints.txt peft); a missing peft is a failure, not a skip
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    cfg = tiny_config()
    hf = Idefics3ForConditionalGeneration(Idefics3Config.from_dict(cfg.to_dict())).to(torch.float32).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k and "inv_freq" not in k]
    inject_lora(model, TEXT_TARGETS, r=4, alpha=8)
    randomize_b(model)
    model.eval()
    save_lora(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    x = tiny_inputs(cfg)
    with torch.no_grad():
        ours = model(**x).logits
        theirs = pm(**x).logits
    # fp32, same math in a different module tree: rounding-level differences only
    assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
