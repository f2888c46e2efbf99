"""Traces shared by several tests: planted Simfluence-Linear runs (a known simulator (A, B)
generates every run, so a fit can be judged against the truth) and random decaying runs
(for solver-vs-reference comparisons).
"""

import dataclasses

import numpy as np

from simfluence_jax.simulators import design
from simfluence_jax.traces.contract import RunTrace


@dataclasses.dataclass(frozen=True)
class Run:  # the RunTrace attributes design / the solvers read (RunTrace is duck-typed)
  run_id: str
  train_ids: np.ndarray
  test_ids: np.ndarray
  batch_size: int
  curriculum: np.ndarray
  losses: np.ndarray


def rank2(m: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """A, B [m, n], each exactly rank 2; α ≈ 0.8 per step at batch size 4."""
  rng = np.random.default_rng(seed)
  ua = np.stack([1 + 0.05 * rng.standard_normal(m), rng.standard_normal(m)], 1)
  va = np.stack([0.2 + 0.01 * rng.standard_normal(n), 0.02 * rng.standard_normal(n)], 1)
  ub = np.stack([1 + 0.2 * rng.standard_normal(m), rng.standard_normal(m)], 1)
  vb = np.stack([0.02 + 0.005 * rng.standard_normal(n), 0.01 * rng.standard_normal(n)], 1)
  return ua @ va.T, ub @ vb.T


def linear_runs(a, b, *, train_ids, test_ids, num_runs, steps, batch, sigma, seed, prefix,
                pool=None) -> list[RunTrace]:
  """Runs of L_t = α(c_t) L_{t-1} + β(c_t) + N(0, sigma²), batches drawn without
  replacement from the first `pool` train positions (their train_ids say so)."""
  m, n = a.shape
  pool = n if pool is None else pool
  rng = np.random.default_rng(seed)
  out = []
  for r in range(num_runs):
    pos = np.stack([rng.choice(pool, batch, replace=False) for _ in range(steps)])
    losses = np.empty((steps + 1, m))
    losses[0] = rng.uniform(1.5, 3.0, m)
    for t in range(steps):
      losses[t + 1] = (a[:, pos[t]].sum(1) * losses[t] + b[:, pos[t]].sum(1)
                       + sigma * rng.standard_normal(m))
    out.append(RunTrace(run_id=f"{prefix}{r}", train_ids=train_ids[:pool], test_ids=test_ids,
                        batch_size=batch, curriculum=train_ids[pos].astype(np.int32),
                        losses=losses.astype(np.float32), metadata={}))
  return out


def random_runs(*, n=12, m=7, runs=6, steps=10, k=3, seed=0, lengths=None) -> list[RunTrace]:
  """Random decaying traces with per-run noise (no planted model); run r has lengths[r]
  steps if given; train ids 0..n-1, test ids 0..m-1, batches of k drawn with repeats."""
  rng = np.random.default_rng(seed)
  out = []
  for r in range(runs):
    t = steps if lengths is None else lengths[r]
    cur = rng.integers(0, n, size=(t, k)).astype(np.int32)
    losses = (np.linspace(3, 1, t + 1)[:, None] * rng.uniform(0.8, 1.2, m)
              + 0.3 * np.abs(rng.normal(size=(t + 1, m))))
    out.append(RunTrace(run_id=f"r{r}", train_ids=np.arange(n, dtype=np.int64),
                        test_ids=np.arange(m, dtype=np.int64), batch_size=k, curriculum=cur,
                        losses=losses.astype(np.float32), metadata={}))
  return out


def transitions(runs, dtype, n=12, m=7):
  """design.build_transitions of `random_runs` (train / test ids 0..n-1 / 0..m-1), its
  losses and mask cast to `dtype` (the precision a solver then computes in)."""
  tr = design.build_transitions(runs, train_ids=np.arange(n), test_ids=np.arange(m))
  cast = lambda a: np.asarray(a, dtype)
  return dataclasses.replace(tr, prev=cast(tr.prev), target=cast(tr.target),
                             mask=cast(tr.mask))


def rel_err(got, want) -> float:
  """max |got − want| relative to the largest |want| (float64)."""
  return float(np.abs(np.asarray(got, np.float64) - want).max()
               / max(np.abs(want).max(), 1e-300))
