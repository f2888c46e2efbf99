"""data_efficiency: the study table on planted rank-2 traces, and the unseen-example case.

Planted truth: A = U_A V_Aᵀ, B = U_B V_Bᵀ (rank 2) plus N(0, σ²) one-step noise. Checks:
one row per (run count, simulator); MSE falls as runs are added; one row recomputed
independently (dense float64 ridge + python-loop rollout + numpy MSE); the documented
claim that the mean train factor equals mean-of-columns imputation; the markdown layout.
"""

import numpy as np
import pytest

from simfluence_jax.evaluation import data_efficiency as de
from simfluence_jax.simulators import design
from simfluence_jax.simulators import featurized
from simfluence_jax.simulators import ridge
from simfluence_jax.simulators import simfluence as simulators

from tests import planted_traces

M, N, K, T, SIGMA = 20, 30, 4, 20, 0.01
TRAIN_IDS = np.arange(N, dtype=np.int64) * 5 + 3
TEST_IDS = np.arange(M, dtype=np.int64) + 40


def _planted(seed=0):
  return planted_traces.rank2(M, N, seed)


def _runs(a, b, *, num_runs, seed, prefix, pool=N):
  return planted_traces.linear_runs(a, b, train_ids=TRAIN_IDS, test_ids=TEST_IDS,
                                    num_runs=num_runs, steps=T, batch=K, sigma=SIGMA,
                                    seed=seed, prefix=prefix, pool=pool)


def _loop_mse(a, b, run):
  """Independent rollout (python loop, float64) and all-steps MSE of one run."""
  pos = np.searchsorted(TRAIN_IDS, run.curriculum)
  pred = [np.asarray(run.losses[0], np.float64)]
  for row in pos:
    pred.append(a[:, row].sum(1) * pred[-1] + b[:, row].sum(1))
  return np.mean((np.stack(pred)[1:] - run.losses[1:]) ** 2)


@pytest.fixture(scope="module")
def table():
  a, b = _planted()
  runs = _runs(a, b, num_runs=8, seed=1, prefix="f")
  heldout = _runs(a, b, num_runs=3, seed=2, prefix="h")
  fitters = {"linear": de.linear_fitter(lam=1e-2),
             "featurized": de.featurized_fitter(rank=2, lam=1e-2, steps=2000)}
  return runs, heldout, de.study(runs, heldout, num_runs_list=(1, 3, 8), simulators=fitters)


def test_study_rows_and_mse_decreases_with_runs(table):
  _, _, rows = table
  assert [(r["num_runs"], r["simulator"]) for r in rows] == [
      (n, s) for n in (1, 3, 8) for s in ("linear", "featurized", "mean_trajectory")]
  for name in ("linear", "featurized"):
    mse = [r["mse_mean"] for r in rows if r["simulator"] == name]
    assert mse[0] > mse[1] > mse[2], (name, mse)
  # measured: linear 0.16 -> 0.014 -> 5.6e-4; featurized 3.9e-3 -> 5.3e-4 -> 3.5e-4
  by = {(r["num_runs"], r["simulator"]): r for r in rows}
  # 1 and 3 runs give S = 20, 60 <= 2n = 60 transitions: per-example ridge is
  # under-determined there, while the shared rank-2 factors are not
  for n in (1, 3):
    assert by[(n, "featurized")]["mse_mean"] * 3 < by[(n, "linear")]["mse_mean"]
  assert all(r["unseen_slot_fraction"] == 0.0 for r in rows
             if r["simulator"] != "mean_trajectory")
  assert all(0.9 < r["spearman_mean"] <= 1.0 for r in rows
             if r["num_runs"] == 8 and r["simulator"] != "mean_trajectory")
  # The baseline row is the mean trajectory of the same N runs: R² exactly 0 by definition,
  # and on planted curriculum-driven runs both simulators beat it from 3 runs on.
  for n in (1, 3, 8):
    assert by[(n, "mean_trajectory")]["curriculum_r2"] == 0.0
  for n in (3, 8):
    assert by[(n, "featurized")]["curriculum_r2"] > 0.5
  assert by[(8, "linear")]["curriculum_r2"] > 0.5


