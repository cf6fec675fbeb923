"""``GET /metrics``: the server's counters in Prometheus' text format (0.0.4), no client library.

Server side (this module): HTTP responses by route and status, prompt tokens of the requests
submitted, and two histograms over the requests answered in full: time to first token and time
per output token (one observation per request: its decode time after the first token over the
tokens after the first). Engine side (``Engine.metrics()``): requests by finish reason (a
cancelled request too: the engine sees every finish, a handler whose client left does not),
generated tokens, queue depth, rows in use (the decode batch size), prefills, decode steps,
vision encoder calls and feature-cache hits / misses.
"""

from __future__ import annotations

import threading
from typing import Any

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
ROUTES = ("/v1/chat/completions", "/v1/models", "/health", "/metrics", "/")


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)  # per bucket, not cumulative
        self.count = 0
        self.sum = 0.0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
                break
        self.count += 1
        self.sum += v

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{b:g}"}} {acc}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


class ServerMetrics:
    """Thread-safe counters of the HTTP side; ``render(engine.metrics())`` -> the /metrics text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.responses: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)

    def response(self, path: str, status: int) -> None:
        route = path if path in ROUTES else "other"
        with self._lock:
            self.responses[route, status] = self.responses.get((route, status), 0) + 1

    def submitted(self, prompt_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens

    def answered(self, completion_tokens: int, ttft_s: float | None, total_s: float) -> None:
        with self._lock:
            if ttft_s is not None:
                self.ttft.observe(ttft_s)
                if completion_tokens > 1:
                    self.tpot.observe(max(0.0, total_s - ttft_s) / (completion_tokens - 1))

    def render(self, engine: dict[str, Any]) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[str]) -> None:
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *samples])

        with self._lock:
            metric("smolvlm_http_responses_total", "counter", "HTTP responses by route and status code.",
                   [f'smolvlm_http_responses_total{{route="{r}",status="{s}"}} {n}'
                    for (r, s), n in sorted(self.responses.items())])
            metric("smolvlm_prompt_tokens_total", "counter", "Prompt tokens of submitted requests (image tokens included).",
                   [f"smolvlm_prompt_tokens_total {self.prompt_tokens}"])
            metric("smolvlm_time_to_first_token_seconds", "histogram", "From submission to the first token.",
                   self.ttft.lines("smolvlm_time_to_first_token_seconds"))
            metric("smolvlm_time_per_output_token_seconds", "histogram",
                   "Per request: decode time after the first token / tokens after the first.",
                   self.tpot.lines("smolvlm_time_per_output_token_seconds"))
        metric("smolvlm_requests_finished_total", "counter",
               "Requests the engine finished, by reason (stop: eos or a stop string; length; cancelled; error).",
               [f'smolvlm_requests_finished_total{{reason="{r}"}} {engine[r]}'
                for r in ("stop", "length", "cancelled", "error")])
        metric("smolvlm_completion_tokens_total", "counter", "Tokens generated (cancelled requests included).",
               [f"smolvlm_completion_tokens_total {engine['generated_tokens']}"])
        gauges = {"queue_depth": ("waiting", "Requests waiting for a free KV row."),
                  "batch_size": ("active_rows", "Requests running now (rows in the decode batch)."),
                  "pending_requests": ("pending_rows", "Requests holding a KV row while their images and prompt "
                                                       "go in a slice per decode step."),
                  "max_batch": ("max_batch", "KV rows (requests decoded together at most)."),
                  "max_context": ("max_context", "Tokens per request (prompt + completion) at most.")}
        for name, (key, help_) in gauges.items():
            metric(f"smolvlm_{name}", "gauge", help_, [f"smolvlm_{name} {engine[key]}"])
        counters = {"vision_encoder_calls": "Calls into the vision encoder.",
                    "feature_cache_hits": "Image tiles whose features came from the cache.",
                    "feature_cache_misses": "Image tiles encoded.",
                    "prefills": "Prompts prefilled.",
                    "prefill_forwards": "Prefill forwards (prompts arriving together share one).",
                    "prefill_chunks": "Prompt chunks written while other requests decoded (the last one excluded).",
                    "decode_steps": "Batched decode steps.",
                    "rejected": "Requests refused because the queue was full."}
        for key, help_ in counters.items():
            metric(f"smolvlm_{key}_total", "counter", help_, [f"smolvlm_{key}_total {engine[key]}"])
        return "\n".join(lines) + "\n"
