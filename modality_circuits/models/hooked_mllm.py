"""HookedMLLM: an HF multimodal LLM as a real ``transformer_lens.HookedTransformer`` plus an image encoder.

The language model *is* the HookedTransformer (this class subclasses it), so every TransformerLens hook
name, ``run_with_cache``, ``run_with_hooks``, ``hooks()``, ``start_at_layer``/``stop_at_layer`` and the weight
processing options work unchanged. The architecture's :class:`~modality_circuits.models.base.Adapter`
(``self.image_encoder``) turns images into features that are injected at the image-token positions::

    tokens ──embed──► hook_embed ─┐
    images ──image_encoder──► hook_image_embeds [img_tok, d_model] ─┴─► masked scatter ─► blocks.0.hook_resid_pre

Inputs are an :class:`~modality_circuits.prompts.MLLMBatch` (from :meth:`HookedMLLM.prepare`), or token ids
plus encoder inputs (``pixel_values=…``), or a prompt string with ``<image>`` placeholders plus images.
Batches are left-padded with an attention mask; rotary positions follow the mask (padding-invariant).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, no_type_check

import torch
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.hook_points import HookPoint

from .._types import Float, Int
from ..chat_template import HFChatTemplate, checkpoint_template
from ..errors import ImageTokenMismatchError, NumericalError
from ..prompts import ChatTemplate, MLLMBatch, Segment, build_batch, split_placeholders
from .base import Adapter
from .decoders import build_cfg, decoder_spec, load_decoder
from .devices import check_n_devices, placement
from .forward_state import DeepStack, ForwardState, forward_scope
from .rope import RopeSpec
from .shared_kv import install_shared_prefix, prompt_cache

logger = logging.getLogger(__name__)

ImageLike = Any  # PIL.Image.Image | Tensor[C, H, W]


class HookedMLLM(HookedTransformer):
    """A multimodal LLM in TransformerLens form. Build with :meth:`from_pretrained` or :meth:`from_hf`."""

    image_encoder: Adapter

    def __init__(self, cfg: Any, image_encoder: Adapter, tokenizer: Any,
                 template: ChatTemplate | HFChatTemplate | None = None, source: str = "<in-memory>",
                 rope: RopeSpec | tuple[RopeSpec, ...] | None = None):
        # The tokenizer is attached by hand: TL's set_tokenizer may re-load it by name from the hub.
        super().__init__(cfg, tokenizer=None, move_to_device=False)
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.image_encoder = image_encoder
        self.hook_image_embeds = HookPoint()  # [img_tok, d_model]
        fallback = image_encoder.default_template()  # hand-written layout: only for tokenizers without a template
        self.template = (template or checkpoint_template(tokenizer, image_encoder.template_placeholder, fallback.sep)
                         or fallback)
        self.source = source
        image_encoder.install(self, rope)
        install_shared_prefix(self)  # the engine's shared-prefix KV caches (plain TL caches work as before)
        self.setup()

    # ================================================================== loading
    @classmethod
    @no_type_check  # validates its own arguments: a wrong type gets the project's error, not a type checker's
    def from_hf(cls, hf_model: torch.nn.Module, tokenizer: Any, image_processor: Any = None, *,
                dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                template: ChatTemplate | None = None, fold_ln: bool = False, center_writing_weights: bool = False,
                center_unembed: bool = False, fold_value_biases: bool = False, source: str = "<in-memory>",
                n_devices: int = 1) -> HookedMLLM:
        """Convert an in-memory HF MLLM. The HF decoder's weights are copied; the vision parts are shared.

        Weight processing (``fold_ln`` …) is off by default so logits equal HF's; turn it on as in TL.
        ``n_devices > 1`` splits the blocks over ``cuda:0 … cuda:n-1`` as TransformerLens does
        (:func:`~modality_circuits.models.devices.placement`); the vision tower sits with the first block.
        """
        check_n_devices(device or next(hf_model.parameters(), torch.empty(0)).device, n_devices)  # before typed calls
        return cls._convert(hf_model, tokenizer, image_processor, dtype=dtype, device=device, template=template,
                            fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                            center_unembed=center_unembed, fold_value_biases=fold_value_biases, source=source,
                            n_devices=n_devices)

    @classmethod
    def _convert(cls, hf_model: torch.nn.Module, tokenizer: Any, image_processor: Any, *, dtype: torch.dtype | None,
                 device: str | torch.device | None, template: ChatTemplate | None, fold_ln: bool,
                 center_writing_weights: bool, center_unembed: bool, fold_value_biases: bool, source: str,
                 free_source: bool = False, n_devices: int = 1) -> HookedMLLM:
        """The conversion; ``free_source`` releases each HF decoder layer once copied (loader-owned models)."""
        from .base import adapter_for

        adapter_cls = adapter_for(type(hf_model).__name__)
        dtype = dtype or next(hf_model.parameters()).dtype
        device = device or next(hf_model.parameters()).device
        text_cfg = adapter_cls.text_config(hf_model.config)
        check_n_devices(device, n_devices)
        cfg, rope = build_cfg(text_cfg, dtype=dtype, device=device, n_devices=n_devices)  # exact, or refused
        adapter = adapter_cls(hf_model, tokenizer, image_processor)
        model = cls(cfg, adapter, tokenizer, template=template, source=source, rope=rope)
        body, lm_head = adapter_cls.language_model(hf_model)
        load_decoder(model, body, lm_head, free_source=free_source, spec=decoder_spec(text_cfg))
        if fold_ln or center_writing_weights or center_unembed or fold_value_biases:
            if model.unembed.W_U.data_ptr() == model.embed.W_E.data_ptr():  # untie before editing W_U
                model.unembed.W_U = torch.nn.Parameter(model.unembed.W_U.detach().clone())
            model.load_and_process_state_dict(
                model.state_dict(), fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                center_unembed=center_unembed, fold_value_biases=fold_value_biases)
        model.to(dtype, print_details=False)
        if n_devices > 1:
            model.move_model_modules_to_device()
        else:
            model.to(torch.device(device), print_details=False)
        model.eval()
        return model

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | str = torch.float32,  # type: ignore[override]
                        device: str | torch.device = "cpu", allow_pickle: bool = False, **kwargs: Any,
                        ) -> HookedMLLM:
        """Load a local HF checkpoint directory (safetensors; never the hub).

        Args:
            path: directory with ``config.json``, ``*.safetensors``, tokenizer files (and optionally
                ``preprocessor_config.json`` and ``prompt_template.json``).
            dtype: ``torch.float32`` (exact comparisons), ``bfloat16`` or ``float16``.
            allow_pickle: load a pickle ``.bin`` checkpoint (unsafe: it can run code) if no safetensors exist.
            **kwargs: forwarded to :meth:`from_hf` (``fold_ln``, ``template`` …).
        """
        from .loading import load_hf_checkpoint, resolve_device, resolve_dtype

        dtype, device = resolve_dtype(dtype), resolve_device(device)
        hf_model, tokenizer, image_processor, template = load_hf_checkpoint(path, dtype=dtype,
                                                                            allow_pickle=allow_pickle)
        kwargs.setdefault("template", template)
        opts = dict(template=None, fold_ln=False, center_writing_weights=False, center_unembed=False,
                    fold_value_biases=False, n_devices=1)
        unknown = sorted(set(kwargs) - set(opts))
        if unknown:
            raise TypeError(f"from_pretrained() got unexpected keyword arguments {unknown}; it takes {sorted(opts)}.")
        opts.update(kwargs)
        return cls._convert(hf_model, tokenizer, image_processor, dtype=dtype, device=device,
                            source=str(Path(path).resolve()), free_source=True, **opts)

    def move_model_modules_to_device(self) -> None:
        """Place every part by :func:`~modality_circuits.models.devices.placement` (the block split the forward
        moves activations by; TransformerLens's own method picks devices by free memory instead)."""
        for name, dev in placement(self.cfg).items():
            if name != "image_encoder" or hasattr(self, "image_encoder"):
                self.get_submodule(name).to(dev)

    # ================================================================== prompts
    def prepare(self, prompts: Sequence[Any], images: Sequence[Sequence[ImageLike]] | None = None,
                template: ChatTemplate | HFChatTemplate | None = None) -> MLLMBatch:
        """Build a batch with spans from samples, segment lists, or plain prompts.

        Args:
            prompts: a list of (a) samples with a ``segments()`` method (see :mod:`modality_circuits.data`),
                (b) lists of :class:`Segment`, or (c) strings with ``<image>`` placeholders (then ``images``
                gives each prompt's images, and the text is used as is, without chat template).
            template: override the model's chat layout (``ChatTemplate``).
        """
        if isinstance(prompts, (str, Segment)) or (prompts and hasattr(prompts, "segments")):
            prompts = [prompts]
        template = template or self.template
        samples = None
        if all(hasattr(p, "segments") for p in prompts):
            samples = list(prompts)
            segs = [p.segments() for p in prompts]
        elif all(isinstance(p, str) for p in prompts):
            images = images if images is not None else [[] for _ in prompts]
            if len(images) != len(prompts):
                raise ImageTokenMismatchError(f"Got {len(prompts)} prompts but {len(images)} image lists.")
            segs = [split_placeholders(p, ims, self.image_encoder.image_token) for p, ims in zip(prompts, images)]
            template = ChatTemplate(system="", user_prefix="", sep="", image_sep="", assistant_prefix="")
        else:
            segs = [list(p) for p in prompts]
        batch = build_batch(segs, self.tokenizer, template, self.image_encoder.image_token,
                            self.image_encoder.process_images, samples=samples)
        batch = dataclasses.replace(batch, rope_positions=self.image_encoder.rope_positions(
            batch.tokens, batch.attention_mask, batch.model_inputs))
        return batch.to(self.cfg.device)

    def rope_positions_of(self, batch: MLLMBatch) -> Tensor | None:
        """The batch's rotary positions (computed from its tokens if it carries none; None for 1-D rotary)."""
        if batch.rope_positions is not None or not self.image_encoder.uses_rope_positions:
            return batch.rope_positions
        return self.image_encoder.rope_positions(batch.tokens, batch.attention_mask, batch.model_inputs)

    def attention_blocks_of(self, batch: MLLMBatch) -> Tensor | None:
        """The batch's bidirectional attention blocks (Gemma 3's images), or None for causal attention."""
        if not self.image_encoder.bidirectional_images:
            return None
        return self.image_encoder.attention_blocks(batch.tokens, batch.attention_mask, batch.model_inputs)

    def prompt_context(self, batch: MLLMBatch, deepstack: bool = True) -> dict[str, Any]:
        """What a forward that does not start at ``batch``'s tokens (``start_at_layer``, a KV-cache continuation)
        must be given about the prompt: ``{"rope_positions": …, "attention_blocks": …, "deepstack": …}`` (pass as
        ``**kwargs``). ``deepstack=False`` skips Qwen3-VL's DeepStack features (a vision-tower pass): continuations
        of text tokens after the prompt never need them."""
        return {"rope_positions": self.rope_positions_of(batch), "attention_blocks": self.attention_blocks_of(batch),
                "deepstack": self.deepstack_of(batch.tokens, batch.model_inputs) if deepstack else None}

    def deepstack_of(self, tokens: Tensor, model_inputs: dict[str, Any]) -> DeepStack | None:
        """Qwen3-VL's DeepStack features of a prompt (one vision-tower pass), or None (other architectures, or no
        image tokens)."""
        is_img = tokens == self.image_encoder.image_token_id
        if not self.image_encoder.deepstack_layers or not bool(is_img.any()):
            return None
        if model_inputs.get("pixel_values") is None:
            raise ImageTokenMismatchError(
                f"{type(self.image_encoder).__name__} adds image features inside the decoder (DeepStack), which come "
                "from the pixels: pass pixel_values (the batch from model.prepare(...)).")
        with torch.no_grad():
            _, more = self.image_encoder.encode_with_extras(**model_inputs)
        return DeepStack(tuple(more["deepstack"]), is_img.to(self.cfg.device))

    def prefix_boundary(self, batch: MLLMBatch, p0: int) -> int:
        """The largest position ``≤ p0`` at which a cached prefix may end: ``p0`` itself under causal attention;
        with bidirectional image blocks, the start of a block that ``p0`` falls inside (its earlier tokens see the
        later ones)."""
        blocks = self.attention_blocks_of(batch)
        if blocks is None or p0 <= 0 or p0 >= blocks.shape[1]:
            return p0
        inside = (blocks[:, p0] >= 0) & (blocks[:, p0] == blocks[:, p0 - 1])  # rows where p0 splits a block
        starts = [int((blocks[row, :p0] == blocks[row, p0]).nonzero().min())
                  for row in torch.nonzero(inside).flatten().tolist()]
        return min([p0, *starts])

    # ================================================================== forward
    def embed_inputs(self, tokens: Int[Tensor, "batch pos"], image_features: Tensor | None = None,
                     extras: dict[str, Any] | None = None, **encoder_inputs: Any) -> Float[Tensor, "batch pos d_model"]:
        """Token embeddings with the projected image features scattered in at the image positions (``extras``, if
        given, receives what else the vision tower gave: Qwen3-VL's DeepStack features)."""
        if self.cfg.use_hook_tokens:
            tokens = self.hook_tokens(tokens)
        image_mask = tokens == self.image_encoder.image_token_id
        safe = tokens.masked_fill(image_mask, 0) if self.image_encoder.image_token_id >= self.cfg.d_vocab else tokens
        embed = self.hook_embed(self.embed(safe))  # [batch, pos, d_model]
        n_img_tok = int(image_mask.sum())
        if n_img_tok == 0:
            pv = encoder_inputs.get("pixel_values")
            if (image_features is not None and len(image_features)) or (pv is not None and len(pv)):
                raise ImageTokenMismatchError(
                    "Images were given but the prompt has no image tokens; put one image placeholder per image "
                    "in the prompt (model.prepare(...) does this for Segment(name='image', image=...)).")
            return embed
        if image_features is None:
            if encoder_inputs.get("pixel_values") is None:
                raise ImageTokenMismatchError(
                    f"The tokens hold {n_img_tok} image token(s) but no images were given; pass the batch from "
                    "model.prepare(...) or pixel_values=... .")
            image_features, more = self.image_encoder.encode_with_extras(**encoder_inputs)
            if extras is not None:
                extras.update(more)
        image_features = self.hook_image_embeds(image_features)  # [img_tok, d_model]
        if image_features.shape[0] != n_img_tok:
            raise ImageTokenMismatchError(
                f"The prompt has {n_img_tok} image tokens but the images gave {image_features.shape[0]} features. "
                "Each image needs exactly its token count of placeholders; build prompts with model.prepare().")
        return embed.masked_scatter(image_mask[..., None], image_features.to(embed.dtype))

    def forward(self, input: Any, images: Sequence[ImageLike] | Sequence[Sequence[ImageLike]] | None = None, *,  # type: ignore[override]
                return_type: str | None = "logits", attention_mask: Tensor | None = None,
                start_at_layer: int | None = None, stop_at_layer: int | None = None,
                past_kv_cache: TransformerLensKeyValueCache | None = None, tokens: Tensor | None = None,
                loss_per_token: bool = False, image_features: Tensor | None = None, check_finite: bool = False,
                rope_positions: Tensor | None = None, attention_blocks: Tensor | None = None,
                deepstack: DeepStack | None = None, **encoder_inputs: Any) -> Any:
        """Forward pass (TL semantics) with images.

        Args:
            input: an :class:`MLLMBatch`; token ids ``[batch, pos]`` (pass ``pixel_values=`` for image
                tokens); a prompt string/list with ``<image>`` placeholders (with ``images``); or, with
                ``start_at_layer``, the residual stream ``[batch, pos, d_model]``.
            return_type: ``"logits"`` ``[batch, pos, vocab]``, ``"loss"``, ``"both"`` or ``None``.
            attention_mask: ``[batch, pos]``; taken from the batch when ``input`` is one.
            image_features: precomputed ``[img_tok, d_model]`` features (skip the vision tower).
            check_finite: raise :class:`NumericalError` if the logits hold NaN/inf.
            rope_positions: architecture rotary positions of the whole prompt (M-RoPE: ``[3, batch, pos]``);
                taken from the batch, or computed from the tokens when a full prompt is given. Runs that start at
                a layer or continue a KV cache must pass them (M-RoPE architectures refuse to guess). They are
                published to the attention for this call only (:mod:`~.forward_state`): no forward depends on
                an earlier one.
            attention_blocks: bidirectional attention blocks of the whole prompt (``[batch, pos]``, Gemma 3's
                images); computed from the tokens like ``rope_positions``, and likewise needed by runs that do not
                start from them (``**model.prompt_context(batch)`` gives both).
            deepstack: Qwen3-VL's DeepStack features (:class:`~.forward_state.DeepStack`); computed with the image
                features, and likewise needed by runs that do not start from the tokens (``prompt_context``).
        """
        if isinstance(input, (str, list)) and (isinstance(input, str) or (input and isinstance(input[0], str))):
            input = self.prepare([input] if isinstance(input, str) else input,
                                 images=[images] if isinstance(input, str) and images is not None else images)
        if isinstance(input, MLLMBatch):
            batch = input
            tokens = batch.tokens
            attention_mask = batch.attention_mask if attention_mask is None else attention_mask
            if rope_positions is None and not encoder_inputs:  # overridden inputs: recompute (and check) below
                rope_positions = self.rope_positions_of(batch)
            if attention_blocks is None and not encoder_inputs:
                attention_blocks = self.attention_blocks_of(batch)
            encoder_inputs = {**batch.model_inputs, **encoder_inputs}
            input = tokens
        # absolute position of the first input position (cached prefix length), published to hooks below
        offset = int(past_kv_cache.previous_attention_mask.shape[1]) if past_kv_cache is not None else 0
        from_prompt_start = start_at_layer is None and offset == 0
        if start_at_layer is None:
            tokens = input
            if tokens.dim() == 1:
                tokens = tokens[None]
            tokens = tokens.to(self.cfg.device)
            extras: dict[str, Any] = {}
            residual = self.embed_inputs(tokens, image_features=image_features, extras=extras, **encoder_inputs)
            if deepstack is None and self.image_encoder.deepstack_layers and offset == 0:
                deepstack = (DeepStack(tuple(extras["deepstack"]), tokens == self.image_encoder.image_token_id)
                             if "deepstack" in extras else self.deepstack_of(tokens, encoder_inputs))
            if attention_mask is None:
                attention_mask = torch.ones_like(tokens)
            if rope_positions is None and offset == 0:
                rope_positions = self.image_encoder.rope_positions(tokens, attention_mask.to(tokens.device),
                                                                   encoder_inputs)
            if attention_blocks is None and offset == 0:
                attention_blocks = self.image_encoder.attention_blocks(tokens, attention_mask.to(tokens.device),
                                                                       encoder_inputs)
            if past_kv_cache is not None:
                attention_mask = past_kv_cache.append_attention_mask(attention_mask)
            start_at_layer = 0
        else:
            residual = input
            if past_kv_cache is not None and attention_mask is not None:
                attention_mask = past_kv_cache.append_attention_mask(attention_mask)
        if rope_positions is None and self.image_encoder.uses_rope_positions and not from_prompt_start:
            raise ImageTokenMismatchError(
                f"{type(self.image_encoder).__name__}'s rotary positions depend on the prompt's images, and this run "
                "does not start from the prompt's tokens (start_at_layer or a KV cache): pass "
                "rope_positions=batch.rope_positions (batches from model.prepare(...) carry them).")
        if attention_blocks is None and self.image_encoder.bidirectional_images and not from_prompt_start:
            raise ImageTokenMismatchError(
                f"{type(self.image_encoder).__name__}'s image tokens attend to each other both ways, and this run "
                "does not start from the prompt's tokens (start_at_layer or a KV cache): pass "
                "**model.prompt_context(batch) (the prompt's attention blocks).")
        text_continuation = (tokens is not None and offset > 0  # tokens: given with a residual from a layer
                             and not bool((tokens == self.image_encoder.image_token_id).any()))
        if deepstack is None and self.image_encoder.deepstack_layers and not from_prompt_start \
                and not text_continuation:  # DeepStack adds only at image positions of the pass
            raise ImageTokenMismatchError(
                f"{type(self.image_encoder).__name__} adds image features after its first decoder blocks (DeepStack), "
                "and this run does not start from the prompt's tokens (start_at_layer or a KV cache): pass "
                "**model.prompt_context(batch).")
        with forward_scope(ForwardState(offset=offset, rope_positions=rope_positions,
                                        attention_blocks=attention_blocks, deepstack=deepstack)):
            out = super().forward(residual, return_type=return_type, start_at_layer=start_at_layer,
                                  stop_at_layer=stop_at_layer, past_kv_cache=past_kv_cache,
                                  attention_mask=attention_mask.to(self.cfg.device) if attention_mask is not None
                                  else None, tokens=tokens, loss_per_token=loss_per_token)
        if check_finite and isinstance(out, Tensor) and not torch.isfinite(out).all():
            raise NumericalError("The forward pass produced NaN/inf logits. Try float32 (dtype=torch.float32), "
                                 "and check that no hook writes NaN (e.g. a fully masked attention row).")
        return out

    # ================================================================ generation
    @torch.no_grad()
    def generate(self, input: Any, images: Sequence[ImageLike] | Sequence[Sequence[ImageLike]] | None = None,  # type: ignore[override]
                 max_new_tokens: int = 10, eos_token_id: int | None = None, return_type: str = "tokens",
                 use_past_kv_cache: bool = True, verbose: bool = False) -> Any:
        """Greedy generation with images; hooks active around the call apply to every step.

        Returns ``Int[Tensor, "batch new"]`` (``return_type="tokens"``, finished rows padded with the pad
        token) or a list of decoded strings (``"str"``).
        """
        if not isinstance(input, MLLMBatch):
            input = self.prepare(input if isinstance(input, list) else [input],
                                 images=[images] if isinstance(input, str) and images is not None else images)
        batch = input
        eos = self.tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (eos or 0)
        B = len(batch)
        mask = batch.attention_mask.to(self.cfg.device)
        ctx = self.prompt_context(batch, deepstack=False)  # the steps continue with text tokens only
        rope = ctx["rope_positions"]
        finished = torch.zeros(B, dtype=torch.bool, device=self.cfg.device)
        out = []
        shared = prompt_cache(self, batch) if use_past_kv_cache else None  # steps never copy the prompt's keys
        if shared is not None:
            logits, cache = shared
        elif use_past_kv_cache:
            cache = TransformerLensKeyValueCache.init_cache(self.cfg, self.cfg.device, B)
            logits = self(batch, past_kv_cache=cache)
        else:
            tokens = batch.tokens
            logits = self(batch)
        img_id = self.image_encoder.image_token_id
        for _ in range(max_new_tokens):
            last = logits[:, -1]
            if 0 <= img_id < last.shape[-1]:  # never emit the image placeholder: it would need image features
                last = last.clone()
                last[:, img_id] = float("-inf")
            nxt = last.argmax(-1)
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
            out.append(nxt)
            if eos is not None:
                finished |= nxt == eos
            if finished.all() or len(out) == max_new_tokens:
                break
            if use_past_kv_cache:
                logits = self(nxt[:, None], attention_mask=torch.ones_like(nxt)[:, None], past_kv_cache=cache, **ctx)
            else:
                tokens = torch.cat([tokens, nxt[:, None]], 1)
                mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], 1)
                logits = self(tokens, attention_mask=mask, rope_positions=rope, **batch.model_inputs)
        gen = torch.stack(out, 1)
        if return_type == "str":
            return self.tokenizer.batch_decode(gen, skip_special_tokens=True)
        return gen

    # ==================================================================== views
    def to_str_tokens(self, input: Any, i: int = 0, **kwargs: Any) -> list[str]:  # type: ignore[override]
        """String tokens of sample ``i`` of a batch (padding dropped, image tokens as ``<img_k>``).

        Other inputs fall back to TransformerLens's ``to_str_tokens``.
        """
        if not isinstance(input, MLLMBatch):
            return super().to_str_tokens(input, **kwargs)
        return self.token_labels(input.tokens[i][input.attention_mask[i].bool()].tolist())

    def token_labels(self, ids: Sequence[int]) -> list[str]:
        """Token strings of one prompt's (unpadded) ids, image tokens numbered ``<img_0>``, ``<img_1>`` … (the one
        labeller every view uses)."""
        out, k = [], 0
        img = self.image_encoder.image_token_id
        for t in ids:
            if int(t) == img:
                out.append(f"<img_{k}>")
                k += 1
            else:
                out.append(str(self.tokenizer.convert_ids_to_tokens(int(t))))
        return out
