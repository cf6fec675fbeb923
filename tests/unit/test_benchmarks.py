"""Benchmark definitions (``evaluation/benchmarks``) against tiny copies of the published layouts.

For every benchmark: the fixture's split files are found (and its decoy splits / configs are not),
every row builds an item whose media count matches the row, the reference has the scorer's schema
and can be built from the ``text_columns`` alone (the scoring-only read), ids are unique and match
the fixture's, and row 0 renders -- through the checkpoint's chat template -- to the string
VLMEvalKit's SmolVLM wrapper builds, written out below by hand from ``vlmeval/vlm/smolvlm.py`` and
the dataset classes' ``build_prompt``. Video prompts cannot be rendered exactly by the template;
``vk_to_template`` applies the three documented differences to VK's string first.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from smolvlm.evaluation import dataset_files
from smolvlm.evaluation.benchmarks import BENCHMARKS, BuildContext, get_benchmark
from smolvlm.processing.processor import SmolVLMProcessor
from tests import eval_fixtures as fx

NAMES = tuple(BENCHMARKS)
MCQ = ("ai2d", "scienceqa", "mmstar", "videomme", "mvbench", "mlvu")
INDEX_KEYED = ("chartqa", "ocrbench", "ai2d", "scienceqa", "mvbench", "mlvu")  # no id column in the rows
CHECKPOINT_KEYS = {"SmolVLM2-2.2B-Instruct", "SmolVLM-Instruct", "SmolVLM2-500M-Video-Instruct",
                   "SmolVLM2-256M-Video-Instruct"}

SPLIT_FILES = {
    "docvqa": ["DocVQA/validation-00000-of-00001.parquet"],
    "textvqa": ["data/validation-00000-of-00001.parquet"],
    "chartqa": ["data/test-00000-of-00001.parquet"],
    "ocrbench": ["data/test-00000-of-00001.parquet"],
    "ai2d": ["data/test-00000-of-00001.parquet"],
    "scienceqa": ["ScienceQA-IMG/test-00000-of-00001.parquet"],
    "mmmu": ["Accounting/validation-00000-of-00001.parquet", "Art_Theory/validation-00000-of-00001.parquet"],
    "mmstar": ["mmstar.parquet"],
    "mathvista": ["data/testmini-00000-of-00001-725687bf7a18d64b.parquet"],
    "videomme": ["videomme/test-00000-of-00001.parquet"],
    "mvbench": ["json/action_antonym.json", "json/object_shuffle.json"],
    "mlvu": ["MLVU/json/1_plotQA.json", "MLVU/json/3_ego.json"],
}

# Row 0 of each fixture as VLMEvalKit's SmolVLM2 wrapper prompts it (derived by hand from VK's code;
# the video ones with 2 frames where VK samples 8 / 64).
VK_PROMPTS = {
    "docvqa": (
        "<|im_start|>User:<image>Give a short and terse answer to the following question. Do not paraphrase or "
        "reformat the text you see in the image. Do not include any full stops. Just give the answer without "
        "additional explanation. Question: What is the date mentioned in this letter?\n"
        "Answer the question using a single word or phrase.<end_of_utterance>\nAssistant:"),
    "textvqa": (
        "<|im_start|>User:<image>Answer the following question about the image using as few words as possible. "
        "Follow these additional instructions:\n-Always answer a binary question with Yes or No.\n"
        "-When asked what time it is, reply with the time seen in the image.\n"
        "-Do not put any full stops at the end of the answer.\n-Do not put quotation marks around the answer.\n"
        "-An answer with one or two words is favorable.\n"
        "-Do not apply common sense knowledge. The answer can be found in the image.\n"
        "Question: what is the brand of this camera?\nAnswer the question using a single word or phrase."
        "<end_of_utterance>\nAssistant:"),
    "chartqa": (
        "<|im_start|>User:<image>For the question below, follow the following instructions:\n"
        "-The answer should contain as few words as possible.\n"
        "-Don't paraphrase or reformat the text you see in the image.\n"
        "-Answer a binary question with Yes or No.\n"
        "-When asked to give a numerical value, provide a number like 2 instead of Two.\n"
        "-If the final answer has two or more items, provide it in the list format like [1, 2].\n"
        "-When asked to give a ratio, give out the decimal value like 0.25 instead of 1:4.\n"
        "-When asked to give a percentage, give out the whole value like 17 instead of decimal like 0.17%.\n"
        "-Don't include any units in the answer.\n"
        "-Do not include any full stops at the end of the answer.\n"
        "-Try to include the full label from the graph when asked about an entity.\n"
        "Question: What is the value of the largest bar?\nAnswer the question using a single word or phrase."
        "<end_of_utterance>\nAssistant:"),
    "ocrbench": ("<|im_start|>User:<image>what is written in the image?\nGive a very brief answer."
                 "<end_of_utterance>\nAssistant:"),
    "ai2d": ("<|im_start|>User:<image>Question: Which of these is a producer?\nChoices:\nA. fox\nB. grass\nC. hawk\n"
             "D. snake\nAnswer with the letter.<end_of_utterance>\nAssistant: Answer:"),
    "scienceqa": ("<|im_start|>User:<image>Hint: Figure: United States map.\nQuestion: Which of these states is "
                  "farthest north?\nChoices:\nA. West Virginia\nB. Louisiana\nC. Arizona\nD. Oklahoma\n"
                  "Answer with the letter.<end_of_utterance>\nAssistant: Answer:"),
    "mmmu": ("<|im_start|>User: Question: <image 1>:<image>\n<image 2>:<image>\n <image 1> What is shown in "
             "<image 2> ?\nChoices:\nA. cat\nB. dog\nAnswer with the letter.<end_of_utterance>\nAssistant: Answer:"),
    "mmstar": ("<|im_start|>User:<image>Question: Which option describe the object relationship in the image "
               "correctly?\nChoices:\nA. The suitcase is on the book.\nB. The suitcase is beneath the cat.\n"
               "C. The suitcase is beneath the bed.\nD. The suitcase is beneath the book.\nAnswer with the letter."
               "<end_of_utterance>\nAssistant: Answer:"),
    "mathvista": ("<|im_start|>User:<image>Please answer the question and provide the correct option letter, e.g., "
                  "A, B, C, D, at the end.\nQuestion: Which number is larger?\nChoices:\nA. 1.5\nB. 2.5"
                  "<end_of_utterance>\nAssistant: Answer:"),
    "videomme": (
        "<|im_start|>System: pay attention to the video and answer the question <end_of_utterance>\n"
        " <|im_start|>User: Here are some frames sampled from a video:\n Frame from 00:00: <image> "
        "Frame from 00:01: <image> \n  These are the frames of a video. Select the best answer to the following "
        "multiple-choice question based on the video. Respond with only the letter (A, B, C, or D) of the correct "
        "option. Question: How many red balls appear in the video?\nA. One.\nB. Two.\nC. Three.\nD. Four.\n"
        "Answer: <end_of_utterance> \nAssistant:"),
    "mvbench": (
        "<|im_start|>System: Carefully watch the video and pay attention to the cause and sequence of events, the "
        "detail and movement of objects, and the action and pose of persons. Based on your observations, select "
        "the best option that accurately addresses the question.\n <end_of_utterance>\n <|im_start|>User: Here are "
        "some frames sampled from a video:\n Frame from 00:00: <image> Frame from 00:01: <image> \n Question: What "
        "is the action performed by the person in the video?\nrespond ONLY with one of the multiple choice letter "
        "options (A/B/C/D):\n(A) Pushing something from left to right\n(B) Pulling something from right to left\n"
        "(C) Not sure Only give the best option. Answer: <end_of_utterance> \nAssistant:"),
    "mlvu": (
        "<|im_start|>System: Carefully watch this video and pay attention to every detail. Based on your "
        "observations, select the best option that accurately addresses the question. <end_of_utterance>\n "
        "<|im_start|>User: Here are some frames sampled from a video:\n Frame from 00:00: <image> Frame from 00:01: "
        "<image> \n Question: What color is the main male character in the video?\nrespond ONLY with one of the "
        "multiple choice letter options (A/B/C/D):\n(A) Yellow\n(B) Red\n(C) Green\n(D) Blue Only give the best "
        "option. <end_of_utterance> \nAssistant:"),
}


def vk_to_template(vk: str) -> str:
    """The documented differences of a video prompt: the template opens ``<|im_start|>`` once and
    writes no join spaces around turn markers; the frames are one ``<video>`` item."""
    out = vk.replace("\n <|im_start|>User:", "\nUser:").replace("<end_of_utterance> \nAssistant:",
                                                                 "<end_of_utterance>\nAssistant:")
    return re.sub(r"Frame from \d\d:\d\d: <image>(?: Frame from \d\d:\d\d: <image>)*", "<video>", out)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, tuple[Path, Path | None]]:
    root = tmp_path_factory.mktemp("benchmarks")
    out = {}
    for name, write in fx.WRITERS.items():
        res = write(root)
        out[name] = res if isinstance(res, tuple) else (res, None)
    return out


@pytest.fixture(scope="module")
def proc256(ref256) -> SmolVLMProcessor:
    return SmolVLMProcessor.from_pretrained(ref256)


@pytest.fixture(scope="module")
def proc2b(ref2b) -> SmolVLMProcessor:
    return SmolVLMProcessor.from_pretrained(ref2b)


def _rows(name, written):
    bench = get_benchmark(name)
    data, media = written[name]
    files = dataset_files.find_files(data, bench.split, bench.hub_config)
    return bench, data, media, files, list(dataset_files.iter_rows(files))


def render(proc: SmolVLMProcessor, item) -> str:
    return proc.apply_chat_template(item.messages, add_generation_prompt=True) + item.answer_prefix


# -- registry ----------------------------------------------------------------------------------------------
def test_registry():
    assert NAMES == ("docvqa", "textvqa", "chartqa", "ocrbench", "ai2d", "scienceqa", "mmmu", "mmstar",
                     "mathvista", "videomme", "mvbench", "mlvu")
    for name in NAMES:
        bench = get_benchmark(name)
        assert bench.name == name and bench.media == ("video" if name in fx.VIDEO_TASKS else "image")
        assert set(bench.published) <= CHECKPOINT_KEYS and bench.published
        assert bench.max_new_tokens >= 16 and bench.notes and bench.hub_id.count("/") == 1
        assert "image" not in bench.text_columns and "decoded_image" not in bench.text_columns
    with pytest.raises(ValueError, match="unknown benchmark 'nope'; known: docvqa, textvqa"):
        get_benchmark("nope")
    assert get_benchmark("docvqa").published == {"SmolVLM2-2.2B-Instruct": 79.98, "SmolVLM-Instruct": 79.7}
    assert get_benchmark("mvbench").published["SmolVLM2-256M-Video-Instruct"] == 32.7
    assert {n: get_benchmark(n).max_new_tokens for n in NAMES} == {
        "docvqa": 32, "textvqa": 1024, "chartqa": 16, "ocrbench": 128, "ai2d": 16, "scienceqa": 16, "mmmu": 128,
        "mmstar": 1024, "mathvista": 2048, "videomme": 16, "mvbench": 16, "mlvu": 16}


# -- every row of every fixture ------------------------------------------------------------------------------
def _check_reference(name: str, ref: dict) -> None:
    if name in ("docvqa", "textvqa", "chartqa"):
        assert set(ref) == {"answers"} and ref["answers"] and all(isinstance(a, str) for a in ref["answers"])
        assert len(ref["answers"]) == {"textvqa": 10, "chartqa": 1}.get(name, len(ref["answers"]))
    elif name == "ocrbench":
        assert set(ref) == {"answers", "dataset", "question_type"}
        assert all(isinstance(ref[k], str) for k in ("dataset", "question_type")) and ref["answers"]
    elif name in MCQ:
        assert set(ref) == {"answer", "options"}
        letters = list(ref["options"])
        assert letters == [chr(ord("A") + i) for i in range(len(letters))] and len(letters) >= 2
        assert ref["answer"] in ref["options"] and all(isinstance(v, str) for v in ref["options"].values())
    elif name == "mmmu":
        assert set(ref) == {"question_type", "answer", "options"}
        assert ref["question_type"] in ("multiple-choice", "open") and isinstance(ref["answer"], str)
        assert (ref["options"] == {}) == (ref["question_type"] == "open")
    elif name == "mathvista":
        assert set(ref) == {"question_type", "answer_type", "answer", "choices", "precision", "unit"}
        assert ref["question_type"] in ("multi_choice", "free_form") and isinstance(ref["answer"], str)
        assert (ref["choices"] is not None) == (ref["question_type"] == "multi_choice")
        assert ref["precision"] is None or type(ref["precision"]) is int
        assert ref["unit"] is None or isinstance(ref["unit"], str)
    else:
        raise AssertionError(name)


@pytest.mark.parametrize("name", NAMES)
def test_fixture_rows(name, written):
    bench, data, media, files, rows = _rows(name, written)
    assert [f.relative_to(data).as_posix() for f in files] == SPLIT_FILES[name]
    dataset_files.check_columns(files, bench.text_columns)
    gold, n_img = fx.gold(name), fx.n_images(name)
    ids = [bench.row_id(row, index) for index, _, row in rows]
    assert ids == list(gold) and len(set(ids)) == len(ids)
    slim = {index: row for index, _, row in dataset_files.iter_rows(files, bench.text_columns)}
    for (index, _, row), rid in zip(rows, ids):
        item = bench.build(row, BuildContext(media=media))
        assert item.id == ("" if name in INDEX_KEYED else rid)
        content = [c for m in item.messages for c in m["content"]]
        assert sum(c["type"] == "image" for c in content) == n_img[rid]
        videos = [c for c in content if c["type"] == "video"]
        assert len(videos) == (1 if name in fx.VIDEO_TASKS else 0)
        assert all(Path(v["path"]).is_file() for v in videos)
        ref = bench.reference(row)
        _check_reference(name, ref)
        # the scoring-only read: text columns only (JSON rows come whole, with their _file)
        if files[0].suffix == ".parquet":
            assert set(slim[index]) == set(bench.text_columns)
        assert bench.reference(slim[index]) == ref
        assert bench.category(slim[index]) == bench.category(row)
        assert bench.row_id(slim[index], index) == rid
        # the fixture's gold is the reference's
        if name in MCQ or (name == "mmmu" and ref["question_type"] == "multiple-choice"):
            assert ref["answer"] == gold[rid]
        elif name in ("mmmu", "mathvista"):
            assert ref["answer"] == gold[rid]
        else:
            assert ref["answers"][0] == gold[rid]


def test_categories(written):
    def cats(name):
        bench, *_, rows = _rows(name, written)
        return [bench.category(row) for _, _, row in rows]

    assert cats("chartqa")[:2] == ["human_test", "augmented_test"]
    assert cats("ocrbench")[:2] == ["Regular Text Recognition", "Handwritten Mathematical Expression Recognition"]
    assert cats("mmmu") == ["Accounting"] * 3 + ["Art_Theory"] * 3
    assert cats("mmstar")[:2] == ["coarse perception", "math"]
    assert cats("mathvista")[:3] == ["figure question answering", "math word problem", "geometry problem solving"]
    assert cats("videomme") == ["short"] * 3 + ["medium"] * 3
    assert cats("mvbench") == ["Action Antonym"] * 3 + ["Object Shuffle"] * 3
    assert cats("mlvu") == ["plotQA"] * 3 + ["ego"] * 3
    assert set(cats("docvqa")) == {None}


@pytest.mark.parametrize("name", NAMES)
def test_vk_prompt_row0(name, written, proc256, proc2b):
    bench, data, media, files, rows = _rows(name, written)
    item = bench.build(rows[0][2], BuildContext(media=media))
    expected = VK_PROMPTS[name]
    if name in fx.VIDEO_TASKS:
        assert expected != vk_to_template(expected)
        expected = vk_to_template(expected)
    assert render(proc256, item) == expected
    assert render(proc2b, item) == expected  # SmolVLM2's template renders these turns the same way


def test_vk_prompts_other_layouts(written, proc256):
    """The prompt builders' other branches: MMMU without markers / open / images in the options,
    ScienceQA without a hint, MathVista free-form (no " Answer:"), MMStar options with commas."""
    def prompt(name, i):
        bench, data, media, files, rows = _rows(name, written)
        return render(proc256, bench.build(rows[i][2], BuildContext(media=media)))

    assert prompt("mmmu", 1) == ("<|im_start|>User: Question: <image 1>:<image>\n <image 1> What is the total cost?"
                                 "\nChoices:\nA. $6\nB. $7\nC. $8\nD. $9\nAnswer with the letter.<end_of_utterance>"
                                 "\nAssistant: Answer:")
    assert prompt("mmmu", 2) == ("<|im_start|>User: Question: <image 1>:<image>\n <image 1> How many apples are "
                                 "there?<end_of_utterance>\nAssistant:")
    assert prompt("mmmu", 3) == ("<|im_start|>User: Question: <image 1>:<image>\n<image 2>:<image>\n<image 3>:"
                                 "<image>\nWhich image shows a triangle?\nChoices:\nA. <image 1> B. <image 2> C. "
                                 "<image 3> Answer with the letter.<end_of_utterance>\nAssistant: Answer:")
    assert prompt("scienceqa", 1) == ("<|im_start|>User:<image>Question: Which tool is used in step 1?\nChoices:\n"
                                      "A. hammer\nB. saw\nC. drill\nAnswer with the letter.<end_of_utterance>\n"
                                      "Assistant: Answer:")
    assert prompt("mathvista", 2) == (
        "<|im_start|>User:<image>Please answer the question requiring a floating-point number with one decimal "
        "place and provide the final value, e.g., 1.2, 1.3, 1.4, at the end.\nQuestion: What is the length of the "
        "line? (Unit: cm)<end_of_utterance>\nAssistant:")
    assert prompt("mmstar", 1) == ("<|im_start|>User:<image>Question: How many apples are on the table?\nChoices:\n"
                                   "A. 1, 2 or 3\nB. 4\nC. 5\nD. 6\nAnswer with the letter.<end_of_utterance>\n"
                                   "Assistant: Answer:")


def test_gold_scores_one(written):
    """The fixtures' gold predictions score 1 with the benchmark's scorer (fixture <-> scorer contract)."""
    for name in NAMES:
        bench, *_, rows = _rows(name, written)
        gold = fx.gold(name)
        for index, _, row in rows:
            rid = bench.row_id(row, index)
            assert bench.score(gold[rid], bench.reference(row)) == 1.0, (name, rid, gold[rid])
            assert bench.score("", bench.reference(row)) == 0.0, (name, rid)


@pytest.mark.parametrize("name", NAMES)
def test_items_encode(name, written, proc256):
    """Row 0's item goes through the processor: images decode, the video file is sampled."""
    bench, data, media, files, rows = _rows(name, written)
    item = bench.build(rows[0][2], BuildContext(media=media))
    ids = proc256.apply_chat_template(item.messages, add_generation_prompt=True, tokenize=True)
    assert len(ids) > 20


