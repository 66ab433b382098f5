"""Several GPUs: the placement plan follows TransformerLens's block split (checked without GPUs), the vision
tower sits with the first block, and impossible requests fail at the call."""

from __future__ import annotations

import pytest
import torch

from modality_circuits import HookedMLLM
from modality_circuits.errors import CheckpointError
from modality_circuits.models.devices import check_n_devices, placement


def test_plan_splits_blocks_in_order_with_vision_on_the_first_device():
    from types import SimpleNamespace  # TL's config refuses n_devices > the GPUs present: plan with its fields

    cfg = SimpleNamespace(n_layers=30, device="cuda", n_devices=4)
    plan = placement(cfg)
    blocks = [plan[f"blocks.{i}"].index for i in range(30)]
    assert blocks == sorted(blocks) and set(blocks) == {0, 1, 2, 3}
    assert blocks == [i * 4 // 30 for i in range(30)]
    assert plan["image_encoder"] == plan["embed"] == torch.device("cuda")
    assert plan["unembed"].index == plan["ln_final"].index == 3


def test_single_device_plan_is_the_device(model):
    assert set(placement(model.cfg).values()) == {torch.device("cpu")}


@pytest.mark.parametrize("device,n,pattern", [("cpu", 2, "not CUDA"), ("cpu", 0, "positive integer"),
                                              ("cpu", 1.5, "positive integer")])
def test_bad_requests_fail_at_the_call(hf_model, tokenizer, device, n, pattern):
    with pytest.raises(CheckpointError, match=pattern):
        check_n_devices(device, n)
    with pytest.raises(CheckpointError, match=pattern):
        HookedMLLM.from_hf(hf_model, tokenizer, device=device, n_devices=n)
