"""Scoring rules for long-context evaluation (pure Python + numpy).

Generation scoring (compare the model's continuation with :attr:`kvjax.eval.tasks.Example.answers`):

* :func:`score_contains_all` -- RULER's ``string_match_all`` (fraction of references found in the prediction).
* :func:`score_contains_any` -- RULER's ``string_match_part`` (1 if any reference is found).
* :func:`score_exact_first` -- passkey rule: the first number (or word) of the prediction equals a reference.
* :func:`score` dispatches on a metric name (``Example.meta["metric"]``).

Likelihood scoring (needs no generation, works for small models whose generations are noisy):

* :func:`answer_logprob` -- teacher-forced log-probability of the reference answer's tokens.
* :func:`kl_divergence` -- mean KL divergence between two models' next-token distributions (e.g. full cache vs
  compressed cache), from logits.
* :func:`perplexity` -- ``exp(nll_sum / n_tokens)``.

Aggregation: :func:`mean_and_ci` (mean with a 95 % Wilson interval for 0/1 accuracies, percentile bootstrap
otherwise).
"""
from __future__ import annotations

import math
import re
import statistics
from typing import Callable, NamedTuple, Sequence

import numpy as np

__all__ = [
    "score_contains_all",
    "score_contains_any",
    "score_exact_first",
    "score",
    "METRICS",
    "perplexity",
    "MeanCI",
    "mean_and_ci",
    "wilson_interval",
    "log_softmax",
    "answer_token_logprobs",
    "answer_logprob",
    "kl_divergence",
]


# ----------------------------------------------------------------------------------------------------------------------
# Generation scoring
# ----------------------------------------------------------------------------------------------------------------------
def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def score_contains_all(prediction: str, answers: Sequence[str]) -> float:
    """Fraction of ``answers`` that occur in ``prediction`` as substrings (case-insensitive, whitespace runs
    collapsed). This is RULER's ``string_match_all``: 1.0 only when every reference is present. ``answers`` empty ->
    ``ValueError``."""
    if not answers:
        raise ValueError("answers is empty")
    pred = _norm(prediction)
    return sum(1.0 for a in answers if _norm(a) in pred) / len(answers)


def score_contains_any(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if at least one of ``answers`` occurs in ``prediction`` (case-insensitive), else 0.0 (RULER's
    ``string_match_part`` for one example)."""
    if not answers:
        raise ValueError("answers is empty")
    pred = _norm(prediction)
    return 1.0 if any(_norm(a) in pred for a in answers) else 0.0


_NUMBER = re.compile(r"\d+")
_WORD = re.compile(r"[\w]+(?:[-'][\w]+)*")


def score_exact_first(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the first item of ``prediction`` equals one of ``answers``, else 0.0.

    The item is the first run of digits when the reference is a number (passkey: ``" 12345. Remember it"`` and
    ``" is 12345."`` both give ``"12345"``; ``"123456"`` does not match ``"12345"``), otherwise the first word
    (letters, digits, inner hyphens/apostrophes), compared case-insensitively. No item -> 0.0.
    """
    if not answers:
        raise ValueError("answers is empty")
    for ans in answers:
        a = ans.strip()
        if a.isdigit():
            m = _NUMBER.search(prediction)
            if m is not None and m.group(0) == a:
                return 1.0
        else:
            m = _WORD.search(prediction)
            if m is not None and m.group(0).lower() == a.lower():
                return 1.0
    return 0.0


#: Metric name (``Example.meta["metric"]``) -> scoring function ``(prediction, answers) -> float``.
METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "contains_all": score_contains_all,
    "contains_any": score_contains_any,
    "exact_first": score_exact_first,
}


def score(metric: str, prediction: str, answers: Sequence[str]) -> float:
    """Apply the scoring rule named ``metric`` (a key of :data:`METRICS`)."""
    try:
        fn = METRICS[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}") from None
    return fn(prediction, answers)


# ----------------------------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------------------------
def perplexity(nll_sum: float, n_tokens: int) -> float:
    """Perplexity ``exp(nll_sum / n_tokens)`` from a summed negative log-likelihood (natural log) over
    ``n_tokens`` predicted tokens. ``n_tokens <= 0`` -> ``ValueError``."""
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    return float(math.exp(float(nll_sum) / n_tokens))


