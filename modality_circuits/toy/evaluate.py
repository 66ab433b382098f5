"""Evaluation of a model on held-out synthetic data (``modality-circuits evaluate``) and the toy model card.

Reports, in closed form (full-answer log-probabilities): MFR for vision-following and text-following conflict
samples, accuracy on consistent samples and on the single-modality probes, and failure counts; for conflict
samples also the open form (greedy generation matched against the answers).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..data.synthetic import synthetic
from ..metrics import mfr_open, score_dataset

logger = logging.getLogger(__name__)

EVAL_SEED = 10_007  # held-out: training uses ToyConfig.seed's stream


def evaluate_model(model: Any, n: int = 200, seed: int = EVAL_SEED, batch_size: int = 50, progress: bool = True,
                   image_size: int | None = None) -> dict:
    """Closed-form accuracies on fresh synthetic samples (``n`` per condition)."""
    size = image_size or getattr(model.image_encoder, "image_size", 32)
    sets = {
        "conflict_follow_image": synthetic(n, seed=seed, kind="conflict", follow="image", image_size=size),
        "conflict_follow_text": synthetic(n, seed=seed + 1, kind="conflict", follow="text", image_size=size),
        "consistent": synthetic(n, seed=seed + 2, kind="consistent", image_size=size),
        "image_probe": synthetic(n, seed=seed + 3, kind="image_probe", image_size=size),
        "text_probe": synthetic(n, seed=seed + 4, kind="text_probe", image_size=size),
    }
    out: dict[str, Any] = {"n_per_condition": n, "seed": seed}
    for name, samples in sets.items():
        s = score_dataset(model, samples, batch_size=batch_size, progress=progress)
        ok = s.followed
        out[name] = {"accuracy": round(float(ok.float().mean()), 4), "failures": int((~ok).sum())}
        by_task: dict[str, float] = {}
        for t in sorted({x.task for x in samples}):
            idx = [i for i, x in enumerate(samples) if x.task == t]
            by_task[t] = round(float(ok[idx].float().mean()), 4)
        out[name]["by_task"] = by_task
        if name.startswith("conflict"):
            o = mfr_open(model, samples, batch_size=batch_size, progress=progress)
            out[name]["open_form"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in o.items()}
    return out


def write_model_card(out_dir: Path, summary: dict) -> None:
    """README.md model card next to the checkpoint, from the training summary (data spec, seed, time, metrics)."""
    cfg = summary["config"]
    m = summary.get("metrics", {})

    def row(k: str) -> str:
        v = m.get(k, {})
        o = v.get("open_form", {})
        open_txt = f"{o['mfr']} / {o['competitor']} / {o['other']}" if o else "n/a"
        return (f"| {k} | {v.get('accuracy', 'n/a')} | {v.get('failures', 'n/a')} | {open_txt} | "
                f"{v.get('by_task', '')} |")

    vp = summary.get("vision_pretraining")
    vision = (f"{vp['steps']} steps × batch {cfg.get('vision_pretrain_batch')} (AdamW lr "
              f"{cfg.get('vision_pretrain_lr')}), vision tower + projector with one linear head per scene attribute "
              f"on the mean projected image token (heads discarded); training accuracy at the end "
              f"{vp['train_accuracy']}" if vp else "none (vision tower trained only by the instruction-tuning loss)")
    frozen = ("vision tower frozen, projector + decoder trained" if cfg.get("freeze_vision")
              else "all weights trained")
    text = f"""# toy-llava: a tiny LLaVA trained here to follow modality instructions

An ordinary `LlavaForConditionalGeneration` (CLIP vision tower {cfg['vision_layers']} layers × d{cfg['d_vision']},
{cfg['image_size']}×{cfg['image_size']} images in {cfg['patch_size']}×{cfg['patch_size']} patches =
{(cfg['image_size'] // cfg['patch_size']) ** 2} image tokens; MLP projector; Llama decoder {cfg['n_layers']} layers,
d_model {cfg['d_model']}, {cfg['n_heads']} heads, d_mlp {cfg['d_mlp']}; word-level tokenizer) trained from scratch by
`modality-circuits train-toy` on seeded synthetic data (`modality_circuits.data.synthetic.mixture`: 60% conflict,
15% consistent, 12.5% image-only and 12.5% text-only probes; tasks color / shape / count / position; the paper's two
instructions verbatim; the three format sentences), in two stages as LLaVA is built:

1. vision pretraining: {vision}
2. instruction tuning: loss on the answer tokens + EOS only; {frozen}.

- seed: {cfg['seed']}; training samples: {cfg['n_train']}; steps: {summary['steps_done']} × batch {cfg['batch_size']};
  AdamW lr {cfg['lr']} (×{cfg.get('vision_lr_mult', 1)} for the projector; cosine, warmup {cfg['warmup']})
- training time: {summary['train_minutes']} min on {summary.get("torch_threads", "?")} CPU thread(s); final loss
  {summary['final_loss']:.4f}
- prompt layout: `prompt_template.json` (system, `USER:`, segments separated by newlines, `ASSISTANT:`)

## Measured on held-out synthetic samples (closed form, full-answer log-probabilities)

n = {m.get('n_per_condition', '?')} per condition, seed {m.get('seed', '?')}.

| condition | accuracy (MFR for conflict) | failures | open form: follow / competitor / other | by task |
| --- | --- | --- | --- | --- |
{row('conflict_follow_image')}
{row('conflict_follow_text')}
{row('consistent')}
{row('image_probe')}
{row('text_probe')}

Re-create with `modality-circuits train-toy --out DIR --seed {cfg['seed']}` and check with
`modality-circuits evaluate --model DIR`.
"""
    (out_dir / "README.md").write_text(text)
    (out_dir / "metrics.json").write_text(json.dumps(m, indent=2))
