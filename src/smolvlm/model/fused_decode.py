"""An eager decode step through every decoder layer in one native call.

``kernels/decode_layers.cpp`` runs, for one new token in each row, what ``text.TextModel.forward``
runs layer by layer (RMSNorm, q/k/v, RoPE, the KV cache write, the decode attention, o + residual,
RMSNorm, gate/up, SiLU, down + residual, the final norm) with the same kernels and the same
roundings, so the hidden states are bit for bit the layer-by-layer ones; only the ~20 Python module
calls and ~60 PyTorch calls a layer around those kernels are gone. ``plan`` builds it where every
text linear runs, for the cache's number of rows, a kernel the fused step can call
(``decode_weights``: the bf16 or float32 GEMV of ``upcast``'s layers, ``Int8Linear``'s and
``Int4Linear``'s kernels, smolvlm's or PyTorch's, oneDNN's packed weights of ``packed``'s layers),
where ``kernels.ready("decode_layers")`` (on AMX CPUs too, over oneDNN's packed weights); anything else
(LoRA layers, biases, fp16, the kernels off) keeps the layer-by-layer path, and ``plan`` says why.

Each row writes one token at its own slot and attends over its slots up to that one, or over those
of them a key mask marks: ``generate``'s step, left-padded batches included, and continuous
batching's, whose rows sit at their own positions. Compiled steps and training keep
``TextModel.forward``. A plan holds the
layers' tensors, so it lives as long as they do: one generation (``generation/generate.py``), or one
span of engine rows (``generation/engine.py``, whose model and cache never change). A model changed
afterwards (quantized, LoRA attached, moved) gets a new one with its next generation.
"""

from __future__ import annotations

from typing import Any

import torch

from smolvlm import kernels
from smolvlm.model.layers import rope_cos_sin, rope_inv_freq, rope_tables
from smolvlm.model.packed import FUSED_GROUPS
from smolvlm.model.text import build_mask

KINDS = {"bf16": 0, "int8": 1, "int4": 2, "int4_torch": 3, "packed": 4, "f32": 5,  # decode_layers.cpp's Kind
         "int8_torch": 6}
# The linears of a layer in the kernel's order, grouped as one call each (q/k/v, o, gate/up, down): the
# owner, the parts, and the module packing fuses the parts into (``packed.FUSED_GROUPS``), if any.
(_QKV, _QKV_FUSED), (_GATE_UP, _GATE_UP_FUSED) = FUSED_GROUPS
GROUPS = (("self_attn", _QKV, _QKV_FUSED), ("self_attn", ("o_proj",), None),
          ("mlp", _GATE_UP, _GATE_UP_FUSED), ("mlp", ("down_proj",), None))


class FusedDecoder:
    """``decoder(embeds (B, 1, D), positions (B, 1), slots, key_valid=None) -> final-norm hidden states
    (B, 1, D)``: one token of each of the cache's B rows through every layer, row b's k and v written at
    ``slots[b]`` of ``cache``, attending over its slots ``0..slots[b]`` (``slots``: an int for one row,
    else a list), of those only the ones ``key_valid`` (B, L) marks, if given (a left-padded batch's
    attention mask over cache slots, as ``TextModel.forward`` takes it)."""

    def __init__(self, text: Any, cache: Any, dtype: torch.dtype, norms: list[torch.Tensor], kinds: list[int],
                 weights: list[torch.Tensor], aux: list[torch.Tensor]) -> None:
        cfg = text.config
        self.dtype, self.cache = dtype, cache
        self.norms, self.kinds, self.weights, self.aux = norms, kinds, weights, aux
        self.heads, self.kv_heads, self.eps = cfg.num_attention_heads, cfg.num_key_value_heads, text.norm.eps
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, norms[0].device)

    def __call__(self, embeds: torch.Tensor, position: torch.Tensor, slots: int | list[int],
                 key_valid: torch.Tensor | None = None) -> torch.Tensor:
        b = embeds.shape[0]
        slots = [slots] if isinstance(slots, int) else slots
        cos, sin = rope_tables(*rope_cos_sin(position, self.inv_freq, self.dtype))  # (B, 1, 1, hd) each
        mask = None if key_valid is None else \
            build_mask(torch.tensor(slots)[:, None], key_valid.shape[1], key_valid).contiguous()  # (B, 1, 1, L)
        h = torch.ops.smolvlm.decode_layers(embeds.reshape(b, -1), cos.reshape(b, -1), sin.reshape(b, -1),
                                            self.norms, self.kinds, self.weights, self.aux, self.cache.k,
                                            self.cache.v, slots, mask, self.heads, self.kv_heads, self.eps)
        return h.view(b, 1, -1)


def plan(text: Any, cache: Any) -> FusedDecoder | str:
    """The fused decode step of ``text`` (a ``text.TextModel``) over every row of ``cache`` (a ``KVCache``
    or a view of some of its rows), or why it cannot run (then the caller keeps ``text``'s own forward)."""
    if not kernels.ready("decode_layers"):
        return f"the kernels do not run here ({kernels.problem() or 'not on this CPU'})"
    dtype = text.embed_tokens.weight.dtype
    if dtype not in (torch.float32, torch.bfloat16) or text.embed_tokens.weight.device.type != "cpu":
        return f"a {dtype} model on {text.embed_tokens.weight.device}: float32 or bfloat16 on the CPU only"
    rows = cache.batch_size
    if cache.dtype not in (torch.float32, torch.bfloat16) or cache.head_dim % 8:
        return f"a {cache.dtype} cache of head_dim {cache.head_dim}"
    norms, kinds, weights, aux = [], [], [], []
    for i, layer in enumerate(text.layers):
        norms += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
        for owner, names, joint in GROUPS:
            fused = getattr(getattr(layer, owner), joint) if joint else None
            # one packed weight for the whole group (its first slot; the kernel reads only that one)
            group = [fused] * len(names) if fused is not None else [getattr(getattr(layer, owner), n) for n in names]
            found = [m.decode_weights(dtype, rows) if hasattr(m, "decode_weights") else None for m in group]
            if any(f is None for f in found) or len({f[0] for f in found}) != 1:
                return (f"layer {i}'s {', '.join(names)} ({type(group[0]).__name__}) run no kernel of the fused step "
                        f"together for {rows} row{'s' if rows > 1 else ''}")
            kinds.append(KINDS[found[0][0]])
            weights += [f[1] for f in found]
            aux += [f[2] for f in found]
    norms.append(text.norm.weight)
    if any(n.dtype != dtype for n in norms):
        return f"RMSNorm weights not in the model's {dtype}"
    if any(layer.input_layernorm.eps != text.norm.eps or layer.post_attention_layernorm.eps != text.norm.eps
           for layer in text.layers):
        return "RMSNorms with different eps"
    return FusedDecoder(text, cache, dtype, norms, kinds, weights, aux)
