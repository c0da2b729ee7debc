"""Checkers: is a model's response to a problem right? Each is `(problem record, response) -> bool`.

- `number`: the final answer is the problem's `answer` as a number ("1,000", "0.5", "3/4", "-2"
  compare by value). The final answer is what follows the response's last `Answer:`, else the
  response's last number.
- `string`: the final answer (after the last `Answer:`, else the whole response), stripped of
  surrounding whitespace, is exactly the problem's `answer`.
- `arithmetic`: the synthetic problems' strict form: the last `Answer: N` is the integer answer
  (Pivotal Token Search's default).
- any function, given as "package.module:function".
"""

from __future__ import annotations

import importlib
import re
from fractions import Fraction
from typing import Callable

from phi4.errors import ConfigError

Checker = Callable[[dict, str], bool]  # (problem record, decoded response) -> correct?

# An integer that is not the start of a longer number or a decimal ("Answer: 42.5" is not 42).
_ANSWER_INT = re.compile(r"Answer:\s*(-?\d+)(?!\d|\.\d)")
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")


def arithmetic_checker(problem: dict, response: str) -> bool:
    """Right iff the response's last `Answer: N` is the problem's integer answer (a model that
    corrects itself is judged by what it says last)."""
    answers = _ANSWER_INT.findall(response)
    return bool(answers) and int(answers[-1]) == int(problem["answer"])


def final_answer(response: str) -> str | None:
    """The text after the last `Answer:`, to the end of its line; None when there is none."""
    at = response.rfind("Answer:")
    return None if at < 0 else response[at + len("Answer:"):].split("\n", 1)[0]


def _value(text) -> Fraction | None:
    try:
        return Fraction(str(text).strip().replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def number_checker(problem: dict, response: str) -> bool:
    answer = final_answer(response)
    numbers = _NUMBER.findall(response if answer is None else answer)
    if not numbers:
        return False
    got = _value(numbers[-1] if answer is None else numbers[0])
    return got is not None and got == _value(problem["answer"])


def string_checker(problem: dict, response: str) -> bool:
    answer = final_answer(response)
    return (response if answer is None else answer).strip() == str(problem["answer"]).strip()


CHECKERS: dict[str, Checker] = {"number": number_checker, "string": string_checker,
                                "arithmetic": arithmetic_checker}


def load_checker(name: str, setting: str = "checker") -> Checker:
    """A checker by name, or any function given as "package.module:function"; `setting` names
    where it was configured, for the error."""
    if name in CHECKERS:
        return CHECKERS[name]
    valid = f"valid: {', '.join(map(repr, CHECKERS))} or 'package.module:function'"
    module_name, _, attr = str(name).partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{setting}={name!r} is not a known checker; {valid}")
    try:
        checker = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{setting}={name!r} cannot be imported ({e}); {valid}") from e
    if not callable(checker):
        raise ConfigError(f"{setting}={name!r} is not a function; {valid}")
    return checker
