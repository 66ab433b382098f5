"""Loader (and writer) for the Modality-Following / MC² JSON format.

The format (EchoDreamer/Modality-Following, ``data/*.json``) is a JSON list of records with the fields
``image_id``, ``task``, ``context``, ``answer_img``, ``answer_text``, ``answer_img_candidate_list``,
``answer_text_candidate_list`` and ``question1``..``question3``; each ``questionK`` is three lines,
``{modality instruction}\\n{question}\\n{format sentence}``. :func:`load_mc2` turns the records into
:class:`~modality_circuits.data.sample.Sample` objects (``kind="conflict"``) whose instruction, question and
constraint segments are the three lines of the chosen ``questionK``, split exactly:

* the instruction must be one of the two sentences in :data:`~modality_circuits.data.sample.INSTRUCTIONS`
  and sets ``Sample.follow`` (``"image"`` / ``"text"``);
* the question is kept as given (surrounding whitespace stripped);
* the format sentence is kept as given minus trailing whitespace (``"The answer is "`` -> ``"The answer is"``);
  the chat template supplies the separators.

``Sample.context`` is the record's raw ``context`` (several benchmark contexts start or end with a space; they
are kept as the benchmark has them). :meth:`Sample.segments` adds the ``Text context: `` prefix.

Images are COCO 2014 photos named by ``image_id``, looked up in a folder the user gives (see
:func:`image_candidates` for the names tried). Paths are resolved when loading, so a missing photo fails at load
time with a :class:`~modality_circuits.errors.DataFormatError` naming every path tried. With
``lazy_images=True`` (the default, since ~900 decoded photos take ~1 GB) ``Sample.image`` holds the resolved
:class:`pathlib.Path`; call :func:`materialize` on the samples of a batch to get copies holding PIL images
before building prompts. With ``lazy_images=False`` the PIL images (RGB) are opened at once. ``images=None``
loads text only (``Sample.image is None``), for analyses that do not need the photos.

:func:`save_mc2` writes samples back in the same format (all three question variants), for round trips and
fixtures.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import DataFormatError, ModalityCircuitsError
from .sample import CONSTRAINTS, INSTRUCTIONS, Sample

logger = logging.getLogger(__name__)

#: Fields every record must have, with their JSON type.
FIELDS: dict[str, type] = {
    "image_id": str,
    "task": str,
    "context": str,
    "answer_img": str,
    "answer_text": str,
    "answer_img_candidate_list": list,
    "answer_text_candidate_list": list,
    "question1": str,
    "question2": str,
    "question3": str,
}

_FOLLOW_OF_INSTRUCTION = {sentence: follow for follow, sentence in INSTRUCTIONS.items()}


def image_candidates(images: str | Path, image_id: str) -> list[Path]:
    """The paths tried for ``image_id`` under the COCO 2014 folder ``images``, in order.

    ``COCO_val2014_{id}.jpg`` and ``COCO_train2014_{id}.jpg`` directly in the folder, then in its ``val2014/``
    and ``train2014/`` subfolders, then plain ``{id}.jpg``.
    """
    root = Path(images)
    return [
        root / f"COCO_val2014_{image_id}.jpg",
        root / f"COCO_train2014_{image_id}.jpg",
        root / "val2014" / f"COCO_val2014_{image_id}.jpg",
        root / "train2014" / f"COCO_train2014_{image_id}.jpg",
        root / f"{image_id}.jpg",
    ]


def resolve_image(images: str | Path, image_id: str) -> Path:
    """The first existing path of :func:`image_candidates`; :class:`DataFormatError` naming all of them if none."""
    tried = image_candidates(images, image_id)
    for p in tried:
        if p.is_file():
            return p
    raise DataFormatError(_missing_message(images, image_id, tried, n_missing=1))


def _missing_message(images: str | Path, image_id: str, tried: Sequence[Path], n_missing: int,
                     where: str = "") -> str:
    lines = "\n".join(f"  {p}" for p in tried)
    more = f" ({n_missing - 1} other image(s) are missing as well)" if n_missing > 1 else ""
    return (f"COCO image {image_id!r}{where} not found{more}; tried:\n{lines}\n"
            f"Pass --images (the `images` argument) pointing at the COCO 2014 folder holding "
            f"COCO_val2014_*.jpg / COCO_train2014_*.jpg (directly or in val2014/ and train2014/), or images=None "
            f"for a text-only analysis. Folder given: {Path(images)}")


def open_image(path: str | Path) -> Any:
    """Open an image file as an RGB PIL image (fully read, file closed)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def materialize(samples: Iterable[Sample]) -> list[Sample]:
    """Copies of ``samples`` whose path-valued ``image`` is replaced by the opened RGB PIL image.

    Samples whose image is already a PIL image (or ``None``) are returned unchanged. The inputs are not
    modified, so the decoded images live only as long as the returned list (materialize one batch at a time).
    """
    out = []
    for s in samples:
        if isinstance(s.image, (str, Path)):
            out.append(replace(s, image=open_image(s.image), meta=dict(s.meta)))
        else:
            out.append(s)
    return out


