"""`smolvlm eval`: batched greedy evaluation of a checkpoint on a task (default: the held-out synthetic set).

Prints a table (category, metric, n, score) and the overall score; ``--output`` writes the results
JSON (``evaluation/runner.py``). ``--min-overall`` / ``--min-category`` turn it into a gate: exit
code 1 with one line on stderr when a bar is not met (``--min-category`` applies to every reported
category, each with its own metric: exact match, ANLS for captions).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from smolvlm.cli import common


def register(p: argparse.ArgumentParser) -> None:
    from smolvlm.evaluation.tasks import TASKS

    common.add_model_args(p)
    p.add_argument("--task", choices=sorted(TASKS), default="synth", help="what to evaluate (default: synth)")
    p.add_argument("--n", type=int, default=200, help="number of samples (each may hold several questions; default 200)")
    p.add_argument("--batch-size", type=int, default=8, help="requests generated together (default 8)")
    p.add_argument("--seed", type=int, default=0, help="which held-out samples (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="answer length limit in tokens (default 16)")
    p.add_argument("--caption-max-new-tokens", type=int, default=48,
                   help="length limit for caption requests (default 48)")
    p.add_argument("--system-prompt", default=None, help="system prompt, as the training recipe's data.system_prompt")
    p.add_argument("--examples", type=int, default=10, metavar="K", help="predictions kept in the JSON (default 10)")
    p.add_argument("--output", default=None, metavar="FILE", help="write the results JSON here")
    p.add_argument("--min-overall", type=float, default=None, metavar="X", help="fail (exit 1) if overall < X")
    p.add_argument("--min-category", type=float, default=None, metavar="X",
                   help="fail (exit 1) if any category's score (its own metric; captions: ANLS) < X")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar on stderr")


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def format_table(results: dict[str, Any]) -> str:
    """Plain-text table: one row per category, then the overall line."""
    rows = [("category", "metric", "n", "score")]
    for cat, v in results["per_category"].items():
        name = cat if v["headline"] else f"{cat} *"
        rows.append((name, v["metric"], str(v["n"]), _fmt(v["score"])))
    rows.append(("overall", results["overall_metric"], str(results["n_overall"]), _fmt(results["overall"])))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    if results["excluded_from_overall"]:
        lines.append("* not in overall: " + ", ".join(results["excluded_from_overall"]))
    return "\n".join(lines)


def check_thresholds(results: dict[str, Any], min_overall: float | None, min_category: float | None) -> list[str]:
    """Failures of the ``--min-*`` bars, as short phrases (empty: all met)."""
    fails = []
    if min_overall is not None and (results["overall"] is None or results["overall"] < min_overall):
        fails.append(f"overall {_fmt(results['overall'])} < --min-overall {min_overall}")
    if min_category is not None:
        for cat, v in results["per_category"].items():
            if v["score"] is None or v["score"] < min_category:
                fails.append(f"{cat} {_fmt(v['score'])} < --min-category {min_category}")
    return fails


def run(args: argparse.Namespace) -> int:
    from smolvlm.evaluation.runner import EvalConfig, evaluate

    for flag in ("min_overall", "min_category"):
        v = getattr(args, flag)
        if v is not None and not 0.0 <= v <= 1.0:
            raise ValueError(f"--{flag.replace('_', '-')} must be in [0, 1], got {v}")
    config = EvalConfig(task=args.task, n=args.n, seed=args.seed, batch_size=args.batch_size,
                        max_new_tokens=args.max_new_tokens, caption_max_new_tokens=args.caption_max_new_tokens,
                        system_prompt=args.system_prompt, num_examples=args.examples,
                        progress=args.progress).validate()  # bad flags fail before the model load
    if args.output is not None and not Path(args.output).expanduser().resolve().parent.is_dir():
        raise FileNotFoundError(f"--output folder does not exist: {Path(args.output).parent}")
    model, processor = common.load_model(args)
    results = evaluate(model, processor, config, model_name=str(args.model))
    results["settings"].update(device=args.device, quantize=args.quantize)
    if args.output is not None:
        Path(args.output).expanduser().write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(format_table(results))
    print(f"{results['n_requests']} questions from {results['n']} samples in {results['seconds']:.1f} s")
    fails = check_thresholds(results, args.min_overall, args.min_category)
    if fails:
        print("smolvlm eval: FAILED: " + "; ".join(fails), file=sys.stderr)
        return 1
    return 0
