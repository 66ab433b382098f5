"""Measurements of modality following: answer log-probabilities, the binary following score, MFR.

For a sample with following answer ``f`` (the instructed modality's) and competitor ``c`` (the other one):

* ``logp(a) = Σ_t log P(a_t | prompt, a_<t)`` — the full answer's log-probability as a continuation of the
  prompt (``first_token=True``: only ``log P(a_1 | prompt)``).
* **binary-constrained following probability** ``p_bin = P(f) / (P(f) + P(c)) = σ(logp(f) − logp(c))`` — the
  probability renormalised over only the two answers.
* unconstrained ``P(f)``, ``P(c)`` and ``leak = 1 − P(f) − P(c)`` (mass outside the two answers; for
  ``first_token=True`` this is the mass on all other first tokens).
* the **knockout/intervention effect** ``Δ = (p_bin_after − p_bin_before) / p_bin_before`` (signed, relative;
  ×100 for percent), as in the paper's knockout figures.
* **MFR** (modality-following ratio): the share of samples with ``logp(f) > logp(c)`` (closed form), or whose
  greedy generation matches the following answer's candidates (open form, :func:`mfr_open`).

Full-answer scoring runs the prompt once (KV cache) and only the answer continuations for both answers, so
hooks active around the call see the prompt pass as ``[batch, …]`` and the continuation as ``[k*batch, …]``
with positions beyond the prompt (interventions built from spans align to this; see
:func:`modality_circuits.interventions.core.align_mask`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

from ._types import Float
from .errors import AnswerError, InterventionError, NumericalError
from .models.shared_kv import SharedPrefixKV, prompt_cache
from .prompts import MLLMBatch

if TYPE_CHECKING:
    from .models.hooked_mllm import HookedMLLM

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- answers
def tokenize_answer(tokenizer: Any, answer: str, where: str = "") -> list[int]:
    """Token ids of an answer as it would follow the prompt. Raises :class:`AnswerError` if unusable."""
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if not str(answer).strip() or not ids:
        raise AnswerError(f"Answer {answer!r}{where} tokenizes to nothing; give a non-empty answer.")
    unk = tokenizer.unk_token_id
    if unk is not None and unk in ids:
        raise AnswerError(f"Answer {answer!r}{where} contains tokens unknown to the tokenizer "
                          f"({tokenizer.convert_ids_to_tokens(ids)}); use words the model's vocabulary has.")
    return ids


def _repeat_cache(cache: TransformerLensKeyValueCache, k: int) -> TransformerLensKeyValueCache:
    """``k`` copies of every row (row-block-major); shared-prefix entries keep one copy of their prefix."""
    entries = [e.repeat_rows(k) if isinstance(e, SharedPrefixKV) else
               TransformerLensKeyValueCacheEntry(e.past_keys.repeat(k, 1, 1, 1), e.past_values.repeat(k, 1, 1, 1))
               for e in cache.entries]
    return TransformerLensKeyValueCache(entries, cache.previous_attention_mask.repeat(k, 1))


def _clean_continuation(model: HookedMLLM, cache: Any, cont: Tensor, msk: Tensor, K: int, start: int,
                        ctx: dict[str, Any]) -> Float[Tensor, "rows answer_pos d_model"]:
    """The answer continuations' residual entering layer ``start``, computed once per prompt and answer.

    ``cache`` comes from a suffix pass over ``cache.copies`` config-major copies of the batch that changes nothing
    below layer ``start``: there every copy's keys and values are the clean run's, so the continuation tokens (rows
    ``k·C·B0 + c·B0 + i``) have the same residual for every copy ``c``. Returns the rows of copy 0, answer-major.
    """
    rows = cont.shape[0] // K
    b0 = rows // cache.copies
    sel = torch.tensor([k * rows + i for k in range(K) for i in range(b0)], device=cont.device)
    own = torch.arange(b0, device=cont.device)
    entries = [e.select_rows(own).repeat_rows(K) for e in cache.entries[:start]]
    base = TransformerLensKeyValueCache(entries, cache.previous_attention_mask[:b0].repeat(K, 1))
    return model(cont[sel], attention_mask=msk[sel], past_kv_cache=base, stop_at_layer=start, **ctx)


PromptPass = Callable[[], tuple[Tensor, Any]]


def answer_logprobs(model: HookedMLLM, batch: MLLMBatch, answers: Sequence[Sequence[str]], first_token: bool = False,
                    prompt_pass: PromptPass | None = None, with_first: bool = False
                    ) -> Float[Tensor, "batch k"] | tuple[Float[Tensor, "batch k"], Float[Tensor, "batch k"]]:
    """Log-probability of each of ``k`` answers per prompt (full answer, or first token only).

    Args:
        answers: ``answers[i]`` is the list of ``k`` candidate answers of prompt ``i`` (same ``k`` for all).
        prompt_pass: advanced: a callable returning ``(logits of the prompt's last positions, KV cache holding
            all prompt positions)``; the default runs ``model(batch)`` with a fresh cache. Sweeps use it to
            recompute only a suffix of the prompt from cached prefix keys/values.
        with_first: also return the first tokens' log-probabilities: ``(full [batch, k], first [batch, k])``.
    """
    B = len(answers)
    if prompt_pass is None and len(answers) != len(batch):
        raise AnswerError(f"Got answers for {len(answers)} prompts, the batch has {len(batch)}.")
    K = len(answers[0])
    ids = [[tokenize_answer(model.tokenizer, a, f" (prompt {i})") for a in row] for i, row in enumerate(answers)]
    dev = model.cfg.device
    with torch.no_grad():
        single = first_token or all(len(x) == 1 for row in ids for x in row)
        if prompt_pass is None:
            def prompt_pass() -> tuple[Tensor, Any]:
                if single:
                    return model(batch), None
                shared = prompt_cache(model, batch)  # continuations read the prompt's keys without copying them
                if shared is not None:
                    return shared
                c = TransformerLensKeyValueCache.init_cache(model.cfg, dev, B)
                return model(batch, past_kv_cache=c), c
        logits, cache = prompt_pass()
        lp0 = logits[:, -1].float().log_softmax(-1)  # [batch, vocab]
        first = torch.tensor([[x[0] for x in row] for row in ids], device=lp0.device)
        out = lp0.gather(1, first)  # [batch, k]
        if single:
            return (out, out) if with_first else out
        A = max(len(x) for row in ids for x in row)
        cont = torch.zeros(K * B, A - 1, dtype=torch.long, device=dev)  # config-major: row k*B + i
        tgt = torch.zeros_like(cont)
        msk = torch.zeros_like(cont)
        for k in range(K):
            for i in range(B):
                x = ids[i][k]
                n = len(x) - 1
                if n > 0:
                    cont[k * B + i, :n] = torch.tensor(x[:-1])
                    tgt[k * B + i, :n] = torch.tensor(x[1:])
                    msk[k * B + i, :n] = 1
        ctx = model.prompt_context(batch, deepstack=False)
        start, copies = getattr(cache, "start_layer", 0), getattr(cache, "copies", 1)
        if start > 0 and copies > 1:  # layers below the configurations' first: the same for every copy
            x = _clean_continuation(model, cache, cont, msk, K, start, ctx)  # [K·B/copies, A-1, d_model]
            x = x.view(K, 1, B // copies, *x.shape[1:]).expand(K, copies, B // copies, *x.shape[1:])
            logits = model(x.reshape(K * B, *x.shape[3:]), start_at_layer=start, attention_mask=msk,
                           past_kv_cache=_repeat_cache(cache, K), tokens=cont, **ctx)
        else:
            logits = model(cont, attention_mask=msk, past_kv_cache=_repeat_cache(cache, K), **ctx)  # text continuations
        lp = logits.float().log_softmax(-1).gather(2, tgt[..., None])[..., 0] * msk
        full = out + lp.sum(1).view(K, B).T
    return (full, out) if with_first else full


# ------------------------------------------------------------------------------------- following score
@dataclass
class FollowingScores:
    """Per-sample following measurements (tensors of shape ``[batch]``)."""

    logp_follow: Tensor
    logp_comp: Tensor

    @property
    def logit_diff(self) -> Tensor:
        """``logp(f) − logp(c)``."""
        return self.logp_follow - self.logp_comp

    @property
    def p_binary(self) -> Tensor:
        """``P(f) / (P(f) + P(c))``."""
        return torch.sigmoid(self.logit_diff)

    @property
    def p_follow(self) -> Tensor:
        return self.logp_follow.exp()

    @property
    def p_comp(self) -> Tensor:
        return self.logp_comp.exp()

    @property
    def leak(self) -> Tensor:
        """Probability mass outside the two answers."""
        return 1 - self.p_follow - self.p_comp

    @property
    def followed(self) -> Tensor:
        return self.logp_follow > self.logp_comp

    @staticmethod
    def cat(parts: Sequence[FollowingScores]) -> FollowingScores:
        return FollowingScores(torch.cat([p.logp_follow for p in parts]), torch.cat([p.logp_comp for p in parts]))

    def to_frame(self, samples: Sequence[Any] | None = None) -> pd.DataFrame:
        """Tidy table, one row per sample."""
        df = pd.DataFrame({"logp_follow": self.logp_follow.cpu().numpy(), "logp_comp": self.logp_comp.cpu().numpy(),
                           "p_binary": self.p_binary.cpu().numpy(), "p_follow": self.p_follow.cpu().numpy(),
                           "p_comp": self.p_comp.cpu().numpy(), "followed": self.followed.cpu().numpy()})
        if samples is not None:
            df.insert(0, "sample_id", [s.id for s in samples])
            df.insert(1, "follow", [s.follow for s in samples])
            df.insert(2, "task", [s.task for s in samples])
            df.insert(3, "kind", [s.kind for s in samples])
        return df


def following_scores(model: HookedMLLM, batch: MLLMBatch, first_token: bool = False,
                     prompt_pass: PromptPass | None = None, repeats: int = 1) -> FollowingScores:
    """Binary-constrained following scores of a batch built from samples (``model.prepare(samples)``).

    ``prompt_pass``/``repeats`` (advanced): score a custom prompt pass over ``repeats`` config-major copies of
    the batch (see :func:`answer_logprobs`).
    """
    lp = AnswerMetric(first_token=first_token).logprobs(model, batch, prompt_pass, repeats)
    return FollowingScores(lp[:, 0], lp[:, 1])


def relative_change(before: Tensor, after: Tensor) -> Tensor:
    """Signed relative change ``(after − before) / before`` (the paper's knockout measure; ×100 for %)."""
    return (after - before) / before.clamp_min(1e-12)


# ------------------------------------------------------------------------------------------ the Metric protocol
@runtime_checkable
class Metric(Protocol):
    """What every sweep, the engine and patching consume: a per-row measurement of a (possibly intervened) run.

    ``metric(model, batch, prompt_pass=None, copies=1, clean_logits=None) -> Float[Tensor, "copies batch"]``
    scores ``copies`` config-major copies of ``batch``; ``prompt_pass`` (from the engine) runs the prompt, else
    ``model(batch)`` runs. ``reads_last_only``: only the last prompt position's logits (and answer
    continuations) are read, so the engine may skip the final block's other positions. ``needs_cache(model,
    batch)``: answer continuations need the prompt's KV cache.
    """

    name: str
    reads_last_only: bool

    def needs_cache(self, model: HookedMLLM, batch: MLLMBatch) -> bool: ...

    def __call__(self, model: HookedMLLM, batch: MLLMBatch, prompt_pass: PromptPass | None = None, copies: int = 1,
                 clean_logits: Tensor | None = None) -> Tensor: ...


ANSWER_KINDS = ("p_binary", "p_follow", "logit_diff", "logprobs")


@dataclass(frozen=True)
class AnswerMetric:
    """A measurement of the two answers' log-probabilities ``logp(f)``, ``logp(c)`` (full answers, or first tokens).

    ``kind``: ``"p_binary"`` (``σ(logp f − logp c)``, the binary-constrained following probability),
    ``"p_follow"`` (the unconstrained ``P(f)``), ``"logit_diff"`` (``logp f − logp c``) or ``"logprobs"`` (all of
    ``[logp f, logp c, first-token logp f, first-token logp c]``, a trailing axis of 4). ``answers``: one
    ``(f, c)`` pair per sample; None takes the samples' following and competitor answers.
    """

    kind: str = "p_binary"
    first_token: bool = False
    answers: tuple[tuple[str, str], ...] | None = None
    reads_last_only: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ANSWER_KINDS:
            raise InterventionError(f"Unknown answer metric kind {self.kind!r}; choose from {ANSWER_KINDS}.")
        if self.answers is not None:
            object.__setattr__(self, "answers", tuple(tuple(a) for a in self.answers))

    @property
    def name(self) -> str:
        return self.kind + ("_first" if self.first_token else "")

    def pairs(self, batch: MLLMBatch) -> list[list[str]]:
        if self.answers is not None:
            if len(self.answers) != len(batch):
                raise AnswerError(f"The metric has answers for {len(self.answers)} prompts, the batch {len(batch)}.")
            return [list(a) for a in self.answers]
        if batch.samples is None:
            raise AnswerError("The batch carries no samples (answers); build it with model.prepare(samples) or give "
                              "the metric answers=[(following, competitor), …].")
        for i, s in enumerate(batch.samples):
            s.check_answers(i)
        return [[s.following_answer, s.competitor_answer] for s in batch.samples]

    def needs_cache(self, model: HookedMLLM, batch: MLLMBatch) -> bool:
        if self.first_token:
            return False
        return any(len(tokenize_answer(model.tokenizer, a)) > 1 for row in self.pairs(batch) for a in row)

    def logprobs(self, model: HookedMLLM, batch: MLLMBatch, prompt_pass: PromptPass | None = None,
                 copies: int = 1, with_first: bool = False) -> Float[Tensor, "rows k"]:
        """``[copies·batch, 2]`` log-probabilities of (f, c), config-major (``with_first``: ``[rows, 4]`` with the
        first tokens' appended)."""
        lp = answer_logprobs(model, batch, self.pairs(batch) * copies, first_token=self.first_token,
                             prompt_pass=prompt_pass, with_first=with_first)
        if with_first:
            lp = torch.cat(lp, 1)
        if not torch.isfinite(lp).all():
            raise NumericalError("Answer log-probabilities contain NaN/inf; check hooks (e.g. fully masked attention "
                                 "rows) and use float32.")
        return lp

    def __call__(self, model: HookedMLLM, batch: MLLMBatch, prompt_pass: PromptPass | None = None, copies: int = 1,
                 clean_logits: Tensor | None = None) -> Float[Tensor, "copies batch *rest"]:
        lp = self.logprobs(model, batch, prompt_pass, copies, with_first=self.kind == "logprobs")
        if self.kind == "logprobs":
            return lp.view(copies, len(batch), 4)
        if self.kind == "p_follow":
            v = lp[:, 0].exp()
        else:
            v = lp[:, 0] - lp[:, 1]
            v = torch.sigmoid(v) if self.kind == "p_binary" else v
        return v.view(copies, len(batch))


@dataclass(frozen=True)
class LogitsMetric:
    """Any callable on full-length logits, TransformerLens style: ``fn(logits [batch, pos, vocab])`` returns a
    value per row ``[batch]`` or one scalar for the batch (given to every row)."""

    fn: Callable[[Tensor], Tensor | float]
    reads_last_only: bool = False

    @property
    def name(self) -> str:
        return getattr(self.fn, "__name__", "custom")

    def needs_cache(self, model: HookedMLLM, batch: MLLMBatch) -> bool:
        return False

    def __call__(self, model: HookedMLLM, batch: MLLMBatch, prompt_pass: PromptPass | None = None, copies: int = 1,
                 clean_logits: Tensor | None = None) -> Float[Tensor, "copies batch *rest"]:
        B = len(batch)
        logits = prompt_pass()[0] if prompt_pass is not None else model(batch)
        skipped = batch.seq_len - logits.shape[1]  # positions the engine did not recompute (clean prefix)
        if skipped:
            if clean_logits is None:
                raise InterventionError("A logits metric needs the clean run's logits of the skipped prefix; record "
                                        "the clean run with keep_logits=True.")
            logits = torch.cat([clean_logits[:, :skipped].repeat(copies, 1, 1).to(logits.dtype), logits], 1)
        out = []
        for j in range(copies):
            v = self.fn(logits[j * B:(j + 1) * B])
            v = torch.as_tensor(v, dtype=torch.float32).detach().flatten().cpu()
            out.append(v.expand(B) if v.numel() == 1 else v)
        return torch.stack(out)


#: Named metrics (``as_metric("p_binary")`` …); the engine, sweeps and patching accept any of these names.
METRICS: dict[str, AnswerMetric] = {
    "p_binary": AnswerMetric("p_binary"), "p_follow": AnswerMetric("p_follow"),
    "logit_diff": AnswerMetric("logit_diff"), "p_binary_first": AnswerMetric("p_binary", first_token=True),
    "p_follow_first": AnswerMetric("p_follow", first_token=True),
    "logit_diff_first": AnswerMetric("logit_diff", first_token=True),
}
MetricLike = str | Metric | Callable[[Tensor], Tensor | float]


def as_metric(metric: MetricLike, first_token: bool | None = None,
              answers: Sequence[tuple[str, str]] | None = None) -> Metric:
    """A metric name, a :class:`Metric`, or a callable on logits -> a :class:`Metric` (``first_token`` and
    ``answers`` override a named answer metric's)."""
    if isinstance(metric, str):
        if metric not in METRICS:
            raise InterventionError(f"Unknown metric {metric!r}; use one of {sorted(METRICS)}, a Metric, or a "
                                    "callable f(logits [batch, pos, vocab]) -> [batch] or scalar.")
        m = METRICS[metric]
    elif hasattr(metric, "reads_last_only") and hasattr(metric, "needs_cache"):  # a Metric (protocol)
        m = metric
    elif callable(metric):
        return LogitsMetric(metric)
    else:
        raise InterventionError(f"A metric is a name, a Metric or a callable; got {metric!r}.")
    if isinstance(m, AnswerMetric):
        if first_token is not None and first_token != m.first_token:
            m = AnswerMetric(m.kind, first_token, m.answers)
        if answers is not None:
            m = AnswerMetric(m.kind, m.first_token, tuple(tuple(a) for a in answers))
    return m


# ------------------------------------------------------------------------------------------------- MFR
def iter_batches(model: HookedMLLM, samples: Sequence[Any], batch_size: int = 32, desc: str | None = None,
                 progress: bool = True) -> Iterator[tuple[list[Any], MLLMBatch]]:
    """Yield ``(samples_chunk, batch)`` over a dataset, with a progress bar."""
    chunks = [list(samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)]
    for chunk in tqdm(chunks, desc=desc, disable=not progress or len(chunks) < 2, leave=False):
        yield chunk, model.prepare(chunk)


def score_dataset(model: HookedMLLM, samples: Sequence[Any], batch_size: int = 32, first_token: bool = False,
                  progress: bool = True) -> FollowingScores:
    """Following scores for a whole dataset (batched)."""
    parts = [following_scores(model, b, first_token) for _, b in
             iter_batches(model, samples, batch_size, desc="scoring", progress=progress)]
    return FollowingScores.cat(parts)


def mfr(model: HookedMLLM, samples: Sequence[Any], batch_size: int = 32, first_token: bool = False,
        progress: bool = True) -> dict[str, float]:
    """Closed-form MFR: share of samples whose following answer out-scores the competitor.

    Returns ``{"mfr", "competitor", "other", "n"}`` (``other`` is 0 in closed form: one of the two always wins).
    """
    s = score_dataset(model, samples, batch_size, first_token, progress)
    f = float(s.followed.float().mean()) if len(samples) else float("nan")
    return {"mfr": f, "competitor": 1 - f, "other": 0.0, "n": len(samples)}


def generations(model: HookedMLLM, samples: Sequence[Any], batch_size: int = 16, max_new_tokens: int = 8,
                progress: bool = True) -> pd.DataFrame:
    """Greedy generations classified against the answers' candidate lists (``follow``/``competitor``/``other``).

    One row per sample: ``sample_id, condition, task, generation, outcome``.
    """
    from .data.matching import classify

    rows = []
    for chunk, batch in iter_batches(model, samples, batch_size, desc="generating", progress=progress):
        texts = model.generate(batch, max_new_tokens=max_new_tokens, return_type="str")
        for s, t in zip(chunk, texts):
            rows.append({"sample_id": s.id, "condition": s.follow, "task": s.task, "generation": t.strip(),
                         "outcome": classify(t, s)})
    return pd.DataFrame(rows)


def mfr_open(model: HookedMLLM, samples: Sequence[Any], batch_size: int = 16, max_new_tokens: int = 8,
             progress: bool = True) -> dict[str, float]:
    """Open-form MFR: share of greedy generations matching the instructed modality's answer (or a synonym).

    Returns ``{"mfr", "competitor", "other", "n"}`` (shares of follow / competitor / neither).
    """
    df = generations(model, samples, batch_size, max_new_tokens, progress)
    n = len(df)
    share = {k: float((df["outcome"] == k).mean()) if n else float("nan") for k in ("follow", "competitor", "other")}
    return {"mfr": share["follow"], "competitor": share["competitor"], "other": share["other"], "n": n}
