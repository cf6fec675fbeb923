"""`smolvlm eval --task <benchmark>` end to end through the CLI, on fixture datasets written in each
benchmark's published layout (``tests/eval_fixtures.py``) and a tiny random checkpoint.

The tiny model answers nonsense, so generation runs are checked for bookkeeping (every question
answered, results shape, resume, sharding, errors); the scores themselves are proven by
scoring-only mode with the gold answers (100) and with wrong ones (0).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from smolvlm.cli.main import main
from smolvlm.evaluation import bench_runner, predictions
from tests.eval_fixtures import WRITERS, gold
from tests.helpers import build_tiny_checkpoint

TASKS = sorted(WRITERS)
RESULT_KEYS = {"task", "metric", "score", "n", "overall", "per_category", "published", "errors", "missing",
               "unmatched_predictions", "settings", "git_commit", "seconds", "samples", "compare_with"}
CATEGORIZED = {"chartqa", "ocrbench", "mmmu", "mmstar", "mathvista", "videomme", "mvbench", "mlvu"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, ref256) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("bench_ckpt"), ref256)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """task -> (data, media or None), written once."""
    root = tmp_path_factory.mktemp("bench_data")
    out = {}
    for task, write in WRITERS.items():
        got = write(root)
        out[task] = got if isinstance(got, tuple) else (got, None)
    # MLVU's folder also holds the open-ended (G-Avg) files: never part of the multiple-choice task
    (out["mlvu"][0] / "MLVU" / "json" / "8_sub_scene.json").write_text(
        json.dumps([{"video": "x.mp4", "duration": 9, "question": "Describe it.", "answer": "a scene",
                     "question_type": "sub_scene"}]))
    return out


def _args(task, data, tmp, *extra):
    d, media = data[task]
    args = ["eval", "--task", task, "--data", str(d), "--no-progress", *extra]
    return args + (["--media", str(media)] if media else [])


def _results(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize("task", TASKS)
def test_every_task_runs_end_to_end(task, ckpt, data, tmp_path, capsys):
    out = tmp_path / f"{task}.json"
    rc = main(_args(task, data, tmp_path, "--model", str(ckpt), "--limit", "4", "--batch-size", "2",
                    "--max-new-tokens", "3", "--output", str(out)))
    assert rc == 0, capsys.readouterr().err
    r = _results(out)
    assert set(r) == RESULT_KEYS
    assert r["task"] == task and r["n"] == 4 and r["missing"] == 0 and r["errors"]["n"] == 0
    assert 0.0 <= r["score"] <= 100.0
    assert len(r["samples"]) == 4 and all(isinstance(s["prediction"], str) for s in r["samples"])
    assert [s["id"] for s in r["samples"]] == list(gold(task))[:4]  # dataset ids, split order
    assert r["settings"]["max_new_tokens"] == 3 and r["settings"]["limit"] == 4
    assert (task in CATEGORIZED) == bool(r["per_category"])
    assert out.with_suffix(".md").read_text().startswith(f"## {task} ")
    assert out.with_suffix(".png").exists() == (task in CATEGORIZED)
    assert len(predictions.read(predictions.path_for(out))) == 4
    printed = capsys.readouterr().out
    assert f"{task}: {r['metric']}" in printed and str(out) in printed


@pytest.mark.parametrize("task", TASKS)
def test_scoring_only_mode_scores_gold_100_and_wrong_0(task, data, tmp_path):
    golds = gold(task)
    right, wrong = tmp_path / "right.jsonl", tmp_path / "wrong.jsonl"
    right.write_text("".join(json.dumps({"id": k, "prediction": v}) + "\n" for k, v in golds.items()))
    wrong.write_text("".join(json.dumps({"id": k, "prediction": "zzqx"}) + "\n" for k in golds))
    for preds, expected in ((right, 100.0), (wrong, 0.0)):
        out = tmp_path / f"{preds.stem}.json"
        assert main(_args(task, data, tmp_path, "--predictions", str(preds), "--output", str(out))) == 0
        r = _results(out)
        assert r["score"] == expected and r["n"] == len(golds) and r["missing"] == 0
        assert r["settings"]["mode"] == "scoring-only"
        assert all(s["score"] == expected / 100 for s in r["samples"])
        for cat in r["per_category"].values():
            assert cat["score"] == expected


def test_scoring_only_mode_loads_no_model_and_no_torch(data, tmp_path):
    """The scorer (and the CLI path to it) never imports torch: it runs where no model could."""
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps({"id": k, "prediction": v}) + "\n" for k, v in gold("docvqa").items()))
    code = ("import sys; from smolvlm.cli.main import main; "
            f"rc = main(['eval', '--task', 'docvqa', '--data', {str(data['docvqa'][0])!r}, '--predictions', "
            f"{str(preds)!r}, '--output', {str(tmp_path / 'r.json')!r}]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert _results(tmp_path / "r.json")["score"] == 100.0


def test_partial_and_foreign_predictions_are_reported(data, tmp_path, capsys):
    ids = list(gold("textvqa"))
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"id": ids[0], "prediction": "x"}) + "\n" + json.dumps({"id": "nope", "prediction": "y"}))
    out = tmp_path / "r.json"
    assert main(_args("textvqa", data, tmp_path, "--predictions", str(preds), "--output", str(out))) == 0
    r = _results(out)
    assert r["n"] == 1 and r["missing"] == len(ids) - 1 and r["unmatched_predictions"] == 1
    err = capsys.readouterr().err
    assert f"{len(ids) - 1} question(s) have no prediction" in err and "1 prediction id(s) match no question" in err


def test_resume_skips_answered_questions(ckpt, data, tmp_path, monkeypatch):
    calls = []
    real = bench_runner.answer_items

    def counting(model, processor, items, budget):
        calls.extend(it.id for it in items)
        return real(model, processor, items, budget)

    monkeypatch.setattr(bench_runner, "answer_items", counting)
    out = tmp_path / "r.json"
    base = _args("docvqa", data, tmp_path, "--model", str(ckpt), "--batch-size", "2", "--max-new-tokens", "2",
                 "--output", str(out))
    assert main(base + ["--limit", "3"]) == 0
    first = list(calls)
    assert len(first) == 3
    calls.clear()
    assert main(base) == 0  # all 6: only the 3 new ones are generated
    assert sorted(calls) == sorted(set(gold("docvqa")) - set(first))
    assert _results(out)["n"] == 6
    assert len(predictions.path_for(out).read_text().splitlines()) == 6


def test_bad_rows_score_zero_with_their_error_and_the_rest_run(ckpt, data, tmp_path, capsys):
    import pyarrow.parquet as pq

    src = data["docvqa"][0]
    bad = tmp_path / "docvqa"
    shutil.copytree(src, bad)
    f = next((bad / "DocVQA").glob("validation-*.parquet"))
    rows = pq.read_table(f).to_pylist()
    rows[1]["image"] = {"bytes": b"not an image at all", "path": "broken.png"}
    pq.write_table(pq.read_table(f).from_pylist(rows, schema=pq.read_schema(f)), f)
    out = tmp_path / "r.json"
    rc = main(["eval", "--task", "docvqa", "--data", str(bad), "--model", str(ckpt), "--limit", "3",
               "--max-new-tokens", "2", "--no-progress", "--output", str(out)])
    assert rc == 0
    r = _results(out)
    assert r["n"] == 3 and r["errors"]["n"] == 1
    broken = [s for s in r["samples"] if "error" in s]
    assert len(broken) == 1 and broken[0]["score"] == 0.0 and "image" in broken[0]["error"].lower()
    assert "1 question(s) failed and scored 0" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--task", "videomme"], "video benchmark: give its video folder with --media"),
    (["--task", "docvqa", "--data", "/nonexistent/docvqa"], "dataset not found"),
    (["--task", "docvqa", "--limit", "0"], "--limit must be >= 1"),
    (["--task", "docvqa", "--output", "r.txt"], "--output must be a .json file"),
    (["--task", "docvqa", "--split", "train"], "no files for split 'train'"),
    (["--task", "textvqa", "--data", "DOCVQA"], "missing column(s)"),
    (["--task", "docvqa", "--data", None], "needs --data PATH"),
    (["--task", "synth", "--data", "x"], "--data is for benchmarks"),
])
def test_user_errors_are_one_line_before_any_model_load(extra, message, data, tmp_path, capsys):
    args = ["eval", "--model", str(tmp_path / "no-such-model"), "--no-progress", *extra]
    if "--data" not in args:
        args += ["--data", str(data[args[args.index("--task") + 1]][0])]
    elif None in args:
        i = args.index("--data")
        del args[i:i + 2]
    args = [str(data["docvqa"][0]) if a == "DOCVQA" else a for a in args]
    if "--output" not in args:
        args += ["--output", str(tmp_path / "r.json")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_missing_video_is_found_before_the_model_loads(data, tmp_path, capsys):
    d, _ = data["videomme"]
    empty = tmp_path / "media"
    empty.mkdir()
    rc = main(["eval", "--task", "videomme", "--data", str(d), "--media", str(empty), "--model",
               str(tmp_path / "no-such-model"), "--output", str(tmp_path / "r.json")])
    assert rc == 2
    assert "video" in capsys.readouterr().err.lower()


def test_bad_predictions_file_names_the_line(data, tmp_path, capsys):
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "1", "prediction": "a"}\n{"id": 2}\n')
    rc = main(["eval", "--task", "docvqa", "--data", str(data["docvqa"][0]), "--predictions", str(p),
               "--output", str(tmp_path / "r.json")])
    assert rc == 2 and "p.jsonl:2" in capsys.readouterr().err


def test_report_combines_runs(data, tmp_path, capsys):
    outs = []
    for name, pred in (("base", "zzqx"), ("tuned", None)):
        preds = tmp_path / f"{name}.jsonl"
        preds.write_text("".join(json.dumps({"id": k, "prediction": pred or v}) + "\n"
                                 for k, v in gold("ai2d").items()))
        out = tmp_path / f"ai2d-{name}.json"
        assert main(["eval", "--task", "ai2d", "--data", str(data["ai2d"][0]), "--predictions", str(preds),
                     "--model", f"HuggingFaceTB/SmolVLM2-2.2B-Instruct-{name}", "--output", str(out)]) == 0
        outs.append(out)
    capsys.readouterr()
    assert main(["eval", "--report", str(tmp_path / "ai2d-*.json"), "--output", str(tmp_path / "report.md")]) == 0
    table = (tmp_path / "report.md").read_text()
    assert "| ai2d | accuracy | 0.00 | 100.00 | 70.00 |" in table  # published SmolVLM2-2.2B AI2D: 70.0
    assert (tmp_path / "report.png").stat().st_size > 1000
    assert main(["eval", "--report", str(tmp_path / "missing.json")]) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_equal_one(ckpt, data, tmp_path):
    """`torchrun --nproc-per-node 2 $(which smolvlm) eval ...` (gloo on CPU): rank 0 merges and scores;
    the predictions and score equal a one-process run's."""
    bindir = Path(sys.executable).parent
    smolvlm, torchrun = bindir / "smolvlm", bindir / "torchrun"
    assert smolvlm.exists() and torchrun.exists(), "the venv's smolvlm and torchrun scripts are needed"
    common = ["eval", "--task", "mmmu", "--data", str(data["mmmu"][0]), "--model", str(ckpt), "--batch-size", "2",
              "--max-new-tokens", "3", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one.json"
    run1 = subprocess.run([str(smolvlm), *common, "--output", str(one)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert run1.returncode == 0, run1.stderr[-2000:]
    two = tmp_path / "two.json"
    run2 = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
                           str(_free_port()), str(smolvlm), *common, "--output", str(two)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert run2.returncode == 0, run2.stderr[-2000:]
    r1, r2 = _results(one), _results(two)
    assert r2["settings"]["processes"] == 2 and r1["settings"]["processes"] == 1
    assert [(s["id"], s["prediction"]) for s in r2["samples"]] == [(s["id"], s["prediction"]) for s in r1["samples"]]
    assert r2["score"] == r1["score"] and r2["n"] == r1["n"] == len(gold("mmmu"))
    assert not list(tmp_path.glob("two.predictions.rank*.jsonl"))  # folded into the main file
