"""Tiny random HF models and tokenizers built offline from configs, for tests, benchmarks and examples.

Nothing here touches the hub: tokenizers are trained in memory with ``tokenizers`` (a SentencePiece-like
BPE with a ``▁`` prefix, as Llama's) and models are random-initialised from small configs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

DEFAULT_CORPUS = (
    "Text context: the shape in the image is a red circle.\n In case there is an inconsistency between the Text "
    "Context and the input image content, you must rely on the image content rather than the text context. "
    "you must rely on the text context rather than the input image content. What is the color of the shape? "
    "Answer the question using a single word or phrase. Answer with one word. blue green yellow square triangle "
    "A chat between a curious human and an artificial intelligence assistant. USER: ASSISTANT: how many left right"
)


def tiny_bpe_tokenizer(corpus: Sequence[str] | str = DEFAULT_CORPUS, vocab_size: int = 300,
                       image_token: str = "<image>", extra_specials: Sequence[str] = ()) -> Any:
    """A Llama-style fast tokenizer (BPE, ``▁`` word prefix, BOS prepended) with ``image_token`` special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", image_token, *extra_specials]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator([corpus] if isinstance(corpus, str) else list(corpus), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": image_token},
                                   padding_side="left")


def tiny_llava(tokenizer: Any, *, decoder: str = "llama", n_layers: int = 2, d_model: int = 64, n_heads: int = 4,
               n_kv_heads: int | None = None, d_mlp: int = 128, image_size: int = 32, patch_size: int = 8,
               vision_layers: int = 2, d_vision: int = 32, vision_feature_layer: int | list[int] = -2,
               vision_feature_select_strategy: str = "default", seed: int = 0, vocab_pad: int = 0,
               text_overrides: dict[str, Any] | None = None) -> Any:
    """A random ``LlavaForConditionalGeneration`` (eager attention, fp32) sized for unit tests.

    ``text_overrides``: extra text-config fields (``rope_parameters``, ``attention_bias``, ``layer_types`` …)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        MistralConfig,
        Qwen2Config,
    )

    text_cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[decoder]
    vocab = len(tokenizer) + vocab_pad
    text_kw = dict(vocab_size=vocab, hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
                   num_attention_heads=n_heads, num_key_value_heads=n_kv_heads or n_heads,
                   max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
                   pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    text = text_cls(**{**text_kw, **(text_overrides or {})})
    vision = CLIPVisionConfig(hidden_size=d_vision, intermediate_size=2 * d_vision, num_hidden_layers=vision_layers,
                              num_attention_heads=4, image_size=image_size, patch_size=patch_size,
                              projection_dim=d_vision)
    cfg = LlavaConfig(vision_config=vision, text_config=text,
                      image_token_id=tokenizer.convert_tokens_to_ids(tokenizer.image_token),
                      vision_feature_layer=vision_feature_layer,
                      vision_feature_select_strategy=vision_feature_select_strategy, projector_hidden_act="gelu")
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    with torch.no_grad():  # random init is tiny; widen it so that differences show up in tests
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    model.config._attn_implementation = "eager"
    return model.eval()


def random_images(n: int, size: int = 32, seed: int = 0) -> list[Any]:
    """``n`` random RGB PIL images."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


QWEN_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")


def tiny_qwen_tokenizer(corpus: Sequence[str] | str = DEFAULT_CORPUS, vocab_size: int = 300) -> Any:
    """A tiny fast tokenizer with Qwen-VL's special tokens (``<|image_pad|>`` as the image token)."""
    return tiny_bpe_tokenizer(corpus, vocab_size, image_token="<|image_pad|>", extra_specials=QWEN_SPECIALS)


