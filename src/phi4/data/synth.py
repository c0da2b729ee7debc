"""Textbook-style arithmetic word problems with worked solutions and exact answers.

Deterministic for a seed. Each problem carries its integer answer, so the same generator feeds
the embedded default's corpus now and serves as a checkable task (Pivotal Token Search) later.
The kinds, each with its own wording and solution steps:
- consecutive even numbers with a given sum (docs/model.md, "Synthetic seed example": five of
  them sum to 90),
- the perimeter and area of a rectangle,
- distance from speed and time, over two legs of a trip,
- a price after a percentage discount,
- the sum of an arithmetic sequence,
- an age puzzle with a ratio,
- small sums (not in the default mix: the tiny post-training chain's checkable task).

Held-out split: a problem belongs to the test split when a hash of its question falls in the
lowest TEST_PERCENT of 100 buckets, whatever seed or count drew it. Training corpora drawn with
split="train" and evaluation sets with split="test" therefore never share a question, and a test
set can also be given kinds that the training corpus leaves out.
"""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

NAMES = ["Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena"]


@dataclass(frozen=True)
class Problem:
    kind: str
    question: str
    solution: str
    answer: int

    def text(self) -> str:
        """The problem as a pre-training document."""
        return f"Problem: {self.question}\nSolution: {self.solution}\nAnswer: {self.answer}"


def _consecutive_evens(rng: random.Random) -> Problem:
    n = rng.choice([3, 4, 5, 6])
    first = 2 * rng.randint(1, 40)
    numbers = [first + 2 * i for i in range(n)]
    total = sum(numbers)
    middle_sum = n * (n - 1)  # 2 + 4 + ... over the offsets 0, 2, ..., 2(n-1)
    return Problem(
        "consecutive_evens",
        f"The sum of {n} consecutive even numbers is {total}. What is the largest of them?",
        f"Call the smallest number x. The numbers are x, x + 2, ..., x + {2 * (n - 1)}, so their sum is "
        f"{n}x + {middle_sum} = {total}. Then {n}x = {total - middle_sum} and x = {first}. "
        f"The numbers are {', '.join(map(str, numbers))}, and the largest is {numbers[-1]}.",
        numbers[-1],
    )


def _rectangle(rng: random.Random) -> Problem:
    width = rng.randint(2, 30)
    length = width + rng.randint(1, 20)
    perimeter = 2 * (width + length)
    return Problem(
        "rectangle",
        f"A rectangle is {length - width} cm longer than it is wide, and its perimeter is {perimeter} cm. "
        "What is its area in square centimetres?",
        f"Let the width be w. The length is w + {length - width}, so the perimeter is "
        f"2(w + w + {length - width}) = 4w + {2 * (length - width)} = {perimeter}. Then 4w = {4 * width} "
        f"and w = {width}, so the length is {length}. The area is {width} x {length} = {width * length}.",
        width * length,
    )


def _trip(rng: random.Random) -> Problem:
    name = rng.choice(NAMES)
    s1, t1, s2, t2 = rng.randint(20, 90), rng.randint(1, 5), rng.randint(20, 90), rng.randint(1, 5)
    d1, d2 = s1 * t1, s2 * t2
    return Problem(
        "trip",
        f"{name} drives for {t1} hours at {s1} km/h, then for {t2} hours at {s2} km/h. "
        "How many kilometres does the trip cover?",
        f"Distance is speed times time. The first part covers {s1} x {t1} = {d1} km and the second "
        f"{s2} x {t2} = {d2} km. Together that is {d1} + {d2} = {d1 + d2} km.",
        d1 + d2,
    )


def _discount(rng: random.Random) -> Problem:
    percent = rng.choice([10, 20, 25, 30, 40, 50, 60, 75])
    price = rng.randint(1, 40) * 20  # a multiple of 20 makes every discount a whole number
    off = price * percent // 100
    item = rng.choice(["jacket", "bicycle", "lamp", "chair", "backpack"])
    return Problem(
        "discount",
        f"A {item} costs {price} dollars. In a sale its price is cut by {percent}%. What does it cost in the sale?",
        f"{percent}% of {price} is {price} x {percent} / 100 = {off}. The sale price is {price} - {off} = {price - off} dollars.",
        price - off,
    )


