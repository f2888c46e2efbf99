"""Scores a method's predicted trajectories on held-out runs, beside the no-curriculum
baselines fitted on the same fit runs — the one scoring path of `evaluate` and the report.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from simfluence_jax.traces.contract import RunTrace
from simfluence_jax.yardstick import baselines
from simfluence_jax.yardstick import metrics


def score(pred_by_run: Mapping[str, np.ndarray], runs: Sequence[RunTrace],
          fit_runs: Sequence[RunTrace] | None) -> dict:
  """metrics.score_runs of the predictions, with curriculum R² against the mean trajectory
  of `fit_runs` and, under "baselines", the same scores of each no-curriculum baseline.

  Without fit runs (None or empty) only the curriculum-blind metrics are given, with
  "baselines" absent; say so where it is shown.
  """
  trues = {r.run_id: np.asarray(r.losses, np.float64) for r in runs}
  if not fit_runs:
    return metrics.score_runs(pred_by_run, trues)
  base = baselines.predictions(fit_runs, runs)
  ref = base["mean_trajectory"]
  result = metrics.score_runs(pred_by_run, trues, ref)
  result["baselines"] = {name: metrics.score_runs(preds, trues, ref)
                         for name, preds in base.items()}
  return result


def optimal_scale(pairs) -> np.ndarray:
  """The paper's §5 TracIn-CP rescaling: per test example σ = Σ L̂ L / Σ L̂² over every
  (pred, true) [T+1, m] pair's steps t ≥ 1 recorded in both (σ = 1 where Σ L̂² = 0). [m]."""
  num, den = 0.0, 0.0
  for pred, true in pairs:
    p = np.asarray(pred, np.float64)[1:]
    y = np.asarray(true, np.float64)[1:]
    ok = np.isfinite(y) & np.isfinite(p)
    num = num + np.where(ok, p * y, 0.0).sum(0)
    den = den + np.where(ok, p * p, 0.0).sum(0)
  den = np.asarray(den)
  return np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)
