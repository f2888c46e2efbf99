"""Benchmark of the production ridge solver on the paper's trace sizes: the paper's Eq. 2
(`ridge.solve`) and the default variant with run-shared step terms ρ_t, γ_t
(`ridge.solve_path_with_terms`, the variant `fit --simulator=linear` picks on our
experiments).

Synthetic traces follow the paper's protocol (§5): 20 fit runs, each a random subset of the
train pool, reshuffled every epoch, batch size 4:
  few-shot:  64 of 100 pool examples × 4 epochs   ->  64 steps/run, S = 1,280
  many-shot: 1,024 of 1,536 examples × 1.5 epochs -> 384 steps/run, S = 7,680
Losses follow a planted Simfluence-Linear process (Eq. 1) plus Gaussian process noise.

Reports (last line, JSON): the median wall time of `ridge.solve` after a warm-up compile,
a per-example numpy baseline (dense X, float64 normal equations) timed on a sample and
extrapolated to seconds per simulator, and the production error vs those float64 solves
(max |Δ| over the sample, relative to the sample's max |parameter|); the same three figures
for the step-terms variant under "rho_gamma" (its numpy baseline adds the step columns
[(x − x̄_t)·E, E] to X, the same model as the solver's), and under "lowrank" the default
`fit --simulator=linear` picks on the quickstart: that stage 1 plus the rank-1 prior and one
solve toward it (numpy: the same two per-example solves and one SVD).

  python -m benchmarks.fit_bench --size=few-shot [--m=10000] [--lam=0.1] [--repeats=5]
(from the repository root; or PYTHONPATH=. python benchmarks/fit_bench.py ...)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import jax
import numpy as np

from simfluence_jax.simulators import design
from simfluence_jax.simulators import lowrank_prior
from simfluence_jax.simulators import ridge
from simfluence_jax.simulators import ridge_reference
from simfluence_jax.traces.contract import RunTrace

SIZES = {
    "few-shot": dict(pool=100, subset=64, epochs=4.0, m=10_000),
    "many-shot": dict(pool=1536, subset=1024, epochs=1.5, m=1_000),
}
NUM_RUNS, BATCH = 20, 4


def synthetic_runs(*, pool: int, subset: int, epochs: float, m: int, seed: int = 0,
                   noise: float = 0.01):
  """Planted Simfluence-Linear traces; returns (runs, train_ids, test_ids, A, B)."""
  rng = np.random.default_rng(seed)
  train_ids = np.arange(pool, dtype=np.int64) * 3 + 1000   # ids are not positions
  test_ids = np.arange(m, dtype=np.int64) + 7
  steps = int(round(subset * epochs)) // BATCH
  # α(c) ≈ 1 − O(1/steps) per step, β small: losses decay over a run but stay positive.
  a = (1.0 - rng.uniform(0.0, 4.0 / steps, (m, pool))) / BATCH
  b = rng.uniform(-0.02, 0.01, (m, pool)) / BATCH
  runs = []
  for r in range(NUM_RUNS):
    chosen = rng.choice(pool, size=subset, replace=False)
    order = np.concatenate([rng.permutation(chosen) for _ in range(int(np.ceil(epochs)))])
    pos = order[:steps * BATCH].reshape(steps, BATCH)
    losses = np.empty((steps + 1, m))
    losses[0] = rng.uniform(2.0, 4.0, m)
    for t in range(steps):
      alpha, beta = a[:, pos[t]].sum(1), b[:, pos[t]].sum(1)
      losses[t + 1] = alpha * losses[t] + beta + noise * rng.standard_normal(m)
    runs.append(RunTrace(f"run{r:02d}", train_ids[chosen], test_ids, BATCH,
                         train_ids[pos].astype(np.int32), losses.astype(np.float32), {}))
  return runs, train_ids, test_ids, a, b


def numpy_baseline(tr, cols, *, lam: float):
  """Per test example: dense X = [x·Q, Q] in float64, normal equations with numpy."""
  q = ridge_reference.dense_q(tr.batches, tr.num_train)
  n = tr.num_train
  out = []
  for z in cols:
    keep = np.asarray(tr.mask[:, z]) > 0
    x = np.asarray(tr.prev[keep, z], np.float64)
    y = np.asarray(tr.target[keep, z], np.float64)
    xm = np.concatenate([x[:, None] * q[keep], q[keep]], axis=1)
    w = np.linalg.solve(xm.T @ xm + lam * np.eye(2 * n), xm.T @ y)
    out.append((w[:n], w[n:]))
  return out


def numpy_baseline_step_terms(tr, cols, *, lam, lam_step: float, prior=None):
  """Per test example: dense X = [x·Q, Q, (x − x̄_t)·E, E] in float64, normal equations.

  lam: λ or (λ_A, λ_B); prior: (Ā, B̄) [m, n] means of A, B (the lowrank variant's stage 2:
  (XᵀX + Λ) w = Xᵀy + Λ w̄). Returns [(A, B, rho, gamma)] with gamma in the model's basis
  (γ_t = γ'_t − ρ_t x̄_t).
  """
  lam_a, lam_b = lam if np.ndim(lam) else (lam, lam)
  steps = np.asarray(tr.steps)
  num_t = int(steps.max()) + 1
  q = ridge_reference.dense_q(tr.batches, tr.num_train)
  e = np.zeros((tr.num_steps, num_t))
  e[np.arange(tr.num_steps), steps] = 1.0
  n = tr.num_train
  pen = np.concatenate([np.full(n, lam_a), np.full(n, lam_b), np.full(2 * num_t, lam_step)])
  out = []
  for z in cols:
    keep = np.asarray(tr.mask[:, z]) > 0
    x = np.asarray(tr.prev[keep, z], np.float64)
    y = np.asarray(tr.target[keep, z], np.float64)
    ek = e[keep]
    xbar = ek.T @ x / np.maximum(ek.sum(0), 1)
    xm = np.concatenate([x[:, None] * q[keep], q[keep], (x - ek @ xbar)[:, None] * ek, ek], 1)
    rhs = xm.T @ y
    if prior is not None:
      rhs[:2 * n] += pen[:2 * n] * np.concatenate([prior[0][z], prior[1][z]])
    w = np.linalg.solve(xm.T @ xm + np.diag(pen), rhs)
    rho = w[2 * n:2 * n + num_t]
    out.append((w[:n], w[n:2 * n], rho, w[2 * n + num_t:] - rho * xbar))
  return out


def _solution_errors(sol, ref, cols) -> dict:
  """{field: max |production − numpy| / max |numpy|} over the sampled test columns."""
  out = {}
  for j, name in enumerate(ridge.Solution._fields):
    got = np.asarray(getattr(sol, name), np.float64)[cols]
    want = np.stack([r[j] for r in ref])
    out[name] = float(np.abs(got - want).max() / np.abs(want).max())
  return out


def _time(fn, repeats):
  t0 = time.perf_counter()
  result = jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    result = jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return result, statistics.median(times), times, first


def run(size: str, m: int | None, lam: float, repeats: int, sample: int | None,
        chunk_size: int | None, lam_step: float = 0.01) -> dict:
  cfg = dict(SIZES[size])
  m = cfg.pop("m") if m is None else m
  cfg.pop("m", None)
  runs, train_ids, test_ids, _, _ = synthetic_runs(**cfg, m=m)
  tr = design.build_transitions(runs, train_ids=train_ids, test_ids=test_ids)
  del runs

  (a, b), seconds, times, compile_and_first = _time(
      lambda: ridge.solve(tr, kind="linear", lam=lam, chunk_size=chunk_size), repeats)
  terms = ridge.Terms(rho=True, gamma=True, lam_step=lam_step)
  (sol,), steps_seconds, steps_times, steps_first = _time(
      lambda: ridge.solve_path_with_terms(tr, kind="linear", lams=[lam], terms=terms,
                                          chunk_size=chunk_size), repeats)

  # The lowrank variant's stage 2 (what `fit --simulator=linear` picks on the quickstart):
  # the rank-1 prior of the stage-1 fit above, then one solve toward it at the quickstart's
  # validated (λ_A, λ_B) = (1e3, 1e-3). Its total cost is stage 1 + stage 2.
  pair = (1e3, 1e-3)
  (eb,), eb_seconds, eb_times, eb_first = _time(
      lambda: lowrank_prior.fit_passes(tr, kind="linear", stage1=sol, terms=terms,
                                       pairs=[pair], chunk_size=chunk_size), repeats)

  if sample is None:
    sample = 40 if size == "few-shot" else 3
  cols = np.random.default_rng(1).choice(m, size=min(sample, m), replace=False)
  t0 = time.perf_counter()
  ref = numpy_baseline(tr, cols, lam=lam)
  baseline_per_sim = (time.perf_counter() - t0) / len(cols)
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  want = np.stack([np.concatenate(w) for w in ref])
  got = np.concatenate([a[cols], b[cols]], axis=1)
  max_rel_err = float(np.abs(got - want).max() / np.abs(want).max())
  t0 = time.perf_counter()
  ref_steps = numpy_baseline_step_terms(tr, cols, lam=lam, lam_step=lam_step)
  steps_baseline = (time.perf_counter() - t0) / len(cols)
  steps_err = _solution_errors(sol, ref_steps, cols)
  # numpy stage 2: the same prior (SVD of the production stage 1, timed once in numpy over
  # all m, as a numpy pipeline would), then per-example dense solves.
  t0 = time.perf_counter()
  prior = (lowrank_prior.low_rank(np.asarray(sol.A), 1), lowrank_prior.low_rank(
      np.asarray(sol.B), 1))
  svd_seconds = time.perf_counter() - t0
  t0 = time.perf_counter()
  ref_eb = numpy_baseline_step_terms(tr, cols, lam=pair, lam_step=lam_step, prior=prior)
  eb_baseline = (time.perf_counter() - t0) / len(cols)
  eb_err = _solution_errors(eb, ref_eb, cols)
  lowrank_total = steps_seconds + eb_seconds
  lowrank_baseline = (steps_baseline + eb_baseline) * m + svd_seconds
  return {
      "size": size, "m": int(m), "n": int(tr.num_train), "S": int(tr.num_steps),
      "k": int(tr.batches.shape[1]), "lam": lam, "dtype": str(np.asarray(tr.prev).dtype),
      "seconds": seconds, "seconds_all": times, "first_call_seconds": compile_and_first,
      "sims_per_s": m / seconds, "baseline_seconds_per_sim": baseline_per_sim,
      "baseline_sample": int(len(cols)), "speedup": baseline_per_sim * m / seconds,
      "max_rel_err": max_rel_err,
      "rho_gamma": {"lam_step": lam_step, "seconds": steps_seconds, "seconds_all": steps_times,
                    "first_call_seconds": steps_first,
                    "baseline_seconds_per_sim": steps_baseline,
                    "speedup": steps_baseline * m / steps_seconds,
                    "max_rel_err": steps_err},
      "lowrank": {"lam_a": pair[0], "lam_b": pair[1], "lam_step": lam_step,
                  "stage2_seconds": eb_seconds, "stage2_seconds_all": eb_times,
                  "stage2_first_call_seconds": eb_first,
                  "seconds": lowrank_total,      # stage 1 (rho_gamma above) + stage 2
                  "baseline_seconds": lowrank_baseline,
                  "speedup": lowrank_baseline / lowrank_total,
                  "max_rel_err": eb_err},
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
      "backend": jax.default_backend(),
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=sorted(SIZES), default="few-shot")
  parser.add_argument("--m", type=int, default=None, help="test examples (default per size)")
  parser.add_argument("--lam", type=float, default=0.1, help="ridge λ")
  parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median)")
  parser.add_argument("--sample", type=int, default=None,
                      help="test examples for the numpy baseline / error check")
  parser.add_argument("--chunk_size", type=int, default=None)
  parser.add_argument("--lam_step", type=float, default=0.01, help="step terms' λ_s")
  args = parser.parse_args(argv)
  result = run(args.size, args.m, args.lam, args.repeats, args.sample, args.chunk_size,
               args.lam_step)
  sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
  main()
