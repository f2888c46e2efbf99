"""Posterior uncertainty of Simfluence-Linear's ridge fit, and predictive trajectory bands.

Bayesian reading of Eq. 2 (paper §3.2). For one test example z with recorded transitions
s (mask μ_s = 1), design X = [diag(x) Q, Q] (S_z × 2n; x_s = L_{t-1}(z), Q the batch
matrix with multiplicities) and targets y_s = L_t(z), assume

    prior       w = [A_z; B_z] ~ N(0, (σ_z²/λ) I_{2n})
    likelihood  y_s = X_s w + ε_s,  ε_s ~ N(0, σ_z²) independently per one-step transition.

Conditional on the observed x (the likelihood of the Markov chain factorises over steps, so
treating x as fixed is exact), the posterior is

    w | data ~ N(ŵ, σ_z² P⁻¹),   P = XᵀX + λI  (2n × 2n),   ŵ = P⁻¹ Xᵀy,

and ŵ is exactly the ridge solution of Eq. 2 (`ridge.solve_dense_reference`).

σ_z² estimator (stated): σ̂_z² = RSS_z / max(S_z − dof_z, 1), with RSS_z = ‖y − Xŵ‖² and
dof_z = tr(X P⁻¹ Xᵀ) = 2n − λ tr(P⁻¹) the effective degrees of freedom of the ridge
smoother (Hastie et al., ESL §3.4.1). With λ → 0 and S_z > 2n this is the unbiased OLS
estimator.

Predictive bands (`predictive_bands`): Monte Carlo. For each test example draw K parameter
vectors w⁽ᵏ⁾ = ŵ + σ̂_z L⁻ᵀ ε (P = L Lᵀ Cholesky, ε ~ N(0, I)), so Cov = σ̂_z² P⁻¹; roll each
draw out on the curriculum from the observed L_0 with process noise N(0, σ̂_z²) added per
step (the same noise model the posterior assumes); report per-(step, example) quantiles.
Cost O(m·(2n)³) for the Cholesky factors — fine for n up to a few hundred.

Calibration (`coverage`): the fraction of recorded held-out (step ≥ 1, example) entries
inside the central band; a calibrated model covers ≈ 50% / 90% for the 50% / 90% bands.

Everything is float64 numpy except the rollouts (jax; jitted once per shape).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg as sp_linalg

from simfluence_jax.simulators import ridge_reference
from simfluence_jax.simulators import rollout as rollout_lib


@dataclasses.dataclass(frozen=True)
class Posterior:
  """Per-test-example Gaussian posterior of w = [A_z; B_z] (float64 numpy).

  Attributes:
    A, B: [m, n] posterior means (= the ridge solution of Eq. 2).
    chol: [m, 2n, 2n] lower Cholesky factor L of the posterior precision P = XᵀX + λI
      (covariance σ_z² P⁻¹ = σ_z² L⁻ᵀ L⁻¹).
    sigma2: [m] estimated one-step noise variance σ̂_z².
    dof: [m] effective degrees of freedom tr(hat matrix).
    num_obs: [m] recorded transitions S_z.
    lam: λ.
  """
  A: np.ndarray
  B: np.ndarray
  chol: np.ndarray
  sigma2: np.ndarray
  dof: np.ndarray
  num_obs: np.ndarray
  lam: float

  def covariance(self, z: int) -> np.ndarray:
    """[2n, 2n] posterior covariance σ̂_z² P_z⁻¹ of test example z."""
    eye = np.eye(self.chol.shape[1])
    p_inv = sp_linalg.cho_solve((self.chol[z], True), eye)
    return self.sigma2[z] * p_inv


def posterior(tr, *, lam: float) -> Posterior:
  """The Gaussian posterior of every test example's [A_z; B_z] (module docstring).

  Args:
    tr: design.Transitions.
    lam: λ > 0 (the prior precision relative to the noise; λ = 0 is an improper prior and
      needs S_z ≥ 2n identified parameters, so it is refused).
  """
  if not lam > 0:
    raise ValueError(f"posterior needs lam > 0 (a proper Gaussian prior), got {lam}")
  n = int(tr.num_train)
  q = ridge_reference.dense_q(tr.batches, n)
  prev, target = np.asarray(tr.prev, np.float64), np.asarray(tr.target, np.float64)
  mask = np.asarray(tr.mask) > 0
  m = prev.shape[1]
  a_out, b_out = np.zeros((m, n)), np.zeros((m, n))
  chol = np.zeros((m, 2 * n, 2 * n))
  sigma2, dof, num_obs = np.zeros(m), np.zeros(m), np.zeros(m, np.int64)
  eye = np.eye(2 * n)
  for z in range(m):
    rows = mask[:, z]
    x, y = prev[rows, z], target[rows, z]
    design = np.concatenate([x[:, None] * q[rows], q[rows]], axis=1)   # [S_z, 2n]
    prec = design.T @ design + lam * eye                              # P, SPD since λ > 0
    factor = np.linalg.cholesky(prec)                                 # P = L Lᵀ
    w = sp_linalg.cho_solve((factor, True), design.T @ y)
    resid = y - design @ w
    p_inv_trace = np.trace(sp_linalg.cho_solve((factor, True), eye))
    dof[z] = 2 * n - lam * p_inv_trace                                # tr(X P⁻¹ Xᵀ)
    num_obs[z] = x.size
    sigma2[z] = float(resid @ resid) / max(x.size - dof[z], 1.0)
    a_out[z], b_out[z], chol[z] = w[:n], w[n:], factor
  return Posterior(A=a_out, B=b_out, chol=chol, sigma2=sigma2, dof=dof, num_obs=num_obs,
                   lam=float(lam))


def posterior_for_runs(runs: Sequence, *, lam: float
                       ) -> tuple[Posterior, np.ndarray, np.ndarray]:
  """`posterior` of the regression data of `runs`, with train/test ids chosen as
  `simulators.fit` does (union of train ids; test ids in first-seen order).
  Returns (posterior, train_ids [n], test_ids [m])."""
  from simfluence_jax.simulators import design  # pylint: disable=g-import-not-at-top
  train_ids = np.unique(np.concatenate([np.asarray(r.train_ids, np.int64) for r in runs]))
  seen: dict[int, None] = {}
  for run in runs:
    for i in np.asarray(run.test_ids, np.int64).tolist():
      seen.setdefault(i, None)
  test_ids = np.asarray(list(seen), np.int64)
  tr = design.build_transitions(runs, train_ids=train_ids, test_ids=test_ids)
  return posterior(tr, lam=lam), train_ids, test_ids


def sample_params(post: Posterior, *, num_samples: int, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  """K posterior draws: A, B float64 [K, m, n], w = ŵ + σ̂_z L⁻ᵀ ε with ε ~ N(0, I_{2n})."""
  m, n = post.A.shape
  eps = np.random.default_rng(seed).standard_normal((m, 2 * n, num_samples))
  draws = np.empty((num_samples, m, 2 * n))
  for z in range(m):
    # Solving Lᵀ u = ε gives u ~ N(0, L⁻ᵀ L⁻¹) = N(0, P⁻¹).
    u = sp_linalg.solve_triangular(post.chol[z], eps[z], lower=True, trans="T")
    draws[:, z] = (np.concatenate([post.A[z], post.B[z]])[:, None]
                   + np.sqrt(post.sigma2[z]) * u).T
  return draws[..., :n], draws[..., n:]


def _noisy_rollout(a, b, batches, initial_losses, noise):
  """Eq. 1 plus additive process noise: a, b [m, n]; batches [T, k]; noise [T, m]."""

  def step(loss, xs):
    batch, eps = xs
    active = jnp.any(batch >= 0)
    alpha, beta = rollout_lib.step_coefficients(a, b, batch, active, kind="linear")
    new = alpha * loss + beta + jnp.where(active, eps, 0.0)
    return new, new

  _, traj = jax.lax.scan(step, initial_losses, (batches, noise))
  return jnp.concatenate([initial_losses[None], traj], axis=0)


@jax.jit
def _noisy_rollout_draws(a, b, batches, initial_losses, noise):
  """vmap over K draws: a, b [K, m, n]; noise [K, T, m] -> [K, T+1, m]."""
  return jax.vmap(_noisy_rollout, in_axes=(0, 0, None, None, 0))(
      a, b, batches, initial_losses, noise)


def sample_trajectories(post: Posterior, *, batches, initial_losses, num_samples: int = 500,
                        seed: int = 0, process_noise: bool = True) -> np.ndarray:
  """Posterior-predictive trajectories [K, T+1, m] (float64 where jax x64 is on).

  batches: int [T, k] positions into the fit's train ids (-1 pads); initial_losses [m].
  process_noise: add N(0, σ̂_z²) per step (True for a predictive band of observed losses;
  False gives the band of the noise-free simulator, parameter uncertainty only).
  """
  a, b = sample_params(post, num_samples=num_samples, seed=seed)
  t, m = np.asarray(batches).shape[0], post.A.shape[0]
  rng = np.random.default_rng(seed + 1)
  noise = rng.standard_normal((num_samples, t, m)) * np.sqrt(post.sigma2)[None, None, :]
  if not process_noise:
    noise = np.zeros_like(noise)
  positions = np.asarray(batches)
  n = post.A.shape[1]
  if (positions.ndim != 2 or not np.issubdtype(positions.dtype, np.integer)
      or positions.size and (positions.min() < -1 or positions.max() >= n)):
    raise ValueError(f"batches must be int [T, k] positions in [0, {n}) or -1 (pad); "
                     "convert train ids with rollout.ids_to_positions")
  out = _noisy_rollout_draws(jnp.asarray(a), jnp.asarray(b),
                             jnp.asarray(np.asarray(batches, np.int32)),
                             jnp.asarray(np.asarray(initial_losses, np.float64)),
                             jnp.asarray(noise))
  return np.asarray(out, np.float64)


def predictive_bands(post: Posterior, *, batches, initial_losses,
                     levels: Sequence[float] = (0.5, 0.9), num_samples: int = 500,
                     seed: int = 0, process_noise: bool = True) -> dict:
  """Central quantile bands of the posterior-predictive trajectory.

  Returns {"median": [T+1, m], level: (lo [T+1, m], hi [T+1, m]) for level in levels},
  with lo/hi the (1−level)/2 and (1+level)/2 quantiles over the K Monte Carlo draws.
  """
  traj = sample_trajectories(post, batches=batches, initial_losses=initial_losses,
                             num_samples=num_samples, seed=seed,
                             process_noise=process_noise)
  out: dict = {"median": np.quantile(traj, 0.5, axis=0)}
  for level in levels:
    if not 0 < level < 1:
      raise ValueError(f"band level must be in (0, 1), got {level}")
    lo, hi = np.quantile(traj, [(1 - level) / 2, (1 + level) / 2], axis=0)
    out[level] = (lo, hi)
  return out


def coverage(band: tuple[np.ndarray, np.ndarray], true) -> float:
  """Fraction of recorded entries of `true` [T+1, m] (rows ≥ 1, finite) inside [lo, hi]."""
  lo, hi = (np.asarray(v, np.float64)[1:] for v in band)
  y = np.asarray(true, np.float64)[1:]
  if lo.shape != y.shape:
    raise ValueError(f"band {lo.shape} and true losses {y.shape} (rows 1..T) differ")
  rec = np.isfinite(y)
  if not rec.any():
    return float("nan")
  return float(np.mean((y[rec] >= lo[rec]) & (y[rec] <= hi[rec])))


def run_coverage(post: Posterior, runs, *, train_ids, test_ids,
                 levels: Sequence[float] = (0.5, 0.9), num_samples: int = 500,
                 seed: int = 0) -> dict:
  """Pooled coverage of held-out runs' recorded losses: {level: fraction} plus counts.

  runs: RunTrace-like with curriculum (train ids) and losses [T+1, m] whose columns are
  `test_ids` in the fit's order (the caller aligns them); train_ids / test_ids of the fit.
  """
  inside = {level: 0 for level in levels}
  total = 0
  for r, run in enumerate(runs):
    if not np.array_equal(np.asarray(run.test_ids), np.asarray(test_ids)):
      raise ValueError(f"run {run.run_id!r}: test_ids must equal the fit's test_ids "
                       "(same order) for run_coverage")
    positions = rollout_lib.ids_to_positions(run.curriculum, train_ids)
    true = np.asarray(run.losses, np.float64)
    bands = predictive_bands(post, batches=positions, initial_losses=true[0],
                             levels=levels, num_samples=num_samples, seed=seed + 7919 * r)
    count = int(np.isfinite(true[1:]).sum())
    total += count
    for level in levels:
      inside[level] += coverage(bands[level], true) * count
  return {"coverage": {level: inside[level] / max(total, 1) for level in levels},
          "num_entries": total}


__all__ = ["Posterior", "posterior", "posterior_for_runs", "sample_params", "sample_trajectories",
           "predictive_bands", "coverage", "run_coverage"]
