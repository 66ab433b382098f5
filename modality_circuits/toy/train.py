"""Training the toy MLLM from scratch on synthetic modality-conflict data (``modality-circuits train-toy``).

The model is trained as an ordinary HF ``LlavaForConditionalGeneration`` with teacher forcing on the answer
tokens (+EOS) only, on prompts built by the same prompt builder the analyses use. Seeded end to end and
single-threaded (``ToyConfig.threads``) with a step-based schedule, so the same seed gives the same model;
``max_minutes`` is only a safety stop. The checkpoint (safetensors, config, tokenizer, image processor, prompt layout and
a model card with data spec, seed, time and measured accuracies) is written with ``save_pretrained``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.synthetic import mixture
from ..metrics import tokenize_answer
from ..models.llava import LlavaAdapter
from ..prompts import build_batch
from .model import TOY_TEMPLATE, ToyConfig, save_checkpoint, toy_llava, word_level_tokenizer

logger = logging.getLogger(__name__)


def encode_examples(samples: list[Any], tokenizer: Any, image_processor: Any, tokens_per_image: int,
                    chunk: int = 512) -> list[tuple[list[int], int, torch.Tensor | None]]:
    """Each sample -> (prompt ids + following answer ids + EOS, index of the first answer token, pixels)."""

    def encode_images(images: list[Any]) -> tuple[dict, list[int]]:
        pv = image_processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pv}, [tokens_per_image] * len(images)

    out = []
    for i in range(0, len(samples), chunk):
        part = samples[i:i + chunk]
        b = build_batch([s.segments() for s in part], tokenizer, TOY_TEMPLATE, "<image>", encode_images)
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
    data = encode_examples(mixture(cfg.n_train, seed=cfg.seed, image_size=cfg.image_size), tokenizer,
                           image_processor, tpi)
    # the vision tower and projector may take a larger step (ToyConfig.vision_lr_mult; default 1 = same step)
    vision = [p for n, p in model.named_parameters() if "vision_tower" in n or "multi_modal_projector" in n]
    ids = {id(p) for p in vision}
    rest = [p for p in model.parameters() if id(p) not in ids]
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
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
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
    summary = {"config": cfg.to_dict(), "steps_done": step + 1, "train_minutes": round(train_minutes, 2),
               "final_loss": float(np.mean(losses[-50:])), "torch_threads": torch.get_num_threads()}
    if evaluate_fn is not None:
        summary["metrics"] = evaluate_fn(out_dir)
    (out_dir / "training_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
