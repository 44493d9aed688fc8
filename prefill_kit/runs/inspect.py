"""Look at logged completions: load completions.jsonl, pick rows (a step, the worst or best by a score), and
show them as text (prefix highlighted) or as one self-contained HTML page.

Completion text is model output: it may hold control characters, terminal escapes or markup. Text output
shows control characters as escapes; HTML output escapes everything, and the page loads nothing external.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

from prefill_kit.errors import DataError
from prefill_kit.runs.completion_log import COMPLETIONS_FILE, CONTEXT_COLUMNS, FIXED_COLUMNS, TURNS_COLUMN
from prefill_kit.wording import count

TOTAL = "reward"
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # all but \t and \n
HIGHLIGHT = ("\x1b[1;36m", "\x1b[0m")  # bold cyan on a terminal
MARKS = ("«", "»")  # around the prefix in plain text


def load_completions(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's completions.jsonl (`path` is the run directory or the file itself)."""
    from prefill_kit.data.io import iter_jsonl

    path = Path(path)
    file = path / COMPLETIONS_FILE if path.is_dir() else path
    if not file.is_file():
        where = f"{path} holds no {COMPLETIONS_FILE}" if path.is_dir() else "no such file"
        raise DataError(f"{where}; a run writes it every output.log_completions_steps steps", source=str(file))
    rows = []
    for line, row in iter_jsonl(file):
        for key in FIXED_COLUMNS:
            if key not in row:
                raise DataError("missing; not a prefill-kit completions log?", source=str(file), line=line, field=key)
        rows.append(row)
    if not rows:
        raise DataError("no completions logged yet", source=str(file))
    return rows


def reward_names(rows: list[dict[str, Any]]) -> list[str]:
    """The per-reward columns, in the order they were logged."""
    names: dict[str, None] = {}
    for row in rows:
        names.update((k, None) for k in row
                     if k not in FIXED_COLUMNS and k not in CONTEXT_COLUMNS and k != TURNS_COLUMN)
    return list(names)


