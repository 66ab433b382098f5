"""Matching free-text generations against a sample's answers and their synonym lists.

The MC² benchmark accepts an answer plus a candidate list of synonyms (``answer_img_candidate_list`` …), many
of them Chinese. This module implements the matching used to score open-ended generations:

:func:`normalize_answer`
    NFKC, case-folding, apostrophes removed (``it's`` -> ``its``), other punctuation and symbols -> space,
    articles (``a``/``an``/``the``) dropped, number words -> digits (``two`` -> ``2``, ``twenty-one`` ->
    ``21``), whitespace collapsed. Both generations and candidates go through it.

:func:`matches` (the rule)
    After normalization, leading filler phrases (:data:`LEAD_INS`: ``answer is``, ``it is``, ``there are`` …;
    ``The answer is two.`` -> ``2``) are stripped, repeatedly. Then

    * an ASCII candidate matches when the generation *starts with* it as whole words: ``red`` matches
      ``Red.``, ``red car`` and ``The answer is red``, but not ``reddish``, ``not red`` or ``The car is red``;
    * a non-ASCII candidate (in practice the Chinese synonyms, which have no word boundaries) matches only when
      the whole stripped generation equals it: ``两个`` matches ``两个。`` but ``一`` does not match ``一对``.

    With ``anywhere=True`` an ASCII candidate may also occur later as a whole word/phrase, unless the word
    before it is a negation (:data:`NEGATIONS`): ``The giraffes are standing`` matches ``standing``;
    ``not blue`` never matches ``blue``. Non-ASCII candidates stay exact.

:func:`classify`
    ``"follow"`` / ``"competitor"`` / ``"other"`` from the sample's following and competitor candidates. If both
    sides match, the match that starts first wins; at the same start, the longer match (the more specific
    answer: ``red and white`` over ``red``) wins; a full tie (a synonym listed on both sides, which the
    benchmark has) is ``"other"``.

Limits (by design, to stay precise): no stemming or plural folding (``cats`` does not match ``cat`` unless the
candidate list says so), no spelling correction, and in the default mode an answer preceded by other words
(``The giraffes are standing``) is not found.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Literal

logger = logging.getLogger(__name__)

ARTICLES = frozenset({"a", "an", "the"})

#: Normalized filler phrases stripped from the start of a generation (longest first), repeatedly.
LEAD_INS: tuple[str, ...] = (
    "final answer is", "correct answer is", "answer is", "answer", "it is", "its", "they are", "there are",
    "there is", "theres", "this is", "that is", "i think", "i see", "probably", "likely",
)

#: Words that, directly before a candidate, stop it from matching in ``anywhere`` mode.
NEGATIONS = frozenset({"not", "no", "never", "nor", "neither", "isnt", "arent", "wasnt", "werent", "without"})

_UNITS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)}
_APOSTROPHES = re.compile("['\u2018\u2019\u02bc`]")

Outcome = Literal["follow", "competitor", "other"]


def _tokens(s: str) -> list[str]:
    s = unicodedata.normalize("NFKC", s).casefold()
    s = _APOSTROPHES.sub("", s)
    s = "".join(" " if unicodedata.category(ch)[0] in "PSZC" else ch for ch in s)
    words = [w for w in s.split() if w not in ARTICLES]
    out: list[str] = []
    i = 0
    while i < len(words):
        w = words[i]
        if w in _TENS:
            nxt = words[i + 1] if i + 1 < len(words) else ""
            if nxt in _UNITS and 0 < _UNITS[nxt] < 10:
                out.append(str(_TENS[w] + _UNITS[nxt]))
                i += 2
                continue
            out.append(str(_TENS[w]))
        elif w in _UNITS:
            out.append(str(_UNITS[w]))
        else:
            out.append(w)
        i += 1
    return out


def normalize_answer(s: str) -> str:
    """Normalized form of an answer or generation (see the module docstring); may be empty."""
    return " ".join(_tokens(s))


_LEAD_IN_TOKENS = sorted((tuple(p.split()) for p in LEAD_INS), key=len, reverse=True)


def _strip_lead_ins(tokens: list[str], lead_ins: Sequence[tuple[str, ...]] = _LEAD_IN_TOKENS) -> list[str]:
    changed = True
    while changed and tokens:
        changed = False
        for p in lead_ins:
            if len(tokens) > len(p) and tuple(tokens[:len(p)]) == p:
                tokens = tokens[len(p):]
                changed = True
                break
    return tokens


def _is_ascii(s: str) -> bool:
    return all(ord(ch) < 128 for ch in s)


def _find(gen: list[str], cand: str, anywhere: bool) -> int | None:
    """Token position where normalized candidate ``cand`` matches in stripped generation ``gen`` (or None)."""
    if not cand:
        return None
    if not _is_ascii(cand):
        return 0 if " ".join(gen) == cand else None
    c = cand.split()
    n = len(c)
    if gen[:n] == c:
        return 0
    if anywhere:
        for i in range(1, len(gen) - n + 1):
            if gen[i:i + n] == c and gen[i - 1] not in NEGATIONS:
                return i
    return None


def _best(gen: list[str], candidates: Iterable[str], anywhere: bool) -> tuple[int, int] | None:
    """(start, -length) of the earliest (then longest) matching candidate, or None."""
    best = None
    for raw in candidates:
        cand = normalize_answer(raw)
        pos = _find(gen, cand, anywhere)
        if pos is not None:
            key = (pos, -len(cand.split()) if _is_ascii(cand) else -len(gen))
            if best is None or key < best:
                best = key
    return best


def _prepare(generation: str) -> list[str]:
    return _strip_lead_ins(_tokens(generation))


def matches(generation: str, candidates: Sequence[str], *, anywhere: bool = False) -> bool:
    """Whether ``generation`` gives one of ``candidates`` (answer and synonyms), by the rule in the module docstring."""
    return _best(_prepare(generation), candidates, anywhere) is not None


def classify(generation: str, sample, *, anywhere: bool = False) -> Outcome:
    """``"follow"`` if the generation gives the instructed modality's answer, ``"competitor"`` if the other one's,
    else ``"other"``.

    Uses ``sample.following_candidates()`` / ``sample.competitor_candidates()``. When both match, the earlier
    match wins, then the longer one; a full tie is ``"other"``.
    """
    gen = _prepare(generation)
    f = _best(gen, sample.following_candidates(), anywhere)
    c = _best(gen, sample.competitor_candidates(), anywhere)
    if f is None and c is None:
        return "other"
    if c is None:
        return "follow"
    if f is None:
        return "competitor"
    if f == c:
        logger.debug("ambiguous generation %r for sample %s: both answers match equally", generation,
                     getattr(sample, "id", "?"))
        return "other"
    return "follow" if f < c else "competitor"
