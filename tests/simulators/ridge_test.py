"""ridge.solve / solve_path against the dense float64 reference and hand formulas.

Independent references: `solve_dense_reference` (explicit X, lstsq), a hand-written
TracIn-Ideal average (paper Eq. 6) and a planted noise-free Simfluence-Linear process.
Errors are measured relative to the largest |parameter| of the reference.
"""

import dataclasses

import jax
import numpy as np
import pytest

from simfluence_jax.simulators import design
from tests import planted_traces
from simfluence_jax.simulators import ridge
from simfluence_jax.traces import contract as traces

KINDS = ("linear", "additive", "multiplicative")


Run = planted_traces.Run


def _problem(*, batch, n=9, m=5, runs=4, steps=20, seed=0, dtype=np.float64,
             nan_frac=0.1):
  """Random traces; batch is an int or "ragged": runs of batch sizes 4, 3, 2 (so the fit's
  width-4 batches hold -1 pads; every row is full for its own run — a short batch is not a
  regression row) with duplicates in a batch."""
  rng = np.random.default_rng(seed)
  train_ids = rng.permutation(n) * 11 + 3           # ids are not positions
  test_ids = np.arange(m) * 5 + 1
  out = []
  for r in range(runs):
    k = (4, 3, 2)[r % 3] if batch == "ragged" else batch
    cur = train_ids[rng.integers(0, n, size=(steps, k))]
    if batch == "ragged":
      cur[::5, 1] = cur[::5, 0]                                  # duplicates in a batch
    losses = np.exp(-np.linspace(0, 1.5, steps + 1))[:, None] * rng.uniform(1, 3, m)
    losses = losses + 0.05 * rng.standard_normal(losses.shape)
    losses[rng.random(losses.shape) < nan_frac] = np.nan        # unrecorded -> masked
    perm = rng.permutation(m)                                    # run's own column order
    out.append(Run(f"r{r}", train_ids, test_ids[perm], k, cur.astype(np.int32),
                   losses[:, perm].astype(dtype)))
  return design.build_transitions(out, train_ids=train_ids, test_ids=test_ids)


def _rel_err(got, want):
  got = np.concatenate([np.asarray(g, np.float64) for g in got], axis=1)
  want = np.concatenate(want, axis=1)
  return np.abs(got - want).max() / max(np.abs(want).max(), 1e-300)


@pytest.mark.parametrize("batch", [1, 4, "ragged"])
@pytest.mark.parametrize("runs", [4, 2])   # S = 80 ≥ 8n: deflated CG steps; S = 40: not
def test_float64_matches_dense_reference(batch, runs):
  tr = _problem(batch=batch, seed=hash(str(batch)) % 100, runs=runs)
  with jax.enable_x64(True):
    for kind in KINDS:
      for lam in (1e-3, 1.0, 10.0):
        want = ridge.solve_dense_reference(tr, kind=kind, lam=lam)
        got = ridge.solve(tr, kind=kind, lam=lam, chunk_size=3)
        assert got[0].dtype == np.float64
        # float64 PCG to tol 1e-10 on small well-posed problems: 1e-8 of max |param|.
        assert _rel_err(got, want) < 1e-8, (kind, lam)
        if kind == "additive":
          assert not np.asarray(got[0]).any()
        if kind == "multiplicative":
          assert not np.asarray(got[1]).any()


@pytest.mark.parametrize("batch", [1, 4, "ragged"])
def test_float32_matches_dense_reference(batch):
  tr = _problem(batch=batch, seed=7, dtype=np.float32)
  for kind in KINDS:
    for lam in (1e-3, 1.0, 10.0):
      want = ridge.solve_dense_reference(tr, kind=kind, lam=lam)
      got = ridge.solve(tr, kind=kind, lam=lam)
      assert got[0].dtype == np.float32
      # float32 data and arithmetic: 2e-4 of max |param| (the benchmark's target).
      assert _rel_err(got, want) < 2e-4, (kind, lam, _rel_err(got, want))


def test_planted_noise_free_linear_is_recovered():
  rng = np.random.default_rng(3)
  n, m, k, steps = 6, 4, 2, 40
  train_ids = np.arange(n) * 2 + 100
  test_ids = np.arange(m)
  a = rng.uniform(0.40, 0.49, (m, n))
  b = rng.uniform(-0.05, 0.05, (m, n))
  runs = []
  for r in range(5):
    pos = np.stack([rng.choice(n, size=k, replace=False) for _ in range(steps)])
    loss = [rng.uniform(2, 4, m)]
    for row in pos:
      loss.append(a[:, row].sum(1) * loss[-1] + b[:, row].sum(1))
    runs.append(Run(f"p{r}", train_ids, test_ids, k, train_ids[pos].astype(np.int32),
                    np.stack(loss)))
  tr = design.build_transitions(runs, train_ids=train_ids, test_ids=test_ids)
  assert design.identifiability(tr)["unidentified"] == {}
  with jax.enable_x64(True):
    got_a, got_b = ridge.solve(tr, kind="linear", lam=1e-10)
  np.testing.assert_allclose(got_a, a, atol=1e-6)
  np.testing.assert_allclose(got_b, b, atol=1e-6)


