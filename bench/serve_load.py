"""Load benchmark: N concurrent streaming clients on loopback against `smolvlm serve` and peers.

Not a test. For each server (started here on 127.0.0.1, a free port, always killed at the end) and
each concurrency level, N asyncio clients stream /v1/chat/completions (httpx, server-sent events)
with the same text prompts, the same max_tokens and greedy decoding (temperature 0), until the
level's request count or its time bound is reached. Per request: time to first token (first
non-empty content delta), inter-token latency (gaps between content deltas), completion tokens
(`usage` when the server sends it, else the number of content deltas). Per level: aggregate
completion tokens/s (all tokens / level wall time), p50/p95 TTFT and ITL, failures (non-200,
error, timeout, no tokens) and the server's peak RSS during the level (VmRSS sampled every
50 ms, server process and its children) next to its lifetime VmHWM.

Peers (same weights, one folder, see `--build`):
- `transformers`: `transformers serve FOLDER --continuous-batching` (transformers' own OpenAI
  server). For Idefics3 (SmolVLM) it prints "does not support continuous batching. Falling back to
  sequential generation", so this is the VLM as transformers serves it today.
- `transformers-text`: the same text decoder + lm_head extracted into a LlamaForCausalLM folder,
  which `transformers serve --continuous-batching` does batch (text-only prompts are identical).

Writes bench/SERVE_LOAD.md and bench/serve_load.png (raw rows: bench/.cache/serve_load.json).

    .venv/bin/python bench/serve_load.py --build            # once: random-weight real-size 256M folder
    .venv/bin/python bench/serve_load.py --clients 1 4 8 16 32 --max-tokens 32 \
        --peers transformers transformers-text
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache"
VENV_BIN = Path(sys.executable).parent
REFERENCE = Path(os.environ.get("SMOLVLM_REFERENCE_DIR", ROOT.parent / "shared" / "reference"))
DEFAULT_CKPT = CACHE / "serve-256M"
RAW = CACHE / "serve_load.json"
REPORT = ROOT / "bench" / "SERVE_LOAD.md"
CHART = ROOT / "bench" / "serve_load.png"

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle gear system works, step by step.",
    "Describe a busy market in a coastal town early in the morning.",
    "List some reasons why people enjoy gardening, with a sentence for each.",
    "Write a letter to a friend about a trip to the mountains.",
    "Explain the water cycle to a ten year old child.",
    "Describe the rules of chess for someone who has never played.",
    "Write a poem about autumn leaves falling in a quiet park.",
]


# SmolVLM's chat template, text only, accepting string content too (renders the same prompt)
TEXT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{line['text']}}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


# -- checkpoints ----------------------------------------------------------------------------------
def build(ckpt: Path, ref_name: str) -> None:
    """Random-weight real-size checkpoint (bf16 safetensors) + the reference tokenizer/processor
    files; plus `<ckpt>-text`: its text decoder + lm_head as a LlamaForCausalLM folder."""
    import torch
    import transformers

    ref = REFERENCE / ref_name
    if not (ckpt / "config.json").is_file():
        cfg = transformers.AutoConfig.from_pretrained(ref)
        torch.manual_seed(0)
        model = transformers.AutoModelForImageTextToText.from_config(cfg, dtype=torch.bfloat16)
        model.save_pretrained(ckpt)
        for f in ref.iterdir():
            if f.is_file() and f.name not in ("config.json", "PROVENANCE.md"):
                shutil.copy(f, ckpt / f.name)
                os.chmod(ckpt / f.name, 0o644)
        print(f"built {ckpt}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params")
    text = ckpt.parent / (ckpt.name + "-text")
    if not (text / "config.json").is_file():
        vlm = transformers.AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.bfloat16)
        tcfg = vlm.config.text_config
        lcfg = transformers.LlamaConfig(**{k: v for k, v in tcfg.to_dict().items()
                                           if k not in ("architectures", "model_type")})
        lcfg.architectures = ["LlamaForCausalLM"]
        lcfg.tie_word_embeddings = bool(getattr(vlm.config, "tie_word_embeddings", False))
        lm = transformers.LlamaForCausalLM(lcfg).to(torch.bfloat16)
        sd = {"model." + k: v for k, v in vlm.model.text_model.state_dict().items()}
        sd["lm_head.weight"] = vlm.lm_head.weight
        missing, unexpected = lm.load_state_dict(sd, strict=False)
        missing = [m for m in missing if "rotary" not in m]
        assert not missing and not unexpected, (missing, unexpected)
        lm.save_pretrained(text)
        for f in ckpt.iterdir():
            if f.is_file() and not f.name.endswith(".safetensors") and f.name != "config.json" \
                    and "preprocessor" not in f.name and "processor" not in f.name:
                shutil.copy(f, text / f.name)
        # a plain tokenizer folder: no processor class, and the SmolVLM template also taking string content
        (text / "chat_template.json").unlink(missing_ok=True)
        tc = json.loads((text / "tokenizer_config.json").read_text())
        tc.pop("processor_class", None)
        tc["chat_template"] = TEXT_TEMPLATE
        (text / "tokenizer_config.json").write_text(json.dumps(tc, indent=1))
        print(f"built {text}")


# -- servers --------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_cmd(name: str, ckpt: Path, port: int, args: argparse.Namespace) -> tuple[list[str], dict, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if name == "smolvlm":
        return ([str(VENV_BIN / "smolvlm"), "serve", "--model", str(ckpt), "--dtype", args.dtype,
                 "--threads", str(args.threads), "--host", "127.0.0.1", "--port", str(port),
                 "--max-batch", str(args.max_batch), "--max-context", str(args.max_context),
                 "--max-queue", "256"], env, str(ckpt))
    tf = args.transformers_bin or str(VENV_BIN / "transformers")
    folder = ckpt if name == "transformers" else ckpt.parent / (ckpt.name + "-text")
    return ([tf, "serve", str(folder), "--continuous-batching", "--host", "127.0.0.1", "--port", str(port),
             "--device", "cpu", "--dtype", args.dtype, "--log-level", "warning"], env, str(folder))


class Server:
    def __init__(self, name: str, ckpt: Path, args: argparse.Namespace, log: Path):
        self.name, self.port = name, free_port()
        cmd, env, self.model_id = server_cmd(name, ckpt, self.port, args)
        self.cmd = cmd
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=ROOT)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} (log: {self.log.name})")
            with contextlib.suppress(Exception):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not healthy after {timeout:.0f} s (log: {self.log.name})")

    def pids(self) -> list[int]:
        try:
            import psutil

            p = psutil.Process(self.proc.pid)
            return [p.pid] + [c.pid for c in p.children(recursive=True)]
        except Exception:
            return [self.proc.pid]

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


def status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler(threading.Thread):
    """Max over time of the summed VmRSS of the server's processes, sampled every 50 ms."""

    def __init__(self, server: Server):
        super().__init__(daemon=True)
        self.server, self.peak_kib, self._halt = server, 0, threading.Event()
        self._pids = server.pids()

    def run(self) -> None:
        n = 0
        while not self._halt.is_set():
            if n % 20 == 0:
                self._pids = self.server.pids()
            self.peak_kib = max(self.peak_kib, sum(status_kib(p, "VmRSS") for p in self._pids))
            n += 1
            self._halt.wait(0.05)

    def stop(self) -> float:
        self._halt.set()
        self.join()
        return self.peak_kib / 1024