def tiny_qwen_vl(tokenizer: Any, *, version: str = "2", n_layers: int = 2, d_model: int = 64, n_heads: int = 4,
                 n_kv_heads: int = 2, d_mlp: int = 128, mrope_section: Sequence[int] = (2, 3, 3),
                 patch_size: int = 4, vision_depth: int = 2, d_vision: int = 32, seed: int = 0,
                 text_overrides: dict[str, Any] | None = None) -> Any:
    """A random ``Qwen2VLForConditionalGeneration`` (``version="2"``), ``Qwen2_5_VLForConditionalGeneration``
    (``"2.5"``) or ``Qwen3VLForConditionalGeneration`` (``"3"``), eager attention, fp32. Use with
    ``Qwen2VLImageProcessorPil(patch_size=patch_size, ...)``."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (*QWEN_SPECIALS, "<|image_pad|>")}
    text = dict(vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
                num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, max_position_embeddings=512,
                rms_norm_eps=1e-5, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(mrope_section)},
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)
    for k, v in (text_overrides or {}).items():  # rope_parameters overrides merge (mrope_section stays)
        text[k] = {**text[k], **v} if k == "rope_parameters" else v
    common = dict(image_token_id=ids["<|image_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                  vision_end_token_id=ids["<|vision_end|>"], video_token_id=ids["<|im_end|>"])
    if version == "2":
        vision = dict(depth=vision_depth, embed_dim=d_vision, hidden_size=d_model, num_heads=4, mlp_ratio=2,
                      patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2)
        cfg, cls = Qwen2VLConfig(text_config=text, vision_config=vision, **common), Qwen2VLForConditionalGeneration
    elif version == "2.5":
        vision = dict(depth=vision_depth, hidden_size=d_vision, out_hidden_size=d_model, intermediate_size=2 * d_vision,
                      num_heads=4, patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2,
                      window_size=4 * patch_size, fullatt_block_indexes=[vision_depth - 1])
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
        cls = Qwen2_5_VLForConditionalGeneration
    elif version == "3":  # interleaved M-RoPE, per-head q/k norms, DeepStack after the first two decoder blocks
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        text = {k: v for k, v in text.items() if k not in ("tie_word_embeddings", "bos_token_id", "eos_token_id")}
        text.update(head_dim=d_model // n_heads)
        vision = dict(depth=vision_depth, hidden_size=d_vision, out_hidden_size=d_model, intermediate_size=2 * d_vision,
                      num_heads=4, patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2,
                      num_position_embeddings=16, deepstack_visual_indexes=list(range(min(2, vision_depth))))
        cfg = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **common)
        cls = Qwen3VLForConditionalGeneration
    else:
        raise ValueError(f"version must be '2', '2.5' or '3', got {version!r}")
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
            else:  # norm weights stay near 1, biases get small random values
                is_norm_weight = bool(p.abs().mean() > 0.5)
                p.normal_(0, 0.05).add_(1.0 if is_norm_weight else 0.0)
    model.config._attn_implementation = "eager"
    return model.eval()


def _text_config(cls: Any, tokenizer: Any, d_model: int, d_mlp: int, n_layers: int, n_heads: int, n_kv_heads: int,
                 eps: float = 1e-6) -> Any:
    """A tiny decoder config of class ``cls`` over ``tokenizer`` (untied embeddings)."""
    return cls(vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
               num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, max_position_embeddings=2048,
               rms_norm_eps=eps, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def _random_model(cls: Any, cfg: Any, seed: int, newline: bool = False) -> Any:
    """``cls(cfg)`` seeded, eager attention, its matrices widened to N(0, 0.08) (and a learned ``image_newline`` to
    N(0, 0.5)) so that differences show up in tests."""
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
        if newline:
            model.model.image_newline.normal_(0, 0.5)
    model.config._attn_implementation = "eager"
    return model.eval()


def tiny_llava_next(tokenizer: Any, *, n_layers: int = 2, d_model: int = 64, n_heads: int = 4, n_kv_heads: int = 2,
                    d_mlp: int = 128, image_size: int = 32, patch_size: int = 8, vision_layers: int = 2,
                    d_vision: int = 32, grid_pinpoints: Sequence[Sequence[int]] = ((32, 64), (64, 32), (64, 64)),
                    seed: int = 0) -> Any:
    """A random ``LlavaNextForConditionalGeneration`` (CLIP tower, Llama decoder, anyres on ``grid_pinpoints``;
    eager attention, fp32)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    text = _text_config(LlamaConfig, tokenizer, d_model, d_mlp, n_layers, n_heads, n_kv_heads, eps=1e-5)
    vision = CLIPVisionConfig(hidden_size=d_vision, intermediate_size=2 * d_vision, num_hidden_layers=vision_layers,
                              num_attention_heads=4, image_size=image_size, patch_size=patch_size,
                              projection_dim=d_vision)
    cfg = LlavaNextConfig(vision_config=vision, text_config=text,
                          image_token_id=tokenizer.convert_tokens_to_ids(tokenizer.image_token),
                          image_grid_pinpoints=[list(p) for p in grid_pinpoints], vision_feature_layer=-2,
                          vision_feature_select_strategy="default", projector_hidden_act="gelu")
    return _random_model(LlavaNextForConditionalGeneration, cfg, seed, newline=True)


