"""QLoRA: LoRA over a frozen int8 / int4 weight-only quantized base (``lora.QLoRALinear``).

The reference throughout is LoRA over the *dequantized* base: a plain float32 ``nn.Linear`` holding
exactly ``layer.dequantized_weight()``. Both compute with the same weight values, so they differ only
by float rounding:

* float32: the base output comes from another kernel / summation order (the int4 CPU kernel, or
  ``(x @ q^T) * s`` for int8, against one GEMM with ``q * s``); a length-K float32 dot product then
  differs by ~sqrt(K) * 2^-24 relative to its magnitude (~1e-6 at K = 256; measured <= 7e-7). The
  gradients follow through the loss's dependence on ``y``. Tolerance: 1e-5 of the tensor's largest
  entry (10x the typical error), much tighter than any real difference (an int4 vs float base
  differs by ~1e-2).
* bfloat16 activations (the int8 kernel's path): ``y`` and ``grad_x`` are bf16 tensors, 8 significant
  bits (unit roundoff 2^-9 = 2e-3): a few roundings, so 1e-2 of the largest entry. The adapters run in
  float32 on the same (bf16-valued) input, so their gradients still agree to float32 rounding.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from smolvlm.model.vlm import SmolVLM
from smolvlm.quantization import Int4Linear, Int8Linear, quantize, quantized_modules
from smolvlm.training import lora, optim, qlora, sft
from smolvlm.training.build import build_run, export_final, run_recipe
from smolvlm.training.lora import LoRALinear, QLoRALinear, inject_lora, load_lora, lora_modules, merge_lora
from smolvlm.training.qlora import dequantize_base, dequantized_linear
from smolvlm.training.recipe import OptimRecipe, RecipeError, ScheduleRecipe, recipe_from_dict
from tests.helpers import tiny_config, tiny_recipe

TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
F32_TOL = 1e-5
BF16_TOL = 1e-2


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    """``max|a - b| <= tol * max|b|`` (errors of a dot product scale with its terms, not its result)."""
    err, scale = (a.float() - b.float()).abs().max().item(), b.float().abs().max().item()
    assert err <= tol * scale, f"max error {err:.3g} > {tol:g} * {scale:.3g}"


def quantized(linear: nn.Linear, mode: str) -> nn.Module:
    return Int8Linear.from_linear(linear) if mode == "int8" else Int4Linear.from_linear(linear, 32)


def qlora_and_reference(mode: str, k: int = 256, n: int = 128) -> tuple[QLoRALinear, LoRALinear, nn.Module]:
    """A QLoRA layer and LoRA over its dequantized float32 base, with equal (non-zero) adapters."""
    q = quantized(nn.Linear(k, n, bias=True), mode)
    ql = QLoRALinear(q, r=8, alpha=16)
    ref = LoRALinear(dequantized_linear(q, torch.float32), r=8, alpha=16)
    with torch.no_grad():
        ql.lora_B.weight.normal_()
        ref.lora_A.weight.copy_(ql.lora_A.weight)
        ref.lora_B.weight.copy_(ql.lora_B.weight)
    return ql, ref, q


def grads(layer: nn.Module, x: torch.Tensor, loss_fn) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    loss_fn(y).backward()
    return [y, x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad]


# -- one layer ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_row_blocks_dequantize_bit_for_bit(mode):
    q = quantized(nn.Linear(64, 96, bias=False), mode)
    for dtype in (torch.float32, torch.bfloat16):
        w = q.dequantized_weight(dtype)
        assert torch.equal(qlora._dequantized_rows(q, 0, 96, dtype), w)
        assert torch.equal(qlora._dequantized_rows(q, 16, 40, dtype), w[16:40])


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("rows", [4, 64])  # 4: int4's CPU kernel (<= 8 rows); 64: the dequantizing path
@pytest.mark.parametrize("block_rows", [None, 48])  # 48: the weight dequantized in row blocks 48 + 48 + 32
def test_layer_gradients_equal_lora_over_the_dequantized_base(mode, rows, block_rows, monkeypatch):
    if block_rows:
        monkeypatch.setattr(qlora, "DEQUANT_BLOCK_BYTES", 4 * 256 * block_rows)
        assert len(qlora._row_blocks(quantized(nn.Linear(256, 128), mode))) == 3
    ql, ref, q = qlora_and_reference(mode)
    x = torch.randn(2, rows // 2, 256)
    loss = lambda y: (y.tanh() ** 2).sum()  # noqa: E731 - nonlinear: grad_y depends on y
    got, want = grads(ql, x, loss), grads(ref, x, loss)
    for name, a, b in zip(["y", "grad x", "grad lora_A", "grad lora_B"], got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        close(a, b, F32_TOL)
    # the quantized base: buffers, and a frozen bias that never receives a gradient
    assert [n for n, p in ql.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]
    assert q.bias.grad is None and ql.weight is None


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_layer_gradients_bf16_through_the_int_kernel(mode, monkeypatch):
    """bf16 activations, 4 rows: the int8 / int4 CPU kernel computes the base (it has no derivative;
    ``FrozenQuantizedMatmul`` supplies grad_x)."""
    from smolvlm import kernels

    # smolvlm's own GEMV where it builds (test_cpu_kernels.py), else PyTorch's
    owner, kernel = ((torch.ops.smolvlm, f"{mode}_gemv") if kernels.ready()
                     else (torch, "_weight_int8pack_mm" if mode == "int8" else "_weight_int4pack_mm_for_cpu"))
    calls, real = [], getattr(owner, kernel)
    monkeypatch.setattr(owner, kernel, lambda *a: calls.append(1) or real(*a))
    ql, ref, _ = qlora_and_reference(mode)
    x = torch.randn(4, 256).to(torch.bfloat16)
    g = torch.randn(4, 128).to(torch.bfloat16).float()  # bf16-exact: both see the same grad_y
    loss = lambda y: (y.float() * g).sum()  # noqa: E731
    got, want = grads(ql, x, loss), grads(ref, x.float(), loss)
    assert calls, "the int kernel was not used"
    assert got[0].dtype == got[1].dtype == torch.bfloat16
    close(got[0], want[0], BF16_TOL)  # y
    close(got[1], want[1], BF16_TOL)  # grad x
    close(got[2], want[2], F32_TOL)  # grad lora_A: float32 adapters on the same input values
    close(got[3], want[3], F32_TOL)


# -- the tiny model ------------------------------------------------------------------------------
def tiny_inputs(cfg) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 290, (2, 12), generator=g)
    ids[:, 1:1 + cfg.image_seq_len] = cfg.image_token_id
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
            "pixel_values": torch.randn(2, 1, 3, 32, 32, generator=g)}


def qlora_model(mode: str) -> SmolVLM:
    torch.manual_seed(0)
    model = quantize(SmolVLM.from_config(tiny_config()), mode)
    return model


def with_adapters(model: SmolVLM, seed: int = 3) -> SmolVLM:
    torch.manual_seed(seed)
    inject_lora(model, TEXT_TARGETS, r=4, alpha=8)
    g = torch.Generator().manual_seed(2)
    for m in lora_modules(model).values():
        with torch.no_grad():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_model_gradients_equal_lora_over_the_dequantized_base(mode):
    """Whole tiny model: every adapter's gradient and the input's (pixel_values, whose gradient
    crosses all quantized text layers and lm_head) match LoRA over the dequantized float base."""
    qmodel = qlora_model(mode)
    ref = copy.deepcopy(qmodel)
    assert dequantize_base(ref) and not quantized_modules(ref)
    with_adapters(qmodel), with_adapters(ref)
    assert any(isinstance(m, QLoRALinear) for m in qmodel.modules())
    assert "lm_head" in quantized_modules(qmodel)  # not a target: differentiable all the same
    out = {}
    for name, model in (("q", qmodel), ("ref", ref)):
        x = tiny_inputs(model.config)
        x["pixel_values"].requires_grad_(True)
        model(**x).loss.backward()
        out[name] = {"pixel_values": x["pixel_values"].grad,
                     **{n: p.grad for n, p in model.named_parameters() if ".lora_" in n}}
    assert out["q"].keys() == out["ref"].keys() and len(out["q"]) == 1 + 2 * (2 * 7 + 2 * 3)
    for n in out["ref"]:
        assert out["q"][n] is not None, n
        close(out["q"][n], out["ref"][n], F32_TOL)  # measured: int8 1.2e-6, int4 0 (same dequantize + GEMM)
    assert all(p.grad is None for m in quantized_modules(qmodel).values() for p in m.parameters())


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_base_never_changes(mode):
    model = with_adapters(qlora_model(mode))
    counts = sft.apply_freezing(model, freeze=["model", "lm_head"])
    before = {n: b.clone() for n, b in model.named_buffers()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = optim.build_optimizer(model, OptimRecipe(lr=1e-2, weight_decay=0.1))
    sched = optim.build_scheduler(opt, ScheduleRecipe(kind="constant"), 3)
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(3):
        sft.train_step(model, [tiny_inputs(model.config)], opt, sched, grad_clip=1.0)
    after = dict(model.named_buffers())
    assert any("weight_int" in n or "weight_uint4" in n for n in before)
    for n, b in before.items():
        assert torch.equal(after[n], b), n  # quantized weights, scales (and zeros): bit-identical
    assert all(not torch.equal(p, adapters[n]) for n, p in model.named_parameters() if n in adapters)


def test_merge_and_dequantize_give_a_float_model_with_the_same_logits():
    model = with_adapters(qlora_model("int4")).eval()
    x = tiny_inputs(model.config)
    want = model(**x).logits
    merge_lora(model)
    names = dequantize_base(model)
    assert "lm_head" in names and not quantized_modules(model) and model.quantization is None
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("_proj") or n == "lm_head")
    close(model(**x).logits, want, F32_TOL)


# -- recipes ---------------------------------------------------------------------------------------
def qlora_recipe(ref256, out, mode: str, **over) -> dict:
    r = tiny_recipe(ref256, out, max_steps=3, eval_every=0, checkpoint_every=0)
    r["model"]["quantize"] = mode
    r["freeze"] = {"freeze": ["model", "lm_head"]}  # only the adapters train (QLoRA's usual setup)
    r["optim"]["lr_groups"] = {}
    r["lora"]["dropout"] = 0.0
    r["data"]["n_eval"] = 0
    for k, v in over.items():
        section, key = k.split("__")
        r[section][key] = v
    return r


def test_recipe_errors_before_anything_is_written(ref256, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RecipeError, match="QLoRA needs lora.enabled: the quantized base cannot be trained"):
        run_recipe(recipe_from_dict(qlora_recipe(ref256, out, "int8", lora__enabled=False)))
    # a quantized layer the freeze rules would train (text model unfrozen, not a LoRA target)
    with pytest.raises(RecipeError, match="cannot train"):
        run_recipe(recipe_from_dict(qlora_recipe(ref256, out, "int4", freeze__freeze=["model.vision_model"])))
    with pytest.raises(RecipeError, match="group_size"):
        run_recipe(recipe_from_dict(qlora_recipe(ref256, out, "int4", model__quantize_group_size=64)))
    assert not out.exists()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_qlora_run_lowers_the_loss_and_exports_a_float_final(ref256, tmp_path, mode):
    recipe = recipe_from_dict(qlora_recipe(ref256, tmp_path / "run", mode))
    parts = build_run(recipe)
    model = parts.model
    quant = quantized_modules(model)
    assert "lm_head" in quant and model.quantization["mode"] == mode
    assert sum(isinstance(m, QLoRALinear) for m in model.modules()) == 2 * 3  # q, v, down x 2 layers
    untrained = copy.deepcopy(model)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    batch = parts.collate_fn([parts.train_data[i] for i in range(2)])  # the fixed batch
    loss_of = lambda: sft.evaluate(model, [batch])  # noqa: E731 - eval mode, no dropout
    opt = optim.build_optimizer(model, recipe.optim)
    sched = optim.build_scheduler(opt, ScheduleRecipe(kind="constant"), 3)
    losses = [loss_of()]
    for _ in range(3):
        sft.train_step(model, [batch], opt, sched, grad_clip=1.0)
        losses.append(loss_of())
    assert losses[-1] < losses[0] and losses[1] < losses[0], losses
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())  # the base did not move

    model.eval()
    fwd = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        want = model(**fwd).logits
    final = export_final(parts, recipe)
    assert not (final / "quantization.json").exists()
    assert json.loads((final / "config.json").read_text())["torch_dtype"] == "float32"
    loaded = SmolVLM.from_pretrained(final).eval()
    assert not quantized_modules(loaded) and not lora_modules(loaded)
    with torch.no_grad():
        got = loaded(**fwd).logits
    # merged (dequant(W) + B A) x against dequant-or-kernel(W) x + B A x: float32 rounding per layer
    close(got, want, F32_TOL)

    # the product: the PEFT adapter, which on the same quantized base gives the QLoRA model back
    adapter = tmp_path / "run" / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    load_lora(untrained, adapter)
    untrained.eval()
    with torch.no_grad():
        torch.testing.assert_close(untrained(**fwd).logits, want, rtol=0, atol=0)


def test_run_recipe_end_to_end_with_int4(ref256, tmp_path):
    """``smolvlm train``'s work: checks, build, train (with a checkpoint), export."""
    out = tmp_path / "run"
    result = run_recipe(recipe_from_dict(qlora_recipe(ref256, out, "int4", train__max_steps=2,
                                                      train__checkpoint_every=2)))
    assert result.step == 2 and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "final" / "quantization.json").exists()
    loaded = SmolVLM.from_pretrained(out / "final")
    assert not quantized_modules(loaded) and loaded.dtype == torch.float32
