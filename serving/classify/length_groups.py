"""Split one batch of tokenized inputs into groups of similar length.

A padded batch costs as many tokens as its longest input times its size, so one long input
in a batch of 32 short ones makes the model pay for 32 long ones. Sorting by length and
cutting where it pays cuts that waste; each extra group costs one more forward call, whose
fixed cost is counted here in tokens. The split is optimal for that cost model
(a dynamic programme over the sorted lengths: n is at most a few dozen).
"""

from __future__ import annotations

from collections.abc import Sequence

GROUP_OVERHEAD_TOKENS = 48
"""The fixed cost of one forward call, in padded tokens (a small encoder on a CPU core
spends about as long on one call's set-up as on 2-3 headlines)."""


def plan_groups(
    lengths: Sequence[int], overhead_tokens: int = GROUP_OVERHEAD_TOKENS
) -> list[list[int]]:
    """Indices of ``lengths`` split into groups that minimise
    ``sum(overhead_tokens + len(group) * max length in group)``.

    Every index appears exactly once; groups are ordered by length, shortest first, and
    within a group indices are in ascending length (ties keep the caller's order).
    """
    if not lengths:
        return []
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sorted_lengths = [lengths[i] for i in order]
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cheapest split of the j shortest
    cut = [0] * (n + 1)  # cut[j]: where the last group of that split begins
    for end in range(1, n + 1):
        longest = sorted_lengths[end - 1]
        for start in range(end):
            cost = best[start] + overhead_tokens + (end - start) * longest
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups: list[list[int]] = []
    end = n
    while end > 0:
        groups.append(order[cut[end] : end])
        end = cut[end]
    return groups[::-1]


def padded_tokens(lengths: Sequence[int], groups: list[list[int]]) -> int:
    """Tokens the model processes for ``groups``, padding included."""
    return sum(len(g) * max(lengths[i] for i in g) for g in groups)
