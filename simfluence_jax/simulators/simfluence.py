"""Fitting Simfluence simulators from recorded runs (paper §3.2, Eq. 2).

`fit` turns the fit runs' traces into regression data (`design.build_transitions`),
solves the ridge problem of Eq. 2 for every test example at once (`ridge`), and — when no λ
is given — picks λ from a grid by the all-steps MSE of *rollouts* on validation runs (the
paper's protocol: 20 fit runs, 2 validation runs, 10 held out).

`simulate_run` and `evaluate` are the yardstick every simulator is judged by: roll the
simulator out on a run's curriculum from the run's own observed initial losses L_0 and
compare with the observed trajectory.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Mapping, Sequence

import jax
import numpy as np

from simfluence_jax.simulators import design
from simfluence_jax.yardstick import metrics
from simfluence_jax.yardstick import scoring
from simfluence_jax.simulators import ridge
from simfluence_jax.simulators import rollout as rollout_lib
from simfluence_jax.traces.fit_params import FitParams
from simfluence_jax.traces.contract import RunTrace, TraceError

KINDS = ("linear", "additive", "multiplicative")
# Paper §4.1: TracIn-Ideal is Simfluence-Additive; exposed under its own name too.
ALIASES = {"tracin_ideal": "additive"}
DEFAULT_LAM_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def canonical_kind(simulator: str) -> str:
  """Maps a simulator name (including aliases) to one of KINDS."""
  kind = ALIASES.get(simulator, simulator)
  if kind not in KINDS:
    raise ValueError(
        f"unknown simulator {simulator!r}; expected one of "
        f"{sorted(KINDS + tuple(ALIASES))}")
  return kind


def union_ids(arrays: Sequence[np.ndarray]) -> np.ndarray:
  return np.unique(np.concatenate([np.asarray(a, np.int64) for a in arrays]))


def ordered_test_ids(runs: Sequence[RunTrace]) -> np.ndarray:
  """Test ids in first-seen order across runs (normally all runs share one order)."""
  seen: dict[int, None] = {}
  for run in runs:
    for i in np.asarray(run.test_ids, np.int64).tolist():
      seen.setdefault(i, None)
  return np.asarray(list(seen), np.int64)


def impute_unseen(params: FitParams, curriculum: np.ndarray) -> tuple[FitParams, list[int]]:
  """Extends `params` with train ids of `curriculum` that the fit never saw.

  The paper's simulators cannot simulate an example they never saw (§7). Where a user asks
  for it anyway (`unseen="mean"`), each unseen example gets, per test example, the mean of
  the fitted A_i and B_i over the seen examples: "an average training example". Returns the
  extended params and the imputed ids (report them).
  """
  ids = np.unique(np.asarray(curriculum)[np.asarray(curriculum) >= 0]).astype(np.int64)
  unseen = np.setdiff1d(ids, params.train_ids)
  if unseen.size == 0:
    return params, []
  a, b = np.asarray(params.A), np.asarray(params.B)
  fill = lambda x: np.concatenate([x, np.repeat(x.mean(1, keepdims=True), unseen.size, 1)], 1)
  extended = dataclasses.replace(
      params, A=fill(a).astype(a.dtype), B=fill(b).astype(b.dtype),
      train_ids=np.concatenate([params.train_ids, unseen]))
  return extended, unseen.tolist()


def simulate_run(params: FitParams, run: RunTrace, *, unseen: str = "error") -> np.ndarray:
  """Rolls `params` out on `run`'s curriculum from its observed L_0.

  unseen: "error" (a train id the fit never saw is an error naming it) or "mean" (see
  `impute_unseen`).

  Returns float32 [T+1, m_run], columns in the order of `run.test_ids` (row 0 = L_0).
  Raises TraceError naming the run and example when a test id is unknown to the fit or its
  initial loss was not recorded, and when the curriculum holds an id the fit never saw.
  """
  if unseen == "mean":
    params, _ = impute_unseen(params, run.curriculum)
  elif unseen != "error":
    raise ValueError(f"unseen must be 'error' or 'mean', got {unseen!r}")
  cols = columns_of(params, run)
  sub = dataclasses.replace(params, A=np.asarray(params.A)[cols],
                            B=np.asarray(params.B)[cols],
                            test_ids=np.asarray(params.test_ids)[cols])
  try:
    return simulate_curriculum(sub, run.curriculum,
                               np.asarray(run.losses[0], np.float32),
                               curriculum_name=f"run {run.run_id!r} curriculum",
                               initial_losses_name=f"run {run.run_id!r} step 0 losses")
  except ValueError as e:
    raise TraceError(str(e)) from None


def simulate_curriculum(params: FitParams, curriculum: np.ndarray,
                        initial_losses: np.ndarray, *, curriculum_name: str = "curriculum",
                        initial_losses_name: str = "initial_losses") -> np.ndarray:
  """Validates a curriculum of train ids and initial losses against a fit; rolls it out.

  Args:
    curriculum: int [T, k] train example ids, -1 pads.
    initial_losses: float [m] L_0, in the order of `params.test_ids`.
    curriculum_name, initial_losses_name: how errors name the inputs (e.g. file paths).

  Returns:
    float32 [T+1, m], row 0 = `initial_losses`.
  """
  curriculum = np.asarray(curriculum)
  if curriculum.ndim != 2 or not np.issubdtype(curriculum.dtype, np.integer):
    raise ValueError(f"{curriculum_name}: expected an integer [T, k] array of train ids, "
                     f"got {curriculum.dtype} {curriculum.shape}")
  initial = np.asarray(initial_losses)
  m = params.test_ids.shape[0]
  if initial.shape != (m,) or not np.issubdtype(initial.dtype, np.floating):
    raise ValueError(f"{initial_losses_name}: expected float [{m}] initial losses (one per "
                     f"test example of the fit), got {initial.dtype} {initial.shape}")
  bad = np.flatnonzero(~np.isfinite(initial))
  if bad.size:
    raise ValueError(f"{initial_losses_name}: initial loss of test example "
                     f"{int(params.test_ids[bad[0]])} (index {int(bad[0])}) is not finite")
  try:
    positions = rollout_lib.ids_to_positions(curriculum, params.train_ids)
  except ValueError as e:
    raise ValueError(f"{curriculum_name}: {e}") from None
  pred = rollout_lib.rollout(np.asarray(params.A), np.asarray(params.B), kind=params.kind,
                             batches=positions, initial_losses=initial.astype(np.float32))
  return np.asarray(pred, np.float32)


def columns_of(params: FitParams, run: RunTrace) -> np.ndarray:
  index = {int(t): j for j, t in enumerate(np.asarray(params.test_ids).tolist())}
  cols = []
  for t in np.asarray(run.test_ids).tolist():
    if int(t) not in index:
      raise TraceError(
          f"run {run.run_id!r}: test example {int(t)} has no fitted simulator "
          f"(the fit covers {len(index)} test examples)")
    cols.append(index[int(t)])
  return np.asarray(cols, np.int64)


def evaluate(params: FitParams, runs: Sequence[RunTrace], *, unseen: str = "error",
             fit_runs: Sequence[RunTrace] | None = None) -> dict:
  """Scores `params` on held-out runs (yardstick.scoring): all-steps MSE and final-step
  Spearman (§2.2), the across-run score and — given the fit runs — curriculum R² and the
  no-curriculum baselines' scores under "baselines".

  Returns the metrics.json layout (see yardstick.metrics.score_runs), numpy's default
  ddof=0, plus "imputed_train_ids" (train ids absent from the fit, when unseen="mean").
  """
  if not runs:
    raise ValueError("evaluate needs at least one run")
  preds = {run.run_id: simulate_run(params, run, unseen=unseen) for run in runs}
  imputed = sorted({i for run in runs for i in impute_unseen(params, run.curriculum)[1]})
  return {**scoring.score(preds, runs, fit_runs), "unseen": unseen,
          "imputed_train_ids": imputed}


def _validation_mse(params: FitParams, val_runs: Sequence[RunTrace]) -> float:
  return float(np.mean([
      metrics.all_steps_mse(simulate_run(params, run), run.losses) for run in val_runs]))


def fit(fit_runs: Sequence[RunTrace], *, simulator: str, lam: float | None = None,
        lam_grid: Sequence[float] = DEFAULT_LAM_GRID,
        val_runs: Sequence[RunTrace] = (), chunk_size: int | None = None,
        ) -> tuple[FitParams, dict]:
  """Fits one simulator per test example by Eq. 2 over all recorded transitions.

  Args:
    fit_runs: the runs whose transitions form the regression data.
    simulator: "linear", "additive" (alias "tracin_ideal") or "multiplicative".
    lam: the L2 weight λ. When None, λ is chosen from `lam_grid` by the mean all-steps MSE
      of rollouts on `val_runs` (which must then be non-empty).
    val_runs: validation runs for choosing λ (never used as regression data).
    chunk_size: test examples per solver chunk (memory bound); None = solver default.

  Returns:
    (params, diagnostics) where diagnostics is JSON-able and lands in fit.json.
  """
  kind = canonical_kind(simulator)
  if not fit_runs:
    raise ValueError("fit needs at least one fit run")
  if lam is None and not val_runs:
    if len(lam_grid) != 1:
      raise ValueError("either give lam, a one-value lam_grid, or validation runs to choose "
                       "λ from lam_grid")
    lam = float(lam_grid[0])
  overlap = {r.run_id for r in fit_runs} & {r.run_id for r in val_runs}
  if overlap:
    raise ValueError(f"runs {sorted(overlap)} are both fit and validation runs")
  t_start = time.perf_counter()
  train_ids = union_ids([r.train_ids for r in fit_runs])
  test_ids = ordered_test_ids(fit_runs)
  tr = design.build_transitions(fit_runs, train_ids=train_ids, test_ids=test_ids)
  t_built = time.perf_counter()

  def as_params(a, b, lam_value):
    return FitParams(A=np.asarray(a, np.float32), B=np.asarray(b, np.float32),
                     train_ids=train_ids, test_ids=test_ids, kind=kind,
                     lam=float(lam_value))

  val_scores: dict[str, float] = {}
  if lam is not None:
    a, b = ridge.solve(tr, kind=kind, lam=float(lam), chunk_size=chunk_size)
    jax.block_until_ready((a, b))
    params = as_params(a, b, lam)
    t_solved = time.perf_counter()
    if val_runs:
      val_scores[repr(float(lam))] = _validation_mse(params, val_runs)
  else:
    grid = sorted(float(x) for x in lam_grid)
    if not grid or min(grid) < 0:
      raise ValueError(f"lam_grid must be non-empty and non-negative, got {lam_grid}")
    path = ridge.solve_path(tr, kind=kind, lams=grid, chunk_size=chunk_size)
    t_solved = time.perf_counter()
    params, val_scores = select_by_validation(
        [as_params(a, b, lam_value) for lam_value, (a, b) in zip(grid, path)], val_runs)
  t_done = time.perf_counter()

  diagnostics = {
      "simulator": simulator,
      "kind": kind,
      "lam": params.lam,
      "lam_chosen_by": "given" if lam is not None else "validation all-steps MSE",
      "validation_mse": val_scores,
      "fit_runs": [r.run_id for r in fit_runs],
      "val_runs": [r.run_id for r in val_runs],
      "num_train": int(train_ids.size),
      "num_test": int(test_ids.size),
      "num_transitions": int(tr.batches.shape[0]),
      "identifiability": _identifiability_by_id(tr, train_ids, test_ids),
      "timings_s": {
          "build": t_built - t_start,
          "solve": t_solved - t_built,
          "select": t_done - t_solved,
          "total": t_done - t_start,
      },
  }
  return params, diagnostics


def select_by_validation(candidates: Sequence[FitParams], val_runs: Sequence[RunTrace]
                         ) -> tuple[FitParams, dict[str, float]]:
  """The candidate (one per λ) with the lowest mean all-steps MSE of rollouts on `val_runs`.

  Returns (best, {repr(λ): validation MSE}); non-finite scores never win.
  """
  scores: dict[str, float] = {}
  best = None
  for candidate in candidates:
    score = _validation_mse(candidate, val_runs)
    scores[repr(candidate.lam)] = score
    if np.isfinite(score) and (best is None or score < best[0]):
      best = (score, candidate)
  if best is None:
    raise ValueError(f"every λ in {[c.lam for c in candidates]} gave a non-finite "
                     "validation MSE")
  return best[1], scores


def _identifiability_by_id(tr, train_ids: np.ndarray, test_ids: np.ndarray) -> dict:
  """design.identifiability's report, with positions translated back to ids."""
  raw = design.identifiability(tr)
  out: dict = {"note": (
      "Appendix A.2: with λ=0 a train example needs ≥ 2 recorded steps and a test "
      "example a non-constant loss; with λ>0 such parameters are set by the prior alone")}
  unident = raw.get("unidentified", {})
  out["unidentified"] = {
      str(int(test_ids[int(col)])): [int(train_ids[int(p)]) for p in positions]
      for col, positions in unident.items()}
  out["constant_loss"] = [int(test_ids[int(c)]) for c in raw.get("constant_loss", [])]
  for key, value in raw.items():
    if key not in ("unidentified", "constant_loss"):
      out[key] = value
  return out


