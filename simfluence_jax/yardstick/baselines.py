"""The no-curriculum baselines: what a simulator scores if it ignores the curriculum.

A simulator is worth what it predicts about *changes* of curriculum. The losses of every run
fall in much the same way whatever the run's batches (the model learns the answer format;
the step-size schedule is shared), so the paper's two metrics can be good for a simulator
that never looks at which examples were trained on. Two such simulators sit beside every
method in every table:

  * mean trajectory:  L̂_t(z) = L̄_t(z) = mean over the fit runs of the observed L_t(z)
    (runs that did not record step t, or are shorter, are left out of that step's mean;
    beyond the fit runs' length, and where no fit run recorded z at t, the last defined
    value is held). Row 0 is the scored run's own observed L_0 (given, never scored).
  * initial loss:     L̂_t(z) = L_0(z) for every t (nothing is learned at all).

Both are computed in float64 numpy from `RunTrace`s; they need no fit.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from simfluence_jax.traces.contract import RunTrace, TraceError

NAMES = ("mean_trajectory", "initial_loss")
LABELS = {"mean_trajectory": "No curriculum: mean trajectory",
          "initial_loss": "No curriculum: initial loss (L_t = L_0)"}


@dataclasses.dataclass(frozen=True)
class MeanTrajectory:
  """L̄: float64 [T_max + 1, m] (row 0 unused), columns in the order of `test_ids`."""
  test_ids: np.ndarray    # int64 [m]
  losses: np.ndarray      # float64 [T_max + 1, m]; finite wherever any fit run recorded z


def mean_trajectory(fit_runs: Sequence[RunTrace]) -> MeanTrajectory:
  """Per test example and step, the mean of the fit runs' observed losses (NaN skipped)."""
  if not fit_runs:
    raise ValueError("the mean-trajectory baseline needs at least one fit run")
  order: dict[int, None] = {}
  for run in fit_runs:
    for i in np.asarray(run.test_ids, np.int64).tolist():
      order.setdefault(i, None)
  test_ids = np.asarray(list(order), np.int64)
  col = {t: j for j, t in enumerate(test_ids.tolist())}
  t_max = max(run.num_steps for run in fit_runs)
  total = np.zeros((t_max + 1, test_ids.size))
  count = np.zeros((t_max + 1, test_ids.size))
  for run in fit_runs:
    losses = np.asarray(run.losses, np.float64)
    cols = np.asarray([col[int(t)] for t in np.asarray(run.test_ids).tolist()], np.int64)
    ok = np.isfinite(losses)
    total[:losses.shape[0], cols] += np.where(ok, losses, 0.0)
    count[:losses.shape[0], cols] += ok
  mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
  # Hold the last defined value forward (steps beyond a test example's recorded ones).
  for t in range(1, mean.shape[0]):
    mean[t] = np.where(np.isfinite(mean[t]), mean[t], mean[t - 1])
  return MeanTrajectory(test_ids=test_ids, losses=mean)


def predict_mean_trajectory(baseline: MeanTrajectory, run: RunTrace) -> np.ndarray:
  """float64 [T+1, m_run] for `run`: row 0 its own L_0, rows t ≥ 1 L̄_min(t, T_max)."""
  col = {int(t): j for j, t in enumerate(baseline.test_ids.tolist())}
  missing = [int(t) for t in np.asarray(run.test_ids).tolist() if int(t) not in col]
  if missing:
    raise TraceError(f"run {run.run_id!r}: test example {missing[0]} was recorded by none "
                     "of the fit runs, so the mean-trajectory baseline has no value for it")
  cols = np.asarray([col[int(t)] for t in np.asarray(run.test_ids).tolist()], np.int64)
  steps = np.minimum(np.arange(run.num_steps + 1), baseline.losses.shape[0] - 1)
  pred = baseline.losses[steps][:, cols].copy()
  pred[0] = np.asarray(run.losses[0], np.float64)
  return pred


def predict_initial_loss(run: RunTrace) -> np.ndarray:
  """float64 [T+1, m_run]: every row the run's own observed L_0."""
  l0 = np.asarray(run.losses[0], np.float64)
  return np.repeat(l0[None], run.num_steps + 1, axis=0)


def predictions(fit_runs: Sequence[RunTrace], runs: Sequence[RunTrace]) -> dict:
  """{baseline name: {run_id: [T+1, m] prediction}} for every name in NAMES."""
  mean = mean_trajectory(fit_runs)
  return {"mean_trajectory": {r.run_id: predict_mean_trajectory(mean, r) for r in runs},
          "initial_loss": {r.run_id: predict_initial_loss(r) for r in runs}}
