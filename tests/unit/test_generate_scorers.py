import math

import numpy as np
import pytest
from pydantic import BaseModel, ValidationError

from serving.contracts.threshold import should_escalate
from serving.generate.scorers import SCORERS, ScorerName, get_scorer

RNG = np.random.default_rng(0)


def random_answers(n: int = 50) -> list[np.ndarray]:
    return [np.log(RNG.uniform(1e-4, 1.0, size=RNG.integers(1, 30))) for _ in range(n)]


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_confidences_lie_in_the_unit_interval(name):
    scores = get_scorer(name)(random_answers())
    assert scores.shape == (50,)
    assert np.all((scores >= 0) & (scores <= 1))


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_certain_tokens_give_one_and_an_empty_answer_nan(name):
    scores = get_scorer(name)([[0.0, 0.0], [], np.array([])])
    assert scores[0] == 1.0
    assert np.isnan(scores[1:]).all()
    # NaN escalates under the shared rule, whatever the threshold
    assert should_escalate(scores, 0.0)[1:].all()


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_a_less_likely_token_never_raises_confidence(name):
    scorer = get_scorer(name)
    for answer in random_answers(20):
        worse = answer.copy()
        worse[RNG.integers(answer.size)] -= 1.0
        assert scorer([worse])[0] <= scorer([answer])[0]


def test_the_three_reductions():
    logprobs = np.log([0.9, 0.5, 0.8, 0.1, 0.7, 0.6, 0.9, 0.95, 0.85, 0.75, 0.65])
    assert get_scorer("mean_logprob")([logprobs])[0] == pytest.approx(math.exp(logprobs.mean()))
    assert get_scorer("min_logprob")([logprobs])[0] == pytest.approx(0.1)
    q = get_scorer("low_quantile")([logprobs])[0]
    assert q == pytest.approx(math.exp(np.quantile(logprobs, 0.1)))
    # the low quantile lies between the minimum and the geometric mean
    assert 0.1 < q < math.exp(logprobs.mean())
    # a single token: all three are its probability
    for name in SCORERS:
        assert get_scorer(name)([[math.log(0.3)]])[0] == pytest.approx(0.3)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="low_quantile, mean_logprob, min_logprob"):
        get_scorer("max_prob")

    class Config(BaseModel):
        scorer: ScorerName = "mean_logprob"

    assert Config(scorer="min_logprob").scorer == "min_logprob"
    with pytest.raises(ValidationError, match="known scorers"):
        Config(scorer="nope")
