"""The shipped SmolLLaVA delta: only what training changed, and its exact merge into a plain LLaVA checkpoint.

A delta file (safetensors) holds

- ``model.vision_tower.*`` and ``model.multi_modal_projector.*``: the whole new vision side;
- ``lora.<module>.A`` ``[rank, d_in]`` and ``lora.<module>.B`` ``[d_out, rank]`` for every adapted projection of
  the decoder (``<module>`` as in the LLaVA state dict, e.g. ``model.language_model.layers.0.self_attn.q_proj``);
- ``image_row`` ``[d_model]``: the ``<image>`` token's embedding row (tied with the unembedding);

and string metadata: the format, the base weights' sha256, the LoRA scale (``alpha / rank``) and the training config.
A JSON sidecar (``<name>.json``) records the file's sha256 and the model card's numbers.

:func:`materialise` rebuilds the model from the base exactly as training built it, checks every key and shape,
merges ``W + scale · B @ A`` into each adapted weight (fp32) and writes a plain LLaVA checkpoint folder into the
cache, atomically, with a manifest written last. The base must be the one the delta was trained on (sha256 check);
a corrupted or mismatched delta is refused with a :class:`~modality_circuits.errors.CheckpointError` naming the
problem, and nothing half-written is left behind.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

logger = logging.getLogger(__name__)

FORMAT = "smollava-delta/1"
MANIFEST = "SMOLLAVA.json"
VISION_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.")


def sidecar_of(delta: Path) -> Path:
    return delta.with_suffix(".json")


def shipped_delta() -> Path:
    """The delta shipped with the package (``modality_circuits/resources/smollava/delta.safetensors``)."""
    from importlib.resources import files

    return Path(str(files("modality_circuits.resources").joinpath("smollava", "delta.safetensors")))


def extract_delta(peft_model: Any, cfg: Any) -> dict[str, torch.Tensor]:
    """The trained tensors of a peft-wrapped SmolLLaVA (see the module docstring for the keys)."""
    llava = peft_model.base_model.model
    out: dict[str, torch.Tensor] = {}
    for name, t in llava.state_dict().items():
        if name.startswith(VISION_PREFIXES) and "lora_" not in name:
            out[name] = t.detach().clone().contiguous()
    for name, mod in llava.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            out[f"lora.{name}.A"] = mod.lora_A["default"].weight.detach().clone().contiguous()
            out[f"lora.{name}.B"] = mod.lora_B["default"].weight.detach().clone().contiguous()
    emb = llava.get_input_embeddings().weight
    out["image_row"] = emb[llava.config.image_token_id].detach().clone().contiguous()
    if not any(k.startswith("lora.") for k in out):
        raise CheckpointError("No LoRA adapters found on the trained model; expected peft's lora_A/lora_B modules.")
    return out


def save_delta(delta: dict[str, torch.Tensor], path: str | Path, base_dir: Path, cfg: Any, card: dict) -> Path:
    """Write the delta (safetensors, metadata) and its sidecar (sha256, size, ``card``), each atomically."""
    from safetensors.torch import save_file

    from ..base_lm import MANIFEST as BASE_MANIFEST
    from ..base_lm import sha256_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base_sha = json.loads((base_dir / BASE_MANIFEST).read_text())["weights_sha256"]["model.safetensors"]
    meta = {"format": FORMAT, "base_weights_sha256": base_sha, "lora_scale": repr(cfg.lora_alpha / cfg.lora_rank),
            "train_config": json.dumps(cfg.to_dict())}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(delta, str(tmp), metadata=meta)
    tmp.chmod(0o644)
    tmp.replace(path)
    side = {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size, **card}
    tmp = path.with_name(f".{path.name}.json.tmp")
    tmp.write_text(json.dumps(side, indent=2))
    tmp.replace(sidecar_of(path))
    return path


def read_delta(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str], dict]:
    """``(tensors, metadata, sidecar)`` of a delta file, refusing a missing sidecar, a hash mismatch or a foreign
    format."""
    from safetensors import safe_open

    from ..base_lm import sha256_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No SmolLLaVA delta at {path}.")
    side_path = sidecar_of(path)
    if not side_path.is_file():
        raise CheckpointError(f"{path} has no sidecar {side_path.name} (its sha256 and model card); a delta is "
                              "shipped or written by `modality-circuits train-smollava` together with it.")
    side = json.loads(side_path.read_text())
    got = sha256_file(path)
    if got != side.get("sha256"):
        raise CheckpointError(f"{path} has sha256 {got}, its sidecar records {side.get('sha256')}: the delta file is "
                              "corrupted or was replaced. Restore it (`git checkout -- <file>`) or retrain it.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}).") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}.")
    return tensors, meta, side


def merge_delta(model: Any, tensors: dict[str, torch.Tensor], scale: float) -> None:
    """Load the vision side, merge every LoRA pair and set the ``<image>`` row, in place, checking every key and
    shape: each adapted module needs both factors, and no key may go unused."""
    state = model.state_dict()
    used: set[str] = set()
    for k, t in tensors.items():
        if k.startswith(VISION_PREFIXES):
            if k not in state:
                raise CheckpointError(f"Delta key {k!r} names no parameter of the rebuilt model (another vision "
                                      "spec?).")
            if state[k].shape != t.shape:
                raise CheckpointError(f"Delta key {k!r} has shape {tuple(t.shape)}, the model {tuple(state[k].shape)}.")
            used.add(k)
    vision_keys = [k for k in state if k.startswith(VISION_PREFIXES)]
    missing = [k for k in vision_keys if k not in tensors]
    if missing:
        raise CheckpointError(f"The delta lacks {len(missing)} vision-side tensors, e.g. {missing[:3]}.")
    model.load_state_dict({k: tensors[k] for k in vision_keys}, strict=False)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for k in sorted(t for t in tensors if t.startswith("lora.") and t.endswith(".A")):
            name = k[len("lora."):-len(".A")]
            kb = f"lora.{name}.B"
            if kb not in tensors:
                raise CheckpointError(f"Delta has {k!r} but not {kb!r}.")
            mod = modules.get(name)
            if not isinstance(mod, torch.nn.Linear):
                raise CheckpointError(f"Delta adapter {name!r} names no linear layer of the rebuilt model.")
            a, b = tensors[k], tensors[kb]
            if a.shape[1] != mod.in_features or b.shape[0] != mod.out_features or a.shape[0] != b.shape[1]:
                raise CheckpointError(f"Delta adapter {name!r}: A {tuple(a.shape)}, B {tuple(b.shape)} do not fit "
                                      f"weight {tuple(mod.weight.shape)}.")
            mod.weight += scale * (b.float() @ a.float())  # [d_out, d_in]
            used.update((k, kb))
        row = tensors.get("image_row")
        emb = model.get_input_embeddings().weight
        if row is None or row.shape != emb.shape[1:]:
            raise CheckpointError(f"Delta image_row missing or of the wrong shape (embedding width {emb.shape[1]}).")
        emb[model.config.image_token_id] = row
        used.add("image_row")
    unused = sorted(set(tensors) - used)
    if unused:
        raise CheckpointError(f"Delta keys the model does not use: {unused[:5]}.")


def is_materialised(folder: Path, sha: str) -> bool:
    m = folder / MANIFEST
    if not m.is_file():
        return False
    man = json.loads(m.read_text())
    return man.get("delta_sha256") == sha and all((folder / n).is_file() and (folder / n).stat().st_size == s
                                                  for n, s in man.get("files", {}).items())


def materialise(delta: str | Path | None = None, cache: Path | None = None, download: bool = True) -> Path:
    """A plain LLaVA checkpoint folder of base + delta in the cache (built on first use; idempotent).

    Raises:
        CheckpointError: no base (and it cannot be fetched), a corrupted delta, a delta trained on another base, or
            any key/shape mismatch; the message says which.
    """
    from ..base_lm import MANIFEST as BASE_MANIFEST
    from ..base_lm import cache_dir, ensure_base
    from .build import build_smollava, save_smollava
    from .train import SmolTrainConfig

    path = Path(delta) if delta is not None else shipped_delta()
    tensors, meta, side = read_delta(path)
    cache = cache or cache_dir()
    target = cache / f"smollava-{side['sha256'][:12]}"
    if is_materialised(target, side["sha256"]):
        return target
    base = ensure_base(cache, download=download)
    base_sha = json.loads((base / BASE_MANIFEST).read_text())["weights_sha256"]["model.safetensors"]
    if meta.get("base_weights_sha256") != base_sha:
        raise CheckpointError(f"{path.name} was trained on base weights {meta.get('base_weights_sha256')}, the cached "
                              f"base in {base} is {base_sha}: delta and base do not match (another base release?).")
    cfg = SmolTrainConfig.from_dict(json.loads(meta["train_config"]))
    model, tok, proc = build_smollava(base, cfg.vision, seed=cfg.seed)
    merge_delta(model, tensors, float(meta["lora_scale"]))
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".materialise-") as tmp:
        out = Path(tmp) / "out"
        save_smollava(model, tok, proc, out, cfg.vision, distractors=cfg.distractors)
        files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
        (out / MANIFEST).write_text(json.dumps({"delta": str(path), "delta_sha256": side["sha256"],
                                                "base_weights_sha256": base_sha, "files": files}, indent=2))
        if target.exists():
            shutil.rmtree(target)
        out.replace(target)
    logger.info("SmolLLaVA materialised in %s", target)
    return target


__all__ = ["FORMAT", "extract_delta", "is_materialised", "materialise", "merge_delta", "read_delta", "save_delta",
           "shipped_delta", "sidecar_of"]
