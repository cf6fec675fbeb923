"""Writes the small example datasets the fine-tuning recipes under ``configs/`` train on out of the box.

    .venv/bin/python examples/data/make.py

Images and questions come from ``smolvlm.synth`` (the synthetic generator, deterministic), so the
files are the same on every machine. Replace them with your own data: the formats are the point.

* ``finetune.jsonl``: the_cauldron layout (``{"images": [...], "texts": [{"user", "assistant"}]}``)
  and chat-messages lines (``{"messages": [...]}``), mixed; image paths relative to the file.
* ``cauldron/train-00000-of-00001.parquet``: the_cauldron parquet layout (images as ``{bytes, path}``).
* ``preferences.jsonl``: DPO pairs (``{"images", "prompt", "chosen", "rejected"}``), the rejected
  answer a wrong one of the same kind.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from smolvlm import synth

HERE = Path(__file__).resolve().parent
N = 12


def main() -> None:
    samples = synth.make_dataset(N, "train", 7)
    (HERE / "img").mkdir(exist_ok=True)
    lines, prefs, rows = [], [], []
    for i, s in enumerate(samples):
        name = f"img/{i:02d}.png"
        s["images"][0].save(HERE / name, optimize=True)
        turns = [{"user": t["user"], "assistant": t["assistant"]} for t in s["texts"]]
        if i % 2 == 0:
            lines.append({"images": [name], "texts": turns})
        else:
            msgs = []
            for k, t in enumerate(turns):
                content = ([{"type": "image", "path": name}] if k == 0 else []) + [{"type": "text", "text": t["user"]}]
                msgs += [{"role": "user", "content": content}, {"role": "assistant", "content": t["assistant"]}]
            lines.append({"messages": msgs})
        buf = io.BytesIO()
        s["images"][0].save(buf, format="PNG", optimize=True)
        rows.append({"images": [{"bytes": buf.getvalue(), "path": name}],
                     "texts": [{**t, "source": "synth"} for t in turns]})
        first = turns[0]
        wrong = next(t["assistant"] for o in samples for t in o["texts"] if t["assistant"] != first["assistant"])
        prefs.append({"images": [name], "prompt": first["user"], "chosen": first["assistant"], "rejected": wrong})
    (HERE / "finetune.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (HERE / "preferences.jsonl").write_text("".join(json.dumps(x) + "\n" for x in prefs))
    (HERE / "cauldron").mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), HERE / "cauldron" / "train-00000-of-00001.parquet")


if __name__ == "__main__":
    main()