class MeanCI(NamedTuple):
    """A mean with its confidence interval ``[low, high]`` over ``n`` values; ``method`` is ``"wilson"`` or
    ``"bootstrap"``."""

    mean: float
    low: float
    high: float
    n: int
    method: str


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``successes / n``:
    ``(p + z^2/2n -/+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)``."""
    if n <= 0:
        raise ValueError("n must be positive")
    z = _z(confidence)
    p = successes / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def mean_and_ci(values: Sequence[float], confidence: float = 0.95, method: str = "auto", n_boot: int = 10_000,
                seed: int = 0) -> MeanCI:
    """Mean of ``values`` with a ``confidence`` interval.

    ``method="wilson"``: Wilson score interval, for accuracies (values must be 0 or 1).
    ``method="bootstrap"``: percentile bootstrap with ``n_boot`` resamples from ``numpy.random.default_rng(seed)``
    (deterministic).
    ``method="auto"`` (default): Wilson when every value is 0 or 1, bootstrap otherwise.
    Empty ``values`` -> ``ValueError``; one value -> a degenerate bootstrap interval ``[v, v]`` (Wilson for a 0/1
    value).
    """
    arr = np.asarray(list(values), dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError("values is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError("values must be finite")
    n = int(arr.size)
    mean = float(arr.mean())
    binary = bool(np.all((arr == 0.0) | (arr == 1.0)))
    if method == "auto":
        method = "wilson" if binary else "bootstrap"
    if method == "wilson":
        if not binary:
            raise ValueError("the Wilson interval needs 0/1 values")
        lo, hi = wilson_interval(float(arr.sum()), n, confidence)
        return MeanCI(mean, lo, hi, n, "wilson")
    if method == "bootstrap":
        _z(confidence)  # validates
        rng = np.random.default_rng(seed)
        means = np.empty(n_boot, dtype=np.float64)
        chunk = max(1, 2_000_000 // n)
        for s in range(0, n_boot, chunk):
            e = min(n_boot, s + chunk)
            idx = rng.integers(0, n, size=(e - s, n))
            means[s:e] = arr[idx].mean(axis=1)
        alpha = (1.0 - confidence) / 2.0
        lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
        return MeanCI(mean, float(lo), float(hi), n, "bootstrap")
    raise ValueError(f"unknown method {method!r}; valid: 'auto', 'wilson', 'bootstrap'")


# ----------------------------------------------------------------------------------------------------------------------
# Likelihood scoring
# ----------------------------------------------------------------------------------------------------------------------
def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable ``log_softmax`` in float64 (the max is subtracted before ``exp``; ``-inf`` logits give
    ``-inf``)."""
    x = np.asarray(logits, dtype=np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    shifted = x - m
    with np.errstate(divide="ignore"):
        lse = np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))
    return shifted - lse


def answer_token_logprobs(logits: np.ndarray, answer_token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Per-token teacher-forced log-probabilities ``log p(answer_i | context, answer_<i)``.

    ``logits`` has shape ``[n_answer, vocab]``: row ``i`` is the model's output at the position *before* answer token
    ``i`` (i.e. the logits that predict it: with a prompt of length ``P`` and the answer appended, rows
    ``P-1 .. P+n_answer-2`` of the full logits). ``answer_token_ids`` has length ``n_answer``.
    """
    lg = np.asarray(logits)
    ids = np.asarray(answer_token_ids, dtype=np.int64).reshape(-1)
    if lg.ndim != 2:
        raise ValueError(f"logits must be [n_answer, vocab], got shape {lg.shape}")
    if lg.shape[0] != ids.shape[0]:
        raise ValueError(f"{lg.shape[0]} logit rows for {ids.shape[0]} answer tokens")
    if ids.size and (ids.min() < 0 or ids.max() >= lg.shape[1]):
        raise ValueError("answer token id out of the vocabulary range")
    lp = log_softmax(lg, axis=-1)
    return lp[np.arange(ids.shape[0]), ids]


def answer_logprob(logits: np.ndarray, answer_token_ids: Sequence[int] | np.ndarray,
                   reduction: str = "sum") -> float | np.ndarray:
    """Teacher-forced log-probability (natural log) of the true answer given the context.

    See :func:`answer_token_logprobs` for the layout of ``logits``. ``reduction``: ``"sum"`` (log-probability of the
    whole answer, the default), ``"mean"`` (per answer token) or ``"none"`` (the per-token array).
    """
    per_tok = answer_token_logprobs(logits, answer_token_ids)
    if reduction == "sum":
        return float(per_tok.sum())
    if reduction == "mean":
        if per_tok.size == 0:
            raise ValueError("no answer tokens")
        return float(per_tok.mean())
    if reduction == "none":
        return per_tok
    raise ValueError(f"unknown reduction {reduction!r}; valid: 'sum', 'mean', 'none'")


def kl_divergence(logits_p: np.ndarray, logits_q: np.ndarray, reduction: str = "mean") -> float | np.ndarray:
    """KL(P || Q) of the next-token distributions ``P = softmax(logits_p)`` (the reference, e.g. full cache) and
    ``Q = softmax(logits_q)`` (e.g. compressed cache), in nats, over the last axis, averaged over all other axes
    (positions, batch).

    Computed from log-softmax in float64: ``sum_v p_v (log p_v - log q_v)``; entries with ``p_v = 0`` contribute 0,
    entries with ``p_v > 0`` and ``q_v = 0`` give ``inf``. Tiny negative values from rounding are clipped to 0.
    ``reduction``: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per position array).
    """
    lp = np.asarray(logits_p)
    lq = np.asarray(logits_q)
    if lp.shape != lq.shape:
        raise ValueError(f"shape mismatch: {lp.shape} vs {lq.shape}")
    log_p = log_softmax(lp, axis=-1)
    log_q = log_softmax(lq, axis=-1)
    p = np.exp(log_p)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (log_p - log_q), 0.0)
    kl = np.maximum(terms.sum(axis=-1), 0.0)
    if reduction == "mean":
        return float(kl.mean())
    if reduction == "sum":
        return float(kl.sum())
    if reduction == "none":
        return kl
    raise ValueError(f"unknown reduction {reduction!r}; valid: 'mean', 'sum', 'none'")
