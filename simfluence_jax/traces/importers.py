r"""Imports training traces from any framework, given in the long format, into a workspace.

`import_long_format(path, workspace)`; the binary is `python -m simfluence_jax.import_traces`.

The long format (WORKSPACE.md) has two record types in one file, told apart by `kind`:
  kind=batch  run_id, step (1-based), train_id        one record per example consumed at step
  kind=loss   run_id, step (0 = before training), test_id, loss
Columns a record type does not use are empty (CSV), absent or null (JSONL, Parquet). Per run:
T = the largest batch step and every step 1..T needs a batch record; batch_size = the most
examples at one step (shorter steps are padded with -1); train_ids = the ids it consumed;
test_ids = the ids with a loss record (ascending); a (step, test_id) without a loss record is
NaN (not recorded). Every run is built and validated before anything is written.

CSV is read as spreadsheet programs and pandas write it on any OS: an optional UTF-8 BOM,
LF / CRLF / CR line endings, quoted fields, blank lines and all-empty rows skipped, and an
unnamed pandas index column (header `` or `Unnamed: 0`, from `to_csv` with its default
index=True) ignored. A semicolon- or tab-separated file or UTF-16 text (Excel's regional
"CSV" and "Unicode Text") is an error saying how to save it instead.
"""

from __future__ import annotations

import collections
import csv
import json
import math
import pathlib
import re
from typing import Any, Iterator

import numpy as np

from simfluence_jax.traces import contract as traces
from simfluence_jax.traces.contract import TraceError

FORMATS = ("csv", "jsonl", "parquet")
COLUMNS = ("kind", "run_id", "step", "train_id", "test_id", "loss")
_USED = {"batch": ("run_id", "step", "train_id"), "loss": ("run_id", "step", "test_id", "loss")}
# pandas' index column: no header (to_csv) or "Unnamed: 0" (read_csv then to_csv), ".1" on
# a repeat; a trailing comma on every line also gives an unnamed column.
_UNNAMED = re.compile(r"^(Unnamed: \d+(\.\d+)?)?$")


def _format_of(path: pathlib.Path, fmt: str | None) -> str:
  if fmt is None:
    fmt = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet", ".pq": "parquet"}.get(
        path.suffix.lower())
    if fmt is None:
      raise TraceError(f"{path}: cannot tell the format from the extension; pass one of "
                       f"{FORMATS}")
  if fmt not in FORMATS:
    raise TraceError(f"{path}: unknown format {fmt!r}; expected one of {FORMATS}")
  return fmt


def _records(path: pathlib.Path, fmt: str) -> Iterator[tuple[str, dict]]:
  """(location, record) pairs; location is 'FILE:line N' or 'FILE:row N' (1-based)."""
  if fmt == "parquet":
    import pyarrow.parquet as pq  # local: only parquet imports need pyarrow
    try:
      table = pq.read_table(path)
    except FileNotFoundError:
      raise TraceError(f"{path}: missing file") from None
    except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError types
      raise TraceError(f"{path}: not a readable parquet file ({e})") from None
    _check_columns(path, table.column_names)
    for i, rec in enumerate(table.to_pylist(), 1):
      yield f"{path}:row {i}", rec
    return
  try:
    f = open(path, newline="", encoding="utf-8-sig")  # -sig: a UTF-8 BOM is dropped
  except FileNotFoundError:
    raise TraceError(f"{path}: missing file") from None
  with f:
    try:
      if fmt == "csv":
        reader = csv.DictReader(f)
        names = [name.strip() for name in reader.fieldnames or []]
        _check_delimiter(path, names)
        reader.fieldnames = names
        unnamed = {name for name in names if _UNNAMED.match(name)}
        _check_columns(path, [name for name in names if name not in unnamed])
        for rec in reader:
          if None in rec or any(v is None for v in rec.values()):
            raise TraceError(f"{path}:line {reader.line_num}: the number of fields differs "
                             f"from the header's {len(reader.fieldnames)}")
          if not any(v.strip() for v in rec.values()):
            continue  # a spreadsheet's empty row (",,,,,")
          for name in unnamed:
            del rec[name]
          yield f"{path}:line {reader.line_num}", rec
      else:
        for n, line in enumerate(f, 1):
          if not line.strip():
            continue
          try:
            rec = json.loads(line)
          except ValueError as e:
            raise TraceError(f"{path}:line {n}: not valid JSON ({e})") from None
          if not isinstance(rec, dict):
            raise TraceError(f"{path}:line {n}: must be a JSON object")
          _check_columns(f"{path}:line {n}", list(rec), header=False)
          yield f"{path}:line {n}", rec
    except UnicodeDecodeError as e:
      with open(path, "rb") as raw:
        utf16 = raw.read(2) in (b"\xff\xfe", b"\xfe\xff")
      what = ("UTF-16 text (as Excel's 'Unicode Text' saves), not UTF-8" if utf16 else
              "not UTF-8 text")
      excel = " (Excel: 'CSV UTF-8')" if fmt == "csv" else ""
      raise TraceError(f"{path}: {what}; save it as UTF-8{excel} ({e})") from None
    except csv.Error as e:
      raise TraceError(f"{path}: malformed CSV ({e})") from None


