"""Reading rows with their line numbers, and writing outputs atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from prefill_kit.errors import DataError


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(line_number, row)` for each non-blank line; DataError names the line that is bad."""
    with open_input(path) as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            yield line_no, parse_json_line(raw, source=str(path), line=line_no)


def open_input(path: str | Path, what: str | None = None) -> IO[bytes]:
    """`open(path, "rb")`, or a DataError naming the file (and `what` it was given as) when it cannot be read."""
    given = f" (given as {what})" if what else ""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"no such file{given}", source=str(path)) from None
    except OSError as exc:
        raise DataError(f"cannot read{given}: {exc.strerror or exc}", source=str(path)) from None


def read_text_file(path: str | Path, what: str) -> str:
    """A small UTF-8 text file (a prefix); a DataError naming the file and `what` it was given as when unreadable."""
    with open_input(path, what) as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{what}: invalid UTF-8 at byte {exc.start}", source=str(path)) from None


def parse_json_line(raw: bytes, *, source: str, line: int) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"invalid UTF-8 at byte {exc.start}", source=source, line=line) from None
    text = text.rstrip("\r\n")  # the line's own end: an unclosed object is reported at its end, not on "line 2"
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        at = "the end of the line" if exc.pos >= len(text) else f"column {exc.pos + 1}"
        raise DataError(f"invalid JSON: {exc.msg} at {at}", source=source, line=line) from None
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}", source=source, line=line)
    return row


@contextmanager
def atomic_output(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temp file beside `path`; rename it over `path` only if the block finishes.

    An exception or Ctrl-C inside the block removes the temp file, so no half-written output is left.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """A fresh temp directory beside `path`, swapped in for `path` only if the block finishes.

    An existing directory at `path` is replaced only after the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.is_dir():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def dump_json_line(row: dict[str, Any]) -> str:
    """One JSON Lines row; values JSON has no type for (dates, decimals, bytes) are written as text."""
    return json.dumps(row, ensure_ascii=False, default=str) + "\n"


def keep_rows_through_step(path: str | Path, step: int) -> None:
    """Cut a per-step JSON Lines log (metrics, completions) back to `step`, for a run resumed there.

    `step=0` (a fresh run) removes the file. Rows after `step` belong to the stopped run's future and
    would be written again.
    """
    path = Path(path)
    if not path.exists():
        return
    if not step:
        path.unlink()
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    with atomic_output(path) as f:
        f.writelines(line + "\n" for line in keep)
