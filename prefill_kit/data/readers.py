"""Read any supported input as a stream of small chunks, each turned into located rows later.

Inputs: `.jsonl` (also `.json` holding JSON Lines), `.json` (an array), `.parquet`, `.csv`, `.arrow`,
a `datasets.save_to_disk` directory, and a directory or glob of such shards.

Reading is split in two so that the expensive half runs in worker processes: `iter_chunks` only
slices the input (raw lines, or Arrow record batches, zero-copy) and `chunk_records` parses a chunk
into `Record`s. A line that is not valid UTF-8 or JSON becomes a `Record` carrying its error and raw
text, so one bad line costs one row, not the job.
"""

from __future__ import annotations

import dataclasses
import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from prefill_kit.data.io import parse_json_line
from prefill_kit.errors import DataError

SHARD_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
                  ".csv": "csv", ".arrow": "arrow"}
DEFAULT_BATCH_SIZE = 1000


@dataclass(frozen=True)
class Chunk:
    """Up to `batch_size` consecutive input rows: raw `lines` (JSON Lines), an Arrow `batch`, or `rows`.

    Rows of a JSON Lines or CSV file are located by the 1-based line of the file where they start
    (`kind="line"`; a CSV batch carries them in `line_numbers`); all other rows by their 1-based row
    within their file (`kind="row"`), the first of the chunk being row `start + 1`. `index` is the 0-based
    position of the chunk's first row among all input rows (set by `iter_chunks`).
    """

    source: str
    kind: str
    start: int = 0
    lines: list[tuple[int, bytes]] | None = None
    batch: Any = None
    rows: list[Any] | None = None
    line_numbers: list[int] | None = None
    index: int | None = None

    def num_rows(self) -> int:
        if self.lines is not None:
            return len(self.lines)
        return self.batch.num_rows if self.batch is not None else len(self.rows or ())


@dataclass
class Record:
    """One input row where it came from; `row` is None when it could not be read (`error` says why).

    `index` is its 0-based position among all input rows, whatever the chunking or number of processes
    (None when unknown): what seeds per-row choices such as few-shot examples.
    """

    source: str
    kind: str
    loc: int
    row: dict[str, Any] | None
    raw: str | None = None
    error: DataError | None = None
    index: int | None = None

    @property
    def where(self) -> str:
        """`file:LINE` (1-based line of the file) or `file row N` (1-based row): the message says which."""
        return f"{self.source}:{self.loc}" if self.kind == "line" else f"{self.source} row {self.loc}"


def _is_hf_dir(path: Path) -> bool:
    return path.is_dir() and any((path / n).is_file() for n in ("state.json", "dataset_dict.json"))


def _kind(path: Path) -> str:
    if _is_hf_dir(path):
        return "hf"
    kind = SHARD_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"unsupported input type {path.suffix or '(no extension)'!r}; expected one of "
                        f"{', '.join(SHARD_SUFFIXES)}, a save_to_disk directory, or a directory or glob of those",
                        source=str(path))
    if kind == "json" and _first_char(path) != "[":
        return "jsonl"
    return kind


