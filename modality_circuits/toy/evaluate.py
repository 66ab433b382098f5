"""The toy model card, written from the training summary and :func:`~modality_circuits.evaluation.evaluate_model`'s
held-out numbers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..evaluation import EVAL_SEED, evaluate_model  # noqa: F401  (the model card's numbers come from there)

logger = logging.getLogger(__name__)

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
