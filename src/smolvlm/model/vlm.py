"""The full SmolVLM / Idefics3 model: vision -> connector -> merge into <image> slots -> Llama -> lm_head.

Mirrors transformers 5.23 ``SmolVLMForConditionalGeneration`` / ``Idefics3ForConditionalGeneration``
(SPEC 1.1-1.8). Module attribute paths equal the checkpoint keys, so loading needs no rename table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from smolvlm import cpu
from smolvlm.config import SmolVLMConfig
from smolvlm.model import fused_decode
from smolvlm.model.connector import Connector
from smolvlm.model.kv_cache import KVCache
from smolvlm.model.layers import cpu_attends_fast_in
from smolvlm.model.packed import pack_linears
from smolvlm.model.upcast import gemv_text_linears, text_gemv_pays, upcast_slow_bf16
from smolvlm.model.text import TextModel
from smolvlm.model.vision import VisionTransformer


def default_vision_chunk_size() -> int:
    """Tiles per vision-encoder batch by default (``SmolVLM.vision_chunk_size``): 2 on CPUs with AMX, 1
    elsewhere. 256M bf16, one 17-tile 512x512 image, load + vision only: peak RSS 933 MiB unchunked,
    681 MiB with 4, 583 MiB with 1; without AMX one 1024-patch tile already makes large GEMMs (0.87
    s/tile with 1 against 0.93 with 4, 2 cores). With AMX two tiles' rows per call run oneDNN's tiles
    better (a 256M bf16 512 px tile 0.18 s against 0.23, fc2's 3072 -> 768 GEMM 1.1 -> 2.3 TFLOP/s;
    4 tiles no faster, 8 slower; float32 even), and a 512x512 image's first token takes 4.0-4.2 s
    against 4.8-5.0 for 7-22 MiB more peak RSS (twenty-fourth round, Xeon with AMX, 2 cores). On a
    GPU a larger value (or None) batches better, at the cost of memory."""
    return 2 if cpu.has("amx_tile") else 1


@dataclass
class SmolVLMOutput:
    logits: torch.Tensor | None  # (B, T or logits_to_keep, vocab); None with return_logits=False
    loss: torch.Tensor | None = None


def ties_lm_head(config: SmolVLMConfig) -> bool:
    """Whether lm_head shares the token embedding.

    transformers 5.23 ties on the *top-level* ``tie_word_embeddings`` (``PreTrainedModel.
    get_expanded_tied_weights_keys`` reads ``self.config``), whereas SPEC 1.8 (from 4.57) says the
    text config decides. The reference wins. Released checkpoints set both to false.
    """
    return bool(config.tie_word_embeddings)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``ForCausalLMLoss``: fp32 logits, labels shifted left (pad -100), CE mean over labels != -100."""
    labels = F.pad(labels, (0, 1), value=-100)[..., 1:].to(logits.device)  # (B, T)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


class SmolVLMModel(nn.Module):
    """``model``: holds ``vision_model``, ``connector`` and ``text_model``."""

    def __init__(self, config: SmolVLMConfig) -> None:
        super().__init__()
        self.vision_model = VisionTransformer(config.vision_config)
        self.connector = Connector(config)
        self.text_model = TextModel(config.text_config)


