"""The toy MLLM's parts: a word-level HF tokenizer, its chat layout, and a small LLaVA config.

The toy model is an ordinary ``LlavaForConditionalGeneration`` (CLIP vision tower + MLP projector + Llama
decoder) saved as a normal HF checkpoint, so it loads through ``HookedMLLM.from_pretrained`` like any LLaVA.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from ..data.synthetic import vocabulary
from ..prompts import ChatTemplate
from ..resources import toy_model_path

TOY_SYSTEM = "You are a careful visual assistant."
TOY_TEMPLATE = ChatTemplate(system=TOY_SYSTEM + " ", user_prefix="USER: ", sep="\n", image_sep="\n",
                            assistant_prefix="\nASSISTANT:")
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]


@dataclass
class ToyConfig:
    """Architecture and training hyper-parameters of the toy MLLM (all seeded)."""

    seed: int = 0
    image_size: int = 32
    patch_size: int = 8
    d_vision: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    d_model: int = 128
    n_layers: int = 6
    n_heads: int = 8
    d_mlp: int = 256
    n_train: int = 24000
    steps: int = 570
    batch_size: int = 48
    lr: float = 2e-3
    vision_lr_mult: float = 1.0  # step multiplier for the projector (and the vision tower when not frozen)
    vision_pretrain_steps: int = 800  # stage 1: vision tower + projector learn the scene attributes (0 = skip)
    vision_pretrain_batch: int = 128
    vision_pretrain_lr: float = 3e-3
    freeze_vision: bool = True  # stage 2 trains projector + decoder with the vision tower frozen (as LLaVA does)
    weight_decay: float = 0.01
    warmup: int = 150
    max_minutes: float = 14.5
    threads: int = 1  # single-threaded: bitwise reproducible for a given seed, and robust on shared cores

    def to_dict(self) -> dict:
        return asdict(self)


def word_level_tokenizer(extra_text: str = "") -> Any:
    """A word-level fast tokenizer over the synthetic vocabulary and the toy template (BOS prepended)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = list(vocabulary())
    for w in re.findall(r"\w+|[^\w\s]+", TOY_SYSTEM + " USER: ASSISTANT: " + extra_text):
        if w not in words:
            words.append(w)
    vocab = {t: i for i, t in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                   padding_side="left")


def toy_llava(tokenizer: Any, cfg: ToyConfig) -> Any:
    """A freshly initialised toy ``LlavaForConditionalGeneration`` (eager attention)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
                       num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                       num_key_value_heads=cfg.n_heads, max_position_embeddings=256, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = CLIPVisionConfig(hidden_size=cfg.d_vision, intermediate_size=4 * cfg.d_vision,
                              num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                              image_size=cfg.image_size, patch_size=cfg.patch_size, projection_dim=cfg.d_vision)
    lcfg = LlavaConfig(vision_config=vision, text_config=text,
                       image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                       vision_feature_layer=-1, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu")
    lcfg._attn_implementation = "eager"
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(lcfg)
    model.config._attn_implementation = "eager"
    return model


def load_or_init_toy(path: Any = None) -> tuple[Any, str]:
    """The shipped toy model as a HookedMLLM (``assets/toy-llava``), or, where it is absent, a freshly
    initialised one of the same architecture; returns ``(model, description)`` (benchmarks use it)."""
    from pathlib import Path

    from ..models import HookedMLLM

    path = Path(path) if path is not None else toy_model_path()
    if (path / "config.json").exists():
        return HookedMLLM.from_pretrained(path), f"shipped toy model ({path.name})"
    tok = word_level_tokenizer()
    return (HookedMLLM.from_hf(toy_llava(tok, ToyConfig()), tok, template=TOY_TEMPLATE),
            "freshly initialised toy (ToyConfig defaults)")


def save_checkpoint(model: Any, tokenizer: Any, out_dir: Any, image_size: int | None = None) -> Any:
    """Write a toy model the way every checkpoint ships: safetensors, tokenizer, Pil image processor and
    ``prompt_template.json`` (so ``HookedMLLM.from_pretrained`` picks up the toy chat layout)."""
    import json
    from pathlib import Path

    from ..models.llava import LlavaAdapter

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    size = image_size or int(model.config.vision_config.image_size)
    LlavaAdapter.default_image_processor(size).save_pretrained(out)
    (out / "prompt_template.json").write_text(json.dumps(TOY_TEMPLATE.__dict__, indent=2))
    return out
