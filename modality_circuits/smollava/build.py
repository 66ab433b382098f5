"""SmolLLaVA: a real ``LlavaForConditionalGeneration`` built on the pretrained SmolLM2-135M-Instruct decoder.

The decoder, its tokenizer and its ChatML layout (with the default system prompt it was trained with) come from the
base checkpoint (:func:`modality_circuits.base_lm.ensure_base`); a small CLIP-style vision tower and a two-layer
projector are new. ``<image>`` becomes a proper special token, as LLaVA-HF checkpoints have it: the tokenizer gains
it, and the embedding matrix (tied with the unembedding) gains one row, initialised to the mean embedding (what
``resize_token_embeddings`` does). The chat template is SmolLM2's ChatML, extended to typed content so an image
item renders as ``<image>\\n`` inside the user turn; text-only conversations render exactly as the base's own
template does.

The result is a plain HF model: ``save_pretrained`` writes an ordinary LLaVA checkpoint folder that
:meth:`HookedMLLM.from_pretrained <modality_circuits.models.HookedMLLM.from_pretrained>` loads like any other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

IMAGE_TOKEN = "<image>"
#: SmolLM2-Instruct's default system prompt (the one its own chat template inserts).
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

#: SmolLM2's ChatML template, extended to typed content (``{"type": "image"}`` -> ``<image>\n``).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SMOL_SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class VisionSpec:
    """The new vision side: a CLIP vision transformer on ``image_size`` px images in ``patch_size`` px patches
    (``(image_size / patch_size)²`` image tokens, CLS dropped) and a GELU MLP projector to the decoder's width."""

    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 192
    intermediate_size: int = 768
    num_layers: int = 4
    num_heads: int = 4
    feature_layer: int = -2

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def build_smollava(base_dir: str | Path, vision: VisionSpec = VisionSpec(), seed: int = 0) -> tuple[Any, Any, Any]:
    """``(LlavaForConditionalGeneration, tokenizer, image processor)``: the base decoder's weights, a freshly
    initialised (seeded) vision tower and projector, and the ``<image>`` token added (eager attention, fp32)."""
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        LlamaConfig,
        LlamaForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from ..models.llava import LlavaAdapter

    base_dir = Path(base_dir)
    if not (base_dir / "config.json").is_file():
        raise CheckpointError(f"{base_dir} holds no base checkpoint; run `modality-circuits fetch-base`.")
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    if IMAGE_TOKEN in tok.get_vocab():
        raise CheckpointError(f"The base tokenizer already has {IMAGE_TOKEN!r}; expected the plain SmolLM2 base.")
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)

    lm = LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    text_cfg: LlamaConfig = lm.config
    old = lm.get_input_embeddings().weight.detach()
    text = LlamaConfig(**{**text_cfg.to_dict(), "vocab_size": len(tok)})
    vcfg = CLIPVisionConfig(hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
                            num_hidden_layers=vision.num_layers, num_attention_heads=vision.num_heads,
                            image_size=vision.image_size, patch_size=vision.patch_size,
                            projection_dim=vision.hidden_size)
    cfg = LlavaConfig(vision_config=vcfg, text_config=text, image_token_id=image_id,
                      vision_feature_layer=vision.feature_layer, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu", tie_word_embeddings=text_cfg.tie_word_embeddings)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    lm_state = {k.removeprefix("model."): v for k, v in lm.state_dict().items() if k != "lm_head.weight"}
    emb = torch.cat([old, old.mean(0, keepdim=True)])  # the new <image> row: the mean embedding
    lm_state["embed_tokens.weight"] = emb
    missing, unexpected = model.model.language_model.load_state_dict(lm_state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"The base decoder does not fill the LLaVA language model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}.")
    if not text_cfg.tie_word_embeddings:
        raise CheckpointError("SmolLLaVA expects the base's tied embeddings (tie_word_embeddings=True).")
    model.tie_weights()
    model.config._attn_implementation = "eager"
    processor = LlavaAdapter.default_image_processor(vision.image_size)
    return model.eval(), tok, processor


def save_smollava(model: Any, tokenizer: Any, processor: Any, out: str | Path, vision: VisionSpec | None = None,
                  distractors: int | None = None) -> Path:
    """Write a plain LLaVA checkpoint folder (safetensors, tokenizer with the chat template, processor config);
    ``distractors``: the synthetic contexts it was trained on, recorded for the analyses
    (:func:`~modality_circuits.data.synthetic.checkpoint_data_spec`)."""
    import json

    from ..data.synthetic import DATA_SPEC_FILE

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    if vision is not None:
        (out / "smollava.json").write_text(json.dumps({"vision": asdict(vision)}, indent=2))
    if distractors is not None:
        (out / DATA_SPEC_FILE).write_text(json.dumps({"distractors": distractors}, indent=2))
    return out


__all__ = ["CHAT_TEMPLATE", "IMAGE_TOKEN", "SMOL_SYSTEM", "VisionSpec", "build_smollava", "save_smollava"]
