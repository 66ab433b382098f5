"""Seeded synthetic modality-conflict data with the paper's structure (the embedded default).

Each sample is a small rendered image (coloured shapes on a dark background), a ``Text context`` sentence that
contradicts it (``conflict``) or agrees (``consistent``), one of the paper's two modality instructions verbatim,
a question and one of the three format sentences. Tasks mirror MC²: ``color`` (colour recognition), ``shape``
(object recognition), ``count`` (counting) and ``position`` (positional reasoning). Single-modality probes
(``image_probe``: image + question, ``text_probe``: context + question) serve as the general-ability control;
their competitor answer is a random distractor of the same task.

With ``distractors=k`` (default 0) the text context gains ``k`` sentences about *other* attributes (random values,
random order), so reading the context means finding the sentence the question asks about; a checkpoint trained on
such contexts records ``k`` in its folder (:func:`checkpoint_data_spec`) and the analyses use the same ``k``.
``distractors=0`` draws no extra random numbers, so it gives exactly the samples of earlier releases.

Everything is a pure function of ``seed`` (and ``distractors``): the same call gives the same samples, images
included.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .sample import CONSTRAINTS, INSTRUCTIONS, Sample

COLORS = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 230),
    "yellow": (235, 220, 50), "purple": (150, 60, 200), "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("one", "two", "three", "four")
POSITIONS = ("left", "right", "top", "bottom")
#: top-left corner (x, y), in units of size/4, of the half-size box each position puts the shapes in
_BOX = {"left": (0, 1), "right": (2, 1), "top": (1, 0), "bottom": (1, 2)}
TASKS = ("color", "shape", "count", "position")
BACKGROUND = (25, 25, 30)

QUESTIONS = {
    "color": "What is the color of the shape?",
    "shape": "What shape is shown in the image?",
    "count": "How many shapes are in the image?",
    "position": "On which side of the image is the shape?",
}
CONTEXTS = {
    "color": "The shape in the image is {}.",
    "shape": "The image shows a {}.",
    "count": "There are {} shapes in the image.",
    "position": "The shape is on the {} side of the image.",
}
VALUES = {"color": tuple(COLORS), "shape": SHAPES, "count": COUNTS, "position": POSITIONS}


@dataclass(frozen=True)
class Scene:
    """What an image shows: one value per task."""

    color: str
    shape: str
    count: str
    position: str

    def answer(self, task: str) -> str:
        return getattr(self, task)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple, rgb: tuple) -> None:  # box: 4 ints (numpy ok)
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=rgb)


def render(scene: Scene, size: int = 32, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw a scene: ``count`` shapes of one colour and shape inside the ``position`` box.

    The box is a ``size/2`` square centred on the named edge (left, right, top or bottom half); one shape fills
    it, several sit in distinct cells of its 2×2 grid. Small jitter comes from ``rng``.
    """
    rng = rng or np.random.default_rng(0)
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    half = size // 2
    bx, by = _BOX[scene.position]
    qx, qy = bx * size // 4, by * size // 4
    n = COUNTS.index(scene.count) + 1
    rgb = COLORS[scene.color]
    if n == 1:
        m = max(1, size // 16)
        j = rng.integers(-1, 2, size=2) * max(1, size // 32)
        x0, y0 = qx + m + int(j[0]), qy + m + int(j[1])
        _draw_shape(draw, scene.shape, (max(0, x0), max(0, y0), min(size - 1, x0 + half - 2 * m - 1),
                                        min(size - 1, y0 + half - 2 * m - 1)), rgb)
    else:
        cell = half // 2
        cells = rng.permutation(4)[:n]
        for c in cells:
            cy, cx = qy + (c // 2) * cell, qx + (c % 2) * cell
            pad = max(1, cell // 6)
            _draw_shape(draw, scene.shape, (cx + pad, cy + pad, cx + cell - pad - 1, cy + cell - pad - 1), rgb)
    return img


def random_scene(rng: np.random.Generator) -> Scene:
    return Scene(color=str(rng.choice(list(COLORS))), shape=str(rng.choice(SHAPES)),
                 count=str(rng.choice(COUNTS)), position=str(rng.choice(POSITIONS)))


def _other(rng: np.random.Generator, task: str, value: str) -> str:
    options = [v for v in VALUES[task] if v != value]
    return str(rng.choice(options))


#: The largest ``distractors`` value: one sentence for each other task.
MAX_DISTRACTORS = len(TASKS) - 1
#: The file in a checkpoint folder that records the synthetic data it was trained on (:func:`checkpoint_data_spec`).
DATA_SPEC_FILE = "synthetic_data.json"


def _check_distractors(distractors: int) -> None:
    if not isinstance(distractors, int) or not 0 <= distractors <= MAX_DISTRACTORS:
        raise ValueError(f"distractors must be an integer from 0 to {MAX_DISTRACTORS} (one sentence per other task), "
                         f"got {distractors!r}.")


def context_sentence(rng: np.random.Generator, task: str, value: str, distractors: int = 0) -> str:
    """The text context: the sentence stating ``value`` for ``task``, plus ``distractors`` sentences about other
    tasks (distinct tasks, random values), all in random order. ``distractors=0`` draws nothing from ``rng``."""
    sentences = [CONTEXTS[task].format(value)]
    if distractors:
        others = [t for t in TASKS if t != task]
        for i in rng.permutation(len(others))[:distractors]:
            sentences.append(CONTEXTS[others[i]].format(str(rng.choice(VALUES[others[i]]))))
        sentences = [sentences[i] for i in rng.permutation(len(sentences))]
    return " ".join(sentences)


def checkpoint_data_spec(path: str | Path) -> dict:
    """``{"distractors": k}``: the synthetic data a checkpoint folder was trained on (its :data:`DATA_SPEC_FILE`;
    ``k = 0`` for folders without one, e.g. the toy). Analyses of that checkpoint use the same contexts."""
    f = Path(path) / DATA_SPEC_FILE
    spec = {"distractors": 0}
    if f.is_file():
        spec.update(json.loads(f.read_text()))
        _check_distractors(spec["distractors"])
    return spec


def make_sample(rng: np.random.Generator, kind: str = "conflict", follow: str | None = None, task: str | None = None,
                constraint: str | None = None, image_size: int = 32, index: int = 0, distractors: int = 0) -> Sample:
    """One sample of the given kind (``conflict``, ``consistent``, ``image_probe``, ``text_probe``); ``distractors``
    extra context sentences about other attributes (:func:`context_sentence`)."""
    task = task or str(rng.choice(TASKS))
    follow = follow or str(rng.choice(["image", "text"]))
    constraint = constraint if constraint is not None else str(rng.choice(CONSTRAINTS))
    scene = random_scene(rng)
    truth = scene.answer(task)
    image = render(scene, image_size, rng)
    question = QUESTIONS[task]
    if kind == "conflict":
        text_value = _other(rng, task, truth)
        context = context_sentence(rng, task, text_value, distractors)
        return Sample(image=image, context=context, instruction=INSTRUCTIONS[follow], question=question,
                      constraint=constraint, answer_img=truth, answer_text=text_value,
                      follow=follow, task=task, kind=kind, id=f"syn-{kind}-{index}", meta={"scene": scene})
    if kind == "consistent":
        # Both modalities agree; the competitor is a distractor so that the binary score is defined.
        distractor = _other(rng, task, truth)
        a_img, a_txt = (truth, distractor) if follow == "image" else (distractor, truth)
        context = context_sentence(rng, task, truth, distractors)
        return Sample(image=image, context=context, instruction=INSTRUCTIONS[follow], question=question,
                      constraint=constraint, answer_img=a_img, answer_text=a_txt,
                      follow=follow, task=task, kind=kind, id=f"syn-{kind}-{index}",
                      meta={"scene": scene, "truth": truth})
    distractor = _other(rng, task, truth)
    if kind == "image_probe":
        return Sample(image=image, context=None, instruction=None, question=question, constraint=constraint,
                      answer_img=truth, answer_text=distractor, follow="image", task=task, kind=kind,
                      id=f"syn-{kind}-{index}", meta={"scene": scene})
    if kind == "text_probe":
        context = context_sentence(rng, task, truth, distractors)
        return Sample(image=None, context=context, instruction=None, question=question, constraint=constraint,
                      answer_img=distractor, answer_text=truth, follow="text", task=task, kind=kind,
                      id=f"syn-{kind}-{index}", meta={"scene": scene})
    raise ValueError(f"Unknown sample kind {kind!r}; use one of conflict, consistent, image_probe, text_probe.")


def synthetic(n: int = 200, seed: int = 0, kind: str = "conflict", follow: str | None = None,
              tasks: Sequence[str] | None = None, image_size: int = 32, distractors: int = 0) -> list[Sample]:
    """``n`` seeded samples of one kind.

    With ``follow=None`` the instructions alternate (half vision-following, half text-following), and tasks
    cycle through ``tasks`` (default: all four), so every condition is balanced. ``distractors``: extra context
    sentences about other attributes (0 to :data:`MAX_DISTRACTORS`).
    """
    _check_distractors(distractors)
    if kind not in ("conflict", "consistent", "image_probe", "text_probe"):
        raise ValueError(f"Unknown sample kind {kind!r}; use one of conflict, consistent, image_probe, text_probe.")
    tasks = tuple(tasks or TASKS)
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"Unknown task {t!r}; synthetic tasks are {TASKS}.")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        f = follow or ("image" if i % 2 == 0 else "text")
        out.append(make_sample(rng, kind=kind, follow=f, task=tasks[(i // 2) % len(tasks)], image_size=image_size,
                               index=i, distractors=distractors))
    return out


def mixture(n: int, seed: int, weights: dict[str, float] | None = None, image_size: int = 32,
            distractors: int = 0, task_weights: dict[str, float] | None = None) -> list[Sample]:
    """A shuffled training mixture of kinds (default: 60% conflict, 15% consistent, 12.5% each probe).

    ``task_weights``: relative frequency of each task (keys: :data:`TASKS`); default uniform. With weights the
    samples come from a different random stream than without, so the default mixture is unchanged.
    """
    _check_distractors(distractors)
    weights = weights or {"conflict": 0.6, "consistent": 0.15, "image_probe": 0.125, "text_probe": 0.125}
    p_task = task_probabilities(task_weights)
    rng = np.random.default_rng(seed)
    kinds = rng.choice(list(weights), size=n, p=np.array(list(weights.values())) / sum(weights.values()))
    return [make_sample(rng, kind=str(k), image_size=image_size, index=i, distractors=distractors,
                        task=None if p_task is None else str(rng.choice(TASKS, p=p_task)))
            for i, k in enumerate(kinds)]


def task_probabilities(task_weights: dict[str, float] | None) -> np.ndarray | None:
    """Task weights -> probabilities in :data:`TASKS` order; refuses unknown tasks and non-positive totals."""
    if task_weights is None:
        return None
    unknown = sorted(set(task_weights) - set(TASKS))
    if unknown:
        raise ValueError(f"task_weights names unknown task(s) {unknown}; use {list(TASKS)}.")
    w = np.array([float(task_weights.get(t, 0.0)) for t in TASKS])
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"task_weights must be non-negative with a positive total; got {task_weights}.")
    return w / w.sum()


def vocabulary() -> list[str]:
    """Every word the synthetic prompts and answers use (for the toy model's word-level tokenizer)."""
    import re

    texts = [*INSTRUCTIONS.values(), *CONSTRAINTS, *QUESTIONS.values(), *CONTEXTS.values(), "Text context:",
             *[v for vals in VALUES.values() for v in vals]]
    words: list[str] = []
    for t in texts:
        for w in re.findall(r"\w+|[^\w\s]+", t.replace("{}", " ")):
            if w not in words:
                words.append(w)
    return words