def read_runs(workspace, run_ids: Sequence[str]) -> list[RunTrace]:
  """Reads the named runs; an empty or duplicated name is an error naming it."""
  from simfluence_jax.traces import contract as traces  # local: keeps this module's import surface small
  seen = set()
  out = []
  for run_id in run_ids:
    if not run_id or run_id in seen:
      raise ValueError(f"run list has an empty or repeated run id: {run_id!r}")
    seen.add(run_id)
    out.append(traces.read_run(workspace, run_id))
  return out


def split_runs(run_ids: Sequence[str], *, num_fit: int, num_val: int, seed: int
               ) -> Mapping[str, list[str]]:
  """The paper's random split of runs into fit / validation / held-out (§5)."""
  ids = sorted(run_ids)
  if num_fit + num_val >= len(ids):
    raise ValueError(
        f"cannot split {len(ids)} runs into {num_fit} fit + {num_val} validation + "
        "at least one held-out run")
  order = np.random.default_rng(seed).permutation(len(ids))
  shuffled = [ids[i] for i in order]
  return {"fit": sorted(shuffled[:num_fit]),
          "val": sorted(shuffled[num_fit:num_fit + num_val]),
          "heldout": sorted(shuffled[num_fit + num_val:])}


__all__ = ["KINDS", "ALIASES", "DEFAULT_LAM_GRID", "canonical_kind", "fit", "evaluate",
           "simulate_run", "read_runs", "split_runs"]
