"""The checkpoint's own chat template as a prompt layout, with exact spans.

:class:`HFChatTemplate` renders a prompt's segments through the checkpoint's Jinja ``chat_template`` (the one
``tokenizer.apply_chat_template`` uses) as one user message with typed content (``{"type": "image"}`` per image
segment, one ``{"type": "text"}`` item per run of text segments joined by ``sep``) and
``add_generation_prompt=True``. Each text segment is wrapped in private-use sentinel characters before rendering;
the rendered string is then split back at the sentinels and at the template's image placeholders, so every
character is known to come from a segment, an image, or the template's glue (``template`` group). The template's
default system prompt (what it inserts when no system message is given, found by rendering once with a system
message) is the ``system`` group. The result, with the sentinels removed, equals ``apply_chat_template`` of the
same messages; a template that drops, reorders or rewrites a segment is refused.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from .errors import SpanError

_OPEN, _CLOSE = "\ue000", "\ue001"
_SEG = re.compile(f"{_OPEN}(\\d+){_OPEN}(.*?){_CLOSE}", re.S)


def _mark(k: int, text: str) -> str:
    return f"{_OPEN}{k}{_OPEN}{text}{_CLOSE}"


@dataclass(frozen=True)
class HFChatTemplate:
    """A Jinja chat template as a prompt layout (same ``render`` interface as :class:`~.prompts.ChatTemplate`).

    Attributes:
        template: the Jinja source (``tokenizer.chat_template``).
        image_placeholder: the string the template emits for one image (``"<image>"``, ``"<|image_pad|>"``).
        sep: joins consecutive text segments inside the user message.
        special_tokens: ``bos_token`` … passed to the template as HF does.
    """

    template: str
    image_placeholder: str
    sep: str = "\n"
    special_tokens: dict[str, str] = field(default_factory=dict)

    def _render(self, messages: list[dict]) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        out, _ = render_jinja_template(conversations=[messages], chat_template=self.template,
                                       add_generation_prompt=True, **self.special_tokens)
        return out[0]

    def messages(self, segments: Sequence[Any], marked: bool = False) -> list[dict]:
        """The user message of ``segments`` (``marked``: text wrapped in sentinels)."""
        content: list[dict] = []
        run: list[str] = []

        def flush() -> None:
            if run:
                content.append({"type": "text", "text": self.sep.join(run)})
                run.clear()

        for k, seg in enumerate(segments):
            if seg.is_image:
                flush()
                content.append({"type": "image"})
            else:
                run.append(_mark(k, seg.text) if marked else seg.text)
        flush()
        return [{"role": "user", "content": content}]

    def default_system(self) -> tuple[str, str, str] | None:
        """``(before, system text, after)`` of the template's default system prompt, or None if it has none."""
        return _default_system(self.template, tuple(sorted(self.special_tokens.items())))

    def _probe_system(self) -> tuple[str, str, str] | None:
        user = [{"role": "user", "content": [{"type": "text", "text": _mark(0, "")}]}]
        try:
            plain = self._render(user)
            with_sys = self._render([{"role": "system", "content": _mark(1, "")}] + user)
        except Exception:  # a template without system messages
            return None
        if _mark(1, "") not in with_sys or _mark(0, "") not in plain:
            return None
        before, rest = with_sys.split(_mark(1, ""), 1)
        after = rest.split(_mark(0, ""), 1)[0]
        prefix = plain.split(_mark(0, ""), 1)[0]
        if len(prefix) > len(before) + len(after) and prefix.startswith(before) and prefix.endswith(after):
            return before, prefix[len(before):len(prefix) - len(after)], after
        return None

    def render(self, segments: Sequence[Any]) -> list[Any]:
        """Segments including the template's glue, in order (image segments stand for their placeholder)."""
        from .prompts import Segment

        text = self._render(self.messages(segments, marked=True))
        images = [s for s in segments if s.is_image]
        out: list[Any] = []
        sysinfo = self.default_system()
        seen: list[int] = []
        pos = 0
        for m in _SEG.finditer(text):
            out.extend(self._glue(text[pos:m.start()], images, out))
            k = int(m.group(1))
            if m.group(2) != segments[k].text:
                raise SpanError(f"The chat template rewrote segment {segments[k].name!r} ({segments[k].text!r} -> "
                                f"{m.group(2)!r}); its spans would not be exact. Use a prompt_template.json layout.")
            seen.append(k)
            out.append(segments[k])
            pos = m.end()
        out.extend(self._glue(text[pos:], images, out))
        want = [k for k, s in enumerate(segments) if not s.is_image]
        if seen != want or images:
            raise SpanError(f"The chat template rendered text segments {seen} of {want} and left {len(images)} "
                            "image(s) without a placeholder; it does not render typed user content in order. Use a "
                            "prompt_template.json layout for this checkpoint.")
        if sysinfo and out and out[0].name == "template" and out[0].text.startswith(sysinfo[0] + sysinfo[1]):
            head = out.pop(0).text
            before, system = sysinfo[0], sysinfo[1]
            pieces = [("template", before), ("system", system), ("template", head[len(before + system):])]
            out[:0] = [Segment(n, t) for n, t in pieces if t]
        return out

    def _glue(self, text: str, images: list[Any], out: list[Any]) -> list[Any]:
        """Template text between segments, with each image placeholder replaced by the next image segment."""
        from .prompts import Segment

        pieces: list[Any] = []
        parts = text.split(self.image_placeholder)
        for i, part in enumerate(parts):
            if part:
                pieces.append(Segment("template", part))
            if i < len(parts) - 1:
                if not images:
                    raise SpanError(f"The chat template emitted more {self.image_placeholder!r} placeholders than the "
                                    "prompt has images.")
                pieces.append(images.pop(0))
        return pieces

    def text(self, segments: Sequence[Any]) -> str:
        """The prompt as ``apply_chat_template`` renders it (image placeholders not expanded)."""
        return self._render(self.messages(segments))


@lru_cache(maxsize=32)
def _default_system(template: str, specials: tuple[tuple[str, str], ...]) -> tuple[str, str, str] | None:
    """Cached per template: it is rendered twice to find its default system prompt."""
    return HFChatTemplate(template, "", special_tokens=dict(specials))._probe_system()


def checkpoint_template(tokenizer: Any, image_placeholder: str, sep: str) -> HFChatTemplate | None:
    """The tokenizer's chat template as a layout, or None when it has none."""
    tmpl = getattr(tokenizer, "chat_template", None)
    if not isinstance(tmpl, str) or not tmpl.strip():
        return None
    specials = {k: v for k, v in getattr(tokenizer, "special_tokens_map", {}).items() if isinstance(v, str)}
    return HFChatTemplate(tmpl, image_placeholder, sep, specials)
