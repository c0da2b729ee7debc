"""Pivotal Token Search against a scripted world whose p(success | prefix) is known exactly, and the
sampler it is built on against hand-computed distributions."""

import json
import math
from dataclasses import dataclass, replace

import pytest
import torch

from phi4.errors import ConfigError
from phi4.posttrain.pts import (
    PTSSettings,
    SuccessEstimator,
    arithmetic_checker,
    find_pivotal_tokens,
    pivotal_pair,
    load_checker,
    logprob_midpoint,
    search_problem,
    subdivide,
)
from phi4.posttrain.pts_run import merge_parts, part_path, run_pts


@dataclass
class LogitsPolicy:
    """A PolicyModel over a logits function (the scripted stand-in models' sampler)."""

    logits_fn: object
    eos_id: int | None
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    def sample(self, prefix_ids, n):
        return sample_tokens(self.logits_fn, prefix_ids, n, self.max_new_tokens, self.temperature, self.top_p,
                             self.eos_id, self.generator)

    def token_logprobs(self, prefix_ids, tokens):
        return token_logprobs(self.logits_fn, prefix_ids, tokens)
from helpers import sample_tokens
from phi4.eval.sampling import token_logprobs, top_p_filter

EOS, WIN, LOSE = 1, 2, 3
UP, DOWN = 1000, 2000  # UP + k / DOWN + k: first tokens, at depth k, of rollouts that all win / all lose
SOLUTION = list(range(100, 116))  # s_1..s_16
QUERY = [7, 8]


class World:
    """One query's scripted world: p(success | query + path[:k]) = p[k] exactly.

    From an on-path prefix of depth k, the `samples` rollouts are p[k] * samples wins
    [UP + k, WIN, EOS] then losses [DOWN + k, LOSE, EOS], unless `rollouts[k]` lists them. Off the
    path, the token that left it decides: after UP + j every rollout wins, otherwise it loses."""

    def __init__(self, path, p, query=QUERY, rollouts=None, logprobs=None):
        self.query, self.path, self.p = list(query), list(path), p
        self.rollouts, self.logprobs = rollouts or {}, logprobs

    def completions(self, response, n):
        k = len(response)
        if response == self.path[:k]:
            if k in self.rollouts:
                return [list(c) for c in self.rollouts[k]]
            wins = self.p[k] * n
            assert wins == int(wins), f"p[{k}]={self.p[k]} is not a multiple of 1/{n}"
            return [[UP + k, WIN, EOS]] * int(wins) + [[DOWN + k, LOSE, EOS]] * (n - int(wins))
        left_at = next(i for i, (a, b) in enumerate(zip(response, self.path + [None] * k)) if a != b)
        return [[WIN if UP <= response[left_at] < DOWN else LOSE, EOS]] * n

    def logprob(self, position):
        return self.logprobs[position] if self.logprobs else -1.0


class ScriptedModel:
    """A PolicyModel over worlds told apart by their query; it records every prefix it samples."""

    def __init__(self, *worlds):
        self.worlds = {tuple(w.query): w for w in worlds}
        self.sampled = []

    def _split(self, prefix_ids):
        world = self.worlds[tuple(prefix_ids[: len(QUERY)])]
        return world, list(prefix_ids[len(QUERY):])

    def sample(self, prefix_ids, n):
        world, response = self._split(prefix_ids)
        assert not response or response[-1] != EOS, "sampled past the end of a finished response"
        self.sampled.append(tuple(prefix_ids))
        return world.completions(response, n)

    def token_logprobs(self, prefix_ids, tokens):
        world, response = self._split(prefix_ids)
        return [world.logprob(len(response) + i) for i in range(len(tokens))]


def decode(ids):
    names = {EOS: "<eos>", WIN: "WIN", LOSE: "LOSE"}
    return " ".join(names.get(i, f"t{i}") for i in ids)


def marker_checker(problem, text):
    markers = [w for w in text.split() if w in ("WIN", "LOSE")]
    return bool(markers) and markers[-1] == "WIN"


