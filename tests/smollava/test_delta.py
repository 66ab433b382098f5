"""The SmolLLaVA delta on a tiny stand-in base (no real base needed): training is bitwise reproducible, the
materialised checkpoint equals the trained (unmerged LoRA) model, and every bad input is refused without leaving a
cache that later loads as valid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modality_circuits import HookedMLLM
from modality_circuits.errors import CheckpointError
from modality_circuits.smollava import build_smollava
from modality_circuits.smollava import delta as D
from modality_circuits.smollava.build import VisionSpec
from modality_circuits.smollava.train import SmolTrainConfig, lora_config, train_smollava
from modality_circuits.testing import tiny_base

TINY = SmolTrainConfig(vision=VisionSpec(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2),
                       threads=1, n_images=24, vision_pretrain_steps=3, vision_pretrain_batch=8, align_samples=12,
                       align_steps=2, align_batch=4, n_train=16, steps=3, batch_size=4, lora_rank=2, lora_alpha=4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    base = tiny_base(cache / "smollm2-135m-instruct")
    delta, summary = train_smollava(base, TINY, progress=False)
    path = D.save_delta(delta, cache / "out" / "delta.safetensors", base, TINY, {"training": summary})
    return cache, base, delta, summary, path


def test_training_is_bitwise_reproducible_and_leaves_threads_alone(trained):
    cache, base, delta, summary, _ = trained
    threads = torch.get_num_threads()
    again, _ = train_smollava(base, TINY, progress=False)
    assert torch.get_num_threads() == threads
    assert sorted(again) == sorted(delta)
    assert all(torch.equal(again[k], delta[k]) for k in delta)
    assert summary["stage2"]["steps_done"] == TINY.steps and not summary["cut_short"]
    # the decoder's read-out after alignment: held-out image-only questions, each task counted
    held = summary["stage1_align"]["heldout"]
    assert held["n"] == 200 and set(held["by_task"]) == {"color", "shape", "count", "position"}
    assert all(0.0 <= v <= 1.0 for v in held["by_task"].values())
    # what is shipped: the whole vision side, one A/B pair per adapted projection of every layer, the <image> row
    n_lora = sum(k.startswith("lora.") for k in delta)
    assert n_lora == 2 * 2 * len(TINY.lora_targets)  # 2 layers × targets × (A, B)
    assert delta["image_row"].shape == (64,)
    assert any(k.startswith("model.multi_modal_projector.") for k in delta)


def test_materialised_checkpoint_equals_the_trained_model(trained):
    from peft import get_peft_model

    cache, base, delta, _, path = trained
    out = D.materialise(path, cache=cache, download=False)
    assert D.is_materialised(out, json.loads(D.sidecar_of(path).read_text())["sha256"])
    assert D.materialise(path, cache=cache, download=False) == out  # idempotent
    # the trained model, rebuilt unmerged: base + vision side + peft LoRA with the delta's factors
    model, tok, _ = build_smollava(base, TINY.vision, seed=TINY.seed)
    model.load_state_dict({k: v for k, v in delta.items() if k.startswith(D.VISION_PREFIXES)}, strict=False)
    peft = get_peft_model(model, lora_config(TINY))
    for name, mod in peft.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            mod.lora_A["default"].weight.data.copy_(delta[f"lora.{name}.A"])
            mod.lora_B["default"].weight.data.copy_(delta[f"lora.{name}.B"])
    hooked = HookedMLLM.from_pretrained(out)
    from modality_circuits.data.synthetic import synthetic

    batch = hooked.prepare(synthetic(3, seed=5, kind="conflict", image_size=TINY.vision.image_size))
    pos = (batch.attention_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = peft(input_ids=batch.tokens, attention_mask=batch.attention_mask, position_ids=pos,
                   pixel_values=batch.model_inputs["pixel_values"]).logits
        ours = hooked(batch)
    m = batch.attention_mask.bool()
    assert float((ours - ref)[m].abs().max()) < 1e-4


def test_materialised_checkpoint_records_its_training_data(trained):
    """The analyses of a checkpoint use the contexts it was trained on: ``distractors`` travels from the training
    config through the delta into the materialised folder; configs recorded before the field existed mean 0."""
    from modality_circuits.data.synthetic import checkpoint_data_spec

    cache, _, _, _, path = trained
    out = D.materialise(path, cache=cache, download=False)
    assert checkpoint_data_spec(out) == {"distractors": TINY.distractors}
    old = TINY.to_dict()
    del old["distractors"], old["vision_pool"], old["task_weights"]
    assert SmolTrainConfig.from_dict(old).distractors == 0
    assert SmolTrainConfig.from_dict(old).task_weights is None
    assert SmolTrainConfig.from_dict(old).vision_pool == "flat"
    assert SmolTrainConfig.from_dict(TINY.to_dict()) == TINY


def test_a_corrupted_or_unsidecarred_delta_is_refused(trained, tmp_path):
    _, _, _, _, path = trained
    bad = tmp_path / "delta.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="has no sidecar"):
        D.read_delta(bad)
    D.sidecar_of(bad).write_text(D.sidecar_of(path).read_text())
    with pytest.raises(CheckpointError, match="corrupted or was replaced"):
        D.read_delta(bad)
    with pytest.raises(CheckpointError, match="No SmolLLaVA delta"):
        D.read_delta(tmp_path / "missing.safetensors")


def test_a_delta_for_another_base_is_refused_and_nothing_is_written(trained, tmp_path):
    cache, base, delta, _, _ = trained
    other = tiny_base(tmp_path / "smollm2-135m-instruct", seed=1)  # same shapes, other weights
    assert other.is_dir()
    path = D.save_delta(delta, tmp_path / "d" / "delta.safetensors", base, TINY, {})
    with pytest.raises(CheckpointError, match="delta and base do not match"):
        D.materialise(path, cache=tmp_path, download=False)
    assert not list(tmp_path.glob("smollava-*")) and not list(tmp_path.glob(".materialise-*"))


def test_merge_checks_every_key_and_shape(trained):
    _, base, delta, _, _ = trained
    model, _, _ = build_smollava(base, TINY.vision, seed=0)
    some = next(k for k in delta if k.startswith("lora.") and k.endswith(".A"))
    cases = [
        ({k: v for k, v in delta.items() if k != some.replace(".A", ".B")}, "but not"),
        ({**delta, some: torch.zeros(3, 5)}, "do not fit"),
        ({**delta, "lora.model.nowhere.A": delta[some], "lora.model.nowhere.B": delta[some.replace(".A", ".B")]},
         "names no linear layer"),
        ({**delta, "stray": torch.zeros(1)}, "does not use"),
        ({k: v for k, v in delta.items() if not k.startswith("model.multi_modal_projector.")}, "lacks"),
        ({k: v for k, v in delta.items() if k != "image_row"}, "image_row"),
    ]
    for tensors, msg in cases:
        with pytest.raises(CheckpointError, match=msg):
            D.merge_delta(model, tensors, 2.0)


def test_a_failed_materialisation_leaves_no_valid_cache(trained, tmp_path, monkeypatch):
    cache, _, _, _, path = trained
    import modality_circuits.smollava.build as B

    def boom(*a, **k):
        raise OSError("disk full")

    local = tmp_path / "cache"
    local.mkdir()
    (local / "smollm2-135m-instruct").symlink_to(cache / "smollm2-135m-instruct")
    monkeypatch.setattr(B, "save_smollava", boom)
    with pytest.raises(OSError, match="disk full"):
        D.materialise(path, cache=local, download=False)
    assert [p.name for p in local.iterdir()] == ["smollm2-135m-instruct"]


def test_no_base_and_no_download_says_what_to_run(trained, tmp_path):
    _, _, _, _, path = trained
    with pytest.raises(CheckpointError, match="fetch-base"):
        D.materialise(path, cache=tmp_path, download=False)


def test_shipped_delta_has_its_sidecar_and_fits_the_size_budget():
    path = D.shipped_delta()
    assert path.is_file(), f"no shipped delta at {path}"
    side = json.loads(D.sidecar_of(path).read_text())
    assert side["bytes"] == path.stat().st_size <= 25 * 1024 * 1024
    tensors, meta, _ = D.read_delta(path)  # sha256 checked
    assert meta["format"] == D.FORMAT and Path(side["file"]).name == path.name
    assert side["metrics"]["n_per_condition"] >= 200


def test_training_defaults_are_the_shipped_deltas_config():
    """``train-smollava`` with its defaults re-creates the shipped model: the config recorded in the shipped delta
    is the default one (options such as --vision-pool mean stay opt-in until a run meets the targets)."""
    from safetensors import safe_open

    with safe_open(str(D.shipped_delta()), "pt") as f:
        recorded = SmolTrainConfig.from_dict(json.loads(f.metadata()["train_config"]))
    assert recorded == SmolTrainConfig()