def _field(rec: dict, index: int, name: str, typ: type) -> Any:
    if name not in rec:
        raise DataFormatError(f"record {index}: missing field {name!r} (a record needs {', '.join(FIELDS)}).")
    value = rec[name]
    if not isinstance(value, typ):
        raise DataFormatError(f"record {index}: field {name!r} must be a {typ.__name__}, got "
                              f"{type(value).__name__} ({value!r:.80}).")
    return value


def _candidates(rec: dict, index: int, name: str) -> list[str]:
    values = _field(rec, index, name, list)
    for j, c in enumerate(values):
        if not isinstance(c, str):
            raise DataFormatError(f"record {index}: field {name!r}[{j}] must be a str, got "
                                  f"{type(c).__name__} ({c!r:.80}).")
    return list(values)


def split_question(text: str, index: int = 0, field: str = "question") -> tuple[str, str, str, str]:
    """Split ``{instruction}\\n{question}\\n{format sentence}`` into (follow, instruction, question, constraint).

    Raises :class:`DataFormatError` naming the record ``index`` and ``field`` if the text does not have three
    lines, the question is empty, or the instruction is not one of the two known sentences.
    """
    lines = text.split("\n")
    if len(lines) != 3:
        raise DataFormatError(f"record {index}: field {field!r} must have 3 lines (instruction, question, format "
                              f"sentence) separated by '\\n'; it has {len(lines)}: {text!r:.200}")
    instruction, question, constraint = lines[0].strip(), lines[1].strip(), lines[2].rstrip()
    if instruction not in _FOLLOW_OF_INSTRUCTION:
        known = " | ".join(repr(s) for s in INSTRUCTIONS.values())
        raise DataFormatError(f"record {index}: field {field!r} line 1 is not a known modality instruction: "
                              f"{lines[0]!r}. Expected one of: {known}")
    if not question:
        raise DataFormatError(f"record {index}: field {field!r} line 2 (the question) is empty.")
    return _FOLLOW_OF_INSTRUCTION[instruction], instruction, question, constraint


def parse_record(rec: Any, index: int, question: int = 3, follow: str | None = None,
                 source: str = "") -> Sample:
    """One JSON record -> a text-only :class:`Sample` (``image=None``); see :func:`load_mc2`."""
    if not isinstance(rec, dict):
        raise DataFormatError(f"record {index}: must be a JSON object, got {type(rec).__name__}.")
    values = {name: _field(rec, index, name, typ) for name, typ in FIELDS.items() if typ is str}
    image_id = values["image_id"].strip()
    if not image_id:
        raise DataFormatError(f"record {index}: field 'image_id' is empty.")
    if not values["context"].strip():
        raise DataFormatError(f"record {index}: field 'context' is empty.")
    qfield = f"question{question}"
    rec_follow, instruction, q, constraint = split_question(values[qfield], index, qfield)
    if follow is not None and follow != rec_follow:
        raise DataFormatError(f"record {index}: field {qfield!r} instructs to follow the {rec_follow}, but "
                              f"follow={follow!r} was passed. Pass follow=None to take it from the instruction, "
                              f"or load the file of the other instruction.")
    sample = Sample(
        image=None,
        context=values["context"],
        instruction=instruction,
        question=q,
        constraint=constraint or None,
        answer_img=values["answer_img"],
        answer_text=values["answer_text"],
        follow=rec_follow,
        task=values["task"],
        kind="conflict",
        answer_img_candidates=_candidates(rec, index, "answer_img_candidate_list"),
        answer_text_candidates=_candidates(rec, index, "answer_text_candidate_list"),
        id=f"{image_id}:{index}",
        meta={"index": index, "source": source, "question": question, "image_id": image_id, "image_path": None},
    )
    sample.check_answers(index)
    return sample


