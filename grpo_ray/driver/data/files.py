"""Records of a local file (JSON lines, a JSON array, CSV, Parquet), or of a split of a Hub dataset
or of a local directory of files named by split, each named by where it stands (`line 3`, 1-based,
for JSON lines; `row 2`, 0-based as `dataset[i]` counts, otherwise). JSON lines are parsed here,
one `json.loads` a line, so that a broken line is named by its number; Parquet and CSV go through
pyarrow, the hub and directories through `datasets` (imported inside the functions). Every problem
is one `DataError` line naming the source and the line or row.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from grpo_ray.config import LOCAL_FORMATS, DataConfig, UserError

Record = tuple[str, dict[str, Any]]
"""(where, row): `line 3` or `row 2`, and the row's columns as read."""


class DataError(UserError, ValueError):
    """Data that cannot be trained on (a bad row, a missing file); the message names it."""

    kind = "data error"


def read_local(path: str | None, source: str) -> list[Record]:
    if path is None:
        raise DataError("data.path: is required with data.source=local")
    suffix = Path(path).suffix.lower()
    if suffix not in LOCAL_FORMATS:
        raise DataError(f"{source}: unknown file type (expected one of "
                        f"{', '.join(LOCAL_FORMATS)})")
    if not Path(path).is_file():
        raise DataError(f"{source}: file not found")
    if suffix == ".parquet":
        return _read_parquet(path, source)
    if suffix == ".csv":
        return _read_csv(path, source)
    data = Path(path).read_bytes()
    if suffix == ".json" and data.lstrip().startswith(b"["):
        return _read_json_array(data, source)
    return _read_json_lines(data, source)


def _read_json_lines(data: bytes, source: str) -> list[Record]:
    """One JSON object a line; blank lines are skipped; `line N` counts from 1."""
    records: list[Record] = []
    for n, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{source} line {n}: not UTF-8 text (byte {e.start + 1})") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{source} line {n}: not valid JSON ({_json_problem(e)})") from None
        if not isinstance(row, dict):
            raise DataError(f"{source} line {n}: expected a JSON object of columns, got "
                            f"{kind(row)}")
        records.append((f"line {n}", row))
    if not records:
        raise DataError(f"{source}: no rows (the file is "
                        f"{'only blank lines' if data else 'empty'})")
    return records


def _read_json_array(data: bytes, source: str) -> list[Record]:
    try:
        rows = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(f"{source}: not UTF-8 text (byte {e.start + 1})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{source} line {e.lineno}: not valid JSON "
                        f"({_json_problem(e)})") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{source} row {i}: expected a JSON object of columns, got "
                            f"{kind(row)}")
    return [(f"row {i}", row) for i, row in enumerate(rows)]


def _read_parquet(path: str, source: str) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow's ArrowInvalid, OSError, ... on a file that is not Parquet
        raise DataError(f"{source}: cannot read as Parquet ({first_line(e)})") from None
    return [(f"row {i}", row) for i, row in enumerate(table.to_pylist())]


def _read_csv(path: str, source: str) -> list[Record]:
    """A header row, then one row per record; every value is text (a CSV has no types), an
    empty cell is an empty string; quoted values may span lines."""
    import csv

    import pyarrow as pa
    import pyarrow.csv as pcsv

    with open(path, newline="", encoding="utf-8-sig") as f:
        try:
            header = next(csv.reader(f), None)
        except (csv.Error, UnicodeDecodeError) as e:
            raise DataError(f"{source} line 1: not a CSV header ({first_line(e)})") from None
    if not header:
        raise DataError(f"{source}: no rows (the file is empty)")
    try:
        table = pcsv.read_csv(path, parse_options=pcsv.ParseOptions(newlines_in_values=True),
                              convert_options=pcsv.ConvertOptions(
                                  column_types={name: pa.string() for name in header},
                                  strings_can_be_null=False, quoted_strings_can_be_null=False))
    except Exception as e:  # ArrowInvalid: "CSV parse error: Expected 2 columns, got 3: ..."
        raise DataError(f"{source}{_csv_bad_line(path, len(header))}: cannot read as CSV "
                        f"({first_line(e)})") from None
    return [(f"row {i}", row) for i, row in enumerate(table.to_pylist())]


def _csv_bad_line(path: str, width: int) -> str:
    """` line N` of the first record whose number of fields is not the header's, for pyarrow's
    parse errors, which quote the record but not where it is; empty when none is found."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            for record in reader:
                if record and len(record) != width:
                    return f" line {reader.line_num}"
    except (csv.Error, UnicodeDecodeError):
        pass
    return ""


def read_hub(cfg: DataConfig, split: str, source: str) -> list[Record]:
    return read_split(cfg.name, cfg.subset, split, source)


def read_split(name: str, subset: str | None, split: str, source: str) -> list[Record]:
    """One split of a hub dataset or of a local directory of files named by split, through
    `datasets.load_dataset`."""
    import datasets

    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except Exception as e:  # not found, no such split or subset, no network, ...
        raise DataError(f"{source}: cannot load ({type(e).__name__}: {first_line(e)})") from None
    # one conversion instead of a per-row Arrow lookup
    return [(f"row {i}", row) for i, row in enumerate(ds.to_list())]


def split_names(name: str, subset: str | None, source: str) -> list[str]:
    """The splits of a hub dataset or of a local directory of files named by split."""
    import datasets

    try:
        return list(datasets.get_dataset_split_names(name, subset))
    except Exception as e:
        raise DataError(f"{source}: cannot list its splits ({type(e).__name__}: "
                        f"{first_line(e)})") from None


def _json_problem(e: json.JSONDecodeError) -> str:
    # json's "Unterminated string starting at" expects a position after it
    return f"{e.msg.removesuffix(' at')} at column {e.colno}"


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def kind(value: Any) -> str:
    return f"{type(value).__name__} {value!r:.40}"
