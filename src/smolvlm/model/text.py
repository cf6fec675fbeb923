"""Llama / SmolLM2 decoder (``model.text_model``), with optional static KV cache (SPEC 1.6).

Mirrors transformers 5.23 ``LlamaModel``: embed_tokens -> N x (pre-RMSNorm GQA attention with
rotate-half RoPE, pre-RMSNorm SiLU MLP) -> final norm. No embedding scaling, no biases (unless
the config asks for them).

Masking. Without a cache this is the ordinary full forward: causal + optional 2-D padding mask
(B, T), default position ids ``arange(T)``. With a cache, ``input_pos`` (T,) are the absolute
cache slots written by this call and ``attention_mask`` (B, L) is a 0/1 mask over cache slots
(L >= input_pos[-1] + 1); key slot j is visible to query slot i iff ``j <= i and mask[b, j]``.
Default RoPE positions are ``input_pos``.

Per-row slots (continuous batching). ``input_pos`` may instead be (B, T): row b writes its new
tokens at its own slots ``input_pos[b]`` (rows hold different requests at different lengths).
The same rule selects keys, per row: slot j is visible to row b's query at slot i iff
``j <= i and mask[b, j]``, so slots a row has not written yet (or that hold a previous
request's stale keys) are never seen; the mask may be omitted. L defaults to
``input_pos.max() + 1``; RoPE positions default to ``input_pos`` (pass ``position_ids`` (B, T)
when they differ from the slots).

Packed training rows (no cache). ``segment_ids`` (B, T), int, marks which sample each token belongs
to (1, 2, ... within a row; 0 = padding): a token attends only to earlier-or-equal slots with its
own segment id (block-diagonal causal mask, ``segment_mask``), and RoPE positions default to the
offset inside the token's run of equal ids, restarting at 0 for each sample (``segment_positions``).
Without ``segment_ids`` nothing of the above changes.
"""

from __future__ import annotations

import torch
from torch import nn

from smolvlm.config import TextConfig
from smolvlm.model.kv_cache import KVCache
from smolvlm.model.layers import GatedMLP, RMSNorm, apply_rope, attention, rope_cos_sin, rope_inv_freq, rope_tables
from smolvlm.model.packed import joint_outputs, linear_add


