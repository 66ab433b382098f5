"""``train-smollava`` end to end: train, save the delta, materialise it, evaluate it and write the model card."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def measure(base_dir: Path, checkpoint: Path, delta: dict, scale: float) -> dict:
    """Perplexity of :data:`~.card.PASSAGE` under the base and the materialised decoder, and the weight change."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM, LlavaForConditionalGeneration

    from .card import PASSAGE, perplexity, weight_change

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    base = LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    trained = LlavaForConditionalGeneration.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    p0, p1 = perplexity(base, tok), perplexity(trained, tok)
    state = {"model.language_model." + k.removeprefix("model."): v for k, v in base.state_dict().items()}
    n_tok = len(tok(PASSAGE, add_special_tokens=False)["input_ids"])
    return {"perplexity": {"base": round(p0, 4), "trained": round(p1, 4), "tokens": n_tok,
                           "relative_change_pct": round(100 * (p1 / p0 - 1), 2)},
            "weight_change": weight_change(delta, state, scale)}


def train_and_card(base_dir: Path, out: Path, cfg: Any, eval_n: int = 200, progress: bool = True) -> dict:
    """Train (:func:`~.train.train_smollava`), write ``out/delta.safetensors`` + sidecar, materialise it, evaluate
    the materialised checkpoint on held-out sets, measure perplexity and weight change, write ``README.md``.
    Returns the sidecar (everything the card shows)."""
    from ..evaluation import evaluate_model
    from ..models import HookedMLLM
    from .card import write_card
    from .delta import materialise, save_delta, sidecar_of
    from .train import train_smollava

    delta, summary = train_smollava(base_dir, cfg, progress=progress)
    path = save_delta(delta, Path(out) / "delta.safetensors", base_dir, cfg, {"training": summary})
    checkpoint = materialise(path)
    logger.info("evaluating the materialised checkpoint %s", checkpoint)
    metrics = evaluate_model(HookedMLLM.from_pretrained(checkpoint), n=eval_n, progress=progress,
                             distractors=cfg.distractors)
    side = json.loads(sidecar_of(path).read_text())
    side.update({"metrics": metrics, **measure(base_dir, checkpoint, delta, cfg.lora_alpha / cfg.lora_rank)})
    tmp = path.with_name(".delta.json.tmp")
    tmp.write_text(json.dumps(side, indent=2))
    tmp.replace(sidecar_of(path))
    write_card(Path(out), side)
    return side


__all__ = ["measure", "train_and_card"]
