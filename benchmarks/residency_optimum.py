#!/usr/bin/env python3
"""The fewest bytes per pass any residency policy could read: the yardstick for the engine's (issue #16).

A forward pass uses blocks in an order (the learned execution order); passes repeat. Memory holds at most `budget`
bytes of blocks, every one counted: the block computing, the blocks in flight, and whatever stays. A block must be
in memory when it computes; with a lookahead of k (prefetch NEXT_LAYER is 1), the next k blocks are being read while
one computes, so they are pinned too. Reading a block costs its bytes. What is the least a policy that knows the
whole future can read per pass, in the steady state of repeated passes?

* **Equal blocks: exact.** Belady's MIN restricted to the unpinned blocks (evict the one whose next use is furthest)
  is optimal: the pinned blocks are fixed by the order, not by the policy, and among the others the classic exchange
  argument holds. `tests` check it against an exhaustive search on small cases.
* **Unequal blocks: bounds.** The exact optimum is NP-hard in general (it contains knapsack). Reported: a lower
  bound that any policy must read, `max(0, used bytes per pass - budget)` (see `lower_bound`), and an achievable
  upper bound (a heuristic), the better of two policies that can be run: Belady on bytes (evict furthest next use
  first) and a static set chosen by a knapsack over block sizes and uses, beside a ring for the rest. The optimum
  lies between; on equal blocks the upper bound is the exact optimum.

    python3 benchmarks/residency_optimum.py --layers 8 --budget-layers 4
    python3 benchmarks/residency_optimum.py --sizes 262,50,50,50,50,262 --budget 300
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import sys
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

__all__ = ["Optimum", "furthest_next_use", "static_set", "lower_bound", "optimum", "exhaustive"]


@dataclasses.dataclass(frozen=True)
class Optimum:
    """Bytes per pass: `exact` when every block has the same size (then lower == upper), else the optimum lies in
    [lower, upper]; `policy` names the policy that reaches `upper`."""

    lower: float
    upper: float
    exact: bool
    policy: str


def _check(sizes: Sequence[int], order: Sequence[int], budget: int, lookahead: int) -> None:
    if not order:
        raise ValueError("the order is empty")
    if lookahead < 0:
        raise ValueError(f"lookahead must be >= 0, got {lookahead}")
    for block in order:
        if not 0 <= block < len(sizes):
            raise ValueError(f"block {block} of the order has no size (0..{len(sizes) - 1})")
    need = max(_window_bytes(sizes, order, lookahead))
    if need > budget:
        raise ValueError(f"the budget ({budget}) cannot hold the largest pinned window ({need} bytes)")


def _window_bytes(sizes: Sequence[int], order: Sequence[int], lookahead: int) -> List[int]:
    """Bytes pinned at each position of a cyclic pass: the distinct blocks computing and in flight."""
    n = len(order)
    return [sum(sizes[b] for b in {order[(p + d) % n] for d in range(lookahead + 1)}) for p in range(n)]


def _fetches(order: Sequence[int], passes: int) -> List[int]:
    return list(order) * passes


def _replay(sizes: Sequence[int], sequence: Sequence[int], budget: int, lookahead: int, choose_victim,
            boundaries: Optional[List[FrozenSet[int]]] = None, pass_length: int = 0) -> List[int]:
    """Bytes read at each fetch of `sequence` (fetch p: block sequence[p]; blocks p-k..p pinned), evicting with
    `choose_victim(candidates, p, following)` until the block fits. With `boundaries`, the resident set at the start
    of every pass of `pass_length` fetches is appended to it."""
    positions: Dict[int, List[int]] = {}
    for p, block in enumerate(sequence):
        positions.setdefault(block, []).append(p)
    cursor = {block: 0 for block in positions}

    def following(block: int, p: int) -> int:
        uses = positions[block]
        i = cursor[block]
        while i < len(uses) and uses[i] < p:
            i += 1
        cursor[block] = i
        return uses[i] if i < len(uses) else len(sequence) + sizes[block]  # never again: furthest (bigger first)

    resident: set = set()
    held = 0
    read: List[int] = []
    for p, block in enumerate(sequence):
        if boundaries is not None and p % pass_length == 0:
            boundaries.append(frozenset(resident))
        if block in resident:
            read.append(0)
            continue
        pinned = set(sequence[max(0, p - lookahead):p + 1])
        while held + sizes[block] > budget:
            candidates = [b for b in resident if b not in pinned]
            if not candidates:  # _check makes this unreachable
                raise ValueError(f"no room for block {block} at fetch {p}")
            victim = choose_victim(candidates, p, following)
            resident.remove(victim)
            held -= sizes[victim]
        resident.add(block)
        held += sizes[block]
        read.append(sizes[block])
    return read


def _steady_pass(read: Sequence[int], boundaries: Sequence[FrozenSet[int]], pass_length: int) -> float:
    """Mean bytes per pass over the periodic regime: from the first pass whose starting resident set comes back,
    to its return. Decisions of a policy that sees the future repeat once the state does (the horizon is long
    enough that its end does not reach back this far). Without a repeat in the first half: the mean of the passes
    between the first and the last quarter."""
    half = len(boundaries) // 2
    first: Dict[FrozenSet[int], int] = {}
    for i, state in enumerate(boundaries[1:half + 1], start=1):
        if state in first:
            start, end = first[state], i
            return sum(read[start * pass_length:end * pass_length]) / (end - start)
        first[state] = i
    start, end = len(boundaries) // 4, 3 * len(boundaries) // 4
    return sum(read[start * pass_length:end * pass_length]) / (end - start)


def furthest_next_use(sizes: Sequence[int], order: Sequence[int], budget: int, lookahead: int = 0,
                      passes: Optional[int] = None) -> float:
    """Bytes per pass of Belady's MIN with the window pinned, in the steady state (exact on equal blocks)."""
    _check(sizes, order, budget, lookahead)
    passes = passes or 4 * len(order) + 8  # the regime's period is at most a few times the pass length

    def victim(candidates, p, following):
        return max(candidates, key=lambda b: (following(b, p), sizes[b]))

    boundaries: List[FrozenSet[int]] = []
    read = _replay(sizes, _fetches(order, passes), budget, lookahead, victim, boundaries, len(order))
    return _steady_pass(read, boundaries, len(order))


