"""Few-shot prompts: worked examples placed before a row's question, so the model sees the target format.

A small model that has never written `<think>...</think>` earns no reward in its first rollouts, and GRPO's
advantages are then all zero. Examples in the prompt show the whole format before the model's own turn.

- `load_few_shot` reads the examples (any input format `prefill-kit render` reads: a question and an answer)
  and checks that each answer holds the block the prefix opens, with the format reward's own rule.
- `choose_examples` picks a row's examples from the seed and the row's index only (the same with any number
  of processes), never one whose question is the row's own.
- `with_examples` puts them into the conversation: as user/assistant turns, or as text in the system message.
- `check_verbatim` stops when the template rewrote an example's answer (Qwen3 drops earlier reasoning).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefill_kit.data.formats import detect_format, last_user_text, message_text, to_conversation
from prefill_kit.data.readers import chunk_columns, chunk_records, iter_chunks
from prefill_kit.errors import ConfigError, DataError
from prefill_kit.rewards.format import is_think_format

MODES = ("turns", "system")
SYSTEM_HEADER = "Worked examples of the expected response format:"
_OPEN_TAG = re.compile(r"<([A-Za-z_][\w-]*)>")


@dataclass(frozen=True)
class Example:
    """One worked example: the user's `question`, the assistant's `answer`, where it came from, and `index`,
    its 0-based row in the examples file (what output rows record in `few_shot_indices`)."""

    question: str
    answer: str
    where: str
    index: int


@dataclass(frozen=True)
class FewShot:
    """The examples and how to use them: `shots` per row, drawn by `seed` and row index, placed by `mode`."""

    examples: tuple[Example, ...]
    shots: int
    seed: int = 0
    mode: str = "turns"
    source: str = ""
    skipped: tuple[str, ...] = field(default=())  # examples left out under on_error=skip, each with why
    by_question: dict[str, list[int]] = field(init=False, repr=False, compare=False)  # the leak check's index

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"few_shot.mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        if isinstance(self.shots, bool) or not isinstance(self.shots, int) or self.shots < 1:
            raise ConfigError(f"few_shot.shots: expected a positive integer, got {self.shots!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"few_shot.seed: expected an integer, got {self.seed!r}")
        if self.shots > len(self.examples):
            raise ConfigError(f"few_shot.shots: {self.shots} examples per row, but {self.source or 'the file'} "
                              f"has {len(self.examples)} usable example(s)")
        by_question: dict[str, list[int]] = {}
        for i, example in enumerate(self.examples):
            by_question.setdefault(normalized_question(example.question), []).append(i)
        object.__setattr__(self, "by_question", by_question)  # built once instead of per row


def opened_block(prefix: str) -> str | None:
    """The tag of the block `prefix` opens and leaves open (`think` for ``"<think>\\n"``); None if it opens none."""
    opened = [m[1] for m in _OPEN_TAG.finditer(prefix) if f"</{m[1]}>" not in prefix[m.end():]]
    return opened[-1] if opened else None


def answer_format_problem(answer: str, prefix: str) -> str | None:
    """Why `answer` does not teach the format `prefix` starts, or None when it does.

    When the prefix opens a block, the answer must be exactly what `think_format_reward` scores 1.0 with
    that tag: the whole block once, then a non-empty answer after it.
    """
    tag = opened_block(prefix)
    if tag is None or is_think_format(answer, tag):
        return None
    return (f"the prefix {prefix!r} opens <{tag}>, but this answer is not one <{tag}>...</{tag}> block followed by "
            "the final answer (the form the format reward scores 1.0)")


def normalized_question(text: str) -> str:
    """A question compared for leaks: whitespace runs collapsed, ends stripped."""
    return " ".join(text.split())


def row_question(messages: list[dict[str, Any]]) -> str:
    """The row's own question: the text of its last user message ('' when it has none)."""
    return last_user_text(messages) or ""


def choose_examples(few_shot: FewShot, index: int, question: str) -> list[int]:
    """The positions in `few_shot.examples` of the examples row `index` gets, in prompt order: `shots` of them,
    or fewer when not enough examples ask another question than `question`.

    Depends only on the seed, the row index and the question, so any sharding over processes picks the same.
    Fewer shots (to fit a token budget) are the first ones of this list.
    """
    own = few_shot.by_question.get(normalized_question(question), ())
    # sample(range(n)) picks exactly as sample(list(range(n))) does, without building the list for every row
    candidates = range(len(few_shot.examples)) if not own else [i for i in range(len(few_shot.examples))
                                                                 if i not in own]
    rng = random.Random(f"prefill-kit few-shot {few_shot.seed} {index}")  # str seeds hash with SHA-512: stable
    return rng.sample(candidates, min(few_shot.shots, len(candidates)))


