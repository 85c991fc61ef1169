import numpy as np
import pytest

from serving.classify.scorers import SCORERS, get_scorer
from serving.contracts.threshold import (
    ALL_NAN_THRESHOLD,
    should_escalate,
    threshold_for_agreement,
    threshold_for_rate,
)

RNG = np.random.default_rng(0)


def random_probs(n: int = 200, k: int = 5) -> np.ndarray:
    logits = RNG.normal(scale=3.0, size=(n, k))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_scores_lie_in_unit_interval(name):
    scores = get_scorer(name)(random_probs())
    assert scores.shape == (200,)
    assert np.all((scores >= 0) & (scores <= 1))


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_uniform_is_least_confident_and_one_hot_most(name):
    probs = random_probs()
    scorer = get_scorer(name)
    uniform = scorer(np.full((1, 5), 0.2))[0]
    one_hot = scorer(np.eye(5)[:1])[0]
    assert np.all(scorer(probs) >= uniform - 1e-9)
    assert np.all(scorer(probs) <= one_hot + 1e-9)
    assert one_hot == pytest.approx(1.0)


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_invariant_to_a_shift_of_the_logits(name):
    logits = RNG.normal(size=(50, 5))

    def softmax(x):
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    scorer = get_scorer(name)
    np.testing.assert_allclose(scorer(softmax(logits)), scorer(softmax(logits + 7.5)), atol=1e-9)


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_invariant_to_label_order(name):
    probs = random_probs(20)
    scorer = get_scorer(name)
    np.testing.assert_allclose(scorer(probs), scorer(probs[:, ::-1]), atol=1e-12)


def test_unknown_scorer_lists_known_ones():
    with pytest.raises(ValueError, match="known scorers: margin, max_prob, neg_entropy"):
        get_scorer("vibes")


def test_escalate_strictly_below_threshold():
    assert should_escalate(np.array([0.49, 0.5, 0.51]), 0.5).tolist() == [True, False, False]


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_rate_threshold_escalates_at_most_the_target(rate):
    scores = RNG.uniform(size=1000)
    threshold = threshold_for_rate(scores, rate)
    realised = should_escalate(scores, threshold).mean()
    assert realised <= rate + 1e-9
    assert realised >= rate - 0.002  # distinct scores: the budget is used


def test_rate_threshold_keeps_ties_together():
    scores = [0.1, 0.5, 0.5, 0.5, 0.9]
    assert threshold_for_rate(scores, 0.4) == 0.5  # escalating one 0.5 would split a tie
    assert should_escalate(np.array(scores), 0.5).sum() == 1


def test_agreement_threshold_is_the_smallest_reaching_the_target():
    confidences = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    agrees = [False, False, True, False, True, True, True, True, True, True]
    # escalating the 4 lowest fixes every disagreement: 100 %; the 2 lowest give 90 %
    assert threshold_for_agreement(confidences, agrees, 1.0) == 0.5
    assert threshold_for_agreement(confidences, agrees, 0.9) == 0.3
    assert threshold_for_agreement(confidences, agrees, 0.7) == 0.1  # no escalation needed


def test_agreement_target_met_on_random_data():
    confidences = RNG.uniform(size=2000)
    agrees = RNG.uniform(size=2000) < confidences  # confident inputs agree more often
    for target in (0.8, 0.9, 0.95, 0.99):
        t = threshold_for_agreement(confidences, agrees, target)
        escalate = confidences < t
        assert (escalate | agrees).mean() >= target - 1e-9


def test_thresholds_reject_bad_targets():
    with pytest.raises(ValueError, match="target_rate must lie in"):
        threshold_for_rate([0.5], 1.5)
    with pytest.raises(ValueError, match="empty"):
        threshold_for_rate([], 0.5)
    with pytest.raises(ValueError, match="equal length"):
        threshold_for_agreement([0.1, 0.2], [True], 0.9)


def test_escalate_nan_confidence():
    confidence = np.array([np.nan, 0.2, 0.9, np.nan])
    assert should_escalate(confidence, 0.5).tolist() == [True, True, False, True]
    assert should_escalate(confidence, 0.0).tolist() == [True, False, False, True]


