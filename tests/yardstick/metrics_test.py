"""Tests for metrics.py against plain loops, hand values and scipy.stats."""

import math

import numpy as np
import pytest
import scipy.stats

from simfluence_jax.yardstick import metrics


def loop_mse(pred, true):
  total, count = 0.0, 0
  for t in range(1, true.shape[0]):
    for z in range(true.shape[1]):
      if math.isfinite(float(true[t, z])):
        total += (float(pred[t, z]) - float(true[t, z])) ** 2
        count += 1
  return total / count


def test_mse_hand_value_ignores_row_zero():
  true = np.array([[5.0, 5.0], [1.0, 2.0], [3.0, 4.0]])
  pred = np.array([[-99.0, 99.0], [1.5, 2.0], [2.0, 4.0]])
  # steps 1..2: squared errors 0.25, 0, 1, 0 -> mean 0.3125
  assert metrics.all_steps_mse(pred, true) == pytest.approx(0.3125, rel=1e-15)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_mse_matches_loop_with_unrecorded_entries(dtype):
  rng = np.random.default_rng(0)
  true = rng.uniform(0, 3, size=(21, 6))
  true[rng.random(true.shape) < 0.3] = np.nan
  pred = true + rng.normal(0, 0.5, size=true.shape)
  pred = np.where(np.isnan(pred), 1.0, pred).astype(dtype)
  true = true.astype(dtype)
  expected = loop_mse(pred.astype(np.float64), true.astype(np.float64))
  assert metrics.all_steps_mse(pred, true) == pytest.approx(expected, rel=1e-12)


def test_mse_edge_cases():
  true = np.array([[1.0], [np.nan]])
  assert math.isnan(metrics.all_steps_mse(np.zeros((2, 1)), true))
  assert math.isnan(metrics.all_steps_mse(np.zeros((1, 3)), np.zeros((1, 3))))  # T = 0
  pred = np.array([[1.0], [np.nan]])
  assert math.isnan(metrics.all_steps_mse(pred, np.array([[1.0], [2.0]])))     # propagates
  with pytest.raises(ValueError, match="same shape"):
    metrics.all_steps_mse(np.zeros((3, 2)), np.zeros((3, 3)))


def test_spearman_ties_and_infinities_hand_values():
  # x ranks (4, 2.5, 1, 2.5) with ±inf ranked like any value; y ranks (4, 2, 1, 3):
  # centred rx = (1.5, 0, -1.5, 0), ry = (1.5, -0.5, -1.5, 0.5): ρ = 4.5 / √(4.5 · 5)
  x = [np.inf, 1.0, -np.inf, 1.0]
  y = [4.0, 2.0, 1.0, 3.0]
  assert metrics.spearman(x, y) == pytest.approx(4.5 / math.sqrt(4.5 * 5.0), abs=1e-12)
  assert math.isnan(metrics.spearman([np.inf, np.inf], [1.0, 2.0]))   # constant: undefined


def test_curriculum_r2_hand_value():
  # one run, T = 2, m = 1; L = (·, 1, 3), mean trajectory L̄ = (·, 2, 2), L̂ = (·, 1.5, 2.5)
  # R² = 1 − (0.25 + 0.25) / (1 + 1) = 0.75; the L̄ itself scores 0; the truth 1.
  true = {"r": np.array([[9.0], [1.0], [3.0]])}
  ref = {"r": np.array([[9.0], [2.0], [2.0]])}
  pred = {"r": np.array([[0.0], [1.5], [2.5]])}    # row 0 is never scored
  assert metrics.curriculum_r2(pred, true, ref) == pytest.approx(0.75, abs=1e-15)
  assert metrics.curriculum_r2(ref, true, ref) == 0.0
  assert metrics.curriculum_r2(true, true, ref) == 1.0
  # pooled over runs, unrecorded entries left out: second run adds (L − L̂)² = 4,
  # (L − L̄)² = 1 at its one recorded step -> 1 − (0.5 + 4) / (2 + 1) = −0.5
  true["s"] = np.array([[1.0], [np.nan], [0.0]])
  ref["s"] = np.array([[1.0], [5.0], [1.0]])
  pred["s"] = np.array([[1.0], [7.0], [2.0]])
  assert metrics.curriculum_r2(pred, true, ref) == pytest.approx(-0.5, abs=1e-15)


def test_across_run_score_hand_value():
  # 3 runs, 3 test examples; finals (pred, true) per example over runs:
  #   z0: pred (1, 2, 3), true (1, 2, 3)    ρ = 1
  #   z1: pred (1, 2, 3), true (3, 1, 2)    ranks (3,1,2): ρ = 1 − 6·(4+1+1)/(3·8) = −0.5
  #   z2: true constant over runs           undefined, left out
  finals_p = np.array([[1.0, 1.0, 5.0], [2.0, 2.0, 6.0], [3.0, 3.0, 7.0]])
  finals_y = np.array([[1.0, 3.0, 4.0], [2.0, 1.0, 4.0], [3.0, 2.0, 4.0]])
  preds = {f"r{i}": np.stack([np.zeros(3), finals_p[i]]) for i in range(3)}
  trues = {f"r{i}": np.stack([np.zeros(3), finals_y[i]]) for i in range(3)}
  out = metrics.across_run_score(preds, trues)
  assert out == {"mean": pytest.approx(0.25, abs=1e-15), "n_defined": 2, "n": 3}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_spearman_matches_scipy(dtype):
  rng = np.random.default_rng(2)
  for trial in range(30):
    size = int(rng.integers(3, 25))
    if trial % 2:   # heavy ties
      x, y = rng.integers(0, 4, size), rng.integers(0, 4, size)
    else:
      x = rng.normal(size=size)
      y = x + rng.normal(scale=0.7, size=size)
    x, y = x.astype(dtype), y.astype(dtype)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
      continue
    expected = scipy.stats.spearmanr(x, y).statistic
    assert metrics.spearman(x, y) == pytest.approx(expected, abs=1e-12)