def tiny_llava_onevision(tokenizer: Any, *, n_layers: int = 2, d_model: int = 64, n_heads: int = 4,
                         n_kv_heads: int = 2, d_mlp: int = 128, image_size: int = 32, patch_size: int = 8,
                         vision_layers: int = 2, d_vision: int = 32, vision_aspect_ratio: str = "anyres_max_2",
                         seed: int = 0) -> Any:
    """A random ``LlavaOnevisionForConditionalGeneration`` (SigLIP tower, Qwen2 decoder; ``anyres_max_2`` so that
    tiny images already get their grid shrunk; eager attention, fp32)."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    text = _text_config(Qwen2Config, tokenizer, d_model, d_mlp, n_layers, n_heads, n_kv_heads)
    vision = SiglipVisionConfig(hidden_size=d_vision, intermediate_size=2 * d_vision, num_hidden_layers=vision_layers,
                                num_attention_heads=4, image_size=image_size, patch_size=patch_size)
    s = image_size
    pins = [[a * s, b * s] for a in range(1, 4) for b in range(1, 4)]
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text,
                               image_token_index=tokenizer.convert_tokens_to_ids(tokenizer.image_token),
                               image_grid_pinpoints=pins, vision_feature_layer=-1,
                               vision_feature_select_strategy="full", vision_aspect_ratio=vision_aspect_ratio)
    return _random_model(LlavaOnevisionForConditionalGeneration, cfg, seed, newline=True)


IDEFICS3_SPECIALS = ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>", "<|im_start|>",
                     *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)))


def tiny_idefics3_tokenizer(corpus: Sequence[str] | str = DEFAULT_CORPUS, vocab_size: int = 300) -> Any:
    """A tiny fast tokenizer with Idefics3/SmolVLM's image tags (``<image>`` is the image token)."""
    return tiny_bpe_tokenizer(corpus, vocab_size, extra_specials=IDEFICS3_SPECIALS)


