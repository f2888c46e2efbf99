"""Run-shared step terms (ρ_t, γ_t) and centred shrinkage: the production PCG against the
dense float64 lstsq reference (float64 and float32), planted-truth recovery, hand-computed
rollouts, the `beyond` rule, and variant selection on validation runs."""

import dataclasses

import jax
import numpy as np
import pytest

from simfluence_jax.simulators import design
from simfluence_jax.simulators import ridge
from simfluence_jax.simulators import rollout
from simfluence_jax.simulators import simfluence as simulators
from simfluence_jax.traces import fit_params
from simfluence_jax.traces.contract import RunTrace
from tests import planted_traces

KINDS = ("linear", "additive", "multiplicative")
TERMS = {
    "gamma": ridge.Terms(gamma=True, lam_step=0.01),
    "rho": ridge.Terms(rho=True, lam_step=0.1),
    "rho_gamma": ridge.Terms(rho=True, gamma=True, lam_step=0.01),
    "centred": ridge.Terms(centred=True),
    "centred_gamma": ridge.Terms(centred=True, gamma=True, lam_step=0.01),
}



@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(TERMS))
@pytest.mark.parametrize("x64", [True, False], ids=["float64", "float32"])
def test_production_solver_matches_dense_reference(kind, name, x64):
  terms = TERMS[name]
  # ragged run lengths: the last steps are seen by fewer runs
  runs = planted_traces.random_runs(lengths=[10, 10, 8, 10, 6, 10])
  want = ridge.solve_dense_reference(planted_traces.transitions(runs, np.float64), kind=kind, lam=0.3,
                                     terms=terms)
  tol = 1e-8 if x64 else 2e-4     # relative to the largest |parameter| of each array
  with jax.enable_x64(x64):
    tr = planted_traces.transitions(runs, np.float64 if x64 else np.float32)
    # chunk 3 of m = 7: the last chunk overlaps; a second chunk size for one variant only
    for chunk in ((3, 7) if name == "rho_gamma" and kind == "linear" else (3,)):
      got, = ridge.solve_path_with_terms(tr, kind=kind, lams=[0.3], terms=terms,
                                         chunk_size=chunk)
      assert got.rho.shape == got.gamma.shape == (7, 10 if terms.has_steps else 0)
      for field, g, w in zip(ridge.Solution._fields, got, want):
        if w.size and np.abs(w).max() > 0:
          assert planted_traces.rel_err(g, w) < tol, (field, chunk, planted_traces.rel_err(g, w))
        else:   # the half or term this kind / variant does not fit is exactly zero
          assert not np.any(np.asarray(g)), field


def test_lambda_path_with_terms_equals_independent_solves_and_compiles_once():
  runs = planted_traces.random_runs(seed=1)
  terms = TERMS["rho_gamma"]
  with jax.enable_x64(True):
    tr = planted_traces.transitions(runs, np.float64)
    path = ridge.solve_path_with_terms(tr, kind="linear", lams=[0.01, 3.0, 100.0],
                                       terms=terms)
    for lam, sol in zip([0.01, 3.0, 100.0], path):
      want = ridge.solve_dense_reference(tr, kind="linear", lam=lam, terms=terms)
      assert max(planted_traces.rel_err(g, w) for g, w in zip(sol, want)) < 1e-8
    # another λ_s is a traced value: no new compilation
    before = ridge._solve_path_jit._cache_size()    # pylint: disable=protected-access
    ridge.solve_path_with_terms(tr, kind="linear", lams=[0.01, 3.0, 100.0],
                                terms=dataclasses.replace(terms, lam_step=0.5))
    assert ridge._solve_path_jit._cache_size() == before  # pylint: disable=protected-access


def _planted(num_runs, *, seed, steps=12, n=10, m=4, k=2, sigma=0.0):
  """Runs of L_t = (α(c_t) + ρ_t) L_{t-1} + β(c_t) + γ_t with known parameters."""
  rng = np.random.default_rng(seed)
  a = 0.02 * rng.normal(size=(m, n))
  b = 0.05 * rng.normal(size=(m, n))
  rho = 0.85 + 0.05 * rng.normal(size=(m, steps))
  gamma = -0.1 + 0.05 * rng.normal(size=(m, steps))
  runs = []
  for r in range(num_runs):
    pos = np.stack([rng.choice(n, k, replace=False) for _ in range(steps)])
    loss = [rng.uniform(1.0, 3.0, m)]
    for t in range(steps):
      alpha = a[:, pos[t]].sum(1) + rho[:, t]
      beta = b[:, pos[t]].sum(1) + gamma[:, t]
      loss.append(alpha * loss[-1] + beta + sigma * rng.normal(size=m))
    runs.append(RunTrace(run_id=f"p{r}", train_ids=np.arange(n, dtype=np.int64),
                         test_ids=np.arange(m, dtype=np.int64), batch_size=k,
                         curriculum=pos.astype(np.int32),
                         losses=np.stack(loss).astype(np.float32), metadata={}))
  return (a, b, rho, gamma), runs


