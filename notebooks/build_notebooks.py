"""Writes the tutorial notebooks (without outputs) from the cell sources below: ``python notebooks/build_notebooks.py``.

Notebooks 01-04 run on the shipped toy model in CI (nbmake, tests/integration/test_notebooks.py); 05 is for a
real checkpoint on a GPU and is not executed in CI. Set ``MC_MODEL`` to use another local model directory.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = """import os

import torch

from modality_circuits import HookedMLLM
from modality_circuits.resources import toy_model_path

if "MC_THREADS" in os.environ:
    torch.set_num_threads(int(os.environ["MC_THREADS"]))
torch.manual_seed(0)
MODEL = os.environ.get("MC_MODEL", str(toy_model_path()))  # the shipped toy LLaVA by default
model = HookedMLLM.from_pretrained(MODEL)
print(type(model.image_encoder).__name__, f"{model.cfg.n_layers} layers x {model.cfg.n_heads} heads,",
      f"d_model {model.cfg.d_model}, {model.image_encoder.tokens_per_image} image tokens per image")"""


def md(text: str):
    return new_markdown_cell(text.strip())


def code(text: str):
    return new_code_cell(text.strip())


NOTEBOOKS: dict[str, list] = {}

NOTEBOOKS["01_quickstart"] = [
    md("""
# 01 · Quickstart: a model, a modality-conflict sample, its token groups and where it looks

`modality_circuits` loads a multimodal LLM (LLaVA-style) as a TransformerLens `HookedTransformer` plus an image
encoder (`HookedMLLM`). Prompts are built from **named segments** (image, text context, instruction, question,
format sentence), so every token's group is known by construction. This notebook uses the small toy LLaVA shipped
in `assets/toy-llava` (trained here on synthetic data; set `MC_MODEL` to another local folder to change it).
"""),
    code(SETUP),
    md("## One synthetic conflict sample\nThe image and the text context disagree; the instruction says which to "
       "follow."),
    code("""
from modality_circuits.data import synthetic

sample = synthetic(2, seed=0, kind="conflict", image_size=model.image_encoder.image_size)[0]
print("context:    ", sample.context)
print("instruction:", sample.instruction)
print("question:   ", sample.question, "|", sample.constraint)
print(f"image answer: {sample.answer_img!r}, text answer: {sample.answer_text!r}, follow: {sample.follow}")
sample.image.resize((160, 160), resample=0)
"""),
    md("## Tokens and spans\n`model.prepare` renders the chat template and records a boolean mask per token group."),
    code("""
import pandas as pd

batch = model.prepare([sample])
tokens = model.to_str_tokens(batch, 0)
offset = batch.seq_len - len(tokens)  # left padding (none for one sample)
groups = [next((g for g in batch.spans.names if g not in ("image", "last") and batch.spans.masks[g][0, offset + j]),
               "?") for j in range(len(tokens))]
table = pd.DataFrame({"token": tokens, "group": groups})
print({g: n[0] for g, n in batch.spans.counts().items()})
table.groupby("group", sort=False)["token"].apply(lambda t: " ".join(t)[:90]).to_frame()
"""),
    md("## How strongly does the model follow the instruction?\n"
       "The binary following probability `P(f) / (P(f) + P(c))` compares the instructed modality's answer `f` with "
       "the other one `c`; greedy generation shows the free-text answer."),
    code("""
from modality_circuits.metrics import following_scores

scores = following_scores(model, batch)
print(f"p_binary = {float(scores.p_binary[0]):.3f}  (followed: {bool(scores.followed[0])})")
print("generation:", model.generate(batch, max_new_tokens=3, return_type="str"))
"""),
    md("## Attention views (circuitsvis)\nA few heads of a middle layer, restricted to the image, context, instruction "
       "and last tokens (weights are the model's, not renormalised)."),
    code("""
from modality_circuits import viz

layer = model.cfg.n_layers // 2
props = viz.attention_view_props(model, batch, 0, [(layer, h) for h in range(min(4, model.cfg.n_heads))],
                                 groups=("image", "context", "instruction", "last"))
