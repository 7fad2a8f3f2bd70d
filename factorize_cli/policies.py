"""Rank policies as pure functions of singular values and layer costs.

- ``smallest_rank``: per layer, the fewest singular values whose dropped tail is small enough
  (``energy:T`` drops at most 1-T of ||W||^2; ``error:E`` at most E^2 of it).
- ``allocate_budget``: across layers, ranks (or leaving a layer whole) that remove the most weighted
  squared error within a cost budget; never worse than the best uniform latent fraction that fits.
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
    """One layer in a global allocation: its spectrum, its costs, its ceiling and how much its error counts.

    Its choices are the ranks ``step, 2 step, ..., max_rank`` and, when ``whole_cost`` is given, leaving it
    whole (that cost, no error). Its error at rank r is ``weight * sum(sigma[r:]^2)``.
    """

    name: str
    sigma: torch.Tensor
    cost_per_rank: int  # r * cost_per_rank + fixed_cost is the layer's cost at rank r
    fixed_cost: int
    max_rank: int  # the break-even rank rounded down to the step
    whole_cost: int | None = None  # the layer's cost left unfactorized; None: it must be factorized
    min_dim: int | None = None  # the min(in, out) a latent fraction scales (None: len(sigma))
    weight: float = 1.0  # how much a unit of the layer's squared error counts against the others'


class BudgetError(ValueError):
    """The budget is below what the smallest allowed ranks already cost."""


def allocate_budget(layers: Sequence[BudgetLayer], budget: float, step: int = 1,
                    exact_limit: int = 30_000_000) -> dict[str, int | None]:
    """Ranks (multiples of ``step``; None: kept whole) that spend at most ``budget`` and remove the most error.

    Each layer climbs a ladder: rank ``step``, the next step, ..., its ceiling, then whole when allowed.
    A local search starts with every layer on its lowest rung and repeatedly takes the move with the
    largest error drop per unit cost that fits: the next rung, or straight to whole (a jump: leaving a
    layer whole removes all of its error for about one step more than its ceiling costs). Greedy by
    ratio can strand budget (the problem is a knapsack), so exchanges follow: give back a few rungs,
    take a move that fits, keep the trade when the error drops, and refill. The same search also starts
    from the best uniform schedule (one latent fraction for every layer, as ``--latent-features`` plans
    it) that fits, so the answer is never worse than that schedule. When the problem is small enough
    (``exact_limit`` table cells) the knapsack is also solved exactly by dynamic programming. The
    answer is the best of these.
    """
    alloc = _Allocation(layers, budget, step)
    found = [alloc.search([0] * len(layers))]
    uniform = alloc.best_uniform([layer.min_dim or len(layer.sigma) for layer in layers])
    if uniform is not None:
        found.append(alloc.search(uniform))
    exact = _exact_positions(alloc, exact_limit)
    if exact is not None:
        found.append(exact)
    best = min(found, key=alloc.error)  # the first of equals: the plain search's
    return {layer.name: alloc.rank(i, p) for i, (layer, p) in enumerate(zip(layers, best))}


class _Allocation:
    """Each layer's ladder as rungs (0: rank ``step``; ``top``: its ceiling; ``top + 1``: whole when
    allowed) with a cost and an error per rung, and the search state: a rung per layer and the spend."""

    def __init__(self, layers: Sequence[BudgetLayer], budget: float, step: int) -> None:
        self.step, self.budget = step, budget
        self.tops = [(layer.max_rank - step) // step for layer in layers]
        self.prices: list[list[int]] = []
        self.errors: list[list[float]] = []
        for layer, top in zip(layers, self.tops):
            tail = tail_energy(layer.sigma).tolist()
            ranks = [step * (1 + t) for t in range(top + 1)]
            self.prices.append([r * layer.cost_per_rank + layer.fixed_cost for r in ranks])
            self.errors.append([layer.weight * tail[min(r, len(tail) - 1)] for r in ranks])
            if layer.whole_cost is not None:
                self.prices[-1].append(layer.whole_cost)
                self.errors[-1].append(0.0)
        self.minimum = sum(p[0] for p in self.prices)
        if self.minimum > budget:
            raise BudgetError(f"the smallest ranks already cost {self.minimum:,} against a budget of {budget:,.0f}")
        self.pos: list[int] = []
        self.spent = 0

    def rank(self, i: int, p: int) -> int | None:
        return None if p > self.tops[i] else self.step * (1 + p)

    def error(self, pos: list[int]) -> float:
        return math.fsum(e[p] for e, p in zip(self.errors, pos))

    def cost(self, pos: list[int]) -> int:
        return sum(c[p] for c, p in zip(self.prices, pos))

    def moves(self, i: int) -> list[tuple[float, int, int]]:
        """Layer i's moves up as (error removed, extra cost, rung): the next rung and the jump to whole."""
        p, end = self.pos[i], len(self.prices[i]) - 1
        e, c = self.errors[i], self.prices[i]
        return [(e[p] - e[q], c[q] - c[p], q) for q in sorted({p + 1, end}) if p < q <= end]

    def search(self, start: list[int]) -> list[int]:
        self.pos, self.spent = list(start), self.cost(start)
        self.refill()
        for _ in range(200):  # every accepted exchange strictly lowers the error
            if not self.exchange():
                break
            self.refill()
        return list(self.pos)

    def refill(self) -> None:
        def push(i: int) -> None:
            for gain, cost, q in self.moves(i):
                heapq.heappush(heap, (-gain / cost if cost > 0 else -math.inf, i, self.pos[i], q))

        heap: list[tuple[float, int, int, int]] = []
        for i in range(len(self.pos)):
            push(i)
        while heap:
            _, i, p, q = heapq.heappop(heap)
            if self.pos[i] != p:
                continue  # stale: the layer has moved since
            extra = self.prices[i][q] - self.prices[i][p]
            if self.spent + extra > self.budget:
                continue  # closed: the spend only grows, and this move's cost does not change
            self.spent += extra
            self.pos[i] = q
            push(i)

    def exchange(self, pool: int = 12) -> bool:
        """Apply the best trade of (up to three rungs of one layer, all of a layer above its lowest rung,
        or one rung each of two layers) for one move up of another layer; False when none lowers the error."""
        n, pos = len(self.pos), self.pos
        give: list[tuple[float, int, tuple[tuple[int, int], ...]]] = []  # error added, cost freed, new rungs
        for i in range(n):
            e, c, p = self.errors[i], self.prices[i], pos[i]
            for q in sorted({p - 1, p - 2, p - 3, 0}, reverse=True):
                if 0 <= q < p:
                    give.append((e[q] - e[p], c[p] - c[q], ((i, q),)))
        singles = sorted((g for g in give if g[2][0][1] == pos[g[2][0][0]] - 1),
                         key=lambda g: g[0] / g[1] if g[1] > 0 else math.inf)[:pool]
        for a in range(len(singles)):
            for b in range(a + 1, len(singles)):
                give.append((singles[a][0] + singles[b][0], singles[a][1] + singles[b][1],
                             singles[a][2] + singles[b][2]))
        take = sorted(((gain, cost, j, q) for j in range(n) for gain, cost, q in self.moves(j)), reverse=True)
        if not take:
            return False
        best, trade = 0.0, None
        room = self.budget - self.spent
        for lost, freed, given in give:
            if take[0][0] - lost <= best:
                continue
            touched = {i for i, _ in given}
            for gain, cost, j, q in take:  # by gain, largest first: the first that fits is this give's best
                if gain - lost <= best * (1 + 1e-12) + 1e-300:
                    break
                if j not in touched and cost <= room + freed:
                    best, trade = gain - lost, (given, j, q)
                    break
        if trade is None:
            return False
        given, j, q = trade
        for i, p in (*given, (j, q)):
            self.spent += self.prices[i][p] - self.prices[i][pos[i]]
            pos[i] = p
        return True

    def best_uniform(self, dims: list[int]) -> list[int] | None:
        """Rungs of the least-error uniform schedule that fits: for one latent fraction f, every layer at
        ``max(1, int(f * dim))`` rounded to the step, or whole when that is above its ceiling, as
        ``--latent-features f`` plans it. f runs through the fractions k/dim where some layer's rank changes."""
        events: dict[float, list[tuple[int, int]]] = {}  # f -> (dim, k) with f * dim == k
        for d in set(dims):
            for k in range(1, d):
                events.setdefault(k / d, []).append((d, k))  # equal fractions divide to the same float
        by_dim: dict[int, list[int]] = {}
        for i, d in enumerate(dims):
            by_dim.setdefault(d, []).append(i)
        pos = [0] * len(dims)  # small f: every rank max(1, int(f * dim)) = 1, rounded to the step
        spent, error, whole = self.cost(pos), self.error(pos), 0
        best, least = (list(pos), error) if spent <= self.budget else (None, math.inf)
        for f in sorted(events):
            for d, k in events[f]:
                for i in by_dim[d]:
                    q = round_nearest(k, self.step) // self.step - 1
                    if q > self.tops[i]:
                        if len(self.prices[i]) == self.tops[i] + 1:
                            return best  # above its ceiling and it cannot stay whole: no larger f plans
                        q = self.tops[i] + 1
                    if q != pos[i]:
                        spent += self.prices[i][q] - self.prices[i][pos[i]]
                        error += self.errors[i][q] - self.errors[i][pos[i]]
                        whole += (q > self.tops[i]) - (pos[i] > self.tops[i])
                        pos[i] = q
            if spent <= self.budget and error < least:
                best, least = list(pos), error
            if whole == len(pos):
                break
        return best