def _sequence(rng: random.Random) -> Problem:
    first, step, n = rng.randint(1, 20), rng.randint(1, 9), rng.randint(5, 20)
    last = first + (n - 1) * step
    total = n * (first + last) // 2
    return Problem(
        "sequence",
        f"What is the sum of the first {n} terms of the sequence {first}, {first + step}, {first + 2 * step}, ...?",
        f"Each term is {step} more than the one before, so term {n} is {first} + {n - 1} x {step} = {last}. "
        f"The sum of an arithmetic sequence is the number of terms times the average of the first and last: "
        f"{n} x ({first} + {last}) / 2 = {total}.",
        total,
    )


def _ages(rng: random.Random) -> Problem:
    a, b = rng.sample(NAMES, 2)
    child = rng.randint(3, 15)
    ratio = rng.randint(2, 5)
    years = rng.randint(2, 10)
    parent = ratio * child
    return Problem(
        "ages",
        f"{a} is {ratio} times as old as {b}. In {years} years their ages will add up to {parent + child + 2 * years}. "
        f"How old is {a} now?",
        f"Let {b}'s age be y, so {a} is {ratio}y. In {years} years the ages add up to "
        f"{ratio}y + y + {2 * years} = {parent + child + 2 * years}, so {ratio + 1}y = {parent + child} and y = {child}. "
        f"{a} is {ratio} x {child} = {parent}.",
        parent,
    )


def _small_sum(rng: random.Random) -> Problem:
    """The sum of two numbers from 0 to 4: easy enough that the tiny CPU model solves some of it
    after a minute of SFT, which the post-training chain's tests need (0 < p(success) < 1)."""
    a, b = rng.randint(0, 4), rng.randint(0, 4)
    return Problem("small_sum", f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", a + b)


KINDS: dict[str, Callable[[random.Random], Problem]] = {
    "consecutive_evens": _consecutive_evens,
    "rectangle": _rectangle,
    "trip": _trip,
    "discount": _discount,
    "sequence": _sequence,
    "ages": _ages,
    "small_sum": _small_sum,
}
WORD_PROBLEMS = tuple(k for k in KINDS if k != "small_sum")  # the default mix (the pre-training corpus)
SPLITS = ("all", "train", "test")
TEST_PERCENT = 10


def split_of(problem: Problem) -> str:
    """"test" or "train": fixed by the question alone."""
    return "test" if zlib.crc32(problem.question.encode()) % 100 < TEST_PERCENT else "train"


def generate(count: int, seed: int = 0, kinds: Sequence[str] = WORD_PROBLEMS, split: str = "all") -> Iterator[Problem]:
    """`count` problems, kinds taken in turn, numbers drawn from a generator seeded by `seed`; with
    split "train" or "test", only problems of that split (draws of the other are skipped)."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"problem kinds {list(kinds)}: valid kinds are {', '.join(KINDS)}")
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; valid: {', '.join(SPLITS)}")
    rng = random.Random(seed)
    makers = [KINDS[k] for k in kinds]
    for i in range(count):
        problem = makers[i % len(makers)](rng)
        for _ in range(1000 * 100 // TEST_PERCENT):
            if split in ("all", split_of(problem)):
                break
            problem = makers[i % len(makers)](rng)
        else:  # a kind with too few distinct questions to have any in this split
            raise ValueError(f"problem kind {problem.kind!r} has no questions in the {split} split")
        yield problem


def chat_record(problem: Problem) -> dict:
    """The problem as an SFT conversation whose answer a checker can read (`Answer: N`)."""
    return {"messages": [{"role": "user", "content": problem.question},
                         {"role": "assistant", "content": f"{problem.solution}\nAnswer: {problem.answer}"}],
            "kind": problem.kind, "question": problem.question, "answer": problem.answer}


def write_synthetic_jsonl(path: Path, count: int, seed: int, kinds: Sequence[str] = WORD_PROBLEMS,
                          chat: bool = False, split: str = "all") -> int:
    """`count` arithmetic problems as JSONL: the document text (or, with `chat`, the conversation),
    and the question and answer separately for checkers (Pivotal Token Search, evaluation)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with partial.open("w") as f:
            for i, p in enumerate(generate(count, seed, kinds, split)):
                record = chat_record(p) if chat else {"text": p.text(), "kind": p.kind, "question": p.question,
                                                      "answer": p.answer}
                f.write(json.dumps({"id": i, **record}) + "\n")
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(path)
    return count
