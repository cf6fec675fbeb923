"""A LoRA fine-tune's outputs work in the reference stack: ``<output_dir>/adapter`` loads with
``peft.PeftModel.from_pretrained`` on transformers' model of the base checkpoint and gives the logits
of our merged ``<output_dir>/final``; ``final/`` loads in transformers and greedy-decodes the same
tokens as our engine. Trained on the JSONL example data (``examples/data``) from a tiny checkpoint."""

from __future__ import annotations

import torch
from torch.testing import assert_close

from smolvlm.cli.main import main
from smolvlm.generation.generate import generate_ids
from smolvlm.model.vlm import SmolVLM
from smolvlm.processing.processor import SmolVLMProcessor
from tests.conftest import REPO
from tests.helpers import build_tiny_checkpoint


def test_adapter_and_final_load_in_peft_and_transformers(ref256, tmp_path):
    import peft
    from PIL import Image
    from transformers import Idefics3ForConditionalGeneration

    ckpt = build_tiny_checkpoint(tmp_path / "base", ref256)
    out = tmp_path / "run"
    sets = [f"model.checkpoint={ckpt}", f"train.output_dir={out}", "train.max_steps=3", "train.batch_size=2",
            "train.grad_accum=1", "train.progress=false", "train.gradient_checkpointing=false",
            "schedule.warmup_steps=0", "optim.lr=5e-3", "lora.dropout=0.0", "data.limit=4"]
    assert main(["train", "--recipe", str(REPO / "configs" / "finetune-jsonl.yaml"),
                 *(x for s in sets for x in ("--set", s))]) == 0

    proc = SmolVLMProcessor.from_pretrained(out / "final")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many shapes are there?"}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
    x = dict(proc(text=[prompt], images=[[Image.open(REPO / "examples" / "data" / "img" / "00.png")]],
                  return_tensors="pt"))

    base = Idefics3ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        l_base = base(**x).logits
    with_adapter = peft.PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    hf_final = Idefics3ForConditionalGeneration.from_pretrained(out / "final", dtype=torch.float32).eval()
    ours = SmolVLM.from_pretrained(out / "final", dtype=torch.float32).eval()
    with torch.no_grad():
        l_adapter = with_adapter(**x).logits
        l_final = hf_final(**x).logits
        l_ours = ours(**x).logits
    # the adapter changed the model (3 steps at lr 5e-3), so the agreement below is not vacuous
    assert not torch.allclose(l_adapter, l_base, atol=1e-3)
    # fp32; unmerged (base + B A x) vs merged (W + B A) weights and two module trees: rounding only
    assert_close(l_adapter, l_final, rtol=1e-4, atol=1e-4)
    assert_close(l_ours, l_final, rtol=1e-4, atol=1e-4)

    eou = proc.tokenizer.token_to_id("<end_of_utterance>")
    with torch.no_grad():
        theirs = hf_final.generate(**x, max_new_tokens=8, do_sample=False, eos_token_id=eou, pad_token_id=eou)
        mine = generate_ids(ours, **x, max_new_tokens=8, do_sample=False, eos_token_id=[eou])
    n = x["input_ids"].shape[1]
    assert mine[0, n:].tolist() == theirs[0, n:].tolist()[: mine.shape[1] - n]
