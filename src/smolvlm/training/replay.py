"""Text-only replay: the backbone's own chat answers, mixed into SFT so that chat stays fluent.

LoRA on a frozen language model still changes how it answers everything. Trained on visual
questions alone (one-word answers) the default model came to answer "Write one sentence about the
sea." with "One sentence". Replay keeps the old behaviour: before training, the untouched backbone
(LoRA B = 0, so the model *is* the backbone) answers ``synth.chat.chat_prompts`` greedily in its
**own** chat format (SmolLM2-Instruct's ChatML template, read from the GGUF), and those pairs join
the training set as text-only samples in the_cauldron layout, where the SmolVLM template frames
them. The answers are cached in ``<output_dir>/replay.json`` with the settings that made them, so
a resumed run trains on the same data (exact resume) without generating again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from smolvlm.generation.generate import generate_ids
from smolvlm.processing.chat import compile_template
from smolvlm.weights import gguf

IM_END = "<|im_end|>"
# SmolLM2-Instruct's template (the GGUF's tokenizer.chat_template); used when a backbone has none
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


class ReplayError(ValueError):
    """Replay data that cannot be made or does not match the recipe."""


def backbone_chat_template(text_backbone: str) -> str:
    """The chat template the text backbone was instruction-tuned with: a GGUF's
    ``tokenizer.chat_template`` (else SmolLM2's ChatML), ChatML for ``"random"`` (tests). Other
    backbones are refused (``Recipe.validate`` says so up front)."""
    if text_backbone.startswith("gguf:"):
        return gguf.gguf_chat_template(gguf.backbone_gguf_path(text_backbone)) or CHATML_TEMPLATE
    if text_backbone == "random":
        return CHATML_TEMPLATE
    raise ReplayError(f"replay needs a GGUF text backbone (its own chat format), not {text_backbone!r}; "
                      f"set replay.n: 0 for this recipe")


def render_prompts(template: str, prompts: Sequence[str]) -> list[str]:
    """Each prompt as a one-turn conversation in ``template`` (compiled as transformers does), ready for
    the assistant's answer. Contents are plain strings, as text-only templates such as ChatML expect."""
    t = compile_template(template)
    return [t.render(messages=[{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]


@torch.no_grad()
def backbone_answers(model: Any, processor: Any, prompts: Sequence[str], template: str,
                     max_new_tokens: int = 96, batch_size: int = 16, progress: bool = False) -> list[str | None]:
    """Greedy answers of ``model`` to ``prompts`` rendered with ``template``; ``None`` where the answer
    did not end (no ``<|im_end|>``) within ``max_new_tokens``."""
    tok = processor.tokenizer
    end_id = tok.token_to_id(IM_END)
    if end_id is None:
        raise ReplayError(f"the tokenizer has no {IM_END!r} token: the backbone's chat format cannot be used")
    texts = render_prompts(template, prompts)
    was_training = model.training
    model.eval()
    out: list[str | None] = []
    try:
        with tqdm(total=len(texts), desc="replay answers", unit="prompt", dynamic_ncols=True, disable=not progress) as bar:
            for s in range(0, len(texts), batch_size):
                enc = processor(text=texts[s: s + batch_size], return_tensors="pt", padding_side="left")
                T = enc["input_ids"].shape[1]
                gen = generate_ids(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens,
                                   do_sample=False, eos_token_id=end_id, pad_token_id=end_id)[:, T:]
                for row in gen.tolist():
                    text = tok.decode(row[: row.index(end_id)], skip_special_tokens=True).strip() if end_id in row else ""
                    out.append(text or None)
                bar.update(len(gen))
    finally:
        model.train(was_training)
    return out


def replay_samples(prompts: Sequence[str], answers: Sequence[str | None]) -> list[dict[str, Any]]:
    """the_cauldron samples (no images) for every prompt that got a finished answer."""
    return [{"images": [], "texts": [{"user": p, "assistant": a}], "category": "chat", "id": f"chat-{i}"}
            for i, (p, a) in enumerate(zip(prompts, answers)) if a]


def cached_samples(path: str | Path, settings: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Replay samples cached at ``path`` for ``settings``; None when there is no cache. A cache made
    with other settings is an error, never reused. Reads only."""
    path = Path(path)
    if not path.is_file():
        return None
    settings = json.loads(json.dumps(settings))
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ReplayError(f"{path} is not a readable replay file ({e}); delete it to regenerate") from e
    if data.get("settings") != settings:
        raise ReplayError(f"{path} was made with other settings ({data.get('settings')}, recipe wants {settings}); "
                          f"use a new train.output_dir or delete that file")
    return replay_samples(data["prompts"], data["answers"])


def load_or_make(path: str | Path, settings: dict[str, Any], make: Any) -> list[dict[str, Any]]:
    """``cached_samples(path, settings)``, else ``make() -> (prompts, answers)`` written there atomically."""
    path = Path(path)
    cached = cached_samples(path, settings)
    if cached is not None:
        return cached
    prompts, answers = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"settings": json.loads(json.dumps(settings)), "prompts": list(prompts),
                               "answers": list(answers)}, indent=1) + "\n")
    os.replace(tmp, path)
    return replay_samples(prompts, answers)
