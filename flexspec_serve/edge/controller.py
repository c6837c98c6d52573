"""Choosing the draft length K each round: FlexSpec's channel-aware controller and the baselines.

Every policy implements `choose(view) -> K` and `observe(k, accepted)`; K = 0 means a cloud-only round
(the cloud generates the next token alone). FlexSpec's controller maximises expected goodput

    E[tau | K, alpha] / E[T_round(K)],   tau = (1 - alpha^(K+1)) / (1 - alpha),
    T_round(K) = K t_draft + t_up(bytes(K)) + t_verify(K) + t_down      (t_up, t_down include the RTT)

plus, for K > 0, whatever draft prefill could not be hidden in earlier rounds' waiting time (a device
that has sat out rounds must first feed the tokens the cloud produced meanwhile).

Prefill (a session's opening): before its first draft step the device feeds the draft the whole prompt, P ms
on the critical path of a K > 0 round. A cloud-only round (K = 0) hides that prefill in its wait, so the round
after it starts clean. Goodput per round cannot see that (the saving falls in the next round), so while
prefill is pending the controller ranks rounds by their overrun: the time a round takes beyond what steady
rounds would take for the same tokens, G the best goodput without prefill:

    overrun(K > 0) = P + T_round(K) - tau(K) / G,     overrun(0) = T_round(0) + max(0, P - T_round(0)) - 1 / G

It opens with a cloud-only round when that costs less than drafting through the prefill. With no prefill
the lowest overrun is the highest goodput (T - tau / G >= 0, and 0 at the best K), so nothing else changes.

Draft-ahead (a device option): while a round waits for its answer the device drafts d_{K+1} (its guess of
the cloud's bonus token) and then the next round's tokens (with branches, from its runner-up too: a second
guess, `flexspec_serve.ahead.second_guess`). On a lookahead hit (all K accepted and a guess right,
`AcceptanceEstimator.p_hit`) the next round starts with those tokens
already drafted (`RoundView.predrafted`), so the controller counts the expected saving against T_round(K)
and the pre-draft's energy (spent hit or miss) in J/token; it chooses K and whether to draft ahead at all
this round together (`ahead_now`), so a tight energy budget buys a longer draft rather than a pre-draft.

Pipelining (a device option on top of draft-ahead): the device sends the next round as soon as it has
drafted it, before this round's answer; the cloud verifies it only if this round was a lookahead hit. After
a hit the next answer then comes (1 + K) draft steps after this one instead of a whole round later, so the
expected time per round is  h ((1 + K) t_draft + e) + (1 - h) T_round(K),  h = P(lookahead hit | K), where e is
how much later than that the pipelined answers were seen to come (the cloud verifies the two rounds one
after the other; learned online, 0 at first). On a miss the round sent behind this one is refused: its
radio energy, (1 - h) (t_up P_tx + t_down P_rx) at this round's size, counts in J/token.

Token trees (a device option; `flexspec_serve.tree`): each round also sends every draft step's
runner-up beside its token (`second`: 2K nodes, no extra draft step), and with `branches` each runner-up's
continuation. The estimator then learns how deep the tree's accepted path goes at each position,
and the round's cost counts the tree's verified positions and the nodes' ids and parents uplink. K stops
where the tree would not fit the server's node limit.

A lookahead hit needs all K accepted (the depth rates above) and then the guess right, on the chain: the
estimator learns that second part from the hits it sees (`guess_rate`), starting from position K+1's
alpha, which is what it is for greedy chains. Sampling sessions guess right far less often (the cloud draws
its token from p; the guesses are q's likeliest), and a tree's path can reach depth K through a branch.

Everything above is chosen subject to the expected energy per generated token staying within the device's budget; alpha is an
online estimate per (device, target version): Beta posteriors with exponential forgetting, pooled and
per draft position (acceptance is bursty), so it follows a target that changes under the device. If no K meets the budget it takes the cheapest K.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

from flexspec_serve.ahead import Ahead
from flexspec_serve.edge.devices import CloudProfile, DeviceProfile
from flexspec_serve.engine.stats import expected_acceptance_length as expected_tau  # noqa: F401 (re-export)
from flexspec_serve.tree import MAX_NODES, Tree, tree_nodes


@dataclass(frozen=True)
class RoundView:
    """What the device knows when it chooses K (predictions from its own observations)."""

    up_ms: float  # predicted uplink latency of a round message (excluding its serialisation)
    down_ms: float  # predicted downlink delivery time of the answer
    prefill_ms: float = 0.0  # draft prefill still on the critical path if this round drafts
    up_ms_per_byte: float = 0.0  # from the reported uplink rate
    bytes_per_draft_token: float = 1.5  # compact encoding: ids bit-packed (11 bits at a 2048 vocabulary)
    round_overhead_bytes: float = 24.0
    predrafted: int = 0  # draft-ahead: this round's first tokens are already drafted (after a lookahead hit)

    def up_total_ms(self, k: int) -> float:
        return self.up_ms + self.up_ms_per_byte * (self.round_overhead_bytes + self.bytes_per_draft_token * k)


class AcceptanceEstimator:
    """Online acceptance estimate with exponential forgetting (`decay` per round).

    Pooled: a Beta(a, b) posterior on the per-token acceptance rate alpha. Per draft position i: the
    rate at which position i is accepted given that positions before it were (real acceptance is bursty:
    a draft that got the first tokens right tends to get the next ones right too), shrunk toward the
    pooled alpha with `strength` pseudo-rounds. E[tau | K] = 1 + sum_j prod_{i<=j} alpha_i. Those products
    and sums are tabulated once per update (the controller asks for them for every K of every plan).
    """

    def __init__(self, prior_a: float = 3.0, prior_b: float = 2.0, decay: float = 0.97, k_max: int = 16,
                 strength: float = 4.0):
        self.a0, self.b0, self.decay, self.strength = prior_a, prior_b, decay, strength
        self.s = self.f = 0.0  # discounted successes / failures (pooled)
        self.reached = [0.0] * k_max  # discounted rounds in which position i was drafted after i accepted drafts
        self.kept = [0.0] * k_max  # ... and position i was accepted
        self.guessed = 0.0  # discounted rounds that accepted all K while the draft's guess d_{K+1} was drafted
        self.guessed_right = 0.0  # ... and were lookahead hits
        self._tables: tuple[list[float], list[float]] | None = None  # (p_all, expected_tau) by n, until an update

    def update(self, k: int, accepted: int, hit: bool | None = None) -> None:
        """One round's outcome; `hit`: whether it was a lookahead hit (None: no guess was drafted)."""
        if k == 0:
            return
        self._tables = None
        self.s = self.decay * self.s + accepted
        self.f = self.decay * self.f + (1 if accepted < k else 0)
        for i in range(len(self.reached)):
            self.reached[i] *= self.decay
            self.kept[i] *= self.decay
        for i in range(min(k, accepted + 1, len(self.reached))):
            self.reached[i] += 1
            self.kept[i] += i < accepted
        self.guessed *= self.decay
        self.guessed_right *= self.decay
        if hit is not None and accepted == k:
            self.guessed += 1
            self.guessed_right += bool(hit)

    @property
    def alpha(self) -> float:
        return (self.a0 + self.s) / (self.a0 + self.b0 + self.s + self.f)

    def position_alpha(self, i: int) -> float:
        if i >= len(self.reached):
            return self.alpha
        return (self.kept[i] + self.strength * self.alpha) / (self.reached[i] + self.strength)

    def _tabulated(self) -> tuple[list[float], list[float]]:
        """P(the first n positions all accepted) and E[tau | K = n], for n = 0 .. the positions kept apart."""
        if self._tables is None:
            p_all, tau = [1.0], [1.0]
            for i in range(len(self.reached)):
                p_all.append(p_all[-1] * self.position_alpha(i))
                tau.append(tau[-1] + p_all[-1])
            self._tables = p_all, tau
        return self._tables

    def p_all(self, n: int) -> float:
        """Probability that the first n draft positions are all accepted."""
        p_all = self._tabulated()[0]
        last = len(p_all) - 1  # positions past it share the pooled alpha
        return p_all[n] if n <= last else p_all[last] * self.alpha ** (n - last)

    def guess_rate(self, k: int) -> float:
        """P(lookahead hit | all K accepted), learned from the rounds that drafted a guess, shrunk toward the
        acceptance rate of the position after d_K (which it is for a greedy chain; a second guess raises it,
        which it learns). It is lower when sampling (the cloud draws its token from p) and for token trees (a
        path through a branch reaches depth K off the chain)."""
        return (self.guessed_right + self.strength * self.position_alpha(k)) / (self.guessed + self.strength)

    def p_hit(self, k: int) -> float:
        """Probability that a K-token round is a lookahead hit."""
        return self.p_all(k) * self.guess_rate(k)

    def expected_tau(self, k: int) -> float:
        tau = self._tabulated()[1]
        last = len(tau) - 1
        return tau[k] if k <= last else tau[last] + sum(self.p_all(n) for n in range(last + 1, k + 1))

    def reset(self) -> None:
        self._tables = None
        self.s = self.f = 0.0
        self.reached = [0.0] * len(self.reached)
        self.kept = [0.0] * len(self.kept)
        self.guessed = self.guessed_right = 0.0