def test_spearman_hand_value():
  # ranks x = (1, 2, 3), y = (1, 3, 2): ρ = 1 - 6·2 / (3·8) = 0.5
  assert metrics.spearman([1.0, 2.0, 3.0], [10.0, 30.0, 20.0]) == pytest.approx(0.5)


def test_final_step_spearman_uses_last_row_and_skips_unrecorded():
  true = np.array([[9.0, 9.0, 9.0, 9.0, 9.0],
                   [1.0, 2.0, 3.0, 4.0, 5.0],
                   [1.0, 2.0, np.nan, 4.0, 3.0]])
  pred = np.array([[0.0, 0.0, 0.0, 0.0, 0.0],
                   [5.0, 4.0, 3.0, 2.0, 1.0],   # earlier rows are irrelevant
                   [0.1, 0.2, -50.0, 0.3, 0.4]])
  # kept columns 0, 1, 3, 4: true (1, 2, 4, 3), pred (0.1, 0.2, 0.3, 0.4)
  expected = scipy.stats.spearmanr([0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 4.0, 3.0]).statistic
  assert metrics.final_step_spearman(pred, true) == pytest.approx(expected, abs=1e-15)
  assert expected == pytest.approx(0.8)


def test_final_step_spearman_undefined_cases_are_nan():
  true = np.array([[1.0, 1.0], [2.0, np.nan]])
  assert math.isnan(metrics.final_step_spearman(np.ones((2, 2)), true))          # 1 example
  true = np.array([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
  assert math.isnan(metrics.final_step_spearman(np.arange(6.0).reshape(2, 3), true))
  pred = np.array([[1.0, 1.0, 1.0], [3.0, 3.0, 3.0]])
  assert math.isnan(metrics.final_step_spearman(pred, np.arange(6.0).reshape(2, 3)))
  pred = np.array([[1.0, 1.0, 1.0], [3.0, np.nan, 1.0]])
  assert math.isnan(metrics.final_step_spearman(pred, np.arange(6.0).reshape(2, 3)))


def test_summarize_population_std_and_nan():
  s = metrics.summarize([1.0, 2.0, 4.0])
  assert s["mean"] == pytest.approx(7.0 / 3.0)
  # ddof = 0: sqrt(((1-7/3)^2 + (2-7/3)^2 + (4-7/3)^2) / 3) = sqrt(14/9)
  assert s["std"] == pytest.approx(math.sqrt(14.0 / 9.0))
  assert set(s) == {"mean", "std"}
  assert all(isinstance(v, float) for v in s.values())
  s = metrics.summarize([1.0, float("nan")])
  assert math.isnan(s["mean"]) and math.isnan(s["std"])
  with pytest.raises(ValueError):
    metrics.summarize([])


def test_score_runs_layout_and_values():
  rng = np.random.default_rng(3)
  trues = {f"run{r}": rng.uniform(0, 2, size=(6, 4)).astype(np.float32) for r in (2, 0, 1)}
  preds = {r: (t + rng.normal(0, 0.3, size=t.shape)).astype(np.float32)
           for r, t in trues.items()}
  out = metrics.score_runs(preds, trues)
  assert list(out) == ["mse", "spearman", "across_run", "per_run"]
  assert [r["run_id"] for r in out["per_run"]] == ["run2", "run0", "run1"]
  assert all(set(r) == {"run_id", "mse", "spearman"} for r in out["per_run"])
  mses = [loop_mse(preds[r].astype(float), trues[r].astype(float)) for r in preds]
  rhos = [scipy.stats.spearmanr(preds[r][-1], trues[r][-1]).statistic for r in preds]
  np.testing.assert_allclose([r["mse"] for r in out["per_run"]], mses, rtol=1e-12)
  np.testing.assert_allclose([r["spearman"] for r in out["per_run"]], rhos, atol=1e-12)
  assert out["mse"]["mean"] == pytest.approx(np.mean(mses), rel=1e-12)
  assert out["mse"]["std"] == pytest.approx(np.std(mses), rel=1e-12)
  assert out["spearman"]["std"] == pytest.approx(np.std(rhos), rel=1e-9)


def test_score_runs_errors_name_the_run():
  with pytest.raises(ValueError, match="no prediction for \\['b'\\]"):
    metrics.score_runs({"a": np.zeros((2, 2))}, {"a": np.zeros((2, 2)), "b": np.zeros((2, 2))})
  with pytest.raises(ValueError, match="run 'a'"):
    metrics.score_runs({"a": np.zeros((2, 2))}, {"a": np.zeros((3, 2))})
