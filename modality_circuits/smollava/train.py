"""Training SmolLLaVA (``modality-circuits train-smollava``): LLaVA's two-stage recipe on the synthetic conflict data.

The pretrained SmolLM2-135M-Instruct decoder stays frozen throughout; it is adapted only through LoRA adapters
(``peft``) in stage 2, so its pretrained circuits remain.

1. **Vision side, LM frozen.**
   a. The new CLIP tower and projector learn the scene attributes (colour, shape, count, position) through
      throw-away linear heads on the concatenated projected image tokens (``vision_pool="flat"``; ``"mean"`` reads
      the mean image token instead, which the frozen decoder picks up more easily: after stage 1b, image-only probe
      accuracy 0.875 vs 0.71 in a 200-sample check, and 0.96 vs 0.91 after full training with 300 alignment steps
      and one distractor sentence, but that run's conflict MFR fell to 0.54 / 0.825, so it is not the default;
      ``"token"`` reads every token alone, which with ``align_lr=2e-3`` lifted the decoder's count read-out after
      stage 1b from 0.47 to 0.71; at the default lr only to 0.56)
      (:func:`~modality_circuits.toy.train.pretrain_vision`).
   b. Alignment: tower and projector are trained through the frozen decoder on image-only questions (image +
      question + format sentence -> the attribute), the LLaVA stage-1 objective. Afterwards 200 held-out image-only
      questions (all tasks alike) measure what the decoder reads (:func:`answer_accuracy`, in the summary).
2. **Instruction tuning**: LoRA adapters of rank ``lora_rank`` on every attention and MLP projection of the decoder,
   plus the projector, on the synthetic mixture (60% conflict under both instructions, 15% consistent, 12.5% each
   single-modality probe), text contexts with ``distractors`` sentences about other attributes; the vision tower
   is frozen. ``task_weights`` tilts the stage-1b and stage-2 data towards some tasks (default
   :data:`DEFAULT_TASK_WEIGHTS`: count questions 1.5 times as often as each other task, which lifted the decoder's
   count read-out after stage 1b from 0.58 to 0.91 in the retrains of ``docs/smollava-retrains.md``; ``None``:
   uniform).

The loss is the answer tokens + ``<|im_end|>`` only, on prompts built by the analyses' own prompt builder through
the checkpoint's chat template, so training sees exactly the layout the analyses use. Logits are computed only at
the answer positions. Everything is seeded with step-based schedules and a fixed thread count, so the same seed
gives the same delta; ``max_minutes`` is only a safety stop (a run it cuts short is flagged in the summary).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.synthetic import TASKS, VALUES, mixture
from .build import IMAGE_TOKEN, VisionSpec, build_smollava

logger = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: the shipped delta's task mixture (run 10 of ``docs/smollava-retrains.md``); held-out sets stay uniform
DEFAULT_TASK_WEIGHTS = {"color": 1.0, "shape": 1.0, "count": 1.5, "position": 1.0}


@dataclass(frozen=True)
class SmolTrainConfig:
    """Every knob of :func:`train_smollava` (recorded in the delta's metadata and the model card)."""

    seed: int = 0
    threads: int = 2
    vision: VisionSpec = field(default_factory=VisionSpec)
    #: extra context sentences about other attributes in the stage-2 data (``data.synthetic.context_sentence``)
    distractors: int = 0
    # stage 1a: attribute probes on the projected image tokens (read as ``vision_pool`` says)
    n_images: int = 4000
    vision_pretrain_steps: int = 1500
    vision_pretrain_batch: int = 64
    vision_pretrain_lr: float = 2e-3
    weight_decay: float = 0.0
    #: how the stage-1a probes read the projected image tokens: ``flat`` (concatenated), ``mean`` or ``token``
    #: (each token alone, so every token carries the whole scene: the decoder's attention, which averages whichever
    #: tokens it picks, then still sees the count)
    vision_pool: str = "token"
    #: relative task frequencies in the stage-1b and stage-2 data (``data.synthetic.mixture``); None: uniform
    task_weights: dict[str, float] | None = field(default_factory=lambda: dict(DEFAULT_TASK_WEIGHTS))
    # stage 1b: alignment through the frozen decoder
    align_samples: int = 1200
    align_steps: int = 400
    align_batch: int = 8
    align_lr: float = 2e-3
    # stage 2: LoRA instruction tuning
    n_train: int = 4000
    steps: int = 350
    batch_size: int = 8
    lr: float = 5e-4
    projector_lr: float = 1e-4
    warmup: int = 20
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = LORA_TARGETS
    max_minutes: float = 60.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SmolTrainConfig:
        d = dict(d)
        d["vision"] = VisionSpec(**d["vision"])
        d["lora_targets"] = tuple(d["lora_targets"])
        d.setdefault("distractors", 0)  # configs recorded before the field existed trained without distractors
        d.setdefault("vision_pool", "flat")
        d.setdefault("task_weights", None)
        return cls(**d)


def format_task_weights(weights: dict[str, float] | None) -> str:
    """``{'count': 3.0, 'position': 2.0}`` -> ``'count=3,position=2'``; None (uniform) -> ``'uniform'`` (the
    spelling ``train-smollava --task-weights`` parses)."""
    return "uniform" if weights is None else ",".join(f"{k}={v:g}" for k, v in weights.items())


def lora_config(cfg: SmolTrainConfig) -> Any:
    """peft's ``LoraConfig``: rank ``cfg.lora_rank`` adapters on ``cfg.lora_targets`` of the decoder only (the
    vision tower has projections of the same names)."""
    from peft import LoraConfig

    names = "|".join(cfg.lora_targets)
    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none",
                      target_modules=rf".*language_model\.layers\.\d+\.(self_attn|mlp)\.({names})")