class KCosts(NamedTuple):
    """A K-token round's times and hit chance, the same whether or not it drafts ahead."""

    k: int
    up_ms: float  # uplink of the round message, serialisation included
    verify_ms: float  # the cloud's pass over its nodes
    wait_ms: float  # from sending to the answer: up + verify + down
    p_hit: float  # P(lookahead hit | K)


class RoundPlan(NamedTuple):
    """What the controller's model expects of a K-token round (drafting ahead or not): one row of `plan`."""

    k: int
    tokens_per_s: float
    j_per_token: float
    ahead: bool  # the device drafts ahead during the wait
    tokens: float  # E[tau]: tokens the round adds
    round_ms: float  # time_ms less the draft time its pre-draft is expected to save the next round: goodput's divisor
    time_ms: float  # E[this round's own time]: its draft steps not predrafted (and unhidden prefill), and its wait


@dataclass
class Policy:
    name: str = "policy"
    ahead_now: bool = True  # may a device that can draft ahead do so this round (the adaptive controller decides)
    expected: RoundPlan | None = None  # the plan of the round just chosen (None: the policy has no model of it)

    def choose(self, view: RoundView) -> int:
        raise NotImplementedError

    def observe(self, k: int, accepted: int, hit: bool | None = None) -> None:
        """A K-token round's outcome; `hit`: whether it was a lookahead hit (None: no guess was drafted)."""

    def observe_pipelined(self, k: int, round_ms: float) -> None:
        """A pipelined K-token round's answer came `round_ms` after the previous round's."""


