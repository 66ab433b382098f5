"""Prompt variants: segments reordered or inserted, token groups still exact on a padded batch."""

from __future__ import annotations

import pytest
import torch

from modality_circuits.data.synthetic import synthetic
from modality_circuits.data.variants import FILLER, VARIANTS, PromptVariant, apply_variant
from modality_circuits.errors import DataFormatError

ORDERS = {
    "original": ["image", "context", "instruction", "question", "constraint"],
    "instruction_after_question": ["image", "context", "question", "instruction", "constraint"],
    "swap_instruction_constraint": ["image", "context", "constraint", "question", "instruction"],
    "filler_after_instruction": ["image", "context", "instruction", "filler", "question", "constraint"],
}


def _samples():
    return synthetic(4, seed=9, distractors=1)  # contexts of different lengths: a left-padded batch


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_segment_order(name: str) -> None:
    for s in apply_variant(_samples(), name):
        assert [seg.name for seg in s.segments()] == ORDERS[name]
        assert s.variant is VARIANTS[name]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_spans_exact_on_a_padded_batch(circuit_model, name: str) -> None:
    """Every group holds exactly its segment's tokens, whatever the layout; groups appear in the variant's order."""
    samples = _samples()
    base = circuit_model.prepare(samples)
    b = circuit_model.prepare(apply_variant(samples, name))
    assert (b.attention_mask == 0).any()  # really padded
    tok = circuit_model.tokenizer
    for g in ("context", "instruction", "question", "constraint"):
        assert b.spans.mask(g).sum(1).tolist() == base.spans.mask(g).sum(1).tolist()  # moved, not changed
        for i in range(len(samples)):
            assert torch.equal(b.tokens[i][b.spans.mask(g)[i]], base.tokens[i][base.spans.mask(g)[i]])
    for i in range(len(samples)):
        firsts = [int(b.spans.mask(g)[i].nonzero()[0]) for g in ORDERS[name]]
        assert firsts == sorted(firsts)
    if name == "filler_after_instruction":
        want = len(tok(FILLER, add_special_tokens=False)["input_ids"])
        assert set(b.spans.mask("filler").sum(1).tolist()) == {want}
    assert b.spans.mask("last").sum(1).tolist() == [1] * len(samples)


def test_bad_variants_are_refused() -> None:
    with pytest.raises(DataFormatError, match="named twice"):
        PromptVariant("x", order=("question", "question"))
    with pytest.raises(DataFormatError, match="needs a name and text"):
        PromptVariant("x", inserts=(("instruction", "filler", ""),))
    with pytest.raises(DataFormatError, match="Unknown prompt variant 'nope'"):
        apply_variant(_samples(), "nope")
    probe = apply_variant(synthetic(1, kind="text_probe"), "filler_after_instruction")[0]  # no instruction
    with pytest.raises(DataFormatError, match="no segment 'instruction' to insert 'filler' after"):
        probe.segments()
    dup = PromptVariant("dup", inserts=(("question", "context", "more text"),))
    with pytest.raises(DataFormatError, match="already has a segment 'context'"):
        apply_variant(_samples(), dup)[0].segments()
