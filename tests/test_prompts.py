"""Prompts and spans without a model: segments -> tokens -> per-group position masks.

Uses :func:`build_batch` with the offline BPE tokenizer and a stub image encoder (each image gives
``N_IMG_TOK`` tokens), so these tests need no vision tower.
"""

from __future__ import annotations

import re

import pytest
import torch

from modality_circuits.errors import ImageTokenMismatchError, ModalityCircuitsError, SpanError
from modality_circuits.prompts import ChatTemplate, MLLMBatch, Segment, assign_tokens, build_batch, split_placeholders
from modality_circuits.spans import Spans, positions_to_mask

N_IMG_TOK = 5
IMAGE_TOKEN = "<image>"

LLAVA_LIKE = ChatTemplate(system="A chat between a curious human and an artificial intelligence assistant. ",
                          user_prefix="USER: ", sep="\n", image_sep="\n", assistant_prefix=" ASSISTANT:")
TEMPLATES = {
    "default": ChatTemplate(),
    "llava_like": LLAVA_LIKE,
    "bare": ChatTemplate(system="", user_prefix="", sep=" ", image_sep=" ", assistant_prefix=""),
}


def stub_encoder(images):
    """Image 'encoder' for build_batch: pixel tensors (image k filled with k) and N_IMG_TOK tokens each."""
    pv = torch.stack([torch.full((3, 4, 4), float(im)) for im in images])
    return {"pixel_values": pv}, [N_IMG_TOK] * len(images)


def img(k: int) -> Segment:
    return Segment("image", image=k)  # the stub encoder accepts any object; ints make slicing checkable


def build(segs_list, tokenizer, template=LLAVA_LIKE) -> MLLMBatch:
    return build_batch(segs_list, tokenizer, template, IMAGE_TOKEN, stub_encoder)


def no_ws(s: str) -> str:
    return re.sub(r"\s+", "", s)


PROMPTS = {
    "full": [img(0), Segment("context", "Text context: the shape in the image is a red circle."),
             Segment("instruction", "you must rely on the image content rather than the text context."),
             Segment("question", "What is the color of the shape?"),
             Segment("constraint", "Answer the question using a single word or phrase.")],
    "two_images": [img(0), img(1), Segment("question", "how many shape in the image?"),
                   Segment("constraint", "Answer with one word.")],
    "text_only": [Segment("context", "Text context: the shape is a blue square."),
                  Segment("question", "What is the shape?")],
    "short": [img(2), Segment("question", "What is the color?")],
}


def expected_text(segs, template, name):
    """Concatenated text of every rendered piece named ``name`` (template glue included)."""
    return "".join(s.text for s in template.render(segs) if s.name == name and not s.is_image)


def check_text_groups(batch: MLLMBatch, i: int, segs, template, tokenizer) -> None:
    ids = batch.tokens[i]
    for name in {s.name for s in template.render(segs) if not s.is_image}:
        want = expected_text(segs, template, name)
        if name not in batch.spans:  # whitespace-only glue merges into the next word's token
            assert no_ws(want) == "", name
            continue
        pos = batch.spans.positions(name, i)
        decoded = tokenizer.decode(ids[pos].tolist())
        assert no_ws(decoded) == no_ws(want), (name, decoded, want)
        if name not in ("template",):  # one contiguous piece of text: exact up to outer whitespace
            assert decoded.strip() == want.strip(), (name, decoded, want)
            assert (pos.diff() == 1).all(), f"group {name!r} is not contiguous: {pos.tolist()}"


