"""Evaluation: the summary's conditions and the no-instruction vision ratio (MC²'s metric)."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from modality_circuits.data.synthetic import synthetic
from modality_circuits.evaluation import evaluate_samples, vision_ratio
from modality_circuits.metrics import score_dataset


def test_vision_ratio_is_the_image_share_without_the_instruction(circuit_model):
    samples = synthetic(8, seed=4)
    vr = vision_ratio(circuit_model, samples, batch_size=4, progress=False)
    bare = [dataclasses.replace(s, instruction=None, follow="image") for s in samples]
    assert all("instruction" not in circuit_model.prepare([b]).spans for b in bare[:1])
    image_first = score_dataset(circuit_model, bare, batch_size=8, progress=False).followed.float()
    assert vr["closed"] == pytest.approx(float(image_first.mean()), abs=1e-4) and vr["n"] == 8
    assert vr["closed_ci"][0] <= vr["closed"] <= vr["closed_ci"][1]
    assert vr["open_image"] + vr["open_text"] + vr["open_other"] == 8
    if vr["open_image"] + vr["open_text"]:
        assert vr["open"] == pytest.approx(vr["open_image"] / (vr["open_image"] + vr["open_text"]), abs=1e-4)
    # the instruction does not matter to the ratio: both conditions' samples give the same prompts without it
    flipped = [dataclasses.replace(s, follow="text" if s.follow == "image" else "image") for s in samples]
    assert vision_ratio(circuit_model, flipped, batch_size=4, progress=False)["closed"] == vr["closed"]


def test_evaluate_samples_reports_the_ratio_only_with_conflicts(circuit_model):
    conflict = synthetic(4, seed=1)
    probes = synthetic(2, seed=2, kind="text_probe")
    ev, scores, gen = evaluate_samples(circuit_model, conflict + probes, batch_size=4, progress=False)
    assert ev["no_instruction"]["n"] == 4 and len(gen) == 4 and len(scores) == 6
    ev, _, _ = evaluate_samples(circuit_model, probes, batch_size=4, progress=False)
    assert "no_instruction" not in ev
    ev, _, _ = evaluate_samples(circuit_model, conflict, batch_size=4, progress=False, no_instruction=False)
    assert "no_instruction" not in ev


def test_evaluation_as_work_units_equals_one_pass(circuit_model, tmp_path):
    from modality_circuits.data.synthetic import synthetic

    samples = synthetic(6, seed=2, kind="conflict") + synthetic(3, seed=3, kind="image_probe")
    ev, scores, gen = evaluate_samples(circuit_model, samples, batch_size=4, progress=False)
    d = tmp_path / "mfr"
    ev_u, scores_u, gen_u = evaluate_samples(circuit_model, samples, batch_size=4, progress=False, units_dir=d)
    assert ev_u == ev and len(list(d.glob("unit-*.parquet"))) == 3
    pd.testing.assert_frame_equal(scores_u, scores)
    pd.testing.assert_frame_equal(gen_u, gen)
    assert list(gen["sample_id"]) == [s.id for s in samples[:6]] and ev["no_instruction"]["n"] == 6
