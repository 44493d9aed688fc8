"""Write rendered rows as JSON Lines, Parquet or a `datasets.save_to_disk` directory, atomically.

Writing is split like reading: `encode(rows, columns)` runs in the worker that rendered the rows
(JSON text, or an Arrow table with the fixed output columns) and a sink only appends payloads in
order. Every sink writes to a temp file or directory and renames it into place at the very end,
so an exception or Ctrl-C leaves no partial output.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from prefill_kit.data.io import atomic_directory, atomic_output, dump_json_line
from prefill_kit.errors import ConfigError, DataError

OUTPUT_FORMATS = ("jsonl", "parquet", "hf")
_SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet", "": "hf"}


def to_columns(rows: list[dict[str, Any]], columns: list[str]) -> dict[str, list]:
    """Rows as a column dict with exactly `columns`; a key outside them is an error, not a silent drop."""
    extra = {k for r in rows for k in r} - set(columns)
    if extra:
        raise DataError(f"columns {sorted(extra)} appear after the first batch fixed the output columns "
                        f"{columns}; write JSON Lines, or give every row the same columns")
    return {c: [r.get(c) for r in rows] for c in columns}


def output_format(output: str, explicit: str | None = None) -> str:
    """The output format: `explicit`, else from the output's extension (none: a save_to_disk directory)."""
    if explicit is not None:
        if explicit not in OUTPUT_FORMATS:
            raise ConfigError(f"output format: expected one of {', '.join(OUTPUT_FORMATS)}, got {explicit!r}")
        file_type = explicit
    elif output == "-":
        file_type = "jsonl"
    else:
        file_type = _SUFFIX_FORMATS.get(Path(output).suffix.lower()) or ("hf" if Path(output).is_dir() else None)
        if file_type is None:
            raise ConfigError(f"output {output}: cannot tell the format from {Path(output).suffix!r}; use .jsonl, "
                              ".parquet, a directory name (save_to_disk), or --output-format")
    if output == "-" and file_type != "jsonl":
        raise ConfigError(f"output '-' (stdout) is JSON Lines only, not {file_type}")
    return file_type


def encode_jsonl(rows: list[dict[str, Any]], columns: list[str] | None = None) -> bytes:
    """JSON Lines bytes; each row keeps its own keys."""
    return "".join(map(dump_json_line, rows)).encode("utf-8")


def encode_arrow(rows: list[dict[str, Any]], columns: list[str]):
    """An Arrow table with exactly `columns` (a fixed schema across batches), or None for no rows."""
    import pyarrow as pa

    return pa.Table.from_pydict(to_columns(rows, columns)) if rows else None


ENCODERS = {"jsonl": encode_jsonl, "parquet": encode_arrow, "hf": encode_arrow}


class _ArrowSink:
    """Appends Arrow tables under the schema of the first one (all-null columns typed as text)."""

    def __init__(self, open_writer) -> None:
        self._open_writer = open_writer
        self.writer = None
        self.schema = None

    def write(self, table) -> None:
        if table is None:
            return
        import pyarrow as pa

        if self.writer is None:
            self.schema = pa.schema([f.with_type(pa.string()) if pa.types.is_null(f.type) else f
                                     for f in table.schema])
            self.writer = self._open_writer(self.schema)
        if not table.schema.equals(self.schema):
            try:
                table = table.cast(self.schema)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise DataError(f"a column changed type between batches ({exc}); make the column's values "
                                "one type, or write JSON Lines") from None
        self.writer.write_table(table)

    def finish(self, columns: list[str]) -> None:
        if self.writer is None:  # no rows at all: still a valid, empty file with the output columns
            import pyarrow as pa

            self.write(pa.table({c: pa.array([], pa.string()) for c in columns}))
        self.close()

    def close(self) -> None:
        """Close the writer (also after a failure, so it does not write to a removed file later)."""
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close()


@contextmanager
def open_sink(output: str, file_type: str, columns: list[str]) -> Iterator[Any]:
    """A sink whose `write(payload)` appends one encoded batch; the output appears only on success."""
    if output == "-":
        yield _StreamSink(sys.stdout.buffer)
        sys.stdout.flush()
    elif file_type == "jsonl":
        with atomic_output(output, "wb") as f:
            yield _StreamSink(f)
    elif file_type == "parquet":
        import pyarrow.parquet as pq

        with atomic_output(output, "wb") as f:
            sink = _ArrowSink(lambda schema: pq.ParquetWriter(f, schema))
            try:
                yield sink
                sink.finish(columns)
            finally:
                sink.close()
    else:
        with _hf_sink(output, columns) as sink:
            yield sink


class _StreamSink:
    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, payload: bytes) -> None:
        self.stream.write(payload)


@contextmanager
def _hf_sink(output: str, columns: list[str]) -> Iterator[_ArrowSink]:
    """Stream batches to one Arrow file, then let `datasets` lay out the save_to_disk directory."""
    import datasets
    import pyarrow as pa

    fd, staging = tempfile.mkstemp(prefix=f".{Path(output).name}.", suffix=".arrow", dir=Path(output).parent)
    try:
        with os.fdopen(fd, "wb") as f:
            sink = _ArrowSink(lambda schema: pa.ipc.new_stream(f, schema))
            try:
                yield sink
                sink.finish(columns)
            finally:
                sink.close()
        with atomic_directory(output) as tmp:
            bars_were_on = not datasets.utils.are_progress_bars_disabled()
            datasets.disable_progress_bars()  # the library does not print; the CLI shows its own bar
            try:
                datasets.Dataset.from_file(staging).save_to_disk(str(tmp))
            finally:
                if bars_were_on:
                    datasets.enable_progress_bars()
    finally:
        Path(staging).unlink(missing_ok=True)


def rejects_path(output: str, source: str) -> Path:
    """OUTPUT_STEM.rejects.jsonl beside the output (beside the input when writing to stdout)."""
    if output == "-":
        base = Path(source)
        return base.with_name(f"{base.stem if base.is_file() else base.name}.rejects.jsonl")
    out = Path(output)
    return out.with_name(f"{out.name if out.suffix == '' or out.is_dir() else out.stem}.rejects.jsonl")


class RejectsWriter:
    """Appends rejects (JSON-ready dicts) to a rejects file, one per line; the file is opened on the first."""

    def __init__(self, path: Path, stack: ExitStack) -> None:
        self.path = Path(path)
        self._stack = stack
        self._file = None
        self.count = 0
        self.first: dict[str, Any] | None = None

    def write(self, rejects: list[dict[str, Any]]) -> None:
        if not rejects:
            return
        if self._file is None:
            self._file = self._stack.enter_context(atomic_output(self.path))
            self.first = rejects[0]
        self._file.writelines(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rejects)
        self.count += len(rejects)


@contextmanager
def rejects_file(path: str | Path) -> Iterator[RejectsWriter]:
    """The one way a rejects file is written: atomically (it appears whole when the block ends without an
    error), only when something was rejected; a clean run removes the file an earlier run left, which would
    mislead."""
    with ExitStack() as stack:
        writer = RejectsWriter(Path(path), stack)
        yield writer
    if writer.count == 0:
        Path(path).unlink(missing_ok=True)