# -- details -----------------------------------------------------------------------------------------------
def test_mmstar_split_question():
    from smolvlm.evaluation.benchmarks.mmstar import split_question

    assert split_question("Is it red?") == ("Is it red?", {})
    assert split_question("Q?\nOptions: A: x, B: y") == ("Q?", {"A": "x", "B": "y"})
    assert split_question("Q?\nOptions: A: 1, 2, B: 3, C: 4") == ("Q?", {"A": "1, 2", "B": "3", "C": "4"})
    assert split_question("Q?\nOptions: only one") == ("Q?\nOptions: only one", {})


def _video_of(item) -> str:
    return next(c["path"] for m in item.messages for c in m["content"] if c["type"] == "video")


def test_video_search_and_missing(written, tmp_path):
    (vm, row_vm), (mv, row_mv), (ml, row_ml) = ((get_benchmark(n), _rows(n, written)[4][0][2])
                                                for n in ("videomme", "mvbench", "mlvu"))
    with pytest.raises(FileNotFoundError, match="no --media folder"):
        vm.build(row_vm, BuildContext())
    with pytest.raises(FileNotFoundError, match=r"yt00AbCdEfG\): video not found; tried .*data/yt00AbCdEfG\.mp4"):
        vm.build(row_vm, BuildContext(media=tmp_path))
    with pytest.raises(FileNotFoundError, match=r"tried .*ssv2_video_mp4/166583\.webm.*ssv2_video/166583\.webm"):
        mv.build(row_mv, BuildContext(media=tmp_path))
    with pytest.raises(FileNotFoundError, match=r"tried .*MLVU/video/1_plotQA/plotQA_0\.mp4"):
        ml.build(row_ml, BuildContext(media=tmp_path))
    # VK's layouts: Video-MME unzipped to video/, MVBench's main branch under video/<folder>/; MLVU flat
    src = Path(_video_of(vm.build(row_vm, BuildContext(media=written["videomme"][1]))))
    media = tmp_path / "vk"
    found = {"videomme": (vm, row_vm, "video/yt00AbCdEfG.mp4"), "mvbench": (mv, row_mv, "video/ssv2_video/166583.webm"),
             "mlvu": (ml, row_ml, "plotQA_0.mp4")}
    for bench, row, rel in found.values():
        (media / rel).parent.mkdir(parents=True, exist_ok=True)
        (media / rel).write_bytes(src.read_bytes())
        assert _video_of(bench.build(row, BuildContext(media=media))) == str(media / rel)


def test_mlvu_open_ended_rows_refused(written):
    bench = get_benchmark("mlvu")
    row = {"video": "subPlot_1.mp4", "duration": 300, "question": "Describe the plot.", "answer": "A man walks.",
           "question_type": "subPlot", "_file": "/x/MLVU/json/8_sub_scene.json"}
    with pytest.raises(ValueError, match="open-ended task"):
        bench.build(row, BuildContext(media=written["mlvu"][1]))
    assert bench.reference(row) == {"answer": "", "options": {}}
    assert bench.category(row) == "sub_scene" and bench.row_id(row, 7) == "8_sub_scene/7"


def test_mathvista_reference_types():
    bench = get_benchmark("mathvista")
    row = {"pid": "9", "question_type": "free_form", "answer_type": "float", "answer": "1.25", "choices": None,
           "precision": 2.0, "unit": None, "metadata": {"task": "textbook question answering"}}
    assert bench.reference(row) == {"question_type": "free_form", "answer_type": "float", "answer": "1.25",
                                    "choices": None, "precision": 2, "unit": None}
    assert bench.category(row) == "textbook question answering"