def p_table(start, jumps, length, samples=16):
    """p[k] for k = 0..length: `start` and `jumps` {token position j (1-based): step} in 1/samples."""
    p, level = [], start
    for k in range(length + 1):
        level += jumps.get(k, 0)
        p.append(level / samples)
    return p


def estimator_for(world, samples=16, eos_id=EOS):
    model = ScriptedModel(world)
    return SuccessEstimator(model, marker_checker, {"id": "q"}, decode, samples, world.query, eos_id), model


# p rises along the solution: big steps at tokens 6 (+5/16) and 12 (+4/16 = 0.25), small ones
# (< 0.2) at 3, 9 and 14. Every step has the same sign, so any segment holding a big step moves p
# by at least that much, and Subdivide must reach it.
UP_JUMPS = {3: 1, 6: 5, 9: 1, 12: 4, 14: 3}
UP_WORLD = World(SOLUTION, p_table(2, UP_JUMPS, len(SOLUTION)))


@pytest.mark.parametrize("p_gap", [0.2, 0.25, 0.3])
def test_find_pivotal_tokens_finds_exactly_the_designed_steps(p_gap):
    estimator, _ = estimator_for(UP_WORLD)
    pivotal = find_pivotal_tokens(estimator, QUERY, SOLUTION, p_gap)
    expected = sorted(j for j, step in UP_JUMPS.items() if step / 16 >= p_gap)
    assert [len(t.prefix) + 1 for t in pivotal] == expected
    for t, j in zip(pivotal, expected):
        assert t.prefix == SOLUTION[: j - 1] and t.token == SOLUTION[j - 1]
        assert (t.p_before, t.p_after) == (UP_WORLD.p[j - 1], UP_WORLD.p[j])


def test_each_prefix_is_estimated_once():
    estimator, model = estimator_for(UP_WORLD)
    find_pivotal_tokens(estimator, QUERY, SOLUTION, 0.2)
    assert len(model.sampled) == len(set(model.sampled)) == estimator.model_calls
    # Subdivision skips the stretches where p does not move: fewer estimates than prefixes.
    assert estimator.model_calls < len(SOLUTION) + 1
    find_pivotal_tokens(estimator, QUERY, SOLUTION, 0.2)
    assert len(model.sampled) == estimator.model_calls


def test_logprob_midpoint_by_hand():
    # Surprisal 4, 0.25 x 5: total 5.25, half 2.625; the first token alone reaches it.
    assert logprob_midpoint([-4.0, -0.25, -0.25, -0.25, -0.25, -0.25]) == 1
    # Surprisal 1, 1, 4, 2: total 8, half 4; cumulative 1, 2, 6 reaches 4 at the third token.
    assert logprob_midpoint([-1.0, -1.0, -4.0, -2.0]) == 3
    # Only the last token would reach half: clamped so that the right half keeps one token.
    assert logprob_midpoint([-0.5, -0.5, -6.0]) == 2
    # Nothing to weigh by: the middle.
    assert logprob_midpoint([0.0] * 5) == 2


def test_subdivide_cuts_at_the_logprob_midpoint():
    # Six tokens, the first very surprising, and one step of p, at token 4. By hand:
    #   [s1..s6]: surprisal 4, .25 x 5 -> cut after 1: [s1] | [s2..s6] (prefix s1)
    #   [s2..s6]: .25 x 5, half .625 -> cut after 3 (cumulative .75): [s2 s3 s4] | [s5 s6]
    #   [s5 s6]: p flat -> whole.  [s2 s3 s4]: .25 x 3 -> cut after 2: [s2 s3] (flat, whole) | [s4]
    # A cut by count (3 | 3) would give [s1 s2 s3] | [s4] | [s5 s6] instead.
    path = SOLUTION[:6]
    world = World(path, p_table(4, {4: 8}, 6), logprobs=[-4.0] + [-0.25] * 5)
    estimator, _ = estimator_for(world)
    assert subdivide(estimator, QUERY, path, 0.2) == [
        (QUERY, path[:1]), (QUERY + path[:1], path[1:3]), (QUERY + path[:3], path[3:4]), (QUERY + path[:4], path[4:]),
    ]


