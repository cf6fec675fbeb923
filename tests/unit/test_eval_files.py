"""Benchmark data files, prediction files, sharding and reports (no model)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from smolvlm.evaluation import dataset_files, predictions, report
from smolvlm.evaluation.dataset_files import DataError
from smolvlm.evaluation.shard import Shard, from_env


def _parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    return path


def test_find_files_picks_the_split_in_hub_layout(tmp_path):
    for name in ("DocVQA/validation-00000-of-00002.parquet", "DocVQA/validation-00001-of-00002.parquet",
                 "DocVQA/test-00000-of-00001.parquet", "InfographicVQA/validation-00000-of-00001.parquet"):
        _parquet(tmp_path / name, [{"q": name}])
    (tmp_path / ".cache").mkdir()
    _parquet(tmp_path / ".cache" / "validation-00000-of-00001.parquet", [{"q": "hidden"}])
    files = dataset_files.find_files(tmp_path, "validation", "DocVQA")
    assert [f.name for f in files] == ["validation-00000-of-00002.parquet", "validation-00001-of-00002.parquet"]
    # without the config folder every subset's split counts (MMMU: one folder per subject)
    assert len(dataset_files.find_files(tmp_path, "validation")) == 3
    with pytest.raises(DataError, match=r"no files for split 'val'.*splits found: test, validation"):
        dataset_files.find_files(tmp_path, "val", "DocVQA")


def test_find_files_split_folders_single_files_and_errors(tmp_path):
    _parquet(tmp_path / "data" / "test" / "part-0.parquet", [{"a": 1}])
    assert len(dataset_files.find_files(tmp_path, "test")) == 1
    one = _parquet(tmp_path / "one.parquet", [{"a": 1}])
    assert dataset_files.find_files(one, "anything") == [one]
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="not a dataset file"):
        dataset_files.find_files(tmp_path / "notes.txt", None)
    with pytest.raises(DataError, match="dataset not found"):
        dataset_files.find_files(tmp_path / "missing", None)
    unnamed = tmp_path / "mmstar"
    _parquet(unnamed / "mmstar.parquet", [{"a": 1}])
    assert dataset_files.find_files(unnamed, "val") == [unnamed / "mmstar.parquet"]  # one unnamed split
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .parquet"):
        dataset_files.find_files(tmp_path / "empty", None)


def test_iter_rows_streams_columns_in_order_with_a_global_index(tmp_path):
    a = _parquet(tmp_path / "test-00000-of-00002.parquet", [{"id": i, "image": {"bytes": b"x" * 10, "path": None}}
                                                             for i in range(5)])
    b = _parquet(tmp_path / "test-00001-of-00002.parquet", [{"id": 5 + i, "image": None} for i in range(3)])
    rows = list(dataset_files.iter_rows([a, b], columns=["id"], batch_size=2))
    assert [i for i, _, _ in rows] == list(range(8))
    assert [r["id"] for _, _, r in rows] == list(range(8))
    assert all(set(r) == {"id"} for _, _, r in rows)  # the image column was never read
    assert dataset_files.count_rows([a, b]) == 8
    dataset_files.check_columns([a, b], ["id"])
    with pytest.raises(DataError, match=r"missing column\(s\) answers .*it has: id, image"):
        dataset_files.check_columns([a], ["id", "answers"])


def test_json_annotations_and_corrupt_files(tmp_path):
    j = tmp_path / "action.json"
    j.write_text(json.dumps([{"video": "a.mp4"}, {"video": "b.mp4"}]))
    rows = list(dataset_files.iter_rows([j]))
    assert [r["video"] for _, _, r in rows] == ["a.mp4", "b.mp4"] and rows[0][2]["_file"] == str(j)
    bad = tmp_path / "test-00000-of-00001.parquet"
    bad.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="cannot read parquet"):
        list(dataset_files.iter_rows([bad]))
    jl = tmp_path / "x.jsonl"
    jl.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(DataError, match=r"x.jsonl:2: not valid JSON"):
        list(dataset_files.iter_rows([jl]))


def test_predictions_roundtrip_resume_and_torn_tail(tmp_path):
    main = predictions.path_for(tmp_path / "res.json")
    assert main.name == "res.predictions.jsonl"
    w = predictions.Writer(main)
    w.write([{"id": "1", "prediction": "a"}, {"id": 2, "prediction": "b"}])
    w.close()
    with main.open("a") as f:
        f.write('{"id": "3", "predic')  # killed mid-line
    done = predictions.read_done(main)
    assert set(done) == {"1", "2"}
    w = predictions.Writer(main)  # the torn record is dropped, the next one starts cleanly
    w.write([{"id": "3", "prediction": "c"}])
    w.close()
    assert predictions.read(main) == {"1": {"id": "1", "prediction": "a"}, "2": {"id": "2", "prediction": "b"},
                                      "3": {"id": "3", "prediction": "c"}}
    r1 = predictions.rank_path(main, 1)
    predictions.Writer(r1).write([{"id": "9", "prediction": "z"}])
    assert "9" in predictions.read_done(main)
    predictions.merge_ranks(main, 2)
    assert not r1.exists() and predictions.read(main)["9"]["prediction"] == "z"


@pytest.mark.parametrize("line, msg", [("not json", "not valid JSON"), ('{"id": 1}', "expected"),
                                       ('{"prediction": "x"}', "expected"), ('["id", 1]', "expected")])
def test_bad_prediction_lines_are_named(tmp_path, line, msg):
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": 0, "prediction": "ok"}\n' + line + "\n")
    with pytest.raises(predictions.PredictionsError, match=rf"p.jsonl:2: {msg}"):
        predictions.read(p)
    with pytest.raises(predictions.PredictionsError, match="not found"):
        predictions.read(tmp_path / "nope.jsonl")


def test_shards_split_rows_evenly_and_read_torchrun_env(monkeypatch):
    shards = [Shard(r, 3) for r in range(3)]
    owned = [[p for p in range(10) if s.owns(p)] for s in shards]
    assert sorted(sum(owned, [])) == list(range(10)) and [len(o) for o in owned] == [4, 3, 3]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert from_env() == Shard(1, 2) and not from_env().is_main
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="bad torchrun environment"):
        from_env()
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert from_env() == Shard(0, 1)


def test_published_key_by_name_then_width():
    assert report.published_key("HuggingFaceTB/SmolVLM2-2.2B-Instruct") == "SmolVLM2-2.2B-Instruct"
    assert report.published_key("HuggingFaceTB/SmolVLM-Instruct") == "SmolVLM-Instruct"
    assert report.published_key("/ckpt/SmolVLM2-256M-Video-Instruct/") == "SmolVLM2-256M-Video-Instruct"
    assert report.published_key("my-finetune", 960) == "SmolVLM2-500M-Video-Instruct"
    assert report.published_key("my-finetune") is None


def _results(task, score, model, cats=None):
    return {"task": task, "metric": "anls", "score": score, "n": 10, "per_category": cats or {},
            "published": {"SmolVLM2-2.2B-Instruct": 79.98}, "compare_with": "SmolVLM2-2.2B-Instruct",
            "errors": {"n": 0, "first": []}, "settings": {"model": model, "notes": ""}}


def test_reports_tables_and_charts(tmp_path):
    one = _results("docvqa", 50.0, "base", {"a": {"score": 40.0, "n": 5}, "b": {"score": 60.0, "n": 5}})
    md = report.markdown(one)
    assert "| base | 10 | 50.00 | 79.98 |" in md and "| a | 5 | 40.00 |" in md
    assert report.bar_chart(one, tmp_path / "one.png").stat().st_size > 1000
    assert report.bar_chart(_results("docvqa", 1.0, "x"), tmp_path / "none.png") is None
    runs = [one, _results("docvqa", 55.5, "tuned"), _results("textvqa", 30.0, "base")]
    table = report.combine(runs)
    assert table.splitlines()[0] == "| task | metric | base | tuned | published SmolVLM2-2.2B-Instruct |"
    assert "| docvqa | anls | 50.00 | 55.50 | 79.98 |" in table
    assert "| textvqa | anls | 30.00 |  | 79.98 |" in table
    assert report.combined_chart(runs, tmp_path / "all.png").stat().st_size > 1000


def test_a_hub_id_downloads_only_the_split(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot(repo_id, repo_type=None, allow_patterns=None):
        calls.append((repo_id, repo_type, allow_patterns))
        _parquet(tmp_path / "DocVQA" / "validation-00000-of-00001.parquet", [{"q": 1}])
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    files = dataset_files.resolve("lmms-lab/DocVQA", "validation", "DocVQA", "lmms-lab/DocVQA")
    assert [f.name for f in files] == ["validation-00000-of-00001.parquet"]
    assert calls == [("lmms-lab/DocVQA", "dataset", ["DocVQA/*validation*", "DocVQA/**/*validation*"])]

    def offline(*a, **k):
        raise OSError("no internet")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(DataError, match=r"cannot download dataset lmms-lab/textvqa.*no internet"):
        dataset_files.resolve("lmms-lab/textvqa", "validation")
