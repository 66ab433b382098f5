"""Prompts built from named segments, and the batch that carries tokens, images and spans.

A prompt is a list of :class:`Segment` (``system``, ``image``, ``context``, ``instruction``, ``question``,
``constraint``, ``answer_prefix`` …). A :class:`ChatTemplate` wraps the user segments in the model's chat
layout; every piece of glue it adds is recorded as the ``template`` group (or ``system``). The full text is
tokenized at once (so tokenization equals what the HF processor would produce), and each token is assigned to
the segment its characters came from, using the fast tokenizer's offsets and the character ranges recorded
while the text was assembled. Image placeholders are expanded to the image's token count before tokenizing.

Shapes use the glossary in :mod:`modality_circuits._types`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from ._types import Int
from .errors import ImageTokenMismatchError, SpanError
from .spans import Spans

IMAGE = "image"


@dataclass(frozen=True)
class Segment:
    """One named piece of a prompt: text, or an image (``image`` is a PIL image or a pixel tensor)."""

    name: str
    text: str = ""
    image: Any = None

    @property
    def is_image(self) -> bool:
        return self.image is not None


@dataclass(frozen=True)
class ChatTemplate:
    """How user segments become a chat prompt.

    The rendered text is ``system + user_prefix + seg_1 + sep + seg_2 … + assistant_prefix``; an image
    segment is wrapped in ``image_prefix``/``image_suffix`` (e.g. Qwen's ``<|vision_start|>``/``<|vision_end|>``)
    and followed by ``image_sep`` instead of ``sep``. ``system`` (if not empty) is the ``system`` group,
    the other glue is the ``template`` group.
    """

    system: str = ""
    user_prefix: str = "USER: "
    sep: str = " "
    image_sep: str = "\n"
    assistant_prefix: str = " ASSISTANT:"
    image_prefix: str = ""
    image_suffix: str = ""

    def render(self, segments: Sequence[Segment]) -> list[Segment]:
        """Segments including the template's glue, in order."""
        out: list[Segment] = []
        if self.system:
            out.append(Segment("system", self.system))
        if self.user_prefix:
            out.append(Segment("template", self.user_prefix))
        for i, seg in enumerate(segments):
            if seg.is_image and self.image_prefix:
                out.append(Segment("template", self.image_prefix))
            out.append(seg)
            if seg.is_image and self.image_suffix:
                out.append(Segment("template", self.image_suffix))
            if i < len(segments) - 1:
                glue = self.image_sep if seg.is_image else self.sep
                if glue:
                    out.append(Segment("template", glue))
        if self.assistant_prefix:
            out.append(Segment("template", self.assistant_prefix))
        return out


@runtime_checkable
class PromptLayout(Protocol):
    """How user segments become the full prompt: :class:`ChatTemplate` (hand-written) or
    :class:`~modality_circuits.chat_template.HFChatTemplate` (the checkpoint's own Jinja template)."""

    def render(self, segments: Sequence[Segment]) -> list[Segment]: ...


@dataclass
class MLLMBatch:
    """Everything one forward pass needs, plus where each token group sits.

    Attributes:
        tokens: ``Int[Tensor, "batch pos"]``, left-padded; image placeholders expanded.
        attention_mask: ``Int[Tensor, "batch pos"]``, 0 on padding.
        spans: per-group position masks (see :class:`~modality_circuits.spans.Spans`).
        model_inputs: architecture inputs for the image encoder (``pixel_values`` …), images in order of
            appearance across the batch: a tensor with one row per image, or a list with one entry per image.
        image_counts: number of images of each sample (to slice ``model_inputs`` per sample).
        texts: the rendered prompt text of each sample.
        samples: the source samples (if built from samples), for metrics that need answers.
        rope_positions: the architecture's rotary positions of the prompt (M-RoPE: ``Int[Tensor, "3 batch pos"]``),
            computed by :meth:`HookedMLLM.prepare`; None for 1-D positions from the attention mask.
    """

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    spans: Spans
    model_inputs: dict[str, Any] = field(default_factory=dict)
    image_counts: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    samples: list[Any] | None = None
    rope_positions: Tensor | None = None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def to(self, device: torch.device | str) -> MLLMBatch:
        mi = {k: (v.to(device) if isinstance(v, Tensor) else
                  [x.to(device) for x in v] if isinstance(v, list) and v and isinstance(v[0], Tensor) else v)
              for k, v in self.model_inputs.items()}
        rp = None if self.rope_positions is None else self.rope_positions.to(device)
        return replace(self, tokens=self.tokens.to(device), attention_mask=self.attention_mask.to(device),
                       spans=self.spans.to(device), model_inputs=mi, rope_positions=rp)

    def select(self, index: Sequence[int]) -> MLLMBatch:
        """A sub-batch (kept at the same padded length, so positions stay comparable)."""
        index = list(index)
        starts = np.concatenate([[0], np.cumsum(self.image_counts)]).astype(int)
        img_idx = [j for i in index for j in range(starts[i], starts[i + 1])]
        mi = {}
        for k, v in self.model_inputs.items():
            if isinstance(v, Tensor) and v.shape[0] == sum(self.image_counts):
                mi[k] = v[img_idx]
            elif isinstance(v, list) and len(v) == sum(self.image_counts):  # per-image list (variable sizes)
                mi[k] = [v[j] for j in img_idx]
            else:
                mi[k] = v
        idx = torch.tensor(index, dtype=torch.long, device=self.tokens.device)
        return MLLMBatch(
            tokens=self.tokens[idx], attention_mask=self.attention_mask[idx], spans=self.spans.select(idx),
            model_inputs=mi, image_counts=[self.image_counts[i] for i in index],
            texts=[self.texts[i] for i in index] if self.texts else [],
            samples=[self.samples[i] for i in index] if self.samples is not None else None,
            rope_positions=None if self.rope_positions is None else self.rope_positions[:, idx.to(
                self.rope_positions.device)],
        )

    def repeat(self, n: int) -> MLLMBatch:
        """The batch repeated ``n`` times along ``batch`` (config-major: copy k is rows k*B..(k+1)*B-1)."""
        return self.select([i for _ in range(n) for i in range(len(self))])


def _char_labels(pieces: Sequence[tuple[str, str]]) -> tuple[str, np.ndarray]:
    text = "".join(p for _, p in pieces)
    labels = np.empty(len(text), dtype=np.int32)
    pos = 0
    for k, (_, piece) in enumerate(pieces):
        labels[pos:pos + len(piece)] = k
        pos += len(piece)
    return text, labels


def assign_tokens(
    offsets: Sequence[tuple[int, int]], text: str, labels: np.ndarray, n_pieces: int
) -> list[int]:
    """Piece index of each token (-1 for tokens without characters, e.g. BOS).

    A token goes to the piece holding most of its non-whitespace characters (whitespace-only tokens: most
    characters), so a leading-space token such as ``▁Text`` belongs to the segment whose word it carries.
    """
    nonws = np.fromiter((not c.isspace() for c in text), dtype=bool, count=len(text))
    out = []
    for s, e in offsets:
        if e <= s:
            out.append(-1)
            continue
        lab = labels[s:e]
        w = nonws[s:e]
        counts = np.bincount(lab[w], minlength=n_pieces) if w.any() else np.bincount(lab, minlength=n_pieces)
        out.append(int(counts.argmax()))
    return out


def _open_image(image: Any) -> Any:
    """PIL images and tensors pass through; a path is opened as RGB (clear error if missing)."""
    from pathlib import Path

    if isinstance(image, (str, Path)):
        from PIL import Image

        if not Path(image).exists():
            raise ImageTokenMismatchError(f"Image file {str(image)!r} does not exist; check the images folder.")
        with Image.open(image) as im:
            return im.convert("RGB")
    return image


def build_batch(
    segment_lists: Sequence[Sequence[Segment]],
    tokenizer: Any,
    template: PromptLayout,
    image_token: str,
    encode_images: Callable[[list[Any]], tuple[dict[str, Any], list[int]]],
    samples: list[Any] | None = None,
) -> MLLMBatch:
    """Render, tokenize and left-pad prompts, recording every token's group.

    Args:
        segment_lists: one list of segments per prompt (user part; the template adds system/glue).
        tokenizer: a *fast* HF tokenizer (offsets are needed) that knows ``image_token``.
        template: the chat layout.
        image_token: the placeholder string of one image token (e.g. ``"<image>"``).
        encode_images: images (and, if it takes ``images_per_prompt``, the number of images of each prompt) ->
            (model inputs such as ``pixel_values``, token count of each image: an int, or for tiled images
            ``[(name, count), …]`` per tile, recorded as groups ``image.N.<name>`` (``image.N`` for the name
            ``""``), where a ``(group, "text")`` pair is literal text between the tiles, recorded as ``group``).
        samples: optional source samples carried on the batch.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise SpanError("Prompt spans need a fast tokenizer (offset mapping); load it with use_fast=True.")
    all_images = [_open_image(seg.image) for segs in segment_lists for seg in segs if seg.is_image]
    per_prompt = [sum(seg.is_image for seg in segs) for segs in segment_lists]
    takes_counts = "images_per_prompt" in inspect.signature(encode_images).parameters  # LLaVA-OneVision
    model_inputs, n_tok = ((encode_images(all_images, images_per_prompt=per_prompt) if takes_counts
                            else encode_images(all_images)) if all_images else ({}, []))
    if len(n_tok) != len(all_images):
        raise ImageTokenMismatchError(f"Image encoder returned {len(n_tok)} token counts for {len(all_images)} images.")

    rows, row_groups, texts, image_counts = [], [], [], []
    img_k = 0
    for segs in segment_lists:
        for s in segs:
            if not isinstance(s.name, str) or not s.name.strip():
                raise SpanError(f"Segment names must be non-empty strings; got {s.name!r} in prompt {len(rows)}.")
        rendered = template.render(segs)
        pieces: list[tuple[str, str]] = []
        n_images = 0
        for seg in rendered:
            if seg.is_image:
                count = n_tok[img_k]
                if isinstance(count, (int, np.integer)):
                    pieces.append((f"{IMAGE}.{n_images}", image_token * int(count)))
                else:  # tiles: (name, tokens) pairs -> groups image.N.<name>, and image.N for all of them;
                    # (name, "text") pairs are literal text inside the image block (Idefics3's tile tags) -> group name
                    pieces += [(sub, c) if isinstance(c, str) else
                               (f"{IMAGE}.{n_images}" + (f".{sub}" if sub else ""), image_token * int(c))
                               for sub, c in count]
                img_k += 1
                n_images += 1
            else:
                if image_token in seg.text:
                    raise ImageTokenMismatchError(
                        f"Segment {seg.name!r} contains the image placeholder {image_token!r} as text. Pass images as "
                        "Segment(name='image', image=...) so the number of placeholders equals the number of images.")
                pieces.append((seg.name, seg.text))
        text, labels = _char_labels(pieces)
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        piece_of = assign_tokens(offsets, text, labels, len(pieces))
        groups = [pieces[p][0] if p >= 0 else "bos" for p in piece_of]
        image_id = tokenizer.convert_tokens_to_ids(image_token)
        for t, g in zip(ids, groups):  # image tokens must land exactly in image pieces
            if (t == image_id) != g.startswith(IMAGE + "."):
                raise ImageTokenMismatchError(
                    f"Image token {image_token!r} did not tokenize as one token per placeholder (prompt {len(rows)}); "
                    "add it to the tokenizer as a special token.")
        rows.append(ids)
        row_groups.append(groups)
        texts.append(text)
        image_counts.append(n_images)

    L = max(len(r) for r in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    B = len(rows)
    tokens = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    names: list[str] = []
    for g in row_groups:
        for n in g:
            if n not in names:
                names.append(n)
    for segs in segment_lists:  # a segment that produced no tokens is an empty group, not a missing one
        for s in segs:
            if not s.is_image and s.name not in names:
                names.append(s.name)
    masks = {n: torch.zeros((B, L), dtype=torch.bool) for n in names}
    for i, (ids, groups) in enumerate(zip(rows, row_groups)):
        off = L - len(ids)
        tokens[i, off:] = torch.tensor(ids)
        attn[i, off:] = 1
        for j, g in enumerate(groups):
            masks[g][i, off + j] = True
    img_names = [n for n in names if n.startswith(IMAGE + ".")]
    for n in img_names:  # image.N.<tile> -> also image.N
        whole = ".".join(n.split(".")[:2])
        if whole != n:
            if whole not in masks:
                masks[whole] = torch.zeros((B, L), dtype=torch.bool)
            masks[whole] |= masks[n]
    if img_names:
        masks[IMAGE] = torch.stack([masks[n] for n in img_names]).any(0)
    masks["last"] = torch.zeros((B, L), dtype=torch.bool)
    masks["last"][:, -1] = True
    return MLLMBatch(tokens=tokens, attention_mask=attn, spans=Spans(masks), model_inputs=model_inputs,
                     image_counts=image_counts, texts=texts, samples=samples)


def split_placeholders(prompt: str, images: Sequence[Any], placeholder: str = "<image>",
                       name: str = "user") -> list[Segment]:
    """A plain prompt with ``<image>`` placeholders -> segments (text parts named ``name``)."""
    parts = prompt.split(placeholder)
    if len(parts) - 1 != len(images):
        raise ImageTokenMismatchError(
            f"The prompt has {len(parts) - 1} {placeholder!r} placeholder(s) but {len(images)} image(s) were given; "
            "use one placeholder per image.")
    segs: list[Segment] = []
    for i, part in enumerate(parts):
        if part:
            segs.append(Segment(name, part))
        if i < len(images):
            segs.append(Segment(IMAGE, image=images[i]))
    return segs