def test_study_row_matches_independent_recomputation(table):
  runs, heldout, rows = table
  row = next(r for r in rows if r["num_runs"] == 3 and r["simulator"] == "linear")
  tr = design.build_transitions(runs[:3], train_ids=TRAIN_IDS, test_ids=TEST_IDS)
  a, b = ridge.solve_dense_reference(tr, kind="linear", lam=1e-2)
  per_run = [_loop_mse(a, b, run) for run in heldout]
  # production ridge is float32 PCG (~1e-4 relative); rollouts of 20 steps amplify it
  np.testing.assert_allclose(row["mse_mean"], np.mean(per_run), rtol=1e-2)
  np.testing.assert_allclose(row["mse_std"], np.std(per_run), rtol=5e-2)


def test_unseen_examples_eval_and_mean_factor_claim():
  a, b = _planted()
  fit_runs = _runs(a, b, num_runs=4, seed=3, prefix="f", pool=24)   # positions 24..29 unseen
  heldout = _runs(a, b, num_runs=2, seed=4, prefix="h")
  feats = {int(i): f for i, f in zip(TRAIN_IDS, np.random.default_rng(0).normal(
      size=(N, 4)))}
  fitters = {"linear": de.linear_fitter(lam=1e-2),
             "featurized": de.featurized_fitter(rank=2, lam=1e-2, steps=2000),
             "features": de.featurized_fitter(rank=2, lam=1e-2, steps=500,
                                              train_features=feats)}
  rows = de.unseen_examples_eval(fit_runs, heldout, simulators=fitters)
  used = {int(i) for r in heldout for i in np.asarray(r.curriculum).ravel()}
  want_unseen = sorted(used & set(TRAIN_IDS[24:].tolist()))
  slots = np.concatenate([np.asarray(r.curriculum).ravel() for r in heldout])
  assert [r["simulator"] for r in rows] == ["linear", "featurized", "features"]
  for row in rows:
    assert row["num_unseen_train_ids"] == len(want_unseen) > 0
    np.testing.assert_allclose(row["unseen_slot_fraction"],
                               np.isin(slots, TRAIN_IDS[24:]).mean())
    assert np.isfinite(row["mse_mean"])
    # imputation only where the simulator has no other way to simulate the example
    want_imputed = 0 if row["simulator"] == "features" else len(want_unseen)
    assert row["num_imputed_train_ids"] == want_imputed
  # documented claim: the mean train factor == the mean of the materialised seen columns
  tr = design.build_transitions(fit_runs, train_ids=TRAIN_IDS[:24], test_ids=TEST_IDS)
  theta, _ = featurized.fit_lowrank(tr, featurized.LowRankConfig(rank=2, lam=1e-2,
                                                                 steps=200))
  theta = {k: np.asarray(v, np.float64) for k, v in theta.items()}
  a_fit, b_fit = (np.asarray(x) for x in featurized.materialize(theta))
  from simfluence_jax.traces.fit_params import FitParams
  params = FitParams(A=a_fit, B=b_fit, train_ids=TRAIN_IDS[:24], test_ids=TEST_IDS,
                     kind="linear", lam=1e-2)
  ext, imputed = simulators.impute_unseen(params, heldout[0].curriculum)
  mean_a = theta["ua"] @ theta["va"].mean(0) + theta["a0"]
  mean_b = theta["ub"] @ theta["vb"].mean(0) + theta["b0"]
  for j in range(len(imputed)):
    np.testing.assert_allclose(ext.A[:, 24 + j], mean_a, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ext.B[:, 24 + j], mean_b, rtol=1e-12, atol=1e-12)


def test_markdown_table_layout_and_errors():
  rows = [{"num_runs": 2, "simulator": "linear", "mse_mean": 0.01234, "mse_std": 0.005,
           "spearman_mean": 0.9, "spearman_std": 0.01, "unseen_slot_fraction": 0.125}]
  assert de.markdown_table(rows) == (
      "| past runs | simulator | held-out MSE | final-step Spearman | unseen slots |\n"
      "|---:|---|---|---|---:|\n"
      "| 2 | linear | 0.0123 ± 0.005 | 0.9 ± 0.01 | 12.5% |\n")
  a, b = _planted()
  runs = _runs(a, b, num_runs=2, seed=1, prefix="f")
  with pytest.raises(ValueError, match=r"outside \[1, 2\]"):
    de.study(runs, _runs(a, b, num_runs=1, seed=2, prefix="h"), num_runs_list=(5,))
  with pytest.raises(ValueError, match="unknown simulators"):
    de.study(runs, _runs(a, b, num_runs=1, seed=2, prefix="h"), num_runs_list=(1,),
             simulators=("nope",))