def tied_calibration(seed: int, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Confidences on a coarse grid (many ties) and agreement rising with confidence."""
    rng = np.random.default_rng(seed)
    confidences = np.round(rng.uniform(size=n), 2)
    agrees = rng.uniform(size=n) < confidences
    return confidences, agrees


@pytest.mark.parametrize("seed", range(8))
def test_unit_weights_give_the_unweighted_thresholds(seed):
    confidences, agrees = tied_calibration(seed)
    ones = np.ones(confidences.size)
    for rate in (0.0, 0.05, 0.13, 0.5, 0.77, 1.0):
        assert threshold_for_rate(confidences, rate, ones) == threshold_for_rate(confidences, rate)
    for target in (0.0, 0.6, 0.8, 0.9, 0.95, 0.99, 1.0):
        assert threshold_for_agreement(confidences, agrees, target, ones) == (
            threshold_for_agreement(confidences, agrees, target)
        )


@pytest.mark.parametrize("seed", range(8))
def test_an_integer_weight_counts_as_that_many_copies(seed):
    confidences, agrees = tied_calibration(seed, n=150)
    weights = np.random.default_rng(100 + seed).integers(1, 6, size=confidences.size)
    copies, copied_agrees = np.repeat(confidences, weights), np.repeat(agrees, weights)
    for rate in (0.0, 0.05, 0.13, 0.5, 0.77, 1.0):
        assert threshold_for_rate(confidences, rate, weights) == threshold_for_rate(copies, rate)
    for target in (0.0, 0.6, 0.8, 0.9, 0.95, 0.99, 1.0):
        assert threshold_for_agreement(confidences, agrees, target, weights) == (
            threshold_for_agreement(copies, copied_agrees, target)
        )


def test_weights_move_the_threshold():
    """A heavy confident input (a sampled one standing for 1/f inputs) counts for more."""
    confidences = [0.1, 0.2, 0.3, 0.9]
    assert threshold_for_rate(confidences, 0.5) == 0.3  # two of four escalate
    assert threshold_for_rate(confidences, 0.5, [1, 1, 1, 10]) == 0.9  # 3 of 13 escalate
    agrees = [True, True, True, False]
    assert threshold_for_agreement(confidences, agrees, 0.75) == 0.1
    # the disagreeing input weighs 10 of 13: only escalating everything reaches 75 %
    assert threshold_for_agreement(confidences, agrees, 0.75, [1, 1, 1, 10]) > 0.9


@pytest.mark.parametrize(
    "weights",
    [[1.0, 0.0, 1.0], [1.0, -2.0, 1.0], [1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, np.nan, 1.0]],
    ids=["zero", "negative", "too-short", "too-long", "nan"],
)
def test_invalid_weights_raise(weights):
    confidences, agrees = [0.2, 0.5, 0.8], [True, False, True]
    with pytest.raises(ValueError, match="weights"):
        threshold_for_rate(confidences, 0.3, weights)
    with pytest.raises(ValueError, match="weights"):
        threshold_for_agreement(confidences, agrees, 0.9, weights)


def test_nan_confidences_escalate_first_in_the_agreement_threshold():
    """A NaN confidence escalates at any threshold, so its disagreement costs nothing."""
    confidences = [0.3, 0.6, 0.9, np.nan]
    agrees = [True, True, True, False]
    assert threshold_for_agreement(confidences, agrees, 1.0) == 0.3  # only the NaN escalates
    # a disagreeing finite input still needs its own escalation, the NaN comes with it
    assert threshold_for_agreement([np.nan, 0.2, 0.5], [True, False, True], 1.0) == 0.5


def test_nan_confidences_count_against_the_rate_budget():
    confidences = [np.nan, 0.1, np.nan, 0.2, 0.3]
    assert threshold_for_rate(confidences, 0.8) == 0.3  # the NaNs, 0.1 and 0.2
    assert threshold_for_rate(confidences, 0.6) == 0.2  # the NaNs and 0.1
    assert threshold_for_rate(confidences, 0.4) == 0.1  # the NaNs: exactly the budget
    # the NaNs alone exceed the budget: nothing but them escalates
    assert threshold_for_rate(confidences, 0.2) == 0.1
    assert threshold_for_rate(confidences, 0.0) == 0.1
    assert threshold_for_rate(confidences, 1.0) == np.nextafter(0.3, 1.0)


def test_all_nan_calibration_escalates_everything_with_a_finite_threshold():
    confidences = np.full(4, np.nan)
    thresholds = [threshold_for_rate(confidences, r) for r in (0.0, 0.5, 1.0)] + [
        threshold_for_agreement(confidences, [True, False, True, True], t) for t in (0.0, 1.0)
    ]
    for threshold in thresholds:
        assert threshold == ALL_NAN_THRESHOLD
        assert np.isfinite(threshold) and threshold > 1.0  # any scorer's confidence escalates
        assert should_escalate(np.array([0.0, 1.0, np.nan]), threshold).all()


def nan_calibration(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tied confidences, a seed-dependent share of them NaN, weights as a log's."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 120))
    confidences = np.round(rng.uniform(size=n), 1)
    confidences[rng.uniform(size=n) < (0.05, 0.3, 0.8, 1.0)[seed % 4]] = np.nan
    agrees = rng.uniform(size=n) < 0.5 + 0.5 * np.nan_to_num(confidences)
    return confidences, agrees, rng.choice([1.0, 5.0], size=n)


def candidate_thresholds(confidences: np.ndarray) -> np.ndarray:
    """Every distinct escalation a threshold can make, each at its lowest threshold."""
    finite = np.unique(confidences[~np.isnan(confidences)])
    if finite.size == 0:
        return np.array([ALL_NAN_THRESHOLD])
    return np.append(finite, np.nextafter(finite[-1], np.inf))


@pytest.mark.parametrize("seed", range(16))
def test_thresholds_with_nan_match_a_search_through_should_escalate(seed):
    """The thresholds are what a brute-force search finds when escalation is judged by the
    serving rule itself (NaN escalates), and never NaN."""
    confidences, agrees, weights = nan_calibration(seed)
    candidates = candidate_thresholds(confidences)
    escalated = np.array([(weights * should_escalate(confidences, t)).sum() for t in candidates])
    agreeing = np.array(
        [(weights * (should_escalate(confidences, t) | agrees)).sum() for t in candidates]
    )
    total = weights.sum()
    for rate in (0.0, 0.1, 0.3, 0.6, 0.9, 1.0):
        within = np.flatnonzero(escalated <= rate * total * (1 + 1e-12))
        expected = candidates[within[-1]] if within.size else candidates[0]
        assert threshold_for_rate(confidences, rate, weights) == expected, rate
    for target in (0.0, 0.5, 0.8, 0.9, 0.97, 1.0):
        expected = candidates[np.flatnonzero(agreeing >= (target - 1e-9) * total)[0]]
        assert threshold_for_agreement(confidences, agrees, target, weights) == expected, target
