"""Streaming, sharded Simfluence fits: many test examples, bounded memory (paper Eq. 2).

`simulators.fit` builds every transition of every fit run for every test example at once
([S, m] arrays: 1.5 GB for S = 1,280 and m = 100,000 before the solver starts). Here the m
test examples are fitted in chunks of `chunk_size` columns, and within a chunk the fit runs
are visited ONE AT A TIME from memory-mapped `losses.npy` files (each run is validated by
`traces.read_run` once, then only the chunk's columns are read). Memory is O(chunk · ·)
plus the [m, n] result, whatever the number of runs or test examples.

Per-chunk solvers, both minimising exactly the objective of `ridge` (Eq. 2 per test z):

  "normal"  Normal-equation statistics accumulated run by run. With Q_r [T_r, n] run r's
            batch matrix (multiplicities), x = L_{t-1}(z), y = L_t(z), μ the mask:
                G_w(z) = Σ_r Q_rᵀ diag(μ w) Q_r   for w ∈ {x², x, 1}       [n, n] each
                h_a(z) = Σ_r Q_rᵀ (μ x y),   h_b(z) = Σ_r Q_rᵀ (μ y)         [n]
            and the linear system [[G_xx + λI, G_x], [G_x, G_1 + λI]] [A; B] = [h_a; h_b]
            (additive: (G_1 + λI) B = Σ Qᵀ(μ(y − x)); multiplicative: (G_xx + λI) A = h_a).
            Σ_t w_t q_t q_tᵀ touches only the k² slot pairs of each step, so each G_w is one
            sparse [n², T_r] × dense [T_r, c] product per run: O(T_r k² c), not O(T_r n² c).
            Statistics are float64 [n², c] (size independent of the number of runs — the
            form to use when S = Σ_r T_r is large). Solve: Jacobi-equilibrated float32
            Cholesky per test example, batched and SHARDED over a 1-D device mesh "tests"
            (each device factors its own test examples; no communication), then two steps of
            iterative refinement with float64 residuals, giving float64-level accuracy while
            cond · 2⁻²⁴ ≪ 1. Needs λ > 0. Cost O(p³) per test example (p = 2n linear),
            memory O(p²) per test example whatever the number of runs.
  "pcg"     The chunk's transitions assembled run by run ([S, c] arrays) and solved by the
            production PCG (`ridge.solve_path`): O(S · k) per iteration, any n (many-shot).
  "auto"    whichever keeps less per test example: "normal" when its p(p+1)/2 statistics
            are fewer than the 3·S numbers of the data (many runs; p ≤ 512, λ > 0), else
            "pcg". For the paper's few-shot sizes (S = 1,280, p = 200) that is "pcg".

λ selection (as `simulators.select_by_validation`): validation runs are rolled out per
chunk for every λ; each run's squared errors and counts are summed across chunks, so the
validation all-steps MSE (mean over runs of each run's MSE) equals the in-memory one. With
more than one λ and too little memory to keep every λ's [m, n] parameters (> `keep_bytes`),
a second pass re-solves the chosen λ.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np
import scipy.sparse

from simfluence_jax.simulators import design
from simfluence_jax.simulators import ridge
from simfluence_jax.simulators import rollout as rollout_lib
from simfluence_jax.simulators import simfluence as simulators
from simfluence_jax.traces import contract as traces
from simfluence_jax.traces.fit_params import FitParams
from simfluence_jax.traces.contract import TraceError

SOLVERS = ("auto", "normal", "pcg")
_NORMAL_MAX_P = 512


# ------------------------------------------------------------------------------ traces
@dataclasses.dataclass(frozen=True, eq=False)
class LazyRun:
  """A validated run whose losses [T+1, m_r] stay on disk until `columns` reads some."""
  run_id: str
  train_ids: np.ndarray
  test_ids: np.ndarray
  batch_size: int
  curriculum: np.ndarray
  losses_path: pathlib.Path
  losses_shape: tuple

  def columns(self, index) -> np.ndarray:
    """float32 losses[:, index] (a slice or int array). The file is mapped only for the
    read, so pages read for earlier chunks do not stay resident in this process."""
    losses = np.load(self.losses_path, mmap_mode="r", allow_pickle=False)
    if losses.shape != self.losses_shape:
      raise TraceError(f"{self.losses_path} (run {self.run_id!r}): changed on disk during "
                       f"the fit (shape {losses.shape}, was {self.losses_shape})")
    out = np.array(losses[:, index], np.float32)
    del losses
    return out


def open_runs(workspace, run_ids: Sequence[str]) -> list[LazyRun]:
  """Validates each run fully (one in memory at a time), then maps its losses lazily."""
  out, seen = [], set()
  for run_id in run_ids:
    if not run_id or run_id in seen:
      raise ValueError(f"run list has an empty or repeated run id: {run_id!r}")
    seen.add(run_id)
    trace = traces.read_run(workspace, run_id)
    path = traces.run_dir(workspace, run_id) / "losses.npy"
    out.append(LazyRun(run_id, trace.train_ids, trace.test_ids, trace.batch_size,
                       trace.curriculum, path, tuple(trace.losses.shape)))
  return out


@dataclasses.dataclass(frozen=True)
class _ChunkRun:
  """The columns of one run that fall in a chunk: what design.build_transitions reads."""
  run_id: str
  train_ids: np.ndarray
  test_ids: np.ndarray
  curriculum: np.ndarray
  losses: np.ndarray


class _Columns:
  """Where each of a run's test columns sits among the fit's test ids."""

  def __init__(self, run: LazyRun, index: dict[int, int]):
    self.run = run
    pos = [index.get(int(t), -1) for t in np.asarray(run.test_ids).tolist()]
    self.pos = np.asarray(pos, np.int64)

  def chunk(self, start: int, stop: int) -> tuple[_ChunkRun, np.ndarray]:
    """(the run's columns with fit positions in [start, stop), their positions − start)."""
    sel = np.flatnonzero((self.pos >= start) & (self.pos < stop))
    contiguous = sel.size and sel[-1] - sel[0] + 1 == sel.size   # a strided read
    losses = self.run.columns(slice(sel[0], sel[-1] + 1) if contiguous else sel)
    view = _ChunkRun(self.run.run_id, self.run.train_ids, self.run.test_ids[sel],
                     self.run.curriculum, losses)
    return view, self.pos[sel] - start


# ------------------------------------------------------------------- normal equations
@dataclasses.dataclass(frozen=True)
class NormalEquations:
  """Sufficient statistics of Eq. 2 for c test examples (float64; None = unused by kind).

  g_xx, g_x, g_1: [n·n, c] flattened G_w (row i·n + j);  h_a, h_b: [n, c].
  """
  g_xx: np.ndarray | None
  g_x: np.ndarray | None
  g_1: np.ndarray | None
  h_a: np.ndarray | None
  h_b: np.ndarray | None
  num_train: int


def empty_statistics(kind: str, num_train: int, num_test: int) -> NormalEquations:
  n, c = num_train, num_test
  z = lambda rows: np.zeros((rows, c))
  use = {"linear": (1, 1, 1, 1, 1), "additive": (0, 0, 1, 0, 1),
         "multiplicative": (1, 0, 0, 1, 0)}[simulators.canonical_kind(kind)]
  shapes = (n * n, n * n, n * n, n, n)
  return NormalEquations(*[z(rows) if u else None for u, rows in zip(use, shapes)],
                         num_train=n)


def accumulate(stats: NormalEquations, tr: design.Transitions) -> NormalEquations:
  """Adds one run's transitions (tr.prev/target/mask [T, c]) to the statistics."""
  n = stats.num_train
  batches = np.asarray(tr.batches, np.int64)
  steps, k = batches.shape
  x, y, mu = (np.asarray(a, np.float64) for a in (tr.prev, tr.target, tr.mask))
  # Slot pairs (a, b) of each step: Q[t, i] Q[t, j] = #{(a, b): slot a holds i, b holds j},
  # so summing ones over pairs reproduces multiplicities (an id twice gives 4 on (i, i)).
  left = np.repeat(batches[:, :, None], k, axis=2)
  right = np.repeat(batches[:, None, :], k, axis=1)
  ok = (left >= 0) & (right >= 0)
  step = np.broadcast_to(np.arange(steps)[:, None, None], ok.shape)
  pairs = scipy.sparse.csr_matrix(
      (np.ones(int(ok.sum())), ((left * n + right)[ok], step[ok])), shape=(n * n, steps))
  slot_ok = batches >= 0
  q = scipy.sparse.csr_matrix(
      (np.ones(int(slot_ok.sum())), (batches[slot_ok],
                                     np.broadcast_to(np.arange(steps)[:, None],
                                                     batches.shape)[slot_ok])),
      shape=(n, steps))                                   # Qᵀ [n, T], duplicates summed
  plus = lambda acc, w: None if acc is None else acc + w()
  additive = stats.g_xx is None
  return NormalEquations(
      g_xx=plus(stats.g_xx, lambda: pairs @ (mu * x * x)),
      g_x=plus(stats.g_x, lambda: pairs @ (mu * x)),
      g_1=plus(stats.g_1, lambda: pairs @ mu),
      h_a=plus(stats.h_a, lambda: q @ (mu * x * y)),
      h_b=plus(stats.h_b, lambda: q @ (mu * (y - x) if additive else mu * y)),
      num_train=n)


def _system(stats: NormalEquations) -> tuple[np.ndarray, np.ndarray]:
  """[c, p, p] Gram matrices (without λ) and [c, p] right-hand sides, float64."""
  n = stats.num_train
  grid = lambda g: g.T.reshape(-1, n, n)
  if stats.g_x is not None:                                             # linear
    gxx, gx, g1 = grid(stats.g_xx), grid(stats.g_x), grid(stats.g_1)
    gram = np.concatenate([np.concatenate([gxx, gx], 2), np.concatenate([gx, g1], 2)], 1)
    return gram, np.concatenate([stats.h_a.T, stats.h_b.T], 1)
  if stats.g_1 is not None:                                             # additive
    return grid(stats.g_1), stats.h_b.T
  return grid(stats.g_xx), stats.h_a.T                                  # multiplicative


@jax.jit
def _cholesky(h):
  return jnp.linalg.cholesky(h)


@jax.jit
def _cho_solve(factor, r):
  return jax.scipy.linalg.cho_solve((factor, True), r[..., None])[..., 0]


def tests_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh "tests" over `devices` (default: this process's devices)."""
  devices = jax.local_devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), ("tests",))


