"""Bring your own loop: a plain numpy SGD loop logs its runs with TraceWriter, then the fit
and evaluate binaries run on that workspace as a user would run them; and the README's
TraceWriter snippet runs verbatim.

The loop: logistic regression on a fixed synthetic pool whose first half is mislabeled
(a planted, strong curriculum effect); each run draws its batches with its own share of
mislabeled examples, so the runs' test losses differ by curriculum, and a simulator that
learned the per-example effects must beat the no-curriculum mean-trajectory baseline.
Measured over 8 data seeds (linear_paper, this split): all-steps MSE 0.02-0.29× the mean
trajectory's, curriculum R² 0.71-0.98; the simulated one-step effect of a mislabeled batch
is a rise of the mean test loss (0.03-0.08), of a clean batch a fall (-0.02 to -0.13).
"""

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import numpy as np

from simfluence_jax.traces import contract as traces
from simfluence_jax.traces import fit_params
from simfluence_jax.traces.writer import TraceWriter

REPO = pathlib.Path(__file__).resolve().parents[2]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
DIM, N, M, STEPS, K, LR = 4, 16, 6, 24, 2, 0.5
TRAIN_IDS = np.arange(100, 100 + N)   # ids 100..107 are mislabeled
TEST_IDS = np.arange(500, 500 + M)
RUNS = [f"run_{r:02d}" for r in range(13)]
FIT, VAL, HELDOUT = RUNS[:8], RUNS[8:10], RUNS[10:]


def _data(seed: int = 0):
  """Train x [N, DIM], y [N] (first half flipped); test x [M, DIM], y [M] (clean)."""
  rng = np.random.default_rng(seed)
  w_true = rng.standard_normal(DIM)
  x = rng.standard_normal((N + M, DIM))
  y = np.sign(x @ w_true)
  y[:N // 2] *= -1
  return x[:N], y[:N], x[N:], y[N:]


def _test_losses(w, x, y) -> np.ndarray:
  """Per-example logistic loss [M]."""
  return np.logaddexp(0.0, -y * (x @ w))


def _train(ws, run_id: str, p_mislabeled: float, seed: int) -> list[list[int]]:
  """One SGD run logged with TraceWriter; returns the ids it consumed, per step."""
  x_train, y_train, x_test, y_test = _data()
  rng = np.random.default_rng(seed)
  w = np.zeros(DIM)
  consumed = []
  with TraceWriter(ws, run_id, train_ids=TRAIN_IDS, test_ids=TEST_IDS, batch_size=K,
                   metadata={"p_mislabeled": p_mislabeled}) as writer:
    writer.initial(_test_losses(w, x_test, y_test))
    for _ in range(STEPS):
      bad = rng.random(K) < p_mislabeled
      pos = np.where(bad, rng.integers(0, N // 2, K), rng.integers(N // 2, N, K))
      xb, yb = x_train[pos], y_train[pos]
      grad = -(yb / (1 + np.exp(yb * (xb @ w))))[:, None] * xb   # [K, DIM]
      w = w - LR * grad.mean(0)
      writer.step(TRAIN_IDS[pos], _test_losses(w, x_test, y_test))
      consumed.append(TRAIN_IDS[pos].tolist())
  return consumed


def _binary(ws, cwd, name, *flags):
  proc = subprocess.run([sys.executable, "-m", f"simfluence_jax.{name}", f"--workspace={ws}",
                         *flags], cwd=cwd, env=ENV, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_numpy_loop_traces_fit_and_evaluate_beating_the_mean_trajectory(tmp_path):
  ws = tmp_path / "ws"
  shares = np.random.default_rng(1).permutation(np.linspace(0.0, 1.0, len(RUNS)))
  consumed = {run: _train(ws, run, float(p), r) for r, (run, p) in enumerate(zip(RUNS, shares))}
  assert traces.list_runs(ws) == RUNS
  assert traces.read_run(ws, "run_00").curriculum.tolist() == consumed["run_00"]

  summary = _binary(ws, tmp_path, "fit", "--simulator=linear_paper",
                    f"--fit_runs={','.join(FIT)}", f"--val_runs={','.join(VAL)}",
                    "--name=linear_paper")
  assert summary["variant"] == "paper" and (summary["m"], summary["n"]) == (M, N)
  _binary(ws, tmp_path, "evaluate", "--fit=linear_paper", f"--runs={','.join(HELDOUT)}")

  metrics = json.loads((ws / "fits" / "linear_paper" / "metrics.json").read_text())
  assert [r["run_id"] for r in metrics["per_run"]] == HELDOUT
  mse = metrics["mse"]["mean"]
  baseline = metrics["baselines"]["mean_trajectory"]["mse"]["mean"]
  assert math.isfinite(mse) and math.isfinite(baseline)
  assert mse < 0.5 * baseline, (mse, baseline)        # measured 0.26× at this seed
  assert metrics["curriculum_r2"] > 0.5               # measured 0.74

  # The planted effect, read off the fit: from the fit runs' mean test loss L̄ [M], one step
  # on a batch of two copies of example i moves it by (2 A_i - 1) L̄ + 2 B_i (Eq. 1).
  params, _ = fit_params.load_fit(ws, "linear_paper")
  level = np.nanmean(np.concatenate([traces.read_run(ws, r).losses for r in FIT]), axis=0)
  effect = ((2 * params.A - 1) * level[:, None] + 2 * params.B).mean(0)   # [N]
  mislabeled = np.asarray(params.train_ids) < 100 + N // 2
  assert effect[mislabeled].mean() > 0 > effect[~mislabeled].mean(), effect


def _readme_snippet() -> str:
  text = (REPO / "README.md").read_text(encoding="utf-8")
  match = re.search(r"^### From your own loop, in Python\n.*?^```python\n(.*?)^```$", text,
                    re.S | re.M)
  assert match, "README.md: no python block under '### From your own loop, in Python'"
  return match.group(1)


def test_readme_snippet_runs_and_writes_what_its_loop_consumed(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": "__readme__"}
  exec(compile(_readme_snippet(), "README.md", "exec"), namespace)  # pylint: disable=exec-used
  ws = tmp_path / "workspace"
  assert traces.list_runs(ws) == ["run_0", "run_1", "run_2", "run_3"]
  y_test = namespace["y_test"]
  for run in range(4):
    trace = traces.read_run(ws, f"run_{run}")
    # Each run's batches: its seeded permutation of positions 0..15, two per step (ids =
    # positions here); row 0 is the loss of w = 0, i.e. y_test².
    perm = np.random.default_rng(run).permutation(16).reshape(8, 2)
    np.testing.assert_array_equal(trace.curriculum, perm)
    np.testing.assert_array_equal(trace.test_ids, [100, 101, 102, 103])
    np.testing.assert_allclose(trace.losses[0], y_test ** 2, rtol=1e-6)
    assert trace.metadata == {"seed": run} and trace.losses.shape == (9, 4)
    assert trace.losses[-1].mean() < 0.5 * trace.losses[0].mean()  # SGD learned
  # The last run's final row is the loop's last recorded loss.
  np.testing.assert_allclose(trace.losses[-1], namespace["test_losses"](namespace["w"]),
                             rtol=1e-6)
