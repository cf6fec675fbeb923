"""Typed configuration mirroring the checkpoints' ``config.json``.

Two families share one schema: ``model_type: "idefics3"`` (SmolVLM v1: 256M/500M/2.2B) and
``model_type: "smolvlm"`` (SmolVLM2). Missing keys fall back to the reference library's
defaults (SPEC section 1.2); keys we do not use (training leftovers such as ``perceiver_config``
or ``transformers.js_config``) are kept verbatim in ``extra`` so a load/save round trip loses
nothing. Configs are frozen: derive a new one with ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_TYPES = ("idefics3", "smolvlm")


class ConfigError(ValueError):
    """A config.json that cannot describe a SmolVLM model."""


def _split(d: dict[str, Any], cls: type) -> tuple[dict[str, Any], dict[str, Any]]:
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    known = {k: v for k, v in d.items() if k in names}
    extra = {k: v for k, v in d.items() if k not in names}
    return known, extra


def _longest_edge(v: Any) -> int | None:
    if v is None:
        return None
    if isinstance(v, dict):
        return int(v["longest_edge"])
    return int(v)


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP-style encoder (``vision_config``). Defaults = reference library defaults."""

    hidden_size: int = 1152
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VisionConfig":
        known, extra = _split(d, cls)
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        return out


@dataclass(frozen=True)
class TextConfig:
    """Llama / SmolLM2 decoder (``text_config``)."""

    vocab_size: int = 128259
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.rope_scaling not in (None, {}) and self.rope_scaling.get("rope_type", self.rope_scaling.get("type")) not in (None, "default"):
            raise ConfigError(f"unsupported rope_scaling {self.rope_scaling!r}: SmolVLM uses plain RoPE")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TextConfig":
        d = dict(d)
        # transformers 5.x writes RoPE settings as ``rope_parameters``; 4.x as ``rope_theta``.
        rp = d.get("rope_parameters")
        if isinstance(rp, dict) and "rope_theta" not in d and "rope_theta" in rp:
            d["rope_theta"] = rp["rope_theta"]
        known, extra = _split(d, cls)
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        out.pop("rope_parameters", None)
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        out["model_type"] = "llama"
        return out


@dataclass(frozen=True)
class SmolVLMConfig:
    """Top-level config of a SmolVLM / Idefics3 checkpoint."""

    model_type: str = "idefics3"
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    text_config: TextConfig = field(default_factory=TextConfig)
    image_token_id: int = 128257
    scale_factor: int = 2
    tie_word_embeddings: bool = False
    torch_dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type {self.model_type!r} is not one of {MODEL_TYPES}")
        n = self.vision_config.patches_per_side
        if n % self.scale_factor:
            raise ConfigError(
                f"patches per side {n} (image_size {self.vision_config.image_size} // patch_size "
                f"{self.vision_config.patch_size}) is not divisible by scale_factor {self.scale_factor}"
            )

    # -- derived sizes ------------------------------------------------------------------
    @property
    def image_seq_len(self) -> int:
        """LM tokens per image tile: (n / s)^2."""
        return (self.vision_config.patches_per_side // self.scale_factor) ** 2

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    @property
    def tied(self) -> bool:
        # transformers 5.23 ties lm_head to embed_tokens on the *top-level* flag (checked with
        # all four combinations; SPEC 1.8 says text_config, the reference wins).
        return bool(self.tie_word_embeddings)

    # -- (de)serialisation ----------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SmolVLMConfig":
        d = dict(d)
        mt = d.get("model_type")
        if mt not in MODEL_TYPES:
            raise ConfigError(f"config.json has model_type {mt!r}; expected one of {MODEL_TYPES}")
        vision = VisionConfig.from_dict(d.pop("vision_config", {}) or {})
        tc = dict(d.pop("text_config", {}) or {})
        tc.setdefault("rms_norm_eps", 1e-5)
        if "vocab_size" not in tc and "vocab_size" in d:
            tc["vocab_size"] = d["vocab_size"]
        text = TextConfig.from_dict(tc)
        known, extra = _split(d, cls)
        known.pop("vision_config", None)
        known.pop("text_config", None)
        return cls(**known, vision_config=vision, text_config=text, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        out.update(
            {
                "model_type": self.model_type,
                "architectures": [self.architecture],
                "image_token_id": self.image_token_id,
                "scale_factor": self.scale_factor,
                "tie_word_embeddings": self.tie_word_embeddings,
                "vocab_size": self.text_config.vocab_size,
                "vision_config": self.vision_config.to_dict(),
                "text_config": self.text_config.to_dict(),
            }
        )
        if self.torch_dtype is not None:
            out["torch_dtype"] = self.torch_dtype
        out["vision_config"]["model_type"] = "idefics3_vision" if self.model_type == "idefics3" else "smolvlm_vision"
        return out

    @property
    def architecture(self) -> str:
        return "Idefics3ForConditionalGeneration" if self.model_type == "idefics3" else "SmolVLMForConditionalGeneration"

    @classmethod
    def from_json_file(cls, path: str | Path) -> "SmolVLMConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def save(self, directory: str | Path) -> Path:
        p = Path(directory) / "config.json"
        p.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return p


# -- presets ------------------------------------------------------------------------------
# The six released checkpoints. Values from shared/reference (256M published; others
# reconstructed, see their PROVENANCE.md) and SPEC section 1.2.
_SIGLIP_B16_512 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, image_size=512, patch_size=16)
_SIGLIP_SO400M_384 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                          num_attention_heads=16, image_size=384, patch_size=14)
_SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rope_theta=100000.0,
                     initializer_range=1 / 24)