def test_planted_step_terms_are_recovered_up_to_their_one_gauge():
  # With full batches of k, (A_i + c, ρ_t − k c) is the same model (and likewise B, γ):
  # the identifiable quantities are A − mean(A), ρ_t + k·mean(A), B − mean(B),
  # γ_t + k·mean(B) — recovered from noise-free runs at a tiny λ.
  (a, b, rho, gamma), runs = _planted(30, seed=3)
  k = 2
  with jax.enable_x64(True):
    tr = design.build_transitions(
        [dataclasses.replace(r, losses=r.losses.astype(np.float64)) for r in runs],
        train_ids=np.arange(10), test_ids=np.arange(4))
    sol, = ridge.solve_path_with_terms(tr, kind="linear", lams=[1e-9],
                                       terms=ridge.Terms(rho=True, gamma=True, lam_step=1e-9))
  got_a, got_b, got_rho, got_gamma = (np.asarray(x) for x in sol)
  ma, mb = got_a.mean(1, keepdims=True), got_b.mean(1, keepdims=True)
  np.testing.assert_allclose(got_a - ma, a - a.mean(1, keepdims=True), atol=2e-4)
  np.testing.assert_allclose(got_b - mb, b - b.mean(1, keepdims=True), atol=2e-4)
  np.testing.assert_allclose(got_rho + k * ma, rho + k * a.mean(1, keepdims=True), atol=2e-4)
  np.testing.assert_allclose(got_gamma + k * mb, gamma + k * b.mean(1, keepdims=True),
                             atol=5e-4)


def test_fit_picks_step_terms_on_planted_step_dynamics_and_the_paper_on_paper_data():
  _, runs = _planted(14, seed=5, sigma=0.002)
  params, diag = simulators.fit(runs[:10], simulator="linear", val_runs=runs[10:12],
                                lam_grid=(1e-4, 1e-2, 1.0), lam_step_grid=(1e-4, 1e-2))
  scores = diag["validation_mse"]
  best_key = min(scores, key=scores.get)
  assert best_key.startswith(diag["variant"] + " lam=")
  assert diag["variant"] in ("rho_gamma",), scores
  assert params.num_step_terms == 12 and params.rho is not None
  # held-out: the simulated trajectory follows the planted one closely
  pred = simulators.simulate_run(params, runs[13])
  assert np.abs(pred - runs[13].losses).max() < 0.05


def test_step_terms_without_validation_runs_need_one_lam_step():
  # Nothing could choose λ_s: an error naming what to give, not a silent grid corner.
  _, runs = _planted(3, seed=6)
  with pytest.raises(ValueError, match="needs lam_step"):
    simulators.fit(runs, simulator="linear_rho_gamma", lam=0.1)
  params, diag = simulators.fit(runs, simulator="linear_rho_gamma", lam=0.1, lam_step=0.5)
  assert diag["terms"]["lam_step"] == 0.5 and params.num_step_terms == 12
  # a bare kind without validation runs is the paper's model, which needs no λ_s
  params, diag = simulators.fit(runs, simulator="linear", lam=0.1)
  assert diag["variant"] == "paper" and params.num_step_terms == 0


def test_centred_shrinkage_tends_to_one_shared_dynamic_not_to_zero():
  # λ → ∞: centred A_i, B_i all tend to the best shared (ā, b̄) — the two-parameter
  # regression y ≈ k ā x + k b̄ (full batches of k) — while plain ridge tends to 0.
  runs = planted_traces.random_runs(seed=4)
  with jax.enable_x64(True):
    tr = planted_traces.transitions(runs, np.float64)
    sol, = ridge.solve_path_with_terms(tr, kind="linear", lams=[1e9],
                                       terms=ridge.Terms(centred=True))
    plain_a, plain_b = ridge.solve(tr, kind="linear", lam=1e9)
  x, y, mu = (np.asarray(v) for v in (tr.prev, tr.target, tr.mask))
  k = 3
  for z in range(x.shape[1]):
    rows = mu[:, z] > 0
    design_z = np.stack([k * x[rows, z], k * np.ones(rows.sum())], 1)
    abar, bbar = np.linalg.lstsq(design_z, y[rows, z], rcond=None)[0]
    np.testing.assert_allclose(np.asarray(sol.A)[z], abar, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sol.B)[z], bbar, rtol=1e-5, atol=1e-8)
  assert np.abs(np.asarray(plain_a)).max() < 1e-6 and np.abs(np.asarray(plain_b)).max() < 1e-6


