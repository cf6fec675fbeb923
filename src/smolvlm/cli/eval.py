"""`smolvlm eval`: score a model on a benchmark (``--task docvqa --data PATH``), score another
engine's predictions (``--predictions preds.jsonl``, no model), combine results (``--report``),
or run the held-out synthetic set (``--task synth``, the default).

Benchmarks (``evaluation/benchmarks``) are prompted as the SmolVLM authors did in VLMEvalKit and
scored by the reference rules (``evaluation/scoring``); ``torchrun --nproc-per-node K
$(which smolvlm) eval ...`` shards the rows over K processes and rank 0 scores. Results go to
``--output`` (default ``eval-results/<task>.json``) with ``.md`` / ``.png`` reports beside it;
predictions are appended to ``<output stem>.predictions.jsonl`` as they finish, so a rerun resumes.

The synthetic set prints a table (category, metric, n, score); ``--min-overall`` /
``--min-category`` turn it into a gate (exit code 1 with one line on stderr when a bar is not met).
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path
from typing import Any

from smolvlm.cli import common


def register(p: argparse.ArgumentParser) -> None:
    from smolvlm.evaluation.benchmarks import BENCHMARKS

    common.add_model_args(p)
    p.add_argument("--task", choices=["synth", *sorted(BENCHMARKS)], default="synth",
                   help="benchmark to run (default: synth, the held-out synthetic set)")
    b = p.add_argument_group("benchmarks")
    b.add_argument("--data", default=None, metavar="PATH",
                   help="the benchmark's dataset: a folder as huggingface_hub.snapshot_download(repo_type='dataset') "
                        "leaves it, one parquet/JSON file, or the hub id (needs internet)")
    b.add_argument("--split", default=None, help="dataset split (default: the one the papers report)")
    b.add_argument("--media", default=None, metavar="DIR", help="video folder of a video benchmark")
    b.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N questions")
    b.add_argument("--predictions", default=None, metavar="JSONL",
                   help='score these predictions ({"id": ..., "prediction": ...} per line) without loading a model')
    b.add_argument("--report", nargs="+", default=None, metavar="RESULTS_JSON",
                   help="combine results files into one markdown table (and a chart with --output X.md)")
    p.add_argument("--batch-size", type=int, default=8, help="questions generated together (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="answer length limit in tokens (default: the benchmark's own; synth 16)")
    p.add_argument("--output", default=None, metavar="FILE",
                   help="results JSON (benchmarks default: eval-results/<task>.json)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar on stderr")
    s = p.add_argument_group("synthetic set (--task synth)")
    s.add_argument("--n", type=int, default=200, help="number of samples (each may hold several questions; default 200)")
    s.add_argument("--seed", type=int, default=0, help="which held-out samples (default 0)")
    s.add_argument("--caption-max-new-tokens", type=int, default=48,
                   help="length limit for caption requests (default 48)")
    s.add_argument("--system-prompt", default=None, help="system prompt, as the training recipe's data.system_prompt")
    s.add_argument("--examples", type=int, default=10, metavar="K", help="predictions kept in the JSON (default 10)")
    s.add_argument("--min-overall", type=float, default=None, metavar="X", help="fail (exit 1) if overall < X")
    s.add_argument("--min-category", type=float, default=None, metavar="X",
                   help="fail (exit 1) if any category's score (its own metric; captions: ANLS) < X")


def run(args: argparse.Namespace) -> int:
    if args.report:
        return run_report(args)
    if args.task == "synth":
        for flag in ("data", "media", "limit", "predictions", "split"):
            if getattr(args, flag) is not None:
                raise common.UserError(f"--{flag} is for benchmarks; --task synth generates its own data")
        return run_synth(args)
    return run_benchmark(args)


# -- benchmarks ---------------------------------------------------------------------------------------------
def _write_reports(results: dict[str, Any], output: Path) -> None:
    from smolvlm.evaluation import report

    output.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    output.with_suffix(".md").write_text(report.markdown(results))
    report.bar_chart(results, output.with_suffix(".png"))


def _summary(results: dict[str, Any], output: Path) -> str:
    from smolvlm.evaluation import report

    key = results.get("compare_with")
    pub = results["published"].get(key) if key else None
    line = f"{results['task']}: {results['metric']} {report._fmt(results['score'])} on {results['n']} questions"
    if pub is not None:
        line += f" (published {key}: {pub:.2f})"
    cats = [f"  {c}: {report._fmt(v['score'])} (n={v['n']})" for c, v in results["per_category"].items()]
    return "\n".join([line, *cats, f"results: {output}"])


def _warn_incomplete(results: dict[str, Any]) -> None:
    if results["errors"]["n"]:
        print(f"smolvlm eval: warning: {results['errors']['n']} question(s) failed and scored 0, e.g. "
              f"{results['errors']['first'][0]}", file=sys.stderr)
    if results["missing"]:
        print(f"smolvlm eval: warning: {results['missing']} question(s) have no prediction and are not scored",
              file=sys.stderr)
    if results["unmatched_predictions"]:
        print(f"smolvlm eval: warning: {results['unmatched_predictions']} prediction id(s) match no question "
              "in the evaluated rows", file=sys.stderr)


def run_benchmark(args: argparse.Namespace) -> int:
    import time

    from smolvlm.evaluation import bench_runner, predictions, report, shard as shards

    t0 = time.perf_counter()
    if args.data is None:
        raise common.UserError(f"--task {args.task} needs --data PATH (the dataset folder or file; see README)")
    output = Path(args.output or f"eval-results/{args.task}.json").expanduser()
    if output.suffix != ".json":
        raise common.UserError(f"--output must be a .json file, got {output}")
    run = bench_runner.BenchRun(task=args.task, data=args.data, split=args.split, media=args.media, limit=args.limit,
                                batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, output=output,
                                progress=args.progress).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Any] = {"model": args.model or "default"}
    if args.predictions:  # scoring only: no model
        preds = predictions.read(Path(args.predictions).expanduser())
        results = {**bench_runner.results(run, preds, t0, **extra, mode="scoring-only",
                                          predictions=str(args.predictions)),
                   "compare_with": report.published_key(args.model)}
        _write_reports(results, output)
        print(_summary(results, output))
        _warn_incomplete(results)
        return 0
    shard = shards.from_env()
    bench_runner.preflight(run)  # a wrong --data/--media fails before the model loads
    model, processor = common.load_model(args, batched=True)  # questions are answered in batches
    shards.init(shard, args.device)
    try:
        bench_runner.generate(model, processor, run, shard)
        shards.barrier(shard)
        if shard.is_main:
            main = predictions.path_for(output)
            if shard.world > 1:
                predictions.merge_ranks(main, shard.world)
            extra.update(dtype=str(model.dtype).removeprefix("torch."), quantize=args.quantize,
                         quantize_vision=args.quantize_vision, device=args.device, processes=shard.world)
            results = {**bench_runner.results(run, predictions.read_done(main), t0, **extra),
                       "compare_with": report.published_key(args.model, model.config.text_config.hidden_size)}
            _write_reports(results, output)
            print(_summary(results, output))
            _warn_incomplete(results)
    finally:
        shards.close(shard)
    return 0


def run_report(args: argparse.Namespace) -> int:
    from smolvlm.evaluation import report

    paths = [Path(p) for pattern in args.report for p in (sorted(glob.glob(pattern)) or [pattern])]
    runs = []
    for p in paths:
        try:
            r = json.loads(p.read_text())
        except FileNotFoundError:
            raise common.UserError(f"results file not found: {p}") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise common.UserError(f"{p}: not a results JSON file") from None
        if not isinstance(r, dict) or not {"task", "metric", "score"} <= set(r):
            raise common.UserError(f"{p}: not a benchmark results file (needs task, metric, score)")
        runs.append(r)
    table = report.combine(runs)
    print(table, end="")
    if args.output:
        out = Path(args.output).expanduser()
        out.write_text(table)
        chart = report.combined_chart(runs, out.with_suffix(".png"))
        print(f"report: {out}, chart: {chart}")
    return 0


# -- the synthetic set ----------------------------------------------------------------------------------------
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


def run_synth(args: argparse.Namespace) -> int:
    from smolvlm.evaluation.runner import EvalConfig, evaluate

    for flag in ("min_overall", "min_category"):
        v = getattr(args, flag)
        if v is not None and not 0.0 <= v <= 1.0:
            raise ValueError(f"--{flag.replace('_', '-')} must be in [0, 1], got {v}")
    config = EvalConfig(task=args.task, n=args.n, seed=args.seed, batch_size=args.batch_size,
                        max_new_tokens=args.max_new_tokens or 16, caption_max_new_tokens=args.caption_max_new_tokens,
                        system_prompt=args.system_prompt, num_examples=args.examples,
                        progress=args.progress).validate()  # bad flags fail before the model load
    if args.output is not None and not Path(args.output).expanduser().resolve().parent.is_dir():
        raise FileNotFoundError(f"--output folder does not exist: {Path(args.output).parent}")
    model, processor = common.load_model(args, batched=True)  # questions are answered in batches
    results = evaluate(model, processor, config, model_name=str(args.model))
    results["settings"].update(device=args.device, quantize=args.quantize, quantize_vision=args.quantize_vision)
    if args.output is not None:
        Path(args.output).expanduser().write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(format_table(results))
    print(f"{results['n_requests']} questions from {results['n']} samples in {results['seconds']:.1f} s")
    fails = check_thresholds(results, args.min_overall, args.min_category)
    if fails:
        print("smolvlm eval: FAILED: " + "; ".join(fails), file=sys.stderr)
        return 1
    return 0