def test_subdivide_does_not_search_a_segment_whose_steps_cancel():
    # Subdivide (docs/model.md, "Pivotal Token Search") looks at the whole segment only: +0.5 then
    # -0.5 inside it nets 0, so it stays whole.
    world = World(SOLUTION[:8], p_table(4, {2: 8, 6: -8}, 8))
    estimator, model = estimator_for(world)
    assert subdivide(estimator, QUERY, SOLUTION[:8], 0.2) == [(QUERY, SOLUTION[:8])]
    assert find_pivotal_tokens(estimator, QUERY, SOLUTION[:8], 0.2) == []
    assert len(model.sampled) == 2  # p(query) and p(query + whole segment), nothing between


class AlwaysSurprisedAtTheEnd:
    """A stand-in estimator whose p rises by 1/n per token and whose model finds the last token of
    any segment the most surprising, so every cut peels one token off: as deep as the segment is long."""

    def __init__(self, n):
        self.n = n
        self.model = self

    def p(self, prefix):
        return (len(prefix) - len(QUERY)) / self.n

    def token_logprobs(self, prefix, tokens):
        return [-1e-3] * (len(tokens) - 1) + [-10.0]


def test_subdivide_handles_a_2000_token_segment_without_recursion():
    n = 2000
    solution = list(range(10, 10 + n))
    pieces = subdivide(AlwaysSurprisedAtTheEnd(n), QUERY, solution, 1e-6)
    assert pieces == [(QUERY + solution[:i], [solution[i]]) for i in range(n)]


def char(text):
    return [ord(c) for c in text]


def decode_chars(ids):
    return "".join(map(chr, ids))


def test_checker_sees_the_response_after_the_query_and_not_the_query():
    query = char("Example: Answer: 42\nWhat is 40 + 2?\n")

    class Completes:
        def __init__(self, completion):
            self.completion = char(completion)

        def sample(self, prefix_ids, n):
            return [self.completion] * n

    problem = {"answer": 42}
    # The answer is split between the prefix ("Answer: 4") and the completion ("2").
    split = SuccessEstimator(Completes("2<|im_end|>"), arithmetic_checker, problem, decode_chars, 4, query)
    assert split.p(query + char("40 + 2 = 42. Answer: 4")) == 1.0
    # The query's "Answer: 42" must not make an answerless response right.
    no_answer = SuccessEstimator(Completes("I do not know."), arithmetic_checker, problem, decode_chars, 4, query)
    assert no_answer.p(query) == 0.0


def test_a_finished_response_is_checked_not_sampled():
    estimator, model = estimator_for(UP_WORLD)
    assert estimator.p(QUERY + [5, WIN, EOS]) == 1.0
    assert estimator.p(QUERY + [5, WIN, LOSE, EOS]) == 0.0
    assert model.sampled == [] and estimator.model_calls == 0


def test_pairs_take_the_worst_alternative_for_a_token_that_raises_p():
    path = SOLUTION + [WIN, EOS]
    world = World(path, UP_WORLD.p + [1.0, 1.0], rollouts={0: [path] * 2 + [[DOWN, LOSE, EOS]] * 14})
    result = search_problem(ScriptedModel(world), marker_checker, {"id": "up"}, QUERY, decode,
                            PTSSettings(p_min=0.1), EOS)
    assert result["kept"] and result["solution_ids"] == path  # p(query) = 2/16 < 0.5: a successful rollout
    k = 5  # token 6, the +5/16 step, after five tokens at p = 3/16
    assert result["pairs"][0] == {
        "prompt_ids": QUERY + SOLUTION[:k], "chosen_ids": [SOLUTION[k]], "rejected_ids": [DOWN + k], "source": "pts",
        "problem_id": "up", "p_prefix": 3 / 16, "p_chosen": 8 / 16, "p_rejected": 0.0, "p_step": 5 / 16,
    }
    assert [p["chosen_ids"] for p in result["pairs"]] == [[SOLUTION[5]], [SOLUTION[11]]]


