"""Evaluation problems: JSONL files, one problem per line, rendered into prompt token ids.

A line is an object with the prompt (`prompt`, or `question` as phi4-data synth writes it), the
reference `answer`, and optionally `checker` (else the configured default), `task` (else the
file's name) and `id` (else file:line). The prompt is rendered with the template: `chat` (the
Phi-4 chat format, a user turn then the assistant's header) or any text containing `{prompt}`
(completion style, for a base model), e.g. "Problem: {prompt}\\nSolution:".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from phi4.data.chat import message_ids
from phi4.data.jsonl import checked_records
from phi4.data.tokenizer import get_tokenizer
from phi4.errors import ConfigError
from phi4.eval.checkers import CHECKERS, Checker, load_checker


@dataclass(frozen=True)
class EvalItem:
    task: str
    id: str
    record: dict  # what the checker reads
    prompt: str
    prompt_ids: list[int]
    checker: Checker


def render(template: str, prompt: str) -> list[int]:
    """The prompt's token ids under the template; the prompt's own text never becomes a special token."""
    if template == "chat":
        header, body = message_ids("user", prompt)
        return header + body + message_ids("assistant", "")[0]
    before, _, after = template.partition("{prompt}")
    tok = get_tokenizer()
    return tok.encode(before) + tok.encode(prompt, allow_special=False) + tok.encode(after)


def check_template(template: str, setting: str = "eval.template") -> None:
    if template != "chat" and template.count("{prompt}") != 1:
        raise ConfigError(f"{setting}={template!r}: use 'chat' or a text with {{prompt}} once, "
                          "e.g. 'Problem: {prompt}\\nSolution:'")


def load_items(paths: list[Path], template: str, default_checker: str, max_length: int | None = None,
               max_new_tokens: int = 0) -> list[EvalItem]:
    """Every problem of the files, in order; a bad line, an unknown checker or a prompt that leaves
    no room for `max_new_tokens` within `max_length` positions stops with its file and line."""
    check_template(template)
    checkers: dict[str, Checker] = {}
    items = []
    for path in map(Path, paths):
        if not path.is_file():
            raise ConfigError(f"eval.tasks: {path} not found (a JSONL of problems with 'prompt' and 'answer')")
        for where, record in checked_records(path):
            prompt = record.get("prompt", record.get("question")) if isinstance(record, dict) else None
            if not isinstance(prompt, str) or not prompt:
                raise ConfigError(f"{where}: a problem is an object with a 'prompt' (or 'question') string and an "
                                  "'answer'")
            name = record.get("checker", default_checker)
            if ":" in str(name) and name != default_checker:  # a data file never names code to run
                raise ConfigError(
                    f"{where}: checker={name!r}: a tasks file may name only a built-in checker "
                    f"({', '.join(CHECKERS)}) or eval.checker's; a function (package.module:function) is "
                    "given by eval.checker, by the person running the evaluation")
            if name not in checkers:
                checkers[name] = load_checker(name, f"{where}: checker" if "checker" in record else "eval.checker")
            if name in CHECKERS and "answer" not in record:
                raise ConfigError(f"{where}: no 'answer' for the {name} checker")
            ids = render(template, prompt)
            if max_length is not None and len(ids) + max_new_tokens > max_length:
                raise ConfigError(f"{where}: the prompt's {len(ids)} tokens + eval.max_new_tokens={max_new_tokens} "
                                  f"exceed the model's {max_length} positions (model.max_position_embeddings)")
            items.append(EvalItem(str(record.get("task", path.stem)), str(record.get("id", where)), record, prompt,
                                  ids, checkers[name]))
    if not items:
        raise ConfigError(f"eval.tasks: no problems in {', '.join(map(str, paths)) or '(no files given)'}")
    return items
