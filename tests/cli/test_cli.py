"""The ``modality-circuits`` command line: help texts, clear errors on bad input, end-to-end runs, determinism.

Runs use tiny checkpoints written to a temporary folder (a random toy LLaVA in the shipped model's format, and a
tiny BPE LLaVA whose tokenizer knows the MC² fixture's words), so the suite does not depend on the trained model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from modality_circuits import cli

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
RESULT_CSVS = ("mfr.csv", "generations.csv", "knockout.csv", "knockout_summary.csv", "contributions.csv", "anchors.csv",
               "head_scores.csv", "heads_table.csv", "heads_summary.csv")
RESULT_JSONS = ("evaluate.json", "heads_selection.json", "attention_views.json", "image_attention.json",
                "results.json")
TINY_RUN = ["--n", "8", "--n-general", "2", "--n-failed-pool", "6", "--n-random", "2", "--alphas", "2,4",
            "--heatmap-methods", "ablation,dla,attention", "--batch-size", "8", "--threads", "1", "--no-png", "--quiet"]


def write_tiny_toy(path: Path) -> Path:
    """A random 2-layer toy LLaVA saved in the shipped model's format."""
    from modality_circuits.testing import tiny_toy_checkpoint

    return tiny_toy_checkpoint(path)


def write_tiny_bpe(path: Path) -> Path:
    """A tiny random LLaVA whose BPE tokenizer covers the MC² fixture's text (default LLaVA template)."""
    from modality_circuits.models.llava import LlavaAdapter
    from modality_circuits.testing import DEFAULT_CORPUS, tiny_bpe_tokenizer, tiny_llava

    records = json.loads((FIXTURES / "mc2_small.json").read_text())
    tok = tiny_bpe_tokenizer([DEFAULT_CORPUS] + [str(v) for r in records for v in r.values()], vocab_size=600)
    tiny_llava(tok).save_pretrained(path)
    tok.save_pretrained(path)
    LlavaAdapter.default_image_processor(32).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_toy(tmp_path_factory.mktemp("tiny-toy"))