def static_set(sizes: Sequence[int], order: Sequence[int], budget: int, lookahead: int = 0,
               granularity: Optional[int] = None) -> Tuple[float, FrozenSet[int]]:
    """A static set chosen by a 0/1 knapsack (value: bytes its uses would read per pass; weight: its size) in what
    the budget leaves beside a ring that holds the largest pinned window of all blocks; the rest streams through the
    ring, read at every use. Returns (bytes per pass, the set)."""
    _check(sizes, order, budget, lookahead)
    uses: Dict[int, int] = {}
    for block in order:
        uses[block] = uses.get(block, 0) + 1
    ring = max(_window_bytes(sizes, order, lookahead))
    room = budget - ring
    blocks = sorted(uses)
    unit = granularity or max(1, max(sizes[b] for b in blocks) // 4096)
    capacity = room // unit
    # best[c] = (value, set) using at most c units
    best: List[Tuple[int, FrozenSet[int]]] = [(0, frozenset())] * (capacity + 1)
    for block in blocks:
        weight = -(-sizes[block] // unit)
        value = sizes[block] * uses[block]
        if weight > capacity:
            continue
        for c in range(capacity, weight - 1, -1):
            candidate = best[c - weight][0] + value
            if candidate > best[c][0]:
                best[c] = (candidate, best[c - weight][1] | {block})
    saved, chosen = best[capacity]
    total = sum(sizes[b] * n for b, n in uses.items())
    return float(total - saved), chosen


def lower_bound(sizes: Sequence[int], order: Sequence[int], budget: int, lookahead: int = 0) -> float:
    """Bytes any policy reads per pass, at least: `used - budget`. In the steady state a block that is not read
    again between two consecutive uses stays in memory for a whole cycle, so at every moment all such blocks are in
    memory together: they cannot weigh more than the budget. (Loose: it ignores the window.)"""
    _check(sizes, order, budget, lookahead)
    return float(max(0, sum(sizes[b] for b in set(order)) - budget))


def optimum(sizes: Sequence[int], order: Sequence[int], budget: int, lookahead: int = 0) -> Optimum:
    """The optimum per pass, or bounds around it (see the module docstring)."""
    belady = furthest_next_use(sizes, order, budget, lookahead)
    equal = len({sizes[b] for b in set(order)}) == 1
    if equal:
        return Optimum(belady, belady, True, "furthest next use (Belady)")
    static, _chosen = static_set(sizes, order, budget, lookahead)
    upper, policy = min((belady, "furthest next use (Belady, bytes)"), (static, "static set (knapsack) + ring"))
    return Optimum(lower_bound(sizes, order, budget, lookahead), upper, False, policy)


def exhaustive(sizes: Sequence[int], sequence: Sequence[int], budget: int, lookahead: int = 0) -> int:
    """The least bytes any policy reads over the finite `sequence`, starting empty, by trying every eviction (small
    cases only: the tests' reference)."""
    n = len(sequence)

    @functools.lru_cache(maxsize=None)
    def cost(p: int, resident: FrozenSet[int]) -> float:
        if p == n:
            return 0
        block = sequence[p]
        if block in resident:
            return cost(p + 1, resident)
        pinned = set(sequence[max(0, p - lookahead):p + 1])
        movable = [b for b in resident if b not in pinned]
        kept_pinned = resident - set(movable)
        best = float("inf")
        for r in range(len(movable) + 1):
            for keep in itertools.combinations(movable, r):
                state = frozenset(kept_pinned | set(keep) | {block})
                if sum(sizes[b] for b in state) <= budget:
                    best = min(best, sizes[block] + cost(p + 1, state))
        return best

    return int(cost(0, frozenset()))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8, help="equal layers (when --sizes is not given)")
    p.add_argument("--sizes", default=None, help="comma-separated block sizes in the order of a pass")
    p.add_argument("--budget-layers", type=float, default=4.0, help="budget in layers (equal layers)")
    p.add_argument("--budget", type=int, default=None, help="budget in the unit of --sizes")
    args = p.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else [1] * args.layers
    budget = args.budget if args.budget is not None else int(args.budget_layers)
    order = list(range(len(sizes)))
    for lookahead, name in ((0, "NONE"), (1, "NEXT_LAYER")):
        try:
            o = optimum(sizes, order, budget, lookahead)
        except ValueError as error:
            print(f"{name:10s} lookahead {lookahead}: {error}", file=sys.stderr)
            continue
        kind = "exact" if o.exact else f"between {o.lower:g} and {o.upper:g}"
        print(f"{name:10s} lookahead {lookahead}: {o.upper:.3f} per pass ({kind}; {o.policy}); "
              f"the pass uses {sum(sizes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
