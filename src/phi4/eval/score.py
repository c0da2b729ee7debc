"""Accuracy per task with a 95% confidence interval, and pass@k.

With one sample per problem (greedy decoding) each problem is right or wrong, and the interval is
Wilson's score interval for a binomial proportion (it stays inside [0, 1] and does not collapse
at 0% or 100%, as the normal approximation does). With n samples per problem, accuracy is the
mean over problems of the fraction of right samples (pass@1), and the interval is the normal
approximation over those per-problem fractions, clipped to [0, 1]. pass@k is the unbiased
estimator of Chen et al. (2021): 1 - C(n - c, k) / C(n, k), averaged over problems.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

Z95 = 1.959963984540054  # the standard normal's 97.5th percentile


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    shrink = 1 + z * z / trials
    center = (p + z * z / (2 * trials)) / shrink
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / shrink
    return max(0.0, center - half), min(1.0, center + half)


def mean_interval(values: list[float], z: float = Z95) -> tuple[float, float]:
    """Normal-approximation interval of the mean of `values` (sample standard deviation)."""
    n = len(values)
    if n < 2:
        return 0.0, 1.0
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = z * sd / math.sqrt(n)
    return max(0.0, mean - half), min(1.0, mean + half)


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n, c of them right, is right)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


@dataclass(frozen=True)
class TaskScore:
    task: str
    problems: int
    samples: int  # per problem
    accuracy: float  # pass@1
    ci95: tuple[float, float]
    pass_at: dict[int, float] = field(default_factory=dict)

    def record(self) -> dict:
        """Flat metrics (metrics.jsonl keys, TensorBoard tags)."""
        prefix = f"eval/{self.task}"
        out = {f"{prefix}/accuracy": self.accuracy, f"{prefix}/ci95_low": self.ci95[0],
               f"{prefix}/ci95_high": self.ci95[1], f"{prefix}/problems": self.problems}
        out.update({f"{prefix}/pass@{k}": v for k, v in self.pass_at.items() if k != 1})
        return out

    def line(self) -> str:
        extra = "".join(f", pass@{k} {100 * v:.1f}%" for k, v in self.pass_at.items() if k != 1)
        sampled = f" x {self.samples} samples" if self.samples > 1 else ""
        return (f"{self.task}: accuracy {100 * self.accuracy:.1f}% (95% CI {100 * self.ci95[0]:.1f}-"
                f"{100 * self.ci95[1]:.1f}%, {self.problems} problems{sampled}){extra}")


def score_task(task: str, verdicts: list[list[bool]], pass_at: tuple[int, ...] = (1,)) -> TaskScore:
    """`verdicts[i]`: the checker's verdict on each sample of problem i."""
    if not verdicts:
        raise ValueError(f"task {task!r} has no problems to score")
    n = len(verdicts[0])
    if n < 1 or any(len(v) != n for v in verdicts):
        raise ValueError(f"task {task!r}: every problem needs the same number (>= 1) of samples")
    right = [sum(map(bool, v)) for v in verdicts]
    accuracy = sum(right) / (n * len(verdicts))
    ci = wilson_interval(sum(right), len(verdicts)) if n == 1 else mean_interval([c / n for c in right])
    ks = {k: sum(pass_at_k(n, c, k) for c in right) / len(right) for k in pass_at if k <= n}
    return TaskScore(task, len(verdicts), n, accuracy, ci, ks)