# -- clients --------------------------------------------------------------------------------------
async def one_request(client, url: str, model: str, prompt: str, max_tokens: int, timeout: float) -> dict:
    body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": prompt}]}
    t0 = time.perf_counter()
    times: list[float] = []
    text: list[str] = []
    usage_tokens, error = None, None
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                else:
                    async for line in r.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            break
                        obj = json.loads(data)
                        if "error" in obj:
                            error = str(obj["error"])[:200]
                            break
                        now = time.perf_counter()
                        for ch in obj.get("choices") or []:
                            if (ch.get("delta") or {}).get("content"):
                                times.append(now)
                                text.append(ch["delta"]["content"])
                            if ch.get("finish_reason") == "error":
                                error = "finish_reason=error"
                        if obj.get("usage"):
                            usage_tokens = obj["usage"].get("completion_tokens")
    except TimeoutError:
        error = f"timeout after {timeout:.0f} s"
    except Exception as e:  # noqa: BLE001 - every failure is counted, none stops the run
        error = f"{type(e).__name__}: {e}"[:200]
    end = time.perf_counter()
    if error is None and not times:
        error = "no tokens"
    tokens = usage_tokens if usage_tokens is not None else len(times)
    return {"ok": error is None, "error": error, "start": t0, "end": end, "tokens": tokens if error is None else 0,
            "ttft": times[0] - t0 if times else None, "text": "".join(text), "gaps": [b - a for a, b in zip(times, times[1:])]}


