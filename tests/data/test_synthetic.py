"""The synthetic generator: seeded, balanced, and the distractor contexts of richer checkpoints."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest

from modality_circuits.data.synthetic import (
    CONTEXTS,
    DATA_SPEC_FILE,
    MAX_DISTRACTORS,
    TASKS,
    checkpoint_data_spec,
    context_sentence,
    mixture,
    synthetic,
)


def _digest(samples) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(repr((s.context, s.instruction, s.question, s.constraint, s.answer_img, s.answer_text)).encode())
        if s.image is not None:
            h.update(np.asarray(s.image).tobytes())
    return h.hexdigest()


def _sentences(context: str) -> list[str]:
    return re.findall(r"[^.]+\.", context)


def _task_of(sentence: str) -> str:
    for t, pattern in CONTEXTS.items():
        if re.fullmatch(re.escape(pattern).replace(r"\{\}", r"\w+"), sentence.strip()):
            return t
    raise AssertionError(f"not a context sentence: {sentence!r}")


def test_same_seed_same_samples_other_seed_other_samples() -> None:
    assert _digest(synthetic(24, seed=3)) == _digest(synthetic(24, seed=3))
    assert _digest(synthetic(24, seed=3)) != _digest(synthetic(24, seed=4))
    assert _digest(mixture(24, seed=3, distractors=2)) == _digest(mixture(24, seed=3, distractors=2))


def test_no_distractors_is_the_plain_context() -> None:
    """``distractors=0`` (the default) draws nothing extra: one sentence per context, as before the option."""
    for s in synthetic(40, seed=1, kind="conflict") + synthetic(20, seed=2, kind="text_probe"):
        (only,) = _sentences(s.context)
        assert _task_of(only) == s.task
        assert s.answer_text in only
    assert _digest(synthetic(40, seed=1)) == _digest(synthetic(40, seed=1, distractors=0))


@pytest.mark.parametrize("k", [1, 2, MAX_DISTRACTORS])
def test_distractors_mention_other_tasks_once_each(k: int) -> None:
    samples = synthetic(40, seed=5, kind="conflict", distractors=k) + synthetic(12, seed=6, kind="text_probe",
                                                                              distractors=k)
    first_positions = set()
    for s in samples:
        sentences = _sentences(s.context)
        tasks = [_task_of(x) for x in sentences]
        assert len(sentences) == k + 1 and sorted(set(tasks)) == sorted(tasks)  # k other tasks, none repeated
        (own,) = [x for x, t in zip(sentences, tasks) if t == s.task]  # exactly one sentence answers the question
        assert s.answer_text in own
        first_positions.add(tasks.index(s.task))
    assert len(first_positions) > 1  # the answering sentence is not always in the same place
    # the image side is untouched by the option: the same scenes and answers as without distractors
    plain = synthetic(40, seed=5, kind="conflict")
    assert [s.task for s in plain] == [s.task for s in samples[:40]]


def test_context_sentence_without_distractors_draws_nothing() -> None:
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert context_sentence(rng, "color", "red") == CONTEXTS["color"].format("red")
    assert rng.bit_generator.state == state


@pytest.mark.parametrize("bad", [-1, MAX_DISTRACTORS + 1])
def test_bad_distractors_refused(bad) -> None:
    with pytest.raises(ValueError, match="distractors must be an integer from 0 to 3"):
        synthetic(4, distractors=bad)
    with pytest.raises(ValueError, match="distractors"):
        mixture(4, seed=0, distractors=bad)


def test_checkpoint_data_spec(tmp_path) -> None:
    assert checkpoint_data_spec(tmp_path) == {"distractors": 0}  # no file: plain contexts (the toy)
    (tmp_path / DATA_SPEC_FILE).write_text(json.dumps({"distractors": 2}))
    assert checkpoint_data_spec(tmp_path) == {"distractors": 2}
    (tmp_path / DATA_SPEC_FILE).write_text(json.dumps({"distractors": 9}))
    with pytest.raises(ValueError, match="distractors must be"):
        checkpoint_data_spec(tmp_path)


def test_tasks_balanced_with_distractors() -> None:
    s = synthetic(48, seed=2, distractors=1)
    assert {t: sum(x.task == t for x in s) for t in TASKS} == {t: 12 for t in TASKS}
    assert sum(x.follow == "image" for x in s) == 24


def test_task_weights_shift_the_task_mix_and_leave_the_default_stream_alone() -> None:
    """Weighted tasks come from their own draws: the default mixture is bit-identical to before the option, the
    weighted one is seeded, follows the weights (count 3/7 here) and never draws a zero-weight task."""
    default = mixture(200, seed=9)
    assert _digest(default) == _digest(mixture(200, seed=9, task_weights=None))
    w = {"color": 1, "shape": 0, "count": 3, "position": 3}
    weighted = mixture(1400, seed=9, task_weights=w)
    assert _digest(weighted) == _digest(mixture(1400, seed=9, task_weights=w))
    share = {t: sum(s.task == t for s in weighted) / len(weighted) for t in TASKS}
    assert share["shape"] == 0
    assert abs(share["count"] - 3 / 7) < 0.04 and abs(share["color"] - 1 / 7) < 0.03
    kinds = {s.kind for s in weighted}
    assert kinds == {"conflict", "consistent", "image_probe", "text_probe"}


@pytest.mark.parametrize("bad, match", [({"colour": 1.0}, "unknown task"), ({"count": -1.0}, "non-negative"),
                                        ({"count": 0.0}, "positive total")])
def test_bad_task_weights_are_refused(bad, match) -> None:
    with pytest.raises(ValueError, match=match):
        mixture(4, seed=0, task_weights=bad)

