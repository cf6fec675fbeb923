"""`torchrun --nproc-per-node 2 $(which smolvlm) train` (gloo on CPU), DDP and FSDP2: the per-step
losses equal a one-process run with the same global batch, only rank 0 writes, and a resumed run
continues exactly.

The recipe is the tiny one (tests/helpers.tiny_recipe: model built from parts, LoRA on the frozen
text model, trained vision tower), with train.batch_size 2 x grad_accum 2, so each rank gets one
sample of each micro-batch and gradients are accumulated before the reduce. LoRA dropout is 0: with
dropout the ranks would draw other masks than one process (same in distribution, not bitwise).
The schedule is constant so that a 2-step run resumed with max_steps 3 has the same lr as a 3-step run.

Tolerances: the two-process run computes the same sums in another order (each rank's sample
unpadded instead of padded beside the other, the per-rank token-weighted sums added by an
all-reduce), so float32 results differ in the last bits: ~1e-7 relative in practice for the losses
(~10.8) and the gradient norms. rtol 1e-5 (losses) and 1e-4 (grad norms) leave a ~100x margin and
still fail a wrong weighting: averaging the ranks' token-weighted means instead of weighting by the
tokens of all ranks moved the step-1 grad norm by 2 % and the step-2 loss by 6e-5 relative. AdamW
divides each update by the gradient's RMS, so last-bit differences reach the weights at ~lr x 1e-2 at
worst (1e-5 seen): the exported weights are compared with atol 1e-4, while training moves them by
~lr = 2e-3 per step. A resume under the same world size repeats the same operations: compared exactly.

Which process wrote: each worker but rank 0 runs with an audit hook (``sitecustomize``) that logs
every open-for-writing, mkdir, rename and removal under the output folder; the log must stay empty.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.helpers import tiny_recipe

BIN = Path(sys.executable).parent
SMOLVLM, TORCHRUN = BIN / "smolvlm", BIN / "torchrun"
STEPS = 3
HOOK = '''
import os, sys
if os.environ.get("RANK", "0") != "0" and os.environ.get("WATCH_WRITES_UNDER"):
    _root = os.path.realpath(os.environ["WATCH_WRITES_UNDER"])
    _log = os.environ["WATCH_WRITES_LOG"] + "." + os.environ["RANK"]
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE)
        elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"):
            path, writing = args[0], True
        else:
            return
        if writing and isinstance(path, (str, bytes, os.PathLike)):
            p = os.path.realpath(os.fsdecode(path))
            if p == _root or p.startswith(_root + os.sep):
                with open(_log, "a") as f:
                    f.write(f"{event} {p}\\n")

    sys.addaudithook(_hook)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(ref256, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dist")
    assert SMOLVLM.exists() and TORCHRUN.exists(), "the venv's smolvlm and torchrun scripts are needed"
    d = tiny_recipe(ref256, root / "unused", max_steps=STEPS, batch_size=2, grad_accum=2, eval_every=STEPS,
                    checkpoint_every=1)
    d["lora"]["dropout"] = 0.0
    d["schedule"] = {"kind": "constant", "warmup_steps": 0}
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(d))
    (root / "hook").mkdir()
    (root / "hook" / "sitecustomize.py").write_text(HOOK)
    one = root / "one"
    r = subprocess.run([str(SMOLVLM), "train", "--recipe", str(recipe), "--set", f"train.output_dir={one}"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return {"root": root, "recipe": recipe, "one": one}


def _torchrun(s: dict, out: Path, mode: str, *extra: str) -> subprocess.CompletedProcess:
    log = s["root"] / f"writes-{out.name}"
    path = os.pathsep.join(p for p in (str(s["root"] / "hook"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WATCH_WRITES_UNDER": str(out), "WATCH_WRITES_LOG": str(log),
           "PYTHONPATH": path}
    r = subprocess.run([str(TORCHRUN), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
                        str(_free_port()), str(SMOLVLM), "train", "--recipe", str(s["recipe"]),
                        "--set", f"train.output_dir={out}", "--set", f"train.distributed={mode}", *extra],
                       capture_output=True, text=True, timeout=420, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert not list(s["root"].glob(f"{log.name}.*")), [p.read_text() for p in s["root"].glob(f"{log.name}.*")]
    return r


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one_and_resume(setup, mode):
    one = _metrics(setup["one"])
    out = setup["root"] / mode
    r = _torchrun(setup, out, mode)
    assert r.stdout.count(f"trained to step {STEPS}") == 1  # rank 0 reports, rank 1 is quiet
    two = _metrics(out)
    assert [x["step"] for x in two] == list(range(1, STEPS + 1))  # one writer: no line twice
    assert [x["loss"] for x in two] == pytest.approx([x["loss"] for x in one], rel=1e-5)
    assert [x["grad_norm"] for x in two] == pytest.approx([x["grad_norm"] for x in one], rel=1e-4)
    assert two[-1]["eval_loss"] == pytest.approx(one[-1]["eval_loss"], rel=1e-5)
    assert all(x["samples_per_s"] > 0 and x["tokens_per_s"] > 0 for x in two)
    assert len({x["loss"] for x in two}) == STEPS  # it trains
    # the checkpoints have the one-process layout, with every rank's RNG states
    last = out / "checkpoints" / f"step-{STEPS:08d}"
    assert sorted(p.name for p in last.iterdir()) == ["optimizer.pt", "rng-ranks.json", "rng.json",
                                                     "trainable.safetensors", "trainer_state.json"]
    rngs = json.loads((last / "rng-ranks.json").read_text())
    assert len(rngs) == 2 and rngs[0]["torch"] != rngs[1]["torch"]  # rank r seeds train.seed + r
    ref_ck = setup["one"] / "checkpoints" / f"step-{STEPS:08d}"
    o1, o2 = (torch.load(d / "optimizer.pt", weights_only=True) for d in (ref_ck, last))
    assert o2["state"].keys() == o1["state"].keys()
    assert [g["params"] for g in o2["param_groups"]] == [g["params"] for g in o1["param_groups"]]
    # final/ (under FSDP gathered on rank 0) and adapter/ hold the trained weights
    f1, f2 = (load_file(str(d / "final" / "model.safetensors")) for d in (setup["one"], out))
    assert f2.keys() == f1.keys()
    for k in f1:
        torch.testing.assert_close(f2[k], f1[k], rtol=0, atol=1e-4)
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "loss.png").is_file()

    # resume: 2 steps, then --resume to 3: the same records as the straight run
    res = setup["root"] / f"{mode}-resumed"
    _torchrun(setup, res, mode, "--set", "train.max_steps=2")
    assert [x["step"] for x in _metrics(res)] == [1, 2]
    _torchrun(setup, res, mode, "--resume")
    keys = ("step", "loss", "grad_norm", "lr")  # (the 2-step run also evaluated at its last step)
    resumed = _metrics(res)
    assert [{k: x[k] for k in keys} for x in resumed] == [{k: x[k] for k in keys} for x in two]
    assert resumed[-1]["eval_loss"] == two[-1]["eval_loss"]
    w1, w2 = (load_file(str(d / "checkpoints" / f"step-{STEPS:08d}" / "trainable.safetensors")) for d in (out, res))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