# ---------------------------------------------------------------------------------------------- text groups
@pytest.mark.parametrize("template_name", sorted(TEMPLATES))
@pytest.mark.parametrize("prompt_name", sorted(PROMPTS))
def test_groups_decode_to_their_segment_text_single(tokenizer, template_name, prompt_name):
    template, segs = TEMPLATES[template_name], PROMPTS[prompt_name]
    batch = build([segs], tokenizer, template)
    assert batch.attention_mask.all()
    check_text_groups(batch, 0, segs, template, tokenizer)
    # every real token is in exactly one group (besides the derived 'image' union and 'last')
    base = [n for n in batch.spans.names if n not in ("image", "last")]
    cover = torch.stack([batch.spans.mask(n, allow_empty=True).long() for n in base]).sum(0)
    assert (cover == 1).all()
    # tokenization equals tokenizing the whole rendered text at once
    assert batch.tokens[0].tolist() == tokenizer(batch.texts[0])["input_ids"]


@pytest.mark.parametrize("template_name", sorted(TEMPLATES))
def test_groups_decode_to_their_segment_text_batched(tokenizer, template_name):
    template = TEMPLATES[template_name]
    seg_lists = [PROMPTS["short"], PROMPTS["full"], PROMPTS["text_only"], PROMPTS["two_images"]]
    batch = build(seg_lists, tokenizer, template)
    lengths = batch.attention_mask.sum(1)
    assert len(set(lengths.tolist())) > 1, "prompts must differ in length so the batch is padded"
    for i, segs in enumerate(seg_lists):
        check_text_groups(batch, i, segs, template, tokenizer)


def test_spans_shift_with_left_padding(tokenizer):
    seg_lists = [PROMPTS["short"], PROMPTS["full"]]
    batch = build(seg_lists, tokenizer)
    pad = int((batch.attention_mask[0] == 0).sum())
    assert pad > 0 and batch.attention_mask[0, :pad].eq(0).all() and batch.attention_mask[0, pad:].eq(1).all()
    assert batch.attention_mask[1].all()
    assert (batch.tokens[0, :pad] == tokenizer.pad_token_id).all()
    single = build([seg_lists[0]], tokenizer)
    assert torch.equal(batch.tokens[0, pad:], single.tokens[0])
    for name in single.spans.names:
        assert torch.equal(batch.spans.mask(name, allow_empty=True)[0, pad:], single.spans.mask(name)[0]), name
        assert not batch.spans.mask(name, allow_empty=True)[0, :pad].any(), f"{name} covers padding"
    # no group touches a padding position
    for name in batch.spans.names:
        assert not (batch.spans.mask(name, allow_empty=True) & ~batch.attention_mask.bool()).any(), name


# ---------------------------------------------------------------------------------------------- image groups
def test_image_groups_hold_exactly_the_image_tokens(tokenizer):
    seg_lists = [PROMPTS["two_images"], PROMPTS["text_only"], PROMPTS["full"]]
    batch = build(seg_lists, tokenizer)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    is_img = batch.tokens == image_id
    assert torch.equal(batch.spans.mask("image", allow_empty=True), is_img)
    assert batch.spans.counts()["image"] == [2 * N_IMG_TOK, 0, N_IMG_TOK]
    assert batch.spans.counts()["image.0"] == [N_IMG_TOK, 0, N_IMG_TOK]
    assert batch.spans.counts()["image.1"] == [N_IMG_TOK, 0, 0]
    p0, p1 = batch.spans.positions("image.0", 0), batch.spans.positions("image.1", 0)
    assert (p0.diff() == 1).all() and (p1.diff() == 1).all() and p0.max() < p1.min()
    assert batch.image_counts == [2, 0, 1]
    assert batch.model_inputs["pixel_values"].shape[0] == 3
    # the text-only prompt has no image: asking for the group without allow_empty names the sample
    with pytest.raises(SpanError, match=r"'image' is empty in sample\(s\) \[1\]"):
        batch.spans["image"]


def test_last_is_the_final_position(tokenizer):
    batch = build([PROMPTS["short"], PROMPTS["full"], PROMPTS["text_only"]], tokenizer)
    last = batch.spans["last"]
    assert last.sum(1).tolist() == [1, 1, 1]
    assert last[:, -1].all()
    assert (batch.spans.first_position("last") == batch.seq_len - 1).all()
    # the last real token is the end of the assistant prefix (template glue)
    assert batch.spans["template"][:, -1].all()


