"""Prefill + decode with a preallocated KV cache; one generator core shared by all callers.

Mirrors transformers' ``GenerationMixin._sample`` (greedy or multinomial) for SmolVLM
(SPEC 1.10): pixel inputs only on the prefill step, left-padded batches with RoPE positions
``cumsum(mask) - 1`` (masked slots set to 1, SPEC 1.6), finished rows padded with the pad id,
stop on any of the generation config's eos ids or at the length limit.

``generate_tokens`` yields one ``(B,)`` tensor of new ids per step; ``generate_ids`` collects
them into ``(B, T + new)`` like ``model.generate``; ``smolvlm.stream`` / ``smolvlm.answer``
(``stream.py``) turn them into text. Stop strings are ``text_stream.RowStops``. A model given a
compiled step by ``compiled.enable`` (``--compile``) decodes through it, on a cache rounded up to
its 256-slot bucket; prefill stays eager.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from smolvlm.generation import sampling
from smolvlm.generation.compiled import cache_slots
from smolvlm.generation.config import GenerationSettings, resolve_settings
from smolvlm.generation.text_stream import RowStops
from smolvlm.memory import release_freed_memory, release_lookup_pages


def check_context_length(model: Any, prompt_len: int, max_new_tokens: int) -> None:
    """Refuse before any work when prompt + new tokens exceed the model's position range."""
    limit = int(model.config.text_config.max_position_embeddings)
    if prompt_len + max_new_tokens > limit:
        raise ValueError(
            f"prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} = {prompt_len + max_new_tokens} "
            f"exceeds the model's context length max_position_embeddings={limit}; "
            f"shorten the prompt (fewer/smaller images) or lower max_new_tokens"
        )


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _check_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError("input_ids must be an integer tensor of shape (batch, seq_len)")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape (batch, seq_len) with seq_len > 0, got {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.dim() == 1:
        attention_mask = attention_mask[None]
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("batched generation needs left padding: the last prompt position of every row must be real "
                         "(use the processor with padding_side='left')")
    return input_ids.long(), attention_mask.long()


def _image_features(model: Any, feature_cache: Any, pixel_values: Any, pixel_attention_mask: Any) -> Any:
    """The images' features, through ``feature_cache`` when given; encoded before the prompt's forward
    (``_decode_loop``), so that the vision tower's temporaries go back to the OS before the prefill's
    are made (500M bf16, a 512x512 image: 35 MiB off the peak)."""
    if pixel_values is None:
        return None
    if feature_cache is not None:
        return feature_cache.get_or_encode(model, pixel_values, pixel_attention_mask)
    with torch.inference_mode():
        return model.get_image_features(pixel_values, pixel_attention_mask)


def generate_tokens(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    pixel_attention_mask: torch.Tensor | None = None,
    *,
    tokenizer: Any = None,
    feature_cache: Any = None,
    settings: GenerationSettings | None = None,
    **gen_kwargs: Any,
) -> Iterator[torch.Tensor]:
    """Yield the new token ids of every row, one ``(B,)`` int64 tensor per step.

    Validation (shapes, settings, context length) happens on the call, before the first
    ``next()``, so errors surface where the caller asked. ``settings`` (already resolved) or
    ``gen_kwargs`` (as ``generate_ids``) choose the decoding. Rows that finished (eos or stop
    string) get the pad id until every row is done or ``max_new_tokens`` is reached.
    """
    input_ids, attention_mask = _check_inputs(input_ids, attention_mask)
    if settings is None:
        settings = resolve_settings(model, input_ids.shape[1], **gen_kwargs)
    elif gen_kwargs:
        raise ValueError(f"pass either settings or generation keyword arguments, not both: {sorted(gen_kwargs)}")
    check_context_length(model, input_ids.shape[1], settings.max_new_tokens)
    if settings.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer (pass tokenizer=processor.tokenizer)")
    return _decode_loop(model, input_ids, attention_mask, pixel_values, pixel_attention_mask,
                        settings, tokenizer, feature_cache)


@torch.inference_mode()
def _prefill(model: Any, cache: Any, input_ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor,
             slots: torch.Tensor, image_features: Any) -> torch.Tensor:
    """Run the whole prompt (images already encoded: ``_image_features``) once; return float32
    last-position logits ``(B, V)``."""
    # The prompt's embeddings first: the table pages its lookups mapped are let go before the forward's
    # activations and cache fill (a 900-token 500M prompt of random ids: 36 MiB; smolvlm/memory.py).
    embed = getattr(model, "embed_inputs", None)
    if embed is None:  # a model without the split (duck typing): it looks its rows up itself
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, kv_cache=cache,
                    input_pos=slots, image_features=image_features, logits_to_keep=1)
    else:
        embeds = embed(input_ids, image_features)
        release_lookup_pages()
        out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, kv_cache=cache,
                    input_pos=slots, logits_to_keep=1)
        del embeds
    logits = out.logits[:, -1].float()
    del out
    release_freed_memory()  # the prompt's temporaries, before the decode and the next request (smolvlm/memory.py)
    return logits