_SMOLLM2_360M = dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                     num_key_value_heads=5, head_dim=64, max_position_embeddings=8192, rope_theta=100000.0)
_SMOLLM2_1_7B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                     num_key_value_heads=32, head_dim=64, max_position_embeddings=16384, rope_theta=273768.0)


def _preset(model_type: str, vision: dict, text: dict, scale: int, vocab: int = 49280,
            image_token_id: int = 49190) -> SmolVLMConfig:
    return SmolVLMConfig(
        model_type=model_type,
        vision_config=VisionConfig(**vision),
        text_config=TextConfig(vocab_size=vocab, pad_token_id=2, bos_token_id=1, eos_token_id=2, **text),
        image_token_id=image_token_id,
        scale_factor=scale,
        torch_dtype="bfloat16",
    )


PRESETS: dict[str, Any] = {
    "HuggingFaceTB/SmolVLM-256M-Instruct": lambda: _preset("idefics3", _SIGLIP_B16_512, _SMOLLM2_135M, 4),
    "HuggingFaceTB/SmolVLM-500M-Instruct": lambda: _preset("idefics3", _SIGLIP_B16_512, _SMOLLM2_360M, 4),
    "HuggingFaceTB/SmolVLM-Instruct": lambda: _preset("idefics3", _SIGLIP_SO400M_384, _SMOLLM2_1_7B, 3,
                                                      vocab=49155, image_token_id=49153),
    "HuggingFaceTB/SmolVLM2-256M-Video-Instruct": lambda: _preset("smolvlm", _SIGLIP_B16_512, _SMOLLM2_135M, 4),
    "HuggingFaceTB/SmolVLM2-500M-Video-Instruct": lambda: _preset("smolvlm", _SIGLIP_B16_512, _SMOLLM2_360M, 4),
    "HuggingFaceTB/SmolVLM2-2.2B-Instruct": lambda: _preset("smolvlm", _SIGLIP_SO400M_384, _SMOLLM2_1_7B, 3),
}
PRESET_ALIASES = {
    "256m": "HuggingFaceTB/SmolVLM-256M-Instruct",
    "500m": "HuggingFaceTB/SmolVLM-500M-Instruct",
    "2.2b": "HuggingFaceTB/SmolVLM-Instruct",
    "v2-256m": "HuggingFaceTB/SmolVLM2-256M-Video-Instruct",
    "v2-500m": "HuggingFaceTB/SmolVLM2-500M-Video-Instruct",
    "v2-2.2b": "HuggingFaceTB/SmolVLM2-2.2B-Instruct",
}


def preset(name: str) -> SmolVLMConfig:
    """Config of a released checkpoint, by repo id or short alias (``"256m"``, ``"v2-2.2b"``...)."""
    key = PRESET_ALIASES.get(name.lower(), name)
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESET_ALIASES)} or {sorted(PRESETS)}")
    return PRESETS[key]()
