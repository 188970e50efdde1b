"""benchmarks/residency_optimum.py: the offline optimum the engine's residency is measured against (#16 item 1).
Belady with the window pinned is checked against an exhaustive search (exact on equal blocks; an achievable upper
bound on unequal ones), the lower bound against the same search, and the steady state against known figures."""

from __future__ import annotations

import fractions
import itertools
import pathlib
import random
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
import residency_optimum as ro  # noqa: E402


def belady_total(sizes, sequence, budget, lookahead):
    victim = lambda candidates, p, following: max(candidates, key=lambda b: (following(b, p), sizes[b]))  # noqa: E731
    return sum(ro._replay(sizes, sequence, budget, lookahead, victim))


def small_cases(equal: bool, count: int = 40):
    rng = random.Random(1 if equal else 2)
    for _ in range(count):
        n = rng.randint(3, 6)
        lookahead = rng.choice([0, 1])
        sizes = [1] * n if equal else [rng.randint(1, 5) for _ in range(n)]
        order = list(range(n))
        if rng.random() < 0.3:  # a block used twice in a pass (an encoder-decoder, a tied weight)
            order.insert(rng.randrange(1, n), rng.randrange(n))
        window = max(ro._window_bytes(sizes, order, lookahead))
        budget = rng.randint(window, max(window, sum(sizes) - 1))
        yield sizes, order, budget, lookahead


@pytest.mark.parametrize("case", list(small_cases(equal=True)), ids=str)
def test_on_equal_blocks_belady_with_the_window_pinned_is_the_exhaustive_optimum(case):
    sizes, order, budget, lookahead = case
    sequence = order * 3
    assert belady_total(sizes, sequence, budget, lookahead) == ro.exhaustive(sizes, sequence, budget, lookahead)


@pytest.mark.parametrize("case", list(small_cases(equal=False)), ids=str)
def test_on_unequal_blocks_the_bounds_hold_around_the_exhaustive_optimum(case):
    sizes, order, budget, lookahead = case
    passes = 3
    best = ro.exhaustive(sizes, order * passes, budget, lookahead)
    assert belady_total(sizes, order * passes, budget, lookahead) >= best  # achievable: never below the optimum
    used = sum(sizes[b] for b in set(order))
    # every pass after the first reads at least the lower bound
    assert best >= used + (passes - 1) * ro.lower_bound(sizes, order, budget, lookahead)
    o = ro.optimum(sizes, order, budget, lookahead)
    assert o.lower <= o.upper


def test_eight_equal_layers_with_four_in_budget():
    """The issue's example: the steady state of Belady's cycle, NONE and NEXT_LAYER."""
    none = ro.optimum([1] * 8, list(range(8)), 4, 0)
    ahead = ro.optimum([1] * 8, list(range(8)), 4, 1)
    assert none.exact and ahead.exact
    assert fractions.Fraction(none.upper).limit_denominator(100) == fractions.Fraction(32, 7)
    assert fractions.Fraction(ahead.upper).limit_denominator(100) == fractions.Fraction(16, 3)
    assert ro.lower_bound([1] * 8, list(range(8)), 4) == 4


def test_an_lm_head_a_little_larger_than_a_layer_costs_half_a_layer_per_pass_even_at_the_optimum():
    """M1's model (generation.py: 8 layers of 317 MB, an lm_head of 328 MB, a budget of 5.08 layers) in units of
    layer / 30. Reading 4 layers a pass (120: the lower bound, 119, in whole blocks) is not sustainable: the
    exhaustive optimum reads 135.125 a pass in the long run, so NONE's passes that also read the lm_head (4 of 8 in
    the engine: 1.60 GB against 1.27 GB) are the optimum's own cost, and Belady on bytes is within 0.3 % of it."""
    sizes, order, budget = [30] * 8 + [31], list(range(9)), 152
    sixteen, twenty_four = (ro.exhaustive(sizes, order * passes, budget, 0) for passes in (16, 24))
    optimum_per_pass = fractions.Fraction(twenty_four - sixteen, 8)
    assert optimum_per_pass == fractions.Fraction(1081, 8)
    bound = ro.optimum(sizes, order, budget, 0)
    assert bound.lower == 119 and bound.lower < optimum_per_pass <= bound.upper <= optimum_per_pass * 1.003


def test_the_steady_state_is_the_long_run_mean():
    for n, budget, lookahead in itertools.product((5, 8, 11), (3, 4), (0, 1)):
        sizes, order = [1] * n, list(range(n))
        passes = 40 * n
        read = ro._replay(sizes, order * passes, budget, lookahead,
                          lambda c, p, f: max(c, key=lambda b: (f(b, p), 1)))
        long_run = sum(read[n * n:(passes - 2 * n) * n]) / (passes - 3 * n)
        assert ro.furthest_next_use(sizes, order, budget, lookahead) == pytest.approx(long_run, rel=0.02)


def test_a_budget_for_everything_reads_nothing_and_the_static_set_keeps_the_most_used_bytes():
    sizes, order = [4, 1, 1, 1, 4], [0, 1, 2, 3, 4]
    assert ro.furthest_next_use(sizes, order, sum(sizes)) == 0
    assert ro.static_set(sizes, order, sum(sizes) + 4)[0] == 0
    # ring: the largest window (5); room 6: block 1 (used twice, 10 bytes a pass) and one small block (1 byte)
    cost, chosen = ro.static_set([1, 5, 1], [0, 1, 2, 1], budget=5 + 6)
    assert 1 in chosen and len(chosen) == 2 and cost == 1


def test_impossible_inputs_are_refused():
    with pytest.raises(ValueError, match="largest pinned window"):
        ro.optimum([3, 3], [0, 1], budget=5, lookahead=1)
    with pytest.raises(ValueError, match="has no size"):
        ro.optimum([1, 1], [0, 2], budget=4)
    with pytest.raises(ValueError, match="empty"):
        ro.optimum([1], [], budget=4)