@pytest.fixture(scope="module")
def reproduce_runs(toy_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same tiny ``reproduce`` twice with the same seed."""
    outs = []
    for k in range(2):
        out = tmp_path_factory.mktemp(f"reproduce-{k}")
        assert cli.main(["reproduce", "--model", str(toy_dir), "--out", str(out), "--seed", "3", *TINY_RUN]) == 0
        outs.append(out)
    return outs[0], outs[1]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse: --help (0) and usage errors (2)
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------------------------------------- help
def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_subcommand_exists() -> None:
    assert set(subcommands()) == {"reproduce", "evaluate", "knockout", "contributions", "anchors", "heads",
                                  "train-toy", "train-smollava", "report", "fetch-base", "merge"}


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_help_documents_every_option(command: str, capsys: pytest.CaptureFixture) -> None:
    rc, out, _ = run_cli([command, "--help"], capsys)
    assert rc == 0
    sub = subcommands()[command]
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help.strip(), f"{command}: {action.dest} has no help text"
        names = action.option_strings or [action.metavar or action.dest]
        for name in names:
            assert name in out, f"{command} --help does not mention {name}"
    if command not in ("train-toy", "train-smollava", "report", "fetch-base", "merge"):
        for opt in ("--model", "--data", "--images", "--question", "--n", "--seed", "--device", "--dtype", "--out",
                    "--batch-size", "--quiet"):
            assert opt in out, f"{command} lacks the common option {opt}"


def test_console_script_help() -> None:
    exe = Path(sys.executable).parent / "modality-circuits"
    cmd = [str(exe), "--help"] if exe.exists() else [sys.executable, "-m", "modality_circuits.cli", "--help"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr
    for c in ("reproduce", "evaluate", "knockout", "contributions", "anchors", "heads", "train-toy", "train-smollava",
              "report", "merge"):
        assert c in p.stdout


# ----------------------------------------------------------------------------------------------- errors
def one_error_line(err: str) -> str:
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def test_missing_model_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc, _, err = run_cli(["knockout", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2
    assert "model directory not found" in one_error_line(err)


def test_missing_data_file(toy_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc, _, err = run_cli(["heads", "--model", str(toy_dir), "--data", str(tmp_path / "missing.json"), "--images",
                          str(tmp_path), "--out", str(tmp_path / "o"), "--quiet"], capsys)
    assert rc == 2
    assert "data file not found" in one_error_line(err)


def test_json_data_needs_images(toy_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc, _, err = run_cli(["evaluate", "--model", str(toy_dir), "--data", str(FIXTURES / "mc2_small.json"),
                          "--out", str(tmp_path), "--quiet"], capsys)
    assert rc == 2 and "--images" in one_error_line(err)
    rc, _, err = run_cli(["evaluate", "--model", str(toy_dir), "--data", str(FIXTURES / "mc2_small.json"),
                          "--images", str(tmp_path / "no-coco"), "--out", str(tmp_path), "--quiet"], capsys)
    assert rc == 2 and "image folder not found" in one_error_line(err)


def test_words_the_model_does_not_know(toy_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Real MC² answers on the toy's word-level vocabulary: a clear AnswerError, not a traceback."""
    rc, _, err = run_cli(["evaluate", "--model", str(toy_dir), "--data", str(FIXTURES / "mc2_small.json"),
                          "--images", str(FIXTURES / "coco"), "--out", str(tmp_path), "--quiet"], capsys)
    assert rc == 2 and "unknown to the tokenizer" in one_error_line(err)


@pytest.mark.parametrize("argv, message", [
    (["knockout", "--bogus"], "unrecognized arguments: --bogus"),
    (["frobnicate"], "invalid choice"),
    (["knockout", "--dtype", "float64"], "invalid choice"),
    (["knockout", "--question", "4"], "invalid choice"),
    (["knockout", "--n", "many"], "invalid int value"),
])
def test_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2 and message in err


@pytest.mark.parametrize("extra, message", [
    (["--n", "2"], "--n must be at least 4"),
    (["--layers", "0,7"], "out of range"),
    (["--layers", "a-b"], "cannot parse"),
    (["--edges", "image=last"], "cannot parse"),
    (["--edges", "image->nowhere"], "no group 'nowhere'"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--variant-every", "0"], "--variant-every must be >= 1"),
    (["--variant-n", "-1"], "--variant-n must be >= 0"),
    (["--device", "cuda:7"], None),
])
def test_bad_values(toy_dir: Path, tmp_path: Path, extra: list[str], message: str | None,
                    capsys: pytest.CaptureFixture) -> None:
    import torch

    if message is None:
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
        message = "CUDA is not available"
    rc, _, err = run_cli(["knockout", "--model", str(toy_dir), "--out", str(tmp_path), "--quiet", "--n", "4",
                          *extra], capsys)
    assert rc == 2
    assert message in one_error_line(err)


def test_negative_failed_pool_fails_before_any_work(toy_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    rc, _, err = run_cli(["heads", "--model", str(toy_dir), "--out", str(tmp_path / "h"), "--quiet",
                          "--n-failed-pool", "-1"], capsys)
    assert rc == 2 and "--n-failed-pool must be >= 0" in one_error_line(err)
    assert not (tmp_path / "h").exists()


@pytest.mark.parametrize("weights, message", [("count", "is not TASK=WEIGHT"), ("count=many", "is not TASK=WEIGHT"),
                                             ("colour=1", "unknown task(s) ['colour']"), ("count=0", "positive total")])
def test_bad_task_weights_fail_before_any_work(tmp_path: Path, weights: str, message: str,
                                               capsys: pytest.CaptureFixture) -> None:
    rc, _, err = run_cli(["train-smollava", "--out", str(tmp_path / "t"), "--quiet", "--task-weights", weights], capsys)
    assert rc == 2 and message in one_error_line(err)
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("option", [["--align-lr", "0"], ["--align-steps", "0"]])
def test_bad_training_numbers_fail_before_any_work(tmp_path: Path, option: list[str],
                                                   capsys: pytest.CaptureFixture) -> None:
    rc, _, err = run_cli(["train-smollava", "--out", str(tmp_path / "t"), "--quiet", *option], capsys)
    assert rc == 2 and "--align-lr > 0" in one_error_line(err)
    assert not (tmp_path / "t").exists()


def test_report_of_missing_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc, _, err = run_cli(["report", str(tmp_path / "nothing")], capsys)
    assert rc == 2 and "results directory not found" in one_error_line(err)


# ------------------------------------------------------------------------------------------ end to end
def test_reproduce_writes_everything(reproduce_runs: tuple[Path, Path], toy_dir: Path) -> None:
    out, _ = reproduce_runs
    for name in RESULT_CSVS + RESULT_JSONS + ("manifest.json", "report.html"):
        assert (out / name).is_file(), name
    m = json.loads((out / "manifest.json").read_text())
    for lib in ("torch", "transformers", "transformer_lens", "modality_circuits"):
        assert m["versions"][lib] and m["versions"][lib] != "not installed"
    sha = hashlib.sha256((toy_dir / "model.safetensors").read_bytes()).hexdigest()
    assert m["model"]["sha256"] == {"model.safetensors": sha}
    assert m["model"]["path"] == str(toy_dir.resolve())
    assert m["seed"] == 3 and m["args"]["n"] == 8 and m["args"]["n_random"] == 2
    assert set(m["timings"]) >= {"load", "mfr", "knockout", "contributions", "anchors", "heads", "report"}
    assert m["data"]["n_conflict"] == 8 and m["data"]["n_general"] == 6
    ko = pd.read_csv(out / "knockout.csv")
    assert list(ko.columns)[:13] == ["sample_id", "condition", "task", "kind", "edge", "src", "dst", "layer",
                                     "layers", "metric", "base", "value", "delta"]
    assert set(ko["metric"]) == {"p_binary"}
    # samples × (default edges + 2 random stand-in sets × the 3 default edges touching the instruction) × layers
    assert len(ko) == 8 * (9 + 2 * 3) * 2
    assert {"image↛random0~instruction", "random1~instruction↛last"} <= set(ko["edge"])
    kv = pd.read_csv(out / "knockout_variants.csv")  # the full profile reruns the 5 touched edges on 3 layouts
    assert set(kv["variant"]) == {"original", "instruction_after_question", "swap_instruction_constraint",
                                  "filler_after_instruction"}
    assert len(kv) == 8 * 5 * 2 * 4
    st = pd.read_csv(out / "knockout_stability.csv")
    assert set(st["fraction"]) == {0.2, 0.4, 0.6, 0.8, 1.0}
    hs = pd.read_csv(out / "head_scores.csv")
    assert set(hs["method"]) == {"ablation", "dla", "attention"}
    sel = json.loads((out / "heads_selection.json").read_text())
    assert sel["split_sizes"] == {"selection": 4, "evaluation": 4}
    assert not set(sel["split"]["selection"]) & set(sel["split"]["evaluation"])
    ev = json.loads((out / "evaluate.json").read_text())
    assert ev["conflict_follow_image"]["n"] == 4 and ev["conflict_follow_text"]["n"] == 4
    assert {"consistent", "image_probe", "text_probe"} <= set(ev)
    views = json.loads((out / "attention_views.json").read_text())
    assert len(views) == 2 and all(len(v["attention"]) == 6 for v in views)  # --top-heads default
    assert [tuple(h) for h in sel["ranked"][:len(sel["selected"])]] == [tuple(h) for h in sel["selected"]]
    maps = json.loads((out / "image_attention.json").read_text())
    assert len(maps) == 6 and all(len(x["grid"]) == 4 for x in maps)  # 32 px / 8 px patches


def test_reproduce_same_seed_same_numbers(reproduce_runs: tuple[Path, Path]) -> None:
    a, b = reproduce_runs
    for name in RESULT_CSVS:
        pd.testing.assert_frame_equal(pd.read_csv(a / name), pd.read_csv(b / name), check_exact=True, obj=name)
    for name in RESULT_JSONS:
        assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name


def test_other_seed_other_samples(toy_dir: Path, reproduce_runs: tuple[Path, Path], tmp_path: Path) -> None:
    assert cli.main(["knockout", "--model", str(toy_dir), "--out", str(tmp_path), "--seed", "4", "--n", "8",
                     "--layers", "0", "--quiet", "--threads", "1"]) == 0
    a = pd.read_csv(reproduce_runs[0] / "knockout.csv")
    b = pd.read_csv(tmp_path / "knockout.csv")
    assert not a[a["layer"] == 0]["base"].reset_index(drop=True).equals(b["base"])


def test_single_analyses_and_report(toy_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    common = ["--model", str(toy_dir), "--n", "4", "--threads", "1"]
    ko_dir = tmp_path / "knockout"
    rc, out, _ = run_cli(["knockout", *common, "--out", str(ko_dir), "--edges", "image->last,context->last",
                          "--layers", "0", "--window-mode", "start", "--window", "2"], capsys)
    assert rc == 0 and "[knockout]" in out
    ko = pd.read_csv(ko_dir / "knockout.csv")
    assert set(ko["edge"]) == {"image↛last", "context↛last"} and set(ko["layers"]) == {"0,1"}
    for command in ("contributions", "anchors"):  # one run directory per command and configuration
        rc, out, _ = run_cli([command, *common, "--out", str(tmp_path / command), "--quiet"], capsys)
        assert rc == 0 and out == ""
        assert (tmp_path / command / f"{command}.csv").is_file()
    for d, fig in ((ko_dir, "fig-knockout"), (tmp_path / "anchors", "fig-anchors")):
        rc, out, err = run_cli(["report", str(d), "--no-png"], capsys)
        assert rc == 0 and "warning" not in err
        html = (d / "report.html").read_text()
        assert fig in html and "Not computed in this run" in html and "did not finish" not in html


def test_variant_reruns_take_a_balanced_subset_at_every_kth_centre(toy_dir: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    rc, _, _ = run_cli(["knockout", "--model", str(toy_dir), "--out", str(tmp_path), "--n", "8", "--threads", "1",
                        "--quiet", "--edges", "instruction->last,image->last", "--layers", "0,1",
                        "--variants", "filler_after_instruction", "--variant-n", "4", "--variant-every", "2"], capsys)
    assert rc == 0
    ko, kv = pd.read_csv(tmp_path / "knockout.csv"), pd.read_csv(tmp_path / "knockout_variants.csv")
    assert ko["sample_id"].nunique() == 8 and set(ko["layer"]) == {0, 1}
    # 4 samples (2 per instruction) × the 1 edge touching the instruction × centre 0 (every 2nd of 0, 1) × 2 layouts
    assert len(kv) == 4 * 1 * 1 * 2 and set(kv["layer"]) == {0} and set(kv["edge"]) == {"instruction↛last"}
    for _, g in kv.groupby("variant"):
        assert g.drop_duplicates("sample_id")["condition"].value_counts().to_dict() == {"image": 2, "text": 2}
    orig = kv[kv["variant"] == "original"].set_index(["sample_id", "layer"])["delta"].sort_index()
    same = ko[ko["edge"] == "instruction↛last"].set_index(["sample_id", "layer"])["delta"]
    assert np.allclose(orig, same.loc[orig.index])  # the original layout's rows are the main sweep's


def test_evaluate_synthetic(toy_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc, out, _ = run_cli(["evaluate", "--model", str(toy_dir), "--out", str(tmp_path), "--n", "4",
                          "--threads", "1"], capsys)
    assert rc == 0
    ev = json.loads((tmp_path / "evaluate.json").read_text())
    for k in ("conflict_follow_image", "conflict_follow_text", "consistent", "image_probe", "text_probe"):
        assert 0 <= ev[k]["accuracy"] <= 1 and ev[k]["n"] == 4 and "failures" in ev[k]
    assert "MFR vision-following" in out and '"conflict_follow_text"' in out
    scores, gen = pd.read_csv(tmp_path / "mfr.csv"), pd.read_csv(tmp_path / "generations.csv")
    assert len(scores) == 5 * 4 and len(gen) == 2 * 4  # every sample scored; the conflict ones also generated
    assert set(gen["outcome"]) <= {"follow", "competitor", "other"}
    conflict = scores[scores["kind"] == "conflict"]
    assert set(conflict["sample_id"]) == set(gen["sample_id"])
    assert (conflict.groupby("follow")["followed"].mean().round(4).to_dict()
            == {"image": ev["conflict_follow_image"]["accuracy"], "text": ev["conflict_follow_text"]["accuracy"]})


def test_distractors_come_from_the_checkpoint_unless_given(toy_dir: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    """A checkpoint's synthetic_data.json sets the contexts the analyses use; --distractors overrides it."""
    import shutil

    from modality_circuits.data.synthetic import DATA_SPEC_FILE

    model = tmp_path / "model"
    shutil.copytree(toy_dir, model)
    (model / DATA_SPEC_FILE).write_text(json.dumps({"distractors": 2}))
    for extra, want in (([], 2), (["--distractors", "0"], 0)):
        out = tmp_path / f"out{want}"
        rc, _, err = run_cli(["evaluate", "--model", str(model), "--out", str(out), "--n", "4", "--threads", "1",
                              "--quiet", *extra], capsys)
        assert rc == 0, err
        assert json.loads((out / "evaluate.json").read_text())["distractors"] == want
        assert json.loads((out / "manifest.json").read_text())["data"]["distractors"] == want
    rc, _, err = run_cli(["evaluate", "--model", str(model), "--n", "4", "--distractors", "5"], capsys)
    assert rc == 2 and "--distractors" in err


def test_real_data_reproduce(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A Modality-Following JSON + COCO folder: every conflict sample of the file, follow read from the instruction."""
    model = write_tiny_bpe(tmp_path / "bpe")
    out = tmp_path / "out"
    rc, _, err = run_cli(["reproduce", "--model", str(model), "--data", str(FIXTURES / "mc2_small.json"),
                          "--images", str(FIXTURES / "coco"), "--question", "2", "--out", str(out), *TINY_RUN],
                         capsys)
    assert rc == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["data"]["n_conflict"] == 6 and m["data"]["n_general"] == 0 and m["data"]["question"] == 2
    assert m["data"]["n_by_condition"]["image"] + m["data"]["n_by_condition"]["text"] == 6
    assert (out / "report.html").is_file()
    maps = json.loads((out / "image_attention.json").read_text())
    assert maps and all(len(x["grid"]) == 4 for x in maps)


def test_train_toy(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "toy"
    rc, stdout, _ = run_cli(["train-toy", "--out", str(out), "--steps", "2", "--vision-steps", "2", "--n-train", "48",
                             "--eval-n", "4", "--minutes", "2"], capsys)
    assert rc == 0, stdout
    for name in ("model.safetensors", "config.json", "tokenizer.json", "prompt_template.json", "README.md",
                 "metrics.json", "training_summary.json"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert "conflict_follow_image" in card and "train-toy" in card
    assert "[train-toy] 2 steps" in stdout
