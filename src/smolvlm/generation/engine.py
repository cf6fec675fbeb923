"""Continuous batching: one model, one loop, one KV cache of ``max_batch`` rows x ``max_context`` slots.

Each ``step()``: (1) drop cancelled requests, freeing their rows; (2) admit waiting requests into
free rows and prefill them straight into their rows (``KVCache.rows`` is a view, so no copy), with
images through the feature cache (a repeated image skips the vision encoder). Newcomers in adjacent
rows with similar prompt lengths share ONE right-padded forward (``_prefill_groups``): a burst of 8
short prompts reads the weights once instead of 8 times. A padded slot past a prompt's end is
never attended (the per-row causal mask below) and is overwritten by that row's next token; if a
batched forward fails, each of its requests is prefilled alone, so a bad request fails by itself; (3) run
ONE batched decode step for every running row, each at its own cache slot (``input_pos`` (B, 1),
see ``model/text.py``; where the model runs it, the fused step of ``model/fused_decode.py``: every
layer in one native call, the same numbers); (4) sample each row with its own settings and RNG and hand the token to
its handle. A row that finishes (eos, stop string, length, cancel) is free for the next request
at once. The same loop serves the HTTP server and ``Engine.generate`` (many requests from Python).

Memory is bounded: the cache is allocated once; requests that cannot fit a row are refused at
``submit`` (``RequestTooLong``); when every row is busy requests wait in a queue of at most
``max_queue``, beyond which ``submit`` raises ``EngineBusy``. Per request only the prefill
activations (and a (V,) bool row for a repetition penalty) are allocated.

Rows are taken lowest-first and the decode batch spans rows ``0..hi`` (the highest busy row), so a
single stream decodes with batch 1; a free row inside that range decodes a dummy token at slot 0
(its row is overwritten by the next prefill), a row whose prompt goes in a chunk per step (below) at
the slot its next chunk overwrites. A row attends only to slots it has written (per-row causal
mask), so stale keys of earlier requests are never seen.

While rows decode, a newcomer's prompt goes in slices, its row held meanwhile (``_advance_pending``):
about ``slice_s`` a step (by default 0.1 s, or 4 decode steps where longer) of its image tiles'
encoding, a vision-encoder layer at a time, then of its prompt, a chunk at a time, so the running
streams get a token every step instead of waiting for a whole image and prompt (3 streams and a new
512x512 image, bf16 on 2 Zen 5 cores: their longest step at 256M 4.9-5.2 s whole, 0.56-0.62 s a tile
at a time, 0.13-0.17 s a layer at a time; at 2.2B 3.2-3.4 s a tile at a time, 0.47-0.48 s a layer at a
time; bench/NEWCOMER_STALL.md). With nothing decoding, a prompt goes in at once once its images are
encoded; they go in slices even then, so a request arriving meanwhile starts at once.

Threads. PyTorch's CPU kernels run on libgomp (OpenMP). A thread's OpenMP worker pool outlives its
last parallel region, and while more OpenMP threads exist than cores libgomp stops spin-waiting, so
every parallel op of the engine thread then pays a futex wake-up. If the main thread ran any parallel
op (loading, packing, allocating the cache) before ``start()``, the engine thread decodes ~1.7x
slower (256M fp32, 2 cores, Xeon: 31 -> 54 ms per token; a (1536, 576) GEMV 35 -> 130 us). A
server therefore builds its model and engine with ``in_passing_thread``: that thread's pool ends
with it, and the engine thread's pool is the only one.

Greedy and sampled rows share a batch. Each seeded request has its own ``torch.Generator``
seeded like ``sampling.make_generator``, so it draws the same tokens alone, in any batch, or
through ``generate_ids`` (up to fp32 summation-order differences in the logits, ~1e-7).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from smolvlm.generation import sampling
from smolvlm.generation.config import resolve_settings
from smolvlm.generation.feature_cache import FeatureCache, TileEncoding
from smolvlm.generation.requests import (Completion, EngineBusy, EngineClosed, FinishEvent, FinishReason,
                                         PreparedRequest, Request, RequestHandle, TokenEvent, prepare_request)
from smolvlm.memory import release_freed_memory

DEFAULT_MAX_CONTEXT = 2048
# While rows decode, newcomers' images and prompts go in slices (``Engine._advance_pending``): by default a
# step spends about SLICE_S on them, or SLICE_PER_DECODE times the last decode step if longer (so they get
# at least 4/5 of the time: the decode steps between slices delay a newcomer's first token, by ~1.6x at 2.2B
# with 0.1 s slices), at least one vision-encoder layer of one tile or one prompt chunk of MIN_PREFILL_CHUNK
# tokens, and a chunk is at most PREFILL_CHUNK tokens. 2 Zen 5 cores, bf16: 256M, a decode step of 3 rows
# ~9 ms, a tile's layer ~22 ms, 256 prompt tokens ~0.1 s; 2.2B, a decode step ~62 ms, a tile's layer ~36 ms,
# 64 tokens 0.34 s (0.9 of 128 tokens' rate, 32 tokens only 0.65 of it), 256 tokens 1.1-1.3 s.
SLICE_S = 0.1
SLICE_PER_DECODE = 4.0
PREFILL_CHUNK = 256
MIN_PREFILL_CHUNK = 64
MAX_PREFILL_TOKENS = 4096  # padded tokens in one batched prefill forward (bounds its activations)


def in_passing_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a new thread that ends before this returns (result or exception
    passed through), so no OpenMP pool of its parallel work outlives it (see "Threads" above)."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as e:  # re-raised in the caller's thread
            result["error"] = e

    thread = threading.Thread(target=target, name="smolvlm-load", daemon=True)  # Ctrl-C in join() exits at once
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


@dataclass
class _Row:
    """A running request: its KV row holds slots 0..n_cached-1; ``last`` is the token to feed next."""

    req: PreparedRequest
    generator: torch.Generator | None
    seen: torch.Tensor | None  # (V,) bool, only with a repetition penalty
    n_cached: int
    last: int = -1
    n_new: int = 0
    t_first: float | None = None


@dataclass
class _Pending:
    """A request holding row ``r`` while its prompt goes in a slice per step: its image tiles while any is
    left to encode (then None), then its prompt chunks (``prep.prefilled``)."""

    prep: PreparedRequest
    tiles: TileEncoding | None


class Engine:
    """Continuous-batching generation over one model (see the module docstring).

    Drive it with ``step()`` from one thread, or ``start()`` a loop thread (``stop()`` or a
    ``with`` block ends it). ``submit`` is thread-safe.
    """

    def __init__(self, model: Any, max_batch: int = 8, max_context: int | None = None, max_queue: int = 64,
                 feature_cache: FeatureCache | None = None, cache_dtype: torch.dtype | None = None,
                 slice_s: float | None = None, prefill_chunk: int = PREFILL_CHUNK) -> None:
        limit = int(model.config.text_config.max_position_embeddings)
        max_context = min(DEFAULT_MAX_CONTEXT, limit) if max_context is None else int(max_context)
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1 or not (slice_s is None or slice_s >= 0):
            raise ValueError(f"need max_batch >= 1, max_queue >= 0, prefill_chunk >= 1 and slice_s >= 0, got "
                             f"{max_batch}, {max_queue}, {prefill_chunk} and {slice_s}")
        if not 1 <= max_context <= limit:
            raise ValueError(f"max_context must be in [1, {limit}] (max_position_embeddings), got {max_context}")
        self.model = model
        self.max_batch, self.max_context, self.max_queue = max_batch, max_context, max_queue
        self.feature_cache = FeatureCache() if feature_cache is None else feature_cache
        self.device = model.device
        with torch.inference_mode():
            self.cache = model.new_kv_cache(max_batch, max_context, dtype=cache_dtype)  # the only big allocation
        self.rows: list[_Row | None] = [None] * max_batch
        # rows held by requests whose prompt goes in a slice per step (``_advance_pending``)
        self._pending: dict[int, _Pending] = {}
        # rows of requests taken off the queue, or out of ``_pending``, this step and not yet holding them
        # (``rows[r]`` still None): not free, or a room check in another thread would count them
        self._reserved: set[int] = set()
        self.slice_s, self.prefill_chunk = slice_s, prefill_chunk
        self._layer_s = 0.0  # seconds the last vision-encoder layer of a tile took (``TileEncoding.step``)
        self._decode_s = 0.0  # seconds the last decode step took
        self._token_s: float | None = None  # seconds a prompt token took in the last prompt forward
        self._fused: dict[tuple[int, int], Any] = {}  # rows (lo, hi) -> the fused decode step over them, or None
        self._waiting: deque[PreparedRequest] = deque()
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._step_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._ids = itertools.count()
        image_id = int(model.config.image_token_id)
        self._pad_id = 0 if image_id != 0 else 1  # right padding of batched prompts: any id but <image>
        self.counters = dict(submitted=0, rejected=0, prefills=0, prefill_forwards=0, prefill_tokens=0,
                             prefill_chunks=0, decode_steps=0, decode_rows=0, generated_tokens=0, stop=0, length=0,
                             cancelled=0, error=0)

    # -- submitting -----------------------------------------------------------------------
    def submit(self, request: Request) -> RequestHandle:
        """Queue one request; returns its handle at once.

        Raises ``RequestTooLong`` (prompt + max_new_tokens > max_context), ``EngineBusy`` (queue
        full), ``EngineClosed``, or ``ValueError`` for malformed inputs.
        """
        prep = prepare_request(request, self.model, self.max_context, self.device,
                               request.request_id or f"req-{next(self._ids)}", self._wake)
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine is stopped")
            if self._queued(extra=1) > self.max_queue:
                self.counters["rejected"] += 1
                raise EngineBusy(f"all {self.max_batch} rows are busy and {self._queued()} requests are waiting "
                                 f"(max_queue={self.max_queue}); retry later")
            self._waiting.append(prep)
            self.counters["submitted"] += 1
            self._wakeup.notify_all()
        return prep.handle

    def submit_inputs(self, inputs: Any, *, text: Any = None, request_id: str | None = None,
                      **gen_kwargs: Any) -> RequestHandle:
        """``submit`` for a processor output and ``generate_ids``-style keywords (max_new_tokens, do_sample, ...)."""
        req = Request.from_inputs(inputs, text=text, request_id=request_id)
        n = int(req.input_ids.shape[-1]) if req.attention_mask is None else int(req.attention_mask.sum())
        req.settings = resolve_settings(self.model, n, **gen_kwargs)
        return self.submit(req)

    def _queued(self, extra: int = 0) -> int:
        """Waiting requests (plus ``extra`` new ones) that no free row will take at the next step
        (call with the lock held). With ``max_queue=0`` a request is taken only if a row is free."""
        return max(0, len(self._waiting) + extra - len(self._free_rows()))

    def _free_rows(self) -> list[int]:
        return [r for r, row in enumerate(self.rows)
                if row is None and r not in self._pending and r not in self._reserved]

    def _wake(self) -> None:
        with self._lock:
            self._wakeup.notify_all()

    # -- the loop ---------------------------------------------------------------------------
    def step(self) -> bool:
        """One iteration: retire cancelled, admit + prefill, one batched decode. False when idle."""
        if not self._step_lock.acquire(blocking=False):
            raise RuntimeError("Engine.step() is already running in another thread (one loop per engine)")
        try:
            admitted = self._admit()
            for group in self._prefill_groups(self._advance_pending(admitted)):
                self._prefill(group)
            self._retire_cancelled()
            if any(row is not None for row in self.rows):
                t0 = time.perf_counter()
                self._decode()
                self._decode_s = time.perf_counter() - t0
            return (bool(admitted) or any(row is not None for row in self.rows) or bool(self._waiting)
                    or bool(self._pending))
        finally:
            with self._lock:  # each row taken this step now holds its request, is pending, or was finished
                self._reserved.clear()
            self._step_lock.release()

    def _admit(self) -> list[tuple[int, PreparedRequest]]:
        admitted = []
        with self._lock:
            for prep in [p for p in self._waiting if p.handle.cancelled]:
                self._waiting.remove(prep)
                self._finish_unstarted(prep, "cancelled")
            for r in self._free_rows():
                if not self._waiting:
                    break
                admitted.append((r, self._waiting.popleft()))
                self._reserved.add(r)
        return admitted

    def _advance_pending(self, admitted: list[tuple[int, PreparedRequest]]) -> list[tuple[int, PreparedRequest]]:
        """The requests ready for their (last) prefill forward this step, rows ascending.

        A request's prompt goes in slices, its row held meanwhile (``_pending``), so the running streams
        get a token every step instead of waiting for a whole image and prompt (a 512x512 image at 256M
        on 2 cores: 17 tiles, ~4.4 s, then 1141 tokens). A step spends about ``_slice()`` on them, oldest
        first: its image tiles not in the feature cache, a vision-encoder layer of one tile at a time
        (``TileEncoding.step``), then, while rows decode, its prompt a chunk at a time into its row
        (``_prefill_chunk``), the last chunk through ``_prefill``. With nothing decoding, a request whose
        images are encoded is ready: its prompt in one forward, batched with the others ready. Its images
        go in slices even then, so a request arriving meanwhile (a short question while an image is
        encoded) is prefilled and decoding at the next step instead of after the whole image. Whatever
        the time, a step does at least one such piece: a layer, or a chunk of ``MIN_PREFILL_CHUNK`` tokens (a
        smaller chunk runs the GEMMs below their rate); a chunk holds as many tokens as the time left
        allows at the last measured rate, at most ``prefill_chunk``."""
        for r, prep in admitted:
            try:
                tiles = (None if prep.pixel_values is None else
                         TileEncoding(self.feature_cache, self.model, prep.pixel_values, prep.pixel_attention_mask))
                self._pending[r] = _Pending(prep, tiles)
            except Exception as e:
                self._finish_unstarted(prep, "error", f"{type(e).__name__}: {e}")
        decoding = any(row is not None for row in self.rows)
        t_end, worked = time.perf_counter() + self._slice(), False
        ready = []
        for r in sorted(self._pending, key=lambda r: self._pending[r].prep.t_submit):
            pending = self._pending[r]
            prep, tiles = pending.prep, pending.tiles
            try:
                if prep.handle.cancelled:
                    del self._pending[r]
                    self._finish_unstarted(prep, "cancelled")
                    continue
                if tiles is not None:  # in slices even with nothing decoding: a request arriving meanwhile goes in
                    while tiles.remaining and (not worked or time.perf_counter() + self._layer_s <= t_end):
                        t0 = time.perf_counter()
                        tiles.step()
                        self._layer_s, worked = time.perf_counter() - t0, True
                    if tiles.remaining:
                        continue
                    prep.image_features, pending.tiles = tiles.features(), None
                    prep.pixel_values = prep.pixel_attention_mask = None  # the features are what it needs now
                    self._check_features(prep)
                if decoding:
                    left, n = prep.input_ids.shape[1] - prep.prefilled, self._chunk_tokens(t_end, worked)
                    if left > n:
                        if n >= min(MIN_PREFILL_CHUNK, self.prefill_chunk):
                            self._prefill_chunk(r, prep, n)
                            worked = True
                        continue
                    t_end -= left * self._token_time()  # its last chunk runs after this loop
                    worked = True
                self._reserved.add(r)  # before it leaves pending: its prefill below makes it the row's
                del self._pending[r]
                ready.append((r, prep))
            except Exception as e:  # a bad image fails its own request only
                del self._pending[r]
                self._finish_unstarted(prep, "error", f"{type(e).__name__}: {e}")
        return sorted(ready, key=lambda item: item[0])

    def _slice(self) -> float:
        """Seconds a step spends on newcomers' images and prompt chunks: ``slice_s``, or by default (None)
        ``SLICE_S`` or ``SLICE_PER_DECODE`` times the last decode step, whichever is longer."""
        return max(SLICE_S, SLICE_PER_DECODE * self._decode_s) if self.slice_s is None else self.slice_s

    def _chunk_tokens(self, t_end: float, worked: bool) -> int:
        """How many prompt tokens a chunk may take now: what the time left to ``t_end`` holds at
        ``_token_time()``, at least ``MIN_PREFILL_CHUNK`` if this step has done nothing else yet, at most
        ``prefill_chunk``."""
        left = t_end - time.perf_counter()
        fits = float("inf") if left == float("inf") else 0.0 if left <= 0 else left / self._token_time()
        n = min(self.prefill_chunk, fits)
        return int(n if worked else max(n, min(MIN_PREFILL_CHUNK, self.prefill_chunk)))

    def _token_time(self) -> float:
        """Seconds a prompt token takes: as in the last prompt forward (a chunk or a prefill); none measured
        yet (nothing has been prefilled, so nothing decodes), ``prefill_chunk`` tokens a slice."""
        return self._slice() / self.prefill_chunk if self._token_s is None else self._token_s

    @torch.inference_mode()
    def _prefill_chunk(self, r: int, prep: PreparedRequest, n: int) -> None:
        """The next ``n`` prompt tokens of row r's request into its row; no token is sampled."""
        self._prompt_span(r, prep, prep.prefilled + n)
        self.counters["prefill_forwards"] += 1
        self.counters["prefill_chunks"] += 1

    def _prompt_span(self, r: int, prep: PreparedRequest, stop: int) -> torch.Tensor:
        """Prompt positions ``prefilled..stop-1`` of row r's request into its row (slots alike), with the
        image-feature rows of their <image> tokens; the output's logits at position ``stop - 1`` (1, V)."""
        p = prep.prefilled
        out = self._timed_forward(stop - p, input_ids=prep.input_ids[:, p:stop], kv_cache=self.cache.rows(r, r + 1),
                                  input_pos=torch.arange(p, stop, device=self.device),
                                  image_features=self._feature_rows(prep, p, stop), logits_to_keep=1)
        prep.prefilled = stop
        return out.logits[:, -1]

    def _timed_forward(self, tokens: int, **kwargs: Any) -> Any:
        """A prompt forward of ``tokens`` (padded) tokens; its time a token is the rate the next chunks are
        sized by (``_token_time``). A short prompt's fixed cost (the weights' read) overstates it: fewer
        tokens a slice until a chunk measures it."""
        t0 = time.perf_counter()
        out = self.model(**kwargs)
        self._token_s = (time.perf_counter() - t0) / tokens
        return out

    def _check_features(self, prep: PreparedRequest) -> None:
        """The image features against the prompt's <image> tokens, once, before any forward: a prompt
        written in chunks hands each chunk only its own rows, and a batched prefill would fail its
        neighbours too (``SmolVLM._merge`` checks one whole forward)."""
        f = prep.image_features
        n_tokens = int((prep.input_ids == self.model.config.image_token_id).sum())
        if f is not None and f.shape[0] * f.shape[1] != n_tokens:
            raise ValueError(f"the prompt has {n_tokens} <image> tokens but the images give {f.shape[0] * f.shape[1]} "
                             f"feature rows; the prompt and images do not match")

    def _feature_rows(self, prep: PreparedRequest, start: int, stop: int) -> torch.Tensor | None:
        """The image feature rows of the <image> tokens among prompt positions start..stop-1."""
        if prep.image_features is None:
            return None
        image = prep.input_ids[0] == self.model.config.image_token_id
        k = int(image[:start].sum())
        return prep.image_features.reshape(-1, prep.image_features.shape[-1])[k:k + int(image[start:stop].sum())]

    @staticmethod
    def _prefill_groups(admitted: list[tuple[int, PreparedRequest]],
                        max_tokens: int = MAX_PREFILL_TOKENS) -> list[list[tuple[int, PreparedRequest]]]:
        """Admitted (row, request) pairs, rows ascending, cut into batches of one forward each: adjacent
        rows (one cache view), padding at most a quarter of the batch's slots, at most ``max_tokens``
        padded tokens."""
        groups: list[list[tuple[int, PreparedRequest]]] = []
        for r, prep in admitted:
            g = groups[-1] if groups else None
            if prep.prefilled or (g is not None and g[-1][1].prefilled):  # a prompt's last chunk: alone
                g = None
            if g is not None and g[-1][0] + 1 == r:
                lens = [p.input_ids.shape[1] for _, p in g] + [prep.input_ids.shape[1]]
                padded = len(lens) * max(lens)
                if padded <= max_tokens and 4 * (padded - sum(lens)) <= padded:
                    g.append((r, prep))
                    continue
            groups.append([(r, prep)])
        return groups

    @torch.inference_mode()
    def _prompt_logits(self, group: list[tuple[int, PreparedRequest]]) -> torch.Tensor:
        """One forward over the group's prompts (right-padded, adjacent rows): (n, V) fp32 logits at
        each prompt's last token."""
        r0, n = group[0][0], len(group)
        if n == 1 and group[0][1].prefilled:  # the last chunk of a prompt written a chunk per step
            prep = group[0][1]
            return self._prompt_span(r0, prep, prep.input_ids.shape[1]).float()  # (1, V)
        lens = [prep.input_ids.shape[1] for _, prep in group]
        t = max(lens)
        ids = torch.full((n, t), self._pad_id, dtype=torch.long, device=self.device)
        feats = []  # encoded and checked by _advance_pending
        for i, (_, prep) in enumerate(group):
            ids[i, :lens[i]] = prep.input_ids[0]
            if prep.image_features is not None:
                feats.append(prep.image_features)
        kw: dict[str, Any] = dict(logits_to_keep=1) if n == 1 else dict(logits_at=torch.tensor(lens) - 1)
        out = self._timed_forward(n * t, input_ids=ids, kv_cache=self.cache.rows(r0, r0 + n),
                                  input_pos=torch.arange(t, device=self.device),
                                  image_features=torch.cat(feats) if feats else None, **kw)
        return out.logits[:, -1].float()  # (n, V)

    @torch.inference_mode()
    def _prefill(self, group: list[tuple[int, PreparedRequest]]) -> None:
        """The group's prompts (and images) into their rows; then sample each one's first token."""
        try:
            logits = self._prompt_logits(group)
        except Exception as e:  # a bad request (e.g. images vs <image> tokens) must not stop the engine
            if len(group) > 1:  # nor fail the requests batched with it
                for item in group:
                    self._prefill([item])
            else:
                self._finish_unstarted(group[0][1], "error", f"{type(e).__name__}: {e}")
            return
        self.counters["prefill_forwards"] += 1
        for i, (r, prep) in enumerate(group):
            prep.image_features = None  # in the cache now; the row keeps prep until it finishes
        release_freed_memory()  # the prompts' temporaries (smolvlm/memory.py)
        for i, (r, prep) in enumerate(group):
            t = prep.input_ids.shape[1]
            self.counters["prefills"] += 1
            self.counters["prefill_tokens"] += t
            s = prep.settings
            seen = None
            if s.repetition_penalty != 1.0:
                seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=self.device)
                seen[prep.input_ids[0]] = True
            row = _Row(prep, sampling.make_generator(s.seed, self.device), seen, n_cached=t)
            self.rows[r] = row
            self._sample_and_advance(r, row, logits[i:i + 1], int(logits[i].argmax(-1)))

    def _fused_step(self, lo: int, hi: int) -> Any:
        """The fused decode step over rows lo..hi-1 of the cache (``model.fused_decoder``: every layer in one
        native call, the numbers of the forward), built once per span; None where the model cannot run one
        (for that many rows: some layers change kernels with the row count)."""
        if (lo, hi) not in self._fused:
            make = getattr(self.model, "fused_decoder", None)
            step = make(self.cache.rows(lo, hi)) if make is not None else None
            self._fused[lo, hi] = None if isinstance(step, str) else step
        return self._fused[lo, hi]

    @torch.inference_mode()
    def _decode(self) -> None:
        """One token for every running row: one fused step (``_fused_step``) over rows 0..hi, or over the
        one busy row alone, where the model runs it, else one forward over rows 0..hi. A row's slots past
        its new token, padding or an old request's, are never attended."""
        busy = [i for i, row in enumerate(self.rows) if row is not None]
        hi = busy[-1] + 1
        # rows in range that are not decoding: a dummy token at slot 0, or for a row whose prompt is going in
        # a chunk a step, at the slot its next chunk overwrites (its slots before it hold that prompt)
        toks = torch.zeros(hi, 1, dtype=torch.long)
        pos = torch.zeros(hi, 1, dtype=torch.long)
        for r, pending in self._pending.items():
            if r < hi:
                pos[r, 0] = pending.prep.prefilled
        for i in busy:
            toks[i, 0], pos[i, 0] = self.rows[i].last, self.rows[i].n_cached
        try:
            lo = busy[0] if len(busy) == 1 else 0
            fused = self._fused_step(lo, hi)
            if fused is not None:
                logits = fused(toks[lo:hi].to(self.device), pos[lo:hi].to(self.device),
                               pos[lo:hi, 0].tolist())[:, -1].float()  # (hi - lo, V)
                at = {i: i - lo for i in busy}
            else:
                out = self.model(input_ids=toks.to(self.device), kv_cache=self.cache.rows(0, hi),
                                 input_pos=pos.to(self.device), logits_to_keep=1)
                logits = out.logits[:, -1].float()  # (hi, V)
                at = {i: i for i in busy}
            greedy = logits.argmax(-1).tolist()  # one batched argmax serves every plain greedy row
        except Exception as e:
            for i in busy:
                self._finish(i, "error", f"{type(e).__name__}: {e}")
            return
        self.counters["decode_steps"] += 1
        self.counters["decode_rows"] += len(busy)
        for i in busy:
            row = self.rows[i]
            row.n_cached += 1
            self._sample_and_advance(i, row, logits[at[i]:at[i] + 1], greedy[at[i]])

    def _sample_and_advance(self, r: int, row: _Row, logits: torch.Tensor, greedy: int) -> None:
        """Row r's token from its logits (1, V): ``greedy`` (the argmax) unless it samples or penalizes."""
        s = row.req.settings
        tok = greedy
        if s.do_sample or row.seen is not None:
            try:
                scores = sampling.process_logits(logits, s, None if row.seen is None else row.seen[None])
                tok = int(sampling.select_token(scores, s.do_sample, row.generator)[0])
            except Exception as e:  # e.g. non-finite logits under sampling: this row fails, not the batch
                self._finish(r, "error", f"sampling failed: {type(e).__name__}: {e}")
                return
        self._advance(r, row, tok)

    def _advance(self, r: int, row: _Row, tok: int) -> None:
        """Hand ``tok`` to the request; finish it on eos, a stop string or the length limit."""
        now = time.perf_counter()
        if row.t_first is None:
            row.t_first = now
        row.n_new += 1
        row.last = tok
        self.counters["generated_tokens"] += 1
        if row.seen is not None:
            row.seen[tok] = True
        s, prep = row.req.settings, row.req
        piece, stopped = ("", False)
        if prep.text is not None:
            try:
                piece, stopped = prep.text.push(tok)
            except Exception as e:
                prep.handle._emit(TokenEvent(tok, row.n_new - 1))
                self._finish(r, "error", f"text sink failed: {type(e).__name__}: {e}")
                return
        prep.handle._emit(TokenEvent(tok, row.n_new - 1, piece))
        if stopped or tok in s.eos_token_ids:
            self._finish(r, "stop", flush=not stopped)
        elif row.n_new >= s.max_new_tokens:
            self._finish(r, "length")

    def _retire_cancelled(self) -> None:
        for r, row in enumerate(self.rows):
            if row is not None and row.req.handle.cancelled:
                self._finish(r, "cancelled")

    def _finish(self, r: int, reason: FinishReason, error: str | None = None, flush: bool = True) -> None:
        """Free row r now and send the request's final event."""
        row, self.rows[r] = self.rows[r], None
        prep = row.req
        tail = ""
        if flush and prep.text is not None and reason != "error":
            try:
                tail = prep.text.flush()
            except Exception as e:
                reason, error = "error", f"text sink failed: {type(e).__name__}: {e}"
        now = time.perf_counter()
        ttft = None if row.t_first is None else row.t_first - prep.t_submit
        self.counters[reason] += 1
        prep.handle._emit(FinishEvent(reason, prep.handle.prompt_tokens, row.n_new, ttft, now - prep.t_submit,
                                      tail, error))

    def _finish_unstarted(self, prep: PreparedRequest, reason: FinishReason, error: str | None = None) -> None:
        self.counters[reason] += 1
        prep.handle._emit(FinishEvent(reason, prep.handle.prompt_tokens, 0, None,
                                      time.perf_counter() - prep.t_submit, "", error))

    # -- thread helpers -----------------------------------------------------------------------
    def run_forever(self) -> None:
        """Step until ``stop()``; sleeps (no polling) while there is nothing to do."""
        while True:
            with self._lock:
                while (not self._closed and not self._waiting and not self._pending
                       and all(r is None for r in self.rows)):
                    self._wakeup.wait()
                if self._closed:
                    break
            try:
                self.step()
            except Exception as e:  # a bug, not a bad request (those fail alone): fail what is in flight, go on
                self._end_all("error", f"engine step failed: {type(e).__name__}: {e}")
        self._end_all("cancelled")

    def start(self) -> "Engine":
        if self._thread is not None:
            raise RuntimeError("the engine loop is already running")
        self._thread = threading.Thread(target=self.run_forever, name="smolvlm-engine", daemon=True)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        """The loop thread is alive and the engine takes requests (the server's /health)."""
        return not self._closed and self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Refuse new requests, end the loop thread, finish everything left as "cancelled"."""
        with self._lock:
            self._closed = True
            self._wakeup.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        else:
            self._end_all("cancelled")

    def _end_all(self, reason: FinishReason, error: str | None = None) -> None:
        """Finish every waiting and running request with ``reason``, freeing all rows."""
        with self._step_lock:
            with self._lock:
                waiting, self._waiting = list(self._waiting), deque()
            pending, self._pending = [p.prep for p in self._pending.values()], {}
            for prep in waiting + pending:
                self._finish_unstarted(prep, reason, error)
            for r, row in enumerate(self.rows):
                if row is not None:
                    self._finish(r, reason, error)

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- batch use and metrics ----------------------------------------------------------------------
    def generate(self, requests: Iterable[Request]) -> list[Completion]:
        """Run many requests through the engine, at most ``max_batch`` at a time; results in input order.

        Works with or without the loop thread (without, this call drives ``step()``).
        """
        todo, handles = deque(requests), []
        while todo or not all(h.done for h in handles):
            while todo and self._has_room():
                handles.append(self.submit(todo.popleft()))
            if self._thread is None:
                self.step()
            else:
                next(h for h in handles if not h.done).wait(0.05)
        return [h.result() for h in handles]

    def _has_room(self) -> bool:
        with self._lock:
            return self._queued(extra=1) <= self.max_queue

    def metrics(self) -> dict[str, Any]:
        """A snapshot for /metrics: counters, rows in use, queue length, cache size, feature-cache counts."""
        fc = self.feature_cache
        with self._lock:
            waiting = len(self._waiting)
        kv_bytes = sum(t.numel() * t.element_size() for t in (*self.cache.k, *self.cache.v))
        return dict(self.counters, active_rows=sum(r is not None for r in self.rows), waiting=waiting,
                    pending_rows=len(self._pending),
                    max_batch=self.max_batch, max_context=self.max_context, max_queue=self.max_queue,
                    kv_cache_bytes=kv_bytes, vision_encoder_calls=fc.encoder_calls,
                    feature_cache_hits=fc.hits, feature_cache_misses=fc.misses)

