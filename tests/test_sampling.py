"""Samplers against transformers' logits processors, and their invariants."""

from __future__ import annotations

import numpy as np
import pytest

from lfm_edge.errors import LfmEdgeError
from lfm_edge.sampling import (
    Sampler,
    SamplingParams,
    apply_repetition_penalty,
    min_p_filter,
    top_k_filter,
    top_p_filter,
)

rng = np.random.default_rng(0)
LOGITS = (rng.standard_normal(300) * 3).astype(np.float32)
HISTORY = [5, 17, 17, 250, 3]


def test_filters_match_transformers():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = torch.tensor(LOGITS)[None]
    ids = torch.tensor(HISTORY)[None]

    def same(ours: np.ndarray, theirs) -> None:
        theirs = theirs[0].numpy()
        assert np.array_equal(np.isinf(ours), np.isinf(theirs))
        finite = ~np.isinf(ours)
        np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-6)

    same(apply_repetition_penalty(LOGITS, HISTORY, 1.3), RepetitionPenaltyLogitsProcessor(1.3)(ids, scores.clone()))
    for k in (1, 5, 40):
        same(top_k_filter(LOGITS, k), TopKLogitsWarper(k)(ids, scores.clone()))
    for p in (0.1, 0.5, 0.9):
        same(top_p_filter(LOGITS, p), TopPLogitsWarper(p)(ids, scores.clone()))
    for m in (0.05, 0.15, 0.5):
        same(min_p_filter(LOGITS, m), MinPLogitsWarper(m)(ids, scores.clone()))


def test_repetition_penalty_direction():
    out = apply_repetition_penalty(np.array([2.0, -2.0, 1.0], np.float32), [0, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_filters_keep_what_they_should():
    assert np.isfinite(top_k_filter(LOGITS, 7)).sum() == 7
    kept = np.isfinite(top_p_filter(LOGITS, 0.5))
    assert kept[np.argmax(LOGITS)] and 1 <= kept.sum() < LOGITS.size
    probs = np.exp(LOGITS - LOGITS.max())
    kept = np.isfinite(min_p_filter(LOGITS, 0.2))
    assert np.array_equal(kept, probs >= 0.2 * probs.max())


def test_temperature_zero_is_greedy():
    s = Sampler(SamplingParams(temperature=0.0, top_k=5, top_p=0.3, min_p=0.5))
    assert s(LOGITS, []) == int(np.argmax(LOGITS))


def test_greedy_respects_the_repetition_penalty():
    logits = np.array([1.0, 0.9, -3.0], np.float32)
    s = Sampler(SamplingParams(temperature=0.0, repetition_penalty=1.5))
    assert s(logits, [0]) == 1


def test_seed_reproduces_and_distribution_is_right():
    params = SamplingParams(temperature=1.0, seed=123)
    a = [Sampler(params)(LOGITS, []) for _ in range(3)]
    s1, s2 = Sampler(params), Sampler(params)
    assert [s1(LOGITS, []) for _ in range(50)] == [s2(LOGITS, []) for _ in range(50)]
    assert len(set(a)) == 1
    # empirical frequencies follow softmax(logits / T)
    logits = np.array([0.0, 1.0, 2.0], np.float32)
    s = Sampler(SamplingParams(temperature=0.5, seed=7))
    counts = np.bincount([s(logits, []) for _ in range(4000)], minlength=3) / 4000
    expected = np.exp(logits / 0.5) / np.exp(logits / 0.5).sum()
    np.testing.assert_allclose(counts, expected, atol=0.03)


def test_top_k_one_always_picks_the_best():
    s = Sampler(SamplingParams(temperature=5.0, top_k=1, seed=1))
    assert {s(LOGITS, []) for _ in range(20)} == {int(np.argmax(LOGITS))}


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-0.1),
        dict(top_k=-1),
        dict(top_p=0.0),
        dict(min_p=1.5),
        dict(repetition_penalty=0),
        dict(temperature="hot"),
        dict(top_k=2.5),
        dict(seed=-3),
        dict(seed="x"),
        dict(temperature=True),
    ],
)
def test_bad_parameters(bad):
    with pytest.raises(LfmEdgeError):
        SamplingParams(**bad)
