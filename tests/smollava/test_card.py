"""The model card's re-create command: parsed by the CLI, it gives back the config the delta was trained with."""

from __future__ import annotations

import json
import shlex
from dataclasses import replace

import pytest

from modality_circuits.cli import build_parser
from modality_circuits.cli.options import smol_train_config
from modality_circuits.smollava import delta as D
from modality_circuits.smollava.card import recreate_command, settings_without_option
from modality_circuits.smollava.train import SmolTrainConfig


def _shipped_config() -> dict:
    from safetensors import safe_open

    with safe_open(str(D.shipped_delta()), "pt") as f:
        return json.loads(f.metadata()["train_config"])


def _parsed(cfg: dict) -> SmolTrainConfig:
    """The config ``train-smollava`` builds from the card's command (the CLI's own mapping of its options)."""
    argv = shlex.split(recreate_command(cfg))
    assert argv[:2] == ["modality-circuits", "train-smollava"]
    return smol_train_config(build_parser().parse_args(argv[1:]))


def test_the_shipped_cards_command_recreates_the_shipped_config():
    cfg = _shipped_config()
    assert _parsed(cfg) == SmolTrainConfig.from_dict(cfg)
    card = (D.shipped_delta().parent / "README.md").read_text()
    assert f"Re-create with `{recreate_command(cfg)}`." in card


@pytest.mark.parametrize("changes", [
    {"vision_pool": "mean", "align_steps": 300, "distractors": 1, "steps": 500},
    {"vision_pool": "flat", "align_lr": 5e-4, "n_train": 3000, "seed": 3},
    {"task_weights": {"color": 1.0, "shape": 1.0, "count": 3.0, "position": 2.0}},
    {"task_weights": None},  # uniform, as runs 1-3 and 5-8 trained: spelled `--task-weights uniform`
    {"max_minutes": 70.0},
])
def test_the_command_spells_out_options_that_differ_from_the_defaults(changes):
    cfg = replace(SmolTrainConfig(), **changes)
    assert _parsed(cfg.to_dict()) == cfg


def test_settings_no_option_sets_are_named_not_dropped():
    assert settings_without_option(SmolTrainConfig().to_dict()) == {}
    assert settings_without_option(_shipped_config()) == {}
    cfg = replace(SmolTrainConfig(), lora_rank=4, lr=1e-3, steps=10).to_dict()
    assert settings_without_option(cfg) == {"lora_rank": 4, "lr": 1e-3}
