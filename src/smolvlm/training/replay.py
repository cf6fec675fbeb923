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
    ``tokenizer.chat_template`` (else SmolLM2's ChatML), ChatML for ``"random"`` (tests). A SmolVLM
    folder as backbone is refused: its own format is the SmolVLM template, which is not handled here."""
    if text_backbone.startswith("gguf:"):
        from smolvlm.weights import gguf

        path = gguf.find_smollm2_gguf() if text_backbone == "gguf:smollm2" else Path(text_backbone[len("gguf:"):])
        return gguf.gguf_chat_template(path) or CHATML_TEMPLATE
    if text_backbone == "random":
        return CHATML_TEMPLATE
    raise ReplayError(f"replay needs a GGUF text backbone (its own chat format), not {text_backbone!r}; "
                      f"set replay.n: 0 for this recipe")


def render_prompts(template: str, prompts: Sequence[str]) -> list[str]:
    import jinja2

    t = jinja2.Environment(keep_trailing_newline=True).from_string(template)
    return [t.render(messages=[{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]


@torch.no_grad()
def backbone_answers(model: Any, tokenizer: Any, prompts: Sequence[str], template: str,
                     max_new_tokens: int = 96, batch_size: int = 16, progress: bool = False) -> list[str | None]:
    """Greedy answers of ``model`` to ``prompts`` rendered with ``template``; ``None`` where the answer
    did not end (no ``<|im_end|>``) within ``max_new_tokens``."""
    from smolvlm.generation.generate import generate_ids

    end_id = tokenizer.token_to_id(IM_END)
    if end_id is None:
        raise ReplayError(f"the tokenizer has no {IM_END!r} token: the backbone's chat format cannot be used")
    texts = render_prompts(template, prompts)
    was_training = model.training
    model.eval()
    out: list[str | None] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(texts), desc="replay answers", unit="prompt", dynamic_ncols=True)
    try:
        for s in range(0, len(texts), batch_size):
            ids = tokenizer.encode_batch(texts[s: s + batch_size])
            T = max(map(len, ids))
            input_ids = torch.full((len(ids), T), end_id, dtype=torch.long)
            mask = torch.zeros((len(ids), T), dtype=torch.long)
            for i, row in enumerate(ids):  # left padding, as generation expects
                input_ids[i, T - len(row):] = torch.tensor(row)
                mask[i, T - len(row):] = 1
            gen = generate_ids(model, input_ids, mask, max_new_tokens=max_new_tokens, do_sample=False,
                               eos_token_id=end_id, pad_token_id=end_id)[:, T:]
            for row in gen.tolist():
                if end_id not in row:
                    out.append(None)
                    continue
                text = tokenizer.decode(row[: row.index(end_id)], skip_special_tokens=True).strip()
                out.append(text or None)
            if bar is not None:
                bar.update(len(ids))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return out


def replay_samples(prompts: Sequence[str], answers: Sequence[str | None]) -> list[dict[str, Any]]:
    """the_cauldron samples (no images) for every prompt that got a finished answer."""
    return [{"images": [], "texts": [{"user": p, "assistant": a}], "category": "chat", "id": f"chat-{i}"}
            for i, (p, a) in enumerate(zip(prompts, answers)) if a]


def load_or_make(path: str | Path, settings: dict[str, Any], make: Any) -> list[dict[str, Any]]:
    """Replay samples cached at ``path`` for ``settings``, else ``make() -> (prompts, answers)``
    written there atomically. A cache made with other settings is an error, never reused."""
    path = Path(path)
    settings = json.loads(json.dumps(settings))
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ReplayError(f"{path} is not a readable replay file ({e}); delete it to regenerate") from e
        if data.get("settings") != settings:
            raise ReplayError(f"{path} was made with other settings ({data.get('settings')}, recipe wants {settings}); "
                              f"use a new train.output_dir or delete that file")
        return replay_samples(data["prompts"], data["answers"])
    prompts, answers = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"settings": settings, "prompts": list(prompts), "answers": list(answers),
                               "finished": sum(a is not None for a in answers)}, indent=1) + "\n")
    os.replace(tmp, path)
    return replay_samples(prompts, answers)


class MixedSamples(Sequence):
    """Two sample sequences as one (index ``i < len(a)`` is ``a[i]``, then ``b``)."""

    def __init__(self, a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]) -> None:
        self.a, self.b = a, b

    def __len__(self) -> int:
        return len(self.a) + len(self.b)

    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override]
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.a[i] if i < len(self.a) else self.b[i - len(self.a)]
