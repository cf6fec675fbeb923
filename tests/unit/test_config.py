"""Typed config <-> config.json for both model types, presets, tolerance of legacy keys."""

from __future__ import annotations

import json

import pytest

from smolvlm.config import ConfigError, SmolVLMConfig, TextConfig, preset
from tests.conftest import CHECKPOINTS, reference

PRESET_OF = {
    "SmolVLM-256M-Instruct": "256m",
    "SmolVLM-500M-Instruct": "500m",
    "SmolVLM-Instruct": "2.2b",
    "SmolVLM2-2.2B-Instruct": "v2-2.2b",
}


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_reference_configs_load_and_match_presets(name):
    cfg = SmolVLMConfig.from_json_file(reference(name) / "config.json")
    p = preset(PRESET_OF[name])
    # Every field the model uses equals the preset (extra legacy keys are not compared).
    assert cfg.model_type == p.model_type
    assert cfg.vision_config == p.vision_config
    assert cfg.image_token_id == p.image_token_id and cfg.scale_factor == p.scale_factor
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
              "tie_word_embeddings"):
        assert getattr(cfg.text_config, f) == pytest.approx(getattr(p.text_config, f)), f


def test_256m_derived_sizes(ref256):
    cfg = SmolVLMConfig.from_json_file(ref256 / "config.json")
    assert cfg.image_seq_len == 64
    assert cfg.vision_config.patches_per_side == 32
    assert cfg.text_config.head_dim == 64 and cfg.text_config.num_key_value_heads == 3
    assert not cfg.tied
    # Legacy training keys survive a round trip untouched.
    assert "perceiver_config" in cfg.text_config.extra
    assert "transformers.js_config" in cfg.extra


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_round_trip(tmp_path, name):
    cfg = SmolVLMConfig.from_json_file(reference(name) / "config.json")
    cfg.save(tmp_path)
    again = SmolVLMConfig.from_json_file(tmp_path / "config.json")
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()


def test_smolvlm2_presets_have_smolvlm_type():
    for alias in ("v2-256m", "v2-500m", "v2-2.2b"):
        assert preset(alias).model_type == "smolvlm"
    assert preset("v2-256m").image_seq_len == 64 and preset("v2-2.2b").image_seq_len == 81


def test_rope_parameters_form_is_read():
    # transformers 5.x writes rope settings as rope_parameters.
    t = TextConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4,
                              "rope_parameters": {"rope_type": "default", "rope_theta": 1234.0}})
    assert t.rope_theta == 1234.0 and t.head_dim == 16 and t.num_key_value_heads == 4


def test_bad_configs_raise_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="model_type"):
        SmolVLMConfig.from_dict({"model_type": "llava"})
    with pytest.raises(ConfigError, match="no config.json"):
        SmolVLMConfig.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        SmolVLMConfig.from_json_file(tmp_path / "config.json")
    with pytest.raises(ConfigError, match="multiple"):
        TextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("9b")
    with pytest.raises(ConfigError, match="divisible"):
        SmolVLMConfig.from_dict({"model_type": "idefics3", "scale_factor": 3,
                                 "vision_config": {"image_size": 32, "patch_size": 8}})


def test_transformers_reads_our_config(tmp_path, ref256):
    from transformers import AutoConfig

    cfg = SmolVLMConfig.from_json_file(ref256 / "config.json")
    cfg.save(tmp_path)
    theirs = AutoConfig.from_pretrained(tmp_path)
    assert theirs.model_type == "idefics3"
    assert theirs.text_config.num_key_value_heads == 3
    assert theirs.vision_config.patch_size == 16
    assert theirs.image_token_id == 49190 and theirs.scale_factor == 4
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == 49280