def test_bos_group(tokenizer):
    batch = build([PROMPTS["short"], PROMPTS["full"]], tokenizer)
    bos = batch.spans["bos"]
    assert bos.sum(1).tolist() == [1, 1]
    assert (batch.tokens[bos] == tokenizer.bos_token_id).all()
    first_real = batch.attention_mask.argmax(1)
    assert torch.equal(batch.spans.first_position("bos"), first_real)


# ------------------------------------------------------------------------------------------------ Spans API
def test_first_position_and_union(tokenizer):
    batch = build([PROMPTS["short"], PROMPTS["full"]], tokenizer)
    sp = batch.spans
    for i in range(2):
        assert int(sp.first_position("question")[i]) == int(sp.positions("question", i)[0])
    # empty group in sample 0 -> seq_len there
    assert sp.first_position("context").tolist()[0] == batch.seq_len
    union = sp.mask(["question", "constraint"], allow_empty=True)
    assert torch.equal(union, sp.mask("question") | sp.mask("constraint", allow_empty=True))
    assert torch.equal(sp.first_position(["context", "question"]),
                       torch.minimum(sp.first_position("context"), sp.first_position("question")))
    assert "question" in sp and "nope" not in sp
    assert sp.mask(["question", "constraint"]).any(1).all()  # non-empty union passes the check
    with pytest.raises(SpanError, match=r"'context\+constraint' is empty in sample\(s\) \[0\]"):
        sp.mask(["context", "constraint"])  # both are missing from sample 0


def test_select_and_repeat_keep_images_aligned(tokenizer):
    seg_lists = [PROMPTS["two_images"], PROMPTS["text_only"], PROMPTS["short"]]
    batch = build(seg_lists, tokenizer)
    pv = batch.model_inputs["pixel_values"][:, 0, 0, 0].tolist()
    assert pv == [0.0, 1.0, 2.0]
    sub = batch.select([2, 0])
    assert sub.image_counts == [1, 2]
    assert sub.model_inputs["pixel_values"][:, 0, 0, 0].tolist() == [2.0, 0.0, 1.0]
    assert torch.equal(sub.tokens, batch.tokens[[2, 0]])
    assert sub.seq_len == batch.seq_len
    assert sub.texts == [batch.texts[2], batch.texts[0]]
    for n in batch.spans.names:
        assert torch.equal(sub.spans.mask(n, allow_empty=True), batch.spans.mask(n, allow_empty=True)[[2, 0]])
    rep = batch.repeat(2)
    assert len(rep) == 6 and torch.equal(rep.tokens[3:], batch.tokens)
    assert rep.model_inputs["pixel_values"].shape[0] == 6
    assert rep.image_counts == batch.image_counts * 2


def test_with_group_and_concat(tokenizer):
    batch = build([PROMPTS["short"], PROMPTS["full"]], tokenizer)
    m = positions_to_mask([[3], [4, 5]], batch=2, seq_len=batch.seq_len)
    sp = batch.spans.with_group("mine", m)
    assert "mine" in sp and "mine" not in batch.spans
    assert sp.positions("mine", 1).tolist() == [4, 5]
    with pytest.raises(SpanError, match=r"expected \(2, "):
        batch.spans.with_group("bad", torch.zeros(3, batch.seq_len, dtype=torch.bool))
    cat = Spans.concat([batch.spans, batch.spans.select([0])])
    assert cat.batch_size == 3 and cat.seq_len == batch.seq_len
    assert torch.equal(cat["question"][2], batch.spans["question"][0])


def test_positions_to_mask():
    m = positions_to_mask([0, -1], batch=2, seq_len=4)
    assert m.tolist() == [[True, False, False, True]] * 2
    m = positions_to_mask([[1], [2, 3]], batch=2, seq_len=4)
    assert m.tolist() == [[False, True, False, False], [False, False, True, True]]
    assert not positions_to_mask([], batch=2, seq_len=3).any()
    with pytest.raises(SpanError, match="out of range"):
        positions_to_mask([4], batch=1, seq_len=4)
    with pytest.raises(SpanError, match="out of range"):
        positions_to_mask([-5], batch=1, seq_len=4)