def _decode_loop(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: Any,
                 pixel_attention_mask: Any, s: GenerationSettings, tokenizer: Any, feature_cache: Any,
                 ) -> Iterator[torch.Tensor]:
    device = _model_device(model)
    B, T = input_ids.shape
    total = T + s.max_new_tokens
    compiled = getattr(model, "compiled_decode", None)  # generation/compiled.py, opt-in
    if compiled is not None:
        compiled.check()
    slots_held = cache_slots(total) if compiled is not None else total
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    if pixel_values is not None:
        pixel_values = pixel_values.to(device)
        if pixel_attention_mask is not None:
            pixel_attention_mask = pixel_attention_mask.to(device)

    with torch.inference_mode():
        # The images first, then the cache: the vision tower's temporaries and the cache are never alive
        # together, and the pixels are let go before the prompt's forward (the caller may drop its own).
        image_features = _image_features(model, feature_cache, pixel_values, pixel_attention_mask)
        if pixel_values is not None:
            pixel_values = pixel_attention_mask = None
            # The vision tower's temporaries, and the pixels where the caller let them go too (500M bf16,
            # a 512x512 image: 27 MiB of bf16 pixels in glibc's heap), back to the OS before the cache.
            release_freed_memory()
        cache = model.new_kv_cache(B, slots_held)
        mask = torch.ones(B, slots_held, dtype=torch.long, device=device)  # (B, L) over cache slots
        mask[:, :T] = attention_mask
        slots = torch.arange(slots_held, device=device)  # absolute cache slots
        # RoPE positions like transformers' generate for left padding (SPEC 1.6)
        position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)  # (B, T)
        next_pos = position_ids[:, -1:] + 1  # (B, 1)
        eos = torch.tensor(s.eos_token_ids, dtype=torch.long, device=device)
        pad = s.pad_token_id
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        seen = None
        if s.repetition_penalty != 1.0:
            # (B, V+1): padding slots write into the extra column, so pads are not "present" tokens
            seen = torch.zeros(B, model.config.text_config.vocab_size + 1, dtype=torch.bool, device=device)
            seen.scatter_(1, input_ids.masked_fill(attention_mask == 0, seen.shape[1] - 1), True)
        generator = sampling.make_generator(s.seed, device)
        stops = RowStops(tokenizer, s.stop_strings, B) if s.stop_strings else None

    logits = _prefill(model, cache, input_ids, mask[:, :T], position_ids, slots[:T], image_features)
    # Every layer of a step in one native call where the kernels run (model/fused_decode.py; the same
    # numbers as the forward below, without its Python); a left-padded batch with its key mask.
    fused, padded = None, not bool(attention_mask.all())
    if compiled is None and hasattr(model, "fused_decoder"):
        with torch.inference_mode():
            fused = model.fused_decoder(cache)
        fused = None if isinstance(fused, str) else fused
    try:
        for step in range(s.max_new_tokens):
            with torch.inference_mode():
                scores = sampling.process_logits(logits, s, None if seen is None else seen[:, :-1])
                tok = sampling.select_token(scores, s.do_sample, generator)  # (B,)
                if pad is not None:
                    tok = torch.where(finished, torch.full_like(tok, pad), tok)
                if seen is not None:
                    seen.scatter_(1, tok[:, None], True)
                if eos.numel():
                    finished |= torch.isin(tok, eos)
                if stops is not None:
                    for i in stops.update(tok.tolist(), finished.tolist()):
                        finished[i] = True
            yield tok
            if step + 1 == s.max_new_tokens or bool(finished.all()):
                return
            with torch.inference_mode():
                pos = T + step  # cache slot of the token just produced
                if compiled is not None:  # the whole cache, every step: one shape (slots past pos are causally masked)
                    logits = compiled(tok[:, None], mask, next_pos, slots[pos : pos + 1], cache)
                    next_pos = next_pos + 1
                    continue
                if fused is not None:
                    logits = fused(tok[:, None], next_pos, [pos] * B,
                                   mask[:, : pos + 1] if padded else None)[:, -1].float()  # (B, V)
                    next_pos = next_pos + 1
                    continue
                out = model(input_ids=tok[:, None], attention_mask=mask[:, : pos + 1], position_ids=next_pos,
                            kv_cache=cache, input_pos=slots[pos : pos + 1], logits_to_keep=1)
                logits = out.logits[:, -1].float()  # (B, V)
                next_pos = next_pos + 1
    finally:  # the cache (a tensor per layer, small enough for glibc's heap) and the decode's temporaries
        cache = logits = out = fused = None  # go back to the OS before the next request (smolvlm/memory.py)
        release_freed_memory()


def generate_ids(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    pixel_attention_mask: torch.Tensor | None = None,
    *,
    tokenizer: Any = None,
    feature_cache: Any = None,
    **gen_kwargs: Any,
) -> torch.Tensor:
    """Prompt + generated ids ``(B, T + n_steps)``, as transformers' ``generate`` returns them.

    ``gen_kwargs`` are the decoding options of ``generation.config.resolve_settings`` (defined
    there once): max_new_tokens, do_sample, temperature, top_k, top_p, min_p,
    repetition_penalty, seed, eos_token_id, pad_token_id, stop_strings; an unknown name is a
    TypeError naming it. Defaults follow the reference: stop ids from ``generation_config.json``
    (else the text config's eos), 20 new tokens when no length is given, top_k=50 when sampling
    with no top_k (SPEC 1.10). ``n_steps`` is ``max_new_tokens`` unless every row stopped earlier.
    """
    gen = generate_tokens(model, input_ids, attention_mask, pixel_values, pixel_attention_mask,
                          tokenizer=tokenizer, feature_cache=feature_cache, **gen_kwargs)
    del pixel_values, pixel_attention_mask  # the generator lets them go once the images are encoded
    new = list(gen)
    prompt = input_ids if input_ids.dim() == 2 else input_ids[None]
    return torch.cat([prompt.to(new[0].device), torch.stack(new, dim=1)], dim=1)  # (B, T + n)

