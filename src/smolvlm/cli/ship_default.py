"""`smolvlm ship-default RUN_DIR`: turn a finished run of configs/default-model.yaml into the
package's default-model files (vision tower, connector, new token rows and LoRA in bfloat16, plus
the processor files and a manifest) in smolvlm/assets/default_model/ or ``--out``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="the training run's output_dir (has final/ and adapter/)")
    p.add_argument("--out", default=None, metavar="DIR", help="where to write (default: the installed package's assets)")


def training_facts(run_dir: Path) -> dict:
    """Steps, samples, wall time and samples/s of a run, from its metrics.jsonl, plus stage 1's
    summary (images, seconds, held-out accuracies) and the replay counts when the recipe had them."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r and "step" in r]
    if not steps:
        return {}
    recipe = {}
    if (run_dir / "recipe.yaml").is_file():
        import yaml

        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    t = recipe.get("train", {})
    samples = steps[-1]["step"] * t.get("batch_size", 0) * t.get("grad_accum", 1)
    wall = steps[-1]["elapsed"]
    facts = {"steps": steps[-1]["step"], "samples": samples, "wall_time_s": round(wall, 1),
             "samples_per_s": round(samples / wall, 3) if wall else None, "final_loss": round(steps[-1]["loss"], 4)}
    stage1 = run_dir / "vision_pretrain" / "summary.json"
    if stage1.is_file():
        facts["vision_pretrain"] = json.loads(stage1.read_text())
    rp = run_dir / "replay.json"
    if rp.is_file():
        data = json.loads(rp.read_text())
        facts["replay"] = {"prompts": len(data["prompts"]), "finished_answers": sum(a is not None for a in data["answers"])}
    return facts


def run(args: argparse.Namespace) -> int:
    from smolvlm.training.ship_default import ship_parts

    run_dir = Path(args.run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run (no metrics.jsonl)")
    out = ship_parts(run_dir, args.out, trained=training_facts(run_dir))
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote the default model's files to {out} ({size / 1e6:.1f} MB)")
    return 0