async def run_level(url: str, model: str, clients: int, n_requests: int, duration: float, max_tokens: int,
                    timeout: float) -> tuple[list[dict], float]:
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    results: list[dict] = []
    issued = 0
    t_start = time.perf_counter()
    deadline = t_start + duration

    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout)) as client:
        async def worker() -> None:
            nonlocal issued
            while issued < n_requests and time.perf_counter() < deadline:
                i = issued
                issued += 1
                res = await one_request(client, url, model, PROMPTS[i % len(PROMPTS)], max_tokens, timeout)
                res["prompt"] = i % len(PROMPTS)
                results.append(res)

        await asyncio.gather(*(worker() for _ in range(clients)))
    return results, time.perf_counter() - t_start


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if r["ok"]]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    gaps = [g for r in ok for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in ok)
    # decode-only aggregate: tokens after each request's first one, over the level's wall time
    texts: dict[str, str] = {}
    for r in ok:
        texts.setdefault(str(r["prompt"]), r["text"])
    return {"texts": texts, "requests": len(results), "ok": len(ok), "failures": len(results) - len(ok),
            "errors": sorted({r["error"] for r in results if r["error"]})[:5],
            "tokens": tokens, "wall_s": wall, "agg_tok_s": tokens / wall if wall > 0 else 0.0,
            "ttft_p50": pct(ttft, 0.5), "ttft_p95": pct(ttft, 0.95),
            "itl_p50": pct(gaps, 0.5), "itl_p95": pct(gaps, 0.95),
            "per_stream_tok_s": statistics.median([(r["tokens"] - 1) / (r["end"] - r["start"] - r["ttft"])
                                                   for r in ok if r["tokens"] > 1 and r["end"] - r["start"] > r["ttft"]] or [0])}


def bench_server(name: str, args: argparse.Namespace, t_end: float) -> dict:
    ckpt = Path(args.model)
    row: dict = {"server": name, "levels": {}}
    log = CACHE / f"serve_load_{name}.log"
    srv = Server(name, ckpt, args, log)
    row["cmd"] = " ".join(srv.cmd)
    try:
        t0 = time.perf_counter()
        srv.wait_ready(args.start_timeout)
        row["startup_s"] = time.perf_counter() - t0
        print(f"[{name}] ready in {row['startup_s']:.1f} s on {srv.url}", flush=True)
        warm, _ = asyncio.run(run_level(srv.url, srv.model_id, 2, 2, 60, 4, args.request_timeout))
        if not all(r["ok"] for r in warm):
            raise RuntimeError(f"warm-up failed: {[r['error'] for r in warm]}")
        for n in args.clients:
            left = t_end - time.monotonic()
            if left < 10:
                row["levels"][str(n)] = {"skipped": "overall time budget spent"}
                print(f"[{name}] {n} clients: skipped (time budget)", flush=True)
                continue
            n_req = max(args.min_requests, args.requests_per_client * n)
            sampler = RssSampler(srv)
            sampler.start()
            res, wall = asyncio.run(run_level(srv.url, srv.model_id, n, n_req, min(args.duration, left - 5),
                                              args.max_tokens, args.request_timeout))
            s = summarize(res, wall)
            s["peak_rss_mib"] = sampler.stop()
            s["vmhwm_mib"] = max(status_kib(p, "VmHWM") for p in srv.pids()) / 1024
            row["levels"][str(n)] = s
            print(f"[{name}] {n:>2} clients: {s['ok']}/{s['requests']} ok, {s['agg_tok_s']:.1f} tok/s, "
                  f"TTFT p50 {s['ttft_p50'] or 0:.3f} s p95 {s['ttft_p95'] or 0:.3f} s, "
                  f"ITL p50 {1e3 * (s['itl_p50'] or 0):.0f} ms p95 {1e3 * (s['itl_p95'] or 0):.0f} ms, "
                  f"RSS {s['peak_rss_mib']:.0f} MiB, {wall:.1f} s" + (f", errors {s['errors']}" if s["errors"] else ""),
                  flush=True)
            if srv.proc.poll() is not None:
                raise RuntimeError(f"{name} died during the {n}-client level (exit {srv.proc.returncode})")
    except Exception as e:  # noqa: BLE001 - report it, keep the other servers
        row["error"] = f"{type(e).__name__}: {e}"
        print(f"[{name}] ERROR {row['error']}", flush=True)
    finally:
        srv.kill()
    with contextlib.suppress(OSError):
        tail = log.read_text(errors="replace").splitlines()
        row["notes"] = [ln.strip() for ln in tail if "continuous batching" in ln.lower()][:2]
    return row


