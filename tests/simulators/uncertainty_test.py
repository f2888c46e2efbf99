"""uncertainty: posterior of the ridge fit and calibration of predictive bands.

Planted truth: a Simfluence-Linear simulator with N(0, σ²) one-step noise (σ differs per
test example). References: ridge.solve_dense_reference (lstsq on the stacked system) for
the posterior mean; a dense float64 inverse for the covariance and dof; nominal coverage.
"""

import numpy as np
import pytest

from simfluence_jax.simulators import design
from simfluence_jax.simulators import ridge
from simfluence_jax.simulators import uncertainty
from simfluence_jax.traces.contract import RunTrace

N, M, K, T = 10, 24, 2, 30
TRAIN_IDS = np.arange(N, dtype=np.int64) * 3 + 7
TEST_IDS = np.arange(M, dtype=np.int64) + 500


def _planted(seed=0):
  rng = np.random.default_rng(seed)
  a = rng.uniform(0.40, 0.50, size=(M, N))          # α ≈ 0.9 per step (k = 2)
  b = rng.uniform(0.02, 0.12, size=(M, N))          # fixed point ≈ 1
  sigma = rng.uniform(0.01, 0.04, size=M)           # per-example one-step noise
  return a, b, sigma


def _runs(a, b, sigma, *, num_runs, seed, prefix="r"):
  rng = np.random.default_rng(seed)
  runs = []
  for r in range(num_runs):
    pos = np.stack([rng.choice(N, K, replace=False) for _ in range(T)])
    losses = np.empty((T + 1, M))
    losses[0] = rng.uniform(1.5, 3.0, M)
    for t in range(T):
      alpha, beta = a[:, pos[t]].sum(1), b[:, pos[t]].sum(1)
      losses[t + 1] = alpha * losses[t] + beta + sigma * rng.standard_normal(M)
    runs.append(RunTrace(run_id=f"{prefix}{r}", train_ids=TRAIN_IDS, test_ids=TEST_IDS,
                         batch_size=K, curriculum=TRAIN_IDS[pos].astype(np.int32),
                         losses=losses, metadata={}))
  return runs


def _transitions(runs):
  return design.build_transitions(runs, train_ids=TRAIN_IDS, test_ids=TEST_IDS)


def test_posterior_mean_is_ridge_reference_and_covariance_dense():
  a, b, sigma = _planted()
  tr = _transitions(_runs(a, b, sigma, num_runs=3, seed=1))
  # mask one test example's half of the steps: per-example S_z differs
  tr = design.Transitions(batches=tr.batches, prev=tr.prev, target=tr.target,
                          mask=np.where(np.arange(tr.num_steps)[:, None] % 2 == 0,
                                        np.asarray(tr.mask) * (np.arange(M) != 3), tr.mask),
                          num_train=tr.num_train)
  lam = 0.3
  post = uncertainty.posterior(tr, lam=lam)
  ref_a, ref_b = ridge.solve_dense_reference(tr, kind="linear", lam=lam)
  np.testing.assert_allclose(post.A, ref_a, rtol=0, atol=1e-9)
  np.testing.assert_allclose(post.B, ref_b, rtol=0, atol=1e-9)
  # independent dense check for z = 3 (masked rows): P⁻¹, dof, σ²
  z = 3
  rows = np.asarray(tr.mask)[:, z] > 0
  q = np.zeros((tr.num_steps, N))
  for s, row in enumerate(np.asarray(tr.batches)):
    for p in row:
      q[s, p] += 1
  x, y = np.asarray(tr.prev)[rows, z], np.asarray(tr.target)[rows, z]
  xd = np.concatenate([x[:, None] * q[rows], q[rows]], 1)
  p_inv = np.linalg.inv(xd.T @ xd + lam * np.eye(2 * N))
  hat_trace = np.trace(xd @ p_inv @ xd.T)
  w = np.concatenate([ref_a[z], ref_b[z]])
  s2 = np.sum((y - xd @ w) ** 2) / (rows.sum() - hat_trace)
  assert post.num_obs[z] == rows.sum() < post.num_obs[0]
  np.testing.assert_allclose(post.dof[z], hat_trace, rtol=1e-9)
  np.testing.assert_allclose(post.sigma2[z], s2, rtol=1e-9)
  np.testing.assert_allclose(post.covariance(z), s2 * p_inv, rtol=1e-7, atol=1e-12)


def test_samples_have_posterior_covariance():
  a, b, sigma = _planted()
  post = uncertainty.posterior(_transitions(_runs(a, b, sigma, num_runs=3, seed=2)), lam=0.1)
  sa, sb = uncertainty.sample_params(post, num_samples=20000, seed=0)
  z = 5
  draws = np.concatenate([sa[:, z], sb[:, z]], 1)
  cov = post.covariance(z)
  np.testing.assert_allclose(draws.mean(0), np.concatenate([post.A[z], post.B[z]]),
                             atol=4 * np.sqrt(np.diag(cov).max() / 20000))
  # sample covariance within Monte Carlo error (relative to the largest variance)
  np.testing.assert_allclose(np.cov(draws.T), cov, atol=0.05 * np.abs(cov).max())


def test_sigma_estimate_recovers_planted_noise():
  a, b, sigma = _planted()
  post = uncertainty.posterior(_transitions(_runs(a, b, sigma, num_runs=10, seed=3)),
                               lam=1e-3)
  # S_z = 300, dof ≈ 20: the estimator's relative sd is √(2/280) ≈ 8.5%; allow 15% (≈ 1.8 sd).
  np.testing.assert_allclose(np.sqrt(post.sigma2), sigma, rtol=0.15)


def test_bands_are_calibrated_on_planted_noise():
  a, b, sigma = _planted()
  fit_runs = _runs(a, b, sigma, num_runs=10, seed=4)
  heldout = _runs(a, b, sigma, num_runs=12, seed=5, prefix="h")
  post, train_ids, test_ids = uncertainty.posterior_for_runs(fit_runs, lam=1e-3)
  np.testing.assert_array_equal(train_ids, TRAIN_IDS)
  np.testing.assert_array_equal(test_ids, TEST_IDS)
  compiled = uncertainty._noisy_rollout_draws._cache_size  # pylint: disable=protected-access
  before = compiled()
  out = uncertainty.run_coverage(post, heldout, train_ids=TRAIN_IDS, test_ids=TEST_IDS,
                                 num_samples=400, seed=0)
  assert compiled() <= before + 1   # 12 held-out runs of one shape: at most one compile
  cov = out["coverage"]
  assert out["num_entries"] == 12 * T * M
  # over 8 seeds of this setup: mean 0.495 / 0.893, sd 0.011 / 0.008 (±5 points ≈ 4.5 sd)
  assert abs(cov[0.5] - 0.5) <= 0.05, cov
  assert abs(cov[0.9] - 0.9) <= 0.05, cov
  # parameter uncertainty alone (no process noise) is far too narrow: the check has power
  positions = np.stack([np.searchsorted(TRAIN_IDS, r.curriculum) for r in heldout])
  narrow = [uncertainty.coverage(
      uncertainty.predictive_bands(post, batches=positions[i], initial_losses=r.losses[0],
                                   num_samples=200, process_noise=False)[0.9], r.losses)
            for i, r in enumerate(heldout)]
  assert np.mean(narrow) < 0.75


def test_lam_zero_refused():
  a, b, sigma = _planted()
  with pytest.raises(ValueError, match="lam > 0"):
    uncertainty.posterior(_transitions(_runs(a, b, sigma, num_runs=1, seed=0)), lam=0.0)