def test_pairs_take_the_best_alternative_for_a_token_that_lowers_p():
    # p falls from 12/16 to 4/16 at token 2 (a mistake), by 1/16 at token 5, and to 0 at the end.
    path = SOLUTION[:6] + [LOSE, EOS]
    p = p_table(12, {2: -8, 5: -1, 7: -3}, len(path))
    world = World(path, p, rollouts={0: [path] * 4 + [[UP, WIN, EOS]] * 12})
    result = search_problem(ScriptedModel(world), marker_checker, {"id": "down"}, QUERY, decode, PTSSettings(), EOS)
    assert result["solution_ids"] == path  # p(query) = 0.75: a failed rollout
    assert [(q["prefix"], q["token"]) for q in result["pivotal"]] == [(path[:1], path[1])]  # the final -3/16 is small
    mistake = result["pairs"][0]
    assert (mistake["chosen_ids"], mistake["rejected_ids"]) == ([UP + 1], [path[1]])
    assert (mistake["p_prefix"], mistake["p_chosen"], mistake["p_rejected"]) == (0.75, 1.0, 0.25)
    assert mistake["p_step"] == -0.5


def pivot_and_pair(depth_one_rollouts):
    """The pivotal second token (p 4/8 -> 8/8) of a two-token world and its pair, with the
    rollouts drawn after the first token given (8 of them, 4 winning)."""
    world = World(SOLUTION[:2], [4 / 8, 4 / 8, 8 / 8], rollouts={1: depth_one_rollouts})
    estimator, _ = estimator_for(world, samples=8)
    (pivot,) = find_pivotal_tokens(estimator, QUERY, SOLUTION[:2], 0.2)
    assert (pivot.token, pivot.p_before, pivot.p_after) == (SOLUTION[1], 0.5, 1.0)
    return pivotal_pair(estimator, QUERY, pivot, "x")


def rollout(first, wins):
    return [first, WIN if wins else LOSE, EOS]


def test_pair_rejects_the_lowest_rate_alternative():
    a, b, c, t = 50, 51, 52, SOLUTION[1]
    # a wins 1 of 2, b 0 of 2, c 1 of 2; t's own rollouts are not alternatives.
    pair = pivot_and_pair([rollout(t, 1), rollout(t, 1), rollout(a, 1), rollout(a, 0), rollout(b, 0), rollout(b, 0),
                           rollout(c, 1), rollout(c, 0)])
    assert (pair["chosen_ids"], pair["rejected_ids"], pair["p_chosen"], pair["p_rejected"]) == ([t], [b], 1.0, 0.0)


def test_no_pair_when_no_alternative_is_below_the_prefix():
    a, c, t = 50, 52, SOLUTION[1]
    # t's rollouts lose (rate 0), but t is not its own alternative; a and c win 2 of 3 > p = 0.5.
    assert pivot_and_pair([rollout(t, 0), rollout(t, 0), rollout(a, 1), rollout(a, 0), rollout(a, 1),
                           rollout(c, 1), rollout(c, 0), rollout(c, 1)]) is None


@pytest.mark.parametrize("wins, p_min, p_max", [(w, 0.2, 0.8) for w in range(6)] + [(2, 0.5, 0.8)])
def test_queries_are_kept_only_between_p_min_and_p_max(wins, p_min, p_max):
    world = World(SOLUTION[:3], [wins / 5] * 4)
    model = ScriptedModel(world)
    result = search_problem(model, marker_checker, {"id": 0}, QUERY, decode,
                            PTSSettings(samples=5, p_min=p_min, p_max=p_max), EOS)
    assert result["p_query"] == wins / 5
    assert result["kept"] == (p_min <= wins / 5 <= p_max)
    if not result["kept"]:
        assert "pts.p_m" in result["skip_reason"] and result["model_calls"] == 1


