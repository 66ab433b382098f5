"""Loading a local HF MLLM checkpoint directory: safetensors only (pickle needs an explicit opt-in), no hub.

Checks, each with a message that says how to fix it: the directory exists, ``config.json`` names a supported
architecture, weights exist as ``*.safetensors`` (a ``.bin``-only checkpoint is refused unless
``allow_pickle=True``), a fast tokenizer is present. Optional files: ``preprocessor_config.json`` (image
processor; the Pil variant is used, never torchvision) and ``prompt_template.json`` (a
:class:`~modality_circuits.prompts.ChatTemplate` as JSON).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..prompts import ChatTemplate
from .base import adapter_for

logger = logging.getLogger(__name__)

TEMPLATE_FILE = "prompt_template.json"


def _check_dir(path: Path, allow_pickle: bool) -> dict:
    if not path.exists():
        raise CheckpointError(f"Checkpoint directory {str(path)!r} does not exist. Pass a local HF model folder "
                              "(config.json + *.safetensors + tokenizer files); the hub is never contacted.")
    if not path.is_dir():
        raise CheckpointError(f"{str(path)!r} is a file; pass the checkpoint *directory* that holds config.json.")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"No config.json in {str(path)!r}. Is this an HF checkpoint folder "
                              "(save_pretrained output)?")
    config = read_json(cfg_file, "the model config")
    arch = (config.get("architectures") or [None])[0]
    if arch is None:
        raise CheckpointError(f"{cfg_file} has no 'architectures' entry; add e.g. "
                              '"architectures": ["LlavaForConditionalGeneration"].')
    adapter_for(arch)  # raises UnsupportedArchitectureError listing the supported ones
    if not list(path.glob("*.safetensors")):
        bins = list(path.glob("*.bin")) + list(path.glob("*.pt")) + list(path.glob("*.pth"))
        if bins and not allow_pickle:
            raise CheckpointError(
                f"{str(path)!r} holds only pickle weights ({bins[0].name}); pickle can run arbitrary code when "
                "loaded. Convert it to safetensors (model.save_pretrained(dir, safe_serialization=True)) or, if "
                "you trust the file, pass allow_pickle=True.")
        if not bins:
            raise CheckpointError(f"No weights (*.safetensors) found in {str(path)!r}.")
    if not ((path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists()):
        raise CheckpointError(f"No tokenizer files (tokenizer.json / tokenizer_config.json) in {str(path)!r}; "
                              "save the tokenizer next to the model (tokenizer.save_pretrained(dir)).")
    slow_files = ("tokenizer.model", "vocab.json", "spiece.model")
    if not (path / "tokenizer.json").exists() and not any((path / f).exists() for f in slow_files):
        raise CheckpointError(f"{str(path)!r} has tokenizer_config.json but no tokenizer file (tokenizer.json, or "
                              f"one of {list(slow_files)}); copy the tokenizer files from the original checkpoint.")
    for f in sorted(path.glob("*.safetensors")):
        check_safetensors(f)
    return config


def read_json(file: Path, what: str) -> Any:
    """Parse a JSON file; a syntax error names the file, line and column."""
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} ({what}) is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}. "
                              "Fix or re-save the file.") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{file} ({what}) is not a UTF-8 text file.") from None


def check_safetensors(file: Path) -> None:
    """Open a safetensors file's header (a truncated or corrupted file is refused by name)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            f.keys()
    except Exception as e:  # safetensors raises its own SafetensorError (no public class to catch)
        raise CheckpointError(f"{file} is not a readable safetensors file ({e}); it is probably truncated or "
                              "corrupted. Download or save it again.") from None


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device that exists here (clear error for a typo or a missing accelerator)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise CheckpointError(f"Unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'mps'.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CheckpointError(f"Device {device!r} was asked for but CUDA is not available here; use 'cpu'.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CheckpointError(f"Device {device!r} does not exist: this machine has {torch.cuda.device_count()} "
                                  "CUDA device(s).")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise CheckpointError(f"Device {device!r} was asked for but MPS is not available here; use 'cpu'.")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise CheckpointError(f"Device type {dev.type!r} is not supported; use 'cpu', 'cuda' or 'mps'.")
    return dev


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``torch.float32`` / ``"bfloat16"`` / … -> a floating torch dtype (clear error otherwise)."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None) if dtype in ("float32", "float16", "bfloat16", "float64") else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(f"dtype must be one of float32, bfloat16, float16, float64; got {dtype!r}.")
    return dtype


def load_hf_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32, allow_pickle: bool = False
                       ) -> tuple[Any, Any, Any, ChatTemplate | None]:
    """(HF model in eager attention, fast tokenizer, image processor or None, template or None)."""
    import transformers
    from transformers import AutoTokenizer

    path = Path(path)
    config = _check_dir(path, allow_pickle)
    arch = config["architectures"][0]
    hf_cls = getattr(transformers, arch)
    use_st = bool(list(path.glob("*.safetensors")))
    try:
        hf_model, info = hf_cls.from_pretrained(path, dtype=dtype, attn_implementation="eager", local_files_only=True,
                                                use_safetensors=use_st, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"transformers could not load {str(path)!r}: {e}") from None
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems or info.get("error_msgs"):
        detail = "; ".join(f"{k} ({len(v)}): {[str(x) for x in v[:4]]}{' …' if len(v) > 4 else ''}"
                           for k, v in problems.items())
        raise CheckpointError(
            f"config.json and the weights in {str(path)!r} disagree: {detail or info.get('error_msgs')}. "
            "(HF would initialise missing weights randomly or drop unexpected ones.) Check num_hidden_layers and "
            "the other sizes in config.json against the checkpoint.")
    hf_model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=True)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"The tokenizer in {str(path)!r} could not be loaded: {e}") from None
    if not getattr(tokenizer, "chat_template", None):  # processors keep the template next to the tokenizer
        if (path / "chat_template.jinja").exists():
            tokenizer.chat_template = (path / "chat_template.jinja").read_text()
        elif (path / "chat_template.json").exists():
            tmpl = read_json(path / "chat_template.json", "the processor's chat template")
            tokenizer.chat_template = tmpl.get("chat_template") if isinstance(tmpl, dict) else None
    if not getattr(tokenizer, "is_fast", False):
        raise CheckpointError(f"The tokenizer in {str(path)!r} is not a fast tokenizer (token offsets are needed for "
                              "spans); save it with tokenizer.json "
                              "(AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(dir)).")
    image_processor = None
    if (path / "preprocessor_config.json").exists():
        image_processor = load_image_processor(path)
    template = None
    if (path / TEMPLATE_FILE).exists():
        template = read_template(path / TEMPLATE_FILE)
    logger.info("loaded %s from %s", arch, path)
    return hf_model, tokenizer, image_processor, template


