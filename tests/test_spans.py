"""Random control groups: same size as the group they mimic, drawn from the other prompt text, seeded per sample."""

from __future__ import annotations

import pytest
import torch

from modality_circuits.errors import SpanError
from modality_circuits.spans import (
    RANDOM_POOL,
    Spans,
    parse_random_group,
    random_group_name,
    random_like,
    with_random_groups,
)


def _spans() -> Spans:
    """Two rows of 12 positions; row 1 is left-padded by 2 and has a shorter instruction."""
    def m(rows):
        t = torch.zeros(2, 12, dtype=torch.bool)
        for i, ps in enumerate(rows):
            t[i, ps] = True
        return t
    return Spans({"image": m([[0, 1], [2, 3]]), "context": m([[2, 3, 4], [4, 5]]),
                  "instruction": m([[5, 6, 7], [6, 7]]), "question": m([[8, 9], [8, 9]]),
                  "constraint": m([[10], [10]]), "last": m([[11], [11]])})


def test_names_round_trip() -> None:
    assert random_group_name("instruction", 3) == "random3~instruction"
    assert parse_random_group("random3~instruction") == (3, "instruction")
    assert parse_random_group("instruction") is None and parse_random_group("random~x") is None


def test_same_size_from_the_pool_outside_the_group_and_seeded_per_sample() -> None:
    sp = _spans()
    ids = ["a", "b"]
    r = random_like(sp, "instruction", ids, k=0, seed=1)
    inst = sp.mask("instruction")
    pool = sp.mask([g for g in RANDOM_POOL if g != "instruction" and g in sp])  # these spans have no system prompt
    assert r.sum(1).tolist() == inst.sum(1).tolist()  # same size per row
    assert not (r & inst).any() and not (r & ~pool).any()  # only other prompt text: never image, last, padding
    assert torch.equal(r, random_like(sp, "instruction", ids, k=0, seed=1))
    draws = {tuple(random_like(sp, "instruction", ids, k=k, seed=1)[0].nonzero().flatten().tolist())
             for k in range(8)}
    assert len(draws) > 1  # different sets differ
    # a sample's set does not depend on its batch: row "b" alone equals row "b" of the pair
    alone = random_like(sp.select([1]), "instruction", ["b"], k=0, seed=1)
    assert torch.equal(alone[0], r[1])


def test_with_random_groups_adds_only_what_is_named() -> None:
    sp = with_random_groups(_spans(), ["image", "random0~instruction", "random1~context", "last"], ["a", "b"])
    assert {"random0~instruction", "random1~context"} <= set(sp.names)
    assert sp.mask("random1~context").sum(1).tolist() == [3, 2]


def test_errors_name_the_problem() -> None:
    sp = _spans()
    with pytest.raises(SpanError, match="no group 'caption' to mimic"):
        random_like(sp, "caption", ["a", "b"])
    with pytest.raises(SpanError, match="one sample id per row"):
        random_like(sp, "instruction", ["a"])



def test_a_pool_smaller_than_the_group_gives_the_whole_pool_with_a_warning(caplog) -> None:
    sp = _spans()
    with caplog.at_level("WARNING", logger="modality_circuits.spans"):
        r = random_like(sp, "instruction", ["a", "b"], pool=("constraint",))
    assert torch.equal(r, sp.mask("constraint"))
    assert "smaller than the group in 2 sample(s)" in caplog.text and "a (1 of 3)" in caplog.text


def test_the_system_prompt_is_in_the_pool() -> None:
    """On short prompts the user turn alone is barely larger than the instruction; the system prompt widens the pool."""
    sp = _spans()
    system = torch.zeros(2, 14, dtype=torch.bool)
    system[:, :2] = True
    wide = Spans({name: torch.cat([torch.zeros(2, 2, dtype=torch.bool), sp.mask(name)], 1) for name in sp.names}
                 | {"system": system})
    drawn = torch.zeros(14, dtype=torch.bool)
    for k in range(20):
        drawn |= random_like(wide, "instruction", ["a", "b"], k=k)[0]
    assert drawn[:2].any() and not (drawn & wide.mask("instruction")[0]).any()