def test_arithmetic_checker():
    problem = {"answer": 42}
    assert arithmetic_checker(problem, "6 x 7 = 42.\nAnswer: 42<|im_end|>")
    assert arithmetic_checker(problem, "Answer: 41, no wait. Answer: 42")
    assert not arithmetic_checker(problem, "Answer: 42, no wait. Answer: 41")
    assert not arithmetic_checker(problem, "Answer: 420")
    assert not arithmetic_checker(problem, "Answer: 42.5")
    assert not arithmetic_checker(problem, "6 x 7 = 42.")
    assert arithmetic_checker({"answer": -3}, "Answer: -3")


def test_load_checker():
    assert load_checker("arithmetic") is arithmetic_checker
    assert load_checker("phi4.posttrain.pts:arithmetic_checker") is arithmetic_checker
    for bad in ("regex", "phi4.nowhere:check", "phi4.posttrain.pts:nothing"):
        with pytest.raises(ConfigError, match=r"pts\.checker.*arithmetic"):
            load_checker(bad, "pts.checker")


# --- run_pts: resumable parts, merged once every rank has finished ---

def problem_worlds(count=6):
    """Problems whose queries differ, with p(query) from 0 to 1: some skipped, some with pairs."""
    worlds, problems = [], []
    for i in range(count):
        path = SOLUTION[:6] + [LOSE, EOS]
        query = [500 + i, 9]
        wins = [0, 12, 6, 16, 10, 8][i % 6]
        p = p_table(wins, {2: -min(wins, 8), 7: -(wins - min(wins, 8))}, len(path))
        worlds.append(World(path, p, query=query, rollouts={0: [path] * (16 - wins) + [[UP, WIN, EOS]] * wins}))
        problems.append({"id": f"p{i}", "query_ids": query})
    return problems, worlds


class StopsAfter(ScriptedModel):
    """Raises when it is asked about a problem beyond the first `problems`: a crash mid-run."""

    def __init__(self, problems, *worlds):
        super().__init__(*worlds)
        self.allowed, self.queries = problems, []

    def sample(self, prefix_ids, n):
        query = tuple(prefix_ids[: len(QUERY)])
        if query not in self.queries:
            if len(self.queries) == self.allowed:
                raise RuntimeError("preempted")
            self.queries.append(query)
        return super().sample(prefix_ids, n)


def run_rank(problems, model, out, rank, world_size=2, settings=PTSSettings(), progress=None):
    return run_pts(problems, model, marker_checker, lambda p: p["query_ids"], decode, settings, out, rank, world_size,
                   progress=progress, eos_id=EOS)


def test_run_pts_resumes_and_merges_to_the_uninterrupted_result(tmp_path):
    problems, worlds = problem_worlds()
    for rank in (0, 1):
        run_rank(problems, ScriptedModel(*worlds), tmp_path / "whole", rank)
    whole_pairs = merge_parts(tmp_path / "whole", tmp_path / "whole.jsonl")
    assert whole_pairs > 0

    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="preempted"):
        run_rank(problems, StopsAfter(1, *worlds), out, rank=0)
    run_rank(problems, ScriptedModel(*worlds), out, rank=1)
    with pytest.raises(ConfigError, match=r"ranks \[0\] of 2 have not finished"):
        merge_parts(out, tmp_path / "resumed.jsonl")
    part = part_path(out, 0, 2)
    assert len(part.read_text().splitlines()) == 1
    with part.open("a") as f:
        f.write('{"problem_id": "p2", "pairs": [{"prom')  # the crash cut this line short

    model, reports = StopsAfter(2, *worlds), []
    done = run_rank(problems, model, out, rank=0, progress=reports.append)
    assert model.queries == [tuple(problems[2]["query_ids"]), tuple(problems[4]["query_ids"])]
    assert [(r.done, r.total) for r in reports] == [(1, 3), (2, 3), (3, 3)]
    assert merge_parts(out, tmp_path / "resumed.jsonl") == whole_pairs
    assert (tmp_path / "resumed.jsonl").read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    lines = [json.loads(line) for line in (tmp_path / "resumed.jsonl").read_text().splitlines()]
    assert done.pairs == sum(p["problem_id"] in ("p0", "p2", "p4") for p in lines)
    # Rank 0's share: p0 (p = 0, skipped), p2 (p = 6/16) and p4 (p = 10/16), both kept.
    assert done.kept == 2 and math.isclose(done.kept_rate, 2 / 3)