print(len(props["tokens"]), "tokens shown")
viz.show_attention_heads(props)
"""),
    md("## Attention over the image\nFrom the instruction tokens (mean) and from the last position, averaged over "
       "layers and heads, drawn on the vision tower's patch grid next to the image the model saw."),
    code("""
from modality_circuits.viz.image_attention import image_attention_maps

maps = image_attention_maps(model, batch, 0, [("instruction", None, None), ("last", None, None)])
for m in maps:
    print(m.title)
viz.image_attention_figure(maps)
"""),
]

NOTEBOOKS["02_information_flow"] = [
    md("""
# 02 · Information flow: attention knockout, contributions, anchor read-out

Which token groups must be able to talk to which, at which layers, for the model to follow the instruction?
**Attention knockout** blocks the attention from a source group's keys to a destination group's queries
(`src ↛ dst`) at a window of layers and measures the relative change `Δ` of the binary following probability
(the paper's Figs 2-3). Small `n` here; `modality-circuits reproduce` runs the full sweep.
"""),
    code(SETUP),
    code("""
from modality_circuits import viz
from modality_circuits.data import synthetic
from modality_circuits.sweeps.knockout import knockout_sweep

samples = synthetic(24, seed=0, kind="conflict", image_size=model.image_encoder.image_size)
ko = knockout_sweep(model, samples, window=1, batch_size=12)
ko.head()
"""),
    code("viz.knockout_curves(ko)"),
    md("A single knockout as a context manager: cut `image ↛ last` in every layer for one batch."),
    code("""
from modality_circuits.interventions import knockout
from modality_circuits.metrics import following_scores

batch = model.prepare(samples[:8])
before = following_scores(model, batch).p_binary
with knockout(model, batch.spans, "image", "last", layers=range(model.cfg.n_layers)):
    after = following_scores(model, batch).p_binary
for s, b, a in zip(samples[:8], before, after):
    print(f"{s.id:16s} follow={s.follow:5s} p_binary {float(b):.3f} -> {float(a):.3f}")
"""),
    md("## Attention vs MLP contributions\nThe last position's residual stream splits exactly into per-layer "
       "attention and MLP terms of the following-minus-competitor logit difference."),
    code("""
from modality_circuits.lens import anchor_readout, contributions

contrib = contributions(model, samples, batch_size=12)
viz.contribution_bars(contrib)
"""),
    md("## Anchor read-out\nLogit lens at the instruction tokens and the last position: from which layer does the "
       "decision read there agree with the model's final answer?"),
    code("""
anchors = anchor_readout(model, samples, batch_size=12)
viz.anchor_lines(anchors)
"""),
]

NOTEBOOKS["03_critical_heads"] = [
    md("""
# 03 · Critical heads: scores, selection, blocking and amplification

Heads are scored four ways (exact ablation, attribution patching, direct logit attribution, attention mass to the
instructed modality); the top p% are **blocked** (MFR should drop) and **amplified** on failed samples (some should
be restored), against random head sets of the same size and with a general-ability control.
"""),
    code(SETUP),
    code("""
import pandas as pd

from modality_circuits import viz
from modality_circuits.data import synthetic
from modality_circuits.sweeps.heads import head_scores, score_matrix, select_heads

size = model.image_encoder.image_size
samples = synthetic(16, seed=0, kind="conflict", image_size=size)
scores = pd.concat([head_scores(model, samples, method=m, batch_size=8) for m in ("ablation", "dla", "attention")])
top = select_heads(score_matrix(scores[scores["method"] == "ablation"]), pct=5)
print("top heads (layer, head):", top)
viz.head_heatmaps(scores, selected=top)
"""),
    md("## The experiment with controls\nSelection and evaluation splits are disjoint; `n_random` random head sets "
       "give the control; probes and consistent samples measure general ability."),
    code("""
from IPython.display import HTML

from modality_circuits.sweeps.head_experiment import heads_experiment

conflict = synthetic(24, seed=1, kind="conflict", image_size=size)
general = synthetic(6, seed=2, kind="image_probe", image_size=size) + synthetic(6, seed=3, kind="text_probe",
                                                                               image_size=size)
res = heads_experiment(model, conflict, general, pct=5, n_random=3, alphas=(2.0, 4.0), batch_size=12, seed=0)
print({k: len(v) for k, v in res.split.items()}, "selected:", res.selected)
HTML(viz.results_table_html(res.summary(), split=res.split, selected=res.selected, n_random=3))
"""),
    md("## The same interventions by hand\n`block_heads` and `amplify_heads` are context managers around any forward."),
    code("""
from modality_circuits.interventions import amplify_heads, block_heads
from modality_circuits.metrics import following_scores

batch = model.prepare(conflict[:6])
base = following_scores(model, batch).p_binary
with block_heads(model, res.selected):
    blocked = following_scores(model, batch).p_binary
with amplify_heads(model, res.selected, alpha=4.0):
    amplified = following_scores(model, batch).p_binary
pd.DataFrame({"sample": [s.id for s in conflict[:6]], "follow": [s.follow for s in conflict[:6]],
              "p_binary": base.numpy(), "blocked": blocked.numpy(), "amplified x4": amplified.numpy()}).round(3)
"""),
]

NOTEBOOKS["04_patching"] = [
    md("""
# 04 · Activation patching and path patching

Causal tracing with image-aware clean/corrupted pairs (each run carries its own image): **activation patching**
(move one activation from the clean run into the corrupted one; 1 = clean behaviour restored, 0 = none) and
**path patching** (the effect of a sender that flows *only through* chosen receivers).
"""),
    code(SETUP),
    md("## Instruction flip: which token group carries the instruction's effect, layer by layer?"),
    code("""
from modality_circuits.data import synthetic
from modality_circuits.patching import instruction_flip, patch_resid_pre
from modality_circuits.viz.patching import patching_heatmap

size = model.image_encoder.image_size
samples = synthetic(8, seed=3, kind="conflict", image_size=size)
pair = instruction_flip(model, samples)          # same image + context, the other instruction
res = patch_resid_pre(model, pair, by="group")   # [layer, group]
patching_heatmap(res).show()
res.to_frame().pivot_table(index="layer", columns="group", values="value").round(2)
"""),
    md("## Image swap: does the image reach the answer through the instruction anchors?\n"
       "Senders: the image tokens' residual at layer 0 (from another image). Receivers: the residual stream at "
       "the instruction tokens, or at the last position, entering each layer (noising: effect 1 = all of the "
       "image's effect flows through that receiver)."),
    code("""
from modality_circuits.patching import GroupResid, ResidAt, image_swap, path_patch

vis = [s for s in synthetic(32, seed=5, kind="conflict", follow="image", image_size=size)]
clean, donors = [], []
for s in vis:
    d = next((x for x in vis if x.task == s.task and x.answer_img != s.answer_img), None)
    if d is not None:
        clean.append(s); donors.append(d)
pair2 = image_swap(model, clean[:8], donors[:8])
for layer in range(1, model.cfg.n_layers + 1):
    eff = {g: float(path_patch(model, pair2, GroupResid("image", 0), ResidAt(g, layer)).effect)
           for g in ("instruction", "last")}
    print(f"receivers entering layer {layer}: via instruction {eff['instruction']:.2f}, via last {eff['last']:.2f}")
"""),
    md("## Head amplification on a failed sample\nScale the output of the heads that exact ablation ranks highest; "
       "notebook 03 measures the restore rate against random heads."),
    code("""
from modality_circuits.interventions import amplify_heads
from modality_circuits.metrics import following_scores
from modality_circuits.sweeps.heads import head_scores, score_matrix, select_heads

pool = synthetic(48, seed=4, kind="conflict", image_size=size)
pool_scores = following_scores(model, model.prepare(pool))
failed = [s for s, ok in zip(pool, pool_scores.followed.tolist()) if not ok]
print(f"{len(failed)} of {len(pool)} samples fail to follow the instruction")
target = failed[0] if failed else pool[0]
others = [s for s in pool if s is not target][:12]
heads = select_heads(score_matrix(head_scores(model, others, method="ablation", batch_size=12)), pct=5)
one = model.prepare([target])
for alpha in (1.0, 2.0, 4.0, 8.0):
    with amplify_heads(model, heads, alpha=alpha):
        p = float(following_scores(model, one).p_binary[0])
    print(f"alpha={alpha:>3}: p_binary={p:.3f}")
"""),
]

NOTEBOOKS["05_real_checkpoint_gpu"] = [
    md("""
# 05 · A real checkpoint on a GPU (LLaVA-1.5-7B)

*Not executed in CI* (it needs a GPU and a local 7B checkpoint). Everything runs offline from a local folder.

**Supported:** `LlavaForConditionalGeneration` checkpoints in the HF format, e.g. a local copy of
`llava-hf/llava-1.5-7b-hf` (CLIP ViT-L/14 at 336 px → 24×24 = 576 image tokens, Vicuna-7B decoder).
Qwen2-VL / Qwen2.5-VL-7B (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`) load the same
way: their adapters apply the multimodal rotary embedding (M-RoPE) inside the HookedTransformer, so attention edits
work; images keep their dynamic resolution (the token count follows `image_grid_thw`).

**dtype and memory.** Weights take ~14 GB in bfloat16/float16 (~28 GB in float32). Use `bfloat16` on A100/H100
class GPUs (float16 can overflow in some layers; the library raises `NumericalError` on NaN/inf logits when asked).
Prompts are ~700 tokens (576 image tokens); the knockout sweep runs all edges into one destination side by side,
so its batch is `batch_size × n_edges`: start with `--batch-size 4` on 80 GB and raise it while memory allows.
`attribution` head scores need a backward pass (more memory); `ablation` and `dla` do not.
"""),
    md("## Load"),
    code("""
import torch

from modality_circuits import HookedMLLM

MODEL = "/models/llava-1.5-7b-hf"  # a local folder: config.json, *.safetensors, tokenizer, preprocessor_config.json
model = HookedMLLM.from_pretrained(MODEL, dtype=torch.bfloat16, device="cuda")
print(model.cfg.n_layers, model.cfg.n_heads, model.image_encoder.tokens_per_image)
print(torch.cuda.memory_allocated() / 2**30, "GiB allocated")
"""),
    md("## Data: the Modality-Following (MC²) JSON and COCO 2014 images"),
    code("""
from modality_circuits.data import load_mc2

samples = load_mc2("data/v3_following_vision_open_ended_llava-v1.5-7b_remaining.json", "/data/coco2014", question=3)
print(len(samples), "conflict samples;", sum(s.follow == "image" for s in samples), "vision-following")
"""),
    md("## MFR and a knockout sweep"),
    code("""
from modality_circuits import viz
from modality_circuits.metrics import mfr
from modality_circuits.sweeps.knockout import knockout_sweep

for cond in ("image", "text"):
    print(cond, mfr(model, [s for s in samples if s.follow == cond], batch_size=8))
ko = knockout_sweep(model, samples[:200], window=9, batch_size=4)  # the paper uses a window of 9 layers
viz.knockout_curves(ko)
"""),
    md("## Attention over the image\nThe 576 image tokens lie on a 24×24 grid (CLS already dropped by the default "
       "feature strategy)."),
    code("""
from modality_circuits.viz.image_attention import image_attention_maps

batch = model.prepare(samples[:1])
viz.image_attention_figure(image_attention_maps(model, batch, 0, [("instruction", None, None), ("last", None, None)]))
"""),
    md("""
## Or the whole pipeline from the command line

```bash
modality-circuits reproduce --model /models/llava-1.5-7b-hf \\
    --data data/v3_following_vision_open_ended_llava-v1.5-7b_remaining.json --images /data/coco2014 --question 3 \\
    --device cuda --dtype bfloat16 --batch-size 4 --window 9 --heatmap-methods ablation,dla,attention \\
    --out runs/llava-7b
```
"""),
]


def build(out_dir: Path = HERE) -> list[Path]:
    """Write every notebook (no outputs, stable cell ids) to ``out_dir``; returns the paths."""
    paths = []
    for name, cells in NOTEBOOKS.items():
        for i, c in enumerate(cells):
            c["id"] = f"cell-{i:02d}"  # stable ids: rebuilding gives the same files
        nb = new_notebook(cells=cells, metadata={
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"}})
        path = Path(out_dir) / f"{name}.ipynb"
        nbformat.validate(nb)
        nbformat.write(nb, path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in build():
        print(p)