def _check_delimiter(path: pathlib.Path, names: list[str]) -> None:
  """A header read as one field holding ';' or a tab: the file is not comma-separated."""
  if len(names) == 1 and ("kind" in names[0]) and any(d in names[0] for d in ";\t"):
    sep = "semicolons" if ";" in names[0] else "tabs"
    raise TraceError(f"{path}: fields are separated by {sep}, not commas (a regional "
                     "spreadsheet export); save it as comma-separated CSV (Excel: 'CSV "
                     "UTF-8 (Comma delimited)'; pandas: to_csv's default sep=',') with '.' "
                     "as the decimal point")


def _check_columns(where, names, *, header: bool = True) -> None:
  unknown = sorted(set(names) - set(COLUMNS))
  if unknown:
    raise TraceError(f"{where}: unknown columns {unknown}; the long format has {COLUMNS}")
  if header and "kind" not in names:
    raise TraceError(f"{where}: no 'kind' column; the long format has {COLUMNS}")


def _empty(value: Any, column: str = "") -> bool:
  """None, blank text, or (outside `loss`) NaN / "nan": pandas writes missing ids as NaN."""
  if isinstance(value, float) and math.isnan(value):
    return column != "loss"
  if isinstance(value, str):
    return not value.strip() or (column != "loss" and value.strip().lower() == "nan")
  return value is None


def _int(value: Any, what: str, where: str, minimum: int) -> int:
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  if isinstance(value, str):
    text = value.strip()
    try:  # "17.0" is accepted: pandas writes int columns with gaps as floats
      value = int(text) if text.lstrip("+-").isdigit() else float(text)
      if isinstance(value, float):
        value = int(value) if value.is_integer() else text
    except (ValueError, OverflowError):
      value = text
    if isinstance(value, str):
      raise TraceError(f"{where}: {what} {value!r} is not an integer")
  if isinstance(value, bool) or not isinstance(value, int):
    raise TraceError(f"{where}: {what} {value!r} is not an integer")
  if value < minimum:
    raise TraceError(f"{where}: {what} {value} is below {minimum}")
  return value


def _loss(value: Any, where: str) -> float:
  if isinstance(value, str):
    try:
      value = float(value.strip())
    except ValueError:
      raise TraceError(f"{where}: loss {value!r} is not a number") from None
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise TraceError(f"{where}: loss {value!r} is not a number")
  if not math.isfinite(value):
    raise TraceError(f"{where}: loss is {value}; losses must be finite (leave the record "
                     "out to mean not recorded)")
  return float(value)