def tiny_idefics3(tokenizer: Any, *, smolvlm: bool = False, n_layers: int = 2, d_model: int = 64, n_heads: int = 4,
                  n_kv_heads: int = 2, d_mlp: int = 128, image_size: int = 32, patch_size: int = 4,
                  vision_layers: int = 2, d_vision: int = 32, scale_factor: int = 2, seed: int = 0) -> Any:
    """A random ``Idefics3ForConditionalGeneration`` (or ``SmolVLMForConditionalGeneration``): vision transformer,
    pixel-shuffle connector, Llama decoder; eager attention, fp32; ``(image_size / patch_size / scale)²`` tokens
    per tile."""
    import transformers as tf

    prefix = "SmolVLM" if smolvlm else "Idefics3"
    text = _text_config(tf.LlamaConfig, tokenizer, d_model, d_mlp, n_layers, n_heads, n_kv_heads, eps=1e-5)
    vision = getattr(tf, f"{prefix}VisionConfig")(hidden_size=d_vision, intermediate_size=2 * d_vision,
                                                   num_hidden_layers=vision_layers, num_attention_heads=4,
                                                   image_size=image_size, patch_size=patch_size)
    cfg = getattr(tf, f"{prefix}Config")(vision_config=vision, text_config=text, scale_factor=scale_factor,
                                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    return _random_model(getattr(tf, f"{prefix}ForConditionalGeneration"), cfg, seed)


INTERNVL_SPECIALS = ("<img>", "</img>", "<|im_start|>", "<|im_end|>")


def tiny_internvl_tokenizer(corpus: Sequence[str] | str = DEFAULT_CORPUS, vocab_size: int = 300) -> Any:
    """A tiny fast tokenizer with InternVL's image tokens (``<IMG_CONTEXT>`` as the image token, ``<img>``,
    ``</img>``) and ChatML's."""
    return tiny_bpe_tokenizer(corpus, vocab_size, image_token="<IMG_CONTEXT>", extra_specials=INTERNVL_SPECIALS)


def tiny_internvl(tokenizer: Any, *, n_layers: int = 2, d_model: int = 64, n_heads: int = 4, n_kv_heads: int = 2,
                  d_mlp: int = 128, image_size: int = 32, patch_size: int = 4, vision_layers: int = 2,
                  d_vision: int = 32, vision_feature_layer: int = -1, use_qk_norm: bool = False, seed: int = 0
                  ) -> Any:
    """A random ``InternVLForConditionalGeneration`` (InternViT + pixel shuffle 0.5 + MLP projector + Qwen2
    decoder; eager attention, fp32): ``(image_size / patch_size / 2)²`` tokens per tile."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

    text = _text_config(Qwen2Config, tokenizer, d_model, d_mlp, n_layers, n_heads, n_kv_heads)
    vision = InternVLVisionConfig(hidden_size=d_vision, num_hidden_layers=vision_layers, num_attention_heads=4,
                                  intermediate_size=2 * d_vision, image_size=[image_size, image_size],
                                  patch_size=[patch_size, patch_size], use_qk_norm=use_qk_norm)
    cfg = InternVLConfig(vision_config=vision, text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
                         vision_feature_layer=vision_feature_layer, downsample_ratio=0.5, tie_word_embeddings=False)
    return _random_model(InternVLForConditionalGeneration, cfg, seed)


def tiny_toy_checkpoint(path: Any, seed: int = 0) -> Any:
    """A random 2-layer toy LLaVA saved in the shipped toy model's format (word-level tokenizer, prompt layout)."""
    from .toy.model import ToyConfig, save_checkpoint, toy_llava, word_level_tokenizer

    cfg = ToyConfig(d_model=32, n_layers=2, n_heads=4, d_mlp=64, d_vision=16, vision_layers=1, vision_heads=2,
                    seed=seed)
    tok = word_level_tokenizer()
    return save_checkpoint(toy_llava(tok, cfg), tok, path)


def tiny_base(folder: Any, seed: int = 0) -> Any:
    """A tiny stand-in for the converted SmolLM2 base in ``folder`` (a cache's ``smollm2-135m-instruct``): a 2-layer
    tied-embedding ``LlamaForCausalLM``, a BPE tokenizer with the ChatML specials, and a ``BASE.json`` manifest as
    :func:`modality_circuits.base_lm.ensure_base` writes it. For SmolLLaVA build/train/delta tests without the real
    base."""
    import json
    from pathlib import Path

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .base_lm import MANIFEST, sha256_file

    folder = Path(folder)
    tok = tiny_bpe_tokenizer(DEFAULT_CORPUS + " SmolLM Hugging Face helpful named trained four bottom purple",
                             image_token="<|endoftext|>", extra_specials=("<|im_start|>", "<|im_end|>"))
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|im_end|>"
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, rope_theta=100000.0, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    (folder / MANIFEST).write_text(json.dumps({"source": "tiny test base", "files": files, "weights_sha256": {
        "model.safetensors": sha256_file(folder / "model.safetensors")}}))
    return folder


def hf_positions(batch: Any) -> Any:
    """Position ids for HF's forward of a left-padded batch (HookedMLLM counts from each row's first token)."""
    return (batch.attention_mask.cumsum(1) - 1).clamp(min=0)


def hf_knockout_mask(batch: Any, src: Any, dst: Any, allow_empty: bool = False) -> Any:
    """HF's 4-D additive attention mask ``[batch, 1, q_pos, k_pos]`` (causal, padding, and ``src ↛ dst`` removed at
    every layer): the reference a knockout over all layers must equal."""
    from .interventions import edge_mask

    L = batch.seq_len
    allowed = (torch.tril(torch.ones(L, L, dtype=torch.bool))[None] & batch.attention_mask.bool()[:, None, :]
               & ~edge_mask(batch.spans, src, dst, allow_empty=allow_empty))
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None]


class DiesOnce:
    """Fault injection for executor tests: calls the function ``target`` (``"module:name"``, looked up in the worker),
    except that the first call in any process creates the file ``marker`` and kills that process (``os._exit``: a
    worker lost mid-unit). The marker is created atomically (``O_EXCL``), so of two workers starting at once exactly
    one dies."""

    def __init__(self, target: str, marker: str):
        self.target, self.marker = target, marker

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import importlib
        import os

        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass  # another process already died: run the unit
        else:
            os.write(fd, b"died")
            os.close(fd)
            os._exit(1)
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)(*args, **kwargs)


class SlowCalls:
    """For executor tests: calls the function ``target`` (``"module:name"``) after sleeping ``seconds`` (a unit long
    enough to be interrupted)."""

    def __init__(self, target: str, seconds: float):
        self.target, self.seconds = target, seconds

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import importlib
        import time

        time.sleep(self.seconds)
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)(*args, **kwargs)