def build_mask(query_pos: torch.Tensor, key_len: int, key_valid: torch.Tensor | None) -> torch.Tensor:
    """Boolean attention mask (B or 1, 1, T, L): causal by slot, AND key validity.

    ``query_pos``: the query slots, (T,) shared by all rows or (B, T) per row.

    A query with no visible key (a left-padding position) would make SDPA return NaN; such rows
    are allowed to see their own slot only. Their outputs are meaningless either way (the
    reference makes them uniform over all keys) but stay finite, and no real token attends to them.
    """
    slots = torch.arange(key_len, device=query_pos.device)
    lead = (None, None) if query_pos.dim() == 1 else (slice(None), None)  # -> (1, 1, T, L) or (B, 1, T, L)
    allowed = (slots <= query_pos[..., None])[lead]
    if key_valid is not None:
        allowed = allowed & key_valid.to(torch.bool)[:, None, None, :]  # (B, 1, T, L)
    empty = ~allowed.any(dim=-1, keepdim=True)
    return allowed | (empty & (slots == query_pos[..., None])[lead])


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) RoPE positions restarting at 0 at the start of every run of equal segment ids."""
    b, t = segment_ids.shape
    idx = torch.arange(t, device=segment_ids.device).expand(b, t)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    run_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - run_start


def segment_mask(segment_ids: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean (B, 1, T, T) block-diagonal causal mask for packed rows: query i sees key j iff
    ``j <= i``, both carry the same segment id, the id is not 0 (padding) and ``key_valid[b, j]``.
    A query that sees nothing (padding) sees its own slot only, as in ``build_mask``."""
    t = segment_ids.shape[1]
    slots = torch.arange(t, device=segment_ids.device)
    allowed = (slots[None, :] <= slots[:, None])[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
    allowed = allowed & (segment_ids != 0)[:, None, :]  # (B, T, T)
    if key_valid is not None:
        allowed = allowed & key_valid.to(torch.bool)[:, None, :]
    allowed = allowed | (~allowed.any(dim=-1, keepdim=True) & torch.eye(t, dtype=torch.bool, device=slots.device))
    return allowed[:, None]  # (B, 1, T, T)


def _cache_mask(slots: torch.Tensor, key_len: int, key_valid: torch.Tensor | None) -> tuple[torch.Tensor | None, bool]:
    """(mask, is_causal) for a cached call writing ``slots`` (T,) and attending over ``key_len`` slots.

    Fast paths, exact because they select the same keys as ``build_mask``: with no padding, one
    query at the last slot sees every key (no mask at all), and a prompt written at slots
    ``0..T-1`` is plain causal attention (SDPA's ``is_causal``, T == L). Anything else (padding,
    chunked prefill at an offset, torch.compile's fixed ``key_len``) gets the explicit mask.
    """
    if slots.dim() == 2:  # per-row slots: every row needs its own causal limit
        return build_mask(slots, key_len, key_valid), False
    t = slots.shape[0]
    if not torch.compiler.is_compiling() and (key_valid is None or bool(key_valid.all())):
        last = int(slots[-1])
        if t == 1 and last == key_len - 1:
            return None, False
        if t == key_len and last == t - 1 and torch.equal(slots, torch.arange(t, device=slots.device)):
            return None, True
    return build_mask(slots, key_len, key_valid), False


QKV = ("q_proj", "k_proj", "v_proj")


def _first_of_run(slots: torch.Tensor) -> int | None:
    """The first slot when ``slots`` (T,) are consecutive (decode, a prompt, a chunk), else None."""
    if slots.dim() != 1 or torch.compiler.is_compiling():
        return None
    first = int(slots[0])
    t = slots.shape[0]
    return first if t == 1 or torch.equal(slots, torch.arange(first, first + t, device=slots.device)) else None


class TextAttention(nn.Module):
    """GQA self-attention (``LlamaAttention``)."""

    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=cfg.attention_bias)
        self.qkv_proj: nn.Module | None = None  # q/k/v as one weight with .joint(), set by model/packed.py

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        kv_cache: KVCache | None = None,
        input_pos: torch.Tensor | None = None,
        key_len: int = 0,
        is_causal: bool = False,
        start: int | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention output (B, T, D), plus ``residual`` if given (fused into o_proj when packed).

        ``cos``/``sin`` are ``layers.rope_tables``; ``start``: the first of ``input_pos``' slots
        when they are consecutive (the cache then writes one slice instead of indexing)."""
        b, t, _ = x.shape
        hq, hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        # fused q/k/v (packed or not), or one call of the layers' own kernel (int8/int4/bf16 GEMV):
        # q and k side by side, rotated at once
        qkv = self.qkv_proj.joint(x) if self.qkv_proj is not None else joint_outputs(self, QKV, x)
        if qkv is not None:  # (B, T, (Hq + 2 Hkv) hd)
            qk = apply_rope(qkv[..., : (hq + hkv) * hd].view(b, t, hq + hkv, hd), cos, sin)
            q, k, v = qk[:, :, :hq], qk[:, :, hq:], qkv[..., (hq + hkv) * hd:].view(b, t, hkv, hd)
        else:
            q, k, v = (getattr(self, p)(x) for p in QKV)
            q, k = apply_rope(q.view(b, t, hq, hd), cos, sin), apply_rope(k.view(b, t, hkv, hd), cos, sin)
            v = v.view(b, t, hkv, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        if kv_cache is not None:
            kc, vc = kv_cache.update(self.layer_idx, input_pos, k, v, start)  # (B, Hkv, max_len, hd)
            # A causal prompt at slots 0..T-1 attends over exactly the k, v just written; reuse them
            # unless the cache rounded them (a cache narrower than the activations).
            if not (is_causal and kc.dtype in (k.dtype, torch.float32)):
                # Attend only over the L live slots; ``attention`` attends in an fp32 cache's precision.
                k, v = kc[:, :, :key_len], vc[:, :, :key_len]  # (B, Hkv, L, hd)
        return self._out(attention(q, k, v, mask, is_causal=is_causal), residual)  # (B, T, D)

    def _out(self, h: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        return self.o_proj(h) if residual is None else linear_add(self.o_proj, h, residual)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = TextAttention(cfg, layer_idx)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None, **cache) -> torch.Tensor:
        # The residual adds ride on o_proj and down_proj (one oneDNN kernel each when packed).
        x = self.self_attn(self.input_layernorm(x), cos, sin, mask, residual=x, **cache)
        return self.mlp(self.post_attention_layernorm(x), residual=x)


class TextModel(nn.Module):
    """``model.text_model``: returns the final-norm hidden states (B, T, D)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"unsupported text hidden_act {cfg.hidden_act!r}; SmolLM2 uses silu")
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        input_pos: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, t, _ = inputs_embeds.shape
        dev = inputs_embeds.device
        if kv_cache is None:
            if input_pos is not None:
                raise ValueError("input_pos is only meaningful together with kv_cache")
            slots = torch.arange(t, device=dev)
            key_len = t
            if attention_mask is not None and attention_mask.shape != (b, t):
                raise ValueError(f"attention_mask must have shape (batch, seq) = {(b, t)}, got {tuple(attention_mask.shape)}")
            if segment_ids is not None:  # packed training rows: one causal block per sample
                if segment_ids.shape != (b, t):
                    raise ValueError(f"segment_ids must have shape (batch, seq) = {(b, t)}, "
                                     f"got {tuple(segment_ids.shape)}")
                segment_ids = segment_ids.to(dev)
                mask, causal = segment_mask(segment_ids, attention_mask), False
                if position_ids is None:
                    position_ids = segment_positions(segment_ids)
            else:
                # An all-ones mask is the same as no mask; skip it for the fused causal kernel.
                padded = attention_mask is not None and not bool(attention_mask.all())
                mask = build_mask(slots, t, attention_mask) if padded else None
                causal = mask is None and t > 1
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids (packed training rows) cannot be used with a kv_cache")
            if input_pos is None:
                raise ValueError("kv_cache needs input_pos: the (T,) or (B, T) cache slots written by this call")
            slots = input_pos.to(dev)
            key_len = self._cache_key_len(kv_cache, slots, attention_mask, t)
            mask, causal = _cache_mask(slots, key_len, attention_mask)
        if position_ids is None:
            position_ids = slots if slots.dim() == 2 else slots[None].expand(b, t)
        elif position_ids.dim() == 1:
            position_ids = position_ids[None].expand(b, t)
        cos, sin = rope_tables(*rope_cos_sin(position_ids, rope_inv_freq(self.config.head_dim, self.config.rope_theta, dev),
                                              inputs_embeds.dtype))
        cache = {"kv_cache": kv_cache, "input_pos": slots, "key_len": key_len,
                 "start": _first_of_run(slots)} if kv_cache is not None else {}
        cache["is_causal"] = causal
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, cos, sin, mask, **cache)
        return self.norm(x)

    @staticmethod
    def _cache_key_len(kv_cache: KVCache, slots: torch.Tensor, attention_mask: torch.Tensor | None, t: int) -> int:
        """Number of leading cache slots to attend over (L): the mask width, or last slot + 1."""
        if slots.shape not in ((t,), (kv_cache.batch_size, t)):
            raise ValueError(f"input_pos must have shape ({t},) or (batch, {t}) = ({kv_cache.batch_size}, {t}) for "
                             f"{t} new tokens, got {tuple(slots.shape)}")
        kv_cache.check_positions(slots)
        if attention_mask is None:
            return kv_cache.max_len if torch.compiler.is_compiling() else int(slots.max()) + 1
        if attention_mask.dim() != 2 or attention_mask.shape[0] != kv_cache.batch_size:
            raise ValueError(
                f"with a KV cache, attention_mask must be (batch, L) over cache slots with batch={kv_cache.batch_size}; "
                f"got {tuple(attention_mask.shape)}"
            )
        key_len = attention_mask.shape[1]
        if key_len > kv_cache.max_len:
            raise ValueError(f"attention_mask covers {key_len} slots but the KV cache holds only {kv_cache.max_len}")
        if not torch.compiler.is_compiling() and int(slots.max()) >= key_len:
            raise ValueError(
                f"attention_mask covers {key_len} cache slots but this call writes slot {int(slots.max())}; "
                "it must cover at least input_pos[-1] + 1 slots"
            )
        return key_len