def read_template(file: Path) -> ChatTemplate:
    """A :class:`ChatTemplate` from JSON (unknown or non-string fields are named in the error)."""
    import dataclasses

    data = read_json(file, "the prompt layout")
    fields = {f.name for f in dataclasses.fields(ChatTemplate)}
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} must hold a JSON object with fields {sorted(fields)}; "
                              f"got {type(data).__name__}.")
    unknown = sorted(set(data) - fields)
    bad = sorted(k for k, v in data.items() if k in fields and not isinstance(v, str))
    if unknown or bad:
        raise CheckpointError(f"{file}: unknown fields {unknown}, non-string fields {bad}; the fields are "
                              f"{sorted(fields)} (all strings).")
    return ChatTemplate(**data)


def load_image_processor(path: Path) -> Any:
    """The Pil image processor named in ``preprocessor_config.json`` (never a torchvision one)."""
    import transformers

    pc = read_json(path / "preprocessor_config.json", "the image processor config")
    name = pc.get("image_processor_type", "CLIPImageProcessor").replace("Fast", "")
    pil_name = name if name.endswith("Pil") else name + "Pil"
    cls = getattr(transformers, pil_name, None)
    if cls is None:
        raise CheckpointError(f"Image processor {name!r} has no Pil variant ({pil_name}) in transformers; "
                              "torchvision-based processors are not used here.")
    return cls.from_pretrained(path, local_files_only=True)
