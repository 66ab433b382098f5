"""Toy-model training recipe: stage-1 vision pretraining, the frozen vision tower in stage 2, and determinism.

Tiny configs only (a few seconds on one CPU thread); the shipped model's accuracies are measured by
``modality-circuits evaluate`` and recorded in its model card, not here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from modality_circuits.data.synthetic import TASKS, VALUES, random_scene, render
from modality_circuits.models.llava import LlavaAdapter
from modality_circuits.toy.model import ToyConfig, toy_llava, word_level_tokenizer
from modality_circuits.toy.train import image_features, pretrain_vision, train_toy

TINY = dict(d_model=32, n_layers=1, n_heads=4, d_mlp=64, d_vision=32, vision_layers=1, vision_heads=2, n_train=48,
            steps=2, batch_size=8, vision_pretrain_batch=16, threads=1)


def scene_batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    pixels = LlavaAdapter.default_image_processor(32)(images=[render(s, 32, rng) for s in scenes],
                                                      return_tensors="pt")["pixel_values"]
    labels = torch.tensor([[VALUES[t].index(s.answer(t)) for t in TASKS] for s in scenes])
    return pixels, labels


def test_image_features_shape() -> None:
    cfg = ToyConfig(**TINY)
    model = toy_llava(word_level_tokenizer(), cfg)
    pixels, _ = scene_batch(3, 0)
    feats = image_features(model, pixels)
    assert feats.shape == (3, (cfg.image_size // cfg.patch_size) ** 2, cfg.d_model)


def test_vision_pretraining_learns_colour() -> None:
    """Colour is linearly readable from the projected image tokens after a short stage 1 (chance is 1/6)."""
    torch.manual_seed(0)
    cfg = ToyConfig(**{**TINY, "vision_pretrain_steps": 150, "vision_pretrain_batch": 64})
    model = toy_llava(word_level_tokenizer(), cfg)
    pixels, labels = scene_batch(256, 1)
    out = pretrain_vision(model, pixels, labels, cfg, progress=False)
    assert out["steps"] == 150 and np.isfinite(out["final_loss"])
    assert out["train_accuracy"]["color"] > 0.6, out
    assert set(out["train_accuracy"]) == set(TASKS)


def test_per_token_probes_make_every_token_carry_the_scene() -> None:
    """``pool="token"``: one head reads each image token alone, so after training a single token gives the colour
    (chance 1/6); the held-out accuracies are reported both token-averaged and per single token."""
    torch.manual_seed(0)
    cfg = ToyConfig(**{**TINY, "vision_pretrain_steps": 150, "vision_pretrain_batch": 64})
    model = toy_llava(word_level_tokenizer(), cfg)
    pixels, labels = scene_batch(256, 1)
    out = pretrain_vision(model, pixels, labels, cfg, progress=False, pool="token", heldout=scene_batch(128, 2))
    assert set(out["heldout_accuracy"]) == set(out["heldout_token_accuracy"]) == set(TASKS)
    assert out["train_accuracy"]["color"] > 0.6 and out["heldout_token_accuracy"]["color"] > 0.5, out


def test_unknown_pool_is_refused() -> None:
    cfg = ToyConfig(**TINY)
    model = toy_llava(word_level_tokenizer(), cfg)
    pixels, labels = scene_batch(4, 0)
    with pytest.raises(ValueError, match="pool must be one of"):
        pretrain_vision(model, pixels, labels, cfg, progress=False, pool="max")


@pytest.mark.parametrize("freeze", [True, False])
def test_stage_two_freezes_the_vision_tower(tmp_path, freeze: bool) -> None:
    """With ``freeze_vision`` the saved vision tower is exactly the stage-1 one (here: the seeded init)."""
    cfg = ToyConfig(**{**TINY, "vision_pretrain_steps": 0, "freeze_vision": freeze})
    init = toy_llava(word_level_tokenizer(), cfg).state_dict()
    train_toy(tmp_path / "m", cfg, progress=False)
    from transformers import LlavaForConditionalGeneration

    saved = LlavaForConditionalGeneration.from_pretrained(tmp_path / "m").state_dict()
    vt = [k for k in saved if "vision_tower" in k]
    proj = [k for k in saved if "multi_modal_projector" in k]
    assert vt and proj
    same_vt = all(torch.equal(saved[k], init[k]) for k in vt)
    assert same_vt == freeze
    assert not all(torch.equal(saved[k], init[k]) for k in proj)  # the projector always trains


def test_training_is_deterministic(tmp_path) -> None:
    cfg = ToyConfig(**{**TINY, "vision_pretrain_steps": 3})
    a = train_toy(tmp_path / "a", cfg, progress=False)
    b = train_toy(tmp_path / "b", cfg, progress=False)
    assert a["final_loss"] == b["final_loss"]
    assert a["vision_pretraining"] == b["vision_pretraining"]
    wa, wb = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("a", "b"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
