import numpy as np
import pytest

from serving.generate.draft_rule import (
    DEFAULT_BREAK_EVEN,
    SKIP_ALL,
    break_even_share,
    draft_cut,
    use_draft,
)


def test_break_even_from_measured_times():
    issue = [(0.0, 2.77), (0.5, 1.61), (1.0, 0.96)]  # the issue's prototype, plain 2.10 s
    assert break_even_share(issue, 2.10) == pytest.approx(0.289, abs=1e-3)
    here = [(0.0, 1.06), (0.5, 0.71), (1.0, 0.31)]  # this module's, relative to plain
    assert break_even_share(here, 1.0) == pytest.approx(0.086, abs=1e-3)
    assert 0 < break_even_share(here, 1.0) <= DEFAULT_BREAK_EVEN < 0.2
    assert break_even_share(issue, 3.0) == 0.0  # even a rejected draft is cheaper
    assert break_even_share(issue, 0.5) == 1.0  # even a whole draft is dearer
    with pytest.raises(ValueError, match="cost falls"):
        break_even_share([(0.0, 1.0), (1.0, 2.0)], 1.5)


@pytest.mark.parametrize("seed", range(5))
def test_the_cut_finds_where_the_expected_share_crosses_break_even(seed):
    """E[share | c] = c (a 20-token draft accepting Binomial(20, c) tokens): the best cut
    is the break-even share itself."""
    rng = np.random.default_rng(seed)
    c = rng.uniform(size=4000)
    share = rng.binomial(20, c) / 20
    for b in (0.3, 0.6):
        assert draft_cut(c, share, b) == pytest.approx(b, abs=0.05)


@pytest.mark.parametrize("seed", range(5))
def test_a_nonlinear_relation(seed):
    """E[share | c] = c**3 crosses 0.3 at c = 0.3 ** (1/3) = 0.669."""
    rng = np.random.default_rng(seed)
    c = rng.uniform(size=4000)
    share = rng.binomial(20, c**3) / 20
    assert draft_cut(c, share, 0.3) == pytest.approx(0.3 ** (1 / 3), abs=0.05)


def test_every_draft_pays_or_none_does():
    c = np.linspace(0.1, 0.9, 9)
    assert draft_cut(c, np.ones(9)) == pytest.approx(0.1)  # the lowest calibrated confidence
    assert draft_cut(c, np.zeros(9)) == SKIP_ALL
    assert not use_draft(1.0, SKIP_ALL)


def test_ties_stay_on_one_side_and_nan_is_skipped():
    c = np.array([0.5, 0.5, 0.5, 0.8, np.nan])
    share = np.array([1.0, 1.0, 0.0, 1.0, 1.0])
    assert draft_cut(c, share, 0.5) == 0.5  # the tied three keep 2 of 3: they pay
    assert draft_cut([np.nan, np.nan], [1.0, 1.0]) == SKIP_ALL
    assert use_draft(np.array([0.4, 0.5, np.nan]), 0.5).tolist() == [False, True, False]
    assert use_draft(0.5, 0.5) is True


def test_weights_count_as_repeated_records():
    c = np.array([0.2, 0.4, 0.6, 0.8])
    share = np.array([0.0, 0.5, 0.1, 1.0])
    w = np.array([1.0, 3.0, 2.0, 1.0])
    repeated = np.repeat(np.arange(4), [1, 3, 2, 1])
    assert draft_cut(c, share, 0.3, w) == draft_cut(c[repeated], share[repeated], 0.3)
    assert draft_cut(c, share, 0.3, w) != draft_cut(c, share, 0.3)


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="one accepted share"):
        draft_cut([0.1, 0.2], [0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        draft_cut([0.1], [1.5])
    with pytest.raises(ValueError, match="break_even"):
        draft_cut([0.1], [0.5], break_even=2.0)
    with pytest.raises(ValueError, match="weights"):
        draft_cut([0.1], [0.5], weights=[0.0])
