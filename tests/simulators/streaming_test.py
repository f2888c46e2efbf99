"""Streaming / sharded fits (streaming.py) against the dense float64 reference and the
in-memory fit, invariant to chunking and device count; memory bounded in a child process."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from simfluence_jax.simulators import design
from simfluence_jax.traces import fit_params
from simfluence_jax.simulators import ridge
from simfluence_jax.simulators import simfluence as simulators
from simfluence_jax.simulators import streaming
from simfluence_jax.traces import contract as traces
from tests import planted_traces

KINDS = ("linear", "additive", "multiplicative")


def _workspace(tmp_path, *, m=23, n=10, seed=0):
  """4 fit runs + 2 validation runs of a planted linear simulator, with the awkward cases:
  an id twice in one batch, unrecorded (NaN) losses, a run recording a permuted subset of
  the test ids, a short final batch."""
  rng = np.random.default_rng(seed)
  a, b = planted_traces.rank2(m, n, seed=seed)
  train_ids = np.arange(100, 100 + 3 * n, 3, dtype=np.int64)
  test_ids = np.arange(7, 7 + 2 * m, 2, dtype=np.int64)
  runs = planted_traces.linear_runs(a, b, train_ids=train_ids, test_ids=test_ids,
                                    num_runs=6, steps=14, batch=3, sigma=0.01, seed=seed,
                                    prefix="run_")
  cur = runs[0].curriculum.copy()
  cur[2, 1] = cur[2, 0]                          # an id twice in one batch
  cur[-1, 2] = -1                                # a short final batch
  losses = runs[1].losses.copy()
  losses[5, 3] = np.nan                          # unrecorded entries
  losses[9, :4] = np.nan
  perm = rng.permutation(m)[: m - 4]             # run 2 records a permuted subset
  fixed = list(runs)
  fixed[0] = dataclasses.replace(runs[0], curriculum=cur)
  fixed[1] = dataclasses.replace(runs[1], losses=losses)
  fixed[2] = dataclasses.replace(runs[2], test_ids=test_ids[perm],
                                 losses=runs[2].losses[:, perm])
  for r in fixed:
    traces.write_run(tmp_path, r)
  return tmp_path, ["run_0", "run_1", "run_2", "run_3"], ["run_4", "run_5"]


def _reference(workspace, fit_ids, kind, lam):
  runs = simulators.read_runs(workspace, fit_ids)
  train_ids = simulators.union_ids([r.train_ids for r in runs])
  test_ids = simulators.ordered_test_ids(runs)
  tr = design.build_transitions(runs, train_ids=train_ids, test_ids=test_ids)
  return tr, ridge.solve_dense_reference(tr, kind=kind, lam=lam)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("solver", ["normal", "pcg"])
def test_streaming_fit_equals_dense_float64_reference(tmp_path, kind, solver):
  workspace, fit_ids, _ = _workspace(tmp_path)
  params, diag = streaming.fit_streaming(workspace, fit_ids, simulator=kind, lam=0.05,
                                         chunk_size=7, solver=solver)
  _, (a_ref, b_ref) = _reference(workspace, fit_ids, kind, 0.05)
  scale = max(np.abs(a_ref).max(), np.abs(b_ref).max())
  # normal: float32 Cholesky + two float64 refinement steps -> ~float64 accuracy (1e-7 of
  # the largest parameter); pcg: float32 PCG at tol 1e-6 (ridge.py: within ~1e-4).
  tol = 1e-7 if solver == "normal" else 2e-4
  np.testing.assert_allclose(params.A, a_ref, atol=tol * scale + 1e-7, rtol=0)
  np.testing.assert_allclose(params.B, b_ref, atol=tol * scale + 1e-7, rtol=0)
  assert diag["streaming"]["solver"] == solver and diag["streaming"]["num_chunks"] == 4


def test_normal_equations_equal_explicit_design_products():
  """Accumulated statistics = XᵀX and Xᵀy built from the explicit dense design (float64)."""
  rng = np.random.default_rng(1)
  n, steps, c = 6, 9, 4
  batches = rng.integers(0, n, (steps, 3)).astype(np.int32)
  batches[0] = [2, 2, 5]
  batches[3, 2] = -1
  prev, target = rng.uniform(1, 2, (steps, c)), rng.uniform(1, 2, (steps, c))
  mask = (rng.uniform(size=(steps, c)) > 0.2).astype(np.float64)
  tr = design.Transitions(batches, prev * mask, target * mask, mask, n)
  stats = streaming.accumulate(streaming.empty_statistics("linear", n, c), tr)
  q = np.zeros((steps, n))
  for s, row in enumerate(batches):
    for i in row[row >= 0]:
      q[s, i] += 1
  for z in range(c):
    rows = mask[:, z] > 0
    x = np.concatenate([prev[rows, z, None] * q[rows], q[rows]], 1)
    gram = stats.g_xx[:, z].reshape(n, n), stats.g_x[:, z].reshape(n, n)
    full = np.block([[gram[0], gram[1]], [gram[1], stats.g_1[:, z].reshape(n, n)]])
    np.testing.assert_allclose(full, x.T @ x, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.concatenate([stats.h_a[:, z], stats.h_b[:, z]]),
                               x.T @ target[rows, z], rtol=1e-12, atol=1e-12)


def test_results_do_not_depend_on_chunking_run_order_or_device_count(tmp_path):
  workspace, fit_ids, _ = _workspace(tmp_path)
  devices = jax.devices()
  if len(devices) < 2:
    pytest.skip("needs several devices: launch/test.sh forces 8 host devices via XLA_FLAGS")
  one = streaming.tests_mesh(devices[:1])
  many = streaming.tests_mesh(devices)
  base, _ = streaming.fit_streaming(workspace, fit_ids, simulator="linear", lam=0.1,
                                    chunk_size=23, solver="normal", mesh=one)
  for chunk, order, mesh in ((5, fit_ids, one), (23, fit_ids[::-1], one),
                             (23, fit_ids, many), (6, fit_ids[::-1], many)):
    other, diag = streaming.fit_streaming(workspace, order, simulator="linear", lam=0.1,
                                          chunk_size=chunk, solver="normal", mesh=mesh)
    assert diag["streaming"]["devices"] == mesh.devices.size
    # Same float64 statistics up to summation order; sharding itself changes nothing.
    np.testing.assert_allclose(other.A, base.A, rtol=0, atol=1e-6)
    np.testing.assert_allclose(other.B, base.B, rtol=0, atol=1e-6)
  # Sharded over all devices vs one device, same chunks and order: identical.
  sharded, _ = streaming.fit_streaming(workspace, fit_ids, simulator="linear", lam=0.1,
                                       chunk_size=23, solver="normal", mesh=many)
  np.testing.assert_array_equal(sharded.A, base.A)
  np.testing.assert_array_equal(sharded.B, base.B)


def test_lambda_selection_matches_the_in_memory_fit(tmp_path):
  workspace, fit_ids, val_ids = _workspace(tmp_path)
  grid = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
  ref, ref_diag = simulators.fit(simulators.read_runs(workspace, fit_ids),
                                 simulator="linear_paper", lam_grid=grid,
                                 val_runs=simulators.read_runs(workspace, val_ids))
  for keep_bytes in (1 << 30, 0):                 # all λs kept, or a second pass
    params, diag = streaming.fit_streaming(workspace, fit_ids, simulator="linear",
                                           lam_grid=grid, val_run_ids=val_ids,
                                           chunk_size=8, keep_bytes=keep_bytes)
    assert diag["streaming"]["passes"] == (1 if keep_bytes else 2)
    assert params.lam == ref.lam
    for key, value in ref_diag["validation_mse"].items():
      assert diag["validation_mse"][key] == pytest.approx(value, rel=2e-3)
    np.testing.assert_allclose(params.A, ref.A, atol=2e-4 * np.abs(ref.A).max())
    np.testing.assert_array_equal(params.test_ids, ref.test_ids)


def test_bad_inputs_are_named(tmp_path):
  workspace, fit_ids, val_ids = _workspace(tmp_path)
  with pytest.raises(ValueError, match="needs every λ > 0"):
    streaming.fit_streaming(workspace, fit_ids, simulator="linear", lam=0.0, solver="normal")
  with pytest.raises(traces.TraceError, match="run_9"):
    streaming.fit_streaming(workspace, fit_ids + ["run_9"], simulator="linear", lam=0.1)
  with pytest.raises(ValueError, match="both fit and validation"):
    streaming.fit_streaming(workspace, fit_ids, simulator="linear", val_run_ids=fit_ids[:1])
  # A validation run drawing a train id the fit runs never saw is named.
  run = traces.read_run(workspace, "run_4")
  cur = run.curriculum.copy()
  cur[3, 0] = 999
  bad = dataclasses.replace(run, run_id="run_bad", curriculum=cur,
                            train_ids=np.append(run.train_ids, 999))
  traces.write_run(workspace, bad)
  with pytest.raises(traces.TraceError, match=r"run_bad.*999"):
    streaming.fit_streaming(workspace, fit_ids, simulator="linear", val_run_ids=["run_bad"])


_CHILD = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from simfluence_jax.simulators import streaming
    from simfluence_jax.traces import contract as traces
    ws, m, n, runs, steps, k = sys.argv[1], *map(int, sys.argv[2:7])
    rng = np.random.default_rng(0)
    train_ids, test_ids = np.arange(n, dtype=np.int64), np.arange(m, dtype=np.int64)
    for r in range(runs):   # one run in memory at a time while writing
      losses = (2.0 * 0.99 ** np.arange(steps + 1)[:, None]
                + 0.01 * rng.standard_normal((steps + 1, m))).astype(np.float32)
      cur = np.stack([rng.choice(n, k, replace=False) for _ in range(steps)]).astype(np.int32)
      traces.write_run(ws, traces.RunTrace(f"run_{r}", train_ids, test_ids, k, cur, losses))
      del losses
    ids = [f"run_{r}" for r in range(runs)]
    streaming.fit_streaming(ws, ids[:1], simulator="linear", lam=0.1, chunk_size=64)  # warm
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params, diag = streaming.fit_streaming(ws, ids, simulator="linear", lam=0.1,
                                           chunk_size=512)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"added_mb": (peak - before) / 1024, "solver": diag["streaming"]["solver"],
                      "finite": bool(np.isfinite(params.A).all())}))
""")