def load_mc2(
    json_path: str | Path,
    images: str | Path | None,
    question: int = 3,
    follow: str | None = None,
    limit: int | None = None,
    lazy_images: bool = True,
) -> list[Sample]:
    """Load a Modality-Following / MC² JSON file as conflict samples.

    Args:
        json_path: the JSON file (a list of records).
        images: the COCO 2014 image folder (see :func:`image_candidates`), or ``None`` for text-only samples.
        question: which variant to use, 1..3 (format sentence ``The answer is`` / ``Answer the question using a
            single word or phrase. The answer is`` / ``Answer the question using a single word or phrase.``).
        follow: ``"image"`` or ``"text"`` to assert every record's instruction; ``None`` takes it from each
            record's instruction.
        limit: load only the first ``limit`` records.
        lazy_images: keep resolved image paths in ``Sample.image`` (open them with :func:`materialize`) instead
            of opening every image now.

    Returns:
        Samples with ``id = f"{image_id}:{index}"`` and ``meta`` = ``index`` (record index), ``source`` (the
        file), ``question``, ``image_id``, ``image_path`` (``str`` or ``None``).

    Raises:
        DataFormatError: unreadable file, malformed record (message names the record index and field), a
            disagreeing ``follow``, or missing images (message names every path tried).
        AnswerError: a record whose two answers are empty or identical.
        ModalityCircuitsError: bad arguments.
    """
    if question not in (1, 2, 3):
        raise ModalityCircuitsError(f"question must be 1, 2 or 3 (the benchmark's format variants); got {question!r}.")
    if follow is not None and follow not in INSTRUCTIONS:
        raise ModalityCircuitsError(f"follow must be 'image', 'text' or None; got {follow!r}.")
    if limit is not None and limit < 0:
        raise ModalityCircuitsError(f"limit must be >= 0 or None; got {limit!r}.")
    path = Path(json_path)
    if not path.is_file():
        raise DataFormatError(f"MC² data file not found: {path}. Pass the path of a Modality-Following JSON file "
                              "(e.g. v3_following_vision_open_ended_llava-v1.5-7b_remaining.json).")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}).") from e
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: not UTF-8 text ({e}).") from e
    if not isinstance(records, list):
        raise DataFormatError(f"{path}: the top level must be a JSON list of records, got {type(records).__name__}.")
    if limit is not None:
        records = records[:limit]

    samples = [parse_record(rec, i, question=question, follow=follow, source=str(path))
               for i, rec in enumerate(records)]

    if images is not None:
        root = Path(images)
        if not root.is_dir():
            raise DataFormatError(f"Image folder not found: {root}. Pass --images (the `images` argument) pointing "
                                  "at the COCO 2014 folder, or images=None for a text-only analysis.")
        missing: list[tuple[Sample, list[Path]]] = []
        for s in samples:
            tried = image_candidates(root, s.meta["image_id"])
            found = next((p for p in tried if p.is_file()), None)
            if found is None:
                missing.append((s, tried))
            else:
                s.meta["image_path"] = str(found)
                s.image = found
        if missing:
            s, tried = missing[0]
            raise DataFormatError(_missing_message(root, s.meta["image_id"], tried, len(missing),
                                                   where=f" (record {s.meta['index']} of {path.name})"))
        if not lazy_images:
            for s in samples:
                s.image = open_image(s.image)

    unknown = sum(1 for s in samples if s.constraint not in CONSTRAINTS)
    if unknown:
        logger.warning("%s: %d record(s) use a format sentence outside the benchmark's three", path, unknown)
    logger.info("loaded %d MC² samples from %s (question%d, images=%s, lazy=%s)", len(samples), path, question,
                "none" if images is None else images, lazy_images)
    return samples


def _format_sentence(constraint: str) -> str:
    """The benchmark's spelling: sentences ending in ``The answer is`` carry a trailing space."""
    return constraint + " " if constraint.endswith("The answer is") else constraint


def to_record(sample: Sample) -> dict:
    """A sample as an MC² JSON record (``question1..3`` rebuilt with the benchmark's three format sentences)."""
    image_id = sample.meta.get("image_id") or sample.id.split(":")[0]
    if not image_id:
        raise DataFormatError(f"sample {sample.id or '?'}: no image_id; set meta['image_id'] or "
                              "id='{image_id}:{index}'.")
    instruction = sample.instruction or INSTRUCTIONS[sample.follow]
    rec: dict[str, Any] = {"image_id": image_id, "task": sample.task}
    for k, c in enumerate(CONSTRAINTS, start=1):
        rec[f"question{k}"] = f"{instruction}\n{sample.question}\n{_format_sentence(c)}"
    rec["answer_img_candidate_list"] = list(sample.answer_img_candidates)
    rec["answer_text_candidate_list"] = list(sample.answer_text_candidates)
    rec["answer_img"] = sample.answer_img
    rec["answer_text"] = sample.answer_text
    rec["context"] = sample.context if sample.context is not None else ""
    return rec


def save_mc2(samples: Iterable[Sample], path: str | Path) -> Path:
    """Write samples as an MC² JSON file (UTF-8, non-ASCII kept as is); returns the path.

    Each record gets all three ``questionK`` variants (the benchmark's format sentences), whatever the sample's
    own constraint; images are referred to by ``image_id`` only.
    """
    path = Path(path)
    records = [to_record(s) for s in samples]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    logger.info("wrote %d MC² records to %s", len(records), path)
    return path
