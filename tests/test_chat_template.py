"""The checkpoint's own chat template: the rendered prompt equals ``apply_chat_template`` of the same messages
(image placeholders included) for the templates of the official HF checkpoints of each architecture, the expected
strings written out by hand, and every token group is exact."""

from __future__ import annotations

import re

import pytest

from modality_circuits import HookedMLLM, Segment
from modality_circuits.chat_template import HFChatTemplate
from modality_circuits.errors import SpanError
from modality_circuits.testing import (
    DEFAULT_CORPUS,
    random_images,
    tiny_bpe_tokenizer,
    tiny_llava,
    tiny_qwen_tokenizer,
    tiny_qwen_vl,
)

#: llava-hf/llava-1.5-7b-hf (chat_template.json)
LLAVA_15_HF = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in "
    "message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")

#: Qwen/Qwen2-VL-7B-Instruct and Qwen/Qwen2.5-VL-7B-Instruct (the same template)
QWEN_VL = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == "
    "'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")

TEXTS = ["Text context: the shape is red.", "you must rely on the image.", "What is the color?"]
EXPECTED = {
    "llava": ("USER: <image>\nText context: the shape is red.\nyou must rely on the image.\n"
              "What is the color? ASSISTANT:"),
    "qwen2": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
              "<|vision_start|><|image_pad|><|vision_end|>Text context: the shape is red.\n"
              "you must rely on the image.\nWhat is the color?<|im_end|>\n<|im_start|>assistant\n"),
}
EXPECTED["qwen2.5"] = EXPECTED["qwen2"]


def _model(arch):
    if arch == "llava":
        tok = tiny_bpe_tokenizer()
        tok.chat_template = LLAVA_15_HF
        return HookedMLLM.from_hf(tiny_llava(tok), tok), tok
    from transformers import Qwen2VLImageProcessorPil

    tok = tiny_qwen_tokenizer(DEFAULT_CORPUS + " You are a helpful assistant.")
    tok.chat_template = QWEN_VL
    proc = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                    size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32})
    return HookedMLLM.from_hf(tiny_qwen_vl(tok, version=arch[4:]), tok, proc), tok


def _segments(image):
    return [Segment("image", image=image), *(Segment(n, t) for n, t in zip(("context", "instruction", "question"),
                                                                           TEXTS))]


@pytest.mark.parametrize("arch", ["llava", "qwen2", "qwen2.5"])
def test_rendered_prompt_equals_apply_chat_template(arch):
    model, tok = _model(arch)
    assert isinstance(model.template, HFChatTemplate)
    batch = model.prepare([_segments(random_images(1, 32)[0])])
    ph = model.image_encoder.image_token
    collapsed = re.sub(f"(?:{re.escape(ph)})+", ph, batch.texts[0])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\n".join(TEXTS)}]}]
    assert collapsed == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert collapsed == EXPECTED[arch]
    for name, text in zip(("context", "instruction", "question"), TEXTS):  # spans are exact
        ids = batch.tokens[0][batch.spans.mask(name)[0]].tolist()
        assert tok.decode(ids).strip() == text
    system = batch.spans.masks.get("system")
    if arch == "llava":  # the official LLaVA-1.5-hf template has no system prompt
        assert system is None or not system.any()
    else:
        assert tok.decode(batch.tokens[0][system[0]].tolist()) == "You are a helpful assistant."


def test_padded_batch_with_two_images_and_text_only_row():
    model, tok = _model("qwen2")
    ims = random_images(2, 32, seed=3)
    batch = model.prepare([[Segment("image", image=ims[0]), Segment("image", image=ims[1]),
                            Segment("question", "Which is red?")], [Segment("question", "What?")]])
    assert batch.image_counts == [2, 0] and (batch.attention_mask == 0).any()
    assert batch.texts[1] == tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "What?"}]}], tokenize=False, add_generation_prompt=True)


def test_template_that_ignores_typed_content_is_refused():
    tmpl = HFChatTemplate("{% for m in messages %}{{ m['content'] if m['content'] is string }}{% endfor %}A:",
                          "<image>")
    with pytest.raises(SpanError, match="does not render typed user content"):
        tmpl.render([Segment("question", "What?")])