def with_examples(messages: list[dict[str, Any]], examples: list[Example], mode: str) -> list[dict[str, Any]]:
    """`messages` with `examples` in front of the conversation, after a leading system message.

    `turns`: one user and one assistant message per example. `system`: the examples as text at the end of the
    system message (a new system message when there is none).
    """
    if not examples:
        return messages
    head, rest = (messages[:1], messages[1:]) if messages and messages[0].get("role") == "system" else ([], messages)
    if mode == "turns":
        turns = [m for e in examples for m in ({"role": "user", "content": e.question},
                                               {"role": "assistant", "content": e.answer})]
        return [*head, *turns, *rest]
    text = "\n\n".join([SYSTEM_HEADER, *(f"Question: {e.question}\nAnswer: {e.answer}" for e in examples)])
    if not head:
        return [{"role": "system", "content": text}, *rest]
    system = dict(head[0])
    content = system.get("content")
    if isinstance(content, list):
        system["content"] = [*content, {"type": "text", "text": "\n\n" + text}]
    else:
        system["content"] = f"{content}\n\n{text}" if content else text
    return [system, *rest]


def check_verbatim(prompt: str, examples: list[Example], template_name: str, mode: str) -> None:
    """Raise ConfigError when an example's answer is not in the rendered `prompt` as written.

    Some templates rewrite earlier assistant turns (Qwen3 keeps reasoning only after the last user message),
    so the examples would silently lose the very format they are meant to teach.
    """
    for example in examples:
        if example.answer not in prompt:
            advice = ("use --few-shot-mode system (few_shot.mode: system) to put the examples in the system "
                      "message, or a template option that keeps earlier reasoning where the model family has one"
                      if mode == "turns" else "check the template's handling of the system message")
            raise ConfigError(f"template {template_name} rewrote the answer of few-shot example {example.where}: "
                              "it changes earlier assistant turns (Qwen3 and DeepSeek-R1 templates drop the <think> "
                              "block of assistant turns before the last user message), so the example no longer "
                              f"shows the format it teaches; {advice}")


def _example(row: dict[str, Any], fmt: str, where: str, index: int) -> Example:
    """A question and its answer from one example row; DataError naming the field otherwise."""
    conversation = to_conversation(row, fmt)
    messages = conversation.messages
    answer = None
    if messages[-1].get("role") == "assistant":
        answer, messages = message_text(messages[-1].get("content")), messages[:-1]
    elif isinstance(row.get("solution"), str):
        answer = row["solution"]
    elif conversation.reference is not None:
        answer = conversation.reference
    if not answer or not answer.strip():
        raise DataError("an example needs an answer: a trailing assistant message, or a `solution`, `answer`, "
                        "`response` or `output` column", field="solution")
    if [m.get("role") for m in messages] != ["user"]:
        raise DataError("an example is one user question and its answer; got the roles "
                        f"{[m.get('role') for m in messages]} before the answer", field="messages")
    question = message_text(messages[0].get("content"))
    if not question.strip():
        raise DataError("empty question", field="messages")
    return Example(question, answer, where, index)


def load_few_shot(path: str | Path, *, shots: int, seed: int = 0, mode: str = "turns", prefix: str = "",
                  on_error: str = "fail") -> FewShot:
    """Read the worked examples in `path` and check that each teaches the format `prefix` starts.

    A bad example raises DataError naming its file, line or row, and field; with `on_error="skip"` it is
    left out and recorded in `FewShot.skipped`. The prefix is the run's `--prefix` (a row's own `prefix`
    column is not known here).
    """
    source = str(path)
    if not Path(path).exists():
        raise DataError("no such few-shot file", source=source)
    examples: list[Example] = []
    skipped: list[str] = []
    fmt = None
    for chunk in iter_chunks(path):
        if fmt is None and (columns := chunk_columns(chunk)) is not None:
            try:
                fmt = detect_format(columns)
            except DataError as exc:
                raise exc.located(source=source) from None
        for record in chunk_records(chunk):
            try:
                if record.error is not None:
                    raise record.error
                example = _example(record.row, fmt, record.where, record.index)
                problem = answer_format_problem(example.answer, prefix)
                if problem is not None:
                    raise DataError(problem, field="answer")
                examples.append(example)
            except DataError as exc:
                line = record.loc if record.kind == "line" else None
                where = record.source if line is not None else record.where
                located = DataError(f"few-shot example: {exc.reason}", source=where, line=line, field=exc.field)
                if on_error == "fail":
                    raise located from None
                skipped.append(str(located))
    if not examples:
        raise DataError("no usable few-shot examples" + (f" ({len(skipped)} skipped)" if skipped else ""),
                        source=source)
    return FewShot(tuple(examples), shots, seed, mode, source, tuple(skipped))