def context_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The data columns the log carries (`question`, `solution`): what was asked and the reference answer."""
    return [key for key in CONTEXT_COLUMNS if any(row.get(key) is not None for row in rows)]


def select(rows: list[dict[str, Any]], *, step: int | None = None, worst: int | None = None,
           best: int | None = None, reward: str | None = None) -> list[dict[str, Any]]:
    """The rows to show: those of `step` (all steps when None); the `worst`/`best` K by `reward` (a reward's
    name, default the total `reward`), or all of them sorted by `reward` when only it is given.

    Rows whose score is None cannot be ranked: worst/best leave them out, sorting puts them last.
    """
    if worst is not None and best is not None:
        raise ValueError("worst and best exclude each other")
    if step is not None:
        logged = sorted({r["step"] for r in rows})
        rows = [r for r in rows if r["step"] == step]
        if not rows:
            raise DataError(f"step {step} was not logged; logged steps: {', '.join(map(str, logged))}")
    key = reward or TOTAL
    if key != TOTAL and key not in reward_names(rows):
        raise DataError(f"no reward {key!r} in the log; rewards: {', '.join([*reward_names(rows), TOTAL])}")
    if worst is None and best is None:
        if reward is None:
            return rows
        return sorted(rows, key=lambda r: (r.get(key) is None, r.get(key) or 0.0))
    scored = [r for r in rows if r.get(key) is not None]
    ranked = sorted(scored, key=lambda r: r[key], reverse=best is not None)  # stable: ties keep log order
    return ranked[: worst if worst is not None else best]


def show(text: str) -> str:
    """Text safe to print: control characters (terminal escapes included) as visible escapes."""
    return _CONTROL.sub(lambda m: repr(m[0])[1:-1], text)


def _score(value: Any) -> str:
    return "None" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def row_header(row: dict[str, Any], names: list[str]) -> str:
    scores = " · ".join(f"{name} {_score(row.get(name))}" for name in names)
    length = f"{row['completion_length']} tokens" + (", truncated" if row["truncated"] else "")
    return (f"step {row['step']} · prompt {row['prompt_index']} · reward {_score(row['reward'])} · "
            f"advantage {_score(row['advantage'])}" + (f" · {scores}" if scores else "") + f" · {length}")


def rows_as_text(rows: list[dict[str, Any]], names: list[str] | None = None, *, color: bool = False,
                 indent: str = "    ") -> str:
    """Each row: a header with its scores, the question and solution when logged, then prefix (highlighted) +
    completion, indented."""
    names = reward_names(rows) if names is None else names
    start, end = HIGHLIGHT if color else MARKS
    blocks = []
    for row in rows:
        text = start + show(row["prefix"]) + end + show(row["completion"])
        if row.get(TURNS_COLUMN):
            text = _turn_text(row[TURNS_COLUMN], start, end)
        body = "\n".join(indent + line for line in text.split("\n"))
        blocks.append("\n".join([row_header(row, names), *_context_lines(row), body]))
    return "\n\n".join(blocks)


def _turn_text(turns: list[dict[str, Any]], start: str, end: str) -> str:
    """A multi-turn rollout turn by turn: `[assistant, N trained]` + prefix (highlighted) + what the model wrote,
    its tool calls; `[tool NAME, not trained]` + the result."""
    lines = []
    for turn in turns:
        if turn.get("role") == "assistant":
            calls = "".join(f"\n  -> {json.dumps(c.get('function', c), ensure_ascii=False)}"
                            for c in turn.get("tool_calls") or [])
            lines.append(f"[assistant, {turn.get('trained_tokens')} trained] " + start + show(turn.get("prefix", ""))
                         + end + show(turn.get("content", "")) + calls)
        else:
            who = f"{turn.get('role')} {turn.get('name') or ''}".rstrip()
            lines.append(f"[{who}, not trained] " + show(str(turn.get("content"))))
    return "\n".join(lines)


def _context_lines(row: dict[str, Any]) -> list[str]:
    """`question: ...` and `solution: ...`, continuation lines aligned under the first."""
    lines = []
    for key in CONTEXT_COLUMNS:
        if row.get(key) is not None:
            lines.append(f"{key}: " + show(str(row[key])).replace("\n", "\n" + " " * (len(key) + 2)))
    return lines


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; width: 100%; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: right; }
th { background: #f3f3f3; position: sticky; top: 0; }
th:last-child { text-align: left; }
td.text { text-align: left; white-space: pre-wrap; overflow-wrap: anywhere; font-family: ui-monospace, monospace;
          max-width: 60em; }
td.context { max-width: 25em; color: #444; }
mark.prefix { background: #cfe8ff; color: #024; }
tr.truncated td.tokens { color: #b00; }
td.none { color: #999; }
"""


def html_page(rows: list[dict[str, Any]], names: list[str] | None = None, *, title: str = "completions") -> str:
    """One self-contained page (inline CSS, no scripts, nothing fetched) with the rows as a table."""
    names = reward_names(rows) if names is None else names
    context = context_columns(rows)
    esc = html.escape
    columns = ["step", "prompt", *context, *names, TOTAL, "advantage", "tokens", "prefix + completion"]
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = [f"<td>{esc(str(row['step']))}</td>", f"<td>{esc(str(row['prompt_index']))}</td>"]
        for key in context:
            value = row.get(key)
            cells.append('<td class="none">None</td>' if value is None else
                         f'<td class="text context">{esc(show(str(value)))}</td>')
        for key in [*names, TOTAL, "advantage"]:
            value = row.get(key)
            cells.append('<td class="none">None</td>' if value is None else f"<td>{esc(_score(value))}</td>")
        tokens = f"{row['completion_length']}" + (" (truncated)" if row["truncated"] else "")
        cells.append(f'<td class="tokens">{esc(tokens)}</td>')
        cells.append(f'<td class="text"><mark class="prefix">{esc(show(row["prefix"]))}</mark>'
                     f'{esc(show(row["completion"]))}</td>')
        body.append(f'<tr class="{"truncated" if row["truncated"] else "finished"}">{"".join(cells)}</tr>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>\n"
            f"<h1>{esc(title)}</h1>\n<p>{count(len(rows), 'completion')}; the prefix is highlighted.</p>\n"
            f"<table><thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(body) + "\n</tbody></table>\n"
            "</body></html>\n")


def write_html(path: str | Path, rows: list[dict[str, Any]], *, title: str) -> Path:
    from prefill_kit.data.io import atomic_output

    with atomic_output(path) as f:
        f.write(html_page(rows, title=title))
    return Path(path)