def test_rerunning_a_finished_rank_does_no_work(tmp_path):
    problems, worlds = problem_worlds(2)
    run_rank(problems, ScriptedModel(*worlds), tmp_path, rank=0, world_size=1)
    before = part_path(tmp_path, 0, 1).read_bytes()
    model = ScriptedModel(*worlds)
    run_rank(problems, model, tmp_path, rank=0, world_size=1)
    assert model.sampled == [] and part_path(tmp_path, 0, 1).read_bytes() == before


def test_run_pts_refuses_other_settings_repeated_ids_and_corrupt_lines(tmp_path):
    problems, worlds = problem_worlds(4)
    run_rank(problems, ScriptedModel(*worlds), tmp_path, rank=0)
    with pytest.raises(ConfigError, match="same pts settings"):
        run_rank(problems, ScriptedModel(*worlds), tmp_path, rank=0, settings=replace(PTSSettings(), p_gap=0.3))
    with pytest.raises(ConfigError, match="distinct 'id's"):
        run_rank(problems + problems[:1], ScriptedModel(*worlds), tmp_path, rank=0)
    part = part_path(tmp_path, 0, 2)
    part.write_text("not json\n" + part.read_text())
    with pytest.raises(ConfigError, match=r"line 1 is not valid JSON"):
        run_rank(problems, ScriptedModel(*worlds), tmp_path, rank=0)


def test_merge_refuses_a_missing_part(tmp_path):
    problems, worlds = problem_worlds(3)
    run_rank(problems, ScriptedModel(*worlds), tmp_path, rank=0, world_size=3)
    run_rank(problems, ScriptedModel(*worlds), tmp_path, rank=2, world_size=3)
    with pytest.raises(ConfigError, match=r"ranks \[1\] of 3 are missing.*part-00001-of-00003"):
        merge_parts(tmp_path, tmp_path / "pairs.jsonl")
    assert not (tmp_path / "pairs.jsonl").exists()


# --- sampling ---

def test_top_p_filter_by_hand():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3], [0.3, 0.05, 0.5, 0.15]])
    logits = probs.log()
    # Sorted 0.5, 0.3, 0.15, 0.05; mass before each: 0, 0.5, 0.8, 0.95.

    def kept(top_p):
        return torch.isfinite(top_p_filter(logits, top_p))

    assert kept(0.7).tolist() == [[False, True, False, True], [True, False, True, False]]
    assert kept(0.85).tolist() == [[True, True, False, True], [True, False, True, True]]
    assert kept(0.4).tolist() == [[False, True, False, False], [False, False, True, False]]  # at least one
    assert kept(1.0).all()


def transition_logits(table):
    """A logits function whose next-token distribution depends only on the last token."""
    table = torch.as_tensor(table, dtype=torch.float)
    return lambda tokens: table[tokens]


def test_greedy_follows_the_argmax_path_and_stops_at_eos():
    vocab = 6
    nexts = {0: 3, 3: 5, 5: 2, 2: 4, 4: 1, 1: 1}  # 1 is eos
    table = torch.full((vocab, vocab), -1.0)
    for token, nxt in nexts.items():
        table[token, nxt] = 2.0
    out = sample_tokens(transition_logits(table), [0], 3, 10, 0.0, 1.0, eos_id=1, generator=None)
    assert out == [[3, 5, 2, 4, 1]] * 3
    assert sample_tokens(transition_logits(table), [0], 1, 3, 0.0, 1.0, eos_id=1) == [[3, 5, 2]]


