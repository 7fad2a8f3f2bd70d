"""Rank policies as pure functions of singular values and layer costs.

- ``smallest_rank``: per layer, the fewest singular values whose dropped tail is small enough
  (``energy:T`` drops at most 1-T of ||W||^2; ``error:E`` at most E^2 of it).
- ``allocate_budget``: across layers, rank steps go greedily to the largest drop in squared
  error per unit of cost, never above a layer's ceiling, until the budget is spent.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Relative slack for comparisons of float64 energy sums (a rank that meets the bound up to
# rounding counts as meeting it).
_SLACK = 1e-12


def tail_energy(sigma: torch.Tensor) -> torch.Tensor:
    """``tail[r] = sum(sigma[r:]^2)`` for r = 0..k (float64, length k + 1, non-increasing)."""
    import torch

    squares = sigma.to(torch.float64).square()
    tail = squares.flip(0).cumsum(0).flip(0)
    return torch.cat([tail, tail.new_zeros(1)])


def smallest_rank(sigma: torch.Tensor, max_dropped_fraction: float) -> int:
    """Smallest rank r >= 1 whose dropped energy ``sum(sigma[r:]^2)`` is at most the given fraction."""
    tail = tail_energy(sigma)
    total = float(tail[0])
    if total == 0.0:
        return 1
    allowed = max_dropped_fraction * total * (1 + _SLACK)
    return max(1, int((tail > allowed).sum()))


def rank_for_energy(sigma: torch.Tensor, threshold: float) -> int:
    return smallest_rank(sigma, 1.0 - threshold)


def rank_for_error(sigma: torch.Tensor, max_error: float) -> int:
    return smallest_rank(sigma, max_error * max_error)


def round_up(rank: int, multiple: int) -> int:
    return -(-rank // multiple) * multiple


def round_nearest(rank: int, multiple: int) -> int:
    return max(multiple, int(math.floor(rank / multiple + 0.5)) * multiple)


def round_down(rank: int, multiple: int) -> int:
    return rank // multiple * multiple


@dataclass(frozen=True)
class BudgetLayer:
    """One layer in a global allocation: its spectrum, its cost per rank, and its ceiling."""

    name: str
    sigma: torch.Tensor
    cost_per_rank: int  # r * cost_per_rank + fixed_cost is the layer's cost at rank r
    fixed_cost: int
    max_rank: int  # the break-even rank rounded down to the step


class BudgetError(ValueError):
    """The budget is below what the smallest allowed ranks already cost."""


def allocate_budget(layers: Sequence[BudgetLayer], budget: float, step: int = 1,
                    exact_limit: int = 30_000_000) -> dict[str, int]:
    """Ranks (multiples of ``step``) that spend at most ``budget`` and remove the most squared error.

    Every layer starts at rank ``step``. Then, repeatedly, the step with the largest error drop per
    unit cost is taken if it fits; a layer whose next step does not fit is closed (its later steps
    cost the same and gain less). Greedy by ratio can strand up to one step of budget when steps
    differ in cost (the problem is a knapsack), so exchanges follow: give back a few steps, take
    another that fits, keep the trade when the total squared error drops, and refill greedily.
    When the problem is small enough (``exact_limit`` table cells) the knapsack is solved exactly
    by dynamic programming over the cost, and that answer is used when it is better.
    """
    alloc = _Allocation(layers, budget, step)
    alloc.refill()
    for _ in range(200):  # every accepted exchange strictly lowers the error
        if not alloc.exchange():
            break
        alloc.refill()
    exact = alloc.exact(exact_limit)
    if exact is not None and alloc.error(exact) < alloc.error(alloc.ranks):
        alloc.ranks = exact
    return {layer.name: r for layer, r in zip(layers, alloc.ranks)}


class _Allocation:
    def __init__(self, layers: Sequence[BudgetLayer], budget: float, step: int) -> None:
        self.step, self.budget = step, budget
        self.ranks = [step] * len(layers)
        self.spent = sum(step * layer.cost_per_rank + layer.fixed_cost for layer in layers)
        if self.spent > budget:
            raise BudgetError(f"the smallest ranks already cost {self.spent:,} against a budget of {budget:,.0f}")
        self.tails = [tail_energy(layer.sigma).tolist() for layer in layers]
        self.costs = [step * layer.cost_per_rank for layer in layers]
        self.ceilings = [layer.max_rank for layer in layers]
        self.minimum = self.spent

    def error(self, ranks: list[int]) -> float:
        return sum(self.tail(i, r) for i, r in enumerate(ranks))

    def exact(self, limit: int) -> list[int] | None:
        return _exact_ranks(self, limit)

    def tail(self, i: int, r: int) -> float:
        t = self.tails[i]
        return t[min(r, len(t) - 1)]

    def gain(self, i: int) -> float | None:
        """Error removed by layer i's next step, or None at its ceiling."""
        r = self.ranks[i]
        return None if r + self.step > self.ceilings[i] else self.tail(i, r) - self.tail(i, r + self.step)

    def loss(self, i: int, k: int) -> float | None:
        """Error added by giving back k steps of layer i, or None below the smallest rank."""
        r = self.ranks[i]
        return None if r - k * self.step < self.step else self.tail(i, r - k * self.step) - self.tail(i, r)

    def refill(self) -> None:
        heap = [(-g / self.costs[i], i) for i in range(len(self.ranks)) if (g := self.gain(i)) is not None]
        heapq.heapify(heap)
        while heap:
            _, i = heapq.heappop(heap)
            if self.spent + self.costs[i] > self.budget:
                continue  # closed: every later step of this layer costs the same and gains less
            self.spent += self.costs[i]
            self.ranks[i] += self.step
            if (g := self.gain(i)) is not None:
                heapq.heappush(heap, (-g / self.costs[i], i))

    def exchange(self, pool: int = 12) -> bool:
        """Apply the best trade of (up to three steps of one layer, or one step each of two layers)
        for one step of another layer; False when no trade lowers the error."""
        n, costs = len(self.ranks), self.costs
        gains = [self.gain(j) for j in range(n)]
        give: list[tuple[float, int, tuple[tuple[int, int], ...]]] = []
        for i in range(n):
            for k in (1, 2, 3):
                if (lost := self.loss(i, k)) is None:
                    break
                give.append((lost, k * costs[i], ((i, k),)))
        singles = sorted((g for g in give if g[2][0][1] == 1), key=lambda g: g[0] / g[1])[:pool]
        for a in range(len(singles)):
            for b in range(a + 1, len(singles)):
                give.append((singles[a][0] + singles[b][0], singles[a][1] + singles[b][1],
                             singles[a][2] + singles[b][2]))
        best, move = 0.0, None
        room = self.budget - self.spent
        for lost, freed, removed in give:
            touched = {i for i, _ in removed}
            for j in range(n):
                g = gains[j]
                if g is None or j in touched or costs[j] > room + freed:
                    continue
                if g - lost > best * (1 + 1e-12) + 1e-300:
                    best, move = g - lost, (removed, j)
        if move is None:
            return False
        removed, j = move
        for i, k in removed:
            self.ranks[i] -= k * self.step
            self.spent -= k * costs[i]
        self.ranks[j] += self.step
        self.spent += costs[j]
        return True


def _exact_ranks(alloc: _Allocation, limit: int) -> list[int] | None:
    """Exact knapsack by dynamic programming over cost units, or None when it would be too big."""
    import torch

    step, costs = alloc.step, alloc.costs
    unit = math.gcd(*costs) if costs else 1
    room = int((alloc.budget - alloc.minimum) // unit)
    extra = [(ceiling - step) // step for ceiling in alloc.ceilings]  # steps above the smallest rank
    if room < 0 or sum(t + 1 for t in extra) * (room + 1) > limit:
        return None
    best = torch.zeros(room + 1, dtype=torch.float64)  # least error using at most b units
    choices = []
    for i, top in enumerate(extra):
        u = costs[i] // unit
        table = torch.full((top + 1, room + 1), math.inf, dtype=torch.float64)
        for t in range(top + 1):
            if t * u > room:
                break
            table[t, t * u:] = best[: room + 1 - t * u] + alloc.tail(i, step * (1 + t))
        best, choice = table.min(dim=0)
        choices.append(choice)
    ranks, b = [0] * len(extra), room
    for i in range(len(extra) - 1, -1, -1):
        t = int(choices[i][b])
        ranks[i] = step * (1 + t)
        b -= t * (costs[i] // unit)
    return ranks
