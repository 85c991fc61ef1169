import random

from serving.classify.length_groups import padded_tokens, plan_groups


def test_every_input_lands_in_exactly_one_group():
    rng = random.Random(3)
    for _ in range(50):
        lengths = [rng.randint(3, 128) for _ in range(rng.randint(1, 64))]
        groups = plan_groups(lengths)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))


def test_one_long_input_no_longer_pads_the_short_ones():
    lengths = [12] * 31 + [128]
    groups = plan_groups(lengths, overhead_tokens=48)
    assert groups == [list(range(31)), [31]]
    assert padded_tokens(lengths, groups) == 31 * 12 + 128 < 32 * 128


def test_similar_lengths_stay_one_batch():
    assert plan_groups([10, 12, 11, 12], overhead_tokens=48) == [[0, 2, 1, 3]]


def test_the_split_never_costs_more_than_one_padded_batch():
    rng = random.Random(7)
    for _ in range(50):
        lengths = [rng.randint(3, 128) for _ in range(rng.randint(1, 48))]
        groups = plan_groups(lengths, overhead_tokens=48)
        cost = padded_tokens(lengths, groups) + 48 * len(groups)
        assert cost <= len(lengths) * max(lengths) + 48


def test_no_inputs_no_groups():
    assert plan_groups([]) == []