def _lr(base: float, step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, cosine decay to zero over ``steps``."""
    return base * min(1.0, (step + 1) / max(warmup, 1)) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps)))


def answer_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the labelled (answer) tokens of a left-padded batch (see ``toy.train._collate``).

    Answers sit at the end of every row, so only the last ``K + 1`` positions need logits (``logits_to_keep``),
    ``K`` being the longest answer: ``logits[:, t]`` predicts ``labels[:, t + 1]``.
    """
    logits, tgt = _answer_logits(model, batch)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1),
                                             ignore_index=-100)


def _answer_logits(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [batch, K, vocab], targets [batch, K])`` of the last ``K`` positions, ``K`` the longest answer:
    ``logits[:, t]`` predicts ``targets[:, t]`` (-100 where not labelled)."""
    labels = batch["labels"]  # [batch, seq]
    k = int((labels != -100).sum(1).max()) + 1
    logits = model(**{n: v for n, v in batch.items() if n != "labels"}, logits_to_keep=k).logits  # [batch, k, V]
    return logits[:, :-1], labels[:, -k:][:, 1:]


def _fit(model: Any, data: list, groups: list[dict], steps: int, batch_size: int, warmup: int, pad_id: int,
         rng: np.random.Generator, desc: str, progress: bool, deadline: float) -> dict:
    """Teacher-forced answer loss over ``steps`` random batches of ``data``; ``groups``: optimizer param groups
    with a ``base_lr`` each. Stops early (and says so) at ``deadline`` (``time.time()`` seconds)."""
    from ..toy.train import _collate

    opt = torch.optim.AdamW([{"params": g["params"], "base_lr": g["base_lr"]} for g in groups], lr=groups[0]["base_lr"],
                            weight_decay=0.0, betas=(0.9, 0.98))
    params = [p for g in groups for p in g["params"]]
    model.train()
    losses: list[float] = []
    step = -1
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for step in bar:
        idx = rng.choice(len(data), size=min(batch_size, len(data)), replace=False)
        loss = answer_loss(model, _collate([data[i] for i in idx], pad_id))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:
            g["lr"] = _lr(g["base_lr"], step, steps, warmup)
        opt.step()
        losses.append(float(loss.detach()))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.4f}")
        if time.time() > deadline:
            logger.warning("%s: stopping at step %d of %d (time budget reached; the model differs from a full run)",
                           desc, step + 1, steps)
            break
    model.eval()
    return {"steps": steps, "steps_done": step + 1, "final_loss": round(float(np.mean(losses[-20:])), 4),
            "first_loss": round(float(np.mean(losses[:10])), 4)}


@torch.no_grad()
def answer_accuracy(model: Any, data: list, tasks: list[str], pad_id: int, batch_size: int = 16) -> dict:
    """Teacher-forced exact match of the answer tokens (+ EOS) per task: every labelled token is the argmax.

    A cheap check of what the decoder reads between stages (no generation); ``tasks[i]`` is ``data[i]``'s task.
    """
    from ..toy.train import _collate

    model.eval()
    hits: list[bool] = []
    for i in range(0, len(data), batch_size):
        logits, tgt = _answer_logits(model, _collate(data[i:i + batch_size], pad_id))
        ok = (logits.argmax(-1) == tgt) | (tgt == -100)
        hits += ok.all(1).tolist()
    by_task = {t: round(float(np.mean([h for h, tt in zip(hits, tasks) if tt == t])), 3)
               for t in TASKS if t in tasks}
    return {"n": len(hits), "accuracy": round(float(np.mean(hits)), 3), "by_task": by_task}


def train_smollava(base_dir: str | Path, cfg: SmolTrainConfig | None = None, progress: bool = True
                   ) -> tuple[dict[str, torch.Tensor], dict]:
    """Train the vision side and the LoRA adapters on the base in ``base_dir``.

    Returns ``(delta, summary)``: the trained tensors (see :mod:`modality_circuits.smollava.delta` for the keys)
    and a summary of the run (config, per-stage losses, minutes, whether a stage was cut short).
    """
    cfg = cfg or SmolTrainConfig()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(base_dir, cfg, progress)
    finally:
        torch.set_num_threads(threads)  # the caller's setting, as it was


def _train(base_dir: str | Path, cfg: SmolTrainConfig, progress: bool) -> tuple[dict[str, torch.Tensor], dict]:
    from peft import get_peft_model

    from ..chat_template import checkpoint_template
    from ..toy.train import encode_examples, pretrain_vision
    from .delta import extract_delta

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.time()
    deadline = t0 + 60 * cfg.max_minutes
    model, tok, proc = build_smollava(base_dir, cfg.vision, seed=cfg.seed)
    template = checkpoint_template(tok, IMAGE_TOKEN, "\n")
    tpi = cfg.vision.tokens_per_image
    size = cfg.vision.image_size
    model.requires_grad_(False)
    vision_params = [p for n, p in model.named_parameters() if "vision_tower" in n]
    projector_params = [p for n, p in model.named_parameters() if "multi_modal_projector" in n]
    summary: dict[str, Any] = {"config": cfg.to_dict(), "torch_threads": torch.get_num_threads()}

    # stage 1a: attribute probes (LM not involved)
    def attribute_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        probes = mixture(n, seed=seed, weights={"image_probe": 1.0}, image_size=size)
        labels = torch.tensor([[VALUES[t].index(s.meta["scene"].answer(t)) for t in TASKS] for s in probes])
        return proc(images=[s.image for s in probes], return_tensors="pt")["pixel_values"], labels

    pixels, labels = attribute_data(cfg.n_images, cfg.seed + 11)
    for p in vision_params + projector_params:
        p.requires_grad_(True)
    model.train()
    summary["stage1_probes"] = pretrain_vision(model, pixels, labels, cfg, progress=progress,
                                               desc="smollava 1a: vision probes", pool=cfg.vision_pool,
                                               heldout=attribute_data(1000, cfg.seed + 14))
    logger.info("stage 1a: %s", summary["stage1_probes"])

    # stage 1b: alignment through the frozen decoder (image-only questions)
    align = mixture(cfg.align_samples, seed=cfg.seed + 12, weights={"image_probe": 1.0}, image_size=size,
                    task_weights=cfg.task_weights)
    data = encode_examples(align, tok, proc, tpi, template=template)
    summary["stage1_align"] = _fit(model, data, [{"params": vision_params, "base_lr": cfg.align_lr * 0.2},
                                                 {"params": projector_params, "base_lr": cfg.align_lr}],
                                   cfg.align_steps, cfg.align_batch, cfg.warmup, tok.pad_token_id, rng,
                                   "smollava 1b: alignment", progress, deadline)
    # what the frozen decoder reads from the image after alignment: held-out image-only questions, all tasks alike
    check = mixture(200, seed=cfg.seed + 15, weights={"image_probe": 1.0}, image_size=size)
    summary["stage1_align"]["heldout"] = answer_accuracy(model, encode_examples(check, tok, proc, tpi,
                                                                                template=template),
                                                         [c.task for c in check], tok.pad_token_id)
    logger.info("stage 1b: %s", summary["stage1_align"])

    # stage 2: LoRA instruction tuning on the conflict mixture (vision tower frozen)
    for p in vision_params:
        p.requires_grad_(False)
    peft_model = get_peft_model(model, lora_config(cfg))
    for p in projector_params:
        p.requires_grad_(True)
    lora_params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    train = mixture(cfg.n_train, seed=cfg.seed + 13, image_size=size, distractors=cfg.distractors,
                    task_weights=cfg.task_weights)
    data = encode_examples(train, tok, proc, tpi, template=template)
    summary["stage2"] = _fit(peft_model, data, [{"params": lora_params, "base_lr": cfg.lr},
                                                {"params": projector_params, "base_lr": cfg.projector_lr}],
                             cfg.steps, cfg.batch_size, cfg.warmup, tok.pad_token_id, rng,
                             "smollava 2: LoRA instruction tuning", progress, deadline)
    logger.info("stage 2: %s", summary["stage2"])
    summary["train_minutes"] = round((time.time() - t0) / 60, 2)
    summary["cut_short"] = any(summary[s]["steps_done"] < summary[s]["steps"] for s in ("stage1_align", "stage2"))
    return extract_delta(peft_model, cfg), summary


__all__ = ["LORA_TARGETS", "SmolTrainConfig", "answer_accuracy", "answer_loss", "lora_config", "train_smollava"]
