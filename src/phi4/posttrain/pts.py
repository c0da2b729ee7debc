"""Pivotal Token Search (docs/model.md, "Pivotal Token Search"): find the single tokens of a
solution that move the chance of a correct answer most, and turn each into a one-token DPO pair.
Model-agnostic: a model enters only through `PolicyModel`, an answer's correctness only through a
`Checker`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Protocol, Sequence

from phi4.errors import ConfigError
from phi4.eval.checkers import Checker, arithmetic_checker, load_checker  # noqa: F401 (PTS's checkers)


class PolicyModel(Protocol):
    def sample(self, prefix_ids: list[int], n: int) -> list[list[int]]:
        """n completions: the token ids after the prefix, ending with eos when the model emitted it."""
        ...

    def token_logprobs(self, prefix_ids: list[int], tokens: list[int]) -> list[float]:
        """log p of each token given the prefix and the tokens before it."""
        ...


Decode = Callable[[list[int]], str]


@dataclass(frozen=True)
class PTSSettings:
    """The search's settings (`pts.*` in the Hydra config). max_new_tokens, temperature, top_p and
    seed are for the model's sampler (generate.MegatronPolicy); the search itself reads the others."""

    samples: int = 16  # rollouts per p estimate; 16 keeps every p a multiple of 1/16
    p_gap: float = 0.2  # not given in the report (docs/model.md, "Pivotal Token Search")
    p_min: float = 0.2
    p_max: float = 0.8
    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.samples < 1:
            raise ConfigError(f"pts.samples={self.samples} must be at least 1")
        if not 0 < self.p_gap <= 1:
            raise ConfigError(f"pts.p_gap={self.p_gap} must be in (0, 1]")
        if not 0 <= self.p_min <= self.p_max <= 1:
            raise ConfigError(f"pts.p_min={self.p_min}, pts.p_max={self.p_max}: need 0 <= p_min <= p_max <= 1")
        if self.max_new_tokens < 1 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"pts.max_new_tokens={self.max_new_tokens}, pts.temperature={self.temperature}, "
                              f"pts.top_p={self.top_p}: need max_new_tokens >= 1, temperature >= 0, 0 < top_p <= 1")


@dataclass(frozen=True)
class Rollout:
    first_token: int | None  # None: the model ended at once
    success: bool


class SuccessEstimator:
    """p(success | prefix), the fraction of `samples` sampled completions the checker accepts,
    memoized by the exact prefix (query followed by the response so far).

    The checker sees the decoded response: the prefix's tokens after the query plus the completion.
    The completion alone would miss an answer split across the two ("Answer: 4" + "2"), and the
    query must not count (it may quote numbers, even a worked example's answer). A prefix whose
    response already ends with `eos_id` is finished: its outcome is checked, not sampled."""

    def __init__(self, model: PolicyModel, checker: Checker, problem: dict, decode: Decode, samples: int,
                 query_ids: Sequence[int], eos_id: int | None = None):
        self.model, self.checker, self.problem, self.decode = model, checker, problem, decode
        self.samples, self.query_ids, self.eos_id = samples, tuple(query_ids), eos_id
        self.model_calls = 0
        self.rollouts: dict[tuple[int, ...], list[Rollout]] = {}
        # Whole completions are kept only for the query, where the searched solution comes from;
        # deeper prefixes keep first tokens, which is all the pairs need.
        self.query_completions: list[list[int]] = []
        self._p: dict[tuple[int, ...], float] = {}

    def p(self, prefix_ids: Sequence[int]) -> float:
        key = tuple(prefix_ids)
        if key in self._p:
            return self._p[key]
        if key[: len(self.query_ids)] != self.query_ids:
            raise ValueError("a prefix for p(success) must start with the query")
        response = list(key[len(self.query_ids):])
        if response and self.eos_id is not None and response[-1] == self.eos_id:
            p = float(bool(self.checker(self.problem, self.decode(response))))
        else:
            completions = self.model.sample(list(key), self.samples)
            self.model_calls += 1
            if not completions:
                raise ValueError("the model returned no completions to estimate p(success) from")
            self.rollouts[key] = [
                Rollout(c[0] if c else None, bool(self.checker(self.problem, self.decode(response + list(c)))))
                for c in completions
            ]
            if not response:
                self.query_completions = [list(c) for c in completions]
            p = sum(r.success for r in self.rollouts[key]) / len(completions)
        self._p[key] = p
        return p


def logprob_midpoint(logprobs: Sequence[float]) -> int:
    """Where Subdivide cuts a segment of n >= 2 tokens: how many tokens go left.

    The smallest k in 1..n-1 whose first k tokens carry at least half the segment's surprisal
    (-log p, summed); n-1 if only the last token gets there; n // 2 if the segment has no surprisal
    (every token certain, nothing to weigh by). Cutting by surprisal rather than by count puts the
    cut where the model was unsure, where the tokens that decide the outcome are likely to be."""
    n = len(logprobs)
    if n < 2:
        raise ValueError("only a segment of two or more tokens can be cut")
    surprisal = [max(0.0, -lp) for lp in logprobs]
    total = sum(surprisal)
    if total == 0:
        return n // 2
    running = 0.0
    for k in range(1, n):
        running += surprisal[k - 1]
        if running >= total / 2:
            return k
    return n - 1


