"""Simulation-accuracy metrics (paper §2.2) and their summary over held-out runs.

  * all-steps MSE:  (1/|Z|)(1/T) Σ_z Σ_{t=1..T} (L_t(z) − L̂_t(z))²
  * final-step Spearman: Spearman's ρ over test examples z of (L̂_T(z), L_T(z)).

Trajectories are [T+1, m] (row 0 = L_0, which the simulator is given and is therefore not
scored). True losses may be NaN where a run did not record them; such entries are left out.
All arithmetic is numpy float64, whatever the input dtype.

`score_runs` returns exactly the metrics.json layout:
    {"mse": {"mean", "std"}, "spearman": {"mean", "std"},
     "per_run": [{"run_id", "mse", "spearman"}, ...]}
with std the population std (numpy's default ddof=0), as the paper's "mean ± std over 10
held-out runs". Values are Python floats and may be nan (see each function).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def _pair(pred, true, name: str) -> tuple[np.ndarray, np.ndarray]:
  p = np.asarray(pred, np.float64)
  y = np.asarray(true, np.float64)
  if p.ndim != 2 or p.shape != y.shape:
    raise ValueError(f"{name}: pred and true must both be [T+1, m] trajectories of the same "
                     f"shape; got pred {p.shape}, true {y.shape}")
  return p, y


def all_steps_mse(pred, true) -> float:
  """The paper's all-steps MSE over steps t = 1..T and all test examples.

  Row 0 (the given L_0) is excluded. Only entries where `true` is finite (recorded) count;
  the mean is over those entries, which equals the paper's formula when every loss is
  recorded. A non-finite *prediction* at a recorded entry propagates (a diverged simulator
  scores inf/nan rather than being silently excused). Returns nan when nothing is recorded
  (or T = 0).
  """
  p, y = _pair(pred, true, "all_steps_mse")
  p, y = p[1:], y[1:]
  recorded = np.isfinite(y)
  if not recorded.any():
    return float("nan")
  return float(np.mean((p[recorded] - y[recorded]) ** 2))


def average_ranks(x) -> np.ndarray:
  """1-based ranks of a 1-D array, ties sharing their average rank (scipy's 'average').

  ±inf are ranked like any other value; NaN is not allowed (ValueError).
  """
  x = np.asarray(x, np.float64)
  if x.ndim != 1:
    raise ValueError(f"average_ranks expects a 1-D array; got shape {x.shape}")
  if np.isnan(x).any():
    raise ValueError("average_ranks: NaN has no rank")
  # unique values sorted ascending; a tie group of c values occupying sorted positions
  # e..e+c-1 (0-based, e = end - c) gets rank mean(e+1 .. e+c) = end - (c - 1)/2.
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  ends = np.cumsum(counts).astype(np.float64)
  return (ends - (counts - 1) / 2.0)[inverse.reshape(-1)]


def spearman(x, y) -> float:
  """Spearman's ρ of two 1-D samples: Pearson correlation of their average ranks.

  Returns nan when there are fewer than 2 pairs, when either sample is constant (its ranks
  have zero variance, so ρ is undefined) or when a value is NaN.
  """
  x = np.asarray(x, np.float64).reshape(-1)
  y = np.asarray(y, np.float64).reshape(-1)
  if x.shape != y.shape:
    raise ValueError(f"spearman: samples differ in length ({x.size} vs {y.size})")
  if x.size < 2 or np.isnan(x).any() or np.isnan(y).any():
    return float("nan")
  rx = average_ranks(x) - (x.size + 1) / 2.0     # mean rank is (N+1)/2 exactly
  ry = average_ranks(y) - (y.size + 1) / 2.0
  sxx, syy = float(rx @ rx), float(ry @ ry)
  if sxx == 0.0 or syy == 0.0:
    return float("nan")
  return float(np.clip((rx @ ry) / np.sqrt(sxx * syy), -1.0, 1.0))


def final_step_spearman(pred, true) -> float:
  """Spearman's ρ across test examples between predicted and true losses at the last step.

  Uses the last row of both [T+1, m] trajectories. Test examples whose final true loss is
  not recorded (non-finite) are excluded. Returns nan when fewer than 2 examples remain,
  when either side is constant across them (ρ undefined), or when a remaining prediction is
  NaN (a diverged simulator).
  """
  p, y = _pair(pred, true, "final_step_spearman")
  p_final, y_final = p[-1], y[-1]
  keep = np.isfinite(y_final)
  return spearman(p_final[keep], y_final[keep])


def summarize(values: Sequence[float]) -> dict:
  """{"mean", "std"} of per-run values, std with numpy's default ddof=0.

  Nothing is ignored: a nan value makes both entries nan (so an undefined per-run metric is
  visible in the summary rather than silently dropped). Raises ValueError when empty.
  """
  v = np.asarray(values, np.float64).reshape(-1)
  if v.size == 0:
    raise ValueError("summarize needs at least one value")
  return {"mean": float(np.mean(v)), "std": float(np.std(v))}


def score_runs(pred_by_run: Mapping[str, np.ndarray],
               true_by_run: Mapping[str, np.ndarray]) -> dict:
  """Scores predicted trajectories against observed ones, run by run (metrics.json layout).

  Args:
    pred_by_run: run_id -> predicted [T+1, m] trajectory.
    true_by_run: run_id -> observed [T+1, m] losses (NaN = not recorded); same run ids.

  Returns:
    {"mse": {"mean", "std"}, "spearman": {"mean", "std"},
     "per_run": [{"run_id", "mse", "spearman"}, ...]} with per_run in the order of
    `pred_by_run`.
  """
  if not pred_by_run:
    raise ValueError("score_runs needs at least one run")
  missing = [r for r in pred_by_run if r not in true_by_run]
  extra = [r for r in true_by_run if r not in pred_by_run]
  if missing or extra:
    raise ValueError(f"predicted and observed runs differ: no observed losses for "
                     f"{missing}, no prediction for {extra}")
  per_run = []
  for run_id, pred in pred_by_run.items():
    true = true_by_run[run_id]
    try:
      mse = all_steps_mse(pred, true)
      rho = final_step_spearman(pred, true)
    except ValueError as e:
      raise ValueError(f"run {run_id!r}: {e}") from None
    per_run.append({"run_id": str(run_id), "mse": mse, "spearman": rho})
  return {
      "mse": summarize([r["mse"] for r in per_run]),
      "spearman": summarize([r["spearman"] for r in per_run]),
      "per_run": per_run,
  }