@pytest.mark.parametrize("temperature, top_p, expected", [
    (1.0, 1.0, [0.2, 0.5, 0.3]),
    (0.5, 1.0, [0.04 / 0.38, 0.25 / 0.38, 0.09 / 0.38]),  # p^2, renormalised
    (1.0, 0.6, [0.0, 0.625, 0.375]),  # 0.5 + 0.3 reaches 0.6: 0.2 is dropped
])
def test_sampled_frequencies_match_the_distribution(temperature, top_p, expected):
    logits = torch.tensor([0.2, 0.5, 0.3]).log()
    n = 4000  # a frequency's standard error is at most 0.008; 0.03 is four of them
    out = sample_tokens(lambda t: logits.expand(*t.shape, 3), [0], n, 1, temperature, top_p, eos_id=None,
                        generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(torch.tensor([c[0] for c in out]), minlength=3) / n
    assert torch.allclose(counts, torch.tensor(expected), atol=0.03)
    if expected[0] == 0.0:
        assert counts[0] == 0


def test_sampling_stops_each_row_at_eos():
    logits = torch.tensor([0.6, 0.3, 0.1]).log()  # token 2 is eos
    out = sample_tokens(lambda t: logits.expand(*t.shape, 3), [0], 200, 25, 1.0, 1.0, eos_id=2,
                        generator=torch.Generator().manual_seed(1))
    for c in out:
        assert 2 not in c[:-1] and (c[-1] == 2 or len(c) == 25)
    assert len({len(c) for c in out}) > 5  # rows finish at different steps


def test_token_logprobs_by_hand_and_through_the_policy():
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]])
    fn = transition_logits(probs.log())
    # After prefix [0]: tokens 1, 2, 0, 1 are 0->1 (0.6), 1->2 (0.25), 2->0 (0.2), 0->1 (0.6).
    expected = [math.log(0.6), math.log(0.25), math.log(0.2), math.log(0.6)]
    assert token_logprobs(fn, [0], [1, 2, 0, 1]) == pytest.approx(expected, abs=1e-6)
    policy = LogitsPolicy(fn, eos_id=2, max_new_tokens=4, generator=torch.Generator().manual_seed(0))
    assert policy.token_logprobs([0], [1, 2, 0, 1]) == pytest.approx(expected, abs=1e-6)
    assert all(len(c) <= 4 and (len(c) == 4 or c[-1] == 2) for c in policy.sample([0], 8))


def test_search_through_a_sampled_policy_pairs_the_only_real_choice():
    # A policy with one coin flip: after the query token 0 it says 2 (then 4, a win) or 3 (then 1, a
    # loss), each with probability 1/2; every other step is certain. Whichever rollout is searched,
    # the flip is the one pivotal token, and the pair is 2 over 3 with p 1 against 0.
    eos = 5
    table = torch.full((6, 6), float("-inf"))
    table[0, 2] = table[0, 3] = 0.0
    table[2, 4] = table[4, eos] = table[3, 1] = table[1, eos] = table[eos, eos] = 0.0
    policy = LogitsPolicy(transition_logits(table), eos, max_new_tokens=8, generator=torch.Generator().manual_seed(0))
    result = search_problem(policy, lambda problem, text: "4" in text, {"id": "coin"}, [0],
                            lambda ids: " ".join(map(str, ids)), PTSSettings(samples=64), eos)
    assert result["kept"] and len(result["pivotal"]) == 1
    (pair,) = result["pairs"]
    assert (pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"]) == ([0], [2], [3])
    assert (pair["p_chosen"], pair["p_rejected"]) == (1.0, 0.0)


def test_pts_settings_are_checked_before_the_checkpoint_or_any_process_group():
    """A number out of range is the answer even when the checkpoint is missing too: the ranges
    (phi4.settings) are checked first, in one line naming the setting."""
    from hydra import compose, initialize_config_dir

    from helpers import ROOT
    from phi4.posttrain.pts_job import search

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("pts", overrides=["pts.checkpoint=/nowhere", "pts.samples=0"])
    with pytest.raises(ConfigError, match=r"^pts\.samples=0; valid: a whole number at least 1"):
        search(cfg)