# ----------------------------------------------------------------------------------------- prompt building
def test_template_render_records_glue():
    t = ChatTemplate(system="SYS ", user_prefix="USER: ", sep=" ", image_sep="\n", assistant_prefix=" ASSISTANT:")
    out = t.render([img(0), Segment("question", "Q?"), Segment("constraint", "C.")])
    assert [(s.name, s.text) for s in out] == [
        ("system", "SYS "), ("template", "USER: "), ("image", ""), ("template", "\n"), ("question", "Q?"),
        ("template", " "), ("constraint", "C."), ("template", " ASSISTANT:")]


def test_split_placeholders():
    segs = split_placeholders("<image> What is <image> this?", ["a", "b"])
    assert [(s.name, s.text, s.image) for s in segs] == [
        ("image", "", "a"), ("user", " What is ", None), ("image", "", "b"), ("user", " this?", None)]
    assert split_placeholders("plain", []) == [Segment("user", "plain")]
    with pytest.raises(ImageTokenMismatchError, match=r"1 '<image>' placeholder\(s\) but 0 image\(s\)"):
        split_placeholders("<image> hi", [])
    with pytest.raises(ImageTokenMismatchError, match=r"0 '<image>' placeholder\(s\) but 2 image\(s\)"):
        split_placeholders("hi", ["a", "b"])


def test_assign_tokens_gives_leading_space_tokens_to_the_word():
    import numpy as np

    text = "ab cd"
    labels = np.array([0, 0, 0, 1, 1])  # the space is piece 0's glue; "cd" is piece 1's word
    out = assign_tokens([(0, 0), (0, 2), (2, 5), (2, 3)], text, labels, 2)
    assert out == [-1, 0, 1, 0]  # BOS-like empty offsets -> -1; whitespace-only token -> majority of chars


# ------------------------------------------------------------------------------------------------- errors
def test_empty_segment_name(tokenizer):
    with pytest.raises(SpanError, match="Segment names must be non-empty strings"):
        build([[Segment("", "hello")]], tokenizer)
    with pytest.raises(SpanError, match="non-empty"):
        build([[Segment("  ", "hello")]], tokenizer)


def test_unknown_group_lists_available(tokenizer):
    batch = build([PROMPTS["short"]], tokenizer)
    with pytest.raises(SpanError, match=r"no token group 'answer'.*Available groups: \[.*'question'.*\]") as ei:
        batch.spans["answer"]
    for name in batch.spans.names:
        assert repr(name) in str(ei.value)
    with pytest.raises(SpanError, match="non-empty string"):
        batch.spans.mask("")


def test_empty_group(tokenizer):
    batch = build([PROMPTS["short"], [img(0), Segment("question", "")]], tokenizer)
    with pytest.raises(SpanError, match=r"Token group 'question' is empty in sample\(s\) \[1\]"):
        batch.spans["question"]
    assert batch.spans.mask("question", allow_empty=True)[1].sum() == 0
    assert batch.spans.positions("question", 1).numel() == 0


def test_text_segment_with_image_placeholder(tokenizer):
    with pytest.raises(ImageTokenMismatchError, match=r"Segment 'question' contains the image placeholder '<image>'"):
        build([[img(0), Segment("question", "What is <image> this?")]], tokenizer)


def test_slow_tokenizer_refused():
    class Slow:
        is_fast = False

    with pytest.raises(SpanError, match="fast tokenizer"):
        build_batch([[Segment("q", "x")]], Slow(), ChatTemplate(), IMAGE_TOKEN, stub_encoder)


def test_errors_are_value_errors():
    assert issubclass(SpanError, ModalityCircuitsError) and issubclass(SpanError, ValueError)
    assert issubclass(ImageTokenMismatchError, ValueError)
