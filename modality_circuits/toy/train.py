"""Training the toy MLLM from scratch on synthetic modality-conflict data (``modality-circuits train-toy``).

Two stages, as LLaVA is built from a pretrained vision encoder:

1. **vision pretraining** (``ToyConfig.vision_pretrain_steps``): the CLIP vision tower and the projector learn the
   scene attributes (colour, shape, count, position) from the training images through throw-away linear heads on
   the mean of the projected image tokens (the features the decoder will read);
2. **instruction tuning**: the whole ``LlavaForConditionalGeneration`` (vision tower frozen by default) is trained
   with teacher forcing on the answer tokens (+EOS) only, on prompts built by the same prompt builder the
   analyses use.

Seeded end to end and single-threaded (``ToyConfig.threads``) with step-based schedules, so the same seed gives
the same model; ``max_minutes`` is only a safety stop. The checkpoint (safetensors, config, tokenizer, image
processor, prompt layout and a model card with data spec, seed, time and measured accuracies) is written with
``save_pretrained``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.synthetic import TASKS, VALUES, mixture
from ..metrics import tokenize_answer
from ..models.llava import LlavaAdapter
from ..prompts import build_batch
from .model import TOY_TEMPLATE, ToyConfig, save_checkpoint, toy_llava, word_level_tokenizer

logger = logging.getLogger(__name__)


def encode_examples(samples: list[Any], tokenizer: Any, image_processor: Any, tokens_per_image: int,
                    chunk: int = 512, template: Any = TOY_TEMPLATE) -> list[tuple[list[int], int, torch.Tensor | None]]:
    """Each sample -> (prompt ids + following answer ids + EOS, index of the first answer token, pixels).

    Prompts are built by the analyses' own prompt builder with ``template`` (the toy's layout by default, a
    checkpoint's chat template for SmolLLaVA), so training sees exactly the token layout the analyses use.
    """

    def encode_images(images: list[Any]) -> tuple[dict, list[int]]:
        pv = image_processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pv}, [tokens_per_image] * len(images)

    out = []
    for i in range(0, len(samples), chunk):
        part = samples[i:i + chunk]
        b = build_batch([s.segments() for s in part], tokenizer, template, "<image>", encode_images)
        pv = b.model_inputs.get("pixel_values")
        k = 0
        for j, s in enumerate(part):
            ids = b.tokens[j][b.attention_mask[j].bool()].tolist()
            ans = tokenize_answer(tokenizer, s.following_answer) + [tokenizer.eos_token_id]
            px = None
            if b.image_counts[j]:
                px = pv[k]
                k += 1
            out.append((ids + ans, len(ids), px))
    return out


def _collate(examples: list[tuple[list[int], int, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    L = max(len(e[0]) for e in examples)
    B = len(examples)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    labels = torch.full((B, L), -100, dtype=torch.long)
    for i, (seq, start, _) in enumerate(examples):
        off = L - len(seq)
        ids[i, off:] = torch.tensor(seq)
        attn[i, off:] = 1
        labels[i, off + start:] = torch.tensor(seq[start:])
    pix = [e[2] for e in examples if e[2] is not None]
    batch = {"input_ids": ids, "attention_mask": attn, "labels": labels,
             "position_ids": (attn.cumsum(1) - 1).clamp(min=0)}
    if pix:
        batch["pixel_values"] = torch.stack(pix)
    return batch


def image_features(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected image tokens of a HF LLaVA, ``[batch, image_tokens, d_model]`` (``get_image_features``)."""
    out = model.model.get_image_features(pixel_values=pixel_values)
    feats = getattr(out, "pooler_output", out)
    if isinstance(feats, (list, tuple)):
        feats = torch.stack(list(feats))
    return feats.view(pixel_values.shape[0], -1, feats.shape[-1])


#: How :func:`pretrain_vision`'s probes read the projected image tokens.
POOLS = ("mean", "flat", "token")


