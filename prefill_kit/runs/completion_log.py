"""completions.jsonl: the completions a run generated, next to each reward's score. One schema, both backends.

One JSON object per completion, keys in this order:
    step, prompt_index, [question], [solution], prefix, completion, completion_length, truncated,
    <one key per reward>, reward, advantage
- `step`: the optimizer step the rollout was generated for (1-based, as in metrics.jsonl);
- `prompt_index`: the row of the training data (after rendering) the prompt came from;
- `question`: the text of the row's last user message, when the data has one; `solution`: the row's reference
  answer, when it has one (what `accuracy` compared against). Present only when the data has them;
- `prefix`: the effective prefix the model continued from; `completion` holds only generated text, decoded
  without special tokens, so `prefix + completion` is what the rewards scored;
- `completion_length`: generated tokens up to and including EOS; `truncated`: no EOS within
  `max_completion_length`;
- one key per reward, named as in metrics.jsonl's `rewards/<name>` (None where the reward returned None);
- `reward`: the weighted total (None where every reward returned None); `advantage`: what the loss used.
- `turns` (multi-turn tool rollouts only, last): each turn in order: `{"role": "assistant", "prefix", "content",
  ["tool_calls"], "trained_tokens"}` (content: what the model wrote after its prefix; trained_tokens: its
  sampled tokens, the only ones the loss covers) or `{"role": "tool", "name", "content"}` (never trained). There
  `completion` is the whole text after the prompt (turns, tool results and the template's text between them), and
  `completion_length` counts sampled tokens only.

Rows are written by the main process only, for step 1 and every `output.log_completions_steps`-th step, at most
`output.log_completions_max` per step (whole prompt groups first), so the file stays small.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefill_kit.data.io import keep_rows_through_step
from prefill_kit.errors import ConfigError
from prefill_kit.rewards.registry import none_if_nan

COMPLETIONS_FILE = "completions.jsonl"
LEADING_COLUMNS = ("step", "prompt_index", "prefix", "completion", "completion_length", "truncated")
TRAILING_COLUMNS = ("reward", "advantage")
FIXED_COLUMNS = LEADING_COLUMNS + TRAILING_COLUMNS
CONTEXT_COLUMNS = ("question", "solution")  # from the data row, when it has them
TURNS_COLUMN = "turns"  # multi-turn rollouts only


def check_reward_names(names: Sequence[str]) -> None:
    """A reward's column must not shadow a fixed column of the log."""
    for name in names:
        if name in (*FIXED_COLUMNS, *CONTEXT_COLUMNS, TURNS_COLUMN):
            raise ConfigError(f"rewards: a reward named {name!r} would clash with the {name!r} column of "
                              f"{COMPLETIONS_FILE}; give it another name")


def eval_metrics(scores: list[list[float | None]], names: list[str], weights: list[float]) -> dict[str, float | None]:
    """`eval/reward` and `eval/rewards/<name>` over every eval completion (one row of scores per completion).

    None-aware as the training metrics are: a reward's mean skips its None scores, and the total of a
    completion is the weighted sum of the scores it has (None, and skipped, when every reward returned None),
    computed as the rollout computes it (`prefill_kit.grpo.scoring.weighted_totals`; needs torch, as training does).
    """
    from prefill_kit.grpo.scoring import weighted_totals

    def mean(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return sum(present) / len(present) if present else None

    out = {"eval/reward": mean(weighted_totals(scores, weights))}
    for k, name in enumerate(names):
        out[f"eval/rewards/{name}"] = mean([row[k] for row in scores])
    return out


def completion_rows(*, step: int, prompt_indices: Sequence[int], prefixes: Sequence[str],
                    completions: Sequence[str], completion_lengths: Sequence[int], truncated: Sequence[bool],
                    rewards: dict[str, Sequence[float | None]], reward: Sequence[float | None],
                    advantages: Sequence[float], questions: Sequence[str | None] | None = None,
                    solutions: Sequence[Any] | None = None,
                    turns: Sequence[list[dict[str, Any]]] | None = None) -> list[dict[str, Any]]:
    """One log row per completion; every sequence holds one entry per completion, in the same order.

    `questions` and `solutions` are the data's columns (None when it has no such column).
    """
    rows = []
    for i, completion in enumerate(completions):
        row: dict[str, Any] = {"step": int(step), "prompt_index": int(prompt_indices[i])}
        if questions is not None:
            row["question"] = questions[i]
        if solutions is not None:
            row["solution"] = None if solutions[i] is None else str(solutions[i])
        row.update(prefix=prefixes[i], completion=completion, completion_length=int(completion_lengths[i]),
                   truncated=bool(truncated[i]))
        row.update((name, none_if_nan(scores[i])) for name, scores in rewards.items())
        row["reward"] = none_if_nan(reward[i])
        row["advantage"] = none_if_nan(advantages[i])
        if turns is not None:
            row["turns"] = turns[i]
        rows.append(row)
    return rows


def bounded(rows: list[dict[str, Any]], max_rows: int) -> list[dict[str, Any]]:
    """At most `max_rows` rows, whole prompt groups first (adjacent rows with the same prompt_index), so each
    kept prompt shows its reward spread."""
    kept: list[dict[str, Any]] = []
    start = 0
    while start < len(rows):
        end = start + 1
        while end < len(rows) and rows[end]["prompt_index"] == rows[start]["prompt_index"]:
            end += 1
        if len(kept) + end - start > max_rows:
            break
        kept += rows[start:end]
        start = end
    return kept or rows[:max_rows]


def is_due(step: int, every: int, span: int = 1) -> bool:
    """Whether a rollout generated for steps `step .. step + span - 1` is logged: the first one, and any that
    covers a multiple of `every` (a rollout reused for several steps covers them all). `every=0`: never."""
    if every <= 0:
        return False
    return step == 1 or (step + span - 1) // every > (step - 1) // every


def gather_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every process's rows, in process order, on every process (a collective: all processes must call it)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    return list(gather_object(rows)) if PartialState().num_processes > 1 else list(rows)


class CompletionLog:
    """Appends logged completions to `run_dir/completions.jsonl`. Only the main process writes.

    A fresh run (`resume_step=0`) starts the file afresh; a resumed run drops the rows logged after the step it
    resumes from, which it is about to generate again.
    """

    def __init__(self, run_dir: str | Path, *, every: int, max_rows: int, reward_names: Sequence[str],
                 resume_step: int = 0, is_main: bool = True):
        check_reward_names(reward_names)
        self.path = Path(run_dir) / COMPLETIONS_FILE
        self.every, self.max_rows, self.is_main = every, max_rows, is_main
        if is_main:
            keep_rows_through_step(self.path, resume_step)

    def due(self, step: int, span: int = 1) -> bool:
        return is_due(step, self.every, span)

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Append (at most `max_rows` of) one step's rows; a no-op outside the main process."""
        if not self.is_main or not rows:
            return
        text = "".join(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n"
                       for row in bounded(rows, self.max_rows))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(text)  # one write per step: a crash leaves whole steps

