"""Tests of the Modality-Following / MC² loader (modality_circuits.data.mc2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from modality_circuits.data.mc2 import image_candidates, load_mc2, materialize, save_mc2
from modality_circuits.data.sample import CONSTRAINTS, INSTRUCTION_IMAGE, INSTRUCTION_TEXT, Sample
from modality_circuits.errors import AnswerError, DataFormatError, ModalityCircuitsError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MC2 = FIXTURES / "mc2_small.json"
COCO = FIXTURES / "coco"
SHARED = Path(__file__).resolve().parents[2].parent / "shared/data/modality-following"
SHARED_FILES = {  # file -> (instruction, number of records per the folder's README)
    "v3_following_vision_open_ended_qwen_vl_2_5_7b_remaining.json": ("image", 842),
    "v3_following_text_open_ended_qwen_vl_2_5_7b_remaining.json": ("text", 842),
    "v3_following_vision_open_ended_llava-v1.5-7b_remaining.json": ("image", 896),
    "v3_following_vision_open_ended_internvl_3_8b_remaining.json": ("image", 842),
}


def _records() -> list[dict]:
    return json.loads(MC2.read_text(encoding="utf-8"))


def _write(tmp_path: Path, records) -> Path:
    p = tmp_path / "data.json"
    p.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return p


# --- the fixture -------------------------------------------------------------------------------------------


def test_fixture_parses_text_only():
    samples = load_mc2(MC2, images=None)
    assert len(samples) == 6
    assert all(isinstance(s, Sample) and s.kind == "conflict" and s.image is None for s in samples)
    assert [s.follow for s in samples] == ["image", "text"] * 3
    s = samples[0]
    assert s.id == "000000384338:0"
    assert s.meta == {"index": 0, "source": str(MC2), "question": 3, "image_id": "000000384338",
                      "image_path": None}
    assert (s.task, s.answer_img, s.answer_text) == ("activity_recognition", "standing", "walking")
    assert s.answer_img_candidates == ["stand", "站立", "站着"]
    assert s.following_candidates()[:2] == ["standing", "stand"]
    assert samples[1].following_answer == samples[1].answer_text  # text-following record
    assert any(any(not c.isascii() for c in s.answer_img_candidates) for s in samples)  # Chinese synonyms


@pytest.mark.parametrize("question", [1, 2, 3])
def test_segments_split_exactly(question):
    records = _records()
    samples = load_mc2(MC2, images=None, question=question)
    for rec, s in zip(records, samples):
        instruction, q, fmt = rec[f"question{question}"].split("\n")
        segs = s.segments()
        assert [g.name for g in segs] == ["context", "instruction", "question", "constraint"]
        assert segs[0].text == "Text context: " + rec["context"]
        assert s.context == rec["context"]
        assert segs[1].text == instruction in (INSTRUCTION_IMAGE, INSTRUCTION_TEXT)
        assert segs[2].text == q
        assert segs[3].text == fmt.rstrip() == CONSTRAINTS[question - 1]
        assert s.follow == ("image" if instruction == INSTRUCTION_IMAGE else "text")
    expected = ("The answer is", "Answer the question using a single word or phrase. The answer is",
                "Answer the question using a single word or phrase.")
    assert samples[0].constraint == expected[question - 1]


def test_raw_context_kept(tmp_path):
    recs = _records()[:1]
    recs[0]["context"] = " A context with a leading and trailing space. "
    s = load_mc2(_write(tmp_path, recs), images=None)[0]
    assert s.context == " A context with a leading and trailing space. "
    assert s.segments()[0].text == "Text context:  A context with a leading and trailing space. "


def test_follow_must_agree():
    assert len(load_mc2(MC2, images=None, follow="image", limit=1)) == 1
    with pytest.raises(DataFormatError, match=r"record 1: field 'question3' instructs to follow the text"):
        load_mc2(MC2, images=None, follow="image")
    with pytest.raises(DataFormatError, match=r"record 0: .*follow='text'"):
        load_mc2(MC2, images=None, follow="text")


@pytest.mark.parametrize("kwargs", [{"question": 4}, {"question": 0}, {"follow": "vision"}, {"limit": -1}])
def test_bad_arguments(kwargs):
    with pytest.raises(ModalityCircuitsError):
        load_mc2(MC2, images=None, **kwargs)


def test_limit():
    assert [s.meta["index"] for s in load_mc2(MC2, images=None, limit=2)] == [0, 1]
    assert load_mc2(MC2, images=None, limit=0) == []


# --- images ------------------------------------------------------------------------------------------------


def test_images_resolved_from_val_and_train_names():
    samples = load_mc2(MC2, images=COCO)
    names = [Path(s.meta["image_path"]).name for s in samples]
    assert names[0] == "COCO_val2014_000000384338.jpg"
    assert names[5] == "COCO_train2014_000000120509.jpg"
    assert {n.split("_")[1] for n in names} == {"val2014", "train2014"}
    # lazy (default): Sample.image holds the resolved path; materialize opens copies
    assert all(isinstance(s.image, Path) and s.image.is_file() for s in samples)
    opened = materialize(samples[:2])
    assert all(isinstance(s.image, Image.Image) and s.image.mode == "RGB" and s.image.size == (8, 8)
               for s in opened)
    assert isinstance(samples[0].image, Path)  # inputs untouched
    assert materialize(opened)[0] is opened[0]  # already materialized: unchanged
    assert [g.name for g in opened[0].segments()][:2] == ["image", "context"]


def test_images_eager():
    samples = load_mc2(MC2, images=str(COCO), lazy_images=False)
    assert all(isinstance(s.image, Image.Image) and s.image.mode == "RGB" for s in samples)
    assert samples[0].meta["image_path"].endswith("COCO_val2014_000000384338.jpg")


def test_images_in_subfolders_and_plain_names(tmp_path):
    (tmp_path / "val2014").mkdir()
    (tmp_path / "train2014").mkdir()
    ids = [r["image_id"] for r in _records()]
    shutil.copy(COCO / f"COCO_val2014_{ids[0]}.jpg", tmp_path / "val2014")
    shutil.copy(COCO / f"COCO_train2014_{ids[5]}.jpg", tmp_path / "train2014")
    for i in ids[1:5]:
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.jpg")
    samples = load_mc2(MC2, images=tmp_path)
    got = [Path(s.meta["image_path"]).relative_to(tmp_path).as_posix() for s in samples]
    assert got[0] == f"val2014/COCO_val2014_{ids[0]}.jpg"
    assert got[5] == f"train2014/COCO_train2014_{ids[5]}.jpg"
    assert got[1:5] == [f"{i}.jpg" for i in ids[1:5]]


def test_missing_image_names_paths_tried(tmp_path):
    shutil.copytree(COCO, tmp_path / "coco")
    (tmp_path / "coco" / "COCO_val2014_000000173959.jpg").unlink()  # record 1 of the fixture
    with pytest.raises(DataFormatError) as e:
        load_mc2(MC2, images=tmp_path / "coco")
    msg = str(e.value)
    assert "'000000173959'" in msg and "record 1 of mc2_small.json" in msg
    for p in image_candidates(tmp_path / "coco", "000000173959"):
        assert str(p) in msg
    assert "--images" in msg and "COCO 2014" in msg


def test_missing_images_counted_and_missing_folder(tmp_path):
    with pytest.raises(DataFormatError, match=r"'000000384338' \(record 0 .*\) not found \(5 other image"):
        load_mc2(MC2, images=tmp_path)
    with pytest.raises(DataFormatError, match="Image folder not found"):
        load_mc2(MC2, images=tmp_path / "nope")


# --- malformed data ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["image_id", "task", "context", "answer_img", "answer_text", "question3",
                                   "question1", "answer_img_candidate_list", "answer_text_candidate_list"])
def test_missing_field_names_record_and_field(tmp_path, field):
    recs = _records()
    del recs[3][field]
    with pytest.raises(DataFormatError, match=rf"record 3: missing field '{field}'"):
        load_mc2(_write(tmp_path, recs), images=None)


@pytest.mark.parametrize("field, value, pattern", [
    ("context", 7, r"record 4: field 'context' must be a str, got int"),
    ("image_id", 384338, r"record 4: field 'image_id' must be a str, got int"),
    ("answer_img_candidate_list", "stand", r"record 4: field 'answer_img_candidate_list' must be a list"),
    ("answer_text_candidate_list", ["walk", 2], r"record 4: field 'answer_text_candidate_list'\[1\] must be a str"),
    ("question3", "What is it?\nThe answer is", r"record 4: field 'question3' must have 3 lines.* it has 2"),
    ("question3", "a\nb\nc\nd", r"record 4: field 'question3' must have 3 lines.* it has 4"),
    ("question3", "Rely on the image.\nWhat is it?\nThe answer is ",
     r"record 4: field 'question3' line 1 is not a known modality instruction"),
    ("question3", INSTRUCTION_IMAGE + "\n \nThe answer is ", r"record 4: field 'question3' line 2 .* is empty"),
    ("context", "   ", r"record 4: field 'context' is empty"),
])
def test_malformed_field(tmp_path, field, value, pattern):
    recs = _records()
    recs[4][field] = value
    with pytest.raises(DataFormatError, match=pattern):
        load_mc2(_write(tmp_path, recs), images=None)


def test_malformed_file(tmp_path):
    with pytest.raises(DataFormatError, match="not found"):
        load_mc2(tmp_path / "absent.json", images=None)
    (tmp_path / "bad.json").write_text("[{", encoding="utf-8")
    with pytest.raises(DataFormatError, match="not valid JSON"):
        load_mc2(tmp_path / "bad.json", images=None)
    with pytest.raises(DataFormatError, match="top level must be a JSON list"):
        load_mc2(_write(tmp_path, {"data": []}), images=None)
    with pytest.raises(DataFormatError, match="record 1: must be a JSON object"):
        load_mc2(_write(tmp_path, [_records()[0], "x"]), images=None)


@pytest.mark.parametrize("img, txt", [("red", "red"), ("Red ", "red"), ("", "red")])
def test_identical_or_empty_answers_raise_answer_error(tmp_path, img, txt):
    recs = _records()
    recs[2]["answer_img"], recs[2]["answer_text"] = img, txt
    with pytest.raises(AnswerError, match="sample 2"):
        load_mc2(_write(tmp_path, recs), images=None)


# --- writing -----------------------------------------------------------------------------------------------


def test_save_round_trip_reproduces_fixture(tmp_path):
    samples = load_mc2(MC2, images=COCO)
    out = save_mc2(samples, tmp_path / "out" / "mc2.json")
    assert json.loads(out.read_text(encoding="utf-8")) == _records()
    for q in (1, 2, 3):
        a = load_mc2(MC2, images=None, question=q)
        b = load_mc2(out, images=None, question=q)
        assert [(s.segments(), s.follow, s.following_candidates(), s.competitor_candidates()) for s in a] == \
               [(s.segments(), s.follow, s.following_candidates(), s.competitor_candidates()) for s in b]


# --- the shared benchmark files ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SHARED_FILES))
def test_shared_files_parse(name):
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"shared data not present: {path}")
    follow, n = SHARED_FILES[name]
    questions = {}
    for q in (1, 2, 3):
        samples = load_mc2(path, images=None, question=q)
        assert len(samples) == n
        assert {s.follow for s in samples} == {follow}
        assert {s.constraint for s in samples} == {CONSTRAINTS[q - 1]}
        assert all(s.image is None and s.instruction and s.question for s in samples)
        questions[q] = [s.question for s in samples]
    assert questions[1] == questions[2] == questions[3]
    assert len(load_mc2(path, images=None, follow=follow, limit=5)) == 5