def hf_parity(hf: Any, model: Any, batch: Any, max_new_tokens: int = 6) -> dict[str, Any]:
    """HookedMLLM vs its HF LLaVA on one (padded) batch: the largest absolute logit difference at text positions
    (all a metric or generation reads) and at image positions, and both greedy generations
    (``{"text": float, "image": float, "ours": ids, "theirs": ids}``, generations trimmed to the same length)."""
    import torch

    pos = (batch.attention_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        theirs = hf(input_ids=batch.tokens, attention_mask=batch.attention_mask, position_ids=pos,
                    pixel_values=batch.model_inputs["pixel_values"]).logits
        diff = (model(batch) - theirs).abs()  # [batch, pos, vocab]
        gen = model.generate(batch, max_new_tokens=max_new_tokens)
        ref = hf.generate(input_ids=batch.tokens, attention_mask=batch.attention_mask,
                          pixel_values=batch.model_inputs["pixel_values"], max_new_tokens=max_new_tokens,
                          do_sample=False, pad_token_id=model.tokenizer.pad_token_id)[:, batch.seq_len:]
    m = batch.attention_mask.bool()
    img = batch.tokens == model.image_encoder.image_token_id
    return {"text": float(diff[m & ~img].max()), "image": float(diff[img].max()) if img.any() else 0.0,
            "ours": gen.tolist(), "theirs": ref[:, :gen.shape[1]].tolist()}


GEMMA3_SPECIALS = ("<start_of_image>", "<end_of_image>", "<start_of_turn>", "<end_of_turn>")


def tiny_gemma3_tokenizer(corpus: Sequence[str] | str = DEFAULT_CORPUS, vocab_size: int = 300) -> Any:
    """A tiny fast tokenizer with Gemma 3's image and turn tokens (``<image_soft_token>`` as the image token)."""
    return tiny_bpe_tokenizer(corpus, vocab_size, image_token="<image_soft_token>", extra_specials=GEMMA3_SPECIALS)


def tiny_gemma3(tokenizer: Any, *, n_layers: int = 4, d_model: int = 64, n_heads: int = 4, n_kv_heads: int = 2,
                d_head: int = 16, d_mlp: int = 128, image_size: int = 32, patch_size: int = 4,
                tokens_per_image: int = 16, vision_layers: int = 2, d_vision: int = 32, sliding_window: int = 8,
                sliding_pattern: int = 2, linear_factor: float | None = 8.0, softcap: float | None = None,
                query_pre_attn_scalar: int = 24, seed: int = 0) -> Any:
    """A random ``Gemma3ForConditionalGeneration`` (SigLIP tower, pooled projector, Gemma 3 decoder; eager
    attention, fp32) with the real models' options at toy size: sliding-window layers (``sliding_window`` tokens,
    every ``sliding_pattern``-th layer global), per-layer-type rotary (global layers with linear scaling
    ``linear_factor`` as Gemma 3 4B+), ``query_pre_attn_scalar`` ≠ ``d_head``, tied embeddings, optional
    soft-capping fields. The window is shorter than an image, so the tests exercise window and blocks together."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    full = {"rope_type": "default", "rope_theta": 1_000_000.0}
    if linear_factor:
        full = {"rope_type": "linear", "rope_theta": 1_000_000.0, "factor": float(linear_factor)}
    types = ["full_attention" if (i + 1) % sliding_pattern == 0 else "sliding_attention" for i in range(n_layers)]
    text = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, head_dim=d_head, max_position_embeddings=2048,
        query_pre_attn_scalar=query_pre_attn_scalar, sliding_window=sliding_window, layer_types=types,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": full},
        final_logit_softcapping=softcap, attn_logit_softcapping=softcap,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    vision = SiglipVisionConfig(hidden_size=d_vision, intermediate_size=2 * d_vision, num_hidden_layers=vision_layers,
                                num_attention_heads=4, image_size=image_size, patch_size=patch_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<image_soft_token>", "<start_of_image>", "<end_of_image>")}
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=tokens_per_image,
                       image_token_index=ids["<image_soft_token>"], boi_token_index=ids["<start_of_image>"],
                       eoi_token_index=ids["<end_of_image>"])
    model = _random_model(Gemma3ForConditionalGeneration, cfg, seed)
    with torch.no_grad():  # Gemma norms are applied as 1 + w (HF initialises w to 0): make them matter
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.normal_(0, 0.1)
    return model
