"""Study profiles: options left out are filled by model depth (full study on small models, the 15-minute budget on
deeper ones); an option given on the command line always wins, and the report states what was used."""

from __future__ import annotations

import pytest

from modality_circuits import cli
from modality_circuits.cli.run import FULL_STUDY_MAX_LAYERS, STUDY_PROFILES, apply_study_profile
from modality_circuits.report import _study_sizes


def parse(*argv: str):
    return cli.build_parser().parse_args(["reproduce", *argv])


def test_small_models_get_the_full_study_and_deep_ones_the_budget():
    a = parse()
    assert apply_study_profile(a, FULL_STUDY_MAX_LAYERS) == "full"
    assert (a.n, a.window, a.method, a.n_failed_pool) == (200, 1, "ablation", 1000) and a.centers is None
    b = parse()
    assert apply_study_profile(b, 30) == "budget"
    for k, v in STUDY_PROFILES["budget"].items():
        assert getattr(b, k) == v, k


def test_command_line_values_win_and_json_data_keeps_all_records():
    a = parse("--n", "12", "--window", "5", "--method", "dla", "--n-random", "2", "--centers", "0-3")
    apply_study_profile(a, 30)
    assert (a.n, a.window, a.method, a.n_random, a.centers) == (12, 5, "dla", 2, "0-3")
    assert a.n_failed_pool == STUDY_PROFILES["budget"]["n_failed_pool"]
    j = parse("--data", "file.json")
    apply_study_profile(j, 30)
    assert j.n is None  # a JSON file: all its records unless --n says otherwise


def test_the_report_states_the_sizes_used():
    a = parse()
    apply_study_profile(a, 30)
    text = _study_sizes({"study_profile": "budget", "args": vars(a)})
    assert text.startswith("budget profile: n=40") and "window=3" in text and "centers=1,4,7" in text


def test_random_controls_mirror_every_instruction_edge():
    from modality_circuits.cli.run import with_random_controls
    from modality_circuits.errors import ModalityCircuitsError

    edges = [("image", "instruction"), ("instruction", "last"), ("image", "last")]
    out = with_random_controls(edges, 2)
    assert out[:3] == edges
    assert out[3:] == [("image", "random0~instruction"), ("random0~instruction", "last"),
                       ("image", "random1~instruction"), ("random1~instruction", "last")]
    assert with_random_controls(edges, 0) == edges
    with pytest.raises(ModalityCircuitsError, match="--random-sets"):
        with_random_controls(edges, -1)


def test_variants_are_checked_before_any_work():
    from modality_circuits.cli.run import parse_variants
    from modality_circuits.errors import ModalityCircuitsError

    assert parse_variants("none") == [] and parse_variants(None) == []
    assert parse_variants("original,filler_after_instruction") == ["filler_after_instruction"]
    with pytest.raises(ModalityCircuitsError, match=r"--variants: unknown variant\(s\) \['upside_down'\]"):
        parse_variants("upside_down")


def test_balanced_subset_keeps_order_and_halves():
    from types import SimpleNamespace

    from modality_circuits.cli.stages import balanced_subset

    xs = [SimpleNamespace(id=i, follow="image" if i % 3 else "text") for i in range(12)]
    sub = balanced_subset(xs, 5)
    assert [x.id for x in sub] == [0, 1, 2, 3, 4]  # 3 image-following (1, 2, 4), 2 text-following (0, 3)
    assert [x.follow for x in sub].count("image") == 3
    assert balanced_subset(xs, 0) == xs and balanced_subset(xs, 99) == xs
