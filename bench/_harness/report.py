"""RESULTS.md tables and results.png from the raw rows bench/run.py collected."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

# metric -> (label, unit, higher_is_better, target ratio against transformers or None): issue #20's
# (decode >= 2.5x, image time to first token >= 1.4x, peak RSS <= 0.7x; no vision-only target)
VLM_METRICS = {
    "vision_s_per_tile": ("vision, s per tile", "s", False, None),
    "prefill_tok_s": ("prefill (900 tok)", "tok/s", True, None),
    "decode_tok_s": ("decode @ ~900 ctx", "tok/s", True, 2.5),
    "decode_after_image_tok_s": ("decode after the 512x512 image", "tok/s", True, None),  # llama.cpp only so far
    "ttft_1536x1024": ("TTFT 1536x1024 image", "s", False, 1.4),
    "ttft_512x512": ("TTFT 512x512 image", "s", False, 1.4),
    "peak_rss_mb": ("peak RSS", "MiB", False, 1 / 0.7),
    "load_s": ("load time", "s", False, None),
}


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def fmt(xs: list[float]) -> str:
    if not xs:
        return "-"
    m = med(xs)
    digits = 3 if m < 10 else 1 if m < 1000 else 0
    if len(xs) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{min(xs):.{digits}f}-{max(xs):.{digits}f}]"


def ratio(ours: list[float], theirs: list[float], higher_better: bool) -> float | None:
    if not ours or not theirs:
        return None
    return med(ours) / med(theirs) if higher_better else med(theirs) / med(ours)


def vlm_table(rows: list[dict[str, Any]], model: str) -> list[str]:
    # peers beyond transformers (OpenVINO, llama.cpp): a value column and an "ours vs" ratio column each; targets stay vs transformers
    peers = [e for e in dict.fromkeys(r["engine"] for r in rows if r["model"] == model) if e not in ("ours", "transformers")]
    out = [f"### {model}", "",
           "ratio = how many times better ours is (speed: ours/theirs; time and memory: theirs/ours); "
           "values are median [min-max] over the repetitions.", "",
           "| dtype | metric | ours | transformers | ratio | target | met |" + "".join(f" {e} | ours vs {e} |" for e in peers),
           "|---|---|---|---|---|---|---|" + "---|---|" * len(peers)]
    for dtype in sorted({r["dtype"] for r in rows if r["model"] == model}, reverse=True):
        sel = [r for r in rows if r["model"] == model and r["dtype"] == dtype]
        for key, (label, unit, hib, target) in VLM_METRICS.items():
            if not any(r.get(key) is not None for r in sel):  # a metric only some peer measures, absent here
                continue
            o = [r[key] for r in sel if r["engine"] == "ours" and r.get(key) is not None]
            t = [r[key] for r in sel if r["engine"] == "transformers" and r.get(key) is not None]
            q = ratio(o, t, hib)
            tgt = "-" if target is None else (f"<= {1 / target:.1f}x RSS" if key == "peak_rss_mb" else f">= {target:g}x")
            met = "-" if target is None or q is None else ("yes" if q >= target - 1e-9 else "**no**")
            line = f"| {dtype} | {label} ({unit}) | {fmt(o)} | {fmt(t)} | {'-' if q is None else f'{q:.2f}x'} | {tgt} | {met} |"
            for e in peers:
                p = [r[key] for r in sel if r["engine"] == e and r.get(key) is not None]
                qp = ratio(o, p, hib)
                line += f" {fmt(p)} | {'-' if qp is None else f'{qp:.2f}x'} |"
            out.append(line)
        bw = [r for r in sel if r["engine"] == "ours" and r.get("read_gb_s") and r.get("decode_step_ms_median")]
        if bw:  # the decode step against the machine's read bandwidth, measured in the same child process
            stream = med([r["decode_weight_mb"] * 2**20 / (r["decode_step_ms_median"] / 1e3) / 1e9 for r in bw])
            read = med([r["read_gb_s"] for r in bw])
            floor = med([r["decode_weight_mb"] * 2**20 / (r["read_gb_s"] * 1e9) * 1e3 for r in bw])
            out.append(f"| {dtype} | decode step vs read bandwidth (ours: {bw[0]['decode_weight_mb']:.0f} MiB of weights per "
                       f"step) | {stream:.1f} GB/s of {read:.1f} GB/s read; floor {floor:.1f} ms vs "
                       f"{med([r['decode_step_ms_median'] for r in bw]):.1f} ms per step | | | | |" + " | |" * len(peers))
        ref = next((r["greedy_ids"] for r in sel if r["engine"] == "ours" and r.get("greedy_ids")), None)
        if ref is not None:
            def agree(engine: str) -> str:
                got = next((r["greedy_ids"] for r in sel if r["engine"] == engine and r.get("greedy_ids")), None)
                return "-" if got is None else agreement([ref], [got])
            out.append(f"| {dtype} | greedy agreement with ours ({len(ref)} tokens after the decode prompt; leading; positions) "
                       f"| reference | {agree('transformers')} | | | |" + "".join(f" {agree(e)} | |" for e in peers))
        tiles = [r for r in sel if r["engine"] == "ours"]
        if tiles:
            r0 = tiles[0]

            def peer_tiles(engine: str) -> str:  # each peer's own processor: its tiles / tokens, where it reports them
                p = next((r for r in sel if r["engine"] == engine and r.get("ttft_512x512_tiles") is not None), None)
                return "-" if p is None else (f"{p['ttft_1536x1024_tiles']} / {p['ttft_1536x1024_tokens']}; "
                                              f"{p['ttft_512x512_tiles']} / {p['ttft_512x512_tokens']}")
            out.append(f"| {dtype} | prompt: 1536x1024 = {r0['ttft_1536x1024_tiles']} tiles / {r0['ttft_1536x1024_tokens']} tok; "
                       f"512x512 = {r0['ttft_512x512_tiles']} tiles / {r0['ttft_512x512_tokens']} tok | | | | | |"
                       + "".join(f" {peer_tiles(e)} | |" for e in peers))
    return out + [""]


def budget_table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| model | dtype | 512x512 default: tiles / tokens / TTFT s | no_upscale=True: tiles / tokens / TTFT s | TTFT saving |",
           "|---|---|---|---|---|"]
    for (model, dtype) in sorted({(r["model"], r["dtype"]) for r in rows if r["engine"] == "ours"}):
        sel = [r for r in rows if r["engine"] == "ours" and r["model"] == model and r["dtype"] == dtype]
        d = [r["ttft_512x512"] for r in sel]
        n = [r["ttft_512x512_no_upscale"] for r in sel]
        r0 = sel[0]
        out.append(f"| {model} | {dtype} | {r0['ttft_512x512_tiles']} / {r0['ttft_512x512_tokens']} / {fmt(d)} | "
                   f"{r0['ttft_512x512_no_upscale_tiles']} / {r0['ttft_512x512_no_upscale_tokens']} / {fmt(n)} | "
                   f"{med(d) / med(n):.1f}x |")
    return out + [""]


def prefix_agree(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def agreement(ref: list[list[int]], got: list[list[int]]) -> str:
    pre = [prefix_agree(a, b) for a, b in zip(ref, got)]
    same = sum(x == y for a, b in zip(ref, got) for x, y in zip(a, b))
    total = sum(len(a) for a in ref)
    return f"{'/'.join(map(str, pre))} (of {len(ref[0])}); {same / total:.0%} positions"


def forced_agreement(ref: list[list[int]], got: list[list[int]] | None) -> str:
    """Teacher-forced top-1 agreement: the share of reference positions where the engine, given the
    reference's own prefix, predicts the reference's next token."""
    if not got:
        return "-"
    same = sum(x == y for a, b in zip(ref, got) for x, y in zip(a, b))
    return f"{same / sum(len(a) for a in ref):.1%}"


def text_table(rows: list[dict[str, Any]]) -> list[str]:
    engines = [e for e in dict.fromkeys(r["engine"] for r in rows) if not e.startswith("reference")]
    llama = {q: [r["decode_tok_s"] for r in rows if r["engine"] == f"llama.cpp-{q}"] for q in ("Q4_1", "Q8_0")}
    ref = next((r for r in rows if r["engine"].startswith("reference")), None)
    n = len(ref["greedy"][0]) if ref else 0
    out = ["| engine | decode tok/s | vs llama.cpp Q4_1 | vs llama.cpp Q8_0 | prefill tok/s | weights MiB | peak RSS MiB | "
           f"free-running greedy agreement with ours bf16 (leading tokens per prompt, of {n}; positions) | "
           "teacher-forced top-1 agreement with ours bf16 |", "|---|---|---|---|---|---|---|---|---|"]
    for e in engines:
        sel = [r for r in rows if r["engine"] == e]
        dec = [r["decode_tok_s"] for r in sel]
        q = {k: f"{med(dec) / med(v):.2f}x" if v else "-" for k, v in llama.items()}
        free = forced = "-"
        if ref is not None and sel[0].get("greedy"):
            free = agreement(ref["greedy"], sel[0]["greedy"]).replace(f" (of {n})", "")
            forced = forced_agreement(ref["greedy"], sel[0].get("forced"))
        w = sel[0].get("weight_mb")
        out.append(f"| {e} | {fmt(dec)} | {q['Q4_1']} | {q['Q8_0']} | {fmt([r['prefill_tok_s'] for r in sel])} | "
                   f"{'-' if w is None else f'{w:.0f}'} | {fmt([r['peak_rss_mb'] for r in sel])} | {free} | {forced} |")
    return out + [""]


def agree256_table(res: dict[str, Any]) -> list[str]:
    out = ["| weights | weights MiB (whole VLM) | greedy agreement with fp32 (leading tokens per prompt; positions) |",
           "|---|---|---|"]
    for label, v in res.items():
        a = "reference" if label == "fp32" else agreement(res["fp32"]["greedy"], v["greedy"])
        out.append(f"| {label} | {v['weight_mb']:.0f} | {a} |")
    return out + [""]


def plot(vlm_rows: list[dict[str, Any]], text_rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["vision_s_per_tile", "prefill_tok_s", "decode_tok_s", "ttft_1536x1024", "ttft_512x512", "peak_rss_mb"]
    groups = sorted({(r["model"], r["dtype"]) for r in vlm_rows})
    fig, axes = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [3, 1]})
    ax = axes[0]
    w = 0.8 / max(1, len(groups))
    for i, (model, dtype) in enumerate(groups):
        sel = [r for r in vlm_rows if r["model"] == model and r["dtype"] == dtype]
        vals = []
        for k in keys:
            q = ratio([r[k] for r in sel if r["engine"] == "ours"], [r[k] for r in sel if r["engine"] == "transformers"],
                      VLM_METRICS[k][2])
            vals.append(q or 0.0)
        ax.bar([j + i * w for j in range(len(keys))], vals, w, label=f"{model} {dtype}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + w * (len(groups) - 1) / 2 for j in range(len(keys))])
    ax.set_xticklabels([VLM_METRICS[k][0] for k in keys], rotation=20, ha="right")
    ax.set_ylabel("ours vs transformers (x better)")
    ax.set_title("smolvlm vs transformers (random weights, real configs, CPU)")
    ax.legend(fontsize=8)
    ax = axes[1]
    engines = list(dict.fromkeys(r["engine"] for r in text_rows))
    ax.bar(engines, [med([r["decode_tok_s"] for r in text_rows if r["engine"] == e]) for e in engines])
    ax.set_ylabel("decode tokens/s")
    ax.set_title("SmolLM2-135M (Q4_1 GGUF) decode")
    ax.set_xticks(range(len(engines)))
    ax.set_xticklabels(engines, rotation=60, ha="right", fontsize=7)  # 13 engine names: steep, right-aligned
    fig.tight_layout()
    fig.savefig(path, dpi=110)