def test_streaming_memory_does_not_grow_with_the_traces(tmp_path):
  """m = 20,000 test examples, 24 runs × 64 steps: the traces are 24 × 65 × 20,000 × 4 B =
  125 MB on disk and the in-memory design would be 3 × S × m × 4 B = 369 MB; the streaming
  fit adds well under either (statistics of one 512-column chunk plus the [m, n] result)."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  out = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path), "20000", "20", "24",
                        "64", "4"], capture_output=True, text=True, env=env, check=True,
                       cwd=pathlib.Path(__file__).resolve().parents[2])
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["finite"] and result["solver"] == "normal"
  assert result["added_mb"] < 100, result


def test_fit_binary_streaming_writes_the_reference_solution(tmp_path):
  workspace, fit_ids, _ = _workspace(tmp_path)
  subprocess.run([sys.executable, "-m", "simfluence_jax.fit", f"--workspace={workspace}",
                  "--simulator=linear", f"--fit_runs={','.join(fit_ids)}", "--lam=0.05",
                  "--streaming=normal", "--name=streamed"], check=True, capture_output=True,
                 cwd=pathlib.Path(__file__).resolve().parents[2])
  params, diag = fit_params.load_fit(workspace, "streamed")
  _, (a_ref, b_ref) = _reference(workspace, fit_ids, "linear", 0.05)
  scale = max(np.abs(a_ref).max(), np.abs(b_ref).max())
  np.testing.assert_allclose(params.A, a_ref, atol=1e-7 * scale + 1e-7, rtol=0)
  np.testing.assert_allclose(params.B, b_ref, atol=1e-7 * scale + 1e-7, rtol=0)
  assert diag["streaming"]["solver"] == "normal"