def solve_normal(stats: NormalEquations, *, kind: str, lams: Sequence[float],
                 mesh: Mesh | None = None, refine_steps: int = 2
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
  """Solves the accumulated normal equations for every λ > 0: [(A, B) float64 [c, n]]."""
  kind = simulators.canonical_kind(kind)
  if any(not float(v) > 0 for v in lams):
    raise ValueError(f"the normal-equation solver needs every λ > 0, got {list(lams)}; "
                     "use solver='pcg' for λ = 0")
  gram, rhs = _system(stats)          # gram is modified in place below and restored
  c, p = rhs.shape
  n = stats.num_train
  mesh = tests_mesh() if mesh is None else mesh
  pad = (-c) % mesh.devices.size
  sharding = NamedSharding(mesh, PartitionSpec("tests"))
  diag = np.arange(p)
  scaled = np.empty((c + pad, p, p), np.float32)
  scaled[c:] = np.eye(p, dtype=np.float32)                  # padding: identity systems
  diag0 = gram[:, diag, diag].copy()
  out = []
  for lam in lams:
    gram[:, diag, diag] = diag0 + float(lam)
    scale = 1.0 / np.sqrt(gram[:, diag, diag])               # Jacobi equilibration
    np.multiply(gram, scale[:, :, None], out=scaled[:c], casting="same_kind")
    scaled[:c] *= scale[:, None, :].astype(np.float32)
    factor = _cholesky(jax.device_put(scaled, sharding))

    def solve32(r):
      r32 = np.zeros((c + pad, p), np.float32)
      r32[:c] = r * scale
      w = np.asarray(_cho_solve(factor, jax.device_put(r32, sharding)), np.float64)[:c]
      return w * scale

    w = solve32(rhs)
    for _ in range(refine_steps):                          # float64 residuals
      w = w + solve32(rhs - np.matmul(gram, w[:, :, None])[:, :, 0])
    if not np.isfinite(w).all():
      bad = int(np.flatnonzero(~np.isfinite(w).all(1))[0])
      raise FloatingPointError(f"normal equations of chunk test column {bad} at λ={lam} "
                               "could not be solved (non-finite)")
    zeros = np.zeros((c, n))
    out.append({"linear": (w[:, :n], w[:, n:]), "additive": (zeros, w),
                "multiplicative": (w, zeros)}[kind])
  return out


# --------------------------------------------------------------------------- the fit
def _solve_chunk(fit_cols: Sequence[_Columns], start: int, stop: int, *, kind: str,
                 train_ids, test_ids, lams, solver: str, mesh) -> list:
  chunk_ids = test_ids[start:stop]
  if solver == "pcg":
    views = [cols.chunk(start, stop)[0] for cols in fit_cols]
    tr = design.build_transitions(views, train_ids=train_ids, test_ids=chunk_ids)
    return [(np.asarray(a, np.float64), np.asarray(b, np.float64))
            for a, b in ridge.solve_path(tr, kind=kind, lams=lams)]
  stats = empty_statistics(kind, train_ids.size, chunk_ids.size)
  for cols in fit_cols:                                   # one run at a time
    view, _ = cols.chunk(start, stop)
    stats = accumulate(stats, design.build_transitions(
        [view], train_ids=train_ids, test_ids=chunk_ids))
  return solve_normal(stats, kind=kind, lams=lams, mesh=mesh)


class _Validation:
  """Per validation run and λ: squared errors and counts summed over chunks."""

  def __init__(self, val_cols: Sequence[_Columns], train_ids, num_lams: int):
    self.cols = val_cols
    self.positions = []
    for cols in val_cols:
      try:
        self.positions.append(rollout_lib.ids_to_positions(cols.run.curriculum, train_ids))
      except ValueError as e:
        raise TraceError(f"validation run {cols.run.run_id!r} curriculum: {e}") from None
      missing = np.flatnonzero(cols.pos < 0)
      if missing.size:
        raise TraceError(f"run {cols.run.run_id!r}: test example "
                         f"{int(cols.run.test_ids[missing[0]])} has no fitted simulator")
    self.sse = np.zeros((num_lams, len(val_cols)))
    self.count = np.zeros(len(val_cols))

  def add(self, start, stop, params_by_lam, kind):
    for r, (cols, pos) in enumerate(zip(self.cols, self.positions)):
      view, where = cols.chunk(start, stop)
      if not where.size:
        continue
      truth = view.losses
      bad = np.flatnonzero(~np.isfinite(truth[0]))
      if bad.size:
        raise TraceError(f"run {view.run_id!r} step 0 losses: initial loss of test example "
                         f"{int(view.test_ids[bad[0]])} is not finite")
      recorded = np.isfinite(truth[1:])
      self.count[r] += recorded.sum()
      for j, (a, b) in enumerate(params_by_lam):
        pred = np.asarray(rollout_lib.rollout(
            np.asarray(a[where], np.float32), np.asarray(b[where], np.float32), kind=kind,
            batches=pos, initial_losses=truth[0]), np.float64)
        err = np.where(recorded, pred[1:] - truth[1:], 0.0)
        self.sse[j, r] += np.sum(err ** 2)

  def mse(self) -> np.ndarray:
    """[num_lams] mean over runs of each run's all-steps MSE (nan where nothing recorded)."""
    with np.errstate(invalid="ignore", divide="ignore"):
      return np.mean(self.sse / self.count[None, :], axis=1)


def fit_streaming(workspace, fit_run_ids: Sequence[str], *, simulator: str,
                  lam: float | None = None,
                  lam_grid: Sequence[float] = simulators.DEFAULT_LAM_GRID,
                  val_run_ids: Sequence[str] = (), chunk_size: int | None = None,
                  solver: str = "auto", mesh: Mesh | None = None,
                  keep_bytes: int = 256 << 20) -> tuple[FitParams, dict]:
  """`simulators.fit` for workspaces too large to hold: same objective, same λ selection.

  Args:
    workspace, fit_run_ids, val_run_ids: runs are read lazily from the workspace.
    simulator, lam, lam_grid: as simulators.fit.
    chunk_size: test examples per chunk (memory ∝ chunk_size · n² for "normal",
      chunk_size · S for "pcg"; results do not depend on it beyond float rounding).
      None: about 32 MB of working data per chunk.
    solver: "auto" | "normal" | "pcg" (module docstring).
    mesh: 1-D mesh "tests" sharding each chunk's solve (default: all local devices).
    keep_bytes: keep every λ's parameters in memory up to this size, else re-solve.
  """
  kind, variant = simulators.parse_simulator(simulator)
  if variant not in (None, "paper"):
    raise ValueError(f"the streaming fit solves the paper's terms only; {simulator!r} asks "
                     f"for the {variant!r} variant (fit it in memory)")
  if solver not in SOLVERS:
    raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
  if chunk_size is not None and chunk_size < 1:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  if not fit_run_ids:
    raise ValueError("fit needs at least one fit run")
  overlap = set(fit_run_ids) & set(val_run_ids)
  if overlap:
    raise ValueError(f"runs {sorted(overlap)} are both fit and validation runs")
  if lam is None and not val_run_ids and len(lam_grid) != 1:
    raise ValueError("either give lam, a one-value lam_grid, or validation runs to choose "
                     "λ from lam_grid")
  grid = [float(lam)] if lam is not None else sorted(float(v) for v in lam_grid)
  if not grid or min(grid) < 0:
    raise ValueError(f"lam_grid must be non-empty and non-negative, got {lam_grid}")
  t0 = time.perf_counter()
  fit_runs = open_runs(workspace, fit_run_ids)
  val_runs = open_runs(workspace, val_run_ids)
  train_ids = simulators.union_ids([r.train_ids for r in fit_runs])
  test_ids = simulators.ordered_test_ids(fit_runs)
  n, m = train_ids.size, test_ids.size
  p = 2 * n if kind == "linear" else n
  num_steps = sum(int(r.curriculum.shape[0]) for r in fit_runs)
  if solver == "auto":   # the smaller per-test-example footprint: statistics or data
    solver = ("normal" if p <= _NORMAL_MAX_P and min(grid) > 0
              and p * (p + 1) // 2 < 3 * num_steps else "pcg")
  if chunk_size is None:   # ~32 MB of float64 Gram matrices, or of [S, c] float32 data ×3
    per = 8 * p * p if solver == "normal" else 12 * max(num_steps, 1)
    chunk_size = int(min(4096, max(8, (32 << 20) // per)))
  index = {int(t): j for j, t in enumerate(test_ids.tolist())}
  fit_cols = [_Columns(r, index) for r in fit_runs]
  val = _Validation([_Columns(r, index) for r in val_runs], train_ids, len(grid))
  mesh = tests_mesh() if mesh is None else mesh
  starts = list(range(0, m, chunk_size))
  keep_all = len(grid) == 1 or 2 * len(grid) * m * n * 4 <= keep_bytes
  kept = [(np.zeros((m, n), np.float32), np.zeros((m, n), np.float32))
          for _ in (grid if keep_all else grid[:1])]
  solve = functools.partial(_solve_chunk, fit_cols, kind=kind, train_ids=train_ids,
                            test_ids=test_ids, solver=solver, mesh=mesh)
  for start in starts:                                          # pass 1
    stop = min(start + chunk_size, m)
    params = solve(start, stop, lams=grid)
    if val_runs:
      val.add(start, stop, params, kind)
    if keep_all:
      for (a_out, b_out), (a, b) in zip(kept, params):
        a_out[start:stop], b_out[start:stop] = a, b
  scores = val.mse() if val_runs else np.full(len(grid), np.nan)
  if lam is not None:
    best = 0
  else:
    finite = np.flatnonzero(np.isfinite(scores))
    if not finite.size:
      raise ValueError(f"every λ in {grid} gave a non-finite validation MSE")
    best = int(finite[np.argmin(scores[finite])])
  passes = 1
  if keep_all:
    a_out, b_out = kept[best]
  else:                                                          # pass 2: the chosen λ
    passes = 2
    a_out, b_out = kept[0]
    for start in starts:
      stop = min(start + chunk_size, m)
      (a, b), = solve(start, stop, lams=[grid[best]])
      a_out[start:stop], b_out[start:stop] = a, b
  params = FitParams(A=a_out, B=b_out, train_ids=train_ids, test_ids=test_ids, kind=kind,
                     lam=grid[best])
  diagnostics = {
      "simulator": simulator, "kind": kind, "variant": "paper",
      "variant_chosen_by": "the streaming fit solves the paper's terms only",
      "lam": grid[best],
      "lam_chosen_by": "given" if lam is not None else "validation all-steps MSE",
      "validation_mse": ({simulators.candidate_key("paper", v, ridge.PAPER): float(s)
                          for v, s in zip(grid, scores)} if val_runs else {}),
      "fit_runs": list(fit_run_ids), "val_runs": list(val_run_ids),
      "num_train": int(n), "num_test": int(m),
      "num_transitions": num_steps,
      "identifiability": {"note": "not computed by the streaming fit"},
      "streaming": {"solver": solver, "chunk_size": int(chunk_size),
                    "num_chunks": len(starts), "passes": passes,
                    "devices": int(mesh.devices.size)},
      "timings_s": {"total": time.perf_counter() - t0},
  }
  return params, diagnostics


__all__ = ["SOLVERS", "LazyRun", "open_runs", "NormalEquations", "empty_statistics",
           "accumulate", "solve_normal", "tests_mesh", "fit_streaming"]