class SmolVLM(nn.Module):
    """SmolVLM / SmolVLM2 vision-language model (``XForConditionalGeneration``)."""

    def __init__(self, config: SmolVLMConfig) -> None:
        super().__init__()
        self.config = config
        self.generation_config: dict[str, Any] | None = None
        # Tiles per vision-encoder batch in get_image_features (None: all at once). Only peak
        # memory changes: activations scale with the batch (one 512 px tile is 1024 patches x 12
        # layers; a 512x512 image is 17 tiles). Outputs are identical; see get_image_features.
        self.vision_chunk_size: int | None = default_vision_chunk_size()
        self.model = SmolVLMModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.tie_weights()

    # -- construction / checkpoints -------------------------------------------------------
    def tie_weights(self) -> None:
        """Share lm_head.weight with embed_tokens.weight when the config says so (re-run after assign-loading)."""
        if ties_lm_head(self.config):
            self.lm_head.weight = self.model.text_model.embed_tokens.weight

    def lm_head_is_tied(self) -> bool:
        """Whether lm_head shares the embedding's tensor now (the config ties it and nothing untied it,
        e.g. quantizing lm_head). The one tied-head rule: checkpoints omit a tied ``lm_head.weight``."""
        return getattr(self.lm_head, "weight", None) is self.model.text_model.embed_tokens.weight

    # Thin facades over the layers above the model (weights/, generation/): the public names users
    # know from transformers. The work lives there; these import it when called.
    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path | None, dtype: torch.dtype | str | None = None,
                        device: torch.device | str = "cpu", quantize: str = "none", mmap: bool = True,
                        pack: bool | str = False, quantize_vision: bool = False) -> "SmolVLM":
        """Load a checkpoint folder, a hub repo id, or ``"default"`` (the built-in default model).

        ``dtype``: torch.dtype, "auto" (the config's) or None (float32). ``quantize``: "none",
        "int8", "int4" (weight-only, after loading; a folder saved quantized loads as saved).
        ``pack``: inference-only packed linears (``model/packed.py``; ``"auto"``: only where they are
        faster on this CPU). ``mmap``: alias the file's
        copy-on-write mapping when no conversion is needed. ``quantize_vision``: the vision encoder
        and connector in int8 too (with ``quantize``). All of it: ``weights/load.py:load_model``.
        """
        from smolvlm.weights.load import load_model

        return load_model(path_or_repo_id, dtype=dtype, device=device, quantize=quantize, mmap=mmap, pack=pack,
                          quantize_vision=quantize_vision, cls=cls)

    def pack_for_inference(self, auto: bool = False) -> "SmolVLM":
        """Pack the text decoder's and lm_head's linears in place (``smolvlm.model.packed``); returns self.

        A no-op where packing is unavailable (``auto=True``: also where it is not faster on this CPU,
        as ``from_pretrained(pack="auto")``). ``from_pretrained(pack=True)`` does the same with
        less peak memory (the packed weights are never mapped from the file). Like the loader, a bf16
        model on a CPU without a fast bf16 path computes its larger GEMMs in float32 (``model/upcast.py``)."""
        text_gemv = auto and text_gemv_pays(self.dtype, self.device)  # as the loader: see upcast.text_gemv_pays
        pack_linears(self, auto=auto, text=not text_gemv)
        upcast_slow_bf16(self)
        if text_gemv:
            gemv_text_linears(self)
        return self

    @classmethod
    def from_config(cls, config: SmolVLMConfig, dtype: torch.dtype | str | None = None,
                    device: torch.device | str = "cpu") -> "SmolVLM":
        """Randomly initialised model (normal(0, initializer_range) linears/embeddings, unit norms)."""
        from smolvlm.weights.load import init_random

        return init_random(cls, config, dtype=dtype, device=device)

    def save_pretrained(self, directory: str | Path, max_shard_size: int | str = "5GB") -> Path:
        """Write config.json + (sharded) safetensors that transformers loads back unchanged
        (plus ``quantization.json`` for a quantized model, which only smolvlm reads)."""
        from smolvlm.weights.save import save_pretrained

        return save_pretrained(self, directory, max_shard_size=max_shard_size)

    # Read from the embedding: it is never swapped out (quantization/LoRA replace Linear layers).
    @property
    def dtype(self) -> torch.dtype:
        return self.model.text_model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.text_model.embed_tokens.weight.device

    def new_kv_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """Zeroed static cache for this model.

        Default dtype: the model's (as the reference), except bf16/fp16 models on a CPU that attends
        more slowly in that dtype than in fp32 (``layers.cpu_attends_fast_in``: fp16 everywhere, bf16
        without AMX where smolvlm's decode attention kernel does not run) get an fp32 cache. It holds the same (exactly representable) values;
        decode attention then runs in fp32 with no per-step cast. Costs 2x cache memory (256M:
        46 KB per token instead of 23 KB).
        """
        tc = self.config.text_config
        if dtype is None:
            slow = self.device.type == "cpu" and not cpu_attends_fast_in(self.dtype)
            dtype = torch.float32 if slow else self.dtype
        return KVCache(tc.num_hidden_layers, batch_size, tc.num_key_value_heads, max_len, tc.head_dim,
                       dtype=dtype, device=self.device)

    def fused_decoder(self, cache: KVCache) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | str:
        """The eager decode step in one native call over every row of ``cache``, for as long as the model's
        layers stay as they are: ``step(token ids (B, 1), positions (B, 1), slots, key_valid=None) -> logits
        (B, 1, V)``, the same numbers as ``forward`` with ``input_pos`` = the slots (each row over its slots
        up to its own; ``slots``: an int for one row, else a list) and ``attention_mask`` = ``key_valid``
        (``model.fused_decode``); or why not, a string."""
        decoder = fused_decode.plan(self.model.text_model, cache)
        if isinstance(decoder, str):
            return decoder
        embed, head = self.model.text_model.embed_tokens, self.lm_head
        return lambda ids, position, slots, key_valid=None: head(decoder(embed(ids), position, slots, key_valid))

    # -- images ---------------------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values (B, N, 3, H, W), pixel_attention_mask (B, N, H, W) -> (n_real, S, D_text).

        Padding images (every value exactly 0.0 after the cast to the model dtype) are dropped;
        real ones keep sample-major order (SPEC 1.4). If none is real the first is kept, as
        ``SmolVLMModel.get_image_features`` does; we apply that to Idefics3 too, whose 5.23 code
        has no such rule and crashes in the vision embeddings on an empty batch instead.
        """
        out = [self._encode_tiles(pv, pm) for pv, pm in self._tile_chunks(pixel_values, pixel_attention_mask)]
        return out[0] if len(out) == 1 else torch.cat(out)  # (n_real, S, D_text)

    def image_feature_steps(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None
                            ) -> Iterator[torch.Tensor | None]:
        """``get_image_features`` one vision-encoder layer per ``next()`` (``VisionTransformer.layerwise``;
        the same numbers): yields None after each layer but the last, then the features (n_real, S, D_text).
        The server encodes a newcomer's image this way between its running requests' decode steps."""
        out = []
        for pv, pm in self._tile_chunks(pixel_values, pixel_attention_mask):
            for feats in self.model.vision_model.layerwise(pv, pm):
                if feats is None:
                    yield None
                else:
                    out.append(self.model.connector(feats))
        yield out[0] if len(out) == 1 else torch.cat(out)

    def _tile_chunks(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """The real tiles in the model dtype, ``vision_chunk_size`` at a time: (chunk, 3, H, W) pixels and
        (chunk, H//p, W//p) patch mask (None without a pixel mask). Checked before the first is yielded."""
        if pixel_values.dim() != 5:
            raise ValueError(f"pixel_values must be (batch, num_images, 3, H, W); got shape {tuple(pixel_values.shape)}")
        b, n, c, h, w = pixel_values.shape
        dtype = self.model.vision_model.embeddings.patch_embedding.weight.dtype
        flat = pixel_values.reshape(b * n, c, h, w)  # a view for contiguous input
        # Tile by tile: casting and comparing the whole batch at once would hold two more
        # batch-sized copies (17 tiles of 512 px: ~40 MiB) next to the encoder's activations.
        real = torch.tensor([bool(t.to(dtype).ne(0).any()) for t in flat], dtype=torch.bool)  # (B*N,)
        if not bool(real.any()):
            real[0] = True
        keep = real.nonzero().flatten()  # (n_real,) indices in sample-major order
        patch_mask = None
        if pixel_attention_mask is not None:
            if pixel_attention_mask.shape != (b, n, h, w):
                raise ValueError(f"pixel_attention_mask must have shape {(b, n, h, w)}, got {tuple(pixel_attention_mask.shape)}")
            patch_mask = self._patch_mask(pixel_attention_mask.reshape(b * n, h, w))[keep.to(pixel_attention_mask.device)]
        chunk = self.vision_chunk_size
        if chunk is None:
            chunk = len(keep)
        elif not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"vision_chunk_size must be a positive int or None, got {chunk!r}")
        # Tiles never interact in the encoder (attention is per image), so encoding them a few at
        # a time gives the same rows while only ``chunk`` tiles' activations are alive at once.
        for i in range(0, len(keep), chunk):
            sel = keep[i:i + chunk]
            yield flat[sel.to(flat.device)].to(dtype), None if patch_mask is None else patch_mask[i:i + chunk]

    def _encode_tiles(self, pv: torch.Tensor, patch_mask: torch.Tensor | None) -> torch.Tensor:
        """(n, 3, H, W) tiles -> (n, S, D_text): vision encoder + connector."""
        feats = self.model.vision_model(pv, patch_mask)  # (n, h*w/p^2, D_vis)
        return self.model.connector(feats)  # (n, S, D_text)

    def _patch_mask(self, pixel_mask: torch.Tensor) -> torch.Tensor:
        """(n, H, W) pixel mask -> (n, H//p, W//p) patch mask: a patch is valid if any pixel is (remainder dropped)."""
        p = self.config.vision_config.patch_size
        n, h, w = pixel_mask.shape
        m = pixel_mask[:, : h // p * p, : w // p * p].reshape(n, h // p, p, w // p, p)
        return (m != 0).any(dim=4).any(dim=2)

    def embed_inputs(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, T, D) with image features written into the <image> positions."""
        embeds = self.model.text_model.embed_tokens(input_ids)  # (B, T, D)
        if image_features is None:
            return embeds
        return self._merge(embeds, input_ids == self.config.image_token_id, image_features)

    def _merge(self, embeds: torch.Tensor, image_mask: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """Scatter feature rows into ``image_mask`` positions in flattened (batch, position) order (masked_scatter)."""
        d = embeds.shape[-1]
        if image_features.shape[-1] != d:
            raise ValueError(f"image features have width {image_features.shape[-1]}, text embeddings {d}")
        n_tokens = int(image_mask.sum())
        n_rows = image_features.numel() // d
        if n_tokens != n_rows:
            s = self.config.image_seq_len
            raise ValueError(
                f"the input has {n_tokens} <image> tokens (id {self.config.image_token_id}) but the images give "
                f"{n_rows} feature rows ({n_rows // s} image(s)/tile(s) x {s}); the prompt and images do not match"
            )
        feats = image_features.reshape(-1, d).to(embeds.dtype)
        return embeds.masked_scatter(image_mask[..., None], feats)

    # -- forward --------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        input_pos: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        image_features: torch.Tensor | None = None,
        return_logits: bool = True,
        segment_ids: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> SmolVLMOutput:
        """Logits (and loss if ``labels``). See ``text.py`` for the cache/mask contract.

        ``segment_ids`` (B, T) (training, no cache): packed rows, each sample attending only to
        itself with RoPE positions restarting at 0 (``text.segment_mask``). The caller masks the
        label of each sample's first token, so no sample predicts the next one's first token.

        ``logits_at`` (B,) int: the one position per row whose logits are returned, (B, 1, vocab),
        e.g. the last real token of each right-padded prompt in a batched prefill (the engine).

        ``return_logits=False`` (training, with ``labels``): the head runs only at the positions that
        have a target after the shift, so the loss is the same and ``logits`` is ``None``."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if pixel_values is not None and image_features is not None:
            raise ValueError("pass pixel_values or precomputed image_features, not both")
        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values, pixel_attention_mask)
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, image_features)
        elif image_features is not None:
            # As the reference: with embeddings only, image slots are those equal to the <image> embedding.
            tok = torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
            image_mask = (inputs_embeds == self.model.text_model.embed_tokens(tok)).all(-1)
            inputs_embeds = self._merge(inputs_embeds, image_mask, image_features)
        hidden = self.model.text_model(inputs_embeds, attention_mask, position_ids, kv_cache, input_pos,
                                       segment_ids=segment_ids)
        if not return_logits:
            if labels is None:
                raise ValueError("return_logits=False needs labels (it computes the loss only)")
            shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].to(hidden.device)
            keep = shifted != -100
            logits = self.lm_head(hidden[keep])  # (N targets, vocab)
            return SmolVLMOutput(logits=None, loss=F.cross_entropy(logits.float(), shifted[keep]))
        if logits_at is not None:
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            hidden = hidden[rows, logits_at.to(hidden.device)][:, None]
        elif logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)  # (B, T', vocab)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return SmolVLMOutput(logits=logits, loss=loss)

    def generate(self, **kwargs: Any) -> Any:
        """Token ids (prompt + new), like transformers; facade over ``generation.generate.generate_ids``."""
        from smolvlm.generation.generate import generate_ids

        return generate_ids(self, **kwargs)