def _pool(feats: torch.Tensor, pool: str) -> torch.Tensor:
    """``feats [batch, image_tokens, d_model]`` -> the probes' input: ``[batch, d_model]`` (mean),
    ``[batch, image_tokens * d_model]`` (flat) or ``feats`` itself (token)."""
    return feats.mean(1) if pool == "mean" else feats.flatten(1) if pool == "flat" else feats


def _readout(logits: torch.Tensor) -> torch.Tensor:
    """``[batch, (image_tokens,) n_values]`` -> ``[batch, n_values]``: per-token logits averaged over the tokens."""
    return logits.mean(1) if logits.dim() == 3 else logits


def _probe_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits [batch, (image_tokens,) n_values]`` against ``labels [batch]`` (every token of a
    per-token read-out against its image's label)."""
    if logits.dim() == 3:
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.repeat_interleave(logits.shape[1]))
    return torch.nn.functional.cross_entropy(logits, labels)


def pretrain_vision(model: Any, pixels: torch.Tensor, labels: torch.Tensor, cfg: Any,
                    progress: bool = True, desc: str = "train-toy vision", pool: str = "mean",
                    heldout: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Stage 1: train the vision tower + projector to expose every scene attribute in the image tokens.

    ``pixels``: ``[n_images, 3, H, W]``; ``labels``: ``[n_images, n_tasks]``, the index of each task's value in
    ``VALUES[task]`` (tasks in ``TASKS`` order). One linear head per task reads the mean projected image token
    (``pool="mean"``), all of them concatenated (``pool="flat"``, which keeps where each token is), or every image
    token on its own (``pool="token"``: the loss averaged over the tokens, so each token must carry the whole scene,
    whichever tokens a reader attends to; predictions from the token-averaged logits); the heads are discarded
    afterwards. ``cfg`` is any config with ``seed``, ``weight_decay`` and the
    ``vision_pretrain_{steps,batch,lr}`` fields (:class:`ToyConfig`, the SmolLLaVA training config).
    Returns the final mean loss and the training-set accuracy per task, and with ``heldout`` (pixels and labels
    of images not trained on) the heads' held-out accuracy per task (``heldout_accuracy``; for ``pool="token"`` also
    ``heldout_token_accuracy``, the mean over single tokens read alone).
    """
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    d = model.config.text_config.hidden_size
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    width = d * (image_features(model, pixels[:1]).shape[1] if pool == "flat" else 1)
    heads = torch.nn.ModuleList([torch.nn.Linear(width, len(VALUES[t])) for t in TASKS])
    params = [p for n, p in model.named_parameters() if "vision_tower" in n or "multi_modal_projector" in n]
    opt = torch.optim.AdamW(params + list(heads.parameters()), lr=cfg.vision_pretrain_lr,
                            weight_decay=cfg.weight_decay)
    steps = cfg.vision_pretrain_steps
    losses: list[float] = []
    correct = torch.zeros(len(TASKS))
    seen = 0
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(pixels), (min(cfg.vision_pretrain_batch, len(pixels)),), generator=gen)
        feats = image_features(model, pixels[idx])  # [batch, image_tokens, d_model]
        pooled = _pool(feats, pool)
        per_token = [h(pooled) for h in heads]  # [batch, (image_tokens,) n_values] each
        logits = [_readout(lg) for lg in per_token]  # [batch, n_values] each
        loss = sum(_probe_loss(lg, labels[idx, i]) for i, lg in enumerate(per_token))
        for g in opt.param_groups:
            g["lr"] = cfg.vision_pretrain_lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step >= steps - 20:  # training accuracy over the last 20 batches
            correct += torch.stack([(lg.argmax(-1) == labels[idx, i]).float().sum() for i, lg in enumerate(logits)])
            seen += len(idx)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    acc = (correct / max(seen, 1)).tolist()
    out = {"steps": steps, "final_loss": float(np.mean(losses[-20:])) if losses else None,
           "train_accuracy": {t: round(a, 4) for t, a in zip(TASKS, acc)}}
    if heldout is not None:
        with torch.no_grad():
            hp, hl = heldout
            feats = torch.cat([image_features(model, hp[i:i + 256]) for i in range(0, len(hp), 256)])
            pooled = _pool(feats, pool)
            out["heldout_accuracy"] = {t: round(float((_readout(h(pooled)).argmax(-1) == hl[:, i]).float().mean()), 4)
                                       for i, (t, h) in enumerate(zip(TASKS, heads))}
            if pool == "token":  # how often a single image token, read alone, gives the answer
                out["heldout_token_accuracy"] = {
                    t: round(float((h(pooled).argmax(-1) == hl[:, i, None]).float().mean()), 4)
                    for i, (t, h) in enumerate(zip(TASKS, heads))}
    return out


def train_toy(out_dir: str | Path, cfg: ToyConfig | None = None, progress: bool = True,
              evaluate_fn: Callable[[Path], dict] | None = None) -> dict:
    """Train the toy MLLM and save it to ``out_dir``. Returns the training summary (also in the model card)."""
    cfg = cfg or ToyConfig()
    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    torch.set_num_threads(cfg.threads)
    tokenizer = word_level_tokenizer()
    model = toy_llava(tokenizer, cfg)
    image_processor = LlavaAdapter.default_image_processor(cfg.image_size)
    tpi = (cfg.image_size // cfg.patch_size) ** 2
    t0 = time.time()
    logger.info("generating %d training samples", cfg.n_train)
    samples = mixture(cfg.n_train, seed=cfg.seed, image_size=cfg.image_size)
    data = encode_examples(samples, tokenizer, image_processor, tpi)
    vision_summary = None
    if cfg.vision_pretrain_steps > 0:
        with_image = [(s, e[2]) for s, e in zip(samples, data) if e[2] is not None]
        if with_image:
            pixels = torch.stack([px for _, px in with_image])
            labels = torch.tensor([[VALUES[t].index(s.meta["scene"].answer(t)) for t in TASKS] for s, _ in with_image])
            model.train()
            vision_summary = pretrain_vision(model, pixels, labels, cfg, progress=progress)
            logger.info("vision pretraining: %s", vision_summary)
    if cfg.freeze_vision:
        model.model.vision_tower.requires_grad_(False)
    # the projector (and an unfrozen vision tower) may take a larger step (ToyConfig.vision_lr_mult)
    vision = [p for n, p in model.named_parameters()
              if p.requires_grad and ("vision_tower" in n or "multi_modal_projector" in n)]
    ids = {id(p) for p in vision}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    opt = torch.optim.AdamW([{"params": rest, "mult": 1.0}, {"params": vision, "mult": cfg.vision_lr_mult}],
                            lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))

    def lr_at(s: int) -> float:
        # linear warmup, cosine decay over the step budget (step-based: the same seed gives the same model)
        frac = min(1.0, s / cfg.steps)
        return cfg.lr * min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * frac))

    model.train()
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="train-toy", disable=not progress)
    step = 0
    for step in bar:
        idx = rng.choice(len(data), size=cfg.batch_size, replace=False)
        b = _collate([data[i] for i in idx], tokenizer.pad_token_id)
        logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 b["labels"][:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        for g in opt.param_groups:
            g["lr"] = lr_at(step) * g["mult"]
        opt.step()
        losses.append(float(loss.detach()))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        if (time.time() - t0) / 60 > cfg.max_minutes:
            logger.warning("stopping at step %d of %d: time budget of %.1f min reached (the model then differs from "
                           "a full run)", step, cfg.steps, cfg.max_minutes)
            break
    train_minutes = (time.time() - t0) / 60
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, tokenizer, out_dir, cfg.image_size)
    summary = {"config": cfg.to_dict(), "vision_pretraining": vision_summary, "steps_done": step + 1,
               "train_minutes": round(train_minutes, 2),
               "final_loss": float(np.mean(losses[-50:])), "torch_threads": torch.get_num_threads()}
    if evaluate_fn is not None:
        summary["metrics"] = evaluate_fn(out_dir)
    (out_dir / "training_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
