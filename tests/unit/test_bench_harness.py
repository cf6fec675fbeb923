"""bench/run.py's own guards: ``--append`` onto a report whose raw rows are not on this machine; section 5 kept."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_append_without_the_earlier_raw_rows_is_refused_before_any_work(tmp_path):
    """A fresh checkout has the committed report but not bench/.cache's raw rows: appending would
    rewrite the report with this run's rows alone, so the harness refuses and the report is kept."""
    report = tmp_path / "RESULTS-no-raw-rows-here.md"
    report.write_text("# an earlier report\n")
    assert not (REPO / "bench" / ".cache" / "run_results-no-raw-rows-here.json").exists()
    r = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--out", str(report), "--append", "--quick"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2
    assert "--append" in r.stderr and "run_results-no-raw-rows-here.json is missing" in r.stderr
    assert "Traceback" not in r.stderr
    assert report.read_text() == "# an earlier report\n"


def test_append_of_a_native_run_onto_an_avx2_only_report_is_refused(tmp_path):
    """``--isa avx2`` rows and native rows never share a report: appending either to the other is refused
    before any work, the raw rows and the report kept."""
    name = "RESULTS-isa-mix-test"
    raw = REPO / "bench" / ".cache" / f"run_results{name[len('RESULTS'):]}.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    report = tmp_path / f"{name}.md"
    report.write_text("# capped\n")
    raw.write_text('{"machine": {"run as": "an AVX2-only CPU"}, "rows": []}')
    try:
        r = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--out", str(report), "--append",
                            "--quick"], capture_output=True, text=True, timeout=120, cwd=REPO)
        assert r.returncode == 2 and "measured as an AVX2-only CPU" in r.stderr and "Traceback" not in r.stderr
        assert report.read_text() == "# capped\n" and "run as" in raw.read_text()
    finally:
        raw.unlink()


def test_section_5_is_kept_with_the_raw_rows(tmp_path):
    """``--analysis-file`` is stored with the raw rows, so a later run (``--append``, ``--report-only``) that
    does not pass it again keeps section 5 instead of dropping it."""
    name = "RESULTS-analysis-kept-test"
    raw = REPO / "bench" / ".cache" / f"run_results{name[len('RESULTS'):]}.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    report, analysis = tmp_path / f"{name}.md", tmp_path / "analysis.md"
    analysis.write_text("Targets met: all of them, said once.\n")
    raw.write_text('{"commands": ["run.py"], "machine": {"CPU": "test"}, "rows": [], "text": []}')
    run = [sys.executable, str(REPO / "bench" / "run.py"), "--out", str(report), "--report-only"]
    try:
        for extra in (["--analysis-file", str(analysis)], []):
            r = subprocess.run(run + extra, capture_output=True, text=True, timeout=120, cwd=REPO)
            assert r.returncode == 0, r.stderr[-2000:]
            assert "Targets met: all of them, said once." in report.read_text().split("## 5. Targets and analysis")[1]
    finally:
        raw.unlink()


def test_a_kernel_policy_reaches_its_child(monkeypatch):
    """``--kernel-policies`` runs ours with SMOLVLM_CPU_KERNELS=0 and =1 (engines ours-kernels-off/-all): the
    value reaches the child's environment, and a child without a policy inherits this process's."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_run_under_test", REPO / "bench" / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    assert run.KERNEL_ENGINES == {"ours-kernels-off": "0", "ours-kernels-all": "1"}
    probe = [sys.executable, "-c", "import json, os; print('RESULT ' + json.dumps(os.environ.get('SMOLVLM_CPU_KERNELS')))"]
    monkeypatch.setenv("SMOLVLM_CPU_KERNELS", "inherited")
    for engine, value in run.KERNEL_ENGINES.items():
        assert run.child(probe, engine, run.KERNEL_ENGINES.get(engine)) == value
    assert run.child(probe, "ours", run.KERNEL_ENGINES.get("ours")) == "inherited"