def _exact_positions(alloc: _Allocation, limit: int) -> list[int] | None:
    """Exact knapsack by dynamic programming over cost units, whole rungs included (a jump in cost like
    any other choice here), or None when it would be too big."""
    import torch

    offsets = [[c - prices[0] for c in prices] for prices in alloc.prices]  # cost above the lowest rung
    if any(o < 0 for row in offsets for o in row):
        return None  # a rung cheaper than the lowest: not a knapsack over cost units
    unit = math.gcd(*(o for row in offsets for o in row)) or 1
    room = int((alloc.budget - alloc.minimum) // unit)
    if room < 0 or sum(len(row) for row in offsets) * (room + 1) > limit:
        return None
    best = torch.zeros(room + 1, dtype=torch.float64)  # least error using at most b units
    choices = []
    for errors, row in zip(alloc.errors, offsets):
        table = torch.full((len(row), room + 1), math.inf, dtype=torch.float64)
        for p, o in enumerate(row):
            u = o // unit
            if u <= room:
                table[p, u:] = best[: room + 1 - u] + errors[p]
        best, choice = table.min(dim=0)
        choices.append(choice)
    pos, b = [0] * len(offsets), room
    for i in range(len(offsets) - 1, -1, -1):
        pos[i] = int(choices[i][b])
        b -= offsets[i][pos[i]] // unit
    return pos