# -- report ---------------------------------------------------------------------------------------
def cpu_info() -> dict:
    model, flags = "?", []
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "?":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    keep = [f for f in flags if f.startswith(("avx", "amx", "fma", "f16c", "sse4"))]
    return {"model": model, "cores": os.cpu_count(), "flags": " ".join(keep)}


def _f(x, scale=1.0, digits=1) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"


def write_report(data: dict) -> None:
    rows, args = data["rows"], data["args"]
    L = ["# Serving under load: smolvlm serve vs peers (CPU, loopback)", "",
         f"Regenerate: `{data['command']}`", "",
         f"Date {data['date']}; CPU {data['cpu']['model']}, {data['cpu']['cores']} cores; flags: "
         f"`{data['cpu']['flags']}`; python {data['python']}; commit {data['commit']}.", "",
         f"Method: every server is started by the script on 127.0.0.1 (free port) with torch threads = "
         f"{args['threads']} and dtype {args['dtype']}, serving the same random-weight real-size SmolVLM-256M checkpoint "
         "(bf16 safetensors built from `shared/reference/SmolVLM-256M-Instruct`, tokenizer included). "
         f"N asyncio clients (httpx, SSE streaming) send text-only chat requests ({len(PROMPTS)} fixed prompts, "
         f"~15-20 tokens each), max_tokens {args['max_tokens']}, temperature 0, back to back, "
         f"{args['requests_per_client']} requests per client (at least {args['min_requests']}) or "
         f"{args['duration']:.0f} s per level, after a 2-request warm-up. Aggregate tok/s = completion tokens "
         "of all successful requests / level wall time (prefill included). TTFT: request sent to first "
         "non-empty content delta. ITL: gaps between content deltas. Peak RSS: max over 50 ms samples of "
         "the server's RSS during the level (the process keeps its memory between levels, so this is "
         "cumulative in practice). The client runs on the same cores.", "",
         f"- `smolvlm`: `--max-batch {args['max_batch']}` (up to that many streams decode together), "
         f"`--max-context {args['max_context']}` (its KV cache: max-batch x max-context slots, allocated at start).",
         "- `transformers`: `transformers serve --continuous-batching` on the same VLM folder.",
         "- `transformers-text`: the same text decoder + lm_head saved as a LlamaForCausalLM folder (the SmolVLM "
         "chat template, so text prompts render the same), `transformers serve --continuous-batching` with its "
         "default cache settings (its paged KV cache sizes itself from available memory, hence its RSS).", ""]
    for r in rows:
        if r.get("notes"):
            L.append(f"- `{r['server']}` log: " + "; ".join(f"\"{n}\"" for n in r["notes"]))
        if r.get("error"):
            L.append(f"- `{r['server']}` **error**: {r['error']}")
    L += ["", "| server | clients | requests ok/sent | failures | agg tok/s | x vs 1 client | TTFT p50 (s) | "
          "TTFT p95 (s) | ITL p50 (ms) | ITL p95 (ms) | per-stream decode tok/s | peak RSS (MiB) |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = (r["levels"].get("1") or {}).get("agg_tok_s")
        for n, s in r["levels"].items():
            if "skipped" in s:
                L.append(f"| {r['server']} | {n} | skipped: {s['skipped']} | | | | | | | | | |")
                continue
            x = f"{s['agg_tok_s'] / base:.2f}x" if base else "-"
            L.append(f"| {r['server']} | {n} | {s['ok']}/{s['requests']} | {s['failures']} | {s['agg_tok_s']:.1f} | {x} | "
                     f"{_f(s['ttft_p50'], 1, 3)} | {_f(s['ttft_p95'], 1, 3)} | {_f(s['itl_p50'], 1e3, 0)} | "
                     f"{_f(s['itl_p95'], 1e3, 0)} | {s['per_stream_tok_s']:.1f} | {s['peak_rss_mib']:.0f} |")
    L += ["", "## Targets (issue #17 item 7)", ""]
    by = {r["server"]: r["levels"] for r in rows}
    ours = by.get("smolvlm", {})
    a1, a8 = (ours.get("1") or {}).get("agg_tok_s"), (ours.get("8") or {}).get("agg_tok_s")
    if a1 and a8:
        L.append(f"- 8 streams >= 3x the aggregate throughput of 1 stream: {a8:.1f} / {a1:.1f} = "
                 f"{a8 / a1:.2f}x -> **{'met' if a8 / a1 >= 3 else 'not met'}**")
    s32 = ours.get("32") or {}
    if "failures" in s32:
        s1 = ours.get("1") or {}
        bounded = s32["peak_rss_mib"] <= 1.5 * s1.get("peak_rss_mib", float("inf"))
        L.append(f"- 32 streams, zero failures and bounded memory: {s32['failures']} failures of {s32['requests']}, "
                 f"peak RSS {s32['peak_rss_mib']:.0f} MiB (1 stream: {s1.get('peak_rss_mib', 0):.0f} MiB) -> "
                 f"**{'met' if s32['failures'] == 0 and bounded else 'not met'}**")
    peers = [(p, (lv.get("8") or {}).get("agg_tok_s")) for p, lv in by.items() if p != "smolvlm"]
    if a8 and peers:
        measured = [(p, v) for p, v in peers if v]
        ahead = all(a8 > v for _, v in measured) and measured
        L.append(f"- 8 streams ahead of every peer measured: smolvlm {a8:.1f} tok/s vs " +
                 ", ".join(f"{p} {v:.1f}" if v else f"{p} not measured" for p, v in peers) +
                 f" -> **{'met' if ahead else 'not met'}**")
    ref = (by.get("smolvlm", {}).get("1") or {}).get("texts") or {}
    for p, lv in by.items():
        other = (lv.get("1") or {}).get("texts") or {}
        common = sorted(set(ref) & set(other))
        if p != "smolvlm" and common:
            same = sum(ref[k].strip() == other[k].strip() for k in common)
            L.append(f"- sanity: greedy text of `{p}` identical to smolvlm's (1 client, leading space aside: smolvlm drops the one after `Assistant:`) on {same}/{len(common)} prompts")
    L += ["", f"![aggregate throughput and latency vs concurrency]({CHART.name})", "",
          "Server commands (ports are random free ones):", ""] + [f"- `{r['cmd'].replace(str(ROOT) + '/', '')}`" for r in rows] + [""]
    REPORT.write_text("\n".join(L))
    print(f"wrote {REPORT}")
    chart(rows)


def chart(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ticks: set[int] = set()
    for i, r in enumerate(rows):
        lv = [(int(n), s) for n, s in r["levels"].items() if "agg_tok_s" in s]
        if not lv:
            continue
        c = f"C{i}"
        xs = [n for n, _ in lv]
        ticks.update(xs)
        axes[0].plot(xs, [s["agg_tok_s"] for _, s in lv], "o-", color=c, label=r["server"])
        axes[1].plot(xs, [s["ttft_p50"] or float("nan") for _, s in lv], "o-", color=c, label=r["server"] + " p50")
        axes[1].plot(xs, [s["ttft_p95"] or float("nan") for _, s in lv], "x:", color=c, label=r["server"] + " p95")
        axes[2].plot(xs, [1e3 * (s["itl_p50"] or float("nan")) for _, s in lv], "o-", color=c, label=r["server"] + " p50")
        axes[2].plot(xs, [1e3 * (s["itl_p95"] or float("nan")) for _, s in lv], "x:", color=c, label=r["server"] + " p95")
    for ax, title, yl in zip(axes, ["aggregate completion tokens/s", "time to first token", "inter-token latency"],
                             ["tok/s", "s", "ms"]):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
        ax.set_xlabel("concurrent streaming clients")
        ax.set_ylabel(yl)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    fig.tight_layout()
    fig.savefig(CHART, dpi=110)
    print(f"wrote {CHART}")


def main() -> None:
    global REPORT, CHART, RAW
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--requests-per-client", type=int, default=2, help="requests per level = this x clients")
    ap.add_argument("--min-requests", type=int, default=4, help="at least this many requests per level")
    ap.add_argument("--duration", type=float, default=60, help="stop issuing new requests after this many s per level")
    ap.add_argument("--request-timeout", type=float, default=180)
    ap.add_argument("--start-timeout", type=float, default=180)
    ap.add_argument("--budget", type=float, default=900, help="overall seconds; levels past it are skipped")
    ap.add_argument("--peers", nargs="*", default=["transformers", "transformers-text"],
                    choices=["transformers", "transformers-text"])
    ap.add_argument("--no-smolvlm", action="store_true")
    ap.add_argument("--model", default=str(DEFAULT_CKPT), help="checkpoint folder served by every server")
    ap.add_argument("--reference", default="SmolVLM-256M-Instruct", help="config set in shared/reference for --build")
    ap.add_argument("--build", action="store_true", help="build the random-weight checkpoint folders and exit")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--max-batch", type=int, default=32, help="smolvlm serve --max-batch")
    ap.add_argument("--max-context", type=int, default=512, help="smolvlm serve --max-context")
    ap.add_argument("--transformers-bin", default=None, help="`transformers` CLI of a peer venv (default: this venv's)")
    ap.add_argument("--report", default=str(REPORT), help="the Markdown report to write (the chart and raw JSON go "
                    "beside it, named after it)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from bench/.cache/serve_load.json")
    args = ap.parse_args()

    REPORT = Path(args.report).resolve()
    CHART = REPORT.with_name(REPORT.stem.lower() + ".png")
    RAW = CACHE / (REPORT.stem.lower() + ".json")
    CACHE.mkdir(parents=True, exist_ok=True)
    if args.build:
        build(Path(args.model), args.reference)
        return
    if args.report_only:
        write_report(json.loads(RAW.read_text()))
        return
    cpu = cpu_info()
    print(f"CPU: {cpu['model']}, {cpu['cores']} cores\nflags: {cpu['flags']}", flush=True)
    if not (Path(args.model) / "config.json").is_file():
        sys.exit(f"{args.model} missing: run `{sys.executable} bench/serve_load.py --build` first")
    t_end = time.monotonic() + args.budget
    servers = ([] if args.no_smolvlm else ["smolvlm"]) + list(args.peers)
    rows = [bench_server(name, args, t_end) for name in servers]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    data = {"rows": rows, "args": vars(args), "cpu": cpu, "python": platform.python_version(),
            "commit": commit + (" + uncommitted changes" if dirty else ""),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M UTC"),
            "command": ".venv/bin/python bench/serve_load.py " + " ".join(sys.argv[1:])}
    RAW.write_text(json.dumps(data, indent=1))
    write_report(data)


if __name__ == "__main__":
    main()