def subdivide(estimator: SuccessEstimator, prefix: Sequence[int], segment: Sequence[int],
              p_gap: float) -> list[tuple[list[int], list[int]]]:
    """Subdivide (docs/model.md, "Pivotal Token Search"): (prefix, segment) pieces in order. A
    segment is kept whole if it has at most one token or moves p by less than p_gap; otherwise it is
    cut at `logprob_midpoint` and its left half searched with the same prefix, its right half with
    prefix + left.
    An explicit stack, not recursion: a lopsided cut on a long solution is as deep as it is long."""
    prefix, segment = list(prefix), list(segment)
    pieces: list[tuple[int, int]] = []
    stack = [(0, len(segment))]  # [start, end) of segment; the piece's prefix is prefix + segment[:start]
    while stack:
        start, end = stack.pop()
        before = prefix + segment[:start]
        if end - start <= 1 or abs(estimator.p(before) - estimator.p(before + segment[start:end])) < p_gap:
            pieces.append((start, end))
            continue
        cut = start + logprob_midpoint(estimator.model.token_logprobs(before, segment[start:end]))
        stack.append((cut, end))
        stack.append((start, cut))  # popped first: pieces come out left to right
    return [(prefix + segment[:start], segment[start:end]) for start, end in pieces]


@dataclass(frozen=True)
class PivotalToken:
    prefix: list[int]  # the response before the token (after the query)
    token: int
    p_before: float
    p_after: float


def find_pivotal_tokens(estimator: SuccessEstimator, query_ids: Sequence[int], solution_ids: Sequence[int],
                        p_gap: float) -> list[PivotalToken]:
    """The single-token pieces of Subdivide(query, solution) that move p by at least p_gap."""
    pivotal = []
    for prefix, segment in subdivide(estimator, query_ids, solution_ids, p_gap):
        if len(segment) == 1:
            before, after = estimator.p(prefix), estimator.p(prefix + segment)
            if abs(after - before) >= p_gap:
                pivotal.append(PivotalToken(prefix[len(query_ids):], segment[0], before, after))
    return pivotal


def pivotal_pair(estimator: SuccessEstimator, query_ids: Sequence[int], pivot: PivotalToken,
                 problem_id) -> dict | None:
    """A one-token DPO pair for a pivotal token t after prefix P, from the rollouts already drawn
    from P. Each other first token c of those rollouts is an alternative, worth the success rate
    of the rollouts that began with c. If t raises p, it is chosen against the alternative with
    the lowest rate, provided that rate is below p(P); if t lowers p, it is rejected in favour of
    the alternative with the highest rate, provided that is above p(P). Ties go to the alternative
    seen most often (the steadier rate), then the smaller id. None if no alternative qualifies."""
    prompt = list(query_ids) + pivot.prefix
    outcomes: dict[int, list[bool]] = {}
    for rollout in estimator.rollouts.get(tuple(prompt), []):
        if rollout.first_token is not None and rollout.first_token != pivot.token:
            outcomes.setdefault(rollout.first_token, []).append(rollout.success)
    raises = pivot.p_after > pivot.p_before
    sign = 1 if raises else -1  # rank alternatives worst-first when t raises p, best-first when it lowers it
    ranked = sorted((sign * sum(o) / len(o), -len(o), token) for token, o in outcomes.items())
    if not ranked:
        return None
    key, _, alternative = ranked[0]
    rate = sign * key
    if (raises and rate >= pivot.p_before) or (not raises and rate <= pivot.p_before):
        return None
    chosen, rejected = (pivot.token, alternative) if raises else (alternative, pivot.token)
    p_chosen, p_rejected = (pivot.p_after, rate) if raises else (rate, pivot.p_after)
    return {"prompt_ids": prompt, "chosen_ids": [chosen], "rejected_ids": [rejected], "source": "pts",
            "problem_id": problem_id, "p_prefix": pivot.p_before, "p_chosen": p_chosen, "p_rejected": p_rejected,
            "p_step": pivot.p_after - pivot.p_before}


def choose_solution(estimator: SuccessEstimator, p_query: float) -> list[int] | None:
    """The rollout from the query to search: the first one drawn with the rarer outcome (a failure
    when p(query) >= 0.5, else a success). Its end is as far from p(query) as a rollout's can be,
    so p must cross the widest span along it, and its pivotal tokens are the model's typical
    mistakes (when it mostly succeeds) or its rare good turns (when it mostly fails)."""
    want_success = p_query < 0.5
    query_rollouts = estimator.rollouts.get(estimator.query_ids, [])
    for completion, rollout in zip(estimator.query_completions, query_rollouts):
        if completion and rollout.success == want_success:
            return completion
    return None


def search_problem(model: PolicyModel, checker: Checker, problem: dict, query_ids: list[int], decode: Decode,
                   settings: PTSSettings, eos_id: int | None = None) -> dict:
    """One problem's search: p(query), whether it was kept (or why not), its pivotal tokens and pairs."""
    estimator = SuccessEstimator(model, checker, problem, decode, settings.samples, query_ids, eos_id)
    p_query = estimator.p(query_ids)
    result = {"problem_id": problem.get("id"), "p_query": p_query, "kept": False, "skip_reason": None,
              "solution_ids": None, "pivotal": [], "pairs": [], "unpaired": 0}
    solution = None
    if p_query < settings.p_min:
        result["skip_reason"] = f"p(query)={p_query:.4g} is below pts.p_min={settings.p_min}"
    elif p_query > settings.p_max:
        result["skip_reason"] = f"p(query)={p_query:.4g} is above pts.p_max={settings.p_max}"
    elif (solution := choose_solution(estimator, p_query)) is None:
        result["skip_reason"] = "no non-empty rollout with the rarer outcome to search"
    if solution is not None:
        result.update(kept=True, solution_ids=solution)
        for pivot in find_pivotal_tokens(estimator, query_ids, solution, settings.p_gap):
            result["pivotal"].append(asdict(pivot))
            pair = pivotal_pair(estimator, query_ids, pivot, problem.get("id"))
            if pair is None:
                result["unpaired"] += 1
            else:
                result["pairs"].append(pair)
    result["model_calls"] = estimator.model_calls
    return result