def test_additive_batch1_is_tracin_ideal():
  """Paper Eq. 6: at batch size 1 and λ → 0, B_i = −mean_{t: c_t = i}(L_{t-1} − L_t)."""
  tr = _problem(batch=1, n=5, m=3, seed=11)
  with jax.enable_x64(True):
    _, got = ridge.solve(tr, kind="additive", lam=1e-12)
  want = np.zeros((3, 5))
  for z in range(3):
    for i in range(5):
      drops = [tr.prev[s, z] - tr.target[s, z] for s in range(tr.num_steps)
               if tr.batches[s, 0] == i and tr.mask[s, z] > 0]
      want[z, i] = -np.mean(drops)
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_chunk_size_invariance():
  # Lanes stop on their own residual, so chunk size (and thread windows) only change float
  # reassociation inside XLA kernels: ≤ 1e-5 of max |param| in float32 (a lane may cross its
  # stopping threshold one iteration apart), ≤ 1e-10 in float64.
  for dtype, rel in ((np.float32, 1e-5), (np.float64, 1e-10)):
    tr = _problem(batch="ragged", m=11, seed=5, dtype=dtype)
    with jax.enable_x64(dtype == np.float64):
      a0, b0 = ridge.solve(tr, kind="linear", lam=0.5, chunk_size=11, num_threads=1)
      for chunk, threads in ((1, 1), (4, 2), (100, 3)):
        a, b = ridge.solve(tr, kind="linear", lam=0.5, chunk_size=chunk,
                           num_threads=threads)
        np.testing.assert_allclose(a, a0, rtol=0, atol=rel * np.abs(a0).max())
        np.testing.assert_allclose(b, b0, rtol=0, atol=rel * np.abs(b0).max())


def test_masked_nan_never_poisons():
  tr = _problem(batch=4, seed=2, dtype=np.float32, nan_frac=0.3)
  off = np.asarray(tr.mask) == 0
  dirty = dataclasses.replace(tr, prev=np.where(off, np.nan, tr.prev),
                              target=np.where(off, np.inf, tr.target))
  clean = ridge.solve(tr, kind="linear", lam=0.1)
  got = ridge.solve(dirty, kind="linear", lam=0.1)
  assert np.isfinite(np.asarray(got[0])).all()
  np.testing.assert_array_equal(got[0], clean[0])
  np.testing.assert_array_equal(got[1], clean[1])


def test_solve_path_matches_independent_solves():
  tr = _problem(batch=4, seed=4)
  lams = [1.0, 1e-3, 10.0]
  with jax.enable_x64(True):
    path = ridge.solve_path(tr, kind="linear", lams=lams)
    for lam, (a, b) in zip(lams, path):
      want = ridge.solve_dense_reference(tr, kind="linear", lam=lam)
      assert _rel_err((a, b), want) < 1e-8, lam


def test_no_recompilation_on_second_call():
  tr = _problem(batch=4, seed=6, dtype=np.float32)
  tr2 = _problem(batch=4, seed=8, dtype=np.float32)   # same shapes, other data
  jax.block_until_ready(ridge.solve(tr, kind="linear", lam=0.3, chunk_size=2))
  before = ridge._solve_path_jit._cache_size()
  jax.block_until_ready(ridge.solve(tr2, kind="linear", lam=2.0, chunk_size=2))
  assert ridge._solve_path_jit._cache_size() == before


def test_unobserved_example_with_zero_lambda_stays_finite():
  """λ = 0 with a train example never consumed: its parameters are 0 (min-norm)."""
  tr = _problem(batch=1, n=4, m=2, seed=9, nan_frac=0.0)
  batches = np.where(tr.batches == 3, 0, tr.batches)   # position 3 never used
  tr = dataclasses.replace(tr, batches=batches)
  with jax.enable_x64(True):
    a, b = ridge.solve(tr, kind="linear", lam=0.0)
  want = ridge.solve_dense_reference(tr, kind="linear", lam=0.0)
  assert np.isfinite(np.asarray(a)).all()
  assert _rel_err((a, b), want) < 1e-8


@pytest.mark.parametrize("seed", [0, 5])
def test_random_losses_with_many_steps_match_reference(seed):
  """Regression: S ≥ 8n with random (non-decaying) losses and uneven batches with
  duplicates. Deflated PCG gave errors of ~1e2 relative here; plain PCG must match the
  float64 reference within float32 PCG accuracy (2e-4 of the largest parameter)."""
  rng = np.random.default_rng(seed)
  n, m, k = 50, 4, 4
  runs = []
  for r in range(3):
    steps = 5 * n
    cur = rng.integers(0, n, (steps, k)).astype(np.int32)
    for t, w in enumerate(rng.integers(1, k + 1, steps)):
      cur[t, w:] = -1
    losses = rng.uniform(0.5, 3.0, (steps + 1, m)).astype(np.float32)
    losses[rng.uniform(size=losses.shape) < 0.15] = np.nan
    runs.append(traces.RunTrace(f"r{r}", np.arange(n, dtype=np.int64),
                                np.arange(m, dtype=np.int64), k, cur, losses))
  tr = design.build_transitions(runs, train_ids=np.arange(n), test_ids=np.arange(m))
  for kind in ("linear", "additive", "multiplicative"):
    a_ref, b_ref = ridge.solve_dense_reference(tr, kind=kind, lam=0.3)
    a, b = ridge.solve(tr, kind=kind, lam=0.3)
    scale = max(1.0, np.abs(a_ref).max(), np.abs(b_ref).max())
    np.testing.assert_allclose(np.asarray(a), a_ref, atol=2e-4 * scale, rtol=0)
    np.testing.assert_allclose(np.asarray(b), b_ref, atol=2e-4 * scale, rtol=0)
