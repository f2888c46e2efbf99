"""TraceWriter: log one run's trace from any training loop (PyTorch, Keras, numpy, JAX).

  with TraceWriter(workspace, "run_0", train_ids=pool_ids, test_ids=test_ids,
                   batch_size=k) as writer:
    writer.initial(test_losses())          # L_0 [m], column j = test_ids[j], before any step
    for batch_ids in curriculum:           # c_t: at most k train ids (a short batch is padded)
      train_step(batch_ids)
      writer.step(batch_ids, test_losses())  # L_t [m] after step t

The run is kept in memory (a run is T × m floats) and written through the trace contract
(`contract.write_run`, WORKSPACE.md) only when the with-block ends cleanly or `close()` is
called: it becomes visible to `list_runs` / `fit` at that moment, atomically. An exception
inside the with-block writes nothing and leaves a run already there under that id untouched;
a clean close over an existing run replaces it atomically (contract.write_run overwrite=True).
No lock is held while the loop runs; close() takes the workspace lock, waiting up to
`LOCK_WAIT_S` for another writer (say, a parallel run's) to finish.

The examples files (`examples/{train,test}.jsonl`) are optional: fit, evaluate and simulate
never read them; the report shows their texts when present, and the counterfactual bank
(`counterfactuals`) groups its scores by their targets. Write them once per workspace with
`contract.write_examples(workspace, split, [{"id", "inputs", "targets"}, ...])`.

numpy and the stdlib (absl logging through the contract): importing this module never
imports JAX.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import time
from typing import Any

import numpy as np

from simfluence_jax.traces import contract
from simfluence_jax.traces.contract import TraceError

LOCK_WAIT_S = 60.0  # close(): how long to wait for another process holding the workspace lock


class TraceWriter:
  """Collects one run (L_0, then c_t and L_t per step) and writes it on a clean close.

  Args:
    workspace: the workspace directory (created if absent).
    run_id: the run's id (letters, digits, `._+=@,-`; not starting with '.').
    train_ids: int [n] the ids this run may draw from (unique, >= 0).
    test_ids: int [m] the test examples whose losses are recorded, in the order of the
      losses passed to `initial` and `step` (unique, >= 0).
    batch_size: k, the most ids one step consumes.
    metadata: free JSON metadata stored in run.json (seed, learning rate, ...).

  Every error is a `TraceError` (a ValueError) naming the run and, for a step, its number
  t (1-based, as in the paper). The header (ids, batch size, metadata) is checked here, by
  the contract's own `validate`, so a typo fails before the training loop starts.
  """

  def __init__(self, workspace: str | os.PathLike, run_id: str, *, train_ids: Any,
               test_ids: Any, batch_size: int, metadata: dict | None = None):
    self._workspace = pathlib.Path(workspace)
    base = f"TraceWriter({str(self._workspace)!r})"
    contract.check_name(run_id, "run_id", base)
    where = f"{base}: run {run_id!r}"
    train = contract.check_ids(train_ids, "train_ids", where)
    if train.size == 0:
      raise TraceError(f"{where}: train_ids is empty; a run draws from at least one example")
    test = contract.check_ids(test_ids, "test_ids", where)
    # A one-step probe run with this header: validate checks batch_size, test_ids and the
    # metadata (reserved keys, JSON) exactly as write_run will at close.
    valid_k = (isinstance(batch_size, (int, np.integer)) and not isinstance(batch_size, bool)
               and batch_size >= 1)
    probe = np.full((1, int(batch_size) if valid_k else 1), -1, np.int32)
    probe[0, 0] = train[0]
    header = contract.validate(contract.RunTrace(
        run_id=run_id, train_ids=train, test_ids=test, batch_size=batch_size,
        curriculum=probe, losses=np.full((2, test.size), np.nan, np.float32),
        metadata={} if metadata is None else metadata), base)
    self._header = header
    self._train_set = frozenset(train.tolist())
    self._where = where
    self._initial: np.ndarray | None = None  # float32 [m]
    self._rows: list[np.ndarray] = []        # int32 [k] per step, -1 padded
    self._losses: list[np.ndarray] = []      # float32 [m] per step
    self._state = "open"                     # open | closed | abandoned
    self._directory: pathlib.Path | None = None

  @property
  def run_id(self) -> str:
    return self._header.run_id

  @property
  def num_steps(self) -> int:
    """Steps recorded so far (T once closed)."""
    return len(self._rows)

  def __enter__(self) -> "TraceWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> bool:
    if exc_type is None:
      self.close()
    else:  # the loop failed: write nothing, keep whatever run is on disk
      self._abandon()
    return False

  def initial(self, losses: Any) -> None:
    """Records L_0: float [m], the loss of every test example (test_ids order) before step 1."""
    self._check_open()
    if self._initial is not None:
      raise TraceError(f"{self._where}: initial() was already called; L_0 is recorded once, "
                       "before the first step")
    self._initial = self._loss_row(losses, f"{self._where}, initial losses (step 0)")

  def step(self, batch_ids: Any, losses: Any) -> None:
    """Records step t = num_steps + 1: the train ids it consumed and the losses after it.

    batch_ids: int [<= k] ids of train_ids, in batch order (a duplicate is a duplicated
      example); fewer than k is a short batch, padded with -1; none is a no-op step.
    losses: float [m] L_t, finite, in test_ids order; None = not recorded at this step
      (stored as NaN, as the contract's sparse recording).
    """
    self._check_open()
    t = len(self._rows) + 1
    where = f"{self._where}, step {t}"
    if self._initial is None:
      raise TraceError(f"{where}: step() before initial(); record L_0 (the test losses "
                       "before training) first")
    row = self._batch_row(batch_ids, where)
    if losses is None:
      loss_row = np.full(self._header.test_ids.size, np.nan, np.float32)
    else:
      loss_row = self._loss_row(losses, where)
    self._rows.append(row)
    self._losses.append(loss_row)

  def close(self) -> pathlib.Path:
    """Validates and writes the run (replacing one of that id atomically); returns its dir.

    Called by a clean `__exit__`. A second close() is a no-op. If writing fails (an invalid
    run, a lock still held after LOCK_WAIT_S) nothing is written and the writer stays open,
    so close() may be called again.
    """
    if self._state == "closed":
      return self._directory
    self._check_open()
    if self._initial is None:
      raise TraceError(f"{self._where}: closed before initial(); nothing was written")
    k = self._header.batch_size
    trace = contract.RunTrace(
        run_id=self.run_id, train_ids=self._header.train_ids,
        test_ids=self._header.test_ids, batch_size=k,
        curriculum=np.stack(self._rows) if self._rows else np.zeros((0, k), np.int32),
        losses=np.stack([self._initial, *self._losses]), metadata=self._header.metadata)
    deadline = time.monotonic() + LOCK_WAIT_S
    with contextlib.ExitStack() as stack:
      while True:  # another process may hold the lock for its own (short) write
        try:
          stack.enter_context(contract.workspace_lock(self._workspace))
          break
        except TraceError:
          if time.monotonic() >= deadline:
            raise
          time.sleep(0.05)
      self._directory = contract.write_run(self._workspace, trace, overwrite=True)
    self._state = "closed"
    self._rows, self._losses = [], []
    return self._directory

  # ------------------------------------------------------------------------- internals

  def _abandon(self) -> None:
    self._state = "abandoned"
    self._rows, self._losses, self._initial = [], [], None

  def _check_open(self) -> None:
    if self._state == "closed":
      raise TraceError(f"{self._where}: the writer is closed (the run is written to "
                       f"{self._directory}); open a new TraceWriter to write it again")
    if self._state == "abandoned":
      raise TraceError(f"{self._where}: the writer was abandoned after an exception in its "
                       "with-block and nothing was written; open a new TraceWriter")

  def _loss_row(self, losses: Any, where: str) -> np.ndarray:
    """float32 [m] from `losses`, or a TraceError naming `where`."""
    try:
      arr = np.asarray(losses)
    except Exception as e:  # e.g. a torch tensor that requires grad or lives on a GPU
      raise TraceError(f"{where}: losses cannot be read as a numpy array ({e}); pass a list "
                       "or numpy array (torch: .detach().cpu().numpy())") from None
    m = self._header.test_ids.size
    if arr.dtype.kind not in "fiu":
      raise TraceError(f"{where}: losses must be numbers, got dtype {arr.dtype}")
    if arr.shape != (m,):
      raise TraceError(f"{where}: losses has shape {arr.shape}, expected [m={m}] (one loss "
                       "per test id, in test_ids order)")
    with np.errstate(over="ignore"):
      row = arr.astype(np.float32)
    bad = np.nonzero(~np.isfinite(row))[0]
    if bad.size:
      j = int(bad[0])
      raise TraceError(f"{where}: loss of test example id {int(self._header.test_ids[j])} "
                       f"(column {j}) is {arr[j].item()!r}, not a finite float32; a diverged "
                       "run must stop (or pass losses=None to step() for not recorded)")
    return row

  def _batch_row(self, batch_ids: Any, where: str) -> np.ndarray:
    """int32 [k]: the batch's ids then -1 padding, or a TraceError naming `where`."""
    ids = np.asarray(batch_ids)
    k = self._header.batch_size
    if ids.ndim != 1:
      raise TraceError(f"{where}: batch_ids must be a 1-D list of ids, got shape {ids.shape}")
    if ids.size and ids.dtype.kind not in "iu":
      raise TraceError(f"{where}: batch_ids must be integer ids, got dtype {ids.dtype}")
    if ids.size > k:
      raise TraceError(f"{where}: {ids.size} batch ids, more than batch_size={k}")
    unknown = [i for i in ids.tolist() if i not in self._train_set]
    if unknown:
      hint = (" (pass only the ids consumed; the writer pads a short batch with -1 itself)"
              if unknown[0] == -1 else "")
      raise TraceError(f"{where}: batch id {unknown[0]} is not in the run's train_ids{hint}")
    if ids.size and int(ids.max()) > np.iinfo(np.int32).max:
      raise TraceError(f"{where}: batch id {int(ids.max())} is beyond int32; the contract "
                       "stores curriculum ids as int32")
    row = np.full(k, -1, np.int32)
    row[:ids.size] = ids
    return row
