"""Shared fixtures: an offline BPE tokenizer, tiny random LLaVA models (HF + HookedMLLM pairs), images.

Everything is built in memory from small configs (no hub). Models are cached for the whole session by their
config, so each configuration is built and converted once; tests must not leave hooks or edits behind.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Callable  # noqa: E402

# Tensor shapes checked at run time in the test run: every annotated function of the package is wrapped by
# jaxtyping + beartype when the package is first imported (MC_TYPECHECK=0 turns it off).
if os.environ.get("MC_TYPECHECK", "1") != "0":
    from jaxtyping import install_import_hook

    _typecheck_hook = install_import_hook("modality_circuits", "typecheck.checker")

from types import SimpleNamespace  # noqa: E402
from typing import Any

import pytest  # noqa: E402
import torch  # noqa: E402

from modality_circuits import HookedMLLM, MLLMBatch, Segment  # noqa: E402

# Tiny models are fastest on one thread, and intra-op threads slow down a hundredfold when the cores are
# shared with another job (spin-waiting). MC_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("MC_TEST_THREADS", "1")))
from modality_circuits.testing import random_images, tiny_bpe_tokenizer, tiny_llava  # noqa: E402

#: Logit agreement required between HookedMLLM and HF (fp32, eager attention).
ATOL = 1e-4


def perturb_vectors(model: torch.nn.Module, seed: int = 1, scale: float = 0.1) -> None:
    """Random-ise every 1-D parameter (norm weights around 1, biases around 0).

    HF initialises biases to 0 and norm weights to 1, which would hide conversion bugs (e.g. Qwen2's q/k/v
    biases, or a norm weight applied to the wrong tensor). Done before conversion so both models agree.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() != 1:
                continue
            noise = torch.randn(p.shape, generator=g) * scale
            if name.endswith("bias"):
                p.copy_(noise)
            else:
                p.copy_(1.0 + noise)


def _key(kwargs: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()))


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    return tiny_bpe_tokenizer()


@pytest.fixture(scope="session")
def images() -> list[Any]:
    """Four random 32x32 RGB PIL images (the tiny vision tower's size)."""
    return random_images(4, size=32, seed=0)


@pytest.fixture(scope="session")
def make_pair(tokenizer: Any) -> Callable[..., tuple[Any, HookedMLLM]]:
    """``make_pair(**tiny_llava_kwargs) -> (hf_model, hooked_model)``, cached per config for the session."""
    cache: dict[tuple, tuple[Any, HookedMLLM]] = {}

    def make(**kwargs: Any) -> tuple[Any, HookedMLLM]:
        key = _key(kwargs)
        if key not in cache:
            sliding_window = kwargs.pop("sliding_window", None)
            hf = tiny_llava(tokenizer, **kwargs)
            if sliding_window is not None:
                hf.config.text_config.sliding_window = sliding_window
            perturb_vectors(hf)
            cache[key] = (hf, HookedMLLM.from_hf(hf, tokenizer))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def llava_pair(make_pair: Callable) -> tuple[Any, HookedMLLM]:
    """The default tiny model: Llama decoder with GQA (4 query heads, 2 KV heads), 2 layers."""
    return make_pair(n_kv_heads=2)


@pytest.fixture(scope="session")
def hf_model(llava_pair: tuple) -> Any:
    return llava_pair[0]


@pytest.fixture(scope="session")
def model(llava_pair: tuple) -> HookedMLLM:
    return llava_pair[1]


def two_prompts(images: list[Any]) -> list[list[Segment]]:
    """A padded batch: prompt 0 has two images and is long, prompt 1 has one image and is short."""
    return [
        [Segment("image", image=images[0]), Segment("image", image=images[1]),
         Segment("context", "Text context: the shape in the image is a red circle."),
         Segment("question", "What is the color of the shape?"),
         Segment("constraint", "Answer with one word.")],
        [Segment("image", image=images[2]), Segment("question", "What is the shape?")],
    ]


@pytest.fixture(scope="session")
def prompts(images: list[Any]) -> list[list[Segment]]:
    return two_prompts(images)


@pytest.fixture(scope="session")
def batch(model: HookedMLLM, prompts: list) -> MLLMBatch:
    """The default model's padded 2-prompt batch (3 images in all)."""
    b = model.prepare(prompts)
    assert (b.attention_mask == 0).any(), "the fixture batch must be padded"
    return b


def hf_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(1) - 1).clamp(min=0)


@torch.no_grad()
def hf_logits(hf: Any, batch: MLLMBatch, **kwargs: Any) -> torch.Tensor:
    """HF LLaVA logits for a batch (positions follow the mask, as in HookedMLLM)."""
    inputs = dict(batch.model_inputs)
    inputs.update(kwargs)
    return hf(input_ids=batch.tokens, attention_mask=batch.attention_mask,
              position_ids=hf_position_ids(batch.attention_mask), **inputs).logits


