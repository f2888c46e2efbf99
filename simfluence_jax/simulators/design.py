"""Regression data of Simfluence's learning objective (paper §3.2 Eq. 2/3, Appendix A.1/A.2).

Every recorded transition s = (run r, step t) of every fit run contributes, for each test
example z, one row of the per-z regression

    y_s = α(c_s) · x_s + β(c_s),   x_s = L_{t-1}(z),  y_s = L_t(z),  c_s = batch of step t,

with α(c) = Σ_{i∈c} A_i and β(c) = Σ_{i∈c} B_i. `Transitions` holds these rows for all test
examples at once; the batch matrix Q (S × n, Q[s, i] = multiplicity of example i in batch s)
is shared by all z and stored sparsely as `batches` (positions, -1 = pad). An id listed twice
in one batch gives Q[s, i] = 2: α and β then count it twice, as in the rollout.

Shapes:  batches int32 [S, k];  prev, target, mask float [S, m];  steps int32 [S];
         num_train = n (aux data).

NaN safety: `mask` is 1.0 exactly where both L_{t-1} and L_t are finite and the batch is full
(the run's own batch size: a short batch is simulated as k × its mean, which Eq. 2's rows do
not express, so it is not a regression row; an all-pad step consumes nothing); wherever
mask is 0, `prev` and `target` are stored as 0.0, so a masked entry can never poison
arithmetic downstream.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np


def _trace_error(message: str) -> Exception:
  """TraceError from traces.py (imported lazily: traces.py is a sibling module)."""
  try:
    from simfluence_jax.traces.contract import TraceError  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover - only while traces.py is being written
    return ValueError(message)
  return TraceError(message)


@dataclasses.dataclass(frozen=True)
class Transitions:
  """All recorded transitions of the fit runs (a pytree; `num_train` is static aux data).

  Attributes:
    batches: int32 [S, k] positions into the fit's train_ids (0..n-1); -1 pads.
    prev: float [S, m] observed L_{t-1}(z) (0.0 where mask is 0).
    target: float [S, m] observed L_t(z) (0.0 where mask is 0).
    mask: float [S, m] 1.0 where both losses are recorded and finite, else 0.0.
    num_train: n, the number of train positions (columns of A and B).
    steps: int32 [S] each row's step within its run (0-based: row s is the transition
      L_{t-1} -> L_t with t = steps[s] + 1); the step terms' index. None when unknown.
  """
  batches: np.ndarray
  prev: np.ndarray
  target: np.ndarray
  mask: np.ndarray
  num_train: int
  steps: np.ndarray | None = None

  @property
  def num_steps(self) -> int:
    return int(self.batches.shape[0])

  @property
  def num_test(self) -> int:
    return int(self.prev.shape[1])


jax.tree_util.register_dataclass(
    Transitions, data_fields=["batches", "prev", "target", "mask", "steps"],
    meta_fields=["num_train"])


def _aligned_empty(shape, dtype) -> np.ndarray:
  dtype = np.dtype(dtype)
  size = int(np.prod(shape)) * dtype.itemsize
  buf = np.empty(size + 64, np.uint8)
  offset = (-buf.ctypes.data) % 64
  return buf[offset:offset + size].view(dtype).reshape(shape)


def aligned_array(a, dtype=None) -> np.ndarray:
  """A C-contiguous copy of `a` whose data starts on a 64-byte boundary.

  jax.device_put of such an array on CPU aliases it instead of copying (measured: 51 MB in
  0.04 ms instead of 26 ms), which matters for the [S, m] arrays of the hot path.
  """
  a = np.asarray(a)
  out = _aligned_empty(a.shape, a.dtype if dtype is None else dtype)
  out[...] = a
  return out


def _positions(run, train_ids: np.ndarray, order: np.ndarray) -> np.ndarray:
  """Curriculum ids -> positions into train_ids; -1 pads stay -1. Raises TraceError."""
  cur = np.asarray(run.curriculum)
  if cur.ndim != 2 or not np.issubdtype(cur.dtype, np.integer):
    raise _trace_error(f"run {run.run_id!r}: curriculum must be an integer [T, k] array, "
                       f"got {cur.dtype} {cur.shape}")
  cur = cur.astype(np.int64)
  sorted_ids = train_ids[order]
  where = np.clip(np.searchsorted(sorted_ids, cur), 0, max(train_ids.size - 1, 0))
  found = (sorted_ids[where] == cur) if train_ids.size else np.zeros(cur.shape, bool)
  bad = np.argwhere((cur >= 0) & ~found)
  if bad.size:
    t, j = (int(v) for v in bad[0])
    raise _trace_error(
        f"run {run.run_id!r} step {t + 1} (curriculum row {t}, slot {j}): train id "
        f"{int(cur[t, j])} is not among the fit's {train_ids.size} train ids; add it to "
        "train_ids or drop the run from the fit")
  return np.where(cur >= 0, order[where] if train_ids.size else -1, -1).astype(np.int32)


def build_transitions(runs: Sequence, *, train_ids, test_ids) -> Transitions:
  """Concatenates every step of every run into one regression data set (Appendix A.1).

  Args:
    runs: RunTrace-like objects (run_id, train_ids, test_ids, batch_size, curriculum [T, k]
      train ids with -1 pads, losses [T+1, m_r] with NaN = not recorded).
    train_ids: int [n] the fit's train ids; position p of train_ids is column p of A, B.
    test_ids: int [m] the fit's test ids; column j of prev/target/mask is test_ids[j].
      A run's columns are matched by id: a run may record a subset or permutation of
      test_ids (absent test ids get mask 0); test ids a run has beyond test_ids are ignored.

  Returns:
    Transitions with S = Σ_r T_r rows in run order, k = the largest batch width. The float
    dtype is float64 if any run's losses are float64, else float32.

  Raises:
    TraceError naming the run, step and id of a curriculum id not in train_ids, or a
    losses array whose shape does not match the curriculum and test ids.
  """
  train_ids = np.asarray(train_ids, np.int64).reshape(-1)
  test_ids = np.asarray(test_ids, np.int64).reshape(-1)
  n, m = train_ids.size, test_ids.size
  train_index = {int(i): p for p, i in enumerate(train_ids.tolist())}
  test_index = {int(i): j for j, i in enumerate(test_ids.tolist())}
  if len(train_index) != n or len(test_index) != m:
    raise ValueError("train_ids and test_ids must not contain duplicates")
  dtype = np.float32
  for run in runs:
    if np.asarray(run.losses).dtype == np.float64:
      dtype = np.float64
  order = np.argsort(train_ids, kind="stable")
  k = max([int(np.asarray(r.curriculum).shape[1]) for r in runs] + [1])

  checked = []
  for run in runs:
    pos = _positions(run, train_ids, order)
    losses = np.asarray(run.losses)
    run_test = np.asarray(run.test_ids, np.int64).reshape(-1)
    if losses.shape != (pos.shape[0] + 1, run_test.size):
      raise _trace_error(
          f"run {run.run_id!r}: losses have shape {losses.shape}, expected "
          f"({pos.shape[0] + 1}, {run_test.size}) for {pos.shape[0]} curriculum steps and "
          f"{run_test.size} test ids")
    full = (pos >= 0).sum(1) == pos.shape[1]   # a full batch of the run's own size
    checked.append((np.pad(pos, ((0, 0), (0, k - pos.shape[1])), constant_values=-1),
                    losses, run_test, full))
  num_steps = sum(pos.shape[0] for pos, _, _, _ in checked)
  batches = np.concatenate([pos for pos, _, _, _ in checked] or [np.zeros((0, k), np.int32)])
  prev, target, mask = (_aligned_empty((num_steps, m), dtype) for _ in range(3))
  row = 0
  for pos, losses, run_test, full in checked:   # one run's block at a time: in cache
    rows = slice(row, row + pos.shape[0])
    row += pos.shape[0]
    p, t = prev[rows], target[rows]
    if np.array_equal(run_test, test_ids):
      p[...], t[...] = losses[:-1], losses[1:]
    else:  # map columns by id; test ids absent from the run stay NaN (masked)
      src = [c for c, i in enumerate(run_test.tolist()) if i in test_index]
      dst = [test_index[int(run_test[c])] for c in src]
      p.fill(np.nan)
      t.fill(np.nan)
      p[:, dst], t[:, dst] = losses[:-1, src], losses[1:, src]
    ok = np.isfinite(p)
    ok &= np.isfinite(t)
    ok &= full[:, None]   # short batches (rollout: k × their mean) are not regressed on
    np.copyto(mask[rows], ok)
    np.logical_not(ok, out=ok)
    np.copyto(p, 0, where=ok)
    np.copyto(t, 0, where=ok)
  steps = np.concatenate([np.arange(pos.shape[0], dtype=np.int32) for pos, _, _, _ in checked]
                         or [np.zeros((0,), np.int32)])
  return Transitions(batches=batches, prev=prev, target=target, mask=mask, num_train=n,
                     steps=steps)


def step_counts(tr: Transitions) -> np.ndarray:
  """int64 [m, n]: number of recorded (unmasked) steps whose batch contains train position i.

  A position listed twice in one batch counts once (it is one step).
  """
  from scipy import sparse  # pylint: disable=g-import-not-at-top
  batches = np.asarray(tr.batches)
  rows, cols = np.nonzero(batches >= 0)
  q = sparse.csr_matrix((np.ones(rows.size), (rows, batches[rows, cols])),
                        shape=(batches.shape[0], tr.num_train))
  q.data[:] = 1.0  # duplicates were summed by the constructor: back to a 0/1 indicator
  mask = np.asarray(tr.mask)   # float32 sums of 0/1 are exact below 2^24 steps
  return np.rint(np.asarray(q.astype(mask.dtype).T @ mask).T).astype(np.int64)


def identifiability(tr: Transitions, *, rtol: float = 1e-6) -> dict:
  """Appendix A.2 diagnostics per test example (a compact, JSON-able dict).

  Without regularisation (λ = 0) Simfluence-Linear has a unique solution only if every
  train example is seen in ≥ 2 recorded steps (else its A and B columns are proportional)
  and the test loss is not constant (else X^α = L · X^β). With λ > 0 such parameters are
  determined by the prior alone. Returns:

    {"unidentified": {test column (int): [train positions seen < 2 times]},  # only non-empty
     "constant_loss": [test columns whose recorded loss is constant],
     "num_unidentified": total number of (test, train) pairs listed,
     "min_steps_per_train": smallest per-pair recorded step count}

  Columns and positions index test_ids / train_ids of the fit (the caller maps them to
  ids). A loss counts as constant when its recorded values (L_{t-1} and L_t over unmasked
  steps) span at most rtol · max|L|; test examples with no recorded step are not listed
  as constant (all their train positions are unidentified instead).
  """
  counts = step_counts(tr)
  unidentified = {}
  for col in np.flatnonzero((counts < 2).any(axis=1)):
    unidentified[int(col)] = np.flatnonzero(counts[col] < 2).astype(int).tolist()
  mask = np.asarray(tr.mask) > 0
  prev, target = np.asarray(tr.prev), np.asarray(tr.target)
  hi = np.maximum(np.max(prev, axis=0, where=mask, initial=-np.inf),
                  np.max(target, axis=0, where=mask, initial=-np.inf))
  lo = np.minimum(np.min(prev, axis=0, where=mask, initial=np.inf),
                  np.min(target, axis=0, where=mask, initial=np.inf))
  big = np.maximum(np.abs(hi), np.abs(lo))
  observed = mask.any(axis=0)
  constant = observed & (hi - lo <= rtol * big)
  return {
      "unidentified": unidentified,
      "constant_loss": np.flatnonzero(constant).astype(int).tolist(),
      "num_unidentified": int(sum(len(v) for v in unidentified.values())),
      "min_steps_per_train": int(counts.min()) if counts.size else 0,
  }


__all__ = ["Transitions", "aligned_array", "build_transitions", "identifiability",
           "step_counts"]
