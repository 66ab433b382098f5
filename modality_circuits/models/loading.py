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
    config = json.loads(cfg_file.read_text())
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
    return config


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
    hf_model = hf_cls.from_pretrained(path, dtype=dtype, attn_implementation="eager", local_files_only=True,
                                      use_safetensors=use_st)
    hf_model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=True)
    image_processor = None
    if (path / "preprocessor_config.json").exists():
        image_processor = load_image_processor(path)
    template = None
    if (path / TEMPLATE_FILE).exists():
        template = ChatTemplate(**json.loads((path / TEMPLATE_FILE).read_text()))
    logger.info("loaded %s from %s", arch, path)
    return hf_model, tokenizer, image_processor, template


def load_image_processor(path: Path) -> Any:
    """The Pil image processor named in ``preprocessor_config.json`` (never a torchvision one)."""
    import transformers

    pc = json.loads((path / "preprocessor_config.json").read_text())
    name = pc.get("image_processor_type", "CLIPImageProcessor").replace("Fast", "")
    pil_name = name if name.endswith("Pil") else name + "Pil"
    cls = getattr(transformers, pil_name, None)
    if cls is None:
        raise CheckpointError(f"Image processor {name!r} has no Pil variant ({pil_name}) in transformers; "
                              "torchvision-based processors are not used here.")
    return cls.from_pretrained(path, local_files_only=True)
