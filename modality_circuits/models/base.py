"""The adapter interface: what each MLLM architecture must provide, and the registry by HF class name.

An :class:`Adapter` is an ``nn.Module`` holding the architecture's image encoder (vision tower + projector),
and knows how to (1) find the text config and decoder inside the HF model, (2) turn images into the encoder's
inputs and a token count per image, (3) encode them into ``[img_tok, d_model]`` features injected at the image
positions, and (4) the default chat layout. One file per architecture registers itself with
:func:`register_adapter`; the loader looks the HF class name up in :data:`ADAPTERS` (no if/elif chains).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from .._types import Float
from ..errors import UnsupportedArchitectureError
from ..prompts import ChatTemplate
from .rope import RopeSpec, install_hf_rotary

ADAPTERS: dict[str, type[Adapter]] = {}


@dataclass(frozen=True)
class ImageGrid:
    """How one image's tokens lie on its patch grid: ``rows × cols`` tokens in row-major order (after a CLS token
    when ``has_cls``). ``part``: the grid covers only the image's sub-group ``image.N.<part>`` (LLaVA-NeXT's
    ``base`` tile)."""

    rows: int
    cols: int
    has_cls: bool = False
    part: str | None = None

    @property
    def n_tokens(self) -> int:
        return self.rows * self.cols + int(self.has_cls)


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: register an adapter under its ``hf_class`` name(s)."""
    for name in cls.hf_classes:
        ADAPTERS[name] = cls
    return cls


def adapter_for(hf_class_name: str) -> type[Adapter]:
    """The registered adapter of an HF class name (architecture files register when ``models`` is imported)."""
    if hf_class_name not in ADAPTERS:
        raise UnsupportedArchitectureError(
            f"Architecture {hf_class_name!r} is not supported. Supported architectures: {sorted(ADAPTERS)}. "
            "Add one file under modality_circuits/models/ that subclasses Adapter and is decorated with "
            "@register_adapter.")
    return ADAPTERS[hf_class_name]


class Adapter(nn.Module):
    """Architecture-specific parts of a HookedMLLM. Subclasses set ``hf_classes`` and implement the methods."""

    hf_classes: ClassVar[tuple[str, ...]] = ()
    #: True when rotary positions depend on the images (M-RoPE): runs that do not start from the tokens need them.
    uses_rope_positions: ClassVar[bool] = False
    #: True when image tokens attend to each other both ways (Gemma 3): runs that do not start from the tokens need
    #: the blocks (:meth:`attention_blocks`), and a cached prefix may not end inside a block.
    bidirectional_images: ClassVar[bool] = False
    #: Number of decoder blocks after which extra image features are added (Qwen3-VL's DeepStack; 0: none); runs
    #: that do not start from the tokens need them (:meth:`encode_with_extras`).
    deepstack_layers: int = 0
    image_token: str
    image_token_id: int

    # ---------------------------------------------------------------- structure
    @staticmethod
    def text_config(hf_config: Any) -> Any:
        """The HF config of the language model inside the multimodal config (transformers 5 layout)."""
        return hf_config.text_config

    @staticmethod
    def language_model(hf_model: nn.Module) -> tuple[nn.Module, nn.Module]:
        """(decoder body with ``embed_tokens``/``layers``/``norm``, ``lm_head``) of the HF model
        (transformers 5 layout: ``model.model.language_model`` and ``model.lm_head``)."""
        return hf_model.model.language_model, hf_model.lm_head

    # ------------------------------------------------------------------- images
    def process_images(self, images: list[Any]) -> tuple[dict[str, Any], list[int]]:
        """PIL images (or pixel tensors) -> (encoder inputs, number of image tokens per image)."""
        raise NotImplementedError

    def encode_images(self, **model_inputs: Any) -> Float[Tensor, "img_tok d_model"]:
        """Encoder inputs -> projected features, flattened over images in order of appearance."""
        raise NotImplementedError

    def encode_with_extras(self, **model_inputs: Any) -> tuple[Float[Tensor, "img_tok d_model"], dict[str, Any]]:
        """:meth:`encode_images` plus what else the vision tower gives the decoder (``{"deepstack": (…)}`` for
        Qwen3-VL; ``{}`` by default), from one pass of the tower."""
        return self.encode_images(**model_inputs), {}

    def default_template(self) -> ChatTemplate:
        return ChatTemplate()

    @property
    def template_placeholder(self) -> str:
        """What the checkpoint's chat template writes for one image (replaced by the image's tokens); the image
        token itself unless the processor expands another marker (Gemma 3's ``<start_of_image>``)."""
        return self.image_token

    @property
    def native_image_size(self) -> int | None:
        """The square size (pixels) images are encoded at, when the architecture has one (LLaVA's fixed input);
        None where the processor keeps each image's own size (Qwen-VL)."""
        return None

    @property
    def fixed_tokens_per_image(self) -> int | None:
        """Image tokens per image when every image gives the same count (LLaVA), else None (Qwen-VL: per grid)."""
        return None

    def image_grid(self, model_inputs: dict[str, Any], k: int) -> ImageGrid:
        """The patch grid of the ``k``-th image of a batch's encoder inputs (for attention-over-image views)."""
        raise NotImplementedError(f"{type(self).__name__} does not describe its image grid.")

    def image_pixels(self, model_inputs: dict[str, Any], k: int) -> np.ndarray | None:
        """The ``k``-th image as the encoder saw it, ``uint8 [height, width, 3]`` (None if it cannot be shown)."""
        return None

    def _denormalize(self, pv: Tensor) -> np.ndarray:
        """Normalised pixels ``[3, H, W]`` -> ``uint8 [H, W, 3]`` with the image processor's mean/std."""
        proc = getattr(self, "image_processor", None)
        mean = np.asarray(getattr(proc, "image_mean", None) or [0.5, 0.5, 0.5], dtype=np.float32)
        std = np.asarray(getattr(proc, "image_std", None) or [0.5, 0.5, 0.5], dtype=np.float32)
        x = pv.detach().float().cpu().numpy().transpose(1, 2, 0) * std + mean
        return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)

    # ---------------------------------------------------------------- positions
    def install(self, model: nn.Module, rope: RopeSpec | tuple[RopeSpec, ...] | None) -> None:
        """Set up the HookedTransformer's rotary embedding once it is built. Default: HF's 1-D rotary tables
        (:func:`~modality_circuits.models.rope.install_hf_rotary`); M-RoPE adapters override this."""
        if rope is not None:
            install_hf_rotary(model, rope)

    def rope_positions(self, tokens: Tensor, attention_mask: Tensor, model_inputs: dict[str, Any]) -> Tensor | None:
        """Architecture-specific rotary positions of a full prompt (``[3, batch, pos]`` for M-RoPE), or None
        to use TransformerLens's 1-D positions from the attention mask."""
        return None

    def attention_blocks(self, tokens: Tensor, attention_mask: Tensor, model_inputs: dict[str, Any]
                         ) -> Tensor | None:
        """``Int[Tensor, "batch pos"]`` bidirectional block id of every position (``-1`` outside blocks), or None
        for causal attention only (the default)."""
        return None

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")
