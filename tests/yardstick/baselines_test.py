"""The no-curriculum baselines and the scoring path against hand-computed values."""

import numpy as np
import pytest

from simfluence_jax.traces.contract import RunTrace, TraceError
from simfluence_jax.yardstick import baselines
from simfluence_jax.yardstick import scoring


def _run(run_id, losses, test_ids=(7, 8)):
  losses = np.asarray(losses, np.float32)
  t = losses.shape[0] - 1
  return RunTrace(run_id=run_id, train_ids=np.arange(4, dtype=np.int64),
                  test_ids=np.asarray(test_ids, np.int64), batch_size=1,
                  curriculum=(np.arange(t, dtype=np.int32) % 4)[:, None], losses=losses,
                  metadata={})


def test_mean_trajectory_hand_values_nan_skipped_and_last_value_held():
  a = _run("a", [[5, 6], [3, 4], [1, np.nan]])
  b = _run("b", [[5, 6], [1, 2]])                        # one step shorter
  mean = baselines.mean_trajectory([a, b])
  np.testing.assert_array_equal(mean.test_ids, [7, 8])
  # step 1: (3+1)/2, (4+2)/2; step 2: only a recorded z7 (1), nobody z8 -> held (3)
  np.testing.assert_array_equal(mean.losses[1:], [[2.0, 3.0], [1.0, 3.0]])
  longer = _run("c", [[9, 0], [0, 0], [0, 0], [0, 0], [0, 0]], test_ids=(8, 7))
  pred = baselines.predict_mean_trajectory(mean, longer)
  # columns follow the run's order (8, 7); row 0 its own L_0; beyond step 2 held
  np.testing.assert_array_equal(pred, [[9, 0], [3, 2], [3, 1], [3, 1], [3, 1]])


def test_initial_loss_baseline_and_unknown_test_example():
  run = _run("r", [[0.5, 2.0], [0.1, 0.2], [0.0, 0.0]])
  np.testing.assert_array_equal(baselines.predict_initial_loss(run), [[0.5, 2.0]] * 3)
  mean = baselines.mean_trajectory([run])
  with pytest.raises(TraceError, match="run 'x': test example 9 was recorded by none"):
    baselines.predict_mean_trajectory(mean, _run("x", [[1, 1], [1, 1]], test_ids=(7, 9)))


def test_scoring_puts_baselines_beside_the_method():
  fit = [_run("f0", [[2, 2], [1, 3], [0, 2]]), _run("f1", [[2, 2], [3, 1], [2, 0]])]
  held = [_run("h", [[2, 2], [2, 1], [1, 2]])]
  # L̄ = rows (2, 2), (1, 1); held truth rows 1..2 = (2, 1), (1, 2)
  pred = {"h": np.array([[2, 2], [2, 1], [1, 1.5]])}
  out = scoring.score(pred, held, fit)
  # Σ(L − L̂)² = 0.25; Σ(L − L̄)² = 0 + 1 + 0 + 1 = 2
  assert out["curriculum_r2"] == pytest.approx(1 - 0.25 / 2, abs=1e-15)
  assert out["mse"]["mean"] == pytest.approx(0.25 / 4, abs=1e-15)
  mt = out["baselines"]["mean_trajectory"]
  assert mt["curriculum_r2"] == 0.0 and mt["mse"]["mean"] == pytest.approx(2 / 4)
  il = out["baselines"]["initial_loss"]
  # L_0 = (2, 2): Σ(L − L_0)² = 0 + 1 + 1 + 0 = 2 -> R² = 1 − 2/2 = 0
  assert il["curriculum_r2"] == pytest.approx(0.0, abs=1e-15)
  assert il["mse"]["mean"] == pytest.approx(2 / 4)
  assert "baselines" not in scoring.score(pred, held, None)