def _parse(path: pathlib.Path, fmt: str):
  """batches[run][step] = [train ids]; losses[run][(step, test_id)] = (loss, where)."""
  batches = collections.defaultdict(lambda: collections.defaultdict(list))
  losses = collections.defaultdict(dict)
  first_seen = {}
  for where, rec in _records(path, fmt):
    kind = rec.get("kind")
    kind = kind.strip() if isinstance(kind, str) else kind
    if kind not in _USED:
      raise TraceError(f"{where}: kind {kind!r} must be 'batch' or 'loss'")
    for column in COLUMNS[1:]:
      if column not in _USED[kind] and not _empty(rec.get(column), column):
        raise TraceError(f"{where}: a {kind} record must leave {column!r} empty, got "
                         f"{rec[column]!r}")
      if column in _USED[kind] and _empty(rec.get(column), column):
        raise TraceError(f"{where}: a {kind} record needs {column!r}")
    run_id = rec["run_id"].strip() if isinstance(rec["run_id"], str) else rec["run_id"]
    traces.check_name(run_id, "run_id", where)
    first_seen.setdefault(run_id, where)
    if kind == "batch":
      step = _int(rec["step"], "step", where, 0)
      if step == 0:
        raise TraceError(f"{where}: batch record at step 0; steps of batch records start at "
                         "1 (step 0 is the loss before training)")
      batches[run_id][step].append(_int(rec["train_id"], "train_id", where, 0))
    else:
      step = _int(rec["step"], "step", where, 0)
      key = (step, _int(rec["test_id"], "test_id", where, 0))
      if key in losses[run_id]:
        raise TraceError(f"{where}: duplicate loss for run {run_id!r}, step {key[0]}, "
                         f"test_id {key[1]} (first at {losses[run_id][key][1]})")
      losses[run_id][key] = (_loss(rec["loss"], where), where)
  return batches, losses, first_seen


def build_runs(path, fmt: str | None = None) -> list[traces.RunTrace]:
  """Parses a long-format file into validated RunTraces (sorted by run id); writes nothing."""
  path = pathlib.Path(path)
  fmt = _format_of(path, fmt)
  batches, losses, first_seen = _parse(path, fmt)
  if not first_seen:
    raise TraceError(f"{path}: no records")
  runs = []
  for run_id in sorted(first_seen):
    steps = batches.get(run_id, {})
    if not steps:
      raise TraceError(f"{path}: run {run_id!r} has no batch records (an empty run); first "
                       f"record at {first_seen[run_id]}")
    num_steps = max(steps)
    gaps = [t for t in range(1, num_steps + 1) if t not in steps]
    if gaps:
      raise TraceError(f"{path}: run {run_id!r} has no batch records for step {gaps[0]} "
                       f"(its batch records reach step {num_steps})")
    recs = losses.get(run_id, {})
    if not recs:
      raise TraceError(f"{path}: run {run_id!r} has no loss records")
    late = [(t, w) for (t, _), (_, w) in recs.items() if t > num_steps]
    if late:
      raise TraceError(f"{late[0][1]}: loss at step {late[0][0]} is after run {run_id!r}'s "
                       f"last batch step {num_steps}")
    k = max(len(ids) for ids in steps.values())
    curriculum = np.full((num_steps, k), -1, np.int32)
    for t, ids in steps.items():
      curriculum[t - 1, :len(ids)] = ids
    test_ids = np.array(sorted({j for _, j in recs}), np.int64)
    column = {int(j): c for c, j in enumerate(test_ids)}
    table = np.full((num_steps + 1, test_ids.size), np.nan, np.float32)
    for (t, j), (value, _) in recs.items():
      table[t, column[j]] = value
    train_ids = np.array(sorted({i for ids in steps.values() for i in ids}), np.int64)
    trace = traces.RunTrace(run_id=run_id, train_ids=train_ids, test_ids=test_ids,
                            batch_size=k, curriculum=curriculum, losses=table,
                            metadata={"imported_from": path.name, "import_format": fmt})
    runs.append(traces.validate(trace, str(path)))
  return runs


def import_long_format(path, workspace, fmt: str | None = None, *,
                       overwrite: bool = False) -> list[str]:
  """Imports every run of a long-format file into `workspace`; returns the run ids.

  All runs are parsed and validated, and conflicts with existing runs checked, before any is
  written; an identical existing run is left as it is. Holds the workspace lock throughout.
  """
  runs = build_runs(path, fmt)
  with traces.workspace_lock(workspace):
    if not overwrite:
      for run in runs:
        if (traces.run_dir(workspace, run.run_id) / "run.json").exists():
          try:
            same = traces.read_run(workspace, run.run_id) == run
          except TraceError:
            same = False
          if not same:
            raise TraceError(f"{path}: run {run.run_id!r} already exists in {workspace} "
                             "with different content; nothing was written (pass "
                             "--overwrite to replace it)")
    for run in runs:
      traces.write_run(workspace, run, overwrite=overwrite)
  return [run.run_id for run in runs]
