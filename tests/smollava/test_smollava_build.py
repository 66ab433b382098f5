"""SmolLLaVA (the SmolLM2-135M-Instruct decoder + a new vision side) as a plain LLaVA checkpoint: HookedMLLM equals
HF on it (fp32, eager) on a padded batch with images, greedy generation included, and its prompt layout is the base's
ChatML with the default system prompt. Needs the converted base (``modality-circuits fetch-base``)."""

from __future__ import annotations

import pytest
import torch

from modality_circuits import HookedMLLM, Segment, base_lm
from modality_circuits.smollava.build import SMOL_SYSTEM, VisionSpec, build_smollava, save_smollava
from modality_circuits.testing import hf_parity, random_images

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    base = base_lm.base_path()
    if not base_lm.is_complete(base):
        pytest.skip(f"no converted base in {base} (run `modality-circuits fetch-base`)")
    vision = VisionSpec(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4)
    hf, tok, proc = build_smollava(base, vision, seed=0)
    out = save_smollava(hf, tok, proc, tmp_path_factory.mktemp("smollava"), vision)
    return hf, HookedMLLM.from_pretrained(out), out


def test_layout_is_the_base_chatml_with_its_system_prompt(smol):
    hf, model, _ = smol
    b = model.prepare([[Segment("image", image=random_images(1, 32)[0]), Segment("question", "What is it?")]])
    text = b.texts[0]
    assert text.startswith(f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("What is it?<|im_end|>\n<|im_start|>assistant\n")
    assert b.spans.counts()["image"] == [16] and b.spans.counts()["system"][0] > 5
    # text-only, the layout equals the base tokenizer's own template
    from transformers import AutoTokenizer

    base_tok = AutoTokenizer.from_pretrained(str(base_lm.base_path()))
    msgs = [{"role": "user", "content": "What is it?"}]
    assert model.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        base_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def test_logits_and_generation_equal_hf_on_a_padded_batch_with_images(smol):
    hf, model, _ = smol
    ims = random_images(3, 32, seed=4)
    batch = model.prepare([
        [Segment("image", image=ims[0]), Segment("context", "Text context: the ball is red."),
         Segment("question", "What colour is the ball? Answer with one word.")],
        [Segment("image", image=ims[1]), Segment("image", image=ims[2]), Segment("question", "Same?")],
        [Segment("question", "Hi")],  # text-only, heavily padded
    ])
    assert (batch.attention_mask == 0).any()
    r = hf_parity(hf, model, batch)
    # every text position (all a metric or generation reads) within 2e-4; measured 8.5e-5. At the image positions
    # of the two-image row fp32 noise through 30 layers reaches 6.7e-4 (logits up to 44: 1.5e-5 relative), the
    # one-image rows stay at 8.5e-5 there too.
    assert r["text"] < 2e-4
    assert r["image"] < 1e-3
    assert r["ours"] == r["theirs"]
