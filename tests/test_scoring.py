"""Scoring rules of kvjax.eval.scoring on hand-worked cases."""
from __future__ import annotations

import math

import numpy as np
import pytest

from kvjax.eval import scoring as S


# ---------------------------------------------------------------------------------------------------------------------
# String matching
# ---------------------------------------------------------------------------------------------------------------------
def test_contains_all_fraction_and_case():
    pred = "The special magic numbers are 123 and 456."
    assert S.score_contains_all(pred, ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert S.score_contains_all(pred, ["123", "456"]) == 1.0
    assert S.score_contains_all("no numbers", ["123"]) == 0.0
    assert S.score_contains_all("They are GLEAMING-Tiger and  Owl", ["gleaming-tiger", "and owl"]) == 1.0
    with pytest.raises(ValueError):
        S.score_contains_all("x", [])


def test_contains_any():
    assert S.score_contains_any("it is 42", ["41", "42"]) == 1.0
    assert S.score_contains_any("it is 43", ["41", "42"]) == 0.0


def test_exact_first_numbers():
    assert S.score_exact_first(" 12345. Remember it. 12345 is the pass key.", ["12345"]) == 1.0
    assert S.score_exact_first(" is 12345.", ["12345"]) == 1.0  # first number, not first word
    assert S.score_exact_first(" 123456", ["12345"]) == 0.0  # whole number must match
    assert S.score_exact_first(" 54321 or 12345", ["12345"]) == 0.0  # only the first number counts
    assert S.score_exact_first(" I don't know", ["12345"]) == 0.0
    assert S.score_exact_first("", ["12345"]) == 0.0


def test_exact_first_words():
    assert S.score_exact_first(" Paris, of course.", ["paris"]) == 1.0
    assert S.score_exact_first(" London or Paris", ["Paris"]) == 0.0
    assert S.score_exact_first(" gleaming-tiger!", ["gleaming-tiger"]) == 1.0
    assert S.score_exact_first(" Rome", ["Paris", "Rome"]) == 1.0  # any acceptable answer


def test_score_dispatch():
    assert S.score("contains_all", "a 1 2", ["1", "2"]) == 1.0
    assert S.score("exact_first", "7 8", ["7"]) == 1.0
    with pytest.raises(ValueError, match="valid"):
        S.score("bleu", "a", ["a"])


# ---------------------------------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------------------------------
def test_perplexity():
    assert S.perplexity(10 * math.log(20.0), 10) == pytest.approx(20.0)
    assert S.perplexity(0.0, 5) == 1.0
    with pytest.raises(ValueError):
        S.perplexity(1.0, 0)


def test_wilson_hand_cases():
    # 2 successes of 4: the textbook Wilson 95 % interval is (0.150, 0.850).
    r = S.mean_and_ci([1, 0, 1, 0])
    assert r.method == "wilson" and r.n == 4
    assert r.mean == 0.5
    assert r.low == pytest.approx(0.1500, abs=1e-4)
    assert r.high == pytest.approx(0.8500, abs=1e-4)
    # 10 of 10: lower bound 0.7225, upper 1.
    r = S.mean_and_ci([1.0] * 10)
    assert r.low == pytest.approx(0.7225, abs=1e-4)
    assert r.high == pytest.approx(1.0)
    # 0 of 10 mirrors it.
    r = S.mean_and_ci([0] * 10)
    assert r.low == pytest.approx(0.0) and r.high == pytest.approx(1 - 0.7225, abs=1e-4)
    with pytest.raises(ValueError):
        S.mean_and_ci([0.5, 1.0], method="wilson")


def test_bootstrap():
    vals = [1.0, 2.0, 3.0, 4.0, 5.0]
    a = S.mean_and_ci(vals, n_boot=2000, seed=1)
    b = S.mean_and_ci(vals, n_boot=2000, seed=1)
    assert a == b  # deterministic for a seed
    assert a.method == "bootstrap" and a.mean == 3.0
    assert 1.0 <= a.low < 3.0 < a.high <= 5.0
    c = S.mean_and_ci([2.5] * 7)
    assert (c.mean, c.low, c.high) == (2.5, 2.5, 2.5)
    wide = S.mean_and_ci(vals, confidence=0.99, n_boot=2000, seed=1)
    assert wide.low <= a.low and wide.high >= a.high
    with pytest.raises(ValueError):
        S.mean_and_ci([])
    with pytest.raises(ValueError):
        S.mean_and_ci([1.0, float("nan")])


# ---------------------------------------------------------------------------------------------------------------------
# Likelihood scoring
# ---------------------------------------------------------------------------------------------------------------------
def test_answer_logprob_uniform_and_hand_case():
    logits = np.zeros((2, 4))
    assert S.answer_logprob(logits, [1, 3]) == pytest.approx(2 * math.log(0.25))
    assert S.answer_logprob(logits, [1, 3], reduction="mean") == pytest.approx(math.log(0.25))
    # p = softmax([0, log 3]) = [1/4, 3/4]
    logits = np.array([[0.0, math.log(3.0)], [math.log(3.0), 0.0]])
    per_tok = S.answer_logprob(logits, [1, 1], reduction="none")
    np.testing.assert_allclose(per_tok, [math.log(0.75), math.log(0.25)])
    assert S.answer_logprob(logits, [1, 1]) == pytest.approx(math.log(0.75 * 0.25))


def test_answer_logprob_is_stable_for_large_logits():
    logits = np.array([[1000.0, 1000.0 + math.log(3.0)]], dtype=np.float32)
    assert S.answer_logprob(logits, [1]) == pytest.approx(math.log(0.75), abs=1e-4)
    logits = np.array([[-1e4, 0.0, -1e4]])
    assert S.answer_logprob(logits, [1]) == pytest.approx(0.0)
    assert math.isfinite(S.answer_logprob(logits, [0]))


def test_answer_logprob_validates_shapes():
    with pytest.raises(ValueError):
        S.answer_logprob(np.zeros((2, 4)), [1])
    with pytest.raises(ValueError):
        S.answer_logprob(np.zeros((1, 4)), [4])
    with pytest.raises(ValueError):
        S.answer_logprob(np.zeros(4), [1])


def test_kl_divergence_hand_case():
    p = np.zeros((1, 2))  # [1/2, 1/2]
    q = np.array([[0.0, math.log(3.0)]])  # [1/4, 3/4]
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # = 0.5 ln(4/3)
    assert S.kl_divergence(p, q) == pytest.approx(expected)
    assert S.kl_divergence(p, p) == pytest.approx(0.0, abs=1e-12)
    # averaged over positions: one identical position and one differing position
    pp = np.concatenate([p, p])
    qq = np.concatenate([p, q])
    assert S.kl_divergence(pp, qq) == pytest.approx(expected / 2)
    np.testing.assert_allclose(S.kl_divergence(pp, qq, reduction="none"), [0.0, expected], atol=1e-12)
    # shift invariance / stability with huge logits, over a batch axis too
    assert S.kl_divergence(p + 1e4, q - 1e4) == pytest.approx(expected)
    big = np.broadcast_to(p, (3, 5, 2))
    assert S.kl_divergence(big, np.broadcast_to(q, (3, 5, 2))) == pytest.approx(expected)


def test_kl_divergence_zero_probabilities():
    # p puts no mass on token 1 -> that term is 0 even though q's log prob there is -inf
    p = np.array([[0.0, -np.inf]])
    q = np.array([[0.0, -np.inf]])
    assert S.kl_divergence(p, q) == 0.0
    # q puts no mass where p has mass -> infinite divergence
    assert S.kl_divergence(np.zeros((1, 2)), q) == math.inf
    with pytest.raises(ValueError):
        S.kl_divergence(np.zeros((1, 2)), np.zeros((1, 3)))


def test_kl_random_matches_direct_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 11)), rng.normal(size=(6, 11))
    pa = np.exp(a) / np.exp(a).sum(-1, keepdims=True)
    pb = np.exp(b) / np.exp(b).sum(-1, keepdims=True)
    direct = (pa * np.log(pa / pb)).sum(-1).mean()
    assert S.kl_divergence(a, b) == pytest.approx(direct, rel=1e-10)
    assert S.kl_divergence(a, b) > 0