@dataclass
class FixedK(Policy):
    k: int = 4

    def __post_init__(self):
        self.name = f"fixed-{self.k}"

    def choose(self, view: RoundView) -> int:
        return self.k


@dataclass
class CloudOnly(Policy):
    name: str = "cloud-only"

    def choose(self, view: RoundView) -> int:
        return 0


@dataclass
class AcceptanceAdaptive(Policy):
    """+2 after a fully accepted round, -1 after a rejection (channel-blind)."""

    k_max: int = 8
    k: int = 4
    name: str = "accept-adaptive"

    def choose(self, view: RoundView) -> int:
        return self.k

    def observe(self, k: int, accepted: int, hit: bool | None = None) -> None:
        self.k = min(self.k_max, self.k + 2) if accepted == k else max(1, self.k - 1)


class FlexSpecController(Policy):
    def __init__(self, device: DeviceProfile, cloud: CloudProfile, k_max: int = 8,
                 estimator: AcceptanceEstimator | None = None, ahead: Ahead = Ahead.OFF, tree: Tree = Tree.CHAIN,
                 max_nodes: int = MAX_NODES):
        self.name = "adaptive"
        self.device, self.cloud, self.k_max = device, cloud, k_max
        self.ahead = Ahead(ahead)  # what the device does while a round waits
        self.tree, self.max_nodes = Tree(tree), max_nodes  # the shape of a round's draft, and the server's node limit
        self.pipe_extra_ms = 0.0  # e: a pipelined answer's delay past its draft steps (EMA)
        self.estimator = estimator or AcceptanceEstimator()

    def draft_steps(self, k: int, view: RoundView) -> int:
        """Draft steps this round still has to run (the predrafted ones are done)."""
        return max(0, k - view.predrafted)

    def draft_ms(self, k: int, view: RoundView) -> float:
        if not k:
            return 0.0
        prefill = 0.0 if view.predrafted else view.prefill_ms  # a hit's pre-draft already fed the context
        return prefill + self.device.draft_ms(self.draft_steps(k, view))

    def nodes(self, k: int) -> int:
        """Draft tokens a K-step round sends and the cloud verifies (a token tree's nodes)."""
        return tree_nodes(k, self.tree, self.max_nodes)

    def up_ms(self, k: int, view: RoundView) -> float:
        if not (self.tree.siblings and k):
            return view.up_total_ms(k)
        n = self.nodes(k)
        return view.up_total_ms(n) + view.up_ms_per_byte * n  # ids, and a parent byte each

    def verify_ms(self, k: int) -> float:
        return self.cloud.verify_ms(self.nodes(k))

    def wait_ms(self, k: int, view: RoundView) -> float:
        return self.costs(k, view).wait_ms

    def costs(self, k: int, view: RoundView) -> KCosts:
        """What a K-token round costs whether or not it drafts ahead (a plan's two rows for K share it)."""
        up_ms, verify_ms = self.up_ms(k, view), self.verify_ms(k)
        return KCosts(k, up_ms, verify_ms, up_ms + verify_ms + view.down_ms, self.estimator.p_hit(k))

    def drafts_ahead(self, ahead: bool | None = None) -> bool:
        """Whether a round drafts ahead: `ahead` when given, else whenever the device can."""
        return self.ahead.drafts if ahead is None else ahead

    def pipelines(self, k: int, ahead: bool | None = None) -> bool:
        """A pipelining device's K-token round that drafts ahead: the next round may go out behind it."""
        return bool(self.ahead.sends and self.drafts_ahead(ahead) and k)

    def sends_ahead(self, k: int, view: RoundView, ahead: bool | None = None) -> bool:
        """A pipelining device sends the next round before this one's answer: its 1 + K draft steps fit in
        the wait (the emulator and the fleet send it then, hit or miss)."""
        return self._sends_ahead(self.costs(k, view), ahead)

    def _sends_ahead(self, c: KCosts, ahead: bool | None) -> bool:
        return self.pipelines(c.k, ahead) and self.device.draft_ms(1 + c.k) < c.wait_ms

    def ahead_steps(self, k: int, view: RoundView, ahead: bool | None = None) -> int:
        return self._ahead_steps(self.costs(k, view), ahead)

    def _ahead_steps(self, c: KCosts, ahead: bool | None) -> int:
        return self.device.ahead_steps(c.k, c.wait_ms) if self.drafts_ahead(ahead) else 0

    def round_ms(self, k: int, view: RoundView, ahead: bool | None = None) -> float:
        """Expected critical-path time of a K-token round, less the draft time its pre-draft is expected to
        save the next round (with `ahead`; default: whenever the device can draft ahead). A pipelining
        device's next answer follows a hit by the 1 + K steps that drafted that round."""
        c = self.costs(k, view)
        return self._round_ms(c, self.draft_ms(k, view) + c.wait_ms, ahead)

    def _round_ms(self, c: KCosts, fresh: float, ahead: bool | None) -> float:
        """`round_ms` from the K's costs and its `fresh` time (its draft steps not predrafted, and its wait)."""
        if self.pipelines(c.k, ahead):  # the min() below is `sends_ahead`'s fit test
            return c.p_hit * min(fresh, self.device.draft_ms(1 + c.k) + self.pipe_extra_ms) + (1 - c.p_hit) * fresh
        saved_steps = max(0, min(c.k, self._ahead_steps(c, ahead) - 1))
        return fresh - (c.p_hit * self.device.draft_ms(saved_steps) if saved_steps else 0.0)

    def round_j(self, k: int, view: RoundView, ahead: bool | None = None) -> float:
        """Expected device energy of a K-token round: its draft work (the pre-draft's too, hit or miss), its
        radio time, idling through the verification, and for a pipelining device the round it sends behind
        this one (when it can draft it before the answer), which the cloud refuses on a miss (its radio time is
        spent for nothing)."""
        return self._round_j(self.costs(k, view), view, ahead)

    def _round_j(self, c: KCosts, view: RoundView, ahead: bool | None) -> float:
        d = self.device
        compute_ms = d.draft_ms(self.draft_steps(c.k, view) + self._ahead_steps(c, ahead))
        radio_mj = c.up_ms * d.tx_w + view.down_ms * d.rx_w
        refused_mj = (1 - c.p_hit) * radio_mj if self._sends_ahead(c, ahead) else 0.0
        return (compute_ms * d.compute_w + radio_mj + refused_mj + c.verify_ms * d.idle_w) / 1e3

    def plan(self, view: RoundView) -> list[RoundPlan]:
        """A row for every K, with and without drafting ahead when the device can."""
        return self._plan(self._all_costs(view), view)

    def _all_costs(self, view: RoundView) -> list[KCosts]:
        """`costs` for every K the server's node limit allows (none of it depends on the prefill)."""
        costs = []
        for k in range(self.k_max + 1):
            if self.nodes(k) > self.max_nodes:
                break
            costs.append(self.costs(k, view))
        return costs

    def _plan(self, costs: list[KCosts], view: RoundView) -> list[RoundPlan]:
        rows = []
        fresh = [self.draft_ms(c.k, view) + c.wait_ms for c in costs]  # each K's own time, either way
        for ahead in ((False, True) if self.ahead.drafts else (False,)):
            for c, time_ms in zip(costs, fresh):
                tau, round_ms = self.estimator.expected_tau(c.k), self._round_ms(c, time_ms, ahead)
                rows.append(RoundPlan(c.k, tau / round_ms * 1e3, self._round_j(c, view, ahead) / tau,
                                      ahead and c.k > 0, tau, round_ms, time_ms))
        return rows

    def choose(self, view: RoundView) -> int:
        """The fastest (K, draft ahead or not) within the energy budget, else the most frugal; while draft
        prefill is pending, the lowest overrun within the budget (module docstring, Prefill). The draft-ahead
        half of the choice is left in `ahead_now`."""
        costs = self._all_costs(view)
        rows = self._plan(costs, view)
        budget = self.device.energy_budget_j_per_token
        feasible = [r for r in rows if r.j_per_token <= budget]
        if not feasible:
            best = min(rows, key=lambda r: r.j_per_token)
        elif view.prefill_ms > 0 and not view.predrafted:  # prefill pending: rank by overrun
            steady = max(r.tokens_per_s for r in self._plan(costs, replace(view, prefill_ms=0.0))
                         if r.j_per_token <= budget)
            best = min(feasible, key=lambda r: self.overrun_ms(r, view.prefill_ms, steady))
        else:
            best = max(feasible, key=lambda r: r.tokens_per_s)
        self.expected, self.ahead_now = best, best.ahead
        return best.k

    @staticmethod
    def overrun_ms(row: RoundPlan, prefill_ms: float, steady_tokens_per_s: float) -> float:
        """How much longer than steady rounds (`steady_tokens_per_s`) the planned round takes for its tokens,
        counting the prefill a cloud-only round leaves to the next (module docstring, Prefill)."""
        left_ms = max(0.0, prefill_ms - row.round_ms) if row.k == 0 else 0.0
        return row.round_ms + left_ms - row.tokens / steady_tokens_per_s * 1e3

    def observe(self, k: int, accepted: int, hit: bool | None = None) -> None:
        self.estimator.update(k, accepted, hit)

    def observe_pipelined(self, k: int, round_ms: float, smoothing: float = 0.2) -> None:
        extra = max(0.0, round_ms - self.device.draft_ms(1 + k))
        self.pipe_extra_ms += smoothing * (extra - self.pipe_extra_ms)


def make_policy(name: str, device: DeviceProfile, cloud: CloudProfile, k_max: int = 8,
                ahead: Ahead = Ahead.OFF, tree: Tree = Tree.CHAIN) -> Policy:
    """`ahead` and `tree` tell the adaptive controller what the device does (the others ignore them)."""
    if name == "adaptive":
        return FlexSpecController(device, cloud, k_max, ahead=ahead, tree=tree)
    if name == "cloud-only":
        return CloudOnly()
    if name == "accept-adaptive":
        return AcceptanceAdaptive(k_max=k_max)
    if name.startswith("fixed-") and name[6:].isdigit():
        return FixedK(k=min(int(name[6:]), k_max))
    raise ValueError(f"unknown policy {name!r}; use adaptive, cloud-only, accept-adaptive or fixed-K")
