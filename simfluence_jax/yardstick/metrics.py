"""Simulation-accuracy metrics (paper §2.2 and the curriculum signal), summarised over runs.

  * all-steps MSE:  (1/|Z|)(1/T) Σ_z Σ_{t=1..T} (L_t(z) − L̂_t(z))²
  * final-step Spearman: Spearman's ρ over test examples z of (L̂_T(z), L_T(z)).

Trajectories are [T+1, m] (row 0 = L_0, which the simulator is given and is therefore not
scored). True losses may be NaN where a run did not record them; such entries are left out.
All arithmetic is numpy float64, whatever the input dtype.

Beyond the paper, the curriculum signal (what changes when the curriculum changes):
  * curriculum R² = 1 − Σ(L − L̂)² / Σ(L − L̄)² over held-out runs and steps t ≥ 1, L̄ the
    mean-trajectory baseline (yardstick.baselines): > 0 iff a simulator beats ignoring the
    curriculum on all-steps squared error;
  * across-run score: per test example, Spearman over held-out runs of simulated vs observed
    final loss, averaged over the test examples where it is defined.

`score_runs` returns exactly the metrics.json layout:
    {"mse": {"mean", "std"}, "spearman": {"mean", "std"}, "across_run": {...},
     "curriculum_r2": float, "per_run": [{"run_id", "mse", "spearman"}, ...]}
with std the population std (numpy's default ddof=0), as the paper's "mean ± std over 10
held-out runs". Values are Python floats and may be nan (see each function).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import scipy.stats


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


def spearman(x, y) -> float:
  """Spearman's ρ of two 1-D samples (scipy.stats.spearmanr; ties get average ranks).

  Returns nan when there are fewer than 2 pairs, when either sample is constant (ρ is
  undefined) or when a value is NaN.
  """
  x = np.asarray(x, np.float64).reshape(-1)
  y = np.asarray(y, np.float64).reshape(-1)
  if x.shape != y.shape:
    raise ValueError(f"spearman: samples differ in length ({x.size} vs {y.size})")
  if x.size < 2 or np.isnan(x).any() or np.isnan(y).any():
    return float("nan")
  if np.all(x == x[0]) or np.all(y == y[0]):
    return float("nan")
  return float(np.clip(scipy.stats.spearmanr(x, y).statistic, -1.0, 1.0))


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


def curriculum_r2(pred_by_run: Mapping[str, np.ndarray], true_by_run: Mapping[str, np.ndarray],
                  reference_by_run: Mapping[str, np.ndarray]) -> float:
  """1 − Σ(L − L̂)² / Σ(L − L̄)², pooled over runs, steps t ≥ 1 and test examples.

  L̄ is the mean-trajectory baseline (yardstick.baselines): the share of the run-to-run
  variation around what every curriculum does that a simulator explains. > 0 means it beats
  ignoring the curriculum; the mean-trajectory baseline itself scores exactly 0. Entries
  where L is not recorded are left out. nan when Σ(L − L̄)² = 0 (nothing varies).
  """
  num = den = 0.0
  for run_id, pred in pred_by_run.items():
    p, y = _pair(pred, true_by_run[run_id], "curriculum_r2")
    ref, _ = _pair(reference_by_run[run_id], y, "curriculum_r2 (reference)")
    ok = np.isfinite(y[1:])
    num += float(np.sum((y[1:][ok] - p[1:][ok]) ** 2))
    den += float(np.sum((y[1:][ok] - ref[1:][ok]) ** 2))
  return float(1.0 - num / den) if den > 0 else float("nan")


def across_run_score(pred_by_run: Mapping[str, np.ndarray],
                     true_by_run: Mapping[str, np.ndarray]) -> dict:
  """Datamodeling-style score: per test example, Spearman over runs of simulated vs observed
  final loss, averaged over the test examples where it is defined.

  Runs must record the same test examples in the same order (columns are matched by index).
  A test example's ρ is undefined (left out, counted in "n" but not "n_defined") when fewer
  than 2 runs recorded its final loss or either side is constant across runs.
  Returns {"mean", "n_defined", "n"}; mean is nan when no ρ is defined.
  """
  finals_p, finals_y = [], []
  width = None
  for run_id, pred in pred_by_run.items():
    p, y = _pair(pred, true_by_run[run_id], "across_run_score")
    if width is not None and p.shape[1] != width:
      raise ValueError(f"run {run_id!r}: {p.shape[1]} test examples, the other runs {width}; "
                       "the across-run score needs the same test examples in every run")
    width = p.shape[1]
    finals_p.append(p[-1])
    finals_y.append(y[-1])
  fp, fy = np.stack(finals_p), np.stack(finals_y)     # [runs, m]
  rhos = []
  for j in range(fp.shape[1]):
    keep = np.isfinite(fy[:, j])
    rho = spearman(fp[keep, j], fy[keep, j])
    if np.isfinite(rho):
      rhos.append(rho)
  return {"mean": float(np.mean(rhos)) if rhos else float("nan"),
          "n_defined": len(rhos), "n": int(fp.shape[1])}


def score_runs(pred_by_run: Mapping[str, np.ndarray],
               true_by_run: Mapping[str, np.ndarray],
               reference_by_run: Mapping[str, np.ndarray] | None = None) -> dict:
  """Scores predicted trajectories against observed ones, run by run (metrics.json layout).

  Args:
    pred_by_run: run_id -> predicted [T+1, m] trajectory.
    true_by_run: run_id -> observed [T+1, m] losses (NaN = not recorded); same run ids.
    reference_by_run: run_id -> the mean-trajectory baseline's [T+1, m] prediction; when
      given, "curriculum_r2" is added.

  Returns:
    {"mse": {"mean", "std"}, "spearman": {"mean", "std"},
     "across_run": {"mean", "n_defined", "n"}, ["curriculum_r2": float,]
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
  out = {
      "mse": summarize([r["mse"] for r in per_run]),
      "spearman": summarize([r["spearman"] for r in per_run]),
  }
  same_width = len({np.shape(p)[1] for p in pred_by_run.values()}) == 1
  if same_width:
    out["across_run"] = across_run_score(pred_by_run, true_by_run)
  if reference_by_run is not None:
    absent = [r for r in pred_by_run if r not in reference_by_run]
    if absent:
      raise ValueError(f"no mean-trajectory reference for runs {absent}")
    out["curriculum_r2"] = curriculum_r2(pred_by_run, true_by_run, reference_by_run)
  out["per_run"] = per_run
  return out