def _first_char(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head[:1].decode("ascii", "replace")


def resolve_inputs(spec: str | Path) -> list[tuple[Path, str]]:
    """The files (or save_to_disk directories) `spec` names, in order, each with its kind."""
    path = Path(spec)
    if path.is_file() or _is_hf_dir(path):
        return [(path, _kind(path))]
    if path.is_dir():
        shards = sorted(p for p in path.iterdir() if p.suffix.lower() in SHARD_SUFFIXES or _is_hf_dir(p))
        if not shards:
            raise DataError(f"directory has no {', '.join(SHARD_SUFFIXES)} shards", source=str(path))
    else:
        shards = [Path(p) for p in sorted(glob.glob(str(spec)))]
        if not shards:
            raise DataError("no such file, directory or glob match", source=str(spec))
    return [(p, _kind(p)) for p in shards]


def iter_chunks(spec: str | Path, batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[Chunk]:
    """Slice every input named by `spec` into chunks of at most `batch_size` rows, lazily, each with the
    index of its first row among all inputs."""
    index = 0
    for path, kind in resolve_inputs(spec):
        for chunk in _READERS[kind](path, batch_size):
            yield dataclasses.replace(chunk, index=index)
            index += chunk.num_rows()


def count_rows(spec: str | Path) -> int | None:
    """The number of input rows when it is cheap to know (for a progress bar's ETA), else None."""
    total = 0
    for path, kind in resolve_inputs(spec):
        if kind == "parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(path).metadata.num_rows
        elif kind == "hf":
            total += len(_load_from_disk(path))
        elif kind == "jsonl":
            total += _count_lines(path)
        else:
            return None
    return total


def _count_lines(path: Path) -> int:
    count, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def _jsonl_chunks(path: Path, batch_size: int) -> Iterator[Chunk]:
    with open(path, "rb") as f:
        lines = ((n, raw) for n, raw in enumerate(f, start=1) if raw.strip())
        while batch := list(islice(lines, batch_size)):
            yield Chunk(str(path), "line", lines=batch)


def first_unreadable_line(path: Path) -> DataError | None:
    """The error of the first line of a JSON Lines file that is not a JSON object (with its line and column)."""
    for chunk in _jsonl_chunks(path, DEFAULT_BATCH_SIZE):
        for record in chunk_records(chunk):
            if record.error is not None:
                return DataError(record.error.reason, source=record.source, line=record.loc)
    return None


def _json_array_chunks(path: Path, batch_size: int) -> Iterator[Chunk]:
    # A JSON array cannot be streamed with the standard library; it is read whole (use JSON Lines for big data).
    try:
        rows = json.loads(path.read_bytes())
    except UnicodeDecodeError as exc:
        raise DataError(f"invalid UTF-8 at byte {exc.start}", source=str(path)) from None
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}", source=str(path)) from None
    if not isinstance(rows, list):
        raise DataError(f"expected a JSON array of objects, got {type(rows).__name__}", source=str(path))
    for start in range(0, len(rows), batch_size):
        yield Chunk(str(path), "row", start, rows=rows[start:start + batch_size])


def _sliced(source: str, batches, batch_size: int) -> Iterator[Chunk]:
    """Arrow record batches cut (zero-copy) into chunks of at most `batch_size` rows."""
    start = 0
    for batch in batches:
        for offset in range(0, batch.num_rows, batch_size):
            piece = batch.slice(offset, batch_size)
            yield Chunk(source, "row", start, batch=piece)
            start += piece.num_rows


def _parquet_chunks(path: Path, batch_size: int) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    yield from _sliced(str(path), pq.ParquetFile(path).iter_batches(batch_size=batch_size), batch_size)


def _csv_chunks(path: Path, batch_size: int) -> Iterator[Chunk]:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    # Every column is read as text: CSV has no types, and inferring them per block can change mid-file.
    with pacsv.open_csv(path) as probe:
        names = probe.schema.names
    options = pacsv.ConvertOptions(column_types={n: pa.string() for n in names})
    lines = _csv_record_lines(path)
    with pacsv.open_csv(path, convert_options=options) as reader:
        for chunk in _sliced(str(path), reader, batch_size):
            numbers = list(islice(lines, chunk.batch.num_rows))
            if len(numbers) != chunk.batch.num_rows:
                raise DataError("cannot tell the lines of its rows: Python's csv module finds fewer rows than "
                                "pyarrow's reader", source=str(path))
            yield Chunk(chunk.source, "line", chunk.start, batch=chunk.batch, line_numbers=numbers)


def _csv_record_lines(path: Path) -> Iterator[int]:
    """The 1-based line where each data record of a CSV file starts (a quoted value may span lines).

    Blank lines are skipped, as pyarrow skips them; the first record is the header.
    """
    import csv

    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.reader(f)
        header_seen = False
        while True:
            before = reader.line_num
            try:
                record = next(reader)
            except StopIteration:
                return
            if not record:
                continue
            if header_seen:
                yield before + 1
            header_seen = True


def _arrow_chunks(path: Path, batch_size: int) -> Iterator[Chunk]:
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        try:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            source.seek(0)
            batches = pa.ipc.open_stream(source)
        yield from _sliced(str(path), batches, batch_size)


def _load_from_disk(path: Path):
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            raise DataError(f"holds the splits {sorted(loaded)}; pass one split's directory", source=str(path))
        loaded = next(iter(loaded.values()))
    return loaded


def _hf_chunks(path: Path, batch_size: int) -> Iterator[Chunk]:
    tables = _load_from_disk(path).with_format("arrow").iter(batch_size=batch_size)
    yield from _sliced(str(path), (b for t in tables for b in t.to_batches()), batch_size)


_READERS = {"jsonl": _jsonl_chunks, "json": _json_array_chunks, "parquet": _parquet_chunks,
            "csv": _csv_chunks, "arrow": _arrow_chunks, "hf": _hf_chunks}


def chunk_records(chunk: Chunk) -> list[Record]:
    """Parse a chunk into located records; unreadable rows carry their error instead of failing."""
    first = chunk.index
    if chunk.lines is not None:
        records = []
        for k, (line, raw) in enumerate(chunk.lines):
            index = None if first is None else first + k
            try:
                row = parse_json_line(raw, source=chunk.source, line=line)
                records.append(Record(chunk.source, "line", line, row, index=index))
            except DataError as exc:
                text = raw.decode("utf-8", "backslashreplace").rstrip("\r\n")
                records.append(Record(chunk.source, "line", line, None, raw=text, error=DataError(exc.reason),
                                      index=index))
        return records
    rows = chunk.rows if chunk.rows is not None else chunk.batch.to_pylist()
    locs = chunk.line_numbers or range(chunk.start + 1, chunk.start + 1 + len(rows))
    records = []
    for k, (loc, row) in enumerate(zip(locs, rows, strict=True)):
        index = None if first is None else first + k
        if isinstance(row, dict):
            records.append(Record(chunk.source, chunk.kind, loc, row, index=index))
        else:
            error = DataError(f"expected a JSON object, got {type(row).__name__}")
            records.append(Record(chunk.source, chunk.kind, loc, None, raw=json.dumps(row, default=str), error=error,
                                  index=index))
    return records


def chunk_columns(chunk: Chunk) -> list[str] | None:
    """The column names of a chunk, for format detection: the schema, else the first readable row's keys."""
    if chunk.batch is not None:
        return list(chunk.batch.schema.names)
    for record in chunk_records(chunk):
        if record.row is not None:
            return list(record.row)
    return None