def max_diff_on_mask(a: torch.Tensor, b: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """Largest absolute difference over non-padding positions."""
    m = attention_mask.bool()
    return float((a[m] - b[m]).abs().max())


@pytest.fixture(scope="session")
def helpers() -> SimpleNamespace:
    """Helper functions for tests (fixtures, so test modules need not import conftest)."""
    return SimpleNamespace(hf_logits=hf_logits, max_diff_on_mask=max_diff_on_mask, two_prompts=two_prompts,
                           hf_position_ids=hf_position_ids, perturb_vectors=perturb_vectors, ATOL=ATOL)


# ------------------------------------------------------------------------------- circuits fixtures
# A word-level tokenizer over the synthetic vocabulary (so every synthetic answer is one known token), a tiny
# 3-layer GQA model on it with the toy chat layout, seeded synthetic samples and hand-made samples with
# multi-token answers of differing lengths (for full-answer scoring through the KV-cached continuation).

#: Extra words the hand-made multi-token samples use.
EXTRA_WORDS = "dark light very pale"


@pytest.fixture(scope="session")
def word_tokenizer() -> Any:
    from modality_circuits.toy.model import word_level_tokenizer

    return word_level_tokenizer(EXTRA_WORDS)


@pytest.fixture(scope="session")
def circuit_model(word_tokenizer: Any) -> HookedMLLM:
    """3 layers, 4 query heads sharing 2 KV heads, toy chat template (system prompt included)."""
    from modality_circuits.toy.model import TOY_TEMPLATE

    hf = tiny_llava(word_tokenizer, n_layers=3, n_heads=4, n_kv_heads=2, d_model=64, d_mlp=128, seed=3)
    perturb_vectors(hf, seed=3)
    return HookedMLLM.from_hf(hf, word_tokenizer, template=TOY_TEMPLATE)


@pytest.fixture(scope="session")
def syn_samples() -> list[Any]:
    """Six seeded synthetic conflict samples (alternating image-/text-following; prompt lengths differ)."""
    from modality_circuits.data.synthetic import synthetic

    return synthetic(6, seed=0)


def make_multi_token_samples() -> list[Any]:
    """Conflict samples whose answers have 1-3 word-level tokens (lengths differ within and across samples)."""
    from modality_circuits.data.sample import CONSTRAINTS, INSTRUCTIONS, Sample
    from modality_circuits.data.synthetic import Scene, render

    specs = [  # (answer_img, answer_text, follow, context sentence, constraint)
        ("dark red", "light blue", "image", "The shape in the image is light blue .", CONSTRAINTS[0]),
        ("green", "very dark yellow", "text", "The shape in the image is very dark yellow .", CONSTRAINTS[1]),
        ("very pale purple", "white", "image", "The shape in the image is white .", CONSTRAINTS[2]),
        ("light green", "red", "text", "The shape in the image is red .", CONSTRAINTS[0]),
    ]
    out = []
    for i, (a_img, a_txt, follow, ctx, cons) in enumerate(specs):
        img = render(Scene(color="red", shape="circle", count="one", position="left"))
        out.append(Sample(image=img, context=ctx, instruction=INSTRUCTIONS[follow],
                          question="What is the color of the shape?", constraint=cons, answer_img=a_img,
                          answer_text=a_txt, follow=follow, task="color", id=f"multi-{i}"))
    return out


@pytest.fixture(scope="session")
def multi_samples() -> list[Any]:
    return make_multi_token_samples()


# ------------------------------------------------------------------------------------------- habits
#: Test files that take the longest (training, notebooks, whole CLI runs): ``pytest -m "not slow"`` skips them.
SLOW_FILES = ("test_notebooks.py", "toy/test_train.py", "cli/test_cli.py", "cli/test_architectures.py")


def pytest_collection_modifyitems(config: Any, items: list) -> None:
    for item in items:
        path = str(item.path).replace(os.sep, "/")
        if any(path.endswith(f) for f in SLOW_FILES):
            item.add_marker(pytest.mark.slow)


def _models_in(value: Any) -> list[HookedMLLM]:
    if isinstance(value, HookedMLLM):
        return [value]
    if isinstance(value, (tuple, list)):
        return [m for v in value for m in _models_in(v)]
    return []


@pytest.fixture(autouse=True)
def no_hook_left_behind(request: pytest.FixtureRequest):
    """Every model a test used carries no hook afterwards (hooks are global state: only context managers attach
    them, and they must remove them, also when the test's code raised)."""
    yield
    for value in list(request.node.funcargs.values()):
        for model in _models_in(value):
            left = [name for name, hp in model.hook_dict.items()
                    if hp._forward_hooks or hp._backward_hooks or hp.fwd_hooks or hp.bwd_hooks]
            assert not left, f"hooks left behind on {left[:5]}"
