"""The workspace trace contract (WORKSPACE.md): one directory per training run.

  <workspace>/runs/<run_id>/run.json        {"schema": 1, "run_id", "train_ids", "test_ids",
                                             "batch_size": k, "num_steps": T, ...metadata}
  <workspace>/runs/<run_id>/curriculum.npy  int32 [T, k]   row t-1 = ids consumed at step t
  <workspace>/runs/<run_id>/losses.npy      float32 [T+1, m] row 0 = before the first step

Every reader and writer validates; a violation is a `TraceError` naming the file, the run,
the step (1-based t as in the paper, with its array row) and the example id at fault.
`write_run` writes curriculum.npy, losses.npy and then run.json: a run directory without
run.json is incomplete, `list_runs` leaves it out and logs it, `incomplete_runs` lists it.
Replacing a complete run (overwrite=True) writes the new one into a hidden sibling directory
and swaps the two atomically: readers and crashes see the old run or the new one.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import math
import os
import pathlib
import re
import secrets
import shutil
from typing import Any, Iterable

from absl import logging
import numpy as np
from numpy.lib import format as npformat

from simfluence_jax.traces import atomic_io
from simfluence_jax.traces import faults

SCHEMA = 1
SPLITS = ("train", "test")
RESERVED_KEYS = ("schema", "run_id", "train_ids", "test_ids", "batch_size", "num_steps")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+=@,-]*$")
_INT32_MAX = np.iinfo(np.int32).max
LOCK_NAME = ".lock"


class TraceError(ValueError):
  """A trace file or in-memory trace breaks the contract; the message says where and why."""


@dataclasses.dataclass(frozen=True, eq=False)
class RunTrace:
  """One training run. Equality compares every field exactly (dtypes included, NaN == NaN)."""
  run_id: str
  train_ids: np.ndarray   # int64 [n_r]  the pool subset this run may draw from
  test_ids: np.ndarray    # int64 [m]    column j of losses is test_ids[j]
  batch_size: int         # k
  curriculum: np.ndarray  # int32 [T, k] train ids consumed at step t (row t-1); -1 pads
  losses: np.ndarray      # float32 [T+1, m]; row 0 = before training; NaN = not recorded
  metadata: dict = dataclasses.field(default_factory=dict)

  @property
  def num_steps(self) -> int:
    return int(np.shape(self.curriculum)[0])

  def __eq__(self, other):
    if not isinstance(other, RunTrace):
      return NotImplemented
    def same(a, b):
      a, b = np.asarray(a), np.asarray(b)
      return a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    return (self.run_id == other.run_id and self.batch_size == other.batch_size
            and self.metadata == other.metadata
            and all(same(getattr(self, f), getattr(other, f))
                    for f in ("train_ids", "test_ids", "curriculum", "losses")))


# ----------------------------------------------------------------------------- validation


def check_name(name: Any, what: str, where: str) -> str:
  """Run ids and fit names become directory names: letters, digits, ._+=@,- ; no leading dot."""
  if not isinstance(name, str) or not _NAME_RE.match(name):
    raise TraceError(f"{where}: {what} {name!r} is not a valid name (use letters, digits and "
                     "._+=@,- and do not start with '.')")
  return name


def check_ids(values: Any, what: str, where: str) -> np.ndarray:
  """A 1-D array of unique non-negative integer ids -> int64."""
  arr = np.asarray(values)
  if arr.ndim != 1:
    raise TraceError(f"{where}: {what} must be a 1-D list of ids, got shape {arr.shape}")
  if arr.size and arr.dtype.kind not in "iu":
    raise TraceError(f"{where}: {what} must be integers, got dtype {arr.dtype}")
  if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
    raise TraceError(f"{where}: {what} has an id beyond int64")
  arr = arr.astype(np.int64)
  if arr.size and arr.min() < 0:
    raise TraceError(f"{where}: {what} has negative id {int(arr.min())}; ids are >= 0")
  uniq, counts = np.unique(arr, return_counts=True)
  if np.any(counts > 1):
    raise TraceError(f"{where}: {what} has duplicate id {int(uniq[counts > 1][0])}")
  return arr


def _as_int32_curriculum(cur: Any, where: str) -> np.ndarray:
  cur = np.asarray(cur)
  if cur.dtype.kind not in "iu":
    raise TraceError(f"{where}: curriculum must hold integer ids, got dtype {cur.dtype}")
  if cur.size and (cur.min() < -1 or cur.max() > _INT32_MAX):
    bad = cur.min() if cur.min() < -1 else cur.max()
    at = ""
    if cur.ndim == 2:
      t = int(np.nonzero(cur == bad)[0][0])
      at = f" step {t + 1} (row {t})"
    raise TraceError(f"{where}: curriculum{at} holds id {int(bad)}, outside "
                     f"[-1, {_INT32_MAX}] (ids are >= 0, -1 pads)")
  return cur.astype(np.int32)


def _as_float32_losses(losses: Any, where: str) -> np.ndarray:
  losses = np.asarray(losses)
  if losses.dtype.kind != "f":
    raise TraceError(f"{where}: losses must be floating point, got dtype {losses.dtype}")
  with np.errstate(over="ignore"):
    # The contract's precision is float32: float64 is rounded; beyond float32 range is inf.
    return losses.astype(np.float32)


def validate(trace: RunTrace, where: str) -> RunTrace:
  """Checks `trace` against the contract; returns it with canonical dtypes (int64/int32/f32).

  `where` prefixes every message (e.g. the file or directory being read or written).
  """
  where = f"{where}: run {trace.run_id!r}" if isinstance(trace.run_id, str) else where
  check_name(trace.run_id, "run_id", where)
  train_ids = check_ids(trace.train_ids, "train_ids", where)
  test_ids = check_ids(trace.test_ids, "test_ids", where)
  if test_ids.size == 0:
    raise TraceError(f"{where}: test_ids is empty; a run records at least one test example")
  k = trace.batch_size
  if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
    raise TraceError(f"{where}: batch_size must be an integer >= 1, got {k!r}")
  cur = _as_int32_curriculum(trace.curriculum, where)
  if cur.ndim != 2 or cur.shape[1] != k:
    raise TraceError(f"{where}: curriculum must have shape [T, batch_size={k}], "
                     f"got {cur.shape}")
  steps = cur.shape[0]
  if steps == 0:
    raise TraceError(f"{where}: empty run (T = 0 steps); a run has at least one step")
  pad = cur == -1
  if pad.all():   # an all-pad row is a no-op step (a masked edit may empty a batch)
    raise TraceError(f"{where}: every step is all padding (-1); a run consumes at least "
                     "one example")
  inner = pad[:, :-1] & ~pad[:, 1:]  # a pad followed by an id
  if np.any(inner):
    t = int(np.nonzero(inner.any(axis=1))[0][0])
    raise TraceError(f"{where}: step {t + 1} (row {t}) has -1 padding before an id "
                     f"({cur[t].tolist()}); padding may only trail a row")
  unknown = ~pad & ~np.isin(cur, train_ids)
  if np.any(unknown):
    t, j = (int(x[0]) for x in np.nonzero(unknown))
    raise TraceError(f"{where}: step {t + 1} (row {t}) consumes example id {int(cur[t, j])} "
                     "which is not in the run's train_ids")
  losses = _as_float32_losses(trace.losses, where)
  if losses.shape != (steps + 1, test_ids.size):
    raise TraceError(f"{where}: losses must have shape [T+1={steps + 1}, m={test_ids.size}] "
                     f"(T from the curriculum, m = len(test_ids)), got {losses.shape}")
  if np.any(np.isinf(losses)):
    t, j = (int(x[0]) for x in np.nonzero(np.isinf(losses)))
    at = "before the first step (row 0)" if t == 0 else f"at step {t} (row {t})"
    raise TraceError(f"{where}: loss of test example id {int(test_ids[j])} is "
                     f"{float(np.asarray(trace.losses)[t, j])!r} {at}, beyond float32 or "
                     "infinite; record a finite loss or NaN for not recorded")
  meta = trace.metadata
  if not isinstance(meta, dict) or not all(isinstance(key, str) for key in meta):
    raise TraceError(f"{where}: metadata must be a dict with string keys")
  clash = sorted(set(meta) & set(RESERVED_KEYS))
  if clash:
    raise TraceError(f"{where}: metadata keys {clash} are reserved by run.json")
  try:  # canonical JSON form, so a trace compares equal to what read_run gives back
    meta = json.loads(atomic_io.dumps_json(meta))
  except (TypeError, ValueError) as e:
    raise TraceError(f"{where}: metadata is not JSON-serializable ({e})") from None
  return dataclasses.replace(trace, train_ids=train_ids, test_ids=test_ids, batch_size=int(k),
                             curriculum=cur, losses=losses, metadata=meta)


# ----------------------------------------------------------------------------- paths & locks


def runs_dir(workspace) -> pathlib.Path:
  return pathlib.Path(workspace) / "runs"


def run_dir(workspace, run_id: str) -> pathlib.Path:
  return runs_dir(workspace) / check_name(run_id, "run_id", str(runs_dir(workspace)))


def examples_path(workspace, split: str) -> pathlib.Path:
  if split not in SPLITS:
    raise TraceError(f"examples split must be one of {SPLITS}, got {split!r}")
  return pathlib.Path(workspace) / "examples" / f"{split}.jsonl"


def workspace_lock(workspace):
  """Context manager holding `<workspace>/.lock` for one writer process (re-entrant).

  A second process gets a TraceError naming the holder's pid and host; a lock left by a
  dead process on this host is taken over (see atomic_io.exclusive_lock).
  """
  ws = pathlib.Path(workspace)
  return atomic_io.exclusive_lock(ws / LOCK_NAME, what=f"workspace {ws}", error=TraceError)


# ----------------------------------------------------------------------------- runs


def list_runs(workspace) -> list[str]:
  """Sorted ids of the complete runs (directories with run.json); incomplete ones are logged."""
  ws = pathlib.Path(workspace)
  if not ws.is_dir():
    raise TraceError(f"workspace {ws} does not exist or is not a directory")
  root = runs_dir(ws)
  if not root.is_dir():
    return []
  names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
  done = [n for n in names if (root / n / "run.json").is_file()]
  missing = [n for n in names if n not in done]
  if missing:
    logging.warning("%s: ignoring incomplete runs without run.json (a writer stopped "
                     "before finishing them): %s", root, missing)
  return done


def incomplete_runs(workspace) -> list[str]:
  """Run directories without run.json (their writer crashed or is still writing)."""
  root = runs_dir(workspace)
  if not root.is_dir():
    return []
  return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                and not (p / "run.json").is_file())


def _no_duplicate_keys(pairs):
  out = {}
  for key, value in pairs:
    if key in out:
      raise ValueError(f"duplicate key {key!r}")
    out[key] = value
  return out


def load_json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
  except FileNotFoundError:
    raise TraceError(f"{path}: missing file") from None
  except (OSError, ValueError, RecursionError) as e:
    raise TraceError(f"{path}: not readable JSON ({type(e).__name__}: {e})") from None


def _load_npy(path: pathlib.Path, run_id: str) -> np.ndarray:
  """np.load with the header checked first: truncation and bad headers become TraceErrors."""
  try:
    with open(path, "rb") as f:
      version = npformat.read_magic(f)
      if version == (1, 0):
        shape, _, dtype = npformat.read_array_header_1_0(f)
      elif version == (2, 0):
        shape, _, dtype = npformat.read_array_header_2_0(f)
      else:  # 3.0 exists only for utf-8 field names, never for a numeric array
        raise TraceError(f"{path} (run {run_id!r}): .npy format version {version} is not "
                         "supported (expected 1.0 or 2.0, as np.save writes)")
      if dtype.hasobject or dtype.kind not in "iuf" or dtype.fields is not None:
        raise TraceError(f"{path} (run {run_id!r}): dtype {dtype} is not a numeric array "
                         "(curriculum is integer, losses floating point)")
      want = f.tell() + math.prod(shape) * dtype.itemsize
      have = os.fstat(f.fileno()).st_size
      if have != want:
        raise TraceError(f"{path} (run {run_id!r}): file is {have} bytes but its header "
                         f"({dtype}, shape {shape}) needs {want}; truncated or corrupt")
      f.seek(0)
      return np.load(f, allow_pickle=False)
  except FileNotFoundError:
    raise TraceError(f"{path}: missing file (run {run_id!r})") from None
  except TraceError:
    raise
  except Exception as e:  # numpy's header parser raises many kinds (tokenize, ast, ...)
    raise TraceError(f"{path} (run {run_id!r}): not a readable .npy array "
                     f"({type(e).__name__}: {e})") from None


def _int_field(meta: dict, key: str, where: str) -> int:
  value = meta.get(key)
  if isinstance(value, bool) or not isinstance(value, int):
    raise TraceError(f"{where}: {key!r} must be an integer, got {value!r}")
  return value


def _id_list(meta: dict, key: str, where: str) -> np.ndarray:
  value = meta.get(key)
  if not isinstance(value, list) or not all(
      isinstance(v, int) and not isinstance(v, bool) for v in value):
    raise TraceError(f"{where}: {key!r} must be a list of integer ids")
  if any(v < 0 or v > np.iinfo(np.int64).max for v in value):
    bad = next(v for v in value if v < 0 or v > np.iinfo(np.int64).max)
    raise TraceError(f"{where}: {key!r} has id {bad}; ids are integers in [0, 2**63)")
  return check_ids(np.array(value, dtype=np.int64), key, where)


def read_run(workspace, run_id: str) -> RunTrace:
  """Reads and validates one run; any problem is a TraceError naming the file at fault.

  Readers take no lock: if write_run swaps in a replacement of the run while its three files
  are being read (the directory's inode changes), the read starts again.
  """
  directory = run_dir(workspace, run_id)
  for _ in range(3):
    inode = _inode(directory)
    try:
      trace = _read_run_once(directory, run_id)
    except TraceError:
      if _inode(directory) == inode:
        raise
      continue
    if _inode(directory) == inode:
      return trace
  raise TraceError(f"{directory}: run {run_id!r} was replaced three times while being read")


def _inode(directory: pathlib.Path) -> int | None:
  try:
    return os.stat(directory).st_ino
  except OSError:
    return None


def _read_run_once(directory: pathlib.Path, run_id: str) -> RunTrace:
  meta_path = directory / "run.json"
  if not meta_path.is_file():
    state = ("incomplete (directory exists but has no run.json; its writer stopped before "
             "finishing)" if directory.is_dir() else "not found")
    raise TraceError(f"{meta_path}: run {run_id!r} is {state}")
  meta = load_json(meta_path)
  where = f"{meta_path}"
  if not isinstance(meta, dict):
    raise TraceError(f"{where}: must hold a JSON object, got {type(meta).__name__}")
  missing = [key for key in RESERVED_KEYS if key not in meta]
  if missing:
    raise TraceError(f"{where}: missing keys {missing}")
  if meta["schema"] != SCHEMA or isinstance(meta["schema"], bool):
    raise TraceError(f"{where}: schema {meta['schema']!r} is not supported (expected "
                     f"{SCHEMA})")
  if meta["run_id"] != run_id:
    raise TraceError(f"{where}: run_id {meta['run_id']!r} does not match its directory "
                     f"name {run_id!r}")
  train_ids = _id_list(meta, "train_ids", where)
  test_ids = _id_list(meta, "test_ids", where)
  k = _int_field(meta, "batch_size", where)
  steps = _int_field(meta, "num_steps", where)
  cur_path, loss_path = directory / "curriculum.npy", directory / "losses.npy"
  cur = _load_npy(cur_path, run_id)
  if cur.shape != (steps, k):
    raise TraceError(f"{cur_path} (run {run_id!r}): shape {cur.shape} does not match "
                     f"run.json [num_steps={steps}, batch_size={k}]")
  cur = _as_int32_curriculum(cur, f"{cur_path} (run {run_id!r})")
  losses = _load_npy(loss_path, run_id)
  if losses.shape != (steps + 1, test_ids.size):
    raise TraceError(f"{loss_path} (run {run_id!r}): shape {losses.shape} does not match "
                     f"run.json [num_steps+1={steps + 1}, len(test_ids)={test_ids.size}]")
  losses = _as_float32_losses(losses, f"{loss_path} (run {run_id!r})")
  trace = RunTrace(run_id=run_id, train_ids=train_ids, test_ids=test_ids, batch_size=k,
                   curriculum=cur, losses=losses,
                   metadata={key: v for key, v in meta.items() if key not in RESERVED_KEYS})
  return validate(trace, str(directory))


def write_run(workspace, trace: RunTrace, *, overwrite: bool = False) -> pathlib.Path:
  """Validates, then writes curriculum.npy, losses.npy and run.json (last); returns the dir.

  Writing a run identical to the existing one is a no-op. A different existing complete run
  is a TraceError unless overwrite=True; then the new run is written into a hidden sibling
  `runs/.<run_id>.replace-*` and swapped in atomically (`_swap_in`), so a crash or a reader
  sees the old run or the new one, never a mixture. Holds workspace_lock.
  """
  directory = run_dir(workspace, trace.run_id)
  trace = validate(trace, f"{directory} (being written)")
  with workspace_lock(workspace):
    if (directory / "run.json").exists():
      try:
        same = read_run(workspace, trace.run_id) == trace
      except TraceError:
        same = False
      if same:
        return directory
      if not overwrite:
        raise TraceError(f"{directory}: run {trace.run_id!r} already exists with different "
                         "content; pass overwrite=True to replace it")
      for stale in directory.parent.glob(f".{trace.run_id}.replace-*"):  # a crashed replace
        shutil.rmtree(stale, ignore_errors=True)
      staged = directory.parent / f".{trace.run_id}.replace-{secrets.token_hex(6)}"
      staged.mkdir()
      try:
        _write_files(staged, trace)
        staged = _swap_in(staged, directory)  # staged now names the old run, removed below
      finally:
        shutil.rmtree(staged, ignore_errors=True)
    else:  # absent or incomplete: written in place, run.json last marks it complete
      _write_files(directory, trace)
  return directory


def _write_files(directory: pathlib.Path, trace: RunTrace) -> None:
  atomic_io.save_npy(directory / "curriculum.npy", trace.curriculum)
  atomic_io.save_npy(directory / "losses.npy", trace.losses)
  faults.maybe_kill("trace_write")
  atomic_io.save_json(directory / "run.json", {
      "schema": SCHEMA, "run_id": trace.run_id, "train_ids": trace.train_ids.tolist(),
      "test_ids": trace.test_ids.tolist(), "batch_size": trace.batch_size,
      "num_steps": trace.num_steps, **trace.metadata})


def _swap_in(staged: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
  """Puts directory `staged` at `target` (an existing directory); returns where the old is.

  Linux: renameat2(RENAME_EXCHANGE) swaps the two names in one atomic step. Where that is
  missing (another OS, a filesystem without it) two renames move the old directory aside
  first: a crash between them leaves no run under `target` (both kept under hidden names),
  still never a mixture of the two.
  """
  try:
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
  except (OSError, TypeError):  # no C library handle (Windows)
    renameat2 = None
  if renameat2 is not None:
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(staged), at_fdcwd, os.fsencode(target),
                 rename_exchange) == 0:
      atomic_io._fsync_dir(target.parent)  # pylint: disable=protected-access
      return staged
    code = ctypes.get_errno()
    if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
      raise OSError(code, os.strerror(code), str(target))
  old = staged.with_name(staged.name + "-old")
  os.rename(target, old)
  try:
    os.rename(staged, target)
  except OSError:
    os.rename(old, target)
    raise
  atomic_io._fsync_dir(target.parent)  # pylint: disable=protected-access
  return old


# ----------------------------------------------------------------------------- examples


def write_examples(workspace, split: str, examples: Iterable[dict]) -> pathlib.Path:
  """Writes examples/<split>.jsonl atomically; each dict needs a unique int id >= 0,
  string inputs and targets; other keys are kept."""
  path = examples_path(workspace, split)
  lines, seen = [], set()
  for i, ex in enumerate(examples):
    _check_example(ex, f"{path}: example {i}", seen)
    lines.append(atomic_io.dumps_json(ex, indent=None))
  atomic_io.write_text(path, "".join(lines))
  return path


def _check_example(ex: Any, where: str, seen: set) -> None:
  if not isinstance(ex, dict):
    raise TraceError(f"{where}: must be an object with id, inputs, targets")
  ex_id = ex.get("id")
  if isinstance(ex_id, bool) or not isinstance(ex_id, (int, np.integer)) or ex_id < 0:
    raise TraceError(f"{where}: id must be an integer >= 0, got {ex_id!r}")
  if int(ex_id) in seen:
    raise TraceError(f"{where}: duplicate example id {int(ex_id)}")
  seen.add(int(ex_id))
  for key in ("inputs", "targets"):
    if not isinstance(ex.get(key), str):
      raise TraceError(f"{where}: example id {int(ex_id)} needs a string {key!r}")


def read_examples(workspace, split: str) -> dict[int, dict]:
  """{id: example} from examples/<split>.jsonl; errors name the file and line."""
  path = examples_path(workspace, split)
  try:
    text = path.read_bytes().decode("utf-8")
  except FileNotFoundError:
    raise TraceError(f"{path}: missing file (examples are optional; check "
                     "examples_path(...).exists() first)") from None
  except (OSError, ValueError) as e:
    raise TraceError(f"{path}: not readable ({e})") from None
  out, seen = {}, set()
  for line_no, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      ex = json.loads(line, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError) as e:
      raise TraceError(f"{path}:{line_no}: not valid JSON ({e})") from None
    _check_example(ex, f"{path}:{line_no}", seen)
    out[int(ex["id"])] = ex
  return out
