"""Tiny copies of the seeds' benchmarks, in the layouts their hub repos publish, for tests.

``write_<name>(folder, n=6)`` writes ``folder/<name>/...`` -- parquet shards named as the hub names
them (``DocVQA/validation-00000-of-00001.parquet``, ``data/testmini-00000-of-00001-<hash>.parquet``,
``mmstar.parquet``, ...), image columns as ``{bytes, path}`` structs of small PNGs, list columns as
lists, and decoy files of other splits / configs that must *not* be read -- or JSON annotations
(MVBench, MLVU). It returns the ``--data`` path; the video writers return ``(data, media)`` and
write tiny real .mp4 files (PyAV, ``tests/_video_fixtures.py``) where the benchmark looks for them.

``gold(name, n=6)``: row id -> a prediction the reference scorer takes as correct (the gold letter
for multiple choice, else the gold answer), in split order; ``n_images(name, n=6)``: row id ->
images in the row. Both are computed from the same row specs the writers serialise, independently
of the benchmark modules (so a wrong id or letter mapping there shows up). Row 0 of every set is
fixed: ``tests/unit/test_benchmarks.py`` spells its VLMEvalKit prompt out literally.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
STRINGS = pa.list_(pa.string())
LETTERS = "ABCDEFGHIJ"


def png(seed: int, w: int | None = None, h: int | None = None) -> dict[str, Any]:
    """A small PNG as the ``datasets`` Image struct; size and colour depend on ``seed``."""
    w, h = w or 20 + seed % 7 * 3, h or 14 + seed % 5 * 2
    img = Image.new("RGB", (w, h), ((40 * seed) % 256, (90 + 17 * seed) % 256, (200 - 13 * seed) % 256))
    ImageDraw.Draw(img).rectangle([2, 2, w // 2, h // 2], fill=(255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": f"{seed}.png"}


@dataclass
class Spec:
    """What a writer writes: files (relative path -> rows, parquet with ``schemas[path]`` or JSON),
    videos (relative to the media folder -> seed), and per row id the gold prediction and image count."""

    files: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    schemas: dict[str, pa.Schema] = field(default_factory=dict)
    videos: dict[str, int] = field(default_factory=dict)
    gold: dict[str, str] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)

    def add(self, path: str, rows: list[dict[str, Any]], schema: pa.Schema | None = None) -> None:
        self.files[path] = rows
        if schema is not None:
            self.schemas[path] = schema


def _pick(i: int, seq: list[Any]) -> Any:
    return seq[i % len(seq)]


# -- image benchmarks ------------------------------------------------------------------------------------
def _docvqa(n: int) -> Spec:
    schema = pa.schema([("questionId", pa.string()), ("question", pa.string()), ("question_types", STRINGS),
                        ("docId", pa.int64()), ("ucsf_document_id", pa.string()),
                        ("ucsf_document_page_no", pa.string()), ("answers", STRINGS), ("image", IMAGE),
                        ("data_split", pa.string())])
    s, rows = Spec(), []
    for i in range(n):
        q = "What is the date mentioned in this letter?" if i == 0 else f"What is the total on page {i}?"
        answers = ["1/8/93", "January 8, 1993"] if i == 0 else [f"{100 + i}"]
        rid = str(57344 + i)
        rows.append({"questionId": rid, "question": q, "question_types": ["handwritten"], "docId": 1000 + i,
                     "ucsf_document_id": f"xnbl{i:04d}", "ucsf_document_page_no": "1", "answers": answers,
                     "image": png(i), "data_split": "val"})
        s.gold[rid], s.images[rid] = answers[0], 1
    s.add("DocVQA/validation-00000-of-00001.parquet", rows, schema)
    decoy = [{**rows[0], "questionId": "99999", "answers": ["decoy"]}]
    s.add("DocVQA/test-00000-of-00001.parquet", decoy, schema)  # another split
    s.add("InfographicVQA/validation-00000-of-00001.parquet", decoy, schema)  # another config
    return s


def _textvqa(n: int) -> Spec:
    schema = pa.schema([("image_id", pa.string()), ("question_id", pa.int64()), ("question", pa.string()),
                        ("question_tokens", STRINGS), ("image", IMAGE), ("image_width", pa.int64()),
                        ("image_height", pa.int64()), ("answers", STRINGS), ("ocr_tokens", STRINGS),
                        ("set_name", pa.string())])
    s, rows = Spec(), []
    for i in range(n):
        q = "what is the brand of this camera?" if i == 0 else f"what number is on shirt {i}?"
        gold = "dakota" if i == 0 else str(10 + i)
        answers = [gold] * 7 + ([f"{gold} digital"] * 3 if i == 0 else ["unanswerable"] * 3)
        rows.append({"image_id": f"img{i}", "question_id": 34602 + i, "question": q, "question_tokens": q.split(),
                     "image": png(10 + i), "image_width": 20, "image_height": 14, "answers": answers,
                     "ocr_tokens": [gold], "set_name": "val"})
        s.gold[str(34602 + i)], s.images[str(34602 + i)] = gold, 1
    s.add("data/validation-00000-of-00001.parquet", rows, schema)
    s.add("data/train-00000-of-00001.parquet", [{**rows[0], "question_id": 1}], schema)
    return s


def _chartqa(n: int) -> Spec:
    schema = pa.schema([("type", pa.string()), ("question", pa.string()), ("answer", pa.string()),
                        ("image", IMAGE)])
    s, rows = Spec(), []
    for i in range(n):
        q = "What is the value of the largest bar?" if i == 0 else f"How many bars exceed {i}?"
        answer = "42" if i == 0 else str(i + 1)
        rows.append({"type": _pick(i, ["human_test", "augmented_test"]), "question": q, "answer": answer,
                     "image": png(20 + i)})
        s.gold[str(i)], s.images[str(i)] = answer, 1
    s.add("data/test-00000-of-00001.parquet", rows, schema)
    s.add("data/val-00000-of-00001.parquet", rows[:1], schema)
    return s


def _ocrbench(n: int) -> Spec:
    schema = pa.schema([("dataset", pa.string()), ("question", pa.string()), ("question_type", pa.string()),
                        ("answer", STRINGS), ("image", IMAGE)])
    kinds = [("IIIT5K", "what is written in the image?", "Regular Text Recognition", ["CENTRE"]),
             ("HME100k", "Please write out the expression of the formula in the image using LaTeX format.",
              "Handwritten Mathematical Expression Recognition", ["x ^ { 2 } + 1"]),
             ("docVQA", "What is the percentage shown?", "Doc-oriented VQA", ["12%", "12 %"])]
    s, rows = Spec(), []
    for i in range(n):
        ds, q, qt, ans = _pick(i, kinds)
        rows.append({"dataset": ds, "question": q, "question_type": qt, "answer": ans, "image": png(30 + i)})
        s.gold[str(i)], s.images[str(i)] = ans[0], 1
    s.add("data/test-00000-of-00001.parquet", rows, schema)
    return s


def _ai2d(n: int) -> Spec:
    schema = pa.schema([("question", pa.string()), ("options", STRINGS), ("answer", pa.string()),
                        ("image", IMAGE)])
    s, rows = Spec(), []
    for i in range(n):
        if i == 0:
            q, opts, ans = "Which of these is a producer?", ["fox", "grass", "hawk", "snake"], 1
        else:
            q, opts, ans = f"Which label marks stage {i}?", ["A", "B", "C", "D"], i % 4
        rows.append({"question": q, "options": opts, "answer": str(ans), "image": png(40 + i)})
        s.gold[str(i)], s.images[str(i)] = LETTERS[ans], 1
    s.add("data/test-00000-of-00001.parquet", rows, schema)
    return s


def _scienceqa(n: int) -> Spec:
    schema = pa.schema([("image", IMAGE), ("question", pa.string()), ("choices", STRINGS), ("answer", pa.int64()),
                        ("hint", pa.string()), ("task", pa.string()), ("grade", pa.string()),
                        ("subject", pa.string()), ("topic", pa.string()), ("category", pa.string()),
                        ("skill", pa.string()), ("lecture", pa.string()), ("solution", pa.string())])
    s, rows = Spec(), []
    for i in range(n):
        if i == 0:
            hint, q = "Figure: United States map.", "Which of these states is farthest north?"
            choices, ans = ["West Virginia", "Louisiana", "Arizona", "Oklahoma"], 0
        else:
            hint, q = ("" if i % 2 else f"Context {i}."), f"Which tool is used in step {i}?"
            choices, ans = ["hammer", "saw", "drill"], i % 3
        rows.append({"image": png(50 + i), "question": q, "choices": choices, "answer": ans, "hint": hint,
                     "task": "closed choice", "grade": "grade5", "subject": "social science",
                     "topic": "geography", "category": "Geography", "skill": "Read a map: cardinal directions",
                     "lecture": "", "solution": ""})
        s.gold[str(i)], s.images[str(i)] = LETTERS[ans], 1
    s.add("ScienceQA-IMG/test-00000-of-00001.parquet", rows, schema)
    s.add("ScienceQA-FULL/test-00000-of-00001.parquet", rows[:1], schema)
    return s


_MMMU_IMAGE_COLUMNS = [f"image_{k}" for k in range(1, 8)]


def _mmmu(n: int) -> Spec:
    schema = pa.schema([("id", pa.string()), ("question", pa.string()), ("options", pa.string()),
                        ("explanation", pa.string()), *[(c, IMAGE) for c in _MMMU_IMAGE_COLUMNS],
                        ("img_type", pa.string()), ("answer", pa.string()), ("topic_difficulty", pa.string()),
                        ("question_type", pa.string()), ("subfield", pa.string())])
    # (question, options, answer, question_type, images): the four layouts the prompt builder handles
    patterns = [
        ("<image 1> What is shown in <image 2>?", ["cat", "dog"], "B", "multiple-choice", 2),
        ("What is the total cost?", ["$6", "$7", "$8", "$9"], "C", "multiple-choice", 1),
        ("<image 1> How many apples are there?", [], "7", "open", 1),
        ("Which image shows a triangle?", ["<image 1>", "<image 2>", "<image 3>"], "C", "multiple-choice", 3),
    ]
    s = Spec()
    half = (n + 1) // 2
    for subject, idx in (("Accounting", range(half)), ("Art_Theory", range(half, n))):
        rows = []
        for k, i in enumerate(idx, 1):
            q, opts, ans, qt, n_img = _pick(i, patterns)
            rid = f"validation_{subject}_{k}"
            row = {"id": rid, "question": q, "options": repr(opts), "explanation": "",
                   "img_type": "['Diagrams']", "answer": ans, "topic_difficulty": "Medium", "question_type": qt,
                   "subfield": subject}
            for c, col in enumerate(_MMMU_IMAGE_COLUMNS):
                row[col] = png(60 + 7 * i + c) if c < n_img else None
            rows.append(row)
            s.gold[rid], s.images[rid] = ans, n_img
        if rows:
            s.add(f"{subject}/validation-00000-of-00001.parquet", rows, schema)
    dev = {**s.files["Accounting/validation-00000-of-00001.parquet"][0], "id": "dev_Accounting_1"}
    s.add("Accounting/dev-00000-of-00001.parquet", [dev], schema)
    return s


_MMSTAR_META = pa.struct([("source", pa.string()), ("split", pa.string()), ("image_path", pa.string())])


def _mmstar(n: int) -> Spec:
    schema = pa.schema([("index", pa.int64()), ("question", pa.string()), ("image", IMAGE), ("answer", pa.string()),
                        ("category", pa.string()), ("l2_category", pa.string()), ("meta_info", _MMSTAR_META)])
    s, rows = Spec(), []
    for i in range(n):
        if i == 0:
            q = ("Which option describe the object relationship in the image correctly?\nOptions: "
                 "A: The suitcase is on the book., B: The suitcase is beneath the cat., "
                 "C: The suitcase is beneath the bed., D: The suitcase is beneath the book.")
            ans, cat = "A", "coarse perception"
        elif i == 1:  # an option with commas in it
            q, ans, cat = "How many apples are on the table?\nOptions: A: 1, 2 or 3, B: 4, C: 5, D: 6", "B", "math"
        else:
            q = f"What colour is object {i}?\nOptions: A: red, B: green, C: blue, D: white"
            ans, cat = LETTERS[i % 4], "fine-grained perception"
        rows.append({"index": i, "question": q, "image": png(120 + i), "answer": ans, "category": cat,
                     "l2_category": "image scene and topic",
                     "meta_info": {"source": "MMBench", "split": "val", "image_path": f"images/{i}.jpg"}})
        s.gold[str(i)], s.images[str(i)] = ans, 1
    s.add("mmstar.parquet", rows, schema)
    return s


_MATHVISTA_META = pa.struct([("category", pa.string()), ("context", pa.string()), ("grade", pa.string()),
                             ("img_height", pa.int64()), ("img_width", pa.int64()), ("language", pa.string()),
                             ("skills", STRINGS), ("source", pa.string()), ("split", pa.string()),
                             ("task", pa.string())])


def _mathvista(n: int) -> Spec:
    schema = pa.schema([("pid", pa.string()), ("question", pa.string()), ("image", pa.string()),
                        ("decoded_image", IMAGE), ("choices", STRINGS), ("unit", pa.string()),
                        ("precision", pa.float64()), ("answer", pa.string()), ("question_type", pa.string()),
                        ("answer_type", pa.string()), ("metadata", _MATHVISTA_META), ("query", pa.string())])
    kinds = [
        ("Which number is larger?", ["1.5", "2.5"], None, None, "2.5", "multi_choice", "text",
         "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.\n"
         "Question: Which number is larger?\nChoices:\n(A) 1.5\n(B) 2.5", "figure question answering"),
        ("How many cubes are there?", None, None, None, "7", "free_form", "integer",
         "Hint: Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, "
         "3, at the end.\nQuestion: How many cubes are there?", "math word problem"),
        ("What is the length of the line?", None, "cm", 1.0, "3.5", "free_form", "float",
         "Hint: Please answer the question requiring a floating-point number with one decimal place and provide "
         "the final value, e.g., 1.2, 1.3, 1.4, at the end.\nQuestion: What is the length of the line? (Unit: cm)",
         "geometry problem solving"),
    ]
    s, rows = Spec(), []
    for i in range(n):
        q, choices, unit, prec, ans, qt, at, query, task = _pick(i, kinds)
        pid = str(i + 1)
        rows.append({"pid": pid, "question": q, "image": f"images/{pid}.jpg", "decoded_image": png(140 + i),
                     "choices": choices, "unit": unit, "precision": prec, "answer": ans, "question_type": qt,
                     "answer_type": at, "query": query,
                     "metadata": {"category": "math-targeted-vqa", "context": "synthetic scene", "grade": "daily life",
                                  "img_height": 14, "img_width": 20, "language": "english",
                                  "skills": ["arithmetic reasoning"], "source": "fixture", "split": "testmini",
                                  "task": task}})
        s.gold[pid], s.images[pid] = ans, 1
    s.add("data/testmini-00000-of-00001-725687bf7a18d64b.parquet", rows, schema)
    s.add("data/test-00000-of-00002-6b81bd7f7e2065e6.parquet", [{**rows[0], "pid": "1001"}], schema)
    s.add("annot_testmini.json", [{"pid": "1"}])  # a root JSON of the repo that is not a split file
    return s


# -- video benchmarks ------------------------------------------------------------------------------------
def _videomme(n: int) -> Spec:
    schema = pa.schema([("video_id", pa.string()), ("duration", pa.string()), ("domain", pa.string()),
                        ("sub_category", pa.string()), ("url", pa.string()), ("videoID", pa.string()),
                        ("question_id", pa.string()), ("task_type", pa.string()), ("question", pa.string()),
                        ("options", STRINGS), ("answer", pa.string())])
    s, rows = Spec(), []
    for i in range(n):
        k = i // 3
        vid = f"yt{k:02d}AbCdEfG"
        q = "How many red balls appear in the video?" if i == 0 else f"What happens in scene {i}?"
        opts = ["A. One.", "B. Two.", "C. Three.", "D. Four."] if i == 0 else \
            [f"A. Event {i}a.", f"B. Event {i}b.", f"C. Event {i}c.", f"D. Event {i}d."]
        ans = "C" if i == 0 else LETTERS[i % 4]
        qid = f"{k + 1:03d}-{i % 3 + 1}"
        rows.append({"video_id": f"{k + 1:03d}", "duration": _pick(k, ["short", "medium", "long"]),
                     "domain": "Knowledge", "sub_category": "Humanity & History", "url": f"https://youtu.be/{vid}",
                     "videoID": vid, "question_id": qid, "task_type": "Counting Problem", "question": q,
                     "options": opts, "answer": ans})
        s.gold[qid], s.images[qid] = ans, 0
        s.videos[f"data/{vid}.mp4"] = 200 + k  # lmms-eval's unzipped layout
    s.add("videomme/test-00000-of-00001.parquet", rows, schema)
    return s


def _mvbench(n: int) -> Spec:
    s = Spec()
    half = (n + 1) // 2
    antonym, shuffle = [], []
    for i in range(n):
        if i < half:  # annotation says .webm (the main branch), lmms-eval's folder holds .mp4 files
            cands = ["Pushing something from left to right", "Pulling something from right to left", "Not sure"]
            rec = {"video": f"{166583 + i}.webm", "candidates": cands, "answer": cands[i % 3],
                   "question": "What is the action performed by the person in the video?"}
            antonym.append(rec)
            rid, gold = f"action_antonym/{i}", LETTERS[i % 3]
            s.videos[f"ssv2_video_mp4/{166583 + i}.mp4"] = 300 + i
        else:
            cands = ["the left cup", "the middle cup", "the right cup"]
            rec = {"video": f"video_{i}.mp4", "question": "Where is the ball at the end?",
                   "candidates": cands, "answer": cands[(i + 1) % 3]}
            shuffle.append(rec)
            rid, gold = f"object_shuffle/{i}", LETTERS[(i + 1) % 3]
            s.videos[f"perception/videos/video_{i}.mp4"] = 300 + i
        s.gold[rid], s.images[rid] = gold, 0
    s.add("json/action_antonym.json", antonym)
    if shuffle:
        s.add("json/object_shuffle.json", shuffle)
    return s


def _mlvu(n: int) -> Spec:
    s = Spec()
    half = (n + 1) // 2
    files: dict[str, list[dict[str, Any]]] = {"1_plotQA": [], "3_ego": []}
    for i in range(n):
        stem = "1_plotQA" if i < half else "3_ego"
        if i == 0:
            q, cands = "What color is the main male character in the video?", ["Yellow", "Red", "Green", "Blue"]
            ans = "Yellow"
        else:
            q, cands = f"What did I put in the drawer in clip {i}?", ["keys", "phone", "wallet", "book"]
            ans = cands[i % 4]
        video = f"{stem.split('_', 1)[1]}_{i}.mp4"
        files[stem].append({"video": video, "duration": 200 + i, "question": q, "candidates": cands,
                            "answer": ans, "question_type": stem.split("_", 1)[1]})
        rid = f"{stem}/{i}"
        s.gold[rid], s.images[rid] = LETTERS[cands.index(ans)], 0
        s.videos[f"MLVU/video/{stem}/{video}"] = 400 + i  # VK's layout under the snapshot root
    for stem, recs in files.items():
        if recs:
            s.add(f"MLVU/json/{stem}.json", recs)
    return s


SPECS: dict[str, Callable[[int], Spec]] = {
    "docvqa": _docvqa, "textvqa": _textvqa, "chartqa": _chartqa, "ocrbench": _ocrbench, "ai2d": _ai2d,
    "scienceqa": _scienceqa, "mmmu": _mmmu, "mmstar": _mmstar, "mathvista": _mathvista,
    "videomme": _videomme, "mvbench": _mvbench, "mlvu": _mlvu,
}
VIDEO_TASKS = ("videomme", "mvbench", "mlvu")


def gold(name: str, n: int = 6) -> dict[str, str]:
    """Row id -> a prediction the reference scorer counts as correct, in split order."""
    return dict(SPECS[name](n).gold)


def n_images(name: str, n: int = 6) -> dict[str, int]:
    """Row id -> number of images in the row (0 for video rows)."""
    return dict(SPECS[name](n).images)


def _write(folder: Path, name: str, n: int, media: Path | None = None) -> Path:
    spec = SPECS[name](n)
    root = Path(folder) / name
    for rel, rows in spec.files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".parquet"):
            pq.write_table(pa.Table.from_pylist(rows, schema=spec.schemas[rel]), path)
        else:
            path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    if spec.videos:
        from tests._video_fixtures import encode_video

        assert media is not None
        for rel, seed in spec.videos.items():
            path = media / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                encode_video(path, codec="mpeg4", num_frames=6 + seed % 4, fps=3, width=32, height=24)
    return root


def write_docvqa(folder: Path, n: int = 6) -> Path:
    """``docvqa/DocVQA/validation-00000-of-00001.parquet`` (+ a test split and an InfographicVQA decoy)."""
    return _write(folder, "docvqa", n)


def write_textvqa(folder: Path, n: int = 6) -> Path:
    """``textvqa/data/validation-00000-of-00001.parquet`` (+ a train decoy)."""
    return _write(folder, "textvqa", n)


def write_chartqa(folder: Path, n: int = 6) -> Path:
    """``chartqa/data/test-00000-of-00001.parquet`` (+ a val decoy)."""
    return _write(folder, "chartqa", n)


def write_ocrbench(folder: Path, n: int = 6) -> Path:
    """``ocrbench/data/test-00000-of-00001.parquet``."""
    return _write(folder, "ocrbench", n)


def write_ai2d(folder: Path, n: int = 6) -> Path:
    """``ai2d/data/test-00000-of-00001.parquet``."""
    return _write(folder, "ai2d", n)


def write_scienceqa(folder: Path, n: int = 6) -> Path:
    """``scienceqa/ScienceQA-IMG/test-00000-of-00001.parquet`` (+ a ScienceQA-FULL decoy)."""
    return _write(folder, "scienceqa", n)


def write_mmmu(folder: Path, n: int = 6) -> Path:
    """``mmmu/{Accounting,Art_Theory}/validation-00000-of-00001.parquet`` (+ a dev decoy); rows with 1-3
    images, ``<image k>`` markers in question or options, one open question."""
    return _write(folder, "mmmu", n)


def write_mmstar(folder: Path, n: int = 6) -> Path:
    """``mmstar/mmstar.parquet`` (the val split, as the hub repo ships it)."""
    return _write(folder, "mmstar", n)


def write_mathvista(folder: Path, n: int = 6) -> Path:
    """``mathvista/data/testmini-00000-of-00001-<hash>.parquet`` (+ a test decoy and ``annot_testmini.json``)."""
    return _write(folder, "mathvista", n)


def write_videomme(folder: Path, n: int = 6) -> tuple[Path, Path]:
    """``videomme/videomme/test-00000-of-00001.parquet``; videos ``videomme_media/data/<videoID>.mp4``
    (three questions per video). Returns ``(data, media)``."""
    media = Path(folder) / "videomme_media"
    return _write(folder, "videomme", n, media), media


def write_mvbench(folder: Path, n: int = 6) -> tuple[Path, Path]:
    """``mvbench/json/{action_antonym,object_shuffle}.json``; videos in lmms-eval's folders under
    ``mvbench_media/`` (``ssv2_video_mp4/<id>.mp4`` for annotations naming ``<id>.webm``,
    ``perception/videos/``). Returns ``(data, media)``."""
    media = Path(folder) / "mvbench_media"
    return _write(folder, "mvbench", n, media), media


def write_mlvu(folder: Path, n: int = 6) -> tuple[Path, Path]:
    """``mlvu/MLVU/json/{1_plotQA,3_ego}.json`` and the videos at ``mlvu/MLVU/video/<stem>/<video>``
    (VK's snapshot layout): data and media are both the ``mlvu`` folder. Returns ``(data, media)``."""
    root = Path(folder) / "mlvu"
    return _write(folder, "mlvu", n, root), root


WRITERS: dict[str, Callable[..., Any]] = {
    "docvqa": write_docvqa, "textvqa": write_textvqa, "chartqa": write_chartqa, "ocrbench": write_ocrbench,
    "ai2d": write_ai2d, "scienceqa": write_scienceqa, "mmmu": write_mmmu, "mmstar": write_mmstar,
    "mathvista": write_mathvista, "videomme": write_videomme, "mvbench": write_mvbench, "mlvu": write_mlvu,
}