def test_rollout_with_step_terms_hand_values_and_the_beyond_rule():
  # m = 1, n = 2, A = (0.5, 0.25), B = (0.1, 0.0); ρ = (0.1, 0.2), γ = (−0.5, 0.3).
  a, b = np.array([[0.5, 0.25]]), np.array([[0.1, 0.0]])
  rho, gamma = np.array([[0.1, 0.2]]), np.array([[-0.5, 0.3]])
  batches = np.array([[0], [1], [-1], [0]], np.int32)   # step 3 is empty: an identity step
  # L1 = (0.5 + 0.1)·2 + 0.1 − 0.5 = 0.8;  L2 = (0.25 + 0.2)·0.8 + 0 + 0.3 = 0.66
  # L3 = L2 (identity);  L4 hold: (0.5 + 0.2)·0.66 + 0.1 + 0.3 = 0.862
  #                      L4 zero: 0.5·0.66 + 0.1 = 0.43
  with jax.enable_x64(True):
    hold = rollout.rollout(a, b, kind="linear", batches=batches, initial_losses=np.array([2.0]),
                           rho=rho, gamma=gamma, beyond="hold")
    zero = rollout.rollout(a, b, kind="linear", batches=batches, initial_losses=np.array([2.0]),
                           rho=rho, gamma=gamma, beyond="zero")
    many = rollout.rollout_many(a, b, kind="linear", batches=np.stack([batches, batches]),
                                initial_losses=np.array([2.0]), rho=rho, gamma=gamma)
  np.testing.assert_allclose(np.asarray(hold)[:, 0], [2.0, 0.8, 0.66, 0.66, 0.862], atol=1e-12)
  np.testing.assert_allclose(np.asarray(zero)[:, 0], [2.0, 0.8, 0.66, 0.66, 0.43], atol=1e-12)
  np.testing.assert_allclose(np.asarray(many)[1], np.asarray(hold), atol=1e-12)


def test_fit_params_with_step_terms_round_trip_and_bad_terms_are_named(tmp_path):
  rng = np.random.default_rng(0)
  params = fit_params.FitParams(
      A=rng.normal(size=(3, 4)).astype(np.float32), B=rng.normal(size=(3, 4)).astype(np.float32),
      train_ids=np.arange(4, dtype=np.int64) + 10, test_ids=np.array([7, 8, 9]), kind="linear",
      lam=0.5, rho=rng.normal(size=(3, 5)).astype(np.float32),
      gamma=rng.normal(size=(3, 5)).astype(np.float32), beyond="zero")
  fit_params.save_fit(tmp_path, "f", params, {"variant": "rho_gamma"})
  got, diag = fit_params.load_fit(tmp_path, "f")
  for name in ("A", "B", "rho", "gamma"):
    np.testing.assert_array_equal(getattr(got, name), getattr(params, name))
  assert got.beyond == "zero" and got.num_step_terms == 5 and diag == {"variant": "rho_gamma"}
  bad = dataclasses.replace(params, gamma=np.full((3, 5), np.nan, np.float32))
  with pytest.raises(fit_params.TraceError, match=r"gamma\[0, 0\] \(test id 7, step 1\)"):
    fit_params.save_fit(tmp_path, "g", bad, {})
  with pytest.raises(fit_params.TraceError, match="same T_s"):
    fit_params.validate(dataclasses.replace(params, rho=np.zeros((3, 4), np.float32)), "x")
  assert not (tmp_path / "fits" / "g" / "fit.json").exists()


def test_centred_shrinkage_recovers_a_planted_shared_dynamic_better_than_plain_ridge():
  # Planted paper-model runs whose A_i, B_i scatter around a shared (ā, b̄) ≠ 0; few runs
  # leave the per-example parameters under-determined, so the prior decides: at the same
  # λ, shrinking toward the mean example recovers the planted parameters far better than
  # shrinking toward 0 (and the mean itself almost exactly).
  rng = np.random.default_rng(7)
  m, n, k, steps = 3, 40, 4, 12
  abar, bbar = 0.24, -0.01
  a = abar + 0.005 * rng.normal(size=(m, n))
  b = bbar + 0.002 * rng.normal(size=(m, n))
  runs = []
  for r in range(3):
    pos = np.stack([rng.choice(n, k, replace=False) for _ in range(steps)])
    loss = [rng.uniform(1.0, 3.0, m)]
    for t in range(steps):
      loss.append(a[:, pos[t]].sum(1) * loss[-1] + b[:, pos[t]].sum(1)
                  + 0.001 * rng.normal(size=m))
    runs.append(RunTrace(run_id=f"c{r}", train_ids=np.arange(n, dtype=np.int64),
                         test_ids=np.arange(m, dtype=np.int64), batch_size=k,
                         curriculum=pos.astype(np.int32),
                         losses=np.stack(loss).astype(np.float32), metadata={}))
  with jax.enable_x64(True):
    tr = design.build_transitions(
        [dataclasses.replace(r, losses=r.losses.astype(np.float64)) for r in runs],
        train_ids=np.arange(n), test_ids=np.arange(m))
    centred, = ridge.solve_path_with_terms(tr, kind="linear", lams=[1.0],
                                           terms=ridge.Terms(centred=True))
    plain_a, plain_b = ridge.solve(tr, kind="linear", lam=1.0)
  err = lambda got, want: float(np.abs(np.asarray(got) - want).max())
  assert err(centred.A, a) < 0.02 and err(centred.B, b) < 0.01
  assert err(centred.A, a) < 0.2 * err(plain_a, a)
  np.testing.assert_allclose(np.asarray(centred.A).mean(1), a.mean(1), atol=2e-3)
